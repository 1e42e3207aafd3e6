"""The optimisation loop shared by the stages that run before joint training (encoders, prior)."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import torch


def run_steps(params: list[torch.nn.Parameter], *, steps: int, lr: float, warmup_steps: int,
              loss_at: Callable[[int], torch.Tensor], log_path: Path | None, name: str,
              weight_decay: float = 0.01) -> list[float]:
    """`steps` AdamW steps on `params` (linear warm-up over `warmup_steps`, then cosine decay to a tenth of `lr`),
    `loss_at(step)` (step from 1) giving each step's loss. With `log_path`, one JSON row per step is appended:
    {"<name>_step": step, "time": ..., "loss": ...}. Returns the losses."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / max(warmup_steps, 1))
        return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1))))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    losses = []
    log = open(log_path, "a") if log_path is not None else None
    try:
        for step in range(1, steps + 1):
            loss = loss_at(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
            if log is not None:
                log.write(json.dumps({f"{name}_step": step, "time": time.time(), "loss": losses[-1]}) + "\n")
                log.flush()
    finally:
        if log is not None:
            log.close()
        optimizer.zero_grad(set_to_none=True)
    return losses
