"""Losses: LM CE, BCE / dice, Hungarian matching, and `SegmentationLoss` in both slot modes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from instructseg.model.outputs import InstructSegOutput
from instructseg.model.tokens import IGNORE_INDEX
from instructseg.train.losses import (LossWeights, SegmentationLoss, dice_loss, hungarian_match, lm_loss,
                                      sigmoid_bce)

V, L, S = 11, 7, 16


def make_outputs(mask_logits: torch.Tensor, score_logits: torch.Tensor | None = None,
                 valid: torch.Tensor | None = None, batch: int | None = None) -> InstructSegOutput:
    """Leaf tensors requiring grad; padding slots get score -1e4 like the model's."""
    b, n = mask_logits.shape[:2]
    valid = torch.ones(b, n, dtype=torch.bool) if valid is None else valid
    scores = torch.randn(b, n) if score_logits is None else score_logits.clone()
    scores = scores.masked_fill(~valid, -1e4)
    return InstructSegOutput(logits=torch.randn(b, L, V, requires_grad=True),
                             mask_logits=mask_logits.detach().clone().requires_grad_(True),
                             score_logits=scores.detach().requires_grad_(True), object_valid=valid,
                             text_embed=torch.randn(b, 8))


def make_labels(batch: int) -> torch.Tensor:
    labels = torch.full((batch, L), IGNORE_INDEX)
    labels[:, 4:] = torch.randint(0, V, (batch, L - 4))
    return labels


