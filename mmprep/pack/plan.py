"""Planning a pack run, once: where everything is read and written, the shard plan, and the run identity.

:func:`plan_pack` opens the manifest, output and image locations, reads the whole input once (the schema pass of
:func:`mmprep.pack.columns.plan_columns`: it counts the rows, so the shard names ``-of-NNNNN`` are known before the
first shard, and decides the type of every carried column), reads ahead just enough of the manifest to size shards
(the plan depends on the input and the flags only, never on the worker count, so output is byte-identical for any
number of workers and engines), and computes the identity that ``--resume`` compares. Nothing computed here is
written back into the configuration: the plan carries it.

An input that cannot be read twice (standard input, a pipe) is first copied to a temporary file (bounded by free
disk space, not memory). Image bytes embedded in a Parquet or Arrow input are copied to a spool file as the rows
are read (:mod:`mmprep.images.spool`), so the rows that travel to the workers stay small. Both files are removed
when the run ends (:meth:`PackPlan.close`).
"""

from __future__ import annotations

import contextlib
import math
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from mmprep.errors import InputError, RunFailed, UsageError
from mmprep.images.sources import ImageSource, LocalImages, RemoteImages
from mmprep.images.spool import ImageSpool
from mmprep.inputs.manifest import iter_samples, table_input
from mmprep.pack.columns import ColumnPlan, plan_columns
from mmprep.pack.config import ROW_GROUP_BYTES, PackConfig, padded_row_group_rows
from mmprep.records import EmbeddedImage, ImageRef, Rejected, Sample
from mmprep.runtime.storage import (
    Location,
    is_local,
    is_process_local,
    local_path,
    open_location,
    parent_uri,
    redact,
    scheme_of,
)

__all__ = ["DEFAULT_SHARD_SIZE", "MIN_SHARDS", "MIN_SHARD_ROWS", "PackPlan", "iter_items", "plan_pack"]

DEFAULT_SHARD_SIZE = 512 * 1024 * 1024
# With the default shard size, inputs smaller than MIN_SHARDS full shards are cut into MIN_SHARDS shards (of at
# least MIN_SHARD_ROWS rows), so that they keep several workers busy.
MIN_SHARDS = 16
MIN_SHARD_ROWS = 16
_HEAD_ROWS = 64
_POLICIES = ("on_error", "max_reject_rate")  # they decide whether the run fails, not what the shards hold

Item = Sample | Rejected


@dataclass
class PackPlan:
    """Everything a pack run decided before the first chunk.

    Attributes:
        cfg: the validated configuration, as given.
        manifest: where the manifest is read: a local path (or ``-``), or an opened remote location.
        manifest_shown: the manifest as shown and recorded (credentials removed).
        out: the output folder.
        images: where image references are read from.
        rows_per_shard: rows in every shard but the last.
        row_group_rows: rows per Parquet row group.
        head: the items read ahead to plan (they are the first items of the input, not kept beyond the run).
        rest: the rest of the input, streamed.
        total: the number of input rows (records, rejected ones included), counted by the schema pass.
        columns: the extra columns of every shard (carried input columns, the target's columns).
        shards: how many shards the run writes (``ceil(total / rows_per_shard)``).
        notes: what the plan decided that the user may want to know (logged).
        spooled: embedded image bytes go to a spool file on this machine (workers must run here).
    """

    cfg: PackConfig
    manifest: str | Location
    manifest_shown: str
    out: Location
    images: ImageSource
    rows_per_shard: int
    row_group_rows: int
    head: list[Item]
    rest: Iterator[Item]
    total: int | None = None
    columns: ColumnPlan = field(default_factory=ColumnPlan)
    shards: int = 1
    notes: tuple[str, ...] = ()
    spooled: bool = False
    _cleanup: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def items(self) -> Iterator[Item]:
        """Every input item, in planned order (the head first)."""
        yield from self.head
        self.head = []
        yield from self.rest

    def close(self) -> None:
        """Remove the temporary copies the plan made (the standard-input copy, the image spool)."""
        while self._cleanup:
            with contextlib.suppress(OSError):
                self._cleanup.pop()()

    def recorded_config(self) -> dict[str, Any]:
        """The settings as recorded in the index: the configuration with the planned row-group size."""
        d = self.cfg.to_dict()
        d["manifest"] = "-" if self.manifest_shown == "-" else os.path.basename(self.manifest_shown)
        d["row_group_rows"] = self.row_group_rows
        return d

    def identity(self, *, tokenizer_key: str | None, vocab_sha256: str | None) -> dict[str, Any]:
        """What decides the output: the settings, the manifest's bytes, the tokenizer's and vocabulary's content,
        the image decoders' versions."""
        from mmprep.images.decode import decoder_info

        config = self.recorded_config()
        for policy in _POLICIES:
            config.pop(policy, None)
        return {
            "config": config,
            "decoder": decoder_info(self.cfg.image),
            "manifest_sha256": _manifest_sha256(self.manifest),
            "rows_per_shard": self.rows_per_shard,
            "tokenizer_sha256": tokenizer_key,
            "vocab_sha256": vocab_sha256,
            "columns": self.columns.identity(),
        }


