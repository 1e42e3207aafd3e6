"""LLaVA-style chat data: `[{"id", "image"?, "conversations": [{"from": "human" | "gpt", "value"}, ...]}]`.

The `<image>` placeholder is removed from the text (the model decides where the image tokens go); roles become
"user" and "assistant".
"""
from __future__ import annotations

from pathlib import Path

from instructseg.data.formats.common import load_json, require, require_list
from instructseg.data.types import ChatSample
from instructseg.errors import InputError

IMAGE_TOKEN = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def _turn(message: dict, path: Path, where: str) -> tuple[str, str]:
    speaker = require(message, "from", path, where, str)
    if speaker not in ROLES:
        raise InputError(f"{path}: {where} has unknown speaker {speaker!r}, expected one of {', '.join(ROLES)}")
    text = require(message, "value", path, where, str)
    return ROLES[speaker], text.replace(IMAGE_TOKEN, "").strip()


def read_llava(json_path: Path, image_root: Path) -> list[ChatSample]:
    """All conversations in `json_path`; image paths are resolved against `image_root` (not opened here)."""
    json_path, image_root = Path(json_path), Path(image_root)
    items = require_list(load_json(json_path), json_path, "the top level")
    samples = []
    for i, item in enumerate(items):
        where = f"item {i}"
        messages = require_list(require(item, "conversations", json_path, where), json_path, f"{where} conversations")
        turns = [_turn(m, json_path, f"{where} conversations[{k}]") for k, m in enumerate(messages)]
        image = item.get("image")
        if image is not None and not isinstance(image, str):
            raise InputError(f"{json_path}: {where} 'image' must be a relative path string")
        samples.append(ChatSample(sample_id=str(item.get("id", i)),
                                  image_path=image_root / image if image else None, turns=turns))
    return samples
