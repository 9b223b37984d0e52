"""Reads a build back and checks it against its manifest: counts, masks, per-class pixels.

Uses TensorFlow's own decoders (the trainer's path), so a shard that passes here is one the
trainer can read.
"""

import numpy as np
import tensorflow as tf

from tfrecords_builder import features
from tfrecords_builder import manifest as manifest_lib


def verify(output_dir: str, log=print) -> list[str]:
  """Returns a list of problems (empty when the build is sound) and logs per-split stats."""
  manifest = manifest_lib.read(output_dir.rstrip('/'))
  num_classes = manifest.num_classes
  problems = []
  for split, info in manifest.splits.items():
    counts = np.zeros(256, np.int64)
    ids, num_bytes = [], 0
    for path, size in zip(manifest.shard_paths(split), info['shard_sizes']):
      if not tf.io.gfile.exists(path):
        problems.append(f'{path}: missing')
        continue
      num_bytes += tf.io.gfile.stat(path).length
      before = len(ids)
      try:
        for example in tf.data.TFRecordDataset(path).map(features.parse_example):
          counts += np.bincount(example['mask'].numpy().ravel(), minlength=256)
          ids.append(example['source_id'].numpy().decode())
      except tf.errors.OpError as e:
        problems.append(f'{path}: unreadable ({e.message.splitlines()[0]})')
      if len(ids) - before != size:
        problems.append(f'{path}: {len(ids) - before} examples, manifest says {size}')
    bad_values = [v for v in np.nonzero(counts)[0] if v >= num_classes and
                  v != manifest.ignore_label]
    if bad_values:
      problems.append(f'{split}: mask values {bad_values} are neither classes nor void')
    if len(ids) != info['num_examples']:
      problems.append(f'{split}: {len(ids)} examples in shards, manifest says '
                      f'{info["num_examples"]}')
    if len(set(ids)) != len(ids):
      problems.append(f'{split}: duplicate source ids')
    if counts[:num_classes].tolist() != info['class_pixel_counts']:
      problems.append(f'{split}: class pixel counts differ from the manifest')
    if int(counts[manifest.ignore_label]) != info['void_pixels']:
      problems.append(f'{split}: void pixels {int(counts[manifest.ignore_label])}, manifest '
                      f'says {info["void_pixels"]}')
    total = max(int(counts.sum()), 1)
    top = sorted(range(num_classes), key=lambda c: -counts[c])[:5]
    log(f'{split}: {len(ids)} examples in {len(info["shards"])} shards, '
        f'{num_bytes / 2**20:.1f} MiB; void {counts[manifest.ignore_label] / total:.3f}; top: '
        + ', '.join(f'{manifest.class_names[c]} {counts[c] / total:.3f}' for c in top))
  return problems
