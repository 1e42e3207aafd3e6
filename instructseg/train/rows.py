"""Tables of fitting rows: a dataclass of tensors that share their first dimension (one row per object or
expression), as the prior stage's fits draw batches from them (`instructseg.train.prior_stage.fit_head`)."""
from __future__ import annotations

import dataclasses

import torch


class Rows:
    """Base of a `@dataclass` whose fields are all tensors of M rows: len, a subset of rows, a device move."""

    def __len__(self) -> int:
        return getattr(self, dataclasses.fields(self)[0].name).shape[0]

    def rows(self, index: torch.Tensor):
        return type(self)(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))

    def to(self, device: torch.device):
        return type(self)(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))
