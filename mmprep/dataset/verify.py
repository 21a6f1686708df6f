"""``verify``: check a packed directory against its index, shard by shard, and its row accounting.

Every check that fails becomes a :class:`Finding` naming the shard (or the index/rejects file) and what differs;
nothing raises for a damaged dataset except a directory that is not an mmprep pack at all (InputError).

Checks, per shard listed in ``index.json``: the file exists, its size and sha256 match the index, it opens as
Parquet, its row count, schema and ``mmprep`` metadata match the index (and the first shard), its
``mmprep.shard`` record (position, rows, image-count histogram, first/last line) matches the index entry, and its
small columns are consistent: ``image_count`` histogram, ``image_mask`` against ``image_count``, sizes and content
boxes zero exactly for empty slots and inside the image, ``attention_mask``/``truncated`` against ``n_tokens``,
tag ids inside the vocabulary. With ``deep``: padding slots hold all-zero pixel bytes (padded layout) or every
encoded image decodes and the image lists match ``image_count`` (encoded layout).

Dataset-wide (one split: ``split=``, default the only one, else ``train``): no unlisted shard files of the split,
no file in ``data/`` that no split lists (trainers read every file there), unique ids and input lines, no line both
written and rejected, and the totals: ``read == written + rejected``, written equals the shards' rows, the
image-count histogram adds up, the split's rejects file has as many lines as ``rejected`` with the same counts per
reason.

A path in the index that is absolute or leaves the dataset folder is a finding, and the file is not opened.

A dataset on a remote store (``s3://bucket/ds``, ...) gets the same checks: each shard is downloaded whole (the
sha256 needs every byte) into a temporary file under ``$MMPREP_STAGING_DIR`` (default ``$TMPDIR``), one shard at a
time, with the retries of :class:`mmprep.dataset.remote.Store`, and checked there.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmprep.dataset.arrays import PixelSpec
from mmprep.dataset.format import (
    DATA_DIR,
    INDEX_NAME,
    METADATA_KEY,
    REJECTS_NAME,
    SHARD_GLOB,
    SHARD_METADATA_KEY,
    count_field,
    histogram_problem,
    shard_entry_problems,
    shard_path_problem,
)
from mmprep.dataset.index_file import IndexJson, read_index
from mmprep.dataset.remote import RetryPolicy, Store
from mmprep.runtime.files import sha256_file

#: Gives the local file of a listed path (None when there is no such file) for as long as the block runs.
_Fetch = Callable[[str], AbstractContextManager[Path | None]]

__all__ = ["Finding", "VerifyReport", "entry_bytes", "verify"]


@dataclass(frozen=True)
class _ColumnFacts:
    """What the dataset-wide checks need from one shard's small columns."""

    ids: list[str]
    lines: np.ndarray
    images: int


@dataclass(frozen=True)
class _ShardFacts(_ColumnFacts):
    """A readable shard: its columns' facts, its row count and schema (compared with the first shard's)."""

    rows: int
    schema: Any


@dataclass(frozen=True)
class Finding:
    """One mismatch: where (a shard's file name, ``index.json`` or ``rejected.jsonl``), which check, what."""

    where: str
    check: str
    message: str


@dataclass
class VerifyReport:
    """The outcome of :func:`verify` (the ``--json`` report)."""

    path: str
    ok: bool = True
    split: str = "train"
    shards: int = 0
    shards_ok: int = 0
    rows: int = 0
    bytes: int = 0
    deep: bool = False
    findings: list[Finding] = field(default_factory=list)


