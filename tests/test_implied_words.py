"""Implied words: the colour and shape an instruction's targets have, read from its words, and their fit on the
words that ReVOS-format answers name."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from instructseg.errors import InputError
from instructseg.model.implied_words import IMPLIED_P, ImpliedWords
from instructseg.train.implied_fit import UNLABELLED, ImpliedRows, implied_accuracy, implied_loss
from instructseg.train.prior_stage import fit_head

VOCABULARIES = {"attribute": ["red", "blue"], "category": ["circle", "square", "star"]}


def test_an_unfitted_head_implies_nothing_and_a_fitted_one_only_what_its_words_tell():
    """Bags of one-hot tokens: token 0 ("no corners") always goes with circles of either colour, token 1 ("the
    colour of the sky") with blue shapes of any kind, token 2 ("moving left") with anything (colours and shapes
    spread evenly over each token's rows). After the fit the head
    implies circle for the first, blue for the second and nothing for the third, whose words do not tell."""
    width = 6
    head = ImpliedWords(VOCABULARIES, width=width)
    words = torch.zeros(12, width)
    labels = []
    for i in range(12):
        token = i % 3
        words[i, token] = 1.0
        words[i, 3 + (i // 6) % 2] = 1.0  # words every instruction has, in two mixes that tell nothing
        colour, shape = (i // 3) % 2, (i // 3) % 3
        labels.append([1 if token == 1 else colour, 0 if token == 0 else shape])
    rows = ImpliedRows(words, torch.tensor(labels))
    head.set_statistics(words)
    assert head.implied(words[0]) == {} and implied_accuracy(head, rows) == 0.0
    torch.manual_seed(0)
    losses = fit_head(head, rows, implied_loss, SimpleNamespace(steps=200, lr=3e-2, warmup_steps=1, batch_size=12),
                      seed=0, log_path=None, name="words")
    assert losses[-1] < losses[0]
    assert head.implied(words[0]) == {"category": {"circle"}}
    assert head.implied(words[1]) == {"attribute": {"blue"}}
    assert head.implied(words[2]) == {}
    with torch.no_grad():
        parts = head.split(head(words[2][None, None], torch.ones(1, 1, dtype=torch.bool))[0, 0]).values()
    assert all(float(part.softmax(-1).max()) < IMPLIED_P for part in parts)
    assert 0.0 < implied_accuracy(head, rows) < 1.0  # the third token's labels are never implied


def test_rows_label_the_one_word_of_each_vocabulary_an_answer_names(synth_root):
    from instructseg.config import preset
    from instructseg.data.formats.revos import read_revos
    from instructseg.data.synthetic_scene import COLOURS, SHAPES
    from instructseg.model.instructseg import InstructSegModel
    from instructseg.model.track_prior import named_words
    from instructseg.train.implied_fit import implied_rows

    model = InstructSegModel(preset("tiny").override([
        "implied_words=true", f"attribute_names=[{', '.join(COLOURS)}]", f"category_names=[{', '.join(SHAPES)}]"]))
    colours, shapes = list(COLOURS), list(SHAPES)
    expressions = read_revos(synth_root / "revos", "train")
    rows = implied_rows(model, expressions)
    used = [e for e in expressions if e.type_id in (0, 1) and e.obj_ids and (
        len(named_words(e.answer, colours)) == 1 or len(named_words(e.answer, shapes)) == 1)]
    assert len(rows) == len(used) > 0 and rows.words.shape[0] == len(used)
    for e, (colour, shape) in zip(used, rows.labels.tolist()):
        said_colours, said_shapes = named_words(e.answer, colours), named_words(e.answer, shapes)
        assert colour == (colours.index(next(iter(said_colours))) if len(said_colours) == 1 else UNLABELLED)
        assert shape == (shapes.index(next(iter(said_shapes))) if len(said_shapes) == 1 else UNLABELLED)
    with pytest.raises(InputError, match="no video expression whose answer names"):
        implied_rows(model, [e for e in expressions if e.type_id == 2])


def test_a_model_needs_vocabularies_for_implied_words():
    from instructseg.config import preset
    from instructseg.model.instructseg import InstructSegModel

    with pytest.raises(InputError, match="implied_words=true needs the words to imply"):
        InstructSegModel(preset("tiny").override(["implied_words=true"]))
