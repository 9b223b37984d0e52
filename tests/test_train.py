"""Tests of the trainer's distributed step functions (trainer/train.py make_steps) on one device."""

import json
import re

import numpy as np
import pytest
import tensorflow as tf

from trainer import averaging, configs, losses, segmentation, train
from trainer import history as history_lib
from trainer import model as model_lib
from camvid_common.errors import ConfigError

NUM_CLASSES = 4
NAMES = [f'class{i}' for i in range(NUM_CLASSES)]


@pytest.mark.parametrize('strength', [0.0, 1.0])
def test_evaluation_scores_the_logit_adjusted_argmax(strength):
  """Val metrics count argmax(logits - strength * log(w)), the prediction the export serves."""
  config = configs.get_config('smoke').replace(**{
      'data.image_size': (16, 16), 'eval.logit_adjustment': strength})
  tf.keras.utils.set_random_seed(1)
  model = segmentation.build_model(config, NUM_CLASSES)
  rng = np.random.default_rng(0)
  batch = {'image': rng.random((2, 16, 16, 3), dtype=np.float32),
           'mask': rng.integers(0, NUM_CLASSES, (2, 16, 16)).astype(np.int32),
           'valid': np.ones([2], bool)}
  weights = np.array([8.0, 1.0, 0.5, 2.0], np.float32)
  steps = segmentation.make_steps(model, None, tf.distribute.get_strategy(), config,
                           segmentation.inference_spec(config, NAMES, weights))
  _, _, cm, count = steps.evaluate(iter(tf.data.Dataset.from_tensors(batch)), tf.constant(1))
  assert int(count) == 2

  logits = model(batch['image'], training=False).numpy()
  bias = losses.logit_adjustment_bias(weights, strength)
  predicted = np.argmax(logits + (0 if bias is None else bias), -1)
  expected = np.zeros([NUM_CLASSES] * 2, np.int64)
  np.add.at(expected, (batch['mask'].reshape(-1), predicted.reshape(-1)), 1)
  np.testing.assert_array_equal(cm.numpy(), expected)
  # Test of the test: with the adjustment on, the weighting's shift must have mattered.
  if strength:
    assert np.any(predicted != np.argmax(logits, -1))


