"""The per-sample pipeline shared by every engine: a :class:`Sample` becomes a packed row or a :class:`Rejected`.

:class:`SampleProcessor` is built once per worker (it loads the tokenizer and vocabulary there) and turns a list of
manifest items into Arrow record batches of packed rows plus the rejects, in input order. It never prints and never
raises for a bad sample: per-sample failures are data.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from mmprep.errors import UsageError
from mmprep.images.decode import (
    DecodedImage,
    ImageConfig,
    ImageError,
    Normalization,
    encode_image,
    load_image,
    resolve_image_path,
    to_output,
)
from mmprep.inputs.manifest import ColumnMap
from mmprep.records import Rejected, Sample
from mmprep.text.encoder import TextConfig, TextError, inline_images

__all__ = ["ChunkResult", "PackConfig", "SampleProcessor"]

PAD_MODES = ("max", "none")
TOO_MANY = ("reject", "truncate")
UNKNOWN_TAGS = ("reject", "drop")
ON_ERROR = ("skip", "fail")
COMPRESSIONS = ("zstd", "lz4", "snappy", "none")
ENCODE_FORMATS = ("png", "jpeg", "webp", "original")


_Loaded = tuple[DecodedImage, bytes | None]  # decoded image, and the file bytes when stored as-is


@dataclass(frozen=True)
class PackConfig:
    """Everything that decides the content of a packed dataset (and nothing that does not).

    Two runs with equal configs over the same manifest produce byte-identical shards and index.
    """

    manifest: str
    out: str
    format: str | None = None
    columns: ColumnMap = field(default_factory=ColumnMap)
    image_root: str | None = None
    allow_outside_root: bool = False
    image: ImageConfig = field(default_factory=ImageConfig)
    norm: Normalization = field(default_factory=Normalization)
    limit_images: int = 4
    too_many_images: str = "reject"
    pad: str = "max"
    encode_format: str = "original"
    encode_quality: int = 95
    tokenizer: str | None = None
    text: TextConfig = field(default_factory=TextConfig)
    vocab: str | None = None
    unknown_tags: str = "reject"
    shard_size: int | None = None
    rows_per_shard: int | None = None
    row_group_rows: int | None = None
    compression: str = "zstd"
    shuffle: bool = False
    seed: int = 0
    on_error: str = "skip"
    max_reject_rate: float = 1.0

    def validate(self) -> None:
        """Raise UsageError naming the first bad value."""

        def choice(name: str, value: str, options: Sequence[str]) -> None:
            if value not in options:
                raise UsageError(f"--{name.replace('_', '-')} must be one of {', '.join(options)}, got '{value}'")

        choice("pad", self.pad, PAD_MODES)
        choice("too_many_images", self.too_many_images, TOO_MANY)
        choice("unknown_tags", self.unknown_tags, UNKNOWN_TAGS)
        choice("on_error", self.on_error, ON_ERROR)
        choice("compression", self.compression, COMPRESSIONS)
        choice("encode_format", self.encode_format, ENCODE_FORMATS)
        if self.limit_images < 1:
            raise UsageError(f"--limit-images must be at least 1, got {self.limit_images}")
        if self.image_root:  # a missing local root would reject every row
            from mmprep.runtime.storage import is_local, local_path

            if is_local(self.image_root) and not os.path.isdir(local_path(self.image_root)):
                raise UsageError(f"--image-root {self.image_root}: no such directory")
        if self.pad == "max":
            if self.image.size is None or self.image.resize_mode not in ("stretch", "center-crop", "letterbox"):
                raise UsageError(
                    f"--resize-mode {self.image.resize_mode} gives variable image sizes, which a padded layout "
                    "cannot hold",
                    hint="use stretch, center-crop or letterbox with --image-size, or --pad none",
                )
        elif self.norm.dtype != "uint8":
            raise UsageError("--pad none stores encoded images; --dtype must stay uint8")
        elif self.encode_format == "original" and self.image.resize_mode != "none":
            raise UsageError(
                f"--encode-format original stores the image files as they are: --resize-mode "
                f"{self.image.resize_mode} would be ignored",
                hint="use --encode-format png|jpeg|webp to store resized images, or --resize-mode none",
            )
        if self.shard_size is not None and self.shard_size <= 0:
            raise UsageError("--shard-size must be positive")
        if self.rows_per_shard is not None and self.rows_per_shard <= 0:
            raise UsageError("--rows-per-shard must be positive")
        if not 0.0 <= self.max_reject_rate <= 1.0:
            raise UsageError(f"--max-reject-rate must be in [0, 1], got {self.max_reject_rate}")
        if not 1 <= self.encode_quality <= 100:
            raise UsageError(f"--quality must be in 1..100, got {self.encode_quality}")
        self.image.validate()
        self.text.validate()

    @property
    def root(self) -> Path:
        """Where relative image paths are resolved: --image-root, else the manifest's folder."""
        if self.image_root:
            return Path(self.image_root)
        if self.manifest == "-":
            return Path.cwd()
        return Path(self.manifest).resolve().parent

    def slot_shape(self) -> tuple[int, ...]:
        """Shape of one image slot in the padded tensor, per the layout."""
        assert self.image.size is not None
        h, w = self.image.size
        return (3, h, w) if self.norm.layout == "CHW" else (h, w, 3)

    def pixel_bytes(self) -> int:
        """Bytes of one row's padded pixel tensor."""
        return self.limit_images * math.prod(self.slot_shape()) * np.dtype(self.norm.dtype).itemsize

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view of the settings that decide output content (paths relative where sensible)."""
        import dataclasses

        from mmprep.output import to_jsonable

        d = {f.name: to_jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        d.pop("out", None)
        d["manifest"] = "-" if self.manifest == "-" else os.path.basename(self.manifest)
        d.pop("image_root", None)
        return d


@dataclass
class ChunkResult:
    """What a worker reports for one chunk (one shard)."""

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


class SampleProcessor:
    """Turns manifest items into packed Arrow batches. Build one per worker process.

    Args:
        cfg: the validated pack configuration.
    """

    def __init__(self, cfg: PackConfig) -> None:
        from mmprep.pack.schema import build_schema

        self.cfg = cfg
        self.root = cfg.root.resolve()
        self.store: Any = None  # a storage.ImageStore when the images live on remote storage
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
                                   vocab=self.vocab)
        self.slot_shape = cfg.slot_shape() if cfg.pad == "max" else None

    # -- per-sample steps ---------------------------------------------------------------------------------
    def _tags(self, s: Sample, res: ChunkResult) -> tuple[list[int] | list[str], Rejected | None]:
        if self.vocab is None:
            return [str(t) for t in s.tags], None
        ids: list[int] = []
        size = self.vocab.size
        for t in s.tags:
            i = t if isinstance(t, int) and 0 <= t < size else (self.vocab.lookup(t) if isinstance(t, str) else None)
            if i is None:
                if self.cfg.unknown_tags == "drop":
                    res.tags_dropped += 1
                    continue
                what = f"id {t} is outside the vocabulary (size {size})" if isinstance(t, int) else f"'{t}'"
                return [], Rejected(s.line, s.id, "labels", "unknown_tag",
                                    f"{s.source}:{s.line}: tag {what} is not in {self.vocab.path}")
            ids.append(i)
        return ids, None

    def _text(self, s: Sample, n_images: int) -> tuple[str, Rejected | None]:
        if self.encoder is not None:
            try:
                return self.encoder.render(s.text, sample_id=s.id, image_count=n_images), None
            except TextError as exc:
                return "", Rejected(s.line, s.id, "text", exc.reason, f"{s.source}:{s.line}: {exc.detail}")
        if s.text is None:
            return "", None
        return (s.text if isinstance(s.text, str) else json.dumps(s.text, ensure_ascii=False)), None

    def _images(self, s: Sample, refs: Sequence[str]) -> tuple[list[_Loaded], Rejected | None]:
        out: list[_Loaded] = []
        keep_bytes = self.cfg.pad == "none" and self.cfg.encode_format == "original"
        for k, ref in enumerate(refs):
            try:
                if self.store is not None:
                    img, data = self.store.load(ref, self.cfg.image)
                    out.append((img, data if keep_bytes else None))
                    continue
                path = resolve_image_path(ref, self.root, self.cfg.allow_outside_root)
                if keep_bytes:
                    data = _read_bytes(path)
                    img = load_image(data, self.cfg.image)
                    out.append((img, data))
                else:
                    out.append((load_image(path, self.cfg.image), None))
            except ImageError as exc:
                return [], Rejected(s.line, s.id, "image", exc.reason,
                                    f"{s.source}:{s.line}: image {k + 1} '{ref}': {exc.detail}")
        return out, None

    # -- chunks -------------------------------------------------------------------------------------------
    def process_chunk(
        self, index: int, items: Sequence[Sample | Rejected], *, batch_rows: int
    ) -> Iterator[tuple[Any, ChunkResult]]:
        """Process a chunk's items in input order; yields ``(record_batch, result_so_far)`` per row group.

        The last yield carries the complete :class:`ChunkResult`; batches may be None when a group had no rows.
        """
        import pyarrow as pa

        res = ChunkResult(index=index)
        pending: list[dict[str, Any]] = []

        def flush() -> Any:
            batch = self._to_batch(pending, res)
            pending.clear()
            return batch

        for item in items:
            if isinstance(item, Rejected):
                res.rejected.append(item)
                continue
            try:
                row, rej = self._process(item, res)
            except MemoryError:
                raise
            except Exception as exc:  # one odd row must never take the run (and every other row) down
                if os.environ.get("MMPREP_DEBUG"):
                    raise
                row, rej = {}, Rejected(item.line, item.id, "internal", "unexpected_error",
                                        f"{item.source}:{item.line}: {type(exc).__name__}: {exc} (a bug in mmprep: "
                                        "please report it with this row)")
            if rej is not None:
                res.rejected.append(rej)
                continue
            pending.append(row)
            if len(pending) >= batch_rows:
                yield flush(), res
        if pending:
            yield flush(), res
        else:
            yield pa.RecordBatch.from_pylist([], schema=self.schema), res

    def _process(self, s: Sample, res: ChunkResult) -> tuple[dict[str, Any], Rejected | None]:
        cfg = self.cfg
        # Images come from the images column, else from typed image parts inside the conversation (LLaMA-Factory v1).
        refs = list(s.images) or inline_images(s.text)
        if not refs:
            return {}, Rejected(s.line, s.id, "manifest", "no_images", f"{s.source}:{s.line}: the sample has no images")
        dropped = 0
        if len(refs) > cfg.limit_images:
            if cfg.too_many_images == "reject":
                return {}, Rejected(s.line, s.id, "manifest", "too_many_images",
                                    f"{s.source}:{s.line}: {len(refs)} images, --limit-images is {cfg.limit_images}")
            dropped = len(refs) - cfg.limit_images
            refs = refs[: cfg.limit_images]
        tags, rej = self._tags(s, res)
        if rej is not None:
            return {}, rej
        # A conversation holds one placeholder per original image: it is checked against that count, then the
        # placeholders of the dropped images are removed, so text and image slots stay paired.
        text, rej = self._text(s, len(refs) + dropped)
        if rej is not None:
            return {}, rej
        if dropped and self.encoder is not None:
            text = _keep_placeholders(text, cfg.text.image_placeholder, len(refs))
        images, rej = self._images(s, refs)
        if rej is not None:
            return {}, rej
        res.images_dropped += dropped
        res.images_written += len(images)
        res.image_count_histogram[len(images)] += 1
        res.rows += 1
        res.first_line = s.line if res.first_line is None else res.first_line
        res.last_line = s.line
        return {"id": s.id, "line": s.line, "images": images, "refs": refs, "text": text, "tags": tags}, None

    def _to_batch(self, rows: list[dict[str, Any]], res: ChunkResult) -> Any:
        import pyarrow as pa

        cfg = self.cfg
        n = len(rows)
        cols: dict[str, Any] = {
            "id": pa.array([r["id"] for r in rows], pa.string()),
            "line": pa.array([r["line"] for r in rows], pa.int64()),
            "image_count": pa.array([len(r["images"]) for r in rows], pa.int32()),
        }
        if cfg.pad == "max":
            limit = cfg.limit_images
            shape = self.slot_shape
            assert shape is not None
            dtype = np.dtype(cfg.norm.dtype)
            pixels = np.zeros((n, limit, *shape), dtype=dtype)
            mask = np.zeros((n, limit), dtype=bool)
            sizes = np.zeros((n, limit, 2), dtype=np.int32)
            boxes = np.zeros((n, limit, 4), dtype=np.int32)
            for i, r in enumerate(rows):
                for k, (img, _) in enumerate(r["images"]):
                    to_output(img.array, cfg.norm, out=pixels[i, k])
                    mask[i, k] = True
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
                for (img, data), ref in zip(r["images"], r["refs"], strict=True):
                    if data is None:
                        data = encode_image(img.array, cfg.encode_format, cfg.encode_quality)
                    entry.append({"bytes": data, "path": ref})
                structs.append(entry)
                sizes_l.append([list(img.original_size) for img, _ in r["images"]])
            cols["images"] = pa.array(structs, self.schema.field("images").type)
            cols["image_sizes"] = pa.array(sizes_l, self.schema.field("image_sizes").type)
        if self.encoder is not None:
            tb = self.encoder.encode_batch([r["text"] for r in rows])
            length = cfg.text.max_length
            cols["input_ids"] = _fixed_list(np.asarray(tb.input_ids).reshape(-1), length, pa.int32())
            cols["attention_mask"] = _fixed_list(np.asarray(tb.attention_mask).reshape(-1), length, pa.int8())
            cols["n_tokens"] = _from_numpy(np.asarray(tb.n_tokens), pa.int32())
            cols["truncated"] = _from_numpy(np.asarray(tb.truncated), pa.bool_())
            res.text_truncated += int(np.count_nonzero(tb.truncated))
        if self.vocab is not None:
            cols["tag_ids"] = pa.array([r["tags"] for r in rows], pa.list_(pa.int32()))
        else:
            cols["tags"] = pa.array([r["tags"] for r in rows], pa.list_(pa.string()))
        cols["text"] = pa.array([r["text"] for r in rows], pa.string())
        cols["image_paths"] = pa.array([r["refs"] for r in rows], pa.list_(pa.string()))
        return pa.RecordBatch.from_arrays([cols[f.name] for f in self.schema], schema=self.schema)


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


def _read_bytes(path: Path) -> bytes:
    """A regular file's bytes. Anything else is refused before reading: a FIFO would block forever and a device
    such as ``/dev/zero`` would never end (the file is opened non-blocking and checked with ``fstat``)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except (FileNotFoundError, NotADirectoryError):
        raise ImageError("image_missing", f"no such file: {path}") from None
    except PermissionError:
        raise ImageError("image_unreadable", f"permission denied: {path}") from None
    except OSError as exc:
        raise ImageError("image_unreadable", f"{path}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise ImageError("image_not_a_file", f"is {kind}: {path}")
        if st.st_size == 0:
            raise ImageError("image_unidentified", f"empty file (0 bytes): {path}")
        os.set_blocking(fd, True)
        with open(fd, "rb", closefd=False) as f:
            return f.read()
    except OSError as exc:
        raise ImageError("image_unreadable", f"{path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


ROW_GROUP_BYTES = 32 << 20  # about this much image data per Parquet row group (the unit of random access)


def default_row_group_rows(cfg: PackConfig) -> int:
    """Rows per row group: about 32 MB of pixels for padded shards; for ``--pad none`` the value the pack
    planned from the image file sizes (256 when nothing planned it)."""
    if cfg.row_group_rows:
        return cfg.row_group_rows
    if cfg.pad == "max":
        return max(1, min(1024, ROW_GROUP_BYTES // max(1, cfg.pixel_bytes())))
    return 256


def with_defaults(cfg: PackConfig) -> PackConfig:
    """Fill derived defaults (padded row-group rows) so the stored config says what was used. For ``--pad none``
    the row groups are sized later, from the image files (see :func:`mmprep.pack.job.estimate_row_bytes`)."""
    if cfg.pad != "max":
        return cfg
    return replace(cfg, row_group_rows=default_row_group_rows(cfg))
