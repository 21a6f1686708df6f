"""CLI conventions shared by every command: version, help, lazy heavy imports, config files, errors, quiet and
verbose, progress only on a terminal."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

from typer.testing import CliRunner

from mmprep import __version__
from mmprep.cli import app
from mmprep.errors import EXIT_USAGE

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data"
SAMPLE_MANIFEST = SAMPLE / "manifest.jsonl"
CLIP = SAMPLE / "tokenizers" / "clip"

runner = CliRunner()


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"mmprep {__version__}"


def test_help_lists_every_subcommand_with_a_purpose() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in app.registered_commands:
        assert cmd.name, "every command is registered with an explicit name"
        assert cmd.name in result.stdout
        assert cmd.callback is not None and cmd.callback.__doc__, f"{cmd.name} has no one-line purpose"


def test_help_does_not_import_heavy_packages() -> None:
    code = (
        "import sys\n"
        "from mmprep.cli import main\n"
        "sys.argv=['mmprep','--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy=[m for m in ('torch','transformers','ray','datasets','pandas') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out


def test_python_dash_m_works() -> None:
    out = subprocess.run([sys.executable, "-m", "mmprep", "--version"], capture_output=True, text=True)
    assert out.returncode == 0
    assert out.stdout.strip() == f"mmprep {__version__}"


def test_config_file_unknown_section_is_usage_error(tmp_path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[no-such-command]\nx = 1\n")
    result = runner.invoke(app, ["--config", str(cfg), "pack", "m.jsonl", "--out", str(tmp_path / "o")])
    assert result.exit_code == EXIT_USAGE
    assert "unknown section [no-such-command]" in result.stderr
    assert "valid sections:" in result.stderr and "pack" in result.stderr
    assert result.stdout == ""


def test_config_file_invalid_toml(tmp_path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[pack\n")
    result = runner.invoke(app, ["--config", str(cfg), "pack", "m.jsonl", "--out", str(tmp_path / "o")])
    assert result.exit_code == EXIT_USAGE
    assert "invalid TOML" in result.stderr and str(cfg) in result.stderr
    assert result.stdout == ""


def test_config_file_bad_value_type_is_usage_error(tmp_path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[pack]\nlimit-images = "many"\n')
    result = runner.invoke(app, ["--config", str(cfg), "pack", "m.jsonl", "--out", str(tmp_path / "o")])
    assert result.exit_code == EXIT_USAGE
    assert "--limit-images" in result.stderr


def test_known_error_is_one_line_without_traceback(tmp_path) -> None:
    missing = tmp_path / "nope.jsonl"
    result = runner.invoke(app, ["pack", str(missing), "--out", str(tmp_path / "o"), "--json"])
    assert result.exit_code == EXIT_USAGE
    assert result.stdout == ""
    assert f"{missing}: no such file" in result.stderr
    assert "Traceback" not in result.stderr


def test_debug_env_shows_traceback(tmp_path) -> None:
    missing = tmp_path / "nope.jsonl"
    env = {**os.environ, "MMPREP_DEBUG": "1"}
    out = subprocess.run([sys.executable, "-m", "mmprep", "pack", str(missing), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, env=env)
    assert out.returncode == EXIT_USAGE
    assert "Traceback" in out.stderr and "no such file" in out.stderr
    assert out.stdout == ""


def test_unknown_flag_is_usage_error() -> None:
    result = runner.invoke(app, ["pack", "--no-such-flag"])
    assert result.exit_code == EXIT_USAGE
    assert result.stdout == ""


def test_stdin_manifest_in_a_pipeline(tmp_path) -> None:
    manifest = SAMPLE_MANIFEST.read_text().splitlines()[:3]
    text = "\n".join(manifest) + "\n"
    out = tmp_path / "o"
    result = runner.invoke(app, ["pack", "-", "--out", str(out), "--image-root", str(SAMPLE), "--image-size", "32",
                                 "--workers", "1", "--json"], input=text)
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["read"] == 3 and report["written"] == 3


# -- config keys are flag names ------------------------------------------------------------------------------------


def _pack_args(out: Path, *extra: str) -> list[str]:
    return ["pack", str(SAMPLE_MANIFEST), "--out", str(out), "--image-size", "32", "--tokenizer", str(CLIP),
            "--vocab", str(SAMPLE / "ram_tag_list.txt"), "--workers", "1", *extra]


def test_config_json_key_is_the_flag_name(tmp_path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[pack]\njson = true\n")
    result = runner.invoke(app, ["--config", str(cfg), *_pack_args(tmp_path / "o")])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["read"] == 18 and report["written"] + report["rejected"] == 18


def test_config_unknown_key_hint_lists_flag_names(tmp_path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[pack]\njsn = true\n")
    result = runner.invoke(app, ["--config", str(cfg), *_pack_args(tmp_path / "o")])
    assert result.exit_code == EXIT_USAGE
    assert "[pack] has unknown key 'jsn'" in result.stderr
    hint = next(line for line in result.stderr.splitlines() if line.startswith("hint: valid keys:"))
    keys = hint.removeprefix("hint: valid keys:").replace(" ", "").split(",")
    assert {"json", "quiet", "verbose", "image-size", "limit-images", "shuffle"} <= set(keys)
    assert not [k for k in keys if k.endswith(("-", "_"))], keys


def test_config_keys_accept_underscores(tmp_path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[pack]\nimage_size = "not-a-size"\n')
    result = runner.invoke(app, ["--config", str(cfg), "pack", str(SAMPLE_MANIFEST), "--out", str(tmp_path / "o")])
    assert result.exit_code == EXIT_USAGE
    assert "not-a-size" in result.stderr  # the config value reached --image-size (and was rejected there)


# -- --quiet and --verbose -----------------------------------------------------------------------------------------


def test_quiet_success_leaves_stderr_empty(tmp_path) -> None:
    loud = runner.invoke(app, _pack_args(tmp_path / "loud"))
    assert loud.exit_code == 0 and loud.stderr.strip(), "without -q, pack reports on stderr"
    quiet = runner.invoke(app, _pack_args(tmp_path / "o", "-q", "--json"))
    assert quiet.exit_code == 0, quiet.stderr
    assert quiet.stderr == ""
    assert json.loads(quiet.stdout)["rejected"] == 3  # rejected rows are data, not warnings
    verify = runner.invoke(app, ["verify", str(tmp_path / "o"), "-q"])
    assert verify.exit_code == 0 and verify.stderr == "" and verify.stdout == ""


def test_quiet_keeps_warnings_but_drops_tables() -> None:
    loud = runner.invoke(app, ["image-stats", str(SAMPLE / "images"), "--workers", "1"])
    quiet = runner.invoke(app, ["image-stats", str(SAMPLE / "images"), "--workers", "1", "-q"])
    assert loud.exit_code == quiet.exit_code == 0
    assert "Per-channel statistics" in loud.stderr
    lines = quiet.stderr.splitlines()
    assert lines == [line for line in loud.stderr.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1 and "coffee_truncated.jpg" in lines[0]


def test_verbose_names_the_config_defaults(tmp_path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[pack]\nlimit-images = 2\njson = true\n')
    args = ["--config", str(cfg), *_pack_args(tmp_path / "o", "--overwrite")]
    plain = runner.invoke(app, args)
    verbose = runner.invoke(app, [*args, "-v"])
    assert plain.exit_code == verbose.exit_code == 0, verbose.stderr
    line = f"defaults from {cfg} [pack]: limit-images=2, json=True (flags given here win)"
    assert line in verbose.stderr.splitlines()
    assert "defaults from" not in plain.stderr
    assert json.loads(verbose.stdout)["read"] == 18


def test_help_shows_no_type_for_flags() -> None:
    cmds = [None, *(cmd.name for cmd in app.registered_commands)]
    for name in cmds:
        result = runner.invoke(app, [name, "--help"] if name else ["--help"])
        assert result.exit_code == 0
        assert "--help" in result.stdout and "<bool>" not in result.stdout, name
    pack_help = runner.invoke(app, ["pack", "--help"]).stdout
    assert "--json" in pack_help and "--quiet" in pack_help and "--no-shuffle" in pack_help
    assert re.search(r"--limit-images\s+N\s", pack_help)  # options that take a value show what it is


# -- an install without torch (what `make demo` creates) ---------------------------------------------------------


def _env_without_torch(tmp_path: Path) -> dict[str, str]:
    """Environment for a subprocess that cannot import torch, as in an install without the embed extra."""
    block = tmp_path / "no_torch"
    block.mkdir()
    (block / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "TRANSFORMERS_VERBOSITY", "MMPREP_NO_PROGRESS")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(block), env.get("PYTHONPATH")) if p)
    return env


def test_no_torch_quiet_runs_print_nothing_on_stderr(tmp_path) -> None:
    env = _env_without_torch(tmp_path)
    # The premise: without torch, importing transformers prints an advisory on stderr.
    control = subprocess.run([sys.executable, "-c", "import transformers"], capture_output=True, text=True,
                             env=env, cwd=REPO)
    assert control.returncode == 0 and "PyTorch was not found" in control.stderr
    assert subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, env=env).returncode != 0

    pack = subprocess.run([sys.executable, "-m", "mmprep", *_pack_args(tmp_path / "o", "-q", "--json")],
                          capture_output=True, text=True, env=env, cwd=REPO)
    assert pack.returncode == 0, pack.stderr
    assert pack.stderr == ""
    assert json.loads(pack.stdout)["written"] == 15

    tok = subprocess.run([sys.executable, "-m", "mmprep", "tokenize", str(SAMPLE_MANIFEST), "--tokenizer", str(CLIP),
                          "--max-length", "77", "--out", str(tmp_path / "t.parquet"), "-q"],
                         capture_output=True, text=True, env=env, cwd=REPO)
    assert tok.returncode == 0, tok.stderr
    assert tok.stderr == "" and tok.stdout == ""


# -- progress bars: on a terminal only ---------------------------------------------------------------------------

BAR = rb"pack:\s+\d+%\|"  # tqdm's bar for `pack` (description, percentage, bar)


def _pack_with_stderr(tmp_path: Path, *extra: str, tty: bool, env: dict[str, str] | None = None) -> tuple[bytes, bytes]:
    """Run pack in a subprocess with stderr on a pseudo-terminal (or a pipe); return (stdout, stderr) bytes."""
    env = env if env is not None else {k: v for k, v in os.environ.items() if k != "MMPREP_NO_PROGRESS"}
    out_file = tmp_path / "stdout.json"
    cmd = [sys.executable, "-m", "mmprep", *_pack_args(tmp_path / "o", "--overwrite", *extra)]
    with out_file.open("wb") as stdout:
        if not tty:
            proc = subprocess.run(cmd, stdout=stdout, stderr=subprocess.PIPE, env=env, cwd=REPO)
            assert proc.returncode == 0, proc.stderr
            return out_file.read_bytes(), proc.stderr
        master, slave = pty.openpty()
        # A terminal 24 rows by 100 columns (a fresh pty has 0 columns, where tqdm draws nothing).
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
        try:
            child = subprocess.Popen(cmd, stdout=stdout, stderr=slave, env=env, cwd=REPO)
            os.close(slave)
            chunks = []
            while select.select([master], [], [], 300)[0]:  # a guard against a hung child, not a timing check
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every writer of the terminal has exited
                    break
                if not data:
                    break
                chunks.append(data)
            assert child.wait() == 0, b"".join(chunks)
        finally:
            os.close(master)
    return out_file.read_bytes(), b"".join(chunks)


def test_progress_bar_on_a_terminal_stderr(tmp_path) -> None:
    stdout, stderr = _pack_with_stderr(tmp_path, "--json", tty=True)
    assert re.search(BAR, stderr), stderr[-2000:]
    assert json.loads(stdout)["written"] == 15  # stdout holds the report and nothing else


def test_no_progress_bar_on_a_pipe_with_quiet_or_env(tmp_path) -> None:
    stdout, stderr = _pack_with_stderr(tmp_path, tty=False)
    assert not re.search(BAR, stderr) and b"\r" not in stderr
    assert b"rejected-train.jsonl" in stderr and stdout == b""  # the human report is on stderr, stdout stays empty

    stdout, stderr = _pack_with_stderr(tmp_path, "-q", "--json", tty=True)
    assert stderr == b""
    assert json.loads(stdout)["written"] == 15

    env = {**os.environ, "MMPREP_NO_PROGRESS": "1"}
    stdout, stderr = _pack_with_stderr(tmp_path, tty=True, env=env)
    assert not re.search(BAR, stderr) and b"rejected-train.jsonl" in stderr  # the report still shows, the bar does not
    assert stdout == b""
