"""The TFRecord feature keys and Example encode/decode: the single contract between builder and trainer.

The keys are TF Model Garden's segmentation keys (official/vision/dataloaders/segmentation_input.py
and tfexample_utils), so its decoders read our shards unchanged. Masks are single-channel uint8 PNGs
of class indices with void stored as IGNORE_LABEL.
"""

import tensorflow as tf

IMAGE_ENCODED = 'image/encoded'
IMAGE_FORMAT = 'image/format'
IMAGE_HEIGHT = 'image/height'
IMAGE_WIDTH = 'image/width'
SOURCE_ID = 'image/source_id'
MASK_ENCODED = 'image/segmentation/class/encoded'
MASK_FORMAT = 'image/segmentation/class/format'

IGNORE_LABEL = 255


def _bytes(value: bytes) -> tf.train.Feature:
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int64(value: int) -> tf.train.Feature:
  return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))


def encode_example(*, image: bytes, image_format: str, height: int, width: int,
                   source_id: str, mask_png: bytes) -> bytes:
  """Serialises one (image, mask) pair as a tf.train.Example."""
  feature = {
      IMAGE_ENCODED: _bytes(image),
      IMAGE_FORMAT: _bytes(image_format.encode()),
      IMAGE_HEIGHT: _int64(height),
      IMAGE_WIDTH: _int64(width),
      SOURCE_ID: _bytes(source_id.encode()),
      MASK_ENCODED: _bytes(mask_png),
      MASK_FORMAT: _bytes(b'png'),
  }
  # deterministic=True sorts the feature map, so the same input gives byte-identical shards.
  example = tf.train.Example(features=tf.train.Features(feature=feature))
  return example.SerializeToString(deterministic=True)


FEATURE_SPEC = {
    IMAGE_ENCODED: tf.io.FixedLenFeature((), tf.string),
    IMAGE_FORMAT: tf.io.FixedLenFeature((), tf.string, default_value='png'),
    IMAGE_HEIGHT: tf.io.FixedLenFeature((), tf.int64),
    IMAGE_WIDTH: tf.io.FixedLenFeature((), tf.int64),
    SOURCE_ID: tf.io.FixedLenFeature((), tf.string, default_value=''),
    MASK_ENCODED: tf.io.FixedLenFeature((), tf.string),
    MASK_FORMAT: tf.io.FixedLenFeature((), tf.string, default_value='png'),
}


def parse_example(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
  """Parses and decodes one serialized Example (graph-friendly, for tf.data).

  Returns:
    A dict with 'image' (uint8 [H, W, 3]), 'mask' (uint8 [H, W], void = IGNORE_LABEL) and
    'source_id' (string scalar).
  """
  parsed = tf.io.parse_single_example(serialized, FEATURE_SPEC)
  height = tf.cast(parsed[IMAGE_HEIGHT], tf.int32)
  width = tf.cast(parsed[IMAGE_WIDTH], tf.int32)
  # decode_image handles both PNG and JPEG sources; expand_animations=False keeps it rank 3.
  image = tf.io.decode_image(parsed[IMAGE_ENCODED], channels=3, expand_animations=False)
  image = tf.reshape(image, tf.stack([height, width, 3]))
  mask = tf.io.decode_png(parsed[MASK_ENCODED], channels=1)
  mask = tf.reshape(mask, tf.stack([height, width]))
  return {'image': image, 'mask': mask, 'source_id': parsed[SOURCE_ID]}
