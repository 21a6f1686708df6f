"""The GPU image path of ``pack --device cuda``: nvJPEG decoding, resampling, padding and normalisation in torch.

Pieces, each usable and tested on its own (everything but the nvJPEG call runs on CPU tensors too):

- **device choice** (:func:`resolve_device`, :func:`gpu_problem`): ``cuda`` needs torch with a CUDA device and a
  torchvision that loads next to it (the ``gpu`` extra); ``auto`` picks ``cuda`` only when all of that holds and
  the layout is padded. Nothing here is imported unless ``--device`` is not ``cpu``.
- **routing** (:func:`scan_jpeg`, :meth:`GpuImages.probe`): from the file's header only, which images the GPU
  decoder takes: baseline or extended-sequential (SOF0/SOF1) 8-bit Huffman JPEG with 1 or 3 components (YCbCr,
  common chroma subsamplings), one frame, ending in an EOI marker, within the pixel limit. EXIF/XMP orientation is
  handled (read with Pillow's own parser, as the CPU path does, and applied on the device). Everything else goes
  through the CPU path, one image at a time: PNG and every non-JPEG, CMYK/YCCK and Adobe-RGB JPEG, progressive,
  arithmetic-coded, lossless and 12-bit JPEG, MPO, files cut short or with bytes after EOI, and any image the GPU
  decoder raises on. The CPU path makes the same pixels and the same rejects as with ``--device cpu``.
- **resampling** (:func:`resample_weights`, :func:`resize_image`): Pillow's antialiased filters (bicubic,
  bilinear, lanczos, box, hamming; nearest) as dense weight matrices: the coefficients of Pillow's
  ``ImagingResample`` for the same fractional source box (center-crop boxes are fractional), in its 22-bit fixed
  point, split into 8-bit parts so that float32 matrix products (TF32 included) sum them exactly, then rounded to
  8 bits after each pass as Pillow does. Against Pillow's published resampler (horizontal pass first) this is bit
  for bit; newer Pillow builds pick the pass order by cost for some geometries, where results differ by a level
  or two. The CPU path also shrinks JPEGs in the DCT domain (``draft``) and by integer factors (``reducing_gap``)
  before resampling, so against *it* the difference is larger (measured figures in ``docs/gpu.md``).
- **slots** (:meth:`GpuImages.render`): decode a row group's GPU images in bounded sub-batches (one batched nvJPEG
  call each), orient, resample, place them into the ``[rows, limit, *slot]`` tensor (letterbox fill, padding slots
  zero), normalise with exactly the CPU path's values (a 256-entry table per channel computed the way
  :func:`mmprep.images.decode.to_output` computes, then a gather), and copy the whole tensor back **once**.

:class:`GpuImages` is what the pack processor calls when ``cfg.device == "cuda"``; it holds no torch object until
first used in a worker, so it pickles to spawned workers, each of which opens its own CUDA context.
"""

from __future__ import annotations

import functools
import io
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mmprep.errors import UsageError
from mmprep.images.decode import ImageConfig, ImageError, Normalization, ResizePlan, plan_resize
from mmprep.records import EmbeddedImage, ImageRef

if TYPE_CHECKING:
    import torch

    from mmprep.images.sources import ImageSource

__all__ = [
    "DEVICES",
    "GPU_HINT",
    "GpuImage",
    "GpuImages",
    "JpegScan",
    "gpu_problem",
    "orient",
    "pillow_decoder",
    "read_bytes",
    "resample_weights",
    "resize_image",
    "resolve_device",
    "scan_jpeg",
]

DEVICES = ("cpu", "cuda", "auto")
GPU_HINT = ("install the gpu extra next to a CUDA build of torch: pip install 'mmprep[gpu]' with the torchvision "
            "that matches your torch (docs/gpu.md)")
MIN_TORCHVISION = (0, 19)  # batched decode_jpeg(list, device="cuda")

#: A decoder: encoded JPEG files in, one ``[3, H, W]`` uint8 tensor each (stored orientation, RGB) out.
Decoder = Callable[[Sequence[bytes]], list[Any]]


# -- device choice ------------------------------------------------------------------------------------------------


