"""What a config change costs per training step: the trainer's own step with and without it.

    python benchmarks/bench_step_cost.py [--config small] [--steps 15] [--rounds 3]
        [--hparams '{"loss.aux_loss_weight": 0.0, "optimizer.ema_momentum": 0.0}']

Builds the config's training U-Net, optimizer and weight average exactly as the trainer does
(trainer.segmentation.build_trainables: crops, width, stem, deep-supervision heads, the fused
BatchNorm of one replica) twice, as the preset and with `--hparams` (a JSON object of config
overrides, as --hparams_file takes), and times the trainer's train loop
(trainer.segmentation.make_steps: forward, class-weighted losses, backward, optimizer update,
weight average, confusion matrix) one step
per call on an in-memory batch of the config's crops, so the input pipeline is not timed
(bench_pipeline.py times that). The two alternate for an untimed round, then `--rounds` rounds
of `--steps` steps, so a VM's drifting speed hits both alike; each prints its median.
Examples: the default times `small`'s deep supervision and weight average together;
'{"model.stem_stride": 1}' times the stride-2 stem. Last line: RESULT step_cost=<float>, the changed
step's median time over the preset's.
"""

import json
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from camvid_common import quiet  # pylint: disable=g-import-not-at-top

quiet.start()  # Before anything imports TensorFlow: hides its load-time C++ log.

# pylint: disable=g-import-not-at-top
import trainer  # pylint: disable=unused-import  # First: sets TensorFlow's CPU options.
import keras
import numpy as np
import tensorflow as tf

from camvid_common import errors
from trainer import configs
from trainer import segmentation

NUM_CLASSES = 11


def random_batch(config) -> tuple[tf.Tensor, tf.Tensor]:
  """In-memory images and masks of the config's training crop and batch size."""
  crop = config.data.crop_size or config.data.image_size
  rng = np.random.default_rng(0)
  return (tf.constant(rng.random((config.data.batch_size, *crop, 3), np.float32)),
          tf.constant(rng.integers(0, NUM_CLASSES, (config.data.batch_size, *crop)), tf.int32))


def make_step(config, batch):
  """One compiled step of the trainer's loop for `config` on `batch`, warmed up."""
  keras.utils.set_random_seed(0)
  model, train_model, optimizer, average = segmentation.build_trainables(
      config, NUM_CLASSES, total_steps=1000, steps_per_epoch=100)
  class_weights = np.linspace(1.0, 10.0, NUM_CLASSES).astype(np.float32)
  spec = segmentation.inference_spec(config, [f'class{i}' for i in range(NUM_CLASSES)],
                                     class_weights)
  steps = segmentation.make_steps(model, optimizer, tf.distribute.get_strategy(), config, spec,
                           train_model=train_model, average=average)
  images, masks = batch
  iterator = iter(tf.data.Dataset.from_tensors({'image': images, 'mask': masks}).repeat())
  one = tf.constant(1)

  def step():
    return steps.train(iterator, one)[0]

  for _ in range(3):
    step()
  return step


def seconds_per_step(step, steps: int) -> float:
  start = time.perf_counter()
  for _ in range(steps):
    loss = step()
  float(loss)  # Waits for the last step.
  return (time.perf_counter() - start) / steps


def compare(steps: dict, labels: dict, batch_size: int, rounds: int, num_steps: int) -> dict:
  """Alternates the steps for an untimed round, then `rounds` timed ones; prints medians."""
  times = {name: [] for name in steps}
  for round_index in range(rounds + 1):
    for name, step in steps.items():
      seconds = seconds_per_step(step, num_steps)
      if round_index:  # Round 0 only warms up: the process's first steps run slow.
        times[name].append(seconds)
  medians = {}
  for name in steps:
    medians[name] = median = statistics.median(times[name])
    print(f'{labels[name]:40s} {1e3 * median:7.1f} ms/step, {batch_size / median:6.2f} '
          f'images/s (rounds: {", ".join(f"{1e3 * t:.1f}" for t in times[name])} ms)',
          flush=True)
  return medians


def main():
  parser = errors.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='small', choices=sorted(configs.PRESETS))
  parser.add_argument('--steps', type=int, default=15)
  parser.add_argument('--rounds', type=int, default=3)
  # A change the preset already holds would time the preset against itself.
  parser.add_argument('--hparams', default='{"loss.aux_loss_weight": 0.0, "optimizer.ema_momentum": 0.0}',
                      help='JSON object of config overrides')
  quiet.add_argument(parser)
  args = parser.parse_args()
  base = configs.get_config(args.config)
  try:
    overrides = json.loads(args.hparams)
  except json.JSONDecodeError as e:
    raise errors.InputError(f'--hparams: not valid JSON ({e})') from None
  try:
    changed = configs.override(base, overrides, '--hparams')
    configs.validate(changed)
  except ValueError as e:
    raise errors.InputError(str(e)) from None
  batch = random_batch(base)
  crop = batch[1].shape[1:]
  print(f'machine: {os.cpu_count()} cores; config {args.config}: {crop[0]}x{crop[1]} crops, '
        f'batch {base.data.batch_size}, oneDNN {os.environ["TF_ENABLE_ONEDNN_OPTS"]}; changed: '
        f'{args.hparams}; {args.rounds} alternating rounds of {args.steps} steps')
  steps = {'base': make_step(base, batch), 'changed': make_step(changed, batch)}
  medians = compare(steps, {'base': f'trainer step, {args.config}', 'changed': 'with the change'},
                    base.data.batch_size, args.rounds, args.steps)
  print(f'RESULT step_cost={medians["changed"] / medians["base"]:.3f}')


if __name__ == '__main__':
  errors.run_script(main)
