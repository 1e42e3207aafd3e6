"""ReVOS scorer: J, F, A, R per expression, averaged per expression type (docs/revos_scoring.md).

Predictions live at `PRED/<video>/<exp_id>/<frame>.png`, one mask per frame of every referring (type 0) and
reasoning (type 1) expression; no-target expressions (type 2) are not scored. Masks are binarised (> 0), so 0/1
and 0/255 PNGs score the same. `legacy_visa=True` reproduces the public scorer's arithmetic instead (it compares
raw 0/255 grey values for A and R; see `legacy_visa_accuracy` and `legacy_visa_robustness`).

An expression whose prediction directory or any frame PNG is missing scores 0 on every metric and is listed
under "missing" (and warned about); a PNG that cannot be read or has the wrong size raises `InputError`.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from instructseg.atomic import write_text
from instructseg.errors import InputError
from instructseg.eval.metrics import accuracy, boundary_f, jaccard, robustness

if TYPE_CHECKING:
    from instructseg.data.types import VideoExpression

__all__ = [
    "ExpressionScore", "MissingPredictionWarning", "score_expression", "summarise", "score_revos",
    "read_prediction_png", "prediction_paths", "missing_prediction", "legacy_visa_accuracy", "legacy_visa_robustness",
    "GROUPS", "METRICS", "CSV_HEADER",
]

logger = logging.getLogger(__name__)

GROUPS = {0: "referring", 1: "reason"}                    # scored type_id -> result group
METRICS = ("J", "F", "JF", "A", "R")
CSV_HEADER = ("video", "exp_id", "exp", "type_id", "J", "F", "JF", "A", "R")
RESULT_DECIMALS = 4           # results.json and per_expression.csv
LEGACY_EXPRESSION_DECIMALS = 2  # the public scorer rounds each expression's percentages before averaging


class MissingPredictionWarning(UserWarning):
    """Some expressions had no (or incomplete) predictions and were scored 0."""


@dataclass(frozen=True)
class ExpressionScore:
    """One expression's frame-averaged metrics as fractions in [0, 1]; `missing` says why it scored 0."""

    video: str
    exp_id: str
    exp: str
    type_id: int
    J: float
    F: float
    A: float
    R: float
    missing: str | None = None

    @property
    def JF(self) -> float:
        return (self.J + self.F) / 2

    @property
    def key(self) -> str:
        return f"{self.video}/{self.exp_id}"

    def percent(self, decimals: int | None = None) -> dict[str, float]:
        """{"J", "F", "JF", "A", "R"} in percent, optionally rounded per value."""
        values = {k: 100 * np.float64(getattr(self, k)) for k in METRICS}
        return {k: float(v if decimals is None else round(v, decimals)) for k, v in values.items()}

    @classmethod
    def zero(cls, expr: VideoExpression, missing: str) -> "ExpressionScore":
        return cls(expr.video, expr.exp_id, expr.text, int(expr.type_id), 0.0, 0.0, 0.0, 0.0, missing=missing)


# ----------------------------------------------------------------------------------------- reading PNGs


def prediction_paths(expr: VideoExpression, pred_dir: Path) -> list[Path]:
    """The PNG paths the scorer reads for `expr`, one per frame."""
    folder = Path(pred_dir) / expr.video / expr.exp_id
    return [folder / f"{frame}.png" for frame in expr.frames]


def missing_prediction(expr: VideoExpression, pred_dir: Path) -> str | None:
    """Why `expr` cannot be scored from `pred_dir` (its directory or a frame is missing), or None if complete."""
    folder = Path(pred_dir) / expr.video / expr.exp_id
    if not folder.is_dir():
        return f"no directory {folder}"
    absent = [p.name for p in prediction_paths(expr, pred_dir) if not p.is_file()]
    if absent:
        return f"{len(absent)} of {len(expr.frames)} frames missing in {folder} (first: {absent[0]})"
    return None


def _binary(img: Image.Image) -> np.ndarray:
    """Foreground = any non-zero value: palette index, grey level, or any colour channel (alpha ignored)."""
    if img.mode in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L", "F"):
        return np.asarray(img) > 0
    if img.mode == "LA":
        return np.asarray(img)[..., 0] > 0
    rgb = img if img.mode in ("RGB", "RGBA", "RGBX") else img.convert("RGB")
    return np.asarray(rgb)[..., :3].any(axis=-1)


