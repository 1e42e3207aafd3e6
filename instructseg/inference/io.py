"""Frame sources (a video file, a directory of frames, one image) and a video writer.

`open_source(path)` picks the source from the path; every source gives uint8 (H, W, 3) RGB frames at the original
resolution (`frame(i)`, `iter_frames()`) and squash-resized ones (`resized(i, size)`), with frame names for outputs.

Behaviour decisions (relied on by the predictor and the tests):
- Frame counting: a video file is decoded once when it is opened (no RGB conversion) to count its frames; the
  container's declared count is not trusted (0 for mkv/webm, wrong for truncated files). `len()` is then exact.
- Truncated or partly corrupt video: packets that fail to decode are skipped and every decodable frame is kept, with a
  warning when fewer frames decode than the header declares; zero decodable frames, or a file FFmpeg cannot open at
  all (e.g. an mp4 cut before its index), raise `InputError`. Decoding is deterministic, so later passes see the
  same frames.
- Random access on a video decodes forwards from the current position and reopens the file for a backwards jump;
  `resized()` is O(1) per call in any order via a raw-bytes disk cache built by one sequential decode.
- Frames of a directory with mixed sizes are resized to the first frame's size (one warning at open).
- A video whose container says to display it rotated (phones store portrait video as landscape frames plus a
  display matrix) gives its frames as players show them: turned by the first frame's rotation, in quarter turns, as
  FFmpeg's autorotate does; height and width are those of the turned frames.
- Images of any Pillow mode become RGB: alpha is dropped, 16-bit is shifted right by 8, other integer modes are
  shifted by their actual bit range, float images are scaled from [0, 1] (or their min..max); EXIF orientation applies.
- Sources are not thread-safe; close them (or use `with`) to remove the cache; a finalizer does it otherwise.
"""
from __future__ import annotations

import itertools
import os
import re
import tempfile
import warnings
import weakref
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator

import av
import numpy as np
from PIL import Image, ImageOps

from ..errors import FrameLimitError, InputError

VIDEO_EXTS = (".mp4", ".webm", ".avi", ".mov", ".mkv")
FRAME_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
IMAGE_EXTS = FRAME_EXTS + (".tif", ".tiff")
DEFAULT_FPS = 10.0


# ---------------------------------------------------------------------------------------------- image helpers
def natural_key(name: str) -> tuple:
    """Sort key with digit runs compared as numbers: "2.jpg" < "10.jpg"."""
    parts = re.split(r"(\d+)", name)
    return tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts)), name


def squash(frame: np.ndarray, size: int) -> np.ndarray:
    """(size, size, 3) uint8: `frame` resized without keeping the aspect ratio (PIL bilinear)."""
    return np.array(Image.fromarray(frame).resize((size, size), Image.BILINEAR))


def to_rgb(img: Image.Image) -> np.ndarray:
    """uint8 (H, W, 3) RGB (writable) from a PIL image of any mode (see the module docstring for the rules)."""
    mode = img.mode
    if mode == "RGB":
        return np.array(img)
    if mode.startswith("I;16"):
        gray = (np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8)
    elif mode == "I" or mode.startswith("I;"):
        arr = np.clip(np.asarray(img).astype(np.int64), 0, None)
        shift = max(int(arr.max()).bit_length() - 8, 0)
        gray = (arr >> shift).astype(np.uint8)
    elif mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
        lo, hi = (0.0, 1.0) if arr.min() >= 0 and arr.max() <= 1 else (arr.min(), arr.max())
        gray = np.round((arr - lo) / max(hi - lo, 1e-12) * 255).clip(0, 255).astype(np.uint8)
    else:
        has_alpha = "A" in mode or "a" in mode or "transparency" in img.info
        img = img.convert("RGBA" if has_alpha else "RGB")  # alpha is dropped, colours kept as they are
        return np.ascontiguousarray(np.asarray(img)[..., :3])
    return np.repeat(gray[..., None], 3, axis=2)


def _orientation_swaps(img: Image.Image) -> bool:
    return img.getexif().get(0x0112, 1) in (5, 6, 7, 8)


def load_image(path: Path) -> np.ndarray:
    """uint8 (H, W, 3) RGB of the image file at `path`, EXIF-oriented; InputError if it cannot be decoded."""
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(ImageOps.exif_transpose(img))
    except Exception as err:  # noqa: BLE001 - Pillow's plugins raise many types for bad files
        raise InputError(f"{path}: not a readable image ({_reason(err)})") from None


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) after EXIF orientation, from the header only."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            return (w, h) if _orientation_swaps(img) else (h, w)
    except Exception as err:  # noqa: BLE001
        raise InputError(f"{path}: not a readable image ({_reason(err)})") from None


