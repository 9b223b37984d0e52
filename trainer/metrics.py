"""Confusion-matrix segmentation metrics that ignore void and never score absent classes.

`confusion_matrix` runs in TensorFlow (graph and XLA friendly) so each replica can accumulate
an int64 [C, C] matrix per step and the loop can all-reduce it; `compute_metrics` turns the
final matrix into plain-Python, JSON-serialisable numbers on the host.

keras.metrics.MeanIoU is not used because it scores a class that appears in neither labels nor
predictions as IoU 1.0, which inflates mean IoU on small evaluation sets. Here such a class is
"absent": all its scores are None and it is left out of every mean.
"""

from collections.abc import Sequence

import numpy as np
import tensorflow as tf


def confusion_matrix(labels,
                     predictions,
                     num_classes: int,
                     ignore_label: int = 255,
                     sample_weight=None) -> tf.Tensor:
  """Counts (true class, predicted class) pixel pairs, excluding void and padded examples.

  Args:
    labels: Integer true classes of any rank, e.g. [B, H, W] or [B, H, W, 1]. Pixels equal to
      `ignore_label` or outside [0, num_classes) are void and not counted.
    predictions: Integer predicted classes, same shape as labels (e.g. argmax of logits).
      Predictions outside [0, num_classes) are also not counted (argmax never produces them).
    num_classes: Number of classes C.
    ignore_label: Label value marking void pixels.
    sample_weight: None or [B] per-example weights; examples with weight <= 0 (e.g. padding of
      the last evaluation batch) are not counted. Weights only select, they do not scale.

  Returns:
    int64 [C, C] tensor; rows are true classes, columns predicted classes.
  """
  labels = tf.cast(labels, tf.int64)
  predictions = tf.cast(predictions, tf.int64)
  valid = tf.logical_and(
      tf.logical_and(tf.not_equal(labels, ignore_label), labels >= 0),
      tf.logical_and(labels < num_classes,
                     tf.logical_and(predictions >= 0, predictions < num_classes)))
  if sample_weight is not None:
    keep = tf.reshape(tf.cast(sample_weight, tf.float32) > 0, [-1])
    # Broadcast the per-example flag [B] over the example's remaining dimensions.
    keep = tf.reshape(keep, tf.concat([tf.shape(keep), tf.ones([tf.rank(labels) - 1], tf.int32)],
                                      axis=0))
    valid = tf.logical_and(valid, keep)

  bins = num_classes * num_classes
  # Every excluded pixel goes to one extra overflow bin, sliced off below. This keeps the shape
  # static (no boolean_mask), which XLA and TPU-style compilation need.
  ids = tf.where(valid, labels * num_classes + predictions, tf.constant(bins, tf.int64))
  counts = tf.math.unsorted_segment_sum(
      tf.ones_like(ids, dtype=tf.int64), ids, num_segments=bins + 1)
  return tf.reshape(counts[:bins], [num_classes, num_classes])


def _ratio(numerator: float, denominator: float) -> float | None:
  return float(numerator) / float(denominator) if denominator > 0 else None


def _mean(values) -> float | None:
  defined = [v for v in values if v is not None]
  return float(sum(defined) / len(defined)) if defined else None


def mean_iou(cm) -> float | None:
  """Mean IoU over the classes present in the labels or the predictions; None if none is.

  The one definition of the headline number: compute_metrics reports it, and the calibration
  (trainer/calibration.py) maximises it over thousands of candidate matrices, so it is
  vectorised rather than built from compute_metrics' per-class dicts.
  """
  cm = np.asarray(cm, dtype=np.float64)
  tp = np.diag(cm)
  union = cm.sum(0) + cm.sum(1) - tp
  present = union > 0
  return float((tp[present] / union[present]).mean()) if present.any() else None


def compute_metrics(cm, class_names: Sequence[str]) -> dict:
  """Computes pixel accuracy and per-class / mean IoU, precision, recall and F1.

  Per class c: tp = cm[c, c], fp = column sum - tp, fn = row sum - tp, support = row sum.
  A class is present if tp + fp + fn > 0, i.e. it occurs in the labels or the predictions.
  Present classes get iou = tp / (tp + fp + fn) and f1 = 2tp / (2tp + fp + fn); precision is
  tp / (tp + fp), None if the class was never predicted; recall is tp / (tp + fn), None if it
  never occurs in the labels. Absent classes get None for all four. Means are over the classes
  where the score is defined, so absent classes count neither as 1.0 nor as 0.0.

  Args:
    cm: [C, C] confusion matrix (rows true, columns predicted), numpy array or tensor.
    class_names: C class names, used as keys of "per_class".

  Returns:
    A JSON-serialisable dict of Python floats/ints/None: pixel_accuracy, mean_iou,
    mean_precision, mean_recall, mean_f1, num_pixels, per_class {name: {iou, precision,
    recall, f1, support}} and confusion_matrix (nested lists).

  Raises:
    ValueError: If cm is not square or does not match class_names.
  """
  cm = np.asarray(cm, dtype=np.int64)
  if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
    raise ValueError(f'confusion matrix must be square, got shape {cm.shape}')
  if cm.shape[0] != len(class_names):
    raise ValueError(
        f'{len(class_names)} class names for a {cm.shape[0]}-class confusion matrix')

  tp = np.diag(cm)
  row_sums = cm.sum(axis=1)
  col_sums = cm.sum(axis=0)
  total = int(cm.sum())

  per_class = {}
  for c, name in enumerate(class_names):
    c_tp = int(tp[c])
    c_fp = int(col_sums[c]) - c_tp
    c_fn = int(row_sums[c]) - c_tp
    if c_tp + c_fp + c_fn > 0:
      scores = {
          'iou': _ratio(c_tp, c_tp + c_fp + c_fn),
          'precision': _ratio(c_tp, c_tp + c_fp),
          'recall': _ratio(c_tp, c_tp + c_fn),
          'f1': _ratio(2 * c_tp, 2 * c_tp + c_fp + c_fn),
      }
    else:
      scores = dict.fromkeys(('iou', 'precision', 'recall', 'f1'))
    scores['support'] = int(row_sums[c])
    per_class[str(name)] = scores

  def mean_of(key):
    return _mean(s[key] for s in per_class.values())

  return {
      'pixel_accuracy': _ratio(int(tp.sum()), total),
      'mean_iou': mean_iou(cm),
      'mean_precision': mean_of('precision'),
      'mean_recall': mean_of('recall'),
      'mean_f1': mean_of('f1'),
      'num_pixels': total,
      'per_class': per_class,
      'confusion_matrix': cm.tolist(),
  }
