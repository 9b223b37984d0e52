"""Shared pytest fixtures: repo paths, the real CamVid frames when present, quiet TensorFlow, and
the generated data set and trained smoke run that several test files share."""

import dataclasses
import json
import os
import pathlib
import shutil
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


@pytest.fixture(scope='session')
def darkened_data(smoke_data, tmp_path_factory):
  """smoke_data's scenes with pixel values made multiples of 5 (x // 5 * 5), and the same scenes
  darkened to 0.6 x + 13: a global brightness and contrast change, exact in uint8. Each is built
  into TFRecords as smoke_data is; returns the two TFRecords dirs (original, darkened), each
  beside the `raw` scene folder it was built from."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from tfrecords_builder import writer  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('darkened_data')
  out = []
  for name, change in (('original', lambda q: q * 5), ('darkened', lambda q: q * 3 + 13)):
    raw = pathlib.Path(shutil.copytree(smoke_data.parent / 'raw', root / name / 'raw'))
    for path in [*raw.glob('train/*.png'), *raw.glob('val/*.png')]:
      pixels = np.asarray(Image.open(path).convert('RGB')) // 5
      Image.fromarray(change(pixels).astype(np.uint8)).save(path)
    writer.build(str(raw), str(root / name / 'tfrecords'), num_shards={'train': 3, 'val': 2},
                 num_workers=1, log=lambda *_: None)
    out.append(root / name / 'tfrecords')
  return tuple(out)


# The shared smoke run's options: class weighting with its logit adjustment, a bias calibrated on
# train, and two test-time scales (0.6 x 32 = 19 pixels is padded to the model's multiple of 4),
# so one run has every post-training step that the export and trainer.evaluate must reproduce.
SMOKE_RUN_HPARAMS = {'class_weighting': 'inverse_sqrt', 'logit_adjustment': 0.5,
                     'calibration_split': 'train', 'eval_scales': [0.6, 1.0]}


@dataclasses.dataclass(frozen=True)
class TrainedRun:
  """A finished `python -m trainer.task` run. Read model_dir, never write to it (tests share it);
  a test that reruns or resumes training works on its own copy_to(tmp_path)."""
  model_dir: pathlib.Path
  args: tuple  # trainer.task's arguments except --model_dir: rerun with the same settings.
  stdout: str

  def copy_to(self, parent) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(self.model_dir, pathlib.Path(parent) / 'model'))


@pytest.fixture(scope='session')
def smoke_run(smoke_data, tmp_path_factory) -> TrainedRun:
  """One 2-epoch `--config smoke` run on smoke_data with SMOKE_RUN_HPARAMS, trained once per
  test session for every test that only reads a finished run."""
  root = tmp_path_factory.mktemp('smoke_run')
  hparams = root / 'hparams.json'
  hparams.write_text(json.dumps(SMOKE_RUN_HPARAMS))
  args = ('--config', 'smoke', '--data_dir', smoke_data, '--hparams_file', hparams)
  proc = run_module('trainer.task', *args, '--model_dir', root / 'model')
  assert proc.returncode == 0, proc.stderr[-3000:]
  return TrainedRun(root / 'model', args, proc.stdout)


@pytest.fixture(scope='session')
def smoke_run_evaluation(smoke_run, smoke_data, tmp_path_factory) -> dict:
  """`python -m trainer.evaluate` of smoke_run on smoke_data's val split with default flags: the
  report it writes."""
  report = tmp_path_factory.mktemp('smoke_run_evaluation') / 'eval.json'
  proc = run_module('trainer.evaluate', '--model_dir', smoke_run.model_dir, '--data_dir',
                    smoke_data, '--split', 'val', '--output', report)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(report.read_text())


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