def _version_tuple(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def gpu_problem() -> str | None:
    """Why the GPU path cannot run here (None when it can): torch, a CUDA device, a torchvision that loads."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchvision
            from torchvision.io import decode_jpeg  # noqa: F401
    except ImportError:
        return "torchvision is not installed"
    except Exception as exc:  # an ABI mismatch raises RuntimeError/OSError from the compiled operators
        return f"torchvision does not load next to torch {torch.__version__}: {type(exc).__name__}: {exc}"
    if _version_tuple(torchvision.__version__) < MIN_TORCHVISION:
        return f"torchvision {torchvision.__version__} is older than 0.19 (no batched GPU JPEG decoding)"
    if not torch.cuda.is_available():
        build = "a CPU build of torch" if torch.version.cuda is None else "no CUDA device visible to torch"
        return f"{build} (torch {torch.__version__})"
    return None


def resolve_device(device: str, *, padded: bool = True) -> str:
    """``cpu`` or ``cuda`` for ``--device cpu|cuda|auto``.

    Raises:
        UsageError: an unknown device; ``cuda`` where the GPU path cannot run (naming why, with the install hint),
            or with the encoded layout (``padded=False``).
    """
    if device not in DEVICES:
        raise UsageError(f"--device must be one of {', '.join(DEVICES)}, got '{device}'")
    if device == "cpu":
        return "cpu"
    if not padded:
        if device == "auto":
            return "cpu"
        raise UsageError("--device cuda decodes into padded tensors; --pad none stores encoded images",
                         hint="use --device cpu (or auto) with --pad none")
    problem = gpu_problem()
    if problem is None:
        return "cuda"
    if device == "auto":
        return "cpu"
    raise UsageError(f"--device cuda: {problem}", hint=GPU_HINT)


# -- routing -----------------------------------------------------------------------------------------------------------

_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_GPU_SOF = frozenset({0xC0, 0xC1})  # baseline, extended sequential (Huffman)
_LUMA_SAMPLING = frozenset({(1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (4, 2)})


@dataclass(frozen=True)
class JpegScan:
    """What the header of a JPEG file says (up to its first scan)."""

    sof: int
    precision: int
    width: int
    height: int
    components: int
    sampling: tuple[tuple[int, int], ...]
    component_ids: tuple[int, ...]
    adobe_transform: int | None
    tables: bool = True  # quantisation and Huffman tables before the scan (libjpeg has default Huffman tables)

    @property
    def gpu_ok(self) -> bool:
        """Whether nvJPEG decodes this as the CPU path does (else the image goes through the CPU path)."""
        if self.sof not in _GPU_SOF or self.precision != 8 or self.width < 1 or self.height < 1 or not self.tables:
            return False
        if self.components == 1:
            return True
        if self.components != 3 or self.adobe_transform == 0 or self.component_ids == (82, 71, 66):  # RGB-coded
            return False
        return self.sampling[0] in _LUMA_SAMPLING and self.sampling[1] == (1, 1) and self.sampling[2] == (1, 1)


def scan_jpeg(data: bytes) -> JpegScan | None:
    """Parse a JPEG file's markers up to its first scan; None for anything that is not one complete JPEG.

    "Complete" is judged cheaply: the file must start with SOI, reach a scan (SOS) after exactly one frame header,
    and end with the EOI marker (a file cut short does not; one with bytes after EOI is left to the CPU path too).
    """
    n = len(data)
    if n < 8 or data[:2] != b"\xff\xd8" or data[-2:] != b"\xff\xd9":
        return None
    pos = 2
    sof: tuple[int, bytes] | None = None
    adobe: int | None = None
    quant: set[int] = set()  # quantisation table ids defined before the scan
    huffman: set[tuple[int, int]] = set()  # (class, id) of Huffman tables defined before the scan
    while True:
        if pos + 4 > n or data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
            continue
        if marker == 0xD9:
            return None  # EOI before any scan
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if length < 2 or pos + 2 + length > n:
            return None
        segment = data[pos + 4:pos + 2 + length]
        if marker == 0xDA:
            break
        if marker in _SOF_MARKERS:
            if sof is not None:
                return None
            sof = (marker, segment)
        elif marker == 0xDB:
            _table_ids(segment, lambda b: 65 if b >> 4 == 0 else 129, lambda b: quant.add(b & 0x0F))
        elif marker == 0xC4:
            _table_ids(segment, lambda b: 0, lambda b: huffman.add((b >> 4, b & 0x0F)), huffman_sizes=True)
        elif marker == 0xEE and segment[:5] == b"Adobe" and len(segment) >= 12:
            adobe = segment[11]
        pos += 2 + length
    if sof is None:
        return None
    marker, seg = sof
    if len(seg) < 6:
        return None
    comps = seg[5]
    if len(seg) < 6 + 3 * comps:
        return None
    ids = tuple(seg[6 + 3 * i] for i in range(comps))
    sampling = tuple((seg[7 + 3 * i] >> 4, seg[7 + 3 * i] & 0x0F) for i in range(comps))
    tables = all(seg[8 + 3 * i] in quant for i in range(comps))
    scan = segment  # the SOS header: Ns, then (selector, DC << 4 | AC) per component
    if not scan or len(scan) < 1 + 2 * scan[0]:
        return None
    tables = tables and all((0, scan[2 + 2 * i] >> 4) in huffman and (1, scan[2 + 2 * i] & 0x0F) in huffman
                            for i in range(scan[0]))
    return JpegScan(marker, seg[0], int.from_bytes(seg[3:5], "big"), int.from_bytes(seg[1:3], "big"), comps,
                    sampling, ids, adobe, tables)


def _table_ids(segment: bytes, size_of: Callable[[int], int], add: Callable[[int], None], *,
               huffman_sizes: bool = False) -> None:
    """Walk the tables of a DQT (fixed sizes) or DHT (sizes from the code counts) segment, calling ``add`` with each
    table's first byte (class/precision and id)."""
    i = 0
    while i < len(segment):
        b = segment[i]
        add(b)
        if huffman_sizes:
            if i + 17 > len(segment):
                return
            i += 17 + sum(segment[i + 1:i + 17])
        else:
            i += size_of(b)


@dataclass(frozen=True)
class GpuImage:
    """A JPEG routed to the GPU decoder: its bytes and everything known before decoding it.

    Attributes:
        data: the file's bytes.
        stored_size: ``(width, height)`` as stored (before orientation).
        orientation: the EXIF/XMP orientation to apply (1 = none).
        plan: the output geometry for the upright image (:func:`mmprep.images.decode.plan_resize`).
    """

    data: bytes
    stored_size: tuple[int, int]
    orientation: int
    plan: ResizePlan

    @property
    def original_size(self) -> tuple[int, int]:
        """``(width, height)`` after orientation (what the CPU path reports)."""
        w, h = self.stored_size
        return (h, w) if self.orientation >= 5 else (w, h)

    @property
    def content_box(self) -> tuple[int, int, int, int]:
        return self.plan.content_box


def _orientation_of(data: bytes) -> tuple[str, int] | None:
    """(format, orientation) as Pillow reads them from the header (the CPU path's reading), None if it cannot."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=("JPEG", "MPO")) as im:
                fmt = im.format or ""
                try:
                    value = im.getexif().get(0x0112, 1)
                except Exception:  # as the CPU path: a broken EXIF block is ignored
                    value = 1
    except Exception:
        return None
    return fmt, value if isinstance(value, int) and 1 <= value <= 8 else 1


def read_bytes(images: ImageSource, ref: ImageRef) -> bytes | None:
    """The bytes of an image from a local or remote image source, or embedded in the input; None when they cannot
    be read this way (the CPU path then reads the image again and reports the problem exactly as it always does)."""
    from mmprep.images.sources import LocalImages, RemoteImages, read_regular_file
    from mmprep.images.spool import read_spooled

    try:
        if isinstance(ref, EmbeddedImage):
            if ref.data is not None:
                return ref.data
            spool = getattr(images, "spool", None)
            return read_spooled(spool, ref.offset, ref.size) if spool is not None and ref.offset >= 0 else None
        if isinstance(images, LocalImages):
            return read_regular_file(images.path(ref))
        if isinstance(images, RemoteImages):
            return images.read(ref)
    except (ImageError, OSError):
        return None
    return None


# -- resampling -----------------------------------------------------------------------------------------------------


def _box_filter(x: np.ndarray) -> np.ndarray:
    return ((x > -0.5) & (x <= 0.5)).astype(np.float64)


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _hamming(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    px = x * math.pi
    with np.errstate(invalid="ignore", divide="ignore"):
        v = np.sin(px) / px * (0.54 + 0.46 * np.cos(px))
    return np.where(x == 0.0, 1.0, np.where(x >= 1.0, 0.0, v))


def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    return np.where(x < 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1,
                    np.where(x < 2.0, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _sinc(x: np.ndarray) -> np.ndarray:
    px = x * math.pi
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(x == 0.0, 1.0, np.sin(px) / px)


def _lanczos(x: np.ndarray) -> np.ndarray:
    return np.where((x >= -3.0) & (x < 3.0), _sinc(x) * _sinc(x / 3.0), 0.0)


# name -> (support, filter), as in Pillow's libImaging/Resample.c
_FILTERS: dict[str, tuple[float, Callable[[np.ndarray], np.ndarray]]] = {
    "box": (0.5, _box_filter),
    "bilinear": (1.0, _bilinear),
    "hamming": (1.0, _hamming),
    "bicubic": (2.0, _bicubic),
    "lanczos": (3.0, _lanczos),
}
_PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed point for 8-bit images


@functools.lru_cache(maxsize=4096)
def resample_weights(in_size: int, in0: float, in1: float, out_size: int, interpolation: str) -> tuple[np.ndarray,
                                                                                                        int, int]:
    """Pillow's resampling of the source interval ``[in0, in1)`` of an axis of ``in_size`` pixels onto
    ``out_size`` pixels, as a dense matrix.

    Returns:
        ``(weights, lo, hi)``: ``weights`` is ``[out_size, hi - lo]`` float64 over the source pixels ``lo..hi-1``
        (the only ones any output reads). For the filters, each row holds Pillow's normalised coefficients rounded
        to its 22-bit fixed point; for ``nearest``, a single 1 at the pixel Pillow picks.
    """
    # Pillow takes the box as C floats: the subtraction is in float32, the rest in double
    f0, f1 = np.float32(in0), np.float32(in1)
    scale = float(np.float32(f1 - f0)) / out_size
    in0 = float(f0)
    xx = np.arange(out_size, dtype=np.float64)
    if interpolation == "nearest":  # ImagingScaleAffine: a position advanced by `scale` per pixel, truncated
        pos = np.cumsum(np.concatenate([[in0 + scale * 0.5], np.full(out_size - 1, scale)]))
        src = np.clip(np.where(pos < 0, -1, np.trunc(pos)).astype(np.int64), 0, in_size - 1)
        lo, hi = int(src.min()), int(src.max()) + 1
        w = np.zeros((out_size, hi - lo))
        w[np.arange(out_size), src - lo] = 1.0
        return w, lo, hi
    support, fn = _FILTERS[interpolation]
    filterscale = max(scale, 1.0)
    support *= filterscale
    center = in0 + (xx + 0.5) * scale
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64)
    lo, hi = int(xmin.min()), int(xmax.max())
    cols = np.arange(lo, hi, dtype=np.float64)[None, :]
    k = fn((cols - center[:, None] + 0.5) / filterscale)
    k = np.where((cols >= xmin[:, None]) & (cols < xmax[:, None]), k, 0.0)
    total = k.sum(axis=1, keepdims=True)
    k = np.divide(k, total, out=np.zeros_like(k), where=total != 0)
    one = float(1 << _PRECISION_BITS)
    k = np.where(k < 0, np.ceil(k * one - 0.5), np.floor(k * one + 0.5)) / one  # (int)(k * 2^22 +- 0.5)
    return k, lo, hi


_WEIGHT_CACHE: dict[tuple[Any, ...], Any] = {}
_EXACT_TERMS = 256  # float32 sums of 8-bit x 8-bit products stay exact up to this many terms per output


def _weights_on(device: Any, key: tuple[int, float, float, int, str]) -> tuple[Any, int, int]:
    """The weights of :func:`resample_weights` on ``device`` as ``[3, out, span]`` float32: Pillow's 22-bit fixed
    point coefficients split into signed 8-bit parts (``k = 65536 hi + 256 mid + lo``), so every product with an
    8-bit pixel and every partial sum is an integer float32 holds exactly (TF32 too); nearest keeps ``[1, ...]``."""
    import torch

    cache_key = (str(device), *key)
    hit = _WEIGHT_CACHE.get(cache_key)
    if hit is None:
        w, lo, hi = resample_weights(*key)
        if key[4] == "nearest":
            parts = w[None]
        else:
            k = np.rint(w * (1 << _PRECISION_BITS)).astype(np.int64)
            parts = np.stack([k >> 16, (k >> 8) & 0xFF, k & 0xFF]).astype(np.float64)
            if int(np.count_nonzero(k, axis=1).max(initial=0)) > _EXACT_TERMS:  # a huge shrink: one float64 matrix
                parts = w[None] * float(1 << _PRECISION_BITS)
        if len(_WEIGHT_CACHE) > 4096:
            _WEIGHT_CACHE.clear()
        dtype = torch.float32 if parts.shape[0] == 3 or key[4] == "nearest" else torch.float64
        hit = (torch.from_numpy(parts).to(device=device, dtype=dtype), lo, hi)
        _WEIGHT_CACHE[cache_key] = hit
    return hit


def orient(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """``[..., C, H, W]`` as stored -> upright, for an EXIF orientation (as ``ImageOps.exif_transpose``)."""
    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-1, -2)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:
        return img.transpose(-1, -2)
    if orientation == 6:
        return img.transpose(-1, -2).flip(-1)
    if orientation == 7:
        return img.transpose(-1, -2).flip(-1, -2)
    if orientation == 8:
        return img.transpose(-1, -2).flip(-2)
    return img


def _pass(x: torch.Tensor, parts: torch.Tensor, axis: str) -> torch.Tensor:
    """One resampling pass of ``[..., C, H, W]`` float pixels along ``x`` (columns) or ``y`` (rows), rounded to 8 bits
    exactly as Pillow's fixed point: ``clamp(floor((sum + 2^21) / 2^22), 0, 255)``."""
    import torch

    xs = x.to(parts.dtype)
    k, n_out, span = parts.shape
    stacked = parts.reshape(k * n_out, span)  # one product for the k parts
    if axis == "x":
        sums = torch.matmul(xs, stacked.T).unflatten(-1, (k, n_out)).movedim(-2, 0)
    else:
        sums = torch.matmul(stacked, xs).unflatten(-2, (k, n_out)).movedim(-3, 0)
    total = sums[0].to(torch.float64)
    if k == 3:
        total = total * 65536.0 + sums[1].to(torch.float64) * 256.0 + sums[2].to(torch.float64)
    out = torch.floor((total + float(1 << (_PRECISION_BITS - 1))) * (1.0 / (1 << _PRECISION_BITS)))
    return out.clamp_(0.0, 255.0).to(torch.float32)


def resize_image(img: torch.Tensor, plan: ResizePlan, interpolation: str, *, stored_first_axis: str = "x"
                 ) -> torch.Tensor:
    """Resample upright ``[..., C, H, W]`` uint8 images to ``plan.resized`` (``[..., C, rh, rw]``), antialiased.

    Pillow's ``Image.resize(size, filter, box=plan.src_box)`` of the same pixels (no ``reducing_gap``): the same
    coefficients and fixed-point rounding, horizontal pass first (see the module notes on the pass order).

    Args:
        img: the upright image, any device.
        plan: from :func:`mmprep.images.decode.plan_resize` on the upright size.
        interpolation: one of :data:`mmprep.images.decode.INTERPOLATIONS`.
        stored_first_axis: the upright axis Pillow resamples first (``x``; ``y`` for an image stored transposed,
            orientations 5-8, whose stored rows are upright columns).
    """
    if not plan.resample:
        return img
    import torch

    h, w = img.shape[-2:]
    x0, y0, x1, y1 = plan.src_box
    rw, rh = plan.resized
    wx, xlo, xhi = _weights_on(img.device, (w, x0, x1, rw, interpolation))
    wy, ylo, yhi = _weights_on(img.device, (h, y0, y1, rh, interpolation))
    region = img[..., ylo:yhi, xlo:xhi].to(torch.float32)
    if interpolation == "nearest":
        return torch.matmul(wy[0], torch.matmul(region, wx[0].T)).to(torch.uint8)
    first, second = ((wx, "x"), (wy, "y")) if stored_first_axis == "x" else ((wy, "y"), (wx, "x"))
    return _pass(_pass(region, *first), *second).to(torch.uint8)


@functools.lru_cache(maxsize=16)
def _levels_table(mean: tuple[float, float, float], std: tuple[float, float, float], dtype: str) -> np.ndarray:
    """``(3, 256)``: what :func:`mmprep.images.decode.to_output` stores for each uint8 level of each channel."""
    from mmprep.images.decode import to_output

    levels = np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None, None], (256, 1, 3))
    table = to_output(np.ascontiguousarray(levels), Normalization(mean, std, dtype, "HWC"))
    return np.ascontiguousarray(table.reshape(256, 3).T)


