"""ShapesIVS generator: determinism, coverage of expression kinds, masks vs pixels, splits and the CLI."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import binary_erosion

from instructseg.data.formats.common import rle_decode
from instructseg.data.synthetic import COLOURS, SHAPES, SIZES, SynthSpec, build_image, build_video, generate, \
    split_counts
from instructseg.data.synthetic_text import Description, ObjectFacts, chat_turns, matches, unique_descriptions
from instructseg.errors import InputError

# The spec of the conftest `synth_root` fixture.
SPEC = SynthSpec(seed=0, videos=4, images=8, frames=6, height=64, width=80)
TINY = dict(videos=2, images=3, frames=3, height=32, width=40)


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _revos_meta(root: Path) -> dict[str, dict]:
    videos = {}
    for split in ("train", "valid"):
        videos.update(json.loads((root / "revos" / f"meta_expressions_{split}_.json").read_text())["videos"])
    return videos


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    first, second, other = (generate(tmp_path / name, SynthSpec(seed=seed, **TINY))
                            for name, seed in (("a", 3), ("b", 3), ("c", 4)))
    assert first == second
    a, b, c = (_digests(tmp_path / name) for name in ("a", "b", "c"))
    assert a == b
    assert len(a) > 20
    assert a["revos/meta_expressions_train_.json"] != c["revos/meta_expressions_train_.json"]
    assert a["revos/JPEGImages/v0000/00000.jpg"] != c["revos/JPEGImages/v0000/00000.jpg"]
    assert a["refcoco/refs(unc).p"] != c["refcoco/refs(unc).p"]


def test_counts_match_files(synth_root):
    meta = _revos_meta(synth_root)
    assert len(meta) == SPEC.videos
    assert sum(len(v["expressions"]) for v in meta.values()) > 4 * SPEC.videos
    assert len(list((synth_root / "refcoco" / "images").glob("*.jpg"))) == SPEC.images
    for video in meta.values():
        assert (video["height"], video["width"]) == (SPEC.height, SPEC.width)
        assert video["frames"] == [f"{t:05d}" for t in range(SPEC.frames)]


def test_every_expression_kind_is_present(synth_root):
    expressions = [e for v in _revos_meta(synth_root).values() for e in v["expressions"].values()]
    kinds = {e["type_id"] for e in expressions}
    assert kinds == {0, 1, 2}
    assert any(e["type_id"] == 0 and len(e["obj_id"]) >= 2 for e in expressions), "multi-object referring"
    assert any(e["type_id"] == 0 and len(e["obj_id"]) == 1 for e in expressions)
    assert any(e["type_id"] == 1 for e in expressions)
    for e in expressions:
        assert isinstance(e["answer"], str) and e["answer"].endswith(".")
        assert len(e["obj_id"]) == len(e["anno_id"])
        assert (e["type_id"] == 2) == (e["obj_id"] == [])
    texts = " ".join(e["exp"] for e in expressions)
    assert "moving" in texts or "starts on the" in texts or "stays still" in texts  # motion / position wording


def test_expressions_are_unique_within_a_video(synth_root):
    for video in _revos_meta(synth_root).values():
        texts = [e["exp"] for e in video["expressions"].values()]
        assert len(texts) == len(set(texts))


def test_masks_cover_the_rendered_colour(synth_root):
    """Decoded RLEs equal the renderer's visible masks, and the JPEG pixels inside them have the object's colour."""
    mask_dict = json.loads((synth_root / "revos" / "mask_dict.json").read_text())
    meta = _revos_meta(synth_root)
    checked = 0
    for index in range(SPEC.videos):
        record = build_video(SPEC, index)
        anno_of = {}
        for e in meta[record.vid]["expressions"].values():
            anno_of.update(zip(e["obj_id"], e["anno_id"]))
        for obj_id, anno_id in anno_of.items():
            obj = record.scene.objects[obj_id - 1]
            for t, rle in enumerate(mask_dict[anno_id]):
                visible = record.rendered.visible[obj_id - 1, t]
                assert (rle is None) == (not visible.any())
                if rle is None:
                    continue
                mask = rle_decode(rle, Path("mask_dict.json"), anno_id)
                assert np.array_equal(mask, visible)
                core = binary_erosion(mask, iterations=1)
                if core.sum() < 4:
                    continue
                pixels = np.asarray(Image.open(synth_root / "revos" / "JPEGImages" / record.vid / f"{t:05d}.jpg"))
                colour = np.median(pixels[core].astype(float), axis=0)
                assert np.abs(colour - COLOURS[obj.colour]).max() < 40, (record.vid, obj_id, t)
                checked += 1
    assert checked > 20


def test_shapes_contrast_with_the_background(synth_root):
    for index in range(SPEC.videos):
        record = build_video(SPEC, index)
        for obj, full in zip(record.scene.objects, record.rendered.full):
            under = record.scene.background[full.any(axis=0)].astype(float)
            if len(under):
                assert np.abs(under - COLOURS[obj.colour]).sum(axis=1).mean() > 80


def test_entering_and_leaving_objects_have_null_frames(synth_root):
    mask_dict = json.loads((synth_root / "revos" / "mask_dict.json").read_text())
    tracks = list(mask_dict.values())
    assert any(track[0] is None and track[-1] is not None for track in tracks), "an object enters"
    assert any(track[0] is not None and track[-1] is None for track in tracks), "an object leaves"
    assert all(len(track) == SPEC.frames for track in tracks)
    assert all(any(rle is not None for rle in track) for track in tracks)


def test_some_object_passes_behind_another():
    hidden = 0
    for index in range(SPEC.videos):
        rendered = build_video(SPEC, index).rendered
        hidden += int((rendered.full & ~rendered.visible).any(axis=(2, 3)).sum())
    assert hidden > 0


def test_objects_move_with_different_velocities():
    speeds = {round(o.speed, 3) for i in range(SPEC.videos) for o in build_video(SPEC, i).scene.objects}
    assert len(speeds) >= 5


def test_train_and_valid_are_disjoint(synth_root):
    revos = {split: set(json.loads((synth_root / "revos" / f"meta_expressions_{split}_.json").read_text())["videos"])
             for split in ("train", "valid")}
    assert revos["train"] and revos["valid"] and not revos["train"] & revos["valid"]
    assert (len(revos["train"]), len(revos["valid"])) == split_counts(SPEC.videos) == (3, 1)
    ytvos = {split: set(json.loads((synth_root / "refytvos" / "meta_expressions" / split /
                                    "meta_expressions.json").read_text())["videos"]) for split in ("train", "valid")}
    assert ytvos == revos
    reason = {split: {p.stem for p in (synth_root / "reasonseg" / split).glob("*.json")} for split in ("train", "val")}
    assert reason["train"] and reason["val"] and not reason["train"] & reason["val"]


@pytest.mark.parametrize("total, expected", [(0, (0, 0)), (1, (1, 0)), (2, (1, 1)), (4, (3, 1)), (12, (9, 3))])
def test_split_counts(total, expected):
    assert split_counts(total) == expected


def test_refytvos_is_single_object_referring(synth_root):
    for split in ("train", "valid"):
        meta = json.loads((synth_root / "refytvos" / "meta_expressions" / split / "meta_expressions.json").read_text())
        for vid, video in meta["videos"].items():
            for e in video["expressions"].values():
                assert isinstance(e["obj_id"], str) and int(e["obj_id"]) >= 1
            png = Image.open(synth_root / "refytvos" / split / "Annotations" / vid / f"{video['frames'][0]}.png")
            assert png.mode == "P"


def test_refcoco_files_follow_refer(synth_root):
    raw = (synth_root / "refcoco" / "refs(unc).p").read_bytes()
    assert raw[:2] == b"\x80\x02"  # pickle protocol 2, as REFER ships
    coco = json.loads((synth_root / "refcoco" / "instances.json").read_text())
    assert [c["name"] for c in coco["categories"]] == list(SHAPES)
    for ann in coco["annotations"]:
        assert len(ann["segmentation"][0]) >= 6 and ann["iscrowd"] == 0 and ann["area"] > 0


def test_chat_conversations(synth_root):
    items = json.loads((synth_root / "chat" / "conversations.json").read_text())
    assert len(items) == split_counts(SPEC.images)[0]
    for item in items:
        assert (synth_root / "chat" / item["image"]).is_file()
        turns = item["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].startswith("<image>\nHow many shapes")
        assert all("<image>" not in t["value"] for t in turns[1:])


def test_image_chat_asks_for_an_absent_object():
    """Still images get no-target requests too (in chat: the RefCOCO format has no place for them), named by a
    colour + shape the image does not hold."""
    facts = [ObjectFacts(0, "circle", "red", "small", numbers={"x": 20, "y": 20}),
             ObjectFacts(1, "star", "blue", "large", numbers={"x": 90, "y": 70})]
    turns = chat_turns(facts, 128, 128, np.random.default_rng(0), extra=100)
    absent = [(q, a) for q, a in turns if q.startswith("Segment the ")]
    assert len(absent) == 1
    colour, shape = absent[0][0][len("Segment the "):-1].split()
    assert (colour, shape) not in {(f.colour, f.shape) for f in facts}
    assert colour in COLOURS and shape in SHAPES and absent[0][1] == f"There is no {colour} {shape} here."


def test_ambiguous_objects_block_an_expression():
    """Three-valued matching: an object neither clearly left nor clearly not left makes 'on the left' unusable."""
    left = ObjectFacts(0, "circle", "red", "small", {"left": True})
    unsure = ObjectFacts(1, "circle", "blue", "small", {"left": None})
    right = ObjectFacts(2, "square", "red", "large", {"left": False})
    facts = [left, unsure, right]
    assert matches(facts, Description(shape="circle", flag="left")) is None
    assert matches(facts, Description(colour="red", shape="circle", flag="left")) == (0,)
    assert matches(facts, Description(colour="red")) == (0, 2)
    found = unique_descriptions(facts, 0, ["left"])
    assert found[0].complexity == 2
    assert Description(shape="circle", colour="red") in found
    assert Description(shape="circle", flag="left") not in found
    assert all(matches(facts, d) == (0,) for d in found)
    assert Description(colour="red", size="small").text({}) == "the small red shape"


def test_vocabulary_is_exposed():
    assert len(SHAPES) == 5 and len(COLOURS) == 8 and len(SIZES) >= 2


def test_bad_spec_and_reused_output(tmp_path):
    with pytest.raises(InputError, match="frames"):
        generate(tmp_path / "x", SynthSpec(frames=1))
    generate(tmp_path / "y", SynthSpec(**TINY))
    with pytest.raises(InputError, match="already holds"):
        generate(tmp_path / "y", SynthSpec(**TINY))


def test_textures_change_only_the_background(tmp_path):
    """`textures` puts that share of scenes on a photo-like texture; shapes, masks and words stay those of the seed."""
    plain, textured = SynthSpec(seed=5, **TINY), SynthSpec(seed=5, textures=1.0, **TINY)
    for index in range(TINY["videos"]):
        a, b = build_video(plain, index), build_video(textured, index)
        assert [q.text for q in a.queries] == [q.text for q in b.queries]
        assert np.array_equal(a.rendered.visible, b.rendered.visible)
        # a texture is no flat, noisy, striped or two-colour ramp: many distinct colours at a coarse scale
        coarse = b.scene.background[::4, ::4].reshape(-1, 3) // 8
        assert len(np.unique(coarse, axis=0)) > 3 * len(np.unique(a.scene.background[::4, ::4].reshape(-1, 3) // 8,
                                                                   axis=0))
        shapes = b.rendered.visible[:, 0].any(axis=0)  # the shapes are drawn alike on either background
        assert shapes.any() and np.array_equal(a.rendered.frames[0][shapes], b.rendered.frames[0][shapes])
        assert not np.array_equal(a.rendered.frames[0][~shapes], b.rendered.frames[0][~shapes])
    half = SynthSpec(seed=5, textures=0.5, **dict(TINY, images=40))
    changed = sum(not np.array_equal(build_image(plain, i).scene.background, build_image(half, i).scene.background)
                  for i in range(40))
    assert 8 <= changed <= 32
    with pytest.raises(InputError, match="textures"):
        generate(tmp_path / "bad", SynthSpec(textures=1.5, **TINY))


def test_cli_synth(tmp_path, capsys):
    from instructseg.cli import main

    out = tmp_path / "cli"
    assert main(["synth", "--out", str(out), "--videos", "2", "--images", "2", "--frames", "4",
                 "--size", "48", "64", "--textures", "0.5"]) == 0
    assert "videos 2" in capsys.readouterr().out
    frame = Image.open(out / "revos" / "JPEGImages" / "v0000" / "00003.jpg")
    assert frame.size == (64, 48)
    assert main(["synth", "--out", str(out)]) == 2  # refuses to mix with earlier output


def test_an_interrupted_generation_leaves_no_dataset_behind(tmp_path, monkeypatch):
    """A new folder appears whole or not at all, so that `train` (which generates a recipe's data when its folder
    is missing) never takes a half-written dataset for a complete one after a kill."""
    import instructseg.data.synthetic as synthetic

    spec = SynthSpec(seed=0, videos=2, images=4, frames=2, height=32, width=32)
    out = tmp_path / "shapes"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(synthetic, "write_chat", killed)
        with pytest.raises(KeyboardInterrupt):
            generate(out, spec)
    assert not out.exists()
    generate(out, spec)  # the leftover is cleared and the folder written whole
    assert sorted(p.name for p in out.iterdir()) == ["chat", "reasonseg", "refcoco", "refytvos", "revos"]
    assert [p.name for p in tmp_path.iterdir()] == ["shapes"]
