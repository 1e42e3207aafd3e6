"""ReVOS reader: reasoning video object segmentation (VISA release layout).

```
root/JPEGImages/<vid>/<frame>.jpg
root/meta_expressions_{train,valid}_.json   {"videos": {vid: {"vid_id", "frames", "height", "width",
                                              "expressions": {exp_id: {"exp", "obj_id", "anno_id", "type_id"}}}}}
root/mask_dict.json                         {anno_id: [COCO RLE or null, one per frame]}
root/mask_dict_foreground.json              {vid: {"masks_rle": [RLE per frame]}}
```
An expression's masks are one masklet per `anno_id` (null = the object is not in that frame). Extra keys (the
synthetic data's "answer") are read when present.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
import numpy as np

from instructseg.data.formats.common import (LazyJson, as_int, expression_ids, load_json, mask_dict_masks, require,
                                             require_file, rle_frames)
from instructseg.data.types import VideoExpression


def _foreground(store: LazyJson, vid: str, num_frames: int, height: int, width: int) -> np.ndarray:
    entry = require(store.get(), vid, store.path)
    rles = require(entry, "masks_rle", store.path, f"video {vid}")
    return rle_frames(rles, num_frames, height, width, store.path, f"{vid}/masks_rle")


def read_revos(root: Path, split: str) -> list[VideoExpression]:
    """All expressions of `split` ("train" or "valid"), in file order. Masks load on first `masks()` call.

    The foreground masks (`mask_dict_foreground.json`, used by the R metric) are optional: without the file,
    `foreground()` returns None.
    """
    root = Path(root)
    meta_path = root / f"meta_expressions_{split}_.json"
    videos = require(load_json(meta_path), "videos", meta_path, kind=dict)
    mask_dict = LazyJson(require_file(root / "mask_dict.json"))
    fg_path = root / "mask_dict_foreground.json"
    foreground = LazyJson(fg_path) if fg_path.is_file() else None
    samples = []
    for vid, info in videos.items():
        where = f"videos/{vid}"
        frames = [str(f) for f in require(info, "frames", meta_path, where, list)]
        height = as_int(require(info, "height", meta_path, where), meta_path, f"{where}/height")
        width = as_int(require(info, "width", meta_path, where), meta_path, f"{where}/width")
        frame_paths = [root / "JPEGImages" / vid / f"{name}.jpg" for name in frames]
        fg_loader = partial(_foreground, foreground, vid, len(frames), height, width) if foreground else None
        for exp_id, exp in require(info, "expressions", meta_path, where, dict).items():
            at = f"{where}/expressions/{exp_id}"
            anno_ids, obj_ids = expression_ids(exp, meta_path, at)
            samples.append(VideoExpression(
                dataset="revos", video=vid, exp_id=str(exp_id),
                text=require(exp, "exp", meta_path, at, str),
                type_id=as_int(require(exp, "type_id", meta_path, at), meta_path, f"{at}/type_id"),
                frames=frames, frame_paths=frame_paths, height=height, width=width, obj_ids=obj_ids,
                answer=exp.get("answer"),
                mask_loader=partial(mask_dict_masks, mask_dict, anno_ids, len(frames), height, width),
                foreground_loader=fg_loader,
            ))
    return samples
