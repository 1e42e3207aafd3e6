"""`instructseg bench train`: optimizer steps per second of the tiny recipe (scripts/recipes/tiny_synthetic.yaml),
one process vs two processes with DeepSpeed ZeRO-2 (torchrun), through the real `instructseg train` command.

Start-up (imports, model build, DeepSpeed init), the first (warm-up) step and the end (checkpoint, export) are
excluded: each configuration runs 1 + N steps in a fresh output dir, and the parent times the N steps by watching
the run's log.jsonl, where the trainer appends one line per step. The data are generated once beforehand. One
process uses torch's threads as they are; torchrun gives each rank one thread.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from instructseg.errors import InputError

RECIPE = Path(__file__).resolve().parents[2] / "scripts" / "recipes" / "tiny_synthetic.yaml"
SETUPS = (("one_process", 1), ("two_process_zero2", 2))
POLL_S = 0.005


def _env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(processes: int, recipe: Path, overrides: list[str]) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "instructseg", "train", str(recipe), *overrides]
    torchrun = Path(sys.executable).parent / "torchrun"
    return [str(torchrun), "--nproc_per_node", str(processes), "--master_port", str(_free_port()), "-m",
            "instructseg", "train", str(recipe), *overrides]


def _step_times(processes: int, steps: int, work: Path, tag: str) -> tuple[list[float], float]:
    """Run `steps` steps; (wall-clock time at which each step's log.jsonl line appeared, seconds of the whole run).
    The trainer appends one line per step (rank 0, after the step), so polling the file times the steps from the
    outside with no start-up or export in between."""
    out = work / f"run_{tag}"
    log = out / "log.jsonl"
    cmd = train_command(processes, RECIPE, [f"train.steps={steps}", "train.save_every=1000000",
                                            "train.log_every=1", f"output_dir={out}"])
    seen: list[float] = []
    with open(work / f"{tag}.stderr.txt", "w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=work, env=_env(), stdout=subprocess.DEVNULL, stderr=err,
                                stdin=subprocess.DEVNULL)
        while True:
            done = proc.poll() is not None
            lines = log.read_bytes().count(b"\n") if log.exists() else 0
            now = time.perf_counter()
            seen += [now] * (lines - len(seen))
            if done:
                break
            time.sleep(POLL_S)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            err.seek(0)
            tail = [line for line in err.read().splitlines() if line.strip()][-1:] or ["(no output)"]
            raise InputError(f"train ({processes} process(es), {steps} steps) failed (exit {proc.returncode}): "
                             f"{tail[0]}")
    if len(seen) != steps:
        raise InputError(f"train ({processes} process(es)): {len(seen)} log lines for {steps} steps in {log}")
    return seen, seconds


def bench_train(steps: int, *, log=print) -> dict:
    """{"one_process": {...}, "two_process_zero2": {...}, "speedup_samples_per_s": two / one, ...context}."""
    import torch

    from instructseg.train.recipe import load_recipe

    if not RECIPE.is_file():
        raise InputError(f"{RECIPE}: the tiny recipe is not here (bench train runs from a source checkout)")
    recipe = load_recipe(RECIPE)
    results = {"recipe": str(RECIPE.relative_to(RECIPE.parents[2])), "steps": steps}
    with tempfile.TemporaryDirectory(prefix="instructseg-bench-train-") as tmp:
        work = Path(tmp)
        if recipe.synth is not None:  # the recipe's relative data paths resolve against `work`
            from instructseg.data.synthetic import generate

            generate(work / recipe.synth.out, recipe.synth.spec())
        for name, processes in SETUPS:
            seen, total = _step_times(processes, 1 + steps, work, name)
            per_step = max(seen[-1] - seen[0], 1e-9) / steps  # the first (warm-up) step is not timed
            batch = recipe.train.batch_size * recipe.train.grad_accum * processes
            results[name] = {"processes": processes, "samples_per_step": batch,
                             "steps_per_s": round(1 / per_step, 4), "samples_per_s": round(batch / per_step, 4),
                             "seconds_per_step": round(per_step, 4), "run_s": round(total, 2)}
            log(f"{name}: {per_step:.3f} s/step over {steps} steps (whole run {total:.1f} s)")
    results["speedup_samples_per_s"] = round(results["two_process_zero2"]["samples_per_s"]
                                             / results["one_process"]["samples_per_s"], 4)
    results["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS", "unset")
    results["torch_threads_one_process"] = torch.get_num_threads()  # what the child gets from the same env
    results["torch_threads_per_rank_two_process"] = int(os.environ.get("OMP_NUM_THREADS", "1"))
    return results


def print_train(r: dict) -> None:
    print(f"bench train: {r['recipe']}, {r['steps']} timed steps (start-up, first step and export excluded)")
    print(f"{'setup':22s}{'processes':>10s}{'samples/step':>14s}{'steps/s':>10s}{'samples/s':>11s}{'s/step':>9s}")
    for name, _ in SETUPS:
        row = r[name]
        print(f"{name:22s}{row['processes']:10d}{row['samples_per_step']:14d}{row['steps_per_s']:10.3f}"
              f"{row['samples_per_s']:11.3f}{row['seconds_per_step']:9.3f}")
    print(f"two-process ZeRO-2 / one process, samples/s: {r['speedup_samples_per_s']:.3f}   (torch threads: "
          f"{r['torch_threads_one_process']} in one process, {r['torch_threads_per_rank_two_process']} per rank)")
