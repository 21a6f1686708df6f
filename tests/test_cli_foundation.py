"""CLI conventions shared by every command: version, help, lazy heavy imports, config files, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from mmprep import __version__
from mmprep.cli import app
from mmprep.errors import EXIT_USAGE

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
    manifest = Path("sample_data/manifest.jsonl").read_text().splitlines()[:3]
    text = "\n".join(manifest) + "\n"
    out = tmp_path / "o"
    result = runner.invoke(app, ["pack", "-", "--out", str(out), "--image-root", "sample_data", "--image-size", "32",
                                 "--workers", "1", "--json"], input=text)
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["read"] == 3 and report["written"] == 3
