"""Whole-dataset image jobs: collect the images of a folder or manifest, compute statistics, write normalised copies.

Both jobs fan the files out over a process pool (each worker decodes and handles its own files; only small
results travel back to the parent) and turn every bad file into a reject with a reason, never an exception.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import multiprocessing as mp
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmprep.errors import InputError, RunFailed, UsageError
from mmprep.images.decode import (
    NORM_PRESETS,
    OUTPUT_FORMATS,
    ImageConfig,
    ImageError,
    Normalization,
    encode_image,
    load_image,
    resolve_image_path,
    to_output,
)
from mmprep.inputs.manifest import ColumnMap, iter_samples
from mmprep.records import Rejected

__all__ = [
    "IMAGE_EXTENSIONS",
    "RECORD_NAME",
    "ImageItem",
    "ImageSet",
    "ImageStats",
    "NormalizeReport",
    "collect_images",
    "compute_image_stats",
    "default_workers",
    "normalize_images",
    "output_relpath",
    "parallel_map",
]

#: Files a folder scan picks up (case-insensitive). Decoding itself looks at the content, not the name.
IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".gif", ".webp", ".bmp", ".dib", ".tif", ".tiff", ".mpo",
    ".avif", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".jp2", ".j2k", ".qoi", ".ico", ".pcx", ".sgi",
})

_EXT = {"png": ".png", "jpeg": ".jpg", "jpg": ".jpg", "webp": ".webp", "npy": ".npy"}


def default_workers() -> int:
    """All cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# -- collecting the images ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageItem:
    """One image to process.

    Attributes:
        ref: the reference as written (the manifest path, or the path relative to the source folder).
        path: the file to open, or None when the reference itself was refused (see ``error``).
        relpath: where its output goes, relative to the output folder (POSIX, original extension).
        error: why the reference was refused (``path_outside_root``, ``path_invalid``).
    """

    ref: str
    path: str | None
    relpath: str
    error: tuple[str, str] | None = None


@dataclass
class ImageSet:
    """The distinct images of a source, in first-seen order.

    Attributes:
        source: the folder or manifest given.
        kind: ``folder`` or ``manifest``.
        root: the image root references are resolved against.
        items: one per distinct reference.
        references: image references seen (manifests can name a file several times).
        samples: manifest rows read (0 for a folder).
        manifest_rejects: manifest rows that could not be read.
    """

    source: str
    kind: str
    root: Path
    items: list[ImageItem] = field(default_factory=list)
    references: int = 0
    samples: int = 0
    manifest_rejects: list[Rejected] = field(default_factory=list)


def output_relpath(ref: str, root: str | os.PathLike[str]) -> str:
    """A safe relative output path for a reference: the normalised path when it lies under the root, else
    ``_outside/<absolute path>`` so nothing is ever written outside the output folder."""
    joined = ref if os.path.isabs(ref) else os.path.join(os.fspath(root), ref)
    norm = os.path.normpath(os.path.abspath(joined))
    root_abs = os.path.normpath(os.path.abspath(root))
    rel = os.path.relpath(norm, root_abs)
    if rel == os.curdir or rel.startswith(os.pardir + os.sep) or rel == os.pardir or os.path.isabs(rel):
        rel = os.path.join("_outside", norm.lstrip(os.sep))
    return Path(rel).as_posix()


