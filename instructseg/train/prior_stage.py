"""The prior stage of a recipe: the position prior (`instructseg.model.position_prior`) and the part prior
(`instructseg.model.part_prior`) fitted alone, on the frozen model's own maps, before any joint training.

Why: trained inside joint training, the prior sees 8 sentences a step, each with a step that also moves the rest of
the model; on a CPU that is ~5 s per step, and in 600 steps a linear prior learnt position words only to half a
logit, while a faster LR made its maps chase each sample's target (docs/default_model.md). With everything else
frozen, what the prior needs from a sentence does not change while it trains: the instruction's words (what the
prior reads), the cosine grounding map of the object's embedding and the mask logits SAM2 decodes for it without
the prior. The stage collects those once (`collect`: one no-gradient pass per sentence) and then fits the prior on
them in large batches (`fit`: hundreds of steps of hundreds of sentences in seconds). The mask logits are exact,
not an approximation: the prior is added to the grounding map, which is added (bilinearly upsampled) to SAM2's mask
logits after its mask decoder, so the decoder's output with the prior is the output without it plus the upsampled
prior.

The loss is the joint training's on these maps: mask BCE + dice (at a quarter of the decoder's resolution) and the
grounding loss (BCE + dice + in-image contrastive on the coarse grid), with the same weights. Objects SAM2 scores
absent are left out (their masks are gated to a constant the prior cannot move). The stage's result is written to
`OUTPUT/prior.safetensors`; a run that resumes from a checkpoint loads it instead of running the stage again.
The part prior is fitted after the position prior, on the parts of the cached masks with the position prior added
(`fit_parts`): the same mask loss, with each part raised or lowered as at inference.
The collection itself is kept in `OUTPUT/prior_cache.safetensors` (about 37 KB an object: 190 MB for 5000), so that
another fit (other steps, LR, batch) is a minute's work: a recipe's `prior.cache_from: PATH` reads it instead of
collecting, after checking that it was collected for the same model, data, samples, seed and jump.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from instructseg.errors import InputError
from instructseg.llm.precision import native_bf16
from instructseg.train.losses import LossWeights, dice_loss, grounding_map_loss, sigmoid_bce
from instructseg.train.rows import Rows
from instructseg.train.stage_steps import run_steps

RESULT = "prior.safetensors"
CACHE = "prior_cache.safetensors"
MASK_SCALE = 4  # the mask term is computed at 1/4 of the decoder's resolution (SAM2's own low-res masks)


@dataclasses.dataclass
class PriorCache(Rows):
    """Per object: words (M, H) its instruction's mean word embedding (what the prior reads); cosine (M, h, w)
    grounding logits without the prior; masks (M, s, s) SAM2's mask logits without the prior; mask_targets (M, s, s)
    and grid_targets (M, h, w): the object's mask as area fractions at those sizes."""

    words: torch.Tensor
    cosine: torch.Tensor
    masks: torch.Tensor
    mask_targets: torch.Tensor
    grid_targets: torch.Tensor


def _datasets(sources, *, seed: int, num_ref_frames: int, jump: int) -> list:
    from instructseg.data.training import build_source

    out = []
    for source in sources:
        if source.kind == "chat":
            raise InputError("prior.data: source kind 'chat' has no masks; use image sentences or video expressions")
        out.append((build_source(source.kind, Path(source.root), source.split, num_ref_frames=num_ref_frames,
                                 jump=jump, seed=seed), source.ratio))
    if not out:
        raise InputError("prior.data: no sources")
    return out


def _picks(datasets: list, count: int, seed: int) -> list[tuple[int, int]]:
    """(dataset, index) pairs: `count` in all, shared among the sources by ratio, each source's drawn without
    repetition (all of it when it is smaller than its share)."""
    rng = random.Random(seed)
    total = sum(ratio for _, ratio in datasets)
    picks = []
    for d, (dataset, ratio) in enumerate(datasets):
        order = list(range(len(dataset)))
        rng.shuffle(order)
        picks += [(d, i) for i in order[:max(1, round(count * ratio / total))]]
    rng.shuffle(picks)
    return picks


_PRIOR_OVERRIDES = ("decoder.position_prior=", "decoder.part_prior=", "decoder.track_prior=")


