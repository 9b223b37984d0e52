"""The generic training loop: step groups, backups, preemption, validation, history, summaries.

It knows nothing about segmentation. A `Task` object gives it what to run: a compiled function
training n steps from an iterator, the validation, the summaries; the loop decides when (step
groups of `steps_per_loop`, backups every `backup_every_steps` and at each epoch end, validation
every `eval_every_epochs`), keeps the best weights by the task's validation metric, writes
history.csv and turns SIGTERM into a saved backup and `Preempted`. Every worker runs it in
lockstep (collectives must stay in step); only the chief's files and summaries are kept.

Keras 3's `model.fit`, its metric reduction and `BackupAndRestore` break under
MultiWorkerMirroredStrategy in TF 2.21 (keras-team/keras#20585, tensorflow/tensorflow#72388), so
this is a custom loop over `strategy.run`, checkpointed with `tf.train.CheckpointManager`, as TF
Model Garden's Orbit does.
"""

import contextlib
import dataclasses
import math
import signal
import threading
import time
from typing import Any, Callable, Protocol

import numpy as np
import tensorflow as tf

from camvid_common import errors
from trainer import distribution
from trainer import history as history_lib

# Result keys a task's train and validation results hold; history.csv has a column for each
# (train_<key>, val_<key>). A train result may also hold TRAIN_ONLY_METRICS (train_<key>).
HISTORY_METRICS = ('loss', 'pixel_accuracy', 'mean_iou')
TRAIN_ONLY_METRICS = ('objective',)


class Preempted(Exception):
  """Raised after a SIGTERM once the backup is saved; the entry point exits retryably."""


# What reading a truncated, partly copied or missing backup file raises (a short data file:
# IndexError 'Read less bytes than requested'; a short index or a missing file: OpError).
_UNREADABLE = (tf.errors.OpError, IndexError, ValueError)


@dataclasses.dataclass(frozen=True)
class Backup:
  """The newest backup every tensor of which could be read, and its loop counters."""
  path: str
  epoch: int
  step_in_epoch: int
  stopped_early: bool


def newest_readable_backup(ckpt_dir: str, log: Callable[[str], Any]) -> Backup | None:
  """The newest backup in ckpt_dir that reads whole (None: there is none).

  Backups are tried newest first (the CheckpointManager keeps two, so a backup cut short by a
  crash or a partial copy leaves the one before it); each one skipped is named in one warning
  line. Reading every tensor before restoring keeps a failed read from half-restoring the
  variables. Every worker of a multi-worker run reads the same shared ckpt_dir, so all of them
  settle on the same backup and stay in step.

  Raises:
    InputError: backups exist but none can be read (restarting cannot help; exit 2).
  """
  state = tf.train.get_checkpoint_state(ckpt_dir)
  paths = list(reversed(state.all_model_checkpoint_paths)) if state else []
  if state and state.model_checkpoint_path and state.model_checkpoint_path not in paths:
    paths.insert(0, state.model_checkpoint_path)
  skipped = []  # (path, reason)
  for path in paths:
    if not path.startswith('/') and '://' not in path:
      path = f'{ckpt_dir.rstrip("/")}/{path}'
    try:
      reader = tf.train.load_checkpoint(path)
      for key in reader.get_variable_to_shape_map():
        reader.get_tensor(key)  # Read and dropped: only a whole read shows the file is whole.
      counter = lambda name: reader.get_tensor(f'{name}/.ATTRIBUTES/VARIABLE_VALUE')
      backup = Backup(path, int(counter('epoch')), int(counter('step_in_epoch')),
                      bool(counter('stopped_early')))
    except (*_UNREADABLE, KeyError) as e:
      reason = errors.one_line(getattr(e, 'message', None) or e or type(e).__name__)
      skipped.append((path, reason[:200]))
      continue
    for bad, reason in skipped:
      log(f'warning: backup {bad} cannot be read ({reason}); resuming from {path}')
    return backup
  if skipped:
    raise errors.InputError(
        f'{ckpt_dir}: no backup can be read (' +
        '; '.join(f'{bad}: {reason}' for bad, reason in skipped) +
        '); restore them, or move the directory away to train from the start')
  return None


@dataclasses.dataclass(frozen=True)
class Settings:
  """When the loop trains, validates, saves and stops."""
  epochs: int
  steps_per_epoch: int
  global_batch_size: int
  steps_per_loop: int = 10
  backup_every_steps: int = 100  # Besides every epoch end; 0 = epoch ends only.
  eval_every_epochs: int = 1  # And after the last epoch; 0 = after the last only.
  early_stopping_patience: int | None = None
  early_stopping_min_delta: float = 0.0
  profile_steps: tuple[int, int] | None = None


