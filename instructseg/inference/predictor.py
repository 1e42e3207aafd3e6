"""InstructSegPredictor: chat with an image or a video, get the answer text and one masklet per referred object.

Modes for video:
- `propagate` (default): the LLM answers once, on the first of K uniformly spaced key frames; its hidden states
  prompt every key frame (object embeddings as they are, VMTF re-fused with each key frame's features); SAM2 memory
  propagates the key-frame masks to every frame, forwards and backwards (Sa2VA-i: uniform key frames), and every
  tracked frame is re-detected from the nearest key frame's prompts (`decoders.sam2.Redetect`). One LLM call per
  video; each frame is encoded by the decoder once. The LLM runs in bfloat16 where the hardware has it
  (`llm_dtype="auto"`). With a track prior (`instructseg.inference.track_choice`), the parts of an object's mask
  that the instruction does not mean by their tracks are cleared; finding them costs one more decoding of every
  frame without memory, before the first frame is out, when some object's first key-frame mask has parts. When
  the answer has one object, or the instruction implies a colour or shape, every object of the scene (of the
  colour and shape the instruction names or implies, if any) is a candidate first
  (`instructseg.inference.scene_choice`); where the track prior drops some, its best region is the mask, and where
  it keeps them all and the words were implied, all of them; otherwise the video is propagated as usual.
- `per-frame`: InstructSeg's protocol, the baseline: every frame goes through the LLM with its reference frames
  and is decoded on its own.
Results stream frame by frame (`stream`), so a long video never holds all frames or all masks in memory.
With region words (`instructseg.model.region_words`), the answer's object names are then made those its masks show,
read on up to 8 frames spread over the video (`instructseg.inference.naming`), or, where the scene choice chose
by words, the names it read along the chosen regions' tracks.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from instructseg.data.sampling import reference_frames, uniform_key_frames
from instructseg.decoders.base import DecoderOutput, FrameFeatures, Prompts
from instructseg.errors import InputError
from instructseg.inference.io import FrameSource, open_source
from instructseg.inference.naming import ObjectNaming
from instructseg.inference.results import Masklet, ResultWriter, SegmentationResult, encode_mask
from instructseg.llm.lora import adapter_merged
from instructseg.llm.precision import cast_base_weights, inference_dtype
from instructseg.model.outputs import ModelInputs
from instructseg.model.tokens import pad_prompts

if TYPE_CHECKING:
    from instructseg.inference.scene_choice import SceneWords
    from instructseg.inference.session import ChatSession

MODES = ("propagate", "per-frame")
DEFAULT_KEY_FRAMES = 3


@dataclass
class FrameResult:
    """One frame's masks: masks (N, H, W) bool at the source resolution, scores (N,) in [0, 1]."""

    index: int
    name: str
    masks: np.ndarray
    scores: np.ndarray


@dataclass
class Refinement:
    """Visual prompts a user added on one frame, per object id (1-based): clicks in source pixels, or a mask."""

    points: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # id -> ((P, 2) xy, (P,) labels)
    masks: dict[int, np.ndarray] = field(default_factory=dict)  # id -> (H, W) bool


@dataclass
class Answer:
    """The LLM side of one question: text, the answer with [SEG] tokens, decoder prompts per key frame."""

    text: str
    raw_text: str
    num_objects: int
    key_prompts: dict[int, Prompts]
    llm_calls: int  # LLM passes so far (generation + teacher-forced); per-frame decoding adds to it
    key_features: dict[int, FrameFeatures] = field(default_factory=dict)  # decoder features of the key frames
    track_weights: torch.Tensor | None = None  # (N, F + 1) the track prior's, for a video (track_choice)
    # choose among every object of the scene first (scene_choice), of the colours and shapes the instruction names
    # or implies; None: no scene choice
    scene: SceneWords | None = None
    # the objects' names as the scene choice read them along their tracks (for the text; None: read the masks)
    names: list[tuple[str, ...]] | None = None


