"""`instructseg eval <benchmark> --model M ...`: the one loop that runs a model over a benchmark
(docs/benchmarks_eval.md).

    items = evaluator.items(limit)            fixed order; --limit keeps the first N (per split for refcoco)
    mine = items[rank::world]                 torchrun: RANK / WORLD_SIZE from the environment
    for item in mine, unless its record says "ok":
        segment (one retry) -> evaluator.process writes the predictions -> OUT/records/<key>.json (atomic)
    barrier (gloo, only when world > 1)
    rank 0: evaluator.reset(); evaluator.add(every record, in item order); evaluator.evaluate()
            -> OUT/results.json (+ "failed"), per_expression.csv, per_video_jf.png, submission.zip; summary table

The final numbers are a function of the records alone, merged in item order, so a resumed run and a sharded run
give the same results.json as one uninterrupted process (given deterministic inference).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

from instructseg.errors import InputError
from instructseg.eval.evaluators import Davis17Evaluator, Evaluator, Item, MevisEvaluator, RefYtvosEvaluator, \
    RevosEvaluator
from instructseg.eval.image_evaluators import ReasonSegEvaluator, RefcocoEvaluator
from instructseg.eval.storage import RecordStore, check_run_config, write_json

__all__ = ["run_benchmark", "build_evaluator", "run_items", "merge", "DEFAULT_SPLITS", "REFCOCO_DEFAULT_SPLITS",
           "ATTEMPTS"]

DEFAULT_SPLITS = {"revos": "valid", "refytvos": "valid", "mevis": "valid_u", "davis17": "valid", "reasonseg": "val"}
REFCOCO_DEFAULT_SPLITS = {"refcoco": ("val", "testA", "testB"), "refcoco+": ("val", "testA", "testB"),
                          "refcocog": ("val", "test")}
ATTEMPTS = 2            # a failing item is tried once more, then recorded as failed
GROUP_TIMEOUT = timedelta(hours=48)  # how long a finished rank waits for the slowest one


# ------------------------------------------------------------------------------------------------ setup


def _refcoco_splits(args: argparse.Namespace, root: Path) -> tuple[str, list[str]]:
    """(split_by, splits): --splits (or --split) as given, else the dataset's default splits present in its refs."""
    from instructseg.data.formats.refcoco import load_refs

    dataset = args.dataset
    split_by = "unc"
    if dataset == "refcocog":
        split_by = "google" if not (root / "refs(umd).p").is_file() and (root / "refs(google).p").is_file() else "umd"
    if args.split and args.splits:
        raise InputError("eval refcoco: give --splits (comma-separated), not both --split and --splits")
    given = args.splits or args.split
    if given:
        splits = list(dict.fromkeys(s.strip() for s in given.split(",") if s.strip()))
        if not splits:
            raise InputError(f"--splits {given!r}: no split named")
        return split_by, splits
    present = {str(ref.get("split")) for ref in load_refs(root / f"refs({split_by}).p")}
    defaults = REFCOCO_DEFAULT_SPLITS[dataset]
    splits = [s for s in defaults if s in present]
    if not splits:
        raise InputError(f"{root / f'refs({split_by}).p'}: none of the default splits {', '.join(defaults)} is "
                         f"present (found: {', '.join(sorted(present)) or 'none'}); name them with --splits")
    absent = [s for s in defaults if s not in present]
    if absent:
        print(f"instructseg: warning: {dataset}: split(s) {', '.join(absent)} not in the refs; evaluating "
              f"{', '.join(splits)}", file=sys.stderr)
    return split_by, splits


def build_evaluator(args: argparse.Namespace) -> tuple[Evaluator, dict]:
    """The benchmark's evaluator and the run configuration that OUT/run.json pins."""
    name, root, output = args.benchmark, Path(args.data_root), Path(args.output)
    if not root.is_dir():
        raise InputError(f"--data-root {root}: not a directory")
    config = {"benchmark": name, "data_root": str(root.resolve()), "model": _model_id(args.model)}
    if args.model is not None:  # one precision and one set of weights per run: resuming with others would mix them
        config["llm_dtype"] = args.llm_dtype
        config["weights"] = _weights_fingerprint(args.model)
    if name == "refcoco":
        split_by, splits = _refcoco_splits(args, root)
        evaluator = RefcocoEvaluator(root, args.dataset, split_by, splits, output)
        return evaluator, {**config, "dataset": args.dataset, "split_by": split_by, "splits": splits}
    split = args.split or DEFAULT_SPLITS[name]
    config.update(split=split)
    if name == "reasonseg":
        return ReasonSegEvaluator(root, split, output), config
    config.update(mode=args.mode, key_frames=args.key_frames)
    if name == "revos":
        legacy = bool(getattr(args, "legacy_visa", False))
        return RevosEvaluator(root, split, output, legacy_visa=legacy), {**config, "legacy_visa": legacy}
    classes = {"refytvos": RefYtvosEvaluator, "mevis": MevisEvaluator, "davis17": Davis17Evaluator}
    if name not in classes:
        raise InputError(f"eval: unknown benchmark {name!r}")
    return classes[name](root, split, output), config


