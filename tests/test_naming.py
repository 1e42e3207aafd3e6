"""Region words and answers that name what their masks show (instructseg.model.region_words,
instructseg.inference.naming)."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from instructseg.inference.naming import grounded_text, object_pattern, read_objects
from instructseg.model.region_words import CROP, RegionWords, region_crops, train_crops

VOCAB = {"attribute": ["red", "green", "blue"], "category": ["circle", "square", "triangle"]}


@pytest.mark.parametrize("text, objects, expected", [
    ("The orange circle is orange like a pumpkin.", [("red", "square")], "The red square is orange like a pumpkin."),
    ("It is the blue circle. [SEG]", [("red", "triangle")], "It is the red triangle. [SEG]"),
    # one named, two read: a list, and the verb agrees
    ("The red circle is red like a tomato.", [("red", "circle"), ("red", "square")],
     "The red circle and the red square are red like a tomato."),
    ("The green circle moves fastest.", [("green", "square"), ("green", "square")],
     "The two green squares move fastest."),
    # two named, one read
    ("The two blue squares pass behind another shape.", [("blue", "circle")],
     "The blue circle passes behind another shape."),
    ("The small red circle and the large blue square have four sides.", [("green", "square")],
     "The green square has four sides."),
    # the same objects (sizes and counts aside), no named object, or nothing read: unchanged
    ("The small red circle moves fastest.", [("red", "circle")], "The small red circle moves fastest."),
    ("The two red circles are red.", [("red", "circle"), ("red", "circle")], "The two red circles are red."),
    ("Sure.", [("red", "circle")], "Sure."),
    ("Paris is the capital of France.", [("red", "circle")], "Paris is the capital of France."),
    ("It is the blue circle.", [], "It is the blue circle."),
    # a word after the subject that is not a verb is left alone
    ("The red circle in the corner is red.", [("blue", "square"), ("green", "square")],
     "The blue square and the green square in the corner is red."),
])
def test_grounded_text_names_what_was_read(text, objects, expected):
    vocabularies = {"attribute": VOCAB["attribute"] + ["orange"], "category": VOCAB["category"]}
    assert grounded_text(text, objects, vocabularies) == expected


def test_object_pattern_finds_every_named_object():
    found = object_pattern(VOCAB).findall("The small red circle, the two green squares and a blue triangle.")
    assert [(m[1], m[2]) for m in found] == [("red", "circle"), ("green", "square"), ("blue", "triangle")]
    assert not object_pattern(VOCAB).findall("the red car and a circle")


def _scene(size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A frame with a red square, a green square and a blue circle, with its category and attribute maps."""
    frame = torch.full((3, size, size), 0.5)
    cats = torch.zeros(size, size, dtype=torch.long)
    attrs = torch.zeros_like(cats)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    shapes = [((slice(4, 20), slice(4, 20)), 2, 1, (1.0, 0.0, 0.0)),
              ((slice(40, 60), slice(6, 22)), 2, 2, (0.0, 1.0, 0.0))]
    for (sy, sx), cat, attr, rgb in shapes:
        cats[sy, sx], attrs[sy, sx] = cat, attr
        frame[:, sy, sx] = torch.tensor(rgb)[:, None, None]
    disc = (ys - 40) ** 2 + (xs - 44) ** 2 < 10 ** 2
    cats[disc], attrs[disc] = 1, 3
    frame[:, disc] = torch.tensor([0.0, 0.0, 1.0])[:, None]
    return frame, cats, attrs


def test_train_crops_find_every_instance_with_its_words():
    frame, cats, attrs = _scene()
    attrs[0, :3] = 2  # an attribute where no category is: not an object
    crops, labels = train_crops(frame[None], {"attribute": attrs[None], "category": cats[None]}, random.Random(0))
    assert crops.shape == (3, 4, CROP, CROP)
    found = sorted(zip(labels["attribute"].tolist(), labels["category"].tolist()))
    assert found == [(0, 1), (1, 1), (2, 0)]  # (red, square), (green, square), (blue, circle) as word indices
    # each crop is centred on its object: the mask channel covers the middle, not the corners
    assert bool((crops[:, 3, CROP // 2, CROP // 2] > 0.5).all()) and float(crops[:, 3, 0, 0].max()) < 0.5


def test_region_crops_refuse_an_empty_mask():
    with pytest.raises(ValueError, match="empty mask"):
        region_crops(torch.zeros(3, 8, 8), torch.zeros(1, 8, 8, dtype=torch.bool))


def test_region_words_learn_and_name_each_part_of_a_mask():
    """Trained on one scene's instances (coarsened masks, as in the encoder stage), the head names both parts of a
    mask that covers two objects, largest first, and the answer then lists them."""
    torch.manual_seed(0)
    frame, cats, attrs = _scene()
    words = RegionWords({"attribute": VOCAB["attribute"], "category": VOCAB["category"]}, width=32)
    optimizer = torch.optim.AdamW(words.parameters(), lr=3e-3)
    rng = random.Random(0)
    for _ in range(120):
        crops, labels = train_crops(frame[None], {"attribute": attrs[None], "category": cats[None]}, rng)
        logits = words(crops)
        loss = sum(torch.nn.functional.cross_entropy(logits[k], labels[k]) for k in logits)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < 0.1
    both = ((cats == 1) | (attrs == 2)).numpy()  # the blue circle and the green square, in one mask
    named = read_objects(words, frame, both[None])
    assert named == [("green", "square"), ("blue", "circle")]  # the square's part (320 pixels) is the larger
    assert read_objects(words, frame, np.zeros((1, 64, 64), bool)) == []
    assert grounded_text("It is the red square.", named, words.vocabularies) == \
        "It is the green square and the blue circle."


def test_region_words_without_words_to_read_is_a_clear_error():
    from instructseg.config import preset
    from instructseg.errors import InputError
    from instructseg.model.instructseg import InstructSegModel

    with pytest.raises(InputError, match="region_words=true needs the words to read"):
        InstructSegModel(preset("tiny").override(["region_words=true"]))
