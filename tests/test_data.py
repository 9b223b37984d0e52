"""Input pipeline tests: shapes, exact masks, exactly-once sharding with padding, resume skip."""

import collections

import numpy as np
import pytest
import tensorflow as tf

from tfrecords_builder import features
from tfrecords_builder import manifest as manifest_lib
from trainer import configs
from trainer import data
from trainer import inference


def _config(**kw):
  return configs.get_config('smoke').replace(**kw)


def _ctx(num_pipelines, pipeline_id, replicas_per_pipeline=1):
  return tf.distribute.InputContext(num_input_pipelines=num_pipelines,
                                    input_pipeline_id=pipeline_id,
                                    num_replicas_in_sync=num_pipelines * replicas_per_pipeline)


@pytest.fixture
def decoded_ids(monkeypatch):
  """Counts, by source id, every record the pipelines decode (through features.parse_example)."""
  seen = collections.Counter()
  original = features.parse_example

  def spy(record):
    example = original(record)
    tf.py_function(lambda s: seen.update([s.numpy().decode()]), [example['source_id']], [])
    return example

  monkeypatch.setattr(data.features, 'parse_example', spy)
  return seen


def _source_masks(manifest, split):
  out = {}
  for path in manifest.shard_paths(split):
    for record in tf.data.TFRecordDataset(path):
      ex = features.parse_example(record)
      out[ex['source_id'].numpy().decode()] = ex['mask'].numpy()
  return out


def test_train_batches_have_model_shapes_and_valid_labels(smoke_data):
  manifest = manifest_lib.read(str(smoke_data))
  config = _config(**{'data.image_size': (32, 48), 'data.batch_size': 4})
  batches = list(data.train_dataset(manifest, config, epoch=0))
  assert len(batches) == 6  # 24 examples / 4.
  for batch in batches:
    assert batch['image'].shape == (4, 32, 48, 3) and batch['image'].dtype == tf.float32
    assert batch['mask'].shape == (4, 32, 48) and batch['mask'].dtype == tf.uint8
    image = batch['image'].numpy()
    assert image.min() >= 0.0 and image.max() <= 1.0
    values = set(np.unique(batch['mask'].numpy()))
    assert values <= set(range(11)) | {255}


def test_augmentation_never_invents_labels(smoke_data):
  """Nearest-neighbour masks: every label in a crop exists in its source frame (or is void)."""
  manifest = manifest_lib.read(str(smoke_data))
  sources = _source_masks(manifest, 'train')
  all_labels = set().union(*(set(np.unique(m)) for m in sources.values()))
  config = _config(**{
      'data.image_size': (32, 32), 'data.batch_size': 4, 'data.scale_min': 0.5,
      'data.scale_max': 2.0})
  for batch in data.train_dataset(manifest, config, epoch=3):
    assert set(np.unique(batch['mask'].numpy())) <= all_labels | {255}


@pytest.mark.parametrize('cache_mb', [2048, 0], ids=['cached', 'streamed'])
def test_epochs_differ_and_reruns_repeat(smoke_data, cache_mb):
  manifest = manifest_lib.read(str(smoke_data))
  config = _config(**{'data.batch_size': 4, 'runtime.cache_decoded_mb': cache_mb})
  first = [b['image'].numpy() for b in data.train_dataset(manifest, config, epoch=0)]
  again = [b['image'].numpy() for b in data.train_dataset(manifest, config, epoch=0)]
  other = [b['image'].numpy() for b in data.train_dataset(manifest, config, epoch=1)]
  np.testing.assert_array_equal(np.stack(first), np.stack(again))
  assert not np.array_equal(np.stack(first), np.stack(other))


@pytest.mark.parametrize('cache_mb', [2048, 0], ids=['cached', 'streamed'])
def test_skip_resumes_the_same_stream(smoke_data, cache_mb):
  manifest = manifest_lib.read(str(smoke_data))
  config = _config(**{'data.batch_size': 4, 'runtime.cache_decoded_mb': cache_mb})
  full = list(data.train_dataset(manifest, config, epoch=2))
  tail = list(data.train_dataset(manifest, config, epoch=2, skip_steps=4))
  assert len(tail) == len(full) - 4
  for a, b in zip(full[4:], tail):
    np.testing.assert_array_equal(a['image'].numpy(), b['image'].numpy())
    np.testing.assert_array_equal(a['mask'].numpy(), b['mask'].numpy())


