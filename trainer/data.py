"""tf.data input pipelines from a builder manifest: read, decode, augment, batch, shard per worker.

Each pipeline is a pure function of (manifest, config, input context, epoch): a restarted worker
rebuilds exactly the stream it was reading and skips the batches it already trained on (records
are skipped before decoding, and augmentation is seeded by each record's position, so skipping
changes nothing downstream). Everything in the hot path is TensorFlow ops; no Python runs per
example.

Sharding is exactly-once: with at least as many shard files as input pipelines (workers) each
pipeline reads its own files, otherwise every pipeline reads all files and keeps every n-th record.
Pipelines hold different numbers of examples, but collective ops need every worker to run the
same number of steps, so each stream is padded to a common length with all-void examples:
void pixels carry no loss and count in no metric, so nothing is dropped and nothing is counted
twice. Evaluation marks padding with valid=False as well, so example counts stay exact.
"""

import dataclasses
import math

import tensorflow as tf

from tfrecords_builder import features
from tfrecords_builder.manifest import Manifest
from trainer.errors import ConfigError

AUTOTUNE = tf.data.AUTOTUNE
_MAX_PARALLEL_FILES = 16


@dataclasses.dataclass(frozen=True)
class PipelineShare:
  """What one input pipeline (worker) reads of a split."""
  files: list[str]
  num_examples: int
  record_level: bool  # True: read every file and keep every num_pipelines-th record.


def _context(ctx: tf.distribute.InputContext | None) -> tf.distribute.InputContext:
  return ctx if ctx is not None else tf.distribute.InputContext()


def pipeline_share(manifest: Manifest, split: str, num_pipelines: int,
                   pipeline_id: int) -> PipelineShare:
  """The files and example count of one pipeline: file-level when there are enough files."""
  paths = manifest.shard_paths(split)
  sizes = manifest.split(split)['shard_sizes']
  if len(paths) >= num_pipelines:
    return PipelineShare(paths[pipeline_id::num_pipelines],
                         sum(sizes[pipeline_id::num_pipelines]), record_level=False)
  total = sum(sizes)
  return PipelineShare(paths, len(range(pipeline_id, total, num_pipelines)), record_level=True)


def steps_per_pass(manifest: Manifest, split: str, global_batch: int,
                   num_pipelines: int) -> int:
  """Batches per replica to cover the largest pipeline's share once (same for all workers)."""
  per_pipeline_batch = global_batch // num_pipelines
  largest = max(pipeline_share(manifest, split, num_pipelines, i).num_examples
                for i in range(num_pipelines))
  return max(1, math.ceil(largest / per_pipeline_batch))


def check_batch(global_batch: int, num_replicas: int, flag: str) -> None:
  if global_batch % num_replicas:
    raise ConfigError(f'{flag}: global batch {global_batch} is not divisible by the '
                     f'{num_replicas} replicas')


def _records(share: PipelineShare, ctx: tf.distribute.InputContext,
             shuffle_seed: int | None) -> tf.data.Dataset:
  files = tf.data.Dataset.from_tensor_slices(share.files)
  if shuffle_seed is not None:
    # Same seed on every worker: record-level sharding needs one agreed global order.
    files = files.shuffle(len(share.files), seed=shuffle_seed)
  records = files.interleave(
      tf.data.TFRecordDataset, cycle_length=min(len(share.files), _MAX_PARALLEL_FILES),
      block_length=1, num_parallel_calls=AUTOTUNE, deterministic=True)
  if share.record_level:
    records = records.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
  return records


def _epoch_seed(seed: int, epoch: int) -> int:
  return (seed * 1_000_003 + epoch * 7_919) % (2**31 - 1)


def _uniform(seed, low, high, dtype=tf.float32):
  return tf.random.stateless_uniform([], seed, low, high, dtype=dtype)


