"""The benchmarks' CPU paths run and end with their RESULT line (their numbers are not checked)."""

import re
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_bench_gpu_runs_the_same_code_on_cpu_and_prints_its_result():
  proc = subprocess.run([sys.executable, 'benchmarks/bench_gpu.py', '--device', 'cpu',
                         '--steps', '3', '--presets', 'gpu'], cwd=REPO, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  assert lines[0].startswith('device: 1 x CPU; precision (auto): float32')
  assert any(re.match(r'gpu +XLA off +[\d.]+ images/s per device', l) for l in lines), lines
  assert any('training FLOPs per 32x48 image' in l for l in lines), lines
  assert re.fullmatch(r'RESULT gpu_images_per_s=\d+\.\d+', lines[-1]), lines[-1]
  proc = subprocess.run([sys.executable, 'benchmarks/bench_gpu.py', '--device', 'gpu'],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and 'error: --device gpu: TensorFlow sees no GPU' in proc.stderr
