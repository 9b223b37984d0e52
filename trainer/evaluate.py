"""`python -m trainer.evaluate`: a report JSON for one split of a data dir, from a trained model_dir.

    python -m trainer.evaluate --model_dir M --data_dir D --split S [--output F]
        [--logit_adjustment A] [--calibration_split S2] [--eval_scales S1,S2,...]

Evaluates the best checkpoint (the latest backup if there is no best yet) with the run's own
config (model_dir/config.json) and inference spec (model_dir/inference.json: classes, test-time
flips and scales, the calibrated decision bias; trainer/inference.py) through the trainer's
evaluation code, exactly as the exported model predicts. Only frames and labels are read from
--data_dir, so a data dir holding just a test split works. Metrics at label resolution,
void excluded, classes absent from labels and predictions left out of the means. Writes
{"split", "num_examples", "pixel_accuracy", "mean_iou", "per_class": {name: {"iou",
"precision", "recall", "f1", "support"}}, "confusion_matrix"} (plus loss and macro means) to
--output, or prints it. `--logit_adjustment` scores the same checkpoint with another strength of
the prediction-time logit adjustment than the run's (trainer/configs/base.py), e.g. to choose it
on the train split; the report records the value used. `--eval_scales` likewise replaces the
run's test-time scales (config eval.scales); pair it with `--calibration_split`, since a
calibration fitted under other scales no longer fits.

A run trained with `eval.calibration_split` predicts with the per-class decision biases it
fitted (model_dir/calibration.json records the fit, trainer/calibration.py), unless
`--logit_adjustment` asks for the plain adjustment. `--calibration_split` fits such biases
afresh on another split of the data dir (starting from the run's logit adjustment), e.g. for a
run trained without it; nothing is written to model_dir. The report's "calibration" says which
biases were used.
"""

import json
import sys

from camvid_common import quiet

quiet.start()  # Before anything imports TensorFlow: hides its load-time C++ log.

from absl import flags  # pylint: disable=g-import-not-at-top

from camvid_common.errors import ConfigError
from camvid_common.errors import run_app

_MODEL_DIR = flags.DEFINE_string('model_dir', None, 'A trainer model_dir (local or gs://).')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'A tfrecords_builder output dir.')
_SPLIT = flags.DEFINE_string('split', 'val', 'Split to evaluate (train, val or test).')
_OUTPUT = flags.DEFINE_string('output', None, 'Where to write the JSON report (default: stdout).')
_LOGIT_ADJUSTMENT = flags.DEFINE_float(
    'logit_adjustment', None, 'Override the run\'s eval.logit_adjustment (0 = plain argmax of '
    'the class-weighted model; 1 = the whole log(class weight) shift removed); ignores the run\'s '
    'calibration.json.')
_CALIBRATION_SPLIT = flags.DEFINE_string(
    'calibration_split', None, 'Fit per-class decision biases on this split (e.g. train) before '
    'evaluating, instead of using the run\'s calibration.json; nothing is written.')

_EVAL_SCALES = flags.DEFINE_list(
    'eval_scales', None, 'Override the run\'s test-time scales, e.g. 0.75,1 (config '
    'eval_scales).')
quiet.define_absl_flag()


