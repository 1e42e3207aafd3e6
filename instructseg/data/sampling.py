"""Which frames of a video the model sees.

- Training: `sample_video_frames` draws one key frame (the frame the masks and the answer are about) and a few
  reference frames around it for OVP, as InstructSeg does (4 reference frames within a small temporal window).
- Inference: `uniform_key_frames` spreads the LLM's key frames evenly over the video (Sa2VA-i: uniform key frames
  beat "the first five frames").
"""
from __future__ import annotations

import random

from instructseg.errors import InputError


def sample_video_frames(num_frames: int, num_ref: int, jump: int, rng: random.Random, *,
                        candidates: list[int] | None = None) -> tuple[int, list[int]]:
    """(key frame, `num_ref` sorted reference frames) for a video of `num_frames` frames.

    The key frame is drawn uniformly from `candidates` (e.g. the frames where the targets are visible) or from the
    whole video. Reference frames come from the window [key - jump, key + jump] clipped to the video, the key frame
    included. They are distinct when the window holds at least `num_ref` frames; only when it is shorter (a short
    video or a small `jump`) does every window frame appear, some of them more than once.
    """
    if num_frames < 1:
        raise InputError(f"sample_video_frames: the video has no frames (num_frames={num_frames})")
    if num_ref < 0 or jump < 0:
        raise InputError(f"sample_video_frames: num_ref and jump must be >= 0, got {num_ref} and {jump}")
    if candidates is not None:
        bad = [c for c in candidates if not 0 <= c < num_frames]
        if not candidates or bad:
            raise InputError(f"sample_video_frames: candidates must be a non-empty list of frame indices in "
                             f"[0, {num_frames}), got {candidates}")
        key = candidates[rng.randrange(len(candidates))]
    else:
        key = rng.randrange(num_frames)
    window = list(range(max(0, key - jump), min(num_frames - 1, key + jump) + 1))
    if num_ref <= len(window):
        refs = rng.sample(window, num_ref)
    else:  # too few frames: every one of them, the rest repeated (as evenly as possible)
        refs = window * (num_ref // len(window)) + rng.sample(window, num_ref % len(window))
    return key, sorted(refs)


def track_frames(num_frames: int, key: int, count: int, rng: random.Random) -> list[int]:
    """`count` consecutive frames next to `key`, in the order SAM2 memory would track them from it: forwards
    (key+1, key+2, ...) or backwards (key-1, key-2, ...), the direction drawn at random where both fit. Where the
    video ends first, the last frame repeats (tracking a still frame)."""
    if not 0 <= key < num_frames:
        raise InputError(f"track_frames: key frame {key} outside a video of {num_frames} frames")
    forward = rng.random() < 0.5
    if key + count >= num_frames and key - count >= 0:
        forward = False
    elif key - count < 0 and key + count < num_frames:
        forward = True
    step = 1 if forward else -1
    return [min(max(key + step * (i + 1), 0), num_frames - 1) for i in range(count)]


def reference_frames(num_frames: int, key: int, count: int, rng: random.Random) -> tuple[list[int], bool]:
    """The `track_frames` of `key` in time order (what OVP reads: the LLM sees them in sequence), and whether
    SAM2 tracks them backwards from the key frame (the last of them first)."""
    order = track_frames(num_frames, key, count, rng)
    backward = order[0] < key
    return (order[::-1] if backward else order), backward


def uniform_key_frames(num_frames: int, k: int) -> list[int]:
    """`k` frame indices spread evenly over a video: the centre of each of `k` equal segments, rounded down.

    Sorted and unique (neighbouring centres lie num_frames / k >= 1 apart); every frame when k >= num_frames.
    Example: 10 frames, k = 3 -> [1, 5, 8].
    """
    if num_frames < 1 or k < 1:
        raise InputError(f"uniform_key_frames: need num_frames >= 1 and k >= 1, got {num_frames} and {k}")
    if k >= num_frames:
        return list(range(num_frames))
    return [(2 * i + 1) * num_frames // (2 * k) for i in range(k)]
