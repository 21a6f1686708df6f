"""Packed datasets for the reader tests, made once per test process with the real ``pack``.

``sample_data/manifest.jsonl`` (18 rows: 15 good, 3 deliberately bad) is packed with the real CLIP tokenizer and
the real RAM tag list, at small image sizes so the packs take a few seconds. Tests must not modify these
directories: copy them first (``copy_packed``).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
REPO = HERE.parent
SAMPLE = REPO / "sample_data"
CLIP = str(SAMPLE / "tokenizers" / "clip")
VOCAB = str(SAMPLE / "ram_tag_list.txt")

_ROOT: list[Path] = []
_MEMO: dict[str, Path] = {}


def _root() -> Path:
    if not _ROOT:
        root = Path(tempfile.mkdtemp(prefix="mmprep-reader-tests-"))
        atexit.register(shutil.rmtree, root, True)
        _ROOT.append(root)
    return _ROOT[0]


def pack_config(out: Path, **kw: Any) -> Any:
    """A PackConfig over sample_data with small images (32x48 letterbox), 4 slots, 16 tokens, 4 rows a shard."""
    from mmprep.images.decode import ImageConfig
    from mmprep.pack.config import PackConfig
    from mmprep.text.config import TextConfig

    base: dict[str, Any] = dict(
        manifest=str(SAMPLE / "manifest.jsonl"),
        out=str(out),
        image=ImageConfig(size=(32, 48), resize_mode="letterbox"),
        limit_images=4,
        tokenizer=CLIP,
        text=TextConfig(max_length=16),
        vocab=VOCAB,
        rows_per_shard=4,
        row_group_rows=2,
    )
    base.update(kw)
    return PackConfig(**base)


def packed(kind: str = "uint8") -> Path:
    """A packed directory of sample_data, made once per process.

    Kinds: ``uint8`` (raw CHW pixels), ``float32`` (CLIP-normalised CHW, otherwise identical), ``encoded``
    (``--pad none``, original file bytes).
    """
    if kind not in _MEMO:
        from mmprep.images.decode import ImageConfig, Normalization
        from mmprep.pack.job import pack

        out = _root() / kind
        if kind == "uint8":
            cfg = pack_config(out)
        elif kind == "float32":
            cfg = pack_config(out, norm=Normalization.from_spec("clip", None, None, None, "float32", "CHW"))
        elif kind == "encoded":
            cfg = pack_config(out, pad="none", image=ImageConfig(size=None, resize_mode="none"))
        else:
            raise ValueError(kind)
        report = pack(cfg, workers=1)
        assert report.failed is None and report.written == 15
        _MEMO[kind] = out
    return _MEMO[kind]


def copy_packed(kind: str, dest: Path) -> Path:
    """A private copy of a packed directory (for tests that damage it)."""
    shutil.copytree(packed(kind), dest)
    return dest


def shard(root: Path, k: int, split: str | None = None) -> str:
    """The path (relative to ``root``) of shard ``k`` of a packed folder, as its index lists it."""
    import json

    index = json.loads((root / "index.json").read_text())
    splits = index.get("splits") or {"train": index}
    entry = splits[split] if split is not None else next(iter(splits.values()))
    return str(entry["shards"][k]["path"])