def collect_images(
    src: str | os.PathLike[str],
    *,
    image_root: str | os.PathLike[str] | None = None,
    allow_outside_root: bool = False,
    input_format: str | None = None,
    column_map: ColumnMap | None = None,
    exclude: Sequence[str | os.PathLike[str]] = (),
    limit: int | None = None,
) -> ImageSet:
    """List the images of a folder (recursively, by extension) or of a manifest (the image column).

    Args:
        src: a folder, a manifest file (JSONL, JSON, CSV, Parquet) or ``-`` for a manifest on stdin.
        image_root: what manifest paths are relative to (default: the manifest's folder; the current
            folder for stdin). Ignored for folders (the folder is the root).
        allow_outside_root: accept paths (and, in a folder, symbolic links) that resolve outside the root.
        input_format: the manifest format when the name does not tell.
        column_map: which manifest column holds the images (default: found by the usual names).
        exclude: folders not to scan (e.g. the output folder inside the source folder).
        limit: stop after this many distinct images.

    Raises:
        InputError: the source does not exist or is not a readable manifest.
    """
    name = str(src)
    if name != "-" and Path(name).is_dir():
        if image_root is not None:
            raise UsageError("--image-root only applies to a manifest; a folder is its own root")
        return _collect_folder(Path(name), exclude, limit, allow_outside_root)
    if name != "-" and not Path(name).exists():
        raise InputError(f"{name}: no such file or folder", hint="give an image folder or a manifest file")
    root = Path(image_root) if image_root is not None else (Path.cwd() if name == "-" else Path(name).parent)
    if not root.is_dir():
        raise InputError(f"{root}: image root is not a folder", hint="pass --image-root DIR")
    out = ImageSet(source=name, kind="manifest", root=root)
    seen: set[str] = set()
    seen_files: set[str] = set()
    for rec in iter_samples(src, column_map, fmt=input_format):
        if isinstance(rec, Rejected):
            out.manifest_rejects.append(rec)
            continue
        out.samples += 1
        for ref in rec.images:
            out.references += 1
            if ref in seen:
                continue
            seen.add(ref)
            item = _item(ref, root, allow_outside_root)
            if item.path is not None:  # images/a.jpg and ./images/a.jpg are one file
                key = os.path.realpath(item.path)
                if key in seen_files:
                    continue
                seen_files.add(key)
            out.items.append(item)
            if limit is not None and len(out.items) >= limit:
                return out
    return out


def _item(ref: str, root: Path, allow_outside: bool) -> ImageItem:
    try:
        path = resolve_image_path(ref, root, allow_outside)
    except ImageError as exc:
        rel = output_relpath(ref, root) if exc.reason == "path_outside_root" else ""
        return ImageItem(ref, None, rel, (exc.reason, exc.detail))
    return ImageItem(ref, os.fspath(path), output_relpath(ref, root))


def _collect_folder(
    folder: Path, exclude: Sequence[str | os.PathLike[str]], limit: int | None, allow_outside: bool
) -> ImageSet:
    out = ImageSet(source=str(folder), kind="folder", root=folder)
    skip = {os.path.realpath(e) for e in exclude}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and os.path.realpath(os.path.join(dirpath, d)) not in skip
        )
        for fname in sorted(filenames):
            if fname.startswith(".") or os.path.splitext(fname)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            rel = Path(os.path.relpath(os.path.join(dirpath, fname), folder)).as_posix()
            out.references += 1
            # the same root check as for manifests: a symbolic link pointing out of the folder is refused
            out.items.append(_item(rel, folder, allow_outside))
            if limit is not None and len(out.items) >= limit:
                return out
    return out


# -- the process pool ---------------------------------------------------------------------------------------------


def _worker_init() -> None:
    # Ctrl-C goes to the whole process group: let the parent alone decide how to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_chunk(fn: Callable[[Any, Any], Any], ctx: Any, chunk: list[Any]) -> list[Any]:
    return [fn(item, ctx) for item in chunk]


def _mp_context() -> Any:
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(["mmprep.images.decode", "mmprep.images.jobs"])
    return ctx


