"""InstructSegModel with tiny random parts: shapes, gradients, save/load, batching, LoRA accounting, token layout."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LogitsProcessor, LogitsProcessorList

from instructseg.config import ModelConfig, preset
from instructseg.decoders.base import Prompts
from instructseg.errors import InputError
from instructseg.model.checkpoint import load_model
from instructseg.model.info import parameter_table
from instructseg.model.instructseg import InstructSegModel
from instructseg.model.outputs import ModelInputs
from instructseg.model.tokens import IGNORE_INDEX, IMG, MQ, REF, SEG, pad_prompts


def _model(name: str) -> InstructSegModel:
    torch.manual_seed(0)
    return InstructSegModel(preset(name))


@pytest.fixture(scope="module", params=["tiny", "tiny-m2f"])
def model(request):
    return _model(request.param)


def _inputs(model, pairs, *, video: bool, seed: int = 0) -> ModelInputs:
    gen = torch.Generator().manual_seed(seed)
    size = model.decoder.image_size
    b = len(pairs)
    refs = model.config.perceiver.num_ref_frames
    batch = pad_prompts([model.layout.encode(q, a) for q, a in pairs], model.tokenizer.pad_token_id)
    frames = torch.rand(b, 3, size, size, generator=gen)
    ref_frames = torch.rand(b, refs, 3, size, size, generator=gen) if video else None
    return ModelInputs(frames=frames, ref_frames=ref_frames, **batch)


PAIRS = [("the red circle", "It is the red circle [SEG]."), ("all the squares", "[SEG] and [SEG].")]


@pytest.mark.parametrize("video", [False, True])
def test_forward_backward_shapes(model, video):
    model.train()
    inputs = _inputs(model, PAIRS, video=video)
    out = model(inputs)
    size = model.decoder.image_size
    n = 2 if model.config.decoder.kind == "sam2" else model.config.decoder.num_queries
    assert out.logits.shape == (2, inputs.input_ids.shape[1], len(model.tokenizer))
    assert out.mask_logits.shape == (2, n, size, size)
    assert out.score_logits.shape == (2, n)
    if model.config.decoder.kind == "sam2":
        assert out.object_valid.tolist() == [[True, False], [True, True]]  # one slot per [SEG] in each answer
        assert (out.score_logits[0, 1] == -1e4).item()
    # (SAM2 gates masks of slots it scores as absent, so the scores carry the gradient there)
    loss = (out.logits.float().logsumexp(-1).mean() + out.mask_logits.sigmoid().mean()
            + out.score_logits[out.object_valid].sum() + out.text_embed.pow(2).mean())
    model.zero_grad()
    loss.backward(retain_graph=True)
    for part in ("vision", "projector", "perceiver", "fusion", "decoder", "object_proj", "object_norm", "text_norm"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(part + ".") and p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), part
    lora = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert lora and any(g is not None for g in lora)
    if not video:
        assert out.track_mask_logits is None
        return
    refs = model.config.perceiver.num_ref_frames
    assert out.track_mask_logits.shape == (2, refs, n, size, size) and out.track_score_logits.shape == (2, refs, n)
    if model.config.decoder.kind == "sam2":  # clips train SAM2's memory: the part that propagates masks in video
        loss = out.track_mask_logits.sigmoid().mean() + out.track_score_logits[:, :, 0].sum()
        model.zero_grad()
        loss.backward()
        for part in ("decoder.sam.memory_attention.", "decoder.sam.memory_encoder."):
            grads = [p.grad for name, p in model.named_parameters() if name.startswith(part)]
            assert any(g is not None and g.abs().sum() > 0 for g in grads), part


def test_batch_of_two_equals_each_alone(model):
    model.eval()
    both = _inputs(model, PAIRS, video=True, seed=3)
    with torch.no_grad():
        together = model(both)
        for i in range(2):
            alone_inputs = ModelInputs(frames=both.frames[i:i + 1], ref_frames=both.ref_frames[i:i + 1],
                                       **pad_prompts([model.layout.encode(*PAIRS[i])], model.tokenizer.pad_token_id))
            alone = model(alone_inputs)
            n = alone.mask_logits.shape[1]
            length = alone.logits.shape[1]
            torch.testing.assert_close(together.logits[i, :length], alone.logits[0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(together.mask_logits[i, :n], alone.mask_logits[0], atol=1e-4, rtol=1e-4)


def test_save_load_round_trip_identical(model, tmp_path):
    model.eval()
    with torch.no_grad():  # make the LoRA adapter non-trivial so that its save/load matters
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    inputs = _inputs(model, PAIRS, video=True, seed=5)
    with torch.no_grad():
        before = model(inputs)
    model.save_pretrained(tmp_path / "m")
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"config.json", "model.safetensors", "adapter", "tokenizer", "llm"} <= files
    assert sorted(p.name for p in (tmp_path / "m" / "adapter").iterdir()) == ["adapter_config.json",
                                                                             "adapter_model.safetensors"]
    loaded = InstructSegModel.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        after = loaded(inputs)
    torch.testing.assert_close(after.logits, before.logits)
    torch.testing.assert_close(after.mask_logits, before.mask_logits)
    assert loaded.weight_sources["lora"].startswith("trained adapter")


def test_merged_save_matches_adapter(tmp_path):
    model = _model("tiny").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    inputs = _inputs(model, PAIRS[:1], video=False)
    with torch.no_grad():
        before = model(inputs).logits
    model.save_pretrained(tmp_path / "merged", merge_lora=True)
    assert not (tmp_path / "merged" / "adapter").exists()
    loaded = InstructSegModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs).logits, before, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # the unmerged live model still has its adapter
        torch.testing.assert_close(model(inputs).logits, before)


def test_lora_parameter_accounting(model):
    rows = {name: (total, trainable) for name, total, trainable, _ in parameter_table(model)}
    llm_total, llm_trainable = rows["llm"]
    assert llm_total > 0 and llm_trainable == 0  # base LLM frozen under LoRA
    lora_total, lora_trainable = rows["llm lora"]
    hidden = model.llm.config.hidden_size
    cfg = model.config.llm
    layers = model.llm.config.num_hidden_layers
    q_out = model.llm.config.num_attention_heads * model.llm.config.head_dim
    v_out = model.llm.config.num_key_value_heads * model.llm.config.head_dim
    expected_lora = layers * cfg.lora_r * ((hidden + q_out) + (hidden + v_out))
    assert lora_trainable == lora_total == expected_lora + hidden  # + the trainable [SEG] embedding row
    assert rows["decoder"][1] == rows["decoder"][0] > 0
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == sum(t for _, t in rows.values())


def test_special_token_positions_follow_the_layout(model):
    enc = model.layout.encode("the blue star", "It is the blue star [SEG].")
    ids = enc.input_ids.tolist()
    tid = model.token_ids
    grid = model.config.visual_grid
    p = model.config.perceiver
    img = [i for i, t in enumerate(ids) if t == tid[IMG]]
    ref = [i for i, t in enumerate(ids) if t == tid[REF]]
    mq = [i for i, t in enumerate(ids) if t == tid[MQ]]
    assert len(img) == grid * grid and img == list(range(img[0], img[0] + len(img)))
    assert len(ref) == p.num_latents * p.num_ref_frames and ref[0] == img[-1] + 1
    start, end = enc.instruction
    assert start == ref[-1] + 1
    assert model.tokenizer.decode(ids[start:end]).strip() == "the blue star"
    assert len(mq) == model.config.decoder.num_queries
    if mq:
        assert mq[0] == end
    answer = ids[enc.answer_start:]
    assert answer[-1] == model.tokenizer.eos_token_id and answer.count(tid[SEG]) == 1
    assert (enc.labels[:enc.answer_start] == IGNORE_INDEX).all()
    assert enc.labels[enc.answer_start:].tolist() == answer
    for token in (SEG, IMG, REF, MQ):  # each special token is one id, never split by the tokenizer
        assert model.tokenizer(token, add_special_tokens=False)["input_ids"] == [tid[token]]


class _Force(LogitsProcessor):
    """Forces a fixed continuation, to drive the real generate path to a known answer."""

    def __init__(self, start: int, tokens: list[int]):
        self.start, self.tokens = start, tokens

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.start
        forced = torch.full_like(scores, -float("inf"))
        forced[:, self.tokens[min(step, len(self.tokens) - 1)]] = 0
        return forced


def test_generate_turns_every_seg_into_an_object(model):
    model.eval()
    inputs = _inputs(model, [("all the circles", None)], video=False)
    tok = model.tokenizer
    answer = tok("Two circles: [SEG] and [SEG].", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    gen = model.generate(inputs, max_new_tokens=len(answer) + 2,
                         logits_processor=LogitsProcessorList([_Force(0, answer)]))
    assert gen.num_objects == 2
    assert gen.text == "Two circles."  # the [SEG] list dropped with its "and", no colon left before the stop
    assert gen.prompts.object_embeds.shape[:2] == (1, 2)
    decoded = model.decoder.decode(gen.features, gen.prompts)
    assert decoded.mask_logits.shape[:2] == (1, 2)


@pytest.mark.parametrize("ending", ["eos", "seg_last"])
def test_generate_prompts_match_a_teacher_forced_pass(model, ending):
    """generate takes the [SEG] and instruction states from its own passes (KV cache); they must equal one
    teacher-forced pass over prompt + answer. With [SEG] as the last token (cut by max_new_tokens) it falls back."""
    model.eval()
    inputs = _inputs(model, [("the red circle", None)], video=False)
    tok = model.tokenizer
    answer = tok("Here: [SEG]", add_special_tokens=False)["input_ids"]
    answer = answer + [tok.eos_token_id] if ending == "eos" else answer
    gen = model.generate(inputs, max_new_tokens=len(answer),
                         logits_processor=LogitsProcessorList([_Force(0, answer)]))
    ids = torch.tensor([answer])
    full = ModelInputs(frames=inputs.frames, ref_frames=None, input_ids=torch.cat([inputs.input_ids, ids], 1),
                       attention_mask=torch.ones(1, inputs.input_ids.shape[1] + ids.shape[1], dtype=torch.long),
                       instruction_mask=torch.nn.functional.pad(inputs.instruction_mask, (0, ids.shape[1])))
    forced = model.condition(full, gen.features)
    assert gen.num_objects == 1
    torch.testing.assert_close(gen.prompts.object_embeds, forced.object_embeds, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gen.prompts.text_embed, forced.text_embed, atol=1e-4, rtol=1e-4)
    # another key frame from the same states: the same objects, E_v re-fused with that frame's features
    other = model.decoder.encode(torch.rand_like(inputs.frames))
    again = model.prompts_for(gen.states, other)
    torch.testing.assert_close(again.object_embeds, gen.prompts.object_embeds)
    assert not torch.allclose(again.text_embed, gen.prompts.text_embed, atol=1e-4)


def test_state_norm_standardises_the_llm_states_it_was_calibrated_on():
    from instructseg.model.state_norm import CALIBRATION

    model = _model("tiny").eval()  # a fresh one: the shared fixture's LoRA weights are trained by other tests
    norm = model.state_norm
    assert not torch.equal(norm.mean, torch.zeros_like(norm.mean))  # calibrated when built
    batch = model.tokenizer(CALIBRATION, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model.llm(**batch, output_hidden_states=True).hidden_states[-1]
    keep = batch["attention_mask"].bool()
    keep[:, 0] = False  # (right padding: the first token of every row is its attention sink)
    states = norm(hidden[keep])
    assert states.mean(0).abs().max() < 1e-3
    std = states.std(0)
    assert ((std - 1).abs() < 1e-3).float().mean() > 0.5 and std.max() < 1 + 1e-3  # capped dims come out below 1


def test_missing_key_in_checkpoint_is_a_clear_error(tmp_path):
    model = _model("tiny")
    model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    state = load_file(str(weights))
    state.pop("fusion.norm.weight")
    save_file(state, str(weights))
    with pytest.raises(InputError, match=r"model.safetensors: does not match config.json \(missing keys: \['fusion.norm.weight'\]"):
        load_model(tmp_path / "m")


def test_config_mismatch_and_unknown_model_are_clear_errors(tmp_path):
    model = _model("tiny")
    model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["fusion"]["layers"] = 2
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="missing keys"):
        load_model(tmp_path / "m")
    with pytest.raises(InputError, match="unknown model 'nope'"):
        load_model("nope")


def test_config_yaml_and_overrides(tmp_path):
    cfg = preset("tiny").override(["llm.lora_r=16", "decoder.kind=mask2former", "llm.lora_targets=[q_proj]"])
    assert cfg.llm.lora_r == 16 and cfg.decoder.kind == "mask2former" and cfg.llm.lora_targets == ["q_proj"]
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  visual_grid: 3\n  llm:\n    lora_r: 2\n")
    loaded = ModelConfig.load(path)
    assert loaded.visual_grid == 3 and loaded.llm.lora_r == 2
    with pytest.raises(InputError, match="unknown field 'llm.nope'"):
        cfg.override(["llm.nope=1"])
    path.write_text("model:\n  llm:\n    lorar: 2\n")
    with pytest.raises(InputError, match="c.yaml: unknown LLMConfig field"):
        ModelConfig.load(path)
    # values are checked against the fields' types (a float may be written 1e-2, which YAML 1.1 reads as text)
    assert cfg.override(["llm.lora_dropout=1e-2"]).llm.lora_dropout == 0.01
    assert cfg.override(["perceiver.num_ref_frames=3"]).perceiver.num_ref_frames == 3
    for item, message in (("llm.lora_r=abc", "LLMConfig.lora_r: expected int, got 'abc'"),
                          ("llm.lora_r=true", "expected int"), ("llm.lora_targets=q_proj", "expected list"),
                          ("llm.lora_targets=[1]", r"lora_targets\[0\]: expected str"),
                          ("llm.lora_r=[", "not valid YAML")):
        with pytest.raises(InputError, match=message):
            cfg.override([item])
    path.write_text("model:\n  llm:\n    dtype: 16\n")
    with pytest.raises(InputError, match="c.yaml: LLMConfig.dtype: expected str"):
        ModelConfig.load(path)


def test_history_seg_tokens_are_not_objects(model):
    enc = model.layout.encode("and the blue one?", "Sure, [SEG].", history=[("the red circle", "It is here [SEG].")])
    assert int((enc.input_ids == model.token_ids[SEG]).sum()) == 1
    assert "It is here" in model.tokenizer.decode(enc.input_ids)


def test_model_info_cli_prints_every_component(capsys):
    from instructseg.cli import main

    assert main(["model", "info", "tiny-m2f"]) == 0
    out = capsys.readouterr().out
    for row in ("vision", "perceiver", "llm lora", "fusion", "decoder", "all"):
        assert f"\n{row}" in out
    assert "random init" in out and "decoder mask2former" in out


def test_hf_clip_vision_tower_loads_from_a_saved_directory(tmp_path):
    """A transformers CLIP vision tower saved with save_pretrained loads through the code a real checkpoint takes."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from instructseg.config import VisionConfig
    from instructseg.model.vision import VisionEncoder

    torch.manual_seed(0)
    tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=32, patch_size=8))
    tower.save_pretrained(tmp_path / "clip")
    encoder = VisionEncoder.from_config(VisionConfig(backend="hf", name=str(tmp_path / "clip")))
    images = torch.rand(2, 3, 48, 40)
    tokens = encoder(images)
    assert tokens.shape == (2, 16, 32) and encoder.grid == (4, 4)
    with torch.no_grad():
        expected = tower(pixel_values=(torch.nn.functional.interpolate(
            images, size=(32, 32), mode="bilinear", align_corners=False, antialias=True) - encoder.mean)
            / encoder.std).last_hidden_state[:, 1:]
        torch.testing.assert_close(encoder(images), expected)
    with pytest.raises(InputError, match="cannot load"):
        VisionEncoder.from_config(VisionConfig(backend="hf", name=str(tmp_path / "missing")))


