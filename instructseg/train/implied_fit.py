"""Fitting the implied words (`instructseg.model.implied_words`) on the answers of ReVOS-format data.

Per expression with targets (referring and reasoning ones), each vocabulary's label is the one word of that
vocabulary its answer names ("The black circle and the red circle have no corners.": circle for the shapes; two
colours, so no colour label); an answer that names none or several gives that vocabulary no label. The head learns
a softmax per vocabulary (cross-entropy on the labelled ones). No model output and no mask is read, so the fit
takes seconds.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from instructseg.errors import InputError
from instructseg.model.track_prior import named_words
from instructseg.train.rows import Rows
from instructseg.train.track_fit import fit_on_expressions, instruction_words

UNLABELLED = -100


@dataclass
class ImpliedRows(Rows):
    """words (M, H); labels (M, V): per vocabulary the word index, UNLABELLED where the answer names no one word."""

    words: torch.Tensor
    labels: torch.Tensor


def implied_rows(model, expressions) -> ImpliedRows:
    """Rows of `expressions` (`VideoExpression`s of ReVOS-format data) whose answers name one word of some
    vocabulary of the model's implied-words head."""
    vocabularies = model.implied_words.vocabularies
    texts, labels = [], []
    for e in expressions:
        if e.type_id not in (0, 1) or not e.obj_ids or not e.answer:
            continue
        row = []
        for words in vocabularies.values():
            named = named_words(e.answer, words)
            row.append(words.index(next(iter(named))) if len(named) == 1 else UNLABELLED)
        if any(label != UNLABELLED for label in row):
            texts.append(e.text)
            labels.append(row)
    if not texts:
        raise InputError("prior.data: no video expression whose answer names a colour or shape of the model's "
                         "vocabularies; the implied words need ReVOS-format video expressions with answers")
    return ImpliedRows(instruction_words(model, texts), torch.tensor(labels))


def implied_loss(head, rows: ImpliedRows) -> torch.Tensor:
    """Cross-entropy of each labelled vocabulary's softmax, averaged over the vocabularies."""
    losses = []
    for v, part in enumerate(head.split(head.each(rows.words).float()).values()):
        labels = rows.labels[:, v]
        if bool((labels != UNLABELLED).any()):
            losses.append(F.cross_entropy(part, labels, ignore_index=UNLABELLED))
    return torch.stack(losses).mean()


def implied_accuracy(head, rows: ImpliedRows) -> float:
    """Share of labelled (row, vocabulary) pairs whose label the head implies (at IMPLIED_P)."""
    from instructseg.model.implied_words import IMPLIED_P

    with torch.no_grad():
        logits = head.each(rows.words)
    right, total = 0, 0
    for v, part in enumerate(head.split(logits.float()).values()):
        p, pick = part.softmax(-1).max(-1)
        labelled = rows.labels[:, v] != UNLABELLED
        right += int(((pick == rows.labels[:, v]) & (p >= IMPLIED_P) & labelled).sum())
        total += int(labelled.sum())
    return right / max(total, 1)


def fit_implied(model, stage, *, seed: int, log_path: Path | None = None) -> tuple[int, list[float]]:
    """Fit the model's implied words on every expression of `stage.data`'s revos sources (its statistics set to
    their words first); (rows, losses)."""
    return fit_on_expressions(model.implied_words, stage, lambda expressions: implied_rows(model, expressions),
                              implied_loss, seed=seed, log_path=log_path, name="words", device=model.device,
                              needs="video expressions with answers")
