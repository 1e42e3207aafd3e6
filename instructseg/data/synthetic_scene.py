"""ShapesIVS scenes: the vocabulary, random scenes (still images and videos) and rendering with exact masks.

Every shape is a polygon (circles are 32-gons). Each object's mask is its polygon rasterised on its own; the
*visible* mask removes whatever later-drawn objects cover, and the pixels are painted from the visible masks, so
masks and pixels agree exactly.

Two rasterisers: "pil" (PIL's polygon fill, which like OpenCV's fillPoly + polylines includes the boundary pixels;
what ReasonSeg-style readers do) and "coco" (pycocotools' polygon decoding, what RefCOCO readers do). A scene is
rendered with the rasteriser of the format it is written in, so each format's polygons decode to exactly the
rendered shapes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from instructseg.data.formats.common import decode_rle

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 225, 20),
    "purple": (150, 40, 190),
    "orange": (250, 130, 10),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
}
SIZES: dict[str, float] = {"small": 0.085, "large": 0.15}  # polygon radius as a fraction of min(H, W)
BACKGROUNDS: tuple[str, ...] = ("plain", "noise", "gradient", "stripes")
CORNERS: dict[str, int] = {"circle": 0, "square": 4, "triangle": 3, "star": 10, "hexagon": 6}

_CIRCLE_SIDES = 32
_MIN_RADIUS = 3.0   # pixels, for the smallest size class
_STAR_INNER = 0.45  # inner radius of the star's concave vertices, relative to the outer radius


@dataclass
class ShapeObject:
    """One shape in a scene. `obj_id` is 1-based and is also the draw order: higher ids are drawn on top."""

    obj_id: int
    shape: str
    colour: str
    size: str
    radius: float      # circumradius in pixels
    angle: float       # rotation in radians
    centres: np.ndarray  # (T, 2) float: centre (x, y) per frame; T = 1 for still images
    motion: str = "still"  # "still" (images), "static", "bounce", "enter", "leave"
    speed: float = 0.0     # pixels per frame of the underlying motion

    def outline(self, t: int = 0) -> list[tuple[float, float]]:
        """The polygon of this object at frame `t`, rounded to 0.01 px so that the coordinates written to JSON
        rasterise to exactly the rendered masks."""
        cx, cy = self.centres[t]
        points = outline(self.shape, float(cx), float(cy), self.radius, self.angle)
        return [(round(x, 2), round(y, 2)) for x, y in points]


@dataclass
class Scene:
    """A still image (T = 1) or a video: a background and shapes listed in draw order."""

    height: int
    width: int
    background: np.ndarray  # (H, W, 3) uint8
    objects: list[ShapeObject] = field(default_factory=list)

    @property
    def num_frames(self) -> int:
        return int(self.objects[0].centres.shape[0]) if self.objects else 1


@dataclass
class Rendered:
    """Pixels and masks of a scene."""

    frames: np.ndarray   # (T, H, W, 3) uint8
    full: np.ndarray     # (N, T, H, W) bool: each object's own raster, clipped to the image, ignoring occlusion
    visible: np.ndarray  # (N, T, H, W) bool: the part of each object that is seen after later objects are drawn


def outline(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Polygon vertices of `shape` with circumradius `r` centred at (cx, cy), rotated by `angle` radians."""
    if shape == "circle":
        radii, count = [r], _CIRCLE_SIDES
    elif shape == "star":
        radii, count = [r, r * _STAR_INNER], 10
    elif shape in ("square", "triangle", "hexagon"):
        radii, count = [r], CORNERS[shape]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    start = -math.pi / 2 + angle  # the first vertex points up (triangles and stars stand upright)
    if shape == "square":
        start += math.pi / 4      # axis-aligned sides before rotation
    points = []
    for k in range(count):
        theta = start + 2 * math.pi * k / count
        radius = radii[k % len(radii)]
        points.append((cx + radius * math.cos(theta), cy + radius * math.sin(theta)))
    return points


def rasterise(points: list[tuple[float, float]], height: int, width: int) -> np.ndarray:
    """(H, W) bool mask of a filled polygon, PIL's rasterisation (boundary pixels included)."""
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).polygon(points, fill=1)
    return np.asarray(canvas, dtype=bool)


def rasterise_coco(points: list[tuple[float, float]], height: int, width: int) -> np.ndarray:
    """(H, W) bool mask of a filled polygon as pycocotools decodes a COCO polygon segmentation."""
    flat = [float(v) for point in points for v in point]
    return decode_rle(mask_utils.merge(mask_utils.frPyObjects([flat], height, width)))


RASTERISERS = {"pil": rasterise, "coco": rasterise_coco}


# ----------------------------------------------------------------------------------------------- backgrounds

def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    """A desaturated mid-tone: far enough from every shape colour, black and white included."""
    grey = rng.uniform(85, 165)
    return np.clip(grey + rng.uniform(-25, 25, size=3), 0, 255)


