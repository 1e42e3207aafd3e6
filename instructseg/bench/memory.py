"""`instructseg bench memory`: peak resident memory of `instructseg segment` on the generated video at each
length, each run in a fresh process (the peak comes from the kernel's accounting of that child, `wait4`).

Models whose LLM is randomly initialised (the `tiny` and `bench-1.5b` presets) never answer [SEG]; for them the
run is `python -m instructseg.bench.segment`, the same steps with the answer forced to "[SEG]" (`answer_forced`).

A flat curve means the predictor streams: frames are read and decoded one at a time, masks go to disk as they are
ready, and SAM2's memory keeps a bounded window.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from instructseg.bench.video import write_mp4
from instructseg.errors import InputError

SIZE = 256  # frame side of the generated video, px (the default model's decoder resolution)


def parse_lengths(text: str) -> list[int]:
    """"32,512" -> [32, 512] (sorted, unique, each >= 2)."""
    try:
        lengths = sorted({int(part) for part in str(text).split(",") if part.strip()})
    except ValueError:
        raise InputError(f"--frames {text!r}: expected comma-separated frame counts, e.g. 32,512") from None
    if not lengths or lengths[0] < 2:
        raise InputError(f"--frames {text!r}: expected frame counts of at least 2, e.g. 32,512")
    return lengths


def peak_rss_mb(cmd: list[str], *, log_dir: Path, env: dict | None = None) -> tuple[float, float, int]:
    """Run `cmd` in a fresh process: (its peak RSS in MB, wall seconds, exit status). Its output goes to
    log_dir/stdout.txt and stderr.txt."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "stdout.txt", "wb") as out, open(log_dir / "stderr.txt", "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; tell Popen so it does not wait again
    return usage.ru_maxrss / 1024, seconds, proc.returncode  # Linux reports KiB


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def random_llm(model: str) -> bool:
    """Whether `model` (a preset or a saved model directory) has a randomly initialised LLM; False when unknown."""
    from instructseg.config import PRESETS, ModelConfig, preset

    config = Path(model) / "config.json"
    if config.is_file():
        return bool(ModelConfig.load(config).llm.random_init)
    return model in PRESETS and preset(model).llm.random_init


def segment_command(model: str, video: Path, instruction: str, out: Path) -> list[str]:
    runner = ["-m", "instructseg.bench.segment"] if random_llm(model) else ["-m", "instructseg", "segment"]
    return [sys.executable, *runner, str(video), instruction, "--model", str(model), "--out", str(out)]


def bench_memory(model: str, lengths: list[int], *, seed: int = 0, log=print) -> dict:
    """{"rss_mb": {length: MB}, "ratio": rss[longest] / rss[shortest], ...context}."""
    rss, seconds, objects = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="instructseg-bench-memory-") as tmp:
        for length in lengths:
            video = write_mp4(Path(tmp) / f"video_{length}.mp4", length, SIZE, seed)
            out = Path(tmp) / f"out_{length}"
            cmd = segment_command(model, video.path, video.instruction, out)
            mb, wall, code = peak_rss_mb(cmd, log_dir=Path(tmp) / f"log_{length}")
            if code != 0:
                raise InputError(f"segment on {length} frames failed (exit {code}): "
                                 f"{_last_line(Path(tmp) / f'log_{length}' / 'stderr.txt')}")
            result = json.loads((out / "result.json").read_text())
            rss[str(length)], seconds[str(length)] = round(mb, 1), round(wall, 2)
            objects[str(length)] = len(result.get("objects", []))
            log(f"{length} frames: peak RSS {mb:.1f} MB, {wall:.1f} s")
    first, last = str(lengths[0]), str(lengths[-1])
    return {"rss_mb": rss, "ratio": round(rss[last] / rss[first], 4), "seconds": seconds, "objects_found": objects,
            "model": str(model), "answer_forced": random_llm(model), "size": SIZE, "instruction": video.instruction}


def print_memory(r: dict) -> None:
    print(f"bench memory: model {r['model']}, `segment` on the generated video at {r['size']} px, "
          f"\"{r['instruction']}\", one fresh process per length")
    print(f"{'frames':>8s}{'peak RSS (MB)':>15s}{'time (s)':>10s}{'objects':>9s}")
    for length, mb in r["rss_mb"].items():
        print(f"{length:>8s}{mb:15.1f}{r['seconds'][length]:10.1f}{r['objects_found'][length]:9d}")
    if r["answer_forced"]:
        print("random LLM: its answer was forced to \"[SEG]\" (python -m instructseg.bench.segment)")
    lengths = list(r["rss_mb"])
    print(f"ratio {lengths[-1]} / {lengths[0]} frames: {r['ratio']:.3f}")
    if not any(r["objects_found"].values()):
        print("note: the model found no object, so no masks were decoded or written")
