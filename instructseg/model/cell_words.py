"""Word slots: the picture written for the LLM in its own words.

Per cell of the `visual_grid`, small heads read the cell's pooled vision tokens and decoder coarse tokens and name
what covers it, once per vocabulary (the model's attribute names, then its category names, each with "background"
for an empty cell). Each distribution becomes one `<img>` slot: the probability-weighted mixture of the LLM's own
embeddings of those words. The heads learn from category and attribute maps (the cell's target is the object
covering most of it), never from the LLM's loss, so a slot always means the words it mixes.

Why: measured on the default model, the LLM ignores projected visual tokens (its answers are the same whatever the
image) although they hold the answer (a probe reads colour 87 %, shape 80 % per cell). With the same LoRA budget,
150 steps of picture-only questions taught it nothing from projected tokens (colour 7 %, shape 10 %) and to read
word slots (colour 78 %, shape 84 %): docs/default_model.md.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BACKGROUND = "background"


class CellWords(nn.Module):
    """forward(vision tokens (B, P, Cv), vision grid, decoder tokens (B, hw, Cd), decoder grid) -> {vocabulary:
    logits (B, grid * grid, len(words) + 1)}, in slot order; word 0 is "background"."""

    def __init__(self, vision_width: int, decoder_dim: int, vocabularies: dict[str, list[str]], grid: int,
                 hidden: int = 256):
        super().__init__()
        self.grid = grid
        self.vocabularies = {kind: [BACKGROUND, *words] for kind, words in vocabularies.items()}
        self.heads = nn.ModuleDict({
            kind: nn.Sequential(nn.Linear(vision_width + decoder_dim, hidden), nn.GELU(), nn.Linear(hidden, len(words)))
            for kind, words in self.vocabularies.items()})

    def forward(self, vision_tokens: torch.Tensor, vision_grid: tuple[int, int], decoder_tokens: torch.Tensor,
                decoder_grid: tuple[int, int]) -> dict[str, torch.Tensor]:
        # the encoders learn from their own losses: the heads only read them
        cells = torch.cat([_pool(vision_tokens.detach(), vision_grid, self.grid),
                           _pool(decoder_tokens.detach(), decoder_grid, self.grid)], dim=-1)
        return {kind: head(cells.to(head[0].weight.dtype)) for kind, head in self.heads.items()}

    @staticmethod
    def slots(logits: dict[str, torch.Tensor], word_embeds: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, grid * grid * vocabularies, hidden): per cell, one mixture of word embeddings per vocabulary.
        `word_embeds[kind]`: (len(vocabularies[kind]), hidden) the LLM's embedding of each word."""
        mixtures = [logits[kind].detach().float().softmax(-1) @ word_embeds[kind].float() for kind in logits]
        return torch.stack(mixtures, dim=2).flatten(1, 2)


def _pool(tokens: torch.Tensor, grid: tuple[int, int], cells: int) -> torch.Tensor:
    """(B, h * w, C) tokens on an h x w grid -> (B, cells * cells, C) averages."""
    b, _, c = tokens.shape
    pooled = F.adaptive_avg_pool2d(tokens.transpose(1, 2).reshape(b, c, *grid).float(), cells)
    return pooled.flatten(2).transpose(1, 2)

