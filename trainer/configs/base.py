"""The trainer's configuration: an experiment of nested groups (model, data, optimizer, ...).

After TF Model Garden's `hyperparams` (nested dataclass groups, overridden by dotted keys), in
our own small code. Presets (presets.py) fill it in; `--hparams_file`, `--params_override` and
flags override single fields by dotted path (`model.base_filters`), nested mapping
(`{'model': {'base_filters': 32}}`) or old flat name (`base_filters`, see FLAT_NAMES). The
resolved config is written nested to model_dir/config.json before training, so every run records
exactly what it did.

Each group says whether a resumed run may change it (RESUMABLE) and checks its own fields
(`validate`); checks that involve several groups are ExperimentConfig.validate's. Every error
names the field by dotted path, e.g. `model.depth: 0 is out of range`.
"""

import dataclasses
import json
import re
import typing
from typing import ClassVar, Literal

import yaml


class _Group:
  """A group of fields; subclasses are frozen dataclasses with a NAME and RESUMABLE."""
  NAME: ClassVar[str] = ''
  # Whether a run resumed from a checkpoint may change this group's fields: how it runs, how
  # long and how it predicts may change, not what the checkpoint learned from.
  RESUMABLE: ClassVar[bool] = False

  def _ranges(self) -> dict:
    """{field: whether its value is in range}; the group's own checks."""
    return {}

  def validate(self) -> None:
    """Raises ValueError naming the field by dotted path for a value the trainer cannot use."""
    for f in dataclasses.fields(self):
      allowed = _literal_choices(_hints(type(self))[f.name])
      value = getattr(self, f.name)
      if allowed is not None and value not in allowed:
        raise ValueError(f'{_path(self.NAME, f.name)}: {value!r} is not one of '
                         f'{", ".join(map(str, allowed))}')
    for name, ok in self._ranges().items():
      if not ok:
        raise ValueError(f'{_path(self.NAME, name)}: {getattr(self, name)!r} is out of range')

  def replace(self, **changes):
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class ModelConfig(_Group):
  """The U-Net (trainer/model.py). Every field is set by a preset or used at its default."""
  NAME: ClassVar[str] = 'model'
  RESUMABLE: ClassVar[bool] = False
  base_filters: int = 64  # Filters of the first level; doubled per level down.
  depth: int = 4  # Down-sampling levels.
  dropout: float = 0.5  # Dropout rate at the bottleneck.
  # 1 = the notebook's U-Net; 2 = a stride-2 stem runs it at half resolution (model.py says why).
  stem_stride: Literal[1, 2] = 1
  # Batch statistics over the global batch: multi-replica runs then train the same model as one
  # device with the global batch, and every replica holds the same moving statistics (so the
  # distributed evaluation and the exported model agree). Costs one all-reduce per BN layer.
  sync_batchnorm: bool = True
  # Moving-average momentum of BatchNorm's inference statistics. Keras' 0.99 needs ~500 steps to
  # forget its initial (0, 1) statistics, so short runs evaluate with wrong ones; 0.9 suits runs
  # of a few thousand steps.
  bn_momentum: float = 0.99

  def _ranges(self):
    return {'base_filters': self.base_filters >= 1, 'depth': self.depth >= 1,
            'dropout': 0 <= self.dropout < 1, 'bn_momentum': 0 <= self.bn_momentum < 1}


