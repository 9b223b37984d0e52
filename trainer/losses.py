"""Void-aware, class-weighted per-pixel segmentation losses, always computed in float32.

The losses return a (weighted loss sum, weight sum) pair instead of a mean. A distributed
training loop all-reduces both across replicas and divides once, which gives the exact global
weighted mean no matter how pixels, void pixels or padded examples are spread over replicas;
averaging per-replica means would not. `mean_pixel_loss` is the single-device convenience.

Void pixels (the ignore label, or any label outside [0, num_classes)) get weight 0 and are
gathered with a safe index, so they contribute neither loss nor gradient and never produce NaN.
Online hard example mining (`ohem_threshold`) gives the easy pixels weight 0 the same way.

`lovasz_softmax` is the exception: the Lovasz extension of the Jaccard loss (Berman et al.,
CVPR 2018) optimises IoU directly and is not a sum over pixels, so it is a mean per batch,
added on top of the pixel loss with its own weight; so is `soft_dice`, the cheap (sort-free)
overlap surrogate nnU-Net pairs with cross-entropy.
"""

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

LOSS_TYPES = ('ce', 'focal')
CLASS_WEIGHT_METHODS = ('none', 'median_frequency', 'inverse_sqrt')


def _valid(labels: tf.Tensor, ignore_label: int, num_classes: tf.Tensor) -> tf.Tensor:
  """Non-void pixels: not the ignore label and inside [0, num_classes)."""
  return tf.logical_and(tf.not_equal(labels, ignore_label),
                        tf.logical_and(labels >= 0, labels < num_classes))


def log_probabilities(logits) -> tf.Tensor:
  """log_softmax of `logits` in float32: what every loss here starts from (see `normalized`)."""
  return tf.nn.log_softmax(tf.cast(logits, tf.float32))


