"""Tests for trainer.export and the trainer.predict command line.

The serving signature is checked against an independent re-computation of its pipeline (decode,
[0, 1] scaling, antialiased resize, optional standardization, model, optional flip averaging,
logits resized back, argmax) on real PNG and JPEG bytes, with a tiny U-Net so the whole file
stays well under a minute.
"""

import io
import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from camvid_common import errors
from trainer import export as export_lib
from trainer import inference
from trainer import model as model_lib
from trainer import visualize

REPO = pathlib.Path(__file__).resolve().parents[1]
MODEL_SIZE = (32, 32)
CLASS_NAMES = ['Road', 'Building', 'Pedestrian', 'Car']
CLASS_COLORS = [[128, 64, 128], [70, 70, 70], [220, 20, 60], [0, 0, 142]]
VOID_COLOR = (0, 0, 0)
# Pixel agreement required between the SavedModel and the test's own computation. The ops are
# the same, but the flip path batches differently, which may flip a rare near-tie argmax.
MIN_AGREEMENT = 0.999


@pytest.fixture(scope='module')
def model():
  keras.utils.set_random_seed(0)
  return model_lib.build_unet(num_classes=len(CLASS_NAMES), image_size=MODEL_SIZE,
                              base_filters=4, depth=2, dropout=0.0)


def _spec(**changes):
  return inference.Spec(class_names=tuple(CLASS_NAMES),
                        class_colors=tuple(map(tuple, CLASS_COLORS)),
                        image_size=MODEL_SIZE).replace(**changes)


def _export(model, export_dir, flip=False, logit_bias=None, scales=(1.0,), multiple=1,
            standardize=False):
  export_lib.export_model(model, str(export_dir), _spec(
      flip=flip, bias=None if logit_bias is None else tuple(logit_bias), scales=scales,
      size_multiple=multiple, standardize=standardize))


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory, model):
  """A training output dir M with M/export, as the trainer leaves it."""
  root = tmp_path_factory.mktemp('model_dir')
  _export(model, root / 'export')
  return root


@pytest.fixture(scope='module')
def serve(model_dir):
  return tf.saved_model.load(str(model_dir / 'export' / 'serving')).signatures['serving_default']


