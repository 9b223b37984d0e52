"""Generates synthetic CamVid-like driving scenes in the Kaggle or SegNet on-disk layout.

Used by tests, the default demo run and benchmarks, so none of them needs the real CamVid.
Each scene is a street seen from a car: sky, facades with windows, a road with lane markings
between pavements, cars, pedestrians, poles with signs, trees, fences, a rare bicyclist and some
void clutter. Things are placed in a simple 3-D street and projected through a pinhole camera,
so sizes shrink with distance as in real footage. Every class has its own colour and texture,
varied by per-object jitter, lighting and noise, so a small network can learn the scenes but
not as a colour lookup. Labels are exact; the class shares are close to real CamVid's.

Usage:
  python -m tfrecords_builder.synthetic --output_dir D --layout kaggle|segnet --num N
      --size HxW [--splits train,val] [--seed 0] [--nowrite_class_dict]

--num is a count per split (20) or per-split counts (train=20,val=5). --size is height x width,
like every size flag (default 360x480, CamVid's SegNet frames); the Python API (`generate`,
`render_scene`) takes width and height in that order instead, as PIL does.
"""

import re
from pathlib import Path

import numpy as np
from PIL import Image

from camvid_common import errors
from camvid_common import quiet
from camvid_common import sizes

LAYOUTS = ('kaggle', 'segnet')
MIN_SIDE = 8

# The Kaggle release's class_dict.csv, byte for byte (stray spaces, no final newline), so the
# builder's parser is exercised on exactly what real users feed it.
KAGGLE_CLASS_DICT = (
    'name,r,g,b\nAnimal,64,128,64\nArchway,192,0,128\nBicyclist,0,128, 192\n'
    'Bridge,0, 128, 64\nBuilding,128, 0, 0\nCar,64, 0, 128\nCartLuggagePram,64, 0, 192\n'
    'Child,192, 128, 64\nColumn_Pole,192, 192, 128\nFence,64, 64, 128\n'
    'LaneMkgsDriv,128, 0, 192\nLaneMkgsNonDriv,192, 0, 64\nMisc_Text,128, 128, 64\n'
    'MotorcycleScooter,192, 0, 192\nOtherMoving,128, 64, 64\nParkingBlock,64, 192, 128\n'
    'Pedestrian,64, 64, 0\nRoad,128, 64, 128\nRoadShoulder,128, 128, 192\nSidewalk,0, 0, 192\n'
    'SignSymbol,192, 128, 128\nSky,128, 128, 128\nSUVPickupTruck,64, 128,192\n'
    'TrafficCone,0, 0, 64\nTrafficLight,0, 64, 64\nTrain,192, 64, 128\nTree,128, 128, 0\n'
    'Truck_Bus,192, 128, 192\nTunnel,64, 0, 64\nVegetationMisc,192, 192, 0\nVoid,0, 0, 0\n'
    'Wall,64, 192, 0')

# The SegNet release's classes in index order; label value i = class i, 11 = void.
SEGNET_CLASSES = (
    ('Sky', (128, 128, 128)), ('Building', (128, 0, 0)), ('Pole', (192, 192, 128)),
    ('Road', (128, 64, 128)), ('Pavement', (60, 40, 222)), ('Tree', (128, 128, 0)),
    ('SignSymbol', (192, 128, 128)), ('Fence', (64, 64, 128)), ('Car', (64, 0, 128)),
    ('Pedestrian', (64, 64, 0)), ('Bicyclist', (0, 128, 192)), ('Unlabelled', (0, 0, 0)))
SEGNET_CLASS_DICT = 'name,r,g,b\n' + ''.join(
    f'{name},{r},{g},{b}\n' for name, (r, g, b) in SEGNET_CLASSES)