def collection_key(recipe) -> dict:
    """What decides a collection's content (a cache is reused only for the same key). Overrides that add or size
    the priors are left out: the collection runs without them."""
    stage, train = recipe.prior, recipe.train
    overrides = [o for o in recipe.model_overrides if not o.replace(" ", "").startswith(_PRIOR_OVERRIDES)]
    return {"model": recipe.model, "model_overrides": overrides, "samples": stage.samples,
            "data": [dataclasses.asdict(source) for source in stage.data], "seed": train.seed, "jump": train.jump}


def save_cache(cache: PriorCache, path: Path, key: dict) -> None:
    from safetensors.torch import save

    from instructseg.atomic import write_bytes

    tensors = {f.name: getattr(cache, f.name).contiguous().cpu() for f in dataclasses.fields(PriorCache)}
    write_bytes(path, save(tensors, metadata={"collection": json.dumps(key, sort_keys=True)}))


def load_cache(path: Path, key: dict) -> PriorCache:
    """A saved collection; InputError when it is missing, not one, or was collected with another `key`."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise InputError(f"prior.cache_from: {path}: no such file")
    names = [f.name for f in dataclasses.fields(PriorCache)]
    try:
        with safe_open(str(path), "pt") as file:
            saved = json.loads((file.metadata() or {}).get("collection", "null"))
            if saved != key:
                changed = sorted(k for k in key if saved is None or saved.get(k) != key[k])
                raise InputError(f"prior.cache_from: {path} was collected with other settings ({', '.join(changed)} "
                                 "differ); remove prior.cache_from to collect again")
            if set(file.keys()) != set(names):
                raise InputError(f"prior.cache_from: {path}: not a prior-stage collection")
            return PriorCache(**{name: file.get_tensor(name) for name in names})
    except (SafetensorError, json.JSONDecodeError) as err:
        raise InputError(f"prior.cache_from: {path}: unreadable ({err})") from None


@torch.no_grad()
def collect(model, sources, count: int, *, seed: int, device: torch.device, jump: int = 4,
            batch_size: int = 8, progress: bool = False) -> PriorCache:
    """Run the frozen model over `count` samples of `sources` (image sentences, or video expressions on a key frame
    with its reference frames; teacher-forced, as in training) and keep, for every object SAM2 scores present on
    the key frame, what `fit` needs."""
    from instructseg.data.collate import Collator

    if model.position_prior is None and model.part_prior is None:
        raise InputError("prior: the model has no position or part prior; add decoder.position_prior=G or "
                         "decoder.part_prior=true to model_overrides")
    if not hasattr(model.decoder, "sam"):
        raise InputError("prior: the prior stage needs the sam2 decoder (it adds the prior to SAM2's mask logits)")
    datasets = _datasets(sources, seed=seed, num_ref_frames=model.config.perceiver.num_ref_frames, jump=jump)
    picks = _picks(datasets, count, seed)
    collate = Collator(model.layout, model.decoder.image_size, model.tokenizer.pad_token_id)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=native_bf16(device))
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {f.name: [] for f in dataclasses.fields(PriorCache)}
    try:
        for start in tqdm(range(0, len(picks), batch_size), desc="prior stage", unit="batch", disable=not progress,
                          dynamic_ncols=True):
            samples = [datasets[d][0].sample(i, 0) for d, i in picks[start:start + batch_size]]
            inputs, masks, _ = collate(samples)
            inputs = inputs.to(device)
            with autocast:
                features = model.decoder.encode(inputs.frames)
                key = model.visual_tokens(inputs.frames)
                words = model.cell_word_logits(key, features) if model.cell_words is not None else None
                out = model.llm(inputs_embeds=model.embed(inputs, key, features, words),
                                attention_mask=inputs.attention_mask, output_hidden_states=True, logits_to_keep=1)
                words = model.instruction_words(inputs.input_ids, inputs.instruction_mask)
                prompts = model.prompts(out.hidden_states[-1], inputs.input_ids, inputs.instruction_mask, features,
                                        prior=False)
                decoded = model.decoder.decode(features, prompts)
                cosine = features.grounding(prompts.object_embeds)
            size = decoded.mask_logits.shape[-1] // MASK_SCALE
            low = F.avg_pool2d(decoded.mask_logits.float().flatten(0, 1)[:, None], MASK_SCALE)[:, 0]
            low = low.view(*decoded.mask_logits.shape[:2], size, size)
            for b, target in enumerate(masks):
                for m in range(target.shape[0]):
                    if not bool(prompts.object_valid[b, m]) or float(decoded.score_logits[b, m]) <= 0:
                        continue
                    t = target[m][None, None].float()
                    parts["words"].append(words[b].float().cpu())
                    parts["cosine"].append(cosine[b, m].float().cpu())
                    parts["masks"].append(low[b, m].cpu())
                    parts["mask_targets"].append(F.adaptive_avg_pool2d(t, size)[0, 0])
                    parts["grid_targets"].append(F.adaptive_avg_pool2d(t, features.size)[0, 0])
    finally:
        model.train(was_training)
    if not parts["words"]:
        raise InputError("prior.data: no sample gave an object the model scores present; nothing to fit")
    return PriorCache(**{name: torch.stack(values) for name, values in parts.items()})


def _with_position(prior, cache: PriorCache) -> tuple[torch.Tensor, torch.Tensor]:
    """(grounding map, mask logits) of the cached objects with the position prior `prior` (None: without one)."""
    grid = cache.cosine
    if prior is not None:
        grid = grid + F.interpolate(prior.each(cache.words)[:, None].float(), size=grid.shape[-2:],
                                    mode="bilinear", align_corners=False)[:, 0]
    masks = cache.masks + F.interpolate(grid[:, None], size=cache.masks.shape[-2:], mode="bilinear",
                                        align_corners=False)[:, 0]
    return grid, masks


def _mask_loss(masks: torch.Tensor, targets: torch.Tensor, weights: LossWeights) -> torch.Tensor:
    return weights.mask * sigmoid_bce(masks, targets) + weights.dice * dice_loss(masks, targets)


def prior_loss(prior, cache: PriorCache, weights: LossWeights = LossWeights()) -> torch.Tensor:
    """The joint training's mask and grounding losses on the cached maps with `prior`'s maps added."""
    grid, masks = _with_position(prior, cache)
    return _mask_loss(masks, cache.mask_targets, weights) + weights.align * grounding_map_loss(grid, cache.grid_targets)


@contextlib.contextmanager
def _in_eval(module):
    """`module` in eval mode inside the block (a WordLinear head's running statistics do not move), then back to
    the mode it had; nothing for None."""
    was_training = module is not None and module.training
    if module is not None:
        module.eval()
    try:
        yield
    finally:
        if was_training:
            module.train()


def fit_head(head, rows, loss, stage, *, seed: int, log_path: Path | None, name: str) -> list[float]:
    """`stage.steps` AdamW steps on `head`'s parameters (warm-up, cosine decay to a tenth), each on
    `stage.batch_size` of `rows` drawn with `seed`, `loss(head, batch)` giving the loss; `head` in eval mode
    throughout. Returns the losses."""
    generator = torch.Generator().manual_seed(seed)
    count = len(rows)

    def loss_at(step: int) -> torch.Tensor:
        pick = torch.randint(count, (min(stage.batch_size, count),), generator=generator)
        return loss(head, rows.rows(pick.to(rows.words.device)))

    with _in_eval(head):
        return run_steps(list(head.parameters()), steps=stage.steps, lr=stage.lr, warmup_steps=stage.warmup_steps,
                         loss_at=loss_at, log_path=log_path, name=name, weight_decay=0.0)


def fit(prior, cache: PriorCache, stage, *, seed: int, log_path: Path | None = None) -> list[float]:
    """Fit `prior` (the model's position prior) on `cache`: its running statistics are set to the cached inputs'
    first, then `stage.steps` AdamW steps on batches of `stage.batch_size` objects (warm-up, cosine decay to a
    tenth). Returns the losses."""
    prior.set_statistics(cache.words)
    return fit_head(prior, cache, prior_loss, stage, seed=seed, log_path=log_path, name="prior")


@dataclasses.dataclass
class PartRows(Rows):
    """The cached objects whose mask (with the position prior) has parts to choose from: words (M, H); masks (M, s,
    s) their mask logits; labels (M, s, s) their parts (`instructseg.decoders.parts.mask_parts`); features (M, P,
    F) the parts' features (zero rows past each object's parts); targets (M, s, s)."""

    words: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor
    features: torch.Tensor
    targets: torch.Tensor


@torch.no_grad()
def part_rows(position_prior, cache: PriorCache, batch: int = 512) -> PartRows | None:
    """The objects of `cache` with parts to choose from, their masks with `position_prior` (None: without one);
    None when no object has."""
    from instructseg.decoders.parts import PART_FEATURES, mask_parts

    keep, masks, labels, features = [], [], [], []
    for start in range(0, len(cache), batch):
        rows = cache.rows(torch.arange(start, min(start + batch, len(cache)), device=cache.words.device))
        _, logits = _with_position(position_prior, rows)
        for i, row in enumerate(logits.float().cpu().numpy()):
            label, feats = mask_parts(row)
            if feats.shape[0]:
                keep.append(start + i)
                masks.append(logits[i])
                labels.append(torch.from_numpy(label))
                features.append(torch.from_numpy(feats))
    if not keep:
        return None
    parts = max(f.shape[0] for f in features)
    padded = torch.zeros(len(features), parts, PART_FEATURES)
    for i, f in enumerate(features):
        padded[i, :f.shape[0]] = f
    device = cache.words.device
    chosen = cache.rows(torch.tensor(keep, device=device))
    return PartRows(chosen.words, torch.stack(masks), torch.stack(labels).to(device), padded.to(device),
                    chosen.mask_targets)


def part_loss(prior, rows: PartRows, weights: LossWeights = LossWeights()) -> torch.Tensor:
    """The joint training's mask loss on the objects' masks with their parts weighed by `prior` (a PartPrior)."""
    from instructseg.decoders.parts import part_offsets

    masks = rows.masks + part_offsets(rows.labels, rows.features, prior.each(rows.words).float())
    return _mask_loss(masks, rows.targets, weights)


def fit_parts(model, cache: PriorCache, stage, *, seed: int, log_path: Path | None = None) -> tuple[int, list[float]]:
    """Fit the model's part prior on the objects of `cache` whose masks, with the model's position prior, have
    parts (its statistics set to all cached words first, as the position prior's); (objects, losses). No objects
    with parts: (0, []) and the prior is left as it is."""
    model.part_prior.set_statistics(cache.words)
    with _in_eval(model.position_prior):  # read, not trained: its running statistics stay as they are
        rows = part_rows(model.position_prior, cache)
    if rows is None:
        return 0, []
    return len(rows), fit_head(model.part_prior, rows, part_loss, stage, seed=seed, log_path=log_path, name="parts")


_PART_PREFIX = "part_prior."  # prior.safetensors: the position prior's tensors unprefixed, the part prior's so
_TRACK_PREFIX = "track_prior."  # and the track prior's so
_IMPLIED_PREFIX = "implied_words."  # and the implied words'


def _result_state(model) -> dict[str, torch.Tensor]:
    state = {}
    if model.position_prior is not None:
        state.update(model.position_prior.state_dict())
    if model.part_prior is not None:
        state.update({_PART_PREFIX + k: v for k, v in model.part_prior.state_dict().items()})
    if model.track_prior is not None:
        state.update({_TRACK_PREFIX + k: v for k, v in model.track_prior.state_dict().items()})
    if model.implied_words is not None:
        state.update({_IMPLIED_PREFIX + k: v for k, v in model.implied_words.state_dict().items()})
    return state


def save_result(model, path: Path) -> None:
    from safetensors.torch import save

    from instructseg.atomic import write_bytes

    write_bytes(path, save({name: value.detach().contiguous().cpu() for name, value in _result_state(model).items()}))


def load_result(model, path: Path) -> None:
    """Put a finished stage's prior back into `model` (a resumed run)."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise InputError(f"{path}: missing; this run's checkpoints were trained after its prior stage and need its "
                         "result (remove the checkpoints to start again)")
    state = load_file(str(path))
    own = _result_state(model)
    if set(state) != set(own) or any(own[k].shape != v.shape for k, v in state.items()):
        raise InputError(f"{path}: does not match the model's priors (was it written for another model?)")
    for name, value in state.items():
        own[name].copy_(value)
