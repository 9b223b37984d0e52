"""Builds the shards: shard assignment, worker processes, temp-then-rename, resume, manifest last.

Worker processes encode examples; the parent writes each shard under a temporary name, records
its statistics under .build/, then renames it into place, so a shard with its final name is
always complete. A rerun after a crash reuses complete shards (when the build
plan matches) and writes the rest; the manifest, written last, names only complete shards.
"""

import concurrent.futures
import dataclasses
import gc
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import tempfile
import time
from typing import Callable

import numpy as np
from PIL import Image
import tensorflow as tf

from camvid_common import errors
from camvid_common import fileio
from tfrecords_builder import classes
from tfrecords_builder import features
from tfrecords_builder import layouts
from tfrecords_builder import manifest as manifest_lib
from tfrecords_builder.layouts import join

# ~8 MB shards of 480x360 PNG frames: enough shards to spread across workers and to shard by
# file across training workers, few enough to keep per-file overheads small.
EXAMPLES_PER_SHARD = 32
MAX_SHARDS = 1024
BUILD_DIR = '.build'
SHARD_RE = re.compile(r'^(train|val|test)-\d{5}-of-\d{5}\.tfrecord$')
UNKNOWN_COLOR_MODES = ('error', 'void')


@dataclasses.dataclass(frozen=True)
class Options:
  """What changes the bytes written, besides the inputs."""
  unknown_color: str = 'error'
  resize: tuple[int, int] | None = None  # (height, width)


@dataclasses.dataclass(frozen=True)
class ShardTask:
  split: str
  index: int
  num_shards: int
  pairs: tuple[layouts.Pair, ...]
  output_dir: str
  layout: str
  table: classes.ClassTable
  options: Options

  @property
  def name(self) -> str:
    return shard_name(self.split, self.index, self.num_shards)


def shard_name(split: str, index: int, num_shards: int) -> str:
  return f'{split}-{index:05d}-of-{num_shards:05d}.tfrecord'


def default_num_shards(num_examples: int) -> int:
  return max(1, min(MAX_SHARDS, math.ceil(num_examples / EXAMPLES_PER_SHARD)))


def assign(pairs: tuple[layouts.Pair, ...], num_shards: int) -> list[tuple[layouts.Pair, ...]]:
  """Deals sorted frames round-robin: shard sizes differ by at most one, and every shard mixes
  frames from all of CamVid's video sequences, which helps shuffling at training time."""
  return [pairs[i::num_shards] for i in range(num_shards)]


def _open_image(data: bytes, path: str) -> Image.Image:
  try:
    image = Image.open(io.BytesIO(data))
    image.load()
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad files.
    raise errors.InputError(f'{path}: corrupt or truncated image ({e})') from None
  return image


def _read(path: str) -> bytes:
  try:
    with tf.io.gfile.GFile(path, 'rb') as f:
      return f.read()
  except tf.errors.OpError as e:
    raise errors.InputError(f'{path}: cannot read ({e.message})') from None


def _png(array: np.ndarray) -> bytes:
  out = io.BytesIO()
  Image.fromarray(array).save(out, format='PNG', compress_level=1)
  return out.getvalue()


def _label_indices(label: Image.Image, layout: str, table: classes.ClassTable, path: str,
                   unknown_color: str) -> np.ndarray:
  if layout == 'kaggle':
    rgb = np.asarray(label if label.mode == 'RGB' else label.convert('RGB'))
    return classes.colors_to_indices(rgb, table, path, unknown_color)
  if label.mode in ('L', 'P'):
    values = np.asarray(label)
  elif label.mode == 'RGB' and np.ptp(np.asarray(label), axis=-1).max(initial=0) == 0:
    values = np.asarray(label)[..., 0]
  else:
    raise errors.InputError(f'{path}: segnet labels must be single-channel class indices, '
                            f'got a {label.mode} image')
  return classes.values_to_indices(values, table, path, unknown_color)


