"""Makes the README's figures: prediction overlays, a TensorBoard screenshot, per-class IoU bars.

    python scripts/make_figures.py overlays --model_dir M
        --frames ../shared/data/camvid-segnet/val [--count 4] [--output docs/images/overlays.png]
    python scripts/make_figures.py tensorboard --logdir M/logs
        [--output docs/images/tensorboard.png] [--port 0]
    python scripts/make_figures.py per_class --metrics M/metrics.json
        [--output docs/images/per_class_iou.png]

overlays: picks --count frames evenly spaced over the frames sorted by name (--frames is a
directory of .png/.jpg/.jpeg images or a list of image files), runs the real
`python -m trainer.predict --model_dir M --input <the picked frames> --output_dir <tmp>` and
tiles each frame beside its predicted overlay, 320 pixels wide, the frame's name above both,
over a legend of the class names and colours of M/export/labels.json (or M/inference.json).

tensorboard: starts `tensorboard --logdir L --host 127.0.0.1 --port P` (--port 0: a free port),
waits until it serves the run's scalars, screenshots its Scalars dashboard (epoch_loss,
epoch_mean_iou, epoch_pixel_accuracy and learning_rate, no smoothing) and, when the run has an
`overlays` image summary, its Images dashboard filtered to it, with headless Chromium, and
stacks the two. Chromium's window is 1200x1100; each screenshot is cut below the dashboard's
first card. TensorBoard is stopped on every exit path (an error, Ctrl-C, SIGTERM).

per_class: draws the per-class IoU of a metrics.json (trainer.task's or trainer.evaluate's) as
bars in the class colours of the model dir holding it (trainer.visualize.per_class_iou_image).

--output defaults to the repo's docs/images/. Every PNG is written optimised; one that would
exceed 300 KB is quantised to a palette that keeps the class colours exact. A user's mistake (a
missing dir or file, no Chromium) prints one `error: ...` line on stderr and exits 2; a tool that
fails on good input prints `failed: ...` and exits 1.
"""

import contextlib
import io
import json
import math
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import numpy as np
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from camvid_common import errors  # pylint: disable=g-import-not-at-top
from camvid_common import quiet  # pylint: disable=g-import-not-at-top

quiet.start()

from trainer import visualize  # pylint: disable=g-import-not-at-top

MAX_BYTES = 300_000
DOCS_IMAGES = REPO / 'docs' / 'images'  # Where --output goes by default.
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
# Where a model dir keeps its class table: the export's (what trainer.predict uses) first.
CLASS_TABLES = ('export/labels.json', 'inference.json')
TILE_WIDTH = 320
PAD = 8
LEGEND_SWATCH = 12
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
BAR_LENGTH, BAR_ROW = 360, 20  # per_class: pixels of an IoU-1 bar, and of a class's row.
CHROMIUM_NAMES = ('chromium', 'chromium-browser', 'google-chrome', 'google-chrome-stable')
# (dashboard, URL hash parameters): what the tensorboard figure shows, top down.
# The Scalars dashboard shows the per-epoch loss, mIoU, pixel accuracy and learning rate (the
# filter is a regex: anchored, so no step/learning_rate, epoch_objective or iou/*).
SCALARS_VIEW = ('scalars', {
    'tagFilter': '^(epoch_(loss|mean_iou|pixel_accuracy)|learning_rate)$',
    '_smoothingWeight': '0'})
IMAGES_VIEW = ('images', {'tagFilter': 'overlays'})
# Chromium's window; a screenshot is cut below the dashboard's first card (crop_first_card).
WINDOW_SIZE = (1200, 1100)
CARD_ROWS = 100


class Failure(Exception):
  """A tool failed on input that looked good (a crash, a timeout): exit 1, not 2."""


