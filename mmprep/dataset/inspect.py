"""``inspect``: what a packed directory holds (a summary), and a contact sheet of what the model will see.

The summary comes from ``index.json`` plus a few small columns (``n_tokens``, ``truncated``, tags); pixels are
not read. The contact sheet (Pillow only) draws sampled rows as the trainer receives them: pixels de-normalised
from the stored dtype, every image slot in order with padding slots hatched and labelled, the letterbox content
box outlined, and the caption, token count and tags (names when the vocabulary file is reachable) underneath.
"""

from __future__ import annotations

import io
import os
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmprep.dataset.reader import INDEX_NAME, PackedDataset, count_field, denormalize
from mmprep.errors import InputError, UsageError

__all__ = ["DatasetSummary", "SheetInfo", "contact_sheet", "summarize"]


@dataclass
class DatasetSummary:
    """What :func:`summarize` reports (the ``--json`` of ``mmprep inspect``)."""

    path: str
    layout: str
    rows: int
    shards: int
    bytes: int
    bytes_per_row: float
    read: int | None
    rejected: int | None
    rejected_by_reason: dict[str, int]
    image_count_histogram: dict[str, int]
    images: int
    pixels: dict[str, Any] | None
    text: dict[str, Any] | None
    tokens: dict[str, Any] | None
    tags: dict[str, Any] | None
    shard_list: list[dict[str, Any]] = field(default_factory=list)


def summarize(ds: PackedDataset, *, vocab: str | os.PathLike[str] | None = None, top_tags: int = 10) -> DatasetSummary:
    """Summarise a packed dataset from its index and its small columns.

    Args:
        ds: the dataset.
        vocab: a vocabulary file for tag names (default: the one recorded at pack time, when reachable).
        top_tags: how many of the most frequent tags to list.
    """
    totals = ds.index.get("totals") or {}
    shards = [{"path": s.name, "rows": s.rows, "bytes": s.bytes} for s in ds.shards]
    size = sum(s.bytes for s in ds.shards)
    hist = {str(k): _count(v, f"totals.image_count_histogram[{k!r}]", ds) for k, v in
            (totals.get("image_count_histogram") or {}).items()}
    pixels = None
    if ds.pixels is not None:
        px = ds.metadata["pixels"]
        pixels = {"dtype": px["dtype"], "shape": px["shape"], "layout": px["layout"], "normalized": px["normalized"],
                  "mean": px.get("mean"), "std": px.get("std"), "resize_mode": ds.metadata.get("resize_mode"),
                  "bytes_per_row": ds.pixels.row_bytes}
    elif ds.layout == "encoded":
        pixels = {"storage": "encoded", "encoding": (ds.metadata.get("images") or {}).get("encoding")}
    tokens = None
    text = ds.metadata.get("text")
    if text and len(ds):
        nt = np.asarray(ds.column("n_tokens"), dtype=np.int64)
        max_length = _count(text.get("max_length"), "metadata.text.max_length", ds)
        tokens = {"min": int(nt.min()), "mean": round(float(nt.mean()), 2), "p50": float(np.percentile(nt, 50)),
                  "p95": float(np.percentile(nt, 95)), "max": int(nt.max()), "max_length": max_length,
                  "truncated": int(np.count_nonzero(nt > max_length))}
    tags = _tag_stats(ds, vocab, top_tags) if len(ds) else None
    return DatasetSummary(
        path=str(ds.path), layout=ds.layout, rows=len(ds), shards=len(ds.shards), bytes=size,
        bytes_per_row=round(size / len(ds), 1) if len(ds) else 0.0,
        read=totals.get("read"), rejected=totals.get("rejected"),
        rejected_by_reason=dict(totals.get("rejected_by_reason") or {}),
        image_count_histogram=hist, images=_count(totals.get("images_written", 0), "totals.images_written", ds),
        pixels=pixels, text=text, tokens=tokens, tags=tags, shard_list=shards,
    )


def _count(value: Any, field: str, ds: PackedDataset) -> int:
    """A count from ``index.json``, or an InputError that names the field and its value."""
    n = count_field(value)
    if n is None:
        raise InputError(f"{ds.path / INDEX_NAME}: {field} is {value!r}, not a whole number",
                         hint="the index is damaged; run `mmprep verify` on the directory")
    return n


