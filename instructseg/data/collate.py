"""Batching `TrainingSample`s into `ModelInputs` plus the per-sample target masks."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from instructseg.data.training import TrainingSample
from instructseg.model.outputs import ModelInputs
from instructseg.model.tokens import SEG, PromptLayout, pad_prompts


def resize_frame(frame: np.ndarray, size: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, size, size) float in [0, 1]: squashed (aspect ratio not kept), bilinear, antialiased."""
    x = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float() / 255.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x[0].clamp_(0.0, 1.0)


def resize_masks(masks: np.ndarray, size: int) -> torch.Tensor:
    """(K, H, W) bool -> (K, size, size) bool: the frames' resampling (bilinear, antialiased) thresholded at 0.5.

    Unbiased in area both ways (torch's "area" mode pools whole pixels and dilates masks when upsampling by a
    non-integer factor; nearest aliases when downsampling), and aligned with the resized frame."""
    if masks.shape[0] == 0:
        return torch.zeros(0, size, size, dtype=torch.bool)
    x = torch.from_numpy(np.ascontiguousarray(masks)).float()[None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x[0] >= 0.5


def resize_categories(classes: np.ndarray, size: int) -> torch.Tensor:
    """(H, W) integer category map -> (size, size) long, nearest sample at each output pixel's centre."""
    x = torch.from_numpy(np.ascontiguousarray(classes).astype(np.int64))[None, None].float()
    return F.interpolate(x, size=(size, size), mode="nearest-exact")[0, 0].long()


class Collator:
    """`samples -> (ModelInputs, masks, ref_masks)`; masks[i] is (K_i, S, S) bool, one per [SEG] of answer i, in
    order; ref_masks[i] is (R, K_i, S, S) bool, the same objects on the reference frames (None without refs).

    Reference frames: (B, R, 3, S, S) when any sample is a video (all videos must share R; an image in such a batch
    gets its key frame repeated R times, as OVP treats an image as its own reference), None for a batch of images.
    """

    def __init__(self, layout: PromptLayout, image_size: int, pad_id: int, num_ref_frames: int | None = None):
        """`num_ref_frames`: when set, every batch gets reference frames (and reference masks), images included,
        so that every batch trains the same parameters (distributed ranks must agree on which have gradients)."""
        self.layout, self.image_size, self.pad_id = layout, image_size, pad_id
        self.num_ref_frames = num_ref_frames
        self.seg_id = layout.ids[SEG]

    def __call__(self, samples: list[TrainingSample]
                 ) -> tuple[ModelInputs, list[torch.Tensor], list[torch.Tensor] | None]:
        if not samples:
            raise ValueError("Collator: empty batch")
        size = self.image_size
        for s in samples:
            if s.masks.shape[1:] != s.key_frame.shape[:2]:
                raise ValueError(f"Collator: {s.task} sample has masks {s.masks.shape} for a frame {s.key_frame.shape}")
            for kind, labels in (("category", s.semantic), ("attribute", s.attributes)):
                if labels is not None and labels.shape != s.key_frame.shape[:2]:
                    raise ValueError(f"Collator: {s.task} sample has a {kind} map {labels.shape} for a frame "
                                     f"{s.key_frame.shape}")
        frames = torch.stack([resize_frame(s.key_frame, size) for s in samples])
        ref_counts = sorted({len(s.ref_frames) for s in samples if s.ref_frames is not None})
        if len(ref_counts) > 1:
            raise ValueError(f"Collator: videos in one batch need the same number of reference frames, "
                             f"got {ref_counts}")
        ref_frames = ref_backward = None
        if not ref_counts and self.num_ref_frames:
            ref_counts = [self.num_ref_frames]
        if ref_counts:
            count = ref_counts[0]
            refs = []
            for s, frame in zip(samples, frames):
                if s.ref_frames is None or count == 0:
                    refs.append(frame[None].repeat(count, 1, 1, 1))
                else:
                    refs.append(torch.stack([resize_frame(f, size) for f in s.ref_frames]))
            ref_frames = torch.stack(refs)
            ref_backward = torch.tensor([s.ref_backward for s in samples])
        prompts = [self.layout.encode(s.instruction, s.answer, s.history) for s in samples]
        for s, p in zip(samples, prompts):
            segs = int((p.labels == self.seg_id).sum())
            if segs != s.masks.shape[0]:
                raise ValueError(f"Collator: answer {s.answer!r} encodes {segs} {SEG} tokens "
                                 f"for {s.masks.shape[0]} masks")
        batch = pad_prompts(prompts, self.pad_id)
        inputs = ModelInputs(frames=frames, ref_frames=ref_frames, input_ids=batch["input_ids"],
                             attention_mask=batch["attention_mask"], instruction_mask=batch["instruction_mask"],
                             labels=batch["labels"], semantic=label_maps([s.semantic for s in samples], size),
                             attributes=label_maps([s.attributes for s in samples], size), ref_backward=ref_backward)
        masks = [resize_masks(s.masks, size) for s in samples]
        ref_masks = None
        if ref_frames is not None:
            count = ref_frames.shape[1]
            ref_masks = [torch.stack([resize_masks(m, size) for m in s.ref_masks]) if s.ref_masks is not None
                         else key[None].repeat(count, 1, 1, 1) for s, key in zip(samples, masks)]
        return inputs, masks, ref_masks


def label_maps(maps: list[np.ndarray | None], size: int) -> torch.Tensor | None:
    """(B, size, size) long label maps (-1 for a sample without one), or None when no sample has one."""
    if all(m is None for m in maps):
        return None
    return torch.stack([resize_categories(m, size) if m is not None else torch.full((size, size), -1, dtype=torch.long)
                        for m in maps])
