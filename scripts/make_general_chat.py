"""Write a replay set of general questions answered by the base SmolLM2-135M-Instruct itself (self-distillation),
in LLaVA chat format without images, so that fine-tuning on ShapesIVS keeps the LLM's general chat.

    python scripts/make_general_chat.py data/general_chat
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from instructseg.config import LLMConfig
from instructseg.llm.loading import load_causal_lm, load_tokenizer

QUESTIONS = [
    "What is the capital of France?", "What is the capital of Germany?", "What is the capital of Italy?",
    "What is the capital of Spain?", "What is the capital of Japan?", "What is the capital of England?",
    "How many days are in a week?", "How many legs does a spider have?", "What colour is the sky on a clear day?",
    "What is two plus two?", "What is ten minus three?", "What is the largest planet in the solar system?",
    "What gas do plants take in from the air?", "What is water made of?", "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in Celsius?", "Name a fruit that is yellow.", "What do bees make?",
    "How many continents are there?", "What is the opposite of hot?", "What is the freezing point of water?",
    "Translate 'hello' into French.", "What is a triangle?", "How many sides does a hexagon have?",
    "What is the main language spoken in Brazil?", "What animal is known as the king of the jungle?",
    "What is the chemical symbol for gold?", "Give me a synonym for happy.", "What is the sun?",
    "Write one sentence about the sea.", "What season comes after winter?", "What is photosynthesis?",
]


def main(out: str) -> None:
    cfg = LLMConfig(source="smollm2")
    tokenizer = load_tokenizer(cfg)
    model = load_causal_lm(cfg, len(tokenizer)).eval()
    items = []
    for i, question in enumerate(QUESTIONS):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=40, do_sample=False)
        answer = tokenizer.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        answer = answer.split("\n")[0].strip()
        items.append({"id": f"general-{i:03d}", "conversations": [{"from": "human", "value": question},
                                                                   {"from": "gpt", "value": answer}]})
        print(f"{question} -> {answer}")
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    (path / "conversations.json").write_text(json.dumps(items, indent=1))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "data/general_chat")