def verify(
    path: str | os.PathLike[str],
    *,
    split: str | None = None,
    deep: bool = False,
    progress: Callable[[int], None] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    retries: int = 3,
) -> VerifyReport:
    """Verify one split of a packed directory; see the module docstring for the checks.

    Args:
        path: the packed directory (a local path or a URI such as ``s3://bucket/ds``).
        split: the split (default: the only one, else ``train``).
        deep: also check pixel padding bytes (padded) or decode every image (encoded).
        progress: called with the bytes of each shard once checked.
        storage_options: fsspec options for a URI (endpoint, credentials; never shown).
        retries: tries again after a dropped connection or a server error (remote datasets).

    Raises:
        InputError: ``path`` is not an mmprep packed directory (no readable index), or has no such split.
        RunFailed: the store kept failing through every retry.
    """
    policy = RetryPolicy.from_retries(retries)
    raw = read_index(path, storage_options, split=split)
    root = raw.root
    store = None if raw.location.local else Store(raw.location, policy)
    fetch = _local_fetch(Path(root)) if store is None else _remote_fetch(store)
    report = VerifyReport(path=str(root), deep=deep, split=str(raw.data.get("split")))
    found: list[Finding] = report.findings

    def add(where: str, check: str, message: str) -> None:
        found.append(Finding(where, check, message))

    meta = raw.data.get("metadata") or {}
    entries = raw.entries
    report.shards = len(entries)
    listed = {str(e.get("path")) for e in entries if isinstance(e, dict)}
    if raw.data.get("format_version", 0) >= 2:
        _check_data_folder(raw.location.child(DATA_DIR).list_names(), str(raw.data["split"]),
                           raw.data.get("splits_present") or [], listed, add)
    names = ([p.name for p in Path(root).glob(SHARD_GLOB)] if store is None
             else [n for n in store.list_names() if fnmatch.fnmatchcase(n, SHARD_GLOB)])
    for name in sorted(names):
        if name not in listed:
            add(name, "unlisted", f"{name} is in the directory but not in {INDEX_NAME}")
    ids: Counter[str] = Counter()
    lines: list[np.ndarray] = []
    hist_total: Counter[str] = Counter()
    images_total = 0
    ref_schema: Any = None
    for k, entry in enumerate(entries):
        before = len(found)
        facts = _check_shard(fetch, k, entry, meta, deep, add, ref_schema)
        if facts is not None:
            ref_schema = ref_schema if ref_schema is not None else facts.schema
            ids.update(facts.ids)
            lines.append(facts.lines)
            images_total += facts.images
            report.rows += facts.rows
        if isinstance(entry, dict):
            hist = entry.get("image_count_histogram") or {}
            if histogram_problem(hist) is None:
                hist_total.update({str(h): c for h, c in hist.items()})
            report.bytes += entry_bytes(entry)
        if len(found) == before:
            report.shards_ok += 1
        if progress is not None:
            progress(entry_bytes(entry))
    dup = [i for i, c in ids.items() if c > 1]
    if dup:
        add(INDEX_NAME, "duplicate_id", f"{len(dup)} ids appear more than once (first: '{sorted(dup)[0]}')")
    all_lines = np.concatenate(lines) if lines else np.zeros(0, dtype=np.int64)
    uniq, counts = np.unique(all_lines, return_counts=True)
    if (counts > 1).any():
        add(INDEX_NAME, "duplicate_line", f"input line {int(uniq[counts > 1][0])} is written more than once")
    _check_totals(raw, store, report.rows, hist_total, images_total, set(uniq.tolist()), add)
    report.ok = not found
    return report


def _check_data_folder(names: list[str], split: str, splits: list[str], listed: set[str],
                       add: Callable[[str, str, str], None]) -> None:
    """Every file in ``data/`` (``names``) is a shard some split owns; this split's are all listed."""
    import re

    pattern = re.compile(r"(?P<split>.+)-\d{5}-of-\d{5}\.parquet")
    for name in names:
        rel = f"{DATA_DIR}/{name}"
        m = pattern.fullmatch(name)
        if m is not None and m.group("split") == split:
            if rel not in listed:
                add(rel, "unlisted", f"{rel} is a shard name of split '{split}' but not in {INDEX_NAME}")
        elif m is None or m.group("split") not in splits:
            add(rel, "foreign", f"{rel} is in {DATA_DIR}/ but no split of {INDEX_NAME} lists it (trainers read "
                                f"every file in {DATA_DIR}/)")


def _local_fetch(root: Path) -> _Fetch:
    def fetch(name: str) -> AbstractContextManager[Path | None]:
        p = root / name
        return contextlib.nullcontext(p if p.is_file() else None)

    return fetch


