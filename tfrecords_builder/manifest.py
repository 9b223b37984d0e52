"""The manifest.json schema: what a build produced. Written last; readers trust only what it names.

    {"format_version": 1, "layout": "kaggle"|"segnet", "num_classes": C,
     "classes": [{"index": i, "name": str, "color": [r, g, b]}, ...],
     "void": [{"name": str, "color": [r, g, b]}], "ignore_label": 255,
     "features": {...feature keys...}, "resize": [h, w] | null, "fingerprint": sha256,
     "splits": {split: {"num_examples": n, "num_shards": k, "shards": [file names],
                        "shard_sizes": [examples per shard],
                        "class_pixel_counts": [C ints], "void_pixels": int,
                        "image_size": [h, w] | null}}}
"""

import dataclasses
import json

import tensorflow as tf

from camvid_common import errors
from camvid_common import fileio
from tfrecords_builder import features
from tfrecords_builder.layouts import join

FORMAT_VERSION = 1
MANIFEST_NAME = 'manifest.json'
_SPLIT_KEYS = ('num_examples', 'shards', 'shard_sizes', 'class_pixel_counts', 'void_pixels')


@dataclasses.dataclass(frozen=True)
class Manifest:
  """A validated manifest plus the directory it describes."""
  data_dir: str
  raw: dict

  @property
  def num_classes(self) -> int:
    return len(self.raw['classes'])

  @property
  def class_names(self) -> list[str]:
    return [c['name'] for c in self.raw['classes']]

  @property
  def class_colors(self) -> list[list[int]]:
    return [c['color'] for c in self.raw['classes']]

  @property
  def ignore_label(self) -> int:
    return self.raw['ignore_label']

  @property
  def splits(self) -> dict:
    return self.raw['splits']

  def split(self, name: str) -> dict:
    if name not in self.splits:
      raise errors.InputError(f'{join(self.data_dir, MANIFEST_NAME)}: no split "{name}" '
                              f'(has: {", ".join(self.splits) or "none"})')
    return self.splits[name]

  def shard_paths(self, split: str) -> list[str]:
    return [join(self.data_dir, name) for name in self.split(split)['shards']]


def write(output_dir: str, raw: dict) -> None:
  validate(raw, join(output_dir, MANIFEST_NAME))
  fileio.write_atomic(join(output_dir, MANIFEST_NAME), json.dumps(raw, indent=2) + '\n')


def feature_keys() -> dict:
  return {'image': features.IMAGE_ENCODED, 'mask': features.MASK_ENCODED,
          'source_id': features.SOURCE_ID}


def validate(raw: dict, path: str) -> None:
  """Raises InputError naming `path` if `raw` does not follow the schema above."""
  def fail(what):
    raise errors.InputError(f'{path}: {what}')
  if not isinstance(raw, dict):
    fail('not a JSON object')
  if raw.get('format_version') != FORMAT_VERSION:
    fail(f'format_version {raw.get("format_version")!r}, expected {FORMAT_VERSION}')
  for key in ('layout', 'classes', 'ignore_label', 'splits'):
    if key not in raw:
      fail(f'missing key "{key}"')
  if not raw['classes'] or any(
      c.get('index') != i or not c.get('name') or len(c.get('color', ())) != 3
      for i, c in enumerate(raw['classes'])):
    fail('"classes" must list {"index", "name", "color"} with index = position')
  if not raw['splits']:
    fail('no splits')
  for split, info in raw['splits'].items():
    for key in _SPLIT_KEYS:
      if key not in info:
        fail(f'split "{split}" is missing "{key}"')
    if (len(info['shard_sizes']) != len(info['shards']) or
        sum(info['shard_sizes']) != info['num_examples']):
      fail(f'split "{split}": shard_sizes do not match shards and num_examples')
    if len(info['class_pixel_counts']) != len(raw['classes']):
      fail(f'split "{split}": class_pixel_counts has {len(info["class_pixel_counts"])} entries '
           f'for {len(raw["classes"])} classes')


def read(data_dir: str) -> Manifest:
  """Reads and validates `data_dir`/manifest.json; InputError with the path on any problem."""
  path = join(data_dir, MANIFEST_NAME)
  try:
    with tf.io.gfile.GFile(path, 'r') as f:
      text = f.read()
  except tf.errors.NotFoundError:
    raise errors.InputError(
        f'{path}: not found; is {data_dir} a tfrecords_builder output dir?') from None
  except tf.errors.OpError as e:
    raise errors.InputError(f'{path}: cannot read: {e.message}') from None
  try:
    raw = json.loads(text)
  except json.JSONDecodeError as e:
    raise errors.InputError(f'{path}: not valid JSON ({e})') from None
  validate(raw, path)
  return Manifest(data_dir=data_dir, raw=raw)
