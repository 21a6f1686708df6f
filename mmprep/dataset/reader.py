"""Reading packed datasets back: rows and numpy batches, random access, masks, epoch plans.

:class:`PackedDataset` opens the output directory of ``mmprep pack`` through its ``index.json`` and serves:

- **batches** (``iter_batches``): a ``dict`` of column name → numpy array with a leading batch dimension.
  ``pixel_values`` is the whole column buffer viewed as ``[B, *shape]`` in the stored dtype with
  ``np.frombuffer`` (no copy; each batch has its own buffer, so changing it in place touches nothing else);
  fixed-size lists (``image_mask``, ``content_boxes``,
  ``input_ids``, ...) become ``[B, ...]`` arrays; strings and variable-length lists (``id``, ``text``,
  ``tag_ids``, ``image_paths``, encoded ``images``) become Python lists.
- **rows** (iteration, ``ds[i]``): the same fields for one sample, without the batch dimension.
- **random access** (``ds[i]``, ``ds.take(indices)``): reads only the Parquet row groups holding the rows (with a
  small cache of decoded row groups), so nearby indices cost one read.
- **normalisation on load** for ``uint8`` shards: ``(pixel / 255 - mean) / std`` with the mean/std from the
  metadata (or given), to ``float32``/``float16``; padding slots become zeros, exactly as a normalised pack
  stores them.
- **epoch plans** (``epoch_plan``/``iter_plan``): which rows a (rank, worker) reads in an epoch, each row exactly
  once across all of them, shuffled deterministically by seed and epoch. The PyTorch datasets in
  :mod:`mmprep.dataset.torch_data` are thin wrappers around these.

Masks: :func:`image_mask` (``[B, limit]``) and :func:`patch_mask` (``[B, limit, ceil(H/p), ceil(W/p)]``) from the
stored content boxes, vectorised over the batch.
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmprep.errors import InputError, UsageError

__all__ = [
    "NORMALIZE_DTYPES",
    "PATCH_RULES",
    "Batch",
    "PackedDataset",
    "PixelSpec",
    "ShardEntry",
    "VocabLookup",
    "denormalize",
    "image_mask",
    "load_index",
    "multi_hot",
    "normalize_pixels",
    "patch_mask",
]

Batch = dict[str, Any]
NORMALIZE_DTYPES = ("float32", "float16")
PATCH_RULES = ("any", "all")
INDEX_NAME = "index.json"


# -- index and metadata -----------------------------------------------------------------------------------------


def load_index(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """Find and parse ``index.json`` of a packed directory (the directory or the index file itself).

    Raises:
        InputError: the path is missing, not a directory, has no index (an unfinished run) or an index that is
            not mmprep's.
    """
    p = Path(path)
    if p.is_file() and p.name == INDEX_NAME:
        p = p.parent
    if not p.exists():
        raise InputError(f"{p}: no such directory", hint="give the --out directory of `mmprep pack`")
    if not p.is_dir():
        raise InputError(f"{p}: not a directory", hint="give the --out directory of `mmprep pack`")
    idx = p / INDEX_NAME
    if not idx.is_file():
        if any(p.glob("shard-*.parquet")):
            raise InputError(f"{p}: has shards but no {INDEX_NAME}: the pack run did not finish",
                             hint="rerun the same `mmprep pack` command with --resume (index.json is written last)")
        raise InputError(f"{p}: not an mmprep packed directory (no {INDEX_NAME})",
                         hint="give the --out directory of `mmprep pack`")
    try:
        index = json.loads(idx.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{idx}: cannot read: {exc}") from None
    except ValueError as exc:
        raise InputError(f"{idx}: not valid JSON: {exc}", hint="the index is damaged; rerun `mmprep pack`") from None
    if not isinstance(index, dict) or index.get("format") != "mmprep-index":
        got = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise InputError(f"{idx}: not an mmprep index (format {got!r})",
                         hint="give the --out directory of `mmprep pack`")
    version = index.get("format_version", 0)
    if count_field(version) is None:
        raise InputError(f"{idx}: format_version is {version!r}, not a whole number",
                         hint="the index is damaged; rerun `mmprep pack`")
    if version > 1:
        raise InputError(f"{idx}: format version {index['format_version']} is newer than this mmprep reads (1)",
                         hint="upgrade mmprep")
    if not isinstance(index.get("shards"), list):
        raise InputError(f"{idx}: no 'shards' list", hint="the index is damaged; rerun `mmprep pack`")
    return p, index


def count_field(value: Any) -> int | None:
    """``value`` when it is a whole number >= 0 as JSON stores one (an int, not a bool or a string), else None.

    Counts in ``index.json`` (rows, bytes, histogram values) are checked with this rather than coerced with
    ``int()``, so that a damaged index is reported by field instead of failing with a ValueError.
    """
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


@dataclass(frozen=True)
class ShardEntry:
    """One shard as listed in the index, with its place in the dataset's row order."""

    name: str
    path: Path
    rows: int
    start: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class PixelSpec:
    """How the padded pixel column is laid out (from the ``pixels`` metadata)."""

    column: str
    dtype: np.dtype
    shape: tuple[int, ...]
    layout: str
    normalized: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> PixelSpec:
        px = meta["pixels"]
        order = "<" if px.get("byte_order", "little") == "little" else ">"
        dtype = np.dtype(px["dtype"])
        if dtype.itemsize > 1:
            dtype = dtype.newbyteorder(order)
        return cls(
            column=px.get("column", "pixel_values"),
            dtype=dtype,
            shape=tuple(int(s) for s in px["shape"]),
            layout=px.get("layout", "CHW"),
            normalized=bool(px.get("normalized", dtype != np.uint8)),
            mean=tuple(float(v) for v in px.get("mean", (0.0, 0.0, 0.0))),  # type: ignore[arg-type]
            std=tuple(float(v) for v in px.get("std", (1.0, 1.0, 1.0))),  # type: ignore[arg-type]
        )

    @property
    def limit(self) -> int:
        """Image slots per row."""
        return self.shape[0]

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of every slot."""
        return (self.shape[2], self.shape[3]) if self.layout == "CHW" else (self.shape[1], self.shape[2])

    @property
    def row_bytes(self) -> int:
        """Bytes of one row's pixel value."""
        return math.prod(self.shape) * self.dtype.itemsize

    def channel_shape(self) -> tuple[int, ...]:
        """Shape that broadcasts a per-channel constant over ``[..., *slot]`` in this layout."""
        return (3, 1, 1) if self.layout == "CHW" else (3,)


