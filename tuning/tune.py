"""`python -m tuning.tune`: searches dropout and learning rate for a trainer preset.

    python -m tuning.tune --data_dir D --output_dir O --config PRESET --max_trials N --epochs E
        [--tuner hyperband|bayesian|random] [--dropout_min A --dropout_max B]
        [--lr_min A --lr_max B] [--early_stopping_patience P] [--seed S] [--overwrite]

Rerunning the same command continues the search (finished trials are not rerun, an interrupted
trial resumes from its checkpoints); --overwrite starts over. Results: O/best_hparams.json (for
`python -m trainer.task --hparams_file`), O/trials.json, and TensorBoard in O/tensorboard.

Scale-out is KerasTuner's distributed mode, configured by the environment alone: the same command
on a chief (KERASTUNER_TUNER_ID=chief) and on N workers (KERASTUNER_TUNER_ID=tuner0, tuner1, ...),
all with KERASTUNER_ORACLE_IP/KERASTUNER_ORACLE_PORT naming the chief's gRPC address.

Exit codes: 0 done; 2 bad flags, config, environment or data (do not retry); 75 preempted by
SIGTERM after the running trial saved a backup (rerun to continue); 1 anything else.
"""

import logging
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging as absl_logging

from tfrecords_builder.errors import InputError
from trainer import configs
from trainer.errors import ConfigError, EXIT_CONFIG_ERROR, EXIT_PREEMPTED
from tuning import space

_DATA_DIR = flags.DEFINE_string('data_dir', None, 'tfrecords_builder output dir (local or gs://).')
_OUTPUT_DIR = flags.DEFINE_string('output_dir', None, 'Where the search keeps its state, trials '
                                  'and results (local or gs://). Rerunning resumes from it.')
_CONFIG = flags.DEFINE_string('config', 'small', f'Trainer preset every trial starts from: '
                              f'{", ".join(configs.PRESETS)}.')
_TUNER = flags.DEFINE_enum('tuner', 'hyperband', ['hyperband', 'bayesian', 'random'],
                           'Search algorithm (KerasTuner oracle).')
_MAX_TRIALS = flags.DEFINE_integer('max_trials', 10, 'Trials in the whole search (all workers).')
_EPOCHS = flags.DEFINE_integer('epochs', None, 'Epochs per trial; Hyperband: the largest budget '
                               '(max_epochs). Default: the preset\'s epochs.')
_DROPOUT_MIN = flags.DEFINE_float('dropout_min', 0.0, 'Dropout range, lower end.')
_DROPOUT_MAX = flags.DEFINE_float('dropout_max', 0.5, 'Dropout range, upper end (< 1).')
_LR_MIN = flags.DEFINE_float('lr_min', 1e-4, 'Learning rate range (log scale), lower end.')
_LR_MAX = flags.DEFINE_float('lr_max', 1e-2, 'Learning rate range (log scale), upper end.')
_PATIENCE = flags.DEFINE_integer('early_stopping_patience', None, 'Stop a trial after this many '
                                 'epochs without a better val mIoU (default: the preset\'s).')
_SEED = flags.DEFINE_integer('seed', 1, 'Seed of the search algorithm (>= 1).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Discard the search in --output_dir and start '
                               'over (ignored by distributed workers; the chief does it).')
_LOGICAL_CPUS = flags.DEFINE_integer('logical_cpu_devices', 0, 'Split the CPU into N logical '
                                     'devices (exercises MirroredStrategy trials on CPU).')


def _base_config() -> tuple[configs.Config, int]:
  """The preset (with --early_stopping_patience) and the epochs per trial; validated."""
  try:
    base = configs.get_config(_CONFIG.value)
    if _PATIENCE.value is not None:
      base = configs.override(base, {'early_stopping_patience': _PATIENCE.value}, 'flags')
  except ValueError as e:
    raise ConfigError(str(e)) from None
  epochs = _EPOCHS.value if _EPOCHS.value is not None else base.epochs
  if epochs < 1:
    raise ConfigError(f'--epochs {epochs}: must be >= 1')
  bounds = _bounds()
  # Every corner of the space must be a config the trainer accepts, before any trial starts.
  for dropout in (bounds.dropout_min, bounds.dropout_max):
    for lr in (bounds.lr_min, bounds.lr_max):
      space.trial_config(base, {'dropout': dropout, 'learning_rate': lr}, epochs)
  return base, epochs


