"""ShapesIVS: a small synthetic instructed-segmentation dataset written in the public datasets' formats.

Scenes of coloured shapes (still images and videos) come with referring, reasoning, multi-object and no-target
expressions, short text answers and exact masks. `generate` writes them as ReVOS, Ref-YouTube-VOS, RefCOCO,
ReasonSeg and LLaVA chat data, so the same readers, trainers and evaluators run on it as on the real data.
See docs/shapesivs.md for the vocabulary and the expression templates.

The pieces: `synthetic_scene` (vocabulary, sampling, rendering), `synthetic_text` (facts and expressions),
`synthetic_write` (file layouts). Output is a deterministic function of the `SynthSpec`.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from instructseg.data import synthetic_text as text
from instructseg.data.synthetic_scene import BACKGROUNDS, COLOURS, SHAPES, SIZES, Scene, render, \
    sample_image_scene, sample_video_scene, texture
from instructseg.data.synthetic_write import ImageRecord, VideoRecord, jpeg_bytes, write_chat, write_refcoco, \
    write_reasonseg, write_refytvos, write_revos
from instructseg.errors import InputError

__all__ = ["SynthSpec", "generate", "split_counts", "SHAPES", "COLOURS", "SIZES", "BACKGROUNDS"]

_DATASETS = ("revos", "refytvos", "refcoco", "reasonseg", "chat")
# separate random streams, so videos never shift the images' randomness, and textures change nothing but the background
_STREAM_VIDEO, _STREAM_IMAGE, _STREAM_TEXTURE = 1, 2, 3
_MAX_TRIES = 10


@dataclass
class SynthSpec:
    """What to generate. Videos and images are each split 3:1 into train and valid (at least one each when >= 2)."""

    seed: int = 0
    videos: int = 12
    images: int = 24
    frames: int = 8
    height: int = 128
    width: int = 128
    textures: float = 0.0  # fraction of scenes drawn on a photo-like texture instead of a BACKGROUNDS kind

    def validate(self) -> None:
        if self.videos < 0 or self.images < 0:
            raise InputError(f"synth: counts must be >= 0, got videos={self.videos} images={self.images}")
        if self.frames < 2:
            raise InputError(f"synth: frames must be >= 2, got {self.frames}")
        if min(self.height, self.width) < 16:
            raise InputError(f"synth: size must be at least 16x16, got {self.height}x{self.width}")
        if not 0.0 <= self.textures <= 1.0:
            raise InputError(f"synth: textures must be a fraction in [0, 1], got {self.textures}")


def split_counts(total: int) -> tuple[int, int]:
    """(train, valid) sizes for a 3:1 split with at least one of each when `total` >= 2."""
    valid = 0 if total < 2 else max(1, round(total / 4))
    return total - valid, valid


def _split(index: int, total: int) -> str:
    return "train" if index < split_counts(total)[0] else "valid"


def _rng(spec: SynthSpec, stream: int, index: int) -> np.random.Generator:
    """An independent random stream per scene: scene i does not depend on how many scenes precede it."""
    return np.random.default_rng([spec.seed, stream, index])


def _retexture(spec: SynthSpec, stream: int, index: int, scene: Scene) -> Scene:
    """The scene on a photo-like texture for a `spec.textures` share of scenes (its own random stream, so the
    shapes, motions and words are those of the same seed without textures)."""
    rng = np.random.default_rng([spec.seed, _STREAM_TEXTURE, stream, index])
    if spec.textures > 0 and rng.random() < spec.textures:
        scene.background = texture(rng, scene.height, scene.width, vary=True)
    return scene


def build_video(spec: SynthSpec, index: int) -> VideoRecord:
    """Sample, render and describe video `index`. The first two videos always contain a shape that enters
    (video 0) or leaves (video 1) the frame, so every dataset has absent-object frames."""
    rng = _rng(spec, _STREAM_VIDEO, index)
    force = {0: "enter", 1: "leave"}.get(index)
    for _ in range(_MAX_TRIES):  # resample the rare scene where some shape is never visible
        scene = _retexture(spec, _STREAM_VIDEO, index,
                           sample_video_scene(rng, spec.height, spec.width, spec.frames, force_event=force))
        rendered = render(scene)
        if rendered.visible.any(axis=(1, 2, 3)).all():
            break
    facts = text.video_facts(scene, rendered)
    queries = text.referring_queries(facts, text.VIDEO_FLAGS, rng)
    queries += text.reasoning_queries(facts, rng, video=True, extent=min(spec.height, spec.width))
    no_target = text.no_target_query(facts, rng)
    queries += [no_target] if no_target is not None else []
    return VideoRecord(f"v{index:04d}", index, _split(index, spec.videos), scene, rendered, _dedupe(queries))


def build_image(spec: SynthSpec, index: int) -> ImageRecord:
    """Sample, render and describe image `index`: up to three referring sentences per object (RefCOCO), one
    reasoning query (ReasonSeg) and a short chat."""
    rng = _rng(spec, _STREAM_IMAGE, index)
    scene = _retexture(spec, _STREAM_IMAGE, index, sample_image_scene(rng, spec.height, spec.width))
    rendered = render(scene)
    facts = text.image_facts(scene)
    refs = []
    for fact in facts:
        found = text.unique_descriptions(facts, fact.index, list(text.IMAGE_FLAGS))
        picks = [found[i] for i in sorted(rng.permutation(len(found))[:3])]
        if picks:
            refs.append((fact.index, [d.text(text.IMAGE_FLAGS) for d in picks]))
    reasoning = text.reasoning_queries(facts, rng, video=False, extent=min(spec.height, spec.width), limit=1)
    chat = text.chat_turns(facts, spec.width, spec.height, rng)
    return ImageRecord(f"img{index:05d}", index, _split(index, spec.images), scene, rendered, render(scene, "coco"),
                       facts, refs, reasoning[0] if reasoning else None, chat)


def _dedupe(queries: list[text.Query]) -> list[text.Query]:
    """Drop repeated wordings (keep the first)."""
    seen: set[str] = set()
    kept = []
    for query in queries:
        if query.text not in seen:
            seen.add(query.text)
            kept.append(query)
    return kept


def _check_out(out: Path) -> None:
    """Refuse to mix with earlier output: stale files would break determinism and the train/valid split."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")
    taken = [name for name in _DATASETS if (out / name).exists()]
    if taken:
        raise InputError(f"{out}: already holds {', '.join(taken)}; choose a new or empty output directory")


