"""The track choice: of the parts of each object's video mask, keep the ones the instruction means by their tracks.

A video mask for "the blue shape moving right" often covers every blue shape, and which one moves right shows over
the clip, not on one frame. With a track prior (`instructseg.model.track_prior`), before the video is propagated,
each connected part of an object's mask on the first key frame (`instructseg.decoders.parts.mask_parts`) is followed
through the video in the object's own decodes of each frame (no memory), region by region (`PartTracks`). (SAM2's
memory, given one part's mask, follows its look-alikes too: with two red circles, the tracks of both parts cover
both circles within four frames.)
Each part's track is summed up (`instructseg.decoders.tracks`), the instruction's weights score it, and the parts
not kept (`tracks.choose`) are cleared from the object's masks on every frame (`TrackChoice.apply`). Objects whose
first key-frame mask has one part are left as they are. When some object has parts, it costs one more decoding of
every frame without memory; the frames it encodes (up to `KEEP_FEATURES`) are handed on to the propagation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from instructseg.decoders.base import DecoderOutput, Prompts
from instructseg.decoders.parts import mask_parts
from instructseg.decoders.tracks import choose, track_features, track_summary

CELL = 4  # the parts' tracks are kept as masks at 1/CELL of the decoder's size (rounded up), grown by one cell


@dataclass
class TrackChoice:
    """Per object with a choice, per frame: `kept[n][t]` and `dropped[n][t]`, the kept and the dropped parts' tracked
    masks, (s, s) bool at 1/CELL of the decoder's size, grown by one cell."""

    kept: dict[int, dict[int, torch.Tensor]] = field(default_factory=dict)
    dropped: dict[int, dict[int, torch.Tensor]] = field(default_factory=dict)

    def apply(self, t: int, mask_logits: torch.Tensor) -> torch.Tensor:
        """`mask_logits` (1, N, S, S) of frame t with the dropped parts set below 0: where a kept part is tracked
        on this frame, every connected region of the mask that does not touch it, and the dropped parts' pixels
        outside it; elsewhere the dropped parts' pixels only."""
        if not self.dropped:
            return mask_logits
        out = mask_logits.clone()
        size = mask_logits.shape[-2:]
        grow = lambda cells: F.interpolate(cells[None, None].float(), size=size, mode="nearest")[0, 0] > 0  # noqa: E731
        for n, frames in self.dropped.items():
            if t not in frames:
                continue
            kept, dropped = grow(self.kept[n][t]), grow(frames[t])
            clear = dropped & ~kept
            if bool(kept.any()):
                labels, _ = ndimage.label((out[0, n] > 0).cpu().numpy())
                touching = np.unique(labels[kept.cpu().numpy()])
                clear |= torch.from_numpy(np.isin(labels, touching[touching > 0], invert=True) & (labels > 0))
            out[0, n] = torch.where(clear.to(out.device), out[0, n].clamp(max=-1.0), out[0, n])
        return out


GATE = 0.25  # a part follows a region of the next frame whose centre is at most this far (frame fractions) from
             # where the part was heading


