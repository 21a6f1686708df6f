"""Reading packed datasets from object storage, against a real S3 API (moto's server on 127.0.0.1, s3fs client).

`mmprep pack` writes to s3://bucket/prefix on the loopback server; the reader, the torch datasets, `verify` and
`inspect` read it back and must give exactly what the same pack gives locally. Faults (5xx answers, dropped
connections, a server that goes away) come from a proxy in front of the server or from stopping it. Nothing talks
to any address but 127.0.0.1 (dummy credentials, no proxies, no instance metadata: see ``_s3_server.s3_env``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from _reader_helpers import CLIP, SAMPLE, VOCAB, pack_config, packed, shard
from _s3_server import KEY, SECRET, FaultProxy, Moto, environment, s3_env, start_moto
from PIL import Image
from typer.testing import CliRunner

from mmprep.cli import app
from mmprep.dataset.reader import PackedDataset
from mmprep.dataset.verify import verify
from mmprep.errors import InputError, RunFailed
from mmprep.pack.job import pack
from mmprep.runtime.files import sha256_file

s3fs = pytest.importorskip("s3fs")

runner = CliRunner()
BUCKET = "mmprep-data"
#: botocore's own retries off, so that the reader's retries are what the fault tests exercise
NO_CLIENT_RETRIES = {"config_kwargs": {"retries": {"total_max_attempts": 1}}}


@dataclasses.dataclass
class S3:
    moto: Moto
    fs: Any
    tmp: Path

    @property
    def options(self) -> dict[str, Any]:
        return {"endpoint_url": self.moto.endpoint}

    def upload(self, local: Path, prefix: str) -> str:
        """Copy a local packed directory to s3://BUCKET/prefix; returns the URI."""
        for p in sorted(local.rglob("*")):
            if p.is_file():
                self.fs.put_file(str(p), f"{BUCKET}/{prefix}/{p.relative_to(local).as_posix()}")
        return f"s3://{BUCKET}/{prefix}"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3]:
    tmp = tmp_path_factory.mktemp("s3")
    with environment(s3_env(tmp)):
        moto = start_moto(dict(os.environ))
        try:
            fs = s3fs.S3FileSystem(endpoint_url=moto.endpoint, skip_instance_cache=True)
            fs.mkdir(BUCKET)
            yield S3(moto, fs, tmp)
        finally:
            moto.stop()


@pytest.fixture(scope="module")
def remote(s3: S3) -> str:
    """The reader tests' uint8 dataset packed straight into the bucket by `pack` (same config as ``packed()``)."""
    uri = f"s3://{BUCKET}/uint8"
    report = pack(pack_config(uri), workers=1, storage_options=s3.options)
    assert report.failed is None and report.written == 15
    return uri


def same(a: Any, b: Any) -> bool:
    """Equal values and types, arrays compared exactly (dtype, shape, bytes)."""
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b) and type(a) is type(b)


def no_secrets(*texts: str) -> bool:
    return not any(s in t for t in texts for s in (KEY, SECRET))


# -- pack -> s3 -> reader / verify / inspect ----------------------------------------------------------------------


