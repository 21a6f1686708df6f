"""``image-stats``: decode every image of a source (after the resize) and accumulate per-channel mean/std, sizes,
modes and formats; every file that cannot be used becomes an :class:`~mmprep.images.collect.ImageReject`."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mmprep.images.collect import ImageItem, ImageReject, ImageSet
from mmprep.images.decode import NORM_PRESETS, ImageConfig, ImageError, load_image
from mmprep.runtime.engines import make_engine
from mmprep.runtime.engines.base import map_items

__all__ = ["ImageStats", "compute_image_stats"]


@dataclass(frozen=True)
class _Measured:
    """What one decoded image adds to the statistics (exact integer sums over its counted pixels)."""

    ref: str
    sums: tuple[int, int, int]  # per channel (R, G, B)
    squares: tuple[int, int, int]
    pixels: int
    original_size: tuple[int, int]  # (w, h) before the resize
    mode: str
    format: str
    frames: int | None  # None: animated, frames not counted
    notes: int  # decoder warnings


def _stats_one(item: ImageItem, cfg: ImageConfig) -> _Measured | ImageReject:
    if item.error is not None:
        return item.error
    import numpy as np

    try:
        dec = load_image(item.path or item.ref, cfg)
    except ImageError as exc:
        return ImageReject(item.ref, exc.reason, exc.detail)
    x0, y0, x1, y1 = dec.content_box  # letterbox padding is not the dataset's colour
    px = dec.array[y0:y1, x0:x1].reshape(-1, 3).astype(np.uint64)
    r, g, b = (int(v) for v in px.sum(axis=0))
    r2, g2, b2 = (int(v) for v in (px * px).sum(axis=0))
    return _Measured(item.ref, (r, g, b), (r2, g2, b2), int(px.shape[0]), dec.original_size, dec.source_mode,
                     dec.source_format, dec.n_frames, len(dec.notes))


def _ranked(counts: Counter[str]) -> list[tuple[str, int]]:
    """Most common first, ties by name: the same order whatever order the workers finished in."""
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def _size_bucket(w: int, h: int) -> str:
    side = max(w, h)
    for limit, label in ((256, "<256"), (512, "256-511"), (1024, "512-1023"), (2048, "1024-2047"),
                         (4096, "2048-4095")):
        if side < limit:
            return label
    return ">=4096"


@dataclass
class ImageStats:
    """Dataset statistics, JSON-ready through :meth:`to_dict` (usable as ``--stats-file``).

    ``mean``/``std`` are per channel (R, G, B) over every pixel of every decoded image after the resize, with
    pixels scaled to [0, 1]; with a fixed output size every image weighs the same. In ``letterbox`` mode only
    the content box counts (the padding is not the dataset's colour, so ``--fill`` does not change the result);
    ``pixels`` is the number of pixels counted.
    """

    source: str
    kind: str
    config: dict[str, Any]
    images: int = 0
    decoded: int = 0
    pixels: int = 0
    mean: list[float] = field(default_factory=lambda: [math.nan] * 3)
    std: list[float] = field(default_factory=lambda: [math.nan] * 3)
    sizes: Counter[str] = field(default_factory=Counter)
    size_buckets: Counter[str] = field(default_factory=Counter)
    modes: Counter[str] = field(default_factory=Counter)
    formats: Counter[str] = field(default_factory=Counter)
    multi_frame: int = 0
    with_warnings: int = 0
    unreadable: list[ImageReject] = field(default_factory=list)
    manifest_rejects: int = 0
    elapsed_s: float = 0.0

    @property
    def reasons(self) -> dict[str, int]:
        return dict(_ranked(Counter(u.reason for u in self.unreadable)))

    def distances(self) -> dict[str, dict[str, float]]:
        """How far the dataset's mean/std are from each preset: max absolute and L2 differences."""
        out: dict[str, dict[str, float]] = {}
        if self.decoded == 0:
            return out
        for name, (pm, ps) in NORM_PRESETS.items():
            dm = [a - b for a, b in zip(self.mean, pm, strict=True)]
            ds = [a - b for a, b in zip(self.std, ps, strict=True)]
            out[name] = {
                "mean_max_abs": max(abs(v) for v in dm),
                "std_max_abs": max(abs(v) for v in ds),
                "mean_l2": math.sqrt(sum(v * v for v in dm)),
                "std_l2": math.sqrt(sum(v * v for v in ds)),
            }
        return out

    def closest_preset(self) -> str | None:
        d = self.distances()
        if not d:
            return None
        return min(d, key=lambda k: d[k]["mean_l2"] + d[k]["std_l2"])

    def to_dict(self, top_sizes: int = 20) -> dict[str, Any]:
        return {
            "mean": self.mean,
            "std": self.std,
            "source": self.source,
            "kind": self.kind,
            "images": self.images,
            "decoded": self.decoded,
            "unreadable_count": len(self.unreadable),
            "pixels": self.pixels,
            "config": self.config,
            "distance": self.distances(),
            "closest_preset": self.closest_preset(),
            "sizes": dict(_ranked(self.sizes)[:top_sizes]),
            "distinct_sizes": len(self.sizes),
            "size_buckets": dict(_ranked(self.size_buckets)),
            "modes": dict(_ranked(self.modes)),
            "formats": dict(_ranked(self.formats)),
            "multi_frame": self.multi_frame,
            "with_decoder_warnings": self.with_warnings,
            "reasons": self.reasons,
            "unreadable": [u.to_dict() for u in self.unreadable],
            "manifest_rejects": self.manifest_rejects,
            "elapsed_s": round(self.elapsed_s, 3),
        }


def _add(stats: ImageStats, res: _Measured, sums: list[int], squares: list[int]) -> None:
    w, h = res.original_size
    stats.decoded += 1
    stats.pixels += res.pixels
    for c in range(3):
        sums[c] += res.sums[c]
        squares[c] += res.squares[c]
    stats.sizes[f"{w}x{h}"] += 1
    stats.size_buckets[_size_bucket(w, h)] += 1
    stats.modes[res.mode] += 1
    stats.formats[res.format] += 1
    stats.multi_frame += res.frames != 1  # None: animated, frames not counted
    stats.with_warnings += res.notes > 0


def compute_image_stats(
    images: ImageSet,
    cfg: ImageConfig,
    *,
    workers: int = 1,
    on_progress: Callable[[int], None] | None = None,
) -> ImageStats:
    """Decode every image (after ``cfg``'s resize) and accumulate per-channel mean/std, sizes and modes.

    Sums are exact integers, so the result does not depend on the worker count or the order.
    """
    cfg.validate()
    start = time.perf_counter()
    stats = ImageStats(source=images.source, kind=images.kind, config=cfg.to_dict(), images=len(images.items),
                       manifest_rejects=len(images.manifest_rejects))
    sums = [0, 0, 0]
    squares = [0, 0, 0]
    useful = 1 if len(images.items) <= 2 else len(images.items)
    with make_engine("local", workers, preload=("mmprep.images.stats",), max_useful=useful) as engine:
        for res in map_items(engine, _stats_one, images.items, cfg):
            if isinstance(res, ImageReject):
                stats.unreadable.append(res)
            else:
                _add(stats, res, sums, squares)
            if on_progress is not None:
                on_progress(1)
    if stats.pixels:
        n = stats.pixels
        stats.mean = [s / n / 255.0 for s in sums]
        # exact integer variance: (n * sum(x^2) - sum(x)^2) / n^2
        stats.std = [math.sqrt(max(0, n * sq - s * s)) / n / 255.0 for s, sq in zip(sums, squares, strict=True)]
    stats.unreadable.sort(key=lambda u: u.path)
    stats.elapsed_s = time.perf_counter() - start
    return stats
