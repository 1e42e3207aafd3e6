"""One evaluator per benchmark, all with the same interface (detectron2's `DatasetEvaluator`), driven by the one
loop in `instructseg.eval.runner`:

- `items(limit)`: the work, in a fixed order (the dataset's order), each with a unique key;
- `reset()`; `process(item, result)`: write the item's prediction files and return its per-item metrics (also
  kept, as `add` does); `failed(item, error)`: the metrics a failed item counts with (zero);
- `add(item, record)`: take a stored record (the runner re-feeds every record from disk before evaluating, so
  the numbers never depend on which rank or which run produced them);
- `evaluate()`: the results dict; `write_reports(results)`: per_expression.csv, the chart, the zip.

The video benchmarks live here, the image ones (RefCOCO/+/g, ReasonSeg) in `instructseg.eval.image_evaluators`.

Per-item metrics are fractions at full precision; results are percent rounded to 4 decimals. A failed item
scores 0 on every per-item metric (as the ReVOS protocol scores a missing prediction); for cIoU it adds its
ground-truth area to the union and nothing to the intersection.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from instructseg.data.types import ImageSample, VideoExpression
from instructseg.eval.metrics import boundary_f, jaccard
from instructseg.eval.storage import atomic_write_text, remove_prediction, write_json, write_mask_folder, write_zip

__all__ = ["Item", "Evaluator", "VideoEvaluator", "RevosEvaluator", "JFEvaluator", "RefYtvosEvaluator",
           "MevisEvaluator", "Davis17Evaluator", "instruction_for", "write_csv", "pct", "DECIMALS"]

DECIMALS = 4


def instruction_for(text: str, *, is_sentence: bool = False) -> str:
    """The request sent to the model: questions and full sentences as written, other expressions as
    "Please segment <exp>." (one of the training templates, fixed so that runs are reproducible)."""
    text = " ".join(text.split())
    if not text or is_sentence or text.endswith("?"):
        return text
    return f"Please segment {text.rstrip('.')}."


def pct(value: float) -> float:
    return round(100.0 * float(value), DECIMALS)


@dataclass
class Item:
    """One unit of work: a sample, its instruction, and its key (unique, stable across runs)."""

    key: str
    sample: VideoExpression | ImageSample
    instruction: str
    index: int  # position in the evaluator's sample list

    def open(self):
        """The frames to segment: the expression's listed frames, or the image."""
        from instructseg.eval.frames import FrameListSource
        from instructseg.inference.io import open_source

        s = self.sample
        if isinstance(s, VideoExpression):
            return FrameListSource(s.frame_paths, s.frames, s.height, s.width)
        return open_source(s.image_path)


class Evaluator:
    """Base: holds the samples and the (item, metrics) rows added so far."""

    name = ""      # the benchmark, as on the command line
    title = ""     # for people: "ReVOS valid"
    unit = "expr"  # what one item is, for the progress bar

    def __init__(self, output: Path, samples: list):
        self.output = Path(output)
        self.samples = samples
        self.rows: list[tuple[Item, dict, str | None]] = []

    def items(self, limit: int | None = None) -> list[Item]:
        items = [self._item(i, s) for i, s in enumerate(self.samples)]
        return items if limit is None else items[:limit]

    def _item(self, index: int, sample) -> Item:
        return Item(sample.key, sample, instruction_for(sample.text), index)

    def prediction_path(self, item: Item) -> Path:
        raise NotImplementedError

    def check_ground_truth(self, item: Item) -> None:
        """Read `item`'s ground truth (InputError naming the file when it is unreadable), before any model runs."""
        raise NotImplementedError

    def reset(self) -> None:
        self.rows = []

    def process(self, item: Item, result) -> dict:
        metrics = self._process(item, result)
        self.add(item, {"status": "ok", "metrics": metrics})
        return metrics

    def failed(self, item: Item, error: str) -> dict:
        remove_prediction(self.prediction_path(item))
        return self._zero(item)

    def add(self, item: Item, record: dict) -> None:
        error = None if record.get("status") == "ok" else str(record.get("error", "failed"))
        self.rows.append((item, dict(record.get("metrics") or {}), error))

    def evaluate(self) -> dict:
        raise NotImplementedError

    def write_reports(self, results: dict) -> list[Path]:
        return []

    def summary(self, results: dict) -> tuple[list[str], list[tuple[str, list]]]:
        """(column names, [(row name, values)]) for the table printed at the end."""
        raise NotImplementedError

    def footer(self) -> list[str]:
        """Lines printed under the table (after `evaluate`)."""
        return []

    def _process(self, item: Item, result) -> dict:
        raise NotImplementedError

    def _zero(self, item: Item) -> dict:
        raise NotImplementedError


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def _union_masks(result, num_frames: int) -> np.ndarray:
    """(T, H, W) bool: the union of every predicted object per frame (all False when the answer has none)."""
    return np.stack([result.masks(t).any(axis=0) for t in range(num_frames)])


