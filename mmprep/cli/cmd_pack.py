"""``mmprep pack``: the main job."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from mmprep.cli._app import JsonOpt, QuietOpt, VerboseOpt, app, make_output, run_command
from mmprep.cli._options import (
    BackgroundOpt,
    FillOpt,
    ImageSizeOpt,
    InterpolationOpt,
    MaxPixelsOpt,
    MinPixelsOpt,
    NoDraftOpt,
    PixelLimitOpt,
    ResamplerOpt,
    ShortestEdgeOpt,
    image_config_from_options,
)

if TYPE_CHECKING:
    from mmprep.output import Output
    from mmprep.pack.job import PackReport

_IMG = "Images"
_TXT = "Text"
_OUT = "Output"
_IN = "Input"


@app.command("pack")
def pack_cmd(
    manifest: Annotated[str, typer.Argument(help="JSONL (primary), JSON list, CSV or Parquet manifest: a path, a URI "
                                            "(file://, s3://, gs://, ...), or - for stdin.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Output directory, or a URI such as s3://bucket/prefix.",
                                     rich_help_panel=_OUT)],
    format: Annotated[str | None, typer.Option(help="Manifest format (default: from name/content).",
                                               rich_help_panel=_IN)] = None,
    id_column: Annotated[str | None, typer.Option(help="Id field (default: id).", rich_help_panel=_IN)] = None,
    image_column: Annotated[str | None, typer.Option(help="Image path field: one path or a list (default: images/"
                                                     "image/...).", rich_help_panel=_IN)] = None,
    text_column: Annotated[str | None, typer.Option(help="Text field: string, caption list or conversation.",
                                                    rich_help_panel=_IN)] = None,
    tags_column: Annotated[str | None, typer.Option(help="Tags field: names or ids.", rich_help_panel=_IN)] = None,
    image_root: Annotated[str | None, typer.Option(help="Folder or URI image paths are relative to (default: the "
                                                   "manifest's folder).", rich_help_panel=_IN)] = None,
    allow_outside_root: Annotated[bool, typer.Option(help="Allow image paths that leave --image-root (../, absolute,"
                                                     " symlinks).", rich_help_panel=_IN)] = False,
    image_size: ImageSizeOpt = "224",
    resize_mode: Annotated[str | None, typer.Option(
        "--resize-mode", metavar="stretch|center-crop|letterbox|shortest-edge|max-pixels|none",
        help="How images are resized (default: center-crop; none with --pad none).", show_default=False,
        rich_help_panel=_IMG)] = None,
    interpolation: InterpolationOpt = "bicubic",
    background: BackgroundOpt = "255,255,255",
    fill: FillOpt = "0,0,0",
    shortest_edge: ShortestEdgeOpt = None,
    max_pixels: MaxPixelsOpt = None,
    min_pixels: MinPixelsOpt = None,
    pixel_limit: PixelLimitOpt = 89_478_485,
    no_draft: NoDraftOpt = False,
    resampler: ResamplerOpt = "fast",
    norm: Annotated[str | None, typer.Option(help="Normalisation preset: imagenet|clip.", rich_help_panel=_IMG)] = None,
    mean: Annotated[str | None, typer.Option(help="Custom mean R,G,B in [0,1].", rich_help_panel=_IMG)] = None,
    std: Annotated[str | None, typer.Option(help="Custom std R,G,B in [0,1].", rich_help_panel=_IMG)] = None,
    stats_file: Annotated[str | None, typer.Option(help="mean/std from `mmprep image-stats --json`.",
                                                   rich_help_panel=_IMG)] = None,
    dtype: Annotated[str, typer.Option(help="uint8 (raw pixels; mean/std recorded) | float16 | float32 (normalised).",
                                       rich_help_panel=_IMG)] = "uint8",
    layout: Annotated[str, typer.Option(help="CHW or HWC.", rich_help_panel=_IMG)] = "CHW",
    limit_images: Annotated[int, typer.Option(help="Image slots per row (padded layout).",
                                              rich_help_panel=_IMG)] = 4,
    too_many_images: Annotated[str, typer.Option(help="reject|truncate samples with more images than the limit.",
                                                 rich_help_panel=_IMG)] = "reject",
    pad: Annotated[str, typer.Option(help="max: padded tensors + masks; none: encoded images (HF Image storage).",
                                     rich_help_panel=_IMG)] = "max",
    encode_format: Annotated[str, typer.Option(help="With --pad none: original (file bytes as-is) | png | jpeg | "
                                               "webp.", rich_help_panel=_IMG)] = "original",
    quality: Annotated[int, typer.Option(help="JPEG/WebP quality with --encode-format.", rich_help_panel=_IMG)] = 95,
    tokenizer: Annotated[str | None, typer.Option(help="Local Hugging Face tokenizer directory.",
                                                  rich_help_panel=_TXT)] = None,
    max_length: Annotated[int, typer.Option(help="Token ids per row (padded/truncated).", rich_help_panel=_TXT)] = 77,
    padding_side: Annotated[str, typer.Option(help="right|left.", rich_help_panel=_TXT)] = "right",
    truncation_side: Annotated[str, typer.Option(help="right|left.", rich_help_panel=_TXT)] = "right",
    special_tokens: Annotated[bool, typer.Option(help="Add the tokenizer's special tokens.",
                                                 rich_help_panel=_TXT)] = True,
    caption: Annotated[str, typer.Option(help="For caption lists: first|all|random.", rich_help_panel=_TXT)] = "first",
    caption_separator: Annotated[str, typer.Option(help="Joins the captions with --caption all (default: one "
                                                   "space).", show_default=False, rich_help_panel=_TXT)] = " ",
    image_placeholder: Annotated[str, typer.Option(help="The image placeholder string in texts.",
                                                   rich_help_panel=_TXT)] = "<image>",
    seed: Annotated[int, typer.Option(help="Seed for --caption random and --shuffle.")] = 0,
    pad_token: Annotated[str | None, typer.Option(help="Pad token for tokenizers without one (e.g. GPT-2).",
                                                  rich_help_panel=_TXT)] = None,
    placeholder_check: Annotated[bool, typer.Option(help="Require as many <image> placeholders as images when the "
                                                    "text has any.", rich_help_panel=_TXT)] = True,
    vocab: Annotated[str | None, typer.Option(help="Tag vocabulary: tags are stored as ids.",
                                              rich_help_panel=_TXT)] = None,
    unknown_tags: Annotated[str, typer.Option(help="reject|drop samples' tags not in --vocab (drops are counted).",
                                              rich_help_panel=_TXT)] = "reject",
    shard_size: Annotated[str | None, typer.Option(help="Shard size limit, e.g. 512MB (default).",
                                                   rich_help_panel=_OUT)] = None,
    rows_per_shard: Annotated[int | None, typer.Option(help="Rows per shard (instead of --shard-size).",
                                                       rich_help_panel=_OUT)] = None,
    row_group_rows: Annotated[int | None, typer.Option(help="Rows per Parquet row group (default ~32 MB).",
                                                       rich_help_panel=_OUT)] = None,
    compression: Annotated[str, typer.Option(help="zstd|lz4|snappy|none.", rich_help_panel=_OUT)] = "zstd",
    shuffle: Annotated[bool, typer.Option(help="Shuffle rows deterministically by --seed (the line column maps "
                                          "back).", rich_help_panel=_OUT)] = False,
    workers: Annotated[int | None, typer.Option(help="Worker processes, or Ray actors with --engine ray (default: "
                                                "all cores; the cluster's CPUs with --ray-address).",
                                                rich_help_panel=_OUT)] = None,
    on_error: Annotated[str, typer.Option(help="skip: bad rows go to rejected.jsonl; fail: stop at the first.",
                                          rich_help_panel=_OUT)] = "skip",
    max_reject_rate: Annotated[float, typer.Option(help="Fail the run (exit 1) above this rejected fraction.",
                                                   rich_help_panel=_OUT)] = 1.0,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run, keeping finished shards.",
                                         rich_help_panel=_OUT)] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace mmprep's files from an earlier run in --out.",
                                            rich_help_panel=_OUT)] = False,
    engine: Annotated[str, typer.Option(help="local (process pool) or ray (Ray Data; pip install 'mmprep\\[ray]').",
                                        rich_help_panel=_OUT)] = "local",
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster for --engine ray, e.g. ray://head:10001 "
                                                    "(default: $RAY_ADDRESS, else a local Ray on this machine).",
                                                    rich_help_panel=_OUT)] = None,
    storage_option: Annotated[list[str] | None, typer.Option(
        "--storage-option", metavar="KEY=VALUE",
        help="fsspec option for remote URIs (s3://, gs://, ...), repeatable; never recorded. Prefer credentials "
             "from the environment.", rich_help_panel=_OUT)] = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Pack a manifest into padded Parquet shards with masks, an index and a rejects file."""
    output = make_output(json_, quiet, verbose)

    def body() -> int:
        from mmprep.cli._parse import parse_bytes
        from mmprep.images.decode import Normalization
        from mmprep.inputs.manifest import ColumnMap
        from mmprep.pack.config import PackConfig
        from mmprep.pack.job import pack
        from mmprep.runtime.storage import parse_storage_options
        from mmprep.text.config import TextConfig

        storage_options = parse_storage_options(storage_option)

        cfg = PackConfig(
            manifest=manifest,
            out=out,
            format=format,
            columns=ColumnMap(id=id_column, images=image_column, text=text_column, tags=tags_column),
            image_root=image_root,
            allow_outside_root=allow_outside_root,
            image=image_config_from_options(
                # --pad none keeps image sizes unless told otherwise; padded slots need one size
                resize_mode=resize_mode or ("none" if pad == "none" else "center-crop"), image_size=image_size,
                interpolation=interpolation,
                shortest_edge=shortest_edge, max_pixels=max_pixels, min_pixels=min_pixels,
                background=background, fill=fill, pixel_limit=pixel_limit, no_draft=no_draft,
                resampler=resampler,
            ),
            norm=Normalization.from_spec(
                norm,
                mean,
                std,
                stats_file,
                dtype,
                layout,
            ),
            limit_images=limit_images,
            too_many_images=too_many_images,
            pad=pad,
            encode_format=encode_format,
            encode_quality=quality,
            tokenizer=tokenizer,
            text=TextConfig(
                max_length=max_length,
                padding_side=padding_side,
                truncation_side=truncation_side,
                add_special_tokens=special_tokens,
                caption=caption,
                seed=seed,
                separator=caption_separator,
                pad_token=pad_token,
                image_placeholder=image_placeholder,
                check_placeholders=placeholder_check,
            ),
            vocab=vocab,
            unknown_tags=unknown_tags,
            shard_size=parse_bytes(shard_size) if shard_size else None,
            rows_per_shard=rows_per_shard,
            row_group_rows=row_group_rows,
            compression=compression,
            shuffle=shuffle,
            seed=seed,
            on_error=on_error,
            max_reject_rate=max_reject_rate,
        )
        total = _count_rows(manifest)
        with output.progress(total, "pack", unit="row") as bar:
            import time

            images = [0]
            start = time.perf_counter()

            def progress(rows: int, imgs: int) -> None:
                images[0] += imgs
                bar.update(rows)
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(images=images[0], img_per_s=f"{images[0] / elapsed:.1f}")

            report = pack(cfg, workers=workers, resume=resume, overwrite=overwrite, engine=engine,
                          progress=progress, ray_address=ray_address, storage_options=storage_options)
        _render(output, report)
        if report.failed:
            hint = "see rejected.jsonl for every rejected row and its reason"
            if report.written:
                hint += "; to index the shards written anyway, rerun with --resume and a higher --max-reject-rate"
            output.error(report.failed, hint)
            return 1
        return 0

    run_command(output, body)


