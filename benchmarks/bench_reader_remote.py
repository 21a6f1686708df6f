"""Reader samples/s from object storage (a real S3 API on loopback) against local files, in the same run, and the
reader's peak RSS as the dataset grows.

Data: the benchmark corpus packed exactly as ``bench_reader.py`` packs it (``benchmarks/corpus.py``: real photos,
captions, RAM tags; CLIP tokenizer, letterbox, 4 slots; reused from ``.bench/``), uploaded to moto's S3 server
(``python -m moto.server``, the S3-compatible server from PyPI) started by this script on 127.0.0.1 and read with
s3fs. Nothing talks to any other address (dummy credentials, no proxies: ``tests/_s3_server.py``). The server is
one Python process on the same cores as the reader, so the S3 figures include the server's own work: a lower
bound for a real store's throughput on this machine, not a network measurement.

Methods (same shards, same batch size, every column, warm page cache; the S3 ones with a fresh
``PackedDataset`` per round, so footers are fetched each time):

- ``local files`` (baseline): ``PackedDataset(dir).iter_batches(b)``.
- ``s3, prefetch 4`` (the default for a remote dataset): the same from ``s3://``: one range request per row group
  (pyarrow coalesces its column chunks), the next 4 row groups fetched by background threads.
- ``s3, no prefetch``: ``prefetch=0``, each row group fetched when it is needed (what prefetch buys).
- ``s3, range cache warm``: ``cache_dir`` filled by a first pass; a later epoch reads the row groups from local
  disk and asks the store only for sizes and footers.
- ``s3 over a network``, no prefetch / prefetch 4: through a proxy (its own process, ``tests/_s3_server.py``) that
  holds every answer 50 ms and sends bodies at 100 MB/s per connection, as a store across a network does (first-byte
  latency, per-connection throughput): what the background prefetch is for.
- ``local epoch plan`` / ``s3 epoch plan``: the training path (``PackedIterableDataset``): one worker's shuffled
  plan over all row groups, rows shuffled within windows of 4 row groups.

Each method runs once per round in a rotated order, for ``--repeats`` rounds after a warm-up pass; figures are
medians over rounds, ratios the median of per-round ratios to the baseline.

Memory: a fresh process reads a dataset once (defaults), for datasets of 1x, 2x and 4x the rows (``--quick``: 1x
and 4x) (the same shard
files under their own prefix, listed 2 and 4 times in that dataset's index), from S3 and, as the same-run baseline,
from local files (hard links); its peak RSS is sampled every 20 ms (``_harness.run_measured``), median of 3
processes per size (1 with ``--quick``). Headline: peak RSS
from S3 at 4x / at 1x (flat: <= 1.25).

    python benchmarks/bench_reader_remote.py [--quick] [--samples N] [--size PX] [--batch-size B] [--repeats R]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
for p in (REPO_ROOT, REPO_ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

BUCKET = "mmprep-bench"


def read_all(path: str, batch_size: int, **kw: Any) -> int:
    from mmprep.dataset.reader import PackedDataset

    ds = PackedDataset(path, **kw)
    rows = 0
    for b in ds.iter_batches(batch_size):
        rows += len(b["id"])
    ds.close()
    return rows


def read_plan(path: str, batch_size: int, epoch: int, **kw: Any) -> int:
    from mmprep.dataset.reader import PackedDataset

    ds = PackedDataset(path, **kw)
    plan = ds.epoch_plan(epoch=epoch, seed=0)
    rng = np.random.default_rng([0, epoch])
    rows = 0
    for b in ds.iter_plan(plan, batch_size, shuffle_rng=rng, window=4):
        rows += len(b["id"])
    ds.close()
    return rows


def _shards(local: Path) -> list[Path]:
    """The packed directory's shards (the Hub layout: ``data/{split}-NNNNN-of-NNNNN.parquet``)."""
    return sorted((local / "data").glob("*.parquet"))


def _repeated_index(local: Path, copies: int) -> dict[str, Any]:
    """The index of ``local`` with every split's shards listed ``copies`` times and its totals to match."""
    index = json.loads((local / "index.json").read_text())
    for split in index["splits"].values():
        split["shards"] = split["shards"] * copies
        t = split["totals"]
        for key in ("read", "written", "rejected", "images_written", "bytes"):
            if key in t:
                t[key] *= copies
    return index