# ---------------------------------------------------------------------------------------------------- videos


class VideoEvaluator(Evaluator):
    """Writes `<pred_dir>/<video>/<exp_id>/<frame>.png` per expression (0/255 grey, or palette PNGs)."""

    pred_subdir = "predictions"
    palette = False

    @property
    def pred_dir(self) -> Path:
        return self.output / self.pred_subdir

    def prediction_path(self, item: Item) -> Path:
        return self.pred_dir / item.sample.video / item.sample.exp_id

    def check_ground_truth(self, item: Item) -> None:
        item.sample.union_masks()

    def _process(self, item: Item, result) -> dict:
        expr = item.sample
        pred = _union_masks(result, expr.num_frames)
        if pred.shape[1:] != (expr.height, expr.width):
            raise ValueError(f"prediction is {pred.shape[1]}x{pred.shape[2]}, the video {expr.height}x{expr.width}")
        write_mask_folder(self.prediction_path(item), pred, expr.frames, palette=self.palette)
        return self._score(item, pred)

    def _score(self, item: Item, pred: np.ndarray) -> dict:
        raise NotImplementedError

    def _chart(self, per_expression: list[tuple[str, float]], overall: float | None, title: str) -> list[Path]:
        """per_video_jf.png from (video, J&F percent) per expression; nothing when there is nothing to draw."""
        from instructseg.eval.charts import per_video_chart

        if not per_expression:
            return []
        by_video: dict[str, list[float]] = {}
        for video, jf in per_expression:
            by_video.setdefault(video, []).append(jf)
        path = self.output / "per_video_jf.png"
        per_video_chart(path, {v: float(np.mean(x)) for v, x in by_video.items()}, overall, title=title)
        return [path]