# Scenes are drawn in a slightly finer id space: lane markings and walls are their own classes
# in the Kaggle release but part of Road and Building in SegNet's 11. uint8 scalars, so that
# np.where over whole frames stays uint8 instead of widening to int64.
(SKY, BUILDING, POLE, ROAD, PAVEMENT, TREE, SIGN, FENCE, CAR, PEDESTRIAN, BICYCLIST, VOID, LANE,
 WALL) = (np.uint8(i) for i in range(14))
_TO_SEGNET = np.array(list(range(12)) + [ROAD, BUILDING], dtype=np.uint8)
_KAGGLE_ROWS = {cells[0]: [int(c) for c in cells[1:]]
                for cells in (line.split(',') for line in KAGGLE_CLASS_DICT.splitlines()[1:])}
_TO_KAGGLE_RGB = np.array([_KAGGLE_ROWS[name] for name in (
    'Sky', 'Building', 'Column_Pole', 'Road', 'Sidewalk', 'Tree', 'SignSymbol', 'Fence', 'Car',
    'Pedestrian', 'Bicyclist', 'Void', 'LaneMkgsDriv', 'Wall')], dtype=np.uint8)

# Base colour per fine class id (sky, lane paint and objects also get their own in the code).
_BASE_COLOURS = ((200, 200, 205), (150, 145, 140), (120, 125, 120), (95, 92, 100),
                 (165, 155, 140), (70, 105, 45), (200, 30, 30), (115, 90, 65), (120, 120, 125),
                 (60, 55, 60), (40, 90, 190), (110, 100, 90), (215, 215, 205), (150, 110, 90))
_FACADE_COLOURS = ((150, 75, 60), (185, 165, 130), (125, 125, 130), (205, 200, 190),
                   (85, 70, 60), (160, 120, 90))
_CAR_COLOURS = ((180, 30, 30), (30, 60, 150), (200, 200, 205), (35, 35, 40), (120, 125, 130),
                (40, 110, 60), (200, 170, 40))
_SIGN_COLOURS = ((200, 30, 30), (30, 70, 190), (230, 200, 40), (235, 235, 235))
# Camera: focal length as a fraction of the width (CamVid's ~60 degree field of view) and its
# height above the road in metres.
_FOCAL, _CAMERA_HEIGHT = 0.9, 1.5


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
  """Bilinearly upsampled uniform noise in [0, 1) with blobs about `cell` pixels across."""
  cell = max(float(cell), 1.0)
  grid = rng.random((int(height / cell) + 2, int(width / cell) + 2), dtype=np.float32)
  ys, xs = np.arange(height) / cell, np.arange(width) / cell
  y0, x0 = ys.astype(int), xs.astype(int)
  fy, fx = (ys - y0).astype(np.float32)[:, None], (xs - x0).astype(np.float32)
  # Separable: interpolate along x on the small grid first, then along y at full size.
  rows = grid[:, x0] + (grid[:, x0 + 1] - grid[:, x0]) * fx
  out = rows[y0]
  out += (rows[1:] - rows[:-1])[y0] * fy
  return out


def _mod(values: np.ndarray, period: float) -> np.ndarray:
  """values % period for positive periods, ~10x faster than numpy's exact float modulo."""
  return values - np.floor(values * np.float32(1 / period)) * np.float32(period)


