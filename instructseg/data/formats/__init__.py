"""Readers for the public dataset formats, one module per format. Each returns typed samples
(`instructseg.data.types`) and decodes masks only when `masks()` is called. Bad input raises `InputError`."""
from __future__ import annotations

from instructseg.data.formats.davis17 import read_davis17
from instructseg.data.formats.llava import read_llava
from instructseg.data.formats.mevis import read_mevis
from instructseg.data.formats.reasonseg import read_reasonseg
from instructseg.data.formats.refcoco import REFCOCO_DATASETS, load_refs, read_refcoco
from instructseg.data.formats.refytvos import read_refytvos
from instructseg.data.formats.revos import read_revos

VIDEO_READERS = {
    "revos": read_revos,
    "refytvos": read_refytvos,
    "mevis": read_mevis,
    "davis17": read_davis17,
}

__all__ = [
    "VIDEO_READERS", "REFCOCO_DATASETS", "load_refs",
    "read_revos", "read_refytvos", "read_mevis", "read_davis17", "read_refcoco", "read_reasonseg", "read_llava",
]
