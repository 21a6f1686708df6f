"""Dynamic masking (mmprep.dataset.transforms) against the per-sample Python loop users write, on CPU and CUDA.

One batch as the reader returns it: ``B`` rows x ``limit`` slots of ``3 x S x S`` pixels (uint8, or float32 after
normalisation), every slot a real image. Per image a run-time number of ``P x P`` patches (uniform in
``[lo, hi]``) is erased and filled with the image's mean colour. Both methods get the **same draw** (counts and
positions from one seeded CPU generator), and the benchmark checks that their outputs are identical before timing.

Methods, on each device (CUDA only when torch sees one):

- ``loop``: the baseline. For each image, its mean colour (``img.float().mean((1, 2))``), then for each of its
  patches a slice assignment ``img[:, y:y+P, x:x+P] = fill`` (patches clipped at the border). What a DALI user
  writes in plain PyTorch, and what cannot run inside a graph with run-time counts.
- ``vectorised``: :meth:`DynamicMasking.apply`: patches unrolled to the largest count, the pixel mask from
  comparisons and one batched product, the fill with ``torch.where``; no Python loop over images or patches.
  The draw itself is included in its time (the loop is given the draw for free).
- ``transform``: the whole :class:`BatchTransform` (normalise to float32, patch masks, dynamic masking) on uint8.

Timings are medians over ``--repeats`` rounds (CUDA: synchronised); ratios are of the same round on the same device.

    python benchmarks/bench_masks.py [--batch 64] [--limit 4] [--size 224] [--patch 16] [--count 1,16] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def loop_erase(images: Any, counts: Any, anchors: Any, p: int) -> Any:
    """The baseline: per image, per patch, slice assignment of the image's mean colour."""
    out = images.clone()
    counts_l = counts.tolist()
    anchors_l = anchors.tolist()
    for i in range(out.shape[0]):
        img = out[i]
        fill = img.float().mean(dim=(1, 2))
        if not img.is_floating_point():
            fill = (fill + 0.5).floor()
        fill = fill.to(img.dtype)[:, None, None]
        for k in range(counts_l[i]):
            y, x = anchors_l[i][k]
            img[:, y:y + p, x:x + p] = fill
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=None, help="rows a batch (default 64; 8 with --quick)")
    ap.add_argument("--limit", type=int, default=4, help="image slots a row")
    ap.add_argument("--size", type=int, default=None, help="image side (default 224; 96 with --quick)")
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--count", default="1,16", help="patches per image, lo,hi")
    ap.add_argument("--repeats", type=int, default=None, help="rounds (default 7; 3 with --quick)")
    ap.add_argument("--devices", default="cpu,cuda", help="devices to try (cuda only when available)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the results to this file")
    ap.add_argument("--quick", action="store_true", help="tiny run for CI smoke")
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from mmprep.dataset.arrays import PixelSpec
    from mmprep.dataset.transforms import BatchTransform, DynamicMasking, draw_patches, seeded_generator

    b = args.batch or (8 if args.quick else 64)
    s = args.size or (96 if args.quick else 224)
    repeats = max(3, args.repeats or (3 if args.quick else 7))
    lo, hi = (int(v) for v in args.count.split(","))
    p, limit = args.patch, args.limit
    n = b * limit
    cmd = ["benchmarks/bench_masks.py", *(sys.argv[1:] if argv is None else argv)]
    print("command: python " + shlex.join(cmd))
    print(f"batch: {b} rows x {limit} slots = {n} images of 3x{s}x{s}; {p}x{p} patches, {lo}-{hi} per image; "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; load average "
          f"{os.getloadavg()[0]:.2f}; medians of {repeats} rounds")
    gen = torch.Generator().manual_seed(0)
    pixels_u8 = torch.randint(0, 256, (b, limit, 3, s, s), dtype=torch.uint8, generator=gen)
    boxes = torch.tensor([0, 0, s, s], dtype=torch.int32).expand(b, limit, 4).contiguous()
    count = torch.full((b,), limit, dtype=torch.int32)
    spec = PixelSpec("pixel_values", __import__("numpy").dtype("uint8"), (limit, 3, s, s), "CHW", False,
                     (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    masking = DynamicMasking(p, (lo, hi), fill="mean")
    devices = [d for d in args.devices.split(",") if d == "cpu" or (d == "cuda" and torch.cuda.is_available())]
    if "cuda" in args.devices.split(",") and "cuda" not in devices:
        print("cuda: not measured (torch sees no CUDA device)")

    rows: list[dict[str, Any]] = []
    for device in devices:
        dev = torch.device(device)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        for kind in ("uint8", "float32"):
            pixels = pixels_u8.to(dev)
            if kind == "float32":
                pixels = pixels.float() / 255.0
            flat = pixels.reshape(n, 3, s, s)
            draw = draw_patches(n, (s, s), p, (lo, hi), seeded_generator(1), device=dev)
            bx, cnt = boxes.to(dev), count.to(dev)

            def loop(flat: Any = flat, draw: Any = draw) -> Any:
                return loop_erase(flat, draw.counts, draw.anchors, p)

            def vectorised(pixels: Any = pixels, bx: Any = bx, cnt: Any = cnt) -> Any:
                return masking.apply(pixels, "CHW", seeded_generator(1), content_boxes=bx, image_count=cnt)[0]

            # the same draw and the same pixels: check before timing
            want = loop()
            got = masking.apply(pixels, "CHW", seeded_generator(1), content_boxes=bx, image_count=cnt)[0]
            if kind == "uint8":
                assert torch.equal(got.reshape(n, 3, s, s), want), "vectorised and loop differ"
            else:
                assert torch.allclose(got.reshape(n, 3, s, s), want, atol=1e-5), "vectorised and loop differ"
            methods: dict[str, Callable[[], Any]] = {"loop": loop, "vectorised": vectorised}
            if kind == "uint8":
                transform = BatchTransform(spec, normalize="float32", patch_size=p, masking=masking, seed=1)
                batch = {"pixel_values": pixels, "content_boxes": bx, "image_count": cnt}
                methods["transform"] = lambda t=transform, bt=batch: t(bt)
            times: dict[str, list[float]] = {m: [] for m in methods}
            for fn in methods.values():  # warm-up
                fn()
            sync()
            names = list(methods)
            for r in range(repeats):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    sync()
                    t0 = time.perf_counter()
                    methods[name]()
                    sync()
                    times[name].append(time.perf_counter() - t0)
            for name in names:
                med = statistics.median(times[name])
                ratio = statistics.median(tl / tm for tl, tm in zip(times["loop"], times[name], strict=True))
                rows.append({"device": device, "pixels": kind, "method": name, "median_ms": med * 1e3,
                             "images_per_s": n / med, "speedup_vs_loop": ratio})
    print()
    print("| device | pixels | method | ms / batch | images/s | vs loop (same device) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['device']} | {r['pixels']} | {r['method']} | {r['median_ms']:,.1f} | {r['images_per_s']:,.0f} | "
              f"{r['speedup_vs_loop']:.2f} |")
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")
    cpu_u8 = next(r for r in rows if r["device"] == "cpu" and r["pixels"] == "uint8" and r["method"] == "vectorised")
    print(f"masks / per-sample loop (cpu, uint8) = {cpu_u8['speedup_vs_loop']:.2f}")
    if args.json_out:
        headline = [{"name": "masks / per-sample loop (cpu, uint8)", "value": cpu_u8["speedup_vs_loop"],
                     "target": None, "op": "info"}]
        cuda_u8 = [r for r in rows if r["device"] == "cuda" and r["pixels"] == "uint8" and r["method"] == "vectorised"]
        if cuda_u8:
            headline.append({"name": "masks / per-sample loop (cuda, uint8)", "value": cuda_u8[0]["speedup_vs_loop"],
                             "target": None, "op": "info"})
        Path(args.json_out).write_text(json.dumps({"command": cmd, "images": n, "size": s, "patch": p,
                                                   "count": [lo, hi], "results": rows, "headline": headline},
                                                  indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
