"""Standardising the LLM's last hidden states before they prompt the decoder.

A pretrained LLM's last hidden states share a large constant component (one dimension of SmolLM2-135M is about 30x
the typical one), so two different instructions give states with cosine similarity above 0.95, and after the
projections the decoder sees nearly the same prompt for "the red hexagon" and "the large circle": it learns to
ignore the instruction. `StateNorm` centres and scales each dimension with statistics of the base LLM on a fixed
set of calibration sentences, computed once when a model is built and saved with it (buffers).
"""
from __future__ import annotations

import torch
from torch import nn

CALIBRATION = [
    "Segment the small red circle at the top of the image.",
    "Which object is moving to the left faster than the others?",
    "Please find the large blue square near the bottom right corner.",
    "What is the capital of France? It is Paris, a city on the Seine.",
    "The yellow star passes behind the green hexagon halfway through the video.",
    "Where is the purple triangle? It enters the scene from the right.",
    "Describe the picture: three shapes on a grey striped background.",
    "the orange shape on the left",
    "Can you tell me which shape leaves the frame first and why?",
    "All the white and black objects, please.",
    "A dog runs across the park while children play football.",
    "Highlight every shape that stays still during the whole clip.",
]


class StateNorm(nn.Module):
    """forward(h (..., H)) -> (h - mean) * scale, per dimension; `calibrate` sets mean and scale."""

    def __init__(self, width: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("scale", torch.ones(width))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return (hidden - self.mean.to(hidden.dtype)) * self.scale.to(hidden.dtype)

    @torch.no_grad()
    def calibrate(self, llm: nn.Module, tokenizer) -> None:
        """Statistics of `llm`'s last hidden states over the calibration sentences (the first token of each, an
        attention sink with outsized values, left out). Dimensions that barely vary are not blown up: the scale is
        capped at 10x the median dimension's."""
        batch = tokenizer(CALIBRATION, padding=True, return_tensors="pt").to(self.mean.device)
        hidden = llm(**batch, output_hidden_states=True).hidden_states[-1].float()
        keep = batch["attention_mask"].bool().clone()
        keep[torch.arange(keep.shape[0]), keep.long().argmax(1)] = False  # first real token of each row
        states = hidden[keep]
        std = states.std(0)
        self.mean.copy_(states.mean(0))
        self.scale.copy_(1.0 / std.clamp(min=0.1 * float(std.median())))
