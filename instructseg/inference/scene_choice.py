"""The scene choice: every object of the scene is a candidate, not only those under the instruction's mask.

Questions about a clip ("Which shape enters the scene?", "the shape that moves fastest", "Which shape is the
smallest?") and referring expressions ("the large shape moving left", "the small square that starts on the right")
tell the target by what it does over the clip. On one frame the decoder cannot see that, and its mask often lies on
another object altogether; the track choice (`instructseg.inference.track_choice`) only drops parts of the mask, so
it cannot move it. The track prior reads these words well: given every object's ground-truth track on ShapesIVS
valid, its best object is the target in 114 of 124 such questions (docs/default_model.md, "A scene-wide track
choice").

So here the candidates are the objects of the scene. On every frame the instruction's memory-free decode, above the
low FLOOR, covers most objects (each faintly); that region is cut into regions of one colour (`colour_regions`).
The first key frame's regions are followed through the frames (`PartTracks`), and so are the regions of each
later key frame that those tracks do not cover (an object that enters, or that was hidden or merged with another:
on ShapesIVS valid, reasoning J&F +1.9 and 10 more answers right). A track follows only regions of its own colour
(referring / reasoning J&F +1.2 / +1.9 over following by position alone). When the instruction names colours
or shapes of the model's vocabularies, or implies them (`instructseg.model.implied_words`: "the shape with no
corners" is a circle), only the regions that the region words (`instructseg.model.region_words`) read as those, on
at least half of READ_FRAMES frames of their track, stay candidates. The candidates are scored by the track prior
and chosen by `tracks.choose`. When the choice drops some, an answer's one object is the best region (an answer
with several objects gets those it keeps, each region going to the object whose decode is highest over it), and its
mask on each frame is that region, whose outline is the frame's. When it keeps them all (words that say nothing of
tracks), the mask is every candidate if some of the words were implied ("the shapes with no corners";
`SceneWords`), and otherwise nothing changes and the video is propagated as usual; so it is too when no region is
read as the words. Answers with several objects take the choice only for implied words. With words, the chosen
regions' names are those read most often along their tracks (`SceneChoice.names`), for the answer's text.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from instructseg.data.sampling import uniform_key_frames
from instructseg.decoders.base import DecoderOutput, FrameFeatures, Prompts
from instructseg.decoders.tracks import choose, track_features, track_summary
from instructseg.inference.track_choice import PartTracks, decode_alone

FLOOR = -12.0  # candidates: where the decode's logits are above this (emulated on ShapesIVS valid: -8 to -14 alike)
COLOUR_EDGE = 0.235  # neighbouring pixels further apart than this (any channel, in [0, 1]) lie on a border
BAND = 2  # pixels around a region, outside the candidates, that tell its background colour
MIN_AREA = 3.5e-4  # regions under this share of the frame are specks (6 pixels of a 128 x 128 frame)
MIN_SHARE = 0.05  # ... and so are regions under this share of the largest
NEW_OBJECT = 0.5  # a later key frame's region starts a track of its own when the tracks cover less of it than this
READ_FRAMES = 8  # frames of a region's track that the region words read (emulated on ShapesIVS valid referring:
                 # +3.1 J&F from the first key frame alone, +5.0 from half of eight)


def colour_regions(logits: np.ndarray, image: np.ndarray) -> list[np.ndarray]:
    """The one-colour regions of `logits > FLOOR` ((H, W)) on `image` ((H, W, 3) float in [0, 1]), as masks:
    pixels are cut apart where a neighbour differs by more than COLOUR_EDGE, border pixels join the nearest region,
    and the background (a region of the colour just outside the candidates around it) and specks are left out."""
    region = logits > FLOOR
    edge = np.zeros(region.shape, bool)
    across = np.abs(np.diff(image, axis=1)).max(-1) > COLOUR_EDGE
    edge[:, 1:] |= across
    edge[:, :-1] |= across
    down = np.abs(np.diff(image, axis=0)).max(-1) > COLOUR_EDGE
    edge[1:] |= down
    edge[:-1] |= down
    labels, count = ndimage.label(region & ~edge)
    if count == 0:
        return []
    nearest = ndimage.distance_transform_edt(labels == 0, return_distances=False, return_indices=True)
    labels = np.where(region, labels[nearest[0], nearest[1]], 0)
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    kept = []
    for r in np.flatnonzero(areas >= max(MIN_AREA * labels.size, 1)):
        if r == 0:
            continue
        mask = labels == r
        band = ndimage.binary_dilation(mask, iterations=BAND) & ~region
        if band.sum() >= 3 and np.abs(np.median(image[mask], 0) - np.median(image[band], 0)).max() < COLOUR_EDGE:
            continue  # the background between objects
        kept.append(mask)
    kept.sort(key=lambda m: -int(m.sum()))
    return [m for m in kept if m.sum() >= MIN_SHARE * kept[0].sum()]


@dataclass
class SceneWords:
    """The words the scene choice keeps its candidates by, {vocabulary: words} ({}: every region is a candidate),
    and whether any of them is implied rather than named: an instruction that tells a colour or shape by what it
    is like ("the shapes with no corners") means every object that has it when the track prior cannot tell them
    apart, while one that names it with more words ("the small red shape") means one, which the usual path then
    finds (on ShapesIVS valid referring, taking every candidate there cost 0.5 J&F)."""

    words: dict[str, set[str]]
    implied: bool = False


@dataclass
class SceneChoice:
    """The chosen regions of each of the answer's K objects on every frame (`masks[t]`: (K, h, w) bool at the
    image size) and the decode's presence logits there (`scores[t]`: (K,))."""

    masks: dict[int, np.ndarray]
    scores: dict[int, np.ndarray]
    names: list[tuple[str, ...]] | None = None  # the chosen regions' names, read along their tracks (with words)

    def outputs(self, size: tuple[int, int]) -> Iterator[tuple[int, DecoderOutput]]:
        """(t, output) for every frame in order: mask logits (1, K, h, w) at +-4."""
        for t in sorted(self.masks):
            logits = torch.from_numpy(np.where(self.masks[t], 4.0, -4.0).astype(np.float32))[None]
            yield t, DecoderOutput(mask_logits=logits.reshape(1, -1, *size),
                                   score_logits=torch.from_numpy(self.scores[t].astype(np.float32))[None])


