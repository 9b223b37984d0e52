"""Tests of trainer/inference.py: the decision rule, standardization, the spec's record."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import inference
from trainer import model as model_lib

SPEC = inference.Spec(class_names=('Road', 'Car', 'Pole'),
                      class_colors=((128, 64, 128), (0, 0, 142), (192, 192, 128)),
                      image_size=(32, 48), size_multiple=8, standardize=True, flip=True,
                      scales=(0.75, 1.0),
                      bias=(0.5, -0.25, 0.0), class_weights=(1.0, 2.0, 4.0), ignore_label=255)


def test_class_ids_is_the_argmax_after_the_bias():
  logits = np.array([[[1.0, 1.2, 0.0], [0.0, 0.1, 0.2], [2.0, 0.0, 2.6]]], np.float32)
  # Hand-computed: + (0.5, -0.25, 0) -> [1.5, 0.95, 0], [0.5, -0.15, 0.2], [2.5, -0.25, 2.6].
  np.testing.assert_array_equal(inference.class_ids(logits, SPEC.bias).numpy(), [[0, 0, 2]])
  np.testing.assert_array_equal(inference.class_ids(logits, None).numpy(), [[1, 2, 2]])


def test_spec_round_trips_through_its_record(tmp_path):
  inference.write(str(tmp_path), SPEC)
  record = json.loads((tmp_path / inference.INFERENCE_NAME).read_text())
  # The export's labels.json keys, which serving clients read.
  assert record['classes'][2] == {'index': 2, 'name': 'Pole', 'color': [192, 192, 128]}
  assert record['logit_bias'] == [0.5, -0.25, 0.0] and record['scales'] == [0.75, 1.0]
  assert record['standardize'] is True
  assert inference.read(str(tmp_path / inference.INFERENCE_NAME)) == SPEC


def test_records_without_the_newer_keys_still_read():
  record = SPEC.to_json()
  for key in ('size_multiple', 'standardize', 'scales', 'logit_bias', 'class_weights'):
    del record[key]
  spec = inference.Spec.from_json(record, 'labels.json')
  assert spec.scales == (1.0,) and spec.bias is None and spec.size_multiple == 1
  assert spec.standardize is False


@pytest.mark.parametrize('key, value, problem', [
    ('logit_bias', [1.0], '"logit_bias" must be null or a list of 3 numbers'),
    ('class_weights', 'x', '"class_weights" must be null or a list of 3 numbers'),
    ('size_multiple', 0, '"size_multiple" must be a positive integer'),
    ('scales', [], '"scales" must be a non-empty list'),
    ('image_size', [32], '"image_size" must be'),
    ('standardize', 1, '"standardize" must be true or false'),
])
def test_malformed_records_are_refused_by_name(tmp_path, key, value, problem):
  path = tmp_path / 'inference.json'
  path.write_text(json.dumps(SPEC.to_json() | {key: value}))
  with pytest.raises(ValueError, match=problem) as info:
    inference.read(str(path))
  assert str(info.value).startswith(str(path))
  with pytest.raises(ValueError, match='not found'):
    inference.read(str(tmp_path / 'missing.json'))


def test_standardize_is_per_frame_over_all_pixels_and_channels():
  rng = np.random.default_rng(0)
  frames = rng.uniform(0, 1, (2, 5, 7, 3)).astype(np.float32)
  frames[1] = 0.5  # A flat frame: its deviation is floored at 1/sqrt(5 * 7 * 3), not 0.
  out = inference.standardize(frames).numpy()
  want = (frames[0] - frames[0].mean()) / frames[0].std()
  np.testing.assert_allclose(out[0], want, atol=1e-5)
  np.testing.assert_array_equal(out[1], 0.0)


@pytest.mark.parametrize('scales, multiple', [((1.0,), 1), ((0.6, 1.0), 4)])
def test_standardized_logits_ignore_a_global_brightness_and_contrast_change(scales, multiple):
  """The same logits for a frame and its 0.6 x + 0.05 copy, with test-time scales too."""
  keras.utils.set_random_seed(0)
  model = model_lib.build_unet(num_classes=3, image_size=(32, 48), base_filters=4, depth=2,
                               dropout=0.0, any_size=multiple > 1)
  frames = np.random.default_rng(1).uniform(0, 1, (2, 32, 48, 3)).astype(np.float32)
  darker = frames * 0.6 + 0.05
  spec = SPEC.replace(size_multiple=multiple, flip=False, scales=scales)
  logits = lambda x, standardize: inference.logits(
      model, tf.constant(x), spec.replace(standardize=standardize), (40, 60)).numpy()
  np.testing.assert_allclose(logits(darker, True), logits(frames, True), atol=1e-4)
  assert np.abs(logits(darker, False) - logits(frames, False)).max() > 1e-2
