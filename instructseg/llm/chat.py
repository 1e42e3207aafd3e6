"""Chat templates: the text around one user message, taken from the tokenizer's own template.

We render the template once with a marker as the user's content and split around it, so any chat model's format is
respected (SmolLM2's `<|im_start|>`, Qwen's, Llama's) and a tokenizer without a template gets a plain fallback.
"""
from __future__ import annotations

_MARK = "\u2063INSTRUCTSEG_CONTENT\u2063"
_FALLBACK = ("{system}\n", "User: ", "\nAssistant: ")


def template_parts(tokenizer, system: str, history: list[tuple[str, str]] = ()) -> tuple[str, str]:
    """(text before the new user message's content, text after it up to the start of the assistant's answer).

    `history` holds earlier (user, assistant) turns; they are rendered into the prefix."""
    messages = [{"role": "system", "content": system}] if system else []
    for user, assistant in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    messages.append({"role": "user", "content": _MARK})
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        before, _, after = text.partition(_MARK)
        return before, after
    system_text, user, assistant = _FALLBACK
    prefix = system_text.format(system=system) if system else ""
    for u, a in history:
        prefix += f"{user}{u}{assistant}{a}\n"
    return prefix + user, assistant