def _model_id(model: str) -> str:
    path = Path(model)
    return str(path.resolve()) if path.exists() else str(model)


def _weights_fingerprint(model: str) -> str | None:
    """A hash of a saved model's weight files (the shipped `default` included), so that a model trained again
    into the same folder is not taken for the one an unfinished run began with; None for presets."""
    from instructseg.model.checkpoint import model_path

    path = model_path(model)
    if not path.is_dir():
        return None
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*.safetensors")):
        digest.update(file.relative_to(path).as_posix().encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def _dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise InputError("RANK / WORLD_SIZE / LOCAL_RANK must be integers (as torchrun sets them)") from None
    if world < 1 or not 0 <= rank < world:
        raise InputError(f"RANK={rank} WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE")
    return rank, world, local


def _device(args: argparse.Namespace, local_rank: int, world: int) -> str:
    if args.device != "cuda":
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available here (use --device cpu)")
    if world == 1:
        return "cuda"
    count = torch.cuda.device_count()
    return f"cuda:{local_rank % count}"


def _check_args(args: argparse.Namespace) -> None:
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit {args.limit}: must be at least 1")
    if getattr(args, "key_frames", None) is not None and args.key_frames < 1:
        raise InputError(f"--key-frames {args.key_frames}: must be at least 1")
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise InputError(f"--output {output}: exists and is not a directory")


# ------------------------------------------------------------------------------------------------ the loop


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def run_item(predictor, evaluator: Evaluator, item: Item, *, mode: str, key_frames: int | None,
             warn=print) -> dict:
    """Segment one item and let the evaluator write and score it; one retry; the record to store."""
    errors: list[str] = []
    start = time.perf_counter()
    for attempt in range(1, ATTEMPTS + 1):
        try:
            with item.open() as source:
                result = predictor.segment(source, item.instruction, mode=mode, key_frames=key_frames)
            metrics = evaluator.process(item, result)
            return {"key": item.key, "status": "ok", "metrics": metrics, "answer": result.text,
                    "objects": len(result.objects), "attempts": attempt,
                    "seconds": round(time.perf_counter() - start, 3)}
        except Exception as err:  # noqa: BLE001 - any failure of one item is recorded, never fatal to the run
            errors.append(_one_line(err))
            # bad data (an InputError: unreadable frames or ground truth) fails the same way every time
            retry = attempt < ATTEMPTS and not isinstance(err, InputError)
            warn(f"instructseg: warning: {evaluator.name} {item.key}: attempt {attempt} failed ({errors[-1]}); "
                 f"{'retrying' if retry else 'recorded as failed'}")
            _free_accelerator_memory()
            if not retry:
                break
    return {"key": item.key, "status": "failed", "error": errors[-1], "errors": errors, "attempts": len(errors),
            "metrics": evaluator.failed(item, errors[-1]), "seconds": round(time.perf_counter() - start, 3)}


def _free_accelerator_memory() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_items(predictor, evaluator: Evaluator, store: RecordStore, items: list[Item], *, mode: str,
              key_frames: int | None, bar=None) -> int:
    """Run `items` (the unfinished ones of this rank), storing each record as soon as it exists; returns the
    number that failed."""
    def warn(text: str) -> None:
        if bar is not None:
            bar.write(text, file=sys.stderr)  # keeps the bar intact
        else:
            print(text, file=sys.stderr)

    failed = 0
    for item in items:
        record = run_item(predictor, evaluator, item, mode=mode, key_frames=key_frames, warn=warn)
        store.put(record)
        failed += record["status"] != "ok"
        if bar is not None:
            bar.update(1)
            if failed:
                bar.set_postfix(failed=failed, refresh=False)
    return failed


def merge(evaluator: Evaluator, items: list[Item], store: RecordStore) -> dict:
    """results.json's content from the stored records, fed in item order (whoever wrote them)."""
    evaluator.reset()
    failed = []
    for item in items:
        record = store.get(item.key)
        if record is None:
            error = "no record: the process that owned this item stopped before finishing it"
            record = {"key": item.key, "status": "failed", "error": error, "attempts": 0,
                      "metrics": evaluator.failed(item, error)}
        evaluator.add(item, record)
        if record.get("status") != "ok":
            failed.append({"key": item.key, "error": record.get("error"), "attempts": record.get("attempts")})
    results = evaluator.evaluate()
    results["failed"] = failed
    return results


def _progress(total: int, done: int, desc: str, unit: str, enabled: bool):
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, initial=done, desc=desc, unit=unit, disable=not enabled, file=sys.stderr,
                dynamic_ncols=tty, mininterval=0.5 if tty else 30.0, smoothing=0.1)


