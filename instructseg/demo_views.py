"""Per-visitor state of the web demo and what it renders: overlays with per-object toggles, the click view, the
masks zip, the answer and timing lines. No gradio here; `instructseg.app` wires these into the page."""
import html
import os
import shutil
import tempfile
import threading
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from instructseg.inference.io import write_video
from instructseg.inference.results import PALETTE, SegmentationResult, overlay

VIEW_SIDE = 480  # frames smaller than this are shown enlarged (by an integer factor) for clicking
MAX_VIEW_SIDE = 4096  # frames larger than this are shown reduced (browsers and WebP stop at 16383 px)


# ---------------------------------------------------------------------------------------------- per-visitor state
class Visit:
    """One browser tab's (or API client's) state: the chat session on its media, the turns' outputs and clicks."""

    def __init__(self, root: Path, predictor, source, label: str, media_dir: Path | None = None):
        """`media_dir`: a folder holding this visit's own copy of its media, removed with the visit."""
        from instructseg.inference.session import ChatSession

        self.dir = Path(tempfile.mkdtemp(prefix="visit-", dir=root))
        self.media_dir = media_dir
        self.session = ChatSession(predictor, source)
        self.label = label
        self.lock = threading.RLock()  # sources are not thread-safe; views taken under it may take it again
        self.messages: list[dict] = []
        self.turn = 0
        self.out: Path | None = None  # the last turn's output directory
        self.clicks: dict[tuple[int, int], list[tuple[float, float, int]]] = {}  # (frame, object) -> x, y, label

    @property
    def source(self):
        return self.session.source

    @property
    def result(self) -> SegmentationResult | None:
        return self.session.last

    def next_dir(self) -> Path:
        self.turn += 1
        return self.dir / f"turn_{self.turn}"

    def finish_turn(self, out: Path) -> None:
        """`out` holds the new result; the previous turn's files were already copied to gradio's cache."""
        if self.out is not None and self.out != out:
            shutil.rmtree(self.out, ignore_errors=True)
        self.out = out

    def close(self) -> None:
        """Waits for a question in flight (a new upload or the state's expiry must not pull the media from under
        it), then frees the source and removes the visit's files."""
        with self.lock:
            self.source.close()
            for folder in (self.dir, self.media_dir):
                if folder is not None:
                    shutil.rmtree(folder, ignore_errors=True)


def _close_visit(visit: Visit | None) -> None:
    if visit is not None:
        visit.close()


def private_copy(path: Path, root: Path) -> Path:
    """`path` hard-linked (copied across file systems) into a new folder under `root`. Gradio's cache cleaner
    deletes uploads after an hour while a visit lives for hours, and a video is read again at every question."""
    folder = Path(tempfile.mkdtemp(prefix="media-", dir=root))
    target = folder / path.name
    try:
        os.link(path, target)
    except OSError:  # another file system, or links not allowed: a copy
        shutil.copyfile(path, target)
    return target



def _answer_text(result: SegmentationResult) -> str:
    n = len(result.objects)
    masks = f"{n} object{'s' if n != 1 else ''} segmented." if n else "No object segmented."
    return f"{result.text}\n\n*{masks}*" if result.text else f"*{masks}*"


def _timing(visit: Visit, result: SegmentationResult) -> str:
    t = result.timing
    return (f"**{html.escape(visit.label)}**: answered in {t.get('total_s', 0):.1f} s "
            f"({int(t.get('frames', 0))} frame(s), {int(t.get('llm_calls', 0))} LLM call(s)).")


def _legend(result: SegmentationResult) -> str:
    items = []
    for k, obj in enumerate(result.objects):
        r, g, b = PALETTE[k % len(PALETTE)]
        items.append(f'<span style="display:inline-block;margin-right:1em"><span style="display:inline-block;'
                     f'width:1em;height:1em;background:rgb({r},{g},{b});vertical-align:middle"></span> '
                     f"object {obj.id}</span>")
    return "".join(items)


def _selected_masks(result: SegmentationResult, t: int, selected) -> np.ndarray:
    """(N, H, W) masks on frame t with unselected objects emptied (so colours stay tied to object ids)."""
    masks = result.masks(t)
    keep = set(selected) if selected is not None else {o.id for o in result.objects}
    for k, obj in enumerate(result.objects):
        if obj.id not in keep:
            masks[k] = False
    return masks


def _overlay_file(visit: Visit, selected) -> tuple[str | None, str | None]:
    """(video, image) overlay paths of the last result with only `selected` objects (one of them is None)."""
    result, out = visit.result, visit.out
    ids = [o.id for o in result.objects]
    selected = sorted(set(selected) & set(ids))
    ext = "mp4" if visit.source.is_video else "png"
    path = out / f"overlay.{ext}"
    if selected != ids:
        path = out / f"overlay_{'-'.join(map(str, selected)) or 'none'}.{ext}"
        if not path.exists():
            with visit.lock:
                frames = (overlay(f, _selected_masks(result, t, selected)) for t, f in visit.source.iter_frames())
                if visit.source.is_video:
                    write_video(path, frames, fps=visit.source.fps)
                else:
                    Image.fromarray(next(frames)).save(path)
    return (str(path), None) if visit.source.is_video else (None, str(path))


def _view_scale(source) -> float:
    """Factor by which frames are scaled in the click view (clicks are divided by it): an integer that enlarges
    small frames, below 1 for frames larger than MAX_VIEW_SIDE."""
    side = max(source.height, source.width)
    return MAX_VIEW_SIDE / side if side > MAX_VIEW_SIDE else max(1, VIEW_SIDE // side)


def _frame_view(visit: Visit, t: int, selected) -> np.ndarray:
    """Frame t with the selected objects' masks and the clicks on it (green positive, red negative), enlarged by
    `_view_scale` so that small frames are easy to click."""
    t = min(max(t, 0), len(visit.source) - 1)
    img = visit.source.frame(t)
    if visit.result is not None and visit.result.objects:
        img = overlay(img, _selected_masks(visit.result, t, selected))
    k = _view_scale(visit.source)
    pil = Image.fromarray(img)
    if k != 1:
        pil = pil.resize((max(1, round(pil.width * k)), max(1, round(pil.height * k))),
                         Image.NEAREST if k > 1 else Image.BILINEAR)
    draw = ImageDraw.Draw(pil)
    r = max(5, min(pil.size) // 50)
    for (f, _), clicks in visit.clicks.items():
        for x, y, lab in clicks if f == t else ():
            cx, cy = (x + 0.5) * k - 0.5, (y + 0.5) * k - 0.5
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(0, 200, 0) if lab else (220, 0, 0),
                         outline=(255, 255, 255), width=max(1, r // 3))
    return np.asarray(pil)


def _zip(visit: Visit) -> str:
    return str(_zip_dir(visit.out, f"{Path(visit.label).stem}_turn{visit.turn}"))


def _zip_dir(out: Path, stem: str) -> Path:
    """OUT/<stem>_masks.zip with result.json and masks/<object>/<frame>.png."""
    target = out / f"{stem}_masks.zip"
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as z:
        z.write(out / "result.json", "result.json")
        for png in sorted((out / "masks").rglob("*.png")):
            z.write(png, png.relative_to(out).as_posix())
    return target
