"""`instructseg bench`: the generated video, the raw SAM2 floor, and each command end to end on tiny models
(few frames, small sizes). The two-process training benchmark is slow (two torchrun start-ups)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from instructseg.cli import main

INFER_KEYS = ("propagate_s", "per_frame_s", "sam2_raw_s", "ratio_propagate_per_frame", "ratio_propagate_sam2",
              "llm_calls_propagate", "llm_calls_per_frame", "jf_propagate", "jf_per_frame")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: on a busy 2-core machine far faster than two spinning threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_generated_video_is_deterministic_with_exact_masks(tmp_path):
    from instructseg.bench.video import INSTRUCTION, render_frames, write_frames_dir, write_mp4
    from instructseg.inference.io import open_source

    a = write_frames_dir(tmp_path / "a", 5, 64)
    b = write_frames_dir(tmp_path / "b", 5, 64)
    assert a.instruction == INSTRUCTION and a.gt.shape == (5, 64, 64)
    np.testing.assert_array_equal(a.gt, b.gt)
    assert a.gt.any(axis=(1, 2)).all()
    assert not np.array_equal(a.gt[0], a.gt[-1])  # it moves
    assert not np.array_equal(write_frames_dir(tmp_path / "c", 5, 64, seed=1).gt, a.gt)
    pixels, mask = next(render_frames(5, 64))
    assert (pixels[mask] == (220, 30, 30)).all()  # the referred object is the red one, masks match pixels
    with open_source(a.path) as src:
        assert len(src) == 5 and (src.height, src.width) == (64, 64)
    video = write_mp4(tmp_path / "v.mp4", 6, 64)
    with open_source(video.path) as src:
        assert len(src) == 6


def test_jf_is_percent_of_region_and_boundary():
    from instructseg.bench.infer import jf

    gt = np.zeros((3, 32, 32), dtype=bool)
    gt[:, 8:20, 8:20] = True
    assert jf(gt, gt) == pytest.approx(100.0)
    assert jf(np.zeros_like(gt), gt) == pytest.approx(0.0)
    half = gt.copy()
    half[1:] = False
    assert jf(half, gt) == pytest.approx(100 / 3)


def test_raw_sam2_is_the_decoders_sam2_as_video_predictor(tmp_path):
    import torch
    from sam2.sam2_video_predictor import SAM2VideoPredictor

    from instructseg.bench.infer import build_sam2_video_predictor, run_sam2
    from instructseg.bench.video import write_frames_dir
    from instructseg.model.checkpoint import load_model

    model = load_model("tiny")
    sam2 = build_sam2_video_predictor(model)
    assert isinstance(sam2, SAM2VideoPredictor) and not sam2.training
    assert sam2.image_size == model.decoder.image_size
    ours = model.decoder.sam.state_dict()
    assert sam2.state_dict().keys() == ours.keys()
    assert all(torch.equal(v, ours[k]) for k, v in sam2.state_dict().items())
    video = write_frames_dir(tmp_path / "v", 4, 64)
    seconds, masks = run_sam2(sam2, video)
    assert seconds > 0 and masks.shape == (4, 64, 64)
    inter, union = (masks[0] & video.gt[0]).sum(), (masks[0] | video.gt[0]).sum()
    assert inter / union > 0.8  # the prompt mask is frame 0's output (up to the decoder's resolution)


def test_bench_infer_writes_every_key(tmp_path, seg_model_dir, capsys):
    out = tmp_path / "infer.json"
    frames = 6
    assert main(["bench", "infer", "--model", str(seg_model_dir), "--frames", str(frames), "--size", "64",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    for key in INFER_KEYS:
        assert key in data, key
    assert data["objects_found"] == 1
    assert data["llm_calls_propagate"] == 1  # one answer prompts every key frame
    assert data["llm_calls_per_frame"] == 1 + frames  # the answer, then one conditioning pass per frame
    for key in ("propagate_s", "per_frame_s", "sam2_raw_s"):
        assert data[key] > 0
    assert data["ratio_propagate_per_frame"] == pytest.approx(data["propagate_s"] / data["per_frame_s"], rel=1e-2)
    assert data["ratio_propagate_sam2"] == pytest.approx(data["propagate_s"] / data["sam2_raw_s"], rel=1e-2)
    for key in ("jf_propagate", "jf_per_frame", "jf_sam2_raw"):
        assert 0 <= data[key] <= 100
    printed = capsys.readouterr().out
    assert "propagate" in printed and "per-frame" in printed and "sam2 raw" in printed


def test_bench_memory_runs_segment_per_length(tmp_path, seg_model_dir, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "memory.json"
    assert main(["bench", "memory", "--model", str(seg_model_dir), "--frames", "8,4", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert list(data["rss_mb"]) == ["4", "8"]
    assert all(mb > 50 for mb in data["rss_mb"].values())  # a Python process with torch loaded
    assert data["ratio"] == pytest.approx(data["rss_mb"]["8"] / data["rss_mb"]["4"], rel=1e-3)
    assert data["objects_found"] == {"4": 1, "8": 1}
    assert "ratio 8 / 4 frames" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["bench", "infer", "--model", "tiny", "--frames", "1"], "--frames 1"),
    (["bench", "memory", "--model", "tiny", "--frames", "a,b"], "comma-separated"),
    (["bench", "memory", "--model", "tiny", "--frames", "1,32"], "at least 2"),
    (["bench", "train", "--steps", "0"], "--steps 0"),
])
def test_bench_bad_arguments_are_one_line_errors(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bench_memory_reports_a_failing_segment(monkeypatch):
    from instructseg.bench.memory import bench_memory
    from instructseg.errors import InputError

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with pytest.raises(InputError, match="segment on 2 frames failed"):
        bench_memory("no-such-model", [2], log=lambda _: None)


def test_train_commands():
    from instructseg.bench.train import RECIPE, train_command

    assert RECIPE.is_file()
    one = train_command(1, RECIPE, ["train.steps=2"])
    two = train_command(2, RECIPE, ["train.steps=2"])
    assert one[1:4] == ["-m", "instructseg", "train"] and one[-1] == "train.steps=2"
    assert two[0].endswith("torchrun") and two[1:3] == ["--nproc_per_node", "2"]


@pytest.mark.slow
def test_bench_train_one_and_two_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "train.json"
    assert main(["bench", "train", "--steps", "2", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    for name, processes in (("one_process", 1), ("two_process_zero2", 2)):
        row = data[name]
        assert row["processes"] == processes and row["steps_per_s"] > 0
        assert row["samples_per_s"] == pytest.approx(row["steps_per_s"] * row["samples_per_step"], rel=1e-2)
    assert data["two_process_zero2"]["samples_per_step"] == 2 * data["one_process"]["samples_per_step"]


def test_random_llm_answer_is_forced_to_one_seg_through_generate(tmp_path):
    from instructseg.bench.infer import ForcedAnswerModel
    from instructseg.bench.video import write_frames_dir
    from instructseg.inference.predictor import InstructSegPredictor
    from instructseg.model.checkpoint import load_model

    model = load_model("tiny")
    assert model.config.llm.random_init
    predictor = InstructSegPredictor(model)
    predictor.model = ForcedAnswerModel(model)
    video = write_frames_dir(tmp_path / "v", 4, 48)
    result, answer = predictor.run(str(video.path), video.instruction)
    assert answer.raw_text == "[SEG]" and answer.num_objects == 1 and len(result.objects) == 1
    assert len(result.objects[0].masks_rle) == 4


def test_memory_runs_the_cli_for_trained_models_and_forces_random_llms(tmp_path, seg_model_dir):
    from instructseg.bench.memory import random_llm, segment_command

    assert random_llm("tiny") and random_llm("bench-1.5b")
    assert not random_llm(str(seg_model_dir)) and not random_llm("no-such-model")
    trained = segment_command(str(seg_model_dir), tmp_path / "v.mp4", "x", tmp_path / "out")
    assert trained[1:4] == ["-m", "instructseg", "segment"]
    forced = segment_command("tiny", tmp_path / "v.mp4", "x", tmp_path / "out")
    assert forced[1:3] == ["-m", "instructseg.bench.segment"]
