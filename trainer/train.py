"""The training loop: one custom distributed loop for every strategy, with resume and preemption.

Keras 3's `model.fit`, its metric reduction and `BackupAndRestore` break under
MultiWorkerMirroredStrategy in TF 2.21 (keras-team/keras#20585, tensorflow/tensorflow#72388), so
training runs `strategy.run` over distributed datasets and checkpoints with
`tf.train.CheckpointManager`, as TF Model Garden's Orbit does. The same code runs under the
default strategy, MirroredStrategy and MultiWorkerMirroredStrategy.

model_dir layout:
  config.json            resolved config (chief, before training)
  checkpoints/           last + resumable backups (every backup_every_steps and each epoch)
  best/                  best-by-val-mIoU weights
  logs/{train,val}/      TensorBoard
  history.csv            one row per completed epoch (see history.py)
  export/                model.keras, serving/ SavedModel, labels.json
  calibration.json       per-class decision bias fitted on config.eval.calibration_split (if set)
  metrics.json           evaluation of the best checkpoint on val
"""

import contextlib
import dataclasses
import json
import logging
import math
import signal
import threading
import time

import keras
import numpy as np
import tensorflow as tf

from camvid_common import fileio
from camvid_common.errors import ConfigError
from camvid_common.fileio import write_atomic
from tfrecords_builder import manifest as manifest_lib
from trainer import averaging
from trainer import calibration
from trainer import configs
from trainer import data
from trainer import distribution
from trainer import export as export_lib
from trainer import history as history_lib
from trainer import inference
from trainer import losses
from trainer import metrics as metrics_lib
from trainer import model as model_lib
from trainer import summaries as summaries_lib

CONFIG_NAME = 'config.json'
METRICS_NAME = 'metrics.json'
# Keys train.run adds to config.json besides the config: facts of the run, not settings.
RUN_FACTS = ('resolved_precision', 'strategy_used', 'num_replicas', 'num_workers', 'data_dir')


class Preempted(Exception):
  """Raised after a SIGTERM once the backup is saved; the entry point exits retryably."""


def build_model(config: configs.Config, num_classes: int, training: bool = False) -> keras.Model:
  """The config's U-Net; the training one takes crops, others whole frames at image_size.

  The training model normalises with TensorFlow's fused batch-norm kernel unless its statistics
  must be synchronised across replicas (sync_batchnorm with more than one replica in the
  current strategy): over one replica synchronised and local BatchNorm compute the same thing,
  and the fused kernel trains `small` ~1.1x faster on a CPU (model.FusedBatchNormalization).
  The variables are the same, so checkpoints restore into either; evaluation and export build
  the plain Keras layer.
  """
  replicas = tf.distribute.get_strategy().num_replicas_in_sync
  fused = training and not (config.model.sync_batchnorm and replicas > 1)
  return model_lib.build_unet(num_classes, image_size=config.data.image_size,
                              base_filters=config.model.base_filters, depth=config.model.depth,
                              dropout=config.model.dropout,
                              sync_batchnorm=config.model.sync_batchnorm and not fused,
                              fused_batchnorm=fused,
                              any_size=((training and config.data.crop_size is not None) or
                                        config.eval.scales != (1.0,)),
                              bn_momentum=config.model.bn_momentum,
                              stem_stride=config.model.stem_stride)


def size_multiple(config: configs.Config) -> int:
  return model_lib.size_multiple(config.model.stem_stride, config.model.depth)


def class_weights_for(config: configs.Config, manifest) -> np.ndarray | None:
  if config.loss.class_weighting == 'none':
    return None
  return losses.class_weights_from_counts(manifest.split('train')['class_pixel_counts'],
                                          config.loss.class_weighting,
                                          config.loss.max_class_weight)


def peak_learning_rate(config: configs.Config) -> float:
  if config.optimizer.lr_scaling == 'linear':
    return (config.optimizer.learning_rate * config.data.batch_size /
            config.optimizer.base_batch_size)
  return config.optimizer.learning_rate


