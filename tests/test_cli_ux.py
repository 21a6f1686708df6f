"""The command line as people use it (issue 20): first runs that stop early with the way out, progress that says
what is happening, Ctrl-C that says how to continue, help grouped in panels, shell completion, messages that read
as sentences, tables that keep their width in a pipe, and an install without warnings."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmprep.cli import app
from mmprep.errors import EXIT_OK

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data"
CLIP = SAMPLE / "tokenizers" / "clip"

runner = CliRunner()


# -- 8. the package metadata -------------------------------------------------------------------------------------


def test_pyproject_license_is_an_spdx_string_that_setuptools_applies_without_warnings() -> None:
    """setuptools (the build backend) reads pyproject.toml as `pip install .` does: no deprecation warning (a TOML
    table for `project.license` is deprecated and fails from 2027), and the build requires a setuptools that
    knows SPDX license expressions (77)."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "Apache-2.0"
    (req,) = [Requirement(r) for r in meta["build-system"]["requires"] if r.startswith("setuptools")]
    lowest = min(Version(s.version) for s in req.specifier if s.operator in (">=", "=="))
    assert lowest >= Version("77"), req
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning setuptools gives while applying the file fails the test
        dist = apply_configuration(Distribution(), REPO / "pyproject.toml")
    assert dist.metadata.license_expression == "Apache-2.0"


# -- 6. messages and tables --------------------------------------------------------------------------------------


def test_tables_keep_their_width_in_a_pipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """stderr is not a terminal here: a long file name in a table is shown whole on one line, not cut to 80
    columns (`ram_tag_...`)."""
    monkeypatch.delenv("COLUMNS", raising=False)
    name = "ram_tag_annotations_for_the_training_split_of_a_very_long_named_dataset_v2.jsonl"
    ann = tmp_path / name
    ann.write_text((SAMPLE / "manifest.jsonl").read_text())
    result = runner.invoke(app, ["audit-labels", "--vocab", str(SAMPLE / "ram_tag_list.txt"), str(ann)])
    assert result.exit_code == EXIT_OK, result.stderr
    line = next(ln for ln in result.stderr.splitlines() if name[:20] in ln)
    assert str(ann) in line and "…" not in line
    assert len(line) > 80


def test_tables_wrap_long_cells_where_the_width_is_set(tmp_path: Path) -> None:
    """With COLUMNS (or a narrow terminal) a cell too wide wraps onto the next lines: every character stays."""
    name = "ram_tag_annotations_for_the_training_split_of_a_very_long_named_dataset_v2.jsonl"
    ann = tmp_path / name
    ann.write_text((SAMPLE / "manifest.jsonl").read_text())
    result = runner.invoke(app, ["audit-labels", "--vocab", str(SAMPLE / "ram_tag_list.txt"), str(ann)],
                           env={"COLUMNS": "60"})
    assert result.exit_code == EXIT_OK, result.stderr
    lines = result.stderr.splitlines()
    assert max(len(ln) for ln in lines if ln.startswith(("│", "┃", "┏", "└"))) <= 60
    start = next(i for i, ln in enumerate(lines) if "Annotation files" in ln)
    cells = "".join(ln.split("│")[1].strip() for ln in lines[start:] if ln.startswith("│") and ln.count("│") > 2)
    assert str(ann) in cells
