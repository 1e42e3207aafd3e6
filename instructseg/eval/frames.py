"""`FrameListSource`: the frames a benchmark expression lists (ReVOS, MeViS, Ref-YouTube-VOS and Ref-DAVIS17 name
them explicitly in their metadata), as a `FrameSource` the predictor reads like any other video."""
from __future__ import annotations

import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image

from instructseg.errors import InputError
from instructseg.inference.io import FrameSource, load_image, squash

__all__ = ["FrameListSource"]


class FrameListSource(FrameSource):
    """Frames read on demand from an explicit list of image files, named `names` (the metadata's frame names).

    Frames come out at (height, width), the size the ground truth has: a frame of another size is resized to it
    (one warning per source). The last `cache` resized frames are kept, since the predictor reads key and reference
    frames more than once.
    """

    is_video = True

    def __init__(self, files: list[Path], names: list[str], height: int, width: int, *, cache: int = 16):
        if not files:
            raise InputError("an expression lists no frames")
        if len(files) != len(names):
            raise ValueError(f"{len(files)} frame files for {len(names)} names")
        self.files = [Path(p) for p in files]
        self.names = [str(n) for n in names]
        self.path = self.files[0].parent
        self.height, self.width = int(height), int(width)
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_size = cache
        self._warned = False

    def frame(self, i: int) -> np.ndarray:
        path = self.files[self._index(i)]
        img = load_image(path)
        if img.shape[:2] != (self.height, self.width):
            if not self._warned:
                warnings.warn(f"{path}: frame is {img.shape[0]}x{img.shape[1]} but the metadata says "
                              f"{self.height}x{self.width}; resized", stacklevel=2)
                self._warned = True
            img = np.array(Image.fromarray(img).resize((self.width, self.height), Image.BILINEAR))
        return img

    def resized(self, i: int, size: int) -> np.ndarray:
        key = (self._index(i), int(size))
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key].copy()
        out = squash(self.frame(i), size)
        self._cache[key] = out
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return out.copy()

    def close(self) -> None:
        self._cache.clear()
