"""`python -m trainer.task`: the trainer's flags -> a resolved config -> train.run(); nothing else.

With no flags at all it runs the main job on an embedded default: generates CamVid-like scenes,
builds TFRecords, trains the `demo` preset and evaluates, printing where everything went.

Exit codes: 0 done; 2 configuration or data error (do not retry); 75 preempted by SIGTERM after
saving a backup (rerun the same command to continue).
"""

import json
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import flags  # pylint: disable=g-import-not-at-top

from camvid_common import errors
from camvid_common import sizes
from trainer import configs

_DATA_DIR = flags.DEFINE_string('data_dir', None, 'tfrecords_builder output dir (local or '
                                'gs://). Unset with no other flags: run the embedded demo.')
_MODEL_DIR = flags.DEFINE_string('model_dir', None, 'Checkpoints, logs, exports (local or gs://); '
                                 'default $AIP_MODEL_DIR. Rerunning resumes from it.')
_CONFIG = flags.DEFINE_string('config', 'small', f'Preset: {", ".join(configs.PRESETS)}.')
_EPOCHS = flags.DEFINE_integer('epochs', None, 'Override the preset\'s epochs.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', None, 'Global batch size (all replicas).')
_LEARNING_RATE = flags.DEFINE_float('learning_rate', None, 'Peak learning rate.')
_DROPOUT = flags.DEFINE_float('dropout', None, 'Dropout rate.')
_IMAGE_SIZE = flags.DEFINE_string('image_size', None, 'Model input HxW, e.g. 256x256.')
_SEED = flags.DEFINE_integer('seed', None, 'Seed for shuffling, augmentation and init.')
_STEPS_PER_EPOCH = flags.DEFINE_integer('steps_per_epoch', None,
                                        'Fixed steps per epoch (default: one pass over train).')
_HPARAMS_FILE = flags.DEFINE_string('hparams_file', None, 'JSON object of config overrides, e.g. '
                                    'the tuner\'s best_hparams.json; flags win over it.')
_STRATEGY = flags.DEFINE_enum('strategy', None, ['auto', 'default', 'mirrored', 'multi_worker'],
                              'Distribution strategy (default auto: TF_CONFIG -> multi_worker, '
                              'several GPUs -> mirrored, else default).')
_MIXED_PRECISION = flags.DEFINE_enum(
    'mixed_precision', None, ['auto', 'float32', 'mixed_float16', 'mixed_bfloat16'],
    'auto: bf16 on GPUs with compute capability >= 8, fp16 on older GPUs, fp32 on CPU.')
_PROFILE_STEPS = flags.DEFINE_string('profile_steps', None, 'FIRST,LAST global steps to trace '
                                     'with the TensorBoard profiler (model_dir/logs/profile).')
_SUMMARY_ONLY = flags.DEFINE_bool('summary_only', False,
                                  'Print the model summary and exit without training.')
_NUM_CLASSES = flags.DEFINE_integer('num_classes', None, 'Classes for --summary_only without '
                                    '--data_dir.')
_LOGICAL_CPUS = flags.DEFINE_integer('logical_cpu_devices', 0, 'Split the CPU into N logical '
                                     'devices (exercises multi-replica code on CPU).')
_DEMO_DIR = flags.DEFINE_string('demo_dir', '/tmp/camvid-seg-demo', 'Where the no-flags demo '
                                'writes its scenes, TFRecords and model.')


def resolve_config(preset: str) -> configs.Config:
  """Preset, then --hparams_file, then explicit flags."""
  try:
    config = configs.get_config(preset)
    if _HPARAMS_FILE.value:
      config = configs.override(config, _read_hparams(_HPARAMS_FILE.value),
                                f'--hparams_file {_HPARAMS_FILE.value}')
    overrides = {name: flag.value for name, flag in (
        ('epochs', _EPOCHS), ('batch_size', _BATCH_SIZE), ('learning_rate', _LEARNING_RATE),
        ('dropout', _DROPOUT), ('seed', _SEED), ('steps_per_epoch', _STEPS_PER_EPOCH),
        ('strategy', _STRATEGY), ('mixed_precision', _MIXED_PRECISION)) if flag.value is not None}
    if _IMAGE_SIZE.value:
      overrides['image_size'] = sizes.parse_hxw(_IMAGE_SIZE.value, '--image_size')
    if _PROFILE_STEPS.value:
      try:
        overrides['profile_steps'] = tuple(int(v) for v in _PROFILE_STEPS.value.split(','))
      except ValueError:
        raise errors.ConfigError(
            f'--profile_steps {_PROFILE_STEPS.value}: expected FIRST,LAST') from None
    config = configs.override(config, overrides, 'flags')
    configs.validate(config)
  except ValueError as e:
    raise errors.ConfigError(str(e)) from None
  return config


