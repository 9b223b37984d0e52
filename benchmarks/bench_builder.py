"""Builder throughput on real 480x360 CamVid frames with 1 and 2 worker processes.

    python benchmarks/bench_builder.py [--input_dir ../shared/data/camvid-segnet] [--repeats 2]

Times whole builds (listing, decode, colour/index mapping, PNG encode, TFRecord write, manifest)
into fresh temporary dirs; reports the best of --repeats per worker count. Last line:
RESULT builder_speedup_2_workers=<float>
"""

import argparse
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from tfrecords_builder import writer  # pylint: disable=g-import-not-at-top

DEFAULT_INPUT = pathlib.Path(__file__).resolve().parents[2] / 'shared/data/camvid-segnet'


def best_rate(input_dir: str, num_workers: int, repeats: int) -> tuple[float, int]:
  rates = []
  for _ in range(repeats):
    with tempfile.TemporaryDirectory() as out:
      start = time.perf_counter()
      manifest = writer.build(input_dir, out, num_workers=num_workers, log=lambda *_: None)
      seconds = time.perf_counter() - start
    n = sum(s['num_examples'] for s in manifest['splits'].values())
    rates.append(n / seconds)
  return max(rates), n


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--input_dir', default=str(DEFAULT_INPUT))
  parser.add_argument('--repeats', type=int, default=2)
  args = parser.parse_args()
  if not pathlib.Path(args.input_dir, 'train').is_dir() and not args.input_dir.startswith('gs://'):
    sys.exit(f'error: --input_dir {args.input_dir}: no CamVid frames there')
  print(f'machine: {os.cpu_count()} cores; input: {args.input_dir}')
  rates = {}
  for workers in (1, 2):
    rates[workers], n = best_rate(args.input_dir, workers, args.repeats)
    print(f'{workers} worker(s): {n} examples, {rates[workers]:.1f} examples/s '
          f'(best of {args.repeats})')
  print(f'RESULT builder_speedup_2_workers={rates[2] / rates[1]:.3f}')


if __name__ == '__main__':
  main()
