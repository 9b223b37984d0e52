"""Tests for trainer.model: the seed U-Net's exact architecture, dtypes and input validation."""

import collections

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import model as model_lib

NUM_CLASSES = 11


@pytest.fixture(scope='module')
def seed_unet():
  return model_lib.build_unet(NUM_CLASSES)


def _layer_counts(model):
  # Exact types, not isinstance, so each kind of layer is counted once.
  return collections.Counter(type(layer).__name__ for layer in model.layers)


def _expected_seed_params(num_classes, base=64, depth=4):
  """Independent hand formula for the seed U-Net's parameter count."""

  def conv(k, cin, cout):  # kernel weights plus bias
    return k * k * cin * cout + cout

  def bn(c):  # gamma, beta, moving mean, moving variance
    return 4 * c

  total = 0
  cin = 3
  for i in range(depth):  # Encoder: two conv-BN per level.
    c = base * 2**i
    total += conv(3, cin, c) + bn(c) + conv(3, c, c) + bn(c)
    cin = c
  c = base * 2**depth  # Bottleneck.
  total += conv(3, cin, c) + bn(c) + conv(3, c, c) + bn(c)
  cin = c
  for i in reversed(range(depth)):  # Decoder.
    c = base * 2**i
    total += conv(3, cin, c)  # Conv2DTranspose: same count as a conv cin -> c.
    # After concatenation with the skip (c channels) the first conv sees 2c channels.
    total += conv(3, 2 * c, c) + bn(c) + conv(3, c, c) + bn(c)
    cin = c
  total += conv(3, cin, num_classes)  # Head.
  return total


def test_seed_unet_output_shape_and_dtype(seed_unet):
  assert tuple(seed_unet.input.shape) == (None, 256, 256, 3)
  assert tuple(seed_unet.output.shape) == (None, 256, 256, NUM_CLASSES)
  assert seed_unet.output.dtype == 'float32'


def test_seed_unet_param_count_matches_hand_formula(seed_unet):
  assert seed_unet.count_params() == _expected_seed_params(NUM_CLASSES)


def test_seed_unet_layer_counts(seed_unet):
  counts = _layer_counts(seed_unet)
  # 8 encoder + 2 bottleneck + 8 decoder + 1 head; with the 4 transposed convs, 23 conv layers.
  assert counts['Conv2D'] == 19
  assert counts['Conv2DTranspose'] == 4
  assert counts['Conv2D'] + counts['Conv2DTranspose'] == 23
  assert counts['BatchNormalization'] == 18
  assert counts['ReLU'] == 18
  assert counts['MaxPooling2D'] == 4
  assert counts['Concatenate'] == 4
  # After pool 4, after the bottleneck and after decoder levels 1-3.
  assert counts['Dropout'] == 5
  dropout_names = [l.name for l in seed_unet.layers if isinstance(l, keras.layers.Dropout)]
  assert dropout_names == [
      'enc4_dropout', 'bottleneck_dropout', 'dec1_dropout', 'dec2_dropout', 'dec3_dropout']
  assert all(l.rate == 0.5 for l in seed_unet.layers if isinstance(l, keras.layers.Dropout))


def test_seed_unet_layer_details(seed_unet):
  up = seed_unet.get_layer('dec1_up')
  assert up.kernel_size == (3, 3) and up.strides == (2, 2) and up.padding == 'same'
  # Skip connections come from the pre-pool activation of the matching encoder level.
  for level in range(1, 5):
    concat_inputs = seed_unet.get_layer(f'dec{level}_concat').input
    assert concat_inputs[0] is seed_unet.get_layer(f'dec{level}_up').output
    assert concat_inputs[1] is seed_unet.get_layer(f'enc{5 - level}_relu2').output
  head = seed_unet.get_layer('logits')
  assert head.kernel_size == (3, 3) and head.filters == NUM_CLASSES
  assert head.activation is keras.activations.linear
  assert all(l.use_bias for l in seed_unet.layers if isinstance(l, keras.layers.Conv2D))


def test_logits_are_float32_under_mixed_precision():
  keras.mixed_precision.set_global_policy('mixed_bfloat16')
  try:
    model = model_lib.build_unet(NUM_CLASSES, image_size=(32, 32), base_filters=4, depth=2)
    assert model.get_layer('enc1_conv1').compute_dtype == 'bfloat16'
    assert model.output.dtype == 'float32'
    logits = model(np.zeros((1, 32, 32, 3), np.float32))
    assert logits.dtype == 'float32'
  finally:
    keras.mixed_precision.set_global_policy('float32')


def test_small_variant_forward_pass():
  model = model_lib.build_unet(5, image_size=(64, 64), base_filters=8, depth=3, name='small')
  images = np.random.default_rng(0).random((2, 64, 64, 3), dtype=np.float32)
  logits = model(images, training=False)
  assert model.name == 'small'
  assert tuple(logits.shape) == (2, 64, 64, 5)
  assert np.all(np.isfinite(np.asarray(logits)))
  assert _layer_counts(model)['Dropout'] == 4  # depth + 1


