"""Synthetic shape-detection dataset written in the official COCO or KITTI layout.

Every image shows 1-8 filled shapes of five classes (:data:`CLASSES`) on a
textured, noisy background, together with 0-3 distractor shapes that belong to
no class (rings, crescents, chevrons, thick scribbles). The class is given by
the shape only: every object gets a random colour, chosen to contrast with the
background under it.

The files follow the official layouts, so the real COCO and KITTI converters
read them unchanged:

* ``fmt="coco"``: ``train2017/{id:012d}.jpg``, ``val2017/{id:012d}.jpg`` and
  ``annotations/instances_{train,val}2017.json``.
* ``fmt="kitti"``: ``training/image_2/{i:06d}.png`` and
  ``training/label_2/{i:06d}.txt`` for the train images followed by the val
  images (KITTI has no official val split; the converter makes one).

Design rules (the numbers are the module constants below):

* Image size: the longer side is ``size``; the shorter one is a random even
  number in about ``[0.75 * size, size]``; landscape or portrait with equal
  odds, so letterboxing is exercised both ways.
* Object size: the longer side of the (unrotated) shape is 5 %-60 % of
  ``size``, drawn log-uniformly but tilted towards larger sizes, so small
  objects are common but not dominant. Aspect ratio w/h is in [0.5, 2].
* Truncation: at most 30 % of a shape's area may lie outside the image.
* Occlusion: later shapes may cover earlier ones, but every annotated object
  keeps at least 60 % of its in-image area visible. A placement that breaks
  this is resampled a few times; if every try breaks it, the new object is
  still drawn when the objects it covers keep at least 15 % visible, and
  those become "heavily occluded": ignored regions instead of objects.
  Otherwise the new object is dropped.
* Ignored regions: heavily occluded objects, plus tiny class shapes (2 %-4 %
  of ``size``, below the annotated range) added as clutter to some images.
  They are ``DontCare`` lines in KITTI and ``iscrowd: 1`` annotations (with
  an uncompressed RLE mask of the visible pixels, as in the official files)
  in COCO, so an evaluator ignores detections there.
* Boxes are the tight box of the whole shape outline (visible and occluded
  parts), clipped to the image, in continuous pixel coordinates where pixel
  ``i`` spans ``[i, i + 1)``.

Each image is drawn from its own ``np.random.default_rng([seed, split, index])``
so the output is byte-identical for the same seed and the pixels are the same
in both formats.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from numbers import Integral
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from kprune.fileio import write_bytes_atomic

CLASSES = ("ellipse", "triangle", "rectangle", "star", "cross")
# Deliberately not 0..4: the COCO converter has to map category ids to labels.
CATEGORY_IDS = (11, 13, 17, 19, 23)
KITTI_TYPES = tuple(name.capitalize() for name in CLASSES)
FORMATS = ("coco", "kitti")

MIN_SIZE = 32
MIN_OBJECTS, MAX_OBJECTS = 1, 8
MAX_DISTRACTORS = 3
MIN_OBJECT_FRACTION, MAX_OBJECT_FRACTION = 0.05, 0.60
# Exponent < 1 on the log-uniform variable moves mass towards large objects:
# about 16 % of the objects are below 10 % of the image side.
SIZE_TILT = 0.7
MAX_ASPECT = 2.0
MAX_TRUNCATION = 0.30
MIN_VISIBLE = 0.60
BURY_MIN_VISIBLE = 0.15
PLACEMENT_TRIES = 6
INSIDE_PROBABILITY = 0.75
CLUTTER_PROBABILITY = 0.3
CLUTTER_FRACTION = (0.02, 0.04)
MIN_CONTRAST = 110.0
JPEG_QUALITY = 90
PNG_COMPRESSION = 1

_SPLIT_CODES = {"train": 0, "val": 1}
_COCO_SPLIT_DIRS = {"train": "train2017", "val": "val2017"}
# COCO image ids are unique over both splits: val ids start at a multiple of
# this offset above every train id.
_VAL_ID_OFFSET = 1_000_000
# Fixed dates, not the clock, so that the same seed gives identical bytes.
_DATE_CREATED = "2017/09/01"
_DATE_CAPTURED = "2017-09-01 00:00:00"
_LICENSE = {"url": "https://creativecommons.org/publicdomain/zero/1.0/", "id": 1, "name": "CC0 1.0"}
# KITTI's values for unknown 3D fields: alpha, then h w l, x y z, rotation_y.
_KITTI_ALPHA = "-10"
_KITTI_3D = "-1 -1 -1 -1000 -1000 -1000 -10"
_AA_SHIFT = 4  # cv2 sub-pixel bits: vertices are drawn at 1/16 pixel precision


# --------------------------------------------------------------------------
# Unit shapes: outlines whose bounding box is exactly [-0.5, 0.5]^2, so that
# scaling by (w, h) gives an unrotated shape of exactly that width and height.


def _fit_unit_box(points: np.ndarray) -> np.ndarray:
    """Scale and shift points so that their bounding box is [-0.5, 0.5]^2."""
    low, high = points.min(axis=0), points.max(axis=0)
    return (points - (low + high) / 2) / (high - low)


def _unit_ellipse(rng: np.random.Generator) -> np.ndarray:
    """A circle outline; the aspect ratio applied later makes it an ellipse."""
    angles = np.linspace(0.0, 2 * np.pi, 64, endpoint=False)
    return 0.5 * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _unit_triangle(rng: np.random.Generator) -> np.ndarray:
    """A triangle with its apex anywhere over the middle of the base."""
    apex = rng.uniform(-0.35, 0.35)
    return np.array([[apex, -0.5], [0.5, 0.5], [-0.5, 0.5]])


def _unit_rectangle(rng: np.random.Generator) -> np.ndarray:
    """A square outline; the aspect ratio makes it a rectangle."""
    return np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])


def _unit_star(rng: np.random.Generator) -> np.ndarray:
    """A five- or six-pointed star with deep notches (so it is never a blob)."""
    points = int(rng.choice([5, 6]))
    inner = rng.uniform(0.38, 0.5)
    angles = np.arange(2 * points) * np.pi / points - np.pi / 2
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return _fit_unit_box(np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1))


def _unit_cross(rng: np.random.Generator) -> np.ndarray:
    """A plus sign whose arms are 26 %-40 % of its width thick."""
    t = rng.uniform(0.26, 0.40) / 2
    return np.array(
        [[-t, -0.5], [t, -0.5], [t, -t], [0.5, -t], [0.5, t], [t, t],
         [t, 0.5], [-t, 0.5], [-t, t], [-0.5, t], [-0.5, -t], [-t, -t]]
    )


_CLASS_SHAPES: tuple[Callable[[np.random.Generator], np.ndarray], ...] = (
    _unit_ellipse, _unit_triangle, _unit_rectangle, _unit_star, _unit_cross,
)


# Distractors return (contours, stroke): filled contours (several contours
# make holes) when stroke is 0, otherwise an open polyline whose thickness is
# `stroke` times the shape's longer side.


def _distractor_ring(rng: np.random.Generator) -> tuple[list[np.ndarray], float]:
    """A hollow ellipse: unlike the ellipse class, the background shows inside."""
    outer = _unit_ellipse(rng)
    return [outer, outer * rng.uniform(0.5, 0.72)], 0.0


def _distractor_crescent(rng: np.random.Generator) -> tuple[list[np.ndarray], float]:
    """A unit circle minus an offset circle: a thin crescent, never a full ellipse."""
    offset, radius = rng.uniform(0.3, 0.45), rng.uniform(0.85, 0.95)
    # Where the two circles cross, then the outer arc away from the bite and
    # the inner arc back.
    x = (1 - radius**2 + offset**2) / (2 * offset)
    y = math.sqrt(max(1 - x * x, 0.0))
    theta = math.atan2(y, x)
    phi = math.atan2(y, x - offset)
    outer = np.linspace(theta, 2 * np.pi - theta, 40)
    inner = np.linspace(-phi, -(2 * np.pi - phi), 40)
    points = np.concatenate(
        [np.stack([np.cos(outer), np.sin(outer)], axis=1),
         np.stack([offset + radius * np.cos(inner), radius * np.sin(inner)], axis=1)]
    )
    return [_fit_unit_box(points)], 0.0


def _distractor_chevron(rng: np.random.Generator) -> tuple[list[np.ndarray], float]:
    """A thin "^": two arms meeting at an angle, with a deep notch (not a triangle)."""
    arm = rng.uniform(0.25, 0.4)
    points = np.array([[-1, 0.5], [0, -0.5], [1, 0.5], [1 - arm, 0.5 + arm * 0.6],
                       [0, -0.5 + arm * 1.6], [-1 + arm, 0.5 + arm * 0.6]])
    return [_fit_unit_box(points)], 0.0


def _distractor_scribble(rng: np.random.Generator) -> tuple[list[np.ndarray], float]:
    """A thick bent polyline through 3-5 random points."""
    points = rng.uniform(-0.5, 0.5, (int(rng.integers(3, 6)), 2))
    return [points], rng.uniform(0.05, 0.1)


_DISTRACTORS = (_distractor_ring, _distractor_crescent, _distractor_chevron, _distractor_scribble)


# --------------------------------------------------------------------------
# Geometry.


def _polygon_area(points: np.ndarray) -> float:
    """Area of a simple polygon (shoelace formula)."""
    if len(points) < 3:
        return 0.0
    x, y = points[:, 0], points[:, 1]
    # Sum of x_i * y_(i+1) - x_(i+1) * y_i, the closing edge written out.
    twice = np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]) + x[-1] * y[0] - x[0] * y[-1]
    return 0.5 * abs(float(twice))


def _clip_polygon(points: np.ndarray, width: int, height: int) -> np.ndarray:
    """Clip a polygon to the image rectangle (Sutherland-Hodgman).

    The rectangle is convex, so this is exact for the non-convex star and cross
    too (the result may have zero-width edges along the border, which change
    neither the area nor the box).
    """
    if points[:, 0].min() >= 0 and points[:, 1].min() >= 0 and \
            points[:, 0].max() <= width and points[:, 1].max() <= height:
        return points  # the common case, and the Python loop below is slow
    result = [tuple(p) for p in points]
    for axis, limit, keep_above in ((0, 0.0, True), (0, width, False), (1, 0.0, True), (1, height, False)):
        source, result = result, []
        for i, current in enumerate(source):
            previous = source[i - 1]
            current_in = (current[axis] >= limit) == keep_above
            previous_in = (previous[axis] >= limit) == keep_above
            if current_in != previous_in:
                t = (limit - previous[axis]) / (current[axis] - previous[axis])
                result.append(tuple(p + t * (c - p) for p, c in zip(previous, current)))
            if current_in:
                result.append(current)
        if not result:
            break
    return np.array(result, dtype=np.float64).reshape(-1, 2)


def _rotation(angle: float) -> np.ndarray:
    """2x2 rotation matrix (acting on row vectors after transposition)."""
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


# --------------------------------------------------------------------------
# Drawing.


def _image_shape(rng: np.random.Generator, size: int) -> tuple[int, int]:
    """(height, width): longer side `size`, shorter side even, ~[0.75, 1] * size."""
    short = min(size, 2 * round(rng.uniform(0.75, 1.0) * size / 2))
    return (short, size) if rng.random() < 0.5 else (size, short)


def _upsampled_noise(rng: np.random.Generator, cells: int, height: int, width: int) -> np.ndarray:
    """Smooth colour noise in [-1, 1]: a random grid of about `cells` per side, resized."""
    grid = rng.uniform(-1.0, 1.0, (max(2, cells * height // width), max(2, cells), 3)).astype(np.float32)
    return cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)


def _ramp(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A linear ramp in [-0.5, 0.5] along a random direction, shape (height, width, 1)."""
    angle = rng.uniform(0.0, 2 * np.pi)
    xs = np.linspace(-0.5, 0.5, width, dtype=np.float32) * math.cos(angle)
    ys = np.linspace(-0.5, 0.5, height, dtype=np.float32) * math.sin(angle)
    return (ys[:, None] + xs[None, :])[..., None]


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A textured float32 RGB background: colour, gradient, 3 noise scales, thin lines."""
    # Colour, gradient and the three noise scales are summed on the grid of
    # the finest scale and upsampled once: resizing is linear, so this looks
    # the same as summing full-size layers and is several times faster.
    fine = int(rng.integers(20, 48))
    grid_h, grid_w = max(2, fine * height // width), fine
    low = np.empty((grid_h, grid_w, 3), np.float32)
    low[:] = rng.uniform(50.0, 205.0, 3)
    low += _ramp(rng, grid_h, grid_w) * rng.uniform(-90.0, 90.0, 3).astype(np.float32)
    # Coarse blotches, medium texture and fine grain; the fine scale is about
    # as large as the smallest objects, so texture alone is not a cue.
    for cells, amplitude in ((int(rng.integers(2, 5)), 45.0), (int(rng.integers(6, 14)), 30.0), (fine, 20.0)):
        low += _upsampled_noise(rng, cells, grid_h, grid_w) * (rng.uniform(0.3, 1.0) * amplitude)
    image = cv2.resize(low, (width, height), interpolation=cv2.INTER_CUBIC)
    for _ in range(int(rng.integers(0, 13))):
        start = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        end = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        colour = tuple(float(c) for c in rng.uniform(0.0, 255.0, 3))
        cv2.line(image, start, end, colour, int(rng.integers(1, 3)), cv2.LINE_AA)
    return image


def _shape_fill(rng: np.random.Generator, colour: np.ndarray, height: int, width: int) -> np.ndarray:
    """Object paint: a colour with a mild gradient and, sometimes, a faint texture."""
    fill = np.empty((height, width, 3), np.float32)
    fill[:] = colour
    fill += _ramp(rng, height, width) * rng.uniform(-30.0, 30.0, 3).astype(np.float32)
    if rng.random() < 0.35:
        fill += _upsampled_noise(rng, int(rng.integers(3, 7)), height, width) * rng.uniform(8.0, 20.0)
    return fill


def _contrasting_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random colour far from `under` (the mean colour the shape will cover)."""
    candidates = rng.uniform(0.0, 255.0, (16, 3))
    distances = np.linalg.norm(candidates - under, axis=1)
    good = np.flatnonzero(distances >= MIN_CONTRAST)
    return candidates[good[0] if len(good) else int(np.argmax(distances))].astype(np.float32)


