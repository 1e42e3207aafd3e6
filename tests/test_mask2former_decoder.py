"""Mask2FormerDecoder: shapes, gradient flow, padding, batch equivalences, propagation order and save/load."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from instructseg.config import DecoderConfig
from instructseg.decoders.base import DecoderOutput, Prompts
from instructseg.decoders.mask2former import PADDING_SCORE, Mask2FormerDecoder

S, C = 64, 32


def make_decoder(seed: int = 0, decoder_layers: int = 2) -> Mask2FormerDecoder:
    torch.manual_seed(seed)
    return Mask2FormerDecoder(image_size=S, hidden_dim=C, decoder_layers=decoder_layers,
                              backbone_channels=[16, 32, 64, 64])


def make_prompts(batch: int, valid: list[list[bool]], seed: int = 1) -> Prompts:
    g = torch.Generator().manual_seed(seed)
    n = len(valid[0])
    return Prompts(object_embeds=torch.randn(batch, n, C, generator=g), object_valid=torch.tensor(valid),
                   text_embed=torch.randn(batch, C, generator=g))


def frames(count: int, seed: int = 2) -> torch.Tensor:
    return torch.rand(count, 3, S, S, generator=torch.Generator().manual_seed(seed))


def assert_same(a: DecoderOutput, b: DecoderOutput, atol: float = 1e-5) -> None:
    torch.testing.assert_close(a.mask_logits, b.mask_logits, atol=atol, rtol=1e-4)
    torch.testing.assert_close(a.score_logits, b.score_logits, atol=atol, rtol=1e-4)


def test_from_config_maps_fields():
    cfg = DecoderConfig(kind="mask2former", image_size=S, hidden_dim=C, decoder_layers=3,
                        backbone_channels=[8, 16, 32, 32])
    decoder = Mask2FormerDecoder.from_config(cfg)
    assert (decoder.image_size, decoder.hidden_dim) == (S, C)
    assert len(decoder.transformer_decoder.layers) == 3
    assert decoder.backbone.stages[-1][0][0].out_channels == 32
    with pytest.raises(ValueError, match="kind"):
        Mask2FormerDecoder.from_config(DecoderConfig(kind="sam2"))
    with pytest.raises(ValueError, match="hidden_dim"):
        Mask2FormerDecoder(image_size=S, hidden_dim=48, decoder_layers=2, backbone_channels=[16, 32, 64, 64])


@pytest.mark.parametrize("decoder_layers", [1, 2, 4])
def test_encode_decode_shapes(decoder_layers):
    decoder = make_decoder(decoder_layers=decoder_layers)
    features = decoder.encode(frames(2))
    assert features.tokens.shape == (2, 4, C) and features.size == (2, 2)
    assert [tuple(x.shape) for x in features.extra["multi_scale"]] == [(2, C, 2, 2), (2, C, 4, 4), (2, C, 8, 8)]
    assert features.extra["mask_features"].shape == (2, C, 16, 16)
    torch.testing.assert_close(features.tokens, features.extra["multi_scale"][0].flatten(2).transpose(1, 2))
    out = decoder.decode(features, make_prompts(2, [[True, True, False], [True, False, False]]))
    assert out.mask_logits.shape == (2, 3, S, S) and out.score_logits.shape == (2, 3)
    assert torch.isfinite(out.mask_logits).all() and torch.isfinite(out.score_logits).all()
    with pytest.raises(ValueError, match="shape"):
        decoder.encode(torch.rand(1, 3, 32, 32))


def test_backward_reaches_every_part():
    decoder = make_decoder()
    prompts = make_prompts(2, [[True, True], [True, False]])
    out = decoder.decode(decoder.encode(frames(2)), prompts)
    target = (torch.rand(2, 2, S, S) > 0.5).float()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(out.mask_logits, target)
    loss = loss + out.score_logits[prompts.object_valid].square().mean()
    loss.backward()
    missing = [name for name, p in decoder.named_parameters() if p.grad is None]
    assert not missing, missing
    parts = ["backbone.", "pixel_decoder.encoder.", "pixel_decoder.input_projections.", "pixel_decoder.adapter_1",
             "pixel_decoder.mask_projection", "transformer_decoder.layers.", "transformer_decoder.mask_predictor.",
             "level_embed", "query_position", "score_"]
    for part in parts:
        grads = [p.grad.abs().sum() for name, p in decoder.named_parameters() if name.startswith(part)]
        assert grads and sum(grads) > 0, part


def test_padding_slots_score_low_and_do_not_leak():
    decoder = make_decoder().eval()
    features = decoder.encode(frames(1))
    prompts = make_prompts(1, [[True, False, True, False]])
    with torch.no_grad():
        out = decoder.decode(features, prompts)
        noisy = Prompts(prompts.object_embeds.clone(), prompts.object_valid, prompts.text_embed)
        noisy.object_embeds[~prompts.object_valid] = 100 * torch.randn(2, C)
        out_noisy = decoder.decode(features, noisy)
    assert (out.score_logits[0, [1, 3]] == PADDING_SCORE).all()
    assert (out.score_logits[0, [0, 2]] > PADDING_SCORE / 10).all()
    assert_same(out, out_noisy)


def test_sample_alone_equals_sample_in_batch():
    decoder = make_decoder().eval()
    images = frames(2)
    prompts = make_prompts(2, [[True, True, False], [True, False, False]])
    with torch.no_grad():
        both = decoder.decode(decoder.encode(images), prompts)
        for i in range(2):
            one = Prompts(prompts.object_embeds[i:i + 1], prompts.object_valid[i:i + 1], prompts.text_embed[i:i + 1])
            alone = decoder.decode(decoder.encode(images[i:i + 1]), one)
            assert_same(alone, DecoderOutput(both.mask_logits[i:i + 1], both.score_logits[i:i + 1]))


def test_select_duplicates_a_frame_for_two_prompts():
    decoder = make_decoder().eval()
    with torch.no_grad():
        features = decoder.encode(frames(1))
        dup = features.select([0, 0])
        assert dup.tokens.shape == (2, 4, C) and dup.size == features.size
        assert torch.equal(dup.tokens, features.tokens.expand_as(dup.tokens))
        for dup_map, map_ in zip(dup.extra["multi_scale"], features.extra["multi_scale"]):
            assert torch.equal(dup_map, map_.expand_as(dup_map))
        assert torch.equal(dup.extra["mask_features"][1], features.extra["mask_features"][0])
        prompts = make_prompts(2, [[True, True], [True, False]])
        both = decoder.decode(dup, prompts)
        for i in range(2):
            one = Prompts(prompts.object_embeds[i:i + 1], prompts.object_valid[i:i + 1], prompts.text_embed[i:i + 1])
            assert_same(decoder.decode(features, one), DecoderOutput(both.mask_logits[i:i + 1],
                                                                     both.score_logits[i:i + 1]))


def test_propagate_order_frame_reads_and_nearest_key_prompts():
    decoder = make_decoder().eval()
    video = frames(8)
    reads: list[int] = []

    def frame_at(t: int) -> torch.Tensor:
        reads.append(t)
        return video[t:t + 1]

    prompts_a, prompts_b = make_prompts(1, [[True, True]], seed=3), make_prompts(1, [[True, True]], seed=4)
    with torch.no_grad():
        results = list(decoder.propagate(frame_at, 8, {5: prompts_b, 1: prompts_a}))
        order = [t for t, _ in results]
        assert order == [1, 5, 2, 3, 4, 6, 7, 0]  # keys, forwards from the first key, backwards from it
        assert sorted(reads) == list(range(8)) and reads == order
        expected_key = {0: 1, 1: 1, 2: 1, 3: 1, 4: 5, 5: 5, 6: 5, 7: 5}  # frame 3 is a tie: the earlier key wins
        for t, out in results:
            assert out.mask_logits.shape == (1, 2, S, S)
            features = decoder.encode(video[t:t + 1])
            right, wrong = (prompts_a, prompts_b) if expected_key[t] == 1 else (prompts_b, prompts_a)
            assert_same(out, decoder.decode(features, right))
            assert not torch.allclose(out.score_logits, decoder.decode(features, wrong).score_logits)
    with pytest.raises(ValueError, match="key frames"):
        next(decoder.propagate(frame_at, 4, {4: prompts_a}))
    with pytest.raises(ValueError, match="batch size 1"):
        next(decoder.propagate(frame_at, 4, {0: make_prompts(2, [[True], [True]])}))


def test_state_dict_round_trip_through_safetensors(tmp_path):
    decoder = make_decoder(seed=0).eval()
    path = tmp_path / "decoder.safetensors"
    save_file(decoder.state_dict(), str(path))
    other = make_decoder(seed=7).eval()
    images, prompts = frames(1), make_prompts(1, [[True, False]])
    with torch.no_grad():
        before = other.decode(other.encode(images), prompts)
        other.load_state_dict(load_file(str(path)), strict=True)
        reference = decoder.decode(decoder.encode(images), prompts)
        after = other.decode(other.encode(images), prompts)
    assert not torch.allclose(before.mask_logits, reference.mask_logits)
    assert torch.equal(after.mask_logits, reference.mask_logits)
    assert torch.equal(after.score_logits, reference.score_logits)