def test_cli_pack_to_s3_and_read_back_exactly_what_a_local_pack_gives(s3: S3, tmp_path: Path) -> None:
    common = ["--image-size", "32x48", "--resize-mode", "letterbox", "--limit-images", "4", "--tokenizer", CLIP,
              "--max-length", "16", "--vocab", VOCAB, "--rows-per-shard", "4", "--row-group-rows", "2"]
    uri = f"s3://{BUCKET}/cli"
    res = runner.invoke(app, ["pack", str(SAMPLE / "manifest.jsonl"), "--out", uri, *common, "--workers", "2",
                              "--storage-option", f"endpoint_url={s3.moto.endpoint}", "--json"])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["written"] == 15
    local = packed("uint8")
    # the same bytes went up as a local pack writes (uploaded by two worker processes)
    for name in ("index.json", "README.md", "rejected-train.jsonl", *(shard(local, i) for i in range(5))):
        assert s3.fs.cat_file(f"{BUCKET}/cli/{name}") == (local / name).read_bytes(), name

    with environment({"MMPREP_STORAGE_OPTIONS": json.dumps(s3.options)}):  # the other way to give options
        got = {cmd: runner.invoke(app, [cmd, uri, "--json"]) for cmd in ("verify", "inspect")}
    want = {cmd: runner.invoke(app, [cmd, str(local), "--json"]) for cmd in ("verify", "inspect")}
    for cmd in got:
        assert got[cmd].exit_code == want[cmd].exit_code == 0, got[cmd].stderr
        a, b = json.loads(got[cmd].stdout), json.loads(want[cmd].stdout)
        if cmd == "inspect":
            a, b = a["summary"], b["summary"]
        assert a.pop("path") == uri and b.pop("path") == str(local)
        assert a == b, cmd  # every figure and finding the same
        assert no_secrets(got[cmd].stdout, got[cmd].stderr)
    sheet = tmp_path / "sheet.png"
    res = runner.invoke(app, ["inspect", uri, "--sheet", str(sheet), "--samples", "4", "--storage-option",
                              f"endpoint_url={s3.moto.endpoint}"])
    assert res.exit_code == 0, res.stderr
    ref = tmp_path / "ref.png"
    assert runner.invoke(app, ["inspect", str(local), "--sheet", str(ref), "--samples", "4"]).exit_code == 0
    a, b = np.asarray(Image.open(sheet)), np.asarray(Image.open(ref))
    differ = np.flatnonzero((a != b).any(axis=(1, 2)))
    assert a.shape == b.shape and differ.size and differ.max() < 30  # only the title line (it names the path)


@pytest.mark.parametrize("kind", ["uint8", "encoded"])
def test_reader_from_s3_matches_the_local_reader(s3: S3, kind: str) -> None:
    uri = s3.upload(packed(kind), f"copy-{kind}")
    ds = PackedDataset(uri, storage_options=s3.options, decode_images=kind == "encoded")
    ref = PackedDataset(packed(kind), decode_images=kind == "encoded")
    assert ds.remote and not ref.remote and str(ds.path) == uri and len(ds) == len(ref) == 15
    assert ds.schema.equals(ref.schema, check_metadata=True) and ds.metadata == ref.metadata
    for a, b in zip(ds.iter_batches(4), ref.iter_batches(4), strict=True):
        assert same(a, b)
    for a, b in zip(ds.iter_batches(3, start=5, stop=12), ref.iter_batches(3, start=5, stop=12), strict=True):
        assert same(a, b)
    assert same(list(ds), list(ref))
    idx = [14, 0, 7, 7, 3, -1]
    assert same(ds.take(idx), ref.take(idx)) and same(ds[5], ref[5])
    assert same(ds.column("id"), ref.column("id"))
    assert np.array_equal(ds.row_group_bounds(), ref.row_group_bounds())
    for epoch in (0, 1):
        plan = ds.epoch_plan(epoch=epoch, seed=3, world_size=2, rank=1, num_workers=2, worker=0)
        assert plan == ref.epoch_plan(epoch=epoch, seed=3, world_size=2, rank=1, num_workers=2, worker=0)
        a = list(ds.iter_plan(plan, 3, shuffle_rng=np.random.default_rng(epoch)))
        b = list(ref.iter_plan(plan, 3, shuffle_rng=np.random.default_rng(epoch)))
        assert same(a, b)
    if kind == "uint8":
        norm = PackedDataset(uri, storage_options=s3.options, normalize="float32", columns=["pixel_values", "id"])
        assert same(next(norm.iter_batches(15)), next(PackedDataset(packed(kind), normalize="float32",
                                                                     columns=["pixel_values", "id"]).iter_batches(15)))
    stats = ds.stats.as_dict()
    assert stats["requests"] > 0 and stats["retries"] == 0 and stats["cache_hits"] == 0
    for other in (uri + "/", uri + "/index.json"):  # the folder with a slash, or its index file
        again = PackedDataset(other, storage_options=s3.options, decode_images=kind == "encoded")
        assert str(again.path) == uri and same(again[3], ref[3])


