"""Typed samples produced by the dataset readers (`instructseg.data.formats`).

Readers list samples eagerly but decode masks lazily: a sample carries a loader, and `masks()` calls it and checks
the result against the sizes the metadata declares. Masks are boolean numpy arrays:

- video: `(num_objects, T, H, W)`, one masklet per referred object (`(0, T, H, W)` for a no-target expression);
- image: `(num_objects, H, W)`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from instructseg.errors import InputError

VIDEO_TYPES = {0: "referring", 1: "reasoning", 2: "no-target"}


def check_shape(masks: np.ndarray, expected: tuple[int, ...], source: str) -> np.ndarray:
    """`masks` as bool if its shape is `expected`, else InputError (metadata and masks disagree)."""
    if masks.shape != expected:
        raise InputError(f"{source}: masks have shape {masks.shape}, expected {expected}")
    return masks.astype(bool, copy=False)


@dataclass
class VideoExpression:
    """One expression over one video (ReVOS, Ref-YouTube-VOS, MeViS, Ref-DAVIS17)."""

    dataset: str                 # "revos" | "refytvos" | "mevis" | "davis17"
    video: str
    exp_id: str
    text: str
    type_id: int                 # 0 referring, 1 reasoning, 2 no-target (0 for datasets without types)
    frames: list[str]            # frame names without extension
    frame_paths: list[Path] = field(repr=False)
    height: int
    width: int
    obj_ids: list[int]
    answer: str | None = None
    mask_loader: Callable[[], np.ndarray] | None = field(default=None, repr=False)        # -> (N, T, H, W) bool
    foreground_loader: Callable[[], np.ndarray] | None = field(default=None, repr=False)  # -> (T, H, W) bool

    @property
    def key(self) -> str:
        """'<video>/<exp_id>': the prediction folder of this expression."""
        return f"{self.video}/{self.exp_id}"

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    def _source(self) -> str:
        return f"{self.dataset} {self.key}"

    def masks(self) -> np.ndarray:
        """(num_objects, T, H, W) bool ground truth; (0, T, H, W) for an expression without targets."""
        frames = (self.num_frames, self.height, self.width)
        if self.mask_loader is None:
            if self.obj_ids:
                raise InputError(f"{self._source()}: no ground-truth masks available")
            return np.zeros((0, *frames), dtype=bool)
        masks = self.mask_loader()
        return check_shape(masks, (masks.shape[0], *frames) if masks.ndim == 4 else frames, self._source())

    def union_masks(self) -> np.ndarray:
        """(T, H, W) bool: the union over the referred objects (all False for no-target)."""
        return self.masks().any(axis=0)

    def foreground(self) -> np.ndarray | None:
        """(T, H, W) bool union of every annotated object in the video (ReVOS), else None."""
        if self.foreground_loader is None:
            return None
        return check_shape(self.foreground_loader(), (self.num_frames, self.height, self.width), self._source())


@dataclass
class ImageSample:
    """One sentence over one image (RefCOCO/+/g, ReasonSeg)."""

    dataset: str                 # "refcoco" | "refcoco+" | "refcocog" | "reasonseg"
    sample_id: str
    image_path: Path
    text: str
    height: int
    width: int
    split: str
    answer: str | None = None
    is_sentence: bool = False
    mask_loader: Callable[[], np.ndarray] | None = field(default=None, repr=False)            # -> (N, H, W) bool
    ignore_loader: Callable[[], np.ndarray | None] | None = field(default=None, repr=False)  # -> (H, W) bool
    # -> (H, W) int16: every annotated object of the image painted with its category (1-based), 0 elsewhere
    semantic_loader: Callable[[], np.ndarray] | None = field(default=None, repr=False)
    # -> (H, W) int16: the same objects painted with their attribute (1-based), 0 elsewhere
    attribute_loader: Callable[[], np.ndarray] | None = field(default=None, repr=False)

    def _source(self) -> str:
        return f"{self.dataset} {self.sample_id}"

    def masks(self) -> np.ndarray:
        """(num_objects, H, W) bool ground truth."""
        if self.mask_loader is None:
            raise InputError(f"{self._source()}: no ground-truth masks available")
        masks = self.mask_loader()
        expected = (masks.shape[0], self.height, self.width) if masks.ndim == 3 else (self.height, self.width)
        return check_shape(masks, expected, self._source())

    def union_mask(self) -> np.ndarray:
        """(H, W) bool union over the referred objects."""
        return self.masks().any(axis=0)

    def ignore(self) -> np.ndarray | None:
        """(H, W) bool pixels excluded from scoring (ReasonSeg "ignore" polygons), or None."""
        if self.ignore_loader is None:
            return None
        mask = self.ignore_loader()
        return None if mask is None else check_shape(mask, (self.height, self.width), self._source())

    def semantic(self) -> np.ndarray | None:
        """(H, W) int16 category map of the whole image (RefCOCO: every annotation of instances.json, class =
        1 + the category's position in its `categories` list, 0 = no annotated object), or None."""
        return self._label_map(self.semantic_loader, "category")

    def attributes(self) -> np.ndarray | None:
        """(H, W) int16 attribute map (class = 1 + the attribute's position in instances.json's `attributes`, 0 =
        no annotated object or none listed), or None."""
        return self._label_map(self.attribute_loader, "attribute")

    def _label_map(self, loader, kind: str) -> np.ndarray | None:
        if loader is None:
            return None
        classes = loader()
        if classes.shape != (self.height, self.width):
            raise InputError(f"{self._source()}: {kind} map has shape {classes.shape}, "
                             f"expected {(self.height, self.width)}")
        return classes


@dataclass
class ChatSample:
    """One multi-turn conversation about an image (LLaVA format)."""

    sample_id: str
    image_path: Path | None
    turns: list[tuple[str, str]]  # (role "user" / "assistant", text) with "<image>" removed from the text