def pillow_decoder(datas: Sequence[bytes]) -> list[Any]:
    """A reference decoder with Pillow (full resolution, stored orientation, RGB): what nvJPEG returns, on the
    CPU. It lets the rest of the GPU path run and be checked on CPU tensors."""
    import torch
    from PIL import Image

    out = []
    for data in datas:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as im:
            arr = np.array(im.convert("RGB"))
        out.append(torch.from_numpy(arr).permute(2, 0, 1))
    return out


def nvjpeg_decoder(device: Any) -> Decoder:
    """``torchvision.io.decode_jpeg`` on ``device`` with a list (one batched nvJPEG call), RGB output."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision >= 0.29 deprecates its image io in favour of TorchCodec
        from torchvision.io import ImageReadMode, decode_jpeg

    def decode(datas: Sequence[bytes]) -> list[Any]:
        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            out = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    return decode


# -- the batch decoder ---------------------------------------------------------------------------------------------


class GpuImages:
    """Decodes, resamples and pads a row group's JPEGs on a device; the pack processor's GPU path.

    Args:
        cfg: the image settings (a padded mode: stretch, center-crop or letterbox).
        norm: the output dtype and layout.
        device: ``cuda`` (or ``cuda:N``); ``cpu`` runs the same code on CPU tensors (tests, benchmarks).
        decoder: the JPEG decoder (default: nvJPEG through torchvision on ``device``).
        max_decode_pixels: decoded pixels held on the device at once (a row group is decoded in sub-batches).
    """

    def __init__(self, cfg: ImageConfig, norm: Normalization, *, device: str = "cuda",
                 decoder: Decoder | None = None, max_decode_pixels: int = 64 << 20) -> None:
        if cfg.size is None or cfg.resize_mode not in ("stretch", "center-crop", "letterbox"):
            raise UsageError(f"the GPU path fills padded slots; resize mode '{cfg.resize_mode}' has no fixed size")
        self.cfg = cfg
        self.norm = norm
        self.device = device
        self.decoder = decoder
        self.max_decode_pixels = max(1, int(max_decode_pixels))
        self._ready: Any = None

    def __getstate__(self) -> dict[str, Any]:  # no torch state travels to the workers
        state = self.__dict__.copy()
        state["_ready"] = None
        return state

    # -- routing ------------------------------------------------------------------------------------------------
    def probe(self, data: bytes) -> GpuImage | None:
        """A :class:`GpuImage` when the GPU decoder takes this file, else None (the CPU path decodes it)."""
        scan = scan_jpeg(data)
        if scan is None or not scan.gpu_ok or scan.width * scan.height > self.cfg.pixel_limit:
            return None
        header = _orientation_of(data)
        if header is None or header[0] != "JPEG":
            return None
        orientation = header[1]
        uw, uh = (scan.height, scan.width) if orientation >= 5 else (scan.width, scan.height)
        plan = plan_resize(uw, uh, self.cfg)
        return GpuImage(data, (scan.width, scan.height), orientation, plan)

    def prepare(self, images: ImageSource, ref: ImageRef) -> GpuImage | None:
        """Read ``ref`` and route it: a :class:`GpuImage`, or None for the CPU path (never raises)."""
        data = read_bytes(images, ref)
        return self.probe(data) if data is not None else None

    # -- rendering ----------------------------------------------------------------------------------------------
    def _setup(self) -> Any:
        if self._ready is None:
            import torch

            device = torch.device(self.device)
            decoder = self.decoder if self.decoder is not None else nvjpeg_decoder(device)
            table = _levels_table(tuple(self.norm.mean), tuple(self.norm.std), self.norm.dtype)
            lut = None
            if self.norm.dtype != "uint8":
                lut = torch.from_numpy(table.reshape(-1)).to(device)
            fill = torch.tensor(self.cfg.fill, dtype=torch.uint8, device=device).reshape(3, 1, 1)
            self._ready = (torch, device, decoder, lut, fill)
        return self._ready

    def _decode(self, datas: list[bytes]) -> list[Any]:
        """Decoded images, or the exception for each one the decoder refuses (one batched call; per image after a
        failure, since a batched call returns nothing when one image fails)."""
        _, _, decoder, _, _ = self._setup()
        try:
            out = decoder(datas)
            if len(out) == len(datas):
                return out
        except Exception:
            pass
        results: list[Any] = []
        for data in datas:
            try:
                results.append(decoder([data])[0])
            except Exception as exc:
                results.append(exc)
        return results

    def render(self, jobs: Sequence[tuple[int, GpuImage]], rows: int, limit: int
               ) -> tuple[np.ndarray, dict[int, BaseException]]:
        """Fill the slots of ``rows`` rows with the images of ``jobs``.

        Args:
            jobs: ``(slot, image)`` with ``slot = row * limit + k``.
            rows: rows in the group.
            limit: slots per row.

        Returns:
            ``(pixels, failed)``: the ``[rows, limit, *slot]`` array in the output dtype and layout (host memory,
            one copy back), with every slot not in ``jobs``, and every failed one, zero; ``failed`` maps each slot
            whose image the decoder refused (or decoded to an unexpected shape) to the reason, for the CPU path.
        """
        torch, device, _, lut, fill = self._setup()
        cfg = self.cfg
        assert cfg.size is not None
        th, tw = cfg.size
        canvas = torch.zeros((rows * limit, 3, th, tw), dtype=torch.uint8, device=device)
        filled = torch.zeros(rows * limit, dtype=torch.bool)
        failed: dict[int, BaseException] = {}
        start = 0
        while start < len(jobs):
            stop, pixels = start, 0
            while stop < len(jobs) and (stop == start or pixels + _area(jobs[stop][1]) <= self.max_decode_pixels):
                pixels += _area(jobs[stop][1])
                stop += 1
            group = jobs[start:stop]
            decoded = self._decode([job.data for _, job in group])
            same: dict[tuple[Any, ...], list[tuple[int, Any, GpuImage]]] = {}
            for (slot, job), img in zip(group, decoded, strict=True):
                if isinstance(img, BaseException):
                    failed[slot] = img
                    continue
                w, h = job.stored_size
                if tuple(img.shape) != (3, h, w):
                    failed[slot] = ImageError("image_invalid", f"GPU decoder returned {tuple(img.shape)}, the header "
                                                               f"says (3, {h}, {w})")
                    continue
                same.setdefault((job.stored_size, job.orientation, job.plan), []).append((slot, img, job))
            for members in same.values():  # images of one size and geometry are resampled as one batch
                slots = [slot for slot, _, _ in members]
                imgs = torch.stack([img.to(device) for _, img, _ in members])
                self._place(canvas, torch.tensor(slots, device=device), imgs, members[0][2], fill)
                filled[slots] = True
            start = stop
        out = self._normalise(canvas, lut, filled.to(device))
        host = out.reshape(rows, limit, *out.shape[1:]).cpu().numpy()
        return host, failed

    def _place(self, canvas: Any, slots: Any, imgs: Any, job: GpuImage, fill: Any) -> None:
        """Orient, resample and write ``imgs`` ``[G, 3, H, W]`` (one stored size and geometry) into their slots."""
        plan = job.plan
        upright = orient(imgs, job.orientation)
        first = "y" if job.orientation >= 5 else "x"
        resized = resize_image(upright, plan, self.cfg.interpolation, stored_first_axis=first)
        x, y = plan.offset
        rw, rh = plan.resized
        if plan.out_size != plan.resized:
            canvas[slots] = fill.expand(len(slots), *canvas.shape[1:])
        canvas[slots, :, y:y + rh, x:x + rw] = resized

    def _normalise(self, canvas: Any, lut: Any, filled: Any) -> Any:
        import torch

        if lut is None:
            out = canvas
        else:
            offsets = (torch.arange(3, device=canvas.device, dtype=torch.int32) * 256).reshape(1, 3, 1, 1)
            idx = canvas.to(torch.int32) + offsets
            out = torch.index_select(lut, 0, idx.reshape(-1)).reshape(canvas.shape)
            out = torch.where(filled.reshape(-1, 1, 1, 1), out, torch.zeros((), dtype=out.dtype, device=out.device))
        if self.norm.layout == "HWC":
            out = out.permute(0, 2, 3, 1)
        return out.contiguous()


def _area(job: GpuImage) -> int:
    return job.stored_size[0] * job.stored_size[1]
