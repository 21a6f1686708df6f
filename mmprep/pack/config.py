"""The pack configuration: every setting that decides a packed dataset's content, validated in one place."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmprep.errors import UsageError
from mmprep.images.decode import ImageConfig, Normalization
from mmprep.inputs.manifest import ColumnMap
from mmprep.text.config import TextConfig

__all__ = ["COMPRESSIONS", "ENCODE_FORMATS", "PAD_MODES", "ROW_GROUP_BYTES", "TARGETS", "PackConfig",
           "padded_row_group_rows"]

PAD_MODES = ("max", "none")
TOO_MANY = ("reject", "truncate")
UNKNOWN_TAGS = ("reject", "drop")
ON_ERROR = ("skip", "fail")
COMPRESSIONS = ("zstd", "lz4", "snappy", "none")
ENCODE_FORMATS = ("png", "jpeg", "webp", "original")
#: Image slots per row at most (a manifest row with more images is rejected or truncated).
MAX_LIMIT_IMAGES = 1024
#: A padded row's pixels are one fixed-size binary value, whose width Arrow stores in 32 bits.
MAX_ROW_PIXEL_BYTES = (1 << 31) - 1
DEVICES = ("cpu", "cuda", "auto")
#: ``--target``: the trainer the output is laid out for (see :mod:`mmprep.pack.columns`).
TARGETS = ("hf", "easyr1", "llamafactory")


@dataclass(frozen=True)
class PackConfig:
    """Everything that decides the content of a packed dataset (and nothing that does not).

    Two runs with equal configs over the same manifest produce byte-identical shards and index.
    """

    manifest: str
    out: str
    format: str | None = None
    columns: ColumnMap = field(default_factory=ColumnMap)
    image_root: str | None = None
    allow_outside_root: bool = False
    image: ImageConfig = field(default_factory=ImageConfig)
    norm: Normalization = field(default_factory=Normalization)
    limit_images: int = 4
    too_many_images: str = "reject"
    pad: str = "max"
    encode_format: str = "original"
    encode_quality: int = 95
    tokenizer: str | None = None
    text: TextConfig = field(default_factory=TextConfig)
    vocab: str | None = None
    unknown_tags: str = "reject"
    shard_size: int | None = None
    rows_per_shard: int | None = None
    row_group_rows: int | None = None
    compression: str = "zstd"
    shuffle: bool = False
    seed: int = 0
    on_error: str = "skip"
    max_reject_rate: float = 1.0
    #: where images are decoded and resized: cpu, cuda (the GPU path, mmprep.images.gpu) or auto (resolved by
    #: pack() before the run, so the recorded config says which one ran)
    device: str = "cpu"
    # -- trainer-ready output (issue 16): the split written, the target's columns, the input columns carried --
    split: str = "train"
    target: str = "hf"
    keep_columns: tuple[str, ...] | None = None
    drop_columns: tuple[str, ...] = ()

    def validate(self) -> None:
        """Raise UsageError naming the first bad value."""

        def choice(name: str, value: str, options: Sequence[str]) -> None:
            if value not in options:
                raise UsageError(f"--{name.replace('_', '-')} must be one of {', '.join(options)}, got '{value}'")

        choice("pad", self.pad, PAD_MODES)
        choice("too_many_images", self.too_many_images, TOO_MANY)
        choice("unknown_tags", self.unknown_tags, UNKNOWN_TAGS)
        choice("on_error", self.on_error, ON_ERROR)
        choice("compression", self.compression, COMPRESSIONS)
        choice("encode_format", self.encode_format, ENCODE_FORMATS)
        choice("device", self.device, DEVICES)
        if self.device == "cuda" and self.pad != "max":
            raise UsageError("--device cuda decodes into padded tensors; --pad none stores encoded images",
                             hint="use --device cpu (or auto) with --pad none")
        if not 1 <= self.limit_images <= MAX_LIMIT_IMAGES:
            raise UsageError(f"--limit-images must be 1 to {MAX_LIMIT_IMAGES}, got {self.limit_images:,}")
        if self.image_root:  # a missing local root would reject every row
            from mmprep.runtime.storage import is_local, local_path

            if is_local(self.image_root) and not os.path.isdir(local_path(self.image_root)):
                raise UsageError(f"--image-root {self.image_root}: no such directory")
        if self.pad == "max":
            if self.image.size is None or self.image.resize_mode not in ("stretch", "center-crop", "letterbox"):
                raise UsageError(
                    f"--resize-mode {self.image.resize_mode} gives variable image sizes, which a padded layout "
                    "cannot hold",
                    hint="use stretch, center-crop or letterbox with --image-size, or --pad none",
                )
        elif self.norm.dtype != "uint8":
            raise UsageError("--pad none stores encoded images; --dtype must stay uint8")
        elif self.encode_format == "original" and self.image.resize_mode != "none":
            raise UsageError(
                f"--encode-format original stores the image files as they are: --resize-mode "
                f"{self.image.resize_mode} would be ignored",
                hint="use --encode-format png|jpeg|webp to store resized images, or --resize-mode none",
            )
        if self.shard_size is not None and self.shard_size <= 0:
            raise UsageError("--shard-size must be positive")
        if self.rows_per_shard is not None and self.rows_per_shard <= 0:
            raise UsageError("--rows-per-shard must be positive")
        if not 0.0 <= self.max_reject_rate <= 1.0:
            raise UsageError(f"--max-reject-rate must be in [0, 1], got {self.max_reject_rate}")
        if not 1 <= self.encode_quality <= 100:
            raise UsageError(f"--quality must be in 1..100, got {self.encode_quality}")
        self.image.validate()
        self.text.validate()
        if self.pad == "max" and self.pixel_bytes() > MAX_ROW_PIXEL_BYTES:
            assert self.image.size is not None
            raise UsageError(
                f"a padded row would hold {self.pixel_bytes():,} bytes of pixels (--limit-images {self.limit_images} "
                f"x {self.image.size[0]}x{self.image.size[1]} x 3 channels, {self.norm.dtype}), above the "
                f"{MAX_ROW_PIXEL_BYTES:,}-byte limit of one Parquet value",
                hint="lower --limit-images or --image-size, or use --pad none",
            )
        self._validate_output_columns()

    def _validate_output_columns(self) -> None:
        """--split, --target, --keep-columns and --drop-columns (trainer-ready output)."""
        from mmprep.dataset.format import split_problem

        problem = split_problem(self.split)
        if problem is not None:
            raise UsageError(f"--split: {problem}", hint="e.g. train, validation, test")
        if self.target not in TARGETS:
            raise UsageError(f"--target must be one of {', '.join(TARGETS)}, got '{self.target}'")
        if self.target != "hf" and self.pad != "none":
            raise UsageError(f"--target {self.target} stores the images encoded, as the trainer loads them; "
                             f"--pad {self.pad} would store pixel tensors",
                             hint="leave out --pad (--target sets --pad none)")
        if self.keep_columns is not None and self.drop_columns:
            raise UsageError("--keep-columns and --drop-columns exclude each other",
                             hint="--keep-columns lists every input column to keep; the others are left out")

    @property
    def root(self) -> Path:
        """Where relative image paths are resolved: --image-root, else the manifest's folder."""
        if self.image_root:
            return Path(self.image_root)
        if self.manifest == "-":
            return Path.cwd()
        return Path(self.manifest).resolve().parent

    def slot_shape(self) -> tuple[int, ...]:
        """Shape of one image slot in the padded tensor, per the layout."""
        assert self.image.size is not None
        h, w = self.image.size
        return (3, h, w) if self.norm.layout == "CHW" else (h, w, 3)

    def pixel_bytes(self) -> int:
        """Bytes of one row's padded pixel tensor."""
        return self.limit_images * math.prod(self.slot_shape()) * np.dtype(self.norm.dtype).itemsize

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view of the settings that decide output content (paths relative where sensible)."""
        import dataclasses

        d = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        d.pop("out", None)
        d["manifest"] = "-" if self.manifest == "-" else os.path.basename(self.manifest)
        d.pop("image_root", None)
        if d.get("device") == "cpu":  # the CPU path records no device, as before --device existed
            d.pop("device")
        return d


ROW_GROUP_BYTES = 32 << 20  # about this much image data per Parquet row group (the unit of random access)


def padded_row_group_rows(cfg: PackConfig) -> int:
    """Rows per row group of padded shards: ``--row-group-rows``, else about :data:`ROW_GROUP_BYTES` of pixels."""
    if cfg.row_group_rows:
        return cfg.row_group_rows
    return max(1, min(1024, ROW_GROUP_BYTES // max(1, cfg.pixel_bytes())))


def _jsonable(value: Any) -> Any:
    """Settings as JSON values: nested configs as objects (their ``to_dict`` when they have one), tuples as lists."""
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if hasattr(value, "to_dict"):
            return _jsonable(value.to_dict())
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value
