"""Segmentation metrics, vectorised over frames, written from their definitions.

Every function takes boolean masks shaped (T, H, W) (a video: one value per frame) or (H, W) (one frame: a 0-d
array) and returns fractions in [0, 1]; reports multiply by 100.

- J, region similarity (`jaccard`): |P & G| / |P | G|, 1 when both masks are empty.
- F, boundary F-measure (`boundary_f`): the DAVIS definition (Perazzi et al. 2016, davis2017-evaluation):
  one-pixel-wide boundary maps, a boundary pixel matches if the other mask's boundary lies within
  ceil(bound_th * image diagonal) pixels (a disk), F = 2PR / (P + R).
- A, pixel accuracy (`accuracy`): fraction of pixels where P equals G.
- R, robustness (`robustness`, ReVOS): max(1 - |P & ~G| / (|foreground| + 1e-6), 0), where the foreground is the
  union of every annotated object of the video (see docs/revos_scoring.md).
- cIoU / gIoU (`ciou`, `giou`, `IoUAccumulator`): the image benchmarks' cumulative and mean-per-sample IoU.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

__all__ = [
    "jaccard", "boundary_f", "boundary_map", "boundary_radius", "disk", "accuracy", "robustness",
    "ciou", "giou", "IoUAccumulator",
]

_EPS_FOREGROUND = 1e-6  # the ReVOS robustness denominator's epsilon


def _pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks as bool arrays of one shape, (H, W) or (T, H, W)."""
    pred, gt = np.asarray(pred).astype(bool, copy=False), np.asarray(gt).astype(bool, copy=False)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}")
    if pred.ndim not in (2, 3):
        raise ValueError(f"masks must be (H, W) or (T, H, W), got shape {pred.shape}")
    return pred, gt


def _per_frame_sum(mask: np.ndarray) -> np.ndarray:
    """Pixel count per frame: shape () for (H, W), (T,) for (T, H, W)."""
    return mask.sum(axis=(-2, -1), dtype=np.int64)


