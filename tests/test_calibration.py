"""Per-class decision bias fitting (trainer/calibration.py): hand cases and a brute-force check."""

import json

import numpy as np
import pytest

from trainer import calibration
from trainer import metrics


def _brute_force(scores, labels, c, grid):
  """The sweep the slow way: one argmax and confusion matrix per grid offset."""
  num_classes = scores.shape[1]
  out = []
  for offset in grid:
    shifted = scores.copy()
    shifted[:, c] += offset
    cm = calibration.confusion(labels, shifted.argmax(1), num_classes)
    out.append(metrics.mean_iou(cm))
  return np.array(out)


@pytest.mark.parametrize('c', [0, 2, 4])
def test_one_pass_sweep_matches_brute_force(c):
  rng = np.random.default_rng(c)
  scores = rng.normal(size=(3000, 5)).astype(np.float32)
  labels = rng.integers(0, 5, size=3000)
  scores[np.arange(3000), labels] += 1.0  # Informative but imperfect scores.
  grid = np.round(np.arange(-2.0, 2.0001, 0.1), 6)
  fast = calibration._sweep_class(scores, labels, c, grid)  # pylint: disable=protected-access
  np.testing.assert_allclose(fast, _brute_force(scores, labels, c, grid), atol=1e-12)


def test_recovers_the_offset_of_an_under_predicted_class():
  # Class 1 is the truth exactly where x > 0, but its logit is x - 1: without calibration every
  # pixel with 0 < x < 1 is called class 0. An offset of about +1 on class 1 (or -1 on class 0)
  # makes every pixel right.
  rng = np.random.default_rng(0)
  x = rng.uniform(0.15, 3, size=4000) * rng.choice([-1, 1], size=4000)
  logits = np.stack([np.zeros_like(x), x - 1], axis=1).astype(np.float32)
  labels = (x > 0).astype(np.int64)
  before = metrics.mean_iou(calibration.confusion(labels, logits.argmax(1), 2))
  bias = calibration.fit_bias(logits, labels)
  after = metrics.mean_iou(calibration.confusion(labels, (logits + bias).argmax(1), 2))
  assert before < 0.8 and after == 1.0
  assert 0.85 <= bias[1] - bias[0] <= 1.15


def test_never_worse_than_the_start_and_keeps_a_perfect_start():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(5000, 4)).astype(np.float32)
  labels = rng.integers(0, 4, size=5000)
  start = np.array([0.3, -0.2, 0.0, 0.1], np.float32)
  bias = calibration.fit_bias(logits, labels, start)
  score = lambda b: metrics.mean_iou(  # pylint: disable=g-long-lambda
      calibration.confusion(labels, (logits + b).argmax(1), 4))
  assert score(bias) >= score(start)
  # Perfect logits: no change can gain, so the start is returned unchanged.
  perfect = np.eye(4, dtype=np.float32)[labels] * 5
  np.testing.assert_array_equal(calibration.fit_bias(perfect, labels, start), start)
