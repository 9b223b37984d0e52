"""Cross-drive validation: trains a preset on every leave-one-drive-out fold and tables the scores.

    python -m tfrecords_builder.folds --input_dir ../shared/data/camvid-segnet --output_dir /tmp/folds
    python scripts/cross_drive.py --config small --folds /tmp/folds --output_dir /tmp/xd
        [--seeds 42,43] [--parallel 2] [-- extra trainer.task flags, e.g. --epochs 10]

For each FOLDS/holdout-<drive>/ (tfrecords_builder.folds output) and each seed it runs
`python -m trainer.task --config C --data_dir FOLDS/holdout-H --model_dir R/holdout-H-seedS
--seed S --params_override=eval.every_epochs=0 [extra flags]`, its output going to
R/holdout-H-seedS.log. A fold's val split is the held-out drive, the test of this script, so it
must not choose the weights: the runs validate after their last epoch only, and best/,
metrics.json and the export hold the final weights (early stopping waits for that validation).
A run whose model_dir already holds metrics.json is not retrained, so rerunning the command
continues where it stopped (an interrupted run resumes from its own checkpoints). Runs go one
after another, or --parallel N at a time.

Prints one row per run: fold, seed, val mIoU and pixel accuracy on the held-out drive, the IoU of
the five thin classes and the minutes it took; then the mean over folds of each fold's mean over
seeds. Last line: RESULT cross_drive_miou=<float>
"""

import concurrent.futures
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from camvid_common import errors  # pylint: disable=g-import-not-at-top
from camvid_common import quiet  # pylint: disable=g-import-not-at-top
from trainer import configs  # pylint: disable=g-import-not-at-top

FOLD_PREFIX = 'holdout-'
METRICS = 'metrics.json'
THIN_CLASSES = ('Pole', 'SignSymbol', 'Pedestrian', 'Bicyclist', 'Fence')
# The Kaggle release's 32-class table names two of them differently.
ALIASES = {'Pole': ('Column_Pole',), 'Fence': (), 'SignSymbol': (), 'Pedestrian': (),
           'Bicyclist': ()}


def parse_args(argv):
  if '--' in argv:
    cut = argv.index('--')
    argv, extra = argv[:cut], argv[cut + 1:]
  else:
    extra = []
  parser = errors.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', required=True, help='trainer preset, e.g. small')
  parser.add_argument('--folds', required=True, help='tfrecords_builder.folds --output_dir')
  parser.add_argument('--seeds', default='42', help='comma-separated seeds (default 42)')
  parser.add_argument('--output_dir', default=None,
                      help='where the runs go (default: FOLDS-runs next to --folds)')
  parser.add_argument('--parallel', type=int, default=1, help='runs at a time (default 1)')
  quiet.add_argument(parser, 'pass --verbose on to every trainer.task run')
  args = parser.parse_args(argv)
  args.extra = extra
  if args.config not in configs.PRESETS:
    raise errors.InputError(f'--config {args.config}: no such preset '
                            f'({", ".join(configs.PRESETS)})')
  try:
    args.seeds = list(dict.fromkeys(int(s) for s in args.seeds.split(',') if s.strip()))
  except ValueError:
    raise errors.InputError(f'--seeds {args.seeds}: expected integers like 42,43') from None
  if not args.seeds:
    raise errors.InputError('--seeds: give at least one seed')
  if args.parallel < 1:
    raise errors.InputError(f'--parallel {args.parallel}: must be at least 1')
  for flag in ('--config', '--data_dir', '--model_dir', '--seed'):
    if any(e == flag or e.startswith(flag + '=') for e in extra):
      raise errors.InputError(f'{flag} after --: set by cross_drive.py for each run')
  args.folds = args.folds.rstrip('/')
  if args.output_dir is None:
    args.output_dir = args.folds + '-runs'
  return args


def find_folds(folds_dir: str) -> list[pathlib.Path]:
  root = pathlib.Path(folds_dir)
  if not root.is_dir():
    raise errors.InputError(f'--folds {folds_dir}: no such directory')
  folds = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(FOLD_PREFIX))
  if not folds:
    raise errors.InputError(f'--folds {folds_dir}: no {FOLD_PREFIX}<drive>/ dirs; build them with '
                            'python -m tfrecords_builder.folds')
  for fold in folds:
    if not (fold / 'manifest.json').is_file():
      raise errors.InputError(f'{fold}: no manifest.json (unfinished build); rerun '
                              'python -m tfrecords_builder.folds')
  return folds


