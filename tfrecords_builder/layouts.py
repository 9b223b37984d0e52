"""Finds the (image, label) pairs of each split in the Kaggle and SegNet CamVid layouts.

kaggle: {split}/<frame>.png with RGB colour labels {split}_labels/<frame>_L.png and class_dict.csv.
segnet: {split}/<frame>.png with index labels {split}annot/<frame>.png; class_dict.csv optional.
All listing goes through tf.io.gfile so gs:// inputs work the same as local folders.
"""

import dataclasses
import posixpath

import tensorflow as tf

from camvid_common import errors
from tfrecords_builder import classes

SPLITS = ('train', 'val', 'test')
LAYOUTS = ('kaggle', 'segnet')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
CLASS_DICT = 'class_dict.csv'


@dataclasses.dataclass(frozen=True)
class Pair:
  source_id: str
  image_path: str
  label_path: str


@dataclasses.dataclass(frozen=True)
class Dataset:
  layout: str
  table: classes.ClassTable
  splits: dict[str, tuple[Pair, ...]]


def join(*parts: str) -> str:
  # posixpath, not os.path: gs:// paths always use '/'.
  return posixpath.join(*parts)


def drive_of(source_id: str) -> str | None:
  """The drive of a CamVid frame name (prefix before the first underscore), None if it has none."""
  prefix, sep, _ = source_id.partition('_')
  return prefix if sep and prefix else None


def _label_dir(layout: str, split: str) -> str:
  return f'{split}_labels' if layout == 'kaggle' else f'{split}annot'


def detect_layout(input_dir: str) -> str:
  """Returns 'kaggle' or 'segnet' from which label folders exist."""
  found = {layout for layout in LAYOUTS for split in SPLITS
           if tf.io.gfile.isdir(join(input_dir, _label_dir(layout, split)))}
  if len(found) == 1:
    return found.pop()
  if not found:
    raise errors.InputError(
        f'{input_dir}: not a CamVid folder: expected kaggle label folders '
        f'({", ".join(_label_dir("kaggle", s) for s in SPLITS)}) or segnet ones '
        f'({", ".join(_label_dir("segnet", s) for s in SPLITS)})')
  raise errors.InputError(f'{input_dir}: has both kaggle and segnet label folders; pass --layout')


def _files(directory: str) -> list[str]:
  return sorted(name for name in tf.io.gfile.listdir(directory) if not name.endswith('/'))


def _pairs(input_dir: str, layout: str, split: str) -> tuple[Pair, ...]:
  image_dir = join(input_dir, split)
  label_dir = join(input_dir, _label_dir(layout, split))
  images = {}
  for name in _files(image_dir):
    stem, ext = posixpath.splitext(name)
    if ext.lower() in IMAGE_EXTENSIONS:
      if stem in images:
        raise errors.InputError(f'{join(image_dir, name)}: two images for frame "{stem}"')
      images[stem] = name
  suffix = '_L' if layout == 'kaggle' else ''
  labels = {}
  for name in _files(label_dir):
    stem, ext = posixpath.splitext(name)
    if ext.lower() == '.png' and stem.endswith(suffix):
      labels[stem[:len(stem) - len(suffix)]] = name
  for stem in sorted(set(labels) - set(images)):
    raise errors.InputError(f'{join(label_dir, labels[stem])}: label has no image in {image_dir}/')
  for stem in sorted(set(images) - set(labels)):
    raise errors.InputError(f'{join(image_dir, images[stem])}: image has no label '
                            f'{join(label_dir, stem + suffix + ".png")}')
  return tuple(Pair(stem, join(image_dir, images[stem]), join(label_dir, labels[stem]))
               for stem in sorted(images))


def read_table(input_dir: str, layout: str) -> classes.ClassTable:
  path = join(input_dir, CLASS_DICT)
  if tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path, 'rb') as f:
      raw = f.read()
    try:
      text = raw.decode('utf-8')
    except UnicodeDecodeError:
      raise errors.InputError(f'{path}: not UTF-8 text') from None
    return classes.parse_class_dict(text, path)
  if layout == 'kaggle':
    raise errors.InputError(f'{path}: missing; the kaggle layout needs class_dict.csv (name,r,g,b)')
  return classes.segnet_table()


def discover(input_dir: str, layout: str | None = None) -> Dataset:
  """Lists every split that exists under `input_dir`, pairing images with labels."""
  if not tf.io.gfile.isdir(input_dir):
    raise errors.InputError(f'--input_dir {input_dir}: no such directory')
  if layout is None:
    layout = detect_layout(input_dir)
  elif layout not in LAYOUTS:
    raise errors.InputError(f'--layout {layout}: must be one of {", ".join(LAYOUTS)}')
  table = read_table(input_dir, layout)
  splits = {}
  for split in SPLITS:
    has_images = tf.io.gfile.isdir(join(input_dir, split))
    has_labels = tf.io.gfile.isdir(join(input_dir, _label_dir(layout, split)))
    if has_images != has_labels:
      missing = _label_dir(layout, split) if has_images else split
      raise errors.InputError(f'{join(input_dir, missing)}/: missing; split "{split}" needs both '
                              f'{split}/ and {_label_dir(layout, split)}/')
    if has_images:
      pairs = _pairs(input_dir, layout, split)
      if pairs:
        splits[split] = pairs
  if not splits:
    raise errors.InputError(f'{input_dir}: no {layout} frames found in any split '
                            f'({", ".join(SPLITS)})')
  return Dataset(layout=layout, table=table, splits=splits)
