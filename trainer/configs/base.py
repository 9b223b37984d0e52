"""The trainer's configuration: one dataclass holding every hyperparameter and run setting.

Presets (presets.py) fill it in; `--hparams_file` and flags override single fields by name. The
resolved config is written to model_dir/config.json before training, so every run records
exactly what it did.
"""

import dataclasses
import json
import typing


@dataclasses.dataclass
class Config:
  """Everything a training run depends on besides the data and the output dir."""
  # Model (trainer/model.py).
  base_filters: int = 64
  depth: int = 4
  dropout: float = 0.5
  # 1 = the notebook's U-Net; 2 = a stride-2 stem runs it at half resolution (model.py says why).
  stem_stride: int = 1
  # Batch statistics over the global batch: multi-replica runs then train the same model as one
  # device with the global batch, and every replica holds the same moving statistics (so the
  # distributed evaluation and the exported model agree). Costs one all-reduce per BN layer.
  sync_batchnorm: bool = True
  # Moving-average momentum of BatchNorm's inference statistics. Keras' 0.99 needs ~500 steps to
  # forget its initial (0, 1) statistics, so short runs evaluate with wrong ones; 0.9 suits runs
  # of a few thousand steps.
  bn_momentum: float = 0.99
  # Input pipeline (trainer/data.py). image_size is the model input (height, width): training
  # crops and the size evaluation and serving resize frames to.
  image_size: tuple[int, int] = (256, 256)
  # Training crop (height, width), None = image_size. Smaller crops of the same scaled frames
  # make a step cheaper (the model is fully convolutional and trained with free spatial size);
  # evaluation and serving still see whole frames at image_size.
  crop_size: tuple[int, int] | None = None
  batch_size: int = 8  # Global, across all replicas and workers.
  scale_min: float = 0.75  # Random scale range before cropping (1.0 = whole frame fits).
  scale_max: float = 1.5
  hflip: bool = True
  brightness: float = 0.1  # Max brightness delta ([0, 1] pixel scale); 0 disables.
  contrast: float = 0.1  # Contrast factor range 1 +/- contrast; 0 disables.
  saturation: float = 0.1
  shuffle_buffer: int = 512  # Examples; used when frames are streamed, not cached.
  # Keep decoded train frames in memory when one input pipeline's share fits in this many MiB
  # (CamVid's 367 frames: 254 MiB); 0 streams and decodes every epoch.
  cache_decoded_mb: int = 2048
  # Optimisation.
  epochs: int = 20
  steps_per_epoch: int | None = None  # None = one pass over the training split.
  optimizer: str = 'adamw'  # adamw | adam | sgd
  learning_rate: float = 1e-3
  lr_scaling: str = 'none'  # none | linear: learning_rate * batch_size / base_batch_size
  base_batch_size: int = 8
  weight_decay: float = 1e-4  # AdamW's decoupled decay (times the lr); adam and sgd have none.
  lr_schedule: str = 'cosine'  # cosine | constant
  warmup_epochs: float = 1.0
  clipnorm: float | None = None
  # Validate, keep as best/ and export an exponential moving average of the weights and
  # BatchNorm statistics (trainer/averaging.py, updated every step) instead of the weights
  # themselves; training still steps the raw weights. 0 = off; 0.999 averages over about the
  # last 1,000 steps.
  ema_momentum: float = 0.0
  # Loss (trainer/losses.py): class-weighted softmax cross-entropy.
  class_weighting: str = 'none'  # none | median_frequency | inverse_sqrt
  max_class_weight: float | None = None
  # Deep supervision: this weight times the mean cross-entropy (same class weights) of 1x1-conv
  # logits of every decoder level but the last, each at its own resolution against the mask
  # subsampled nearest, is added to the training loss (model.with_auxiliary_heads); the heads
  # exist only in training. 0 = off.
  aux_loss_weight: float = 0.0
  # Inference adds -logit_adjustment * log(class weight) to the logits before the argmax
  # (validation, metrics, TensorBoard overlays, the export). Class-weighted training shifts the
  # model's scores by about +log(weight) per class (Menon et al. 2021, "Long-tail learning via
  # logit adjustment"), so rare classes are over-predicted; 1.0 removes that shift entirely, 0
  # keeps it. The weights still shape what the features learn. No effect without class weights.
  logit_adjustment: float = 0.0
  # After training, fit one more offset per class on this split (trainer/calibration.py says
  # why), starting from the logit adjustment, to maximise its mean IoU; the final evaluation
  # (metrics.json), trainer.evaluate and the export use it. None = off. Use a training split:
  # fitted on val, val would no longer measure the model honestly.
  calibration_split: str | None = None
  early_stopping_patience: int | None = None  # Stop after this many epochs without a new best.
  # A validation is a new best (checkpointed to best/, resetting the patience) only when its
  # mIoU beats the previous best by more than this; tiny wobbles then do not keep a run alive.
  early_stopping_min_delta: float = 0.0
  # Evaluation.
  eval_flip: bool = False  # Test-time horizontal flip averaging (also baked into the export).
  # Test-time scales: logits of the frame resized to image_size * s, averaged over the scales
  # (model.predict_logits; also in calibration and the export). (1.0,) = image_size only.
  eval_scales: tuple[float, ...] = (1.0,)
  eval_batch_size: int | None = None  # Global; None = batch_size.
  eval_every_epochs: int = 1  # Validate after every n-th epoch and after the last.
  # Runtime.
  seed: int = 42
  mixed_precision: str = 'auto'  # auto | float32 | mixed_float16 | mixed_bfloat16
  strategy: str = 'auto'  # auto | default | mirrored | multi_worker
  # A worker that cannot reach its peers (at start-up or in a collective) fails after this long
  # instead of hanging; the Job then restarts it.
  peer_timeout_seconds: int = 300
  # XLA for the replica step; one device only (refused under mirrored and multi_worker).
  jit_compile: bool = False
  steps_per_loop: int = 10  # Train steps per tf.function call (also the preemption-check period).
  backup_every_steps: int = 100  # Resumable backup period, besides every epoch end.
  num_summary_images: int = 3  # Fixed val frames shown as overlays in TensorBoard.
  profile_steps: tuple[int, int] | None = None  # (first, last) global steps to trace.

  def replace(self, **changes) -> 'Config':
    return dataclasses.replace(self, **changes)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


