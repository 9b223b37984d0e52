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