@dataclass
class _Candidate:
    """One proposed placement: its contours and its rasterized coverage."""

    contours: list[np.ndarray]
    stroke: int  # 0: filled contours; > 0: open polyline of this thickness in pixels
    x0: int
    y0: int
    coverage: np.ndarray  # uint8 anti-aliased coverage of the crop at (x0, y0)
    solid: np.ndarray  # bool, coverage >= 50 %: the pixels the shape owns
    clipped: np.ndarray | None = None  # outline clipped to the image (class shapes)
    truncation: float = 0.0


@dataclass
class _Item:
    """Something painted: an object, clutter or a distractor (never annotated)."""

    kind: str  # "object", "clutter" or "distractor"
    class_index: int = -1
    clipped: np.ndarray | None = None
    truncation: float = 0.0
    area: int = 0  # pixels owned in the image when painted
    ignored: bool = False


@dataclass
class Annotation:
    """One annotated shape of a rendered image.

    Attributes:
        class_index: Index into :data:`CLASSES`.
        box: (x0, y0, x1, y1) in continuous pixel coordinates, inside the image.
        polygon: The shape outline clipped to the image, shape (N, 2).
        area: Area of `polygon` in pixels.
        truncation: Fraction of the shape's area outside the image.
        covered: Fraction of its in-image pixels hidden by later shapes.
        ignored: True for heavily occluded objects and clutter (DontCare).
        mask: For ignored shapes, a bool image mask of their visible pixels.
    """

    class_index: int
    box: tuple[float, float, float, float]
    polygon: np.ndarray
    area: float
    truncation: float
    covered: float
    ignored: bool = False
    mask: np.ndarray | None = field(default=None, repr=False)


