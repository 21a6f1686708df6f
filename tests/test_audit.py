"""`mmprep audit-labels` and mmprep.labels.audit on the real Recognize-Anything lists (tests/data/ram)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import mmprep.labels.audit.ramjson as ramjson_mod
import mmprep.labels.audit.tally as tally_mod
from mmprep.cli import app
from mmprep.errors import InputError, UsageError
from mmprep.labels.audit import (
    audit_aligned,
    audit_embeddings,
    audit_labels,
    detect_annotation_format,
)
from mmprep.labels.vocab import Vocabulary, load_vocab

DATA = Path(__file__).parent / "data" / "ram"
RAM = DATA / "ram_tag_list.txt"
RAM_ZH = DATA / "ram_tag_list_chinese.txt"
RAM_THRESH = DATA / "ram_tag_list_threshold.txt"
RAM_NAMES = RAM.read_text(encoding="utf-8").split("\n")  # independent of mmprep.labels.vocab: no final newline
runner = CliRunner()


# -- helpers -------------------------------------------------------------------------------------------------


def write_ram_json(path: Path, records: list[Any], layout: str = "lines") -> list[int]:
    """Write a RAM training JSON list; returns the 1-based line where each record starts."""
    if layout == "indent":
        parts = [json.dumps(r, indent=2, ensure_ascii=False) for r in records]
        sep, head, tail = ",\n", "[\n", "\n]\n"
    elif layout == "compact":  # json.dump(list, f): one line, ", " and ": " separators
        parts = [json.dumps(r, ensure_ascii=False) for r in records]
        sep, head, tail = ", ", "[", "]"
    else:
        parts = [json.dumps(r, ensure_ascii=False) for r in records]
        sep, head, tail = ",\n", "[\n", "\n]\n"
    text = head
    lines = []
    for k, part in enumerate(parts):
        if k:
            text += sep
        lines.append(text.count("\n") + 1)
        text += part
    path.write_text(text + tail, encoding="utf-8")
    return lines


def ram_record(ids: list[Any], n_caps: int = 2, **extra: Any) -> dict[str, Any]:
    parse = [ids[q::n_caps] for q in range(n_caps)]
    rec = {"image_path": f"images/{len(ids)}.jpg", "caption": [f"caption {q}" for q in range(n_caps)],
           "union_label_id": ids, "parse_label_id": parse}
    rec.update(extra)
    return rec


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny read/batch sizes so that small files cross many batch and buffer boundaries."""
    monkeypatch.setattr(ramjson_mod, "_BATCH", 160)
    monkeypatch.setattr(ramjson_mod, "_READ", 333)


def slow_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tally_mod.Tally, "ram_batch_fast", lambda self, values, loc_of: False)


def summary(report: Any) -> dict[str, Any]:
    """The parts of a report that the fast and the record-by-record paths must agree on exactly."""
    return {
        "counts": report.counts.tolist() if report.counts is not None else None,
        "never": [t.id for t in report.never_used or ()],
        "unknown": [(u.kind, u.value, u.count, str(u.first), u.first.record) for u in report.unknown],
        "untracked": report.unknown_untracked,
        "refs": report.frequency.occurrences if report.frequency else None,
        "parse_used": report.distinct_used,
        "problems": [(p.code, p.count, str(p.first), p.first.record, p.detail) for p in report.problems],
        "parse_only": report.parse_only_ids,
        "files": [(a.samples, a.tag_refs, a.problems) for a in report.annotations],
        "freq": None if report.frequency is None else (
            report.frequency.samples, report.frequency.samples_without_tags, report.frequency.tags_per_sample,
            report.frequency.coverage),
    }


# -- the motivating case: 4441 of 4585 tags used ------------------------------------------------------------


