"""Trains one run (a config and a data dir in, a model_dir out): the task, loop, post-training.

Every strategy (default, MirroredStrategy, MultiWorkerMirroredStrategy) runs the same code:
trainer/segmentation.py builds what to train, trainer/loop.py runs the epochs with resumable
backups and preemption, trainer/posttrain.py calibrates, evaluates and exports on the chief.

model_dir layout:
  config.json            resolved config (chief, before training)
  inference.json         how the model predicts (trainer/inference.py; calibrated at the end)
  checkpoints/           last + resumable backups (every backup_every_steps and each epoch)
  best/                  best-by-val-mIoU weights
  logs/                  TensorBoard (trainer/summaries.py): train/, val/, and the HParams record
  history.csv            one row per completed epoch (see history.py)
  calibration.json       per-class decision bias fitted on eval.calibration_split (if set)
  metrics.json           evaluation of the best checkpoint on val
  export/                model.keras, serving/ SavedModel, labels.json
"""

import json
import logging

import keras
import numpy as np
import tensorflow as tf

from camvid_common import fileio
from camvid_common.errors import ConfigError
from tfrecords_builder import manifest as manifest_lib
from trainer import configs
from trainer import data
from trainer import distribution
from trainer import history as history_lib
from trainer import inference
from trainer import loop
from trainer import posttrain
from trainer import segmentation
from trainer import summaries

CONFIG_NAME = 'config.json'
# Keys train.run adds to config.json besides the config: facts of the run, not settings.
RUN_FACTS = ('resolved_precision', 'strategy_used', 'num_replicas', 'num_workers', 'data_dir')


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
  if config.data.batch_size_per_replica:
    # Resolved from the replicas when the run starts; the per-replica size is what is compared.
    config = config.replace(**{'data.batch_size': recorded.data.batch_size})
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
  fileio.write_atomic(path, json.dumps(value, indent=2) + '\n')


def _read_inputs(config: configs.Config, data_dir: str, model_dir: str,
                 checkpoint_dir: str | None, log_dir: str | None):
  """Checks the paths and the data dir's splits before anything runs; returns the manifest."""
  for flag, path in (('--data_dir', data_dir), ('--model_dir', model_dir),
                     ('AIP_CHECKPOINT_DIR', checkpoint_dir), ('AIP_TENSORBOARD_LOG_DIR', log_dir)):
    fileio.check_bucket(path, flag)
  manifest = manifest_lib.read(data_dir.rstrip('/'))
  for split in _splits_read(config):
    manifest.split(split)
  data.check_shards(manifest, _splits_read(config))
  return manifest


def _write_hparams(log_dir: str, config: configs.Config, facts: dict) -> None:
  """The run's config and facts as its HParams record, unless log_dir holds one already."""
  summaries.write_hparams(log_dir, configs.hparams(config) | facts, configs.choice_fields())


def _recorded_run(model_dir: str, config: configs.Config) -> tuple[configs.Config, dict]:
  """The config and run facts model_dir/config.json records ((config, {}) without one)."""
  path = f'{model_dir}/{CONFIG_NAME}'
  if not tf.io.gfile.exists(path):
    return config, {}
  with tf.io.gfile.GFile(path) as f:
    values = json.load(f)
  return load_config(model_dir), {k: values[k] for k in RUN_FACTS if k in values}


def _splits_read(config: configs.Config) -> tuple[str, ...]:
  calibration = config.eval.calibration_split
  return ('train', 'val') + ((calibration,) if calibration else ())


def _check_runtime(config: configs.Config, runtime: distribution.Runtime) -> None:
  if config.runtime.jit_compile and runtime.kind != 'default':
    # XLA's step reads another replica's variables from the first replica's device and fails
    # (tensorflow/tensorflow#45940, on GPUs too); Keras' own jit_compile="auto" turns XLA off
    # under any tf.distribute strategy for the same reason.
    raise ConfigError(f'jit_compile: XLA cannot compile the step under the {runtime.kind} '
                      'strategy (replicas keep variables on other devices); use it with '
                      '--strategy default')
  data.check_batch(config.data.batch_size, runtime.num_replicas, '--batch_size')
  data.check_batch(config.eval.batch_size or config.data.batch_size, runtime.num_replicas,
                   'eval.batch_size')


