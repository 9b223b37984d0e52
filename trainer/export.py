"""Exports a trained U-Net for serving and reloading, and reads the export's label table back.

`export_model` writes three artifacts under one directory:

  model.keras   The Keras model (`keras.models.load_model` reloads it; plain layers only, so no
                custom objects are needed). For fine-tuning, evaluation or re-export.
  serving/      A TF SavedModel whose `serving_default` signature maps encoded PNG/JPEG bytes to
                per-pixel class ids at the input resolution, with decoding, scaling, resizing,
                optional flip and scale averaging and logit bias inside the graph. For TF
                Serving and `trainer.predict`.
  labels.json   Class names and colours, the void label, the model's input size, whether the
                flip is baked in, the test-time scales and the baked-in logit bias (null if
                none). Written last: it marks the export as complete.

An existing labels.json is removed before anything is replaced, model.keras is written under a
temporary name and renamed, serving/ is written in place (see export_model) and labels.json
last, so a crash at any point leaves a directory without labels.json, which `load_labels` (and
hence the predict tool) rejects. All file access goes through `tf.io.gfile`, so `export_dir`
may be a gs:// path.
"""

from collections.abc import Sequence
import json
import os
import tempfile

import keras
import tensorflow as tf

from camvid_common import fileio
from camvid_common.errors import InputError
from trainer import model as model_lib

MODEL_NAME = 'model.keras'
SERVING_NAME = 'serving'
LABELS_NAME = 'labels.json'


def _check_args(model: keras.Model, image_size, class_names, class_colors) -> tuple[int, int]:
  """Validates export_model's arguments against each other and the model; returns (h, w)."""
  if len(image_size) != 2 or any(int(s) < 1 for s in image_size):
    raise ValueError(f'image_size must be a positive (height, width), got {image_size!r}')
  height, width = (int(s) for s in image_size)
  num_classes = model.output_shape[-1]
  if len(class_names) != num_classes or len(class_colors) != num_classes:
    raise ValueError(f'the model has {num_classes} classes but got {len(class_names)} names '
                     f'and {len(class_colors)} colours')
  for name, color in zip(class_names, class_colors):
    if len(color) != 3 or any(not 0 <= int(c) <= 255 for c in color):
      raise ValueError(f'class {name!r}: colour must be [r, g, b] in 0..255, got {color!r}')
  # A fixed-size model would fail (or silently mis-trace) at serving time on another size.
  model_size = tuple(model.input_shape[1:3])
  if None not in model_size and model_size != (height, width):
    raise ValueError(f'image_size {(height, width)} differs from the model input {model_size}')
  return height, width


def _serving_fn(model: keras.Model, image_size: tuple[int, int], flip: bool,
                logit_bias: list[float] | None, scales: tuple[float, ...], multiple: int):
  """Returns fn(image_bytes) -> {'class_ids'}: the whole bytes-to-mask pipeline as TF ops."""
  height, width = image_size

  def decode_and_resize(encoded):
    # Same preprocessing as the evaluation input pipeline (trainer/data.py): [0, 1] float32,
    # bilinear resize with antialiasing to the size the model was trained at.
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    scaled = tf.image.convert_image_dtype(image, tf.float32)
    resized = tf.image.resize(scaled, [height, width], method='bilinear', antialias=True)
    return resized, tf.shape(image)[:2]

  def serve(image_bytes):
    # Resizing inside map_fn gives every element the same static shape, so a batch of differing
    # sizes reaches the explicit check below (not an obscure TensorList error) and an empty
    # batch stacks cleanly.
    images, sizes = tf.map_fn(
        decode_and_resize, image_bytes,
        fn_output_signature=(tf.TensorSpec([height, width, 3], tf.float32),
                             tf.TensorSpec([2], tf.int32)))
    # The first image's size; a 1x1 dummy keeps an empty batch valid (its output is empty).
    out_size = tf.concat([sizes, [[1, 1]]], axis=0)[0]
    tf.debugging.assert_equal(
        sizes, tf.broadcast_to(out_size, tf.shape(sizes)),
        message='all images of one call must have the same height and width')

    def class_ids():
      logits = model_lib.predict_logits(model, images, flip, scales, multiple)
      # Interpolate the logits, not the argmax, so class boundaries are smooth at full
      # resolution.
      logits = tf.image.resize(logits, out_size, method='bilinear')
      if logit_bias is not None:
        logits += tf.constant(logit_bias, logits.dtype)
      return tf.cast(tf.argmax(logits, axis=-1), tf.uint8)

    # An empty call skips the model: on CPUs with AVX-512, TF 2.21's oneDNN convolution returns
    # its input's shape for a batch of 0 ([0, H, W, 3] instead of [0, H, W, filters]), which
    # the next BatchNormalization then rejects.
    return {'class_ids': tf.cond(tf.shape(images)[0] > 0, class_ids,
                                 lambda: tf.zeros([0, out_size[0], out_size[1]], tf.uint8))}

  return serve


