"""The image stage every command reuses: decode one file correctly and fast, resize, normalise, encode.

Decoding (:func:`load_image`) reads each file once and lets the content, not the extension, decide the format.
Whatever the file holds comes out as an 8-bit RGB array:

- EXIF (or XMP) orientation is applied, so a phone photo stored 1200x1800 with orientation 6 comes out 1800x1200;
- CMYK, YCbCr, palette, 1-bit and grayscale images are converted to RGB;
- transparency (RGBA, LA, palette or grayscale with a transparent colour) is composited over
  :attr:`ImageConfig.background` (white by default, not black);
- single-channel 16-bit and 32-bit integer images (``I;16``, ``I``) are scaled to 8 bits
  (``round(v * 255 / 65535)``), not clipped; float images (``F``) in [0, 1] are scaled by 255 and other float
  ranges are clipped to 0-255; 16-bit RGB(A) files (TIFF, PNG) are reduced to 8 bits by Pillow itself, which
  keeps the high byte of each sample (``v >> 8``, also not clipping, but not the rounded formula above);
- animated files (GIF, APNG, WebP, MPO) give their first frame.

Bad files are data, not crashes: :func:`load_image` raises only :class:`ImageError`, whose ``reason`` is a short
code (``image_missing``, ``image_truncated``, ``image_too_large``, ...). A file declaring more pixels than
:attr:`ImageConfig.pixel_limit` is rejected from its header, before any pixel is decoded; a truncated file is
rejected, never half-decoded (``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set); a PNG whose text chunks would
decompress to an excessive size is rejected with ``image_metadata_too_large``. No global Pillow setting is changed.
Known gap: a PNG whose compressed stream ends *cleanly* before the last row (a malformed file, not a cut one) is
accepted by Pillow with the missing rows black; mmprep does not detect that case.

Two resamplers (:attr:`ImageConfig.resampler`):

- ``fast`` (the default): plain 8-bit JPEG (gray or colour) and 8-bit gray/RGB PNG without transparency or PNG
  orientation, recognised from their headers (:mod:`mmprep.images.fast`), are decoded by libjpeg-turbo through
  simplejpeg, scaled by 1/2, 1/4 or 1/8 in the DCT domain while the result stays at least as large as needed,
  and resampled with OpenCV's area filter (antialiased) for shrinking, the ``interpolation`` filter for
  enlarging. Every other file, and any file the fast decoder fails on, takes the Pillow path below, so the
  accept/reject decision and reason are Pillow's. Quality and speed of both: BENCHMARKS.md.
- ``pillow``: every file through Pillow. For JPEG (and MPO) files that are being shrunk, the decoder scales by
  1/2, 1/4 or 1/8 in the DCT domain (``Image.draft``), then ``Image.reduce`` shrinks by an integer factor before
  the final antialiased resample with the ``interpolation`` filter (``reducing_gap``).

Either way orientation is applied to the small resized result, not the full image.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import stat
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from mmprep.errors import InputError, UsageError

__all__ = [
    "DTYPES",
    "IMAGE_ERROR_REASONS",
    "INTERPOLATIONS",
    "LAYOUTS",
    "NORM_PRESETS",
    "OUTPUT_FORMATS",
    "RESAMPLERS",
    "RESIZE_MODES",
    "DecodedImage",
    "ImageConfig",
    "ImageError",
    "Normalization",
    "ResizePlan",
    "decoder_info",
    "encode_image",
    "load_image",
    "parse_color",
    "parse_image_size",
    "plan_resize",
    "resolve_image_path",
    "to_output",
]

RESIZE_MODES: tuple[str, ...] = ("stretch", "center-crop", "letterbox", "shortest-edge", "max-pixels", "none")
INTERPOLATIONS: tuple[str, ...] = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
DTYPES: tuple[str, ...] = ("uint8", "float16", "float32")
LAYOUTS: tuple[str, ...] = ("CHW", "HWC")
OUTPUT_FORMATS: tuple[str, ...] = ("png", "jpeg", "webp", "npy")
RESAMPLERS: tuple[str, ...] = ("fast", "pillow")

#: Per-channel (mean, std) in [0, 1] RGB, exactly as published with the models.
NORM_PRESETS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    # torchvision / timm ImageNet constants
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # OpenAI CLIP (clip/clip.py `_transform`; transformers CLIPImageProcessor / OPENAI_CLIP_MEAN/STD)
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}

#: Every reason code :class:`ImageError` can carry, with what it means.
IMAGE_ERROR_REASONS: dict[str, str] = {
    "image_missing": "the file does not exist",
    "image_unreadable": "the file exists but cannot be read (permissions, I/O error)",
    "image_not_a_file": "the path is a directory or a special file",
    "image_unidentified": "the content is not an image format Pillow recognises (or the file is empty)",
    "image_unsupported_format": "a recognised format that mmprep does not decode (EPS, PDF, ...)",
    "image_truncated": "the file ends before the image data does",
    "image_too_large": "the header declares more pixels than the pixel limit (decompression bomb guard)",
    "image_metadata_too_large": "a PNG text chunk decompresses to more than Pillow's safety limit",
    "image_invalid": "the file is damaged or its data cannot be decoded",
    "path_outside_root": "the manifest path points outside the image root",
    "path_invalid": "the manifest path is empty or not a valid path",
}

# Raster formats decoded by mmprep, most common first (Image.open tries them in this order). Formats that hand
# the file to an external program (EPS -> Ghostscript) or hold documents (PDF) are deliberately absent.
_FORMATS: tuple[str, ...] = (
    "JPEG", "PNG", "WEBP", "GIF", "MPO", "BMP", "DIB", "TIFF", "AVIF", "ICO", "PPM", "TGA", "JPEG2000", "QOI",
    "PCX", "SGI",
)
_available_formats: tuple[str, ...] | None = None

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

# EXIF orientation -> the transpose that displays the stored pixels upright (as ImageOps.exif_transpose).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})


# -- configuration ---------------------------------------------------------------------------------------------


#: The largest output side (and square root of the largest pixel budget) accepted: beyond it a single image slot
#: would not fit in memory or in one Arrow value.
MAX_SIDE = 16384


def _is_rgb(value: Any) -> bool:
    return (
        isinstance(value, (tuple, list))
        and len(value) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value)
    )


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True)
class ImageConfig:
    """How images are decoded and resized.

    Resize modes (``size`` is ``(height, width)``; ``w x h`` below is the image after EXIF orientation):

    - ``stretch``: resample to exactly ``size``, ignoring the aspect ratio.
    - ``center-crop``: scale so the image covers ``size`` (for a square size: the shorter side becomes the
      size), then cut the centre; output exactly ``size``. Computed as one resample of the centred source
      region, which is the same geometry as resize-then-crop without the intermediate image.
    - ``letterbox``: scale to fit inside ``size`` keeping the aspect ratio, centre it on a ``fill`` canvas of
      exactly ``size``; :attr:`DecodedImage.content_box` says where the image is, so padding masks can be built.
    - ``shortest-edge``: scale so the shorter side equals ``shortest_edge`` (aspect kept; variable output size).
      The longer side is *rounded* to the nearest pixel (640x427 -> 336x224), where torchvision and Hugging Face
      CLIP processors truncate (335x224): the two can differ by one pixel.
    - ``max-pixels``: keep the aspect ratio within a pixel budget, with the geometry of EasyR1's
      ``process_image`` (``verl/utils/dataset.py``): an image over ``max_pixels`` shrinks by
      ``sqrt(max_pixels / (w*h))``, then an image (still) under ``min_pixels`` grows by
      ``sqrt(min_pixels / (w*h))``; both steps truncate the sides with ``int()``. So ``w*h <= max_pixels`` always
      holds, while a grown image may fall just short of ``min_pixels`` (480x360 with ``min_pixels=500000`` ->
      816x612 = 499,392 pixels, as in EasyR1). One addition where EasyR1 would produce an empty side: a side
      that truncates to 0 becomes 1, and the other side is then capped at ``max_pixels``. Images inside the
      budget are not resampled. Variable output size.
    - ``none``: no resampling (orientation and colour conversion still apply).

    For every mode except ``letterbox`` the content box is the whole output.

    Attributes:
        size: ``(height, width)`` target for stretch, center-crop and letterbox.
        resize_mode: one of :data:`RESIZE_MODES`.
        interpolation: one of :data:`INTERPOLATIONS` (downscaling is antialiased for all but ``nearest``).
        background: RGB colour transparent pixels are composited over.
        fill: RGB colour of letterbox padding.
        shortest_edge: target shorter side for ``shortest-edge``.
        max_pixels: upper pixel budget for ``max-pixels``.
        min_pixels: lower pixel budget for ``max-pixels``.
        pixel_limit: images whose header declares more pixels are rejected (``image_too_large``). Pillow itself
            refuses anything over twice ``PIL.Image.MAX_IMAGE_PIXELS`` whatever this says.
        draft: let the JPEG decoder downscale in the DCT domain when shrinking (much faster, visually equal).
        reducing_gap: shrink by an integer factor first while the remaining factor stays above this value
            (``Image.resize(reducing_gap=...)``); None resamples the full image in one step. Pillow path only.
        resampler: ``fast`` (simplejpeg + OpenCV where the file allows, Pillow otherwise) or ``pillow`` (Pillow
            for every file, with the ``interpolation`` filter); see the module documentation.
    """

    size: tuple[int, int] | None = (224, 224)
    resize_mode: str = "center-crop"
    interpolation: str = "bicubic"
    background: tuple[int, int, int] = (255, 255, 255)
    fill: tuple[int, int, int] = (0, 0, 0)
    shortest_edge: int | None = None
    max_pixels: int | None = None
    min_pixels: int | None = None
    pixel_limit: int = 89_478_485
    draft: bool = True
    reducing_gap: float | None = 3.0
    resampler: str = "fast"

    def validate(self) -> None:
        """Check the combination of settings; raises :class:`~mmprep.errors.UsageError` naming the bad value."""
        if self.resize_mode not in RESIZE_MODES:
            raise UsageError(
                f"unknown resize mode '{self.resize_mode}'", hint="choose one of " + ", ".join(RESIZE_MODES)
            )
        if self.resampler not in RESAMPLERS:
            raise UsageError(f"unknown resampler '{self.resampler}'", hint="choose one of " + ", ".join(RESAMPLERS))
        if self.interpolation not in INTERPOLATIONS:
            raise UsageError(
                f"unknown interpolation '{self.interpolation}'", hint="choose one of " + ", ".join(INTERPOLATIONS)
            )
        if self.resize_mode in ("stretch", "center-crop", "letterbox"):
            if self.size is None:
                raise UsageError(
                    f"resize mode '{self.resize_mode}' needs an image size", hint="pass --image-size 224 or HxW"
                )
            size = self.size
            if not (isinstance(size, (tuple, list)) and len(size) == 2 and all(map(_positive_int, size))):
                raise UsageError(f"image size must be two positive integers (height, width), got {self.size!r}")
            if max(size) > MAX_SIDE:
                raise UsageError(f"--image-size {size[0]}x{size[1]} is out of range: each side must be 1 to "
                                 f"{MAX_SIDE:,} pixels")
        if self.resize_mode == "shortest-edge" and not _positive_int(self.shortest_edge):
            raise UsageError(
                f"resize mode 'shortest-edge' needs a positive shortest edge, got {self.shortest_edge!r}",
                hint="pass --shortest-edge N",
            )
        if self.resize_mode == "shortest-edge" and (self.shortest_edge or 0) > MAX_SIDE:
            raise UsageError(f"--shortest-edge {self.shortest_edge:,} is out of range: 1 to {MAX_SIDE:,} pixels")
        if self.resize_mode == "max-pixels":
            if self.max_pixels is None and self.min_pixels is None:
                raise UsageError(
                    "resize mode 'max-pixels' needs a pixel budget", hint="pass --max-pixels N and/or --min-pixels N"
                )
            for name in ("max_pixels", "min_pixels"):
                value = getattr(self, name)
                if value is not None and not _positive_int(value):
                    raise UsageError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
            if self.max_pixels is not None and self.min_pixels is not None and self.min_pixels > self.max_pixels:
                raise UsageError(
                    f"min-pixels ({self.min_pixels}) is larger than max-pixels ({self.max_pixels})",
                    hint="the budget must satisfy min-pixels <= max-pixels",
                )
        for name in ("background", "fill"):
            if not _is_rgb(getattr(self, name)):
                raise UsageError(f"{name} must be three integers 0-255 (R, G, B), got {getattr(self, name)!r}")
        if not _positive_int(self.pixel_limit):
            raise UsageError(f"pixel limit must be a positive integer, got {self.pixel_limit!r}")
        for name in ("max_pixels", "min_pixels", "pixel_limit"):
            value = getattr(self, name)
            if value is not None and value > MAX_SIDE * MAX_SIDE:
                raise UsageError(f"--{name.replace('_', '-')} {value:,} is out of range: 1 to "
                                 f"{MAX_SIDE * MAX_SIDE:,} pixels")
        if self.reducing_gap is not None and not (
            isinstance(self.reducing_gap, (int, float)) and self.reducing_gap >= 1.0
        ):
            raise UsageError(f"reducing gap must be None or >= 1.0, got {self.reducing_gap!r}")

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready values (for reports and metadata)."""
        return {
            "size": list(self.size) if self.size is not None else None,
            "resize_mode": self.resize_mode,
            "interpolation": self.interpolation,
            "background": list(self.background),
            "fill": list(self.fill),
            "shortest_edge": self.shortest_edge,
            "max_pixels": self.max_pixels,
            "min_pixels": self.min_pixels,
            "pixel_limit": self.pixel_limit,
            "draft": self.draft,
            "reducing_gap": self.reducing_gap,
            "resampler": self.resampler,
        }


