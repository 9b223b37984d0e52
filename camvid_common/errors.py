"""The one error type for a user's mistakes, the exit codes, and the entry-point wrapper.

Every entry point runs its absl main through `run_app`, which prints an InputError's message as
exactly one line, `error: <flag or file>: <problem>`, on stderr and exits 2, so a user's mistake
never shows a Python traceback. Bad, unknown or malformed flags and stray arguments are reported
the same way. The argparse scripts (benchmarks/, scripts/) get the same from `ArgumentParser`
and `run_script`.

A Kubernetes podFailurePolicy keys on the exit code: a configuration or data error fails the Job
at once (retrying cannot help), a preemption (SIGTERM) exits with a retryable code after saving.
"""

import argparse
import logging
import sys

EXIT_INPUT_ERROR = 2  # Bad flags, config, TF_CONFIG or data: do not retry.
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: SIGTERM received, checkpoint saved, rerun to continue.
# A worker that cannot form the cluster within peer_timeout_seconds is killed by its watchdog
# (SIGKILL, exit 137 in a container): counted as an ordinary, retryable failure.


class InputError(ValueError):
  """Bad input data or flags; the message names the file or flag first, then what is wrong."""


class ConfigError(InputError):
  """A configuration mistake (flags, presets, hparams, cluster spec); message names the source."""


def one_line(message) -> str:
  """`message` with all whitespace runs (newlines included) collapsed to single spaces."""
  return ' '.join(str(message).split())


def _exit_with(prefix: str, message, code: int):
  print(f'{prefix}: {one_line(message)}', file=sys.stderr)
  sys.exit(code)


def run_app(main, handlers=(), quiet_tensorflow: bool = False) -> None:
  """Runs an absl `main`; InputError -> one `error: ...` line on stderr + exit 2.

  Stray positional arguments and unknown or malformed flags are input errors too (absl would
  exit 1 with a usage dump), so `main` receives only flags.

  Args:
    main: the absl main function.
    handlers: extra (exception type, exit code, prefix) triples, checked first; such an
      exception prints `<prefix>: <message>` on one line and exits with its code.
    quiet_tensorflow: raise TensorFlow's and absl's Python log level to WARNING before `main`
      runs, unless `--verbose` (camvid_common/quiet.py) is on: their INFO lines (checkpoint
      sharding, SavedModel assets) drown a run's own log.
  """
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  def parse(argv):
    try:
      argv = flags.FLAGS(argv)
    except flags.Error as e:
      _exit_with('error', e, EXIT_INPUT_ERROR)
    if len(argv) > 1:
      _exit_with('error', f'unexpected arguments: {" ".join(argv[1:])}', EXIT_INPUT_ERROR)
    if quiet_tensorflow and not flags.FLAGS.get_flag_value('verbose', False):
      from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
      absl_logging.set_verbosity(absl_logging.WARNING)
      logging.getLogger('tensorflow').setLevel(logging.WARNING)
    return argv

  try:
    app.run(main, flags_parser=parse)
  except Exception as e:  # pylint: disable=broad-except
    for kind, code, prefix in (*handlers, (InputError, EXIT_INPUT_ERROR, 'error')):
      if isinstance(e, kind):
        _exit_with(prefix, e, code)
    raise


class ArgumentParser(argparse.ArgumentParser):
  """argparse for the plain scripts: a bad argument raises InputError (see `run_script`).

  argparse itself prints the usage and `prog: error: ...` and exits 2; this gives the one
  `error: --flag: problem` line every entry point prints. --help still prints the usage.
  """

  def error(self, message):
    raise InputError(message.removeprefix('argument '))


def run_script(main) -> None:
  """Runs a plain script's `main()` and exits with its return value; InputError -> one line, 2."""
  try:
    code = main()
  except InputError as e:
    _exit_with('error', e, EXIT_INPUT_ERROR)
  sys.exit(code)
