"""`python -m tfrecords_builder`: flags -> writer.build() or verify.verify(); nothing else."""

import sys

from camvid_common import quiet

quiet.start()  # Before anything imports TensorFlow: hides its load-time C++ log.

from absl import flags

from camvid_common import errors
from camvid_common import fileio
from camvid_common import sizes
from tfrecords_builder import verify as verify_lib
from tfrecords_builder import writer

_INPUT_DIR = flags.DEFINE_string('input_dir', None, 'CamVid folder (kaggle or segnet layout).')
_OUTPUT_DIR = flags.DEFINE_string('output_dir', None, 'Where shards and manifest.json go.')
_LAYOUT = flags.DEFINE_enum('layout', None, ['kaggle', 'segnet'],
                            'Input layout; detected from the label folders when unset.')
_NUM_SHARDS = flags.DEFINE_string(
    'num_shards', None, f'Shards per split: N, or split=N,... (default: one per '
    f'{writer.EXAMPLES_PER_SHARD} frames).')
_NUM_WORKERS = flags.DEFINE_integer('num_workers', None,
                                    'Worker processes (default: all cores).', lower_bound=1)
_UNKNOWN_COLOR = flags.DEFINE_enum('unknown_color', 'error', list(writer.UNKNOWN_COLOR_MODES),
                                   'A label colour missing from class_dict.csv: fail or map '
                                   'to void.')
_RESIZE = flags.DEFINE_string('resize', None, 'HxW: resize images (area/bilinear) and masks '
                              '(nearest). Default: keep the source size.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Redo everything in --output_dir.')
_VERIFY = flags.DEFINE_bool('verify', False, 'Read --output_dir back and check it against its '
                            'manifest instead of building.')
quiet.define_absl_flag()


def parse_num_shards(value: str | None) -> int | dict[str, int] | None:
  if value is None:
    return None
  try:
    if '=' not in value:
      return int(value)
    return {k.strip(): int(v) for k, v in (item.split('=') for item in value.split(','))}
  except ValueError:
    raise errors.InputError(f'--num_shards {value}: expected N or split=N,...') from None


def main(argv):
  del argv  # run_app rejects positional arguments.
  if not _OUTPUT_DIR.value:
    raise errors.InputError('--output_dir is required')
  if _VERIFY.value:
    fileio.check_bucket(_OUTPUT_DIR.value, '--output_dir')
    problems = verify_lib.verify(_OUTPUT_DIR.value)
    for problem in problems:
      print(f'error: {problem}', file=sys.stderr)
    if problems:
      return 1
    print(f'{_OUTPUT_DIR.value}: OK')
    return 0
  if not _INPUT_DIR.value:
    raise errors.InputError('--input_dir is required')
  options = writer.Options(
      unknown_color=_UNKNOWN_COLOR.value,
      resize=sizes.parse_hxw(_RESIZE.value, '--resize') if _RESIZE.value else None)
  writer.build(_INPUT_DIR.value, _OUTPUT_DIR.value, layout=_LAYOUT.value,
               num_shards=parse_num_shards(_NUM_SHARDS.value), num_workers=_NUM_WORKERS.value,
               options=options, overwrite=_OVERWRITE.value)
  return 0


def run():
  """Console-script entry: user mistakes become one line on stderr and exit code 2."""
  errors.run_app(main)


if __name__ == '__main__':
  run()