def read_spec(model_dir: str):
  """model_dir's inference spec: inference.json, else (older runs) export/labels.json."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from trainer import export as export_lib, inference  # pylint: disable=g-import-not-at-top
  for path in (f'{model_dir}/{inference.INFERENCE_NAME}',
               f'{model_dir}/export/{export_lib.LABELS_NAME}'):
    if tf.io.gfile.exists(path):
      try:
        return inference.read(path)
      except ValueError as e:
        raise ConfigError(str(e)) from None
  raise ConfigError(f'{model_dir}/{inference.INFERENCE_NAME}: not found (nor an export); is '
                    f'{model_dir} a trainer model_dir? Rerun its training command to write it')


def evaluate_model_dir(model_dir: str, data_dir: str, split: str,
                       logit_adjustment: float | None = None,
                       calibration_split: str | None = None,
                       eval_scales: tuple[float, ...] | None = None) -> dict:
  """Restores the best checkpoint of `model_dir` and evaluates `split` of `data_dir`.

  Predicts as the run's inference spec says (model_dir/inference.json: the calibrated bias,
  flips, scales); only frames and labels are read from `data_dir`. `logit_adjustment`, if
  given, replaces the spec's bias by that strength of the logit adjustment;
  `calibration_split`, if given, fits new per-class biases on that split of `data_dir` first
  (from the run's logit adjustment); `eval_scales`, if given, replaces the test-time scales.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tfrecords_builder import manifest as manifest_lib  # pylint: disable=g-import-not-at-top
  # pylint: disable=g-import-not-at-top
  from trainer import calibration, distribution, losses, posttrain, train
  from trainer import data
  model_dir = model_dir.rstrip('/')
  config = train.load_config(model_dir)
  spec = read_spec(model_dir)
  if eval_scales is not None:
    config = _with_scales(config, eval_scales)
    spec = spec.replace(scales=config.eval.scales)
  manifest = manifest_lib.read(data_dir.rstrip('/'))
  manifest.split(split)
  if calibration_split:
    manifest.split(calibration_split)
  data.check_shards(manifest, (split,) + ((calibration_split,) if calibration_split else ()))
  if tuple(manifest.class_names) != spec.class_names:
    raise ConfigError(f'{data_dir}: classes {", ".join(manifest.class_names)} differ from the '
                      f'model\'s ({", ".join(spec.class_names)})')
  checkpoint = (tf.train.latest_checkpoint(f'{model_dir}/best') or
                tf.train.latest_checkpoint(f'{model_dir}/checkpoints'))
  if not checkpoint:
    raise ConfigError(f'{model_dir}: no checkpoint yet (best/ or checkpoints/); train first')
  if (logit_adjustment or calibration_split) and spec.class_weights is None and (
      config.loss.class_weighting != 'none'):
    raise ConfigError(f'{model_dir}: its inference spec predates recorded class weights; '
                      '--logit_adjustment and --calibration_split need them')
  adjusted = lambda strength: losses.logit_adjustment_bias(spec.class_weights, strength)
  calibrated = tf.io.gfile.exists(f'{model_dir}/{calibration.CALIBRATION_NAME}')
  used = ({'source': calibration.CALIBRATION_NAME, 'bias': list(spec.bias)}
          if calibrated and spec.bias is not None else None)
  if logit_adjustment is not None:
    spec, used = spec.replace(bias=_tuple(adjusted(logit_adjustment))), None
  kind = 'mirrored' if len(tf.config.list_physical_devices('GPU')) > 1 else 'default'
  runtime = distribution.create_runtime(kind, config.runtime.mixed_precision)
  with runtime.strategy.scope():
    model = posttrain.restore_model(config, spec, checkpoint)
  if calibration_split:
    start = spec.replace(bias=_tuple(adjusted(config.eval.logit_adjustment)))
    record = calibration.calibrate(model, manifest, calibration_split, config, start)
    spec = spec.replace(bias=tuple(record['bias']))
    used = {'source': f'fitted on {calibration_split}', 'bias': record['bias']}
  result = posttrain.evaluate_model(model, config, spec, manifest, split, runtime)
  result['checkpoint'] = checkpoint
  result['logit_adjustment'] = (config.eval.logit_adjustment if logit_adjustment is None
                                else logit_adjustment)
  result['calibration'] = used
  result['eval_scales'] = list(spec.scales)
  return result


def _tuple(values):
  return None if values is None else tuple(float(v) for v in values)


def _with_scales(config, eval_scales):
  from trainer import configs  # pylint: disable=g-import-not-at-top
  try:
    # Its errors already start with the source, '--eval_scales: '.
    config = configs.override(config, {'eval.scales': list(eval_scales)}, '--eval_scales')
  except ValueError as e:
    raise ConfigError(str(e)) from None
  try:
    configs.validate(config)
  except ValueError as e:
    raise ConfigError(f'--eval_scales: {e}') from None
  return config


def main(argv):
  del argv  # run_app rejects positional arguments.
  for flag in (_MODEL_DIR, _DATA_DIR):
    if not flag.value:
      raise ConfigError(f'--{flag.name} is required')
  from camvid_common import fileio  # pylint: disable=g-import-not-at-top
  for flag in (_MODEL_DIR, _DATA_DIR, _OUTPUT):
    fileio.check_bucket(flag.value, f'--{flag.name}')
  if _LOGIT_ADJUSTMENT.value is not None and not 0 <= _LOGIT_ADJUSTMENT.value <= 1:
    raise ConfigError(f'--logit_adjustment: {_LOGIT_ADJUSTMENT.value} is out of range [0, 1]')
  scales = None
  if _EVAL_SCALES.value is not None:
    try:
      scales = tuple(float(s) for s in _EVAL_SCALES.value)
    except ValueError:
      raise ConfigError(f'--eval_scales: {",".join(_EVAL_SCALES.value)!r} is not a comma-'
                        'separated list of numbers') from None
  from tfrecords_builder import manifest as manifest_lib  # pylint: disable=g-import-not-at-top
  from trainer import data  # pylint: disable=g-import-not-at-top
  splits = (_SPLIT.value,) + ((_CALIBRATION_SPLIT.value,) if _CALIBRATION_SPLIT.value else ())
  # A shard failing mid-read: one line naming it, exit 2 (see data.read_errors).
  with data.read_errors(manifest_lib.read(_DATA_DIR.value.rstrip('/')), splits, 'evaluating'):
    result = evaluate_model_dir(_MODEL_DIR.value, _DATA_DIR.value, _SPLIT.value,
                                _LOGIT_ADJUSTMENT.value, _CALIBRATION_SPLIT.value, scales)
  text = json.dumps(result, indent=2) + '\n'
  if _OUTPUT.value:
    from camvid_common.fileio import write_atomic  # pylint: disable=g-import-not-at-top
    write_atomic(_OUTPUT.value, text)
    print(f'{_SPLIT.value}: {result["num_examples"]} examples, mIoU {result["mean_iou"]:.4f}, '
          f'pixel accuracy {result["pixel_accuracy"]:.4f} -> {_OUTPUT.value}')
  else:
    sys.stdout.write(text)
  return 0


def run():
  """Console-script entry: user mistakes become one line on stderr and exit code 2."""
  run_app(main, quiet_tensorflow=True)


if __name__ == '__main__':
  run()
