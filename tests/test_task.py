"""End-to-end tests of `python -m trainer.task` and `python -m trainer.evaluate` on generated data."""

import collections
import csv
import json
import math
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, event_tags, run_module

SMOKE = ('--config', 'smoke')


def _history(model_dir):
  with open(model_dir / 'history.csv') as f:
    return list(csv.DictReader(f))


def test_smoke_run_end_to_end_then_evaluate(smoke_run, smoke_run_evaluation, smoke_data,
                                            tmp_path):
  model_dir = smoke_run.model_dir  # Trained once per session (conftest.smoke_run); read only.
  assert 'epoch 2/2' in smoke_run.stdout
  config = json.loads((model_dir / 'config.json').read_text())
  assert config['data']['image_size'] == [32, 32] and config['resolved_precision'] == 'float32'
  assert config['strategy_used'] == 'default' and config['data']['batch_size'] == 4
  assert [row['epoch'] for row in _history(model_dir)] == ['0', '1']

  metrics = json.loads((model_dir / 'metrics.json').read_text())
  assert metrics['split'] == 'val' and metrics['num_examples'] == 6
  assert 0.0 <= metrics['pixel_accuracy'] <= 1.0
  assert len(metrics['per_class']) == 11 and len(metrics['confusion_matrix']) == 11
  assert set(metrics['per_class']['Road']) == {'iou', 'precision', 'recall', 'f1', 'support'}
  # Label resolution: every non-void val pixel (6 frames of 64x48) is counted once.
  assert sum(map(sum, metrics['confusion_matrix'])) == metrics['num_pixels'] > 6 * 32 * 32

  export = model_dir / 'export'
  assert (export / 'model.keras').is_file() and (export / 'serving' / 'saved_model.pb').is_file()
  assert json.loads((export / 'labels.json').read_text())['classes'][3]['name'] == 'Road'
  assert {'epoch_loss', 'epoch_mean_iou', 'learning_rate'} <= event_tags(model_dir / 'logs/train')
  val_tags = event_tags(model_dir / 'logs/val')
  assert {'epoch_loss', 'epoch_mean_iou', 'confusion_matrix', 'overlays', 'iou/Road'} <= val_tags

  result = smoke_run_evaluation  # trainer.evaluate --split val of that run, default flags.
  assert {'split', 'num_examples', 'pixel_accuracy', 'mean_iou', 'per_class',
          'confusion_matrix'} <= set(result)
  # Same best checkpoint, same evaluation code: the same numbers as the run's metrics.json.
  assert result['confusion_matrix'] == metrics['confusion_matrix']
  assert result['mean_iou'] == pytest.approx(metrics['mean_iou'])

  # Rerunning a finished run resumes at its end: no epoch is trained or logged twice. (On a copy:
  # the rerun rewrites the run's records, which other tests read.)
  model_dir = smoke_run.copy_to(tmp_path)
  proc = run_module('trainer.task', *smoke_run.args, '--model_dir', model_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'epoch 1/2' not in proc.stdout and 'resumed from' in proc.stdout
  assert [row['epoch'] for row in _history(model_dir)] == ['0', '1']
  # TensorBoard: the run's HParams record stays the first one; the final evaluation is rewritten.
  assert len(_summaries(model_dir / 'logs')['_hparams_/session_start_info']) == 1
  assert [s for s, _ in _summaries(model_dir / 'logs/val')['final/mean_iou']] == [1, 1]

  # Rerunning with settings that would train something else is refused, and the record of how
  # the checkpoint was trained stays as it was.
  recorded = (model_dir / 'config.json').read_text()
  proc = run_module('trainer.task', *smoke_run.args, '--model_dir', model_dir,
                    '--learning_rate', '0.5', '--image_size', '64x64', '--epochs', '3')
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  assert (f'{model_dir}/config.json: the checkpoint to resume was trained with other settings '
          '(data.image_size 32x32 -> 64x64, optimizer.learning_rate 0.01 -> 0.5); rerun with the '
          'same settings to resume it, or use a new --model_dir') in errors[0]
  assert (model_dir / 'config.json').read_text() == recorded


def _summaries(run_dir) -> dict:
  """{tag: [(step, summary value), ...]} of the event files of one TensorBoard run dir."""
  found = collections.defaultdict(list)
  for path in sorted(run_dir.glob('events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        found[value.tag].append((event.step, value))
  return found


def _steps(points):
  return [step for step, _ in points]


def _scalars(points):
  return [float(tf.make_ndarray(value.tensor)) for _, value in points]


def _image(value, index=0):
  return tf.io.decode_png(tf.make_ndarray(value.tensor)[2 + index]).numpy()


def test_smoke_run_tensorboard_tells_the_story(smoke_run):
  """Tags, x-axes and values of the smoke run's TensorBoard logs (trainer/summaries.py)."""
  from tensorboard.plugins.custom_scalar import layout_pb2  # pylint: disable=g-import-not-at-top
  logs = smoke_run.model_dir / 'logs'
  train, val = _summaries(logs / 'train'), _summaries(logs / 'val')
  history = _history(smoke_run.model_dir)
  # One loss definition for train and val (history's columns), by epoch index; the class-weighted
  # objective on its own tag (the smoke run weighs classes, so the two differ).
  for points, column in ((train['epoch_loss'], 'train_loss'), (val['epoch_loss'], 'val_loss'),
                         (train['epoch_objective'], 'train_objective')):
    assert _steps(points) == [0, 1]
    assert _scalars(points) == pytest.approx([float(row[column]) for row in history])
  assert all(float(r['train_objective']) != pytest.approx(float(r['train_loss'])) for r in history)
  assert 'epoch_objective' not in val
  # Per step group (smoke: 2 steps a group, 6 a epoch) at the global step, under step/.
  for key in ('loss', 'objective', 'learning_rate', 'images_per_second'):
    assert _steps(train[f'step/{key}']) == [2, 4, 6, 8, 10, 12], key
  assert min(_scalars(train['step/images_per_second'])) > 0
  rates = _scalars(train['step/learning_rate'])
  assert rates == sorted(rates, reverse=True) and rates[-1] == pytest.approx(0.0, abs=1e-9)

  # Per validation, a bar chart of the per-class IoU: a class's bar, in its colour, is as long
  # as its iou/<class> (240 pixels for 1, 12 rows high).
  classes = json.loads((smoke_run.model_dir / 'inference.json').read_text())['classes']
  colors = [c['color'] for c in classes]
  assert _steps(val['per_class_iou']) == [0, 1]
  bars = _image(val['per_class_iou'][-1][1])
  lengths = [round(_scalars(val[f'iou/{c["name"]}'])[-1] * 240) for c in classes]
  assert any(lengths)
  for color, length in zip(colors, lengths):
    assert np.all(bars == color, axis=-1).sum() >= 12 * length
  # Overlays: the 2 fixed frames, each captioned, with its panels enlarged and a legend below.
  assert _steps(val['overlays']) == [0, 1]
  overlays = val['overlays'][-1][1]
  assert len(tf.make_ndarray(overlays.tensor)) == 2 + 2
  assert 'synth05_' in overlays.metadata.summary_description
  strip = _image(overlays)
  assert strip.shape[1] >= 3 * 32 and strip.shape[0] > strip.shape[1] // 3
  legend = strip[strip.shape[0] // 2:]
  assert all(np.all(legend == c, axis=-1).sum() >= 64 for c in colors)

  # The final (calibrated) evaluation of metrics.json, at the last epoch's index.
  metrics = json.loads((smoke_run.model_dir / 'metrics.json').read_text())
  for key in ('mean_iou', 'pixel_accuracy'):
    assert _steps(val[f'final/{key}']) == [1]
    assert _scalars(val[f'final/{key}']) == [pytest.approx(metrics[key])]
  assert _scalars(val['final/iou/Road']) == [pytest.approx(metrics['per_class']['Road']['iou'])]
  table = tf.make_ndarray(val['final/per_class'][0][1].tensor).item().decode()
  assert f'mIoU {metrics["mean_iou"]:.4f}' in table
  assert all(f'| {name} |' in table for name in metrics['per_class'])
  assert _steps(val['final/per_class_iou']) == [1] and _steps(val['final/confusion_matrix']) == [1]

  layout = layout_pb2.Layout.FromString(
      tf.make_ndarray(train['custom_scalars__config__'][0][1].tensor).item())
  charts = {c.title: set(c.multiline.tag) for category in layout.category for c in category.chart}
  assert {'^iou/'} in charts.values() and {'^epoch_loss$'} in charts.values()

  # HParams: the resolved config and run facts, with the final metrics as its metrics.
  from tensorboard.plugins.hparams import plugin_data_pb2  # pylint: disable=g-import-not-at-top
  records = [plugin_data_pb2.HParamsPluginData.FromString(v.metadata.plugin_data.content)
             for points in _summaries(logs).values() for _, v in points
             if v.metadata.plugin_data.plugin_name == 'hparams']
  experiment = next(r.experiment for r in records if r.HasField('experiment'))
  start = next(r.session_start_info for r in records if r.HasField('session_start_info'))
  assert {(m.name.group, m.name.tag) for m in experiment.metric_infos} >= {
      ('val', 'final/mean_iou'), ('val', 'final/pixel_accuracy')}
  assert {h.name for h in experiment.hparam_infos} == set(start.hparams)
  assert start.hparams['loss.class_weighting'].string_value == 'inverse_sqrt'
  assert start.hparams['data.image_size'].string_value == '32x32'
  assert start.hparams['eval.scales'].string_value == '0.6,1.0'
  assert start.hparams['model.base_filters'].number_value == 4
  assert start.hparams['num_replicas'].number_value == 1
  assert start.hparams['data_dir'].string_value.endswith('tfrecords')


def _start(smoke_data, model_dir, *extra):
  return subprocess.Popen(
      [sys.executable, '-m', 'trainer.task', *SMOKE, '--data_dir', str(smoke_data),
       '--model_dir', str(model_dir), *extra], cwd=REPO, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if predicate():
      return True
    time.sleep(0.05)
  return False


@pytest.mark.multiprocess
def test_resume_after_kill_continues_without_repeating_epochs(smoke_data, tmp_path):
  model_dir = tmp_path / 'model'
  args = ('--epochs', '3')
  proc = _start(smoke_data, model_dir, *args)
  # Kill -9 mid-epoch 2, after its first backup (global step 8 of 6 steps/epoch).
  reached = _wait_for(lambda: (model_dir / 'checkpoints' / 'ckpt-8.index').exists(), proc)
  proc.kill()
  proc.communicate()
  assert reached, 'the run ended before it could be interrupted'
  assert [row['epoch'] for row in _history(model_dir)] == ['0']
  proc = run_module('trainer.task', *SMOKE, '--data_dir', smoke_data, '--model_dir', model_dir,
                    *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'resumed from' in proc.stdout and 'epoch 1/3' not in proc.stdout
  assert [row['epoch'] for row in _history(model_dir)] == ['0', '1', '2']
  # 3 epochs x 6 steps: the interrupted span was not trained twice.
  assert tf.train.latest_checkpoint(str(model_dir / 'checkpoints')).endswith('ckpt-18')


@pytest.mark.multiprocess
def test_sigterm_saves_a_backup_and_exits_retryable(smoke_data, tmp_path):
  model_dir = tmp_path / 'model'
  proc = _start(smoke_data, model_dir, '--epochs', '4')
  started = _wait_for(lambda: (model_dir / 'history.csv').exists(), proc)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert started
  assert proc.returncode == 75, stderr[-3000:]
  assert 'preempted' in stderr and 'Traceback' not in stderr
  latest = tf.train.latest_checkpoint(str(model_dir / 'checkpoints'))
  reader = tf.train.load_checkpoint(latest)
  epoch = int(reader.get_tensor('epoch/.ATTRIBUTES/VARIABLE_VALUE'))
  step = int(reader.get_tensor('step_in_epoch/.ATTRIBUTES/VARIABLE_VALUE'))
  assert int(latest.rsplit('-', 1)[1]) == epoch * 6 + step
  # Rerunning continues from that backup and logs every epoch exactly once.
  proc = run_module('trainer.task', *SMOKE, '--data_dir', smoke_data, '--model_dir', model_dir,
                    '--epochs', '4')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'resumed from' in proc.stdout
  assert [row['epoch'] for row in _history(model_dir)] == ['0', '1', '2', '3']
  assert tf.train.latest_checkpoint(str(model_dir / 'checkpoints')).endswith('ckpt-24')


def test_unknown_flag_is_a_config_error(tmp_path):
  proc = run_module('trainer.task', '--epochz', '3', '--model_dir', tmp_path)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith('error: Unknown command line flag')


@pytest.mark.parametrize('module', ['tfrecords_builder', 'tfrecords_builder.synthetic',
                                    'trainer.task', 'trainer.evaluate', 'trainer.predict',
                                    'tuning.tune'])
def test_every_entry_point_rejects_stray_arguments_in_one_line(module):
  proc = run_module(module, 'stray')
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1] == 'error: unexpected arguments: stray'
  assert 'Traceback' not in proc.stderr


def test_summary_only_prints_the_keras_summary():
  proc = run_module('trainer.task', '--config', 'seed_unet', '--summary_only', '--num_classes',
                    '11')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Total params: 34,543,179' in proc.stdout
  assert 'enc1_conv1 (Conv2D)' in proc.stdout


@pytest.mark.parametrize('args, message', [
    (('--data_dir', '{missing}'), 'manifest.json: not found'),
    (('--data_dir', '{empty}'), 'manifest.json: not found'),
    (('--config', 'nope'), 'unknown preset'),
    (('--image_size', '10by10'), '--image_size 10by10: expected HxW'),
    (('--image_size', '30x30'), 'data.image_size: 30x30 must be positive multiples'),
    (('--hparams_file', '{hparams}'), 'unknown key dropuot'),
    (('--batch_size', '0'), 'data.batch_size: 0 is out of range'),
    (('--hparams_file', '{calibration}'), 'no split "tset" (has: '),
    (('--hparams_file', '{heads}'),
     'loss.aux_loss_weight: 0.4 needs model.depth >= 2, not model.depth 1'),
    (('--params_override', 'model.base_filterz=8'),
     '--params_override: unknown key model.base_filterz (known in model: base_filters, '),
    (('--params_override', 'model.depth=1,loss.aux_loss_weight=0.4,eval.scales=[0.5,1]'),
     'loss.aux_loss_weight: 0.4 needs model.depth >= 2, not model.depth 1'),
    (('--params_override', 'optimizer.learning_rate=fast'),
     "--params_override: optimizer.learning_rate: expected float, got 'fast'"),
    (('--params_override', '{overrides}'), 'data.image_size: 30x30 must be positive multiples'),
    # Repeated: applied in order, the later value wins (the heads come from the first).
    (('--params_override', 'model.depth=3,loss.aux_loss_weight=0.4', '--params_override',
      'model.depth=1'), 'loss.aux_loss_weight: 0.4 needs model.depth >= 2, not model.depth 1'),
])
def test_bad_input_fails_before_training(smoke_data, tmp_path, args, message):
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'hparams.json').write_text('{"dropuot": 0.2}')
  (tmp_path / 'calibration.json').write_text('{"calibration_split": "tset"}')
  (tmp_path / 'heads.json').write_text('{"aux_loss_weight": 0.4, "depth": 1}')
  (tmp_path / 'overrides.yaml').write_text('data:\n  image_size: [30, 30]\nmodel.depth: 2\n')
  paths = {'missing': tmp_path / 'missing', 'empty': tmp_path / 'empty',
           'hparams': tmp_path / 'hparams.json', 'calibration': tmp_path / 'calibration.json',
           'heads': tmp_path / 'heads.json', 'overrides': tmp_path / 'overrides.yaml'}
  args = [a.format(**paths) for a in args]
  if '--data_dir' not in args:
    args += ['--data_dir', str(smoke_data)]
  model_dir = tmp_path / 'model'
  proc = run_module('trainer.task', *SMOKE, '--model_dir', model_dir, *args)
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  assert not (model_dir / 'config.json').exists()


def test_early_stopping_and_vertex_ai_dirs(smoke_data, tmp_path):
  """Vertex AI env places outputs; a run with no improvement stops early, and stays stopped."""
  hparams = tmp_path / 'hp.json'
  # lr 1e-12 freezes the weights and BatchNorm momentum 0.9999 its moving statistics (at the
  # smoke preset's 0.99 their drift moved val mIoU by more than 0.01 between epochs in one CI
  # run); min_delta makes what drift remains no improvement.
  hparams.write_text(json.dumps({'early_stopping_patience': 1, 'epochs': 6,
                                 'learning_rate': 1e-12, 'bn_momentum': 0.9999,
                                 'early_stopping_min_delta': 0.01}))
  env = {**__import__('os').environ, 'AIP_MODEL_DIR': str(tmp_path / 'aip_model'),
         'AIP_CHECKPOINT_DIR': str(tmp_path / 'aip_ckpt'),
         'AIP_TENSORBOARD_LOG_DIR': str(tmp_path / 'aip_logs')}
  args = ('trainer.task', *SMOKE, '--data_dir', smoke_data, '--hparams_file', hparams)
  proc = run_module(*args, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'early stop: no better val mIoU for 1 epochs' in proc.stdout
  # Epoch 0 sets the best; epoch 1 cannot beat it, so patience 1 stops the run there.
  epochs_done = [row['epoch'] for row in _history(tmp_path / 'aip_model')]
  assert epochs_done == ['0', '1']
  assert (tmp_path / 'aip_model' / 'metrics.json').exists()
  assert tf.train.latest_checkpoint(str(tmp_path / 'aip_ckpt' / 'checkpoints'))
  assert tf.train.latest_checkpoint(str(tmp_path / 'aip_ckpt' / 'best'))
  assert list((tmp_path / 'aip_logs' / 'val').glob('events.*'))
  assert not (tmp_path / 'aip_model' / 'checkpoints').exists()
  # Vertex AI's model import reads a SavedModel at AIP_MODEL_DIR's root; export/ stays too.
  assert (tmp_path / 'aip_model' / 'saved_model.pb').is_file()
  assert (tmp_path / 'aip_model' / 'variables').is_dir()
  assert (tmp_path / 'aip_model' / 'export' / 'serving' / 'saved_model.pb').is_file()
  proc = run_module(*args, env=env)
  assert proc.returncode == 0 and f'epoch {len(epochs_done) + 1}/6' not in proc.stdout


def test_training_crops_and_sparse_validation(smoke_data, tmp_path):
  """Crops smaller than image_size train the same weights that whole frames are served with."""
  hparams = tmp_path / 'hp.json'
  # Also trains with the stride-2 stem and class weights, which must leave a finite loss in
  # every epoch, and whose model must still serve whole frames at image_size.
  hparams.write_text(json.dumps({'epochs': 3, 'eval_every_epochs': 2, 'crop_size': [16, 24],
                                 'image_size': [32, 32], 'bn_momentum': 0.9, 'stem_stride': 2,
                                 'class_weighting': 'inverse_sqrt', 'logit_adjustment': 0.5}))
  model_dir = tmp_path / 'model'
  proc = run_module('trainer.task', *SMOKE, '--data_dir', smoke_data, '--model_dir', model_dir,
                    '--hparams_file', hparams)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = _history(model_dir)
  # Validated after epoch 2 (every 2nd) and epoch 3 (the last) only.
  assert [bool(row['val_mean_iou']) for row in rows] == [False, True, True]
  assert all(math.isfinite(float(row['train_loss'])) for row in rows)
  metrics = json.loads((model_dir / 'metrics.json').read_text())
  assert metrics['num_examples'] == 6 and metrics['mean_iou'] is not None
  import keras  # pylint: disable=g-import-not-at-top
  served = keras.models.load_model(model_dir / 'export' / 'model.keras')
  assert tuple(served.input_shape) == (None, 32, 32, 3)
  assert tuple(served.output_shape) == (None, 32, 32, 11)
  assert served.get_layer('stem_conv1').strides == (2, 2)
  assert served.layers[2].momentum == 0.9
  # The served prediction carries the same logit adjustment the val metrics used.
  from tfrecords_builder import manifest as manifest_lib  # pylint: disable=g-import-not-at-top
  from trainer import losses  # pylint: disable=g-import-not-at-top
  weights = losses.class_weights_from_counts(
      manifest_lib.read(str(smoke_data)).split('train')['class_pixel_counts'], 'inverse_sqrt')
  labels = json.loads((model_dir / 'export' / 'labels.json').read_text())
  assert labels['logit_bias'] == pytest.approx(list(-0.5 * np.log(weights)), rel=1e-5)

  # trainer.evaluate scores the checkpoint with the run's adjustment or an overriding one.
  def evaluate(*extra):
    report = tmp_path / 'eval.json'
    proc = run_module('trainer.evaluate', '--model_dir', model_dir, '--data_dir', smoke_data,
                      '--split', 'val', '--output', report, *extra)
    assert proc.returncode == 2 if '2' in extra else proc.returncode == 0, proc.stderr[-3000:]
    return proc, (json.loads(report.read_text()) if proc.returncode == 0 else None)

  _, same = evaluate()
  assert same['logit_adjustment'] == 0.5
  assert same['confusion_matrix'] == metrics['confusion_matrix']
  _, plain = evaluate('--logit_adjustment', '0')
  assert plain['logit_adjustment'] == 0.0
  # Without the adjustment a pixel can only change to a class of larger weight, so the most
  # up-weighted class gains pixels and the least up-weighted one loses them.
  shift = (np.sum(plain['confusion_matrix'], axis=0) -
           np.sum(same['confusion_matrix'], axis=0))
  assert np.any(shift != 0), 'degenerate test: the adjustment changes no prediction'
  assert shift[np.argmax(weights)] >= 0 and shift[np.argmin(weights)] <= 0
  proc, _ = evaluate('--logit_adjustment', '2')
  assert 'error: --logit_adjustment: 2.0 is out of range [0, 1]' in proc.stderr


def test_calibration_is_fitted_on_train_and_used_by_metrics_export_and_evaluate(
    smoke_run, smoke_run_evaluation, smoke_data, tmp_path):
  # The shared run (conftest.SMOKE_RUN_HPARAMS): inverse_sqrt class weights, logit adjustment 0.5,
  # calibration on train, and two test-time scales (0.6 x 32 = 19 pixels is padded to the model's
  # multiple of 4), which the calibration, the metrics, the export and trainer.evaluate must all
  # use alike.
  model_dir = smoke_run.model_dir
  assert json.loads((model_dir / 'config.json').read_text())['eval']['calibration_split'] == 'train'
  stdout = smoke_run.stdout
  assert 'calibration on train (' in stdout and 'val without calibration: mIoU' in stdout
  record = json.loads((model_dir / 'calibration.json').read_text())
  from tfrecords_builder import manifest as manifest_lib  # pylint: disable=g-import-not-at-top
  from trainer import losses  # pylint: disable=g-import-not-at-top
  weights = losses.class_weights_from_counts(
      manifest_lib.read(str(smoke_data)).split('train')['class_pixel_counts'], 'inverse_sqrt')
  # It starts from the logit adjustment and only moves where that raises train mIoU.
  assert record['split'] == 'train' and record['num_pixels'] > 0
  assert record['initial_bias'] == pytest.approx(list(-0.5 * np.log(weights)), rel=1e-5)
  assert len(record['bias']) == 11
  assert record['mean_iou_after'] >= record['mean_iou_before']
  metrics = json.loads((model_dir / 'metrics.json').read_text())
  assert metrics['calibration_split'] == 'train'
  assert set(metrics['uncalibrated']) == {'mean_iou', 'pixel_accuracy'}
  labels = json.loads((model_dir / 'export' / 'labels.json').read_text())
  assert labels['logit_bias'] == pytest.approx(record['bias'], rel=1e-6)
  assert labels['scales'] == [0.6, 1.0]

  def evaluate(*extra):
    report = tmp_path / 'eval.json'
    proc = run_module('trainer.evaluate', '--model_dir', model_dir, '--data_dir', smoke_data,
                      '--split', 'val', '--output', report, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(report.read_text())

  # By default evaluation uses calibration.json and reproduces the run's metrics; asking for a
  # logit adjustment scores without it (the run's "uncalibrated" numbers); --calibration_split
  # fits afresh, from the same checkpoint and data the same biases.
  same = smoke_run_evaluation  # evaluate() of this run, shared with the end-to-end test.
  assert same['calibration']['source'] == 'calibration.json'
  assert same['confusion_matrix'] == metrics['confusion_matrix']
  plain = evaluate('--logit_adjustment', '0.5')
  assert plain['calibration'] is None
  assert plain['mean_iou'] == pytest.approx(metrics['uncalibrated']['mean_iou'])
  refit = evaluate('--calibration_split', 'train')
  assert refit['calibration']['source'] == 'fitted on train'
  assert refit['calibration']['bias'] == pytest.approx(record['bias'], abs=1e-5)
  assert same['eval_scales'] == refit['eval_scales'] == [0.6, 1.0]
  one_scale = evaluate('--eval_scales', '1', '--calibration_split', 'train')
  assert one_scale['eval_scales'] == [1.0]
  assert one_scale['confusion_matrix'] != same['confusion_matrix'], (
      'degenerate test: the scales change no prediction')
  _evaluate_matches_the_export_on_a_test_only_data_dir(model_dir, tmp_path)
  for value, problem in (('0', 'eval.scales: (0.0,) is out of range'),
                         ('1,x', "'1,x' is not a comma-separated list of numbers")):
    proc = run_module('trainer.evaluate', '--model_dir', model_dir, '--data_dir', smoke_data,
                      '--eval_scales', value)
    assert proc.returncode == 2 and f'error: --eval_scales: {problem}' in proc.stderr, proc.stderr
    assert 'Traceback' not in proc.stderr


def _onednn_on_after_importing(module: str, env: dict) -> bool:
  """Whether TensorFlow, imported right after `module` in a fresh process, logs oneDNN as on."""
  proc = subprocess.run([sys.executable, '-c', f'import {module}, tensorflow'],
                        env={**env, 'TF_CPP_MIN_LOG_LEVEL': '0'}, cwd=REPO,
                        capture_output=True, text=True, check=True)
  return 'oneDNN custom operations are on' in proc.stderr


def test_trainer_turns_on_onednn_before_tensorflow_loads():
  """The 1.35x CPU speed-up (docs/benchmarks.md) needs the variable set before TF loads."""
  env = {k: v for k, v in __import__('os').environ.items() if k != 'TF_ENABLE_ONEDNN_OPTS'}
  for module in ('trainer.task', 'tuning.tune'):
    assert _onednn_on_after_importing(module, env), module
  # A user's choice wins.
  assert not _onednn_on_after_importing('trainer.task', {**env, 'TF_ENABLE_ONEDNN_OPTS': '0'})


def _evaluate_matches_the_export_on_a_test_only_data_dir(model_dir, tmp_path):
  """trainer.evaluate reads only frames and labels from the data dir it scores: on a data dir
  holding nothing but a test split (no train split, so no class counts) its confusion matrix
  equals, pixel for pixel, the one of the exported SavedModel's class_ids on the same frames."""
  from tfrecords_builder import features, manifest as manifest_lib, synthetic, writer  # pylint: disable=g-import-not-at-top
  data_dir = tmp_path / 'test_only'
  synthetic.generate(str(tmp_path / 'test_raw'), 'segnet', {'test': 5}, (64, 48), seed=11)
  writer.build(str(tmp_path / 'test_raw'), str(data_dir), num_workers=1, log=lambda *_: None)
  assert list(manifest_lib.read(str(data_dir)).splits) == ['test']
  report = tmp_path / 'test_eval.json'
  proc = run_module('trainer.evaluate', '--model_dir', model_dir, '--data_dir', data_dir,
                    '--split', 'test', '--output', report)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(report.read_text())
  assert result['num_examples'] == 5 and result['calibration']['source'] == 'calibration.json'

  serve = tf.saved_model.load(str(model_dir / 'export' / 'serving')).signatures['serving_default']
  num_classes = len(result['confusion_matrix'])
  expected = np.zeros([num_classes] * 2, np.int64)
  for path in manifest_lib.read(str(data_dir)).shard_paths('test'):
    for record in tf.data.TFRecordDataset(path):
      encoded = tf.io.parse_single_example(record, features.FEATURE_SPEC)[features.IMAGE_ENCODED]
      mask = features.parse_example(record)['mask'].numpy().astype(np.int64)
      ids = serve(image_bytes=tf.reshape(encoded, [1]))['class_ids'].numpy()[0]
      keep = mask < num_classes
      np.add.at(expected, (mask[keep], ids[keep].astype(np.int64)), 1)
  assert expected.sum() == sum(map(sum, result['confusion_matrix'])) > 0
  np.testing.assert_array_equal(np.asarray(result['confusion_matrix']), expected)


def test_gpu_preset_trains_a_few_steps_on_cpu_in_bfloat16(smoke_data, tmp_path):
  """The `gpu` preset's code path at a tiny size: bf16, per-replica batch, crops, whole frames
  that are not a multiple of the stride (padded, never resized), calibration and export."""
  model_dir = tmp_path / 'model'
  proc = run_module('trainer.task', '--config', 'gpu', '--data_dir', smoke_data, '--model_dir',
                    model_dir, '--mixed_precision', 'mixed_bfloat16', '--epochs', '1',
                    '--steps_per_epoch', '2', '--image_size', '40x56', '--params_override',
                    'data.crop_size=[32,48],model.base_filters=4,data.batch_size_per_replica=4')
  assert proc.returncode == 0, proc.stderr[-3000:]
  config = json.loads((model_dir / 'config.json').read_text())
  assert config['resolved_precision'] == 'mixed_bfloat16'
  assert config['data']['batch_size'] == 4 and config['data']['image_size'] == [40, 56]
  assert config['model']['depth'] == 4 and config['eval']['flip'] is True
  assert math.isfinite(float(_history(model_dir)[0]['train_loss']))
  labels = json.loads((model_dir / 'export' / 'labels.json').read_text())
  assert labels['image_size'] == [40, 56] and labels['size_multiple'] == 16
  serve = tf.saved_model.load(str(model_dir / 'export' / 'serving')).signatures['serving_default']
  frame = tf.io.encode_png(tf.zeros([48, 64, 3], tf.uint8))
  assert serve(image_bytes=tf.reshape(frame, [1]))['class_ids'].shape == (1, 48, 64)


def test_standardized_run_predicts_alike_on_darkened_frames(darkened_data, tmp_path):
  """data.standardize reaches inference.json, validation, trainer.evaluate and the export: a
  frame and its 0.6 x + 13 copy (conftest.darkened_data) get the same class ids."""
  original, darkened = darkened_data
  model_dir = tmp_path / 'model'
  proc = run_module('trainer.task', *SMOKE, '--data_dir', original, '--model_dir', model_dir,
                    '--epochs', '1', '--params_override=data.standardize=true')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads((model_dir / 'inference.json').read_text())['standardize'] is True
  assert json.loads((model_dir / 'export' / 'labels.json').read_text())['standardize'] is True
  # The run's val metrics (the evaluation validation uses) reproduced on the darkened val split.
  proc = run_module('trainer.evaluate', '--model_dir', model_dir, '--data_dir', darkened,
                    '--split', 'val', '--output', tmp_path / 'darkened.json')
  assert proc.returncode == 0, proc.stderr[-3000:]
  metrics = json.loads((model_dir / 'metrics.json').read_text())
  result = json.loads((tmp_path / 'darkened.json').read_text())
  assert result['confusion_matrix'] == metrics['confusion_matrix']
  serve = tf.saved_model.load(str(model_dir / 'export' / 'serving')).signatures['serving_default']
  frames = sorted((original.parent / 'raw' / 'val').glob('*.png'))
  predict = lambda paths: serve(image_bytes=tf.constant(
      [p.read_bytes() for p in paths]))['class_ids'].numpy()
  ids = predict(frames)
  assert len(np.unique(ids)) > 1, 'degenerate test: one class everywhere'
  np.testing.assert_array_equal(
      predict([darkened.parent / 'raw' / 'val' / p.name for p in frames]), ids)