def parallel_map(
    fn: Callable[[Any, Any], Any],
    items: Sequence[Any],
    ctx: Any,
    *,
    workers: int,
    chunksize: int = 16,
) -> Iterator[Any]:
    """Apply ``fn(item, ctx)`` to every item, yielding results as they finish (not in order).

    ``fn`` must be a module-level function and ``ctx`` picklable. With ``workers <= 1`` (or one or two items)
    everything runs in this process. A worker that dies (e.g. a decoder crash) raises RunFailed.
    """
    if workers <= 1 or len(items) <= 2:
        for item in items:
            yield fn(item, ctx)
        return
    # small sets still spread over every worker; large ones go in chunks of `chunksize`
    chunksize = max(1, min(chunksize, math.ceil(len(items) / (workers * 4))))
    chunks = [list(items[i:i + chunksize]) for i in range(0, len(items), chunksize)]
    executor = ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=_mp_context(),
                                   initializer=_worker_init)
    pending: set[Future[list[Any]]] = set()
    next_chunk = 0
    try:
        while next_chunk < len(chunks) or pending:
            while next_chunk < len(chunks) and len(pending) < workers * 4:
                pending.add(executor.submit(_run_chunk, fn, ctx, chunks[next_chunk]))
                next_chunk += 1
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                yield from fut.result()
    except BrokenProcessPool:
        raise RunFailed("an image worker process died (killed, out of memory or a decoder crash)",
                        hint="rerun with --workers 1 to find the file; finished outputs are kept") from None
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


# -- statistics ------------------------------------------------------------------------------------------------------


def _stats_one(item: ImageItem, cfg: ImageConfig) -> tuple[Any, ...]:
    if item.error is not None:
        return ("err", item.ref, item.error[0], item.error[1])
    import numpy as np

    try:
        dec = load_image(item.path or item.ref, cfg)
    except ImageError as exc:
        return ("err", item.ref, exc.reason, exc.detail)
    x0, y0, x1, y1 = dec.content_box  # letterbox padding is not the dataset's colour
    px = dec.array[y0:y1, x0:x1].reshape(-1, 3).astype(np.uint64)
    sums = px.sum(axis=0)
    sq = (px * px).sum(axis=0)
    return ("ok", item.ref, [int(v) for v in sums], [int(v) for v in sq], int(px.shape[0]),
            dec.original_size, dec.source_mode, dec.source_format, dec.n_frames, len(dec.notes))


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
    unreadable: list[dict[str, str]] = field(default_factory=list)
    manifest_rejects: int = 0
    elapsed_s: float = 0.0

    @property
    def reasons(self) -> dict[str, int]:
        return dict(Counter(u["reason"] for u in self.unreadable).most_common())

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
            "sizes": dict(self.sizes.most_common(top_sizes)),
            "distinct_sizes": len(self.sizes),
            "size_buckets": dict(self.size_buckets.most_common()),
            "modes": dict(self.modes.most_common()),
            "formats": dict(self.formats.most_common()),
            "multi_frame": self.multi_frame,
            "with_decoder_warnings": self.with_warnings,
            "reasons": self.reasons,
            "unreadable": self.unreadable,
            "manifest_rejects": self.manifest_rejects,
            "elapsed_s": round(self.elapsed_s, 3),
        }


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
    for res in parallel_map(_stats_one, images.items, cfg, workers=workers):
        if res[0] == "err":
            stats.unreadable.append({"path": res[1], "reason": res[2], "detail": res[3]})
        else:
            _, _ref, s, sq, n, (w, h), mode, fmt, frames, n_notes = res
            stats.decoded += 1
            stats.pixels += n
            for c in range(3):
                sums[c] += s[c]
                squares[c] += sq[c]
            stats.sizes[f"{w}x{h}"] += 1
            stats.size_buckets[_size_bucket(w, h)] += 1
            stats.modes[mode] += 1
            stats.formats[fmt] += 1
            stats.multi_frame += frames > 1
            stats.with_warnings += n_notes > 0
        if on_progress is not None:
            on_progress(1)
    if stats.pixels:
        n = stats.pixels
        stats.mean = [s / n / 255.0 for s in sums]
        # exact integer variance: (n * sum(x^2) - sum(x)^2) / n^2
        stats.std = [math.sqrt(max(0, n * sq - s * s)) / n / 255.0 for s, sq in zip(sums, squares, strict=True)]
    stats.unreadable.sort(key=lambda u: u["path"])
    stats.elapsed_s = time.perf_counter() - start
    return stats


