"""Builder tests: exact round trips for both layouts, void, bad inputs, determinism, resume."""

import concurrent.futures
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from camvid_common import errors
from tfrecords_builder import classes
from tfrecords_builder import features
from tfrecords_builder import manifest as manifest_lib
from tfrecords_builder import synthetic
from tfrecords_builder import verify
from tfrecords_builder import writer

REPO = pathlib.Path(__file__).resolve().parents[1]
QUIET = lambda *_: None  # pylint: disable=unnecessary-lambda-assignment


def read_split(out_dir, split):
  """Decodes every example of a split with TF's decoders: {source_id: (image, mask, raw)}."""
  manifest = manifest_lib.read(str(out_dir))
  result = {}
  for path in manifest.shard_paths(split):
    for raw in tf.data.TFRecordDataset(path):
      ex = features.parse_example(raw)
      result[ex['source_id'].numpy().decode()] = (ex['image'].numpy(), ex['mask'].numpy(),
                                                   raw.numpy())
  return result


def expected_kaggle_mask(label_path, csv_path):
  """Independent reference: per-colour loop over the parsed csv rows (void rows -> 255)."""
  rows = [line.split(',') for line in pathlib.Path(csv_path).read_text().splitlines()[1:]]
  rgb = np.asarray(Image.open(label_path).convert('RGB'))
  out = np.full(rgb.shape[:2], 77, np.uint8)
  index = 0
  for name, *color in rows:
    hit = np.all(rgb == np.array([int(c) for c in color]), axis=-1)
    if name.strip().lower() in ('void', 'unlabelled'):
      out[hit] = 255
    else:
      out[hit] = index
      index += 1
  assert (out != 77).all()
  return out


@pytest.fixture(scope='module')
def kaggle_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp('kaggle')
  synthetic.generate(str(d), 'kaggle', {'train': 7, 'val': 3}, (64, 48), seed=1)
  return d


@pytest.fixture(scope='module')
def segnet_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp('segnet')
  synthetic.generate(str(d), 'segnet', {'train': 10, 'val': 3, 'test': 2}, (40, 32), seed=2,
                     write_class_dict=False)
  return d


def test_kaggle_round_trip_is_exact(kaggle_dir, tmp_path):
  out = tmp_path / 'out'
  manifest = writer.build(str(kaggle_dir), str(out), num_shards=2, num_workers=2, log=QUIET)
  assert manifest['layout'] == 'kaggle'
  # The real table: 32 rows, Void (row 31) left out, so 31 classes and Wall is index 30.
  assert manifest['num_classes'] == 31
  assert manifest['classes'][30] == {'index': 30, 'name': 'Wall', 'color': [64, 192, 0]}
  assert manifest['classes'][2] == {'index': 2, 'name': 'Bicyclist', 'color': [0, 128, 192]}
  assert manifest['void'] == [{'name': 'Void', 'color': [0, 0, 0]}]
  assert set(manifest['splits']) == {'train', 'val'}
  for split, n in (('train', 7), ('val', 3)):
    examples = read_split(out, split)
    assert len(examples) == n == manifest['splits'][split]['num_examples']
    counts = np.zeros(256, np.int64)
    for source_id, (image, mask, _) in examples.items():
      image_path = kaggle_dir / split / f'{source_id}.png'
      label_path = kaggle_dir / f'{split}_labels' / f'{source_id}_L.png'
      np.testing.assert_array_equal(image, np.asarray(Image.open(image_path)))
      np.testing.assert_array_equal(mask, expected_kaggle_mask(label_path,
                                                               kaggle_dir / 'class_dict.csv'))
      counts += np.bincount(mask.ravel(), minlength=256)
    assert counts[:31].tolist() == manifest['splits'][split]['class_pixel_counts']
    assert counts[255] == manifest['splits'][split]['void_pixels'] > 0
    assert manifest['splits'][split]['image_size'] == [48, 64]


