"""Tests for trainer.losses: void handling, weighting and dtype, against hand-computed values."""

import math

import numpy as np
import pytest
import tensorflow as tf

from trainer import losses

LN2 = math.log(2.0)

# Hand case: one example, 1x3 pixels, 2 classes.
#   pixel 0: label 0, logits [0, 0]      -> p_true = 1/2, CE = ln 2
#   pixel 1: label 1, logits [ln 3, 0]   -> p_true = 1/(3+1) = 1/4, CE = ln 4 = 2 ln 2
#   pixel 2: void (255), logits [5, -5]  -> contributes nothing
# Unweighted: loss sum = 3 ln 2, weight sum = 2.
LABELS = np.array([[[0, 1, 255]]], np.uint8)
LOGITS = np.array([[[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]]]], np.float32)


def test_cross_entropy_matches_hand_computation():
  loss_sum, weight_sum = losses.pixel_loss_sum(LABELS, LOGITS)
  assert loss_sum.dtype == tf.float32 and weight_sum.dtype == tf.float32
  assert float(loss_sum) == pytest.approx(3 * LN2, rel=1e-6)
  assert float(weight_sum) == pytest.approx(2.0)
  assert float(losses.mean_pixel_loss(LABELS, LOGITS)) == pytest.approx(1.5 * LN2, rel=1e-6)


def test_class_weights_applied():
  # Weights [3, 0.5]: loss sum = 3 ln 2 + 0.5 * 2 ln 2 = 4 ln 2, weight sum = 3 + 0.5 = 3.5.
  loss_sum, weight_sum = losses.pixel_loss_sum(
      LABELS, LOGITS, class_weights=np.array([3.0, 0.5], np.float32))
  assert float(loss_sum) == pytest.approx(4 * LN2, rel=1e-6)
  assert float(weight_sum) == pytest.approx(3.5)


def test_void_pixels_change_neither_loss_nor_gradients():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 4, (2, 6, 6)).astype(np.int32)
  labels[0, :3] = 255
  labels[1, 2, 2] = 255
  void = labels == 255
  logits_a = rng.normal(size=(2, 6, 6, 4)).astype(np.float32)
  logits_b = logits_a.copy()
  logits_b[void] = rng.normal(size=(void.sum(), 4)) * 100  # Huge, different void logits.
  weights = np.array([1.0, 2.0, 0.5, 4.0], np.float32)

  def loss_and_grad(logits):
    logits = tf.constant(logits)
    with tf.GradientTape() as tape:
      tape.watch(logits)
      loss_sum, weight_sum = losses.pixel_loss_sum(labels, logits, class_weights=weights)
    return loss_sum.numpy(), weight_sum.numpy(), tape.gradient(loss_sum, logits).numpy()

  loss_a, wsum_a, grad_a = loss_and_grad(logits_a)
  loss_b, wsum_b, grad_b = loss_and_grad(logits_b)
  assert loss_a == pytest.approx(loss_b, rel=1e-6)
  assert wsum_a == wsum_b
  np.testing.assert_allclose(grad_a, grad_b, rtol=1e-6, atol=1e-7)
  assert np.all(grad_a[void] == 0.0)


def test_all_void_batch_gives_zero_without_nan():
  labels = np.full((2, 4, 4), 255, np.uint8)
  logits = tf.constant(np.random.default_rng(2).normal(size=(2, 4, 4, 3)).astype(np.float32))
  with tf.GradientTape() as tape:
    tape.watch(logits)
    loss_sum, weight_sum = losses.pixel_loss_sum(labels, logits, class_weights=[1.0, 2.0, 3.0])
    mean = losses.mean_pixel_loss(labels, logits)
  assert float(loss_sum) == 0.0 and float(weight_sum) == 0.0
  assert float(mean) == 0.0
  assert np.all(tape.gradient(loss_sum, logits).numpy() == 0.0)


def test_out_of_range_labels_are_void():
  labels = np.array([[[0, 1, 7]]], np.int32)  # 7 is not a class of a 2-class problem.
  loss_sum, weight_sum = losses.pixel_loss_sum(labels, LOGITS)
  assert float(loss_sum) == pytest.approx(3 * LN2, rel=1e-6)
  assert float(weight_sum) == pytest.approx(2.0)


def test_sample_weight_excludes_padded_example():
  labels = np.concatenate([LABELS, np.zeros_like(LABELS)])
  logits = np.concatenate([LOGITS, np.full_like(LOGITS, 7.0)])
  loss_sum, weight_sum = losses.pixel_loss_sum(labels, logits, sample_weight=[1.0, 0.0])
  assert float(loss_sum) == pytest.approx(3 * LN2, rel=1e-6)
  assert float(weight_sum) == pytest.approx(2.0)
  # Without it the padded example's 3 valid pixels (CE ln 2 each) count too.
  loss_sum, weight_sum = losses.pixel_loss_sum(labels, logits)
  assert float(loss_sum) == pytest.approx(6 * LN2, rel=1e-6)
  assert float(weight_sum) == pytest.approx(5.0)


@pytest.mark.parametrize('dtype', [tf.float16, tf.bfloat16])
def test_low_precision_logits_give_float32(dtype):
  logits = tf.cast(tf.constant(LOGITS), dtype)
  loss_sum, weight_sum = losses.pixel_loss_sum(LABELS, logits)
  assert loss_sum.dtype == tf.float32 and weight_sum.dtype == tf.float32
  assert losses.mean_pixel_loss(LABELS, logits).dtype == tf.float32
  assert float(loss_sum) == pytest.approx(3 * LN2, rel=1e-2)


