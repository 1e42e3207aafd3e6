"""The interface every mask decoder implements, and the typed values that cross it.

A decoder owns its fine visual encoder. The model asks it for frame features once per frame, gives those features to
VMTF (`fine_tokens`), and then decodes masks from prompts built out of the LLM's hidden states.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

# cosine similarity -> logit for grounding maps (sigmoid(10) ~ 1: a cell can be confidently in or out)
GROUNDING_SCALE = 10.0


@dataclass
class FrameFeatures:
    """Fine visual features of a batch of frames, as the decoder wants them back.

    tokens: (B, HW, C) the lowest-resolution feature map flattened, for VMTF cross-attention.
    size:   (h, w) of that map.
    extra:  decoder-specific tensors (multi-scale maps, positional encodings), each with batch first.
    """

    tokens: torch.Tensor
    size: tuple[int, int]
    extra: dict[str, Any]

    def similarity(self, embeds: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of embeds (B, N, C) with every token: (B, N, h, w) in [-1, 1]."""
        sim = torch.einsum("bpc,bnc->bnp", F.normalize(self.tokens, dim=-1), F.normalize(embeds, dim=-1))
        return sim.unflatten(2, self.size)

    def grounding(self, embeds: torch.Tensor) -> torch.Tensor:
        """Grounding logits of embeds (B, N, C): GROUNDING_SCALE x cosine similarity, (B, N, h, w)."""
        return GROUNDING_SCALE * self.similarity(embeds)

    def select(self, index: torch.Tensor | list[int]) -> "FrameFeatures":
        """Rows `index` of the batch (repeating a row is allowed: one frame prompted for several objects)."""
        index = torch.as_tensor(index, device=self.tokens.device)
        return FrameFeatures(self.tokens[index], self.size, _map_tensors(self.extra, lambda t: t[index]))


@dataclass
class Prompts:
    """What the LLM side tells the decoder, per sample.

    object_embeds: (B, N, C) one embedding per object slot ([SEG] states for sam2, mask-query states for mask2former).
    object_valid:  (B, N) bool, False for padding slots.
    text_embed:    (B, C) the VMTF text embedding E_v.
    Optional user refinements (visual prompts on this frame; decoders that cannot use them ignore them):
    point_coords:  (B, N, P, 2) float (x, y) in decoder pixels; point_labels (B, N, P) int: 1 positive,
                   0 negative, 2/3 box corners, -1 padding.
    mask_inputs:   (B, N, S, S) float: a mask that replaces the prediction on this frame.
    From the instruction, when the model has a position prior (instructseg.model.position_prior):
    position_logits: (B, N, g, g) each object's coarse where-prior, added to its grounding map.
    From the instruction, when the model has a part prior (instructseg.model.part_prior):
    part_weights: (B, N, F) each object's weights of its mask's parts (`instructseg.decoders.parts`).
    """

    object_embeds: torch.Tensor
    object_valid: torch.Tensor
    text_embed: torch.Tensor
    point_coords: torch.Tensor | None = None
    point_labels: torch.Tensor | None = None
    mask_inputs: torch.Tensor | None = None
    position_logits: torch.Tensor | None = None
    part_weights: torch.Tensor | None = None

    def objects(self, keep) -> "Prompts":
        """The instruction-derived prompts of object slots `keep` (an index or slice of N); visual prompts, which
        belong to one frame, are dropped."""
        pos, parts = self.position_logits, self.part_weights
        return Prompts(object_embeds=self.object_embeds[:, keep], object_valid=self.object_valid[:, keep],
                       text_embed=self.text_embed, position_logits=None if pos is None else pos[:, keep],
                       part_weights=None if parts is None else parts[:, keep])


@dataclass
class DecoderOutput:
    """mask_logits: (B, N, H, W) at the decoder's image size. score_logits: (B, N) per-slot score (object presence
    for sam2, query-text match for mask2former)."""

    mask_logits: torch.Tensor
    score_logits: torch.Tensor


