"""The one parser of size flags: HxW (height first, as in image shapes), e.g. 360x480."""

import re

from camvid_common import errors


def parse_hxw(value: str, flag: str) -> tuple[int, int]:
  """Parses `value`, given to `--flag`, as 'HxW' into (height, width).

  Args:
    value: e.g. '360x480' (an upper-case X is accepted too).
    flag: the flag's name, with or without the leading '--', for the error message.

  Returns:
    (height, width), both positive ints.

  Raises:
    errors.InputError: `--flag VALUE: expected HxW, e.g. 360x480` for anything else.
  """
  flag = flag if flag.startswith('--') else f'--{flag}'
  problem = f'{flag} {value}: expected HxW, e.g. 360x480'
  match = re.fullmatch(r'(\d+)[xX](\d+)', str(value).strip(), flags=re.ASCII)
  if not match:
    raise errors.InputError(problem)
  height, width = int(match.group(1)), int(match.group(2))
  if height < 1 or width < 1:
    raise errors.InputError(f'{problem} (height and width at least 1)')
  return height, width
