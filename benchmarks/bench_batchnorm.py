"""What the fused batch-norm kernel saves: `small`'s training step with Keras' and the fused BN.

    python benchmarks/bench_batchnorm.py [--config small] [--steps 15] [--rounds 3]

Builds the config's training U-Net (its crops, batch and width) with trainer.model.build_unet
twice, with keras.layers.BatchNormalization and with model.FusedBatchNormalization, and times
one compiled training step (forward, cross-entropy, backward, AdamW update: what the trainer's
loop runs, without its input pipeline) on in-memory tensors, after three warm-up steps. The two
alternate for an untimed round, then `--rounds` rounds of `--steps` steps, so a VM's drifting
speed hits both alike; each prints its median. Last line: RESULT fused_bn_speedup=<float>, the Keras layer's median
step time over the fused one's.
"""

import argparse
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# pylint: disable=g-import-not-at-top
import trainer  # pylint: disable=unused-import  # First: sets TensorFlow's CPU options.
import keras
import numpy as np
import tensorflow as tf

from camvid_common import errors
from trainer import averaging
from trainer import configs
from trainer import model as model_lib

NUM_CLASSES = 11


def make_step(config, fused: bool, batch, average_momentum: float = 0.0):
  """A compiled training step of the config's U-Net; Keras BN or the fused kernel.

  With `average_momentum`, the step also updates a trainer.averaging.WeightAverage of the
  weights after the optimizer step, as the trainer's loop does (bench_averaging.py).
  """
  keras.utils.set_random_seed(0)
  model = model_lib.build_unet(NUM_CLASSES, image_size=config.data.image_size,
                               base_filters=config.model.base_filters, depth=config.model.depth,
                               dropout=config.model.dropout, bn_momentum=config.model.bn_momentum,
                               any_size=True, stem_stride=config.model.stem_stride,
                               fused_batchnorm=fused)
  optimizer = keras.optimizers.AdamW(config.optimizer.learning_rate)
  average = averaging.WeightAverage(model, average_momentum) if average_momentum else None
  images, masks = batch

  @tf.function
  def step():
    with tf.GradientTape() as tape:
      logits = model(images, training=True)
      loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(masks, logits))
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    if average is not None:
      average.update(optimizer.iterations)
    return loss

  for _ in range(3):
    step()
  return step


def seconds_per_step(step, steps: int) -> float:
  start = time.perf_counter()
  for _ in range(steps):
    loss = step()
  float(loss)  # Waits for the last step.
  return (time.perf_counter() - start) / steps


def parse_args(description: str) -> argparse.Namespace:
  parser = errors.ArgumentParser(description=description)
  parser.add_argument('--config', default='small', choices=sorted(configs.PRESETS))
  parser.add_argument('--steps', type=int, default=15)
  parser.add_argument('--rounds', type=int, default=3)
  return parser.parse_args()


def random_batch(config) -> tuple[tf.Tensor, tf.Tensor]:
  """In-memory images and masks of the config's training crop and batch size."""
  crop = config.data.crop_size or config.data.image_size
  rng = np.random.default_rng(0)
  return (tf.constant(rng.random((config.data.batch_size, *crop, 3), np.float32)),
          tf.constant(rng.integers(0, NUM_CLASSES, (config.data.batch_size, *crop)), tf.int32))


def compare(steps: dict, labels: dict, config, args) -> dict:
  """Alternates the steps for an untimed round, then args.rounds timed ones; prints medians.

  Returns {name: median seconds per step}.
  """
  times = {name: [] for name in steps}
  for round_index in range(args.rounds + 1):
    for name, step in steps.items():
      seconds = seconds_per_step(step, args.steps)
      if round_index:  # Round 0 only warms up: the process's first steps run slow.
        times[name].append(seconds)
  medians = {}
  for name in steps:
    medians[name] = median = statistics.median(times[name])
    print(f'{labels[name]:40s} {1e3 * median:7.1f} ms/step, '
          f'{config.data.batch_size / median:6.2f} images/s '
          f'(rounds: {", ".join(f"{1e3 * t:.1f}" for t in times[name])} ms)', flush=True)
  return medians


def main():
  args = parse_args(__doc__.splitlines()[0])
  config = configs.get_config(args.config)
  batch = random_batch(config)
  crop = batch[1].shape[1:]
  print(f'machine: {os.cpu_count()} cores; config {args.config}: {crop[0]}x{crop[1]} crops, '
        f'batch {config.data.batch_size}, oneDNN {os.environ["TF_ENABLE_ONEDNN_OPTS"]}; '
        f'{args.rounds} alternating rounds of {args.steps} steps')
  steps = {'keras': make_step(config, False, batch), 'fused': make_step(config, True, batch)}
  medians = compare(steps, {'keras': 'keras.layers.BatchNormalization',
                            'fused': 'FusedBatchNormalization (fused kernel)'}, config, args)
  print(f'RESULT fused_bn_speedup={medians["keras"] / medians["fused"]:.2f}')


if __name__ == '__main__':
  errors.run_script(main)
