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
    grounding map (`MaskDecoder.grounding`: its embedding against the image embedding, plus its position prior when
    the model has one) is added to its
    mask logits, so the mask is SAM2's refinement of where the object embedding points."""

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
        if cfg.single_mask_tracking:
            sam.multimask_output_for_tracking = False
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
        bias = self.grounding(features, prompts).reshape(b * n, 1, *features.size)
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
        return DecoderOutput(mask_logits=self.with_parts(masks, prompts), score_logits=scores)

    def track(self, key_features: FrameFeatures, prompts: Prompts, ref_frames: torch.Tensor
              ) -> tuple[DecoderOutput, list[DecoderOutput]]:
        masks, scores, ref_masks, ref_scores = self("track", key_features, prompts, ref_frames)
        return DecoderOutput(masks, scores), [DecoderOutput(ref_masks[:, t], ref_scores[:, t])
                                              for t in range(ref_masks.shape[1])]

    # -- images / key frames ----------------------------------------------------------------------------------
    def _decode(self, features: FrameFeatures, prompts: Prompts) -> DecoderOutput:
        b, n = prompts.object_valid.shape
        out = self._heads(features, prompts)
        masks, scores = out["pred_masks_high_res"], out["object_score_logits"]
        return _output(masks.view(b, n, *masks.shape[-2:]), scores.view(b, n), prompts.object_valid)

    def _heads(self, features: FrameFeatures, prompts: Prompts) -> dict:
        """SAM2's mask heads on one frame without memory, one row per (sample, object) slot; a dict with the keys
        of a `track_step` output (no memory encoding)."""
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
        return {"pred_masks": out[3], "pred_masks_high_res": out[4], "obj_ptr": out[5],
                "object_score_logits": out[6]}

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
                  redetect: "Redetect | None" = None) -> Iterator[tuple[int, DecoderOutput]]:
        """See `MaskDecoder.propagate`. With `redetect`, the nearest key frame's prompts are also decoded without
        memory on every tracked frame: an object that decode finds (see `Redetect`) takes its mask there (and
        SAM2's memory of that frame is encoded from it); the others keep the mask SAM2's memory tracked. A frame
        where every object is found costs no memory attention at all. The frames where at least one object was
        re-detected are listed in `redetect.frames`."""
        keys = sorted(key_prompts)
        n = key_prompts[keys[0]].object_valid.shape[1]
        valid = key_prompts[keys[0]].object_valid
        memory = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
        clicked = _visually_prompted(list(key_prompts.values()), n)  # the user's corrections propagate through memory
        shown: dict[int, torch.Tensor] = {}  # frame -> (N, S, S) bool masks output there (key frames and the last)

        def step(t: int, prompt: Prompts | None, reverse: bool) -> DecoderOutput:
            features = self.features_at(t, frame_at, cached)
            feats, pos, sizes = self._sam_inputs(features.select([0] * n))
            prev = t + 1 if reverse else t - 1  # the frame output just before this one
            if prompt is not None or redetect is None:
                out = track(t, feats, pos, sizes, features, prompt, reverse)
            else:
                key = min(keys, key=lambda k: (abs(k - t), k))
                free = self._heads(features, key_prompts[key].objects(slice(None)))  # no clicks
                found = (free["object_score_logits"][:, 0].sigmoid() >= redetect.min_score) & ~clicked  # (N,)
                found &= _iou(free["pred_masks_high_res"][:, 0] > 0, shown[prev]) >= redetect.min_iou
                out = free if bool(found.all()) and n else track(t, feats, pos, sizes, features, None, reverse,
                                                                  encode_memory=not bool(found.any()))
                if bool(found.any()):
                    if out is not free:
                        out = {k: torch.where(found.view(-1, *[1] * (free[k].dim() - 1)), free[k], out[k])
                               for k in free}
                    out["maskmem_features"], out["maskmem_pos_enc"] = self.sam._encode_new_memory(
                        current_vision_feats=feats, feat_sizes=sizes, pred_masks_high_res=out["pred_masks_high_res"],
                        object_score_logits=out["object_score_logits"], is_mask_from_pts=False)
                    redetect.frames.append(t)
            memory["cond_frame_outputs" if prompt is not None else "non_cond_frame_outputs"][t] = _compact(out)
            masks = out["pred_masks_high_res"]
            shown[t] = masks[:, 0] > 0
            if prompt is None and prev not in key_prompts:  # keep the key frames' masks and the newest
                shown.pop(prev, None)
            return _output(masks.view(1, n, *masks.shape[-2:]), out["object_score_logits"].view(1, n), valid)

        def track(t: int, feats, pos, sizes, features: FrameFeatures, prompt: Prompts | None, reverse: bool,
                  encode_memory: bool = True) -> dict:
            inputs = masks = None
            if prompt is not None and prompt.mask_inputs is not None:  # a given mask is this frame's output
                masks = prompt.mask_inputs.reshape(n, 1, *prompt.mask_inputs.shape[-2:])
            elif prompt is not None:
                inputs = self._prompt(features, prompt)
            return self.sam.track_step(frame_idx=t, is_init_cond_frame=prompt is not None,
                                       current_vision_feats=feats, current_vision_pos_embeds=pos,
                                       feat_sizes=sizes, point_inputs=inputs, mask_inputs=masks,
                                       output_dict=memory, num_frames=num_frames, track_in_reverse=reverse,
                                       run_mem_encoder=encode_memory)

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
class Redetect:
    """Prompt every tracked frame again (see `SAM2Decoder.propagate`): an object the memory-free decode finds with
    probability >= `min_score`, with a mask overlapping the previous frame's mask of that object by IoU >=
    `min_iou` (the same object, not a look-alike elsewhere), takes that decode's mask. Objects a user prompted with
    clicks or a non-empty mask on some frame are left to memory (re-detection would undo the correction). `frames`
    collects the frames where at least one object was re-detected (one Redetect per propagation).

    Measured (docs/benchmarks.md): on 48- and 64-frame videos re-detection keeps J&F at 90-96 where SAM2's memory
    alone drifts to 75-87 on some videos; on ShapesIVS valid's 8-frame clips it costs about 0.5 ReVOS J&F, and the
    IoU gate matters there (without it: -3)."""

    min_score: float = 0.5
    min_iou: float = 0.5
    frames: list[int] = field(default_factory=list)


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N,) IoU of (N, H, W) bool masks; 1 where both are empty."""
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def _visually_prompted(prompts, n: int) -> torch.Tensor:
    """(N,) bool: objects given clicks or a non-empty mask on any frame."""
    out = torch.zeros(n, dtype=torch.bool, device=prompts[0].object_embeds.device)
    for p in prompts:
        if p.point_labels is not None:
            out |= (p.point_labels[0] >= 0).any(-1)
        if p.mask_inputs is not None:
            out |= (p.mask_inputs[0].flatten(1) > 0).any(-1)
    return out


def _compact(out: dict) -> dict:
    """Keep what memory attention reads; drop full-resolution masks."""
    return {k: v for k, v in out.items() if k != "pred_masks_high_res"}


def _output(masks: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor) -> DecoderOutput:
    scores = torch.where(valid, scores, torch.full_like(scores, INVALID_SCORE))
    return DecoderOutput(mask_logits=masks, score_logits=scores)