class MaskDecoder(nn.Module, ABC):
    """A mask decoder behind one interface. Subclasses set `hidden_dim` (the width of prompts and fine tokens) and
    `image_size` (the square input resolution); frames come in as (B, 3, S, S) floats in [0, 1]."""

    hidden_dim: int
    image_size: int

    @abstractmethod
    def encode(self, frames: torch.Tensor) -> FrameFeatures:
        """Encode (B, 3, S, S) frames into fine features."""

    @abstractmethod
    def decode(self, features: FrameFeatures, prompts: Prompts) -> DecoderOutput:
        """Decode each sample's object slots on its own frame, without memory (images, key frames in training)."""

    def track(self, key_features: FrameFeatures, prompts: Prompts, ref_frames: torch.Tensor
              ) -> tuple[DecoderOutput, list[DecoderOutput]]:
        """Training on clips: decode the key frame, then follow its objects through `ref_frames` (B, R, 3, S, S),
        given in tracking order. Returns (key output, one output per reference frame). This default decodes every
        reference frame on its own with the key frame's prompts; decoders with memory override it."""
        key = self.decode(key_features, prompts)
        return key, [self.decode(self.encode(ref_frames[:, r]), prompts) for r in range(ref_frames.shape[1])]

    @abstractmethod
    def propagate(self, frame_at: Callable[[int], torch.Tensor], num_frames: int,
                  key_prompts: dict[int, Prompts], *, cached: dict[int, FrameFeatures] | None = None
                  ) -> Iterator[tuple[int, DecoderOutput]]:
        """Video: masks for every frame from prompts on key frames (each Prompts has B=1 and the same N objects).

        `frame_at(i)` returns frame i as (1, 3, S, S); it is called at most once per frame, so a caller can stream
        frames from disk. `cached` holds features the caller already computed (the key frames, encoded while the
        LLM answered): those frames are not encoded again (entries are consumed). Yields (frame_idx, output with
        B=1) once for every frame, key frames first, then forwards from the first key frame, then backwards."""

    def grounding(self, features: FrameFeatures, prompts: Prompts) -> torch.Tensor:
        """Grounding logits (B, N, h, w) of the prompts' objects on `features`: the cosine map of their embeddings
        (`FrameFeatures.grounding`) plus their position prior, when the prompts carry one."""
        logits = features.grounding(prompts.object_embeds)
        if prompts.position_logits is None:
            return logits
        return logits + upsample_prior(prompts.position_logits, features.size).to(logits.dtype)

    @staticmethod
    def with_parts(mask_logits: torch.Tensor, prompts: Prompts) -> torch.Tensor:
        """`mask_logits` (B, N, S, S) of a frame decoded on its own, with each object's parts weighed by the prompts'
        part weights, when they carry them (`instructseg.decoders.parts`)."""
        if prompts.part_weights is None:
            return mask_logits
        from instructseg.decoders.parts import choose_parts

        return choose_parts(mask_logits, prompts.part_weights, prompts.object_valid)

    def external_parameters(self) -> list[nn.Parameter]:
        """Parameters used outside their owning module's `forward` (ZeRO-3 must gather them with this module)."""
        return []

    def features_at(self, t: int, frame_at: Callable[[int], torch.Tensor],
                    cached: dict[int, FrameFeatures] | None) -> FrameFeatures:
        """Frame t's features: from `cached` (consumed) when there, else encoded from `frame_at(t)`."""
        if cached is not None and t in cached:
            return cached.pop(t)
        return self.encode(frame_at(t))


def _map_tensors(value: Any, fn):
    if torch.is_tensor(value):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, fn) for v in value)
    return value


def upsample_prior(coarse: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, N, g, g) position-prior logits -> (B, N, h, w), bilinear."""
    b, n = coarse.shape[:2]
    out = F.interpolate(coarse.float().flatten(0, 1)[:, None], size=size, mode="bilinear", align_corners=False)
    return out.view(b, n, *size).to(coarse.dtype)
