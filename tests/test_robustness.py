"""The generalisation check (`eval.robustness`): its scenes and one full run on a tiny model."""
from __future__ import annotations

import numpy as np

from instructseg.data.synthetic_scene import COLOURS
from instructseg.eval import robustness
from instructseg.inference.predictor import InstructSegPredictor


def test_cases_are_deterministic_with_a_uniquely_named_visible_target():
    a, b = robustness.cases(3, start=5), robustness.cases(3, start=5)
    for x, y in zip(a, b):
        assert x.name == y.name and np.array_equal(x.image, y.image) and np.array_equal(x.target, y.target)
        assert x.target.any()
        colour = np.array(COLOURS[x.name.split()[0]])
        assert (x.image[x.target] == colour).all()  # the target's pixels are its colour


def test_backgrounds_and_sizes_are_what_they_say():
    plain = robustness.cases(1, start=1, background="plain")[0]
    textured = robustness.cases(1, start=1, background="texture")[0]
    free = lambda c: c.image[~c.target]  # noqa: E731  (background and other shapes)
    assert len(np.unique(free(textured).reshape(-1, 3), axis=0)) > 10 * len(np.unique(free(plain).reshape(-1, 3), axis=0))
    wide = robustness.cases(1, start=3, height=96, width=160)[0]
    assert wide.image.shape == (96, 160, 3) and wide.target.shape == (96, 160)


def test_run_reports_every_condition(seg_model_dir):
    scores = robustness.run(InstructSegPredictor(str(seg_model_dir)), per_condition=1)
    expected = (len(robustness.PHRASINGS) + len(robustness.BACKGROUNDS) + 1 + len(robustness.SIZES)
                + len(robustness.VIDEO_FRAMES))
    assert len(scores) == expected
    assert all(0.0 <= v <= 1.0 for v in scores.values())