def _loop_settings(config: configs.Config, steps_per_epoch: int) -> loop.Settings:
  return loop.Settings(
      epochs=config.trainer.epochs, steps_per_epoch=steps_per_epoch,
      global_batch_size=config.data.batch_size, steps_per_loop=config.trainer.steps_per_loop,
      backup_every_steps=config.trainer.backup_every_steps,
      eval_every_epochs=config.eval.every_epochs,
      early_stopping_patience=config.trainer.early_stopping_patience,
      early_stopping_min_delta=config.trainer.early_stopping_min_delta,
      profile_steps=config.trainer.profile_steps)


def run(config: configs.Config, data_dir: str, model_dir: str, *,
        runtime: distribution.Runtime | None = None, log=logging.info,
        checkpoint_dir: str | None = None, log_dir: str | None = None,
        export: bool = True, serving_root: str | None = None) -> dict:
  """Trains, evaluates the best checkpoint on val, exports; returns the final metrics.

  Re-running the same call continues from the newest readable backup in model_dir; once
  training is complete it forms no cluster: the chief redoes post-training alone, other workers
  return {} at once.

  Args:
    config: the resolved config.
    data_dir: a tfrecords_builder output dir.
    model_dir: where config.json, history.csv, metrics.json and export/ go.
    runtime: the distribution runtime (default: created from the config).
    log: where progress lines go.
    checkpoint_dir: backups and best weights (default model_dir; Vertex AI's AIP_CHECKPOINT_DIR).
    log_dir: TensorBoard logs (default model_dir/logs; Vertex AI's AIP_TENSORBOARD_LOG_DIR).
    export: write export/ at the end (a tuner's trials skip it).
    serving_root: also write the serving SavedModel at this dir's root (Vertex AI's
      AIP_MODEL_DIR, where its model import looks).

  Raises:
    ConfigError / InputError: bad config or data, before any training.
    loop.Preempted: SIGTERM received; a backup was saved first.
  """
  configs.validate(config)
  manifest = _read_inputs(config, data_dir, model_dir, checkpoint_dir, log_dir)
  model_dir = model_dir.rstrip('/')
  checkpoint_root = (checkpoint_dir or model_dir).rstrip('/')
  ckpt_dir, best_dir = f'{checkpoint_root}/checkpoints', f'{checkpoint_root}/best'
  if tf.train.latest_checkpoint(ckpt_dir) and tf.io.gfile.exists(f'{model_dir}/{CONFIG_NAME}'):
    check_resumable(model_dir, config)
  # Before any cluster forms: a worker of a run that is already trained (a rerun of a finished
  # Job's pod) must not wait for peers that have finished and gone.
  backup = loop.newest_readable_backup(ckpt_dir, log)
  log_dir = (log_dir or f'{model_dir}/logs').rstrip('/')
  if backup and (backup.epoch >= config.trainer.epochs or backup.stopped_early):
    return _post_train_only(config, manifest, model_dir, best_dir, backup, runtime, log, export,
                            serving_root, log_dir)
  runtime = runtime or distribution.create_runtime(
      config.runtime.strategy, config.runtime.mixed_precision,
      config.runtime.peer_timeout_seconds, config.runtime.formation_timeout_seconds)
  if config.data.batch_size_per_replica:
    config = config.replace(**{
        'data.batch_size': config.data.batch_size_per_replica * runtime.num_replicas})
  _check_runtime(config, runtime)
  steps_per_epoch = config.steps_per_epoch or data.steps_per_pass(
      manifest, 'train', config.data.batch_size, runtime.num_workers)
  log(f'distribution: {runtime.describe()}')
  log(f'batch: global {config.data.batch_size}, per replica '
      f'{config.data.batch_size // runtime.num_replicas}; learning rate '
      f'{segmentation.peak_learning_rate(config):g} (scaling: {config.optimizer.lr_scaling}); '
      f'{steps_per_epoch} steps/epoch, {config.trainer.epochs} epochs')
  spec = segmentation.inference_spec(config, manifest.class_names,
                                     segmentation.class_weights_for(config, manifest),
                                     manifest.class_colors, manifest.ignore_label)
  if spec.class_weights is not None:
    log('class weights: ' + ', '.join(f'{n} {w:.2f}' for n, w in zip(spec.class_names,
                                                                      spec.class_weights)))
  if runtime.is_chief:
    tf.io.gfile.makedirs(model_dir)
    facts = {'resolved_precision': runtime.precision, 'strategy_used': runtime.kind,
             'num_replicas': runtime.num_replicas, 'num_workers': runtime.num_workers,
             'data_dir': data_dir}
    _write_json(f'{model_dir}/{CONFIG_NAME}', config.to_dict() | facts)
    _write_hparams(log_dir, config, facts)
    # Before training, so a model_dir is evaluable from its first backup on; post-training
    # rewrites it with the calibrated bias.
    inference.write(model_dir, spec)

  with runtime.strategy.scope():
    model, train_model, optimizer, average = segmentation.build_trainables(
        config, spec.num_classes, steps_per_epoch * config.trainer.epochs, steps_per_epoch)
  steps = segmentation.make_steps(model, optimizer, runtime.strategy, config, spec,
                                  train_model=train_model, average=average)
  with data.read_errors(manifest, ('val',), 'reading the summary frames'):
    task = segmentation.SegmentationTask(config, manifest, spec, runtime, model, steps, average,
                                         log_dir)
  log(task.describe_input())
  trackables = {'model': model, 'optimizer': optimizer,
                **({'train_model': train_model} if train_model else {}),
                **({'weight_average': average.variables} if average else {})}
  training = loop.Loop(task, _loop_settings(config, steps_per_epoch), runtime, optimizer,
                       trackables, {'model': model}, ckpt_dir, best_dir,
                       f'{model_dir}/{history_lib.HISTORY_NAME}', f'{log_dir}/profile', log)
  training.restore(backup)
  with data.read_errors(manifest, ('train', 'val'), 'training'):
    training.run()
  log(f'worker {runtime.worker_index}: final weights checksum {weights_checksum(model):.9e}')
  if not runtime.is_chief:
    return {}
  with data.read_errors(manifest, _splits_read(config), 'post-training'):
    return posttrain.finish(config, spec, manifest, model_dir,
                            tf.train.latest_checkpoint(best_dir), log, export, serving_root,
                            log_dir=log_dir, step=int(training.epoch) - 1)