def choose_scene(decoder, frame_at: Callable[[int], torch.Tensor], image_at: Callable[[int], np.ndarray],
                 num_frames: int, key_prompts: dict[int, Prompts], key_features: dict[int, FrameFeatures],
                 weights: torch.Tensor, keep: dict | None = None, *, named: SceneWords | None = None,
                 region_words=None, num_objects: int = 1) -> SceneChoice | None:
    """The choice for the `num_objects` objects of `key_prompts` with the track prior's `weights`
    (TRACK_FEATURES + 1), among the regions `region_words` reads as the `named` words (every region when there are
    none): for one object the best candidate, for several those `tracks.choose` keeps; every candidate when it
    keeps them all and some of the words are implied. None when it keeps them all otherwise, when no region is read
    as the words, or when there are fewer than two tracks and no words. With several objects, each chosen region
    goes to the object whose decode is highest over it on the key frame where its track starts.
    Frames are decoded without memory (`track_choice.decode_alone`), the first key frame first and then the others
    in order; the regions are cut from the highest of the objects' decodes. `image_at(t)` gives frame t as (h, w, 3)
    float in [0, 1], the size the regions are cut at. Encoded features go into `keep` as in
    `track_choice.choose_tracks`."""
    first = min(key_prompts)
    scores: dict[int, np.ndarray] = {}
    words = named.words if named is not None else {}

    def decoded(t: int) -> tuple[np.ndarray, np.ndarray]:
        """Frame t's objects' decodes (K, h, w) at the image's size, and the image (h, w, 3)."""
        out = decode_alone(decoder, frame_at, t, key_prompts, key_features, slice(0, num_objects), keep)
        scores[t] = out.score_logits[0].float().cpu().numpy()
        image = image_at(t)
        return F.interpolate(out.mask_logits[:, :num_objects].float(), size=image.shape[:2], mode="bilinear",
                             align_corners=False)[0].cpu().numpy(), image

    key_logits: dict[int, np.ndarray] = {}  # the key frames' decodes, to tell which object a region is
    colours: dict[int, np.ndarray] = {}  # frame -> its regions' median colours (R, 3)

    def regions(t: int) -> list[np.ndarray]:
        logits, image = decoded(t)
        if t in key_prompts:
            key_logits[t] = logits
        found = colour_regions(logits.max(0), image)
        colours[t] = np.array([np.median(image[m], 0) for m in found]).reshape(-1, 3)
        return found

    found = regions(first)
    if not found:
        return None
    shape = found[0].shape
    unpack = lambda packed: np.unpackbits(packed, count=found[0].size).reshape(shape).astype(bool)  # noqa: E731
    # every other frame in order (a video file reads on without seeking), its regions kept packed
    later = {t: [np.packbits(m) for m in regions(t)] for t in range(num_frames) if t != first}
    later[first] = [np.packbits(m) for m in found]
    tracks = _followed(first, np.arange(len(found)), later, colours, num_frames, unpack)
    start = [first] * len(found)  # the key frame each track starts on (its region there: `tracks.key`)
    for k in sorted(key_prompts)[1:]:  # objects the first key frame does not show start on the next key frames
        seen = np.zeros(shape, bool)
        for packed in tracks.masks.get(k, {}).values():
            seen |= unpack(packed)
        new = [r for r, m in enumerate(map(unpack, later[k])) if (m & seen).sum() < NEW_OBJECT * m.sum()]
        if new:
            tracks.extend(_followed(k, np.array(new), later, colours, num_frames, unpack))
            start += [k] * len(new)
    if tracks.count < (1 if words else 2):
        return None
    candidates = np.arange(tracks.count)
    reads = _track_reads(region_words, tracks, image_at, unpack) if words else None
    if reads is not None:
        candidates = np.flatnonzero([_read_as(words, track) for track in reads])
        if candidates.size == 0:
            return None
    chosen = candidates
    if candidates.size > 1:
        summaries = np.stack([track_summary(tracks.areas[p], tracks.centres[p]) for p in candidates])
        w = weights.float().cpu().numpy()
        score = track_features(summaries) @ w[:-1] + w[-1]
        kept = choose(score)
        if not kept.all():
            # one object: its best region (emulated: +2.0 / +2.0 J&F over keeping every region `choose` keeps, on
            # ShapesIVS valid referring / reasoning)
            chosen = candidates[[int(np.argmax(score))]] if num_objects == 1 else candidates[kept]
        elif not named.implied:
            return None
    owner = {int(p): int(np.argmax(key_logits[start[p]][:, tracks.key[p]].mean(1))) for p in chosen}
    masks = {}
    for t in range(num_frames):
        mask = np.zeros((num_objects, *shape), bool)
        for p, k in owner.items():
            packed = tracks.masks.get(t, {}).get(p)
            if packed is not None:
                mask[k] |= unpack(packed)
        masks[t] = mask
    names = [_most_read(reads[p], region_words.vocabularies) for p in owner] if reads is not None else None
    return SceneChoice(masks, scores, names)