class _Group:
    """A gloo process group under torchrun, used for nothing but the final barrier."""

    def __init__(self, world: int):
        self.active = False
        if world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                if "MASTER_ADDR" not in os.environ:
                    raise InputError("WORLD_SIZE > 1 without MASTER_ADDR: launch with torchrun --nproc_per_node N")
                dist.init_process_group("gloo", timeout=GROUP_TIMEOUT)
                self.active = True

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.active = False


def run_benchmark(args: argparse.Namespace) -> int:
    """The `eval <benchmark> --model M` command; returns the exit code (0 when the run completed, failed items
    included: they are listed in results.json and in the summary)."""
    start = time.perf_counter()
    rank, world, local_rank = _dist_env()
    _check_args(args)
    output = Path(args.output)
    evaluator, config = build_evaluator(args)
    items = evaluator.items(args.limit)
    if not items:
        raise InputError(f"eval {args.benchmark}: the split has no items to evaluate")
    keys = [item.key for item in items]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise InputError(f"eval {args.benchmark}: two items share the key {dup!r}")
    evaluator.check_ground_truth(items[0])  # a malformed annotation file stops the run before the model loads
    output.mkdir(parents=True, exist_ok=True)
    check_run_config(output, config)
    store = RecordStore(output)
    mine = items[rank::world]
    pending = [item for item in mine if not store.done(item.key)]
    unit = evaluator.unit
    if rank == 0:
        shard = f"; rank 0 of {world} runs {len(mine)}" if world > 1 else ""
        print(f"{evaluator.title}: {len(items)} {unit}s{shard}, {len(mine) - len(pending)} finished before, "
              f"{len(pending)} to run", file=sys.stderr)

    group = _Group(world)
    try:
        if pending:
            from instructseg.inference.predictor import InstructSegPredictor

            predictor = InstructSegPredictor(args.model, device=_device(args, local_rank, world),
                                             llm_dtype=args.llm_dtype)
            desc = f"{evaluator.name}" + (f" [rank 0/{world}]" if world > 1 else "")
            bar = _progress(len(mine), len(mine) - len(pending), desc, unit, enabled=rank == 0)
            try:
                run_items(predictor, evaluator, store, pending, mode=getattr(args, "mode", "propagate"),
                          key_frames=getattr(args, "key_frames", None), bar=bar)
            finally:
                bar.close()
        group.barrier()
    finally:
        group.close()
    if rank != 0:
        return 0

    results = merge(evaluator, items, store)
    results_path = output / "results.json"
    write_json(results_path, results)
    written = [results_path] + evaluator.write_reports(results)
    _print_summary(evaluator, results, len(items), time.perf_counter() - start)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _cell(value) -> str:
    if value is None:
        return f"{'-':>9s}"
    if isinstance(value, int):
        return f"{value:>9d}"
    return f"{value:9.2f}"


def _print_summary(evaluator: Evaluator, results: dict, total: int, seconds: float) -> None:
    columns, rows = evaluator.summary(results)
    failed = results["failed"]
    print(f"{evaluator.title}: {total} items, {len(failed)} failed, {seconds:.1f} s")
    width = max([len(name) for name, _ in rows] + [8])
    print(" " * width + "".join(f"{c:>9s}" for c in columns))
    for name, values in rows:
        print(f"{name:<{width}s}" + "".join(_cell(v) for v in values))
    for line in evaluator.footer():
        print(line)
    if results.get("note"):
        print(f"note: {results['note']}")
    if failed:
        print(f"FAILED: {len(failed)} of {total} items scored 0 (listed under \"failed\" in results.json):")
        for entry in failed[:5]:
            print(f"  {entry['key']}: {entry['error']}")
        if len(failed) > 5:
            print(f"  ... and {len(failed) - 5} more")