def _write_saved_model(model: keras.Model, path: str, image_size: tuple[int, int],
                       flip: bool, logit_bias: list[float] | None, scales: tuple[float, ...],
                       multiple: int) -> None:
  """Writes the serving SavedModel to `path` (which must not exist)."""
  # keras.export.ExportArchive rather than tf.saved_model.save on a hand-made tf.Module: it
  # tracks the Keras 3 model's variables for us, traces the endpoint from the input signature
  # and handles the byte-string input and dict output without workarounds. Naming the endpoint
  # 'serving_default' makes it the one and only signature (no duplicate 'serve' alias).
  archive = keras.export.ExportArchive()
  archive.track(model)
  archive.add_endpoint(
      'serving_default', _serving_fn(model, image_size, flip, logit_bias, scales, multiple),
      input_signature=[tf.TensorSpec([None], tf.string, name='image_bytes')])
  archive.write_out(path, verbose=False)


def _remove(path: str) -> None:
  """Deletes a file or directory tree if it exists."""
  if tf.io.gfile.isdir(path):
    tf.io.gfile.rmtree(path)
  elif tf.io.gfile.exists(path):
    tf.io.gfile.remove(path)


def export_model(model: keras.Model,
                 export_dir: str,
                 *,
                 image_size: tuple[int, int],
                 class_names: list[str],
                 class_colors: list[list[int]],
                 ignore_label: int = 255,
                 flip: bool = False,
                 logit_bias: Sequence[float] | None = None,
                 scales: Sequence[float] = (1.0,),
                 multiple: int = 1) -> None:
  """Writes model.keras, the serving SavedModel and labels.json under `export_dir`.

  The serving signature `serving_default` takes `image_bytes`, a 1-D string tensor of encoded
  PNG or JPEG images. All images of one call must have the same height and width (they are
  stacked into one batch); the call fails otherwise. Each image is decoded to RGB, scaled to
  [0, 1], resized to `image_size` (bilinear, antialiased), run through the model in inference
  mode (with `flip`, logits are averaged with those of the horizontally flipped image; with
  `scales`, over the image resized by each scale, model.predict_logits), the
  logits are resized back to the input resolution (bilinear) and `logit_bias` is added. It
  returns
  `{'class_ids': uint8 [N, H, W]}`, the per-pixel argmax; void is never predicted.

  An existing export in `export_dir` is replaced. Call from one process only (e.g. the chief):
  the writes are not coordinated between workers.

  Args:
    model: Keras model mapping [N, h, w, 3] images in [0, 1] to float32 logits [N, h, w, C].
    export_dir: Output directory (created if needed); local or gs://.
    image_size: (height, width) the model was trained at and serving resizes to.
    class_names: C class names, index order.
    class_colors: C [r, g, b] colours, index order.
    ignore_label: The void label value of the training masks, recorded in labels.json.
    flip: Bake horizontal-flip test-time averaging into the serving signature.
    scales: Test-time scales averaged in the serving signature; other than (1.0,) the model
      must accept any input size (build_unet's any_size).
    multiple: The model's size multiple (model.size_multiple) scaled images are padded to.
    logit_bias: Optional [C] offsets added to the logits before the argmax (the trainer's
      logit adjustment, losses.logit_adjustment_bias); None adds nothing.

  Raises:
    ValueError: If the arguments disagree with each other or with the model.
  """
  height, width = _check_args(model, image_size, class_names, class_colors)
  if logit_bias is not None:
    logit_bias = [float(b) for b in logit_bias]
    if len(logit_bias) != len(class_names):
      raise ValueError(f'logit_bias has {len(logit_bias)} values for {len(class_names)} classes')
  tf.io.gfile.makedirs(export_dir)
  labels_path = os.path.join(export_dir, LABELS_NAME)
  # Remove the completeness marker first: from here until the new one is written, the directory
  # must not look like a finished export, even though old artifacts may still be present.
  _remove(labels_path)

  # Keras only saves .keras archives to paths ending in .keras and uses plain file I/O, so save
  # locally and copy through gfile (which also covers gs://) to a temporary name.
  model_path = os.path.join(export_dir, MODEL_NAME)
  model_tmp = fileio.temp_path(model_path)
  try:
    with tempfile.TemporaryDirectory() as local_dir:
      local_model = os.path.join(local_dir, MODEL_NAME)
      model.save(local_model)
      tf.io.gfile.copy(local_model, model_tmp, overwrite=True)
    tf.io.gfile.rename(model_tmp, model_path, overwrite=True)
  finally:
    _remove(model_tmp)

  # The SavedModel is written in place, not under a temporary name and renamed: a directory
  # rename on GCS is a copy and a delete per object (no more atomic than writing in place), and
  # TF 2.21's gives up with a 404 when a transient error hits the is-directory check of its retry
  # (it then renames the directory as if it were one object). labels.json, removed above and
  # written last, is what marks the export complete.
  serving_path = os.path.join(export_dir, SERVING_NAME)
  _remove(serving_path)
  _write_saved_model(model, serving_path, (height, width), flip, logit_bias,
                     tuple(float(s) for s in scales), int(multiple))

  labels = {
      'classes': [{'index': i, 'name': str(name), 'color': [int(c) for c in color]}
                  for i, (name, color) in enumerate(zip(class_names, class_colors))],
      'ignore_label': int(ignore_label),
      'image_size': [height, width],
      'flip': bool(flip),
      'scales': [float(s) for s in scales],
      'logit_bias': logit_bias,
  }
  fileio.write_atomic(labels_path, json.dumps(labels, indent=2) + '\n')