@pytest.mark.parametrize('cache_mb', [2048, 0], ids=['cached', 'streamed'])
def test_one_dataset_of_several_epochs_is_the_epochs_in_a_row(smoke_data, cache_mb):
  """The trainer's single multi-epoch dataset = its per-epoch datasets, resume skip included."""
  manifest = manifest_lib.read(str(smoke_data))
  config = _config(**{'data.batch_size': 4, 'runtime.cache_decoded_mb': cache_mb})
  train_input = data.TrainInput(manifest, config)
  joined = list(train_input(epoch=1, skip_steps=2, num_epochs=3))
  parts = (list(train_input(epoch=1, skip_steps=2)) + list(train_input(epoch=2)) +
           list(train_input(epoch=3)))
  assert len(joined) == len(parts) == 4 + 6 + 6
  for a, b in zip(joined, parts):
    np.testing.assert_array_equal(a['image'].numpy(), b['image'].numpy())
    np.testing.assert_array_equal(a['mask'].numpy(), b['mask'].numpy())


def test_a_multi_epoch_dataset_decodes_each_frame_once(smoke_data, decoded_ids):
  manifest = manifest_lib.read(str(smoke_data))
  train_input = data.TrainInput(manifest, _config(**{'data.batch_size': 4}))
  assert sum(1 for _ in train_input(num_epochs=3)) == 18
  assert len(decoded_ids) == 24 and set(decoded_ids.values()) == {1}


@pytest.mark.parametrize('num_pipelines, expect_record_level', [(1, False), (2, False),
                                                                (3, True), (4, True)])
def test_eval_counts_every_example_exactly_once(smoke_data, num_pipelines, expect_record_level):
  """Across workers every val example appears once; padding is masked and all workers agree on
  the number of steps. 2 val shards: up to 2 workers shard by file, more by record."""
  manifest = manifest_lib.read(str(smoke_data))
  share = data.pipeline_share(manifest, 'val', num_pipelines, 0)
  assert share.record_level == expect_record_level
  config = _config(**{'data.batch_size': 2 * num_pipelines})
  seen = collections.Counter()
  steps = set()
  valid_total = 0
  for i in range(num_pipelines):
    batches = list(data.eval_dataset(manifest, 'val', config, _ctx(num_pipelines, i),
                                     with_source_ids=True))
    steps.add(len(batches))
    for batch in batches:
      valid = batch['valid'].numpy()
      valid_total += valid.sum()
      seen.update(s.decode() for s, v in zip(batch['source_id'].numpy(), valid) if v)
      padded = batch['mask'].numpy()[~valid]
      assert (padded == 255).all()
  assert len(steps) == 1
  assert valid_total == 6 and set(seen.values()) == {1}
  assert set(seen) == set(_source_masks(manifest, 'val'))


@pytest.mark.parametrize('cache_mb', [2048, 0], ids=['cached', 'streamed'])
@pytest.mark.parametrize('num_pipelines', [2, 4])
def test_train_reads_every_example_once_per_epoch(smoke_data, num_pipelines, cache_mb,
                                                  decoded_ids):
  """Counts source ids through the real training pipeline (augmentation off the id path)."""
  manifest = manifest_lib.read(str(smoke_data))
  config = _config(**{'data.batch_size': 2 * num_pipelines, 'runtime.cache_decoded_mb': cache_mb})
  lengths = set()
  for i in range(num_pipelines):
    lengths.add(sum(1 for _ in data.train_dataset(manifest, config, _ctx(num_pipelines, i))))
  assert len(lengths) == 1
  assert set(decoded_ids.values()) == {1} and len(decoded_ids) == 24


def test_eval_keeps_label_resolution(smoke_data):
  manifest = manifest_lib.read(str(smoke_data))
  config = _config(**{'data.image_size': (32, 32), 'data.batch_size': 4})
  batch = next(iter(data.eval_dataset(manifest, 'val', config)))
  assert batch['image'].shape == (4, 32, 32, 3)
  assert batch['mask'].shape == (4, 48, 64)


def test_batch_must_divide_across_replicas():
  with pytest.raises(ValueError, match='not divisible by the 3 replicas'):
    data.check_batch(8, 3, '--batch_size')