def test_training_model_fuses_batchnorm_on_one_replica(tmp_path):
  """Training builds use the fused kernel (same variables), evaluation and export Keras BN.

  With the stride-2 stem, whose layers both builds must hold.
  """
  config = configs.get_config('smoke').replace(**{
      'model.sync_batchnorm': True, 'model.stem_stride': 2})
  tf.keras.utils.set_random_seed(1)
  training = segmentation.build_model(config, NUM_CLASSES, training=True)
  plain = segmentation.build_model(config, NUM_CLASSES)
  assert isinstance(training.get_layer('stem_bn1'), model_lib.FusedBatchNormalization)
  assert plain.get_layer('stem_conv1').filters == config.model.base_filters
  fused = [l for l in training.layers if isinstance(l, model_lib.FusedBatchNormalization)]
  assert fused and not any(isinstance(l, model_lib.FusedBatchNormalization)
                           for l in plain.layers)
  assert not all(np.array_equal(a, b) for a, b in zip(training.get_weights(), plain.get_weights()))
  # A checkpoint of the training model restores into the plain one.
  path = tf.train.Checkpoint(model=training).write(str(tmp_path / 'ckpt'))
  tf.train.Checkpoint(model=plain).read(path).assert_existing_objects_matched()
  for a, b in zip(training.weights, plain.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_weight_average_covers_batchnorm_statistics_and_swaps_exactly():
  """The average is the hand-computed EMA (with its warm-up) of every weight, BN stats too."""
  model = tf.keras.Sequential([tf.keras.Input((3,)), tf.keras.layers.Dense(2),
                               tf.keras.layers.BatchNormalization()])
  average = averaging.WeightAverage(model, momentum=0.5)
  expected = [w.numpy() for w in model.weights]
  assert len(expected) == 6  # Kernel, bias, gamma, beta, moving mean and variance.
  rng = np.random.default_rng(0)
  for step in range(1, 4):
    for w in model.weights:
      w.assign(rng.normal(size=w.shape).astype(np.float32))
    average.update(tf.constant(step))
    keep = min(0.5, (1 + step) / (10 + step))  # 2/11, 3/12, then 0.5.
    expected = [keep * e + (1 - keep) * w.numpy() for e, w in zip(expected, model.weights)]
  raw = [w.numpy() for w in model.weights]
  with average.swapped():
    for w, e in zip(model.weights, expected):
      np.testing.assert_allclose(w.numpy(), e, rtol=1e-6)
  for w, r in zip(model.weights, raw):
    np.testing.assert_array_equal(w.numpy(), r)  # A true swap: back bit for bit.
  with average.swapped(enabled=False):
    for w, r in zip(model.weights, raw):
      np.testing.assert_array_equal(w.numpy(), r)


def test_ema_run_validates_and_keeps_the_averaged_weights(smoke_data, tmp_path):
  """best/ (and so metrics.json and the export) holds the average, the backup both.

  The run also trains deep-supervision heads, which the backup holds and best/ does not.
  """
  from tfrecords_builder import manifest as manifest_lib  # pylint: disable=g-import-not-at-top
  config = configs.get_config('smoke').replace(**{
      'optimizer.ema_momentum': 0.9, 'trainer.epochs': 2, 'eval.every_epochs': 2,
      'loss.aux_loss_weight': 0.4})
  result = train.run(config, str(smoke_data), str(tmp_path), export=False, log=lambda *_: None)
  num_classes = manifest_lib.read(str(smoke_data)).num_classes
  model = segmentation.build_model(config, num_classes, training=True)
  train_model = model_lib.with_auxiliary_heads(model, num_classes, config.model.depth)
  optimizer = segmentation.make_optimizer(config, total_steps=12, steps_per_epoch=6)
  optimizer.build(train_model.trainable_variables)
  average = averaging.WeightAverage(model, config.optimizer.ema_momentum)
  tf.train.Checkpoint(model=model, optimizer=optimizer, train_model=train_model,
                      weight_average=average.variables).read(
      tf.train.latest_checkpoint(str(tmp_path / 'checkpoints'))).assert_existing_objects_matched()
  best = segmentation.build_model(config, num_classes)
  tf.train.Checkpoint(model=best).read(result['checkpoint']).assert_existing_objects_matched()
  assert not any('aux' in layer.name for layer in best.layers)
  for a, b in zip(average.variables, best.weights):  # BatchNorm statistics included.
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  assert not all(np.array_equal(w.numpy(), b.numpy()) for w, b in zip(model.weights, best.weights))


def test_validating_after_the_last_epoch_only_keeps_the_final_weights(smoke_data, tmp_path):
  """eval.every_epochs 0: one validation, after the last epoch; best/ is the final weights.

  Early stopping waits for a validation: before it there is no best to stop at.
  """
  config = configs.get_config('smoke').replace(**{
      'trainer.epochs': 3, 'eval.every_epochs': 0, 'trainer.early_stopping_patience': 1})
  result = train.run(config, str(smoke_data), str(tmp_path), export=False, log=lambda *_: None)
  rows = history_lib.read(str(tmp_path / history_lib.HISTORY_NAME))
  assert [r['epoch'] for r in rows] == ['0', '1', '2']
  assert [bool(r['val_mean_iou']) for r in rows] == [False, False, True]
  last_backup = tf.train.latest_checkpoint(str(tmp_path / 'checkpoints'))
  assert result['checkpoint'].rsplit('-', 1)[1] == last_backup.rsplit('-', 1)[1]


def test_deep_supervision_adds_the_weighted_head_losses():
  """The train loss is the main cross-entropy plus aux_loss_weight times the heads' mean.

  Each head's cross-entropy is its mean over its own positions against the subsampled mask,
  so a head counts as much as the main output whatever its resolution.
  """
  config = configs.get_config('smoke').replace(**{
      'data.image_size': (16, 16), 'loss.aux_loss_weight': 0.4, 'model.depth': 3,
      'optimizer.warmup_epochs': 0.0})
  tf.keras.utils.set_random_seed(2)
  model = segmentation.build_model(config, NUM_CLASSES, training=True)
  train_model = model_lib.with_auxiliary_heads(model, NUM_CLASSES, config.model.depth)
  assert [o.shape[1] for o in train_model.outputs] == [16, 4, 8]  # Main, dec1, dec2.
  optimizer = segmentation.make_optimizer(config, total_steps=10, steps_per_epoch=5)
  optimizer.build(train_model.trainable_variables)
  rng = np.random.default_rng(0)
  batch = {'image': rng.random((2, 16, 16, 3), dtype=np.float32),
           'mask': rng.integers(0, NUM_CLASSES, (2, 16, 16)).astype(np.int32)}

  def cross_entropy(logits):
    # Each head against the mask subsampled nearest to its size: the pixel at offset
    # stride // 2 of every stride x stride block (dec1: rows 2, 6, 10, 14).
    logits = logits.numpy().astype(np.float64)
    stride = 16 // logits.shape[1]
    mask = batch['mask'][:, stride // 2::stride, stride // 2::stride]
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -np.take_along_axis(log_p, mask[..., None], -1).mean()

  main, *heads = train_model(batch['image'], training=True)
  expected = cross_entropy(main) + 0.4 * np.mean([cross_entropy(h) for h in heads])
  head = train_model.get_layer('aux1_logits').kernel.numpy()
  steps = segmentation.make_steps(model, optimizer, tf.distribute.get_strategy(), config,
                           segmentation.inference_spec(config, NAMES), train_model=train_model)
  loss_sum, weight_sum, _, plain_sum, pixels = steps.train(
      iter(tf.data.Dataset.from_tensors(batch).repeat()), tf.constant(1))
  np.testing.assert_allclose(float(loss_sum / weight_sum), expected, rtol=1e-4)
  # The reported loss is the main head's alone, as validation defines it.
  assert int(pixels) == batch['mask'].size
  np.testing.assert_allclose(float(plain_sum / pixels), cross_entropy(main), rtol=1e-4)
  assert not np.array_equal(head, train_model.get_layer('aux1_logits').kernel.numpy())


def test_train_and_eval_report_the_plain_cross_entropy_beside_the_weighted_objective():
  """Train and eval steps report the unweighted cross-entropy over non-void pixels; training's
  objective (its first two outputs) is the class-weighted one the optimizer minimises."""
  config = configs.get_config('smoke').replace(**{'data.image_size': (16, 16)})
  tf.keras.utils.set_random_seed(3)
  model = segmentation.build_model(config, NUM_CLASSES)
  rng = np.random.default_rng(1)
  mask = rng.integers(0, NUM_CLASSES, (2, 16, 16)).astype(np.int32)
  mask[0, :4] = 255  # Void rows count nowhere.
  batch = {'image': rng.random((2, 16, 16, 3), dtype=np.float32), 'mask': mask,
           'valid': np.ones([2], bool)}
  weights = np.array([8.0, 1.0, 0.5, 2.0], np.float32)
  logits = model(batch['image'], training=False).numpy().astype(np.float64)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  labelled = mask != 255
  ce = -np.take_along_axis(log_p, np.where(labelled, mask, 0)[..., None], -1)[..., 0][labelled]
  w = weights[mask[labelled]]
  spec = segmentation.inference_spec(config, NAMES, weights)
  steps = segmentation.make_steps(model, None, tf.distribute.get_strategy(), config, spec)
  loss_sum, pixels, _, _ = steps.evaluate(iter(tf.data.Dataset.from_tensors(batch)),
                                          tf.constant(1))
  assert int(pixels) == labelled.sum()
  np.testing.assert_allclose(float(loss_sum / pixels), ce.mean(), rtol=1e-4)

  # The step's losses are of the weights before its update; BatchNorm sees batch statistics.
  optimizer = segmentation.make_optimizer(config, total_steps=10, steps_per_epoch=5)
  logits = model(batch['image'], training=True).numpy().astype(np.float64)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = -np.take_along_axis(log_p, np.where(labelled, mask, 0)[..., None], -1)[..., 0][labelled]
  steps = segmentation.make_steps(model, optimizer, tf.distribute.get_strategy(), config, spec)
  objective, weight, _, plain, pixels = steps.train(iter(tf.data.Dataset.from_tensors(batch)),
                                                    tf.constant(1))
  assert int(pixels) == labelled.sum() and float(weight) == pytest.approx(w.sum())
  np.testing.assert_allclose(float(plain / pixels), ce.mean(), rtol=1e-4)
  np.testing.assert_allclose(float(objective / weight), (w * ce).sum() / w.sum(), rtol=1e-4)
  assert abs(float(objective / weight) - float(plain / pixels)) > 1e-3  # The test can tell.


def test_jit_compiled_step_trains_like_the_plain_one():
  """`jit_compile` compiles the replica's step (the loop reads the iterator, which XLA cannot).

  With deep supervision, whose head losses subsample the mask by strides XLA must resolve.
  """
  rng = np.random.default_rng(0)
  batch = {'image': rng.random((2, 16, 16, 3), dtype=np.float32),
           'mask': rng.integers(0, NUM_CLASSES, (2, 16, 16)).astype(np.int32)}
  results = []
  for jit in (False, True):
    config = configs.get_config('smoke').replace(**{
        'data.image_size': (16, 16), 'loss.aux_loss_weight': 0.4, 'model.depth': 2,
        'optimizer.warmup_epochs': 0.0, 'runtime.jit_compile': jit})
    tf.keras.utils.set_random_seed(5)
    model, train_model, optimizer, average = segmentation.build_trainables(
        config, NUM_CLASSES, total_steps=10, steps_per_epoch=5)
    assert train_model is not None and average is None  # aux_loss_weight on, ema_momentum off.
    steps = segmentation.make_steps(model, optimizer, tf.distribute.get_strategy(), config,
                             segmentation.inference_spec(config, NAMES), train_model=train_model)
    iterator = iter(tf.data.Dataset.from_tensors(batch).repeat())
    first = steps.train(iterator, tf.constant(1))
    second = steps.train(iterator, tf.constant(1))  # After one update: the update ran too.
    results.append([float(first[0] / first[1]), float(second[0] / second[1])])
  np.testing.assert_allclose(results[1], results[0], rtol=1e-4)
  assert results[0][1] < results[0][0]


def test_load_config_ignores_removed_options_left_off_and_refuses_used_ones(tmp_path):
  """An old config.json may hold removed fields: at their old default the run is today's model.

  Removed options only ever appeared in the flat config.json of runs from before the config
  was grouped; one of them, `loss`, shares its key with today's `loss` group.
  """
  recorded = configs.to_flat(configs.get_config('smoke'))
  (tmp_path / 'config.json').write_text(json.dumps(
      recorded | configs.REMOVED_OPTIONS | {'num_replicas': 1}))
  assert train.load_config(str(tmp_path)) == configs.get_config('smoke')
  for name, value in (('residual', True), ('loss', 'focal'), ('bottleneck_filters', 512)):
    (tmp_path / 'config.json').write_text(json.dumps(recorded | {name: value}))
    message = f'{tmp_path}/config.json: the run used {name} {json.dumps(value)}, removed from'
    with pytest.raises(ConfigError, match='^' + re.escape(message)):
      train.load_config(str(tmp_path))


# An old flat config.json as train.run wrote it before the config was grouped (smoke preset,
# plus the run facts), written out by hand: it must keep loading and resuming.
OLD_FLAT_SMOKE = {
    'base_filters': 4, 'depth': 2, 'dropout': 0.0, 'stem_stride': 1, 'sync_batchnorm': True,
    'bn_momentum': 0.9, 'image_size': [32, 32], 'crop_size': None, 'batch_size': 4,
    'scale_min': 0.75, 'scale_max': 1.5, 'hflip': True, 'brightness': 0.1, 'contrast': 0.1,
    'saturation': 0.1, 'shuffle_buffer': 64, 'cache_decoded_mb': 2048, 'epochs': 2,
    'steps_per_epoch': None, 'optimizer': 'adamw', 'learning_rate': 0.01, 'lr_scaling': 'none',
    'base_batch_size': 8, 'weight_decay': 0.0001, 'lr_schedule': 'cosine', 'warmup_epochs': 0.0,
    'clipnorm': None, 'ema_momentum': 0.0, 'class_weighting': 'none', 'max_class_weight': None,
    'aux_loss_weight': 0.0, 'logit_adjustment': 0.0, 'calibration_split': None,
    'early_stopping_patience': None, 'early_stopping_min_delta': 0.0, 'eval_flip': False,
    'eval_scales': [1.0], 'eval_batch_size': None, 'eval_every_epochs': 1, 'seed': 42,
    'mixed_precision': 'auto', 'strategy': 'auto', 'peer_timeout_seconds': 300,
    'jit_compile': False, 'steps_per_loop': 2, 'backup_every_steps': 4, 'num_summary_images': 2,
    'profile_steps': None, 'resolved_precision': 'float32', 'strategy_used': 'default',
    'num_replicas': 1, 'num_workers': 1, 'data_dir': '/data', 'loss': 'ce', 'residual': False,
}


def test_old_flat_config_json_loads_as_the_nested_one_and_resumes(tmp_path):
  smoke = configs.get_config('smoke')
  old, new = tmp_path / 'old', tmp_path / 'new'
  old.mkdir()
  new.mkdir()
  (old / 'config.json').write_text(json.dumps(OLD_FLAT_SMOKE))
  facts = {k: OLD_FLAT_SMOKE[k] for k in train.RUN_FACTS}
  (new / 'config.json').write_text(json.dumps(smoke.to_dict() | facts))
  assert set(json.loads((new / 'config.json').read_text())) == (
      set(configs.GROUPS) | {'seed', 'steps_per_epoch'} | set(train.RUN_FACTS))
  assert train.load_config(str(old)) == train.load_config(str(new)) == smoke
  for model_dir in (old, new):
    # Resumable changes pass; the others are named by dotted path.
    train.check_resumable(str(model_dir), smoke.replace(**{
        'trainer.epochs': 5, 'eval.flip': True, 'runtime.strategy': 'default',
        'eval.scales': (0.75, 1.0)}))
    changed = smoke.replace(**{'data.image_size': (64, 64), 'optimizer.learning_rate': 0.5})
    message = (f'{model_dir}/config.json: the checkpoint to resume was trained with other '
               'settings (data.image_size 32x32 -> 64x64, optimizer.learning_rate 0.01 -> 0.5); '
               'rerun with the same settings to resume it, or use a new --model_dir')
    with pytest.raises(ConfigError, match='^' + re.escape(message) + '$'):
      train.check_resumable(str(model_dir), changed)


def test_load_config_refuses_a_misspelt_key_by_name(tmp_path):
  values = configs.get_config('smoke').to_dict()
  values['model']['base_filterz'] = values['model'].pop('base_filters')
  (tmp_path / 'config.json').write_text(json.dumps(values))
  with pytest.raises(ConfigError, match=re.escape(
      f'{tmp_path}/config.json: unknown key model.base_filterz (known in model: base_filters, ')):
    train.load_config(str(tmp_path))
