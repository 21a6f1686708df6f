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
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qsl, unquote, urlsplit

from mmprep.errors import InputError, RunFailed, UsageError

__all__ = [
    "ImageStore",
    "Location",
    "PackLocations",
    "RemoteOutputDir",
    "is_local",
    "local_path",
    "open_location",
    "parse_storage_options",
    "read_parquet_schema",
    "redact",
    "staged_file",
    "write_file",
    "write_json_file",
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

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    def scrub(self, text: str) -> str:
        """``text`` with every secret of this location replaced by ``***``."""
        for s in self.secrets:
            text = text.replace(s, "***")
        return text

    # -- reading ------------------------------------------------------------------------------------------------
    def open_input(self) -> IO[bytes]:
        """A seekable binary file (raises InputError naming the location)."""
        try:
            return self.fs.open_input_file(self.path)  # type: ignore[no-any-return]
        except FileNotFoundError:
            raise InputError(f"{self}: no such file") from None
        except OSError as exc:
            raise InputError(f"{self}: cannot open: {self.scrub(str(exc))}") from None

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()  # type: ignore[no-any-return]

    def size(self) -> int | None:
        """The file's size, or None when there is no such file."""
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(self.path)
        return info.size if info.type == pafs.FileType.File else None

    def list_names(self) -> list[str]:
        """Names directly inside this folder (empty when it does not exist)."""
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True, recursive=False))
        return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)

    # -- writing ------------------------------------------------------------------------------------------------
    def _put(self, write: Any) -> None:
        """Run ``write(stream)`` into this location atomically (final name on object stores, else temp + rename)."""
        parent = posixpath.dirname(self.path)
        target = self.path if self.atomic_put else posixpath.join(
            parent, f".{posixpath.basename(self.path)}.tmp-{uuid.uuid4().hex[:12]}")
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
        """Write ``data`` under this name atomically."""
        self._put(lambda out: out.write(data))

    def upload(self, local: str | os.PathLike[str]) -> None:
        """Copy a local file here atomically."""

        def copy(out: Any) -> None:
            with open(local, "rb") as src:
                for block in iter(lambda: src.read(_BLOCK), b""):
                    out.write(block)

        self._put(copy)

    def delete(self) -> None:
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)
        elif info.type == pafs.FileType.File:
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
        return Location(pafs.LocalFileSystem(), os.path.abspath(local_path(s)), s, local=True)
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


# -- writing into an output folder that is a local Path or a remote Location ------------------------------------------


@contextlib.contextmanager
def staged_file(dest: Path | Location, name: str) -> Iterator[Path]:
    """A local path to write ``name`` at; for a remote ``dest`` it is a staging file uploaded on success.

    A local ``dest`` yields ``dest / name`` itself (the writer's own temp-and-rename keeps it atomic).
    The staging folder is ``$TMPDIR`` (or ``$MMPREP_STAGING_DIR``); it holds one shard per worker at a time.
    """
    if isinstance(dest, Path):
        yield dest / name
        return
    if dest.local:
        yield Path(dest.path) / name
        return
    staging = tempfile.mkdtemp(prefix="mmprep-stage-", dir=os.environ.get("MMPREP_STAGING_DIR"))
    try:
        local = Path(staging) / name
        yield local
        dest.child(name).upload(local)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_file(dest: Path | Location, name: str, data: bytes) -> None:
    """Write ``name`` under ``dest`` atomically."""
    if isinstance(dest, Path) or dest.local:
        from mmprep.runtime.shards import atomic_write_bytes

        atomic_write_bytes(Path(dest if isinstance(dest, Path) else dest.path) / name, data)
    else:
        dest.child(name).write_bytes(data)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def write_json_file(dest: Path | Location, name: str, obj: Any) -> None:
    """Write ``obj`` as ``name`` (indented, sorted keys) under ``dest`` atomically."""
    write_file(dest, name, _json_bytes(obj))


def read_parquet_schema(dest: Path | Location, name: str) -> Any:
    """The Arrow schema (with metadata) of the Parquet file ``name`` under ``dest``."""
    import pyarrow.parquet as pq

    if isinstance(dest, Path):
        return pq.read_schema(dest / name)
    loc = dest.child(name)
    with loc.fs.open_input_file(loc.path) as f:
        return pq.read_schema(f)


def file_digest(src: str | Location) -> str:
    """SHA-256 of a local file or a remote location's bytes, streamed."""
    h = hashlib.sha256()
    with (open(src, "rb") if isinstance(src, str) else src.fs.open_input_stream(src.path)) as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# -- the remote output folder --------------------------------------------------------------------------------------


