"""Inference end to end: Python API, sessions, the `segment` CLI, outputs on disk, and bad input."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from instructseg.cli import main
from instructseg.errors import InputError
from instructseg.inference.io import open_source, write_video
from instructseg.inference.predictor import InstructSegPredictor
from instructseg.inference.results import decode_mask


@pytest.fixture(scope="module")
def predictor(seg_model_dir):
    return InstructSegPredictor(str(seg_model_dir))


@pytest.fixture(scope="module")
def video_dir(synth_root):
    return sorted((synth_root / "revos" / "JPEGImages").iterdir())[0]


@pytest.fixture(scope="module")
def video_mp4(video_dir, tmp_path_factory):
    frames = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(video_dir.glob("*.jpg"))]
    path = tmp_path_factory.mktemp("media") / "clip.mp4"
    write_video(path, frames, fps=5)
    return path


def test_video_api_gives_one_masklet_per_seg(predictor, video_dir):
    source = open_source(video_dir)
    result = predictor.segment(source, "segment the red circle", key_frames=2)
    assert result.text == "" and len(result.objects) == 1
    obj = result.objects[0]
    assert len(obj.masks_rle) == len(source) == len(result.frames)
    assert 0.0 <= obj.score <= 1.0
    assert result.timing["llm_calls"] == 1 and result.timing["key_frames"] == 2  # one answer prompts both keys


def test_propagation_runs_both_ways_from_a_middle_key_frame(predictor, video_dir):
    source = open_source(video_dir)
    answer = predictor.answer(source, "segment the red circle", key_frames=1)
    middle = len(source) // 2
    assert list(answer.key_prompts) == [middle]
    order = [f.index for f in predictor.frames(source, answer)]
    assert order == [middle, *range(middle + 1, len(source)), *range(middle - 1, -1, -1)]


def test_per_frame_mode_runs_the_llm_on_every_frame(predictor, video_dir):
    source = open_source(video_dir)
    result = predictor.segment(source, "segment the red circle", mode="per-frame")
    assert result.mode == "per-frame" and result.timing["llm_calls"] == 1 + len(source)
    assert len(result.objects) == 1 and len(result.objects[0].masks_rle) == len(source)


def test_cli_segment_video_writes_consistent_outputs(seg_model_dir, video_mp4, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["segment", str(video_mp4), "segment the red circle", "--model", str(seg_model_dir), "--out", str(out),
                 "--key-frames", "2"])
    assert code == 0
    assert capsys.readouterr().out.strip() == ""
    result = json.loads((out / "result.json").read_text())
    assert set(result) >= {"instruction", "text", "mode", "frames", "objects", "timing"}
    assert result["instruction"] == "segment the red circle" and result["mode"] == "propagate"
    (obj,) = result["objects"]
    assert set(obj) == {"id", "score", "masks_rle"} and obj["id"] == 1
    assert (out / "overlay.mp4").stat().st_size > 0
    for name, rle in zip(result["frames"], obj["masks_rle"]):
        png = np.asarray(Image.open(out / "masks" / "1" / f"{name}.png"))
        assert set(np.unique(png)) <= {0, 255}
        if rle is None:
            assert not png.any()
        else:
            assert isinstance(rle["counts"], str)
            assert np.array_equal(decode_mask(rle, result["height"], result["width"]), png > 0)


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "P"])
def test_cli_segment_image_any_mode(seg_model_dir, tmp_path, mode, capsys):
    rgb = (np.random.default_rng(0).random((37, 53, 3)) * 255).astype(np.uint8)
    image = Image.fromarray(rgb)
    if mode == "I;16":
        image = Image.fromarray((rgb[..., 0].astype(np.uint16) * 257))
    else:
        image = image.convert(mode)
    path = tmp_path / f"img_{mode.replace(';', '')}.png"
    image.save(path)
    out = tmp_path / "out"
    assert main(["segment", str(path), "the blue square", "--model", str(seg_model_dir), "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["frames"] == [path.stem] and len(result["objects"]) == 1
    assert Image.open(out / "overlay.png").size == (53, 37)
    assert Image.open(out / "masks" / "1" / f"{path.stem}.png").size == (53, 37)


def test_text_only_answers_have_no_masks(tmp_path, video_dir):
    import torch

    from instructseg.config import preset
    from instructseg.model.instructseg import InstructSegModel

    torch.manual_seed(0)
    model = InstructSegModel(preset("tiny"))
    predictor = InstructSegPredictor(model)
    result, answer = predictor.run(video_dir, "how many shapes are there?", out_dir=tmp_path / "o")
    if "[SEG]" not in answer.raw_text:  # a random LLM almost never says [SEG]
        assert result.objects == []
        assert json.loads((tmp_path / "o" / "result.json").read_text())["objects"] == []


def test_session_multi_round_and_visual_prompts(predictor, video_dir):
    session = predictor.start(video_dir)
    first = session.ask("segment the red circle")
    second = session.ask("and the blue square?")
    assert len(session.history) == 2 and session.history[0][0] == "segment the red circle"
    assert "[SEG]" in session.history[0][1]
    assert len(first.objects) == len(second.objects) == 1
    h, w = session.source.height, session.source.width
    session.add_points(2, 1, [[w / 2, h / 2]], [1])
    full = np.zeros((h, w), bool)
    full[: h // 2, : w // 2] = True
    session.add_mask(4, 1, full)
    refined = session.propagate()
    # a given mask is that frame's output: SAM2 takes it as the conditioning frame's mask
    assert np.array_equal(refined.objects[0].mask(4, h, w), full)
    with pytest.raises(Exception, match="object 2"):
        session.add_box(0, 2, [0, 0, 5, 5])
    for bad, message in ((lambda: session.add_points(1, 1, [[1, 1]], [2]), "labels are 1"),
                         (lambda: session.add_points(1, 1, [[1, 1], [w + 5, 1]], [1, 0]), r"point \(\d+, 1\) is outside"),
                         (lambda: session.add_points(1, 1, [[float("nan"), 1]], [1]), "outside"),
                         (lambda: session.add_box(1, 1, [5, 5, 2, 9]), "x0 < x1"),
                         (lambda: session.add_box(1, 1, [0, 0, w, h + 1]), "box corner")):
        with pytest.raises(InputError, match=message):
            bad()


def test_an_earlier_result_in_out_is_replaced(predictor, video_dir, tmp_path):
    out = tmp_path / "o"
    (out / "masks" / "7").mkdir(parents=True)
    (out / "masks" / "7" / "old.png").write_bytes(b"stale")
    (out / "overlay.png").write_bytes(b"stale")
    (out / "notes.txt").write_text("mine")
    result = predictor.segment(video_dir, "segment the red circle", out_dir=out)
    names = sorted(p.name for p in (out / "masks").iterdir())
    assert names == [str(k + 1) for k in range(len(result.objects))]
    assert not (out / "overlay.png").exists() and (out / "overlay.mp4").is_file()  # a video's overlay
    assert (out / "notes.txt").read_text() == "mine"


def _err(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_bad_inputs_are_one_line_errors(seg_model_dir, tmp_path, video_dir, video_mp4, capsys):
    model = ["--model", str(seg_model_dir)]
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 20)
    truncated = tmp_path / "cut.mp4"
    truncated.write_bytes(video_mp4.read_bytes()[:200])
    nothing = tmp_path / "no_images"
    nothing.mkdir()
    (nothing / "readme.txt").write_text("x")
    for path, needle in ((tmp_path / "missing.mp4", "missing.mp4"), (empty, "empty.mp4"), (text, "notes.mp4"),
                         (truncated, "cut.mp4"), (nothing, "no_images")):
        assert main(["segment", str(path), "segment it", *model]) == 2
        assert needle in _err(capsys)
    # the request and --out are checked before the model loads: an unknown model is not reached
    nomodel = ["--model", "no-such-model"]
    assert main(["segment", str(video_dir), "   ", *nomodel]) == 2
    assert "instruction is empty" in _err(capsys)
    assert main(["segment", str(video_dir), "segment it", *nomodel, "--key-frames", "0"]) == 2
    assert "--key-frames 0" in _err(capsys)
    assert main(["segment", str(video_dir), "segment it", *nomodel, "--out", str(text)]) == 2
    assert "notes.mp4 exists and is not a directory" in _err(capsys)
    assert main(["chat", str(video_dir), *nomodel, "--out", str(text)]) == 2
    assert "notes.mp4 exists and is not a directory" in _err(capsys)
    assert main(["segment", str(video_dir), "segment it", "--model", "no-such-model"]) == 2
    assert "unknown model 'no-such-model'" in _err(capsys)
    broken = tmp_path / "broken"
    shutil.copytree(seg_model_dir, broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["fusion"]["layers"] = 3
    (broken / "config.json").write_text(json.dumps(cfg))
    assert main(["segment", str(video_dir), "segment it", "--model", str(broken)]) == 2
    assert "does not match config.json" in _err(capsys)


def test_long_instruction_is_trimmed_with_a_warning(seg_model_dir, video_dir, capsys):
    long = "segment the red circle " + "and also that other shape over there " * 80
    assert main(["segment", str(video_dir), long, "--model", str(seg_model_dir)]) == 0
    err = capsys.readouterr().err
    assert "instructseg: warning: the instruction is longer than the model's context: it was trimmed" in err


@pytest.mark.slow
def test_streaming_keeps_memory_flat_on_a_long_video(seg_model_dir, tmp_path):
    """Peak RSS of `segment` on 400 frames stays close to that on 40 (fresh processes)."""
    rng = np.random.default_rng(0)
    peaks = {}
    for count in (40, 400):
        frames = []
        for t in range(count):
            frame = np.full((96, 128, 3), 40, np.uint8)
            x = 10 + (t * 3) % 100
            frame[30:60, x:x + 20] = (220, 30, 30)
            frame += rng.integers(0, 20, frame.shape, dtype=np.uint8)
            frames.append(frame)
        video = tmp_path / f"long{count}.mp4"
        write_video(video, frames, fps=25)
        script = (
            "import resource, sys\n"
            "from instructseg.cli import main\n"
            f"code = main(['segment', {str(video)!r}, 'segment the red square', '--model', {str(seg_model_dir)!r},"
            f" '--out', {str(tmp_path / f'o{count}')!r}])\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
            "sys.exit(code)\n")
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        peaks[count] = int(proc.stdout.strip().splitlines()[-1])
        result = json.loads((tmp_path / f"o{count}" / "result.json").read_text())
        assert len(result["frames"]) == count
    assert peaks[400] / peaks[40] < 1.3, peaks


def test_terminal_chat_rounds_and_commands(predictor, video_dir, tmp_path):
    import io

    from instructseg.inference.chat_cli import run_chat

    source = open_source(video_dir)
    stdin = io.StringIO("segment the red circle\n/points 1 1 10,12,1 20,5,0\n/propagate\n/nope\nand the square?\n"
                        "/box 0 1 1 2 3 4 5\n/points 0 1 1,2,3,4\n")
    stdout = io.StringIO()
    assert run_chat(source, predictor, out_dir=tmp_path / "chat", stdin=stdin, stdout=stdout) == 0
    text = stdout.getvalue()
    assert "added; /propagate to apply" in text and "unknown command '/nope'" in text
    assert text.count("error: cannot read") == 2
    for turn in (1, 2, 3):
        assert (tmp_path / "chat" / f"turn_{turn}" / "result.json").is_file()
    # a second chat in the same folder numbers on: turn 1 of the first chat is kept
    first = (tmp_path / "chat" / "turn_1" / "result.json").read_text()
    assert run_chat(source, predictor, out_dir=tmp_path / "chat", stdin=io.StringIO("the square\n"),
                    stdout=io.StringIO()) == 0
    assert (tmp_path / "chat" / "turn_4" / "result.json").is_file()
    assert (tmp_path / "chat" / "turn_1" / "result.json").read_text() == first


def test_predictor_merges_the_adapter_and_saving_undoes_it(seg_model_dir, video_dir, tmp_path):
    """The predictor folds LoRA + the [SEG] row into the LLM for speed; a save afterwards still writes the
    adapter apart (not merged twice), and the saved model answers exactly like the original."""
    from safetensors.torch import load_file

    from instructseg.llm.lora import adapter_merged

    first = InstructSegPredictor(str(seg_model_dir))
    assert adapter_merged(first.model.llm)
    before = first.segment(video_dir, "segment the red circle")
    first.model.save_pretrained(tmp_path / "again")
    assert adapter_merged(first.model.llm)  # merged again after saving
    saved, original = (load_file(str(d / "adapter" / "adapter_model.safetensors"))
                       for d in (tmp_path / "again", seg_model_dir))
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)
    after = InstructSegPredictor(str(tmp_path / "again")).segment(video_dir, "segment the red circle")
    assert [o.masks_rle for o in after.objects] == [o.masks_rle for o in before.objects]
