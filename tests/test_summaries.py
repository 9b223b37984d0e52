"""Tests for trainer.summaries: the HParams record, the per-class table, non-chief no-ops.

The tags of a whole run are tested on the smoke run (tests/test_task.py).
"""

import pathlib

import numpy as np
import tensorflow as tf
from tensorboard.plugins.hparams import plugin_data_pb2

from trainer import summaries


def _hparams_records(log_dir):
  found = []
  for path in sorted(pathlib.Path(log_dir).glob('events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      found += [plugin_data_pb2.HParamsPluginData.FromString(v.metadata.plugin_data.content)
                for v in event.summary.value if v.metadata.plugin_data.plugin_name == 'hparams']
  return found


def test_hparams_are_written_once_with_domains_and_the_final_metrics(tmp_path):
  values = {'model.depth': 2, 'optimizer.name': 'adamw', 'data.hflip': True, 'seed': 42}
  assert not summaries.has_hparams(str(tmp_path))
  assert summaries.write_hparams(str(tmp_path), values, {'optimizer.name': ('adamw', 'sgd')})
  # A resumed run (or a tuner's trial, which has its own record) leaves the first record alone.
  assert not summaries.write_hparams(str(tmp_path), {**values, 'seed': 7})
  records = _hparams_records(tmp_path)
  starts = [r.session_start_info for r in records if r.HasField('session_start_info')]
  experiments = [r.experiment for r in records if r.HasField('experiment')]
  assert len(starts) == 1 and len(experiments) == 1
  assert starts[0].hparams['seed'].number_value == 42
  infos = {h.name: h for h in experiments[0].hparam_infos}
  assert set(infos) == set(values)
  assert list(infos['optimizer.name'].domain_discrete.values) and not infos['seed'].domain_discrete
  assert [v.bool_value for v in infos['data.hflip'].domain_discrete.values] == [False, True]
  assert {(m.name.group, m.name.tag) for m in experiments[0].metric_infos} >= {
      ('val', 'final/mean_iou'), ('val', 'final/pixel_accuracy')}


def test_per_class_table_is_markdown_with_a_row_per_class():
  result = {'mean_iou': 0.5, 'pixel_accuracy': 0.9, 'split': 'val', 'num_examples': 3,
            'per_class': {'Sky': {'iou': 0.75, 'precision': 0.8, 'recall': 0.9, 'f1': 0.85,
                                  'support': 100},
                          'Pole': {'iou': None, 'precision': None, 'recall': None, 'f1': None,
                                   'support': 0}}}
  lines = summaries.per_class_table(result, ['Sky', 'Pole']).splitlines()
  assert lines[0].startswith('mIoU 0.5000, pixel accuracy 0.9000 on val (3 frames)')
  assert lines[2].startswith('| class | IoU |') and lines[3].startswith('|---|')
  assert lines[4:] == ['| Sky | 0.7500 | 0.8000 | 0.9000 | 0.8500 | 100 |',
                       '| Pole | n/a | n/a | n/a | n/a | 0 |']


def test_a_worker_without_a_log_dir_writes_nothing(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  board = summaries.Summaries(None, ['a', 'b'], [[1, 2, 3], [4, 5, 6]])
  board.layout()
  board.step(3, {'loss': 1.0})
  result = {'loss': 1.0, 'mean_iou': 0.5, 'pixel_accuracy': 0.5,
            'per_class': {'a': {'iou': 0.5}, 'b': {'iou': None}},
            'confusion_matrix': np.eye(2).tolist()}
  board.epoch(0, result, result, 0.1)
  board.final(0, result)
  board.flush()
  assert not list(tmp_path.rglob('*'))
