"""``pack --device cuda`` against the CPU path and the decode ceilings, images/s in one run (needs a GPU for the
CUDA rows; without one it says why and measures the CPU rows only).

Corpus: :mod:`benchmarks.corpus` (real photographs re-cropped to 500x375 .. 1024x768, ~90% baseline JPEG q90, ~10%
PNG, 1-5 images a sample). Every method makes a 224x224 bicubic centre crop of every image. Methods, each in a
fresh process (start-up included in its wall time; images/s is over its work time):

- ``ceiling``: Pillow ``open`` + ``draft`` + one ``resize`` per image on a fork pool of ``--workers`` (the CPU
  decode ceiling of BENCHMARKS.md), output discarded.
- ``pack cpu``: ``mmprep pack --workers W`` (images only: no tokenizer, 5 padded uint8 slots, zstd shards).
- ``pack cuda xN``: the same with ``--device cuda --workers N`` for each N of ``--cuda-workers``.
- ``nvjpeg ceiling``: one process, the routed JPEGs' bytes in memory, ``torchvision.io.decode_jpeg(list,
  device="cuda")`` in batches of 64, synchronised, output discarded: the GPU decode ceiling.
- ``device path``: one process, :class:`mmprep.images.gpu.GpuImages` rendering the same JPEGs into 224x224 slots
  (decode, orientation, resampling, normalisation, one copy back per 64 images): pack's GPU work without pack.

After the rounds, the shards of ``pack cpu`` and ``pack cuda`` are compared image by image (mean absolute difference
and its 99th percentile, in levels): the measured tolerance of the GPU path on this corpus.

    python benchmarks/bench_gpu.py [--samples 1000] [--workers N] [--cuda-workers 1,4,N] [--repeats 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks._harness import ceiling_decode, fmt_ratio, markdown_table, median, run_measured  # noqa: E402
from benchmarks.corpus import make_corpus  # noqa: E402

SIZE = 224
BATCH = 64


def _paths(manifest: Path) -> list[str]:
    rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [str(manifest.parent / ref) for r in rows for ref in r["images"]]


def _ceiling_chunk(paths: list[str]) -> int:
    return ceiling_decode(paths, SIZE)


def _run_ceiling(manifest: Path, args: argparse.Namespace) -> dict[str, Any]:
    import multiprocessing as mp

    paths = _paths(manifest)
    chunks = [paths[i:i + 8] for i in range(0, len(paths), 8)]
    start = time.perf_counter()
    with mp.get_context("fork").Pool(args.workers) as pool:
        done = sum(pool.imap_unordered(_ceiling_chunk, chunks))
    return {"seconds": time.perf_counter() - start, "images": done}


def _routed(manifest: Path) -> tuple[list[bytes], Any]:
    from mmprep.images.decode import ImageConfig, Normalization
    from mmprep.images.gpu import GpuImages

    g = GpuImages(ImageConfig(size=(SIZE, SIZE), resize_mode="center-crop"), Normalization(), device="cuda")
    datas = [Path(p).read_bytes() for p in _paths(manifest)]
    return [d for d in datas if g.probe(d) is not None], g


def _run_nvjpeg(manifest: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from mmprep.images.gpu import nvjpeg_decoder

    datas, _ = _routed(manifest)
    decode = nvjpeg_decoder(torch.device("cuda"))
    decode(datas[:8])  # CUDA context and nvJPEG handles
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(datas), BATCH):
        decode(datas[i:i + BATCH])
    torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - start, "images": len(datas)}


def _run_device_path(manifest: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    datas, g = _routed(manifest)
    jobs = [g.probe(d) for d in datas]
    g.render([(0, jobs[0])], 1, 1)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(jobs), BATCH):
        group = jobs[i:i + BATCH]
        _, failed = g.render(list(enumerate(group)), len(group), 1)
        assert not failed, failed
    return {"seconds": time.perf_counter() - start, "images": len(jobs)}


RUNNERS = {"ceiling": _run_ceiling, "nvjpeg": _run_nvjpeg, "device": _run_device_path}


def _pack(manifest: Path, out: Path, workers: int, device: str) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "mmprep", "pack", str(manifest), "--out", str(out), "--image-size", str(SIZE),
           "--resize-mode", "center-crop", "--limit-images", "5", "--workers", str(workers), "--device", device,
           "--quiet", "--json"]
    m = run_measured(cmd, env={"MMPREP_NO_PROGRESS": "1"})
    if m.rc != 0:
        raise RuntimeError(f"pack --device {device} failed ({m.rc}):\n{m.stderr[-3000:]}")
    rep = json.loads(m.stdout)
    if rep["rejected"] or rep.get("device", "cpu") != device:
        raise RuntimeError(f"pack --device {device}: {rep['rejected']} rejected, ran on {rep.get('device')}")
    return {"seconds": rep["seconds"], "images": rep["images_written"], "wall_s": m.wall_s,
            "peak_rss_mb": m.peak_rss_mb}


def _inner(method: str, manifest: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run", method, "--corpus-manifest", str(manifest),
           "--workers", str(args.workers)]
    m = run_measured(cmd)
    if m.rc != 0:
        raise RuntimeError(f"{method} failed ({m.rc}):\n{m.stderr[-3000:]}")
    return {**json.loads(m.stdout.strip().splitlines()[-1]), "wall_s": m.wall_s, "peak_rss_mb": m.peak_rss_mb}


def _compare(cpu_dir: Path, cuda_dir: Path) -> dict[str, Any]:
    """Per-image mean |difference| and 99th percentile between two packs of the same corpus."""
    import numpy as np

    from mmprep.dataset.reader import PackedDataset

    a, b = PackedDataset(cpu_dir), PackedDataset(cuda_dir)
    means, p99s, exact = [], [], 0
    for ba, bb in zip(a.iter_batches(64), b.iter_batches(64), strict=True):
        assert ba["id"] == bb["id"]
        for i, count in enumerate(ba["image_count"]):
            for k in range(int(count)):
                d = np.abs(ba["pixel_values"][i, k].astype(np.int16) - bb["pixel_values"][i, k].astype(np.int16))
                means.append(float(d.mean()))
                p99s.append(float(np.percentile(d, 99)))
                exact += int(not d.any())
    return {"images": len(means), "mean_of_means": float(np.mean(means)), "max_mean": float(np.max(means)),
            "max_p99": float(np.max(p99s)), "identical_images": exact}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=None, help="corpus samples, ~2.25 images each (default 1000; "
                    "120 with --quick)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="CPU workers (ceiling, pack cpu)")
    ap.add_argument("--cuda-workers", default=None, help="comma-separated --workers for pack --device cuda "
                    "(default: --workers)")
    ap.add_argument("--repeats", type=int, default=None, help="rounds (default 2; 1 with --quick)")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the results to this file")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--run", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    ap.add_argument("--corpus-manifest", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.run:
        print(json.dumps(RUNNERS[args.run](Path(args.corpus_manifest), args)))
        return 0
    from mmprep.images.gpu import gpu_problem

    samples = args.samples or (120 if args.quick else 1000)
    repeats = max(1, args.repeats or (1 if args.quick else 2))
    cuda_workers = [int(w) for w in (args.cuda_workers or str(args.workers)).split(",") if w.strip()]
    cmd = ["benchmarks/bench_gpu.py", *(sys.argv[1:] if argv is None else argv)]
    print("command: python " + shlex.join(cmd))
    bench = REPO_ROOT / ".bench"
    manifest = make_corpus(bench / f"corpus-{samples}-{args.seed}", samples, args.seed)
    info = json.loads((manifest.parent / "corpus.json").read_text())
    problem = gpu_problem()
    gpu_name = None
    if problem is None:
        import torch

        gpu_name = torch.cuda.get_device_name(0)
    print(f"corpus: {info['samples']} samples, {info['images']} images ({info['jpeg']} JPEG, {info['png']} PNG), "
          f"source {info['source']}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
          f"GPU: {gpu_name or 'none (' + str(problem) + ')'}; medians of {repeats} round(s)")
    methods: list[tuple[str, Any]] = [("ceiling", lambda: _inner("ceiling", manifest, args)),
                                      ("pack cpu", lambda: _pack(manifest, bench / "gpu-pack-cpu", args.workers,
                                                                 "cpu"))]
    if problem is None:
        for w in cuda_workers:
            methods.append((f"pack cuda x{w}",
                            lambda w=w: _pack(manifest, bench / f"gpu-pack-cuda-{w}", w, "cuda")))
        methods += [("nvjpeg ceiling", lambda: _inner("nvjpeg", manifest, args)),
                    ("device path", lambda: _inner("device", manifest, args))]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in methods}
    for r in range(repeats):
        order = methods[r % len(methods):] + methods[:r % len(methods)]
        for name, fn in order:
            runs[name].append(fn())
            print(f"  round {r + 1}: {name}: {runs[name][-1]['images'] / runs[name][-1]['seconds']:,.0f} images/s",
                  flush=True)
    results = {}
    for name, rs in runs.items():
        ips = [x["images"] / x["seconds"] for x in rs]
        results[name] = {"images_per_s": median(ips), "images": rs[0]["images"],
                         "wall_s": median([x["wall_s"] for x in rs]),
                         "peak_rss_mb": median([x["peak_rss_mb"] for x in rs]), "runs": ips}
    ceiling = results["ceiling"]["images_per_s"]
    cpu = results["pack cpu"]["images_per_s"]
    table = [[name, f"{res['images']:,}", f"{res['images_per_s']:,.0f}", f"{res['wall_s']:.1f}",
              f"{res['peak_rss_mb']:,.0f}", fmt_ratio(res["images_per_s"] / ceiling),
              fmt_ratio(res["images_per_s"] / cpu)] for name, res in results.items()]
    print()
    print(markdown_table(["method", "images", "images/s (work)", "wall s", "peak RSS MB", "vs ceiling",
                          "vs pack cpu"], table))
    if problem is not None:
        print(f"\ncuda rows: not measured ({problem})")
    tolerance = None
    if problem is None:
        best = max((n for n in results if n.startswith("pack cuda")), key=lambda n: results[n]["images_per_s"])
        tolerance = _compare(bench / "gpu-pack-cpu", bench / f"gpu-pack-cuda-{best.split('x')[-1]}")
        print(f"\npixels, pack cuda against pack cpu, per image over {tolerance['images']:,} images: mean |diff| "
              f"{tolerance['mean_of_means']:.3f} levels on average, at most {tolerance['max_mean']:.2f}; 99th "
              f"percentile at most {tolerance['max_p99']:.0f}; {tolerance['identical_images']:,} images identical")
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")
    if args.json_out:
        headline = []
        if problem is None:
            best_ips = max(results[n]["images_per_s"] for n in results if n.startswith("pack cuda"))
            headline = [{"name": "pack cuda / pack cpu (images/s)", "value": best_ips / cpu, "target": None,
                         "op": "info"},
                        {"name": "pack cuda / Pillow decode ceiling", "value": best_ips / ceiling, "target": None,
                         "op": "info"}]
        Path(args.json_out).write_text(json.dumps({"command": cmd, "gpu": gpu_name, "problem": problem,
                                                   "corpus": info, "results": results, "tolerance": tolerance,
                                                   "headline": headline}, indent=2) + "\n")
    for name in list(results):
        if name.startswith("pack"):
            shutil.rmtree(bench / ("gpu-pack-cpu" if name == "pack cpu" else f"gpu-pack-cuda-{name.split('x')[-1]}"),
                          ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
