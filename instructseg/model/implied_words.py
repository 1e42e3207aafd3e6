"""Implied words: the colour and the shape that an instruction's targets have, read from its words where it does not
name them ("the shape with no corners": a circle; "Which shape is the colour of a ripe tomato?": red).

The scene choice (`instructseg.inference.scene_choice`) keeps as candidates the regions that the region words read
as the colours and shapes an instruction names. Knowledge questions name none, and their targets are everything of
one shape or colour; the LLM's own masks for them are weak (on ShapesIVS valid, 57 J&F and a third of the answers
right for shapes by knowledge; docs/default_model.md, "Implied words"). This head reads the instruction's mean word
embedding, as the track prior does (`instructseg.model.word_linear`), and gives one distribution over each
vocabulary's words; a word with probability at least IMPLIED_P is implied. It is fitted (`prior.fit: [words]`,
`instructseg.train.implied_fit`) on the words that ReVOS-format training answers name: an instruction whose answer
names one colour (or one shape) teaches that word; for an instruction like "the large shape moving left" the
target's colour changes from video to video, so the head learns no word for it.
"""
from __future__ import annotations

import torch

from instructseg.model.word_linear import WordLinear

IMPLIED_HIDDEN = 256
IMPLIED_P = 0.9  # a word is implied when the head gives it at least this probability


class ImpliedWords(WordLinear):
    """forward(inputs (B, N, H), valid (B, N)) -> (B, N, total words): each vocabulary's logits in turn."""

    def __init__(self, vocabularies: dict[str, list[str]], *, width: int, momentum: float = 0.05):
        self.vocabularies = {kind: list(words) for kind, words in vocabularies.items()}
        super().__init__(width=width, out=sum(len(words) for words in self.vocabularies.values()), momentum=momentum,
                         hidden=IMPLIED_HIDDEN)

    def split(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """{vocabulary: its logits (..., words)} of `logits` (..., total words)."""
        out, start = {}, 0
        for kind, words in self.vocabularies.items():
            out[kind] = logits[..., start:start + len(words)]
            start += len(words)
        return out

    @torch.no_grad()
    def implied(self, words: torch.Tensor) -> dict[str, set[str]]:
        """{vocabulary: {word}} for the vocabularies where one word of the instruction words (H,) has at least
        IMPLIED_P probability."""
        out = {}
        for kind, part in self.split(self.each(words[None])[0].float()).items():
            p = part.softmax(-1)
            if float(p.max()) >= IMPLIED_P:
                out[kind] = {self.vocabularies[kind][int(p.argmax())]}
        return out
