"""A look at the first rows' images before any work starts.

A manifest whose image paths are relative to another folder than the one mmprep reads them from (the manifest's
folder, or ``--image-root``) would otherwise reject every row as ``image_missing``, after the workers started and
the tokenizer loaded. :func:`check_first_images` looks up the first image of the first :data:`PROBE_ROWS` rows the
plan read ahead (a ``stat`` each, nothing decoded); when most of them do not exist, the run stops at once (exit 1)
naming the root it used, one path it tried, and the flag that sets it. Nothing has been written then. Inputs of fewer
than :data:`PROBE_MIN_ROWS` rows are not judged: they are packed quickly and the rejects file says what is wrong.
References refused before any lookup (``path_outside_root``) are rows like any other: they are rejected with their
reason (they may be an attack on the image root, mixed into good rows).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from mmprep.errors import RunFailed
from mmprep.images.decode import ImageError
from mmprep.images.sources import ImageSource
from mmprep.records import Rejected, Sample
from mmprep.text.render import inline_images

__all__ = ["PROBE_MIN_ROWS", "PROBE_ROWS", "ImageProbe", "check_first_images", "probe_images"]

#: Rows whose first image is looked up before the run starts.
PROBE_ROWS = 20
#: Fewer rows than this are not judged: a small input is packed (fast) and its rejects file says what is wrong.
PROBE_MIN_ROWS = 8


@dataclass
class ImageProbe:
    """What the look at the first rows' images found.

    Attributes:
        looked: rows whose first image was looked up.
        missing: ``(reference, where it was looked for)`` of the images that cannot be read (in row order).
        refused: ``(reference, reason, detail)`` of references refused before any lookup (``path_outside_root``,
            ``path_invalid``).
    """

    looked: int = 0
    missing: list[tuple[str, str]] = field(default_factory=list)
    refused: list[tuple[str, str, str]] = field(default_factory=list)


def probe_images(items: Iterable[Sample | Rejected], images: ImageSource, rows: int = PROBE_ROWS) -> ImageProbe:
    """Look up the first image of the first ``rows`` samples with images (rows the manifest reader rejected are
    skipped)."""
    probe = ImageProbe()
    for item in items:
        if probe.looked >= rows:
            break
        if not isinstance(item, Sample):
            continue
        refs = list(item.images) or inline_images(item.text)
        if not refs or not isinstance(refs[0], str):
            continue
        probe.looked += 1
        ref = refs[0]
        try:
            where = images.locate(ref)
        except ImageError as exc:
            probe.refused.append((ref, exc.reason, exc.detail))
            continue
        if images.signature(ref) is None:
            probe.missing.append((ref, where))
    return probe


def check_first_images(items: Iterable[Sample | Rejected], images: ImageSource, *, root_from: str,
                       rows: int = PROBE_ROWS) -> ImageProbe:
    """Stop the run when most of the first rows' images do not exist (see the module docstring).

    Args:
        items: the first input items (the plan's head).
        images: where image references are read.
        root_from: how the image root was chosen, for the message (``--image-root``, ``the manifest's folder``).
        rows: how many rows to look at.

    Raises:
        RunFailed: the first image of more than half of the rows looked at does not exist (exit 1).
    """
    probe = probe_images(items, images, rows)
    if probe.looked < PROBE_MIN_ROWS or 2 * len(probe.missing) <= probe.looked:
        return probe
    ref, where = probe.missing[0]
    problem = images.problem(ref) or "cannot be read"
    if problem.startswith("cannot be reached"):  # the store did not answer: the paths may well be right
        raise RunFailed(
            f"{len(probe.missing)} of the first {probe.looked} rows' images cannot be read from "
            f"{images.describe_root()} ({root_from}): {where} {problem}; nothing was written",
            hint="check the address of the image root and that its server answers (credentials: see the README), "
                 "or pass --no-image-check to pack the rows whose images can be read")
    raise RunFailed(
        f"{len(probe.missing)} of the first {probe.looked} rows' images are not where mmprep looked, under "
        f"{images.describe_root()} ({root_from}): for example {where} {problem}; nothing was written",
        hint="image paths in the manifest are read relative to --image-root (default: the manifest's folder): "
             "pass --image-root with the folder they are relative to, or --no-image-check to pack the rows whose "
             "images exist",
    )
