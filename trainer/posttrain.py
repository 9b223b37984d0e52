"""Post-training, on the chief alone: calibration, the final evaluation and the export.

`finish` restores the best checkpoint into a fresh single-device model (no collective that the
other workers would have to join), fits the calibration if the config asks for it, writes the
inference spec with the bias it settles on, evaluates val into metrics.json and exports. The
trainer calls it at the end of a run; `restore_model` and `evaluate_model` are what
`trainer.evaluate` uses too, so both score a checkpoint the same way.
"""

import json

import keras
import numpy as np
import tensorflow as tf

from camvid_common import fileio
from camvid_common.errors import ConfigError
from trainer import calibration
from trainer import configs
from trainer import distribution
from trainer import export as export_lib
from trainer import inference
from trainer import segmentation
from trainer import summaries as summaries_lib

METRICS_NAME = 'metrics.json'


def restore_model(config: configs.Config, spec: inference.Spec, checkpoint: str) -> keras.Model:
  """The inference model (whole frames) of `config` with `checkpoint`'s weights."""
  model = segmentation.build_model(config, spec.num_classes)
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
  steps = segmentation.make_steps(model, None, runtime.strategy, config, spec)
  return segmentation.evaluate(steps, runtime, manifest, split, config, list(spec.class_names))


def finish(config, spec: inference.Spec, manifest, model_dir: str, checkpoint: str, log,
           export: bool = True, serving_root: str | None = None, log_dir: str | None = None,
           step: int = 0) -> dict:
  """Post-training, chief only: calibration (if configured), final evaluation on val, export.

  Runs on a fresh single-device model restored from `checkpoint` (the best), so no collective
  op (which the other workers would have to join) is involved. Writes calibration.json,
  inference.json (the spec with the calibrated bias), metrics.json and export/, and with a
  `log_dir` the final evaluation to TensorBoard at `step` (summaries.Summaries.final).
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
  fileio.write_atomic(f'{model_dir}/{METRICS_NAME}', json.dumps(result, indent=2) + '\n')
  if log_dir:
    board = summaries_lib.Summaries(log_dir, spec.class_names, spec.class_colors)
    board.final(step, result)
    board.close()
  log(f'best checkpoint {checkpoint}: val mIoU {result["mean_iou"]:.4f}, pixel accuracy '
      f'{result["pixel_accuracy"]:.4f}')
  if export:
    export_lib.export_model(model, f'{model_dir}/export', spec)
    log(f'exported to {model_dir}/export')
  if export and serving_root:
    export_lib.write_serving_root(model, serving_root, spec)
    log(f'serving SavedModel also at {serving_root} (Vertex AI model import)')
  return result
