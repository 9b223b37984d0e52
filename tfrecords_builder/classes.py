"""Class tables: class_dict.csv parsing, the built-in SegNet table, and label -> class-index lookup.

Classes are numbered 0..C-1 in the table's row order with the void row left out; void pixels
become IGNORE_LABEL. Colour labels (Kaggle layout) are mapped with a 2**24-entry lookup table
indexed by the packed RGB value, so a whole frame is one numpy gather, not a per-pixel loop.
"""

import dataclasses
import functools

import numpy as np

from camvid_common import errors
from tfrecords_builder.features import IGNORE_LABEL

VOID_NAMES = frozenset({'void', 'unlabelled', 'unlabeled'})
# Marks "not in the table" inside lookup tables; class indices stay below it.
UNKNOWN = 254
MAX_CLASSES = UNKNOWN

# The SegNet release's 11 classes in index order (pixel value i = class i, 11 = void).
SEGNET_ROWS = (
    ('Sky', (128, 128, 128)),
    ('Building', (128, 0, 0)),
    ('Pole', (192, 192, 128)),
    ('Road', (128, 64, 128)),
    ('Pavement', (60, 40, 222)),
    ('Tree', (128, 128, 0)),
    ('SignSymbol', (192, 128, 128)),
    ('Fence', (64, 64, 128)),
    ('Car', (64, 0, 128)),
    ('Pedestrian', (64, 64, 0)),
    ('Bicyclist', (0, 128, 192)),
    ('Unlabelled', (0, 0, 0)),
)


@dataclasses.dataclass(frozen=True)
class ClassTable:
  """A class table as read from class_dict.csv (or built in), rows in file order.

  Attributes:
    rows: (name, (r, g, b)) for every row, void rows included, in file order.
  """
  rows: tuple[tuple[str, tuple[int, int, int]], ...]

  @property
  def void_rows(self) -> tuple[int, ...]:
    return tuple(i for i, (name, _) in enumerate(self.rows) if is_void(name))

  @property
  def classes(self) -> tuple[tuple[str, tuple[int, int, int]], ...]:
    """The non-void (name, colour) pairs; position = class index."""
    return tuple(row for row in self.rows if not is_void(row[0]))

  @property
  def num_classes(self) -> int:
    return len(self.classes)

  def row_to_index(self) -> list[int]:
    """For each row (raw SegNet label value), its class index or IGNORE_LABEL for void."""
    out, next_index = [], 0
    for name, _ in self.rows:
      if is_void(name):
        out.append(IGNORE_LABEL)
      else:
        out.append(next_index)
        next_index += 1
    return out

  def to_json(self) -> list[dict]:
    return [{'index': i, 'name': name, 'color': list(color)}
            for i, (name, color) in enumerate(self.classes)]

  def void_json(self) -> list[dict]:
    return [{'name': self.rows[i][0], 'color': list(self.rows[i][1])} for i in self.void_rows]


def is_void(name: str) -> bool:
  return name.strip().lower() in VOID_NAMES


def segnet_table() -> ClassTable:
  return ClassTable(rows=SEGNET_ROWS)


