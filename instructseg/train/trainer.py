"""The training loop on a DeepSpeed engine: one process or many (torchrun / deepspeed launcher), CPU (gloo; fp32 or
bf16 autocast) or GPU (nccl; bf16 autocast, fp32 weights). Checkpoints every N steps; re-running the same command
resumes from the newest complete one with the same step counter, optimizer, scheduler and sampler state. The end
exports `output_dir/final` with `save_pretrained`, which `InstructSegModel.from_pretrained` (and the predictor) load.
"""
from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path

import torch

from instructseg.config import describe_differences, differing_keys
from instructseg.errors import InputError
from instructseg.train import checkpoints as ckpt
from instructseg.train.recipe import Recipe, recipe_to_dict
from instructseg.train.samples import SampleStream


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device). A plain single process gets a one-rank group of its own."""
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False)
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), device


def build_model(recipe: Recipe):
    from instructseg.config import PRESETS, preset
    from instructseg.model.checkpoint import load_model
    from instructseg.model.instructseg import InstructSegModel

    if recipe.model in PRESETS and not Path(recipe.model).exists():
        torch.manual_seed(recipe.train.seed)
        return InstructSegModel(preset(recipe.model).override(recipe.model_overrides))
    return load_model(recipe.model, overrides=recipe.model_overrides)


def _ensure_synth(recipe: Recipe, rank: int) -> None:
    import torch.distributed as dist

    from instructseg.data.synthetic import generate

    for s in (recipe.synth, recipe.encoders.synth):
        if s is not None and rank == 0 and not Path(s.out).exists():
            generate(Path(s.out), s.spec())
    dist.barrier()


def _freeze(model, prefixes: list[str]) -> None:
    """Parameters under the module prefixes in `prefixes` stop training."""
    for prefix in prefixes:
        matched = [p for name, p in model.named_parameters() if name == prefix or name.startswith(prefix + ".")]
        if not matched:
            raise InputError(f"train.freeze: no parameters under {prefix!r}")
        for param in matched:
            param.requires_grad_(False)


def _param_groups(model, lr: float, scales: dict[str, float]) -> list[dict]:
    """The trainable parameters as optimizer groups: one per `scales` prefix (at lr x its multiplier), then the
    rest at `lr`. A prefix that names no trainable parameter, or a multiplier that is not positive, is refused."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups, taken = [], set()
    for prefix, scale in scales.items():
        if not scale > 0:
            raise InputError(f"train.lr_scale.{prefix}: expected a positive multiplier, got {scale!r}")
        params = [p for name, p in trainable if (name == prefix or name.startswith(prefix + ".")) and name not in taken]
        if not params:
            raise InputError(f"train.lr_scale: no trainable parameters under {prefix!r}")
        taken.update(name for name, p in trainable if name == prefix or name.startswith(prefix + "."))
        groups.append({"params": params, "lr": lr * scale})
    rest = [p for name, p in trainable if name not in taken]
    return ([{"params": rest, "lr": lr}] if rest else []) + groups


