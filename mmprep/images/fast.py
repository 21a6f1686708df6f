"""The fast image path: libjpeg-turbo DCT-scaled decoding (simplejpeg) and OpenCV area resampling, for the files
that need nothing else, recognised from their headers before any pixel is decoded.

What qualifies (:func:`probe`):

- JPEG: baseline, extended or progressive Huffman-coded, 8 bits per sample, 1 (gray) or 3 (YCbCr/RGB) components,
  one EXIF block at most (its orientation read here) and no XMP orientation to look for, not an MPO;
- PNG: 8-bit gray or RGB, no transparency (``tRNS``), no orientation (``eXIf``, EXIF or XMP in text chunks), no
  animation, no compressed text, only well-known chunks with valid checksums, complete up to ``IEND``.

Everything else returns None and is decoded by Pillow (:mod:`mmprep.images.decode`), which also takes over when
a qualifying file fails here (:class:`FastDecodeError`): the fast path never decides that a file is bad.

simplejpeg and OpenCV are imported on first use, never when this module is imported. OpenCV's own thread pool is
left as it is; the pack workers set it to one thread (parallelism there comes from the processes).
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "FastDecodeError",
    "Header",
    "decode_jpeg",
    "decode_png",
    "library_versions",
    "orient",
    "probe",
    "resample",
    "to_rgb",
]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_XMP_PREFIX = b"http://ns.adobe.com/xap/1.0/\x00"
# PNG chunks the fast path leaves to Pillow: transparency, orientation, animation.
_PNG_PILLOW_CHUNKS = frozenset({b"tRNS", b"eXIf", b"acTL", b"fcTL", b"fdAT"})
_PNG_CRITICAL = frozenset({b"IHDR", b"PLTE", b"IDAT", b"IEND"})
_PNG_TEXT = frozenset({b"tEXt", b"zTXt", b"iTXt"})
# Text keys Pillow reads orientation from (the XMP one only when it holds an orientation).
_PNG_EXIF_KEYS = frozenset({b"exif", b"Raw profile type exif"})
_XMP_KEY = b"XML:com.adobe.xmp"
_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(="|>)([0-9])')  # as PIL.Image.Image.getexif
# Pillow's limits on PNG metadata (PngImagePlugin.MAX_TEXT_CHUNK, per chunk decompressed); files with more go to
# Pillow, which refuses them with its own reason.
_TEXT_LIMIT = 1 << 20
# JPEG start-of-frame markers the fast path decodes: baseline, extended sequential, progressive (Huffman, DCT).
_SOF_FAST = frozenset({0xC0, 0xC1, 0xC2})
_SOF_ALL = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


class FastDecodeError(Exception):
    """The fast decoder could not decode a file its header admitted (Pillow decides what is wrong with it)."""


@dataclass(frozen=True)
class Header:
    """What the fast path needs to know about a file before decoding it.

    Attributes:
        format: ``JPEG`` or ``PNG`` (Pillow's names).
        width: stored width (before orientation).
        height: stored height.
        channels: 1 (gray) or 3.
        orientation: EXIF orientation, 1-8 (1 when absent or out of range, as Pillow reads it).
    """

    format: str
    width: int
    height: int
    channels: int
    orientation: int = 1

    @property
    def mode(self) -> str:
        """The Pillow mode of the file (``L`` or ``RGB``)."""
        return "L" if self.channels == 1 else "RGB"


def probe(data: bytes | bytearray | memoryview) -> Header | None:
    """The header of a file the fast path decodes, or None when it is anything else (a job for Pillow)."""
    if data[:3] == b"\xff\xd8\xff":
        return _probe_jpeg(data)
    if data[:8] == _PNG_SIGNATURE:
        return _probe_png(data)
    return None


def _probe_jpeg(data: Any) -> Header | None:
    n = len(data)
    i = 2
    sof: tuple[int, int, int] | None = None
    orientation: int | None = None
    exif_blocks = 0
    xmp = False
    while True:
        if i + 4 > n:
            return None
        if data[i] != 0xFF:
            return None  # junk between segments: Pillow copes (or not) with it
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xDA:  # start of scan: the header is complete
            break
        if marker in (0xD8, 0xD9, 0x01) or 0xD0 <= marker <= 0xD7:
            return None  # a marker without a segment where a segment belongs
        length = (data[i + 2] << 8) | data[i + 3]
        end = i + 2 + length
        if length < 2 or end > n:
            return None
        if marker == 0xE1:
            seg = data[i + 4 : end]
            if seg[:6] == b"Exif\x00\x00":
                exif_blocks += 1
                orientation = _exif_orientation(bytes(seg[6:]))
                if orientation is None:
                    return None
                if orientation == 0:  # no orientation tag
                    orientation = None
            elif seg[: len(_XMP_PREFIX)] == _XMP_PREFIX and _xmp_orientation(bytes(seg)) != 1:
                xmp = True
        elif marker == 0xE2 and data[i + 4 : i + 8] == b"MPF\x00":
            return None  # MPO: Pillow reports its frames
        elif marker in _SOF_ALL:
            if marker not in _SOF_FAST or sof is not None or length < 8:
                return None
            precision = data[i + 4]
            height = (data[i + 5] << 8) | data[i + 6]
            width = (data[i + 7] << 8) | data[i + 8]
            comps = data[i + 9]
            if precision != 8 or comps not in (1, 3) or width == 0 or height == 0 or length != 8 + 3 * comps:
                return None
            sof = (width, height, comps)
        i = end
    if sof is None or exif_blocks > 1:
        return None
    if orientation is None:  # no EXIF orientation: Pillow would read the one in XMP
        if xmp:
            return None
        orientation = 1
    return Header("JPEG", sof[0], sof[1], sof[2], orientation)


_EXIF_INT_TYPES = {3: "H", 4: "I", 8: "h", 9: "i"}  # SHORT, LONG, SSHORT, SLONG


def _exif_orientation(tiff: bytes) -> int | None:
    """The orientation in an EXIF (TIFF) block as Pillow reads it (1-8), 0 when it has no orientation tag, None
    when the block is not plainly readable (Pillow decides then)."""
    if len(tiff) < 8:
        return None
    order = tiff[:2]
    if order == b"II":
        fmt = "<"
    elif order == b"MM":
        fmt = ">"
    else:
        return None
    magic, ifd = struct.unpack_from(fmt + "HI", tiff, 2)
    if magic != 42 or ifd + 2 > len(tiff):
        return None
    (count,) = struct.unpack_from(fmt + "H", tiff, ifd)
    if ifd + 2 + 12 * count > len(tiff):
        return None
    for k in range(count):
        tag, typ, cnt = struct.unpack_from(fmt + "HHI", tiff, ifd + 2 + 12 * k)
        if tag == 0x0112:
            code = _EXIF_INT_TYPES.get(typ)
            if code is None or cnt != 1:  # one SHORT, as the standard says, or another integer
                return None
            (value,) = struct.unpack_from(fmt + code, tiff, ifd + 2 + 12 * k + 8)
            return value if 1 <= value <= 8 else 1
    return 0


def _probe_png(data: Any) -> Header | None:
    n = len(data)
    if n < 33 or data[12:16] != b"IHDR" or data[8:12] != b"\x00\x00\x00\x0d":
        return None
    width, height, depth, color, compression, filt, interlace = struct.unpack_from(">IIBBBBB", data, 16)
    if depth != 8 or color not in (0, 2) or compression or filt or interlace > 1 or not width or not height:
        return None
    i = 8
    text = 0
    idat = 0  # 0: none yet, 1: inside the run of IDAT chunks, 2: after it
    while True:
        if i + 12 > n:
            return None  # cut before IEND
        length, ctype = struct.unpack_from(">I4s", data, i)
        end = i + 12 + length
        if end > n or length > 0x7FFFFFFF:
            return None
        if ctype in _PNG_PILLOW_CHUNKS or (not ctype[0] & 0x20 and ctype not in _PNG_CRITICAL):
            return None  # Pillow's, or a critical chunk nobody knows
        if ctype == b"IDAT":
            if idat == 2:
                return None
            idat = 1
        else:
            if idat == 1:
                idat = 2
            body = data[i + 8 : i + 8 + length]
            (crc,) = struct.unpack_from(">I", data, i + 8 + length)
            if zlib.crc32(body, zlib.crc32(ctype)) != crc:
                return None
            if ctype in _PNG_TEXT:
                size = _text_chunk_size(ctype, bytes(body))
                if size is None:
                    return None
                text += size
                if text > 64 * _TEXT_LIMIT:
                    return None
            elif ctype == b"iCCP" and not _icc_within_limit(bytes(body)):
                return None
            elif ctype == b"IEND":
                break
        i = end
    if idat == 0:
        return None
    return Header("PNG", width, height, 1 if color == 0 else 3, 1)


def _text_chunk_size(ctype: bytes, body: bytes) -> int | None:
    """The decompressed size of a text chunk, or None when Pillow must read it (orientation, too large, malformed)."""
    key, sep, rest = body.partition(b"\x00")
    if not sep or key in _PNG_EXIF_KEYS:
        return None
    value: bytes | None
    if ctype == b"tEXt":
        value = rest
    elif ctype == b"zTXt":
        value = _inflate(rest[1:]) if rest[:1] == b"\x00" else None
    else:  # iTXt: compression flag, method, language, translated keyword, text
        if len(rest) < 2:
            return None
        flag, method = rest[0], rest[1]
        parts = rest[2:].split(b"\x00", 2)
        if len(parts) != 3:
            return None
        value = parts[2] if flag == 0 else (_inflate(parts[2]) if flag == 1 and method == 0 else None)
    if value is None:
        return None
    if key == _XMP_KEY and _xmp_orientation(value) != 1:
        return None
    return len(value)


def _xmp_orientation(xmp: bytes) -> int:
    """The orientation Pillow reads from XMP (its own pattern), 1 when there is none."""
    match = _XMP_ORIENTATION.search(xmp)
    return int(match[2]) if match else 1


def _inflate(data: bytes) -> bytes | None:
    """zlib data decompressed within Pillow's per-chunk limit, or None (over the limit, or damaged)."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, _TEXT_LIMIT + 1)
    except zlib.error:
        return None
    return out if len(out) <= _TEXT_LIMIT and not d.unconsumed_tail else None


def _icc_within_limit(body: bytes) -> bool:
    """An iCCP chunk whose profile decompresses within Pillow's limit (Pillow refuses the file otherwise)."""
    sep = body.find(b"\x00")
    return sep >= 0 and sep + 2 <= len(body) and _inflate(body[sep + 2 :]) is not None


# -- decoding --------------------------------------------------------------------------------------------------


def jpeg_scale(width: int, height: int, need: tuple[int, int] | None) -> int:
    """The DCT scale denominator (1, 2, 4 or 8): the largest that keeps the decoded image at least ``need``
    (``(width, height)`` in stored orientation), chosen as Pillow's ``draft`` chooses it."""
    if need is None:
        return 1
    need_w, need_h = max(1, need[0]), max(1, need[1])
    scale = min(width // need_w, height // need_h)
    for s in (8, 4, 2):
        if scale >= s:
            return s
    return 1


def decode_jpeg(data: bytes | bytearray | memoryview, head: Header, scale: int = 1) -> np.ndarray:
    """Decode a JPEG at ``1/scale`` of its size (DCT-domain scaling): ``(h, w, channels)`` uint8, RGB or gray.

    Raises:
        FastDecodeError: anything libjpeg-turbo reports, warnings included (a truncated or damaged file).
    """
    import simplejpeg

    want_h = -(-head.height // scale)
    want_w = -(-head.width // scale)
    try:
        arr = simplejpeg.decode_jpeg(data, colorspace="GRAY" if head.channels == 1 else "RGB",
                                     min_height=want_h, min_width=want_w, strict=True)
    except Exception as exc:  # ValueError for damaged data; anything else is as much a reason to let Pillow try
        raise FastDecodeError(str(exc)) from None
    if arr.shape[:2] != (want_h, want_w):
        raise FastDecodeError(f"decoded {arr.shape[1]}x{arr.shape[0]}, expected {want_w}x{want_h}")
    return arr


def decode_png(data: bytes | bytearray | memoryview, head: Header) -> np.ndarray:
    """Decode an 8-bit gray or RGB PNG: ``(h, w, channels)`` uint8 (BGR for colour, as OpenCV decodes it).

    Raises:
        FastDecodeError: the data cannot be decoded (OpenCV returns nothing).
    """
    cv2 = _cv2()
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        arr = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise FastDecodeError(str(exc)) from None
    if arr is None or arr.dtype != np.uint8 or arr.shape[:2] != (head.height, head.width):
        raise FastDecodeError("OpenCV could not decode the PNG data")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[2] != head.channels:
        raise FastDecodeError(f"decoded {arr.shape[2]} channels, expected {head.channels}")
    return arr


# -- geometry ---------------------------------------------------------------------------------------------------

_UPSCALE = {"nearest": "INTER_NEAREST_EXACT", "bilinear": "INTER_LINEAR", "bicubic": "INTER_CUBIC",
            "lanczos": "INTER_LANCZOS4", "box": "INTER_LINEAR", "hamming": "INTER_LINEAR"}


def resample(arr: np.ndarray, box: tuple[float, float, float, float], size: tuple[int, int],
             interpolation: str) -> np.ndarray:
    """Resample the region ``box`` (``x0, y0, x1, y1``, floats) of ``arr`` to ``size`` (``(width, height)``).

    The region is rounded to whole pixels (a centre crop moves by half a source pixel at most). Shrinking is
    antialiased whatever ``interpolation`` says (except ``nearest``): by a factor of at most 2 (after DCT scaling,
    the usual case), bicubic interpolation to exactly twice the output size, then 2x2 averaging (OpenCV's integer
    area path: sharper and faster than its general area filter); by more, OpenCV's area filter (each output pixel
    averages the source pixels it covers). Enlarging uses the ``interpolation`` filter.
    """
    cv2 = _cv2()
    h, w = arr.shape[:2]
    x0 = min(max(0, round(box[0])), w - 1)
    y0 = min(max(0, round(box[1])), h - 1)
    x1 = max(x0 + 1, min(w, round(box[2])))
    y1 = max(y0 + 1, min(h, round(box[3])))
    region = arr[y0:y1, x0:x1]
    tw, th = size
    rw, rh = x1 - x0, y1 - y0
    if (rw, rh) == (tw, th):
        return np.ascontiguousarray(region)
    channels = arr.shape[2]
    if interpolation == "nearest":
        out = cv2.resize(region, (tw, th), interpolation=cv2.INTER_NEAREST_EXACT)
    elif tw <= rw and th <= rh:
        kx, ky = -(-rw // tw), -(-rh // th)
        if kx <= 2 and ky <= 2:
            mid = region if (kx * tw, ky * th) == (rw, rh) else cv2.resize(
                region, (kx * tw, ky * th), interpolation=cv2.INTER_CUBIC)
            out = cv2.resize(mid, (tw, th), interpolation=cv2.INTER_AREA)
        else:
            out = cv2.resize(region, (tw, th), interpolation=cv2.INTER_AREA)
    elif tw >= rw and th >= rh:
        out = cv2.resize(region, (tw, th), interpolation=getattr(cv2, _UPSCALE[interpolation]))
    else:  # shrinking one side, enlarging the other: one pass each
        up = getattr(cv2, _UPSCALE[interpolation])
        if tw < rw:
            mid = cv2.resize(region, (tw, rh), interpolation=cv2.INTER_AREA)
            out = cv2.resize(mid, (tw, th), interpolation=up)
        else:
            mid = cv2.resize(region, (rw, th), interpolation=cv2.INTER_AREA)
            out = cv2.resize(mid, (tw, th), interpolation=up)
    if out.ndim == 2:  # OpenCV drops a single channel axis
        out = out.reshape(th, tw, channels)
    return out


def orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """``arr`` displayed upright for an EXIF orientation (as ``ImageOps.exif_transpose``); a view."""
    if orientation == 2:
        return arr[:, ::-1]
    if orientation == 3:
        return arr[::-1, ::-1]
    if orientation == 4:
        return arr[::-1]
    if orientation == 5:
        return arr.transpose(1, 0, 2)
    if orientation == 6:
        return arr.transpose(1, 0, 2)[:, ::-1]
    if orientation == 7:
        return arr.transpose(1, 0, 2)[::-1, ::-1]
    if orientation == 8:
        return arr.transpose(1, 0, 2)[::-1]
    return arr


def to_rgb(arr: np.ndarray, bgr: bool) -> np.ndarray:
    """A C-contiguous ``(h, w, 3)`` RGB array from gray, RGB or (``bgr``) BGR ``(h, w, c)`` data."""
    if arr.shape[2] == 1:
        return np.ascontiguousarray(np.broadcast_to(arr, (*arr.shape[:2], 3)))
    if bgr:
        return np.asarray(_cv2().cvtColor(np.ascontiguousarray(arr), _cv2().COLOR_BGR2RGB))
    return np.ascontiguousarray(arr)


def library_versions() -> dict[str, str]:
    """Versions of the libraries the fast path decodes and resamples with (OpenCV's as its wheel names it)."""
    import simplejpeg

    return {"simplejpeg": str(simplejpeg.__version__), "opencv": _opencv_version()}


def _opencv_version() -> str:
    """OpenCV's version, read from the ``cv2/version.py`` of its wheel when there is one: importing ``cv2`` only
    for that would load the library and start its BLAS threads in a process that never resizes (pack's parent)."""
    import importlib.util

    spec = importlib.util.find_spec("cv2")
    if spec is None:
        raise ModuleNotFoundError("No module named 'cv2'", name="cv2")
    for folder in spec.submodule_search_locations or []:
        try:
            with open(os.path.join(folder, "version.py"), encoding="utf-8") as f:
                match = re.search(r'^opencv_version\s*=\s*"([^"]+)"', f.read(), re.MULTILINE)
        except OSError:
            continue
        if match:
            return match[1]
    return str(_cv2().__version__)


_cv2_module: Any = None


def _cv2() -> Any:
    global _cv2_module
    if _cv2_module is None:
        import cv2

        _cv2_module = cv2
    return _cv2_module
