"""Does a model generalise beyond the generator's exact pictures? Mean IoU on freshly drawn ShapesIVS-world scenes
under conditions the training data never shows exactly: other phrasings of a request, each background kind plus a
photo-like texture, frame sizes other than the training size, and videos longer than the training clips.

Every image scene is drawn from its own seed; its target is an object whose colour + shape is unique in the scene,
named as "the <colour> <shape>". Video: the benchmark video (`bench.video`), scored by mean J&F.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from instructseg.data.synthetic_scene import BACKGROUNDS, Scene, render, sample_background, sample_image_scene, texture

PHRASINGS = ("segment the {}", "Please segment the {}.", "where is the {}?", "the {}")
SIZES = ((128, 128), (96, 160), (200, 120), (256, 256))
VIDEO_FRAMES = (8, 48)


@dataclass
class Case:
    image: np.ndarray  # (H, W, 3) uint8
    target: np.ndarray  # (H, W) bool
    name: str  # "<colour> <shape>"


def image_case(seed: int, height: int = 128, width: int = 128, background: str | None = None) -> Case | None:
    """A random image scene with a uniquely named target, or None when no object is unique by colour + shape."""
    rng = np.random.default_rng([seed, 11])
    scene = sample_image_scene(rng, height, width)
    if background == "texture":
        scene.background = texture(rng, height, width)
    elif background is not None:
        scene.background = sample_background(rng, height, width, kind=background)
    names = [f"{o.colour} {o.shape}" for o in scene.objects]
    unique = [i for i, n in enumerate(names) if names.count(n) == 1]
    if not unique:
        return None
    pick = unique[int(rng.integers(len(unique)))]
    rendered = render(Scene(height, width, scene.background, scene.objects))
    return Case(rendered.frames[0], rendered.visible[pick, 0], names[pick])


def cases(count: int, *, start: int = 0, **kwargs) -> list[Case]:
    out, seed = [], start
    while len(out) < count:
        case = image_case(seed, **kwargs)
        seed += 1
        if case is not None:
            out.append(case)
    return out


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    union = np.logical_or(pred, gt).sum()
    return float(np.logical_and(pred, gt).sum() / union) if union else 1.0


def segment_iou(predictor, case: Case, instruction: str, work: Path) -> float:
    path = work / "case.png"
    Image.fromarray(case.image).save(path)
    return iou(predictor.segment(path, instruction).masks(0).any(axis=0), case.target)


def run(predictor, *, per_condition: int = 6) -> dict[str, float]:
    """{condition: mean IoU (or J&F / 100 for videos)} for every condition; see the module docstring."""
    from instructseg.bench.infer import jf, run_mode
    from instructseg.bench.video import write_frames_dir

    scores: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = cases(per_condition, start=10_000)
        for phrasing in PHRASINGS:
            scores[f"phrasing: {phrasing.format('...')}"] = float(np.mean(
                [segment_iou(predictor, c, phrasing.format(c.name), work) for c in base]))
        for kind in (*BACKGROUNDS, "texture"):
            scores[f"background: {kind}"] = float(np.mean(
                [segment_iou(predictor, c, f"segment the {c.name}", work)
                 for c in cases(per_condition, start=20_000, background=kind)]))
        for height, width in SIZES:
            scores[f"size: {width}x{height}"] = float(np.mean(
                [segment_iou(predictor, c, f"segment the {c.name}", work)
                 for c in cases(per_condition, start=30_000, height=height, width=width)]))
        for frames in VIDEO_FRAMES:
            video = write_frames_dir(work / f"video{frames}", frames, 128, seed=3)
            _, _, pred, _ = run_mode(predictor, video, "propagate")
            scores[f"video: {frames} frames"] = jf(pred, video.gt) / 100
    return scores
