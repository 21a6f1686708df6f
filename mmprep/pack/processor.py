"""The per-sample pipeline shared by every engine: a :class:`Sample` becomes a packed row or a :class:`Rejected`.

:class:`SampleProcessor` is built once in the parent (it loads the tokenizer and vocabulary; a bad one fails the
run before any work) and reaches every worker pickled. It turns a chunk of manifest items into Arrow record batches
of packed rows plus the rejects, in input order. It never prints and never raises for a bad sample: each step
raises :class:`~mmprep.records.RowReject`, caught in one place, so per-sample failures are data.
"""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from mmprep.images.decode import ImageError, encode_image, to_output
from mmprep.images.sources import ImageSource, LoadedImage
from mmprep.pack.columns import ColumnPlan
from mmprep.pack.config import PackConfig
from mmprep.records import EmbeddedImage, ImageRef, Rejected, RowReject, Sample, describe_image_ref
from mmprep.text.config import TextError
from mmprep.text.render import check_text_size, inline_images

if TYPE_CHECKING:
    from mmprep.images.gpu import GpuImage, GpuImages

__all__ = ["ChunkResult", "PackedRow", "SampleProcessor"]


@dataclass
class ChunkResult:
    """What processing one chunk produced so far (its rows go to the chunk's shard)."""

    index: int
    rows: int = 0
    rejected: list[Rejected] = field(default_factory=list)
    image_count_histogram: Counter[int] = field(default_factory=Counter)
    images_written: int = 0
    images_dropped: int = 0  # by --too-many-images truncate
    tags_dropped: int = 0  # by --unknown-tags drop
    text_truncated: int = 0
    first_line: int | None = None
    last_line: int | None = None


@dataclass(frozen=True)
class PackedRow:
    """One accepted sample, ready for its row group."""

    id: str
    line: int
    images: list[LoadedImage | GpuImage]  # GpuImage: decoded with its row group on the device (--device cuda)
    refs: list[ImageRef]
    text: str
    tags: list[int] | list[str]
    extra: dict[str, Any] = field(default_factory=dict)  # the target's and the carried columns' values
    dropped: int = 0  # images dropped by --too-many-images truncate