def make_optimizer(config: configs.Config, total_steps: int,
                   steps_per_epoch: int) -> keras.optimizers.Optimizer:
  """Optimizer and schedule from the config (warm-up, then cosine decay to zero)."""
  peak = peak_learning_rate(config)
  warmup = min(int(round(config.optimizer.warmup_epochs * steps_per_epoch)), total_steps - 1)
  if config.optimizer.lr_schedule == 'cosine':
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else peak, decay_steps=max(total_steps - warmup, 1),
        warmup_target=peak if warmup else None, warmup_steps=warmup)
  else:
    schedule = peak
  common = {'learning_rate': schedule, 'clipnorm': config.optimizer.clipnorm}
  if config.optimizer.name == 'adamw':
    optimizer = keras.optimizers.AdamW(weight_decay=config.optimizer.weight_decay, **common)
    # Decaying BatchNorm scales/offsets and biases only fights the normalisation.
    optimizer.exclude_from_weight_decay(var_names=['gamma', 'beta', 'bias'])
  elif config.optimizer.name == 'adam':
    optimizer = keras.optimizers.Adam(**common)
  else:
    optimizer = keras.optimizers.SGD(momentum=0.9, nesterov=True, **common)
  if keras.mixed_precision.global_policy().name == 'mixed_float16':
    optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
  return optimizer


def build_trainables(config: configs.Config, num_classes: int, total_steps: int,
                     steps_per_epoch: int):
  """The training model, its deep-supervision twin, the built optimizer and the weight average.

  Call inside the strategy's scope. Returns (model, train_model, optimizer, average):
  `train_model` (model.with_auxiliary_heads, for loss.aux_loss_weight) and `average` (for
  optimizer.ema_momentum) are None when the config does not ask for them. Deep supervision's
  heads live only in `train_model`: best/ and the export hold `model` alone.
  """
  model = build_model(config, num_classes, training=True)
  train_model = (model_lib.with_auxiliary_heads(model, num_classes, config.model.depth)
                 if config.loss.aux_loss_weight else None)
  optimizer = make_optimizer(config, total_steps, steps_per_epoch)
  optimizer.build((train_model or model).trainable_variables)
  average = (averaging.WeightAverage(model, config.optimizer.ema_momentum)
             if config.optimizer.ema_momentum else None)
  return model, train_model, optimizer, average


def current_learning_rate(optimizer) -> float:
  lr = optimizer.learning_rate
  return float(lr.numpy() if hasattr(lr, 'numpy') else lr)


@dataclasses.dataclass
class Steps:
  """Compiled step functions; each returns sums the caller reduces into epoch metrics."""
  train: tf.types.experimental.GenericFunction
  evaluate: tf.types.experimental.GenericFunction
  agree: tf.types.experimental.GenericFunction


def inference_spec(config: configs.Config, class_names, class_weights=None, class_colors=None,
                   ignore_label: int = 255) -> inference.Spec:
  """How a model trained under `config` with these class weights predicts, before calibration.

  The bias is the config's logit adjustment of the weights; colours default to black.
  """
  bias = losses.logit_adjustment_bias(class_weights, config.eval.logit_adjustment)
  floats = lambda values: None if values is None else tuple(float(v) for v in values)
  return inference.Spec(
      class_names=tuple(class_names),
      class_colors=tuple(tuple(c) for c in (class_colors or [(0, 0, 0)] * len(class_names))),
      image_size=tuple(config.data.image_size), size_multiple=size_multiple(config),
      flip=config.eval.flip, scales=tuple(config.eval.scales), bias=floats(bias),
      class_weights=floats(class_weights), ignore_label=ignore_label)