def boxes(k: int, size: int = S, seed: int = 0) -> torch.Tensor:
    """k distinct random rectangles (k, size, size) bool."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(k, size, size, dtype=torch.bool)
    for j in range(k):
        y0, x0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
        h, w = torch.randint(size // 4, size // 2, (2,), generator=g).tolist()
        out[j, y0:y0 + h, x0:x0 + w] = True
    return out


def sharp(targets: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    return (targets.float() * 2 - 1) * scale


def test_lm_loss_matches_manual_shifted_ce():
    torch.manual_seed(0)
    logits = torch.randn(2, L, V, requires_grad=True)
    labels = make_labels(2)
    labels[1, 5] = IGNORE_INDEX
    terms = [F.cross_entropy(logits[b, t][None], labels[b, t + 1][None])
             for b in range(2) for t in range(L - 1) if labels[b, t + 1] != IGNORE_INDEX]
    assert torch.allclose(lm_loss(logits, labels), torch.stack(terms).mean(), atol=1e-6)


def test_lm_loss_without_labels_is_zero_and_differentiable():
    logits = torch.randn(2, L, V, requires_grad=True)
    loss = lm_loss(logits, torch.full((2, L), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None and not logits.grad.any()


def test_bce_and_dice_perfect_vs_inverted():
    targets = boxes(3)
    assert sigmoid_bce(sharp(targets), targets) < 1e-6 and dice_loss(sharp(targets), targets) < 1e-6
    assert sigmoid_bce(-sharp(targets), targets) > 10 and dice_loss(-sharp(targets), targets) > 0.99


@pytest.mark.parametrize("size,num_points", [(S, 0), (96, 0), (S, 256)])
def test_hungarian_recovers_permutation(size, num_points):
    torch.manual_seed(0)
    targets = boxes(4, size)
    perm = torch.tensor([3, 0, 5, 1])  # target j was predicted by slot perm[j]; slots 2 and 4 are noise
    logits = torch.randn(6, size, size) * 3
    logits[perm] = sharp(targets, 5) + torch.randn(4, size, size)
    pred, tgt = hungarian_match(logits, torch.zeros(6), targets, LossWeights(num_points=num_points))
    assert dict(zip(tgt.tolist(), pred.tolist())) == {j: perm[j].item() for j in range(4)}


def test_matching_is_invariant_to_query_order_and_pushes_unmatched_scores_down():
    torch.manual_seed(0)
    targets = [boxes(2, seed=1), torch.zeros(0, S, S, dtype=torch.bool)]
    valid = torch.tensor([[True, True, True, True, False], [True, True, False, False, False]])
    out = make_outputs(torch.randn(2, 5, S, S) * 2, valid=valid)
    loss_fn = SegmentationLoss(LossWeights(), matching=True)
    result = loss_fn(out, make_labels(2), targets)
    result.total.backward()

    perm = torch.tensor([4, 2, 0, 3, 1])
    shuffled = InstructSegOutput(logits=out.logits, mask_logits=out.mask_logits[:, perm],
                                 score_logits=out.score_logits[:, perm], object_valid=valid[:, perm],
                                 text_embed=out.text_embed)
    shuffled_parts = loss_fn(shuffled, None, targets).parts
    for key in ("score", "mask", "dice"):
        assert shuffled_parts[key] == pytest.approx(result.parts[key], rel=1e-5)

    pred, _ = hungarian_match(out.mask_logits[0, :4], out.score_logits[0, :4], targets[0], LossWeights())
    matched = torch.zeros(2, 5, dtype=torch.bool)
    matched[0, pred] = True
    grad = out.score_logits.grad
    assert (grad[valid & ~matched] > 0).all() and (grad[matched] < 0).all() and (grad[~valid] == 0).all()
    assert (out.mask_logits.grad[valid & ~matched].abs().sum() == 0) and out.mask_logits.grad[matched].abs().sum() > 0


def test_slot_order_matters_without_matching():
    targets = boxes(2, seed=2)
    out = make_outputs(sharp(targets, 5)[None], torch.full((1, 2), 3.0))
    loss_fn = SegmentationLoss(LossWeights(), matching=False)
    aligned = loss_fn(out, None, [targets]).total
    swapped = loss_fn(out, None, [targets.flip(0)]).total
    assert swapped > aligned + 1.0


def test_absent_object_learns_score_zero_and_no_mask():
    torch.manual_seed(0)
    targets = boxes(2, seed=3)
    targets[1] = False  # the object of the second [SEG] is not in this frame
    out = make_outputs(torch.randn(1, 3, S, S))  # three [SEG] slots, two targets: only two pairs count
    result = SegmentationLoss(LossWeights(), matching=False)(out, None, [targets])
    result.total.backward()
    assert result.parts["mask"] == pytest.approx(sigmoid_bce(out.mask_logits[0, :1], targets[:1]).item(), rel=1e-5)
    assert result.parts["dice"] == pytest.approx(dice_loss(out.mask_logits[0, :1], targets[:1]).item(), rel=1e-5)
    grad = out.score_logits.grad[0]
    assert grad[0] < 0 and grad[1] > 0 and grad[2] == 0
    assert out.mask_logits.grad[0, 0].abs().sum() > 0 and not out.mask_logits.grad[0, 1:].any()


@pytest.mark.parametrize("matching", [False, True])
def test_no_slots_gives_lm_loss_only(matching):
    out = make_outputs(torch.zeros(2, 0, S, S))
    labels = make_labels(2)
    result = SegmentationLoss(LossWeights(), matching=matching)(out, labels, [boxes(1), torch.zeros(0, S, S)])
    assert torch.allclose(result.total, lm_loss(out.logits, labels))
    result.total.backward()
    assert out.logits.grad.abs().sum() > 0 and out.mask_logits.grad is not None


def test_no_targets_pushes_every_score_down():
    torch.manual_seed(0)
    out = make_outputs(torch.randn(2, 3, S, S))
    empty = torch.zeros(0, S, S, dtype=torch.bool)
    result = SegmentationLoss(LossWeights(), matching=True)(out, None, [empty, empty])
    expected = F.binary_cross_entropy_with_logits(out.score_logits, torch.zeros(2, 3))
    assert result.parts["score"] == pytest.approx(expected.item(), rel=1e-5)
    assert result.parts["mask"] == 0 and result.parts["dice"] == 0 and "lm" not in result.parts
    result.total.backward()
    assert (out.score_logits.grad > 0).all() and not out.mask_logits.grad.any()


def test_point_sampling_approximates_dense_loss():
    torch.manual_seed(0)
    size = 64
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    smooth = torch.stack([(xs - 0.5) * 6, (ys + xs - 0.8) * 4, torch.sin(xs * 6) * 2 + ys])[None]
    targets = torch.stack([xs > 0.35, ys > 0.6, (xs - 0.5) ** 2 + (ys - 0.5) ** 2 < 0.1])
    dense = SegmentationLoss(LossWeights(), matching=False)(make_outputs(smooth), None, [targets]).parts
    uniform = SegmentationLoss(LossWeights(num_points=4096), matching=False, importance=0.0)
    sampled = uniform(make_outputs(smooth), None, [targets]).parts
    for key in ("mask", "dice"):
        assert sampled[key] == pytest.approx(dense[key], rel=0.05)
    importance = SegmentationLoss(LossWeights(num_points=1024), matching=False)(make_outputs(smooth), None, [targets])
    assert importance.parts["mask"] == pytest.approx(dense["mask"], rel=0.15)  # biased towards uncertain pixels
    out = make_outputs(smooth)
    result = SegmentationLoss(LossWeights(num_points=1024), matching=True)(out, None, [targets])
    result.total.backward()
    assert torch.isfinite(result.total) and out.mask_logits.grad.abs().sum() > 0


@pytest.mark.parametrize("matching", [False, True])
def test_gradients_reach_every_output_and_total_is_weighted_sum(matching):
    torch.manual_seed(0)
    valid = torch.tensor([[True, True, False], [True, False, False]])
    out = make_outputs(torch.randn(2, 3, S, S), valid=valid)
    weights = LossWeights(lm=0.5, score=2.0, mask=3.0, dice=4.0, align=0.0)
    result = SegmentationLoss(weights, matching=matching)(out, make_labels(2), [boxes(2, seed=4), boxes(1, seed=5)])
    p = result.parts
    assert set(p) == {"lm", "score", "mask", "dice"}
    expected = 0.5 * p["lm"] + 2.0 * p["score"] + 3.0 * p["mask"] + 4.0 * p["dice"]
    assert result.total.item() == pytest.approx(expected, rel=1e-5)
    result.total.backward()
    for t in (out.logits, out.mask_logits, out.score_logits):
        assert t.grad is not None and t.grad.abs().sum() > 0


def test_wrong_target_resolution_fails_loudly():
    out = make_outputs(torch.randn(1, 1, S, S))
    with pytest.raises(ValueError, match="mask size"):
        SegmentationLoss(LossWeights(), matching=False)(out, None, [boxes(1, size=S * 2)])


def test_tracked_frames_add_their_own_parts():
    torch.manual_seed(0)
    b, r, n, size = 2, 3, 2, 16
    key = torch.randn(b, n, size, size, requires_grad=True)
    tracked = torch.randn(b, r, n, size, size, requires_grad=True)
    out = InstructSegOutput(logits=torch.randn(b, 4, 7), mask_logits=key, score_logits=torch.randn(b, n),
                            object_valid=torch.ones(b, n, dtype=torch.bool), text_embed=torch.randn(b, 8),
                            track_mask_logits=tracked, track_score_logits=torch.randn(b, r, n, requires_grad=True))
    targets = [torch.rand(n, size, size) > 0.5 for _ in range(b)]
    ref_targets = [torch.rand(r, n, size, size) > 0.5 for _ in range(b)]
    loss = SegmentationLoss(LossWeights(), matching=False)
    plain = loss(out, None, targets)
    both = loss(out, None, targets, ref_targets)
    assert set(both.parts) == {"score", "mask", "dice", "track_score", "track_mask", "track_dice"}
    assert both.total.item() > plain.total.item()
    both.total.backward()
    assert tracked.grad.abs().sum() > 0
    # a perfect tracked prediction costs (almost) nothing extra for masks
    perfect = torch.stack([torch.where(t, 20.0, -20.0) for t in ref_targets])
    out.track_mask_logits = perfect
    assert loss(out, None, targets, ref_targets).parts["track_mask"] < 1e-6


def test_grounding_maps_learn_targets_on_the_token_grid():
    """align: the text map learns the union of a sample's targets, each paired object map its own target, on the
    coarse grid; a no-target sample's text map learns to be empty. A map matching the pooled targets costs less
    than its inverse, and gradients reach both maps."""
    torch.manual_seed(0)
    grid = S // 4
    targets = [boxes(2, seed=1), torch.zeros(0, S, S, dtype=torch.bool)]
    pooled = F.adaptive_avg_pool2d(targets[0][:, None].float(), grid)[:, 0]
    union = F.adaptive_avg_pool2d(targets[0].any(0)[None, None].float(), grid)[0, 0]
    good_text = torch.stack([sharp(union > 0.5), torch.full((grid, grid), -20.0)])
    good_obj = torch.stack([sharp(pooled > 0.5), torch.full((2, grid, grid), -20.0)])
    loss = SegmentationLoss(LossWeights(align=1.0), matching=False)
    valid = torch.tensor([[True, True], [True, False]])

    def run(text, objects):
        out = make_outputs(torch.randn(2, 2, S, S), valid=valid)
        out.text_align_logits = text.clone().requires_grad_(True)
        out.object_align_logits = objects.clone().requires_grad_(True)
        result = loss(out, None, targets)
        return out, result

    out, good = run(good_text, good_obj)
    _, bad = run(-good_text, -good_obj)
    assert "align" in good.parts and good.parts["align"] < bad.parts["align"]
    good.total.backward()
    assert out.text_align_logits.grad.abs().sum() > 0
    assert out.object_align_logits.grad[0].abs().sum() > 0 and out.object_align_logits.grad[1].abs().sum() == 0
    off = SegmentationLoss(LossWeights(align=0.0), matching=False)(run(good_text, good_obj)[0], None, targets)
    assert "align" not in off.parts


def testgrid_contrastive_term_prefers_singling_out_the_target():
    """A map that lights up the target and another object alike costs more than one that lights the target only
    (BCE + dice alone can barely tell them apart on a fine grid; the contrastive term can)."""
    from instructseg.train.losses import grid_contrastive

    target = torch.zeros(1, 8, 8)
    target[0, 1:3, 1:3] = 1
    other = torch.zeros(1, 8, 8)
    other[0, 5:7, 5:7] = 1
    only = sharp(target > 0)
    both = sharp((target + other) > 0)
    assert grid_contrastive(only, target) < 0.01
    assert grid_contrastive(both, target) > 0.6  # half the mass sits on the other object: -log(0.5)
    assert grid_contrastive(both, torch.zeros(1, 8, 8)) == 0  # no target: no term


def test_category_heads_learn_the_pooled_category_map():
    """category: logits that match each token's class share cost less than wrong ones; samples without a map
    (-1) add nothing; without maps in the batch the heads still get a (zero) gradient path; a class beyond the
    heads is a clear error."""
    from instructseg.errors import InputError

    classes = torch.zeros(2, S, S, dtype=torch.long)
    classes[0, :8, :8] = 2
    classes[0, 8:, 8:] = 1
    classes[1] = -1  # no map for the second sample
    grid = S // 4
    pooled = F.adaptive_avg_pool2d(F.one_hot(classes[0], 3).permute(2, 0, 1).float()[None], grid)[0]
    loss = SegmentationLoss(LossWeights(category=1.0), matching=False)

    def run(logits, maps):
        out = make_outputs(torch.randn(2, 1, S, S))
        out.vision_class_logits = logits.clone().requires_grad_(True)
        out.decoder_class_logits = logits.clone().requires_grad_(True)
        return out, loss(out, None, [torch.zeros(1, S, S, dtype=torch.bool)] * 2, None, maps)

    good = torch.stack([pooled.log(), torch.zeros(3, grid, grid)]).clamp(min=-20)
    out, result = run(good, classes)
    _, bad = run(-good, classes)
    assert result.parts["category_vision"] < bad.parts["category_vision"]
    assert result.parts["category_decoder"] == pytest.approx(result.parts["category_vision"])
    entropy = -(pooled * pooled.clamp(min=1e-9).log()).sum(0).mean()  # the least the loss can be
    assert result.parts["category_vision"] == pytest.approx(float(entropy), abs=1e-4)
    result.total.backward()
    assert out.vision_class_logits.grad[0].abs().sum() > 0 and out.vision_class_logits.grad[1].abs().sum() == 0
    out, none = run(good, None)
    assert "category_vision" not in none.parts
    none.total.backward()
    assert out.decoder_class_logits.grad is not None
    classes[0, 0, 0] = 3
    with pytest.raises(InputError, match="class 3, but the model's category heads know 2"):
        run(good, classes)


def test_word_slots_learn_each_cells_main_object():
    """cell_targets: per cell the class covering most of it, background when nothing covers 5 %, ignored for a
    sample without a map; word_loss is small for logits naming them and large otherwise; SegmentationLoss adds it
    per vocabulary ("words_attribute" from the attribute maps, "words_category" from the category maps)."""
    from instructseg.errors import InputError
    from instructseg.train.losses import cell_targets, word_loss

    labels = torch.zeros(2, 16, 16, dtype=torch.long)
    labels[0, :8, :8] = 2  # cell 0 all class 2
    labels[0, 8:10, 8:10] = 1  # cell 3: 4 of 64 pixels (6 %) class 1
    labels[0, 0, 8] = 1  # cell 1: 1 pixel (2 %): background
    labels[1] = -1
    targets = cell_targets(labels, 3, 2)
    assert targets.tolist() == [[2, 0, 0, 1], [IGNORE_INDEX] * 4]
    good = F.one_hot(targets[0].clamp(min=0), 3).float()[None].repeat(2, 1, 1) * 20
    assert word_loss(good, labels) < 1e-3 < word_loss(-good, labels)
    assert word_loss(good, None) == 0 and word_loss(good, torch.full_like(labels, -1)) == 0
    with pytest.raises(InputError, match="class 3, but the word slots know 2 words"):
        word_loss(good, labels.clamp(min=0) + 1)
    out = make_outputs(torch.randn(2, 1, S, S))
    out.word_logits = {"attribute": good.clone().requires_grad_(True), "category": (-good).requires_grad_(True)}
    result = SegmentationLoss(LossWeights(), matching=False)(out, None, [torch.zeros(1, S, S, dtype=torch.bool)] * 2,
                                                             None, labels, labels)
    assert result.parts["words_attribute"] < 1e-3 and result.parts["words_category"] > 10
    result.total.backward()
    assert out.word_logits["category"].grad[0].abs().sum() > 0 and out.word_logits["category"].grad[1].abs().sum() == 0
