"""Training losses: next-token CE on answers, plus per-object score / mask BCE / dice with optional Hungarian matching.

The model returns typed outputs and no loss (`InstructSegOutput`); everything here lives on the training side.
Shapes: B batch, L tokens, V vocabulary, N object slots, K targets of one sample, S decoder mask size, M matched pairs,
P points per mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from instructseg.errors import InputError
from instructseg.model.outputs import InstructSegOutput
from instructseg.model.tokens import IGNORE_INDEX

MIN_WORD_COVER = 0.05  # word slots: a cell whose largest object covers less than this share of it is background


@dataclass
class LossWeights:
    """Loss weights (InstructSeg: class 2, mask 5, dice 5, LM 1) and the mask-loss sampling mode."""

    lm: float = 1.0  # next-token cross-entropy on answer tokens
    score: float = 2.0  # object score BCE (sam2: object present; mask2former: query matched)
    mask: float = 5.0  # per-pixel mask BCE
    dice: float = 5.0  # dice loss
    # grounding maps (E_v and each object embedding vs the decoder's coarse tokens): BCE + dice against the targets
    # pooled to that grid. A direct signal that ties words to pixels, so the decoder cannot ignore the instruction.
    align: float = 2.0
    # auxiliary category heads (models with `semantic_classes`): per-token cross-entropy against the category map
    # pooled to each head's grid, for the vision tokens and for the decoder's coarse tokens
    category: float = 1.0
    # word slots' heads (models with `attribute_names` / `category_names`): per-cell cross-entropy against the cell's
    # main object in the attribute and category maps
    words: float = 1.0
    num_points: int = 0  # 0: mask losses on every pixel; > 0: on this many importance-sampled points per mask


@dataclass
class LossOutput:
    """total: scalar to backpropagate. parts: unweighted "lm", "score", "mask", "dice", "align" (and with
    category maps "category_vision", "category_decoder", with word slots "words_attribute", "words_category") as
    floats, for logging."""

    total: torch.Tensor
    parts: dict[str, float]


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: logits (B, L, V) at position t predict labels (B, L) at t + 1; IGNORE_INDEX skipped.

    Returns a scalar; 0 (still attached to `logits`) when no label token is set.
    """
    targets = labels[:, 1:]
    if not bool((targets != IGNORE_INDEX).any()):
        return logits.sum() * 0.0
    pred = logits[:, :-1].float()
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def sigmoid_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel BCE of each pair, averaged over pairs. logits, targets (M, ...) -> scalar (0 if M == 0)."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    per_pixel = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    return per_pixel.flatten(1).mean(1).mean()


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1 - soft dice (smoothed by 1) of each pair, averaged. logits, targets (M, ...) -> scalar (0 if M == 0)."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    prob = logits.float().sigmoid().flatten(1)
    tgt = targets.float().flatten(1)
    dice = (2 * (prob * tgt).sum(1) + 1) / (prob.sum(1) + tgt.sum(1) + 1)
    return (1 - dice).mean()


