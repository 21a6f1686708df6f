"""Arrays of packed data: the pixel layout, normalisation on load, image and patch masks, multi-hot targets.

Pure numpy over the batches the reader returns (``[B, ...]`` arrays); nothing here reads files.

- :class:`PixelSpec`: how the padded pixel column is laid out (dtype, shape, layout, mean/std), from the metadata.
- :func:`normalize_pixels` / :func:`denormalize`: stored pixels to the model's floats and back to colours.
- :func:`image_mask` (``[B, limit]``) and :func:`patch_mask` (``[B, limit, ceil(H/p), ceil(W/p)]``) from the image
  counts and the stored content boxes, vectorised over the batch.
- :func:`multi_hot`: ``[B, V]`` targets from the ragged ``tag_ids``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmprep.errors import UsageError

__all__ = [
    "NORMALIZE_DTYPES",
    "PATCH_RULES",
    "Batch",
    "PixelSpec",
    "denormalize",
    "image_mask",
    "multi_hot",
    "normalize_pixels",
    "patch_mask",
]

#: A batch: column name → ``[B, ...]`` numpy array, or a list of per-row values (strings, ragged columns).
Batch = dict[str, Any]
NORMALIZE_DTYPES = ("float32", "float16")
PATCH_RULES = ("any", "all")


@dataclass(frozen=True)
class PixelSpec:
    """How the padded pixel column is laid out (from the ``pixels`` metadata)."""

    column: str
    dtype: np.dtype
    shape: tuple[int, ...]
    layout: str
    normalized: bool
    mean: tuple[float, ...]  # per channel, in [0, 1] (three values in a valid pack)
    std: tuple[float, ...]

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
            mean=tuple(float(v) for v in px.get("mean", (0.0, 0.0, 0.0))),
            std=tuple(float(v) for v in px.get("std", (1.0, 1.0, 1.0))),
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
