"""The `instructseg` command. Each subcommand imports its heavy dependencies only when it runs.

Bad input (an `InputError`, a missing file, a malformed argument) is printed as one line on stderr with exit code 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from instructseg.errors import InputError
from instructseg.llm.precision import LLM_DTYPES


def _cmd_synth(args: argparse.Namespace) -> int:
    from instructseg.data.synthetic import SynthSpec, generate

    spec = SynthSpec(seed=args.seed, videos=args.videos, images=args.images, frames=args.frames,
                     height=args.size[0], width=args.size[1], textures=args.textures)
    counts = generate(Path(args.out), spec)
    print(f"wrote ShapesIVS to {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    """`eval revos --predictions PRED` scores existing predictions; every other form runs a model first."""
    _quiet_libraries()
    if args.benchmark == "revos" and args.predictions is not None:
        from instructseg.eval.revos import score_revos

        given = [flag for flag, value in (("--model", args.model), ("--limit", args.limit),
                                          ("--key-frames", args.key_frames)) if value is not None]
        if given:
            raise InputError(f"eval revos --predictions scores existing masks: {', '.join(given)} only apply when a "
                             "model runs (drop --predictions to run one)")

        results = score_revos(Path(args.data_root), args.split or "valid", Path(args.predictions), Path(args.output),
                              workers=args.workers, legacy_visa=args.legacy_visa)
        _print_revos_table(results)
        print(f"wrote {Path(args.output) / 'results.json'}")
        return 0
    if args.model is None:
        raise InputError(f"eval {args.benchmark}: --model M is required (or, for revos, --predictions PRED)")
    from instructseg.eval.runner import run_benchmark

    return run_benchmark(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from instructseg.bench import run_bench

    return run_bench(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from instructseg.app import launch

    return launch(args)


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


def _quiet_libraries() -> None:
    """One-line warnings; no progress bars or info logs from the libraries underneath."""
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.showwarning = lambda message, *args, **kwargs: print(f"instructseg: warning: {message}",
                                                                  file=sys.stderr)
    for category in (FutureWarning, DeprecationWarning):  # the libraries' notices to their developers
        warnings.filterwarnings("ignore", category=category)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _predictor(args: argparse.Namespace):
    import torch

    from instructseg.inference.predictor import InstructSegPredictor

    if args.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available here (use --device cpu)")
    return InstructSegPredictor(args.model, device=args.device, llm_dtype=args.llm_dtype)


def _cmd_segment(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from instructseg.inference.io import open_source
    from instructseg.inference.predictor import check_request
    from instructseg.inference.results import check_out_dir

    _quiet_libraries()
    source = open_source(args.input)  # bad input fails before the model loads
    check_request(args.instruction, args.mode, args.key_frames)
    if args.out:
        check_out_dir(args.out)
    predictor = _predictor(args)
    bar = tqdm(total=len(source), desc="segment", unit="frame", disable=not sys.stderr.isatty(), leave=False)
    result = predictor.segment(source, args.instruction, mode=args.mode, key_frames=args.key_frames,
                               out_dir=args.out, progress=lambda done, total: bar.update(done - bar.n))
    bar.close()
    print(result.text)
    if result.objects:
        print(f"{len(result.objects)} object(s): " + ", ".join(f"#{o.id} score {o.score:.2f}" for o in result.objects),
              file=sys.stderr)
    if args.out:
        print(f"wrote {Path(args.out) / 'result.json'}", file=sys.stderr)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from instructseg.inference.chat_cli import run_chat
    from instructseg.inference.io import open_source
    from instructseg.inference.results import check_out_dir

    _quiet_libraries()
    source, out = open_source(args.input), check_out_dir(args.out)  # bad input fails before the model loads
    return run_chat(source, _predictor(args), out_dir=out, mode=args.mode)


def _size(text: str) -> tuple[int, int]:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 16:
        raise argparse.ArgumentTypeError(f"size must be at least 16 pixels, got {value}")
    return value


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="preset (default, tiny, smol) or a saved model directory")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    _llm_dtype_arg(p)


def _llm_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--llm-dtype", default="auto", choices=LLM_DTYPES,
                   help="the LLM's precision (auto: bfloat16 where the CPU or GPU has it natively)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="instructseg", description="Instructed segmentation of images and videos: ask in words, get a text "
        "answer and masks. `instructseg segment VIDEO \"segment the red circle\" --out out` runs the shipped model.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write ShapesIVS synthetic data in the public datasets' formats")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--videos", type=int, default=12, help="number of videos (split 3:1 into train/valid)")
    p.add_argument("--images", type=int, default=24, help="number of images (split 3:1 into train/valid)")
    p.add_argument("--frames", type=int, default=8, help="frames per video")
    p.add_argument("--size", type=_size, nargs=2, default=(128, 128), metavar=("H", "W"))
    p.add_argument("--textures", type=float, default=0.0, metavar="FRACTION",
                   help="share of scenes drawn on a photo-like texture instead of a plain, noise, gradient or striped "
                        "background (default 0)")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("eval", help="benchmark a model (sharded, resumable) or score ReVOS predictions")
    bench = p.add_subparsers(dest="benchmark", required=True)
    for name, text in (("revos", "ReVOS: J, F, A, R per expression type"),
                       ("refytvos", "Ref-YouTube-VOS: submission Annotations + zip, J&F where ground truth exists"),
                       ("mevis", "MeViS: J&F from mask_dict"), ("davis17", "Ref-DAVIS17: J&F by the DAVIS protocol"),
                       ("refcoco", "RefCOCO/+/g: cIoU and gIoU per split"), ("reasonseg", "ReasonSeg: gIoU, cIoU")):
        r = bench.add_parser(name, help=text)
        r.add_argument("--data-root", required=True)
        r.add_argument("--split", default=None, help="dataset split (default: valid; mevis valid_u; refcoco and reasonseg val)")
        r.add_argument("--output", required=True)
        r.add_argument("--model", default=None, help="preset or saved model dir to run")
        r.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
        _llm_dtype_arg(r)
        r.add_argument("--mode", default="propagate", choices=["propagate", "per-frame"])
        r.add_argument("--key-frames", type=int, default=None)
        r.add_argument("--limit", type=int, default=None, help="only the first N expressions / sentences")
        if name == "revos":
            r.add_argument("--predictions", help="score PRED/<video>/<exp_id>/<frame>.png instead of running a model")
            r.add_argument("--workers", type=int, default=1, help="scoring processes (with --predictions)")
            r.add_argument("--legacy-visa", action="store_true",
                           help="reproduce the public scorer's un-binarised R and A on 0/255 PNGs")
        if name == "refcoco":
            r.add_argument("--dataset", default="refcoco", choices=["refcoco", "refcoco+", "refcocog"])
            r.add_argument("--splits", default=None, help="comma-separated splits (default: val,testA,testB; "
                                                          "refcocog: val,test)")
        r.set_defaults(func=_cmd_eval)

    p = sub.add_parser("bench", help="performance benchmarks (speed, memory, training throughput)")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    b = bsub.add_parser("infer", help="propagate vs per-frame vs raw SAM2 propagation on one generated video")
    b.add_argument("--model", default="default")
    b.add_argument("--frames", type=int, default=64)
    b.add_argument("--size", type=int, default=256, help="frame side in pixels")
    _llm_dtype_arg(b)
    b.add_argument("--json", help="write the numbers here")
    b = bsub.add_parser("memory", help="peak RSS of `segment` per video length, each in a fresh process")
    b.add_argument("--model", default="default")
    b.add_argument("--frames", default="32,512", help="comma-separated lengths")
    b.add_argument("--json")
    b = bsub.add_parser("train", help="training steps/s of the tiny recipe: one process vs two-process ZeRO-2")
    b.add_argument("--steps", type=int, default=10)
    b.add_argument("--json")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("demo", help="web demo: chat with a video or image in the browser")
    _model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-upload-mb", type=float, default=200.0)
    p.add_argument("--max-frames", type=int, default=300)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("segment", help="answer an instruction about an image or video and segment what it refers to")
    p.add_argument("input", help="video file (mp4, webm, avi, mov, mkv), a directory of frames, or an image")
    p.add_argument("instruction", help='e.g. "segment the red circle" or "which shape moves fastest?"')
    _model_args(p)
    p.add_argument("--out", help="write result.json, masks/<object>/<frame>.png and an overlay here "
                                  "(an earlier result there is replaced)")
    p.add_argument("--mode", default="propagate", choices=["propagate", "per-frame"])
    p.add_argument("--key-frames", type=int, default=None, help="LLM key frames in propagate mode (default 3)")
    p.set_defaults(func=_cmd_segment)

    p = sub.add_parser("chat", help="multi-round terminal chat about one image or video")
    p.add_argument("input")
    _model_args(p)
    p.add_argument("--out", default="chat_out", help="masks of each turn go to OUT/turn_<n>/ (numbered on "
                                                     "after the turns already there)")
    p.add_argument("--mode", default="propagate", choices=["propagate", "per-frame"])
    p.set_defaults(func=_cmd_chat)

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
