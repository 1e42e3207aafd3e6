"""Write the demo's bundled examples into instructseg/examples/ (deterministic; a few tens of KB in all).

    python scripts/make_example.py            # rewrites shapes.mp4, shapes.png and examples.json

The scenes come from the ShapesIVS generator (`instructseg.data.synthetic`), so the suggested instructions are
sentences the synthetic data actually uses for them.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from instructseg.data.synthetic import SynthSpec, build_image, build_video
from instructseg.inference.io import write_video

OUT = Path(__file__).resolve().parents[1] / "instructseg" / "examples"
SEED, VIDEO_INDEX, IMAGE_INDEX = 7, 3, 0
FRAMES, HEIGHT, WIDTH, FPS = 16, 144, 192, 8


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    spec = SynthSpec(seed=SEED, frames=FRAMES, height=HEIGHT, width=WIDTH)

    video = build_video(spec, VIDEO_INDEX)
    write_video(args.out / "shapes.mp4", list(video.rendered.frames), fps=FPS)
    image = build_image(spec, IMAGE_INDEX)
    Image.fromarray(image.rendered.frames[0]).save(args.out / "shapes.png", optimize=True)

    index = {
        "shapes.mp4": {"title": "Moving shapes (video, 16 frames)",
                       "instructions": [q.text for q in video.queries if q.targets][:4]},
        "shapes.png": {"title": "Shapes (image)",
                       "instructions": [texts[0] for _, texts in image.refs][:4]},
    }
    (args.out / "examples.json").write_text(json.dumps(index, indent=1) + "\n")
    for name in index:
        print(f"wrote {args.out / name} ({(args.out / name).stat().st_size / 1024:.1f} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