@dataclasses.dataclass(frozen=True)
class DataConfig(_Group):
  """The training input and its augmentation (trainer/data.py).

  Every field is set by a preset (data.batch_size_per_replica by `gpu`) or used at its default.
  """
  NAME: ClassVar[str] = 'data'
  RESUMABLE: ClassVar[bool] = False
  # The model input (height, width): the size evaluation and serving resize frames to (padded
  # to the model's stride when not a multiple of it), and training's without crop_size.
  image_size: tuple[int, int] = (256, 256)
  # Training crop (height, width), None = image_size. Smaller crops of the same scaled frames
  # make a step cheaper (the model is fully convolutional and trained with free spatial size);
  # evaluation and serving still see whole frames at image_size.
  crop_size: tuple[int, int] | None = None
  batch_size: int = 8  # Global, across all replicas and workers.
  # When set, the global batch is this many per replica (batch_size is then resolved to it times
  # the replicas when a run starts, and config.json records that); for presets sized per GPU.
  batch_size_per_replica: int | None = None
  scale_min: float = 0.75  # Random scale range before cropping (1.0 = whole frame fits).
  scale_max: float = 1.5
  hflip: bool = True  # Random horizontal flips.
  brightness: float = 0.1  # Max brightness delta ([0, 1] pixel scale); 0 disables.
  contrast: float = 0.1  # Contrast factor range 1 +/- contrast; 0 disables.
  saturation: float = 0.1  # Saturation factor range 1 +/- saturation; 0 disables.
  # Each whole frame (after the colour jitter, before cropping) minus its mean over its standard
  # deviation, in training and inference alike (inference.standardize): invariant to a global
  # brightness and contrast change. Costs a pass over each frame once (with colour jitter, a few
  # per example).
  standardize: bool = False

  def _ranges(self):
    return {
        'image_size': all(s > 0 for s in self.image_size),
        'crop_size': self.crop_size is None or all(s > 0 for s in self.crop_size),
        'batch_size': self.batch_size >= 1,
        'batch_size_per_replica': (self.batch_size_per_replica is None or
                                   self.batch_size_per_replica >= 1),
        'scale_min': 0 < self.scale_min <= self.scale_max,
        # Contrast and saturation factors are 1 +/- the value: above 1 a factor could turn
        # negative and invert the image.
        'brightness': 0 <= self.brightness <= 1, 'contrast': 0 <= self.contrast <= 1,
        'saturation': 0 <= self.saturation <= 1,
    }


@dataclasses.dataclass(frozen=True)
class OptimizerConfig(_Group):
  """The optimiser and its learning-rate schedule (segmentation.make_optimizer).

  Standard knobs no preset changes: name (adam, sgd), lr_schedule constant, clipnorm.
  """
  NAME: ClassVar[str] = 'optimizer'
  RESUMABLE: ClassVar[bool] = False
  name: Literal['adamw', 'adam', 'sgd'] = 'adamw'  # sgd: Nesterov momentum 0.9.
  learning_rate: float = 1e-3  # Peak learning rate (after warm-up).
  # none | linear: learning_rate * data.batch_size / base_batch_size.
  lr_scaling: Literal['none', 'linear'] = 'none'
  base_batch_size: int = 8  # The batch size learning_rate is meant for (lr_scaling linear).
  weight_decay: float = 1e-4  # AdamW's decoupled decay (times the lr); adam and sgd have none.
  lr_schedule: Literal['cosine', 'constant'] = 'cosine'  # cosine: decays to zero at the end.
  warmup_epochs: float = 1.0  # Linear warm-up from 0 to the peak.
  clipnorm: float | None = None  # Per-variable gradient norm clip; None = off.
  # Validate, keep as best/ and export an exponential moving average of the weights and
  # BatchNorm statistics (trainer/averaging.py, updated every step) instead of the weights
  # themselves; training still steps the raw weights. 0 = off; 0.999 averages over about the
  # last 1,000 steps.
  ema_momentum: float = 0.0

  def _ranges(self):
    return {
        'learning_rate': self.learning_rate > 0, 'base_batch_size': self.base_batch_size >= 1,
        'weight_decay': self.weight_decay >= 0, 'warmup_epochs': self.warmup_epochs >= 0,
        'clipnorm': self.clipnorm is None or self.clipnorm > 0,
        'ema_momentum': 0 <= self.ema_momentum < 1,
    }