def augment(image: tf.Tensor, mask: tf.Tensor, seed: tf.Tensor, config) -> dict:
  """Random scale, crop (void-padded), flip and photometric jitter; masks only ever nearest.

  Geometrically this is: resize the frame to image_size * scale, pad it with void up to the
  crop size (config.crop_size, default image_size), take a random crop of that size. It is
  computed the cheap way round: the crop window is found in source pixels first and only that
  window is resized, so the cost follows the output size, not the (larger) source frame.

  Args:
    image: uint8 or float32 [H, W, 3] (float in [0, 1]).
    mask: uint8 [H, W], void = 255.
    seed: int64 [2] stateless seed.
    config: the trainer Config.

  Returns:
    {'image': float32 [height, width, 3] in [0, 1], 'mask': uint8 [height, width]}, of size
    config.crop_size (default image_size).
  """
  height, width = config.crop_size or config.image_size
  seeds = tf.random.experimental.stateless_split(seed, num=7)
  source = tf.shape(image)[:2]
  # Scale 1 maps the whole frame onto image_size, the geometry evaluation uses.
  scale = _uniform(seeds[0], config.scale_min, config.scale_max)
  new_h = tf.cast(tf.round(config.image_size[0] * scale), tf.int32)
  new_w = tf.cast(tf.round(config.image_size[1] * scale), tf.int32)
  top = _uniform(seeds[1], 0, tf.maximum(new_h - height, 0) + 1, tf.int32)
  left = _uniform(seeds[2], 0, tf.maximum(new_w - width, 0) + 1, tf.int32)
  # The part of the crop the scaled frame covers; the rest (when scale < 1) is void padding.
  valid_h, valid_w = tf.minimum(height, new_h - top), tf.minimum(width, new_w - left)
  y0, y1 = _source_range(top, valid_h, new_h, source[0])
  x0, x1 = _source_range(left, valid_w, new_w, source[1])
  window = image[y0:y1, x0:x1]
  # uint8 goes straight into the resize (which returns float32): no full-frame float copy.
  unit = 1.0 / 255.0 if window.dtype == tf.uint8 else 1.0
  size = tf.stack([valid_h, valid_w])
  # Plain bilinear is a sound filter down to half size (each output pixel then blends its 2x2
  # source neighbourhood); below that it skips source pixels and aliases. TF's antialiased
  # kernel costs ~3x more, so only crops shrunk by more than 2x pay for it.
  shrinks = tf.reduce_any(2 * size < tf.stack([y1 - y0, x1 - x0]))
  image = tf.cond(shrinks,
                  lambda: tf.image.resize(window, size, method='bilinear', antialias=True),
                  lambda: tf.image.resize(window, size, method='bilinear')) * unit
  mask = _resize_nearest(mask[y0:y1, x0:x1], size)
  image = tf.pad(image, [[0, height - valid_h], [0, width - valid_w], [0, 0]])
  mask = tf.pad(mask, [[0, height - valid_h], [0, width - valid_w]],
                constant_values=features.IGNORE_LABEL)
  if config.hflip:
    flip = _uniform(seeds[3], 0.0, 1.0) < 0.5
    image = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
    mask = tf.cond(flip, lambda: tf.reverse(mask, [1]), lambda: mask)
  if config.brightness:
    image = tf.image.stateless_random_brightness(image, config.brightness, seeds[4])
  if config.contrast:
    image = tf.image.stateless_random_contrast(image, 1 - config.contrast,
                                               1 + config.contrast, seeds[5])
  if config.saturation:
    # Blending with the grey image (PIL's ImageEnhance.Color, torchvision's adjust_saturation)
    # instead of tf.image's HSV round trip, which costs as much as the resize.
    factor = _uniform(seeds[6], 1 - config.saturation, 1 + config.saturation)
    grey = tf.image.rgb_to_grayscale(image)
    image = grey + factor * (image - grey)
  image = tf.clip_by_value(image, 0.0, 1.0)
  image.set_shape([height, width, 3])
  mask.set_shape([height, width])
  return {'image': image, 'mask': mask}


