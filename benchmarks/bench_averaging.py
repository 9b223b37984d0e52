"""What the weight average (`ema_momentum`) costs: `small`'s training step with and without it.

    python benchmarks/bench_averaging.py [--config small] [--steps 15] [--rounds 3]

Builds the config's training U-Net (its crops, batch and width, the fused BatchNorm the trainer
uses on one replica) twice with the same initial weights and times one compiled training step
(forward, cross-entropy, backward, AdamW update) on in-memory tensors, once plain and once
followed by the trainer.averaging.WeightAverage update the train loop runs after every step
(a read-modify-write of every weight, BatchNorm statistics included). The step is
bench_batchnorm.py's; the two alternate for an untimed round, then `--rounds` rounds of
`--steps` steps, each prints its median. Last line: RESULT averaging_step_cost=<float>, the
averaged step's median time over the plain one's.
"""

import argparse
import os
import statistics

import bench_batchnorm  # Same directory; sets TensorFlow's CPU options through `trainer`.
import numpy as np
import tensorflow as tf

from trainer import configs

MOMENTUM = 0.999


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='small', choices=sorted(configs.PRESETS))
  parser.add_argument('--steps', type=int, default=15)
  parser.add_argument('--rounds', type=int, default=3)
  args = parser.parse_args()
  config = configs.get_config(args.config)
  crop = config.crop_size or config.image_size
  classes = bench_batchnorm.NUM_CLASSES
  rng = np.random.default_rng(0)
  batch = (tf.constant(rng.random((config.batch_size, *crop, 3), np.float32)),
           tf.constant(rng.integers(0, classes, (config.batch_size, *crop)), tf.int32))
  print(f'machine: {os.cpu_count()} cores; config {args.config}: {crop[0]}x{crop[1]} crops, '
        f'batch {config.batch_size}; ema momentum {MOMENTUM}; '
        f'{args.rounds} alternating rounds of {args.steps} steps')
  steps = {'plain': bench_batchnorm.make_step(config, True, batch),
           'averaged': bench_batchnorm.make_step(config, True, batch, MOMENTUM)}
  times = {name: [] for name in steps}
  for round_index in range(args.rounds + 1):
    for name, step in steps.items():
      seconds = bench_batchnorm.seconds_per_step(step, args.steps)
      if round_index:  # Round 0 only warms up.
        times[name].append(seconds)
  for name in steps:
    median = statistics.median(times[name])
    print(f'{name:10s} {1e3 * median:7.1f} ms/step, {config.batch_size / median:6.2f} images/s '
          f'(rounds: {", ".join(f"{1e3 * t:.1f}" for t in times[name])} ms)', flush=True)
  cost = statistics.median(times['averaged']) / statistics.median(times['plain'])
  print(f'RESULT averaging_step_cost={cost:.3f}')


if __name__ == '__main__':
  main()
