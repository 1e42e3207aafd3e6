"""VMTF, vision-guided multi-granularity text fusion.

The global text embedding (masked mean of the instruction span's LLM hidden states) and the detailed token
embeddings (the span's states themselves) pass cross-attention + FFN layers against the decoder's fine visual
features; the first output token is the text embedding E_v the decoder uses."""
from __future__ import annotations

import torch
from torch import nn

from instructseg.model.perceiver import CrossAttentionBlock


class TextFusion(nn.Module):
    """forward(span_states (B, L, Ct), span_mask (B, L) bool, fine_tokens (B, HW, D)) -> E_v (B, D)."""

    def __init__(self, *, text_width: int, dim: int, layers: int, heads: int, max_detail_tokens: int):
        super().__init__()
        self.max_detail = max_detail_tokens
        self.global_in = nn.Linear(text_width, dim)
        self.detail_in = nn.Linear(text_width, dim)
        self.blocks = nn.ModuleList(CrossAttentionBlock(dim=dim, heads=heads) for _ in range(layers))
        self.self_attn = nn.ModuleList(nn.MultiheadAttention(dim, heads, batch_first=True) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, span_states: torch.Tensor, span_mask: torch.Tensor, fine_tokens: torch.Tensor) -> torch.Tensor:
        weights = span_mask.to(span_states.dtype).unsqueeze(-1)
        pooled = (span_states * weights).sum(1) / weights.sum(1).clamp(min=1)
        detail, detail_mask = _last_tokens(span_states, span_mask, self.max_detail)
        tokens = torch.cat([self.global_in(pooled)[:, None], self.detail_in(detail)], dim=1)
        padding = torch.cat([torch.zeros_like(detail_mask[:, :1]), ~detail_mask], dim=1)
        for cross, mix in zip(self.blocks, self.self_attn):
            tokens = tokens + mix(tokens, tokens, tokens, key_padding_mask=padding, need_weights=False)[0]
            tokens = cross(tokens, fine_tokens)
        return self.norm(tokens[:, 0])


def _last_tokens(states: torch.Tensor, mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The last k masked positions of each row, left-aligned: (B, k, C) and their validity (B, k)."""
    b, length, c = states.shape
    pos = torch.arange(length, device=states.device).expand(b, length)
    # rank masked positions from the end: the last masked token gets rank 0
    rank = torch.flip(torch.cumsum(torch.flip(mask.long(), [1]), 1), [1]) - 1
    keep = mask & (rank < k)
    count = keep.sum(1)
    order = torch.where(keep, pos, length + pos).argsort(1)[:, :k]  # kept positions first, in order
    if order.shape[1] < k:
        order = torch.cat([order, order[:, -1:].expand(b, k - order.shape[1])], dim=1)
    gathered = states.gather(1, order[..., None].expand(b, k, c))
    valid = torch.arange(k, device=states.device)[None] < count[:, None]
    return gathered, valid
