"""Training samples: the readers' typed samples (`instructseg.data.types`) turned into (frames, instruction,
answer with [SEG] tokens, key-frame masks), one map dataset per kind of source.

Every dataset is deterministic: item `index` of pass `epoch` uses its own `random.Random` seeded from
(seed, index, epoch) by integer arithmetic (no `hash()`), so any worker, rank or resumed run rebuilds the same sample.
The answer format lives here only (`answer_with_segs`), for training and for reading answers back at inference.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from instructseg.data.formats import REFCOCO_DATASETS, VIDEO_READERS, read_llava, read_reasonseg, read_refcoco
from instructseg.data.sampling import reference_frames, sample_video_frames
from instructseg.data.types import ChatSample, ImageSample, VideoExpression
from instructseg.errors import InputError
from instructseg.model.tokens import SEG

TASKS = ("res", "chat", "rvos", "reasonseg", "revos")
SOURCE_TASKS = {"revos": "revos", "refytvos": "rvos", "mevis": "rvos", "davis17": "rvos", "refcoco": "res",
                "refcoco+": "res", "refcocog": "res", "reasonseg": "reasonseg", "chat": "chat"}
REFCOCO_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
NO_TARGET_ANSWER = "There is no such object."
BLANK_IMAGE_SIZE = 64  # an image-less chat sample gets a black square of this side


@dataclass
class TrainingSample:
    """One training example. Masks are on the key frame, one per [SEG] of `answer`, in the same order.

    key_frame:  (H, W, 3) uint8 RGB.
    ref_frames: R frames (H, W, 3) uint8 next to the key frame, in time order (videos), or None (images).
                They feed OVP, and SAM2 memory learns to track the key-frame masks through them.
    ref_backward: whether the reference frames precede the key frame (SAM2 then tracks them last first).
    masks:      (K, H, W) bool, K = answer.count("[SEG]") (0 for chat and no-target expressions).
    ref_masks:  (R, K, H, W) bool, the same objects on the reference frames (videos), or None.
    history:    earlier (user, assistant) turns of a conversation.
    semantic:   (H, W) int16 category map of the key frame (every annotated object, 0 elsewhere) for the auxiliary
                category heads, or None (no categories in the source).
    attributes: (H, W) int16 attribute map of the same objects (0 elsewhere) for the word slots, or None.
    """

    task: str
    key_frame: np.ndarray
    ref_frames: list[np.ndarray] | None
    instruction: str
    answer: str
    masks: np.ndarray
    history: list[tuple[str, str]] = field(default_factory=list)
    ref_masks: np.ndarray | None = None
    semantic: np.ndarray | None = None
    attributes: np.ndarray | None = None
    ref_backward: bool = False


# ------------------------------------------------------------------------------------------------ text

def _seg_list(k: int) -> str:
    segs = [SEG] * k
    return segs[0] if k == 1 else ", ".join(segs[:-1]) + " and " + segs[-1]


def answer_with_segs(text: str | None, num_objects: int) -> str:
    """The answer the model learns: `text` followed by one [SEG] per object, or "Sure, [SEG]." without text.

    ("It is the red circle.", 1) -> "It is the red circle. [SEG]"; (None, 2) -> "Sure, [SEG] and [SEG].";
    (None, 3) -> "Sure, [SEG], [SEG] and [SEG]."; (text, 0) -> text or "There is no such object.".
    A text that already holds exactly `num_objects` [SEG]s is kept as it is.
    """
    if num_objects < 0:
        raise ValueError(f"num_objects must be >= 0, got {num_objects}")
    text = (text or "").strip()
    if SEG in text:
        if text.count(SEG) != num_objects:
            raise InputError(f"answer {text!r} holds {text.count(SEG)} {SEG} tokens for {num_objects} objects")
        return text
    if num_objects == 0:
        return text or NO_TARGET_ANSWER
    return f"{text} {_seg_list(num_objects)}" if text else f"Sure, {_seg_list(num_objects)}."


def parse_answer(raw: str) -> tuple[str, int]:
    """(text without [SEG]s, number of [SEG]s) of a generated answer: the inverse of `answer_with_segs`.

    A generated list of [SEG]s that is not quite in form ("[SEG] and", "[SEG], and [SEG]") is dropped whole, so the
    text never ends in its leftover commas and "and"s."""
    count = raw.count(SEG)
    text = raw.strip()
    if count == 0:
        return text, 0
    head, _, tail = text.partition(SEG)
    if _SEG_LIST_LEFTOVER.fullmatch(tail.replace(SEG, " ")):
        head = head.strip()
        return ("" if head == "Sure," else head), count
    return " ".join(text.replace(SEG, " ").split()), count


_SEG_LIST_LEFTOVER = re.compile(r"(?:[\s,.]|\band\b)*")


# a run of [SEG]s joined by commas / "and" (and, at the very end, a dangling comma or "and" after it)
_SEG_LIST = re.compile(r"\[SEG\](?:\s*,?\s*(?:and\s+)?\[SEG\])*(?:[\s,]*(?:\band)?\s*$)?")


def answer_text(raw: str) -> str:
    """The answer as a user reads it: each [SEG] list dropped with its commas and "and"s, and no space, comma or
    colon before a stop ("Sure, [SEG] and [SEG]." -> "Sure."; "It is X. [SEG], [SEG] and" -> "It is X.")."""
    return re.sub(r"[\s,:;]+([.!?])", r"\1", " ".join(_SEG_LIST.sub(" ", raw).split()))


_TEMPLATES = {
    "image": ("{exp}", "Segment {exp}.", "Please segment {exp}.", "Where is {exp}?", "Can you segment {exp}?",
              "Find {exp} in the image.", "Please segment {exp} in this image."),
    "video": ("{exp}", "Segment {exp}.", "Please segment {exp}.", "Where is {exp}?", "Can you segment {exp}?",
              "Find {exp} in the video.", "Please segment {exp} in this video."),
}


def phrase_instruction(text: str, rng: random.Random, *, kind: str) -> str:
    """A random natural request for a referring expression (`kind` "image" or "video"). A question (text ending
    in "?", as reasoning queries are) is kept as written."""
    if kind not in _TEMPLATES:
        raise ValueError(f"kind must be one of {', '.join(_TEMPLATES)}, got {kind!r}")
    text = " ".join(text.split())
    if not text or text.endswith("?"):
        return text
    exp = text.rstrip(".")
    return rng.choice(_TEMPLATES[kind]).format(exp=exp)


# ---------------------------------------------------------------------------------------------- frames

def load_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB from any image file PIL reads: grey, grey+alpha, RGBA (alpha dropped), palette,
    CMYK, and 16-bit grey (scaled to 8 bits)."""
    try:
        with Image.open(path) as image:
            if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grey (PNG/TIFF)
                grey = np.asarray(image).astype(np.float64) / 257.0
                return np.repeat(np.clip(np.rint(grey), 0, 255).astype(np.uint8)[..., None], 3, axis=2)
            if image.mode == "F":
                grey = np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=2)
            return np.asarray(image.convert("RGB")).copy()
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot read image ({err})") from None


