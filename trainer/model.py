"""The U-Net architecture, as a pure Keras functional-model builder.

This module only describes the network. It deliberately imports nothing about training
(optimizers, losses, tf.distribute) so it can be built inside any distribution-strategy scope,
inspected with `--summary_only`, or reused by a hyperparameter tuner without side effects.

With its defaults, `build_unet` reproduces the original notebook's "seed_unet" layer for layer:
four encoder levels (64..512 filters) of two conv-BN-ReLU blocks and a 2x2 max pool, a
1024-filter bottleneck, four decoder levels (transposed conv, skip concatenation, two
conv-BN-ReLU blocks) and a 3x3 convolution producing per-pixel class logits.

`stem_stride=2` puts a strided conv-BN-ReLU in front of that U-Net and bilinearly upsamples its
logits back to the input size. On a CPU the full-resolution level (few channels over many
pixels) is memory-bound and costs about two thirds of a training step; the stem removes it, so
the same filters and parameters train ~3x faster per image (docs/experiments.md), or see a
larger input at the cost of the old one.
"""

from collections.abc import Sequence

import keras
import tensorflow as tf


class FusedBatchNormalization(keras.layers.BatchNormalization):
  """keras.layers.BatchNormalization whose training step runs TensorFlow's fused kernel.

  Keras 3 computes training-mode batch normalisation from separate ops (moments, then a scale
  and shift), each a pass over the activations, and as many again in the backward pass; at
  small's early levels (16-32 channels over many pixels, memory-bound on a CPU) those passes
  cost more than the convolutions. The fused kernel (FusedBatchNormV3, with oneDNN's
  implementation on CPUs) and its gradient make one pass each. Same variables, the same
  moving-average update (with Keras' biased batch variance) and the same inference path as the
  Keras layer, so checkpoints are interchangeable; only a single-replica (or unsynchronised)
  layer over NHWC inputs can use it, which `build_unet` ensures.
  """

  def call(self, inputs, training=None, mask=None):
    if not training or mask is not None:
      return super().call(inputs, training=training, mask=mask)
    channels = tf.shape(inputs)[-1:]
    scale = tf.cast(self.gamma, tf.float32) if self.scale else tf.ones(channels)
    offset = tf.cast(self.beta, tf.float32) if self.center else tf.zeros(channels)
    # Like the Keras layer, normalise in float32 under a mixed-precision policy.
    outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
        tf.cast(inputs, tf.float32), scale, offset, epsilon=self.epsilon, is_training=True)
    # The kernel returns the unbiased variance (for its own running average); Keras' moving
    # variance averages the biased one.
    count = tf.cast(tf.size(inputs) // tf.shape(inputs)[-1], tf.float32)
    variance *= (count - 1.0) / tf.maximum(count, 1.0)
    for moving, batch in ((self.moving_mean, mean), (self.moving_variance, variance)):
      moving.assign(moving * self.momentum + tf.cast(batch, moving.dtype) * (1.0 - self.momentum))
    return tf.cast(outputs, inputs.dtype)


def _conv_bn_relu(x, filters: int, prefix: str, index: int, norm, strides: int = 1):
  """Applies one 3x3 'same' convolution (stride `strides`), batch normalisation and ReLU.

  The convolution keeps its bias (the Keras default) because the seed notebook did; the
  parameter count and checkpoints therefore match it exactly, even though BN makes the bias
  redundant. `norm(name)` makes the BatchNormalization layer.
  """
  x = keras.layers.Conv2D(filters, 3, strides=strides, padding='same',
                          name=f'{prefix}_conv{index}')(x)
  x = norm(f'{prefix}_bn{index}')(x)
  return keras.layers.ReLU(name=f'{prefix}_relu{index}')(x)


def _level(x, filters: int, prefix: str, norm):
  """Two conv-BN-ReLU blocks."""
  x = _conv_bn_relu(x, filters, prefix, 1, norm)
  return _conv_bn_relu(x, filters, prefix, 2, norm)


def _check_unet_args(num_classes, image_size, base_filters, depth, dropout, stem_stride,
                     sync_batchnorm, fused_batchnorm, any_size) -> None:
  """build_unet's argument checks (ValueError naming the argument)."""
  if num_classes < 1:
    raise ValueError(f'num_classes must be >= 1, got {num_classes}')
  if stem_stride not in (1, 2):
    raise ValueError(f'stem_stride must be 1 or 2, got {stem_stride}')
  if depth < 1:
    raise ValueError(f'depth must be >= 1, got {depth}')
  if base_filters < 1:
    raise ValueError(f'base_filters must be >= 1, got {base_filters}')
  if fused_batchnorm and sync_batchnorm:
    raise ValueError('fused_batchnorm needs sync_batchnorm False')
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f'dropout must be in [0, 1), got {dropout}')
  if len(image_size) != 2:
    raise ValueError(f'image_size must be (height, width), got {image_size!r}')
  height, width = (int(s) for s in image_size)
  stride = size_multiple(stem_stride, depth)
  # With any_size the input is padded to the stride by its caller (model.predict_logits).
  if height <= 0 or width <= 0 or (not any_size and (height % stride or width % stride)):
    raise ValueError(f'image_size {tuple(image_size)} must be positive and divisible by '
                     f'stem_stride * 2**depth = {stride}')


