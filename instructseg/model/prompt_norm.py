"""Batch normalisation of the decoder prompts (object embeddings and E_v), so they cannot collapse.

Trained from scratch, the decoder first learns to segment the most salient shape, a solution that needs no prompt;
the gradient then pushes every prompt the same way and the projections from the LLM states collapse (cosine > 0.99
between instructions) before they carry the words. Normalising each prompt dimension over the batch removes that
shared component in the forward and in the backward, so prompts always differ as much as their instructions do
(the way independently learnt per-word embeddings do, which the same decoder does learn to ground).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PromptNorm(nn.BatchNorm1d):
    """forward(x (..., C), valid (...) bool or None) -> x with its valid rows normalised; rows that are not valid
    are returned unchanged. In training, batch statistics when at least two rows are valid, else the running ones."""

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if valid is None:
            valid = torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
        rows = x[valid].float()
        use_batch = self.training and rows.shape[0] > 1
        out = F.batch_norm(rows, self.running_mean, self.running_var, self.weight, self.bias, training=use_batch,
                           momentum=self.momentum, eps=self.eps)
        if use_batch:
            self.num_batches_tracked.add_(1)
        return x.masked_scatter(valid[..., None], out.to(x.dtype))