@dataclasses.dataclass(frozen=True)
class LossConfig(_Group):
  """The training loss (trainer/losses.py): class-weighted softmax cross-entropy."""
  NAME: ClassVar[str] = 'loss'
  RESUMABLE: ClassVar[bool] = False
  class_weighting: Literal['none', 'median_frequency', 'inverse_sqrt'] = 'none'
  max_class_weight: float | None = None  # Cap on a class weight; None = uncapped.
  # Deep supervision: this weight times the mean cross-entropy (same class weights) of 1x1-conv
  # logits of every decoder level but the last, each at its own resolution against the mask
  # subsampled nearest, is added to the training loss (model.with_auxiliary_heads); the heads
  # exist only in training. 0 = off.
  aux_loss_weight: float = 0.0

  def _ranges(self):
    return {
        'max_class_weight': self.max_class_weight is None or self.max_class_weight > 0,
        'aux_loss_weight': self.aux_loss_weight >= 0,
    }


@dataclasses.dataclass(frozen=True)
class EvalConfig(_Group):
  """Validation and prediction: test-time augmentation, logit adjustment, calibration.

  Standard knobs no preset changes: scales (test-time multi-scale), batch_size.
  """
  NAME: ClassVar[str] = 'eval'
  RESUMABLE: ClassVar[bool] = True
  flip: bool = False  # Test-time horizontal flip averaging (also baked into the export).
  # Test-time scales: logits of the frame resized to image_size * s, averaged over the scales
  # (model.predict_logits; also in calibration and the export). (1.0,) = image_size only.
  scales: tuple[float, ...] = (1.0,)
  batch_size: int | None = None  # Global; None = data.batch_size.
  # Validate after every n-th epoch and after the last; 0 = after the last only, so best/ holds
  # the final weights and val selects nothing (cross-drive folds, whose val is the test).
  every_epochs: int = 1
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
  num_summary_images: int = 3  # Fixed val frames shown as overlays in TensorBoard.

  def _ranges(self):
    return {
        'scales': bool(self.scales) and all(0 < s <= 4 for s in self.scales),
        'batch_size': self.batch_size is None or self.batch_size >= 1,
        'every_epochs': self.every_epochs >= 0,
        'logit_adjustment': 0 <= self.logit_adjustment <= 1,
        'calibration_split': self.calibration_split is None or bool(self.calibration_split),
        'num_summary_images': self.num_summary_images >= 0,
    }


@dataclasses.dataclass(frozen=True)
class TrainerConfig(_Group):
  """The training loop: length, early stopping, step grouping, backups, profiling.

  Standard knobs no preset changes: early_stopping_*, profile_steps.
  """
  NAME: ClassVar[str] = 'trainer'
  RESUMABLE: ClassVar[bool] = True  # `epochs` extends a run.
  epochs: int = 20
  early_stopping_patience: int | None = None  # Stop after this many epochs without a new best.
  # A validation is a new best (checkpointed to best/, resetting the patience) only when its
  # mIoU beats the previous best by more than this; tiny wobbles then do not keep a run alive.
  early_stopping_min_delta: float = 0.0
  steps_per_loop: int = 10  # Train steps per tf.function call (also the preemption-check period).
  backup_every_steps: int = 100  # Resumable backup period, besides every epoch end.
  profile_steps: tuple[int, int] | None = None  # (first, last) global steps to trace.

  def _ranges(self):
    return {
        'epochs': self.epochs >= 1,
        'early_stopping_patience': (self.early_stopping_patience is None or
                                    self.early_stopping_patience >= 1),
        'early_stopping_min_delta': 0 <= self.early_stopping_min_delta < 1,
        'steps_per_loop': self.steps_per_loop >= 1,
        'backup_every_steps': self.backup_every_steps >= 0,
        'profile_steps': (self.profile_steps is None or
                          0 <= self.profile_steps[0] <= self.profile_steps[1]),
    }


