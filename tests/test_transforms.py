"""Batch transforms on torch tensors: normalisation and patch masks equal to the numpy reader's, dynamic masking
equal to a per-patch Python loop, determinism by seed, CPU vs CUDA, and the transforms inside the torch datasets."""

from __future__ import annotations

import math
import pickle
from fractions import Fraction

import numpy as np
import pytest
from _reader_helpers import packed

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

from torch.utils.data import DataLoader  # noqa: E402

from mmprep.dataset.arrays import PixelSpec, normalize_pixels  # noqa: E402
from mmprep.dataset.arrays import patch_mask as np_patch_mask  # noqa: E402
from mmprep.dataset.reader import PackedDataset  # noqa: E402
from mmprep.dataset.torch_data import (  # noqa: E402
    PackedIterableDataset,
    PackedTorchDataset,
    TransformCollate,
    to_torch,
)
from mmprep.dataset.transforms import (  # noqa: E402
    BatchTransform,
    DynamicMasking,
    PatchDraw,
    draw_patches,
    erase,
    erase_mask,
    normalize,
    patch_mask,
    seeded_generator,
)
from mmprep.errors import UsageError  # noqa: E402

CUDA = torch.cuda.is_available()
cuda = pytest.mark.cuda


def spec_for(layout: str, shape: tuple[int, ...], mean=(0.48145466, 0.4578275, 0.40821073),
             std=(0.26862954, 0.26130258, 0.27577711)) -> PixelSpec:
    return PixelSpec("pixel_values", np.dtype(np.uint8), shape, layout, False, mean, std)


# -- reference loops (one image, one patch, one pixel at a time) ------------------------------------------------


def reference_erase(images: np.ndarray, counts, anchors, patch: tuple[int, int], boxes, fill, layout: str):
    """Erase with plain loops: for every image, every active patch, every pixel of the patch inside the box."""
    out = images.copy()
    mask = np.zeros((images.shape[0], *((images.shape[2:]) if layout == "CHW" else images.shape[1:3])), bool)
    h, w = mask.shape[1:]
    for i in range(images.shape[0]):
        x0, y0, x1, y1 = (int(v) for v in boxes[i]) if boxes is not None else (0, 0, w, h)
        for k in range(int(counts[i])):
            ay, ax = int(anchors[i][k][0]), int(anchors[i][k][1])
            for y in range(ay, ay + patch[0]):
                for x in range(ax, ax + patch[1]):
                    if 0 <= y < h and 0 <= x < w and y0 <= y < y1 and x0 <= x < x1:
                        mask[i, y, x] = True
        if fill == "mean":
            values = []
            for c in range(3):
                total, n = 0, 0
                for y in range(max(y0, 0), min(y1, h)):
                    for x in range(max(x0, 0), min(x1, w)):
                        v = images[i, c, y, x] if layout == "CHW" else images[i, y, x, c]
                        total += int(v) if images.dtype == np.uint8 else float(v)
                        n += 1
                if images.dtype == np.uint8:
                    values.append(math.floor(Fraction(total, n) + Fraction(1, 2)) if n else 0)
                else:
                    values.append(total / n if n else 0.0)
        else:
            values = [fill] * 3
        for y in range(h):
            for x in range(w):
                if mask[i, y, x]:
                    for c in range(3):
                        if layout == "CHW":
                            out[i, c, y, x] = values[c]
                        else:
                            out[i, y, x, c] = values[c]
    return out, mask