def _reason(err: BaseException) -> str:
    if isinstance(err, av.error.FFmpegError) and err.strerror:
        return err.strerror  # without FFmpeg's repetition of the path
    return " ".join(str(err).split()) or type(err).__name__


# ---------------------------------------------------------------------------------------------- sources
class FrameSource:
    """Frames of one input. names: output names, one per frame; is_video: False only for a single image."""

    path: Path
    names: list[str]
    height: int
    width: int
    is_video: bool = True
    fps: float = DEFAULT_FPS

    def __len__(self) -> int:
        return len(self.names)

    def frame(self, i: int) -> np.ndarray:
        """Frame i, uint8 (height, width, 3) RGB."""
        raise NotImplementedError

    def iter_frames(self) -> Iterator[tuple[int, np.ndarray]]:
        """(index, frame) for every frame, in order."""
        for i in range(len(self)):
            yield i, self.frame(i)

    def resized(self, i: int, size: int) -> np.ndarray:
        """Frame i squash-resized to (size, size, 3) uint8."""
        return squash(self.frame(i), size)

    def close(self) -> None:
        """Release open files and caches (idempotent)."""

    def __enter__(self) -> "FrameSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _index(self, i: int) -> int:
        if not 0 <= i < len(self):
            raise IndexError(f"frame {i} out of range for {self.path} ({len(self)} frames)")
        return int(i)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, frames={len(self)}, size={self.height}x{self.width})"


class ImageSource(FrameSource):
    """One image file as a one-frame source (decoded once at open)."""

    is_video = False

    def __init__(self, path: Path):
        self.path = Path(path)
        self._image = load_image(self.path)
        self.height, self.width = self._image.shape[:2]
        self.names = [self.path.stem]

    def frame(self, i: int) -> np.ndarray:
        self._index(i)
        return self._image.copy()