_HINTS = typing.get_type_hints(Config)
FIELDS = tuple(f.name for f in dataclasses.fields(Config))

# Fields of rejected experiments that the trainer no longer has, with the values that meant
# "off" (docs/experiments.md records what they did). An old config.json holding one of these
# values trained the model the trainer builds now; any other value trained a different one.
REMOVED_OPTIONS = {
    'bottleneck_filters': None, 'residual': False, 'refine_filters': 0,
    'subpixel_logits': False, 'fullres_filters': 0, 'loss': 'ce', 'focal_gamma': 2.0,
    'ohem_threshold': 0.0, 'ohem_min_kept': 0.1, 'label_smoothing': 0.0, 'lovasz_weight': 0.0,
    'dice_weight': 0.0,
}


def _coerce(name: str, value):
  """Converts a JSON/flag value to the field's type (tuples from lists, ints to floats)."""
  hint = _HINTS[name]
  optional = type(None) in typing.get_args(hint)
  if value is None:
    if optional:
      return None
    raise ValueError(f'{name}: may not be null')
  base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
  origin = typing.get_origin(base) or base
  if origin is tuple:
    args = typing.get_args(base)
    if args[-1] is Ellipsis:  # tuple[float, ...]: one or more values.
      if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f'{name}: expected a list of one or more values, got {value!r}')
    elif not isinstance(value, (list, tuple)) or len(value) != len(args):
      raise ValueError(f'{name}: expected a list of {len(args)} values, got {value!r}')
    return tuple(_coerce_scalar(name, args[0], v) for v in value)
  return _coerce_scalar(name, origin, value)


def _coerce_scalar(name, kind, value):
  if kind is bool:
    if not isinstance(value, bool):
      raise ValueError(f'{name}: expected true or false, got {value!r}')
    return value
  if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
    return float(value)
  if kind is int and isinstance(value, int) and not isinstance(value, bool):
    return value
  if kind is str and isinstance(value, str):
    return value
  raise ValueError(f'{name}: expected {kind.__name__}, got {value!r}')


def override(config: Config, overrides: dict, source: str) -> Config:
  """Returns `config` with `overrides` applied; ValueError naming `source` for unknown keys."""
  unknown = sorted(set(overrides) - set(FIELDS))
  if unknown:
    raise ValueError(f'{source}: unknown keys {", ".join(unknown)} (known: {", ".join(FIELDS)})')
  try:
    return config.replace(**{k: _coerce(k, v) for k, v in overrides.items()})
  except ValueError as e:
    raise ValueError(f'{source}: {e}') from None


