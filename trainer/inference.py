"""The one inference path: standardization -> logits -> flips and scales -> bias -> class ids.

Everything inference needs besides the weights is one `Spec`: the class names and colours, the
void label, the model input size and size multiple, whether frames are standardized, the
test-time flip and scales, and the decision bias added to the logits before the argmax (the
logit adjustment that undoes class weighting, or the calibrated per-class offsets once
calibration has run). The trainer records it in model_dir/inference.json; the export writes the
same record as export/labels.json.

Validation, the TensorBoard overlays, calibration, the final evaluation, `trainer.evaluate` and
the serving SavedModel all predict through `logits` and `class_ids` below, so they agree pixel
for pixel, and nothing about inference is read from the data set being scored. `standardize`
is also the training input's (trainer/data.py), so the model sees frames standardized alike.
"""

from collections.abc import Sequence
import dataclasses
import json

import numpy as np
import tensorflow as tf

from camvid_common import fileio
from trainer import model as model_lib

INFERENCE_NAME = 'inference.json'


@dataclasses.dataclass(frozen=True)
class Spec:
  """How a trained model turns images into class ids (see the module docstring)."""
  class_names: tuple[str, ...]
  class_colors: tuple[tuple[int, int, int], ...]
  image_size: tuple[int, int]  # (height, width) frames are resized to for the model.
  size_multiple: int = 1  # Scaled frames are padded to this multiple (model.size_multiple).
  standardize: bool = False  # Frames go through standardize() first (data.standardize).
  flip: bool = False  # Average the logits with those of the mirrored frame.
  scales: tuple[float, ...] = (1.0,)  # Average the logits over these frame scales.
  bias: tuple[float, ...] | None = None  # Added to the logits before the argmax.
  # The training loss's class weights, so another logit-adjustment strength can be derived
  # (losses.logit_adjustment_bias) without the training data.
  class_weights: tuple[float, ...] | None = None
  ignore_label: int = 255

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def replace(self, **changes) -> 'Spec':
    return dataclasses.replace(self, **changes)

  def to_json(self) -> dict:
    """The labels.json record (keys `classes`, `ignore_label`, `image_size`, `flip`, ...)."""
    floats = lambda values: None if values is None else [float(v) for v in values]
    return {
        'classes': [{'index': i, 'name': str(name), 'color': [int(c) for c in color]}
                    for i, (name, color) in enumerate(zip(self.class_names, self.class_colors))],
        'ignore_label': int(self.ignore_label),
        'image_size': [int(s) for s in self.image_size],
        'size_multiple': int(self.size_multiple),
        'standardize': bool(self.standardize),
        'flip': bool(self.flip),
        'scales': floats(self.scales),
        'logit_bias': floats(self.bias),
        'class_weights': floats(self.class_weights),
    }

  @classmethod
  def from_json(cls, record, source: str) -> 'Spec':
    """Parses a to_json record; ValueError naming `source` if it is malformed."""
    problem = check_record(record)
    if problem:
      raise ValueError(f'{source}: {problem}')
    optional = lambda key: None if record.get(key) is None else tuple(map(float, record[key]))
    return cls(class_names=tuple(c['name'] for c in record['classes']),
               class_colors=tuple(tuple(c['color']) for c in record['classes']),
               image_size=tuple(record['image_size']),
               size_multiple=int(record.get('size_multiple', 1)),
               standardize=record.get('standardize', False), flip=record['flip'],
               scales=tuple(float(s) for s in record.get('scales', [1.0])),
               bias=optional('logit_bias'), class_weights=optional('class_weights'),
               ignore_label=record['ignore_label'])


