"""The real trainer's training speed against a bare `model.fit` of the same model, in one run.

    python benchmarks/bench_trainer.py [--data_dir D] [--config small] [--steps 20]

Trainer: `trainer.train.run` exactly as `python -m trainer.task` runs it (TFRecords, the tf.data
pipeline with augmentation, the distributed step loop, per-loop host sync, metrics, backups,
TensorBoard), for 2 epochs of --steps steps; its speed is the second epoch's
`train_images_per_s` from history.csv (the first includes tracing and filling the frame cache).
Bare: the same Keras model from the same builder, compiled with the same optimizer and a plain
sparse cross-entropy, `model.fit` on in-memory tensors of the same shape, after a warm-up fit.
Without --data_dir it builds TFRecords of generated 480x360 scenes in a temporary dir.

It also reports the achieved training FLOP/s (forward FLOPs from TensorFlow's graph profiler,
times 3 for forward + backward) against this machine's measured float32 matmul FLOP/s.
Last line: RESULT trainer_vs_bare_fit=<float>
"""

import csv
import os
import pathlib
import sys
import tempfile
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
from tfrecords_builder import manifest as manifest_lib
from tfrecords_builder import synthetic
from tfrecords_builder import writer
from trainer import configs
from trainer import segmentation
from trainer import train


def generated_data(root: str) -> str:
  scenes, out = os.path.join(root, 'scenes'), os.path.join(root, 'tfrecords')
  synthetic.generate(scenes, 'segnet', {'train': 64, 'val': 8}, (480, 360))
  writer.build(scenes, out, log=lambda *_: None)
  return out


def trainer_rate(config, data_dir: str, model_dir: str) -> float:
  train.run(config, data_dir, model_dir, log=lambda *_: None, export=False)
  with open(os.path.join(model_dir, 'history.csv')) as f:
    rows = list(csv.DictReader(f))
  return float(rows[-1]['train_images_per_s'])


def bare_fit_rate(config, num_classes: int, steps: int) -> tuple[float, keras.Model]:
  model = segmentation.build_model(config, num_classes, training=True)
  model.compile(optimizer=keras.optimizers.AdamW(config.optimizer.learning_rate),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  rng = np.random.default_rng(0)
  n = steps * config.data.batch_size
  size = config.data.crop_size or config.data.image_size  # What the trainer's steps see.
  x = rng.random((n, *size, 3), np.float32)
  y = rng.integers(0, num_classes, (n, *size)).astype(np.int32)
  batch = config.data.batch_size
  model.fit(x[:2 * batch], y[:2 * batch], batch_size=batch, epochs=1, verbose=0)
  start = time.perf_counter()
  model.fit(x, y, batch_size=batch, epochs=1, verbose=0, shuffle=False)
  return n / (time.perf_counter() - start), model


def forward_flops(model: keras.Model, image_size) -> float:
  """Forward FLOPs of one image, counted by TensorFlow's graph profiler (a multiply-add = 2)."""
  # pylint: disable=g-direct-tensorflow-import
  from tensorflow.python.profiler import model_analyzer
  from tensorflow.python.profiler import option_builder
  fn = tf.function(lambda x: model(x, training=False)).get_concrete_function(
      tf.TensorSpec((1, *image_size, 3), tf.float32))
  options = option_builder.ProfileOptionBuilder.float_operation()
  options['output'] = 'none'
  return float(model_analyzer.profile(fn.graph, options=options).total_float_ops)


def matmul_flops_per_s(size: int = 2048, repeats: int = 20) -> float:
  a = tf.random.normal([size, size])
  b = tf.random.normal([size, size])
  matmul = tf.function(tf.matmul)
  matmul(a, b).numpy()
  start = time.perf_counter()
  for _ in range(repeats):
    c = matmul(a, b)
  c.numpy()
  return 2 * size**3 * repeats / (time.perf_counter() - start)


def main():
  parser = errors.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--data_dir', help='tfrecords_builder output (default: generated scenes)')
  parser.add_argument('--config', default='small')
  parser.add_argument('--steps', type=int, default=20, help='training steps per epoch')
  quiet.add_argument(parser)
  args = parser.parse_args()
  config = configs.get_config(args.config).replace(**{
      'trainer.epochs': 2, 'steps_per_epoch': args.steps, 'eval.num_summary_images': 1,
      'trainer.early_stopping_patience': None})
  with tempfile.TemporaryDirectory() as tmp:
    data_dir = args.data_dir or generated_data(tmp)
    manifest = manifest_lib.read(data_dir)
    size = config.data.crop_size or config.data.image_size
    print(f'oneDNN kernels: TF_ENABLE_ONEDNN_OPTS={os.environ["TF_ENABLE_ONEDNN_OPTS"]}')
    print(f'machine: {os.cpu_count()} cores; preset {args.config}: {size[0]}x{size[1]} training '
          f'inputs, batch {config.data.batch_size}; {args.steps} steps per epoch')
    trainer = trainer_rate(config, data_dir, os.path.join(tmp, 'model'))
    bare, model = bare_fit_rate(config, manifest.num_classes, args.steps)
  flops = 3 * forward_flops(model, config.data.crop_size or config.data.image_size)
  peak = matmul_flops_per_s()
  print(f'trainer (python -m trainer.task loop): {trainer:.2f} images/s')
  print(f'bare model.fit, in-memory tensors:     {bare:.2f} images/s')
  print(f'training FLOPs per image (fwd x3): {flops / 1e9:.2f} GFLOP; trainer achieves '
        f'{trainer * flops / 1e9:.1f} GFLOP/s = {trainer * flops / peak:.0%} of measured '
        f'float32 matmul {peak / 1e9:.1f} GFLOP/s')
  print(f'RESULT trainer_vs_bare_fit={trainer / bare:.3f}')


if __name__ == '__main__':
  errors.run_script(main)
