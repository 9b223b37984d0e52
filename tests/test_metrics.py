"""Tests for trainer.metrics on small confusion matrices whose scores are computed by hand."""

import json

import numpy as np
import pytest
import tensorflow as tf

from trainer import metrics

NAMES = ['a', 'b', 'c']

# Case 1 (3 classes, void = 255):
#   labels = [[0, 0, 1],      preds = [[0, 1, 1],
#             [1, 255, 0]]             [0, 2, 0]]
# (true, pred) pairs: (0,0) (0,1) (1,1) / (1,0) void (0,0). The void pixel's prediction of class 2
# is ignored, so class c appears nowhere and is absent.
#   cm = [[2, 1, 0],
#         [1, 1, 0],
#         [0, 0, 0]]            total 5, trace 3 -> pixel accuracy 3/5
#   a: tp 2, fp 3-2=1, fn 3-2=1 -> iou 2/4, precision 2/3, recall 2/3, f1 4/6
#   b: tp 1, fp 2-1=1, fn 2-1=1 -> iou 1/3, precision 1/2, recall 1/2, f1 2/4
#   c: absent -> all None, support 0
#   mean iou = (1/2 + 1/3) / 2 = 5/12; precision/recall/f1 means = (2/3 + 1/2) / 2 = 7/12.
CASE1_LABELS = [[0, 0, 1], [1, 255, 0]]
CASE1_PREDS = [[0, 1, 1], [0, 2, 0]]
CASE1_CM = [[2, 1, 0], [1, 1, 0], [0, 0, 0]]


def _cm(labels, preds, num_classes=3, **kwargs):
  return metrics.confusion_matrix(
      tf.constant(labels), tf.constant(preds), num_classes, **kwargs).numpy()


def test_confusion_matrix_ignores_void_rank2():
  cm = metrics.confusion_matrix(tf.constant(CASE1_LABELS, tf.uint8),
                                tf.constant(CASE1_PREDS, tf.int64), 3)
  assert cm.dtype == tf.int64
  np.testing.assert_array_equal(cm.numpy(), CASE1_CM)


def test_confusion_matrix_rank3_and_rank4_agree():
  labels = np.array([CASE1_LABELS, CASE1_LABELS])  # [B=2, H, W]
  preds = np.array([CASE1_PREDS, CASE1_PREDS])
  expected = 2 * np.array(CASE1_CM)
  np.testing.assert_array_equal(_cm(labels, preds), expected)
  np.testing.assert_array_equal(_cm(labels[..., None], preds[..., None]), expected)


def test_confusion_matrix_sample_weight_excludes_example():
  # Example 2 would add 6 pixels of (true 2, pred 2); its weight 0 marks it as padding.
  labels = np.array([CASE1_LABELS, [[2, 2, 2], [2, 2, 2]]])
  preds = np.array([CASE1_PREDS, [[2, 2, 2], [2, 2, 2]]])
  np.testing.assert_array_equal(
      _cm(labels, preds, sample_weight=tf.constant([1.0, 0.0])), CASE1_CM)
  np.testing.assert_array_equal(
      _cm(labels[..., None], preds[..., None], sample_weight=[1, 0]), CASE1_CM)
  # Without the weight, class c gets its 6 true positives.
  assert _cm(labels, preds)[2, 2] == 6


def test_confusion_matrix_out_of_range_labels_are_void():
  # Labels 7 and -1 are outside [0, 3): only (0,0) and (1,1) are counted.
  cm = _cm([[0, 7], [-1, 1]], [[0, 0], [1, 1]])
  np.testing.assert_array_equal(cm, [[1, 0, 0], [0, 1, 0], [0, 0, 0]])


def test_confusion_matrix_under_xla():
  fn = tf.function(lambda l, p: metrics.confusion_matrix(l, p, 3), jit_compile=True)
  cm = fn(tf.constant([CASE1_LABELS], tf.int32), tf.constant([CASE1_PREDS], tf.int32))
  np.testing.assert_array_equal(cm.numpy(), CASE1_CM)


