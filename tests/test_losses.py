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


def test_focal_matches_hand_computation_and_is_at_most_ce():
  # gamma 2: pixel 0 (1 - 1/2)^2 ln 2 = ln2 / 4; pixel 1 (1 - 1/4)^2 * 2 ln 2 = 9/8 ln 2.
  # Sum = 11/8 ln 2.
  loss_sum, weight_sum = losses.pixel_loss_sum(LABELS, LOGITS, loss_type='focal')
  assert float(loss_sum) == pytest.approx(11 / 8 * LN2, rel=1e-6)
  assert float(weight_sum) == pytest.approx(2.0)

  rng = np.random.default_rng(0)
  labels = rng.integers(0, 5, (2, 8, 8))
  logits = rng.normal(size=(2, 8, 8, 5)).astype(np.float32) * 3
  ce, _ = losses.pixel_loss_sum(labels, logits)
  focal, _ = losses.pixel_loss_sum(labels, logits, loss_type='focal', focal_gamma=2.0)
  focal0, _ = losses.pixel_loss_sum(labels, logits, loss_type='focal', focal_gamma=0.0)
  assert float(focal) <= float(ce)
  assert float(focal0) == pytest.approx(float(ce), rel=1e-6)


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
      loss_sum, weight_sum = losses.pixel_loss_sum(labels, logits, class_weights=weights,
                                                   loss_type='focal')
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


@pytest.mark.parametrize('gamma', [0.0, 0.5, 2.0])
def test_focal_gradients_finite_for_confident_pixels(gamma):
  # p_true rounds to exactly 1 here (valid pixel) and for the void pixel's stand-in class 0;
  # d/dx x**gamma at x = 0 would be NaN or inf for gamma < 1.
  labels = np.array([[[0, 255]]], np.int32)
  logits = tf.constant([[[[100.0, -100.0], [100.0, -100.0]]]])
  with tf.GradientTape() as tape:
    tape.watch(logits)
    loss_sum, _ = losses.pixel_loss_sum(labels, logits, loss_type='focal', focal_gamma=gamma)
  grad = tape.gradient(loss_sum, logits).numpy()
  assert float(loss_sum) == pytest.approx(0.0, abs=1e-6)
  assert np.all(np.isfinite(grad))


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
  loss_sum, weight_sum = losses.pixel_loss_sum(LABELS, logits, loss_type='focal')
  assert loss_sum.dtype == tf.float32 and weight_sum.dtype == tf.float32
  assert losses.mean_pixel_loss(LABELS, logits).dtype == tf.float32
  assert float(loss_sum) == pytest.approx(11 / 8 * LN2, rel=1e-2)


def test_works_inside_tf_function():
  fn = tf.function(lambda l, x: losses.pixel_loss_sum(l, x, class_weights=[1.0, 1.0]))
  loss_sum, _ = fn(tf.constant(LABELS), tf.constant(LOGITS))
  assert float(loss_sum) == pytest.approx(3 * LN2, rel=1e-6)


def test_unknown_loss_type_raises():
  with pytest.raises(ValueError, match='focal'):
    losses.pixel_loss_sum(LABELS, LOGITS, loss_type='dice')


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


def _lovasz_reference(labels, probs, ignore_label=255):
  """The paper's algorithm for one batch, in numpy (Berman et al. 2018, 'present' classes)."""
  labels = labels.reshape(-1)
  probs = probs.reshape(-1, probs.shape[-1])
  keep = labels != ignore_label
  labels, probs = labels[keep], probs[keep]
  losses_per_class = []
  for c in range(probs.shape[1]):
    fg = (labels == c).astype(np.float64)
    if fg.sum() == 0:
      continue
    errors = np.abs(fg - probs[:, c])
    order = np.argsort(-errors, kind='stable')
    fg_sorted = fg[order]
    gts = fg_sorted.sum()
    jaccard = 1.0 - (gts - np.cumsum(fg_sorted)) / (gts + np.cumsum(1.0 - fg_sorted))
    jaccard[1:] = jaccard[1:] - jaccard[:-1]
    losses_per_class.append(np.dot(errors[order], jaccard))
  return np.mean(losses_per_class) if losses_per_class else 0.0