def _image(height, width, seed):
  """A smooth colour gradient plus noise, so the random model predicts several classes."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width]
  base = np.stack([255 * x / width, 255 * y / height, 128 + 0 * x], axis=-1)
  noisy = base + rng.normal(0, 40, base.shape)
  return np.clip(noisy, 0, 255).astype(np.uint8)


def _encode(array, fmt='PNG'):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format=fmt)
  return buf.getvalue()


def _expected_class_ids(model, image, flip=False, logit_bias=None, standardize=False):
  """The serving pipeline re-computed eagerly for one decoded uint8 [H, W, 3] image."""
  height, width = image.shape[:2]
  x = tf.image.convert_image_dtype(tf.constant(image[None]), tf.float32)
  x = tf.image.resize(x, MODEL_SIZE, method='bilinear', antialias=True)
  if standardize:  # The resized frame's mean and deviation over all its pixels and channels.
    mean, std = tf.reduce_mean(x), tf.math.reduce_std(x)
    x = (x - mean) / std
  logits = model(x, training=False)
  if flip:
    mirrored = model(x[:, :, ::-1, :], training=False)[:, :, ::-1, :]
    logits = (logits + mirrored) / 2
  logits = tf.image.resize(logits, (height, width), method='bilinear').numpy()[0]
  if logit_bias is not None:
    logits = logits + np.asarray(logit_bias, np.float32)
  return np.argmax(logits, axis=-1)


def _assert_agrees(actual, expected):
  assert actual.shape == expected.shape
  agreement = np.mean(actual == expected)
  assert agreement >= MIN_AGREEMENT, f'only {agreement:.4%} of pixels agree'


# --- the serving SavedModel -------------------------------------------------------------------

def test_signature_takes_image_bytes_and_returns_class_ids(serve):
  _, inputs = serve.structured_input_signature
  assert list(inputs) == ['image_bytes']
  assert inputs['image_bytes'].dtype == tf.string
  assert inputs['image_bytes'].shape.as_list() == [None]
  assert list(serve.structured_outputs) == ['class_ids']


@pytest.mark.parametrize('fmt', ['PNG', 'JPEG'])
def test_serving_matches_independent_prediction_at_input_resolution(model, serve, fmt):
  image = _image(40, 56, seed=1)
  encoded = _encode(image, fmt)
  out = serve(image_bytes=tf.constant([encoded]))['class_ids']
  assert out.dtype == tf.uint8
  assert out.shape == (1, 40, 56)  # The input resolution, not the model's 32x32.
  out = out.numpy()
  assert out.max() < len(CLASS_NAMES)
  # JPEG is lossy: compare with what the same decoder makes of the bytes, not the source array.
  decoded = image if fmt == 'PNG' else tf.io.decode_jpeg(encoded, channels=3).numpy()
  expected = _expected_class_ids(model, decoded)
  assert len(np.unique(expected)) > 1, 'degenerate test: the model predicts a single class'
  _assert_agrees(out[0], expected)


def test_serving_batches_same_size_images_and_rejects_mixed_sizes(model, serve):
  images = [_image(24, 40, seed=2), _image(24, 40, seed=3)]
  out = serve(image_bytes=tf.constant([_encode(i) for i in images]))['class_ids'].numpy()
  assert out.shape == (2, 24, 40)
  for got, image in zip(out, images):
    _assert_agrees(got, _expected_class_ids(model, image))
  with pytest.raises(tf.errors.InvalidArgumentError, match='same height and width'):
    serve(image_bytes=tf.constant([_encode(images[0]), _encode(_image(40, 56, seed=4))]))
  assert serve(image_bytes=tf.constant([], tf.string))['class_ids'].shape[0] == 0


def test_flip_export_averages_with_mirrored_prediction(model, tmp_path):
  _export(model, tmp_path / 'export', flip=True)
  serve = tf.saved_model.load(str(tmp_path / 'export' / 'serving')).signatures['serving_default']
  image = _image(40, 56, seed=5)
  out = serve(image_bytes=tf.constant([_encode(image)]))['class_ids'].numpy()[0]
  expected = _expected_class_ids(model, image, flip=True)
  # Test of the test: flip averaging must actually change this prediction somewhere.
  assert np.any(expected != _expected_class_ids(model, image, flip=False))
  _assert_agrees(out, expected)
  assert export_lib.load_labels(str(tmp_path / 'export'))['flip'] is True


def test_logit_bias_is_added_before_the_argmax_and_recorded(model, tmp_path):
  image = _image(40, 56, seed=7)
  plain = _expected_class_ids(model, image)
  # Push the most predicted class down and another up: the argmax must change.
  top = int(np.bincount(plain.reshape(-1)).argmax())
  bias = [0.0] * len(CLASS_NAMES)
  bias[top], bias[(top + 1) % len(CLASS_NAMES)] = -0.5, 0.5
  _export(model, tmp_path / 'export', logit_bias=bias)
  serve = tf.saved_model.load(str(tmp_path / 'export' / 'serving')).signatures['serving_default']
  out = serve(image_bytes=tf.constant([_encode(image)]))['class_ids'].numpy()[0]
  expected = _expected_class_ids(model, image, logit_bias=bias)
  assert np.mean(expected != plain) > 0.05, 'degenerate test: the bias changes nothing'
  _assert_agrees(out, expected)
  assert export_lib.load_labels(str(tmp_path / 'export'))['logit_bias'] == bias
  with pytest.raises(ValueError, match='"logit_bias" must be null or a list of 4 numbers'):
    _export(model, tmp_path / 'other', logit_bias=bias[:3])


def test_multiscale_export_averages_the_scaled_predictions(tmp_path):
  keras.utils.set_random_seed(0)
  model = model_lib.build_unet(num_classes=len(CLASS_NAMES), image_size=MODEL_SIZE,
                               base_filters=4, depth=2, dropout=0.0, any_size=True)
  # 0.75 x 32 = 24 is a multiple of the model's 4; 0.6 x 32 = 19 is padded to 20.
  _export(model, tmp_path / 'export', scales=(0.6, 0.75, 1.0), multiple=4)
  serve = tf.saved_model.load(str(tmp_path / 'export' / 'serving')).signatures['serving_default']
  image = _image(40, 56, seed=8)
  out = serve(image_bytes=tf.constant([_encode(image)]))['class_ids'].numpy()[0]
  x = tf.image.resize(tf.image.convert_image_dtype(image[None], tf.float32), MODEL_SIZE,
                      method='bilinear', antialias=True)
  logits = model(x, training=False)
  small = tf.image.resize(x, (24, 24), method='bilinear', antialias=True)
  logits += tf.image.resize(model(small, training=False), MODEL_SIZE, method='bilinear')
  smaller = tf.image.resize(x, (19, 19), method='bilinear', antialias=True)
  smaller = tf.pad(smaller, [[0, 0], [0, 1], [0, 1], [0, 0]], mode='SYMMETRIC')
  logits += tf.image.resize(model(smaller, training=False)[:, :19, :19], MODEL_SIZE,
                            method='bilinear')
  expected = np.argmax(tf.image.resize(logits / 3, (40, 56), method='bilinear')[0], -1)
  assert np.mean(expected != _expected_class_ids(model, image)) > 0.01, (
      'degenerate test: the scales change no prediction')
  _assert_agrees(out, expected)
  assert export_lib.load_labels(str(tmp_path / 'export'))['scales'] == [0.6, 0.75, 1.0]


def test_standardized_export_is_blind_to_a_global_brightness_and_contrast_change(
    model, serve, tmp_path):
  _export(model, tmp_path / 'export', standardize=True)
  standardized = tf.saved_model.load(
      str(tmp_path / 'export' / 'serving')).signatures['serving_default']
  image = _image(40, 56, seed=9) // 5 * 5
  darker = image // 5 * 3 + 13  # 0.6 x + 13, exact in uint8.
  predict = lambda fn, x: fn(image_bytes=tf.constant([_encode(x)]))['class_ids'].numpy()[0]
  out = predict(standardized, image)
  _assert_agrees(out, _expected_class_ids(model, image, standardize=True))
  _assert_agrees(predict(standardized, darker), out)
  assert np.mean(predict(serve, darker) != predict(serve, image)) > 0.05, (
      'degenerate test: darkening changes no plain prediction')
  assert export_lib.load_labels(str(tmp_path / 'export'))['standardize'] is True


# --- model.keras, labels.json and atomicity ---------------------------------------------------

def test_keras_model_reloads_with_same_logits(model, model_dir):
  reloaded = keras.models.load_model(str(model_dir / 'export' / export_lib.MODEL_NAME))
  x = np.random.default_rng(6).random((2, *MODEL_SIZE, 3), dtype=np.float32)
  np.testing.assert_allclose(reloaded(x, training=False).numpy(),
                             model(x, training=False).numpy(), atol=1e-5)


def test_export_dir_holds_exactly_the_three_artifacts(model_dir):
  assert sorted(os.listdir(model_dir / 'export')) == ['labels.json', 'model.keras', 'serving']


def test_labels_json_contents(model_dir):
  expected = {
      'classes': [{'index': i, 'name': n, 'color': c}
                  for i, (n, c) in enumerate(zip(CLASS_NAMES, CLASS_COLORS))],
      'ignore_label': 255,
      'image_size': [32, 32],
      'flip': False,
      'size_multiple': 1,
      'standardize': False,
      'scales': [1.0],
      'logit_bias': None,
      'class_weights': None,
  }
  with open(model_dir / 'export' / 'labels.json') as f:
    assert json.load(f) == expected
  assert export_lib.load_labels(str(model_dir / 'export')) == expected


def test_load_labels_errors_name_the_file(tmp_path):
  path = str(tmp_path / 'labels.json')
  with pytest.raises(errors.InputError, match='labels.json: not found'):
    export_lib.load_labels(str(tmp_path))
  for text, problem in (('{not json', 'not valid JSON'), ('{"classes": []}', 'missing keys'),
                        ('{"classes": [{"index": 0, "name": "a", "color": [1, 2]}], '
                         '"ignore_label": 255, "image_size": [8, 8], "flip": false}', 'color'),
                        ('{"classes": [{"index": 0, "name": "a", "color": [1, 2, 3]}], '
                         '"ignore_label": 255, "image_size": [8, 8], "flip": false, '
                         '"logit_bias": [1, 2]}', 'logit_bias'),
                        ('{"classes": [{"index": 0, "name": "a", "color": [1, 2, 3]}], '
                         '"ignore_label": 255, "image_size": [8, 8], "flip": false, '
                         '"scales": []}', 'scales')):
    (tmp_path / 'labels.json').write_text(text)
    with pytest.raises(errors.InputError, match=problem) as info:
      export_lib.load_labels(str(tmp_path))
    assert path in str(info.value)


def test_export_rejects_mismatched_arguments(model, tmp_path):
  with pytest.raises(ValueError, match='4 classes'):
    export_lib.export_model(model, str(tmp_path), _spec(class_names=tuple(CLASS_NAMES[:3]),
                                                        class_colors=tuple(CLASS_COLORS[:3])))
  with pytest.raises(ValueError, match='model input'):
    export_lib.export_model(model, str(tmp_path), _spec(image_size=(64, 64)))
  with pytest.raises(ValueError, match='color'):
    export_lib.export_model(model, str(tmp_path), _spec(class_colors=((0, 0, 300),) * 4))


def test_crash_during_reexport_leaves_no_complete_looking_export(model, tmp_path, monkeypatch):
  _export(model, tmp_path)
  assert export_lib.load_labels(str(tmp_path))

  def crash(unused_model, path, *args):
    # Dies half-way: the new SavedModel directory exists with only part of its files.
    os.makedirs(path)
    with open(os.path.join(path, 'saved_model.pb'), 'wb') as f:
      f.write(b'partial')
    raise RuntimeError('simulated crash while writing the SavedModel')

  monkeypatch.setattr(export_lib, '_write_saved_model', crash)
  with pytest.raises(RuntimeError, match='simulated crash'):
    _export(model, tmp_path)
  # The old labels.json went first, so the half-written export is not mistaken for a whole one
  # (the predict tool checks the same file); and no temporary names are left behind.
  assert sorted(os.listdir(tmp_path)) == ['model.keras', 'serving']
  assert os.listdir(tmp_path / 'serving') == ['saved_model.pb']
  with pytest.raises(errors.InputError, match='not found'):
    export_lib.load_labels(str(tmp_path))


# --- python -m trainer.predict ----------------------------------------------------------------

def _run_predict(*args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  return subprocess.run([sys.executable, '-m', 'trainer.predict', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_predict_writes_masks_and_overlays(model, model_dir, tmp_path):
  images = {'a': _image(40, 56, seed=7), 'b': _image(24, 36, seed=8)}
  in_dir = tmp_path / 'in'
  in_dir.mkdir()
  for stem, image in images.items():
    (in_dir / f'{stem}.png').write_bytes(_encode(image))
  (in_dir / 'notes.txt').write_text('not an image')  # Ignored: not .png/.jpg/.jpeg.
  out_dir = tmp_path / 'out'

  proc = _run_predict('--model_dir', str(model_dir), '--input', str(in_dir),
                      '--output_dir', str(out_dir))
  assert proc.returncode == 0, proc.stderr
  assert sorted(os.listdir(out_dir)) == ['a_mask.png', 'a_overlay.png',
                                         'b_mask.png', 'b_overlay.png']
  assert '2 images' in proc.stdout.splitlines()[-1]

  allowed = {tuple(c) for c in CLASS_COLORS} | {VOID_COLOR}
  palette = np.array(CLASS_COLORS, np.uint8)
  for stem, image in images.items():
    mask = np.asarray(Image.open(out_dir / f'{stem}_mask.png').convert('RGB'))
    overlay = np.asarray(Image.open(out_dir / f'{stem}_overlay.png').convert('RGB'))
    assert mask.shape == overlay.shape == image.shape
    assert {tuple(c) for c in mask.reshape(-1, 3)} <= allowed
    # Class colours are distinct, so the mask maps back to class ids exactly.
    ids = np.argmax(np.all(mask[:, :, None, :] == palette, axis=-1), axis=-1)
    _assert_agrees(ids, _expected_class_ids(model, image))
    np.testing.assert_array_equal(overlay, visualize.overlay(image, ids, palette))


def test_predict_bad_input_exits_2_with_one_error_line(model_dir, tmp_path):
  good = _encode(_image(16, 16, seed=10))
  no_export = tmp_path / 'untrained'
  no_export.mkdir()
  missing = tmp_path / 'missing.png'
  corrupt = tmp_path / 'corrupt'
  corrupt.mkdir()
  (corrupt / 'a.png').write_bytes(good)
  (corrupt / 'b.png').write_bytes(good[:100])  # Truncated.
  out = str(tmp_path / 'out')
  # Each run costs ~5 s of TensorFlow import, so one case per stage that can fail: finding the
  # export, listing the input, decoding an image. (A missing flag or an image-less directory is
  # reported just like the missing --input.)
  cases = [
      (['--model_dir', str(no_export), '--input', str(corrupt / 'a.png'), '--output_dir', out],
       [str(no_export / 'export'), 'export missing', 'train first']),
      (['--model_dir', str(model_dir), '--input', str(missing), '--output_dir', out],
       [str(missing), 'no such file']),
      (['--model_dir', str(model_dir), '--input', str(corrupt), '--output_dir', out],
       [str(corrupt / 'b.png'), 'not a valid PNG or JPEG']),
  ]
  for args, fragments in cases:
    proc = _run_predict(*args)
    assert proc.returncode == 2, (args, proc.stderr)
    assert 'Traceback' not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1, (args, proc.stderr)
    for fragment in fragments:
      assert fragment in errors[0], (fragment, errors[0])
  # Only the corrupt-image run got as far as writing: the image sorted before the bad one.
  assert sorted(os.listdir(out)) == ['a_mask.png', 'a_overlay.png']


def test_serving_root_copy_beside_other_files_serves_the_same(model, model_dir, tmp_path):
  """Vertex AI reads a SavedModel at AIP_MODEL_DIR's root, where a run keeps its other files."""
  (tmp_path / 'config.json').write_text('{}')
  for _ in range(2):  # A rerun replaces the copy.
    export_lib.write_serving_root(model, str(tmp_path), _spec())
  assert {'saved_model.pb', 'variables', 'config.json'} <= set(os.listdir(tmp_path))
  root = tf.saved_model.load(str(tmp_path)).signatures['serving_default']
  exported = tf.saved_model.load(str(model_dir / 'export' / 'serving')).signatures[
      'serving_default']
  image = tf.constant([_encode(_image(40, 56, seed=3))])
  np.testing.assert_array_equal(root(image_bytes=image)['class_ids'].numpy(),
                                exported(image_bytes=image)['class_ids'].numpy())
