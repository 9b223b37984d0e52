"""The segmentation task: everything the trainer knows about segmenting CamVid with a U-Net.

Builds the model, optimizer, inputs and inference spec from a config; compiles the distributed
train and eval steps (class-weighted cross-entropy with deep supervision, confusion matrices at
label resolution); and, as `SegmentationTask`, gives trainer/loop.py's generic loop what to run
each epoch: training steps, validation with TensorBoard overlays, summaries. Predictions go
through trainer/inference.py, the one inference path.
"""

import contextlib
import dataclasses

import keras
import numpy as np
import tensorflow as tf

from trainer import averaging
from trainer import configs
from trainer import data
from trainer import inference
from trainer import losses
from trainer import metrics as metrics_lib
from trainer import model as model_lib
from trainer import summaries as summaries_lib


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
                                        config.eval.scales != (1.0,) or
                                        any(s % size_multiple(config)
                                            for s in config.data.image_size)),
                              bn_momentum=config.model.bn_momentum,
                              stem_stride=config.model.stem_stride)


def size_multiple(config: configs.Config) -> int:
  return model_lib.size_multiple(config.model.stem_stride, config.model.depth)


def class_weights_for(config: configs.Config, manifest) -> np.ndarray | None:
  if config.loss.class_weighting == 'none':
    return None
  return losses.class_weights_from_counts(manifest.split('train')['class_pixel_counts'],
                                          config.loss.class_weighting, config.loss.max_class_weight)


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
  `train_model` (model.with_auxiliary_heads, for aux_loss_weight) and `average` (for
  ema_momentum) are None when the config does not ask for them. Deep supervision's heads live
  only in `train_model`: best/ and the export hold `model` alone.
  """
  model = build_model(config, num_classes, training=True)
  train_model = (model_lib.with_auxiliary_heads(model, num_classes, config.model.depth)
                 if config.loss.aux_loss_weight else None)
  optimizer = make_optimizer(config, total_steps, steps_per_epoch)
  optimizer.build((train_model or model).trainable_variables)
  momentum = config.optimizer.ema_momentum
  average = averaging.WeightAverage(model, momentum) if momentum else None
  return model, train_model, optimizer, average


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
      standardize=config.data.standardize, flip=config.eval.flip,
      scales=tuple(config.eval.scales), bias=floats(bias),
      class_weights=floats(class_weights), ignore_label=ignore_label)


@dataclasses.dataclass
class Steps:
  """Compiled step functions; each returns sums the caller reduces into epoch metrics.

  train(iterator, n) returns [objective sum, objective weight, confusion matrix, plain
  cross-entropy sum, non-void pixel count]; evaluate(iterator, n) returns [plain cross-entropy
  sum, non-void pixel count, confusion matrix, example count].
  """
  train: tf.types.experimental.GenericFunction
  evaluate: tf.types.experimental.GenericFunction


def training_loss(model, train_model, batch, class_weights, aux_loss_weight: float):
  """The replica's training loss, its reported sums and the main logits.

  Returns (loss, loss_sum, weight_sum, plain_sum, pixel_count, logits): `loss` is what the
  optimizer minimises and loss_sum / weight_sum its replica's share; plain_sum / pixel_count is
  the plain cross-entropy of the main head (no class weights, no deep supervision) over the
  replica's non-void pixels, the definition validation reports.

  The loss is the exact global class-weighted mean (the pixel weight is all-reduced; the
  optimizer sums the replicas' gradients). Deep supervision (`train_model`, the model with
  auxiliary heads) adds `aux_loss_weight` times the mean of the heads' losses, each at its
  head's own resolution against the mask subsampled nearest (nnU-Net's downsampled targets), a
  head position weighted by the crop pixels it stands for: at their own resolution the heads
  make `small`'s step about 1.04x dearer, upsampled to the crop 1.24x.
  """
  if train_model is None:
    logits, aux_logits = model(batch['image'], training=True), []
  else:
    logits, *aux_logits = train_model(batch['image'], training=True)
  log_probs = losses.log_probabilities(logits)
  loss_sum, weight_sum = losses.pixel_loss_sum(batch['mask'], log_probs, normalized=True,
                                               class_weights=class_weights)
  if class_weights is None:
    plain_sum, pixel_count = loss_sum, weight_sum
  else:
    plain_sum, pixel_count = losses.pixel_loss_sum(batch['mask'], log_probs, normalized=True)
  context = tf.distribute.get_replica_context()
  global_weight = tf.maximum(context.all_reduce('sum', weight_sum), 1e-6)
  loss = loss_sum / global_weight
  for aux in aux_logits:
    strides = tf.shape(batch['mask'])[1:3] // tf.shape(aux)[1:3]
    mask = batch['mask'][:, strides[0] // 2::strides[0], strides[1] // 2::strides[1]]
    aux_sum, _ = losses.pixel_loss_sum(mask, losses.log_probabilities(aux), normalized=True,
                                       class_weights=class_weights)
    aux_sum *= (tf.cast(strides[0] * strides[1], tf.float32) * aux_loss_weight /
                len(aux_logits))
    loss += aux_sum / global_weight
    loss_sum += aux_sum
  return loss, loss_sum, weight_sum, plain_sum, pixel_count, logits


def make_steps(model, optimizer, strategy, config, spec: inference.Spec, train_model=None,
               average: averaging.WeightAverage | None = None) -> Steps:
  """Builds the distributed train loop and eval loop.

  The training objective weighs classes by spec.class_weights; the losses training and
  evaluation report are the plain cross-entropy (training_loss); predictions are
  inference.class_ids under spec.bias. `train_model` (model.with_auxiliary_heads of `model`,
  for aux_loss_weight) is what training steps; evaluation runs `model` through
  inference.logits. `average` (for ema_momentum) is updated after every optimizer step.
  """
  num_classes = spec.num_classes
  class_weights = (None if spec.class_weights is None
                   else np.asarray(spec.class_weights, np.float32))
  scale_loss = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

  def train_step(batch):
    with tf.GradientTape() as tape:
      loss, loss_sum, weight_sum, plain_sum, pixel_count, logits = training_loss(
          model, train_model, batch, class_weights, config.loss.aux_loss_weight)
      scaled = optimizer.scale_loss(loss) if scale_loss else loss
    variables = (train_model or model).trainable_variables
    optimizer.apply_gradients(zip(tape.gradient(scaled, variables), variables))
    predictions = inference.class_ids(logits, spec.bias)
    cm = metrics_lib.confusion_matrix(batch['mask'], predictions, num_classes)
    return loss_sum, weight_sum, cm, plain_sum, pixel_count

  def eval_step(batch):
    # Metrics at label resolution: predictions go up, labels never down.
    logits = inference.logits(model, batch['image'], spec, tf.shape(batch['mask'])[1:3])
    valid = tf.cast(batch['valid'], tf.float32)
    loss_sum, weight_sum = losses.pixel_loss_sum(batch['mask'], logits, sample_weight=valid)
    cm = metrics_lib.confusion_matrix(batch['mask'], inference.class_ids(logits, spec.bias),
                                      num_classes, sample_weight=valid)
    return loss_sum, weight_sum, cm, tf.reduce_sum(tf.cast(batch['valid'], tf.int64))

  # XLA compiles the replica's step, not the loop around it: the loop reads the input
  # iterator, which XLA has no kernel for (IteratorGetNext).
  replica_step = (tf.function(train_step, jit_compile=True) if config.runtime.jit_compile
                  else train_step)
  after_step = (lambda: average.update(optimizer.iterations)) if average is not None else None
  cm_zeros = tf.zeros([num_classes] * 2, tf.int64)
  return Steps(
      train=_summing_loop(strategy, replica_step, [0.0, 0.0, cm_zeros, 0.0, 0.0], after_step),
      evaluate=_summing_loop(strategy, eval_step, [0.0, 0.0, cm_zeros, tf.constant(0, tf.int64)]))


def _summing_loop(strategy, replica_step, zeros, after_step=None):
  """A tf.function running `replica_step` num_steps times, summing its replica-summed outputs."""

  @tf.function(reduce_retracing=True)
  def loop(iterator, num_steps):
    totals = [tf.convert_to_tensor(z) for z in zeros]
    for _ in tf.range(num_steps):
      outputs = [strategy.reduce('sum', v, axis=None)
                 for v in strategy.run(replica_step, args=(next(iterator),))]
      if after_step is not None:
        after_step()
      totals = [t + v for t, v in zip(totals, outputs)]
    return totals

  return loop


def evaluate(steps: Steps, runtime, manifest, split: str, config, class_names) -> dict:
  """Distributed evaluation of `split`: every example counted exactly once, padding masked.

  `loss` is the plain cross-entropy (no class weights) of the inference logits over non-void
  pixels, at label resolution.
  """
  dataset = runtime.strategy.distribute_datasets_from_function(
      lambda ctx: data.eval_dataset(manifest, split, config, ctx))
  num_steps = data.eval_steps(manifest, split, config, runtime.num_replicas,
                              runtime.num_workers)
  loss_sum, weight_sum, cm, count = steps.evaluate(iter(dataset), tf.constant(num_steps))
  result = {'split': split, 'num_examples': int(count),
            'loss': float(loss_sum / max(float(weight_sum), 1e-6))}
  result.update(metrics_lib.compute_metrics(cm.numpy(), class_names))
  return result


def _train_losses(totals) -> dict:
  """{'loss': plain cross-entropy, 'objective': training objective} of summed train outputs."""
  loss_sum, weight_sum, _, plain_sum, pixel_count = totals
  return {'loss': float(plain_sum / max(float(pixel_count), 1e-6)),
          'objective': float(loss_sum / max(float(weight_sum), 1e-6))}


class SegmentationTask:
  """What trainer/loop.py runs each epoch (its Task protocol), for segmentation."""
  best_metric = 'mean_iou'
  best_metric_label = 'mIoU'

  def __init__(self, config, manifest, spec: inference.Spec, runtime, model, steps: Steps,
               average: averaging.WeightAverage | None, log_dir: str | None):
    self.config, self.manifest, self.spec, self.runtime = config, manifest, spec, runtime
    self.model, self.steps, self.average = model, steps, average
    self.summaries = summaries_lib.Summaries(log_dir if runtime.is_chief else None,
                                             spec.class_names, spec.class_colors)
    self.summaries.layout()
    # Every worker predicts the fixed frames (reading BatchNorm's sync-on-read statistics is a
    # collective under MultiWorkerMirroredStrategy); only the chief's writer records them.
    self.fixed_frames = data.summary_examples(manifest, 'val', config,
                                              config.eval.num_summary_images)
    self.train_input = data.TrainInput(manifest, config)

  def describe_input(self) -> str:
    cached = self.train_input.caches(self.runtime.num_workers)
    mib = (self.train_input.cache_bytes(self.runtime.num_workers) or 0) / 2**20
    return (f'train frames: {"decoded once, kept in memory" if cached else "decoded every epoch"}'
            f' ({mib:.0f} MiB decoded per worker; cache_decoded_mb '
            f'{self.config.runtime.cache_decoded_mb})')

  def train_iterator(self, epoch: int, start_step: int):
    """One iterator over all remaining epochs, the first shortened by the steps already done."""
    epochs = self.config.trainer.epochs - epoch
    return iter(self.runtime.strategy.distribute_datasets_from_function(
        lambda ctx: self.train_input(ctx, epoch, start_step, epochs)))

  def train(self, iterator, num_steps: int):
    return self.steps.train(iterator, tf.constant(num_steps))

  def train_result(self, totals) -> dict:
    """Epoch metrics: `loss` as validation defines it, `objective` what the optimizer minimises."""
    result = _train_losses(totals)
    result.update(metrics_lib.compute_metrics(totals[2], list(self.spec.class_names)))
    return result

  def write_step_summaries(self, step: int, totals, learning_rate: float,
                           images_per_second: float) -> None:
    """Scalars of one step group (its summed `train` outputs) at global step `step`."""
    self.summaries.step(step, {**_train_losses(totals), 'learning_rate': learning_rate,
                               'images_per_second': images_per_second})

  def validation(self, enabled: bool):
    """Validation, its overlays and best/ see the averaged weights (ema_momentum)."""
    return self.average.swapped(enabled) if self.average else contextlib.nullcontext()

  def validate(self, epoch: int) -> dict:
    result = evaluate(self.steps, self.runtime, self.manifest, 'val', self.config,
                      list(self.spec.class_names))
    if self.fixed_frames:
      images = np.stack([f['image'] for f in self.fixed_frames])
      predictions = inference.predict(self.model, images, self.spec, self.config.data.image_size)
      self.summaries.overlays(epoch, self.fixed_frames, list(predictions.numpy()))
    return result

  def write_summaries(self, epoch: int, train: dict, val: dict | None, lr: float) -> None:
    self.summaries.epoch(epoch, train, val, lr)
    self.summaries.flush()
