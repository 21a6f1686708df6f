"""`mmprep tokenize` end to end: real manifests and tokenizers in, real Parquet and rejects out."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _text_helpers import CLIP_DIR, MINILM_DIR, REPO, TEXT_DATA, build_bytelevel_bpe
from typer.testing import CliRunner

from mmprep.cli import app
from mmprep.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from mmprep.inputs.manifest import iter_samples
from mmprep.text import tokenize as text_tokenize
from mmprep.text.config import TextConfig
from mmprep.text.encoder import TextEncoder
from mmprep.text.lengths import LengthHistogram, _length_bins, _short_title
from mmprep.text.tokenize import tokenize_manifest, tokenize_samples

runner = CliRunner()
SAMPLE_MANIFEST = REPO / "sample_data" / "manifest.jsonl"
COLUMNS = ["id", "line", "input_ids", "attention_mask", "n_tokens", "num_truncated_tokens", "truncated"]


def _run(*args: str, input: bytes | None = None):
    return runner.invoke(app, ["tokenize", *args], input=input)


def _rejects(out: Path) -> list[dict]:
    path = out.with_name(out.name + ".rejected.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sample_manifest_with_clip_json_report(tmp_path: Path) -> None:
    out = tmp_path / "tokens.parquet"
    result = _run(str(SAMPLE_MANIFEST), "--tokenizer", str(CLIP_DIR), "--max-length", "20", "--out", str(out), "--json")
    assert result.exit_code == EXIT_OK, result.stderr
    report = json.loads(result.stdout)  # stdout is only the JSON report
    table = pq.read_table(out)
    assert table.column_names == COLUMNS
    # The token columns have the types of `mmprep pack` shards.
    assert table.schema.field("input_ids").type == pa.list_(pa.int32(), 20)
    assert table.schema.field("attention_mask").type == pa.list_(pa.int8(), 20)
    assert table.num_rows == report["rows_written"] == report["rows_in"] == 18
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == [f"s{i:03d}" for i in range(1, 19)]
    assert [r["line"] for r in rows] == list(range(1, 19))
    assert all(len(r["input_ids"]) == 20 and len(r["attention_mask"]) == 20 for r in rows)
    assert all(sum(r["attention_mask"]) == min(r["n_tokens"], 20) for r in rows)
    assert all(r["truncated"] == (r["n_tokens"] > 20) for r in rows)
    assert all(r["num_truncated_tokens"] == max(0, r["n_tokens"] - 20) for r in rows)
    assert rows[0]["input_ids"][0] == 49406
    lengths = report["lengths"]
    ns = sorted(r["n_tokens"] for r in rows)
    assert lengths["max"] == ns[-1] and lengths["p50"] == ns[8]  # nearest rank: ceil(0.5 * 18) = 9th
    assert lengths["truncated"] == sum(n > 20 for n in ns)
    assert lengths["covers_99_pct"] == ns[-1]
    assert report["rejected_by_reason"] == {} and _rejects(out) == []
    meta = json.loads(pq.read_schema(out).metadata[b"mmprep"])
    assert meta["max_length"] == 20 and meta["pad_token_id"] == 49407
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokens.parquet", "tokens.parquet.rejected.jsonl"]


def test_human_report_goes_to_stderr(tmp_path: Path) -> None:
    out = tmp_path / "t.parquet"
    result = _run(str(SAMPLE_MANIFEST), "--tokenizer", str(MINILM_DIR), "--max-length", "16", "--out", str(out))
    assert result.exit_code == EXIT_OK
    assert result.stdout == ""
    for word in ("p50", "p90", "p99", "truncated %", "max length covering 99%", "tokenised 18 of 18 rows"):
        assert word in result.stderr


def test_every_row_lands_in_exactly_one_place(tmp_path: Path) -> None:
    demo = json.loads((TEXT_DATA / "mllm_demo.json").read_text())
    rows = [
        {"id": "ok-2img", "messages": demo[0]["messages"], "images": demo[0]["images"]},
        {"id": "lost-image", "messages": demo[0]["messages"], "images": demo[0]["images"][:1]},
        {"id": "no-text", "messages": None, "images": []},
        {"id": "bad-type", "messages": 42, "images": []},
        {"id": "ok-1img", "messages": demo[1]["messages"], "images": demo[1]["images"]},
    ]
    manifest = tmp_path / "m.jsonl"
    lines = [json.dumps(r) for r in rows]
    lines.insert(3, "{not json")
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "o.parquet"
    result = _run(str(manifest), "--tokenizer", str(MINILM_DIR), "--max-length", "32", "--out", str(out), "--json")
    assert result.exit_code == EXIT_OK, result.stderr
    report = json.loads(result.stdout)
    written = pq.read_table(out).to_pylist()
    rejected = _rejects(out)
    assert [r["id"] for r in written] == ["ok-2img", "ok-1img"]
    assert {r["line"]: r["reason"] for r in rejected} == {
        2: "placeholder_mismatch", 3: "text_missing", 4: "invalid_json", 5: "text_bad_type"
    }
    assert sorted([r["line"] for r in written] + [r["line"] for r in rejected]) == list(range(1, 7))
    assert report["rows_in"] == 6 and report["rows_written"] == 2 and report["rows_rejected"] == 4
    mismatch = next(r for r in rejected if r["reason"] == "placeholder_mismatch")
    assert mismatch["id"] == "lost-image" and "2 <image> placeholders but 1 image" in mismatch["detail"]
    assert mismatch["stage"] == "text" and f"{manifest}:2" in mismatch["detail"]
    # --no-placeholder-check keeps the mismatched row.
    result = _run(
        str(manifest), "--tokenizer", str(MINILM_DIR), "--max-length", "32", "--out", str(out),
        "--no-placeholder-check", "--json",
    )
    assert json.loads(result.stdout)["rows_written"] == 3


def test_real_formats_llava_list_typed_parts_parquet_and_stdin(tmp_path: Path) -> None:
    out = tmp_path / "o.parquet"
    cases = [
        (TEXT_DATA / "llava_instruct_3.json", 3),
        (TEXT_DATA / "v1_multimodal_demo_4.jsonl", 4),
        (TEXT_DATA / "llamafactory_mllm_example_dataset_test-0.parquet", 3),
        (TEXT_DATA / "coco_fakecap_results_60.json", 60),
    ]
    for path, n in cases:
        result = _run(str(path), "--tokenizer", str(CLIP_DIR), "--max-length", "77", "--out", str(out), "--json")
        assert result.exit_code == EXIT_OK, (path, result.stderr)
        assert json.loads(result.stdout)["rows_written"] == n == pq.read_table(out).num_rows, path
    coco = pq.read_table(out).to_pylist()
    assert coco[0]["id"] == "L2"  # the COCO results file has no id column: ids come from positions
    data = (TEXT_DATA / "v1_multimodal_demo_4.jsonl").read_bytes()
    result = _run("-", "--tokenizer", str(CLIP_DIR), "--max-length", "77", "--out", str(out), "--json", input=data)
    assert result.exit_code == EXIT_OK, result.stderr
    assert json.loads(result.stdout)["manifest"] == "-" and pq.read_table(out).num_rows == 4


def test_caption_modes(tmp_path: Path) -> None:
    manifest = TEXT_DATA / "coco_caption_lists.jsonl"
    totals = {}
    for mode in ("first", "all", "random"):
        out = tmp_path / f"{mode}.parquet"
        result = _run(
            str(manifest), "--tokenizer", str(MINILM_DIR), "--max-length", "200", "--out", str(out),
            "--caption", mode, "--seed", "7", "--json",
        )
        assert result.exit_code == EXIT_OK, result.stderr
        totals[mode] = pq.read_table(out).column("n_tokens").to_pylist()
    assert all(a > f for a, f in zip(totals["all"], totals["first"], strict=True))
    assert totals["random"] != totals["first"]


def test_padding_and_truncation_sides(tmp_path: Path) -> None:
    out = tmp_path / "o.parquet"
    result = _run(
        str(SAMPLE_MANIFEST), "--tokenizer", str(MINILM_DIR), "--max-length", "12", "--out", str(out),
        "--padding-side", "left", "--truncation-side", "left", "--json",
    )
    assert result.exit_code == EXIT_OK, result.stderr
    rows = pq.read_table(out).to_pylist()
    short = next(r for r in rows if r["n_tokens"] < 12)
    assert short["attention_mask"][0] == 0 and short["attention_mask"][-1] == 1 and short["input_ids"][0] == 0
    long = next(r for r in rows if r["truncated"])
    assert long["input_ids"][0] == 101 and long["input_ids"][-1] == 102


def test_gpt2_style_tokenizer_pad_fallback_and_explicit_pad(tmp_path: Path) -> None:
    tok = build_bytelevel_bpe(tmp_path / "gpt2")
    out = tmp_path / "o.parquet"
    result = _run(str(SAMPLE_MANIFEST), "--tokenizer", str(tok), "--max-length", "64", "--out", str(out), "--json")
    assert result.exit_code == EXIT_OK, result.stderr
    assert "no pad token" in result.stderr and "EOS" in result.stderr
    report = json.loads(result.stdout)
    assert any("no pad token" in w for w in report["warnings"])
    assert report["config"]["pad_token_id"] == 0  # <|endoftext|> is the first special token of the trained BPE
    result = _run(
        str(SAMPLE_MANIFEST), "--tokenizer", str(tok), "--max-length", "64", "--out", str(out), "--pad-token", "nope!"
    )
    assert result.exit_code == EXIT_USAGE and "not a token" in result.stderr and "Traceback" not in result.stderr


def test_plot(tmp_path: Path) -> None:
    from PIL import Image

    out, png = tmp_path / "o.parquet", tmp_path / "lengths.png"
    result = _run(
        str(SAMPLE_MANIFEST), "--tokenizer", str(CLIP_DIR), "--max-length", "16", "--out", str(out),
        "--plot", str(png), "--json",
    )
    assert result.exit_code == EXIT_OK, result.stderr
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (800, 450)
        im.load()
    assert json.loads(result.stdout)["plot"] == str(png)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lengths.png", "o.parquet", "o.parquet.rejected.jsonl"]


def test_a_plot_beside_the_output_in_a_folder_the_run_creates(tmp_path: Path) -> None:
    """The README's `--out tok/tokens.parquet --plot tok/lengths.png` was refused: tok/ did not exist yet."""
    out, png = tmp_path / "tok" / "tokens.parquet", tmp_path / "tok" / "lengths.png"
    result = _run(str(SAMPLE_MANIFEST), "--tokenizer", str(CLIP_DIR), "--max-length", "16", "--out", str(out),
                  "--plot", str(png))
    assert result.exit_code == EXIT_OK, result.stderr
    assert out.is_file() and png.is_file()


