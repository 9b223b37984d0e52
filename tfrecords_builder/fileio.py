"""Atomic file writes through tf.io.gfile, for local paths and gs:// alike.

Readers must never see a half-written file under its final name: everything is written to a
temporary name beside the target and renamed when complete. (On GCS a rename is copy + delete,
but the copy makes the final object appear whole or not at all.)
"""

import os
import uuid

import tensorflow as tf

TMP_MARKER = '.tmp-'


def temp_path(path: str) -> str:
  """A unique temporary name next to `path` (same directory, so a local rename is atomic)."""
  return f'{path}{TMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}'


def is_temp(name: str) -> bool:
  return TMP_MARKER in name


def write_atomic(path: str, data: bytes | str) -> None:
  """Writes `data` to `path` via a temporary file and rename."""
  tmp = temp_path(path)
  mode = 'wb' if isinstance(data, bytes) else 'w'
  try:
    with tf.io.gfile.GFile(tmp, mode) as f:
      f.write(data)
    tf.io.gfile.rename(tmp, path, overwrite=True)
  except BaseException:
    if tf.io.gfile.exists(tmp):
      tf.io.gfile.remove(tmp)
    raise
