"""Run every benchmark, one after the other, and print one table of the headline ratios against their targets.

Each benchmark runs in its own process with its own flags (see the script's docstring for what it measures and
against which baseline in the same run); its full table is streamed to the terminal and kept in
``--out/<name>.log``, its results in ``--out/<name>.json``, and the summary in ``--out/summary.md`` and
``summary.json``. Corpora are generated deterministically under ``.bench/`` on first use and reused.

    python benchmarks/run_all.py                 # the full suite (~40 min on 2 cores; BENCHMARKS.md)
    python benchmarks/run_all.py --only pack,images,reader_remote,cli
    python benchmarks/run_all.py --check         # CI: small corpora, ratios only, generous bounds, exit 1 if missed

``--check`` runs the benchmarks that need nothing outside the repository (no ``../shared``, no img2dataset, no
multi-GB baselines) on small inputs and compares each headline with a *regression bound* well below the target:
small runs are noisy and start-up costs weigh more, so the bounds catch a broken fast path, not a few percent.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]

# name -> (script, full-run flags, check-run flags); check flags None: not part of --check.
SUITE: dict[str, tuple[str, list[str], list[str] | None]] = {
    "pack": ("bench_pack.py", [], ["--samples", "300", "--repeats", "3", "--methods", "ceiling,pack,blog",
                                   "--rss-factor", "0"]),
    "images": ("bench_images.py", ["--samples", "1000"], ["--samples", "150", "--repeats", "3"]),
    "quality": ("bench_quality.py", [], ["--samples", "300", "--images", "60", "--repeats", "1"]),
    "start": ("bench_start.py", [], None),
    "tokenize": ("bench_tokenize.py", [], ["--quick"]),
    "audit": ("bench_audit.py", [], None),
    "audit_vocab": ("bench_audit_vocab.py", [], None),
    "embed": ("bench_embed.py", [], ["--quick"]),
    "reader": ("bench_reader.py", [], ["--quick"]),
    # info only, not in --check: on a CPU the vectorised masks and the loop are within a few x of each other, and
    # the small --quick batch swings with the machine's load
    "masks": ("bench_masks.py", ["--threads", "1"], None),
    "reader_remote": ("bench_reader_remote.py", [], ["--quick"]),
    "ray": ("bench_ray.py", [], None),
    "embedded": ("bench_embedded.py", [], None),
    "cli": ("bench_cli.py", [], ["--quick"]),
}

# Regression bounds for --check (the targets of the issues are in each benchmark's own headline).
CHECK_BOUNDS: dict[str, float] = {
    # small corpora: pack's fixed start (~0.5 s: manifest, tokenizer, pool) weighs a lot, hence the low bounds
    # (0.44 and 1.63 measured on a busy machine). The image path through Pillow alone (a broken fast path) measured
    # 0.93 of the ceiling; the fast path 1.44.
    "pack / ceiling": 0.35,
    "pack / blog": 1.5,
    "image path / Pillow draft ceiling": 1.1,
    "fast resampler median PSNR": 40.0,
    "fast resampler zone-plate PSNR": 17.0,
    "fast resampler / Pillow draft ceiling": 1.1,
    "tokenize / raw batched fast tokenizer": 0.6,
    "embed / naive one-tag loop": 2.0,
    "reader / raw pyarrow columns": 0.5,
    # loopback S3 (moto, on the same cores) against local files, 96 tiny rows: catches a read path gone serial or
    # whole-shard, not a few percent
    "reader from loopback S3 / from local files": 0.1,
    # a kept help page costs about what the interpreter's start does (~0.5); drawn by Typer it is ~0.1
    "cli: bare python / mmprep --help": 0.25,
}
# Figures that must stay at or under a bound in --check (memory growth).
CHECK_CEILINGS: dict[str, float] = {
    "reader peak RSS, 4x dataset / 1x dataset": 1.5,
}


def _bound_for(name: str) -> float | None:
    for prefix, bound in CHECK_BOUNDS.items():
        if name.startswith(prefix):
            return bound
    return None


def _ceiling_for(name: str) -> float | None:
    for prefix, bound in CHECK_CEILINGS.items():
        if name.startswith(prefix):
            return bound
    return None


def _met(value: float, target: float | None, op: str) -> bool | None:
    if target is None or op == "info":
        return None
    return value >= target if op == ">=" else value <= target


def _run(name: str, script: str, flags: list[str], out: Path) -> tuple[int, float, list[dict[str, Any]]]:
    json_path = out / f"{name}.json"
    json_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(REPO_ROOT / "benchmarks" / script), *flags, "--json", str(json_path)]
    print(f"\n=== {name}: python benchmarks/{script} {' '.join(flags)}", flush=True)
    start = time.perf_counter()
    with open(out / f"{name}.log", "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT)
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            log.write(line)
        rc = proc.wait()
    seconds = time.perf_counter() - start
    headline = json.loads(json_path.read_text())["headline"] if json_path.exists() else []
    return rc, seconds, headline


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="comma-separated subset of " + ",".join(SUITE))
    ap.add_argument("--check", action="store_true", help="CI regression check: small inputs, generous bounds")
    ap.add_argument("--out", default=str(REPO_ROOT / ".bench" / "results"), help="logs, JSON and the summary")
    args = ap.parse_args(argv)
    names = [n.strip() for n in (args.only or ",".join(SUITE)).split(",") if n.strip()]
    unknown = [n for n in names if n not in SUITE]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(SUITE)}")
    if args.check:
        names = [n for n in names if SUITE[n][2] is not None]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; python {sys.version.split()[0]}; "
          f"{'regression check' if args.check else 'full suite'}: {', '.join(names)}", flush=True)

    rows: list[dict[str, Any]] = []
    failed: list[str] = []
    for name in names:
        script, full, check = SUITE[name]
        rc, seconds, headline = _run(name, script, check if args.check else full, out)
        if rc != 0 or not headline:
            failed.append(f"{name} (exit {rc}{', no results' if not headline else ''})")
        for h in headline:
            goal = _bound_for(h["name"]) if args.check else h["target"]
            op = ">=" if args.check and goal is not None else h["op"]
            if args.check and goal is None and _ceiling_for(h["name"]) is not None:
                goal, op = _ceiling_for(h["name"]), "<="
            rows.append({"benchmark": name, **h, "goal": goal, "goal_op": op,
                         "met": _met(h["value"], goal, op), "bench_seconds": seconds})

    kind = "regression bound" if args.check else "target"
    lines = [f"| benchmark | figure | value | {kind} | met |", "|---|---|---|---|---|"]
    for r in rows:
        goal = "-" if r["goal"] is None else f"{r['goal_op']} {r['goal']:g}"
        met = {True: "yes", False: "**no**", None: "-"}[r["met"]]
        lines.append(f"| {r['benchmark']} | {r['name']} | {r['value']:,.2f} | {goal} | {met} |")
    table = "\n".join(lines)
    print("\n=== summary\n" + table, flush=True)
    (out / "summary.md").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps({"check": args.check, "rows": rows, "failed": failed},
                                                 indent=2) + "\n")
    missed = [r for r in rows if r["met"] is False]
    if failed:
        print("benchmarks that failed: " + ", ".join(failed), file=sys.stderr)
    if args.check and (missed or failed):
        print(f"regression check failed: {len(missed)} figure(s) under their bound", file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
