"""Embedding-matrix files: which tensors a file holds (name, shape, dtype) and reading one as float32.

The one reader of embedding files, for the audit (facts only) and for embed-labels (``--reuse`` reads the rows):

* ``.safetensors``: the facts come from the JSON header alone; one tensor's data is read on request.
* ``.npy`` / ``.npz``: NumPy files, memory-mapped where NumPy can (``.npy``); pickled data is refused.
* ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt``: ``torch.load(weights_only=True)`` (no code runs), memory-mapped when the
  file allows; a tensor, or tensors inside dicts/lists up to three levels deep, named by their dotted path.

Nothing here writes; torch and safetensors are imported only when a file of theirs is read.
"""

from __future__ import annotations

import json
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
        return TensorFile(p, fmt, {k: TensorInfo(tuple(a.shape), str(a.dtype)) for k, a in arrays.items()}, arrays)
    if fmt == "torch":
        tensors = _torch_tensors(p)
        facts = {k: TensorInfo(tuple(t.shape), str(t.dtype).removeprefix("torch.")) for k, t in tensors.items()}
        return TensorFile(p, fmt, facts, tensors)
    raise InputError(f"{p}: unknown embeddings format '{suffix}'",
                     hint="use .pt/.pth (torch), .npy/.npz (numpy) or .safetensors")


def _safetensors_header(path: str) -> dict[str, TensorInfo]:
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise InputError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n > 100_000_000:
                raise InputError(f"{path}: not a safetensors file (header length {n})")
            header = json.loads(fh.read(n))
    except FileNotFoundError:
        raise InputError(f"{path}: embeddings file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{path}: not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: not a safetensors file (header is not an object)")
    out = {}
    for k, v in header.items():
        if k != "__metadata__" and isinstance(v, dict) and isinstance(v.get("shape"), list):
            out[k] = TensorInfo(tuple(int(s) for s in v["shape"]), str(v.get("dtype", "?")))
    return out


def _torch_tensors(path: str) -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        raise MissingDependencyError("torch", "embed", purpose=f"reading the torch file {path}") from None
    try:
        try:  # memory-map big matrices (zip format); older files cannot be mapped
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (RuntimeError, ValueError):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{path}: embeddings file not found") from None
    except Exception as exc:  # torch.load raises many types on a file that is not a checkpoint
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: not a readable torch tensor file: {msg[:200]}",
                         hint="save the matrix with torch.save(tensor, path)") from None
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


def _numpy_arrays(path: str) -> dict[str, np.ndarray]:
    try:
        with open(path, "rb") as fh:
            magic = fh.read(6)
    except OSError as exc:
        raise InputError(f"{path}: cannot read the embeddings file: {exc.strerror or exc}") from None
    if magic != b"\x93NUMPY" and not magic.startswith(b"PK\x03\x04"):  # numpy would call anything else "pickled"
        raise InputError(f"{path}: not a .npy/.npz file (no NumPy or zip header)",
                         hint="save the matrix with numpy.save(path, array)")
    try:
        loaded = np.load(path, mmap_mode="r", allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return {BARE_ARRAY: loaded}
        with loaded:
            return {k: loaded[k] for k in loaded.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path}: not a readable .npy/.npz file: {str(exc)[:200]}") from None