@dataclasses.dataclass(frozen=True)
class RuntimeConfig(_Group):
  """Where and how the run executes: devices, precision, XLA, input caching.

  Standard knobs, chosen per machine rather than per preset: every field here.
  """
  NAME: ClassVar[str] = 'runtime'
  RESUMABLE: ClassVar[bool] = True
  # auto: TF_CONFIG -> multi_worker, several GPUs -> mirrored, else default.
  strategy: Literal['auto', 'default', 'mirrored', 'multi_worker'] = 'auto'
  # auto: bf16 on GPUs with compute capability >= 8, fp16 on older GPUs, fp32 on CPU.
  mixed_precision: Literal['auto', 'float32', 'mixed_float16', 'mixed_bfloat16'] = 'auto'
  # A worker that cannot reach its peers (at start-up or in a collective) fails after this long
  # instead of hanging; the Job then restarts it.
  peer_timeout_seconds: int = 300
  # How long a worker waits for all its peers to start before its watchdog ends it (exit 137);
  # None = peer_timeout_seconds. k8s/train-job.yaml allows 1800: GPU node auto-provisioning and
  # multi-GB image pulls start a Job's pods minutes apart, and every early kill counts against
  # backoffLimit. Collectives keep peer_timeout_seconds, so a dead peer mid-run fails fast.
  formation_timeout_seconds: int | None = None
  # XLA for the replica step; one device only (refused under mirrored and multi_worker).
  jit_compile: bool = False
  # Keep decoded train frames in memory when one input pipeline's share fits in this many MiB
  # (CamVid's 367 frames: 254 MiB); 0 streams and decodes every epoch.
  cache_decoded_mb: int = 2048
  shuffle_buffer: int = 512  # Examples; used when frames are streamed, not cached.

  def _ranges(self):
    return {
        'peer_timeout_seconds': self.peer_timeout_seconds >= 1,
        'formation_timeout_seconds': (self.formation_timeout_seconds is None or
                                      self.formation_timeout_seconds >= 1),
        'cache_decoded_mb': self.cache_decoded_mb >= 0, 'shuffle_buffer': self.shuffle_buffer >= 1,
    }


GROUPS = {g.NAME: g for g in (ModelConfig, DataConfig, OptimizerConfig, LossConfig, EvalConfig,
                              TrainerConfig, RuntimeConfig)}