def _remote_fetch(store: Store) -> _Fetch:
    @contextlib.contextmanager
    def fetch(name: str) -> Iterator[Path | None]:
        size = store.size(name)
        if size is None:
            yield None
            return
        folder = tempfile.mkdtemp(prefix="mmprep-verify-", dir=os.environ.get("MMPREP_STAGING_DIR"))
        try:
            local = Path(folder) / Path(name).name
            with open(local, "wb") as f:
                for block in store.blocks(name, size):
                    f.write(block)
            yield local
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    return fetch


def _check_shard(
    fetch: _Fetch,
    k: int,
    entry: Any,
    meta: dict[str, Any],
    deep: bool,
    add: Callable[[str, str, str], None],
    ref_schema: Any,
) -> _ShardFacts | None:
    """Check one shard; returns its facts (ids, lines, rows, images) when it could be read."""

    if not isinstance(entry, dict) or "path" not in entry or "rows" not in entry:
        add(INDEX_NAME, "index", f"shard entry {k} lacks path or rows")
        return None
    name = str(entry["path"])
    bad = shard_entry_problems(entry)
    if bad:
        add(name, "index", f"{name}: its {INDEX_NAME} entry is damaged: {'; '.join(bad)}")
    if shard_path_problem(entry["path"]) is not None:  # outside the dataset: never opened
        return None
    with fetch(name) as p:
        if p is None:
            add(name, "missing", f"{name} is listed in {INDEX_NAME} but missing")
            return None
        return _check_shard_file(p, name, k, entry, meta, deep, add, ref_schema)


def _check_shard_file(
    p: Path,
    name: str,
    k: int,
    entry: dict[str, Any],
    meta: dict[str, Any],
    deep: bool,
    add: Callable[[str, str, str], None],
    ref_schema: Any,
) -> _ShardFacts | None:
    import pyarrow.parquet as pq

    size = p.stat().st_size
    if size != entry.get("bytes"):
        add(name, "size", f"{name}: {size} bytes, {INDEX_NAME} says {entry.get('bytes')}")
    digest = sha256_file(p)
    if digest != entry.get("sha256"):
        add(name, "sha256",
            f"{name}: sha256 {digest[:16]}… differs from {INDEX_NAME} ({str(entry.get('sha256'))[:16]}…)")
    try:
        f = pq.ParquetFile(p)
        schema = f.schema_arrow
    except Exception as exc:  # a damaged footer raises ArrowInvalid/OSError
        add(name, "parquet", f"{name}: not readable as Parquet ({_first_line(exc)})")
        return None
    with f:
        rows = f.metadata.num_rows
        if rows != entry["rows"]:
            add(name, "rows", f"{name}: {rows} rows, {INDEX_NAME} says {entry['rows']}")
        kv = {**(f.metadata.metadata or {}), **(schema.metadata or {})}
        try:
            shard_meta = json.loads(kv[METADATA_KEY.encode()])
        except (KeyError, ValueError):
            add(name, "metadata", f"{name}: no readable '{METADATA_KEY}' metadata")
            return None
        if shard_meta != meta:
            diff = sorted(key for key in set(shard_meta) | set(meta) if shard_meta.get(key) != meta.get(key))
            add(name, "metadata", f"{name}: '{METADATA_KEY}' metadata differs from {INDEX_NAME} in {', '.join(diff)}")
        if ref_schema is not None and not schema.remove_metadata().equals(ref_schema.remove_metadata()):
            add(name, "schema", f"{name}: columns or types differ from the first shard's")
        _check_shard_record(name, k, entry, kv, add)
        try:
            cols = _check_columns(name, f, entry, meta, deep, add)
        except Exception as exc:  # damaged pages surface as ArrowInvalid/OSError while reading
            add(name, "read", f"{name}: reading the columns failed ({_first_line(exc)})")
            return None
    return _ShardFacts(schema=schema, rows=rows, ids=cols.ids, lines=cols.lines, images=cols.images)


