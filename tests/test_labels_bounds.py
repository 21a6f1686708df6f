"""Label inputs are bounded (issue 19, items 10 and 17):

* a vocabulary that is /dev/zero, a binary file or one endless line is a one-line error, found early;
* the linear-time rewrites of the audit (normalisation, duplicate search, never-used list, JSON report) give the
  results of the straightforward definitions.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mmprep.cli import app
from mmprep.errors import InputError
from mmprep.labels.audit import TagCount, TagList, audit_labels
from mmprep.labels.audit.hygiene import duplicate_groups
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
    assert Vocabulary(names=("a", "b")).sequential
