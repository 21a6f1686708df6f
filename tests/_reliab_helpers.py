"""Shared helpers for the reliability tests: corpora, row accounting, output digests, tmpfs mounts."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
BROKEN = REPO / "tests" / "data" / "images" / "broken"  # real files from Pillow's test suite (see ATTRIBUTION.md)


def png_bytes(width: int = 8, height: int = 8, color: tuple[int, int, int] = (10, 20, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(width: int = 32, height: int = 32, color: tuple[int, int, int] = (10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "JPEG")
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header declares ``width`` x ``height`` pixels (a few bytes of real data follow)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def write_noise_corpus(root: Path, rows: int, side: int = 384, every_missing: int = 13) -> Path:
    """A JSONL manifest of ``rows`` rows over 8 noise images (PNG and JPEG); every ``every_missing``-th row
    points at a missing file, so the outputs hold rejects too. Returns the manifest path."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for k in range(8):
        name = f"img{k}.jpg" if k % 2 else f"img{k}.png"
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(root / name)
        names.append(name)
    manifest = root / "m.jsonl"
    with open(manifest, "w") as f:
        for i in range(rows):
            images = ["missing.jpg"] if i % every_missing == 0 else [names[i % 8]]
            f.write(json.dumps({"id": f"r{i:05d}", "images": images, "text": f"row {i}"}) + "\n")
    return manifest


def rejects(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "rejected-train.jsonl").read_text().splitlines()]


def split_index(out: Path, split: str = "train") -> dict[str, Any]:
    """One split's entry of index.json."""
    entry: dict[str, Any] = json.loads((out / "index.json").read_text())["splits"][split]
    return entry


def shard_file(out: Path, k: int, split: str = "train") -> Path:
    """Shard ``k`` of a split (``data/<split>-0000k-of-NNNNN.parquet``)."""
    found = sorted((out / "data").glob(f"{split}-{k:05d}-of-*.parquet"))
    assert len(found) == 1, found
    return found[0]


def written_rows(out: Path, columns: tuple[str, ...] = ("id", "line")) -> list[dict[str, Any]]:
    index = split_index(out)
    rows: list[dict[str, Any]] = []
    for shard in index["shards"]:
        rows.extend(pq.read_table(out / shard["path"], columns=list(columns)).to_pylist())
    return rows


def assert_nothing_lost(out: Path, read: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """read == written + rejected, each rejected line once, no line both written and rejected; the shards hold
    exactly the rows the index counts. Returns (written rows, rejects)."""
    t = split_index(out)["totals"]
    rows = written_rows(out)
    rej = rejects(out)
    assert t["read"] == read, (t, read)
    assert t["read"] == t["written"] + t["rejected"]
    assert len(rows) == t["written"] and len(rej) == t["rejected"]
    rejected_lines = [r["line"] for r in rej]
    assert len(set(rejected_lines)) == len(rejected_lines), "a rejected line appears twice"
    assert not set(rejected_lines) & {r["line"] for r in rows}, "a line is both written and rejected"
    assert not temp_files(out)
    return rows, rej


def temp_files(out: Path) -> list[str]:
    """mmprep's temporary files (``.<name>.tmp-<pid>``) anywhere under ``out``."""
    return sorted(str(p.relative_to(out)) for p in out.rglob(".*.tmp-*"))


def digests(out: Path, split: str = "train") -> dict[str, str]:
    """sha256 of every file of the dataset (``data/`` included, and the per-shard resume records), except the run
    statistics (timings) and the lock file (which holds a pid). Entry names are compared too, dotfiles included."""
    result = {p.name: "dir" for p in out.iterdir() if p.is_dir()}
    for folder in (out, out / "data"):
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            if p.is_file() and not p.name.startswith("run-stats"):
                result[p.relative_to(out).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    chunks = out / ".mmprep" / "splits" / split / "chunks"
    if chunks.is_dir():
        for p in sorted(chunks.iterdir()):
            result[f".mmprep/chunks/{p.name}"] = hashlib.sha256(p.read_bytes()).hexdigest()
    return result


def mmprep_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mmprep", *args]


def sigint_as_in_a_terminal() -> None:
    """``preexec_fn`` for runs that the tests interrupt: SIGINT back to its default in the child. A shell that
    starts a job in the background without job control (``cmd &`` in a script, as CI runners may) makes its
    children ignore SIGINT, and a Python started that way keeps ignoring it: Ctrl-C would never arrive."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_interruptible(cmd: list[str]) -> subprocess.Popen[str]:
    """Start ``cmd`` (an mmprep run the test will kill or interrupt) in its own session, pipes captured, SIGINT at
    its default."""
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(),
                            start_new_session=True, preexec_fn=sigint_as_in_a_terminal)


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("MMPREP_DEBUG", None)
    return env


@contextlib.contextmanager
def tmpfs(path: Path, size: str, *, readonly: bool = False) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` at ``path`` (needs root / CAP_SYS_ADMIN); raises OSError when that fails."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True,
                         check=False)
    if res.returncode != 0:
        raise OSError(f"cannot mount a tmpfs: {res.stderr.strip() or res.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True, capture_output=True)


# Run a command with the capabilities that let root ignore file permissions dropped from the bounding set: after
# the exec the process (and its workers) is root that respects mode bits, so chmod 000 makes a file unreadable.
_DROP_DAC = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
    if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
        sys.exit(97)
os.execv(sys.argv[1], sys.argv[1:])
"""


def without_dac_override(cmd: list[str]) -> list[str]:
    """``cmd`` run as root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH (exit 97 when that cannot be done)."""
    return [sys.executable, "-c", _DROP_DAC, *cmd]