# -- pixels and masks ---------------------------------------------------------------------------------------------


def normalize_pixels(
    pixels: np.ndarray,
    spec: PixelSpec,
    dtype: str = "float32",
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    image_count: np.ndarray | None = None,
) -> np.ndarray:
    """Stored pixels ``[B, limit, *slot]`` as normalised floats: ``(pixel / 255 - mean) / std``.

    Shards that are already normalised are only cast to ``dtype``. With ``image_count``, padding slots become
    zeros (the mean colour), which is what a normalised pack stores for them.

    Args:
        pixels: as returned by the reader, in ``spec``'s dtype and layout.
        spec: the pixel layout of the shards.
        dtype: ``float32`` or ``float16``.
        mean: per-channel mean in [0, 1] (default: the metadata's).
        std: per-channel std in [0, 1] (default: the metadata's).
        image_count: real images per row, ``[B]``.
    """
    if dtype not in NORMALIZE_DTYPES:
        raise UsageError(f"normalize must be one of {', '.join(NORMALIZE_DTYPES)}, got '{dtype}'")
    if spec.normalized:
        return pixels.astype(dtype, copy=False)
    m = np.asarray(spec.mean if mean is None else mean, dtype=np.float64)
    s = np.asarray(spec.std if std is None else std, dtype=np.float64)
    if m.shape != (3,) or s.shape != (3,) or not (s > 0).all():
        raise UsageError(f"mean and std need three values and a positive std, got {m.tolist()} and {s.tolist()}")
    # The same arithmetic as the pack stage (float32 multiply, then add, then the cast), so results are
    # bit-identical to a normalised pack. float16 goes through a small float32 scratch a few slots at a time
    # (cache-sized) instead of a whole float32 batch.
    cshape = spec.channel_shape()
    scale = (1.0 / (255.0 * s)).astype(np.float32).reshape(cshape)
    offset = (-m / s).astype(np.float32).reshape(cshape)
    out = np.empty(pixels.shape, dtype=dtype)
    if dtype == "float32":
        np.multiply(pixels, scale, out=out)
        out += offset
    else:
        src = pixels.reshape(-1, *pixels.shape[-3:])
        dst = out.reshape(src.shape)
        step = 4
        for i in range(0, len(src), step):
            tmp = np.multiply(src[i:i + step], scale, dtype=np.float32)
            tmp += offset
            dst[i:i + step] = tmp
    if image_count is not None:
        out[image_mask(image_count, spec.limit) == 0] = 0.0
    return out


def denormalize(pixels: np.ndarray, spec: PixelSpec) -> np.ndarray:
    """Stored pixels (any leading dims) as uint8 in the stored layout: what the model sees, as colours."""
    if not spec.normalized:
        return np.asarray(pixels, dtype=np.uint8)
    m = np.asarray(spec.mean, dtype=np.float32).reshape(spec.channel_shape())
    s = np.asarray(spec.std, dtype=np.float32).reshape(spec.channel_shape())
    v = (pixels.astype(np.float32) * s + m) * 255.0
    return np.clip(np.rint(v), 0, 255).astype(np.uint8)


def image_mask(image_count: np.ndarray | Sequence[int], limit: int) -> np.ndarray:
    """``[B, limit]`` bool: True for the first ``image_count`` slots of each row (real images)."""
    counts = np.asarray(image_count)
    return np.arange(limit)[None, :] < counts.reshape(-1, 1)