# -- normalised copies -------------------------------------------------------------------------------------------------

#: The per-output record ``normalize_images`` keeps in the output folder (see :func:`normalize_images`).
RECORD_NAME = "normalize-images.outputs.jsonl"


@dataclass(frozen=True)
class _NormalizeJob:
    out_dir: str
    cfg: ImageConfig
    fmt: str
    quality: int
    norm: Normalization
    overwrite: bool
    settings_id: str


@dataclass(frozen=True)
class _Task:
    item: ImageItem
    output: str
    previous: dict[str, Any] | None  # the record's entry for this output, if any


@dataclass(frozen=True)
class _Outcome:
    status: str  # written | skipped | rejected
    ref: str
    output: str
    reason: str = ""
    detail: str = ""
    entry: dict[str, Any] | None = None  # the record entry of a written or skipped output


def _target(relpath: str, fmt: str) -> str:
    stem, _ext = os.path.splitext(relpath)
    return stem + _EXT[fmt]


def _write_atomic(path: str, data: bytes) -> None:
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _settings(cfg: ImageConfig, fmt: str, quality: int, norm: Normalization) -> dict[str, Any]:
    """Everything that decides the bytes of an output (the pixel limit only decides which images are refused)."""
    config = {k: v for k, v in cfg.to_dict().items() if k != "pixel_limit"}
    return {"config": config, "format": fmt, "quality": quality if fmt in ("jpeg", "webp") else None,
            "normalization": norm.to_dict() if fmt == "npy" else None}


def _settings_id(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _settings_diff(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """A few words on what changed: ``config.size [224, 224] -> [64, 64]``."""
    if not old:
        return "settings not recorded"
    diffs = []
    for key in new:
        a, b = old.get(key), new[key]
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{key}.{k} {a.get(k)!r} -> {b.get(k)!r}" for k in b if a.get(k) != b.get(k)]
        elif a != b:
            diffs.append(f"{key} {a!r} -> {b!r}")
    return ", ".join(diffs[:3]) + (", ..." if len(diffs) > 3 else "") if diffs else "settings not recorded"


def _read_record(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """-> (settings by id, entry by output). Unparseable lines (a torn last line of a killed run) are ignored:
    the outputs they described are then redone."""
    settings: dict[str, dict[str, Any]] = {}
    entries: dict[str, dict[str, Any]] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return settings, entries
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the output record: {exc}",
                         hint="delete it to redo every output") from None
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("settings"), str):
            continue
        if isinstance(rec.get("output"), str):
            entries[rec["output"]] = rec
        elif isinstance(rec.get("values"), dict):
            settings[rec["settings"]] = rec["values"]
    return settings, entries


def _source_signature(path: str | None) -> tuple[int, int] | None:
    try:
        st = os.stat(path) if path else None
    except (OSError, ValueError):
        return None
    return (st.st_size, st.st_mtime_ns) if st is not None else None


def _normalize_one(task: _Task, job: _NormalizeJob) -> _Outcome:
    item, out_rel = task.item, task.output
    if item.error is not None:
        return _Outcome("rejected", item.ref, out_rel, item.error[0], item.error[1])
    dest = os.path.join(job.out_dir, out_rel)
    sig = _source_signature(item.path)  # before decoding: a source changed meanwhile is redone next time
    prev = task.previous
    if (
        not job.overwrite and prev is not None and sig is not None and prev.get("path") == item.ref
        and prev.get("settings") == job.settings_id and prev.get("source_bytes") == sig[0]
        and prev.get("source_mtime_ns") == sig[1] and os.path.exists(dest)
    ):
        return _Outcome("skipped", item.ref, out_rel, entry=prev)
    try:
        dec = load_image(item.path or item.ref, job.cfg)
    except ImageError as exc:
        return _Outcome("rejected", item.ref, out_rel, exc.reason, exc.detail)
    arr = to_output(dec.array, job.norm) if job.fmt == "npy" else dec.array
    data = encode_image(arr, job.fmt, job.quality)
    try:
        _write_atomic(dest, data)
    except OSError as exc:
        return _Outcome("rejected", item.ref, out_rel, "write_failed", f"{dest}: {exc.strerror or exc}")
    h, w = dec.array.shape[:2]
    entry = {"output": out_rel, "path": item.ref, "settings": job.settings_id,
             "source_bytes": sig[0] if sig else None, "source_mtime_ns": sig[1] if sig else None,
             "original_size": list(dec.original_size), "size": [w, h], "content_box": list(dec.content_box)}
    return _Outcome("written", item.ref, out_rel, entry=entry)


@dataclass
class NormalizeReport:
    """What ``normalize_images`` did."""

    source: str
    out_dir: str
    format: str
    config: dict[str, Any]
    normalization: dict[str, Any] | None
    images: int = 0
    written: int = 0
    skipped: int = 0
    rejected: int = 0
    removed: int = 0
    stale: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    renamed: dict[str, str] = field(default_factory=dict)
    rejects_file: str = ""
    record_file: str = ""
    settings_id: str = ""
    manifest_rejects: int = 0
    workers: int = 1
    elapsed_s: float = 0.0

    @property
    def images_per_s(self) -> float:
        done = self.written + self.rejected
        return done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "out": self.out_dir,
            "format": self.format,
            "images": self.images,
            "written": self.written,
            "skipped": self.skipped,
            "rejected": self.rejected,
            "removed": self.removed,
            "stale": self.stale,
            "reasons": dict(self.reasons.most_common()),
            "rejects_file": self.rejects_file,
            "record_file": self.record_file,
            "settings_id": self.settings_id,
            "renamed": self.renamed,
            "manifest_rejects": self.manifest_rejects,
            "workers": self.workers,
            "elapsed_s": round(self.elapsed_s, 3),
            "images_per_s": round(self.images_per_s, 1),
            "config": self.config,
            "normalization": self.normalization,
        }