def jaccard(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Region similarity J (IoU) per frame; a frame where both masks are empty scores 1."""
    pred, gt = _pair(pred, gt)
    inter = _per_frame_sum(pred & gt)
    union = _per_frame_sum(pred | gt)
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def accuracy(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Pixel accuracy A per frame: the fraction of pixels where prediction and ground truth agree."""
    pred, gt = _pair(pred, gt)
    return _per_frame_sum(pred == gt) / float(pred.shape[-2] * pred.shape[-1])


def robustness(pred: np.ndarray, gt: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """ReVOS robustness R per frame: max(1 - FP / (|foreground| + 1e-6), 0) with FP = |pred & ~gt|.

    `foreground` is the union of all annotated objects of the video in that frame (ReVOS ships it as
    mask_dict_foreground.json), so R measures false positives relative to the video's annotated objects.
    """
    pred, gt = _pair(pred, gt)
    foreground, _ = _pair(foreground, gt)
    false_pos = _per_frame_sum(pred & ~gt)
    return np.maximum(1.0 - false_pos / (_per_frame_sum(foreground) + _EPS_FOREGROUND), 0.0)


# ---------------------------------------------------------------------------------------------- boundary F


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """One-pixel-wide boundaries of (..., H, W) bool masks (the DAVIS `seg2bmap` rule).

    A pixel is a boundary pixel when it differs from its right, bottom or bottom-right neighbour; neighbours
    outside the image are not compared, so the image border itself is never a boundary (a full mask has none).
    """
    mask = np.asarray(mask, dtype=bool)
    out = np.zeros_like(mask)
    out[..., :, :-1] |= mask[..., :, :-1] != mask[..., :, 1:]       # right neighbour
    out[..., :-1, :] |= mask[..., :-1, :] != mask[..., 1:, :]       # bottom neighbour
    out[..., :-1, :-1] |= mask[..., :-1, :-1] != mask[..., 1:, 1:]  # bottom-right neighbour
    return out


def boundary_radius(height: int, width: int, bound_th: float = 0.008) -> int:
    """Match tolerance in pixels: ceil(bound_th * diagonal) when bound_th < 1, else bound_th itself (pixels)."""
    if bound_th < 0:
        raise ValueError(f"bound_th must be >= 0, got {bound_th}")
    if bound_th >= 1:
        return int(bound_th)
    return int(np.ceil(bound_th * np.hypot(height, width)))


def disk(radius: int) -> np.ndarray:
    """(2r+1, 2r+1) bool disk: offsets (dy, dx) with dy^2 + dx^2 <= r^2 (the structuring element DAVIS uses)."""
    offsets = np.arange(-radius, radius + 1)
    return offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius ** 2


def _within_radius(target: np.ndarray, source: np.ndarray, radius: int) -> np.ndarray:
    """`target & dilate(source, disk(radius))` for one (H, W) frame with a non-empty `source`.

    Dilating by a disk of radius r marks exactly the pixels whose Euclidean distance to the nearest `source`
    pixel is <= r, so this uses the exact distance transform (O(H*W) whatever the radius) instead of
    `ndimage.binary_dilation(source, disk(radius))` (O(H*W*r^2)); tests check the two agree.
    """
    distance = ndimage.distance_transform_edt(~source)
    return target & (distance <= radius)


def _precision_recall_f(n_pred: np.ndarray, n_gt: np.ndarray, pred_hit: np.ndarray,
                        gt_hit: np.ndarray) -> np.ndarray:
    """F per frame from boundary pixel counts, with the DAVIS conventions for empty boundaries.

    both empty -> P = R = 1 (F = 1); prediction empty only -> P = 1, R = 0 (F = 0); ground truth empty only ->
    P = 0, R = 1 (F = 0); P + R = 0 -> F = 0. The hit counts are 0 whenever the other boundary is empty, so
    "hits / count, or 1 for an empty count" gives exactly those conventions.
    """
    precision = np.where(n_pred > 0, pred_hit / np.maximum(n_pred, 1), 1.0)
    recall = np.where(n_gt > 0, gt_hit / np.maximum(n_gt, 1), 1.0)
    total = precision + recall
    return np.where(total > 0, 2 * precision * recall / np.where(total > 0, total, 1.0), 0.0)


def boundary_f(pred: np.ndarray, gt: np.ndarray, bound_th: float = 0.008) -> np.ndarray:
    """Boundary F-measure per frame (DAVIS): precision = matched prediction boundary / prediction boundary,
    recall = matched ground-truth boundary / ground-truth boundary, within `boundary_radius` pixels."""
    pred, gt = _pair(pred, gt)
    single = pred.ndim == 2
    pred_b, gt_b = boundary_map(pred[None] if single else pred), boundary_map(gt[None] if single else gt)
    radius = boundary_radius(pred.shape[-2], pred.shape[-1], bound_th)

    n_pred, n_gt = _per_frame_sum(pred_b), _per_frame_sum(gt_b)
    pred_hit = np.zeros_like(n_pred)
    gt_hit = np.zeros_like(n_gt)
    for t in np.flatnonzero((n_pred > 0) & (n_gt > 0)):  # other frames are settled by the conventions
        pred_hit[t] = _within_radius(pred_b[t], gt_b[t], radius).sum()
        gt_hit[t] = _within_radius(gt_b[t], pred_b[t], radius).sum()

    f = _precision_recall_f(n_pred, n_gt, pred_hit, gt_hit)
    return f[0] if single else f


# ------------------------------------------------------------------------------------------- cIoU / gIoU


def ciou(intersections, unions) -> float:
    """Cumulative IoU: sum of intersections / sum of unions over all samples (1.0 if every union is empty)."""
    total_i = float(np.sum(np.asarray(intersections, dtype=np.float64)))
    total_u = float(np.sum(np.asarray(unions, dtype=np.float64)))
    return 1.0 if total_u == 0 else total_i / total_u


def giou(ious) -> float:
    """Generalised (mean per-sample) IoU: the mean of the samples' IoUs (each 1 for an empty union)."""
    ious = np.asarray(ious, dtype=np.float64)
    if ious.size == 0:
        raise ValueError("giou of no samples is undefined")
    return float(ious.mean())


@dataclass
class IoUAccumulator:
    """Collects per-sample intersections and unions; `ciou` and `giou` summarise them.

    >>> acc = IoUAccumulator(); acc.add(pred, gt); acc.ciou, acc.giou
    """

    intersections: list[int] = field(default_factory=list)
    unions: list[int] = field(default_factory=list)

    def add(self, pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None = None) -> float:
        """Add one sample (masks of any equal shape); pixels where `ignore` is true are left out. Returns its IoU."""
        pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}")
        keep = np.ones_like(gt) if ignore is None else ~np.asarray(ignore, dtype=bool)
        if keep.shape != gt.shape:
            raise ValueError(f"ignore shape {keep.shape} differs from ground-truth shape {gt.shape}")
        inter = int(np.count_nonzero(pred & gt & keep))
        union = int(np.count_nonzero((pred | gt) & keep))
        self.intersections.append(inter)
        self.unions.append(union)
        return 1.0 if union == 0 else inter / union

    def reset(self) -> None:
        self.intersections.clear()
        self.unions.clear()

    def __len__(self) -> int:
        return len(self.unions)

    @property
    def ious(self) -> np.ndarray:
        inter = np.asarray(self.intersections, dtype=np.float64)
        union = np.asarray(self.unions, dtype=np.float64)
        return np.where(union == 0, 1.0, inter / np.maximum(union, 1))

    @property
    def ciou(self) -> float:
        return ciou(self.intersections, self.unions)

    @property
    def giou(self) -> float:
        return giou(self.ious)
