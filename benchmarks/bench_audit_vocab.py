"""How ``mmprep audit-labels`` scales with the vocabulary: 1 million and 10 million tags, against reading the file.

Generates (deterministically, into ``.bench/``, reused when there) vocabularies of N tags, RAM names with a number
(``dog 41235``), one entry in 1,000 a case/underscore variant of an earlier one (so the duplicate search has groups
to find), and a RAM training JSON of 20,000 samples with ~10 ids each drawn from the whole vocabulary (nearly every
tag is never used: the never-used list holds ~N entries). Then, each in a fresh process, ``--runs`` times,
interleaved:

* ``read + split`` (baseline): read the vocabulary file and split it into lines, the least any audit must do;
* ``audit-labels``: ``mmprep audit-labels --vocab V ANN`` (report on stderr, discarded);
* ``audit-labels --json``: the same with the JSON report on stdout (read and discarded by the parent).

Prints the median wall time, the time per tag, the peak RSS of the process (``wait4`` rusage), the ratio to the
baseline, and per variant the growth from the smallest to the largest vocabulary as an exponent
(``log(t_large / t_small) / log(N_large / N_small)``: 1.0 is linear). ``--tree DIR`` runs the audit variants of
another checkout too (``PYTHONPATH=DIR``, e.g. the code before a change), interleaved in the same session, with
``--timeout`` seconds per run.

    python benchmarks/bench_audit_vocab.py                       # 1M and 10M tags (~5 min; ~3 GB at 10M)
    python benchmarks/bench_audit_vocab.py --quick               # 100k and 1M tags
    python benchmarks/bench_audit_vocab.py --tree /tmp/before    # and the code in /tmp/before, same session
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RAM_NAMES = ROOT / "sample_data" / "ram_tag_list.txt"
GEN_VERSION = 1
SAMPLES = 20_000

_READ = r"""
import sys
with open(sys.argv[1], "rb") as fh:
    lines = fh.read().decode("utf-8").split("\n")
