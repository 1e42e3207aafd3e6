"""SAM2 with a text prompt type: a subclass of the official `SAM2Base`, built through sam2's own hydra configs.

Text prompts travel where SAM2 carries prompts through `track_step`: the `point_inputs` dict. A text prompt is that
dict with more keys: `text_sparse` (B, P, C), extra sparse prompt tokens; optionally `text_dense` (B, C, h, w),
added to the dense prompt embedding; optionally `text_bias` (B, 1, h, w), grounding logits added to the low-res
mask logits (the mask is SAM2's refinement on top of the grounding map, so the prompt cannot be ignored).
Everything else (memory attention, memory encoding, object pointers) is SAM2's own code, unchanged.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from sam2.modeling.sam2_base import NO_OBJ_SCORE, SAM2Base

from instructseg.errors import InputError

TARGET = "instructseg.decoders.sam2_prompting.TextPromptSAM2"


def text_prompt(sparse: torch.Tensor, dense: torch.Tensor | None = None, *, bias: torch.Tensor | None = None,
                coords: torch.Tensor | None = None, labels: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor | None]:
    """A SAM2 `point_inputs` dict carrying text embeddings, and clicks (B, P, 2) / labels (B, P) if given
    (otherwise one padding point labelled -1)."""
    batch = sparse.shape[0]
    if coords is None:
        coords = sparse.new_zeros(batch, 1, 2)
        labels = -torch.ones(batch, 1, dtype=torch.int32, device=sparse.device)
    return {"point_coords": coords.to(sparse.dtype), "point_labels": labels.to(torch.int32),
            "text_sparse": sparse, "text_dense": dense, "text_bias": bias}


class TextPromptSAM2(SAM2Base):
    """SAM2Base that also accepts text prompts (see the module docstring). Clicks still work alongside them."""

    def _track_step(self, *args, **kwargs):
        current_out, sam_outputs, high_res, pix_feat = super()._track_step(*args, **kwargs)
        # SAM2 records presence logits only in eval; we also learn presence on tracked frames in training
        current_out["object_score_logits"] = sam_outputs[6]
        return current_out, sam_outputs, high_res, pix_feat

    def _use_multimask(self, is_init_cond_frame, point_inputs):
        if point_inputs is not None and "text_sparse" in point_inputs:
            return False  # a text prompt names one object: a single mask, no ambiguity heads
        return super()._use_multimask(is_init_cond_frame, point_inputs)

    def _forward_sam_heads(self, backbone_features, point_inputs=None, mask_inputs=None, high_res_features=None,
                           multimask_output=False):
        if point_inputs is None or "text_sparse" not in point_inputs:
            return super()._forward_sam_heads(backbone_features, point_inputs, mask_inputs, high_res_features,
                                              multimask_output)
        if mask_inputs is not None:
            mask_inputs = F.interpolate(mask_inputs.float(), size=self.sam_prompt_encoder.mask_input_size,
                                        mode="bilinear", align_corners=False, antialias=True)
        sparse, dense = self.sam_prompt_encoder(
            points=(point_inputs["point_coords"], point_inputs["point_labels"]), boxes=None, masks=mask_inputs)
        sparse = torch.cat([sparse, point_inputs["text_sparse"].to(sparse.dtype)], dim=1)
        if point_inputs.get("text_dense") is not None:
            dense = dense + point_inputs["text_dense"].to(dense.dtype)
        low_res, ious, out_tokens, obj_logits = self.sam_mask_decoder(
            image_embeddings=backbone_features,
            image_pe=self.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
            repeat_image=False,
            high_res_features=high_res_features,
        )
        if point_inputs.get("text_bias") is not None:
            low_res = low_res + F.interpolate(point_inputs["text_bias"].to(low_res.dtype), size=low_res.shape[-2:],
                                              mode="bilinear", align_corners=False)
        if self.pred_obj_scores:
            low_res = torch.where(obj_logits[:, None, None] > 0, low_res, NO_OBJ_SCORE)
        low_res = low_res.float()
        high_res = F.interpolate(low_res, size=(self.image_size, self.image_size), mode="bilinear",
                                 align_corners=False)
        obj_ptr = self._object_pointer(out_tokens[:, 0], obj_logits)
        return low_res, high_res, ious, low_res, high_res, obj_ptr, obj_logits

    def _object_pointer(self, token: torch.Tensor, obj_logits: torch.Tensor) -> torch.Tensor:
        """SAM2's object pointer, blended towards `no_obj_ptr` by the object-presence score."""
        ptr = self.obj_ptr_proj(token)
        if not self.pred_obj_scores:
            return ptr
        present = obj_logits.sigmoid() if self.soft_no_obj_ptr else (obj_logits > 0).float()
        if self.fixed_no_obj_ptr:
            ptr = present * ptr
        return ptr + (1 - present) * self.no_obj_ptr


