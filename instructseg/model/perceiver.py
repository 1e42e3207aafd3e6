"""OVP, the object-aware video perceiver: K learnable latents per reference frame cross-attend to the concatenation
of that frame's CLIP tokens and the instruction's token embeddings, so the summary keeps what the instruction is
about. Images use the image itself as their reference frame."""
from __future__ import annotations

import torch
from torch import nn


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention + FFN with residuals: queries (B, Q, D) attend to context (B, M, D)."""

    def __init__(self, *, dim: int, heads: int):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, queries: torch.Tensor, context: torch.Tensor,
                context_padding: torch.Tensor | None = None) -> torch.Tensor:
        kv = self.norm_kv(context)
        queries = queries + self.attn(self.norm_q(queries), kv, kv, key_padding_mask=context_padding,
                                      need_weights=False)[0]
        return queries + self.ffn(self.norm_ffn(queries))


class ObjectAwarePerceiver(nn.Module):
    """forward(ref_tokens (B, R, P, Cv), text (B, L, Ct), text_mask (B, L) bool) -> (B, R*K, out_dim)."""

    def __init__(self, *, vision_width: int, text_width: int, out_dim: int, dim: int, num_latents: int,
                 layers: int, heads: int):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim) * 0.02)
        self.vision_in = nn.Linear(vision_width, dim)
        self.text_in = nn.Linear(text_width, dim)
        self.type_embed = nn.Parameter(torch.zeros(2, dim))  # tells frame tokens from instruction tokens
        self.blocks = nn.ModuleList(CrossAttentionBlock(dim=dim, heads=heads) for _ in range(layers))
        self.out = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, out_dim))

    def forward(self, ref_tokens: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        b, r, p, _ = ref_tokens.shape
        frames = self.vision_in(ref_tokens.flatten(0, 1)) + self.type_embed[0]  # (B*R, P, D)
        words = (self.text_in(text) + self.type_embed[1]).repeat_interleave(r, dim=0)  # (B*R, L, D)
        context = torch.cat([frames, words], dim=1)
        padding = torch.cat([torch.zeros(b * r, p, dtype=torch.bool, device=text.device),
                             ~text_mask.repeat_interleave(r, dim=0)], dim=1)
        latents = self.latents.expand(b * r, -1, -1)
        for block in self.blocks:
            latents = block(latents, context, padding)
        return self.out(latents).reshape(b, r * latents.shape[1], -1)
