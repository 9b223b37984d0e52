"""Tests for trainer.visualize: exact mask colours, void handling and the confusion heat map."""

import numpy as np
import pytest

from trainer import visualize

COLORS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
MASK = np.array([[0, 1], [2, 255]], np.uint8)


def test_colorize_exact_colours():
  out = visualize.colorize(MASK, COLORS, void_color=(7, 8, 9))
  assert out.shape == (2, 2, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[0, 0], [255, 0, 0])
  np.testing.assert_array_equal(out[0, 1], [0, 255, 0])
  np.testing.assert_array_equal(out[1, 0], [0, 0, 255])
  np.testing.assert_array_equal(out[1, 1], [7, 8, 9])


def test_colorize_out_of_palette_is_void():
  out = visualize.colorize(np.array([[5, 0]], np.int32), COLORS)
  np.testing.assert_array_equal(out[0, 0], [0, 0, 0])
  np.testing.assert_array_equal(out[0, 1], [255, 0, 0])


def test_overlay_blends_and_keeps_void_pixels():
  image = np.full((2, 2, 3), 100, np.uint8)
  out = visualize.overlay(image, MASK, COLORS, alpha=0.5)
  assert out.shape == (2, 2, 3) and out.dtype == np.uint8
  # 0.5 * 100 + 0.5 * 255 = 177.5 -> 178; 0.5 * 100 + 0.5 * 0 = 50.
  np.testing.assert_array_equal(out[0, 0], [178, 50, 50])
  np.testing.assert_array_equal(out[1, 0], [50, 50, 178])
  np.testing.assert_array_equal(out[1, 1], [100, 100, 100])  # void keeps the image
  np.testing.assert_array_equal(visualize.overlay(image, MASK, COLORS, alpha=0.0), image)


def test_overlay_size_mismatch_raises():
  with pytest.raises(ValueError):
    visualize.overlay(np.zeros((3, 3, 3), np.uint8), MASK, COLORS)


def _cell_means(image, cm_size, cell):
  """Mean brightness of each matrix cell, locating the grid from its bottom pixel row."""
  # The grid ends a small padding above the bottom edge; its bottom pixel row holds no text
  # (labels are centred on their rows), so its first non-white pixel is the grid's left edge.
  gray = image.astype(np.float64).mean(axis=-1)
  rows = np.nonzero((gray < 255).any(axis=1))[0]
  bottom = rows.max()
  left = int(np.argmax(gray[bottom] < 255))
  top = bottom + 1 - cm_size * cell
  return np.array([[gray[top + i * cell:top + (i + 1) * cell,
                         left + j * cell:left + (j + 1) * cell].mean()
                    for j in range(cm_size)] for i in range(cm_size)])


def test_confusion_matrix_image_shape_and_bright_diagonal():
  names = ['sky', 'building', 'road', 'car']
  cell = 24
  image = visualize.confusion_matrix_image(np.diag([50, 10, 300, 1]), names, cell=cell)
  assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
  assert image.shape[0] >= 4 * cell and image.shape[1] >= 4 * cell
  means = _cell_means(image, 4, cell)
  diagonal = np.diag(means)
  off_diagonal = means[~np.eye(4, dtype=bool)]
  # Row normalisation makes every diagonal cell equally bright despite different counts.
  assert diagonal.min() > off_diagonal.max()
  assert np.ptp(diagonal) < 1e-6


def test_confusion_matrix_image_handles_empty_rows_and_validates():
  image = visualize.confusion_matrix_image(np.zeros((3, 3), np.int64), ['a', 'b', 'c'], cell=10)
  assert image.dtype == np.uint8
  with pytest.raises(ValueError):
    visualize.confusion_matrix_image(np.zeros((3, 3)), ['a', 'b'])


IOU_COLORS = np.array([[200, 30, 30], [30, 160, 30], [30, 30, 200], [160, 120, 20]], np.uint8)


def _pixels_of(image, color):
  return int(np.all(image == np.asarray(color, np.uint8), axis=-1).sum())


def test_per_class_iou_bars_are_as_long_as_their_values_on_a_fixed_axis():
  names = ['sky', 'road', 'pole', 'car']
  image = visualize.per_class_iou_image([0.9, 0.5, 0.07, None], names, IOU_COLORS, title='t')
  assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
  areas = [_pixels_of(image, c) for c in IOU_COLORS]
  # Bars have one height, so their areas are proportional to the values; None has no bar.
  assert areas[0] > areas[1] > areas[2] > 0 and areas[3] == 0
  assert areas[0] / areas[1] == pytest.approx(0.9 / 0.5, rel=0.05)
  # The axis is fixed at 0..1: a value draws the same bar whatever the others are.
  alone = visualize.per_class_iou_image([0.9, 0.01, 0.01, 0.01], names, IOU_COLORS, title='t')
  assert _pixels_of(alone, IOU_COLORS[0]) == areas[0]
  assert alone.shape == image.shape


def test_per_class_iou_image_validates_lengths():
  with pytest.raises(ValueError):
    visualize.per_class_iou_image([0.5, 0.5], ['a'], IOU_COLORS[:2])


def test_legend_holds_every_swatch_and_wraps_to_its_width():
  names = ['Sky', 'Building', 'Pole', 'Road']
  wide = visualize.legend_image(names, IOU_COLORS, width=600)
  narrow = visualize.legend_image(names, IOU_COLORS, width=80)
  for legend, width in ((wide, 600), (narrow, 80)):
    assert legend.shape[1] == width and legend.dtype == np.uint8
    for color in IOU_COLORS:
      assert _pixels_of(legend, color) >= 8 * 8  # A swatch's inside, inside its outline.
  assert narrow.shape[0] > wide.shape[0]  # Wrapped onto more lines.


def test_annotated_strip_adds_caption_titles_and_legend_around_the_panels():
  panel = np.full((20, 30, 3), 77, np.uint8)
  strip = visualize.annotated_strip([panel, panel, panel], ['a', 'b', 'c'], 'frame_0001',
                                    ['x', 'y'], IOU_COLORS[:2], min_width=180)
  # 90 pixels of panels are enlarged twice to reach min_width, then text goes above and below.
  assert strip.shape[1] == 180 and strip.shape[0] > 40
  rows = np.nonzero(np.all(strip == 77, axis=(1, 2)))[0]
  assert len(rows) == 40 and rows.min() > 0 and rows.max() < strip.shape[0] - 1
  for color in IOU_COLORS[:2]:
    assert _pixels_of(strip[rows.max() + 1:], color) > 0  # The legend is below the panels.
  same = visualize.annotated_strip([panel] * 3, ['a', 'b', 'c'], 'another caption', ['x', 'y'],
                                   IOU_COLORS[:2], min_width=180)
  assert same.shape == strip.shape  # Frames of one summary stack into one batch.
