"""Planning a pack run, once: where everything is read and written, the shard plan, and the run identity.

:func:`plan_pack` opens the manifest, output and image locations, reads ahead just enough of the manifest to size
shards (the plan depends on the input and the flags only, never on the worker count, so output is byte-identical
for any number of workers and engines), and computes the identity that ``--resume`` compares. Nothing computed here
is written back into the configuration: the plan carries it.
"""

from __future__ import annotations

import contextlib
import math
import os
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmprep.errors import UsageError
from mmprep.images.sources import ImageSource, LocalImages, RemoteImages
from mmprep.inputs.manifest import iter_samples
from mmprep.pack.config import ROW_GROUP_BYTES, PackConfig, padded_row_group_rows
from mmprep.records import Rejected, Sample
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
        total: the number of input rows when known before the run (after a shuffle).
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

    def items(self) -> Iterator[Item]:
        """Every input item, in planned order (the head first)."""
        yield from self.head
        self.head = []
        yield from self.rest

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
        }


def iter_items(cfg: PackConfig, source: str | Location) -> Iterator[Item]:
    """Manifest items in input order; later duplicates of an id are rejected (``duplicate_id``)."""
    seen: dict[str, int] = {}
    for item in iter_samples(source, cfg.columns, fmt=cfg.format, require_images=True):
        if isinstance(item, Sample):
            first = seen.setdefault(item.id, item.line)
            if first != item.line:
                yield Rejected(item.line, item.id, "manifest", "duplicate_id",
                               f"{item.source}:{item.line}: id '{item.id}' already used on line {first}")
                continue
        yield item


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


def estimate_row_bytes(cfg: PackConfig, head: list[Item], image_bytes: Callable[[str], int]) -> int:
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
    """Open the locations of a validated ``cfg`` and plan its shards.

    Raises:
        UsageError: a location cannot be opened, or a process-local store (``memory://``) with several processes.
    """
    man, out, root = cfg.manifest, cfg.out, cfg.image_root
    if man != "-" and not is_local(man) and root is None:
        root = parent_uri(man)
    for uri in (man, out, root):
        if uri and uri != "-" and not is_local(uri) and is_process_local(uri) and (workers > 1 or engine != "local"):
            raise UsageError(f"{redact(uri)}: {scheme_of(uri)}:// exists only inside this process",
                             hint="use --workers 1 with --engine local, or a shared filesystem")
    source: str | Location = (man if man == "-" else local_path(man)) if is_local(man) else open_location(
        man, storage_options)
    out_loc = open_location(out, storage_options)
    images: ImageSource
    if root is not None and not is_local(root):
        images = RemoteImages(open_location(root, storage_options), cfg.allow_outside_root)
    else:
        images = LocalImages(_image_root(cfg, root), cfg.allow_outside_root)
    shown = man if man == "-" else (local_path(man) if is_local(man) else redact(man))

    items: Iterator[Item] = iter_items(cfg, source)
    total = None
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
    if cfg.rows_per_shard is None and cfg.shard_size is None:
        # The default size: a small input is still cut into MIN_SHARDS shards, so every worker gets work. Whether
        # the input is small is found by reading ahead (the rows read are kept), so the plan depends on the
        # input alone, never on the number of workers.
        for item in items:
            head.append(item)
            if len(head) >= MIN_SHARDS * rows_per_shard:
                break
        else:
            rows_per_shard = min(rows_per_shard, max(MIN_SHARD_ROWS, math.ceil(len(head) / MIN_SHARDS)))
    return PackPlan(cfg=cfg, manifest=source, manifest_shown=shown, out=out_loc, images=images,
                    rows_per_shard=rows_per_shard, row_group_rows=row_group_rows, head=head, rest=items, total=total)


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
