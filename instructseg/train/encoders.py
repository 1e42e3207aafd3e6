"""The encoder stage of a recipe: before the joint training of a fresh run, the vision encoder and the decoder's
image encoder learn object categories from category maps alone (`model.category_heads`), without the LLM.

Why: trained only through grounding losses, small encoders learn colour (which tells most referred objects apart)
and hardly any shape. The category loss teaches shape, but in joint training it gets a few labelled images per
step of a step the LLM makes expensive; alone, a batch of 16 images costs about a second on two CPU cores.
Measured on ShapesIVS, starting from the fourth session's default model: the decoder head names the shape of
held-out objects 19 % of the time (chance 20 %) before, 83 % after 2000 steps of batch 16 on 6000 generated images
(49 % on the joint training's 540 images, which it learns by heart). Joint training afterwards unlearns it unless
the encoders are frozen (`train.freeze`).

Models with word slots (`instructseg.model.cell_words`) also train their heads here, on the same images' category
and attribute maps, and models with region words (`instructseg.model.region_words`) their CNN, on those maps'
instances; `encoders.train` narrows the stage to some parameters (`[cell_words]`: new word heads on a trained
model's encoders, which stay as they are; `[region_words]`: the region words alone, without running the encoders).

The stage's result is written to `OUTPUT/encoders.safetensors`; a run that resumes from a checkpoint loads it
instead of running the stage again (checkpoints leave frozen parameters out, and `train.freeze` usually names the
encoders). Every rank runs the stage with the same seed and data, so all start the joint training from the same
weights.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from instructseg.data.collate import label_maps, resize_categories, resize_frame
from instructseg.data.formats import REFCOCO_DATASETS, read_refcoco
from instructseg.data.training import REFCOCO_SPLIT_BY, load_rgb
from instructseg.errors import InputError
from instructseg.llm.precision import native_bf16
from instructseg.model.region_words import train_crops
from instructseg.train.losses import category_loss, word_losses, word_maps
from instructseg.train.stage_steps import run_steps

RESULT = "encoders.safetensors"


def category_images(sources) -> list:
    """One ImageSample per distinct image of the recipe's encoder-stage sources (RefCOCO kinds with categories)."""
    images = {}
    for source in sources:
        if source.kind not in REFCOCO_DATASETS:
            raise InputError(f"encoders.data: source kind {source.kind!r} has no category maps; use one of "
                             f"{', '.join(REFCOCO_DATASETS)}")
        for sample in read_refcoco(Path(source.root), source.kind, REFCOCO_SPLIT_BY[source.kind], source.split):
            if sample.semantic_loader is None:
                raise InputError(f"{Path(source.root) / 'instances.json'}: no 'categories', so no category maps "
                                 "for the encoder stage")
            images.setdefault(sample.image_path, sample)
    if not images:
        raise InputError("encoders.data: no images")
    return list(images.values())


def _batch(images: list, picks: list[int], size: int,
           rng: random.Random) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Frames (B, 3, S, S), category maps (B, S, S) and attribute maps (B, S, S; -1 for an image without one, None
    when no image has one); each image flipped left-right at random."""
    frames, maps, attributes = [], [], []
    for index in picks:
        sample = images[index]
        frame, classes, colours = load_rgb(sample.image_path), sample.semantic(), sample.attributes()
        if rng.random() < 0.5:
            frame, classes = frame[:, ::-1], classes[:, ::-1]
            colours = colours[:, ::-1] if colours is not None else None
        frames.append(resize_frame(np.ascontiguousarray(frame), size))
        maps.append(resize_categories(classes, size))
        attributes.append(colours)
    return torch.stack(frames), torch.stack(maps), label_maps(attributes, size)


def _trained(model, prefixes: list[str] = ()) -> dict[str, torch.nn.Parameter]:
    """The parameters the stage trains, by name: those under `prefixes`, by default the decoder's image encoder,
    the heads and the vision encoder (unless it is a frozen pretrained tower)."""
    if not prefixes:
        prefixes = ["decoder.sam.image_encoder" if hasattr(model.decoder, "sam") else "decoder"]
        prefixes += [head for head in ("category_heads", "cell_words", "region_words")
                     if getattr(model, head) is not None]
        if not model.config.vision.freeze:
            prefixes.append("vision")
    found = {name: p for name, p in model.named_parameters()
             if p.requires_grad and any(name.startswith(prefix + ".") for prefix in prefixes)}
    for prefix in prefixes:
        if not any(name.startswith(prefix + ".") for name in found) and getattr(model, prefix, True) is None:
            raise InputError(f"encoders.train: the model has no {prefix!r}")
    return found


def save_result(model, path: Path, prefixes: list[str] = ()) -> None:
    from safetensors.torch import save

    from instructseg.atomic import write_bytes

    write_bytes(path, save({name: p.detach().contiguous().cpu() for name, p in _trained(model, prefixes).items()}))


def load_result(model, path: Path, prefixes: list[str] = ()) -> None:
    """Put a finished stage's weights back into `model` (a resumed run)."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise InputError(f"{path}: missing; this run's checkpoints were trained after its encoder stage and need "
                         "its result (remove the checkpoints to start again)")
    trained = _trained(model, prefixes)
    state = load_file(str(path))
    if set(state) != set(trained):
        raise InputError(f"{path}: does not match the model's encoders (was it written for another model?)")
    with torch.no_grad():
        for name, value in state.items():
            trained[name].copy_(value)


