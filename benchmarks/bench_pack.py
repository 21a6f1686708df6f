"""``mmprep pack`` against the decode ceiling and the pipelines users write instead, on one corpus, in one run.

Corpus: :mod:`benchmarks.corpus` (real photographs re-cropped to 500x375 .. 1024x768, ~90% JPEG q90 / 10% PNG,
1-5 images per sample, real captions, RAM tags), in the page cache. Every method makes the same picture of each
image: a 224x224 centre crop (bicubic, antialiased), on ``--workers`` processes where the tool allows. Each
method runs in a fresh process (imports and start-up included in its wall time); its peak memory is the peak
*sum* of the resident sets of its whole process tree.

Methods:

- ``ceiling``: Pillow ``open`` + ``draft`` (JPEG DCT scaling) + one ``resize`` per image on a fork pool, output
  discarded. No orientation, modes, errors, padding, text or writing: the physical limit with this decoder.
- ``pack``: ``mmprep pack`` through its CLI with its defaults (the fast resampler): padded to ``--limit-images``
  slots (uint8 CHW, masks, sizes, boxes), captions tokenised (CLIP BPE, ``--max-length``), tags mapped through the
  RAM vocabulary, zstd shards (the default 512 MB, which pack lowers for an input this small so that it still
  makes 16 shards), index, rejects. Its time includes its start: reading the manifest, loading the tokenizer
  (from mmprep's tokenizer cache, filled by a pack of 8 rows before the rounds, as by any earlier run) and
  starting the pool.
- ``pack-pillow``: the same with ``--resampler pillow`` (Pillow draft + bicubic for every image, as before the fast
  path).
- ``hf-datasets``: what a competent user writes with Hugging Face ``datasets``: ``Dataset.from_json`` ->
  ``map(batched=True, num_proc=workers)`` doing the same work (PIL open, EXIF transpose, RGB, ``ImageOps.fit``
  bicubic, padded uint8 ``Array4D`` with masks, the fast tokenizer on the batch, tag ids) -> ``to_parquet``.
- ``blog``: the pipeline of a typical blog post: one process, ``Image.open().convert("RGB").resize((224, 224))``,
  to float32, ImageNet normalisation, the tokenizer called per sample, everything kept in a list, one pandas
  ``to_parquet`` at the end (no padding).
- ``img2dataset``: img2dataset 1.47 reading the corpus over HTTP from a server bound to 127.0.0.1 (it reads URLs
  only), ``--resize_mode center_crop --image_size 224``, Parquet output (one row per image, re-encoded JPEG), on
  ``--workers`` processes. It runs from its own virtual environment (``.bench/venv-img2dataset``, made with
  ``pip install img2dataset==1.47.0`` on first use; ``--i2d-python`` names another), since its pins do not
  belong in mmprep's environment. Its time is its own shards' start-to-end span (server and process start-up
  excluded, in its favour).

Rounds rotate the order of the methods (A B C, B C A, ...) so drift on a shared machine hits all alike. Figures are
medians over ``--repeats`` rounds; ratios are of medians of images/s (work time: from the first file read to the
last file written, inside the process). Peak RSS of ``pack`` is shown again on a corpus ``--rss-factor`` times
larger: it must not grow with the corpus.

    python benchmarks/bench_pack.py [--samples 2000] [--workers 2] [--repeats 3] [--methods ...] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks._harness import ceiling_decode, fmt_ratio, markdown_table, median, run_measured  # noqa: E402
from benchmarks.corpus import make_corpus  # noqa: E402

METHODS = ("ceiling", "pack", "pack-pillow", "hf-datasets", "blog", "img2dataset")
SIZE = 224
TOKENIZER = REPO_ROOT / "sample_data" / "tokenizers" / "clip"
VOCAB = REPO_ROOT / "sample_data" / "ram_tag_list.txt"
I2D_VERSION = "1.47.0"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _rows(manifest: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()]


def _vocab_ids() -> dict[str, int]:
    names = VOCAB.read_text(encoding="utf-8").splitlines()
    return {n.strip(): i for i, n in enumerate(names) if n.strip()}


# ---- the methods that run inside this script (``--run METHOD``, in a fresh process) -------------------------


def _ceiling_chunk(paths: list[str]) -> int:
    return ceiling_decode(paths, SIZE)


def _run_ceiling(manifest: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    import multiprocessing as mp

    rows = _rows(manifest)
    paths = [str(manifest.parent / ref) for r in rows for ref in r["images"]]
    chunks = [paths[i:i + 8] for i in range(0, len(paths), 8)]
    start = time.perf_counter()
    with mp.get_context("fork").Pool(args.workers) as pool:
        done = sum(pool.imap_unordered(_ceiling_chunk, chunks))
    return {"seconds": time.perf_counter() - start, "images": done, "samples": len(rows)}


def _hf_prepare(batch: dict[str, list[Any]], root: str, limit: int, max_length: int) -> dict[str, Any]:
    import numpy as np
    from PIL import Image, ImageOps

    tok, vocab = _HF_STATE.get("tok"), _HF_STATE.get("vocab")
    if tok is None:  # once per map worker process
        from transformers import AutoTokenizer

        tok = _HF_STATE["tok"] = AutoTokenizer.from_pretrained(str(TOKENIZER))
        vocab = _HF_STATE["vocab"] = _vocab_ids()
    n = len(batch["id"])
    pixels = np.zeros((n, limit, 3, SIZE, SIZE), dtype=np.uint8)
    masks = np.zeros((n, limit), dtype=bool)
    counts = []
    for i, refs in enumerate(batch["images"]):
        for j, ref in enumerate(refs[:limit]):
            with Image.open(os.path.join(root, ref)) as im:
                rgb = ImageOps.exif_transpose(im).convert("RGB")
            fitted = ImageOps.fit(rgb, (SIZE, SIZE), Image.Resampling.BICUBIC)
            pixels[i, j] = np.asarray(fitted).transpose(2, 0, 1)
            masks[i, j] = True
        counts.append(min(len(refs), limit))
    enc = tok(batch["text"], padding="max_length", truncation=True, max_length=max_length)
    return {"id": batch["id"], "image_count": counts, "image_mask": masks, "pixel_values": pixels,
            "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "tag_ids": [[vocab[t] for t in tags] for tags in batch["tags"]], "text": batch["text"]}


_HF_STATE: dict[str, Any] = {}


def _run_hf(manifest: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    import datasets
    from datasets import Array4D, Dataset, Features, Sequence, Value

    datasets.disable_progress_bars()
    cache = out / "hf-cache"
    start = time.perf_counter()
    ds = Dataset.from_json(str(manifest), cache_dir=str(cache))
    features = Features({
        "id": Value("string"), "image_count": Value("int32"), "image_mask": Sequence(Value("bool")),
        "pixel_values": Array4D(shape=(args.limit_images, 3, SIZE, SIZE), dtype="uint8"),
        "input_ids": Sequence(Value("int32")), "attention_mask": Sequence(Value("int8")),
        "tag_ids": Sequence(Value("int32")), "text": Value("string"),
    })
    ds = ds.map(_hf_prepare, batched=True, batch_size=16, num_proc=args.workers, features=features,
                remove_columns=ds.column_names, fn_kwargs={"root": str(manifest.parent), "limit": args.limit_images,
                                                          "max_length": args.max_length})
    ds.to_parquet(str(out / "hf.parquet"))
    seconds = time.perf_counter() - start
    images = sum(ds["image_count"])
    return {"seconds": seconds, "images": images, "samples": len(ds)}


def _run_blog(manifest: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import pandas as pd
    from PIL import Image
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    vocab = _vocab_ids()
    mean = np.array(IMAGENET_MEAN, dtype=np.float32)
    std = np.array(IMAGENET_STD, dtype=np.float32)
    start = time.perf_counter()
    records = []
    images = 0
    with open(manifest, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            arrays = []
            for ref in row["images"]:
                img = Image.open(manifest.parent / ref).convert("RGB").resize((SIZE, SIZE))
                arr = (np.asarray(img, dtype=np.float32) / 255.0 - mean) / std
                arrays.append(arr.transpose(2, 0, 1))
            images += len(arrays)
            enc = tokenizer(row["text"], padding="max_length", truncation=True, max_length=args.max_length)
            records.append({"id": row["id"], "pixel_values": np.stack(arrays).ravel(), "num_images": len(arrays),
                            "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                            "tag_ids": [vocab[t] for t in row["tags"]], "text": row["text"]})
    pd.DataFrame(records).to_parquet(out / "blog.parquet")
    return {"seconds": time.perf_counter() - start, "images": images, "samples": len(records)}


RUNNERS = {"ceiling": _run_ceiling, "hf-datasets": _run_hf, "blog": _run_blog}


# ---- methods that run other programs ------------------------------------------------------------------------


def _pack_cmd(manifest: Path, out: Path, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "mmprep", "pack", str(manifest), "--out", str(out), "--image-size", str(SIZE),
            "--resize-mode", "center-crop", "--limit-images", str(args.limit_images), "--tokenizer", str(TOKENIZER),
            "--max-length", str(args.max_length), "--vocab", str(VOCAB), "--workers", str(args.workers),
            "--quiet", "--json"]


def _i2d_python(args: argparse.Namespace) -> str | None:
    """img2dataset's interpreter: --i2d-python, else its own venv under .bench (made on first use)."""
    if args.i2d_python:
        return args.i2d_python
    venv = REPO_ROOT / ".bench" / "venv-img2dataset"
    py = venv / "bin" / "python"
    if not py.exists():
        print(f"making {venv} (pip install img2dataset=={I2D_VERSION}) ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        r = subprocess.run([str(py), "-m", "pip", "install", "-q", f"img2dataset=={I2D_VERSION}"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            print(f"img2dataset could not be installed; skipped:\n{r.stderr[-2000:]}", file=sys.stderr)
            shutil.rmtree(venv, ignore_errors=True)
            return None
    return str(py)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _measure_i2d(manifest: Path, out: Path, args: argparse.Namespace, py: str) -> dict[str, Any]:
    rows = _rows(manifest)
    refs = [ref for r in rows for ref in r["images"]]
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                               "--directory", str(manifest.parent)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):  # wait until it answers
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.05)
        urls = out / "urls.txt"
        out.mkdir(parents=True, exist_ok=True)
        urls.write_text("".join(f"http://127.0.0.1:{port}/{ref}\n" for ref in refs))
        per_shard = max(16, math.ceil(len(refs) / (4 * args.workers)))
        cmd = [py, "-m", "img2dataset.main", "--url_list", str(urls), "--input_format", "txt",
               "--output_format", "parquet", "--output_folder", str(out / "i2d"), "--image_size", str(SIZE),
               "--resize_mode", "center_crop", "--processes_count", str(args.workers), "--thread_count", "16",
               "--number_sample_per_shard", str(per_shard), "--timeout", "30", "--retries", "0"]
        m = run_measured(cmd, env={"NO_ALBUMENTATIONS_UPDATE": "1"})
    finally:
        server.terminate()
        server.wait(timeout=10)
    if m.rc != 0:
        raise RuntimeError(f"img2dataset failed ({m.rc}):\n{m.stderr[-3000:]}")
    stats = [json.loads(p.read_text()) for p in sorted((out / "i2d").glob("*_stats.json"))]
    ok = sum(s["successes"] for s in stats)
    if ok != len(refs):
        raise RuntimeError(f"img2dataset wrote {ok} of {len(refs)} images")
    seconds = max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)
    return {"seconds": seconds, "images": ok, "samples": len(rows), "wall_s": m.wall_s, "peak_rss_mb": m.peak_rss_mb}