def _rng(seed: int, index: int, epoch: int) -> random.Random:
    return random.Random((seed * 1_000_003 + index) * 1_000_033 + epoch)


def _check_frame(frame: np.ndarray, height: int, width: int, source: str) -> np.ndarray:
    if frame.shape[:2] != (height, width):
        raise InputError(f"{source}: frame is {frame.shape[1]}x{frame.shape[0]}, the annotations {width}x{height}")
    return frame


class _Dataset:
    """Map-dataset base: `__getitem__(index)` is `sample(index, epoch=0)`."""

    def __getitem__(self, index: int) -> TrainingSample:
        return self.sample(index, 0)

    @staticmethod
    def _check_task(task: str) -> str:
        if task not in TASKS:
            raise InputError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")
        return task

    def sample(self, index: int, epoch: int = 0) -> TrainingSample:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        return self._make(index, _rng(self.seed, index, epoch))


class VideoExpressionDataset(_Dataset):
    """Video expressions: a key frame where the targets are visible (all of them if possible), `num_ref_frames`
    reference frames within `jump` of it, and the key frame's masks. No-target expressions stay (0 masks).
    Reasoning questions are kept as written; other expressions are phrased as requests."""

    def __init__(self, expressions: list[VideoExpression], task: str, num_ref_frames: int, jump: int, seed: int):
        self.items, self.task, self.seed = list(expressions), self._check_task(task), seed
        self.num_ref_frames, self.jump = num_ref_frames, jump

    def __len__(self) -> int:
        return len(self.items)

    def _make(self, index: int, rng: random.Random) -> TrainingSample:
        expr = self.items[index]
        masks = expr.masks()                                  # (K, T, H, W)
        visible = masks.any(axis=(2, 3))                      # (K, T)
        candidates = None
        if masks.shape[0]:
            for frames in (visible.all(axis=0), visible.any(axis=0)):
                if frames.any():
                    candidates = np.flatnonzero(frames).tolist()
                    break
        key, _ = sample_video_frames(expr.num_frames, 0, self.jump, rng, candidates=candidates)
        refs, backward = reference_frames(expr.num_frames, key, self.num_ref_frames, rng)
        source = f"{expr.dataset} {expr.key}"
        loaded: dict[int, np.ndarray] = {}
        for t in [key, *refs]:
            if t not in loaded:
                loaded[t] = _check_frame(load_rgb(expr.frame_paths[t]), expr.height, expr.width, source)
        return TrainingSample(task=self.task, key_frame=loaded[key], ref_frames=[loaded[t] for t in refs],
                              instruction=phrase_instruction(expr.text, rng, kind="video"),
                              answer=answer_with_segs(expr.answer, masks.shape[0]), masks=masks[:, key].copy(),
                              ref_masks=masks[:, refs].transpose(1, 0, 2, 3).copy(), ref_backward=backward)