@pytest.mark.parametrize("where", ["missing-dir", "is-a-dir"])
def test_bad_plot_destination_is_a_usage_error_before_any_work(tmp_path: Path, where: str) -> None:
    png = tmp_path / "missing" / "p.png" if where == "missing-dir" else tmp_path
    out = tmp_path / "o.parquet"
    result = _run(
        str(SAMPLE_MANIFEST), "--tokenizer", str(CLIP_DIR), "--max-length", "16", "--out", str(out),
        "--plot", str(png), "--json",
    )
    assert result.exit_code == EXIT_USAGE
    assert "--plot" in result.stderr and "Traceback" not in result.stderr and result.stdout == ""
    assert list(tmp_path.iterdir()) == []  # nothing tokenised, nothing written


@pytest.mark.parametrize("max_length", [1, 5, 16, 77, 200, 399, 400, 1000])
def test_length_bins_put_the_max_length_on_a_bin_edge(max_length: int) -> None:
    rng = np.random.default_rng(max_length)
    hist = LengthHistogram()
    hist.add(rng.integers(0, 700, size=500))
    starts, rows, width = _length_bins(hist.counts, max_length)
    assert width == int(np.ceil(len(hist.counts) / 120)) and np.all(np.diff(starts) == width)
    assert starts[0] <= 0 < starts[0] + width and starts[-1] < len(hist.counts) <= starts[-1] + width
    assert (max_length + 1 - starts[0]) % width == 0  # max_length + 1 starts a bin: kept and truncated never share
    assert int(rows.sum()) == hist.total
    values = np.repeat(np.arange(len(hist.counts)), hist.counts)
    assert rows.tolist() == [int(((values >= a) & (values < a + width)).sum()) for a in starts]


