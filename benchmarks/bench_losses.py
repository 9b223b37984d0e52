"""What the training loss costs: forward and backward of each loss at `small`'s logits shape.

    python benchmarks/bench_losses.py [--batch 4] [--size 192] [--classes 11] [--steps 30]

Times one `tf.function` computing a loss and its gradient with respect to random logits
[batch, size, size, classes] (random labels, a few void rows, class weights), after three
warm-up calls; median of three rounds of `--steps` calls. Rows: TensorFlow's fused
`sparse_softmax_cross_entropy_with_logits` kernel and the trainer's cross-entropy (a gather
from one log-softmax). Last line: RESULT kernel_vs_gather_ce=<float>, the fused kernel's time
over the trainer's cross-entropy's.
"""

import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# pylint: disable=g-import-not-at-top
import trainer  # pylint: disable=unused-import  # First: sets TensorFlow's CPU options.
import numpy as np
import tensorflow as tf

from camvid_common import errors
from trainer import losses


def milliseconds(fn, logits, steps: int) -> float:
  @tf.function
  def step():
    with tf.GradientTape() as tape:
      value = fn(logits)
    return value, tape.gradient(value, logits)

  for _ in range(3):
    step()
  rounds = []
  for _ in range(3):
    start = time.perf_counter()
    for _ in range(steps):
      step()
    rounds.append((time.perf_counter() - start) / steps * 1e3)
  return statistics.median(rounds)


def main():
  parser = errors.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--size', type=int, default=192)
  parser.add_argument('--classes', type=int, default=11)
  parser.add_argument('--steps', type=int, default=30)
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  labels = rng.integers(0, args.classes, (args.batch, args.size, args.size))
  labels[0, :args.size // 10] = 255
  labels = tf.constant(labels, tf.uint8)
  logits = tf.Variable(rng.normal(size=(args.batch, args.size, args.size, args.classes)),
                       dtype=tf.float32)
  weights = tf.constant(np.linspace(0.5, 6.0, args.classes), tf.float32)

  def kernel_ce(g):
    valid = labels != 255
    safe = tf.where(valid, tf.cast(labels, tf.int32), 0)
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=safe, logits=g)
    pixel_weights = tf.gather(weights, safe) * tf.cast(valid, tf.float32)
    return tf.reduce_sum(pixel_weights * ce) / tf.reduce_sum(pixel_weights)

  def gather_ce(g):
    return losses.mean_pixel_loss(labels, g, class_weights=weights)

  rows = [('fused sparse softmax cross-entropy kernel', kernel_ce),
          ('trainer cross-entropy (gather from log-softmax)', gather_ce)]
  print(f'logits {args.batch}x{args.size}x{args.size}x{args.classes}, forward + backward, '
        f'median of 3 rounds of {args.steps} calls')
  times = {}
  for name, fn in rows:
    times[name] = milliseconds(fn, logits, args.steps)
    print(f'{name:55s} {times[name]:7.1f} ms')
  print(f'RESULT kernel_vs_gather_ce={times[rows[0][0]] / times[rows[1][0]]:.3f}')


if __name__ == '__main__':
  errors.run_script(main)