def parse_image_size(text: str | int | Sequence[int]) -> tuple[int, int]:
    """Parse ``N`` (square) or ``HxW`` into ``(height, width)``; raises UsageError on anything else."""
    if isinstance(text, int) and not isinstance(text, bool):
        parts: list[str] = [str(text)]
    elif isinstance(text, (list, tuple)):
        parts = [str(v) for v in text]
    else:
        parts = str(text).strip().lower().replace("×", "x").split("x")
    try:
        values = [int(p.strip()) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or any(v <= 0 for v in values):
        raise UsageError(f"--image-size: invalid size '{text}'", hint="use N for a square or HxW, e.g. 224 or 336x448")
    return values[0], values[1]


def parse_color(text: str | Sequence[int]) -> tuple[int, int, int]:
    """Parse ``R,G,B``, ``#rrggbb`` or a colour name (``white``) into an RGB tuple; raises UsageError."""
    if isinstance(text, (list, tuple)):
        if _is_rgb(tuple(text)):
            return int(text[0]), int(text[1]), int(text[2])
        raise UsageError(f"invalid colour {text!r}", hint="use R,G,B with values 0-255, #rrggbb or a name")
    s = str(text).strip()
    if "," in s:
        try:
            values = tuple(int(p) for p in s.split(","))
        except ValueError:
            values = ()
        if _is_rgb(values):
            return values[0], values[1], values[2]
        raise UsageError(f"invalid colour '{s}'", hint="use R,G,B with values 0-255, #rrggbb or a name")
    from PIL import ImageColor

    try:
        rgb = ImageColor.getrgb(s)
    except ValueError:
        raise UsageError(f"invalid colour '{s}'", hint="use R,G,B with values 0-255, #rrggbb or a name") from None
    return rgb[0], rgb[1], rgb[2]


# -- geometry ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResizePlan:
    """Where the pixels go, for an upright image of a given size.

    Attributes:
        out_size: ``(width, height)`` of the output array.
        resized: ``(width, height)`` of the resampled content (smaller than ``out_size`` only for letterbox).
        src_box: ``(x0, y0, x1, y1)`` region of the upright source that is resampled (floats; center-crop only
            differs from the whole image).
        offset: ``(x, y)`` where the content is placed on the output.
        resample: False when the content is passed through at its own size.
    """

    out_size: tuple[int, int]
    resized: tuple[int, int]
    src_box: tuple[float, float, float, float]
    offset: tuple[int, int] = (0, 0)
    resample: bool = True

    @property
    def content_box(self) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` of real image content in output pixels."""
        x, y = self.offset
        return x, y, x + self.resized[0], y + self.resized[1]


def plan_resize(width: int, height: int, cfg: ImageConfig) -> ResizePlan:
    """Compute the output geometry for an upright ``width x height`` image (see :class:`ImageConfig`)."""
    w, h = max(1, width), max(1, height)
    full = (0.0, 0.0, float(w), float(h))
    mode = cfg.resize_mode
    if mode == "none":
        return ResizePlan((w, h), (w, h), full, resample=False)
    if mode in ("stretch", "center-crop", "letterbox"):
        assert cfg.size is not None
        th, tw = cfg.size
        if mode == "stretch":
            return ResizePlan((tw, th), (tw, th), full)
        if mode == "center-crop":
            scale = max(tw / w, th / h)
            cw, ch = min(w, tw / scale), min(h, th / scale)
            x0, y0 = (w - cw) / 2.0, (h - ch) / 2.0
            return ResizePlan((tw, th), (tw, th), (x0, y0, x0 + cw, y0 + ch))
        scale = min(tw / w, th / h)
        nw = min(tw, max(1, round(w * scale)))
        nh = min(th, max(1, round(h * scale)))
        return ResizePlan((tw, th), (nw, nh), full, ((tw - nw) // 2, (th - nh) // 2))
    if mode == "shortest-edge":
        edge = int(cfg.shortest_edge or 0)
        if w <= h:
            nw, nh = edge, max(1, round(h * edge / w))
        else:
            nw, nh = max(1, round(w * edge / h)), edge
        return ResizePlan((nw, nh), (nw, nh), full, resample=(nw, nh) != (w, h))
    if mode == "max-pixels":
        # EasyR1's process_image: shrink, then grow, each step truncating with int() (see ImageConfig)
        nw, nh = w, h
        if cfg.max_pixels is not None and nw * nh > cfg.max_pixels:
            factor = math.sqrt(cfg.max_pixels / (nw * nh))
            nw, nh = max(1, int(nw * factor)), max(1, int(nh * factor))
            if nw * nh > cfg.max_pixels:  # only when a side was raised from 0 to 1: cap the other one
                nw, nh = (1, cfg.max_pixels) if nw == 1 else (cfg.max_pixels, 1)
        if cfg.min_pixels is not None and nw * nh < cfg.min_pixels:
            factor = math.sqrt(cfg.min_pixels / (nw * nh))
            nw, nh = int(nw * factor), int(nh * factor)  # factor > 1, so no side becomes 0
        return ResizePlan((nw, nh), (nw, nh), full, resample=(nw, nh) != (w, h))
    raise UsageError(f"unknown resize mode '{mode}'", hint="choose one of " + ", ".join(RESIZE_MODES))


def _box_to_stored(
    box: tuple[float, float, float, float], orientation: int, ws: int, hs: int
) -> tuple[float, float, float, float]:
    """Map a box in upright coordinates onto the stored (pre-orientation) image of size ``ws x hs``."""
    x0, y0, x1, y1 = box
    if orientation == 2:
        return ws - x1, y0, ws - x0, y1
    if orientation == 3:
        return ws - x1, hs - y1, ws - x0, hs - y0
    if orientation == 4:
        return x0, hs - y1, x1, hs - y0
    if orientation == 5:
        return y0, x0, y1, x1
    if orientation == 6:
        return y0, hs - x1, y1, hs - x0
    if orientation == 7:
        return ws - y1, hs - x1, ws - y0, hs - x0
    if orientation == 8:
        return ws - y1, x0, ws - y0, x1
    return box


# -- decoding ------------------------------------------------------------------------------------------------------


class ImageError(Exception):
    """One image that could not be used: a machine-readable ``reason`` and a human ``detail`` naming the file."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across worker processes
        return (ImageError, (self.reason, self.detail))


@dataclass(frozen=True)
class DecodedImage:
    """A decoded, oriented, resized RGB image.

    Attributes:
        array: uint8 ``(H, W, 3)`` RGB, C-contiguous (read-only).
        original_size: ``(width, height)`` after EXIF orientation, before resizing.
        content_box: ``(x0, y0, x1, y1)`` in output pixels holding real image content (the whole output except
            for letterbox).
        source_format: the format Pillow identified from the content (``JPEG``, ``PNG``, ...).
        source_mode: the Pillow mode of the file (``RGB``, ``CMYK``, ``P``, ``I;16``, ...).
        n_frames: frames in the file (only the first is decoded): the count the header declares (APNG, WebP,
            MPO, ...); for GIF and TIFF, which declare none, 1 for a still image and None for an animated one
            (counting would mean parsing every frame).
        orientation: the EXIF orientation that was applied (1 = none).
        notes: warnings the decoder raised for this file (e.g. corrupt EXIF), which did not stop decoding.
    """

    array: np.ndarray
    original_size: tuple[int, int]
    content_box: tuple[int, int, int, int]
    source_format: str = ""
    source_mode: str = ""
    n_frames: int | None = 1
    orientation: int = 1
    notes: tuple[str, ...] = field(default=())


def _formats() -> tuple[str, ...]:
    global _available_formats
    if _available_formats is None:
        Image.init()
        _available_formats = tuple(f for f in _FORMATS if f in Image.OPEN)
    return _available_formats


def _name(source: str | os.PathLike[str] | bytes) -> str:
    return "<bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else os.fspath(source)


def _decode_failure(exc: BaseException, name: str) -> ImageError:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, Image.DecompressionBombError):
        return ImageError("image_too_large", f"{name}: {text} (Pillow's own limit, 2 x PIL.Image.MAX_IMAGE_PIXELS)")
    if "truncated" in text.lower() or isinstance(exc, EOFError):
        return ImageError("image_truncated", f"{name}: {text}")
    if isinstance(exc, ValueError) and ("MAX_TEXT_CHUNK" in text or "MAX_TEXT_MEMORY" in text):
        return ImageError("image_metadata_too_large", f"{name}: {text}")
    if isinstance(exc, MemoryError):
        return ImageError("image_too_large", f"{name}: out of memory while decoding")
    return ImageError("image_invalid", f"{name}: {type(exc).__name__}: {text}")


def _frame_count(im: Image.Image) -> int | None:
    """Frames in the file as far as its header tells: the declared count (APNG, WebP, MPO, ...), or for formats
    that declare none (GIF, TIFF: Pillow counts them by parsing every frame, seconds for a million frames) 1 for
    a still image and None for an animated one, found by looking for a second frame only. A damaged later frame
    is not our problem (only the first is decoded): the file then counts as a still image."""
    try:
        if isinstance(getattr(type(im), "n_frames", None), property):
            return None if getattr(im, "is_animated", False) else 1
        return int(getattr(im, "n_frames", 1) or 1)
    except Exception:
        return 1


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block never stops decoding; the image is used as stored
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _high_depth_to_8bit(im: Image.Image) -> Image.Image:
    """16/32-bit integer or float grayscale -> ``L`` (or ``LA`` when a transparent value is set), scaled."""
    arr = np.asarray(im)
    if arr.dtype.kind == "f":
        a = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        hi = float(a.max()) if a.size else 0.0
        scaled = a * 255.0 if hi <= 1.0 else a
        out = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    else:
        a = np.clip(arr.astype(np.int64), 0, 65535)
        out = ((a * 255 + 32767) // 65535).astype(np.uint8)
    trns = im.info.get("transparency")
    if isinstance(trns, int) and not isinstance(trns, bool):
        alpha = np.where(arr == trns, 0, 255).astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(np.stack([out, alpha], axis=-1)), "LA")
    return Image.fromarray(np.ascontiguousarray(out), "L")


def _to_working_mode(im: Image.Image) -> Image.Image:
    """Convert to one of L, LA, RGB, RGBA (alpha kept for compositing after the resize)."""
    mode = im.mode
    has_trns = "transparency" in im.info
    if mode in _HIGH_DEPTH_MODES:
        return _high_depth_to_8bit(im)
    if mode in ("P", "PA"):
        return im.convert("RGBA" if (has_trns or mode == "PA") else "RGB")
    if has_trns and mode in ("1", "L"):
        return im.convert("LA")
    if has_trns and mode == "RGB":
        return im.convert("RGBA")
    if mode in ("L", "RGB", "RGBA", "LA"):
        return im
    if mode == "1":
        return im.convert("L")
    if mode == "RGBa":
        return im.convert("RGBA")
    if mode == "La":
        return im.convert("LA")
    return im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX


def _to_rgb(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA"):
        canvas = Image.new("RGB", im.size, background)
        canvas.paste(im.convert("RGB"), (0, 0), im.getchannel("A"))
        return canvas
    return im.convert("RGB")


def load_image(source: str | os.PathLike[str] | bytes, cfg: ImageConfig) -> DecodedImage:
    """Decode one image file (or its bytes) into an upright, resized 8-bit RGB array.

    Args:
        source: a path, or the encoded bytes of an image.
        cfg: decoding and resizing settings (assumed valid; call :meth:`ImageConfig.validate` once up front).

    Returns:
        The decoded image with its original (upright) size and content box.

    Raises:
        ImageError: with a reason from :data:`IMAGE_ERROR_REASONS`; nothing else for a bad file.

    Pillow's warnings for the file (corrupt EXIF, malformed MPO, ...) are captured into
    :attr:`DecodedImage.notes` with ``warnings.catch_warnings``, which Python < 3.14 implements with
    process-wide state: run concurrent decodes in processes (as mmprep does), not threads.
    """
    name = _name(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if cfg.resampler == "fast":
            fast = _decode_fast(source, cfg)
            if fast is not None:
                return fast
        return _decode(io.BytesIO(bytes(source)), name, cfg)
    path = os.fspath(source)
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise ImageError("image_missing", f"{name}: no such file") from None
    except PermissionError:
        raise ImageError("image_unreadable", f"{name}: permission denied") from None
    except (OSError, ValueError) as exc:
        raise ImageError("image_unreadable", f"{name}: {getattr(exc, 'strerror', None) or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise ImageError("image_not_a_file", f"{name}: is {kind}")
    if st.st_size == 0:
        raise ImageError("image_unidentified", f"{name}: empty file (0 bytes)")
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below, after the decoder is done with it
    except PermissionError:
        raise ImageError("image_unreadable", f"{name}: permission denied") from None
    except OSError as exc:
        raise ImageError("image_unreadable", f"{name}: {exc.strerror or exc}") from None
    with fh:
        if cfg.resampler == "fast" and st.st_size <= _FAST_READ_LIMIT:
            try:
                candidate = _fast_candidate(fh.read(8))  # read whole only when the fast path may take it
                fh.seek(0)
                data = fh.read() if candidate else b""
            except OSError as exc:
                raise ImageError("image_unreadable", f"{name}: {exc.strerror or exc}") from None
            if data:
                fast = _decode_fast(data, cfg)
                if fast is not None:
                    return fast
                return _decode(io.BytesIO(data), name, cfg)
        return _decode(fh, name, cfg)


#: Files up to this size are read whole for the fast path (larger ones are streamed through Pillow).
_FAST_READ_LIMIT = 64 << 20


def _fast_candidate(prefix: bytes) -> bool:
    """Whether a file starting with these 8 bytes is a JPEG or PNG (the formats the fast path may take)."""
    return prefix[:3] == b"\xff\xd8\xff" or prefix == b"\x89PNG\r\n\x1a\n"


def _decode_fast(data: bytes | bytearray | memoryview, cfg: ImageConfig) -> DecodedImage | None:
    """The fast path (:mod:`mmprep.images.fast`), or None when the file is one for Pillow (not qualifying from
    its header, over the pixel limit, or failing in the fast decoder: Pillow then gives the verdict)."""
    from mmprep.images import fast

    head = fast.probe(data)
    if head is None:
        return None
    ws, hs = head.width, head.height
    if ws * hs > cfg.pixel_limit:
        return None  # rejected by the Pillow path, with its message
    orientation = head.orientation
    transposed = orientation >= 5
    uw, uh = (hs, ws) if transposed else (ws, hs)
    plan = plan_resize(uw, uh, cfg)
    try:
        if head.format == "JPEG":
            need = None
            if cfg.draft and plan.resample:
                bw = plan.src_box[2] - plan.src_box[0]
                bh = plan.src_box[3] - plan.src_box[1]
                need_w = math.ceil(uw * plan.resized[0] / bw)
                need_h = math.ceil(uh * plan.resized[1] / bh)
                need = (need_h, need_w) if transposed else (need_w, need_h)
            scale = fast.jpeg_scale(ws, hs, need)
            arr = fast.decode_jpeg(data, head, scale)
        else:
            scale = 1
            arr = fast.decode_png(data, head)
    except fast.FastDecodeError:
        return None
    if plan.resample:
        x0, y0, x1, y1 = _box_to_stored(plan.src_box, orientation, ws, hs)
        rw, rh = plan.resized
        arr = fast.resample(arr, (x0 / scale, y0 / scale, x1 / scale, y1 / scale),
                            (rh, rw) if transposed else (rw, rh), cfg.interpolation)
    rgb = fast.to_rgb(fast.orient(arr, orientation), bgr=head.format == "PNG")
    if plan.out_size != plan.resized:
        canvas = np.empty((plan.out_size[1], plan.out_size[0], 3), dtype=np.uint8)
        canvas[...] = cfg.fill
        x, y = plan.offset
        canvas[y : y + rgb.shape[0], x : x + rgb.shape[1]] = rgb
        rgb = canvas
    if rgb.shape != (plan.out_size[1], plan.out_size[0], 3):
        return None
    rgb.flags.writeable = False
    return DecodedImage(rgb, (uw, uh), plan.content_box, head.format, head.mode, 1, orientation)


def decoder_info(cfg: ImageConfig) -> dict[str, Any]:
    """The resampler and the versions of the libraries that decode with it (recorded with packed data)."""
    import PIL

    libraries = {"pillow": str(PIL.__version__)}
    if cfg.resampler == "fast":
        from mmprep.images import fast

        try:
            libraries.update(fast.library_versions())
        except ImportError as exc:
            raise UsageError(f"the fast resampler cannot load {exc.name or 'its libraries'}: {exc}",
                             hint="reinstall mmprep's dependencies (simplejpeg, opencv-python-headless), or pass "
                                  "--resampler pillow") from None
    return {"resampler": cfg.resampler, "libraries": libraries}


def _decode(fp: Any, name: str, cfg: ImageConfig) -> DecodedImage:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            im = Image.open(fp, formats=_formats())
        except UnidentifiedImageError:
            raise _unidentified(fp, name) from None
        except Exception as exc:
            raise _decode_failure(exc, name) from None
        try:
            result = _decode_opened(im, name, cfg)
        finally:
            im.close()
    notes = tuple(
        dict.fromkeys(
            str(w.message)
            for w in caught
            if not issubclass(w.category, (ResourceWarning, DeprecationWarning, Image.DecompressionBombWarning))
        )
    )
    if notes:
        result = DecodedImage(
            result.array, result.original_size, result.content_box, result.source_format, result.source_mode,
            result.n_frames, result.orientation, notes,
        )
    return result


def _unidentified(fp: Any, name: str) -> ImageError:
    """Tell an unsupported-but-known format (EPS, PDF, ...) from bytes that are no image at all."""
    try:
        fp.seek(0)
        with Image.open(fp) as other:
            return ImageError("image_unsupported_format", f"{name}: {other.format} files are not decoded by mmprep")
    except Exception:
        return ImageError("image_unidentified", f"{name}: not a recognised image format")


def _decode_opened(im: Image.Image, name: str, cfg: ImageConfig) -> DecodedImage:
    ws, hs = im.size
    if ws <= 0 or hs <= 0:
        raise ImageError("image_invalid", f"{name}: image declares an empty size {ws}x{hs}")
    if ws * hs > cfg.pixel_limit:
        raise ImageError(
            "image_too_large",
            f"{name}: {ws}x{hs} = {ws * hs:,} pixels exceeds the pixel limit of {cfg.pixel_limit:,}",
        )
    fmt = im.format or ""
    source_mode = im.mode
    n_frames = _frame_count(im)
    try:
        # JPEG keeps EXIF in its header, so orientation is known before decoding (needed to draft the right
        # size); other formats may keep it after the pixel data (PNG eXIf), so they are read after load().
        orientation = _orientation(im) if fmt in ("JPEG", "MPO") else 1
        transposed = False
        plan: ResizePlan | None = None
        scale = 1.0
        if fmt in ("JPEG", "MPO"):
            transposed = orientation >= 5
            uw, uh = (hs, ws) if transposed else (ws, hs)
            plan = plan_resize(uw, uh, cfg)
            if cfg.draft and plan.resample:
                bw = plan.src_box[2] - plan.src_box[0]
                bh = plan.src_box[3] - plan.src_box[1]
                need_w = math.ceil(uw * plan.resized[0] / bw)
                need_h = math.ceil(uh * plan.resized[1] / bh)
                if transposed:
                    need_w, need_h = need_h, need_w
                if need_w < ws and need_h < hs:
                    drafted = im.draft(None, (need_w, need_h))
                    if drafted is not None:
                        scale = drafted[1][2] / ws
        im.load()
        if fmt not in ("JPEG", "MPO"):
            orientation = _orientation(im)
            transposed = orientation >= 5
            uw, uh = (hs, ws) if transposed else (ws, hs)
            plan = plan_resize(uw, uh, cfg)
        assert plan is not None
        work = _to_working_mode(im)
        if plan.resample:
            box = _box_to_stored(plan.src_box, orientation, ws, hs)
            if scale != 1.0:
                box = (box[0] * scale, box[1] * scale, box[2] * scale, box[3] * scale)
            rw, rh = plan.resized
            target = (rh, rw) if transposed else (rw, rh)
            work = work.resize(target, _RESAMPLE[cfg.interpolation], box=box, reducing_gap=cfg.reducing_gap)
        if orientation in _TRANSPOSE:
            work = work.transpose(_TRANSPOSE[orientation])
        rgb = _to_rgb(work, cfg.background)
        if plan.out_size != plan.resized:
            canvas = Image.new("RGB", plan.out_size, cfg.fill)
            canvas.paste(rgb, plan.offset)
            rgb = canvas
        array = np.asarray(rgb)
    except ImageError:
        raise
    except Exception as exc:
        raise _decode_failure(exc, name) from None
    if array.shape != (plan.out_size[1], plan.out_size[0], 3) or array.dtype != np.uint8:
        raise ImageError("image_invalid", f"{name}: decoded to an unexpected array {array.shape} {array.dtype}")
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    return DecodedImage(array, (uw, uh), plan.content_box, fmt, source_mode, n_frames, orientation)


# -- paths ----------------------------------------------------------------------------------------------------------


def resolve_image_path(ref: str, root: str | os.PathLike[str], allow_outside: bool = False) -> Path:
    """Turn an image reference from a manifest into the path to open, refusing to leave the image root.

    Relative references are joined to ``root``; absolute ones are taken as they are. Unless ``allow_outside``,
    the reference must stay inside ``root`` once ``..`` and symbolic links are resolved.

    Args:
        ref: the path as written in the manifest.
        root: the image root directory.
        allow_outside: accept references that resolve outside ``root``.

    Returns:
        The path to open: the fully resolved path when the root check ran (what was checked is what is
        opened), else the joined path.

    Raises:
        ImageError: ``path_invalid`` for an empty reference or one with a NUL byte; ``path_outside_root`` when
            it escapes the root.
    """
    if not isinstance(ref, str) or not ref.strip() or "\x00" in ref:
        raise ImageError("path_invalid", f"invalid image path {ref!r}")
    absolute = os.path.isabs(ref)
    if allow_outside:
        return Path(ref) if absolute else Path(root) / ref
    root_real = _realpath_cached(os.path.abspath(root))
    real = os.path.realpath(ref) if absolute else _realpath_under(root_real, ref)
    if real != root_real and not real.startswith(root_real.rstrip(os.sep) + os.sep):
        raise ImageError(
            "path_outside_root",
            f"{ref}: resolves to {real}, outside the image root {root_real}",
        )
    return Path(real)


@functools.lru_cache(maxsize=64)
def _realpath_cached(root: str) -> str:
    """The resolved image root (a run resolves thousands of references against the same few roots)."""
    return os.path.realpath(root)


def _realpath_under(root_real: str, ref: str) -> str:
    """``os.path.realpath(root_real / ref)`` for a relative ``ref`` and an already resolved root: only the
    components of ``ref`` are looked at (``os.path.realpath`` would ``lstat`` every component of the root again,
    for every image). Anything unusual (a symbolic link, a missing component) is left to ``os.path.realpath``."""
    path = root_real
    for part in ref.split(os.sep):
        if part in ("", "."):
            continue
        if part == "..":  # every component so far is a real directory, so its parent is what .. means
            path = os.path.dirname(path)
            continue
        nxt = os.path.join(path, part)
        try:
            st = os.lstat(nxt)
        except OSError:
            return os.path.realpath(os.path.join(root_real, ref))
        if stat.S_ISLNK(st.st_mode):
            return os.path.realpath(os.path.join(root_real, ref))
        path = nxt
    return path


# -- normalisation ----------------------------------------------------------------------------------------------------


def _triple(value: Any, what: str) -> tuple[float, float, float]:
    if isinstance(value, str):
        parts: list[Any] = [p for p in value.replace(" ", ",").split(",") if p]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        parts = [value]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:  # None, a bool, an object: not numbers
        raise UsageError(f"{what} must be 1 or 3 numbers, got {value!r}", hint="e.g. 0.5,0.5,0.5")
    try:
        if any(isinstance(p, bool) for p in parts):
            raise TypeError("a bool is not a number")
        floats = [float(p) for p in parts]
    except (TypeError, ValueError):
        raise UsageError(f"{what} must be numbers, got {value!r}", hint="e.g. 0.5,0.5,0.5") from None
    if len(floats) == 1:
        floats = floats * 3
    if len(floats) != 3 or not all(math.isfinite(f) for f in floats):
        raise UsageError(f"{what} needs 1 or 3 finite numbers (R, G, B), got {value!r}", hint="e.g. 0.5,0.5,0.5")
    return floats[0], floats[1], floats[2]


@dataclass(frozen=True)
class Normalization:
    """How decoded uint8 RGB becomes the stored array.

    ``uint8`` output keeps the pixels as they are (mean/std are only recorded as metadata, for the training side
    to apply); ``float16``/``float32`` output stores ``(pixel / 255 - mean) / std``.

    Attributes:
        mean: per-channel mean in [0, 1].
        std: per-channel standard deviation in [0, 1] (positive).
        dtype: ``uint8``, ``float16`` or ``float32``.
        layout: ``CHW`` (channels first, the default) or ``HWC``.
        preset: the preset name the constants came from, if any (metadata).
    """

    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    dtype: str = "uint8"
    layout: str = "CHW"
    preset: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise UsageError(f"unknown dtype '{self.dtype}'", hint="choose one of " + ", ".join(DTYPES))
        if self.layout not in LAYOUTS:
            raise UsageError(f"unknown layout '{self.layout}'", hint="choose one of " + ", ".join(LAYOUTS))
        if len(self.mean) != 3 or len(self.std) != 3:
            raise UsageError("mean and std need three values (R, G, B)")
        if not all(math.isfinite(s) and s > 0 for s in self.std):
            raise UsageError(f"std values must be positive, got {list(self.std)}")
        if not all(math.isfinite(m) for m in self.mean):
            raise UsageError(f"mean values must be finite, got {list(self.mean)}")

    @classmethod
    def from_spec(
        cls,
        preset: str | None = None,
        mean: Any = None,
        std: Any = None,
        stats_file: str | os.PathLike[str] | None = None,
        dtype: str = "uint8",
        layout: str = "CHW",
    ) -> Normalization:
        """Build from CLI-style settings: a preset, explicit mean/std, or a statistics file (at most one).

        Args:
            preset: ``imagenet``, ``clip`` or None (``none`` is accepted as None).
            mean: 1 or 3 numbers (a sequence, or a string ``"0.5,0.5,0.5"``); needs ``std`` too.
            std: as ``mean``.
            stats_file: JSON with top-level ``mean`` and ``std`` lists (``mmprep image-stats --json`` output).
            dtype: ``uint8``, ``float16`` or ``float32``.
            layout: ``CHW`` or ``HWC``.

        Raises:
            UsageError: conflicting or invalid settings. InputError: an unreadable or malformed stats file.
        """
        if preset is not None and preset.lower() == "none":
            preset = None
        given = [n for n, v in (("--norm", preset), ("--mean/--std", mean if mean is not None else std),
                                ("--stats-file", stats_file)) if v is not None]
        if len(given) > 1:
            raise UsageError(f"{' and '.join(given)} both set the normalisation", hint="give only one of them")
        layout = layout.upper() if isinstance(layout, str) else layout
        if preset is not None:
            key = preset.lower()
            if key not in NORM_PRESETS:
                raise UsageError(f"unknown normalisation preset '{preset}'", hint="choose one of "
                                 + ", ".join(NORM_PRESETS))
            m, s = NORM_PRESETS[key]
            return cls(m, s, dtype, layout, key)
        if mean is not None or std is not None:
            if mean is None or std is None:
                raise UsageError("--mean and --std must be given together")
            return cls(_triple(mean, "mean"), _triple(std, "std"), dtype, layout)
        if stats_file is not None:
            m, s = _read_stats_file(stats_file)
            return cls(m, s, dtype, layout, f"stats:{Path(stats_file).name}")
        return cls(dtype=dtype, layout=layout)

    @property
    def normalizes(self) -> bool:
        """True when the stored values are normalised floats rather than raw uint8 pixels."""
        return self.dtype != "uint8"

    def to_dict(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std), "dtype": self.dtype, "layout": self.layout,
                "preset": self.preset, "applied": self.normalizes}


def _read_stats_file(path: str | os.PathLike[str]) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(
            f"{p}: no such statistics file", hint="write one with: mmprep image-stats SRC --out FILE"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{p}: cannot read statistics file: {exc}") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{p}:{exc.lineno}: invalid JSON in statistics file: {exc.msg}") from None
    if isinstance(data, dict) and "mean" not in data and isinstance(data.get("stats"), dict):
        data = data["stats"]
    if not isinstance(data, dict) or "mean" not in data or "std" not in data:
        raise InputError(f"{p}: statistics file needs top-level 'mean' and 'std' lists",
                         hint="write one with: mmprep image-stats SRC --out FILE")
    try:
        return _triple(data["mean"], f"{p}: mean"), _triple(data["std"], f"{p}: std")
    except UsageError as exc:
        raise InputError(exc.message, hint=exc.hint) from None


@functools.lru_cache(maxsize=32)
def _lut(mean: tuple[float, float, float], std: tuple[float, float, float], dtype: str) -> np.ndarray:
    """``(3, 256)`` table of normalised values for every uint8 level of every channel."""
    levels = np.arange(256, dtype=np.float64) / 255.0
    table = (levels[None, :] - np.asarray(mean)[:, None]) / np.asarray(std)[:, None]
    return np.ascontiguousarray(table.astype(dtype))


def to_output(array_uint8_hwc: np.ndarray, norm: Normalization, out: np.ndarray | None = None) -> np.ndarray:
    """Apply the normalisation's dtype and layout to a uint8 ``(H, W, 3)`` array.

    Returns a new C array, or fills ``out`` (an array of the output's shape and dtype, such as one slot of a
    padded batch) and returns it, so no intermediate copy is made.

    float16 values are looked up in a per-level table computed in float64 (exactly rounded, and faster than
    arithmetic plus a cast); float32 values are computed as ``pixel * (1 / (255 std)) - mean / std``.
    """
    arr = array_uint8_hwc
    src = arr.transpose(2, 0, 1) if norm.layout == "CHW" else arr
    if out is None:
        out = np.empty(src.shape, dtype=np.dtype(norm.dtype))
    elif out.shape != src.shape or out.dtype != np.dtype(norm.dtype):
        raise ValueError(f"out has shape {out.shape} {out.dtype}, expected {src.shape} {norm.dtype}")
    if norm.dtype == "uint8":
        if norm.layout == "CHW" and arr.ndim == 3 and arr.shape[2] == 3 and out.flags.c_contiguous:
            _split_planes(arr, out)
        else:
            np.copyto(out, src)
        return out
    chans = (lambda a, c: a[c]) if norm.layout == "CHW" else (lambda a, c: a[..., c])
    if norm.dtype == "float16":
        lut = _lut(tuple(norm.mean), tuple(norm.std), "float16")
        for c in range(3):
            np.take(lut[c], chans(src, c), out=chans(out, c))
        return out
    scale = (1.0 / (255.0 * np.asarray(norm.std, dtype=np.float64))).astype(np.float32)
    offset = (-np.asarray(norm.mean, dtype=np.float64) / np.asarray(norm.std, dtype=np.float64)).astype(np.float32)
    shape = (3, 1, 1) if norm.layout == "CHW" else (3,)
    np.multiply(src, scale.reshape(shape), out=out)
    out += offset.reshape(shape)
    return out


def _split_planes(arr: np.ndarray, out: np.ndarray) -> None:
    """``out[c] = arr[..., c]`` for an ``(H, W, 3)`` uint8 array into a C-contiguous ``(3, H, W)`` one, with OpenCV's
    SIMD split (3x faster than numpy's strided copy); numpy's copy when OpenCV did not write into ``out``."""
    import cv2

    planes = [out[0], out[1], out[2]]
    done = cv2.split(np.ascontiguousarray(arr), planes)
    if any(d.ctypes.data != p.ctypes.data for d, p in zip(done, planes, strict=True)):
        np.copyto(out, arr.transpose(2, 0, 1))


# -- encoding ---------------------------------------------------------------------------------------------------------


def encode_image(array_uint8_hwc: np.ndarray, fmt: str = "png", quality: int = 90) -> bytes:
    """Encode an array as file bytes: ``png``, ``jpeg``, ``webp`` (uint8 HxWx3) or ``npy`` (any array).

    Args:
        array_uint8_hwc: the pixels (for ``npy``, whatever :func:`to_output` produced).
        fmt: one of :data:`OUTPUT_FORMATS` (``jpg`` is accepted for ``jpeg``).
        quality: 1-100 for JPEG and WebP (ignored by PNG and npy).
    """
    fmt = fmt.lower()
    if fmt == "jpg":
        fmt = "jpeg"
    if fmt not in OUTPUT_FORMATS:
        raise UsageError(f"unknown output format '{fmt}'", hint="choose one of " + ", ".join(OUTPUT_FORMATS))
    if not (isinstance(quality, int) and 1 <= quality <= 100):
        raise UsageError(f"quality must be an integer 1-100, got {quality!r}")
    buf = io.BytesIO()
    if fmt == "npy":
        np.save(buf, np.ascontiguousarray(array_uint8_hwc), allow_pickle=False)
        return buf.getvalue()
    arr = array_uint8_hwc
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise UsageError(f"{fmt} output needs a uint8 HxWx3 array, got {arr.dtype} {arr.shape}",
                         hint="use --format npy for normalised or channels-first arrays")
    im = Image.fromarray(np.ascontiguousarray(arr), "RGB")
    if fmt == "png":
        im.save(buf, "PNG")
    elif fmt == "jpeg":
        im.save(buf, "JPEG", quality=quality)
    else:
        im.save(buf, "WEBP", quality=quality)
    return buf.getvalue()
