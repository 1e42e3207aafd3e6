"""Which part of a mask the instruction means: per object, one weight per part feature, read from the words.

The position prior (`position_prior`) moves a mask towards where the words say; it cannot pick "the large star"
when both stars look alike, since size is a comparison between parts. This head reads the same input, the
instruction's mean word embedding, and gives each object `PART_FEATURES` weights; the decoder raises or lowers
each connected part of the object's mask by the weights' dot product with the part's relative log area and
centre (`instructseg.decoders.parts`). Fitted on ShapesIVS, most instructions keep the larger part (extra parts
are often fragments or a smaller neighbour), "large" more strongly than "small", and "at the bottom" the lower
part. Like the position prior it is fitted by the prior stage (`instructseg.train.prior_stage`) and applied to
still images only: weighing a video's key-frame parts by size alone cost ReVOS reasoning 1.4 J&F.
"""
from __future__ import annotations

import torch

from instructseg.decoders.parts import PART_FEATURES
from instructseg.model.word_linear import WordLinear

PART_SCALE = 10.0  # logits per unit of a weight (a relative log area of 1 is about a 2.7x larger part)


class PartPrior(WordLinear):
    """forward(inputs (B, N, H), valid (B, N)) -> part weights (B, N, PART_FEATURES), zero for invalid slots."""

    def __init__(self, *, width: int, momentum: float = 0.05):
        super().__init__(width=width, out=PART_FEATURES, momentum=momentum)

    def forward(self, states: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return PART_SCALE * super().forward(states, valid)