def test_default_recipe_uses_the_default_architecture():
    """scripts/recipes/default.yaml and config.DEFAULT_ARCH_OVERRIDES describe the same model (bench-1.5b uses it)."""
    from pathlib import Path

    import yaml

    from instructseg.config import DEFAULT_ARCH_OVERRIDES

    recipe = yaml.safe_load((Path(__file__).resolve().parents[1] / "scripts/recipes/default.yaml").read_text())
    assert recipe["model"] == "smol" and recipe["model_overrides"] == DEFAULT_ARCH_OVERRIDES


def test_prompt_norm_keeps_prompts_apart_and_leaves_padding_alone():
    from instructseg.model.prompt_norm import PromptNorm

    torch.manual_seed(0)
    norm = PromptNorm(8).train()
    shared = torch.randn(8) * 50  # a large component every prompt shares: what a collapsing projection produces
    x = (shared + 0.1 * torch.randn(3, 2, 8)).requires_grad_()
    valid = torch.tensor([[True, False], [True, True], [True, False]])
    out = norm(x, valid)
    rows = out[valid]
    assert torch.nn.functional.cosine_similarity(x[valid][0], x[valid][1], dim=0) > 0.99
    assert rows.mean(0).abs().max() < 1e-3 and (rows.std(0, unbiased=False) - 1).abs().max() < 1e-2
    assert torch.equal(out[~valid], x[~valid])  # padding slots pass through
    out[valid].sum().backward()  # the shared direction gets no gradient through the batch statistics
    assert x.grad[valid].sum(0).abs().max() < 1e-3
    assert norm.running_mean.abs().max() > 1  # running statistics learnt from the batch
    one = torch.zeros(1, 1, 8)
    out_one = norm(one, torch.tensor([[True]]))  # a single prompt in training: running statistics, no error
    norm.eval()
    torch.testing.assert_close(out_one, norm(one, torch.tensor([[True]])))


