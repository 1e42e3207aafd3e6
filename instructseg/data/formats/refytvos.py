"""Ref-YouTube-VOS reader, and the palette-PNG video layout it shares with Ref-DAVIS17.

```
root/<split>/JPEGImages/<vid>/<frame>.jpg
root/<split>/Annotations/<vid>/<frame>.png          palette PNG, pixel value = object id, 0 = background
root/meta_expressions/<split>/meta_expressions.json  {"videos": {vid: {"expressions": {exp_id: {"exp", "obj_id"}},
                                                                       "frames": [names]}}}
```
Each expression refers to one object; its mask in a frame is `png == obj_id`. The public Ref-YouTube-VOS valid and
test splits ship no Annotations (and no obj_id): those samples list fine and `masks()` says the annotations are
absent. Frame sizes come from the first frame's image header.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from instructseg.data.formats.common import as_int, image_size, load_json, read_index_png, require
from instructseg.data.types import VideoExpression
from instructseg.errors import InputError


def _palette_masks(folder: Path, frames: list[str], obj_ids: list[int], split: str, source: str) -> np.ndarray:
    """(len(obj_ids), T, H, W) bool from `folder/<frame>.png`."""
    if not folder.is_dir():
        raise InputError(f"{folder}: annotations are absent for split '{split}' (this split ships no masks)")
    if not obj_ids:
        raise InputError(f"{source}: missing key 'obj_id', cannot select the object in {folder}")
    ids = np.stack([read_index_png(folder / f"{name}.png") for name in frames])
    return np.stack([ids == obj_id for obj_id in obj_ids])


def _video_size(frame_paths: list[Path], meta_path: Path, vid: str) -> tuple[int, int]:
    if not frame_paths:
        raise InputError(f"{meta_path}: video {vid} lists no frames")
    return image_size(frame_paths[0])


def read_palette_layout(root: Path, split: str, dataset: str) -> list[VideoExpression]:
    """Expressions of a Ref-YouTube-VOS-style layout (`dataset` names the samples: "refytvos" or "davis17")."""
    root = Path(root)
    meta_path = root / "meta_expressions" / split / "meta_expressions.json"
    videos = require(load_json(meta_path), "videos", meta_path, kind=dict)
    samples = []
    for vid, info in videos.items():
        where = f"videos/{vid}"
        frames = [str(f) for f in require(info, "frames", meta_path, where, list)]
        frame_paths = [root / split / "JPEGImages" / vid / f"{name}.jpg" for name in frames]
        height, width = _video_size(frame_paths, meta_path, vid)
        for exp_id, exp in require(info, "expressions", meta_path, where, dict).items():
            at = f"{where}/expressions/{exp_id}"
            obj_ids = [as_int(exp["obj_id"], meta_path, f"{at}/obj_id")] if "obj_id" in exp else []
            source = f"{meta_path} ({at})"
            samples.append(VideoExpression(
                dataset=dataset, video=vid, exp_id=str(exp_id), text=require(exp, "exp", meta_path, at, str),
                type_id=0, frames=frames, frame_paths=frame_paths, height=height, width=width, obj_ids=obj_ids,
                mask_loader=partial(_palette_masks, root / split / "Annotations" / vid, frames, obj_ids, split,
                                    source),
            ))
    return samples


def read_refytvos(root: Path, split: str) -> list[VideoExpression]:
    """Ref-YouTube-VOS expressions of `split` ("train", "valid", ...). Masks load on first `masks()` call."""
    return read_palette_layout(root, split, "refytvos")
