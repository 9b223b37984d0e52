"""Void-aware, class-weighted per-pixel segmentation losses, always computed in float32.

The losses return a (weighted loss sum, weight sum) pair instead of a mean. A distributed
training loop all-reduces both across replicas and divides once, which gives the exact global
weighted mean no matter how pixels, void pixels or padded examples are spread over replicas;
averaging per-replica means would not. `mean_pixel_loss` is the single-device convenience.

Void pixels (the ignore label, or any label outside [0, num_classes)) get weight 0 and are
gathered with a safe index, so they contribute neither loss nor gradient and never produce NaN.
"""

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

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
                   sample_weight=None,
                   normalized: bool = False) -> tuple[tf.Tensor, tf.Tensor]:
  """Computes the weighted softmax cross-entropy sum and the weight sum over valid pixels.

  Args:
    labels: Integer class indices [B, H, W] (any integer dtype, e.g. uint8 or int32); void
      pixels hold `ignore_label`. Labels outside [0, C) are also treated as void.
    logits: Unnormalised scores [B, H, W, C] of any float dtype; cast to float32 first.
    class_weights: None (all classes weight 1) or a float [C] tensor/array; a pixel's weight is
      class_weights[label].
    ignore_label: Label value marking void pixels.
    sample_weight: None or a float [B] per-example weight multiplying its pixels' weights
      (e.g. 0 for examples that only pad a final evaluation batch).
    normalized: `logits` are already log-probabilities (`log_probabilities`).

  Returns:
    (loss_sum, weight_sum) float32 scalars: sum of weight * loss and sum of weight over all
    pixels. Their ratio is the weighted mean loss.
  """
  log_probs = logits if normalized else log_probabilities(logits)
  num_classes = tf.shape(log_probs)[-1]
  labels = tf.cast(labels, tf.int32)

  valid = _valid(labels, ignore_label, num_classes)
  # Void pixels are given class 0 only so the gathers below stay in range; their weight is 0
  # and their loss is masked out with tf.where, so the stand-in class never matters.
  safe_labels = tf.where(valid, labels, tf.zeros_like(labels))

  # -log p(label) by a gather from the log-softmax rather than TensorFlow's fused sparse
  # cross-entropy kernel: about 1.5x faster forward and backward at small's 4x192x192x11 on a
  # CPU (docs/experiments.md, "Retired benchmarks").
  ce = -tf.reshape(
      tf.gather(tf.reshape(log_probs, [-1, num_classes]), tf.reshape(safe_labels, [-1, 1]),
                batch_dims=1), tf.shape(labels))

  weights = tf.cast(valid, tf.float32)
  if class_weights is not None:
    class_weights = tf.convert_to_tensor(class_weights, dtype=tf.float32)
    weights *= tf.gather(class_weights, safe_labels)
  if sample_weight is not None:
    sample_weight = tf.cast(tf.convert_to_tensor(sample_weight), tf.float32)
    # Broadcast the per-example weight [B] over that example's pixels.
    extra_dims = tf.ones([tf.rank(labels) - 1], dtype=tf.int32)
    weights *= tf.reshape(sample_weight, tf.concat([tf.shape(sample_weight), extra_dims], 0))

  # tf.where (not only weight 0) keeps an inf loss at a void pixel out of the sum (0 * inf = NaN).
  weighted = tf.where(valid, weights * ce, tf.zeros_like(ce))
  return tf.reduce_sum(weighted), tf.reduce_sum(weights)


def mean_pixel_loss(labels, logits, epsilon: float = 1e-8, **kwargs) -> tf.Tensor:
  """Weighted mean per-pixel loss on a single device (e.g. for KerasTuner or evaluation).

  Args:
    labels: See `pixel_loss_sum`.
    logits: See `pixel_loss_sum`.
    epsilon: Lower bound of the denominator, so an all-void batch gives 0 instead of NaN.
    **kwargs: Passed to `pixel_loss_sum` (class_weights, ignore_label, ...).

  Returns:
    A float32 scalar: loss_sum / max(weight_sum, epsilon).
  """
  loss_sum, weight_sum = pixel_loss_sum(labels, logits, **kwargs)
  return loss_sum / tf.maximum(weight_sum, epsilon)


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
