"""camvid_common/quiet.py: entry points start without TensorFlow's C++ log; --verbose shows it.

The entry points run in subprocesses with the user's environment minus the TF_CPP_MIN_LOG_LEVEL
that conftest.py sets, so each one's own default is what is tested.
"""

import concurrent.futures
import os
import subprocess
import sys
import textwrap

import pytest

from camvid_common import quiet
from conftest import REPO

# Every command-line entry point (setup.py's console scripts run the same modules' run()).
ENTRY_POINTS = (
    '-m trainer.task', '-m trainer.evaluate', '-m trainer.predict', '-m tuning.tune',
    '-m tfrecords_builder', '-m tfrecords_builder.folds', '-m tfrecords_builder.synthetic',
    'benchmarks/bench_builder.py', 'benchmarks/bench_gpu.py', 'benchmarks/bench_pipeline.py',
    'benchmarks/bench_step_cost.py', 'benchmarks/bench_trainer.py', 'scripts/cross_drive.py',
    'scripts/gcs_emulator.py')
# What TensorFlow's C++ side prints while it loads and starts its devices (see quiet.py).
NOISE = ('absl::InitializeLog', 'oneDNN', 'cuda', 'cuInit', 'I0000', 'W0000', 'E0000')


def _run(entry_point: str, *args: str, **env) -> subprocess.CompletedProcess:
  clean = {k: v for k, v in os.environ.items() if k != 'TF_CPP_MIN_LOG_LEVEL'}
  return subprocess.run([sys.executable, *entry_point.split(), *args], cwd=REPO,
                        env={**clean, **env}, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope='module')
def helps() -> dict[str, subprocess.CompletedProcess]:
  """`--help` of every entry point, a few at a time (most spend seconds importing TensorFlow)."""
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    return dict(zip(ENTRY_POINTS, pool.map(lambda e: _run(e, '--help'), ENTRY_POINTS)))


@pytest.mark.slow
@pytest.mark.parametrize('entry_point', ENTRY_POINTS)
def test_help_prints_usage_with_verbose_and_no_tensorflow_log(helps, entry_point):
  proc = helps[entry_point]
  assert '--verbose' in proc.stdout or '--[no]verbose' in proc.stdout, proc.stdout
  assert not [marker for marker in NOISE if marker in proc.stderr], proc.stderr


@pytest.mark.slow
def test_verbose_shows_the_cpp_start_up_log(helps):
  """On every machine: trainer turns oneDNN on, and TensorFlow then logs it at load time."""
  proc = _run('-m trainer.task', '--help', '--verbose')
  assert 'oneDNN custom operations are on' in proc.stderr, proc.stderr
  assert 'absl::InitializeLog' in proc.stderr
  assert 'oneDNN' not in helps['-m trainer.task'].stderr


@pytest.mark.parametrize('argv, expected', [
    ([], False), (['--verbose'], True), (['-verbose'], True), (['--verbose=True'], True),
    (['--verbose=1'], True), (['--verbose=f'], False), (['--verbose', '--noverbose'], False),
    (['--noverbose', '--verbose'], True), (['--', '--verbose'], False),
    (['--verbose_x'], False), (['verbose'], False), (['--verbose=maybe'], False)])
def test_verbose_requested_reads_the_flag_as_absl_does(argv, expected):
  assert quiet.verbose_requested(argv) is expected


# A stand-in TensorFlow package: C++-style writes to file descriptor 2 on load and on the first
# device lookup only (as CUDA's start), a Python warning; FAKE_TF_FAIL fails, FAKE_TF_ABORT aborts.
_FAKE_TENSORFLOW = '''
import logging, os, sys, types, warnings
os.write(2, b'I0000 load-time line\\n')
logging.getLogger('tensorflow').addHandler(logging.StreamHandler(sys.stderr))  # As TF's does.
warnings.warn('a python warning')
if os.environ.get('FAKE_TF_FAIL'):
  raise ImportError('libfake.so: cannot open shared object file')
if os.environ.get('FAKE_TF_ABORT'):
  os.abort()
_started = []
def _list_physical_devices():
  if not _started:
    _started.append(True)
    os.write(2, b'E0000 failed call to cuInit\\n')
config = types.SimpleNamespace(list_physical_devices=_list_physical_devices)
'''
_PROGRAM = textwrap.dedent('''
    import logging, os, sys
    from camvid_common import quiet
    quiet.start()
    import tensorflow
    tensorflow.config.list_physical_devices()
    os.write(2, b'after the load\\n')
    logging.getLogger('tensorflow').warning('a python log line after the load')
    print('stderr is', 'restored' if sys.stderr is sys.__stderr__ else 'replaced')
''')

def _run_with_fake_tensorflow(tmp_path, args=(), **env) -> subprocess.CompletedProcess:
  """Runs _PROGRAM with a stand-in `tensorflow` package first on the path."""
  (tmp_path / 'tensorflow').mkdir()
  (tmp_path / 'tensorflow' / '__init__.py').write_text(_FAKE_TENSORFLOW)
  return subprocess.run([sys.executable, '-c', _PROGRAM, *args], cwd=tmp_path,
                        env={**os.environ, 'PYTHONPATH': f'{tmp_path}{os.pathsep}{REPO}', **env},
                        capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize('args, env, shown, hidden', [
    ((), {}, ['a python warning', 'after the load', 'a python log line after the load'],
     ['I0000', 'E0000', 'Logging error']),
    (('--verbose',), {}, ['I0000 load-time', 'E0000 failed', 'a python warning'], []),
    ((), {'TF_CPP_MIN_LOG_LEVEL': '0'}, ['I0000 load-time', 'E0000 failed'], []),
    ((), {'TF_CPP_MIN_LOG_LEVEL': '3'}, ['a python warning'], ['I0000', 'E0000']),
])
def test_start_hides_only_what_cpp_writes_while_tensorflow_starts(tmp_path, args, env, shown,
                                                                  hidden):
  proc = _run_with_fake_tensorflow(tmp_path, args, **env)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout == 'stderr is restored\n'
  assert all(text in proc.stderr for text in shown), proc.stderr
  assert not [text for text in hidden if text in proc.stderr], proc.stderr


def test_a_failed_import_prints_what_was_captured(tmp_path):
  proc = _run_with_fake_tensorflow(tmp_path, FAKE_TF_FAIL='1')
  assert proc.returncode == 1
  assert proc.stderr.index('I0000 load-time line') < proc.stderr.index('ImportError: libfake.so')
  assert 'after the load' not in proc.stderr


def test_an_abort_while_loading_still_says_where(tmp_path):
  """The C++ message is lost with the process, but Python's fatal-error traceback shows."""
  proc = _run_with_fake_tensorflow(tmp_path, FAKE_TF_ABORT='1')
  assert proc.returncode < 0
  assert 'Fatal Python error: Aborted' in proc.stderr, proc.stderr
  assert 'tensorflow/__init__.py' in proc.stderr


def test_two_absl_entry_modules_share_one_verbose_flag():
  """Importing two absl entry modules into one process (as tests do) defines --verbose once and
  keeps it in each one's --help."""
  code = textwrap.dedent('''
      import tfrecords_builder.__main__, trainer.task
      from absl import flags
      print(all(any(f.name == 'verbose' for f in flags.FLAGS.get_key_flags_for_module(m))
                for m in ('tfrecords_builder.__main__', 'trainer.task')))
  ''')
  proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == 'True'
