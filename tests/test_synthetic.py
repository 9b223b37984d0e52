"""Tests for tfrecords_builder.synthetic: layouts, exact labels, determinism, richness and CLI."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tfrecords_builder import synthetic

REPO = pathlib.Path(__file__).resolve().parents[1]
# The repo is cloned next to shared/, which holds the real (never shipped) CamVid files.
SHARED_DATA = REPO.parent / 'shared' / 'data'
SEGNET_NAMES = [name for name, _ in synthetic.SEGNET_CLASSES]


def _kaggle_colours(text):
  rows = [line.split(',') for line in text.splitlines()[1:]]
  return {tuple(int(c) for c in row[1:]): row[0] for row in rows}


def _files(root):
  return sorted(str(p.relative_to(root)) for p in root.rglob('*') if p.is_file())


def _load(path):
  with Image.open(path) as im:
    return im.mode, np.asarray(im)


def test_kaggle_class_dict_is_the_real_file_byte_for_byte(tmp_path):
  real = SHARED_DATA / 'camvid-kaggle' / 'class_dict.csv'
  if not real.is_file():
    pytest.skip(f'real Kaggle class_dict.csv not found at {real} (shared/ not present)')
  synthetic.generate(str(tmp_path), 'kaggle', 0, (16, 16))
  assert (tmp_path / 'class_dict.csv').read_bytes() == real.read_bytes()
  assert synthetic.KAGGLE_CLASS_DICT.encode() == real.read_bytes()


def test_segnet_class_dict_matches_the_real_release_when_present(tmp_path):
  real = SHARED_DATA / 'camvid-segnet' / 'class_dict.csv'
  if not real.is_file():
    pytest.skip(f'real SegNet class_dict.csv not found at {real} (shared/ not present)')
  synthetic.generate(str(tmp_path), 'segnet', 0, (16, 16))
  assert (tmp_path / 'class_dict.csv').read_bytes() == real.read_bytes()


def test_kaggle_class_dict_shape():
  # Holds without shared/: 32 rows, Void = 0,0,0 at row 31 of 32, Wall last, no final newline.
  lines = synthetic.KAGGLE_CLASS_DICT.split('\n')
  assert lines[0] == 'name,r,g,b' and len(lines) == 33
  assert lines[31] == 'Void,0, 0, 0' and lines[32] == 'Wall,64, 192, 0'


def test_kaggle_layout_files_and_exact_colour_labels(tmp_path):
  written = synthetic.generate(str(tmp_path), 'kaggle', {'train': 3, 'val': 2}, (64, 48), seed=4)
  assert written == {'train': ['synth04_000000', 'synth04_000001', 'synth04_000002'],
                     'val': ['synth04_000003', 'synth04_000004']}
  expected = ['class_dict.csv']
  for split, names in written.items():
    expected += [f'{split}/{n}.png' for n in names] + [f'{split}_labels/{n}_L.png' for n in names]
  assert _files(tmp_path) == sorted(expected)
  colours = _kaggle_colours(synthetic.KAGGLE_CLASS_DICT)
  assert len(colours) == 32
  used = set()
  for split, names in written.items():
    for name in names:
      mode, image = _load(tmp_path / split / f'{name}.png')
      label_mode, label = _load(tmp_path / f'{split}_labels' / f'{name}_L.png')
      assert (mode, label_mode) == ('RGB', 'RGB')
      assert image.shape == label.shape == (48, 64, 3)
      found = {tuple(c) for c in np.unique(label.reshape(-1, 3), axis=0)}
      assert found <= set(colours), found - set(colours)
      used |= {colours[c] for c in found}
  assert {'Sky', 'Building', 'Road', 'Sidewalk', 'Car'} <= used


def test_segnet_layout_files_and_index_labels(tmp_path):
  written = synthetic.generate(str(tmp_path), 'segnet', 2, (40, 32), splits=('train', 'test'))
  assert list(written) == ['train', 'test']
  expected = ['class_dict.csv']
  for split, names in written.items():
    expected += [f'{split}/{n}.png' for n in names] + [f'{split}annot/{n}.png' for n in names]
  assert _files(tmp_path) == sorted(expected)
  for split, names in written.items():
    for name in names:
      mode, image = _load(tmp_path / split / f'{name}.png')
      label_mode, label = _load(tmp_path / f'{split}annot' / f'{name}.png')
      assert (mode, label_mode) == ('RGB', 'L')
      assert image.shape == (32, 40, 3) and label.shape == (32, 40)
      assert label.max() <= 11
  text = (tmp_path / 'class_dict.csv').read_text()
  assert text.splitlines()[0] == 'name,r,g,b'
  assert [line.split(',')[0] for line in text.splitlines()[1:]] == SEGNET_NAMES
  assert text.splitlines()[-1] == 'Unlabelled,0,0,0'


def test_class_dict_is_optional(tmp_path):
  synthetic.generate(str(tmp_path), 'segnet', 1, (16, 16), write_class_dict=False)
  assert not (tmp_path / 'class_dict.csv').exists()
  assert (tmp_path / 'trainannot' / 'synth00_000000.png').is_file()


def test_same_arguments_give_byte_identical_files(tmp_path):
  for layout in synthetic.LAYOUTS:
    a, b = tmp_path / f'{layout}_a', tmp_path / f'{layout}_b'
    for d in (a, b):
      synthetic.generate(str(d), layout, {'train': 2, 'val': 1}, (96, 72), seed=7)
    assert _files(a) == _files(b)
    for name in _files(a):
      assert (a / name).read_bytes() == (b / name).read_bytes(), name
  # A different seed gives different frames.
  synthetic.generate(str(tmp_path / 'other'), 'segnet', {'train': 1}, (96, 72), seed=8)
  assert ((tmp_path / 'other/train/synth08_000000.png').read_bytes()
          != (tmp_path / 'segnet_a/train/synth07_000000.png').read_bytes())


def test_kaggle_and_segnet_labels_describe_the_same_scene(tmp_path):
  synthetic.generate(str(tmp_path / 'k'), 'kaggle', 2, (80, 60), seed=3)
  synthetic.generate(str(tmp_path / 's'), 'segnet', 2, (80, 60), seed=3)
  kaggle_to_segnet = {'Column_Pole': 'Pole', 'Sidewalk': 'Pavement', 'Void': 'Unlabelled',
                      'LaneMkgsDriv': 'Road', 'Wall': 'Building'}
  colours = _kaggle_colours(synthetic.KAGGLE_CLASS_DICT)
  for name in ('synth03_000000', 'synth03_000003'):
    split = 'train' if name.endswith('0') else 'val'
    assert ((tmp_path / 'k' / split / f'{name}.png').read_bytes()
            == (tmp_path / 's' / split / f'{name}.png').read_bytes())
    _, rgb = _load(tmp_path / 'k' / f'{split}_labels' / f'{name}_L.png')
    _, index = _load(tmp_path / 's' / f'{split}annot' / f'{name}.png')
    for colour in np.unique(rgb.reshape(-1, 3), axis=0):
      kaggle = colours[tuple(colour)]
      at = (rgb == colour).all(axis=-1)
      assert (index[at] == SEGNET_NAMES.index(kaggle_to_segnet.get(kaggle, kaggle))).all()


@pytest.mark.parametrize('size', [(8, 8), (64, 48), (50, 90), (480, 360)])
def test_render_scene_sizes(size):
  width, height = size
  image, label = synthetic.render_scene(np.random.default_rng(0), width, height)
  assert image.shape == (height, width, 3) and image.dtype == np.uint8
  assert label.shape == (height, width) and label.dtype == np.uint8
  assert label.max() <= 11


def test_scenes_are_rich_and_not_a_colour_lookup():
  seen = np.zeros(12, dtype=np.int64)
  road_means = []
  for k in range(20):
    image, label = synthetic.render_scene(np.random.default_rng([0, k]), 480, 360)
    seen += np.bincount(label.ravel(), minlength=12)
    road_means.append(image[label == 3].mean(axis=0))
  missing = [SEGNET_NAMES[i] for i in range(12) if seen[i] == 0]
  assert not missing, f'classes never drawn in 20 frames: {missing}'
  share = seen / seen.sum()
  assert share[3] > 0.2 and share[0] > 0.05 and share[1] > 0.1  # road, sky, buildings dominate
  assert share[11] < 0.1  # some void, not much
  # Lighting and jitter move each class's colour from frame to frame.
  assert np.ptp(np.array(road_means), axis=0).max() > 20


@pytest.mark.parametrize('kwargs, message', [
    (dict(layout='png'), 'layout "png"'),
    (dict(size=(4, 48)), 'at least 8'),
    (dict(num=-1), 'integer >= 0'),
    (dict(num={'tr/ain': 1}), 'split name'),
    (dict(seed=-3), 'seed'),
])
def test_generate_rejects_bad_arguments(tmp_path, kwargs, message):
  args = dict(output_dir=str(tmp_path), layout='segnet', num=1, size=(16, 16)) | kwargs
  with pytest.raises(ValueError, match=message):
    synthetic.generate(**args)


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(REPO)] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))
  return subprocess.run([sys.executable, '-m', 'tfrecords_builder.synthetic', *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=60)


def test_cli_writes_frames_and_one_summary_line(tmp_path):
  proc = _cli('--output_dir', str(tmp_path), '--layout', 'segnet', '--num', 'train=3,val=1',
              '--size', '24x32', '--seed', '5')
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip().splitlines() == [
      f'Wrote train=3, val=1 segnet frames of 24x32 (HxW) to {tmp_path}']
  assert len(list((tmp_path / 'trainannot').iterdir())) == 3
  assert sorted(p.name for p in (tmp_path / 'val').iterdir()) == ['synth05_000003.png']
  with Image.open(tmp_path / 'val' / 'synth05_000003.png') as im:
    assert im.size == (32, 24)  # --size is HxW, PIL's size (width, height).


@pytest.mark.parametrize('args, message', [
    (['--size', '360by480'], '--size 360by480: expected HxW, e.g. 360x480'),
    (['--size', '4x48'], '--size 4x48: height and width must be at least 8'),
    (['--layout', 'voc'], 'layout'),
    (['--num', 'train=x'], '--num train=x: expected a count'),
    (['--splits', 'a/b'], '--splits a/b: split names'),
    (['--seed', '-1'], '--seed'),
    (['--bogus', '1'], 'bogus'),
    (['stray'], 'unexpected arguments: stray'),
])
def test_cli_bad_input_is_one_line_without_traceback(tmp_path, args, message):
  proc = _cli('--output_dir', str(tmp_path / 'out'), '--num', '1', *args)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith('error: ') and message in lines[0], lines[0]
  assert 'Traceback' not in proc.stderr


def test_cli_unwritable_output_dir_names_the_path(tmp_path):
  (tmp_path / 'file').write_text('not a folder')
  out = tmp_path / 'file' / 'out'
  proc = _cli('--output_dir', str(out), '--num', '1', '--size', '8x8')
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr
  assert proc.stderr.strip().splitlines() == [f'error: {out}: Not a directory']
