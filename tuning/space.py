"""The search space, defined once: which trainer hyperparameters are tuned and over what range.

A trial's values become a trainer Config by overriding the preset's fields they stand for
(TUNED); best_hparams.json keeps the flat names, which `--hparams_file` of `python -m
trainer.task` reads through configs.FLAT_NAMES. The flags in tune.py
only move the bounds.
"""

import dataclasses
import math

import keras_tuner

from camvid_common import errors
from trainer import configs

# The tuned hyperparameters (their names in the search, trials.json and best_hparams.json) and
# the Config fields they set, in the order they are reported. Nothing else is ever written to
# best_hparams.json: the trainer rejects unknown keys, and the epoch budget is not a finding.
TUNED = {'dropout': 'model.dropout', 'learning_rate': 'optimizer.learning_rate'}
# Hyperband's per-trial epoch budget (the cumulative epochs of that trial).
HYPERBAND_EPOCHS = 'tuner/epochs'


@dataclasses.dataclass(frozen=True)
class Bounds:
  """Inclusive ranges: dropout uniform, learning rate log-uniform."""
  dropout_min: float = 0.0
  dropout_max: float = 0.5
  lr_min: float = 1e-4
  lr_max: float = 1e-2

  def validate(self) -> None:
    """Raises ConfigError naming the flag for a range the trainer or KerasTuner cannot use."""
    if not 0.0 <= self.dropout_min < self.dropout_max < 1.0:
      raise errors.ConfigError(f'--dropout_min {self.dropout_min:g} / --dropout_max '
                               f'{self.dropout_max:g}: need 0 <= min < max < 1')
    if not (0.0 < self.lr_min < self.lr_max and math.isfinite(self.lr_max)):
      raise errors.ConfigError(f'--lr_min {self.lr_min:g} / --lr_max {self.lr_max:g}: need '
                               '0 < min < max (the learning rate is searched on a log scale)')


def hyperparameters(bounds: Bounds) -> keras_tuner.HyperParameters:
  """The KerasTuner search space over `bounds`."""
  hp = keras_tuner.HyperParameters()
  hp.Float('dropout', bounds.dropout_min, bounds.dropout_max)
  # Learning rates matter by orders of magnitude: sample the exponent uniformly.
  hp.Float('learning_rate', bounds.lr_min, bounds.lr_max, sampling='log')
  return hp


def tuned_values(values: dict) -> dict:
  """Just the tuned fields of a trial's values (Hyperband adds `tuner/...` bookkeeping)."""
  return {name: float(values[name]) for name in TUNED}


def trial_epochs(values: dict, default_epochs: int) -> int:
  """Hyperband gives each trial its own budget; the other oracles use --epochs for all."""
  return int(values.get(HYPERBAND_EPOCHS, default_epochs))


def trial_config(base: configs.Config, values: dict, epochs: int) -> configs.Config:
  """The trainer Config of one trial: the base config with the tuned fields and epoch budget."""
  try:
    config = configs.override(
        base, {TUNED[name]: value for name, value in tuned_values(values).items()} |
        {'trainer.epochs': epochs}, 'trial')
    configs.validate(config)
  except ValueError as e:
    raise errors.ConfigError(str(e)) from None
  return config


def hyperband_trials_per_iteration(max_epochs: int, factor: int) -> int:
  """How many trials one full Hyperband iteration creates (KerasTuner's bracket arithmetic).

  Printed so a user can choose --max_trials to cover whole brackets: a search cut off in the
  middle of a bracket never reaches that bracket's longer successive-halving rounds.
  """
  brackets, epochs = 0, float(max_epochs)
  while epochs >= 1:
    epochs /= factor
    brackets += 1
  end_size = math.ceil(1 + math.log(max_epochs, factor))
  return sum(math.ceil(end_size / (bracket + 1) * factor**(bracket - rnd))
             for bracket in range(brackets) for rnd in range(bracket + 1))