@dataclasses.dataclass(frozen=True)
class ExperimentConfig(_Group):
  """Everything a training run depends on besides the data and the output dir."""
  RESUMABLE: ClassVar[bool] = False  # The top-level fields below.
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
  loss: LossConfig = dataclasses.field(default_factory=LossConfig)
  eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
  trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)
  runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)
  seed: int = 42  # Shuffling, augmentation and initialisation.
  steps_per_epoch: int | None = None  # None = one pass over the training split.

  def _ranges(self):
    return {'steps_per_epoch': self.steps_per_epoch is None or self.steps_per_epoch >= 1}

  def groups(self) -> dict:
    """{name: group} in declaration order."""
    return {name: getattr(self, name) for name in GROUPS}

  def validate(self) -> None:
    """Every group's own checks, then the ones across groups; ValueError naming the field."""
    for group in self.groups().values():
      group.validate()
    super().validate()
    model, data = self.model, self.data
    stride = model.stem_stride * 2**model.depth
    # Training batches must tile the model's stride; whole frames of another size are padded
    # to it at inference (model.predict_logits), so with crops image_size is free.
    name = 'crop_size' if data.crop_size is not None else 'image_size'
    size = getattr(data, name)
    if any(s % stride for s in size):
      raise ValueError(f'data.{name}: {size[0]}x{size[1]} must be positive multiples of '
                       f'model.stem_stride * 2**model.depth = {stride}')
    # Every scaled frame must still fill at least one stride of the model.
    if any(round(min(data.image_size) * s) < stride for s in self.eval.scales):
      raise ValueError(f'eval.scales: {self.eval.scales!r} is out of range (data.image_size '
                       f'{data.image_size[0]}x{data.image_size[1]} times the smallest scale is '
                       f'less than one stride, {stride} pixels)')
    # The deep-supervision heads sit on every decoder level but the last.
    if self.loss.aux_loss_weight and model.depth < 2:
      raise ValueError(f'loss.aux_loss_weight: {self.loss.aux_loss_weight!r} needs '
                       f'model.depth >= 2, not model.depth {model.depth}')

  def replace(self, **changes) -> 'ExperimentConfig':
    """This config with fields replaced by dotted path: `config.replace(**{'model.depth': 2})`.

    Like dataclasses.replace, values are taken as given (no coercion, no validation); unknown
    keys are refused. Whole groups may be given too: `config.replace(model=ModelConfig())`.
    """
    return override(self, changes, 'replace', flat_names=False, coerce=False)

  def to_dict(self) -> dict:
    """The nested config as JSON-compatible values (tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(self)))

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2)


Config = ExperimentConfig

assert all(f.name == f.type.NAME for f in dataclasses.fields(ExperimentConfig)
           if f.name in GROUPS), 'a group field must be named as its group'


def _path(group: str, name: str) -> str:
  return f'{group}.{name}' if group else name


_HINT_CACHE = {}


def _hints(cls) -> dict:
  if cls not in _HINT_CACHE:
    _HINT_CACHE[cls] = typing.get_type_hints(cls)
  return _HINT_CACHE[cls]


def _literal_choices(hint):
  """The allowed values of a Literal[...] field (optionals too), else None."""
  if typing.get_origin(hint) is Literal:
    return typing.get_args(hint)
  for arg in typing.get_args(hint):
    if typing.get_origin(arg) is Literal:
      return typing.get_args(arg)
  return None


def _leaf_hint(path: str):
  group, _, name = path.rpartition('.')
  cls = GROUPS[group] if group else ExperimentConfig
  return _hints(cls)[name]


# Every leaf field by dotted path, in declaration order.
FIELDS = tuple(
    [f'{g}.{f.name}' for g, cls in GROUPS.items() for f in dataclasses.fields(cls)] +
    [f.name for f in dataclasses.fields(ExperimentConfig) if f.name not in GROUPS])


def choices(path: str) -> tuple:
  """The allowed values of a field with a fixed set of them, e.g. choices('runtime.strategy')."""
  allowed = _literal_choices(_leaf_hint(path)) if path in FIELDS else None
  if allowed is None:
    raise KeyError(f'{path}: not a field with fixed choices')
  return allowed


def choice_fields() -> dict[str, tuple]:
  """{dotted path: allowed values} for every field with a fixed set of them."""
  return {path: allowed for path in FIELDS
          if (allowed := _literal_choices(_leaf_hint(path))) is not None}


# The flat names of the config before it was grouped (issue #34), each with its dotted path:
# old config.json files, --hparams_file contents (the tuner's best_hparams.json) and
# benchmark/tuner overrides keep working through this table.
FLAT_NAMES = {
    'base_filters': 'model.base_filters', 'depth': 'model.depth', 'dropout': 'model.dropout',
    'stem_stride': 'model.stem_stride', 'sync_batchnorm': 'model.sync_batchnorm',
    'bn_momentum': 'model.bn_momentum',
    'image_size': 'data.image_size', 'crop_size': 'data.crop_size',
    'batch_size': 'data.batch_size', 'scale_min': 'data.scale_min',
    'scale_max': 'data.scale_max', 'hflip': 'data.hflip', 'brightness': 'data.brightness',
    'contrast': 'data.contrast', 'saturation': 'data.saturation',
    'optimizer': 'optimizer.name', 'learning_rate': 'optimizer.learning_rate',
    'lr_scaling': 'optimizer.lr_scaling', 'base_batch_size': 'optimizer.base_batch_size',
    'weight_decay': 'optimizer.weight_decay', 'lr_schedule': 'optimizer.lr_schedule',
    'warmup_epochs': 'optimizer.warmup_epochs', 'clipnorm': 'optimizer.clipnorm',
    'ema_momentum': 'optimizer.ema_momentum',
    'class_weighting': 'loss.class_weighting', 'max_class_weight': 'loss.max_class_weight',
    'aux_loss_weight': 'loss.aux_loss_weight',
    'eval_flip': 'eval.flip', 'eval_scales': 'eval.scales', 'eval_batch_size': 'eval.batch_size',
    'eval_every_epochs': 'eval.every_epochs', 'logit_adjustment': 'eval.logit_adjustment',
    'calibration_split': 'eval.calibration_split',
    'num_summary_images': 'eval.num_summary_images',
    'epochs': 'trainer.epochs', 'early_stopping_patience': 'trainer.early_stopping_patience',
    'early_stopping_min_delta': 'trainer.early_stopping_min_delta',
    'steps_per_loop': 'trainer.steps_per_loop',
    'backup_every_steps': 'trainer.backup_every_steps', 'profile_steps': 'trainer.profile_steps',
    'strategy': 'runtime.strategy', 'mixed_precision': 'runtime.mixed_precision',
    'peer_timeout_seconds': 'runtime.peer_timeout_seconds', 'jit_compile': 'runtime.jit_compile',
    'cache_decoded_mb': 'runtime.cache_decoded_mb', 'shuffle_buffer': 'runtime.shuffle_buffer',
    'seed': 'seed', 'steps_per_epoch': 'steps_per_epoch',
}
# Fields added after the grouping (data.batch_size_per_replica, data.standardize,
# runtime.formation_timeout_seconds) have no flat name.
assert len(set(FLAT_NAMES.values())) == len(FLAT_NAMES) and set(FLAT_NAMES.values()) <= set(FIELDS)

# Fields of rejected experiments that the trainer no longer has, with the values that meant
# "off" (docs/experiments.md records what they did). An old config.json holding one of these
# values trained the model the trainer builds now; any other value trained a different one.
REMOVED_OPTIONS = {
    'bottleneck_filters': None, 'residual': False, 'refine_filters': 0,
    'subpixel_logits': False, 'fullres_filters': 0, 'loss': 'ce', 'focal_gamma': 2.0,
    'ohem_threshold': 0.0, 'ohem_min_kept': 0.1, 'label_smoothing': 0.0, 'lovasz_weight': 0.0,
    'dice_weight': 0.0,
}


def resumable(path: str) -> bool:
  """Whether a resumed run may change the field at dotted `path` (its group's RESUMABLE)."""
  group, _, _ = path.rpartition('.')
  return (GROUPS[group] if group else ExperimentConfig).RESUMABLE


def get(config: ExperimentConfig, path: str):
  """The value at dotted `path`."""
  value = config
  for part in path.split('.'):
    value = getattr(value, part)
  return value


def hparams(config: ExperimentConfig) -> dict:
  """{dotted path: value} of every field, as the HParams dashboard takes them.

  Numbers, booleans and strings stay as they are. A field whose type allows None or is a tuple
  is always a string (`None`, sizes as `288x384`, other tuples as `0.75,1.0`), so a column has
  one type in every run.
  """
  def show(path, value):
    if isinstance(value, (tuple, list)):
      return ('x' if path.endswith('_size') else ',').join(map(str, value))
    return str(value)

  def plain(path):
    hint = _leaf_hint(path)
    return hint in (bool, int, float, str) or typing.get_origin(hint) is Literal

  return {path: get(config, path) if plain(path) else show(path, get(config, path))
          for path in FIELDS}


def to_flat(config: ExperimentConfig) -> dict:
  """{old flat name: value}: the config as it was spelt before grouping."""
  return {flat: get(config, path) for flat, path in FLAT_NAMES.items()}


def _coerce(path: str, value):
  """Converts a JSON/YAML/flag value to the field's type (tuples from lists, ints to floats)."""
  hint = _leaf_hint(path)
  optional = type(None) in typing.get_args(hint)
  if value is None:
    if optional:
      return None
    raise ValueError(f'{path}: may not be null')
  base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
  origin = typing.get_origin(base) or base
  if origin is Literal:  # The value's type; validate() checks it is one of the choices.
    origin = type(typing.get_args(base)[0])
  if origin is tuple:
    args = typing.get_args(base)
    if args[-1] is Ellipsis:  # tuple[float, ...]: one or more values.
      if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f'{path}: expected a list of one or more values, got {value!r}')
    elif not isinstance(value, (list, tuple)) or len(value) != len(args):
      raise ValueError(f'{path}: expected a list of {len(args)} values, got {value!r}')
    return tuple(_coerce_scalar(path, args[0], v) for v in value)
  return _coerce_scalar(path, origin, value)


