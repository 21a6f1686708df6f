"""``mmprep inspect`` and ``mmprep verify``: look at and check a packed directory."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from mmprep.cli._app import JsonOpt, QuietOpt, VerboseOpt, app, make_output, run_command
from mmprep.dataset.format import INDEX_NAME

SplitOpt = Annotated[str | None, typer.Option("--split", help="Which split (default: the only one, else train).")]

StorageOpt = Annotated[list[str] | None, typer.Option(
    "--storage-option", metavar="KEY=VALUE",
    help="fsspec option for a remote dataset (s3://, gs://, ...), e.g. endpoint_url=http://host:9000; repeatable; "
         "never shown. Prefer credentials from the environment.")]

if TYPE_CHECKING:
    from mmprep.dataset.inspect import DatasetSummary
    from mmprep.dataset.sheet import SheetInfo
    from mmprep.dataset.verify import VerifyReport
    from mmprep.output import Output


@app.command("inspect")
def inspect_cmd(
    path: Annotated[str, typer.Argument(help="A packed directory (the --out of `mmprep pack`): a path or a URI "
                                        "such as s3://bucket/ds.")],
    sheet: Annotated[str | None, typer.Option(metavar="OUT.png", help="Write a contact sheet of sampled rows as "
                                              "the model sees them.")] = None,
    samples: Annotated[int, typer.Option(help="Rows on the contact sheet.")] = 8,
    seed: Annotated[int, typer.Option(help="Which rows the contact sheet samples.")] = 0,
    vocab: Annotated[str | None, typer.Option(help="Vocabulary file for tag names (default: the one recorded at "
                                              "pack time, when reachable; else ids).")] = None,
    top_tags: Annotated[int, typer.Option(help="Most frequent tags to list.")] = 10,
    split: SplitOpt = None,
    storage_option: StorageOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Summarise a packed directory (rows, shards, sizes, image counts, tokens, tags, rejects); --sheet draws rows."""
    output = make_output(json_, quiet, verbose)

    def body() -> int:
        from mmprep.dataset.inspect import summarize
        from mmprep.dataset.reader import PackedDataset
        from mmprep.dataset.sheet import contact_sheet
        from mmprep.runtime.storage import parse_storage_options

        ds = PackedDataset(path, split=split, storage_options=parse_storage_options(storage_option))
        summary = summarize(ds, vocab=vocab, top_tags=top_tags)
        info = contact_sheet(ds, sheet, samples=samples, seed=seed, vocab=vocab) if sheet else None
        _render_summary(output, summary, info)
        return 0

    run_command(output, body)


@app.command("verify")
def verify_cmd(
    path: Annotated[str, typer.Argument(help="A packed directory (the --out of `mmprep pack`): a path or a URI "
                                        "such as s3://bucket/ds (each shard is downloaded to a temporary file).")],
    deep: Annotated[bool, typer.Option(help="Also check the pixel bytes of padding slots (padded layout) or "
                                       "decode every image (encoded layout).")] = False,
    split: SplitOpt = None,
    storage_option: StorageOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Re-hash every shard against index.json and check schema, metadata and row accounting (exit 1 on mismatch)."""
    output = make_output(json_, quiet, verbose)

    def body() -> int:
        from mmprep.dataset.index_file import read_index
        from mmprep.dataset.verify import entry_bytes, verify
        from mmprep.runtime.storage import parse_storage_options

        options = parse_storage_options(storage_option)
        total = sum(entry_bytes(e) for e in read_index(path, options, split=split).entries)
        with output.progress(total, "verify", unit="B") as bar:
            report = verify(path, split=split, deep=deep, progress=bar.update, storage_options=options)
        _render_verify(output, report)
        return 0 if report.ok else 1

    run_command(output, body)


def _render_summary(output: Output, s: DatasetSummary, info: SheetInfo | None) -> None:
    from mmprep.dataset.inspect import EncodedImagesSummary, PixelSummary

    if output.json_mode:
        report = {"summary": s, "sheet": info}
        output.emit_json(report)
        return
    rows: list[tuple[str, object]] = [
        ("split", s.split),
        ("layout", s.layout),
        ("rows", s.rows),
        ("shards", s.shards),
        ("bytes", s.bytes),
        ("bytes per row", s.bytes_per_row),
    ]
    px = s.pixels
    if isinstance(px, PixelSummary):
        rows += [("pixels", f"{px.dtype} {px.shape} {px.layout}" + (" normalised" if px.normalized else " raw")),
                 ("resize mode", px.resize_mode), ("mean / std", f"{px.mean} / {px.std}")]
    elif isinstance(px, EncodedImagesSummary):
        rows.append(("images", f"encoded ({px.encoding})"))
    rows.append(("images", s.images))
    if s.text:
        rows.append(("tokenizer", f"{s.text.get('tokenizer')} (max length {s.text.get('max_length')})"))
    output.table(f"inspect → {s.path}", ["", "value"], rows)
    total = sum(s.image_count_histogram.values()) or 1
    output.table("images per row", ["images", "rows", "share"],
                 [(k, v, f"{v / total:.1%}") for k, v in s.image_count_histogram.items()])
    if s.tokens:
        t = s.tokens
        output.table("tokens per row (before truncation)", ["min", "mean", "p50", "p95", "max", "max length",
                                                            "truncated"],
                     [(t.min, t.mean, t.p50, t.p95, t.max, t.max_length, t.truncated)])
    if s.tags:
        g = s.tags
        output.table("tags", ["per row min", "mean", "max", "distinct", "names from"],
                     [(g.per_row_min, g.per_row_mean, g.per_row_max, g.distinct, g.names_from or "stored names")],
                     caption="top: " + ", ".join(f"{name} ({n})" for name, n in g.top))
        if g.names_from == "ids":
            output.warn(f"tags shown as ids: {g.vocab_lookup}")
        elif g.vocab_lookup is not None:
            output.info(f"tag names from {g.vocab_lookup}")
    output.table("rows read, written, rejected", ["", "rows"],
                 [("read", s.read), ("written", s.rows), ("rejected", s.rejected),
                  *((f"  {reason}", n) for reason, n in s.rejected_by_reason.items())])
    if output.verbose:
        output.table("shards", ["shard", "rows", "bytes"], [(x.path, x.rows, x.bytes) for x in s.shard_list])
    if info is not None:
        output.info(f"contact sheet: {info.path} ({len(info.indices)} rows, {info.width}x{info.height} px, tags: "
                    f"{info.tags})")


def _render_verify(output: Output, r: VerifyReport) -> None:
    if output.json_mode:
        output.emit_json(r)
        return
    if r.findings:
        output.table(f"verify → {r.path}: {len(r.findings)} problem(s)", ["where", "check", "what"],
                     [(f.where, f.check, f.message) for f in r.findings])
        for f in r.findings:
            if output.quiet:
                output.error(f"{f.where}: {f.check}: {f.message}")
        output.error(f"{len(r.findings)} problem(s) in {r.shards - r.shards_ok} of {r.shards} shards"
                     + (" and the dataset files" if any(not f.where.endswith(".parquet")
                                                         for f in r.findings) else ""),
                     hint="rerun the same `mmprep pack` command with --resume (it rewrites shards whose hash "
                          "differs from its records), or restore the files from a copy")
        return
    output.info(f"ok: split {r.split}: {r.shards} shards, {r.rows:,} rows, {r.bytes:,} bytes match {INDEX_NAME}"
                + (" (deep: pixel padding / image decoding checked)" if r.deep else ""))