def encode_pair(pair: layouts.Pair, layout: str, table: classes.ClassTable,
                options: Options) -> tuple[bytes, np.ndarray, tuple[int, int]]:
  """Returns (serialized Example, per-value pixel counts [256], (height, width))."""
  image_bytes = _read(pair.image_path)
  image = _open_image(image_bytes, pair.image_path)
  label = _open_image(_read(pair.label_path), pair.label_path)
  if image.size != label.size:
    raise errors.InputError(
        f'{pair.label_path}: size {label.size[1]}x{label.size[0]} (HxW) differs from its '
        f'image {pair.image_path} ({image.size[1]}x{image.size[0]})')
  mask = _label_indices(label, layout, table, pair.label_path, options.unknown_color)
  if options.resize is not None:
    height, width = options.resize
    # Area averaging when shrinking, bilinear when enlarging; masks nearest, never interpolated.
    shrink = width <= image.size[0] and height <= image.size[1]
    image = image.convert('RGB').resize((width, height),
                                        Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)
    mask = np.asarray(Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST))
    encoded, image_format = _png(np.asarray(image)), 'png'
  elif image.mode == 'RGB' and image.format in ('PNG', 'JPEG'):
    encoded, image_format = image_bytes, image.format.lower()  # Source bytes: lossless.
  else:
    encoded, image_format = _png(np.asarray(image.convert('RGB'))), 'png'
  height, width = mask.shape
  record = features.encode_example(image=encoded, image_format=image_format, height=height,
                                   width=width, source_id=pair.source_id, mask_png=_png(mask))
  return record, np.bincount(mask.ravel(), minlength=256), (height, width)


def _stats_path(output_dir: str, name: str) -> str:
  return join(output_dir, BUILD_DIR, name + '.json')


def _encode_item(item) -> tuple[bytes, np.ndarray, tuple[int, int]]:
  return encode_pair(*item)


def _encode_to_staging(item) -> tuple[str, np.ndarray, tuple[int, int]]:
  """Worker side: encodes one example into a local staging file and returns its path.

  Why not return the bytes: multiprocessing moves a result through a 64 KB pipe, so the parent
  spent ~2 ms of CPU per 400 KB record in read() calls and context switches, a third of a core
  taken from the encoding workers. A local file costs one write and one read.
  """
  staging_path, work = item
  record, counts, size = encode_pair(*work)
  with open(staging_path, 'wb') as f:
    f.write(record)
  return staging_path, counts, size


def _from_staging(result) -> tuple[bytes, np.ndarray, tuple[int, int]]:
  staging_path, counts, size = result
  with open(staging_path, 'rb') as f:
    record = f.read()
  os.remove(staging_path)
  return record, counts, size


def write_shards(tasks: list[ShardTask], num_workers: int):
  """Writes shards in order, yielding each one's statistics as it completes.

  Workers only encode examples (decode, map labels, re-encode masks); this process writes them.
  Examples, not shards, are the unit of work, so both cores stay busy to the last example
  whatever the shard sizes, and each shard is still written by one writer: temp name, stats,
  then the rename that makes it complete.
  """
  items = [(pair, task.layout, task.table, task.options) for task in tasks for pair in task.pairs]
  if num_workers == 1:
    yield from _write_in_order(tasks, map(_encode_item, items))
    return
  # Records are staged on local disk (not under output_dir, which may be gs://) and removed as
  # soon as the parent has copied them into their shard.
  if tasks:  # The 16 MB colour table is built here once and inherited, not once per worker.
    (classes.color_lut if tasks[0].layout == 'kaggle' else classes.value_lut)(tasks[0].table)
  staging = tempfile.mkdtemp(prefix='camvid-build-')
  results = _pool_map(_encode_to_staging,
                      [(os.path.join(staging, f'{i}.tfrecord'), item)
                       for i, item in enumerate(items)], num_workers)
  try:
    yield from _write_in_order(tasks, map(_from_staging, results))
  finally:
    results.close()  # Stops the worker pool now, also when a bad input ended the build.
    shutil.rmtree(staging, ignore_errors=True)


