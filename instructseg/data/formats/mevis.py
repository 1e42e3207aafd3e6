"""MeViS reader: motion expressions, often referring to several objects.

```
root/<split>/JPEGImages/<vid>/<frame>.jpg
root/<split>/meta_expressions.json   {"videos": {vid: {"frames": [names], "expressions":
                                          {exp_id: {"exp", "obj_id": [..], "anno_id": [..]}}}}}
root/<split>/mask_dict.json          {anno_id: [COCO RLE or null per frame]}   (absent for the online test split)
```
Frame sizes come from the first frame's image header (the metadata does not carry them).
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from instructseg.data.formats.common import (LazyJson, expression_ids, image_size, load_json, mask_dict_masks,
                                             require)
from instructseg.data.types import VideoExpression
from instructseg.errors import InputError


def _masks(mask_dict: LazyJson, anno_ids: list[str], num_frames: int, height: int, width: int) -> np.ndarray:
    if not mask_dict.path.is_file():
        raise InputError(f"{mask_dict.path}: annotations are absent (this split ships no masks)")
    return mask_dict_masks(mask_dict, anno_ids, num_frames, height, width)


def read_mevis(root: Path, split: str) -> list[VideoExpression]:
    """MeViS expressions of `split` ("train", "valid_u", "valid"). Masks load on first `masks()` call."""
    folder = Path(root) / split
    meta_path = folder / "meta_expressions.json"
    videos = require(load_json(meta_path), "videos", meta_path, kind=dict)
    mask_dict = LazyJson(folder / "mask_dict.json")
    samples = []
    for vid, info in videos.items():
        where = f"videos/{vid}"
        frames = [str(f) for f in require(info, "frames", meta_path, where, list)]
        if not frames:
            raise InputError(f"{meta_path}: video {vid} lists no frames")
        frame_paths = [folder / "JPEGImages" / vid / f"{name}.jpg" for name in frames]
        height, width = image_size(frame_paths[0])
        for exp_id, exp in require(info, "expressions", meta_path, where, dict).items():
            at = f"{where}/expressions/{exp_id}"
            anno_ids, obj_ids = expression_ids(exp, meta_path, at)
            samples.append(VideoExpression(
                dataset="mevis", video=vid, exp_id=str(exp_id), text=require(exp, "exp", meta_path, at, str),
                type_id=0, frames=frames, frame_paths=frame_paths, height=height, width=width, obj_ids=obj_ids,
                mask_loader=partial(_masks, mask_dict, anno_ids, len(frames), height, width),
            ))
    return samples
