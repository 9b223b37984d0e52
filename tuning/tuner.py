"""The KerasTuner tuner whose trials are ordinary trainer runs, plus the oracles and roles.

Each trial is `trainer.train.run` on the preset with the trial's dropout and learning rate: the
same model, data pipeline, loss, distributed loop, checkpoints, resume and early stopping as any
training run (no second copy of the training code). Its model_dir is the trial's directory in
KerasTuner's project dir, so a trial that is run again after a crash resumes from its own
checkpoints, and its objective is the val mIoU (void excluded) of its best checkpoint.

Hyperband continuation: a trial that Hyperband promotes to a larger budget (`tuner/trial_id`,
`tuner/initial_epoch` set) is trained from scratch with `epochs = tuner/epochs`, not warm-started
from the parent's checkpoint. The trainer's learning-rate schedule (warm-up, cosine decay to zero)
and early stopping are laid out over the run's whole epoch count, so continuing a parent whose
schedule already decayed over a shorter budget would measure a run nobody will ever train; from
scratch, every trial with budget E is exactly `trainer.task --epochs E` with those values. The
price is repeating the parent's epochs (about 1/factor of a promoted trial's budget).

Roles (KerasTuner's distributed mode, from the KERASTUNER_* environment):
  single  no KERASTUNER_ORACLE_IP: oracle and trials in this process.
  chief   KERASTUNER_TUNER_ID contains "chief": serves the oracle over gRPC, runs no trial.
  worker  any other KERASTUNER_TUNER_ID: asks the chief for trials and runs them.
"""

import gc
import os
import sys

import keras_tuner
from keras_tuner.engine import base_tuner
from keras_tuner.engine import trial as trial_lib
import tensorflow as tf

from camvid_common import errors
from trainer import configs
from trainer import data
from trainer import distribution
from trainer import loop
from trainer import train
from tuning import board
from tuning import results
from tuning import space

OBJECTIVE = 'val_mean_iou'
PROJECT_NAME = 'keras_tuner'
TUNERS = ('hyperband', 'bayesian', 'random')
HYPERBAND_FACTOR = 3
ENV_VARS = ('KERASTUNER_TUNER_ID', 'KERASTUNER_ORACLE_IP', 'KERASTUNER_ORACLE_PORT')


class SearchAborted(keras_tuner.errors.FatalError):
  """Stops the whole search (KerasTuner re-raises FatalError instead of failing the trial).

  `cause` is the trainer's InputError (bad config or data: rerunning cannot help) or Preempted
  (SIGTERM, backup saved: rerunning resumes the trial).
  """

  def __init__(self, cause: Exception):
    super().__init__(str(cause))
    self.cause = cause


def role(env=os.environ) -> str:
  """single | chief | worker, by KerasTuner's own rule (a tuner id containing "chief")."""
  # KerasTuner switches to distributed mode when KERASTUNER_ORACLE_IP is set at all, even empty.
  present = [name for name in ENV_VARS if name in env]
  if not present:
    return 'single'
  missing = [name for name in ENV_VARS if not env.get(name)]
  if missing:
    raise errors.ConfigError(f'{", ".join(missing)}: not set (or empty); distributed tuning needs '
                             f'all of {", ".join(ENV_VARS)} (see docs/tuning.md)')
  if not env['KERASTUNER_ORACLE_PORT'].isdigit():
    raise errors.ConfigError(f'KERASTUNER_ORACLE_PORT={env["KERASTUNER_ORACLE_PORT"]}: not a port '
                             'number')
  return 'chief' if 'chief' in env['KERASTUNER_TUNER_ID'] else 'worker'


def strategy_kind(configured: str, num_gpus: int, num_cpus: int) -> str:
  """auto: MirroredStrategy over several GPUs (or several logical CPUs without a GPU)."""
  if configured == 'multi_worker':
    raise errors.ConfigError('strategy multi_worker (set by the preset) cannot run inside a tuning '
                             'trial; scale out with KerasTuner\'s chief and workers instead')
  if configured != 'auto':
    return configured
  several = num_gpus > 1 or (num_gpus == 0 and num_cpus > 1)
  return 'mirrored' if several else 'default'


