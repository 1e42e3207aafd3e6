"""The image-reading check (`eval.reading`): its questions are answerable from the picture alone, answers are read
back right, and one run through the predictor on a tiny model."""
from __future__ import annotations

import numpy as np
import pytest

from instructseg.data.synthetic_scene import COLOURS, SHAPES
from instructseg.eval import reading
from instructseg.inference.predictor import InstructSegPredictor


def test_questions_have_one_right_answer_that_is_in_the_picture():
    seen = set()
    for seed in range(20):
        image, questions = reading.scene_questions(seed)
        again, same = reading.scene_questions(seed)
        assert np.array_equal(image, again) and same == questions  # deterministic
        assert image.shape == (128, 128, 3) and len(questions) <= 2
        for q in questions:
            seen.add(q.kind)
            if q.kind == "colour":
                shape = q.text.split()[-1].rstrip("?")
                assert shape in SHAPES and q.want in COLOURS
                assert (image == np.array(COLOURS[q.want])).all(-1).sum() > 20  # drawn in that colour
            else:
                assert q.text.split()[-2] in COLOURS and q.want in SHAPES
    assert seen == {"colour", "shape"}


@pytest.mark.parametrize("answer, words, expected", [
    ("The circle is red.", tuple(COLOURS), "red"),
    ("The red one is a circle.", tuple(SHAPES), "circle"),
    ("It is reddish, like the triangles.", tuple(SHAPES), "triangle"),
    ("It is reddish.", tuple(COLOURS), None),
    ("Blue or green? Green.", tuple(COLOURS), "green"),
])
def test_named_reads_the_last_word_of_the_vocabulary(answer, words, expected):
    assert reading.named(answer, words) == expected


def test_run_asks_every_question_with_both_images(seg_model_dir):
    scores = reading.run(InstructSegPredictor(str(seg_model_dir)), count=2)
    assert set(scores) == {"colour", "shape", "colour (another scene's image)", "shape (another scene's image)"}
    assert all(np.isnan(v) or 0.0 <= v <= 1.0 for v in scores.values())
    assert any(not np.isnan(v) for v in scores.values())
