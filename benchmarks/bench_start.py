"""pack's fixed cost: what a run spends before (and around) its images, measured on an input of a few rows.

Every figure is the median of ``--repeats`` fresh processes (imports and interpreter start included), each as wall
seconds and as CPU seconds of the whole process tree (the parent and its workers: on a machine whose cores are
all busy with images, CPU seconds are what the start takes from them). Rows:

- ``python -c pass``: the interpreter alone;
- ``mmprep --help``: the CLI's own start (it must stay instant);
- ``pack, N rows, 1 worker``: CLI, manifest, tokenizer from mmprep's cache, vocabulary, shard plan, N rows'
  images, shards, index (in one process);
- ``pack, N rows, W workers``: the same with the worker pool (spawned processes, each importing what a shard needs
  and receiving the task);
- ``ceiling start``: the Pillow decode ceiling of ``bench_pack.py`` on the same N rows (its fixed cost is a fork
  pool and one import of Pillow per worker).

The corpus is ``benchmarks/corpus.py``'s (the first ``--rows`` rows), the flags are ``bench_pack.py``'s.
``--pythonpath DIR`` runs another checkout of mmprep (e.g. an older commit, for a before/after).

    python benchmarks/bench_start.py [--rows 8] [--workers 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks._harness import markdown_table, median  # noqa: E402
from benchmarks.corpus import make_corpus  # noqa: E402

TOKENIZER = REPO_ROOT / "sample_data" / "tokenizers" / "clip"
VOCAB = REPO_ROOT / "sample_data" / "ram_tag_list.txt"


def _timed(cmd: list[str], env: dict[str, str], cwd: str) -> tuple[float, float]:
    """Wall and CPU seconds (user + system of the process and every descendant it waited for)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--pythonpath", default=None, help="run the mmprep found here instead of this checkout's")
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args(argv)
    print("command: python " + shlex.join(["benchmarks/bench_start.py", *(sys.argv[1:] if argv is None else argv)]))
    corpus = make_corpus(REPO_ROOT / ".bench" / "corpus-2000-0", 2000, 0)
    work = Path(tempfile.mkdtemp(prefix="mmprep-bench-start-"))
    manifest = corpus.parent / f"first-{args.rows}.jsonl"  # next to the images, which both read relative to it
    try:
        manifest.write_text("".join(corpus.read_text(encoding="utf-8").splitlines(keepends=True)[: args.rows]))
        env = {**os.environ, "MMPREP_NO_PROGRESS": "1", "PYTHONPATH": args.pythonpath or str(REPO_ROOT)}
        cwd = str(work)  # not the checkout: `python -m mmprep` would import it from the current folder first
        py = sys.executable

        def pack_cmd(workers: int) -> list[str]:
            return [py, "-m", "mmprep", "pack", str(manifest), "--out", str(work / "out"), "--image-size", "224",
                    "--resize-mode", "center-crop", "--limit-images", "5", "--tokenizer", str(TOKENIZER),
                    "--max-length", "64", "--vocab", str(VOCAB), "--workers", str(workers), "--quiet", "--json"]

        ceiling = [py, str(REPO_ROOT / "benchmarks" / "bench_pack.py"), "--run", "ceiling", "--corpus-manifest",
                   str(manifest), "--out-dir", str(work / "c"), "--workers", str(args.workers)]
        cases = {
            "python -c pass": [py, "-c", "pass"],
            "mmprep --help": [py, "-m", "mmprep", "--help"],
            f"pack, {args.rows} rows, 1 worker": pack_cmd(1),
            f"pack, {args.rows} rows, {args.workers} workers": pack_cmd(args.workers),
            f"ceiling start ({args.rows} rows, {args.workers} processes)": ceiling,
        }
        results: dict[str, dict[str, float]] = {}
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
        _timed(cases[f"pack, {args.rows} rows, 1 worker"], env, cwd)  # fills mmprep's tokenizer cache
        shutil.rmtree(work / "out", ignore_errors=True)
        for _ in range(args.repeats):
            for name, cmd in cases.items():
                runs[name].append(_timed(cmd, env, cwd))
                shutil.rmtree(work / "out", ignore_errors=True)
        for name, values in runs.items():
            results[name] = {"wall_s": median([w for w, _ in values]), "cpu_s": median([c for _, c in values])}
    finally:
        shutil.rmtree(work, ignore_errors=True)
        manifest.unlink(missing_ok=True)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; mmprep from "
          f"{args.pythonpath or 'this checkout'}; medians of {args.repeats}")
    print()
    print(markdown_table(["run", "wall s", "CPU s (process tree)"],
                         [[n, f"{r['wall_s']:.2f}", f"{r['cpu_s']:.2f}"] for n, r in results.items()]))
    many = results[f"pack, {args.rows} rows, {args.workers} workers"]
    headline = [{"name": f"pack start ({args.rows} rows, {args.workers} workers), CPU s of the process tree",
                 "value": many["cpu_s"], "target": None, "op": "info"},
                {"name": f"pack start ({args.rows} rows, {args.workers} workers), wall s", "value": many["wall_s"],
                 "target": None, "op": "info"}]
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "results": results, "headline": headline},
                                                  indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
