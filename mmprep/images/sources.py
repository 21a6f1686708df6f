"""Where a manifest's image references are read from: a local folder, or a folder on any filesystem.

:func:`open_images` returns one :class:`ImageSource` for a root; the per-sample processor asks it for the image of
each reference and never cares where the bytes live. Every failure is an :class:`ImageError` with a reason
(``path_invalid``, ``path_outside_root``, ``image_missing``, ``image_not_a_file``, ``image_unreadable`` or a decoder
reason) and a detail naming the file.

``signature`` returns cheap facts about a referenced file (size and modification time), which ``pack --resume``
records per chunk to notice images that changed since a chunk was written.

A reference may also be an :class:`~mmprep.records.EmbeddedImage`: image bytes that came with the input (a Parquet
or Arrow manifest), held in memory or in the run's spool file (:mod:`mmprep.images.spool`). They go through the
same decoder and the same rules (pixel limit, truncation, EXIF orientation) as files; messages name their size and
stored path, never their bytes.
"""

from __future__ import annotations

import os
import posixpath
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mmprep.images.decode import DecodedImage, ImageConfig, ImageError, load_image, resolve_image_path
from mmprep.images.spool import read_spooled
from mmprep.records import EmbeddedImage, ImageRef, describe_image_ref
from mmprep.runtime.storage import Location, redact, scheme_of, strip_uri

__all__ = ["ImageSource", "LoadedImage", "LocalImages", "RemoteImages", "load_embedded", "read_regular_file"]


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image and, when asked for, the bytes of its file."""

    image: DecodedImage
    data: bytes | None = None


class ImageSource(Protocol):
    """Reads the images a manifest refers to (picklable: it travels to the workers)."""

    def load(self, ref: ImageRef, cfg: ImageConfig, *, keep_bytes: bool = False) -> LoadedImage:
        """Read and decode one image (ImageError when it cannot be used)."""
        ...

    def size(self, ref: ImageRef) -> int:
        """The file's byte size (0 when it cannot be read)."""
        ...

    def signature(self, ref: ImageRef) -> tuple[int, int] | None:
        """``(size, mtime_ns)`` of the file, or None when it cannot be read."""
        ...

    def locate(self, ref: str) -> str:
        """Where ``ref`` is read from, as messages show it (ImageError: ``path_invalid``, ``path_outside_root``)."""
        ...

    def problem(self, ref: str) -> str:
        """Why ``ref`` has no :meth:`signature`, in a few words for a message (``does not exist``, ``cannot be
        reached: ...``); empty when it can be read after all."""
        ...

    def describe_root(self) -> str:
        """The image root, as messages show it."""
        ...


def load_embedded(ref: EmbeddedImage, spool: str | None, cfg: ImageConfig, *, keep_bytes: bool = False) -> LoadedImage:
    """Decode an embedded image (its bytes in memory, or in the spool file ``spool``).

    Raises:
        ImageError: the bytes cannot be read back or decoded; the detail names the image's size and stored path.
    """
    data = ref.data
    if data is None:
        if spool is None or ref.offset < 0:
            raise ImageError("image_unreadable", f"{describe_image_ref(ref)}: its bytes were not kept")
        try:
            data = read_spooled(spool, ref.offset, ref.size)
        except OSError as exc:
            raise ImageError("image_unreadable", f"{describe_image_ref(ref)}: cannot read the spool: {exc}") from None
    try:
        image = load_image(data, cfg)
    except ImageError as exc:  # the caller names the image; the decoder's detail names it "<bytes>"
        detail = exc.detail[len("<bytes>: "):] if exc.detail.startswith("<bytes>: ") else exc.detail
        raise ImageError(exc.reason, detail) from None
    return LoadedImage(image, data if keep_bytes else None)