def test_each_rank_and_worker_fetches_only_its_own_row_groups(s3: S3, remote: str) -> None:
    ref = PackedDataset(packed("uint8"))
    spans = _row_group_spans(ref)
    everything: list[str] = []
    for world, workers in ((1, 1), (2, 2), (3, 1)):
        seen: list[str] = []
        for rank in range(world):
            for worker in range(workers):
                ds = PackedDataset(remote, storage_options=s3.options, prefetch=2)
                ds.row_group_bounds()  # the footers (every process reads them once; not row-group data)
                ds.stats.reset()
                plan = ds.epoch_plan(epoch=1, seed=5, rank=rank, world_size=world, worker=worker,
                                     num_workers=workers)
                ids = [i for b in ds.iter_plan(plan, 2, shuffle_rng=np.random.default_rng(0)) for i in b["id"]]
                seen += ids
                fetched = {_owner(spans, ref, rel, a, b) for rel, a, b in ds.stats.ranges}
                assert fetched == {g for g, _, _ in plan}, (world, rank, worker)
                assert len(ds.stats.ranges) == len(plan)  # one coalesced request per row group, nothing else
                ds.close()
        assert sorted(seen) == sorted(ref.column("id"))
        everything = seen
    assert len(everything) == 15


@pytest.mark.parametrize("prefetch", [0, 3])
def test_sequential_reads_fetch_row_groups_never_whole_shards(s3: S3, remote: str, prefetch: int) -> None:
    ref = PackedDataset(packed("uint8"))
    spans = _row_group_spans(ref)
    ds = PackedDataset(remote, storage_options=s3.options, prefetch=prefetch)
    ds.row_group_bounds()
    ds.stats.reset()
    assert same(list(ds.iter_batches(3)), list(ref.iter_batches(3)))
    owners = [_owner(spans, ref, rel, a, b) for rel, a, b in ds.stats.ranges]
    assert sorted(owners) == list(range(len(ref.row_group_bounds()) - 1))  # each row group once, nothing more
    ds.stats.reset()
    assert np.array_equal(ds.column("n_tokens"), ref.column("n_tokens"))
    assert len(ds.stats.ranges) == len(owners)  # one small request per row group for a single column
    assert ds.stats.as_dict()["bytes"] < sum(s.bytes for s in ref.shards) / 20


def _row_group_spans(ds: PackedDataset) -> dict[str, list[tuple[int, int]]]:
    """The byte span of every row group of every shard (from the Parquet footers)."""
    spans = {}
    for s in ds.shards:
        md = pq.ParquetFile(s.path).metadata
        spans[s.name] = []
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            starts, ends = [], []
            for c in range(rg.num_columns):
                col = rg.column(c)
                start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
                starts.append(start)
                ends.append(start + col.total_compressed_size)
            spans[s.name].append((min(starts), max(ends)))
    return spans


def _owner(spans: dict[str, list[tuple[int, int]]], ds: PackedDataset, rel: str, a: int, b: int) -> int:
    """The global row group a byte range lies in (it must lie in exactly one)."""
    first = 0
    for s in ds.shards:
        if s.name == rel:
            owners = [g for g, (lo, hi) in enumerate(spans[rel]) if lo <= a and b <= hi]
            assert len(owners) == 1, (rel, a, b, spans[rel])
            return first + owners[0]
        first += len(spans[s.name])
    raise AssertionError(rel)


