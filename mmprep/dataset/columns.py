"""Arrow → numpy: the reader's column conversion, re-batching and image decoding.

How each stored column comes back: the padded pixel column as one ``np.frombuffer`` view ``[B, *shape]`` in the
stored dtype (no copy); fixed-size lists as ``[B, ...]`` arrays; variable-length lists as a list of per-row numpy
arrays (or Python values for strings and structs); strings and binaries as lists; scalars as arrays.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from mmprep.dataset.arrays import Batch, PixelSpec
from mmprep.errors import InputError

__all__ = ["column_to_numpy", "decode_images", "empty_batch", "rebatch", "rows_of", "to_record_batch"]


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
    inner = vt
    while pa.types.is_fixed_size_list(inner):
        inner = inner.value_type
    if not (pa.types.is_integer(inner) or pa.types.is_floating(inner) or pa.types.is_boolean(inner)):
        return arr.to_pylist()  # strings, structs, nested lists...: Python values
    offsets = np.asarray(arr.offsets.to_numpy(zero_copy_only=False), dtype=np.int64)
    offsets -= offsets[0]
    values = arr.flatten()
    dims: list[int] = []
    while pa.types.is_fixed_size_list(values.type):
        dims.append(values.type.list_size)
        values = values.flatten()
    flat = _primitive(values).reshape(-1, *dims) if dims else _primitive(values)
    return np.split(flat, offsets[1:-1]) if len(arr) else []


def column_to_numpy(name: str, arr: Any, spec: PixelSpec | None, where: str) -> Any:
    """One Arrow column (``arr``, a single chunk) as the reader returns it; ``where`` names the dataset in errors."""
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
    if pa.types.is_nested(t) or pa.types.is_large_binary(t) or pa.types.is_dictionary(t):
        return arr.to_pylist()  # a carried input column of objects (or maps, large binaries...)
    return _primitive(arr)


def decode_images(rows: list[list[dict[str, Any]]], ids: list[str] | None, decode: Any) -> list[list[np.ndarray]]:
    """Encoded ``images`` (per row a list of ``{bytes, path}``) as uint8 ``(H, W, 3)`` arrays.

    ``decode`` is True (decode as stored) or an :class:`mmprep.images.decode.ImageConfig` (also resize).

    Raises:
        InputError: an image does not decode (naming the sample and the image).
    """
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


def empty_batch(schema: Any) -> Any:
    """A record batch of no rows with ``schema``."""
    import pyarrow as pa

    return pa.RecordBatch.from_pylist([], schema=schema)


def to_record_batch(table: Any) -> Any:
    """An Arrow table (or record batch) as one record batch."""
    import pyarrow as pa

    if isinstance(table, pa.RecordBatch):
        return table
    batches = table.combine_chunks().to_batches()
    if not batches:
        return empty_batch(table.schema)
    return batches[0] if len(batches) == 1 else pa.concat_batches(batches)


def rows_of(batch: Batch) -> Iterator[Batch]:
    """The rows of a batch, each a dict of the same columns without the batch dimension."""
    n = len(next(iter(batch.values()))) if batch else 0
    for i in range(n):
        yield {k: v[i] for k, v in batch.items()}


def rebatch(source: Iterable[Any], batch_size: int, drop_last: bool) -> Iterator[Any]:
    """Record batches re-cut to exactly ``batch_size`` rows (zero-copy slices; copies only across boundaries)."""
    import pyarrow as pa

    pending: list[Any] = []
    have = 0
    for rb in source:
        rb = to_record_batch(rb)
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
