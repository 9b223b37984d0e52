"""Renders masks, overlays and confusion matrices as uint8 RGB arrays.

Used for TensorBoard image summaries during training and by the predict tool. Only numpy and
PIL are used (no matplotlib) so the trainer image stays small and rendering is headless.
"""

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Anchor colours of a perceptually ordered dark-to-bright colour map (sampled from viridis), so
# larger values are always brighter and a good model shows a bright diagonal.
_HEAT_ANCHORS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]],
    dtype=np.float64)


def _valid_mask(mask: np.ndarray, num_classes: int, ignore_label: int) -> np.ndarray:
  """True where mask holds a real class index, False for void and out-of-range values."""
  return (mask != ignore_label) & (mask >= 0) & (mask < num_classes)


def colorize(mask: np.ndarray,
             colors: np.ndarray,
             void_color: Sequence[int] = (0, 0, 0),
             ignore_label: int = 255) -> np.ndarray:
  """Paints a class-index mask with one colour per class.

  Args:
    mask: [H, W] integer class indices; ignore_label (or any index outside the palette) is void.
    colors: [C, 3] uint8 palette, colors[c] is the colour of class c.
    void_color: RGB colour of void pixels.
    ignore_label: Label value marking void pixels.

  Returns:
    [H, W, 3] uint8 RGB image.
  """
  mask = np.asarray(mask).astype(np.int64)
  colors = np.asarray(colors, dtype=np.uint8)
  valid = _valid_mask(mask, len(colors), ignore_label)
  out = np.empty(mask.shape + (3,), dtype=np.uint8)
  out[...] = np.asarray(void_color, dtype=np.uint8)
  out[valid] = colors[mask[valid]]
  return out


def overlay(image: np.ndarray,
            mask: np.ndarray,
            colors: np.ndarray,
            alpha: float = 0.5,
            ignore_label: int = 255) -> np.ndarray:
  """Blends class colours over an image; void pixels show the unchanged image.

  Args:
    image: [H, W, 3] uint8 RGB image.
    mask: [H, W] integer class indices matching the image size.
    colors: [C, 3] uint8 palette.
    alpha: Opacity of the class colours (0 shows only the image, 1 only the mask).
    ignore_label: Label value marking void pixels.

  Returns:
    [H, W, 3] uint8 RGB image.
  """
  image = np.asarray(image, dtype=np.uint8)
  mask = np.asarray(mask).astype(np.int64)
  if image.shape[:2] != mask.shape:
    raise ValueError(f'image {image.shape[:2]} and mask {mask.shape} sizes differ')
  colors = np.asarray(colors, dtype=np.uint8)
  valid = _valid_mask(mask, len(colors), ignore_label)
  out = image.copy()
  blended = ((1.0 - alpha) * image[valid].astype(np.float64)
             + alpha * colors[mask[valid]].astype(np.float64))
  out[valid] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
  return out


def _heat_colors(values: np.ndarray) -> np.ndarray:
  """Maps values in [0, 1] to [..., 3] uint8 colours of the dark-to-bright heat map."""
  positions = np.clip(values, 0.0, 1.0) * (len(_HEAT_ANCHORS) - 1)
  low = np.minimum(np.floor(positions).astype(np.int64), len(_HEAT_ANCHORS) - 2)
  frac = (positions - low)[..., None]
  rgb = (1.0 - frac) * _HEAT_ANCHORS[low] + frac * _HEAT_ANCHORS[low + 1]
  return np.rint(rgb).astype(np.uint8)


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
  left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
  return right - left, bottom - top