def parse_args(argv):
  """Parses the subcommand and its flags; a bad one raises errors.InputError."""
  parser = errors.ArgumentParser(description=__doc__.splitlines()[0])
  quiet.add_argument(parser)
  commands = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
  overlays = commands.add_parser('overlays', help='val frames beside their predicted overlays')
  overlays.add_argument('--model_dir', required=True, help='a trained model dir with export/')
  overlays.add_argument('--frames', required=True, nargs='+',
                        help='a directory of images, or image files')
  overlays.add_argument('--count', type=int, default=4, help='frames to show (default 4)')
  overlays.add_argument('--output', default=str(DOCS_IMAGES / 'overlays.png'))
  board = commands.add_parser('tensorboard', help='a screenshot of TensorBoard on a run')
  board.add_argument('--logdir', required=True, help='a run\'s logs, e.g. M/logs')
  board.add_argument('--output', default=str(DOCS_IMAGES / 'tensorboard.png'))
  board.add_argument('--port', type=int, default=0, help='TensorBoard\'s port (0: a free one)')
  board.add_argument('--timeout', type=float, default=180,
                     help='seconds to wait for TensorBoard, and for each screenshot')
  per_class = commands.add_parser('per_class', help='per-class IoU as a bar chart')
  per_class.add_argument('--metrics', required=True, help='a metrics.json, e.g. M/metrics.json')
  per_class.add_argument('--output', default=str(DOCS_IMAGES / 'per_class_iou.png'))
  args = parser.parse_args(argv)
  if args.command == 'overlays' and args.count < 1:
    raise errors.InputError(f'--count {args.count}: must be at least 1')
  if args.command == 'tensorboard' and not 0 <= args.port <= 65535:
    raise errors.InputError(f'--port {args.port}: must be 0..65535')
  return args


# ---------------------------------------------------------------------------------------------
# PNG output


def _png_bytes(image: Image.Image) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format='PNG', optimize=True)
  return buf.getvalue()


def quantize(image: Image.Image, keep: np.ndarray, colors: int) -> Image.Image:
  """Maps an RGB image onto `colors` palette entries: the `keep` colours exactly, the rest
  adapted to the image (median cut), without dithering."""
  keep = np.unique(np.concatenate([np.asarray(keep, np.uint8).reshape(-1, 3),
                                   [WHITE, BLACK]]), axis=0)
  adaptive = image.quantize(colors - len(keep), method=Image.Quantize.MEDIANCUT,
                            dither=Image.Dither.NONE)
  palette = keep.flatten().tolist() + adaptive.getpalette()[:3 * (colors - len(keep))]
  holder = Image.new('P', (1, 1))
  holder.putpalette(palette)
  return image.quantize(palette=holder, dither=Image.Dither.NONE)


def encode_png(image: Image.Image, keep: np.ndarray) -> bytes:
  """An optimised PNG under MAX_BYTES: RGB if small enough, else quantised (256 colours down)."""
  data = _png_bytes(image)
  for colors in (256, 128, 64):
    if len(data) <= MAX_BYTES:
      return data
    data = _png_bytes(quantize(image, keep, colors))
  if len(data) > MAX_BYTES:
    raise Failure(f'{image.width}x{image.height} figure is {len(data)} bytes even with 64 '
                  f'colours (limit {MAX_BYTES})')
  return data


def write_png(image: Image.Image, output: str, keep: np.ndarray = ()) -> None:
  """Writes `image` to `output` atomically (encode_png) and prints its size."""
  data = encode_png(image.convert('RGB'), np.asarray(keep, np.uint8))
  path = pathlib.Path(output)
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_name(path.name + '.partial')
  partial.write_bytes(data)
  os.replace(partial, path)
  print(f'{path}: {image.width}x{image.height}, {len(data) / 1000:.0f} KB', flush=True)


# ---------------------------------------------------------------------------------------------
# overlays


def load_classes(model_dir: pathlib.Path) -> tuple[list[str], np.ndarray]:
  """Class names and [C, 3] uint8 colours from a model dir's class table (CLASS_TABLES)."""
  for name in CLASS_TABLES:
    path = model_dir / name
    if path.is_file():
      try:
        classes = json.loads(path.read_text())['classes']
        return ([str(c['name']) for c in classes],
                np.array([c['color'] for c in classes], np.uint8).reshape(-1, 3))
      except (ValueError, KeyError, TypeError) as e:
        raise errors.InputError(f'{path}: not a class table ({e!r})') from None
  raise errors.InputError(f'{model_dir}: no {" or ".join(CLASS_TABLES)}; train (and export) '
                          'a model first')


def list_frames(specs: list[str]) -> list[pathlib.Path]:
  """The images named by --frames (directories: the images directly inside), sorted by name."""
  frames = []
  for spec in specs:
    path = pathlib.Path(spec)
    if path.is_dir():
      frames += [p for p in path.iterdir()
                 if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    elif path.is_file():
      frames.append(path)
    else:
      raise errors.InputError(f'--frames {spec}: no such file or directory')
  if not frames:
    raise errors.InputError(f'--frames {" ".join(specs)}: no {"/".join(IMAGE_EXTENSIONS)} '
                            'images')
  return sorted(set(frames), key=lambda p: (p.name, str(p)))


def pick_frames(frames: list[pathlib.Path], count: int) -> list[pathlib.Path]:
  """`count` of `frames` spread over their drives and over time: the TensorBoard overlays' choice."""
  from trainer import data  # pylint: disable=g-import-not-at-top  # Imports TensorFlow.
  return [frames[i] for i in data.spread_picks([f.stem for f in frames], count)]


def _repo_env() -> dict:
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(REPO), env.get('PYTHONPATH')]))
  return env


