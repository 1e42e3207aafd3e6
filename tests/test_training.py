"""DeepSpeed training end to end through the real `instructseg train` command (subprocesses: one and two ranks)."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from instructseg.train import checkpoints as ckpt

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"


def _recipe(tmp_path: Path, synth_root: Path, **train) -> Path:
    recipe = {
        "model": "tiny",
        "data": [
            {"kind": "refcoco", "root": str(synth_root / "refcoco"), "split": "train", "ratio": 2},
            {"kind": "revos", "root": str(synth_root / "revos"), "split": "train", "ratio": 2},
            {"kind": "chat", "root": str(synth_root / "chat"), "split": "train", "ratio": 1},
        ],
        "train": {"steps": 6, "batch_size": 2, "lr": 1e-3, "warmup_steps": 2, "save_every": 3,
                  "deepspeed": str(REPO / "scripts/ds/zero2.json"), **train},
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    return env


def _train(args: list[str], *, ranks: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    if ranks == 1:
        cmd = [sys.executable, "-m", "instructseg", "train", *args]
    else:
        cmd = [str(TORCHRUN), "--nproc_per_node", str(ranks), "--master_port", str(_port()), "-m", "instructseg",
               "train", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _word_stage(recipe: Path, synth_root: Path, head: str, steps: int, *, overrides: list[str] = (),
                **fields) -> tuple[float, float]:
    """Train `recipe` (with `fields` set) given the ShapesIVS vocabularies and `overrides`, its encoder stage
    training `head` alone for `steps` steps on the RefCOCO maps; the stage's mean loss over its first and its last
    10 steps."""
    from instructseg.data.synthetic_scene import COLOURS, SHAPES

    data = {**yaml.safe_load(recipe.read_text()), **fields}
    data["model_overrides"] = [f"attribute_names=[{', '.join(COLOURS)}]", f"category_names=[{', '.join(SHAPES)}]",
                               *overrides]
    data["encoders"] = {"steps": steps, "batch_size": 8, "lr": 3e-3, "warmup_steps": 1, "train": [head],
                        "data": [{"kind": "refcoco", "root": str(synth_root / "refcoco"), "split": "train"}]}
    recipe.write_text(yaml.safe_dump(data))
    _train([str(recipe)])
    rows = [json.loads(line) for line in (Path(data["output_dir"]) / "encoders.jsonl").read_text().splitlines()]
    return tuple(sum(r["loss"] for r in part) / 10 for part in (rows[:10], rows[-10:]))


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_ranks_zero2_train_and_export_loads(tmp_path, synth_root):
    from instructseg.model.instructseg import InstructSegModel

    recipe = _recipe(tmp_path, synth_root)
    _train([str(recipe)], ranks=2)
    run = tmp_path / "run"
    state = json.loads((run / "final" / "trainer_state.json").read_text())
    assert state == {"step": 6, "world_size": 2}
    assert ckpt.complete_steps(run / "checkpoints") == [3, 6]
    # each rank wrote its own ZeRO-2 optimizer shard
    shards = sorted(p.name for p in (run / "checkpoints" / ckpt.tag_for(6)).glob("*optim_states.pt"))
    assert len(shards) == 2
    model = InstructSegModel.from_pretrained(run / "final")
    assert model.weight_sources["lora"].startswith("trained adapter")
    assert [r["step"] for r in _log(run)] == [1, 2, 3, 4, 5, 6]
    assert (run / "tensorboard").is_dir()


@pytest.mark.slow
def test_loss_goes_down_when_overfitting(tmp_path, synth_root):
    recipe = {
        "model": "tiny",
        "data": [{"kind": "refcoco", "root": str(synth_root / "refcoco"), "split": "val", "ratio": 1}],
        # bf16 autocast (as the default recipe trains; the other tests cover fp32)
        "train": {"steps": 30, "batch_size": 2, "lr": 3e-3, "warmup_steps": 1, "save_every": 100, "cpu_bf16": True,
                  "deepspeed": str(REPO / "scripts/ds/zero2.json")},
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "overfit.yaml"
    path.write_text(yaml.safe_dump(recipe))
    _train([str(path)])
    losses = [r["loss"] for r in _log(tmp_path / "run")]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)


@pytest.mark.slow
def test_sigkill_mid_run_resumes_with_the_right_step_count(tmp_path, synth_root):
    recipe = _recipe(tmp_path, synth_root, steps=12, save_every=2)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "instructseg", "train", str(recipe)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and (ckpt.latest_complete(run / "checkpoints") or 0) < 4:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = ckpt.latest_complete(run / "checkpoints")
    assert killed_at is not None and 4 <= killed_at < 12, killed_at
    assert not (run / "final").exists()
    # a half-written save (what a kill during saving leaves) is never taken for a checkpoint
    partial = run / "checkpoints" / ckpt.tag_for(99)
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    result = _train([str(recipe)])
    assert f"resuming from {run / 'checkpoints'}" in result.stdout
    assert json.loads((run / "final" / "trainer_state.json").read_text())["step"] == 12
    assert not partial.exists()
    steps = [r["step"] for r in _log(run)]
    assert steps[-1] == 12 and set(steps) == set(range(1, 13))
    assert ckpt.complete_steps(run / "checkpoints") == [10, 12]  # keep_checkpoints=2


def test_checkpoint_markers_and_pruning(tmp_path):
    root = tmp_path / "ck"
    for step in (2, 4, 6):
        (root / ckpt.tag_for(step)).mkdir(parents=True)
        ckpt.mark_complete(root, step, {})
    (root / ckpt.tag_for(8)).mkdir()  # no marker: a save that was cut short
    assert ckpt.complete_steps(root) == [2, 4, 6]
    assert ckpt.latest_complete(root) == 6
    ckpt.prune(root, keep=2)
    assert sorted(p.name for p in root.iterdir()) == [ckpt.tag_for(4), ckpt.tag_for(6)]


@pytest.mark.parametrize("path", sorted((REPO / "scripts/recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load(path):
    """Every recipe in scripts/recipes parses with the current schema (unknown keys are errors), and its data
    roots are relative paths inside the repository (recipes run from its root)."""
    from instructseg.train.recipe import load_recipe

    recipe = load_recipe(path)
    stages = recipe.encoders.steps > 0 or recipe.prior.samples > 0
    assert (recipe.train.steps > 0 or stages) and recipe.data and all(s.ratio > 0 for s in recipe.data)
    for source in recipe.data + recipe.encoders.data + recipe.prior.data:
        root = Path(source.root)
        assert not root.is_absolute() and (REPO / root).resolve().is_relative_to(REPO), source.root


def test_recipe_overrides_and_errors(tmp_path, synth_root):
    from instructseg.errors import InputError
    from instructseg.train.recipe import load_recipe

    path = _recipe(tmp_path, synth_root)
    recipe = load_recipe(path, ["train.steps=3", "model.llm.lora_r=2", "output_dir=elsewhere"])
    assert recipe.train.steps == 3 and recipe.model_overrides == ["llm.lora_r=2"] and recipe.output_dir == "elsewhere"
    assert recipe.deepspeed_config_path().name == "zero2.json"
    with pytest.raises(InputError, match="recipe not found"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(InputError, match="unknown TrainSettings field"):
        load_recipe(path, ["train.stpes=3"])
    for item, message in (("train.steps=abc", "TrainSettings.steps: expected int"),
                          ("train.steps=0", "train.steps must be at least 1"), ("train.lr=-1", "train.lr must be > 0"),
                          ("train.steps=[1", "not valid YAML"), ("model.llm.nope=1", "unknown field 'llm.nope'"),
                          ("model.llm.lora_r=x", "LLMConfig.lora_r: expected int")):
        with pytest.raises(InputError, match=message):
            load_recipe(path, [item])
    assert load_recipe(path, ["train.lr=1e-4"]).train.lr == 1e-4
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: tiny\ndata: []\n")
    with pytest.raises(InputError, match="no data sources"):
        load_recipe(bad)


def test_resume_refuses_another_model_or_optimizer(tmp_path, synth_root):
    from instructseg.errors import InputError
    from instructseg.train import checkpoints as ckpt
    from instructseg.train.recipe import load_recipe, recipe_to_dict
    from instructseg.train.trainer import resume_changes

    path = _recipe(tmp_path, synth_root)
    recipe = load_recipe(path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.json").write_text(json.dumps(recipe_to_dict(recipe)))
    assert resume_changes(load_recipe(path, ["model.llm.lora_r=2"])) == (None, [])  # no checkpoint: a fresh run
    (run / "checkpoints" / ckpt.tag_for(3)).mkdir(parents=True)
    ckpt.mark_complete(run / "checkpoints", 3, {"world_size": 1})
    assert resume_changes(recipe) == (3, [])
    assert resume_changes(load_recipe(path, ["train.steps=9", "train.save_every=1"])) == (3, [
        "train.save_every", "train.steps"])
    for item, message in (("model.llm.lora_r=2", "other model_overrides"), ("train.lr=0.5", "train.lr: 0.001 there, "
                                                                                        "0.5 now"),
                          ("train.freeze=[vision]", "other train.freeze")):
        with pytest.raises(InputError, match=message):
            resume_changes(load_recipe(path, [item]))
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(InputError, match="a_file: exists and is not a directory"):
        resume_changes(load_recipe(path, [f"output_dir={tmp_path / 'a_file'}"]))


def test_cli_train_bad_recipe_is_one_line(tmp_path, capsys):
    from instructseg.cli import main

    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "recipe not found" in err[0]


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny", "tiny-m2f"])
def test_two_ranks_zero3_train_and_export_loads(tmp_path, synth_root, preset):
    """ZeRO-3 partitions parameters across the ranks (scripts/ds/zero3.json keeps those under 1e6 elements whole,
    after gathering them once); parameters read outside a module call are gathered through the decoder's.
    With category heads: batches with and without category maps (RefCOCO vs the rest) train alike on both ranks."""
    from instructseg.model.instructseg import InstructSegModel

    recipe = _recipe(tmp_path, synth_root, steps=3, save_every=3, deepspeed=str(REPO / "scripts/ds/zero3.json"))
    recipe.write_text(recipe.read_text().replace("model: tiny", f"model: {preset}\nmodel_overrides: [semantic_classes=5]"))
    _train([str(recipe)], ranks=2)
    run = tmp_path / "run"
    assert [r["step"] for r in _log(run)] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in _log(run))
    assert any(math.isfinite(r.get("category_decoder", math.nan)) for r in _log(run))  # rank 0 saw a map
    model = InstructSegModel.from_pretrained(run / "final")
    assert model.category_heads is not None
    assert model.config.decoder.kind == {"tiny": "sam2", "tiny-m2f": "mask2former"}[preset]


def test_encoder_stage_learns_categories_and_is_skipped_on_resume(tmp_path, synth_root):
    """A fresh run first generates the stage's own images, then trains the encoders on their category maps
    (encoders.jsonl: one row per step, loss falling); a run resumed from a checkpoint does not repeat the stage
    but loads its result (its frozen encoders are not in the checkpoints), and refuses to go on without it."""
    import torch

    recipe = _recipe(tmp_path, synth_root, steps=2, save_every=2, freeze=["vision"])
    data = yaml.safe_load(recipe.read_text())
    data["model_overrides"] = ["semantic_classes=5"]
    enc = tmp_path / "enc"
    data["encoders"] = {"steps": 40, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1,
                        "synth": {"out": str(enc), "seed": 3, "videos": 0, "images": 16, "size": [64, 64]},
                        "data": [{"kind": "refcoco", "root": str(enc / "refcoco"), "split": "train"}]}
    recipe.write_text(yaml.safe_dump(data))
    result = _train([str(recipe)])
    assert "encoder stage: 40 steps" in result.stdout
    rows = [json.loads(line) for line in (tmp_path / "run" / "encoders.jsonl").read_text().splitlines()]
    assert [r["encoder_step"] for r in rows] == list(range(1, 41))
    first, last = (sum(r["loss"] for r in part) / 5 for part in (rows[:5], rows[-5:]))
    assert last < 0.7 * first, (first, last)
    result = _train([str(recipe), "train.steps=3"])
    assert "encoder stage" not in result.stdout and "resuming from" in result.stdout
    assert len((tmp_path / "run" / "encoders.jsonl").read_text().splitlines()) == 40
    # more steps are a change a resume may make: the recipe of the first two steps stays on record
    assert "resuming at step 2 with changed train.steps" in result.stdout
    assert json.loads((tmp_path / "run" / "recipe.until_step2.json").read_text())["train"]["steps"] == 2
    assert json.loads((tmp_path / "run" / "recipe.json").read_text())["train"]["steps"] == 3
    # the frozen ViT of the resumed run is the stage's (checkpoints leave frozen parameters out)
    from safetensors.torch import load_file

    from instructseg.model.instructseg import InstructSegModel

    stage = load_file(str(tmp_path / "run" / "encoders.safetensors"))
    final = InstructSegModel.from_pretrained(tmp_path / "run" / "final").state_dict()
    vision = [k for k in stage if k.startswith("vision.")]
    assert vision and all(torch.equal(stage[k], final[k]) for k in vision)
    (tmp_path / "run" / "encoders.safetensors").unlink()
    missing = subprocess.run([sys.executable, "-m", "instructseg", "train", str(recipe), "train.steps=4"],
                             capture_output=True, text=True, env=_env(), cwd=REPO)
    assert missing.returncode == 2 and "encoders.safetensors: missing" in missing.stderr


def test_encoder_stage_errors(tmp_path, synth_root):
    """Clear errors: encoder steps without sources, a source without category maps, a model without heads."""
    import torch

    from instructseg.config import preset
    from instructseg.errors import InputError
    from instructseg.model.instructseg import InstructSegModel
    from instructseg.train.encoders import train_encoders
    from instructseg.train.recipe import DataSource, EncoderStage, load_recipe

    path = _recipe(tmp_path, synth_root)
    with pytest.raises(InputError, match=r"encoders.steps=5 but encoders.data lists no sources"):
        load_recipe(path, ["encoders.steps=5"])
    with pytest.raises(InputError, match="unknown EncoderStage field"):
        load_recipe(path, ["encoders.stepz=5"])
    refcoco = DataSource(kind="refcoco", root=str(synth_root / "refcoco"))
    torch.manual_seed(0)
    plain = InstructSegModel(preset("tiny"))
    with pytest.raises(InputError, match="no category heads, word slots or region words; set semantic_classes"):
        train_encoders(plain, EncoderStage(steps=1, data=[refcoco]), seed=0, device=torch.device("cpu"))
    heads = InstructSegModel(preset("tiny").override(["semantic_classes=5"]))
    videos = DataSource(kind="revos", root=str(synth_root / "revos"))
    with pytest.raises(InputError, match="source kind 'revos' has no category maps"):
        train_encoders(heads, EncoderStage(steps=1, data=[videos]), seed=0, device=torch.device("cpu"))
    small = InstructSegModel(preset("tiny").override(["semantic_classes=2"]))  # the data has 5 categories
    with pytest.raises(InputError, match="category map holds class 5"):
        train_encoders(small, EncoderStage(steps=3, data=[refcoco]), seed=0, device=torch.device("cpu"))


def test_word_slots_added_to_a_trained_model_learn_in_the_encoder_stage(tmp_path, synth_root):
    """A saved model gets word slots through model_overrides; `encoders.train: [cell_words]` trains only their
    heads (on the category and attribute maps; loss falling), the joint training then runs with them, and the
    final model holds them, the encoders untouched."""
    import torch
    from safetensors.torch import load_file

    from instructseg.config import preset
    from instructseg.model.instructseg import InstructSegModel

    torch.manual_seed(0)
    InstructSegModel(preset("tiny")).save_pretrained(tmp_path / "base")
    recipe = _recipe(tmp_path, synth_root, steps=2, save_every=2, freeze=["vision", "decoder.sam.image_encoder"])
    first, last = _word_stage(recipe, synth_root, "cell_words", 60, model=str(tmp_path / "base"))
    assert last < 0.6 * first, (first, last)
    final = InstructSegModel.from_pretrained(tmp_path / "run" / "final")
    assert set(load_file(str(tmp_path / "run" / "encoders.safetensors"))) == {
        k for k in final.state_dict() if k.startswith("cell_words.")}
    assert any("words_attribute" in r for r in _log(tmp_path / "run"))
    base = InstructSegModel.from_pretrained(tmp_path / "base").state_dict()
    assert final.layout.counts["<img>"] == 3 * final.config.visual_grid ** 2
    state = final.state_dict()
    assert all(torch.equal(base[k], state[k]) for k in base if k.startswith(("vision.", "decoder.sam.image_encoder.")))


def test_region_words_learn_alone_in_the_encoder_stage_and_keep_their_weights(tmp_path, synth_root):
    """`encoders.train: [region_words]` trains the region words alone, on the instances of the category and
    attribute maps (loss falling); the joint steps afterwards leave them as they are, and the final model holds
    them."""
    import torch
    from safetensors.torch import load_file

    from instructseg.model.instructseg import InstructSegModel

    recipe = _recipe(tmp_path, synth_root, steps=2, save_every=2)
    first, last = _word_stage(recipe, synth_root, "region_words", 100, overrides=["region_words=true"])
    assert last < 0.7 * first, (first, last)
    stage = load_file(str(tmp_path / "run" / "encoders.safetensors"))
    final = InstructSegModel.from_pretrained(tmp_path / "run" / "final").state_dict()
    assert set(stage) == {k for k in final if k.startswith("region_words.")}
    assert all(torch.equal(stage[k], final[k]) for k in stage)


def test_frozen_modules_keep_their_weights(tmp_path, synth_root):
    """train.freeze: the named modules come out of training as they went in, the rest trains; an unknown prefix is
    a one-line error."""
    import torch

    from instructseg.config import preset
    from instructseg.model.instructseg import InstructSegModel

    recipe = _recipe(tmp_path, synth_root, steps=2, save_every=2, freeze=["vision", "decoder.sam.image_encoder.trunk"],
                     lr_scale={"fusion": 3.0})  # (an LR group of its own goes through DeepSpeed too)
    _train([str(recipe)])
    torch.manual_seed(0)  # the trainer builds a preset under train.seed
    initial = InstructSegModel(preset("tiny")).state_dict()
    trained = InstructSegModel.from_pretrained(tmp_path / "run" / "final").state_dict()
    for key in ("vision.", "decoder.sam.image_encoder.trunk.", "fusion.", "decoder.sam.image_encoder.neck."):
        same = all(torch.equal(initial[k], trained[k]) for k in initial if k.startswith(key))
        assert same == (key in ("vision.", "decoder.sam.image_encoder.trunk.")), key
    bad = subprocess.run([sys.executable, "-m", "instructseg", "train", str(recipe), "train.freeze=[visoin]",
                          f"output_dir={tmp_path / 'bad'}"], capture_output=True, text=True, env=_env(), cwd=REPO)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == \
        "instructseg: error: train.freeze: no parameters under 'visoin'"


def test_lr_scale_puts_prefixes_in_their_own_groups_and_refuses_bad_entries():
    """train.lr_scale: the parameters under a prefix train at lr x its multiplier, everything else trainable at lr
    (frozen parameters in no group); a prefix with nothing trainable or a non-positive multiplier is an error."""
    import torch

    from instructseg.config import preset
    from instructseg.errors import InputError
    from instructseg.model.instructseg import InstructSegModel
    from instructseg.train.trainer import _freeze, _param_groups

    torch.manual_seed(0)
    model = InstructSegModel(preset("tiny").override(["decoder.position_prior=4"]))
    _freeze(model, ["vision"])
    rest, prior = _param_groups(model, 1e-4, {"position_prior": 20})
    assert prior["lr"] == pytest.approx(2e-3) and rest["lr"] == 1e-4
    assert {id(p) for p in prior["params"]} == {id(p) for p in model.position_prior.parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in rest["params"]} | {id(p) for p in prior["params"]} == trainable
    assert not any(id(p) in trainable for p in model.vision.parameters())
    with pytest.raises(InputError, match="no trainable parameters under 'vision'"):
        _param_groups(model, 1e-4, {"vision": 2})
    with pytest.raises(InputError, match="positive multiplier"):
        _param_groups(model, 1e-4, {"fusion": 0})