def confusion_matrix_image(cm: np.ndarray,
                           class_names: Sequence[str],
                           cell: int = 24) -> np.ndarray:
  """Draws a row-normalised confusion matrix as a labelled heat map.

  Each row is divided by its sum, so a cell shows the fraction of that true class predicted as
  the column class (the diagonal is per-class recall) and rare classes are as visible as common
  ones. Rows of classes absent from the labels stay dark. Cells carry the percentage, rows are
  labelled with the true class on the left and columns with the predicted class (rotated) on top.

  Args:
    cm: [C, C] confusion matrix, rows true classes, columns predicted classes.
    class_names: C class names.
    cell: Side of one matrix cell in pixels.

  Returns:
    [H, W, 3] uint8 RGB image.
  """
  cm = np.asarray(cm, dtype=np.float64)
  num_classes = cm.shape[0]
  if cm.shape != (num_classes, num_classes) or len(class_names) != num_classes:
    raise ValueError(
        f'need a square matrix matching {len(class_names)} class names, got {cm.shape}')
  row_sums = cm.sum(axis=1, keepdims=True)
  normalised = np.divide(cm, row_sums, out=np.zeros_like(cm), where=row_sums > 0)

  font = ImageFont.load_default()
  scratch = ImageDraw.Draw(Image.new('RGB', (1, 1)))
  names = [str(n) for n in class_names]
  label_w = max(_text_size(scratch, n, font)[0] for n in names)
  label_h = max(_text_size(scratch, n, font)[1] for n in names)
  title = 'Predicted (row-normalised %)'
  title_w, title_h = _text_size(scratch, title, font)
  pad = 6

  # Layout: a title line and rotated column labels on top, row labels on the left.
  left = pad + title_h + pad + label_w + pad
  top = pad + title_h + pad + label_w + pad
  width = left + max(num_classes * cell, title_w) + pad
  height = top + num_classes * cell + pad
  canvas = Image.new('RGB', (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)

  grid = np.repeat(np.repeat(_heat_colors(normalised), cell, axis=0), cell, axis=1)
  canvas.paste(Image.fromarray(grid), (left, top))

  text_black = (0, 0, 0)
  for i, name in enumerate(names):
    # Row label, right-aligned against the grid and vertically centred on its row.
    w, _ = _text_size(draw, name, font)
    draw.text((left - pad - w, top + i * cell + (cell - label_h) // 2), name,
              fill=text_black, font=font)
    # Column label: draw horizontally on a small tile, rotate it 90 degrees, paste above.
    tile = Image.new('RGB', (label_w, label_h + 4), (255, 255, 255))
    ImageDraw.Draw(tile).text((0, 0), name, fill=text_black, font=font)
    tile = tile.rotate(90, expand=True)
    canvas.paste(tile, (left + i * cell + (cell - tile.width) // 2, top - pad - tile.height))

  for i in range(num_classes):
    for j in range(num_classes):
      if row_sums[i, 0] == 0:
        continue
      text = f'{100 * normalised[i, j]:.0f}'
      w, h = _text_size(draw, text, font)
      # Dark text on the bright end of the map, light text on the dark end.
      fill = (0, 0, 0) if normalised[i, j] > 0.6 else (255, 255, 255)
      draw.text((left + j * cell + (cell - w) // 2, top + i * cell + (cell - h) // 2 - 1), text,
                fill=fill, font=font)

  draw.text((left, pad), title, fill=text_black, font=font)
  true_tile = Image.new('RGB', (_text_size(draw, 'True', font)[0] + 2, title_h + 4),
                        (255, 255, 255))
  ImageDraw.Draw(true_tile).text((0, 0), 'True', fill=text_black, font=font)
  true_tile = true_tile.rotate(90, expand=True)
  canvas.paste(true_tile, (pad, top + (num_classes * cell - true_tile.height) // 2))
  return np.asarray(canvas, dtype=np.uint8)


_WHITE = (255, 255, 255)
_BLACK = (0, 0, 0)
_GRID = (210, 210, 210)
_AXIS_TICKS = (0.0, 0.25, 0.5, 0.75, 1.0)


def per_class_iou_image(ious: Sequence[float | None],
                        class_names: Sequence[str],
                        colors: np.ndarray,
                        title: str = '',
                        bar_length: int = 240,
                        row: int = 16) -> np.ndarray:
  """Draws per-class IoU as a horizontal bar chart on a fixed 0..1 axis.

  One row per class: its name on the left, a bar in the class colour as long as the IoU times
  `bar_length`, and the value written after the bar ("n/a" and no bar for a class whose IoU is
  undefined). Grid lines and tick labels mark 0, 0.25, 0.5, 0.75 and 1, so charts of different
  validations and runs read on the same scale.

  Args:
    ious: C values in [0, 1], or None for an undefined IoU.
    class_names: C class names.
    colors: [C, 3] uint8 palette.
    title: Text above the chart; none when empty.
    bar_length: Pixels of a bar of IoU 1.
    row: Height of one class's row in pixels.

  Returns:
    [H, W, 3] uint8 RGB image.
  """
  colors = np.asarray(colors, np.uint8)
  if not len(ious) == len(class_names) == len(colors):
    raise ValueError(f'{len(ious)} values, {len(class_names)} names and {len(colors)} colours')
  font = ImageFont.load_default()
  scratch = ImageDraw.Draw(Image.new('RGB', (1, 1)))
  text_h = max(_text_size(scratch, t, font)[1] for t in [*class_names, 'Ag', title or 'A'])
  pad = 6
  left = pad + max(_text_size(scratch, str(n), font)[0] for n in class_names) + pad
  top = pad + (text_h + pad if title else 0)
  width = left + bar_length + pad + _text_size(scratch, '0.00', font)[0] + pad
  height = top + len(class_names) * row + 4 + text_h + pad
  canvas = Image.new('RGB', (width, height), _WHITE)
  draw = ImageDraw.Draw(canvas)
  bottom = top + len(class_names) * row
  for tick in _AXIS_TICKS:
    x = left + int(round(tick * bar_length))
    draw.line([(x, top), (x, bottom)], fill=_GRID)
    label = f'{tick:g}'
    draw.text((x - _text_size(draw, label, font)[0] // 2, bottom + 2), label, fill=_BLACK,
              font=font)
  for i, (name, value) in enumerate(zip(class_names, ious)):
    y = top + i * row
    text_y = y + (row - text_h) // 2 - 1
    draw.text((left - pad - _text_size(draw, str(name), font)[0], text_y), str(name),
              fill=_BLACK, font=font)
    end = left
    if value is not None:
      end = left + int(round(float(np.clip(value, 0.0, 1.0)) * bar_length))
      if end > left:
        draw.rectangle([left, y + 2, end - 1, y + row - 3], fill=tuple(int(c) for c in colors[i]))
    label = 'n/a' if value is None else f'{value:.2f}'
    draw.text((end + 3, text_y), label, fill=_BLACK, font=font)
  if title:
    draw.text((pad, pad), title, fill=_BLACK, font=font)
  return np.asarray(canvas, dtype=np.uint8)


def legend_image(class_names: Sequence[str],
                 colors: np.ndarray,
                 width: int,
                 swatch: int = 10) -> np.ndarray:
  """Draws a colour legend (a swatch and the name of each class) wrapped to `width` pixels.

  Entries flow left to right in class order and wrap onto new lines; an entry wider than
  `width` gets a line of its own (and is cut at the edge).

  Args:
    class_names: Names of the entries.
    colors: [len(class_names), 3] uint8 colours of their swatches.
    width: Width of the legend in pixels.
    swatch: Side of a colour swatch in pixels.

  Returns:
    [H, width, 3] uint8 RGB image, white background.
  """
  colors = np.asarray(colors, np.uint8)
  if len(class_names) != len(colors):
    raise ValueError(f'{len(class_names)} names and {len(colors)} colours')
  font = ImageFont.load_default()
  scratch = ImageDraw.Draw(Image.new('RGB', (1, 1)))
  pad, gap = 4, 12
  line_h = max([swatch] + [_text_size(scratch, str(n), font)[1] for n in class_names]) + pad
  places, x, y = [], pad, pad
  for name in class_names:
    entry_w = swatch + 4 + _text_size(scratch, str(name), font)[0]
    if x > pad and x + entry_w > width - pad:
      x, y = pad, y + line_h
    places.append((x, y))
    x += entry_w + gap
  canvas = Image.new('RGB', (width, y + line_h + pad), _WHITE)
  draw = ImageDraw.Draw(canvas)
  for (x, y), name, color in zip(places, class_names, colors):
    draw.rectangle([x, y, x + swatch - 1, y + swatch - 1], fill=tuple(int(c) for c in color),
                   outline=(96, 96, 96))
    draw.text((x + swatch + 4, y), str(name), fill=_BLACK, font=font)
  return np.asarray(canvas, dtype=np.uint8)


def text_band(width: int, texts: Sequence[tuple[int, str]]) -> np.ndarray:
  """One line of text `width` pixels wide: each (x, text) is drawn centred on x, kept inside."""
  font = ImageFont.load_default()
  scratch = ImageDraw.Draw(Image.new('RGB', (1, 1)))
  pad = 4
  height = pad + max([_text_size(scratch, t, font)[1] for _, t in texts] + [10]) + pad
  canvas = Image.new('RGB', (width, height), _WHITE)
  draw = ImageDraw.Draw(canvas)
  for x, text in texts:
    w = _text_size(draw, text, font)[0]
    draw.text((min(max(x - w // 2, pad), max(width - pad - w, pad)), pad - 1), text,
              fill=_BLACK, font=font)
  return np.asarray(canvas, dtype=np.uint8)


def annotated_strip(panels: Sequence[np.ndarray],
                    titles: Sequence[str],
                    caption: str,
                    class_names: Sequence[str],
                    colors: np.ndarray,
                    min_width: int = 384) -> np.ndarray:
  """Panels side by side under a caption and their titles, above a class-colour legend.

  Panels narrower together than `min_width` are enlarged by an integer factor (nearest
  neighbour), so small training frames stay legible next to their text.

  Args:
    panels: Equally sized [H, W, 3] uint8 images.
    titles: One title per panel, centred above it.
    caption: The line above the titles (e.g. the frame's name).
    class_names: Legend entries.
    colors: [len(class_names), 3] uint8 legend colours.
    min_width: Smallest width of the panels' row before text is added.

  Returns:
    [H', W', 3] uint8 RGB image; the same size for every call with the same arguments' shapes.
  """
  row = np.concatenate([np.asarray(p, np.uint8) for p in panels], axis=1)
  factor = max(1, -(-min_width // row.shape[1]))
  row = np.repeat(np.repeat(row, factor, axis=0), factor, axis=1)
  panel_w = row.shape[1] // len(panels)
  width = row.shape[1]
  return np.concatenate([
      text_band(width, [(width // 2, caption)]),
      text_band(width, [(i * panel_w + panel_w // 2, t) for i, t in enumerate(titles)]),
      row,
      legend_image(class_names, colors, width)], axis=0)
