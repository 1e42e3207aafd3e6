"""Does the LLM read the image? Questions whose answer is only in the picture ("What colour is the circle?", "What
shape is the red one?") about freshly drawn ShapesIVS-world scenes, each asked twice through the predictor: with
the scene's own image and with the next scene's. A model that reads the image answers right more often with its
own image; one that answers from the question alone (a prior over likely words) scores the same with both. The gap
between the two is the measurement; the level alone is not.

    from instructseg.eval.reading import run
    from instructseg.inference.predictor import InstructSegPredictor
    run(InstructSegPredictor("default"), count=60)
"""
from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from instructseg.data.synthetic_scene import COLOURS, SHAPES, render, sample_image_scene

KINDS = {"colour": ("What colour is the {}?", tuple(COLOURS)), "shape": ("What shape is the {} one?", tuple(SHAPES))}


@dataclass
class Question:
    kind: str  # "colour" or "shape"
    text: str
    want: str  # the word the answer must name


def scene_questions(seed: int, size: int = 128) -> tuple[np.ndarray, list[Question]]:
    """A random scene's image (H, W, 3) uint8 and at most one question of each kind about it, only where the answer
    is unambiguous: the colour of the only object of its shape, the shape of the only object of its colour."""
    rng = np.random.default_rng([seed, 23])
    scene = sample_image_scene(rng, size, size)
    image = render(scene).frames[0]
    out = []
    for kind, (template, _) in KINDS.items():
        key, other = ("shape", "colour") if kind == "colour" else ("colour", "shape")
        values = [getattr(o, key) for o in scene.objects]
        unique = [o for o in scene.objects if values.count(getattr(o, key)) == 1]
        if unique:
            pick = unique[int(rng.integers(len(unique)))]
            out.append(Question(kind, template.format(getattr(pick, key)), getattr(pick, other)))
    return image, out


def named(answer: str, words: tuple[str, ...]) -> str | None:
    """The last of `words` the answer names ("The circle is red." -> "red"), or None."""
    found = re.findall(r"\b(%s)s?\b" % "|".join(map(re.escape, words)), answer.lower())
    return found[-1] if found else None


def run(predictor, *, count: int = 30, start: int = 40_000) -> dict[str, float]:
    """{kind: accuracy with the scene's own image, "kind (another scene's image)": accuracy with the next scene's}
    over the questions of `count` scenes."""
    scenes = [scene_questions(start + i) for i in range(count)]
    right = {kind: [] for kind in KINDS}
    other = {kind: [] for kind in KINDS}
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / f"scene{i}.png" for i in range(count)]
        for path, (image, _) in zip(paths, scenes):
            Image.fromarray(image).save(path)

        def ask(path: Path, question: Question) -> bool:
            text = predictor.segment(path, question.text).text
            return named(text, KINDS[question.kind][1]) == question.want

        for i, (_, questions) in enumerate(scenes):
            for q in questions:
                right[q.kind].append(ask(paths[i], q))
                if count > 1:
                    other[q.kind].append(ask(paths[(i + 1) % count], q))
    scores = {}
    for kind in KINDS:
        scores[kind] = float(np.mean(right[kind])) if right[kind] else float("nan")
        scores[f"{kind} (another scene's image)"] = float(np.mean(other[kind])) if other[kind] else float("nan")
    return scores
