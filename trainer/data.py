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

import contextlib
import dataclasses
import math
import re

import tensorflow as tf

from camvid_common import errors
from tfrecords_builder import features
from tfrecords_builder import layouts
from tfrecords_builder.manifest import Manifest
from trainer import inference

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
    raise errors.ConfigError(f'{flag}: global batch {global_batch} is not divisible by the '
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


def _epoch_seed(seed: int, epoch: tf.Tensor) -> tf.Tensor:
  return (seed * 1_000_003 + tf.cast(epoch, tf.int64) * 7_919) % (2**31 - 1)


def _uniform(seed, low, high, dtype=tf.float32):
  return tf.random.stateless_uniform([], seed, low, high, dtype=dtype)


def augment(image: tf.Tensor, mask: tf.Tensor, seed: tf.Tensor, config) -> dict:
  """One example's full augmentation: geometric() then photometric() on a batch of one.

  The training pipeline runs the two halves separately (geometry per example, colour per
  batch); this composition is the same computation for a single frame.

  Returns:
    {'image': float32 [height, width, 3] in [0, 1] (standardized with data.standardize),
    'mask': uint8 [height, width]}, of size config.data.crop_size (default image_size).
  """
  example = geometric(image, mask, seed, config)
  batch = photometric({k: v[None] for k, v in example.items()}, config.data.standardize)
  return {k: v[0] for k, v in batch.items()}


def geometric(image: tf.Tensor, mask: tf.Tensor, seed: tf.Tensor, config,
              moments: tf.Tensor | None = None) -> dict:
  """Random scale and crop (void-padded), and this example's flip and colour-jitter draws.

  Geometrically this is: resize the frame to image_size * scale, pad it with void up to the
  crop size (config.data.crop_size, default image_size), take a random crop of that size. It is
  computed the cheap way round: the crop window is found in source pixels first and only that
  window is resized, so the cost follows the output size, not the (larger) source frame.
  Flipping and colour jitter are only drawn here (seeded per example, so a resumed stream is
  the same) and applied per batch by photometric(): as one fused pass over the batch they cost
  a fraction of what tf.image's separate per-image ops do.

  With config.data.standardize the crop also carries the moments of its whole frame, by which
  photometric() standardizes it (inference.standardize): it is then a window of the
  standardized whole frame, padded with the frame's mean (which standardizes to 0). The
  moments are those of the frame after the colour jitter, so the jitter is applied here, to
  the whole frame, and the returned jitter is the identity.

  Args:
    image: uint8 [H, W, 3].
    mask: uint8 [H, W], void = 255.
    seed: int64 [2] stateless seed.
    config: the trainer Config.
    moments: with data.standardize and no colour jitter, the frame's moments if known
      (_moments_of(image)); computed here otherwise.

  Returns:
    {'image': float32 [height, width, 3] in pixel units [0, 255], 'mask': uint8 [height, width],
     'flip': bool [], 'jitter': float32 [3] (brightness delta, contrast and saturation factors)},
    with data.standardize also 'moments': float32 [2].
  """
  height, width = config.data.crop_size or config.data.image_size
  seeds = tf.random.experimental.stateless_split(seed, num=7)
  aug = config.data
  flip = _uniform(seeds[3], 0.0, 1.0) < 0.5 if aug.hflip else tf.constant(False)
  jitter = tf.stack([
      _uniform(seeds[4], -aug.brightness, aug.brightness) if aug.brightness else 0.0,
      _uniform(seeds[5], 1 - aug.contrast, 1 + aug.contrast) if aug.contrast else 1.0,
      _uniform(seeds[6], 1 - aug.saturation, 1 + aug.saturation) if aug.saturation else 1.0])
  pad_value = 0.0
  if aug.standardize:
    image, moments = _standardization_source(image, jitter, aug, moments)
    jitter, pad_value = tf.constant(_NO_JITTER), moments[0] * 255.0
  source = tf.shape(image)[:2]
  # Scale 1 maps the whole frame onto image_size, the geometry evaluation uses.
  scale = _uniform(seeds[0], config.data.scale_min, config.data.scale_max)
  new_h = tf.cast(tf.round(config.data.image_size[0] * scale), tf.int32)
  new_w = tf.cast(tf.round(config.data.image_size[1] * scale), tf.int32)
  top = _uniform(seeds[1], 0, tf.maximum(new_h - height, 0) + 1, tf.int32)
  left = _uniform(seeds[2], 0, tf.maximum(new_w - width, 0) + 1, tf.int32)
  # The part of the crop the scaled frame covers; the rest (when scale < 1) is void padding.
  valid_h, valid_w = tf.minimum(height, new_h - top), tf.minimum(width, new_w - left)
  y0, y1 = _source_range(top, valid_h, new_h, source[0])
  x0, x1 = _source_range(left, valid_w, new_w, source[1])
  window = image[y0:y1, x0:x1]
  size = tf.stack([valid_h, valid_w])
  # Plain bilinear is a sound filter down to half size (each output pixel then blends its 2x2
  # source neighbourhood); below that it skips source pixels and aliases. TF's antialiased
  # kernel costs ~3x more, so only crops shrunk by more than 2x pay for it. uint8 goes straight
  # into the resize (which returns float32): no full-frame float copy.
  shrinks = tf.reduce_any(2 * size < tf.stack([y1 - y0, x1 - x0]))
  image = tf.cond(shrinks,
                  lambda: tf.image.resize(window, size, method='bilinear', antialias=True),
                  lambda: tf.image.resize(window, size, method='bilinear'))
  mask = _resize_nearest(mask[y0:y1, x0:x1], size)
  pad = tf.stack([height - valid_h, width - valid_w])
  # tf.pad copies even when there is nothing to pad; most crops need none.
  image, mask = tf.cond(
      tf.reduce_any(pad > 0),
      lambda: (tf.pad(image, [[0, pad[0]], [0, pad[1]], [0, 0]], constant_values=pad_value),
               tf.pad(mask, [[0, pad[0]], [0, pad[1]]], constant_values=features.IGNORE_LABEL)),
      lambda: (image, mask))
  image.set_shape([height, width, 3])
  mask.set_shape([height, width])
  example = {'image': image, 'mask': mask, 'flip': flip, 'jitter': jitter}
  if aug.standardize:
    example['moments'] = moments
  return example


# tf.image.rgb_to_grayscale's luma weights.
_GREY = (0.2989, 0.5870, 0.1140)
# Brightness delta 0, contrast and saturation factors 1.
_NO_JITTER = (0.0, 1.0, 1.0)
# Mean 0 and deviation 1: the moments of a void stand-in example, which standardize nothing.
_UNIT_MOMENTS = (0.0, 1.0)


def _has_colour_jitter(aug) -> bool:
  return bool(aug.brightness or aug.contrast or aug.saturation)


def _moments_of(image: tf.Tensor) -> tf.Tensor:
  """float32 [2]: inference.frame_moments (mean, deviation) of a [H, W, 3] frame in [0, 255]."""
  frame = tf.cast(image, tf.float32) * (1.0 / 255.0)
  return tf.reshape(tf.stack(inference.frame_moments(frame)), [2])


def _standardization_source(image, jitter, aug, moments):
  """The frame a standardized crop is cut from, in pixel units, and its moments.

  With colour jitter that is the whole frame jittered (float32), whose moments the jitter
  changes; without, the uint8 frame itself, with `moments` if given.
  """
  if _has_colour_jitter(aug):
    frame = _jittered(tf.cast(image, tf.float32)[None] * (1.0 / 255.0), jitter[None])[0] * 255.0
    return frame, _moments_of(frame)
  return image, _moments_of(image) if moments is None else moments


@tf.function(jit_compile=True)
def _photometric(image, mask, flip, jitter):
  # One XLA-compiled function, so the flip, the unit scaling, the three colour jitters and the
  # clip fuse into one pass over the batch (plus one for the contrast mean). As separate
  # tf.image ops per image they were ~7 passes and cost as much as the crop's resize.
  image, mask = _flipped(image, mask, flip)
  return _jittered(image * (1.0 / 255.0), jitter), mask


@tf.function(jit_compile=True)
def _photometric_standardized(image, mask, flip, moments):
  image, mask = _flipped(image, mask, flip)
  mean, deviation = (moments[:, i, None, None, None] for i in range(2))
  return inference.standardize(image * (1.0 / 255.0), (mean, deviation)), mask


def _flipped(image, mask, flip):
  """[B, H, W, ...] images and masks, those of a True `flip` [B] mirrored left to right."""
  return (tf.where(flip[:, None, None, None], tf.reverse(image, [2]), image),
          tf.where(flip[:, None, None], tf.reverse(mask, [2]), mask))


def _jittered(image, jitter):
  """[B, H, W, 3] images in [0, 1] with jitter [B, 3]'s colour changes, clipped to [0, 1]."""
  delta, contrast, saturation = (jitter[:, i, None, None, None] for i in range(3))
  # tf.image.adjust_brightness then adjust_contrast: c * (x + d - mean(x + d)) + mean(x + d).
  mean = tf.reduce_mean(image, [1, 2], keepdims=True)
  image = contrast * image + ((1.0 - contrast) * mean + delta)
  # Saturation as a blend with the grey image (PIL's ImageEnhance.Color, torchvision's
  # adjust_saturation) rather than tf.image's HSV round trip.
  grey = tf.reduce_sum(image * tf.constant(_GREY), -1, keepdims=True)
  image = saturation * image + (1.0 - saturation) * grey
  return tf.clip_by_value(image, 0.0, 1.0)


def photometric(batch: dict, standardized: bool = False) -> dict:
  """Applies geometric()'s flip and colour draws to a batch; images to float32 [0, 1].

  Args:
    batch: geometric()'s outputs stacked: image [B, H, W, 3] in [0, 255], mask [B, H, W],
      flip [B], jitter [B, 3].
    standardized: data.standardize: the batch also holds geometric()'s 'moments' [B, 2], by
      which the images are standardized instead of colour-jittered (geometric() did that).

  Returns:
    {'image': float32 [B, H, W, 3] in [0, 1] (or standardized), 'mask': uint8 [B, H, W]}.
  """
  if standardized:
    image, mask = _photometric_standardized(batch['image'], batch['mask'], batch['flip'],
                                            batch['moments'])
  else:
    image, mask = _photometric(batch['image'], batch['mask'], batch['flip'], batch['jitter'])
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
  """An all-void example; crop=True gives geometric()'s training crop with no flip or jitter."""
  height, width = (config.data.crop_size if crop else None) or config.data.image_size
  label_size = label_size or (height, width)
  element = {'image': tf.zeros([height, width, 3], tf.float32),
             'mask': tf.fill(label_size, tf.constant(features.IGNORE_LABEL, tf.uint8))}
  if crop:
    element.update(flip=tf.constant(False), jitter=tf.constant(_NO_JITTER))
    if config.data.standardize:
      element['moments'] = tf.constant(_UNIT_MOMENTS)
  if valid is not None:
    element['valid'] = tf.constant(valid)
  return element


class TrainInput:
  """Builds each epoch's training stream; keeps decoded frames in memory across epochs.

  Decoding a 480x360 PNG costs more than all the augmentation after it, so when a pipeline's
  share of the train split fits in config.runtime.cache_decoded_mb the decoded uint8 frames are
  kept (tf.data's in-memory cache, filled during the first epoch and shared by the datasets of
  later epochs, which is why one object must build them all) and each epoch is a seeded
  permutation of them. Larger data is streamed from the shards every epoch instead.
  """

  def __init__(self, manifest: Manifest, config):
    self._manifest = manifest
    self._config = config
    self._cached = {}  # input_pipeline_id -> cached decoded dataset
    # Traced once and reused by every epoch's dataset: tracing geometric() anew for each
    # epoch took ~0.2 s, during which the training loop waited for its first batch.
    self._geometric = tf.function(
        lambda image, mask, seed, moments=None: geometric(image, mask, seed, config, moments))
    # Without colour jitter a frame's moments (data.standardize) are the same every epoch:
    # computed on decoding, so a cached frame holds them.
    self._with_moments = config.data.standardize and not _has_colour_jitter(config.data)
    self._decode = tf.function(lambda record: _decode(record, self._with_moments))

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
    return need is not None and need <= self._config.runtime.cache_decoded_mb * 2**20

  def __call__(self, ctx: tf.distribute.InputContext | None = None, epoch: int = 0,
               skip_steps: int = 0, num_epochs: int = 1) -> tf.data.Dataset:
    """Epochs of per-replica training batches {'image', 'mask'} for this input pipeline.

    Every epoch yields exactly the same number of batches (steps per epoch, less skip_steps
    for the first), so a consumer tells epochs apart by counting.

    Args:
      ctx: the input context from distribute_datasets_from_function (None: one pipeline).
      epoch: the first epoch. Each epoch's number seeds its shuffle and augmentation, so each
        epoch has its own order and a rerun the same one.
      skip_steps: batches of the first epoch already trained on (resume mid-epoch).
      num_epochs: epochs in the one dataset. A run iterates one dataset for all its epochs:
        building one costs ~0.3 s (tracing, function instantiation, graph rewrites) that the
        training loop would otherwise wait for at every epoch start.
    """
    manifest, config = self._manifest, self._config
    ctx = _context(ctx)
    per_replica = ctx.get_per_replica_batch_size(config.data.batch_size)
    per_pipeline = per_replica * (ctx.num_replicas_in_sync // ctx.num_input_pipelines)
    steps = config.steps_per_epoch or steps_per_pass(manifest, 'train', config.data.batch_size,
                                                     ctx.num_input_pipelines)
    share = pipeline_share(manifest, 'train', ctx.num_input_pipelines, ctx.input_pipeline_id)
    # All frames in memory: the shuffle is a full permutation of the share.
    cached = self._decoded(share, ctx) if self.caches(ctx.num_input_pipelines) else None
    # Stand-in for an epoch's padding examples (the crop stage turns them into void ones).
    filler = ({'image': tf.zeros([1, 1, 3], tf.uint8), 'mask': tf.zeros([1, 1], tf.uint8)}
              if cached is not None else tf.constant(b''))
    if cached is not None and self._with_moments:
      filler['moments'] = tf.constant(_UNIT_MOMENTS)
    filler = tf.data.Dataset.from_tensors((tf.constant(0, tf.int64), tf.constant(0, tf.int64),
                                           filler, tf.constant(True))).repeat()

    def one_epoch(number):
      """The epoch's (seed, index, element, is_padding), before any decoding."""
      seed = _epoch_seed(config.seed, number)
      if cached is not None:
        examples, buffer = cached, max(share.num_examples, 1)
      else:
        examples, buffer = _records(share, ctx, shuffle_seed=seed), config.runtime.shuffle_buffer
      if config.steps_per_epoch:
        examples = examples.repeat()  # A fixed number of steps may span several passes.
      examples = examples.shuffle(buffer, seed=seed)
      skip = tf.where(number == epoch, tf.constant(skip_steps * per_pipeline, tf.int64), 0)
      # Skipping happens before decoding/augmenting, and augmentation is seeded by position.
      examples = examples.enumerate().skip(skip).map(
          lambda index, element: (seed, index, element, tf.constant(False)))
      return examples.concatenate(filler).take(tf.maximum(steps * per_pipeline - skip, 0))

    def decode_and_crop(seed, index, element, is_padding):
      def crop():
        frame = element if cached is not None else self._decode(element)
        return self._geometric(frame['image'], frame['mask'], tf.stack([seed, index]),
                               frame.get('moments'))
      return tf.cond(is_padding, lambda: _void_example(config, crop=True), crop)

    # Decoding and cropping run outside flat_map: tf.data optimises (parallelism, prefetch)
    # only the outer pipeline, and the same map inside flat_map was ~30% slower.
    examples = tf.data.Dataset.range(epoch, epoch + num_epochs).flat_map(one_epoch).map(
        decode_and_crop, num_parallel_calls=AUTOTUNE, deterministic=True)
    # Each epoch's length is a multiple of per_replica, so no batch straddles two epochs.
    batches = examples.batch(per_replica, drop_remainder=True)
    return batches.map(lambda batch: photometric(batch, config.data.standardize),
                       num_parallel_calls=AUTOTUNE, deterministic=True).prefetch(AUTOTUNE)

  def _decoded(self, share: PipelineShare, ctx: tf.distribute.InputContext) -> tf.data.Dataset:
    key = ctx.input_pipeline_id
    if key not in self._cached:
      self._cached[key] = _records(share, ctx, shuffle_seed=None).map(
          lambda record: _decode(record, self._with_moments), num_parallel_calls=AUTOTUNE,
          deterministic=True).cache()
    return self._cached[key]


def _decode(record: tf.Tensor, with_moments: bool = False) -> dict:
  """{'image', 'mask'} of a record, with_moments also the image's _moments_of()."""
  example = features.parse_example(record)
  frame = {'image': example['image'], 'mask': example['mask']}
  if with_moments:
    frame['moments'] = _moments_of(frame['image'])
  return frame


def train_dataset(manifest: Manifest, config, ctx: tf.distribute.InputContext | None = None,
                  epoch: int = 0, skip_steps: int = 0, num_epochs: int = 1) -> tf.data.Dataset:
  """Training batches (see TrainInput; this one keeps no cache across calls)."""
  return TrainInput(manifest, config)(ctx, epoch, skip_steps, num_epochs)


def eval_global_batch(manifest: Manifest, split: str, config, num_replicas: int) -> int:
  if manifest.split(split).get('image_size') is None:
    # Frames of different sizes cannot share a batch at label resolution: one per replica.
    return num_replicas
  return config.eval.batch_size or config.data.batch_size


def eval_steps(manifest: Manifest, split: str, config, num_replicas: int,
               num_pipelines: int) -> int:
  return steps_per_pass(manifest, split, eval_global_batch(manifest, split, config, num_replicas),
                        num_pipelines)


def eval_dataset(manifest: Manifest, split: str, config,
                 ctx: tf.distribute.InputContext | None = None,
                 with_source_ids: bool = False) -> tf.data.Dataset:
  """Per-replica eval batches {'image' (model size), 'mask' (label size), 'valid'}.

  Images are resized to config.data.image_size for the model; masks stay at label resolution so
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
    image = tf.image.resize(image, config.data.image_size, method='bilinear', antialias=True)
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


def spread_picks(names: list[str], count: int) -> list[int]:
  """Indices of `count` of `names` spread over their drives and, within a drive, over time.

  Frames are grouped by drive (the frame-name prefix, layouts.drive_of) and ordered by name
  within one (CamVid numbers a drive's frames in time). Picks go round-robin over the drives in
  name order, and a drive's picks are evenly spaced over its frames, so three overlays of a
  one-drive split show its start, middle and end, and of a several-drive split three drives.
  """
  by_drive = {}
  for index in sorted(range(len(names)), key=lambda i: names[i]):
    by_drive.setdefault(layouts.drive_of(names[index]) or '', []).append(index)
  drives = [by_drive[d] for d in sorted(by_drive)]
  quota = [0] * len(drives)
  for _ in range(min(count, len(names))):
    open_drives = [d for d in range(len(drives)) if quota[d] < len(drives[d])]
    quota[min(open_drives, key=lambda d: (quota[d], d))] += 1
  spaced = [[frames[int((k + 0.5) * len(frames) / n)] for k in range(n)]
            for frames, n in zip(drives, quota)]
  return [spaced[d][k] for k in range(max(quota, default=0))
          for d in range(len(drives)) if k < quota[d]]


def summary_examples(manifest: Manifest, split: str, config, count: int) -> list[dict]:
  """`count` frames of a split spread over its drives (spread_picks), for TensorBoard overlays.

  Returns numpy {'image' (resized to config.data.image_size, float in [0, 1]), 'mask' (label
  resolution), 'source_id', 'index' (position in the split's shards read in order),
  'split_size'}, in spread_picks order.
  """
  if count <= 0:
    return []
  records = tf.data.TFRecordDataset(manifest.shard_paths(split))
  source_id = lambda r: tf.io.parse_single_example(
      r, {features.SOURCE_ID: features.FEATURE_SPEC[features.SOURCE_ID]})[features.SOURCE_ID]
  names = [n.decode() for n in records.map(source_id).as_numpy_iterator()]
  picks = spread_picks(names, count)
  wanted = tf.constant(sorted(picks), tf.int64)
  chosen = records.enumerate().filter(lambda i, _: tf.reduce_any(tf.equal(i, wanted)))
  by_index = {}
  for index, record in chosen:
    example = features.parse_example(record)
    image = tf.image.convert_image_dtype(example['image'], tf.float32)
    by_index[int(index)] = {
        'image': tf.image.resize(image, config.data.image_size, antialias=True).numpy(),
        'mask': example['mask'].numpy(), 'source_id': example['source_id'].numpy().decode(),
        'index': int(index), 'split_size': len(names)}
  return [by_index[i] for i in picks]


def check_shards(manifest: Manifest, splits) -> None:
  """Raises InputError naming the first shard of `splits` that is not in the data dir."""
  present = set(tf.io.gfile.listdir(manifest.data_dir))
  for split in splits:
    for name, path in zip(manifest.split(split)['shards'], manifest.shard_paths(split)):
      if name not in present and not tf.io.gfile.exists(path):
        raise errors.InputError(f'{path}: missing (a "{split}" shard its manifest names); '
                                'rebuild or restore the data dir')


# Errors a shard's reading and decoding raise: missing (NotFound), truncated or corrupt
# (DataLoss), a record or frame that does not parse or decode (InvalidArgument).
_READ_ERRORS = (tf.errors.NotFoundError, tf.errors.DataLossError, tf.errors.InvalidArgumentError)
_DECODE_WORDS = ('could not parse', 'png', 'jpeg', 'decod')


@contextlib.contextmanager
def read_errors(manifest: Manifest, splits, what: str):
  """Turns a shard failing while `what` reads `splits` into one InputError line naming it.

  TF names the file of a missing shard but not of a truncated one ("truncated record at N"), so
  then the shards are counted against the manifest to find it. Errors that are none of a
  shard's (a frame that decodes but fails in the model, a missing checkpoint dir) pass through.
  """
  try:
    yield
  except _READ_ERRORS as e:
    reason = short_reason(e.message)
    paths = [(split, path, size) for split in splits for path, size in
             zip(manifest.shard_paths(split), manifest.split(split)['shard_sizes'])]
    named = next((p for _, p, _ in paths if p in e.message), None)
    if named:
      raise errors.InputError(f'{named}: cannot be read while {what} ({reason})') from None
    if not isinstance(e, tf.errors.InvalidArgumentError):
      problem = _find_bad_shard(paths)
      if problem:
        raise errors.InputError(f'{problem}; found while {what}') from None
    elif any(word in reason.lower() for word in _DECODE_WORDS):
      raise errors.InputError(
          f'{manifest.data_dir}: a record of the {"/".join(splits)} data does not parse or a '
          f'frame does not decode while {what} ({reason}); find it with python -m '
          f'tfrecords_builder --verify --output_dir {manifest.data_dir}') from None
    raise


def _find_bad_shard(paths) -> str | None:
  """The first shard that is missing or holds other than its manifest's count of records."""
  for split, path, size in paths:
    try:
      count = int(tf.data.TFRecordDataset(path).reduce(tf.constant(0, tf.int64),
                                                       lambda n, _: n + 1))
    except tf.errors.OpError as e:
      reason = short_reason(e.message)
      return f'{path}: a "{split}" shard cannot be read, truncated or corrupt ({reason})'
    if count != size:
      return f'{path}: a "{split}" shard holds {count} records, its manifest says {size}'
  return None


def short_reason(message: str) -> str:
  """The line of a TF error message that says what went wrong, without node and op names.

  A step's error is "Graph execution error:", the Python stack of the node, then the op's own
  message and "[[{{node ...}}]]"; an eager one is "{{function_node ...}} message [Op:...]".
  """
  lines = [line for line in message.splitlines() if line.strip() and not line[0].isspace()
           and not line.startswith(('Graph execution error', 'Detected at node'))]
  reason = (lines[-1] if lines else message).split('[Op:')[0].split('[[')[0]
  reason = re.sub(r'^.*Error in user-defined function passed to .*? transformation with '
                  r'iterator: \S+: ', '', reason.split('}} ', 1)[-1])
  return errors.one_line(reason)[:300]