def _plan_outputs(images: ImageSet, fmt: str, report: NormalizeReport,
                  rejects: list[dict[str, Any]]) -> list[tuple[ImageItem, str]]:
    """Decide every output name from the input list alone (never from what the output folder holds)."""
    planned: list[tuple[ImageItem, str]] = []
    # a file whose name already fits the format keeps it (photo.png stays photo.png even after photo.gif)
    claimed: dict[str, str] = {
        it.relpath: it.ref for it in reversed(images.items) if it.relpath and _target(it.relpath, fmt) == it.relpath
    }
    for item in images.items:
        target = _target(item.relpath, fmt) if item.relpath else ""
        if target and target == item.relpath and claimed.get(target) == item.ref:
            planned.append((item, target))
            continue
        if target and target in claimed:
            # photo.jpg and photo.png both want photo.png: the later one keeps its extension (photo.jpg.png)
            alt = item.relpath + _EXT[fmt]
            if alt in claimed:
                report.rejected += 1
                report.reasons["output_collision"] += 1
                rejects.append({"path": item.ref, "reason": "output_collision",
                                "detail": f"{item.ref}: output {target} is already produced from {claimed[target]}"})
                continue
            report.renamed[item.ref] = alt
            target = alt
        if target:
            claimed[target] = item.ref
        planned.append((item, target))
    return planned


