"""The benchmarks' generated video: a few ShapesIVS shapes bouncing around, one of them referred to, with exact
ground-truth masks. Deterministic in (frames, size, seed); rendered one frame at a time, so a long video never
sits in memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from instructseg.data.synthetic_scene import Scene, ShapeObject, render, sample_background

INSTRUCTION = "segment the red circle"
TARGET = 1  # index of the referred object in `_OBJECTS`
# (shape, colour, size, radius as a fraction of the side, speed in sides per frame); drawn in this order, so the
# red circle passes behind the yellow star now and then
_OBJECTS = (
    ("square", "blue", "large", 0.15, 0.011),
    ("circle", "red", "large", 0.14, 0.017),
    ("star", "yellow", "small", 0.09, 0.023),
)


@dataclass
class BenchVideo:
    """A written video: `path` (a folder of `00000.jpg`... frames, or an .mp4), its frame count and side, the
    instruction and the referred object's visible masks `gt` (T, size, size) bool (None when not kept)."""

    path: Path
    frames: int
    size: int
    instruction: str
    gt: np.ndarray | None


def _bounce(start: np.ndarray, velocity: np.ndarray, frames: int, radius: float, size: int) -> np.ndarray:
    """(T, 2) centres moving in a straight line and reflecting off the walls."""
    low, high = radius, size - 1 - radius
    span = max(high - low, 1e-6)
    raw = start[None] + velocity[None] * np.arange(frames)[:, None]
    phase = np.mod(raw - low, 2 * span)
    return low + np.where(phase > span, 2 * span - phase, phase)


def scene(frames: int, size: int, seed: int = 0) -> Scene:
    """The benchmark scene: background and tracks drawn from `seed`, shapes and colours fixed."""
    rng = np.random.default_rng([seed, 7])
    out = Scene(size, size, sample_background(rng, size, size))
    for i, (shape, colour, label, rel_radius, rel_speed) in enumerate(_OBJECTS):
        radius = rel_radius * size
        start = rng.uniform(radius, size - 1 - radius, size=2)
        theta = rng.uniform(0, 2 * np.pi)
        velocity = rel_speed * size * np.array([np.cos(theta), np.sin(theta)])
        out.objects.append(ShapeObject(i + 1, shape, colour, label, radius, float(rng.uniform(-0.2, 0.2)),
                                       _bounce(start, velocity, frames, radius, size), "bounce",
                                       float(np.linalg.norm(velocity))))
    return out


def render_frames(frames: int, size: int, seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(pixels (size, size, 3) uint8, target's visible mask (size, size) bool) per frame."""
    full = scene(frames, size, seed)
    for t in range(frames):
        one = Scene(size, size, full.background, [
            ShapeObject(o.obj_id, o.shape, o.colour, o.size, o.radius, o.angle, o.centres[t:t + 1], o.motion, o.speed)
            for o in full.objects])
        rendered = render(one)
        yield rendered.frames[0], rendered.visible[TARGET, 0]


def write_frames_dir(out: Path, frames: int, size: int, seed: int = 0) -> BenchVideo:
    """Frames as `out/00000.jpg`...: what SAM2VideoPredictor.init_state reads and `open_source` accepts."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gt = np.zeros((frames, size, size), dtype=bool)
    for t, (pixels, mask) in enumerate(render_frames(frames, size, seed)):
        Image.fromarray(pixels).save(out / f"{t:05d}.jpg", quality=95)
        gt[t] = mask
    return BenchVideo(out, frames, size, INSTRUCTION, gt)


def write_mp4(path: Path, frames: int, size: int, seed: int = 0) -> BenchVideo:
    """The same video as an .mp4 (streamed: no ground truth kept)."""
    from instructseg.inference.io import write_video

    write_video(path, (pixels for pixels, _ in render_frames(frames, size, seed)))
    return BenchVideo(Path(path), frames, size, INSTRUCTION, None)