def _tiny_overrides(hidden: int) -> list[str]:
    """Shrink hiera-t to a few thousand parameters per block: for tests and from-scratch training on CPU."""
    if hidden % 16:
        raise InputError(f"decoder.sam2_hidden_dim={hidden}: must be a multiple of 16")
    embed, mem = hidden // 2, hidden // 2
    return [
        "++model.image_encoder.trunk.embed_dim=%d" % embed,
        "++model.image_encoder.trunk.stages=[1,1,2,1]",
        "++model.image_encoder.trunk.global_att_blocks=[3]",  # not a q-pool block (1, 2, 4)
        "++model.image_encoder.neck.d_model=%d" % hidden,
        "++model.image_encoder.neck.backbone_channel_list=[%d,%d,%d,%d]" % (embed * 8, embed * 4, embed * 2, embed),
        "++model.image_encoder.neck.position_encoding.num_pos_feats=%d" % hidden,
        "++model.memory_attention.d_model=%d" % hidden,
        "++model.memory_attention.num_layers=1",
        "++model.memory_attention.layer.d_model=%d" % hidden,
        "++model.memory_attention.layer.dim_feedforward=%d" % (hidden * 4),
        "++model.memory_attention.layer.self_attention.embedding_dim=%d" % hidden,
        "++model.memory_attention.layer.cross_attention.embedding_dim=%d" % hidden,
        "++model.memory_attention.layer.cross_attention.kv_in_dim=%d" % mem,
        "++model.memory_encoder.out_dim=%d" % mem,
        "++model.memory_encoder.position_encoding.num_pos_feats=%d" % mem,
        "++model.memory_encoder.in_dim=%d" % hidden,
        "++model.memory_encoder.mask_downsampler.embed_dim=%d" % hidden,
        "++model.memory_encoder.fuser.layer.dim=%d" % hidden,
    ]


TINY_BASE = "configs/sam2.1/sam2.1_hiera_t.yaml"


def hydra_config(*, config: str, image_size: int, hidden_dim: int) -> tuple[str, list[str]]:
    """(sam2 config name, hydra overrides) of a decoder's SAM2, without the class target: our decoder adds
    `TextPromptSAM2`, the raw-SAM2 benchmark the official `SAM2VideoPredictor`."""
    overrides = [f"++model.image_size={image_size}"]
    if config == "tiny":
        return TINY_BASE, overrides + _tiny_overrides(hidden_dim)
    return config, overrides


def build_text_prompt_sam2(*, config: str, image_size: int, hidden_dim: int,
                           checkpoint: str | None) -> TextPromptSAM2:
    """Build through sam2's hydra configs with our class as the target; load an official checkpoint if given."""
    import sam2  # noqa: F401  (initialises sam2's hydra config module)
    from hydra import compose
    from hydra.utils import instantiate

    if image_size % 32:
        raise InputError(f"decoder.image_size={image_size}: SAM2 needs a multiple of 32")
    name, overrides = hydra_config(config=config, image_size=image_size, hidden_dim=hidden_dim)
    try:
        cfg = compose(config_name=name, overrides=[f"++model._target_={TARGET}", *overrides])
    except Exception as err:  # hydra raises several types for an unknown config name
        raise InputError(f"decoder.sam2_config={config!r}: not a sam2 config ({type(err).__name__})") from None
    model = instantiate(cfg.model, _recursive_=True)
    if checkpoint:
        load_sam2_checkpoint(model, Path(checkpoint))
    return model


def load_sam2_checkpoint(model: SAM2Base, path: Path) -> None:
    """Load an official SAM2 checkpoint (`{"model": state_dict}`) safely; any key mismatch raises."""
    if not path.is_file():
        raise InputError(f"{path}: SAM2 checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise InputError(f"{path}: not a loadable SAM2 checkpoint ({type(err).__name__})") from None
    state = state.get("model", state) if isinstance(state, dict) else state
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(f"{path}: checkpoint does not match the SAM2 config "
                         f"(missing {len(missing)}: {missing[:3]}, unexpected {len(unexpected)}: {unexpected[:3]})")
