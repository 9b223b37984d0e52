"""Shared pytest fixtures: repo paths, the real CamVid frames when present, quiet TensorFlow."""

import os
import pathlib
import sys

import pytest

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

REPO = pathlib.Path(__file__).resolve().parents[1]
# The repo is cloned next to shared/ (developers' machines and CI alike).
SHARED_DATA = REPO.parent / 'shared' / 'data'
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))


@pytest.fixture(scope='session')
def segnet_real_dir():
  path = SHARED_DATA / 'camvid-segnet'
  if not (path / 'train').is_dir():
    pytest.skip(f'real CamVid frames not found at {path} (shared/ not present)')
  return path


@pytest.fixture(scope='session')
def kaggle_class_dict():
  path = SHARED_DATA / 'camvid-kaggle' / 'class_dict.csv'
  if not path.is_file():
    pytest.skip(f'real Kaggle class_dict.csv not found at {path} (shared/ not present)')
  return path


@pytest.fixture(scope='session')
def smoke_data(tmp_path_factory):
  """Generated SegNet-layout scenes built into TFRecords: 24 train / 6 val frames of 64x48."""
  from tfrecords_builder import synthetic, writer  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('smoke_data')
  synthetic.generate(str(root / 'raw'), 'segnet', {'train': 24, 'val': 6}, (64, 48), seed=5)
  writer.build(str(root / 'raw'), str(root / 'tfrecords'), num_shards={'train': 3, 'val': 2},
               num_workers=1, log=lambda *_: None)
  return root / 'tfrecords'


def run_module(module, *args, timeout=600, **kwargs):
  """Runs `python -m module args` from the repo root; returns the CompletedProcess."""
  import subprocess  # pylint: disable=g-import-not-at-top
  return subprocess.run([sys.executable, '-m', module, *map(str, args)], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout, **kwargs)


def event_tags(log_dir) -> set[str]:
  """Every summary tag in the TensorBoard event files of one run dir (local or gs://)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tags = set()
  for path in tf.io.gfile.glob(f'{log_dir}/events.out.tfevents.*'):
    for event in tf.compat.v1.train.summary_iterator(path):
      tags.update(v.tag for v in event.summary.value)
  return tags
