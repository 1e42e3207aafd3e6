"""The ReVOS scorer: hand-computed scores, the public scorer's legacy arithmetic, and end to end on ShapesIVS."""
from __future__ import annotations

import csv
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from instructseg.errors import InputError
from instructseg.eval.revos import (CSV_HEADER, ExpressionScore, MissingPredictionWarning, legacy_visa_accuracy,
                                    legacy_visa_robustness, read_prediction_png, score_expression, score_revos,
                                    summarise)

GROUP_KEYS = {"J", "F", "JF", "A", "R"}
RESULT_KEYS = {"referring", "reason", "overall", "missing", "num_expressions"}


# ------------------------------------------------------------------------------------------- helpers


@dataclass
class FakeExpression:
    """Just the VideoExpression surface the scorer uses, for tests that need no dataset reader."""

    video: str
    exp_id: str
    objects: np.ndarray                 # (N, T, H, W) bool
    fg: np.ndarray | None
    type_id: int = 0
    text: str = "the thing"

    @property
    def frames(self) -> list[str]:
        return [f"{t:05d}" for t in range(self.objects.shape[1])]

    @property
    def height(self) -> int:
        return self.objects.shape[2]

    @property
    def width(self) -> int:
        return self.objects.shape[3]

    def masks(self) -> np.ndarray:
        return self.objects

    def union_masks(self) -> np.ndarray:
        return self.objects.any(axis=0)

    def foreground(self) -> np.ndarray | None:
        return self.fg


def write_masks(pred_dir: Path, video: str, exp_id: str, frames: list[str], masks: np.ndarray,
                scale: int = 255) -> None:
    folder = pred_dir / video / exp_id
    folder.mkdir(parents=True, exist_ok=True)
    for name, mask in zip(frames, masks):
        Image.fromarray(mask.astype(np.uint8) * scale, mode="L").save(folder / f"{name}.png")


def write_expression_predictions(pred_dir: Path, expressions, transform=lambda m: m, scale: int = 255) -> None:
    """Predictions = transform(ground-truth union) for every scored expression."""
    for e in expressions:
        if e.type_id in (0, 1):
            write_masks(pred_dir, e.video, e.exp_id, e.frames, transform(e.union_masks().astype(bool)), scale)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------------- reading prediction PNGs


def test_prediction_png_modes_binarise_alike(tmp_path):
    mask = np.zeros((6, 7), bool)
    mask[1:4, 2:6] = True
    u8 = mask.astype(np.uint8)
    palette = Image.fromarray(u8, mode="P")
    palette.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)
    images = {
        "l255": Image.fromarray(u8 * 255, mode="L"),
        "l1": Image.fromarray(u8, mode="L"),
        "palette": palette,
        "rgb": Image.fromarray(np.stack([u8 * 200, u8 * 0, u8 * 0], axis=-1), mode="RGB"),
        "bit": Image.fromarray(mask).convert("1"),
    }
    for name, img in images.items():
        img.save(tmp_path / f"{name}.png")
        np.testing.assert_array_equal(read_prediction_png(tmp_path / f"{name}.png", 6, 7), mask, err_msg=name)
    assert read_prediction_png(tmp_path / "l255.png", 6, 7, grey=True).max() == 255
    assert read_prediction_png(tmp_path / "l1.png", 6, 7, grey=True).max() == 1


def test_prediction_png_wrong_size_names_file_and_sizes(tmp_path):
    Image.new("L", (9, 5)).save(tmp_path / "00000.png")
    with pytest.raises(InputError, match=r"00000\.png.*9x5.*7x6"):
        read_prediction_png(tmp_path / "00000.png", 6, 7)


def test_prediction_png_unreadable(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match=r"bad\.png"):
        read_prediction_png(tmp_path / "bad.png", 6, 7)


# ------------------------------------------------------- the worked example of docs/revos_scoring.md


def worked_example() -> tuple[FakeExpression, np.ndarray]:
    """4x4 frame: a 2-pixel object, a 4-pixel video foreground, a prediction with 1 false positive."""
    obj = np.zeros((1, 1, 4, 4), bool)
    obj[0, 0, 0, 0:2] = True
    fg = np.zeros((1, 4, 4), bool)
    fg[0, 0, :] = True
    pred = obj[0].copy()
    pred[0, 3, 3] = True
    return FakeExpression("vid", "0", obj, fg), pred


