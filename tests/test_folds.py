"""tfrecords_builder.folds (leave-one-drive-out data dirs) and scripts/cross_drive.py."""

import json
import pathlib
import re
import statistics
import subprocess
import sys

import pytest
import tensorflow as tf

from conftest import REPO, run_module
from tfrecords_builder import features
from tfrecords_builder import folds
from tfrecords_builder import manifest as manifest_lib
from tfrecords_builder import synthetic
from trainer import history as history_lib

# Drive-prefixed frame names per split, CamVid style. 0006R0 has a frame in val too, so a fold's
# val must gather its drive from both splits; the test split's 0001TP frames must stay unused.
SCENE = {
    'train': ['0001TP_006690', '0001TP_006720', '0006R0_f02040', '0006R0_f02070',
              '0006R0_f02100', '0016E5_01470', '0016E5_01500'],
    'val': ['0016E5_07959', '0016E5_07961', '0016E5_07963', '0006R0_f03000'],
    'test': ['0001TP_008550', '0001TP_008580'],
}
EXPECTED = {  # holdout drive -> {split: {drive: frames}}
    '0006R0': {'train': {'0001TP': 2, '0016E5': 5}, 'val': {'0006R0': 4}},
    '0001TP': {'train': {'0006R0': 4, '0016E5': 5}, 'val': {'0001TP': 2}},
}


def make_scene(root: pathlib.Path) -> pathlib.Path:
  """Generated SegNet-layout frames (named synthNN_k) renamed to SCENE's drive-prefixed names."""
  raw = root / 'camvid'
  written = synthetic.generate(str(raw), 'segnet', {s: len(n) for s, n in SCENE.items()},
                               (64, 48), seed=3)
  for split, names in SCENE.items():
    for old, new in zip(written[split], names):
      for folder in (split, f'{split}annot'):
        (raw / folder / f'{old}.png').rename(raw / folder / f'{new}.png')
  return raw


def source_ids(data_dir: pathlib.Path, split: str) -> list[str]:
  manifest = manifest_lib.read(str(data_dir)).raw
  paths = [str(data_dir / s) for s in manifest['splits'][split]['shards']]
  return sorted(features.parse_example(r)['source_id'].numpy().decode()
                for r in tf.data.TFRecordDataset(paths))


@pytest.fixture(scope='module')
def built_folds(tmp_path_factory):
  root = tmp_path_factory.mktemp('folds')
  raw = make_scene(root)
  proc = run_module('tfrecords_builder.folds', '--input_dir', raw, '--output_dir',
                    root / 'folds', '--num_workers', '1')
  assert proc.returncode == 0, proc.stderr[-3000:]
  return raw, root / 'folds', proc.stdout


def test_folds_hold_out_one_drive_each(built_folds):
  _, out, stdout = built_folds
  assert sorted(p.name for p in out.iterdir()) == ['holdout-0001TP', 'holdout-0006R0']
  for drive, splits in EXPECTED.items():
    fold = out / f'holdout-{drive}'
    manifest = manifest_lib.read(str(fold)).raw
    assert set(manifest['splits']) == {'train', 'val'}  # No test split.
    for split, counts in splits.items():
      assert manifest['splits'][split]['num_examples'] == sum(counts.values())
      ids = source_ids(fold, split)
      assert {d: sum(folds.drive_of(i) == d for i in ids) for d in counts} == counts
      assert {folds.drive_of(i) for i in ids} == set(counts)
    val, train = source_ids(fold, 'val'), source_ids(fold, 'train')
    assert all(i.startswith(drive + '_') for i in val)
    assert not any(i.startswith(drive + '_') for i in train)
    every = set(SCENE['train']) | set(SCENE['val'])
    assert set(val) | set(train) == every and not set(val) & set(train)
    assert not set(SCENE['test']) & (set(val) | set(train))
    line = next(l for l in stdout.splitlines() if l.startswith(f'holdout-{drive}:'))
    for split, counts in splits.items():
      for d, n in counts.items():
        assert f'{d}={n}' in line.split(f'{split} ')[1].split(';')[0], line


def test_folds_rerun_is_a_no_op(built_folds):
  raw, out, _ = built_folds
  before = {p: p.stat().st_mtime_ns for p in out.rglob('*')}
  proc = run_module('tfrecords_builder.folds', '--input_dir', raw, '--output_dir', out,
                    '--num_workers', '1')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count('nothing to do') == 2
  assert {p: p.stat().st_mtime_ns for p in out.rglob('*')} == before


