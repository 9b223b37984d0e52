"""Config tier: every preset is valid, every out-of-range value is refused by dotted name, and
overrides take dotted keys, nested mappings and the old flat names alike.

`configs.validate` runs before anything is written, so a value the trainer cannot use must fail
there as one `group.field: value ...` line (tests/test_task.py checks the command-line path)
instead of as a traceback or a silent misbehaviour minutes into a run.
"""

import json

import pytest

from trainer import configs


@pytest.mark.parametrize('name', sorted(configs.PRESETS))
def test_every_preset_validates(name):
  configs.validate(configs.get_config(name))


# `small` as presets.py built it while the config was one flat dataclass (values written out by
# hand): the grouped preset must train exactly the same thing.
OLD_FLAT_SMALL = {
    'base_filters': 16, 'depth': 4, 'dropout': 0.0, 'stem_stride': 2, 'sync_batchnorm': True,
    'bn_momentum': 0.9, 'image_size': (288, 384), 'crop_size': (192, 192), 'batch_size': 4,
    'scale_min': 1.0, 'scale_max': 1.0, 'hflip': True, 'brightness': 0.0, 'contrast': 0.0,
    'saturation': 0.0, 'shuffle_buffer': 512, 'cache_decoded_mb': 2048, 'epochs': 64,
    'steps_per_epoch': None, 'optimizer': 'adamw', 'learning_rate': 0.0005, 'lr_scaling': 'none',
    'base_batch_size': 8, 'weight_decay': 0.0001, 'lr_schedule': 'cosine', 'warmup_epochs': 1.0,
    'clipnorm': None, 'ema_momentum': 0.999, 'class_weighting': 'inverse_sqrt',
    'max_class_weight': 10.0, 'aux_loss_weight': 1.0, 'logit_adjustment': 0.5,
    'calibration_split': 'train', 'early_stopping_patience': None,
    'early_stopping_min_delta': 0.0, 'eval_flip': True, 'eval_scales': (1.0,),
    'eval_batch_size': None, 'eval_every_epochs': 16, 'seed': 42, 'mixed_precision': 'auto',
    'strategy': 'auto', 'peer_timeout_seconds': 300, 'jit_compile': False, 'steps_per_loop': 10,
    'backup_every_steps': 100, 'num_summary_images': 3, 'profile_steps': None,
}
# The fields a resumed run could change before RESUMABLE moved onto the groups
# (train.RESUMABLE_CHANGES).
OLD_RESUMABLE_CHANGES = {
    'epochs', 'strategy', 'mixed_precision', 'peer_timeout_seconds', 'jit_compile',
    'steps_per_loop', 'backup_every_steps', 'num_summary_images', 'profile_steps',
    'cache_decoded_mb', 'shuffle_buffer', 'eval_batch_size', 'eval_every_epochs',
    'early_stopping_patience', 'early_stopping_min_delta', 'eval_flip', 'eval_scales',
    'logit_adjustment', 'calibration_split'}


def test_small_is_the_preset_before_grouping_plus_standardization():
  small = configs.get_config('small')
  assert set(configs.FLAT_NAMES) == set(OLD_FLAT_SMALL)
  for flat, value in OLD_FLAT_SMALL.items():
    got = configs.get(small, configs.FLAT_NAMES[flat])
    assert got == value and type(got) is type(value), (flat, configs.FLAT_NAMES[flat], got)
  assert configs.to_flat(small) == OLD_FLAT_SMALL
  # An old run's flat config.json predates data.standardize, so it reads back unstandardized, as
  # that run trained; today's preset differs from it in that one field.
  old = configs.from_dict(OLD_FLAT_SMALL, 'old')
  assert old.data.standardize is False and small.data.standardize is True
  assert old.replace(**{'data.standardize': True}) == small


def test_flat_names_cover_every_old_field_once_and_resumability_is_unchanged():
  # Every field but the ones added after the grouping has its old flat name.
  assert sorted(configs.FLAT_NAMES.values()) == sorted(
      set(configs.FIELDS) - {'data.batch_size_per_replica', 'data.standardize',
                             'runtime.formation_timeout_seconds'})
  assert len(configs.FLAT_NAMES) == 48
  assert {flat for flat, path in configs.FLAT_NAMES.items()
          if configs.resumable(path)} == OLD_RESUMABLE_CHANGES
  assert [name for name, group in configs.GROUPS.items() if group.RESUMABLE] == [
      'eval', 'trainer', 'runtime']