def test_legacy_arithmetic_worked_example():
    expr, pred = worked_example()
    counts = expr.masks().sum(axis=0, dtype=np.uint8)
    assert legacy_visa_accuracy(counts, pred.astype(np.uint8) * 255)[0] == pytest.approx(13 / 16)
    assert legacy_visa_robustness(counts, pred.astype(np.uint8) * 255, expr.fg)[0] == 0.0      # 1 - 255/4 < 0
    assert legacy_visa_accuracy(counts, pred.astype(np.uint8))[0] == pytest.approx(15 / 16)     # 0/1 PNG: correct
    assert legacy_visa_robustness(counts, pred.astype(np.uint8), expr.fg)[0] == pytest.approx(0.75)


def test_legacy_robustness_keeps_uint8_wraparound_on_overlaps():
    counts = np.array([[2, 0]], np.uint8)       # a pixel covered by two objects, a background pixel
    pred = np.array([[255, 0]], np.uint8)
    # (1 - 2) * 255 = 255 * 255 = 65025 = 1 (mod 256): the public scorer counts one "false positive".
    assert legacy_visa_robustness(counts, pred, np.array([[1, 1]]))[()] == pytest.approx(1 - 1 / 2, abs=1e-6)


def test_score_expression_default_vs_legacy(tmp_path):
    expr, pred = worked_example()
    write_masks(tmp_path, "vid", "0", expr.frames, pred)
    default = score_expression(expr, tmp_path)
    legacy = score_expression(expr, tmp_path, legacy_visa=True)
    assert default.A == pytest.approx(15 / 16) and default.R == pytest.approx(1 - 1 / (4 + 1e-6))
    assert legacy.A == pytest.approx(13 / 16) and legacy.R == 0.0
    assert (default.J, default.F) == (legacy.J, legacy.F) and default.J == pytest.approx(2 / 3)
    assert default.missing is None


def test_score_expression_zero_one_png_equals_0_255(tmp_path):
    expr, pred = worked_example()
    write_masks(tmp_path / "a", "vid", "0", expr.frames, pred, scale=255)
    write_masks(tmp_path / "b", "vid", "0", expr.frames, pred, scale=1)
    assert score_expression(expr, tmp_path / "a") == score_expression(expr, tmp_path / "b")


def test_score_expression_missing_scores_zero(tmp_path):
    obj = np.ones((1, 3, 4, 4), bool)
    expr = FakeExpression("vid", "0", obj, obj[0])
    score = score_expression(expr, tmp_path)
    assert (score.J, score.F, score.A, score.R) == (0, 0, 0, 0) and "no directory" in score.missing
    write_masks(tmp_path, "vid", "0", expr.frames[:2], obj[0, :2])
    score = score_expression(expr, tmp_path)
    assert score.J == 0 and "1 of 3 frames missing" in score.missing and "00002.png" in score.missing


def test_score_expression_needs_a_foreground(tmp_path):
    obj = np.ones((1, 1, 4, 4), bool)
    expr = FakeExpression("vid", "0", obj, None)
    write_masks(tmp_path, "vid", "0", expr.frames, obj[0])
    with pytest.raises(InputError, match="foreground"):
        score_expression(expr, tmp_path)
    assert score_expression(expr, tmp_path, foreground=obj[0]).R == 1.0


# ---------------------------------------------------------------------------------------- summarise


def _expr_score(type_id: int, j: float, f: float, a: float, r: float, missing: str | None = None) -> ExpressionScore:
    return ExpressionScore("v", f"e{type_id}{j}", "x", type_id, j, f, a, r, missing)


def test_summarise_groups_and_overall():
    scores = [_expr_score(0, 1.0, 0.5, 1.0, 1.0), _expr_score(0, 0.5, 0.5, 0.5, 0.5),
              _expr_score(1, 0.2, 0.4, 0.6, 0.8), _expr_score(1, 0.0, 0.0, 0.0, 0.0, missing="no directory")]
    res = summarise(scores)
    assert res["referring"] == {"J": 75.0, "F": 50.0, "JF": 62.5, "A": 75.0, "R": 75.0}
    assert res["reason"] == {"J": 10.0, "F": 20.0, "JF": 15.0, "A": 30.0, "R": 40.0}
    assert res["overall"] == {"J": 42.5, "F": 35.0, "JF": 38.75, "A": 52.5, "R": 57.5}
    assert res["missing"] == ["v/e10.0"] and res["num_expressions"] == 4


def test_summarise_empty_group_is_none_and_overall_is_the_other():
    res = summarise([_expr_score(0, 1 / 3, 0.5, 1.0, 1.0)])
    assert res["reason"] == {k: None for k in ("J", "F", "JF", "A", "R")}
    assert res["overall"] == res["referring"]
    assert res["referring"]["J"] == 33.3333                       # 4 decimals
    assert summarise([_expr_score(0, 1 / 3, 0.5, 1.0, 1.0)], legacy_visa=True)["referring"]["J"] == 33.33