def patch_mask(
    content_boxes: np.ndarray,
    image_size: tuple[int, int],
    patch_size: int | tuple[int, int],
    *,
    rule: str = "any",
) -> np.ndarray:
    """Which patches of each image slot hold real pixels: ``[..., ceil(H/ph), ceil(W/pw)]`` bool.

    Patch ``(i, j)`` covers pixel rows ``[i*ph, min((i+1)*ph, H))`` and columns ``[j*pw, min((j+1)*pw, W))``
    (the last row/column of patches is partial when the size is not a multiple of the patch size). A pixel is
    real when it lies inside its slot's content box ``[x0, x1) × [y0, y1)``. Rules:

    - ``any`` (default): a patch is real when **at least one** of its pixels is real (so a patch is masked out
      only when it is all letterbox or padding).
    - ``all``: a patch is real only when **every** pixel is real (no patch mixes content and padding).

    Empty slots have the box ``(0, 0, 0, 0)`` and therefore no real patches. Computed with broadcasting over
    all leading dimensions (batch and slots); there is no Python loop over images or pixels.

    Args:
        content_boxes: ``[..., 4]`` int ``(x0, y0, x1, y1)``, e.g. ``[B, limit, 4]`` from the reader.
        image_size: ``(H, W)`` of a slot.
        patch_size: ``p`` or ``(ph, pw)``.
        rule: ``any`` or ``all``.
    """
    if rule not in PATCH_RULES:
        raise UsageError(f"patch rule must be one of {', '.join(PATCH_RULES)}, got '{rule}'")
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    if ph < 1 or pw < 1:
        raise UsageError(f"patch size must be positive, got {patch_size}")
    h, w = image_size
    boxes = np.asarray(content_boxes, dtype=np.int64)
    x0, y0, x1, y1 = (boxes[..., k, None] for k in range(4))
    rows = _axis_mask(y0, y1, h, ph, rule)  # [..., nh]
    cols = _axis_mask(x0, x1, w, pw, rule)  # [..., nw]
    return rows[..., :, None] & cols[..., None, :]


def _axis_mask(lo: np.ndarray, hi: np.ndarray, size: int, p: int, rule: str) -> np.ndarray:
    start = np.arange(0, size, p)
    stop = np.minimum(start + p, size)
    lo = np.clip(lo, 0, size)
    hi = np.clip(hi, 0, size)
    nonempty = hi > lo
    if rule == "any":
        return (start < hi) & (stop > lo) & nonempty
    return (start >= lo) & (stop <= hi) & nonempty


def multi_hot(
    tag_ids: Sequence[np.ndarray] | Sequence[Sequence[int]], size: int, dtype: Any = np.float32
) -> np.ndarray:
    """``[B, size]`` multi-hot targets from the ragged ``tag_ids`` of a batch (no Python loop over tags)."""
    lengths = np.fromiter((len(t) for t in tag_ids), dtype=np.int64, count=len(tag_ids))
    out = np.zeros((len(tag_ids), size), dtype=dtype)
    if lengths.sum():
        values = np.concatenate([np.asarray(t, dtype=np.int64) for t in tag_ids])
        if values.min() < 0 or values.max() >= size:
            raise UsageError(f"tag id {int(values.max() if values.max() >= size else values.min())} is outside a "
                             f"vocabulary of size {size}")
        out[np.repeat(np.arange(len(tag_ids)), lengths), values] = 1
    return out


# -- arrow → numpy --------------------------------------------------------------------------------------------------


def _primitive(arr: Any) -> np.ndarray:
    return arr.to_numpy(zero_copy_only=False)


def _pixels(arr: Any, spec: PixelSpec, where: str) -> np.ndarray:
    n = len(arr)
    width = arr.type.byte_width
    if width != spec.row_bytes:
        raise InputError(f"{where}: pixel column holds {width} bytes per row, but the metadata says "
                         f"{list(spec.shape)} {spec.dtype.name} = {spec.row_bytes} bytes",
                         hint="the shard does not match index.json; run `mmprep verify` on the directory")
    if n == 0:
        return np.zeros((0, *spec.shape), dtype=spec.dtype)
    buf = arr.buffers()[1]
    flat = np.frombuffer(buf, dtype=np.uint8, count=n * width, offset=arr.offset * width)
    return flat.view(spec.dtype).reshape(n, *spec.shape)


def _ragged(arr: Any) -> list[Any]:
    """A list-typed column as a list of per-row values (numpy arrays for numbers)."""
    import pyarrow as pa

    vt = arr.type.value_type
    if pa.types.is_string(vt) or pa.types.is_large_string(vt) or pa.types.is_struct(vt):
        return arr.to_pylist()
    offsets = np.asarray(arr.offsets.to_numpy(zero_copy_only=False), dtype=np.int64)
    offsets -= offsets[0]
    values = arr.flatten()
    dims: list[int] = []
    while pa.types.is_fixed_size_list(values.type):
        dims.append(values.type.list_size)
        values = values.flatten()
    flat = _primitive(values).reshape(-1, *dims) if dims else _primitive(values)
    return np.split(flat, offsets[1:-1]) if len(arr) else []


def _column(name: str, arr: Any, spec: PixelSpec | None, where: str) -> Any:
    import pyarrow as pa

    t = arr.type
    if spec is not None and name == spec.column:
        return _pixels(arr, spec, where)
    if pa.types.is_fixed_size_list(t):
        dims = []
        values = arr
        while pa.types.is_fixed_size_list(values.type):
            dims.append(values.type.list_size)
            values = values.flatten()
        return _primitive(values).reshape(len(arr), *dims)
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _ragged(arr)
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t):
        return arr.to_pylist()
    return _primitive(arr)