def test_config_json_round_trips_nested():
  small = configs.get_config('small')
  values = json.loads(small.to_json())
  assert values['model']['base_filters'] == 16 and values['data']['image_size'] == [288, 384]
  assert values['optimizer']['name'] == 'adamw' and values['eval']['flip'] is True
  assert configs.from_json(small.to_json(), 'config.json') == small
  assert configs.Config is configs.ExperimentConfig


@pytest.mark.parametrize('field, value', [
    ('data.batch_size', 0), ('trainer.epochs', 0), ('optimizer.learning_rate', 0.0),
    ('model.dropout', 1.0), ('model.depth', 0), ('model.base_filters', 0),
    ('data.scale_min', 2.0),  # Above scale_max.
    ('optimizer.weight_decay', -1e-4), ('loss.max_class_weight', 0.0),
    ('optimizer.clipnorm', 0.0), ('optimizer.base_batch_size', 0), ('eval.batch_size', 0),
    ('runtime.shuffle_buffer', 0), ('runtime.cache_decoded_mb', -1), ('data.brightness', -0.1),
    ('data.contrast', 1.5), ('data.saturation', 2.0), ('eval.num_summary_images', -1),
    ('trainer.profile_steps', (5, 2)), ('trainer.profile_steps', (-1, 2)),
    ('eval.logit_adjustment', 1.5), ('eval.calibration_split', ''), ('steps_per_epoch', 0),
    ('eval.every_epochs', -1),
    ('eval.scales', ()), ('eval.scales', (0.0, 1.0)), ('eval.scales', (4.5,)),
    ('eval.scales', (0.1, 1.0)),  # 288 x 0.1 is less than one 32-pixel stride of `small`.
])
def test_out_of_range_values_are_refused_by_dotted_name(field, value):
  config = configs.get_config('small')
  with pytest.raises(ValueError, match=rf'^{field}: .* is out of range( \(.*\))?$'):
    configs.validate(config.replace(**{field: value}))


def test_a_group_validates_its_own_fields():
  with pytest.raises(ValueError, match='^model.depth: 0 is out of range$'):
    configs.ModelConfig(depth=0).validate()
  configs.EvalConfig(scales=(0.5, 1.0)).validate()  # Against the image size: the experiment's.


def test_choices_are_defined_once_on_the_field():
  assert configs.choices('runtime.strategy') == ('auto', 'default', 'mirrored', 'multi_worker')
  assert configs.choices('runtime.mixed_precision') == (
      'auto', 'float32', 'mixed_float16', 'mixed_bfloat16')
  assert configs.choices('optimizer.name') == ('adamw', 'adam', 'sgd')
  assert configs.choices('model.stem_stride') == (1, 2)
  with pytest.raises(KeyError):
    configs.choices('model.depth')
  fields = configs.choice_fields()
  assert fields['model.stem_stride'] == (1, 2) and 'model.depth' not in fields
  assert fields == {path: configs.choices(path) for path in fields}
  small = configs.get_config('small')
  for field, value, allowed in (('optimizer.name', 'lamb', 'adamw, adam, sgd'),
                                ('model.stem_stride', 3, '1, 2'),
                                ('loss.class_weighting', 'x', 'none, median_frequency, ')):
    with pytest.raises(ValueError, match=rf'^{field}: {value!r} is not one of {allowed}'):
      configs.validate(small.replace(**{field: value}))


def test_task_enum_flags_take_their_choices_from_the_config():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from trainer import task  # pylint: disable=g-import-not-at-top,unused-import
  for flag, path in (('strategy', 'runtime.strategy'),
                     ('mixed_precision', 'runtime.mixed_precision')):
    assert tuple(flags.FLAGS[flag].parser.enum_values) == configs.choices(path)
  assert set(task.SHORTHANDS.values()) <= set(configs.FIELDS)


def test_values_that_need_another_field_name_both():
  config = configs.get_config('small')
  configs.validate(config.replace(**{'loss.aux_loss_weight': 1.0}))  # Fine with depth 4.
  # The deep-supervision heads need a decoder level besides the last.
  with pytest.raises(ValueError, match='^loss.aux_loss_weight: 1.0 needs model.depth >= 2, '
                     'not model.depth 1$'):
    configs.validate(config.replace(**{'loss.aux_loss_weight': 1.0, 'model.depth': 1}))
  # Training batches tile the stride; whole frames of another size are padded at inference.
  with pytest.raises(ValueError, match=r'^data.crop_size: 30x30 must be positive multiples of '
                     r'model.stem_stride \* 2\*\*model.depth = 32$'):
    configs.validate(config.replace(**{'data.crop_size': (30, 30)}))
  configs.validate(config.replace(**{'data.image_size': (360, 480)}))
  with pytest.raises(ValueError, match=r'^data.image_size: 360x480 must be positive multiples'):
    configs.validate(config.replace(**{'data.image_size': (360, 480), 'data.crop_size': None}))