def make_steps(model, optimizer, strategy, config, spec: inference.Spec, train_model=None,
               average: averaging.WeightAverage | None = None) -> Steps:
  """Builds the distributed train loop, eval loop and a cross-worker flag agreement.

  Losses weigh classes by spec.class_weights; predictions are inference.class_ids under
  spec.bias. `train_model` (model.with_auxiliary_heads of `model`, for aux_loss_weight) is
  what training steps; evaluation runs `model` through inference.logits. `average` (for
  ema_momentum) is updated after every optimizer step.
  """
  num_classes = spec.num_classes
  class_weights = (None if spec.class_weights is None
                   else np.asarray(spec.class_weights, np.float32))
  loss_kw = {'class_weights': class_weights}
  scale_loss = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

  def predict(logits):
    return inference.class_ids(logits, spec.bias)

  def train_step(batch):
    with tf.GradientTape() as tape:
      if train_model is None:
        logits, aux_logits = model(batch['image'], training=True), []
      else:
        logits, *aux_logits = train_model(batch['image'], training=True)
      loss_sum, weight_sum = losses.pixel_loss_sum(
          batch['mask'], losses.log_probabilities(logits), normalized=True, **loss_kw)
      # The exact global weighted mean: gradients are summed over replicas by the optimizer.
      context = tf.distribute.get_replica_context()
      global_weight = tf.maximum(context.all_reduce('sum', weight_sum), 1e-6)
      loss = loss_sum / global_weight
      # Deep supervision: the mean of the heads' pixel losses with the same pixel weights and
      # normalisation as the main loss, each at its head's own resolution against the mask
      # subsampled nearest (nnU-Net's downsampled targets), a head position weighted by the
      # crop pixels it stands for. At their own resolution the heads make `small`'s step about
      # 1.04x dearer; upsampled to the crop, 1.24x (README, Benchmarks).
      for aux in aux_logits:
        strides = tf.shape(batch['mask'])[1:3] // tf.shape(aux)[1:3]
        mask = batch['mask'][:, strides[0] // 2::strides[0], strides[1] // 2::strides[1]]
        aux_sum, _ = losses.pixel_loss_sum(mask, losses.log_probabilities(aux),
                                           normalized=True, **loss_kw)
        aux_sum *= (tf.cast(strides[0] * strides[1], tf.float32) * config.loss.aux_loss_weight /
                    len(aux_logits))
        loss += aux_sum / global_weight
        loss_sum += aux_sum
      scaled = optimizer.scale_loss(loss) if scale_loss else loss
    variables = (train_model or model).trainable_variables
    grads = tape.gradient(scaled, variables)
    optimizer.apply_gradients(zip(grads, variables))
    predictions = predict(logits)
    cm = metrics_lib.confusion_matrix(batch['mask'], predictions, num_classes)
    return loss_sum, weight_sum, cm

  def reduce(values):
    return [strategy.reduce('sum', v, axis=None) for v in values]

  # XLA compiles the replica's step, not the loop around it: the loop reads the input
  # iterator, which XLA has no kernel for (IteratorGetNext).
  replica_step = (tf.function(train_step, jit_compile=True) if config.runtime.jit_compile
                  else train_step)

  @tf.function
  def train_loop(iterator, num_steps):
    totals = [tf.constant(0.0), tf.constant(0.0), tf.zeros([num_classes] * 2, tf.int64)]
    for _ in tf.range(num_steps):
      step_totals = reduce(strategy.run(replica_step, args=(next(iterator),)))
      if average is not None:
        average.update(optimizer.iterations)
      totals = [a + b for a, b in zip(totals, step_totals)]
    return totals

  def eval_step(batch):
    # Metrics at label resolution: predictions go up, labels never down.
    logits = inference.logits(model, batch['image'], spec, tf.shape(batch['mask'])[1:3])
    valid = tf.cast(batch['valid'], tf.float32)
    loss_sum, weight_sum = losses.pixel_loss_sum(batch['mask'], logits, sample_weight=valid,
                                                 **loss_kw)
    predictions = predict(logits)
    cm = metrics_lib.confusion_matrix(batch['mask'], predictions, num_classes,
                                      sample_weight=valid)
    return loss_sum, weight_sum, cm, tf.reduce_sum(tf.cast(batch['valid'], tf.int64))

  @tf.function(reduce_retracing=True)
  def eval_loop(iterator, num_steps):
    totals = [tf.constant(0.0), tf.constant(0.0), tf.zeros([num_classes] * 2, tf.int64),
              tf.constant(0, tf.int64)]
    for _ in tf.range(num_steps):
      step_totals = reduce(strategy.run(eval_step, args=(next(iterator),)))
      totals = [a + b for a, b in zip(totals, step_totals)]
    return totals

  @tf.function
  def agree(flag):
    # Any worker's flag stops every worker at the same step (collectives must stay in step).
    per_replica = strategy.run(lambda: tf.cast(flag, tf.int32))
    return strategy.reduce('sum', per_replica, axis=None) > 0

  return Steps(train=train_loop, evaluate=eval_loop, agree=agree)


def evaluate(steps: Steps, runtime, manifest, split: str, config, class_names) -> dict:
  """Distributed evaluation of `split`: every example counted exactly once, padding masked."""
  dataset = runtime.strategy.distribute_datasets_from_function(
      lambda ctx: data.eval_dataset(manifest, split, config, ctx))
  num_steps = data.eval_steps(manifest, split, config, runtime.num_replicas,
                              runtime.num_workers)
  loss_sum, weight_sum, cm, count = steps.evaluate(iter(dataset), tf.constant(num_steps))
  result = {'split': split, 'num_examples': int(count),
            'loss': float(loss_sum / max(float(weight_sum), 1e-6))}
  result.update(metrics_lib.compute_metrics(cm.numpy(), class_names))
  return result


class _SigtermFlag:
  """Turns SIGTERM (pod preemption) into a flag the loop checks between step groups."""

  def __init__(self):
    self.event = threading.Event()
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self.event.set())
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class _Profiler:
  """Traces global steps [first, last] for TensorBoard's profiler (--profile_steps)."""

  def __init__(self, steps, log_dir: str, log):
    self._steps, self._log_dir, self._log, self._active = steps, log_dir, log, False

  def before(self, step: int) -> None:
    if self._steps and not self._active and self._steps[0] <= step + 1 <= self._steps[1]:
      tf.profiler.experimental.start(self._log_dir)
      self._active = True

  def after(self, step: int) -> None:
    if self._active and step >= self._steps[1]:
      tf.profiler.experimental.stop()
      self._active = False
      self._steps = None
      self._log(f'profile written to {self._log_dir}')