def parse_class_dict(text: str, path: str) -> ClassTable:
  """Parses class_dict.csv text (`name,r,g,b`), tolerating stray spaces, CRLF, BOM, no final newline.

  Raises:
    errors.InputError: naming `path` and the line, for any malformed content.
  """
  lines = [line.strip() for line in text.lstrip('\ufeff').splitlines()]
  lines = [(n, line) for n, line in enumerate(lines, 1) if line]
  if not lines:
    raise errors.InputError(f'{path}: empty class table')
  header = [c.strip().lower() for c in lines[0][1].split(',')]
  if header != ['name', 'r', 'g', 'b']:
    raise errors.InputError(f'{path}: line {lines[0][0]}: expected header "name,r,g,b", got '
                            f'"{lines[0][1]}"')
  rows, seen_names, seen_colors = [], {}, {}
  for n, line in lines[1:]:
    cells = [c.strip() for c in line.split(',')]
    if len(cells) != 4 or not cells[0]:
      raise errors.InputError(f'{path}: line {n}: expected "name,r,g,b", got "{line}"')
    try:
      color = tuple(int(c) for c in cells[1:])
    except ValueError:
      raise errors.InputError(
          f'{path}: line {n}: colour values must be integers, got "{line}"') from None
    if any(not 0 <= c <= 255 for c in color):
      raise errors.InputError(f'{path}: line {n}: colour values must be in 0..255, got "{line}"')
    name = cells[0]
    if name.lower() in seen_names:
      raise errors.InputError(f'{path}: line {n}: duplicate class name "{name}" '
                              f'(first on line {seen_names[name.lower()]})')
    if color in seen_colors:
      raise errors.InputError(f'{path}: line {n}: colour {color} of "{name}" is already used by '
                              f'"{seen_colors[color]}"')
    seen_names[name.lower()] = n
    seen_colors[color] = name
    rows.append((name, color))
  table = ClassTable(rows=tuple(rows))
  if table.num_classes == 0:
    raise errors.InputError(f'{path}: no non-void classes')
  if table.num_classes > MAX_CLASSES:
    raise errors.InputError(
        f'{path}: {table.num_classes} classes; at most {MAX_CLASSES} are supported')
  return table


@functools.lru_cache(maxsize=4)
def color_lut(table: ClassTable) -> np.ndarray:
  """A uint8 [2**24] table: packed RGB -> class index, IGNORE_LABEL for void, UNKNOWN otherwise."""
  lut = np.full(1 << 24, UNKNOWN, dtype=np.uint8)
  for (_, (r, g, b)), index in zip(table.rows, table.row_to_index()):
    lut[(r << 16) | (g << 8) | b] = index
  return lut


@functools.lru_cache(maxsize=4)
def value_lut(table: ClassTable) -> np.ndarray:
  """A uint8 [256] table: raw index label value -> class index, IGNORE_LABEL or UNKNOWN."""
  lut = np.full(256, UNKNOWN, dtype=np.uint8)
  lut[:len(table.rows)] = table.row_to_index()
  return lut


def _packed(rgb: np.ndarray) -> np.ndarray:
  rgb = rgb.astype(np.uint32)
  return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def colors_to_indices(rgb: np.ndarray, table: ClassTable, path: str,
                      unknown_color: str = 'error') -> np.ndarray:
  """Maps an [H, W, 3] uint8 colour label to [H, W] uint8 class indices (void = IGNORE_LABEL)."""
  packed = _packed(rgb)
  mask = color_lut(table)[packed]
  unknown = mask == UNKNOWN
  if unknown.any():
    if unknown_color == 'void':
      mask[unknown] = IGNORE_LABEL
    else:
      values, counts = np.unique(packed[unknown], return_counts=True)
      top = int(np.argmax(counts))
      color = ((values[top] >> 16) & 255, (values[top] >> 8) & 255, values[top] & 255)
      more = f' and {len(values) - 1} other unknown colour(s)' if len(values) > 1 else ''
      raise errors.InputError(
          f'{path}: colour {tuple(int(c) for c in color)} is not in class_dict.csv '
          f'({int(counts[top])} pixels){more}; fix the label or pass --unknown_color=void')
  return mask


def values_to_indices(values: np.ndarray, table: ClassTable, path: str,
                      unknown_color: str = 'error') -> np.ndarray:
  """Maps an [H, W] uint8 index label (SegNet: 0..C-1, void row value) to class indices."""
  mask = value_lut(table)[values]
  unknown = mask == UNKNOWN
  if unknown.any():
    if unknown_color == 'void':
      mask[unknown] = IGNORE_LABEL
    else:
      bad, counts = np.unique(values[unknown], return_counts=True)
      more = f' and {len(bad) - 1} other unknown value(s)' if len(bad) > 1 else ''
      raise errors.InputError(
          f'{path}: label value {int(bad[0])} is not a class of the {len(table.rows)}-row table '
          f'({int(counts[0])} pixels){more}; fix the label or pass --unknown_color=void')
  return mask
