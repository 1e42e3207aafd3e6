"""Training data: sources -> samples, frame sampling, the mixture stream, collation, frame decoding."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from instructseg.data.collate import Collator, resize_masks
from instructseg.data.formats import read_revos
from instructseg.data.mixture import BLOCK, PAPER_RATIOS, MixtureDataset, MixtureSampler, ratios_from_tasks
from instructseg.data.sampling import reference_frames, sample_video_frames, track_frames, uniform_key_frames
from instructseg.data.training import SOURCE_TASKS, ChatDataset, ImageSampleDataset, TrainingSample, \
    VideoExpressionDataset, answer_text, answer_with_segs, build_source, load_rgb, parse_answer, phrase_instruction
from instructseg.data.types import ChatSample, ImageSample
from instructseg.errors import InputError
from instructseg.model.tokens import SEG, PromptLayout
from instructseg.train.samples import SampleStream

H, W, NUM_REF, JUMP = 64, 80, 3, 2  # the conftest fixture's frame size; the sources' sampling settings


@pytest.fixture(scope="module")
def roots(synth_root, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """(root, split) per source kind: the ShapesIVS folders, plus a MeViS layout and a RefCOCOg refs file made
    from them (symlinks, so nothing large is copied)."""
    extra = tmp_path_factory.mktemp("layouts")
    mevis = extra / "mevis" / "train"
    mevis.mkdir(parents=True)
    (mevis / "JPEGImages").symlink_to(synth_root / "revos" / "JPEGImages")
    (mevis / "mask_dict.json").symlink_to(synth_root / "revos" / "mask_dict.json")
    meta = json.loads((synth_root / "revos" / "meta_expressions_train_.json").read_text())["videos"]
    videos = {vid: {"frames": v["frames"], "expressions": {
        k: {"exp": e["exp"], "obj_id": e["obj_id"], "anno_id": e["anno_id"]} for k, e in v["expressions"].items()}}
        for vid, v in meta.items()}
    (mevis / "meta_expressions.json").write_text(json.dumps({"videos": videos}))
    refcocog = extra / "refcocog"
    refcocog.mkdir()
    for name in ("images", "instances.json"):
        (refcocog / name).symlink_to(synth_root / "refcoco" / name)
    shutil.copy(synth_root / "refcoco" / "refs(unc).p", refcocog / "refs(umd).p")
    return {"revos": (synth_root / "revos", "train"), "refytvos": (synth_root / "refytvos", "train"),
            "davis17": (synth_root / "refytvos", "valid"), "mevis": (extra / "mevis", "train"),
            "refcoco": (synth_root / "refcoco", "train"), "refcoco+": (synth_root / "refcoco", "train"),
            "refcocog": (refcocog, "train"), "reasonseg": (synth_root / "reasonseg", "train"),
            "chat": (synth_root / "chat", "train")}


def _build(roots, kind: str, seed: int = 0):
    root, split = roots[kind]
    return build_source(kind, root, split, num_ref_frames=NUM_REF, jump=JUMP, seed=seed)


@pytest.fixture(scope="module")
def layout():
    from instructseg.config import preset
    from instructseg.llm.loading import load_tokenizer

    tok = load_tokenizer(preset("tiny").llm)
    return PromptLayout(tok, system_prompt="s", num_visual=4, num_ref=4, num_queries=0, max_length=256)


# --------------------------------------------------------------------------------------------- sources

@pytest.mark.parametrize("kind", list(SOURCE_TASKS))
def test_every_source_yields_consistent_samples(roots, kind):
    data = _build(roots, kind)
    assert len(data) > 0
    video, no_target = kind in ("revos", "refytvos", "mevis", "davis17"), 0
    for i in range(len(data)):
        s = data[i]
        assert isinstance(s, TrainingSample) and s.task == SOURCE_TASKS[kind] and s.instruction
        assert s.key_frame.dtype == np.uint8 and s.key_frame.ndim == 3 and s.key_frame.shape[2] == 3
        assert s.masks.dtype == bool and s.masks.shape == (s.masks.shape[0], *s.key_frame.shape[:2])
        assert s.answer.count(SEG) == s.masks.shape[0]
        if kind == "chat":
            assert s.masks.shape[0] == 0 and s.ref_frames is None and s.key_frame.shape == (H, W, 3)
            continue
        assert s.key_frame.shape == (H, W, 3)
        if video:
            assert len(s.ref_frames) == NUM_REF and all(f.shape == (H, W, 3) for f in s.ref_frames)
            if s.masks.shape[0]:
                assert s.masks.any(), "the key frame shows a target"
        else:
            assert s.ref_frames is None and s.masks.shape[0] >= 1
        no_target += s.masks.shape[0] == 0
    if kind == "revos":
        assert no_target > 0, "no-target expressions are kept, with an answer and no [SEG]"


def test_unknown_source_kind(roots):
    with pytest.raises(InputError, match="'ytvos'"):
        build_source("ytvos", roots["revos"][0], "train", num_ref_frames=1, jump=1, seed=0)


@pytest.mark.parametrize("kind", ["revos", "refcoco", "chat"])
def test_samples_are_deterministic(roots, kind):
    a, b = _build(roots, kind, seed=3), _build(roots, kind, seed=3)
    differs = False
    for i in range(min(len(a), 12)):
        x, y, z = a.sample(i, epoch=1), b.sample(i, epoch=1), a.sample(i, epoch=2)
        assert (x.instruction, x.answer, x.history) == (y.instruction, y.answer, y.history)
        assert np.array_equal(x.key_frame, y.key_frame) and np.array_equal(x.masks, y.masks)
        assert (x.ref_frames is None) == (y.ref_frames is None)
        if x.ref_frames is not None:
            assert all(np.array_equal(f, g) for f, g in zip(x.ref_frames, y.ref_frames))
        differs |= x.instruction != z.instruction or x.history != z.history or not np.array_equal(x.key_frame,
                                                                                                  z.key_frame)
    assert differs, "another epoch draws other frames / phrasings"


def test_video_ref_frames_are_the_frames_next_to_the_key_in_time_order(synth_root):
    exprs = read_revos(synth_root / "revos", "train")[:12]
    data = VideoExpressionDataset(exprs, "revos", num_ref_frames=3, jump=1, seed=0)
    directions = set()
    for i, expr in enumerate(exprs):
        frames = [load_rgb(p) for p in expr.frame_paths]
        masks = expr.masks()
        s = data.sample(i, epoch=i)
        keys = [t for t, f in enumerate(frames) if np.array_equal(f, s.key_frame)
                and np.array_equal(masks[:, t], s.masks)]
        assert keys
        found = False
        for key in keys:
            for step in (1, -1):
                track = [min(max(key + step * (j + 1), 0), len(frames) - 1) for j in range(3)]
                in_time = track if step == 1 else track[::-1]  # OVP reads them in time order
                if all(np.array_equal(r, frames[t]) for r, t in zip(s.ref_frames, in_time)) and all(
                        np.array_equal(s.ref_masks[j], masks[:, t]) for j, t in enumerate(in_time)):
                    found = True
                    directions.add(step)
                    assert s.ref_backward == (step == -1)  # SAM2 tracks them from the key frame outwards
        assert found, "reference frames are the consecutive frames next to the key frame, in time order"
        assert s.ref_masks.shape == (3, *s.masks.shape)
    assert directions == {1, -1}


def test_track_frames_directions_and_edges():
    rng = random.Random(0)
    assert track_frames(10, 9, 3, rng) == [8, 7, 6]  # no room forwards
    assert track_frames(10, 0, 3, rng) == [1, 2, 3]  # no room backwards
    assert track_frames(3, 1, 4, random.Random(1)) in ([2, 2, 2, 2], [0, 0, 0, 0])  # short video: last frame repeats
    seen = {tuple(track_frames(10, 5, 2, random.Random(seed))) for seed in range(20)}
    assert seen == {(6, 7), (4, 3)}
    assert reference_frames(10, 9, 3, rng) == ([6, 7, 8], True)
    assert reference_frames(10, 0, 3, rng) == ([1, 2, 3], False)


# --------------------------------------------------------------------------------------- frame sampling

def test_sample_video_frames_window_and_repetition():
    rng = random.Random(0)
    for num_frames in (1, 2, 3, 10, 40):
        for jump in (0, 1, 3):
            for num_ref in (0, 1, 4):
                for _ in range(20):
                    candidates = [num_frames - 1] if num_frames > 5 and rng.random() < 0.3 else None
                    key, refs = sample_video_frames(num_frames, num_ref, jump, rng, candidates=candidates)
                    window = set(range(max(0, key - jump), min(num_frames, key + jump + 1)))
                    assert candidates is None or key in candidates
                    assert len(refs) == num_ref and refs == sorted(refs) and set(refs) <= window
                    if len(window) >= num_ref:
                        assert len(set(refs)) == num_ref, "no repetition when the window is long enough"
                    else:
                        assert set(refs) == window, "a short window is used in full"
    with pytest.raises(InputError):
        sample_video_frames(0, 1, 1, rng)
    with pytest.raises(InputError):
        sample_video_frames(5, 1, 1, rng, candidates=[5])


def test_uniform_key_frames():
    assert uniform_key_frames(10, 3) == [1, 5, 8]
    assert uniform_key_frames(10, 1) == [5]
    assert uniform_key_frames(4, 9) == [0, 1, 2, 3] and uniform_key_frames(5, 5) == [0, 1, 2, 3, 4]
    for num_frames in range(1, 41):
        for k in range(1, num_frames + 1):
            idx = uniform_key_frames(num_frames, k)
            assert len(idx) == k and all(a < b for a, b in zip(idx, idx[1:]))
            for i, t in enumerate(idx):  # frame [t, t + 1) holds the centre of segment i
                assert t <= (i + 0.5) * num_frames / k < t + 1
    with pytest.raises(InputError):
        uniform_key_frames(10, 0)


# --------------------------------------------------------------------------------------------- mixture

SIZES = {"res": 50, "chat": 30, "rvos": 40, "reasonseg": 7, "revos": 20}


def test_mixture_proportions_and_passes():
    draws = MixtureSampler(SIZES, PAPER_RATIOS, seed=1).take(4000)
    total = sum(PAPER_RATIOS.values())
    for name, ratio in PAPER_RATIOS.items():
        share = sum(d.source == name for d in draws) / len(draws)
        assert abs(share - ratio / total) < 0.025, (name, share)
    small = [d for d in draws if d.source == "reasonseg"]
    for epoch in range(3):  # every pass visits each item once, in a new order
        chunk = small[epoch * 7:(epoch + 1) * 7]
        assert sorted(d.index for d in chunk) == list(range(7)) and {d.epoch for d in chunk} == {epoch}
    assert [d.index for d in small[:7]] != [d.index for d in small[7:14]]


def test_mixture_ranks_partition_the_stream():
    single = MixtureSampler(SIZES, PAPER_RATIOS, seed=5).take(3000)
    r0 = MixtureSampler(SIZES, PAPER_RATIOS, seed=5, rank=0, world_size=2).take(1500)
    r1 = MixtureSampler(SIZES, PAPER_RATIOS, seed=5, rank=1, world_size=2).take(1500)
    assert [d for pair in zip(r0, r1) for d in pair] == single
    assert not set(r0) & set(r1)
    assert MixtureSampler(SIZES, PAPER_RATIOS, seed=6).take(50) != single[:50]
    assert MixtureSampler(SIZES, dict(reversed(PAPER_RATIOS.items())), seed=5).take(50) == single[:50]


def test_mixture_resume_equals_uninterrupted():
    full = MixtureSampler(SIZES, PAPER_RATIOS, seed=2, rank=1, world_size=2).take(2600)
    first = MixtureSampler(SIZES, PAPER_RATIOS, seed=2, rank=1, world_size=2)
    head = first.take(2100)  # past the first block of the global stream
    state = json.loads(json.dumps(first.state_dict()))
    assert state == {"position": 4200} and 4200 > BLOCK
    resumed = MixtureSampler(SIZES, PAPER_RATIOS, seed=2, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert head + resumed.take(500) == full
    single = MixtureSampler(SIZES, PAPER_RATIOS, seed=2).take(4300)
    one_rank = MixtureSampler(SIZES, PAPER_RATIOS, seed=2)  # a resumed run on another number of ranks
    one_rank.load_state_dict(state)
    assert one_rank.take(100) == single[4200:]
    with pytest.raises(InputError):
        resumed.load_state_dict({"step": 3})


def test_mixture_bad_ratios():
    with pytest.raises(InputError, match="'mevis'"):
        MixtureSampler(SIZES, {"res": 1, "mevis": 1}, seed=0)
    with pytest.raises(InputError, match="'chat'"):
        MixtureSampler({**SIZES, "chat": 0}, PAPER_RATIOS, seed=0)
    with pytest.raises(InputError, match="positive"):
        MixtureSampler(SIZES, {"res": -1}, seed=0)
    with pytest.raises(InputError):
        MixtureSampler(SIZES, PAPER_RATIOS, seed=0, rank=2, world_size=2)


def test_ratios_from_tasks():
    ratios = ratios_from_tasks({"refcoco": "res", "refcoco+": "res", "revos": "revos"},
                               {"refcoco": 30, "refcoco+": 10, "revos": 5}, PAPER_RATIOS)
    assert ratios == pytest.approx({"refcoco": 3.0, "refcoco+": 1.0, "revos": 3.0})
    with pytest.raises(InputError, match="nope"):
        ratios_from_tasks({"x": "nope"}, {"x": 1}, PAPER_RATIOS)


# --------------------------------------------------------------------------------------------- collate

def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


@pytest.mark.parametrize("size", [48, 128])
def test_collate_shapes_and_masks(roots, layout, size):
    videos, images, chat = _build(roots, "revos"), _build(roots, "refcoco"), _build(roots, "chat")
    vids = [videos[i] for i in range(4)]
    imgs = [images[i] for i in range(2)] + [chat[0]]
    collate = Collator(layout, image_size=size, pad_id=layout.tokenizer.pad_token_id)
    inputs, masks, ref_masks = collate(vids + imgs)
    batch = len(vids) + len(imgs)
    assert inputs.frames.shape == (batch, 3, size, size) and inputs.frames.dtype == torch.float32
    assert 0.0 <= float(inputs.frames.min()) and float(inputs.frames.max()) <= 1.0
    assert inputs.ref_frames.shape == (batch, NUM_REF, 3, size, size)
    for i in range(len(vids), batch):  # an image is its own reference
        assert torch.equal(inputs.ref_frames[i], inputs.frames[i][None].expand(NUM_REF, -1, -1, -1))
    assert inputs.input_ids.shape == inputs.attention_mask.shape == inputs.labels.shape == \
        inputs.instruction_mask.shape and inputs.input_ids.shape[0] == batch
    assert inputs.instruction_mask.any(dim=1).all()
    for s, m, rm in zip(vids + imgs, masks, ref_masks):  # the same objects on every reference frame
        assert rm.shape == (NUM_REF, *m.shape) and rm.dtype == torch.bool
        if s.ref_masks is None:
            assert torch.equal(rm, m[None].expand_as(rm))
        else:
            assert torch.equal(rm, torch.stack([resize_masks(f, size) for f in s.ref_masks]))
    seg_id = layout.ids[SEG]
    for s, m, labels in zip(vids + imgs, masks, inputs.labels):
        assert m.dtype == torch.bool and m.shape == (s.masks.shape[0], size, size)
        assert int((labels == seg_id).sum()) == m.shape[0]
    # every object of many samples against an independent reference (PIL's nearest resize of the ground truth);
    # shapes are small (~6-10 px radius), so at 48 px their boundary weighs: there the mean IoU is checked
    ious = []
    for data in (videos, images):
        for i in range(len(data)):
            for obj, gt in zip(resize_masks(data[i].masks, size), data[i].masks):
                if gt.sum() >= 30:
                    ref = np.array(Image.fromarray(gt).resize((size, size), Image.NEAREST))
                    ious.append(_iou(obj, torch.from_numpy(ref)))
    assert len(ious) > 50
    if size > max(H, W):
        assert min(ious) > 0.9
    else:
        assert np.mean(ious) > 0.85 and min(ious) > 0.5
    only_images, _, no_refs = collate(imgs)
    assert no_refs is None
    assert only_images.ref_frames is None
    only_videos, _, _ = collate(vids[:2])
    always = Collator(layout, image_size=size, pad_id=0, num_ref_frames=NUM_REF)  # what the trainer uses
    images_only, image_masks, image_refs = always(imgs)
    assert images_only.ref_frames.shape == (len(imgs), NUM_REF, 3, size, size)
    assert all(torch.equal(r, m[None].expand_as(r)) for r, m in zip(image_refs, image_masks))
    assert only_videos.ref_frames.shape == (2, NUM_REF, 3, size, size)


def test_dataloader_over_the_mixture(roots, layout):
    sources = MixtureDataset({kind: _build(roots, kind) for kind in ("revos", "refcoco", "reasonseg", "chat")})
    sampler = MixtureSampler(sources.sizes(), {"revos": 3, "refcoco": 4, "reasonseg": 1, "chat": 2}, seed=0)
    loader = torch.utils.data.DataLoader(sources, sampler=sampler, batch_size=4, num_workers=0,
                                         collate_fn=Collator(layout, image_size=32, pad_id=0))
    batches = iter(loader)
    for _ in range(3):
        inputs, masks, _ = next(batches)
        assert inputs.frames.shape == (4, 3, 32, 32) and len(masks) == 4
        assert inputs.ref_frames is None or inputs.ref_frames.shape == (4, NUM_REF, 3, 32, 32)


def test_sample_stream_workers_build_the_loops_batches_and_resume_exactly(roots, layout):
    """Batches built ahead in worker processes are the ones the loop builds itself, in order; the state a
    checkpoint takes is that of the batches consumed, not of those drawn ahead, so a resume goes on exactly."""
    sources = {kind: _build(roots, kind) for kind in ("revos", "refcoco", "reasonseg", "chat")}
    ratios = {"revos": 3, "refcoco": 4, "reasonseg": 1, "chat": 2}
    collate = Collator(layout, image_size=32, pad_id=0, num_ref_frames=NUM_REF)

    def stream(workers: int) -> SampleStream:
        sampler = MixtureSampler({n: len(s) for n, s in sources.items()}, ratios, seed=3)
        return SampleStream(sources, sampler, 3, collate, workers=workers)

    def same(a, b) -> bool:
        return (torch.equal(a[0].input_ids, b[0].input_ids) and torch.equal(a[0].frames, b[0].frames)
                and all(torch.equal(x, y) for x, y in zip(a[1], b[1])))

    plain, ahead = stream(0), stream(2)
    try:
        for i in range(4):
            assert same(plain.next_batch(), ahead.next_batch())
            assert ahead.state_dict() == plain.state_dict() == {"position": 3 * (i + 1)}
        resumed = stream(2)
        resumed.load_state_dict(ahead.state_dict())
        assert same(resumed.next_batch(), plain.next_batch())
        resumed.close()
    finally:
        plain.close()
        ahead.close()


def test_sample_stream_worker_errors_reach_the_loop(roots, layout, tmp_path):
    root = tmp_path / "refcoco"
    shutil.copytree(roots["refcoco"][0], root)
    source = build_source("refcoco", root, "train", num_ref_frames=NUM_REF, jump=JUMP, seed=0)
    shutil.rmtree(root / "images")  # the files vanish after the source was read
    stream = SampleStream({"refcoco": source}, MixtureSampler({"refcoco": len(source)}, {"refcoco": 1}, seed=0), 2,
                          Collator(layout, image_size=32, pad_id=0), workers=1)
    try:
        with pytest.raises(Exception, match="images"):
            stream.next_batch()
    finally:
        stream.close()


def test_collate_refuses_inconsistent_batches(roots, layout):
    videos = _build(roots, "revos")
    collate = Collator(layout, image_size=32, pad_id=0)
    a, b = videos[0], videos[1]
    short = TrainingSample(**{**b.__dict__, "ref_frames": b.ref_frames[:1]})
    with pytest.raises(ValueError, match="same number of reference frames"):
        collate([a, short])
    wrong = TrainingSample(**{**a.__dict__, "answer": a.answer + f" {SEG}"})
    with pytest.raises(ValueError, match="masks"):
        collate([wrong])


def test_resize_masks_keeps_area():
    gt = np.zeros((1, 60, 90), bool)
    gt[0, 10:40, 20:70] = True
    for size in (30, 64, 180):
        m = resize_masks(gt, size)
        assert abs(float(m.float().mean()) - gt.mean()) < 0.02
    square = np.zeros((2, 40, 40), bool)
    square[0, 8:24, 16:32], square[1, 0:4, 36:40] = True, True
    assert torch.equal(resize_masks(square, 10), torch.from_numpy(square[:, ::4, ::4].copy()))  # grid-aligned
    assert torch.equal(resize_masks(square, 80), torch.from_numpy(square.repeat(2, 1).repeat(2, 2)))
    assert resize_masks(np.zeros((0, 5, 5), bool), 8).shape == (0, 8, 8)


# ----------------------------------------------------------------------------------------- text, files

def test_answer_format_round_trip():
    assert answer_with_segs("It is the red circle.", 1) == "It is the red circle. [SEG]"
    assert answer_with_segs(None, 1) == "Sure, [SEG]."
    assert answer_with_segs("", 2) == "Sure, [SEG] and [SEG]."
    assert answer_with_segs(None, 3) == "Sure, [SEG], [SEG] and [SEG]."
    assert answer_with_segs(None, 0) == "There is no such object."
    assert answer_with_segs("There is no green hexagon here.", 0) == "There is no green hexagon here."
    assert answer_with_segs("It is [SEG].", 1) == "It is [SEG]."
    with pytest.raises(InputError):
        answer_with_segs("It is [SEG].", 2)
    for text in ("They are the red circle and the red square.", None):
        for k in range(4):
            raw = answer_with_segs(text, k)
            assert parse_answer(raw) == ((text or ("There is no such object." if k == 0 else "")), k)
    # generated [SEG] lists out of form lose their leftover commas and "and"s; [SEG]s inside the text keep it
    assert parse_answer("The white circle has no corners. [SEG] and") == ("The white circle has no corners.", 1)
    assert parse_answer("The two circles have no corners. [SEG], and [SEG] and") == (
        "The two circles have no corners.", 2)
    assert parse_answer("Sure, [SEG], [SEG].") == ("", 2)
    assert parse_answer("The red circle [SEG] and the blue star [SEG].") == ("The red circle and the blue star .", 2)
    # what a user reads (generate's text): no leftover list after the sentence, no space before the stop
    assert answer_text("They are the blue star and the red star. [SEG], [SEG] and [SEG]") == (
        "They are the blue star and the red star.")
    assert answer_text("The red circle [SEG] and the blue star [SEG].") == "The red circle and the blue star."
    assert answer_text("Sure, [SEG].") == answer_text("Sure, [SEG] and [SEG].") == "Sure."
    assert answer_text("[SEG]") == "" and answer_text("Two circles: [SEG] and [SEG].") == "Two circles."
    assert answer_text("The white circle has no corners. [SEG], and [SEG] and") == "The white circle has no corners."
    assert answer_text("Paris is the capital of France.") == "Paris is the capital of France."


def test_phrase_instruction():
    rng = random.Random(0)
    video = {phrase_instruction("the red circle", rng, kind="video") for _ in range(200)}
    image = {phrase_instruction("the red circle.", rng, kind="image") for _ in range(200)}
    assert "Segment the red circle." in video and "Find the red circle in the video." in video
    assert "Find the red circle in the image." in image and not any("video" in t for t in image)
    assert all("the red circle" in t for t in video | image)
    assert phrase_instruction("Which shape is the largest?", rng, kind="video") == "Which shape is the largest?"


def test_frames_of_every_pixel_format_load(tmp_path):
    grey = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
    rgba = np.dstack([grey, 255 - grey, grey // 2, np.full_like(grey, 7)])
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(grey).save(tmp_path / "grey.jpg", quality=100)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.dstack([grey, np.full_like(grey, 200)]), "LA").save(tmp_path / "la.png")
    palette = Image.fromarray((grey % 3).astype(np.uint8), "P")
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    palette.save(tmp_path / "palette.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    for name in ("grey.png", "grey.jpg", "rgba.png", "la.png", "palette.png", "grey16.png"):
        frame = load_rgb(tmp_path / name)
        assert frame.shape == (12, 10, 3) and frame.dtype == np.uint8, name
    for name in ("grey.png", "la.png", "grey16.png"):
        assert all(np.array_equal(load_rgb(tmp_path / name)[..., c], grey) for c in range(3)), name
    assert np.array_equal(load_rgb(tmp_path / "rgba.png"), rgba[..., :3])
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    assert np.array_equal(load_rgb(tmp_path / "palette.png"), colours[grey % 3])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="broken.png"):
        load_rgb(tmp_path / "broken.png")
    # through a dataset: a palette image with its mask, and a frame whose size disagrees with the annotations
    mask = (grey % 3 == 0)[None]
    sample = ImageSample(dataset="refcoco", sample_id="p", image_path=tmp_path / "palette.png", text="the red",
                         height=12, width=10, split="train", mask_loader=lambda: mask)
    s = ImageSampleDataset([sample], "res", seed=0)[0]
    assert np.array_equal(s.masks, mask) and s.answer == "Sure, [SEG]."
    bad = ImageSample(**{**sample.__dict__, "height": 13, "mask_loader": lambda: np.zeros((1, 13, 10), bool)})
    with pytest.raises(InputError, match="annotations"):
        ImageSampleDataset([bad], "res", seed=0)[0]


def test_chat_turns_and_imageless_samples():
    turns = [("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2"), ("user", "q3"),
             ("assistant", "a3")]
    data = ChatDataset([ChatSample(sample_id="c", image_path=None, turns=turns)], seed=0)
    seen = set()
    for epoch in range(30):
        s = data.sample(0, epoch)
        k = int(s.instruction[1]) - 1
        assert s.answer == f"a{k + 1}" and s.history == [(f"q{j + 1}", f"a{j + 1}") for j in range(k)]
        assert s.key_frame.shape == (64, 64, 3) and not s.key_frame.any() and s.masks.shape == (0, 64, 64)
        seen.add(k)
    assert seen == {0, 1, 2}
    with pytest.raises(InputError, match="expected user, assistant"):
        ChatDataset([ChatSample(sample_id="c", image_path=None, turns=turns[1:])], seed=0)[0]


def test_collate_carries_category_and_attribute_maps(roots, layout):
    """RefCOCO samples bring their category and attribute maps; the batch holds them at the decoder size (nearest),
    -1 for a sample without one, and none at all for a batch without maps."""
    images, videos = _build(roots, "refcoco"), _build(roots, "revos")
    image, video = images[0], videos[0]
    assert image.semantic is not None and image.semantic.shape == image.key_frame.shape[:2]
    assert set(np.unique(image.semantic)) >= {0} and image.semantic.max() > 0
    assert video.semantic is None
    collate = Collator(layout, image_size=2 * W, pad_id=0)
    inputs, _, _ = collate([image, video])
    assert inputs.semantic.shape == (2, 2 * W, 2 * W) and inputs.semantic.dtype == torch.long
    assert (inputs.semantic[1] == -1).all()
    reference = np.asarray(Image.fromarray(image.semantic.astype(np.uint8)).resize((2 * W, 2 * W), Image.NEAREST))
    assert (inputs.semantic[0].numpy() == reference).mean() > 0.97
    assert collate([video])[0].semantic is None
    wrong = TrainingSample(**{**image.__dict__, "semantic": image.semantic[:-1]})
    with pytest.raises(ValueError, match="category map"):
        collate([wrong])
    # the attribute maps travel the same way
    assert image.attributes is not None and image.attributes.shape == image.semantic.shape
    assert ((image.attributes > 0) == (image.semantic > 0)).all()
    assert (inputs.attributes[1] == -1).all() and collate([video])[0].attributes is None
    assert (inputs.attributes[0] > 0).eq(inputs.semantic[0] > 0).float().mean() > 0.99
    wrong = TrainingSample(**{**image.__dict__, "attributes": image.attributes[:, :-1]})
    with pytest.raises(ValueError, match="attribute map"):
        collate([wrong])
