"""Samples/s of the packed-data reader into numpy batches against raw pyarrow column reading, in the same run.

Data: the benchmark corpus (``benchmarks/corpus.py``: real photographs, captions and RAM tags; from
``../shared/realdata``, else from the repository's own photographs), packed once with the real ``pack``
(CLIP tokenizer, RAM vocabulary, letterbox, ``--limit-images 4 --too-many-images truncate``, zstd) into
``.bench/reader-*/`` and reused while the parameters are unchanged. Shards hold a whole number of batches
(``--rows-per-shard`` = batch size x max(1, samples // (4 x batch size))), so both the default run (1024 samples,
batch 64: 256-row shards) and ``--quick`` (96 samples, batch 6: 24-row shards) read 4 batches a shard and no batch
crosses a shard boundary unless rows were rejected (the run prints how many do: there the reader copies the parts
into one batch, which the per-shard baseline never does).

Methods (same shards, same batch size, every column of the shards, warm page cache):

- ``raw pyarrow`` (baseline): ``ParquetFile.iter_batches(batch_size, columns)`` per shard, then each column to
  numpy the cheapest way pyarrow allows: ``np.frombuffer`` of the ``fixed_size_binary`` pixel buffer (flat bytes,
  no reshape), ``flatten().to_numpy()`` of fixed-size lists, ``to_numpy()`` of scalars, ``to_pylist()`` of strings
  and variable-length lists.
- ``reader``: ``PackedDataset.iter_batches(batch_size)``: the same columns as a batch dict, pixels viewed as
  ``[B, limit, C, H, W]`` in the stored dtype, fixed-size lists reshaped, batches cut exactly across shards.
- ``reader + normalize float32`` / ``float16``: the same with normalisation on load, compared with
  ``raw pyarrow + numpy normalize``: the raw baseline plus the normalisation a training script would write
  (``(px.astype(float32) / 255 - mean) / std``, cast), which produces the same output.
- ``reader take (block shuffle)``: random access by ``TokenBudgetBatchSampler`` batches shuffled within windows
  of row groups (for information).
- ``naive pyarrow to_numpy``: ``to_numpy(zero_copy_only=False)`` on every column (object arrays; for information).

Each method runs once per round in a rotated order, for ``--repeats`` rounds after a warm-up pass; figures are
medians over rounds and the ratio column is the median of per-round ratios to the baseline (robust to drift on a
shared machine). Target: reader >= 0.8 x raw.

    python benchmarks/bench_reader.py [--quick] [--samples N] [--size PX] [--batch-size B] [--repeats R]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks._harness import timed_rounds  # noqa: E402

SAMPLE = REPO_ROOT / "sample_data"


def rows_per_shard(samples: int, batch_size: int) -> int:
    """Shard size for the benchmark pack: a whole number of batches, about 4 shards."""
    return batch_size * max(1, samples // (4 * batch_size))


def crossing_batches(shard_rows: list[int], batch_size: int) -> tuple[int, int]:
    """(batches that span more than one shard, all batches) when reading ``shard_rows`` in order."""
    ends = np.cumsum(shard_rows)
    total = int(ends[-1]) if len(ends) else 0
    starts = np.arange(0, total, batch_size)
    first = np.searchsorted(ends, starts, side="right")
    last = np.searchsorted(ends, np.minimum(starts + batch_size, total) - 1, side="right")
    return int((first != last).sum()), len(starts)


def prepare(samples: int, size: int, seed: int, workers: int, shard_rows: int) -> tuple[Path, str]:
    """Pack (or reuse) the benchmark data; returns the packed directory and a description of the source."""
    from benchmarks.corpus import make_corpus
    from mmprep.images.decode import ImageConfig
    from mmprep.pack.config import PackConfig
    from mmprep.pack.job import pack
    from mmprep.text.config import TextConfig

    corpus_dir = REPO_ROOT / ".bench" / f"corpus-{samples}-{seed}"
    manifest = make_corpus(corpus_dir, samples, seed)
    origin = json.loads((corpus_dir / "corpus.json").read_text()).get("source", "shared/realdata")
    source = f"benchmark corpus {corpus_dir.relative_to(REPO_ROOT)} (real photos from {origin}, captions, RAM tags)"
    out = REPO_ROOT / ".bench" / f"reader-packed-{samples}-{seed}-{size}-{shard_rows}"
    stamp = out / "bench-params.json"
    params = {"samples": samples, "seed": seed, "size": size, "rows_per_shard": shard_rows, "manifest": str(manifest),
              "version": 3}  # 3: the Hub layout (data/, splits in index.json)
    if (out / "index.json").exists() and stamp.exists() and json.loads(stamp.read_text()) == params:
        return out, source
    if out.exists():  # this benchmark's own cache, made with other parameters or an older layout: made again
        shutil.rmtree(out)
    cfg = PackConfig(
        manifest=str(manifest), out=str(out), image=ImageConfig(size=(size, size), resize_mode="letterbox"),
        limit_images=4, too_many_images="truncate", tokenizer=str(SAMPLE / "tokenizers" / "clip"),
        text=TextConfig(max_length=77), vocab=str(SAMPLE / "ram_tag_list.txt"), unknown_tags="drop",
        rows_per_shard=shard_rows,
    )
    t0 = time.perf_counter()
    report = pack(cfg, workers=workers, overwrite=True)
    if report.failed or not report.written:
        raise SystemExit(f"packing the benchmark data failed: {report.failed or 'no rows written'}")
    stamp.write_text(json.dumps(params))
    print(f"packed {report.written} rows into {out.relative_to(REPO_ROOT)} in {time.perf_counter() - t0:.1f}s")
    return out, source


# -- methods: each reads the whole dataset once and returns the rows it produced --------------------------------


def raw_pyarrow(files: list[Path], columns: list[str], batch_size: int) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = 0
    for path in files:
        f = pq.ParquetFile(path)
        for rb in f.iter_batches(batch_size=batch_size, columns=columns, use_threads=True):
            out = {}
            for name in columns:
                col = rb.column(name)
                t = col.type
                if pa.types.is_fixed_size_binary(t):
                    w = t.byte_width
                    out[name] = np.frombuffer(col.buffers()[1], np.uint8, len(col) * w, col.offset * w)
                elif pa.types.is_fixed_size_list(t):
                    v = col.flatten()
                    while pa.types.is_fixed_size_list(v.type):
                        v = v.flatten()
                    out[name] = v.to_numpy(zero_copy_only=False)
                elif pa.types.is_list(t) or pa.types.is_string(t):
                    out[name] = col.to_pylist()
                else:
                    out[name] = col.to_numpy(zero_copy_only=False)
            rows += rb.num_rows
        f.close()
    return rows


def raw_normalized(files: list[Path], columns: list[str], batch_size: int, spec: object, dtype: str) -> int:
    """The raw baseline plus the normalisation a training script would write: reshape, /255, -mean, /std."""
    import pyarrow.parquet as pq

    mean = np.asarray(spec.mean, dtype=np.float32).reshape(spec.channel_shape())  # type: ignore[attr-defined]
    std = np.asarray(spec.std, dtype=np.float32).reshape(spec.channel_shape())  # type: ignore[attr-defined]
    shape = spec.shape  # type: ignore[attr-defined]
    rows = 0
    for path in files:
        f = pq.ParquetFile(path)
        for rb in f.iter_batches(batch_size=batch_size, columns=columns, use_threads=True):
            col = rb.column("pixel_values")
            w = col.type.byte_width
            px = np.frombuffer(col.buffers()[1], np.uint8, len(col) * w, col.offset * w).reshape(len(col), *shape)
            _ = ((px.astype(np.float32) / 255.0 - mean) / std).astype(dtype, copy=False)
            rows += rb.num_rows
        f.close()
    return rows


def naive_pyarrow(files: list[Path], columns: list[str], batch_size: int) -> int:
    import pyarrow.parquet as pq

    rows = 0
    for path in files:
        f = pq.ParquetFile(path)
        for rb in f.iter_batches(batch_size=batch_size, columns=columns, use_threads=True):
            _ = {name: rb.column(name).to_numpy(zero_copy_only=False) for name in columns}
            rows += rb.num_rows
        f.close()
    return rows


def reader_batches(path: Path, batch_size: int, normalize: str | None = None) -> int:
    from mmprep.dataset.reader import PackedDataset

    ds = PackedDataset(path, normalize=normalize)
    rows = 0
    for b in ds.iter_batches(batch_size):
        assert b["pixel_values"].ndim == 5
        rows += len(b["id"])
    return rows


def reader_take(path: Path, batch_size: int, epoch: int) -> int:
    from mmprep.dataset.reader import PackedDataset
    from mmprep.dataset.samplers import TokenBudgetBatchSampler

    ds = PackedDataset(path, cache_row_groups=8)
    costs = np.ones(len(ds), dtype=np.int64)  # a fixed batch size through the budget sampler
    sampler = TokenBudgetBatchSampler(costs, batch_size, seed=1, blocks=ds.row_group_bounds(), window=4)
    sampler.set_epoch(epoch)
    rows = 0
    for idx in sampler:
        rows += len(ds.take(idx)["id"])
    return rows


def add_data_args(ap: argparse.ArgumentParser) -> None:
    """The options of the packed data and the rounds (shared with ``bench_reader_remote.py``)."""
    ap.add_argument("--samples", type=int, default=None, help="manifest rows (default 1024; 96 with --quick)")
    ap.add_argument("--size", type=int, default=None, help="image size (default 224; 64 with --quick)")
    ap.add_argument("--batch-size", type=int, default=None, help="rows a batch (default 64; 6 with --quick)")
    ap.add_argument("--repeats", type=int, default=None, help="rounds (default 5; 3 with --quick)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="pack workers (data preparation)")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the results to this file")
    ap.add_argument("--quick", action="store_true", help="tiny run for the regression check")


def data_params(args: argparse.Namespace) -> tuple[int, int, int, int]:
    """``(samples, image size, rounds, batch size)`` from :func:`add_data_args`' options and their defaults."""
    samples = args.samples or (96 if args.quick else 1024)
    size = args.size or (64 if args.quick else 224)
    repeats = max(3, args.repeats or (3 if args.quick else 5))
    b = args.batch_size or (6 if args.quick else 64)
    if b < 1:
        raise SystemExit("--batch-size must be at least 1")
    return samples, size, repeats, b


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_args(ap)
    args = ap.parse_args(argv)
    samples, size, repeats, b = data_params(args)
    cmd = ["benchmarks/bench_reader.py", *(sys.argv[1:] if argv is None else argv)]
    print("command: python " + shlex.join(cmd))

    path, source = prepare(samples, size, args.seed, args.workers, rows_per_shard(samples, b))
    from mmprep.dataset.reader import PackedDataset

    ds = PackedDataset(path)
    files = [s.path for s in ds.shards]
    columns = ds.column_names
    assert ds.pixels is not None
    data_bytes = sum(s.bytes for s in ds.shards)
    print(f"data: {source}")
    print(f"packed: {path.relative_to(REPO_ROOT)}: {len(ds):,} rows, {len(files)} shards, {data_bytes / 1e6:,.1f} MB "
          f"on disk; pixels {ds.pixels.dtype.name} {list(ds.pixels.shape)} = {ds.pixels.row_bytes / 1e3:,.0f} kB a "
          f"row; batch size {b}; all {len(columns)} columns")
    crossing, batches = crossing_batches([s.rows for s in ds.shards], b)
    print(f"shards of {sorted({s.rows for s in ds.shards}, reverse=True)} rows: {crossing} of {batches} reader "
          "batches cross a shard boundary (the baseline reads per shard, so it never joins rows of two shards)")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start (shared with other "
          f"work: compare ratios, not absolute numbers); medians of {repeats} rotated rounds after a warm-up")

    epoch = [0]

    def take() -> int:
        epoch[0] += 1
        return reader_take(path, b, epoch[0])

    spec = ds.pixels
    methods: dict[str, Callable[[], int]] = {
        "raw pyarrow (baseline)": lambda: raw_pyarrow(files, columns, b),
        "reader": lambda: reader_batches(path, b),
        "reader take (block shuffle)": take,
        "naive pyarrow to_numpy": lambda: naive_pyarrow(files, columns, b),
        "raw pyarrow + numpy normalize float32": lambda: raw_normalized(files, columns, b, spec, "float32"),
        "reader + normalize float32": lambda: reader_batches(path, b, "float32"),
        "raw pyarrow + numpy normalize float16": lambda: raw_normalized(files, columns, b, spec, "float16"),
        "reader + normalize float16": lambda: reader_batches(path, b, "float16"),
    }
    # the baseline that produces the same output, for the second ratio column
    same = {"reader + normalize float32": "raw pyarrow + numpy normalize float32",
            "reader + normalize float16": "raw pyarrow + numpy normalize float16"}
    names = list(methods)

    def check(name: str, got: int) -> None:  # the warm-up (page cache, imports, first-call costs) reads every row
        assert got == len(ds), (name, got, len(ds))

    times = timed_rounds(methods, repeats, check)
    base = names[0]
    print()
    print(f"| method | samples/s (median of {repeats}) | stored pixel MB/s | vs raw pyarrow | vs same-output "
          "baseline |")
    print("|---|---|---|---|---|")
    results = {}

    def ratio_to(ref: str, name: str) -> float:
        return statistics.median(tb / tm for tb, tm in zip(times[ref], times[name], strict=True))

    for name in names:
        med = statistics.median(times[name])
        sps = len(ds) / med
        ratio = ratio_to(base, name)
        alike = ratio_to(same[name], name) if name in same else None
        results[name] = {"median_s": med, "samples_per_s": sps, "ratio_vs_raw": ratio,
                         "ratio_vs_same_output": alike, "runs_s": times[name]}
        print(f"| {name} | {sps:,.0f} | {sps * ds.pixels.row_bytes / 1e6:,.0f} | {ratio:.2f} | "
              f"{'-' if alike is None else f'{alike:.2f}'} |")
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")
    ratio = results["reader"]["ratio_vs_raw"]
    print(f"reader / raw pyarrow = {ratio:.2f} (target >= 0.8: {'met' if ratio >= 0.8 else 'NOT met'})")
    if args.json_out:
        headline = [{"name": "reader / raw pyarrow columns (samples/s into numpy)", "value": ratio, "target": 0.8,
                     "op": ">="}]
        Path(args.json_out).write_text(json.dumps({"command": cmd, "rows": len(ds), "batch_size": b,
                                                   "rows_per_shard": [sh.rows for sh in ds.shards],
                                                   "crossing_batches": crossing, "results": results,
                                                   "headline": headline}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
