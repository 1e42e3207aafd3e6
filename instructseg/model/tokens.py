"""Special tokens and the prompt layout.

A prompt is assembled from token-id segments, so every position is known by construction and never guessed:

    [chat prefix] [<img> x V] [<ref> x R] [instruction] [<mq> x N] [chat suffix] [answer ... [SEG] ... eos]

`<img>`, `<ref>` and `<mq>` are placeholders whose embeddings are replaced by visual tokens, OVP tokens and the
learnable mask queries; every `[SEG]` in the answer becomes one object.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from instructseg.llm.chat import template_parts

SEG = "[SEG]"
IMG = "<img>"
REF = "<ref>"
MQ = "<mq>"
SPECIAL_TOKENS = (SEG, IMG, REF, MQ)
IGNORE_INDEX = -100


def add_special_tokens(tokenizer) -> dict[str, int]:
    """Register our tokens (idempotent) and return their ids."""
    missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}


@dataclass
class EncodedPrompt:
    """One prompt as token ids. Spans are [start, end) positions in `input_ids`.

    input_ids: (L,) long. labels: (L,) long, IGNORE_INDEX outside the answer. instruction: span of the user text.
    trimmed: the instruction was longer than the context allows and lost its end.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    instruction: tuple[int, int]
    answer_start: int
    trimmed: bool = False


class PromptLayout:
    """Builds `EncodedPrompt`s for one tokenizer and one model configuration."""

    def __init__(self, tokenizer, *, system_prompt: str, num_visual: int, num_ref: int, num_queries: int,
                 max_length: int):
        self.tokenizer = tokenizer
        self.ids = add_special_tokens(tokenizer)
        self.system_prompt = system_prompt
        self.counts = {IMG: num_visual, REF: num_ref, MQ: num_queries}
        self.max_length = max_length

    def _tok(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def encode(self, instruction: str, answer: str | None = None,
               history: list[tuple[str, str]] = ()) -> EncodedPrompt:
        """Encode a user instruction (and, for training, the answer to learn). An instruction too long for
        `max_length` is cut from the end; `EncodedPrompt.instruction` always spans what the model saw."""
        # earlier answers keep their words but not their [SEG] tokens: only this answer's [SEG]s are objects
        history = [(user, " ".join(answer.replace(SEG, " ").split())) for user, answer in history]
        before, after = template_parts(self.tokenizer, self.system_prompt, history)
        prefix = self._tok(before) + [self.ids[IMG]] * self.counts[IMG] + [self.ids[REF]] * self.counts[REF]
        suffix = [self.ids[MQ]] * self.counts[MQ] + self._tok(after)
        answer_ids = self._tok(answer) + [self.tokenizer.eos_token_id] if answer is not None else []
        text = self._tok("\n" + instruction.strip())
        room = self.max_length - len(prefix) - len(suffix) - len(answer_ids)
        if room < 2:
            raise ValueError(f"prompt layout needs {len(prefix) + len(suffix) + len(answer_ids) + 2} tokens, "
                             f"more than max_length={self.max_length}")
        trimmed = len(text) > room
        text = text[:room]
        ids = prefix + text + suffix + answer_ids
        labels = [IGNORE_INDEX] * (len(ids) - len(answer_ids)) + answer_ids
        start = len(prefix)
        return EncodedPrompt(input_ids=torch.tensor(ids), labels=torch.tensor(labels),
                             instruction=(start, start + len(text)), answer_start=len(ids) - len(answer_ids),
                             trimmed=trimmed)


def pad_prompts(prompts: list[EncodedPrompt], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of prompts: input_ids, attention_mask, labels (B, L) and instruction_mask (B, L) bool."""
    length = max(p.input_ids.numel() for p in prompts)
    batch = len(prompts)
    ids = torch.full((batch, length), pad_id, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    attn = torch.zeros(batch, length, dtype=torch.long)
    instr = torch.zeros(batch, length, dtype=torch.bool)
    for i, p in enumerate(prompts):
        n = p.input_ids.numel()
        ids[i, :n], labels[i, :n], attn[i, :n] = p.input_ids, p.labels, 1
        instr[i, p.instruction[0]:p.instruction[1]] = True
    return {"input_ids": ids, "attention_mask": attn, "labels": labels, "instruction_mask": instr}