def iter_items(cfg: PackConfig, source: str | Location, *, name: str | None = None,
               spool: ImageSpool | None = None) -> Iterator[Item]:
    """Manifest items in input order; later duplicates of an id are rejected (``duplicate_id``).

    With a ``spool``, the bytes of embedded images go to it and the items keep only where they are.
    """
    seen: dict[str, int] = {}
    for item in iter_samples(source, cfg.columns, fmt=cfg.format, require_images=True, embedded=True,
                             keep_extra=True, name=name):
        if isinstance(item, Sample):
            if spool is not None and any(isinstance(ref, EmbeddedImage) for ref in item.images):
                item = replace(item, images=tuple(_spooled(ref, spool) for ref in item.images))
            first = seen.setdefault(item.id, item.line)
            if first != item.line:
                yield Rejected(item.line, item.id, "manifest", "duplicate_id",
                               f"{item.source}:{item.line}: id '{item.id}' already used on line {first}")
                continue
        yield item


def _spooled(ref: ImageRef, spool: ImageSpool) -> ImageRef:
    if isinstance(ref, EmbeddedImage) and ref.data is not None:
        return EmbeddedImage(size=ref.size, path=ref.path, offset=spool.put(ref.data))
    return ref


def rereadable(manifest: str) -> bool:
    """A regular file or a remote object (not stdin, a FIFO or ``<(process substitution)``): readable twice."""
    if manifest == "-":
        return False
    if not is_local(manifest):
        return True
    try:
        return stat.S_ISREG(os.stat(local_path(manifest)).st_mode)
    except OSError:
        return False


def _manifest_sha256(source: str | Location) -> str | None:
    if isinstance(source, Location):
        return source.sha256()
    if not rereadable(source):  # hashing a pipe would consume the rows the run has not read yet
        return None
    from mmprep.runtime.files import sha256_file

    return sha256_file(local_path(source))


