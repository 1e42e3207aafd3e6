"""`instructseg bench infer`: on one generated video, time `propagate` mode, `per-frame` mode and raw SAM2
propagation from the ground-truth mask of frame 0 (SAM2VideoPredictor with the decoder's own config and weights:
the floor for propagation), and score each with J&F against the ground truth.

Timing is wall clock on a warm model: the model loads once, then every mode runs once untimed on a short video of
the same size before the timed runs; torch's thread count is left as it is. Each timed span starts from the frames
on disk (the predictor opens the frame folder, SAM2's `init_state` loads it) and ends with boolean masks for every
frame at the source resolution.

A randomly initialised LLM (the `tiny` and `bench-1.5b` presets) never says [SEG], so nothing would be decoded or
propagated. For such a model the answer is forced to "[SEG]" through the real generation path (greedy decoding with
a logits processor that allows only [SEG], then end-of-sequence): the same LLM passes as a real one-object answer.
The output says so (`answer_forced`).
"""
from __future__ import annotations

import contextlib
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from instructseg.bench.video import BenchVideo, write_frames_dir
from instructseg.eval.metrics import boundary_f, jaccard

WARMUP_FRAMES = 4
SAM2_VIDEO_TARGET = "sam2.sam2_video_predictor.SAM2VideoPredictor"


def jf(pred: np.ndarray, gt: np.ndarray) -> float:
    """J&F in percent: mean over frames of (J + F) / 2 of boolean (T, H, W) masks."""
    return float(100 * np.mean((jaccard(pred, gt) + boundary_f(pred, gt)) / 2))


# ---------------------------------------------------------------------------------------------- our modes
class ForceTokens:
    """A transformers logits processor that makes greedy decoding produce `token_ids` in order, then anything."""

    def __init__(self, token_ids: list[int]):
        self.token_ids = list(token_ids)
        self.start: int | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.start is None or input_ids.shape[1] < self.start:  # a new generate call
            self.start = input_ids.shape[1]
        step = input_ids.shape[1] - self.start
        if step >= len(self.token_ids):
            return scores
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.token_ids[step]] = 0
        return forced


class ForcedAnswerModel:
    """The model as the predictor sees it, with `generate` always answering "[SEG]" (see the module docstring).
    Everything else is the wrapped model's."""

    def __init__(self, model):
        from instructseg.model.tokens import SEG

        self._model = model
        self._force = [model.token_ids[SEG], model.tokenizer.eos_token_id]

    def generate(self, inputs, **kwargs):
        from transformers import LogitsProcessorList

        return self._model.generate(inputs, logits_processor=LogitsProcessorList([ForceTokens(self._force)]),
                                    **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)

    def to(self, *args, **kwargs):
        self._model.to(*args, **kwargs)
        return self

    def eval(self):
        self._model.eval()
        return self


def run_mode(predictor, video: BenchVideo, mode: str) -> tuple[float, int, np.ndarray, int]:
    """(seconds, LLM calls, union of the predicted objects' masks (T, H, W) bool, objects found)."""
    start = time.perf_counter()
    result, _ = predictor.run(str(video.path), video.instruction, mode=mode)
    seconds = time.perf_counter() - start
    union = np.zeros((video.frames, video.size, video.size), dtype=bool)
    for t in range(video.frames):
        if result.objects:
            union[t] = result.masks(t).any(axis=0)
    return seconds, int(result.timing["llm_calls"]), union, len(result.objects)


# ---------------------------------------------------------------------------------------------- raw SAM2
def build_sam2_video_predictor(model):
    """The official SAM2VideoPredictor with the model's SAM2 config and weights (strict load), in eval mode.
    No post-processing extras (hole filling needs sam2's CUDA extension): the plain config, as our decoder runs it."""
    import sam2  # noqa: F401  (initialises sam2's hydra config module)
    from hydra import compose
    from hydra.utils import instantiate

    if model.config.decoder.kind != "sam2":
        raise ValueError(f"decoder.kind={model.config.decoder.kind!r}: raw SAM2 needs a sam2 decoder")
    from instructseg.decoders.sam2_prompting import hydra_config

    d = model.config.decoder
    name, overrides = hydra_config(config=d.sam2_config, image_size=d.image_size, hidden_dim=d.sam2_hidden_dim)
    cfg = compose(config_name=name, overrides=[f"++model._target_={SAM2_VIDEO_TARGET}", *overrides])
    predictor = instantiate(cfg.model, _recursive_=True)
    predictor.load_state_dict(model.decoder.sam.state_dict(), strict=True)
    return predictor.to(next(model.decoder.sam.parameters()).device).eval()