def run_predict(model_dir: pathlib.Path, frames: list[pathlib.Path],
                work: pathlib.Path) -> pathlib.Path:
  """Runs trainer.predict on `frames` (linked into one input dir); returns its output dir."""
  inputs, outputs = work / 'frames', work / 'predicted'
  inputs.mkdir()
  for frame in frames:
    link = inputs / frame.name
    if link.is_symlink():
      raise errors.InputError(f'--frames {frame}: same name as {link.resolve()}')
    link.symlink_to(frame.resolve())
  command = [sys.executable, '-m', 'trainer.predict', '--model_dir', str(model_dir),
             '--input', str(inputs), '--output_dir', str(outputs)]
  print(f'$ {" ".join(command)}', flush=True)
  proc = subprocess.run(command, cwd=REPO, env=_repo_env(), capture_output=True, text=True,
                        check=False)
  lines = proc.stderr.strip().splitlines() or ['(no output)']
  if proc.returncode == errors.EXIT_INPUT_ERROR:
    raise errors.InputError(lines[-1].removeprefix('error: '))
  if proc.returncode != 0:
    raise Failure(f'trainer.predict exited {proc.returncode}: {" | ".join(lines[-5:])}')
  return outputs


def tile_size(frame: pathlib.Path) -> tuple[int, int]:
  """(width, height) of a tile: TILE_WIDTH wide, the frame's aspect ratio."""
  with Image.open(frame) as image:
    return TILE_WIDTH, max(1, round(TILE_WIDTH * image.height / image.width))


def _tile(path: pathlib.Path, size: tuple[int, int]) -> Image.Image:
  with Image.open(path) as image:
    return image.convert('RGB').resize(size, Image.Resampling.LANCZOS)