class RemoteOutputDir:
    """The output folder of a pack run on a remote filesystem; the same interface as ``shards.OutputDir``.

    Differences from a local folder: there is no lock (object stores have none: never run two jobs into one
    prefix), and a finished shard is checked by its size (reading every shard back to hash it would cost a full
    download); the chunk record is written only after its shard upload completed, so a record means an intact
    shard unless the object was replaced since.
    """

    def __init__(self, loc: Location, *, resume: bool = False, overwrite: bool = False) -> None:
        self.path = loc
        self.resume = resume
        self.overwrite = overwrite
        from mmprep.runtime.shards import STATE_DIR

        self.state = loc.child(STATE_DIR)

    def open(self, identity: dict[str, Any]) -> None:
        """Check (or record) the run identity; with ``overwrite``, delete mmprep's files of an earlier run."""
        from mmprep.runtime.shards import _OWNED_NAMES, _OWNED_PREFIXES, STATE_DIR

        if self.resume and self.overwrite:
            raise UsageError("--resume and --overwrite exclude each other")
        loc = self.path
        try:
            existing = loc.list_names()
            run = self.state.child("run.json")
            old = json.loads(run.read_bytes()) if run.size() is not None else None
        except (OSError, ValueError) as exc:
            raise UsageError(f"{loc}: cannot read the output location: {loc.scrub(str(exc))}",
                             hint="check the URI, the storage credentials and permissions") from None
        ours = [n for n in existing if n.startswith(_OWNED_PREFIXES) or n in _OWNED_NAMES]
        foreign = [n for n in existing if n not in ours]
        for n in [n for n in ours if n.startswith(".shard-") and ".tmp-" in n]:  # left by a killed upload
            with contextlib.suppress(OSError):
                loc.child(n).delete()
            ours.remove(n)
        if self.resume:
            if old is None and any(n.startswith("shard-") for n in ours):
                raise UsageError(f"{loc}: has shards but no run record to resume from",
                                 hint="rerun with --overwrite to start again")
            if old is not None and old != identity:
                diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
                raise UsageError(f"{loc}: cannot resume: the earlier run used different " + ", ".join(diff),
                                 hint="use the same manifest and flags, or --overwrite to start again")
        elif foreign or [n for n in ours if n != STATE_DIR]:
            if not self.overwrite:
                raise UsageError(f"{loc}: output location is not empty",
                                 hint="pass --resume to continue an interrupted run or --overwrite to replace it")
            try:
                for n in ours:
                    if n != STATE_DIR:
                        loc.child(n).delete()
                loc.fs.delete_dir_contents(self.state.child("chunks").path, missing_dir_ok=True)
            except OSError as exc:
                raise RunFailed(f"{loc}: cannot delete the earlier run's files: {loc.scrub(str(exc))}") from None
        write_json_file(self.state, "run.json", identity)

    def close(self) -> None:
        """Nothing to release (no lock on remote storage)."""

    def __enter__(self) -> RemoteOutputDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def chunk_record(self, index: int) -> Location:
        return self.state.child(f"chunks/{index:05d}.json")

    def finished_chunk(self, index: int) -> dict[str, Any] | None:
        """The record of a chunk finished by an earlier run, if its shard is there with the recorded size."""
        try:
            rec_loc = self.chunk_record(index)
            if rec_loc.size() is None:
                return None
            rec = json.loads(rec_loc.read_bytes())
            if self.path.child(rec["shard"]["path"]).size() != rec["shard"]["bytes"]:
                return None
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return rec  # type: ignore[no-any-return]

    def save_chunk(self, index: int, record: dict[str, Any]) -> None:
        self.chunk_record(index).write_bytes(_json_bytes(record))


def shard_visible(dest: Path | Location, shard: dict[str, Any]) -> bool:
    """Whether the parent sees a shard a worker reported, with the reported size (shared storage check)."""
    try:
        if isinstance(dest, Path):
            return (dest / shard["path"]).stat().st_size == shard["bytes"]
        return dest.child(shard["path"]).size() == shard["bytes"]
    except OSError:
        return False


