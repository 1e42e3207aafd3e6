"""Ref-DAVIS17 reader, for the layout ReferFormer's preparation script produces:

```
root/valid/JPEGImages/<vid>/<frame>.jpg
root/valid/Annotations/<vid>/<frame>.png              palette PNG, pixel value = object id
root/meta_expressions/valid/meta_expressions.json     same schema as Ref-YouTube-VOS
```
It is the Ref-YouTube-VOS layout, so the reading is shared with `refytvos`.
"""
from __future__ import annotations

from pathlib import Path

from instructseg.data.formats.refytvos import read_palette_layout
from instructseg.data.types import VideoExpression


def read_davis17(root: Path, split: str = "valid") -> list[VideoExpression]:
    """Ref-DAVIS17 expressions of `split` (the benchmark uses "valid"). Masks load on first `masks()` call."""
    return read_palette_layout(root, split, "davis17")