class RevosEvaluator(VideoEvaluator):
    """ReVOS: J, F, A, R per expression by the foundation's scorer (`instructseg.eval.revos`); results.json has
    exactly the keys `score_revos` writes (plus the runner's "failed"). No-target expressions are run and written
    but, as in the scorer, not scored."""

    name = "revos"

    def __init__(self, data_root: Path, split: str, output: Path, *, legacy_visa: bool = False):
        from instructseg.data.formats.revos import read_revos
        from instructseg.eval.revos import _Job

        super().__init__(output, read_revos(Path(data_root), split))
        self.title = f"ReVOS {split}"
        self.legacy_visa = legacy_visa
        self._job = _Job(self.samples, self.pred_dir, legacy_visa)  # the scorer's foreground fallback included
        self.answers: dict[int, str] = {}  # item index -> the model's text answer
        self.answer_results: dict | None = None  # answers.json's content, set by `evaluate`

    def reset(self) -> None:
        super().reset()
        self.answers = {}

    def add(self, item: Item, record: dict) -> None:
        super().add(item, record)
        self.answers[item.index] = str(record.get("answer") or "")

    def _answer_scores(self) -> dict | None:
        """answers.json's content (`instructseg.eval.answers`): how often the answer to a reasoning expression
        names the reference answer's objects (referring expressions are sent as "Please segment ...", answered
        "Sure."), and for no-target expressions how often it says they are absent; None when the expressions carry
        no reference answers."""
        from instructseg.eval.answers import score_absent, score_answers

        rows = [(item.sample, self.answers.get(item.index, "")) for item, _, _ in self.rows]
        if not any(s.answer for s, _ in rows):
            return None
        return {"reason": score_answers([(s.answer, a) for s, a in rows if s.answer and s.type_id == 1]),
                "no_target": score_absent([a for s, a in rows if s.type_id == 2])}

    def _score(self, item: Item, pred: np.ndarray) -> dict:
        from instructseg.eval.revos import GROUPS

        if item.sample.type_id not in GROUPS:
            return {}
        s = self._job.score(item.index)
        return {"J": s.J, "F": s.F, "A": s.A, "R": s.R}

    def _zero(self, item: Item) -> dict:
        return {}

    def _scores(self) -> list:
        from instructseg.eval.revos import GROUPS, ExpressionScore

        scores = []
        for item, metrics, error in self.rows:
            expr = item.sample
            if expr.type_id not in GROUPS:
                continue
            if error is not None:
                scores.append(ExpressionScore.zero(expr, f"failed: {error}"))
            else:
                scores.append(ExpressionScore(expr.video, expr.exp_id, expr.text, int(expr.type_id),
                                              metrics["J"], metrics["F"], metrics["A"], metrics["R"]))
        return scores

    def evaluate(self) -> dict:
        from instructseg.eval.revos import summarise

        self.answer_results = self._answer_scores()
        return summarise(self._scores(), legacy_visa=self.legacy_visa)

    def write_reports(self, results: dict) -> list[Path]:
        from instructseg.eval.revos import _per_expression_csv

        scores = self._scores()
        csv_path = self.output / "per_expression.csv"
        atomic_write_text(csv_path, _per_expression_csv(scores, self.legacy_visa))
        written = [csv_path] + self._chart([(s.video, 100.0 * s.JF) for s in scores], results["overall"]["JF"],
                                           self.title)
        if self.answer_results is not None:
            written.append(self.output / "answers.json")
            write_json(written[-1], self.answer_results)
        return written

    def summary(self, results: dict):
        keys = ["J", "F", "JF", "A", "R"]
        return keys, [(g, [results[g][k] for k in keys]) for g in ("referring", "reason", "overall")]

    def footer(self) -> list[str]:
        if self.answer_results is None:
            return []
        pct_text = lambda v: "-" if v is None else f"{v:.1f} %"  # noqa: E731
        reason, absent = self.answer_results["reason"], self.answer_results["no_target"]
        return [f"reasoning answers naming the reference's objects: {pct_text(reason['objects'])} of {reason['num']} "
                f"(colours {pct_text(reason['colours'])}, shapes {pct_text(reason['shapes'])})",
                f"no-target answers saying it is absent: {pct_text(absent['said_absent'])} of {absent['num']}"]