def _write_in_order(tasks: list[ShardTask], encoded):
  for task in tasks:
    start = time.perf_counter()
    final = join(task.output_dir, task.name)
    tmp = fileio.temp_path(final)
    counts = np.zeros(256, np.int64)
    sizes = set()
    try:
      with tf.io.TFRecordWriter(tmp) as writer:
        for _ in task.pairs:
          record, pair_counts, size = next(encoded)
          writer.write(record)
          counts += pair_counts
          sizes.add(size)
      stats = {
          'name': task.name, 'split': task.split, 'num_examples': len(task.pairs),
          'class_pixel_counts': counts[:task.table.num_classes].tolist(),
          'void_pixels': int(counts[features.IGNORE_LABEL]),
          'image_sizes': sorted(list(s) for s in sizes),
      }
      # Stats first, then the rename: a shard under its final name always has its stats.
      fileio.write_atomic(_stats_path(task.output_dir, task.name), json.dumps(stats))
      tf.io.gfile.rename(tmp, final, overwrite=True)
    except BaseException:
      if tf.io.gfile.exists(tmp):
        tf.io.gfile.remove(tmp)
      raise
    stats['seconds'] = time.perf_counter() - start
    yield stats


def plan_fingerprint(dataset: layouts.Dataset, input_dir: str, shard_counts: dict[str, int],
                     options: Options) -> str:
  """Identifies a build by everything that determines its bytes (inputs by relative path)."""
  def rel(path):
    return path[len(input_dir):].lstrip('/')
  plan = {
      'format_version': manifest_lib.FORMAT_VERSION, 'layout': dataset.layout,
      'rows': [[n, list(c)] for n, c in dataset.table.rows],
      'options': dataclasses.asdict(options), 'num_shards': shard_counts,
      'splits': {s: [[p.source_id, rel(p.image_path), rel(p.label_path)] for p in pairs]
                 for s, pairs in dataset.splits.items()},
  }
  return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


def _remove(path: str) -> None:
  if tf.io.gfile.isdir(path):
    tf.io.gfile.rmtree(path)
  elif tf.io.gfile.exists(path):
    tf.io.gfile.remove(path)


def _prepare_output_dir(output_dir: str, fingerprint: str, overwrite: bool,
                        log: Callable[[str], None]) -> dict | None:
  """Checks what `output_dir` holds. Returns the existing manifest if this build is already done."""
  if not tf.io.gfile.isdir(output_dir):
    tf.io.gfile.makedirs(output_dir)
    return None
  entries = [e.rstrip('/') for e in tf.io.gfile.listdir(output_dir)]
  ours = [e for e in entries if e in (manifest_lib.MANIFEST_NAME, BUILD_DIR) or
          SHARD_RE.match(e) or (fileio.is_temp(e) and SHARD_RE.match(e.split('.tmp-')[0]))]
  foreign = sorted(set(entries) - set(ours))
  if overwrite:
    # Manifest first: from this instant no reader treats the old shards as a complete build.
    for entry in sorted(ours, key=lambda e: e != manifest_lib.MANIFEST_NAME):
      _remove(join(output_dir, entry))
    if foreign:
      log(f'note: --overwrite kept {len(foreign)} unrelated entries in {output_dir}')
    return None
  if foreign:
    raise errors.InputError(f'--output_dir {output_dir}: holds other data ({", ".join(foreign[:3])}'
                            f'{", ..." if len(foreign) > 3 else ""}); use an empty directory or '
                            '--overwrite')
  if manifest_lib.MANIFEST_NAME in entries:
    existing = manifest_lib.read(output_dir).raw
    if existing.get('fingerprint') == fingerprint:
      return existing
    raise errors.InputError(f'--output_dir {output_dir}: already holds a different build '
                            '(other inputs or flags); pass --overwrite to replace it')
  if not ours:
    return None
  plan_path = join(output_dir, BUILD_DIR, 'plan.json')
  if not tf.io.gfile.exists(plan_path):
    raise errors.InputError(f'--output_dir {output_dir}: holds shards of an unknown build; pass '
                            '--overwrite to replace them')
  with tf.io.gfile.GFile(plan_path) as f:
    if json.load(f).get('fingerprint') != fingerprint:
      raise errors.InputError(
          f'--output_dir {output_dir}: holds an unfinished build with other inputs '
          'or flags; rerun that build or pass --overwrite')
  _remove_temps(output_dir)  # Leftovers of writers killed mid-shard.
  return None


