"""How long the command line takes to answer, against a bare ``python -c pass`` measured in the same run.

Rows (each a fresh process, as a user's shell starts it; stdout and stderr to pipes):

* ``bare python -c pass`` (baseline): the interpreter's own start;
* ``python -c "import typer"``: the floor of any Typer command line (Typer imports click and pydantic lazily);
* ``mmprep --version``;
* ``mmprep --help`` / ``mmprep pack --help``, **kept page**: the page drawn before, printed from the cache folder
  (what every help request but the first one in a terminal and environment costs): the figures checked against the
  0.3 s target (the headline);
* the same pages **drawn** by Typer and Rich (``MMPREP_NO_CACHE=1``: the first request, or any with ``--config``);
* a shell completion (bash protocol) of a command name and of an option of ``pack``: what a TAB costs;
* ``mmprep pack`` without ``--out``: the start of a run up to its first check (a usage error, exit 2).

Every method is timed once per round, in an order rotated each round, after one warm-up call each (the page cache,
and the kept help pages); times are medians over rounds, ratios medians of the per-round ratios to the baseline.
A second table shows where a drawn ``pack --help`` spends its time (``python -X importtime``, cumulative).

Usage: ``python benchmarks/bench_cli.py [--repeats N] [--quick] [--json FILE]``
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 0.3
BASE = "bare python -c pass (baseline)"
KEPT = "mmprep --help (kept page)"
KEPT_PACK = "mmprep pack --help (kept page)"


def _mmprep() -> list[str]:
    """The console script next to this interpreter (what users run), else ``python -m mmprep``."""
    script = Path(sys.executable).parent / "mmprep"
    return [str(script)] if script.exists() else [sys.executable, "-m", "mmprep"]


def _run(cmd: Sequence[str], env: dict[str, str], expect: int) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(list(cmd), capture_output=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != expect:
        raise SystemExit(f"{shlex.join(cmd)}: exit {proc.returncode}, expected {expect}\n{proc.stderr.decode()}")
    return wall


def _import_breakdown(env: dict[str, str]) -> list[tuple[str, float]]:
    """Cumulative import times (ms) of the parts of a drawn ``pack --help``, outermost occurrence of each."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "mmprep", "pack", "--help"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**env, "MMPREP_NO_CACHE": "1"},
                          cwd=ROOT, text=True)
    cumulative: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cum, name = line.split("|", 2)
        if cum.strip().isdigit():
            cumulative.setdefault(name.strip(), int(cum) / 1000)  # first line of a module is where it is imported
    parts = [("typer (with its vendored click)", "typer"),
             ("typer._adapters: pydantic, for Typer's per-parameter validation", "typer._adapters"),
             ("typer.rich_utils: Rich and its Markdown parser, for help pages", "typer.rich_utils"),
             ("mmprep.cli._app (the app, mmprep.output)", "mmprep.cli._app")]
    return [(label, cumulative.get(module, 0.0)) for label, module in parts]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=None, help="rounds (default 15; 7 with --quick)")
    ap.add_argument("--quick", action="store_true", help="fewer rounds (CI)")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)
    repeats = max(3, args.repeats or (7 if args.quick else 15))
    cmd = ["benchmarks/bench_cli.py", *(sys.argv[1:] if argv is None else argv)]
    print("command: python " + shlex.join(cmd))

    cache = tempfile.mkdtemp(prefix="mmprep-bench-cli-")
    base_env = {k: v for k, v in os.environ.items() if k not in ("MMPREP_NO_CACHE", "MMPREP_CONFIG", "COLUMNS")}
    env = {**base_env, "MMPREP_CACHE_DIR": cache, "COLUMNS": "120"}
    drawn = {**env, "MMPREP_NO_CACHE": "1"}
    mm = _mmprep()

    def complete(words: str) -> dict[str, str]:
        return {**env, "_MMPREP_COMPLETE": "complete_bash", "COMP_WORDS": words,
                "COMP_CWORD": str(len(words.split()) - 1)}

    methods: dict[str, tuple[list[str], dict[str, str], int]] = {
        BASE: ([sys.executable, "-c", "pass"], env, 0),
        'python -c "import typer"': ([sys.executable, "-c", "import typer"], env, 0),
        "mmprep --version": ([*mm, "--version"], env, 0),
        KEPT: ([*mm, "--help"], env, 0),
        KEPT_PACK: ([*mm, "pack", "--help"], env, 0),
        "mmprep --help (drawn)": ([*mm, "--help"], drawn, 0),
        "mmprep pack --help (drawn)": ([*mm, "pack", "--help"], drawn, 0),
        "completion: mmprep pa<TAB>": (mm, complete("mmprep pa"), 0),
        "completion: mmprep pack --compr<TAB>": (mm, complete("mmprep pack --compr"), 0),
        "mmprep pack m.jsonl (no --out: usage error)": ([*mm, "pack", "m.jsonl"], env, 2),
    }
    print(f"mmprep: {shlex.join(mm)}; help pages kept in {cache}")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start (shared with other work: "
          f"compare ratios, not absolute numbers); medians of {repeats} rotated rounds after a warm-up")
    names = list(methods)
    for name in names:  # warm-up (this also keeps the help pages the "kept page" rows print)
        _run(*methods[name])
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            times[name].append(_run(*methods[name]))

    print()
    print(f"| method | seconds (median of {repeats}) | over bare python (s) | x bare python |")
    print("|---|---|---|---|")
    results = {}
    for name in names:
        med = statistics.median(times[name])
        over = statistics.median(t - b for t, b in zip(times[name], times[BASE], strict=True))
        times_bare = statistics.median(t / b for t, b in zip(times[name], times[BASE], strict=True))
        results[name] = {"median_s": med, "over_bare_s": over, "x_bare": times_bare, "runs_s": times[name]}
        print(f"| {name} | {med:.3f} | {over:+.3f} | {times_bare:.1f} |")

    breakdown = _import_breakdown(env)
    drawn_s = results["mmprep pack --help (drawn)"]["median_s"]
    print(f"\nwhere a drawn `mmprep pack --help` ({drawn_s:.2f} s) spends its time: imports (python -X importtime, "
          "cumulative; importtime itself adds overhead)")
    print("| part | ms |")
    print("|---|---|")
    for label, ms in breakdown:
        print(f"| {label} | {ms:,.0f} |")
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")
    kept, kept_pack = results[KEPT]["median_s"], results[KEPT_PACK]["median_s"]
    for label, value in (("mmprep --help", kept), ("mmprep pack --help", kept_pack)):
        met = "met" if value <= TARGET_S else "NOT met"
        print(f"{label}, kept page: {value:.3f} s (target <= {TARGET_S} s: {met})")
    if args.json_out:
        headline = [
            {"name": "mmprep --help, kept page (s)", "value": kept, "target": TARGET_S, "op": "<="},
            {"name": "mmprep pack --help, kept page (s)", "value": kept_pack, "target": TARGET_S, "op": "<="},
            {"name": "cli: bare python / mmprep --help, kept page (time ratio)",
             "value": 1 / results[KEPT]["x_bare"], "target": None, "op": "info"},
        ]
        Path(args.json_out).write_text(json.dumps({"command": cmd, "results": results,
                                                   "import_breakdown_ms": dict(breakdown), "headline": headline},
                                                  indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