def test_long_plot_titles_are_shortened() -> None:
    assert _short_title("coco.json — clip") == "coco.json — clip"
    long = "/very/long/path/" * 10 + "manifest.jsonl — " + "tokenizer" * 5
    short = _short_title(long)
    assert len(short) == 70 and "…" in short and short.startswith("/very/long") and short.endswith("tokenizer")


def test_plot_without_matplotlib_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    out = tmp_path / "o.parquet"
    result = _run(
        str(SAMPLE_MANIFEST), "--tokenizer", str(CLIP_DIR), "--max-length", "16", "--out", str(out),
        "--plot", str(tmp_path / "p.png"),
    )
    assert result.exit_code == EXIT_USAGE
    assert "matplotlib" in result.stderr and "mmprep[plot]" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tokenizer", "/no/such/dir", "--max-length", "8"], "no such tokenizer directory"),
        (["--tokenizer", str(CLIP_DIR), "--max-length", "0"], "--max-length must be a positive integer"),
        (["--tokenizer", str(CLIP_DIR), "--max-length", "8", "--padding-side", "top"], "--padding-side"),
        (["--tokenizer", str(CLIP_DIR), "--max-length", "8", "--caption", "best"], "--caption"),
        (["--tokenizer", str(CLIP_DIR), "--max-length", "2"], "special tokens"),
        (["--tokenizer", str(CLIP_DIR), "--max-length", "8", "--batch-size", "0"], "--batch-size"),
    ],
)
def test_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    result = _run(str(SAMPLE_MANIFEST), *args, "--out", str(tmp_path / "o.parquet"))
    assert result.exit_code == EXIT_USAGE
    assert message in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_huge_max_length_is_a_usage_error(tmp_path: Path) -> None:
    result = _run(str(SAMPLE_MANIFEST), "--tokenizer", str(CLIP_DIR), "--max-length", "1000000000",
                  "--out", str(tmp_path / "o.parquet"))
    assert result.exit_code == EXIT_USAGE
    assert "above the limit of 1,048,576" in result.stderr and "internal error" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_large_max_length_uses_smaller_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = TextConfig(max_length=1000)
    enc = TextEncoder(CLIP_DIR, cfg)
    manifest = TEXT_DATA / "coco_fakecap_results_60.json"
    full = tmp_path / "full.parquet"
    tokenize_manifest(str(manifest), CLIP_DIR, full, cfg, encoder=enc)
    monkeypatch.setattr(text_tokenize, "_BUFFER_BYTES", 5 * 1000 * 7)  # room for 7 padded rows
    batches: list[int] = []
    small = tmp_path / "small.parquet"
    report = tokenize_manifest(str(manifest), CLIP_DIR, small, cfg, encoder=enc, progress=batches.append)
    assert batches == [7] * 8 + [4] and report.rows_written == 60
    assert pq.ParquetFile(small).metadata.row_group(0).num_rows == 7
    assert pq.read_table(small).equals(pq.read_table(full))