class ImageSampleDataset(_Dataset):
    """Image sentences (RefCOCO/+/g, ReasonSeg): the image, its masks and a phrased request (sentences kept)."""

    def __init__(self, samples: list[ImageSample], task: str, seed: int):
        self.items, self.task, self.seed = list(samples), self._check_task(task), seed

    def __len__(self) -> int:
        return len(self.items)

    def _make(self, index: int, rng: random.Random) -> TrainingSample:
        item = self.items[index]
        masks = item.masks()
        image = _check_frame(load_rgb(item.image_path), item.height, item.width, f"{item.dataset} {item.sample_id}")
        instruction = item.text if item.is_sentence else phrase_instruction(item.text, rng, kind="image")
        return TrainingSample(task=self.task, key_frame=image, ref_frames=None, instruction=instruction,
                              answer=answer_with_segs(item.answer, masks.shape[0]), masks=masks,
                              semantic=item.semantic(), attributes=item.attributes())


def _pairs(sample: ChatSample) -> list[tuple[str, str]]:
    """(user, assistant) exchanges of a conversation (a trailing unanswered user turn is dropped)."""
    pairs, turns = [], sample.turns
    for i in range(0, len(turns) - 1, 2):
        (r1, user), (r2, assistant) = turns[i], turns[i + 1]
        if (r1, r2) != ("user", "assistant"):
            raise InputError(f"chat {sample.sample_id}: turns {i}-{i + 1} are {r1}, {r2}; expected user, assistant")
        pairs.append((user, assistant))
    if not pairs:
        raise InputError(f"chat {sample.sample_id}: no user/assistant exchange")
    return pairs


class ChatDataset(_Dataset):
    """Conversations: one exchange at random is the answer to learn, the earlier ones its history. No masks."""

    def __init__(self, samples: list[ChatSample], seed: int):
        self.items, self.task, self.seed = list(samples), "chat", seed

    def __len__(self) -> int:
        return len(self.items)

    def _make(self, index: int, rng: random.Random) -> TrainingSample:
        item = self.items[index]
        pairs = _pairs(item)
        turn = rng.randrange(len(pairs))
        if item.image_path is None:
            image = np.zeros((BLANK_IMAGE_SIZE, BLANK_IMAGE_SIZE, 3), np.uint8)
        else:
            image = load_rgb(item.image_path)
        user, assistant = pairs[turn]
        return TrainingSample(task="chat", key_frame=image, ref_frames=None, instruction=user,
                              answer=answer_with_segs(assistant, 0), masks=np.zeros((0, *image.shape[:2]), bool),
                              history=list(pairs[:turn]))


def build_source(kind: str, root: Path, split: str, *, num_ref_frames: int, jump: int, seed: int,
                 split_by: str | None = None) -> VideoExpressionDataset | ImageSampleDataset | ChatDataset:
    """The training dataset of one source `kind` (a key of `SOURCE_TASKS`) read from `root`.

    Videos: `root` is the dataset folder. RefCOCO*: `split_by` defaults to "unc" (refcoco, refcoco+) or "umd"
    (refcocog). Chat: `root/conversations.json` with image paths relative to `root` (`split` is not used).
    """
    if kind not in SOURCE_TASKS:
        raise InputError(f"unknown data source {kind!r}: expected one of {', '.join(SOURCE_TASKS)}")
    root, task = Path(root), SOURCE_TASKS[kind]
    if kind in VIDEO_READERS:
        return VideoExpressionDataset(VIDEO_READERS[kind](root, split), task, num_ref_frames, jump, seed)
    if kind in REFCOCO_DATASETS:
        samples = read_refcoco(root, kind, split_by or REFCOCO_SPLIT_BY[kind], split)
        return ImageSampleDataset(samples, task, seed)
    if kind == "reasonseg":
        return ImageSampleDataset(read_reasonseg(root, split), task, seed)
    return ChatDataset(read_llava(root / "conversations.json", root), seed)