def test_torch_dataloader_workers_stream_from_s3(s3: S3, remote: str) -> None:
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    from mmprep.dataset.torch_data import PackedIterableDataset, PackedTorchDataset

    ref = PackedDataset(packed("uint8"))
    want = {i: k for k, i in enumerate(ref.column("id"))}
    for rank in range(2):
        it = PackedIterableDataset(remote, batch_size=3, seed=1, rank=rank, world_size=2,
                                   storage_options=s3.options)
        ids: list[str] = []
        for batch in DataLoader(it, batch_size=None, num_workers=2):  # forked workers: their own S3 clients
            rows = [want[i] for i in batch["id"]]
            assert torch.equal(batch["pixel_values"], torch.from_numpy(ref.take(rows)["pixel_values"]))
            ids += batch["id"]
        assert len(ids) == len(set(ids))
        want_rank = [i for i in want if i in ids]
        assert sorted(ids) == sorted(want_rank)
    mapped = PackedTorchDataset(remote, storage_options=s3.options)
    loader = DataLoader(mapped, batch_size=4, num_workers=2, collate_fn=PackedTorchDataset.collate)
    assert [i for b in loader for i in b["id"]] == ref.column("id")


# -- the local cache ---------------------------------------------------------------------------------------------


def test_range_cache_serves_the_next_epoch_and_stays_under_its_limit(s3: S3, remote: str, tmp_path: Path) -> None:
    ref = list(PackedDataset(packed("uint8")).iter_batches(5))
    first = PackedDataset(remote, storage_options=s3.options, cache_dir=tmp_path / "c")
    assert same(list(first.iter_batches(5)), ref)
    cold = first.stats.as_dict()
    assert cold["bytes"] > 0 and cold["cache_hits"] == 0
    second = pickle.loads(pickle.dumps(PackedDataset(remote, storage_options=s3.options, cache_dir=tmp_path / "c")))
    assert same(list(second.iter_batches(5)), ref)  # (pickled, as DataLoader workers receive it)
    warm = second.stats.as_dict()
    # nothing came from the store; every range came from the cache, but for shard 0's footer (read when the
    # dataset was opened, it travelled with the pickle) and the 5 size checks
    assert warm["bytes"] == 0 and warm["cache_hits"] == cold["requests"] - 5 - 1
    entries = sorted((tmp_path / "c" / "mmprep-cache-v1" / "ranges").rglob("*-*"))
    assert entries and all(p.parent.name in {s.sha256 for s in second.shards} for p in entries)

    # a limit smaller than the data: entries are evicted, least recently used first, and reads stay right
    total = sum(p.stat().st_size for p in entries)
    limit = total // 3
    small = PackedDataset(remote, storage_options=s3.options, cache_dir=tmp_path / "small", cache_limit=limit)
    for _ in range(2):
        assert same(list(small.iter_batches(5)), ref)
        held = sum(p.stat().st_size for p in (tmp_path / "small").rglob("*") if p.is_file())
        assert 0 < held <= limit
    # a damaged entry (wrong size) is dropped and fetched again
    victim = entries[0]
    victim.write_bytes(victim.read_bytes()[:-1])
    third = PackedDataset(remote, storage_options=s3.options, cache_dir=tmp_path / "c")
    assert same(list(third.iter_batches(5)), ref)
    assert third.stats.as_dict()["bytes"] > 0 and victim.stat().st_size == total - sum(
        p.stat().st_size for p in entries if p != victim)