def pixel_loss_sum(labels,
                   logits,
                   class_weights=None,
                   ignore_label: int = 255,
                   loss_type: str = 'ce',
                   focal_gamma: float = 2.0,
                   sample_weight=None,
                   normalized: bool = False,
                   ohem_threshold: float = 0.0,
                   ohem_min_kept: float = 0.0,
                   label_smoothing: float = 0.0) -> tuple[tf.Tensor, tf.Tensor]:
  """Computes the weighted per-pixel loss sum and the weight sum over valid pixels.

  Args:
    labels: Integer class indices [B, H, W] (any integer dtype, e.g. uint8 or int32); void
      pixels hold `ignore_label`. Labels outside [0, C) are also treated as void.
    logits: Unnormalised scores [B, H, W, C] of any float dtype; cast to float32 first.
    class_weights: None (all classes weight 1) or a float [C] tensor/array; a pixel's weight is
      class_weights[label].
    ignore_label: Label value marking void pixels.
    loss_type: 'ce' for softmax cross-entropy or 'focal' for focal loss (1 - p_t)**gamma * CE.
    focal_gamma: Focusing parameter of the focal loss.
    sample_weight: None or a float [B] per-example weight multiplying its pixels' weights
      (e.g. 0 for examples that only pad a final evaluation batch).
    normalized: `logits` are already log-probabilities (`log_probabilities`), so one
      log-softmax can serve this and the Dice or Lovasz term.
    ohem_threshold: 0 = every valid pixel counts. Otherwise online hard example mining (Shrivastava
      et al. 2016, as semantic segmentation uses it: PSPNet, mmsegmentation's OHEMPixelSampler):
      only pixels whose probability of their label is below this count, and at least the
      `ohem_min_kept` fraction of all pixels, the hardest first. Easy pixels (most of Sky and
      Road late in training) then stop diluting the thin classes' gradient.
    ohem_min_kept: See ohem_threshold.
    label_smoothing: Cross-entropy against (1 - e) * one-hot + e / C instead of the one-hot
      label, as Keras' `label_smoothing` (Szegedy et al. 2016): (1 - e) * CE + e * mean over
      classes of -log p. Only for loss_type 'ce'; OHEM still ranks pixels by the plain CE.

  Returns:
    (loss_sum, weight_sum) float32 scalars: sum of weight * loss and sum of weight over all
    pixels. Their ratio is the weighted mean loss.

  Raises:
    ValueError: If loss_type is unknown.
  """
  if loss_type not in LOSS_TYPES:
    raise ValueError(f'loss_type must be one of {LOSS_TYPES}, got {loss_type!r}')
  if label_smoothing and loss_type != 'ce':
    raise ValueError(f'label_smoothing applies to the ce loss only, not {loss_type!r}')
  log_probs = logits if normalized else log_probabilities(logits)
  num_classes = tf.shape(log_probs)[-1]
  labels = tf.cast(labels, tf.int32)

  valid = _valid(labels, ignore_label, num_classes)
  # Void pixels are given class 0 only so the gathers below stay in range; their weight is 0
  # and their loss is masked out with tf.where, so the stand-in class never matters.
  safe_labels = tf.where(valid, labels, tf.zeros_like(labels))

  # -log p(label) by a gather from the log-softmax rather than TensorFlow's fused sparse
  # cross-entropy kernel, which would compute a softmax of its own: the train step shares one
  # log-softmax with the Dice or Lovasz term. Faster alone too: 10-11 against 16 ms forward
  # and backward at small's 4x192x192x11 on this CPU (benchmarks/bench_losses.py).
  ce = -tf.reshape(
      tf.gather(tf.reshape(log_probs, [-1, num_classes]), tf.reshape(safe_labels, [-1, 1]),
                batch_dims=1), tf.shape(labels))
  if loss_type == 'focal':
    # CE = -log p_t, so 1 - p_t = -expm1(-CE), accurate even when p_t is close to 1. The floor
    # keeps the gradient of x**gamma finite at x = 0 when gamma < 1 (NaN otherwise, even at void
    # pixels whose loss tf.where discards below); its effect on the value is negligible.
    one_minus_p = tf.maximum(-tf.math.expm1(-ce), 1e-12)
    per_pixel = tf.pow(one_minus_p, focal_gamma) * ce
  elif label_smoothing:
    per_pixel = (1.0 - label_smoothing) * ce - label_smoothing * tf.reduce_mean(log_probs, -1)
  else:
    per_pixel = ce

  weights = tf.cast(valid, tf.float32)
  if ohem_threshold:
    weights *= _hard_pixels(tf.stop_gradient(tf.where(valid, ce, -1.0)), ohem_threshold,
                            ohem_min_kept)
  if class_weights is not None:
    class_weights = tf.convert_to_tensor(class_weights, dtype=tf.float32)
    weights *= tf.gather(class_weights, safe_labels)
  if sample_weight is not None:
    sample_weight = tf.cast(tf.convert_to_tensor(sample_weight), tf.float32)
    # Broadcast the per-example weight [B] over that example's pixels.
    extra_dims = tf.ones([tf.rank(labels) - 1], dtype=tf.int32)
    weights *= tf.reshape(sample_weight, tf.concat([tf.shape(sample_weight), extra_dims], 0))

  # tf.where (not only weight 0) keeps an inf loss at a void pixel out of the sum (0 * inf = NaN).
  weighted = tf.where(valid, weights * per_pixel, tf.zeros_like(per_pixel))
  return tf.reduce_sum(weighted), tf.reduce_sum(weights)


def _hard_pixels(ce: tf.Tensor, threshold: float, min_kept: float) -> tf.Tensor:
  """1.0 where -log p(label) = `ce` exceeds -log(threshold) or is among the top min_kept."""
  flat = tf.reshape(ce, [-1])
  k = tf.maximum(tf.cast(min_kept * tf.cast(tf.size(flat), tf.float32), tf.int32), 1)
  kth = tf.reduce_min(tf.math.top_k(flat, k, sorted=False).values)
  # Void pixels hold -1 and so are never kept (and never counted in the top k unless there are
  # fewer valid pixels than k, in which case all valid pixels are kept).
  cutoff = tf.maximum(tf.minimum(kth, -float(np.log(threshold))), 0.0)
  return tf.cast(ce >= cutoff, tf.float32)


