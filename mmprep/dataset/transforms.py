"""Batch transforms for packed data on any torch device: normalisation, patch masks, dynamic masking.

This module imports torch (like :mod:`mmprep.dataset.torch_data`); import it only where torch is wanted. Every
function works on the tensors of a whole batch, wherever they live (CPU or CUDA), with no Python loop over
samples, images or patches; the same code runs on both devices.

- :func:`normalize`: stored ``uint8`` pixels ``[B, limit, *slot]`` to ``(pixel / 255 - mean) / std`` floats with
  the mean/std of the shard metadata (the same float32 arithmetic as :func:`mmprep.dataset.arrays.normalize_pixels`,
  so the results are bit-identical to it, and to a normalised pack); padding slots become zeros.
- :func:`image_mask` and :func:`patch_mask`: the torch versions of :mod:`mmprep.dataset.arrays`' (same rule).
- Dynamic masking, as NVIDIA DALI users build it with ``fn.erase`` but with run-time counts: per image a number of
  ``P x P`` patches (drawn per image from a seeded generator, or given as a tensor of counts and positions) is
  erased and filled with the image's mean colour (or a constant). Counts differ per image, so the patches are
  unrolled to the largest count ``K`` (``[N, K]`` anchors and an ``active = arange(K) < count`` mask) and the
  pixel mask is built from comparisons: a pixel row is inside patch ``k`` when ``y0_k <= y < y0_k + P``, a
  column likewise; the ``[N, H, W]`` mask is ``any_k(row_in[k] & col_in[k])``, computed as a batched matrix
  product of the 0/1 row and column indicators (exact: sums of at most ``K`` ones). :func:`draw_patches` draws,
  :func:`erase_mask` builds the mask, :func:`erase` fills.
- :class:`BatchTransform`: all of the above over a reader batch (a dict of tensors), usable as the ``transform=``
  of the torch datasets, inside a collate function, or in the training loop after moving the batch to the GPU.

Determinism: random numbers are always drawn **on the CPU** from a seeded ``torch.Generator`` and then moved to
the pixels' device, and everything after the draw is integer arithmetic and comparisons, so the same seed gives
the same patches and the same masks bit for bit on CPU and CUDA. Fill values are equal too for ``uint8`` pixels
(the image mean is an exact integer sum, rounded half up); for float pixels the mean is a float64 sum whose
order of additions may differ between devices, so fills agree to float rounding (about 1e-7 relative).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmprep.dataset.arrays import NORMALIZE_DTYPES, PATCH_RULES, PixelSpec
from mmprep.errors import MissingDependencyError, UsageError

try:
    import torch
except ImportError as _exc:  # torch itself missing (or broken): say how to install it; anything else re-raises
    if _exc.name and not _exc.name.startswith("torch"):
        raise
    raise MissingDependencyError("torch", "embed", purpose="the batch transforms") from None

__all__ = [
    "BatchTransform",
    "DynamicMasking",
    "PatchDraw",
    "draw_patches",
    "erase",
    "erase_mask",
    "image_mask",
    "normalize",
    "patch_mask",
    "seeded_generator",
]

Tensor = torch.Tensor
_DTYPES = {"float32": torch.float32, "float16": torch.float16}


# -- normalisation and static masks ------------------------------------------------------------------------------


def _channel_shape(layout: str) -> tuple[int, ...]:
    return (3, 1, 1) if layout == "CHW" else (3,)


def normalize(
    pixels: Tensor,
    spec: PixelSpec,
    dtype: str = "float32",
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    image_count: Tensor | None = None,
) -> Tensor:
    """Stored pixels ``[B, limit, *slot]`` (any device) as normalised floats: ``(pixel / 255 - mean) / std``.

    The torch twin of :func:`mmprep.dataset.arrays.normalize_pixels`: the same float32 multiply-then-add (then the
    cast for ``float16``), so CPU results are bit-identical to it; CUDA results are too (two separately rounded
    IEEE operations per value, no fused multiply-add). Already normalised shards are only cast.

    Args:
        pixels: a uint8 (or already normalised float) tensor in ``spec``'s layout.
        spec: the pixel layout (from the shard metadata, ``PackedDataset.pixels``).
        dtype: ``float32`` or ``float16``.
        mean: per-channel mean in [0, 1] (default: the metadata's).
        std: per-channel std in [0, 1] (default: the metadata's).
        image_count: real images per row ``[B]``: padding slots become zeros (what a normalised pack stores).
    """
    if dtype not in NORMALIZE_DTYPES:
        raise UsageError(f"normalize must be one of {', '.join(NORMALIZE_DTYPES)}, got '{dtype}'")
    target = _DTYPES[dtype]
    if spec.normalized or pixels.is_floating_point():
        return pixels.to(target)
    m = np.asarray(spec.mean if mean is None else mean, dtype=np.float64)
    s = np.asarray(spec.std if std is None else std, dtype=np.float64)
    if m.shape != (3,) or s.shape != (3,) or not (s > 0).all():
        raise UsageError(f"mean and std need three values and a positive std, got {m.tolist()} and {s.tolist()}")
    cshape = _channel_shape(spec.layout)
    scale = torch.from_numpy((1.0 / (255.0 * s)).astype(np.float32).reshape(cshape)).to(pixels.device)
    offset = torch.from_numpy((-m / s).astype(np.float32).reshape(cshape)).to(pixels.device)
    out = pixels.to(torch.float32) * scale
    out += offset
    if image_count is not None:
        keep = image_mask(image_count.to(pixels.device), pixels.shape[1])
        out = torch.where(keep.reshape(*keep.shape, *([1] * (out.dim() - 2))), out, torch.zeros((), dtype=out.dtype,
                          device=out.device))
    return out if target == torch.float32 else out.to(target)


def image_mask(image_count: Tensor, limit: int) -> Tensor:
    """``[B, limit]`` bool: True for the first ``image_count`` slots of each row (real images)."""
    counts = image_count.reshape(-1, 1)
    return torch.arange(limit, device=counts.device)[None, :] < counts


def _patch_pair(patch_size: int | tuple[int, int]) -> tuple[int, int]:
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    if int(ph) < 1 or int(pw) < 1:
        raise UsageError(f"patch size must be positive, got {patch_size}")
    return int(ph), int(pw)


def patch_mask(
    content_boxes: Tensor,
    image_size: tuple[int, int],
    patch_size: int | tuple[int, int],
    *,
    rule: str = "any",
) -> Tensor:
    """Which patches of each image slot hold real pixels: ``[..., ceil(H/ph), ceil(W/pw)]`` bool, on the boxes'
    device. The rule of :func:`mmprep.dataset.arrays.patch_mask` (``any``: at least one real pixel; ``all``: only
    real pixels), vectorised over every leading dimension.
    """
    if rule not in PATCH_RULES:
        raise UsageError(f"patch rule must be one of {', '.join(PATCH_RULES)}, got '{rule}'")
    ph, pw = _patch_pair(patch_size)
    h, w = image_size
    boxes = content_boxes.to(torch.int64)
    x0, y0, x1, y1 = (boxes[..., k, None] for k in range(4))
    rows = _axis_mask(y0, y1, h, ph, rule)
    cols = _axis_mask(x0, x1, w, pw, rule)
    return rows[..., :, None] & cols[..., None, :]


def _axis_mask(lo: Tensor, hi: Tensor, size: int, p: int, rule: str) -> Tensor:
    start = torch.arange(0, size, p, device=lo.device)
    stop = torch.clamp(start + p, max=size)
    lo = lo.clamp(0, size)
    hi = hi.clamp(0, size)
    nonempty = hi > lo
    if rule == "any":
        return (start < hi) & (stop > lo) & nonempty
    return (start >= lo) & (stop <= hi) & nonempty


# -- dynamic masking -------------------------------------------------------------------------------------------------


def seeded_generator(*seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from a tuple of integers (e.g. ``(seed, epoch, worker)``)."""
    state = np.random.SeedSequence([int(s) & 0xFFFFFFFF for s in seed]).generate_state(2, np.uint32)
    return torch.Generator(device="cpu").manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


@dataclass(frozen=True)
class PatchDraw:
    """The patches erased from ``N`` images, unrolled to the largest count ``K``.

    Attributes:
        counts: ``[N]`` int64, patches erased per image (0 for padding slots).
        anchors: ``[N, K, 2]`` int64, ``(y, x)`` of each patch's top-left pixel (only the first ``counts[i]``
            are used).
        patch_size: ``(ph, pw)`` in pixels.
    """

    counts: Tensor
    anchors: Tensor
    patch_size: tuple[int, int]

    @property
    def active(self) -> Tensor:
        """``[N, K]`` bool: ``arange(K) < counts``."""
        k = self.anchors.shape[1]
        return torch.arange(k, device=self.counts.device)[None, :] < self.counts[:, None]

    def to(self, device: torch.device | str) -> PatchDraw:
        return PatchDraw(self.counts.to(device), self.anchors.to(device), self.patch_size)


def _full_boxes(n: int, image_size: tuple[int, int]) -> Tensor:
    h, w = image_size
    return torch.tensor([0, 0, w, h], dtype=torch.int64).expand(n, 4)


def draw_patches(
    n: int,
    image_size: tuple[int, int],
    patch_size: int | tuple[int, int],
    count: int | tuple[int, int] | Tensor,
    generator: torch.Generator,
    *,
    content_boxes: Tensor | None = None,
    valid: Tensor | None = None,
    grid: bool = False,
    device: torch.device | str | None = None,
) -> PatchDraw:
    """Draw, per image, a run-time number of ``P x P`` patches inside its content box.

    Every random number comes from ``generator`` (a CPU generator) and the draw is computed on the CPU, then moved
    to ``device``: the same generator state gives the same patches on every device.

    Args:
        n: number of images.
        image_size: ``(H, W)`` of each image.
        patch_size: ``P`` or ``(ph, pw)``.
        count: patches per image: a fixed number, an inclusive range ``(lo, hi)`` drawn uniformly per image, or a
            ``[n]`` integer tensor of counts.
        generator: a CPU ``torch.Generator`` (see :func:`seeded_generator`).
        content_boxes: ``[n, 4]`` ``(x0, y0, x1, y1)``: patches lie inside these boxes (default: the whole image).
        valid: ``[n]`` bool, False for images that get no patch (padding slots).
        grid: place patches on the ``P``-aligned grid, distinct cells wholly inside the content box (a count larger
            than the cells available erases them all); otherwise anywhere, top-left corners uniform over the
            positions that keep the patch inside the box (patches may overlap).
        device: where the returned tensors live (default: CPU).
    """
    ph, pw = _patch_pair(patch_size)
    h, w = image_size
    if generator.device.type != "cpu":
        raise UsageError("draw_patches needs a CPU generator (the draw is made on the CPU, then moved)")
    boxes = (_full_boxes(n, image_size) if content_boxes is None
             else content_boxes.detach().to("cpu", torch.int64).reshape(n, 4))
    x0, y0 = boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h)
    x1, y1 = boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)
    ok = (x1 > x0) & (y1 > y0)
    if valid is not None:
        ok &= valid.detach().to("cpu", torch.bool).reshape(n)
    if isinstance(count, Tensor):
        counts = count.detach().to("cpu", torch.int64).reshape(n)
        if bool((counts < 0).any()):
            raise UsageError("patch counts must not be negative")
        k_max = int(counts.max()) if n else 0
    else:
        lo, hi = (count, count) if isinstance(count, int) else (int(count[0]), int(count[1]))
        if lo < 0 or hi < lo:
            raise UsageError(f"patch count range must satisfy 0 <= lo <= hi, got {count}")
        counts = torch.randint(lo, hi + 1, (n,), generator=generator) if hi > lo else torch.full((n,), lo)
        k_max = hi
    counts = torch.where(ok, counts, torch.zeros_like(counts))
    if grid:
        nh, nw = math.ceil(h / ph), math.ceil(w / pw)
        eligible = patch_mask(boxes, image_size, (ph, pw), rule="all").reshape(n, nh * nw) & ok[:, None]
        scores = torch.rand((n, nh * nw), generator=generator)
        scores = torch.where(eligible, scores, torch.full_like(scores, 2.0))  # ineligible cells sort last
        k_max = min(k_max, nh * nw)
        cells = torch.sort(scores, dim=1, stable=True).indices[:, :k_max]
        counts = torch.minimum(counts, eligible.sum(dim=1))
        anchors = torch.stack([(cells // nw) * ph, (cells % nw) * pw], dim=-1)
    else:
        u = torch.rand((n, k_max, 2), generator=generator, dtype=torch.float64)
        span_y = (y1 - y0 - ph + 1).clamp(min=1)  # a box smaller than the patch: the patch starts at its corner
        span_x = (x1 - x0 - pw + 1).clamp(min=1)
        ay = y0[:, None] + torch.floor(u[..., 0] * span_y[:, None]).to(torch.int64)
        ax = x0[:, None] + torch.floor(u[..., 1] * span_x[:, None]).to(torch.int64)
        anchors = torch.stack([ay, ax], dim=-1)
    draw = PatchDraw(counts.to(torch.int64), anchors.to(torch.int64).reshape(n, -1, 2), (ph, pw))
    return draw if device is None else draw.to(device)


def erase_mask(
    draw: PatchDraw,
    image_size: tuple[int, int],
    *,
    content_boxes: Tensor | None = None,
) -> Tensor:
    """The ``[N, H, W]`` bool mask of the pixels a :class:`PatchDraw` erases, on the draw's device.

    Built from comparisons only: ``row_in[n, k, y] = active[n, k] & (ay <= y < ay + ph)`` and ``col_in[n, k, x]``
    likewise, then ``mask[n, y, x] = any_k row_in & col_in`` as a batched product of the 0/1 indicators (exact:
    integer sums of at most K ones in float32). With ``content_boxes``, pixels outside an image's box (letterbox
    bars) are never erased.
    """
    h, w = image_size
    ph, pw = draw.patch_size
    device = draw.anchors.device
    n = draw.anchors.shape[0]
    if draw.anchors.shape[1] == 0:
        return torch.zeros((n, h, w), dtype=torch.bool, device=device)
    ys = torch.arange(h, device=device)
    xs = torch.arange(w, device=device)
    ay = draw.anchors[..., 0:1]  # [N, K, 1]
    ax = draw.anchors[..., 1:2]
    active = draw.active[..., None]
    rows = (ys >= ay) & (ys < ay + ph) & active  # [N, K, H]
    cols = (xs >= ax) & (xs < ax + pw)  # [N, K, W]
    if content_boxes is not None:
        b = content_boxes.to(device, torch.int64).reshape(n, 1, 4)
        rows &= (ys >= b[..., 1:2]) & (ys < b[..., 3:4])
        cols &= (xs >= b[..., 0:1]) & (xs < b[..., 2:3])
    hits = torch.bmm(rows.transpose(1, 2).to(torch.float32), cols.to(torch.float32))
    return hits > 0.5


def _image_means(images: Tensor, layout: str, content_boxes: Tensor | None) -> Tensor:
    """``[N, 3]`` per-image, per-channel mean over the content box (the whole image without boxes).

    Integer pixels: the box sum is two matrix products with 0/1 row and column indicators; every partial sum is an
    integer below 2**24 (float32) or 2**53 (float64, for images over 65,793 pixels), so the sums are exact in any
    order, on any device (TF32 included: 8-bit values and 0/1 are exact in it); the mean is rounded half up. Float
    pixels: masked reductions accumulated in float64, cast back.
    """
    chw = images if layout == "CHW" else images.permute(0, 3, 1, 2)
    n, _, h, w = chw.shape
    device = images.device
    if content_boxes is None:
        rows = torch.ones((n, h), dtype=torch.bool, device=device)
        cols = torch.ones((n, w), dtype=torch.bool, device=device)
    else:
        b = content_boxes.to(device, torch.int64).reshape(n, 4)
        ys = torch.arange(h, device=device)[None, :]
        xs = torch.arange(w, device=device)[None, :]
        rows = (ys >= b[:, 1:2]) & (ys < b[:, 3:4])
        cols = (xs >= b[:, 0:1]) & (xs < b[:, 2:3])
    cnt = rows.sum(dim=1, dtype=torch.int64) * cols.sum(dim=1, dtype=torch.int64)  # [N]
    if images.is_floating_point():  # reductions, not matrix products: a global TF32 setting must not round them
        per_row_f = (chw * cols[:, None, None, :].to(chw.dtype)).sum(dim=-1, dtype=torch.float64)  # [N, 3, H]
        total_f = (per_row_f * rows[:, None, :].to(torch.float64)).sum(dim=-1)  # [N, 3]
        return (total_f / cnt.clamp(min=1)[:, None]).to(images.dtype)
    acc = torch.float32 if 255 * h * w < (1 << 24) else torch.float64
    per_row = torch.matmul(chw.to(acc), cols.to(acc)[:, None, :, None])[..., 0]  # [N, 3, H]: sums inside the box
    total = torch.matmul(per_row, rows.to(acc)[:, :, None])[..., 0]  # [N, 3]
    total_i = total.to(torch.int64)
    mean = (2 * total_i + cnt[:, None]) // (2 * cnt.clamp(min=1)[:, None])
    return mean.to(images.dtype)


def erase(
    images: Tensor,
    mask: Tensor,
    fill: str | float | Sequence[float] = "mean",
    *,
    layout: str = "CHW",
    content_boxes: Tensor | None = None,
) -> Tensor:
    """``images`` ``[N, 3, H, W]`` (or ``[N, H, W, 3]``) with the pixels of ``mask`` ``[N, H, W]`` replaced.

    Args:
        images: any dtype, any device.
        mask: from :func:`erase_mask`.
        fill: ``"mean"`` (each image's per-channel mean over its content box), a number, or three numbers (R, G,
            B), in the units of ``images`` (0.0 in normalised pixels is the dataset's mean colour).
        layout: ``CHW`` or ``HWC``.
        content_boxes: ``[N, 4]``: where the image mean is taken.

    Returns:
        A new tensor (``torch.where``); ``images`` is not changed.
    """
    n = images.shape[0]
    if isinstance(fill, str):
        if fill != "mean":
            raise UsageError(f"fill must be 'mean', a number or three numbers, got '{fill}'")
        values = _image_means(images, layout, content_boxes)  # [N, 3]
    else:
        vals = [float(fill)] * 3 if isinstance(fill, (int, float)) else [float(v) for v in fill]
        if len(vals) == 1:
            vals = vals * 3
        if len(vals) != 3:
            raise UsageError(f"fill needs 1 or 3 values, got {fill!r}")
        values = torch.tensor(vals, dtype=torch.float64).to(images.device)
        if not images.is_floating_point():
            values = values.round().clamp(torch.iinfo(images.dtype).min, torch.iinfo(images.dtype).max)
        values = values.to(images.dtype).expand(n, 3)
    if layout == "CHW":
        return torch.where(mask[:, None, :, :], values[:, :, None, None], images)
    return torch.where(mask[:, :, :, None], values[:, None, None, :], images)


@dataclass(frozen=True)
class DynamicMasking:
    """DALI-style dynamic masking: per image a run-time number of ``P x P`` patches erased.

    Attributes:
        patch_size: ``P`` (or ``(ph, pw)``) in pixels.
        count: patches per image, fixed or an inclusive range drawn per image.
        fill: ``"mean"`` (the image's per-channel mean), a number, or three numbers, in the pixel units the
            transform sees (after normalisation when it normalises).
        grid: patches on the ``P``-aligned grid, distinct cells; otherwise anywhere (possibly overlapping).
        within_content: keep patches inside each image's content box (letterbox bars are never erased).
    """

    patch_size: int | tuple[int, int]
    count: int | tuple[int, int] = (1, 4)
    fill: str | float | tuple[float, ...] = "mean"
    grid: bool = False
    within_content: bool = True

    def __post_init__(self) -> None:
        _patch_pair(self.patch_size)
        lo, hi = (self.count, self.count) if isinstance(self.count, int) else self.count
        if lo < 0 or hi < lo:
            raise UsageError(f"patch count range must satisfy 0 <= lo <= hi, got {self.count}")
        if isinstance(self.fill, str) and self.fill != "mean":
            raise UsageError(f"fill must be 'mean', a number or three numbers, got '{self.fill}'")

    def apply(
        self,
        pixels: Tensor,
        layout: str,
        generator: torch.Generator,
        *,
        content_boxes: Tensor | None = None,
        image_count: Tensor | None = None,
        counts: Tensor | None = None,
        anchors: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, PatchDraw]:
        """Erase patches from a batch ``[B, limit, *slot]`` (or ``[N, *slot]``).

        Args:
            pixels: the batch, any device.
            layout: ``CHW`` or ``HWC``.
            generator: a CPU generator (unused when ``counts`` and ``anchors`` are both given).
            content_boxes: ``[B, limit, 4]``; needed for ``within_content`` and the mean fill over content.
            image_count: ``[B]``: padding slots get no patch.
            counts: ``[B, limit]`` (or ``[N]``) patches per image instead of drawing them.
            anchors: ``[B, limit, K, 2]`` (or ``[N, K, 2]``) ``(y, x)`` patch corners instead of drawing them
                (with ``counts``; without it every given patch is used).

        Returns:
            ``(erased pixels, [*lead, H, W] bool mask, the draw)``.
        """
        lead = pixels.shape[:-3]
        n = math.prod(lead)
        slot = pixels.shape[-3:]
        h, w = (slot[1], slot[2]) if layout == "CHW" else (slot[0], slot[1])
        flat = pixels.reshape(n, *slot)
        boxes = content_boxes.reshape(n, 4) if content_boxes is not None else None
        valid = None
        if image_count is not None and len(lead) == 2:
            valid = image_mask(image_count.to("cpu"), lead[1]).reshape(n)
        if anchors is not None:
            a = anchors.to(torch.int64).reshape(n, -1, 2)
            c = (counts.to(torch.int64).reshape(n) if counts is not None
                 else torch.full((n,), a.shape[1], dtype=torch.int64))
            if valid is not None:
                c = torch.where(valid.to(c.device), c, torch.zeros_like(c))
            draw = PatchDraw(c.to(pixels.device), a.to(pixels.device), _patch_pair(self.patch_size))
        else:
            count: int | tuple[int, int] | Tensor = self.count if counts is None else counts.reshape(n)
            draw = draw_patches(n, (h, w), self.patch_size, count, generator,
                                content_boxes=boxes if self.within_content else None, valid=valid,
                                grid=self.grid, device=pixels.device)
        mask = erase_mask(draw, (h, w), content_boxes=boxes if self.within_content else None)
        fill = self.fill if isinstance(self.fill, str | int | float) else tuple(self.fill)
        out = erase(flat, mask, fill, layout=layout, content_boxes=boxes)
        return out.reshape(pixels.shape), mask.reshape(*lead, h, w), draw


# -- the batch transform ----------------------------------------------------------------------------------------


class BatchTransform:
    """Normalisation, patch masks and dynamic masking over a reader batch (a dict of tensors), on any device.

    Use it as the ``transform=`` of :class:`~mmprep.dataset.torch_data.PackedIterableDataset` /
    :class:`~mmprep.dataset.torch_data.PackedTorchDataset` (it then runs in the DataLoader workers, on the CPU), or
    call it in the training loop on a batch already moved to the GPU (``device=`` moves it first), which ships
    ``uint8`` pixels over PCIe (4x less than float32) and normalises and masks there.

    Steps, in order (each only when asked for): move to ``device``; normalise ``pixel_values`` to ``normalize``
    (padding slots zero); add ``patch_mask`` ``[B, limit, ceil(H/p), ceil(W/p)]`` from ``content_boxes``; erase
    dynamic patches (``masking``) and add ``erase_mask`` ``[B, limit, H, W]`` and ``erase_counts`` ``[B, limit]``.

    Random draws come from a CPU generator seeded with ``(seed, epoch, worker)``: the same seed gives the same
    masks on CPU and CUDA; each DataLoader worker draws its own stream (call :meth:`set_epoch` for a new one each
    epoch; the torch datasets do it for you in their ``set_epoch``).

    Args:
        spec: the pixel layout (``PackedDataset.pixels``); see :meth:`from_dataset`.
        normalize: ``float32``/``float16``, or None to keep the stored dtype.
        mean: override the metadata's mean.
        std: override the metadata's std.
        patch_size: add ``patch_mask`` with this patch size.
        patch_rule: ``any`` or ``all`` (see :func:`patch_mask`).
        masking: dynamic masking settings.
        seed: the seed of the draws.
        device: move every tensor of the batch here first (e.g. ``"cuda"``), or None to leave them where they are.
    """

    def __init__(
        self,
        spec: PixelSpec,
        *,
        normalize: str | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        patch_size: int | tuple[int, int] | None = None,
        patch_rule: str = "any",
        masking: DynamicMasking | None = None,
        seed: int = 0,
        device: str | torch.device | None = None,
    ) -> None:
        if normalize is not None and normalize not in NORMALIZE_DTYPES:
            raise UsageError(f"normalize must be one of {', '.join(NORMALIZE_DTYPES)}, got '{normalize}'")
        if patch_rule not in PATCH_RULES:
            raise UsageError(f"patch rule must be one of {', '.join(PATCH_RULES)}, got '{patch_rule}'")
        if patch_size is not None:
            _patch_pair(patch_size)
        self.spec = spec
        self.normalize = normalize
        self.mean = tuple(mean) if mean is not None else None
        self.std = tuple(std) if std is not None else None
        self.patch_size = patch_size
        self.patch_rule = patch_rule
        self.masking = masking
        self.seed = int(seed)
        self.device = torch.device(device) if device is not None else None
        self.epoch = 0
        self._gen: torch.Generator | None = None
        self._gen_key: tuple[int, int] | None = None

    @classmethod
    def from_dataset(cls, ds: Any, **kwargs: Any) -> BatchTransform:
        """For a :class:`~mmprep.dataset.reader.PackedDataset` (padded layout), or a torch dataset over one."""
        inner = getattr(ds, "ds", ds)
        spec = getattr(inner, "pixels", None)
        if spec is None:
            raise UsageError("batch transforms need padded pixel tensors; this dataset stores encoded images")
        return cls(spec, **kwargs)

    def __getstate__(self) -> dict[str, Any]:  # generators do not travel to workers; each makes its own
        state = self.__dict__.copy()
        state["_gen"] = None
        state["_gen_key"] = None
        return state

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's masks (a new stream per epoch, the same for the same seed and epoch)."""
        self.epoch = int(epoch)

    def generator(self) -> torch.Generator:
        """The CPU generator of this (epoch, DataLoader worker)."""
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        key = (self.epoch, info.id if info is not None else -1)
        if self._gen is None or self._gen_key != key:
            self._gen = seeded_generator(self.seed, key[0], key[1] + 1)
            self._gen_key = key
        return self._gen

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        spec = self.spec
        out = dict(batch)
        if self.device is not None:
            out = {k: (v.to(self.device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in out.items()}
        pixels = out.get(spec.column)
        if not isinstance(pixels, Tensor):
            raise UsageError(f"the batch has no '{spec.column}' tensor (read it with the pixel column)")
        boxes = out.get("content_boxes")
        count = out.get("image_count")
        if self.normalize is not None:
            pixels = normalize(pixels, spec, self.normalize, mean=self.mean, std=self.std,
                               image_count=count if isinstance(count, Tensor) else None)
        if self.patch_size is not None:
            if not isinstance(boxes, Tensor):
                raise UsageError("patch masks need the content_boxes column")
            out["patch_mask"] = patch_mask(boxes, spec.image_size, self.patch_size, rule=self.patch_rule)
        if self.masking is not None:
            if self.masking.within_content and not isinstance(boxes, Tensor):
                raise UsageError("masking within content needs the content_boxes column")
            pixels, mask, draw = self.masking.apply(
                pixels, spec.layout, self.generator(),
                content_boxes=boxes if isinstance(boxes, Tensor) else None,
                image_count=count if isinstance(count, Tensor) else None)
            out["erase_mask"] = mask
            out["erase_counts"] = draw.counts.reshape(mask.shape[:-2])
        out[spec.column] = pixels
        return out