def random_boxes(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    boxes = []
    for _ in range(n):
        x0, x1 = sorted(rng.integers(0, w + 1, 2))
        y0, y1 = sorted(rng.integers(0, h + 1, 2))
        if rng.random() < 0.3:
            x0, y0, x1, y1 = 0, 0, w, h
        boxes.append((x0, y0, x1, y1))
    return np.asarray(boxes, dtype=np.int32)


# -- normalisation and static masks --------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["CHW", "HWC"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_normalize_is_bit_identical_to_the_numpy_reader(layout: str, dtype: str) -> None:
    rng = np.random.default_rng(0)
    shape = (4, 3, 20, 28) if layout == "CHW" else (4, 20, 28, 3)
    spec = spec_for(layout, shape)
    pixels = rng.integers(0, 256, (5, *shape), dtype=np.uint8)
    counts = np.array([4, 0, 2, 1, 3])
    want = normalize_pixels(pixels, spec, dtype, image_count=counts)
    got = normalize(torch.from_numpy(pixels), spec, dtype, image_count=torch.from_numpy(counts)).numpy()
    assert got.dtype == want.dtype
    assert np.array_equal(got.view(f"u{got.itemsize}"), want.view(f"u{want.itemsize}"))  # bits, zeros included
    assert not got[1].any() and got[0].any()
    # overrides of the metadata's constants, and already normalised input only cast
    m = normalize(torch.from_numpy(pixels), spec, "float32", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert float(m.min()) == -1.0 and float(m.max()) == 1.0
    assert normalize(m, spec, "float16").dtype == torch.float16
    with pytest.raises(UsageError, match="normalize must be"):
        normalize(torch.from_numpy(pixels), spec, "int8")


@pytest.mark.parametrize("rule", ["any", "all"])
@pytest.mark.parametrize("patch", [8, (5, 7)])
def test_patch_mask_equals_the_numpy_rule(rule: str, patch) -> None:
    rng = np.random.default_rng(1)
    boxes = random_boxes(rng, 24, 30, 45).reshape(6, 4, 4)
    want = np_patch_mask(boxes, (30, 45), patch, rule=rule)
    got = patch_mask(torch.from_numpy(boxes), (30, 45), patch, rule=rule)
    assert got.dtype == torch.bool and np.array_equal(got.numpy(), want)
    with pytest.raises(UsageError, match="patch rule"):
        patch_mask(torch.from_numpy(boxes), (30, 45), 8, rule="some")


# -- dynamic masking against the loop ---------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["CHW", "HWC"])
@pytest.mark.parametrize("kind", ["uint8", "float32"])
@pytest.mark.parametrize("fill", ["mean", 7.0])
@pytest.mark.parametrize("grid", [False, True])
def test_dynamic_erase_equals_a_per_patch_loop(layout: str, kind: str, fill, grid: bool) -> None:
    rng = np.random.default_rng(2)
    n, h, w, p = 9, 21, 30, 6  # sizes that are not multiples of the patch
    shape = (n, 3, h, w) if layout == "CHW" else (n, h, w, 3)
    images = (rng.integers(0, 256, shape, dtype=np.uint8) if kind == "uint8"
              else rng.standard_normal(shape).astype(np.float32))
    boxes = random_boxes(rng, n, h, w)
    boxes[0] = (0, 0, 0, 0)  # an empty slot: never erased
    boxes[1] = (3, 4, 7, 8)  # smaller than a patch: the patch is clipped to it
    gen = seeded_generator(5)
    draw = draw_patches(n, (h, w), p, (0, 6), gen, content_boxes=torch.from_numpy(boxes), grid=grid)
    counts = draw.counts.numpy()
    assert counts[0] == 0 and counts.max() <= 6 and len(set(counts.tolist())) > 1  # counts differ per image
    mask = erase_mask(draw, (h, w), content_boxes=torch.from_numpy(boxes))
    out = erase(torch.from_numpy(images), mask, fill, layout=layout, content_boxes=torch.from_numpy(boxes))
    want, want_mask = reference_erase(images, counts, draw.anchors.numpy(), (p, p), boxes, fill, layout)
    assert np.array_equal(mask.numpy(), want_mask)
    if kind == "uint8":
        assert np.array_equal(out.numpy(), want)
    else:
        np.testing.assert_allclose(out.numpy(), want, rtol=1e-6, atol=1e-6)
    assert mask.any() and not mask[0].any()
    assert not np.array_equal(out.numpy(), images)


def test_given_counts_and_positions_are_used_as_they_are() -> None:
    images = torch.arange(2 * 3 * 10 * 12, dtype=torch.int64).reshape(2, 3, 10, 12).to(torch.uint8)
    anchors = torch.tensor([[[0, 0], [8, 10], [5, 5]], [[2, 3], [0, 0], [0, 0]]])
    counts = torch.tensor([3, 1])
    draw = PatchDraw(counts, anchors, (4, 4))
    mask = erase_mask(draw, (10, 12))
    want_out, want_mask = reference_erase(images.numpy(), counts, anchors, (4, 4), None, 0.0, "CHW")
    assert np.array_equal(mask.numpy(), want_mask)
    # the patch at (8, 10) hangs over the edge: 2x2 of it is inside
    assert int(mask[0].sum()) == 16 + 4 + 16 and int(mask[1].sum()) == 16
    assert np.array_equal(erase(images, mask, 0.0).numpy(), want_out)
    # through DynamicMasking with a [B, limit] batch: slot 1 of row 0 is padding (image_count 1), so no patch
    dm = DynamicMasking(4, count=3, fill=0.0, within_content=False)
    batch = images.reshape(1, 2, 3, 10, 12)
    out, m, d = dm.apply(batch, "CHW", seeded_generator(0), image_count=torch.tensor([1]),
                         counts=counts.reshape(1, 2), anchors=anchors.reshape(1, 2, 3, 2))
    assert d.counts.tolist() == [3, 0] and np.array_equal(m[0, 0].numpy(), want_mask[0]) and not m[0, 1].any()
    assert (out[0, 0][:, m[0, 0]] == 0).all() and torch.equal(out[0, 1], batch[0, 1])


def test_draws_stay_inside_the_content_box() -> None:
    n, h, w, p = 400, 40, 64, 8
    rng = np.random.default_rng(3)
    boxes = random_boxes(rng, n, h, w)
    big = (boxes[:, 2] - boxes[:, 0] >= p) & (boxes[:, 3] - boxes[:, 1] >= p)
    for grid in (False, True):
        d = draw_patches(n, (h, w), p, (1, 9), seeded_generator(9), content_boxes=torch.from_numpy(boxes), grid=grid)
        ay, ax = d.anchors[..., 0].numpy(), d.anchors[..., 1].numpy()
        active = d.active.numpy()
        inside = ((ay >= boxes[:, 1:2]) & (ay + p <= boxes[:, 3:4]) & (ax >= boxes[:, 0:1])
                  & (ax + p <= boxes[:, 2:3]))
        assert inside[active & big[:, None]].all()
        if grid:
            assert (ay[active] % p == 0).all() and (ax[active] % p == 0).all()
            for i in range(n):  # distinct cells, and never more than the cells wholly inside the box
                cells = {(int(y), int(x)) for y, x, a in zip(ay[i], ax[i], active[i], strict=True) if a}
                assert len(cells) == int(d.counts[i])
                assert int(d.counts[i]) <= int(np_patch_mask(boxes[i], (h, w), p, rule="all").sum())
        else:
            assert set(np.unique(d.counts.numpy()[big])) == set(range(1, 10))


def test_same_seed_same_masks_other_seed_or_next_batch_other_masks() -> None:
    boxes = torch.tensor([[0, 0, 48, 32]] * 16)

    def masks(gen):
        draw = draw_patches(16, (32, 48), 8, (1, 5), gen, content_boxes=boxes)
        return erase_mask(draw, (32, 48), content_boxes=boxes)

    g1, g2 = seeded_generator(11, 0, 0), seeded_generator(11, 0, 0)
    first = masks(g1)
    assert torch.equal(first, masks(g2))
    assert not torch.equal(first, masks(g1))  # the generator moved on
    assert not torch.equal(first, masks(seeded_generator(12, 0, 0)))
    assert not torch.equal(first, masks(seeded_generator(11, 1, 0)))


def test_bad_settings_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="patch size"):
        DynamicMasking(0)
    with pytest.raises(UsageError, match="count range"):
        DynamicMasking(8, count=(3, 1))
    with pytest.raises(UsageError, match="fill"):
        DynamicMasking(8, fill="median")
    if CUDA:
        with pytest.raises(UsageError, match="CPU generator"):
            draw_patches(2, (8, 8), 4, 1, torch.Generator(device="cuda"))
    with pytest.raises(UsageError, match="encoded images"):
        BatchTransform.from_dataset(PackedDataset(packed("encoded")))


# -- CPU vs CUDA --------------------------------------------------------------------------------------------------


@cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_gives_the_same_masks_and_pixels_as_the_cpu() -> None:
    ds = PackedDataset(packed("uint8"))
    batch = to_torch(ds.take(list(range(8))))
    kw = dict(normalize="float32", patch_size=8, masking=DynamicMasking(8, (0, 5)), seed=3)
    cpu = BatchTransform.from_dataset(ds, **kw)(batch)
    gpu = BatchTransform.from_dataset(ds, device="cuda", **kw)(batch)
    for key in ("erase_mask", "erase_counts", "patch_mask"):
        assert gpu[key].device.type == "cuda"
        assert torch.equal(cpu[key], gpu[key].cpu()), key
    keep = ~cpu["erase_mask"][:, :, None].expand_as(cpu["pixel_values"])
    assert torch.equal(cpu["pixel_values"][keep], gpu["pixel_values"].cpu()[keep])  # normalisation: the same bits
    # float fills: the image means are float64 sums in a device-dependent order
    torch.testing.assert_close(cpu["pixel_values"], gpu["pixel_values"].cpu(), rtol=1e-6, atol=1e-6)
    raw = BatchTransform.from_dataset(ds, masking=DynamicMasking(6, (1, 3), grid=True), seed=4)
    raw_gpu = BatchTransform.from_dataset(ds, masking=DynamicMasking(6, (1, 3), grid=True), seed=4, device="cuda")
    assert torch.equal(raw(batch)["pixel_values"], raw_gpu(batch)["pixel_values"].cpu())  # uint8 mean fill: exact


# -- in the torch datasets --------------------------------------------------------------------------------------------


def test_map_style_dataset_with_a_transform_in_dataloader_workers() -> None:
    ds = PackedDataset(packed("uint8"))
    transform = BatchTransform.from_dataset(ds, normalize="float16", patch_size=(8, 12),
                                            masking=DynamicMasking(8, (1, 4)), seed=5)
    tds = PackedTorchDataset(ds, transform=transform)
    batches = [list(range(0, 4)), list(range(4, 8)), list(range(8, 12)), list(range(12, 15))]

    def run():
        loader = DataLoader(tds, batch_sampler=batches, collate_fn=PackedTorchDataset.collate, num_workers=2)
        return list(loader)

    first = run()
    b = first[0]
    assert b["pixel_values"].dtype == torch.float16 and tuple(b["pixel_values"].shape) == (4, 4, 3, 32, 48)
    assert tuple(b["patch_mask"].shape) == (4, 4, 4, 4) and b["patch_mask"].dtype == torch.bool
    assert tuple(b["erase_mask"].shape) == (4, 4, 32, 48) and tuple(b["erase_counts"].shape) == (4, 4)
    counts = torch.cat([x["erase_counts"] for x in first])
    image_count = torch.cat([x["image_count"] for x in first])
    slots = torch.arange(4)[None, :] < image_count[:, None]
    assert (counts[~slots] == 0).all() and (counts[slots] >= 1).all() and (counts[slots] <= 4).all()
    assert not (b["erase_mask"] & ~slots[:4, :, None, None]).any()
    # patches stay inside the letterboxed content: patch_mask (any) covers every erased pixel's patch
    for x in first:
        for i in range(x["erase_mask"].shape[0]):
            for k in range(4):
                ys, xs = torch.nonzero(x["erase_mask"][i, k], as_tuple=True)
                x0, y0, x1, y1 = x["content_boxes"][i, k].tolist()
                assert ((ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)).all()
    # reproducible run to run; the two workers draw different streams
    second = run()
    for x, y in zip(first, second, strict=True):
        assert torch.equal(x["erase_mask"], y["erase_mask"]) and torch.equal(x["pixel_values"], y["pixel_values"])
    assert not torch.equal(first[0]["erase_counts"], first[1]["erase_counts"])  # worker 0's batch, worker 1's
    # erased pixels of a real image hold its mean colour (normalised), others equal the plain normalisation
    plain = normalize(to_torch(ds.take(batches[0]))["pixel_values"], ds.pixels, "float16",
                      image_count=to_torch(ds.take(batches[0]))["image_count"])
    keep = ~b["erase_mask"][:, :, None].expand_as(plain)
    assert torch.equal(b["pixel_values"][keep], plain[keep])
    # ds[i] goes through the transform as a batch of one
    row = tds[2]
    assert row["pixel_values"].dtype == torch.float16 and tuple(row["erase_mask"].shape) == (4, 32, 48)


def test_iterable_dataset_with_a_transform_changes_masks_by_epoch() -> None:
    transform = BatchTransform.from_dataset(PackedDataset(packed("uint8")), masking=DynamicMasking(8, (2, 2)), seed=1)
    it = PackedIterableDataset(packed("uint8"), batch_size=5, shuffle=False, rank=0, world_size=1, transform=transform)

    def epoch_masks():
        return torch.cat([b["erase_mask"] for b in DataLoader(it, batch_size=None, num_workers=2)])

    e0 = epoch_masks()
    assert torch.equal(e0, epoch_masks())
    it.set_epoch(1)
    assert transform.epoch == 1
    e1 = epoch_masks()
    assert not torch.equal(e0, e1) and e0.shape == e1.shape
    rows = list(PackedIterableDataset(packed("uint8"), shuffle=False, rank=0, world_size=1, transform=transform))
    assert len(rows) == 15 and tuple(rows[0]["erase_mask"].shape) == (4, 32, 48)
    assert rows[0]["pixel_values"].dtype == torch.uint8


def test_transform_collate_over_rows_and_pickling() -> None:
    ds = PackedDataset(packed("uint8"))
    tds = PackedTorchDataset(ds)
    transform = BatchTransform.from_dataset(tds, normalize="float32", masking=DynamicMasking(4, 3, fill=0.0), seed=2)
    collate = pickle.loads(pickle.dumps(TransformCollate(transform)))
    b = collate([tds[0], tds[1], tds[2]])
    assert b["id"] == ["s001", "s002", "s003"] and b["pixel_values"].dtype == torch.float32
    assert (b["pixel_values"].permute(0, 1, 3, 4, 2)[b["erase_mask"]] == 0.0).all()
    assert b["erase_counts"][0, 0] == 3
    collate.set_epoch(4)
    assert collate.transform.epoch == 4
