"""`--engine ray`: parity with the local engine, resume, rejects, remote storage, normalize-images, missing Ray.

One local Ray instance (2 CPUs) serves the whole module and is shut down after it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest
from _objfs import register
from test_pack import SAMPLE, digests, sample_cfg
from typer.testing import CliRunner

from mmprep.cli import app
from mmprep.errors import RunFailed
from mmprep.pack.job import pack

runner = CliRunner()
TESTS = Path(__file__).resolve().parent
PACK_ARGS = ["--image-size", "64", "--resize-mode", "letterbox", "--tokenizer", str(SAMPLE / "tokenizers" / "clip"),
             "--max-length", "32", "--vocab", str(SAMPLE / "ram_tag_list.txt"), "--rows-per-shard", "6"]


@pytest.fixture(scope="module")
def ray_up():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    # workers import the test helpers (the objfs filesystem) from tests/, and mmprep from the working directory
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(TESTS)}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def local_ref(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "out"
    assert pack(sample_cfg(out), workers=1).failed is None
    return out


@pytest.fixture(scope="module")
def ray_out(ray_up, tmp_path_factory) -> tuple[Path, dict]:
    """The sample data packed by the CLI on the Ray engine (2 actors)."""
    out = tmp_path_factory.mktemp("ray") / "out"
    res = runner.invoke(app, ["pack", str(SAMPLE / "manifest.jsonl"), "--out", str(out), *PACK_ARGS,
                              "--engine", "ray", "--workers", "2", "--json"])
    assert res.exit_code == 0, res.stderr
    return out, json.loads(res.stdout)


def test_parity_with_local_engine(ray_out, local_ref: Path) -> None:
    out, report = ray_out
    # the same chunks and the same per-chunk work: byte-identical shards, index and rejects
    assert digests(out) == digests(local_ref)
    assert report["written"] == 15 and report["rejected"] == 3 and report["workers"] == 2
    assert report["rejected_by_reason"] == {"image_missing": 1, "image_truncated": 1, "unknown_tag": 1}
    assert report["extra"]["ray_workers"] == 2
    stats = json.loads((out / "run-stats-train.json").read_text())
    assert stats["engine"] == "ray" and stats["ray_workers"] == 2
    records = sorted((out / ".mmprep" / "splits" / "train" / "chunks").iterdir())
    assert [p.name for p in records] == ["00000.json", "00001.json", "00002.json"]  # saved by the parent


def test_resume_on_ray(ray_out, local_ref: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mmprep.runtime.engines.ray as ray_engine

    monkeypatch.setattr(ray_engine, "WINDOW_ITEMS", 6)  # one chunk per Ray Data pipeline: windows are exercised
    out = tmp_path / "out"
    shutil.copytree(ray_out[0], out)
    # an interrupted run: no index yet, one shard never finished, one damaged
    (out / "index.json").unlink()
    (out / "data" / "train-00002-of-00003.parquet").unlink()
    first = out / "data" / "train-00000-of-00003.parquet"
    data = bytearray(first.read_bytes())
    data[100] ^= 0xFF
    first.write_bytes(bytes(data))
    report = pack(sample_cfg(out), workers=2, engine="ray", resume=True)
    assert report.resumed_shards == 1
    assert digests(out) == digests(local_ref)


def test_fail_fast_on_ray(ray_up, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RunFailed, match="--on-error fail") as err:
        pack(sample_cfg(out, on_error="fail", rows_per_shard=9), workers=2, engine="ray")
    assert "manifest.jsonl:16" in str(err.value) and "image_missing" in str(err.value)  # the first bad row
    assert not (out / "index.json").exists()


def test_remote_storage_on_ray(ray_up, local_ref: Path, tmp_path: Path) -> None:
    root = tmp_path / "store"
    register(str(root), "AKIARAYKEY", "ray-secret-value")
    shutil.copytree(SAMPLE / "images", root / "bucket" / "data" / "images")
    shutil.copy(SAMPLE / "manifest.jsonl", root / "bucket" / "data" / "manifest.jsonl")
    base = "objfs://AKIARAYKEY:ray-secret-value@bucket"
    cfg = dataclasses.replace(sample_cfg(tmp_path / "unused"), manifest=f"{base}/data/manifest.jsonl",
                              out=f"{base}/out")
    report = pack(cfg, workers=2, engine="ray", storage_options={"root": str(root)})
    assert (report.written, report.rejected, report.out) == (15, 3, "objfs://bucket/out")
    out = root / "bucket" / "out"
    for name, digest in digests(local_ref).items():
        if name != "rejected-train.jsonl":  # its details name the remote files
            assert digests(out)[name] == digest, name
    for p in out.rglob("*"):
        if p.is_file():
            assert b"ray-secret-value" not in p.read_bytes() and b"AKIARAYKEY" not in p.read_bytes()


def test_normalize_images_on_ray(ray_up, tmp_path: Path) -> None:
    common = ["normalize-images", str(SAMPLE / "images"), "--image-size", "48", "--format", "png", "--json"]
    local = runner.invoke(app, [*common, "--out", str(tmp_path / "local"), "--workers", "1"])
    ray = runner.invoke(app, [*common, "--out", str(tmp_path / "ray"), "--engine", "ray", "--workers", "2"])
    assert local.exit_code == ray.exit_code, ray.stderr
    a, b = json.loads(local.stdout), json.loads(ray.stdout)
    assert (a["written"], a["rejected"], a["reasons"]) == (b["written"], b["rejected"], b["reasons"])
    assert a["written"] >= 8 and a["rejected"] >= 1
    files = {p.relative_to(tmp_path / "local"): p.read_bytes() for p in (tmp_path / "local").rglob("*.png")}
    assert files == {p.relative_to(tmp_path / "ray"): p.read_bytes() for p in (tmp_path / "ray").rglob("*.png")}
    assert (tmp_path / "local" / "rejects.jsonl").read_text() == (tmp_path / "ray" / "rejects.jsonl").read_text()


def test_missing_ray_fails_at_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("ray", "ray.data"):
        monkeypatch.setitem(sys.modules, name, None)  # `import ray` now raises ImportError
    out = tmp_path / "out"
    res = runner.invoke(app, ["pack", str(SAMPLE / "manifest.jsonl"), "--out", str(out), *PACK_ARGS,
                              "--engine", "ray"])
    assert res.exit_code == 2
    assert "--engine ray needs the 'ray' package" in res.stderr and "pip install 'mmprep[ray]'" in res.stderr
    assert not out.exists()  # nothing written, no silent fallback to the local engine
    res = runner.invoke(app, ["normalize-images", str(SAMPLE / "images"), "--out", str(out), "--engine", "ray"])
    assert res.exit_code == 2 and "pip install 'mmprep[ray]'" in res.stderr
    assert not out.exists()
