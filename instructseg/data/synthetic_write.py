"""ShapesIVS writers: one function per public dataset layout (ReVOS, Ref-YouTube-VOS, RefCOCO, ReasonSeg, LLaVA).

The writers take already rendered scenes and their expressions; they only lay files out the way the public
releases do, so the readers in `instructseg.data.formats` read both the real data and this synthetic data.
"""
from __future__ import annotations

import io
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from instructseg.data.formats.common import rle_encode
from instructseg.data.synthetic_scene import COLOURS, SHAPES, Rendered, Scene
from instructseg.data.synthetic_text import ObjectFacts, Query

JPEG_QUALITY = 95
REFCOCO_EVAL_SPLITS = ("val", "testA", "testB")  # held-out images are dealt round-robin over these


@dataclass
class VideoRecord:
    """A rendered video with its expressions."""

    vid: str
    index: int
    split: str              # "train" | "valid"
    scene: Scene
    rendered: Rendered
    queries: list[Query]

    @property
    def frame_names(self) -> list[str]:
        return [f"{t:05d}" for t in range(self.scene.num_frames)]


@dataclass
class ImageRecord:
    """A rendered still image with its referring sentences, one reasoning query and a chat."""

    name: str
    index: int
    split: str                                  # "train" | "valid"
    scene: Scene
    rendered: Rendered                          # PIL rasterisation (ReasonSeg, chat)
    rendered_coco: Rendered                     # pycocotools rasterisation (RefCOCO)
    facts: list[ObjectFacts]
    refs: list[tuple[int, list[str]]]           # (object index, sentences that single it out)
    reasoning: Query | None
    chat: list[tuple[str, str]]                 # (question, answer)


def jpeg_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # 4:4:4 chroma: with 4:2:0 the colours of small shapes bleed a pixel beyond their masks
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buffer.getvalue()


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, separators=(",", ":")), encoding="utf-8")


def _write_frames(folder: Path, video: VideoRecord, jpegs: list[bytes]) -> None:
    for name, data in zip(video.frame_names, jpegs):
        _write_bytes(folder / video.vid / f"{name}.jpg", data)


