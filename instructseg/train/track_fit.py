"""Fitting the track prior (`instructseg.model.track_prior`) on the ground-truth object tracks of ReVOS-format data.

Per expression, the candidates are the video's objects that the expression's own vocabulary words allow (its
colour and shape words, from the model's `attribute_names` / `category_names`; all objects when it names none, or
when the model has no vocabularies), as the mask of a model that follows those words covers them, and the objects
sharing a colour or a shape with a meant one, which such a mask also covers when the model confuses them (there
the words cannot tell, and the head learns to score the candidates alike); an object's words come from the
answers of expressions that refer to it alone. Expressions with one candidate teach nothing
and are skipped. Each candidate is described by `instructseg.decoders.tracks`; the head learns, from the words,
which candidates are meant (binary cross-entropy per candidate). No model output is needed, so the fit takes
seconds after reading the masks.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from instructseg.decoders.tracks import TRACK_FEATURES, mask_summary, track_features
from instructseg.errors import InputError
from instructseg.model.tokens import pad_prompts
from instructseg.model.track_prior import named_words
from instructseg.train.rows import Rows


@dataclass
class TrackRows(Rows):
    """words (M, H); features (M, P, TRACK_FEATURES) zero-padded; labels (M, P) 1 for the meant candidates; valid
    (M, P) bool."""

    words: torch.Tensor
    features: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor


def instruction_words(model, texts: list[str], batch: int = 512) -> torch.Tensor:
    """(M, H) the model's instruction words (what the track prior reads) of each text asked as an instruction (in
    batches: with LoRA unmerged, each embedding call rebuilds the word table)."""
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            prompts = [model.layout.encode(text, None, []) for text in texts[i:i + batch]]
            padded = pad_prompts(prompts, model.tokenizer.pad_token_id)
            out.append(model.instruction_words(padded["input_ids"], padded["instruction_mask"]).cpu())
    return torch.cat(out)


def track_rows(model, expressions) -> TrackRows:
    """Rows of `expressions` (`VideoExpression`s of ReVOS-format data: referring and reasoning ones are used)."""
    colours, shapes = list(model.config.attribute_names), list(model.config.category_names)
    by_video = defaultdict(list)
    for e in expressions:
        if e.type_id in (0, 1) and e.obj_ids:
            by_video[e.video].append(e)
    texts, feats, labels = [], [], []
    for exps in by_video.values():
        summaries, names = {}, {}
        for e in exps:
            if any(obj not in summaries for obj in e.obj_ids):  # each object's masks are read once
                for obj, m in zip(e.obj_ids, e.mask_loader()):
                    summaries.setdefault(obj, mask_summary(m))
            if len(e.obj_ids) == 1 and e.answer:
                names[e.obj_ids[0]] = (named_words(e.answer, colours), named_words(e.answer, shapes))
        for e in exps:
            asked = (named_words(e.text, colours), named_words(e.text, shapes))
            fits = lambda obj: obj in names and all(  # noqa: E731
                not a or (names[obj][i] & a) for i, a in enumerate(asked))
            alike = lambda obj: obj in names and any(  # noqa: E731
                names[obj][i] & names[t][i] for t in e.obj_ids if t in names for i in (0, 1))
            cands = [o for o, s in summaries.items() if s is not None and (o in e.obj_ids or fits(o) or alike(o))]
            if len(cands) < 2 or not any(o in e.obj_ids for o in cands):
                continue
            texts.append(e.text)
            feats.append(track_features(np.stack([summaries[o] for o in cands])))
            labels.append(np.array([o in e.obj_ids for o in cands], np.float32))
    if not texts:
        raise InputError("prior.data: no video expression with two or more candidate objects; the track prior needs "
                         "ReVOS-format video expressions")
    p = max(len(x) for x in labels)
    rows = TrackRows(instruction_words(model, texts), torch.zeros(len(texts), p, TRACK_FEATURES),
                     torch.zeros(len(texts), p), torch.zeros(len(texts), p, dtype=torch.bool))
    for i, (f, y) in enumerate(zip(feats, labels)):
        rows.features[i, :len(y)] = torch.from_numpy(f)
        rows.labels[i, :len(y)] = torch.from_numpy(y)
        rows.valid[i, :len(y)] = True
    return rows


def scores(prior, words: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """(M, P) part scores under `prior` for words (M, H) and features (M, P, TRACK_FEATURES)."""
    out = prior.each(words)
    return torch.einsum("mpf,mf->mp", features, out[:, :-1]) + out[:, -1:]


def track_loss(prior, rows: TrackRows) -> torch.Tensor:
    """Binary cross-entropy of each valid candidate's score against whether it is meant."""
    z = scores(prior, rows.words, rows.features)
    loss = F.binary_cross_entropy_with_logits(z, rows.labels, reduction="none")
    valid = rows.valid.float()
    return (loss * valid).sum() / valid.sum()


def exact_choices(prior, rows: TrackRows) -> float:
    """Share of rows where the kept candidates (`tracks.choose`) are exactly the meant ones."""
    from instructseg.decoders.tracks import choose

    with torch.no_grad():
        z = scores(prior, rows.words, rows.features).numpy()
    right = [np.array_equal(choose(z[i][v]), y[v] > 0)
             for i, (v, y) in enumerate(zip(rows.valid.numpy(), rows.labels.numpy()))]
    return float(np.mean(right))


def fit_tracks(model, stage, *, seed: int, log_path: Path | None = None) -> tuple[int, list[float]]:
    """Fit the model's track prior on every expression of `stage.data`'s revos sources (its statistics set to
    their words first); (rows, losses)."""
    return fit_on_expressions(model.track_prior, stage, lambda expressions: track_rows(model, expressions),
                              track_loss, seed=seed, log_path=log_path, name="tracks", device=model.device,
                              needs="video expressions with per-object masks")


def fit_on_expressions(head, stage, rows_of, loss, *, seed: int, log_path: Path | None, name: str, device,
                       needs: str) -> tuple[int, list[float]]:
    """Fit a word head (`head`, a WordLinear) on `rows_of(expressions)` of every expression of `stage.data`'s revos
    sources, on `device`, its statistics set to their words first (`prior.fit` entry `name`; `needs`: what the
    sources must hold, for the error). (rows, losses)."""
    from instructseg.data.formats.revos import read_revos
    from instructseg.train.prior_stage import fit_head

    expressions = [e for source in stage.data if source.kind == "revos"
                   for e in read_revos(Path(source.root), source.split)]
    if not expressions:
        raise InputError(f"prior.fit lists {name}, but prior.data has no revos source ({needs})")
    rows = rows_of(expressions).to(device)
    head.set_statistics(rows.words)
    return len(rows), fit_head(head, rows, loss, stage, seed=seed, log_path=log_path, name=name)
