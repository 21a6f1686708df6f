"""``normalize-images``: write a decoded, resized copy of every image of a source under an output folder, with
a record of every output so a rerun redoes only what changed (see :func:`normalize_images`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from mmprep.errors import InputError, RunFailed, UsageError
from mmprep.images.collect import ImageItem, ImageSet
from mmprep.images.decode import (
    OUTPUT_FORMATS,
    ImageConfig,
    ImageError,
    Normalization,
    encode_image,
    load_image,
    to_output,
)
from mmprep.runtime.engines import make_engine
from mmprep.runtime.engines.base import ProgressFn
from mmprep.runtime.files import atomic_write, ensure_dir, open_append
from mmprep.runtime.job import Chunk, Policy, StreamedRecord, StreamingJob, run_job

__all__ = ["RECORD_NAME", "NormalizeReport", "normalize_images"]

_EXT = {"png": ".png", "jpeg": ".jpg", "jpg": ".jpg", "webp": ".webp", "npy": ".npy"}

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


def _write_file(path: str, data: bytes, *, root: str | None = None, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` under a temporary name and rename it (:func:`~mmprep.runtime.files.atomic_write`),
    creating its folder first; with ``root``, no folder between ``root`` and the file may be a symbolic link (an
    output for ``sub/x.jpg`` never lands outside the output folder through a linked ``sub``).

    Raises:
        OSError: the folder cannot be created.
        RunFailed: the file cannot be written.
        UsageError: ``path`` or a folder on the way is a symbolic link.
    """
    ensure_dir(os.path.dirname(path) or os.curdir, root=root)  # a bare name lies in the current folder
    atomic_write(path, data, fsync=fsync)


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
        return _Outcome("rejected", item.ref, out_rel, item.error.reason, item.error.detail)
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
        _write_file(dest, data, root=job.out_dir, fsync=False)  # an fsync per image would cost more than the decode
    except OSError as exc:
        return _Outcome("rejected", item.ref, out_rel, "write_failed", f"{dest}: {exc.strerror or exc}")
    except (RunFailed, UsageError) as exc:  # the write itself failed, or a symbolic link is where the output goes
        return _Outcome("rejected", item.ref, out_rel, "write_failed", exc.message)
    h, w = dec.array.shape[:2]
    entry = {"output": out_rel, "path": item.ref, "settings": job.settings_id,
             "source_bytes": sig[0] if sig else None, "source_mtime_ns": sig[1] if sig else None,
             "original_size": list(dec.original_size), "size": [w, h], "content_box": list(dec.content_box)}
    return _Outcome("written", item.ref, out_rel, entry=entry)


@dataclass
class NormalizeChunk(StreamedRecord):
    """What one chunk of images produced (a runtime record)."""

    index: int
    items: int
    outcomes: list[_Outcome]  # once taken by the parent: only the rejected ones

    @property
    def rows(self) -> int:
        return self.items - len(self.rejected)

    @property
    def images(self) -> int:
        return sum(o.status == "written" for o in self.outcomes)

    @property
    def rejected(self) -> list[_Outcome]:
        return [o for o in self.outcomes if o.status == "rejected"]


@dataclass(frozen=True)
class _NormalizeTask:
    job: _NormalizeJob

    def __call__(self, chunk: Chunk[list[_Task]], progress: ProgressFn | None) -> NormalizeChunk:
        return NormalizeChunk(chunk.index, chunk.size, [_normalize_one(t, self.job) for t in chunk.items])


class _NormalizeRun(StreamingJob):
    """normalize-images on the job runtime: chunks of images, each written by a worker; the parent keeps the output
    record (appended as outputs arrive) and the counts."""

    ordered = False

    def __init__(self, tasks: list[_Task], size: int, job: _NormalizeJob, journal: BinaryIO,
                 report: NormalizeReport, entries: dict[str, dict[str, Any]], confirmed: set[str],
                 rejects: list[dict[str, Any]], out: Path, on_progress: Callable[[int], None] | None) -> None:
        self.tasks, self.size, self.job, self.journal = tasks, size, job, journal
        self.report, self.entries, self.confirmed, self.rejects = report, entries, confirmed, rejects
        self.out, self.on_progress = out, on_progress

    def chunks(self) -> Iterator[Chunk[list[_Task]]]:
        for k, i in enumerate(range(0, len(self.tasks), self.size)):
            part = self.tasks[i:i + self.size]
            yield Chunk(k, part, len(part))

    def task(self) -> _NormalizeTask:
        return _NormalizeTask(self.job)

    def accept(self, record: NormalizeChunk, out: Any) -> NormalizeChunk:
        report, entries = self.report, self.entries
        for res in record.outcomes:
            if res.status == "written":
                report.written += 1
                assert res.entry is not None
                entries[res.output] = res.entry
                self.confirmed.add(res.output)
                self.journal.write((json.dumps(res.entry, ensure_ascii=False) + "\n").encode("utf-8"))
                self.journal.flush()
            elif res.status == "skipped":
                report.skipped += 1
                self.confirmed.add(res.output)
            else:
                report.rejected += 1
                report.reasons[res.reason] += 1
                self.rejects.append({"path": res.ref, "reason": res.reason, "detail": res.detail})
                if res.output and entries.pop(res.output, None) is not None:
                    # the recorded output no longer matches its source (or its name now belongs to this one)
                    with contextlib.suppress(OSError):
                        os.unlink(self.out / res.output)
                        report.removed += 1
            if self.on_progress is not None:
                self.on_progress(1)
        return NormalizeChunk(record.index, record.items, record.rejected)


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

        require_ray()  # before any work
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
        ensure_dir(out)
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
    useful = 1 if len(tasks) <= 2 else len(tasks)
    journal_ctx = open_append(record_file)
    try:
        journal = journal_ctx.__enter__()
    except RunFailed as exc:
        raise RunFailed(f"{record_file}: cannot write the output record: {exc.message}") from None
    try:
        if sid not in old_settings:
            journal.write((json.dumps({"settings": sid, "values": settings}, sort_keys=True) + "\n").encode())
        with make_engine(engine, workers, ray_address=ray_address, preload=("mmprep.images.normalize",),
                         max_useful=useful) as eng:
            size = max(1, min(16, -(-len(tasks) // (max(1, eng.workers) * 4))))
            nj = _NormalizeRun(tasks, size, job, journal, report, entries, confirmed, rejects, out, on_progress)
            run_job(nj, eng, None, policy=Policy(require_rows=False))
    finally:
        journal_ctx.__exit__(None, None, None)
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
                _write_file(str(path), data, root=str(out) if path == record_file else None)
            except OSError as exc:  # the folder cannot be created (atomic_write raises RunFailed itself)
                raise RunFailed(f"{path}: cannot write: {exc.strerror or exc}") from None
    report.elapsed_s = time.perf_counter() - start
    return report
