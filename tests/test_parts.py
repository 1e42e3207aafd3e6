"""The part choice: each mask's connected parts weighed by the part prior's weights (instructseg.decoders.parts,
instructseg.model.part_prior) and fitted by the prior stage (fit_parts)."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from instructseg.decoders.parts import PART_FEATURES, choose_parts, mask_parts, part_offsets


def _two_squares(size: int = 64) -> np.ndarray:
    logits = -np.ones((size, size), np.float32)
    logits[4:24, 4:24] = 3.0      # the large part, top left
    logits[40:50, 44:54] = 2.0    # the small part, bottom right
    logits[60, 2] = 1.0           # a speck: not a part
    return logits


def test_mask_parts_describes_each_part_relative_to_the_others():
    labels, feats = mask_parts(_two_squares())
    assert feats.shape == (2, PART_FEATURES)
    assert set(np.unique(labels)) == {0, 1, 2} and labels[60, 2] == 0  # the speck is left out
    large, small = labels[10, 10], labels[45, 50]
    assert {large, small} == {1, 2}
    f_large, f_small = feats[large - 1], feats[small - 1]
    assert np.isclose(f_large[0] - f_small[0], np.log(400 / 100), atol=1e-5)  # log area ratio
    assert f_large[1] < 0 < f_small[1] and f_large[2] < 0 < f_small[2]     # left / right, top / bottom
    assert np.allclose(feats.sum(0), 0, atol=1e-5)                          # relative to the parts' mean
    one = -np.ones((32, 32), np.float32)
    one[5:15, 5:15] = 1.0
    assert mask_parts(one)[1].shape == (0, PART_FEATURES)                   # one part: nothing to choose
    assert mask_parts(-one)[1].shape == (0, PART_FEATURES)


def test_choose_parts_drops_a_part_and_never_grows_the_mask():
    logits = torch.from_numpy(_two_squares())[None, None].repeat(1, 3, 1, 1)
    weights = torch.tensor([[[5.0, 0, 0], [-5.0, 0, 0], [0, 0, 0]]])  # "large", "small", neither
    valid = torch.tensor([[True, True, False]])
    out = choose_parts(logits, weights, valid)
    large, small = (slice(4, 24), slice(4, 24)), (slice(40, 50), slice(44, 54))
    assert bool((out[0, 0][large] > 0).all()) and bool((out[0, 0][small] <= 0).all())
    assert bool((out[0, 1][large] <= 0).all()) and bool((out[0, 1][small] > 0).all())
    assert torch.equal(out[0, 2], logits[0, 2])  # an invalid slot is left as it is
    for n in range(2):
        assert not bool(((out[0, n] > 0) & (logits[0, n] <= 0)).any())  # no pixel outside the parts turns on
    assert out[0, 0, 60, 2] == logits[0, 0, 60, 2]  # nor does the speck move


def test_part_offsets_gather_each_parts_dot_product():
    labels = torch.tensor([[[0, 1], [2, 2]]])
    feats = torch.tensor([[[1.0, 0, 0], [0, 2.0, 0]]])
    out = part_offsets(labels, feats, torch.tensor([[3.0, 5.0, 7.0]]))
    assert out.tolist() == [[[0.0, 3.0], [10.0, 10.0]]]


def test_fit_parts_learns_which_words_mean_the_large_part():
    """A synthetic collection: every mask covers a large and a small square, "large" sentences want the large one,
    "small" ones the small one; the fitted prior picks the right part for each (and the loss falls)."""
    from instructseg.model.part_prior import PartPrior
    from instructseg.train.prior_stage import PriorCache, fit_parts, part_loss, part_rows
    from instructseg.train.recipe import PriorStage

    torch.manual_seed(0)
    width, m, s = 16, 40, 32
    large_word, small_word = torch.randn(width), torch.randn(width)
    which = torch.arange(m) % 2  # 0: "large", 1: "small"
    words = torch.where(which[:, None] == 0, large_word, small_word) + 0.05 * torch.randn(m, width)
    masks = torch.full((m, s, s), -4.0)
    masks[:, 2:14, 2:14] = 4.0
    masks[:, 20:26, 20:26] = 4.0
    targets = torch.zeros(m, s, s)
    targets[which == 0, 2:14, 2:14] = 1.0
    targets[which == 1, 20:26, 20:26] = 1.0
    cache = PriorCache(words=words, cosine=torch.zeros(m, 4, 4), masks=masks, mask_targets=targets,
                       grid_targets=torch.zeros(m, 4, 4))

    class Model:  # what fit_parts reads: the two heads
        position_prior = None
        part_prior = PartPrior(width=width)

    model = Model()
    rows = part_rows(None, cache)
    assert rows is not None and rows.words.shape[0] == m and rows.features.shape == (m, 2, PART_FEATURES)
    with torch.no_grad():
        before = float(part_loss(model.part_prior, rows))
    count, losses = fit_parts(model, cache, PriorStage(steps=80, batch_size=16, lr=5e-2, warmup_steps=1), seed=0)
    assert count == m and len(losses) == 80
    with torch.no_grad():
        after = float(part_loss(model.part_prior, rows))
        weights = model.part_prior(words[:, None], torch.ones(m, 1, dtype=torch.bool))
        chosen = choose_parts(masks[:, None], weights, torch.ones(m, 1, dtype=torch.bool))[:, 0] > 0
    assert after < 0.5 * before, (before, after)
    assert bool((chosen == targets.bool()).all())
    assert bool((weights[which == 0, 0, 0] > 0).all()) and bool((weights[which == 1, 0, 0] < 0).all())


def test_a_model_with_a_part_prior_weighs_the_parts_of_still_images_only(synth_root):
    """With the answer given ("It is [SEG]."), a still image's prompts carry the part prior's weights and the
    decoder applies them to its masks; a video's prompts carry none."""
    from instructseg.config import preset
    from instructseg.inference.io import open_source
    from instructseg.inference.predictor import InstructSegPredictor
    from instructseg.model.instructseg import InstructSegModel

    torch.manual_seed(0)
    model = InstructSegModel(preset("tiny").override(["decoder.part_prior=true"])).eval()
    with torch.no_grad():
        model.part_prior.linear.bias.copy_(torch.tensor([1.0, 0.5, -0.5]))
    predictor = InstructSegPredictor(model)
    image = open_source(next((synth_root / "refcoco" / "images").iterdir()))
    video = open_source(next((synth_root / "revos" / "JPEGImages").iterdir()))
    with torch.no_grad():
        inputs = predictor._inputs(image, 0, "segment the red circle", "It is [SEG].", [])
        features = model.decoder.encode(inputs.frames)
        prompts = model.condition(inputs, features)
        assert prompts.part_weights is not None
        assert torch.allclose(prompts.part_weights, torch.tensor([[[10.0, 5.0, -5.0]]]))
        weighed = model.decoder.decode(features, prompts).mask_logits
        plain = model.decoder.decode(features, dataclasses.replace(prompts, part_weights=None)).mask_logits
        expected = choose_parts(plain, prompts.part_weights, prompts.object_valid)
        assert torch.allclose(weighed, expected)
        inputs = predictor._inputs(video, 0, "segment the red circle", "It is [SEG].", [])
        assert model.condition(inputs, model.decoder.encode(inputs.frames)).part_weights is None


def test_fit_parts_leaves_the_position_prior_as_it_is(synth_root):
    """The part fit reads the masks with the position prior applied; the position prior, in training mode with
    trainable weights (as in a recipe run), keeps its weights and running statistics."""
    from instructseg.config import preset
    from instructseg.model.instructseg import InstructSegModel
    from instructseg.train.prior_stage import collect, fit_parts
    from instructseg.train.recipe import DataSource, PriorStage

    torch.manual_seed(0)
    model = InstructSegModel(preset("tiny").override(["decoder.position_prior=4", "decoder.part_prior=true"]))
    with torch.no_grad():
        model.decoder.sam.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(20.0)  # every object present
    cache = collect(model, [DataSource(kind="refcoco", root=str(synth_root / "refcoco"))], 8, seed=0,
                    device=torch.device("cpu"))
    model.train()
    before = {k: v.clone() for k, v in model.position_prior.state_dict().items()}
    fit_parts(model, cache, PriorStage(steps=3, batch_size=8), seed=0)
    after = model.position_prior.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.position_prior.training