class SampleProcessor:
    """Turns manifest items into packed Arrow batches.

    Args:
        cfg: the validated pack configuration.
        images: where image references are read from.
        row_group_rows: rows per Parquet row group (the plan decides it).
        columns: the extra columns (the target's, the carried input columns) the plan decided.
        gpu: the device image path (default with ``cfg.device == "cuda"``: :class:`mmprep.images.gpu.GpuImages` on
            CUDA). Its JPEGs are decoded a row group at a time, after the row's other steps; an image it cannot
            decode goes through the CPU path, and a row whose image fails there too is rejected then.
    """

    def __init__(self, cfg: PackConfig, images: ImageSource, row_group_rows: int,
                 columns: ColumnPlan | None = None, gpu: GpuImages | None = None) -> None:
        from mmprep.pack.schema import build_schema

        self.cfg = cfg
        self.columns = columns or ColumnPlan(target=cfg.target)
        self.images = images
        self.row_group_rows = row_group_rows
        self.encoder = None
        if cfg.tokenizer:
            from mmprep.text.encoder import TextEncoder

            self.encoder = TextEncoder(cfg.tokenizer, cfg.text)
        self.vocab = None
        if cfg.vocab:
            from mmprep.labels.vocab import load_vocab

            self.vocab = load_vocab(cfg.vocab)
        self.schema = build_schema(cfg, pad_token_id=self.encoder.pad_token_id if self.encoder else None,
                                   tokenizer_name=self.encoder.name_or_path if self.encoder else None,
                                   vocab=self.vocab, columns=self.columns)
        self.slot_shape = cfg.slot_shape() if cfg.pad == "max" else None
        if gpu is None and cfg.device == "cuda":
            from mmprep.images.gpu import GpuImages

            gpu = GpuImages(cfg.image, cfg.norm, device="cuda")
        self.gpu = gpu

    # -- per-sample steps (each raises RowReject) ---------------------------------------------------------
    def _tags(self, s: Sample, res: ChunkResult) -> list[int] | list[str]:
        if self.vocab is None:
            return [str(t) for t in s.tags]
        ids: list[int] = []
        size = self.vocab.size
        for t in s.tags:
            i = t if isinstance(t, int) and 0 <= t < size else (self.vocab.lookup(t) if isinstance(t, str) else None)
            if i is None:
                if self.cfg.unknown_tags == "drop":
                    res.tags_dropped += 1
                    continue
                if isinstance(t, int):
                    raise RowReject("labels", "unknown_tag", f"tag id {t} is outside the vocabulary {self.vocab.path} "
                                    f"(ids 0 to {size - 1})")
                raise RowReject("labels", "unknown_tag", f"tag '{t}' is not in the vocabulary {self.vocab.path}")
            ids.append(i)
        return ids

    def _text(self, s: Sample, n_images: int) -> str:
        if self.encoder is not None:
            try:
                return self.encoder.render(s.text, sample_id=s.id, image_count=n_images)
            except TextError as exc:
                raise RowReject("text", exc.reason, exc.detail) from None
        if s.text is None:
            return ""
        text = s.text if isinstance(s.text, str) else json.dumps(s.text, ensure_ascii=False)
        try:  # stored as it is: still bounded by --max-text-bytes
            check_text_size(text, self.cfg.text)
        except TextError as exc:
            raise RowReject("text", exc.reason, exc.detail) from None
        return text

    def _images(self, refs: Sequence[ImageRef]) -> list[LoadedImage | GpuImage]:
        keep_bytes = self.cfg.pad == "none" and self.cfg.encode_format == "original"
        out: list[LoadedImage | GpuImage] = []
        for k, ref in enumerate(refs):
            if self.gpu is not None:  # a JPEG the device decodes later, with its row group
                routed = self.gpu.prepare(self.images, ref)
                if routed is not None:
                    out.append(routed)
                    continue
            out.append(self._load(k, ref, keep_bytes))
        return out

    def _load(self, k: int, ref: ImageRef, keep_bytes: bool = False) -> LoadedImage:
        """The CPU path for one image (RowReject naming the image when it cannot be used)."""
        try:
            return self.images.load(ref, self.cfg.image, keep_bytes=keep_bytes)
        except ImageError as exc:
            raise RowReject("image", exc.reason, f"image {k + 1} {describe_image_ref(ref)}: {exc.detail}") from None

    # -- chunks -------------------------------------------------------------------------------------------
    def process_chunk(self, index: int, items: Sequence[Sample | Rejected],
                      on_row: Callable[[int], None] | None = None, *,
                      reuse_buffer: bool = False) -> Iterator[tuple[Any, ChunkResult]]:
        """Process a chunk's items in input order; yields ``(record_batch, result_so_far)`` per row group.

        The last yield carries the complete :class:`ChunkResult`; batches may be None when a group had no rows.
        ``on_row(images)`` is called as each item is done (0 images for a rejected one), for progress.
        With ``reuse_buffer`` the padded pixels of every batch live in one buffer kept per worker (faster: no fresh
        pages per row group), so a batch is only valid until the next one is made: for a caller that writes each
        batch before asking for the next, as the shard writer does. Without it every batch owns its pixels.
        """
        import pyarrow as pa

        res = ChunkResult(index=index)
        pending: list[PackedRow] = []
        samples: list[Sample] = []  # of the pending rows (the device path may still reject them)

        def flush() -> Any:
            rows, pixels = list(pending), None
            pending.clear()
            if self.gpu is not None:
                rows, pixels = self._device_images(rows, samples, res)
                samples.clear()
                if not rows:
                    return None
            return self._to_batch(rows, res, pixels, reuse_buffer=reuse_buffer)

        for item in items:
            if isinstance(item, Rejected):
                res.rejected.append(item)
                if on_row is not None:
                    on_row(0)
                continue
            try:
                row = self._process(item, res)
            except RowReject as rej:
                res.rejected.append(rej.for_sample(item))
                if on_row is not None:
                    on_row(0)
                continue
            except MemoryError:
                raise
            except Exception as exc:  # one odd row must never take the run (and every other row) down
                if os.environ.get("MMPREP_DEBUG"):
                    raise
                res.rejected.append(Rejected(item.line, item.id, "internal", "unexpected_error",
                                             f"{item.source}:{item.line}: {type(exc).__name__}: {exc} (a bug in "
                                             "mmprep: please report it with this row)"))
                if on_row is not None:
                    on_row(0)
                continue
            if self.gpu is None:
                self._commit(row, res)
            else:
                samples.append(item)
            pending.append(row)
            if on_row is not None:
                on_row(len(row.images))
            if len(pending) >= self.row_group_rows:
                yield flush(), res
        batch = flush() if pending else None
        if self.gpu is not None:
            res.rejected.sort(key=lambda r: r.line)  # rows the device path rejected came after later ones
        yield (batch if batch is not None else pa.RecordBatch.from_pylist([], schema=self.schema)), res

    def _process(self, s: Sample, res: ChunkResult) -> PackedRow:
        cfg = self.cfg
        # Images come from the images column, else from typed image parts inside the conversation (LLaMA-Factory v1).
        refs: list[ImageRef] = list(s.images) or list(inline_images(s.text))
        if not refs:
            raise RowReject("manifest", "no_images", "the sample has no images")
        dropped = 0
        if len(refs) > cfg.limit_images:
            if cfg.too_many_images == "reject":
                raise RowReject("manifest", "too_many_images",
                                f"{len(refs)} images, --limit-images is {cfg.limit_images}")
            dropped = len(refs) - cfg.limit_images
            refs = refs[: cfg.limit_images]
        tags = self._tags(s, res)
        # A conversation holds one placeholder per original image: it is checked against that count, then the
        # placeholders of the dropped images are removed, so text and image slots stay paired.
        text = self._text(s, len(refs) + dropped)
        if dropped and self.encoder is not None:
            text = _keep_placeholders(text, cfg.text.image_placeholder, len(refs))
        # -- trainer-ready output (issue 16): the target's and the carried columns (RowReject when one does not fit)
        extra = self.columns.values(s, kept=len(refs), original=len(refs) + dropped,
                                    placeholder=cfg.text.image_placeholder)
        # ---------------------------------------------------------------------------------------------------------
        images = self._images(refs)
        return PackedRow(s.id, s.line, images, refs, text, tags, extra, dropped)

    @staticmethod
    def _commit(row: PackedRow, res: ChunkResult) -> None:
        """Count an accepted row."""
        res.images_dropped += row.dropped
        res.images_written += len(row.images)
        res.image_count_histogram[len(row.images)] += 1
        res.rows += 1
        res.first_line = row.line if res.first_line is None else res.first_line
        res.last_line = row.line

    def _device_images(self, rows: list[PackedRow], samples: list[Sample], res: ChunkResult
                       ) -> tuple[list[PackedRow], np.ndarray | None]:
        """Decode a row group's device images (one copy back); the CPU path takes each one the device refused, and
        a row whose image fails there too is rejected. Returns the accepted rows (counted) and their pixels."""
        from mmprep.images.gpu import GpuImage

        assert self.gpu is not None
        limit = self.cfg.limit_images
        jobs = [(i * limit + k, img) for i, row in enumerate(rows) for k, img in enumerate(row.images)
                if isinstance(img, GpuImage)]
        if not jobs:  # no device image in this row group
            for row in rows:
                self._commit(row, res)
            return rows, None
        pixels, failed = self.gpu.render(jobs, len(rows), limit)
        kept: list[PackedRow] = []
        keep_index: list[int] = []
        for i, (row, sample) in enumerate(zip(rows, samples, strict=True)):
            if any(i * limit + k in failed for k in range(len(row.images))):
                try:
                    images = [self._load(k, row.refs[k]) if i * limit + k in failed else img
                              for k, img in enumerate(row.images)]
                except RowReject as rej:
                    res.rejected.append(rej.for_sample(sample))
                    continue
                row = replace(row, images=images)
            self._commit(row, res)
            kept.append(row)
            keep_index.append(i)
        if len(kept) != len(rows):
            pixels = pixels[keep_index]
        return kept, pixels

    def _to_batch(self, rows: list[PackedRow], res: ChunkResult, pixels: np.ndarray | None = None, *,
                  reuse_buffer: bool = False) -> Any:
        import pyarrow as pa

        cfg = self.cfg
        n = len(rows)
        cols: dict[str, Any] = {
            "id": _strings([r.id for r in rows]),
            "line": _from_numpy(np.array([r.line for r in rows], dtype=np.int64), pa.int64()),
            "image_count": _from_numpy(np.array([len(r.images) for r in rows], dtype=np.int32), pa.int32()),
        }
        if cfg.pad == "max":
            limit = cfg.limit_images
            shape = self.slot_shape
            assert shape is not None
            dtype = np.dtype(cfg.norm.dtype)
            mask = np.zeros((n, limit), dtype=bool)
            for i, r in enumerate(rows):
                mask[i, : len(r.images)] = True
            if pixels is None and reuse_buffer:  # (the device path hands its pixels in, already in place)
                pixels = _PIXELS.take((max(n, self.row_group_rows), limit, *shape), dtype, mask)
            elif pixels is None:
                pixels = np.zeros((n, limit, *shape), dtype=dtype)
            sizes = np.zeros((n, limit, 2), dtype=np.int32)
            boxes = np.zeros((n, limit, 4), dtype=np.int32)
            for i, r in enumerate(rows):
                for k, loaded in enumerate(r.images):
                    img = loaded if not isinstance(loaded, LoadedImage) else loaded.image
                    if isinstance(loaded, LoadedImage):  # device images are already in `pixels`
                        to_output(loaded.image.array, cfg.norm, out=pixels[i, k])
                    sizes[i, k] = img.original_size
                    boxes[i, k] = img.content_box
            width = pixels[0].nbytes if n else cfg.pixel_bytes()
            cols["image_mask"] = _fixed_list(mask.reshape(-1), limit, pa.bool_())
            cols["image_sizes"] = _fixed_list(_fixed_list(sizes.reshape(-1), 2, pa.int32()), limit)
            cols["content_boxes"] = _fixed_list(_fixed_list(boxes.reshape(-1), 4, pa.int32()), limit)
            cols["pixel_values"] = pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(width), n, [None, pa.py_buffer(pixels)]  # a view: the buffer keeps the array alive
            )
        else:
            structs = []
            sizes_l = []
            for r in rows:
                entry = []
                for loaded, ref in zip(r.images, r.refs, strict=True):
                    assert isinstance(loaded, LoadedImage)  # the device path is for padded slots only
                    data = loaded.data
                    if data is None:
                        data = encode_image(loaded.image.array, cfg.encode_format, cfg.encode_quality)
                    entry.append({"bytes": data, "path": _ref_path(ref)})
                structs.append(entry)
                sizes_l.append([list(loaded.original_size if not isinstance(loaded, LoadedImage)
                                     else loaded.image.original_size) for loaded in r.images])
            cols["images"] = pa.array(structs, self.schema.field("images").type)
            cols["image_sizes"] = pa.array(sizes_l, self.schema.field("image_sizes").type)
        if self.encoder is not None:
            tb = self.encoder.encode_batch([r.text for r in rows])
            length = cfg.text.max_length
            cols["input_ids"] = _fixed_list(np.asarray(tb.input_ids).reshape(-1), length, pa.int32())
            cols["attention_mask"] = _fixed_list(np.asarray(tb.attention_mask).reshape(-1), length, pa.int8())
            cols["n_tokens"] = _from_numpy(np.asarray(tb.n_tokens), pa.int32())
            cols["truncated"] = _from_numpy(np.asarray(tb.truncated), pa.bool_())
            res.text_truncated += int(np.count_nonzero(tb.truncated))
        if self.vocab is not None:
            cols["tag_ids"] = _int32_lists([r.tags for r in rows])  # type: ignore[misc]
        else:
            cols["tags"] = _string_lists([r.tags for r in rows])  # type: ignore[misc]
        cols["text"] = _strings([r.text for r in rows])
        paths = [[_ref_path(ref) for ref in r.refs] for r in rows]
        if any(p is None for row in paths for p in row):  # embedded images stored without a name
            cols["image_paths"] = pa.array(paths, pa.list_(pa.string()))
        else:
            cols["image_paths"] = _string_lists(paths)  # type: ignore[arg-type]
        cols.update(self.columns.arrays([r.extra for r in rows]))  # trainer-ready output (issue 16)
        return pa.RecordBatch.from_arrays([cols[f.name] for f in self.schema], schema=self.schema)


