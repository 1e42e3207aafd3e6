"""LoRA through peft: adapters on the configured projections plus trainable rows for our new tokens ([SEG])."""
from __future__ import annotations

from instructseg.config import LLMConfig


def apply_lora(model, cfg: LLMConfig, *, trainable_tokens: list[int]):
    """Wrap `model` in a peft LoRA model (base weights frozen) or, with `use_lora=False`, freeze it whole."""
    if not cfg.use_lora:
        model.requires_grad_(False)
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_targets), trainable_token_indices=list(trainable_tokens),
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def adapter_merged(llm) -> bool:
    """Whether an adapter is currently folded into `llm`'s weights (peft `merge_adapter`)."""
    return any(getattr(module, "merged", False) for module in llm.modules())