def overlay_figure(pairs: list[tuple[str, pathlib.Path, pathlib.Path]],
                   size: tuple[int, int], class_names: list[str],
                   colors: np.ndarray) -> Image.Image:
  """Rows of (frame | predicted overlay) tiles of `size`, each under its caption, then a legend.

  Args:
    pairs: (name, frame path, overlay path) per row.
    size: (width, height) of one tile.
    class_names: Legend entries.
    colors: [C, 3] uint8 class colours.

  Returns:
    The figure, figure_width(size) pixels wide; rows are PAD apart.
  """
  width, height = size
  total = figure_width(size)
  centres = [PAD + width // 2, 2 * PAD + width + width // 2]
  parts = [np.full((PAD, total, 3), 255, np.uint8)]
  for name, frame, overlay in pairs:
    parts.append(visualize.text_band(total, list(zip(centres, [name, f'{name} predicted']))))
    row = Image.new('RGB', (total, height + PAD), WHITE)
    row.paste(_tile(frame, size), (PAD, 0))
    row.paste(_tile(overlay, size), (2 * PAD + width, 0))
    parts.append(np.asarray(row))
  parts.append(visualize.legend_image(class_names, colors, total, swatch=LEGEND_SWATCH))
  return Image.fromarray(np.concatenate(parts, axis=0))


def figure_width(size: tuple[int, int]) -> int:
  """Width of the overlays figure for tiles of `size`: two tiles and three PAD margins."""
  return 2 * size[0] + 3 * PAD


def make_overlays(args) -> None:
  """The `overlays` subcommand."""
  model_dir = pathlib.Path(args.model_dir).resolve()  # trainer.predict runs in the repo root.
  if not model_dir.is_dir():
    raise errors.InputError(f'--model_dir {args.model_dir}: no such directory')
  class_names, colors = load_classes(model_dir)
  frames = pick_frames(list_frames(args.frames), args.count)
  with tempfile.TemporaryDirectory(prefix='make_figures-') as work:
    outputs = run_predict(model_dir, frames, pathlib.Path(work))
    pairs = [(f.stem, f, outputs / f'{f.stem}_overlay.png') for f in frames]
    missing = [str(p) for _, _, p in pairs if not p.is_file()]
    if missing:
      raise Failure(f'trainer.predict wrote no {", ".join(missing)}')
    figure = overlay_figure(pairs, tile_size(frames[0]), class_names, colors)
  write_png(figure, args.output, keep=colors)


# ---------------------------------------------------------------------------------------------
# tensorboard


def find_chromium() -> str:
  """The path of a Chromium (or Chrome) binary, or an InputError saying how to install one."""
  for name in CHROMIUM_NAMES:
    path = shutil.which(name)
    if path:
      return path
  raise errors.InputError(f'no Chromium ({", ".join(CHROMIUM_NAMES)}) on PATH; install it, '
                          'e.g. apt-get install -y chromium')


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    return sock.getsockname()[1]


def _stop_group(proc: subprocess.Popen, grace: float) -> None:
  """Ends a process started with start_new_session and its children (its process group)."""
  if proc.poll() is None:
    with contextlib.suppress(ProcessLookupError):
      os.killpg(proc.pid, signal.SIGTERM)
    try:
      proc.wait(grace)
      return
    except subprocess.TimeoutExpired:
      pass
  with contextlib.suppress(ProcessLookupError):
    os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()


@contextlib.contextmanager
def running_tensorboard(logdir: str, port: int, log_path: pathlib.Path):
  """Runs `tensorboard --logdir ... --host 127.0.0.1 --port ...` while the block runs."""
  command = [sys.executable, '-m', 'tensorboard.main', '--logdir', logdir, '--host',
             '127.0.0.1', '--port', str(port)]
  print(f'$ {" ".join(command)}', flush=True)
  with open(log_path, 'wb') as log:
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
  try:
    yield proc
  finally:
    _stop_group(proc, grace=10)


# Local requests only: a proxy from the environment must not see them.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _tags(port: int, plugin: str) -> dict:
  url = f'http://127.0.0.1:{port}/data/plugin/{plugin}/tags'
  with _OPENER.open(url, timeout=5) as response:
    return json.loads(response.read())


def _log_tail(log_path: pathlib.Path) -> str:
  lines = log_path.read_text(errors='replace').strip().splitlines()
  return ' | '.join(lines[-3:]) or '(no output)'


def wait_for_tensorboard(proc, port: int, log_path: pathlib.Path, timeout: float) -> dict:
  """Polls until TensorBoard serves scalar tags, the same twice a second apart; returns the
  image tags ({run: {tag: ...}})."""
  deadline, last = time.monotonic() + timeout, None
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      raise Failure(f'tensorboard exited {proc.returncode}: {_log_tail(log_path)}')
    try:
      tags = (_tags(port, 'scalars'), _tags(port, 'images'))
    except (OSError, ValueError):  # Not listening yet, or loading.
      tags = None
    if tags and tags[0] and tags == last:
      return tags[1]
    last = tags
    time.sleep(1)
  raise Failure(f'tensorboard served no scalars within {timeout:g} s: {_log_tail(log_path)}')


def dashboard_url(port: int, dashboard: str, params: dict) -> str:
  """A TensorBoard URL opening `dashboard` with hash parameters (tagFilter, ...)."""
  query = '&'.join(f'{k}={urllib.parse.quote(v, safe="")}' for k, v in params.items())
  return f'http://127.0.0.1:{port}/#{dashboard}&{query}'


def screenshot(chromium: str, url: str, size: tuple[int, int], path: pathlib.Path,
               timeout: float) -> Image.Image:
  """Loads `url` in headless Chromium with a window of `size` and returns its screenshot."""
  with tempfile.TemporaryDirectory(prefix='make_figures-chromium-') as profile:
    command = [chromium, '--headless', '--no-sandbox', '--disable-gpu', '--hide-scrollbars',
               '--no-proxy-server', '--no-first-run', f'--user-data-dir={profile}',
               f'--window-size={size[0]},{size[1]}', '--virtual-time-budget=10000',
               f'--screenshot={path}', url]
    print(f'screenshot {url}', flush=True)
    with open(path.with_suffix('.log'), 'wb') as log:
      proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, start_new_session=True)
    try:
      code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
      raise Failure(f'chromium took over {timeout:g} s on {url}') from None
    finally:
      _stop_group(proc, grace=5)
  if code != 0 or not path.is_file():
    raise Failure(f'chromium exited {code} on {url}: {_log_tail(path.with_suffix(".log"))}')
  with Image.open(path) as image:
    return image.convert('RGB')