def test_category_heads_train_the_encoders_and_load_into_an_older_model(tmp_path):
    """semantic_classes adds per-token category logits on the vision and decoder tokens, whose loss reaches both
    encoders; a model saved without the heads loads into a config that has them (new heads), and saves/loads
    with them exactly."""
    from instructseg.train.losses import category_loss

    torch.manual_seed(0)
    plain = InstructSegModel(preset("tiny"))
    plain.save_pretrained(tmp_path / "plain")
    assert plain.category_heads is None and plain(_inputs(plain, PAIRS, video=False)).vision_class_logits is None
    cfg = json.loads((tmp_path / "plain" / "config.json").read_text())
    cfg["semantic_classes"] = 4
    (tmp_path / "plain" / "config.json").write_text(json.dumps(cfg))
    model = load_model(tmp_path / "plain").train()
    assert model.weight_sources["category_heads"] == "random init" and model.weight_sources["fusion"].startswith("trained")
    out = model(_inputs(model, PAIRS, video=False))
    grid = model.vision.grid
    assert out.vision_class_logits.shape == (2, 5, *grid)
    size = model.decoder.image_size
    assert out.decoder_class_logits.shape == (2, 5, *model.decoder.encode(torch.rand(1, 3, size, size)).size)
    maps = torch.randint(0, 5, (2, size, size))
    model.zero_grad()
    (category_loss(out.vision_class_logits, maps) + category_loss(out.decoder_class_logits, maps)).backward()
    for part in ("vision.", "decoder.sam.image_encoder.", "category_heads."):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
                   if n.startswith(part)), part
    model.save_pretrained(tmp_path / "heads")
    again = load_model(tmp_path / "heads")
    assert again.weight_sources["category_heads"].startswith("trained")
    assert torch.equal(again.category_heads.vision.weight, model.category_heads.vision.weight)


