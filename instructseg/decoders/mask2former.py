"""Mask2Former decoder with language as queries: the LLM's mask-query states are the decoder's object queries.

A frame goes through a small conv pyramid (strides 4, 8, 16, 32) and transformers' `Mask2FormerPixelDecoder`
(multi-scale deformable attention, pure PyTorch), giving three maps (strides 32, 16, 8) and stride-4 mask features.
`decode` runs transformers' `Mask2FormerMaskedAttentionDecoder` with the prompts' object embeddings as queries; each
query's mask is its mask embedding dotted with the mask features, and its score is a learned-scale dot product of a
projection of the query with the VMTF text embedding E_v (ReferFormer / InstructSeg). No memory: in video every frame
is decoded with the prompts of its nearest key frame.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Mask2FormerConfig
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerMaskedAttentionDecoder,
    Mask2FormerPixelDecoder,
    Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention,
    Mask2FormerSinePositionEmbedding,
)

from instructseg.config import DecoderConfig
from instructseg.decoders.base import DecoderOutput, FrameFeatures, MaskDecoder, Prompts

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PADDING_SCORE = -1e4  # score logit of padding slots: far below any real score, finite so losses stay finite
NUM_LEVELS = 3  # transformers' Mask2Former modules hard-code three attended feature levels


def _conv_block(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """3x3 conv (no bias: GroupNorm follows) + GroupNorm + GELU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(math.gcd(out_channels, 8), out_channels),
        nn.GELU(),
    )


class ConvPyramid(nn.Module):
    """A small conv backbone: a stride-2 stem, then four stages that each halve the resolution.

    Input (B, 3, S, S); output four maps (B, channels[i], S / 2^(i+2), S / 2^(i+2)), i.e. strides 4, 8, 16, 32.
    """

    def __init__(self, *, channels: list[int]):
        super().__init__()
        self.stem = _conv_block(3, channels[0], stride=2)
        widths = [channels[0], *channels]
        self.stages = nn.ModuleList(
            nn.Sequential(_conv_block(widths[i], widths[i + 1], stride=2), _conv_block(widths[i + 1], widths[i + 1], 1))
            for i in range(len(channels))
        )

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(images)
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps


def _init_deformable_attention(module: Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention) -> None:
    """Deformable-DETR initialisation: head h samples point p at offset (p + 1) * direction(h) on every level, with
    uniform attention weights at the start."""
    angles = torch.arange(module.n_heads, dtype=torch.float32) * (2 * math.pi / module.n_heads)
    directions = torch.stack([angles.cos(), angles.sin()], -1)
    directions = directions / directions.abs().amax(-1, keepdim=True)
    steps = torch.arange(1, module.n_points + 1, dtype=torch.float32)
    offsets = directions[:, None, None, :] * steps[None, None, :, None]  # (heads, 1, points, 2)
    with torch.no_grad():
        module.sampling_offsets.weight.zero_()
        module.sampling_offsets.bias.copy_(offsets.expand(-1, module.n_levels, -1, -1).reshape(-1))
        module.attention_weights.weight.zero_()
        module.attention_weights.bias.zero_()