def create_runtime(base: configs.Config):
  """This process's one strategy for all its trials: MirroredStrategy over several local devices.

  KerasTuner cannot run MultiWorkerMirroredStrategy inside a trial, so a multi-worker TF_CONFIG
  is refused rather than silently ignored; scale-out is KerasTuner's own chief + workers.
  """
  spec = distribution.tf_config_from_env()
  if spec is not None and sum(len(hosts) for hosts in spec['cluster'].values()) > 1:
    raise errors.ConfigError(
        'TF_CONFIG (or an Indexed Job\'s CAMVID_NUM_WORKERS) describes a multi-worker cluster: '
        'tuning trials run on one machine each; scale out with '
        'KERASTUNER_TUNER_ID/KERASTUNER_ORACLE_IP/KERASTUNER_ORACLE_PORT')
  kind = strategy_kind(base.runtime.strategy, len(tf.config.list_logical_devices('GPU')),
                       len(tf.config.list_logical_devices('CPU')))
  runtime = distribution.create_runtime(kind, base.runtime.mixed_precision,
                                       base.runtime.peer_timeout_seconds,
                                       base.runtime.formation_timeout_seconds)
  try:
    data.check_batch(base.data.batch_size, runtime.num_replicas, 'data.batch_size')
    data.check_batch(base.eval.batch_size or base.data.batch_size, runtime.num_replicas,
                     'eval.batch_size')
  except ValueError as e:
    raise errors.ConfigError(f'the preset\'s {e}') from None
  return runtime


def make_oracle(kind: str, bounds: space.Bounds, max_trials: int, epochs: int, seed: int,
                output_dir: str | None = None) -> keras_tuner.Oracle:
  """The search algorithm over the space in space.py, maximising val mIoU.

  With `output_dir` (the process that owns the oracle: single or chief), every time the oracle
  saves its state (a trial created or ended) it also rewrites output_dir's trials.json and
  best_hparams.json, so they are current during a search, on the chief of a distributed one too.
  """
  common = {'objective': keras_tuner.Objective(OBJECTIVE, 'max'),
            'hyperparameters': space.hyperparameters(bounds),
            # The space is exactly space.py's: a trial never adds hyperparameters.
            'allow_new_entries': False, 'tune_new_entries': False, 'seed': seed,
            # A trial that raised (e.g. a flaky bucket read) is run once more; it resumes from
            # its own checkpoints, so the retry costs little.
            'max_retries_per_trial': 1}
  if kind == 'hyperband':
    oracle_class = keras_tuner.oracles.HyperbandOracle
    # No iteration limit: --max_trials bounds the search for every tuner alike.
    kwargs = {'max_epochs': epochs, 'factor': HYPERBAND_FACTOR, 'hyperband_iterations': None}
  elif kind == 'bayesian':
    oracle_class = keras_tuner.oracles.BayesianOptimizationOracle
    kwargs = {'max_trials': max_trials}
  elif kind == 'random':
    oracle_class = keras_tuner.oracles.RandomSearchOracle
    kwargs = {'max_trials': max_trials}
  else:
    raise errors.ConfigError(f'--tuner {kind}: unknown (known: {", ".join(TUNERS)})')
  if output_dir is not None:
    oracle_class = _recording(oracle_class, output_dir, epochs)
  try:
    oracle = oracle_class(**kwargs, **common)
  except ImportError:
    raise errors.ConfigError(f'--tuner {kind} needs scikit-learn and scipy: pip install '
                             '"keras-tuner[bayesian]"') from None
  # HyperbandOracle takes no max_trials argument, but the base Oracle honours the attribute
  # (create_trial stops the search once that many trials exist).
  oracle.max_trials = max_trials
  return oracle


def _recording(oracle_class, output_dir: str, epochs: int):
  """`oracle_class` that also writes trials.json and best_hparams.json whenever it saves."""

  class RecordingOracle(oracle_class):

    def save(self):
      super().save()
      results.write(output_dir, self.trials.values(), epochs)

  RecordingOracle.__name__ = f'Recording{oracle_class.__name__}'
  return RecordingOracle


