"""Embedding-matrix files: which tensors a file holds (name, shape, dtype) and reading one as float32.

The one reader of embedding files, for the audit (facts only) and for embed-labels (``--reuse`` reads the rows):

* ``.safetensors``: the facts come from the JSON header alone; one tensor's data is read on request.
* ``.npy`` / ``.npz``: NumPy files, memory-mapped where NumPy can (``.npy``); pickled data is refused. The facts
  of an ``.npz`` come from each member's ``.npy`` header; its arrays are read on request.
* ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt``: ``torch.load(weights_only=True)`` (no code runs), memory-mapped when the
  file allows; a tensor, or tensors inside dicts/lists up to three levels deep, named by their dotted path.

Opening a file checks that its data is there: the bytes a header promises (``.safetensors`` offsets, an ``.npy``
header's shape and dtype, each ``.npz`` member's) must be in the file, so a truncated file, or a header that claims
10^9 rows over 16 bytes, is a one-line :class:`~mmprep.errors.InputError` instead of a shape that looks right.
torch checks its own files when it loads them; its refusals (a pickled object that ``weights_only`` will not load,
a damaged archive) become one sentence naming the reason.

Nothing here writes; torch and safetensors are imported only when a file of theirs is read.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from mmprep.errors import InputError, MissingDependencyError

__all__ = ["TENSOR_FORMATS", "TensorFile", "TensorInfo", "open_tensor_file"]

#: File suffix -> format (``safetensors``, ``numpy``, ``torch``).
TENSOR_FORMATS: dict[str, str] = {
    ".safetensors": "safetensors",
    ".npy": "numpy",
    ".npz": "numpy",
    ".pt": "torch",
    ".pth": "torch",
    ".bin": "torch",
    ".ckpt": "torch",
}

#: The name a bare tensor (torch) or a bare array (``.npy``) is listed under.
BARE_TENSOR = "<tensor>"
BARE_ARRAY = "<array>"


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """A tensor's shape and dtype name (``float32``, ``F32`` for safetensors: as the file says)."""

    shape: tuple[int, ...]
    dtype: str


