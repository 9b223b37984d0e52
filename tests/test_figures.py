"""scripts/make_figures.py: the overlays figure end to end on the smoke run, PNG size limits,
stopping TensorBoard, and (with Chromium) the TensorBoard screenshot."""

import importlib.util
import io
import json
import pathlib
import shutil
import socket
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from conftest import REPO
from tfrecords_builder import synthetic
from trainer import visualize

SCRIPT = REPO / 'scripts' / 'make_figures.py'


def _load_script():
  spec = importlib.util.spec_from_file_location('make_figures', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


figures = _load_script()


def run_figures(*args, timeout=600):
  return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)


def _resized(path, size):
  with Image.open(path) as image:
    return np.asarray(image.convert('RGB').resize(size, Image.Resampling.LANCZOS), np.float64)


def test_pick_frames_spreads_over_drives_and_time():
  frames = [pathlib.Path(f'{d}_{i:05d}.png') for d in ('0016E5', '0001TP') for i in range(100)]
  picked = [f.stem for f in figures.pick_frames(frames, 4)]
  assert picked == ['0001TP_00025', '0016E5_00025', '0001TP_00075', '0016E5_00075']


TILE_W, TILE_H = 320, 240  # 64x48 frames at the figure's tile width.


def _tiles(figure, names, bands):
  """Yields (name, frame tile, overlay tile) of each row of an overlays figure, as floats."""
  y = figures.PAD
  for name, band in zip(names, bands):
    y += band
    x = 2 * figures.PAD + TILE_W
    yield (name, figure[y:y + TILE_H, figures.PAD:figures.PAD + TILE_W].astype(np.float64),
           figure[y:y + TILE_H, x:x + TILE_W].astype(np.float64))
    y += TILE_H + figures.PAD


def _check_tiles(figure, frames_dir, names, picked, bands, colors):
  for name, left, right in _tiles(figure, picked, bands):
    # Left: the picked frame (the figure may be quantised: nearest of the frames, not equal).
    distances = {n: np.abs(left - _resized(frames_dir / f'{n}.png', (TILE_W, TILE_H))).mean()
                 for n in names}
    assert min(distances, key=distances.get) == name and distances[name] < 12, distances
    # Right: its overlay, frame and class colours blended half and half, so twice it minus the
    # frame is (mostly) a class colour: median L1 distance 13-16 here, 50-80 for a frame itself.
    mask = np.clip(2 * right - left, 0, 255).reshape(-1, 1, 3)
    nearest = np.abs(mask - colors[None].astype(np.float64)).sum(axis=2).min(axis=1)
    assert np.median(nearest) < 30, name


def test_overlays_end_to_end(smoke_run, tmp_path):
  frames_dir = tmp_path / 'raw' / 'val'
  names = synthetic.generate(str(tmp_path / 'raw'), 'segnet', {'val': 5}, (64, 48),
                             seed=9)['val']
  output = tmp_path / 'figure' / 'overlays.png'
  proc = run_figures('overlays', '--model_dir', smoke_run.model_dir, '--frames', frames_dir,
                     '--count', 3, '--output', output)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 0 < output.stat().st_size <= figures.MAX_BYTES

  labels = json.loads((smoke_run.model_dir / 'export' / 'labels.json').read_text())
  colors = np.array([c['color'] for c in labels['classes']], np.uint8)
  picked = [names[0], names[2], names[4]]  # 3 of 5, evenly spaced.
  width = 2 * TILE_W + 3 * figures.PAD
  bands = [visualize.text_band(width, [(0, n), (TILE_W, f'{n} predicted')]).shape[0]
           for n in picked]
  legend = visualize.legend_image([c['name'] for c in labels['classes']], colors, width,
                                  swatch=figures.LEGEND_SWATCH)
  with Image.open(output) as image:
    figure = np.asarray(image.convert('RGB'))
  assert figure.shape[:2] == (figures.PAD + sum(bands) + 3 * (TILE_H + figures.PAD)
                              + legend.shape[0], width)
  # The legend, last, holds every class colour exactly.
  legend_pixels = {tuple(p) for p in figure[-legend.shape[0]:].reshape(-1, 3)}
  assert all(tuple(c) in legend_pixels for c in colors.tolist())
  _check_tiles(figure, frames_dir, names, picked, bands, colors)


