"""Config presets and their overrides; see base.py for the fields and presets.py for the presets."""

from trainer.configs.base import Config, FIELDS, REMOVED_OPTIONS, from_json, override, validate  # pylint: disable=unused-import
from trainer.configs.presets import PRESETS

__all__ = ['Config', 'FIELDS', 'PRESETS', 'REMOVED_OPTIONS', 'from_json', 'get_config', 'override',
           'validate']


def get_config(name: str) -> Config:
  if name not in PRESETS:
    raise ValueError(f'--config {name}: unknown preset (known: {", ".join(PRESETS)})')
  return PRESETS[name]()
