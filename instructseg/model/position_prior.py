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
from torch import nn

from instructseg.decoders.base import GROUNDING_SCALE


class PositionPrior(nn.Module):
    """forward(inputs (B, N, H), valid (B, N)) -> coarse prior logits (B, N, grid, grid), in the grounding map's
    units (zero for invalid slots); inputs: each object's instruction words. In training, while its weights train,
    the valid inputs update the running mean and variance (an average with `momentum`; the first batch sets them)
    before they are used; a frozen prior keeps its statistics with its weights."""

    def __init__(self, *, width: int, grid: int, momentum: float = 0.05):
        super().__init__()
        self.grid = grid
        self.momentum = momentum
        self.linear = nn.Linear(width, grid * grid)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("var", torch.ones(width))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def forward(self, states: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        b, n, _ = states.shape
        x = states[valid].float()  # (M, H)
        if self.training and self.linear.weight.requires_grad and x.shape[0] > 1:  # frozen: statistics too
            self._update(x.detach())
        # per-dimension scale, floored at a tenth of the median spread (dimensions that barely vary stay small)
        std = self.var.sqrt()
        std = std.clamp(min=0.1 * float(std.median()) + 1e-6)
        out = self.linear(((x - self.mean) / std).to(self.linear.weight.dtype))
        maps = out.new_zeros(b, n, self.grid * self.grid).masked_scatter(valid[..., None], out)
        return GROUNDING_SCALE * maps.view(b, n, self.grid, self.grid)

    @torch.no_grad()
    def set_statistics(self, states: torch.Tensor) -> None:
        """Set the running mean and variance to those of `states` (M, H), as if they were the first batch."""
        self.seen.zero_()
        self._update(states.float())

    @torch.no_grad()
    def _update(self, x: torch.Tensor) -> None:
        mean, var = x.mean(0), x.var(0)
        m = 1.0 if int(self.seen) == 0 else self.momentum
        self.mean.lerp_(mean, m)
        self.var.lerp_(var, m)
        self.seen += 1