class TensorFile:
    """An opened embedding file: ``tensors`` maps each tensor's name to its facts; :meth:`float32` reads one.

    Create it with :func:`open_tensor_file`.
    """

    def __init__(self, path: str, fmt: str, tensors: dict[str, TensorInfo], data: dict[str, Any]) -> None:
        self.path = path
        self.format = fmt
        self.tensors = tensors
        self._data = data  # name -> torch tensor / numpy array already at hand (not for safetensors)

    def float32(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a new float32 NumPy array."""
        if self.format == "safetensors":
            from safetensors import safe_open

            with safe_open(self.path, framework="np") as fh:
                value = fh.get_tensor(name)
            return np.asarray(value, dtype=np.float32)
        if self.format == "numpy" and name not in self._data:  # an .npz member: read now
            try:
                with np.load(self.path, allow_pickle=False) as npz:
                    value = npz[name]
            except MemoryError:
                raise InputError(f"{self.path}: the array '{name}' does not fit in memory") from None
            return np.asarray(value, dtype=np.float32)
        value = self._data[name]
        if self.format == "torch":
            import torch

            value = value.detach().to(torch.float32).numpy()
        return np.array(value, dtype=np.float32)


def open_tensor_file(path: str | Path) -> TensorFile:
    """Open an embedding file by its suffix (see :data:`TENSOR_FORMATS`) and list its tensors.

    Raises:
        InputError: the file is missing, of an unknown format, unreadable, or holds no tensor.
        MissingDependencyError: torch is needed for the file and not installed.
    """
    p = str(path)
    suffix = Path(p).suffix.lower()
    fmt = TENSOR_FORMATS.get(suffix)
    if fmt == "safetensors":
        return TensorFile(p, fmt, _safetensors_header(p), {})
    if fmt == "numpy":
        arrays = _numpy_arrays(p)
        if not arrays:
            return TensorFile(p, fmt, _npz_facts(p), {})
        return TensorFile(p, fmt, {k: TensorInfo(tuple(a.shape), str(a.dtype)) for k, a in arrays.items()}, arrays)
    if fmt == "torch":
        tensors = _torch_tensors(p)
        facts = {k: TensorInfo(tuple(t.shape), str(t.dtype).removeprefix("torch.")) for k, t in tensors.items()}
        return TensorFile(p, fmt, facts, tensors)
    raise InputError(f"{p}: unknown embeddings format '{suffix}'",
                     hint="use .pt/.pth (torch), .npy/.npz (numpy) or .safetensors")


#: Bytes per element of the safetensors dtypes (a tensor of another dtype is listed, its size not checked).
_SAFETENSORS_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
_REWRITE = "the file is damaged or was cut short (an interrupted download or copy): write or fetch it again"


def _nbytes(shape: tuple[int, ...], itemsize: int) -> int:
    return math.prod(shape) * itemsize


def _safetensors_header(path: str) -> dict[str, TensorInfo]:
    """The tensors a safetensors header lists, checked as the safetensors library checks them before reading:
    every tensor's byte range matches its shape and dtype, the ranges follow one another from the start of the data,
    and the last one ends where the file does."""
    try:
        with open(path, "rb") as fh:
            file_size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            if len(head) < 8:
                raise InputError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n > 100_000_000:
                raise InputError(f"{path}: not a safetensors file (header length {n})")
            raw = fh.read(n)
    except FileNotFoundError:
        raise InputError(f"{path}: embeddings file not found") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read the embeddings file: {exc.strerror or exc}") from None
    if len(raw) < n:
        raise InputError(f"{path}: truncated: the safetensors header says {n:,} bytes, the file ends after "
                         f"{len(raw):,}", hint=_REWRITE)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise InputError(f"{path}: not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: not a safetensors file (header is not an object)")
    data_size = file_size - 8 - n
    out: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for k, v in header.items():
        if k == "__metadata__":
            continue
        shape, dtype, offsets = (v.get("shape"), v.get("dtype"), v.get("data_offsets")) if isinstance(v, dict) else (
            None, None, None)
        if (not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)
                or not isinstance(dtype, str) or not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
            raise InputError(f"{path}: not a safetensors file (the header entry of tensor '{k:.80}' is malformed)")
        info = TensorInfo(tuple(shape), dtype)
        begin, end = offsets
        itemsize = _SAFETENSORS_BYTES.get(dtype)
        if itemsize is not None and end - begin != _nbytes(info.shape, itemsize):
            raise InputError(
                f"{path}: damaged header: tensor '{k:.80}' {list(info.shape)} {dtype} needs "
                f"{_nbytes(info.shape, itemsize):,} bytes, but its data_offsets span {end - begin:,}",
                hint=_REWRITE,
            )
        out[k] = info
        spans.append((begin, end, k))
    spans.sort()
    last = max((e for _b, e, _k in spans), default=0)
    if last > data_size:
        raise InputError(
            f"{path}: truncated: the header places tensor data up to byte {8 + n + last:,}, but the file has "
            f"{file_size:,} bytes", hint=_REWRITE,
        )
    at = 0
    for begin, end, k in spans:
        if begin != at:
            what = "overlaps the one before" if begin < at else f"leaves a gap of {begin - at:,} bytes before it"
            raise InputError(f"{path}: damaged header: tensor '{k:.80}' {what}", hint=_REWRITE)
        at = end
    if at != data_size:
        raise InputError(f"{path}: not a valid safetensors file: {data_size - at:,} bytes after the last tensor's "
                         "data (the safetensors library refuses such a file)", hint=_REWRITE)
    return out


def _torch_tensors(path: str) -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        raise MissingDependencyError("torch", "embed", purpose=f"reading the torch file {path}") from None
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols and storage types: not the user's concern
            warnings.simplefilter("ignore")
            try:  # memory-map big matrices (zip format); older files cannot be mapped
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except (RuntimeError, ValueError):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{path}: embeddings file not found") from None
    except MemoryError:
        raise InputError(f"{path}: does not fit in memory") from None
    except Exception as exc:  # torch.load raises many types on a file that is not a checkpoint
        raise _torch_load_error(path, exc) from None
    out: dict[str, Any] = {}

    def visit(prefix: str, value: Any, depth: int) -> None:
        if isinstance(value, torch.Tensor):
            out[prefix or BARE_TENSOR] = value
        elif isinstance(value, dict) and depth < 3:
            for k, v in value.items():
                visit(f"{prefix}.{k}" if prefix else str(k), v, depth + 1)
        elif isinstance(value, list | tuple) and depth < 3:
            for k, v in enumerate(value):
                visit(f"{prefix}.{k}" if prefix else str(k), v, depth + 1)

    visit("", obj, 0)
    if not out:
        raise InputError(f"{path}: holds no tensor (a {type(obj).__name__})")
    return out


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TORCH_HINT = "save the matrix alone: torch.save(tensor, path), numpy.save(path, array) or a .safetensors file"


def _sentence(text: str, limit: int = 200) -> str:
    """The first line of ``text``, cut after a whole sentence (never in the middle of one) when it is long."""
    line = text.strip().split("\n", 1)[0].strip()
    if len(line) <= limit:
        return line
    end = line.rfind(". ", 0, limit)
    if end > 0:
        return line[: end + 1]
    cut = line.rfind(" ", 0, limit)
    return line[: cut if cut > 0 else limit] + " …"


def _torch_load_error(path: str, exc: BaseException) -> InputError:
    """One line saying why torch did not load ``path``: the object weights-only loading refused, a plain pickle, an
    empty, truncated or damaged file (torch's own message runs to a page of advice about ``weights_only=False``,
    which mmprep never uses)."""
    text = _ANSI.sub("", str(exc))
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        name = found.group(1)
        if name.startswith("numpy."):
            return InputError(
                f"{path}: holds a pickled NumPy array ({name}), which torch.load(weights_only=True) refuses: mmprep "
                "never runs code from a file",
                hint="save a tensor instead: torch.save(torch.from_numpy(array), path), or numpy.save(path, array)",
            )
        return InputError(
            f"{path}: holds a pickled {name} object, which torch.load(weights_only=True) refuses: mmprep never runs "
            "code from a file", hint=_TORCH_HINT,
        )
    if re.search(r"Unsupported operand \d+", text):
        return InputError(f"{path}: not a file written by torch.save (a plain pickle, which weights-only loading "
                          "cannot read)", hint=_TORCH_HINT)
    try:
        size = os.path.getsize(path)
    except OSError:
        size = -1
    if size == 0:
        return InputError(f"{path}: is empty", hint=_TORCH_HINT)
    if isinstance(exc, EOFError):
        return InputError(f"{path}: ends too early: truncated", hint=_REWRITE)
    if "central directory" in text:
        return InputError(f"{path}: truncated or damaged: the zip directory at the end of the file is missing",
                          hint=_REWRITE)
    if "does not match expected size" in text or "not resizable" in text:
        return InputError(f"{path}: damaged: a tensor's data is shorter than its shape says ({_sentence(text)})",
                          hint=_REWRITE)
    try:
        with open(path, "rb") as fh:
            zipped = fh.read(4) == b"PK\x03\x04"  # torch.save's archive format
    except OSError:
        zipped = False
    if zipped and (isinstance(exc, OSError | RuntimeError) or "PytorchStreamReader" in text):
        return InputError(f"{path}: truncated or damaged: its torch.save archive cannot be read "
                          f"({_sentence(text, 120)})", hint=_REWRITE)
    if isinstance(exc, KeyError) or "load key" in text or "magic number" in text:
        return InputError(f"{path}: not a torch file (its first bytes are not a torch.save archive or pickle)",
                          hint=_TORCH_HINT)
    return InputError(f"{path}: not a readable torch tensor file: {_sentence(text) or type(exc).__name__}",
                      hint=_TORCH_HINT)


def _npy_header(fh: IO[bytes], name: str) -> tuple[tuple[int, ...], np.dtype[Any], int]:
    """Shape, dtype and header length of an ``.npy`` stream positioned at its start (InputError if unreadable)."""
    from numpy.lib import format as npy

    try:
        version = npy.read_magic(fh)
        if version == (1, 0):
            shape, _fortran, dtype = npy.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, _fortran, dtype = npy.read_array_header_2_0(fh)
        else:
            shape, _fortran, dtype = getattr(npy, "_read_array_header")(fh, version)  # noqa: B009 (3.0: private)
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise InputError(f"{name}: not a readable .npy header: {_sentence(str(exc))}") from None
    if dtype.hasobject:
        raise InputError(f"{name}: not a readable .npy/.npz file: it holds Python objects (pickled data), which "
                         "mmprep does not load",
                         hint="save a numeric array: numpy.save(path, array.astype('float32'))")
    return tuple(int(d) for d in shape), dtype, fh.tell()


def _check_npy(path: str) -> None:
    """An ``.npy`` file holds the bytes its header promises (before it is memory-mapped)."""
    with open(path, "rb") as fh:
        shape, dtype, offset = _npy_header(fh, path)
        size = os.fstat(fh.fileno()).st_size
    need = _nbytes(shape, dtype.itemsize)
    if size - offset < need:
        raise InputError(
            f"{path}: truncated: the header says {list(shape)} {dtype} = {need:,} bytes of data, the file holds "
            f"{max(size - offset, 0):,}", hint=_REWRITE,
        )


#: Deflate compresses at most about 1032:1; a member that claims more is not a real array.
_MAX_DEFLATE_RATIO = 1100


def _npz_facts(path: str) -> dict[str, TensorInfo]:
    """The arrays of an ``.npz`` from their ``.npy`` headers, each checked against its member's size."""
    out: dict[str, TensorInfo] = {}
    try:
        archive_size = os.path.getsize(path)
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue  # numpy reads other members as raw bytes: no array
                name = info.filename[: -len(".npy")]
                where = f"{path} (member {info.filename})"
                stored = info.compress_type == zipfile.ZIP_STORED
                if info.header_offset + info.compress_size > archive_size or (
                        stored and info.compress_size != info.file_size) or (
                        info.file_size > max(info.compress_size, 1) * _MAX_DEFLATE_RATIO + 4096):
                    raise InputError(f"{where}: truncated or damaged: it claims {info.file_size:,} bytes from "
                                     f"{info.compress_size:,} in an archive of {archive_size:,}", hint=_REWRITE)
                with zf.open(info) as fh:
                    shape, dtype, offset = _npy_header(fh, where)
                need = _nbytes(shape, dtype.itemsize)
                if info.file_size - offset < need:
                    raise InputError(
                        f"{where}: truncated: the header says {list(shape)} {dtype} = {need:,} bytes of data, the "
                        f"member holds {max(info.file_size - offset, 0):,}", hint=_REWRITE,
                    )
                out[name] = TensorInfo(shape, str(dtype))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as exc:
        raise InputError(f"{path}: truncated or not a readable .npz archive: {_sentence(str(exc))}",
                         hint=_REWRITE) from None
    return out


def _numpy_arrays(path: str) -> dict[str, np.ndarray]:
    try:
        with open(path, "rb") as fh:
            magic = fh.read(6)
    except OSError as exc:
        raise InputError(f"{path}: cannot read the embeddings file: {exc.strerror or exc}") from None
    if magic != b"\x93NUMPY" and not magic.startswith(b"PK\x03\x04"):  # numpy would call anything else "pickled"
        raise InputError(f"{path}: not a .npy/.npz file (no NumPy or zip header)",
                         hint="save the matrix with numpy.save(path, array)")
    if magic.startswith(b"PK\x03\x04"):
        return {}  # an .npz: its facts come from _npz_facts, its arrays are read on request
    _check_npy(path)
    try:
        return {BARE_ARRAY: np.load(path, mmap_mode="r", allow_pickle=False)}
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"{path}: not a readable .npy file: {_sentence(str(exc))}") from None
