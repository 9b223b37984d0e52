"""A search's outputs for people and for the trainer: trials.json, best_hparams.json, search.json.

  best_hparams.json  exactly {"dropout": float, "learning_rate": float} of the best completed
                     trial: `python -m trainer.task --hparams_file O/best_hparams.json` uses it.
  trials.json        every trial: trial_id, hyperparameters (the tuned ones), objective (val mIoU
                     of the trial's best checkpoint, null unless completed), status (KerasTuner's:
                     RUNNING, COMPLETED, INVALID, FAILED, ...), epochs (the trial's budget).
  search.json        the search's defining settings, checked when a search is resumed.

Written by the process that owns the oracle (single process, or the chief), through
tf.io.gfile with an atomic rename, so gs:// works and a reader never sees half a file.
"""

import json
import math

import tensorflow as tf

from camvid_common import errors
from camvid_common import fileio
from tuning import space

BEST_NAME = 'best_hparams.json'
TRIALS_NAME = 'trials.json'
SEARCH_NAME = 'search.json'
# Settings that define what a trial's objective means: a resumed search must not change them.
# (max_trials may grow, to extend a finished search; data_dir may move, e.g. to a bucket.)
FIXED_SETTINGS = ('tuner', 'config', 'epochs', 'dropout_min', 'dropout_max', 'lr_min', 'lr_max',
                  'early_stopping_patience', 'seed')


def _path(output_dir: str, name: str) -> str:
  return f'{output_dir.rstrip("/")}/{name}'


def _write_json(path: str, value) -> None:
  fileio.write_atomic(path, json.dumps(value, indent=2) + '\n')


def _objective(trial) -> float | None:
  if trial.status != 'COMPLETED' or trial.score is None:
    return None
  score = float(trial.score)
  return score if math.isfinite(score) else None


def _order(trial_id: str):
  # Ids are zero-padded to the width of max_trials, which may change when a search is extended.
  return (0, int(trial_id), '') if trial_id.isdigit() else (1, 0, trial_id)


def trial_records(trials, default_epochs: int) -> list[dict]:
  """One record per trial, in trial order."""
  records = []
  for trial in sorted(trials, key=lambda t: _order(t.trial_id)):
    values = trial.hyperparameters.values
    records.append({
        'trial_id': trial.trial_id,
        'hyperparameters': ({name: float(values[name]) for name in space.TUNED}
                            if all(name in values for name in space.TUNED) else {}),
        'objective': _objective(trial),
        'status': str(trial.status),
        'epochs': space.trial_epochs(values, default_epochs),
    })
  return records


def best_trial(trials):
  """The completed trial with the highest objective (the earliest on a tie), or None."""
  scored = [t for t in trials if _objective(t) is not None]
  if not scored:
    return None
  return max(sorted(scored, key=lambda t: _order(t.trial_id)), key=_objective)


def write(output_dir: str, trials, default_epochs: int):
  """Writes trials.json, and best_hparams.json once a trial has completed; returns the best."""
  trials = list(trials)
  _write_json(_path(output_dir, TRIALS_NAME), trial_records(trials, default_epochs))
  best = best_trial(trials)
  if best is not None:
    _write_json(_path(output_dir, BEST_NAME), space.tuned_values(best.hyperparameters.values))
  return best


def remove(output_dir: str) -> None:
  """--overwrite: removes this module's files (KerasTuner removes its own project dir)."""
  for name in (BEST_NAME, TRIALS_NAME, SEARCH_NAME):
    if tf.io.gfile.exists(_path(output_dir, name)):
      tf.io.gfile.remove(_path(output_dir, name))


def check_and_record_settings(output_dir: str, settings: dict) -> None:
  """Refuses to resume a search under different defining settings; records the current ones."""
  path = _path(output_dir, SEARCH_NAME)
  if tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path) as f:
      recorded = json.load(f)
    changed = [f'--{key} {recorded.get(key)} -> {settings.get(key)}' for key in FIXED_SETTINGS
               if recorded.get(key) != settings.get(key)]
    if changed:
      raise errors.ConfigError(
          f'{path}: this search was started with other settings ({", ".join(changed)}); rerun '
          'with the same flags to resume it, or add --overwrite to start over')
  _write_json(path, settings)


def check_settings_if_recorded(output_dir: str, settings: dict) -> None:
  """A worker's check against the chief's search.json, when the output dir is shared."""
  path = _path(output_dir, SEARCH_NAME)
  if not tf.io.gfile.exists(path):
    return  # Not shared storage (or not written yet): nothing to compare with.
  with tf.io.gfile.GFile(path) as f:
    recorded = json.load(f)
  changed = [f'--{key} {settings.get(key)} (chief: {recorded.get(key)})'
             for key in FIXED_SETTINGS if recorded.get(key) != settings.get(key)]
  if changed:
    raise errors.ConfigError(f'this worker\'s flags differ from the chief\'s {path}: '
                             f'{", ".join(changed)}')