def test_works_inside_tf_function():
  fn = tf.function(lambda l, x: losses.pixel_loss_sum(l, x, class_weights=[1.0, 1.0]))
  loss_sum, _ = fn(tf.constant(LABELS), tf.constant(LOGITS))
  assert float(loss_sum) == pytest.approx(3 * LN2, rel=1e-6)


# Class-weight hand case: counts [10, 30, 60, 0] -> total 100, freq [0.1, 0.3, 0.6] (class 3 has
# no pixels and always gets 1.0).
COUNTS = [10, 30, 60, 0]


def test_class_weights_none():
  np.testing.assert_array_equal(losses.class_weights_from_counts(COUNTS, 'none'), [1, 1, 1, 1])


def test_class_weights_median_frequency():
  # median freq = 0.3 -> [0.3/0.1, 0.3/0.3, 0.3/0.6] = [3, 1, 0.5]
  weights = losses.class_weights_from_counts(COUNTS, 'median_frequency')
  assert weights.dtype == np.float32
  np.testing.assert_allclose(weights, [3.0, 1.0, 0.5, 1.0], rtol=1e-6)
  np.testing.assert_allclose(
      losses.class_weights_from_counts(COUNTS, 'median_frequency', max_weight=2.0),
      [2.0, 1.0, 0.5, 1.0], rtol=1e-6)


def test_class_weights_inverse_sqrt():
  # S = sqrt(.1) + sqrt(.3) + sqrt(.6) = 0.316228 + 0.547723 + 0.774597 = 1.638548
  # w_c = 1 / (sqrt(f_c) * S) = [3.162278, 1.825742, 1.290994] / S = [1.929925, 1.114244, 0.787889]
  # Check: 0.1 * 1.929925 + 0.3 * 1.114244 + 0.6 * 0.787889 = 1.0 (pixel-weighted mean is 1).
  weights = losses.class_weights_from_counts(COUNTS, 'inverse_sqrt')
  np.testing.assert_allclose(weights, [1.929925, 1.114244, 0.787889, 1.0], rtol=1e-5)
  assert float(np.dot([0.1, 0.3, 0.6], weights[:3])) == pytest.approx(1.0, rel=1e-6)


def test_class_weights_validation():
  with pytest.raises(ValueError, match='median_frequency'):
    losses.class_weights_from_counts(COUNTS, 'log')
  with pytest.raises(ValueError):
    losses.class_weights_from_counts([1, -1], 'none')
  np.testing.assert_array_equal(
      losses.class_weights_from_counts([0, 0], 'median_frequency'), [1.0, 1.0])


def test_logit_adjustment_bias_undoes_log_weights():
  # -0.5 * ln([4, 1, 0.25]) = [-0.693147, 0, 0.693147]
  bias = losses.logit_adjustment_bias(np.array([4.0, 1.0, 0.25]), 0.5)
  assert bias.dtype == np.float32
  np.testing.assert_allclose(bias, [-0.693147, 0.0, 0.693147], rtol=1e-5, atol=1e-7)
  # Strength 1 turns weighted scores w_c * p_c back into p_c: log(w p) - log(w) = log(p).
  weights, probs = np.array([4.0, 1.0, 0.25]), np.array([0.1, 0.3, 0.6])
  adjusted = np.log(weights * probs) + losses.logit_adjustment_bias(weights, 1.0)
  np.testing.assert_allclose(adjusted, np.log(probs), rtol=1e-5)
  assert losses.logit_adjustment_bias(None, 0.5) is None
  assert losses.logit_adjustment_bias(weights, 0.0) is None
  with pytest.raises(ValueError, match='positive'):
    losses.logit_adjustment_bias(np.array([1.0, 0.0]), 0.5)


def test_cross_entropy_matches_tensorflow_kernel_in_value_and_gradient():
  rng = np.random.default_rng(5)
  labels = rng.integers(0, 6, (2, 5, 7))
  logits = tf.Variable(rng.normal(size=(2, 5, 7, 6)).astype(np.float32) * 4)
  with tf.GradientTape(persistent=True) as tape:
    ours, _ = losses.pixel_loss_sum(labels, logits)
    reference = tf.reduce_sum(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))
  assert float(ours) == pytest.approx(float(reference), rel=1e-5)
  np.testing.assert_allclose(tape.gradient(ours, logits).numpy(),
                             tape.gradient(reference, logits).numpy(), atol=1e-6)


def test_loss_agrees_on_logits_and_log_probabilities():
  rng = np.random.default_rng(6)
  labels = rng.integers(0, 5, (2, 6, 4))
  labels[1, :2] = 255
  logits = (rng.normal(size=(2, 6, 4, 5)) * 3).astype(np.float32)
  weights = np.array([0.5, 1.0, 2.0, 3.0, 1.5], np.float32)
  fn = lambda l, g, **k: losses.pixel_loss_sum(l, g, class_weights=weights, **k)[0]
  shared = fn(labels, losses.log_probabilities(logits), normalized=True)
  assert float(shared) == pytest.approx(float(fn(labels, logits)), rel=1e-5)
  assert float(shared) > 0