def test_compute_metrics_absent_class_excluded():
  result = metrics.compute_metrics(np.array(CASE1_CM), NAMES)
  assert result['num_pixels'] == 5
  assert result['pixel_accuracy'] == pytest.approx(3 / 5)

  a, b, c = (result['per_class'][n] for n in NAMES)
  assert a == pytest.approx({'iou': 0.5, 'precision': 2 / 3, 'recall': 2 / 3, 'f1': 2 / 3,
                             'support': 3})
  assert b == pytest.approx({'iou': 1 / 3, 'precision': 0.5, 'recall': 0.5, 'f1': 0.5,
                             'support': 2})
  assert c == {'iou': None, 'precision': None, 'recall': None, 'f1': None, 'support': 0}

  assert result['mean_iou'] == pytest.approx(5 / 12)
  # Counting the absent class as 1.0 (keras MeanIoU) or 0.0 would give these instead.
  assert result['mean_iou'] != pytest.approx((0.5 + 1 / 3 + 1.0) / 3)  # 11/18
  assert result['mean_iou'] != pytest.approx((0.5 + 1 / 3 + 0.0) / 3)  # 5/18
  assert result['mean_precision'] == pytest.approx(7 / 12)
  assert result['mean_recall'] == pytest.approx(7 / 12)
  assert result['mean_f1'] == pytest.approx(7 / 12)
  assert result['confusion_matrix'] == CASE1_CM


def test_compute_metrics_class_predicted_but_not_labelled():
  # labels = [[0, 0], [1, 1]], preds = [[0, 2], [1, 1]]
  #   cm = [[1, 0, 1], [0, 2, 0], [0, 0, 0]]
  #   a: tp 1, fp 0, fn 1 -> iou 1/2, precision 1, recall 1/2, f1 2/3
  #   b: tp 2, fp 0, fn 0 -> all 1
  #   c: tp 0, fp 1, fn 0 -> present: iou 0, precision 0/1 = 0, recall None (support 0), f1 0
  #   mean iou = 1.5/3 = 1/2; precision (1+1+0)/3 = 2/3; recall (1/2+1)/2 = 3/4 (c undefined);
  #   f1 (2/3+1+0)/3 = 5/9; pixel accuracy 3/4.
  cm = _cm([[0, 0], [1, 1]], [[0, 2], [1, 1]])
  np.testing.assert_array_equal(cm, [[1, 0, 1], [0, 2, 0], [0, 0, 0]])
  result = metrics.compute_metrics(cm, NAMES)
  c = result['per_class']['c']
  assert c['iou'] == 0.0 and c['precision'] == 0.0 and c['f1'] == 0.0
  assert c['recall'] is None and c['support'] == 0
  assert result['mean_iou'] == pytest.approx(1 / 2)
  assert result['mean_precision'] == pytest.approx(2 / 3)
  assert result['mean_recall'] == pytest.approx(3 / 4)
  assert result['mean_f1'] == pytest.approx(5 / 9)
  assert result['pixel_accuracy'] == pytest.approx(3 / 4)


def test_compute_metrics_empty_matrix():
  result = metrics.compute_metrics(np.zeros((3, 3), np.int64), NAMES)
  assert result['pixel_accuracy'] is None
  assert result['mean_iou'] is None and result['mean_f1'] is None
  assert result['num_pixels'] == 0


def test_compute_metrics_is_json_serialisable_with_python_types():
  result = metrics.compute_metrics(tf.constant(CASE1_CM, tf.int64), NAMES)
  assert json.loads(json.dumps(result)) == result

  def check(value):
    if isinstance(value, dict):
      for v in value.values():
        check(v)
    elif isinstance(value, list):
      for v in value:
        check(v)
    else:
      assert value is None or type(value) in (int, float), (value, type(value))

  check(result)


def test_compute_metrics_validates_shape():
  with pytest.raises(ValueError):
    metrics.compute_metrics(np.zeros((3, 3)), ['a', 'b'])
  with pytest.raises(ValueError):
    metrics.compute_metrics(np.zeros((2, 3)), ['a', 'b'])


def test_mean_iou_leaves_out_absent_classes():
  # Class 2 is in neither labels nor predictions: the mean is over classes 0 and 1 only.
  cm = np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
  assert metrics.mean_iou(cm) == pytest.approx((3 / 4 + 2 / 3) / 2)
  assert metrics.mean_iou(np.zeros([3, 3])) is None


@pytest.mark.parametrize('seed', range(5))
def test_mean_iou_is_the_mean_of_the_per_class_scores(seed):
  # The calibration maximises metrics.mean_iou; the reports show compute_metrics' per-class IoU.
  # Both must be the same number, also with absent and never-predicted classes.
  rng = np.random.default_rng(seed)
  cm = rng.integers(0, 50, size=(6, 6))
  cm[rng.integers(6)] = 0  # A class never in the labels (it may still be predicted).
  absent = rng.integers(6)
  cm[absent] = 0
  cm[:, absent] = 0
  result = metrics.compute_metrics(cm, [str(c) for c in range(6)])
  ious = [s['iou'] for s in result['per_class'].values() if s['iou'] is not None]
  assert result['per_class'][str(absent)]['iou'] is None
  assert metrics.mean_iou(cm) == pytest.approx(sum(ious) / len(ious))
  assert result['mean_iou'] == metrics.mean_iou(cm)
