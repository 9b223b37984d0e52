"""`python -m trainer.predict`: segments images with an exported model, writing masks and overlays.

    python -m trainer.predict --model_dir M --input IMG_OR_DIR --output_dir O [--batch_size 8]

Uses what `trainer.export` wrote to M/export: the `serving` SavedModel (which decodes, resizes
and runs the model itself, so predictions match what TF Serving would return) and labels.json
(class colours). `--input` is one image or a directory of .png/.jpg/.jpeg files (sorted, not
recursive). For each image <stem>.<ext> it writes O/<stem>_mask.png (class colours) and
O/<stem>_overlay.png (colours blended over the image), each atomically.

Consecutive images of the same size are sent to the model together, up to --batch_size at a time
(the serving signature needs one size per call). Images are processed in sorted order, so if a
corrupt image stops the run, the outputs of the images before it are complete and valid.

Bad input (a missing flag, no export, no images, an unreadable image) prints one
`error: <path or flag>: <problem>` line on stderr and exits with code 2, without a traceback.
"""

import io
import os
import re
import time

from camvid_common import quiet

quiet.start()  # Before anything imports TensorFlow: hides its load-time C++ log.

from absl import flags
import numpy as np
from PIL import Image
import tensorflow as tf

from camvid_common import errors
from camvid_common import fileio
from trainer import export as export_lib
from trainer import visualize

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
EXPORT_SUBDIR = 'export'

_MODEL_DIR = flags.DEFINE_string('model_dir', None,
                                 'Training output directory; its export/ subdirectory is used.')
_INPUT = flags.DEFINE_string('input', None,
                             'An image file, or a directory of .png/.jpg/.jpeg images.')