@dataclass
class Rendered:
    """A rendered image (uint8 RGB) and its annotations, objects first."""

    image: np.ndarray
    annotations: list[Annotation]

    @property
    def objects(self) -> list[Annotation]:
        """The annotated (not ignored) objects."""
        return [a for a in self.annotations if not a.ignored]

    @property
    def ignored(self) -> list[Annotation]:
        """The ignored regions (DontCare / iscrowd)."""
        return [a for a in self.annotations if a.ignored]


class _Scene:
    """The canvas being drawn plus who owns each pixel, for the occlusion rule."""

    def __init__(self, rng: np.random.Generator, size: int) -> None:
        self.rng = rng
        self.size = size
        self.height, self.width = _image_shape(rng, size)
        self.canvas = _background(rng, self.height, self.width)
        self.owner = np.full((self.height, self.width), -1, np.int16)  # item index per pixel
        self.items: list[_Item] = []
        self.visible: list[int] = []  # pixels each item still owns

    def candidate(self, contours: list[np.ndarray], stroke: int = 0, outline: bool = False) -> _Candidate | None:
        """Rasterize contours (image coordinates); None if nothing lands in the image.

        Args:
            contours: Closed contours (filled) or one open polyline (stroke > 0).
            stroke: Polyline thickness in pixels, 0 for filled contours.
            outline: Compute the clipped outline and truncation of contours[0].

        Returns:
            The candidate, or None when it owns no pixel of the image.
        """
        points = np.concatenate(contours)
        margin = stroke / 2 + 1
        x0 = max(0, math.floor(points[:, 0].min() - margin))
        y0 = max(0, math.floor(points[:, 1].min() - margin))
        x1 = min(self.width, math.ceil(points[:, 0].max() + margin))
        y1 = min(self.height, math.ceil(points[:, 1].max() + margin))
        if x1 <= x0 or y1 <= y0:
            return None
        coverage = np.zeros((y1 - y0, x1 - x0), np.uint8)
        # cv2 puts vertex (0, 0) at the centre of pixel 0, our coordinates at
        # its corner: shift by half a pixel. (cv2's anti-aliased fill still
        # spills about half a pixel past the outline; boxes follow the outline.)
        fixed = [np.round((c - (x0 + 0.5, y0 + 0.5)) * (1 << _AA_SHIFT)).astype(np.int32) for c in contours]
        if stroke:
            cv2.polylines(coverage, fixed, False, 255, stroke, cv2.LINE_AA, _AA_SHIFT)
        else:
            cv2.fillPoly(coverage, fixed, 255, cv2.LINE_AA, shift=_AA_SHIFT)
        solid = coverage >= 128
        if not solid.any():
            return None
        found = _Candidate(contours, stroke, x0, y0, coverage, solid)
        if outline:
            found.clipped = _clip_polygon(contours[0], self.width, self.height)
            found.truncation = 1.0 - _polygon_area(found.clipped) / max(_polygon_area(contours[0]), 1e-9)
        return found

    def _covered(self, found: _Candidate) -> np.ndarray:
        """Pixels of every item that `found` would cover, indexed by item."""
        h, w = found.solid.shape
        owners = self.owner[found.y0:found.y0 + h, found.x0:found.x0 + w][found.solid]
        return np.bincount(owners + 1, minlength=len(self.items) + 1)[1:]

    def visible_after(self, found: _Candidate) -> dict[int, float]:
        """Visible fraction each annotated object would keep under `found`."""
        left = np.asarray(self.visible, np.int64) - self._covered(found)
        return {i: left[i] / item.area for i, item in enumerate(self.items)
                if item.kind == "object" and not item.ignored}

    def paint(self, found: _Candidate, item: _Item) -> None:
        """Draw `found` with a random contrasting colour and record `item`."""
        h, w = found.solid.shape
        window = (slice(found.y0, found.y0 + h), slice(found.x0, found.x0 + w))
        crop = self.canvas[window]
        colour = _contrasting_colour(self.rng, crop[found.solid].mean(axis=0))
        alpha = (found.coverage.astype(np.float32) / 255.0)[..., None]
        crop += alpha * (_shape_fill(self.rng, colour, h, w) - crop)
        covered = self._covered(found)
        for i, count in enumerate(covered):
            self.visible[i] -= int(count)
        self.owner[window][found.solid] = len(self.items)
        item.area = int(found.solid.sum())
        self.items.append(item)
        self.visible.append(item.area)