def finished(oracle) -> bool:
  """True when a reloaded search has nothing left to run (every trial ended, none remain)."""
  # INVALID is not final: such a trial waits in the oracle's retry queue (or becomes FAILED).
  ended = (trial_lib.TrialStatus.COMPLETED, trial_lib.TrialStatus.FAILED,
           trial_lib.TrialStatus.STOPPED)
  return (oracle.remaining_trials() == 0 and
          all(t.status in ended for t in oracle.trials.values()))


class SegmentationTuner(base_tuner.BaseTuner):
  """Runs each trial as a trainer run in the trial's directory; reports its val mIoU."""

  def __init__(self, oracle, *, base_config: configs.Config, data_dir: str, output_dir: str,
               epochs: int, runtime, overwrite: bool, settings: dict | None = None,
               log=print):
    """Creates the tuner, resuming the project in output_dir unless `overwrite`.

    Args:
      oracle: from make_oracle.
      base_config: the preset (and fixed overrides) every trial starts from.
      data_dir: a tfrecords_builder output dir.
      output_dir: the search's root; KerasTuner's project dir is output_dir/keras_tuner.
      epochs: each trial's epochs (Hyperband: the largest budget; trials carry their own).
      runtime: the process's distribution runtime, created once (None on the chief).
      overwrite: discard an existing project instead of resuming it.
      settings: the search's defining settings; a worker compares them with the chief's.
      log: where progress lines go.
    """
    self._base_config = base_config
    self._data_dir = data_dir
    self._output_dir = output_dir.rstrip('/')
    self._epochs = epochs
    self._runtime = runtime
    self._settings = settings
    self._settings_checked = False
    self._log = log
    # KerasTuner builds its paths with os.path.join, which keeps gs:// prefixes intact, and does
    # all its file access through tf.io.gfile (keras_tuner/src/backend/io.py).
    super().__init__(oracle, hypermodel=None, directory=self._output_dir,
                     project_name=PROJECT_NAME, overwrite=overwrite)

  def run_trial(self, trial, *args, **kwargs):
    del args, kwargs  # The data and model come from the trainer, not from search() arguments.
    trial_id = trial.trial_id
    values = trial.hyperparameters.values
    epochs = space.trial_epochs(values, self._epochs)
    try:
      if self._settings is not None and not self._settings_checked:
        results.check_settings_if_recorded(self._output_dir, self._settings)
        self._settings_checked = True
      config = space.trial_config(self._base_config, values, epochs)
    except errors.InputError as e:
      raise SearchAborted(e) from e
    tuned = space.tuned_values(values)
    board.write_trial_start(self._output_dir, trial_id, {**tuned, 'epochs': epochs})

    def log(message):
      self._log(f'trial {trial_id}: {message}')

    log(', '.join(f'{k} {v:.4g}' for k, v in tuned.items()) + f', {epochs} epochs'
        + (f' (Hyperband: promoted from trial {values["tuner/trial_id"]}, trained from scratch)'
           if values.get('tuner/trial_id') else ''))
    try:
      result = train.run(config, self._data_dir, self.get_trial_dir(trial_id),
                         runtime=self._runtime, log=log,
                         log_dir=board.session_dir(self._output_dir, trial_id), export=False)
    except (errors.InputError, loop.Preempted) as e:
      raise SearchAborted(e) from e
    finally:
      # The trial's model, optimizer and tf.functions are garbage now; free them before the next.
      gc.collect()
    miou = result.get('mean_iou')
    if miou is None:
      # No labelled val pixel: the trial cannot be ranked, and rerunning it would not help.
      raise keras_tuner.errors.FailedTrialError('val mIoU is undefined (no labelled val pixels)')
    board.write_trial_objective(self._output_dir, trial_id, miou, epochs)
    return {OBJECTIVE: float(miou)}

  def on_trial_end(self, trial):
    if trial.status != trial_lib.TrialStatus.COMPLETED and trial.message:
      # KerasTuner keeps the traceback in the trial (and in its trial.json) but prints nothing.
      print(f'trial {trial.trial_id} {trial.status}:\n{trial.message}', file=sys.stderr)
    super().on_trial_end(trial)
