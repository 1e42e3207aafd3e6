"""Typed values in and out of `InstructSegModel`."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from instructseg.decoders.base import FrameFeatures, Prompts


@dataclass
class ModelInputs:
    """One batch of B prompts (S = decoder image size, R = reference frames, L = tokens).

    frames:           (B, 3, S, S) key frames, floats in [0, 1], for the decoder and the vision encoder.
    ref_frames:       (B, R, 3, S, S) reference frames for OVP in time order, or None for images (the key frame is
                      its own reference).
    input_ids:        (B, L) long, right-padded.
    attention_mask:   (B, L) long.
    instruction_mask: (B, L) bool, True on the user's instruction tokens.
    labels:           (B, L) long with -100 outside answers, or None.
    semantic:         (B, S, S) long category maps of the key frames for the auxiliary category heads (-1: a
                      sample without one), or None.
    attributes:       (B, S, S) long attribute maps of the key frames (the same objects' attributes) for the word
                      slots' heads, or None.
    ref_backward:     (B,) bool, True where the reference frames precede the key frame: tracking in training then
                      runs through them last first. None: all follow it.
    """

    frames: torch.Tensor
    ref_frames: torch.Tensor | None
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    instruction_mask: torch.Tensor
    labels: torch.Tensor | None = None
    semantic: torch.Tensor | None = None
    attributes: torch.Tensor | None = None
    ref_backward: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "ModelInputs":
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device) if torch.is_tensor(value) else value
        return ModelInputs(**moved)


@dataclass
class InstructSegOutput:
    """What `InstructSegModel.forward` returns (no loss: losses live in `instructseg.train.losses`).

    logits:       (B, L, V) next-token logits.
    mask_logits:  (B, N, S, S) one mask per object slot (sam2: the i-th [SEG] of each answer; mask2former: query i).
    score_logits: (B, N) object presence (sam2) or query-instruction match (mask2former); padding slots -1e4.
    object_valid: (B, N) bool, False on padding slots.
    text_embed:   (B, C) the VMTF text embedding E_v.
    track_mask_logits:  (B, R, N, S, S) the same slots followed through the reference frames (training on clips),
                        or None.
    track_score_logits: (B, R, N) or None.
    text_align_logits:   (B, h, w) grounding map: scaled cosine similarity of E_v with the decoder's coarse visual
                         tokens (training supervises it with the union of the targets), or None.
    object_align_logits: (B, N, h, w) the same for each object slot's decoder embedding, or None.
    vision_class_logits:  (B, C + 1, h', w') category logits of the key frame's vision tokens (class 0: no object),
                          when the model has category heads (`semantic_classes`), else None.
    decoder_class_logits: (B, C + 1, h, w) the same for the decoder's coarse tokens, or None.
    word_logits:          {"attribute" / "category": (B, cells, words + 1)} the word slots' logits per cell, when
                          the model has word slots, else None.
    """

    logits: torch.Tensor
    mask_logits: torch.Tensor
    score_logits: torch.Tensor
    object_valid: torch.Tensor
    text_embed: torch.Tensor
    track_mask_logits: torch.Tensor | None = None
    track_score_logits: torch.Tensor | None = None
    text_align_logits: torch.Tensor | None = None
    object_align_logits: torch.Tensor | None = None
    vision_class_logits: torch.Tensor | None = None
    decoder_class_logits: torch.Tensor | None = None
    word_logits: dict[str, torch.Tensor] | None = None


@dataclass
class SequenceStates:
    """The LLM's last hidden states over a prompt with its answer (B = 1): everything the decoder prompts of any
    frame are built from (`InstructSegModel.prompts_for`), so several key frames need one LLM call.

    hidden: (1, L, H). input_ids: (1, L) long. instruction_mask: (1, L) bool.
    video: the prompt came with reference frames. The position prior is then left out: it reads where the target is
    from the instruction's words, and a video's words often describe other frames than the key frame ("moving
    right", "ends nearest the top"; docs/default_model.md, "The prior stage"). So is the part prior: weighing
    a video's key-frame parts by size alone cost ReVOS reasoning 1.4 J&F (docs/default_model.md, "A part choice").
    """

    hidden: torch.Tensor
    input_ids: torch.Tensor
    instruction_mask: torch.Tensor
    video: bool = False


@dataclass
class Generation:
    """A generated answer for one prompt (B = 1).

    text:        the answer without special tokens. raw_text: as generated, with [SEG] tokens.
    num_objects: how many [SEG] tokens the answer holds (each is one object).
    prompts:     decoder prompts with exactly `num_objects` object slots (B = 1).
    features:    the key frame's decoder features, reusable for decoding.
    states:      the hidden states the prompts came from: prompts for other frames without another LLM call.
    """

    text: str
    raw_text: str
    num_objects: int
    prompts: Prompts
    features: FrameFeatures
    states: SequenceStates
