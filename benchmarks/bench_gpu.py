"""GPU acceptance: does the `gpu` preset train at the speed its docstring computes?

    python benchmarks/bench_gpu.py [--steps 30] [--presets gpu,seed_unet]
    python benchmarks/bench_gpu.py --device cpu --steps 3     # the same code, tiny, on a CPU

For each preset it builds the trainer's own training step exactly as a run does
(trainer.segmentation.build_trainables and make_steps: the preset's model, crops, deep
supervision, weight average, optimizer, mixed precision) and trains `--steps` steps on
generated frames of the preset's crop size held on the device, after a warm-up, so the input
pipeline is not timed (bench_pipeline.py times that). It prints the precision `auto` chose,
images/s per GPU, the training FLOPs per image (TensorFlow's profiler, forward x3), the
achieved TFLOP/s and their fraction of the device's dense bf16/fp16 peak (PEAK_TFLOPS, by device
name), with XLA (jit_compile) off and on where allowed (one device), and with several GPUs the
MirroredStrategy's scaling over one. About 5 minutes on one L4 at the default steps. With
`--device cpu` the GPUs are hidden and the presets shrink to 32x48 crops of 4 filters. Last
line: RESULT gpu_images_per_s=<float>, the first preset's images/s per device, XLA off.
"""

import pathlib
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
from trainer import distribution
from trainer import segmentation

NUM_CLASSES = 11
# Dense bf16/fp16 tensor-core peaks (TFLOP/s) from the vendors' data sheets; the first name
# contained in the device's name wins.
PEAK_TFLOPS = (('H100 PCIe', 756.0), ('H100', 989.0), ('H200', 989.0), ('A100', 312.0),
               ('L40S', 362.0), ('L4', 121.0), ('A10G', 70.0), ('A10', 125.0), ('V100', 125.0),
               ('T4', 65.0))
CPU_OVERRIDES = {'data.crop_size': (32, 48), 'data.image_size': (32, 48),
                 'model.base_filters': 4, 'data.batch_size_per_replica': 2}


def peak_tflops(device_name: str) -> float | None:
  return next((peak for name, peak in PEAK_TFLOPS if name in device_name), None)


def training_flops(config) -> float:
  """Training FLOPs of one crop: the forward pass counted by TensorFlow's profiler, x3."""
  # pylint: disable=g-direct-tensorflow-import
  from tensorflow.python.profiler import model_analyzer
  from tensorflow.python.profiler import option_builder
  model = segmentation.build_model(config, NUM_CLASSES)
  crop = config.data.crop_size or config.data.image_size
  fn = tf.function(lambda x: model(x, training=False)).get_concrete_function(
      tf.TensorSpec((1, *crop, 3), tf.float32))
  options = option_builder.ProfileOptionBuilder.float_operation()
  options['output'] = 'none'
  return 3 * float(model_analyzer.profile(fn.graph, options=options).total_float_ops)


def images_per_s(config, strategy, steps: int) -> float:
  """The trainer's step under `strategy`, timed over `steps` after three warm-up steps."""
  keras.utils.set_random_seed(0)
  batch = config.data.batch_size
  crop = config.data.crop_size or config.data.image_size
  with strategy.scope():
    model, train_model, optimizer, average = segmentation.build_trainables(
        config, NUM_CLASSES, total_steps=10 * steps + 10, steps_per_epoch=steps + 3)
  spec = segmentation.inference_spec(config, [f'class{i}' for i in range(NUM_CLASSES)],
                                     np.linspace(1.0, 10.0, NUM_CLASSES))
  steps_fn = segmentation.make_steps(model, optimizer, strategy, config, spec,
                                     train_model=train_model, average=average)
  rng = np.random.default_rng(0)
  frames = {'image': rng.random((batch, *crop, 3), np.float32),
            'mask': rng.integers(0, NUM_CLASSES, (batch, *crop)).astype(np.int32)}
  dataset = tf.data.Dataset.from_tensors(frames).repeat()
  iterator = iter(strategy.experimental_distribute_dataset(
      dataset.unbatch().batch(batch, drop_remainder=True)))
  float(steps_fn.train(iterator, tf.constant(3))[0])  # Warm-up: tracing, autotuning.
  start = time.perf_counter()
  float(steps_fn.train(iterator, tf.constant(steps))[0])
  return steps * batch / (time.perf_counter() - start)