def _followed(t: int, picked: np.ndarray, later: dict[int, list[np.ndarray]], colours: dict[int, np.ndarray],
              num_frames: int, unpack) -> PartTracks:
    """Frame t's regions `picked` (indices into `later[t]`) followed forwards and backwards through the frames'
    regions (`later`, packed) of their own colour (`colours`, per frame)."""
    regions = [unpack(later[t][r]) for r in picked]
    labels = np.zeros(regions[0].shape, np.int64)
    for p, mask in enumerate(regions):
        labels[mask] = p + 1
    tracks = PartTracks(labels, len(regions), num_frames, keep_masks=True, colours=colours[t][picked],
                        colour_gap=COLOUR_EDGE)
    for frames in (range(t + 1, num_frames), range(t - 1, -1, -1)):
        tracks.start(t)
        for u in frames:
            tracks.follow_regions(u, [unpack(packed) for packed in later[u]], colours[u])
    return tracks


def _track_reads(region_words, tracks: PartTracks, image_at, unpack) -> list[list[dict[str, str]]]:
    """Per track, the region words' reading ({vocabulary: word}) on each of up to READ_FRAMES frames where it is
    seen, spread evenly."""
    frames_of = [sorted(t for t, parts in tracks.masks.items() if p in parts) for p in range(tracks.count)]
    at: dict[int, list[int]] = {}  # frame -> tracks read there
    for p, seen in enumerate(frames_of):
        for i in uniform_key_frames(len(seen), READ_FRAMES) if seen else ():
            at.setdefault(seen[i], []).append(p)
    reads: list[list[dict[str, str]]] = [[] for _ in range(tracks.count)]
    for t, parts in sorted(at.items()):
        frame = torch.from_numpy(np.ascontiguousarray(image_at(t), dtype=np.float32)).permute(2, 0, 1)
        for p, words in zip(parts, region_words.read(frame, np.stack([unpack(tracks.masks[t][p]) for p in parts]))):
            reads[p].append(words)
    return reads


def _read_as(named: dict[str, set[str]], reads: list[dict[str, str]]) -> bool:
    """Whether a track's `reads` are the `named` words on at least half of them."""
    hits = sum(all(words[kind] in allowed for kind, allowed in named.items()) for words in reads)
    return bool(reads) and 2 * hits >= len(reads)


def _most_read(reads: list[dict[str, str]], vocabularies) -> tuple[str, ...]:
    """A track's name: per vocabulary, the word its `reads` give most often (the first read among ties)."""
    return tuple(Counter(words[kind] for words in reads).most_common(1)[0][0] for kind in vocabularies)
