"""Do the text answers name the right objects? For data whose expressions carry a reference answer in the ShapesIVS
vocabulary ("The small red hexagon and the large red hexagon are red like a tomato."), each answer is compared
with its reference by the objects both name, as (colour, shape) pairs: the answer is right when it names exactly
the reference's set (sizes and counts aside). The colours alone and the shapes alone are scored the same way, and
for no-target expressions whether the answer says the object is absent ("There is no ...").

`instructseg eval revos` writes these numbers to answers.json when the expressions have reference answers.
"""
from __future__ import annotations

import re

from instructseg.data.synthetic_scene import COLOURS, SHAPES, SIZES

_WORD = lambda words: "|".join(map(re.escape, words))  # noqa: E731
_OBJECT = re.compile(r"\b(%s)\s+(?:(?:%s)\s+)?(%s)(?:e?s)?\b" % (_WORD(COLOURS), _WORD(SIZES), _WORD(SHAPES)))
_ABSENT = re.compile(r"^\s*there (?:is|are) no\b")


def named_objects(text: str) -> frozenset[tuple[str, str]]:
    """The (colour, shape) pairs a text names: "the two blue triangles" -> {("blue", "triangle")}."""
    return frozenset(_OBJECT.findall(text.lower()))


def says_absent(text: str) -> bool:
    """Whether the answer says that what was asked for is not there ("There is no red circle here.")."""
    return bool(_ABSENT.match(text.lower()))


def _percent(hits: list[bool]) -> float | None:
    return round(100.0 * sum(hits) / len(hits), 4) if hits else None


def score_answers(pairs: list[tuple[str, str]]) -> dict:
    """{"objects", "colours", "shapes": percent right, "num"} over (reference, answer) pairs whose reference names
    an object; a missing answer ("") names none."""
    objects, colours, shapes = [], [], []
    for reference, answer in pairs:
        want, got = named_objects(reference), named_objects(answer or "")
        if not want:
            continue
        objects.append(got == want)
        colours.append({c for c, _ in got} == {c for c, _ in want})
        shapes.append({s for _, s in got} == {s for _, s in want})
    return {"objects": _percent(objects), "colours": _percent(colours), "shapes": _percent(shapes),
            "num": len(objects)}


def score_absent(answers: list[str]) -> dict:
    """{"said_absent": percent of the answers that say so, "num"}."""
    return {"said_absent": _percent([says_absent(a or "") for a in answers]), "num": len(answers)}