def build_unet(num_classes: int,
               image_size: Sequence[int] = (256, 256),
               base_filters: int = 64,
               depth: int = 4,
               dropout: float = 0.5,
               name: str = 'unet',
               sync_batchnorm: bool = False,
               any_size: bool = False,
               bn_momentum: float = 0.99,
               stem_stride: int = 1,
               fused_batchnorm: bool = False) -> keras.Model:
  """Builds a U-Net that maps [0, 1]-scaled RGB images to per-pixel class logits.

  Args:
    num_classes: Number of output classes (logit channels). Void is not a class.
    image_size: (height, width) of the input; unless any_size, both must be divisible by
      stem_stride * 2**depth so every pooled feature map upsamples back to exactly the size of
      its skip connection (with any_size, callers pad inputs to that multiple).
    base_filters: Filters of the first encoder level; level i uses base_filters * 2**i and the
      bottleneck base_filters * 2**depth.
    depth: Number of encoder (and decoder) levels.
    dropout: Dropout rate used after the last pool, the bottleneck and every decoder level but
      the last. 0 omits the Dropout layers altogether.
    name: Name of the returned model.
    sync_batchnorm: Use synchronized BatchNormalization, so batch statistics are computed over
      the global batch across replicas. Needed when a multi-replica run must match a
      single-replica run exactly; costs an all-reduce per BN layer.
    bn_momentum: BatchNormalization's moving-average momentum (Keras' default 0.99).
    any_size: Accept inputs of any height and width that are multiples of the stride (for
      training on crops); the weights are the same as with the fixed image_size input.
    stem_stride: 1 = the notebook's U-Net. 2 = a stride-2 3x3 conv-BN-ReLU stem with
      base_filters filters runs the U-Net at half resolution; its logits are upsampled
      bilinearly to the input size.
    fused_batchnorm: Train with FusedBatchNormalization (TensorFlow's fused kernel; faster on a
      CPU, the same variables and inference). Not with sync_batchnorm: the kernel only sees
      its own replica's batch.

  Returns:
    An uncompiled `keras.Model` with input [None, H, W, 3] and float32 logits
    [None, H, W, num_classes], float32 even under a mixed-precision global policy.

  Raises:
    ValueError: If an argument is out of range or image_size is not divisible by 2**depth.
  """
  _check_unet_args(num_classes, image_size, base_filters, depth, dropout, stem_stride,
                   sync_batchnorm, fused_batchnorm, any_size)
  height, width = (int(s) for s in image_size)

  def norm(layer_name):
    if fused_batchnorm:
      return FusedBatchNormalization(momentum=bn_momentum, name=layer_name)
    return keras.layers.BatchNormalization(momentum=bn_momentum, synchronized=sync_batchnorm,
                                           name=layer_name)

  inputs = keras.Input(shape=(None, None, 3) if any_size else (height, width, 3), name='image')
  x = inputs
  if stem_stride > 1:
    x = _conv_bn_relu(x, base_filters, 'stem', 1, norm, stem_stride)
  x, skips = _encoder(x, base_filters, depth, dropout, norm)
  x = _decoder(x, skips, base_filters, depth, dropout, norm)
  # The head computes in float32 so logits (and hence the loss and softmax) keep full
  # precision when the rest of the model runs under a mixed_float16/mixed_bfloat16 policy.
  logits = keras.layers.Conv2D(
      num_classes, 3, padding='same', dtype='float32', name='logits')(x)
  if stem_stride > 1:
    logits = keras.layers.UpSampling2D(stem_stride, interpolation='bilinear', dtype='float32',
                                       name='logits_upsample')(logits)
  return keras.Model(inputs, logits, name=name)


