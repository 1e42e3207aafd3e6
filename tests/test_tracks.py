"""The track choice: tracked parts of a video mask described by their tracks (instructseg.decoders.tracks), scored
by the track prior and fitted on ground-truth tracks (instructseg.train.track_fit), then cleared from the masks
(instructseg.inference.track_choice)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from instructseg.decoders.tracks import ABSOLUTE, RELATIVE, TRACK_FEATURES, choose, mask_summary, track_features
from instructseg.errors import InputError
from instructseg.inference.track_choice import CELL, TrackChoice


def _moving_square(frames: int = 6, size: int = 40, step: int = 3, start: int = 2, enter_at: int = 0) -> np.ndarray:
    masks = np.zeros((frames, size, size), bool)
    for t in range(enter_at, frames):
        x = start + step * t
        masks[t, 10:18, max(x, 0):max(x + 8, 0)] = True
    return masks


def test_a_track_summary_reads_where_a_part_goes():
    right = mask_summary(_moving_square(step=3))
    left = mask_summary(_moving_square(step=-3, start=28))
    assert right.shape == (ABSOLUTE,)
    assert right[4] > 0 > left[4]                       # net dx: right, left
    assert abs(right[5]) < 1e-6 and right[6] > 0        # no vertical motion; a path
    assert right[0] < right[2] and left[0] > left[2]    # start x / end x
    assert right[8] == 0 and right[9] == 0              # in the picture first and last
    late = mask_summary(_moving_square(enter_at=2))
    assert late[8] == 1 and late[9] == 0                # enters
    still = mask_summary(_moving_square(step=0, start=5))
    assert abs(still[4]) < 1e-6 and abs(still[6]) < 1e-6
    assert mask_summary(np.zeros((4, 8, 8), bool)) is None
    feats = track_features(np.stack([right, left, still]))
    assert feats.shape == (3, TRACK_FEATURES)
    assert np.allclose(feats[:, ABSOLUTE:].sum(0), 0, atol=1e-5)  # relative to the parts' mean
    assert np.allclose(feats[:, ABSOLUTE:], feats[:, :RELATIVE] - feats[:, :RELATIVE].mean(0), atol=1e-6)


def test_choose_drops_only_parts_scored_low_and_well_below_the_best():
    assert choose(np.array([-2.5, 1.0, -1.5])).tolist() == [False, True, True]
    assert choose(np.array([-7.0, -4.5, -9.0])).tolist() == [False, True, False]
    assert choose(np.array([-5.0, -5.5, -4.0])).tolist() == [True, True, True]   # alike: all kept
    assert choose(np.array([3.0, 0.5])).tolist() == [True, True]


def test_a_choice_clears_the_dropped_parts_and_regions_away_from_the_kept_ones():
    logits = torch.full((1, 2, 16, 16), -5.0)
    logits[0, :, 0:4, 0:4] = 2.0     # the kept part
    logits[0, :, 8:12, 8:12] = 2.0   # the dropped part, tracked here
    logits[0, :, 13:16, 0:3] = 2.0   # a region no part was tracked to
    cells = lambda *where: torch.tensor([[(r, c) in where for c in range(4)] for r in range(4)])  # noqa: E731
    choice = TrackChoice(kept={1: {3: cells((0, 0)), 4: cells()}}, dropped={1: {3: cells((2, 2)), 4: cells((2, 2))}})
    out = choice.apply(3, logits)
    assert (out[0, 1, 0:4, 0:4] > 0).all()                                    # kept
    assert (out[0, 1, 8:12, 8:12] < 0).all() and (out[0, 1, 13:, :3] < 0).all()  # dropped; away from the kept part
    assert torch.equal(out[0, 0], logits[0, 0])                               # other objects: as they were
    lost = choice.apply(4, logits)  # the kept part not seen on this frame: only the dropped part goes
    assert (lost[0, 1, 8:12, 8:12] < 0).all() and (lost[0, 1, 13:, :3] > 0).all() and (lost[0, 1, :4, :4] > 0).all()
    assert torch.equal(choice.apply(5, logits), logits) and torch.equal(TrackChoice().apply(3, logits), logits)
    assert float(logits.max()) == 2.0 and float(logits[0, 1, 9, 9]) == 2.0   # the input is not changed


def test_parts_are_followed_by_where_they_head_not_by_look():
    """Two look-alike squares pass each other: each part keeps its own square."""
    from instructseg.inference.track_choice import PartTracks

    size, frames = 64, 8
    def square(x, y):
        m = np.zeros((size, size), bool)
        m[y:y + 8, x:x + 8] = True
        return m
    right = [square(4 + 6 * t, 10) for t in range(frames)]
    left = [square(52 - 6 * t, 18) for t in range(frames)]   # touching while they pass: one region there
    labels = right[0].astype(np.int64) + 2 * left[0]
    tracks = PartTracks(labels, 2, frames)
    tracks.start(0)
    for t in range(1, frames):
        tracks.follow(t, right[t] | left[t])
    assert np.all(np.diff(tracks.centres[0, :, 0][tracks.areas[0] > 0]) > 0)   # part 1 keeps moving right
    assert np.all(np.diff(tracks.centres[1, :, 0][tracks.areas[1] > 0]) < 0)   # part 2 keeps moving left
    assert tracks.areas[0, -1] > 0 and tracks.areas[1, -1] > 0
    assert tracks.cover[frames - 1][0].any() and not (tracks.cover[frames - 1][0] & tracks.cover[frames - 1][1]).any()


def test_tracks_started_on_another_frame_join_after_the_first():
    """A square seen from frame 0 and one that appears on frame 4: the second starts its own tracks there, followed
    both ways, and `extend` puts it after the first (its areas zero before it appears, masks numbered after)."""
    from instructseg.inference.track_choice import PartTracks

    size, frames = 32, 8
    still = np.zeros((size, size), bool)
    still[2:8, 2:8] = True
    late = np.zeros((size, size), bool)
    late[20:26, 20:26] = True
    regions = {t: [still] + ([late] if t >= 4 else []) for t in range(frames)}

    def followed(t, starts):
        tracks = PartTracks(sum((p + 1) * m for p, m in enumerate(starts)), len(starts), frames, keep_masks=True)
        for order in (range(t + 1, frames), range(t - 1, -1, -1)):
            tracks.start(t)
            for u in order:
                tracks.follow_regions(u, regions[u])
        return tracks

    tracks = followed(0, [still])
    tracks.extend(followed(4, [late]))
    assert tracks.count == 2 and tracks.areas.shape == (2, frames) and tracks.centres.shape == (2, frames, 2)
    assert (tracks.areas[0] > 0).all() and (tracks.areas[1, :4] == 0).all() and (tracks.areas[1, 4:] > 0).all()
    assert set(tracks.masks[2]) == {0} and set(tracks.masks[6]) == {0, 1}
    assert np.array_equal(np.unpackbits(tracks.masks[6][1], count=size * size).reshape(size, size).astype(bool), late)
    assert tracks.cover[6].shape[0] == 2 and tracks.cover[2].shape[0] == 2 and not tracks.cover[2][1].any()


def _tiny_with_track_prior():
    from instructseg.config import preset
    from instructseg.model.instructseg import InstructSegModel

    torch.manual_seed(0)
    return InstructSegModel(preset("tiny").override(["decoder.track_prior=true"])).eval()


def test_the_fit_on_ground_truth_tracks_lowers_the_loss(synth_root):
    from instructseg.data.formats.revos import read_revos
    from instructseg.train.recipe import DataSource
    from instructseg.train.track_fit import exact_choices, fit_tracks, track_loss, track_rows

    model = _tiny_with_track_prior()
    expressions = read_revos(synth_root / "revos", "train") + read_revos(synth_root / "revos", "valid")
    rows = track_rows(model, expressions)
    assert len(rows) > 0 and rows.features.shape[1:] == (rows.valid.shape[1], TRACK_FEATURES)
    assert (rows.valid.sum(1) >= 2).all() and ((rows.labels * rows.valid).sum(1) >= 1).all()
    stage = SimpleNamespace(steps=60, lr=1e-2, warmup_steps=1, batch_size=16,
                            data=[DataSource(kind="revos", root=str(synth_root / "revos"), split="train"),
                                  DataSource(kind="refcoco", root=str(synth_root / "refcoco"), split="train")])
    count, losses = fit_tracks(model, stage, seed=0)
    assert count > 0 and len(losses) == 60
    assert np.mean(losses[-10:]) < losses[0]
    assert float(model.track_prior.linear.weight.detach().abs().max()) > 0
    assert 0.0 <= exact_choices(model.track_prior, rows) <= 1.0
    with torch.no_grad():
        assert float(track_loss(model.track_prior, rows)) < losses[0]
    stage.data = stage.data[1:]
    with pytest.raises(InputError, match="prior.data has no revos source"):
        fit_tracks(model, stage, seed=0)


def test_the_track_head_combines_words_that_a_linear_head_cannot():
    """"starts on the left" weighs the start x, "moving left" the motion: both share "left". Words are made as bags
    of four one-hot tokens (starts / moving, left / right); each row has two parts, one meant. A linear map of the
    bag gives "left" one fixed contribution and cannot rank all four; the track prior's hidden layer can."""
    from instructseg.model.track_prior import TrackPrior
    from instructseg.model.word_linear import WordLinear
    from instructseg.train.prior_stage import fit_head
    from instructseg.train.track_fit import TrackRows, exact_choices, track_loss

    width, feats = 8, torch.zeros(4, 2, TRACK_FEATURES)
    words = torch.zeros(4, width)
    labels = torch.tensor([[1.0, 0.0]] * 4)
    for i, (verb, side) in enumerate([(0, 2), (0, 3), (1, 2), (1, 3)]):  # starts/moving x left/right
        words[i, verb] = words[i, side] = 1.0
        sign = -1.0 if side == 2 else 1.0
        # the meant part starts (or moves) to the named side, the other one the opposite way; the unnamed feature
        # points the wrong way so that it cannot stand in for the named one
        column, other = (0, 4) if verb == 0 else (4, 0)
        feats[i, 0, column], feats[i, 1, column] = sign, -sign
        feats[i, 0, other], feats[i, 1, other] = -sign, sign
    rows = TrackRows(words, feats, labels, torch.ones(4, 2, dtype=torch.bool))
    stage = SimpleNamespace(steps=300, lr=3e-2, warmup_steps=1, batch_size=4)
    results = {}
    heads = {"hidden": TrackPrior(width=width), "linear": WordLinear(width=width, out=TRACK_FEATURES + 1)}
    for name, head in heads.items():
        torch.manual_seed(0)
        head.set_statistics(words)
        losses = fit_head(head, rows, track_loss, stage, seed=0, log_path=None, name=name)
        results[name] = (np.mean(losses[-10:]), exact_choices(head, rows))
    assert results["hidden"][0] < 0.05 and results["hidden"][1] == 1.0
    assert results["linear"][0] > 0.3
    # the hidden layer starts the same whatever the global random state (a refit reproduces its weights)
    torch.manual_seed(1)
    first = TrackPrior(width=width).hidden[0].weight
    torch.manual_seed(2)
    assert torch.equal(TrackPrior(width=width).hidden[0].weight, first)


def test_parts_follow_only_regions_of_their_own_colour():
    """A red region is hidden on frame 2 while a blue one shows up where it was heading: without colours the part
    jumps onto the blue region, with them it waits and takes the red one again on frame 3."""
    from instructseg.inference.track_choice import PartTracks

    size, frames = 32, 4
    def square(x):
        m = np.zeros((size, size), bool)
        m[10:16, x:x + 6] = True
        return m
    red, blue = np.array([0.86, 0.12, 0.12]), np.array([0.12, 0.27, 0.9])
    shown = {1: ([square(6)], [red]), 2: ([square(10)], [blue]), 3: ([square(12)], [red])}
    for colours, expected in ((None, [1, 1, 1]), (np.array([red]), [1, 0, 1])):
        tracks = PartTracks(square(2).astype(np.int64), 1, frames, colours=colours, colour_gap=0.235)
        tracks.start(0)
        for t in range(1, frames):
            tracks.follow_regions(t, shown[t][0], np.array(shown[t][1]))
        assert [int(tracks.areas[0, t] > 0) for t in range(1, frames)] == expected, colours
