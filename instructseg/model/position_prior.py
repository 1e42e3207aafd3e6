"""A where-prior for each object: a coarse map of grounding logits predicted from the instruction's words.

The grounding map of an object (its embedding against the decoder's coarse tokens) says which pixels look like the
object; it cannot say "at the bottom" or "on the left", since the tokens' similarity to one embedding carries no
absolute position. This head turns the mean input embedding of the instruction's tokens (`InstructSegModel.
instruction_words`: the LLM's own word table, no picture in it) into a `grid x grid` map of logits over the frame;
the decoder upsamples it to its coarse grid and adds it to the grounding map (`MaskDecoder.grounding`), so position
words move the mask.

Why the words and not a state of the LLM: the object embedding drops position words (a linear probe reads them from
it 34 % of the time, chance 31 %); the standardised `[SEG]` state keeps them (90 %) but also carries where the
picture's word slots put the named object, and a prior fitted on it learnt that too: on fresh scenes with other
backgrounds it pushed masks to the wrong place, and ReVOS reasoning fell 6 J&F points. Fitted on the words alone,
the same head gained more on RefCOCO-format sentences (docs/default_model.md, "The prior stage"). The map is linear
in the words after centring and scaling with running statistics (a large component is shared by every input). The
weights start at zero: a model given the head behaves exactly as before until training moves it.
"""
from __future__ import annotations

import torch

from instructseg.decoders.base import GROUNDING_SCALE
from instructseg.model.word_linear import WordLinear


class PositionPrior(WordLinear):
    """forward(inputs (B, N, H), valid (B, N)) -> coarse prior logits (B, N, grid, grid), in the grounding map's
    units (zero for invalid slots); inputs: each object's instruction words (see `WordLinear` for the running
    statistics)."""

    def __init__(self, *, width: int, grid: int, momentum: float = 0.05):
        super().__init__(width=width, out=grid * grid, momentum=momentum)
        self.grid = grid

    def forward(self, states: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        maps = super().forward(states, valid)
        return GROUNDING_SCALE * maps.view(*maps.shape[:2], self.grid, self.grid)
