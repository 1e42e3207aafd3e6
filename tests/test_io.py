"""Frame sources, video writing, RLE helpers and the result writer, on media made here in tmp dirs."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from instructseg.errors import InputError
from instructseg.inference.io import (FrameDirSource, ImageSource, VideoFileSource, has_encoder, open_source,
                                      squash, video_codec, write_video)
from instructseg.inference.results import (PALETTE, Masklet, ResultWriter, SegmentationResult, decode_mask,
                                           encode_mask, overlay)


def moving_square(n=12, h=48, w=64, noise=False):
    """n frames: a horizontal red ramp, blue 80, a yellow 16x16 square moving right 3 px per frame."""
    rng = np.random.default_rng(0)
    out = []
    for t in range(n):
        a = np.zeros((h, w, 3), np.uint8)
        a[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None]
        a[..., 2] = 80
        x = (3 * t) % max(w - 16, 1)
        a[8:24, x:x + 16] = (255, 255, 0)
        if noise:
            a = np.clip(a.astype(int) + rng.integers(-20, 20, a.shape), 0, 255).astype(np.uint8)
        out.append(a)
    return out


def mad(a, b):
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def raises_input_error(path, fn=open_source):
    t0 = time.monotonic()
    with pytest.raises(InputError) as info:
        src = fn(path)
        for _ in src.iter_frames():
            pass
    assert time.monotonic() - t0 < 5
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg
    return msg


# ---------------------------------------------------------------------------------------------- videos
@pytest.mark.parametrize("ext", [".mp4", ".mkv", ".avi", ".webm", ".mov"])
def test_video_round_trip(tmp_path, ext):
    try:
        codec = video_codec(tmp_path / f"x{ext}")
    except ValueError as err:
        pytest.skip(str(err))
    frames = moving_square()
    path = write_video(tmp_path / f"v{ext}", frames, fps=10)
    with open_source(path) as src:
        assert isinstance(src, VideoFileSource) and src.is_video, codec
        assert len(src) == 12 and (src.height, src.width) == (48, 64)
        assert src.names == [f"{i:05d}" for i in range(12)]
        assert src.fps == pytest.approx(10.0)
        seq = [f for _, f in src.iter_frames()]
        assert len(seq) == 12
        for ref, got in zip(frames, seq):
            assert got.dtype == np.uint8 and got.shape == (48, 64, 3)
            assert mad(ref, got) < 6
        for i in (7, 2, 11, 0, 5, 5):  # random access, backwards jumps included, equals the sequential pass
            np.testing.assert_array_equal(src.frame(i), seq[i])
        for i in reversed(range(12)):
            np.testing.assert_array_equal(src.resized(i, 24), squash(seq[i], 24))


def _rotated_video(path: Path, frames: list[np.ndarray], degrees: int) -> Path:
    """An mp4 of `frames` as stored, with a display matrix saying to turn them `degrees` counter-clockwise (a phone
    held upright writes -90)."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.set_display_rotation(degrees)
        for a in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")))
        out.mux(stream.encode())
    return path


@pytest.mark.parametrize("degrees, turns", [(-90, -1), (90, 1), (180, 2), (0, 0)])
def test_rotated_phone_video_is_read_as_displayed(tmp_path, degrees, turns):
    frames = moving_square(n=4)
    with open_source(_rotated_video(tmp_path / "phone.mp4", frames, degrees)) as src:
        shown = [np.rot90(f, turns) for f in frames]
        assert (src.height, src.width) == shown[0].shape[:2] and len(src) == 4
        seq = [f for _, f in src.iter_frames()]
        for ref, got in zip(shown, seq):
            assert got.shape == ref.shape and mad(ref, got) < 6
        np.testing.assert_array_equal(src.frame(2), seq[2])
        np.testing.assert_array_equal(src.resized(3, 24), squash(seq[3], 24))
    if degrees == -90:  # what a player shows: the stored frame turned clockwise, so the red ramp (dark on the
        red = seq[0][..., 0].astype(float)  # stored frame's left, bright on its right) runs from top to bottom
        assert red[:4, :10].mean() < 30 and red[-4:, :10].mean() > 220  # (columns clear of the square)