def run_sam2(predictor, video: BenchVideo) -> tuple[float, np.ndarray]:
    """(seconds for init_state + add_new_mask + propagate_in_video, predicted masks (T, H, W) bool)."""
    masks = np.zeros((video.frames, video.size, video.size), dtype=bool)
    with contextlib.redirect_stderr(io.StringIO()), torch.inference_mode():  # sam2's progress bars
        start = time.perf_counter()
        state = predictor.init_state(video_path=str(video.path))
        predictor.add_new_mask(state, frame_idx=0, obj_id=1, mask=video.gt[0])
        for t, _, logits in predictor.propagate_in_video(state):
            masks[t] = (logits[0, 0] > 0).cpu().numpy()
        seconds = time.perf_counter() - start
    return seconds, masks


# ---------------------------------------------------------------------------------------------- the benchmark
def bench_infer(model_name: str, *, frames: int, size: int, seed: int = 0, device: str = "cpu",
                llm_dtype: str = "auto", log=print) -> dict:
    """Every number of `bench infer` as one dict (the JSON keys of the issue, plus context)."""
    from instructseg.inference.predictor import InstructSegPredictor
    from instructseg.model.checkpoint import load_model

    if frames < 2:
        raise ValueError(f"--frames {frames}: need at least 2 frames")
    load_start = time.perf_counter()
    model = load_model(model_name, device=device)
    predictor = InstructSegPredictor(model, device=device, llm_dtype=llm_dtype)
    forced = bool(model.config.llm.random_init)
    if forced:
        predictor.model = ForcedAnswerModel(model)
    sam2 = build_sam2_video_predictor(model)
    log(f"loaded {model_name} in {time.perf_counter() - load_start:.1f} s; torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory(prefix="instructseg-bench-") as tmp:
        warm = write_frames_dir(Path(tmp) / "warmup", min(WARMUP_FRAMES, frames), size, seed + 1)
        video = write_frames_dir(Path(tmp) / "video", frames, size, seed)
        for mode in ("propagate", "per-frame"):
            run_mode(predictor, warm, mode)
        run_sam2(sam2, warm)
        prop_s, prop_calls, prop_masks, objects = run_mode(predictor, video, "propagate")
        log(f"propagate: {prop_s:.2f} s")
        pf_s, pf_calls, pf_masks, _ = run_mode(predictor, video, "per-frame")
        log(f"per-frame: {pf_s:.2f} s")
        sam_s, sam_masks = run_sam2(sam2, video)
        log(f"sam2 raw: {sam_s:.2f} s")
    return {
        "propagate_s": round(prop_s, 4),
        "per_frame_s": round(pf_s, 4),
        "sam2_raw_s": round(sam_s, 4),
        "ratio_propagate_per_frame": round(prop_s / pf_s, 4),
        "ratio_propagate_sam2": round(prop_s / sam_s, 4),
        "llm_calls_propagate": prop_calls,
        "llm_calls_per_frame": pf_calls,
        "jf_propagate": round(jf(prop_masks, video.gt), 2),
        "jf_per_frame": round(jf(pf_masks, video.gt), 2),
        "jf_sam2_raw": round(jf(sam_masks, video.gt), 2),
        "objects_found": objects,
        "answer_forced": forced,
        "model": str(model_name),
        "frames": frames,
        "size": size,
        "decoder_size": int(model.decoder.image_size),
        "instruction": video.instruction,
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "llm_dtype": str(model.llm.get_input_embeddings().weight.dtype).removeprefix("torch."),
    }


def print_infer(r: dict) -> None:
    print(f"bench infer: model {r['model']}, {r['frames']} frames at {r['size']} px (decoder {r['decoder_size']} px), "
          f"\"{r['instruction']}\", {r['objects_found']} object(s) found, {r['torch_threads']} torch thread(s), "
          f"LLM in {r['llm_dtype']}")
    if r["answer_forced"]:
        print("random LLM: its answer was forced to \"[SEG]\" through the real generation path")
    rows = (("propagate", r["propagate_s"], r["llm_calls_propagate"], r["jf_propagate"]),
            ("per-frame", r["per_frame_s"], r["llm_calls_per_frame"], r["jf_per_frame"]),
            ("sam2 raw (GT mask on frame 0)", r["sam2_raw_s"], 0, r["jf_sam2_raw"]))
    print(f"{'mode':30s}{'time (s)':>10s}{'frames/s':>10s}{'LLM calls':>11s}{'J&F':>8s}")
    for name, seconds, calls, score in rows:
        print(f"{name:30s}{seconds:10.2f}{r['frames'] / seconds:10.2f}{calls:11d}{score:8.2f}")
    print(f"propagate / per-frame: {r['ratio_propagate_per_frame']:.3f}   "
          f"propagate / sam2 raw: {r['ratio_propagate_sam2']:.3f}")
    if not r["objects_found"]:
        print("note: the model found no object, so its modes decoded no masks (times are the LLM side only)")