def _remove_temps(output_dir: str) -> None:
  for directory in (output_dir, join(output_dir, BUILD_DIR)):
    if tf.io.gfile.isdir(directory):
      for entry in tf.io.gfile.listdir(directory):
        if fileio.is_temp(entry):
          _remove(join(directory, entry))


def _completed(task: ShardTask) -> dict | None:
  stats_path = _stats_path(task.output_dir, task.name)
  if tf.io.gfile.exists(join(task.output_dir, task.name)) and tf.io.gfile.exists(stats_path):
    with tf.io.gfile.GFile(stats_path) as f:
      return json.load(f)
  return None


def _split_entry(table: classes.ClassTable, shard_stats: list[dict]) -> dict:
  shard_stats = sorted(shard_stats, key=lambda s: s['name'])
  sizes = {tuple(s) for stats in shard_stats for s in stats['image_sizes']}
  counts = np.sum([s['class_pixel_counts'] for s in shard_stats], axis=0, dtype=np.int64)
  return {
      'num_examples': sum(s['num_examples'] for s in shard_stats),
      'num_shards': len(shard_stats),
      'shards': [s['name'] for s in shard_stats],
      'shard_sizes': [s['num_examples'] for s in shard_stats],
      'class_pixel_counts': counts.tolist() if len(counts) else [0] * table.num_classes,
      'void_pixels': sum(s['void_pixels'] for s in shard_stats),
      'image_size': list(sizes.pop()) if len(sizes) == 1 else None,
  }


def _shard_counts(dataset, num_shards) -> dict[str, int]:
  """Shards per split: --num_shards (one number or per split), else default_num_shards."""
  counts = {}
  for split, pairs in dataset.splits.items():
    wanted = num_shards.get(split) if isinstance(num_shards, dict) else num_shards
    if wanted is not None and wanted < 1:
      raise errors.InputError(f'--num_shards {wanted}: must be at least 1')
    counts[split] = min(len(pairs), wanted or default_num_shards(len(pairs)))
  return counts


def _write_todo(todo, num_workers: int, output_dir: str, stats: dict, log) -> int:
  """Writes the missing shards, recording each one's stats; returns the examples written."""
  start, written, total = time.perf_counter(), 0, sum(len(t.pairs) for t in todo)
  try:
    for result in write_shards(todo, num_workers):
      stats[result['name']] = result
      written += result['num_examples']
      elapsed = time.perf_counter() - start
      log(f'  {result["name"]}: {result["num_examples"]} examples, '
          f'{result["num_examples"] / max(result["seconds"], 1e-9):.1f} ex/s '
          f'[{written}/{total} examples, {written / max(elapsed, 1e-9):.1f} ex/s overall]')
  except BaseException:
    # A shard interrupted by an error (a bad input, a stopped build) leaves its temporary.
    _remove_temps(output_dir)
    raise
  return written


def _manifest(dataset, options, fingerprint: str, tasks, stats: dict) -> dict:
  return {
      'format_version': manifest_lib.FORMAT_VERSION,
      'layout': dataset.layout,
      'num_classes': dataset.table.num_classes,
      'classes': dataset.table.to_json(),
      'void': dataset.table.void_json(),
      'ignore_label': features.IGNORE_LABEL,
      'features': manifest_lib.feature_keys(),
      'resize': list(options.resize) if options.resize else None,
      'unknown_color': options.unknown_color,
      'fingerprint': fingerprint,
      'splits': {split: _split_entry(dataset.table,
                                     [stats[t.name] for t in tasks if t.split == split])
                 for split in dataset.splits},
  }


