"""The training loop's supply of micro-batches: draws from the mixture sampler, built and collated in the loop or,
with `train.workers > 0`, in worker processes a few batches ahead (a GPU step is faster than one process reads and
collates a batch of frames: ~14 ms a sample on one CPU core).

Samples are a pure function of their draw, so workers change the speed only, never the stream. The sampler state a
checkpoint records is the one after the last batch the loop took, not after the batches built ahead: a resumed run
goes on with the batch the stopped one would have taken next.
"""
from __future__ import annotations

import multiprocessing
from collections import deque
from concurrent.futures import ProcessPoolExecutor

import torch

# what a worker process builds batches from (set in each worker by _start_worker)
_BUILD: dict = {}


def _start_worker(sources: dict, collate) -> None:
    torch.set_num_threads(1)
    _BUILD.update(sources=sources, collate=collate)


def _build(draws: list) -> tuple:
    sources, collate = _BUILD["sources"], _BUILD["collate"]
    return collate([sources[name].sample(index, epoch) for name, index, epoch in draws])


class SampleStream:
    """`next_batch()` -> the next micro-batch, `collate` applied to `batch_size` samples; `state_dict()` /
    `load_state_dict()` for checkpoints."""

    def __init__(self, sources: dict, sampler, batch_size: int, collate, *, workers: int = 0):
        self.sources, self.sampler, self.batch_size, self.collate = sources, sampler, batch_size, collate
        self.ahead = 2 * workers
        self.state = sampler.state_dict()
        self.pending: deque = deque()
        self.pool = None
        if workers:
            # fork, as torch's DataLoader does: the children only read files and build CPU tensors, and they get
            # the sources without pickling (they hold closures)
            self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                            initializer=_start_worker, initargs=(sources, collate))

    def _draws(self) -> list:
        return [tuple(next(self.sampler)) for _ in range(self.batch_size)]

    def next_batch(self) -> tuple:
        if self.pool is None:
            batch = self.collate([self.sources[n].sample(i, e) for n, i, e in self._draws()])
            self.state = self.sampler.state_dict()
            return batch
        while len(self.pending) < self.ahead:
            self.pending.append((self.pool.submit(_build, self._draws()), self.sampler.state_dict()))
        future, state = self.pending.popleft()
        batch = future.result()  # a worker's exception is raised here, as the loop's own would be
        self.state = state
        return batch

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        if self.pending:
            raise RuntimeError("SampleStream: load_state_dict after batches were drawn ahead")
        self.sampler.load_state_dict(state)
        self.state = self.sampler.state_dict()

    def close(self) -> None:
        if self.pool is not None:  # batches not started are dropped; those being built are waited for
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
            self.pending.clear()
