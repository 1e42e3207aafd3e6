"""`python -m instructseg.bench.segment INPUT INSTRUCTION --model M --out DIR`: what `instructseg segment` does
(load, answer, propagate, write result.json, masks and overlay), except that a randomly initialised LLM's answer is
forced to "[SEG]" (see `bench.infer`). `bench memory` runs it instead of `instructseg segment` for random-LLM
models, so that their runs decode and write masks like a trained model's.
"""
from __future__ import annotations

import argparse
import sys

from instructseg.errors import InputError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m instructseg.bench.segment")
    parser.add_argument("input")
    parser.add_argument("instruction")
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        from instructseg.bench.infer import ForcedAnswerModel
        from instructseg.inference.io import open_source
        from instructseg.inference.predictor import InstructSegPredictor
        from instructseg.model.checkpoint import load_model

        source = open_source(args.input)
        model = load_model(args.model)
        predictor = InstructSegPredictor(model)
        if model.config.llm.random_init:
            predictor.model = ForcedAnswerModel(model)
        result = predictor.segment(source, args.instruction, out_dir=args.out)
    except InputError as err:
        print(f"instructseg: error: {err}", file=sys.stderr)
        return 2
    print(result.text)
    print(f"{len(result.objects)} object(s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