def test_lovasz_at_certain_predictions_is_one_minus_iou_of_present_classes():
  # Class 0: 1 pixel, predicted right (IoU 1). Class 1: 2 pixels, one called 2 (IoU 1/2).
  # Class 2: 1 pixel, predicted 2 twice (IoU 1/2). Class 3: absent from the labels although
  # predicted once, so left out. The void pixel's prediction counts for nothing.
  labels = np.array([[[0, 1, 1, 2, 255]]])
  predicted = np.array([[[0, 1, 2, 2, 3]]])
  logits = tf.one_hot(predicted, 4) * 60.0
  want = (0.0 + 0.5 + 0.5) / 3
  assert float(losses.lovasz_softmax(labels, logits)) == pytest.approx(want, abs=1e-6)


def test_lovasz_matches_the_reference_algorithm_on_soft_predictions():
  rng = np.random.default_rng(3)
  labels = rng.integers(0, 5, (2, 6, 7))
  labels[0, :2] = 255
  labels[labels == 4] = 1  # Class 4 absent.
  logits = rng.normal(size=(2, 6, 7, 5)).astype(np.float32)
  probs = tf.nn.softmax(logits).numpy().astype(np.float64)
  got = float(losses.lovasz_softmax(labels, logits))
  assert got == pytest.approx(_lovasz_reference(labels, probs), abs=1e-5)


@pytest.mark.parametrize('term', [losses.lovasz_softmax, losses.soft_dice])
def test_set_level_terms_ignore_void_and_are_zero_without_valid_pixels(term):
  labels = np.full((1, 2, 3), 255)
  logits = tf.Variable(np.random.default_rng(0).normal(size=(1, 2, 3, 4)).astype(np.float32))
  with tf.GradientTape() as tape:
    loss = term(labels, logits)
  grad = tape.gradient(loss, logits)
  assert float(loss) == 0.0
  assert grad is None or not np.any(grad.numpy())
  labels[0, 0, 0] = 1
  with tf.GradientTape() as tape:
    loss = term(labels, logits)
  grad = tape.gradient(loss, logits).numpy()
  assert np.all(np.isfinite(grad)) and np.any(grad[0, 0, 0]) and not np.any(grad[0, 1])


def test_soft_dice_matches_hand_computation_and_skips_void_and_absent_classes():
  # Uniform logits over 3 classes, valid pixels: label 0 once, label 1 twice (the 255 is void,
  # class 2 is absent). Each class gets p = 1/3 on the 3 valid pixels, so sum p_c = 1.
  # Class 0: (2 * 1/3 + 1) / (1 + 1 + 1) = 5/9. Class 1: (2 * 2/3 + 1) / (1 + 2 + 1) = 7/12.
  labels = np.array([[[0, 1], [255, 1]]])
  logits = np.zeros((1, 2, 2, 3), np.float32)
  want = 1.0 - (5 / 9 + 7 / 12) / 2
  assert float(losses.soft_dice(labels, logits)) == pytest.approx(want, rel=1e-6)
  # Changing the void pixel's logits changes nothing.
  logits[0, 1, 0] = [9.0, -3.0, 4.0]
  assert float(losses.soft_dice(labels, logits)) == pytest.approx(want, rel=1e-6)


def test_soft_dice_at_certain_predictions_matches_hand_values():
  labels = np.array([[[0, 1, 1, 2]]])
  right = tf.one_hot(labels, 3) * 60.0
  wrong = tf.one_hot((labels + 1) % 3, 3) * 60.0
  # With smooth 1: each class's Dice is (2n + 1) / (2n + 1) = 1 when right, 1 / (n + m + 1) when
  # every pixel is wrong (n labelled, m predicted).
  assert float(losses.soft_dice(labels, right)) == pytest.approx(0.0, abs=1e-6)
  assert float(losses.soft_dice(labels, wrong)) == pytest.approx(
      1.0 - (1 / 3 + 1 / 4 + 1 / 4) / 3, rel=1e-5)


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


@pytest.mark.parametrize('loss', ['ce', 'focal', 'lovasz', 'dice'])
def test_losses_agree_on_logits_and_shared_log_probabilities(loss):
  rng = np.random.default_rng(6)
  labels = rng.integers(0, 5, (2, 6, 4))
  labels[1, :2] = 255
  logits = (rng.normal(size=(2, 6, 4, 5)) * 3).astype(np.float32)
  weights = np.array([0.5, 1.0, 2.0, 3.0, 1.5], np.float32)
  fn = {'ce': lambda l, g, **k: losses.pixel_loss_sum(l, g, class_weights=weights, **k)[0],
        'focal': lambda l, g, **k: losses.pixel_loss_sum(l, g, loss_type='focal', **k)[0],
        'lovasz': losses.lovasz_softmax, 'dice': losses.soft_dice}[loss]
  shared = fn(labels, losses.log_probabilities(logits), normalized=True)
  assert float(shared) == pytest.approx(float(fn(labels, logits)), rel=1e-5)
  assert float(shared) > 0


