"""The command line as people use it (issue 20): first runs that stop early with the way out, progress that says
what is happening, Ctrl-C that says how to continue, help grouped in panels, shell completion, messages that read
as sentences, tables that keep their width in a pipe, and an install without warnings."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmprep.cli import app
from mmprep.errors import EXIT_OK, EXIT_USAGE

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


# -- 1. a first run whose image paths are relative to another folder ---------------------------------------------


def _split_layout(tmp_path: Path, rows: int, missing_every: int = 0) -> tuple[Path, Path]:
    """Images under data/images/, the manifest in ann/ naming them `images/<name>` (relative to data/, not to the
    manifest's folder): the usual first-run mistake. Returns (manifest, data folder)."""
    from PIL import Image

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    for k in range(4):
        Image.new("RGB", (24, 16), (40 * k, 90, 200)).save(data / "images" / f"img{k}.png")
    ann = tmp_path / "ann"
    ann.mkdir()
    manifest = ann / "m.jsonl"
    with manifest.open("w") as f:
        for i in range(rows):
            name = "gone.png" if missing_every and i % missing_every == 0 else f"img{i % 4}.png"
            f.write(json.dumps({"id": f"r{i}", "images": [f"images/{name}"], "text": f"row {i}"}) + "\n")
    return manifest, data


def _pack(manifest: Path, out: Path, *extra: str) -> object:
    return runner.invoke(app, ["pack", str(manifest), "--out", str(out), "--image-size", "16", "--workers", "1",
                               *extra])


def test_most_first_images_missing_stops_before_any_work_naming_where_it_looked(tmp_path: Path) -> None:
    manifest, data = _split_layout(tmp_path, rows=100)
    out = tmp_path / "out"
    result = _pack(manifest, out)
    assert result.exit_code == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: ")
    # the root it used and how it was chosen, one path it tried, and the flag that sets the root
    assert f"under {manifest.parent} (the manifest's folder)" in lines[0]
    assert f"{manifest.parent / 'images' / 'img0.png'} does not exist" in lines[0]
    assert "20 of the first 20 rows" in lines[0] and "nothing was written" in lines[0]
    assert "--image-root" in lines[1] and "--no-image-check" in lines[1]
    assert not out.exists()  # found before the output folder was made

    # the way out it names works
    fixed = _pack(manifest, out, "--image-root", str(data), "--json")
    assert fixed.exit_code == 0, fixed.stderr
    assert json.loads(fixed.stdout)["written"] == 100


def test_a_root_given_with_image_root_is_named_as_such(tmp_path: Path) -> None:
    manifest, data = _split_layout(tmp_path, rows=30)
    result = _pack(manifest, tmp_path / "out", "--image-root", str(data / "images"))
    assert result.exit_code == 1
    assert f"under {data / 'images'} (--image-root)" in result.stderr
    assert str(data / "images" / "images" / "img0.png") in result.stderr


def test_some_missing_images_do_not_stop_the_run(tmp_path: Path) -> None:
    """Two of every five first images missing (not most): the run goes on and rejects those rows."""
    manifest, data = _split_layout(tmp_path, rows=40, missing_every=1)
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(ln if i % 5 in (1, 3) else ln.replace("gone.png", f"img{i % 4}.png")
                                  for i, ln in enumerate(lines)) + "\n")
    result = _pack(manifest, tmp_path / "out", "--image-root", str(data), "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["rejected_by_reason"] == {"image_missing": 16} and report["written"] == 24


@pytest.mark.parametrize("workers", ["1", "2"])
def test_an_all_rejected_run_leaves_no_shard_files(tmp_path: Path, workers: str) -> None:
    """--no-image-check packs anyway: every row is rejected, the rejects file holds them all, and the chunks' empty
    shards are not left behind (nor their resume records); the hint names --image-root."""
    manifest, _ = _split_layout(tmp_path, rows=100)
    out = tmp_path / "out"
    result = runner.invoke(app, ["pack", str(manifest), "--out", str(out), "--image-size", "16", "--workers",
                                 workers, "--no-image-check", "--rows-per-shard", "10"])
    assert result.exit_code == 1, result.stderr
    assert "no row was written: all 100 rows were rejected (image_missing 100)" in result.stderr
    assert "--image-root" in result.stderr.splitlines()[-1]
    assert sorted(p.name for p in out.iterdir()) == [".mmprep", "rejected-train.jsonl", "run-stats-train.json"]
    assert len((out / "rejected-train.jsonl").read_text().splitlines()) == 100
    assert not [p for p in (out / ".mmprep").rglob("*.json") if p.parent.name == "chunks"]


def test_a_small_input_is_packed_and_its_hint_names_image_root(tmp_path: Path) -> None:
    """Fewer rows than the look-ahead judges: packed (quick), all rejected, and the hint says where to look."""
    manifest, _ = _split_layout(tmp_path, rows=5)
    out = tmp_path / "out"
    result = _pack(manifest, out)
    assert result.exit_code == 1
    assert "all 5 rows were rejected (image_missing 5)" in result.stderr
    assert "relative to --image-root" in result.stderr
    assert not list(out.glob("shard-*"))


# -- 3. Ctrl-C says how to continue (the interrupted runs themselves: test_kill_resume, test_pack_ray_interrupt) ---


def test_the_interrupted_hint_fits_how_the_run_was_started() -> None:
    from mmprep.cli.cmd_pack import _resume_hint

    assert _resume_hint("m.jsonl", resume=False, overwrite=False).endswith("run the same command with --resume")
    # rerunning with --overwrite would delete the finished shards: the hint says to swap it for --resume
    assert _resume_hint("m.jsonl", resume=False, overwrite=True).endswith("with --resume instead of --overwrite")
    assert _resume_hint("m.jsonl", resume=True, overwrite=False).endswith("run the same command again to continue")
    assert "needs the manifest as a file" in _resume_hint("-", resume=False, overwrite=False)


# -- 2. progress: phases while nothing counts, rows and images as they finish, the true totals at the end --------


def _run_on_a_terminal(cmd: list[str], cwd: Path) -> tuple[int, bytes, bytes]:
    """Run ``cmd`` with stderr on a pseudo-terminal 120 columns wide; returns (exit code, stdout, stderr bytes)."""
    import fcntl
    import os
    import pty
    import select
    import struct
    import subprocess
    import termios

    env = {k: v for k, v in os.environ.items() if k not in ("MMPREP_NO_PROGRESS", "COLUMNS")}
    out_file = cwd / "stdout.txt"
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    chunks = []
    try:
        with out_file.open("wb") as stdout:
            child = subprocess.Popen(cmd, stdout=stdout, stderr=slave, env=env, cwd=cwd)
        os.close(slave)
        while select.select([master], [], [], 300)[0]:  # a guard against a hung child, not a timing check
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer of the terminal has exited
                break
            if not data:
                break
            chunks.append(data)
        code = child.wait()
    finally:
        os.close(master)
    return code, out_file.read_bytes(), b"".join(chunks)


def _frames(stderr: bytes) -> list[str]:
    """The frames tqdm drew (each starts with a carriage return), escape sequences removed."""
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", stderr.decode("utf-8", "replace"))
    return [f.strip() for f in re.split(r"[\r\n]", text) if f.strip().startswith("pack:")]


def _big_images_manifest(root: Path, rows: int) -> Path:
    """Rows over four 1024x768 noise PNGs: each row takes a noticeable time to decode."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for k in range(4):
        Image.fromarray(rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8)).save(root / f"big{k}.png")
    manifest = root / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"r{i}", "images": [f"big{i % 4}.png"], "text": f"row {i} <image>"})
                                + "\n" for i in range(rows)))
    return manifest


def test_progress_shows_phases_counts_rows_within_chunks_and_ends_on_the_true_totals(tmp_path: Path) -> None:
    import sys

    manifest = _big_images_manifest(tmp_path, rows=64)
    cmd = [sys.executable, "-m", "mmprep", "pack", str(manifest), "--out", str(tmp_path / "out"), "--image-size",
           "32", "--tokenizer", str(CLIP), "--workers", "2", "--rows-per-shard", "32", "--json"]
    code, stdout, stderr = _run_on_a_terminal(cmd, tmp_path)
    assert code == 0, stderr[-3000:]
    report = json.loads(stdout)
    frames = _frames(stderr)
    assert frames, stderr[-2000:]
    # what happens while nothing counts yet, in order, before the first row is counted
    counted = next(i for i, f in enumerate(frames) if re.search(r"\b[1-9]\d*/64\b", f))
    phases = [p for p in ("reading the manifest", "loading the tokenizer", "starting 2 workers")
              if any(p in f for f in frames[:counted])]
    assert phases == ["reading the manifest", "loading the tokenizer", "starting 2 workers"], frames[:counted]
    # rows and images counted as they finish: counts inside a chunk of 32 rows show up
    seen = {int(m.group(1)) for f in frames if (m := re.search(r"\b(\d+)/64\b", f))}
    assert seen - {0, 32, 64}, seen
    assert any(re.search(r"images=[1-9]", f) for f in frames[:-1])
    # the last frame is left on the terminal with the true totals
    last = frames[-1]
    assert f"{report['read']}/{report['read']}" in last and "100%" in last, last
    assert f"images={report['images_written']}" in last, last
    assert report["images_written"] == 64


def test_phases_are_debug_lines_with_verbose_where_no_bar_is_drawn(tmp_path: Path) -> None:
    manifest, data = _split_layout(tmp_path, rows=10)
    result = _pack(manifest, tmp_path / "out", "--image-root", str(data), "--tokenizer", str(CLIP), "-v")
    assert result.exit_code == 0, result.stderr
    lines = [ln.split(" (")[0] for ln in result.stderr.splitlines() if ln.startswith("pack: ")]
    assert lines == ["pack: reading the manifest", "pack: loading the tokenizer", "pack: packing the first rows"]
    quiet = _pack(manifest, tmp_path / "out2", "--image-root", str(data), "--tokenizer", str(CLIP))
    assert "reading the manifest" not in quiet.stderr


# -- 4. help: panels, metavars, choices; served from the cache once drawn (timings: benchmarks/bench_cli.py) -------


def _panels(page: str) -> dict[str, list[str]]:
    """Panel title -> the option names listed in it (first long flag of each row)."""
    panels: dict[str, list[str]] = {}
    current = None
    for line in page.splitlines():
        if m := re.match(r"╭─ (.+?) ─", line):
            current = m.group(1)
            panels[current] = []
        elif current and (m := re.match(r"│\s+(?:\*\s+)?(--[a-z][a-z-]*)", line)):
            panels[current].append(m.group(1))
    return panels


def test_pack_help_groups_its_options_in_panels_with_the_common_ones_first() -> None:
    from mmprep.cli._options import IMAGE_OPTION_NAMES, PANELS

    result = runner.invoke(app, ["pack", "--help"], env={"COLUMNS": "160"})
    assert result.exit_code == EXIT_OK
    panels = _panels(result.stdout)
    assert list(panels) == ["Arguments", *PANELS]  # no catch-all "Options" panel
    assert PANELS == ("Input", "Images", "Text and tags", "Output", "Run")
    images = panels["Images"]
    # every image option in the one panel: the decoding/resizing ones shared with image-stats, and pack's own
    shared = {"--" + name.replace("_", "-") for name in IMAGE_OPTION_NAMES}
    image_options = shared | {"--limit-images", "--pad", "--norm", "--dtype", "--layout", "--mean", "--std",
                              "--stats-file", "--too-many-images", "--encode-format", "--quality"}
    assert image_options <= set(images)
    assert not image_options & {o for name, opts in panels.items() if name != "Images" for o in opts}
    assert images[:4] == ["--image-size", "--resize-mode", "--limit-images", "--too-many-images"]
    assert panels["Input"][0] == "--image-root" and panels["Output"][0] == "--out"
    assert panels["Text and tags"][:2] == ["--tokenizer", "--max-length"]
    assert panels["Run"][:2] == ["--workers", "--engine"] and panels["Run"][-4:] == ["--json", "--quiet",
                                                                                    "--verbose", "--help"]
    assert sum(len(v) for v in panels.values()) == len({o for v in panels.values() for o in v})  # each once


def test_choices_show_as_choices_and_values_as_what_they_are() -> None:
    page = runner.invoke(app, ["pack", "--help"], env={"COLUMNS": "200"}).stdout
    rows = {m.group(1): m.group(2) for m in re.finditer(r"│\s+(?:\*\s+)?(--[a-z-]+)(?:\s+--no-[a-z-]+|\s+-\w)?\s+(\S+)",
                                                         page)}
    assert rows["--compression"] == "zstd|lz4|snappy|none"
    assert rows["--on-error"] == "skip|fail" and rows["--engine"] == "local|ray"
    assert rows["--resize-mode"].startswith("stretch|center-crop|letterbox")
    assert rows["--caption"] == "first|all|random" and rows["--pad"] == "max|none"
    assert rows["--workers"] == "N" and rows["--out"] == "DIR|URI" and rows["--tokenizer"] == "DIR"
    assert "<str>" not in "".join(ln for ln in page.splitlines() if "--" in ln)  # no option shows a bare type


def test_usage_lines_name_arguments_alike_in_every_command() -> None:
    usages = {}
    for cmd in app.registered_commands:
        page = runner.invoke(app, [cmd.name, "--help"], env={"COLUMNS": "200"}).stdout
        usages[cmd.name] = next(ln.strip() for ln in page.splitlines() if "Usage:" in ln)
    assert usages["pack"] == "Usage: mmprep pack [OPTIONS] MANIFEST"
    assert usages["tokenize"] == "Usage: mmprep tokenize [OPTIONS] MANIFEST"
    assert usages["inspect"] == "Usage: mmprep inspect [OPTIONS] PATH"
    assert usages["audit-labels"] == "Usage: mmprep audit-labels [OPTIONS] [ANNOTATIONS]..."
    for usage in usages.values():
        assert "{" not in usage and not re.search(r"\[?[a-z_]+\]?(\.\.\.)?$", usage.split("[OPTIONS]")[1]), usage


def test_the_command_table_of_the_fast_path_matches_the_app() -> None:
    from mmprep.cli._fast import COMMANDS, MODULES

    registered = {cmd.name: cmd.callback.__module__ for cmd in app.registered_commands}
    assert registered == {name: f"mmprep.cli.{module}" for name, module in COMMANDS.items()}
    order = [registered[cmd.name] for cmd in app.registered_commands]
    assert [f"mmprep.cli.{m}" for m in MODULES] == list(dict.fromkeys(order))


@pytest.mark.parametrize(("argv", "env", "modules"), [
    (["pack", "m.jsonl", "--out", "o"], {}, ("cmd_pack",)),
    (["-v", "verify", "x"], {}, ("cmd_read",)),
    (["--config", "c.toml", "pack", "m.jsonl"], {}, None),  # the file's sections are checked against every command
    (["pack", "m.jsonl"], {"MMPREP_CONFIG": "c.toml"}, None),
    (["--help"], {}, None),
    (["pakc", "m.jsonl"], {}, None),  # click suggests the command meant
    ([], {"_MMPREP_COMPLETE": "complete_bash", "COMP_WORDS": "mmprep pack --re", "COMP_CWORD": "2"}, ("cmd_pack",)),
    ([], {"_MMPREP_COMPLETE": "complete_bash", "COMP_WORDS": "mmprep pa", "COMP_CWORD": "1"}, None),
    ([], {"_MMPREP_COMPLETE": "complete_zsh", "_TYPER_COMPLETE_ARGS": "mmprep tokenize --"}, ("cmd_text",)),
    ([], {"_MMPREP_COMPLETE": "complete_zsh", "_TYPER_COMPLETE_ARGS": "mmprep tokenize"}, None),
])
def test_a_run_imports_the_command_it_names_alone(monkeypatch: pytest.MonkeyPatch, argv: list[str],
                                                   env: dict[str, str], modules: tuple[str, ...] | None) -> None:
    from mmprep.cli._fast import MODULES, modules_for

    for name in ("MMPREP_CONFIG", "_MMPREP_COMPLETE", "COMP_WORDS", "COMP_CWORD", "_TYPER_COMPLETE_ARGS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert modules_for(argv) == (modules or MODULES)


def _mmprep(args: list[str], env: dict[str, str], report_modules: bool = False) -> tuple[int, str, str]:
    """Run the console entry point in a fresh interpreter; with ``report_modules`` stderr ends with a line listing
    the imported packages of interest."""
    import os
    import subprocess
    import sys

    code = ("import sys\nfrom mmprep.cli import main\nsys.argv = ['mmprep', *sys.argv[1:]]\nrc = 0\n"
            "try:\n    main()\nexcept SystemExit as e:\n    rc = e.code or 0\n")
    if report_modules:
        code += ("sys.stderr.write('MODULES ' + ' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
                 "('typer', 'rich', 'pydantic', 'click') or m.startswith('mmprep.cli.cmd_'))) + '\\n')\n")
    code += "sys.exit(rc)\n"
    full = {**{k: v for k, v in os.environ.items() if k not in ("COLUMNS", "MMPREP_NO_CACHE")}, **env}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=full, cwd=REPO)
    return proc.returncode, proc.stdout, proc.stderr


def test_help_pages_are_served_from_the_cache_once_drawn(tmp_path: Path) -> None:
    env = {"MMPREP_CACHE_DIR": str(tmp_path / "cache"), "COLUMNS": "100"}
    for args in (["--help"], ["pack", "--help"], ["tokenize", "-h"]):
        rc, first, err = _mmprep(args, env, report_modules=True)
        assert rc == 0 and "typer" in err.split("MODULES")[-1], err  # drawn by Typer the first time
        rc, again, err = _mmprep(args, env, report_modules=True)
        assert rc == 0 and again == first
        assert err.strip() == "MODULES", err  # then printed without importing Typer, Rich or any command
    pages = list((tmp_path / "cache" / "help").iterdir())
    assert len(pages) == 3
    # another width draws (and keeps) another page; the kept one is still right for its width
    rc, wide, _ = _mmprep(["pack", "--help"], {**env, "COLUMNS": "150"})
    assert rc == 0 and max(map(len, wide.splitlines())) > 100 >= max(map(len, first.splitlines()))
    assert len(list((tmp_path / "cache" / "help").iterdir())) == 4
    assert _mmprep(["tokenize", "-h"], env)[1] == first
    # what the first run of a page prints is what Typer prints (the app run in-process, not through main)
    assert runner.invoke(app, ["tokenize", "-h"], env={"COLUMNS": "100"}).stdout == first


def test_no_help_cache_without_a_cache_or_with_a_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[pack]\nlimit-images = 2\n")
    env = {"MMPREP_CACHE_DIR": str(tmp_path / "cache")}
    rc, out, _ = _mmprep(["pack", "--help"], {**env, "MMPREP_NO_CACHE": "1"})
    assert rc == 0 and "--limit-images" in out and not (tmp_path / "cache").exists()
    rc, out, _ = _mmprep(["pack", "--help"], {**env, "MMPREP_CONFIG": str(cfg)})
    assert rc == 0 and not (tmp_path / "cache").exists()
    row = out.split("--limit-images", 1)[1].split("│ --", 1)[0]
    assert "[default: 2]" in row  # the config file's value, not a kept page


def test_version_and_errors_on_the_fast_path(tmp_path: Path) -> None:
    from mmprep import __version__

    rc, out, err = _mmprep(["--version"], {}, report_modules=True)
    assert rc == 0 and out == f"mmprep {__version__}\n" and err.strip() == "MODULES"
    rc, _, err = _mmprep(["pakc", "--help"], {"MMPREP_CACHE_DIR": str(tmp_path)})
    assert rc == EXIT_USAGE and "No such command" in err
    assert not (tmp_path / "help").exists()


# -- 5. shell completion -------------------------------------------------------------------------------------------


def test_completion_options_are_offered() -> None:
    page = runner.invoke(app, ["--help"], env={"COLUMNS": "160"}).stdout
    assert "--install-completion" in page and "--show-completion" in page


def test_completion_scripts_install_and_answer(tmp_path: Path) -> None:
    rc, script, _ = _mmprep(["--show-completion", "bash"], {})
    assert rc == 0 and "_MMPREP_COMPLETE=complete_bash" in script and "complete -o default -F" in script
    rc, out, _ = _mmprep(["--install-completion", "bash"], {"HOME": str(tmp_path)})
    assert rc == 0 and "bash completion installed" in out
    assert "_mmprep_completion" in (tmp_path / ".bash_completions" / "mmprep.sh").read_text()
    assert "mmprep.sh" in (tmp_path / ".bashrc").read_text()

    def complete(words: str, **extra: str) -> list[str]:
        env = {"_MMPREP_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split()) - 1),
               **extra}
        rc, out, err = _mmprep([], env, report_modules=True)
        assert rc == 0, err
        return out.split()

    assert complete("mmprep pa") == ["pack"]
    assert complete("mmprep i") == ["image-stats", "inspect"]
    assert complete("mmprep pack --compr") == ["--compression"]
    assert complete("mmprep pack --compression z") == ["zstd"]
    assert complete("mmprep pack m.jsonl --resize-mode l") == ["letterbox"]
    assert complete("mmprep tokenize --max-l") == ["--max-length"]
    # every option with fixed values completes them, in every command (only pack's did)
    assert complete("mmprep embed-labels --pooling mea") == ["mean", "mean_sqrt_len"]
    assert complete("mmprep embed-labels --device c") == ["cpu", "cuda"]
    assert complete("mmprep normalize-images --layout H") == ["HWC"]
    assert complete("mmprep normalize-images --format j") == ["jpeg"]
    assert complete("mmprep image-stats --input-format pa") == ["parquet"]
    assert complete("mmprep tokenize --padding-side l") == ["left"]
    assert complete("mmprep tokenize --caption r") == ["random"]
    assert complete("mmprep audit-labels --format ram-text-") == ["ram-text-ids", "ram-text-names"]
    # zsh: values with their help
    rc, out, _ = _mmprep([], {"_MMPREP_COMPLETE": "complete_zsh", "_TYPER_COMPLETE_ARGS": "mmprep pack --on-error "})
    assert rc == 0 and '"skip"' in out and '"fail"' in out


def test_the_cli_lists_the_manifest_formats_the_reader_takes() -> None:
    from mmprep.cli._options import MANIFEST_FORMATS
    from mmprep.inputs.manifest import FORMATS

    assert MANIFEST_FORMATS == FORMATS


def test_a_completion_inside_a_command_imports_that_command_alone() -> None:
    env = {"_MMPREP_COMPLETE": "complete_bash", "COMP_WORDS": "mmprep pack --compr", "COMP_CWORD": "2"}
    rc, out, err = _mmprep([], env, report_modules=True)
    assert rc == 0 and out.split() == ["--compression"]
    loaded = err.split("MODULES")[-1].split()
    assert [m for m in loaded if m.startswith("mmprep.cli.cmd_")] == ["mmprep.cli.cmd_pack"]


# -- 7. pictures ---------------------------------------------------------------------------------------------------


def _boxes_overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _pack_rows(tmp_path: Path, rows: list[dict[str, object]], *extra: str) -> Path:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "packed"
    result = runner.invoke(app, ["pack", str(manifest), "--out", str(out), "--image-root", str(SAMPLE),
                                 "--workers", "1", "--no-placeholder-check", "-q", *extra])
    assert result.exit_code == 0, result.stderr
    return out


ONE_EACH = ["images/astronaut.jpg", "images/chelsea.jpg", "images/rocket.jpg", "images/camera.png",
            "images/coins.png", "images/coffee.jpg", "images/horse.png", "images/hubble_deep_field.jpg"]


@pytest.mark.parametrize("layout", [("--pad", "none"), ("--image-size", "24", "--limit-images", "1")],
                         ids=["pad-none", "one-small-slot"])
def test_contact_sheet_cards_never_run_into_each_other(tmp_path: Path, layout: tuple[str, ...]) -> None:
    """One narrow image per row (where each card's header used to run into the next column), long ids."""
    from mmprep.dataset.reader import PackedDataset
    from mmprep.dataset.sheet import contact_sheet

    rows = [{"id": f"sample-with-a-long-identifier-{i:04d}" + ("-and-then-some-more" * (i % 3)),
             "images": [ref], "text": f"caption {i}"} for i, ref in enumerate(ONE_EACH)]
    packed = _pack_rows(tmp_path, rows, "--tokenizer", str(CLIP), *layout)
    info = contact_sheet(PackedDataset(packed), tmp_path / "sheet.png", samples=8)
    assert len(info.cards) == 8
    for k, a in enumerate(info.cards):
        assert 0 <= a[0] < a[2] <= info.width and 0 <= a[1] < a[3] <= info.height, a
        for b in info.cards[k + 1:]:
            assert not _boxes_overlap(a, b), (a, b)
    columns = len({c[0] for c in info.cards})
    assert columns >= 3  # narrow cards: several to a sheet row, not a long single column


def test_contact_sheet_with_many_slots_per_row_stays_readable(tmp_path: Path) -> None:
    from mmprep.dataset.reader import PackedDataset
    from mmprep.dataset.sheet import contact_sheet

    long = "a long caption that goes on describing every detail of the scene " * 10
    rows = [{"id": f"r{i}", "images": ONE_EACH[: 2 + i], "text": long} for i in range(6)]
    packed = _pack_rows(tmp_path, rows, "--limit-images", "8", "--image-size", "64")
    info = contact_sheet(PackedDataset(packed), tmp_path / "sheet.png", samples=6)
    assert info.slot_px < 160 and info.width <= 1440  # eight slots shrink so that two cards fit side by side
    assert len({c[0] for c in info.cards}) == 2
    for k, a in enumerate(info.cards):
        assert a[2] <= info.width and a[3] <= info.height
        for b in info.cards[k + 1:]:
            assert not _boxes_overlap(a, b), (a, b)


def _window_boxes(fig: object) -> object:
    fig.canvas.draw()  # type: ignore[attr-defined]
    return fig.canvas.get_renderer()  # type: ignore[attr-defined]


@pytest.mark.parametrize("counts", [
    {10: 1, 12: 2, 13: 4, 16: 1, 17: 4, 18: 2, 20: 1, 29: 1, 33: 1},  # the sample manifest: tallest bar right of centre
    {5: 1, 60: 9, 61: 9, 62: 8},  # the tallest bars at the far right, where the legend used to be
])
def test_the_length_plot_legend_never_covers_a_bar(counts: dict[int, int]) -> None:
    pytest.importorskip("matplotlib")
    import numpy as np

    from mmprep.text.lengths import LengthHistogram, length_figure

    hist = LengthHistogram()
    hist.add(np.repeat(list(counts), list(counts.values())))
    fig = length_figure(hist, 16, title="a manifest — a tokenizer")
    renderer = _window_boxes(fig)
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent(renderer)
    bars = [b for b in (p.get_window_extent(renderer) for p in ax.patches) if b.height > 0]
    assert len(bars) >= 3
    assert not [b for b in bars if legend.overlaps(b)]
    assert legend.y0 >= ax.bbox.y1 - 1  # above the plot area, so no bar can ever be under it
    assert fig.bbox.contains(legend.x0, legend.y0) and fig.bbox.contains(legend.x1, legend.y1)  # not clipped
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0].startswith("max length 16") and labels[1].startswith("99% of rows fit in")


@pytest.mark.parametrize("annotations", ["few-used", "all-used"])
def test_the_audit_plot_labels_its_log_ticks_with_plain_numbers(annotations: str, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from mmprep.labels.audit import audit_labels
    from mmprep.labels.audit.outputs import frequency_figure

    if annotations == "few-used":  # 37 of the 4,585 RAM tags used, at most 5 times: ticks within one decade
        report = audit_labels(SAMPLE / "ram_tag_list.txt", [SAMPLE / "manifest.jsonl"])
    else:  # every tag of a small vocabulary used, 1 to 300 times
        vocab = tmp_path / "v.txt"
        vocab.write_text("\n".join(f"tag{k}" for k in range(40)) + "\n")
        rows = [{"id": f"r{i}", "tags": [f"tag{k}" for k in range(40) if i % (k + 1) == 0]} for i in range(300)]
        ann = tmp_path / "a.jsonl"
        ann.write_text("".join(json.dumps(r) + "\n" for r in rows))
        report = audit_labels(vocab, [ann])
    fig = frequency_figure(report)
    renderer = _window_boxes(fig)
    ax = fig.axes[0]
    for axis in (ax.xaxis, ax.yaxis):
        lo, hi = sorted(axis.get_view_interval())
        k = int(axis is ax.yaxis)
        shown = [t for t in axis.get_majorticklabels() if t.get_text() and lo <= t.get_position()[k] <= hi]
        assert len(shown) >= 2
        for t in shown:
            assert re.fullmatch(r"\d{1,3}(,\d{3})*", t.get_text()), t.get_text()  # 6, 20, 1,000: never 6x10^0
        assert not [t.get_text() for t in axis.get_minorticklabels() if t.get_text()]
    legend = ax.get_legend().get_window_extent(renderer)
    assert legend.y0 >= ax.bbox.y1 - 1  # above the plot: it hides no part of the curve