def test_whole_shard_cache_is_checked_against_the_index_sha256(s3: S3, tmp_path: Path) -> None:
    local = packed("uint8")
    uri = s3.upload(local, "whole")
    ds = PackedDataset(uri, storage_options=s3.options, cache_dir=tmp_path / "c", cache_shards=True, prefetch=0)
    assert same(list(ds.iter_batches(4)), list(PackedDataset(local).iter_batches(4)))
    cached = sorted((tmp_path / "c" / "mmprep-cache-v1" / "shards").glob("*.parquet"))
    assert len(cached) == 5 and ds.stats.as_dict()["shard_downloads"] == 5  # the empty one too (its footer)
    assert {p.stem for p in cached} == {sha256_file(p) for p in cached} == {s.sha256 for s in ds.shards}
    again = PackedDataset(uri, storage_options=s3.options, cache_dir=tmp_path / "c", cache_shards=True)
    assert same(again.take([1, 13]), PackedDataset(local).take([1, 13]))
    assert again.stats.as_dict()["shard_downloads"] == 0 and again.stats.as_dict()["bytes"] == 0  # from the cache

    # the store's shard replaced by one of the same size with a flipped byte: the download is refused
    data = bytearray((local / shard(local, 2)).read_bytes())
    data[len(data) // 2] ^= 0xFF
    s3.fs.pipe_file(f"{BUCKET}/whole/{shard(local, 2)}", bytes(data))
    fresh = PackedDataset(uri, storage_options=s3.options, cache_dir=tmp_path / "fresh", cache_shards=True)
    with pytest.raises(InputError) as err:
        fresh.take([9])
    msg = str(err.value)
    assert msg.startswith(f"{uri}/{shard(local, 2)}: sha256 ") and "differs from index.json" in msg
    kept = {p.name for p in (tmp_path / "fresh").rglob("*.parquet*")}
    assert "\n" not in msg and f"{fresh.shards[2].sha256}.parquet" not in kept  # not kept, no temporary left
    assert kept == {f"{s.sha256}.parquet" for k, s in enumerate(fresh.shards) if k != 2}


# -- faults: retried, then one line naming the shard and the store --------------------------------------------------


@pytest.fixture()
def proxy(s3: S3) -> Iterator[FaultProxy]:
    p = FaultProxy(s3.moto.port)
    yield p
    p.close()


# With botocore's retries off: a 5xx reaches the reader's retries at once; s3fs itself tries a cut-off body 5 times
# (so 6 in a row, one read at a time, reach the reader's retries) and a dropped connection up to 25 times.
@pytest.mark.parametrize("fault,times,prefetch,ours", [("500", 2, 2, 2), ("503", 3, 4, 3), ("cut", 6, 0, 1),
                                                       ("drop", 3, 0, 0)])
def test_dropped_connections_and_server_errors_are_retried(s3: S3, remote: str, proxy: FaultProxy, fault: str,
                                                           times: int, prefetch: int, ours: int) -> None:
    ds = PackedDataset(remote, storage_options={"endpoint_url": proxy.endpoint, **NO_CLIENT_RETRIES},
                       prefetch=prefetch)
    ds.row_group_bounds()
    proxy.fail(fault, times)
    assert same(list(ds.iter_batches(4)), list(PackedDataset(packed("uint8")).iter_batches(4)))
    assert proxy.injected == times and not proxy.queued
    assert ds.stats.as_dict()["retries"] == ours


def test_which_errors_are_retried() -> None:
    """Real exception objects of the clients: connection trouble and 5xx/429 are retried, 4xx and denials not."""
    import aiohttp
    import botocore.exceptions as be
    from s3fs.errors import translate_boto_error

    from mmprep.dataset.remote import is_transient

    def client_error(status: int, code: str) -> Exception:
        return be.ClientError({"Error": {"Code": code, "Message": code},
                               "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    retried = [client_error(500, "InternalError"), client_error(503, "SlowDown"), client_error(429, "TooMany"),
               translate_boto_error(client_error(503, "ServiceUnavailable")),
               be.ConnectionClosedError(endpoint_url="http://127.0.0.1:1"),
               be.EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
               be.ReadTimeoutError(endpoint_url="http://127.0.0.1:1"),
               aiohttp.ServerDisconnectedError(), aiohttp.ClientPayloadError("Response payload is not completed"),
               ConnectionResetError(104, "Connection reset by peer"), TimeoutError("timed out"),
               OSError("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 52, Empty reply"),
               OSError("AWS Error UNKNOWN (HTTP status 502) during GetObject operation")]
    refused = [client_error(403, "AccessDenied"), client_error(400, "InvalidRange"),
               translate_boto_error(client_error(403, "AccessDenied")), FileNotFoundError("bucket/key"),
               PermissionError("denied"), OSError("AWS Error ACCESS_DENIED during GetObject operation: denied"),
               OSError("AWS Error UNKNOWN (HTTP status 400) during GetObject operation"),
               be.NoCredentialsError(), ValueError("a bug"), TypeError("a bug"), InputError("ours")]
    assert [is_transient(e) for e in retried] == [True] * len(retried)
    assert [is_transient(e) for e in refused] == [False] * len(refused)


def test_a_store_that_keeps_failing_is_one_line_naming_the_shard_and_the_store(
        s3: S3, remote: str, proxy: FaultProxy, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mmprep")
    options = {"endpoint_url": proxy.endpoint, "key": KEY, "secret": SECRET, **NO_CLIENT_RETRIES}
    ds = PackedDataset(remote, storage_options=options, retries=2)
    proxy.persistent = "503"
    t0 = time.monotonic()
    with pytest.raises(RunFailed) as err:
        next(ds.iter_batches(4))  # the footers of shards 1-4 are read side by side (shard 0's at opening)
    took = time.monotonic() - t0
    msg = str(err.value)
    assert msg.startswith(f"{remote}/{shard(packed('uint8'), 1)}: reading bytes 0-") and "failed 3 times" in msg, msg
    assert f"on the store s3://{BUCKET} at {proxy.endpoint} (" in msg and "injected by the test proxy" in msg
    assert "\n" not in msg and no_secrets(msg) and took < 20
    assert proxy.injected == 4 * 3  # each of the four footer reads tried 3 times, all finished before the error
    retried = [r.getMessage() for r in caplog.records if "try 2 of 3" in r.getMessage()]
    assert len(retried) == 4 and all(m.startswith(f"{remote}/data/train-0000") for m in retried)
    assert no_secrets(*(r.getMessage() for r in caplog.records), repr(ds), repr(ds.location))
    # the CLI says the same in one line, exit 1, and names no credentials
    res = runner.invoke(app, ["inspect", remote, "--storage-option", f"endpoint_url={proxy.endpoint}",
                              "--storage-option", 'config_kwargs={"retries": {"total_max_attempts": 1}}'])
    assert res.exit_code == 1 and "error: " + remote in res.stderr and "failed 4 times" in res.stderr
    assert "Traceback" not in res.stderr and no_secrets(res.stderr, res.stdout)


def test_the_server_going_away_mid_read_fails_cleanly(s3: S3, tmp_path: Path) -> None:
    moto = start_moto(dict(os.environ))
    try:
        fs = s3fs.S3FileSystem(endpoint_url=moto.endpoint, skip_instance_cache=True)
        fs.mkdir("short-lived")
        fs.put(str(packed("uint8")) + "/", "short-lived/ds/", recursive=True)
        ds = PackedDataset("s3://short-lived/ds", storage_options={"endpoint_url": moto.endpoint,
                                                                    **NO_CLIENT_RETRIES}, prefetch=1)
        batches = ds.iter_batches(2)
        assert len(next(batches)["id"]) == 2
        moto.stop()
        with pytest.raises(RunFailed) as err:
            for _ in batches:
                pass
    finally:
        moto.stop()
    msg = str(err.value)
    assert msg.startswith("s3://short-lived/ds/data/train-0000") and f"at {moto.endpoint}" in msg and "\n" not in msg


def test_missing_and_short_shards_on_the_store(s3: S3, tmp_path: Path) -> None:
    local = packed("uint8")
    one, three = shard(local, 1), shard(local, 3)
    short = (local / three).read_bytes()
    missing, truncated = s3.upload(local, "missing"), s3.upload(local, "short")
    s3.fs.rm_file(f"{BUCKET}/missing/{one}")
    s3.fs.pipe_file(f"{BUCKET}/short/{three}", short[:-100])
    with pytest.raises(InputError) as err:
        PackedDataset(missing, storage_options=s3.options).take([5])
    assert str(err.value).startswith(f"{missing}/{one}: listed in index.json but missing from the "
                                     f"store s3://{BUCKET} at {s3.moto.endpoint}")
    with pytest.raises(InputError) as err:
        list(PackedDataset(truncated, storage_options=s3.options, prefetch=0).iter_batches(4))
    assert str(err.value).startswith(f"{truncated}/{three}: {len(short) - 100:,} bytes on the store, "
                                     f"index.json says {len(short):,} (a truncated or replaced shard)")
    # verify finds the same as on a local copy with the same damage, shard by shard
    s3.fs.pipe_file(f"{BUCKET}/missing/{three}", short[:-100])
    report = verify(missing, storage_options=s3.options)
    ref = verify(_damaged_locally(local, tmp_path))
    assert [(f.where, f.check, f.message) for f in report.findings] == [
        (f.where, f.check, f.message) for f in ref.findings]
    assert {f.check for f in report.findings} >= {"missing", "size"}
    res = runner.invoke(app, ["verify", f"s3://{BUCKET}/nothing-here", "--storage-option",
                              f"endpoint_url={s3.moto.endpoint}"])
    assert res.exit_code == 2 and f"s3://{BUCKET}/nothing-here: nothing there" in res.stderr


def _damaged_locally(local: Path, tmp_path: Path) -> Path:
    import shutil

    out = tmp_path / "damaged"
    shutil.copytree(local, out)
    (out / shard(out, 1)).unlink()
    p = out / shard(out, 3)
    p.write_bytes(p.read_bytes()[:-100])
    return out


# -- other clients and stores ------------------------------------------------------------------------------------


def test_pyarrow_s3_client_from_the_environment(s3: S3, remote: str) -> None:
    """No storage options: pyarrow's own S3 client, endpoint and credentials from the environment."""
    with environment({"AWS_ENDPOINT_URL": s3.moto.endpoint}):
        ds = PackedDataset(remote)
        assert type(ds.location.fs).__name__ == "S3FileSystem"  # pyarrow's, not the fsspec wrapper
        assert same(list(ds.iter_batches(4)), list(PackedDataset(packed("uint8")).iter_batches(4)))
        assert same(ds.take([3, 11]), PackedDataset(packed("uint8")).take([3, 11]))
        assert verify(remote).ok


def test_memory_filesystem_dataset() -> None:
    import fsspec

    mem = fsspec.filesystem("memory")
    try:
        mem.put(str(packed("encoded")) + "/", "/mem-bucket/enc/", recursive=True)
        ds = PackedDataset("memory://mem-bucket/enc", columns=["id", "images"])
        ref = PackedDataset(packed("encoded"), columns=["id", "images"])
        assert same(ds.take([0, 14, 2]), ref.take([0, 14, 2]))
        assert verify("memory://mem-bucket/enc").ok
    finally:
        mem.rm("/mem-bucket", recursive=True)


def test_http_dataset(tmp_path: Path) -> None:
    """A dataset served over plain HTTP (range requests) by a static server on 127.0.0.1."""
    from _http_server import serve

    src = packed("uint8")
    with environment(s3_env(tmp_path)), serve(src.parent) as base:
        uri = f"{base}/{src.name}"
        ds = PackedDataset(uri)
        assert same(list(ds.iter_batches(4)), list(PackedDataset(src).iter_batches(4)))
        assert verify(uri).ok
        res = runner.invoke(app, ["inspect", uri, "--json"])
        assert res.exit_code == 0 and json.loads(res.stdout)["summary"]["rows"] == 15
        with pytest.raises(InputError, match="nothing there"):
            PackedDataset(f"{base}/not-a-dataset")
