"""Builder throughput on real 480x360 CamVid frames with 1 and 2 worker processes.

    python benchmarks/bench_builder.py [--input_dir ../shared/data/camvid-segnet] [--repeats 5]

Times whole builds (listing, decode, colour/index mapping, PNG encode, TFRecord write, manifest)
into fresh temporary dirs. Each repeat runs a 1-worker and a 2-worker build back to back and
takes their ratio, so a slow (or turbo-boosted) spell of a shared VM affects both sides of a
ratio alike; the speed-up reported is the median of those paired ratios.

For context it also measures the machine's own ceiling: the same per-example encoding split
statically over 2 forked processes, with no pool, no writing and no coordination, against one
process. A builder speed-up close to that ceiling has no overhead left to remove.
Last line: RESULT builder_speedup_2_workers=<float>
"""

import multiprocessing
import os
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from camvid_common import quiet  # pylint: disable=g-import-not-at-top

quiet.start()  # Before anything imports TensorFlow: hides its load-time C++ log.

from camvid_common import errors  # pylint: disable=g-import-not-at-top
from tfrecords_builder import layouts  # pylint: disable=g-import-not-at-top
from tfrecords_builder import writer  # pylint: disable=g-import-not-at-top

DEFAULT_INPUT = pathlib.Path(__file__).resolve().parents[2] / 'shared/data/camvid-segnet'


def build_rate(input_dir: str, num_workers: int) -> tuple[float, int]:
  with tempfile.TemporaryDirectory() as out:
    start = time.perf_counter()
    manifest = writer.build(input_dir, out, num_workers=num_workers, log=lambda *_: None)
    seconds = time.perf_counter() - start
  n = sum(s['num_examples'] for s in manifest['splits'].values())
  return n / seconds, n


def _encode_all(items):
  for item in items:
    writer.encode_pair(*item)


def ceiling_ratio(items) -> float:
  """Speed-up of a static 2-process split of the encoding work over one process."""
  start = time.perf_counter()
  _encode_all(items)
  serial = time.perf_counter() - start
  context = multiprocessing.get_context('fork')
  processes = [context.Process(target=_encode_all, args=(items[i::2],)) for i in range(2)]
  start = time.perf_counter()
  for p in processes:
    p.start()
  for p in processes:
    p.join()
  return serial / (time.perf_counter() - start)


def main():
  parser = errors.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--input_dir', default=str(DEFAULT_INPUT))
  parser.add_argument('--repeats', type=int, default=5)
  quiet.add_argument(parser)
  args = parser.parse_args()
  if not pathlib.Path(args.input_dir, 'train').is_dir() and not args.input_dir.startswith('gs://'):
    raise errors.InputError(f'--input_dir {args.input_dir}: no CamVid frames there')
  print(f'machine: {os.cpu_count()} cores; input: {args.input_dir}')
  dataset = layouts.discover(args.input_dir, None)
  items = [(pair, dataset.layout, dataset.table, writer.Options())
           for pairs in dataset.splits.values() for pair in pairs]
  build_rate(args.input_dir, 2)  # Warm-up: page cache, lazy imports.
  rates, ratios, ceilings = {1: [], 2: []}, [], []
  for _ in range(args.repeats):
    for workers in rates:
      value, n = build_rate(args.input_dir, workers)
      rates[workers].append(value)
    ratios.append(rates[2][-1] / rates[1][-1])
    ceilings.append(ceiling_ratio(items))
  for workers, values in rates.items():
    print(f'{workers} worker(s): {n} examples, median {statistics.median(values):.1f} '
          f'examples/s (best {max(values):.1f}, {args.repeats} builds)')
  print('paired speed-ups: ' + ', '.join(f'{r:.2f}' for r in ratios))
  print(f'machine ceiling (static 2-process split of the encoding, no I/O): median '
        f'{statistics.median(ceilings):.2f} (' + ', '.join(f'{c:.2f}' for c in ceilings) + ')')
  print(f'RESULT builder_speedup_2_workers={statistics.median(ratios):.3f}')


if __name__ == '__main__':
  errors.run_script(main)
