"""TensorBoard output of the chief: scalars, images, the final evaluation and HParams.

Logs go to log_dir/{train,val} (model_dir/logs by default), the layout Keras's TensorBoard
callback uses, so the dashboards look familiar; log_dir itself holds the run's HParams record.
Other workers get no writers at all. Tags, by writer and x-axis ("step" in TensorBoard):

  train  epoch_loss, epoch_objective, epoch_pixel_accuracy, epoch_mean_iou, learning_rate
         (epoch index); step/loss, step/objective, step/learning_rate,
         step/images_per_second (global step); the custom-scalars layout
  val    epoch_loss, epoch_pixel_accuracy, epoch_mean_iou, iou/<class>, per_class_iou,
         confusion_matrix, overlays (epoch index); final/mean_iou, final/pixel_accuracy,
         final/iou/<class>, final/per_class (text), final/per_class_iou,
         final/confusion_matrix (index of the last epoch trained)
  .      the HParams experiment and session: the resolved config and run facts, and the final
         metrics as its metrics

`loss` everywhere is the plain cross-entropy over non-void pixels (no class weights, no deep
supervision), so train and val share one chart in one unit; `objective` is what the optimizer
minimises (class-weighted, plus the deep-supervision heads).
"""

import numpy as np
import tensorflow as tf
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import summary as custom_scalar_summary
from tensorboard.plugins.hparams import api as hp

from trainer import visualize

PANEL_TITLES = ('image', 'ground truth', 'prediction')
VOID_ENTRY = ('void (not scored)', (0, 0, 0))  # visualize.colorize's default void colour.
# The HParams dashboard's metric columns: (tag, run relative to log_dir, display name).
HPARAMS_METRICS = (
    ('final/mean_iou', 'val', 'final val mIoU (calibrated)'),
    ('final/pixel_accuracy', 'val', 'final val pixel accuracy'),
    ('epoch_mean_iou', 'val', 'val mIoU (last validation)'),
    ('epoch_loss', 'val', 'val loss (last validation)'),
    ('epoch_loss', 'train', 'train loss (last epoch)'),
)


class Summaries:
  """Writers for one run; every method is a no-op on non-chief workers (log_dir None)."""

  def __init__(self, log_dir: str | None, class_names, class_colors):
    self._names = list(class_names)
    self._colors = np.asarray(class_colors, np.uint8)
    self._log_dir = log_dir
    self._writers = {}

  def _writer(self, split: str):
    """The split's writer, made on first use: post-training writes no second train event file."""
    if split not in self._writers:
      self._writers[split] = tf.summary.create_file_writer(f'{self._log_dir}/{split}')
    return self._writers[split]

  def layout(self) -> None:
    """The custom-scalars dashboard: losses and every class's IoU on shared axes."""
    if not self._log_dir:
      return
    with self._writer('train').as_default():
      tf.summary.experimental.write_raw_pb(
          custom_scalar_summary.pb(_layout()).SerializeToString(), step=0)

  def step(self, step: int, values: dict) -> None:
    """step/<key> scalars of one step group in train, at the global step."""
    if not self._log_dir:
      return
    with self._writer('train').as_default(step=step):
      for key, value in values.items():
        tf.summary.scalar(f'step/{key}', value)

  def epoch(self, epoch: int, train: dict, val: dict | None, learning_rate: float) -> None:
    """Epoch scalars and val images; `val` is None for an epoch that was not validated."""
    if not self._log_dir:
      return
    for split, values in (('train', train), ('val', val)):
      if values is None:
        continue
      with self._writer(split).as_default(step=epoch):
        for key in ('loss', 'objective', 'pixel_accuracy', 'mean_iou'):
          if values.get(key) is not None:
            tf.summary.scalar(f'epoch_{key}', values[key])
    with self._writer('train').as_default(step=epoch):
      tf.summary.scalar('learning_rate', learning_rate)
    if val is not None:
      with self._writer('val').as_default(step=epoch):
        self._per_class(val, '', f'val IoU per class after epoch {epoch + 1}')

  def _per_class(self, result: dict, prefix: str, title: str) -> None:
    """iou/<class> scalars, the per_class_iou bar chart and the confusion matrix of `result`."""
    ious = [result['per_class'][name]['iou'] for name in self._names]
    for name, iou in zip(self._names, ious):
      if iou is not None:
        tf.summary.scalar(f'{prefix}iou/{name}', iou)
    miou = result.get('mean_iou')
    title += f': mIoU {miou:.3f}' if miou is not None else ''
    tf.summary.image(f'{prefix}per_class_iou', visualize.per_class_iou_image(
        ious, self._names, self._colors, title=title)[None],
                     description='IoU of each class on a fixed 0..1 axis, in the class colours.')
    tf.summary.image(f'{prefix}confusion_matrix', visualize.confusion_matrix_image(
        np.asarray(result['confusion_matrix']), self._names)[None])

  def overlays(self, epoch: int, examples: list[dict], predictions: list[np.ndarray]) -> None:
    """Image | ground truth | prediction strips of fixed val frames, captioned, with a legend."""
    if not self._log_dir or not examples:
      return
    strips = [self._overlay_strip(example, pred) for example, pred in zip(examples, predictions)]
    names = ', '.join(_frame_caption(example) for example in examples)
    with self._writer('val').as_default(step=epoch):
      tf.summary.image('overlays', np.stack(strips), max_outputs=len(strips),
                       description=f'Fixed val frames ({names}): image, ground truth, '
                       'prediction over the image; void pixels black in the ground truth.')

  def _overlay_strip(self, example: dict, pred: np.ndarray) -> np.ndarray:
    image = (np.clip(example['image'], 0, 1) * 255).astype(np.uint8)
    size = image.shape[:2]
    truth = tf.image.resize(example['mask'][..., None], size, method='nearest')[..., 0].numpy()
    panels = [image, visualize.colorize(truth, self._colors),
              visualize.overlay(image, pred, self._colors)]
    return visualize.annotated_strip(
        panels, PANEL_TITLES, _frame_caption(example), self._names + [VOID_ENTRY[0]],
        np.concatenate([self._colors, [VOID_ENTRY[1]]]).astype(np.uint8))

  def final(self, step: int, result: dict) -> None:
    """The final (calibrated) evaluation in val at `step`: final/* scalars, table and images."""
    if not self._log_dir:
      return
    with self._writer('val').as_default(step=step):
      for key in ('mean_iou', 'pixel_accuracy'):
        if result.get(key) is not None:
          tf.summary.scalar(f'final/{key}', result[key])
      tf.summary.text('final/per_class', per_class_table(result, self._names))
      self._per_class(result, 'final/', 'final val IoU per class (best checkpoint)')

  def flush(self) -> None:
    for writer in self._writers.values():
      writer.flush()

  def close(self) -> None:
    for writer in self._writers.values():
      writer.close()


