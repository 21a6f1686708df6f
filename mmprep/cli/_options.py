"""Command-line options shared by several commands: the image decoding/resizing flags of ``pack``,
``image-stats`` and ``normalize-images`` (defined once, so the flags read the same everywhere) and
:func:`image_config_from_options`, which turns their values into an :class:`~mmprep.images.decode.ImageConfig`.

Nothing heavy (numpy, Pillow) is imported at module level.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from mmprep.images.decode import ImageConfig

__all__ = [
    "IMAGE_OPTION_NAMES",
    "BackgroundOpt",
    "FillOpt",
    "ImageSizeOpt",
    "InterpolationOpt",
    "MaxPixelsOpt",
    "MinPixelsOpt",
    "NoDraftOpt",
    "PixelLimitOpt",
    "ResamplerOpt",
    "ResizeModeOpt",
    "ShortestEdgeOpt",
    "image_config_from_options",
]

_MODES = "stretch|center-crop|letterbox|shortest-edge|max-pixels|none"

ResizeModeOpt = Annotated[str, typer.Option("--resize-mode", metavar=_MODES, help="How images are resized.")]
ImageSizeOpt = Annotated[str, typer.Option(
    "--image-size", metavar="N|HxW", help="Target size for stretch, center-crop and letterbox (height x width).")]
InterpolationOpt = Annotated[str, typer.Option(
    "--interpolation", metavar="nearest|bilinear|bicubic|lanczos|box|hamming", help="Resampling filter.")]
ShortestEdgeOpt = Annotated[int | None, typer.Option(
    "--shortest-edge", metavar="N", help="Shorter side for --resize-mode shortest-edge.")]
MaxPixelsOpt = Annotated[int | None, typer.Option(
    "--max-pixels", metavar="N", help="Pixel budget (w*h) upper bound for --resize-mode max-pixels.")]
MinPixelsOpt = Annotated[int | None, typer.Option(
    "--min-pixels", metavar="N",
    help="Pixel budget lower bound for --resize-mode max-pixels (sides truncated as EasyR1: may fall just short).")]
BackgroundOpt = Annotated[str, typer.Option(
    "--background", metavar="R,G,B|#hex|name", help="Colour transparent pixels are composited over.")]
FillOpt = Annotated[str, typer.Option("--fill", metavar="R,G,B|#hex|name", help="Letterbox padding colour.")]
PixelLimitOpt = Annotated[int, typer.Option(
    "--pixel-limit", metavar="N", help="Reject images whose header declares more pixels (decompression bombs).")]
NoDraftOpt = Annotated[bool, typer.Option(
    "--no-draft", help="Decode JPEGs at full size before resizing (slower; no DCT-domain downscaling).")]
ResamplerOpt = Annotated[str, typer.Option(
    "--resampler", metavar="fast|pillow",
    help="fast: libjpeg-turbo scaled decoding + OpenCV area shrinking for plain JPEG/PNG, Pillow for the rest; "
         "pillow: Pillow for every file, with the --interpolation filter (slower; see BENCHMARKS.md).")]


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
