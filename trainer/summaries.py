"""TensorBoard output of the chief: per-epoch scalars, learning rate, confusion matrix, overlays.

Logs go to model_dir/logs/{train,val}, the layout Keras's TensorBoard callback uses, so the
dashboards look familiar. Other workers get no writers at all.
"""

import numpy as np
import tensorflow as tf

from trainer import visualize


class Summaries:
  """Writers for one run; every method is a no-op on non-chief workers."""

  def __init__(self, log_dir: str | None, class_names, class_colors):
    self._names = list(class_names)
    self._colors = np.asarray(class_colors, np.uint8)
    self._writers = {}
    if log_dir:
      self._writers = {split: tf.summary.create_file_writer(f'{log_dir}/{split}')
                       for split in ('train', 'val')}

  def epoch(self, epoch: int, train: dict, val: dict | None, learning_rate: float) -> None:
    """Epoch scalars; `val` is None for an epoch that was not validated."""
    if not self._writers:
      return
    for split, values in (('train', train), ('val', val)):
      if values is None:
        continue
      with self._writers[split].as_default(step=epoch):
        for key in ('loss', 'pixel_accuracy', 'mean_iou'):
          if values.get(key) is not None:
            tf.summary.scalar(f'epoch_{key}', values[key])
        if split == 'val':
          for name, per_class in values['per_class'].items():
            if per_class['iou'] is not None:
              tf.summary.scalar(f'iou/{name}', per_class['iou'])
          cm = np.asarray(values['confusion_matrix'])
          tf.summary.image('confusion_matrix',
                           visualize.confusion_matrix_image(cm, self._names)[None])
    with self._writers['train'].as_default(step=epoch):
      tf.summary.scalar('learning_rate', learning_rate)

  def overlays(self, epoch: int, examples: list[dict], predictions: list[np.ndarray]) -> None:
    """Image | ground truth | prediction strips for fixed val frames."""
    if not self._writers or not examples:
      return
    strips = []
    for example, pred in zip(examples, predictions):
      image = (np.clip(example['image'], 0, 1) * 255).astype(np.uint8)
      size = image.shape[:2]
      truth = tf.image.resize(example['mask'][..., None], size, method='nearest')[..., 0].numpy()
      strips.append(np.concatenate([
          image, visualize.colorize(truth, self._colors),
          visualize.overlay(image, pred, self._colors)], axis=1))
    with self._writers['val'].as_default(step=epoch):
      tf.summary.image('overlays', np.stack(strips), max_outputs=len(strips))

  def flush(self) -> None:
    for writer in self._writers.values():
      writer.flush()
