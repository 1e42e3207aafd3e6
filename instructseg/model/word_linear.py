"""A linear map of an instruction's words, centred and scaled with running statistics: what the position prior
(`position_prior`), the part prior (`part_prior`) and the track prior (`track_prior`) are built on.

The input is each object's instruction words (`InstructSegModel.instruction_words`: the mean input embedding of
the instruction's tokens). A large component of it is shared by every input, so it is centred and scaled by a
running mean and variance before the linear map. The output layer's weights start at zero: a model given such a
head behaves exactly as before until training moves it.

With `hidden` > 0 a GELU layer of that width comes first. The mean embedding is a bag of words, and a linear map of
it gives each word one fixed contribution: "left" would weigh the same features in "moving left" and in "starts on
the left". The hidden layer lets words combine.
"""
from __future__ import annotations

import torch
from torch import nn


def _seeded_linear(width: int, out: int) -> nn.Linear:
    """nn.Linear with its own initialisation drawn from seed 0, not from the global random state (which is left as it
    was): a refit starts from the same hidden layer however the model was built."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Linear(width, out)


class WordLinear(nn.Module):
    """forward(inputs (B, N, H), valid (B, N)) -> (B, N, out), zero for invalid slots. In training, while its
    weights train, the valid inputs update the running mean and variance (an average with `momentum`; the first
    batch sets them) before they are used; a frozen head keeps its statistics with its weights."""

    def __init__(self, *, width: int, out: int, momentum: float = 0.05, hidden: int = 0):
        super().__init__()
        self.momentum = momentum
        self.hidden = nn.Sequential(_seeded_linear(width, hidden), nn.GELU()) if hidden else nn.Identity()
        self.linear = nn.Linear(hidden or width, out)
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
        out = self.linear(self.hidden(((x - self.mean) / std).to(self.linear.weight.dtype)))
        return out.new_zeros(b, n, out.shape[-1]).masked_scatter(valid[..., None], out)

    def each(self, words: torch.Tensor) -> torch.Tensor:
        """The head on M inputs (M, H), one per row: (M, out)."""
        return self(words[:, None], torch.ones(words.shape[0], 1, dtype=torch.bool, device=words.device))[:, 0]

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
