"""Files that must hold one entry per vocabulary id: translations, thresholds, RAM++ descriptions, embeddings.

:func:`audit_aligned` checks a text or JSON list against the vocabulary (count, duplicates, whitespace, invalid
entries, names that differ); :func:`audit_embeddings` compares an embedding matrix's rows with the vocabulary size,
reading only the shape (see :mod:`mmprep.labels.tensorfile`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mmprep.errors import InputError
from mmprep.labels.audit.hygiene import LineEndings, duplicate_groups, line_endings
from mmprep.labels.audit.report import AlignedReport, DuplicateGroup, EmbeddingReport
from mmprep.labels.tensorfile import BARE_ARRAY, BARE_TENSOR, TensorInfo, open_tensor_file
from mmprep.labels.vocab import Vocabulary, load_vocab, normalize_tag, read_bounded

__all__ = ["ALIGNED_KINDS", "audit_aligned", "audit_embeddings", "embedding_width"]

#: The kinds of aligned file (``KIND=PATH`` forces one).
ALIGNED_KINDS: tuple[str, ...] = ("translations", "thresholds", "descriptions")


def _split_kind(spec: str) -> tuple[str | None, str]:
    kind, sep, rest = spec.partition("=")
    if sep and kind in ALIGNED_KINDS:
        return kind, rest
    return None, spec


def audit_aligned(spec: str | Path, vocab: Vocabulary) -> AlignedReport:
    """Check a file that must have one entry per vocabulary id.

    ``spec`` is a path, optionally prefixed ``KIND=`` (``translations``, ``thresholds``, ``descriptions``). Without
    a kind: a ``.json`` file is ``descriptions`` (a list of ``{tag: [descriptions]}`` objects or of names), a text
    file whose entries are mostly numbers is ``thresholds`` (each must be a float in [0, 1]), anything else
    ``translations``.
    """
    kind, path = _split_kind(str(spec))
    if not Path(path).exists():
        raise InputError(f"{path}: aligned file not found")
    if kind == "descriptions" or (kind is None and path.lower().endswith(".json")):
        return _audit_descriptions(path, vocab)
    lst = load_vocab(path, role="aligned")
    expected = vocab.size
    floats: list[float | None] = []
    for entry in lst.names:
        try:
            floats.append(float(entry))
        except ValueError:
            floats.append(None)
    nonempty = [n for n in lst.names if n]
    if kind is None:
        numeric = sum(f is not None for f in floats)
        kind = "thresholds" if nonempty and numeric * 2 > len(nonempty) else "translations"
    line0 = lst.first_line
    invalid: list[tuple[int, str, str]] = []
    stats: dict[str, Any] = {}
    duplicates: tuple[DuplicateGroup, ...] = ()
    if kind == "thresholds":
        good = []
        for k, (entry, f) in enumerate(zip(lst.names, floats, strict=True)):
            if not entry:
                invalid.append((k + line0, entry, "empty, not a number"))
            elif f is None:
                invalid.append((k + line0, entry, "not a number"))
            elif not (0.0 <= f <= 1.0):  # also rejects nan
                invalid.append((k + line0, entry, "outside [0, 1]"))
            else:
                good.append(f)
        if good:
            arr = np.asarray(good)
            values, counts = np.unique(arr, return_counts=True)
            order = np.argsort(-counts, kind="stable")[:5]
            stats = {
                "min": float(arr.min()), "max": float(arr.max()), "mean": round(float(arr.mean()), 6),
                "distinct": int(values.size),
                "most_common": [[float(values[i]), int(counts[i])] for i in order],
            }
    else:
        duplicates = duplicate_groups(range(len(lst.raw)), lst.raw)
    endings = line_endings(path) if lst.has_crlf else LineEndings()
    return AlignedReport(
        path=path,
        kind=kind,
        entries=len(lst.names),
        expected=expected,
        final_newline=lst.final_newline,
        has_bom=lst.has_bom,
        crlf_lines=endings.crlf_lines,
        empty_lines=() if kind == "thresholds" else tuple(k + line0 for k, n in enumerate(lst.names) if not n),
        whitespace_lines=tuple(k + line0 for k, r in enumerate(lst.raw) if r.strip() and r != r.strip()),
        duplicates=duplicates,
        invalid=tuple(invalid),
        stats=stats,
    )


def _audit_descriptions(path: str, vocab: Vocabulary) -> AlignedReport:
    """RAM++ tag descriptions: a JSON list of one-key objects ``{tag: [description, ...]}`` (or plain names)."""
    p = Path(path)
    data = read_bounded(p, "aligned", line_limit=False)
    has_bom = data.startswith(b"\xef\xbb\xbf")
    try:
        text = data.decode("utf-8-sig")
        value = json.loads(text)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InputError(f"{p}:{line}: not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{p}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    except RecursionError:
        raise InputError(f"{p}: the JSON is nested too deeply to be a description file") from None
    if not isinstance(value, list):
        raise InputError(f"{p}: expected a JSON list with one entry per tag, got {type(value).__name__}",
                         hint="use KIND=PATH with translations/thresholds for text files")
    names: list[str] = []
    invalid: list[tuple[int, str, str]] = []
    mismatches: list[tuple[int, str, str]] = []
    ks: list[int] = []
    for k, item in enumerate(value):
        if isinstance(item, dict) and len(item) == 1:
            (name, descs), = item.items()
            if isinstance(descs, list):
                ks.append(len(descs))
            else:
                invalid.append((k, str(name), "descriptions are not a list"))
        elif isinstance(item, str):
            name = item
        else:
            invalid.append((k, repr(item)[:60], "not a {tag: [descriptions]} object or a name"))
            name = ""
        names.append(name)
        expected_name = vocab.names_by_id.get(k)
        if name and expected_name is not None and normalize_tag(name) != normalize_tag(expected_name):
            mismatches.append((k, name, expected_name))
    stats: dict[str, Any] = {}
    if ks:
        stats = {"descriptions_min": min(ks), "descriptions_max": max(ks)}
    return AlignedReport(
        path=path, kind="descriptions", entries=len(value), expected=vocab.size,
        final_newline=text.endswith("\n") if text else None, has_bom=has_bom, crlf_lines=text.count("\r\n"),
        empty_lines=(), whitespace_lines=tuple(k for k, n in enumerate(names) if n.strip() and n != n.strip()),
        duplicates=duplicate_groups(range(len(names)), names), invalid=tuple(invalid), stats=stats,
        name_mismatches=tuple(mismatches),
    )


# -- embeddings ----------------------------------------------------------------------------------------------


def _pick(tensors: dict[str, TensorInfo], key: str | None, path: str) -> tuple[str, TensorInfo]:
    if not tensors:
        raise InputError(f"{path}: holds no tensors")
    if key is not None:
        if key not in tensors:
            raise InputError(f"{path}: no tensor '{key}'", hint="tensors: " + ", ".join(sorted(tensors)[:20]))
        return key, tensors[key]
    matrices = {k: v for k, v in tensors.items() if len(v.shape) >= 2}
    if len(tensors) == 1:
        return next(iter(tensors.items()))
    if len(matrices) == 1:
        return next(iter(matrices.items()))
    raise InputError(
        f"{path}: holds {len(tensors)} tensors, cannot tell which is the embedding matrix",
        hint=f"name one as {path}#KEY; tensors: " + ", ".join(sorted(tensors)[:20]),
    )


def _open_spec(spec: str) -> tuple[str, str, str, TensorInfo]:
    """``[label=]PATH[#KEY]`` opened: (kind, path, tensor name, its facts)."""
    kind = "auto"
    if spec.startswith("label=") and not Path(spec).exists():
        kind, spec = "label", spec.removeprefix("label=")
    path, _, key = spec.rpartition("#") if "#" in spec and not Path(spec).exists() else (spec, "", "")
    if not Path(path).exists():
        raise InputError(f"{path}: embeddings file not found")
    if Path(path).is_dir():
        raise InputError(f"{path}: is a directory, expected an embeddings file")
    name, info = _pick(open_tensor_file(path).tensors, key or None, path)
    return kind, path, name, info


def embedding_width(spec: str | Path) -> int:
    """The width (last dimension) of the matrix in an embedding file (``PATH[#KEY]``): the width a replacement for
    it must have (``--embedding-dim FILE``).

    Raises:
        InputError: the file is unreadable or holds no matrix (a tensor of two or more dimensions).
    """
    _kind, path, name, info = _open_spec(str(spec))
    if len(info.shape) < 2:
        raise InputError(f"{path}: the tensor {name!r} has shape {list(info.shape)}: no matrix to take a width from")
    return info.shape[-1]


def audit_embeddings(spec: str | Path, vocab_size: int, expected_dim: int | None = None) -> EmbeddingReport:
    """Read an embedding matrix's shape (``.pt``/``.pth``/``.bin`` via torch, ``.npy``/``.npz``, ``.safetensors``)
    and compare its rows with the vocabulary size. ``PATH#KEY`` picks one tensor of a file that holds several;
    ``label=PATH`` says the matrix must have exactly one row per tag (a description set of size × K rows is then
    misaligned). With ``expected_dim``, a matrix of another width (last dimension) is misaligned too.

    Opening the file checks that the data its header promises is there (see :mod:`mmprep.labels.tensorfile`):
    a truncated file is an InputError, not an aligned shape."""
    kind, path, name, info = _open_spec(str(spec))
    shape, dtype = info.shape, info.dtype
    rows = shape[0] if shape else 0
    k: int | None = None
    if vocab_size > 0 and len(shape) >= 2:  # a 1-D vector (a bias, a threshold list) is no embedding matrix
        if len(shape) >= 3 and rows == vocab_size:
            k = shape[1]
        elif rows == vocab_size:
            k = 1
        elif rows % vocab_size == 0 and rows > 0:
            k = rows // vocab_size
    shown = None if name in (BARE_TENSOR, BARE_ARRAY) else name
    dim = shape[-1] if len(shape) >= 2 else None
    return EmbeddingReport(path=path, key=shown, shape=shape, dtype=dtype, rows=rows, expected=vocab_size, k=k,
                           kind=kind, dim=dim, expected_dim=expected_dim)

