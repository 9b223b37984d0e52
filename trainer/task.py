"""`python -m trainer.task`: the trainer's flags -> a resolved config -> train.run(); nothing else.

With no flags at all it runs the main job on an embedded default: generates CamVid-like scenes,
builds TFRecords, trains the `demo` preset and evaluates, printing where everything went.

Exit codes: 0 done; 2 configuration or data error (do not retry); 75 preempted by SIGTERM after
saving a backup (rerun the same command to continue).
"""

import json
import os

from camvid_common import quiet

quiet.start()  # Before anything imports TensorFlow: hides its load-time C++ log.

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
_HPARAMS_FILE = flags.DEFINE_string('hparams_file', None, 'JSON object of config overrides (flat '
                                    'names such as the tuner\'s best_hparams.json, dotted or '
                                    'nested keys); --params_override and flags win over it.')
_PARAMS_OVERRIDE = flags.DEFINE_multi_string(
    'params_override', None, 'Config overrides by dotted key: comma-separated key=value pairs '
    '(YAML values), e.g. model.base_filters=32,optimizer.learning_rate=3e-4,eval.scales=[0.75,1], '
    'or a .yaml/.yml/.json file of nested or dotted keys; may be repeated (applied in order, '
    'later wins). Applied after --hparams_file, before the shorthand flags.')
_STRATEGY = flags.DEFINE_enum('strategy', None, list(configs.choices('runtime.strategy')),
                              'runtime.strategy (default auto: TF_CONFIG -> multi_worker, '
                              'several GPUs -> mirrored, else default).')
_MIXED_PRECISION = flags.DEFINE_enum(
    'mixed_precision', None, list(configs.choices('runtime.mixed_precision')),
    'runtime.mixed_precision; auto: bf16 on GPUs with compute capability >= 8, fp16 on older '
    'GPUs, fp32 on CPU.')
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
quiet.define_absl_flag()


# The shorthand flags and the config fields they set.
SHORTHANDS = {
    'epochs': 'trainer.epochs', 'batch_size': 'data.batch_size',
    'learning_rate': 'optimizer.learning_rate', 'dropout': 'model.dropout',
    'image_size': 'data.image_size', 'seed': 'seed', 'steps_per_epoch': 'steps_per_epoch',
    'strategy': 'runtime.strategy', 'mixed_precision': 'runtime.mixed_precision',
    'profile_steps': 'trainer.profile_steps',
}


def resolve_config(preset: str) -> configs.Config:
  """Preset, then --hparams_file, then --params_override, then the shorthand flags."""
  try:
    config = configs.get_config(preset)
    if _HPARAMS_FILE.value:
      config = configs.override(config, _read_hparams(_HPARAMS_FILE.value),
                                f'--hparams_file {_HPARAMS_FILE.value}')
    for value in _PARAMS_OVERRIDE.value or ():
      config = configs.override(config, _read_params_override(value), '--params_override')
    values = {name: flags.FLAGS[name].value for name in SHORTHANDS}
    values['image_size'] = values['profile_steps'] = None  # Strings, parsed here:
    if _IMAGE_SIZE.value:
      values['image_size'] = sizes.parse_hxw(_IMAGE_SIZE.value, '--image_size')
    if _PROFILE_STEPS.value:
      try:
        values['profile_steps'] = tuple(int(v) for v in _PROFILE_STEPS.value.split(','))
      except ValueError:
        raise errors.ConfigError(
            f'--profile_steps {_PROFILE_STEPS.value}: expected FIRST,LAST') from None
    overrides = {SHORTHANDS[name]: value for name, value in values.items() if value is not None}
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


def _read_params_override(value: str) -> dict:
  """--params_override's mapping: key=value pairs, or a .yaml/.yml/.json file's contents."""
  if not configs.is_params_file(value):
    return configs.parse_params_override(value, '--params_override')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from camvid_common import fileio  # pylint: disable=g-import-not-at-top
  fileio.check_bucket(value, '--params_override')
  try:
    with tf.io.gfile.GFile(value) as f:
      text = f.read()
  except tf.errors.NotFoundError:
    raise errors.ConfigError(f'--params_override {value}: not found') from None
  return configs.parse_params_file(text, f'--params_override {value}')


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
  # Vertex AI imports a model from the root of AIP_MODEL_DIR (when it is the model_dir).
  serving_root = model_dir if not _MODEL_DIR.value else None
  train.run(config, _DATA_DIR.value, model_dir, log=print,
            checkpoint_dir=vertex.get('checkpoint_dir'), log_dir=vertex.get('log_dir'),
            serving_root=serving_root)
  return 0


def run():
  """Console-script entry: one stderr line and a documented exit code for expected failures."""
  from trainer.loop import Preempted  # pylint: disable=g-import-not-at-top
  errors.run_app(main, handlers=[(Preempted, errors.EXIT_PREEMPTED,
                                  'preempted (rerun the same command to continue)')],
                 quiet_tensorflow=True)


if __name__ == '__main__':
  run()