def _measure(method: str, manifest: Path, out: Path, args: argparse.Namespace, i2d_py: str | None) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    try:
        if method == "img2dataset":
            assert i2d_py is not None
            return _measure_i2d(manifest, out, args, i2d_py)
        if method in ("pack", "pack-pillow"):
            cmd = _pack_cmd(manifest, out / "packed", args) + (["--resampler", "pillow"] if method != "pack" else [])
            m = run_measured(cmd, env={"MMPREP_NO_PROGRESS": "1"})
            if m.rc != 0:
                raise RuntimeError(f"pack failed ({m.rc}):\n{m.stderr[-3000:]}")
            rep = json.loads(m.stdout)
            if rep["rejected"]:
                raise RuntimeError(f"pack rejected {rep['rejected']} rows: {rep['rejected_by_reason']}")
            return {"seconds": rep["seconds"], "images": rep["images_written"], "samples": rep["written"],
                    "wall_s": m.wall_s, "peak_rss_mb": m.peak_rss_mb, "bytes": rep["bytes_written"]}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--run", method, "--corpus-manifest", str(manifest),
               "--out-dir", str(out), "--workers", str(args.workers), "--limit-images", str(args.limit_images),
               "--max-length", str(args.max_length)]
        m = run_measured(cmd, env={"TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_OFFLINE": "1",
                                   "HF_HUB_OFFLINE": "1"})
        if m.rc != 0:
            raise RuntimeError(f"{method} failed ({m.rc}):\n{m.stderr[-3000:]}")
        res = json.loads(m.stdout.strip().splitlines()[-1])
        return {**res, "wall_s": m.wall_s, "peak_rss_mb": m.peak_rss_mb}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ips = [r["images"] / r["seconds"] for r in runs]
    sps = [r["samples"] / r["seconds"] for r in runs]
    return {"images_per_s": median(ips), "samples_per_s": median(sps), "images_per_s_runs": ips,
            "seconds": median([r["seconds"] for r in runs]), "wall_s": median([r["wall_s"] for r in runs]),
            "peak_rss_mb": median([r["peak_rss_mb"] for r in runs]), "images": runs[0]["images"],
            "samples": runs[0]["samples"]}