def load_config(model_dir: str) -> configs.Config:
  """The resolved config a run recorded in model_dir/config.json (run facts dropped).

  Reads the nested config.json and the flat one of runs from before the config was grouped
  (its keys through configs.FLAT_NAMES). Keys of removed options (configs.REMOVED_OPTIONS) are
  dropped when they hold the value that meant "off"; a run that used one trained a model this
  trainer cannot build, so it is refused.
  """
  path = f'{model_dir.rstrip("/")}/{CONFIG_NAME}'
  if not tf.io.gfile.exists(path):
    raise ConfigError(f'{path}: not found; is {model_dir} a trainer model_dir?')
  with tf.io.gfile.GFile(path) as f:
    values = json.load(f)
  # A flat file's removed `loss: "ce"` shares its key with the nested file's `loss` group.
  removed = {k: v for k, v in values.items() if k in configs.REMOVED_OPTIONS and
             not (k in configs.GROUPS and isinstance(v, dict))}
  used = [f'{k} {json.dumps(v)}' for k, v in removed.items() if v != configs.REMOVED_OPTIONS[k]]
  if used:
    raise ConfigError(f'{path}: the run used {", ".join(used)}, removed from the trainer '
                      '(docs/experiments.md); it cannot be resumed or evaluated by this version')
  try:
    return configs.override(configs.Config(), {
        k: v for k, v in values.items() if k not in removed and k not in RUN_FACTS}, path)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def check_resumable(model_dir: str, config: configs.Config) -> None:
  """Refuses to resume model_dir's checkpoint under a config that trains something else.

  Only fields of groups that are not RESUMABLE count (model, data, optimizer, loss and the
  top-level ones: what the checkpoint learned from). Without this a rerun with other settings
  would silently continue the old weights and then overwrite config.json, which would no longer
  say how the reported model was trained.
  """
  recorded = load_config(model_dir)
  changed = [f'{path} {_show(configs.get(recorded, path))} -> {_show(configs.get(config, path))}'
             for path in configs.FIELDS
             if not configs.resumable(path) and
             configs.get(recorded, path) != configs.get(config, path)]
  if changed:
    raise ConfigError(f'{model_dir}/{CONFIG_NAME}: the checkpoint to resume was trained with '
                      f'other settings ({", ".join(changed)}); rerun with the same settings to '
                      'resume it, or use a new --model_dir')