def _read_hparams(path: str) -> dict:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from camvid_common import fileio  # pylint: disable=g-import-not-at-top
  fileio.check_bucket(path, '--hparams_file')
  try:
    with tf.io.gfile.GFile(path) as f:
      values = json.load(f)
  except tf.errors.NotFoundError:
    raise errors.ConfigError(f'--hparams_file {path}: not found') from None
  except json.JSONDecodeError as e:
    raise errors.ConfigError(f'--hparams_file {path}: not valid JSON ({e})') from None
  if not isinstance(values, dict):
    raise errors.ConfigError(f'--hparams_file {path}: expected a JSON object of config overrides')
  return values


def summary_only(config: configs.Config) -> None:
  from tfrecords_builder import manifest as manifest_lib  # pylint: disable=g-import-not-at-top
  from trainer import segmentation  # pylint: disable=g-import-not-at-top
  if _DATA_DIR.value:
    num_classes = manifest_lib.read(_DATA_DIR.value).num_classes
  elif _NUM_CLASSES.value:
    num_classes = _NUM_CLASSES.value
  else:
    raise errors.ConfigError('--summary_only: give --data_dir (classes from its manifest) or '
                             '--num_classes')
  segmentation.build_model(config, num_classes).summary()


def run_demo() -> None:
  """The embedded default: scenes -> TFRecords -> train -> evaluate, all under --demo_dir."""
  from tfrecords_builder import synthetic, writer  # pylint: disable=g-import-not-at-top
  from trainer import train  # pylint: disable=g-import-not-at-top
  root = _DEMO_DIR.value.rstrip('/')
  raw, records, model_dir = f'{root}/scenes', f'{root}/tfrecords', f'{root}/model'
  if not os.path.exists(f'{raw}/class_dict.csv'):
    print(f'generating CamVid-like scenes in {raw}')
    synthetic.generate(raw, 'kaggle', {'train': 64, 'val': 16}, (256, 192), seed=0)
  writer.build(raw, records, num_workers=None)
  result = train.run(resolve_config('demo'), records, model_dir, log=print)
  print(f'\nscenes:      {raw}\ntfrecords:   {records}\nmodel_dir:   {model_dir}\n'
        f'metrics:     {model_dir}/metrics.json (val mIoU {result["mean_iou"]:.3f}, '
        f'pixel accuracy {result["pixel_accuracy"]:.3f})\nexport:      {model_dir}/export\n'
        f'tensorboard: tensorboard --logdir {model_dir}/logs')


def main(argv):
  del argv  # run_app rejects positional arguments.
  if _LOGICAL_CPUS.value:
    from trainer import distribution  # pylint: disable=g-import-not-at-top
    distribution.configure_logical_cpus(_LOGICAL_CPUS.value)
  explicit = [name for name in flags.FLAGS if flags.FLAGS[name].present and name != 'demo_dir']
  if not explicit:
    run_demo()
    return 0
  config = resolve_config(_CONFIG.value)
  if _SUMMARY_ONLY.value:
    summary_only(config)
    return 0
  from trainer import distribution, train  # pylint: disable=g-import-not-at-top
  vertex = distribution.vertex_ai_dirs()
  model_dir = _MODEL_DIR.value or vertex.get('model_dir')
  if not _DATA_DIR.value:
    raise errors.ConfigError('--data_dir is required (a tfrecords_builder output dir)')
  if not model_dir:
    raise errors.ConfigError('--model_dir is required (or set AIP_MODEL_DIR)')
  train.run(config, _DATA_DIR.value, model_dir, log=print,
            checkpoint_dir=vertex.get('checkpoint_dir'), log_dir=vertex.get('log_dir'))
  return 0


def run():
  """Console-script entry: one stderr line and a documented exit code for expected failures."""
  from trainer.loop import Preempted  # pylint: disable=g-import-not-at-top
  errors.run_app(main, handlers=[(Preempted, errors.EXIT_PREEMPTED,
                                  'preempted (rerun the same command to continue)')],
                 quiet_tensorflow=True)


if __name__ == '__main__':
  run()
