"""Config tier: every preset is valid, and every out-of-range value is refused by name.

`configs.validate` runs before anything is written, so a value the trainer cannot use must fail
there as one `field: value ...` line (tests/test_task.py checks the command-line path) instead
of as a traceback or a silent misbehaviour minutes into a run.
"""

import pytest

from trainer import configs


@pytest.mark.parametrize('name', sorted(configs.PRESETS))
def test_every_preset_validates(name):
  configs.validate(configs.get_config(name))


@pytest.mark.parametrize('field, value', [
    ('batch_size', 0), ('epochs', 0), ('learning_rate', 0.0), ('dropout', 1.0),
    ('scale_min', 2.0),  # Above scale_max.
    ('weight_decay', -1e-4), ('max_class_weight', 0.0),
    ('clipnorm', 0.0), ('base_batch_size', 0), ('eval_batch_size', 0), ('shuffle_buffer', 0),
    ('cache_decoded_mb', -1), ('brightness', -0.1), ('contrast', 1.5), ('saturation', 2.0),
    ('num_summary_images', -1), ('profile_steps', (5, 2)), ('profile_steps', (-1, 2)),
    ('logit_adjustment', 1.5), ('calibration_split', ''),
    ('eval_scales', ()), ('eval_scales', (0.0, 1.0)), ('eval_scales', (4.5,)),
    ('eval_scales', (0.1, 1.0)),  # 288 x 0.1 is less than one 32-pixel stride of `small`.
])
def test_out_of_range_values_are_refused_by_name(field, value):
  config = configs.get_config('small')
  with pytest.raises(ValueError, match=f'^{field}: .* is out of range$'):
    configs.validate(config.replace(**{field: value}))


def test_values_that_need_another_field_name_both():
  config = configs.get_config('small')
  configs.validate(config.replace(aux_loss_weight=1.0))  # Fine with the preset's depth 4.
  # The deep-supervision heads need a decoder level besides the last.
  with pytest.raises(ValueError, match='^aux_loss_weight: 1.0 needs depth >= 2, not depth 1$'):
    configs.validate(config.replace(aux_loss_weight=1.0, depth=1))


@pytest.mark.parametrize('field, value', [
    ('weight_decay', 0.0), ('max_class_weight', 10.0), ('clipnorm', 1.0),
    ('eval_batch_size', 1), ('cache_decoded_mb', 0), ('brightness', 1.0), ('contrast', 0.0),
    ('num_summary_images', 0), ('profile_steps', (0, 0)), ('profile_steps', (3, 9)),
    ('eval_scales', (0.75, 1.0, 1.25)), ('eval_scales', (4.0,)),
    ('eval_scales', (0.12,)),  # 288 x 0.12 rounds to 35 pixels: one stride, padded to 64.
])
def test_boundary_values_are_accepted(field, value):
  configs.validate(configs.get_config('small').replace(**{field: value}))


def test_wrong_types_and_unknown_keys_name_the_source():
  small = configs.get_config('small')
  with pytest.raises(ValueError, match=r'^hp\.json: weight_decay: expected float, got .abc.$'):
    configs.override(small, {'weight_decay': 'abc'}, 'hp.json')
  with pytest.raises(ValueError, match=r'^hp\.json: unknown keys wieght_decay '):
    configs.override(small, {'wieght_decay': 0.1}, 'hp.json')


def test_eval_scales_take_a_list_of_any_length():
  small = configs.get_config('small')
  assert configs.Config().eval_scales == (1.0,)
  assert configs.override(small, {'eval_scales': [0.75, 1]}, 'hp.json').eval_scales == (0.75, 1.0)
  with pytest.raises(ValueError, match=r'^hp\.json: eval_scales: expected a list of one or more '):
    configs.override(small, {'eval_scales': []}, 'hp.json')
  with pytest.raises(ValueError, match=r'^hp\.json: eval_scales: expected float, got .x.$'):
    configs.override(small, {'eval_scales': [1, 'x']}, 'hp.json')
  # Fixed-length tuples still want exactly their length.
  with pytest.raises(ValueError, match=r'^hp\.json: profile_steps: expected a list of 2 values'):
    configs.override(small, {'profile_steps': [1, 2, 3]}, 'hp.json')