@pytest.mark.parametrize('field, value', [
    ('optimizer.weight_decay', 0.0), ('loss.max_class_weight', 10.0), ('optimizer.clipnorm', 1.0),
    ('eval.batch_size', 1), ('runtime.cache_decoded_mb', 0), ('data.brightness', 1.0),
    ('data.contrast', 0.0), ('eval.num_summary_images', 0), ('trainer.profile_steps', (0, 0)),
    ('trainer.profile_steps', (3, 9)), ('eval.scales', (0.75, 1.0, 1.25)), ('eval.scales', (4.0,)),
    ('eval.scales', (0.12,)),  # 288 x 0.12 rounds to 35 pixels: one stride, padded to 64.
])
def test_boundary_values_are_accepted(field, value):
  configs.validate(configs.get_config('small').replace(**{field: value}))


def test_overrides_take_dotted_nested_and_flat_keys_alike():
  small = configs.get_config('small')
  expected = small.replace(**{'model.base_filters': 32, 'optimizer.name': 'sgd',
                              'eval.flip': False, 'seed': 7})
  assert expected.model.base_filters == 32 and expected.optimizer.name == 'sgd'
  for overrides in (
      {'model.base_filters': 32, 'optimizer.name': 'sgd', 'eval.flip': False, 'seed': 7},
      {'model': {'base_filters': 32}, 'optimizer': {'name': 'sgd'}, 'eval': {'flip': False},
       'seed': 7},
      {'base_filters': 32, 'optimizer': 'sgd', 'eval_flip': False, 'seed': 7},
      {'model': {'base_filters': 32}, 'optimizer.name': 'sgd', 'eval_flip': False, 'seed': 7},
  ):
    assert configs.override(small, overrides, 'hp.json') == expected, overrides
  # The tuner's best_hparams.json stays flat.
  tuned = configs.override(small, {'dropout': 0.25, 'learning_rate': 3e-4}, 'best_hparams.json')
  assert (tuned.model.dropout, tuned.optimizer.learning_rate) == (0.25, 3e-4)
  # Ints become floats, lists tuples; the original is left alone (frozen).
  assert configs.override(small, {'optimizer.learning_rate': 1}, 'x').optimizer.learning_rate == 1.0
  with pytest.raises(AttributeError):
    small.model.depth = 3  # pylint: disable=assigning-non-slot


def test_wrong_types_and_unknown_keys_name_the_source_and_the_key():
  small = configs.get_config('small')
  with pytest.raises(ValueError, match=r'^hp\.json: optimizer.weight_decay: expected float, '
                     r'got .abc.$'):
    configs.override(small, {'weight_decay': 'abc'}, 'hp.json')
  with pytest.raises(ValueError, match=r'^hp\.json: unknown key model.base_filterz \(known in '
                     r'model: base_filters, depth, dropout, stem_stride, sync_batchnorm, '
                     r'bn_momentum\)$'):
    configs.override(small, {'model.base_filterz': 32}, 'hp.json')
  with pytest.raises(ValueError, match=r'^hp\.json: unknown key model.base_filterz '):
    configs.override(small, {'model': {'base_filterz': 32}}, 'hp.json')
  with pytest.raises(ValueError, match=r'^hp\.json: unknown key wieght_decay \(known: groups '
                     r'model, data, optimizer, loss, eval, trainer, runtime; fields seed, '):
    configs.override(small, {'wieght_decay': 0.1}, 'hp.json')
  with pytest.raises(ValueError, match=r'^hp\.json: unknown key modle.depth '):
    configs.override(small, {'modle.depth': 2}, 'hp.json')
  with pytest.raises(ValueError, match=r'^hp\.json: model: expected a mapping of its fields'):
    configs.override(small, {'model': 3}, 'hp.json')
  with pytest.raises(ValueError, match=r'^hp\.json: model.dropout given twice \(as dropout and '
                     r'model.dropout\)$'):
    configs.override(small, {'dropout': 0.1, 'model.dropout': 0.2}, 'hp.json')
  # replace() takes dotted keys only.
  with pytest.raises(ValueError, match=r'^replace: unknown key depth '):
    small.replace(depth=2)


