"""Segmentation results (text answer + one masklet per referred object), COCO RLE helpers, and the streaming writer.

`DIR/result.json` layout (what `SegmentationResult.to_json` returns):
    {"instruction": str, "text": str, "mode": str, "frames": [frame names], "height": int, "width": int,
     "objects": [{"id": 1-based int, "score": float, "masks_rle": [COCO RLE {"size", "counts": str} or null per frame]}],
     "timing": {name: seconds}}
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from ..errors import InputError
from .io import FrameSource, write_video

# Distinct colours (Trubetskoy's list), RGB; object k uses PALETTE[k % len(PALETTE)].
PALETTE: list[tuple[int, int, int]] = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40),
]


# ---------------------------------------------------------------------------------------------- RLE
def encode_mask(mask: np.ndarray) -> dict | None:
    """COCO RLE {"size": [H, W], "counts": str} of an (H, W) mask; None when the mask is empty."""
    mask = np.asarray(mask).astype(bool)
    if mask.ndim != 2:
        raise ValueError(f"encode_mask expects an (H, W) mask, got shape {mask.shape}")
    if not mask.any():
        return None
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_mask(rle: dict | None, height: int, width: int) -> np.ndarray:
    """(height, width) bool mask from a COCO RLE (str/bytes or uncompressed list counts); all False for None."""
    if rle is None:
        return np.zeros((height, width), dtype=bool)
    size = [int(v) for v in rle["size"]]
    if size != [height, width]:
        raise ValueError(f"RLE size {size} does not match the frame size [{height}, {width}]")
    counts = rle["counts"]
    if isinstance(counts, list):
        rle = mask_utils.frPyObjects({"size": size, "counts": counts}, height, width)
    else:
        rle = {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)


def _jsonable(rle: dict | None) -> dict | None:
    """The RLE with "counts" as str (bytes counts, as pycocotools returns them, are decoded)."""
    if rle is None or not isinstance(rle.get("counts"), bytes):
        return rle
    return {**rle, "counts": rle["counts"].decode("ascii")}


# ---------------------------------------------------------------------------------------------- results
@dataclass
class Masklet:
    """One referred object across the frames. id: 1-based; score: presence/confidence in [0, 1];
    masks_rle: one COCO RLE (string counts) or None (empty) per frame."""

    id: int
    score: float
    masks_rle: list[dict | None] = field(default_factory=list)

    def mask(self, t: int, height: int, width: int) -> np.ndarray:
        """(height, width) bool mask on frame t."""
        return decode_mask(self.masks_rle[t], height, width)

    def to_json(self) -> dict:
        return {"id": int(self.id), "score": float(self.score), "masks_rle": [_jsonable(r) for r in self.masks_rle]}


@dataclass
class SegmentationResult:
    """The answer to one instruction: text, and one Masklet per referred object (objects == [] for text only).
    frames: frame names; timing: seconds per stage."""

    instruction: str
    text: str
    mode: str
    frames: list[str]
    height: int
    width: int
    objects: list[Masklet] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)

    def masks(self, t: int) -> np.ndarray:
        """(N, height, width) bool masks of every object on frame t."""
        out = np.zeros((len(self.objects), self.height, self.width), dtype=bool)
        for k, obj in enumerate(self.objects):
            out[k] = obj.mask(t, self.height, self.width)
        return out

    def to_json(self) -> dict:
        return {
            "instruction": self.instruction, "text": self.text, "mode": self.mode, "frames": list(self.frames),
            "height": int(self.height), "width": int(self.width),
            "objects": [obj.to_json() for obj in self.objects],
            "timing": {k: float(v) for k, v in self.timing.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "result JSON") -> "SegmentationResult":
        """Inverse of to_json; InputError naming `where` on a missing key. height/width may be absent when some
        mask is non-empty (taken from its RLE size)."""
        try:
            objects = [Masklet(int(o["id"]), float(o["score"]), list(o["masks_rle"])) for o in data["objects"]]
            height, width = data.get("height"), data.get("width")
            if height is None or width is None:
                sizes = [r["size"] for o in objects for r in o.masks_rle if r is not None]
                height, width = sizes[0] if sizes else (0, 0)
            frames = list(data["frames"])
            for o in objects:
                if len(o.masks_rle) != len(frames):
                    raise ValueError(f"object {o.id} has {len(o.masks_rle)} masks for {len(frames)} frames")
            return cls(instruction=data["instruction"], text=data["text"], mode=data["mode"], frames=frames,
                       height=int(height), width=int(width), objects=objects,
                       timing={k: float(v) for k, v in data.get("timing", {}).items()})
        except KeyError as err:
            raise InputError(f"{where}: missing key {err}") from None
        except (TypeError, ValueError) as err:
            raise InputError(f"{where}: {err}") from None

    @classmethod
    def load(cls, path: str | Path) -> "SegmentationResult":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise InputError(f"{path}: cannot read result JSON ({err})") from None
        return cls.from_json(data, where=str(path))


# ---------------------------------------------------------------------------------------------- drawing
def _contour(mask: np.ndarray) -> np.ndarray:
    """Inner boundary pixels (1 px) of a bool mask; the image border does not count as a boundary."""
    p = np.pad(mask, 1, mode="edge")
    interior = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:] & mask
    return mask & ~interior


def overlay(frame: np.ndarray, masks: np.ndarray, colours: list[tuple[int, int, int]] | None = None) -> np.ndarray:
    """uint8 (H, W, 3): `frame` with each of the (N, H, W) masks blended at alpha 0.5 in its own colour (PALETTE
    cycled unless `colours`), and a 1 px contour in full colour."""
    colours = colours or PALETTE
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3 or masks.shape[1:] != frame.shape[:2]:
        raise ValueError(f"overlay: masks {masks.shape} do not match frame {frame.shape}")
    out = frame.astype(np.float32)
    for k, mask in enumerate(masks):
        if not mask.any():
            continue
        colour = np.asarray(colours[k % len(colours)], dtype=np.float32)
        out[mask] = 0.5 * out[mask] + 0.5 * colour
        out[_contour(mask)] = colour
    return np.round(out).clip(0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- writer
_RESULT_FILES = ("result.json", "overlay.mp4", "overlay.png")


def check_out_dir(out_dir: str | Path) -> Path:
    """`out_dir` as a Path; InputError when it (or its masks/) is there but not a directory. Callers check before
    the slow work, so that a bad --out never costs a run."""
    out = Path(out_dir)
    for path in (out, out / "masks"):
        if path.exists() and not path.is_dir():
            raise InputError(f"--out {out}: {path} exists and is not a directory")
    return out


def _remove_earlier_result(out: Path) -> None:
    """An earlier result in `out` is replaced whole: its masks, result.json and overlay go (nothing else)."""
    if (out / "masks").is_dir():
        shutil.rmtree(out / "masks")
    for name in _RESULT_FILES:
        (out / name).unlink(missing_ok=True)


class ResultWriter:
    """Streams a result to disk: DIR/masks/<object id>/<frame>.png (0/255, one per frame and object, empty ones
    too), DIR/result.json, and DIR/overlay.mp4 (video) or DIR/overlay.png (image). An earlier result in DIR is
    replaced (its masks/, result.json and overlay are removed first; other files stay).

    add() takes frames in any order, each once, writes their PNGs at once and keeps only RLEs in memory.
    finish() requires every frame to have been added (when there are objects)."""

    def __init__(self, out_dir: str | Path, source: FrameSource, num_objects: int):
        self.out_dir = check_out_dir(out_dir)
        _remove_earlier_result(self.out_dir)
        self.source = source
        self.num_objects = int(num_objects)
        self.height, self.width = source.height, source.width
        self._rles: list[list[dict | None]] = [[None] * len(source) for _ in range(self.num_objects)]
        self._added = np.zeros(len(source), dtype=bool)
        (self.out_dir / "masks").mkdir(parents=True, exist_ok=True)
        for k in range(self.num_objects):
            (self.out_dir / "masks" / str(k + 1)).mkdir(exist_ok=True)

    def add(self, t: int, masks: np.ndarray) -> None:
        """Masks (N, H, W) bool of every object on frame t."""
        masks = np.asarray(masks)
        if masks.dtype.kind == "f":
            raise ValueError("ResultWriter.add: masks must be bool (threshold probabilities first)")
        masks = masks.astype(bool, copy=False)
        if masks.shape != (self.num_objects, self.height, self.width):
            raise ValueError(f"ResultWriter.add: masks {masks.shape} != "
                             f"{(self.num_objects, self.height, self.width)} for frame {t}")
        if not 0 <= t < len(self._added):
            raise IndexError(f"ResultWriter.add: frame {t} out of range ({len(self._added)} frames)")
        if self._added[t]:
            raise ValueError(f"ResultWriter.add: frame {t} was already added")
        name = self.source.names[t]
        for k, mask in enumerate(masks):
            self._rles[k][t] = encode_mask(mask)
            Image.fromarray(mask.astype(np.uint8) * 255).save(
                self.out_dir / "masks" / str(k + 1) / f"{name}.png", compress_level=1)
        self._added[t] = True

    def finish(self, result: SegmentationResult) -> Path:
        """Complete `result` in place with the streamed RLEs (and frames/size if unset), write result.json
        atomically, then the overlay in one sequential pass over the source. Returns out_dir."""
        if len(result.objects) != self.num_objects:
            raise ValueError(f"ResultWriter.finish: result has {len(result.objects)} objects, "
                             f"writer was made for {self.num_objects}")
        if self.num_objects and not self._added.all():
            missing = [self.source.names[t] for t in np.flatnonzero(~self._added)]
            raise ValueError(f"ResultWriter.finish: {len(missing)} frames never added (first: {missing[0]})")
        for k, obj in enumerate(result.objects):
            if obj.id != k + 1:
                raise ValueError(f"ResultWriter.finish: object {k} has id {obj.id}, expected {k + 1}")
            obj.masks_rle = list(self._rles[k])
        result.frames = list(self.source.names)
        result.height, result.width = self.height, self.width
        tmp = self.out_dir / ".result.json.tmp"
        with open(tmp, "w") as f:
            json.dump(result.to_json(), f)
        os.replace(tmp, self.out_dir / "result.json")
        self._write_overlay()
        return self.out_dir

    def _masks(self, t: int) -> np.ndarray:
        out = np.zeros((self.num_objects, self.height, self.width), dtype=bool)
        for k in range(self.num_objects):
            out[k] = decode_mask(self._rles[k][t], self.height, self.width)
        return out

    def _write_overlay(self) -> None:
        frames = (overlay(frame, self._masks(t)) for t, frame in self.source.iter_frames())
        if self.source.is_video:
            write_video(self.out_dir / "overlay.mp4", frames, fps=self.source.fps)
        else:
            Image.fromarray(next(frames)).save(self.out_dir / "overlay.png")
