"""`instructseg bench`: performance benchmarks that anyone can re-run (docs/benchmarks.md has the figures).

- `infer`: propagate vs per-frame vs raw SAM2 propagation on one generated video (`bench.infer`);
- `memory`: peak RSS of `instructseg segment` per video length, each in a fresh process (`bench.memory`);
- `train`: training steps/s of the tiny recipe, one process vs two-process ZeRO-2 (`bench.train`).
Each prints a table and, with `--json OUT`, writes its numbers to OUT.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["run_bench"]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _write_json(path: str | None, data: dict) -> None:
    if path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {out}")


def run_bench(args: argparse.Namespace) -> int:
    """Run `args.bench_command` (infer, memory or train) with the CLI's arguments; returns the exit code."""
    from instructseg.errors import InputError

    if args.bench_command == "infer":
        from instructseg.bench.infer import bench_infer, print_infer

        if args.frames < 2:
            raise InputError(f"--frames {args.frames}: need at least 2 frames")
        if args.size < 16:
            raise InputError(f"--size {args.size}: need at least 16 pixels")
        device = getattr(args, "device", "cpu")  # the CLI has no --device for bench yet
        if device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise InputError("--device cuda: no CUDA device is available here (use --device cpu)")
        data = bench_infer(args.model, frames=args.frames, size=args.size, device=device, llm_dtype=args.llm_dtype,
                           log=_log)
        print_infer(data)
    elif args.bench_command == "memory":
        from instructseg.bench.memory import bench_memory, parse_lengths, print_memory

        data = bench_memory(args.model, parse_lengths(args.frames), log=_log)
        print_memory(data)
    elif args.bench_command == "train":
        from instructseg.bench.train import bench_train, print_train

        if args.steps < 1:
            raise InputError(f"--steps {args.steps}: need at least 1 step")
        data = bench_train(args.steps, log=_log)
        print_train(data)
    else:
        raise InputError(f"bench {args.bench_command!r}: expected infer, memory or train")
    _write_json(args.json, data)
    return 0