def mean_pixel_loss(labels, logits, epsilon: float = 1e-8, **kwargs) -> tf.Tensor:
  """Weighted mean per-pixel loss on a single device (e.g. for KerasTuner or evaluation).

  Args:
    labels: See `pixel_loss_sum`.
    logits: See `pixel_loss_sum`.
    epsilon: Lower bound of the denominator, so an all-void batch gives 0 instead of NaN.
    **kwargs: Passed to `pixel_loss_sum` (class_weights, ignore_label, loss_type, ...).

  Returns:
    A float32 scalar: loss_sum / max(weight_sum, epsilon).
  """
  loss_sum, weight_sum = pixel_loss_sum(labels, logits, **kwargs)
  return loss_sum / tf.maximum(weight_sum, epsilon)


def _mean_over_present(per_class: tf.Tensor, positives: tf.Tensor) -> tf.Tensor:
  """Mean of a per-class loss over the classes with labelled pixels; 0 if there are none."""
  present = tf.cast(positives > 0, tf.float32)
  return tf.reduce_sum(per_class * present) / tf.maximum(tf.reduce_sum(present), 1.0)


def lovasz_softmax(labels, logits, ignore_label: int = 255, normalized: bool = False) -> tf.Tensor:
  """Lovasz-softmax loss of one batch: the mean over classes present in it (Berman et al. 2018).

  Per class c, with e_i = |[label_i = c] - p_i(c)| the errors of the valid pixels sorted in
  decreasing order, the loss is sum_i e_i * g_i, where g is the discrete gradient of the Jaccard
  loss along that order: the convex (Lovasz) extension of 1 - IoU_c evaluated at the errors.
  Classes absent from the batch's labels are left out (the paper's 'present' variant), so a
  batch without pedestrians is not pushed to predict none with certainty on every pixel.

  Args:
    labels: Integer class indices [B, H, W]; `ignore_label` or any label outside [0, C) is void.
    logits: Unnormalised scores [B, H, W, C]; cast to float32 first.
    ignore_label: Label value marking void pixels.
    normalized: `logits` are already log-probabilities (see `pixel_loss_sum`).

  Returns:
    float32 scalar; 0 for a batch with no valid pixel.
  """
  log_probs = logits if normalized else log_probabilities(logits)
  num_classes = tf.shape(log_probs)[-1]
  labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
  valid = _valid(labels, ignore_label, num_classes)
  labels = tf.boolean_mask(labels, valid)
  probs = tf.boolean_mask(tf.exp(tf.reshape(log_probs, [-1, num_classes])), valid)
  # [C, P]: one row of ground truth and errors per class.
  truth = tf.transpose(tf.one_hot(labels, num_classes, dtype=tf.float32))
  errors = tf.abs(truth - tf.transpose(probs))
  order = tf.argsort(errors, axis=1, direction='DESCENDING', stable=True)
  errors = tf.gather(errors, order, batch_dims=1)
  truth = tf.gather(truth, order, batch_dims=1)
  positives = tf.reduce_sum(truth, axis=1, keepdims=True)
  intersection = positives - tf.cumsum(truth, axis=1)
  union = positives + tf.cumsum(1.0 - truth, axis=1)
  jaccard = 1.0 - intersection / union  # union >= 1 from the first pixel on.
  grad = tf.concat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], axis=1)
  return _mean_over_present(tf.reduce_sum(errors * grad, axis=1), positives[:, 0])