class Mask2FormerDecoder(MaskDecoder):
    """Conv pyramid + Mask2Former pixel decoder + masked-attention decoder, prompted by LLM mask queries.

    image_size:        square input resolution S (multiple of 32).
    hidden_dim:        width C of features, queries, prompts and text embedding (multiple of 32: transformers'
                       pixel decoder uses GroupNorm with 32 groups).
    decoder_layers:    masked-attention layers (each attends to one of the three levels, coarse to fine, cyclically).
    backbone_channels: widths of the four conv-pyramid stages (strides 4, 8, 16, 32).
    num_heads:         attention heads in the pixel decoder and the masked-attention decoder.
    """

    def __init__(self, *, image_size: int, hidden_dim: int, decoder_layers: int, backbone_channels: list[int],
                 num_heads: int = 4):
        super().__init__()
        if image_size % 32:
            raise ValueError(f"mask2former image_size must be a multiple of 32, got {image_size}")
        if hidden_dim % 32 or hidden_dim % num_heads:
            raise ValueError(f"mask2former hidden_dim must be a multiple of 32 and of num_heads ({num_heads}), "
                             f"got {hidden_dim}")
        if len(backbone_channels) != 4:
            raise ValueError(f"mask2former backbone_channels needs 4 stage widths, got {backbone_channels}")
        if decoder_layers < 1:
            raise ValueError(f"mask2former decoder_layers must be >= 1, got {decoder_layers}")
        self.image_size = image_size
        self.hidden_dim = hidden_dim
        m2f = Mask2FormerConfig(
            feature_size=hidden_dim,
            mask_feature_size=hidden_dim,
            hidden_dim=hidden_dim,
            encoder_layers=2,
            encoder_feedforward_dim=4 * hidden_dim,
            decoder_layers=decoder_layers + 1,  # transformers builds decoder_layers - 1 masked-attention layers
            num_attention_heads=num_heads,
            dim_feedforward=4 * hidden_dim,
            dropout=0.0,  # transformers also uses `dropout` as the decoder's layer-drop probability
            feature_strides=[4, 8, 16, 32],
            common_stride=4,
        )
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.backbone = ConvPyramid(channels=list(backbone_channels))
        self.pixel_decoder = Mask2FormerPixelDecoder(m2f, feature_channels=list(backbone_channels))
        self.position_embedding = Mask2FormerSinePositionEmbedding(num_position_features=hidden_dim // 2,
                                                                   normalize=True)
        self.level_embed = nn.Embedding(NUM_LEVELS, hidden_dim)
        self.query_position = nn.Linear(hidden_dim, hidden_dim)  # per-slot positional embedding from its prompt
        self.transformer_decoder = Mask2FormerMaskedAttentionDecoder(m2f)
        self.score_projection = nn.Linear(hidden_dim, hidden_dim)
        # shape (1,), not (): DeepSpeed cannot broadcast 0-dim parameters between ranks
        self.score_log_scale = nn.Parameter(torch.full((1,), -0.5 * math.log(hidden_dim)))  # 1/sqrt(C) at init
        self.score_bias = nn.Parameter(torch.zeros(1))
        nn.init.normal_(self.pixel_decoder.level_embed)  # transformers allocates it uninitialised
        for module in self.pixel_decoder.modules():
            if isinstance(module, Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention):
                _init_deformable_attention(module)

    @classmethod
    def from_config(cls, cfg: DecoderConfig) -> "Mask2FormerDecoder":
        """The one mapping from `DecoderConfig` to constructor arguments."""
        if cfg.kind != "mask2former":
            raise ValueError(f"Mask2FormerDecoder.from_config needs decoder.kind 'mask2former', got {cfg.kind!r}")
        return cls(image_size=cfg.image_size, hidden_dim=cfg.hidden_dim, decoder_layers=cfg.decoder_layers,
                   backbone_channels=list(cfg.backbone_channels))

    def encode(self, frames: torch.Tensor) -> FrameFeatures:
        """frames (B, 3, S, S) in [0, 1] -> FrameFeatures.

        tokens: (B, h*w, C) the stride-32 map of the pixel decoder, flattened; size: (h, w) = (S/32, S/32).
        extra["multi_scale"]: list of three (B, C, S/s, S/s) maps for s = 32, 16, 8 (the masked-attention levels).
        extra["mask_features"]: (B, C, S/4, S/4) per-pixel embeddings that mask embeddings are dotted with.
        """
        size = (self.image_size, self.image_size)
        if frames.dim() != 4 or frames.shape[1] != 3 or tuple(frames.shape[-2:]) != size:
            raise ValueError(f"expected frames of shape (B, 3, {size[0]}, {size[1]}), got {tuple(frames.shape)}")
        pyramid = self.backbone((frames - self.pixel_mean) / self.pixel_std)
        pixel = self.pixel_decoder(pyramid)
        multi_scale = list(pixel.multi_scale_features)
        coarse = multi_scale[0]
        return FrameFeatures(
            tokens=coarse.flatten(2).transpose(1, 2),
            size=(coarse.shape[2], coarse.shape[3]),
            extra={"multi_scale": multi_scale, "mask_features": pixel.mask_features},
        )

    def external_parameters(self) -> list[nn.Parameter]:
        """The level embedding's table is read directly (its forward never runs)."""
        return [self.level_embed.weight]

    def decode(self, features: FrameFeatures, prompts: Prompts) -> DecoderOutput:
        """See `forward`; as a module call, so that DeepSpeed ZeRO-3 gathers this module's parameters for the
        forward and, through hooks on the plain tensors returned, for the backward."""
        masks, scores = self(features, prompts)
        return DecoderOutput(mask_logits=self.with_parts(masks, prompts), score_logits=scores)

    def forward(self, features: FrameFeatures, prompts: Prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks and scores for each sample's object slots on its own frame.

        prompts.object_embeds (B, N, C) are the queries; padding slots (object_valid False) enter as zero vectors, so
        their content never reaches the valid slots' outputs, and get score PADDING_SCORE.
        Returns mask_logits (B, N, S, S) and score_logits (B, N).
        """
        valid = prompts.object_valid.to(prompts.object_embeds.dtype)[..., None]  # (B, N, 1)
        queries = prompts.object_embeds * valid
        query_position = self.query_position(queries) * valid
        keys, key_positions, sizes = [], [], []
        for level, x in enumerate(features.extra["multi_scale"]):  # (B, C, h, w), coarse to fine
            sizes.append(x.shape[-2:])
            position = self.position_embedding(x.shape, x.device, x.dtype)  # (B, C, h, w)
            key_positions.append(position.flatten(2).permute(2, 0, 1))  # (hw, B, C)
            keys.append((x.flatten(2) + self.level_embed.weight[level][None, :, None]).permute(2, 0, 1))
        out = self.transformer_decoder(
            inputs_embeds=queries.transpose(0, 1),  # (N, B, C): transformers' decoder is sequence-first
            multi_stage_positional_embeddings=key_positions,
            pixel_embeddings=features.extra["mask_features"],
            encoder_hidden_states=keys,
            query_position_embeddings=query_position.transpose(0, 1),
            feature_size_list=sizes,
            return_dict=True,
        )
        # The decoder's mask predictor (an MLP mask embedding dotted with the stride-4 mask features) already ran on
        # the layer-normed final states; those states are also what the score head reads.
        q = out.intermediate_hidden_states[-1].transpose(0, 1)  # (B, N, C)
        mask_logits = F.interpolate(out.masks_queries_logits[-1], size=(self.image_size, self.image_size),
                                    mode="bilinear", align_corners=False)
        scores = torch.einsum("bnc,bc->bn", self.score_projection(q), prompts.text_embed)
        scores = scores * self.score_log_scale.exp() + self.score_bias
        scores = scores.masked_fill(~prompts.object_valid.bool(), PADDING_SCORE)
        return mask_logits, scores

    def propagate(self, frame_at: Callable[[int], torch.Tensor], num_frames: int,
                  key_prompts: dict[int, Prompts], *, cached: dict[int, FrameFeatures] | None = None
                  ) -> Iterator[tuple[int, DecoderOutput]]:
        """Decode every frame with the prompts of its nearest key frame (ties go to the earlier key frame).

        Order: key frames (ascending), then forwards from the first key frame, then backwards from it. Each frame is
        encoded at most once (not at all when in `cached`); nothing is kept after its output is yielded.
        """
        keys = sorted(key_prompts)
        if not keys or keys[0] < 0 or keys[-1] >= num_frames:
            raise ValueError(f"key frames {keys} must be a non-empty subset of range({num_frames})")
        for key in keys:
            if key_prompts[key].object_embeds.shape[0] != 1:
                raise ValueError(f"key frame {key}: prompts must have batch size 1")
        first = keys[0]
        forwards = [t for t in range(first + 1, num_frames) if t not in key_prompts]
        for t in keys + forwards + list(range(first - 1, -1, -1)):
            nearest = min(keys, key=lambda k: (abs(k - t), k))
            yield t, self.decode(self.features_at(t, frame_at, cached), key_prompts[nearest])