def normalize_images(
    images: ImageSet,
    out_dir: str | os.PathLike[str],
    cfg: ImageConfig,
    *,
    fmt: str = "png",
    quality: int = 90,
    norm: Normalization | None = None,
    workers: int = 1,
    rejects_path: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    on_progress: Callable[[int], None] | None = None,
    engine: str = "local",
    ray_address: str | None = None,
) -> NormalizeReport:
    """Write a decoded, resized copy of every image under ``out_dir`` at the same relative path.

    The extension becomes the output format's (``a/b.jpeg`` -> ``a/b.png``). Output names are decided from the
    input list alone: a file whose name already fits the format keeps it, and when two inputs would land on the
    same output (``a/b.jpg`` and ``a/b.png``), the other keeps its own extension too (``a/b.jpg.png``) and is
    listed in :attr:`NormalizeReport.renamed`. Each output is written to a temporary name and renamed, so a killed
    run never leaves a half-written file under the final name.

    Resuming: ``out_dir/normalize-images.outputs.jsonl`` (:data:`RECORD_NAME`) records every output: JSON lines
    ``{"output", "path" (the source reference), "settings" (an id of the settings), "source_bytes",
    "source_mtime_ns", "original_size" [w, h], "size" [w, h], "content_box" [x0, y0, x1, y1]}`` (the content box
    is where the picture lies in the output: the letterbox padding is outside it), plus one
    ``{"settings", "values"}`` line per settings id. Lines are appended as outputs are written (a killed run
    loses at most its last line) and the file is rewritten sorted at the end. A rerun skips an output only
    when the record says it was made from the same source reference, unchanged (size and mtime), with the same
    settings; an output whose source changed, or that the record does not know (a file left by a killed run or
    not made by mmprep), is redone. When outputs of this run already exist from *other* settings, the run is
    refused (UsageError) unless ``overwrite``, which redoes every output. A recorded output whose source is now
    rejected is removed, so no output outlives its source; recorded outputs that this run does not produce
    (their source is gone, or beyond ``--limit``) are kept and counted as :attr:`NormalizeReport.stale`.

    Rejects go to ``rejects_path`` (default ``out_dir/rejects.jsonl``) as JSON lines: first the manifest rows
    that could not be read, ``{"path" (the manifest), "line", "reason", "detail"}`` in line order, then the
    images, ``{"path", "reason", "detail"}`` sorted by path. The file is rewritten on every run, so it lists
    exactly what the latest run could not produce.

    Args:
        images: from :func:`collect_images`.
        out_dir: the output folder (created).
        cfg: decoding/resizing settings.
        fmt: ``png``, ``jpeg``, ``webp`` or ``npy``.
        quality: JPEG/WebP quality.
        norm: dtype/layout/normalisation for ``npy`` output (image formats store uint8 HWC pixels).
        workers: processes (1 = in this process).
        rejects_path: where the rejects go.
        overwrite: redo every output, whatever the record says.
        on_progress: called with the number of images finished.
        engine: ``local`` (process pool) or ``ray`` (the same per-file work as Ray Data tasks; workers on other
            nodes write under ``out_dir`` on their own machine, so on a cluster it must be a shared folder).
        ray_address: the Ray cluster for ``engine="ray"`` (default: ``$RAY_ADDRESS``, else a local Ray).

    Raises:
        UsageError: bad settings, or existing outputs made with other settings (without ``overwrite``).
    """
    cfg.validate()
    if engine not in ("local", "ray"):
        raise UsageError(f"--engine must be local or ray, got '{engine}'")
    if engine == "ray":
        from mmprep.runtime.engines.ray import require_ray

        require_ray()
    fmt = fmt.lower()
    fmt = "jpeg" if fmt == "jpg" else fmt
    if fmt not in OUTPUT_FORMATS:
        raise UsageError(f"unknown output format '{fmt}'", hint="choose one of " + ", ".join(OUTPUT_FORMATS))
    norm = norm or Normalization(layout="HWC")
    if fmt != "npy" and (norm.dtype != "uint8" or norm.layout != "HWC"):
        raise UsageError(f"--format {fmt} stores 8-bit pixels; float dtypes and CHW layout need --format npy")
    start = time.perf_counter()
    out = Path(out_dir)
    record_file = out / RECORD_NAME
    settings = _settings(cfg, fmt, quality, norm)
    sid = _settings_id(settings)
    old_settings, entries = _read_record(record_file)
    rejects_file = Path(rejects_path) if rejects_path is not None else out / "rejects.jsonl"
    report = NormalizeReport(
        source=images.source, out_dir=str(out), format=fmt, config=cfg.to_dict(),
        normalization=norm.to_dict() if fmt == "npy" else None, images=len(images.items),
        rejects_file=str(rejects_file), record_file=str(record_file), settings_id=sid,
        manifest_rejects=len(images.manifest_rejects), workers=workers,
    )
    rejects: list[dict[str, Any]] = []
    planned = _plan_outputs(images, fmt, report, rejects)
    if not overwrite:
        clash = [t for _, t in planned if t in entries and entries[t]["settings"] != sid and (out / t).exists()]
        if clash:
            raise UsageError(
                f"{out}: {len(clash)} existing output(s) were made with other settings "
                f"({_settings_diff(old_settings.get(entries[clash[0]]['settings']), settings)}), e.g. {clash[0]}",
                hint="pass --overwrite to redo them with these settings, or write to another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunFailed(f"{out}: cannot create the output folder: {exc.strerror or exc}") from None
    for _ in range(report.rejected):  # output collisions, already decided
        if on_progress is not None:
            on_progress(1)
    tasks = [_Task(item, target, entries.get(target)) for item, target in planned]
    job = _NormalizeJob(str(out.resolve()) if engine == "ray" else str(out), cfg, fmt, quality, norm, overwrite,
                        sid)
    produced = {t for _, t in planned if t}
    confirmed: set[str] = set()  # outputs written or verified by this run
    if engine == "ray":
        from mmprep.runtime.engines.base import map_items
        from mmprep.runtime.engines.ray import RayEngine

        results = map_items(RayEngine(workers or None, ray_address), _normalize_one, tasks, job)
    else:
        results = parallel_map(_normalize_one, tasks, job, workers=workers)
    try:
        journal = open(record_file, "a", encoding="utf-8")  # noqa: SIM115 - closed in the finally below
    except OSError as exc:
        raise RunFailed(f"{record_file}: cannot write the output record: {exc.strerror or exc}") from None
    try:
        if sid not in old_settings:
            journal.write(json.dumps({"settings": sid, "values": settings}, sort_keys=True) + "\n")
        for res in results:
            if res.status == "written":
                report.written += 1
                assert res.entry is not None
                entries[res.output] = res.entry
                confirmed.add(res.output)
                journal.write(json.dumps(res.entry, ensure_ascii=False) + "\n")
                journal.flush()
            elif res.status == "skipped":
                report.skipped += 1
                confirmed.add(res.output)
            else:
                report.rejected += 1
                report.reasons[res.reason] += 1
                rejects.append({"path": res.ref, "reason": res.reason, "detail": res.detail})
                if res.output and entries.pop(res.output, None) is not None:
                    # the recorded output no longer matches its source (or its name now belongs to this one)
                    with contextlib.suppress(OSError):
                        os.unlink(out / res.output)
                        report.removed += 1
            if on_progress is not None:
                on_progress(1)
    finally:
        journal.close()
        old_settings[sid] = settings
        kept = {o: e for o, e in entries.items() if o in confirmed or (out / o).exists()}
        report.stale = sum(o not in produced for o in kept)
        lines = [json.dumps({"settings": s, "values": old_settings[s]}, sort_keys=True)
                 for s in sorted({e["settings"] for e in kept.values()} | {sid}) if s in old_settings]
        lines += [json.dumps(kept[o], ensure_ascii=False) for o in sorted(kept)]
        rejects.sort(key=lambda r: r["path"])
        rows = [{"path": images.source, "line": r.line, "reason": r.reason, "detail": r.detail}
                for r in sorted(images.manifest_rejects, key=lambda r: r.line)]
        payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows + rejects).encode("utf-8")
        for path, data in ((record_file, "".join(x + "\n" for x in lines).encode("utf-8")), (rejects_file, payload)):
            try:
                _write_atomic(str(path), data)
            except OSError as exc:
                raise RunFailed(f"{path}: cannot write: {exc.strerror or exc}") from None
    report.elapsed_s = time.perf_counter() - start
    return report