def test_segnet_round_trip_keeps_source_bytes(segnet_dir, tmp_path):
  out = tmp_path / 'out'
  manifest = writer.build(str(segnet_dir), str(out), num_workers=1, log=QUIET)
  assert manifest['layout'] == 'segnet'
  assert [c['name'] for c in manifest['classes']] == [n for n, _ in classes.SEGNET_ROWS[:11]]
  assert set(manifest['splits']) == {'train', 'val', 'test'}
  for split in ('train', 'val', 'test'):
    for source_id, (_, mask, raw) in read_split(out, split).items():
      label = np.asarray(Image.open(segnet_dir / f'{split}annot' / f'{source_id}.png'))
      np.testing.assert_array_equal(mask, np.where(label == 11, 255, label))
      parsed = tf.train.Example.FromString(raw).features.feature
      source_png = (segnet_dir / split / f'{source_id}.png').read_bytes()
      assert parsed['image/encoded'].bytes_list.value[0] == source_png


def test_model_garden_feature_keys(segnet_dir, tmp_path):
  out = tmp_path / 'out'
  writer.build(str(segnet_dir), str(out), num_workers=1, log=QUIET)
  raw = next(iter(tf.data.TFRecordDataset(manifest_lib.read(str(out)).shard_paths('val'))))
  feature = tf.train.Example.FromString(raw.numpy()).features.feature
  # The literal keys of official/vision/dataloaders/segmentation_input.py and tfexample_utils.
  assert set(feature) == {
      'image/encoded', 'image/format', 'image/height', 'image/width', 'image/source_id',
      'image/segmentation/class/encoded', 'image/segmentation/class/format'}
  assert feature['image/format'].bytes_list.value[0] == b'png'
  assert feature['image/segmentation/class/format'].bytes_list.value[0] == b'png'
  assert feature['image/height'].int64_list.value[0] == 32
  assert feature['image/width'].int64_list.value[0] == 40
  mask = tf.io.decode_png(feature['image/segmentation/class/encoded'].bytes_list.value[0])
  assert mask.shape == (32, 40, 1) and mask.dtype == tf.uint8


def test_shards_are_balanced_and_named(segnet_dir, tmp_path):
  out = tmp_path / 'out'
  manifest = writer.build(str(segnet_dir), str(out), num_shards={'train': 3, 'val': 5},
                          num_workers=2, log=QUIET)
  train = manifest['splits']['train']
  assert train['shards'] == [f'train-{i:05d}-of-00003.tfrecord' for i in range(3)]
  sizes = [sum(1 for _ in tf.data.TFRecordDataset(str(out / s))) for s in train['shards']]
  assert sorted(sizes) == [3, 3, 4]
  # More shards than frames: one frame per shard, never an empty shard.
  assert manifest['splits']['val']['num_shards'] == 3
  assert sorted(p.name for p in out.iterdir()) == sorted(
      ['manifest.json'] + train['shards'] + manifest['splits']['val']['shards']
      + manifest['splits']['test']['shards'])


