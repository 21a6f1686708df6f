"""CLI conventions shared by every command: version, help, lazy heavy imports, config files, errors."""

from __future__ import annotations

import json
import subprocess
import sys

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
    result = runner.invoke(app, ["--config", str(cfg), "--help"])
    # --help is eager and exits before the config is read; use a real subcommand below when present.
    assert result.exit_code == 0
    names = [c.name for c in app.registered_commands]
    if names:
        result = runner.invoke(app, ["--config", str(cfg), names[0], "--help"])
        assert result.exit_code == EXIT_USAGE
        assert "unknown section [no-such-command]" in result.stderr
        assert result.stdout == ""


def test_config_file_invalid_toml(tmp_path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[pack\n")
    names = [c.name for c in app.registered_commands]
    if not names:
        return
    result = runner.invoke(app, ["--config", str(cfg), names[0], "--help"])
    assert result.exit_code == EXIT_USAGE
    assert "invalid TOML" in result.stderr
    assert json.dumps({}) not in result.stdout
