"""``mmprep tokenize``: fixed-length token ids for every manifest row, and a token-length report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mmprep.cli._app import JsonOpt, QuietOpt, VerboseOpt, app, make_output, run_command
from mmprep.cli._options import (
    DEFAULT_MAX_TEXT_BYTES,
    MANIFEST_FORMATS,
    MaxTextBytesOpt,
    choices,
    max_text_bytes_from_option,
)
from mmprep.errors import EXIT_FAILED, EXIT_OK, MissingDependencyError

__all__ = ["tokenize"]


@app.command("tokenize")
def tokenize(
    manifest: Annotated[str, typer.Argument(metavar="MANIFEST", help="JSONL, JSON list, CSV or Parquet; - for stdin.")],
    tokenizer: Annotated[
        str, typer.Option("--tokenizer", metavar="DIR", help="Local tokenizer directory (save_pretrained layout).")
    ],
    max_length: Annotated[int, typer.Option("--max-length", metavar="N", help="Ids per row (pad or truncate).")],
    out: Annotated[str, typer.Option("--out", metavar="FILE.parquet", help="Parquet file to write.")],
    text_column: Annotated[
        str | None, typer.Option("--text-column", metavar="NAME", help="Text column (default: text/caption/...).")
    ] = None,
    id_column: Annotated[str | None, typer.Option("--id-column", metavar="NAME", help="Id column.")] = None,
    image_column: Annotated[
        str | None, typer.Option("--image-column", metavar="NAME", help="Image column (for placeholder counts).")
    ] = None,
    format: Annotated[
        str | None, typer.Option("--format", help="Manifest format (default: from name/content).",
                                 **choices(*MANIFEST_FORMATS))
    ] = None,
    caption: Annotated[
        str, typer.Option("--caption", help="For lists of captions: which caption.",
                          **choices("first", "all", "random"))
    ] = "first",
    seed: Annotated[int, typer.Option("--seed", help="Seed for --caption random (per-sample, deterministic).")] = 0,
    caption_separator: Annotated[
        str,
        typer.Option(
            "--caption-separator", metavar="TEXT", show_default=False,
            help="Joins captions for --caption all (default: one space).",
        ),
    ] = " ",
    padding_side: Annotated[str, typer.Option("--padding-side", help="Where padding goes.",
                                              **choices("right", "left"))] = "right",
    truncation_side: Annotated[
        str, typer.Option("--truncation-side", help="Which end a long text loses (special tokens are kept).",
                          **choices("right", "left"))
    ] = "right",
    no_special_tokens: Annotated[
        bool, typer.Option("--no-special-tokens", help="Do not add BOS/EOS/[CLS]/[SEP].")
    ] = False,
    pad_token: Annotated[
        str | None,
        typer.Option("--pad-token", metavar="TOKEN", help="Pad token (default: the tokenizer's, else its EOS)."),
    ] = None,
    image_placeholder: Annotated[
        str, typer.Option("--image-placeholder", metavar="TEXT", help="Image placeholder string.")
    ] = "<image>",
    no_placeholder_check: Annotated[
        bool, typer.Option("--no-placeholder-check", help="Do not require one placeholder per image.")
    ] = False,
    max_text_bytes: MaxTextBytesOpt = DEFAULT_MAX_TEXT_BYTES,
    batch_size: Annotated[int, typer.Option("--batch-size", metavar="N", help="Rows per tokenizer call.")] = 1024,
    plot: Annotated[
        str | None, typer.Option("--plot", metavar="FILE.png", help="Draw the token-length histogram.")
    ] = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Tokenise each row's text to fixed-length ids (Parquet) and report token lengths."""
    out_ = make_output(json_, quiet, verbose)

    def body() -> int:
        from mmprep.inputs.manifest import ColumnMap
        from mmprep.text.config import TextConfig
        from mmprep.text.encoder import TextEncoder
        from mmprep.text.lengths import check_plot_path, plot_lengths
        from mmprep.text.tokenize import tokenize_manifest

        cfg = TextConfig(
            max_length=max_length,
            padding_side=padding_side,
            truncation_side=truncation_side,
            add_special_tokens=not no_special_tokens,
            caption=caption,
            seed=seed,
            separator=caption_separator,
            pad_token=pad_token,
            image_placeholder=image_placeholder,
            check_placeholders=not no_placeholder_check,
            max_text_bytes=max_text_bytes_from_option(max_text_bytes),
        )
        cfg.validate()
        if plot is not None:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise MissingDependencyError("matplotlib", "plot", purpose="--plot") from None
            check_plot_path(plot, created=Path(out).parent)
        encoder = TextEncoder(tokenizer, cfg)
        for note in encoder.warnings:
            out_.warn(note)
        columns = ColumnMap(id=id_column, images=image_column, text=text_column)
        with out_.progress(None, "tokenize", unit="rows") as bar:
            report = tokenize_manifest(
                manifest, tokenizer, out, cfg, columns=columns, fmt=format, batch_size=batch_size,
                progress=bar.update, encoder=encoder,
            )
        for note in report.warnings[len(encoder.warnings) :]:  # the run's own (the encoder's were shown above)
            out_.warn(note)
        if plot is not None:
            title = f"{Path(manifest).name if manifest != '-' else 'stdin'} — {Path(report.tokenizer).name}"
            plot_lengths(report.histogram, max_length, plot, title=title)
            report.plot = plot
        _render(out_, report)
        if report.rows_in > 0 and report.rows_written == 0:
            top = next(iter(report.rejected_by_reason), "?")
            out_.error(f"no row could be tokenised (most common reason: {top})", hint=_hint_for(top))
            return EXIT_FAILED
        return EXIT_OK

    run_command(out_, body)


def _hint_for(reason: str) -> str:
    return {
        "placeholder_mismatch": "if this data does not use image placeholders, pass --no-placeholder-check",
        "text_missing": "name the text column with --text-column",
        "missing_column": "name the columns with --text-column/--image-column/--id-column",
        "text_too_large": "raise --max-text-bytes if texts this large are meant to be tokenised",
    }.get(reason, "see the rejects file for each row's reason")


def _render(out: object, report: object) -> None:
    from mmprep.output import Output
    from mmprep.text.tokenize import TokenizeReport

    assert isinstance(out, Output) and isinstance(report, TokenizeReport)
    if out.json_mode:
        out.emit_json(report)
        return
    lengths = report.lengths
    out.info(
        f"tokenised {report.rows_written:,} of {report.rows_in:,} rows with {report.tokenizer} -> {report.out} "
        f"({report.rows_rejected:,} rejected -> {report.rejects})"
    )
    if report.rows_written:
        out.table(
            f"token lengths (max length {lengths['max_length']})",
            ["statistic", "tokens"],
            [
                ["p50", lengths["p50"]],
                ["p90", lengths["p90"]],
                ["p99", lengths["p99"]],
                ["max", lengths["max"]],
                ["mean", lengths["mean"]],
                ["truncated rows", lengths["truncated"]],
                ["truncated %", f"{lengths['truncated_pct']:.2f}%"],
                ["max length covering 99%", lengths["covers_99_pct"]],
            ],
        )
    if report.rejected_by_reason:
        out.table("rejected rows", ["reason", "rows"], list(report.rejected_by_reason.items()))
        if "placeholder_mismatch" in report.rejected_by_reason:
            out.warn(f"placeholder mismatches: {_hint_for('placeholder_mismatch')}")
    if report.plot:
        out.info(f"length histogram -> {report.plot}")
