"""`--engine ray` interrupted for real: Ctrl-C on a `python -m mmprep pack` subprocess that starts its own Ray.

Each test starts the CLI in its own session (so every process it and its Ray start can be found afterwards by
session id), interrupts it the way a terminal does (SIGINT to the whole foreground group) or the way ``kill -INT``
does (the parent only), and checks: exit 130 with the same one line as the local engine, no traceback, no Ray
process left behind, no temporary files, and a ``--resume`` that ends byte-identical to an uninterrupted run.
An unreachable ``--ray-address`` fails at once with one line.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil
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

pytest.importorskip("ray")
pytest.importorskip("ray.data")

runner = CliRunner()
TIMEOUT = 90.0  # seconds: a hang fails the test instead of blocking the suite (Ray starts in ~5 s, more when busy)
ROWS = 600
ARGS = ("--image-size", "32", "--resize-mode", "stretch", "--limit-images", "1", "--rows-per-shard", "8")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The manifest and an uninterrupted local run of it (the engines write the same bytes)."""
    manifest = write_noise_corpus(tmp_path_factory.mktemp("ray_kill_corpus"), rows=ROWS, side=384)
    ref = tmp_path_factory.mktemp("ray_kill_ref") / "out"
    result = runner.invoke(app, ["pack", str(manifest), "--out", str(ref), *ARGS, "--workers", "1"])
    assert result.exit_code == 0, result.stderr
    return manifest, ref


def start(manifest: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    return start_interruptible(mmprep_cmd("pack", str(manifest), "--out", str(out), *ARGS, "--workers", "2",
                                          "--engine", "ray", *extra))


def session_processes(sid: int) -> list[psutil.Process]:
    """Live processes of session ``sid`` (the run and everything it started, re-parented or not)."""
    found = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (OSError, psutil.Error):
            continue
    return found


def wait_for(cond: Callable[[], bool], proc: subprocess.Popen[str], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}: {proc.stderr.read()}")  # type: ignore[union-attr]
        if time.monotonic() > deadline:
            kill_session(proc.pid)
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def kill_session(sid: int) -> None:
    for p in session_processes(sid):
        with contextlib.suppress(psutil.Error):
            p.kill()


def interrupt(proc: subprocess.Popen[str], whole_group: bool) -> tuple[int, str]:
    if whole_group:
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends on Ctrl-C
    else:
        proc.send_signal(signal.SIGINT)  # `kill -INT <pid>`: the parent only
    try:
        _, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)
        proc.communicate()
        pytest.fail("the interrupted run hung")
    return proc.returncode, err


def assert_no_ray_left(sid: int) -> None:
    """Every process the run started is gone (Ray's agents used to outlive an interrupted run for good)."""
    deadline = time.monotonic() + 15
    left = session_processes(sid)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = session_processes(sid)
    names = [p.name() for p in left]
    kill_session(sid)
    assert not names, f"processes outlived the interrupted run: {names}"


def assert_interrupted(code: int, err: str) -> None:
    assert code == 130, err
    # the local engine's lines: the error and how to continue
    assert err.strip().splitlines()[-2:] == [
        "error: interrupted",
        "hint: the shards finished so far are kept: to continue, run the same command with --resume",
    ], err
    assert "Traceback" not in err and "core_worker" not in err, err


def resume_matches(manifest: Path, out: Path, ref: Path) -> None:
    result = runner.invoke(app, ["pack", str(manifest), "--out", str(out), *ARGS, "--workers", "1", "--resume"])
    assert result.exit_code == 0, result.stderr
    assert digests(out) == digests(ref)


def test_ctrl_c_while_ray_starts(corpus, tmp_path: Path) -> None:
    """Ctrl-C while `ray.init` is starting Ray's processes: before the fix the agents it had started stayed."""
    manifest, ref = corpus
    out = tmp_path / "out"
    proc = start(manifest, out)

    def ray_starting() -> bool:
        try:
            names = [p.name() for p in psutil.Process(proc.pid).children(recursive=True)]
        except psutil.Error:
            return False
        return "raylet" in names or any("Agent" in n for n in names)

    wait_for(ray_starting, proc, "Ray's processes")
    code, err = interrupt(proc, whole_group=True)
    assert_interrupted(code, err)
    assert_no_ray_left(proc.pid)
    assert not temp_files(out) and not (out / "index.json").exists()
    resume_matches(manifest, out, ref)


@pytest.mark.parametrize("whole_group", [True, False], ids=["ctrl-c", "kill-int"])
def test_interrupt_while_packing_on_ray(corpus, tmp_path: Path, whole_group: bool) -> None:
    manifest, ref = corpus
    out = tmp_path / "out"
    proc = start(manifest, out)
    wait_for(lambda: (out / ".mmprep" / "splits" / "train" / "chunks" / "00000.json").exists(), proc,
             "the first shard")
    code, err = interrupt(proc, whole_group)
    assert_interrupted(code, err)
    assert_no_ray_left(proc.pid)
    assert not temp_files(out) and not (out / "index.json").exists()
    finished = len(list(out.glob("data/train-*.parquet")))
    assert 1 <= finished < ROWS // 8, "the run finished before the signal: make the corpus bigger"
    resume_matches(manifest, out, ref)


def test_unreachable_ray_address_fails_at_once(corpus, tmp_path: Path) -> None:
    manifest, _ = corpus
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    proc = start(manifest, tmp_path / "out", "--ray-address", f"127.0.0.1:{port}")
    _, err = proc.communicate(timeout=TIMEOUT)
    assert time.monotonic() - t0 < 30
    assert proc.returncode == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[0].startswith(f"error: cannot reach Ray at '127.0.0.1:{port}'"), err
    assert len(lines) == 2 and "ray start --head" in lines[1], err  # the error and its hint, nothing from Ray
    assert not session_processes(proc.pid)
    assert not (tmp_path / "out").exists()  # found before the output directory is made