def _resize_nearest(mask: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
  """tf.image.resize(method='nearest') of a [H, W] mask, as two gathers (about half the cost).

  Same sampling as TF's half-pixel-centre nearest resize: output pixel i reads source pixel
  floor((i + 0.5) * source / size).
  """
  def indices(out_len, in_len):
    step = tf.cast(in_len, tf.float32) / tf.cast(out_len, tf.float32)
    index = tf.cast(tf.floor((tf.range(out_len, dtype=tf.float32) + 0.5) * step), tf.int32)
    return tf.minimum(index, in_len - 1)
  source = tf.shape(mask)
  rows = tf.gather(mask, indices(size[0], source[0]))
  return tf.gather(rows, indices(size[1], source[1]), axis=1)


def _source_range(start: tf.Tensor, length: tf.Tensor, scaled: tf.Tensor,
                  source: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Source pixel range [lo, hi) behind [start, start + length) of a frame scaled to `scaled`."""
  ratio = tf.cast(source, tf.float32) / tf.cast(scaled, tf.float32)
  lo = tf.cast(tf.floor(tf.cast(start, tf.float32) * ratio), tf.int32)
  hi = tf.cast(tf.round(tf.cast(start + length, tf.float32) * ratio), tf.int32)
  return lo, tf.clip_by_value(hi, lo + 1, source)


def _void_example(config, label_size=None, valid=None, crop=False):
  height, width = (config.crop_size if crop else None) or config.image_size
  label_size = label_size or (height, width)
  element = {'image': tf.zeros([height, width, 3], tf.float32),
             'mask': tf.fill(label_size, tf.constant(features.IGNORE_LABEL, tf.uint8))}
  if valid is not None:
    element['valid'] = tf.constant(valid)
  return element


class TrainInput:
  """Builds each epoch's training stream; keeps decoded frames in memory across epochs.

  Decoding a 480x360 PNG costs more than all the augmentation after it, so when a pipeline's
  share of the train split fits in config.cache_decoded_mb the decoded uint8 frames are kept
  (tf.data's in-memory cache, filled during the first epoch and shared by the datasets of later
  epochs, which is why one object must build them all) and each epoch is a seeded permutation
  of them. Larger data is streamed from the shards every epoch instead.
  """

  def __init__(self, manifest: Manifest, config):
    self._manifest = manifest
    self._config = config
    self._cached = {}  # input_pipeline_id -> cached decoded dataset

  def cache_bytes(self, num_pipelines: int = 1) -> int | None:
    """Decoded size of the largest pipeline share, or None when frame sizes vary."""
    size = self._manifest.split('train').get('image_size')
    if size is None:
      return None
    largest = max(pipeline_share(self._manifest, 'train', num_pipelines, i).num_examples
                  for i in range(num_pipelines))
    return largest * size[0] * size[1] * 4  # 3 image bytes + 1 mask byte per pixel.

  def caches(self, num_pipelines: int = 1) -> bool:
    need = self.cache_bytes(num_pipelines)
    return need is not None and need <= self._config.cache_decoded_mb * 2**20

  def __call__(self, ctx: tf.distribute.InputContext | None = None, epoch: int = 0,
               skip_steps: int = 0) -> tf.data.Dataset:
    """One epoch of per-replica training batches {'image', 'mask'} for this input pipeline.

    Args:
      ctx: the input context from distribute_datasets_from_function (None: one pipeline).
      epoch: seeds the shuffle, so each epoch has its own order and a rerun the same one.
      skip_steps: batches of this epoch already trained on (resume mid-epoch).
    """
    manifest, config = self._manifest, self._config
    ctx = _context(ctx)
    per_replica = ctx.get_per_replica_batch_size(config.batch_size)
    per_pipeline = per_replica * (ctx.num_replicas_in_sync // ctx.num_input_pipelines)
    steps = config.steps_per_epoch or steps_per_pass(manifest, 'train', config.batch_size,
                                                     ctx.num_input_pipelines)
    share = pipeline_share(manifest, 'train', ctx.num_input_pipelines, ctx.input_pipeline_id)
    seed = _epoch_seed(config.seed, epoch)
    if self.caches(ctx.num_input_pipelines):
      # All frames are in memory, so the shuffle is a full permutation of the share.
      examples, buffer = self._decoded(share, ctx), max(share.num_examples, 1)
    else:
      examples, buffer = _records(share, ctx, shuffle_seed=seed), config.shuffle_buffer
    if config.steps_per_epoch:
      examples = examples.repeat()  # A fixed number of steps may span several passes.
    examples = examples.shuffle(buffer, seed=seed)
    skip = skip_steps * per_pipeline
    # Skipping happens before decoding/augmenting, and augmentation is seeded by position.
    examples = examples.enumerate().skip(skip)

    def decode_and_augment(index, element):
      if not isinstance(element, dict):
        element = _decode(element)
      return augment(element['image'], element['mask'],
                     tf.stack([tf.constant(seed, tf.int64), index]), config)

    examples = examples.map(decode_and_augment, num_parallel_calls=AUTOTUNE, deterministic=True)
    padding = tf.data.Dataset.from_tensors(_void_example(config, crop=True)).repeat()
    examples = examples.concatenate(padding).take(max(steps * per_pipeline - skip, 0))
    return examples.batch(per_replica, drop_remainder=True).prefetch(AUTOTUNE)

  def _decoded(self, share: PipelineShare, ctx: tf.distribute.InputContext) -> tf.data.Dataset:
    key = ctx.input_pipeline_id
    if key not in self._cached:
      self._cached[key] = _records(share, ctx, shuffle_seed=None).map(
          _decode, num_parallel_calls=AUTOTUNE, deterministic=True).cache()
    return self._cached[key]


def _decode(record: tf.Tensor) -> dict:
  example = features.parse_example(record)
  return {'image': example['image'], 'mask': example['mask']}


def train_dataset(manifest: Manifest, config, ctx: tf.distribute.InputContext | None = None,
                  epoch: int = 0, skip_steps: int = 0) -> tf.data.Dataset:
  """One epoch of training batches (see TrainInput; this one keeps no cache across calls)."""
  return TrainInput(manifest, config)(ctx, epoch, skip_steps)


def eval_global_batch(manifest: Manifest, split: str, config, num_replicas: int) -> int:
  if manifest.split(split).get('image_size') is None:
    # Frames of different sizes cannot share a batch at label resolution: one per replica.
    return num_replicas
  return config.eval_batch_size or config.batch_size


def eval_steps(manifest: Manifest, split: str, config, num_replicas: int,
               num_pipelines: int) -> int:
  return steps_per_pass(manifest, split, eval_global_batch(manifest, split, config, num_replicas),
                        num_pipelines)


def eval_dataset(manifest: Manifest, split: str, config,
                 ctx: tf.distribute.InputContext | None = None,
                 with_source_ids: bool = False) -> tf.data.Dataset:
  """Per-replica eval batches {'image' (model size), 'mask' (label size), 'valid'}.

  Images are resized to config.image_size for the model; masks stay at label resolution so
  metrics are computed there (predictions are resized up, never labels down). Padding examples
  have valid=False and all-void masks.
  """
  ctx = _context(ctx)
  global_batch = eval_global_batch(manifest, split, config, ctx.num_replicas_in_sync)
  label_size = manifest.split(split).get('image_size')
  per_replica = ctx.get_per_replica_batch_size(global_batch)
  per_pipeline = per_replica * (ctx.num_replicas_in_sync // ctx.num_input_pipelines)
  steps = steps_per_pass(manifest, split, global_batch, ctx.num_input_pipelines)
  share = pipeline_share(manifest, split, ctx.num_input_pipelines, ctx.input_pipeline_id)

  def decode(record):
    example = features.parse_example(record)
    image = tf.image.convert_image_dtype(example['image'], tf.float32)
    image = tf.image.resize(image, config.image_size, method='bilinear', antialias=True)
    element = {'image': image, 'mask': example['mask'], 'valid': tf.constant(True)}
    if with_source_ids:
      element['source_id'] = example['source_id']
    return element

  examples = _records(share, ctx, shuffle_seed=None).map(
      decode, num_parallel_calls=AUTOTUNE, deterministic=True)
  pad = _void_example(config, tuple(label_size) if label_size else (1, 1), valid=False)
  if with_source_ids:
    pad['source_id'] = tf.constant('')
  padding = tf.data.Dataset.from_tensors(pad).repeat()
  examples = examples.concatenate(padding).take(steps * per_pipeline)
  return examples.batch(per_replica, drop_remainder=True).prefetch(AUTOTUNE)


def first_examples(manifest: Manifest, split: str, config, count: int) -> list[dict]:
  """The first `count` examples of a split as numpy (fixed frames for TensorBoard overlays)."""
  if count <= 0:
    return []
  share = pipeline_share(manifest, split, 1, 0)
  records = tf.data.TFRecordDataset(share.files[:1]).take(count)
  out = []
  for record in records:
    example = features.parse_example(record)
    image = tf.image.convert_image_dtype(example['image'], tf.float32)
    out.append({'image': tf.image.resize(image, config.image_size, antialias=True).numpy(),
                'mask': example['mask'].numpy(),
                'source_id': example['source_id'].numpy().decode()})
  return out
