"""The SAM2 decoder: text-derived embeddings prompt SAM2; in video, SAM2's memory propagates key-frame masks."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from instructseg.config import DecoderConfig
from instructseg.decoders.base import DecoderOutput, FrameFeatures, MaskDecoder, Prompts
from instructseg.decoders.sam2_prompting import build_text_prompt_sam2, text_prompt

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)
INVALID_SCORE = -1e4


class SAM2Decoder(MaskDecoder):
    """Sparse prompt per object = [object embedding ; text embedding E_v]; optional dense prompt from the
    cosine-similarity map between E_v and the image embedding (a coarse localisation prior). Each object's own
    grounding map (its embedding against the image embedding) is added to its mask logits, so the mask is SAM2's
    refinement of where the object embedding points."""

    def __init__(self, *, sam: nn.Module, dense_prompt: bool):
        super().__init__()
        self.sam = sam
        self.hidden_dim = sam.hidden_dim
        self.image_size = sam.image_size
        self.dense = nn.Sequential(nn.Conv2d(1, self.hidden_dim, 3, padding=1), nn.GELU(),
                                   nn.Conv2d(self.hidden_dim, self.hidden_dim, 1)) if dense_prompt else None
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)
        # memory frames SAM2 may look back at: spatial memories and object pointers
        self.memory_span = max(sam.num_maskmem, sam.max_obj_ptrs_in_encoder)

    @classmethod
    def from_config(cls, cfg: DecoderConfig) -> "SAM2Decoder":
        sam = build_text_prompt_sam2(config=cfg.sam2_config, image_size=cfg.image_size,
                                     hidden_dim=cfg.sam2_hidden_dim, checkpoint=cfg.checkpoint)
        return cls(sam=sam, dense_prompt=cfg.dense_prompt)

    # -- features ---------------------------------------------------------------------------------------------
    def encode(self, frames: torch.Tensor) -> FrameFeatures:
        backbone = self.sam.forward_image((frames - self.mean) / self.std)
        _, feats, pos, sizes = self.sam._prepare_backbone_features(backbone)
        # SAM2 keeps features as (HW, B, C); FrameFeatures keeps batch first so that select() works
        h, w = sizes[-1]
        tokens = feats[-1].permute(1, 0, 2)
        return FrameFeatures(tokens=tokens, size=(h, w), extra={
            "feats": [f.permute(1, 0, 2) for f in feats],
            "pos": [p.permute(1, 0, 2) for p in pos],
            "sizes": sizes,
        })

    def _sam_inputs(self, features: FrameFeatures):
        feats = [f.permute(1, 0, 2) for f in features.extra["feats"]]
        pos = [p.permute(1, 0, 2) for p in features.extra["pos"]]
        return feats, pos, features.extra["sizes"]

    def _prompt(self, features: FrameFeatures, prompts: Prompts) -> dict:
        """Flatten (B, N) object slots into a SAM2 batch of B*N text prompts."""
        b, n, c = prompts.object_embeds.shape
        text = prompts.text_embed[:, None].expand(b, n, c)
        sparse = torch.stack([prompts.object_embeds, text], dim=2).reshape(b * n, 2, c)
        dense = None
        if self.dense is not None:
            sim = features.similarity(prompts.text_embed[:, None])  # (B, 1, h, w)
            dense = self.dense(sim).repeat_interleave(n, dim=0)
        bias = features.grounding(prompts.object_embeds).reshape(b * n, 1, *features.size)
        if prompts.point_coords is None:
            return text_prompt(sparse, dense, bias=bias)
        return text_prompt(sparse, dense, bias=bias, coords=prompts.point_coords.flatten(0, 1),
                           labels=prompts.point_labels.flatten(0, 1))

    # -- module calls: what DeepSpeed ZeRO-3 needs -------------------------------------------------------------
    def external_parameters(self) -> list[nn.Parameter]:
        """SAM2Base's own tensors (memory temporal encodings, no-memory and no-object embeddings): its methods use
        them but SAM2Base.forward never runs, so ZeRO-3 must gather them with this module (the trainer registers
        them as its external parameters)."""
        return list(self.sam.parameters(recurse=False))

    def forward(self, call: str, features: FrameFeatures, prompts: Prompts,
                ref_frames: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """`decode` and `track` run through here, as a module call returning plain tensors: ZeRO-3 then gathers
        `external_parameters()` for the forward and, through hooks on these outputs, again for the backward."""
        if call == "decode":
            out = self._decode(features, prompts)
            return out.mask_logits, out.score_logits
        key, refs = self._track(features, prompts, ref_frames)
        return (key.mask_logits, key.score_logits, torch.stack([r.mask_logits for r in refs], dim=1),
                torch.stack([r.score_logits for r in refs], dim=1))

    def decode(self, features: FrameFeatures, prompts: Prompts) -> DecoderOutput:
        masks, scores = self("decode", features, prompts)
        return DecoderOutput(mask_logits=masks, score_logits=scores)

    def track(self, key_features: FrameFeatures, prompts: Prompts, ref_frames: torch.Tensor
              ) -> tuple[DecoderOutput, list[DecoderOutput]]:
        masks, scores, ref_masks, ref_scores = self("track", key_features, prompts, ref_frames)
        return DecoderOutput(masks, scores), [DecoderOutput(ref_masks[:, t], ref_scores[:, t])
                                              for t in range(ref_masks.shape[1])]

    # -- images / key frames ----------------------------------------------------------------------------------
    def _decode(self, features: FrameFeatures, prompts: Prompts) -> DecoderOutput:
        b, n = prompts.object_valid.shape
        rows = torch.arange(b, device=features.tokens.device).repeat_interleave(n)
        feats, _, sizes = self._sam_inputs(features.select(rows))
        pix = feats[-1]
        if self.sam.directly_add_no_mem_embed:
            pix = pix + self.sam.no_mem_embed  # what SAM2 does for a frame decoded without memory
        pix = pix.permute(1, 2, 0).reshape(b * n, self.hidden_dim, *sizes[-1])
        high_res = [f.permute(1, 2, 0).reshape(b * n, -1, *s) for f, s in zip(feats[:-1], sizes[:-1])]
        out = self.sam._forward_sam_heads(pix, point_inputs=self._prompt(features, prompts),
                                          high_res_features=high_res, multimask_output=False)
        masks, scores = out[4], out[6]
        return _output(masks.view(b, n, *masks.shape[-2:]), scores.view(b, n), prompts.object_valid)

    # -- clips in training: the key frame conditions SAM2's memory, which tracks its objects -------------------
    def _track(self, key_features: FrameFeatures, prompts: Prompts, ref_frames: torch.Tensor
               ) -> tuple[DecoderOutput, list[DecoderOutput]]:
        b, n = prompts.object_valid.shape
        rows = torch.arange(b, device=ref_frames.device).repeat_interleave(n)
        num = ref_frames.shape[1] + 1
        memory = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
        outputs = []
        for t in range(num):
            features = key_features if t == 0 else self.encode(ref_frames[:, t - 1])
            feats, pos, sizes = self._sam_inputs(features.select(rows))
            out = self.sam.track_step(frame_idx=t, is_init_cond_frame=t == 0, current_vision_feats=feats,
                                      current_vision_pos_embeds=pos, feat_sizes=sizes,
                                      point_inputs=self._prompt(key_features, prompts) if t == 0 else None,
                                      mask_inputs=None, output_dict=memory, num_frames=num)
            memory["cond_frame_outputs" if t == 0 else "non_cond_frame_outputs"][t] = out
            masks = out["pred_masks_high_res"]
            outputs.append(_output(masks.view(b, n, *masks.shape[-2:]), out["object_score_logits"].view(b, n),
                                   prompts.object_valid))
        return outputs[0], outputs[1:]

    # -- video ------------------------------------------------------------------------------------------------
    def propagate(self, frame_at: Callable[[int], torch.Tensor], num_frames: int,
                  key_prompts: dict[int, Prompts], *, cached: dict[int, FrameFeatures] | None = None,
                  reanchor: "Reanchor | None" = None) -> Iterator[tuple[int, DecoderOutput]]:
        """See `MaskDecoder.propagate`. With `reanchor` (tracking-bias correction, SAMWISE), every `reanchor.every`-th
        tracked frame (counted from the nearest key frame) is also decoded without memory using that key frame's
        prompts; where that decode is confident and the tracked mask strongly disagrees with it, the frame becomes
        a conditioning frame (the objects re-anchor) and is listed in `reanchor.frames`."""
        keys = sorted(key_prompts)
        n = key_prompts[keys[0]].object_valid.shape[1]
        memory = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}

        def step(t: int, prompt: Prompts | None, reverse: bool) -> DecoderOutput:
            features = self.features_at(t, frame_at, cached)
            out = track(t, features, prompt, reverse)
            key = min(keys, key=lambda k: (abs(k - t), k))
            if prompt is None and reanchor is not None and abs(t - key) % reanchor.every == 0:
                free = self.decode(features, key_prompts[key])
                if reanchor.disagrees(out["pred_masks_high_res"].view(1, n, *free.mask_logits.shape[-2:]), free):
                    memory["non_cond_frame_outputs"].pop(t, None)
                    out = track(t, features, key_prompts[key], reverse)
                    reanchor.frames.append(t)
            valid = key_prompts[keys[0]].object_valid
            return _output(out["pred_masks_high_res"].view(1, n, *out["pred_masks_high_res"].shape[-2:]),
                           out["object_score_logits"].view(1, n), valid)

        def track(t: int, features: FrameFeatures, prompt: Prompts | None, reverse: bool) -> dict:
            feats, pos, sizes = self._sam_inputs(features.select([0] * n))
            inputs = masks = None
            if prompt is not None and prompt.mask_inputs is not None:  # a given mask is this frame's output
                masks = prompt.mask_inputs.reshape(n, 1, *prompt.mask_inputs.shape[-2:])
            elif prompt is not None:
                inputs = self._prompt(features, prompt)
            out = self.sam.track_step(frame_idx=t, is_init_cond_frame=prompt is not None,
                                      current_vision_feats=feats, current_vision_pos_embeds=pos,
                                      feat_sizes=sizes, point_inputs=inputs, mask_inputs=masks,
                                      output_dict=memory, num_frames=num_frames, track_in_reverse=reverse)
            kind = "cond_frame_outputs" if prompt is not None else "non_cond_frame_outputs"
            memory[kind][t] = _compact(out)
            return out

        for t in keys:
            yield t, step(t, key_prompts[t], reverse=False)
        for direction, frames in ((False, range(keys[0] + 1, num_frames)), (True, range(keys[0] - 1, -1, -1))):
            memory["non_cond_frame_outputs"].clear()
            for t in frames:
                if t in key_prompts:
                    continue
                yield t, step(t, None, reverse=direction)
                self._forget(memory, t, direction)

    def _forget(self, memory: dict, t: int, reverse: bool) -> None:
        """Drop non-conditioning outputs SAM2 can no longer attend to, so memory stays flat on long videos."""
        old = t + self.memory_span if reverse else t - self.memory_span
        memory["non_cond_frame_outputs"].pop(old, None)


@dataclass
class Reanchor:
    """When to re-anchor a tracked object: the memory-free decode sees it with probability >= `min_score` and the
    tracked mask overlaps that decode with IoU < `max_iou` (the tracker drifted or lost it). The check runs on
    every `every`-th frame from the nearest key frame (a drift is caught within `every` frames at 1/`every` of the
    cost). `frames` collects the frames that were re-anchored (one Reanchor per propagation)."""

    min_score: float = 0.8
    max_iou: float = 0.1
    every: int = 4
    frames: list[int] = field(default_factory=list)

    def disagrees(self, tracked: torch.Tensor, free: DecoderOutput) -> bool:
        a, b = tracked[0] > 0, free.mask_logits[0] > 0  # (N, S, S)
        inter = (a & b).flatten(1).sum(1).float()
        union = (a | b).flatten(1).sum(1).float().clamp(min=1)
        confident = free.score_logits[0].sigmoid() >= self.min_score
        return bool((confident & b.flatten(1).any(1) & (inter / union < self.max_iou)).any())


def _compact(out: dict) -> dict:
    """Keep what memory attention reads; drop full-resolution masks."""
    return {k: v for k, v in out.items() if k != "pred_masks_high_res"}


def _output(masks: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor) -> DecoderOutput:
    scores = torch.where(valid, scores, torch.full_like(scores, INVALID_SCORE))
    return DecoderOutput(mask_logits=masks, score_logits=scores)
