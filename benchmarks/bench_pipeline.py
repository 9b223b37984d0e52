"""Training input pipeline throughput (read shards, decode, augment, batch) without the model.

    python benchmarks/bench_pipeline.py --data_dir D [--image_size 256x256] [--epochs 4]

Runs the trainer's own TrainInput (the `small` preset's augmentation at --image_size) for a few
epochs, as one dataset the way the trainer does, and reports images/s of the steady state
(epochs after the first, which also decodes the frames into the in-memory cache), twice: on all cores, and in a child process pinned to one core
(sched_setaffinity before TensorFlow starts, so every tf.data thread shares that core). Also
reports the streaming path (cache off: decode every epoch) for comparison.
Last line: RESULT images_per_s_per_core=<float>
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from camvid_common import quiet  # pylint: disable=g-import-not-at-top

quiet.start()  # Before anything imports TensorFlow: hides its load-time C++ log.

from camvid_common import errors  # pylint: disable=g-import-not-at-top
from camvid_common import sizes  # pylint: disable=g-import-not-at-top


def measure(data_dir: str, image_size: tuple[int, int], epochs: int, cache_mb: int) -> dict:
  """Images/s of the first epoch and of the later ones, in this process."""
  # pylint: disable=g-import-not-at-top
  from tfrecords_builder import manifest as manifest_lib
  from trainer import configs
  from trainer import data
  manifest = manifest_lib.read(data_dir)
  # Batch 8 whatever the preset's batch: the number stays comparable across recipe changes.
  config = configs.get_config('small').replace(**{
      'data.image_size': image_size, 'data.crop_size': None, 'data.batch_size': 8,
      'runtime.cache_decoded_mb': cache_mb})
  train_input = data.TrainInput(manifest, config)
  steps = data.steps_per_pass(manifest, 'train', config.data.batch_size, 1)
  # One dataset for all epochs, as the trainer iterates it; the first epoch is timed apart.
  # Exactly the batches the epochs hold, pulled the way the trainer pulls them (a fixed number
  # of steps, never running into the end of the dataset).
  times, images = [time.perf_counter()], 0
  iterator = iter(train_input(num_epochs=epochs))
  for step in range(1, steps * epochs + 1):
    images += int(next(iterator)['image'].shape[0])
    if step == steps:
      times.append(time.perf_counter())
  times.append(time.perf_counter())
  per_epoch = images / epochs
  return {'first': per_epoch / (times[1] - times[0]),
          'steady': (images - per_epoch) / (times[2] - times[1]),
          'cached': train_input.caches()}


def main():
  parser = errors.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--data_dir', required=True)
  parser.add_argument('--image_size', default='256x256')
  parser.add_argument('--epochs', type=int, default=4)
  parser.add_argument('--cache_mb', type=int, default=2048)
  parser.add_argument('--child_cores', type=int, default=0, help=argparse.SUPPRESS)
  quiet.add_argument(parser)
  args = parser.parse_args()
  size = sizes.parse_hxw(args.image_size, '--image_size')
  if args.child_cores:
    os.sched_setaffinity(0, set(range(args.child_cores)))
    print(json.dumps(measure(args.data_dir, size, args.epochs, args.cache_mb)))
    return
  if not os.path.exists(os.path.join(args.data_dir, 'manifest.json')):
    raise errors.InputError(f'--data_dir {args.data_dir}: no manifest.json (run tfrecords_builder)')

  def child(cores: int, cache_mb: int) -> dict:
    out = subprocess.run([sys.executable, __file__, '--data_dir', args.data_dir, '--image_size',
                          args.image_size, '--epochs', str(args.epochs), '--cache_mb',
                          str(cache_mb), '--child_cores', str(cores)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])

  cores = len(os.sched_getaffinity(0))
  print(f'machine: {cores} cores; data: {args.data_dir}; {args.image_size} crops, batch 8')
  results = {}
  for name, n, cache_mb in (('all cores, cached', cores, args.cache_mb),
                            ('1 core, cached', 1, args.cache_mb),
                            ('all cores, streamed', cores, 0),
                            ('1 core, streamed', 1, 0)):
    results[name] = r = child(n, cache_mb)
    print(f'{name:>20}: {r["steady"]:7.1f} images/s (first epoch {r["first"]:.1f}; '
          f'cache {"on" if r["cached"] else "off"})')
  per_core = results['1 core, cached']['steady']
  print(f'all cores / one core: {results["all cores, cached"]["steady"] / per_core:.2f}')
  print(f'RESULT images_per_s_per_core={per_core:.1f}')


if __name__ == '__main__':
  errors.run_script(main)