def test_cache_decodes_each_frame_once_across_epochs(smoke_data, decoded_ids):
  manifest = manifest_lib.read(str(smoke_data))
  for cache_mb, expected in ((2048, 1), (0, 3)):
    decoded_ids.clear()
    train_input = data.TrainInput(manifest, _config(**{
        'data.batch_size': 4, 'runtime.cache_decoded_mb': cache_mb}))
    assert train_input.caches() == bool(cache_mb)
    for epoch in range(3):
      assert sum(1 for _ in train_input(epoch=epoch)) == 6
    assert len(decoded_ids) == 24 and set(decoded_ids.values()) == {expected}


def _frame(height=36, width=48):
  """A frame whose mask has a distinct label per 6x6 block (so misplaced pixels show)."""
  rng = np.random.default_rng(0)
  mask = (np.arange(height)[:, None] // 6 * 8 + np.arange(width)[None, :] // 6) % 11
  return rng.integers(0, 256, (height, width, 3), np.uint8), mask.astype(np.uint8)


def _plain(**kw):
  return _config(**{
      'data.hflip': False, 'data.brightness': 0.0, 'data.contrast': 0.0,
      'data.saturation': 0.0}, **kw)


def test_augment_at_scale_one_is_the_whole_frame_resized():
  image, mask = _frame()
  config = _plain(**{'data.image_size': (24, 32), 'data.scale_min': 1.0, 'data.scale_max': 1.0})
  out = data.augment(tf.constant(image), tf.constant(mask), tf.constant([1, 2], tf.int64), config)
  want_mask = tf.image.resize(mask[..., None], (24, 32), method='nearest')[..., 0]
  # Shrinking by less than 2x (36x48 -> 24x32) uses plain bilinear.
  want_image = tf.image.resize(image / 255.0, (24, 32))
  np.testing.assert_array_equal(out['mask'].numpy(), want_mask.numpy())
  np.testing.assert_allclose(out['image'].numpy(), want_image.numpy(), atol=1e-5)


def test_augment_antialiases_only_when_shrinking_more_than_2x():
  image, mask = _frame()
  config = _plain(**{
      'data.image_size': (12, 16), 'data.scale_min': 1.0, 'data.scale_max': 1.0})  # 3x smaller.
  out = data.augment(tf.constant(image), tf.constant(mask), tf.constant([1, 2], tf.int64), config)
  want_image = tf.image.resize(image / 255.0, (12, 16), antialias=True)
  np.testing.assert_allclose(out['image'].numpy(), want_image.numpy(), atol=1e-5)
  aliased = tf.image.resize(image / 255.0, (12, 16)).numpy()
  assert np.abs(out['image'].numpy() - aliased).max() > 0.05
  want_mask = tf.image.resize(mask[..., None], (12, 16), method='nearest')[..., 0]
  np.testing.assert_array_equal(out['mask'].numpy(), want_mask.numpy())


@pytest.mark.parametrize('source,size', [((36, 48), (24, 32)), ((37, 50), (13, 71)),
                                         ((5, 7), (40, 3)), ((360, 480), (144, 193))])
def test_resize_nearest_matches_tf_image_resize(source, size):
  mask = np.random.default_rng(1).integers(0, 256, source, np.uint8)
  want = tf.image.resize(mask[..., None], size, method='nearest')[..., 0].numpy()
  got = data._resize_nearest(tf.constant(mask), tf.constant(size)).numpy()  # pylint: disable=protected-access
  np.testing.assert_array_equal(got, want)


def test_augment_below_scale_one_pads_with_void():
  image, mask = _frame()
  config = _plain(**{'data.image_size': (24, 32), 'data.scale_min': 0.5, 'data.scale_max': 0.5})
  out = data.augment(tf.constant(image), tf.constant(mask), tf.constant([3, 4], tf.int64), config)
  want = tf.image.resize(mask[..., None], (12, 16), method='nearest')[..., 0].numpy()
  got = out['mask'].numpy()
  np.testing.assert_array_equal(got[:12, :16], want)
  assert (got[12:] == 255).all() and (got[:, 16:] == 255).all()
  assert (out['image'].numpy()[12:] == 0).all()


def test_augment_above_scale_one_crops_the_scaled_frame():
  """At scale 2 every crop equals the same window of the frame resized to 2x image_size."""
  image, mask = _frame()
  config = _plain(**{'data.image_size': (18, 24), 'data.scale_min': 2.0, 'data.scale_max': 2.0})
  scaled = tf.image.resize(mask[..., None], (36, 48), method='nearest')[..., 0].numpy()
  windows = {scaled[t:t + 18, l:l + 24].tobytes() for t in range(19) for l in range(25)}
  for seed in range(5):
    out = data.augment(tf.constant(image), tf.constant(mask),
                       tf.constant([seed, 9], tf.int64), config)
    assert out['mask'].numpy().tobytes() in windows


def test_crop_size_sets_the_training_crop_but_not_the_scale():
  image, mask = _frame()
  config = _plain(**{
      'data.image_size': (24, 32), 'data.crop_size': (8, 16), 'data.scale_min': 1.0,
      'data.scale_max': 1.0})
  whole = tf.image.resize(mask[..., None], (24, 32), method='nearest')[..., 0].numpy()
  windows = {whole[t:t + 8, l:l + 16].tobytes() for t in range(17) for l in range(17)}
  for seed in range(4):
    out = data.augment(tf.constant(image), tf.constant(mask),
                       tf.constant([seed, 1], tf.int64), config)
    assert out['image'].shape == (8, 16, 3)
    assert out['mask'].numpy().tobytes() in windows


def test_photometric_equals_tf_image_ops_in_sequence():
  """The fused batch pass = flip, brightness, contrast, grey-blend saturation, clip, per image."""
  rng = np.random.default_rng(5)
  image = rng.uniform(0, 255, (3, 6, 8, 3)).astype(np.float32)
  mask = rng.integers(0, 12, (3, 6, 8)).astype(np.uint8)
  flip = np.array([True, False, True])
  jitter = np.array([[0.08, 1.1, 0.9], [-0.05, 0.9, 1.2], [0.0, 1.0, 1.0]], np.float32)
  out = data.photometric({'image': tf.constant(image), 'mask': tf.constant(mask),
                          'flip': tf.constant(flip), 'jitter': tf.constant(jitter)})
  for i in range(3):
    x, m = image[i] / 255.0, mask[i]
    if flip[i]:
      x, m = x[:, ::-1], m[:, ::-1]
    x = tf.image.adjust_contrast(tf.image.adjust_brightness(x, jitter[i, 0]), jitter[i, 1])
    grey = tf.image.rgb_to_grayscale(x)
    want = tf.clip_by_value(grey + jitter[i, 2] * (x - grey), 0.0, 1.0)
    np.testing.assert_allclose(out['image'][i].numpy(), want.numpy(), atol=1e-5)
    np.testing.assert_array_equal(out['mask'][i].numpy(), m)


@pytest.mark.parametrize('cache_mb', [2048, 0], ids=['cached', 'streamed'])
def test_standardized_batches_ignore_a_global_brightness_and_contrast_change(darkened_data,
                                                                             cache_mb):
  """data.standardize: a frame and its 0.6 x + 13 copy make the same batches (same seed)."""
  original, darkened = (manifest_lib.read(str(d)) for d in darkened_data)
  # The smoke preset's random scales, crops and flips; no colour jitter, whose clip at 0 and 1
  # is not invariant.
  config = _config(**{'data.brightness': 0.0, 'data.contrast': 0.0, 'data.saturation': 0.0})

  def images(manifest, standardize):
    batches = data.train_dataset(manifest, config.replace(**{
        'data.standardize': standardize, 'runtime.cache_decoded_mb': cache_mb}))
    return np.concatenate([batch['image'].numpy() for batch in batches])

  np.testing.assert_allclose(images(darkened, True), images(original, True), atol=1e-4)
  assert np.abs(images(darkened, False) - images(original, False)).max() > 0.1


def _two_tone_frame():
  """_frame() with its top half darker, so a crop's statistics differ from the frame's."""
  image, mask = _frame()
  image[:18] //= 3
  return image, mask


def test_a_standardized_crop_is_a_window_of_the_standardized_whole_frame():
  image, mask = _two_tone_frame()
  config = _plain(**{'data.image_size': (36, 48), 'data.crop_size': (12, 16),
                     'data.scale_min': 1.0, 'data.scale_max': 1.0, 'data.standardize': True})
  whole = inference.standardize(image / 255.0).numpy()
  windows = {(t, l): whole[t:t + 12, l:l + 16] for t in range(25) for l in range(33)}
  for seed in range(4):
    out = data.augment(tf.constant(image), tf.constant(mask),
                       tf.constant([seed, 5], tf.int64), config)['image'].numpy()
    (top, left), window = min(windows.items(), key=lambda kv: np.abs(kv[1] - out).max())
    np.testing.assert_allclose(out, window, atol=1e-5)
    crop_alone = inference.standardize(image[top:top + 12, left:left + 16] / 255.0).numpy()
    assert np.abs(out - crop_alone).max() > 0.1, 'degenerate test: crop and frame alike'


def test_standardized_crops_are_padded_with_the_frame_mean():
  """Below scale 1 the padding standardizes to 0, whatever the frame's brightness."""
  image, mask = _two_tone_frame()
  config = _plain(**{'data.image_size': (24, 32), 'data.scale_min': 0.5, 'data.scale_max': 0.5,
                     'data.standardize': True})
  out = data.augment(tf.constant(image), tf.constant(mask), tf.constant([3, 4], tf.int64),
                     config)['image'].numpy()
  np.testing.assert_allclose(out[12:], 0.0, atol=1e-5)
  np.testing.assert_allclose(out[:, 16:], 0.0, atol=1e-5)
  assert np.abs(out[:12, :16]).max() > 0.5  # The scaled frame itself, standardized.


def test_standardize_follows_the_colour_jitter_on_the_whole_frame():
  """The crop is the whole frame standardized after brightness, contrast and saturation."""
  image, mask = _two_tone_frame()
  config = _plain(**{'data.image_size': (36, 48), 'data.scale_min': 1.0,
                     'data.scale_max': 1.0}).replace(**{
                         'data.brightness': 0.3, 'data.contrast': 0.5, 'data.saturation': 0.5})
  for seed in range(3):
    seed = tf.constant([seed, 7], tf.int64)
    delta, contrast, saturation = data.geometric(image, mask, seed, config)['jitter'].numpy()
    out = data.augment(tf.constant(image), tf.constant(mask), seed,
                       config.replace(**{'data.standardize': True}))['image'].numpy()
    x = tf.image.adjust_contrast(tf.image.adjust_brightness(image / 255.0, delta), contrast)
    grey = tf.image.rgb_to_grayscale(x)
    x = tf.clip_by_value(grey + saturation * (x - grey), 0.0, 1.0)
    np.testing.assert_allclose(out, inference.standardize(x).numpy(), atol=1e-4)
    assert abs(delta) > 0.01 and abs(contrast - 1) > 0.01


def test_summary_frames_go_round_robin_over_drives_evenly_spaced_within_each():
  names = ([f'0001TP_{i:03d}' for i in range(10)] + [f'0006R0_{i:03d}' for i in range(5)] +
           ['Seq05VD_000', 'noprefix'])
  order = np.random.default_rng(0).permutation(len(names))
  shuffled = [names[i] for i in order]  # Record order is not name order.
  picked = [shuffled[i] for i in data.spread_picks(shuffled, 7)]
  # Drives in name order (a name without a drive prefix is a drive of its own, named '').
  assert picked == ['noprefix', '0001TP_001', '0006R0_001', 'Seq05VD_000', '0001TP_005',
                    '0006R0_003', '0001TP_008']
  # One drive: its start, middle and end.
  one = [f'0016E5_{i:05d}' for i in range(101)]
  assert data.spread_picks(one, 3) == [16, 50, 84]
  assert sorted(data.spread_picks(one[:4], 9)) == [0, 1, 2, 3]  # No frame twice.
  assert data.spread_picks(one, 0) == [] and data.spread_picks([], 3) == []


def test_summary_examples_are_the_spread_picks_decoded(smoke_data):
  manifest = manifest_lib.read(str(smoke_data))
  examples = data.summary_examples(manifest, 'val', _config(), 2)
  ids = [features.parse_example(r)['source_id'].numpy().decode()
         for r in tf.data.TFRecordDataset(manifest.shard_paths('val'))]
  assert [e['source_id'] for e in examples] == [ids[i] for i in data.spread_picks(ids, 2)]
  assert [e['index'] for e in examples] == data.spread_picks(ids, 2)
  masks = _source_masks(manifest, 'val')
  for example in examples:
    assert example['image'].shape == (32, 32, 3) and example['split_size'] == 6
    np.testing.assert_array_equal(example['mask'], masks[example['source_id']])