# ----------------------------------------------------------------- a hand-built ReVOS dataset on disk


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


H, W, T = 8, 10, 3
FRAMES = ["00000", "00001", "00002"]


def tiny_objects() -> dict[int, list[np.ndarray | None]]:
    """anno 1: a 3x3 square in every frame; anno 2: a 2x3 box in frames 0 and 1, absent in frame 2."""
    one = np.zeros((H, W), bool)
    one[2:5, 2:5] = True
    two = np.zeros((H, W), bool)
    two[5:7, 6:9] = True
    return {1: [one, one, one], 2: [two, two, None]}


def write_tiny_revos(root: Path) -> Path:
    """One video, three expressions: "0" referring (anno 1), "1" reasoning (annos 1+2), "2" no target."""
    objects = tiny_objects()
    (root / "JPEGImages" / "vid").mkdir(parents=True)
    for name in FRAMES:
        Image.new("RGB", (W, H), (90, 120, 150)).save(root / "JPEGImages" / "vid" / f"{name}.jpg")
    expressions = {
        "0": {"exp": "the square", "obj_id": [0], "anno_id": [1], "type_id": 0},
        "1": {"exp": "what could be stacked? segment everything", "obj_id": [0, 1], "anno_id": [1, 2], "type_id": 1},
        "2": {"exp": "the purple elephant", "obj_id": [], "anno_id": [], "type_id": 2},
    }
    meta = {"videos": {"vid": {"vid_id": 0, "frames": FRAMES, "height": H, "width": W, "expressions": expressions}}}
    (root / "meta_expressions_valid_.json").write_text(json.dumps(meta))
    mask_dict = {str(k): [None if m is None else _rle(m) for m in v] for k, v in objects.items()}
    (root / "mask_dict.json").write_text(json.dumps(mask_dict))
    fg = [objects[1][t] | (objects[2][t] if objects[2][t] is not None else False) for t in range(T)]
    (root / "mask_dict_foreground.json").write_text(json.dumps({"vid": {"masks_rle": [_rle(m) for m in fg]}}))
    return root


def test_tiny_revos_hand_computed(tmp_path):
    root = write_tiny_revos(tmp_path / "revos")
    objects, pred_dir = tiny_objects(), tmp_path / "pred"
    square = np.stack(objects[1])
    with_fp = square.copy()
    with_fp[0, 0, 0:2] = True                                  # two false positives in frame 0
    write_masks(pred_dir, "vid", "0", FRAMES, with_fp)         # referring: the square + 2 FP
    write_masks(pred_dir, "vid", "1", FRAMES, square)          # reasoning: misses anno 2

    res = score_revos(root, "valid", pred_dir, tmp_path / "out")
    ref = {"J": (9 / 11 + 2) / 3, "A": (78 / 80 + 2) / 3, "R": (1 - 2 / (15 + 1e-6) + 2) / 3}
    rea = {"J": (9 / 15 + 9 / 15 + 1) / 3, "A": (74 / 80 + 74 / 80 + 1) / 3, "R": 1.0}
    for k in ("J", "A", "R"):
        assert res["referring"][k] == pytest.approx(100 * ref[k], abs=1e-4)
        assert res["reason"][k] == pytest.approx(100 * rea[k], abs=1e-4)
        assert res["overall"][k] == pytest.approx(50 * (ref[k] + rea[k]), abs=1e-4)
    assert res["num_expressions"] == 2 and res["missing"] == []   # type 2 is not scored, so not missing

    legacy = score_revos(root, "valid", pred_dir, tmp_path / "out_legacy", legacy_visa=True)
    # 0/255 PNGs: A counts only true negatives; one false positive costs 255 in R (frame 0: 1 - 510/15 -> 0).
    assert legacy["referring"]["A"] == pytest.approx(round(100 * (69 + 71 + 71) / 240, 2))
    assert legacy["referring"]["R"] == pytest.approx(round(100 * 2 / 3, 2))
    assert legacy["reason"]["A"] == pytest.approx(round(100 * (65 + 65 + 71) / 240, 2))
    assert legacy["reason"]["R"] == 100.0
    for group in ("referring", "reason"):
        assert legacy[group]["J"] == pytest.approx(res[group]["J"], abs=0.006)
        assert legacy[group]["F"] == pytest.approx(res[group]["F"], abs=0.006)

    rows = read_csv(tmp_path / "out" / "per_expression.csv")
    assert [(r["video"], r["exp_id"], r["type_id"]) for r in rows] == [("vid", "0", "0"), ("vid", "1", "1")]
    assert rows[1]["exp"] == "what could be stacked? segment everything"


