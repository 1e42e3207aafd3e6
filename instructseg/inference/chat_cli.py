"""`instructseg chat`: a multi-round terminal chat on one image or video, writing each turn's masks."""
from __future__ import annotations

import sys
from pathlib import Path

from instructseg.errors import InputError
from instructseg.inference.io import FrameSource

HELP = """Type a question or instruction. Commands:
  /points FRAME OBJ X,Y[,LABEL] ...   clicks on a frame for object OBJ (label 1 positive, 0 negative)
  /box FRAME OBJ X0 Y0 X1 Y1          a box on a frame for object OBJ
  /propagate                          recompute the last answer with the clicks and boxes
  /help                               this text
  /quit                               leave (end of input too)"""


def run_chat(source: FrameSource, predictor, *, out_dir: Path, mode: str = "propagate",
             stdin=None, stdout=None) -> int:
    """Chat about `source` (see `open_source`) until /quit or end of input; turn n's masks go to OUT/turn_<n>/,
    numbered on after the turns an earlier chat left in `out_dir`."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    session = predictor.start(source)
    turn = max((int(p.name[len("turn_"):]) for p in Path(out_dir).glob("turn_*") if p.name[len("turn_"):].isdigit()),
               default=0)
    print(f"chatting about {source.path} ({len(source)} frame(s)); /help for commands", file=stdout)
    while True:
        print("> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            print(file=stdout)
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        try:
            if line == "/help":
                print(HELP, file=stdout)
                continue
            if line.startswith("/points") or line.startswith("/box"):
                _visual_prompt(session, line)
                print("added; /propagate to apply", file=stdout)
                continue
            if line.startswith("/") and line != "/propagate":
                raise InputError(f"unknown command {line.split()[0]!r} (/help lists them)")
            target = out_dir / f"turn_{turn + 1}"
            if line == "/propagate":
                result = session.propagate(out_dir=target)
            else:
                result = session.ask(line, mode=mode, out_dir=target)
            turn += 1
            print(result.text, file=stdout)
            if result.objects:
                print(f"[{len(result.objects)} object(s), masks in {target}]", file=stdout)
        except InputError as err:
            print(f"error: {err}", file=stdout)


def _visual_prompt(session, line: str) -> None:
    parts = line.split()
    try:
        frame, obj = int(parts[1]), int(parts[2])
        if parts[0] == "/box":
            if len(parts) != 7:
                raise ValueError
            session.add_box(frame, obj, [float(v) for v in parts[3:7]])
            return
        points, labels = [], []
        for item in parts[3:]:
            values = [float(v) for v in item.split(",")]
            if len(values) not in (2, 3):
                raise ValueError
            points.append(values[:2])
            labels.append(int(values[2]) if len(values) > 2 else 1)
        session.add_points(frame, obj, points, labels)
    except (IndexError, ValueError):
        raise InputError(f"cannot read {line!r}: /points FRAME OBJ X,Y[,LABEL] ... or /box FRAME OBJ X0 Y0 X1 Y1") from None
