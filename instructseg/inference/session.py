"""Multi-round chat on one image or video, with visual prompts to refine a masklet on any frame."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from instructseg.errors import InputError
from instructseg.inference.io import FrameSource
from instructseg.inference.predictor import InstructSegPredictor, Refinement
from instructseg.inference.results import SegmentationResult


class ChatSession:
    """`session = predictor.start(source)`; `session.ask(text)` answers with the earlier turns as history.

    After an answer with masks, `add_points` / `add_box` / `add_mask` refine one object on one frame (SAM2 takes
    them as prompts on that frame, which becomes a conditioning frame) and `propagate()` recomputes every frame."""

    def __init__(self, predictor: InstructSegPredictor, source: FrameSource):
        self.predictor = predictor
        self.source = source
        self.history: list[tuple[str, str]] = []
        self.last: SegmentationResult | None = None
        self._question: tuple[str, str, int | None] | None = None  # instruction, mode, key frames of `last`
        self._refinements: dict[int, Refinement] = {}

    def ask(self, text: str, *, mode: str = "propagate", key_frames: int | None = None,
            out_dir: str | Path | None = None, progress=None) -> SegmentationResult:
        """`progress(done, total)` is called as frames finish."""
        result, answer = self.predictor.run(self.source, text, mode=mode, key_frames=key_frames, out_dir=out_dir,
                                            history=list(self.history), progress=progress)
        self.history.append((text.strip(), answer.raw_text))
        self.last, self._question, self._refinements = result, (text.strip(), mode, key_frames), {}
        return result

    # -- visual prompts ---------------------------------------------------------------------------------------
    def add_points(self, frame: int, obj_id: int, points, labels) -> None:
        """Clicks in source pixels: points (P, 2) as (x, y); labels (P,) 1 positive, 0 negative."""
        points, labels = np.asarray(points, np.float32).reshape(-1, 2), np.asarray(labels).reshape(-1)
        if len(points) != len(labels) or not len(points):
            raise InputError(f"add_points: {len(points)} points and {len(labels)} labels")
        if not np.isin(labels, (0, 1)).all():
            raise InputError(f"add_points: labels are 1 (positive) or 0 (negative), got {labels.tolist()}")
        self._check_inside(points, "point")
        self._refinement(frame, obj_id).points[obj_id] = (points, labels.astype(np.int32))

    def add_box(self, frame: int, obj_id: int, box) -> None:
        """A box (x0, y0, x1, y1) in source pixels."""
        x0, y0, x1, y1 = (float(v) for v in box)
        if not (x0 < x1 and y0 < y1):
            raise InputError(f"add_box: expected x0 < x1 and y0 < y1, got {box}")
        corners = np.array([[x0, y0], [x1, y1]], np.float32)
        self._check_inside(corners, "box corner")
        self._refinement(frame, obj_id).points[obj_id] = (corners, np.array([2, 3], np.int32))

    def _check_inside(self, points: np.ndarray, what: str) -> None:
        """(x, y) in source pixels must lie on the frame, its far edges included."""
        w, h = self.source.width, self.source.height
        inside = np.isfinite(points).all(1) & (points >= 0).all(1) & (points[:, 0] <= w) & (points[:, 1] <= h)
        if not inside.all():
            x, y = points[~inside][0].tolist()
            raise InputError(f"{what} ({x:g}, {y:g}) is outside the {w}×{h} frame")

    def add_mask(self, frame: int, obj_id: int, mask: np.ndarray) -> None:
        mask = np.asarray(mask).astype(bool)
        if mask.shape != (self.source.height, self.source.width):
            raise InputError(f"add_mask: mask is {mask.shape}, the frames are {(self.source.height, self.source.width)}")
        self._refinement(frame, obj_id).masks[obj_id] = mask

    def _refinement(self, frame: int, obj_id: int) -> Refinement:
        if self.last is None or not self.last.objects:
            raise InputError("ask for an object first: there is no masklet to refine")
        if not 0 <= frame < len(self.source):
            raise InputError(f"frame {frame}: the source has frames 0..{len(self.source) - 1}")
        if not 1 <= obj_id <= len(self.last.objects):
            raise InputError(f"object {obj_id}: the last answer has objects 1..{len(self.last.objects)}")
        return self._refinements.setdefault(frame, Refinement())

    def clear_refinements(self) -> None:
        """Forget the clicks, boxes and masks added since the last answer."""
        self._refinements = {}

    def propagate(self, *, out_dir: str | Path | None = None, progress=None) -> SegmentationResult:
        """Recompute the last answer's masklets with every refinement added so far."""
        if self._question is None:
            raise InputError("nothing to propagate: ask a question first")
        instruction, mode, key_frames = self._question
        result = self.predictor.segment(self.source, instruction, mode="propagate" if mode == "per-frame" else mode,
                                        key_frames=key_frames, out_dir=out_dir, history=list(self.history[:-1]),
                                        refinements=dict(self._refinements), progress=progress)
        self.last = result
        return result