def _object_size(rng: np.random.Generator, size: int) -> float:
    """Longer side of an object in pixels: tilted log-uniform in [5 %, 60 %] of size."""
    t = rng.random() ** SIZE_TILT
    return size * MIN_OBJECT_FRACTION * (MAX_OBJECT_FRACTION / MIN_OBJECT_FRACTION) ** t


def _side_lengths(rng: np.random.Generator, longer: float) -> np.ndarray:
    """(w, h) with the given longer side and w/h log-uniform in [1/2, 2]."""
    aspect = math.exp(rng.uniform(-math.log(MAX_ASPECT), math.log(MAX_ASPECT)))
    return np.array([longer, longer / aspect]) if aspect >= 1 else np.array([longer * aspect, longer])


def _centre(rng: np.random.Generator, scene: _Scene, local: np.ndarray, inside: bool) -> np.ndarray:
    """A centre for a shape whose outline relative to its centre is `local`.

    With `inside`, the whole shape lands in the image when it fits; otherwise
    the centre may be up to 20 % of the shape's extent beyond the border.
    """
    low, high = local.min(axis=0), local.max(axis=0)
    limits = np.array([scene.width, scene.height], np.float64)
    if inside:
        start, stop = -low, limits - high
        stop = np.where(stop >= start, stop, (start + stop) / 2)
        start = np.minimum(start, stop)
    else:
        extent = high - low
        start, stop = -0.2 * extent, limits + 0.2 * extent
    return rng.uniform(start, stop)