def _ref_path(ref: ImageRef) -> str | None:
    """The path stored for an image: the manifest's path, or the one stored beside embedded bytes (may be None)."""
    return ref.path if isinstance(ref, EmbeddedImage) else ref


class _PixelBuffer(threading.local):
    """The padded pixel tensor of a row group, allocated once per worker (thread) and reused: a fresh ``np.zeros``
    per row group costs a page fault per 4 KB as it is first written and read (~0.3 ms per 750 KB row), more
    than filling it. Only the slots that held an image last time and are padding now are zeroed again.

    The array handed out is overwritten by the next :meth:`take`: a batch built on it must be written before the
    next one is made (``process_chunk`` yields each batch to the writer before it makes the next).
    """

    def __init__(self) -> None:
        self.buf: np.ndarray | None = None
        self.dirty: np.ndarray | None = None

    def take(self, shape: tuple[int, ...], dtype: np.dtype[Any], mask: np.ndarray) -> np.ndarray:
        """Zeros for ``mask.shape[0]`` rows of ``shape[1:]`` except where ``mask`` is set (about to be filled)."""
        if self.buf is None or self.dirty is None or self.buf.shape != shape or self.buf.dtype != dtype:
            self.buf = np.zeros(shape, dtype=dtype)
            self.dirty = np.zeros(shape[:2], dtype=bool)
        n = mask.shape[0]
        view = self.buf[:n]
        stale = self.dirty[:n] & ~mask
        if stale.any():
            view[stale] = 0
        self.dirty[:n] = mask
        return view