def _frame_caption(example: dict) -> str:
  """The frame's name, or its position in the split for records without one."""
  return example.get('source_id') or f'frame {example["index"]} of {example["split_size"]}'


def _layout() -> layout_pb2.Layout:
  def chart(title, *tags):
    return layout_pb2.Chart(title=title, multiline=layout_pb2.MultilineChartContent(tag=tags))
  return layout_pb2.Layout(category=[
      layout_pb2.Category(title='losses', chart=[
          chart('epoch_loss: train and val plain cross-entropy', r'^epoch_loss$'),
          chart('train objective (class-weighted, deep supervision) vs plain loss',
                r'^epoch_objective$', r'^epoch_loss$'),
          chart('per step group: loss and objective', r'^step/loss$', r'^step/objective$')]),
      layout_pb2.Category(title='val IoU per class', chart=[
          chart('iou/*: every class on one axis', r'^iou/'),
          chart('mIoU: per validation and final', r'^epoch_mean_iou$', r'^final/mean_iou$')]),
  ])


def per_class_table(result: dict, class_names) -> str:
  """A markdown table of the per-class metrics of an evaluation, its summary line above it."""
  show = lambda v: 'n/a' if v is None else f'{v:.4f}'
  lines = [f'mIoU {show(result.get("mean_iou"))}, pixel accuracy '
           f'{show(result.get("pixel_accuracy"))} on {result.get("split", "val")} '
           f'({result.get("num_examples", "?")} frames)']
  if result.get('uncalibrated'):
    lines[0] += (f'; before calibration on {result.get("calibration_split")}: mIoU '
                 f'{show(result["uncalibrated"].get("mean_iou"))}')
  lines += ['', '| class | IoU | precision | recall | F1 | support (pixels) |',
            '|---|---:|---:|---:|---:|---:|']
  for name in class_names:
    row = result['per_class'][name]
    lines.append(f'| {name} | ' + ' | '.join(show(row.get(k)) for k in
                                            ('iou', 'precision', 'recall', 'f1')) +
                 f' | {row.get("support", "")} |')
  return '\n'.join(lines)


def write_hparams(log_dir: str, values: dict, choices: dict | None = None) -> bool:
  """Records a run's HParams (the experiment's columns and the session) in log_dir, once.

  Nothing is written when log_dir already holds an HParams record: a resumed run keeps the
  record of its start, and a tuner's trial keeps the tuner's. Returns whether it wrote.

  Args:
    log_dir: The run's TensorBoard dir (its train/ and val/ are the session's runs).
    values: {name: bool, int, float or str}.
    choices: {name: allowed values} of the names with a fixed set of values (booleans have
      theirs without it).
  """
  if has_hparams(log_dir):
    return False
  choices = {**{k: (False, True) for k, v in values.items() if isinstance(v, bool)},
             **(choices or {})}
  domain = lambda name: hp.Discrete(list(choices[name])) if name in choices else None
  writer = tf.summary.create_file_writer(log_dir)
  with writer.as_default():
    hp.hparams_config(
        hparams=[hp.HParam(name, domain(name)) for name in values],
        metrics=[hp.Metric(tag, group=group, display_name=display)
                 for tag, group, display in HPARAMS_METRICS])
    hp.hparams(values)
  writer.close()
  return True


def has_hparams(log_dir: str) -> bool:
  """Whether the event files directly in log_dir hold an HParams record."""
  for path in tf.io.gfile.glob(f'{log_dir}/events.out.tfevents.*'):
    try:
      for event in tf.compat.v1.train.summary_iterator(path):
        if any(v.metadata.plugin_data.plugin_name == 'hparams' for v in event.summary.value):
          return True
    except tf.errors.OpError:  # A file cut short: what it holds so far still counts.
      continue
  return False
