"""The same packed directory read by pyarrow, pandas, DuckDB, Polars, datasets and Ray Data gives the same rows
as PackedDataset (pixels compared byte for byte, after PackedDataset's reshape)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from _reader_helpers import packed

from mmprep.reader import PackedDataset


def canon(rows) -> dict[str, tuple]:
    """id -> (line, image_count, image_mask, content_boxes, input_ids, tag_ids, text, pixel bytes)."""
    out = {}
    for r in rows:
        out[r["id"]] = (
            int(r["line"]), int(r["image_count"]), [bool(v) for v in r["image_mask"]],
            [[int(v) for v in box] for box in r["content_boxes"]], [int(v) for v in r["input_ids"]],
            [int(v) for v in r["tag_ids"]], r["text"], bytes(r["pixel_values"]),
        )
    return out


@pytest.fixture(scope="module")
def expected() -> dict[str, tuple]:
    ds = PackedDataset(packed("uint8"))
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
    try:
        import fsspec.implementations.http  # noqa: F401
    except ImportError:
        monkeypatch.setitem(sys.modules, "fsspec.implementations.http", None)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False,
             ignore_reinit_error=True)
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
    assert px[0].nbytes == len(some[-1]) and px.shape[1:] == ds.pixels.shape
    assert np.frombuffer(some[-1], np.uint8).size == int(np.prod(ds.pixels.shape))
