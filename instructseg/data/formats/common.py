"""Helpers shared by the dataset readers: checked file and key access, COCO RLE, palette PNGs.

Every problem with an input surfaces as one `InputError` line that names the file and what is wrong
(`<file>: missing key 'videos'`), never as a raw KeyError, JSONDecodeError or PIL error.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils

from instructseg.errors import InputError


def require_file(path: Path, what: str = "file") -> Path:
    """`path` if it is an existing file, else InputError."""
    if not path.is_file():
        raise InputError(f"{path}: {what} not found")
    return path


def require_dir(path: Path, what: str = "directory") -> Path:
    if not path.is_dir():
        raise InputError(f"{path}: {what} not found")
    return path


def load_json(path: Path) -> Any:
    """Parse a JSON file; a missing file or malformed JSON becomes an InputError naming the file."""
    require_file(path)
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: malformed JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None


def require(mapping: Any, key: str, path: Path, where: str = "", kind: type | tuple[type, ...] | None = None) -> Any:
    """`mapping[key]`, or InputError "<path>: missing key '<key>' in <where>"; with `kind`, also the value's type."""
    place = f" in {where}" if where else ""
    if not isinstance(mapping, dict):
        raise InputError(f"{path}: expected an object{place}, got {type(mapping).__name__}")
    if key not in mapping:
        raise InputError(f"{path}: missing key '{key}'{place}")
    value = mapping[key]
    if kind is not None and not isinstance(value, kind):
        raise InputError(f"{path}: key '{key}'{place} has type {type(value).__name__}, expected {_type_names(kind)}")
    return value


def id_list(value: Any, path: Path, where: str) -> list:
    """obj_id / anno_id as a list (the releases store either one id or a list)."""
    if isinstance(value, list):
        return value
    if isinstance(value, (int, str)):
        return [value]
    raise InputError(f"{path}: {where} must be an id or a list of ids, got {type(value).__name__}")


def as_int(value: Any, path: Path, where: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InputError(f"{path}: {where} must be an integer, got {value!r}") from None


def expression_ids(exp: Any, path: Path, at: str) -> tuple[list[str], list[int]]:
    """(anno_ids as str, obj_ids as int) of one expression entry (ReVOS / MeViS meta_expressions)."""
    anno_ids = [str(a) for a in id_list(require(exp, "anno_id", path, at), path, f"{at}/anno_id")]
    obj_ids = [as_int(o, path, f"{at}/obj_id") for o in id_list(require(exp, "obj_id", path, at), path, f"{at}/obj_id")]
    return anno_ids, obj_ids


def require_list(value: Any, path: Path, where: str) -> list:
    if not isinstance(value, list):
        raise InputError(f"{path}: expected a list for {where}, got {type(value).__name__}")
    return value


def _type_names(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


class LazyJson:
    """A JSON file loaded on first use and then kept (mask dictionaries can be large; listing needs none)."""

    def __init__(self, path: Path):
        self.path = path
        self._data: Any = None

    def get(self) -> Any:
        if self._data is None:
            self._data = load_json(self.path)
        return self._data


# ----------------------------------------------------------------------------------------------- masks

def rle_encode(mask: np.ndarray) -> dict:
    """COCO RLE of an (H, W) bool mask with `counts` as a str (JSON-friendly), as the public releases store it."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict) -> np.ndarray:
    """pycocotools' decode as (H, W) bool, without its numpy-2 DeprecationWarning about `__array__(copy=)`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)


def rle_decode(rle: Any, path: Path, where: str) -> np.ndarray:
    """(H, W) bool mask from a COCO RLE dict (compressed str/bytes counts or uncompressed list counts)."""
    size = require(rle, "size", path, where, (list, tuple))
    counts = require(rle, "counts", path, where, (str, bytes, list))
    if len(size) != 2:
        raise InputError(f"{path}: RLE 'size' in {where} must be [height, width], got {size}")
    if isinstance(counts, list):
        rle = mask_utils.frPyObjects({"size": list(size), "counts": counts}, int(size[0]), int(size[1]))
    else:
        rle = {"size": list(size), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    try:
        return decode_rle(rle)
    except Exception as err:  # pycocotools raises bare Exceptions for corrupt counts
        raise InputError(f"{path}: cannot decode RLE in {where} ({err})") from None


def polygons_to_mask(polygons: list, height: int, width: int, path: Path, where: str) -> np.ndarray:
    """(H, W) bool union of COCO polygons ([[x1, y1, x2, y2, ...], ...], pixel corners at integers)."""
    polys = [list(map(float, p)) for p in require_list(polygons, path, where)]
    if not polys:
        return np.zeros((height, width), dtype=bool)
    if any(len(p) < 6 or len(p) % 2 for p in polys):
        raise InputError(f"{path}: polygon in {where} needs at least three (x, y) points")
    return decode_rle(mask_utils.merge(mask_utils.frPyObjects(polys, height, width)))


def read_index_png(path: Path) -> np.ndarray:
    """(H, W) uint8 object ids from a palette (mode P) or grey (mode L) PNG."""
    require_file(path, "annotation")
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L"):
                raise InputError(f"{path}: expected a palette or grey PNG of object ids, got mode {image.mode}")
            return np.array(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as err:
        raise InputError(f"{path}: unreadable image ({err})") from None


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from an image header, without decoding the pixels."""
    require_file(path, "image")
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError) as err:
        raise InputError(f"{path}: unreadable image ({err})") from None
    return height, width



def rle_frames(rles: Any, num_frames: int, height: int, width: int, path: Path, where: str) -> np.ndarray:
    """(T, H, W) bool from a per-frame list of RLEs where null means "not present in this frame"."""
    rles = require_list(rles, path, where)
    if len(rles) != num_frames:
        raise InputError(f"{path}: {where} has {len(rles)} frames, the metadata lists {num_frames}")
    out = np.zeros((num_frames, height, width), dtype=bool)
    for t, rle in enumerate(rles):
        if rle is not None:
            out[t] = _fit(rle_decode(rle, path, f"{where}[{t}]"), height, width, path, f"{where}[{t}]")
    return out


def _fit(mask: np.ndarray, height: int, width: int, path: Path, where: str) -> np.ndarray:
    if mask.shape != (height, width):
        raise InputError(f"{path}: RLE in {where} has size {list(mask.shape)}, expected [{height}, {width}]")
    return mask


def mask_dict_masks(mask_dict: LazyJson, anno_ids: list[str], num_frames: int, height: int, width: int
                    ) -> np.ndarray:
    """(len(anno_ids), T, H, W) bool from a ReVOS/MeViS `mask_dict.json` ({anno_id: [RLE or null per frame]})."""
    data = mask_dict.get()
    out = np.zeros((len(anno_ids), num_frames, height, width), dtype=bool)
    for k, anno_id in enumerate(anno_ids):
        rles = require(data, anno_id, mask_dict.path)
        out[k] = rle_frames(rles, num_frames, height, width, mask_dict.path, f"anno_id {anno_id}")
    return out
