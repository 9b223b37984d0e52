"""Atomic file writes through tf.io.gfile, for local paths and gs:// alike.

Readers must never see a half-written file under its final name: everything is written to a
temporary name beside the target and renamed when complete. (On GCS a rename is copy + delete,
but the copy makes the final object appear whole or not at all.)
"""

import os
import uuid

import tensorflow as tf

from camvid_common import errors

TMP_MARKER = '.tmp-'
GCS_PREFIX = 'gs://'


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


def check_bucket(path: str | None, flag: str) -> None:
  """Fails fast, with one line naming `flag` and `path`, when a gs:// path's bucket is unusable.

  TF's GCS filesystem reports a missing bucket only as "HTTP response code 404" at the first
  read, and its makedirs under a missing bucket never returns (it walks up the path looking for
  an existing parent, and the bucket never is one); a forbidden bucket gives raw HTTP text. Local
  paths (and None) pass unchecked. Credentials are TF's own: Application Default Credentials,
  which is Workload Identity on GKE and the attached service account on Compute Engine and
  Vertex AI; no key file.

  Raises:
    errors.InputError: the bucket does not exist, or this account may not use it.
  """
  if not path or not path.startswith(GCS_PREFIX):
    return
  bucket = GCS_PREFIX + path[len(GCS_PREFIX):].split('/', 1)[0]
  try:
    tf.io.gfile.stat(bucket)  # The bucket's metadata (storage.buckets.get).
    return
  except tf.errors.NotFoundError:
    raise errors.InputError(f'{flag} {path}: bucket {bucket} does not exist') from None
  except tf.errors.PermissionDeniedError:
    pass  # An account with object access only may still read and write: try the path itself.
  try:
    tf.io.gfile.exists(path)
  except tf.errors.PermissionDeniedError:
    raise errors.InputError(
        f'{flag} {path}: permission denied on bucket {bucket} for this account (Application '
        'Default Credentials); it needs storage.buckets.get and object read/write there') from None