def estimate_row_bytes(cfg: PackConfig, head: list[Item], image_bytes: Callable[[ImageRef], int]) -> int:
    """Bytes of one packed row: exact for padded rows, the mean over ``head`` of the image files for ``--pad none``."""
    text_bytes = (cfg.text.max_length * 5 if cfg.tokenizer else 0) + 512
    if cfg.pad == "max":
        return cfg.pixel_bytes() + text_bytes
    sizes = [sum(image_bytes(ref) for ref in item.images[: cfg.limit_images])
             for item in head if isinstance(item, Sample)]
    return max(1, (sum(sizes) // len(sizes) if sizes else 256 * 1024) + text_bytes)


def plan_pack(
    cfg: PackConfig,
    storage_options: Mapping[str, Any] | None = None,
    *,
    workers: int = 1,
    engine: str = "local",
) -> PackPlan:
    """Open the locations of a validated ``cfg``, survey the input and plan its shards (call
    :meth:`PackPlan.close` when the run ends).

    Raises:
        UsageError: a location cannot be opened, or a process-local store (``memory://``) with several processes,
            or the input's columns cannot be carried (see :func:`mmprep.pack.columns.plan_columns`).
    """
    man, out, root = cfg.manifest, cfg.out, cfg.image_root
    if man != "-" and not is_local(man) and root is None:
        root = parent_uri(man)
    for uri in (man, out, root):
        if uri and uri != "-" and not is_local(uri) and is_process_local(uri) and (workers > 1 or engine != "local"):
            raise UsageError(f"{redact(uri)}: {scheme_of(uri)}:// exists only inside this process",
                             hint="use --workers 1 with --engine local, or a shared filesystem")
    cleanup: list[Callable[[], None]] = []
    try:
        return _plan(cfg, man, out, root, storage_options, cleanup)
    except BaseException:
        for undo in reversed(cleanup):
            with contextlib.suppress(OSError):
                undo()
        raise


def _plan(cfg: PackConfig, man: str, out: str, root: str | None, storage_options: Mapping[str, Any] | None,
          cleanup: list[Callable[[], None]]) -> PackPlan:
    source: str | Location = (man if man == "-" else local_path(man)) if is_local(man) else open_location(
        man, storage_options)
    out_loc = open_location(out, storage_options)
    shown = man if man == "-" else (local_path(man) if is_local(man) else redact(man))
    name = None
    if isinstance(source, str) and _stream(source):
        name = "<stdin>" if man == "-" else shown
        # the schema pass reads the input, then the run reads it again
        source = _copy_input(source, cleanup, name, cfg.format)
    survey = plan_columns(cfg, source, name=name)
    spool = None
    if table_input(source, cfg.format) is not None:  # Parquet/Arrow: image bytes may come with the rows
        spool = ImageSpool()
        cleanup.append(spool.remove)
    images: ImageSource
    if root is not None and not is_local(root):
        images = RemoteImages(open_location(root, storage_options), cfg.allow_outside_root,
                              spool.path if spool else None)
    else:
        images = LocalImages(_image_root(cfg, root), cfg.allow_outside_root, spool.path if spool else None)

    items: Iterator[Item] = iter_items(cfg, source, name=name, spool=spool)
    total = survey.rows
    if cfg.shuffle:
        import numpy as np

        all_items = list(items)
        order = np.random.default_rng(cfg.seed).permutation(len(all_items))
        items = iter([all_items[i] for i in order])
        total = len(all_items)
    head: list[Item] = []
    for item in items:
        head.append(item)
        if len(head) >= _HEAD_ROWS:
            break
    row_bytes = estimate_row_bytes(cfg, head, images.size)
    rows_per_shard = cfg.rows_per_shard or max(1, (cfg.shard_size or DEFAULT_SHARD_SIZE) // row_bytes)
    if cfg.pad == "max":
        row_group_rows = padded_row_group_rows(cfg)
    else:  # row groups of ~32 MB of encoded images, like padded ones
        row_group_rows = cfg.row_group_rows or max(1, min(1024, ROW_GROUP_BYTES // row_bytes))
    if cfg.rows_per_shard is None and cfg.shard_size is None and total < MIN_SHARDS * rows_per_shard:
        # The default size: a small input is still cut into MIN_SHARDS shards, so every worker gets work. The
        # schema pass counted the rows, so the plan depends on the input alone, never on the number of workers.
        rows_per_shard = min(rows_per_shard, max(MIN_SHARD_ROWS, math.ceil(total / MIN_SHARDS)))
    shards = math.ceil(total / rows_per_shard)
    return PackPlan(cfg=cfg, manifest=source, manifest_shown=shown, out=out_loc, images=images,
                    rows_per_shard=rows_per_shard, row_group_rows=row_group_rows, head=head, rest=items, total=total,
                    columns=survey.columns, shards=shards, notes=survey.notes, spooled=spool is not None,
                    _cleanup=cleanup)


def _stream(path: str) -> bool:
    """Standard input, a FIFO or a socket: an input that cannot be read twice. A missing file is not (the reader
    says that it is missing), nor a device such as ``/dev/zero`` (the reader refuses it: never a manifest)."""
    if path == "-":
        return True
    try:
        mode = os.stat(local_path(path)).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


#: First bytes of the binary manifest formats (Parquet; Arrow IPC file; Arrow IPC stream's continuation marker).
_BINARY_MAGIC = (b"PAR1", b"ARROW1", b"\xff\xff\xff\xff")


def _copy_input(path: str, cleanup: list[Callable[[], None]], name: str, fmt: str | None = None) -> str:
    """Copy standard input (or a pipe) to a temporary file, so it can be read twice; returns its path.

    A text manifest (JSON Lines, JSON, CSV) never holds a NUL byte: one stops the copy at once with a file error
    (``cat /dev/zero | mmprep pack -`` must not fill the disk before the reader sees a single line).

    Raises:
        InputError: the pipe cannot be opened, or a text manifest holds binary data.
        RunFailed: the copy cannot be written (disk full).
    """
    fd, tmp = tempfile.mkstemp(prefix="mmprep-input-", dir=os.environ.get("MMPREP_SPOOL_DIR") or None)
    cleanup.append(lambda: os.unlink(tmp))
    try:
        with os.fdopen(fd, "wb") as dst:
            if path == "-":
                _copy_text_checked(sys.stdin.buffer, dst, name, fmt)
            else:
                try:
                    src = open(local_path(path), "rb")  # noqa: SIM115 - closed by the with below
                except OSError as exc:
                    raise InputError(f"{path}: cannot open: {exc.strerror or exc}") from None
                with src:
                    _copy_text_checked(src, dst, name, fmt)
    except OSError as exc:
        raise RunFailed(f"cannot copy the input to {tmp}: {exc.strerror or exc}",
                        hint="an input read from a pipe is copied to a temporary file first: free disk space "
                             "there, or set MMPREP_SPOOL_DIR to a folder with room") from None
    return tmp


def _copy_text_checked(src: IO[bytes], dst: IO[bytes], name: str, fmt: str | None) -> None:
    """Copy ``src`` to ``dst`` in 1 MiB blocks; unless the input is Parquet/Arrow (by ``fmt`` or its first bytes),
    a NUL byte is an :class:`InputError` naming the byte."""
    done = lines = 0
    check: bool | None = None if fmt is None else fmt not in ("parquet", "arrow")
    while block := src.read(1 << 20):
        if check is None:
            check = not block.startswith(_BINARY_MAGIC)
        if check and (at := block.find(b"\0")) >= 0:
            line = lines + block.count(b"\n", 0, at) + 1
            raise InputError(f"{name}:{line}: holds a NUL byte (byte {done + at:,}): binary data, not a "
                             f"{fmt or 'text'} manifest",
                             hint="give a manifest file (JSON Lines, JSON, CSV, Parquet or Arrow)")
        dst.write(block)
        done += len(block)
        lines += block.count(b"\n")


def _image_root(cfg: PackConfig, root: str | None) -> Path:
    """Where relative image paths are resolved: --image-root, else the manifest's folder (the working folder for
    stdin)."""
    if root:
        return Path(local_path(root)).resolve()
    if cfg.manifest == "-":
        return Path.cwd().resolve()
    with contextlib.suppress(OSError):
        return Path(local_path(cfg.manifest)).resolve().parent
    return Path(local_path(cfg.manifest)).parent
