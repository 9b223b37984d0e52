"""The one exception type for a user's bad input, and the entry-point wrapper that reports it.

Entry points run their absl main through `run_app`, which prints an InputError's message as a
single `error:` line with exit code 2, so a user's mistake never shows a Python traceback.
"""

import sys

EXIT_INPUT_ERROR = 2


class InputError(ValueError):
  """Bad input data or flags; the message names the file or flag and what is wrong."""


def run_app(main, handlers=()) -> None:
  """Runs an absl `main`; InputError -> one stderr line + exit 2.

  Args:
    main: the absl main function.
    handlers: extra (exception type, exit code, prefix) triples, checked first.
  """
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  def parse(argv):
    # absl exits 1 with a usage dump on a bad flag; a mistyped flag is a user's mistake too.
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
      sys.exit(EXIT_INPUT_ERROR)

  try:
    app.run(main, flags_parser=parse)
  except Exception as e:  # pylint: disable=broad-except
    for kind, code, prefix in (*handlers, (InputError, EXIT_INPUT_ERROR, 'error')):
      if isinstance(e, kind):
        print(f'{prefix}: {e}', file=sys.stderr)
        sys.exit(code)
    raise
