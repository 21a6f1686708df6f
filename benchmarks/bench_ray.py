"""Ray engine overhead: ``mmprep pack`` on the local engine against the Ray engine, same corpus, same run.

Methods (whole ``pack()`` calls with the same flags and worker count into fresh output folders; the corpus is in
the page cache):

- ``local``: the process-pool engine - the baseline.
- ``ray-fresh``: ``--engine ray`` with no Ray running: the call starts a local Ray (``ray.init``) and shuts it down,
  as a one-off CLI run on one machine does.
- ``ray-warm``: ``--engine ray`` with Ray already running (started outside the timing), as on a cluster: what is
  left is Ray Data's actor pool start (one processor unpickled per actor), scheduling and result transport.

Every run's shards and index are compared with the first local run's (the engines must write the same bytes).
Repeats are interleaved (local, ray-fresh, ray-warm, local, ...) so drift on a shared machine hits all alike; the
table shows medians and the ratio of each method's time to ``local``.

    python benchmarks/bench_ray.py [--samples 400] [--workers 2] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.corpus import make_corpus  # noqa: E402

METHODS = ("local", "ray-fresh", "ray-warm")


def _digests(out: Path) -> dict[str, str]:
    """sha256 of every file the run published (shards under data/ included), timings (run-stats-*) and the run's
    own state (.mmprep/) left out."""
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and not p.name.startswith("run-stats-")
            and ".mmprep" not in p.relative_to(out).parts}


def _config(manifest: Path, out: Path, rows_per_shard: int) -> Any:
    from mmprep.images.decode import ImageConfig
    from mmprep.pack.config import PackConfig
    from mmprep.text.config import TextConfig

    sample = REPO_ROOT / "sample_data"
    return PackConfig(
        manifest=str(manifest), out=str(out), image=ImageConfig(size=(224, 224), resize_mode="center-crop"),
        limit_images=5, tokenizer=str(sample / "tokenizers" / "clip"), text=TextConfig(max_length=77),
        vocab=str(sample / "ram_tag_list.txt"), unknown_tags="drop", rows_per_shard=rows_per_shard,
    )


def _run(method: str, manifest: Path, out: Path, workers: int, rows_per_shard: int) -> dict[str, Any]:
    from mmprep.pack.job import pack

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    report = pack(_config(manifest, out, rows_per_shard), workers=workers,
                  engine="local" if method == "local" else "ray")
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "samples": report.written, "images": report.images_written,
            "ray_init_s": report.extra.get("ray_init_s"), "digests": _digests(out)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=400, help="corpus samples (~2.25 images each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2, help="processes (local) and actors (ray)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows-per-shard", type=int, default=32)
    ap.add_argument("--corpus-dir", default=None, help="default: .bench/corpus-<samples>-<seed>")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the results here")
    ap.add_argument("--quick", action="store_true", help="tiny run for CI smoke tests (24 samples, 1 repeat)")
    args = ap.parse_args(argv)
    if args.quick:
        args.samples, args.repeats, args.rows_per_shard = 24, 1, 8

    print("command: python " + shlex.join([os.path.relpath(sys.argv[0]), *sys.argv[1:]] if argv is None
                                          else ["benchmarks/bench_ray.py", *argv]))
    import ray

    corpus_dir = Path(args.corpus_dir or REPO_ROOT / ".bench" / f"corpus-{args.samples}-{args.seed}")
    manifest = make_corpus(corpus_dir, args.samples, args.seed)
    info = json.loads((corpus_dir / "corpus.json").read_text())
    for p in (corpus_dir / "images").iterdir():  # page cache
        p.read_bytes()
    print(f"corpus: {corpus_dir} ({info['samples']} samples, {info['images']} images)")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start (shared machine: "
          "compare ratios, not absolute numbers)")
    print(f"pack: 224x224 center-crop uint8, CLIP tokens (77), RAM tag ids, {args.rows_per_shard} rows per shard, "
          f"{args.workers} workers, {args.repeats} repeat(s), ray {ray.__version__}")

    results: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    reference: dict[str, str] | None = None
    identical = True
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        _run("local", manifest, Path(tmp) / "warmup", args.workers, args.rows_per_shard)  # imports, page cache
        for _ in range(args.repeats):
            for m in METHODS:
                if m == "ray-warm":
                    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False,
                             logging_level="ERROR")
                try:
                    r = _run(m, manifest, Path(tmp) / m, args.workers, args.rows_per_shard)
                finally:
                    if m == "ray-warm":
                        ray.shutdown()
                reference = reference or r["digests"]
                identical = identical and r["digests"] == reference
                results[m].append(r)

    base = statistics.median(r["seconds"] for r in results["local"])
    print()
    print(f"| engine | seconds (median of {args.repeats}) | samples/s | images/s | ray.init s | time vs local |")
    print("|---|---|---|---|---|---|")
    summary: dict[str, Any] = {}
    for m in METHODS:
        secs = statistics.median(r["seconds"] for r in results[m])
        samples, images = results[m][0]["samples"], results[m][0]["images"]
        inits = [r["ray_init_s"] for r in results[m] if r["ray_init_s"] is not None]
        init = statistics.median(inits) if inits else None
        summary[m] = {"seconds": secs, "runs": [r["seconds"] for r in results[m]], "samples_per_s": samples / secs,
                      "images_per_s": images / secs, "ray_init_s": init, "time_vs_local": secs / base}
        print(f"| {m} | {secs:.2f} | {samples / secs:,.1f} | {images / secs:,.1f} | "
              f"{'-' if init is None else f'{init:.2f}'} | {secs / base:.2f} |")
    print(f"\nshards and index identical across engines and runs: {'yes' if identical else 'NO'}")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    if args.json_out:
        headline = [{"name": f"ray engine time / local engine time ({m})", "value": summary[m]["time_vs_local"],
                     "target": None, "op": "info"} for m in METHODS if m != "local"]
        headline.append({"name": "ray and local shards byte-identical", "value": 1.0 if identical else 0.0,
                         "target": 1.0, "op": ">="})
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "corpus": info, "results": summary,
                                                   "identical": identical, "headline": headline}, indent=2) + "\n")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
