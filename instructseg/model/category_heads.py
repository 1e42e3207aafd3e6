"""Auxiliary category heads: per-token category logits from the vision encoder's patch tokens and from the
decoder's coarse tokens, trained on whole-image category maps (every annotated object, RefCOCO's instances.json).

Grounding losses only ask the encoders to set the referred object apart from the others, and a colour does that in
most sentences, so encoders trained from scratch learn colour and little shape (measured on the shipped model: a
linear probe reads an object's colour from its pooled decoder features 100 % of the time, its shape 33 %, chance
20 %). A dense category target asks every token what object covers it. The heads are training aids: inference
never calls them.
"""
from __future__ import annotations

import torch
from torch import nn


class CategoryHeads(nn.Module):
    """forward(vision tokens (B, P, Cv), vision grid, decoder tokens (B, hw, Cd), decoder grid) ->
    (vision logits (B, K + 1, gh, gw), decoder logits (B, K + 1, h, w)); class 0 is "no object"."""

    def __init__(self, vision_width: int, decoder_dim: int, classes: int):
        super().__init__()
        self.vision = nn.Linear(vision_width, classes + 1)
        self.decoder = nn.Linear(decoder_dim, classes + 1)

    def forward(self, vision_tokens: torch.Tensor, vision_grid: tuple[int, int], decoder_tokens: torch.Tensor,
                decoder_grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        return _grid(self.vision(vision_tokens), vision_grid), _grid(self.decoder(decoder_tokens), decoder_grid)


def _grid(logits: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    return logits.transpose(1, 2).reshape(logits.shape[0], logits.shape[2], *grid)