def _check_shard_record(name: str, k: int, entry: dict[str, Any], kv: dict[bytes, bytes],
                        add: Callable[[str, str, str], None]) -> None:
    try:
        rec = json.loads(kv[SHARD_METADATA_KEY.encode()])
    except (KeyError, ValueError):
        add(name, "shard_record", f"{name}: no readable '{SHARD_METADATA_KEY}' metadata")
        return
    expect = {"index": k, "rows": entry.get("rows"), "image_count_histogram": entry.get("image_count_histogram"),
              "first_line": entry.get("first_line"), "last_line": entry.get("last_line")}
    bad = [key for key, v in expect.items() if rec.get(key) != v]
    if bad:
        add(name, "shard_record",
            f"{name}: its '{SHARD_METADATA_KEY}' record differs from {INDEX_NAME} in {', '.join(bad)}")


def _check_columns(name: str, f: Any, entry: dict[str, Any], meta: dict[str, Any], deep: bool,
                   add: Callable[[str, str, str], None]) -> _ColumnFacts:
    names = set(f.schema_arrow.names)
    small = [c for c in ("id", "line", "image_count", "image_mask", "image_sizes", "content_boxes", "attention_mask",
                         "n_tokens", "truncated", "tag_ids") if c in names]
    table = f.read(columns=small)
    cols = {c: table.column(c).combine_chunks() for c in small}
    count = np.asarray(cols["image_count"].to_numpy(zero_copy_only=False), dtype=np.int64)
    n = len(count)
    hist = {str(h): int(c) for h, c in sorted(Counter(count.tolist()).items())}
    if hist != (entry.get("image_count_histogram") or {}):
        add(name, "histogram",
            f"{name}: image counts {hist} differ from {INDEX_NAME} {entry.get('image_count_histogram')}")
    limit = int(meta.get("limit_images", 0) or 0)
    if n and (count.min() < 1 or (limit and count.max() > limit)):
        add(name, "image_count", f"{name}: image_count outside 1..{limit}")
    lines = np.asarray(cols["line"].to_numpy(), dtype=np.int64)
    if n and (int(lines[0]) != entry.get("first_line") or int(lines[-1]) != entry.get("last_line")):
        add(name, "lines", f"{name}: lines {int(lines[0])}..{int(lines[-1])}, {INDEX_NAME} says "
                           f"{entry.get('first_line')}..{entry.get('last_line')}")
    if "image_mask" in cols and limit:
        mask = _fixed(cols["image_mask"], n)
        want = np.arange(limit)[None, :] < count[:, None]
        if mask.shape != want.shape or (mask != want).any():
            add(name, "image_mask", f"{name}: image_mask disagrees with image_count in {_first_bad(mask != want)}")
        pixels = meta.get("pixels") or {}
        if "content_boxes" in cols and pixels.get("image_size"):
            h, w = pixels["image_size"]
            boxes = _fixed(cols["content_boxes"], n)
            x0, y0, x1, y1 = (boxes[..., i] for i in range(4))
            real_ok = (x0 >= 0) & (y0 >= 0) & (x1 <= w) & (y1 <= h) & (x1 > x0) & (y1 > y0)
            empty_ok = (boxes == 0).all(axis=-1)
            bad = np.where(want, ~real_ok, ~empty_ok)
            if bad.any():
                add(name, "content_boxes", f"{name}: content box outside the image or set on an empty slot in "
                                           f"{_first_bad(bad)}")
        if "image_sizes" in cols:
            sizes = _fixed(cols["image_sizes"], n)
            bad = np.where(want, ~(sizes > 0).all(axis=-1), ~(sizes == 0).all(axis=-1))
            if bad.any():
                add(name, "image_sizes", f"{name}: image size missing on a real slot or set on an empty one in "
                                         f"{_first_bad(bad)}")
    text = meta.get("text")
    if text and "attention_mask" in cols and "n_tokens" in cols:
        length = int(text["max_length"])
        am = _fixed(cols["attention_mask"], n)
        nt = np.asarray(cols["n_tokens"].to_numpy(), dtype=np.int64)
        if (am.sum(axis=1) != np.minimum(nt, length)).any():
            add(name, "attention_mask", f"{name}: attention_mask sums differ from n_tokens in "
                                        f"{_first_bad(am.sum(axis=1) != np.minimum(nt, length))}")
        if "truncated" in cols:
            tr = cols["truncated"].to_numpy(zero_copy_only=False)
            if (tr != (nt > length)).any():
                add(name, "truncated", f"{name}: truncated disagrees with n_tokens > {length}")
    vocab = meta.get("vocab")
    if vocab and "tag_ids" in cols:
        values = cols["tag_ids"].flatten().to_numpy(zero_copy_only=False)
        if values.size and (values.min() < 0 or values.max() >= int(vocab["size"])):
            add(name, "tag_ids", f"{name}: tag id outside the vocabulary (size {vocab['size']})")
    if deep:
        _check_deep(name, f, count, meta, add)
    ids = cols["id"].to_pylist() if "id" in cols else []
    return _ColumnFacts(ids=ids, lines=lines, images=int(count.sum()))


