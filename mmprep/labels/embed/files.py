"""Embedding-matrix files as embed-labels writes them: the matrix (``.pth``/``.pt``, ``.npy`` or ``.safetensors``)
and its sidecar JSON ``<out>.json`` describing how it was made; and reading a matrix back (``--reuse``).

Writing goes through :func:`mmprep.runtime.files.atomic_write` (a temporary name, then a rename); reading through
the one embedding-file reader, :mod:`mmprep.labels.tensorfile`. torch and safetensors are imported only here, inside
the functions that need them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmprep.errors import InputError, MissingDependencyError, RunFailed, UsageError
from mmprep.labels.embed.messages import first_line
from mmprep.labels.tensorfile import open_tensor_file
from mmprep.runtime.files import atomic_write

__all__ = [
    "OUTPUT_SUFFIXES",
    "SAFETENSORS_KEY",
    "SavedEmbeddings",
    "check_suffix",
    "load_embeddings",
    "save_embeddings",
    "sidecar_path",
]

#: Output formats by file suffix.
OUTPUT_SUFFIXES: tuple[str, ...] = (".pth", ".pt", ".npy", ".safetensors")

#: The tensor name used inside ``.safetensors`` files.
SAFETENSORS_KEY = "embedding"


@dataclass(frozen=True)
class SavedEmbeddings:
    """Where :func:`save_embeddings` wrote the matrix and its sidecar (None when there was none to write)."""

    matrix: Path
    sidecar: Path | None


def sidecar_path(out: str | Path) -> Path:
    """The sidecar JSON next to an output matrix: ``<out>.json`` (e.g. ``tags.pth.json``)."""
    p = Path(out)
    return p.with_name(p.name + ".json")


def check_suffix(path: Path, what: str) -> str:
    """The suffix of ``path`` (lower case), which must be one of :data:`OUTPUT_SUFFIXES`; ``what`` names the file's
    role in the UsageError otherwise ("output", "embedding")."""
    s = path.suffix.lower()
    if s not in OUTPUT_SUFFIXES:
        raise UsageError(f"{path}: unknown {what} format '{s or '(none)'}'",
                         hint=f"use one of: {', '.join(OUTPUT_SUFFIXES)}")
    return s


def save_embeddings(matrix: np.ndarray, path: str | Path, *, sidecar: dict[str, Any] | None = None) -> SavedEmbeddings:
    """Write a float32 ``[rows, D]`` matrix atomically in the format given by the suffix, plus the sidecar JSON.

    ``.pth``/``.pt``: ``torch.save`` of a contiguous float32 tensor (``torch.load`` returns it); ``.npy``: numpy;
    ``.safetensors``: one tensor named ``embedding`` (small string metadata copied from the sidecar).

    Raises:
        UsageError: an unknown suffix, a matrix that is not 2-D, or a symbolic link where a file goes.
        RunFailed: a file cannot be written.
    """
    p = Path(path)
    suffix = check_suffix(p, "output")
    arr = np.ascontiguousarray(matrix, dtype=np.float32)
    if arr.ndim != 2:
        raise UsageError(f"expected a 2-D matrix, got shape {arr.shape}")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunFailed(f"{p}: cannot write the embedding matrix: {exc.strerror or exc}") from None
    what = "the embedding matrix"
    if suffix in (".pth", ".pt"):
        import torch

        tensor = torch.from_numpy(arr.copy())
        atomic_write(p, lambda fh: torch.save(tensor, fh), what=what)
    elif suffix == ".npy":
        atomic_write(p, lambda fh: np.save(fh, arr, allow_pickle=False), what=what)
    else:
        try:
            from safetensors.numpy import save as st_save
        except ImportError:  # pragma: no cover
            raise MissingDependencyError("safetensors", "embed", purpose="writing .safetensors") from None
        meta = {"format": "pt"}
        if sidecar:
            for key in ("vocab_sha256", "model_config_sha256", "rows_per_tag"):
                if key in sidecar:
                    meta[key] = str(sidecar[key])
        atomic_write(p, _stable_header(st_save({SAFETENSORS_KEY: arr}, metadata=meta)), what=what)
    side: Path | None = None
    if sidecar is not None:
        side = sidecar_path(p)
        text = json.dumps(sidecar, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
        atomic_write(side, text.encode("utf-8"), what="the sidecar")
    return SavedEmbeddings(p, side)


def _stable_header(blob: bytes) -> bytes:
    """``blob`` (a safetensors file) with its JSON header written with sorted keys: safetensors writes the metadata
    in the order of a hash map, which differs from run to run, so the same matrix gave different bytes. The data
    offsets are relative to the end of the header and stay valid; the header is padded with spaces to a multiple
    of 8 bytes, as safetensors does."""
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + blob[8 + size:]


def load_embeddings(path: str | Path) -> np.ndarray:
    """Read a 2-D embedding matrix (``.pth``/``.pt``/``.npy``/``.safetensors``) as float32.

    The file may hold one tensor, or several of which one is named ``embedding`` (a ``.pth`` dict, a
    ``.safetensors`` file); ``.pth`` files are loaded with ``weights_only=True`` (no code runs).

    Raises:
        UsageError: an unknown suffix.
        InputError: a missing or unreadable file, no single matrix in it, or a tensor that is not 2-D.
    """
    p = Path(path)
    check_suffix(p, "embedding")
    if not p.is_file():
        raise InputError(f"{p}: embedding file not found")
    try:
        tensors = open_tensor_file(p)
        names = list(tensors.tensors)
        if SAFETENSORS_KEY in tensors.tensors:
            name = SAFETENSORS_KEY
        elif len(names) == 1:
            name = names[0]
        else:
            raise InputError(f"{p}: {len(names)} tensors and none named '{SAFETENSORS_KEY}'")
        shape = tensors.tensors[name].shape
        if len(shape) != 2:
            raise InputError(f"{p}: expected a 2-D matrix [rows, dim], got shape {shape}")
        return tensors.float32(name)
    except (InputError, MissingDependencyError):
        raise
    except Exception as exc:
        raise InputError(f"{p}: cannot read the embedding matrix: {first_line(exc)}") from None
