"""RefCOCO / RefCOCO+ / RefCOCOg reader (the REFER release layout).

```
root/instances.json      COCO: images [{id, file_name, height, width}], annotations [{id, image_id, segmentation,
                         category_id}], categories [{id, name}] (optional: the category maps for training);
                         optional attributes [{id, name}] with annotations' attribute_ids [id, ...] (the attribute
                         maps for training: each object painted with its first listed attribute)
root/refs(<split_by>).p  pickle of [{ref_id, ann_id, image_id, split, sentences: [{sent, sent_id, ...}], ...}]
root/images/<file_name>  the COCO images (train2014), named as in instances.json
```
The refs file is a pickle, and unpickling can run arbitrary code. It is read with an unpickler that refuses every
class: REFER's refs hold only lists, dicts, strings and numbers, which need none.
"""
from __future__ import annotations

import pickle
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from instructseg.data.formats.common import load_json, polygons_to_mask, require, require_file, require_list, \
    rle_decode
from instructseg.data.types import ImageSample
from instructseg.errors import InputError

REFCOCO_DATASETS = ("refcoco", "refcoco+", "refcocog")


class _ForbiddenClass(pickle.UnpicklingError):
    pass


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles builtin containers, strings and numbers only; any class or function reference is refused."""

    def find_class(self, module: str, name: str):
        raise _ForbiddenClass(f"{module}.{name}")


def load_refs(path: Path) -> list[dict]:
    """The REFER refs list, loaded without allowing any class (so no code can run)."""
    require_file(path)
    try:
        with open(path, "rb") as handle:
            refs = _PlainDataUnpickler(handle, encoding="utf-8", errors="replace").load()
    except _ForbiddenClass as err:
        raise InputError(f"{path}: refused to unpickle class {err}; a refs file may hold only lists, dicts, "
                         "strings and numbers") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as err:
        raise InputError(f"{path}: malformed pickle ({type(err).__name__}: {err})") from None
    return [require_dict(ref, path, f"refs[{i}]") for i, ref in enumerate(require_list(refs, path, "the refs"))]


def require_dict(value: Any, path: Path, where: str) -> dict:
    if not isinstance(value, dict):
        raise InputError(f"{path}: expected an object for {where}, got {type(value).__name__}")
    return value


def _index(items: Any, path: Path, key: str) -> dict[int, dict]:
    """{item["id"]: item} for the COCO list `key`."""
    out = {}
    for i, item in enumerate(require_list(items, path, f"'{key}'")):
        out[require(item, "id", path, f"{key}[{i}]")] = item
    return out


def _annotation_mask(ann: dict, height: int, width: int, path: Path) -> np.ndarray:
    """(1, H, W) bool from a COCO segmentation (polygons or RLE)."""
    where = f"annotation {ann.get('id')}"
    segmentation = require(ann, "segmentation", path, where)
    if isinstance(segmentation, dict):
        mask = rle_decode(segmentation, path, f"{where} segmentation")
    else:
        mask = polygons_to_mask(segmentation, height, width, path, f"{where} segmentation")
    return mask[None]


def _label_map(anns: list[dict], label, height: int, width: int, path: Path) -> np.ndarray:
    """(H, W) int16: the image's annotations painted in file order (later ones on top) with `label(ann)`."""
    out = np.zeros((height, width), dtype=np.int16)
    for ann in anns:
        out[_annotation_mask(ann, height, width, path)[0]] = label(ann)
    return out


def _attributes(coco: dict, annotations: dict, path: Path):
    """ann -> its first attribute's class (1 + position in `attributes`; 0 without one), or None when instances.json
    lists no attributes."""
    if not coco.get("attributes"):
        return None
    listed = require_list(coco["attributes"], path, "'attributes'")
    classes = {require(a, "id", path, f"attributes[{i}]"): i + 1 for i, a in enumerate(listed)}
    for ann in annotations.values():
        ids = ann.get("attribute_ids", [])
        unknown = [i for i in ids if i not in classes] if isinstance(ids, list) else [ids]
        if unknown:
            raise InputError(f"{path}: annotation {ann.get('id')} has attribute_ids {ids!r}, not all in 'attributes'")
    return lambda ann: classes[ann["attribute_ids"][0]] if ann.get("attribute_ids") else 0