def build(input_dir: str, output_dir: str, *, layout: str | None = None,
          num_shards: int | dict[str, int] | None = None, num_workers: int | None = None,
          options: Options = Options(), overwrite: bool = False,
          log: Callable[[str], None] = print) -> dict:
  """Converts a CamVid folder to shards + manifest.json; returns the manifest.

  Raises:
    errors.InputError: for any bad input; no manifest is written then.
  """
  if options.unknown_color not in UNKNOWN_COLOR_MODES:
    raise errors.InputError(f'--unknown_color {options.unknown_color}: must be one of '
                            f'{", ".join(UNKNOWN_COLOR_MODES)}')
  input_dir, output_dir = input_dir.rstrip('/'), output_dir.rstrip('/')
  fileio.check_bucket(input_dir, '--input_dir')
  fileio.check_bucket(output_dir, '--output_dir')
  dataset = layouts.discover(input_dir, layout)
  shard_counts = _shard_counts(dataset, num_shards)
  fingerprint = plan_fingerprint(dataset, input_dir, shard_counts, options)
  done = _prepare_output_dir(output_dir, fingerprint, overwrite, log)
  if done is not None:
    log(f'{output_dir}: already built by the same inputs and flags; nothing to do')
    return done
  tf.io.gfile.makedirs(join(output_dir, BUILD_DIR))
  fileio.write_atomic(
      join(output_dir, BUILD_DIR, 'plan.json'), json.dumps({'fingerprint': fingerprint}))

  tasks = [ShardTask(split, i, shard_counts[split], pairs, output_dir, dataset.layout,
                     dataset.table, options)
           for split in dataset.splits
           for i, pairs in enumerate(assign(dataset.splits[split], shard_counts[split]))]
  stats = {}
  for task in tasks:
    previous = _completed(task)
    if previous is not None:
      stats[task.name] = previous
  todo = [t for t in tasks if t.name not in stats]
  total = sum(len(t.pairs) for t in todo)
  num_workers = max(1, min(num_workers or os.cpu_count() or 1, total or 1))
  log(f'{dataset.layout} layout, {dataset.table.num_classes} classes; '
      + ', '.join(f'{s}: {len(p)} frames in {shard_counts[s]} shards'
                  for s, p in dataset.splits.items())
      + (f'; reusing {len(stats)} complete shards' if stats else '')
      + f'; {num_workers} worker(s)')

  start = time.perf_counter()
  written = _write_todo(todo, num_workers, output_dir, stats, log)

  manifest = _manifest(dataset, options, fingerprint, tasks, stats)
  manifest_lib.write(output_dir, manifest)
  _remove(join(output_dir, BUILD_DIR))  # The manifest now carries everything it held.
  elapsed = time.perf_counter() - start
  log(f'wrote {sum(len(t.pairs) for t in tasks)} examples to {output_dir} '
      f'({written} new in {elapsed:.1f} s, {written / max(elapsed, 1e-9):.1f} ex/s)')
  return manifest


def _pool_map(fn, items, num_workers):
  """Yields fn(item) for each item, in order, from a pool of worker processes."""
  # Fork (not spawn): workers inherit the imported modules instead of re-importing TensorFlow
  # for seconds each; they run only PIL, numpy and protobuf code, never the TF runtime.
  # Objects that exist now are moved out of the collector's reach so that the workers' garbage
  # collections do not write to (and so copy) every page of the inherited heap.
  # concurrent.futures, not multiprocessing.Pool: Pool.terminate() can hang for ever when its
  # task-feeding thread is blocked writing to the pipe of workers it has just killed (seen here
  # after a bad input stopped a build), and a worker that dies leaves Pool waiting for its
  # result; the executor cancels what has not started and raises BrokenProcessPool instead.
  gc.freeze()
  try:
    with concurrent.futures.ProcessPoolExecutor(
        num_workers, mp_context=multiprocessing.get_context('fork')) as executor:
      yield from executor.map(fn, items, chunksize=4)
  finally:
    gc.unfreeze()