def _bounds() -> space.Bounds:
  bounds = space.Bounds(dropout_min=_DROPOUT_MIN.value, dropout_max=_DROPOUT_MAX.value,
                        lr_min=_LR_MIN.value, lr_max=_LR_MAX.value)
  bounds.validate()
  return bounds


def _settings(epochs: int) -> dict:
  """What defines this search (recorded in search.json and checked on resume)."""
  return {'tuner': _TUNER.value, 'config': _CONFIG.value, 'epochs': epochs,
          'dropout_min': _DROPOUT_MIN.value, 'dropout_max': _DROPOUT_MAX.value,
          'lr_min': _LR_MIN.value, 'lr_max': _LR_MAX.value,
          'early_stopping_patience': _PATIENCE.value, 'seed': _SEED.value,
          'max_trials': _MAX_TRIALS.value, 'data_dir': _DATA_DIR.value}


def _check_data(data_dir: str) -> None:
  from tfrecords_builder import manifest as manifest_lib  # pylint: disable=g-import-not-at-top
  manifest = manifest_lib.read(data_dir.rstrip('/'))
  for split in ('train', 'val'):
    manifest.split(split)


def create_runtime(base: configs.Config):
  """This process's one strategy for all its trials: MirroredStrategy over several local devices.

  KerasTuner cannot run MultiWorkerMirroredStrategy inside a trial, so a multi-worker TF_CONFIG
  is refused rather than silently ignored; scale-out is KerasTuner's own chief + workers.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from trainer import data, distribution  # pylint: disable=g-import-not-at-top
  spec = distribution.tf_config_from_env()
  if spec is not None and sum(len(hosts) for hosts in spec['cluster'].values()) > 1:
    raise ConfigError('TF_CONFIG (or an Indexed Job\'s CAMVID_NUM_WORKERS) describes a multi-worker'
                      ' cluster: tuning trials run on one machine each; scale out with '
                      'KERASTUNER_TUNER_ID/KERASTUNER_ORACLE_IP/KERASTUNER_ORACLE_PORT instead')
  if base.strategy == 'multi_worker':
    raise ConfigError(f'--config {_CONFIG.value}: strategy multi_worker cannot run inside a '
                      'tuning trial')
  kind = base.strategy
  if kind == 'auto':
    gpus = tf.config.list_logical_devices('GPU')
    several = len(gpus) > 1 or (not gpus and len(tf.config.list_logical_devices('CPU')) > 1)
    kind = 'mirrored' if several else 'default'
  runtime = distribution.create_runtime(kind, base.mixed_precision, base.peer_timeout_seconds)
  try:
    data.check_batch(base.batch_size, runtime.num_replicas, 'batch_size')
    data.check_batch(base.eval_batch_size or base.batch_size, runtime.num_replicas,
                     'eval_batch_size')
  except ValueError as e:
    raise ConfigError(f'--config {_CONFIG.value}: {e}') from None
  return runtime


def main(argv):
  if len(argv) > 1:
    raise ConfigError(f'unexpected arguments: {" ".join(argv[1:])}')
  # TF's Python INFO lines (checkpoint sharding and the like) drown the search's own log.
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger('tensorflow').setLevel(logging.WARNING)
  if not _DATA_DIR.value:
    raise ConfigError('--data_dir is required (a tfrecords_builder output dir)')
  if not _OUTPUT_DIR.value:
    raise ConfigError('--output_dir is required')
  if _MAX_TRIALS.value < 1:
    raise ConfigError(f'--max_trials {_MAX_TRIALS.value}: must be >= 1')
  if _SEED.value < 1:
    # KerasTuner treats seed 0 as "no seed" and draws a random one.
    raise ConfigError(f'--seed {_SEED.value}: must be >= 1')

  from tuning import tuner as tuner_lib  # pylint: disable=g-import-not-at-top
  process_role = tuner_lib.role()
  base, epochs = _base_config()
  bounds = _bounds()
  _check_data(_DATA_DIR.value)
  output_dir = _OUTPUT_DIR.value.rstrip('/')
  settings = _settings(epochs)

  runtime = None
  if process_role != 'chief':  # The chief only serves the oracle; it trains nothing.
    if _LOGICAL_CPUS.value:
      from trainer import distribution  # pylint: disable=g-import-not-at-top
      distribution.configure_logical_cpus(_LOGICAL_CPUS.value)
    runtime = create_runtime(base)
    print(f'distribution for every trial: {runtime.describe()}', flush=True)

  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tuning import board, results  # pylint: disable=g-import-not-at-top
  owns_oracle = process_role != 'worker'
  if owns_oracle:
    tf.io.gfile.makedirs(output_dir)
    if _OVERWRITE.value:
      results.remove(output_dir)
      if tf.io.gfile.exists(board.root(output_dir)):
        tf.io.gfile.rmtree(board.root(output_dir))
    results.check_and_record_settings(output_dir, settings)
    board.write_experiment(output_dir, bounds, epochs)
  elif _OVERWRITE.value:
    print('--overwrite: ignored on a worker (the chief starts the search over)', flush=True)

  oracle = tuner_lib.make_oracle(_TUNER.value, bounds, _MAX_TRIALS.value, epochs, _SEED.value)
  if _TUNER.value == 'hyperband' and owns_oracle:
    per_iteration = space.hyperband_trials_per_iteration(epochs, tuner_lib.HYPERBAND_FACTOR)
    print(f'hyperband: max {epochs} epochs per trial, factor {tuner_lib.HYPERBAND_FACTOR}: one '
          f'full iteration is {per_iteration} trials (--max_trials {_MAX_TRIALS.value})',
          flush=True)
  tuner = tuner_lib.SegmentationTuner(
      oracle, base_config=base, data_dir=_DATA_DIR.value, output_dir=output_dir, epochs=epochs,
      runtime=runtime, overwrite=_OVERWRITE.value and owns_oracle, process_role=process_role,
      settings=settings if process_role == 'worker' else None,
      log=lambda message: print(message, flush=True))
  if owns_oracle:
    # Records the oracle and tuner state now, so a crash inside the very first trial is resumed
    # like any other (KerasTuner itself first saves the tuner at the end of a trial).
    tuner.save()

  if owns_oracle and tuner_lib.finished(tuner.oracle):
    print(f'the search in {output_dir} is finished (rerun with a larger --max_trials to extend '
          'it, or --overwrite to start over)', flush=True)
  elif process_role == 'chief':
    address = f'{os.environ["KERASTUNER_ORACLE_IP"]}:{os.environ["KERASTUNER_ORACLE_PORT"]}'
    print(f'chief: serving the oracle on {address} until the workers finish', flush=True)
    try:
      tuner.search()
    except RuntimeError as e:
      if 'Failed to bind' not in str(e):
        raise
      raise ConfigError(f'KERASTUNER_ORACLE_IP/PORT {address}: cannot listen there (port in use, '
                        'or not an address of this host; a chief may use 0.0.0.0)') from None
  else:
    tuner.search()

  if not owns_oracle:
    print(f'worker {os.environ["KERASTUNER_TUNER_ID"]}: the chief has no more trials; done',
          flush=True)
    return 0
  best = results.write(output_dir, tuner.oracle.trials.values(), epochs)
  print(f'\ntrials:       {output_dir}/{results.TRIALS_NAME}')
  print(f'tensorboard:  tensorboard --logdir {board.root(output_dir)}')
  if best is None:
    print('error: no trial completed; see the trials\' errors above and in trials.json',
          file=sys.stderr)
    return 1
  tuned = space.tuned_values(best.hyperparameters.values)
  print(f'best trial:   {best.trial_id}, val mIoU {float(best.score):.4f}, '
        + ', '.join(f'{k} {v:.4g}' for k, v in tuned.items()))
  print(f'best hparams: {output_dir}/{results.BEST_NAME}\n'
        f'train with:   python -m trainer.task --config {_CONFIG.value} --data_dir '
        f'{_DATA_DIR.value} --model_dir M --hparams_file {output_dir}/{results.BEST_NAME}',
        flush=True)
  return 0


def run():
  """Console-script entry: user mistakes become one line on stderr and exit code 2."""
  from trainer.train import Preempted  # pylint: disable=g-import-not-at-top
  from tuning.tuner import SearchAborted  # pylint: disable=g-import-not-at-top
  try:
    app.run(main)
  except InputError as e:  # ConfigError is an InputError.
    print(f'error: {e}', file=sys.stderr)
    sys.exit(EXIT_CONFIG_ERROR)
  except SearchAborted as e:
    if isinstance(e.cause, Preempted):
      print(f'preempted: {e.cause}; rerun the same command to continue', file=sys.stderr)
      sys.exit(EXIT_PREEMPTED)
    print(f'error: {e.cause}', file=sys.stderr)
    sys.exit(EXIT_CONFIG_ERROR)


if __name__ == '__main__':
  run()
