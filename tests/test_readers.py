"""Dataset readers on ShapesIVS output (and small layouts converted from it), plus bad-input handling."""
from __future__ import annotations

import datetime
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from scipy.ndimage import binary_erosion

from instructseg.data.formats import VIDEO_READERS, read_davis17, read_llava, read_mevis, read_reasonseg, \
    read_refcoco, read_refytvos, read_revos
from instructseg.data.formats.common import decode_rle
from instructseg.data.synthetic import COLOURS, SynthSpec, build_image, build_video
from instructseg.data.types import ChatSample, ImageSample, VideoExpression
from instructseg.errors import InputError

SPEC = SynthSpec(seed=0, videos=4, images=8, frames=6, height=64, width=80)  # the conftest fixture's spec


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


# ----------------------------------------------------------------------------------------------- videos

def test_revos_samples_and_masks(synth_root):
    for split in ("train", "valid"):
        samples = read_revos(synth_root / "revos", split)
        meta = json.loads((synth_root / "revos" / f"meta_expressions_{split}_.json").read_text())["videos"]
        assert len(samples) == sum(len(v["expressions"]) for v in meta.values())
        for s in samples:
            assert isinstance(s, VideoExpression) and s.dataset == "revos"
            assert all(p.is_file() for p in s.frame_paths) and len(s.frame_paths) == SPEC.frames
            masks = s.masks()
            assert masks.dtype == bool and masks.shape == (len(s.obj_ids), SPEC.frames, SPEC.height, SPEC.width)
            assert s.union_masks().shape == (SPEC.frames, SPEC.height, SPEC.width)
            foreground = s.foreground()
            assert not (s.union_masks() & ~foreground).any(), "foreground must contain every expression's masks"
            if s.type_id == 2:
                assert masks.shape[0] == 0 and not s.union_masks().any()
            else:
                assert masks.any(axis=(1, 2, 3)).all(), "each referred object is visible somewhere"
            assert s.answer


def test_revos_masks_equal_the_rendered_masks(synth_root):
    samples = read_revos(synth_root / "revos", "train") + read_revos(synth_root / "revos", "valid")
    for index in range(SPEC.videos):
        record = build_video(SPEC, index)
        mine = [s for s in samples if s.video == record.vid]
        assert mine
        for s in mine:
            expected = record.rendered.visible[[o - 1 for o in s.obj_ids]]
            assert np.array_equal(s.masks(), expected)
        assert np.array_equal(mine[0].foreground(), record.rendered.visible.any(axis=0))


def test_refytvos_matches_revos_on_the_same_scenes(synth_root):
    for split in ("train", "valid"):
        revos = {(s.video, s.obj_ids[0]): s for s in read_revos(synth_root / "revos", split) if len(s.obj_ids) == 1}
        samples = read_refytvos(synth_root / "refytvos", split)
        assert samples
        for s in samples:
            assert s.dataset == "refytvos" and s.type_id == 0 and len(s.obj_ids) == 1
            assert (s.height, s.width) == (SPEC.height, SPEC.width)
            assert s.foreground() is None
            assert np.array_equal(s.masks(), revos[(s.video, s.obj_ids[0])].masks())


def test_refytvos_split_without_annotations(synth_root, tmp_path):
    root = tmp_path / "ytvos"
    shutil.copytree(synth_root / "refytvos", root)
    shutil.rmtree(root / "valid" / "Annotations")
    meta_path = root / "meta_expressions" / "valid" / "meta_expressions.json"
    meta = json.loads(meta_path.read_text())
    for video in meta["videos"].values():  # the real valid split has no obj_id either
        for e in video["expressions"].values():
            del e["obj_id"]
    _write_json(meta_path, meta)
    samples = read_refytvos(root, "valid")
    assert samples and all(s.obj_ids == [] for s in samples)
    with pytest.raises(InputError, match="annotations are absent"):
        samples[0].masks()


