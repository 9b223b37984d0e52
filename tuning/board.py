"""TensorBoard for a search: one run per trial, with its hyperparameters in the HParams dashboard.

Layout under output_dir/tensorboard (`tensorboard --logdir O/tensorboard`):
  events.*              the experiment: hyperparameter domains and metrics (hparams_config)
  trial_<id>/events.*   the trial's hyperparameters (hp.hparams) and its objective
  trial_<id>/train/     the trainer's own summaries (trainer/summaries.py): per epoch and per
                        step group (loss, objective, mIoU, learning rate, images/s)
  trial_<id>/val/       ... and val (loss, mIoU, per-class IoU, confusion matrix, overlays)

`loss` is the plain cross-entropy, the same definition for train and val; the trial keeps this
HParams record (the trainer adds its own only to a log dir that has none).

The trainer writes train/ and val/ itself (its `log_dir` is the trial's session dir), so the
dashboard's per-epoch metrics are exactly the ones the trainer logs for any run.
"""

import tensorflow as tf
from tensorboard.plugins.hparams import api as hp_api

from tuning import space

DIR_NAME = 'tensorboard'
OBJECTIVE_TAG = 'val_mean_iou'


def root(output_dir: str) -> str:
  return f'{output_dir.rstrip("/")}/{DIR_NAME}'


def session_dir(output_dir: str, trial_id: str) -> str:
  return f'{root(output_dir)}/trial_{trial_id}'


def _has_events(path: str) -> bool:
  return bool(tf.io.gfile.glob(f'{path}/events.out.tfevents.*'))


def write_experiment(output_dir: str, bounds: space.Bounds, max_epochs: int) -> None:
  """The dashboard's columns: the tuned hyperparameters' domains and the metrics to show."""
  path = root(output_dir)
  if _has_events(path):  # A resumed search: the experiment is already described.
    return
  hparams = [
      hp_api.HParam('dropout', hp_api.RealInterval(bounds.dropout_min, bounds.dropout_max)),
      hp_api.HParam('learning_rate', hp_api.RealInterval(bounds.lr_min, bounds.lr_max)),
      hp_api.HParam('epochs', hp_api.IntInterval(1, max_epochs),
                    description='the trial\'s epoch budget (Hyperband varies it)'),
  ]
  metrics = [
      hp_api.Metric(OBJECTIVE_TAG, display_name='objective: val mIoU',
                    description='val mean IoU (void excluded) of the trial\'s best checkpoint'),
      hp_api.Metric('epoch_mean_iou', group='val', display_name='val mIoU (last epoch)'),
      hp_api.Metric('epoch_loss', group='val', display_name='val loss (last epoch)'),
      hp_api.Metric('epoch_loss', group='train', display_name='train loss (last epoch)'),
  ]
  writer = tf.summary.create_file_writer(path)
  with writer.as_default():
    hp_api.hparams_config(hparams=hparams, metrics=metrics)
  writer.close()


def write_trial_start(output_dir: str, trial_id: str, values: dict) -> None:
  """Records the trial's hyperparameters once (a resumed trial keeps its first record)."""
  path = session_dir(output_dir, trial_id)
  if _has_events(path):
    return
  writer = tf.summary.create_file_writer(path)
  with writer.as_default():
    hp_api.hparams(values, trial_id=f'trial_{trial_id}')
  writer.close()


def write_trial_objective(output_dir: str, trial_id: str, value: float, epochs: int) -> None:
  """The objective as a scalar at the trial's budget, so the dashboard can sort trials by it."""
  writer = tf.summary.create_file_writer(session_dir(output_dir, trial_id))
  with writer.as_default():
    tf.summary.scalar(OBJECTIVE_TAG, value, step=epochs)
  writer.close()