def soft_dice(labels, logits, ignore_label: int = 255, smooth: float = 1.0,
              normalized: bool = False) -> tf.Tensor:
  """Soft Dice loss of one batch: 1 - the mean soft Dice over classes present in it.

  Per class c over the batch's valid pixels (batch Dice, as in nnU-Net, so a class with a few
  pixels in one image is not scored on that image alone): Dice_c = (2 sum p_c t_c + smooth) /
  (sum p_c + sum t_c + smooth), p the softmax probabilities and t the one-hot labels. Like
  `lovasz_softmax` it rewards overlap per class, whatever the class's pixel count, but costs
  only a softmax and a few sums (no sort). Classes absent from the batch's labels are left out,
  for the same reason as there.

  Args:
    labels: Integer class indices [B, H, W]; `ignore_label` or any label outside [0, C) is void.
    logits: Unnormalised scores [B, H, W, C]; cast to float32 first.
    ignore_label: Label value marking void pixels.
    smooth: Added to numerator and denominator; keeps the ratio defined and its gradient tame.
    normalized: `logits` are already log-probabilities (see `pixel_loss_sum`).

  Returns:
    float32 scalar in [0, 1); 0 for a batch with no valid pixel.
  """
  log_probs = logits if normalized else log_probabilities(logits)
  num_classes = tf.shape(log_probs)[-1]
  labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
  valid = _valid(labels, ignore_label, num_classes)
  mask = tf.cast(valid, tf.float32)
  safe_labels = tf.where(valid, labels, 0)  # Void's stand-in class is masked out below.
  probs = tf.exp(tf.reshape(log_probs, [-1, num_classes]))
  # Per-class sums by gathers and segment sums rather than a one-hot [P, C] product: fewer
  # passes over the largest tensor of the step.
  p_true = tf.gather(probs, safe_labels[:, None], batch_dims=1)[:, 0] * mask
  intersection = tf.math.unsorted_segment_sum(p_true, safe_labels, num_classes)
  positives = tf.math.unsorted_segment_sum(mask, safe_labels, num_classes)
  predicted = tf.linalg.matvec(probs, mask, transpose_a=True)
  dice = (2.0 * intersection + smooth) / (predicted + positives + smooth)
  return _mean_over_present(1.0 - dice, positives)


def class_weights_from_counts(pixel_counts: Sequence[float] | np.ndarray,
                              method: str = 'median_frequency',
                              max_weight: float | None = None) -> np.ndarray:
  """Derives per-class loss weights from training-set pixel counts.

  Classes with no pixels get weight 1.0: they cannot affect the loss anyway, and a finite
  weight keeps every downstream computation well defined.

  Args:
    pixel_counts: Non-negative number of (non-void) pixels of each class, length C.
    method: 'none' (all ones); 'median_frequency' (w_c = median(freq) / freq_c, median over
      classes with pixels; Eigen & Fergus 2015); 'inverse_sqrt' (w_c proportional to
      1/sqrt(freq_c), scaled so the pixel-frequency-weighted mean weight is 1, which keeps the
      loss scale, and therefore a tuned learning rate, roughly unchanged).
    max_weight: If given, weights are clipped to at most this value so rare classes do not
      dominate the gradient.

  Returns:
    float32 array [C] of weights.

  Raises:
    ValueError: If method is unknown or counts are negative.
  """
  if method not in CLASS_WEIGHT_METHODS:
    raise ValueError(f'method must be one of {CLASS_WEIGHT_METHODS}, got {method!r}')
  counts = np.asarray(pixel_counts, dtype=np.float64).reshape(-1)
  if np.any(counts < 0):
    raise ValueError(f'pixel_counts must be non-negative, got {counts.tolist()}')
  weights = np.ones_like(counts)
  present = counts > 0
  total = counts.sum()

  if method != 'none' and total > 0:
    freq = counts[present] / total
    if method == 'median_frequency':
      weights[present] = np.median(freq) / freq
    else:
      inv_sqrt = 1.0 / np.sqrt(freq)
      weights[present] = inv_sqrt / np.sum(freq * inv_sqrt)

  if max_weight is not None:
    weights = np.minimum(weights, max_weight)
  return weights.astype(np.float32)


def logit_adjustment_bias(class_weights: np.ndarray | None, strength: float) -> np.ndarray | None:
  """The per-class offset inference adds to the logits to undo class weighting's prior shift.

  Training with loss weights w_c makes a model's softmax approximate w_c p(c|x) / Z, i.e. its
  logits move by log(w_c), and the argmax then over-predicts up-weighted classes (on CamVid:
  Pedestrian recall ~0.8 at precision ~0.2). Adding -strength * log(w_c) before the argmax
  removes that shift (strength 1) or part of it (Menon et al. 2021, "Long-tail learning via
  logit adjustment").

  Args:
    class_weights: The training loss weights [C], or None (unweighted training).
    strength: 0 (no adjustment) .. 1 (the whole shift).

  Returns:
    float32 [C], or None when there is nothing to adjust (no weights or strength 0).
  """
  if class_weights is None or not strength:
    return None
  weights = np.asarray(class_weights, np.float64)
  if np.any(weights <= 0):
    raise ValueError(f'class weights must be positive, got {weights.tolist()}')
  return (-strength * np.log(weights)).astype(np.float32)
