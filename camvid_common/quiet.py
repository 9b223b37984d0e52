"""Quiet start-up for every entry point: TensorFlow's C++ start-up log stays hidden.

Each entry module calls `start()` first, before anything imports TensorFlow, and defines the
`--verbose` flag (`define_absl_flag` or `add_argument`). By default a user then sees only the
tool's own output, warnings and errors; `--verbose` shows TensorFlow's C++ log from its first
line on.

Why setting TF_CPP_MIN_LOG_LEVEL is not enough (measured with TF 2.21 on the CPU-only VM, which
has the CUDA runtime but no driver): `import tensorflow` runs C++ static initialisers twice,
in libtensorflow_framework.so.2 and, a few seconds later in the same import,
in _pywrap_profiler_plugin.so (each has its own copy of the logging code), and they log through
absl before anything has read the level. With the level at 3, set in the environment before
the process starts, each still prints

  WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
  I0000 ... port.cc:153] oneDNN custom operations are on. ...  (when TF_ENABLE_ONEDNN_OPTS=1)
  I0000 ... cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.

TF_CPP_MAX_VLOG_LEVEL=-1, GLOG_minloglevel=3 and ABSL_MIN_LOG_LEVEL=3 change nothing. Later
lines do follow the level: cpu_feature_guard's AVX notice (I) goes at 1, and so would the
`failed call to cuInit` error (E0000 cuda_platform.cc:52) that the first device lookup logs
on a machine without a usable GPU, but only at 3, which would hide every runtime error too.

So `start()` does two things. It sets TF_CPP_MIN_LOG_LEVEL for the rest of the run to 2
(errors shown), or 0 with `--verbose`; a level the user exported wins. And it hides the start
itself: the first `import tensorflow`, wherever it happens (at the top of trainer.task, inside a
main that needs TensorFlow only after parsing its flags, as trainer.evaluate, or never, as the
scene generator), runs with file descriptor 2 pointed at a temporary file, together with the
first device lookup (1 ms on the VM). Only a descriptor-level redirect catches what C++ code
writes to stderr. Python's `sys.stderr` keeps writing to the real stderr meanwhile, so Python
warnings and tracebacks still show, and if the import raises, the captured text is printed
first: an ImportError from a broken install keeps the C++ lines that explain it. A C++ crash
(abort) in that window cannot replay them: faulthandler prints Python's fatal-error traceback
to the real stderr instead, and `--verbose` shows the C++ message. With `--verbose`, or
TF_CPP_MIN_LOG_LEVEL=0 exported, nothing is captured.
"""

import contextlib
import faulthandler
import importlib.abc
import importlib.util
import logging
import os
import sys
import tempfile

FLAG = 'verbose'
HELP = ("Show TensorFlow's C++ start-up and INFO log (TF_CPP_MIN_LOG_LEVEL=0 unless it is set) "
        'and its Python INFO log.')
_TRUE = ('true', 't', '1')  # absl's spellings of a true boolean flag value.
_FALSE = ('false', 'f', '0')


def verbose_requested(argv) -> bool:
  """Whether command-line arguments turn `--verbose` on, as absl or argparse will parse them.

  Peeks before the real parse, which comes after TensorFlow has loaded: `--verbose`,
  `--verbose=true|t|1` (any case), `--noverbose`, one or two dashes; the last one wins and `--`
  ends the flags.

  Args:
    argv: the arguments after the program name.

  Returns:
    Whether they leave `--verbose` on.
  """
  verbose = False
  for arg in argv:
    if arg == '--':
      break
    if not arg.startswith('-'):
      continue
    name, eq, value = arg.lstrip('-').partition('=')
    if name == FLAG and not eq:
      verbose = True
    elif name == FLAG and value.lower() in _TRUE + _FALSE:
      verbose = value.lower() in _TRUE
    elif name == 'no' + FLAG and not eq:
      verbose = False
  return verbose


def start(argv=None) -> bool:
  """Sets TensorFlow's C++ log level and hides its load-time log unless verbose; see the module.

  Call it at the very top of an entry module, before any import that may import TensorFlow.
  Idempotent; does nothing to the load if TensorFlow is already imported.

  Args:
    argv: the arguments after the program name; default sys.argv[1:].

  Returns:
    Whether `--verbose` is on.
  """
  verbose = verbose_requested(sys.argv[1:] if argv is None else argv)
  level = os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '0' if verbose else '2')
  if (not verbose and level.strip() not in ('', '0') and 'tensorflow' not in sys.modules
      and not any(isinstance(finder, _QuietImport) for finder in sys.meta_path)):
    sys.meta_path.insert(0, _QuietImport())
  return verbose


