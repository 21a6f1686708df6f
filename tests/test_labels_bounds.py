"""Label inputs are bounded and damaged files say so (issue 19, items 10, 17, 19, 22):

* a vocabulary that is /dev/zero, a binary file or one endless line is a one-line error, found early;
* an embedding file whose data is not all there (a truncated .safetensors written by the safetensors library, a
  header that claims 10^9 rows over 16 bytes, a cut .npy/.npz/.pt) is an error, never "aligned";
* an embedding matrix of the wrong width is misaligned when a width is expected (``--embedding-dim``);
* torch's refusals and a tokenizer that needs its own code name the real reason;
* the linear-time rewrites of the audit (normalisation, duplicate search, never-used list, JSON report) give the
  results of the straightforward definitions.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mmprep.cli import app
from mmprep.errors import InputError
from mmprep.labels.audit import TagCount, TagList, audit_embeddings, audit_labels
from mmprep.labels.audit.hygiene import duplicate_groups
from mmprep.labels.tensorfile import open_tensor_file
from mmprep.labels.vocab import MAX_LINE_BYTES, Vocabulary, load_vocab, normalize_tag
from mmprep.output import json_bytes, to_jsonable

REPO = Path(__file__).resolve().parents[1]
RAM = REPO / "tests" / "data" / "ram" / "ram_tag_list.txt"
IMAGE = REPO / "sample_data" / "images" / "astronaut.jpg"
runner = CliRunner()


def _mmprep(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MMPREP_NO_PROGRESS="1")
    return subprocess.run([sys.executable, "-m", "mmprep", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=REPO)


# -- item 10: the vocabulary is read with bounds ----------------------------------------------------------------


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_dev_zero_as_vocab_is_one_line_quickly() -> None:
    start = time.monotonic()
    res = _mmprep("audit-labels", "--vocab", "/dev/zero", timeout=60)
    assert time.monotonic() - start < 30
    assert res.returncode == 2, res.stderr
    assert "/dev/zero:1: holds a NUL byte: binary data (or UTF-16 text), not a vocabulary file" in res.stderr
    assert "MemoryError" not in res.stderr and "internal error" not in res.stderr and res.stdout == ""


def test_binary_files_and_endless_lines_are_not_vocabularies(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"astronaut\.jpg:1: holds a NUL byte"):
        load_vocab(IMAGE)
    blob = tmp_path / "blob.txt"  # binary-looking data without NUL bytes or newlines
    blob.write_bytes(bytes(b for b in os.urandom(300_000) if b not in (0, 10)))
    with pytest.raises(InputError, match=r"blob\.txt:1: a line longer than 65,536 bytes"):
        load_vocab(blob)
    long = tmp_path / "long.txt"  # the long line in the middle of a chunk is found too, with its number
    long.write_text("cat\ndog\n" + "x" * (MAX_LINE_BYTES + 1) + "\nbird\n")
    with pytest.raises(InputError, match=r"long\.txt:3: a line longer"):
        load_vocab(long)
    ok = tmp_path / "ok.txt"
    ok.write_text("cat\n" + "é" * (MAX_LINE_BYTES // 2) + "\n")  # exactly at the bound (in bytes): fine
    assert len(load_vocab(ok)) == 2
    res = runner.invoke(app, ["pack", str(REPO / "sample_data" / "manifest.jsonl"), "--out", str(tmp_path / "o"),
                              "--vocab", str(IMAGE)])
    assert res.exit_code == 2 and "holds a NUL byte" in res.stderr and not (tmp_path / "o").exists()


def test_deep_json_and_huge_csv_fields_are_input_errors(tmp_path: Path) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InputError, match="nested too deeply"):
        load_vocab(deep)
    csv_file = tmp_path / "v.csv"  # a quoted field that runs over the csv module's 128 KiB field limit
    csv_file.write_text('id,name\n0,cat\n1,"' + ("y" * 60_000 + "\n") * 3 + '"\n')
    with pytest.raises(InputError, match=r"v\.csv:\d+: not a readable CSV vocabulary file"):
        load_vocab(csv_file)
    desc = tmp_path / "descriptions.json"
    shutil.copyfile(IMAGE, desc)
    res = runner.invoke(app, ["audit-labels", "--vocab", str(RAM), "--aligned", str(desc)])
    assert res.exit_code == 2 and "holds a NUL byte" in res.stderr


# -- item 19: the data an embedding header promises must be there -----------------------------------------------


def _header_only(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_truncated_safetensors_is_an_error_not_aligned(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    good = tmp_path / "good.safetensors"
    save_file({"embedding": np.random.default_rng(0).random((4585, 16), dtype=np.float32)}, str(good))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert audit_embeddings(good, 4585).aligned
    res = runner.invoke(app, ["audit-labels", "--vocab", str(RAM), "--embeddings", str(cut), "--fail-on",
                              "misaligned"])
    assert res.exit_code == 2, res.stderr
    assert f"{cut}: truncated: the header places tensor data up to byte" in res.stderr
    assert "cut short" in res.stderr and "Traceback" not in res.stderr


def test_header_claiming_a_billion_rows_over_16_bytes(tmp_path: Path) -> None:
    claim = _header_only(tmp_path / "claim.safetensors", {"embedding": {
        "dtype": "F32", "shape": [10**9, 512], "data_offsets": [0, 10**9 * 512 * 4]}}, b"\0" * 16)
    with pytest.raises(InputError, match=r"truncated: .* up to byte 2,048,000,000,\d+, but the file has"):
        audit_embeddings(claim, 4585)
    small = _header_only(tmp_path / "small.safetensors", {"embedding": {
        "dtype": "F32", "shape": [10**9, 512], "data_offsets": [0, 16]}}, b"\0" * 16)
    with pytest.raises(InputError, match=r"needs 2,048,000,000,000 bytes, but its data_offsets span 16"):
        audit_embeddings(small, 4585)
    gap = _header_only(tmp_path / "gap.safetensors", {
        "a": {"dtype": "F32", "shape": [1, 2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [1, 2], "data_offsets": [16, 24]}}, b"\0" * 24)
    with pytest.raises(InputError, match="leaves a gap of 8 bytes"):
        open_tensor_file(gap)


def test_cut_numpy_and_torch_files_are_errors(tmp_path: Path) -> None:
    from numpy.lib import format as npy

    np.save(tmp_path / "m.npy", np.ones((4585, 8), dtype=np.float32))
    cut = tmp_path / "cut.npy"
    cut.write_bytes((tmp_path / "m.npy").read_bytes()[:-100])
    with pytest.raises(InputError, match=r"cut\.npy: truncated: the header says \[4585, 8\] float32 = 146,720 bytes"):
        audit_embeddings(cut, 4585)
    claim = tmp_path / "claim.npy"
    with claim.open("wb") as fh:
        npy.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False, "shape": (10**9, 512)})
        fh.write(b"\0" * 16)
    with pytest.raises(InputError, match="truncated"):
        audit_embeddings(claim, 4585)
    with zipfile.ZipFile(tmp_path / "claim.npz", "w") as zf:  # before: MemoryError (1.86 TiB allocated)
        zf.writestr("embedding.npy", claim.read_bytes())
    with pytest.raises(InputError, match=r"member embedding\.npy\): truncated"):
        audit_embeddings(tmp_path / "claim.npz", 4585)
    np.savez_compressed(tmp_path / "ok.npz", embedding=np.zeros((4585, 8), dtype=np.float32))
    assert audit_embeddings(tmp_path / "ok.npz", 4585).aligned  # facts from the header, data read on request
    assert open_tensor_file(tmp_path / "ok.npz").float32("embedding").shape == (4585, 8)

    torch = pytest.importorskip("torch")
    torch.save(torch.zeros(4585, 8), tmp_path / "m.pth")
    cut_pt = tmp_path / "cut.pth"
    cut_pt.write_bytes((tmp_path / "m.pth").read_bytes()[:5000])
    with pytest.raises(InputError, match=r"cut\.pth: truncated or damaged"):
        audit_embeddings(cut_pt, 4585)


def test_expected_width_flags_a_384_wide_matrix_for_ram(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.numpy import save_file

    minilm = tmp_path / "minilm.safetensors"
    save_file({"embedding": np.zeros((4585, 384), dtype=np.float32)}, str(minilm))
    ram = tmp_path / "ram_tag_embedding_class_4585.pth"
    torch.save(torch.zeros(4585, 512), ram)
    base = ["audit-labels", "--vocab", str(RAM), "--embeddings", str(minilm), "--fail-on", "misaligned"]
    assert runner.invoke(app, base).exit_code == 0  # rows fit: without an expected width it is aligned
    for expect in ("512", str(ram)):  # a number, or the file the new matrix replaces
        res = runner.invoke(app, [*base, "--embedding-dim", expect, "--json"])
        assert res.exit_code == 1, res.stderr
        doc = json.loads(res.stdout)
        (e,) = doc["embeddings"]
        assert (e["dim"], e["expected_dim"], e["width_ok"], e["aligned"]) == (384, 512, False, False)
        assert doc["failed"] == ["misaligned"]
    res = runner.invoke(app, [*base, "--embedding-dim", "512"])
    assert "WIDTH 384" in res.stderr and "--embedding-dim 512" in res.stderr
    assert runner.invoke(app, [*base, "--embedding-dim", "384"]).exit_code == 0
    bad = runner.invoke(app, [*base, "--embedding-dim", "0"])
    assert bad.exit_code == 2 and "--embedding-dim must be a positive width" in bad.stderr
    alone = runner.invoke(app, ["audit-labels", "--vocab", str(RAM), "--embedding-dim", "512"])
    assert alone.exit_code == 2 and "--embedding-dim needs --embeddings" in alone.stderr


# -- item 22: torch's refusals and custom-code tokenizers give the real reason ---------------------------------


def test_weights_only_refusal_is_one_whole_sentence_without_warnings(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    import argparse
    import pickle

    ckpt = tmp_path / "ckpt.pth"  # a training checkpoint: weights plus the run's argparse namespace
    torch.save({"embedding": torch.zeros(4585, 8), "args": argparse.Namespace(lr=0.1)}, ckpt)
    res = _mmprep("audit-labels", "--vocab", str(RAM), "--embeddings", str(ckpt))
    assert res.returncode == 2
    (line, hint) = res.stderr.strip().splitlines()
    assert line == (f"error: {ckpt}: holds a pickled argparse.Namespace object, which torch.load(weights_only=True) "
                    "refuses: mmprep never runs code from a file")
    assert hint.startswith("hint: save the matrix alone")
    plain = tmp_path / "plain.pt"  # a plain pickle (protocol 4): torch warns about the protocol
    plain.write_bytes(pickle.dumps([1.0, 2.0], protocol=4))
    res = _mmprep("audit-labels", "--vocab", str(RAM), "--embeddings", str(plain))
    assert res.returncode == 2 and "UserWarning" not in res.stderr and "\x1b[" not in res.stderr
    assert "not a file written by torch.save (a plain pickle" in res.stderr
    arr = tmp_path / "array.pt"
    torch.save(np.zeros((3, 4), dtype=np.float32), arr)
    with pytest.raises(InputError, match=r"holds a pickled NumPy array") as info:
        audit_embeddings(arr, 3)
    assert "torch.from_numpy" in (info.value.hint or "")


def test_a_tokenizer_with_custom_code_says_so_for_embed_labels(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    import transformers

    model = tmp_path / "model"  # a real (tiny) BERT checkpoint ...
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=16, max_position_embeddings=16)
    transformers.BertModel(cfg).save_pretrained(model)
    tok = tmp_path / "tok"  # ... and a tokenizer folder whose tokenizer is a Python class of its own (ChatGLM-style)
    tok.mkdir()
    (tok / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GLMTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_glm.GLMTokenizer", None]}}))
    (tok / "tokenization_glm.py").write_text("raise SystemExit('this code must never run')\n")
    vocab = tmp_path / "v.txt"
    vocab.write_text("cat\ndog\n")
    res = _mmprep("embed-labels", str(vocab), "--model", str(model), "--tokenizer", str(tok), "--out",
                  str(tmp_path / "e.npy"), timeout=120)
    assert res.returncode == 2, res.stderr
    assert "it needs its own Python code (tokenization_glm.GLMTokenizer, named by auto_map in " \
           "tokenizer_config.json), which mmprep does not run" in res.stderr
    assert "needs tokenizer files" not in res.stderr and res.stdout == ""


# -- item 17: the linear-time audit gives the results of the plain definitions ---------------------------------


_WS = re.compile(r"\s+")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("aB_ \t\n\r\x0b\x0c\x1c\x85\xa0\u2028\u3000ẞßİ")), max_size=12))
def test_normalize_tag_equals_the_regular_expression_definition(name: str) -> None:
    assert normalize_tag(name) == _WS.sub(" ", name.replace("_", " ")).strip().casefold()


def _groups_by_definition(raw: list[str]) -> list[tuple[str, tuple[int, ...]]]:
    groups: dict[str, list[int]] = {}
    for k, entry in enumerate(raw):
        key = normalize_tag(entry)
        if key:
            groups.setdefault(key, []).append(k)
    return [(key, tuple(ks)) for key, ks in groups.items() if len(ks) > 1]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["cat", "Cat", "c_at", "c at", " cat ", "dog", "DOG", "", "  ", "_", "bird"]),
                max_size=30))
def test_duplicate_groups_equal_the_definition(raw: list[str]) -> None:
    got = duplicate_groups(range(100, 100 + len(raw)), raw)
    assert [(g.key, tuple(i - 100 for i in g.ids)) for g in got] == _groups_by_definition(raw)


def test_duplicate_groups_survive_hash_collisions(monkeypatch: pytest.MonkeyPatch) -> None:
    import mmprep.labels.audit.hygiene as hygiene

    monkeypatch.setattr(hygiene, "hash", lambda _s: 7, raising=False)  # every entry collides
    raw = ["cat", "dog", "Cat", "bird", "DOG"]
    assert [(g.key, g.ids) for g in hygiene.duplicate_groups(range(5), raw)] == [("cat", (0, 2)), ("dog", (1, 4))]


def test_never_used_list_json_and_tag_lists_match_the_plain_forms(tmp_path: Path) -> None:
    names = [f"tag {i}" for i in range(50_000)]
    vocab = tmp_path / "v.txt"
    vocab.write_text("\n".join(names) + "\n")
    ann = tmp_path / "a.jsonl"
    used = [3, 7, 49_999]
    ann.write_text("".join(json.dumps({"id": f"s{i}", "tags": [names[i]]}) + "\n" for i in used))
    report = audit_labels(vocab, [ann])
    never = report.never_used
    assert isinstance(never, TagList) and len(never) == 50_000 - 3  # ids only, until read
    expected = [TagCount(i, names[i], 0) for i in range(50_000) if i not in used]
    assert list(never) == expected and never[:2] == expected[:2] and never[-1] == expected[-1]
    assert [t.id for t in report.used] == used
    doc = json.loads(json_bytes(report))
    assert doc == json.loads(json.dumps(to_jsonable(report)))  # orjson writes what the standard library did
    assert doc["never_used"][0] == {"id": 0, "name": "tag 0", "count": 0}
    out = tmp_path / "never.tsv"
    res = runner.invoke(app, ["audit-labels", "--vocab", str(vocab), str(ann), "--write-never-used", str(out)])
    assert res.exit_code == 0
    assert out.read_text().splitlines() == [f"{t.id}\t{t.name}" for t in expected]


def test_csv_ids_out_of_order_keep_the_vocabulary_order(tmp_path: Path) -> None:
    vocab = tmp_path / "v.csv"
    vocab.write_text("id,name\n5,five\n1,one\n3,three\n")
    ann = tmp_path / "a.jsonl"
    ann.write_text(json.dumps({"id": "s", "tags": ["one"]}) + "\n")
    report = audit_labels(vocab, [ann])
    assert [t.id for t in report.never_used or ()] == [5, 3]
    voc = load_vocab(vocab)
    assert not voc.sequential and voc.size == 6 and voc.names_by_id[3] == "three" and 2 not in voc.names_by_id
    plain = Vocabulary(names=("a", "b"))
    assert plain.sequential and plain.size == 2
    moved = dataclasses.replace(plain, ids=(1, 0))  # a copy with other ids is not taken for sequential
    assert not moved.sequential and moved.size == 2 and moved.names_by_id[0] == "b"


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_embed_labels_templates_and_descriptions_are_read_with_bounds() -> None:
    from mmprep.labels.embed import load_templates
    from mmprep.labels.embed.templates import load_descriptions

    with pytest.raises(InputError, match=r"/dev/zero:1: holds a NUL byte: .* not a template file"):
        load_templates("/dev/zero")
    with pytest.raises(InputError, match=r"/dev/zero:1: holds a NUL byte: .* not a description file"):
        load_descriptions("/dev/zero")
