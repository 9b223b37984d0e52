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

import os

import bench_batchnorm  # Same directory; sets TensorFlow's CPU options through `trainer`.

from camvid_common import errors
from trainer import configs

MOMENTUM = 0.999


def main():
  args = bench_batchnorm.parse_args(__doc__.splitlines()[0])
  config = configs.get_config(args.config)
  batch = bench_batchnorm.random_batch(config)
  crop = batch[1].shape[1:]
  print(f'machine: {os.cpu_count()} cores; config {args.config}: {crop[0]}x{crop[1]} crops, '
        f'batch {config.data.batch_size}; ema momentum {MOMENTUM}; '
        f'{args.rounds} alternating rounds of {args.steps} steps')
  steps = {'plain': bench_batchnorm.make_step(config, True, batch),
           'averaged': bench_batchnorm.make_step(config, True, batch, MOMENTUM)}
  medians = bench_batchnorm.compare(steps, {'plain': 'plain step',
                                            'averaged': 'step + weight average update'},
                                    config, args)
  print(f'RESULT averaging_step_cost={medians["averaged"] / medians["plain"]:.3f}')


if __name__ == '__main__':
  errors.run_script(main)