def check_record(record) -> str | None:
  """What is wrong with a parsed labels.json / inference.json record, or None."""
  if not isinstance(record, dict):
    return 'expected a JSON object'
  missing = [k for k in ('classes', 'ignore_label', 'image_size', 'flip') if k not in record]
  if missing:
    return f'missing keys {missing}'
  classes = record['classes']
  if not isinstance(classes, list) or not classes:
    return '"classes" must be a non-empty list'
  for i, entry in enumerate(classes):
    if (not isinstance(entry, dict) or entry.get('index') != i
        or not isinstance(entry.get('name'), str)):
      return f'classes[{i}] must have "index" {i} and a string "name"'
    color = entry.get('color')
    if (not isinstance(color, list) or len(color) != 3
        or not all(isinstance(c, int) and 0 <= c <= 255 for c in color)):
      return f'classes[{i}] "color" must be [r, g, b] in 0..255'
  if not isinstance(record['ignore_label'], int):
    return '"ignore_label" must be an integer'
  size = record['image_size']
  if (not isinstance(size, list) or len(size) != 2
      or not all(isinstance(s, int) and s > 0 for s in size)):
    return '"image_size" must be [height, width]'
  if not isinstance(record['flip'], bool):
    return '"flip" must be true or false'
  multiple = record.get('size_multiple', 1)
  if not isinstance(multiple, int) or isinstance(multiple, bool) or multiple < 1:
    return '"size_multiple" must be a positive integer'
  # Optional keys: records written before these existed lack them.
  if not isinstance(record.get('standardize', False), bool):
    return '"standardize" must be true or false'
  scales = record.get('scales', [1.0])
  if (not isinstance(scales, list) or not scales
      or not all(_is_number(s) and s > 0 for s in scales)):
    return '"scales" must be a non-empty list of positive numbers'
  for key in ('logit_bias', 'class_weights'):
    values = record.get(key)
    if values is not None and (not isinstance(values, list) or len(values) != len(classes)
                               or not all(_is_number(v) for v in values)):
      return f'"{key}" must be null or a list of {len(classes)} numbers'
  return None


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def write(model_dir: str, spec: Spec) -> None:
  fileio.write_atomic(f'{model_dir.rstrip("/")}/{INFERENCE_NAME}',
                      json.dumps(spec.to_json(), indent=2) + '\n')


def read(path: str) -> Spec:
  """The Spec in the JSON file `path`; ValueError naming the file if absent or malformed."""
  if not tf.io.gfile.exists(path):
    raise ValueError(f'{path}: not found')
  with tf.io.gfile.GFile(path) as f:
    text = f.read()
  try:
    record = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: not valid JSON ({e})') from None
  return Spec.from_json(record, path)


def frame_moments(frames) -> tuple[tf.Tensor, tf.Tensor]:
  """(mean, deviation) of each frame of [..., H, W, C] `frames` over all its pixels and channels.

  Both are [..., 1, 1, 1]; the deviation is floored at 1/sqrt(H * W * C), as in
  tf.image.per_image_standardization, so a flat frame is not divided by zero.
  """
  frames = tf.cast(frames, tf.float32)
  mean, variance = tf.nn.moments(frames, axes=[-3, -2, -1], keepdims=True)
  size = tf.cast(tf.reduce_prod(tf.shape(frames)[-3:]), tf.float32)
  return mean, tf.maximum(tf.sqrt(variance), tf.math.rsqrt(size))


def standardize(images, moments=None) -> tf.Tensor:
  """float32 frames minus their mean over their deviation (frame_moments): the model's input.

  The one definition of data.standardize, used by logits() below on whole frames and by
  training on crops, with `moments` the (mean, deviation) of each crop's whole frame: a window
  of a standardized frame, resized or not (resizing is linear), is the same window standardized
  by the frame's moments. `images` are in [0, 1]; a global brightness and contrast change of a
  frame leaves its input unchanged.
  """
  mean, deviation = frame_moments(images) if moments is None else moments
  return (tf.cast(images, tf.float32) - mean) / deviation


def logits(model, images, spec: Spec, out_size) -> tf.Tensor:
  """float32 [N, *out_size, C] logits: flips and scales averaged, resized bilinear to out_size.

  `images` are model-size frames in [0, 1], standardized here when the spec says so (before
  any scaling or padding). Logits are interpolated rather than class ids so boundaries stay
  smooth at label resolution.
  """
  if spec.standardize:
    images = standardize(images)
  x = model_lib.predict_logits(model, images, spec.flip, spec.scales, spec.size_multiple)
  return tf.image.resize(tf.cast(x, tf.float32), out_size, method='bilinear')


def class_ids(logits_: tf.Tensor, bias: Sequence[float] | np.ndarray | None) -> tf.Tensor:
  """int32 argmax of `logits_ + bias` over the last axis: the only decision rule there is."""
  logits_ = tf.convert_to_tensor(logits_)
  if bias is not None:
    logits_ += tf.constant(np.asarray(bias, np.float32), logits_.dtype)
  return tf.argmax(logits_, -1, output_type=tf.int32)


def predict(model, images, spec: Spec, out_size) -> tf.Tensor:
  """Class ids [N, *out_size] of model-size `images` under `spec`."""
  return class_ids(logits(model, images, spec, out_size), spec.bias)
