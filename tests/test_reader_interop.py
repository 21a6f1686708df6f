"""The same packed directory read by pyarrow, pandas, DuckDB, Polars, datasets and Ray Data gives the same rows
as PackedDataset: every stored column of every row (pixels compared byte for byte, after PackedDataset's reshape).

Each reader is given the folder ``OUT/data`` itself, with no glob and no list of files: the shards live there
alone (``index.json``, the card and the rejects sit beside ``data/``), as trainers that list a folder expect.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _reader_helpers import packed

from mmprep.dataset.reader import PackedDataset


def plain(v: Any) -> Any:
    """A value as plain Python (lists, ints, floats, bools, str, bytes), whatever container a reader used."""
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v)
    if isinstance(v, np.ndarray):
        return [plain(x) for x in v] if v.dtype == object else v.tolist()
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


def canon(rows) -> dict[str, dict[str, Any]]:
    """id -> every stored column of the row as plain Python (a reader that drops or alters a column differs)."""
    out = {}
    for r in rows:
        missing = [c for c in columns() if c not in r]
        assert not missing, f"columns missing: {missing}"
        out[r["id"]] = {c: plain(r[c]) for c in columns()}
    return out


@functools.cache
def columns() -> tuple[str, ...]:
    """Every column the shards store."""
    return tuple(PackedDataset(packed("uint8")).column_names)


@pytest.fixture(scope="module")
def expected() -> dict[str, dict[str, Any]]:
    ds = PackedDataset(packed("uint8"))
    assert len(columns()) >= 14 and {"pixel_values", "attention_mask", "n_tokens", "image_sizes"} <= set(columns())
    rows = []
    for b in ds.iter_batches(7):
        for i in range(len(b["id"])):
            rows.append({k: (v[i].tobytes() if k == "pixel_values" else v[i]) for k, v in b.items()})
    assert len(rows) == 15 and rows[2]["pixel_values"] != rows[3]["pixel_values"]
    return canon(rows)


def data_dir() -> str:
    """The folder of the shards, as a trainer is given it."""
    path = packed("uint8") / "data"
    index = json.loads((packed("uint8") / "index.json").read_text())
    listed = sorted(s["path"].split("/", 1)[1] for s in index["splits"]["train"]["shards"])
    assert sorted(p.name for p in path.iterdir()) == listed and len(listed) >= 4  # the shards, and nothing else
    return str(path)


def test_pyarrow(expected) -> None:
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    assert canon(pq.read_table(data_dir()).to_pylist()) == expected
    assert canon(pads.dataset(data_dir(), format="parquet").to_table().to_pylist()) == expected


def test_pandas(expected) -> None:
    import pandas as pd

    assert canon(pd.read_parquet(data_dir()).to_dict("records")) == expected


def test_duckdb(expected) -> None:
    import duckdb

    cur = duckdb.connect().execute(f"select * from read_parquet('{data_dir()}')")
    names = [d[0] for d in cur.description]
    assert canon(dict(zip(names, row, strict=True)) for row in cur.fetchall()) == expected


def test_polars(expected) -> None:
    import polars as pl

    assert canon(pl.read_parquet(data_dir()).to_dicts()) == expected


def test_datasets(expected, tmp_path: Path) -> None:
    """`load_dataset("parquet", data_dir=OUT/data)` and `load_dataset(OUT)` (the card's configs) both work."""
    import datasets

    ds = datasets.load_dataset("parquet", data_dir=data_dir(), split="train", cache_dir=str(tmp_path / "a"))
    assert canon(ds) == expected
    whole = datasets.load_dataset(str(packed("uint8")), cache_dir=str(tmp_path / "b"))
    assert list(whole) == ["train"] and canon(whole["train"]) == expected


@pytest.mark.ray
@pytest.mark.slow
def test_ray_data(expected, monkeypatch: pytest.MonkeyPatch) -> None:
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    # Ray Data probes fsspec's HTTP filesystem while resolving paths, from more than one thread of this process.
    # Where that module cannot be imported (no aiohttp), two threads importing it at once can leave one of them
    # with the half-initialised module and an ImportError Ray does not catch (seen in about 1 run in 5). Marking
    # the module as unavailable up front gives the ModuleNotFoundError Ray expects, every time.
    # Ray Data lists the files in a Ray task, so its worker processes get the same treatment, before their first
    # task (a function defined here is sent to them by value).
    try:
        import fsspec.implementations.http  # noqa: F401
    except ImportError:
        monkeypatch.setitem(sys.modules, "fsspec.implementations.http", None)

    def no_http_filesystem() -> None:
        import sys

        try:
            import fsspec.implementations.http  # noqa: F401
        except ImportError:
            sys.modules["fsspec.implementations.http"] = None  # type: ignore[assignment]

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False,
             ignore_reinit_error=True, runtime_env={"worker_process_setup_hook": no_http_filesystem})
    try:
        ds = ray.data.read_parquet(data_dir())
        rows = ds.take_all()
    finally:
        ray.shutdown()
    assert canon(rows) == expected


def test_shapes_agree_with_metadata(expected) -> None:
    ds = PackedDataset(packed("uint8"))
    assert ds.pixels is not None
    px = next(ds.iter_batches(1))["pixel_values"]
    some = next(iter(expected.values()))
    assert px[0].nbytes == len(some["pixel_values"]) and px.shape[1:] == ds.pixels.shape
    assert np.frombuffer(some["pixel_values"], np.uint8).size == int(np.prod(ds.pixels.shape))
