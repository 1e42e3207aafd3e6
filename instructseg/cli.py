"""The `instructseg` command. Each subcommand imports its heavy dependencies only when it runs.

Bad input (an `InputError`, a missing file, a malformed argument) is printed as one line on stderr with exit code 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from instructseg.errors import InputError


def _cmd_synth(args: argparse.Namespace) -> int:
    from instructseg.data.synthetic import SynthSpec, generate

    spec = SynthSpec(seed=args.seed, videos=args.videos, images=args.images, frames=args.frames,
                     height=args.size[0], width=args.size[1])
    counts = generate(Path(args.out), spec)
    print(f"wrote ShapesIVS to {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def _cmd_eval_revos(args: argparse.Namespace) -> int:
    from instructseg.eval.revos import score_revos

    if args.predictions is None:
        raise InputError("eval revos: --predictions PRED is required (running a model here comes with the benchmark runner)")
    results = score_revos(Path(args.data_root), args.split, Path(args.predictions), Path(args.output),
                          workers=args.workers, legacy_visa=args.legacy_visa)
    _print_revos_table(results)
    print(f"wrote {Path(args.output) / 'results.json'}")
    return 0


def _print_revos_table(results: dict) -> None:
    keys = ("J", "F", "JF", "A", "R")
    print(f"{'':10s}" + "".join(f"{k:>8s}" for k in keys))
    for group in ("referring", "reason", "overall"):
        row = results[group]
        print(f"{group:10s}" + "".join(f"{row[k]:8.2f}" if row[k] is not None else f"{'-':>8s}" for k in keys))
    if results["missing"]:
        print(f"missing predictions: {len(results['missing'])} expressions scored 0")


def _cmd_model_info(args: argparse.Namespace) -> int:
    from instructseg.model.info import print_model_info

    print_model_info(args.model)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from instructseg.train.recipe import load_recipe
    from instructseg.train.trainer import train

    recipe = load_recipe(Path(args.recipe), args.overrides)
    final = train(recipe)
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        print(f"exported {final}")
    return 0


def _size(text: str) -> tuple[int, int]:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 16:
        raise argparse.ArgumentTypeError(f"size must be at least 16 pixels, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="instructseg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write ShapesIVS synthetic data in the public datasets' formats")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--videos", type=int, default=12, help="number of videos (split 3:1 into train/valid)")
    p.add_argument("--images", type=int, default=24, help="number of images (split 3:1 into train/valid)")
    p.add_argument("--frames", type=int, default=8, help="frames per video")
    p.add_argument("--size", type=_size, nargs=2, default=(128, 128), metavar=("H", "W"))
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("eval", help="benchmark a model or score predictions")
    bench = p.add_subparsers(dest="benchmark", required=True)
    r = bench.add_parser("revos", help="ReVOS: J, F, A, R per expression type")
    r.add_argument("--data-root", required=True)
    r.add_argument("--split", default="valid", choices=["train", "valid"])
    r.add_argument("--predictions", help="PRED/<video>/<exp_id>/<frame>.png to score")
    r.add_argument("--output", required=True)
    r.add_argument("--workers", type=int, default=1)
    r.add_argument("--legacy-visa", action="store_true",
                   help="reproduce the public scorer's un-binarised R and A on 0/255 PNGs")
    r.set_defaults(func=_cmd_eval_revos)

    p = sub.add_parser("train", help="fine-tune with DeepSpeed from a recipe (resumes when re-run)")
    p.add_argument("recipe", help="recipe YAML, e.g. scripts/recipes/tiny_synthetic.yaml")
    p.add_argument("overrides", nargs="*", help="key=value: train.steps=5, output_dir=runs/x, model.llm.lora_r=4")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("model", help="inspect models")
    msub = p.add_subparsers(dest="model_command", required=True)
    m = msub.add_parser("info", help="parameters per component and which weights are real")
    m.add_argument("model", help="preset name or saved model directory")
    m.set_defaults(func=_cmd_model_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InputError as err:
        print(f"instructseg: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("instructseg: interrupted", file=sys.stderr)
        return 130
