"""Distribution tests on CPU: MirroredStrategy over 2 logical devices, MultiWorkerMirroredStrategy
with 2 real worker processes on 127.0.0.1, equivalence with one device, TF_CONFIG handling,
worker failure and resume, mixed_bfloat16."""

import csv
import json
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from camvid_common import errors
from conftest import REPO, run_module
from trainer import distribution

SMOKE = ('--config', 'smoke')


def _free_ports(n):
  sockets = [socket.socket() for _ in range(n)]
  for s in sockets:
    s.bind(('127.0.0.1', 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


def _worker_env(ports, index):
  env = dict(os.environ)
  env['TF_CONFIG'] = json.dumps({'cluster': {'worker': [f'127.0.0.1:{p}' for p in ports]},
                                 'task': {'type': 'worker', 'index': index}})
  # gRPC honours proxy variables; worker-to-worker traffic must never go to a proxy.
  env['NO_PROXY'] = env['no_proxy'] = '127.0.0.1,localhost'
  return env


def _start_workers(args, n=2, cwd=REPO):
  ports = _free_ports(n)
  return [subprocess.Popen([sys.executable, *map(str, args)], cwd=cwd, env=_worker_env(ports, i),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for i in range(n)]


def _finish(procs, timeout=420):
  outs = []
  for proc in procs:
    try:
      out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      raise
    outs.append((proc.returncode, out, err))
  return outs


def _history_epochs(model_dir):
  with open(model_dir / 'history.csv') as f:
    return [row['epoch'] for row in csv.DictReader(f)]


def _checksum(stdout):
  return next(line.split()[-1] for line in stdout.splitlines() if 'weights checksum' in line)


@pytest.mark.multiprocess
def test_multi_worker_end_to_end(smoke_data, tmp_path):
  model_dir = tmp_path / 'model'
  # With the weights' moving average on: each worker swaps it in and out for validation.
  hparams = tmp_path / 'hp.json'
  hparams.write_text(json.dumps({'ema_momentum': 0.9}))
  procs = _start_workers(['-m', 'trainer.task', *SMOKE, '--data_dir', smoke_data, '--model_dir',
                          model_dir, '--hparams_file', hparams])
  (rc0, out0, err0), (rc1, out1, err1) = _finish(procs)
  assert rc0 == 0, err0[-3000:]
  assert rc1 == 0, err1[-3000:]
  assert 'strategy=multi_worker replicas=2 workers=2' in out0
  assert _checksum(out0) == _checksum(out1)  # Synchronous training: identical weights.
  # Only the chief evaluated and exported; the other worker's checkpoint copies are gone.
  assert 'exported to' in out0 and 'exported to' not in out1
  assert (model_dir / 'export' / 'serving' / 'saved_model.pb').exists()
  assert not list(model_dir.rglob('.worker-*'))
  assert len(list((model_dir / 'logs' / 'train').glob('events.*'))) == 1
  config = json.loads((model_dir / 'config.json').read_text())
  assert config['strategy_used'] == 'multi_worker' and config['num_workers'] == 2
  assert _history_epochs(model_dir) == ['0', '1']
  # With synchronized BatchNorm the chief's final evaluation (of best/, the averaged weights)
  # reproduces the distributed one.
  metrics = json.loads((model_dir / 'metrics.json').read_text())
  best_line = next(l for l in out0.splitlines() if l.startswith('best checkpoint'))
  assert f'val mIoU {metrics["mean_iou"]:.4f}' in best_line
  assert f'val mIoU {metrics["mean_iou"]:.4f}' in out0.split('best checkpoint')[0]


@pytest.mark.multiprocess
def test_multi_worker_matches_one_device(tmp_path):
  """A few steps with global batch 4 on 2 workers give one device's weights on the same batches."""
  script = REPO / 'tests' / 'equivalence_worker.py'
  single = run_module('tests.equivalence_worker', '--mode', 'single', '--out',
                      tmp_path / 'single.npz')
  assert single.returncode == 0, single.stderr[-3000:]
  results = _finish(_start_workers([script, '--mode', 'multi', '--out', tmp_path / 'multi.npz']))
  for rc, _, err in results:
    assert rc == 0, err[-3000:]
  assert 'replicas 2' in results[0][1] and 'fused_bn 0' in results[0][1]
  assert re.search(r'fused_bn [1-9]', single.stdout)  # One replica trains with the fused kernel.
  a, b = np.load(tmp_path / 'single.npz'), np.load(tmp_path / 'multi.npz')
  assert len(a.files) == len(b.files) > 20
  moved = 0
  for key in a.files:
    np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=2e-5, err_msg=key)
  initial = run_module('tests.equivalence_worker', '--mode', 'single', '--steps', '0', '--out',
                       tmp_path / 'init.npz')
  assert initial.returncode == 0, initial.stderr[-3000:]
  c = np.load(tmp_path / 'init.npz')
  moved = sum(not np.allclose(a[k], c[k]) for k in a.files)
  assert moved > 10  # The steps really trained: the comparison is not of untouched weights.


@pytest.mark.multiprocess
def test_kill_a_worker_then_rerun_finishes_once(smoke_data, tmp_path):
  model_dir = tmp_path / 'model'
  hparams = tmp_path / 'hp.json'
  hparams.write_text(json.dumps({'peer_timeout_seconds': 20}))
  args = ['-m', 'trainer.task', *SMOKE, '--data_dir', smoke_data, '--model_dir', model_dir,
          '--epochs', '3', '--hparams_file', hparams]
  procs = _start_workers(args)
  deadline = time.time() + 300
  # 8 steps/epoch (2 workers, 3 shards: the larger share is 16 examples, 2 per worker-batch).
  while time.time() < deadline and not (model_dir / 'checkpoints' / 'ckpt-12.index').exists():
    assert all(p.poll() is None for p in procs), 'a worker ended before it could be killed'
    time.sleep(0.05)
  procs[1].kill()
  started = time.time()
  rc0, _, err0 = _finish(procs[:1], timeout=180)[0]
  procs[1].communicate()
  assert rc0 != 0, 'the surviving worker should fail, not hang'
  assert time.time() - started < 150
  assert _history_epochs(model_dir) == ['0']
  results = _finish(_start_workers(args))
  for rc, out, err in results:
    assert rc == 0, err[-3000:]
    assert 'resumed from' in out and 'epoch 1/3' not in out
  assert _history_epochs(model_dir) == ['0', '1', '2']
  assert tf.train.latest_checkpoint(str(model_dir / 'checkpoints')).endswith('ckpt-24')


@pytest.mark.multiprocess
def test_unreachable_peer_fails_within_the_timeout(smoke_data, tmp_path):
  hparams = tmp_path / 'hp.json'
  hparams.write_text(json.dumps({'peer_timeout_seconds': 8}))
  ports = _free_ports(2)
  started = time.time()
  proc = subprocess.run(
      [sys.executable, '-m', 'trainer.task', *SMOKE, '--data_dir', str(smoke_data),
       '--model_dir', str(tmp_path / 'model'), '--hparams_file', str(hparams)],
      cwd=REPO, env=_worker_env(ports, 0), capture_output=True, text=True, timeout=120)
  assert proc.returncode == -9, proc.stderr[-3000:]  # Killed by its watchdog, not hung.
  assert 'could not form the cluster' in proc.stderr and f'127.0.0.1:{ports[1]}' in proc.stderr
  assert time.time() - started < 60


@pytest.mark.multiprocess
def test_mirrored_on_two_logical_cpus_and_bfloat16(smoke_data, tmp_path):
  model_dir = tmp_path / 'model'
  hparams = tmp_path / 'hp.json'
  hparams.write_text(json.dumps({'ema_momentum': 0.9}))
  proc = run_module('trainer.task', *SMOKE, '--data_dir', smoke_data, '--model_dir', model_dir,
                    '--logical_cpu_devices', '2', '--strategy', 'mirrored',
                    '--mixed_precision', 'mixed_bfloat16', '--hparams_file', hparams)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'strategy=mirrored replicas=2' in proc.stdout
  assert 'per replica 2' in proc.stdout
  config = json.loads((model_dir / 'config.json').read_text())
  assert config['resolved_precision'] == 'mixed_bfloat16' and config['num_replicas'] == 2
  assert config['optimizer']['ema_momentum'] == 0.9
  metrics = json.loads((model_dir / 'metrics.json').read_text())
  assert metrics['num_examples'] == 6


def test_jit_compile_is_refused_under_a_distributed_strategy(smoke_data, tmp_path):
  """XLA under MirroredStrategy fails at the first step (variables on another replica's device)."""
  hparams = tmp_path / 'hp.json'
  hparams.write_text(json.dumps({'jit_compile': True}))
  model_dir = tmp_path / 'model'
  proc = run_module('trainer.task', *SMOKE, '--data_dir', smoke_data, '--model_dir', model_dir,
                    '--logical_cpu_devices', '2', '--strategy', 'mirrored',
                    '--hparams_file', hparams)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert ('error: jit_compile: XLA cannot compile the step under the mirrored strategy'
          in proc.stderr), proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr and not model_dir.exists()


def test_tf_config_from_an_indexed_job():
  env = {'JOB_COMPLETION_INDEX': '2', 'CAMVID_NUM_WORKERS': '3', 'CAMVID_JOB_NAME': 'train',
         'CAMVID_SERVICE_NAME': 'camvid-workers'}
  spec = distribution.tf_config_from_env(env)
  assert spec == {'cluster': {'worker': ['train-0.camvid-workers:2222',
                                         'train-1.camvid-workers:2222',
                                         'train-2.camvid-workers:2222']},
                  'task': {'type': 'worker', 'index': 2}}
  assert distribution.tf_config_from_env({**env, 'CAMVID_WORKER_PORT': '5000'})[
      'cluster']['worker'][0] == 'train-0.camvid-workers:5000'
  # An explicit TF_CONFIG wins; one worker (or no index) means no cluster.
  explicit = {'cluster': {'worker': ['a:1']}, 'task': {'type': 'worker', 'index': 0}}
  assert distribution.tf_config_from_env({**env, 'TF_CONFIG': json.dumps(explicit)}) == explicit
  assert distribution.tf_config_from_env({**env, 'CAMVID_NUM_WORKERS': '1'}) is None
  assert distribution.tf_config_from_env({}) is None
  with pytest.raises(errors.ConfigError, match='CAMVID_SERVICE_NAME'):
    distribution.tf_config_from_env({k: v for k, v in env.items() if k != 'CAMVID_SERVICE_NAME'})
  with pytest.raises(errors.ConfigError, match='index 3 is out of range'):
    distribution.tf_config_from_env({**env, 'JOB_COMPLETION_INDEX': '3'})


@pytest.mark.parametrize('tf_config, message', [
    ('{not json', 'not valid JSON'),
    ('{"task": {"type": "worker", "index": 0}}', 'needs a "cluster"'),
    ('{"cluster": {"ps": ["a:1"]}, "task": {"type": "ps", "index": 0}}',
     'neither "chief" nor "worker"'),
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 2}}',
     'index 2 is out of range'),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}',
     "task type 'chief' is not in the cluster"),
    ('{"cluster": {"worker": ["a"]}, "task": {"type": "worker", "index": 0}}', 'host:port'),
])
def test_bad_tf_config_is_a_clear_error(tf_config, message):
  with pytest.raises(errors.ConfigError, match=message):
    distribution.tf_config_from_env({'TF_CONFIG': tf_config})


def test_bad_tf_config_on_the_command_line(smoke_data, tmp_path):
  proc = run_module('trainer.task', *SMOKE, '--data_dir', smoke_data, '--model_dir',
                    tmp_path / 'model', env={**os.environ, 'TF_CONFIG': '{"cluster": 1'})
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith('error: TF_CONFIG: not valid JSON')
  assert 'Traceback' not in proc.stderr
