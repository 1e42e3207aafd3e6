"""The answer names what its masks show.

A model with region words (`instructseg.model.region_words`) reads each part of its objects' masks (their union),
at the decoder's input size (parts: `instructseg.decoders.parts.mask_parts`, specks left out), and gets one name
per part in its own vocabularies ("red circle"). It reads NAME_FRAMES frames spread over a video, and the names are
those read on most of them (one frame's reading is noisier: on ShapesIVS, 35-40 % of the reasoning answers right
from one frame, 45 % from the vote of eight; docs/default_model.md). When the answer names objects in those
vocabularies and they are not the ones read, the names are replaced: the span from the first named object to the
last becomes a list of the objects read ("the red circle and the two blue squares"), and a following "is"/"are"
(or "has"/"have", "was"/"were", or a regular verb's -s) agrees with it. An answer that names no object of the
vocabularies ("Sure.", "Paris") is left as it is, and so is one whose masks are empty.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Callable

import numpy as np
import torch

from instructseg.data.collate import resize_masks
from instructseg.data.sampling import uniform_key_frames
from instructseg.decoders.parts import mask_parts

SIZES = ("small", "large", "big", "little", "tiny", "huge", "medium")
COUNTS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_SAID_PLURAL = re.compile(r"(?:s|es)$")
# words after a subject that are not its verb: they are never made to agree
_NOT_VERBS = {"in", "on", "at", "of", "with", "and", "or", "that", "which", "who", "near", "behind", "to", "from",
              "by", "as", "like", "than", "this", "its", "their", "here", "there", "now"}
_AGREE = {"is": "are", "has": "have", "was": "were", "does": "do"}
NAME_FRAMES = 8  # frames of a video read to name its objects (uniformly spread)


class ObjectNaming:
    """Collects the readings of a result's frames as they stream (`add`), then grounds its text (`ground`). A frame
    is read as the union of its objects' masks, so two objects whose masks cover the same shape name it once."""

    def __init__(self, region_words, num_frames: int):
        self.region_words = region_words
        self.frames = set(uniform_key_frames(num_frames, NAME_FRAMES))
        self.votes: Counter = Counter()  # the sorted names read on a frame -> frames that read them

    def add(self, t: int, masks: np.ndarray, frame_at: Callable[[int], torch.Tensor], size: int) -> None:
        """Read frame t's masks (N, H, W) bool on `frame_at(t)` ((3, size, size) in [0, 1]) if t is one to read."""
        if t not in self.frames or not len(masks):  # (every frame streams through here: skip the others first)
            return
        union = masks.any(0)
        if not union.any():
            return
        square = resize_masks(union[None], size).numpy()
        self.votes[tuple(sorted(read_objects(self.region_words, frame_at(t), square)))] += 1

    def names(self) -> list[tuple[str, ...]]:
        """The names read on most frames (the first read among ties); [] before any frame is read."""
        return list(self.votes.most_common(1)[0][0]) if self.votes else []

    def ground(self, text: str, names: list[tuple[str, ...]] | None = None) -> str:
        """`text` naming `names` (by default those read here)."""
        return grounded_text(text, self.names() if names is None else names, self.region_words.vocabularies)


def read_objects(region_words, frame: torch.Tensor, masks: np.ndarray) -> list[tuple[str, ...]]:
    """The names (one word per vocabulary, in vocabulary order) of every part of every mask of `masks` (N, H, W)
    bool on `frame` (3, H, W) in [0, 1], largest part of each mask first."""
    parts = []
    for mask in masks:
        labels, _ = mask_parts(np.where(mask, 1.0, -1.0), min_parts=1)
        areas = np.bincount(labels.ravel())[1:]
        parts += [labels == p + 1 for p in np.argsort(-areas, kind="stable")]
    if not parts:
        return []
    read = region_words.read(frame, np.stack(parts))
    return [tuple(words[kind] for kind in region_words.vocabularies) for words in read]


def object_pattern(vocabularies: dict[str, list[str]]) -> re.Pattern:
    """A named object: [article] [count] [size] then one word of each vocabulary in order, the last perhaps
    plural ("the two small red circles"); groups "count" and one per vocabulary ("v0", "v1", ...)."""
    alt = lambda words: "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))  # noqa: E731
    names = r"\s+".join(f"(?P<v{i}>{alt(words)})" for i, words in enumerate(vocabularies.values()))
    return re.compile(rf"\b(?:(?:the|a|an)\s+)?(?:(?P<count>{alt(COUNTS)})\s+)?(?:(?:{alt(SIZES)})\s+)?"
                      rf"{names}(?P<plural>s|es)?\b", re.IGNORECASE)


def grounded_text(text: str, objects: list[tuple[str, ...]], vocabularies: dict[str, list[str]]) -> str:
    """`text` with its named objects replaced by `objects` (from `read_objects`) where they differ; see the module
    docstring."""
    if not objects or not text:
        return text
    found = list(object_pattern(vocabularies).finditer(text))
    if not found:
        return text
    said = {tuple(m.group(f"v{i}").lower() for i in range(len(vocabularies))) for m in found}
    counts = Counter(objects)
    if said == set(counts):
        return text
    listed = [_phrase(name, n) for name, n in counts.items()]
    phrase = listed[0] if len(listed) == 1 else ", ".join(listed[:-1]) + " and " + listed[-1]
    start, end = found[0].start(), found[-1].end()
    if text[start].isupper():
        phrase = phrase[0].upper() + phrase[1:]
    was_plural = len(found) > 1 or any(m.group("count") or m.group("plural") for m in found)
    rest = text[end:]
    if was_plural != (sum(counts.values()) > 1):
        rest = _agree(rest, plural=not was_plural)
    return text[:start] + phrase + rest


def _phrase(name: tuple[str, ...], count: int) -> str:
    if count == 1:
        return "the " + " ".join(name)
    number = COUNTS[count - 2] if count - 2 < len(COUNTS) else "many"
    return f"the {number} {' '.join(name[:-1] + (_plural(name[-1]),))}"


def _plural(word: str) -> str:
    """circle -> circles, box -> boxes (nouns); move -> moves, pass -> passes (verbs, third person)."""
    return word + ("es" if re.search(r"(?:s|sh|ch|x|z)$", word) else "s")


def _unplural(word: str) -> str:
    """The inverse of `_plural` for a word that has its ending (moves -> move, passes -> pass)."""
    if re.search(r"(?:sses|shes|ches|xes|zes)$", word):
        return word[:-2]
    return word[:-1] if word.endswith("s") and not word.endswith("ss") else word


def _agree(rest: str, *, plural: bool) -> str:
    """`rest` (the text after a subject) with its first word made to agree with a plural (or singular) subject."""
    match = re.match(r"(\s+)([a-z]+)\b", rest)
    if not match or match.group(2) in _NOT_VERBS:
        return rest
    word = match.group(2)
    singular_of = {v: k for k, v in _AGREE.items()}
    if plural:
        verb = _AGREE.get(word) or (word if word in singular_of else _unplural(word))
    elif word in singular_of:
        verb = singular_of[word]
    else:  # already singular ("is", "moves") or made so ("move" -> "moves", "pass" -> "passes")
        verb = word if word in _AGREE or _unplural(word) != word else _plural(word)
    return match.group(1) + verb + rest[match.end():]