def test_word_slots_write_the_cells_words_into_the_prompt(tmp_path):
    """attribute_names / category_names add, per visual-grid cell, one `<img>` slot per vocabulary: the softmax
    mixture of the LLM's embeddings of the words (and "background"). Their heads learn from the word loss only (no
    LM gradient, nothing into the encoders); a model saved without them loads with them through overrides (new
    heads), and saves/loads them exactly."""
    from instructseg.train.losses import word_loss

    torch.manual_seed(0)
    plain = InstructSegModel(preset("tiny"))
    plain.save_pretrained(tmp_path / "plain")
    words = ["attribute_names=[red, green]", "category_names=[circle, square, star]"]
    model = load_model(tmp_path / "plain", overrides=words).train()
    grid = model.config.visual_grid
    assert model.layout.counts[IMG] == 3 * grid * grid == plain.layout.counts[IMG] * 3
    assert model.cell_words.vocabularies["category"] == ["background", "circle", "square", "star"]
    assert model.weight_sources["cell_words"] == "random init" and model.weight_sources["fusion"].startswith("trained")
    inputs = _inputs(model, PAIRS, video=False)
    out = model(inputs)
    assert {k: tuple(v.shape) for k, v in out.word_logits.items()} == {"attribute": (2, grid * grid, 3),
                                                                       "category": (2, grid * grid, 4)}
    # a head that is sure of a word writes exactly that word's embedding into its slot
    head = model.cell_words.heads["attribute"][-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 0.0, 50.0]))
    embeds = model.embed(inputs)
    slots = embeds[inputs.input_ids == model.token_ids[IMG]].reshape(2, 3 * grid * grid, -1)
    table = model.llm.get_input_embeddings()
    green = table(torch.tensor(model.tokenizer(" green", add_special_tokens=False)["input_ids"])).mean(0)
    torch.testing.assert_close(slots[:, grid * grid::2], green.expand(2, grid * grid, -1), rtol=1e-4, atol=1e-4)
    model.zero_grad()
    out = model(inputs)
    out.logits.float().pow(2).mean().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.cell_words.parameters())
    model.zero_grad()
    maps = torch.randint(0, 3, (2, model.decoder.image_size, model.decoder.image_size))
    word_loss(model(inputs).word_logits["attribute"], maps).backward()
    assert model.cell_words.heads["attribute"][-1].weight.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for n, p in model.named_parameters()
               if n.startswith(("vision.", "decoder.", "llm.")))
    model.save_pretrained(tmp_path / "words")
    again = load_model(tmp_path / "words")
    assert again.weight_sources["cell_words"].startswith("trained") and again.layout.counts[IMG] == 3 * grid * grid
    assert torch.equal(again.cell_words.heads["attribute"][-1].bias, head.bias)
    with pytest.raises(InputError, match="unknown field 'colour_names'"):
        load_model(tmp_path / "plain", overrides=["colour_names=[red]"])