def _decode_images(rows: list[list[dict[str, Any]]], ids: list[str] | None, decode: Any) -> list[list[np.ndarray]]:
    from mmprep.images.decode import ImageConfig, ImageError, load_image

    cfg = decode if isinstance(decode, ImageConfig) else ImageConfig(size=None, resize_mode="none")
    out: list[list[np.ndarray]] = []
    for r, images in enumerate(rows):
        decoded = []
        for k, img in enumerate(images):
            try:
                decoded.append(load_image(img["bytes"], cfg).array)
            except ImageError as exc:
                who = ids[r] if ids else f"row {r}"
                raise InputError(f"sample {who}: image {k + 1} ('{img.get('path')}') does not decode: {exc.detail}",
                                 hint="run `mmprep verify` on the directory") from None
        out.append(decoded)
    return out


def _empty_batch(schema: Any) -> Any:
    import pyarrow as pa

    return pa.RecordBatch.from_pylist([], schema=schema)


def _to_record_batch(table: Any) -> Any:
    import pyarrow as pa

    if isinstance(table, pa.RecordBatch):
        return table
    batches = table.combine_chunks().to_batches()
    if not batches:
        return _empty_batch(table.schema)
    return batches[0] if len(batches) == 1 else pa.concat_batches(batches)


# -- the dataset ------------------------------------------------------------------------------------------------------