def _mevis_from_revos(synth_root: Path, root: Path, split: str) -> None:
    """A MeViS layout converted from the ReVOS output: no sizes or types in the metadata, mask_dict per split."""
    meta = json.loads((synth_root / "revos" / "meta_expressions_valid_.json").read_text())["videos"]
    videos = {}
    for vid, video in meta.items():
        shutil.copytree(synth_root / "revos" / "JPEGImages" / vid, root / split / "JPEGImages" / vid)
        expressions = {k: {"exp": e["exp"], "obj_id": [o - 1 for o in e["obj_id"]],
                           "anno_id": [int(a) for a in e["anno_id"]]}
                       for k, e in video["expressions"].items() if e["type_id"] != 2}
        videos[vid] = {"expressions": expressions, "vid_id": video["vid_id"], "frames": video["frames"]}
    _write_json(root / split / "meta_expressions.json", {"videos": videos})


def test_mevis_reader(synth_root, tmp_path):
    root = tmp_path / "mevis"
    _mevis_from_revos(synth_root, root, "valid_u")
    shutil.copy(synth_root / "revos" / "mask_dict.json", root / "valid_u" / "mask_dict.json")
    samples = read_mevis(root, "valid_u")
    revos = {(s.video, s.exp_id): s for s in read_revos(synth_root / "revos", "valid")}
    assert samples
    for s in samples:
        assert s.dataset == "mevis" and (s.height, s.width) == (SPEC.height, SPEC.width)
        reference = revos[(s.video, s.exp_id)]
        assert s.obj_ids == [o - 1 for o in reference.obj_ids]
        assert np.array_equal(s.masks(), reference.masks())
    _mevis_from_revos(synth_root, root, "valid")  # the online split: no mask_dict.json
    with pytest.raises(InputError, match="annotations are absent"):
        read_mevis(root, "valid")[0].masks()


def test_davis17_reader_shares_the_ytvos_layout(synth_root, tmp_path):
    root = tmp_path / "davis"
    shutil.copytree(synth_root / "refytvos" / "valid", root / "valid")
    shutil.copytree(synth_root / "refytvos" / "meta_expressions" / "valid", root / "meta_expressions" / "valid")
    davis = read_davis17(root, "valid")
    ytvos = read_refytvos(synth_root / "refytvos", "valid")
    assert [s.dataset for s in davis] == ["davis17"] * len(ytvos)
    for a, b in zip(davis, ytvos):
        assert (a.video, a.exp_id, a.text, a.obj_ids) == (b.video, b.exp_id, b.text, b.obj_ids)
        assert np.array_equal(a.masks(), b.masks())


def test_video_readers_registry():
    assert VIDEO_READERS == {"revos": read_revos, "refytvos": read_refytvos, "mevis": read_mevis,
                             "davis17": read_davis17}


def test_revos_missing_anno_id_in_mask_dict(synth_root, tmp_path):
    root = tmp_path / "revos"
    shutil.copytree(synth_root / "revos", root)
    mask_dict = json.loads((root / "mask_dict.json").read_text())
    sample = next(s for s in read_revos(root, "valid") if s.obj_ids)
    anno = json.loads((root / "meta_expressions_valid_.json").read_text())["videos"][sample.video]["expressions"]
    missing = anno[sample.exp_id]["anno_id"][0]
    del mask_dict[missing]
    _write_json(root / "mask_dict.json", mask_dict)
    with pytest.raises(InputError, match=rf"mask_dict\.json: missing key '{missing}'"):
        read_revos(root, "valid")[int(sample.exp_id)].masks()


# ----------------------------------------------------------------------------------------------- images

def test_refcoco_masks_equal_the_polygons(synth_root):
    coco = json.loads((synth_root / "refcoco" / "instances.json").read_text())
    images = {im["file_name"]: im for im in coco["images"]}
    anns_by_image = {}
    for ann in coco["annotations"]:
        anns_by_image.setdefault(ann["image_id"], []).append(ann)
    refs = pickle.loads((synth_root / "refcoco" / "refs(unc).p").read_bytes())  # our own file: trusted here
    for split in ("train", "val"):
        samples = read_refcoco(synth_root / "refcoco", "refcoco", "unc", split)
        assert len(samples) == sum(len(r["sentences"]) for r in refs if r["split"] == split)
        for s in samples:
            assert isinstance(s, ImageSample) and s.image_path.is_file() and s.split == split
            mask = s.masks()
            assert mask.shape == (1, SPEC.height, SPEC.width) and mask.any()
            candidates = anns_by_image[images[s.image_path.name]["id"]]
            decoded = [decode_rle(mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], s.height, s.width)))
                       for a in candidates]
            assert sum(np.array_equal(mask[0], d) for d in decoded) == 1
            assert mask.sum() == next(a["area"] for a, d in zip(candidates, decoded) if np.array_equal(mask[0], d))


