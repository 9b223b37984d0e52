"""Runs a few real training steps on fixed examples under one strategy and saves the weights.

    python tests/equivalence_worker.py --mode single|multi --out W.npz [--steps 3 --batch 4]

Used by tests/test_distributed.py: the same global batches through the trainer's own step
function under the default strategy (one replica, fused batch norm) and under a 2-worker
MultiWorkerMirroredStrategy (TF_CONFIG set by the test; synchronised batch norm) must give the
same weights.
"""

import argparse
import os
import pathlib
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import keras  # pylint: disable=g-import-not-at-top
import numpy as np
import tensorflow as tf

from trainer import configs, distribution, segmentation
from trainer import model as model_lib

NUM_CLASSES = 4


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--mode', choices=['single', 'multi'], required=True)
  parser.add_argument('--out', required=True)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--batch', type=int, default=4)
  args = parser.parse_args()
  config = configs.get_config('smoke').replace(**{
      'model.dropout': 0.0, 'model.sync_batchnorm': True, 'optimizer.lr_schedule': 'constant',
      'optimizer.learning_rate': 0.1, 'optimizer.name': 'sgd', 'data.batch_size': args.batch})
  runtime = distribution.create_runtime('multi_worker' if args.mode == 'multi' else 'default',
                                        'float32', timeout_seconds=120)
  strategy = runtime.strategy
  rng = np.random.default_rng(0)
  n = args.steps * args.batch
  images = rng.random((n, *config.data.image_size, 3), dtype=np.float32)
  masks = rng.integers(0, NUM_CLASSES, (n, *config.data.image_size)).astype(np.uint8)
  masks[:, :6, :5] = 255  # Void pixels, unevenly spread over examples below.
  masks[1::3, 10:, :] = 255
  keras.utils.set_random_seed(0)
  with strategy.scope():
    # The training model: fused batch norm on one replica, synchronised Keras BN on two; the
    # two must agree.
    model = segmentation.build_model(config, NUM_CLASSES, training=True)
    optimizer = segmentation.make_optimizer(config, args.steps, args.steps)
    optimizer.build(model.trainable_variables)
  spec = segmentation.inference_spec(config, [f'class{i}' for i in range(NUM_CLASSES)],
                              class_weights=[1.0, 2.0, 0.5, 1.5])
  steps = segmentation.make_steps(model, optimizer, strategy, config, spec)

  def dataset_fn(ctx):
    per_replica = ctx.get_per_replica_batch_size(args.batch)
    first = ctx.input_pipeline_id * per_replica
    index = [s * args.batch + first + j for s in range(args.steps) for j in range(per_replica)]
    return tf.data.Dataset.from_tensor_slices(
        {'image': images[index], 'mask': masks[index]}).batch(per_replica)

  iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
  loss_sum, weight_sum, *_ = steps.train(iterator, tf.constant(args.steps))
  fused = sum(isinstance(l, model_lib.FusedBatchNormalization) for l in model.layers)
  print(f'loss {float(loss_sum) / max(float(weight_sum), 1e-6):.6f} replicas {runtime.num_replicas} '
        f'fused_bn {fused}')
  if runtime.is_chief:
    np.savez(args.out, *[np.asarray(w) for w in model.weights])


if __name__ == '__main__':
  main()