def test_deterministic_across_runs_and_worker_counts(kaggle_dir, tmp_path):
  a, b = tmp_path / 'a', tmp_path / 'b'
  writer.build(str(kaggle_dir), str(a), num_shards=3, num_workers=1, log=QUIET)
  writer.build(str(kaggle_dir), str(b), num_shards=3, num_workers=2, log=QUIET)
  names = sorted(p.name for p in a.iterdir())
  assert names == sorted(p.name for p in b.iterdir())
  for name in names:
    assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_rerun_is_a_no_op_and_overwrite_redoes(segnet_dir, tmp_path):
  out = tmp_path / 'out'
  logs = []
  writer.build(str(segnet_dir), str(out), num_workers=1, log=QUIET)
  before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
  writer.build(str(segnet_dir), str(out), num_workers=1, log=logs.append)
  assert 'nothing to do' in logs[-1]
  assert before == {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
  # Different flags on the same dir need --overwrite.
  with pytest.raises(errors.InputError, match='different build'):
    writer.build(str(segnet_dir), str(out), num_shards=2, num_workers=1, log=QUIET)
  writer.build(str(segnet_dir), str(out), num_shards=2, num_workers=1, overwrite=True, log=QUIET)
  assert manifest_lib.read(str(out)).split('train')['num_shards'] == 2
  assert not list(out.glob('*-of-00001.tfrecord'))
  assert verify.verify(str(out), log=QUIET) == []


def test_resize_uses_nearest_for_masks(kaggle_dir, tmp_path):
  out = tmp_path / 'out'
  manifest = writer.build(str(kaggle_dir), str(out), num_workers=1, log=QUIET,
                          options=writer.Options(resize=(24, 32)))
  assert manifest['resize'] == [24, 32]
  for source_id, (image, mask, _) in read_split(out, 'val').items():
    assert image.shape == (24, 32, 3) and mask.shape == (24, 32)
    full = expected_kaggle_mask(kaggle_dir / 'val_labels' / f'{source_id}_L.png',
                                kaggle_dir / 'class_dict.csv')
    # Exact 2x downscale with nearest: every output pixel is one of its source block's labels.
    blocks = full.reshape(24, 2, 32, 2).transpose(0, 2, 1, 3).reshape(24, 32, 4)
    assert (blocks == mask[..., None]).any(-1).all()


def test_verify_catches_a_damaged_shard(segnet_dir, tmp_path):
  out = tmp_path / 'out'
  manifest = writer.build(str(segnet_dir), str(out), num_workers=1, log=QUIET)
  assert verify.verify(str(out), log=QUIET) == []
  shard = out / manifest['splits']['train']['shards'][0]
  shard.write_bytes(shard.read_bytes()[:-100])
  problems = verify.verify(str(out), log=QUIET)
  assert any(shard.name in p for p in problems)


# --- bad input: one clear error naming the file, and never a manifest -----------------------

def _copy(src, tmp_path):
  dst = tmp_path / 'in'
  shutil.copytree(src, dst)
  return dst


def _first(directory, pattern='*.png'):
  return sorted(pathlib.Path(directory).glob(pattern))[0]


def _break_unknown_colour(d):
  label = _first(d / 'train_labels')
  rgb = np.asarray(Image.open(label).convert('RGB')).copy()
  rgb[:2, :3] = (1, 2, 3)
  Image.fromarray(rgb).save(label)
  return label.name, r'colour \(1, 2, 3\) is not in class_dict.csv \(6 pixels\)'


def _break_missing_label(d):
  label = _first(d / 'val_labels')
  label.unlink()
  return label.name.replace('_L.png', '.png'), 'image has no label'


def _break_missing_image(d):
  image = _first(d / 'val')
  image.unlink()
  return image.stem + '_L.png', 'label has no image'


def _break_size_mismatch(d):
  label = _first(d / 'train_labels')
  Image.open(label).resize((32, 24), Image.NEAREST).save(label)
  return label.name, r'size 24x32 \(HxW\) differs'


def _break_truncated_png(d):
  image = _first(d / 'train')
  image.write_bytes(image.read_bytes()[:200])
  return image.name, 'corrupt or truncated'


def _break_corrupt_png(d):
  image = _first(d / 'val')
  data = bytearray(image.read_bytes())
  data[100:140] = bytes(40)
  image.write_bytes(bytes(data))
  return image.name, 'corrupt or truncated'


def _break_class_dict(d):
  path = d / 'class_dict.csv'
  path.write_text(path.read_text().replace('Car,64, 0, 128', 'Car,64, zero, 128'))
  return 'class_dict.csv', 'line 7: colour values must be integers'


def _break_missing_class_dict(d):
  (d / 'class_dict.csv').unlink()
  return 'class_dict.csv', 'missing'


def _break_empty_input(d):
  for split in ('train', 'val'):
    for p in (d / split).iterdir():
      p.unlink()
    for p in (d / f'{split}_labels').iterdir():
      p.unlink()
  return str(d), 'no kaggle frames found'


@pytest.mark.parametrize('breaker', [
    _break_unknown_colour, _break_missing_label, _break_missing_image, _break_size_mismatch,
    _break_truncated_png, _break_corrupt_png, _break_class_dict, _break_missing_class_dict,
    _break_empty_input])
def test_bad_input_is_one_clear_error_and_no_manifest(breaker, kaggle_dir, tmp_path):
  d = _copy(kaggle_dir, tmp_path)
  name, pattern = breaker(d)
  out = tmp_path / 'out'
  with pytest.raises(errors.InputError, match=pattern) as err:
    writer.build(str(d), str(out), num_shards=2, num_workers=2, log=QUIET)
  message = str(err.value)
  assert name in message and '\n' not in message
  assert not (out / 'manifest.json').exists()
  assert not [p for p in out.rglob('*') if '.tmp-' in p.name]


def test_unknown_colour_can_be_mapped_to_void(kaggle_dir, tmp_path):
  d = _copy(kaggle_dir, tmp_path)
  name, _ = _break_unknown_colour(d)
  out = tmp_path / 'out'
  writer.build(str(d), str(out), num_workers=1, log=QUIET,
               options=writer.Options(unknown_color='void'))
  mask = read_split(out, 'train')[name.replace('_L.png', '')][1]
  assert (mask[:2, :3] == 255).all()


def test_segnet_unknown_value_and_neither_layout(segnet_dir, tmp_path):
  d = _copy(segnet_dir, tmp_path)
  label = _first(d / 'trainannot')
  values = np.asarray(Image.open(label)).copy()
  values[0, 0] = 40
  Image.fromarray(values).save(label)
  with pytest.raises(errors.InputError, match=f'{label.name}: label value 40 is not a class'):
    writer.build(str(d), str(tmp_path / 'out'), num_workers=1, log=QUIET)
  (tmp_path / 'empty').mkdir()
  with pytest.raises(errors.InputError, match='not a CamVid folder'):
    writer.build(str(tmp_path / 'empty'), str(tmp_path / 'out2'), log=QUIET)


def test_output_dir_with_other_data_needs_overwrite(segnet_dir, tmp_path):
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'notes.txt').write_text('mine')
  with pytest.raises(errors.InputError, match='holds other data'):
    writer.build(str(segnet_dir), str(out), num_workers=1, log=QUIET)
  writer.build(str(segnet_dir), str(out), num_workers=1, overwrite=True, log=QUIET)
  assert (out / 'manifest.json').exists() and (out / 'notes.txt').read_text() == 'mine'