def _categories(coco: dict, annotations: dict, path: Path) -> tuple[dict[int, int], dict[int, list[dict]]] | None:
    """({category_id: class}, {image_id: its annotations}) for the category maps, or None when instances.json
    lists no categories. Class c is the category at position c - 1 of `categories`."""
    if not coco.get("categories"):
        return None
    listed = require_list(coco["categories"], path, "'categories'")
    classes = {require(c, "id", path, f"categories[{i}]"): i + 1 for i, c in enumerate(listed)}
    by_image: dict[int, list[dict]] = {}
    for ann in annotations.values():
        category = require(ann, "category_id", path, f"annotation {ann.get('id')}")
        if category not in classes:
            raise InputError(f"{path}: annotation {ann.get('id')} has category_id {category}, not in 'categories'")
        by_image.setdefault(ann.get("image_id"), []).append(ann)
    return classes, by_image


def read_refcoco(root: Path, dataset: str = "refcoco", split_by: str = "unc", split: str = "val") -> list[ImageSample]:
    """One sample per sentence of the refs in `split` (e.g. "train", "val", "testA", "testB", "test").

    `root` holds the files of one dataset (`dataset` names it: "refcoco", "refcoco+" or "refcocog"); `split_by`
    picks `refs(<split_by>).p` ("unc" for RefCOCO/+, "umd" or "google" for RefCOCOg).
    """
    if dataset not in REFCOCO_DATASETS:
        raise InputError(f"read_refcoco: unknown dataset {dataset!r}, expected one of {', '.join(REFCOCO_DATASETS)}")
    root = Path(root)
    coco_path, refs_path = root / "instances.json", root / f"refs({split_by}).p"
    coco = load_json(coco_path)
    images = _index(require(coco, "images", coco_path), coco_path, "images")
    annotations = _index(require(coco, "annotations", coco_path), coco_path, "annotations")
    refs = load_refs(refs_path)
    categories = _categories(coco, annotations, coco_path)
    attributes = _attributes(coco, annotations, coco_path) if categories is not None else None
    chosen = [ref for i, ref in enumerate(refs) if require(ref, "split", refs_path, f"refs[{i}]") == split]
    if not chosen:
        present = sorted({str(ref["split"]) for ref in refs})
        raise InputError(f"{refs_path}: no refs in split {split!r} (splits present: {', '.join(present) or 'none'})")
    samples = []
    for ref in chosen:
        samples += _ref_samples(ref, images, annotations, categories, attributes, root, coco_path, refs_path,
                                dataset, split)
    return samples


def _ref_samples(ref: dict, images: dict, annotations: dict, categories: tuple | None, attributes, root: Path,
                 coco_path: Path, refs_path: Path, dataset: str, split: str) -> list[ImageSample]:
    where = f"ref {ref.get('ref_id')}"
    ann_id, image_id = require(ref, "ann_id", refs_path, where), require(ref, "image_id", refs_path, where)
    if ann_id not in annotations:
        raise InputError(f"{coco_path}: no annotation with id {ann_id} (used by {where} in {refs_path.name})")
    if image_id not in images:
        raise InputError(f"{coco_path}: no image with id {image_id} (used by {where} in {refs_path.name})")
    image = images[image_id]
    height = int(require(image, "height", coco_path, f"image {image_id}"))
    width = int(require(image, "width", coco_path, f"image {image_id}"))
    image_path = root / "images" / str(require(image, "file_name", coco_path, f"image {image_id}"))
    loader = partial(_annotation_mask, annotations[ann_id], height, width, coco_path)
    semantic = attribute_map = None
    if categories is not None:
        classes, by_image = categories
        anns = by_image.get(image_id, [])
        semantic = partial(_label_map, anns, lambda ann: classes[ann["category_id"]], height, width, coco_path)
        if attributes is not None:
            attribute_map = partial(_label_map, anns, attributes, height, width, coco_path)
    samples = []
    sentences = require_list(require(ref, "sentences", refs_path, where), refs_path, f"{where} sentences")
    for k, sentence in enumerate(sentences):
        text = require(sentence, "sent", refs_path, f"{where} sentences[{k}]", str)
        sent_id = sentence.get("sent_id", k)
        samples.append(ImageSample(
            dataset=dataset, sample_id=f"{ref.get('ref_id')}_{sent_id}", image_path=image_path, text=text,
            height=height, width=width, split=split, mask_loader=loader, semantic_loader=semantic,
            attribute_loader=attribute_map))
    return samples
