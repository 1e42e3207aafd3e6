"""What a benchmark run keeps on disk, each piece written atomically (a temp file or folder, then `os.replace`).

```
OUT/run.json                      the run's configuration; a re-run with another configuration is refused
OUT/records/<quoted key>.json     one per finished item: {"key", "status": "ok" | "failed", "metrics", ...}
OUT/predictions/<...>             prediction files, written before the item's record
```
An item is finished when its record says "ok"; a re-run skips it. A record is written only after the item's
prediction files are complete, so a run killed at any moment leaves either a finished item or none.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from hashlib import sha1
from pathlib import Path
from urllib.parse import quote

import numpy as np
from PIL import Image

from instructseg.atomic import write_bytes as atomic_write_bytes
from instructseg.atomic import write_json
from instructseg.atomic import write_text as atomic_write_text
from instructseg.config import describe_differences, differing_keys
from instructseg.errors import InputError

__all__ = ["atomic_write_text", "atomic_write_bytes", "write_json", "RecordStore", "record_name",
           "write_mask_folder", "write_mask_file", "remove_prediction", "write_zip", "check_run_config",
           "DAVIS_PALETTE"]

# The DAVIS / YouTube-VOS palette's first entries: index 0 black background, index 1 dark red (the object).
DAVIS_PALETTE = [0, 0, 0, 128, 0, 0] + [0, 0, 0] * 254
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed member timestamps: the same predictions give the same zip bytes



def record_name(key: str) -> str:
    """File name for an item key: percent-quoted (so '/' cannot make folders), hashed when too long."""
    name = quote(key, safe="")
    if len(name) > 180:
        name = name[:120] + "-" + sha1(key.encode("utf-8")).hexdigest()
    return name + ".json"


class RecordStore:
    """Per-item records under `OUT/records/`."""

    def __init__(self, output: Path):
        self.dir = Path(output) / "records"

    def path(self, key: str) -> Path:
        return self.dir / record_name(key)

    def get(self, key: str) -> dict | None:
        """The stored record of `key`, or None (absent, or unreadable: then the item simply runs again)."""
        path = self.path(key)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError, UnicodeDecodeError):
            return None
        return record if isinstance(record, dict) and record.get("key") == key else None

    def done(self, key: str) -> bool:
        record = self.get(key)
        return record is not None and record.get("status") == "ok"

    def put(self, record: dict) -> None:
        write_json(self.path(record["key"]), record)


# ------------------------------------------------------------------------------------------- predictions


def _png_bytes(mask: np.ndarray, palette: bool) -> bytes:
    """A 0/255 grey PNG, or a palette PNG with index 1 on the object (the Ref-YouTube-VOS submission format)."""
    import io

    mask = np.asarray(mask, dtype=bool)
    if palette:
        image = Image.fromarray(mask.astype(np.uint8), mode="P")
        image.putpalette(DAVIS_PALETTE)
    else:
        image = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def remove_prediction(path: Path) -> None:
    """Remove a prediction folder or file and its leftover temp copy, if any."""
    path = Path(path)
    for p in (path, path.parent / f".{path.name}.tmp"):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def write_mask_folder(folder: Path, masks: np.ndarray, names: list[str], *, palette: bool = False) -> None:
    """`folder/<name>.png` for each (H, W) mask of `masks` (T, H, W), all at once: the PNGs go to a temp folder
    that then replaces `folder`, so `folder` is either complete or absent."""
    folder = Path(folder)
    if len(masks) != len(names):
        raise ValueError(f"{len(masks)} masks for {len(names)} frame names")
    tmp = folder.parent / f".{folder.name}.tmp"
    remove_prediction(folder)  # also clears a temp folder left by a killed run
    tmp.mkdir(parents=True)
    for mask, name in zip(masks, names):
        (tmp / f"{name}.png").write_bytes(_png_bytes(mask, palette))
    os.replace(tmp, folder)


def write_mask_file(path: Path, mask: np.ndarray) -> None:
    """One 0/255 grey PNG, atomically."""
    atomic_write_bytes(Path(path), _png_bytes(mask, palette=False))


def write_zip(path: Path, root: Path, members: list[Path]) -> None:
    """A zip of `members` (files under `root`, stored under their path relative to `root`) with fixed timestamps
    and the given order, so the same files always give the same bytes. Written atomically."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for member in members:
            info = zipfile.ZipInfo(Path(member).relative_to(root).as_posix(), date_time=_ZIP_TIME)
            info.external_attr = 0o644 << 16
            archive.writestr(info, Path(member).read_bytes())
    atomic_write_bytes(Path(path), buffer.getvalue())


# ------------------------------------------------------------------------------------------ configuration


def check_run_config(output: Path, config: dict) -> None:
    """Refuse to mix runs: `OUT/run.json` must equal `config` when it exists (it is written when absent)."""
    path = Path(output) / "run.json"
    if path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            stored = None
        if stored == config:
            return
        if isinstance(stored, dict):
            detail = describe_differences(differing_keys(stored, config), stored, config)
        else:
            detail = "run.json is unreadable"
        raise InputError(f"--output {output}: holds a run with another configuration ({detail}); "
                         "use another --output, or delete it to start over")
    write_json(path, config)
