"""Collecting the images of a source: a folder scanned recursively, or the image column of a manifest.

Every distinct reference becomes an :class:`ImageItem`; a reference refused before any file is opened (it leads
outside the image root, or is not a valid path) carries its :class:`ImageReject`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mmprep.errors import InputError, UsageError
from mmprep.images.decode import ImageError, resolve_image_path
from mmprep.inputs.manifest import ColumnMap, iter_samples
from mmprep.records import Rejected

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageItem",
    "ImageReject",
    "ImageSet",
    "collect_images",
    "output_relpath",
]

#: Files a folder scan picks up (case-insensitive). Decoding itself looks at the content, not the name.
IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".gif", ".webp", ".bmp", ".dib", ".tif", ".tiff", ".mpo",
    ".avif", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".jp2", ".j2k", ".qoi", ".ico", ".pcx", ".sgi",
})


@dataclass(frozen=True)
class ImageReject:
    """An image that could not be used, and why (a line of the rejects of ``image-stats`` and ``normalize-images``).

    Attributes:
        path: the reference as written (see :attr:`ImageItem.ref`).
        reason: a short code (``image_missing``, ``image_truncated``, ``path_outside_root``, ...).
        detail: a sentence naming the file.
    """

    path: str
    reason: str
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason, "detail": self.detail}


@dataclass(frozen=True)
class ImageItem:
    """One image to process.

    Attributes:
        ref: the reference as written (the manifest path, or the path relative to the source folder).
        path: the file to open, or None when the reference itself was refused (see ``error``).
        relpath: where its output goes, relative to the output folder (POSIX, original extension).
        error: why the reference was refused (reason ``path_outside_root`` or ``path_invalid``).
    """

    ref: str
    path: str | None
    relpath: str
    error: ImageReject | None = None


@dataclass
class ImageSet:
    """The distinct images of a source, in first-seen order.

    Attributes:
        source: the folder or manifest given.
        kind: ``folder`` or ``manifest``.
        root: the image root references are resolved against.
        items: one per distinct reference.
        references: image references seen (manifests can name a file several times).
        samples: manifest rows read (0 for a folder).
        manifest_rejects: manifest rows that could not be read.
    """

    source: str
    kind: str
    root: Path
    items: list[ImageItem] = field(default_factory=list)
    references: int = 0
    samples: int = 0
    manifest_rejects: list[Rejected] = field(default_factory=list)


def output_relpath(ref: str, root: str | os.PathLike[str]) -> str:
    """A safe relative output path for a reference: the normalised path when it lies under the root, else
    ``_outside/<absolute path>`` so nothing is ever written outside the output folder."""
    joined = ref if os.path.isabs(ref) else os.path.join(os.fspath(root), ref)
    norm = os.path.normpath(os.path.abspath(joined))
    root_abs = os.path.normpath(os.path.abspath(root))
    rel = os.path.relpath(norm, root_abs)
    if rel == os.curdir or rel.startswith(os.pardir + os.sep) or rel == os.pardir or os.path.isabs(rel):
        rel = os.path.join("_outside", norm.lstrip(os.sep))
    return Path(rel).as_posix()


def collect_images(
    src: str | os.PathLike[str],
    *,
    image_root: str | os.PathLike[str] | None = None,
    allow_outside_root: bool = False,
    input_format: str | None = None,
    column_map: ColumnMap | None = None,
    exclude: Sequence[str | os.PathLike[str]] = (),
    limit: int | None = None,
) -> ImageSet:
    """List the images of a folder (recursively, by extension) or of a manifest (the image column).

    Args:
        src: a folder, a manifest file (JSONL, JSON, CSV, Parquet) or ``-`` for a manifest on stdin.
        image_root: what manifest paths are relative to (default: the manifest's folder; the current
            folder for stdin). Ignored for folders (the folder is the root).
        allow_outside_root: accept paths (and, in a folder, symbolic links) that resolve outside the root.
        input_format: the manifest format when the name does not tell.
        column_map: which manifest column holds the images (default: found by the usual names).
        exclude: folders not to scan (e.g. the output folder inside the source folder).
        limit: stop after this many distinct images.

    Raises:
        InputError: the source does not exist or is not a readable manifest.
    """
    name = str(src)
    if name != "-" and Path(name).is_dir():
        if image_root is not None:
            raise UsageError("--image-root only applies to a manifest; a folder is its own root")
        return _collect_folder(Path(name), exclude, limit, allow_outside_root)
    if name != "-" and not Path(name).exists():
        raise InputError(f"{name}: no such file or folder", hint="give an image folder or a manifest file")
    root = Path(image_root) if image_root is not None else (Path.cwd() if name == "-" else Path(name).parent)
    if not root.is_dir():
        raise InputError(f"{root}: image root is not a folder", hint="pass --image-root DIR")
    out = ImageSet(source=name, kind="manifest", root=root)
    seen: set[str] = set()
    seen_files: set[str] = set()
    for rec in iter_samples(src, column_map, fmt=input_format):
        if isinstance(rec, Rejected):
            out.manifest_rejects.append(rec)
            continue
        out.samples += 1
        for ref in rec.images:
            out.references += 1
            if not isinstance(ref, str):  # never here: only `pack` asks for embedded images
                continue
            if ref in seen:
                continue
            seen.add(ref)
            item = _item(ref, root, allow_outside_root)
            if item.path is not None:  # images/a.jpg and ./images/a.jpg are one file
                key = os.path.realpath(item.path)
                if key in seen_files:
                    continue
                seen_files.add(key)
            out.items.append(item)
            if limit is not None and len(out.items) >= limit:
                return out
    return out


def _item(ref: str, root: Path, allow_outside: bool) -> ImageItem:
    try:
        path = resolve_image_path(ref, root, allow_outside)
    except ImageError as exc:
        rel = output_relpath(ref, root) if exc.reason == "path_outside_root" else ""
        return ImageItem(ref, None, rel, ImageReject(ref, exc.reason, exc.detail))
    return ImageItem(ref, os.fspath(path), output_relpath(ref, root))


def _collect_folder(
    folder: Path, exclude: Sequence[str | os.PathLike[str]], limit: int | None, allow_outside: bool
) -> ImageSet:
    out = ImageSet(source=str(folder), kind="folder", root=folder)
    skip = {os.path.realpath(e) for e in exclude}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and os.path.realpath(os.path.join(dirpath, d)) not in skip
        )
        for fname in sorted(filenames):
            if fname.startswith(".") or os.path.splitext(fname)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            rel = Path(os.path.relpath(os.path.join(dirpath, fname), folder)).as_posix()
            out.references += 1
            # the same root check as for manifests: a symbolic link pointing out of the folder is refused
            out.items.append(_item(rel, folder, allow_outside))
            if limit is not None and len(out.items) >= limit:
                return out
    return out
