"""A where-prior for each object: a coarse map of grounding logits predicted from the object's `[SEG]` state.

The grounding map of an object (its embedding against the decoder's coarse tokens) says which pixels look like the
object; it cannot say "at the bottom" or "on the left", since the tokens' similarity to one embedding carries no
absolute position. This head turns the object's standardised `[SEG]` state (the LLM's last hidden state, after
`StateNorm`) into a `grid x grid` map of logits over the frame; the decoder upsamples it to its coarse grid and adds
it to the grounding map (`MaskDecoder.grounding`), so position words can move the mask.

It reads the state, not the object embedding: a held-out linear probe reads the position word of a sentence from
the standardised `[SEG]` state 90 % of the time but from the object embedding only 34 % (chance 31 %), since the
object projection, trained for colour and shape, drops it (docs/default_model.md, "A position prior"). The map is
linear in the state, like the probe, after the state is centred and scaled with running statistics of the `[SEG]`
states seen in training: `[SEG]` states share a large component (two sentences' states have cosine ~0.99), and
without the centring the head only ever learnt that shared part (the same map for every sentence). The weights start
at zero: a model given the head behaves exactly as before until training moves it.
"""
from __future__ import annotations

import torch
from torch import nn

from instructseg.decoders.base import GROUNDING_SCALE


class PositionPrior(nn.Module):
    """forward(states (B, N, H), valid (B, N)) -> coarse prior logits (B, N, grid, grid), in the grounding map's
    units (zero for invalid slots). In training, while its weights train, the valid states update the running mean and
    variance (an average with `momentum`; the first batch sets them) before they are used; a frozen prior keeps
    its statistics with its weights."""

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