def _class_candidate(scene: _Scene, unit: np.ndarray, sides: np.ndarray, inside: bool) -> _Candidate | None:
    """Rotate, place and rasterize a class shape; None if it is too truncated."""
    local = (unit * sides) @ _rotation(scene.rng.uniform(0.0, 2 * np.pi)).T
    found = scene.candidate([local + _centre(scene.rng, scene, local, inside)], outline=True)
    if found is None or found.truncation > MAX_TRUNCATION or len(found.clipped) < 3:
        return None
    return found


def _place_object(scene: _Scene) -> None:
    """Add one annotated object, resampling its placement for the occlusion rule."""
    rng = scene.rng
    class_index = int(rng.integers(len(CLASSES)))
    unit = _CLASS_SHAPES[class_index](rng)
    # Size and aspect stay fixed over the tries: resampling them would bias
    # the sizes towards the small objects that fit more easily.
    sides = _side_lengths(rng, _object_size(rng, scene.size))
    fallback = None
    for attempt in range(PLACEMENT_TRIES):
        last = attempt == PLACEMENT_TRIES - 1
        found = _class_candidate(scene, unit, sides, last or rng.random() < INSIDE_PROBABILITY)
        if found is None:
            continue
        after = scene.visible_after(found)
        if all(fraction >= MIN_VISIBLE for fraction in after.values()):
            scene.paint(found, _Item("object", class_index, found.clipped, found.truncation))
            return
        fallback = (found, after)
    if fallback is None:
        return
    # Every try hid too much of an earlier object: keep the new one if what
    # it buries stays recognisable as an ignored region.
    found, after = fallback
    if min(after.values()) < BURY_MIN_VISIBLE:
        return
    for index, fraction in after.items():
        if fraction < MIN_VISIBLE:
            scene.items[index].ignored = True
    scene.paint(found, _Item("object", class_index, found.clipped, found.truncation))