def train_encoders(model, stage, *, seed: int, device: torch.device, log_path: Path | None = None) -> list[float]:
    """Run the encoder stage (`stage`: the recipe's `EncoderStage`) on `model` in place; returns the losses."""
    if model.category_heads is None and model.cell_words is None and model.region_words is None:
        raise InputError("encoders: the model has no category heads, word slots or region words; set "
                         "semantic_classes (model_overrides or its config.json) to the number of categories")
    images = category_images(stage.data)
    trained = _trained(model, stage.train)
    params = list(trained.values())
    if not params:
        raise InputError(f"encoders.train: nothing to train under {stage.train}")
    # what the loss needs: the encoders' heads unless only the region words train, the region words if they do
    encoders = any(not name.startswith("region_words.") for name in trained)
    regions = any(name.startswith("region_words.") for name in trained)
    flags = {p: p.requires_grad for p in model.parameters()}  # the rest of the model gets no gradients
    for p in flags:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    rng = random.Random(seed)
    size = model.decoder.image_size
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=native_bf16(device))

    def loss_at(step: int) -> torch.Tensor:
        frames, maps, attributes = _batch(images, [rng.randrange(len(images)) for _ in range(stage.batch_size)],
                                          size, rng)
        attributes = attributes.to(device) if attributes is not None else None
        loss = frames.new_zeros((), device=device)
        if encoders:
            loss = loss + _loss(model, frames.to(device), maps.to(device), attributes, autocast)
        if regions:
            loss = loss + _region_loss(model.region_words, frames.to(device), word_maps(maps, attributes), rng)
        return loss

    was_training = model.training
    model.train()
    try:
        return run_steps(params, steps=stage.steps, lr=stage.lr, warmup_steps=stage.warmup_steps, loss_at=loss_at,
                         log_path=log_path, name="encoder")
    finally:
        model.train(was_training)
        for p, flag in flags.items():
            p.requires_grad_(flag)


def _region_loss(region_words, frames: torch.Tensor, maps: dict, rng: random.Random) -> torch.Tensor:
    """The region words' cross-entropy, per vocabulary, on every instance of the batch's maps (`train_crops`)."""
    for kind in region_words.vocabularies:
        if maps[kind] is None or not bool((maps[kind] >= 0).all()):
            raise InputError(f"encoders.data: the region words read {kind} words, but some images have no {kind} "
                             f"map (instances.json: {'attribute_ids' if kind == 'attribute' else 'category_id'})")
    crops, labels = train_crops(frames, {kind: maps[kind] for kind in region_words.vocabularies}, rng)
    if crops.shape[0] == 0:
        return frames.new_zeros(())
    if rng.random() < 0.5:
        crops = crops.flip(-1)
    logits = region_words(crops)
    return sum(F.cross_entropy(logits[kind].float(), labels[kind].to(crops.device)) for kind in logits)


def _loss(model, frames: torch.Tensor, maps: torch.Tensor, attributes: torch.Tensor | None, autocast) -> torch.Tensor:
    """The category heads' loss on both encoders plus the word slots' loss (whichever the model has)."""
    with autocast:
        features = model.decoder.encode(frames)
        tokens = model.visual_tokens(frames)
        heads = (model.category_heads(tokens, model.vision.grid, features.tokens, features.size)
                 if model.category_heads is not None else ())
        words = model.cell_word_logits(tokens, features) if model.cell_words is not None else {}
    loss = sum((category_loss(logits, maps) for logits in heads), frames.new_zeros(()))
    return loss + sum(word_losses(words, word_maps(maps, attributes)).values(), frames.new_zeros(()))