def test_encode_png_quantises_keeping_class_colours_exact():
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (400, 500, 3), dtype=np.uint8)
  keep = np.array([[60, 40, 222], [64, 64, 0], [192, 192, 128]], np.uint8)
  for i, color in enumerate(keep):
    pixels[:10, 10 * i:10 * i + 10] = color
  data = figures.encode_png(Image.fromarray(pixels), keep)
  assert len(data) <= figures.MAX_BYTES
  with Image.open(io.BytesIO(data)) as image:
    assert image.mode == 'P'
    decoded = np.asarray(image.convert('RGB'))
  for i, color in enumerate(keep):
    assert (decoded[:10, 10 * i:10 * i + 10] == color).all()


@pytest.mark.parametrize('make_args, message', [
    (lambda tmp: ['overlays', '--model_dir', tmp / 'missing', '--frames', tmp],
     'error: --model_dir '),
    (lambda tmp: ['overlays', '--model_dir', tmp, '--frames', tmp], 'error: '),
    (lambda tmp: ['overlays', '--frames', tmp], 'error: '),
    (lambda tmp: ['tensorboard', '--logdir', tmp / 'missing'], 'error: --logdir '),
    (lambda tmp: ['tensorboard', '--logdir', tmp], 'error: --logdir '),
    (lambda tmp: ['per_class', '--metrics', tmp / 'metrics.json'], 'error: --metrics '),
], ids=['missing_model_dir', 'model_dir_without_export', 'no_model_dir_flag', 'missing_logdir',
        'logdir_without_events', 'missing_metrics'])
def test_bad_input_is_one_line_exit_2(tmp_path, make_args, message):
  proc = run_figures(*make_args(tmp_path), timeout=120)
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(message), proc.stderr


def _listening(port):
  with socket.socket() as sock:
    return sock.connect_ex(('127.0.0.1', port)) == 0


def _live_group_members(pgid):
  """Pids of the running (not zombie) processes in a process group, from /proc."""
  members = []
  for stat in pathlib.Path('/proc').glob('[0-9]*/stat'):
    try:
      # "pid (comm) state ppid pgrp ...": comm may hold spaces, so split after its ')'.
      state, _, pgrp = stat.read_text().rpartition(')')[2].split()[:3]
    except (OSError, ValueError):
      continue  # Exited while listing.
    if int(pgrp) == pgid and state != 'Z':
      members.append(int(stat.parent.name))
  return members


def test_tensorboard_is_stopped_when_the_block_fails(smoke_run, tmp_path):
  port = figures.free_port()
  log = tmp_path / 'tensorboard.log'
  with pytest.raises(RuntimeError, match='inside'):
    with figures.running_tensorboard(str(smoke_run.model_dir / 'logs'), port, log) as proc:
      figures.wait_for_tensorboard(proc, port, log, timeout=300)
      assert _listening(port)
      raise RuntimeError('inside')
  assert proc.returncode is not None
  assert not _listening(port)
  assert not _live_group_members(proc.pid)  # Its data server too (left a zombie for init).


@pytest.mark.slow
@pytest.mark.skipif(not any(shutil.which(n) for n in figures.CHROMIUM_NAMES),
                    reason='no Chromium on PATH (apt-get install chromium): the tensorboard '
                           'subcommand screenshots with headless Chromium')
def test_tensorboard_screenshot(smoke_run, tmp_path):
  port = figures.free_port()
  output = tmp_path / 'tensorboard.png'
  proc = run_figures('tensorboard', '--logdir', smoke_run.model_dir / 'logs', '--output', output,
                     '--port', port)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 0 < output.stat().st_size <= figures.MAX_BYTES
  with Image.open(output) as image:
    assert image.width == figures.WINDOW_SIZE[0]
    assert image.height > 300
  assert not _listening(port)
