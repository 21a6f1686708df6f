"""Remote storage for `pack`: file:// URIs, memory://, a cross-process object store, resume, credentials."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pickle
import shutil
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest
from _objfs import register
from test_pack import SAMPLE, digests, sample_cfg
from typer.testing import CliRunner

from mmprep.cli import app
from mmprep.errors import UsageError
from mmprep.images.decode import ImageConfig
from mmprep.pack.job import pack
from mmprep.runtime.storage import local_path, open_location, parse_storage_options, redact

runner = CliRunner()
KEY, SECRET, TOKEN = "AKIAKEYEXAMPLE", "s3cr3t-EXAMPLE-value", "tok-EXAMPLE-9f2c"
SECRETS = (KEY, SECRET, TOKEN)


@pytest.fixture(scope="module")
def local_ref(tmp_path_factory) -> Path:
    """The sample data packed from plain local paths: the reference every remote variant must match."""
    out = tmp_path_factory.mktemp("ref") / "out"
    assert pack(sample_cfg(out), workers=1).failed is None
    return out


def shard_digests(out: Path) -> dict[str, str]:
    return {k: v for k, v in digests(out).items() if k.startswith("data/") or k in ("index.json", "README.md")}


def test_uri_helpers() -> None:
    assert local_path("file:///data/a%20b/m.jsonl") == "/data/a b/m.jsonl"
    assert local_path("rel/x.jsonl") == "rel/x.jsonl"
    with pytest.raises(UsageError, match="with a host"):
        local_path("file://otherhost/data")
    assert redact(f"s3://{KEY}:{SECRET}@bucket/p/x.jsonl?region=eu&secret_key={SECRET}") == "s3://bucket/p/x.jsonl"
    assert redact("/plain/path") == "/plain/path"
    assert parse_storage_options(["anon=true", "n=3", "endpoint_url=http://h:9000", 'ck={"a": 1}']) == {
        "anon": True, "n": 3, "endpoint_url": "http://h:9000", "ck": {"a": 1}}
    with pytest.raises(UsageError, match="KEY=VALUE"):
        parse_storage_options(["novalue"])


def test_location_hides_credentials() -> None:
    # pyarrow's own S3 client, credentials in the URI: nothing is contacted until used
    loc = open_location(f"s3://{KEY}:{SECRET}@bucket/out?region=us-east-1&endpoint_override=127.0.0.1:9&scheme=http")
    assert loc.uri == "s3://bucket/out" and loc.atomic_put and not loc.local
    shown = f"{loc} {loc!r} {loc.child('shard-00000.parquet')!r}"
    assert not any(s in shown for s in SECRETS)
    assert loc.scrub(f"failed for {KEY}:{SECRET}") == "failed for ***"
    assert pickle.loads(pickle.dumps(loc)).fs.region == "us-east-1"  # travels to workers with its settings


def test_file_uris_take_the_local_path(tmp_path: Path, local_ref: Path) -> None:
    out = tmp_path / "out"
    cfg = dataclasses.replace(sample_cfg(out), manifest=(SAMPLE / "manifest.jsonl").resolve().as_uri(),
                              out=out.as_uri(), image_root=(SAMPLE.resolve()).as_uri())
    report = pack(cfg, workers=1)
    assert report.out == str(out)
    assert shard_digests(out) == shard_digests(local_ref)  # same bytes as from plain paths
    assert rejects(out) == rejects(local_ref)


def rejects(out: Path) -> list[tuple[int, str, str]]:
    lines = (out / "rejected-train.jsonl").read_text().splitlines()
    return [(r["line"], r["id"], r["reason"]) for r in map(json.loads, lines)]


def test_memory_filesystem_in_process(tmp_path: Path, local_ref: Path) -> None:
    mem = fsspec.filesystem("memory")
    mem.put(str(SAMPLE / "images"), "/mm-bucket/data/images", recursive=True)
    mem.put(str(SAMPLE / "manifest.jsonl"), "/mm-bucket/data/manifest.jsonl")
    try:
        cfg = dataclasses.replace(sample_cfg(tmp_path / "unused"), manifest="memory://mm-bucket/data/manifest.jsonl",
                                  out="memory://mm-bucket/out")
        report = pack(cfg, workers=1)
        assert (report.written, report.rejected) == (15, 3)
        got = {p.split("/mm-bucket/out/", 1)[-1]: mem.cat_file(p) for p in mem.find("/mm-bucket/out")
               if "/.mmprep/" not in p}
        ref = {p.relative_to(local_ref).as_posix(): p.read_bytes() for p in local_ref.rglob("*") if p.is_file()}
        for name in ("data/train-00000-of-00003.parquet", "data/train-00001-of-00003.parquet",
                     "data/train-00002-of-00003.parquet", "index.json", "README.md"):
            assert got[name] == ref[name], name
        rejects = [json.loads(line) for line in got["rejected-train.jsonl"].decode().splitlines()]
        assert [(r["id"], r["reason"]) for r in rejects] == [
            ("s016", "image_missing"), ("s017", "image_truncated"), ("s018", "unknown_tag")]
        assert "memory://mm-bucket/data/images/coffee_truncated.jpg" in rejects[1]["detail"]
        # a local manifest with a remote --image-root reads the same images
        report = pack(dataclasses.replace(cfg, manifest=str(SAMPLE / "manifest.jsonl"), out="memory://mm-bucket/o2",
                                          image_root="memory://mm-bucket/data"), workers=1)
        shard = "data/train-00001-of-00003.parquet"
        assert mem.cat_file(f"/mm-bucket/o2/{shard}") == (local_ref / shard).read_bytes()
        # references may not leave the remote image root
        rows = [{"id": "e1", "images": ["../outside.jpg"], "text": "a"},
                {"id": "e2", "images": ["images/coffee.jpg"], "text": "b"}]
        mem.pipe("/mm-bucket/data/escape.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
        mem.pipe("/mm-bucket/outside.jpg", (SAMPLE / "images" / "coffee.jpg").read_bytes())
        report = pack(dataclasses.replace(cfg, manifest="memory://mm-bucket/data/escape.jsonl",
                                          out="memory://mm-bucket/o3"), workers=1)
        assert (report.written, report.rejected_by_reason) == (1, {"path_outside_root": 1})
        # memory:// lives in this process: a worker pool could not see it
        with pytest.raises(UsageError, match="only inside this process"):
            pack(dataclasses.replace(cfg, out="memory://mm-bucket/out2"), workers=2)
    finally:
        mem.rm("/mm-bucket", recursive=True)


@pytest.fixture()
def objstore(tmp_path: Path) -> Path:
    """A cross-process object store holding the sample data at objfs://bucket/data/ (credentials required)."""
    root = tmp_path / "store"
    register(str(root), KEY, SECRET)
    shutil.copytree(SAMPLE / "images", root / "bucket" / "data" / "images")
    shutil.copy(SAMPLE / "manifest.jsonl", root / "bucket" / "data" / "manifest.jsonl")
    return root


