"""`instructseg model info`: parameters per component (total and trainable) and where their weights come from."""
from __future__ import annotations

from instructseg.model.checkpoint import load_model

COMPONENTS = ("vision", "projector", "perceiver", "mask_queries", "llm", "object_proj", "fusion", "object_norm",
              "text_norm", "decoder", "category_heads", "cell_words", "region_words", "implied_words", "position_prior",
              "part_prior", "track_prior")


def parameter_table(model) -> list[tuple[str, int, int, str]]:
    """(component, total parameters, trainable parameters, weight source) per component; LoRA is its own row."""
    rows = []
    for name in COMPONENTS:
        params = [(n, p) for n, p in model.named_parameters() if n == name or n.startswith(name + ".")]
        if name == "llm":
            lora = [(n, p) for n, p in params if "lora_" in n or "trainable_tokens" in n]
            base = [(n, p) for n, p in params if not ("lora_" in n or "trainable_tokens" in n)]
            rows.append(("llm", _count(base), _count(base, True), model.weight_sources["llm"]))
            if lora:
                rows.append(("llm lora", _count(lora), _count(lora, True), model.weight_sources["lora"]))
            continue
        rows.append((name, _count(params), _count(params, True), model.weight_sources[name]))
    return rows


def _count(params, trainable_only: bool = False) -> int:
    return sum(p.numel() for _, p in params if p.requires_grad or not trainable_only)


def print_model_info(name_or_dir: str) -> None:
    model = load_model(name_or_dir)
    rows = parameter_table(model)
    print(f"model: {name_or_dir}  (LLM {model.config.llm.source}, decoder {model.config.decoder.kind})")
    print(f"{'component':16s}{'total':>14s}{'trainable':>14s}  weights")
    for name, total, trainable, source in rows:
        print(f"{name:16s}{total:14,d}{trainable:14,d}  {source}")
    total = sum(r[1] for r in rows)
    trainable = sum(r[2] for r in rows)
    print(f"{'all':16s}{total:14,d}{trainable:14,d}")