def read_regular_file(path: str | os.PathLike[str]) -> bytes:
    """A regular file's bytes. Anything else is refused before reading: a FIFO would block forever and a device
    such as ``/dev/zero`` would never end (the file is opened non-blocking and checked with ``fstat``).

    Raises:
        ImageError: ``image_missing``, ``image_unreadable``, ``image_not_a_file`` or ``image_unidentified`` (empty).
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except (FileNotFoundError, NotADirectoryError):
        raise ImageError("image_missing", f"no such file: {path}") from None
    except PermissionError:
        raise ImageError("image_unreadable", f"permission denied: {path}") from None
    except OSError as exc:
        raise ImageError("image_unreadable", f"{path}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise ImageError("image_not_a_file", f"is {kind}: {path}")
        if st.st_size == 0:
            raise ImageError("image_unidentified", f"empty file (0 bytes): {path}")
        os.set_blocking(fd, True)
        with open(fd, "rb", closefd=False) as f:
            return f.read()
    except OSError as exc:
        raise ImageError("image_unreadable", f"{path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


@dataclass(frozen=True)
class LocalImages:
    """Images under a local folder.

    Attributes:
        root: the folder relative references are joined to.
        allow_outside: accept references that leave the root (``..``, absolute paths, symbolic links).
        spool: the spool file of embedded images (None when the input has none).
    """

    root: Path
    allow_outside: bool = False
    spool: str | None = None

    def path(self, ref: str) -> Path:
        return resolve_image_path(ref, self.root, self.allow_outside)

    def load(self, ref: ImageRef, cfg: ImageConfig, *, keep_bytes: bool = False) -> LoadedImage:
        if isinstance(ref, EmbeddedImage):
            return load_embedded(ref, self.spool, cfg, keep_bytes=keep_bytes)
        path = self.path(ref)
        if keep_bytes:
            data = read_regular_file(path)
            return LoadedImage(load_image(data, cfg), data)
        return LoadedImage(load_image(path, cfg))

    def size(self, ref: ImageRef) -> int:
        if isinstance(ref, EmbeddedImage):
            return ref.size
        try:
            return self.path(ref).stat().st_size
        except (OSError, ImageError):
            return 0

    def signature(self, ref: ImageRef) -> tuple[int, int] | None:
        if isinstance(ref, EmbeddedImage):
            return (ref.size, 0)  # the bytes are part of the manifest, whose hash the run identity holds
        try:
            st = self.path(ref).stat()
        except (OSError, ImageError):
            return None
        return (st.st_size, st.st_mtime_ns)

    def locate(self, ref: str) -> str:
        return str(self.path(ref))

    def problem(self, ref: str) -> str:
        try:
            self.path(ref).stat()
        except ImageError as exc:
            return exc.detail
        except FileNotFoundError:
            return "does not exist"
        except OSError as exc:
            return f"cannot be read: {exc.strerror or exc}"
        return ""

    def describe_root(self) -> str:
        return str(self.root)


def _http_problem(url: str) -> str:
    """``does not exist`` when the server answers 404/410, else what went wrong (a HEAD request, 10 s timeout)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10):
            return ""
    except urllib.error.HTTPError as exc:
        return "does not exist" if exc.code in (404, 410) else f"cannot be read (HTTP {exc.code} {exc.reason})"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"cannot be reached ({reason})"


def _split_host(path: str) -> tuple[str, str]:
    """``("http://host:port", "/a/b")`` for a URL path, ``("", path)`` for any other filesystem path."""
    if "://" not in path:
        return "", path
    scheme, rest = path.split("://", 1)
    host, sep, tail = rest.partition("/")
    return f"{scheme}://{host}", sep + tail