def test_backward_reference_frames_are_tracked_from_the_key_frame_outwards(monkeypatch):
    """Reference frames come in time order (OVP reads them so); where they precede the key frame, SAM2 tracks
    them last first, and the tracked outputs come back in time order."""
    import dataclasses

    model = _model("tiny")
    model.train()
    inputs = dataclasses.replace(_inputs(model, PAIRS, video=True), ref_backward=torch.tensor([False, True]))
    seen = {}
    track = model.decoder.track

    def spy(features, prompts, ref_frames):  # records what the real decoder tracks through, and its outputs
        seen["frames"] = ref_frames
        seen["out"] = track(features, prompts, ref_frames)
        return seen["out"]

    monkeypatch.setattr(model.decoder, "track", spy)
    out = model(inputs)
    assert torch.equal(seen["frames"][0], inputs.ref_frames[0])
    assert torch.equal(seen["frames"][1], inputs.ref_frames[1].flip(0))
    in_track_order = torch.stack([r.mask_logits for r in seen["out"][1]], dim=1)
    assert torch.equal(out.track_mask_logits[0], in_track_order[0])
    assert torch.equal(out.track_mask_logits[1], in_track_order[1].flip(0))


def test_position_prior_reads_the_instruction_starts_as_a_no_op_and_moves_the_grounding_where_it_points(tmp_path):
    """decoder.position_prior adds a per-object map of logits, predicted from the mean word embedding of the
    instruction, to its grounding map: a model saved without it loads with it (override) and gives exactly the same
    outputs until the prior is trained; a prior that favours the bottom rows raises the grounding and the mask
    logits there and nowhere else; different instructions give different maps; inference leaves it out for videos;
    it saves and loads exactly."""
    torch.manual_seed(0)
    plain = InstructSegModel(preset("tiny")).eval()
    plain.save_pretrained(tmp_path / "plain")
    model = load_model(tmp_path / "plain", overrides=["decoder.position_prior=4"]).eval()
    assert model.weight_sources["position_prior"] == "random init"
    inputs = _inputs(model, PAIRS, video=False)
    with torch.no_grad():
        before, after = plain(inputs), model(inputs)
    torch.testing.assert_close(after.mask_logits, before.mask_logits)
    torch.testing.assert_close(after.object_align_logits, before.object_align_logits)
    prior = model.position_prior
    seen = []
    prior.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    with torch.no_grad():
        prior.linear.bias.copy_(torch.tensor([0.0] * 12 + [1.0] * 4))  # 4 x 4 grid: the bottom row
        moved = model(inputs)
    table = model.llm.get_input_embeddings()
    words = []
    for ids, mask, valid in zip(inputs.input_ids, inputs.instruction_mask, moved.object_valid):
        words += [table(ids[mask]).float().mean(0)] * int(valid.sum())
    states = torch.stack(words)
    torch.testing.assert_close(seen[0][moved.object_valid], states)  # what it reads: the instruction's words
    rise = (moved.object_align_logits - before.object_align_logits)[before.object_valid]  # (M, h, w)
    h = rise.shape[-2]
    assert float(rise[:, : h // 2].abs().max()) < 1e-4  # the top half is untouched
    assert float(rise[:, -1].min()) > 5.0  # the bottom row gains ~GROUNDING_SCALE logits
    # different instructions, different maps; what SAM2 adds to its mask logits is the grounding plus that map
    with torch.no_grad():
        prior.linear.weight.normal_(0, 0.5)
        features = model.decoder.encode(inputs.frames).select([0])
        where = prior(states[None], torch.ones(1, 3, dtype=torch.bool))  # (1, 3, 4, 4)
        assert float((where[0, 0] - where[0, 1]).abs().max()) > 0.1
        embeds = torch.randn(1, 3, model.decoder.hidden_dim)
        prompts = Prompts(embeds, torch.ones(1, 3, dtype=torch.bool), torch.randn(1, model.decoder.hidden_dim),
                          position_logits=where)
        bias = model.decoder._prompt(features, prompts)["text_bias"].view(1, 3, *features.size)
        up = torch.nn.functional.interpolate(where[0][:, None], size=features.size, mode="bilinear",
                                             align_corners=False)[:, 0]
        torch.testing.assert_close(bias, features.grounding(embeds) + up[None])
        moved = model(inputs)
    # inference applies it to still images only: a video's words may describe other frames than the key frame
    for video in (False, True):
        single = _inputs(model, PAIRS[:1], video=video)
        with torch.no_grad():
            prompts = model.condition(single, model.decoder.encode(single.frames))
        assert (prompts.position_logits is None) == video
    model.save_pretrained(tmp_path / "prior")
    again = load_model(tmp_path / "prior").eval()
    assert again.config.decoder.position_prior == 4
    assert again.weight_sources["position_prior"].startswith("trained")
    with torch.no_grad():
        torch.testing.assert_close(again(inputs).mask_logits, moved.mask_logits)


def test_position_prior_centres_states_with_running_statistics_of_valid_slots_only():
    """The prior reads states centred and scaled by running statistics: the first training batch sets them from its
    valid slots (padding ignored), later batches move them by `momentum`, evaluation and a frozen prior only read
    them; a shared component of every state (what made the maps the same for every sentence) is removed."""
    from instructseg.model.position_prior import PositionPrior

    torch.manual_seed(0)
    prior = PositionPrior(width=16, grid=2, momentum=0.5).train()
    shared = 30 * torch.randn(16)
    states = shared + torch.randn(2, 3, 16)
    valid = torch.tensor([[True, True, False], [True, False, False]])
    states[~valid] = 1000.0  # padding must not enter the statistics
    torch.nn.init.normal_(prior.linear.weight)
    out = prior(states, valid).detach()
    torch.testing.assert_close(prior.mean, states[valid].mean(0))
    torch.testing.assert_close(prior.var, states[valid].var(0))
    assert float(out[~valid].abs().max()) == 0.0
    assert float(prior(states, valid)[valid].mean(0).abs().max()) < 1e-3 * float(out[valid].abs().max()) + 1e-4
    before = prior.mean.clone()
    later = shared + 2 + torch.randn(2, 3, 16)
    prior(later, torch.ones(2, 3, dtype=torch.bool))
    torch.testing.assert_close(prior.mean, 0.5 * before + 0.5 * later.flatten(0, 1).mean(0))
    prior.eval()
    frozen = prior.mean.clone()
    prior(shared + torch.randn(2, 3, 16), torch.ones(2, 3, dtype=torch.bool))
    assert torch.equal(prior.mean, frozen) and int(prior.seen) == 3  # only training batches counted
    prior.train().requires_grad_(False)  # frozen in training (train.freeze): the statistics stay with the weights
    prior(shared + 5 + torch.randn(2, 3, 16), torch.ones(2, 3, dtype=torch.bool))
    assert torch.equal(prior.mean, frozen) and int(prior.seen) == 3