class Task(Protocol):
  """What the loop runs; trainer/segmentation.py's SegmentationTask is one."""
  best_metric: str  # Validation result key; higher is better.
  best_metric_label: str  # How logs name it.

  def train_iterator(self, epoch: int, start_step: int): ...
  def train(self, iterator, num_steps: int) -> list[np.ndarray]: ...
  def train_result(self, totals: list[np.ndarray]) -> dict: ...
  def validation(self, enabled: bool) -> contextlib.AbstractContextManager: ...
  def validate(self, epoch: int) -> dict: ...
  def write_summaries(self, epoch: int, train: dict, val: dict | None, lr: float) -> None: ...
  def write_step_summaries(self, step: int, totals: list[np.ndarray], lr: float,
                           images_per_second: float) -> None: ...


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


class Loop:
  """Runs a Task's epochs under one strategy, resuming from the newest backup.

  Args:
    task: what to train and validate.
    settings: when to train, validate, save and stop.
    runtime: the distribution runtime (chief or not, worker count).
    optimizer: its `iterations` is the global step and `learning_rate` is logged.
    trackables: everything a backup holds besides the loop's own counters (model, optimizer...).
    best: what best/ holds (the model the task validates).
    ckpt_dir, best_dir: backups and best weights.
    history_path: history.csv (written by the chief).
    profile_dir: where --profile_steps traces go.
    log: progress lines.
  """

  def __init__(self, task: Task, settings: Settings, runtime: distribution.Runtime, optimizer,
               trackables: dict, best: dict, ckpt_dir: str, best_dir: str, history_path: str,
               profile_dir: str, log: Callable[[str], Any]):
    self.task, self.settings, self.runtime, self.optimizer = task, settings, runtime, optimizer
    self.log, self.history_path = log, history_path
    self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name='epoch')
    self.step_in_epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name='step_in_epoch')
    self.best_value = tf.Variable(-1.0, dtype=tf.float64, trainable=False, name='best_miou')
    self.best_epoch = tf.Variable(-1, dtype=tf.int64, trainable=False, name='best_epoch')
    self.stopped = tf.Variable(False, trainable=False, name='stopped_early')
    self.checkpoint = tf.train.Checkpoint(
        epoch=self.epoch, step_in_epoch=self.step_in_epoch, best_miou=self.best_value,
        best_epoch=self.best_epoch, stopped_early=self.stopped, **trackables)
    self.manager = tf.train.CheckpointManager(
        self.checkpoint, distribution.write_dir(ckpt_dir, runtime), max_to_keep=2)
    self.best_manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(**best), distribution.write_dir(best_dir, runtime), max_to_keep=1)
    self._profiler = _Profiler(settings.profile_steps if runtime.is_chief else None,
                               profile_dir, log)
    strategy = runtime.strategy

    @tf.function
    def agree(flag):
      # Any worker's flag stops every worker at the same step (collectives must stay in step).
      per_replica = strategy.run(lambda: tf.cast(flag, tf.int32))
      return strategy.reduce('sum', per_replica, axis=None) > 0

    self._agree = agree

  def restore(self, backup: Backup | None) -> None:
    """Continues from `backup` (newest_readable_backup's choice); None starts afresh."""
    if backup:
      self.checkpoint.restore(backup.path).assert_existing_objects_matched()
      self.log(f'resumed from {backup.path}: epoch {int(self.epoch)}, step '
               f'{int(self.step_in_epoch)} of it')

  def global_step(self) -> int:
    return int(self.optimizer.iterations.numpy())

  def _save(self, manager) -> None:
    manager.save(checkpoint_number=self.global_step())
    distribution.cleanup_write_dir(manager.directory, self.runtime)

  def run(self) -> None:
    """Trains the remaining epochs; raises Preempted after saving a backup on SIGTERM."""
    rows = history_lib.completed(history_lib.read(self.history_path), int(self.epoch))
    # One iterator for all remaining epochs: a new dataset per epoch made every epoch wait for
    # its pipeline to be built and started.
    iterator = None
    with _SigtermFlag() as sigterm:
      while int(self.epoch) < self.settings.epochs and not bool(self.stopped.numpy()):
        if iterator is None:
          iterator = self.task.train_iterator(int(self.epoch), int(self.step_in_epoch))
        rows = history_lib.completed(rows, int(self.epoch)) + [self._epoch(iterator, sigterm)]
        # The history row goes before the backup below: a crash between them makes the epoch
        # rerun and its row be replaced, never duplicated or lost.
        if self.runtime.is_chief:
          history_lib.write(self.history_path, rows)
        self._check_early_stop()
        self.epoch.assign_add(1)
        self.step_in_epoch.assign(0)
        self._save(self.manager)

  def _train_steps(self, iterator, sigterm) -> tuple[list, int]:
    """Trains the rest of the current epoch in step groups; returns the totals and steps run."""
    settings, epoch = self.settings, int(self.epoch)
    start = step = int(self.step_in_epoch)
    totals = None
    while step < settings.steps_per_epoch:
      every = settings.backup_every_steps
      until_backup = every - self.global_step() % every if every else math.inf
      n = int(min(settings.steps_per_loop, settings.steps_per_epoch - step, until_backup))
      self._profiler.before(self.global_step())
      started = time.perf_counter()
      out = [np.asarray(v) for v in self.task.train(iterator, n)]
      seconds = time.perf_counter() - started
      totals = out if totals is None else [a + b for a, b in zip(totals, out)]
      step += n
      self.step_in_epoch.assign(step)
      self._profiler.after(self.global_step())
      # Every worker computes what the chief writes (reading the step and learning rate is
      # local, no collective), so the workers' step groups stay alike.
      self.task.write_step_summaries(
          self.global_step(), out, current_learning_rate(self.optimizer),
          n * settings.global_batch_size / max(seconds, 1e-9))
      if every and self.global_step() % every == 0:
        self._save(self.manager)
      if bool(self._agree(tf.constant(sigterm.event.is_set()))):
        self._save(self.manager)
        raise Preempted(f'SIGTERM: saved a backup at epoch {epoch} step {step}')
    return totals, step - start

  def _epoch(self, iterator, sigterm) -> dict:
    """One epoch: training, validation when due, best/, summaries; returns its history row."""
    settings, epoch = self.settings, int(self.epoch)
    started = time.perf_counter()
    totals, steps_run = self._train_steps(iterator, sigterm)
    train_seconds = time.perf_counter() - started
    train = self.task.train_result(totals)
    every = settings.eval_every_epochs
    due = epoch + 1 == settings.epochs or (every > 0 and (epoch + 1) % every == 0)
    val = None
    with self.task.validation(due):
      if due:
        val = self.task.validate(epoch)
        if val[self.task.best_metric] > float(self.best_value) + settings.early_stopping_min_delta:
          self.best_value.assign(val[self.task.best_metric])
          self.best_epoch.assign(epoch)
          self._save(self.best_manager)
    seconds = time.perf_counter() - started
    lr = current_learning_rate(self.optimizer)
    images_per_s = steps_run * settings.global_batch_size / max(train_seconds, 1e-9)
    self._log_epoch(epoch, train, val, train_seconds, seconds, images_per_s)
    self.task.write_summaries(epoch, train, val, lr)
    row = {'epoch': epoch}
    row.update({f'train_{k}': train[k] for k in HISTORY_METRICS})
    row.update({f'train_{k}': train[k] for k in TRAIN_ONLY_METRICS if k in train})
    row.update({f'val_{k}': None if val is None else val[k] for k in HISTORY_METRICS})
    row.update({'learning_rate': lr, 'seconds': round(seconds, 2),
                'train_images_per_s': round(images_per_s, 2)})
    return row

  def _log_epoch(self, epoch, train, val, train_seconds, seconds, images_per_s) -> None:
    message = f'epoch {epoch + 1}/{self.settings.epochs}: loss {train["loss"]:.4f}'
    if train.get('objective') is not None:
      message += f' (objective {train["objective"]:.4f})'
    if val is not None:
      message += (f', val loss {val["loss"]:.4f}, val pixel acc {val["pixel_accuracy"]:.4f}, '
                  f'val mIoU {val["mean_iou"]:.4f}')
    self.log(message + f' (train {train_seconds:.1f} s, {images_per_s:.1f} img/s'
             + (f'; val {seconds - train_seconds:.1f} s)' if val is not None else ')'))

  def _check_early_stop(self) -> None:
    patience = self.settings.early_stopping_patience
    # Counted from the first validation: before it there is no best to stop at (best/ is empty).
    best_epoch = int(self.best_epoch)
    if patience and best_epoch >= 0 and int(self.epoch) - best_epoch >= patience:
      self.stopped.assign(True)
      self.log(f'early stop: no better val {self.task.best_metric_label} for {patience} epochs '
               f'(best: epoch {best_epoch + 1}, {float(self.best_value):.4f})')


def current_learning_rate(optimizer) -> float:
  lr = optimizer.learning_rate
  return float(lr.numpy() if hasattr(lr, 'numpy') else lr)
