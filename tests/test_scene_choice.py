"""The scene choice's candidates: the one-colour regions of a decode's low-threshold area, without the background."""
from __future__ import annotations

import numpy as np

from instructseg.data.synthetic_scene import Scene, ShapeObject, render
from instructseg.eval.robustness import iou
from instructseg.inference.scene_choice import FLOOR, colour_regions


def _scene(background: np.ndarray):
    """A red circle and a blue square touching, and a small yellow star apart, on `background`."""
    def shape(i, kind, colour, x, y, radius):
        return ShapeObject(obj_id=i, shape=kind, colour=colour, size="large", radius=radius, angle=0.0,
                           centres=np.array([[x, y]], float))

    objects = [shape(1, "circle", "red", 40, 50, 16), shape(2, "square", "blue", 66, 50, 14),
               shape(3, "star", "yellow", 100, 104, 9)]
    drawn = render(Scene(128, 128, background, objects))
    return drawn.frames[0].astype(np.float32) / 255.0, drawn.visible[:, 0]


def _matched(regions, visible):
    """Per drawn object, the best IoU of any region."""
    return [max((iou(r, v) for r in regions), default=0.0) for v in visible]


def test_every_object_is_a_region_and_the_background_is_not():
    rng = np.random.default_rng(0)
    plain = np.full((128, 128, 3), 90, np.uint8)
    noise = np.clip(120 + rng.normal(0, 12, (128, 128, 3)), 0, 255).astype(np.uint8)
    ramp = np.repeat(np.linspace(60, 160, 128)[None, :, None], 128, 0).repeat(3, 2).astype(np.uint8)
    for background in (plain, noise, ramp):
        image, visible = _scene(background)
        logits = np.full((128, 128), FLOOR - 1.0)
        logits[8:120, 8:120] = 0.0  # the decode's area: most of the frame
        regions = colour_regions(logits, image)
        assert len(regions) == 3, [int(r.sum()) for r in regions]
        assert min(_matched(regions, visible)) > 0.85, _matched(regions, visible)


def test_only_the_decodes_area_is_cut():
    image, visible = _scene(np.full((128, 128, 3), 90, np.uint8))
    logits = np.full((128, 128), FLOOR - 1.0)
    around = np.zeros((128, 128), bool)
    around[25:70, 20:85] = True  # the circle and the square with some background around them
    logits[around] = FLOOR + 1.0
    regions = colour_regions(logits, image)
    assert len(regions) == 2 and min(_matched(regions, visible[:2])) > 0.85
    assert colour_regions(np.full((128, 128), FLOOR - 1.0), image) == []
