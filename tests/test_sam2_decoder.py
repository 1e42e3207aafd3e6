"""The SAM2 decoder: image decode, memory propagation in both directions, and re-detection on tracked frames."""
from __future__ import annotations

import torch

from instructseg.config import DecoderConfig
from instructseg.decoders.base import Prompts
from instructseg.decoders.sam2 import Redetect, SAM2Decoder


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


def test_redetect_with_a_zero_threshold_decodes_every_tracked_frame_without_memory():
    decoder, frames, prompts = _decoder(), torch.rand(6, 3, 64, 64), _prompts()
    always = Redetect(min_score=0.0, min_iou=0.0)
    with torch.no_grad():
        out = dict(decoder.propagate(lambda i: frames[i:i + 1], 6, {0: prompts}, redetect=always))
        free = {t: decoder.decode(decoder.encode(frames[t:t + 1]), prompts) for t in range(1, 6)}
    assert always.frames == [1, 2, 3, 4, 5]
    for t in range(1, 6):
        torch.testing.assert_close(out[t].mask_logits, free[t].mask_logits)
        torch.testing.assert_close(out[t].score_logits, free[t].score_logits)


def test_redetect_keeps_the_tracked_mask_of_an_object_it_does_not_find():
    decoder, frames, prompts = _decoder(), torch.rand(2, 3, 64, 64), _prompts()
    with torch.no_grad():
        tracked = dict(decoder.propagate(lambda i: frames[i:i + 1], 2, {0: prompts}))[1]
        free = decoder.decode(decoder.encode(frames[1:2]), prompts)
        p = free.score_logits[0].sigmoid()
        assert abs(float(p[0] - p[1])) > 1e-5
        found = int(p.argmax())
        rule = Redetect(min_score=float(p.mean()), min_iou=0.0)  # finds exactly one of the two objects
        mixed = dict(decoder.propagate(lambda i: frames[i:i + 1], 2, {0: prompts}, redetect=rule))[1]
        never = dict(decoder.propagate(lambda i: frames[i:i + 1], 2, {0: prompts}, redetect=Redetect(1.01)))[1]
        elsewhere = Redetect(min_score=0.0, min_iou=1.01)  # every decode disagrees with the previous frame's mask
        moved = dict(decoder.propagate(lambda i: frames[i:i + 1], 2, {0: prompts}, redetect=elsewhere))[1]
    assert rule.frames == [1]
    torch.testing.assert_close(mixed.mask_logits[0, found], free.mask_logits[0, found])
    torch.testing.assert_close(mixed.mask_logits[0, 1 - found], tracked.mask_logits[0, 1 - found])
    torch.testing.assert_close(never.mask_logits, tracked.mask_logits)
    torch.testing.assert_close(moved.mask_logits, tracked.mask_logits)
    assert elsewhere.frames == []
    assert not torch.allclose(tracked.mask_logits[0, found], free.mask_logits[0, found])


def test_redetect_leaves_objects_a_user_clicked_to_memory():
    decoder, frames = _decoder(), torch.rand(4, 3, 64, 64)
    base = _prompts()
    clicked = Prompts(base.object_embeds, base.object_valid, base.text_embed,
                      point_coords=torch.tensor([[[[20.0, 30.0]], [[0.0, 0.0]]]]),
                      point_labels=torch.tensor([[[1], [-1]]], dtype=torch.int32))  # object 1 clicked, object 2 not
    always = Redetect(min_score=0.0, min_iou=0.0)
    with torch.no_grad():
        plain = dict(decoder.propagate(lambda i: frames[i:i + 1], 4, {0: clicked}))
        mixed = dict(decoder.propagate(lambda i: frames[i:i + 1], 4, {0: clicked}, redetect=always))
        free = {t: decoder.decode(decoder.encode(frames[t:t + 1]), base) for t in range(1, 4)}
    assert always.frames == [1, 2, 3]
    for t in range(1, 4):
        torch.testing.assert_close(mixed[t].mask_logits[0, 0], plain[t].mask_logits[0, 0])
        torch.testing.assert_close(mixed[t].mask_logits[0, 1], free[t].mask_logits[0, 1])  # text prompts only


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


def test_single_mask_tracking_takes_the_trained_output_on_tracked_frames(monkeypatch):
    """SAM2's own choice on tracked frames is the best of its multi-mask outputs by its IoU head; with
    `single_mask_tracking` every tracked frame takes the single-mask output, the one the mask loss trains."""
    torch.manual_seed(0)
    frames = torch.rand(4, 3, 64, 64)
    for single in (False, True):
        dec = SAM2Decoder.from_config(DecoderConfig(single_mask_tracking=single)).eval()
        asked = []
        heads = dec.sam._forward_sam_heads

        def spy(*args, multimask_output=False, **kwargs):
            asked.append(multimask_output)
            return heads(*args, multimask_output=multimask_output, **kwargs)

        monkeypatch.setattr(dec.sam, "_forward_sam_heads", spy)
        with torch.no_grad():
            list(dec.propagate(lambda t: frames[t:t + 1], 4, {0: _prompts(1)}))
        assert len(asked) >= 3  # the key frame (text prompt: always one mask) and the tracked frames
        assert any(asked[1:]) is not single, asked
