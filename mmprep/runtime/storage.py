"""Where inputs and outputs live: local paths, ``file://`` URIs, and any filesystem pyarrow or fsspec understands.

A :class:`Location` is one place on one filesystem (a local folder, ``s3://bucket/prefix``, ``memory://x``, ...).
Plain paths and ``file://`` URIs stay on the local fast path: the existing local code runs unchanged and nothing
is copied twice. Every other URI is opened once, in the parent, into a pyarrow filesystem (pyarrow's own S3, GCS,
Azure and HDFS clients first when they are built in and no storage options are given; otherwise the fsspec
implementation of the scheme, e.g. ``s3fs``, ``gcsfs``, ``adlfs``) and travels pickled to the workers.

Writing to a remote location is local-first and atomic: a shard is written to a local staging file, then uploaded
under its final name (object stores make an upload visible only once complete; filesystems with a rename get a
temporary name and a rename). ``index.json`` is written last, so its presence still means the dataset is complete.

Credentials never appear in outputs: they come from the environment / the filesystem's own configuration, from
storage options (fsspec keyword arguments) or from a URI's user part or query (``s3://KEY:SECRET@bucket/x``);
every URI shown in a message, report or file is :func:`redact`-ed (no user part, no query) and error texts from
the filesystem are scrubbed of the secret values.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qsl, unquote, urlsplit

from mmprep.errors import InputError, RunFailed, UsageError
from mmprep.runtime.files import atomic_write, sha256_file, temp_name

__all__ = [
    "Location",
    "is_local",
    "is_process_local",
    "local_path",
    "open_location",
    "parent_uri",
    "parse_storage_options",
    "redact",
    "scheme_of",
    "strip_uri",
]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
#: Object stores: an upload becomes visible only when complete, so shards are uploaded under their final name.
_OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "memory", "r2"})
#: Schemes pyarrow has native clients for (used when no storage options are given and the build has them).
_PYARROW_SCHEMES = frozenset({"s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs"})
#: Query parameters and option names whose values are secrets (matched as substrings, case-insensitive).
_SECRET_WORDS = ("secret", "key", "token", "password", "passwd", "credential", "sig", "sas", "auth", "session")
_PROCESS_LOCAL = frozenset({"memory"})
_BLOCK = 8 << 20


def is_process_local(uri: str) -> bool:
    """A store that exists only inside this process (``memory://``): worker processes cannot see it."""
    return scheme_of(uri) in _PROCESS_LOCAL


def scheme_of(uri: str) -> str | None:
    """The URI scheme in lower case, or None for a plain path."""
    m = _SCHEME.match(uri)
    return m.group(1).lower() if m else None


def is_local(uri: str | os.PathLike[str]) -> bool:
    """True for a plain path, ``-`` (stdin) and a ``file://`` URI."""
    return scheme_of(os.fspath(uri)) in (None, "file")


def local_path(uri: str | os.PathLike[str]) -> str:
    """A plain path for a local reference (``file:///data/x`` -> ``/data/x``); other strings unchanged."""
    s = os.fspath(uri)
    if scheme_of(s) != "file":
        return s
    parts = urlsplit(s)
    if parts.netloc not in ("", "localhost"):
        raise UsageError(f"{redact(s)}: file:// URIs with a host are not supported",
                         hint="use file:///absolute/path (three slashes) or a plain path")
    return unquote(parts.path) or "/"


def redact(uri: str | os.PathLike[str]) -> str:
    """The URI as it may be shown: without a user/password part and without a query string."""
    s = os.fspath(uri)
    if scheme_of(s) is None:
        return s
    parts = urlsplit(s)
    host = parts.netloc.rsplit("@", 1)[-1]
    return f"{parts.scheme}://{host}{parts.path}"


def _secret_key(name: str) -> bool:
    low = name.lower()
    return any(w in low for w in _SECRET_WORDS)


def _secrets_of(uri: str, options: Mapping[str, Any] | None) -> tuple[str, ...]:
    """Values to scrub from any text shown: the URI's user part and secret-looking query and option values."""
    found: list[str] = []
    if scheme_of(uri) is not None:
        parts = urlsplit(uri)
        if "@" in parts.netloc:
            user = parts.netloc.rsplit("@", 1)[0]
            found.extend([user, *(unquote(p) for p in user.split(":"))])
        found.extend(unquote(v) for k, v in parse_qsl(parts.query) if _secret_key(k))
        if parts.query:
            found.append(parts.query)

    def walk(opts: Mapping[str, Any], inherit: bool) -> None:
        for k, v in opts.items():
            secret = inherit or _secret_key(str(k))
            if isinstance(v, Mapping):
                walk(v, secret)
            elif secret and isinstance(v, str):
                found.append(v)

    walk(options or {}, False)
    return tuple(sorted({s for s in found if len(s) >= 3}, key=len, reverse=True))


def parse_storage_options(pairs: list[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` strings into fsspec keyword arguments; values are JSON when they parse (``true``, ``3``,
    ``{"endpoint_url": ...}``), else strings. ``$MMPREP_STORAGE_OPTIONS`` (a JSON object) is read first."""
    opts: dict[str, Any] = {}
    env = os.environ.get("MMPREP_STORAGE_OPTIONS")
    if env:
        try:
            loaded = json.loads(env)
        except ValueError:
            loaded = None
        if not isinstance(loaded, dict):
            raise UsageError("$MMPREP_STORAGE_OPTIONS must be a JSON object")
        opts.update(loaded)
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--storage-option expects KEY=VALUE, got '{key.strip() if sep else '…'}'",
                             hint="e.g. --storage-option anon=true")
        try:
            opts[key.strip()] = json.loads(value)
        except ValueError:
            opts[key.strip()] = value
    return opts


@dataclass(frozen=True)
class Location:
    """One file or folder on one filesystem; picklable (the filesystem object travels with it).

    Attributes:
        fs: a ``pyarrow.fs.FileSystem``.
        path: the path inside ``fs``.
        uri: how it is shown (redacted: no credentials).
        local: a local path (``path`` is then an absolute OS path).
        atomic_put: an upload is visible only when complete (object stores), so no rename is needed.
        scheme: the URI scheme (``file`` for local paths).
    """

    fs: Any = field(repr=False)
    path: str
    uri: str
    local: bool = False
    atomic_put: bool = False
    scheme: str = "file"
    secrets: tuple[str, ...] = field(default=(), repr=False)

    def __str__(self) -> str:
        return self.uri

    def child(self, name: str) -> Location:
        """The location ``name`` (a relative POSIX path) under this one."""
        path = posixpath.join(self.path, name) if not self.local else os.path.join(self.path, name)
        uri = self.uri.rstrip("/") + "/" + name
        return Location(self.fs, path, uri, self.local, self.atomic_put, self.scheme, self.secrets)

    def parent(self) -> Location:
        """The folder holding this location."""
        path = os.path.dirname(self.path) if self.local else posixpath.dirname(self.path.rstrip("/"))
        uri = self.uri.rstrip("/").rsplit("/", 1)[0] if "/" in self.uri.rstrip("/") else self.uri
        return Location(self.fs, path, uri, self.local, self.atomic_put, self.scheme, self.secrets)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    def scrub(self, text: str) -> str:
        """``text`` with every secret of this location replaced by ``***``."""
        for s in self.secrets:
            text = text.replace(s, "***")
        return text

    @property
    def os_path(self) -> Path:
        """The local path (only for a local location)."""
        if not self.local:
            raise ValueError(f"{self}: not a local path")
        return Path(self.path)

    # -- reading ------------------------------------------------------------------------------------------------
    def open_input(self) -> IO[bytes]:
        """A seekable binary file (raises InputError naming the location)."""
        try:
            return self.fs.open_input_file(self.path)
        except FileNotFoundError:
            raise InputError(f"{self}: no such file") from None
        except OSError as exc:
            raise InputError(f"{self}: cannot open: {self.scrub(str(exc))}") from None

    def read_bytes(self) -> bytes:
        if self.local:
            return Path(self.path).read_bytes()
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def size(self) -> int | None:
        """The file's size, or None when there is no such file (a link or folder is no file here)."""
        if self.local:
            try:
                st = os.lstat(self.path)
            except OSError:
                return None
            return st.st_size if stat.S_ISREG(st.st_mode) else None
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(self.path)
        return info.size if info.type == pafs.FileType.File else None

    def sha256(self) -> str:
        """SHA-256 of the bytes, streamed."""
        if self.local:
            return sha256_file(self.path)
        with self.fs.open_input_stream(self.path) as f:
            return hashlib.file_digest(f, "sha256").hexdigest()

    def list_names(self) -> list[str]:
        """Names directly inside this folder (empty when it does not exist)."""
        if self.local:
            try:
                return sorted(os.listdir(self.path))
            except (FileNotFoundError, NotADirectoryError):
                return []
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True, recursive=False))
        return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)

    # -- writing ------------------------------------------------------------------------------------------------
    def _put(self, write: Any) -> None:
        """Run ``write(stream)`` into this location atomically (final name on object stores, else temp + rename)."""
        parent = posixpath.dirname(self.path)
        target = self.path if self.atomic_put else posixpath.join(parent, temp_name(posixpath.basename(self.path)))
        try:
            if not self.atomic_put:
                self.fs.create_dir(parent, recursive=True)
            with self.fs.open_output_stream(target) as out:
                write(out)
            if target != self.path:
                self.fs.move(target, self.path)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                self.fs.delete_file(target)
            if isinstance(exc, OSError):
                raise RunFailed(f"cannot write {self}: {self.scrub(str(exc))}",
                                hint="check the storage credentials, permissions and free space") from None
            raise

    def write_bytes(self, data: bytes) -> None:
        """Write ``data`` under this name atomically (never through a symbolic link)."""
        if self.local:
            atomic_write(self.path, data)
        else:
            self._put(lambda out: out.write(data))

    def upload(self, local: str | os.PathLike[str]) -> None:
        """Copy a local file here atomically."""

        def copy(out: Any) -> None:
            with open(local, "rb") as src:
                for block in iter(lambda: src.read(_BLOCK), b""):
                    out.write(block)

        self._put(copy)

    @contextlib.contextmanager
    def staged(self) -> Iterator[Path]:
        """A local path to write this file at; a remote location receives it (uploaded) when the block ends
        without an error. A local location yields its own path: the writer's temp-and-rename keeps it atomic.

        The staging folder is ``$MMPREP_STAGING_DIR`` (default ``$TMPDIR``); it holds one file per worker at a time.
        """
        if self.local:
            yield Path(self.path)
            return
        staging = tempfile.mkdtemp(prefix="mmprep-stage-", dir=os.environ.get("MMPREP_STAGING_DIR"))
        try:
            local = Path(staging) / self.name
            yield local
            self.upload(local)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def delete(self) -> None:
        """Delete this file (never a folder: mmprep deletes only files it wrote, by name)."""
        if self.local:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return
        import pyarrow.fs as pafs

        if self.fs.get_file_info(self.path).type == pafs.FileType.File:
            self.fs.delete_file(self.path)


def open_location(uri: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> Location:
    """Open ``uri`` (a path, ``file://``, ``s3://``, ``memory://``, ...) on its filesystem.

    Raises:
        UsageError: no filesystem for the scheme (the hint names the package to install), or bad options.
    """
    import pyarrow.fs as pafs

    s = os.fspath(uri)
    scheme = scheme_of(s)
    if scheme in (None, "file"):
        return Location(pafs.LocalFileSystem(), os.path.abspath(local_path(s)), local_path(s), local=True)
    assert scheme is not None
    shown = redact(s)
    secrets = _secrets_of(s, storage_options)
    errors: list[str] = []
    fs: Any = None
    path = ""
    if scheme in _PYARROW_SCHEMES and not storage_options:
        try:
            fs, path = pafs.FileSystem.from_uri(s)
        except (ValueError, OSError, NotImplementedError, ImportError) as exc:
            errors.append(str(exc))
    if fs is None:
        try:
            import fsspec

            fsspec.get_filesystem_class(scheme)
            fsspec_fs, path = fsspec.core.url_to_fs(s, **dict(storage_options or {}))
            fs = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec_fs))
        except (ImportError, ValueError) as exc:
            errors.append(str(exc))
        except TypeError as exc:
            raise UsageError(f"{shown}: bad storage option: {_scrub(str(exc), secrets)}") from None
        except OSError as exc:
            raise UsageError(f"{shown}: cannot open: {_scrub(str(exc), secrets)}",
                             hint="check the URI, the credentials (environment or --storage-option) and access"
                             ) from None
    if fs is None:
        detail = _scrub("; ".join(e for e in errors if e), secrets)
        hint = {"s3": "pip install s3fs", "s3a": "pip install s3fs", "gs": "pip install gcsfs",
                "gcs": "pip install gcsfs", "az": "pip install adlfs", "abfs": "pip install adlfs",
                "abfss": "pip install adlfs", "http": "pip install aiohttp", "https": "pip install aiohttp"}.get(
            scheme, "install the fsspec implementation for this scheme")
        raise UsageError(f"{shown}: no filesystem for {scheme}:// ({detail or 'unknown scheme'})", hint=hint)
    return Location(fs, path.rstrip("/") or path, shown, local=False, atomic_put=scheme in _OBJECT_STORES,
                    scheme=scheme, secrets=secrets)


def _scrub(text: str, secrets: tuple[str, ...]) -> str:
    for s in secrets:
        text = text.replace(s, "***")
    return text


def strip_uri(uri: str, like: Location) -> str:
    """The filesystem path of a full URI on ``like``'s filesystem."""
    handler = getattr(like.fs, "handler", None)
    fsspec_fs = getattr(handler, "fs", None)
    if fsspec_fs is not None:
        return str(fsspec_fs._strip_protocol(redact(uri)))
    parts = urlsplit(redact(uri))
    return parts.netloc + parts.path


def parent_uri(uri: str) -> str:
    """The folder of a file URI or path (``s3://b/x/m.jsonl`` -> ``s3://b/x``)."""
    if scheme_of(uri) is None:
        return str(Path(uri).resolve().parent)
    parts = urlsplit(uri)
    parent = posixpath.dirname(parts.path)
    rebuilt = f"{parts.scheme}://{parts.netloc}{parent}"
    return rebuilt + (f"?{parts.query}" if parts.query else "")
