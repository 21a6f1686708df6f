"""The tokenizer cache: a second TextEncoder for the same tokenizer files is built without transformers, and is the
same encoder (ids, recorded names and pad ids, warnings) as the first."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from _text_helpers import (
    CLIP_DIR,
    MINILM_DIR,
    REPO,
    TEXT_DATA,
    build_bytelevel_bpe,
    build_unigram,
    coco_captions,
    copy_tokenizer,
)
from typer.testing import CliRunner

from mmprep.cli import app
from mmprep.errors import EXIT_OK
from mmprep.text.cache import tokenizer_cache_dir, tokenizer_cache_key
from mmprep.text.config import TextConfig
from mmprep.text.encoder import TextEncoder

CAT = "a photo of a cat"
# Everything an encoder records or uses: what pack and tokenize write into metadata, and what encoding depends on.
RECORDED = (
    "tokenizer_dir", "name_or_path", "vocab_size", "pad_token", "pad_token_id", "has_chat_template",
    "special_prefix", "special_suffix", "warnings", "_strip_bos",
)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("MMPREP_CACHE_DIR", str(root))
    monkeypatch.delenv("MMPREP_NO_CACHE", raising=False)
    return root / "tokenizers"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("toks")
    return {
        "gpt2": build_bytelevel_bpe(base / "gpt2"),  # no pad token: EOS fallback with a warning
        "llama": build_bytelevel_bpe(base / "llama", llama_style=True),  # chat template, BOS prefix
        "unigram": build_unigram(base / "unigram"),
    }


def _texts() -> list[str]:
    return [*coco_captions(), "a", "héllo wörld 日本語 🙂", CAT * 40]


def _same_encoder(a: TextEncoder, b: TextEncoder) -> None:
    assert [getattr(a, k) for k in RECORDED] == [getattr(b, k) for k in RECORDED]
    assert a._backend.to_str() == b._backend.to_str()
    ba, bb = a.encode_batch(_texts()), b.encode_batch(_texts())
    for field in ("input_ids", "attention_mask", "n_tokens", "truncated"):
        assert np.array_equal(getattr(ba, field), getattr(bb, field)), field


@pytest.mark.parametrize("tok", ["clip", "minilm", "gpt2", "llama", "unigram"])
def test_a_warm_encoder_equals_the_cold_one(tok: str, built: dict[str, Path], cache: Path) -> None:
    directory = {"clip": CLIP_DIR, "minilm": MINILM_DIR, **built}[tok]
    cfg = TextConfig(max_length=24, padding_side="left", truncation_side="left")
    cold = TextEncoder(directory, cfg)
    assert cold._hf is not None  # loaded with transformers
    entries = list(cache.glob("*.json"))
    assert [e.name for e in entries] == [f"{tokenizer_cache_key(directory)}.json"]
    warm = TextEncoder(directory, cfg)
    assert warm._hf is None  # built from the entry alone
    _same_encoder(cold, warm)
    if tok == "llama":  # the chat template still works: transformers is loaded lazily for it
        msgs = json.loads((TEXT_DATA / "mllm_demo.json").read_text())[1]["messages"]
        assert warm.render(msgs, image_count=1) == cold.render(msgs, image_count=1)
        assert warm._hf is not None


def test_warm_construction_in_a_fresh_process_does_not_import_transformers(cache: Path) -> None:
    code = (
        "import sys\n"
        "from mmprep.text.config import TextConfig\nfrom mmprep.text.encoder import TextEncoder\n"
        f"enc = TextEncoder({str(CLIP_DIR)!r}, TextConfig(max_length=10))\n"
        f"ids = enc.encode_batch([enc.render({CAT!r})]).input_ids[0].tolist()\n"
        "print(ids, enc.name_or_path, enc.pad_token_id, 'transformers' in sys.modules, 'torch' in sys.modules)\n"
    )

    def run() -> str:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()

    ids = [49406, 320, 1125, 539, 320, 2368, 49407, 49407, 49407, 49407]
    assert run() == f"{ids} {CLIP_DIR} 49407 True" + (" True" if _has_torch() else " False")  # cold
    assert run() == f"{ids} {CLIP_DIR} 49407 False False"  # warm: neither transformers nor torch


def _has_torch() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def test_the_key_follows_the_files_not_the_path(tmp_path: Path) -> None:
    a = copy_tokenizer(MINILM_DIR, tmp_path / "a")
    b = copy_tokenizer(MINILM_DIR, tmp_path / "elsewhere" / "b")
    key = tokenizer_cache_key(a)
    assert tokenizer_cache_key(b) == key and len(key) == 64
    cfg_file = b / "tokenizer_config.json"
    cfg_file.write_text(cfg_file.read_text().replace('"do_lower_case": true', '"do_lower_case": false'))
    assert tokenizer_cache_key(b) != key
    (a / "chat_template.jinja").write_text("{{ messages }}")  # a new file
    with_template = tokenizer_cache_key(a)
    assert with_template != key
    (a / "additional_chat_templates").mkdir()
    (a / "additional_chat_templates" / "tool.jinja").write_text("x")
    assert tokenizer_cache_key(a) != with_template
    # Model weights count by name and size only (a model directory is not read through).
    weights = a / "model.safetensors"
    weights.write_bytes(b"\0" * 64)
    before = tokenizer_cache_key(a)
    weights.write_bytes(b"\1" * 64)
    assert tokenizer_cache_key(a) == before
    weights.write_bytes(b"\1" * 65)
    assert tokenizer_cache_key(a) != before


def test_same_files_at_another_path_hit_the_entry_and_record_that_path(tmp_path: Path, cache: Path) -> None:
    a = copy_tokenizer(MINILM_DIR, tmp_path / "a")
    b = copy_tokenizer(MINILM_DIR, tmp_path / "b")
    cfg = TextConfig(max_length=12)
    first = TextEncoder(a, cfg)
    hit = TextEncoder(b, cfg)
    assert hit._hf is None and hit.name_or_path == hit.tokenizer_dir == str(b)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMPREP_NO_CACHE", "1")
        uncached = TextEncoder(b, cfg)
    assert uncached._hf is not None
    _same_encoder(uncached, hit)
    assert first.name_or_path == str(a)


def test_a_changed_file_is_a_miss(tmp_path: Path, cache: Path) -> None:
    tok = copy_tokenizer(MINILM_DIR, tmp_path / "tok")
    cfg = TextConfig(max_length=12)
    TextEncoder(tok, cfg)
    special = json.loads((tok / "special_tokens_map.json").read_text())
    special["pad_token"] = "[UNK]"
    (tok / "special_tokens_map.json").write_text(json.dumps(special))
    cfg_file = tok / "tokenizer_config.json"
    config = json.loads(cfg_file.read_text())
    config["pad_token"] = "[UNK]"
    cfg_file.write_text(json.dumps(config))
    changed = TextEncoder(tok, cfg)
    assert changed._hf is not None and changed.pad_token == "[UNK]" and changed.pad_token_id == 100
    assert len(list(cache.glob("*.json"))) == 2


@pytest.mark.parametrize(
    "content",
    [b"", b"{not json", b'{"format": 1}', b"[1, 2]", None],  # None: a valid entry whose backend JSON is broken
)
def test_a_corrupt_entry_is_ignored_and_rewritten(content: bytes | None, cache: Path) -> None:
    cfg = TextConfig(max_length=10)
    reference = TextEncoder(CLIP_DIR, cfg)
    entry = cache / f"{tokenizer_cache_key(CLIP_DIR)}.json"
    good = entry.read_bytes()
    if content is None:
        obj = json.loads(good)
        obj["backend"] = obj["backend"][: len(obj["backend"]) // 2]
        content = json.dumps(obj).encode()
    entry.write_bytes(content)
    recovered = TextEncoder(CLIP_DIR, cfg)
    assert recovered._hf is not None  # loaded again with transformers
    _same_encoder(reference, recovered)
    assert entry.read_bytes() == good
    assert TextEncoder(CLIP_DIR, cfg)._hf is None  # and the rewritten entry is used


def test_no_cache_is_honoured(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMPREP_NO_CACHE", "1")
    assert tokenizer_cache_dir() is None
    cfg = TextConfig(max_length=10)
    enc = TextEncoder(CLIP_DIR, cfg)
    assert enc._hf is not None and not cache.exists()  # nothing written
    # Nor read: an entry that says otherwise is not used.
    monkeypatch.delenv("MMPREP_NO_CACHE")
    TextEncoder(CLIP_DIR, cfg)
    entry = cache / f"{tokenizer_cache_key(CLIP_DIR)}.json"
    obj = json.loads(entry.read_bytes())
    obj["pad_token"], obj["pad_token_id"] = "<|startoftext|>", 49406
    entry.write_text(json.dumps(obj))
    assert TextEncoder(CLIP_DIR, cfg).pad_token_id == 49406  # with the cache on, the entry is what counts
    monkeypatch.setenv("MMPREP_NO_CACHE", "1")
    assert TextEncoder(CLIP_DIR, cfg).pad_token_id == 49407
    monkeypatch.setenv("MMPREP_NO_CACHE", "0")  # 0 means: cache on
    assert tokenizer_cache_dir() == cache


def test_a_cache_that_cannot_be_written_is_no_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capfd: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("MMPREP_CACHE_DIR", str(blocker / "cache"))  # mkdir fails: a file is in the way
    monkeypatch.delenv("MMPREP_NO_CACHE", raising=False)
    cfg = TextConfig(max_length=10)
    first, second = TextEncoder(CLIP_DIR, cfg), TextEncoder(CLIP_DIR, cfg)
    assert first._hf is not None and second._hf is not None
    _same_encoder(first, second)
    assert capfd.readouterr() == ("", "")
    assert blocker.read_text() == "not a directory"


def test_where_the_cache_lives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MMPREP_NO_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MMPREP_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert tokenizer_cache_dir() == tmp_path / "home" / ".cache" / "mmprep" / "tokenizers"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tokenizer_cache_dir() == tmp_path / "xdg" / "mmprep" / "tokenizers"
    monkeypatch.setenv("MMPREP_CACHE_DIR", str(tmp_path / "mine"))
    assert tokenizer_cache_dir() == tmp_path / "mine" / "tokenizers"


def test_tokenize_output_is_byte_identical_cold_and_warm(tmp_path: Path, cache: Path) -> None:
    runner = CliRunner()
    outs = []
    for run in ("cold", "warm"):
        out = tmp_path / f"{run}.parquet"
        result = runner.invoke(app, ["tokenize", str(REPO / "sample_data" / "manifest.jsonl"), "--tokenizer",
                                     str(CLIP_DIR), "--max-length", "20", "--out", str(out)])
        assert result.exit_code == EXIT_OK, result.stderr
        outs.append(out.read_bytes())
    assert len(list(cache.glob("*.json"))) == 1
    assert outs[0] == outs[1]
    meta = json.loads(pq.read_schema(tmp_path / "warm.parquet").metadata[b"mmprep"])
    assert meta["tokenizer"] == str(CLIP_DIR) and meta["pad_token_id"] == 49407