def test_write_video_pads_odd_sizes_and_keeps_fps(tmp_path):
    path = write_video(tmp_path / "odd.mp4", moving_square(n=5, h=47, w=63), fps=25)
    with open_source(path) as src:
        assert (len(src), src.height, src.width) == (5, 48, 64)
        assert src.fps == pytest.approx(25.0)
    with pytest.raises(ValueError):
        write_video(tmp_path / "none.mp4", [], fps=10)


def test_truncated_video_keeps_decodable_frames(tmp_path):
    path = write_video(tmp_path / "full.mp4", moving_square(n=40, h=96, w=128, noise=True), fps=10)
    data = path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.3)])
    # Decision: the frames that decode are kept, with a warning (the mp4 index is at the front: faststart).
    with pytest.warns(UserWarning, match="truncated"), open_source(cut) as src:
        assert 0 < len(src) < 40
        assert sum(1 for _ in src.iter_frames()) == len(src)
        assert src.frame(len(src) - 1).shape == (96, 128, 3)


def test_truncated_video_without_frames_raises(tmp_path):
    path = write_video(tmp_path / "one.mkv", moving_square(n=1, h=96, w=128, noise=True), fps=10)
    data = path.read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) // 2])
    assert "no frames" in raises_input_error(cut)


# ---------------------------------------------------------------------------------------------- frame dirs and images
def test_frame_dir_natural_sort(tmp_path):
    colours = {}
    for k, name in enumerate(["10", "2", "1", "frame_003", "frame_20"]):
        colours[name] = (20 * k, 255 - 20 * k, 7 * k)
        Image.new("RGB", (40, 30), colours[name]).save(tmp_path / f"{name}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    (tmp_path / ".hidden.png").write_bytes(b"junk")
    with open_source(tmp_path) as src:
        assert isinstance(src, FrameDirSource) and src.is_video and src.fps == 10.0
        assert src.names == ["1", "2", "10", "frame_003", "frame_20"]
        assert (len(src), src.height, src.width) == (5, 30, 40)
        for i, name in enumerate(src.names):
            assert tuple(src.frame(i)[0, 0]) == colours[name]
        assert [i for i, _ in src.iter_frames()] == list(range(5))
        np.testing.assert_array_equal(src.resized(3, 16), squash(src.frame(3), 16))


def test_frame_dir_mixed_sizes_resized_to_first(tmp_path):
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "0.jpg")
    Image.new("RGB", (80, 60), (0, 255, 0)).save(tmp_path / "1.jpg")
    Image.new("RGB", (40, 30), (0, 0, 255)).save(tmp_path / "2.jpg")
    with pytest.warns(UserWarning, match="differ in size"):
        src = open_source(tmp_path)
    assert all(f.shape == (30, 40, 3) for _, f in src.iter_frames())
    assert mad(src.frame(1), np.full((30, 40, 3), (0, 255, 0), np.uint8)) < 3


def _mode(path: Path) -> str:
    with Image.open(path) as img:
        return img.mode


def _single(path: Path) -> np.ndarray:
    src = open_source(path)
    assert isinstance(src, ImageSource) and not src.is_video and len(src) == 1 and src.names == [path.stem]
    img = src.frame(0)
    assert img.dtype == np.uint8 and img.shape == (src.height, src.width, 3)
    return img


