"""The SAM2 decoder: image decode, memory propagation in both directions, and the re-anchoring rule."""
from __future__ import annotations

import torch

from instructseg.config import DecoderConfig
from instructseg.decoders.base import DecoderOutput, Prompts
from instructseg.decoders.sam2 import Reanchor, SAM2Decoder


def _decoder() -> SAM2Decoder:
    torch.manual_seed(0)
    return SAM2Decoder.from_config(DecoderConfig()).eval()


def _prompts(n: int = 2) -> Prompts:
    return Prompts(torch.randn(1, n, 32), torch.ones(1, n, dtype=torch.bool), torch.randn(1, 32))


def test_propagation_visits_every_frame_once_and_reads_each_once():
    decoder, frames, calls = _decoder(), torch.rand(9, 3, 64, 64), []

    def frame_at(i):
        calls.append(i)
        return frames[i:i + 1]

    with torch.no_grad():
        out = list(decoder.propagate(frame_at, 9, {4: _prompts(), 6: _prompts()}))
    assert [t for t, _ in out] == [4, 6, 5, 7, 8, 3, 2, 1, 0]
    assert sorted(calls) == list(range(9))
    assert all(o.mask_logits.shape == (1, 2, 64, 64) and o.score_logits.shape == (1, 2) for _, o in out)


def test_key_frame_output_equals_image_decode():
    decoder, frames = _decoder(), torch.rand(4, 3, 64, 64)
    prompts = _prompts()
    with torch.no_grad():
        key = dict(decoder.propagate(lambda i: frames[i:i + 1], 4, {2: prompts}))[2]
        image = decoder.decode(decoder.encode(frames[2:3]), prompts)
    torch.testing.assert_close(key.mask_logits, image.mask_logits)


def test_reanchor_rule():
    rule = Reanchor(min_score=0.8, max_iou=0.1)
    empty = torch.full((1, 1, 8, 8), -5.0)
    blob = empty.clone()
    blob[..., 2:6, 2:6] = 5.0
    confident, unsure = torch.tensor([[3.0]]), torch.tensor([[0.0]])
    assert rule.disagrees(empty, DecoderOutput(blob, confident))  # the tracker lost a clearly visible object
    assert not rule.disagrees(blob, DecoderOutput(blob, confident))  # agreement
    assert not rule.disagrees(empty, DecoderOutput(blob, unsure))  # the memory-free decode is not sure
    assert not rule.disagrees(blob, DecoderOutput(empty, confident))  # nothing to re-anchor on


def test_reanchoring_makes_a_frame_a_conditioning_frame():
    decoder, frames = _decoder(), torch.rand(6, 3, 64, 64)
    always = Reanchor(min_score=0.0, max_iou=1.01, every=1)  # every tracked frame disagrees
    with torch.no_grad():
        list(decoder.propagate(lambda i: frames[i:i + 1], 6, {0: _prompts()}, reanchor=always))
    assert always.frames == [1, 2, 3, 4, 5]


def test_cached_key_frame_features_are_used_instead_of_reading_the_frame():
    decoder, frames, calls = _decoder(), torch.rand(5, 3, 64, 64), []

    def frame_at(i):
        calls.append(i)
        return frames[i:i + 1]

    prompts = _prompts()
    with torch.no_grad():
        plain = dict(decoder.propagate(lambda i: frames[i:i + 1], 5, {1: prompts}))
        cached = {1: decoder.encode(frames[1:2])}
        reused = dict(decoder.propagate(frame_at, 5, {1: prompts}, cached=cached))
    assert sorted(calls) == [0, 2, 3, 4] and cached == {}
    for t in range(5):
        torch.testing.assert_close(reused[t].mask_logits, plain[t].mask_logits)


def test_reanchor_checks_every_nth_frame_from_the_nearest_key():
    decoder, frames = _decoder(), torch.rand(9, 3, 64, 64)
    always = Reanchor(min_score=0.0, max_iou=1.01, every=3)
    with torch.no_grad():
        list(decoder.propagate(lambda i: frames[i:i + 1], 9, {2: _prompts()}, reanchor=always))
    assert always.frames == [5, 8]  # 3 and 6 frames after key 2; backwards 1, 0 are 1 and 2 away