class JFEvaluator(VideoEvaluator):
    """J&F per expression (union of the referred objects vs union of the predicted ones), mean over expressions:
    {"J", "F", "JF", "num_expressions"}. Without ground truth for the split, the numbers are None and a "note"
    says so; the predictions are written all the same."""

    frames_scored = slice(None)

    def __init__(self, output: Path, samples: list[VideoExpression], *, title: str, has_gt: bool, note: str = ""):
        super().__init__(output, samples)
        self.title, self.has_gt, self.note = title, has_gt, note

    def check_ground_truth(self, item: Item) -> None:
        if self.has_gt:
            super().check_ground_truth(item)

    def _score(self, item: Item, pred: np.ndarray) -> dict:
        if not self.has_gt:
            return {}
        sel = self.frames_scored if len(pred) > 2 else slice(None)
        gt = item.sample.union_masks()[sel]
        return {"J": float(jaccard(pred[sel], gt).mean()), "F": float(boundary_f(pred[sel], gt).mean())}

    def _zero(self, item: Item) -> dict:
        return {"J": 0.0, "F": 0.0} if self.has_gt else {}

    def _per_expression(self) -> list[tuple[Item, float, float]]:
        return [(item, m.get("J", 0.0), m.get("F", 0.0)) for item, m, _ in self.rows]

    def evaluate(self) -> dict:
        n = len(self.rows)
        if not self.has_gt or n == 0:
            out = {"J": None, "F": None, "JF": None, "num_expressions": n}
            return {**out, "note": self.note} if not self.has_gt else out
        rows = self._per_expression()
        j = float(np.mean([r[1] for r in rows]))
        f = float(np.mean([r[2] for r in rows]))
        return {"J": pct(j), "F": pct(f), "JF": pct((j + f) / 2), "num_expressions": n}

    def write_reports(self, results: dict) -> list[Path]:
        path = self.output / "per_expression.csv"
        header = ["video", "exp_id", "exp", "J", "F", "JF"]
        if not self.has_gt:
            write_csv(path, header, [[i.sample.video, i.sample.exp_id, i.sample.text, "", "", ""]
                                      for i, _, _ in self.rows])
            return [path]
        rows = self._per_expression()
        write_csv(path, header, [[i.sample.video, i.sample.exp_id, i.sample.text, pct(j), pct(f),
                                   pct((j + f) / 2)] for i, j, f in rows])
        return [path] + self._chart([(i.sample.video, 100.0 * (j + f) / 2) for i, j, f in rows], results["JF"],
                                    self.title)

    def summary(self, results: dict):
        keys = ["J", "F", "JF"]
        return keys, [("all", [results[k] for k in keys])]


class MevisEvaluator(JFEvaluator):
    """MeViS: J&F from mask_dict.json (split "valid_u" offline; "valid" has no masks: predictions only)."""

    name = "mevis"

    def __init__(self, data_root: Path, split: str, output: Path):
        from instructseg.data.formats.mevis import read_mevis

        has_gt = (Path(data_root) / split / "mask_dict.json").is_file()
        super().__init__(output, read_mevis(Path(data_root), split), title=f"MeViS {split}", has_gt=has_gt,
                         note=f"split '{split}' ships no mask_dict.json: predictions are in predictions/, "
                              "score them on the MeViS evaluation server")


class RefYtvosEvaluator(JFEvaluator):
    """Ref-YouTube-VOS: palette PNGs in the submission layout `Annotations/<video>/<exp_id>/<frame>.png`, zipped to
    submission.zip; J&F when the split has ground truth (the public valid/test splits have none)."""

    name = "refytvos"
    pred_subdir = "Annotations"
    palette = True

    def __init__(self, data_root: Path, split: str, output: Path):
        from instructseg.data.formats.refytvos import read_refytvos

        samples = read_refytvos(Path(data_root), split)
        has_gt = (Path(data_root) / split / "Annotations").is_dir() and all(s.obj_ids for s in samples)
        super().__init__(output, samples, title=f"Ref-YouTube-VOS {split}", has_gt=has_gt,
                         note=f"split '{split}' ships no Annotations: upload submission.zip to the "
                              "Ref-YouTube-VOS evaluation server")

    def write_reports(self, results: dict) -> list[Path]:
        members = []
        for item, _, error in self.rows:
            if error is None:
                folder = self.prediction_path(item)
                members += [folder / f"{name}.png" for name in item.sample.frames]
        zip_path = self.output / "submission.zip"
        write_zip(zip_path, self.output, members)
        return super().write_reports(results) + [zip_path]


class Davis17Evaluator(JFEvaluator):
    """Ref-DAVIS17 by the DAVIS semi-supervised protocol: J and F per object over every frame but the first and
    the last, mean over objects (here: expressions; each refers to one object)."""

    name = "davis17"
    frames_scored = slice(1, -1)

    def __init__(self, data_root: Path, split: str, output: Path):
        from instructseg.data.formats.davis17 import read_davis17

        super().__init__(output, read_davis17(Path(data_root), split), title=f"Ref-DAVIS17 {split}",
                         has_gt=(Path(data_root) / split / "Annotations").is_dir(),
                         note=f"split '{split}' ships no Annotations")
