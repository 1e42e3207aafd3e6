"""The prior stage: the position prior fitted alone on the frozen model's cached states and maps."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml

from instructseg.config import preset
from instructseg.errors import InputError
from instructseg.model.instructseg import InstructSegModel
from instructseg.train.recipe import DataSource, PriorStage, load_recipe


def _tiny_with_prior(grid: int = 4, parts: bool = False) -> InstructSegModel:
    """The tiny random model with a position prior (and a part prior with `parts`), its SAM2 made to score every
    object present (a random presence head gates most masks away, and gated objects are what the stage leaves
    out)."""
    torch.manual_seed(0)
    model = InstructSegModel(preset("tiny").override([f"decoder.position_prior={grid}",
                                                      f"decoder.part_prior={str(parts).lower()}"])).eval()
    with torch.no_grad():
        model.decoder.sam.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(20.0)
    return model


def test_the_prior_adds_to_the_decoders_mask_logits_exactly():
    """What the stage relies on: SAM2's mask logits with a prior are those without it plus the prior, upsampled
    to the grounding grid and then to the mask (so caching the masks without the prior loses nothing)."""
    from instructseg.decoders.base import Prompts, upsample_prior

    model = _tiny_with_prior()
    dec = model.decoder
    size = dec.image_size
    with torch.no_grad():
        features = dec.encode(torch.rand(2, 3, size, size))
        prompts = Prompts(object_embeds=torch.randn(2, 2, dec.hidden_dim), object_valid=torch.ones(2, 2, dtype=bool),
                          text_embed=torch.randn(2, dec.hidden_dim), position_logits=3 * torch.randn(2, 2, 4, 4))
        with_prior = dec.decode(features, prompts)
        without = dec.decode(features, dataclasses.replace(prompts, position_logits=None))
    present = with_prior.score_logits > 0
    assert bool(present.all())
    assert torch.equal(with_prior.score_logits, without.score_logits)  # the prior moves masks, not presence
    low = size // 4
    grid = upsample_prior(prompts.position_logits, features.size)
    added = F.interpolate(F.interpolate(grid.flatten(0, 1)[:, None], size=(low, low), mode="bilinear",
                                        align_corners=False), size=(size, size), mode="bilinear", align_corners=False)
    diff = (with_prior.mask_logits - without.mask_logits)[present]
    assert torch.allclose(diff, added.view(2, 2, size, size)[present], atol=1e-4)
    assert float(diff.abs().max()) > 0.5  # (a prior that does nothing would pass the line above trivially)


def test_collect_and_fit_lower_the_loss_and_set_the_statistics(synth_root):
    from instructseg.train.prior_stage import collect, fit, prior_loss

    model = _tiny_with_prior()
    sources = [DataSource(kind="refcoco", root=str(synth_root / "refcoco"), ratio=2),
               DataSource(kind="revos", root=str(synth_root / "revos"))]  # key frames of video expressions too
    cache = collect(model, sources, 12, seed=0, device=torch.device("cpu"))
    m = len(cache)
    assert m > 0
    assert cache.words.shape == (m, model.llm.config.hidden_size)
    s = model.decoder.image_size // 4
    assert cache.masks.shape == cache.mask_targets.shape == (m, s, s)
    assert cache.cosine.shape == cache.grid_targets.shape
    assert float(cache.mask_targets.max()) == 1.0 and float(cache.mask_targets.min()) == 0.0
    prior = model.position_prior
    with torch.no_grad():
        before = float(prior_loss(prior, cache))  # the prior starts at zero: the model's own maps
    losses = fit(prior, cache, PriorStage(steps=60, batch_size=64, lr=1e-2, warmup_steps=1), seed=0)
    assert len(losses) == 60
    with torch.no_grad():
        after = float(prior_loss(prior, cache))
    assert after < before - 0.05, (before, after)
    assert torch.allclose(prior.mean, cache.words.mean(0), atol=1e-4)


def test_a_saved_collection_loads_exactly_and_only_for_the_same_settings(tmp_path, synth_root):
    from instructseg.train.prior_stage import collect, load_cache, save_cache

    model = _tiny_with_prior()
    sources = [DataSource(kind="refcoco", root=str(synth_root / "refcoco"))]
    cache = collect(model, sources, 4, seed=0, device=torch.device("cpu"))
    key = {"model": "m", "samples": 4, "data": [dataclasses.asdict(s) for s in sources], "seed": 0}
    path = tmp_path / "prior_cache.safetensors"
    save_cache(cache, path, key)
    again = load_cache(path, dict(key))
    assert all(torch.equal(getattr(again, f.name), getattr(cache, f.name)) for f in dataclasses.fields(cache))
    with pytest.raises(InputError, match=r"collected with other settings \(samples, seed differ\)"):
        load_cache(path, {**key, "samples": 5, "seed": 1})
    with pytest.raises(InputError, match="no such file"):
        load_cache(tmp_path / "missing.safetensors", key)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="bad.safetensors: unreadable"):
        load_cache(tmp_path / "bad.safetensors", key)


def test_prior_stage_errors(tmp_path, synth_root):
    from instructseg.train.prior_stage import collect

    recipe = {"model": "tiny", "data": [{"kind": "refcoco", "root": str(synth_root / "refcoco")}],
              "output_dir": str(tmp_path / "run")}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(InputError, match=r"prior.samples=5 but prior.data lists no sources"):
        load_recipe(path, ["prior.samples=5"])
    with pytest.raises(InputError, match="unknown PriorStage field"):
        load_recipe(path, ["prior.sample=5"])
    with pytest.raises(InputError, match="train.steps must be at least 1, got 0"):
        load_recipe(path, ["train.steps=0"])  # no stage: nothing would train
    recipe["prior"] = {"samples": 4, "steps": 0, "data": recipe["data"]}
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(InputError, match="prior.steps and prior.batch_size must be at least 1"):
        load_recipe(path)
    assert load_recipe(path, ["prior.steps=3", "train.steps=0"]).prior.samples == 4  # the stage alone is a run
    device = torch.device("cpu")
    with pytest.raises(InputError, match="prior.fit=\\['size'\\]: expected one or more of position, parts, tracks"):
        load_recipe(path, ["prior.steps=3", "train.steps=0", "prior.fit=[size]"])
    with pytest.raises(InputError, match="no position or part prior; add decoder.position_prior"):
        collect(InstructSegModel(preset("tiny")), recipe["data"], 4, seed=0, device=device)
    chat = DataSource(kind="chat", root=str(synth_root / "chat"))
    with pytest.raises(InputError, match="source kind 'chat' has no masks"):
        collect(_tiny_with_prior(), [chat], 4, seed=0, device=device)


@pytest.mark.slow
def test_recipe_runs_the_prior_stage_and_a_resume_loads_it(tmp_path, synth_root):
    """`instructseg train` with a prior section: the stage runs before the joint steps and its prior is what the
    exported model holds (frozen here); a resumed run loads prior.safetensors instead of fitting again."""
    from safetensors.torch import load_file

    from tests.test_training import REPO, _env, _recipe, _train

    recipe = _recipe(tmp_path, synth_root, steps=1, save_every=1, freeze=["position_prior", "part_prior", "vision"])
    data = yaml.safe_load(recipe.read_text())
    base = tmp_path / "base"
    _tiny_with_prior(parts=True).save_pretrained(base)  # (its SAM2 scores objects present, see _tiny_with_prior)
    data["model"] = str(base)
    data["prior"] = {"samples": 10, "steps": 25, "batch_size": 32, "lr": 1e-2, "warmup_steps": 1,
                     "fit": ["position", "parts"],
                     "data": [{"kind": "refcoco", "root": str(synth_root / "refcoco"), "split": "train"}]}
    recipe.write_text(yaml.safe_dump(data))
    result = _train([str(recipe)])
    assert "prior stage: collecting 10 samples" in result.stdout
    rows = [json.loads(line) for line in (tmp_path / "run" / "prior.jsonl").read_text().splitlines()]
    assert [r["prior_step"] for r in rows if "prior_step" in r] == list(range(1, 26))
    parts = [r["parts_step"] for r in rows if "parts_step" in r]
    assert parts == list(range(1, 26)) or ("no object with parts" in result.stdout and not parts)
    stage = load_file(str(tmp_path / "run" / "prior.safetensors"))
    assert float(stage["linear.weight"].abs().max()) > 0
    assert {k for k in stage if k.startswith("part_prior.")} == {"part_prior.linear.weight", "part_prior.linear.bias",
                                                                 "part_prior.mean", "part_prior.var", "part_prior.seen"}

    def exported(key: str) -> str:  # prior.safetensors holds the position prior's tensors unprefixed
        return key if key.startswith("part_prior.") else "position_prior." + key

    final = InstructSegModel.from_pretrained(tmp_path / "run" / "final").state_dict()
    assert all(torch.equal(value, final[exported(key)]) for key, value in stage.items())
    result = _train([str(recipe), "train.steps=2"])
    assert "prior stage" not in result.stdout and "resuming from" in result.stdout
    final = InstructSegModel.from_pretrained(tmp_path / "run" / "final").state_dict()
    assert all(torch.equal(value, final[exported(key)]) for key, value in stage.items())
    # a new run fitting on the first run's collection: no collection, the same fit for the same fit settings
    cache = str(tmp_path / "run" / "prior_cache.safetensors")
    result = _train([str(recipe), f"output_dir={tmp_path / 'refit'}", f"prior.cache_from={cache}"])
    assert "prior stage: the collection of" in result.stdout and "collecting" not in result.stdout
    refit = load_file(str(tmp_path / "refit" / "prior.safetensors"))
    assert all(torch.allclose(value, refit[key], atol=1e-6) for key, value in stage.items())
    other = subprocess.run([sys.executable, "-m", "instructseg", "train", str(recipe), f"prior.cache_from={cache}",
                            f"output_dir={tmp_path / 'other'}", "prior.samples=11"], capture_output=True, text=True,
                           timeout=600, env=_env(), cwd=REPO)
    assert other.returncode != 0 and "collected with other settings (samples differ)" in other.stderr


def test_a_collection_is_keyed_without_the_priors_overrides(tmp_path, synth_root):
    """The collection runs without the priors, so recipes that only add or size them share a cache; any other
    override is part of the key."""
    from instructseg.train.prior_stage import collection_key

    recipe = {"model": "tiny", "data": [{"kind": "refcoco", "root": str(synth_root / "refcoco")}],
              "prior": {"samples": 4, "data": [{"kind": "refcoco", "root": str(synth_root / "refcoco")}]},
              "train": {"steps": 0}, "output_dir": str(tmp_path / "run")}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    keys = [collection_key(load_recipe(path, [f"model_overrides={o}"]))
            for o in ("[decoder.position_prior=4]", "[decoder.part_prior=true]", "[decoder.position_prior=8]", "[]")]
    assert all(k == keys[0] for k in keys) and keys[0]["model_overrides"] == []
    other = collection_key(load_recipe(path, ["model_overrides=[decoder.part_prior=true,decoder.dense_prompt=false]"]))
    assert other["model_overrides"] == ["decoder.dense_prompt=false"]


@pytest.mark.slow
def test_a_tracks_and_words_stage_fits_both_heads_without_collecting(tmp_path, synth_root):
    """`prior.fit: [tracks, words]`: ground-truth tracks and answers only (no collection); the joint steps after
    it leave both heads as they are (they are never in their loss), and they are exported with the model."""
    from safetensors.torch import load_file

    from instructseg.data.synthetic_scene import COLOURS, SHAPES
    from tests.test_training import _recipe, _train

    recipe = _recipe(tmp_path, synth_root, steps=2, save_every=2, weight_decay=0.5)
    data = yaml.safe_load(recipe.read_text())
    base = tmp_path / "base"
    torch.manual_seed(0)
    InstructSegModel(preset("tiny").override([
        "decoder.track_prior=true", "implied_words=true", f"attribute_names=[{', '.join(COLOURS)}]",
        f"category_names=[{', '.join(SHAPES)}]"])).save_pretrained(base)
    data["model"] = str(base)
    data["prior"] = {"samples": 1, "steps": 20, "batch_size": 16, "lr": 1e-2, "warmup_steps": 1,
                     "fit": ["tracks", "words"],
                     "data": [{"kind": "revos", "root": str(synth_root / "revos"), "split": "train"}]}
    recipe.write_text(yaml.safe_dump(data))
    result = _train([str(recipe)])
    assert "prior stage: the track prior and the implied words" in result.stdout and "collecting" not in result.stdout
    assert "video expressions with candidates, track loss" in result.stdout
    assert "video expressions whose answers name a word, implied-words loss" in result.stdout
    rows = [json.loads(line) for line in (tmp_path / "run" / "prior.jsonl").read_text().splitlines()]
    assert [r["tracks_step"] for r in rows if "tracks_step" in r] == list(range(1, 21))
    assert [r["words_step"] for r in rows if "words_step" in r] == list(range(1, 21))
    stage = load_file(str(tmp_path / "run" / "prior.safetensors"))
    head = ("hidden.0.weight", "hidden.0.bias", "linear.weight", "linear.bias", "mean", "var", "seen")
    assert set(stage) == {f"{name}.{k}" for name in ("track_prior", "implied_words") for k in head}
    assert float(stage["track_prior.linear.weight"].abs().max()) > 0
    assert float(stage["implied_words.linear.weight"].abs().max()) > 0
    final = InstructSegModel.from_pretrained(tmp_path / "run" / "final").state_dict()
    assert all(torch.equal(value, final[key]) for key, value in stage.items())