def _encoder(x, base_filters: int, depth: int, dropout: float, norm):
  """Encoder levels and the bottleneck; returns its output and each level's pre-pool skip."""
  skips = []
  for level in range(1, depth + 1):
    prefix = f'enc{level}'
    x = _level(x, base_filters * 2**(level - 1), prefix, norm)
    skips.append(x)
    x = keras.layers.MaxPooling2D(2, name=f'{prefix}_pool')(x)
  if dropout > 0:
    x = keras.layers.Dropout(dropout, name=f'enc{depth}_dropout')(x)
  x = _level(x, base_filters * 2**depth, 'bottleneck', norm)
  if dropout > 0:
    x = keras.layers.Dropout(dropout, name='bottleneck_dropout')(x)
  return x, skips


def _decoder(x, skips, base_filters: int, depth: int, dropout: float, norm):
  """Decoder levels; dec1 is the deepest and pairs with the deepest encoder skip."""
  for level in range(1, depth + 1):
    filters = base_filters * 2**(depth - level)
    prefix = f'dec{level}'
    x = keras.layers.Conv2DTranspose(
        filters, 3, strides=2, padding='same', name=f'{prefix}_up')(x)
    x = keras.layers.Concatenate(name=f'{prefix}_concat')([x, skips[depth - level]])
    x = _level(x, filters, prefix, norm)
    # The seed notebook regularises every decoder level except the one feeding the head.
    if dropout > 0 and level < depth:
      x = keras.layers.Dropout(dropout, name=f'{prefix}_dropout')(x)
  return x


def with_auxiliary_heads(model: keras.Model, num_classes: int, depth: int) -> keras.Model:
  """`model` plus deep-supervision outputs: [logits, aux_1, ..., aux_{depth-1}].

  aux_l is a 1x1 convolution to class logits of decoder level l's output (1/2**(depth-l) of
  the last decoder level's resolution; Lee et al. 2015, "Deeply-Supervised Nets"). The
  returned model shares every layer (and so every weight) of `model`; only the heads are new,
  so `model` alone still predicts, checkpoints and exports as before.
  """
  heads = [keras.layers.Conv2D(num_classes, 1, dtype='float32', name=f'aux{level}_logits')(
      model.get_layer(f'dec{level}_relu2').output) for level in range(1, depth)]
  return keras.Model(model.input, [model.output, *heads], name=f'{model.name}_aux')


def size_multiple(stem_stride: int, depth: int) -> int:
  """The multiple every input height and width must be (build_unet's stride)."""
  return stem_stride * 2**depth


def _flip_averaged(model: keras.Model, images, flip: bool):
  if not flip:
    return model(images, training=False)
  # One model call on the doubled batch, cheaper than two calls; the mirrored half's logits
  # are flipped back so both halves line up with the input before averaging.
  both = model(keras.ops.concatenate([images, keras.ops.flip(images, axis=2)], axis=0),
               training=False)
  plain, mirrored = keras.ops.split(both, 2, axis=0)
  return 0.5 * (plain + keras.ops.flip(mirrored, axis=2))


def predict_logits(model: keras.Model, images, flip: bool = False,
                   scales: Sequence[float] = (1.0,), multiple: int = 1):
  """Inference logits of `images`, averaged over test-time flips and scales.

  The one place test-time augmentation is defined (evaluation, calibration and the export all
  call it). `flip` also averages each scale with its mirror image. For every scale s other than
  1 the images are resized to round(s * size) (bilinear, antialiased when shrinking), padded
  at the bottom and right by mirroring up to `multiple` (the model's stride, size_multiple),
  and their logits are cropped and resized back to the input size; the scales' logits are then
  averaged. Frames whose size is not a multiple (CamVid's 360x480 under a stride of 16) are
  padded and cropped the same way at scale 1, never resized. Padding and scales other than 1
  need a model built with any_size and images of static height and width.
  """
  scales = tuple(float(s) for s in scales)
  height, width = int(images.shape[1]), int(images.shape[2])
  if scales == (1.0,) and not (height % multiple or width % multiple):
    return _flip_averaged(model, images, flip)
  total = None
  for scale in scales:
    h, w = max(1, round(height * scale)), max(1, round(width * scale))
    x = images
    if (h, w) != (height, width):
      x = tf.image.resize(images, (h, w), method='bilinear', antialias=scale < 1)
    pad_h, pad_w = -h % multiple, -w % multiple
    if pad_h or pad_w:
      # Mirrored content rather than zeros: black borders are not a scene the model has seen.
      x = tf.pad(x, [[0, 0], [0, pad_h], [0, pad_w], [0, 0]], mode='SYMMETRIC')
    logits = _flip_averaged(model, x, flip)[:, :h, :w]
    if (h, w) != (height, width):
      logits = tf.image.resize(logits, (height, width), method='bilinear')
    total = logits if total is None else total + logits
  return total / len(scales)