def read_prediction_png(path: Path, height: int, width: int, *, grey: bool = False) -> np.ndarray:
    """One prediction PNG as an (H, W) bool mask, or with `grey=True` as the raw uint8 grey levels the public
    scorer reads (PIL's "L" conversion; equal to OpenCV's IMREAD_GRAYSCALE for 8-bit grey PNGs)."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.size != (width, height):
                raise InputError(f"{path}: prediction is {img.width}x{img.height} (WxH) but the video frame is "
                                 f"{width}x{height}")
            return np.asarray(img.convert("L")) if grey else _binary(img)
    except InputError:
        raise
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot read the prediction PNG ({err})") from None


# --------------------------------------------------------------------------------- the public arithmetic


def legacy_visa_accuracy(gt_counts: np.ndarray, pred_grey: np.ndarray) -> np.ndarray:
    """A as the public scorer computes it: mean(gt == pred) on uint8 arrays, per frame.

    `gt_counts` is the per-pixel number of annotated objects (uint8), `pred_grey` the PNG's grey values. With
    0/255 PNGs a predicted pixel never equals a ground-truth 1, so only true negatives count as correct.
    """
    return (np.asarray(gt_counts, np.uint8) == np.asarray(pred_grey, np.uint8)).mean(axis=(-2, -1))


def legacy_visa_robustness(gt_counts: np.ndarray, pred_grey: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """R as the public scorer computes it: max(1 - sum((1 - gt) * pred) / (sum(fg) + 1e-6), 0) in uint8 arithmetic.

    With 0/255 PNGs each false-positive pixel adds 255 to the sum (so R collapses to 0 as soon as the false
    positives exceed 1/255 of the foreground); uint8 wrap-around is kept on purpose (pixels covered by two
    objects give (1 - 2) * 255 = 255 * 255 = 1 mod 256).
    """
    gt_counts, pred_grey = np.asarray(gt_counts, np.uint8), np.asarray(pred_grey, np.uint8)
    weighted_fp = ((np.uint8(1) - gt_counts) * pred_grey).sum(axis=(-2, -1), dtype=np.uint64)
    fg_pixels = np.asarray(foreground, np.uint8).sum(axis=(-2, -1), dtype=np.uint64)
    return np.maximum(1.0 - weighted_fp / (fg_pixels + 1e-6), 0.0)


# ------------------------------------------------------------------------------------ one expression


def score_expression(expr: VideoExpression, pred_dir: Path, legacy_visa: bool = False, *,
                     foreground: np.ndarray | None = None) -> ExpressionScore:
    """Score one `VideoExpression` against `pred_dir/<video>/<exp_id>/<frame>.png`.

    `foreground` (T, H, W) overrides `expr.foreground()` (the video's union of annotated objects, used by R).
    A missing directory or frame gives an all-zero score with `missing` set; the caller reports it.
    """
    reason = missing_prediction(expr, pred_dir)
    if reason is not None:
        return ExpressionScore.zero(expr, reason)

    pred = np.stack([read_prediction_png(p, expr.height, expr.width, grey=legacy_visa)
                     for p in prediction_paths(expr, pred_dir)])
    binary = pred > 0 if legacy_visa else pred
    gt = np.asarray(expr.union_masks(), dtype=bool)
    if foreground is None:
        foreground = expr.foreground()
    if foreground is None:
        raise InputError(f"{expr.video}: no foreground masks for robustness R (mask_dict_foreground.json)")

    j = jaccard(binary, gt).mean()
    f = boundary_f(binary, gt).mean()
    if legacy_visa:
        gt_counts = np.asarray(expr.masks(), dtype=np.uint8).sum(axis=0, dtype=np.uint8)  # uint8 `+=` per object
        a = legacy_visa_accuracy(gt_counts, pred).mean()
        r = legacy_visa_robustness(gt_counts, pred, foreground).mean()
    else:
        a = accuracy(binary, gt).mean()
        r = robustness(binary, gt, foreground).mean()
    return ExpressionScore(expr.video, expr.exp_id, expr.text, int(expr.type_id),
                           float(j), float(f), float(a), float(r))


# ------------------------------------------------------------------------------------------ summaries


def _mean_group(rows: list[dict[str, float]]) -> dict[str, float | None]:
    if not rows:
        return {k: None for k in METRICS}
    group = {k: float(np.mean([row[k] for row in rows])) for k in ("J", "F", "A", "R")}
    group["JF"] = (group["J"] + group["F"]) / 2
    return {k: group[k] for k in METRICS}


def _mean_of_groups(groups: list[dict[str, float | None]]) -> dict[str, float | None]:
    present = [g for g in groups if g["J"] is not None]
    if not present:
        return {k: None for k in METRICS}
    return {k: float(np.mean([g[k] for g in present])) for k in METRICS}


def _rounded(group: dict[str, float | None]) -> dict[str, float | None]:
    return {k: None if v is None else round(v, RESULT_DECIMALS) for k, v in group.items()}


def summarise(scores: list[ExpressionScore], *, legacy_visa: bool = False) -> dict:
    """Percent means per group: "referring" (type 0), "reason" (type 1), "overall" (mean of the two groups).

    A group without expressions gets None for every metric and "overall" is then the other group. JF of a group
    is (J + F) / 2 of its means. `legacy_visa` rounds each expression to 2 decimals first, as the public scorer does.
    """
    decimals = LEGACY_EXPRESSION_DECIMALS if legacy_visa else None
    by_group: dict[str, list[dict[str, float]]] = {name: [] for name in GROUPS.values()}
    for score in scores:
        if score.type_id in GROUPS:
            by_group[GROUPS[score.type_id]].append(score.percent(decimals))
    groups = {name: _mean_group(rows) for name, rows in by_group.items()}
    overall = _mean_of_groups(list(groups.values()))
    results = {name: _rounded(g) for name, g in groups.items()}
    results["overall"] = _rounded(overall)
    results["missing"] = [s.key for s in scores if s.missing is not None]
    results["num_expressions"] = sum(1 for s in scores if s.type_id in GROUPS)
    return results


# ---------------------------------------------------------------------------------------- the job


@dataclass
class _Job:
    """Everything a worker needs; installed once per process (inherited on fork, pickled once otherwise)."""

    expressions: list[VideoExpression]
    pred_dir: Path
    legacy_visa: bool
    _foreground_cache: tuple[str, np.ndarray] | None = field(default=None, repr=False)

    def score(self, index: int) -> ExpressionScore:
        expr = self.expressions[index]
        if missing_prediction(expr, self.pred_dir) is not None:
            return score_expression(expr, self.pred_dir, self.legacy_visa)
        return score_expression(expr, self.pred_dir, self.legacy_visa, foreground=self._foreground(expr))

    def _foreground(self, expr: VideoExpression) -> np.ndarray:
        """expr.foreground(), or when the dataset ships none, the union of every object of the video (which
        is how ReVOS's mask_dict_foreground.json was made)."""
        fg = expr.foreground()
        if fg is not None:
            return fg
        if self._foreground_cache is None or self._foreground_cache[0] != expr.video:
            siblings = [e for e in self.expressions if e.video == expr.video]
            union = np.zeros((len(expr.frames), expr.height, expr.width), dtype=bool)
            for sibling in siblings:
                union |= np.asarray(sibling.union_masks(), dtype=bool)
            self._foreground_cache = (expr.video, union)
        return self._foreground_cache[1]


_WORKER_JOB: _Job | None = None


def _install_job(job: _Job) -> None:
    global _WORKER_JOB
    _WORKER_JOB = job


def _score_in_worker(index: int) -> ExpressionScore:
    assert _WORKER_JOB is not None, "worker started without a job"
    return _WORKER_JOB.score(index)


def _score_all(job: _Job, indices: list[int], workers: int) -> list[ExpressionScore]:
    """Scores in the order of `indices`, whatever the number of workers."""
    if workers <= 1 or len(indices) <= 1:
        return [job.score(i) for i in indices]
    workers = min(workers, len(indices))
    chunksize = max(1, len(indices) // (4 * workers))  # contiguous chunks keep a video's expressions together
    with ProcessPoolExecutor(max_workers=workers, initializer=_install_job, initargs=(job,)) as pool:
        return list(pool.map(_score_in_worker, indices, chunksize=chunksize))


# ----------------------------------------------------------------------------------------- writing


def _per_expression_csv(scores: list[ExpressionScore], legacy_visa: bool) -> str:
    decimals = LEGACY_EXPRESSION_DECIMALS if legacy_visa else RESULT_DECIMALS
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for s in scores:
        values = s.percent(decimals)
        writer.writerow([s.video, s.exp_id, s.exp, s.type_id] + [values[k] for k in METRICS])
    return buffer.getvalue()


def _report_missing(scores: list[ExpressionScore]) -> None:
    missing = [s for s in scores if s.missing is not None]
    for s in missing:
        logger.warning("ReVOS: %s scored 0: %s", s.key, s.missing)
    if missing:
        names = ", ".join(s.key for s in missing[:5]) + (", ..." if len(missing) > 5 else "")
        warnings.warn(f"{len(missing)} of {len(scores)} ReVOS expressions have missing predictions and score 0: "
                      f"{names}", MissingPredictionWarning, stacklevel=3)


def score_revos(data_root: Path, split: str, predictions: Path, output: Path, *, workers: int = 1,
                legacy_visa: bool = False) -> dict:
    """Score `predictions` on the ReVOS `split` under `data_root`; write output/results.json and
    output/per_expression.csv and return the results dict (percent, 4 decimals; None for an empty group)."""
    from instructseg.data.formats.revos import read_revos

    if workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}")
    predictions, output = Path(predictions), Path(output)
    if not predictions.is_dir():
        raise InputError(f"--predictions {predictions}: not a directory")
    expressions = read_revos(Path(data_root), split)

    scored = [i for i, e in enumerate(expressions) if e.type_id in GROUPS]
    job = _Job(expressions, predictions, legacy_visa)
    scores = _score_all(job, scored, workers)
    _report_missing(scores)
    results = summarise(scores, legacy_visa=legacy_visa)

    try:
        output.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise InputError(f"--output {output}: exists and is not a directory") from None
    write_text(output / "results.json", json.dumps(results, indent=2, allow_nan=False) + "\n")
    write_text(output / "per_expression.csv", _per_expression_csv(scores, legacy_visa))
    return results