class PackedDataset:
    """A packed directory (the ``--out`` of ``mmprep pack``), readable as rows or numpy batches.

    Args:
        path: the directory (or its ``index.json``).
        columns: columns to read (default: all). Unknown names are a UsageError listing the available ones.
        normalize: ``float32`` or ``float16`` to return pixels normalised with the metadata's mean/std
            (uint8 shards), or cast (already normalised shards); None returns them as stored.
        mean: override the mean used by ``normalize`` (three values in [0, 1]).
        std: override the std used by ``normalize``.
        decode_images: for ``--pad none`` shards: False keeps ``images`` as lists of ``{bytes, path}``; True
            decodes each to a uint8 ``(H, W, 3)`` array (EXIF orientation applied); an
            :class:`mmprep.images.decode.ImageConfig` also resizes.
        cache_row_groups: decoded row groups kept for random access.

    Raises:
        InputError: the directory is not a finished mmprep pack.
        UsageError: bad options.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        columns: Sequence[str] | None = None,
        normalize: str | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        decode_images: Any = False,
        cache_row_groups: int = 4,
    ) -> None:
        self.path, self.index = load_index(path)
        self.shards: list[ShardEntry] = []
        start = 0
        for k, s in enumerate(self.index["shards"]):
            entry = _shard_entry(self.path, k, s, start)
            self.shards.append(entry)
            start += entry.rows
        self._len = start
        self.metadata: dict[str, Any] = self.index.get("metadata") or {}
        self.layout: str = self.metadata.get("layout", "padded")
        self.pixels: PixelSpec | None = None
        if self.layout == "padded" and "pixels" in self.metadata:
            try:
                self.pixels = PixelSpec.from_metadata(self.metadata)
            except (KeyError, TypeError, ValueError) as exc:
                raise InputError(f"{self.path / INDEX_NAME}: bad pixel metadata ({exc})",
                                 hint="run `mmprep verify` on the directory") from None
        if normalize is not None:
            if normalize not in NORMALIZE_DTYPES:
                raise UsageError(f"normalize must be one of {', '.join(NORMALIZE_DTYPES)}, got '{normalize}'")
            if self.pixels is None:
                raise UsageError(f"{self.path}: normalize needs padded pixel tensors; this dataset stores "
                                 f"{self.layout} images", hint="use decode_images=True for the encoded layout")
        self.normalize = normalize
        self.mean = tuple(mean) if mean is not None else None
        self.std = tuple(std) if std is not None else None
        self.decode_images = decode_images
        self.cache_row_groups = max(0, int(cache_row_groups))
        self._schema: Any = None
        self.columns: list[str] = self._check_columns(columns)
        self._rg_rows: list[list[int]] | None = None
        self._rg_starts: np.ndarray | None = None
        self._rg_shard: np.ndarray | None = None
        self._rg_local: np.ndarray | None = None
        self._cache: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self._files: OrderedDict[int, Any] = OrderedDict()

    # -- pickling (DataLoader workers): no open files or cached tables travel ------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()
        state["_files"] = OrderedDict()
        return state

    def __repr__(self) -> str:
        return f"PackedDataset({str(self.path)!r}, rows={self._len}, shards={len(self.shards)}, layout={self.layout})"

    # -- facts ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._len

    @property
    def schema(self) -> Any:
        """The Arrow schema of the shards (read from the first shard)."""
        if self._schema is None and self.shards:
            import pyarrow.parquet as pq

            first = self.shards[0]
            try:
                self._schema = pq.read_schema(first.path)
            except FileNotFoundError:
                raise InputError(f"{first.path}: listed in {INDEX_NAME} but missing",
                                 hint="run `mmprep verify` on the directory") from None
            except OSError as exc:
                raise InputError(f"{first.path}: not a readable Parquet file ({exc})",
                                 hint="run `mmprep verify` on the directory") from None
        return self._schema

    @property
    def column_names(self) -> list[str]:
        """All columns stored in the shards."""
        return list(self.schema.names) if self.schema is not None else []

    @property
    def limit_images(self) -> int:
        """Image slots per row (padded) or the pack's --limit-images."""
        return int(self.metadata.get("limit_images", 0))

    @property
    def max_length(self) -> int | None:
        """Token ids per row, when the pack had a tokenizer."""
        text = self.metadata.get("text")
        return int(text["max_length"]) if text else None

    def _check_columns(self, columns: Sequence[str] | None) -> list[str]:
        names = self.column_names
        if columns is None:
            return names
        if isinstance(columns, str):
            columns = [columns]
        unknown = [c for c in columns if c not in names]
        if unknown and names:
            raise UsageError(f"{self.path}: no column {', '.join(repr(c) for c in unknown)}",
                             hint="columns: " + ", ".join(names))
        return list(dict.fromkeys(columns))

    def _read_columns(self, cols: list[str]) -> list[str]:
        """Columns to read for ``cols``: plus image_count when normalising (padding slots become zeros)."""
        read = list(cols)
        if (self.normalize and self.pixels is not None and self.pixels.column in cols
                and "image_count" not in read and "image_count" in self.column_names):
            read.append("image_count")
        return read

    # -- conversion ----------------------------------------------------------------------------------------
    def to_numpy(self, batch: Any, columns: Sequence[str] | None = None) -> Batch:
        """Convert an Arrow record batch or table of this dataset's rows to a batch dict.

        ``columns`` (default: all in ``batch``) are returned; normalisation needs ``image_count`` in ``batch``
        to zero the padding slots.
        """
        rb = _to_record_batch(batch)
        cols = list(columns) if columns is not None else list(rb.schema.names)
        return self._finish(self._convert(rb, list(rb.schema.names)), cols)

    def _convert(self, rb: Any, names: list[str]) -> Batch:
        """Arrow → numpy/lists as stored (no normalisation or decoding)."""
        return {name: _column(name, rb.column(name), self.pixels, str(self.path)) for name in names}

    def _finish(self, raw: Batch, cols: list[str]) -> Batch:
        """Apply normalisation and image decoding; keep only ``cols``."""
        out = {name: raw[name] for name in cols}
        if self.pixels is not None and self.pixels.column in out and self.normalize:
            out[self.pixels.column] = normalize_pixels(out[self.pixels.column], self.pixels, self.normalize,
                                                       mean=self.mean, std=self.std,
                                                       image_count=raw.get("image_count"))
        if "images" in out and self.decode_images:
            out["images"] = _decode_images(out["images"], out.get("id"), self.decode_images)
        return out

    # -- sequential reading --------------------------------------------------------------------------------
    def iter_batches(
        self,
        batch_size: int = 256,
        *,
        columns: Sequence[str] | None = None,
        drop_last: bool = False,
        start: int = 0,
        stop: int | None = None,
    ) -> Iterator[Batch]:
        """Batches of ``batch_size`` rows in stored order (the last one smaller unless ``drop_last``).

        Args:
            batch_size: rows per batch; batches run across shard boundaries.
            columns: columns to return (default: the dataset's selection).
            drop_last: skip a final partial batch.
            start: first row (global index).
            stop: end row (exclusive; default: all).
        """
        if batch_size < 1:
            raise UsageError(f"batch size must be at least 1, got {batch_size}")
        cols = self._check_columns(columns) if columns is not None else self.columns
        read = self._read_columns(cols)
        stop = self._len if stop is None else min(stop, self._len)
        for rb in _rebatch(self._iter_record_batches(start, stop, read, batch_size), batch_size, drop_last):
            yield self.to_numpy(rb, cols)

    def __iter__(self) -> Iterator[Batch]:
        """Rows in stored order: each a dict of the selected columns without the batch dimension."""
        for batch in self.iter_batches(256):
            yield from _rows(batch)

    def _iter_record_batches(self, start: int, stop: int, read: list[str], batch_size: int) -> Iterator[Any]:
        for k, shard in enumerate(self.shards):
            lo, hi = max(start, shard.start), min(stop, shard.start + shard.rows)
            if lo >= hi:
                continue
            f = self._file(k)
            if lo == shard.start and hi == shard.start + shard.rows:
                yield from f.iter_batches(batch_size=batch_size, columns=read, use_threads=True)
                continue
            rg_rows = self._row_groups()[k]
            first = shard.start
            for g, n in enumerate(rg_rows):
                a, b = max(lo, first), min(hi, first + n)
                if a < b:
                    table = f.read_row_group(g, columns=read, use_threads=True)
                    yield _to_record_batch(table.slice(a - first, b - a))
                first += n

    def _file(self, k: int) -> Any:
        import pyarrow.parquet as pq

        f = self._files.get(k)
        if f is None:
            shard = self.shards[k]
            try:
                f = pq.ParquetFile(shard.path)
            except FileNotFoundError:
                raise InputError(f"{shard.path}: listed in {INDEX_NAME} but missing",
                                 hint="run `mmprep verify` on the directory") from None
            except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for a damaged file
                raise InputError(f"{shard.path}: not a readable Parquet file ({exc})",
                                 hint="run `mmprep verify` on the directory") from None
            if f.metadata.num_rows != shard.rows:
                raise InputError(f"{shard.path}: holds {f.metadata.num_rows} rows, {INDEX_NAME} says {shard.rows}",
                                 hint="run `mmprep verify` on the directory")
            self._files[k] = f
            while len(self._files) > 8:
                _, old = self._files.popitem(last=False)
                old.close()
        else:
            self._files.move_to_end(k)
        return f

    # -- row groups and random access ----------------------------------------------------------------------
    def _row_groups(self) -> list[list[int]]:
        if self._rg_rows is None:
            rows = []
            for k in range(len(self.shards)):
                md = self._file(k).metadata
                rows.append([md.row_group(g).num_rows for g in range(md.num_row_groups)])
            self._rg_rows = rows
        return self._rg_rows

    def _rg_table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._rg_starts is None:
            sizes, shard_of, local = [], [], []
            for k, groups in enumerate(self._row_groups()):
                for g, n in enumerate(groups):
                    sizes.append(n)
                    shard_of.append(k)
                    local.append(g)
            self._rg_starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
            self._rg_shard = np.asarray(shard_of, dtype=np.int64)
            self._rg_local = np.asarray(local, dtype=np.int64)
        assert self._rg_shard is not None and self._rg_local is not None
        return self._rg_starts, self._rg_shard, self._rg_local

    def row_group_bounds(self) -> np.ndarray:
        """Global row index where each row group starts, plus ``len(self)`` at the end (for block shuffles)."""
        return self._rg_table()[0].copy()

    def _read_rg(self, g: int, read: list[str]) -> Any:
        """Row group ``g`` (global numbering) as an Arrow table."""
        _, shard_of, local = self._rg_table()
        return self._file(int(shard_of[g])).read_row_group(int(local[g]), columns=read, use_threads=True)

    def _rg_arrays(self, g: int, read: list[str]) -> Batch:
        """Row group ``g`` converted to numpy as stored (cached: ``cache_row_groups`` of them)."""
        key = (g, tuple(read))
        arrays = self._cache.get(key)
        if arrays is not None:
            self._cache.move_to_end(key)
            return arrays
        arrays = self._convert(_to_record_batch(self._read_rg(g, read)), read)
        if self.cache_row_groups:
            self._cache[key] = arrays
            while len(self._cache) > self.cache_row_groups:
                self._cache.popitem(last=False)
        return arrays

    def take(self, indices: Iterable[int] | np.ndarray, *, columns: Sequence[str] | None = None) -> Batch:
        """A batch of the rows at ``indices`` (global, any order, repeats allowed; negative counts from the end).

        Each row group holding requested rows is read and converted once (and kept in a small cache); the rows
        are gathered from it with numpy indexing, so the batch is a fresh copy.

        Raises:
            IndexError: an index outside ``[-len, len)``.
        """
        import pyarrow as pa

        cols = self._check_columns(columns) if columns is not None else self.columns
        read = self._read_columns(cols)
        idx = np.asarray(indices if isinstance(indices, np.ndarray) else list(indices), dtype=np.int64).reshape(-1)
        if idx.size == 0:
            schema = pa.schema([self.schema.field(c) for c in read] if self.schema is not None else [])
            return self.to_numpy(_empty_batch(schema), cols)
        bad = (idx < -self._len) | (idx >= self._len)
        if bad.any():
            raise IndexError(f"index {int(idx[bad][0])} is out of range for {self._len} rows")
        idx = np.where(idx < 0, idx + self._len, idx)
        starts, _, _ = self._rg_table()
        group = np.searchsorted(starts, idx, side="right") - 1
        local = idx - starts[group]
        uniq, inverse = np.unique(group, return_inverse=True)
        parts = [self._rg_arrays(int(g), read) for g in uniq]
        picks = [np.flatnonzero(inverse == j) for j in range(len(parts))]
        raw: Batch = {}
        for name in read:
            first = parts[0][name]
            if isinstance(first, np.ndarray):
                if len(parts) == 1:
                    raw[name] = first[local]
                else:
                    out = np.empty((len(idx), *first.shape[1:]), dtype=first.dtype)
                    for part, pick in zip(parts, picks, strict=True):
                        out[pick] = part[name][local[pick]]
                    raw[name] = out
            else:
                values: list[Any] = [None] * len(idx)
                for part, pick in zip(parts, picks, strict=True):
                    col = part[name]
                    for pos in pick.tolist():
                        v = col[local[pos]]
                        values[pos] = v.copy() if isinstance(v, np.ndarray) else v
                raw[name] = values
        return self._finish(raw, cols)

    def __getitem__(self, key: int | slice | Sequence[int] | np.ndarray) -> Batch:
        """``ds[i]`` → one row; ``ds[a:b]`` or ``ds[[i, j, ...]]`` → a batch."""
        if isinstance(key, slice):
            return self.take(np.arange(self._len)[key])
        if isinstance(key, (int, np.integer)):
            return next(_rows(self.take([int(key)])))
        return self.take(key)

    def column(self, name: str) -> np.ndarray | list[Any]:
        """One column over the whole dataset, read on its own (cheap for scalar columns like ``n_tokens``)."""
        self._check_columns([name])
        parts = [self.to_numpy(self._file(k).read(columns=[name], use_threads=True), [name])[name]
                 for k in range(len(self.shards))]
        if not parts:
            return np.zeros(0)
        if isinstance(parts[0], np.ndarray):
            return np.concatenate(parts)
        return [v for p in parts for v in p]

    # -- epochs for distributed / multi-worker training ------------------------------------------------------
    def epoch_plan(
        self,
        *,
        epoch: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        worker: int = 0,
        num_workers: int = 1,
        even: bool = False,
    ) -> list[tuple[int, int, int]]:
        """The row ranges one (rank, worker) reads in an epoch: ``[(row_group, local_start, local_stop), ...]``.

        The row groups are put in one order (a permutation seeded by ``seed`` and ``epoch`` when shuffling),
        the rows they hold in that order form one sequence, and that sequence is cut into ``world_size``
        contiguous parts (sizes differ by at most one row), each cut again into ``num_workers`` parts. So every
        row is read by exactly one (rank, worker) per epoch, and reads stay contiguous within row groups.

        With ``even``, every rank gets exactly ``len // world_size`` rows (the last ``len % world_size`` rows of
        the epoch's order are skipped in that epoch), so ranks with the same ``num_workers`` and batch size run
        the same number of steps: distributed training does not wait on a rank with one batch more.
        """
        if world_size < 1 or not 0 <= rank < world_size:
            raise UsageError(f"rank must be in [0, world_size), got rank {rank} and world_size {world_size}")
        if num_workers < 1 or not 0 <= worker < num_workers:
            raise UsageError(f"worker must be in [0, num_workers), got {worker} of {num_workers}")
        starts, _, _ = self._rg_table()
        sizes = np.diff(starts)
        order = np.arange(len(sizes))
        if shuffle:
            order = np.random.default_rng([seed, epoch]).permutation(len(sizes))
        n = int(sizes.sum())
        if even:
            lo, hi = n // world_size * rank, n // world_size * (rank + 1)
        else:
            lo, hi = n * rank // world_size, n * (rank + 1) // world_size
        lo, hi = lo + (hi - lo) * worker // num_workers, lo + (hi - lo) * (worker + 1) // num_workers
        plan: list[tuple[int, int, int]] = []
        pos = 0
        for g in order:
            size = int(sizes[g])
            a, b = max(lo, pos), min(hi, pos + size)
            if a < b:
                plan.append((int(g), a - pos, b - pos))
            pos += size
            if pos >= hi:
                break
        return plan

    def iter_plan(
        self,
        plan: Sequence[tuple[int, int, int]],
        batch_size: int,
        *,
        shuffle_rng: np.random.Generator | None = None,
        window: int = 4,
        columns: Sequence[str] | None = None,
        drop_last: bool = False,
    ) -> Iterator[Batch]:
        """Batches of the rows of an :meth:`epoch_plan`, shuffled within windows of ``window`` row-group ranges.

        With ``shuffle_rng`` the rows of each window (a few row groups read together, at most ``window`` × ~32
        MB of pixels in memory) are permuted before batching; without it they come in plan order.
        """
        if batch_size < 1:
            raise UsageError(f"batch size must be at least 1, got {batch_size}")
        cols = self._check_columns(columns) if columns is not None else self.columns
        read = self._read_columns(cols)

        def windows() -> Iterator[Any]:
            import pyarrow as pa

            step = max(1, window) if shuffle_rng is not None else 1
            for w in range(0, len(plan), step):
                parts = [self._read_rg(g, read).slice(a, b - a) for g, a, b in plan[w:w + step]]
                table = parts[0] if len(parts) == 1 else pa.concat_tables(parts)
                if shuffle_rng is not None:
                    table = table.take(pa.array(shuffle_rng.permutation(table.num_rows)))
                yield from table.combine_chunks().to_batches(max_chunksize=batch_size)

        for rb in _rebatch(windows(), batch_size, drop_last):
            yield self.to_numpy(rb, cols)

    # -- masks and PyTorch ------------------------------------------------------------------------------------
    def patch_mask(self, batch: Batch, patch_size: int | tuple[int, int], *, rule: str = "any") -> np.ndarray:
        """:func:`patch_mask` of a batch's ``content_boxes`` for this dataset's image size."""
        if self.pixels is None:
            raise UsageError(f"{self.path}: patch masks need padded pixel tensors; this dataset stores "
                             f"{self.layout} images")
        if "content_boxes" not in batch:
            raise UsageError("the batch has no content_boxes column", hint="read it along with the pixels")
        return patch_mask(batch["content_boxes"], self.pixels.image_size, patch_size, rule=rule)

    def torch_iterable(self, **kwargs: Any) -> Any:
        """A :class:`mmprep.dataset.torch_data.PackedIterableDataset` over this dataset (needs torch)."""
        return _torch_module().PackedIterableDataset(self, **kwargs)

    def torch_dataset(self, **kwargs: Any) -> Any:
        """A map-style :class:`mmprep.dataset.torch_data.PackedTorchDataset` over this dataset (needs torch)."""
        return _torch_module().PackedTorchDataset(self, **kwargs)

    # -- vocabulary --------------------------------------------------------------------------------------------
    def tag_names(self, vocab: str | os.PathLike[str] | None = None) -> list[str] | None:
        """Tag names by id, from ``vocab`` or the vocabulary file recorded at pack time when reachable (see
        :meth:`find_vocab`); None when no file with the recorded sha256 is found."""
        return self.find_vocab(vocab).names

    def find_vocab(self, vocab: str | os.PathLike[str] | None = None) -> VocabLookup:
        """Find the vocabulary the tag ids refer to, and say where it was found (or where it was looked for).

        Candidates, in order; the first whose sha256 matches the metadata wins: ``vocab``; the path recorded at
        pack time, which is relative to the folder ``pack`` ran in when it is not absolute, so it is tried relative
        to the working directory, then to the dataset's folder and each folder above it; the recorded file name
        inside the dataset's folder.
        """
        from mmprep.labels.vocab import load_vocab

        meta = self.metadata.get("vocab")
        recorded = (self.index.get("config") or {}).get("vocab")
        cands: list[tuple[Path, str]] = []
        if vocab is not None:
            cands.append((Path(vocab), "the given vocabulary file"))
        if isinstance(recorded, str) and recorded:
            rp = Path(recorded)
            if rp.is_absolute():
                cands.append((rp, "the path recorded at pack time"))
            else:
                cands.append((Path.cwd() / rp, "the recorded path, relative to the working directory"))
                here = self.path.resolve()
                cands += [(d / rp, f"the recorded path, relative to {d}") for d in (here, *here.parents)]
            cands.append((self.path / rp.name, "its file name, inside the dataset's folder"))
        elif meta and meta.get("file"):
            cands.append((self.path / str(meta["file"]), "its file name, inside the dataset's folder"))
        seen: set[Path] = set()
        wrong: list[str] = []
        for c, how in cands:
            key = Path(os.path.abspath(c))
            if key in seen or not c.is_file():
                continue
            seen.add(key)
            try:
                v = load_vocab(c)
            except InputError:
                wrong.append(f"{c} (not readable as a vocabulary)")
                continue
            if meta and meta.get("sha256") and v.sha256 != meta["sha256"]:
                wrong.append(f"{c} (a different file: its sha256 differs)")
                continue
            return VocabLookup(path=c, how=f"{c} ({how})", names=list(v.names))
        if vocab is None and not recorded and not (meta and meta.get("file")):
            return VocabLookup(path=None, how="no vocabulary recorded at pack time", names=None)
        what = f"'{recorded}' (recorded at pack time)" if recorded else "the vocabulary"
        looked = "the given file, " if vocab is not None else ""
        how = (f"{what} not found: looked at {looked}the working directory, the dataset's folder and the folders "
               f"above it; pass --vocab FILE")
        if wrong:
            how += "; skipped " + ", ".join(wrong)
        return VocabLookup(path=None, how=how, names=None)