def point_sample(maps: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear values of maps (M, S, S) at coords (M, P, 2) in [0, 1] as (x, y) -> (M, P)."""
    grid = coords[:, None] * 2 - 1
    return F.grid_sample(maps[:, None].float(), grid, align_corners=False)[:, 0, 0]


def uncertain_points(logits: torch.Tensor, num_points: int, *, oversample: float = 3.0,
                     importance: float = 0.75) -> torch.Tensor:
    """Points for the mask losses (PointRend / Mask2Former idea): draw `oversample * num_points` uniform candidates,
    keep the `importance * num_points` where |logit| is smallest, fill up with fresh uniform points.

    logits (M, S, S) -> coords (M, num_points, 2) in [0, 1]; not differentiable (chosen under no_grad).
    """
    m, device = logits.shape[0], logits.device
    num_uncertain = min(int(importance * num_points), num_points)
    with torch.no_grad():
        coords = torch.rand(m, num_points - num_uncertain, 2, device=device)
        if num_uncertain > 0:
            cand = torch.rand(m, max(int(oversample * num_points), num_uncertain), 2, device=device)
            top = (-point_sample(logits, cand).abs()).topk(num_uncertain, dim=1).indices
            picked = cand.gather(1, top[..., None].expand(-1, -1, 2))
            coords = torch.cat([picked, coords], dim=1)
    return coords


def _pairwise_costs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean BCE and dice loss of every (prediction, target) pair. logits (N, P), targets (K, P) -> two (N, K)."""
    pixels = logits.shape[1]
    bce = F.softplus(logits).mean(1, keepdim=True) - logits @ targets.T / pixels  # BCE(x, t) = softplus(x) - x * t
    prob = logits.sigmoid()
    dice = 1 - (2 * prob @ targets.T + 1) / (prob.sum(1)[:, None] + targets.sum(1)[None, :] + 1)
    return bce, dice


@torch.no_grad()
def hungarian_match(mask_logits: torch.Tensor, score_logits: torch.Tensor, targets: torch.Tensor,
                    weights: LossWeights, *, grid: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimal one-to-one assignment of predictions to targets (scipy `linear_sum_assignment`).

    mask_logits (N, S, S), score_logits (N,), targets (K, S, S) bool. Cost = score * -sigmoid(score) + mask * BCE +
    dice * dice, computed on `weights.num_points` shared uniform points if > 0, else on a grid of at most `grid`^2.
    Returns (pred_idx, tgt_idx), two (min(N, K),) long tensors with pred_idx ascending.
    """
    n, k = mask_logits.shape[0], targets.shape[0]
    empty = torch.zeros(0, dtype=torch.long, device=mask_logits.device)
    if n == 0 or k == 0:
        return empty, empty
    logits, tgt = mask_logits.float(), targets.float()
    if weights.num_points > 0:
        coords = torch.rand(1, weights.num_points, 2, device=logits.device)
        logits = point_sample(logits, coords.expand(n, -1, -1))
        tgt = point_sample(tgt, coords.expand(k, -1, -1))
    elif logits.shape[-1] > grid:
        logits = F.interpolate(logits[:, None], size=(grid, grid), mode="bilinear", align_corners=False)[:, 0]
        tgt = F.adaptive_avg_pool2d(tgt[:, None], grid)[:, 0]
    bce, dice = _pairwise_costs(logits.flatten(1), tgt.flatten(1))
    cost = -weights.score * score_logits.float().sigmoid()[:, None] + weights.mask * bce + weights.dice * dice
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    pred_idx, tgt_idx = (torch.as_tensor(a, dtype=torch.long, device=mask_logits.device) for a in (rows, cols))
    return pred_idx, tgt_idx


class SegmentationLoss:
    """LM + score + mask + dice losses of one batch.

    matching=False (sam2): valid slot j of a sample is the j-th [SEG] of its answer and pairs with target j (only the
    first min(slots, targets) pairs count); the score learns whether the object is present (target has foreground),
    masks are learnt for present objects only.
    matching=True (mask2former): valid slots are Hungarian-matched to the non-empty targets; matched slots learn score 1
    and their masks, every other valid slot learns score 0.
    Mask and dice losses average over all pairs of the batch, the score BCE over all scored slots.
    """

    def __init__(self, weights: LossWeights, matching: bool, *, oversample: float = 3.0, importance: float = 0.75):
        self.weights = weights
        self.matching = matching
        self.oversample = oversample  # point sampling: candidates per kept point
        self.importance = importance  # point sampling: share of points chosen for uncertainty

    def _assign(self, out: InstructSegOutput, i: int, targets: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample i -> (scored slots, their score targets, mask slots, their target indices), long/float (n,)."""
        slots = out.object_valid[i].nonzero().flatten()
        present = targets.flatten(1).any(1)
        if not self.matching:
            m = min(slots.numel(), targets.shape[0])
            slots, tgt_idx = slots[:m], torch.arange(m, device=slots.device)
            keep = present[:m]
            return slots, keep.float(), slots[keep], tgt_idx[keep]
        kept = present.nonzero().flatten()
        pred, tgt = hungarian_match(out.mask_logits[i, slots], out.score_logits[i, slots], targets[kept],
                                    self.weights)
        score_tgt = torch.zeros(slots.numel(), device=slots.device)
        score_tgt[pred] = 1.0
        return slots, score_tgt, slots[pred], kept[tgt]

    def _mask_losses(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits (M, S, S), targets (M, S, S) -> (BCE, dice), densely or on sampled points."""
        if self.weights.num_points > 0 and logits.shape[0] > 0:
            coords = uncertain_points(logits.detach(), self.weights.num_points, oversample=self.oversample,
                                      importance=self.importance)
            logits, targets = point_sample(logits, coords), point_sample(targets.float(), coords)
        return sigmoid_bce(logits, targets), dice_loss(logits, targets)

    def __call__(self, outputs: InstructSegOutput, labels: torch.Tensor | None,
                 target_masks: list[torch.Tensor], ref_masks: list[torch.Tensor] | None = None,
                 categories: torch.Tensor | None = None, attributes: torch.Tensor | None = None) -> LossOutput:
        """outputs: model outputs (mask_logits (B, N, S, S)); labels (B, L) or None (no LM loss);
        target_masks: B tensors (K_i, S, S) bool at the decoder resolution (K_i = 0: no target);
        ref_masks: B tensors (R, K_i, S, S), the targets on the reference frames, when the outputs were tracked
        (`track_mask_logits`): each reference frame is then scored like a key frame, and the parts add up;
        categories: (B, S, S) long category maps of the key frames (-1: none), for models with category heads or
        word slots; attributes: (B, S, S) long attribute maps, for models with attribute word slots."""
        result = self._frame_loss(outputs, labels, target_masks)
        if outputs.vision_class_logits is not None and self.weights.category > 0:
            # (every batch reaches the heads, with or without maps: distributed ranks agree on what has gradients)
            parts, total = dict(result.parts), result.total
            for name, logits in (("vision", outputs.vision_class_logits), ("decoder", outputs.decoder_class_logits)):
                loss = category_loss(logits, categories)
                total = total + self.weights.category * loss
                if categories is not None and bool((categories >= 0).any()):
                    parts[f"category_{name}"] = float(loss.detach())
            result = LossOutput(total=total, parts=parts)
        if outputs.word_logits and self.weights.words > 0:
            parts, total = dict(result.parts), result.total
            maps = word_maps(categories, attributes)
            for name, loss in word_losses(outputs.word_logits, maps).items():
                total = total + self.weights.words * loss
                if maps[name] is not None and bool((maps[name] >= 0).any()):
                    parts[f"words_{name}"] = float(loss.detach())
            result = LossOutput(total=total, parts=parts)
        if outputs.track_mask_logits is None or ref_masks is None:
            return result
        b, r, n = outputs.track_score_logits.shape
        tracked = InstructSegOutput(
            logits=outputs.logits, mask_logits=outputs.track_mask_logits.flatten(0, 1),
            score_logits=outputs.track_score_logits.flatten(0, 1),
            object_valid=outputs.object_valid.repeat_interleave(r, dim=0), text_embed=outputs.text_embed)
        per_frame = [m[t] for m in ref_masks for t in range(r)]
        track = self._frame_loss(tracked, None, per_frame)
        parts = {**result.parts, **{f"track_{k}": v for k, v in track.parts.items()}}
        return LossOutput(total=result.total + track.total, parts=parts)

    def _frame_loss(self, outputs: InstructSegOutput, labels: torch.Tensor | None,
                    target_masks: list[torch.Tensor]) -> LossOutput:
        mask_logits, scores = outputs.mask_logits, outputs.score_logits
        batch, _, size = mask_logits.shape[:3]
        if len(target_masks) != batch:
            raise ValueError(f"got {len(target_masks)} target mask sets for a batch of {batch}")
        score_idx, score_tgt, mask_idx, mask_tgt = [], [], [], []
        for i, targets in enumerate(target_masks):
            if targets.shape[0] > 0 and tuple(targets.shape[1:]) != (size, size):
                raise ValueError(f"sample {i}: target masks {tuple(targets.shape)} do not match mask size {size}")
            targets = targets.to(device=mask_logits.device, dtype=torch.bool).reshape(-1, size, size)
            slots, s_tgt, pairs, t_idx = self._assign(outputs, i, targets)
            score_idx.append(torch.stack([torch.full_like(slots, i), slots], 1))
            score_tgt.append(s_tgt)
            mask_idx.append(torch.stack([torch.full_like(pairs, i), pairs], 1))
            mask_tgt.append(targets[t_idx])
        score_idx, mask_idx = torch.cat(score_idx), torch.cat(mask_idx)
        score_tgt = torch.cat(score_tgt)
        if score_idx.shape[0] > 0:
            picked = scores[score_idx[:, 0], score_idx[:, 1]].float()
            score = F.binary_cross_entropy_with_logits(picked, score_tgt)
        else:
            score = scores.sum() * 0.0
        pred_masks = mask_logits[mask_idx[:, 0], mask_idx[:, 1]]
        mask, dice = self._mask_losses(pred_masks, torch.cat(mask_tgt).float())
        if mask_idx.shape[0] == 0:  # keep a grad path to every output even without pairs
            mask, dice = mask + mask_logits.sum() * 0.0, dice + mask_logits.sum() * 0.0
        w = self.weights
        total = w.score * score + w.mask * mask + w.dice * dice
        parts = {"score": float(score.detach()), "mask": float(mask.detach()), "dice": float(dice.detach())}
        if w.align > 0 and outputs.text_align_logits is not None:
            align = _align_loss(outputs, target_masks, mask_idx, torch.cat(mask_tgt))
            total = total + w.align * align
            parts["align"] = float(align.detach())
        if labels is not None:
            lm = lm_loss(outputs.logits, labels)
            total = total + w.lm * lm
            parts = {"lm": float(lm.detach()), **parts}
        return LossOutput(total=total, parts=parts)


def category_loss(logits: torch.Tensor, categories: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy of per-token category logits (B, K + 1, h, w) against category maps (B, S, S) long (class 0 no
    object, -1 on samples without a map), the target of a token being the share of each class in its cell.
    0 (still attached to `logits`) when no sample has a map."""
    if categories is None:
        return logits.sum() * 0.0
    has = (categories >= 0).flatten(1).all(1)
    if not bool(has.any()):
        return logits.sum() * 0.0
    classes = logits.shape[1]
    top = int(categories.max())
    if top >= classes:
        raise InputError(f"a category map holds class {top}, but the model's category heads know "
                         f"{classes - 1} (semantic_classes={classes - 1}): set it to the number of categories")
    onehot = F.one_hot(categories[has].to(logits.device), classes).permute(0, 3, 1, 2).float()
    target = F.adaptive_avg_pool2d(onehot, tuple(logits.shape[-2:]))
    return -(target * logits[has].float().log_softmax(1)).sum(1).mean()


def cell_targets(labels: torch.Tensor, classes: int, grid: int) -> torch.Tensor:
    """Label maps (B, S, S) long (0 background, -1 on samples without a map) -> (B, grid * grid) long: per cell
    the class covering most of it, 0 when none covers MIN_WORD_COVER, IGNORE_INDEX on samples without a map."""
    has = (labels >= 0).flatten(1).all(1)
    onehot = F.one_hot(labels.clamp(0, classes - 1), classes).permute(0, 3, 1, 2).float()
    cover = F.adaptive_avg_pool2d(onehot, grid).flatten(2)[:, 1:]  # (B, classes - 1, cells)
    share, best = cover.max(1)
    target = torch.where(share >= MIN_WORD_COVER, best + 1, torch.zeros_like(best))
    return torch.where(has[:, None], target, torch.full_like(target, IGNORE_INDEX))


def word_maps(categories: torch.Tensor | None, attributes: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
    """The label maps each word vocabulary learns from: "category" the category maps, "attribute" the attribute
    maps."""
    return {"category": categories, "attribute": attributes}


def word_losses(word_logits: dict[str, torch.Tensor],
                maps: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """{vocabulary: `word_loss`} for a model's word logits against `word_maps`."""
    return {name: word_loss(logits, maps[name]) for name, logits in word_logits.items()}


def word_loss(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy of one vocabulary's cell logits (B, cells, V) against label maps (B, S, S); 0 (still attached
    to `logits`) when no sample has a map."""
    if labels is None or not bool((labels >= 0).flatten(1).all(1).any()):
        return logits.sum() * 0.0
    classes = logits.shape[-1]
    if int(labels.max()) >= classes:
        raise InputError(f"a label map holds class {int(labels.max())}, but the word slots know {classes - 1} words "
                         "(category_names / attribute_names): list every category and attribute in order")
    grid = int(round(logits.shape[1] ** 0.5))
    targets = cell_targets(labels.to(logits.device), classes, grid)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def _align_loss(outputs: InstructSegOutput, target_masks: list[torch.Tensor], pair_idx: torch.Tensor,
                pair_targets: torch.Tensor) -> torch.Tensor:
    """Grounding loss on the (h, w) token grid, targets as area fractions: the text map learns the union of a
    sample's targets (all zero for no-target samples), each paired object map its own target. Per map: BCE + dice,
    plus an in-image contrastive term: with a softmax over the grid, the mass on the target must be high, so the
    map has to single its target out from the other objects of the image (BCE alone is mostly satisfied by
    "objects vs background")."""
    text = outputs.text_align_logits
    size = tuple(text.shape[-2:])
    union = torch.stack([t.reshape(-1, *t.shape[-2:]).any(0) if t.shape[0] else
                         torch.zeros(outputs.mask_logits.shape[-2:], dtype=torch.bool, device=text.device)
                         for t in target_masks]).to(text.device)
    union = F.adaptive_avg_pool2d(union[:, None].float(), size)[:, 0]
    loss = grounding_map_loss(text, union)
    objects = outputs.object_align_logits[pair_idx[:, 0], pair_idx[:, 1]]
    if objects.shape[0] > 0:
        tgt = F.adaptive_avg_pool2d(pair_targets[:, None].float(), size)[:, 0]
        loss = loss + grounding_map_loss(objects, tgt)
    return loss


def grounding_map_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The grounding loss of maps (M, h, w) against area-fraction targets: BCE + dice + in-image contrastive."""
    return sigmoid_bce(logits, targets) + dice_loss(logits, targets) + grid_contrastive(logits, targets)


def grid_contrastive(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log(softmax mass on the target) per map, averaged over maps with a target; logits, targets (M, h, w)."""
    logits, targets = logits.float().flatten(1), targets.flatten(1)
    has = targets.sum(1) > 0
    if not bool(has.any()):
        return logits.sum() * 0.0
    logits, targets = logits[has], targets[has]
    mass = torch.logsumexp(logits + torch.log(targets.clamp(min=1e-6)), dim=1) - torch.logsumexp(logits, dim=1)
    return -mass.mean()
