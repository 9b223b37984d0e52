"""Per-class decision biases fitted on the training split to maximise its mean IoU.

Why: class-weighted training shifts each class's logits by about log(weight), and the
`logit_adjustment` removes one fixed fraction of that shift for every class. The best offset is
not the same for every class: on CamVid the under-fitted `small` model, after that adjustment,
still under-predicts Pole and SignSymbol (val precision 0.27 and 0.57 at recall 0.10 and 0.16)
and over-predicts Fence and Pedestrian (precision 0.53 and 0.36 at recall 0.91 and 0.69). Mean
IoU rewards balancing each class's false positives against its false negatives, which one
offset per class can do: a threshold per class, the segmentation analogue of choosing a
classifier's operating point.

The offsets are fitted on the *training* split (whole frames, evaluation transforms), never on
val: val stays an unbiased measurement of the calibrated model. `fit_bias` is coordinate ascent:
for one class at a time it scores every offset on a grid in one pass (pixels sorted by the
offset at which they would switch to that class, confusion matrices accumulated per grid step),
keeps the best, and repeats the sweep over all classes a few times.

The fitted bias is absolute (it already contains the logit adjustment it started from). The
trainer records the fit in model_dir/calibration.json and makes the bias the inference spec's
(model_dir/inference.json), which the final evaluation (metrics.json), `trainer.evaluate` and
the export then use.
"""

import json
import math

import numpy as np
import tensorflow as tf

from camvid_common import fileio
from trainer import data
from trainer import inference
from trainer import metrics

CALIBRATION_NAME = 'calibration.json'
# Pixels kept per frame (a regular grid). CamVid's 367 train frames then give ~2.5M pixels,
# ~110 MB of float32 logits: enough for 11 offsets. Larger splits keep fewer per frame, so the
# whole sample stays under MAX_PIXELS (~320 MB of logits for 20 classes) on any chief.
PIXELS_PER_FRAME = 8192
MAX_PIXELS = 4_000_000