def _check_deep(name: str, f: Any, count: np.ndarray, meta: dict[str, Any],
                add: Callable[[str, str, str], None]) -> None:
    if meta.get("layout", "padded") == "padded" and meta.get("pixels"):
        spec = PixelSpec.from_metadata(meta)
        pos = 0
        for rb in f.iter_batches(batch_size=256, columns=[spec.column, "image_count"]):
            arr = rb.column(spec.column)
            n = len(arr)
            if arr.null_count:
                add(name, "pixels", f"{name}: {arr.null_count} rows have no pixel value")
                return
            if arr.type.byte_width != spec.row_bytes:
                add(name, "pixels", f"{name}: {arr.type.byte_width} pixel bytes per row, metadata gives "
                                    f"{spec.row_bytes}")
                return
            raw = np.frombuffer(arr.buffers()[1], np.uint8, n * spec.row_bytes, arr.offset * spec.row_bytes)
            slots = raw.reshape(n, spec.limit, -1)
            empty = np.arange(spec.limit)[None, :] >= count[pos:pos + n, None]
            dirty = empty & slots.any(axis=2)
            if dirty.any():
                r, s = np.argwhere(dirty)[0]
                add(name, "padding", f"{name}: row {pos + int(r)} slot {int(s)} is padding but holds non-zero bytes")
                return
            pos += n
        return
    from mmprep.images.decode import ImageConfig, ImageError, load_image

    cfg = ImageConfig(size=None, resize_mode="none")
    pos = 0
    for rb in f.iter_batches(batch_size=64, columns=["images", "image_sizes", "id"]):
        images, sizes, ids = rb.column("images").to_pylist(), rb.column("image_sizes").to_pylist(), rb.column("id")
        for r, (imgs, sz) in enumerate(zip(images, sizes, strict=True)):
            if len(imgs) != count[pos + r] or len(sz) != count[pos + r]:
                add(name, "images", f"{name}: sample {ids[r]} has {len(imgs)} images, image_count {count[pos + r]}")
                return
            for j, img in enumerate(imgs):
                try:
                    dec = load_image(img["bytes"], cfg)
                except ImageError as exc:
                    add(name, "images", f"{name}: sample {ids[r]} image {j + 1} does not decode: {exc.detail}")
                    return
                if list(dec.original_size) != list(sz[j]):
                    add(name, "images", f"{name}: sample {ids[r]} image {j + 1} is {dec.original_size}, "
                                        f"image_sizes says {sz[j]}")
                    return
        pos += rb.num_rows


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def entry_bytes(entry: Any) -> int:
    """The ``bytes`` of a shard entry of the index, 0 when missing or not a whole number (for progress and sums)."""
    return (count_field(entry.get("bytes")) or 0) if isinstance(entry, dict) else 0


def _fixed(arr: Any, n: int) -> np.ndarray:
    import pyarrow as pa

    dims = []
    values = arr
    while pa.types.is_fixed_size_list(values.type):
        dims.append(values.type.list_size)
        values = values.flatten()
    return values.to_numpy(zero_copy_only=False).reshape(n, *dims)


def _first_bad(bad: np.ndarray) -> str:
    r = np.argwhere(bad.reshape(len(bad), -1).any(axis=1) if bad.ndim > 1 else bad)
    return f"row {int(r[0][0])}" if len(r) else "a row"