_PIXELS = _PixelBuffer()


def _keep_placeholders(text: str, placeholder: str, keep: int) -> str:
    """``text`` with every occurrence of ``placeholder`` after the first ``keep`` removed."""
    parts = text.split(placeholder)
    if len(parts) <= keep + 1:
        return text
    return placeholder.join(parts[: keep + 1]) + "".join(parts[keep + 1 :])


def _fixed_list(values: Any, size: int, value_type: Any = None) -> Any:
    import pyarrow as pa

    arr = values if isinstance(values, pa.Array) else _from_numpy(values, value_type)
    return pa.FixedSizeListArray.from_arrays(arr, size)


# Arrays from Python lists are built from buffers, not with ``pa.array``: its first call imports pandas when pandas is
# installed (to check for pandas objects), ~0.2 CPU-s in every worker process.


def _offsets(lengths: list[int]) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    if out[-1] > np.iinfo(np.int32).max:
        raise ValueError(f"{out[-1]:,} bytes or values in one column of one row group: more than Arrow's 2 GiB")
    return out.astype(np.int32)


def _strings(values: Sequence[str]) -> Any:
    """A ``string`` array of ``values`` (as ``pa.array(values, pa.string())``)."""
    import pyarrow as pa

    encoded = [v.encode("utf-8") for v in values]
    offsets = _offsets([len(b) for b in encoded])
    return pa.StringArray.from_buffers(len(encoded), pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded)))


