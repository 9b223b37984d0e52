"""What a config change costs per training step: the trainer's own step with and without it.

    python benchmarks/bench_step_cost.py [--config small] [--steps 15] [--rounds 3]
        [--hparams '{"aux_loss_weight": 0.0, "ema_momentum": 0.0}']

Builds the config's training U-Net, optimizer and weight average as the trainer does
(trainer.train.build_trainables: crops, width, deep-supervision heads, the fused BatchNorm of
one replica) twice, as the preset and with `--hparams` (JSON, the trainer's --hparams_file
fields, e.g. aux_loss_weight for deep supervision, ema_momentum, crop_size), and times
the train loop of trainer.train.make_steps (forward, class-weighted losses, backward, AdamW
update, weight average, confusion matrix) one step per call on an in-memory batch of the
config's crops. The two alternate for an untimed round, then `--rounds` rounds of `--steps`
steps, each prints its median (bench_batchnorm.py's comparison). Last line: RESULT
step_cost=<float>, the changed step's median time over the preset's.
"""

import json
import os

import bench_batchnorm  # Same directory; sets TensorFlow's CPU options through `trainer`.
import keras
import numpy as np
import tensorflow as tf

from camvid_common import errors
from trainer import configs
from trainer import train


def make_step(config, batch):
  """One compiled step of the trainer's loop for `config` on `batch`, repeated."""
  keras.utils.set_random_seed(0)
  num_classes = bench_batchnorm.NUM_CLASSES
  model, train_model, optimizer, average = train.build_trainables(
      config, num_classes, total_steps=1000, steps_per_epoch=100)
  class_weights = np.linspace(1.0, 10.0, num_classes).astype(np.float32)
  spec = train.inference_spec(config, [f'class{i}' for i in range(num_classes)], class_weights)
  steps = train.make_steps(model, optimizer, tf.distribute.get_strategy(), config, spec,
                           train_model=train_model, average=average)
  images, masks = batch
  iterator = iter(tf.data.Dataset.from_tensors({'image': images, 'mask': masks}).repeat())
  one = tf.constant(1)

  def step():
    return steps.train(iterator, one)[0]

  for _ in range(3):
    step()
  return step


def main():
  parser = errors.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='small', choices=sorted(configs.PRESETS))
  parser.add_argument('--steps', type=int, default=15)
  parser.add_argument('--rounds', type=int, default=3)
  # The default times what `small`'s deep supervision and weight average cost (it has both);
  # a change the preset already holds would time the preset against itself.
  parser.add_argument('--hparams',
                      default='{"loss.aux_loss_weight": 0.0, "optimizer.ema_momentum": 0.0}',
                      help='JSON object of config fields to change (dotted, nested or flat '
                      'keys, as --hparams_file)')
  args = parser.parse_args()
  base = configs.get_config(args.config)
  changed = configs.override(base, json.loads(args.hparams), '--hparams')
  configs.validate(changed)
  batch = bench_batchnorm.random_batch(base)
  crop = batch[1].shape[1:]
  print(f'machine: {os.cpu_count()} cores; config {args.config}: {crop[0]}x{crop[1]} crops, '
        f'batch {base.data.batch_size}; changed: {args.hparams}; '
        f'{args.rounds} alternating rounds of {args.steps} steps')
  steps = {'base': make_step(base, batch), 'changed': make_step(changed, batch)}
  medians = bench_batchnorm.compare(
      steps, {'base': f'trainer step, {args.config}', 'changed': 'with the change'}, base, args)
  print(f'RESULT step_cost={medians["changed"] / medians["base"]:.3f}')


if __name__ == '__main__':
  errors.run_script(main)