def _coerce_scalar(path, kind, value):
  if kind is bool:
    if not isinstance(value, bool):
      raise ValueError(f'{path}: expected true or false, got {value!r}')
    return value
  if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
    return float(value)
  if kind is int and isinstance(value, int) and not isinstance(value, bool):
    return value
  if kind is str and isinstance(value, str):
    return value
  raise ValueError(f'{path}: expected {kind.__name__}, got {value!r}')


def _unknown(path: str, source: str, flat_names: bool) -> ValueError:
  group, _, _ = path.partition('.')
  if '.' in path and group in GROUPS:
    known = f'known in {group}: {", ".join(f.name for f in dataclasses.fields(GROUPS[group]))}'
  else:
    top = [f.name for f in dataclasses.fields(ExperimentConfig) if f.name not in GROUPS]
    known = (f'known: groups {", ".join(GROUPS)}; fields {", ".join(top)}' +
             ('; or an old flat name of configs.FLAT_NAMES' if flat_names else ''))
  return ValueError(f'{source}: unknown key {path} ({known})')


def _dotted(mapping, source: str, flat_names: bool) -> dict:
  """{dotted path: value} of a nested/dotted/flat mapping; unknown keys refused by name."""
  out, spelt = {}, {}

  def add(path, value, key):
    if path in out:
      raise ValueError(f'{source}: {path} given twice (as {spelt[path]} and {key})')
    out[path], spelt[path] = value, key

  def walk(prefix, values):
    if not isinstance(values, dict):
      raise ValueError(f'{source}: {prefix or "the overrides"}: expected a mapping of keys to '
                       f'values, got {values!r}')
    for key, value in values.items():
      key = str(key)
      path = f'{prefix}.{key}' if prefix else key
      if path in GROUPS and isinstance(value, _Group):
        if not isinstance(value, GROUPS[path]):
          raise ValueError(f'{source}: {path}: expected a {GROUPS[path].__name__}, got '
                           f'{type(value).__name__}')
        walk(path, dataclasses.asdict(value))
      elif path in GROUPS and isinstance(value, dict):
        walk(path, value)
      elif path in FIELDS:
        add(path, value, path)
      elif flat_names and not prefix and key in FLAT_NAMES:  # `optimizer: sgd` too.
        add(FLAT_NAMES[key], value, key)
      elif path in GROUPS:
        raise ValueError(f'{source}: {path}: expected a mapping of its fields, got {value!r}')
      else:
        raise _unknown(path, source, flat_names)

  walk('', mapping)
  return out


