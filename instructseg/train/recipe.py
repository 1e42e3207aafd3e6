"""Training recipes: YAML files (scripts/recipes/*.yaml) read into typed dataclasses, with `key=value` overrides.

    model: tiny                      # preset or saved model dir
    model_overrides: [llm.lora_r=4]  # ModelConfig overrides
    synth: {out: data/shapes, seed: 0, videos: 8, images: 16, frames: 8, size: [64, 64]}  # generated when missing
    data:
      - {kind: revos, root: data/shapes/revos, split: train, ratio: 3}
    train: {steps: 20, batch_size: 2, lr: 1.0e-3, deepspeed: ../ds/zero2.json}
    output_dir: runs/tiny

Relative paths in `data`, `synth.out`, `train.deepspeed` and `output_dir` resolve against the directory the command
runs in; `train.deepspeed` also against the recipe's own directory.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from instructseg.config import ModelConfig, build_dataclass, parse_override_value
from instructseg.errors import InputError
from instructseg.train.losses import LossWeights


@dataclass
class DataSource:
    kind: str  # revos, refytvos, mevis, davis17, refcoco, refcoco+, refcocog, reasonseg, chat
    root: str  # dataset root in its public layout (chat: the folder holding conversations.json)
    split: str = "train"
    ratio: float = 1.0  # relative sampling weight in the mixture


@dataclass
class SynthData:
    """ShapesIVS generated into `out` before training when `out` does not exist yet."""

    out: str = "data/shapes"
    seed: int = 0
    videos: int = 12
    images: int = 24
    frames: int = 8
    size: list[int] = field(default_factory=lambda: [64, 64])
    textures: float = 0.0  # share of scenes on a photo-like texture background

    def spec(self):
        """The `SynthSpec` these settings describe."""
        from instructseg.data.synthetic import SynthSpec

        return SynthSpec(seed=self.seed, videos=self.videos, images=self.images, frames=self.frames,
                         height=self.size[0], width=self.size[1], textures=self.textures)


@dataclass
class TrainSettings:
    steps: int = 100  # optimizer steps
    batch_size: int = 2  # micro-batch per process
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    deepspeed: str = "../ds/zero2.json"  # ZeRO config (stage 1, 2 or 3); batch sizes and precision are filled in
    save_every: int = 50  # checkpoint every N steps (and at the end)
    keep_checkpoints: int = 2
    log_every: int = 1
    seed: int = 0
    num_ref_frames: int | None = None  # default: the model's perceiver.num_ref_frames
    jump: int = 4  # reference frames come from [key - jump, key + jump]
    workers: int = 0  # processes that build samples a few batches ahead of the loop (0: in the loop)
    merge_lora: bool = False  # export with LoRA merged into the LLM
    # CPU only: bf16 autocast for the forward (weights, gradients and optimizer stay fp32). About 2x faster on CPUs
    # with AVX512-BF16 or AMX; on GPU, bf16 autocast is always used.
    cpu_bf16: bool = False
    # module prefixes of parameters that do not train (e.g. decoder.sam.image_encoder.trunk after the encoder stage)
    freeze: list[str] = field(default_factory=list)
    # module prefix -> LR multiplier for the parameters under it (e.g. {position_prior: 20}: a new,
    # zero-initialised head learns faster than the trained parts around it, which must move slowly); the rest
    # train at `lr`
    lr_scale: dict[str, float] = field(default_factory=dict)
    loss: LossWeights = field(default_factory=LossWeights)


@dataclass
class EncoderStage:
    """Before the joint training of a fresh run (skipped on resume): `steps` of the category loss (and the word
    slots' loss) alone on the vision and decoder image encoders and the heads (`instructseg.train.encoders`);
    needs a model with category heads or word slots."""

    steps: int = 0
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 50
    data: list[DataSource] = field(default_factory=list)  # RefCOCO-format sources whose instances.json has categories
    # ShapesIVS generated for this stage when `out` does not exist: the stage sees each image a few times only,
    # where the joint training's few hundred images would be learnt by heart (held-out shape accuracy 49 % vs 86 %)
    synth: SynthData | None = None
    # module prefixes the stage trains; empty: the decoder's image encoder, the vision encoder (unless frozen
    # pretrained) and the heads. [cell_words] teaches new word slots' heads on a trained model's encoders.
    train: list[str] = field(default_factory=list)


PRIOR_FITS = ("position", "parts", "tracks", "words")


@dataclass
class PriorStage:
    """Before the joint training of a fresh run (skipped on resume): the position prior and/or the part prior
    fitted alone on the frozen model's states and maps for `samples` samples of `data`
    (`instructseg.train.prior_stage`), and/or the track prior on the ground-truth tracks of `data`'s ReVOS-format
    video expressions (`instructseg.train.track_fit`); needs a model with those heads (`decoder.position_prior`,
    `decoder.part_prior`, `decoder.track_prior`)."""

    samples: int = 0  # samples collected (image sentences, video expressions; 0: no stage)
    steps: int = 300
    batch_size: int = 256  # objects per step
    lr: float = 1.0e-3
    warmup_steps: int = 20
    data: list[DataSource] = field(default_factory=list)  # sources with masks (any kind but chat)
    # a previous run's OUTPUT/prior_cache.safetensors: fit on it instead of collecting (the same `model` entry and
    # overrides, data, samples, seed and jump required; a model changed on disk under the same path is not noticed)
    cache_from: str | None = None
    # the priors the stage fits, in this order: "position", "parts" (the parts of the masks with the position prior
    # applied), "tracks" (every expression of data's revos sources; no collection when it is the only one), "words"
    # (the implied words, from the answers of data's revos sources; no collection either); a prior not listed keeps
    # the weights the model was loaded with
    fit: list[str] = field(default_factory=lambda: ["position"])


@dataclass
class Recipe:
    model: str = "tiny"
    model_overrides: list[str] = field(default_factory=list)
    synth: SynthData | None = None
    data: list[DataSource] = field(default_factory=list)
    train: TrainSettings = field(default_factory=TrainSettings)
    encoders: EncoderStage = field(default_factory=EncoderStage)
    prior: PriorStage = field(default_factory=PriorStage)
    output_dir: str = "runs/default"
    recipe_dir: str = "."  # set by load_recipe: where relative DeepSpeed config paths also resolve

    def deepspeed_config_path(self) -> Path:
        for base in (Path.cwd(), Path(self.recipe_dir)):
            path = base / self.train.deepspeed
            if path.is_file():
                return path
        raise InputError(f"train.deepspeed={self.train.deepspeed!r}: DeepSpeed config not found")


def _pop_data(section: dict[str, Any], source: str, prefix: str) -> tuple[list[DataSource], SynthData | None]:
    """Pop a section's `data` (sources) and `synth` keys, built; `prefix` names the section in errors."""
    sources = section.pop("data", [])
    synth = section.pop("synth", None)
    if not isinstance(sources, list):
        raise InputError(f"{source}: '{prefix}data' must be a list of sources")
    built = [build_dataclass(DataSource, s, f"{source} {prefix}data[{i}]") for i, s in enumerate(sources)]
    return built, build_dataclass(SynthData, synth, f"{source} {prefix}synth") if synth is not None else None


def _recipe_from_dict(data: dict[str, Any], source: str) -> Recipe:
    data = dict(data)
    sources, synth = _pop_data(data, source, "")
    encoders = dict(data.pop("encoders", None) or {})
    encoder_sources, encoder_synth = _pop_data(encoders, source, "encoders.")
    prior = dict(data.pop("prior", None) or {})
    prior_sources, prior_synth = _pop_data(prior, source, "prior.")
    if prior_synth is not None:
        raise InputError(f"{source}: prior.synth is not supported; generate the data in the recipe's synth")
    recipe = build_dataclass(Recipe, data, source)
    recipe.data, recipe.synth = sources, synth
    recipe.encoders = build_dataclass(EncoderStage, encoders, f"{source} encoders")
    recipe.encoders.data, recipe.encoders.synth = encoder_sources, encoder_synth
    recipe.prior = build_dataclass(PriorStage, prior, f"{source} prior")
    recipe.prior.data = prior_sources
    ModelConfig().override(recipe.model_overrides)  # names and types checked now, not after data generation
    stages = recipe.encoders.steps > 0 or recipe.prior.samples > 0
    if recipe.train.steps < (0 if stages else 1):  # train.steps 0: the stages alone, then the export
        raise InputError(f"{source}: train.steps must be at least {0 if stages else 1}, got {recipe.train.steps}")
    for name in ("batch_size", "grad_accum", "save_every", "keep_checkpoints", "log_every"):
        if getattr(recipe.train, name) < 1:
            raise InputError(f"{source}: train.{name} must be at least 1, got {getattr(recipe.train, name)}")
    if recipe.train.workers < 0:
        raise InputError(f"{source}: train.workers must be 0 or more, got {recipe.train.workers}")
    if recipe.train.lr <= 0 or recipe.train.warmup_steps < 0:
        raise InputError(f"{source}: train.lr must be > 0 and train.warmup_steps >= 0, got {recipe.train.lr} and "
                         f"{recipe.train.warmup_steps}")
    if not recipe.data:
        raise InputError(f"{source}: the recipe lists no data sources")
    if recipe.encoders.steps > 0 and not recipe.encoders.data:
        raise InputError(f"{source}: encoders.steps={recipe.encoders.steps} but encoders.data lists no sources")
    if recipe.prior.samples > 0:
        p = recipe.prior
        if not p.data:
            raise InputError(f"{source}: prior.samples={p.samples} but prior.data lists no sources")
        if p.steps < 1 or p.batch_size < 1 or p.lr <= 0 or p.warmup_steps < 0:
            raise InputError(f"{source}: prior.steps and prior.batch_size must be at least 1, prior.lr > 0 and "
                             f"prior.warmup_steps >= 0; got {p.steps}, {p.batch_size}, {p.lr}, {p.warmup_steps}")
        if not p.fit or any(name not in PRIOR_FITS for name in p.fit) or len(set(p.fit)) < len(p.fit):
            raise InputError(f"{source}: prior.fit={p.fit}: expected one or more of {', '.join(PRIOR_FITS)}")
    return recipe


def load_recipe(path: Path, overrides: list[str] = ()) -> Recipe:
    """Read a recipe and apply `key=value` overrides (`train.steps=5`, `output_dir=runs/x`,
    `model.llm.lora_r=4` goes to the model's overrides)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: recipe not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: a recipe is a mapping")
    data.setdefault("model_overrides", [])
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"override {item!r}: expected key=value")
        if key.startswith("model."):
            data["model_overrides"].append(f"{key[len('model.'):]}={value}")
            continue
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InputError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = parse_override_value(item, value)
    data["recipe_dir"] = str(path.parent.resolve())
    return _recipe_from_dict(data, str(path))


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)
