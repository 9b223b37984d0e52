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

import os
import sys

from camvid_common import quiet

quiet.start()  # Before anything imports TensorFlow: hides its load-time C++ log.

from absl import flags  # pylint: disable=g-import-not-at-top

from camvid_common import errors
from trainer import configs
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
quiet.define_absl_flag()


def _base_config(bounds: space.Bounds) -> tuple[configs.Config, int]:
  """The preset (with --early_stopping_patience) and the epochs per trial; validated."""
  try:
    base = configs.get_config(_CONFIG.value)
    if _PATIENCE.value is not None:
      base = configs.override(base, {'trainer.early_stopping_patience': _PATIENCE.value},
                              'flags')
  except ValueError as e:
    raise errors.ConfigError(str(e)) from None
  epochs = _EPOCHS.value if _EPOCHS.value is not None else base.trainer.epochs
  if epochs < 1:
    raise errors.ConfigError(f'--epochs {epochs}: must be >= 1')
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


def _search(tuner, process_role: str) -> None:
  """Runs the search (the chief: serves the oracle until the workers are done)."""
  from tuning import tuner as tuner_lib  # pylint: disable=g-import-not-at-top
  address = f'{os.environ.get("KERASTUNER_ORACLE_IP")}:{os.environ.get("KERASTUNER_ORACLE_PORT")}'
  if process_role == 'chief':
    print(f'chief: serving the oracle on {address} until the workers finish', flush=True)
  try:
    tuner.search()
  except tuner_lib.SearchAborted as e:
    # The trainer's own error (bad config or data, or a preemption) decides the exit code.
    raise e.cause from None
  except RuntimeError as e:
    if process_role != 'chief' or 'Failed to bind' not in str(e):
      raise
    raise errors.ConfigError(
        f'KERASTUNER_ORACLE_IP/PORT {address}: cannot listen there (port in use, '
        'or not an address of this host; a chief may use 0.0.0.0)') from None


def _check_flags() -> None:
  if not _DATA_DIR.value:
    raise errors.ConfigError('--data_dir is required (a tfrecords_builder output dir)')
  if not _OUTPUT_DIR.value:
    raise errors.ConfigError('--output_dir is required')
  if _MAX_TRIALS.value < 1:
    raise errors.ConfigError(f'--max_trials {_MAX_TRIALS.value}: must be >= 1')
  if _SEED.value < 1:
    # KerasTuner treats seed 0 as "no seed" and draws a random one.
    raise errors.ConfigError(f'--seed {_SEED.value}: must be >= 1')


def _prepare_output(output_dir: str, bounds, epochs: int, settings: dict,
                    owns_oracle: bool) -> None:
  """The chief (or a single process) records the search's settings and TensorBoard experiment."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tuning import board, results  # pylint: disable=g-import-not-at-top
  if not owns_oracle:
    if _OVERWRITE.value:
      print('--overwrite: ignored on a worker (the chief starts the search over)', flush=True)
    return
  tf.io.gfile.makedirs(output_dir)
  if _OVERWRITE.value:
    results.remove(output_dir)
    if tf.io.gfile.exists(board.root(output_dir)):
      tf.io.gfile.rmtree(board.root(output_dir))
  results.check_and_record_settings(output_dir, settings)
  board.write_experiment(output_dir, bounds, epochs)


def _report(output_dir: str, tuner, epochs: int) -> int:
  """Writes trials.json and best_hparams.json and prints where they are; the exit code."""
  from tuning import board, results  # pylint: disable=g-import-not-at-top
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


def main(argv):
  del argv  # run_app rejects positional arguments.
  _check_flags()
  from tuning import tuner as tuner_lib  # pylint: disable=g-import-not-at-top
  process_role = tuner_lib.role()
  bounds = _bounds()
  base, epochs = _base_config(bounds)
  from camvid_common import fileio  # pylint: disable=g-import-not-at-top
  for flag in (_DATA_DIR, _OUTPUT_DIR):
    fileio.check_bucket(flag.value, f'--{flag.name}')
  _check_data(_DATA_DIR.value)
  output_dir = _OUTPUT_DIR.value.rstrip('/')
  settings = _settings(epochs)

  runtime = None
  if process_role != 'chief':  # The chief only serves the oracle; it trains nothing.
    if _LOGICAL_CPUS.value:
      from trainer import distribution  # pylint: disable=g-import-not-at-top
      distribution.configure_logical_cpus(_LOGICAL_CPUS.value)
    runtime = tuner_lib.create_runtime(base)
    print(f'distribution for every trial: {runtime.describe()}', flush=True)

  owns_oracle = process_role != 'worker'
  _prepare_output(output_dir, bounds, epochs, settings, owns_oracle)

  oracle = tuner_lib.make_oracle(_TUNER.value, bounds, _MAX_TRIALS.value, epochs, _SEED.value,
                                 output_dir=output_dir if owns_oracle else None)
  if _TUNER.value == 'hyperband' and owns_oracle:
    per_iteration = space.hyperband_trials_per_iteration(epochs, tuner_lib.HYPERBAND_FACTOR)
    print(f'hyperband: max {epochs} epochs per trial, factor {tuner_lib.HYPERBAND_FACTOR}: one '
          f'full iteration is {per_iteration} trials (--max_trials {_MAX_TRIALS.value})',
          flush=True)
  tuner = tuner_lib.SegmentationTuner(
      oracle, base_config=base, data_dir=_DATA_DIR.value, output_dir=output_dir, epochs=epochs,
      runtime=runtime, overwrite=_OVERWRITE.value and owns_oracle,
      settings=settings if process_role == 'worker' else None,
      log=lambda message: print(message, flush=True))
  if owns_oracle:
    # Records the oracle and tuner state now, so a crash inside the very first trial is resumed
    # like any other (KerasTuner itself first saves the tuner at the end of a trial).
    tuner.save()

  # A chief serves even a finished search: each worker that asks is told to stop, so a relaunched
  # Job ends cleanly instead of leaving its workers waiting for an oracle.
  if process_role == 'single' and tuner_lib.finished(tuner.oracle):
    print(f'the search in {output_dir} is finished (rerun with a larger --max_trials to extend '
          'it, or --overwrite to start over)', flush=True)
  else:
    _search(tuner, process_role)

  if not owns_oracle:
    print(f'worker {os.environ["KERASTUNER_TUNER_ID"]}: the chief has no more trials; done',
          flush=True)
    return 0
  return _report(output_dir, tuner, epochs)


def run():
  """Console-script entry: one stderr line and a documented exit code for expected failures."""
  from trainer.loop import Preempted  # pylint: disable=g-import-not-at-top
  errors.run_app(main, handlers=[(Preempted, errors.EXIT_PREEMPTED,
                                  'preempted (rerun the same command to continue)')],
                 quiet_tensorflow=True)


if __name__ == '__main__':
  run()