class FrameDirSource(FrameSource):
    """A directory of image frames, naturally sorted by file name; frames are read on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        files = [p for p in self.path.iterdir()
                 if p.suffix.lower() in FRAME_EXTS and not p.name.startswith(".") and p.is_file()]
        if not files:
            raise InputError(f"{self.path}: directory has no images ({', '.join(FRAME_EXTS)})")
        self.files = sorted(files, key=lambda p: natural_key(p.name))
        self.names = [p.stem for p in self.files]
        if len(set(self.names)) != len(self.names):
            dup = next(n for n in self.names if self.names.count(n) > 1)
            raise InputError(f"{self.path}: two frames share the name {dup!r} (different extensions)")
        sizes = [image_size(p) for p in self.files]
        self.height, self.width = sizes[0]
        odd = sum(s != sizes[0] for s in sizes)
        if odd:
            warnings.warn(f"{self.path}: {odd} of {len(sizes)} frames differ in size from the first frame "
                          f"({self.height}x{self.width}); they are resized to it", stacklevel=3)

    def frame(self, i: int) -> np.ndarray:
        img = load_image(self.files[self._index(i)])
        if img.shape[:2] != (self.height, self.width):
            img = np.array(Image.fromarray(img).resize((self.width, self.height), Image.BILINEAR))
        return img

    def resized(self, i: int, size: int) -> np.ndarray:
        return squash(load_image(self.files[self._index(i)]), size)


class _VideoResources:
    """What a VideoFileSource holds open: one decoding container, the resized caches and their temp dir."""

    def __init__(self):
        self.container = None
        self.tmpdir: tempfile.TemporaryDirectory | None = None
        self.caches: dict[int, object] = {}  # size -> open binary file

    def close_container(self) -> None:
        if self.container is not None:
            self.container.close()
            self.container = None

    def close(self) -> None:
        self.close_container()
        for f in self.caches.values():
            f.close()
        self.caches.clear()
        if self.tmpdir is not None:
            self.tmpdir.cleanup()
            self.tmpdir = None


class VideoFileSource(FrameSource):
    """A video file decoded with PyAV. Frames are named "00000", "00001", ..."""

    def __init__(self, path: Path, max_frames: int | None = None):
        self.path = Path(path)
        self._res = _VideoResources()
        self._finalizer = weakref.finalize(self, self._res.close)
        container = self._open()
        try:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            self.fps = float(rate) if rate and float(rate) > 0 else DEFAULT_FPS
            declared = stream.frames
            count, size, self._turns = 0, None, 0
            for frame in self._decode(container):
                if size is None:
                    size = (frame.height, frame.width)
                    self._turns = round(frame.rotation / 90) % 4  # counter-clockwise quarter turns to display
                count += 1
                if max_frames is not None and count > max_frames:
                    raise FrameLimitError(f"{self.path}: more than {max_frames} frames")
        finally:
            container.close()
        if count == 0:
            raise InputError(f"{self.path}: no frames could be decoded")
        if declared > count:
            warnings.warn(f"{self.path}: only {count} of the {declared} frames the header declares could be "
                          f"decoded (truncated or corrupt file); using {count}", stacklevel=3)
        self._stored = size  # (height, width) as decoded, before the display rotation
        self.height, self.width = size if self._turns % 2 == 0 else size[::-1]
        digits = max(5, len(str(count - 1)))
        self.names = [f"{i:0{digits}d}" for i in range(count)]
        self._pos = 0  # index of the next frame the open decoder yields
        self._decoder: Iterator | None = None
        self._last: tuple[int, np.ndarray] | None = None

    def _open(self):
        try:
            container = av.open(str(self.path), "r")
        except (av.error.FFmpegError, OSError, ValueError) as err:
            raise InputError(f"{self.path}: not a readable video ({_reason(err)})") from None
        if not container.streams.video:
            container.close()
            raise InputError(f"{self.path}: file has no video stream")
        container.streams.video[0].thread_type = "AUTO"
        return container

    @staticmethod
    def _decode(container) -> Iterator:
        """Decoded av.VideoFrames in order; packets that fail to decode are skipped (see module docstring)."""
        stream = container.streams.video[0]
        try:
            for packet in container.demux(stream):
                try:
                    frames = packet.decode()
                except av.error.FFmpegError:
                    continue
                yield from frames
        except av.error.FFmpegError:
            return  # demuxing failed (damaged container): keep what decoded so far

    def _rgb(self, frame) -> np.ndarray:
        height, width = self._stored
        if (frame.height, frame.width) != (height, width):
            rgb = frame.to_ndarray(format="rgb24", width=width, height=height)
        else:
            rgb = frame.to_ndarray(format="rgb24")
        return np.ascontiguousarray(np.rot90(rgb, self._turns)) if self._turns else rgb

    def _ended(self, got: int) -> InputError:
        return InputError(f"{self.path}: video ended after {got} frames, {len(self)} were counted at open")

    def frame(self, i: int) -> np.ndarray:
        i = self._index(i)
        if self._last is not None and self._last[0] == i:
            return self._last[1].copy()
        if self._decoder is None or i < self._pos:  # backwards jump: reopen and decode forwards
            self._stop_decoder()
            self._res.close_container()
            self._res.container = self._open()
            self._decoder, self._pos = self._decode(self._res.container), 0
        while True:
            frame = next(self._decoder, None)
            if frame is None:
                raise self._ended(self._pos)
            self._pos += 1
            if self._pos - 1 == i:
                break
        arr = self._rgb(frame)
        self._last = (i, arr)
        return arr.copy()

    def iter_frames(self) -> Iterator[tuple[int, np.ndarray]]:
        """Sequential pass with its own container, independent of `frame()`'s position."""
        container = self._open()
        try:
            n = 0
            for frame in self._decode(container):
                if n == len(self):
                    break
                yield n, self._rgb(frame)
                n += 1
            if n < len(self):
                raise self._ended(n)
        finally:
            container.close()

    def cache_file(self, size: int) -> Path | None:
        """Path of the resized cache for `size` (None before the first `resized(., size)`)."""
        f = self._res.caches.get(size)
        return Path(f.name) if f is not None else None

    def resized(self, i: int, size: int) -> np.ndarray:
        i = self._index(i)
        nbytes = size * size * 3
        f = self._res.caches.get(size)
        if f is None:
            f = self._build_cache(size)
        f.seek(i * nbytes)
        buf = bytearray(nbytes)
        if f.readinto(buf) != nbytes:
            raise InputError(f"{self.path}: resized cache is short at frame {i}")
        return np.frombuffer(buf, np.uint8).reshape(size, size, 3)

    def _build_cache(self, size: int):
        if self._res.tmpdir is None:
            self._res.tmpdir = tempfile.TemporaryDirectory(prefix="instructseg-frames-")
        f = open(os.path.join(self._res.tmpdir.name, f"resized_{size}.rgb"), "w+b")
        try:
            for _, frame in self.iter_frames():
                f.write(squash(frame, size).tobytes())
            f.flush()
        except BaseException:
            f.close()
            raise
        self._res.caches[size] = f
        return f

    def _stop_decoder(self) -> None:
        if self._decoder is not None:
            self._decoder.close()
        self._decoder, self._last = None, None

    def close(self) -> None:
        self._stop_decoder()
        self._finalizer()


