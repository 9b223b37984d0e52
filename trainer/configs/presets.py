"""Named presets. Each docstring gives the command that runs it and its measured result; the
experiments behind them are in docs/experiments.md.

A preset is a function returning a Config (base.ExperimentConfig) built from its groups; a field
a preset does not name keeps its default.
"""

from trainer.configs.base import (Config, DataConfig, EvalConfig, LossConfig, ModelConfig,
                                  OptimizerConfig, RuntimeConfig, TrainerConfig)


def seed_unet() -> Config:
  """The original notebook's U-Net, layer for layer: 256x256 input, 64..1024 filters, dropout 0.5.

  For GPU clusters (docs/benchmarks.md "GPU: computed cost", docs/distributed.md).
  Command:
    python -m trainer.task --config seed_unet --data_dir gs://B/camvid --model_dir gs://B/runs/seed
  Result: 34,543,179 parameters for 11 classes, ~2.5 TFLOP per training step of 8 images; not
  yet trained to convergence (docs/experiments.md).
  """
  return Config(model=ModelConfig(base_filters=64, depth=4, dropout=0.5),
                data=DataConfig(image_size=(256, 256), batch_size=8),
                optimizer=OptimizerConfig(learning_rate=1e-3),
                trainer=TrainerConfig(epochs=60))


def small() -> Config:
  """A fast U-Net for 2-core CPUs: the best quality on unseen drives within a 30-minute budget.

  Command:
    python -m trainer.task --config small --data_dir D --model_dir M
  Result (real CamVid SegNet split): cross-drive mIoU 0.345 (seeds 42 and 7, final weights;
  scripts/cross_drive.py; 0.304 without data.standardize); val mIoU / pixel accuracy
  0.6502 / 0.9270 (seed 42); 28.4 minutes for the whole command on a quiet 2-core CPU VM.
  Each choice was measured: docs/experiments.md (per-frame standardization: the cross-drive
  section).
  """
  return Config(
      model=ModelConfig(base_filters=16, depth=4, dropout=0.0, stem_stride=2, bn_momentum=0.9),
      data=DataConfig(image_size=(288, 384), crop_size=(192, 192), batch_size=4, scale_min=1.0,
                      scale_max=1.0, brightness=0.0, contrast=0.0, saturation=0.0,
                      standardize=True),
      optimizer=OptimizerConfig(learning_rate=5e-4, ema_momentum=0.999),
      loss=LossConfig(class_weighting='inverse_sqrt', max_class_weight=10.0, aux_loss_weight=1.0),
      eval=EvalConfig(flip=True, every_epochs=16, logit_adjustment=0.5, calibration_split='train'),
      trainer=TrainerConfig(epochs=64))


def gpu() -> Config:
  """The recipe for one or more data-centre GPUs: the seed U-Net's width on full-resolution frames.

  Command (each pod, or one machine with N GPUs; k8s/train-job.yaml runs it):
    python -m trainer.task --config gpu --data_dir gs://B/camvid/tfrecords --model_dir gs://B/runs/R
  Design: whole 360x480 CamVid frames, never downscaled (evaluation and serving pad them to the
  stride of 16, training takes random 352x480 crops after a random 0.75-1.5 scale: the standard
  scale augmentation for a model this size trained this long; `small` dropped it at 64 epochs as
  an under-fitted CPU model); the seed U-Net (base_filters 64, 34.5M parameters); 8 frames per
  GPU (data.batch_size_per_replica) with the learning rate scaled linearly from 1e-3 at 8;
  mixed precision auto (bf16 on A100/H100/L4); 200 epochs of cosine decay after 2 of warm-up;
  validation every epoch; and what `small` measured useful: flips, inverse-sqrt class weights,
  deep supervision, the weight average, logit adjustment and the train-split calibration.
  Cost, computed (not measured): 265 GFLOP forward per 352x480 crop (TensorFlow's profiler),
  ~794 GFLOP per training image (x3 for the backward pass). At 35% of the dense bf16 peak, one
  GPU takes per training image / per step of 8 / per epoch of CamVid's 367 frames (46 steps)
  plus the flip-averaged validation of 101 frames:
    L4   (121 TFLOP/s): 18.7 ms / 150 ms / ~8 s  -> 200 epochs ~27 min
    A100 (312 TFLOP/s):  7.3 ms /  58 ms / ~3 s  -> ~11 min
    H100 (989 TFLOP/s):  2.3 ms /  18 ms / ~1 s  -> ~4 min (likely input-bound)
  Result: not yet trained or timed on a GPU; `benchmarks/bench_gpu.py` measures it when one is
  at hand. tests/test_task.py trains it for a few steps on CPU at a tiny size (bf16).
  """
  return Config(
      model=ModelConfig(base_filters=64, depth=4, dropout=0.0),
      data=DataConfig(image_size=(360, 480), crop_size=(352, 480), batch_size_per_replica=8,
                      scale_min=0.75, scale_max=1.5, brightness=0.0, contrast=0.0,
                      saturation=0.0),
      optimizer=OptimizerConfig(learning_rate=1e-3, lr_scaling='linear', base_batch_size=8,
                                warmup_epochs=2.0, ema_momentum=0.999),
      loss=LossConfig(class_weighting='inverse_sqrt', max_class_weight=10.0, aux_loss_weight=1.0),
      eval=EvalConfig(flip=True, every_epochs=1, logit_adjustment=0.5, calibration_split='train'),
      trainer=TrainerConfig(epochs=200, steps_per_loop=20, backup_every_steps=200))


def smoke() -> Config:
  """Tiny and fast, for tests and the default demo: seconds per epoch on one CPU core.

  Command:
    python -m trainer.task --config smoke --data_dir D --model_dir M
  Result: runs end to end on generated scenes in well under a minute (tests/test_task.py).
  BatchNorm momentum 0.9 lets the moving statistics settle within a smoke run's few steps, so
  tests that compare predictions see predictions that vary (docs/experiments.md).
  """
  return Config(model=ModelConfig(base_filters=4, depth=2, dropout=0.0, bn_momentum=0.9),
                data=DataConfig(image_size=(32, 32), batch_size=4),
                optimizer=OptimizerConfig(learning_rate=1e-2, warmup_epochs=0.0),
                eval=EvalConfig(num_summary_images=2),
                trainer=TrainerConfig(epochs=2, steps_per_loop=2, backup_every_steps=4),
                runtime=RuntimeConfig(shuffle_buffer=64))


def demo() -> Config:
  """The no-flags main job: a few minutes on a CPU, on generated scenes, to see everything work.

  Command:
    python -m trainer.task
  Result: about a minute end to end on 2 CPU cores (README, "Two commands"); docs/experiments.md
  records the real-data runs.
  """
  return Config(model=ModelConfig(base_filters=8, depth=3, dropout=0.0, bn_momentum=0.9),
                data=DataConfig(image_size=(96, 128), batch_size=8),
                optimizer=OptimizerConfig(learning_rate=5e-3, warmup_epochs=0.5),
                eval=EvalConfig(num_summary_images=3),
                trainer=TrainerConfig(epochs=6, steps_per_loop=5, backup_every_steps=20))


PRESETS = {'seed_unet': seed_unet, 'small': small, 'gpu': gpu, 'smoke': smoke, 'demo': demo}