def test_image_modes_become_uint8_rgb(tmp_path):
    Image.new("L", (8, 6), 100).save(tmp_path / "gray.png")
    assert (_single(tmp_path / "gray.png") == 100).all()
    Image.new("LA", (8, 6), (100, 0)).save(tmp_path / "la.png")
    assert (_single(tmp_path / "la.png") == 100).all()
    Image.new("RGBA", (8, 6), (10, 20, 30, 0)).save(tmp_path / "rgba.png")
    assert (_single(tmp_path / "rgba.png") == (10, 20, 30)).all()
    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[:, 4:] = (200, 50, 10)
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(tmp_path / "pal.png")
    assert _mode(tmp_path / "pal.png") == "P"
    np.testing.assert_array_equal(_single(tmp_path / "pal.png"), rgb)
    Image.fromarray(rgb).save(tmp_path / "lossless.webp", lossless=True)
    np.testing.assert_array_equal(_single(tmp_path / "lossless.webp"), rgb)
    Image.fromarray(rgb).save(tmp_path / "x.bmp")
    np.testing.assert_array_equal(_single(tmp_path / "x.bmp"), rgb)
    Image.fromarray(rgb).save(tmp_path / "x.tif")
    np.testing.assert_array_equal(_single(tmp_path / "x.tif"), rgb)