def open_source(path: str | Path, max_frames: int | None = None) -> FrameSource:
    """The frame source for a video file, a directory of frames or one image; InputError (one line) otherwise.
    With `max_frames`, a longer video or directory raises FrameLimitError as soon as that is known (a video is
    not decoded to its end)."""
    p = Path(path)
    if p.is_dir():
        source = FrameDirSource(p)
        if max_frames is not None and len(source) > max_frames:
            raise FrameLimitError(f"{p}: {len(source)} frames, more than {max_frames}")
        return source
    if not p.exists():
        raise InputError(f"{p}: no such file or directory")
    if not p.is_file():
        raise InputError(f"{p}: not a regular file")
    try:
        if p.stat().st_size == 0:
            raise InputError(f"{p}: file is empty")
    except OSError as err:
        raise InputError(f"{p}: cannot read ({_reason(err)})") from None
    ext = p.suffix.lower()
    if ext in VIDEO_EXTS:
        return VideoFileSource(p, max_frames)
    if ext in IMAGE_EXTS:
        return ImageSource(p)
    raise InputError(f"{p}: unsupported file type {ext or '(no extension)'!r}; expected a video "
                     f"({', '.join(VIDEO_EXTS)}), an image ({', '.join(IMAGE_EXTS)}) or a directory of frames")


# ---------------------------------------------------------------------------------------------- writing
@lru_cache(maxsize=None)
def has_encoder(name: str) -> bool:
    """Whether this PyAV build can encode with codec `name`."""
    try:
        av.codec.Codec(name, "w")
    except Exception:  # noqa: BLE001 - PyAV raises different types for unknown codecs across versions
        return False
    return True


def video_codec(path: str | Path) -> str:
    """The encoder `write_video` uses for `path`'s container; ValueError if this PyAV build has none."""
    ext = Path(path).suffix.lower()
    choices = {".webm": ("libvpx-vp9", "libvpx"), ".avi": ("mpeg4",)}.get(ext, ("libx264", "mpeg4"))
    for name in choices:
        if has_encoder(name):
            return name
    raise ValueError(f"{path}: no encoder for {ext} in this PyAV build (tried {', '.join(choices)})")


def write_video(path: str | Path, frames: Iterable[np.ndarray], fps: float = DEFAULT_FPS) -> Path:
    """Encode uint8 (H, W, 3) RGB frames (streamed, all of one size) to `path`; the container follows the extension.
    Odd heights/widths are padded by one replicated pixel (yuv420p needs even sizes). Returns `path`."""
    path = Path(path)
    if not fps > 0:
        raise ValueError(f"{path}: fps must be positive, got {fps}")
    codec = video_codec(path)
    it = iter(frames)
    first = next(it, None)
    if first is None:
        raise ValueError(f"{path}: no frames to write")
    h, w = first.shape[:2]
    pad = ((0, h % 2), (0, w % 2), (0, 0))
    options = {"movflags": "+faststart"} if path.suffix.lower() in (".mp4", ".mov") else {}
    container = av.open(str(path), "w", options=options)
    try:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w + w % 2, h + h % 2, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "veryfast"}
        elif codec.startswith("libvpx"):
            stream.codec_context.bit_rate = 0
            stream.options = {"crf": "20", "b": "0", "deadline": "realtime", "cpu-used": "8"}
        else:  # mpeg4: constant quantiser 3
            stream.codec_context.qscale = True
            stream.codec_context.global_quality = 3 * 118  # FF_QP2LAMBDA
        for arr in itertools.chain([first], it):
            if arr.shape != first.shape or arr.dtype != np.uint8:
                raise ValueError(f"{path}: frame {arr.shape} {arr.dtype} differs from the first {first.shape} uint8")
            if h % 2 or w % 2:
                arr = np.pad(arr, pad, mode="edge")
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    finally:
        container.close()
    return path