def test_refcoco_masks_cover_the_shape_pixels(synth_root):
    """The polygon masks sit on the rendered shapes: the pixels inside have the referred shape's colour."""
    records = {f"img{i:05d}": build_image(SPEC, i) for i in range(SPEC.images)}
    for s in read_refcoco(synth_root / "refcoco", split="train"):
        record = records[s.image_path.stem]
        mask = s.union_mask()
        index = next(i for i, v in enumerate(record.rendered_coco.visible[:, 0]) if np.array_equal(v, mask))
        core = binary_erosion(mask)
        pixels = np.asarray(Image.open(s.image_path)).astype(float)[core]
        expected = COLOURS[record.scene.objects[index].colour]
        assert np.abs(np.median(pixels, axis=0) - expected).max() < 30, s.text


def test_refcoco_dataset_names_and_splits(synth_root):
    plus = read_refcoco(synth_root / "refcoco", "refcoco+", "unc", "val")
    assert plus and all(s.dataset == "refcoco+" for s in plus)
    with pytest.raises(InputError, match="unknown dataset"):
        read_refcoco(synth_root / "refcoco", "refclef")
    with pytest.raises(InputError, match=r"no refs in split 'test'.*testA"):
        read_refcoco(synth_root / "refcoco", split="test")
    with pytest.raises(InputError, match=r"refs\(umd\)\.p: file not found"):
        read_refcoco(synth_root / "refcoco", "refcocog", "umd")