def test_object_store_cli_worker_pool_and_secrets(objstore: Path, local_ref: Path) -> None:
    base = f"objfs://{KEY}:{SECRET}@bucket"
    args = ["pack", f"{base}/data/manifest.jsonl", "--out", f"{base}/out", "--storage-option", f"root={objstore}",
            "--storage-option", f"token={TOKEN}", "--image-size", "64", "--resize-mode", "letterbox",
            "--tokenizer", str(SAMPLE / "tokenizers" / "clip"), "--max-length", "32",
            "--vocab", str(SAMPLE / "ram_tag_list.txt"), "--rows-per-shard", "6", "--workers", "2", "--json"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["out"] == "objfs://bucket/out" and report["written"] == 15 and report["workers"] == 2
    out = objstore / "bucket" / "out"
    assert shard_digests(out) == shard_digests(local_ref)  # uploaded by spawned workers, same bytes
    assert not list(out.glob(".*tmp*"))
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"index.json", "README.md", "rejected-train.jsonl", "run-stats-train.json",
                                       "run.json"}
    for text in [res.stdout, res.stderr, *(p.read_bytes().decode("utf-8", "replace") for p in files)]:
        assert not any(s in text for s in SECRETS)
    assert "objfs://bucket/data/images/does_not_exist.jpg" in (out / "rejected-train.jsonl").read_text()

    # a second run into the same location needs --resume or --overwrite; resume redoes only what is missing
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "already holds split 'train'" in res.stderr
    (out / "index.json").unlink()
    (out / "data" / "train-00001-of-00003.parquet").unlink()
    res = runner.invoke(app, [*args[:-3], "--workers", "1", "--resume", "--json"])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["resumed_shards"] == 2
    assert shard_digests(out) == shard_digests(local_ref)

    # wrong credentials: a clean usage error that repeats none of them
    res = runner.invoke(app, [*args[:1], f"objfs://{KEY}:wrong-{SECRET}@bucket/data/manifest.jsonl", *args[2:]])
    assert res.exit_code == 2 and "access denied" in res.stderr
    assert not any(s in res.stderr + res.stdout for s in SECRETS)