def _tag_stats(ds: PackedDataset, vocab: str | os.PathLike[str] | None, top: int) -> dict[str, Any] | None:
    if "tag_ids" in ds.column_names:
        lists = ds.column("tag_ids")
        found = ds.find_vocab(vocab)
        names = found.names
        counter: Counter[Any] = Counter()
        for t in lists:
            counter.update(np.asarray(t).tolist())

        def label(i: int) -> str:
            return names[i] if names is not None and 0 <= i < len(names) else f"#{i}"

        vocab_meta = ds.metadata.get("vocab") or {}
        extra = {"vocab_size": vocab_meta.get("size"), "names_from": "vocabulary" if names is not None else "ids",
                 "vocab_file": str(found.path) if found.path is not None else None, "vocab_lookup": found.how}
    elif "tags" in ds.column_names:
        lists = ds.column("tags")
        counter = Counter()
        for t in lists:
            counter.update(t)
        label = str
        extra = {}
    else:
        return None
    per_row = np.asarray([len(t) for t in lists], dtype=np.int64)
    return {"per_row_min": int(per_row.min()), "per_row_mean": round(float(per_row.mean()), 2),
            "per_row_max": int(per_row.max()), "distinct": len(counter),
            "top": [[label(k), c] for k, c in counter.most_common(top)], **extra}


# -- contact sheet ----------------------------------------------------------------------------------------------------


@dataclass
class SheetInfo:
    """What :func:`contact_sheet` drew."""

    path: str
    indices: list[int]
    ids: list[str]
    width: int
    height: int
    tags: str  # "vocabulary names", "ids" (vocabulary not found), "stored names" (packed without --vocab), "none"


_BG = (250, 250, 248)
_INK = (20, 20, 20)
_DIM = (110, 110, 110)
_BOX = (0, 220, 90)
_PAD = (225, 60, 60)


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(draw: Any, text: str, font: Any, width: int, max_lines: int) -> list[str]:
    words = text.split()
    lines: list[str] = []
    cur = ""
    for w in words:
        cand = f"{cur} {w}".strip()
        if draw.textlength(cand, font=font) <= width or not cur:
            cur = cand
        else:
            lines.append(cur)
            cur = w
    if cur:
        lines.append(cur)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = textwrap.shorten(lines[-1] + " …", max(8, len(lines[-1])), placeholder=" …")
    return lines