# -- reading images from a remote root ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageStore:
    """Reads image references (relative to a remote root, or full URIs of the same filesystem) as bytes.

    Attributes:
        root: the image root.
        allow_outside: accept references outside the root.
    """

    root: Location
    allow_outside: bool = False

    def resolve(self, ref: str) -> Location:
        """The location of a reference, refusing to leave the root (``..``) unless allowed.

        Raises:
            ImageError: ``path_invalid`` or ``path_outside_root``.
        """
        from mmprep.images.decode import ImageError

        if not isinstance(ref, str) or not ref.strip() or "\x00" in ref:
            raise ImageError("path_invalid", f"invalid image path {ref!r}")
        root = self.root
        ref_scheme = scheme_of(ref)
        if ref_scheme is not None:
            if ref_scheme != root.scheme:
                raise ImageError("path_invalid", f"{redact(ref)}: not on the image root's filesystem ({root})")
            path = _strip_uri(ref, root)
        elif ref.startswith("/"):
            path = ref if root.path.startswith("/") else ref.lstrip("/")
        else:
            path = posixpath.join(root.path, ref)
        path = posixpath.normpath(path)
        base = posixpath.normpath(root.path)
        if not self.allow_outside and path != base and not path.startswith(base.rstrip("/") + "/"):
            raise ImageError("path_outside_root", f"{redact(ref)}: resolves outside the image root {root}")
        rel = posixpath.relpath(path, base) if path.startswith(base) else path
        return Location(root.fs, path, root.uri.rstrip("/") + "/" + rel, False, root.atomic_put, root.scheme,
                        root.secrets)

    def read(self, ref: str) -> bytes:
        """The bytes of an image.

        Raises:
            ImageError: ``path_invalid``, ``path_outside_root``, ``image_missing``, ``image_not_a_file``,
                ``image_unreadable``.
        """

        return self._read(self.resolve(ref))

    def load(self, ref: str, cfg: Any) -> tuple[Any, bytes]:
        """Read and decode an image with ``images.load_image``; returns (decoded image, file bytes).

        Raises:
            ImageError: as :meth:`read`, or the decoder's reason (the detail names the remote file).
        """
        from mmprep.images.decode import ImageError, load_image

        loc = self.resolve(ref)
        data = self._read(loc)
        try:
            return load_image(data, cfg), data
        except ImageError as exc:
            raise ImageError(exc.reason, exc.detail.replace("<bytes>", str(loc), 1)) from None

    def _read(self, loc: Location) -> bytes:
        from mmprep.images.decode import ImageError

        try:
            return loc.read_bytes()
        except FileNotFoundError:
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

    def size(self, ref: str) -> int:
        """The byte size of an image (0 when it cannot be read)."""
        try:
            return self.resolve(ref).size() or 0
        except Exception:
            return 0


def _strip_uri(uri: str, like: Location) -> str:
    """The filesystem path of a full URI on ``like``'s filesystem."""
    handler = getattr(like.fs, "handler", None)
    fsspec_fs = getattr(handler, "fs", None)
    if fsspec_fs is not None:
        return str(fsspec_fs._strip_protocol(redact(uri)))
    parts = urlsplit(redact(uri))
    return parts.netloc + parts.path


def _parent_uri(uri: str) -> str:
    """The folder of a file URI or path (``s3://b/x/m.jsonl`` -> ``s3://b/x``)."""
    if scheme_of(uri) is None:
        return str(Path(uri).resolve().parent)
    parts = urlsplit(uri)
    parent = posixpath.dirname(parts.path)
    rebuilt = f"{parts.scheme}://{parts.netloc}{parent}"
    return rebuilt + (f"?{parts.query}" if parts.query else "")


# -- everything a pack run opens ----------------------------------------------------------------------------------


@dataclass
class PackLocations:
    """The opened locations of a pack run and the configuration with every URI redacted.

    Attributes:
        cfg: the configuration to use and record (local URIs as plain paths, remote URIs redacted).
        manifest: what to read the manifest from: a path (or ``-``) on the fast path, else a Location.
        out: the output folder: a Path on the fast path, else a Location.
        images: a reader for a remote image root, or None when images are local.
    """

    cfg: Any
    manifest: str | Location
    out: Path | Location
    images: ImageStore | None = None

    @classmethod
    def open(cls, cfg: Any, storage_options: Mapping[str, Any] | None = None, *,
             workers: int = 1, engine: str = "local") -> PackLocations:
        """Open the manifest, output and image-root locations of ``cfg`` (a PackConfig)."""
        from dataclasses import replace

        man = cfg.manifest
        out = cfg.out
        root = cfg.image_root
        if man != "-" and not is_local(man) and root is None:
            root = _parent_uri(man)
        remote = [u for u in (man, out, root) if u and u != "-" and not is_local(u)]
        for u in remote:
            if scheme_of(u) in _PROCESS_LOCAL and (workers > 1 or engine != "local"):
                raise UsageError(f"{redact(u)}: {scheme_of(u)}:// exists only inside this process",
                                 hint="use --workers 1 with --engine local, or a shared filesystem")
        man_src: str | Location = man if (man == "-" or is_local(man)) else open_location(man, storage_options)
        out_dst: Path | Location = Path(local_path(out)) if is_local(out) else open_location(out, storage_options)
        images = None
        if root is not None and not is_local(root):
            images = ImageStore(open_location(root, storage_options), cfg.allow_outside_root)
        clean = replace(
            cfg,
            manifest=man if man == "-" else (local_path(man) if is_local(man) else redact(man)),
            out=local_path(out) if is_local(out) else redact(out),
            image_root=None if root is None else (local_path(root) if is_local(root) else redact(root)),
        )
        return cls(clean, man_src, out_dst, images)

    def output_dir(self, *, resume: bool, overwrite: bool) -> Any:
        """``shards.OutputDir`` for a local folder, :class:`RemoteOutputDir` otherwise."""
        if isinstance(self.out, Path):
            from mmprep.runtime.shards import OutputDir

            return OutputDir(self.out, resume=resume, overwrite=overwrite)
        return RemoteOutputDir(self.out, resume=resume, overwrite=overwrite)