def test_score_revos_bad_inputs(tmp_path):
    root = write_tiny_revos(tmp_path / "revos")
    with pytest.raises(InputError, match="--predictions"):
        score_revos(root, "valid", tmp_path / "nope", tmp_path / "out")
    with pytest.raises(InputError, match="--workers"):
        score_revos(root, "valid", tmp_path, tmp_path / "out", workers=0)
    with pytest.raises(InputError):
        score_revos(tmp_path / "no-such-root", "valid", tmp_path, tmp_path / "out")
    (tmp_path / "pred" / "vid" / "0").mkdir(parents=True)
    Image.new("L", (W + 1, H)).save(tmp_path / "pred" / "vid" / "0" / "00000.png")
    for name in FRAMES[1:]:
        Image.new("L", (W, H)).save(tmp_path / "pred" / "vid" / "0" / f"{name}.png")
    with pytest.raises(InputError, match=r"00000\.png.*11x8.*10x8"):
        score_revos(root, "valid", tmp_path / "pred", tmp_path / "out")


# --------------------------------------------------------------------------- end to end on ShapesIVS


@pytest.fixture(scope="module")
def synth_revos(synth_root):
    from instructseg.data.formats.revos import read_revos

    root = synth_root / "revos"
    expressions = read_revos(root, "valid")
    assert {e.type_id for e in expressions} >= {0, 1}, "ShapesIVS valid split should have both groups"
    return root, expressions


def _run_scorer(root: Path, pred: Path, out: Path, **kwargs) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("error", MissingPredictionWarning)   # nothing may be missing here
        return score_revos(root, "valid", pred, out, **kwargs)


def test_ground_truth_predictions_score_100(synth_revos, tmp_path):
    root, expressions = synth_revos
    write_expression_predictions(tmp_path / "pred", expressions)
    res = _run_scorer(root, tmp_path / "pred", tmp_path / "out")
    for group in ("referring", "reason", "overall"):
        assert res[group] == {k: 100.0 for k in GROUP_KEYS}, group
    assert res["missing"] == []
    assert res["num_expressions"] == sum(e.type_id in (0, 1) for e in expressions)


def _erode(masks):
    return ndimage.binary_erosion(masks, structure=np.ones((1, 3, 3), bool))


def _shift(masks):
    return np.roll(masks, shift=(3, 4), axis=(1, 2))


def _drop_frames(masks):
    out = masks.copy()
    out[1::2] = False
    return out


@pytest.mark.parametrize("transform, r_drops", [(_erode, False), (_shift, True), (_drop_frames, False)])
def test_perturbed_predictions_score_lower(synth_revos, tmp_path, transform, r_drops):
    root, expressions = synth_revos
    write_expression_predictions(tmp_path / "pred", expressions, transform)
    res = _run_scorer(root, tmp_path / "pred", tmp_path / "out")
    for group in ("referring", "reason", "overall"):
        for k in ("J", "F", "JF", "A"):
            assert res[group][k] < 100.0, (group, k)
        # R only sees false positives: erosion and dropped frames add none.
        assert (res[group]["R"] < 100.0) if r_drops else (res[group]["R"] == 100.0), group


def test_zero_one_pngs_equal_0_255_by_default(synth_revos, tmp_path):
    root, expressions = synth_revos
    write_expression_predictions(tmp_path / "p255", expressions, _shift, scale=255)
    write_expression_predictions(tmp_path / "p1", expressions, _shift, scale=1)
    a = _run_scorer(root, tmp_path / "p255", tmp_path / "o255")
    b = _run_scorer(root, tmp_path / "p1", tmp_path / "o1")
    assert a == b
    csv_name = "per_expression.csv"
    assert (tmp_path / "o255" / csv_name).read_text() == (tmp_path / "o1" / csv_name).read_text()


def _legacy_expected(expr, pred_grey: np.ndarray, foreground: np.ndarray) -> tuple[float, float]:
    """The public scorer's A and R, written out with explicit mod-256 integer arithmetic."""
    counts = np.asarray(expr.masks(), np.int64).sum(axis=0) % 256
    grey = pred_grey.astype(np.int64)
    a = (counts == grey).mean(axis=(1, 2)).mean()
    weighted_fp = ((((1 - counts) % 256) * grey) % 256).sum(axis=(1, 2))
    r = np.maximum(1 - weighted_fp / (foreground.sum(axis=(1, 2)) + 1e-6), 0).mean()
    return float(a), float(r)


