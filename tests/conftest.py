"""Shared fixtures: one small ShapesIVS dataset per test session."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    from instructseg.data.synthetic import SynthSpec, generate

    root = tmp_path_factory.mktemp("shapesivs")
    generate(root, SynthSpec(seed=0, videos=4, images=8, frames=6, height=64, width=80))
    return root


@pytest.fixture(scope="session")
def seg_model_dir(tmp_path_factory):
    """The tiny model taught (plain AdamW steps on the LM loss) to start its answer with [SEG], with a one-token
    answer budget (`llm.max_new_tokens=1`), so the real generate path yields exactly one object; saved like any
    trained model. (A random frozen tiny LLM cannot learn longer answers in a few steps.)"""
    import torch

    from instructseg.config import preset
    from instructseg.model.instructseg import InstructSegModel
    from instructseg.model.outputs import ModelInputs
    from instructseg.model.tokens import pad_prompts
    from instructseg.train.losses import lm_loss

    torch.manual_seed(0)
    model = InstructSegModel(preset("tiny").override(["llm.max_new_tokens=1"]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    questions = ["segment the red circle", "the blue square", "which shape moves fastest?", "where is the star?"]
    size = model.decoder.image_size
    for step in range(30):
        prompts = [model.layout.encode(questions[(step + i) % 4], "[SEG]") for i in range(2)]
        batch = pad_prompts(prompts, model.tokenizer.pad_token_id)
        inputs = ModelInputs(frames=torch.rand(2, 3, size, size), ref_frames=None, **batch)
        out = model(inputs)
        loss = lm_loss(out.logits, inputs.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("models") / "seg-tiny"
    model.eval().save_pretrained(path)
    return path