class _Scene:
  """One frame being drawn: a fine-id label map and a float RGB image, painted back to front."""

  def __init__(self, rng: np.random.Generator, width: int, height: int):
    self.rng, self.w, self.h = rng, width, height
    self.f = _FOCAL * width
    self.xv = width * rng.uniform(0.4, 0.6)  # vanishing point: the road bends a little
    self.yh = height * rng.uniform(0.38, 0.5)  # horizon row
    # Street cross-section in metres from the camera: road edges, then facades behind pavements.
    self.road = (-rng.uniform(2.5, 6.0), rng.uniform(2.5, 6.0))
    self.facade = (self.road[0] - rng.uniform(1.5, 4.5), self.road[1] + rng.uniform(1.5, 4.5))
    self.zfar = rng.uniform(70.0, 200.0)  # a cross street closes the view here
    # Exposure and colour cast, applied to every colour as it is painted (cheaper than later).
    self.cast = (rng.uniform(0.6, 1.25) * rng.uniform(0.9, 1.1, 3)).astype(np.float32)

  def colour(self, base, spread=18.0) -> np.ndarray:
    """`base` jittered per object, so each class is a colour distribution, not one colour."""
    # Mostly lightness changes plus a smaller hue shift, so grey asphalt never turns pink.
    jitter = self.rng.normal(0, spread) + self.rng.normal(0, spread / 3, 3)
    return (np.asarray(base, np.float32) + jitter).astype(np.float32)

  def background(self):
    """Sky, ground (road, markings, pavement), facades and the far cross street, per pixel."""
    rng, f, hc, h, w = self.rng, np.float32(self.f), np.float32(_CAMERA_HEIGHT), self.h, self.w
    dx = (np.arange(w, dtype=np.float32) + 0.5 - np.float32(self.xv))[None, :]
    dy = (np.arange(h, dtype=np.float32) + 0.5 - np.float32(self.yh))[:, None]
    # Ground point hit by each pixel's ray (depth zg, lateral xg); far away above the horizon.
    zg = np.where(dy > 0, f * hc / np.maximum(dy, 1e-3), np.float32(1e6))
    xg = dx * (zg / f)
    # Facade hit: the plane at the facade's lateral offset; hf = height on it (< 0: the ray
    # meets the ground first). The depth zf only depends on the column.
    plane = np.where(dx < 0, self.facade[0], self.facade[1]).astype(np.float32)
    zf = (plane * f / np.where(np.abs(dx) < 1e-3, np.float32(1e-3) * np.sign(plane), dx))[0]
    hf = hc - dy * (zf / f)
    ground = hf < 0
    far = np.where(ground, zg > self.zfar, zf > self.zfar)

    # Facade segments along each side: buildings, low walls, fences with trees behind, trees.
    segments = []  # (side, start depth, kind, top height, lower-layer height, colour)
    for side in range(2):
      z = -rng.uniform(0, 10)
      while z < self.zfar:
        kind = int(np.searchsorted((0.58, 0.7, 0.86), rng.random()))  # P = .58 .12 .16 .14
        top = rng.uniform(6, 25) if kind == 0 else rng.uniform(2.5, 9)
        low = (0, rng.uniform(1.2, 2.5), rng.uniform(1.0, 2.0), 0)[kind]
        colour = self.colour(_FACADE_COLOURS[rng.integers(len(_FACADE_COLOURS))], 12)
        segments.append((side, z, kind, top, low, colour))
        z += rng.uniform(6, 25)
    sides, starts, kinds, tops, lows, colours = (np.array(v) for v in zip(*segments))
    n, n_left = len(segments), int(np.sum(sides == 0))
    seg = np.where(dx[0] < 0, np.searchsorted(starts[:n_left], zf, 'right') - 1,
                   n_left + np.searchsorted(starts[n_left:], zf, 'right') - 1)
    seg = np.clip(seg, 0, n - 1).astype(np.int32)
    kind = kinds[seg]
    top = tops[seg].astype(np.float32) + np.float32(0.8) * np.sin(zf * 1.7 + seg) * (kind >= 2)
    lower = np.array([BUILDING, WALL, FENCE, TREE], np.uint8)[kind]
    # Behind a low wall: a building or trees; behind a fence: trees.
    upper = np.where((kind == 0) | ((kind == 1) & (seg % 2 == 0)), BUILDING, TREE)
    facade = np.where(hf < np.where(kind == 0, top, lows[seg].astype(np.float32)), lower,
                      np.where(hf < top, upper, SKY))
    # Far cross street: a row of buildings or trees of varying height.
    skyline = rng.uniform(4, 16) + 4 * _smooth_noise(rng, 1, w, w / 12)[0]
    backdrop = np.where(hc - dy * self.zfar / f < skyline,
                        BUILDING if rng.random() < 0.7 else TREE, SKY)
    road = (xg >= self.road[0]) & (xg <= self.road[1])
    lane_x = rng.uniform(self.road[0] + 2.5, self.road[1] - 2.5) if np.ptp(self.road) > 5 else 0
    marks = (np.abs(xg - lane_x) < 0.08) & (zg % 9 < 3)  # dashed centre line, solid edges
    marks |= (np.abs(xg - self.road[0] - 0.3) < 0.06) | (np.abs(xg - self.road[1] + 0.3) < 0.06)
    ground_label = np.where(road, np.where(marks, LANE, ROAD), PAVEMENT)
    label = self.label = np.where(far, backdrop, np.where(ground, ground_label, facade))

    # Colours: one gather from a palette (jittered class colours, per-segment wall and window
    # colours, one sky colour per row for the gradient) times a grey-level texture map.
    t = np.clip((np.arange(h) + 0.5) / self.yh, 0, 1)[:, None]
    zenith = self.colour((120, 150, 200) if rng.random() < 0.5 else (175, 180, 190), 15)
    palette = np.concatenate([
        [self.colour(c, 15) for c in _BASE_COLOURS], colours,
        colours * 0.35 + self.colour((40, 50, 60), 8),
        zenith * (1 - t) + self.colour((215, 215, 220), 10) * t]).astype(np.float32) * self.cast
    floor = _mod(hf, 3.2)
    windows = ((zf % 3.0) < 1.7) & (hf > 1) & (floor > 0.9) & (floor < 2.4)
    near_facade = ~far & ~ground
    index = np.where(near_facade & (label == BUILDING), np.where(windows, 14 + n + seg, 14 + seg),
                     label.astype(np.int32))
    index = np.where(near_facade & (label == WALL), 14 + seg, index)
    index = np.where(label == SKY, np.arange(14 + 2 * n, 14 + 2 * n + h, dtype=np.int32)[:, None],
                     index)
    # Texture: asphalt patches, clouds, then pavement slab joints, brick courses, fence slats.
    shade = np.where(label == ROAD, 0.85 + 0.3 * _smooth_noise(rng, h, w, w / 30), np.float32(1))
    shade *= np.where(label == SKY, 0.85 + 0.3 * _smooth_noise(rng, h, w, w / 8), np.float32(1))
    slabs = (_mod(xg, 1.2) < 0.08) | (_mod(zg, 1.2) < 0.08)
    dark = (((label == PAVEMENT) & slabs) | ((label == WALL) & (_mod(hf, 0.3) < 0.06))
            | ((label == FENCE) & ((zf % 0.35) < 0.12)))
    shade *= np.where(dark, np.float32(0.65), np.float32(1))
    self.image = np.take(palette, index, axis=0)
    self.image *= shade[..., None]

  def part(self, x, z, half_width, h0, h1, cls, colour, power=8.0, ring=0.0):
    """Paints an upright superellipse (power 2: ellipse; large: box) at depth z, x across."""
    s = self.f / z
    x0, x1 = self.xv + (x - half_width) * s, self.xv + (x + half_width) * s
    y0, y1 = self.yh + (_CAMERA_HEIGHT - h1) * s, self.yh + (_CAMERA_HEIGHT - h0) * s
    # Pixel box, at least one pixel across so thin poles never vanish at small sizes.
    ix0, iy0 = max(int(np.floor(x0)), 0), max(int(np.floor(y0)), 0)
    ix1 = min(max(int(np.ceil(x1)), ix0 + 1), self.w)
    iy1 = min(max(int(np.ceil(y1)), iy0 + 1), self.h)
    if ix0 >= ix1 or iy0 >= iy1:
      return
    u = (np.arange(ix0, ix1) + 0.5 - (x0 + x1) / 2) / max((x1 - x0) / 2, 0.5)
    v = (np.arange(iy0, iy1) + 0.5 - (y0 + y1) / 2) / max((y1 - y0) / 2, 0.5)
    r = np.abs(u)[None, :] ** power + np.abs(v)[:, None] ** power
    mask = (r <= 1) & (r >= ring ** power)
    self.label[iy0:iy1, ix0:ix1][mask] = cls
    # Lit from above: a vertical gradient gives objects some volume.
    shaded = (1 - 0.2 * v.astype(np.float32))[:, None, None] * (
        np.asarray(colour, np.float32) * self.cast)
    np.copyto(self.image[iy0:iy1, ix0:ix1], shaded, where=mask[..., None])

  def objects(self):
    """Places things in the street and paints them far to near."""
    rng, (left, right) = self.rng, self.road
    todo = []  # (depth, draw method, lateral position)

    def add(draw, x, zmax):
      zmin = max(3.5, abs(x) * self.f / (0.45 * self.w))  # near enough the centre to be seen
      todo.append((rng.uniform(zmin, max(zmin, zmax) + 1e-3), draw, x))

    def pavement_x(outer):
      kerb, wall = (left, self.facade[0]) if rng.random() < 0.5 else (right, self.facade[1])
      return kerb + (wall - kerb) * (rng.uniform(0.55, 0.9) if outer else rng.uniform(0.1, 0.5))

    for _ in range(1 + rng.poisson(2.5)):
      add(self.car, rng.uniform(left + 1.0, right - 1.0), 60)
    for _ in range(rng.poisson(2.5)):
      add(self.pedestrian, pavement_x(outer=rng.random() < 0.5), 35)
    if rng.random() < 0.35:
      add(self.bicyclist, left + 0.9 if rng.random() < 0.5 else right - 0.9, 30)
    for _ in range(1 + rng.poisson(1.8)):
      add(self.pole, (left - 0.4) if rng.random() < 0.5 else (right + 0.4), 45)
    for _ in range(rng.poisson(1.2)):
      add(self.tree, pavement_x(outer=True), 50)
    for _ in range(rng.poisson(1.0)):  # unlabelled street furniture: bins, boxes, bollards
      add(self.clutter, pavement_x(outer=rng.random() < 0.5), 30)
    for z, draw, x in sorted(todo, key=lambda item: -item[0]):
      draw(x, z)

  def car(self, x, z):
    rng, w, h = self.rng, self.rng.uniform(0.8, 1.0), self.rng.uniform(1.35, 1.8)
    paint = self.colour(_CAR_COLOURS[rng.integers(len(_CAR_COLOURS))], 20)
    for side in (-1, 1):  # wheels
      self.part(x + side * 0.72 * w, z, 0.16, 0, 0.6, CAR, (25, 25, 28))
    self.part(x, z, w, 0.22, 0.62 * h, CAR, paint, power=6)
    self.part(x, z, 0.8 * w, 0.5 * h, h, CAR, paint, power=4)
    self.part(x, z, 0.66 * w, 0.63 * h, 0.93 * h, CAR, self.colour((45, 55, 65), 10), power=5)
    for side in (-1, 1):  # lights
      self.part(x + side * 0.8 * w, z, 0.13, 0.42 * h, 0.5 * h, CAR, (190, 30, 30), power=4)

  def pedestrian(self, x, z):
    h = self.rng.uniform(1.55, 1.9)
    legs, coat = self.colour((45, 45, 55), 20), self.colour((70, 60, 65), 45)
    for side in (-1, 1):
      self.part(x + side * 0.08, z, 0.07, 0, 0.5 * h, PEDESTRIAN, legs)
    self.part(x, z, 0.23, 0.45 * h, 0.84 * h, PEDESTRIAN, coat, power=4)
    self.part(x, z, 0.1, 0.84 * h, h, PEDESTRIAN, self.colour((190, 150, 125), 20), power=2)

  def bicyclist(self, x, z):
    jacket = self.colour((200, 160, 40) if self.rng.random() < 0.5 else (40, 90, 190), 30)
    for side in (-1, 1):  # wheels as rings: the background shows through the spokes
      self.part(x + side * 0.55, z, 0.34, 0, 0.68, BICYCLIST, (30, 30, 30), power=2, ring=0.72)
    self.part(x, z, 0.55, 0.55, 0.62, BICYCLIST, self.colour((150, 40, 40), 30), power=10)
    self.part(x - 0.05, z, 0.08, 0.5, 1.0, BICYCLIST, (40, 40, 50))
    self.part(x + 0.1, z, 0.2, 0.95, 1.5, BICYCLIST, jacket, power=4)
    self.part(x + 0.2, z, 0.11, 1.5, 1.74, BICYCLIST, (180, 170, 160), power=2)

  def pole(self, x, z):
    rng, h = self.rng, self.rng.uniform(3.5, 8.0)
    self.part(x, z, 0.09, 0, h, POLE, self.colour((120, 125, 120), 25), power=20)
    if rng.random() < 0.8:
      sign, size = _SIGN_COLOURS[rng.integers(len(_SIGN_COLOURS))], rng.uniform(0.3, 0.55)
      top = min(h, rng.uniform(2.6, 3.6))
      self.part(x, z, size, top - 2 * size, top, SIGN, self.colour(sign, 12),
                power=2 if rng.random() < 0.5 else 12)

  def tree(self, x, z):
    rng, trunk = self.rng, self.rng.uniform(1.8, 3.5)
    self.part(x, z, 0.15, 0, trunk + 0.5, TREE, self.colour((80, 60, 40), 12))
    for _ in range(rng.integers(3, 7)):  # the crown: a cluster of blobs
      r, cx, cy = rng.uniform(0.9, 1.8), x + rng.uniform(-1.2, 1.2), trunk + rng.uniform(0.5, 3)
      self.part(cx, z, r, cy - r, cy + r, TREE, self.colour((70, 105, 45), 18), power=2)

  def clutter(self, x, z):
    self.part(x, z, self.rng.uniform(0.2, 0.5), 0, self.rng.uniform(0.5, 1.2), VOID,
              self.colour((120, 110, 100), 60), power=self.rng.uniform(3, 12))

  def finish(self) -> np.ndarray:
    """Adds an occasional car bonnet (void, as in CamVid), blur, light, leaves and noise."""
    rng, image, h, w = self.rng, self.image, self.h, self.w
    if rng.random() < 0.25:
      xs = (np.arange(w) + 0.5 - w / 2) / (0.7 * w)
      edge = h * (1 - rng.uniform(0.05, 0.12) * (1 - xs ** 2))
      bonnet = (np.arange(h) + 0.5)[:, None] >= edge[None, :]
      self.label[bonnet] = VOID
      image[bonnet] = self.colour((40, 40, 45), 15) * self.cast
    # Soft [1 2 1] blur on half the frames: edges blend as through a real lens while labels
    # stay sharp. Not on small frames, where it would wipe out one-pixel poles.
    if rng.random() < 0.5 and min(h, w) >= 200:
      image[1:-1] = (image[:-2] + image[2:] + 2 * image[1:-1]) * 0.25
      image[:, 1:-1] = (image[:, :-2] + image[:, 2:] + 2 * image[:, 1:-1]) * 0.25
    # Uneven light (shadows, vignetting) and leaf texture in one multiply.
    light = 0.8 + 0.4 * _smooth_noise(rng, h, w, w / 3)
    light *= np.where(self.label == TREE, 0.45 + 1.1 * _smooth_noise(rng, h, w, w / 90),
                      np.float32(1))
    image *= light[..., None]
    image = np.clip(image, 0, 255, out=image).astype(np.int16)
    # Sensor noise from uniform bytes (far cheaper than Gaussian): sd 1.7 .. 7 grey levels.
    noise = np.frombuffer(rng.bytes(image.size), np.uint8).reshape(image.shape) - np.int16(128)
    image += (noise * int(rng.integers(3, 13))) >> 7
    return np.clip(image, 0, 255, out=image).astype(np.uint8)


