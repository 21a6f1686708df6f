"""Interruptions of a real ``python -m mmprep pack`` process: kill -9, Ctrl-C, a dying worker, a second run.

Each test starts the CLI as a subprocess in its own process group over a corpus big enough to take a few seconds
with small shards, waits until at least one shard is finished (its resume record exists), then interrupts it.
The reference is an uninterrupted run of the same command; resumed outputs must be byte-identical to it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from _reliab_helpers import (
    digests,
    mmprep_cmd,
    start_interruptible,
    temp_files,
    write_noise_corpus,
)
from typer.testing import CliRunner

from mmprep.cli import app

runner = CliRunner()
TIMEOUT = 60.0  # seconds: a hang fails the test instead of blocking the suite
ROWS = 400
ARGS = ("--image-size", "32", "--resize-mode", "stretch", "--limit-images", "1", "--rows-per-shard", "8")
N_SHARDS = ROWS // 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The manifest and the output of an uninterrupted run (one worker: output does not depend on workers)."""
    manifest = write_noise_corpus(tmp_path_factory.mktemp("kill_corpus"), rows=ROWS, side=384)
    ref = tmp_path_factory.mktemp("kill_ref") / "out"
    result = runner.invoke(app, ["pack", str(manifest), "--out", str(ref), *ARGS, "--workers", "1"])
    assert result.exit_code == 0, result.stderr
    assert len(list(ref.glob("data/train-*.parquet"))) == N_SHARDS
    return manifest, ref


def start(manifest: Path, out: Path, workers: int, *extra: str) -> subprocess.Popen[str]:
    return start_interruptible(mmprep_cmd("pack", str(manifest), "--out", str(out), *ARGS, "--workers",
                                          str(workers), *extra))


def wait_for(cond: Callable[[], bool], proc: subprocess.Popen[str], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}: {proc.stderr.read()}")  # type: ignore[union-attr]
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def first_shard_done(out: Path) -> Callable[[], bool]:
    return lambda: (out / ".mmprep" / "splits" / "train" / "chunks" / "00000.json").exists()


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, float]:
    """Wait for the process (at most TIMEOUT); returns (exit code, stderr, seconds waited)."""
    t0 = time.monotonic()
    try:
        _, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the process hung")
    return proc.returncode, err, time.monotonic() - t0


def resume_and_compare(manifest: Path, out: Path, ref: Path, workers: int = 1) -> int:
    result = runner.invoke(app, ["pack", str(manifest), "--out", str(out), *ARGS, "--workers", str(workers),
                                 "--resume", "--json"])
    assert result.exit_code == 0, result.stderr
    assert digests(out) == digests(ref)
    return json.loads(result.stdout)["resumed_shards"]


def assert_final_names_are_whole(out: Path) -> None:
    """No index (the run did not finish); every shard under its final name is a complete Parquet file."""
    assert not (out / "index.json").exists()
    for shard in out.glob("data/train-*.parquet"):
        assert pq.read_metadata(shard).num_rows > 0


def test_kill_9_then_resume_is_byte_identical(corpus, tmp_path: Path) -> None:
    manifest, ref = corpus
    out = tmp_path / "out"
    proc = start(manifest, out, 2)
    wait_for(first_shard_done(out), proc, "the first shard")
    members = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=TIMEOUT)
    psutil.wait_procs(members, timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL
    assert_final_names_are_whole(out)
    finished = len(list(out.glob("data/train-*.parquet")))
    assert 1 <= finished < N_SHARDS
    resumed = resume_and_compare(manifest, out, ref)
    assert 1 <= resumed <= finished
    assert not temp_files(out)  # whatever the killed workers left was cleaned up by the resumed run


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_workers_do_not_outlive_a_killed_parent(corpus, tmp_path: Path, sig: signal.Signals) -> None:
    """Only the parent is killed (not its group): the pool workers notice and exit within seconds instead of
    running on (and holding the caller's pipes open); the output resumes byte-identical."""
    manifest, ref = corpus
    out = tmp_path / "out"
    proc = start(manifest, out, 2)
    wait_for(first_shard_done(out), proc, "the first shard")
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if "--multiprocessing-fork" in p.cmdline()]
    assert len(workers) == 2
    os.kill(proc.pid, sig)
    proc.wait(timeout=TIMEOUT)
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], "workers outlived their parent"
    proc.communicate(timeout=TIMEOUT)  # their copies of the pipes are closed too: this returns
    resume_and_compare(manifest, out, ref)


@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_exits_130_promptly_and_resumes(corpus, tmp_path: Path, workers: int) -> None:
    manifest, ref = corpus
    out = tmp_path / "out"
    proc = start(manifest, out, workers)
    wait_for(first_shard_done(out), proc, "the first shard")
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends on Ctrl-C: the whole foreground group
    code, err, waited = finish(proc)
    assert code == 130, err
    assert waited < 10, f"took {waited:.1f}s to stop"
    # the error and how to continue (what resume_and_compare then does)
    assert err.strip().splitlines()[-2:] == [
        "error: interrupted",
        "hint: the shards finished so far are kept: to continue, run the same command with --resume",
    ]
    assert "Traceback" not in err
    assert not temp_files(out)
    assert_final_names_are_whole(out)
    assert resume_and_compare(manifest, out, ref, workers) >= 1


def test_a_killed_worker_fails_the_run_instead_of_hanging(corpus, tmp_path: Path) -> None:
    manifest, ref = corpus
    out = tmp_path / "out"
    proc = start(manifest, out, 2)
    wait_for(first_shard_done(out), proc, "the first shard")
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if "--multiprocessing-fork" in p.cmdline()]  # pool workers, not the resource tracker
    assert len(workers) == 2
    workers[0].kill()
    code, err, _ = finish(proc)
    assert code == 1, err
    assert "a worker process died" in err and "--resume" in err and "Traceback" not in err
    assert not temp_files(out)
    assert_final_names_are_whole(out)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers[1:])
    resume_and_compare(manifest, out, ref)


def test_a_second_run_into_the_same_directory_is_refused(corpus, tmp_path: Path) -> None:
    """While one run holds the output directory, others (plain, --overwrite, --resume) exit 2 without touching
    it; the first run's output is the same as if it had been alone."""
    manifest, ref = corpus
    out = tmp_path / "out"
    first = start(manifest, out, 1)
    lock = out / ".mmprep" / "lock"
    wait_for(lambda: lock.exists() and lock.read_text() == str(first.pid), first, "the lock")
    others = [start(manifest, out, 1, *extra) for extra in ((), ("--overwrite",), ("--resume",))]
    for proc in others:
        code, err, _ = finish(proc)
        assert code == 2, err
        assert f"another mmprep run (pid {first.pid}) is writing to this directory" in err
        assert "Traceback" not in err
    assert first.poll() is None, "the first run ended before the others were refused: make the corpus bigger"
    code, err, _ = finish(first)
    assert code == 0, err
    assert digests(out) == digests(ref)
