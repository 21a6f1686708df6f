"""Every input is bounded: absurd flag values are usage errors with the allowed range, and more workers than
there is work start no more processes than useful."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from mmprep.cli import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data"


@pytest.mark.parametrize("flags,says", [
    (["--image-size", "65536"], "each side must be 1 to 16,384"),
    (["--limit-images", "100000000000"], "--limit-images must be 1 to 1024"),
    (["--image-size", "16000", "--limit-images", "8"], "limit of one Parquet value"),
    (["--resize-mode", "shortest-edge", "--shortest-edge", "99999999999", "--pad", "none", "--encode-format",
      "png"], "--shortest-edge 99,999,999,999 is out of range"),
    (["--resize-mode", "max-pixels", "--max-pixels", "10000000000000", "--pad", "none", "--encode-format", "png"],
     "--max-pixels 10,000,000,000,000 is out of range"),
    (["--workers", "100000"], "--workers must be between 1 and 1024"),
    (["--image-size", "1e20"], "--image-size: invalid size '1e20'"),
    (["--limit-images", "1e20"], "'--limit-images'"),
])
def test_absurd_values_are_usage_errors_with_the_range(tmp_path: Path, flags: list[str], says: str) -> None:
    res = runner.invoke(app, ["--config", str(SAMPLE / "mmprep.toml"), "pack", str(SAMPLE / "manifest.jsonl"),
                              "--out", str(tmp_path / "o"), *flags])
    assert res.exit_code == 2, res.stderr
    assert says in res.stderr and "internal error" not in res.stderr
    assert not (tmp_path / "o").exists()


def test_absurd_workers_in_a_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[pack]\nworkers = 100000\nimage-size = "16"\n')
    res = runner.invoke(app, ["--config", str(cfg), "pack", str(SAMPLE / "manifest.jsonl"), "--out",
                              str(tmp_path / "o")])
    assert res.exit_code == 2 and "--workers must be between 1 and 1024" in res.stderr


@pytest.mark.parametrize("command", [["image-stats"], ["normalize-images", "--out", "{out}"]])
def test_image_sizes_are_bounded_in_the_image_commands_too(tmp_path: Path, command: list[str]) -> None:
    args = [a.replace("{out}", str(tmp_path / "o")) for a in command]
    res = runner.invoke(app, [*args, str(SAMPLE / "images"), "--image-size", "100000"])
    assert res.exit_code == 2 and "each side must be 1 to 16,384" in res.stderr, res.stderr


def test_more_workers_than_work_start_only_the_useful_processes(tmp_path: Path) -> None:
    manifest = tmp_path / "one.jsonl"
    line = (SAMPLE / "manifest.jsonl").read_text().splitlines()[0]
    manifest.write_text(line.replace('"images/', f'"{SAMPLE}/images/') + "\n")
    cmd = [sys.executable, "-m", "mmprep", "pack", str(manifest), "--out", str(tmp_path / "o"), "--workers", "24",
           "--image-size", "32", "--resize-mode", "stretch", "--allow-outside-root", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    me = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            peak = max(peak, len([c for c in me.children(recursive=True) if "resource_tracker" not in
                                  " ".join(c.cmdline())]))
        time.sleep(0.01)
    err = proc.communicate()[1]
    assert proc.returncode == 0, err
    # the workers that warm up while the input is read (one per core at most) are all it gets: no process is
    # started for a chunk that does not exist (was 24; then one per core plus one per submitted chunk)
    from mmprep.runtime.engines.base import default_workers

    assert 1 <= peak <= min(24, default_workers()), f"{peak} worker processes for a one-row input (was 24)"
    stats = json.loads((tmp_path / "o" / "run-stats-train.json").read_text())
    assert stats["workers"] == 1, stats
