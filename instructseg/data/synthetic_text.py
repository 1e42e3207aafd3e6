"""ShapesIVS language: object facts, and the referring / reasoning / no-target expressions built from them.

Facts beyond the crisp vocabulary (shape, colour, size) are three-valued: True, False, or None when a person could
reasonably say either (a shape half-way across the image is neither clearly "on the left" nor clearly not). An
expression is emitted only when it is *unambiguous*: every object evaluates to a definite True or False, and the
True set is exactly the intended target set.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product
from typing import Callable

import numpy as np

from instructseg.data.synthetic_scene import COLOURS, SHAPES, Rendered, Scene

# Qualifier phrases (singular, plural) for the three-valued flags.
IMAGE_FLAGS: dict[str, tuple[str, str]] = {
    "left": ("on the left", "on the left"), "right": ("on the right", "on the right"),
    "top": ("at the top", "at the top"), "bottom": ("at the bottom", "at the bottom"),
}
VIDEO_FLAGS: dict[str, tuple[str, str]] = {
    "moving_left": ("moving left", "moving left"), "moving_right": ("moving right", "moving right"),
    "moving_up": ("moving up", "moving up"), "moving_down": ("moving down", "moving down"),
    "static": ("that stays still", "that stay still"),
    "left": ("that starts on the left", "that start on the left"),
    "right": ("that starts on the right", "that start on the right"),
}

REFERRING, REASONING, NO_TARGET = 0, 1, 2
_NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight")


@dataclass
class ObjectFacts:
    """What can be said about one object. `flags` are three-valued; `numbers` feed the superlatives."""

    index: int
    shape: str
    colour: str
    size: str
    flags: dict[str, bool | None] = field(default_factory=dict)
    numbers: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"the {self.colour} {self.shape}"


@dataclass(frozen=True)
class Query:
    """One expression with its target objects (indices into the scene) and a short text answer."""

    type_id: int          # REFERRING, REASONING or NO_TARGET
    text: str
    targets: tuple[int, ...]
    answer: str
    is_sentence: bool = False   # worded as a question rather than a noun phrase
    ignore: tuple[int, ...] = ()  # objects a person could count either way (ReasonSeg "ignore" regions)


# ----------------------------------------------------------------------------------------------- facts

def _band(value: float, extent: float, low_side: bool) -> bool | None:
    """Three-valued 'in the low (left/top) third-ish' test with a dead zone around the middle."""
    frac = value / max(extent - 1, 1)
    if not low_side:
        frac = 1 - frac
    return True if frac < 0.4 else (False if frac > 0.55 else None)


def _direction(steps: np.ndarray, axis: int, sign: float) -> bool | None:
    """Is the object moving along `axis` in direction `sign` throughout the video?"""
    along, across = steps[:, axis] * sign, steps[:, 1 - axis]
    total_along, total_across = np.abs(along).sum(), np.abs(across).sum()
    if np.all(along <= 0) or total_along <= 0.5 * total_across:
        return False
    if np.all(along > 0.25 * np.linalg.norm(steps, axis=1)) and along.sum() >= 2 * total_across:
        return True
    return None


def image_facts(scene: Scene) -> list[ObjectFacts]:
    facts = []
    for i, obj in enumerate(scene.objects):
        x, y = obj.centres[0]
        flags = {"left": _band(x, scene.width, True), "right": _band(x, scene.width, False),
                 "top": _band(y, scene.height, True), "bottom": _band(y, scene.height, False)}
        facts.append(ObjectFacts(i, obj.shape, obj.colour, obj.size, flags, {"x": float(x), "y": float(y)}))
    return facts


def _occluded(full: np.ndarray, visible: np.ndarray) -> bool | None:
    """Hidden behind another shape in some frame (by at least 30 % of what would be seen)?"""
    areas = full.reshape(full.shape[0], -1).sum(1)
    seen = visible.reshape(visible.shape[0], -1).sum(1)
    hidden = np.where(areas > 0, 1 - seen / np.maximum(areas, 1), 0.0)
    return True if hidden.max() >= 0.3 else (False if hidden.max() <= 0.05 else None)


def video_facts(scene: Scene, rendered: Rendered) -> list[ObjectFacts]:
    facts = []
    for i, obj in enumerate(scene.objects):
        steps = np.diff(obj.centres, axis=0)
        in_frame = rendered.full[i].reshape(scene.num_frames, -1).any(1)
        first_whole = obj.motion in ("bounce", "static", "leave")  # fully inside at frame 0
        x0, y0 = obj.centres[0]
        flags = {
            "moving_left": _direction(steps, 0, -1.0), "moving_right": _direction(steps, 0, 1.0),
            "moving_up": _direction(steps, 1, -1.0), "moving_down": _direction(steps, 1, 1.0),
            "static": obj.motion == "static",
            "left": _band(x0, scene.width, True) if first_whole else None,
            "right": _band(x0, scene.width, False) if first_whole else None,
            "enters": bool(not in_frame[0] and in_frame[-1]),
            "leaves": bool(in_frame[0] and not in_frame[-1]),
            "occluded": _occluded(rendered.full[i], rendered.visible[i]),
        }
        numbers = {"speed": obj.speed}
        if in_frame[-1] and obj.motion != "leave":
            numbers["end_x"], numbers["end_y"] = (float(v) for v in obj.centres[-1])
        facts.append(ObjectFacts(i, obj.shape, obj.colour, obj.size, flags, numbers))
    return facts


# ----------------------------------------------------------------------------------------------- descriptions

@dataclass(frozen=True)
class Description:
    """A noun phrase over the vocabulary: '[size] [colour] shape|<shape> [qualifier]'."""

    shape: str | None = None
    colour: str | None = None
    size: str | None = None
    flag: str | None = None

    @property
    def complexity(self) -> int:
        return sum(v is not None for v in (self.shape, self.colour, self.size, self.flag))

    def test(self, fact: ObjectFacts) -> bool | None:
        """Three-valued AND of the parts."""
        crisp = ((self.shape in (None, fact.shape)) and (self.colour in (None, fact.colour))
                 and (self.size in (None, fact.size)))
        if not crisp:
            return False
        return True if self.flag is None else fact.flags.get(self.flag, False)

    def text(self, phrases: dict[str, tuple[str, str]], plural: bool = False) -> str:
        noun = (self.shape or "shape") + ("s" if plural else "")
        words = ["all the" if plural else "the", self.size, self.colour, noun,
                 phrases[self.flag][plural] if self.flag else None]
        return " ".join(w for w in words if w)


def _set_where(facts: list[ObjectFacts], test: Callable[[ObjectFacts], bool | None]) -> tuple[int, ...] | None:
    """Indices where the three-valued `test` is True, or None when it is undecided for some object."""
    results = [test(f) for f in facts]
    if any(r is None for r in results):
        return None
    return tuple(f.index for f, r in zip(facts, results) if r)


def matches(facts: list[ObjectFacts], desc: Description) -> tuple[int, ...] | None:
    """Indices the description picks out, or None when some object is ambiguous under it."""
    return _set_where(facts, desc.test)


def _candidates(fact: ObjectFacts, flag_names: list[str]) -> list[Description]:
    """All descriptions that are true of `fact`, simplest first."""
    flags = [None] + [f for f in flag_names if fact.flags.get(f) is True]
    out = [Description(s, c, z, g) for s, c, z, g in product((None, fact.shape), (None, fact.colour),
                                                              (None, fact.size), flags)]
    out = [d for d in out if d.complexity > 0]
    return sorted(out, key=lambda d: d.complexity)


def unique_descriptions(facts: list[ObjectFacts], index: int, flag_names: list[str]) -> list[Description]:
    """Descriptions that single out exactly object `index`, simplest first."""
    return [d for d in _candidates(facts[index], flag_names) if matches(facts, d) == (index,)]


def object_name(facts: list[ObjectFacts], index: int, phrases: dict[str, tuple[str, str]] | None = None) -> str:
    """A name for answers: the simplest unique description that names colour and shape (qualifiers from
    `phrases` allowed), else the possibly shared 'the <colour> <shape>'."""
    phrases = phrases or {}
    for desc in unique_descriptions(facts, index, list(phrases)):
        if desc.shape and desc.colour:
            return desc.text(phrases)
    return facts[index].name


def names(facts: list[ObjectFacts], indices: tuple[int, ...], phrases: dict[str, tuple[str, str]] | None = None
          ) -> str:
    """'the red circle', 'the red circle and the small blue star', 'the two green hexagons and the red star'."""
    counts: dict[str, int] = {}
    for i in indices:  # only the shared fallback names can repeat: they pluralise cleanly
        name = object_name(facts, i, phrases)
        counts[name] = counts.get(name, 0) + 1
    parts = [name if k == 1 else f"the {_NUMBERS[min(k, 8)]} {name[4:]}s" for name, k in counts.items()]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def conjugate(template: str, facts: list[ObjectFacts], targets: tuple[int, ...]) -> str:
    """Fill an answer template: {who} (capitalised names), and {is_}/{has}/{s}/{es} for singular or plural."""
    one = len(targets) == 1
    who = names(facts, targets)
    return template.format(who=who[0].upper() + who[1:], is_="is" if one else "are",
                           has="has" if one else "have", s="s" if one else "", es="es" if one else "")


# ----------------------------------------------------------------------------------------------- referring

def referring_queries(facts: list[ObjectFacts], phrases: dict[str, tuple[str, str]],
                      rng: np.random.Generator, per_object: int = 2, groups: int = 2) -> list[Query]:
    """Single-object expressions (the simplest unique one plus random longer ones) and multi-object groups."""
    queries = []
    for fact in facts:
        found = unique_descriptions(facts, fact.index, list(phrases))
        if not found:
            continue
        extra = [found[i] for i in rng.permutation(len(found))[: per_object - 1] if i != 0]
        answer = f"It is {object_name(facts, fact.index, phrases)}."
        queries += [Query(REFERRING, desc.text(phrases), (fact.index,), answer) for desc in [found[0]] + extra]
    by_set: dict[tuple[int, ...], Description] = {}
    for fact in facts:
        for desc in _candidates(fact, list(phrases)):
            hit = matches(facts, desc)
            if hit is not None and len(hit) >= 2 and hit not in by_set:
                by_set[hit] = desc
    for hit in [list(by_set)[i] for i in rng.permutation(len(by_set))[:groups]]:
        answer = f"They are {names(facts, hit, phrases)}."
        queries.append(Query(REFERRING, by_set[hit].text(phrases, plural=True), hit, answer))
    return queries


# ----------------------------------------------------------------------------------------------- reasoning

# Tables of reasoning templates. Phrases follow "the shape(s)" and, like answers, use {s}/{es} for verb agreement.
# (attribute, value, phrase, question, answer template)
KNOWLEDGE: list[tuple[str, str, str, str, str]] = [
    ("colour", "yellow", "with the colour of a ripe banana", "Which shape has the colour of a ripe banana?",
     "{who} {is_} yellow like a ripe banana."),
    ("colour", "green", "with the colour of fresh grass", "Which shape is the colour of fresh grass?",
     "{who} {is_} green like grass."),
    ("colour", "blue", "with the colour of a clear sky", "Which shape has the colour of a clear sky?",
     "{who} {is_} blue like the sky."),
    ("colour", "white", "with the colour of snow", "Which shape is as white as snow?",
     "{who} {is_} white like snow."),
    ("colour", "black", "with the colour of coal", "Which shape is the colour of coal?",
     "{who} {is_} black like coal."),
    ("colour", "red", "with the colour of a ripe tomato", "Which shape has the colour of a ripe tomato?",
     "{who} {is_} red like a tomato."),
    ("colour", "orange", "with the colour of a pumpkin", "Which shape has the colour of a pumpkin?",
     "{who} {is_} orange like a pumpkin."),
    ("colour", "purple", "with the colour of lavender", "Which shape has the colour of lavender?",
     "{who} {is_} purple like lavender."),
    ("shape", "circle", "with no corners", "Which shape has no corners?", "{who} {has} no corners."),
    ("shape", "triangle", "with exactly three corners", "Which shape has three corners?",
     "{who} {has} three corners."),
    ("shape", "hexagon", "that look{s} like a honeycomb cell", "Which shape looks like a honeycomb cell?",
     "{who} {has} six sides like a honeycomb cell."),
    ("shape", "square", "that look{s} like the face of a die", "Which shape looks like the face of a die?",
     "{who} {has} four equal sides like a die face."),
    ("shape", "star", "with five points", "Which shape has five points?", "{who} {has} five points."),
]

# flag, phrase, question, answer template
VIDEO_EVENTS: list[tuple[str, str, str, str]] = [
    ("enters", "that come{s} into view during the video", "Which shape enters the scene?", "{who} enter{s} the scene."),
    ("leaves", "that leave{s} the picture before the end", "Which shape leaves the scene?",
     "{who} leave{s} the scene."),
    ("occluded", "that pass{es} behind another shape", "Which shape is hidden behind another one at some point?",
     "{who} pass{es} behind another shape."),
    ("static", "that never move{s}", "Which shape stays still the whole time?", "{who} stay{s} still."),
]
IMAGE_REGIONS: list[tuple[str, str, str, str]] = [
    ("left", "in the left part of the picture", "Which shapes are in the left part of the picture?",
     "{who} {is_} on the left."),
    ("top", "in the upper part of the picture", "Which shapes are in the upper part of the picture?",
     "{who} {is_} near the top."),
]

# number key, pick max?, phrase, question, answer template
VIDEO_SUPERLATIVES: list[tuple[str, bool, str, str, str]] = [
    ("speed", True, "that moves fastest", "Which shape moves fastest?", "{who} moves fastest."),
    ("speed", False, "that moves slowest", "Which shape moves slowest?", "{who} moves slowest."),
    ("end_y", False, "that ends nearest the top edge", "Which shape ends up closest to the top?",
     "{who} ends nearest the top edge."),
    ("end_y", True, "that ends nearest the bottom edge", "Which shape ends up closest to the bottom?",
     "{who} ends nearest the bottom edge."),
    ("end_x", False, "that ends nearest the left edge", "Which shape ends up closest to the left side?",
     "{who} ends nearest the left edge."),
    ("end_x", True, "that ends nearest the right edge", "Which shape ends up closest to the right side?",
     "{who} ends nearest the right edge."),
]


def _phrase_or_question(rng: np.random.Generator, targets: tuple[int, ...], phrase: str, question: str,
                        answer: str, facts: list[ObjectFacts], ignore: tuple[int, ...] = ()) -> Query:
    """A reasoning query, worded either as a noun phrase or as a question (a ReasonSeg 'sentence')."""
    reply = conjugate(answer, facts, targets)
    if rng.random() < 0.5:
        return Query(REASONING, question, targets, reply, is_sentence=True, ignore=ignore)
    one = len(targets) == 1
    text = ("the shape " if one else "the shapes ") + phrase.format(s="s" if one else "", es="es" if one else "")
    return Query(REASONING, text, targets, reply, ignore=ignore)


def _superlative(facts: list[ObjectFacts], key: str, pick_max: bool, ratio: float, gap: float
                 ) -> tuple[int, ...] | None:
    """The single object with a clearly extreme value: beyond the runner-up by `gap` and by a factor `ratio`.
    Every object must have the value (e.g. an end position needs the shape in view at the end)."""
    if len(facts) < 2 or any(key not in f.numbers for f in facts):
        return None
    order = sorted(facts, key=lambda f: f.numbers[key], reverse=pick_max)
    best, second = order[0].numbers[key], order[1].numbers[key]
    high, low = (best, second) if pick_max else (second, best)
    clear = high - low >= gap and high >= ratio * low
    return (order[0].index,) if clear else None


def _region_query(facts: list[ObjectFacts], rng: np.random.Generator, flag: str, phrase: str, question: str,
                  answer: str) -> Query | None:
    """Image region reasoning: objects where the flag is undecided become ignore regions instead of blocking."""
    hit = tuple(f.index for f in facts if f.flags.get(flag) is True)
    ignore = tuple(f.index for f in facts if f.flags.get(flag) is None)
    if not hit or len(hit) + len(ignore) == len(facts):
        return None
    return _phrase_or_question(rng, hit, phrase, question, answer, facts, ignore)


def reasoning_queries(facts: list[ObjectFacts], rng: np.random.Generator, video: bool, extent: float,
                      limit: int = 4) -> list[Query]:
    """Reasoning expressions whose targets are fully determined, in random order, at most `limit`.
    `extent` is min(H, W): superlatives need a winner that is clearly ahead relative to it."""
    found: list[Query | None] = []
    for attr, value, phrase, question, answer in KNOWLEDGE:
        hit = _set_where(facts, lambda f: getattr(f, attr) == value)
        if hit:
            found.append(_phrase_or_question(rng, hit, phrase, question, answer, facts))
    if video:
        for flag, phrase, question, answer in VIDEO_EVENTS:
            hit = _set_where(facts, lambda f: f.flags.get(flag))
            if hit and len(hit) < len(facts):
                found.append(_phrase_or_question(rng, hit, phrase, question, answer, facts))
        for key, pick_max, phrase, question, answer in VIDEO_SUPERLATIVES:
            ratio, gap = (1.5, 0.01 * extent) if key == "speed" else (1.0, 0.12 * extent)
            hit = _superlative(facts, key, pick_max, ratio, gap)
            if hit:
                found.append(_phrase_or_question(rng, hit, phrase, question, answer, facts))
    else:
        found += [_region_query(facts, rng, *entry) for entry in IMAGE_REGIONS]
    for size, word in (("large", "largest"), ("small", "smallest")):
        hit = _set_where(facts, lambda f: f.size == size)
        if hit and len(hit) == 1 and len(facts) > 1:
            found.append(_phrase_or_question(rng, hit, f"that is the {word}", f"Which shape is the {word}?",
                                             "{who} {is_} the " + word + " shape.", facts))
    kept = [q for q in found if q is not None]
    return [kept[i] for i in rng.permutation(len(kept))[:limit]]


def no_target_query(facts: list[ObjectFacts], rng: np.random.Generator) -> Query | None:
    """A colour + shape that matches nothing in the scene."""
    present = {(f.colour, f.shape) for f in facts}
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    if not absent:
        return None
    colour, shape = absent[int(rng.integers(len(absent)))]
    return Query(NO_TARGET, f"the {colour} {shape}", (), f"There is no {colour} {shape} here.")


# ----------------------------------------------------------------------------------------------- chat

def _count_answer(count: int, noun: str) -> str:
    word = _NUMBERS[count] if count < len(_NUMBERS) else str(count)
    return f"There {'is' if count == 1 else 'are'} {word} {noun}{'' if count == 1 else 's'}."


def _region(x: float, y: float, width: int, height: int) -> str:
    """'in the top left', 'at the top', 'on the left', 'in the centre', ... from the image thirds."""
    col = ("left", "centre", "right")[min(int(3 * x / width), 2)]
    row = ("top", "middle", "bottom")[min(int(3 * y / height), 2)]
    if row == "middle":
        return "in the centre" if col == "centre" else f"on the {col}"
    return f"at the {row}" if col == "centre" else f"in the {row} {col}"


def chat_turns(facts: list[ObjectFacts], width: int, height: int, rng: np.random.Generator,
               extra: int = 3) -> list[tuple[str, str]]:
    """(question, answer) pairs about one image: counting, colours, shapes and positions, and a request for a
    colour + shape the image does not hold (still images have no other no-target data: without it, "There is no
    ..." is learnt from videos alone, as a property of the input kind rather than of the picture)."""
    pool: list[tuple[str, str]] = []
    absent = no_target_query(facts, rng)
    if absent is not None:
        pool.append((f"Segment {absent.text}.", absent.answer))
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    pool.append((f"How many {colour} shapes are there?",
                 _count_answer(sum(f.colour == colour for f in facts), f"{colour} shape")))
    for fact in facts:
        if sum(f.shape == fact.shape for f in facts) == 1:
            pool.append((f"What colour is the {fact.shape}?", f"The {fact.shape} is {fact.colour}."))
        if sum(f.colour == fact.colour for f in facts) == 1:
            pool.append((f"What shape is the {fact.colour} one?", f"The {fact.colour} one is a {fact.shape}."))
        if sum((f.colour, f.shape) == (fact.colour, fact.shape) for f in facts) == 1:
            where = _region(fact.numbers["x"], fact.numbers["y"], width, height)
            pool.append((f"Where is the {fact.colour} {fact.shape}?", f"It is {where}."))
    turns = [("How many shapes are there?", _count_answer(len(facts), "shape"))]
    return turns + [pool[i] for i in rng.permutation(len(pool))[:extra]]