def test_legacy_visa_differs_and_matches_documented_arithmetic(synth_revos, tmp_path):
    root, expressions = synth_revos
    write_expression_predictions(tmp_path / "pred", expressions, _shift)
    default = _run_scorer(root, tmp_path / "pred", tmp_path / "default")
    legacy = _run_scorer(root, tmp_path / "pred", tmp_path / "legacy", legacy_visa=True)
    for group in ("referring", "reason"):
        assert legacy[group]["R"] < default[group]["R"]
        assert legacy[group]["A"] < default[group]["A"]
        assert legacy[group]["J"] == pytest.approx(default[group]["J"], abs=0.006)   # per-expression rounding only

    rows = {(r["video"], r["exp_id"]): r for r in read_csv(tmp_path / "legacy" / "per_expression.csv")}
    for e in expressions:
        if e.type_id not in (0, 1):
            continue
        fg = e.foreground()
        if fg is None:
            fg = np.any([s.union_masks() for s in expressions if s.video == e.video], axis=0)
        a, r = _legacy_expected(e, _shift(e.union_masks().astype(bool)).astype(np.uint8) * 255, fg)
        row = rows[(e.video, e.exp_id)]
        assert float(row["A"]) == pytest.approx(100 * a, abs=0.0051)
        assert float(row["R"]) == pytest.approx(100 * r, abs=0.0051)


def test_missing_predictions_are_listed_and_score_zero(synth_revos, tmp_path):
    root, expressions = synth_revos
    pred = tmp_path / "pred"
    write_expression_predictions(pred, expressions)
    scored = [e for e in expressions if e.type_id in (0, 1)]
    gone_dir, gone_frame = scored[0], scored[-1]
    for png in (pred / gone_dir.video / gone_dir.exp_id).iterdir():
        png.unlink()
    (pred / gone_dir.video / gone_dir.exp_id).rmdir()
    (pred / gone_frame.video / gone_frame.exp_id / f"{gone_frame.frames[-1]}.png").unlink()

    with pytest.warns(MissingPredictionWarning, match="2 of"):
        res = score_revos(root, "valid", pred, tmp_path / "out")
    keys = [f"{gone_dir.video}/{gone_dir.exp_id}", f"{gone_frame.video}/{gone_frame.exp_id}"]
    assert sorted(res["missing"]) == sorted(keys)
    rows = {f"{r['video']}/{r['exp_id']}": r for r in read_csv(tmp_path / "out" / "per_expression.csv")}
    for key in keys:
        assert all(float(rows[key][k]) == 0.0 for k in ("J", "F", "JF", "A", "R"))
    assert json.loads((tmp_path / "out" / "results.json").read_text())["missing"] == res["missing"]


def test_workers_give_identical_results(synth_revos, tmp_path):
    root, expressions = synth_revos
    write_expression_predictions(tmp_path / "pred", expressions, _shift)
    one = _run_scorer(root, tmp_path / "pred", tmp_path / "w1", workers=1)
    two = _run_scorer(root, tmp_path / "pred", tmp_path / "w2", workers=2)
    assert one == two
    for name in ("results.json", "per_expression.csv"):
        assert (tmp_path / "w1" / name).read_text() == (tmp_path / "w2" / name).read_text()


def test_cli_eval_revos(synth_revos, tmp_path, capsys):
    from instructseg.cli import main

    root, expressions = synth_revos
    write_expression_predictions(tmp_path / "pred", expressions, _erode)
    out = tmp_path / "out"
    code = main(["eval", "revos", "--data-root", str(root), "--split", "valid", "--predictions",
                 str(tmp_path / "pred"), "--output", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == RESULT_KEYS
    for group in ("referring", "reason", "overall"):
        assert set(results[group]) == GROUP_KEYS
    with open(out / "per_expression.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert tuple(rows[0]) == CSV_HEADER == ("video", "exp_id", "exp", "type_id", "J", "F", "JF", "A", "R")
    assert len(rows) - 1 == results["num_expressions"]
    printed = capsys.readouterr().out
    assert "referring" in printed and "overall" in printed and "results.json" in printed
    assert not list(out.glob("*.tmp"))                 # atomic writes leave no temporaries


def test_cli_bad_data_root_exits_2_with_one_line(tmp_path, capsys):
    from instructseg.cli import main

    (tmp_path / "pred").mkdir()
    code = main(["eval", "revos", "--data-root", str(tmp_path / "missing-root"), "--split", "valid",
                 "--predictions", str(tmp_path / "pred"), "--output", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("instructseg: error:") and err.count("\n") == 1
