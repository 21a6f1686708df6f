"""``mmprep image-stats`` and ``mmprep normalize-images``.

The image decoding/resizing options are shared with ``pack`` and live in :mod:`mmprep.cli._options`. Nothing heavy
(numpy, Pillow) is imported at module level.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mmprep.cli._app import JsonOpt, QuietOpt, VerboseOpt, app, make_output, run_command
from mmprep.cli._options import (
    IMAGE_OPTION_NAMES,
    MANIFEST_FORMATS,
    BackgroundOpt,
    FillOpt,
    ImageSizeOpt,
    InterpolationOpt,
    MaxPixelsOpt,
    MinPixelsOpt,
    NoDraftOpt,
    PixelLimitOpt,
    ResamplerOpt,
    ResizeModeOpt,
    ShortestEdgeOpt,
    choices,
    image_config_from_options,
)
from mmprep.errors import EXIT_FAILED, EXIT_OK, InputError, RunFailed, UsageError
from mmprep.runtime.files import atomic_write

if TYPE_CHECKING:
    from mmprep.images.collect import ImageSet
    from mmprep.output import Output

__all__ = ["image_stats", "normalize_images_cmd"]

SrcArg = Annotated[str, typer.Argument(help="An image folder (scanned recursively) or a manifest (- for stdin).",
                                       show_default=False)]
ImageRootOpt = Annotated[str | None, typer.Option(
    "--image-root", metavar="DIR",
    help="Folder manifest image paths are relative to (default: the manifest's folder).")]
InputFormatOpt = Annotated[str | None, typer.Option(
    "--input-format", help="Manifest format when the name does not tell.", **choices(*MANIFEST_FORMATS))]
ImageColumnOpt = Annotated[str | None, typer.Option(
    "--image-column", metavar="NAME",
    help="Manifest column with the image path(s) (default: found by name: images, image, ...).")]
AllowOutsideOpt = Annotated[bool, typer.Option(
    "--allow-outside-root", help="Accept image paths (../, absolute, symlinks) that lead outside the image root.")]
WorkersOpt = Annotated[int, typer.Option(
    "--workers", "-j", metavar="N", help="Worker processes (0 = all cores).")]
LimitOpt = Annotated[int | None, typer.Option("--limit", metavar="N", help="Only the first N distinct images.")]


def _local(value: str, what: str, command: str) -> str:
    """A plain local path for ``value`` (a path or ``file://`` URI); any other URI is a usage error."""
    from mmprep.runtime.storage import is_local, local_path, redact, scheme_of

    if not is_local(value):
        raise UsageError(
            f"{what} {redact(value)}: {command} reads and writes local files only, not {scheme_of(value)}:// URIs",
            hint="use a local path or file:///path; `mmprep pack` reads and writes remote storage (s3://, gs://, ...)")
    return local_path(value)


def _workers(n: int) -> int:
    from mmprep.runtime.engines import MAX_WORKERS
    from mmprep.runtime.engines.base import default_workers

    if not 0 <= n <= MAX_WORKERS:
        raise UsageError(f"--workers must be 0 (all cores) to {MAX_WORKERS}, got {n}")
    return n or default_workers()


def _collect(src: str, image_root: str | None, input_format: str | None, image_column: str | None,
             allow_outside_root: bool, limit: int | None, exclude: tuple[str, ...] = (),
             command: str = "image-stats") -> ImageSet:
    from mmprep.images.collect import IMAGE_EXTENSIONS, collect_images
    from mmprep.inputs.manifest import ColumnMap

    src = _local(src, "SRC", command)
    if image_root is not None:
        image_root = _local(image_root, "--image-root", command)
    if limit is not None and limit <= 0:
        raise UsageError(f"--limit must be positive, got {limit}")
    if Path(src).suffix.lower() in IMAGE_EXTENSIONS and Path(src).is_file():
        raise InputError(f"{src}: is an image, expected a folder of images or a manifest",
                         hint="pass the folder that holds it")
    try:
        images = collect_images(
            src, image_root=image_root, allow_outside_root=allow_outside_root, input_format=input_format,
            column_map=ColumnMap(images=image_column), exclude=exclude, limit=limit,
        )
    except InputError as exc:  # the manifest reader names its format flag --format; here it is --input-format
        if exc.hint and "--format" in exc.hint:
            raise InputError(exc.message, hint=exc.hint.replace("--format", "--input-format")) from None
        raise
    if not images.items:
        if images.kind == "folder":
            raise InputError(f"{src}: no image files found",
                             hint="files are picked by extension: " + " ".join(sorted(IMAGE_EXTENSIONS)))
        raise InputError(f"{src}: the manifest names no images",
                         hint="check the image column (--image-column NAME)")
    return images


def _report_manifest_rejects(out: Output, images: ImageSet) -> None:
    if images.manifest_rejects:
        first = images.manifest_rejects[0]
        out.warn(f"{len(images.manifest_rejects)} manifest row(s) could not be read, e.g. {first.detail}")


@app.command("image-stats")
def image_stats(
    src: SrcArg,
    image_root: ImageRootOpt = None,
    input_format: InputFormatOpt = None,
    image_column: ImageColumnOpt = None,
    allow_outside_root: AllowOutsideOpt = False,
    resize_mode: ResizeModeOpt = "center-crop",
    image_size: ImageSizeOpt = "224",
    interpolation: InterpolationOpt = "bicubic",
    shortest_edge: ShortestEdgeOpt = None,
    max_pixels: MaxPixelsOpt = None,
    min_pixels: MinPixelsOpt = None,
    background: BackgroundOpt = "255,255,255",
    fill: FillOpt = "0,0,0",
    pixel_limit: PixelLimitOpt = 89_478_485,
    no_draft: NoDraftOpt = False,
    resampler: ResamplerOpt = "fast",
    workers: WorkersOpt = 0,
    limit: LimitOpt = None,
    out: Annotated[str | None, typer.Option(
        "--out", metavar="FILE.json", help="Also write the statistics JSON here (usable as --stats-file).")] = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Per-channel mean/std, sizes, modes and unreadable files of an image folder or manifest."""
    image_opts = {k: v for k, v in locals().items() if k in IMAGE_OPTION_NAMES}
    ui = make_output(json_, quiet, verbose)

    def body() -> int:
        from mmprep.images.stats import compute_image_stats
        from mmprep.output import to_jsonable

        cfg = image_config_from_options(**image_opts)
        n_workers = _workers(workers)
        out_file = _local(out, "--out", "image-stats") if out else None
        images = _collect(src, image_root, input_format, image_column, allow_outside_root, limit)
        _report_manifest_rejects(ui, images)
        ui.debug(f"{len(images.items)} images from {images.kind} {src}, {n_workers} worker(s)")
        with ui.progress(len(images.items), "image-stats", unit="img") as bar:
            stats = compute_image_stats(images, cfg, workers=n_workers, on_progress=bar.update)
        report = stats.to_dict()
        if out_file and stats.decoded:  # with nothing decoded there are no statistics to use as --stats-file
            import json

            _write_text(Path(out_file), json.dumps(to_jsonable(report), indent=2, allow_nan=False) + "\n")
        if ui.json_mode:
            ui.emit_json(report)
        else:
            _render_stats(ui, report)
            if out_file and stats.decoded:
                ui.info(f"statistics written to {out_file} (use it with --stats-file)")
        if stats.decoded == 0:
            where = "the 'unreadable' list of the JSON output" if ui.json_mode else "the reasons above"
            not_written = f"; {out_file} was not written" if out_file else ""
            raise RunFailed(f"none of the {stats.images} images could be decoded{not_written}",
                            hint=f"see {where}; the first is: " + stats.unreadable[0].detail)
        return EXIT_OK

    run_command(ui, body)


def _write_text(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunFailed(f"{path}: cannot write: {exc.strerror or exc}") from None
    atomic_write(path, text.encode("utf-8"))


def _render_stats(out: Output, r: dict[str, Any]) -> None:
    cfg = r["config"]
    size = "x".join(map(str, cfg["size"])) if cfg["size"] and cfg["resize_mode"] in (
        "stretch", "center-crop", "letterbox") else "-"
    out.info(
        f"{r['decoded']:,} of {r['images']:,} images decoded from {r['source']} "
        f"(resize {cfg['resize_mode']} {size}, {r['elapsed_s']:.1f}s)"
    )
    if r["decoded"]:
        d = r["distance"]
        rows = []
        for c, ch in enumerate("RGB"):
            rows.append([ch, r["mean"][c], r["std"][c], *(v for p in ("imagenet", "clip") for v in (
                _preset(p)[0][c], _preset(p)[1][c]))])
        out.table("Per-channel statistics (pixels in [0, 1])", ["channel", "mean", "std", "imagenet mean",
                  "imagenet std", "clip mean", "clip std"], rows,
                  caption=f"max |mean diff|: imagenet {d['imagenet']['mean_max_abs']:.4f}, clip "
                          f"{d['clip']['mean_max_abs']:.4f}; closest preset: {r['closest_preset']}")
        out.table("Original sizes (w x h)", ["size", "images"], list(r["sizes"].items())[:10],
                  caption=f"{r['distinct_sizes']} distinct sizes; buckets by longer side: "
                          + ", ".join(f"{k}: {v}" for k, v in r["size_buckets"].items()))
        out.table("Modes and formats", ["mode / format", "images"],
                  [*r["modes"].items(), *((f"format {k}", v) for k, v in r["formats"].items())])
    if r["unreadable"]:
        out.table("Unreadable images", ["reason", "images"], list(r["reasons"].items()))
        for u in r["unreadable"][:10]:
            out.warn(f"{u['reason']}: {u['detail']}")
        if len(r["unreadable"]) > 10:
            out.warn(f"... and {len(r['unreadable']) - 10} more (see --json)")


def _preset(name: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    from mmprep.images.decode import NORM_PRESETS

    return NORM_PRESETS[name]


@app.command("normalize-images")
def normalize_images_cmd(
    src: SrcArg,
    out: Annotated[str, typer.Option("--out", "-o", metavar="DIR", help="Output folder (created).",
                                         show_default=False)],
    image_root: ImageRootOpt = None,
    input_format: InputFormatOpt = None,
    image_column: ImageColumnOpt = None,
    allow_outside_root: AllowOutsideOpt = False,
    resize_mode: ResizeModeOpt = "center-crop",
    image_size: ImageSizeOpt = "224",
    interpolation: InterpolationOpt = "bicubic",
    shortest_edge: ShortestEdgeOpt = None,
    max_pixels: MaxPixelsOpt = None,
    min_pixels: MinPixelsOpt = None,
    background: BackgroundOpt = "255,255,255",
    fill: FillOpt = "0,0,0",
    pixel_limit: PixelLimitOpt = 89_478_485,
    no_draft: NoDraftOpt = False,
    resampler: ResamplerOpt = "fast",
    format: Annotated[str, typer.Option("--format", "-f", help="Output format (npy stores arrays, see --dtype and "
                                        "--layout).", **choices("png", "jpeg", "webp", "npy"))] = "png",
    quality: Annotated[int, typer.Option("--quality", metavar="1-100", help="JPEG/WebP quality.")] = 90,
    norm: Annotated[str | None, typer.Option("--norm", help="Normalisation preset (npy output).",
                                             **choices("imagenet", "clip"))] = None,
    mean: Annotated[str | None, typer.Option("--mean", metavar="R,G,B", help="Custom mean in [0, 1] (npy).")] = None,
    std: Annotated[str | None, typer.Option("--std", metavar="R,G,B", help="Custom std in [0, 1] (npy).")] = None,
    stats_file: Annotated[str | None, typer.Option(
        "--stats-file", metavar="FILE.json", help="Mean/std from `mmprep image-stats --out` (npy).")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="npy dtype; floats are normalised, uint8 is not.",
                                       **choices("uint8", "float16", "float32"))] = "uint8",
    layout: Annotated[str, typer.Option("--layout", help="npy array layout.", **choices("CHW", "HWC"))] = "CHW",
    rejects: Annotated[str | None, typer.Option(
        "--rejects", metavar="FILE.jsonl", help="Where rejected images go (default: DIR/rejects.jsonl).")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Redo every output, also those already there (needed when the settings changed).")
    ] = False,
    fail_on_reject: Annotated[bool, typer.Option(
        "--fail-on-reject", help="Exit 1 when any image or manifest row was rejected.")] = False,
    workers: WorkersOpt = 0,
    limit: LimitOpt = None,
    engine: Annotated[str, typer.Option("--engine", help="local (process pool) or ray (Ray Data; pip install "
                                        "'mmprep\\[ray]').", **choices("local", "ray"))] = "local",
    ray_address: Annotated[str | None, typer.Option(
        "--ray-address", help="Ray cluster for --engine ray (default: $RAY_ADDRESS, else a local Ray).")] = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Write decoded, resized copies of every image (PNG/JPEG/WebP or .npy) under the same relative paths."""
    image_opts = {k: v for k, v in locals().items() if k in IMAGE_OPTION_NAMES}
    ui = make_output(json_, quiet, verbose)

    def body() -> int:
        import json

        from mmprep.images.decode import OUTPUT_FORMATS, Normalization
        from mmprep.images.normalize import normalize_images
        from mmprep.output import to_jsonable

        cfg = image_config_from_options(**image_opts)
        out_fmt = "jpeg" if format.lower() == "jpg" else format.lower()
        if out_fmt not in OUTPUT_FORMATS:
            raise UsageError(f"unknown --format '{format}'", hint="choose one of " + ", ".join(OUTPUT_FORMATS))
        if not 1 <= quality <= 100:
            raise UsageError(f"--quality must be 1-100, got {quality}")
        if out_fmt == "npy":
            normalization = Normalization.from_spec(norm, mean, std, stats_file, dtype, layout)
        else:
            npy_only = [n for n, v in (("--norm", norm), ("--mean", mean), ("--std", std),
                                       ("--stats-file", stats_file)) if v is not None]
            if dtype != "uint8":
                npy_only.append("--dtype")
            if layout.upper() != "CHW":
                npy_only.append("--layout")
            if npy_only:
                raise UsageError(f"{', '.join(npy_only)} only apply to --format npy",
                                 hint=f"--format {out_fmt} stores 8-bit RGB pixels as they are")
            normalization = Normalization(layout="HWC")
        # with --engine ray on a cluster, 0 workers means all of the cluster's CPUs
        n_workers = workers if (engine == "ray" and ray_address and not workers) else _workers(workers)
        dest = Path(_local(out, "--out", "normalize-images"))
        rejects_file = _local(rejects, "--rejects", "normalize-images") if rejects else None
        local_src = _local(src, "SRC", "normalize-images")
        if Path(local_src).is_dir() and dest.exists() and os.path.samefile(local_src, dest):
            raise UsageError("--out is the source folder", hint="write the copies to a different folder")
        images = _collect(local_src, image_root, input_format, image_column, allow_outside_root, limit,
                          exclude=(str(dest),), command="normalize-images")
        _report_manifest_rejects(ui, images)
        ui.debug(f"{len(images.items)} images from {images.kind} {src}, {n_workers} worker(s)")
        with ui.progress(len(images.items), "normalize-images", unit="img") as bar:
            report = normalize_images(
                images, dest, cfg, fmt=out_fmt, quality=quality, norm=normalization, workers=n_workers,
                rejects_path=rejects_file, overwrite=overwrite, on_progress=bar.update, engine=engine,
                ray_address=ray_address,
            )
        summary = report.to_dict()
        _write_text(dest / "normalize-images.json", json.dumps(to_jsonable(summary), indent=2) + "\n")
        if ui.json_mode:
            ui.emit_json(summary)
        else:
            ui.info(
                f"{report.written:,} written, {report.skipped:,} already there, {report.rejected:,} rejected "
                f"of {report.images:,} images -> {dest} ({report.elapsed_s:.1f}s, {report.images_per_s:,.0f} img/s, "
                f"{n_workers} worker(s))"
            )
            if report.rejected:
                ui.table("Rejected images", ["reason", "images"], list(summary["reasons"].items()),
                          caption=f"details: {report.rejects_file}")
        if report.removed:
            ui.warn(f"{report.removed:,} earlier output(s) removed: their source is now rejected")
        if report.stale:
            ui.warn(f"{report.stale:,} earlier output(s) in {dest} are not produced by this run (source gone or "
                    f"beyond --limit); they are listed in {report.record_file}")
        if report.rejected and report.rejected == report.images:
            raise RunFailed(f"all {report.images} images were rejected", hint=f"see {report.rejects_file}")
        failed = report.rejected or report.manifest_rejects
        return EXIT_FAILED if (fail_on_reject and failed) else EXIT_OK

    run_command(ui, body)
