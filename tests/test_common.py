"""Tests for camvid_common: the HxW size parser and the one-line error reporting of entry points."""

import subprocess
import sys
import textwrap

import pytest

from camvid_common import errors
from camvid_common import sizes
from conftest import REPO


@pytest.mark.parametrize('value, expected', [
    ('360x480', (360, 480)),
    ('1x1', (1, 1)),
    ('256X192', (256, 192)),
    (' 32x64 ', (32, 64)),
    ('0360x0480', (360, 480)),
])
def test_parse_hxw_reads_height_then_width(value, expected):
  assert sizes.parse_hxw(value, '--size') == expected


@pytest.mark.parametrize('value', [
    '360by480', '360', '360x', 'x480', '360x480x3', '-360x480', '360x-480', '+360x480',
    '360.0x480', '360 x 480', '', 'axb', '３６０x480', '0x480', '360x0',
])
def test_parse_hxw_rejects_anything_else_naming_the_flag(value):
  with pytest.raises(errors.InputError) as info:
    sizes.parse_hxw(value, 'image_size')  # With or without the dashes.
  assert str(info.value).startswith(f'--image_size {value}: expected HxW, e.g. 360x480')


def test_config_error_is_the_input_error():
  assert issubclass(errors.ConfigError, errors.InputError)
  assert issubclass(errors.InputError, ValueError)
  assert errors.EXIT_INPUT_ERROR == 2 and errors.EXIT_PREEMPTED == 75


def _script(body, *args):
  code = textwrap.dedent(body)
  return subprocess.run([sys.executable, '-c', code, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=60)


def test_run_app_reports_input_errors_as_one_line_and_exit_2():
  proc = _script("""
      from absl import flags
      from camvid_common import errors
      flags.DEFINE_integer('n', 1, 'A number.')

      def main(argv):
        raise errors.ConfigError('--n 1: first line\\n  second line')

      errors.run_app(main)
      """)
  assert proc.returncode == 2 and proc.stderr == 'error: --n 1: first line second line\n'
  proc = _script("""
      from absl import flags
      from camvid_common import errors
      flags.DEFINE_integer('n', 1, 'A number.')
      errors.run_app(lambda argv: 0)
      """, '--n=x')
  assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
  assert proc.stderr.startswith('error: flag --n=x: ')


def test_run_app_handlers_keep_their_own_prefix_and_code():
  proc = _script("""
      from camvid_common import errors

      class Preempted(Exception):
        pass

      def main(argv):
        raise Preempted('SIGTERM: saved')

      errors.run_app(main, handlers=[(Preempted, errors.EXIT_PREEMPTED, 'preempted')])
      """)
  assert proc.returncode == 75 and proc.stderr == 'preempted: SIGTERM: saved\n'


def test_argparse_scripts_report_the_same_way():
  body = """
      from camvid_common import errors

      def main():
        parser = errors.ArgumentParser()
        parser.add_argument('--port', type=int, default=0)
        args = parser.parse_args()
        if args.port > 65535:
          raise errors.InputError(f'--port {args.port}: not a port')
        print('ok')

      errors.run_script(main)
      """
  for args, message in ((['--port', 'x'], "error: --port: invalid int value: 'x'"),
                        (['--port', '70000'], 'error: --port 70000: not a port'),
                        (['stray'], 'error: unrecognized arguments: stray')):
    proc = _script(body, *args)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [message], proc.stderr
  proc = _script(body, '--port', '80')
  assert proc.returncode == 0 and proc.stdout == 'ok\n' and not proc.stderr
