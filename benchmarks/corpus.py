"""A deterministic benchmark corpus built from real photographs, real captions and the real RAM tag list.

``make_corpus(out_dir, n_samples, seed)`` writes ``out_dir/images/*.jpg|png`` (real photos from
``shared/realdata/images`` re-cropped and rescaled to typical dataset sizes, 500x375 .. 1024x768; ~90% JPEG q90,
~10% PNG) and ``out_dir/manifest.jsonl`` with one row per sample::

    {"id": "c000001", "images": ["images/000001.jpg", ...], "text": "<a real COCO/LLaVA caption>",
     "tags": ["<RAM tag>", ...]}

Samples hold 1-5 images with quotas 40/25/15/10/10% (2,000 samples -> 4,500 images, every reference a distinct
file). The same arguments give the same bytes (with the same Pillow); a finished corpus is reused
(``corpus.json`` records its parameters). Command line: ``python benchmarks/corpus.py OUT_DIR --samples N [--seed S]``.

Without ``shared/realdata`` (a clean clone, CI), the sources are the repository's own real photographs
(``sample_data/images``) and captions (``sample_data/manifest.jsonl``, ``tests/data/text``): the same sizes,
formats and quotas, fewer distinct scenes. ``corpus.json`` says which source set was used (``source``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import sys
from pathlib import Path

__all__ = ["find_realdata", "make_corpus", "realdata_or_none"]

CORPUS_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parents[1]

# Real photographs in shared/realdata/images (see its README for sources and licences).
PHOTOS = (
    "exiforient_Landscape_0.jpg", "exiforient_Portrait_5.jpg", "skimage_astronaut.png", "skimage_chelsea.png",
    "skimage_coffee.png", "skimage_rocket.jpg", "skimage_hubble_deep_field.jpg", "skimage_retina.jpg",
    "skimage_camera.png", "skimage_brick.png", "skimage_coins.png", "pillow_flower.jpg", "pillow_frozenpond.mpo",
    "pillow_sugarshack.mpo", "pillow_iptc.jpg", "pillow_exif-72dpi-int.jpg", "pillow_exif_gps_typeerror.jpg",
    "pillow_icc_profile_big.jpg", "broken/pillow_junk_jpeg_header.jpg",
)
# (width, height): typical dataset sizes, landscape first; portrait variants are added below.
SIZES = ((500, 375), (640, 480), (800, 600), (1024, 768), (640, 427), (768, 512), (512, 512), (600, 400))
IMAGES_PER_SAMPLE_QUOTAS = ((1, 0.40), (2, 0.25), (3, 0.15), (4, 0.10), (5, 0.10))
PNG_SHARE = 0.10
JPEG_QUALITY = 90


def find_realdata(start: Path = REPO_ROOT) -> Path:
    """``shared/realdata`` next to the repository or in one of its parent folders (or ``$MMPREP_REALDATA``)."""
    env = os.environ.get("MMPREP_REALDATA")
    if env:
        if not (Path(env) / "images").is_dir():
            raise FileNotFoundError(f"MMPREP_REALDATA={env} has no images/ folder")
        return Path(env)
    for base in (start, *start.parents):
        cand = base / "shared" / "realdata"
        if (cand / "images").is_dir():
            return cand
    raise FileNotFoundError(
        f"shared/realdata not found next to {start} or above it; set MMPREP_REALDATA to its location"
    )


# The fallback: real photographs that ship with the repository (see sample_data/ATTRIBUTION.md).
REPO_PHOTOS = (
    "astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg", "hubble_deep_field.jpg", "retina.jpg",
    "camera.png", "brick.png", "coins.png", "landscape_exif6.jpg", "sample_cmyk.jpg",
)


def realdata_or_none() -> Path | None:
    """``find_realdata()``, or None when it is not there (the repository's own sources are used then)."""
    try:
        return find_realdata()
    except FileNotFoundError:
        return None


def _repo_captions() -> list[str]:
    out = [json.loads(line)["text"] for line in (REPO_ROOT / "sample_data" / "manifest.jsonl").read_text(
        encoding="utf-8").splitlines() if line.strip()]
    coco = json.loads((REPO_ROOT / "tests" / "data" / "text" / "coco_fakecap_results_60.json").read_text(
        encoding="utf-8"))
    out.extend(r["caption"].strip() for r in coco if r.get("caption", "").strip())
    return [c for c in out if isinstance(c, str) and c.strip()]


def _captions(realdata: Path) -> list[str]:
    ann = realdata / "annotations"
    out: list[str] = []
    coco = json.loads((ann / "coco" / "captions_val2014_fakecap_results.json").read_text(encoding="utf-8"))
    out.extend(r["caption"].strip() for r in coco if r.get("caption", "").strip())
    for caps in sorted((ann / "llava" / "prompts_caps_boxes").glob("*_caps.txt")):
        for line in caps.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line:
                break  # the captions come first, then a blank line and the boxes
            out.append(line)
    if not out:
        raise RuntimeError(f"no captions found under {ann}")
    return out


def _tags() -> list[str]:
    text = (REPO_ROOT / "sample_data" / "ram_tag_list.txt").read_text(encoding="utf-8")
    return [t.strip() for t in text.splitlines() if t.strip()]


def _images_per_sample(n_samples: int, rng: random.Random) -> list[int]:
    counts: list[int] = []
    for k, share in IMAGES_PER_SAMPLE_QUOTAS:
        counts.extend([k] * round(n_samples * share))
    while len(counts) < n_samples:
        counts.append(1)
    counts = counts[:n_samples]
    rng.shuffle(counts)
    return counts


def _load_sources(realdata: Path | None) -> list[object]:
    from PIL import Image, ImageOps

    sources = []
    files = ([realdata / "images" / n for n in PHOTOS] if realdata is not None
             else [REPO_ROOT / "sample_data" / "images" / n for n in REPO_PHOTOS])
    for path in files:
        with Image.open(path) as im:
            im.load()
            sources.append(ImageOps.exif_transpose(im).convert("RGB"))
    return sources


def _render(src: object, size: tuple[int, int], rng: random.Random) -> object:
    """A random crop of ``src`` with the aspect of ``size`` (50-100% of the largest such crop), scaled to it."""
    from PIL import Image

    assert isinstance(src, Image.Image)
    tw, th = size
    sw, sh = src.size
    aspect = tw / th
    cw_max = min(sw, sh * aspect)
    frac = rng.uniform(0.5, 1.0)
    cw = cw_max * frac
    ch = cw / aspect
    x0 = rng.uniform(0, sw - cw)
    y0 = rng.uniform(0, sh - ch)
    out = src.resize((tw, th), Image.Resampling.LANCZOS, box=(x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out


def make_corpus(out_dir: str | os.PathLike[str], n_samples: int, seed: int = 0) -> Path:
    """Build (or reuse) the corpus under ``out_dir`` and return the path of its JSONL manifest.

    Args:
        out_dir: folder to write (``images/``, ``manifest.jsonl``, ``corpus.json``).
        n_samples: manifest rows; images are ~2.25 per sample.
        seed: everything random (crops, sizes, formats, captions, tags) follows from it.
    """
    if n_samples <= 0:
        raise ValueError(f"n_samples must be positive, got {n_samples}")
    out = Path(out_dir)
    manifest = out / "manifest.jsonl"
    stamp = out / "corpus.json"
    realdata = realdata_or_none()
    source = "shared/realdata" if realdata is not None else "repository"
    params = {"version": CORPUS_VERSION, "n_samples": n_samples, "seed": seed, "source": source}
    if stamp.exists() and manifest.exists():
        try:
            if json.loads(stamp.read_text())["params"] == params:
                return manifest
        except (ValueError, KeyError):
            pass
    images_dir = out / "images"
    if images_dir.exists() and any(images_dir.iterdir()):
        if not stamp.exists():
            raise FileExistsError(f"{images_dir} holds files that are not a corpus made here; choose another folder")
        shutil.rmtree(images_dir)  # an older corpus with other parameters
    rng = random.Random(seed)
    captions = _captions(realdata) if realdata is not None else _repo_captions()
    tags = _tags()
    sources = _load_sources(realdata)
    sizes = [*SIZES, *((h, w) for w, h in SIZES if w != h)]
    size_weights = [3 if w >= h else 1 for w, h in sizes]  # mostly landscape, like photo datasets
    (out / "images").mkdir(parents=True, exist_ok=True)
    n_images = n_jpeg = 0
    rows = []
    for i, k in enumerate(_images_per_sample(n_samples, rng), 1):
        refs = []
        for _ in range(k):
            n_images += 1
            src = sources[rng.randrange(len(sources))]
            size = rng.choices(sizes, weights=size_weights)[0]
            im = _render(src, size, rng)
            is_png = rng.random() < PNG_SHARE
            buf = io.BytesIO()
            if is_png:
                im.save(buf, "PNG")  # type: ignore[attr-defined]
            else:
                im.save(buf, "JPEG", quality=JPEG_QUALITY)  # type: ignore[attr-defined]
                n_jpeg += 1
            ref = f"images/{n_images:06d}.{'png' if is_png else 'jpg'}"
            (out / ref).write_bytes(buf.getvalue())
            refs.append(ref)
        n_tags = rng.randint(2, 8)
        rows.append({"id": f"c{i:06d}", "images": refs, "text": rng.choice(captions),
                     "tags": rng.sample(tags, n_tags)})
    tmp = manifest.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, manifest)
    stamp.write_text(json.dumps({"params": params, "samples": n_samples, "images": n_images, "jpeg": n_jpeg,
                                 "png": n_images - n_jpeg, "source": source,
                                 "sources": list(PHOTOS if realdata is not None else REPO_PHOTOS)},
                                indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    path = make_corpus(args.out_dir, args.samples, args.seed)
    info = json.loads((Path(args.out_dir) / "corpus.json").read_text())
    print(f"{path}: {info['samples']} samples, {info['images']} images ({info['jpeg']} JPEG, {info['png']} PNG)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