class PartTracks:
    """The parts of one object's key-frame mask followed through the frames of the object's own decodes: on each
    frame the mask's regions (connected, specks left out) are matched one to one with the parts by the distance
    from where each part was heading (its last centre plus its last step), within `GATE`, and, given colours,
    only with regions of the part's own colour."""

    def __init__(self, labels: np.ndarray, count: int, num_frames: int, *, keep_masks: bool = False,
                 colours: np.ndarray | None = None, colour_gap: float = 0.0):
        self.count = count
        # with colours ((count, 3), in [0, 1]), a part follows only regions whose colour (given to follow_regions)
        # is within colour_gap of its own on every channel
        self.colours, self.colour_gap = colours, colour_gap
        self.areas = np.zeros((count, num_frames))
        self.centres = np.zeros((count, num_frames, 2))
        self.cover: dict[int, np.ndarray] = {}
        self.key = [labels == p + 1 for p in range(count)]
        # with keep_masks, masks[t][p]: part p's region on frame t (np.packbits of the flattened mask)
        self.masks: dict[int, dict[int, np.ndarray]] | None = {} if keep_masks else None

    def start(self, t: int) -> None:
        self.last = np.full((self.count, 2), np.nan)
        self.step = np.zeros((self.count, 2))
        self._record(t, list(range(self.count)), self.key)

    def follow(self, t: int, on: np.ndarray) -> None:
        labels, _ = mask_parts(np.where(on, 1.0, -1.0), min_parts=1)
        self.follow_regions(t, [labels == r for r in range(1, int(labels.max()) + 1)])

    def follow_regions(self, t: int, regions: list[np.ndarray], colours: np.ndarray | None = None) -> None:
        """Match frame t's `regions` (masks, the key frame's size; their colours (R, 3)) with the parts."""
        if not regions:
            self.last += self.step
            return
        centres = np.array([_centre(r) for r in regions])
        aim = self.last + self.step
        cost = np.linalg.norm(aim[:, None] - centres[None], axis=-1)
        cost = np.where(np.isnan(cost), 1e3, cost)
        if self.colours is not None and colours is not None:
            cost = np.where(np.abs(self.colours[:, None] - colours[None]).max(-1) > self.colour_gap, 1e3, cost)
        rows, cols = linear_sum_assignment(cost)
        hits = [(p, r) for p, r in zip(rows, cols) if cost[p, r] <= GATE]
        missed = [p for p in range(self.count) if p not in {q for q, _ in hits}]
        self.last[missed] += self.step[missed]
        self._record(t, [p for p, _ in hits], [regions[r] for _, r in hits])

    def extend(self, other: "PartTracks") -> None:
        """Take `other`'s parts (the same frames and size; started on another frame) after these."""
        n = self.count
        self.count += other.count
        self.areas = np.concatenate([self.areas, other.areas])
        self.centres = np.concatenate([self.centres, other.centres])
        self.key += other.key
        both = self.colours is not None and other.colours is not None  # (otherwise no part is held to its colour)
        self.colours = np.concatenate([self.colours, other.colours]) if both else None
        for t in set(self.cover) | set(other.cover):
            mine, theirs = self.cover.get(t), other.cover.get(t)
            self.cover[t] = np.concatenate([mine if mine is not None else self._no_cover(n),
                                            theirs if theirs is not None else self._no_cover(other.count)])
        if self.masks is not None:
            for t, parts in (other.masks or {}).items():
                self.masks.setdefault(t, {}).update({n + p: packed for p, packed in parts.items()})

    def _no_cover(self, count: int) -> np.ndarray:
        """The cover of `count` parts on a frame where none is seen: (count, h / CELL, w / CELL) False."""
        h, w = self.key[0].shape
        return np.zeros((count, -(-h // CELL), -(-w // CELL)), bool)

    def _record(self, t: int, parts: list[int], masks: list[np.ndarray]) -> None:
        cover = self._no_cover(self.count)
        for p, m in zip(parts, masks):
            c = np.array(_centre(m))
            if not np.isnan(self.last[p]).any():
                self.step[p] = c - self.last[p]
            self.last[p] = c
            self.areas[p, t] = m.mean()
            self.centres[p, t] = c
            if self.masks is not None:
                self.masks.setdefault(t, {})[p] = np.packbits(m)
            cover[p] = F.max_pool2d(torch.from_numpy(m)[None, None].float(), CELL, ceil_mode=True)[0, 0].numpy() > 0
        self.cover[t] = cover


def _centre(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return (xs.mean() + 0.5) / mask.shape[1], (ys.mean() + 0.5) / mask.shape[0]


KEEP_FEATURES = 64  # frames whose decoder features the choice hands on to the propagation (about 1.6 MiB each)


def decode_alone(decoder, frame_at, t: int, key_prompts: dict[int, Prompts], key_features: dict, objects,
                 keep: dict | None = None) -> DecoderOutput:
    """Frame t decoded without memory with the nearest key frame's prompts for `objects` (indices or a slice); its
    features are the key frame's, or encoded from `frame_at(t)` and put into `keep` (the propagation's cache)
    while it holds fewer than KEEP_FEATURES frames."""
    features = key_features[t] if t in key_features else decoder.encode(frame_at(t))
    if keep is not None and t not in keep and len(keep) < KEEP_FEATURES:
        keep[t] = features
    near = min(key_prompts, key=lambda k: (abs(k - t), k))
    return decoder.decode(features, key_prompts[near].objects(objects))


def choose_tracks(decoder, frame_at, num_frames: int, key_prompts: dict[int, Prompts], key_features: dict,
                  weights: torch.Tensor, keep: dict | None = None) -> TrackChoice:
    """The choice for the objects of `key_prompts` (decoded from `key_features` on the key frames; other frames are
    encoded from `frame_at` and decoded with the nearest key frame's prompts), with `weights` (N, TRACK_FEATURES + 1)
    per object (the track prior's). The features it encodes go into `keep` (the propagation's cache, which consumes
    them) while it holds fewer than KEEP_FEATURES frames, so that those frames are not encoded twice."""
    first = min(key_prompts)
    logits = decoder.decode(key_features[first], key_prompts[first]).mask_logits[0]
    tracks = {}
    for n in range(logits.shape[0]):
        labels, feats = mask_parts(logits[n].float().cpu().numpy())
        if feats.shape[0]:
            tracks[n] = PartTracks(labels, feats.shape[0], num_frames)
    choice = TrackChoice()
    if not tracks:
        return choice
    objects = sorted(tracks)
    for frames in (range(first, num_frames), range(first - 1, -1, -1)):
        for part_tracks in tracks.values():
            part_tracks.start(first)
        for t in frames:
            if t == first:
                continue
            out = decode_alone(decoder, frame_at, t, key_prompts, key_features, objects, keep)
            on = (out.mask_logits[0] > 0).cpu().numpy()
            for i, n in enumerate(objects):
                tracks[n].follow(t, on[i])
    for n, part_tracks in tracks.items():
        summaries = [track_summary(part_tracks.areas[p], part_tracks.centres[p]) for p in range(part_tracks.count)]
        feats = torch.from_numpy(track_features(np.stack(summaries)))  # every part is seen on the key frame
        w = weights[n].float().cpu()
        kept = choose((feats @ w[:-1] + w[-1]).numpy())
        if kept.all():
            continue
        for into, parts in ((choice.kept, kept), (choice.dropped, ~kept)):
            into[n] = {t: F.max_pool2d(torch.from_numpy(c[parts].any(0))[None, None].float(), 3, stride=1,
                                       padding=1)[0, 0] > 0 for t, c in part_tracks.cover.items()}
    return choice