def sample_background(rng: np.random.Generator, height: int, width: int, kind: str | None = None) -> np.ndarray:
    """(H, W, 3) uint8 background: plain, noise, gradient or stripes (random, or `kind`; the random draw happens
    either way, so the rest of a scene does not depend on `kind`)."""
    drawn = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    kind = kind or drawn
    base = _muted_colour(rng)
    image = np.broadcast_to(base, (height, width, 3)).astype(np.float64)
    if kind == "noise":
        image = image + rng.normal(0, 12, size=(height, width, 1))
    elif kind == "gradient":
        other = _muted_colour(rng)
        ramp = np.linspace(0.0, 1.0, width if rng.random() < 0.5 else height)
        ramp = ramp[None, :, None] if ramp.size == width else ramp[:, None, None]
        image = image * (1 - ramp) + other * ramp
    elif kind == "stripes":
        period = int(rng.integers(4, 12))
        coords = np.arange(width)[None, :] if rng.random() < 0.5 else np.arange(height)[:, None]
        on = ((coords // period) % 2 == 1)[..., None]
        image = np.where(on, image + rng.choice([-30.0, 30.0]), image)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def texture(rng: np.random.Generator, height: int, width: int, *, vary: bool = False) -> np.ndarray:
    """(H, W, 3) uint8 photo-like background: smooth multi-scale coloured noise (blotches and fine grain), muted
    mid-tones. `vary` draws the scales and strengths per call (training data); without it they are fixed (the
    robustness check's texture, a member of the same family)."""
    scales, weights = ((3, 9, 27), (40.0, 20.0, 10.0))
    if vary:
        scales = (int(rng.integers(2, 6)), int(rng.integers(6, 14)), int(rng.integers(16, 40)))
        weights = tuple(w * float(rng.uniform(0.5, 1.4)) for w in weights)
    image = np.zeros((height, width, 3))
    for cells, weight in zip(scales, weights):
        coarse = rng.normal(0, 1, size=(cells, cells, 3))
        layer = np.stack([np.asarray(Image.fromarray(coarse[..., c].astype(np.float32)).resize(
            (width, height), Image.BICUBIC)) for c in range(3)], axis=-1)
        image += weight * layer
    image += rng.normal(0, 4, size=(height, width, 1))
    return np.clip(125 + image, 40, 210).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- appearance

def _sample_appearance(rng: np.random.Generator, count: int) -> list[tuple[str, str, str]]:
    """(shape, colour, size) per object, drawn from small per-scene pools so repeats (and thus
    multi-object groups and the need for several attributes to single one object out) are common."""
    shapes = rng.choice(SHAPES, size=int(rng.integers(2, 4)), replace=False)
    colours = rng.choice(list(COLOURS), size=int(rng.integers(2, 4)), replace=False)
    sizes = list(SIZES)
    return [(str(rng.choice(shapes)), str(rng.choice(colours)), str(rng.choice(sizes))) for _ in range(count)]


def _radius(rng: np.random.Generator, size: str, height: int, width: int) -> float:
    """Circumradius in pixels; at tiny image sizes the floor keeps the small/large ratio (small is >= 3 px)."""
    floor = _MIN_RADIUS * SIZES[size] / min(SIZES.values())
    return max(floor, SIZES[size] * min(height, width)) * float(rng.uniform(0.92, 1.08))


def _angle(rng: np.random.Generator) -> float:
    return float(np.deg2rad(rng.uniform(-15, 15)))


# ----------------------------------------------------------------------------------------------- images

def sample_image_scene(rng: np.random.Generator, height: int, width: int) -> Scene:
    """1-6 shapes fully inside the image and not overlapping (so COCO polygons are the visible outlines)."""
    scene = Scene(height, width, sample_background(rng, height, width))
    placed: list[tuple[float, float, float]] = []
    for shape, colour, size in _sample_appearance(rng, int(rng.integers(1, 7))):
        radius = _radius(rng, size, height, width)
        for _ in range(100):
            x = rng.uniform(radius + 1, width - radius - 2)
            y = rng.uniform(radius + 1, height - radius - 2)
            if all(math.hypot(x - px, y - py) > radius + pr + 2 for px, py, pr in placed):
                break
        else:
            continue  # no room left: drop this shape
        placed.append((x, y, radius))
        scene.objects.append(ShapeObject(len(scene.objects) + 1, shape, colour, size, radius, _angle(rng),
                                         np.array([[x, y]])))
    return scene


# ----------------------------------------------------------------------------------------------- videos

def _fold(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Reflect unbounded positions into [low, high]: straight-line motion that bounces off the walls."""
    span = max(high - low, 1e-6)
    phase = np.mod(values - low, 2 * span)
    return low + np.where(phase > span, 2 * span - phase, phase)


def _velocity(rng: np.random.Generator, speed: float) -> np.ndarray:
    """Mostly near-axis directions (so "moving left" is often true), sometimes any direction."""
    if rng.random() < 0.6:
        theta = np.deg2rad(90 * int(rng.integers(4)) + rng.uniform(-15, 15))
    else:
        theta = rng.uniform(0, 2 * np.pi)
    return speed * np.array([np.cos(theta), np.sin(theta)])


def _bounce_track(start: np.ndarray, velocity: np.ndarray, frames: int, radius: float,
                  height: int, width: int) -> np.ndarray:
    t = np.arange(frames)[:, None]
    raw = start[None, :] + velocity[None, :] * t
    xs = _fold(raw[:, 0], radius, width - 1 - radius)
    ys = _fold(raw[:, 1], radius, height - 1 - radius)
    return np.stack([xs, ys], axis=1)


def _offscreen_point(rng: np.random.Generator, radius: float, height: int, width: int) -> np.ndarray:
    """A centre from which the whole shape lies outside the image, beyond a random edge."""
    margin = radius + 1 + rng.uniform(0, radius)
    edge = int(rng.integers(4))
    x, y = rng.uniform(0, width - 1), rng.uniform(0, height - 1)
    return np.array([[-margin, y], [width - 1 + margin, y], [x, -margin], [x, height - 1 + margin]][edge])


def _inside_point(rng: np.random.Generator, radius: float, height: int, width: int) -> np.ndarray:
    return np.array([rng.uniform(radius, width - 1 - radius), rng.uniform(radius, height - 1 - radius)])


def _track(rng: np.random.Generator, motion: str, radius: float, frames: int, height: int, width: int
           ) -> tuple[np.ndarray, float]:
    """Centres (T, 2) and speed (pixels per frame) for one motion kind."""
    inside = _inside_point(rng, radius, height, width)
    if motion in ("enter", "leave"):
        outside = _offscreen_point(rng, radius, height, width)
        start, end = (outside, inside) if motion == "enter" else (inside, outside)
        steps = np.linspace(0.0, 1.0, frames)[:, None]
        return start + (end - start) * steps, float(np.linalg.norm(end - start) / (frames - 1))
    speed = 0.0 if motion == "static" else float(rng.uniform(0.015, 0.09) * min(height, width))
    return _bounce_track(inside, _velocity(rng, speed), frames, radius, height, width), speed


def _cross_paths(rng: np.random.Generator, scene: Scene, frames: int) -> None:
    """Make an earlier-drawn object pass behind a later-drawn one half-way through the video."""
    movers = [o for o in scene.objects if o.motion in ("bounce", "static")]
    if len(movers) < 2:
        return
    picks = sorted(rng.choice(len(movers), size=2, replace=False))
    behind, front = movers[picks[0]], movers[picks[1]]
    middle = (frames - 1) // 2
    velocity = _velocity(rng, behind.speed)
    start = front.centres[middle] - velocity * middle
    behind.centres = _bounce_track(start, velocity, frames, behind.radius, scene.height, scene.width)


def sample_video_scene(rng: np.random.Generator, height: int, width: int, frames: int,
                       force_event: str | None = None) -> Scene:
    """2-6 moving shapes. Each moves with its own velocity and bounces off the walls, or stays still; sometimes one
    enters or leaves the frame (`force_event` = "enter" / "leave" guarantees it), and often two paths cross so that
    one shape passes behind another."""
    scene = Scene(height, width, sample_background(rng, height, width))
    appearance = _sample_appearance(rng, int(rng.integers(2, 7)))
    motions = ["static" if rng.random() < 0.15 else "bounce" for _ in appearance]
    event = force_event or (str(rng.choice(["enter", "leave"])) if rng.random() < 0.7 else None)
    if event is not None:
        motions[int(rng.integers(len(motions)))] = event
    for (shape, colour, size), motion in zip(appearance, motions):
        radius = _radius(rng, size, height, width)
        centres, speed = _track(rng, motion, radius, frames, height, width)
        scene.objects.append(ShapeObject(len(scene.objects) + 1, shape, colour, size, radius, _angle(rng),
                                         centres, motion, speed))
    if rng.random() < 0.6:
        _cross_paths(rng, scene, frames)
    return scene


# ----------------------------------------------------------------------------------------------- rendering

def render(scene: Scene, rasteriser: str = "pil") -> Rendered:
    """Draw every frame; masks come from the same polygons, occlusion from the draw order."""
    count, frames = len(scene.objects), scene.num_frames
    shape = (count, frames, scene.height, scene.width)
    fill = RASTERISERS[rasteriser]
    full = np.zeros(shape, dtype=bool)
    for i, obj in enumerate(scene.objects):
        for t in range(frames):
            full[i, t] = fill(obj.outline(t), scene.height, scene.width)
    visible = full.copy()
    covered = np.zeros(shape[1:], dtype=bool)
    for i in range(count - 1, -1, -1):  # walk from the top-most object down
        visible[i] &= ~covered
        covered |= full[i]
    pixels = np.repeat(scene.background[None], frames, axis=0)
    for i, obj in enumerate(scene.objects):
        pixels[visible[i]] = COLOURS[obj.colour]
    return Rendered(pixels, full, visible)
