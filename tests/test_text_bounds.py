"""Text is bounded before it is tokenised (issue 19, items 9, 13 and the text part of 22):

* ``--max-text-bytes`` (pack and tokenize, default 1 MiB): a row whose text, chosen caption(s), conversation or
  rendered conversation is larger is rejected as ``text_too_large`` with its line; every other row is written;
* a chat template that renders more than the cap is stopped there, and one that runs for ever is stopped after
  :data:`~mmprep.text.encoder.TEMPLATE_SECONDS` (``chat_template_timeout``), in the main thread and in others;
* a tokenizer folder whose tokenizer is a class of its own says so (and transformers never prompts).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from _text_helpers import CLIP_DIR, MINILM_DIR, REPO, build_bytelevel_bpe
from typer.testing import CliRunner

from mmprep.cli import app
from mmprep.errors import UsageError
from mmprep.text import encoder as encoder_mod
from mmprep.text.config import DEFAULT_MAX_TEXT_BYTES, TextConfig, TextError
from mmprep.text.encoder import TextEncoder

runner = CliRunner()
SAMPLE = REPO / "sample_data"
CAPTION = "A tabby cat looks sideways with its whiskers spread."


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bytelevel_bpe(tmp_path_factory.mktemp("llama"), llama_style=True)


def _with_template(base: Path, directory: Path, template: str) -> Path:
    """A copy of a tokenizer folder with another chat template."""
    shutil.copytree(base, directory)
    cfg = json.loads((directory / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg))
    return directory


def _rejects(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- item 9: --max-text-bytes ----------------------------------------------------------------------------------


def test_tokenize_rejects_a_huge_text_with_its_line_and_keeps_the_rest(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    rows = [{"id": "a", "text": CAPTION}, {"id": "big", "text": "word " * 400_000},  # 2 MB
            {"id": "c", "text": CAPTION}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "t.parquet"
    res = runner.invoke(app, ["tokenize", str(manifest), "--tokenizer", str(CLIP_DIR), "--max-length", "16",
                              "--out", str(out), "--json"])
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)
    assert (report["rows_in"], report["rows_written"], report["rows_rejected"]) == (3, 2, 1)
    assert report["config"]["max_text_bytes"] == DEFAULT_MAX_TEXT_BYTES == 1 << 20
    (rej,) = _rejects(out.with_name(out.name + ".rejected.jsonl"))
    assert (rej["line"], rej["id"], rej["stage"], rej["reason"]) == (2, "big", "text", "text_too_large")
    assert rej["detail"] == f"{manifest}:2: the text is 2,000,000 characters, above --max-text-bytes 1,048,576"
    assert pq.read_table(out).column("id").to_pylist() == ["a", "c"]


def test_the_cap_counts_utf8_bytes_and_is_a_flag_of_both_commands(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    wide = "é" * 30_000  # 30,000 characters, 60,000 bytes
    rows = [{"id": "narrow", "text": "e" * 30_000}, {"id": "wide", "text": wide},
            {"id": "captions", "text": ["x" * 40_000, "y" * 40_000]}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "t.parquet"
    res = runner.invoke(app, ["tokenize", str(manifest), "--tokenizer", str(MINILM_DIR), "--max-length", "8",
                              "--out", str(out), "--max-text-bytes", "50KB", "--caption", "all"])
    assert res.exit_code == 0, res.stderr
    rejects = _rejects(out.with_name(out.name + ".rejected.jsonl"))
    assert [(r["id"], r["reason"]) for r in rejects] == [("wide", "text_too_large"), ("captions", "text_too_large")]
    assert "the text is 60,000 bytes, above --max-text-bytes 50,000" in rejects[0]["detail"]
    assert "the text of the joined captions is 80,001 characters" in rejects[1]["detail"]
    cfg = tmp_path / "c.toml"  # the same flag from a config file
    cfg.write_text('[tokenize]\nmax-text-bytes = "100KB"\n')
    res = runner.invoke(app, ["--config", str(cfg), "tokenize", str(manifest), "--tokenizer", str(MINILM_DIR),
                              "--max-length", "8", "--out", str(out), "--caption", "all", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["rows_rejected"] == 0


@pytest.mark.parametrize("value,says", [
    ("0", "--max-text-bytes must be 1 to 1,073,741,824 (1 GiB), got 0"),
    ("2GiB", "--max-text-bytes must be 1 to 1,073,741,824 (1 GiB), got 2,147,483,648"),
    ("lots", "--max-text-bytes: cannot read 'lots' as a size"),
])
def test_bad_caps_are_usage_errors(tmp_path: Path, value: str, says: str) -> None:
    for command in (["tokenize", str(SAMPLE / "manifest.jsonl"), "--tokenizer", str(CLIP_DIR), "--max-length", "8",
                     "--out", str(tmp_path / "t.parquet")],
                    ["pack", str(SAMPLE / "manifest.jsonl"), "--out", str(tmp_path / "o")]):
        res = runner.invoke(app, [*command, "--max-text-bytes", value])
        assert res.exit_code == 2 and says in res.stderr, res.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "t.parquet").exists()
    with pytest.raises(UsageError):
        TextConfig(max_text_bytes=True).validate()  # type: ignore[arg-type]


def test_pack_rejects_huge_texts_with_and_without_a_tokenizer(tmp_path: Path) -> None:
    lines = (SAMPLE / "manifest.jsonl").read_text().splitlines()[:3]
    big = json.loads(lines[1])
    big["text"] = "meow " * 300_000  # 1.5 MB
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join([lines[0], json.dumps(big), lines[2]]) + "\n")
    for name, extra in (("tok", ["--tokenizer", str(CLIP_DIR), "--max-length", "16"]), ("raw", [])):
        out = tmp_path / name
        res = runner.invoke(app, ["pack", str(manifest), "--out", str(out), "--image-root", str(SAMPLE),
                                  "--image-size", "32", "--workers", "1", *extra, "--json"])
        assert res.exit_code == 0, res.stderr
        report = json.loads(res.stdout)
        assert (report["read"], report["written"], report["rejected"]) == (3, 2, 1)  # nothing lost
        (rej,) = _rejects(out / "rejected-train.jsonl")
        assert (rej["line"], rej["id"], rej["reason"]) == (2, "s002", "text_too_large")


def test_a_chat_template_that_renders_50_mb_is_stopped_at_the_cap(llama_dir: Path, tmp_path: Path) -> None:
    tok = _with_template(llama_dir, tmp_path / "tok",
                         "{% for i in range(100000) %}{{ messages[0]['content'] }}{% endfor %}")
    enc = TextEncoder(tok, TextConfig(max_length=16))
    start = time.monotonic()
    with pytest.raises(TextError) as info:
        enc.render([{"role": "user", "content": "x" * 500}])  # 50 MB if rendered in full
    assert time.monotonic() - start < 5
    assert info.value.reason == "text_too_large"
    assert info.value.detail == ("the chat template rendered more than 1,048,576 characters (stopped there), above "
                                 "--max-text-bytes 1,048,576")
    # A conversation whose turns alone are over the cap is rejected before the template runs.
    normal = TextEncoder(llama_dir, TextConfig(max_length=16, max_text_bytes=1000))
    with pytest.raises(TextError, match="the conversation's text is 1,200 characters"):
        normal.render([{"role": "user", "content": "y" * 600}, {"role": "assistant", "content": "z" * 600}])
    assert normal.render([{"role": "user", "content": "hi"}]) == "<|user|>\nhi</s>\n"


# -- item 13: a chat template that does not end ------------------------------------------------------------------

_FOREVER = ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
            "{{ messages[0]['content'] }}")


def test_nested_range_loops_are_stopped_and_the_row_rejected(llama_dir: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(encoder_mod, "TEMPLATE_SECONDS", 0.5)
    trace_before = sys.gettrace()
    tok = _with_template(llama_dir, tmp_path / "tok", _FOREVER)
    manifest = tmp_path / "m.jsonl"
    rows = [{"id": "plain", "text": CAPTION}, {"id": "chat", "text": [{"from": "human", "value": "hi"}]},
            {"id": "plain2", "text": CAPTION}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "t.parquet"
    start = time.monotonic()
    res = runner.invoke(app, ["tokenize", str(manifest), "--tokenizer", str(tok), "--max-length", "16", "--out",
                              str(out), "--json"])
    assert time.monotonic() - start < 30
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["rows_written"] == 2
    (rej,) = _rejects(out.with_name(out.name + ".rejected.jsonl"))
    assert (rej["line"], rej["reason"]) == (2, "chat_template_timeout")
    assert "the chat template ran longer than 0.5 s" in rej["detail"]
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # no timer left behind
    assert sys.gettrace() is trace_before


def test_the_bounds_hold_outside_the_main_thread(llama_dir: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(encoder_mod, "TEMPLATE_SECONDS", 0.5)
    forever = TextEncoder(_with_template(llama_dir, tmp_path / "f", _FOREVER), TextConfig(max_length=16))
    big = TextEncoder(_with_template(llama_dir, tmp_path / "b", "{% for i in range(100000) %}{{ messages[0]['content'] "
                                     "}}{% endfor %}"), TextConfig(max_length=16))
    normal = TextEncoder(llama_dir, TextConfig(max_length=16))
    results: dict[str, object] = {}

    def work() -> None:
        before = sys.gettrace()
        for name, enc in (("forever", forever), ("big", big), ("normal", normal)):
            try:
                results[name] = enc.render([{"role": "user", "content": "x" * 500}])
            except TextError as exc:
                results[name] = exc.reason
        results["trace restored"] = sys.gettrace() is before

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(60)
    assert not thread.is_alive()
    assert results == {"forever": "chat_template_timeout", "big": "text_too_large",
                       "normal": "<|user|>\n" + "x" * 500 + "</s>\n", "trace restored": True}


def test_bounded_rendering_gives_the_template_output_unchanged(llama_dir: Path) -> None:
    demo = json.loads((REPO / "tests" / "data" / "text" / "mllm_demo.json").read_text())
    enc = TextEncoder(llama_dir, TextConfig(max_length=64))
    hf = enc._hf_tokenizer()
    for row in demo:
        msgs = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        assert enc.render(row["messages"], image_count=len(row.get("images", []))) == \
            hf.apply_chat_template(msgs, tokenize=False).removeprefix("<s>")
    assert enc.render(demo[0]["messages"], image_count=2) == "".join(
        f"<|{m['role']}|>\n{m['content']}</s>\n" for m in demo[0]["messages"])  # CHAT_TEMPLATE's layout


# -- item 22: a tokenizer that needs its own code ----------------------------------------------------------------


def test_a_custom_code_tokenizer_gives_the_real_reason_and_never_prompts(tmp_path: Path) -> None:
    tok = tmp_path / "glm"
    shutil.copytree(MINILM_DIR, tok)  # real tokenizer files ...
    (tok / "tokenizer_config.json").write_text(json.dumps({  # ... but the class is the folder's own
        "tokenizer_class": "GLMTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_glm.GLMTokenizer", None]}}))
    (tok / "tokenization_glm.py").write_text("raise SystemExit('this code must never run')\n")
    env = dict(os.environ, MMPREP_NO_PROGRESS="1")
    res = subprocess.run([sys.executable, "-m", "mmprep", "tokenize", str(SAMPLE / "manifest.jsonl"), "--tokenizer",
                          str(tok), "--max-length", "8", "--out", str(tmp_path / "t.parquet")],
                         capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)
    assert res.returncode == 2, res.stderr
    assert res.stdout == ""  # transformers' "Do you wish to run the custom code? [y/N]" prompt went to stdout
    (line, hint) = res.stderr.strip().splitlines()
    assert line == (f"error: {tok}: cannot load the tokenizer: it needs its own Python code "
                    "(tokenization_glm.GLMTokenizer, named by auto_map in tokenizer_config.json), which mmprep does "
                    "not run")
    assert hint.startswith("hint: mmprep never runs code from a tokenizer folder")
