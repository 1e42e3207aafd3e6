"""ReasonSeg reader (LISA release layout).

```
root/<split>/<name>.jpg
root/<split>/<name>.json   {"text": [query, ...], "is_sentence": bool,
                            "shapes": [{"label": "target" | "ignore", "points": [[x, y], ...],
                                        "shape_type": "polygon"}]}
```
Polygons are painted the way LISA does: largest first, so a smaller polygon drawn later wins where they overlap;
"target" pixels form the single ground-truth object and "ignore" pixels are excluded from scoring. Points use pixel
centres at integer coordinates (OpenCV's convention, as in LISA).
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from instructseg.data.formats.common import image_size, load_json, require, require_dir, require_list
from instructseg.data.types import ImageSample
from instructseg.errors import InputError

TARGET, IGNORE = 1, 255
_LABELS = {"target": TARGET, "ignore": IGNORE}


def _polygon(shape: dict, path: Path, where: str) -> list[tuple[float, float]]:
    """Vertices of one labelme shape (polygons; rectangles become their four corners)."""
    points = require_list(require(shape, "points", path, where), path, f"{where} points")
    try:
        vertices = [(float(x), float(y)) for x, y in points]
    except (TypeError, ValueError):
        raise InputError(f"{path}: {where} points must be [x, y] pairs") from None
    kind = shape.get("shape_type", "polygon")
    if kind == "rectangle" and len(vertices) == 2:
        (x0, y0), (x1, y1) = vertices
        vertices = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    elif kind != "polygon":
        raise InputError(f"{path}: {where} has shape_type {kind!r}, expected 'polygon' or 'rectangle'")
    if len(vertices) < 3:
        raise InputError(f"{path}: {where} needs at least three points")
    return vertices


def _area(vertices: list[tuple[float, float]]) -> float:
    xs, ys = np.array(vertices).T
    return 0.5 * abs(float(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))))


def _parse_shapes(data: dict, path: Path) -> list[tuple[int, list[tuple[float, float]]]]:
    """(label value, polygon) pairs in painting order (largest area first); "flag" shapes are skipped."""
    parsed = []
    for i, shape in enumerate(require_list(require(data, "shapes", path), path, "'shapes'")):
        label = require(shape, "label", path, f"shapes[{i}]", str)
        if label == "flag":
            continue
        if label not in _LABELS:
            raise InputError(f"{path}: shapes[{i}] has label {label!r}, expected 'target' or 'ignore'")
        parsed.append((_LABELS[label], _polygon(shape, path, f"shapes[{i}]")))
    return sorted(parsed, key=lambda item: -_area(item[1]))


def _label_map(shapes: list[tuple[int, list[tuple[float, float]]]], height: int, width: int) -> np.ndarray:
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for value, vertices in shapes:
        draw.polygon(vertices, fill=value)
    return np.asarray(canvas)


def _target(shapes, height: int, width: int) -> np.ndarray:
    return (_label_map(shapes, height, width) == TARGET)[None]


def _ignore(shapes, height: int, width: int) -> np.ndarray | None:
    if not any(value == IGNORE for value, _ in shapes):
        return None
    return _label_map(shapes, height, width) == IGNORE


def read_reasonseg(root: Path, split: str) -> list[ImageSample]:
    """One sample per text entry of every `<split>/<name>.json` ("train", "val", "test"), sorted by name.
    The image's size comes from its header; masks are painted on first `masks()` call."""
    folder = require_dir(Path(root) / split, f"ReasonSeg split '{split}'")
    samples = []
    for json_path in sorted(folder.glob("*.json")):
        data = load_json(json_path)
        texts = require(data, "text", json_path, kind=(list, str))
        texts = [texts] if isinstance(texts, str) else texts
        shapes = _parse_shapes(data, json_path)
        image_path = json_path.with_suffix(".jpg")
        height, width = image_size(image_path)
        for k, text in enumerate(texts):
            if not isinstance(text, str):
                raise InputError(f"{json_path}: text[{k}] must be a string, got {type(text).__name__}")
            samples.append(ImageSample(
                dataset="reasonseg", sample_id=f"{json_path.stem}_{k}", image_path=image_path, text=text,
                height=height, width=width, split=split, answer=data.get("answer"),
                is_sentence=bool(data.get("is_sentence", False)),
                mask_loader=partial(_target, shapes, height, width),
                ignore_loader=partial(_ignore, shapes, height, width)))
    return samples