def test_16bit_and_cmyk_images(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (4, 1))
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert _mode(tmp_path / "deep.png").startswith("I")
    img = _single(tmp_path / "deep.png")
    row = img[0, :, 0].astype(int)
    assert (np.diff(row) >= 0).all() and row[0] == 0 and row[-1] == 255
    assert (img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all()
    twelve_bit = np.array([[0, 1000], [2000, 4095]], np.int32)  # mode "I": shifted by its actual bit range
    Image.fromarray(twelve_bit).save(tmp_path / "i32.tif")
    assert _single(tmp_path / "i32.tif")[..., 0].tolist() == [[0, 62], [125, 255]]
    Image.fromarray(np.array([[0, 0.5], [0.25, 1.0]], np.float32)).save(tmp_path / "float.tif")
    assert _single(tmp_path / "float.tif")[..., 1].tolist() == [[0, 128], [64, 255]]
    Image.fromarray(np.array([[0, 1], [1, 0]], bool)).save(tmp_path / "bits.png")
    assert _single(tmp_path / "bits.png")[..., 2].tolist() == [[0, 255], [255, 0]]
    red = np.zeros((16, 16, 3), np.uint8)
    red[..., 0] = 255
    Image.fromarray(red).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    assert _mode(tmp_path / "cmyk.jpg") == "CMYK"
    assert mad(_single(tmp_path / "cmyk.jpg"), red) < 8


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_one_line_input_error(tmp_path):
    raises_input_error(tmp_path / "missing.mp4")
    for name in ("empty.mp4", "empty.jpg"):
        (tmp_path / name).write_bytes(b"")
        assert "empty" in raises_input_error(tmp_path / name)
    (tmp_path / "text.mp4").write_text("hello, this is not a video\n" * 20)
    assert "not a readable video" in raises_input_error(tmp_path / "text.mp4")
    (tmp_path / "anim.gif").write_bytes(b"GIF89a")
    assert "unsupported" in raises_input_error(tmp_path / "anim.gif")
    (tmp_path / "empty_dir").mkdir()
    raises_input_error(tmp_path / "empty_dir")
    (tmp_path / "only_text").mkdir()
    (tmp_path / "only_text" / "a.txt").write_text("x")
    raises_input_error(tmp_path / "only_text")
    (tmp_path / "text.png").write_text("not an image")
    raises_input_error(tmp_path / "text.png")
    bad_dir = tmp_path / "bad_dir"
    bad_dir.mkdir()
    Image.new("RGB", (8, 8)).save(bad_dir / "0.png")
    (bad_dir / "1.png").write_text("not an image")
    raises_input_error(bad_dir / "1.png", fn=lambda p: open_source(p.parent))
    # a JPEG whose header is fine but whose data is cut: fails when the frame is read, still an InputError
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.jpg")
    cut_dir = tmp_path / "cut_dir"
    cut_dir.mkdir()
    (cut_dir / "0.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:300])
    raises_input_error(cut_dir / "0.jpg", fn=lambda p: open_source(p.parent))


# ---------------------------------------------------------------------------------------------- RLE and results
def test_rle_round_trip():
    rng = np.random.default_rng(0)
    mask = rng.random((30, 40)) > 0.6
    rle = encode_mask(mask)
    assert isinstance(rle["counts"], str) and rle["size"] == [30, 40]
    json.dumps(rle)
    np.testing.assert_array_equal(decode_mask(rle, 30, 40), mask)
    np.testing.assert_array_equal(decode_mask({**rle, "counts": rle["counts"].encode()}, 30, 40), mask)
    assert encode_mask(np.zeros((30, 40), bool)) is None
    assert not decode_mask(None, 30, 40).any()
    with pytest.raises(ValueError):
        decode_mask(rle, 40, 30)
    m = Masklet(id=1, score=0.9, masks_rle=[rle, None])
    np.testing.assert_array_equal(m.mask(0, 30, 40), mask)
    assert not m.mask(1, 30, 40).any()
    as_bytes = Masklet(1, 0.9, [{**rle, "counts": rle["counts"].encode()}, None])
    assert as_bytes.to_json()["masks_rle"] == [rle, None]
    res = SegmentationResult("find it", "[SEG]", "propagate", ["a", "b"], 30, 40, [m], {"llm": 0.5})
    back = SegmentationResult.from_json(json.loads(json.dumps(res.to_json())))
    assert back == res
    np.testing.assert_array_equal(back.masks(0)[0], mask)
    with pytest.raises(InputError, match="missing key 'objects'"):
        SegmentationResult.from_json({"instruction": "", "text": "", "mode": "", "frames": []})


def _square_masks(t, n_obj, h, w):
    masks = np.zeros((n_obj, h, w), bool)
    for k in range(n_obj):
        masks[k, 4 + 10 * k: 12 + 10 * k, 2 * t: 2 * t + 10] = True
    if t == 2:
        masks[:] = False  # an empty frame: null RLE, all-zero PNG
    return masks


def test_result_writer_video(tmp_path):
    src = open_source(write_video(tmp_path / "in.mp4", moving_square(n=6), fps=10))
    writer = ResultWriter(tmp_path / "out", src, num_objects=2)
    for t in (3, 0, 5, 2, 1, 4):
        writer.add(t, _square_masks(t, 2, 48, 64))
    with pytest.raises(ValueError):
        writer.add(0, _square_masks(0, 2, 48, 64))
    with pytest.raises(ValueError):
        writer.add(1, np.zeros((3, 48, 64), bool))
    with pytest.raises(ValueError, match="bool"):
        writer.add(1, np.zeros((2, 48, 64), np.float32))
    result = SegmentationResult(instruction="segment the squares", text="Sure: [SEG] [SEG]", mode="propagate",
                                frames=[], height=0, width=0,
                                objects=[Masklet(1, 0.9, []), Masklet(2, 0.4, [])], timing={"total": 1.5})
    out = writer.finish(result)
    data = json.loads((out / "result.json").read_text())
    assert set(data) == {"instruction", "text", "mode", "frames", "objects", "timing", "height", "width"}
    assert data["frames"] == src.names and (data["height"], data["width"]) == (48, 64)
    assert [set(o) for o in data["objects"]] == [{"id", "score", "masks_rle"}] * 2
    assert [o["id"] for o in data["objects"]] == [1, 2] and data["objects"][0]["score"] == 0.9
    assert data["objects"][0]["masks_rle"][2] is None
    loaded = SegmentationResult.from_json(data)
    for k in range(2):
        for t, name in enumerate(src.names):
            png = np.asarray(Image.open(out / "masks" / str(k + 1) / f"{name}.png"))
            assert png.dtype == np.uint8 and set(np.unique(png)) <= {0, 255}
            np.testing.assert_array_equal(png == 255, loaded.objects[k].mask(t, 48, 64))
            np.testing.assert_array_equal(png == 255, _square_masks(t, 2, 48, 64)[k])
    with open_source(out / "overlay.mp4") as ov:
        assert (len(ov), ov.height, ov.width) == (6, 48, 64)
    assert not (out / ".result.json.tmp").exists()


def test_result_writer_image_and_text_only(tmp_path):
    Image.new("RGB", (40, 30), (50, 60, 70)).save(tmp_path / "img.png")
    src = open_source(tmp_path / "img.png")
    writer = ResultWriter(tmp_path / "out", src, num_objects=1)
    mask = np.zeros((1, 30, 40), bool)
    mask[0, 5:15, 5:25] = True
    writer.add(0, mask)
    writer.finish(SegmentationResult("seg it", "[SEG]", "image", [], 0, 0, [Masklet(1, 1.0, [])], {}))
    assert (tmp_path / "out" / "masks" / "1" / "img.png").exists()
    ov = np.asarray(Image.open(tmp_path / "out" / "overlay.png"))
    assert ov.shape == (30, 40, 3) and (ov[0, 0] == (50, 60, 70)).all() and not (ov[10, 10] == (50, 60, 70)).all()

    video = open_source(write_video(tmp_path / "v.mp4", moving_square(n=4), fps=10))
    text_only = ResultWriter(tmp_path / "text", video, num_objects=0)
    text_only.finish(SegmentationResult("is there a cat?", "No.", "propagate", [], 0, 0))
    data = json.loads((tmp_path / "text" / "result.json").read_text())
    assert data["objects"] == [] and data["text"] == "No."
    assert list((tmp_path / "text" / "masks").iterdir()) == []
    assert len(open_source(tmp_path / "text" / "overlay.mp4")) == 4


def test_overlay_blend_and_palette():
    assert len(set(PALETTE)) >= 10
    frame = np.full((20, 20, 3), 100, np.uint8)
    masks = np.zeros((2, 20, 20), bool)
    masks[0, 2:10, 2:10] = True
    masks[1, 12:18, 12:18] = True
    out = overlay(frame, masks)
    assert (out[0, 0] == 100).all() and (out[11, 11] == 100).all()
    assert tuple(out[2, 5]) == PALETTE[0] and tuple(out[12, 15]) == PALETTE[1]  # contour
    expected = np.round(0.5 * 100 + 0.5 * np.array(PALETTE[0]))
    np.testing.assert_array_equal(out[5, 5], expected)  # interior: alpha 0.5 blend


# ---------------------------------------------------------------------------------------------- memory
def test_resized_cache_is_on_disk(tmp_path):
    n, size = 300, 32
    path = write_video(tmp_path / "long.mp4", moving_square(n=n, h=64, w=64), fps=30)
    src = open_source(path)
    assert len(src) == n
    for order in (range(n), reversed(range(n))):
        for i in order:
            assert src.resized(i, size).shape == (size, size, 3)
    cache = src.cache_file(size)
    assert cache is not None and cache.stat().st_size == n * size * size * 3
    for i in (0, 150, 299):
        np.testing.assert_array_equal(src.resized(i, size), squash(src.frame(i), size))
    held = [v for obj in (src, src._res) for v in vars(obj).values()]
    held += [v[1] for v in held if isinstance(v, tuple) and len(v) == 2]
    big = sum(v.nbytes for v in held if isinstance(v, np.ndarray))
    assert big <= 64 * 64 * 3  # at most the one last decoded frame
    src.close()
    assert not cache.exists() and not cache.parent.exists()


def test_has_encoder():
    assert has_encoder("mpeg4") and not has_encoder("no-such-codec")


def test_frame_limit_stops_counting_early(tmp_path):
    from instructseg.errors import FrameLimitError

    video = write_video(tmp_path / "v.mp4", (np.full((32, 32, 3), 10 * t, np.uint8) for t in range(12)))
    with pytest.raises(FrameLimitError, match="more than 5 frames"):
        open_source(video, max_frames=5)
    with open_source(video, max_frames=12) as source:
        assert len(source) == 12
    frames = tmp_path / "frames"
    frames.mkdir()
    for t in range(4):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(frames / f"{t}.png")
    with pytest.raises(FrameLimitError, match="4 frames, more than 3"):
        open_source(frames, max_frames=3)