@pytest.fixture(scope="module")
def used_4441(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    rng = random.Random(1205)
    unused = sorted(rng.sample(range(4585), 144))
    used = [i for i in range(4585) if i not in set(unused)]
    rng.shuffle(used)
    records = []
    for k in range(0, len(used), 9):
        ids = sorted(used[k:k + 9])
        records.append(ram_record(ids, n_caps=1 + k % 3))
    for _ in range(600):  # repeat popular tags so the distribution has a head
        records.append(ram_record(sorted(rng.sample(used[:50], 5) + rng.sample(used, 3)), n_caps=2))
    path = tmp_path_factory.mktemp("ram") / "train.json"
    write_ram_json(path, records, layout="compact")
    return path, unused


def test_exactly_144_never_used_tags_with_their_names(used_4441: tuple[Path, list[int]]) -> None:
    path, unused = used_4441
    report = audit_labels(RAM, [path])
    assert report.vocab.entries == 4585
    assert report.declared_size == 4585
    assert report.distinct_used == 4441
    assert [t.id for t in report.never_used] == unused
    assert [t.name for t in report.never_used] == [RAM_NAMES[i] for i in unused]
    assert report.unknown == [] and report.problems == []
    assert report.annotations[0].format == "ram-json"
    assert report.findings["never-used"] == 144


def test_cli_write_lists_and_fail_on_never_used(used_4441: tuple[Path, list[int]], tmp_path: Path) -> None:
    path, unused = used_4441
    never_file, used_file = tmp_path / "never.tsv", tmp_path / "used.tsv"
    result = runner.invoke(app, ["audit-labels", "--vocab", str(RAM), str(path), "--fail-on", "never-used",
                                 "--write-never-used", str(never_file), "--write-used", str(used_file)])
    assert result.exit_code == 1, result.stderr
    assert result.stdout == ""
    assert "failing on: never-used (144)" in result.stderr
    assert "Never-used tags" in result.stderr
    lines = never_file.read_text(encoding="utf-8").splitlines()
    assert lines == [f"{i}\t{RAM_NAMES[i]}" for i in unused]
    used_lines = used_file.read_text(encoding="utf-8").splitlines()
    assert len(used_lines) == 4441
    counted = Counter(i for r in json.loads(path.read_text(encoding="utf-8")) for i in r["union_label_id"])
    assert used_lines == [f"{i}\t{RAM_NAMES[i]}\t{counted[i]}" for i in sorted(counted)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["never.tsv", "used.tsv"]  # no temporary files left
    # other categories have no findings here: exit 0
    ok = runner.invoke(app, ["audit-labels", "--vocab", str(RAM), str(path), "--fail-on", "unknown,misaligned",
                             "--fail-on", "invalid"])
    assert ok.exit_code == 0, ok.stderr


def test_json_report_is_the_only_stdout(used_4441: tuple[Path, list[int]]) -> None:
    path, unused = used_4441
    result = runner.invoke(app, ["audit-labels", "--vocab", str(RAM), str(path), "--json", "--fail-on", "any",
                                 "--aligned", str(RAM_ZH)])
    assert result.exit_code == 1  # never-used, duplicates and whitespace in the Chinese list
    doc = json.loads(result.stdout)
    assert doc["distinct_used"] == 4441
    assert [t["id"] for t in doc["never_used"]] == unused
    assert doc["never_used"][0]["name"] == RAM_NAMES[unused[0]]
    assert doc["vocab"]["final_newline"] is False and doc["vocab"]["entries"] == 4585
    assert doc["findings"]["never-used"] == 144 and doc["findings"]["duplicates"] == 195
    assert doc["failed"] == ["never-used", "duplicates", "hygiene"]
    assert doc["aligned"][0]["aligned"] is True and doc["aligned"][0]["trailing_whitespace"] == 2579
    assert doc["frequency"]["samples"] == -(-4441 // 9) + 600
    counted = Counter(i for r in json.loads(path.read_text(encoding="utf-8")) for i in r["union_label_id"])
    assert doc["frequency"]["counts_by_id"] == [counted[i] for i in range(4585)]  # every tag, not only --top
    assert len(doc["frequency"]["most_used"]) == 10  # --top
    assert doc["unknown_truncated"] is False and doc["unknown_untracked"] == 0
    assert set(doc["frequency"]["coverage"]) == {"50%", "90%", "99%"}
    assert "Vocabulary" not in result.stderr  # no tables in --json mode
    assert "failing on" in result.stderr


def test_plot_writes_a_png(used_4441: tuple[Path, list[int]], tmp_path: Path) -> None:
    from PIL import Image

    path, _ = used_4441
    png = tmp_path / "tail.png"
    result = runner.invoke(app, ["audit-labels", "--vocab", str(RAM), str(path), "--plot", str(png), "-q"])
    assert result.exit_code == 0, result.stderr
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (1000, 450)
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3).astype(int)
        assert len(np.unique(pixels, axis=0)) > 10  # something was drawn
    # the never-used tags are marked: red ticks (#d62728) and their shaded span
    assert (np.abs(pixels - [214, 39, 40]).sum(axis=1) < 30).sum() > 100
    assert (np.abs(pixels - [245, 201, 201]).sum(axis=1) < 12).sum() > 1000
    assert [p.name for p in tmp_path.iterdir()] == ["tail.png"]  # written under a temporary name, then renamed
    svg = tmp_path / "tail.svg"
    assert runner.invoke(app, ["audit-labels", "--vocab", str(RAM), str(path), "--plot", str(svg), "-q"]).exit_code == 0
    assert svg.read_text(encoding="utf-8").lstrip().startswith("<?xml")


def test_plot_with_an_unknown_extension_is_a_usage_error_before_the_audit(tmp_path: Path) -> None:
    missing = tmp_path / "not-there.json"  # the audit would fail on this file: the plot check comes first
    for name, text in [("tail.bogus", "format 'bogus' is not supported"),
                       ("tail", "has no extension naming the image format")]:
        result = runner.invoke(app, ["audit-labels", "--vocab", str(RAM), str(missing), "--plot", str(tmp_path / name)])
        assert result.exit_code == 2, result.stderr
        assert text in result.stderr and ".png" in result.stderr
        assert "internal error" not in result.stderr and "not-there" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_plot_without_matplotlib_says_how_to_install(
    used_4441: tuple[Path, list[int]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    result = runner.invoke(app, ["audit-labels", "--vocab", str(RAM), str(used_4441[0]), "--plot",
                                 str(tmp_path / "x.png")])
    assert result.exit_code == 2
    assert "matplotlib" in result.stderr and "pip install 'mmprep[plot]'" in result.stderr
    assert "Traceback" not in result.stderr


# -- the vocabulary and its aligned files ---------------------------------------------------------------------


def test_real_lists_aligned_files() -> None:
    report = audit_labels(RAM, aligned=[str(RAM_ZH), str(RAM_THRESH)])
    zh, th = report.aligned
    assert (zh.kind, zh.entries, zh.expected, zh.aligned) == ("translations", 4585, 4585, True)
    assert len(zh.duplicates) == 195
    assert sum(len(g.ids) - 1 for g in zh.duplicates) == 206
    assert len(zh.whitespace_lines) == 2579 and zh.final_newline is True
    perform = next(g for g in zh.duplicates if g.key == "表演")
    assert perform.ids == (12, 3009, 3010) and perform.exact  # lines 13, 3010, 3011
    assert any(not g.exact for g in zh.duplicates)  # e.g. '帮助' vs '帮助 '
    assert (th.kind, th.entries, th.aligned, th.invalid) == ("thresholds", 4585, True, ())
    assert th.stats["most_common"][:3] == [[0.65, 3414], [0.8, 735], [0.9, 119]]
    assert report.never_used is None and report.frequency is None  # no annotations given
    assert report.vocab.final_newline is False and report.vocab.duplicates == ()
    assert report.findings["misaligned"] == 0


def test_bad_and_misaligned_threshold_file(tmp_path: Path) -> None:
    lines = RAM_THRESH.read_text().splitlines()
    lines[9] = "0.6x"
    lines[99] = "1.5"
    bad = tmp_path / "thresholds.txt"
    bad.write_text("\n".join(lines[:-1]) + "\n")  # one entry short as well
    rep = audit_aligned(str(bad), load_vocab(RAM))
    assert rep.kind == "thresholds" and rep.entries == 4584 and not rep.aligned
    assert rep.invalid == ((10, "0.6x", "not a number"), (100, "1.5", "outside [0, 1]"))
    result = runner.invoke(app, ["audit-labels", "--vocab", str(RAM), "--aligned", str(bad), "--fail-on",
                                 "misaligned", "--json"])
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["findings"]["misaligned"] == 1 and doc["findings"]["invalid"] == 2
    forced = audit_aligned(f"translations={bad}", load_vocab(RAM))
    assert forced.kind == "translations"


def test_tag2text_list_duplicates_and_declared_size() -> None:
    report = audit_labels(DATA / "tag_list.txt", declared_size=3429)
    assert len(report.vocab.duplicates) == 114
    assert report.findings["misaligned"] == 0
    assert audit_labels(DATA / "tag_list.txt", declared_size=4585).findings["misaligned"] == 1


def test_vocab_with_bom_crlf_whitespace_and_normalised_duplicates(tmp_path: Path) -> None:
    vocab = tmp_path / "v.txt"
    vocab.write_bytes(b"\xef\xbb\xbfcat\r\ndog \r\n\r\nCat\r\nhot_dog\r\nhot dog")
    report = audit_labels(vocab)
    v = report.vocab
    assert v.has_bom and v.crlf_lines == 5 and v.first_crlf_line == 1 and v.final_newline is False
    assert v.entries == 6 and v.empty_ids == (2,) and v.whitespace_ids == (1,)
    groups = {g.key: g for g in v.duplicates}
    assert groups["cat"].ids == (0, 3) and not groups["cat"].exact
    assert groups["hot dog"].ids == (4, 5)
    result = runner.invoke(app, ["audit-labels", "--vocab", str(vocab), "--fail-on", "hygiene"])
    assert result.exit_code == 1
    assert "CRLF" in result.stderr and "Traceback" not in result.stderr


def test_vocab_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"cat\ndog\ncaf\xe9\n")
    result = runner.invoke(app, ["audit-labels", "--vocab", str(bad)])
    assert result.exit_code == 2
    assert f"{bad}:3: vocabulary file is not valid UTF-8" in result.stderr
    missing = runner.invoke(app, ["audit-labels", "--vocab", str(tmp_path / "nope.txt")])
    assert missing.exit_code == 2 and "nope.txt: vocabulary file not found" in missing.stderr
    assert "Traceback" not in missing.stderr + result.stderr


def test_json_object_vocabulary_maps_names_to_ids(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text('{"cat": 1, "dog": 0, "bird": 3}')
    v = load_vocab(good)
    assert (v.names, v.ids, v.size) == (("dog", "cat", "bird"), (0, 1, 3), 4)
    annots = tmp_path / "a.txt"
    annots.write_text("x.jpg 0 2 3\n")
    rep = audit_labels(good, [annots])
    assert [(u.value, u.count) for u in rep.unknown] == [(2, 1)]  # the gap at id 2 is not a tag
    assert [t.id for t in rep.never_used] == [1]
    for body, text in [
        ('{"dog": 0, "cat": 0}', "id 0 is given to both 'dog' and 'cat'"),
        ('{"dog": -1, "cat": 1}', "tag 'dog' has id -1, which is negative"),
        ('{"dog": true}', "tag 'dog' has id true, expected an integer"),
        ('{"dog": 1.0}', "tag 'dog' has id 1.0, expected an integer"),
        ('{"dog": "0"}', "tag 'dog' has id \"0\", expected an integer"),
    ]:
        bad = tmp_path / "bad.json"
        bad.write_text(body)
        result = runner.invoke(app, ["audit-labels", "--vocab", str(bad)])
        assert result.exit_code == 2, (body, result.stderr)
        assert f"{bad}: {text}" in result.stderr and "internal error" not in result.stderr


def test_empty_vocabulary_is_an_error_not_one_empty_tag(tmp_path: Path) -> None:
    annots = tmp_path / "a.txt"
    annots.write_text("x.jpg 0\n")
    for name, body in [("empty.txt", b""), ("bom.txt", b"\xef\xbb\xbf"), ("empty.json", b"[]"),
                       ("header.csv", b"id,name\n")]:
        vocab = tmp_path / name
        vocab.write_bytes(body)
        assert len(load_vocab(vocab)) == 0
        result = runner.invoke(app, ["audit-labels", "--vocab", str(vocab), str(annots), "--json"])
        assert result.exit_code == 2 and result.stdout == ""
        assert f"{vocab}: the vocabulary has no entries" in result.stderr
    # one empty line is one (empty) entry, as before
    one = tmp_path / "one.txt"
    one.write_text("\n")
    assert load_vocab(one).names == ("",)
    # an empty aligned file is a finding (0 of 4585 entries), not an error
    empty = tmp_path / "zh.txt"
    empty.write_bytes(b"")
    rep = audit_labels(RAM, aligned=[str(empty)])
    assert (rep.aligned[0].entries, rep.aligned[0].aligned, rep.findings["misaligned"]) == (0, False, 1)


def test_missing_or_unreadable_aligned_file_is_named_as_such(tmp_path: Path) -> None:
    for spec in [str(tmp_path / "nope.txt"), f"thresholds={tmp_path / 'nope.txt'}", str(tmp_path / "nope.json")]:
        result = runner.invoke(app, ["audit-labels", "--vocab", str(RAM), "--aligned", spec])
        assert result.exit_code == 2
        assert "aligned file not found" in result.stderr and "vocabulary" not in result.stderr
    latin = tmp_path / "zh.txt"
    latin.write_bytes(b"a\nb\xe9\n")
    with pytest.raises(InputError, match=r"zh.txt:2: aligned file is not valid UTF-8"):
        audit_aligned(str(latin), load_vocab(RAM))


def test_empty_threshold_entries_are_invalid(tmp_path: Path) -> None:
    vocab = tmp_path / "v.txt"
    vocab.write_text("a\nb\nc\nd\n")
    th = tmp_path / "th.txt"
    th.write_text("0.5\n\n0.7\nnan\n")
    rep = audit_aligned(str(th), load_vocab(vocab))
    assert rep.kind == "thresholds" and rep.aligned
    assert rep.invalid == ((2, "", "empty, not a number"), (4, "nan", "outside [0, 1]"))
    assert rep.empty_lines == ()  # counted once, as invalid
    assert audit_labels(vocab, aligned=[str(th)]).findings["invalid"] == 2


def test_descriptions_json_is_checked_against_the_vocabulary(tmp_path: Path) -> None:
    vocab = load_vocab(DATA / "openimages_rare_200_ram_taglist.txt")
    rep = audit_aligned(str(DATA / "openimages_rare_200_llm_tag_descriptions_head6.json"), vocab)
    assert (rep.kind, rep.entries, rep.expected, rep.aligned) == ("descriptions", 6, 200, False)
    assert rep.name_mismatches == () and rep.stats == {"descriptions_min": 3, "descriptions_max": 3}
    items = json.loads((DATA / "openimages_rare_200_llm_tag_descriptions_head6.json").read_text())
    items[1], items[2] = items[2], items[1]
    swapped = tmp_path / "swapped.json"
    swapped.write_text(json.dumps(items))
    rep = audit_aligned(str(swapped), vocab)
    assert [(k, got) for k, got, _want in rep.name_mismatches] == [(1, "Ale"), (2, "Aircraft engine")]


# -- embeddings ----------------------------------------------------------------------------------------------


def test_numpy_embeddings(tmp_path: Path) -> None:
    np.save(tmp_path / "ok.npy", np.zeros((4585, 8), dtype=np.float32))
    np.save(tmp_path / "short.npy", np.zeros((4584, 8), dtype=np.float16))
    np.save(tmp_path / "des.npy", np.zeros((4585 * 3, 4), dtype=np.float32))
    np.savez(tmp_path / "two.npz", label_embed=np.zeros((4585, 2)), bias=np.zeros(4585))
    ok = audit_embeddings(tmp_path / "ok.npy", 4585)
    assert (ok.shape, ok.k, ok.aligned, ok.dtype) == ((4585, 8), 1, True, "float32")
    short = audit_embeddings(tmp_path / "short.npy", 4585)
    assert (short.rows, short.k, short.aligned) == (4584, None, False)
    assert audit_embeddings(tmp_path / "des.npy", 4585).k == 3
    npz = audit_embeddings(tmp_path / "two.npz", 4585)  # the one 2-D array is the matrix
    assert (npz.key, npz.shape) == ("label_embed", (4585, 2))
    report = audit_labels(RAM, embeddings=[str(tmp_path / "ok.npy"), str(tmp_path / "short.npy")])
    assert report.findings["misaligned"] == 1


def test_vectors_and_label_matrices_that_must_have_one_row_per_tag(tmp_path: Path) -> None:
    np.save(tmp_path / "bias.npy", np.zeros(4585, dtype=np.float32))
    np.save(tmp_path / "double.npy", np.zeros((4585 * 2, 8), dtype=np.float32))
    np.save(tmp_path / "ok.npy", np.zeros((4585, 8), dtype=np.float32))
    bias = audit_embeddings(tmp_path / "bias.npy", 4585)
    assert (bias.shape, bias.k, bias.aligned) == ((4585,), None, False)  # a 1-D vector is no embedding matrix
    assert audit_embeddings(tmp_path / "double.npy", 4585).k == 2  # could be a description set of K=2 ...
    label = audit_embeddings(f"label={tmp_path / 'double.npy'}", 4585)  # ... unless it must be a label matrix
    assert (label.kind, label.k, label.aligned, label.path) == ("label", 2, False, str(tmp_path / "double.npy"))
    assert audit_embeddings(f"label={tmp_path / 'ok.npy'}", 4585).aligned
    args = ["audit-labels", "--vocab", str(RAM), "--embeddings", str(tmp_path / "double.npy")]
    described = runner.invoke(app, args)
    assert described.exit_code == 0 and "2 per tag" in described.stderr and "a description set" in described.stderr
    result = runner.invoke(app, [*args, "--embeddings", f"label={tmp_path / 'double.npy'}", "--fail-on", "misaligned",
                                 "--json"])
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert [(e["kind"], e["k"], e["aligned"]) for e in doc["embeddings"]] == [("auto", 2, True), ("label", 2, False)]


def test_unreadable_embedding_files_say_what_is_wrong(tmp_path: Path) -> None:
    junk = tmp_path / "junk.npy"
    junk.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(InputError, match=r"junk.npy: not a .npy/.npz file \(no NumPy or zip header\)"):
        audit_embeddings(junk, 4585)
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match=r"objects\.npy: not a readable \.npy/\.npz file.*Python objects"):
        audit_embeddings(tmp_path / "objects.npy", 4585)
    header = json.dumps({"__metadata__": {"format": "pt"}}).encode()
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(InputError) as err:
        audit_embeddings(empty, 4585)
    assert err.value.message == f"{empty}: holds no tensors"


def test_torch_embeddings(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    torch.save(torch.zeros(4585, 16), tmp_path / "label_embed.pth")
    torch.save(torch.zeros(4586, 16), tmp_path / "bad.pt")
    torch.save({"a": torch.zeros(4585, 4), "b": torch.zeros(4585 * 51, 4)}, tmp_path / "both.pt")
    (tmp_path / "junk.pt").write_bytes(b"this is not a torch file")
    good = audit_embeddings(tmp_path / "label_embed.pth", 4585)
    assert (good.shape, good.k, good.dtype) == ((4585, 16), 1, "float32")
    assert not audit_embeddings(tmp_path / "bad.pt", 4585).aligned
    with pytest.raises(InputError, match="cannot tell which"):
        audit_embeddings(tmp_path / "both.pt", 4585)
    assert audit_embeddings(f"{tmp_path / 'both.pt'}#b", 4585).k == 51
    result = runner.invoke(app, ["audit-labels", "--vocab", str(RAM), "--embeddings", str(tmp_path / "bad.pt"),
                                 "--embeddings", str(tmp_path / "label_embed.pth"), "--fail-on", "misaligned"])
    assert result.exit_code == 1 and "MISALIGNED" in result.stderr
    junk = runner.invoke(app, ["audit-labels", "--vocab", str(RAM), "--embeddings", str(tmp_path / "junk.pt")])
    assert junk.exit_code == 2 and "junk.pt: not a readable torch tensor file" in junk.stderr
    assert "Traceback" not in junk.stderr


def test_safetensors_embeddings_read_from_the_header(tmp_path: Path) -> None:
    save_file = pytest.importorskip("safetensors.numpy").save_file
    save_file({"label_embed": np.zeros((4585, 3), dtype=np.float32)}, str(tmp_path / "e.safetensors"))
    rep = audit_embeddings(tmp_path / "e.safetensors", 4585)
    assert (rep.key, rep.shape, rep.dtype, rep.k) == ("label_embed", (4585, 3), "F32", 1)
    (tmp_path / "bad.safetensors").write_bytes(b"\x05")
    with pytest.raises(InputError, match="not a safetensors file"):
        audit_embeddings(tmp_path / "bad.safetensors", 4585)
    with pytest.raises(InputError, match="not found"):
        audit_embeddings(tmp_path / "missing.npy", 4585)


# -- RAM benchmark text formats -------------------------------------------------------------------------------


def test_hico_ids_after_comma() -> None:
    annots = DATA / "hico_600_annots_head200.txt"
    report = audit_labels(DATA / "hico_600_taglist.txt", [annots])
    expected: Counter[int] = Counter()
    for line in annots.read_text().splitlines():
        expected.update(int(t) for t in line.split(",", 1)[1].split())
    assert report.annotations[0].format == "ram-text"
    assert report.annotations[0].samples == 200
    assert {i: int(c) for i, c in enumerate(report.counts) if c} == dict(expected)
    assert report.unknown == [] and report.problems == []


def test_imagenet_bare_image_lines_have_no_tags() -> None:
    report = audit_labels(DATA / "imagenet_multi_1000_taglist.txt", [DATA / "imagenet_multi_1000_annots_head200.txt"])
    assert report.frequency.samples == 200
    assert report.frequency.samples_without_tags == 13
    assert len(report.vocab.duplicates) == 2  # 'missile' and 'sunglasses'


def test_openimages_names_and_tag2text_ids() -> None:
    annots = DATA / "openimages_rare_200_ram_annots_head200.txt"
    report = audit_labels(DATA / "openimages_rare_200_ram_taglist.txt", [annots])
    names = (DATA / "openimages_rare_200_ram_taglist.txt").read_text().splitlines()
    expected = Counter(t for line in annots.read_text().splitlines() for t in line.split(",")[1:])
    assert {names[i]: int(c) for i, c in enumerate(report.counts) if c} == dict(expected)
    assert report.unknown == []

    ids_file = DATA / "openimages_common_214_tag2text_idannots_head200.txt"
    rep2 = audit_labels(DATA / "tag_list.txt", [ids_file])
    expected_ids = Counter(int(t) for line in ids_file.read_text().splitlines() for t in line.split(",")[1:])
    assert {i: int(c) for i, c in enumerate(rep2.counts) if c} == dict(expected_ids)
    # the same ids audited against the 4585-tag RAM list are just as valid (ids 3..2980 < 4585) ...
    assert audit_labels(RAM, [ids_file]).unknown == []
    # ... but against the 214-tag benchmark list most are out of range, each with its first line
    rep3 = audit_labels(DATA / "openimages_rare_200_ram_taglist.txt", [ids_file])
    first = ids_file.read_text().splitlines()[0].split(",")
    by_value = {u.value: u for u in rep3.unknown}
    assert by_value[int(first[1])].first.line == 1 and all(u.kind == "id" for u in rep3.unknown)


def test_text_formats_edge_cases(tmp_path: Path) -> None:
    vocab = tmp_path / "v.txt"
    vocab.write_text("dog\ncat food\nbird\n")
    spaces = tmp_path / "spaces.txt"
    spaces.write_bytes(b"a.jpg 0 2\r\nb.jpg 1 x 7\r\nc.jpg\r\n")
    rep = audit_labels(vocab, [spaces])
    assert rep.counts.tolist() == [1, 1, 1]
    assert [(p.code, p.first.line) for p in rep.problems] == [("bad_id", 2)]
    assert [(u.value, str(u.first)) for u in rep.unknown] == [(7, f"{spaces}:2")]
    assert rep.frequency.samples_without_tags == 1
    names = tmp_path / "names.txt"
    names.write_bytes(b"a.jpg,Dog,cat_food\nb.jpg,dog,,zebra\nc.jpg,\xff\n")
    rep = audit_labels(vocab, [names])
    assert rep.counts.tolist() == [2, 1, 0]
    assert [(u.value, u.first.line) for u in rep.unknown] == [("zebra", 2)]
    assert sorted((u.value, u.first.line) for u in rep.normalised_matches) == [("Dog", 1), ("cat_food", 1)]
    assert sorted((p.code, p.first.line) for p in rep.problems) == [("empty_tag", 2), ("not_utf8", 3)]
    forced = audit_labels(vocab, [names], fmt="ram-text-ids")  # names read as ids are findings, not crashes
    assert forced.problems[0].code == "bad_id"


def test_binary_file_is_refused_as_ram_text(tmp_path: Path) -> None:
    from PIL import Image

    jpeg = tmp_path / "photo.jpg"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(jpeg, quality=90)
    result = runner.invoke(app, ["audit-labels", "--vocab", str(RAM), str(jpeg)])
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert f"{jpeg}:1: holds a NUL byte: a binary file" in result.stderr
    utf16 = tmp_path / "annots.txt"
    utf16.write_text("a.jpg,dog,cat\n", encoding="utf-16")
    with pytest.raises(InputError, match=r"annots.txt:1: holds a NUL byte"):
        audit_labels(RAM, [utf16])
    later = tmp_path / "later.txt"  # NUL bytes after many good lines: still refused, naming the line
    later.write_bytes(b"a.jpg 1 2\n" * 1500 + b"b.jpg \x00\x01\n")
    with pytest.raises(InputError, match=r"later.txt:1501: holds a NUL byte"):
        audit_labels(RAM, [later], fmt="ram-text-ids")


# -- manifests -----------------------------------------------------------------------------------------------


def test_sample_manifest_jsonl() -> None:
    manifest = Path(__file__).parent.parent / "sample_data" / "manifest.jsonl"
    report = audit_labels(RAM, [manifest])
    assert report.annotations[0].format == "jsonl" and report.annotations[0].samples == 18
    assert [(u.kind, u.value, u.first.line) for u in report.unknown] == [("name", "feline friend", 18)]


def test_csv_json_parquet_manifests(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    csv_path = tmp_path / "m.csv"
    csv_path.write_text('image,labels\na.jpg,dog|cat\nb.jpg,"[""dog"", 2]"\nc.jpg,99\nd.jpg\n')
    rep = audit_labels(RAM, [csv_path])
    dog, cat = RAM_NAMES.index("dog"), RAM_NAMES.index("cat")
    counts = {i: int(c) for i, c in enumerate(rep.counts) if c}
    assert counts == {dog: 2, cat: 1, 2: 1, 99: 1}
    assert [(p.code, p.first.line) for p in rep.problems] == [("bad_record", 5)]
    json_path = tmp_path / "m.json"
    json_path.write_text(json.dumps([{"tags": ["dog", 4585]}, {"tags": "dog"}, {"tags": None}]))
    rep = audit_labels(RAM, [json_path])
    assert rep.annotations[0].format == "json"
    assert [(u.value, u.first.line) for u in rep.unknown] == [(4585, 1)]
    assert [p.code for p in rep.problems] == ["bad_type"]
    pq.write_table(pa.table({"image": ["a", "b"], "tag_ids": [[1, 2], [2, 5000]]}), tmp_path / "m.parquet")
    rep = audit_labels(RAM, [tmp_path / "m.parquet"])
    assert rep.counts[2] == 2 and [(u.value, u.first.line) for u in rep.unknown] == [(5000, 2)]
    with pytest.raises(InputError, match="column 'tagz'"):
        audit_labels(RAM, [csv_path], tags_column="tagz")
    (tmp_path / "none.jsonl").write_text('{"image": "a.jpg"}\n')
    with pytest.raises(InputError, match="no tags column"):
        audit_labels(RAM, [tmp_path / "none.jsonl"])


def test_jsonl_from_stdin_and_malformed_lines(tmp_path: Path) -> None:
    text = '{"tags": ["dog"]}\n{"tags": ["cat"\n{"tags": ["cat"]}\n'
    result = runner.invoke(app, ["audit-labels", "--vocab", str(RAM), "-", "--json", "--format", "jsonl"],
                           input=text.encode())
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["problems"][0]["code"] == "bad_record" and doc["problems"][0]["first"]["line"] == 2
    assert doc["problems"][0]["first"]["file"] == "<stdin>"
    assert doc["annotations"][0]["samples"] == 2


# -- RAM training JSON: streaming, types, exact lines ----------------------------------------------------------


def bad_records() -> list[tuple[Any, str | None]]:
    """Records and the problem code they cause (None: only an unknown id)."""
    return [
        (ram_record([1, 2, 3]), None),
        ({"image_path": "x", "caption": ["a"], "union_label_id": "12", "parse_label_id": [[1]]}, "bad_union_label_id"),
        (ram_record([1, "2"], n_caps=1), "bad_id"),
        (ram_record([4.0], n_caps=1), "bad_id"),
        (ram_record([True, 5], n_caps=1), "bad_id"),
        (ram_record([None], n_caps=1), "bad_id"),
        (ram_record([[6]], n_caps=1), "bad_id"),
        ({"image_path": "x", "caption": ["a"], "union_label_id": [7], "parse_label_id": [[7], [8]]},
         "parse_caption_mismatch"),
        ({"image_path": "x", "caption": ["a"], "union_label_id": [7], "parse_label_id": ["7"]},
         "bad_parse_label_id"),
        ({"image_path": "x", "union_label_id": [7], "parse_label_id": [[7]]}, "parse_caption_mismatch"),
        ([1, 2], "not_object"),
        ({"image_path": "x", "caption": []}, "missing_union_label_id"),
        (ram_record([4585, 3], n_caps=1), None),
        (ram_record([-1], n_caps=1), None),
        (ram_record([10**30], n_caps=1), None),
    ]


@pytest.mark.parametrize("layout", ["lines", "indent", "compact"])
@pytest.mark.parametrize("batches", ["default", "small", "slow"])
def test_wrong_types_and_unknown_ids_are_findings_with_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str, batches: str
) -> None:
    if batches == "small":
        monkeypatch.setattr(ramjson_mod, "_BATCH", 160)
        monkeypatch.setattr(ramjson_mod, "_READ", 333)
    elif batches == "slow":
        slow_only(monkeypatch)
    cases = bad_records()
    records = [ram_record([9, 10, 11]) for _ in range(20)] + [r for r, _ in cases] + [ram_record([9])] * 5
    path = tmp_path / "train.json"
    lines = write_ram_json(path, records, layout)
    report = audit_labels(RAM, [path])
    first_line = {}
    for k, (_rec, code) in enumerate(cases):
        if code is not None:
            first_line.setdefault(code, (lines[20 + k], 21 + k))
    got = {p.code: (p.first.line, p.first.record) for p in report.problems}
    assert got == first_line
    unknown = {u.value: (u.first.line, u.count) for u in report.unknown}
    # each of these ids is in union_label_id and in parse_label_id: two occurrences
    assert unknown == {4585: (lines[20 + 12], 2), -1: (lines[20 + 13], 2), 10**30: (lines[20 + 14], 2)}
    # not samples: the list, the record without union ids and the one whose union ids are a string
    assert report.annotations[0].samples == len(records) - 3
    assert report.counts[9] == 25 and report.counts[1] == 2  # [1, 2, 3] and [1, "2"]; the boolean true is no id 1


def test_cut_inside_a_caption_is_recovered_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ramjson_mod, "_BATCH", 120)
    monkeypatch.setattr(ramjson_mod, "_READ", 200)
    tricky = ram_record([5, 6], n_caps=1)
    tricky["caption"] = ['a "quoted" }, {"union_label_id": [4999]}, {  caption \\ with }, { braces']
    records = [ram_record([1, 2, 3]), tricky, ram_record([4600, 2]), tricky, ram_record([3])] * 4
    path = tmp_path / "t.json"
    lines = write_ram_json(path, records, "lines")
    fast = audit_labels(RAM, [path])
    assert [(u.value, u.first.line) for u in fast.unknown] == [(4600, lines[2])]
    assert fast.counts[5] == 8 and fast.problems == []
    slow_only(monkeypatch)
    assert summary(audit_labels(RAM, [path])) == summary(fast)


def test_records_larger_than_a_batch_or_a_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ramjson_mod, "_BATCH", 100)
    monkeypatch.setattr(ramjson_mod, "_READ", 64)
    huge = ram_record([7, 8], n_caps=2)
    huge["caption"] = ["x" * 5000, "y}, {" * 300]
    records = [ram_record([1]), huge, ram_record([4700]), huge, huge, ram_record([2])]
    path = tmp_path / "huge.json"
    lines = write_ram_json(path, records, "indent")
    report = audit_labels(RAM, [path])
    assert report.counts[7] == 3 and report.counts[2] == 1 and report.annotations[0].samples == 6
    assert [(u.value, u.first.line, u.first.record) for u in report.unknown] == [(4700, lines[2], 3)]


def count_fast_batches(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Record what the real bulk path answers for each batch (True: counted in bulk)."""
    answers: list[bool] = []
    real = tally_mod.Tally.ram_batch_fast

    def spy(self: Any, values: list[Any], loc_of: Any) -> bool:
        answers.append(real(self, values, loc_of))
        return answers[-1]

    monkeypatch.setattr(tally_mod.Tally, "ram_batch_fast", spy)
    return answers


@pytest.mark.parametrize("vocab_kind", ["smaller list", "ids with gaps"])
def test_unknown_ids_stay_on_the_bulk_path_with_exact_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vocab_kind: str
) -> None:
    rng = random.Random(7)
    records = []
    for k in range(400):
        ids = sorted(rng.sample(range(120), 6))
        if k % 9 == 4:
            ids.append(200 + k % 23)  # out of range for both vocabularies
        records.append(ram_record(ids, n_caps=1 + k % 3))
    records[100]["parse_label_id"][0].append(-5)  # only in a parse list
    path = tmp_path / "unk.json"
    lines = write_ram_json(path, records, "lines")
    if vocab_kind == "smaller list":
        vocab = Vocabulary(names=tuple(RAM_NAMES[:100]))  # ids 100..119 and 200..222 are out of range
    else:  # CSV-style explicit ids: 0..119 except the multiples of 10
        kept = [i for i in range(120) if i % 10]
        vocab = Vocabulary(names=tuple(RAM_NAMES[i] for i in kept), ids=tuple(kept))
    monkeypatch.setattr(ramjson_mod, "_BATCH", 2000)
    with monkeypatch.context() as m:
        answers = count_fast_batches(m)
        fast = audit_labels(vocab, [path], fmt="ram-json")
    assert len(answers) > 10 and all(answers)  # no batch fell back to the record-by-record path
    with monkeypatch.context() as m:
        slow_only(m)
        slow = audit_labels(vocab, [path], fmt="ram-json")
    assert summary(fast) == summary(slow)
    # and against an independent count
    known = set(vocab.ids)
    expected: Counter[int] = Counter()
    first: dict[int, int] = {}
    for k, r in enumerate(records):
        for i in [i for p in r["parse_label_id"] for i in p] + r["union_label_id"]:
            if i not in known:
                expected[i] += 1
                first.setdefault(i, k)
    assert {u.value: u.count for u in fast.unknown} == dict(expected)
    assert {u.value: (u.first.line, u.first.record) for u in fast.unknown} == {
        i: (lines[k], k + 1) for i, k in first.items()}
    assert fast.counts.sum() == sum(1 for r in records for i in r["union_label_id"] if i in known)
    assert fast.unknown_occurrences == sum(expected.values())


def test_capped_unknown_values_are_counted_and_flagged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    records = [ram_record([1, 5000 + k % 40, 6000 + k], n_caps=1) for k in range(300)]
    path = tmp_path / "many.json"
    write_ram_json(path, records, "compact")
    monkeypatch.setattr(tally_mod, "_MAX_TRACKED", 50)
    monkeypatch.setattr(ramjson_mod, "_BATCH", 1500)
    fast = audit_labels(RAM, [path])
    slow_only(monkeypatch)
    assert summary(audit_labels(RAM, [path])) == summary(fast)
    # record k brings two new values (5000 + k, 6000 + k) until k = 39: the first 25 records fill the 50 places
    assert {u.value for u in fast.unknown} == set(range(5000, 5025)) | set(range(6000, 6025))
    # untracked (union + parse): 5025..5039 in 7 records each, 6025..6299 once each
    assert fast.unknown_untracked == 2 * (15 * 7 + 275)
    assert fast.unknown_occurrences == 2 * 600
    doc = fast.to_dict()
    assert doc["unknown_truncated"] is True and doc["unknown_untracked"] == 760


@st.composite
def ram_files(draw: st.DrawFn) -> tuple[list[Any], str]:
    good_id = st.integers(0, 60)
    int_id = st.one_of(good_id, good_id, st.integers(-3, 4700))  # well-typed, some out of range (fast path)
    any_id = st.one_of(good_id, good_id, st.integers(-3, 4700), st.booleans(), st.floats(0, 5), st.text(max_size=3))
    typed = draw(st.booleans())  # a file whose records are all well-formed, some with unknown ids
    records = []
    for _ in range(draw(st.integers(0, 25))):
        valid = draw(st.booleans())
        pick = good_id if valid else int_id if typed else any_id
        ids = draw(st.lists(pick, max_size=6))
        n_caps = draw(st.integers(0, 3))
        parse = [draw(st.lists(pick, max_size=3)) for _ in range(n_caps)]
        rec: Any = {"image_path": draw(st.text(max_size=8)), "caption": [draw(st.text(max_size=12))
                                                                        for _ in range(n_caps)],
                    "union_label_id": ids, "parse_label_id": parse}
        if not valid and not typed and draw(st.integers(0, 5)) == 0:
            rec = draw(st.sampled_from([[1], "x", {"caption": ["a"]}, {**rec, "parse_label_id": 3},
                                        {**rec, "caption": ["a"] * (n_caps + 1)}]))
        records.append(rec)
    return records, draw(st.sampled_from(["lines", "indent", "compact"]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=ram_files())
def test_bulk_path_equals_record_by_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: tuple[list[Any], str]
) -> None:
    records, layout = case
    path = tmp_path / "h.json"
    write_ram_json(path, records, layout)
    vocab = Vocabulary(names=tuple(RAM_NAMES[:100]))  # ids 0..99; the strategy also writes -3..4700
    with monkeypatch.context() as m:
        m.setattr(ramjson_mod, "_BATCH", 90)
        m.setattr(ramjson_mod, "_READ", 150)
        fast = summary(audit_labels(vocab, [path], fmt="ram-json"))
    with monkeypatch.context() as m:
        m.setattr(tally_mod, "_MAX_TRACKED", 2)  # the cap on distinct unknowns must cut at the same values
        capped = summary(audit_labels(vocab, [path], fmt="ram-json"))
        slow_only(m)
        capped_slow = summary(audit_labels(vocab, [path], fmt="ram-json"))
    big = summary(audit_labels(vocab, [path], fmt="ram-json"))
    with monkeypatch.context() as m:
        slow_only(m)
        slow = summary(audit_labels(vocab, [path], fmt="ram-json"))
    assert fast == slow == big
    assert capped == capped_slow
    valid_ids = [i for r in records if isinstance(r, dict) and isinstance(r.get("union_label_id"), list)
                 for i in r["union_label_id"] if type(i) is int and 0 <= i < 100]
    assert sum(fast["counts"]) == len(valid_ids)


@pytest.mark.parametrize("batches", ["default", "small"])
def test_malformed_json_names_file_and_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batches: str) -> None:
    if batches == "small":
        monkeypatch.setattr(ramjson_mod, "_BATCH", 160)
        monkeypatch.setattr(ramjson_mod, "_READ", 333)
    records = [ram_record([k % 50, 60]) for k in range(80)]
    path = tmp_path / "bad.json"
    lines = write_ram_json(path, records, "indent")
    text = path.read_text().splitlines(keepends=True)
    broken_line = lines[57] + 3  # a line inside record 58
    text[broken_line - 1] = text[broken_line - 1].replace('"', "'", 1)
    path.write_text("".join(text))
    with pytest.raises(InputError) as err:
        audit_labels(RAM, [path])
    assert err.value.message.startswith(f"{path}:{broken_line}: invalid JSON")
    result = runner.invoke(app, ["audit-labels", "--vocab", str(RAM), str(path)])
    assert result.exit_code == 2 and f"{path}:{broken_line}: invalid JSON" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty file, expected a JSON list"),
        (b'{"union_label_id": [1]}', "expected a JSON list of records"),
        (b'[{"union_label_id": [1]},\n{"union_label_id": [2]},\n]', ":3: expected a value after ','"),
        (b'[{"union_label_id": [1]},\n{"union_label_id": [2]}\n', ":3: unexpected end of file inside the JSON list"),
        (b'[{"union_label_id": [1]},\n{"union_label_id": [2', ":2: invalid JSON"),
        (b'[{"union_label_id": [1]}\n{"union_label_id": [2]}]', ":2: expected ',' or ']' between list elements"),
        (b'[{"union_label_id": [1]}] [', ":1: unexpected data after the end of the JSON list"),
        (b'[{"union_label_id": [1]},\n{"caption": ["caf\xe9"], "union_label_id": [2]}]', ":2: not valid UTF-8"),
    ],
)
def test_broken_ram_json_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "x.json"
    path.write_bytes(content)
    with pytest.raises(InputError) as err:
        audit_labels(RAM, [path], fmt="ram-json")
    assert err.value.message.startswith(str(path)) and message in err.value.message


def test_bom_empty_list_and_stdin(tmp_path: Path) -> None:
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf  [ ]  \n")
    rep = audit_labels(RAM, [path], fmt="ram-json")
    assert rep.annotations[0].samples == 0 and len(rep.never_used) == 4585
    body = json.dumps([ram_record([1, 2]), ram_record([2, 4600])]).encode()
    result = runner.invoke(app, ["audit-labels", "--vocab", str(RAM), "-", "--json"], input=body)
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["annotations"][0]["format"] == "ram-json"
    assert doc["unknown"][0]["value"] == 4600 and doc["unknown"][0]["first"] == {"file": "<stdin>", "line": 1,
                                                                                  "record": 2}


def test_several_files_add_up(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.jsonl"
    write_ram_json(a, [ram_record([1, 2]), ram_record([2])])
    b.write_text('{"tags": ["3D glasses", "abacus"]}\n')
    rep = audit_labels(RAM, [a, b])
    assert [(x.format, x.samples, x.tag_refs) for x in rep.annotations] == [("ram-json", 2, 3), ("jsonl", 1, 2)]
    assert rep.counts[1] == 2 and rep.counts[2] == 3


# -- detection, usage errors, imports --------------------------------------------------------------------------


def test_detect_annotation_format() -> None:
    assert detect_annotation_format("x.json", b'[\n {"image_path": "a", "union_label_id": [1]') == "ram-json"
    assert detect_annotation_format("x.json", b'[{"tags": ["a"]}]') == "json"
    assert detect_annotation_format("x.json", b'[{"union_label_id": [1]}]', tags_column="union_label_id") == "json"
    assert detect_annotation_format("-", b'{"tags": []}\n') == "jsonl"
    assert detect_annotation_format("x.csv", b"image,tags\na,b\n") == "csv"
    assert detect_annotation_format("x.csv", b"img1.jpg,dog,cat\n") == "csv"  # .csv is a manifest
    assert detect_annotation_format("x.txt", b"img1.jpg,dog,cat\n") == "ram-text"
    assert detect_annotation_format("x.txt", b"image,tags\na.jpg,dog\n") == "csv"
    assert detect_annotation_format("x.txt", b"HICO_test2015_00000001.jpg,245\n") == "ram-text"
    assert detect_annotation_format("x", b"PAR1....") == "parquet"


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    base = ["audit-labels", "--vocab", str(RAM)]
    for args, text in [
        (["--format", "xml", str(RAM)], "unknown --format 'xml'"),
        (["--fail-on", "never-used,typo"], "unknown --fail-on category 'typo'"),
        (["-", "-"], "standard input ('-') can be read only once"),
        (["--plot", str(tmp_path / "p.png")], "need annotation files"),
        ([str(tmp_path / "missing.json")], "missing.json: no such file"),
        (["--format", "ram-json", "--tags-column", "x", str(RAM)], "--tags-column does not apply"),
    ]:
        result = runner.invoke(app, base + args)
        assert result.exit_code == 2, (args, result.stderr)
        assert text in result.stderr and result.stdout == ""
    assert runner.invoke(app, ["audit-labels", str(RAM)]).exit_code == 2  # --vocab missing
    assert runner.invoke(app, [*base, "--top", "0"]).exit_code == 2
    with pytest.raises(UsageError):
        audit_labels(RAM, [], fmt="nope")


def test_config_file_supplies_fail_on(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[audit-labels]\nvocab = "{RAM}"\nfail-on = ["duplicates"]\n')
    result = runner.invoke(app, ["--config", str(cfg), "audit-labels", "--aligned", str(RAM_ZH)])
    assert result.exit_code == 1 and "failing on: duplicates (195)" in result.stderr


def test_audit_module_imports_nothing_heavy() -> None:
    code = ("import sys, mmprep.labels.audit, mmprep.cli.cmd_labels\n"
            "print([m for m in ('torch', 'matplotlib', 'pandas', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent.parent).stdout
    assert out.strip() == "[]"