def test_class_dict_parsing_of_the_real_kaggle_file(kaggle_class_dict):
  table = classes.parse_class_dict(kaggle_class_dict.read_text(), str(kaggle_class_dict))
  assert len(table.rows) == 32 and table.num_classes == 31
  assert table.void_rows == (30,)
  assert table.classes[-1] == ('Wall', (64, 192, 0))
  assert table.classes[22] == ('SUVPickupTruck', (64, 128, 192))


@pytest.mark.parametrize('text, pattern', [
    ('', 'empty class table'),
    ('label,r,g,b\nSky,1,2,3', 'expected header'),
    ('name,r,g,b\nSky,1,2', 'expected "name,r,g,b"'),
    ('name,r,g,b\nSky,1,2,300', 'in 0..255'),
    ('name,r,g,b\nSky,1,2,3\nsky,4,5,6', 'duplicate class name'),
    ('name,r,g,b\nSky,1,2,3\nRoad,1,2,3', 'already used by "Sky"'),
    ('name,r,g,b\nVoid,0,0,0', 'no non-void classes'),
])
def test_malformed_class_dict(text, pattern):
  with pytest.raises(errors.InputError, match=pattern):
    classes.parse_class_dict(text, 'x/class_dict.csv')


def test_colour_lookup_is_vectorised_and_exact():
  table = classes.parse_class_dict('name,r,g,b\nA,1,2,3\nVoid,0,0,0\nB, 255, 0, 7', 't.csv')
  rgb = np.array([[[1, 2, 3], [0, 0, 0]], [[255, 0, 7], [1, 2, 3]]], np.uint8)
  np.testing.assert_array_equal(classes.colors_to_indices(rgb, table, 't.png'),
                                [[0, 255], [1, 0]])


# --- real frames and the command line -------------------------------------------------------

