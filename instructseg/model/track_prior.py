"""Which tracked parts of a video mask the instruction means: per object, one weight per track feature and a bias,
read from the instruction's words.

The part prior (`part_prior`) chooses among a still image's mask parts by size and place on that one frame; a
video's words often speak of the whole clip ("moving right", "that starts on the left", "ends nearest the top
edge"). This head reads the same input (the instruction's mean word embedding) and gives each object weights for
the `TRACK_FEATURES` numbers of each tracked part (`instructseg.decoders.tracks`) plus a bias; a part scored low,
and well below the best part, is dropped (`tracks.choose`, `instructseg.inference.track_choice`). It is fitted on
the ground-truth object tracks of ReVOS-format training data (`instructseg.train.track_fit`), not on the model's
outputs.

Unlike the position and part priors it has a hidden layer (`TRACK_HIDDEN`): track words combine ("starts on the
left" weighs the start, "moving left" the motion). On ShapesIVS valid, emulated on the saved masks of the model
without a track prior, the linear head gave ReVOS referring J&F 57.2 and the hidden layer 59.3 (docs/default_model.md,
"A track head that combines words").
"""
from __future__ import annotations

import re

from instructseg.decoders.tracks import TRACK_FEATURES
from instructseg.model.word_linear import WordLinear

TRACK_HIDDEN = 256


class TrackPrior(WordLinear):
    """forward(inputs (B, N, H), valid (B, N)) -> (B, N, TRACK_FEATURES + 1): weights, then the bias."""

    def __init__(self, *, width: int, momentum: float = 0.05):
        super().__init__(width=width, out=TRACK_FEATURES + 1, momentum=momentum, hidden=TRACK_HIDDEN)


def named_words(text: str, vocabulary: list[str]) -> set[str]:
    """The words of `vocabulary` that `text` names, singular or plural ("the circles" names "circle")."""
    tokens = re.findall(r"[a-z]+", text.lower())
    return {w for w in vocabulary if w in tokens or w + "s" in tokens or w + "es" in tokens}