def contact_sheet(
    ds: PackedDataset,
    out: str | os.PathLike[str],
    *,
    samples: int = 8,
    seed: int = 0,
    indices: list[int] | None = None,
    vocab: str | os.PathLike[str] | None = None,
    slot_px: int = 160,
    columns: int | None = None,
) -> SheetInfo:
    """Draw sampled rows as the model sees them and write a PNG.

    Args:
        ds: the dataset.
        out: the PNG to write (atomically).
        samples: how many rows (chosen at random with ``seed``, shown in stored order).
        seed: which rows.
        indices: exactly these rows instead.
        vocab: vocabulary file for tag names (default: the recorded one when reachable; else ids are shown).
        slot_px: displayed size of the longer side of an image slot.
        columns: cards per sheet row (default: 1 for up to 2 samples, else 2).
    """
    from PIL import Image, ImageDraw

    from mmprep.runtime.files import atomic_write as atomic_write_bytes

    if len(ds) == 0:
        raise UsageError(f"{ds.path}: the dataset has no rows to draw")
    if indices is None:
        if samples < 1:
            raise UsageError(f"--samples must be at least 1, got {samples}")
        n = min(samples, len(ds))
        indices = sorted(np.random.default_rng(seed).choice(len(ds), size=n, replace=False).tolist())
    want = [c for c in ("id", "line", "image_count", "content_boxes", "n_tokens", "truncated", "tag_ids", "tags",
                        "text", "pixel_values", "images") if c in ds.column_names]
    batch = ds.take(indices, columns=want)
    names = ds.tag_names(vocab) if "tag_ids" in want else None
    tags = ("vocabulary names" if names is not None else "ids") if "tag_ids" in want else (
        "stored names" if "tags" in want else "none")
    font, small, title_font = _font(13), _font(11), _font(15)

    slots = _slot_images(ds, batch, slot_px)  # per row: list of (image, content box or None, real?)
    slot_w = max(img.width for row in slots for img, _, _ in row)  # the displayed slot size
    slot_h = max(img.height for row in slots for img, _, _ in row)
    limit = max(len(s) for s in slots)
    gap, margin = 6, 12
    card_w = limit * (slot_w + gap) - gap
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_blocks = [_card_text(batch, i, names, ds, scratch, font, small, card_w) for i in range(len(indices))]
    line_h = 16
    card_h = [slot_h + 8 + len(tb) * line_h for tb in text_blocks]
    cols = columns or (1 if len(indices) <= 2 else 2)
    rows_n = -(-len(indices) // cols)
    row_h = [max(card_h[r * cols:(r + 1) * cols]) for r in range(rows_n)]
    header = _header(ds, tags)
    head_h = 10 + line_h * len(header) + 8
    width = margin * 2 + cols * card_w + (cols - 1) * 24
    height = head_h + sum(row_h) + margin * (rows_n + 1)
    sheet = Image.new("RGB", (max(width, 520), height), _BG)
    draw = ImageDraw.Draw(sheet)
    y = 10
    for k, (text, bold) in enumerate(header):
        draw.text((margin, y), text, fill=_INK if bold else _DIM, font=title_font if k == 0 else small)
        y += line_h
    y = head_h
    for r in range(rows_n):
        for c in range(cols):
            i = r * cols + c
            if i >= len(indices):
                break
            x = margin + c * (card_w + 24)
            _draw_card(sheet, draw, x, y, slots[i], (slot_w, slot_h), gap, text_blocks[i], line_h)
        y += row_h[r] + margin
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=True)
    target = Path(out)
    if target.parent and not target.parent.exists():
        raise UsageError(f"{target}: folder {target.parent} does not exist")
    atomic_write_bytes(target, buf.getvalue())
    return SheetInfo(path=str(target), indices=list(indices), ids=list(batch["id"]), width=sheet.width,
                     height=sheet.height, tags=tags)


def _header(ds: PackedDataset, tags: str) -> list[tuple[str, bool]]:
    lines = [(f"{ds.path}  ·  {len(ds):,} rows in {len(ds.shards)} shards ({ds.layout} layout)", True)]
    if ds.pixels is not None:
        px = ds.metadata["pixels"]
        how = ("normalised (shown de-normalised with the stored mean/std)" if px["normalized"]
               else "raw uint8 (the model gets (pixel/255 - mean)/std)")
        lines.append((f"pixels {px['dtype']} {px['shape']} {px['layout']}, {how}; resize "
                      f"{ds.metadata.get('resize_mode')}, mean {px.get('mean')} std {px.get('std')}", False))
        lines.append(("green outline: content box (real pixels; outside it is letterbox fill)  ·  red hatching: "
                      "empty slot (image_mask = 0, zeros in the tensor)", False))
    else:
        lines.append(("encoded layout: images as stored, decoded and scaled to fit (no padding slots)", False))
    how = {"vocabulary names": "names from the vocabulary file", "ids": "ids (vocabulary file not found; --vocab)",
           "stored names": "names as written in the manifest (packed without --vocab)", "none": "none stored"}
    lines.append((f"tags: {how[tags]}", False))
    return lines


