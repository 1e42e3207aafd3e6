"""Describing tracked parts of a video mask by their tracks: where each starts and ends, how far it moves, its size.

A video mask for "the blue shape moving right" often covers every blue shape (on ShapesIVS valid, 233 of 494
referring expressions scored a mask that covers the target and another object over the clip; docs/default_model.md,
"A track choice"). What tells them apart is over the whole clip, not on one frame, so each connected part of the
first key frame's mask is tracked on its own (`instructseg.inference.track_choice`) and described here by
`TRACK_FEATURES` numbers: `ABSOLUTE` (positions as fractions of the frame minus 0.5, motion over the clip, log
area, entering or leaving the picture) and the first `RELATIVE` of them again minus their mean over the mask's parts.
"""
from __future__ import annotations

import numpy as np

ABSOLUTE = 10  # start x, start y, end x, end y, net dx, net dy, path length, log area, enters, leaves
RELATIVE = 8   # the same minus the parts' mean, for all but enters / leaves
TRACK_FEATURES = ABSOLUTE + RELATIVE
MOTION_SCALE = 1.5  # net displacement and path length in 1.5 x frame fractions (about the scale of the positions)
# a part is dropped only when the instruction's score for it is below DROP_BELOW and below the best part's by more
# than WITHIN: a head unsure of the words scores all parts alike and keeps them all (on ShapesIVS valid, emulated on
# the saved masks of the model without a track prior: "keep above 0, and the best" loses ReVOS J&F, these gain;
# docs/default_model.md, "A track choice")
DROP_BELOW = -2.0
WITHIN = 2.0


def track_summary(areas: np.ndarray, centres: np.ndarray) -> np.ndarray | None:
    """(ABSOLUTE,) numbers of one track from its per-frame `areas` (T,) (fractions of the frame) and `centres` (T, 2)
    (x, y fractions; ignored where the area is 0); None when it is never visible."""
    seen = np.flatnonzero(areas > 0)
    if seen.size == 0:
        return None
    c = centres[seen]
    path = np.linalg.norm(np.diff(c, axis=0), axis=1).sum() if seen.size > 1 else 0.0
    net = c[-1] - c[0]
    return np.array([c[0, 0] - 0.5, c[0, 1] - 0.5, c[-1, 0] - 0.5, c[-1, 1] - 0.5,
                     MOTION_SCALE * net[0], MOTION_SCALE * net[1], MOTION_SCALE * path,
                     np.log(areas[seen].mean()) + 5.0, float(areas[0] == 0), float(areas[-1] == 0)], np.float32)


def mask_summary(masks: np.ndarray) -> np.ndarray | None:
    """`track_summary` of a track given as masks (T, H, W) bool."""
    t, h, w = masks.shape
    flat = masks.reshape(t, -1)
    area = flat.sum(1).astype(np.float64)
    ys, xs = np.divmod(np.arange(h * w), w)
    safe = np.maximum(area, 1)
    centres = np.stack([flat @ ((xs + 0.5) / w) / safe, flat @ ((ys + 0.5) / h) / safe], axis=1)
    return track_summary(area / (h * w), centres)


def track_features(summaries: np.ndarray) -> np.ndarray:
    """(P, TRACK_FEATURES) of P parts' summaries (P, ABSOLUTE): absolute, then relative to the parts' mean."""
    rel = summaries[:, :RELATIVE] - summaries[:, :RELATIVE].mean(0)
    return np.concatenate([summaries, rel], axis=1).astype(np.float32)


def choose(scores: np.ndarray) -> np.ndarray:
    """Which parts to keep: all but those scored below DROP_BELOW and more than WITHIN below the best (so always
    the best one)."""
    return (scores >= DROP_BELOW) | (scores >= scores.max() - WITHIN)
