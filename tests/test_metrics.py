"""Hand-computed cases for J, F, A, R, cIoU and gIoU (instructseg.eval.metrics)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from instructseg.eval.metrics import (IoUAccumulator, accuracy, boundary_f, boundary_map, boundary_radius, ciou,
                                      disk, giou, jaccard, robustness)


def square(h: int, w: int, top: int, left: int, size: int) -> np.ndarray:
    mask = np.zeros((h, w), dtype=bool)
    mask[top:top + size, left:left + size] = True
    return mask


def blobs(rng: np.random.Generator, shape: tuple[int, ...], smooth: float = 3.0) -> np.ndarray:
    """Random smooth masks: blurred noise above its median."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=(0,) * (len(shape) - 2) + (smooth, smooth))
    return noise > np.median(noise)


# ------------------------------------------------------------------------------------------------- J


def test_jaccard_empty_empty_is_one():
    empty = np.zeros((5, 6), dtype=bool)
    assert jaccard(empty, empty).shape == ()
    assert jaccard(empty, empty) == 1.0


def test_jaccard_empty_prediction_is_zero():
    assert jaccard(np.zeros((5, 6), bool), square(5, 6, 1, 1, 2)) == 0.0


def test_jaccard_full_masks():
    full = np.ones((4, 7), dtype=bool)
    assert jaccard(full, full) == 1.0
    assert jaccard(full, square(4, 7, 0, 0, 2)) == pytest.approx(4 / 28)


def test_jaccard_square_shifted_by_one_pixel():
    # 10x10 squares overlapping in a 10x9 band: I = 90, U = 100 + 100 - 90 = 110.
    gt = square(40, 40, 10, 10, 10)
    pred = square(40, 40, 10, 11, 10)
    assert jaccard(pred, gt) == pytest.approx(90 / 110)


def test_jaccard_accepts_uint8_0_255():
    gt = square(8, 8, 2, 2, 3)
    assert jaccard(gt.astype(np.uint8) * 255, gt) == 1.0


def test_jaccard_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        jaccard(np.zeros((4, 4), bool), np.zeros((4, 5), bool))


# ------------------------------------------------------------------------------------------------- F


def test_boundary_map_of_a_square_is_its_one_pixel_ring():
    # DAVIS boundaries sit half a pixel towards the origin: the ring of the 11x11 box with corners (9,9), (19,19).
    b = boundary_map(square(40, 40, 10, 10, 10))
    ring = np.zeros((40, 40), dtype=bool)
    ring[9:20, 9:20] = True
    ring[10:19, 10:19] = False
    assert np.array_equal(b, ring)
    assert b.sum() == 40


def test_boundary_map_ignores_the_image_border():
    assert not boundary_map(np.ones((6, 9), bool)).any()


def test_boundary_radius():
    assert boundary_radius(480, 854) == 8          # ceil(0.008 * 979.6)
    assert boundary_radius(64, 80) == 1            # ceil(0.008 * 102.4)
    assert boundary_radius(64, 80, bound_th=0) == 0
    assert boundary_radius(64, 80, bound_th=3) == 3  # >= 1 means pixels
    assert disk(1).tolist() == [[False, True, False], [True, True, True], [False, True, False]]


def test_boundary_f_empty_conventions():
    empty = np.zeros((20, 20), dtype=bool)
    obj = square(20, 20, 5, 5, 6)
    assert boundary_f(empty, empty) == 1.0   # both empty: P = R = 1
    assert boundary_f(empty, obj) == 0.0     # prediction empty: P = 1, R = 0
    assert boundary_f(obj, empty) == 0.0     # ground truth empty: P = 0, R = 1
    full = np.ones((20, 20), dtype=bool)
    assert boundary_f(full, full) == 1.0     # full masks have no boundary at all


def test_boundary_f_identical_masks_is_one():
    rng = np.random.default_rng(0)
    masks = blobs(rng, (3, 30, 40))
    np.testing.assert_array_equal(boundary_f(masks, masks), np.ones(3))


def test_boundary_f_one_pixel_shift_without_tolerance():
    # Rings of the square and of its one-pixel shift share only their top and bottom rows (2 x 10 of 40 pixels):
    # P = R = 1/2 with zero tolerance.
    gt = square(40, 40, 10, 10, 10)
    pred = square(40, 40, 10, 11, 10)
    assert boundary_f(pred, gt, bound_th=0) == pytest.approx(0.5)
    assert boundary_f(pred, gt) == 1.0   # 40x40: radius ceil(0.45) = 1 covers it


def test_boundary_f_two_pixel_shift_depends_on_image_size():
    small_gt, small_pred = square(40, 40, 10, 10, 10), square(40, 40, 10, 12, 10)        # radius 1
    big_gt, big_pred = square(300, 300, 100, 100, 10), square(300, 300, 100, 102, 10)   # radius 4
    assert boundary_f(small_pred, small_gt) < 1.0
    assert boundary_f(big_pred, big_gt) == 1.0


