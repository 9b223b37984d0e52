"""Exports a trained U-Net for serving and reloading, and reads the export's label table back.

`export_model` writes three artifacts under one directory:

  model.keras   The Keras model (`keras.models.load_model` reloads it; plain layers only, so no
                custom objects are needed). For fine-tuning, evaluation or re-export.
  serving/      A TF SavedModel whose `serving_default` signature maps encoded PNG/JPEG bytes to
                per-pixel class ids at the input resolution, with decoding, scaling, resizing,
                optional standardization, flip and scale averaging and logit bias inside the
                graph. For TF Serving and `trainer.predict`.
  labels.json   The inference spec (trainer/inference.py): class names and colours, the void
                label, the model's input size, the baked-in standardization, flip, scales and
                logit bias (null if none), the training class weights. Written last: it marks
                the export as complete.

An existing labels.json is removed before anything is replaced, model.keras is written under a
temporary name and renamed, serving/ is written in place (see export_model) and labels.json
last, so a crash at any point leaves a directory without labels.json, which `load_labels` (and
hence the predict tool) rejects. All file access goes through `tf.io.gfile`, so `export_dir`
may be a gs:// path.
"""

import json
import os
import tempfile

import keras
import tensorflow as tf

from camvid_common import fileio
from camvid_common.errors import InputError
from trainer import inference

MODEL_NAME = 'model.keras'
SERVING_NAME = 'serving'
LABELS_NAME = 'labels.json'


def _check_args(model: keras.Model, spec: inference.Spec) -> None:
  """Validates the spec against the model."""
  num_classes = model.output_shape[-1]
  if spec.num_classes != num_classes:
    raise ValueError(f'the model has {num_classes} classes but the spec names '
                     f'{spec.num_classes}')
  problem = inference.check_record(spec.to_json())
  if problem:
    raise ValueError(problem)
  # A fixed-size model would fail (or silently mis-trace) at serving time on another size.
  model_size = tuple(model.input_shape[1:3])
  if None not in model_size and model_size != tuple(spec.image_size):
    raise ValueError(f'image_size {tuple(spec.image_size)} differs from the model input '
                     f'{model_size}')


def _serving_fn(model: keras.Model, spec: inference.Spec):
  """Returns fn(image_bytes) -> {'class_ids'}: the whole bytes-to-mask pipeline as TF ops."""
  height, width = spec.image_size

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
      return tf.cast(inference.predict(model, images, spec, out_size), tf.uint8)

    # An empty call skips the model: on CPUs with AVX-512, TF 2.21's oneDNN convolution returns
    # its input's shape for a batch of 0 ([0, H, W, 3] instead of [0, H, W, filters]), which
    # the next BatchNormalization then rejects.
    return {'class_ids': tf.cond(tf.shape(images)[0] > 0, class_ids,
                                 lambda: tf.zeros([0, out_size[0], out_size[1]], tf.uint8))}

  return serve


def _write_saved_model(model: keras.Model, path: str, spec: inference.Spec) -> None:
  """Writes the serving SavedModel to `path` (which must not exist)."""
  # keras.export.ExportArchive rather than tf.saved_model.save on a hand-made tf.Module: it
  # tracks the Keras 3 model's variables for us, traces the endpoint from the input signature
  # and handles the byte-string input and dict output without workarounds. Naming the endpoint
  # 'serving_default' makes it the one and only signature (no duplicate 'serve' alias).
  archive = keras.export.ExportArchive()
  archive.track(model)
  archive.add_endpoint(
      'serving_default', _serving_fn(model, spec),
      input_signature=[tf.TensorSpec([None], tf.string, name='image_bytes')])
  archive.write_out(path, verbose=False)


def _remove(path: str) -> None:
  """Deletes a file or directory tree if it exists."""
  if tf.io.gfile.isdir(path):
    tf.io.gfile.rmtree(path)
  elif tf.io.gfile.exists(path):
    tf.io.gfile.remove(path)


def export_model(model: keras.Model, export_dir: str, spec: inference.Spec) -> None:
  """Writes model.keras, the serving SavedModel and labels.json under `export_dir`.

  The serving signature `serving_default` takes `image_bytes`, a 1-D string tensor of encoded
  PNG or JPEG images. All images of one call must have the same height and width (they are
  stacked into one batch); the call fails otherwise. Each image is decoded to RGB, scaled to
  [0, 1], resized to `spec.image_size` (bilinear, antialiased) and turned into class ids by
  `inference.predict` at the input resolution (standardization, test-time flip and scales,
  decision bias). It returns `{'class_ids': uint8 [N, H, W]}`; void is never predicted.
  labels.json is `spec.to_json()`.

  An existing export in `export_dir` is replaced. Call from one process only (e.g. the chief):
  the writes are not coordinated between workers.

  Args:
    model: Keras model mapping [N, h, w, 3] images in [0, 1] to float32 logits [N, h, w, C]
      (built with any_size when spec.scales is not (1.0,)).
    export_dir: Output directory (created if needed); local or gs://.
    spec: How the model predicts (trainer/inference.py).

  Raises:
    ValueError: If the spec disagrees with the model or is malformed.
  """
  _check_args(model, spec)
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
  _write_saved_model(model, serving_path, spec)

  fileio.write_atomic(labels_path, json.dumps(spec.to_json(), indent=2) + '\n')


def write_serving_root(model: keras.Model, directory: str, spec: inference.Spec) -> None:
  """Writes the serving SavedModel (saved_model.pb, variables/) at `directory`'s root.

  For Vertex AI, whose model import reads a SavedModel from the root of AIP_MODEL_DIR; the
  directory's other files (a run's model_dir) stay. A previous copy is replaced.
  """
  _check_args(model, spec)
  for name in ('saved_model.pb', 'fingerprint.pb', 'variables', 'assets'):
    _remove(os.path.join(directory, name))
  _write_saved_model(model, directory, spec)


def load_labels(export_dir: str) -> dict:
  """Reads and validates `export_dir`/labels.json.

  Returns:
    The parsed dict (inference.Spec.to_json's keys): `classes` (list of {index, name, color}),
    `ignore_label`, `image_size` ([h, w]), `flip` and optionally `scales`, `logit_bias`,
    `size_multiple` and `class_weights` (all already applied inside the serving signature;
    informational).

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
  problem = inference.check_record(labels)
  if problem:
    raise InputError(f'{path}: {problem}')
  return labels
