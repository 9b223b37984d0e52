"""`python -m tfrecords_builder.folds`: leave-one-drive-out data dirs from a CamVid folder.

CamVid's frame names carry the drive (video sequence) they come from, the prefix before the first
underscore: 0001TP_006690, 0006R0_f02040, 0016E5_01470. In the SegNet release, train holds all
three drives and val only more frames of 0016E5, so val measures the model on streets it has
seen. Each fold here holds out one drive instead:

  O/holdout-H/  a normal builder output dir (manifest.json + shards) whose `train` split is every
                frame of the other drives (from the input's train AND val splits) and whose `val`
                split is every frame of drive H (from train and val). A `test` split is never used.

Usage:
  python -m tfrecords_builder.folds --input_dir D --output_dir O [--holdout 0006R0,0001TP]
      [--layout kaggle|segnet] [--num_workers N] [--overwrite]

Each fold is built by `writer.build` on a temporary folder of symlinks in the input's own layout,
so the output is exactly the builder's format with all its checks; a rerun with the same inputs
finds every fold already built and does nothing. Input must be a local folder (symlinks).
"""

import collections
import os
import shutil
import sys
import tempfile

from camvid_common import quiet

quiet.start()  # Before anything imports TensorFlow: hides its load-time C++ log.

from absl import flags

from camvid_common import errors
from tfrecords_builder import layouts
from tfrecords_builder import writer

DEFAULT_HOLDOUT = ('0006R0', '0001TP')
SOURCE_SPLITS = ('train', 'val')  # `test` is never used: it stays unseen by every fold.
FOLD_PREFIX = 'holdout-'

_INPUT_DIR = flags.DEFINE_string('input_dir', None, 'CamVid folder (kaggle or segnet layout).')
_OUTPUT_DIR = flags.DEFINE_string('output_dir', None, 'Where the holdout-<drive>/ dirs go.')
_HOLDOUT = flags.DEFINE_string('holdout', ','.join(DEFAULT_HOLDOUT),
                               'Comma-separated drives to hold out, one fold each.')
_LAYOUT = flags.DEFINE_enum('layout', None, list(layouts.LAYOUTS),
                            'Input layout; detected from the label folders when unset.')
_NUM_WORKERS = flags.DEFINE_integer('num_workers', None,
                                    'Worker processes per build (default: all cores).',
                                    lower_bound=1)
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Rebuild folds whose dir holds another build.')
quiet.define_absl_flag()


drive_of = layouts.drive_of


def frames_by_drive(dataset: layouts.Dataset) -> dict[str, list[tuple[str, layouts.Pair]]]:
  """{drive: [(source split, pair), ...]} over the train and val splits.

  Raises:
    errors.InputError: no train/val frames, a frame without a drive prefix, or a frame name in
      both splits.
  """
  by_drive = collections.defaultdict(list)
  seen = {}
  for split in SOURCE_SPLITS:
    for pair in dataset.splits.get(split, ()):
      drive = drive_of(pair.source_id)
      if drive is None:
        raise errors.InputError(
            f'{pair.image_path}: frame name "{pair.source_id}" has no drive prefix (expected '
            'DRIVE_FRAME, e.g. 0001TP_006690)')
      if pair.source_id in seen:
        raise errors.InputError(f'{pair.image_path}: frame "{pair.source_id}" is also in '
                                f'{seen[pair.source_id]}/')
      seen[pair.source_id] = split
      by_drive[drive].append((split, pair))
  if not by_drive:
    raise errors.InputError('--input_dir: no train or val frames (folds never use test)')
  return dict(sorted(by_drive.items()))


def parse_holdout(value: str, drives: list[str]) -> list[str]:
  holdout = list(dict.fromkeys(d.strip() for d in value.split(',') if d.strip()))
  if not holdout:
    raise errors.InputError('--holdout: name at least one drive')
  for drive in holdout:
    if drive not in drives:
      raise errors.InputError(f'--holdout {drive}: no such drive in the train/val frames '
                              f'(drives: {", ".join(drives)})')
  if len(drives) < 2:
    raise errors.InputError(f'--holdout {holdout[0]}: the only drive ({drives[0]}); holding it '
                            'out leaves train empty')
  return holdout