def from_json(text: str, source: str) -> Config:
  return override(Config(), json.loads(text), source)


_CHOICES = {
    'optimizer': ('adamw', 'adam', 'sgd'), 'lr_scaling': ('none', 'linear'),
    'lr_schedule': ('cosine', 'constant'),
    'class_weighting': ('none', 'median_frequency', 'inverse_sqrt'),
    'mixed_precision': ('auto', 'float32', 'mixed_float16', 'mixed_bfloat16'),
    'strategy': ('auto', 'default', 'mirrored', 'multi_worker'),
}


def validate(config: Config) -> None:
  """Raises ValueError naming the field for any value the trainer cannot use."""
  for name, choices in _CHOICES.items():
    if getattr(config, name) not in choices:
      raise ValueError(f'{name}: {getattr(config, name)!r} is not one of {", ".join(choices)}')
  if config.stem_stride not in (1, 2):
    raise ValueError(f'stem_stride: {config.stem_stride!r} is not one of 1, 2')
  stride = config.stem_stride * 2**config.depth
  for name in ('image_size', 'crop_size'):
    size = getattr(config, name)
    if size is not None and any(s <= 0 or s % stride for s in size):
      raise ValueError(f'{name}: {size[0]}x{size[1]} must be positive multiples of '
                       f'stem_stride * 2**depth = {stride}')
  checks = {
      'batch_size': config.batch_size >= 1, 'epochs': config.epochs >= 1,
      'learning_rate': config.learning_rate > 0, 'dropout': 0 <= config.dropout < 1,
      'bn_momentum': 0 <= config.bn_momentum < 1,
      'scale_min': 0 < config.scale_min <= config.scale_max,
      'steps_per_loop': config.steps_per_loop >= 1,
      'eval_every_epochs': config.eval_every_epochs >= 1,
      'steps_per_epoch': config.steps_per_epoch is None or config.steps_per_epoch >= 1,
      'base_filters': config.base_filters >= 1, 'depth': config.depth >= 1,
      'warmup_epochs': config.warmup_epochs >= 0,
      'backup_every_steps': config.backup_every_steps >= 0,
      'peer_timeout_seconds': config.peer_timeout_seconds >= 1,
      'early_stopping_patience': (config.early_stopping_patience is None or
                                  config.early_stopping_patience >= 1),
      'early_stopping_min_delta': 0 <= config.early_stopping_min_delta < 1,
      'aux_loss_weight': config.aux_loss_weight >= 0,
      'logit_adjustment': 0 <= config.logit_adjustment <= 1,
      'calibration_split': config.calibration_split is None or bool(config.calibration_split),
      'weight_decay': config.weight_decay >= 0,
      'ema_momentum': 0 <= config.ema_momentum < 1,
      'max_class_weight': config.max_class_weight is None or config.max_class_weight > 0,
      'clipnorm': config.clipnorm is None or config.clipnorm > 0,
      'base_batch_size': config.base_batch_size >= 1,
      'eval_batch_size': config.eval_batch_size is None or config.eval_batch_size >= 1,
      'shuffle_buffer': config.shuffle_buffer >= 1,
      'cache_decoded_mb': config.cache_decoded_mb >= 0,
      # Contrast and saturation factors are 1 +/- the value: above 1 a factor could turn
      # negative and invert the image.
      'brightness': 0 <= config.brightness <= 1, 'contrast': 0 <= config.contrast <= 1,
      'saturation': 0 <= config.saturation <= 1,
      'num_summary_images': config.num_summary_images >= 0,
      # Every scaled frame must still fill at least one stride of the model.
      'eval_scales': bool(config.eval_scales) and all(
          0 < s <= 4 and round(min(config.image_size) * s) >= stride
          for s in config.eval_scales),
      'profile_steps': (config.profile_steps is None or
                        0 <= config.profile_steps[0] <= config.profile_steps[1]),
  }
  for name, ok in checks.items():
    if not ok:
      raise ValueError(f'{name}: {getattr(config, name)!r} is out of range')
  # Values that are fine alone but not with another field's: the message names both. The
  # deep-supervision heads sit on every decoder level but the last.
  if config.aux_loss_weight and config.depth < 2:
    raise ValueError(f'aux_loss_weight: {config.aux_loss_weight!r} needs depth >= 2, '
                     f'not depth {config.depth}')