class _Payload:
    """Unpickling this would run `os.system`: the reader must refuse before anything runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("make", [lambda tmp: [datetime.date(2020, 1, 1)], lambda tmp: [_Payload(tmp / "ran")]])
def test_refs_pickle_with_a_class_is_refused(synth_root, tmp_path, make):
    root = tmp_path / "refcoco"
    shutil.copytree(synth_root / "refcoco", root)
    (root / "refs(unc).p").write_bytes(pickle.dumps(make(tmp_path), protocol=2))
    with pytest.raises(InputError, match=r"refs\(unc\)\.p: refused to unpickle class"):
        read_refcoco(root)
    assert not (tmp_path / "ran").exists()


def test_reasonseg_reader(synth_root):
    for split in ("train", "val"):
        samples = read_reasonseg(synth_root / "reasonseg", split)
        assert len(samples) == len(list((synth_root / "reasonseg" / split).glob("*.json")))
        for s in samples:
            assert s.dataset == "reasonseg" and s.answer and s.is_sentence == s.text.endswith("?")
            assert s.masks().shape == (1, SPEC.height, SPEC.width) and s.masks().any()
    records = {f"img{i:05d}": build_image(SPEC, i) for i in range(SPEC.images)}
    for s in read_reasonseg(synth_root / "reasonseg", "train"):
        record = records[s.image_path.stem]
        expected = record.rendered.visible[list(record.reasoning.targets), 0].any(axis=0)
        assert np.array_equal(s.union_mask(), expected)


def test_reasonseg_texts_and_ignore(tmp_path):
    folder = tmp_path / "val"
    folder.mkdir()
    Image.new("RGB", (40, 30)).save(folder / "a.jpg")
    shapes = [{"label": "ignore", "points": [[0, 0], [39, 0], [39, 29], [0, 29]], "shape_type": "polygon"},
              {"label": "target", "points": [[10, 10], [20, 10], [20, 20], [10, 20]], "shape_type": "polygon"},
              {"label": "flag", "points": [[0, 0], [1, 0], [1, 1]], "shape_type": "polygon"}]
    _write_json(folder / "a.json", {"text": ["first query", "second query"], "is_sentence": True, "shapes": shapes})
    samples = read_reasonseg(tmp_path, "val")
    assert [s.sample_id for s in samples] == ["a_0", "a_1"] and samples[1].text == "second query"
    target, ignore = samples[0].masks()[0], samples[0].ignore()
    assert target.sum() == 121  # the smaller polygon is painted last (11 x 11 pixels, boundary included)
    assert ignore.sum() == 40 * 30 - 121 and not (target & ignore).any()


def test_llava_reader(synth_root):
    samples = read_llava(synth_root / "chat" / "conversations.json", synth_root / "chat")
    assert samples and all(isinstance(s, ChatSample) for s in samples)
    for s in samples:
        assert s.image_path.is_file()
        assert [role for role, _ in s.turns] == ["user", "assistant"] * (len(s.turns) // 2)
        assert all("<image>" not in text and text == text.strip() for _, text in s.turns)
        assert s.turns[0][1].startswith("How many shapes")


def test_llava_without_image_and_bad_role(tmp_path):
    path = tmp_path / "chat.json"
    turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
    _write_json(path, [{"id": 7, "conversations": turns}])
    assert read_llava(path, tmp_path)[0] == ChatSample("7", None, [("user", "hi"), ("assistant", "hello")])
    _write_json(path, [{"id": 7, "conversations": [{"from": "robot", "value": "hi"}]}])
    with pytest.raises(InputError, match=r"chat\.json: item 0 conversations\[0\] has unknown speaker 'robot'"):
        read_llava(path, tmp_path)


# ----------------------------------------------------------------------------------------------- bad input

def _revos_layout(tmp: Path) -> tuple[Path, Path, callable]:
    _write_json(tmp / "mask_dict.json", {})
    return tmp, tmp / "meta_expressions_valid_.json", lambda: read_revos(tmp, "valid")


def _ytvos_layout(tmp: Path) -> tuple[Path, Path, callable]:
    return tmp, tmp / "meta_expressions" / "valid" / "meta_expressions.json", lambda: read_refytvos(tmp, "valid")


def _davis_layout(tmp: Path) -> tuple[Path, Path, callable]:
    return tmp, tmp / "meta_expressions" / "valid" / "meta_expressions.json", lambda: read_davis17(tmp, "valid")


def _mevis_layout(tmp: Path) -> tuple[Path, Path, callable]:
    return tmp, tmp / "valid_u" / "meta_expressions.json", lambda: read_mevis(tmp, "valid_u")


def _refcoco_layout(tmp: Path) -> tuple[Path, Path, callable]:
    return tmp, tmp / "instances.json", lambda: read_refcoco(tmp)


def _reasonseg_layout(tmp: Path) -> tuple[Path, Path, callable]:
    (tmp / "val").mkdir(parents=True, exist_ok=True)
    return tmp, tmp / "val" / "x.json", lambda: read_reasonseg(tmp, "val")


def _llava_layout(tmp: Path) -> tuple[Path, Path, callable]:
    return tmp, tmp / "chat.json", lambda: read_llava(tmp / "chat.json", tmp)


LAYOUTS = {"revos": (_revos_layout, {}, "videos"), "refytvos": (_ytvos_layout, {}, "videos"),
           "davis17": (_davis_layout, {}, "videos"), "mevis": (_mevis_layout, {}, "videos"),
           "refcoco": (_refcoco_layout, {}, "images"), "reasonseg": (_reasonseg_layout, {"text": ["q"]}, "shapes"),
           "llava": (_llava_layout, [{"id": 1}], "conversations")}


@pytest.mark.parametrize("name", sorted(set(LAYOUTS) - {"reasonseg"}))
def test_missing_file(tmp_path, name):
    _, path, read = LAYOUTS[name][0](tmp_path)
    with pytest.raises(InputError, match="not found") as err:
        read()
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_malformed_json(tmp_path, name):
    _, path, read = LAYOUTS[name][0](tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"videos": {')
    with pytest.raises(InputError, match="malformed JSON") as err:
        read()
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_absent_key(tmp_path, name):
    layout, incomplete, key = LAYOUTS[name]
    _, path, read = layout(tmp_path)
    _write_json(path, incomplete)
    with pytest.raises(InputError) as err:
        read()
    assert str(err.value).startswith(str(path)) and f"missing key '{key}'" in str(err.value)


def test_absent_expression_key_names_the_expression(synth_root, tmp_path):
    root = tmp_path / "revos"
    shutil.copytree(synth_root / "revos", root)
    path = root / "meta_expressions_valid_.json"
    meta = json.loads(path.read_text())
    vid = next(iter(meta["videos"]))
    del meta["videos"][vid]["expressions"]["0"]["type_id"]
    _write_json(path, meta)
    with pytest.raises(InputError, match=rf"missing key 'type_id' in videos/{vid}/expressions/0"):
        read_revos(root, "valid")


def test_reasonseg_missing_image(tmp_path):
    _write_json(tmp_path / "val" / "x.json", {"text": ["q"], "shapes": []})
    with pytest.raises(InputError, match=r"x\.jpg: image not found"):
        read_reasonseg(tmp_path, "val")


def test_missing_reasonseg_split(tmp_path):
    with pytest.raises(InputError, match=r"ReasonSeg split 'val' not found"):
        read_reasonseg(tmp_path, "val")


def test_refcoco_category_maps_paint_every_shape_with_its_class(synth_root):
    """The category map of a RefCOCO image: each rendered shape's visible pixels carry 1 + its shape's index (the
    synthetic instances.json lists the shapes as categories in that order), the rest is 0."""
    records = {f"img{i:05d}": build_image(SPEC, i) for i in range(SPEC.images)}
    from instructseg.data.synthetic_scene import SHAPES

    for s in read_refcoco(synth_root / "refcoco", split="train")[:12]:
        classes = s.semantic()
        record = records[s.image_path.stem]
        assert classes.shape == (s.height, s.width) and classes.dtype == np.int16
        expected = np.zeros((s.height, s.width), dtype=np.int16)
        for obj, visible in zip(record.scene.objects, record.rendered_coco.visible[:, 0]):
            expected[visible] = SHAPES.index(obj.shape) + 1
        assert np.array_equal(classes, expected)
        assert (classes[s.union_mask()] > 0).all()


def test_refcoco_attribute_maps_paint_every_shape_with_its_colour(synth_root, tmp_path):
    """instances.json's optional `attributes` (the synthetic writer lists the colours) and each annotation's
    `attribute_ids`: the attribute map paints each visible shape with 1 + its colour's index; an unknown id is a
    clear error; without the list there is no map."""
    records = {f"img{i:05d}": build_image(SPEC, i) for i in range(SPEC.images)}
    from instructseg.data.synthetic_scene import COLOURS

    for s in read_refcoco(synth_root / "refcoco", split="train")[:12]:
        colours = s.attributes()
        record = records[s.image_path.stem]
        expected = np.zeros((s.height, s.width), dtype=np.int16)
        for obj, visible in zip(record.scene.objects, record.rendered_coco.visible[:, 0]):
            expected[visible] = list(COLOURS).index(obj.colour) + 1
        assert colours.dtype == np.int16 and np.array_equal(colours, expected)
    root = tmp_path / "refcoco"
    shutil.copytree(synth_root / "refcoco", root)
    coco = json.loads((root / "instances.json").read_text())
    coco["annotations"][1]["attribute_ids"] = [42]
    (root / "instances.json").write_text(json.dumps(coco))
    with pytest.raises(InputError, match=r"instances\.json: annotation 2 has attribute_ids \[42\], not all in 'attrib"):
        read_refcoco(root, split="train")
    del coco["attributes"]
    (root / "instances.json").write_text(json.dumps(coco))
    sample = read_refcoco(root, split="train")[0]
    assert sample.attributes() is None and sample.semantic().max() > 0


def test_refcoco_category_maps_need_known_categories(synth_root, tmp_path):
    root = tmp_path / "refcoco"
    shutil.copytree(synth_root / "refcoco", root)
    coco = json.loads((root / "instances.json").read_text())
    coco["annotations"][0]["category_id"] = 99
    (root / "instances.json").write_text(json.dumps(coco))
    with pytest.raises(InputError, match=r"instances\.json: annotation 1 has category_id 99, not in 'categories'"):
        read_refcoco(root, split="train")
    del coco["categories"]  # a file without categories: no maps, the masks still read
    (root / "instances.json").write_text(json.dumps(coco))
    samples = read_refcoco(root, split="train")
    assert samples[0].semantic() is None and samples[0].masks().any()
