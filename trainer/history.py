"""model_dir/history.csv: one row per completed epoch, exactly once, across any restarts.

A CSVLogger appends, so a crash between its write and the checkpoint duplicates or loses rows.
Here the file is always rewritten whole (atomically) from rows that the checkpoint vouches for:
on resume, rows of epochs the restored checkpoint has not completed are dropped, and each epoch's
row is written before that epoch's checkpoint, so no completed epoch can miss its row.
"""

import csv
import io

import tensorflow as tf

from camvid_common import fileio

HISTORY_NAME = 'history.csv'


def read(path: str) -> list[dict]:
  if not tf.io.gfile.exists(path):
    return []
  with tf.io.gfile.GFile(path, 'r') as f:
    return list(csv.DictReader(io.StringIO(f.read())))


def write(path: str, rows: list[dict]) -> None:
  columns = []
  for row in rows:
    columns += [k for k in row if k not in columns]
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=columns, lineterminator='\n')
  writer.writeheader()
  writer.writerows(rows)
  fileio.write_atomic(path, out.getvalue())


def completed(rows: list[dict], num_epochs_done: int) -> list[dict]:
  """The rows of epochs 0..num_epochs_done-1, deduplicated, in order."""
  by_epoch = {int(row['epoch']): row for row in rows if int(row['epoch']) < num_epochs_done}
  return [by_epoch[e] for e in sorted(by_epoch)]
