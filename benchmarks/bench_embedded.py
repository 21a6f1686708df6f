"""Peak memory of ``pack`` on inputs that carry their images (Hugging Face ``Image`` values in Parquet), as the
input grows, against the same images given as files, in one run.

Corpus: noise JPEGs (they do not compress: every image is ``--side``\\ ² pixels of random colour, quality 90),
written once under ``.bench/`` as

- ``embedded-<MB>.parquet``: one row per image, ``images`` a list of one Hugging Face ``Image`` value
  ``{bytes, path}`` (with the ``huggingface`` schema metadata ``datasets`` writes), the bytes in the file;
- ``files-<MB>/``: the same JPEGs as files and a JSONL manifest naming them (what ``pack`` always read).

Each input is packed by ``mmprep pack`` through its CLI in a fresh process (``--pad max``, ``--image-size
64`` letterboxed, ``--workers`` processes, the default shard size); its peak memory is the peak *sum* of the resident
sets of its whole process tree, sampled every 20 ms (:func:`benchmarks._harness.run_measured`). The embedded input
is packed at two sizes (``--mb`` and a fifth of it): memory must not grow with the input (the rows travel to the
workers without their bytes, which wait in a spool file). The file input of the larger size is the baseline.

    python benchmarks/bench_embedded.py [--mb 500] [--side 384] [--workers 2]
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks._harness import markdown_table, run_measured  # noqa: E402


def make_inputs(mb: int, side: int, seed: int = 0) -> tuple[Path, Path, int]:
    """The embedded Parquet and the file manifest of about ``mb`` MB of JPEGs (made once, reused)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    root = REPO_ROOT / ".bench" / "embedded"
    parquet = root / f"embedded-{mb}-{side}.parquet"
    files = root / f"files-{mb}-{side}"
    manifest = files / "manifest.jsonl"
    if parquet.exists() and manifest.exists():
        return parquet, manifest, sum(1 for _ in manifest.open())
    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(files, ignore_errors=True)
    files.mkdir()
    rng = np.random.default_rng(seed)
    image_type = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    features = {"info": {"features": {"id": {"_type": "Value", "dtype": "string"},
                                      "images": {"_type": "Sequence", "feature": {"_type": "Image"}},
                                      "caption": {"_type": "Value", "dtype": "string"}}}}
    schema = pa.schema([("id", pa.string()), ("images", image_type), ("caption", pa.string())],
                       metadata={"huggingface": json.dumps(features)})
    total, n = 0, 0
    tmp = parquet.with_suffix(".tmp")
    with pq.ParquetWriter(tmp, schema) as writer, manifest.open("w") as man:
        while total < mb * 1_000_000:
            batch = {"id": [], "images": [], "caption": []}
            for _ in range(100):  # row groups of 100 rows, as datasets writes image datasets
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
                data = buf.getvalue()
                name = f"img{n:06d}.jpg"
                (files / name).write_bytes(data)
                batch["id"].append(f"r{n:06d}")
                batch["images"].append([{"bytes": data, "path": name}])
                batch["caption"].append(f"noise image {n}")
                man.write(json.dumps({"id": f"r{n:06d}", "images": [name], "caption": f"noise image {n}"}) + "\n")
                total += len(data)
                n += 1
            writer.write_table(pa.table(batch, schema=schema))
    tmp.rename(parquet)
    return parquet, manifest, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=500, help="image megabytes of the larger input")
    ap.add_argument("--side", type=int, default=384, help="image side in pixels")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    small_mb = max(1, args.mb // 5)
    inputs = {}
    for mb in (small_mb, args.mb):
        inputs[mb] = make_inputs(mb, args.side)
    results = []
    work = Path(tempfile.mkdtemp(prefix="mmprep-bench-embedded-"))
    try:
        runs = [("embedded Parquet", small_mb, inputs[small_mb][0], inputs[small_mb][2], []),
                ("embedded Parquet", args.mb, inputs[args.mb][0], inputs[args.mb][2], []),
                ("files (baseline)", args.mb, inputs[args.mb][1], inputs[args.mb][2], [])]
        for k, (what, mb, path, rows, extra) in enumerate(runs):
            out = work / f"out{k}"
            cmd = [sys.executable, "-m", "mmprep", "pack", str(path), "--out", str(out), "--image-size", "64",
                   "--resize-mode", "letterbox", "--limit-images", "1", "--workers", str(args.workers), "--json",
                   *extra]
            m = run_measured(cmd, env={"MMPREP_NO_PROGRESS": "1"})
            if m.rc != 0:
                raise SystemExit(f"{what}: exit {m.rc}: {m.stderr[-2000:]}")
            report = json.loads(m.stdout)
            assert report["written"] == rows, report
            results.append({"input": what, "image_mb": mb, "rows": rows, "wall_s": round(m.wall_s, 2),
                            "rows_per_s": round(rows / m.wall_s, 1), "peak_rss_mb": round(m.peak_rss_mb, 1),
                            "input_bytes": path.stat().st_size if path.is_file() else None})
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = results[-1]["peak_rss_mb"]
    rows_out = [(r["input"], f"{r['image_mb']:,}", f"{r['rows']:,}", r["wall_s"], r["rows_per_s"],
                 r["peak_rss_mb"], f"{r['peak_rss_mb'] / base:.2f}x") for r in results]
    print(markdown_table(["input", "image MB", "rows", "wall s", "rows/s", "peak RSS MB (tree)", "RSS vs files"],
                         rows_out))
    growth = results[1]["peak_rss_mb"] / results[0]["peak_rss_mb"]
    print(f"\npeak RSS, embedded {args.mb} MB / embedded {small_mb} MB: {growth:.2f}x "
          f"(input {args.mb / small_mb:.0f}x larger)")
    if args.json:
        headline = [
            {"name": f"embedded / peak RSS growth, input {args.mb // small_mb}x larger", "value": round(growth, 3),
             "target": 1.25, "op": "<="},
            {"name": "embedded / peak RSS vs the same images as files",
             "value": round(results[1]["peak_rss_mb"] / base, 3), "target": 1.5, "op": "<="},
        ]
        args.json.write_text(json.dumps({"results": results, "rss_growth": growth, "headline": headline}, indent=1))


if __name__ == "__main__":
    main()