def _schedule(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _deepspeed_config(recipe: Recipe, world: int) -> dict:
    path = recipe.deepspeed_config_path()
    config = json.loads(path.read_text())
    config["train_micro_batch_size_per_gpu"] = recipe.train.batch_size
    config["gradient_accumulation_steps"] = recipe.train.grad_accum
    config["train_batch_size"] = recipe.train.batch_size * recipe.train.grad_accum * world
    # mixed precision is torch's autocast in the step (fp32 weights, bf16 matmuls), as on the CPU: DeepSpeed's bf16
    # mode casts the module but not the buffers and inputs our modules combine with it
    config["bf16"] = {"enabled": False}
    return config


# What a resumed run restores and so cannot change: the model's shapes and the optimizer's state.
FIXED_ON_RESUME = ("model", "model_overrides", "train.lr", "train.lr_scale", "train.weight_decay", "train.freeze",
                   "train.deepspeed")


def resume_changes(recipe: Recipe) -> tuple[int | None, list[str]]:
    """(the step the run in `output_dir` resumes from, or None for a fresh run; the recipe keys, top level and
    "train.*", that differ from that run's). InputError when output_dir is a file or one of FIXED_ON_RESUME
    differs. Other changes are allowed: more steps, another data mix (how the shipped model's stages continue)."""
    out = Path(recipe.output_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"output_dir={out}: exists and is not a directory")
    step, saved = ckpt.latest_complete(out / "checkpoints"), out / "recipe.json"
    if step is None or not saved.is_file():
        return step, []
    try:
        before = _flat(json.loads(saved.read_text()))
    except ValueError as err:
        raise InputError(f"{saved}: not valid JSON ({err}); move the run away or choose another output_dir") from None
    now = _flat(recipe_to_dict(recipe))
    changed = [k for k in differing_keys(before, now) if k != "recipe_dir"]
    fixed = [k for k in changed if k in FIXED_ON_RESUME]
    if fixed:
        raise InputError(f"output_dir={out} holds a run with other {', '.join(fixed)} ("
                         f"{describe_differences(fixed, before, now)}): a resumed run keeps its model and optimizer; "
                         "use the same values or another output_dir")
    return step, changed


def _flat(recipe: dict) -> dict:
    """A recipe dict with the train section's keys as "train.<key>"."""
    flat = {k: v for k, v in recipe.items() if k != "train"}
    flat.update({f"train.{k}": v for k, v in recipe.get("train", {}).items()})
    return flat


class Trainer:
    """Holds the engine, the data stream and the bookkeeping of one run."""

    def __init__(self, recipe: Recipe):
        import deepspeed

        from instructseg.data.collate import Collator
        from instructseg.train.losses import SegmentationLoss

        self.recipe = recipe
        self.out = Path(recipe.output_dir)
        self.root = self.out / "checkpoints"
        self.resume_step, self.changed = resume_changes(recipe)  # before anything slow: a bad resume stops here
        self.rank, self.world, self.device = init_distributed()
        _ensure_synth(recipe, self.rank)
        model = build_model(recipe)
        model.train()
        if recipe.encoders.steps > 0:
            self._encoder_stage(model)
        if recipe.prior.samples > 0:
            self._prior_stage(model)
        _freeze(model, recipe.train.freeze)
        # never in the joint loss (only their stages train them): kept as they are, not worn down by weight decay on
        # gradients never got
        for head in (model.track_prior, model.region_words, model.implied_words):
            if head is not None:
                head.requires_grad_(False)
        self.model = model
        self.cuda = self.device.type == "cuda"
        collate = Collator(model.layout, model.decoder.image_size, model.tokenizer.pad_token_id,
                           num_ref_frames=self.recipe.train.num_ref_frames or model.config.perceiver.num_ref_frames)
        self.samples = self._data(model, collate)
        self.loss = SegmentationLoss(recipe.train.loss, matching=model.config.decoder.kind == "mask2former")
        params = _param_groups(model, recipe.train.lr, recipe.train.lr_scale)
        optimizer = torch.optim.AdamW(params, lr=recipe.train.lr, weight_decay=recipe.train.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(recipe.train.warmup_steps,
                                                                           recipe.train.steps))
        ds_config = _deepspeed_config(recipe, self.world)
        if ds_config.get("zero_optimization", {}).get("stage") == 3:
            # ZeRO-3 gathers a module's parameters around its calls (and, through hooks on the tensors it
            # returns, for the backward): parameters read outside any module call must be declared
            for param in model.decoder.external_parameters():
                deepspeed.zero.register_external_parameter(model.decoder, param)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, model_parameters=params, config=ds_config)

        self.step = 0

    def _stage_log(self, name: str, message: str) -> Path | None:
        """Rank 0: print `message` and return a fresh OUTPUT/`name` for the stage's losses (an interrupted stage
        starts again); other ranks: None."""
        if self.rank != 0:
            return None
        self.out.mkdir(parents=True, exist_ok=True)
        log = self.out / name
        log.unlink(missing_ok=True)
        print(message, flush=True)
        return log

    def _encoder_stage(self, model) -> None:
        """Run the stage on a fresh run; on a resumed one, load its result."""
        import torch.distributed as dist

        from instructseg.train.encoders import RESULT, load_result, save_result, train_encoders

        if ckpt.latest_complete(self.root) is not None:
            load_result(model, self.out / RESULT, self.recipe.encoders.train)
            return
        log = self._stage_log("encoders.jsonl", f"encoder stage: {self.recipe.encoders.steps} steps")
        model.to(self.device)
        losses = train_encoders(model, self.recipe.encoders, seed=self.recipe.train.seed, device=self.device,
                                log_path=log)
        if self.rank == 0:
            save_result(model, self.out / RESULT, self.recipe.encoders.train)
            print(f"encoder stage: loss {losses[0]:.3f} -> {sum(losses[-20:]) / len(losses[-20:]):.3f}",
                  flush=True)
        dist.barrier()

    def _prior_stage(self, model) -> None:
        """Run the stage on a fresh run; on a resumed one, load its result (every rank computes the same fit)."""
        import torch.distributed as dist

        from instructseg.train.implied_fit import fit_implied
        from instructseg.train.prior_stage import RESULT, fit, fit_parts, load_result, save_result
        from instructseg.train.track_fit import fit_tracks

        if ckpt.latest_complete(self.root) is not None:
            load_result(model, self.out / RESULT)
            return
        stage = self.recipe.prior
        heads = {"position": (model.position_prior, "position prior", "decoder.position_prior=G"),
                 "parts": (model.part_prior, "part prior", "decoder.part_prior=true"),
                 "tracks": (model.track_prior, "track prior", "decoder.track_prior=true"),
                 "words": (model.implied_words, "implied words", "implied_words=true")}
        for name in stage.fit:
            head, what, override = heads[name]
            if head is None:
                raise InputError(f"prior.fit lists {name}, but the model has no {what}; add {override} to "
                                 "model_overrides")
        model.to(self.device)
        report = ["prior stage:"]
        trend = lambda losses: f"{losses[0]:.3f} -> {sum(losses[-20:]) / len(losses[-20:]):.3f}"  # noqa: E731
        seed = self.recipe.train.seed
        if {"position", "parts"} & set(stage.fit):
            cache, log = self._prior_cache(model, stage)
            report.append(f"{len(cache)} objects")
            if "position" in stage.fit:
                losses = fit(model.position_prior, cache, stage, seed=seed, log_path=log)
                report.append(f"position loss {trend(losses)}")
            if "parts" in stage.fit:
                count, losses = fit_parts(model, cache, stage, seed=seed, log_path=log)
                report.append(f"{count} with parts, part loss {trend(losses)}" if losses
                              else "no object with parts: the part prior is left as it is")
        else:
            log = self._stage_log("prior.jsonl", "prior stage: " + " and ".join(f"the {heads[name][1]}"
                                                                                for name in stage.fit))
        if "tracks" in stage.fit:
            count, losses = fit_tracks(model, stage, seed=seed, log_path=log)
            report.append(f"{count} video expressions with candidates, track loss {trend(losses)}")
        if "words" in stage.fit:
            count, losses = fit_implied(model, stage, seed=seed, log_path=log)
            report.append(f"{count} video expressions whose answers name a word, implied-words loss {trend(losses)}")
        if self.rank == 0:
            save_result(model, self.out / RESULT)
            print(report[0], ", ".join(report[1:]), flush=True)
        dist.barrier()

    def _prior_cache(self, model, stage):
        """The prior stage's collection (collected now, or read from `prior.cache_from`) on this device, and the
        stage's log."""
        from instructseg.train.prior_stage import CACHE, collect, collection_key, load_cache, save_cache

        key = collection_key(self.recipe)
        if stage.cache_from:
            log = self._stage_log("prior.jsonl", f"prior stage: the collection of {stage.cache_from}")
            cache = load_cache(Path(stage.cache_from), key)
        else:
            log = self._stage_log("prior.jsonl", f"prior stage: collecting {stage.samples} samples")
            cache = collect(model, stage.data, stage.samples, seed=self.recipe.train.seed, device=self.device,
                            jump=self.recipe.train.jump, progress=self.rank == 0)
            if self.rank == 0:
                save_cache(cache, self.out / CACHE, key)
        return cache.to(self.device), log

    def _data(self, model, collate):
        from instructseg.data.mixture import MixtureSampler
        from instructseg.data.training import build_source

        num_ref = self.recipe.train.num_ref_frames or model.config.perceiver.num_ref_frames
        datasets, ratios = {}, {}
        for i, source in enumerate(self.recipe.data):
            name = f"{i}:{source.kind}:{source.split}"
            datasets[name] = build_source(source.kind, Path(source.root), source.split, num_ref_frames=num_ref,
                                          jump=self.recipe.train.jump, seed=self.recipe.train.seed)
            ratios[name] = source.ratio
        sampler = MixtureSampler({n: len(d) for n, d in datasets.items()}, ratios, seed=self.recipe.train.seed,
                                 rank=self.rank, world_size=self.world)
        return SampleStream(datasets, sampler, self.recipe.train.batch_size, collate, workers=self.recipe.train.workers)

    # -- checkpoints ----------------------------------------------------------------------------------------
    def resume(self) -> None:
        step = ckpt.latest_complete(self.root)
        if step is None:
            return
        saved = json.loads((self.root / ckpt.tag_for(step) / ckpt.MARKER).read_text()).get("world_size", self.world)
        if saved != self.world:
            raise InputError(f"{self.root / ckpt.tag_for(step)}: written by {saved} process(es), this run has "
                             f"{self.world}; resume with the same number or choose another output_dir")
        _, client = self.engine.load_checkpoint(str(self.root), tag=ckpt.tag_for(step), load_module_strict=False)
        self.samples.load_state_dict(client["sampler"])
        self.step = client["step"]
        if self.rank == 0:
            print(f"resuming from {self.root / ckpt.tag_for(step)} at step {self.step}", flush=True)

    def save(self) -> None:
        import torch.distributed as dist

        client = {"step": self.step, "sampler": self.samples.state_dict()}
        self.engine.save_checkpoint(str(self.root), tag=ckpt.tag_for(self.step), client_state=client,
                                    save_latest=False, exclude_frozen_parameters=True)
        dist.barrier()
        if self.rank == 0:
            ckpt.mark_complete(self.root, self.step, {"world_size": self.world, "time": time.time()})
            ckpt.prune(self.root, self.recipe.train.keep_checkpoints)
        dist.barrier()

    # -- the loop -------------------------------------------------------------------------------------------
    def micro_batch(self):
        inputs, masks, ref_masks = self.samples.next_batch()
        ref_masks = [m.to(self.device) for m in ref_masks] if ref_masks is not None else None
        return inputs.to(self.device), [m.to(self.device) for m in masks], ref_masks

    def train_step(self) -> dict[str, float]:
        parts: dict[str, float] = {}
        bf16 = self.cuda or self.recipe.train.cpu_bf16
        for _ in range(self.recipe.train.grad_accum):
            inputs, masks, ref_masks = self.micro_batch()
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
                out = self.engine(inputs)
                loss = self.loss(out, inputs.labels, masks, ref_masks, inputs.semantic, inputs.attributes)
            self.engine.backward(loss.total)
            self.engine.step()
            for key, value in {"loss": float(loss.total.detach()), **loss.parts}.items():
                parts[key] = parts.get(key, 0.0) + value / self.recipe.train.grad_accum
        self.step += 1
        return parts

    def run(self) -> Path:
        from tqdm import tqdm

        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.changed:  # the recipe the earlier steps ran with stays on record
                kept = self.out / f"recipe.until_step{self.resume_step}.json"
                if not kept.exists():  # (a resume that died before its first save already kept it)
                    (self.out / "recipe.json").rename(kept)
                print(f"resuming at step {self.resume_step} with changed {', '.join(self.changed)}; the earlier "
                      f"recipe is kept as {kept}", flush=True)
            (self.out / "recipe.json").write_text(json.dumps(recipe_to_dict(self.recipe), indent=2))
            ckpt.prune(self.root, self.recipe.train.keep_checkpoints)  # drop saves a kill left half-written
        self.resume()
        total = self.recipe.train.steps
        writer = _tensorboard(self.out) if self.rank == 0 else None
        bar = tqdm(total=total, initial=self.step, disable=self.rank != 0, desc="train", dynamic_ncols=True)
        while self.step < total:
            parts = self.train_step()
            bar.update(1)
            if self.rank == 0 and self.step % self.recipe.train.log_every == 0:
                lr = self.scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{parts['loss']:.4f}", lr=f"{lr:.2e}")
                for key, value in parts.items():
                    writer.add_scalar(f"train/{key}", value, self.step)
                writer.add_scalar("train/lr", lr, self.step)
                _append_log(self.out / "log.jsonl", {"step": self.step, "time": round(time.time(), 3), "lr": lr,
                                                     **parts})
            if self.step % self.recipe.train.save_every == 0 or self.step == total:
                self.save()
        bar.close()
        self.samples.close()
        if writer is not None:
            writer.close()
        return self.export()

    def export(self) -> Path:
        import deepspeed
        import torch.distributed as dist

        final = self.out / "final"
        zero3 = self.engine.zero_optimization_stage() == 3
        params = list(self.model.parameters()) if zero3 else []
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=zero3):
            if self.rank == 0:
                self.model.float().save_pretrained(final, merge_lora=self.recipe.train.merge_lora)
                ckpt.write_json(final / "trainer_state.json", {"step": self.step, "world_size": self.world})
        dist.barrier()
        return final


def _tensorboard(out: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(out / "tensorboard"))


def _append_log(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def train(recipe: Recipe) -> Path:
    return Trainer(recipe).run()
