"""Command-line options shared by several commands: the image decoding/resizing flags of ``pack``,
``image-stats`` and ``normalize-images`` (defined once, so the flags read the same everywhere) and
:func:`image_config_from_options`, which turns their values into an :class:`~mmprep.images.decode.ImageConfig`;
the text cap of ``pack`` and ``tokenize`` (:data:`MaxTextBytesOpt`, read by :func:`max_text_bytes_from_option`).

Nothing heavy (numpy, Pillow) is imported at module level.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from mmprep.images.decode import ImageConfig

__all__ = [
    "IMAGE_OPTION_NAMES",
    "MANIFEST_FORMATS",
    "PANELS",
    "PANEL_IMAGES",
    "PANEL_INPUT",
    "PANEL_OUTPUT",
    "PANEL_RUN",
    "PANEL_TEXT",
    "RESIZE_MODES",
    "BackgroundOpt",
    "FillOpt",
    "ImageSizeOpt",
    "InterpolationOpt",
    "MaxPixelsOpt",
    "MaxTextBytesOpt",
    "MinPixelsOpt",
    "NoDraftOpt",
    "PackMaxTextBytesOpt",
    "PixelLimitOpt",
    "ResamplerOpt",
    "ResizeModeOpt",
    "ShortestEdgeOpt",
    "choices",
    "image_config_from_options",
    "max_text_bytes_from_option",
]

# Help panels (``rich_help_panel=``): a command that groups its options shows these, in this order, with its common
# options first in each; options of such a command that name no panel (--json, --quiet, --help) go to PANEL_RUN.
PANEL_INPUT = "Input"
PANEL_IMAGES = "Images"
PANEL_TEXT = "Text and tags"
PANEL_OUTPUT = "Output"
PANEL_RUN = "Run"
PANELS = (PANEL_INPUT, PANEL_IMAGES, PANEL_TEXT, PANEL_OUTPUT, PANEL_RUN)


def choices(*values: str) -> dict[str, Any]:
    """Keywords for ``typer.Option`` of a text option with fixed values: help shows them (``zstd|lz4|none``) and
    the shell completes them. The command still checks the value (one line naming the flag when wrong)."""

    def complete(incomplete: str) -> list[str]:
        return [v for v in values if v.startswith(incomplete)]

    return {"metavar": "|".join(values), "autocompletion": complete}


#: The manifest formats (:data:`mmprep.inputs.manifest.FORMATS`, which the CLI does not import to stay fast;
#: tests/test_cli_ux.py checks they agree).
MANIFEST_FORMATS = ("jsonl", "json", "csv", "parquet", "arrow")
RESIZE_MODES = ("stretch", "center-crop", "letterbox", "shortest-edge", "max-pixels", "none")

_IMG = PANEL_IMAGES
ResizeModeOpt = Annotated[str, typer.Option(
    "--resize-mode", help="How images are resized.", rich_help_panel=_IMG, **choices(*RESIZE_MODES))]
ImageSizeOpt = Annotated[str, typer.Option(
    "--image-size", metavar="N|HxW", help="Target size for stretch, center-crop and letterbox (height x width).",
    rich_help_panel=_IMG)]
InterpolationOpt = Annotated[str, typer.Option(
    "--interpolation", help="Resampling filter.", rich_help_panel=_IMG,
    **choices("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"))]
ShortestEdgeOpt = Annotated[int | None, typer.Option(
    "--shortest-edge", metavar="N", help="Shorter side for --resize-mode shortest-edge.", rich_help_panel=_IMG)]
MaxPixelsOpt = Annotated[int | None, typer.Option(
    "--max-pixels", metavar="N", help="Pixel budget (w*h) upper bound for --resize-mode max-pixels.",
    rich_help_panel=_IMG)]
MinPixelsOpt = Annotated[int | None, typer.Option(
    "--min-pixels", metavar="N",
    help="Pixel budget lower bound for --resize-mode max-pixels (sides truncated as EasyR1: may fall just short).",
    rich_help_panel=_IMG)]
BackgroundOpt = Annotated[str, typer.Option(
    "--background", metavar="R,G,B|#hex|name", help="Colour transparent pixels are composited over.",
    rich_help_panel=_IMG)]
FillOpt = Annotated[str, typer.Option(
    "--fill", metavar="R,G,B|#hex|name", help="Letterbox padding colour.", rich_help_panel=_IMG)]
PixelLimitOpt = Annotated[int, typer.Option(
    "--pixel-limit", metavar="N", help="Reject images whose header declares more pixels (decompression bombs).",
    rich_help_panel=_IMG)]
NoDraftOpt = Annotated[bool, typer.Option(
    "--no-draft", help="Decode JPEGs at full size before resizing (slower; no DCT-domain downscaling).",
    rich_help_panel=_IMG)]
ResamplerOpt = Annotated[str, typer.Option(
    "--resampler", help="fast: libjpeg-turbo scaled decoding + OpenCV area shrinking for plain JPEG/PNG, Pillow for "
    "the rest; pillow: Pillow for every file, with the interpolation filter chosen (slower; see BENCHMARKS.md).",
    rich_help_panel=_IMG, **choices("fast", "pillow"))]


def _max_text_bytes(panel: str | None) -> Any:
    return typer.Option(
        "--max-text-bytes", metavar="SIZE", rich_help_panel=panel,
        help="Reject rows whose text (as given, or as a chat template renders it) is larger, before tokenising: "
             "text_too_large. Also bounds a chat template's output.")


#: ``tokenize`` and ``pack`` (in its Text panel): the largest text of one row (a size: 1MiB, 500KB, 100000).
MaxTextBytesOpt = Annotated[str, _max_text_bytes(None)]
PackMaxTextBytesOpt = Annotated[str, _max_text_bytes(PANEL_TEXT)]
DEFAULT_MAX_TEXT_BYTES = "1MiB"


def max_text_bytes_from_option(value: str) -> int:
    """``--max-text-bytes`` as bytes (UsageError when it cannot be read; the range is checked by TextConfig)."""
    from mmprep.cli._parse import parse_bytes

    return parse_bytes(str(value), "--max-text-bytes")


#: Parameter names of the decoding/resizing options above, as :func:`image_config_from_options` takes them; a
#: command declares them with the aliases and passes ``{k: v for k, v in locals().items() if k in IMAGE_OPTION_NAMES}``.
IMAGE_OPTION_NAMES = frozenset({
    "resize_mode", "image_size", "interpolation", "shortest_edge", "max_pixels", "min_pixels", "background", "fill",
    "pixel_limit", "no_draft", "resampler",
})


def image_config_from_options(
    *,
    resize_mode: str = "center-crop",
    image_size: str | None = "224",
    interpolation: str = "bicubic",
    shortest_edge: int | None = None,
    max_pixels: int | None = None,
    min_pixels: int | None = None,
    background: str = "255,255,255",
    fill: str = "0,0,0",
    pixel_limit: int = 89_478_485,
    no_draft: bool = False,
    resampler: str = "fast",
) -> ImageConfig:
    """Build and validate an :class:`~mmprep.images.decode.ImageConfig` from CLI option values (UsageError if bad)."""
    from mmprep.images.decode import ImageConfig, parse_color, parse_image_size

    size = parse_image_size(image_size) if image_size not in (None, "") else None
    cfg = ImageConfig(
        size=size,
        resize_mode=resize_mode,
        interpolation=interpolation.lower(),
        background=parse_color(background),
        fill=parse_color(fill),
        shortest_edge=shortest_edge,
        max_pixels=max_pixels,
        min_pixels=min_pixels,
        pixel_limit=pixel_limit,
        draft=not no_draft,
        resampler=resampler.lower(),
    )
    cfg.validate()
    return cfg