def _reject_lines(raw: IndexJson, store: Store | None, name: str) -> Iterator[str] | None:
    """The lines of the rejects file, None when it is missing."""
    if store is None:
        p = Path(raw.root) / name
        if not p.is_file():
            return None

        def local() -> Iterator[str]:
            with open(p, encoding="utf-8") as fh:
                yield from fh

        return local()
    size = store.size(name)
    if size is None:
        return None

    def remote(size: int) -> Iterator[str]:
        rest = b""
        for block in store.blocks(name, size):
            *lines, rest = (rest + block).split(b"\n")
            for line in lines:
                yield line.decode("utf-8", "replace") + "\n"
        if rest:
            yield rest.decode("utf-8", "replace")

    return remote(size)


def _check_totals(raw: IndexJson, store: Store | None, rows: int, hist_total: Counter[str], images_total: int,
                  written_lines: set[int], add: Callable[[str, str, str], None]) -> None:
    t = raw.data.get("totals") or {}
    read, written, rejected = t.get("read"), t.get("written"), t.get("rejected")
    if not (isinstance(read, int) and isinstance(written, int) and isinstance(rejected, int)):
        add(INDEX_NAME, "totals", f"{INDEX_NAME}: totals lack read/written/rejected")
        return
    if read != written + rejected:
        add(INDEX_NAME, "accounting", f"{INDEX_NAME}: read {read} != written {written} + rejected {rejected}")
    listed_rows = sum(count_field(e.get("rows")) or 0 for e in raw.entries if isinstance(e, dict))
    if listed_rows != written:
        add(INDEX_NAME, "accounting", f"{INDEX_NAME}: shards list {listed_rows} rows, totals say written {written}")
    if rows != written:
        add(INDEX_NAME, "accounting", f"the shards hold {rows} rows, {INDEX_NAME} says written {written}")
    hist = {k: hist_total[k] for k in sorted(hist_total, key=int)}
    if hist != (t.get("image_count_histogram") or {}):
        add(INDEX_NAME, "histogram", f"{INDEX_NAME}: shard histograms add up to {hist}, totals say "
                                     f"{t.get('image_count_histogram')}")
    if sum(hist.values()) != written:
        add(INDEX_NAME, "histogram", f"{INDEX_NAME}: the image-count histogram counts {sum(hist.values())} rows, "
                                     f"written is {written}")
    if "images_written" in t and t["images_written"] != images_total:
        add(INDEX_NAME, "images", f"{INDEX_NAME}: images_written {t['images_written']}, the shards hold "
                                  f"{images_total}")
    rej_name = raw.data.get("rejects") or REJECTS_NAME
    problem = shard_path_problem(rej_name, "rejects")
    if problem is not None:
        add(INDEX_NAME, "index", f"{INDEX_NAME}: {problem}")
        return
    lines = _reject_lines(raw, store, rej_name)
    if lines is None:
        add(rej_name, "missing", f"{rej_name} is missing (index says {rejected} rejected)")
        return
    reasons: Counter[str] = Counter()
    n_lines = 0
    for no, text in enumerate(lines, 1):
        if not text.strip():
            continue
        n_lines += 1
        try:
            rec = json.loads(text)
            reasons[str(rec["reason"])] += 1
            line = rec.get("line")
        except (ValueError, KeyError, TypeError, RecursionError):
            add(rej_name, "rejects", f"{rej_name}:{no}: not a JSON reject record")
            continue
        if isinstance(line, int) and line in written_lines:
            add(rej_name, "rejects", f"{rej_name}:{no}: input line {line} is rejected but also written")
    if n_lines != rejected:
        add(rej_name, "accounting", f"{rej_name}: {n_lines} lines, {INDEX_NAME} says rejected {rejected}")
    if dict(sorted(reasons.items())) != (t.get("rejected_by_reason") or {}):
        add(rej_name, "accounting", f"{rej_name}: reasons {dict(sorted(reasons.items()))} differ from "
                                    f"{INDEX_NAME} {t.get('rejected_by_reason')}")
