"""A where-prior for each object: a coarse map of grounding logits predicted from the object's `[SEG]` state.

The grounding map of an object (its embedding against the decoder's coarse tokens) says which pixels look like the
object; it cannot say "at the bottom" or "on the left", since the tokens' similarity to one embedding carries no
absolute position. This head turns the object's standardised `[SEG]` state (the LLM's last hidden state, after
`StateNorm`) into a `grid x grid` map of logits over the frame; the decoder upsamples it to its coarse grid and adds
it to the grounding map (`MaskDecoder.grounding`), so position words can move the mask.

It reads the state, not the object embedding: a held-out linear probe reads the position word of a sentence from
the standardised `[SEG]` state 90 % of the time but from the object embedding only 34 % (chance 31 %), since the
object projection, trained for colour and shape, drops it (docs/default_model.md, "A position prior"). The last
layer starts at zero: a model given the head behaves exactly as before until training moves it.
"""
from __future__ import annotations

import torch
from torch import nn

from instructseg.decoders.base import GROUNDING_SCALE


class PositionPrior(nn.Module):
    """forward(states (B, N, H)) -> coarse prior logits (B, N, grid, grid), in the grounding map's units."""

    def __init__(self, *, width: int, grid: int, dim: int = 128):
        super().__init__()
        self.grid = grid
        self.net = nn.Sequential(nn.Linear(width, dim), nn.GELU(), nn.Linear(dim, grid * grid))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        b, n, _ = states.shape
        return GROUNDING_SCALE * self.net(states).view(b, n, self.grid, self.grid)

