"""Scoring text answers by the objects they name (`instructseg.eval.answers`)."""
from __future__ import annotations

from instructseg.eval.answers import named_objects, says_absent, score_absent, score_answers


def test_named_objects_reads_sizes_plurals_and_lists():
    text = "The small white hexagon, the two yellow hexagons and the large white hexagon have six sides."
    assert named_objects(text) == {("white", "hexagon"), ("yellow", "hexagon")}
    assert named_objects("The Red Circle moves fastest.") == {("red", "circle")}
    assert named_objects("It is the square on the left.") == frozenset()  # a shape alone names no object


def test_score_answers_needs_exactly_the_reference_objects():
    pairs = [
        ("The red hexagon moves fastest.", "The red hexagon moves fastest."),                # right
        ("The two blue triangles have three corners.", "The blue triangle has three corners."),  # right (counts aside)
        ("The red star and the red circle are red.", "The red star is red."),                # one missing (colours right)
        ("The black circle has no corners.", "The black square has four corners."),          # colour only
        ("The green circle leaves the scene.", ""),                                          # no answer
        ("Sure.", "The red circle."),                                                        # no reference objects
    ]
    scores = score_answers(pairs)
    assert scores["num"] == 5
    assert scores["objects"] == 40.0 and scores["colours"] == 80.0 and scores["shapes"] == 40.0


def test_absent_answers():
    assert says_absent("There is no purple star here.") and not says_absent("The purple star is not moving.")
    assert score_absent(["There is no red circle here.", "It is the red circle."]) == {"said_absent": 50.0, "num": 2}
    assert score_answers([]) == {"objects": None, "colours": None, "shapes": None, "num": 0}