def _count_rows(manifest: str) -> int | None:
    """A quick row estimate for the progress bar (newlines of a JSONL/CSV file under 2 GB)."""
    import os

    from mmprep.runtime.storage import is_local, local_path

    if manifest == "-" or not is_local(manifest) or not manifest.lower().endswith((".jsonl", ".ndjson", ".csv",
                                                                                    ".tsv")):
        return None
    manifest = local_path(manifest)
    import stat

    try:
        st = os.stat(manifest)
        if not stat.S_ISREG(st.st_mode) or st.st_size > 2 << 30:  # a pipe must not be read here (rows lost)
            return None
        with open(manifest, "rb") as f:
            n = sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 22), b""))
    except OSError:
        return None
    return n - 1 if manifest.lower().endswith((".csv", ".tsv")) else n


def _render(output: Output, report: PackReport) -> None:
    output.debug(f"engine {report.engine}, {report.workers} worker(s); {report.rows_per_shard} rows per shard, "
                 f"{len(report.shards)} shard(s), {report.resumed_shards} resumed from an earlier run")
    for shard in report.shards:
        output.debug(f"  {shard.path}: {shard.rows} rows, {shard.bytes:,} bytes, sha256 {shard.sha256[:16]}…")
    if output.json_mode:
        output.emit_json(report)
        return
    output.table(
        f"pack → {report.out}",
        ["", "value"],
        [
            ("rows read", report.read),
            ("rows written", report.written),
            ("rows rejected", report.rejected),
            *((f"  rejected: {reason}", n) for reason, n in report.rejected_by_reason.items()),
            ("images written", report.images_written),
            ("images dropped (--too-many-images truncate)", report.images_dropped),
            ("texts truncated at --max-length", report.text_truncated),
            ("image-count histogram", ", ".join(f"{k}:{v}" for k, v in report.image_count_histogram.items())),
            ("shards", f"{len(report.shards)} ({report.rows_per_shard} rows each at most)"),
            ("bytes written", report.bytes_written),
            ("resumed shards", report.resumed_shards),
            ("seconds", round(report.seconds, 2)),
            ("samples/s", round(report.samples_per_s, 1)),
            ("images/s", round(report.images_per_s, 1)),
            ("peak RSS (MB)", round(report.peak_rss_mb)),
        ],
    )
    if report.rejected and not output.quiet:
        output.info(f"rejected rows and reasons: {report.out}/rejected.jsonl")