@dataclass(frozen=True)
class RemoteImages:
    """Images under a folder on a remote filesystem (references relative to it, or full URIs of the same store).

    Attributes:
        root: the image root.
        allow_outside: accept references outside the root.
        spool: the spool file of embedded images (None when the input has none).
    """

    root: Location
    allow_outside: bool = False
    spool: str | None = None

    def resolve(self, ref: str) -> Location:
        """The location of a reference, refusing to leave the root (``..``) unless allowed.

        Raises:
            ImageError: ``path_invalid`` or ``path_outside_root``.
        """
        if not isinstance(ref, str) or not ref.strip() or "\x00" in ref:
            raise ImageError("path_invalid", f"invalid image path {ref!r}")
        root = self.root
        # URL filesystems (http, https) use whole URLs as paths: only the part after the host is a path to normalise.
        prefix, base_path = _split_host(root.path)
        ref_scheme = scheme_of(ref)
        if ref_scheme is not None:
            if ref_scheme != root.scheme:
                raise ImageError("path_invalid", f"{redact(ref)}: not on the image root's filesystem ({root})")
            ref_prefix, path = _split_host(strip_uri(ref, root))
            if ref_prefix != prefix:
                raise ImageError("path_invalid", f"{redact(ref)}: not on the image root's host ({root})")
        elif ref.startswith("/"):
            path = ref if base_path.startswith("/") else ref.lstrip("/")
        else:
            path = posixpath.join(base_path, ref)
        path = posixpath.normpath(path)
        base = posixpath.normpath(base_path) if base_path else ""
        inside = not base or path == base or path.startswith(base.rstrip("/") + "/")
        if prefix and not base:  # the root is a host: any path on it is inside
            inside = not path.startswith("..")
        if not self.allow_outside and not inside:
            raise ImageError("path_outside_root", f"{redact(ref)}: resolves outside the image root {root}")
        rel = posixpath.relpath(path, base) if base and path.startswith(base) else path.lstrip("/")
        full = prefix + (path if path.startswith("/") or not prefix else "/" + path)
        return Location(root.fs, full, root.uri.rstrip("/") + "/" + rel, False, root.atomic_put, root.scheme,
                        root.secrets)

    def read(self, ref: str) -> bytes:
        """The bytes of an image (ImageError: path or read failures)."""
        return self._read(self.resolve(ref))

    def load(self, ref: ImageRef, cfg: ImageConfig, *, keep_bytes: bool = False) -> LoadedImage:
        if isinstance(ref, EmbeddedImage):
            return load_embedded(ref, self.spool, cfg, keep_bytes=keep_bytes)
        loc = self.resolve(ref)
        data = self._read(loc)
        try:
            image = load_image(data, cfg)
        except ImageError as exc:
            raise ImageError(exc.reason, exc.detail.replace("<bytes>", str(loc), 1)) from None
        return LoadedImage(image, data if keep_bytes else None)

    def _read(self, loc: Location) -> bytes:
        try:
            return loc.read_bytes()
        except FileNotFoundError:
            if loc.scheme in ("http", "https"):  # fsspec says "not found" for a server that does not answer too
                problem = _http_problem(loc.path)
                if problem.startswith("cannot"):
                    raise ImageError("image_unreadable", f"{loc}: {problem}") from None
            raise ImageError("image_missing", f"{loc}: no such file") from None
        except IsADirectoryError:
            raise ImageError("image_not_a_file", f"{loc}: is a directory") from None
        except PermissionError:
            raise ImageError("image_unreadable", f"{loc}: permission denied") from None
        except OSError as exc:
            text = loc.scrub(str(exc))
            low = text.lower()
            if "does not exist" in low or "not found" in low or "nosuchkey" in low:
                raise ImageError("image_missing", f"{loc}: no such file") from None
            if "directory" in low:
                raise ImageError("image_not_a_file", f"{loc}: is a directory") from None
            raise ImageError("image_unreadable", f"{loc}: {text}") from None

    def size(self, ref: ImageRef) -> int:
        if isinstance(ref, EmbeddedImage):
            return ref.size
        try:
            return self.resolve(ref).size() or 0
        except Exception:
            return 0

    def signature(self, ref: ImageRef) -> tuple[int, int] | None:
        if isinstance(ref, EmbeddedImage):
            return (ref.size, 0)
        try:
            import pyarrow.fs as pafs

            loc = self.resolve(ref)
            info = loc.fs.get_file_info(loc.path)
            if info.type != pafs.FileType.File:
                return None
            mtime = info.mtime_ns if info.mtime_ns is not None else 0
            return (int(info.size), int(mtime))
        except Exception:
            return None

    def locate(self, ref: str) -> str:
        return str(self.resolve(ref))

    def problem(self, ref: str) -> str:
        import pyarrow.fs as pafs

        try:
            loc = self.resolve(ref)
        except ImageError as exc:
            return exc.detail
        if loc.scheme in ("http", "https"):  # fsspec's HTTP filesystem says "not found" for a silent server too
            return _http_problem(loc.path)
        try:
            info = loc.fs.get_file_info(loc.path)
        except FileNotFoundError:
            return "does not exist"
        except Exception as exc:  # a server that does not answer, refused credentials: say what the store said
            text = " ".join(loc.scrub(str(exc)).split())
            return f"cannot be reached ({type(exc).__name__}: {text[:300]})"
        if info.type == pafs.FileType.NotFound:
            return "does not exist"
        if info.type == pafs.FileType.Directory:
            return "is a directory"
        return ""

    def describe_root(self) -> str:
        return str(self.root)