def test_folds_bad_holdout_is_one_line_exit_2(built_folds, tmp_path):
  raw, _, _ = built_folds
  proc = run_module('tfrecords_builder.folds', '--input_dir', raw, '--output_dir', tmp_path / 'o',
                    '--holdout', '0006R0,0099XX')
  assert proc.returncode == 2
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error') or 'Traceback' in l]
  assert errors == ['error: --holdout 0099XX: no such drive in the train/val frames (drives: '
                    '0001TP, 0006R0, 0016E5)'], proc.stderr
  assert not (tmp_path / 'o').exists()


def test_folds_errors(tmp_path):
  raw = tmp_path / 'one'  # One drive: holding it out would leave train empty.
  synthetic.generate(str(raw), 'segnet', {'train': 2}, (16, 16), seed=3)
  for split in ('train', 'trainannot'):
    for i, p in enumerate(sorted((raw / split).iterdir())):
      p.rename(raw / split / f'0006R0_{i}.png')
  with pytest.raises(folds.errors.InputError, match=r'0006R0: the only drive'):
    folds.build_folds(str(raw), str(tmp_path / 'o'), '0006R0', log=lambda _: None)
  with pytest.raises(folds.errors.InputError, match=r'--holdout: name at least one drive'):
    folds.build_folds(str(raw), str(tmp_path / 'o'), ' , ', log=lambda _: None)
  for split in ('train', 'trainannot'):  # A frame name without a drive prefix.
    (raw / split / '0006R0_0.png').rename(raw / split / 'frame0.png')
  with pytest.raises(folds.errors.InputError, match=r'frame0.png: frame name "frame0" has no '
                     'drive prefix'):
    folds.build_folds(str(raw), str(tmp_path / 'o'), '0006R0', log=lambda _: None)
  assert not (tmp_path / 'o').exists()


def run_cross_drive(*args):
  return subprocess.run([sys.executable, str(REPO / 'scripts' / 'cross_drive.py'),
                         *map(str, args)], cwd=REPO, capture_output=True, text=True,
                        timeout=900, check=False)


def test_cross_drive_errors(built_folds, tmp_path):
  _, out, _ = built_folds
  for args, message in [
      (('--config', 'nope', '--folds', out), '--config nope: no such preset'),
      (('--config', 'smoke', '--folds', tmp_path), f'--folds {tmp_path}: no holdout-'),
      (('--config', 'smoke', '--folds', out, '--seeds', 'x'), '--seeds x: expected integers'),
      (('--config', 'smoke', '--folds', out, '--', '--seed', '3'), '--seed after --'),
  ]:
    proc = run_cross_drive(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f'error: {message}'), proc.stderr


@pytest.mark.slow
def test_cross_drive_end_to_end(built_folds, tmp_path):
  _, out, _ = built_folds
  runs = tmp_path / 'runs'
  proc = run_cross_drive('--config', 'smoke', '--folds', out, '--output_dir', runs,
                         '--', '--epochs', '2', '--params_override=data.hflip=false')
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  for drive in EXPECTED:  # The held-out drive never chooses the weights; extra flags still apply.
    run = runs / f'holdout-{drive}-seed42'
    config = json.loads((run / 'config.json').read_text())
    assert config['eval']['every_epochs'] == 0 and config['data']['hflip'] is False
    history = history_lib.read(str(run / history_lib.HISTORY_NAME))
    assert [bool(row['val_mean_iou']) for row in history] == [False, True]
  lines = proc.stdout.strip().splitlines()
  header = next(l for l in lines if l.startswith('fold'))
  for column in ('seed', 'mIoU', 'pix_acc', 'Pole', 'SignSymbol', 'Pedestrian', 'Bicyclist',
                 'Fence', 'minutes'):
    assert column in header
  rows = [l.split() for l in lines if l.split()[0] in EXPECTED]
  assert sorted(r[0] for r in rows) == sorted(EXPECTED) and all(r[1] == '42' for r in rows)
  ious = [json.loads((runs / f'holdout-{d}-seed42' / 'metrics.json').read_text())['mean_iou']
          for d in EXPECTED]
  assert (runs / 'holdout-0006R0-seed42.log').stat().st_size > 0
  match = re.fullmatch(r'RESULT cross_drive_miou=([0-9.eE+-]+)', lines[-1])
  assert match, lines[-1]
  assert float(match.group(1)) == pytest.approx(statistics.fmean(ious), abs=1e-6)

  # A rerun trains nothing and prints the same result.
  again = run_cross_drive('--config', 'smoke', '--folds', out, '--output_dir', runs,
                          '--', '--epochs', '2', '--params_override=data.hflip=false')
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count('already trained') == 2 and 'training' not in again.stdout
  assert again.stdout.strip().splitlines()[-1] == lines[-1]