class InstructSegPredictor:
    """`InstructSegPredictor("default")` or `InstructSegPredictor(model)`; see the module docstring for modes."""

    def __init__(self, model="default", *, device: str = "cpu", redetect: bool = True, llm_dtype: str = "auto"):
        from instructseg.model.instructseg import InstructSegModel

        if not isinstance(model, InstructSegModel):
            from instructseg.model.checkpoint import load_model

            model = load_model(str(model), device=device)
        self.model = model.to(device).eval()
        if hasattr(model.llm, "merge_adapter") and not adapter_merged(model.llm):
            # LoRA and the trainable [SEG] row folded into the LLM weights (same outputs to ~1e-6): unmerged, peft
            # rebuilds the whole embedding matrix on every LLM call, about half of an answer's time.
            # `model.llm.unmerge_adapter()` undoes it, e.g. to train the model again.
            model.llm.merge_adapter()
        self.device = torch.device(device)
        # the LLM in bfloat16 where the hardware has it (2x+ faster answers, object embeddings within ~1e-4 cosine);
        # "auto" keeps float32 for LLM weights that only exist in this model (random init, or saved with it)
        reloadable = not model.config.llm.saved_with_model
        cast_base_weights(model.llm, inference_dtype(llm_dtype, self.device, reloadable=reloadable))
        self.size = model.decoder.image_size
        self.num_ref = model.config.perceiver.num_ref_frames
        self.redetect = redetect

    # -- public API -----------------------------------------------------------------------------------------
    def start(self, source) -> "ChatSession":
        from instructseg.inference.session import ChatSession

        return ChatSession(self, source if isinstance(source, FrameSource) else open_source(source))

    def segment(self, source, instruction: str, *, mode: str = "propagate", key_frames: int | None = None,
                out_dir: str | Path | None = None, history: list[tuple[str, str]] = (),
                refinements: dict[int, Refinement] | None = None,
                progress: Callable[[int, int], None] | None = None) -> SegmentationResult:
        """Answer `instruction` about `source` (path or FrameSource) and return text + masklets; with `out_dir`,
        also write result.json, masks/<id>/<frame>.png and the overlay there."""
        return self.run(source, instruction, mode=mode, key_frames=key_frames, out_dir=out_dir, history=history,
                        refinements=refinements, progress=progress)[0]

    def run(self, source, instruction: str, *, mode: str = "propagate", key_frames: int | None = None,
            out_dir: str | Path | None = None, history: list[tuple[str, str]] = (),
            refinements: dict[int, Refinement] | None = None,
            progress: Callable[[int, int], None] | None = None) -> tuple[SegmentationResult, Answer]:
        """`segment`, also returning the `Answer` (the raw answer with [SEG] tokens, for chat history). All state
        of a call lives in the call: one predictor may serve several callers (one model call at a time)."""
        frames = source if isinstance(source, FrameSource) else open_source(source)
        start = time.perf_counter()
        answer = self.answer(frames, instruction, mode=mode, key_frames=key_frames, history=history,
                             refinements=refinements)
        result = SegmentationResult(instruction=instruction, text=answer.text, mode=mode, frames=list(frames.names),
                                    height=frames.height, width=frames.width, timing={},
                                    objects=[Masklet(id=i + 1, score=0.0, masks_rle=[None] * len(frames))
                                             for i in range(answer.num_objects)])
        writer = ResultWriter(Path(out_dir), frames, answer.num_objects) if out_dir is not None else None
        scores: dict[int, list[float]] = {}
        naming = ObjectNaming(self.model.region_words, len(frames)) if self.model.region_words is not None else None
        for done, frame in enumerate(self.frames(frames, answer, mode=mode, instruction=instruction,
                                                 history=history), 1):
            for obj, mask, score in zip(result.objects, frame.masks, frame.scores):
                obj.masks_rle[frame.index] = encode_mask(mask)
                if frame.index in answer.key_prompts or mode == "per-frame":  # scores where the LLM looked
                    scores.setdefault(obj.id, []).append(float(score))
                    obj.score = float(np.mean(scores[obj.id]))
            if naming is not None:
                naming.add(frame.index, frame.masks, lambda t: self._tensor(frames, t).cpu(), self.size)
            if writer is not None:
                writer.add(frame.index, frame.masks)
            if progress is not None:
                progress(done, len(frames))
        if naming is not None:
            answer.text, answer.raw_text = (naming.ground(answer.text, answer.names),
                                            naming.ground(answer.raw_text, answer.names))
            result.text = answer.text
        total = time.perf_counter() - start
        result.timing.update(total_s=round(total, 4), frames=len(frames), llm_calls=answer.llm_calls,
                             key_frames=len(answer.key_prompts), frames_per_s=round(len(frames) / total, 3))
        if writer is not None:
            writer.finish(result)
        return result, answer

    # -- the LLM side -----------------------------------------------------------------------------------------
    def answer(self, frames: FrameSource, instruction: str, *, mode: str = "propagate", key_frames: int | None = None,
               history: list[tuple[str, str]] = (), refinements: dict[int, Refinement] | None = None) -> Answer:
        instruction = check_request(instruction, mode, key_frames)
        keys = uniform_key_frames(len(frames), key_frames or DEFAULT_KEY_FRAMES) if frames.is_video else [0]
        first = self._inputs(frames, keys[0], instruction, None, history)
        with torch.inference_mode():
            gen = self.model.generate(first)
            prompts, features = {keys[0]: gen.prompts}, {keys[0]: gen.features}
            # the track choice (videos, propagate mode) leaves a user's corrections as they are
            choice = frames.is_video and gen.num_objects and mode == "propagate" and not refinements
            weights = self.model.track_weights(gen.states) if choice else None
            if gen.num_objects and mode == "propagate":
                for t in keys[1:]:  # the answer's states prompt every key frame: no further LLM call
                    features[t] = self.model.decoder.encode(self._tensor(frames, t)[None])
                    prompts[t] = self.model.prompts_for(gen.states, features[t])
        for t, refinement in (refinements or {}).items():
            prompts[t] = self._refine(frames, prompts, t, refinement, gen.num_objects)
        return Answer(text=gen.text, raw_text=gen.raw_text, num_objects=gen.num_objects, key_prompts=prompts,
                      llm_calls=1, key_features=features, track_weights=weights,
                      scene=self._scene_words(instruction, gen.states, gen.num_objects) if weights is not None
                      and self.model.config.decoder.kind == "sam2" else None)

    def _scene_words(self, instruction: str, states, num_objects: int) -> SceneWords | None:
        """The words of the model's vocabularies that the instruction names, per vocabulary, or where it names none
        of a vocabulary those its implied words read (`instructseg.model.implied_words`). For the scene choice; None
        where it cannot choose: a model without vocabularies, or one without region words to read the words with,
        and an answer with several objects unless some words are implied."""
        from instructseg.inference.scene_choice import SceneWords
        from instructseg.model.track_prior import named_words

        vocabularies = self.model.config.word_vocabularies
        if not vocabularies:
            return None
        named = {kind: words for kind, words in ((k, named_words(instruction, v)) for k, v in vocabularies.items())
                 if words}
        implied = {kind: words for kind, words in self.model.implied(states).items() if kind not in named}
        if ((named or implied) and self.model.region_words is None) or (num_objects > 1 and not implied):
            return None
        return SceneWords({**named, **implied}, implied=bool(implied))

    def _inputs(self, frames: FrameSource, t: int, instruction: str, answer: str | None,
                history: list[tuple[str, str]]) -> ModelInputs:
        prompt = self.model.layout.encode(instruction, answer, history)
        if prompt.trimmed:
            import warnings

            warnings.warn("the instruction is longer than the model's context: it was trimmed", stacklevel=3)
        batch = pad_prompts([prompt], self.model.tokenizer.pad_token_id)
        batch.pop("labels")
        refs = None
        if frames.is_video:
            ref_idx, _ = reference_frames(len(frames), t, self.num_ref, _Forward())
            refs = torch.stack([self._tensor(frames, r) for r in ref_idx])[None]
        return ModelInputs(frames=self._tensor(frames, t)[None], ref_frames=refs, **batch).to(self.device)

    def _tensor(self, frames: FrameSource, t: int) -> torch.Tensor:
        return torch.from_numpy(frames.resized(t, self.size)).permute(2, 0, 1).float().div_(255).to(self.device)

    # -- the decoder side ---------------------------------------------------------------------------------
    def frames(self, frames: FrameSource, answer: Answer, *, mode: str = "propagate", instruction: str = "",
               history: list[tuple[str, str]] = ()) -> Iterator[FrameResult]:
        """Frame results as they are ready (key frames first, then forwards, then backwards)."""
        if answer.num_objects == 0:
            return
        frame_at = lambda t: self._tensor(frames, t)[None]  # noqa: E731
        with torch.inference_mode():
            if mode == "per-frame" and frames.is_video:
                outputs = self._per_frame(frames, answer, instruction, history)
            elif frames.is_video:
                kwargs = {"cached": dict(answer.key_features)}  # a copy: the answer may be propagated again
                if self.redetect and self.model.config.decoder.kind == "sam2":
                    from instructseg.decoders.sam2 import Redetect

                    kwargs["redetect"] = Redetect()
                outputs = self._scene(frames, answer, kwargs["cached"]) if answer.scene is not None else None
                if outputs is None:
                    outputs = self.model.decoder.propagate(frame_at, len(frames), answer.key_prompts, **kwargs)
                    if answer.track_weights is not None and self.model.config.decoder.kind == "sam2":
                        outputs = self._chosen(frame_at, len(frames), answer, outputs, kwargs["cached"])
            else:
                features = self.model.decoder.features_at(0, frame_at, dict(answer.key_features))
                outputs = iter([(0, self.model.decoder.decode(features, answer.key_prompts[0]))])
            for t, out in outputs:
                yield self._frame_result(frames, t, out)

    def _chosen(self, frame_at, num_frames: int, answer: Answer, outputs: Iterator[tuple[int, DecoderOutput]],
                cached: dict) -> Iterator[tuple[int, DecoderOutput]]:
        """`outputs` (not started) with the parts of each object's mask that the track prior does not keep cleared
        (`instructseg.inference.track_choice`; decided before the first frame is out). Frames the choice encodes
        go into `cached`, the propagation's feature cache (up to `KEEP_FEATURES`)."""
        from instructseg.inference.track_choice import choose_tracks

        choice = choose_tracks(self.model.decoder, frame_at, num_frames, answer.key_prompts, answer.key_features,
                               answer.track_weights, keep=cached)
        for t, out in outputs:
            yield t, DecoderOutput(mask_logits=choice.apply(t, out.mask_logits), score_logits=out.score_logits)

    def _scene(self, frames: FrameSource, answer: Answer, cached: dict) -> Iterator[tuple[int, DecoderOutput]] | None:
        """The outputs of the scene choice (`instructseg.inference.scene_choice`), or None where it leaves the
        video to the usual path. Frames it encodes go into `cached`, as for the track choice."""
        from instructseg.inference.scene_choice import choose_scene

        scale = min(1.0, self.size / max(frames.height, frames.width))
        size = (max(1, round(frames.height * scale)), max(1, round(frames.width * scale)))

        def image_at(t: int) -> np.ndarray:
            frame = frames.frame(t)
            if size != frame.shape[:2]:
                x = torch.from_numpy(frame).permute(2, 0, 1)[None].float()
                frame = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)[0]
                return frame.permute(1, 2, 0).clamp_(0, 255).numpy() / 255.0
            return frame.astype(np.float32) / 255.0

        choice = choose_scene(self.model.decoder, lambda t: self._tensor(frames, t)[None], image_at, len(frames),
                              answer.key_prompts, answer.key_features, answer.track_weights[0], keep=cached,
                              named=answer.scene, region_words=self.model.region_words,
                              num_objects=answer.num_objects)
        if choice is None:
            return None
        answer.names = choice.names
        return choice.outputs(size)

    def _per_frame(self, frames: FrameSource, answer: Answer, instruction: str,
                   history: list[tuple[str, str]]) -> Iterator[tuple[int, DecoderOutput]]:
        for t in range(len(frames)):
            inputs = self._inputs(frames, t, instruction, answer.raw_text, history)
            features = self.model.decoder.encode(inputs.frames)
            prompts = self.model.condition(inputs, features)
            answer.llm_calls += 1
            yield t, self.model.decoder.decode(features, prompts)

    def _frame_result(self, frames: FrameSource, t: int, out: DecoderOutput) -> FrameResult:
        logits = F.interpolate(out.mask_logits.float(), size=(frames.height, frames.width), mode="bilinear",
                               align_corners=False)[0]
        return FrameResult(index=t, name=frames.names[t], masks=(logits > 0).cpu().numpy(),
                           scores=out.score_logits[0].float().sigmoid().cpu().numpy())

    def _refine(self, frames: FrameSource, prompts: dict[int, Prompts], t: int, refinement: Refinement,
                num_objects: int) -> Prompts:
        """Key-frame prompts for frame t with the user's clicks or masks (nearest key frame's embeddings)."""
        base = prompts.get(t) or prompts[min(prompts, key=lambda k: (abs(k - t), k))]
        scale = np.array([self.size / frames.width, self.size / frames.height], dtype=np.float32)
        extra = {}
        if refinement.masks:
            masks = torch.zeros(1, num_objects, self.size, self.size)
            for obj, mask in refinement.masks.items():
                m = torch.from_numpy(mask.astype(np.float32))[None, None]
                masks[0, obj - 1] = F.interpolate(m, size=(self.size, self.size), mode="bilinear")[0, 0]
            extra["mask_inputs"] = masks.to(self.device)
        if refinement.points:
            p = max(len(lab) for _, lab in refinement.points.values())
            coords = torch.zeros(1, num_objects, p, 2)
            labels = -torch.ones(1, num_objects, p, dtype=torch.int32)
            for obj, (xy, lab) in refinement.points.items():
                coords[0, obj - 1, :len(lab)] = torch.from_numpy(np.asarray(xy, np.float32) * scale)
                labels[0, obj - 1, :len(lab)] = torch.as_tensor(lab, dtype=torch.int32)
            extra.update(point_coords=coords.to(self.device), point_labels=labels.to(self.device))
        return dataclasses.replace(base.objects(slice(None)), **extra)

class _Forward:
    """A stand-in rng for `reference_frames` that always picks forwards (inference is deterministic)."""

    def random(self) -> float:
        return 0.0


def check_request(instruction: str, mode: str, key_frames: int | None = None) -> str:
    """The stripped instruction; InputError for an empty one, an unknown mode or fewer than 1 key frame."""
    if key_frames is not None and key_frames < 1:
        raise InputError(f"--key-frames {key_frames}: must be at least 1")
    if mode not in MODES:
        raise InputError(f"--mode {mode!r}: expected one of {', '.join(MODES)}")
    if not isinstance(instruction, str) or not instruction.strip():
        raise InputError("the instruction is empty: say what to segment, e.g. \"segment the red circle\"")
    return instruction.strip()