def upload(fs: Any, local: Path, prefix: str, copies: int = 1) -> str:
    """Upload a packed directory to s3://BUCKET/prefix; with ``copies`` > 1 its index lists every shard that many
    times (a dataset of ``copies`` x the rows, stored once)."""
    for p in _shards(local):
        fs.put_file(str(p), f"{BUCKET}/{prefix}/data/{p.name}")
    fs.pipe_file(f"{BUCKET}/{prefix}/index.json", json.dumps(_repeated_index(local, copies)).encode())
    return f"s3://{BUCKET}/{prefix}"


def local_copies(local: Path, dest: Path, copies: int) -> Path:
    """A local dataset of ``copies`` x the rows: hard links to the shards, listed ``copies`` times."""
    (dest / "data").mkdir(parents=True, exist_ok=True)
    for p in _shards(local):
        (dest / "data" / p.name).unlink(missing_ok=True)
        os.link(p, dest / "data" / p.name)
    (dest / "index.json").write_text(json.dumps(_repeated_index(local, copies)))
    return dest


@contextlib.contextmanager
def latency_proxy(upstream: int, seconds: float, bandwidth: float) -> Iterator[str]:
    """A proxy in its own process adding ``seconds`` to every answer and sending bodies at ``bandwidth`` bytes/s;
    yields its endpoint."""
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "tests" / "_s3_server.py"), str(upstream), str(seconds),
                             str(bandwidth)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield f"http://127.0.0.1:{int(proc.stdout.readline())}"
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)


def child(args: argparse.Namespace) -> int:
    """--child: read a dataset once (for the peak-RSS measurement in a fresh process)."""
    opts = json.loads(args.options)
    rows = read_all(args.child, args.batch_size or 64, **({"storage_options": opts} if opts else {}))
    print(json.dumps({"rows": rows}))
    return 0


