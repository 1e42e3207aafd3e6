"""Choosing among the separate parts of an object's mask: "the large star" when the mask covers both stars.

A decoder's mask for "the large star" often covers the small star too (on RES val this over-reach was a quarter of
the cIoU that the model without a part prior lost; docs/default_model.md, "A part choice"). A pixel-wise prior
cannot fix it: what decides is a comparison between the parts. So each mask's connected parts (its pixels above 0,
parts below `MIN_SHARE` of the largest left out) are described by `PART_FEATURES` numbers, each relative to the
mean over the mask's parts: log area, centre x, centre y (fractions of the frame). Per object the instruction gives
one weight per feature (`instructseg.model.part_prior`); a part's logits are raised by the weights' dot product with
its features. A mask with one part is left as it is (its features are all 0), and the pixels outside the parts too,
so the choice can drop a part or keep it, never grow one.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

PART_FEATURES = 3  # log area, centre x, centre y: each minus its mean over the mask's parts
MIN_SHARE = 0.05   # parts smaller than this share of the largest part are specks: left as they are


def mask_parts(logits: np.ndarray, min_parts: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(labels (H, W) int: 1..P for the counted parts of `logits > 0`, 0 elsewhere; features (P, PART_FEATURES)).
    No parts (P = 0) when fewer than `min_parts` are counted."""
    labels, count = ndimage.label(logits > 0)
    none = np.zeros(logits.shape, np.int64), np.zeros((0, PART_FEATURES), np.float32)
    if count < max(min_parts, 1):
        return none
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:].astype(np.float64)
    keep = np.flatnonzero(areas >= MIN_SHARE * areas.max())
    if keep.size < min_parts:
        return none
    relabel = np.zeros(count + 1, np.int64)
    relabel[keep + 1] = np.arange(1, keep.size + 1)
    labels = relabel[labels]
    h, w = logits.shape
    ys, xs = np.mgrid[0:h, 0:w]
    flat = labels.ravel()
    n = keep.size + 1
    area = np.bincount(flat, minlength=n)[1:]
    cx = np.bincount(flat, weights=(xs.ravel() + 0.5) / w, minlength=n)[1:] / area
    cy = np.bincount(flat, weights=(ys.ravel() + 0.5) / h, minlength=n)[1:] / area
    feats = np.stack([np.log(area / (h * w)), cx, cy], axis=1)
    return labels, (feats - feats.mean(0)).astype(np.float32)


def part_offsets(labels: torch.Tensor, features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Logit offsets (M, H, W) for masks with part `labels` (M, H, W) (0: no part) and per-part `features`
    (M, P, PART_FEATURES) (zero rows for missing parts) under `weights` (M, PART_FEATURES)."""
    per_part = torch.einsum("mpf,mf->mp", features, weights)
    per_part = torch.cat([per_part.new_zeros(per_part.shape[0], 1), per_part], dim=1)  # label 0: no offset
    return per_part.gather(1, labels.flatten(1)).view(labels.shape)


def choose_parts(mask_logits: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """`mask_logits` (B, N, H, W) with each valid object's parts raised or lowered by its `weights` (B, N, F)."""
    out = mask_logits.clone()
    for b, n in valid.nonzero().tolist():
        labels, feats = mask_parts(mask_logits[b, n].detach().float().cpu().numpy())
        if feats.shape[0] == 0:
            continue
        labels = torch.from_numpy(labels).to(mask_logits.device)[None]
        feats = torch.from_numpy(feats).to(weights.device)[None]
        out[b, n] = out[b, n] + part_offsets(labels, feats, weights[b, n][None].float())[0].to(out.dtype)
    return out