def generate(out: Path, spec: SynthSpec) -> dict[str, int]:
    """Write ShapesIVS under `out` (revos/, refytvos/, refcoco/, reasonseg/, chat/) and return counts."""
    spec.validate()
    out = Path(out)
    _check_out(out)
    # a new folder appears whole: written beside it under a temporary name, renamed at the end, so that an
    # interrupted run leaves no half-written dataset that a re-run would take for a complete one
    partial = None if out.exists() else out.with_name(f".{out.name}.partial")
    if partial is not None and partial.exists():
        shutil.rmtree(partial)
    target = partial or out
    videos = [build_video(spec, i) for i in range(spec.videos)]
    images = [build_image(spec, i) for i in range(spec.images)]
    video_jpegs = {v.vid: [jpeg_bytes(frame) for frame in v.rendered.frames] for v in videos}
    image_jpegs = {r.name: jpeg_bytes(r.rendered.frames[0]) for r in images}
    coco_jpegs = {r.name: jpeg_bytes(r.rendered_coco.frames[0]) for r in images}
    counts = {"videos": len(videos), "images": len(images)}
    counts["expressions"] = write_revos(target / "revos", videos, video_jpegs)
    counts["refytvos_expressions"] = write_refytvos(target / "refytvos", videos, video_jpegs)
    counts["refcoco_sentences"] = write_refcoco(target / "refcoco", images, coco_jpegs)
    counts["reasonseg_samples"] = write_reasonseg(target / "reasonseg", images, image_jpegs)
    counts["conversations"] = write_chat(target / "chat", [r for r in images if r.split == "train"], image_jpegs)
    if partial is not None:
        partial.rename(out)
    return counts
