"""Config presets and their overrides; see base.py for the groups and presets.py for the presets."""

from trainer.configs.base import (  # pylint: disable=unused-import
    FIELDS, FLAT_NAMES, GROUPS, REMOVED_OPTIONS, Config, DataConfig, EvalConfig, ExperimentConfig,
    LossConfig, ModelConfig, OptimizerConfig, RuntimeConfig, TrainerConfig, choice_fields, choices,
    from_dict, from_json, get, hparams, is_params_file, override, parse_params_file,
    parse_params_override, resumable, to_flat, validate)
from trainer.configs.presets import PRESETS

__all__ = ['Config', 'DataConfig', 'EvalConfig', 'ExperimentConfig', 'FIELDS', 'FLAT_NAMES',
           'GROUPS', 'LossConfig', 'ModelConfig', 'OptimizerConfig', 'PRESETS', 'REMOVED_OPTIONS',
           'RuntimeConfig', 'TrainerConfig', 'choice_fields', 'choices', 'from_dict', 'from_json',
           'get', 'get_config', 'hparams', 'is_params_file', 'override', 'parse_params_file',
           'parse_params_override', 'resumable', 'to_flat', 'validate']


def get_config(name: str) -> Config:
  if name not in PRESETS:
    raise ValueError(f'--config {name}: unknown preset (known: {", ".join(PRESETS)})')
  return PRESETS[name]()