def test_remote_shards_read_back_with_filesystem(objstore: Path) -> None:
    out = f"objfs://{KEY}:{SECRET}@bucket/out-pad-none"
    cfg = dataclasses.replace(sample_cfg(objstore / "unused", pad="none", image=ImageConfig(size=None,
                                                                                          resize_mode="none")),
                              manifest=f"objfs://{KEY}:{SECRET}@bucket/data/manifest.jsonl", out=out,
                              rows_per_shard=None, shard_size=4 << 20)
    report = pack(cfg, workers=1, storage_options={"root": str(objstore)})
    assert report.written == 15
    loc = open_location(out, {"root": str(objstore)})
    index = json.loads(loc.child("index.json").read_bytes())["splits"]["train"]
    with loc.fs.open_input_file(loc.child(index["shards"][0]["path"]).path) as f:
        table = pq.read_table(f)
    row = table.to_pylist()[0]
    # --pad none stores the original file bytes, read from the remote store
    assert row["images"][0]["bytes"] == (SAMPLE / row["images"][0]["path"]).read_bytes()
    # the shard plan sized the remote image files (a few hundred KB each, ~4 MB shards)
    assert 4 <= index["rows_per_shard"] <= 64


def test_unreachable_s3_fails_cleanly_without_credentials(tmp_path: Path) -> None:
    uri = f"s3://{KEY}:{SECRET}@bucket/out?region=us-east-1&endpoint_override=127.0.0.1:9&scheme=http"
    res = runner.invoke(app, ["pack", str(SAMPLE / "manifest.jsonl"), "--out", uri, "--image-size", "32",
                              "--rows-per-shard", "6", "--workers", "1"])
    assert res.exit_code == 2, res.stderr
    assert "s3://bucket/out" in res.stderr and "cannot read the output location" in res.stderr
    assert not any(s in res.stderr + res.stdout for s in SECRETS)


def test_unknown_scheme_names_what_to_install() -> None:
    with pytest.raises(UsageError) as err:
        open_location("nosuchproto://bucket/x")
    assert "no filesystem for nosuchproto://" in str(err.value)
    if importlib.util.find_spec("s3fs") is None:
        with pytest.raises(UsageError) as err:
            open_location("s3://bucket/x", {"anon": True})  # options need the fsspec client
        assert err.value.hint == "pip install s3fs" or "s3fs" in str(err.value)


@pytest.fixture()
def http_root():
    """sample_data served by a real HTTP server on 127.0.0.1 (a free port), stopped after the test."""
    from _http_server import serve

    with serve(SAMPLE) as url:
        yield url + "/"