print(len(lines))
"""


def _vocab(bench_dir: Path, n: int) -> Path:
    path = bench_dir / f"vocab_{n}.txt"
    stamp = path.with_suffix(".stamp")
    if path.exists() and stamp.exists() and stamp.read_text() == f"{GEN_VERSION} {n}":
        return path
    print(f"generating {path} ({n:,} tags) ...", file=sys.stderr, flush=True)
    names = [x for x in RAM_NAMES.read_text(encoding="utf-8").split("\n") if x]
    rng = np.random.default_rng(20240611)
    picks = rng.integers(0, len(names), size=n)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        step = 100_000
        for start in range(0, n, step):
            block = []
            for i in range(start, min(n, start + step)):
                if i % 1000 == 999:  # a variant of an earlier tag: a duplicate after normalisation
                    j = i - 500
                    block.append(f"{names[picks[j]]} {j}".upper().replace(" ", "_"))
                else:
                    block.append(f"{names[picks[i]]} {i}")
            fh.write("\n".join(block) + "\n")
    tmp.replace(path)
    stamp.write_text(f"{GEN_VERSION} {n}")
    return path


def _annotations(bench_dir: Path, n: int) -> Path:
    path = bench_dir / f"vocab_{n}_ram_train.json"
    if path.exists():
        return path
    rng = np.random.default_rng(20240612)
    records = []
    for k in range(SAMPLES):
        ids = sorted(set(rng.integers(0, n, size=int(rng.integers(7, 14))).tolist()))
        records.append({"image_path": f"images/{k:06d}.jpg", "caption": ["a photo"], "union_label_id": ids,
                        "parse_label_id": [ids]})
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def _run(args: list[str], tree: Path, timeout: float) -> tuple[float, float] | None:
    """Run ``python ARGS`` in ``tree`` with ``PYTHONPATH=tree`` in a fresh process, output discarded: (wall s, peak
    RSS MB), or None when it ran past ``timeout``. (The folder matters: ``python -m`` imports from it first.)"""
    env = dict(os.environ, PYTHONPATH=str(tree), MMPREP_NO_PROGRESS="1")
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], cwd=tree, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while True:
        done, status, usage = os.wait4(proc.pid, os.WNOHANG)  # reaped here, for the child's own rusage
        if done:
            break
        if time.perf_counter() - t > timeout:
            proc.kill()
            os.wait4(proc.pid, 0)
            proc.returncode = -9
            return None
        time.sleep(0.05)
    wall = time.perf_counter() - t
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    if code not in (0, 1):
        raise SystemExit(f"{shlex.join(args)} failed with exit code {code}")
    return wall, usage.ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100k and 1M tags")
    ap.add_argument("--sizes", default=None, help="comma-separated vocabulary sizes (default 1000000,10000000)")
    ap.add_argument("--runs", type=int, default=3, help="runs per variant (median reported)")
    ap.add_argument("--tree", default=None, help="also time the audit of the mmprep checkout in this folder")
    ap.add_argument("--tree-runs", type=int, default=1, help="runs per variant of --tree (default 1)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per run before it is stopped")
    ap.add_argument("--bench-dir", default=str(ROOT / ".bench"), help="where the generated files live")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)
    sizes = [int(x) for x in (args.sizes or ("100000,1000000" if args.quick else "1000000,10000000")).split(",")]
    bench_dir = Path(args.bench_dir)
    bench_dir.mkdir(parents=True, exist_ok=True)
    cmd = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["bench_audit_vocab.py", *argv])
    print(f"command: {cmd}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {os.cpu_count()} CPUs, load average {load:.1f} at start, python {sys.version.split()[0]}; "
          f"medians of {args.runs} interleaved runs")

    trees = [("this tree", ROOT, args.runs)]
    if args.tree:
        trees.append((f"--tree {args.tree}", Path(args.tree).resolve(), args.tree_runs))
    rows: list[dict] = []
    for n in sizes:
        vocab, ann = _vocab(bench_dir, n), _annotations(bench_dir, n)
        mm = ["-m", "mmprep", "audit-labels", "--vocab", str(vocab), str(ann)]
        variants: list[tuple[str, str, list[str], Path, int]] = [("read + split (baseline)", "-", ["-c", _READ,
                                                                  str(vocab)], ROOT, args.runs)]
        for label, tree, runs in trees:
            variants.append(("audit-labels", label, mm, tree, runs))
            variants.append(("audit-labels --json", label, [*mm, "--json"], tree, runs))
        results: dict[int, list[tuple[float, float] | None]] = {k: [] for k in range(len(variants))}
        for rnd in range(max(runs for *_x, runs in variants)):
            order = list(range(len(variants)))
            order = order[rnd % len(order):] + order[: rnd % len(order)]
            for k in order:
                if rnd < variants[k][4] and None not in results[k]:
                    results[k].append(_run(variants[k][2], variants[k][3], args.timeout))
        base = statistics.median(r[0] for r in results[0] if r is not None)
        for k, (name, tree_label, *_rest) in enumerate(variants):
            got = results[k]
            done = [r for r in got if r is not None]
            row = {"tags": n, "variant": name, "tree": tree_label, "runs": len(got),
                   "timed_out": len(done) < len(got)}
            if done:
                wall = statistics.median(r[0] for r in done)
                row |= {"median_s": wall, "us_per_tag": wall / n * 1e6, "peak_rss_mb": max(r[1] for r in done),
                        "vs_baseline": wall / base}
            rows.append(row)

    print(f"{'tags':>11} {'variant':<26} {'code':<22} {'median s':>9} {'µs/tag':>7} {'peak RSS MB':>12} "
          f"{'vs read':>8}")
    for r in rows:
        if "median_s" in r:
            print(f"{r['tags']:>11,} {r['variant']:<26} {r['tree']:<22} {r['median_s']:>9.2f} {r['us_per_tag']:>7.2f} "
                  f"{r['peak_rss_mb']:>12,.0f} {r['vs_baseline']:>7.1f}×")
        else:
            print(f"{r['tags']:>11,} {r['variant']:<26} {r['tree']:<22} {'> ' + str(int(args.timeout)) + ' s':>9} "
                  f"(stopped)")
    headline = []
    if len(sizes) > 1:
        small, large = sizes[0], sizes[-1]
        print(f"growth from {small:,} to {large:,} tags (1.00 = linear):")
        for name, tree_label in dict.fromkeys((r["variant"], r["tree"]) for r in rows):
            ts = {r["tags"]: r.get("median_s") for r in rows if r["variant"] == name and r["tree"] == tree_label}
            if ts.get(small) and ts.get(large):
                exponent = math.log(ts[large] / ts[small]) / math.log(large / small)
                print(f"  {name:<26} {tree_label:<22} {exponent:.2f}")
                if tree_label == "this tree" and name == "audit-labels --json":
                    headline.append({"name": f"audit-labels --json growth exponent, {small:,} -> {large:,} tags",
                                     "value": exponent, "target": 1.1, "op": "<="})
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"command": cmd, "rows": rows, "headline": headline}, indent=2)
                                       + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