def crop_first_card(image: Image.Image) -> Image.Image:
  """Cuts a dashboard screenshot below its first card (the pane of tags matching the filter).

  Rows that are light grey without any white right of the sidebar (the left third) are the page
  between cards; the first such row after CARD_ROWS or more card rows ends the first card (the
  divider under a card's title is one grey row, after fewer). Returns the image unchanged when
  the card runs past the window.
  """
  pixels = np.asarray(image)[:, image.width // 3:image.width - 30]
  page = (((pixels >= 200) & (pixels <= 250)).all(axis=(1, 2))
          & ~(pixels == 255).all(axis=2).any(axis=1))
  card_rows = 0
  for y, is_page in enumerate(page):
    if not is_page:
      card_rows += 1
    elif card_rows >= CARD_ROWS:
      return image.crop((0, 0, image.width, y))
    else:
      card_rows = 0
  return image


def stack(images: list[Image.Image]) -> Image.Image:
  """The images one below the other, PAD apart, on white."""
  width = max(i.width for i in images)
  out = Image.new('RGB', (width, sum(i.height for i in images) + PAD * (len(images) - 1)), WHITE)
  y = 0
  for image in images:
    out.paste(image, (0, y))
    y += image.height + PAD
  return out


def _raise_on_sigterm(signum, frame):
  del frame
  raise SystemExit(128 + signum)


def make_tensorboard(args) -> None:
  """The `tensorboard` subcommand."""
  logdir = pathlib.Path(args.logdir).resolve()
  if not logdir.is_dir():
    raise errors.InputError(f'--logdir {args.logdir}: no such directory')
  if not next(logdir.rglob('events.out.tfevents.*'), None):
    raise errors.InputError(f'--logdir {args.logdir}: no TensorBoard event files in it')
  chromium = find_chromium()
  port = args.port or free_port()
  with tempfile.TemporaryDirectory(prefix='make_figures-') as work:
    work = pathlib.Path(work)
    with running_tensorboard(str(logdir), port, work / 'tensorboard.log') as proc:
      image_tags = wait_for_tensorboard(proc, port, work / 'tensorboard.log', args.timeout)
      views = [SCALARS_VIEW]
      if any('overlays' in tags for tags in image_tags.values()):
        views.append(IMAGES_VIEW)
      shots = [crop_first_card(screenshot(chromium, dashboard_url(port, name, params),
                                          WINDOW_SIZE, work / f'{name}.png', args.timeout))
               for name, params in views]
  write_png(stack(shots), args.output)


# ---------------------------------------------------------------------------------------------
# per_class


def _iou_or_none(value):
  try:
    value = float(value)
  except (TypeError, ValueError):
    return None
  return value if math.isfinite(value) else None


def chart_title(metrics: dict) -> str:
  """'Per-class IoU on <split> (<n> frames), mean IoU <m>', the parts metrics.json has."""
  title = f'Per-class IoU on {metrics.get("split", "val")}'
  if isinstance(metrics.get('num_examples'), int):
    title += f' ({metrics["num_examples"]} frames)'
  mean_iou = _iou_or_none(metrics.get('mean_iou'))
  return title if mean_iou is None else f'{title}, mean IoU {mean_iou:.3f}'


def read_per_class_iou(path: pathlib.Path) -> tuple[dict, list[str], list]:
  """The metrics dict, its class names in order and their IoU (None where undefined)."""
  try:
    metrics = json.loads(path.read_text())
    names = list(metrics['per_class'])
    return metrics, names, [_iou_or_none(metrics['per_class'][n].get('iou')) for n in names]
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise errors.InputError(f'--metrics {path}: no per_class IoU ({e!r})') from None


def class_colors(model_dir: pathlib.Path, names: list[str]) -> np.ndarray:
  """[C, 3] uint8 colours of `names` from the model dir's class table; grey without one."""
  try:
    table_names, table_colors = load_classes(model_dir)
    return np.array([table_colors[table_names.index(n)] for n in names], np.uint8)
  except (errors.InputError, ValueError):
    return np.full((len(names), 3), 128, np.uint8)


def make_per_class(args) -> None:
  """The `per_class` subcommand."""
  path = pathlib.Path(args.metrics)
  if not path.is_file():
    raise errors.InputError(f'--metrics {args.metrics}: no such file')
  metrics, names, ious = read_per_class_iou(path)
  colors = class_colors(path.parent, names)
  chart = visualize.per_class_iou_image(ious, names, colors, title=chart_title(metrics),
                                        bar_length=BAR_LENGTH, row=BAR_ROW)
  write_png(Image.fromarray(chart), args.output, keep=colors)


COMMANDS = {'overlays': make_overlays, 'tensorboard': make_tensorboard,
            'per_class': make_per_class}


def main():
  args = parse_args(sys.argv[1:])
  # SIGTERM unwinds like Ctrl-C: TensorBoard, Chromium and trainer.predict are stopped, temporary
  # dirs removed.
  signal.signal(signal.SIGTERM, _raise_on_sigterm)
  try:
    COMMANDS[args.command](args)
  except Failure as e:
    print(f'failed: {errors.one_line(e)}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  errors.run_script(main)