# Hard-example case: one example, 1x4 pixels, 2 classes, label 0 everywhere but a void pixel.
#   p(label) 0.9, 0.6, void, 0.3  ->  CE ln(1/0.9), ln(1/0.6), -, ln(1/0.3)
_OHEM_LABELS = np.array([[[0, 0, 255, 0]]], np.uint8)
_OHEM_LOGITS = np.log(np.array([[[[0.9, 0.1], [0.6, 0.4], [0.5, 0.5], [0.3, 0.7]]]],
                               np.float32))


def test_ohem_keeps_pixels_below_the_threshold():
  # Threshold 0.7: pixels 1 and 3 (p 0.6, 0.3) count; the easy pixel 0 and void do not.
  # min_kept 1/4 of 4 pixels = 1 pixel, already covered by the threshold.
  loss_sum, weight_sum = losses.pixel_loss_sum(_OHEM_LABELS, _OHEM_LOGITS, ohem_threshold=0.7,
                                               ohem_min_kept=0.25)
  assert float(weight_sum) == pytest.approx(2.0)
  assert float(loss_sum) == pytest.approx(-math.log(0.6) - math.log(0.3), rel=1e-5)


def test_ohem_keeps_at_least_min_kept_hardest_pixels_never_void():
  # Threshold 0.2 keeps nothing by itself; min_kept 1/4 keeps the hardest pixel (p 0.3).
  loss_sum, weight_sum = losses.pixel_loss_sum(_OHEM_LABELS, _OHEM_LOGITS, ohem_threshold=0.2,
                                               ohem_min_kept=0.25)
  assert float(weight_sum) == pytest.approx(1.0)
  assert float(loss_sum) == pytest.approx(-math.log(0.3), rel=1e-5)
  # min_kept above the valid pixels' share: every valid pixel, still no void one.
  loss_sum, weight_sum = losses.pixel_loss_sum(_OHEM_LABELS, _OHEM_LOGITS, ohem_threshold=0.2,
                                               ohem_min_kept=1.0)
  assert float(weight_sum) == pytest.approx(3.0)
  assert np.isfinite(float(loss_sum))


def test_ohem_applies_class_weights_to_the_kept_pixels():
  loss_sum, weight_sum = losses.pixel_loss_sum(
      _OHEM_LABELS, _OHEM_LOGITS, class_weights=np.array([2.0, 1.0], np.float32),
      ohem_threshold=0.7, ohem_min_kept=0.25)
  assert float(weight_sum) == pytest.approx(4.0)
  assert float(loss_sum) == pytest.approx(-2 * (math.log(0.6) + math.log(0.3)), rel=1e-5)


def test_label_smoothing_hand_case_and_keras():
  # Smoothing e moves e of the target mass to uniform: per pixel (1 - e) CE + e mean_c(-log p).
  # Pixel 0 (p = 1/2, 1/2): ln 2 either way. Pixel 1 (p = 3/4, 1/4, label 1): (1 - e) 2 ln 2 +
  # e (ln 4/3 + ln 4) / 2 = 2 ln 2 - e ln 3 / 2. Void still counts nothing.
  loss_sum, weight_sum = losses.pixel_loss_sum(LABELS, LOGITS, label_smoothing=0.2)
  assert float(weight_sum) == pytest.approx(2.0)
  assert float(loss_sum) == pytest.approx(3 * LN2 - 0.1 * math.log(3.0), rel=1e-6)
  keras_ce = tf.keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.2,
                                                     reduction='sum')
  expected = keras_ce(tf.one_hot([0, 1], 2), LOGITS[0, 0, :2])
  assert float(loss_sum) == pytest.approx(float(expected), rel=1e-6)
  # Off by default, and only defined for cross-entropy.
  plain, _ = losses.pixel_loss_sum(LABELS, LOGITS, label_smoothing=0.0)
  assert float(plain) == pytest.approx(3 * LN2, rel=1e-6)
  with pytest.raises(ValueError, match='label_smoothing'):
    losses.pixel_loss_sum(LABELS, LOGITS, loss_type='focal', label_smoothing=0.1)
