"""The LLM's inference precision: which dtype "auto" picks, what a cast touches, and that a cast LLM is never
saved as if it were full precision."""
from __future__ import annotations

import pytest
import torch

from instructseg.errors import InputError
from instructseg.inference.predictor import InstructSegPredictor
from instructseg.llm.precision import cast_base_weights, inference_dtype
from instructseg.model.checkpoint import load_model


def test_auto_keeps_float32_for_weights_that_exist_only_in_the_model():
    cpu = torch.device("cpu")
    assert inference_dtype("auto", cpu, reloadable=False) == torch.float32
    assert inference_dtype("bfloat16", cpu, reloadable=False) == torch.bfloat16
    assert inference_dtype("float32", cpu, reloadable=True) == torch.float32
    with pytest.raises(InputError, match="--llm-dtype 'half'"):
        inference_dtype("half", cpu, reloadable=True)


def test_cast_touches_base_weights_only_and_blocks_saving_them(seg_model_dir, tmp_path):
    model = load_model(str(seg_model_dir))
    cast_base_weights(model.llm, torch.bfloat16)
    dtypes = {name: p.dtype for name, p in model.llm.named_parameters()}
    assert any(".lora_" in n for n in dtypes)
    assert all(d == torch.float32 for n, d in dtypes.items() if ".lora_" in n or "trainable_tokens_delta" in n)
    assert model.llm.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.llm.get_output_embeddings().weight.dtype == torch.bfloat16
    with pytest.raises(InputError, match="cast to torch.bfloat16 for inference"):
        model.save_pretrained(tmp_path / "saved")  # the tiny model's random LLM is saved with it
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    with pytest.raises(InputError, match="already runs in torch.bfloat16"):
        InstructSegPredictor(model, llm_dtype="float32")  # the float32 weights are gone: say so, do not pretend


def test_a_bfloat16_llm_answers_and_segments_like_float32(seg_model_dir, synth_root):
    video = sorted((synth_root / "revos" / "JPEGImages").iterdir())[0]
    results = {}
    for dtype in ("float32", "bfloat16"):
        predictor = InstructSegPredictor(str(seg_model_dir), llm_dtype=dtype)
        assert predictor.model.llm.get_input_embeddings().weight.dtype == getattr(torch, dtype)
        results[dtype] = predictor.run(video, "segment the red circle")
    (full, full_answer), (half, half_answer) = results["float32"], results["bfloat16"]
    assert half.text == full.text and len(half.objects) == len(full.objects) == 1
    assert full_answer.key_prompts.keys() == half_answer.key_prompts.keys()
    for t, prompts in full_answer.key_prompts.items():
        other = half_answer.key_prompts[t]
        assert other.object_embeds.dtype == torch.float32  # the decoder side stays float32
        cos = torch.nn.functional.cosine_similarity(prompts.object_embeds.flatten(), other.object_embeds.flatten(), 0)
        assert cos > 0.99
    assert abs(full.objects[0].score - half.objects[0].score) < 0.05