def _slot_scale(image_size: tuple[int, int], slot_px: int) -> float:
    """Display scale of a slot: an integer upscale (exact pixels) for small slots, else a downscale to fit."""
    side = max(image_size)
    return float(max(1, slot_px // side)) if side <= slot_px else slot_px / side


def _slot_images(ds: PackedDataset, batch: dict[str, Any], slot_px: int) -> list[list[tuple[Any, Any]]]:
    from PIL import Image

    out: list[list[tuple[Any, Any]]] = []
    if ds.pixels is not None:
        spec = ds.pixels
        px = denormalize(batch[spec.column], spec)
        if spec.layout == "CHW":
            px = px.transpose(0, 1, 3, 4, 2)
        h, w = spec.image_size
        scale = _slot_scale(spec.image_size, slot_px)
        resample = Image.NEAREST if float(scale).is_integer() else Image.BILINEAR
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        for r in range(px.shape[0]):
            row = []
            for s in range(spec.limit):
                img = Image.fromarray(np.ascontiguousarray(px[r, s])).resize(size, resample)
                real = s < int(batch["image_count"][r])
                box = batch["content_boxes"][r, s] * scale if real and "content_boxes" in batch else None
                row.append((img, box, real))
            out.append(row)
        return out
    for imgs in batch["images"]:
        row = []
        for item in imgs:
            data = item["bytes"] if isinstance(item, dict) else None
            if data is None:
                img = Image.fromarray(item)
            else:
                from mmprep.images.decode import ImageConfig, load_image

                img = Image.fromarray(load_image(data, ImageConfig(size=None, resize_mode="none")).array)
            img.thumbnail((slot_px, slot_px), Image.BILINEAR)
            row.append((img, None, True))
        out.append(row)
    return out


def _card_text(batch: dict[str, Any], i: int, names: list[str] | None, ds: PackedDataset, draw: Any, font: Any,
               small: Any, width: int) -> list[tuple[str, Any, tuple[int, int, int]]]:
    parts = [f"{batch['id'][i]}", f"line {int(batch['line'][i])}"]
    limit = ds.limit_images
    parts.append(f"{int(batch['image_count'][i])}/{limit} images" if ds.pixels is not None
                 else f"{int(batch['image_count'][i])} images")
    if "n_tokens" in batch:
        nt, ml = int(batch["n_tokens"][i]), ds.max_length
        parts.append(f"{nt} tokens" + (f" (TRUNCATED to {ml})" if bool(batch["truncated"][i]) else f" of {ml}"))
    lines: list[tuple[str, Any, tuple[int, int, int]]] = [("  ·  ".join(parts), font, _INK)]
    caption = str(batch["text"][i]) if "text" in batch else ""
    for ln in _wrap(draw, caption.replace("\n", " | "), small, width, 4):
        lines.append((ln, small, _INK))
    if "tag_ids" in batch:
        ids = np.asarray(batch["tag_ids"][i]).tolist()
        shown = [names[t] if names is not None and 0 <= t < len(names) else f"#{t}" for t in ids]
    elif "tags" in batch:
        shown = list(batch["tags"][i])
    else:
        shown = []
    for ln in _wrap(draw, "tags: " + (", ".join(shown) if shown else "(none)"), small, width, 3):
        lines.append((ln, small, _DIM))
    return lines


def _draw_card(sheet: Any, draw: Any, x: int, y: int, slots: list[tuple[Any, Any, bool]], slot: tuple[int, int],
               gap: int, text: list[tuple[str, Any, tuple[int, int, int]]], line_h: int) -> None:
    for s, (img, box, real) in enumerate(slots):
        sx = x + s * (slot[0] + gap)
        sheet.paste(img, (sx, y))
        w, h = img.size
        if not real:
            for d in range(-h, w, 10):  # hatching (lines y = x - d) over the (zero) padding slot
                xa, xb = max(d, 0), min(w, d + h)
                draw.line([(sx + xa, y + xa - d), (sx + xb, y + xb - d)], fill=_PAD, width=1)
            draw.rectangle([sx, y, sx + w - 1, y + h - 1], outline=_PAD, width=2)
            draw.text((sx + 6, y + 4), "empty slot", fill=(255, 255, 255), font=_font(12), stroke_width=2,
                      stroke_fill=_PAD)
        elif box is not None:
            x0, y0, x1, y1 = (float(v) for v in box)
            if (x0, y0, x1, y1) != (0.0, 0.0, float(w), float(h)):
                draw.rectangle([sx + x0, y + y0, sx + x1 - 1, y + y1 - 1], outline=_BOX, width=2)
    ty = y + slot[1] + 6
    for ln, f, colour in text:
        draw.text((x, ty), ln, fill=colour, font=f)
        ty += line_h