def _place_distractor(scene: _Scene) -> None:
    """Add one unannotated distractor that hides no more than the occlusion rule allows."""
    rng = scene.rng
    contours, stroke = _DISTRACTORS[int(rng.integers(len(_DISTRACTORS)))](rng)
    longer = rng.uniform(MIN_OBJECT_FRACTION, 0.4) * scene.size
    sides = _side_lengths(rng, longer)
    thickness = max(2, round(stroke * longer)) if stroke else 0
    for _ in range(PLACEMENT_TRIES):
        rotation = _rotation(rng.uniform(0.0, 2 * np.pi)).T
        centre = rng.uniform((0, 0), (scene.width, scene.height))
        found = scene.candidate([(c * sides) @ rotation + centre for c in contours], thickness)
        if found is not None and all(f >= MIN_VISIBLE for f in scene.visible_after(found).values()):
            scene.paint(found, _Item("distractor"))
            return


def _place_clutter(scene: _Scene) -> None:
    """Add one tiny class shape (an ignored region) that touches no annotated object."""
    rng = scene.rng
    class_index = int(rng.integers(len(CLASSES)))
    unit = _CLASS_SHAPES[class_index](rng)
    sides = _side_lengths(rng, max(4.0, rng.uniform(*CLUTTER_FRACTION) * scene.size))
    for _ in range(PLACEMENT_TRIES):
        found = _class_candidate(scene, unit, sides, inside=True)
        if found is not None and all(f >= 1.0 for f in scene.visible_after(found).values()):
            item = _Item("clutter", class_index, found.clipped, found.truncation, ignored=True)
            scene.paint(found, item)
            return


def _annotations(scene: _Scene) -> list[Annotation]:
    """Annotations of the class shapes of a finished scene, objects before ignored."""
    found = []
    for index, item in enumerate(scene.items):
        if item.kind == "distractor" or scene.visible[index] == 0:
            continue  # an ignored shape buried completely later leaves nothing to ignore
        low, high = item.clipped.min(axis=0), item.clipped.max(axis=0)
        box = (float(low[0]), float(low[1]), float(high[0]), float(high[1]))
        mask = scene.owner == index if item.ignored else None
        found.append(Annotation(item.class_index, box, item.clipped, _polygon_area(item.clipped),
                                item.truncation, 1.0 - scene.visible[index] / item.area, item.ignored, mask))
    return sorted(found, key=lambda a: a.ignored)


def render_image(rng: np.random.Generator, size: int) -> Rendered:
    """Draw one image and its annotations.

    Args:
        rng: The image's own random generator (all randomness comes from it).
        size: Longer image side in pixels.

    Returns:
        The uint8 RGB image and its annotations.
    """
    scene = _Scene(rng, size)
    kinds = ["object"] * int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    kinds += ["distractor"] * int(rng.integers(0, MAX_DISTRACTORS + 1))
    for kind in rng.permutation(kinds):
        (_place_object if kind == "object" else _place_distractor)(scene)
    if rng.random() < CLUTTER_PROBABILITY:
        for _ in range(int(rng.integers(1, 3))):
            _place_clutter(scene)
    # Sensor noise over everything, objects included.
    noise = rng.standard_normal(scene.canvas.shape, dtype=np.float32)
    noise *= rng.uniform(2.0, 10.0)
    noise += 0.5  # rounds instead of truncating in the conversion below
    scene.canvas += noise
    image = np.clip(scene.canvas, 0, 255, out=scene.canvas).astype(np.uint8)
    return Rendered(image, _annotations(scene))


