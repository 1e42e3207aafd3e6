"""A deterministic, resumable, rank-aware stream of training draws over several data sources.

Global draw g picks a source at random by ratio and then the next index of that source's shuffled permutation
(a fresh permutation on every pass over the source). Everything is a pure function of (seed, g): rank r of W takes
global draws r, r + W, r + 2W, ... (disjoint across ranks, together the single-rank stream), and the only state is
the global position, so a resumed run (even on a different number of ranks) continues exactly where it stopped.

Source choices are drawn in blocks of `BLOCK` with numpy, so seeking to a position replays counts, not draws.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from instructseg.errors import InputError

# InstructSeg's training mix, by task (referring image seg : chat : referring video seg : ReasonSeg : ReVOS).
PAPER_RATIOS: dict[str, float] = {"res": 4, "chat": 2, "rvos": 4, "reasonseg": 1, "revos": 3}

BLOCK = 4096
_CHOICE_STREAM, _PERM_STREAM = 0, 1


class Draw(NamedTuple):
    """One training draw: item `index` of source `source`, during pass `epoch` over that source (0, 1, ...)."""

    source: str
    index: int
    epoch: int


def ratios_from_tasks(source_tasks: dict[str, str], sizes: dict[str, int],
                      task_ratios: dict[str, float]) -> dict[str, float]:
    """Per-source ratios from per-task ones (e.g. `PAPER_RATIOS`): each task's share is split among its sources in
    proportion to their sizes. Tasks without a source are dropped; a source whose task has no ratio is an error."""
    missing = sorted({t for t in source_tasks.values() if t not in task_ratios})
    if missing:
        raise InputError(f"mixture: no ratio for task(s) {', '.join(missing)} (ratios given: {', '.join(task_ratios)})")
    totals: dict[str, int] = {}
    for name, task in source_tasks.items():
        totals[task] = totals.get(task, 0) + sizes.get(name, 0)
    return {name: task_ratios[task] * sizes.get(name, 0) / totals[task]
            for name, task in source_tasks.items() if totals[task] > 0}


class MixtureDataset:
    """Map dataset indexed by `Draw`s, so `DataLoader(MixtureDataset(sources), sampler=MixtureSampler(...),
    batch_size=..., collate_fn=Collator(...))` works as is. Each source needs `sample(index, epoch)`."""

    def __init__(self, sources: dict):
        self.sources = sources

    def sizes(self) -> dict[str, int]:
        return {name: len(source) for name, source in self.sources.items()}

    def __getitem__(self, draw: Draw):
        return self.sources[draw.source].sample(draw.index, draw.epoch)


class MixtureSampler:
    """Infinite iterator of `Draw`s. `sizes`: items per source; `ratios`: relative weight per source (only the
    sources named in `ratios` are drawn; each must exist in `sizes` with at least one item)."""

    def __init__(self, sizes: dict[str, int], ratios: dict[str, float], *, seed: int, rank: int = 0,
                 world_size: int = 1):
        if not ratios:
            raise InputError("mixture: no ratios given")
        for name, ratio in ratios.items():
            if sizes.get(name, 0) <= 0:
                raise InputError(f"mixture: ratio given for source {name!r}, which is absent or empty "
                                 f"(sizes: {sizes})")
            if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and ratio > 0):
                raise InputError(f"mixture: ratio for {name!r} must be a positive number, got {ratio!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise InputError(f"mixture: need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        self.names = sorted(ratios)  # dict order must not change the stream
        self.sizes = [int(sizes[n]) for n in self.names]
        weights = np.array([float(ratios[n]) for n in self.names])
        self.probs = weights / weights.sum()
        self._cum = np.cumsum(self.probs)
        self.seed = int(seed) & (2**63 - 1)
        self.rank, self.world_size = rank, world_size
        self.position = 0                                   # global draws consumed by all ranks together
        self._counts = [np.zeros(len(self.names), np.int64)]  # per-source draws before block b
        self._block: tuple[int, np.ndarray, np.ndarray] | None = None
        self._perms: dict[int, tuple[int, np.ndarray]] = {}   # source -> (pass, permutation), latest only

    # ------------------------------------------------------------------------------------------- stream

    def _choices(self, block: int) -> np.ndarray:
        u = np.random.default_rng([self.seed, _CHOICE_STREAM, block]).random(BLOCK)
        return np.minimum(np.searchsorted(self._cum, u, side="right"), len(self.names) - 1)

    def _block_data(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """(source per draw, occurrence number of that source within the block) for one block."""
        if self._block is None or self._block[0] != block:
            choices = self._choices(block)
            occurrence = np.empty(BLOCK, np.int64)
            for s in range(len(self.names)):
                where = np.flatnonzero(choices == s)
                occurrence[where] = np.arange(where.size)
            self._block = (block, choices, occurrence)
        return self._block[1], self._block[2]

    def _counts_before(self, block: int) -> np.ndarray:
        while len(self._counts) <= block:
            b = len(self._counts) - 1
            self._counts.append(self._counts[b] + np.bincount(self._choices(b), minlength=len(self.names)))
        return self._counts[block]

    def _permutation(self, source: int, epoch: int) -> np.ndarray:
        cached = self._perms.get(source)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, _PERM_STREAM, source, epoch])
            cached = (epoch, rng.permutation(self.sizes[source]))
            self._perms[source] = cached
        return cached[1]

    def draw(self, g: int) -> Draw:
        """Global draw `g` of the stream (the same on every rank)."""
        block, offset = divmod(g, BLOCK)
        choices, occurrence = self._block_data(block)
        source = int(choices[offset])
        count = int(self._counts_before(block)[source] + occurrence[offset])
        epoch, pos = divmod(count, self.sizes[source])
        return Draw(self.names[source], int(self._permutation(source, epoch)[pos]), epoch)

    def __iter__(self) -> "MixtureSampler":
        return self

    def __next__(self) -> Draw:
        item = self.draw(self.position + self.rank)
        self.position += self.world_size
        return item

    def take(self, n: int) -> list[Draw]:
        """The next `n` draws of this rank."""
        return [next(self) for _ in range(n)]

    # --------------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict:
        """{"position": global draws consumed}; the same on every rank of a lock-step run. A DataLoader draws
        ahead of training (prefetch), so a trainer that resumes exactly saves the position of what it trained on:
        `{"position": start + steps * batch_size * world_size}`."""
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        position = state.get("position") if isinstance(state, dict) else None
        if not isinstance(position, int) or position < 0:
            raise InputError(f"mixture: bad sampler state {state!r}, expected {{'position': int >= 0}}")
        self.position = position