def run_one(args, fold: pathlib.Path, seed: int) -> dict:
  """Trains one (fold, seed) unless its metrics.json exists; returns its table row."""
  name = f'{fold.name}-seed{seed}'
  out = pathlib.Path(args.output_dir)
  model_dir, log_path, time_path = out / name, out / f'{name}.log', out / f'{name}.minutes'
  if not (model_dir / METRICS).is_file():
    command = [sys.executable, '-m', 'trainer.task', '--config', args.config,
               '--data_dir', str(fold), '--model_dir', str(model_dir), '--seed', str(seed),
               '--params_override=eval.every_epochs=0',
               *(['--verbose'] if args.verbose else []), *args.extra]
    print(f'{name}: training, log {log_path}', flush=True)
    start = time.perf_counter()
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(REPO), env.get('PYTHONPATH')]))
    with open(log_path, 'ab') as log:
      log.write(f'$ {" ".join(command)}\n'.encode())
      log.flush()
      code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=REPO, check=False).returncode
    if code != 0 or not (model_dir / METRICS).is_file():
      raise errors.InputError(f'{name}: trainer.task exited {code} without {METRICS}; see '
                              f'{log_path}')
    time_path.write_text(f'{(time.perf_counter() - start) / 60:.2f}\n')
  else:
    print(f'{name}: already trained ({model_dir / METRICS})', flush=True)
  try:
    metrics = json.loads((model_dir / METRICS).read_text())
    row = {'fold': fold.name.removeprefix(FOLD_PREFIX), 'seed': seed,
           'mean_iou': float(metrics['mean_iou']),
           'pixel_accuracy': float(metrics['pixel_accuracy'])}
  except (ValueError, KeyError, TypeError) as e:
    raise errors.InputError(f'{model_dir / METRICS}: unreadable ({e})') from None
  per_class = metrics.get('per_class') or {}
  for cls in THIN_CLASSES:
    entry = next((per_class[n] for n in (cls, *ALIASES[cls]) if n in per_class), None)
    row[cls] = entry.get('iou') if isinstance(entry, dict) else None
  row['minutes'] = float(time_path.read_text()) if time_path.is_file() else None
  return row


def fmt(value, width=8, digits=4):
  return f'{"-":>{width}}' if value is None else f'{value:>{width}.{digits}f}'


def print_table(rows: list[dict]) -> float:
  """Prints the runs and the mean over folds; returns the cross-drive mIoU."""
  columns = ('mIoU', 'pix_acc', *THIN_CLASSES)
  header = (f'{"fold":<10} {"seed":>5} ' + ' '.join(f'{c:>10}' for c in columns)
            + f' {"minutes":>8}')
  print(header)
  for row in rows:
    values = [row['mean_iou'], row['pixel_accuracy'], *(row[c] for c in THIN_CLASSES)]
    print(f'{row["fold"]:<10} {row["seed"]:>5} ' + ' '.join(fmt(v, 10) for v in values)
          + f' {fmt(row["minutes"], 8, 1)}')
  folds = list(dict.fromkeys(row['fold'] for row in rows))

  def fold_mean(fold, key):
    values = [r[key] for r in rows if r['fold'] == fold and r[key] is not None]
    return statistics.fmean(values) if values else None

  def cross_mean(key):
    values = [fold_mean(f, key) for f in folds]
    return statistics.fmean(values) if all(v is not None for v in values) else None

  keys = ('mean_iou', 'pixel_accuracy', *THIN_CLASSES)
  print(f'{"mean":<10} {"":>5} ' + ' '.join(fmt(cross_mean(k), 10) for k in keys)
        + f' {"":>8}')
  print(f'(mean over {len(folds)} folds of each fold\'s mean over seeds; val = the held-out '
        'drive)')
  return cross_mean('mean_iou')


def main():
  args = parse_args(sys.argv[1:])
  folds = find_folds(args.folds)
  pathlib.Path(args.output_dir).mkdir(parents=True, exist_ok=True)
  jobs = [(fold, seed) for fold in folds for seed in args.seeds]
  print(f'{len(folds)} folds x {len(args.seeds)} seeds, --config {args.config}, runs in '
        f'{args.output_dir}, {args.parallel} at a time', flush=True)
  with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
    futures = [pool.submit(run_one, args, fold, seed) for fold, seed in jobs]
    # A failed run does not stop the others (each is resumable); the first failure is reported.
    concurrent.futures.wait(futures)
  rows = [f.result() for f in futures]
  miou = print_table(rows)
  print(f'RESULT cross_drive_miou={miou:.6f}')
  return 0


if __name__ == '__main__':
  errors.run_script(main)