def measure(name: str, overrides: dict, devices: list, steps: int, peak: float | None) -> float:
  """Prints one preset's rows; returns its images/s per device with XLA off."""
  config = configs.override(configs.get_config(name), overrides, name)
  per_replica = config.data.batch_size_per_replica or config.data.batch_size
  one = config.replace(**{'data.batch_size': per_replica})
  flops = training_flops(one)
  rows = [('XLA off', one, tf.distribute.OneDeviceStrategy(devices[0]), 1)]
  rows.append(('XLA on', one.replace(**{'runtime.jit_compile': True}),
               tf.distribute.OneDeviceStrategy(devices[0]), 1))
  if len(devices) > 1:
    rows.append((f'{len(devices)} devices, MirroredStrategy',
                 one.replace(**{'data.batch_size': per_replica * len(devices)}),
                 tf.distribute.MirroredStrategy(devices), len(devices)))
  rates = {}
  for label, config_, strategy, count in rows:
    try:
      rate = images_per_s(config_, strategy, steps) / count
    except (tf.errors.OpError, ValueError) as e:  # XLA may not compile every op on every device.
      print(f'{name:10s} {label:32s} failed: {errors.one_line(str(e))[:200]}', flush=True)
      continue
    rates[label] = rate
    achieved = rate * flops / 1e12
    share = f'{achieved / peak:.0%} of {peak:g}' if peak else 'no peak known'
    scaling = (f'; scaling {rate * count / rates["XLA off"]:.2f}x over one device'
               if count > 1 else '')
    print(f'{name:10s} {label:32s} {rate:8.2f} images/s per device, {achieved:.4g} TFLOP/s '
          f'({share}){scaling}', flush=True)
  crop = one.data.crop_size or one.data.image_size
  print(f'{name:10s} training FLOPs per {crop[0]}x{crop[1]} image: {flops / 1e9:.4g} GFLOP; '
        f'per-device batch {per_replica}', flush=True)
  return rates['XLA off']


def main():
  parser = errors.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--device', choices=('gpu', 'cpu'), default='gpu')
  parser.add_argument('--steps', type=int, default=30)
  parser.add_argument('--presets', default='gpu,seed_unet')
  quiet.add_argument(parser)
  args = parser.parse_args()
  names = args.presets.split(',')
  unknown = [n for n in names if n not in configs.PRESETS]
  if unknown or args.steps < 1:
    raise errors.InputError(f'--presets {args.presets}: unknown {", ".join(unknown)}' if unknown
                            else f'--steps {args.steps}: must be at least 1')
  if args.device == 'cpu':
    tf.config.set_visible_devices([], 'GPU')
  gpus = tf.config.list_logical_devices('GPU')
  if args.device == 'gpu' and not gpus:
    raise errors.InputError('--device gpu: TensorFlow sees no GPU here (use --device cpu)')
  devices = [d.name for d in gpus] if args.device == 'gpu' else ['/cpu:0']
  precision = distribution.choose_precision('auto')
  keras.mixed_precision.set_global_policy(precision)
  device_name = (tf.config.experimental.get_device_details(
      tf.config.list_physical_devices('GPU')[0]).get('device_name', 'GPU')
                 if args.device == 'gpu' else 'CPU')
  peak = peak_tflops(device_name) if args.device == 'gpu' else None
  print(f'device: {len(devices)} x {device_name}; precision (auto): {precision}; '
        f'{args.steps} timed steps per row', flush=True)
  overrides = CPU_OVERRIDES if args.device == 'cpu' else {}
  rates = [measure(name, overrides, devices, args.steps, peak) for name in names]
  print(f'RESULT gpu_images_per_s={rates[0]:.3f}')


if __name__ == '__main__':
  errors.run_script(main)