# --------------------------------------------------------------------------
# Writing.


def _encode(image: np.ndarray, extension: str) -> bytes:
    """Encode an RGB image as JPEG or PNG bytes (cv2 expects BGR)."""
    if extension == ".jpg":
        params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
    else:
        # Sensor noise leaves zlib little to match: Huffman coding alone gives
        # smaller files than the default strategy, in half the time.
        params = [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION,
                  cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY]
    ok, data = cv2.imencode(extension, cv2.cvtColor(image, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise RuntimeError(f"cv2 could not encode a {extension} image")
    return data.tobytes()


def _rle(mask: np.ndarray) -> dict:
    """Uncompressed COCO RLE of a bool mask (column-major runs, starting with zeros)."""
    flat = mask.flatten(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"counts": counts, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _rounded_box(annotation: Annotation) -> tuple[float, float, float, float]:
    """The box corners rounded to 2 decimals (the corners, so x + w stays inside)."""
    return tuple(round(v, 2) for v in annotation.box)


class _CocoWriter:
    """Writes JPEGs as they come and the two instances JSON files at the end."""

    def __init__(self, root: Path, num_train: int) -> None:
        self.root = root
        self.val_offset = _VAL_ID_OFFSET * (1 + num_train // _VAL_ID_OFFSET)
        self.data = {split: {"images": [], "annotations": []} for split in _SPLIT_CODES}
        self.next_annotation_id = 1
        for directory in (*_COCO_SPLIT_DIRS.values(), "annotations"):
            (root / directory).mkdir(parents=True, exist_ok=True)

    def add(self, split: str, index: int, rendered: Rendered) -> None:
        """Write one image and collect its annotations."""
        image_id = index + 1 + (self.val_offset if split == "val" else 0)
        name = f"{image_id:012d}.jpg"
        write_bytes_atomic(self.root / _COCO_SPLIT_DIRS[split] / name, _encode(rendered.image, ".jpg"))
        height, width = rendered.image.shape[:2]
        self.data[split]["images"].append({
            "license": 1, "file_name": name, "coco_url": "", "height": height, "width": width,
            "date_captured": _DATE_CAPTURED, "flickr_url": "", "id": image_id,
        })
        for annotation in rendered.annotations:
            x0, y0, x1, y1 = _rounded_box(annotation)
            entry = {
                "id": self.next_annotation_id, "image_id": image_id,
                "category_id": CATEGORY_IDS[annotation.class_index],
                "bbox": [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)], "iscrowd": 0,
                "area": round(annotation.area, 2),
                "segmentation": [[round(float(v), 2) for v in annotation.polygon.ravel()]],
            }
            if annotation.ignored:
                # As in the official files: crowd regions carry an RLE of the
                # visible pixels and their area is the mask's pixel count.
                entry.update(iscrowd=1, segmentation=_rle(annotation.mask), area=float(annotation.mask.sum()))
            self.data[split]["annotations"].append(entry)
            self.next_annotation_id += 1

    def finish(self) -> list[Path]:
        """Write the instances JSON files; returns their paths."""
        info = {
            "description": "kprune synthetic shapes", "url": "", "version": "1.0",
            "year": 2017, "contributor": "data_tools.synth", "date_created": _DATE_CREATED,
        }
        categories = [{"supercategory": "shape", "id": cid, "name": name}
                      for cid, name in zip(CATEGORY_IDS, CLASSES)]
        paths = []
        for split, directory in _COCO_SPLIT_DIRS.items():
            document = {"info": info, "licenses": [_LICENSE], **self.data[split], "categories": categories}
            path = self.root / "annotations" / f"instances_{directory}.json"
            write_bytes_atomic(path, json.dumps(document).encode())
            paths.append(path)
        return paths


def _kitti_line(annotation: Annotation) -> str:
    """One KITTI label line (15 fields); unknown 3D values as KITTI writes them."""
    left, top, right, bottom = _rounded_box(annotation)
    box = f"{left:.2f} {top:.2f} {right:.2f} {bottom:.2f}"
    if annotation.ignored:
        return f"DontCare -1 -1 {_KITTI_ALPHA} {box} {_KITTI_3D}"
    # KITTI: 0 fully visible, 1 partly occluded, 2 largely occluded.
    occluded = 0 if annotation.covered < 0.05 else 1 if annotation.covered < 0.2 else 2
    return (f"{KITTI_TYPES[annotation.class_index]} {annotation.truncation:.2f} {occluded} "
            f"{_KITTI_ALPHA} {box} {_KITTI_3D}")


class _KittiWriter:
    """Writes training/image_2/*.png and training/label_2/*.txt, train then val."""

    def __init__(self, root: Path, num_train: int, num_val: int) -> None:
        self.images = root / "training" / "image_2"
        self.labels = root / "training" / "label_2"
        self.num_train, self.num_val = num_train, num_val
        self.images.mkdir(parents=True, exist_ok=True)
        self.labels.mkdir(parents=True, exist_ok=True)

    def add(self, split: str, index: int, rendered: Rendered) -> None:
        """Write one image and its label file."""
        number = index + (self.num_train if split == "val" else 0)
        write_bytes_atomic(self.images / f"{number:06d}.png", _encode(rendered.image, ".png"))
        text = "".join(_kitti_line(a) + "\n" for a in rendered.annotations)
        write_bytes_atomic(self.labels / f"{number:06d}.txt", text.encode())

    def finish(self) -> list[Path]:
        """Remove label and image files numbered beyond this run (left by a larger earlier run in the
        same folder, the converter would read them); returns no paths."""
        total = self.num_train + self.num_val
        for folder, suffix in ((self.images, ".png"), (self.labels, ".txt")):
            for path in folder.iterdir():
                if path.suffix == suffix and path.stem.isdigit() and len(path.stem) == 6 and int(path.stem) >= total:
                    path.unlink()
        return []


def _check_int(name: str, value: object, minimum: int) -> None:
    """Raise ValueError unless value is an int >= minimum."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name}={value!r} is not allowed: it must be an integer >= {minimum}")


def generate(
    out_dir: str | os.PathLike,
    num_train: int = 1000,
    num_val: int = 200,
    size: int = 256,
    seed: int = 0,
    fmt: str = "coco",
    progress: bool = True,
) -> dict:
    """Write a synthetic shape-detection dataset in the official COCO or KITTI layout.

    Files already in `out_dir` are overwritten when they have the same name; in
    KITTI format, numbered images and labels beyond this run's are removed.

    Args:
        out_dir: Dataset root; created if missing.
        num_train: Number of training images (>= 1).
        num_val: Number of validation images (>= 1).
        size: Longer image side in pixels (>= 32); the shorter side varies.
        seed: Random seed (>= 0); the same seed gives byte-identical files.
        fmt: "coco" (JPEG + instances JSON) or "kitti" (PNG + label_2 text files).
        progress: Show a tqdm progress bar.

    Returns:
        A summary: ``{"path", "format", "size", "seed", "classes", "splits"}``
        where ``splits[split]`` holds ``images``, ``objects``, ``ignored`` and
        ``per_class`` (objects per class name), plus ``"annotation_files"`` for COCO.

    Raises:
        ValueError: If an argument is out of range or fmt is unknown.
    """
    _check_int("num_train", num_train, 1)
    _check_int("num_val", num_val, 1)
    _check_int("size", size, MIN_SIZE)
    _check_int("seed", seed, 0)
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r} is not allowed: it must be one of {', '.join(FORMATS)}")
    root = Path(out_dir)
    writer = _CocoWriter(root, num_train) if fmt == "coco" else _KittiWriter(root, num_train, num_val)
    splits = {"train": num_train, "val": num_val}
    summary = {split: {"images": count, "objects": 0, "ignored": 0,
                       "per_class": dict.fromkeys(CLASSES, 0)} for split, count in splits.items()}
    with tqdm(total=num_train + num_val, desc=f"synth {fmt}", unit="img", disable=not progress) as bar:
        for split, count in splits.items():
            for index in range(count):
                rendered = render_image(np.random.default_rng([seed, _SPLIT_CODES[split], index]), size)
                writer.add(split, index, rendered)
                summary[split]["objects"] += len(rendered.objects)
                summary[split]["ignored"] += len(rendered.ignored)
                for annotation in rendered.objects:
                    summary[split]["per_class"][CLASSES[annotation.class_index]] += 1
                bar.update()
    annotation_files = writer.finish()  # the JSON last, once every image exists
    result = {"path": str(root), "format": fmt, "size": size, "seed": seed,
              "classes": list(CLASSES), "splits": summary}
    if annotation_files:
        result["annotation_files"] = [str(p) for p in annotation_files]
    return result
