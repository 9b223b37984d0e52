"""Reruns that must end, not strand a Job: a finished run rerun per worker, a damaged backup, a
missing or truncated shard (issue #35)."""

import json
import os
import shutil
import time

import pytest

from conftest import run_module
from test_distributed import _finish, _free_ports, _start_workers, _worker_env

SMOKE = ('--config', 'smoke')


def _errors(stderr):
  return [line for line in stderr.splitlines() if line.startswith('error:')]


@pytest.mark.multiprocess
def test_finished_multi_worker_run_rerun_per_worker_ends_at_once(smoke_data, tmp_path):
  model_dir = tmp_path / 'model'
  args = ['-m', 'trainer.task', *SMOKE, '--data_dir', smoke_data, '--model_dir', model_dir,
          '--epochs', '1']
  for rc, _, err in _finish(_start_workers(args)):
    assert rc == 0, err[-3000:]
  metrics = json.loads((model_dir / 'metrics.json').read_text())
  ports = _free_ports(2)  # Nobody listens: a worker that tried to form the cluster would hang.
  for index in (1, 0):
    if index == 0:  # A chief that crashed part-way through post-training, before any of it.
      (model_dir / 'metrics.json').unlink()
      shutil.rmtree(model_dir / 'export')
    started = time.time()
    proc = run_module('trainer.task', *args[2:], env=_worker_env(ports, index), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.time() - started < 60
    assert 'training complete (epoch 1 of 1)' in proc.stdout and 'epoch 1/1' not in proc.stdout
    assert ('exported to' in proc.stdout) == (index == 0)
  assert json.loads((model_dir / 'metrics.json').read_text()) == metrics
  assert (model_dir / 'export' / 'labels.json').is_file()
  assert (model_dir / 'export' / 'serving' / 'saved_model.pb').is_file()


def test_damaged_backup_resumes_from_the_one_before(smoke_data, tmp_path):
  model_dir = tmp_path / 'model'
  args = (*SMOKE, '--data_dir', smoke_data, '--model_dir', model_dir, '--epochs', '1')
  proc = run_module('trainer.task', *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  ckpts = model_dir / 'checkpoints'
  # 6 steps, a backup every 4: ckpt-4 (mid-epoch) and ckpt-6 (the end).
  newest, older = ckpts / 'ckpt-6', ckpts / 'ckpt-4'
  data_file = ckpts / 'ckpt-6.data-00000-of-00001'
  os.truncate(data_file, data_file.stat().st_size // 2)
  proc = run_module('trainer.task', *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  warnings = [l for l in proc.stdout.splitlines() if l.startswith('warning: backup')]
  assert warnings == [f'warning: backup {newest} cannot be read (Read less bytes than '
                      f'requested); resuming from {older}'], proc.stdout
  assert f'resumed from {older}: epoch 0, step 4' in proc.stdout and 'epoch 1/1' in proc.stdout
  assert (ckpts / 'ckpt-6.index').is_file() and (model_dir / 'metrics.json').is_file()

  # No readable backup at all: one error line naming the dir, exit 2 (restarting cannot help).
  for path in ckpts.glob('ckpt-*.data-*'):
    os.truncate(path, 10)
  proc = run_module('trainer.task', *args)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr
  errors = _errors(proc.stderr)
  assert len(errors) == 1 and errors[0].startswith(f'error: {ckpts}: no backup can be read')


@pytest.mark.parametrize('damage', ['missing', 'truncated'])
def test_a_damaged_shard_is_one_error_line(smoke_data, tmp_path, damage):
  data_dir = tmp_path / 'data'
  shutil.copytree(smoke_data, data_dir)
  shard = data_dir / 'train-00001-of-00003.tfrecord'
  if damage == 'missing':
    shard.unlink()
  else:
    os.truncate(shard, shard.stat().st_size // 2)
  proc = run_module('trainer.task', *SMOKE, '--data_dir', data_dir, '--model_dir',
                    tmp_path / 'model', '--epochs', '1')
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  errors = _errors(proc.stderr)
  assert len(errors) == 1 and errors[0].startswith(f'error: {shard}: '), proc.stderr[-3000:]
  assert ('missing' if damage == 'missing' else 'truncated') in errors[0]


def test_an_undecodable_frame_is_an_input_error(smoke_data, tmp_path):
  """A record that reads but whose PNG does not decode: TF names no file, so the split and the
  verify command are."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from camvid_common.errors import InputError  # pylint: disable=g-import-not-at-top
  from tfrecords_builder import features, manifest as manifest_lib  # pylint: disable=g-import-not-at-top
  from trainer import configs, data  # pylint: disable=g-import-not-at-top
  data_dir = tmp_path / 'data'
  shutil.copytree(smoke_data, data_dir)
  shard = str(data_dir / 'val-00001-of-00002.tfrecord')
  records = [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(shard)]
  records[0].features.feature[features.IMAGE_ENCODED].bytes_list.value[0] = b'not a png'
  with tf.io.TFRecordWriter(shard) as writer:
    for record in records:
      writer.write(record.SerializeToString())
  manifest = manifest_lib.read(str(data_dir))
  with pytest.raises(InputError) as raised:
    with data.read_errors(manifest, ('val',), 'evaluating'):
      for _ in data.eval_dataset(manifest, 'val', configs.get_config('smoke')):
        pass
  message = str(raised.value)
  assert message.startswith(f'{data_dir}: a record of the val data does not parse or a frame '
                            'does not decode while evaluating ('), message
  assert message.endswith(f'python -m tfrecords_builder --verify --output_dir {data_dir}')
  assert '\n' not in message and 'Detected at node' not in message