def define_absl_flag():
  """Defines `--verbose` for an absl program (`start()` has already acted on it).

  The flag is registered as the calling module's own, named the way absl names a module, so
  that the program's `--help`, which lists only the main module's flags, shows it.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  caller = sys._getframe(1).f_globals.get('__name__')  # pylint: disable=protected-access
  module_name = sys.argv[0] if caller == '__main__' else caller
  if FLAG in flags.FLAGS:  # Another entry module imported into the same process (tests).
    flags.FLAGS.register_key_flag_for_module(module_name, flags.FLAGS[FLAG])
    return flags.FlagHolder(flags.FLAGS, flags.FLAGS[FLAG])
  return flags.DEFINE_bool(FLAG, False, HELP, module_name=module_name)


def add_argument(parser, help_text: str = HELP) -> None:
  """Adds `--verbose` to an argparse program (`start()` has already acted on it)."""
  parser.add_argument('--' + FLAG, action='store_true', help=help_text)


class _QuietImport(importlib.abc.MetaPathFinder):
  """Finds the top-level `tensorflow` package once and has it executed with stderr captured."""

  def find_spec(self, fullname, path, target=None):
    del path, target  # A top-level package: the default path search.
    if fullname != 'tensorflow':
      return None
    sys.meta_path.remove(self)  # One load only; the finders below do the real search.
    spec = importlib.util.find_spec(fullname)
    if spec is not None and spec.loader is not None:
      spec.loader = _QuietLoader(spec.loader)
    return spec


class _QuietLoader(importlib.abc.Loader):
  """Runs TensorFlow's loader and its first device lookup with stderr captured."""

  def __init__(self, loader):
    self._loader = loader

  def create_module(self, spec):
    return self._loader.create_module(spec)

  def exec_module(self, module):
    module.__loader__ = module.__spec__.loader = self._loader
    with _stderr_fd_captured():
      self._loader.exec_module(module)
      # Start-up too: the first device lookup starts the CUDA platform, which logs cuInit
      # failures (E level) when no GPU is usable. 1 ms on the CPU-only VM.
      module.config.list_physical_devices()


@contextlib.contextmanager
def _stderr_fd_captured():
  """File descriptor 2 goes to a temporary file (replayed if the block raises); sys.stderr not."""
  python_stderr = sys.stderr
  try:
    python_stderr.flush()
    captured = tempfile.TemporaryFile()
    real = os.dup(2)
  except (AttributeError, OSError):  # No sys.stderr, temporary dir or fd 2: nothing hidden.
    yield
    return
  faulthandler_was_on = faulthandler.is_enabled()
  with captured, open(real, 'w', encoding=getattr(python_stderr, 'encoding', None) or 'utf-8',
                      errors='backslashreplace', buffering=1) as real_stderr:
    os.dup2(captured.fileno(), 2)
    sys.stderr = real_stderr
    faulthandler.enable(real_stderr)
    try:
      yield
    except Exception:
      captured.seek(0)
      real_stderr.write(captured.read().decode(errors='backslashreplace'))
      raise
    finally:
      real_stderr.flush()
      os.dup2(real, 2)
      sys.stderr = python_stderr
      _repoint_log_handlers(real_stderr, python_stderr)
      if faulthandler_was_on:
        faulthandler.enable(python_stderr)
      else:
        faulthandler.disable()


def _repoint_log_handlers(old_stream, new_stream) -> None:
  """Log handlers made during the import onto the temporary sys.stderr write to new_stream.

  TensorFlow's Python logger makes its StreamHandler on sys.stderr as it loads, which in the
  capture window is the stream that closes with it: every later TensorFlow warning (a
  deprecation, a retracing notice) would print logging's "--- Logging error ---" and a
  traceback instead of the warning.
  """
  loggers = [logging.getLogger(), *(logger for logger in logging.Logger.manager.loggerDict.values()
                                    if isinstance(logger, logging.Logger))]
  for logger in loggers:
    for handler in logger.handlers:
      if isinstance(handler, logging.StreamHandler) and handler.stream is old_stream:
        handler.setStream(new_stream)
