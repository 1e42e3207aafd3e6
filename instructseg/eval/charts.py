"""The per-video J&F chart (`OUT/per_video_jf.png`): one horizontal bar per video, best at the top, coloured from
red (0) to green (100), with the overall J&F as a vertical line. Drawn with matplotlib's Agg canvas directly (no
pyplot state, no display needed)."""
from __future__ import annotations

import io
from pathlib import Path

from instructseg.eval.storage import atomic_write_bytes

__all__ = ["per_video_chart", "MAX_BARS"]

MAX_BARS = 50        # more videos than this: the best and worst MAX_BARS // 2 are drawn, the rest counted
_LABEL_CHARS = 32


def _short(name: str) -> str:
    return name if len(name) <= _LABEL_CHARS else name[:_LABEL_CHARS - 1] + "…"


def per_video_chart(path: Path, per_video: dict[str, float], overall: float | None, *, title: str,
                    max_bars: int = MAX_BARS) -> None:
    """Write the chart of `per_video` ({video: J&F in percent}) to `path` (PNG, atomically).

    `overall` (percent) is drawn as a dashed line; `title` heads the chart. Ties are broken by video name, so
    the same numbers always give the same picture.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ranked = sorted(per_video.items(), key=lambda kv: (-kv[1], kv[0]))
    hidden = 0
    if len(ranked) > max_bars:
        half = max_bars // 2
        hidden = len(ranked) - 2 * half
        rows = ranked[:half] + [(None, None)] + ranked[-half:]
    else:
        rows = ranked
    rows = rows[::-1]  # matplotlib draws the first bar at the bottom
    labels = [f"… {hidden} more videos …" if name is None else _short(name) for name, _ in rows]
    values = [0.0 if value is None else value for _, value in rows]

    fig = Figure(figsize=(8.0, 1.6 + 0.3 * max(len(rows), 1)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = colormaps["RdYlGn"]
    colours = [(0, 0, 0, 0) if name is None else cmap(min(max(v / 100.0, 0.0), 1.0)) for (name, _), v in
               zip(rows, values)]
    ax.barh(range(len(rows)), values, color=colours, edgecolor="none")
    for y, ((name, _), v) in enumerate(zip(rows, values)):
        if name is not None:
            ax.text(min(v, 100.0) + 1.0, y, f"{v:.1f}", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    if overall is not None:
        ax.axvline(overall, color="black", linestyle="--", linewidth=1, label=f"overall J&F {overall:.1f}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlim(0, 108)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_xlabel("J&F (%), mean over the video's expressions")
    ax.set_ylabel("video")
    shown = f"{len(ranked)} videos" + (f", best and worst {max_bars // 2} shown" if hidden else "")
    ax.set_title(f"{title}\n{shown}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    atomic_write_bytes(Path(path), buffer.getvalue())