def _show(value) -> str:
  return 'x'.join(map(str, value)) if isinstance(value, tuple) else str(value)


def _write_json(path: str, value) -> None:
  write_atomic(path, json.dumps(value, indent=2) + '\n')


def run(config: configs.Config, data_dir: str, model_dir: str, *,
        runtime: distribution.Runtime | None = None, log=logging.info,
        checkpoint_dir: str | None = None, log_dir: str | None = None,
        export: bool = True) -> dict:
  """Trains, evaluates the best checkpoint on val, exports; returns the final metrics.

  Re-running the same call continues from the last backup in model_dir.

  Args:
    config: the resolved config.
    data_dir: a tfrecords_builder output dir.
    model_dir: where config.json, history.csv, metrics.json and export/ go.
    runtime: the distribution runtime (default: created from the config).
    log: where progress lines go.
    checkpoint_dir: backups and best weights (default model_dir; Vertex AI's AIP_CHECKPOINT_DIR).
    log_dir: TensorBoard logs (default model_dir/logs; Vertex AI's AIP_TENSORBOARD_LOG_DIR).
    export: write export/ at the end (a tuner's trials skip it).

  Raises:
    ConfigError / InputError: bad config or data, before any training.
    Preempted: SIGTERM received; a backup was saved first.
  """
  configs.validate(config)
  for flag, path in (('--data_dir', data_dir), ('--model_dir', model_dir),
                     ('AIP_CHECKPOINT_DIR', checkpoint_dir), ('AIP_TENSORBOARD_LOG_DIR', log_dir)):
    fileio.check_bucket(path, flag)
  model_dir = model_dir.rstrip('/')
  manifest = manifest_lib.read(data_dir.rstrip('/'))
  for split in ('train', 'val') + ((config.eval.calibration_split,)
                                    if config.eval.calibration_split else ()):
    manifest.split(split)
  runtime = runtime or distribution.create_runtime(
      config.runtime.strategy, config.runtime.mixed_precision,
      config.runtime.peer_timeout_seconds)
  strategy = runtime.strategy
  if config.runtime.jit_compile and runtime.kind != 'default':
    # Under these strategies XLA's step reads replica 1's variables from replica 0's device and
    # fails (tensorflow/tensorflow#45940, on GPUs too); Keras' own jit_compile="auto" turns XLA
    # off under any tf.distribute strategy for the same reason.
    raise ConfigError(f'jit_compile: XLA cannot compile the step under the {runtime.kind} '
                      'strategy (replicas keep variables on other devices); use it with '
                      '--strategy default')
  data.check_batch(config.data.batch_size, runtime.num_replicas, '--batch_size')
  data.check_batch(config.eval.batch_size or config.data.batch_size, runtime.num_replicas,
                   'eval.batch_size')
  num_classes, class_names = manifest.num_classes, manifest.class_names
  steps_per_epoch = config.steps_per_epoch or data.steps_per_pass(
      manifest, 'train', config.data.batch_size, runtime.num_workers)
  total_steps = steps_per_epoch * config.trainer.epochs
  log(f'distribution: {runtime.describe()}')
  log(f'batch: global {config.data.batch_size}, per replica '
      f'{config.data.batch_size // runtime.num_replicas}; learning rate '
      f'{peak_learning_rate(config):g} (scaling: {config.optimizer.lr_scaling}); '
      f'{steps_per_epoch} steps/epoch, {config.trainer.epochs} epochs')

  checkpoint_root = (checkpoint_dir or model_dir).rstrip('/')
  ckpt_dir, best_dir = f'{checkpoint_root}/checkpoints', f'{checkpoint_root}/best'
  latest = tf.train.latest_checkpoint(ckpt_dir)
  if latest and tf.io.gfile.exists(f'{model_dir}/{CONFIG_NAME}'):
    check_resumable(model_dir, config)

  resolved = config.to_dict() | {'resolved_precision': runtime.precision,
                                           'strategy_used': runtime.kind,
                                           'num_replicas': runtime.num_replicas,
                                           'num_workers': runtime.num_workers,
                                           'data_dir': data_dir}
  if runtime.is_chief:
    tf.io.gfile.makedirs(model_dir)
    _write_json(f'{model_dir}/{CONFIG_NAME}', resolved)

  spec = inference_spec(config, class_names, class_weights_for(config, manifest),
                        manifest.class_colors, manifest.ignore_label)
  if spec.class_weights is not None:
    log('class weights: ' + ', '.join(f'{n} {w:.2f}' for n, w in zip(class_names,
                                                                      spec.class_weights)))
  if runtime.is_chief:
    # Before training, so a model_dir is evaluable (trainer.evaluate) from its first backup on;
    # post-training rewrites it with the calibrated bias.
    inference.write(model_dir, spec)

  with strategy.scope():
    model, train_model, optimizer, average = build_trainables(config, num_classes, total_steps,
                                                              steps_per_epoch)
  # Bookkeeping only the Python loop reads: plain variables, identical on every worker.
  epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False, name='epoch')
  step_in_epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name='step_in_epoch')
  best_miou = tf.Variable(-1.0, dtype=tf.float64, trainable=False, name='best_miou')
  best_epoch = tf.Variable(-1, dtype=tf.int64, trainable=False, name='best_epoch')
  stopped = tf.Variable(False, trainable=False, name='stopped_early')
  checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=epoch_var,
                                   step_in_epoch=step_in_epoch, best_miou=best_miou,
                                   best_epoch=best_epoch, stopped_early=stopped,
                                   **({'train_model': train_model} if train_model else {}),
                                   **({'weight_average': average.variables} if average else {}))
  log_dir = (log_dir or f'{model_dir}/logs').rstrip('/')
  if latest:
    checkpoint.restore(latest).assert_existing_objects_matched()
    log(f'resumed from {latest}: epoch {int(epoch_var)}, step {int(step_in_epoch)} of it')
  manager = tf.train.CheckpointManager(checkpoint, distribution.write_dir(ckpt_dir, runtime),
                                       max_to_keep=2)
  best_manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model),
                                            distribution.write_dir(best_dir, runtime),
                                            max_to_keep=1)

  def global_step() -> int:
    return int(optimizer.iterations.numpy())

  def save(target):
    target.save(checkpoint_number=global_step())
    distribution.cleanup_write_dir(target.directory, runtime)

  history_path = f'{model_dir}/{history_lib.HISTORY_NAME}'
  rows = history_lib.completed(history_lib.read(history_path), int(epoch_var))
  summaries = summaries_lib.Summaries(log_dir if runtime.is_chief else None,
                                      class_names, manifest.class_colors)
  # Every worker predicts the fixed frames (reading BatchNorm's sync-on-read statistics is a
  # collective under MultiWorkerMirroredStrategy); only the chief's summaries writer records them.
  fixed_frames = data.first_examples(manifest, 'val', config, config.eval.num_summary_images)
  steps = make_steps(model, optimizer, strategy, config, spec, train_model=train_model,
                     average=average)
  train_input = data.TrainInput(manifest, config)
  cached = train_input.caches(runtime.num_workers)
  log(f'train frames: {"decoded once, kept in memory" if cached else "decoded every epoch"} '
      f'({(train_input.cache_bytes(runtime.num_workers) or 0) / 2**20:.0f} MiB decoded per '
      f'worker; runtime.cache_decoded_mb {config.runtime.cache_decoded_mb})')

  profiler = _Profiler(config.trainer.profile_steps if runtime.is_chief else None,
                       f'{log_dir}/profile', log)
  # One dataset for all remaining epochs (each yields exactly steps_per_epoch batches, the
  # first fewer by the steps already done): a new dataset per epoch made every epoch wait for
  # its pipeline to be built and started.
  iterator = None
  with _SigtermFlag() as sigterm:
    while int(epoch_var) < config.trainer.epochs and not bool(stopped.numpy()):
      epoch, start_step = int(epoch_var), int(step_in_epoch)
      started = time.perf_counter()
      if iterator is None:
        iterator = iter(strategy.distribute_datasets_from_function(
            lambda ctx, e=epoch, s=start_step: train_input(ctx, e, s, config.trainer.epochs - e)))
      totals = [0.0, 0.0, np.zeros([num_classes] * 2, np.int64)]
      step = start_step
      while step < steps_per_epoch:
        backup_every = config.trainer.backup_every_steps
        until_backup = (backup_every - global_step() % backup_every) if backup_every else math.inf
        n = int(min(config.trainer.steps_per_loop, steps_per_epoch - step, until_backup))
        profiler.before(global_step())
        out = steps.train(iterator, tf.constant(n))
        totals = [a + b.numpy() for a, b in zip(totals, out)]
        step += n
        step_in_epoch.assign(step)
        profiler.after(global_step())
        if backup_every and global_step() % backup_every == 0:
          save(manager)
        if bool(steps.agree(tf.constant(sigterm.event.is_set()))):
          save(manager)
          raise Preempted(f'SIGTERM: saved a backup at epoch {epoch} step {step}')
      train_seconds = time.perf_counter() - started
      train_result = {'loss': float(totals[0] / max(totals[1], 1e-6))}
      train_result.update(metrics_lib.compute_metrics(totals[2], class_names))
      validate = ((epoch + 1) % config.eval.every_epochs == 0 or
                  epoch + 1 == config.trainer.epochs)
      # Validation, its overlays and best/ see the averaged weights (ema_momentum).
      with (average.swapped(validate) if average else contextlib.nullcontext()):
        val_result = (evaluate(steps, runtime, manifest, 'val', config, class_names) if validate
                      else {'loss': None, 'pixel_accuracy': None, 'mean_iou': None})
        if fixed_frames and validate:
          images = np.stack([f['image'] for f in fixed_frames])
          predictions = inference.predict(model, images, spec, config.data.image_size).numpy()
          summaries.overlays(epoch, fixed_frames, list(predictions))
        if validate and ((val_result['mean_iou'] or 0.0) >
                         float(best_miou) + config.trainer.early_stopping_min_delta):
          best_miou.assign(val_result['mean_iou'])
          best_epoch.assign(epoch)
          save(best_manager)
      seconds = time.perf_counter() - started
      lr = current_learning_rate(optimizer)
      images_per_s = (step - start_step) * config.data.batch_size / max(train_seconds, 1e-9)
      message = f'epoch {epoch + 1}/{config.trainer.epochs}: loss {train_result["loss"]:.4f}'
      if validate:
        message += (f', val loss {val_result["loss"]:.4f}, val pixel acc '
                    f'{val_result["pixel_accuracy"]:.4f}, val mIoU {val_result["mean_iou"]:.4f}')
      log(message + f' (train {train_seconds:.1f} s, {images_per_s:.1f} img/s'
          + (f'; val {seconds - train_seconds:.1f} s)' if validate else ')'))
      summaries.epoch(epoch, train_result, val_result if validate else None, lr)
      summaries.flush()
      # The history row goes before the backup below: a crash between them makes the epoch
      # rerun and its row be replaced, never duplicated or lost.
      rows = history_lib.completed(rows, epoch) + [{
          'epoch': epoch, 'train_loss': train_result['loss'],
          'train_pixel_accuracy': train_result['pixel_accuracy'],
          'train_mean_iou': train_result['mean_iou'], 'val_loss': val_result['loss'],
          'val_pixel_accuracy': val_result['pixel_accuracy'],
          'val_mean_iou': val_result['mean_iou'], 'learning_rate': lr,
          'seconds': round(seconds, 2), 'train_images_per_s': round(images_per_s, 2)}]
      if runtime.is_chief:
        history_lib.write(history_path, rows)
      patience = config.trainer.early_stopping_patience
      if patience and epoch - int(best_epoch) >= patience:
        stopped.assign(True)
        log(f'early stop: no better val mIoU for {patience} epochs (best: epoch '
            f'{int(best_epoch) + 1}, {float(best_miou):.4f})')
      epoch_var.assign(epoch + 1)
      step_in_epoch.assign(0)
      save(manager)

  log(f'worker {runtime.worker_index}: final weights checksum {weights_checksum(model):.9e}')
  if not runtime.is_chief:
    return {}
  return finish(config, spec, manifest, model_dir, tf.train.latest_checkpoint(best_dir), log,
                export)