@dataclass(frozen=True)
class VocabLookup:
    """The result of :meth:`PackedDataset.find_vocab`: the file used (or None), how it was found, the names."""

    path: Path | None
    how: str
    names: list[str] | None


def _shard_entry(root: Path, k: int, s: Any, start: int) -> ShardEntry:
    """Shard entry ``k`` of the index, its fields checked (InputError naming the field and value)."""
    where = f"{root / INDEX_NAME}: shard entry {k}"
    hint = "the index is damaged; rerun `mmprep pack`, or run `mmprep verify` on the directory"
    if not isinstance(s, dict) or not isinstance(s.get("path"), str) or "rows" not in s:
        raise InputError(f"{where} lacks path or rows", hint=hint)
    for key in ("rows", "bytes"):
        if key in s and count_field(s[key]) is None:
            raise InputError(f"{where} ({s['path']}): {key} is {s[key]!r}, not a whole number", hint=hint)
    return ShardEntry(name=s["path"], path=root / s["path"], rows=s["rows"], start=start, bytes=s.get("bytes", 0),
                      sha256=str(s.get("sha256", "")))


def _torch_module() -> Any:
    try:
        import mmprep.dataset.torch_data as rt
    except ImportError as exc:
        if getattr(exc, "name", "") and not str(exc.name).startswith("torch"):
            raise
        from mmprep.errors import MissingDependencyError

        raise MissingDependencyError("torch", "embed", purpose="the PyTorch dataset") from None
    return rt


def _rows(batch: Batch) -> Iterator[Batch]:
    n = len(next(iter(batch.values()))) if batch else 0
    for i in range(n):
        yield {k: v[i] for k, v in batch.items()}


def _rebatch(source: Iterable[Any], batch_size: int, drop_last: bool) -> Iterator[Any]:
    """Record batches re-cut to exactly ``batch_size`` rows (zero-copy slices; copies only across boundaries)."""
    import pyarrow as pa

    pending: list[Any] = []
    have = 0
    for rb in source:
        rb = _to_record_batch(rb)
        while rb.num_rows:
            if not pending and rb.num_rows >= batch_size:
                yield rb.slice(0, batch_size)
                rb = rb.slice(batch_size)
                continue
            part = rb.slice(0, batch_size - have)
            rb = rb.slice(part.num_rows)
            pending.append(part)
            have += part.num_rows
            if have == batch_size:
                yield pa.concat_batches(pending)
                pending, have = [], 0
    if pending and not drop_last:
        yield pending[0] if len(pending) == 1 else pa.concat_batches(pending)