def _render_fine(rng: np.random.Generator, width: int, height: int):
  scene = _Scene(rng, width, height)
  scene.background()
  scene.objects()
  return scene.finish(), scene.label


def render_scene(rng: np.random.Generator, width: int, height: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Renders one layout-independent scene.

  Args:
    rng: the source of all randomness; the same generator state gives the same scene.
    width: image width in pixels (>= MIN_SIDE).
    height: image height in pixels (>= MIN_SIDE).

  Returns:
    (image, label): uint8 [height, width, 3] RGB and uint8 [height, width] SegNet class ids
    0..10, 11 = void.
  """
  _check_size((width, height))
  image, fine = _render_fine(rng, width, height)
  return image, _TO_SEGNET[fine]


def _check_size(size) -> tuple[int, int]:
  """(width, height) as ints, each at least MIN_SIDE."""
  width, height = (int(v) for v in size)
  if width < MIN_SIDE or height < MIN_SIDE:
    raise ValueError(f'size (width {width}, height {height}): both must be at least {MIN_SIDE}')
  return width, height


def _is_count(n) -> bool:
  return isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 0


def generate(output_dir: str, layout: str, num: int | dict[str, int], size: tuple[int, int],
             splits=('train', 'val'), seed: int = 0,
             write_class_dict: bool = True) -> dict[str, list[str]]:
  """Writes synthetic frames in a CamVid layout under `output_dir` (local, created if needed).

  Frames are numbered across splits in order (synth00_000000, ...), so names are unique as in
  real CamVid, and frame k's content depends only on (seed, k, size): the same arguments always
  give byte-identical files.

  Args:
    output_dir: local folder; files with the same names are overwritten.
    layout: 'kaggle' ({split}/<frame>.png, RGB colour labels {split}_labels/<frame>_L.png and
      the Kaggle class_dict.csv) or 'segnet' ({split}annot/<frame>.png index labels, 11 = void).
    num: frames per split, or {split: count}, whose keys are then the splits written.
    size: (width, height) in pixels: width first, as PIL's Image.size (the --size flag is HxW).
    splits: the splits written when `num` is an int.
    seed: non-negative seed.
    write_class_dict: write class_dict.csv. The builder has the SegNet table built in; a Kaggle
      folder without it is only useful to test that error.

  Returns:
    {split: [frame names written, in order]}.

  Raises:
    ValueError: bad layout, size, counts, split names or seed.
  """
  if layout not in LAYOUTS:
    raise ValueError(f'layout "{layout}": must be one of {", ".join(LAYOUTS)}')
  width, height = _check_size(size)
  counts = dict(num) if isinstance(num, dict) else {split: num for split in splits}
  for split, n in counts.items():
    if not re.fullmatch(r'[A-Za-z0-9_-]+', str(split)):
      raise ValueError(f'split name "{split}": use letters, digits, "_" or "-"')
    if not _is_count(n):
      raise ValueError(f'frame count for split "{split}" must be an integer >= 0, got {n!r}')
  if not _is_count(seed):
    raise ValueError(f'seed must be an integer >= 0, got {seed!r}')
  out = Path(output_dir)
  out.mkdir(parents=True, exist_ok=True)
  if write_class_dict:
    text = KAGGLE_CLASS_DICT if layout == 'kaggle' else SEGNET_CLASS_DICT
    (out / 'class_dict.csv').write_bytes(text.encode('ascii'))
  written, k = {}, 0
  for split, n in counts.items():
    image_dir = out / split
    label_dir = out / (f'{split}_labels' if layout == 'kaggle' else f'{split}annot')
    image_dir.mkdir(exist_ok=True)
    label_dir.mkdir(exist_ok=True)
    written[split] = []
    for _ in range(n):
      name = f'synth{seed:02d}_{k:06d}'
      image, fine = _render_fine(np.random.default_rng([seed, k]), width, height)
      # zlib level 1: 4x faster than the default and the noisy images barely compress anyway.
      Image.fromarray(image).save(image_dir / f'{name}.png', compress_level=1)
      if layout == 'kaggle':
        Image.fromarray(_TO_KAGGLE_RGB[fine]).save(label_dir / f'{name}_L.png')
      else:
        Image.fromarray(_TO_SEGNET[fine]).save(label_dir / f'{name}.png')
      written[split].append(name)
      k += 1
  return written


# Command line. The flags are defined only when this runs as a program, so importing the module
# (the builder does, and has its own --output_dir) cannot collide with them.


def _main(argv):
  del argv  # run_app rejects positional arguments.
  from absl import flags  # pylint: disable=g-import-not-at-top
  opts = flags.FLAGS
  if not opts.output_dir:
    raise errors.InputError('--output_dir is required')
  height, width = sizes.parse_hxw(opts.size, '--size')
  if height < MIN_SIDE or width < MIN_SIDE:
    raise errors.InputError(f'--size {opts.size}: height and width must be at least {MIN_SIDE}')
  if re.fullmatch(r'\d+', opts.num):
    num = int(opts.num)
  elif re.fullmatch(r'[A-Za-z0-9_-]+=\d+(,[A-Za-z0-9_-]+=\d+)*', opts.num):
    num = {split: int(n) for split, n in (item.split('=') for item in opts.num.split(','))}
  else:
    raise errors.InputError(f'--num {opts.num}: expected a count (20) or split=count pairs '
                            '(train=20,val=5)')
  splits = [s.strip() for s in opts.splits.split(',') if s.strip()]
  if not all(re.fullmatch(r'[A-Za-z0-9_-]+', split) for split in splits):
    raise errors.InputError(f'--splits {opts.splits}: split names use letters, digits, "_" or '
                            '"-"')
  if isinstance(num, dict) and opts['splits'].present and set(splits) != set(num):
    raise errors.InputError(f'--splits {opts.splits}: does not match the splits in --num '
                            f'{opts.num}')
  try:
    written = generate(opts.output_dir, opts.layout, num, (width, height), splits=splits,
                       seed=opts.seed, write_class_dict=opts.write_class_dict)
  except OSError as e:
    raise errors.InputError(f'{e.filename or opts.output_dir}: {e.strerror or e}') from None
  except ValueError as e:
    raise errors.InputError(str(e)) from None
  counts = ', '.join(f'{split}={len(names)}' for split, names in written.items())
  print(f'Wrote {counts} {opts.layout} frames of {height}x{width} (HxW) to {opts.output_dir}')


def run():
  """Command-line entry (also the `camvid-synthetic` console script)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('output_dir', None, 'Folder to write the CamVid-layout frames into.')
  flags.DEFINE_enum('layout', 'kaggle', LAYOUTS, 'On-disk CamVid layout to write.')
  flags.DEFINE_string('num', '20', 'Frames per split (20) or per-split counts (train=20,val=5).')
  flags.DEFINE_string('size', '360x480', 'Frame size as HxW (height x width), e.g. 360x480.')
  flags.DEFINE_string('splits', 'train,val', 'Comma-separated splits, used when --num is a count.')
  flags.DEFINE_integer('seed', 0, 'Non-negative seed; the same flags give byte-identical files.',
                       lower_bound=0)
  flags.DEFINE_bool('write_class_dict', True, 'Write class_dict.csv.')
  # Every tool takes --verbose; this one never loads TensorFlow, so quiet.start() has no work.
  quiet.define_absl_flag()
  errors.run_app(_main)


if __name__ == '__main__':
  run()