def weights_checksum(model) -> float:
  """Sum of |w| over trainable weights: equal on all workers of a correct synchronous run."""
  return float(sum(np.abs(np.asarray(v, np.float64)).sum() for v in model.trainable_weights))


def restore_model(config: configs.Config, spec: inference.Spec, checkpoint: str) -> keras.Model:
  """The inference model (whole frames) of `config` with `checkpoint`'s weights."""
  model = build_model(config, spec.num_classes)
  status = tf.train.Checkpoint(model=model).restore(checkpoint).expect_partial()
  try:
    status.assert_existing_objects_matched()
  except AssertionError:
    raise ConfigError(f'{checkpoint}: does not match the model of its config.json with '
                      f'{spec.num_classes} classes') from None
  return model


def evaluate_model(model, config, spec: inference.Spec, manifest, split: str,
                   runtime: distribution.Runtime | None = None) -> dict:
  """Evaluates `split` with `model` under `spec` (default: this process alone, one device)."""
  runtime = runtime or distribution.Runtime(
      strategy=tf.distribute.get_strategy(), kind='default', is_chief=True, worker_index=0,
      num_workers=1, precision=keras.mixed_precision.global_policy().name)
  steps = make_steps(model, None, runtime.strategy, config, spec)
  return evaluate(steps, runtime, manifest, split, config, list(spec.class_names))