def _check_labels(labels) -> str | None:
  """Returns what is wrong with a parsed labels.json, or None if it is well-formed."""
  if not isinstance(labels, dict):
    return 'expected a JSON object'
  missing = [k for k in ('classes', 'ignore_label', 'image_size', 'flip') if k not in labels]
  if missing:
    return f'missing keys {missing}'
  classes = labels['classes']
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
  if not isinstance(labels['ignore_label'], int):
    return '"ignore_label" must be an integer'
  size = labels['image_size']
  if (not isinstance(size, list) or len(size) != 2
      or not all(isinstance(s, int) and s > 0 for s in size)):
    return '"image_size" must be [height, width]'
  if not isinstance(labels['flip'], bool):
    return '"flip" must be true or false'
  # Optional: exports written before multi-scale averaging existed have no such key.
  scales = labels.get('scales', [1.0])
  if (not isinstance(scales, list) or not scales or not all(
      isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 for s in scales)):
    return '"scales" must be a non-empty list of positive numbers'
  # Optional: exports written before logit adjustment existed have no such key.
  bias = labels.get('logit_bias')
  if bias is not None and (not isinstance(bias, list) or len(bias) != len(classes) or not all(
      isinstance(b, (int, float)) and not isinstance(b, bool) for b in bias)):
    return f'"logit_bias" must be null or a list of {len(classes)} numbers'
  return None


def load_labels(export_dir: str) -> dict:
  """Reads and validates `export_dir`/labels.json.

  Returns:
    The parsed dict: `classes` (list of {index, name, color}), `ignore_label`, `image_size`
    ([h, w]), `flip` and optionally `scales` and `logit_bias` (both already applied inside
    the serving signature; informational).

  Raises:
    InputError: If the file is missing (the export is absent or incomplete) or malformed; the
      message names the file.
  """
  path = os.path.join(export_dir, LABELS_NAME)
  if not tf.io.gfile.exists(path):
    raise InputError(f'{path}: not found (no complete export in {export_dir})')
  with tf.io.gfile.GFile(path, 'r') as f:
    text = f.read()
  try:
    labels = json.loads(text)
  except json.JSONDecodeError as e:
    raise InputError(f'{path}: not valid JSON ({e})') from None
  problem = _check_labels(labels)
  if problem:
    raise InputError(f'{path}: {problem}')
  return labels
