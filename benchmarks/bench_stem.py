"""What the stride-2 stem (`stem_stride`) saves: one training step of the same U-Net with and without it.

    python benchmarks/bench_stem.py [--base_filters 16] [--depth 4] [--batch 4] [--steps 12]

For each (stem_stride, crop) row it builds the model with trainer.model.build_unet, compiles it
with AdamW and sparse cross-entropy, and times `train_on_batch` on in-memory tensors after three
warm-up steps (no data pipeline: this isolates the model's cost). The rows are the previous
`small` (no stem, 128x128 crops), the same U-Net behind the stem at the same crops, and the
current `small` (stem, 192x192 crops). Last line: RESULT stem_speedup_same_crop=<float>, the
per-image speed-up of the stem at 128x128 crops.
"""

import os
import pathlib
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# pylint: disable=g-import-not-at-top
import trainer  # pylint: disable=unused-import  # First: sets TensorFlow's CPU options.
import keras
import numpy as np

from camvid_common import errors
from trainer import model as model_lib

NUM_CLASSES = 11


def images_per_second(stem_stride: int, crop: int, args) -> tuple[float, int]:
  model = model_lib.build_unet(NUM_CLASSES, image_size=(crop, crop),
                               base_filters=args.base_filters, depth=args.depth, dropout=0.0,
                               bn_momentum=0.9, any_size=True, stem_stride=stem_stride)
  model.compile(optimizer=keras.optimizers.AdamW(1e-3),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  rng = np.random.default_rng(0)
  x = rng.random((args.batch, crop, crop, 3), np.float32)
  y = rng.integers(0, NUM_CLASSES, (args.batch, crop, crop)).astype(np.int32)
  for _ in range(3):
    model.train_on_batch(x, y)
  start = time.perf_counter()
  for _ in range(args.steps):
    model.train_on_batch(x, y)
  seconds = (time.perf_counter() - start) / args.steps
  return args.batch / seconds, model.count_params()


def main():
  parser = errors.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--base_filters', type=int, default=16)
  parser.add_argument('--depth', type=int, default=4)
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--steps', type=int, default=12)
  args = parser.parse_args()
  print(f'machine: {os.cpu_count()} cores; U-Net base {args.base_filters}, depth {args.depth}, '
        f'batch {args.batch}, oneDNN {os.environ["TF_ENABLE_ONEDNN_OPTS"]}')
  rates = {}
  for stem_stride, crop in ((1, 128), (2, 128), (2, 192)):
    rate, params = images_per_second(stem_stride, crop, args)
    rates[stem_stride, crop] = rate
    print(f'stem_stride {stem_stride}, {crop}x{crop} crops: {rate:6.1f} images/s, '
          f'{rate * crop * crop / 1e3:6.0f} kpixel/s ({params:,} parameters)', flush=True)
  print(f'RESULT stem_speedup_same_crop={rates[2, 128] / rates[1, 128]:.2f}')


if __name__ == '__main__':
  errors.run_script(main)
