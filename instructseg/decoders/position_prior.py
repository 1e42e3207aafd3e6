"""A where-prior for each object: a coarse map of grounding logits predicted from the object embedding alone.

The grounding map of an object (its embedding against the decoder's coarse tokens) says which pixels look like the
object; it cannot say "at the bottom" or "on the left", since the tokens' similarity to one embedding carries no
absolute position. This head turns the embedding into a `grid x grid` map of logits over the frame, upsampled to
the coarse grid and added to the grounding map, so position words can move the mask. The last layer starts at zero:
a model given the head behaves exactly as before until training moves it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from instructseg.decoders.base import GROUNDING_SCALE


class PositionPrior(nn.Module):
    """forward(embeds (B, N, C), size (h, w)) -> prior logits (B, N, h, w), in the grounding map's units."""

    def __init__(self, *, dim: int, grid: int):
        super().__init__()
        self.grid = grid
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, grid * grid))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, embeds: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        b, n, _ = embeds.shape
        coarse = self.net(embeds).view(b * n, 1, self.grid, self.grid)
        prior = F.interpolate(coarse.float(), size=size, mode="bilinear", align_corners=False)
        return GROUNDING_SCALE * prior.view(b, n, *size).to(embeds.dtype)