def _palette() -> list[int]:
    """The usual VOC/DAVIS palette: id bits spread over the high bits of R, G and B."""
    colours = []
    for index in range(256):
        r = g = b = 0
        value = index
        for shift in range(7, -1, -1):
            r |= (value & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        colours += [r, g, b]
    return colours


# ----------------------------------------------------------------------------------------------- videos

def write_revos(root: Path, videos: list[VideoRecord], jpegs: dict[str, list[bytes]]) -> int:
    """ReVOS layout; returns the number of expressions. One anno_id per (video, object)."""
    metas: dict[str, dict] = {"train": {}, "valid": {}}
    mask_dict: dict[str, list] = {}
    foreground: dict[str, dict] = {}
    for video in videos:
        _write_frames(root / "JPEGImages", video, jpegs[video.vid])
        anno_ids = []
        for visible in video.rendered.visible:
            anno_ids.append(str(len(mask_dict)))
            mask_dict[anno_ids[-1]] = [rle_encode(m) if m.any() else None for m in visible]
        union = video.rendered.visible.any(axis=0)
        foreground[video.vid] = {"masks_rle": [rle_encode(m) for m in union]}
        expressions = {}
        for k, query in enumerate(video.queries):
            expressions[str(k)] = {
                "exp": query.text,
                "obj_id": [video.scene.objects[i].obj_id for i in query.targets],
                "anno_id": [anno_ids[i] for i in query.targets],
                "type_id": query.type_id,
                "answer": query.answer,
            }
        metas[video.split][video.vid] = {
            "vid_id": video.index, "frames": video.frame_names,
            "height": video.scene.height, "width": video.scene.width, "expressions": expressions,
        }
    for split, videos_meta in metas.items():
        _write_json(root / f"meta_expressions_{split}_.json", {"videos": videos_meta})
    _write_json(root / "mask_dict.json", mask_dict)
    _write_json(root / "mask_dict_foreground.json", foreground)
    return sum(len(v["expressions"]) for meta in metas.values() for v in meta.values())


def write_refytvos(root: Path, videos: list[VideoRecord], jpegs: dict[str, list[bytes]]) -> int:
    """Ref-YouTube-VOS layout (palette PNG annotations); single-object referring expressions only."""
    palette = _palette()
    metas: dict[str, dict] = {"train": {}, "valid": {}}
    count = 0
    for video in videos:
        _write_frames(root / video.split / "JPEGImages", video, jpegs[video.vid])
        ids = np.zeros(video.rendered.visible.shape[1:], dtype=np.uint8)
        for obj, visible in zip(video.scene.objects, video.rendered.visible):
            ids[visible] = obj.obj_id  # visible masks are disjoint
        for name, frame_ids in zip(video.frame_names, ids):
            png = Image.fromarray(frame_ids)
            png.putpalette(palette)  # turns the grey image into a palette (mode P) image
            path = root / video.split / "Annotations" / video.vid / f"{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            png.save(path)
        singles = [q for q in video.queries if q.type_id == 0 and len(q.targets) == 1]
        expressions = {str(k): {"exp": q.text, "obj_id": str(video.scene.objects[q.targets[0]].obj_id)}
                       for k, q in enumerate(singles)}
        metas[video.split][video.vid] = {"expressions": expressions, "frames": video.frame_names}
        count += len(expressions)
    for split, videos_meta in metas.items():
        _write_json(root / "meta_expressions" / split / "meta_expressions.json", {"videos": videos_meta})
    return count


# ----------------------------------------------------------------------------------------------- images

def _coco_polygon(scene: Scene, index: int) -> list[float]:
    """Flat COCO polygon [x1, y1, x2, y2, ...]."""
    return [v for point in scene.objects[index].outline() for v in point]


def _bbox(polygon: list[float]) -> list[float]:
    xs, ys = polygon[0::2], polygon[1::2]
    return [round(min(xs), 2), round(min(ys), 2), round(max(xs) - min(xs), 2), round(max(ys) - min(ys), 2)]


def write_refcoco(root: Path, images: list[ImageRecord], jpegs: dict[str, bytes]) -> int:
    """COCO `instances.json`, `refs(unc).p` (REFER pickle, protocol 2) and `images/`; returns the sentence count.
    Besides COCO's fields, `attributes` lists the colours and each annotation's `attribute_ids` its colour."""
    colours = list(COLOURS)
    coco = {"images": [], "annotations": [],
            "categories": [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPES)],
            "attributes": [{"id": i + 1, "name": name} for i, name in enumerate(colours)]}
    refs, sentences, held_out = [], 0, 0
    for image_id, record in enumerate(images, start=1):
        file_name = f"{record.name}.jpg"
        _write_bytes(root / "images" / file_name, jpegs[record.name])
        coco["images"].append({"id": image_id, "file_name": file_name,
                               "height": record.scene.height, "width": record.scene.width})
        ann_ids = {}
        for index, obj in enumerate(record.scene.objects):
            polygon = _coco_polygon(record.scene, index)
            ann_ids[index] = len(coco["annotations"]) + 1
            coco["annotations"].append({
                "id": ann_ids[index], "image_id": image_id, "category_id": SHAPES.index(obj.shape) + 1,
                "attribute_ids": [colours.index(obj.colour) + 1], "segmentation": [polygon],
                "area": int(record.rendered_coco.visible[index].sum()),
                "bbox": _bbox(polygon), "iscrowd": 0})
        split = "train"
        if record.split != "train":
            split, held_out = REFCOCO_EVAL_SPLITS[held_out % len(REFCOCO_EVAL_SPLITS)], held_out + 1
        for index, texts in record.refs:
            sent_ids = list(range(sentences, sentences + len(texts)))
            sentences += len(texts)
            refs.append({
                "ref_id": len(refs), "ann_id": ann_ids[index], "image_id": image_id, "split": split,
                "sentences": [{"sent": t, "raw": t, "tokens": t.split(), "sent_id": s}
                              for t, s in zip(texts, sent_ids)],
                "sent_ids": sent_ids, "category_id": SHAPES.index(record.scene.objects[index].shape) + 1,
                "file_name": f"{record.name}_{ann_ids[index]}.jpg"})
    _write_json(root / "instances.json", coco)
    (root / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    return sentences


def write_reasonseg(root: Path, images: list[ImageRecord], jpegs: dict[str, bytes]) -> int:
    """`<split>/<name>.jpg` + `<name>.json` with target/ignore polygons; splits "train" and "val"."""
    count = 0
    for record in images:
        query = record.reasoning
        if query is None:
            continue
        folder = root / ("train" if record.split == "train" else "val")
        shapes = [{"label": label, "points": [list(p) for p in record.scene.objects[i].outline()],
                   "shape_type": "polygon"}
                  for label, indices in (("target", query.targets), ("ignore", query.ignore)) for i in indices]
        _write_bytes(folder / f"{record.name}.jpg", jpegs[record.name])
        _write_json(folder / f"{record.name}.json",
                    {"text": [query.text], "is_sentence": query.is_sentence, "shapes": shapes, "answer": query.answer})
        count += 1
    return count


def write_chat(root: Path, images: list[ImageRecord], jpegs: dict[str, bytes]) -> int:
    """LLaVA-style `conversations.json` with `images/`; the first question carries the `<image>` token."""
    items = []
    for record in images:
        if not record.chat:
            continue
        _write_bytes(root / "images" / f"{record.name}.jpg", jpegs[record.name])
        turns = []
        for k, (question, answer) in enumerate(record.chat):
            turns.append({"from": "human", "value": ("<image>\n" if k == 0 else "") + question})
            turns.append({"from": "gpt", "value": answer})
        items.append({"id": record.name, "image": f"images/{record.name}.jpg", "conversations": turns})
    _write_json(root / "conversations.json", items)
    return len(items)