@pytest.mark.skipif(importlib.util.find_spec("aiohttp") is None, reason="needs the remote extra (aiohttp)")
@pytest.mark.parametrize("workers", [1, 2])
def test_an_http_image_root_reads_every_image(http_root: str, tmp_path: Path, local_ref: Path, workers: int) -> None:
    """--image-root http://...: the root was collapsed to http:/ and every image was "missing" without a request."""
    out = tmp_path / "out"
    report = pack(dataclasses.replace(sample_cfg(out), image_root=http_root), workers=workers)
    assert report.failed is None
    assert {k: v for k, v in shard_digests(out).items() if k != "index.json"} == \
        {k: v for k, v in shard_digests(local_ref).items() if k != "index.json"}
    assert rejects(out) == rejects(local_ref)


@pytest.mark.skipif(importlib.util.find_spec("aiohttp") is None, reason="needs the remote extra (aiohttp)")
def test_an_http_image_root_refuses_paths_above_it(http_root: str, tmp_path: Path) -> None:
    from mmprep.images.sources import RemoteImages

    images = RemoteImages(open_location(http_root + "images/"))
    assert images.resolve("astronaut.jpg").path == http_root + "images/astronaut.jpg"
    from mmprep.images.decode import ImageError

    with pytest.raises(ImageError, match="outside the image root"):
        images.resolve("../manifest.jsonl")
    with pytest.raises(ImageError, match="image root's host"):
        images.resolve("http://127.0.0.2:1/images/x.jpg")


@pytest.mark.skipif(importlib.util.find_spec("aiohttp") is None, reason="needs the remote extra (aiohttp)")
def test_an_http_root_whose_server_does_not_answer_says_so(tmp_path: Path) -> None:
    """fsspec answers "not found" for a refused connection: the early stop said every image "does not exist"."""
    import socket

    with socket.socket() as s:  # a port on 127.0.0.1 that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = CliRunner().invoke(app, ["pack", str(SAMPLE / "manifest.jsonl"), "--out", str(tmp_path / "o"),
                                   "--image-root", f"http://127.0.0.1:{port}/", "--image-size", "16"])
    assert res.exit_code == 1, res.stderr
    assert f"cannot be read from http://127.0.0.1:{port}/" in res.stderr and "cannot be reached" in res.stderr
    assert "does not exist" not in res.stderr


@pytest.mark.skipif(importlib.util.find_spec("aiohttp") is None, reason="needs the remote extra (aiohttp)")
def test_an_http_root_that_answers_404_names_the_missing_image(http_root: str, tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["pack", str(SAMPLE / "manifest.jsonl"), "--out", str(tmp_path / "o"),
                                   "--image-root", http_root + "nothing-here/", "--image-size", "16"])
    assert res.exit_code == 1, res.stderr
    assert f"{http_root}nothing-here/images/astronaut.jpg does not exist" in res.stderr


@pytest.mark.skipif(importlib.util.find_spec("aiohttp") is None, reason="needs the remote extra (aiohttp)")
def test_images_from_a_server_that_does_not_answer_are_unreadable_not_missing(tmp_path: Path) -> None:
    """With --no-image-check the run goes on: each row's reject must say the server did not answer."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "o"
    res = CliRunner().invoke(app, ["pack", str(SAMPLE / "manifest.jsonl"), "--out", str(out), "--image-root",
                                   f"http://127.0.0.1:{port}/", "--image-size", "16", "--no-image-check",
                                   "--workers", "1"])
    assert res.exit_code == 1, res.stderr
    rows = [json.loads(line) for line in (out / "rejected-train.jsonl").read_text().splitlines()]
    image_rows = [r for r in rows if r["stage"] == "image"]
    assert image_rows and {r["reason"] for r in image_rows} == {"image_unreadable"}
    assert all("Connection refused" in r["detail"] for r in image_rows), image_rows[0]