def confusion(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
  """[C, C] counts of (label, prediction) pairs; labels must already be in [0, C)."""
  ids = labels.astype(np.int64) * num_classes + predictions
  return np.bincount(ids, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _sweep_class(scores: np.ndarray, labels: np.ndarray, c: int,
                 grid: np.ndarray) -> np.ndarray:
  """Mean IoU for every offset in `grid` added to class c's scores (others unchanged).

  A pixel is predicted c iff scores[c] + offset > t, t the best other score; otherwise it keeps
  the best other class. All grid offsets are scored from one histogram of (first grid index at
  which the pixel switches to c, label, other class) and its cumulative sum.
  """
  num_classes = scores.shape[1]
  others = scores.copy()
  others[:, c] = -np.inf
  other_class = others.argmax(1)
  threshold = others[np.arange(len(others)), other_class] - scores[:, c]
  base = confusion(labels, other_class, num_classes)  # Nothing predicted as c.
  # first[i] = smallest grid index j with grid[j] > threshold[i] (len(grid) = never switches).
  first = np.searchsorted(grid, threshold, side='right')
  pairs = labels.astype(np.int64) * num_classes + other_class
  hist = np.bincount(first * num_classes**2 + pairs,
                     minlength=(len(grid) + 1) * num_classes**2)
  switched = np.cumsum(hist.reshape(len(grid) + 1, num_classes, num_classes)[:-1], axis=0)
  cms = base[None] - switched
  cms[:, :, c] += switched.sum(axis=2)
  return np.array([metrics.mean_iou(cm) for cm in cms])


def fit_bias(logits: np.ndarray, labels: np.ndarray, init_bias: np.ndarray | None = None,
             grid: np.ndarray | None = None, rounds: int = 3) -> np.ndarray:
  """Per-class offsets maximising the mean IoU of argmax(logits + bias) by coordinate ascent.

  Args:
    logits: [N, C] float scores of N pixels (void pixels already removed).
    labels: [N] integer classes in [0, C).
    init_bias: [C] starting offsets (e.g. the logit adjustment); None = zeros.
    grid: Offsets tried for one class around its current value (default -2..2 in steps of
      0.1); should contain 0 so a class whose offset cannot improve stays put.
    rounds: Sweeps over all classes.

  Returns:
    float32 [C] absolute offsets (init_bias plus the fitted changes). Never scores lower on
    (logits, labels) than init_bias: a change is only taken if it raises the mean IoU.
  """
  logits = np.asarray(logits, np.float32)
  labels = np.asarray(labels)
  num_classes = logits.shape[1]
  bias = (np.zeros(num_classes, np.float64) if init_bias is None
          else np.asarray(init_bias, np.float64).copy())
  grid = np.round(np.arange(-2.0, 2.0001, 0.1), 6) if grid is None else np.sort(grid)
  zero = int(np.argmin(np.abs(grid)))
  for _ in range(rounds):
    changed = False
    for c in range(num_classes):
      scores = _sweep_class(logits + bias.astype(np.float32), labels, c, grid)
      best = int(np.argmax(scores))
      # Ties keep the current offset: only a strict gain moves it.
      if scores[best] > scores[zero] and best != zero:
        bias[c] += grid[best]
        changed = True
    if not changed:
      break
  return bias.astype(np.float32)


def sample_logits(model, manifest, split: str, config, spec: inference.Spec,
                  pixels_per_frame: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """The model's inference logits (inference.logits under `spec`) on a pixel grid of `split`.

  Frames go through the evaluation pipeline (whole frames resized to image_size) and logits are
  taken at label resolution, as in evaluation; a regular grid of at most `pixels_per_frame`
  pixels per frame is kept (default: PIXELS_PER_FRAME, fewer if the split would exceed
  MAX_PIXELS). Void pixels are dropped.

  Returns:
    (logits [N, C] float32, labels [N] int32).
  """
  num_classes = spec.num_classes
  if pixels_per_frame is None:
    frames = max(1, manifest.split(split)['num_examples'])
    pixels_per_frame = max(1, min(PIXELS_PER_FRAME, MAX_PIXELS // frames))

  @tf.function(reduce_retracing=True)
  def predict(images, size):
    return inference.logits(model, images, spec, size)

  kept_logits, kept_labels = [], []
  for batch in data.eval_dataset(manifest, split, config):
    valid = batch['valid'].numpy()
    if not valid.any():
      continue
    masks = batch['mask'].numpy()[valid]
    height, width = masks.shape[1:3]
    stride = max(1, math.ceil(math.sqrt(height * width / pixels_per_frame)))
    rows, cols = slice(stride // 2, None, stride), slice(stride // 2, None, stride)
    logits = predict(batch['image'], tf.shape(batch['mask'])[1:3]).numpy()[valid]
    logits = logits[:, rows, cols].reshape(-1, num_classes)
    labels = masks[:, rows, cols].reshape(-1).astype(np.int32)
    keep = (labels >= 0) & (labels < num_classes)
    kept_logits.append(logits[keep].astype(np.float32))
    kept_labels.append(labels[keep])
  if not kept_logits:
    return np.zeros([0, num_classes], np.float32), np.zeros([0], np.int32)
  return np.concatenate(kept_logits), np.concatenate(kept_labels)


def calibrate(model, manifest, split: str, config, spec: inference.Spec) -> dict:
  """Fits the bias on `split` starting from spec.bias; returns the calibration.json record."""
  logits, labels = sample_logits(model, manifest, split, config, spec)
  num_classes = spec.num_classes
  start = (np.zeros(num_classes, np.float32) if spec.bias is None
           else np.asarray(spec.bias, np.float32))
  bias = fit_bias(logits, labels, start) if len(labels) else start
  before, after = (
      metrics.mean_iou(confusion(labels, inference.class_ids(logits, b).numpy(), num_classes))
      for b in (start, bias))
  return {'split': split, 'num_pixels': int(len(labels)),
          'class_names': list(spec.class_names),
          'initial_bias': [float(b) for b in start], 'bias': [float(b) for b in bias],
          'mean_iou_before': before, 'mean_iou_after': after}


def write(model_dir: str, record: dict) -> None:
  fileio.write_atomic(f'{model_dir}/{CALIBRATION_NAME}', json.dumps(record, indent=2) + '\n')