def _label_dir(layout: str, split: str) -> str:
  return f'{split}_labels' if layout == 'kaggle' else f'{split}annot'


def link_fold(dataset: layouts.Dataset, input_dir: str, fold_splits: dict[str, list],
              root: str) -> None:
  """Writes `root` as a CamVid folder in the input's layout: symlinks to the input's files.

  Symlinks keep each file's own name, so the builder pairs and names frames as for the input.
  """
  class_dict = os.path.join(input_dir, layouts.CLASS_DICT)
  if os.path.exists(class_dict):
    os.symlink(os.path.abspath(class_dict), os.path.join(root, layouts.CLASS_DICT))
  for split, pairs in fold_splits.items():
    image_dir = os.path.join(root, split)
    label_dir = os.path.join(root, _label_dir(dataset.layout, split))
    os.makedirs(image_dir)
    os.makedirs(label_dir)
    for _, pair in pairs:
      os.symlink(os.path.abspath(pair.image_path),
                 os.path.join(image_dir, os.path.basename(pair.image_path)))
      os.symlink(os.path.abspath(pair.label_path),
                 os.path.join(label_dir, os.path.basename(pair.label_path)))


def describe(pairs) -> str:
  counts = collections.Counter(drive_of(pair.source_id) for _, pair in pairs)
  return (' '.join(f'{d}={n}' for d, n in sorted(counts.items()))
          + f' ({sum(counts.values())} frames)')


def build_folds(input_dir: str, output_dir: str, holdout: str = ','.join(DEFAULT_HOLDOUT), *,
                layout: str | None = None, num_workers: int | None = None,
                overwrite: bool = False, log=print, build_log=None) -> dict[str, dict]:
  """Builds output_dir/holdout-<drive>/ for each held-out drive; returns {fold dir: manifest}.

  Raises:
    errors.InputError: bad input folder or --holdout; nothing is written then.
  """
  input_dir, output_dir = input_dir.rstrip('/'), output_dir.rstrip('/')
  if '://' in input_dir:
    raise errors.InputError(f'--input_dir {input_dir}: must be a local folder (folds link to its '
                            'files); copy it locally first')
  dataset = layouts.discover(input_dir, layout)
  by_drive = frames_by_drive(dataset)
  drives = list(by_drive)
  held = parse_holdout(holdout, drives)
  if build_log is None:
    build_log = lambda message: log(f'  {message}')
  manifests = {}
  for drive in held:
    fold_splits = {
        'train': sorted((item for d in drives if d != drive for item in by_drive[d]),
                        key=lambda item: item[1].source_id),
        'val': sorted(by_drive[drive], key=lambda item: item[1].source_id),
    }
    fold_dir = layouts.join(output_dir, FOLD_PREFIX + drive)
    log(f'{FOLD_PREFIX}{drive}: train {describe(fold_splits["train"])}; '
        f'val {describe(fold_splits["val"])}')
    staging = tempfile.mkdtemp(prefix=f'camvid-fold-{drive}-')
    try:
      link_fold(dataset, input_dir, fold_splits, staging)
      manifests[fold_dir] = writer.build(staging, fold_dir, layout=dataset.layout,
                                         num_workers=num_workers, overwrite=overwrite,
                                         log=build_log)
    finally:
      shutil.rmtree(staging, ignore_errors=True)
  return manifests


def main(argv):
  del argv  # run_app rejects positional arguments.
  if not _INPUT_DIR.value:
    raise errors.InputError('--input_dir is required')
  if not _OUTPUT_DIR.value:
    raise errors.InputError('--output_dir is required')
  manifests = build_folds(_INPUT_DIR.value, _OUTPUT_DIR.value, _HOLDOUT.value,
                          layout=_LAYOUT.value, num_workers=_NUM_WORKERS.value,
                          overwrite=_OVERWRITE.value)
  print(f'{len(manifests)} folds in {_OUTPUT_DIR.value.rstrip("/")}: '
        + ', '.join(os.path.basename(d) for d in manifests), file=sys.stdout)
  return 0


def run():
  """Console-script entry: user mistakes become one line on stderr and exit code 2."""
  errors.run_app(main)


if __name__ == '__main__':
  run()
