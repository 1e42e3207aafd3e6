"""Saving and loading `InstructSegModel` directories.

Layout of a saved model:
    config.json          the ModelConfig
    model.safetensors    our modules (vision unless frozen-pretrained, projector, OVP, queries, VMTF, decoder)
    adapter/             the peft LoRA adapter (adapter_config.json, adapter_model.safetensors)
    llm/                 the LLM itself, only when it is not a reference (random init, or merged with LoRA)
    tokenizer/           the tokenizer with our special tokens
The base LLM is referenced by `llm.source`, not copied, unless it is random or merged. Any missing or unexpected key
raises an InputError naming the file, except the training-only category heads and the word slots' heads: a model
saved without them loads into a config that has them (`semantic_classes`, `category_names` / `attribute_names`
added to its config.json or a recipe's model_overrides, to train them) with new heads.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from instructseg.config import ModelConfig, PRESETS, preset
from instructseg.errors import InputError
from instructseg.llm.lora import adapter_merged
from instructseg.llm.precision import check_saveable

WEIGHTS = "model.safetensors"
# heads that start untrained (priors at 0) when a saved model lacks them
_NEW_HEADS = ("category_heads.", "cell_words.", "region_words.", "implied_words.", "position_prior.", "part_prior.",
              "track_prior.")
# weights of modules that no longer exist, skipped on load: the first position prior, which read the object
# embedding (docs/default_model.md, "A position prior"); a model saved with it loads without it
_RETIRED = ("decoder.position_prior.",)


def _own_tensors(model) -> dict[str, torch.Tensor]:
    """What model.safetensors holds: everything but the LLM, and without a frozen pretrained vision tower (that
    is referenced). The live tensors, not copies."""
    skip_vision = model.config.vision.pretrained is not None and model.config.vision.freeze
    return {key: value for key, value in model.state_dict().items()
            if not key.startswith("llm.") and not (skip_vision and key.startswith("vision."))}


def save_model(model, directory: Path, *, merge_lora: bool = False) -> None:
    """Write atomically: a temporary sibling directory renamed into place (an existing one is replaced). A model
    whose adapter a predictor merged for speed is saved unmerged (and merged again afterwards)."""
    cfg = model.config.llm
    if cfg.saved_with_model or (merge_lora and cfg.use_lora):  # the LLM's weights are written
        check_saveable(model.llm)
    merged = adapter_merged(model.llm)
    if merged:
        model.llm.unmerge_adapter()
    try:
        _save_model(model, Path(directory), merge_lora=merge_lora)
    finally:
        if merged:
            model.llm.merge_adapter()


def _save_model(model, directory: Path, *, merge_lora: bool) -> None:
    directory = Path(directory)
    own_llm = model.config.llm.saved_with_model
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}-"))
    config = copy.deepcopy(model.config)
    save_file({k: v.detach().contiguous().cpu() for k, v in _own_tensors(model).items()}, str(tmp / WEIGHTS))
    model.tokenizer.save_pretrained(tmp / "tokenizer")
    llm = model.llm
    has_lora = config.llm.use_lora
    if merge_lora and has_lora:
        llm = copy.deepcopy(llm).merge_and_unload()
        has_lora = False
    elif has_lora:
        llm.save_pretrained(tmp / "adapter", save_embedding_layers=False)  # new rows are rebuilt on load
        (tmp / "adapter" / "README.md").unlink(missing_ok=True)  # peft's generated model card template
        llm = copy.deepcopy(llm).unload() if own_llm else None
    if own_llm or not (config.llm.use_lora == has_lora):
        llm.save_pretrained(tmp / "llm")
        config.llm.source, config.llm.gguf_file, config.llm.random_init, config.llm.arch = "llm", None, False, {}
    config.save(tmp / "config.json")
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)


def default_model_dir() -> Path:
    """Where the shipped `default` model lives: inside the package, next to this code."""
    return Path(__file__).resolve().parents[1] / "weights" / "default"


def model_path(name_or_dir: str | Path) -> Path:
    """Where a model name points: `default` is the shipped model's folder (unless a folder of that name is here);
    anything else is taken as a path (a preset name gives one that does not exist)."""
    path = Path(name_or_dir)
    return default_model_dir() if str(name_or_dir) == "default" and not path.exists() else path


def load_model(name_or_dir: str | Path, *, device: str | torch.device = "cpu", seed: int = 0,
               overrides: list[str] = ()):
    """A preset (random parts, real weights where the preset names them) or a saved model directory, its config
    changed by `key=value` overrides (for a saved model: new heads such as `category_names=[...]`; an override that
    changes a trained part's shape is refused, naming the key)."""
    from instructseg.model.instructseg import InstructSegModel

    path = model_path(name_or_dir)
    if path != Path(name_or_dir):  # the shipped `default`
        if not (path / "config.json").is_file():
            raise InputError("the default model is not shipped in this version yet: pass --model tiny (random) "
                             "or a trained model directory")
    if str(name_or_dir) in PRESETS and not path.exists():
        torch.manual_seed(seed)
        return InstructSegModel(preset(str(name_or_dir)).override(list(overrides))).to(device)
    if not path.is_dir():
        raise InputError(f"unknown model {str(name_or_dir)!r}: expected default (the shipped model), a preset "
                         f"({', '.join(PRESETS)}) or a saved model directory")
    if not (path / "config.json").is_file():
        raise InputError(f"{path}: not a saved instructseg model (no config.json)")
    config = ModelConfig.load(path / "config.json").override(list(overrides))
    try:
        model = InstructSegModel(config, base_dir=path, load_pretrained=False)
    except (RuntimeError, ValueError) as err:
        raise InputError(f"{path}: cannot build the model its config.json describes ({err})") from None
    saved = _load_own_state(model, path / WEIGHTS)
    trained = f"trained ({path / WEIGHTS})"
    for part in model.weight_sources:
        # a frozen pretrained tower, or new heads
        optional = part == "vision" or f"{part}." in _NEW_HEADS
        if part not in ("llm", "lora") and not (optional and not any(k.startswith(part + ".") for k in saved)):
            model.weight_sources[part] = trained
    if config.llm.source == "llm":
        model.weight_sources["llm"] = f"saved with the model ({path / 'llm'})"
    if config.llm.use_lora and (path / "adapter").is_dir():
        _load_adapter(model, path / "adapter")
        model.weight_sources["lora"] = f"trained adapter ({path / 'adapter'})"
    return model.to(device)


def _load_own_state(model, file: Path) -> set[str]:
    """Load model.safetensors (every key must match the config's modules in name and shape); returns its keys."""
    if not file.is_file():
        raise InputError(f"{file}: weights file not found")
    try:
        state = load_file(str(file))
    except Exception as err:  # safetensors raises its own error type for a truncated or foreign file
        raise InputError(f"{file}: not a readable safetensors file ({err})") from None
    state = {key: value for key, value in state.items() if not key.startswith(_RETIRED)}
    expected = _own_tensors(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    missing = [key for key in missing if not key.startswith(_NEW_HEADS)]  # these start untrained
    if missing or unexpected:
        raise InputError(f"{file}: does not match config.json (missing keys: {missing[:4]}{'...' if len(missing) > 4 else ''}; "
                         f"unexpected keys: {unexpected[:4]}{'...' if len(unexpected) > 4 else ''})")
    for key, value in state.items():
        if expected[key].shape != value.shape:
            raise InputError(f"{file}: {key} has shape {tuple(value.shape)}, the config builds {tuple(expected[key].shape)}")
    model.load_state_dict(state, strict=False)
    return set(state)


def _load_adapter(model, adapter_dir: Path) -> None:
    from peft import set_peft_model_state_dict

    file = adapter_dir / "adapter_model.safetensors"
    if not file.is_file():
        raise InputError(f"{file}: LoRA adapter weights not found")
    saved = json.loads((adapter_dir / "adapter_config.json").read_text()) if (adapter_dir / "adapter_config.json").is_file() else {}
    if saved and saved.get("r") != model.config.llm.lora_r:
        raise InputError(f"{adapter_dir}: adapter rank {saved.get('r')} does not match llm.lora_r={model.config.llm.lora_r}")
    result = set_peft_model_state_dict(model.llm, load_file(str(file)))
    if result.unexpected_keys:
        raise InputError(f"{file}: unexpected adapter keys {result.unexpected_keys[:4]}")