def test_eval_scales_take_a_list_of_any_length():
  small = configs.get_config('small')
  assert configs.Config().eval.scales == (1.0,)
  assert configs.override(small, {'eval.scales': [0.75, 1]}, 'hp.json').eval.scales == (0.75, 1.0)
  assert configs.override(small, {'eval_scales': [0.75, 1]}, 'hp.json').eval.scales == (0.75, 1.0)
  with pytest.raises(ValueError, match=r'^hp\.json: eval.scales: expected a list of one or more '):
    configs.override(small, {'eval.scales': []}, 'hp.json')
  with pytest.raises(ValueError, match=r'^hp\.json: eval.scales: expected float, got .x.$'):
    configs.override(small, {'eval_scales': [1, 'x']}, 'hp.json')
  # Fixed-length tuples still want exactly their length.
  with pytest.raises(ValueError, match=r'^hp\.json: trainer.profile_steps: expected a list of 2 '):
    configs.override(small, {'trainer.profile_steps': [1, 2, 3]}, 'hp.json')


def test_params_override_parses_yaml_values_and_lists_with_commas():
  parsed = configs.parse_params_override(
      'model.base_filters=32,optimizer.learning_rate=3e-4,eval.scales=[0.75,1.0],'
      'eval.calibration_split=train, eval.flip=true,loss.max_class_weight=null,'
      'trainer.profile_steps=[2, 5],optimizer.clipnorm=1')
  assert parsed == {'model.base_filters': 32, 'optimizer.learning_rate': 3e-4,
                    'eval.scales': [0.75, 1.0], 'eval.calibration_split': 'train',
                    'eval.flip': True, 'loss.max_class_weight': None,
                    'trainer.profile_steps': [2, 5], 'optimizer.clipnorm': 1}
  config = configs.override(configs.get_config('small'), parsed, '--params_override')
  assert config.eval.scales == (0.75, 1.0) and config.optimizer.clipnorm == 1.0
  assert config.trainer.profile_steps == (2, 5) and config.optimizer.learning_rate == 3e-4
  with pytest.raises(ValueError, match=r"^--params_override: expected key=value pairs separated "
                     r"by commas, got 'model.depth'$"):
    configs.parse_params_override('model.depth')
  with pytest.raises(ValueError, match=r'^--params_override: eval.scales: not a YAML value'):
    configs.parse_params_override('eval.scales=[0.75,1.0')


def test_params_override_file_holds_nested_or_dotted_keys(tmp_path):
  assert configs.is_params_file(str(tmp_path / 'o.yaml'))
  assert configs.is_params_file('gs://b/o.JSON') and not configs.is_params_file('a.yaml=1')
  text = ('model:\n  base_filters: 32\n  depth: 3\noptimizer.learning_rate: 3e-4\n'
          'eval:\n  scales: [0.75, 1.0]\n')
  values = configs.parse_params_file(text, 'o.yaml')
  config = configs.override(configs.get_config('small'), values, 'o.yaml')
  assert (config.model.base_filters, config.model.depth) == (32, 3)
  assert config.optimizer.learning_rate == 3e-4 and config.eval.scales == (0.75, 1.0)
  as_json = configs.parse_params_file(json.dumps({'model': {'base_filters': 32}}), 'o.json')
  assert as_json == {'model': {'base_filters': 32}}
  with pytest.raises(ValueError, match=r'^o\.yaml: expected a mapping'):
    configs.parse_params_file('- 1\n- 2\n', 'o.yaml')


def test_hparams_are_dotted_scalars_of_one_type_per_field():
  """Fields that may be None or are tuples are strings in every run, so columns keep a type."""
  base = configs.get_config('smoke')
  other = base.replace(**{'data.crop_size': (16, 16), 'eval.calibration_split': 'train',
                          'trainer.profile_steps': (2, 4), 'eval.scales': (0.5, 1.0)})
  first, second = configs.hparams(base), configs.hparams(other)
  assert list(first) == list(configs.FIELDS) == list(second)
  for path in configs.FIELDS:
    assert type(first[path]) is type(second[path]), path  # pylint: disable=unidiomatic-typecheck
    assert isinstance(first[path], (bool, int, float, str)), path
  assert (first['data.crop_size'], second['data.crop_size']) == ('None', '16x16')
  assert (first['data.image_size'], second['trainer.profile_steps']) == ('32x32', '2,4')
  assert (second['eval.scales'], second['eval.calibration_split']) == ('0.5,1.0', 'train')
  assert first['model.base_filters'] == 4 and first['runtime.strategy'] == 'auto'