def test_non_square_input_size():
  model = model_lib.build_unet(3, image_size=(32, 48), base_filters=4, depth=2)
  assert tuple(model.output.shape) == (None, 32, 48, 3)


def test_sync_batchnorm_option():
  model = model_lib.build_unet(3, image_size=(16, 16), base_filters=4, depth=1,
                               sync_batchnorm=True)
  bns = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
  assert bns and all(l.synchronized for l in bns)


def test_zero_dropout_omits_dropout_layers():
  model = model_lib.build_unet(3, image_size=(16, 16), base_filters=4, depth=2, dropout=0.0)
  assert _layer_counts(model)['Dropout'] == 0


@pytest.mark.parametrize('image_size', [(250, 256), (256, 8), (0, 16), (16,)])
def test_bad_image_size_raises(image_size):
  with pytest.raises(ValueError):
    model_lib.build_unet(NUM_CLASSES, image_size=image_size)


def test_summary_works(seed_unet):
  lines = []
  seed_unet.summary(print_fn=lambda line, **kwargs: lines.append(line))
  assert any('logits' in line for line in lines)


def test_any_size_model_takes_crops_with_the_same_weights():
  fixed = model_lib.build_unet(3, image_size=(32, 32), base_filters=4, depth=2)
  free = model_lib.build_unet(3, image_size=(32, 32), base_filters=4, depth=2, any_size=True)
  assert tuple(free.input_shape) == (None, None, None, 3)
  assert [w.shape for w in fixed.weights] == [w.shape for w in free.weights]
  free.set_weights(fixed.get_weights())
  x = np.random.default_rng(0).random((1, 32, 32, 3), np.float32)
  np.testing.assert_allclose(free(x, training=False), fixed(x, training=False), atol=1e-5)
  assert tuple(free(np.zeros((2, 16, 48, 3), np.float32)).shape) == (2, 16, 48, 3)


def test_stem_stride_2_runs_the_same_unet_at_half_resolution():
  plain = model_lib.build_unet(NUM_CLASSES, image_size=(64, 96), base_filters=4, depth=2)
  stem = model_lib.build_unet(NUM_CLASSES, image_size=(64, 96), base_filters=4, depth=2,
                              stem_stride=2)
  # The same U-Net plus a 3x3 conv 3 -> base_filters and its BatchNorm; enc1_conv1 then reads
  # base_filters channels instead of 3.
  assert stem.count_params() == (plain.count_params() + (9 * 3 * 4 + 4) + 4 * 4
                                 + 9 * (4 - 3) * 4)
  assert stem.get_layer('stem_conv1').strides == (2, 2)
  assert tuple(stem.get_layer('enc1_relu2').output.shape) == (None, 32, 48, 4)
  assert tuple(stem.get_layer('logits').output.shape) == (None, 32, 48, NUM_CLASSES)
  assert tuple(stem.output.shape) == (None, 64, 96, NUM_CLASSES)
  assert stem.output.dtype == 'float32'
  logits = np.asarray(stem(np.random.default_rng(0).random((2, 64, 96, 3), np.float32)))
  assert np.all(np.isfinite(logits))
  # Bilinear upsampling with half-pixel centres: output pixel 9 sits at coarse coordinate 4.25,
  # so (9, 9) weighs coarse (4, 4), (4, 5), (5, 4), (5, 5) by 0.75^2, 0.75*0.25, ..., 0.25^2.
  images = np.random.default_rng(1).random((1, 64, 96, 3), np.float32)
  coarse = np.asarray(keras.Model(stem.input, stem.get_layer('logits').output)(images))[0]
  fine = np.asarray(stem(images))[0]
  expected = (0.5625 * coarse[4, 4] + 0.1875 * coarse[4, 5] + 0.1875 * coarse[5, 4]
              + 0.0625 * coarse[5, 5])
  np.testing.assert_allclose(fine[9, 9], expected, atol=1e-5)


@pytest.mark.parametrize('kwargs', [{'stem_stride': 3}, {'stem_stride': 2, 'image_size': (36, 48)}])
def test_bad_stem_stride_or_size_raises(kwargs):
  with pytest.raises(ValueError, match='stem_stride'):
    model_lib.build_unet(NUM_CLASSES, **({'image_size': (32, 32), 'depth': 2} | kwargs))