def _string_lists(values: Sequence[Sequence[str]]) -> Any:
    """A ``list<string>`` array of ``values``."""
    import pyarrow as pa

    offsets = _from_numpy(_offsets([len(v) for v in values]), pa.int32())
    return pa.ListArray.from_arrays(offsets, _strings([x for v in values for x in v]))


def _int32_lists(values: Sequence[Sequence[int]]) -> Any:
    """A ``list<int32>`` array of ``values``."""
    import pyarrow as pa

    offsets = _from_numpy(_offsets([len(v) for v in values]), pa.int32())
    flat = np.array([x for v in values for x in v], dtype=np.int32)
    return pa.ListArray.from_arrays(offsets, _from_numpy(flat, pa.int32()))


def _from_numpy(values: np.ndarray, value_type: Any) -> Any:
    """A 1-D numpy array as an Arrow array of ``value_type``, without copying numbers.

    (``pa.array(ndarray)`` would also work, but it imports pandas on first use: a fifth of a second in every
    worker.)
    """
    import pyarrow as pa

    if pa.types.is_boolean(value_type):
        bits = np.packbits(np.asarray(values, dtype=bool), bitorder="little")
        return pa.Array.from_buffers(value_type, len(values), [None, pa.py_buffer(bits)])
    arr = np.ascontiguousarray(values, dtype=value_type.to_pandas_dtype())
    return pa.Array.from_buffers(value_type, len(arr), [None, pa.py_buffer(arr)])
