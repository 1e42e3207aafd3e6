"""The image benchmarks' evaluators (RefCOCO/+/g, ReasonSeg); the interface is `instructseg.eval.evaluators`."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from instructseg.data.types import ImageSample
from instructseg.eval.evaluators import Evaluator, Item, instruction_for, pct, write_csv
from instructseg.eval.metrics import IoUAccumulator
from instructseg.eval.storage import write_mask_file

__all__ = ["ImageEvaluator", "RefcocoEvaluator", "ReasonSegEvaluator"]


class ImageEvaluator(Evaluator):
    """cIoU (sum of intersections / sum of unions) and gIoU (mean per-sample IoU), per split;
    predictions at `predictions/<split>/<sample_id>.png` (0/255)."""

    unit = "sentence"

    def _item(self, index: int, sample: ImageSample) -> Item:
        return Item(f"{sample.split}/{sample.sample_id}", sample,
                    instruction_for(sample.text, is_sentence=sample.is_sentence), index)

    def prediction_path(self, item: Item) -> Path:
        return self.output / "predictions" / item.sample.split / f"{item.sample.sample_id}.png"

    def check_ground_truth(self, item: Item) -> None:
        item.sample.union_mask()
        item.sample.ignore()

    def _process(self, item: Item, result) -> dict:
        pred = result.masks(0).any(axis=0)
        write_mask_file(self.prediction_path(item), pred)
        acc = IoUAccumulator()
        iou = acc.add(pred, item.sample.union_mask(), item.sample.ignore())
        return {"intersection": acc.intersections[0], "union": acc.unions[0], "iou": iou}

    def _zero(self, item: Item) -> dict:
        try:  # the union an empty prediction would have; 0 when the ground truth itself is unreadable
            gt, ignore = item.sample.union_mask(), item.sample.ignore()
            union = int(np.count_nonzero(gt if ignore is None else gt & ~ignore))
        except Exception:  # noqa: BLE001 - the failure is already recorded; this only sizes its penalty
            union = 0
        return {"intersection": 0, "union": union, "iou": 0.0}

    def _split_results(self, split: str | None) -> dict:
        rows = [m for item, m, _ in self.rows if split is None or item.sample.split == split]
        if not rows:
            return {"cIoU": None, "gIoU": None, "num": 0}
        inter = sum(int(m["intersection"]) for m in rows)
        union = sum(int(m["union"]) for m in rows)
        ciou = 1.0 if union == 0 else inter / union
        return {"cIoU": pct(ciou), "gIoU": pct(np.mean([float(m["iou"]) for m in rows])), "num": len(rows)}

    def write_reports(self, results: dict) -> list[Path]:
        path = self.output / "per_expression.csv"
        write_csv(path, ["split", "sample_id", "text", "IoU", "intersection", "union"],
                   [[i.sample.split, i.sample.sample_id, i.sample.text, pct(m["iou"]), m["intersection"],
                     m["union"]] for i, m, _ in self.rows])
        return [path]


_REFCOCO_NAMES = {"refcoco": "RefCOCO", "refcoco+": "RefCOCO+", "refcocog": "RefCOCOg"}


class RefcocoEvaluator(ImageEvaluator):
    """RefCOCO / RefCOCO+ / RefCOCOg: {dataset: {split: {"cIoU", "gIoU", "num"}}}; `limit` applies per split."""

    name = "refcoco"

    def __init__(self, data_root: Path, dataset: str, split_by: str, splits: list[str], output: Path):
        from instructseg.data.formats.refcoco import read_refcoco

        self.dataset, self.splits = dataset, splits
        self.title = f"{_REFCOCO_NAMES[dataset]} {', '.join(splits)}"
        super().__init__(output, [s for split in splits
                                  for s in read_refcoco(Path(data_root), dataset, split_by, split)])

    def items(self, limit: int | None = None) -> list[Item]:
        items = super().items()
        if limit is None:
            return items
        return [it for split in self.splits for it in [i for i in items if i.sample.split == split][:limit]]

    def evaluate(self) -> dict:
        return {self.dataset: {split: self._split_results(split) for split in self.splits}}

    def summary(self, results: dict):
        keys = ["cIoU", "gIoU", "num"]
        return keys, [(split, [row[k] for k in keys]) for split, row in results[self.dataset].items()]


class ReasonSegEvaluator(ImageEvaluator):
    """ReasonSeg: {"gIoU", "cIoU", "num"}; "ignore" polygons are left out of both."""

    name = "reasonseg"

    def __init__(self, data_root: Path, split: str, output: Path):
        from instructseg.data.formats.reasonseg import read_reasonseg

        self.title = f"ReasonSeg {split}"
        super().__init__(output, read_reasonseg(Path(data_root), split))

    def evaluate(self) -> dict:
        out = self._split_results(None)
        return {"gIoU": out["gIoU"], "cIoU": out["cIoU"], "num": out["num"]}

    def summary(self, results: dict):
        keys = ["gIoU", "cIoU", "num"]
        return keys, [("all", [results[k] for k in keys])]