def _run_cli(*args, **kw):
  return subprocess.run([sys.executable, '-m', 'tfrecords_builder', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300, **kw)


def test_real_segnet_frames_round_trip(segnet_real_dir, tmp_path):
  d = tmp_path / 'in'
  for split, n in (('train', 6), ('val', 4)):
    for sub in (split, split + 'annot'):
      (d / sub).mkdir(parents=True)
      for p in sorted((segnet_real_dir / sub).glob('*.png'))[:n]:
        shutil.copy(p, d / sub / p.name)
  shutil.copy(segnet_real_dir / 'class_dict.csv', d / 'class_dict.csv')
  out = tmp_path / 'out'
  proc = _run_cli('--input_dir', str(d), '--output_dir', str(out), '--num_workers', '2')
  assert proc.returncode == 0, proc.stderr
  assert 'ex/s' in proc.stdout
  manifest = manifest_lib.read(str(out)).raw
  assert manifest['classes'][4] == {'index': 4, 'name': 'Pavement', 'color': [60, 40, 222]}
  for split in ('train', 'val'):
    examples = read_split(out, split)
    assert manifest['splits'][split]['image_size'] == [360, 480]
    for source_id, (image, mask, _) in examples.items():
      label = np.asarray(Image.open(d / f'{split}annot' / f'{source_id}.png'))
      np.testing.assert_array_equal(mask, np.where(label == 11, 255, label))
      np.testing.assert_array_equal(image, np.asarray(Image.open(d / split / f'{source_id}.png')))
  proc = _run_cli('--verify', '--output_dir', str(out))
  assert proc.returncode == 0 and 'OK' in proc.stdout, proc.stderr


def test_cli_bad_input_is_one_line_without_traceback(kaggle_dir, tmp_path):
  d = _copy(kaggle_dir, tmp_path)
  name, _ = _break_unknown_colour(d)
  proc = _run_cli('--input_dir', str(d), '--output_dir', str(tmp_path / 'out'))
  assert proc.returncode == 2
  assert 'Traceback' not in proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and name in errors[0] and '(1, 2, 3)' in errors[0]
  assert not (tmp_path / 'out' / 'manifest.json').exists()
  proc = _run_cli('--input_dir', str(d), '--output_dir', str(tmp_path / 'o'), '--resize', '3by4')
  assert proc.returncode == 2 and 'error: --resize 3by4: expected HxW' in proc.stderr


@pytest.mark.multiprocess
def test_resume_after_kill_reuses_complete_shards(tmp_path):
  src = tmp_path / 'in'
  synthetic.generate(str(src), 'segnet', {'train': 40}, (160, 120), seed=3)
  out, ref = tmp_path / 'out', tmp_path / 'ref'
  args = ['--input_dir', str(src), '--num_shards', '40', '--num_workers', '1']
  proc = subprocess.Popen([sys.executable, '-m', 'tfrecords_builder', *args,
                           '--output_dir', str(out)], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
  deadline = time.time() + 120
  while time.time() < deadline and len(list(out.glob('train-*.tfrecord'))) < 5:
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  finished = sorted(out.glob('train-*.tfrecord'))
  assert 5 <= len(finished) < 40, 'the build was not interrupted half-way'
  assert not (out / 'manifest.json').exists()
  for shard in finished:  # Anything under a final name is a complete, readable shard.
    assert sum(1 for _ in tf.data.TFRecordDataset(str(shard))) == 1
  logs = []
  writer.build(str(src), str(out), num_shards=40, num_workers=2, log=logs.append)
  assert any(f'reusing {len(finished)} complete shards' in line for line in logs), logs
  assert not [p for p in out.iterdir() if '.tmp-' in p.name]
  writer.build(str(src), str(ref), num_shards=40, num_workers=2, log=QUIET)
  for shard in sorted(ref.iterdir()):
    assert (out / shard.name).read_bytes() == shard.read_bytes(), shard.name


def _die_on_three(item):
  if item == 3:
    os._exit(1)  # A worker killed mid-task (OOM killer, segfault in a decoder).
  return item * 10


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_a_dead_worker_fails_the_build_instead_of_hanging():
  assert list(writer._pool_map(_die_on_three, range(3), 2)) == [0, 10, 20]
  with pytest.raises(concurrent.futures.process.BrokenProcessPool):
    list(writer._pool_map(_die_on_three, range(12), 2))
