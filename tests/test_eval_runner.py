"""`instructseg eval <benchmark> --model M`: every benchmark end to end with the tiny model on ShapesIVS, resuming
(after deleted records and after a real kill), failures (retried once, then recorded), two-rank sharding, and the
metrics checked against independent computations with a predictor whose masks are known."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from instructseg.cli import main
from instructseg.data.formats import read_davis17, read_reasonseg, read_refcoco, read_revos
from instructseg.eval.metrics import IoUAccumulator, jaccard
from instructseg.eval.revos import score_revos

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
REPORTS = ("results.json", "per_expression.csv", "per_video_jf.png")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: what torchrun gives each rank (so one- and two-rank numbers are comparable), and on a
    busy 2-core machine far faster than two spinning threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _eval(benchmark: str, data_root: Path, out: Path, model: Path, *extra: str) -> int:
    return main(["eval", benchmark, "--data-root", str(data_root), "--output", str(out), "--model", str(model),
                 *extra])


def _json(path: Path):
    return json.loads(Path(path).read_text())


def _env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


@pytest.fixture(scope="module")
def revos_run(synth_root, seg_model_dir, tmp_path_factory):
    """One uninterrupted single-process run over the whole ReVOS valid split: the reference the others match."""
    out = tmp_path_factory.mktemp("revos") / "out"
    assert _eval("revos", synth_root / "revos", out, seg_model_dir, "--split", "valid") == 0
    return out


# ------------------------------------------------------------------------------------------------------ ReVOS


def test_revos_writes_the_official_layout_and_the_foundations_scores(revos_run, synth_root, tmp_path):
    expressions = read_revos(synth_root / "revos", "valid")
    for expr in expressions:  # every expression, no-target ones included
        folder = revos_run / "predictions" / expr.video / expr.exp_id
        assert sorted(p.stem for p in folder.iterdir()) == sorted(expr.frames)
        for name in expr.frames:
            mask = _png(folder / f"{name}.png")
            assert mask.shape == (expr.height, expr.width) and set(np.unique(mask)) <= {0, 255}
    records = sorted((revos_run / "records").iterdir())
    assert len(records) == len(expressions) and all(_json(p)["status"] == "ok" for p in records)

    results = _json(revos_run / "results.json")
    assert results.pop("failed") == []
    rescored = score_revos(synth_root / "revos", "valid", revos_run / "predictions", tmp_path / "rescored")
    assert results == rescored  # the foundation's scorer on OUT/predictions: same keys, same numbers
    assert (revos_run / "per_expression.csv").read_bytes() == (tmp_path / "rescored/per_expression.csv").read_bytes()
    with Image.open(revos_run / "per_video_jf.png") as chart:
        assert chart.format == "PNG" and chart.width >= 400 and chart.height >= 150
    assert _json(revos_run / "run.json")["mode"] == "propagate"


def test_revos_scores_the_answers_against_the_reference_answers(revos_run, synth_root):
    """answers.json: the share of reasoning answers naming the reference's objects and of no-target answers saying
    they are absent, computed here from the stored records on their own."""
    from instructseg.eval.answers import named_objects, says_absent

    expressions = {(e.video, e.exp_id): e for e in read_revos(synth_root / "revos", "valid")}
    right, absent = [], []
    for path in (revos_run / "records").iterdir():
        record = _json(path)
        expr = expressions[tuple(record["key"].split("/"))]
        if expr.type_id == 2:
            absent.append(says_absent(record["answer"]))
        elif expr.type_id == 1 and named_objects(expr.answer):
            right.append(named_objects(record["answer"]) == named_objects(expr.answer))
    answers = _json(revos_run / "answers.json")
    assert set(answers) == {"reason", "no_target"}
    assert answers["reason"]["num"] == len(right) > 0
    assert answers["reason"]["objects"] == pytest.approx(100.0 * np.mean(right))
    assert answers["no_target"]["num"] == len(absent) > 0
    assert answers["no_target"]["said_absent"] == pytest.approx(100.0 * np.mean(absent))


def test_rerunning_a_finished_run_only_merges(revos_run, seg_model_dir, synth_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    shutil.copytree(revos_run, out)

    def no_model(*args, **kwargs):
        raise AssertionError("nothing is left to run: the model must not be loaded")

    monkeypatch.setattr("instructseg.inference.predictor.InstructSegPredictor", no_model)
    assert _eval("revos", synth_root / "revos", out, seg_model_dir, "--split", "valid") == 0
    printed = capsys.readouterr()
    assert "17 finished before, 0 to run" in printed.err
    table = printed.out.splitlines()
    header = next(line for line in table if line.split() == ["J", "F", "JF", "A", "R"])
    assert header and any(line.startswith("overall") for line in table) and "wrote" in table[-1]
    assert any(line.startswith("reasoning answers naming the reference's objects:") for line in table)
    assert _json(out / "results.json") == _json(revos_run / "results.json")


def test_another_configuration_in_the_same_output_is_refused(revos_run, seg_model_dir, synth_root, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(revos_run, out)
    assert _eval("revos", synth_root / "revos", out, seg_model_dir, "--split", "valid", "--mode", "per-frame") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another configuration" in err[0] and "mode" in err[0]


def test_weights_trained_again_into_the_same_folder_are_another_configuration(seg_model_dir, synth_root, tmp_path,
                                                                              capsys):
    from safetensors.torch import load_file, save_file

    model, out = tmp_path / "model", tmp_path / "out"
    shutil.copytree(seg_model_dir, model)
    assert _eval("revos", synth_root / "revos", out, model, "--limit", "1") == 0
    weights = load_file(str(model / "model.safetensors"))
    name = next(iter(weights))
    weights[name] = weights[name] + 1
    save_file(weights, str(model / "model.safetensors"))
    capsys.readouterr()
    assert _eval("revos", synth_root / "revos", out, model, "--limit", "2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another configuration (weights:" in err[0]


def test_bad_arguments_are_one_line_errors(seg_model_dir, synth_root, tmp_path, capsys):
    assert _eval("revos", synth_root / "revos", tmp_path / "o", seg_model_dir, "--limit", "0") == 2
    assert _eval("revos", tmp_path / "nowhere", tmp_path / "o", seg_model_dir) == 2
    assert _eval("revos", synth_root / "revos", tmp_path / "o", seg_model_dir, "--key-frames", "0") == 2
    assert main(["eval", "reasonseg", "--data-root", str(synth_root / "reasonseg"), "--output", str(tmp_path)]) == 2
    # score-only mode takes no model options; a malformed annotation file stops the run before any model loads
    assert main(["eval", "revos", "--data-root", str(synth_root / "revos"), "--output", str(tmp_path / "s"),
                 "--predictions", str(tmp_path), "--model", "tiny", "--limit", "3"]) == 2
    broken = tmp_path / "broken"
    shutil.copytree(synth_root / "revos", broken, symlinks=True)
    (broken / "mask_dict.json").unlink()
    (broken / "mask_dict.json").write_text('{"1": {"counts"')
    assert _eval("revos", broken, tmp_path / "b", Path("no-such-model")) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 6 and all(line.startswith("instructseg: error:") for line in lines)
    assert "--model, --limit only apply when a model runs" in lines[4] and "mask_dict.json" in lines[5]


def test_resuming_after_lost_records_gives_identical_outputs(revos_run, seg_model_dir, synth_root, tmp_path,
                                                            monkeypatch):
    """What a kill leaves: some records, predictions without a record, a half-written temp folder, no reports."""
    out = tmp_path / "out"
    shutil.copytree(revos_run, out)
    for name in REPORTS:
        (out / name).unlink()
    records = sorted((out / "records").iterdir())
    lost = records[::2]
    keys = [_json(path)["key"] for path in lost]
    for path in lost:
        path.unlink()
    video, exp_id = keys[0].split("/")  # an item whose record is lost: its predictions gone too ...
    shutil.rmtree(out / "predictions" / video / exp_id)
    junk = out / "predictions" / video / f".{exp_id}.tmp"  # ... and its half-written folder
    junk.mkdir()
    (junk / "garbage.png").write_bytes(b"not a png")

    from instructseg.inference.predictor import InstructSegPredictor

    calls = []
    original = InstructSegPredictor.segment
    monkeypatch.setattr(InstructSegPredictor, "segment",
                        lambda self, *a, **k: calls.append(a[1]) or original(self, *a, **k))
    assert _eval("revos", synth_root / "revos", out, seg_model_dir, "--split", "valid") == 0
    assert len(calls) == len(lost)
    for name in ("results.json", "per_expression.csv"):
        assert (out / name).read_bytes() == (revos_run / name).read_bytes()
    assert not junk.exists()


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_results(revos_run, seg_model_dir, synth_root, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "instructseg", "eval", "revos", "--data-root", str(synth_root / "revos"),
           "--split", "valid", "--output", str(out), "--model", str(seg_model_dir)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "records").is_dir() and len(list((out / "records").glob("*.json"))) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    finished = len(list((out / "records").glob("*.json")))
    assert 3 <= finished < len(read_revos(synth_root / "revos", "valid"))
    assert not (out / "results.json").exists()

    assert _eval("revos", synth_root / "revos", out, seg_model_dir, "--split", "valid") == 0
    for name in ("results.json", "per_expression.csv"):
        assert (out / name).read_bytes() == (revos_run / name).read_bytes()


@pytest.mark.slow
def test_two_ranks_give_the_same_results_as_one(revos_run, seg_model_dir, synth_root, tmp_path):
    out = tmp_path / "out"
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "instructseg", "eval", "revos",
           "--data-root", str(synth_root / "revos"), "--split", "valid", "--output", str(out),
           "--model", str(seg_model_dir)]
    run = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "rank 0 of 2 runs 9" in run.stderr
    assert run.stdout.count("wrote ") == 1  # merged once, by rank 0
    for name in ("results.json", "per_expression.csv"):
        assert (out / name).read_bytes() == (revos_run / name).read_bytes()


def _broken_revos(synth_root: Path, root: Path) -> tuple[str, str]:
    """A ReVOS copy whose first video has a corrupt frame, and one expression with an empty text. Returns the
    keys that must fail."""
    shutil.copytree(synth_root / "revos", root)
    meta_path = root / "meta_expressions_valid_.json"
    meta = _json(meta_path)
    vid, video = next(iter(meta["videos"].items()))
    scored = [k for k, e in video["expressions"].items() if e["type_id"] in (0, 1)]
    bad = f"{vid}_bad"
    shutil.copytree(root / "JPEGImages" / vid, root / "JPEGImages" / bad)
    (root / "JPEGImages" / bad / f"{video['frames'][2]}.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    bad_video = {**video, "expressions": {scored[0]: dict(video["expressions"][scored[0]])}}
    video["expressions"][scored[0]]["exp"] = ""
    meta["videos"] = {bad: bad_video, **meta["videos"]}
    meta_path.write_text(json.dumps(meta))
    foreground = _json(root / "mask_dict_foreground.json")
    foreground[bad] = foreground[vid]
    (root / "mask_dict_foreground.json").write_text(json.dumps(foreground))
    return f"{bad}/{scored[0]}", f"{vid}/{scored[0]}"


def test_transient_failures_are_retried_once_bad_data_recorded_at_once(seg_model_dir, synth_root, tmp_path, monkeypatch, capsys):
    root, out = tmp_path / "revos", tmp_path / "out"
    corrupt, empty = _broken_revos(synth_root, root)
    from instructseg.inference.predictor import InstructSegPredictor

    attempts: dict[str, int] = {}
    original = InstructSegPredictor.segment

    def flaky(self, source, instruction, **kwargs):  # the third item fails once, transiently
        attempts[instruction] = attempts.get(instruction, 0) + 1
        if len(attempts) == 3 and attempts[instruction] == 1:
            raise RuntimeError("transient failure")
        return original(self, source, instruction, **kwargs)

    monkeypatch.setattr(InstructSegPredictor, "segment", flaky)
    assert _eval("revos", root, out, seg_model_dir, "--limit", "4") == 0
    printed = capsys.readouterr()
    results = _json(out / "results.json")
    assert [f["key"] for f in results["failed"]] == [corrupt, empty]
    assert all(f["attempts"] == 1 for f in results["failed"])  # bad data fails alike every time: no retry
    assert "not a readable image" in results["failed"][0]["error"]
    assert "instruction is empty" in results["failed"][1]["error"]
    assert results["missing"] == [corrupt, empty]  # scored 0, as the scorer scores a missing prediction
    assert not (out / "predictions" / corrupt).exists() and not (out / "predictions" / empty).exists()
    records = {r["key"]: r for r in map(_json, (out / "records").iterdir())}
    assert len(records) == 4 and sum(r["status"] == "ok" and r["attempts"] == 2 for r in records.values()) == 1
    assert printed.err.count("retrying") == 1 and "FAILED: 2 of 4" in printed.out

    # failed items are not finished: a re-run tries them again, and gives the same numbers
    monkeypatch.setattr(InstructSegPredictor, "segment", original)
    assert _eval("revos", root, out, seg_model_dir, "--limit", "4") == 0
    assert _json(out / "results.json") == results


# ------------------------------------------------------------------------------------------- other videos


def _mevis_layout(synth_root: Path, root: Path, split: str = "valid_u") -> Path:
    """MeViS converted from the ReVOS output (as tests/test_readers.py does), with its mask_dict."""
    meta = _json(synth_root / "revos" / "meta_expressions_valid_.json")["videos"]
    videos = {}
    for vid, video in meta.items():
        shutil.copytree(synth_root / "revos" / "JPEGImages" / vid, root / split / "JPEGImages" / vid)
        videos[vid] = {"frames": video["frames"], "expressions": {
            k: {"exp": e["exp"], "obj_id": [o - 1 for o in e["obj_id"]], "anno_id": [int(a) for a in e["anno_id"]]}
            for k, e in video["expressions"].items() if e["type_id"] != 2}}
    (root / split / "meta_expressions.json").write_text(json.dumps({"videos": videos}))
    shutil.copy(synth_root / "revos" / "mask_dict.json", root / split / "mask_dict.json")
    return root


def _davis_layout(synth_root: Path, root: Path) -> Path:
    shutil.copytree(synth_root / "refytvos" / "valid", root / "valid")
    shutil.copytree(synth_root / "refytvos" / "meta_expressions" / "valid", root / "meta_expressions" / "valid")
    return root


def test_refytvos_writes_the_submission_and_scores_where_ground_truth_exists(seg_model_dir, synth_root, tmp_path):
    out = tmp_path / "out"
    assert _eval("refytvos", synth_root / "refytvos", out, seg_model_dir, "--limit", "3") == 0
    results = _json(out / "results.json")
    assert set(results) == {"J", "F", "JF", "num_expressions", "failed"} and results["num_expressions"] == 3
    assert abs(results["JF"] - (results["J"] + results["F"]) / 2) < 1e-3
    pngs = sorted((out / "Annotations").rglob("*.png"))
    assert len(pngs) == 3 * 6
    with Image.open(pngs[0]) as img:
        assert img.mode == "P" and set(np.unique(np.asarray(img))) <= {0, 1}
    with zipfile.ZipFile(out / "submission.zip") as archive:
        assert sorted(archive.namelist()) == sorted(p.relative_to(out).as_posix() for p in pngs)
        assert all(n.startswith("Annotations/") for n in archive.namelist())
    assert (out / "per_video_jf.png").is_file()

    # the public valid split: no Annotations, no obj_id -> the submission only
    root = tmp_path / "ytvos"
    shutil.copytree(synth_root / "refytvos", root)
    shutil.rmtree(root / "valid" / "Annotations")
    meta_path = root / "meta_expressions" / "valid" / "meta_expressions.json"
    meta = _json(meta_path)
    for video in meta["videos"].values():
        for e in video["expressions"].values():
            del e["obj_id"]
    meta_path.write_text(json.dumps(meta))
    blind = tmp_path / "blind"
    assert _eval("refytvos", root, blind, seg_model_dir, "--limit", "2") == 0
    results = _json(blind / "results.json")
    assert results["J"] is None and results["num_expressions"] == 2 and "submission.zip" in results["note"]
    assert results["failed"] == [] and not (blind / "per_video_jf.png").exists()
    zipped = (blind / "submission.zip").read_bytes()
    assert _eval("refytvos", root, blind, seg_model_dir, "--limit", "2") == 0
    assert (blind / "submission.zip").read_bytes() == zipped  # deterministic archive


def test_mevis_default_split_per_frame_mode(seg_model_dir, synth_root, tmp_path, capsys):
    root, out = _mevis_layout(synth_root, tmp_path / "mevis"), tmp_path / "out"
    assert _eval("mevis", root, out, seg_model_dir, "--limit", "2", "--mode", "per-frame") == 0
    results = _json(out / "results.json")
    assert results["num_expressions"] == 2 and results["J"] is not None and results["failed"] == []
    assert len(list((out / "predictions").rglob("*.png"))) == 2 * 6
    assert _json(out / "run.json")["split"] == "valid_u" and _json(out / "run.json")["mode"] == "per-frame"
    assert "MeViS valid_u" in capsys.readouterr().out


def test_davis17_scores_by_the_davis_protocol(seg_model_dir, synth_root, tmp_path):
    root, out = _davis_layout(synth_root, tmp_path / "davis"), tmp_path / "out"
    assert _eval("davis17", root, out, seg_model_dir, "--limit", "2") == 0
    _check_davis(root, out, 2)


def _check_davis(root: Path, out: Path, n: int) -> None:
    """J recomputed from the PNGs over frames 1..T-2 (DAVIS drops the first and last frame)."""
    expressions = read_davis17(root, "valid")[:n]
    js = []
    for e in expressions:
        pred = np.stack([_png(out / "predictions" / e.video / e.exp_id / f"{f}.png") > 0 for f in e.frames])
        js.append(jaccard(pred[1:-1], e.union_masks()[1:-1]).mean())
    assert _json(out / "results.json")["J"] == round(100 * float(np.mean(js)), 4)


# ------------------------------------------------------------------------------------------------ images


def test_refcoco_per_split_and_default_splits(seg_model_dir, synth_root, tmp_path, capsys):
    out = tmp_path / "out"
    assert _eval("refcoco", synth_root / "refcoco", out, seg_model_dir, "--splits", "val,testA", "--limit", "2") == 0
    results = _json(out / "results.json")
    assert set(results["refcoco"]) == {"val", "testA"}
    assert all(set(r) == {"cIoU", "gIoU", "num"} and r["num"] == 2 for r in results["refcoco"].values())
    assert len(list((out / "predictions" / "val").glob("*.png"))) == 2
    capsys.readouterr()
    # no --splits: val, testA, testB where present (ShapesIVS has no testB: said, not fatal)
    assert _eval("refcoco", synth_root / "refcoco", tmp_path / "default", seg_model_dir, "--limit", "1") == 0
    assert "testB" in capsys.readouterr().err
    assert set(_json(tmp_path / "default" / "results.json")["refcoco"]) == {"val", "testA"}


def test_reasonseg_end_to_end(seg_model_dir, synth_root, tmp_path):
    out = tmp_path / "out"
    assert _eval("reasonseg", synth_root / "reasonseg", out, seg_model_dir) == 0
    results = _json(out / "results.json")
    assert set(results) == {"gIoU", "cIoU", "num", "failed"} and results["num"] == 2
    with open(out / "per_expression.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 2


# --------------------------------------------------------------------------- metrics with known predictions


class ShapesPredictor:
    """Predicts every pixel unlike the top-left one (all the shapes): deterministic, non-trivial masks with known
    values, for checking the numbers."""

    def __init__(self, model, device="cpu", llm_dtype="auto"):
        pass

    def segment(self, source, instruction, *, mode="propagate", key_frames=None):
        from instructseg.inference.results import Masklet, SegmentationResult, encode_mask

        rles = []
        for t in range(len(source)):
            frame = source.frame(t).astype(int)
            rles.append(encode_mask(np.abs(frame - frame[0, 0]).sum(axis=-1) > 60))
        return SegmentationResult(instruction=instruction, text="", mode=mode, frames=list(source.names),
                                  height=source.height, width=source.width, objects=[Masklet(1, 1.0, rles)])


def test_numbers_match_independent_computations(synth_root, tmp_path, monkeypatch):
    monkeypatch.setattr("instructseg.inference.predictor.InstructSegPredictor", ShapesPredictor)
    out = tmp_path / "revos"
    assert _eval("revos", synth_root / "revos", out, "shapes") == 0
    results = _json(out / "results.json")
    results.pop("failed")
    assert results == score_revos(synth_root / "revos", "valid", out / "predictions", tmp_path / "rescored")
    assert 0 < results["overall"]["J"] < 100

    root = _davis_layout(synth_root, tmp_path / "davis")
    assert _eval("davis17", root, tmp_path / "davis_out", "shapes", "--limit", "4") == 0
    _check_davis(root, tmp_path / "davis_out", 4)

    for bench, samples, extra in (
            ("reasonseg", read_reasonseg(synth_root / "reasonseg", "val"), ()),
            ("refcoco", read_refcoco(synth_root / "refcoco", "refcoco", "unc", "val"), ("--splits", "val"))):
        out = tmp_path / bench
        assert _eval(bench, synth_root / bench, out, "shapes", *extra) == 0
        acc = IoUAccumulator()
        for s in samples:
            acc.add(_png(out / "predictions" / s.split / f"{s.sample_id}.png") > 0, s.union_mask(), s.ignore())
        results = _json(out / "results.json")
        row = results if bench == "reasonseg" else results["refcoco"]["val"]
        assert (row["cIoU"], row["gIoU"]) == (round(100 * acc.ciou, 4), round(100 * acc.giou, 4))
        assert row["gIoU"] > 0


# ------------------------------------------------------------------------------------------------- pieces


def test_record_names_are_flat_and_distinct():
    from instructseg.eval.storage import record_name

    keys = ["a/b", "a%2Fb", "a b/c", "x" * 400, "x" * 399 + "y", "../up"]
    names = [record_name(k) for k in keys]
    assert len(set(names)) == len(keys) and all("/" not in n and len(n) < 200 for n in names)


def test_frame_list_source_reads_the_listed_frames(synth_root, tmp_path):
    from instructseg.eval.frames import FrameListSource

    expr = read_revos(synth_root / "revos", "valid")[0]
    files = list(reversed(expr.frame_paths))  # the list decides the order, not the folder
    source = FrameListSource(files, list(reversed(expr.frames)), expr.height, expr.width)
    assert len(source) == expr.num_frames and source.names[0] == expr.frames[-1]
    assert np.array_equal(source.frame(0), np.asarray(Image.open(files[0]).convert("RGB")))
    assert source.resized(1, 32).shape == (32, 32, 3)
    small = tmp_path / "small.jpg"
    Image.open(files[0]).resize((40, 32)).save(small)
    with pytest.warns(UserWarning, match="resized"):
        assert FrameListSource([small], ["f"], expr.height, expr.width).frame(0).shape == (expr.height, expr.width, 3)


def test_chart_of_many_videos(tmp_path):
    from instructseg.eval.charts import per_video_chart

    per_video_chart(tmp_path / "c.png", {f"video{i}": float(i % 100) for i in range(130)}, 42.0, title="t")
    with Image.open(tmp_path / "c.png") as img:
        assert img.format == "PNG" and img.height < 2200