def _reference_f(pred: np.ndarray, gt: np.ndarray, bound_th: float) -> float:
    """Straight per-frame transcription of the definition, with binary dilation by a disk."""
    pb, gb = boundary_map(pred), boundary_map(gt)
    r = boundary_radius(*pred.shape, bound_th)
    pd = ndimage.binary_dilation(pb, structure=disk(r)) if r > 0 else pb
    gd = ndimage.binary_dilation(gb, structure=disk(r)) if r > 0 else gb
    n_p, n_g = pb.sum(), gb.sum()
    if n_p == 0 and n_g == 0:
        return 1.0
    if n_p == 0 or n_g == 0:
        return 0.0
    p, rec = (pb & gd).sum() / n_p, (gb & pd).sum() / n_g
    return 0.0 if p + rec == 0 else 2 * p * rec / (p + rec)


@pytest.mark.parametrize("bound_th", [0.0, 0.008, 0.03, 5])
def test_boundary_f_matches_dilation_reference_and_per_frame_loop(bound_th):
    rng = np.random.default_rng(1)
    gt = blobs(rng, (6, 48, 64))
    pred = np.roll(blobs(rng, (6, 48, 64), smooth=2.0) | gt, shift=2, axis=-1)
    pred[2] = False                         # an empty prediction frame
    gt[3] = False                           # an empty ground-truth frame
    pred[4] = gt[4] = False                 # both empty
    got = boundary_f(pred, gt, bound_th=bound_th)
    expected = np.array([_reference_f(pred[t], gt[t], bound_th) for t in range(6)])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got, [boundary_f(pred[t], gt[t], bound_th) for t in range(6)], atol=1e-12)


# --------------------------------------------------------------------------------------------- A and R


def test_accuracy_hand_case():
    gt = square(4, 4, 0, 0, 2)                   # 4 pixels
    pred = square(4, 4, 0, 1, 2)                 # 2 overlap, 2 false positives, 2 false negatives
    assert accuracy(pred, gt) == pytest.approx(12 / 16)
    assert accuracy(gt, gt) == 1.0
    assert accuracy(~gt, gt) == 0.0


def test_robustness_hand_case():
    gt = square(4, 4, 0, 0, 2)
    foreground = np.zeros((4, 4), bool)
    foreground[:2, :] = True                     # 8 foreground pixels (all objects of the video)
    pred = gt.copy()
    pred[3, 3] = True                            # 1 false positive
    assert robustness(pred, gt, foreground) == pytest.approx(1 - 1 / (8 + 1e-6))
    assert robustness(gt, gt, foreground) == 1.0
    assert robustness(np.zeros_like(gt), gt, foreground) == 1.0     # misses are not R's business
    assert robustness(np.ones_like(gt), gt, foreground) == 0.0      # 12 FP > 8: clipped at 0
    assert robustness(pred, gt, np.zeros_like(gt)) == 0.0            # any FP with no foreground


# ------------------------------------------------------------------------------------------ vectorised


def test_video_metrics_equal_per_frame_loop():
    rng = np.random.default_rng(2)
    gt, pred, fg = blobs(rng, (5, 24, 30)), blobs(rng, (5, 24, 30)), blobs(rng, (5, 24, 30))
    fg |= gt
    for fn, args in [(jaccard, (pred, gt)), (accuracy, (pred, gt)), (boundary_f, (pred, gt)),
                     (robustness, (pred, gt, fg))]:
        video = fn(*args)
        assert video.shape == (5,)
        frames = [fn(*(a[t] for a in args)) for t in range(5)]
        assert all(np.ndim(f) == 0 for f in frames)
        np.testing.assert_allclose(video, frames, atol=1e-12)
        assert ((video >= 0) & (video <= 1)).all()


# ------------------------------------------------------------------------------------------ cIoU / gIoU


def test_ciou_and_giou_differ():
    # A big object predicted well and a tiny one missed: cIoU is dominated by the big one, gIoU is not.
    big_gt, big_pred = square(20, 20, 0, 0, 10), square(20, 20, 0, 0, 9)     # I 81, U 100
    tiny_gt, tiny_pred = square(20, 20, 0, 0, 1), square(20, 20, 5, 5, 1)    # I 0,  U 2
    acc = IoUAccumulator()
    assert acc.add(big_pred, big_gt) == pytest.approx(0.81)
    assert acc.add(tiny_pred, tiny_gt) == 0.0
    assert acc.ciou == pytest.approx(81 / 102)
    assert acc.giou == pytest.approx(0.405)
    assert ciou([81, 0], [100, 2]) == pytest.approx(81 / 102)
    assert giou([0.81, 0.0]) == pytest.approx(0.405)
    assert len(acc) == 2


def test_iou_accumulator_empty_union_and_ignore():
    acc = IoUAccumulator()
    empty = np.zeros((4, 4), bool)
    assert acc.add(empty, empty) == 1.0             # empty union counts as IoU 1 for gIoU
    gt = square(4, 4, 0, 0, 2)
    pred = gt.copy()
    pred[3, 3] = True
    ignore = np.zeros((4, 4), bool)
    ignore[3, 3] = True
    assert acc.add(pred, gt, ignore=ignore) == 1.0  # the ignored false positive does not count
    assert acc.giou == 1.0 and acc.ciou == 1.0
    acc.reset()
    assert len(acc) == 0
    with pytest.raises(ValueError):
        giou([])
    assert ciou([0], [0]) == 1.0