def override(config: ExperimentConfig, overrides: dict, source: str, *,
             flat_names: bool = True, coerce: bool = True) -> ExperimentConfig:
  """Returns `config` with `overrides` applied; ValueError starting with `source` otherwise.

  `overrides` may use dotted keys ({'model.base_filters': 32}), nested mappings
  ({'model': {'base_filters': 32}}) and, unless flat_names=False, the old flat names of
  FLAT_NAMES ({'base_filters': 32, 'eval_flip': True, 'optimizer': 'sgd'}), mixed freely.
  Values are type-checked and coerced to the field's type (tuples from lists, ints to floats).
  """
  values = {}
  for path, value in _dotted(overrides, source, flat_names).items():
    try:
      values[path] = _coerce(path, value) if coerce else value
    except ValueError as e:
      raise ValueError(f'{source}: {e}') from None
  changes = {}
  for path, value in values.items():
    group, _, name = path.rpartition('.')
    if group:
      changes.setdefault(group, {})[name] = value
    else:
      changes[name] = value
  top = {name: (dataclasses.replace(getattr(config, name), **value) if name in GROUPS else value)
         for name, value in changes.items()}
  return dataclasses.replace(config, **top)


def from_dict(values: dict, source: str) -> ExperimentConfig:
  """The config of a nested (or dotted, or old flat) mapping over the defaults."""
  return override(ExperimentConfig(), values, source)