def _post_train_only(config, manifest, model_dir, best_dir, backup, runtime, log,
                     export, serving_root, log_dir) -> dict:
  """A rerun of a trained run: the chief redoes post-training alone, other workers just exit.

  No strategy is created (runtime, if given, only says who is the chief): the peers may be gone
  for good. Post-training rewrites calibration.json, inference.json, metrics.json and export/
  whole each time (a crash part-way leaves export/ without labels.json, which it replaces), so
  however far an earlier attempt got, the result is one consistent set. The final evaluation is
  written to TensorBoard again, and the HParams record if the run has none yet.
  """
  is_chief, name = ((runtime.is_chief, f'worker {runtime.worker_index}') if runtime
                    else distribution.role_from_env(config.runtime.strategy))
  stopped = ', stopped early' if backup.stopped_early else ''
  log(f'resumed from {backup.path}: training complete (epoch {backup.epoch} of '
      f'{config.trainer.epochs}{stopped}); ' +
      ('post-training alone, without the other workers' if is_chief
       else f'{name} has nothing left to do (post-training is the chief\'s)'))
  if not is_chief:
    return {}
  if runtime is None:
    keras.mixed_precision.set_global_policy(
        distribution.choose_precision(config.runtime.mixed_precision))
  spec = segmentation.inference_spec(config, manifest.class_names,
                                     segmentation.class_weights_for(config, manifest),
                                     manifest.class_colors, manifest.ignore_label)
  _write_hparams(log_dir, *_recorded_run(model_dir, config))
  with data.read_errors(manifest, _splits_read(config), 'post-training'):
    return posttrain.finish(config, spec, manifest, model_dir,
                            tf.train.latest_checkpoint(best_dir), log, export, serving_root,
                            log_dir=log_dir, step=backup.epoch - 1)


def weights_checksum(model) -> float:
  """Sum of |w| over trainable weights: equal on all workers of a correct synchronous run."""
  return float(sum(np.abs(np.asarray(v, np.float64)).sum() for v in model.trainable_weights))