def main(argv: list[str] | None = None) -> int:
    from benchmarks.bench_reader import add_data_args, data_params

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_args(ap)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    samples, size, repeats, b = data_params(args)
    rss_runs = 1 if args.quick else 3
    cmd = ["benchmarks/bench_reader_remote.py", *(sys.argv[1:] if argv is None else argv)]
    print("command: python " + shlex.join(cmd))

    from _s3_server import environment, s3_env, start_moto

    from benchmarks._harness import run_measured, timed_rounds
    from benchmarks.bench_reader import prepare, rows_per_shard
    from mmprep.dataset.reader import PackedDataset

    local, source = prepare(samples, size, args.seed, args.workers, rows_per_shard(samples, b))
    ref = PackedDataset(local)
    data_bytes = sum(s.bytes for s in ref.shards)
    groups = len(ref.row_group_bounds()) - 1
    print(f"data: {source}")
    print(f"packed: {local.relative_to(REPO_ROOT)}: {len(ref):,} rows, {len(ref.shards)} shards, {groups} row groups, "
          f"{data_bytes / 1e6:,.1f} MB; batch size {b}; all {len(ref.column_names)} columns")

    tmp = Path(tempfile.mkdtemp(prefix="mmprep-bench-s3-"))
    with environment(s3_env(tmp)), contextlib.ExitStack() as stack:
        moto = start_moto(dict(os.environ))
        stack.callback(moto.stop)
        stack.callback(shutil.rmtree, tmp, True)
        slow = {"endpoint_url": stack.enter_context(latency_proxy(moto.port, 0.05, 100e6))}
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=moto.endpoint, skip_instance_cache=True)
        fs.mkdir(BUCKET)
        opts = {"endpoint_url": moto.endpoint}
        t0 = time.perf_counter()
        uri = upload(fs, local, "x1")
        print(f"uploaded to {uri} on moto's S3 server at {moto.endpoint} in {time.perf_counter() - t0:.1f} s")
        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start (the S3 server "
              f"runs on the same cores); medians of {repeats} rotated rounds after a warm-up")
        cache = tmp / "cache"
        read_all(uri, b, storage_options=opts, cache_dir=cache)  # fill the range cache once

        def plan(path: str, **kw: Any) -> Callable[[], int]:
            calls = [0]

            def run() -> int:  # the k-th call reads epoch k: local and s3 read the same plans
                calls[0] += 1
                return read_plan(path, b, calls[0], **kw)

            return run

        methods: dict[str, Callable[[], int]] = {
            "local files (baseline)": lambda: read_all(str(local), b),
            "s3, prefetch 4 (default)": lambda: read_all(uri, b, storage_options=opts),
            "s3, no prefetch": lambda: read_all(uri, b, storage_options=opts, prefetch=0),
            "s3, range cache warm": lambda: read_all(uri, b, storage_options=opts, cache_dir=cache),
            "s3 over a network (50 ms, 100 MB/s), no prefetch": lambda: read_all(uri, b, storage_options=slow,
                                                                                  prefetch=0),
            "s3 over a network (50 ms, 100 MB/s), prefetch 4": lambda: read_all(uri, b, storage_options=slow),
            "local epoch plan": plan(str(local)),
            "s3 epoch plan": plan(uri, storage_options=opts),
        }
        same = {"s3 epoch plan": "local epoch plan",
                "s3 over a network (50 ms, 100 MB/s), prefetch 4": "s3 over a network (50 ms, 100 MB/s), no prefetch"}
        names = list(methods)

        def check(name: str, got: int) -> None:  # the warm-up reads every row
            assert got == len(ref), (name, got, len(ref))

        times = timed_rounds(methods, repeats, check)

        # peak RSS of a fresh reader process as the dataset grows (the same shards listed 1, 2, 4 times)
        rss: dict[str, dict[int, float]] = {"s3": {}, "local": {}}
        for k in ((1, 4) if args.quick else (1, 2, 4)):
            where = {"s3": (uri if k == 1 else upload(fs, local, f"x{k}", k), opts),
                     "local": (str(local if k == 1 else local_copies(local, local.with_name(f"{local.name}-x{k}"), k)),
                               {})}
            for kind, (u, o) in where.items():
                peaks = []
                for _ in range(rss_runs):
                    m = run_measured([sys.executable, str(Path(__file__).resolve()), "--child", u, "--options",
                                      json.dumps(o), "--batch-size", str(b)], env=dict(os.environ), cwd=REPO_ROOT)
                    if m.rc != 0:
                        raise SystemExit(f"the reader process failed:\n{m.stderr[-2000:]}")
                    assert json.loads(m.stdout)["rows"] == k * len(ref)
                    peaks.append(m.peak_rss_mb)
                rss[kind][k] = statistics.median(peaks)

    base = names[0]

    def ratio_to(ref_name: str, name: str) -> float:
        return statistics.median(tb / tm for tb, tm in zip(times[ref_name], times[name], strict=True))

    print()
    print(f"| method | samples/s (median of {repeats}) | MB/s of shards | vs local files | vs same-work baseline |")
    print("|---|---|---|---|---|")
    results: dict[str, Any] = {}
    for name in names:
        med = statistics.median(times[name])
        sps = len(ref) / med
        ratio = ratio_to(base, name)
        alike = ratio_to(same[name], name) if name in same else None
        results[name] = {"median_s": med, "samples_per_s": sps, "ratio_vs_local": ratio,
                         "ratio_vs_same_work": alike, "runs_s": times[name]}
        print(f"| {name} | {sps:,.0f} | {data_bytes / med / 1e6:,.0f} | {ratio:.2f} | "
              f"{'-' if alike is None else f'{alike:.2f}'} |")
    print()
    print(f"| dataset | rows | peak RSS from S3 (MB, median of {rss_runs}) | vs 1x | peak RSS from local files (MB) "
          "| vs 1x |")
    print("|---|---|---|---|---|---|")
    for k in rss["s3"]:
        s3mb, lmb = rss["s3"][k], rss["local"][k]
        print(f"| {k}x | {k * len(ref):,} | {s3mb:,.0f} | {s3mb / rss['s3'][1]:.2f} | {lmb:,.0f} | "
              f"{lmb / rss['local'][1]:.2f} |")
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")
    ratio = results["s3, prefetch 4 (default)"]["ratio_vs_local"]
    growth = rss["s3"][4] / rss["s3"][1]
    print(f"s3 / local files = {ratio:.2f}; peak RSS 4x / 1x = {growth:.2f} (flat <= 1.25: "
          f"{'met' if growth <= 1.25 else 'NOT met'})")
    if args.json_out:
        headline = [
            {"name": "reader from loopback S3 / from local files (samples/s)", "value": ratio, "target": None,
             "op": "info"},
            {"name": "reader peak RSS, 4x dataset / 1x dataset (from S3)", "value": growth, "target": 1.25,
             "op": "<="},
        ]
        Path(args.json_out).write_text(json.dumps({"command": cmd, "rows": len(ref), "batch_size": b,
                                                   "results": results, "rss_mb": rss, "headline": headline},
                                                  indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