_OUTPUT_DIR = flags.DEFINE_string('output_dir', None, 'Where masks and overlays are written.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 8, 'Images per model call (same-size images).')
quiet.define_absl_flag()


def _op_error_text(e: tf.errors.OpError) -> str:
  """The useful part of a TF op error: drops the function-node prefix and the op suffix."""
  text = e.message.strip().splitlines()[0] if e.message.strip() else type(e).__name__
  text = re.sub(r'\{\{[^}]*\}\}\s*', '', text)
  return re.sub(r'\s*\[Op:\w+\]\s*$', '', text)


def load_export(model_dir: str):
  """Loads M/export: returns (serving signature, labels dict), or raises InputError."""
  if not tf.io.gfile.isdir(model_dir):
    raise errors.InputError(f'--model_dir {model_dir}: no such directory')
  export_dir = os.path.join(model_dir, EXPORT_SUBDIR)
  # labels.json is written last, so its absence means no export or an interrupted one.
  if not tf.io.gfile.exists(os.path.join(export_dir, export_lib.LABELS_NAME)):
    raise errors.InputError(f'{export_dir}: export missing or incomplete (no '
                            f'{export_lib.LABELS_NAME}); train first, or export the trained model')
  labels = export_lib.load_labels(export_dir)
  serving_dir = os.path.join(export_dir, export_lib.SERVING_NAME)
  if not tf.io.gfile.exists(os.path.join(serving_dir, 'saved_model.pb')):
    raise errors.InputError(f'{serving_dir}: SavedModel missing; export the model again')
  try:
    loaded = tf.saved_model.load(serving_dir)
  except (tf.errors.OpError, OSError, ValueError) as e:
    raise errors.InputError(f'{serving_dir}: cannot load the SavedModel ({e})') from None
  if 'serving_default' not in loaded.signatures:
    raise errors.InputError(f'{serving_dir}: no serving_default signature')
  return loaded.signatures['serving_default'], labels


def list_images(path: str) -> list[str]:
  """Returns [path] for a file, or the sorted images directly inside a directory."""
  if not tf.io.gfile.exists(path):
    raise errors.InputError(f'{path}: no such file or directory')
  if not tf.io.gfile.isdir(path):
    return [path]
  images = []
  for name in sorted(tf.io.gfile.listdir(path)):
    name = name.rstrip('/')  # GCS lists subdirectories with a trailing slash.
    full = os.path.join(path, name)
    if name.lower().endswith(IMAGE_EXTENSIONS) and not tf.io.gfile.isdir(full):
      images.append(full)
  if not images:
    raise errors.InputError(f'{path}: no {"/".join(IMAGE_EXTENSIONS)} images in this directory')
  # a.png and a.jpg would both write a_mask.png; refuse rather than silently overwrite one.
  seen = {}
  for image in images:
    stem = _stem(image)
    if stem in seen:
      raise errors.InputError(f'{image}: same name as {seen[stem]}; their outputs would collide')
    seen[stem] = image
  return images


def _stem(path: str) -> str:
  return os.path.splitext(os.path.basename(path.rstrip('/')))[0]


def _read_image(path: str) -> tuple[bytes, np.ndarray]:
  """Returns the encoded bytes and the decoded [H, W, 3] uint8 image, or raises InputError."""
  try:
    with tf.io.gfile.GFile(path, 'rb') as f:
      data = f.read()
  except tf.errors.OpError as e:
    raise errors.InputError(f'{path}: cannot read ({_op_error_text(e)})') from None
  # Decode with the same TF decoder as the serving graph: the overlay then shows exactly the
  # pixels the model saw, and a file the graph would reject is reported here, by name.
  try:
    image = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
  except tf.errors.OpError as e:
    raise errors.InputError(
        f'{path}: not a valid PNG or JPEG image ({_op_error_text(e)})') from None
  return data, image


def _png_bytes(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format='PNG')
  return buf.getvalue()


class _Predictor:
  """Batches same-size images into serving calls and writes each image's outputs."""

  def __init__(self, serve, labels: dict, output_dir: str, batch_size: int):
    self._serve = serve
    self._colors = np.array([c['color'] for c in labels['classes']], dtype=np.uint8)
    self._ignore_label = labels['ignore_label']
    self._output_dir = output_dir
    self._batch_size = batch_size
    self._pending = []  # (path, encoded bytes, decoded image), all of one size.
    self.num_done = 0

  def add(self, path: str, data: bytes, image: np.ndarray) -> None:
    if self._pending and self._pending[0][2].shape != image.shape:
      self.flush()
    self._pending.append((path, data, image))
    if len(self._pending) >= self._batch_size:
      self.flush()

  def flush(self) -> None:
    if not self._pending:
      return
    batch = tf.constant([data for _, data, _ in self._pending])
    class_ids = self._serve(image_bytes=batch)['class_ids'].numpy()
    for (path, _, image), ids in zip(self._pending, class_ids):
      stem = _stem(path)
      mask_path = os.path.join(self._output_dir, f'{stem}_mask.png')
      overlay_path = os.path.join(self._output_dir, f'{stem}_overlay.png')
      fileio.write_atomic(mask_path, _png_bytes(
          visualize.colorize(ids, self._colors, ignore_label=self._ignore_label)))
      fileio.write_atomic(overlay_path, _png_bytes(
          visualize.overlay(image, ids, self._colors, ignore_label=self._ignore_label)))
      height, width = ids.shape
      print(f'{path}: {height}x{width} -> {mask_path}, {overlay_path}', flush=True)
      self.num_done += 1
    self._pending = []


def main(argv):
  del argv  # run_app rejects positional arguments.
  for flag in (_MODEL_DIR, _INPUT, _OUTPUT_DIR):
    if not flag.value:
      raise errors.InputError(f'--{flag.name} is required')
  if _BATCH_SIZE.value < 1:
    raise errors.InputError(f'--batch_size {_BATCH_SIZE.value}: must be at least 1')

  for flag in (_MODEL_DIR, _INPUT, _OUTPUT_DIR):
    fileio.check_bucket(flag.value, f'--{flag.name}')
  # Input first: listing is cheap, loading the SavedModel is not.
  images = list_images(_INPUT.value)
  serve, labels = load_export(_MODEL_DIR.value)
  tf.io.gfile.makedirs(_OUTPUT_DIR.value)

  start = time.monotonic()
  predictor = _Predictor(serve, labels, _OUTPUT_DIR.value, _BATCH_SIZE.value)
  for path in images:
    try:
      data, image = _read_image(path)
    except errors.InputError:
      predictor.flush()  # The images before the bad one still get their outputs.
      raise
    predictor.add(path, data, image)
  predictor.flush()
  seconds = time.monotonic() - start
  print(f'{predictor.num_done} images -> {_OUTPUT_DIR.value} '
        f'({2 * predictor.num_done} PNGs, {seconds:.1f} s)')
  return 0


def run():
  """Console-script entry: user mistakes become one line on stderr and exit code 2."""
  errors.run_app(main)


if __name__ == '__main__':
  run()
