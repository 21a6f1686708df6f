"""``mmprep pack``: the main job."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from mmprep.cli._app import JsonOpt, QuietOpt, VerboseOpt, app, make_output, run_command
from mmprep.cli._options import (
    DEFAULT_MAX_TEXT_BYTES,
    MANIFEST_FORMATS,
    PANEL_IMAGES,
    PANEL_INPUT,
    PANEL_OUTPUT,
    PANEL_RUN,
    PANEL_TEXT,
    RESIZE_MODES,
    BackgroundOpt,
    FillOpt,
    ImageSizeOpt,
    InterpolationOpt,
    MaxPixelsOpt,
    MinPixelsOpt,
    NoDraftOpt,
    PackMaxTextBytesOpt,
    PixelLimitOpt,
    ResamplerOpt,
    ShortestEdgeOpt,
    choices,
    image_config_from_options,
    max_text_bytes_from_option,
)

if TYPE_CHECKING:
    from mmprep.output import Output
    from mmprep.pack.job import PackReport

# Panels of `pack --help`, in this order; the common options come first in each.
_IN, _IMG, _TXT, _OUT, _RUN = PANEL_INPUT, PANEL_IMAGES, PANEL_TEXT, PANEL_OUTPUT, PANEL_RUN


@app.command("pack")
def pack_cmd(
    # -- input
    manifest: Annotated[str, typer.Argument(help="JSONL (primary), JSON list, CSV or Parquet manifest: a path, a URI "
                                            "(file://, s3://, gs://, ...), or - for stdin.")],
    # --out is required, hence here; help shows it first in the Output panel
    out: Annotated[str, typer.Option("--out", "-o", metavar="DIR|URI", help="Output directory, or a URI such as "
                                     "s3://bucket/prefix.", rich_help_panel=_OUT)],
    image_root: Annotated[str | None, typer.Option(metavar="DIR|URI", help="Folder or URI image paths are relative "
                                                   "to (default: the manifest's folder).", rich_help_panel=_IN)] = None,
    image_column: Annotated[str | None, typer.Option(metavar="NAME", help="Image path field: one path or a list "
                                                     "(default: images/image/...).", rich_help_panel=_IN)] = None,
    text_column: Annotated[str | None, typer.Option(metavar="NAME", help="Text field: string, caption list or "
                                                    "conversation.", rich_help_panel=_IN)] = None,
    tags_column: Annotated[str | None, typer.Option(metavar="NAME", help="Tags field: names or ids.",
                                                    rich_help_panel=_IN)] = None,
    id_column: Annotated[str | None, typer.Option(metavar="NAME", help="Id field (default: id).",
                                                  rich_help_panel=_IN)] = None,
    format: Annotated[str | None, typer.Option(help="Manifest format (default: from name/content).",
                                               rich_help_panel=_IN, **choices(*MANIFEST_FORMATS))] = None,
    allow_outside_root: Annotated[bool, typer.Option(help="Allow image paths that leave --image-root (../, absolute,"
                                                     " symlinks).", rich_help_panel=_IN)] = False,
    image_check: Annotated[bool, typer.Option(help="Stop before any work when most of the first rows' images cannot "
                                              "be found (say where mmprep looked).", rich_help_panel=_IN)] = True,
    keep_columns: Annotated[str | None, typer.Option(metavar="A,B", help="Carry only these input columns (default: "
                                                     "every column mmprep does not read; '' for none).",
                                                     rich_help_panel=_IN)] = None,
    drop_columns: Annotated[str | None, typer.Option(metavar="A,B", help="Leave these input columns out.",
                                                     rich_help_panel=_IN)] = None,
    # -- images
    image_size: ImageSizeOpt = "224",
    resize_mode: Annotated[str | None, typer.Option(
        "--resize-mode", help="How images are resized (default: center-crop; none with --pad none).",
        show_default=False, rich_help_panel=_IMG, **choices(*RESIZE_MODES))] = None,
    limit_images: Annotated[int, typer.Option(metavar="N", help="Image slots per row (padded layout).",
                                              rich_help_panel=_IMG)] = 4,
    too_many_images: Annotated[str, typer.Option(help="Reject samples with more images than --limit-images, or "
                                                 "keep their first ones.", rich_help_panel=_IMG,
                                                 **choices("reject", "truncate"))] = "reject",
    pad: Annotated[str | None, typer.Option(help="max: padded tensors + masks; none: encoded images (HF Image "
                                            "storage). Default: max; none with --target easyr1|llamafactory.",
                                            show_default=False, rich_help_panel=_IMG, **choices("max", "none"))
                   ] = None,
    norm: Annotated[str | None, typer.Option(help="Normalisation preset.", rich_help_panel=_IMG,
                                             **choices("imagenet", "clip"))] = None,
    dtype: Annotated[str, typer.Option(help="uint8: raw pixels (mean/std recorded); float16/float32: normalised.",
                                       rich_help_panel=_IMG, **choices("uint8", "float16", "float32"))] = "uint8",
    layout: Annotated[str, typer.Option(help="Pixel layout.", rich_help_panel=_IMG, **choices("CHW", "HWC"))] = "CHW",
    mean: Annotated[str | None, typer.Option(metavar="R,G,B", help="Custom mean in [0,1].",
                                             rich_help_panel=_IMG)] = None,
    std: Annotated[str | None, typer.Option(metavar="R,G,B", help="Custom std in [0,1].",
                                            rich_help_panel=_IMG)] = None,
    stats_file: Annotated[str | None, typer.Option(metavar="FILE.json", help="mean/std from `mmprep image-stats "
                                                   "--json`.", rich_help_panel=_IMG)] = None,
    interpolation: InterpolationOpt = "bicubic",
    fill: FillOpt = "0,0,0",
    background: BackgroundOpt = "255,255,255",
    shortest_edge: ShortestEdgeOpt = None,
    max_pixels: MaxPixelsOpt = None,
    min_pixels: MinPixelsOpt = None,
    encode_format: Annotated[str, typer.Option(help="With --pad none: original (the file's bytes as they are) or "
                                               "re-encoded.", rich_help_panel=_IMG,
                                               **choices("original", "png", "jpeg", "webp"))] = "original",
    quality: Annotated[int, typer.Option(metavar="N", help="JPEG/WebP quality with --encode-format.",
                                         rich_help_panel=_IMG)] = 95,
    pixel_limit: PixelLimitOpt = 89_478_485,
    no_draft: NoDraftOpt = False,
    resampler: ResamplerOpt = "fast",
    device: Annotated[str, typer.Option(
        help="Decode and resize JPEGs on the GPU (cuda; needs the gpu extra, padded layout; other images take the "
             "CPU path) or where possible (auto).", rich_help_panel=_IMG, **choices("cpu", "cuda", "auto"))] = "cpu",
    # -- text and tags
    tokenizer: Annotated[str | None, typer.Option(metavar="DIR", help="Local Hugging Face tokenizer directory.",
                                                  rich_help_panel=_TXT)] = None,
    max_length: Annotated[int, typer.Option(metavar="N", help="Token ids per row (padded/truncated).",
                                            rich_help_panel=_TXT)] = 77,
    caption: Annotated[str, typer.Option(help="For caption lists: which caption.", rich_help_panel=_TXT,
                                         **choices("first", "all", "random"))] = "first",
    caption_separator: Annotated[str, typer.Option(metavar="TEXT", help="Joins the captions with --caption all "
                                                   "(default: one space).", show_default=False,
                                                   rich_help_panel=_TXT)] = " ",
    padding_side: Annotated[str, typer.Option(help="Where padding goes.", rich_help_panel=_TXT,
                                              **choices("right", "left"))] = "right",
    truncation_side: Annotated[str, typer.Option(help="Which end a long text loses.", rich_help_panel=_TXT,
                                                 **choices("right", "left"))] = "right",
    special_tokens: Annotated[bool, typer.Option(help="Add the tokenizer's special tokens.",
                                                 rich_help_panel=_TXT)] = True,
    pad_token: Annotated[str | None, typer.Option(metavar="TOKEN", help="Pad token for tokenizers without one "
                                                  "(e.g. GPT-2).", rich_help_panel=_TXT)] = None,
    image_placeholder: Annotated[str, typer.Option(metavar="TEXT", help="The image placeholder string in texts.",
                                                   rich_help_panel=_TXT)] = "<image>",
    placeholder_check: Annotated[bool, typer.Option(help="Require as many <image> placeholders as images when the "
                                                    "text has any.", rich_help_panel=_TXT)] = True,
    max_text_bytes: PackMaxTextBytesOpt = DEFAULT_MAX_TEXT_BYTES,
    vocab: Annotated[str | None, typer.Option(metavar="FILE", help="Tag vocabulary: tags are stored as ids.",
                                              rich_help_panel=_TXT)] = None,
    unknown_tags: Annotated[str, typer.Option(help="Reject samples with tags not in --vocab, or drop those tags "
                                              "(counted).", rich_help_panel=_TXT,
                                              **choices("reject", "drop"))] = "reject",
    # -- output
    split: Annotated[str, typer.Option(metavar="NAME", help="Name of the split written; packing another split into "
                                       "the same --out adds it.", rich_help_panel=_OUT)] = "train",
    target: Annotated[str, typer.Option(help="Lay the output out for a trainer: easyr1 adds problem/answer, "
                                        "llamafactory ShareGPT messages (both: encoded images).", rich_help_panel=_OUT,
                                        **choices("hf", "easyr1", "llamafactory"))] = "hf",
    shard_size: Annotated[str | None, typer.Option(metavar="SIZE", help="Shard size limit, e.g. 512MB (default).",
                                                   rich_help_panel=_OUT)] = None,
    rows_per_shard: Annotated[int | None, typer.Option(metavar="N", help="Rows per shard (instead of --shard-size).",
                                                       rich_help_panel=_OUT)] = None,
    row_group_rows: Annotated[int | None, typer.Option(metavar="N", help="Rows per Parquet row group (default "
                                                       "~32 MB).", rich_help_panel=_OUT)] = None,
    compression: Annotated[str, typer.Option(help="Parquet compression.", rich_help_panel=_OUT,
                                             **choices("zstd", "lz4", "snappy", "none"))] = "zstd",
    shuffle: Annotated[bool, typer.Option(help="Shuffle rows deterministically by --seed (the line column maps "
                                          "back).", rich_help_panel=_OUT)] = False,
    seed: Annotated[int, typer.Option(metavar="N", help="Seed for --caption random and --shuffle.",
                                      rich_help_panel=_OUT)] = 0,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run, keeping finished shards.",
                                         rich_help_panel=_OUT)] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace mmprep's files from an earlier run in --out.",
                                            rich_help_panel=_OUT)] = False,
    # -- run
    workers: Annotated[int | None, typer.Option(metavar="N", help="Worker processes, or Ray actors with --engine ray "
                                                "(default: all cores; the cluster's CPUs with --ray-address).",
                                                rich_help_panel=_RUN)] = None,
    engine: Annotated[str, typer.Option(help="local: a process pool; ray: Ray Data (pip install 'mmprep\\[ray]').",
                                        rich_help_panel=_RUN, **choices("local", "ray"))] = "local",
    ray_address: Annotated[str | None, typer.Option(metavar="ADDRESS", help="Ray cluster for --engine ray, e.g. "
                                                    "ray://head:10001 (default: $RAY_ADDRESS, else a local Ray on "
                                                    "this machine).", rich_help_panel=_RUN)] = None,
    on_error: Annotated[str, typer.Option(help="skip: bad rows go to rejected.jsonl; fail: stop at the first.",
                                          rich_help_panel=_RUN, **choices("skip", "fail"))] = "skip",
    max_reject_rate: Annotated[float, typer.Option(metavar="RATE", help="Fail the run (exit 1) above this rejected "
                                                   "fraction.", rich_help_panel=_RUN)] = 1.0,
    storage_option: Annotated[list[str] | None, typer.Option(
        "--storage-option", metavar="KEY=VALUE",
        help="fsspec option for remote URIs (s3://, gs://, ...), repeatable; never recorded. Prefer credentials "
             "from the environment.", rich_help_panel=_RUN)] = None,
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
        pad_mode = pad or ("none" if target in ("easyr1", "llamafactory") else "max")

        cfg = PackConfig(
            manifest=manifest,
            out=out,
            format=format,
            columns=ColumnMap(id=id_column, images=image_column, text=text_column, tags=tags_column),
            image_root=image_root,
            allow_outside_root=allow_outside_root,
            image=image_config_from_options(
                # --pad none keeps image sizes unless told otherwise; padded slots need one size
                resize_mode=resize_mode or ("none" if pad_mode == "none" else "center-crop"), image_size=image_size,
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
            pad=pad_mode,
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
                max_text_bytes=max_text_bytes_from_option(max_text_bytes),
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
            device=device,
            split=split,
            target=target,
            keep_columns=_names(keep_columns),
            drop_columns=_names(drop_columns) or (),
        )
        total = _count_rows(manifest)
        with output.progress(total, "pack", unit="row", keep=True) as bar:
            import time

            images = [0]
            start = time.perf_counter()

            def progress(rows: int, imgs: int) -> None:
                images[0] += imgs
                bar.set_postfix(images=images[0], **{"img/s": f"{images[0] / (time.perf_counter() - start):.1f}"})
                bar.update(rows)

            def phase(text: str) -> None:
                bar.phase(text)
                if not bar.shown:
                    output.debug(f"pack: {text} ({time.perf_counter() - start:.1f} s)")

            report = pack(cfg, workers=workers, resume=resume, overwrite=overwrite, engine=engine,
                          progress=progress, ray_address=ray_address, storage_options=storage_options,
                          check_images=image_check, on_phase=phase)
            bar.finish(report.read, images=report.images_written, **{"img/s": f"{report.images_per_s:.1f}"})
        _render(output, report)
        if report.failed:
            hint = f"see {report.rejects} for every rejected row and its reason"
            top = max(report.rejected_by_reason.items(), key=lambda kv: kv[1], default=("", 0))[0]
            if top == "image_missing":
                hint += "; image paths are read relative to --image-root (default: the manifest's folder)"
            elif top == "path_outside_root":
                hint += ("; image paths may not leave --image-root (default: the manifest's folder): set it to the "
                         "folder that holds the images, or pass --allow-outside-root for absolute paths")
            if report.written:
                hint += "; to index the shards written anyway, rerun with --resume and a higher --max-reject-rate"
            output.error(report.failed, hint)
            return 1
        return 0

    run_command(output, body, interrupted_hint=_resume_hint(manifest, resume=resume, overwrite=overwrite))


def _names(text: str | None) -> tuple[str, ...] | None:
    """``a,b`` as column names (None when the flag is not given; ``''`` is no column)."""
    if text is None:
        return None
    return tuple(n.strip() for n in text.split(",") if n.strip())


def _resume_hint(manifest: str, *, resume: bool, overwrite: bool) -> str:
    """How to continue an interrupted pack (local engine and Ray alike: finished shards are on disk)."""
    if manifest == "-":
        return ("the shards finished so far are kept, but --resume needs the manifest as a file: save stdin to a "
                "file and run the same command on it with --resume")
    if resume:
        return "the shards finished so far are kept: run the same command again to continue"
    how = "with --resume instead of --overwrite" if overwrite else "with --resume"
    return f"the shards finished so far are kept: to continue, run the same command {how}"


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
    output.debug(f"split {report.split}; extra columns: {', '.join(report.columns) or 'none'}")
    for note in report.notes:
        output.info(note)
    for shard in report.shards:
        output.debug(f"  {shard.path}: {shard.rows} rows, {shard.bytes:,} bytes, sha256 {shard.sha256[:16]}…")
    if output.json_mode:
        output.emit_json(report)
        return
    output.table(
        f"pack → {report.out} (split {report.split})",
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
            *((("device", report.device),) if report.device != "cpu" else ()),
            ("seconds", round(report.seconds, 2)),
            ("samples/s", round(report.samples_per_s, 1)),
            ("images/s", round(report.images_per_s, 1)),
            ("peak RSS (MB)", round(report.peak_rss_mb)),
        ],
    )
    if report.rejected and not output.quiet:
        output.info(f"rejected rows and reasons: {report.out}/{report.rejects}")
