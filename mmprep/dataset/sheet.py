"""The contact sheet of ``mmprep inspect --sheet``: sampled rows drawn as the model sees them (Pillow only).

Pixels de-normalised from the stored dtype, every image slot in order with padding slots hatched and labelled, the
letterbox content box outlined, and the caption, token count and tags (names when the vocabulary file is
reachable) underneath.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mmprep.dataset.arrays import denormalize
from mmprep.dataset.reader import PackedDataset
from mmprep.errors import UsageError
from mmprep.runtime.files import atomic_write

__all__ = ["SheetInfo", "contact_sheet"]


@dataclass
class SheetInfo:
    """What :func:`contact_sheet` drew."""

    path: str
    indices: list[int]
    ids: list[str]
    width: int
    height: int
    tags: str  # "vocabulary names", "ids" (vocabulary not found), "stored names" (packed without --vocab), "none"
    #: per row drawn: the box ``(x0, y0, x1, y1)`` around everything drawn for it (images and text)
    cards: list[tuple[int, int, int, int]] = field(default_factory=list)
    #: displayed side of an image slot (smaller than asked for when a row has many slots)
    slot_px: int = 0


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


def _pieces(draw: Any, word: str, font: Any, width: int) -> list[str]:
    """``word`` cut into pieces no wider than ``width`` (an id or a path longer than a card)."""
    out: list[str] = []
    cur = ""
    for ch in word:
        if cur and draw.textlength(cur + ch, font=font) > width:
            out.append(cur)
            cur = ""
        cur += ch
    return [*out, cur] if cur else out


def _wrap(draw: Any, text: str, font: Any, width: int, max_lines: int, sep: str = " ") -> list[str]:
    """``text`` in lines no wider than ``width`` (split at ``sep``; longer words cut), at most ``max_lines``, the last
    one ending in an ellipsis when text was left out."""
    words = [piece for w in text.split(sep) if w.strip() for piece in _pieces(draw, w.strip(), font, width)]
    lines: list[str] = []
    cur = ""
    for w in words:
        cand = f"{cur}{sep}{w}" if cur else w
        if draw.textlength(cand, font=font) <= width:
            cur = cand
        else:
            lines.append(cur)
            cur = w
    if cur:
        lines.append(cur)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and draw.textlength(last + " …", font=font) > width:
            last = last[:-1]
        lines[-1] = last.rstrip() + " …"
    return lines


#: A card's image strip is at most this wide: with many slots per row they shrink (not below _MIN_SLOT_PX).
_MAX_STRIP_W = 680
_MIN_SLOT_PX = 56
#: Room for a card's first line (id, line, images, tokens) when its images are few or narrow.
_MIN_CARD_W = 300
#: Sheets aim at about this width; the number of cards per sheet row follows from the cards' width.
_SHEET_W = 1440
_COL_GAP = 24


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
        slot_px: displayed size of the longer side of an image slot (smaller when a row has many slots, so that a
            card stays about 680 pixels wide).
        columns: cards per sheet row (default: as many as fit in about 1440 pixels, at most 4).
    """
    from PIL import Image, ImageDraw

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

    gap, margin = 6, 12
    per_card = ds.pixels.limit if ds.pixels is not None else max(len(imgs) for imgs in batch["images"])
    slot_px = min(slot_px, max(_MIN_SLOT_PX, (_MAX_STRIP_W + gap) // max(1, per_card) - gap))
    slots = _slot_images(ds, batch, slot_px)  # per row: list of (image, content box or None, real?)
    slot_w = max(img.width for row in slots for img, _, _ in row)  # the displayed slot size
    slot_h = max(img.height for row in slots for img, _, _ in row)
    limit = max(len(s) for s in slots)
    card_w = max(limit * (slot_w + gap) - gap, _MIN_CARD_W)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_blocks = [_card_text(batch, i, names, ds, scratch, font, small, card_w) for i in range(len(indices))]
    line_h = 16
    card_h = [slot_h + 8 + len(tb) * line_h for tb in text_blocks]
    fit = max(1, (_SHEET_W - 2 * margin + _COL_GAP) // (card_w + _COL_GAP))
    cols = columns or max(1, min(len(indices), fit, 4))
    rows_n = -(-len(indices) // cols)
    row_h = [max(card_h[r * cols:(r + 1) * cols]) for r in range(rows_n)]
    header = _header(ds, tags)
    head_h = 10 + line_h * len(header) + 8
    width = margin * 2 + cols * card_w + (cols - 1) * _COL_GAP
    height = head_h + sum(row_h) + margin * (rows_n + 1)
    sheet = Image.new("RGB", (max(width, 520), height), _BG)
    draw = ImageDraw.Draw(sheet)
    y = 10
    for k, (text, bold) in enumerate(header):
        draw.text((margin, y), text, fill=_INK if bold else _DIM, font=title_font if k == 0 else small)
        y += line_h
    y = head_h
    cards: list[tuple[int, int, int, int]] = []
    for r in range(rows_n):
        for c in range(cols):
            i = r * cols + c
            if i >= len(indices):
                break
            x = margin + c * (card_w + _COL_GAP)
            cards.append(_draw_card(sheet, draw, x, y, slots[i], (slot_w, slot_h), gap, text_blocks[i], line_h))
        y += row_h[r] + margin
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=True)
    target = Path(out)
    if target.parent and not target.parent.exists():
        raise UsageError(f"{target}: folder {target.parent} does not exist")
    atomic_write(target, buf.getvalue(), what="contact sheet")
    return SheetInfo(path=str(target), indices=list(indices), ids=list(batch["id"]), width=sheet.width,
                     height=sheet.height, tags=tags, cards=cards, slot_px=slot_px)


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
    tag_how = {"vocabulary names": "names from the vocabulary file", "ids": "ids (vocabulary file not found; --vocab)",
               "stored names": "names as written in the manifest (packed without --vocab)", "none": "none stored"}
    lines.append((f"tags: {tag_how[tags]}", False))
    return lines


def _slot_scale(image_size: tuple[int, int], slot_px: int) -> float:
    """Display scale of a slot: an integer upscale (exact pixels) for small slots, else a downscale to fit."""
    side = max(image_size)
    return float(max(1, slot_px // side)) if side <= slot_px else slot_px / side


class _Slot(NamedTuple):
    """One image slot as drawn: the scaled image, its content box in display pixels (or None), a real image?"""

    image: Any
    box: Any
    real: bool


def _slot_images(ds: PackedDataset, batch: dict[str, Any], slot_px: int) -> list[list[_Slot]]:
    from PIL import Image

    out: list[list[_Slot]] = []
    if ds.pixels is not None:
        spec = ds.pixels
        px = denormalize(batch[spec.column], spec)
        if spec.layout == "CHW":
            px = px.transpose(0, 1, 3, 4, 2)
        h, w = spec.image_size
        scale = _slot_scale(spec.image_size, slot_px)
        resample = Image.Resampling.NEAREST if float(scale).is_integer() else Image.Resampling.BILINEAR
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        for r in range(px.shape[0]):
            row: list[_Slot] = []
            for s in range(spec.limit):
                img = Image.fromarray(np.ascontiguousarray(px[r, s])).resize(size, resample)
                real = s < int(batch["image_count"][r])
                box = batch["content_boxes"][r, s] * scale if real and "content_boxes" in batch else None
                row.append(_Slot(img, box, real))
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
            img.thumbnail((slot_px, slot_px), Image.Resampling.BILINEAR)
            row.append(_Slot(img, None, True))
        out.append(row)
    return out


def _card_text(batch: dict[str, Any], i: int, names: list[str] | None, ds: PackedDataset, draw: Any, font: Any,
               small: Any, width: int) -> list[tuple[str, Any, tuple[int, int, int]]]:
    parts = [f"{batch['id'][i]}", f"line {int(batch['line'][i])}"]
    limit = ds.limit_images
    count = int(batch["image_count"][i])
    parts.append(f"{count}/{limit} images" if ds.pixels is not None else f"{count} image{'' if count == 1 else 's'}")
    if "n_tokens" in batch:
        nt, ml = int(batch["n_tokens"][i]), ds.max_length
        parts.append(f"{nt} tokens" + (f" (TRUNCATED to {ml})" if bool(batch["truncated"][i]) else f" of {ml}"))
    lines: list[tuple[str, Any, tuple[int, int, int]]] = [
        (ln, font, _INK) for ln in _wrap(draw, "  ·  ".join(parts), font, width, 3, sep="  ·  ")]
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


def _draw_card(sheet: Any, draw: Any, x: int, y: int, slots: list[_Slot], slot: tuple[int, int],
               gap: int, text: list[tuple[str, Any, tuple[int, int, int]]], line_h: int) -> tuple[int, int, int, int]:
    """Draw one row's card at ``(x, y)``; returns the box around everything drawn."""
    x1, y1 = x, y
    for s, (img, box, real) in enumerate(slots):
        sx = x + s * (slot[0] + gap)
        sheet.paste(img, (sx, y))
        w, h = img.size
        x1, y1 = max(x1, sx + w), max(y1, y + h)
        if not real:
            for d in range(-h, w, 10):  # hatching (lines y = x - d) over the (zero) padding slot
                xa, xb = max(d, 0), min(w, d + h)
                draw.line([(sx + xa, y + xa - d), (sx + xb, y + xb - d)], fill=_PAD, width=1)
            draw.rectangle([sx, y, sx + w - 1, y + h - 1], outline=_PAD, width=2)
            label = "empty slot" if w >= 90 else "empty"
            draw.text((sx + 6, y + 4), label, fill=(255, 255, 255), font=_font(12 if w >= 70 else 10),
                      stroke_width=2, stroke_fill=_PAD)
        elif box is not None:
            bx0, by0, bx1, by1 = (float(v) for v in box)
            if (bx0, by0, bx1, by1) != (0.0, 0.0, float(w), float(h)):
                draw.rectangle([sx + bx0, y + by0, sx + bx1 - 1, y + by1 - 1], outline=_BOX, width=2)
    ty = y + slot[1] + 6
    for ln, f, colour in text:
        draw.text((x, ty), ln, fill=colour, font=f)
        _, _, right, bottom = draw.textbbox((x, ty), ln, font=f)
        x1, y1 = max(x1, int(right)), max(y1, int(bottom))
        ty += line_h
    return (x, y, x1, y1)
