"""Checkpoint bookkeeping that survives a kill at any moment.

DeepSpeed writes a checkpoint into `<root>/<tag>/` and then rewrites `<root>/latest` in place, so a kill in the
middle of a save can leave a directory that looks complete. We never read `latest`: after every rank finished its
part, rank 0 writes `<root>/<tag>/COMPLETE` atomically (temp file + rename). Only tags with that marker count;
anything else is a partial save and is removed.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from instructseg.atomic import write_json

MARKER = "COMPLETE"
PREFIX = "step"


def tag_for(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def mark_complete(root: Path, step: int, info: dict) -> None:
    write_json(root / tag_for(step) / MARKER, {"step": step, **info})


def complete_steps(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    steps = []
    for child in root.iterdir():
        if child.is_dir() and child.name.startswith(PREFIX) and (child / MARKER).is_file():
            steps.append(int(child.name[len(PREFIX):]))
    return sorted(steps)


def latest_complete(root: Path) -> int | None:
    steps = complete_steps(root)
    return steps[-1] if steps else None


def prune(root: Path, keep: int) -> None:
    """Remove partial saves and all but the newest `keep` complete checkpoints (rank 0 only)."""
    if not root.is_dir():
        return
    complete = set(complete_steps(root)[-keep:]) if keep > 0 else set()
    for child in root.iterdir():
        if child.is_dir() and child.name.startswith(PREFIX) and int(child.name[len(PREFIX):]) not in complete:
            shutil.rmtree(child, ignore_errors=True)
    latest = root / "latest"  # DeepSpeed's own pointer: unused by us, removed to avoid confusion
    if latest.exists():
        latest.unlink()