def finish(config, spec: inference.Spec, manifest, model_dir: str, checkpoint: str, log,
           export: bool = True) -> dict:
  """Post-training, chief only: calibration (if configured), final evaluation on val, export.

  Runs on a fresh single-device model restored from `checkpoint` (the best), so no collective
  op (which the other workers would have to join) is involved. Writes calibration.json,
  inference.json (the spec with the calibrated bias), metrics.json and export/.
  """
  model = restore_model(config, spec, checkpoint)
  uncalibrated = None
  if config.eval.calibration_split:
    record = calibration.calibrate(model, manifest, config.eval.calibration_split, config, spec)
    calibration.write(model_dir, record)
    change = np.asarray(record['bias']) - np.asarray(record['initial_bias'])
    # None when the split has no labelled pixels (the bias then stays at its start).
    before, after = (f'{v:.4f}' if v is not None else 'n/a'
                     for v in (record['mean_iou_before'], record['mean_iou_after']))
    log(f'calibration on {record["split"]} ({record["num_pixels"]} pixels): mIoU there '
        f'{before} -> {after}; bias change ' +
        ', '.join(f'{n} {d:+.1f}' for n, d in zip(spec.class_names, change) if d))
    uncalibrated = evaluate_model(model, config, spec, manifest, 'val')
    spec = spec.replace(bias=tuple(record['bias']))
  inference.write(model_dir, spec)
  result = evaluate_model(model, config, spec, manifest, 'val')
  result['checkpoint'] = checkpoint
  if uncalibrated is not None:
    result['calibration_split'] = config.eval.calibration_split
    result['uncalibrated'] = {k: uncalibrated[k] for k in ('mean_iou', 'pixel_accuracy')}
    log(f'val without calibration: mIoU {uncalibrated["mean_iou"]:.4f}, pixel accuracy '
        f'{uncalibrated["pixel_accuracy"]:.4f}')
  _write_json(f'{model_dir}/{METRICS_NAME}', result)
  log(f'best checkpoint {checkpoint}: val mIoU {result["mean_iou"]:.4f}, pixel accuracy '
      f'{result["pixel_accuracy"]:.4f}')
  if export:
    export_lib.export_model(model, f'{model_dir}/export', spec)
    log(f'exported to {model_dir}/export')
  return result
