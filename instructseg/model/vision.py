"""The CLIP-style vision encoder: open_clip (name + pretrained tag or local file, or a custom ViT) or a transformers
CLIP/SigLIP vision tower (hub id or local dir). It returns patch tokens; the model pools them for the LLM."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from instructseg.config import VisionConfig
from instructseg.errors import InputError

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class VisionEncoder(nn.Module):
    """forward(images (B, 3, H, W) in [0, 1], any size) -> patch tokens (B, h*w, width) with `grid` = (h, w)."""

    def __init__(self, *, tower: nn.Module, backend: str, width: int, image_size: int, mean, std):
        super().__init__()
        self.tower = tower
        self.backend = backend
        self.width = width
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_config(cls, cfg: VisionConfig, *, load_weights: bool = True) -> "VisionEncoder":
        if cfg.backend == "open_clip":
            tower, width, size, mean, std = _open_clip_tower(cfg, load_weights)
        elif cfg.backend == "hf":
            tower, width, size, mean, std = _hf_tower(cfg, load_weights)
        else:
            raise InputError(f"vision.backend={cfg.backend!r}: expected 'open_clip' or 'hf'")
        return cls(tower=tower, backend=cfg.backend, width=width, image_size=size, mean=mean, std=std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        images = (images - self.mean) / self.std
        if self.backend == "open_clip":
            _, tokens = self.tower(images)
            return tokens
        hidden = self.tower(pixel_values=images).last_hidden_state
        grid = (self.image_size // self.tower.config.patch_size) ** 2
        return hidden[:, -grid:]  # CLIP has a leading CLS token, SigLIP none

    @property
    def grid(self) -> tuple[int, int]:
        side = int(round(self.num_tokens ** 0.5))
        return side, side

    @property
    def num_tokens(self) -> int:
        patch = self.tower.patch_size if self.backend == "hf" else self._open_clip_patch()
        return (self.image_size // patch) ** 2

    def _open_clip_patch(self) -> int:
        patch = self.tower.patch_size
        return patch[0] if isinstance(patch, (tuple, list)) else patch


def _open_clip_tower(cfg: VisionConfig, load_weights: bool):
    import open_clip
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    if cfg.name == "custom":
        vcfg = CLIPVisionCfg(layers=cfg.layers, width=cfg.width, head_width=cfg.width // cfg.heads,
                             patch_size=cfg.patch_size, image_size=cfg.image_size, output_tokens=True)
        tower = _build_vision_tower(embed_dim=cfg.width, vision_cfg=vcfg)
        if cfg.pretrained and load_weights:
            raise InputError("vision.pretrained: a custom ViT has no pretrained weights; set vision.name")
        return tower, cfg.width, cfg.image_size, _CLIP_MEAN, _CLIP_STD
    if cfg.name not in open_clip.list_models():
        raise InputError(f"vision.name={cfg.name!r}: not an open_clip model")
    pretrained = cfg.pretrained if load_weights else None
    if pretrained and Path(pretrained).suffix and not Path(pretrained).is_file():
        raise InputError(f"vision.pretrained={pretrained!r}: weights file not found")
    model = open_clip.create_model(cfg.name, pretrained=pretrained, load_weights_only=True)
    tower = model.visual
    tower.output_tokens = True
    size = tower.image_size[0] if isinstance(tower.image_size, (tuple, list)) else tower.image_size
    mean = getattr(tower, "image_mean", None) or _CLIP_MEAN
    std = getattr(tower, "image_std", None) or _CLIP_STD
    return tower, tower.transformer.width, size, mean, std


def _hf_tower(cfg: VisionConfig, load_weights: bool):
    from transformers import AutoConfig, CLIPVisionModel, SiglipVisionModel

    try:
        config = AutoConfig.from_pretrained(cfg.name)
    except OSError as err:
        raise InputError(f"vision.name={cfg.name!r}: cannot load ({str(err).splitlines()[0]})") from None
    kind = config.model_type
    model_cls = SiglipVisionModel if kind.startswith("siglip") else CLIPVisionModel
    vision_config = getattr(config, "vision_config", config)
    if load_weights:
        tower = model_cls.from_pretrained(cfg.name)
    else:
        tower = model_cls(vision_config)
    mean, std = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)) if kind.startswith("siglip") else (_CLIP_MEAN, _CLIP_STD)
    tower.patch_size = vision_config.patch_size
    return tower, vision_config.hidden_size, vision_config.image_size, mean, std
