"""Tests of trainer/inference.py: the decision rule, the spec's record and its round trip."""

import json

import numpy as np
import pytest

from trainer import inference

SPEC = inference.Spec(class_names=('Road', 'Car', 'Pole'),
                      class_colors=((128, 64, 128), (0, 0, 142), (192, 192, 128)),
                      image_size=(32, 48), size_multiple=8, flip=True, scales=(0.75, 1.0),
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
  assert inference.read(str(tmp_path / inference.INFERENCE_NAME)) == SPEC


def test_records_without_the_newer_keys_still_read():
  record = SPEC.to_json()
  for key in ('size_multiple', 'scales', 'logit_bias', 'class_weights'):
    del record[key]
  spec = inference.Spec.from_json(record, 'labels.json')
  assert spec.scales == (1.0,) and spec.bias is None and spec.size_multiple == 1


@pytest.mark.parametrize('key, value, problem', [
    ('logit_bias', [1.0], '"logit_bias" must be null or a list of 3 numbers'),
    ('class_weights', 'x', '"class_weights" must be null or a list of 3 numbers'),
    ('size_multiple', 0, '"size_multiple" must be a positive integer'),
    ('scales', [], '"scales" must be a non-empty list'),
    ('image_size', [32], '"image_size" must be'),
])
def test_malformed_records_are_refused_by_name(tmp_path, key, value, problem):
  path = tmp_path / 'inference.json'
  path.write_text(json.dumps(SPEC.to_json() | {key: value}))
  with pytest.raises(ValueError, match=problem) as info:
    inference.read(str(path))
  assert str(info.value).startswith(str(path))
  with pytest.raises(ValueError, match='not found'):
    inference.read(str(tmp_path / 'missing.json'))
