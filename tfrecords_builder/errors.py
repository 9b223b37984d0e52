"""The one exception type for a user's bad input, and the entry-point wrapper that reports it.

Entry points run their absl main through `run_app`, which prints an InputError's message as a
single `error:` line with exit code 2, so a user's mistake never shows a Python traceback.
"""

import logging
import sys

EXIT_INPUT_ERROR = 2


class InputError(ValueError):
  """Bad input data or flags; the message names the file or flag and what is wrong."""


def run_app(main, handlers=(), quiet_tensorflow: bool = False) -> None:
  """Runs an absl `main`; InputError -> one stderr line + exit 2.

  Stray positional arguments and unknown or malformed flags are input errors too (absl would
  exit 1 with a usage dump), so `main` receives only flags.

  Args:
    main: the absl main function.
    handlers: extra (exception type, exit code, prefix) triples, checked first.
    quiet_tensorflow: raise TensorFlow's and absl's Python log level to WARNING before `main`
      runs: their INFO lines (checkpoint sharding, SavedModel assets) drown a run's own log.
  """
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  def fail(message):
    print(f'error: {" ".join(message.split())}', file=sys.stderr)
    sys.exit(EXIT_INPUT_ERROR)

  def parse(argv):
    try:
      argv = flags.FLAGS(argv)
    except flags.Error as e:
      fail(str(e))
    if len(argv) > 1:
      fail(f'unexpected arguments: {" ".join(argv[1:])}')
    if quiet_tensorflow:
      from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
      absl_logging.set_verbosity(absl_logging.WARNING)
      logging.getLogger('tensorflow').setLevel(logging.WARNING)
    return argv

  try:
    app.run(main, flags_parser=parse)
  except Exception as e:  # pylint: disable=broad-except
    for kind, code, prefix in (*handlers, (InputError, EXIT_INPUT_ERROR, 'error')):
      if isinstance(e, kind):
        print(f'{prefix}: {e}', file=sys.stderr)
        sys.exit(code)
    raise
