"""The same packed directory read by pyarrow, pandas, DuckDB, Polars, datasets and Ray Data gives the same rows
as PackedDataset: every stored column of every row (pixels compared byte for byte, after PackedDataset's reshape).

The shards are given to each reader as a list of files or as the glob ``DIR/shard-*.parquet``: ``index.json`` and
``rejected.jsonl`` sit next to them, so readers that take the whole directory try to read those as Parquet too.
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


def shard_files() -> list[str]:
    path = packed("uint8")
    index = json.loads((path / "index.json").read_text())
    return [str(path / s["path"]) for s in index["shards"]]


def test_pyarrow(expected) -> None:
    import pyarrow.dataset as pads

    table = pads.dataset(shard_files(), format="parquet").to_table()
    assert canon(table.to_pylist()) == expected


def test_pandas(expected) -> None:
    import pandas as pd

    df = pd.concat([pd.read_parquet(f) for f in shard_files()], ignore_index=True)
    assert canon(df.to_dict("records")) == expected


def test_globs_as_the_readme_gives_them(expected, tmp_path: Path) -> None:
    """`DIR/shard-*.parquet` works where the bare directory does not (index.json is not Parquet)."""
    import datasets
    import duckdb
    import polars as pl
    import pyarrow

    glob = str(packed("uint8") / "shard-*.parquet")
    assert canon(pl.read_parquet(glob).to_dicts()) == expected
    cur = duckdb.connect().execute(f"select * from read_parquet('{glob}')")
    names = [d[0] for d in cur.description]
    assert canon(dict(zip(names, row, strict=True)) for row in cur.fetchall()) == expected
    hf = datasets.load_dataset("parquet", data_files=glob, split="train", cache_dir=str(tmp_path))
    assert canon(hf) == expected
    with pytest.raises(pyarrow.ArrowInvalid):  # why the README gives the glob
        datasets.load_dataset("parquet", data_dir=str(packed("uint8")), split="train", cache_dir=str(tmp_path / "d"))


def test_duckdb(expected) -> None:
    import duckdb

    con = duckdb.connect()
    cur = con.execute(f"select * from read_parquet({shard_files()!r})")
    names = [d[0] for d in cur.description]
    assert canon(dict(zip(names, row, strict=True)) for row in cur.fetchall()) == expected


def test_polars(expected) -> None:
    import polars as pl

    df = pl.read_parquet(shard_files())
    assert canon(df.to_dicts()) == expected


def test_datasets(expected, tmp_path: Path) -> None:
    import datasets

    ds = datasets.load_dataset("parquet", data_files=shard_files(), split="train", cache_dir=str(tmp_path))
    assert canon(ds) == expected


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
        ds = ray.data.read_parquet(shard_files())
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