@pytest.mark.parametrize('policy', ['float32', 'mixed_bfloat16'])
def test_fused_batchnorm_matches_keras_batchnorm(policy):
  """Same outputs, gradients, moving statistics and inference as keras BatchNormalization."""
  rng = np.random.default_rng(0)
  x = tf.constant(rng.normal(3.0, 2.0, (2, 5, 6, 4)).astype(np.float32))
  upstream = tf.constant(rng.normal(size=(2, 5, 6, 4)).astype(np.float32))
  layers = [cls(momentum=0.9, dtype=policy) for cls in (keras.layers.BatchNormalization,
                                                         model_lib.FusedBatchNormalization)]
  for layer in layers:
    layer.build(x.shape)
    layer.set_weights([np.array([0.5, 1.0, 2.0, -1.0]), np.array([0.1, 0.0, -0.3, 1.0]),
                       np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.5, 1.0, 1.5, 2.0])])
  results = []
  for layer in layers:
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = layer(x, training=True)
      loss = tf.reduce_sum(tf.cast(y, tf.float32) * upstream)
    grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
    results.append([y, *grads, layer.moving_mean, layer.moving_variance,
                    layer(x, training=False)])
  assert results[1][0].dtype == results[0][0].dtype
  tolerance = 1e-5 if policy == 'float32' else 2e-2  # bf16 keeps ~3 significant digits.
  for keras_value, fused_value in zip(*results):
    np.testing.assert_allclose(np.asarray(tf.cast(fused_value, tf.float32)),
                               np.asarray(tf.cast(keras_value, tf.float32)),
                               rtol=tolerance, atol=tolerance)
  # Test of the test: the training call moved the statistics off their initial values.
  assert not np.allclose(layers[1].moving_mean, [1.0, 2.0, 3.0, 4.0])


def test_fused_batchnorm_is_only_unsynchronised():
  with pytest.raises(ValueError, match='fused_batchnorm needs sync_batchnorm False'):
    model_lib.build_unet(3, image_size=(16, 16), base_filters=4, depth=1, sync_batchnorm=True,
                         fused_batchnorm=True)
  model = model_lib.build_unet(3, image_size=(16, 16), base_filters=4, depth=1,
                               fused_batchnorm=True)
  assert _layer_counts(model)['FusedBatchNormalization'] == 6
  assert _layer_counts(model)['BatchNormalization'] == 0


def _pointwise_model(num_classes=3):
  """A 1x1-conv 'segmenter': each pixel's logits depend on that pixel only, so padding never
  reaches the cropped logits and multi-scale geometry can be checked exactly."""
  inputs = keras.Input((None, None, 3))
  return keras.Model(inputs, keras.layers.Conv2D(num_classes, 1, name='head')(inputs))


def test_predict_logits_with_one_scale_is_the_plain_or_flip_averaged_prediction():
  keras.utils.set_random_seed(3)
  model = model_lib.build_unet(4, image_size=(16, 24), base_filters=4, depth=2, dropout=0.0)
  x = np.random.default_rng(0).random((2, 16, 24, 3), dtype=np.float32)
  plain = model(x, training=False).numpy()
  np.testing.assert_array_equal(model_lib.predict_logits(model, x, scales=(1.0,)), plain)
  mirrored = model(x[:, :, ::-1], training=False).numpy()[:, :, ::-1]
  np.testing.assert_allclose(model_lib.predict_logits(model, x, flip=True),
                             (plain + mirrored) / 2, atol=1e-5)


def test_multiscale_logits_average_each_scale_resized_back():
  keras.utils.set_random_seed(4)
  model = model_lib.build_unet(4, image_size=(24, 32), base_filters=4, depth=2, dropout=0.0,
                               any_size=True)
  x = np.random.default_rng(1).random((2, 24, 32, 3), dtype=np.float32)
  half = tf.image.resize(x, (12, 16), method='bilinear', antialias=True)
  expected = 0.5 * (model(x, training=False) + tf.image.resize(model(half, training=False),
                                                               (24, 32), method='bilinear'))
  got = model_lib.predict_logits(model, x, scales=(0.5, 1.0), multiple=4)
  assert got.shape == (2, 24, 32, 4)
  np.testing.assert_allclose(got, expected, atol=1e-5)
  # Test of the test: the half-scale prediction differs from the full one.
  assert np.abs(got - model(x, training=False)).max() > 1e-3


def test_multiscale_pads_to_the_stride_and_crops_the_padding_away():
  keras.utils.set_random_seed(5)
  model = _pointwise_model()
  x = np.random.default_rng(2).random((1, 24, 32, 3), dtype=np.float32)
  # 0.6 x 24x32 = 14x19, not a multiple of 8: padded to 16x24 by mirroring, then cropped back.
  small = tf.image.resize(x, (14, 19), method='bilinear', antialias=True)
  expected = tf.image.resize(model(small), (24, 32), method='bilinear')
  got = model_lib.predict_logits(model, x, scales=(0.6,), multiple=8)
  np.testing.assert_allclose(got, expected, atol=1e-5)
  # Up-scaling resizes without antialiasing and with the flip each scale is mirror-averaged.
  large = tf.image.resize(x, (36, 48), method='bilinear')
  mirrored = model(large[:, :, ::-1])[:, :, ::-1]
  expected = tf.image.resize((model(large) + mirrored) / 2, (24, 32), method='bilinear')
  np.testing.assert_allclose(model_lib.predict_logits(model, x, True, (1.5,), 8), expected,
                             atol=1e-5)
