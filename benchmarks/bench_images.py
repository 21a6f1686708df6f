"""Images/s of mmprep's image path against the bare Pillow ceiling and the naive path, measured in the same run.

Methods (same files, same worker processes, output discarded, warm page cache):

- ``ceiling``: the bare minimum with Pillow for the same output: ``Image.open`` + ``draft`` (JPEG DCT scaling to
  the covering size) + ``resize`` of the centre box to 224x224 (bicubic) - no EXIF, mode or error handling and no
  array conversion.
- ``mmprep``: ``load_image`` (orientation, modes, bomb/truncation checks, draft, reduce, resize) + ``to_output``
  (uint8 CHW array) - what ``pack`` does per image before writing.
- ``mmprep-f16``: the same with CLIP normalisation to float16 CHW.
- ``naive``: full decode (``convert("RGB")``) then the same resize, as most hand-written pipelines do.

Each method runs ``--repeats`` times, interleaved (A B C A B C ...) so drift on a shared machine hits all alike; the
table shows medians and the ratio to the ceiling, both per wall-clock second and per CPU-second of the workers
(steadier when the machine is shared). Target: mmprep >= 0.85 x ceiling.

    python benchmarks/bench_images.py [--samples 600] [--workers 2] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks._harness import ceiling_decode, centre_box  # noqa: E402
from benchmarks.corpus import make_corpus  # noqa: E402

SIZE = 224
_STATE: dict[str, object] = {}


def _init_worker(size: int) -> None:
    from mmprep.images.decode import ImageConfig, Normalization

    _STATE["cfg"] = ImageConfig(size=(size, size), resize_mode="center-crop", interpolation="bicubic")
    _STATE["u8"] = Normalization(dtype="uint8", layout="CHW")
    _STATE["f16"] = Normalization.from_spec("clip", dtype="float16", layout="CHW")
    _STATE["size"] = size


def _ceiling(paths: list[str]) -> int:
    return ceiling_decode(paths, int(_STATE["size"]))  # type: ignore[call-overload]


def _naive(paths: list[str]) -> int:
    from PIL import Image

    size = int(_STATE["size"])  # type: ignore[call-overload]
    for p in paths:
        with Image.open(p) as im:
            rgb = im.convert("RGB")
            rgb.resize((size, size), Image.Resampling.BICUBIC, box=centre_box(*rgb.size, size))
    return len(paths)


def _mmprep(paths: list[str]) -> int:
    from mmprep.images.decode import load_image, to_output

    cfg, norm = _STATE["cfg"], _STATE["u8"]
    for p in paths:
        to_output(load_image(p, cfg).array, norm)  # type: ignore[arg-type]
    return len(paths)


def _mmprep_f16(paths: list[str]) -> int:
    from mmprep.images.decode import load_image, to_output

    cfg, norm = _STATE["cfg"], _STATE["f16"]
    for p in paths:
        to_output(load_image(p, cfg).array, norm)  # type: ignore[arg-type]
    return len(paths)


METHODS = {"ceiling": _ceiling, "mmprep": _mmprep, "mmprep-f16": _mmprep_f16, "naive": _naive}


def _timed(task: tuple[str, list[str]]) -> tuple[int, float]:
    """Run one chunk in a worker: (images, CPU seconds this worker spent on them)."""
    name, paths = task
    start = time.process_time()
    n = METHODS[name](paths)
    return n, time.process_time() - start


def _run(pool: mp.pool.Pool, name: str, chunks: list[list[str]]) -> tuple[float, float]:
    """-> (images per wall second, images per CPU second summed over the workers)."""
    start = time.perf_counter()
    done, cpu = 0, 0.0
    for n, c in pool.imap_unordered(_timed, [(name, c) for c in chunks]):
        done += n
        cpu += c
    elapsed = time.perf_counter() - start
    return done / elapsed, done / cpu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=600, help="corpus samples (~2.25 images each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=8, help="images per task sent to a worker")
    ap.add_argument("--corpus-dir", default=None, help="default: .bench/corpus-<samples>-<seed>")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--json", dest="json_out", default=None, help="also write the results here")
    ap.add_argument("--quick", action="store_true", help="tiny run for CI smoke tests (30 samples, 1 repeat)")
    args = ap.parse_args(argv)
    if args.quick:
        args.samples, args.repeats = 30, 1
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {unknown}")

    print("command: python " + shlex.join([os.path.relpath(sys.argv[0]), *sys.argv[1:]] if argv is None
                                          else ["benchmarks/bench_images.py", *argv]))
    corpus_dir = Path(args.corpus_dir or REPO_ROOT / ".bench" / f"corpus-{args.samples}-{args.seed}")
    t0 = time.perf_counter()
    manifest = make_corpus(corpus_dir, args.samples, args.seed)
    info = json.loads((corpus_dir / "corpus.json").read_text())
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    paths = [str(corpus_dir / ref) for r in rows for ref in r["images"]]
    for p in paths:  # warm the page cache so every method reads from memory
        Path(p).read_bytes()
    print(f"corpus: {corpus_dir} ({info['samples']} samples, {info['images']} images: {info['jpeg']} JPEG, "
          f"{info['png']} PNG; ready in {time.perf_counter() - t0:.1f}s)")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start (shared machine: "
          "compare ratios, not absolute numbers)")
    print(f"workers: {args.workers} processes, chunks of {args.chunk}, target {SIZE}x{SIZE} center-crop bicubic, "
          f"{args.repeats} repeat(s)")

    chunks = [paths[i:i + args.chunk] for i in range(0, len(paths), args.chunk)]
    results: dict[str, list[float]] = {m: [] for m in methods}
    per_cpu: dict[str, list[float]] = {m: [] for m in methods}
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context("spawn")
    with ctx.Pool(args.workers, initializer=_init_worker, initargs=(SIZE,)) as pool:
        warm = chunks[: max(1, args.workers * 2)]
        for m in methods:  # imports and first-call costs outside the timing
            _run(pool, m, warm)
        for _ in range(args.repeats):
            for m in methods:
                wall, cpu = _run(pool, m, chunks)
                results[m].append(wall)
                per_cpu[m].append(cpu)

    base = statistics.median(results["ceiling"]) if "ceiling" in results else None
    base_cpu = statistics.median(per_cpu["ceiling"]) if "ceiling" in per_cpu else None
    print()
    print(f"| method | images/s (median of {args.repeats}) | min | max | vs ceiling | images per CPU-second | "
          "vs ceiling (CPU) |")
    print("|---|---|---|---|---|---|---|")
    summary = {}
    for m in methods:
        med = statistics.median(results[m])
        med_cpu = statistics.median(per_cpu[m])
        ratio = med / base if base else None
        ratio_cpu = med_cpu / base_cpu if base_cpu else None
        summary[m] = {"median": med, "runs": results[m], "ratio_vs_ceiling": ratio, "per_cpu_second": med_cpu,
                      "ratio_vs_ceiling_cpu": ratio_cpu}
        print(f"| {m} | {med:,.0f} | {min(results[m]):,.0f} | {max(results[m]):,.0f} | "
              f"{'-' if ratio is None else f'{ratio:.2f}'} | {med_cpu:,.0f} | "
              f"{'-' if ratio_cpu is None else f'{ratio_cpu:.2f}'} |")
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")
    print("images per CPU-second (the workers' own CPU time) is the steadier figure when other work shares the "
          "machine; images/s is wall-clock throughput of the whole pool.")
    if base and "mmprep" in summary:
        ok = summary["mmprep"]["ratio_vs_ceiling"] >= 0.85
        print(f"mmprep / ceiling = {summary['mmprep']['ratio_vs_ceiling']:.2f} wall, "
              f"{summary['mmprep']['ratio_vs_ceiling_cpu']:.2f} CPU (target >= 0.85: {'met' if ok else 'NOT met'})")
    if args.json_out:
        headline = []
        if base and "mmprep" in summary:
            headline.append({"name": "image path / Pillow draft ceiling (images/s, same workers)",
                             "value": summary["mmprep"]["ratio_vs_ceiling"], "target": 0.85, "op": ">="})
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "corpus": info, "results": summary,
                                                   "headline": headline}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