TARGETS = {"ceiling": 1.0, "pack-pillow": 1.0, "hf-datasets": 3.5, "img2dataset": 2.0, "blog": 6.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2000, help="corpus samples (~2.25 images each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--limit-images", type=int, default=5)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--rss-factor", type=int, default=2,
                    help="also measure pack's peak RSS on a corpus this many times larger (0: skip)")
    ap.add_argument("--i2d-python", default=None, help="a Python with img2dataset installed")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the results to this file")
    ap.add_argument("--quick", action="store_true", help="small run for CI: 60 samples, 1 round, RSS x2")
    ap.add_argument("--run", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    ap.add_argument("--corpus-manifest", help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.run:  # one method, in this fresh process; the result is the last line of stdout
        res = RUNNERS[args.run](Path(args.corpus_manifest), Path(args.out_dir), args)
        print(json.dumps(res))
        return 0

    if args.quick:
        args.samples, args.repeats, args.rss_factor = 60, 1, 2
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    print("command: python " + shlex.join(["benchmarks/bench_pack.py", *(sys.argv[1:] if argv is None else argv)]))
    t0 = time.perf_counter()
    corpus_dir = REPO_ROOT / ".bench" / f"corpus-{args.samples}-{args.seed}"
    manifest = make_corpus(corpus_dir, args.samples, args.seed)
    info = json.loads((corpus_dir / "corpus.json").read_text())
    for p in (corpus_dir / "images").iterdir():  # into the page cache
        p.read_bytes()
    print(f"corpus: {corpus_dir.relative_to(REPO_ROOT)} ({info['samples']} samples, {info['images']} images: "
          f"{info['jpeg']} JPEG, {info['png']} PNG; sources: {info.get('source', 'shared/realdata')}; ready in "
          f"{time.perf_counter() - t0:.1f}s)")
    import cv2
    import PIL
    import simplejpeg

    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start; workers: {args.workers}; "
          f"{SIZE}x{SIZE} center-crop, limit {args.limit_images} images, {args.max_length} tokens; "
          f"{args.repeats} round(s); Pillow {PIL.__version__}, simplejpeg {simplejpeg.__version__}, "
          f"OpenCV {cv2.__version__}")
    i2d_py = _i2d_python(args) if "img2dataset" in methods else None
    if "img2dataset" in methods and i2d_py is None:
        methods.remove("img2dataset")

    scratch = REPO_ROOT / ".bench" / "bench-pack-out"
    if "pack" in methods:  # a run on a few rows first fills mmprep's tokenizer cache, as any earlier run would
        few = scratch.parent / "bench-pack-warmup.jsonl"
        few.write_text("".join(manifest.read_text(encoding="utf-8").splitlines(keepends=True)[:8]), encoding="utf-8")
        warm = run_measured([*_pack_cmd(few, scratch / "warmup", args), "--image-root", str(manifest.parent)])
        shutil.rmtree(scratch, ignore_errors=True)
        if warm.rc != 0:
            raise SystemExit(f"pack failed on the warm-up rows:\n{warm.stderr[-3000:]}")
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for rnd in range(args.repeats):
        order = methods[rnd % len(methods):] + methods[:rnd % len(methods)]
        for m in order:
            res = _measure(m, manifest, scratch, args, i2d_py)
            runs[m].append(res)
            print(f"  round {rnd + 1} {m}: {res['images'] / res['seconds']:,.0f} images/s "
                  f"({res['seconds']:.1f}s, peak RSS {res['peak_rss_mb']:,.0f} MB)", file=sys.stderr, flush=True)
    summary = {m: _summary(r) for m, r in runs.items()}

    rss_big = None
    if args.rss_factor and "pack" in methods:
        big_n = args.samples * args.rss_factor
        big_manifest = make_corpus(REPO_ROOT / ".bench" / f"corpus-{big_n}-{args.seed}", big_n, args.seed)
        big_runs = [_measure("pack", big_manifest, scratch, args, None) for _ in range(args.repeats)]
        rss_big = {"samples": big_n, **_summary(big_runs)}

    pack = summary.get("pack")
    rows = []
    for m in methods:
        s = summary[m]
        ratio = pack["images_per_s"] / s["images_per_s"] if pack and m != "pack" else None
        rows.append([m, f"{s['images_per_s']:,.0f}", f"{s['samples_per_s']:,.0f}", f"{s['seconds']:.1f}",
                     f"{s['wall_s']:.1f}", f"{s['peak_rss_mb']:,.0f}", fmt_ratio(ratio),
                     f">= {TARGETS[m]}" if m in TARGETS else "-"])
        s["pack_ratio"] = ratio
    print()
    print(markdown_table(["method", "images/s", "samples/s", "work s", "process wall s", "peak RSS MB",
                          "pack / method (images/s)", "target"], rows))
    if rss_big and pack:
        print()
        print(markdown_table(["pack corpus", "samples", "images", "images/s", "peak RSS MB"], [
            ["base", pack["samples"], pack["images"], f"{pack['images_per_s']:,.0f}", f"{pack['peak_rss_mb']:,.0f}"],
            [f"x{args.rss_factor}", rss_big["samples"], rss_big["images"], f"{rss_big['images_per_s']:,.0f}",
             f"{rss_big['peak_rss_mb']:,.0f}"],
        ]))
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")
    headline = []
    for m, target in TARGETS.items():
        if pack and m in summary:
            r = summary[m]["pack_ratio"]
            print(f"pack / {m} = {r:.2f} images/s (target >= {target}: {'met' if r >= target else 'NOT met'})")
            headline.append({"name": f"pack / {m} (images/s)", "value": r, "target": target, "op": ">="})
    if rss_big and pack:
        growth = rss_big["peak_rss_mb"] / pack["peak_rss_mb"]
        print(f"pack peak RSS on the x{args.rss_factor} corpus / base corpus = {growth:.2f} (flat: ~1; "
              f"{pack['peak_rss_mb']:,.0f} MB -> {rss_big['peak_rss_mb']:,.0f} MB)")
        headline.append({"name": f"pack peak RSS, x{args.rss_factor} corpus / base corpus", "value": growth,
                         "target": 1.25, "op": "<="})
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": {k: v for k, v in vars(args).items()
                                                            if k not in ("run", "corpus_manifest", "out_dir")},
                                                   "corpus": info, "results": summary, "rss_large": rss_big,
                                                   "headline": headline}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