def test_duplicate_ids_are_kept_and_flagged(tmp_path: Path) -> None:
    """Real LLaVA QA data repeats an image id for each question: rows are kept, the reuse is counted and warned."""
    manifest = tmp_path / "m.jsonl"
    rows = [{"id": "a", "text": "one"}, {"id": "b", "text": "two"}, {"id": "a", "text": "three"},
            {"id": "a", "text": "four"}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "o.parquet"
    result = _run(str(manifest), "--tokenizer", str(CLIP_DIR), "--max-length", "8", "--out", str(out), "--json")
    assert result.exit_code == EXIT_OK, result.stderr
    written = pq.read_table(out).to_pylist()
    assert [(r["id"], r["line"]) for r in written] == [("a", 1), ("b", 2), ("a", 3), ("a", 4)]
    assert _rejects(out) == []
    report = json.loads(result.stdout)
    assert report["duplicate_ids"] == 2
    (note,) = [w for w in report["warnings"] if "reuse an id" in w]
    assert f"{manifest}:3: id 'a' already used on line 1" in note and "duplicate_id" in note
    assert "reuse an id" in result.stderr
    unique = _run(str(SAMPLE_MANIFEST), "--tokenizer", str(CLIP_DIR), "--max-length", "8", "--out", str(out), "--json")
    assert json.loads(unique.stdout)["duplicate_ids"] == 0 and "reuse an id" not in unique.stderr


def test_tokenize_samples_writes_what_tokenize_manifest_writes(tmp_path: Path) -> None:
    cfg = TextConfig(max_length=32)
    enc = TextEncoder(MINILM_DIR, cfg)
    manifest = TEXT_DATA / "mllm_demo.json"
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    ra = tokenize_manifest(str(manifest), MINILM_DIR, a, cfg, encoder=enc)
    rb = tokenize_samples(list(iter_samples(str(manifest))), b, enc, source=str(manifest))
    assert a.read_bytes() == b.read_bytes()
    assert (ra.rows_in, ra.rows_written, ra.lengths) == (rb.rows_in, rb.rows_written, rb.lengths)


def test_help_shows_the_caption_separator_default() -> None:
    result = runner.invoke(app, ["tokenize", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == EXIT_OK
    assert "(default: one space)" in result.stdout and "[default:  ]" not in result.stdout


def test_missing_manifest_and_output_directory(tmp_path: Path) -> None:
    result = _run(str(tmp_path / "nope.jsonl"), "--tokenizer", str(CLIP_DIR), "--max-length", "8",
                  "--out", str(tmp_path / "o.parquet"))
    assert result.exit_code == EXIT_USAGE and "no such file" in result.stderr
    # missing folders of --out are created, as pack creates its output folder
    out = tmp_path / "a" / "b" / "o.parquet"
    result = _run(str(SAMPLE_MANIFEST), "--tokenizer", str(CLIP_DIR), "--max-length", "8", "--out", str(out))
    assert result.exit_code == EXIT_OK, result.stderr
    assert pq.read_table(out).num_rows == 18 and (out.parent / "o.parquet.rejected.jsonl").is_file()
    # a file where a folder should be is refused before any work
    (tmp_path / "f").write_text("")
    result = _run(str(SAMPLE_MANIFEST), "--tokenizer", str(CLIP_DIR), "--max-length", "8",
                  "--out", str(tmp_path / "f" / "x" / "o.parquet"))
    assert result.exit_code == EXIT_USAGE and f"{tmp_path / 'f'} is not a directory" in result.stderr
    # a tokenizer that fails to load leaves no folder behind
    empty = tmp_path / "empty-tokenizer"
    empty.mkdir()
    result = _run(str(SAMPLE_MANIFEST), "--tokenizer", str(empty), "--max-length", "8",
                  "--out", str(tmp_path / "c" / "o.parquet"))
    assert result.exit_code == EXIT_USAGE and not (tmp_path / "c").exists()


def test_all_rows_rejected_exits_1_with_a_hint(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        "\n".join(json.dumps({"id": i, "text": "no placeholder here", "images": ["a.jpg"], "conversations": None})
                  for i in range(3)) + "\n"
    )
    out = tmp_path / "o.parquet"
    result = _run(str(manifest), "--tokenizer", str(CLIP_DIR), "--max-length", "8", "--out", str(out),
                  "--text-column", "conversations")
    assert result.exit_code == EXIT_FAILED
    assert "no row could be tokenised" in result.stderr and "--text-column" in result.stderr
    assert pq.read_table(out).num_rows == 0 and len(_rejects(out)) == 3


def test_config_file_supplies_defaults(tmp_path: Path) -> None:
    cfg = tmp_path / "mmprep.toml"
    cfg.write_text(
        f'[tokenize]\ntokenizer = "{MINILM_DIR.as_posix()}"\nmax-length = 40\ncaption = "all"\n'
        'caption-separator = " / "\nformat = "jsonl"\n'
    )
    out = tmp_path / "o.parquet"
    manifest = TEXT_DATA / "coco_caption_lists.jsonl"
    result = runner.invoke(app, ["--config", str(cfg), "tokenize", str(manifest), "--out", str(out), "--json"])
    assert result.exit_code == EXIT_OK, result.stderr
    report = json.loads(result.stdout)
    assert report["config"]["max_length"] == 40 and report["config"]["separator"] == " / "
    assert len(pq.read_table(out).column("input_ids")[0]) == 40