def from_json(text: str, source: str) -> ExperimentConfig:
  return from_dict(json.loads(text), source)


def validate(config: ExperimentConfig) -> None:
  """Raises ValueError naming the field by dotted path for any value the trainer cannot use."""
  config.validate()


# A number YAML 1.1 reads as a string: PyYAML wants a dot and a signed exponent (3.0e-4).
_NUMBER = re.compile(r'[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?')


def _yaml_value(text: str):
  value = yaml.safe_load(text) if text.strip() else None

  return _numbers(value)


def _numbers(value):
  """`value` with strings that are numbers (3e-4, as YAML 1.1 leaves them) made numbers."""
  if isinstance(value, str) and _NUMBER.fullmatch(value):
    return float(value) if any(c in value for c in '.eE') else int(value)
  if isinstance(value, list):
    return [_numbers(v) for v in value]
  if isinstance(value, dict):
    return {k: _numbers(v) for k, v in value.items()}
  return value


def _split_outside_brackets(text: str) -> list[str]:
  parts, depth, current, quote = [], 0, [], None
  for char in text:
    if quote:
      quote = None if char == quote else quote
    elif char in '\'"':
      quote = char
    elif char in '[{':
      depth += 1
    elif char in ']}':
      depth -= 1
    elif char == ',' and depth == 0:
      parts.append(''.join(current))
      current = []
      continue
    current.append(char)
  parts.append(''.join(current))
  return [p.strip() for p in parts if p.strip()]


def parse_params_override(text: str, source: str = '--params_override') -> dict:
  """{dotted key: value} of `key=value,key=value` (values YAML scalars or [lists]).

  Commas inside brackets or quotes belong to the value: `eval.scales=[0.75,1.0],seed=1`.
  """
  out = {}
  for pair in _split_outside_brackets(text):
    key, sep, value = pair.partition('=')
    key = key.strip()
    if not sep or not key:
      raise ValueError(f'{source}: expected key=value pairs separated by commas, got {pair!r}')
    try:
      out[key] = _yaml_value(value)
    except yaml.YAMLError as e:
      raise ValueError(f'{source}: {key}: not a YAML value: {value!r} '
                       f'({" ".join(str(e).split())})') from None
  return out


def parse_params_file(text: str, source: str) -> dict:
  """The mapping in a .yaml/.yml/.json --params_override file (nested or dotted keys)."""
  try:
    values = _numbers(yaml.safe_load(text))
  except yaml.YAMLError as e:
    raise ValueError(f'{source}: not valid YAML/JSON ({" ".join(str(e).split())})') from None
  if values is None:
    return {}
  if not isinstance(values, dict):
    raise ValueError(f'{source}: expected a mapping of config keys to values')
  return values


def is_params_file(text: str) -> bool:
  """Whether a --params_override value names a file rather than holding key=value pairs."""
  return '=' not in text and text.strip().lower().endswith(('.yaml', '.yml', '.json'))
