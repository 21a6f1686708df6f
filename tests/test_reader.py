"""PackedDataset: opening, batches and rows against pyarrow's own reading, random access, normalisation, masks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _reader_helpers import SAMPLE, VOCAB, copy_packed, packed
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mmprep.dataset.arrays import (
    PixelSpec,
    denormalize,
    image_mask,
    multi_hot,
    normalize_pixels,
    patch_mask,
)
from mmprep.dataset.reader import PackedDataset
from mmprep.errors import InputError, UsageError
from mmprep.images.decode import Normalization, to_output


def arrow_rows(path: Path) -> list[dict]:
    """Every row as pyarrow reads it, shards in index order (the reference)."""
    index = json.loads((path / "index.json").read_text())["splits"]["train"]
    return pa.concat_tables(pq.read_table(path / s["path"]) for s in index["shards"]).to_pylist()


@pytest.fixture(scope="module")
def ds() -> PackedDataset:
    return PackedDataset(packed("uint8"))


# -- opening -------------------------------------------------------------------------------------------------------


def test_open_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such directory"):
        PackedDataset(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        PackedDataset(tmp_path / "file.txt")
    with pytest.raises(InputError, match=r"not an mmprep packed directory \(no index.json\)") as exc:
        PackedDataset(tmp_path)
    assert "mmprep pack" in (exc.value.hint or "")
    unfinished = tmp_path / "unfinished"
    (unfinished / "data").mkdir(parents=True)
    (unfinished / "data" / "train-00000-of-00002.parquet").write_bytes(b"PAR1")
    with pytest.raises(InputError, match="did not finish") as exc:
        PackedDataset(unfinished)
    assert "--resume" in (exc.value.hint or "")
    old = tmp_path / "old"  # format 1: shards beside the index
    old.mkdir()
    (old / "shard-00000.parquet").write_bytes(b"PAR1")
    with pytest.raises(InputError, match="did not finish"):
        PackedDataset(old)
    (unfinished / "index.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        PackedDataset(unfinished)
    (unfinished / "index.json").write_text('{"format": "something-else"}')
    with pytest.raises(InputError, match="not an mmprep index"):
        PackedDataset(unfinished)


def test_open_accepts_the_index_file_and_reports_facts(ds: PackedDataset) -> None:
    again = PackedDataset(ds.path / "index.json")
    assert len(again) == len(ds) == 15
    # 18 input rows in chunks of 4: the last chunk holds only the two rejected rows, so its shard is empty
    assert [(s.start, s.rows) for s in ds.shards] == [(0, 4), (4, 4), (8, 4), (12, 3), (15, 0)]
    assert ds.layout == "padded" and ds.limit_images == 4 and ds.max_length == 16
    assert ds.pixels is not None and ds.pixels.shape == (4, 3, 32, 48) and ds.pixels.image_size == (32, 48)
    assert "pixel_values" in ds.column_names and "tag_ids" in ds.column_names


def test_missing_shard_is_an_input_error(tmp_path: Path) -> None:
    out = copy_packed("uint8", tmp_path / "d")
    (out / "data" / "train-00001-of-00005.parquet").unlink()
    d = PackedDataset(out)
    with pytest.raises(InputError, match=r"data/train-00001-of-00005\.parquet: listed in index\.json but missing"):
        list(d.iter_batches(8))


# -- batches and rows ------------------------------------------------------------------------------------------------


def test_batches_match_pyarrow_rows_exactly(ds: PackedDataset) -> None:
    ref = arrow_rows(ds.path)
    got = list(ds.iter_batches(6))
    assert [len(b["id"]) for b in got] == [6, 6, 3]  # batches run across shard boundaries (4 rows a shard)
    i = 0
    for b in got:
        assert b["pixel_values"].shape == (len(b["id"]), 4, 3, 32, 48) and b["pixel_values"].dtype == np.uint8
        assert b["image_mask"].shape == (len(b["id"]), 4) and b["image_mask"].dtype == bool
        assert b["content_boxes"].shape == (len(b["id"]), 4, 4) and b["image_sizes"].shape == (len(b["id"]), 4, 2)
        assert b["input_ids"].dtype == np.int32 and b["attention_mask"].dtype == np.int8
        for r in range(len(b["id"])):
            want = ref[i]
            assert b["id"][r] == want["id"] and int(b["line"][r]) == want["line"]
            assert b["pixel_values"][r].tobytes() == want["pixel_values"]
            assert b["image_mask"][r].tolist() == want["image_mask"]
            assert b["content_boxes"][r].tolist() == want["content_boxes"]
            assert b["image_sizes"][r].tolist() == want["image_sizes"]
            assert b["input_ids"][r].tolist() == want["input_ids"]
            assert b["attention_mask"][r].tolist() == want["attention_mask"]
            assert bool(b["truncated"][r]) == want["truncated"] and int(b["n_tokens"][r]) == want["n_tokens"]
            assert b["tag_ids"][r].tolist() == want["tag_ids"]
            assert b["text"][r] == want["text"] and b["image_paths"][r] == want["image_paths"]
            i += 1
    assert i == len(ref)


def test_pixels_are_a_view_of_the_column_buffer(ds: PackedDataset) -> None:
    b = next(ds.iter_batches(4, columns=["pixel_values"]))
    px = b["pixel_values"]
    root = px
    while isinstance(root, np.ndarray):
        root = root.base
    assert isinstance(root, pa.Buffer) and not px.flags.owndata  # a view of the Arrow column buffer: no copy
    # the content really is the picture: slot 0 of s001 (astronaut, square) letterboxed into 32x48
    ref = np.asarray(Image.open(SAMPLE / "images/astronaut.jpg").convert("RGB").resize((32, 32), Image.BICUBIC))
    got = px[0, 0].transpose(1, 2, 0)[:, 8:40].astype(int)
    assert np.abs(got - ref.astype(int)).mean() < 4.0
    assert not px[0, 0][:, :, :8].any()  # the letterbox band is the (black) fill


def test_rows_iteration_and_getitem(ds: PackedDataset) -> None:
    rows = list(ds)
    ref = arrow_rows(ds.path)
    assert [r["id"] for r in rows] == [r["id"] for r in ref]
    r = ds[2]
    assert r["id"] == "s003" and r["pixel_values"].shape == (4, 3, 32, 48) and r["image_count"] == 2
    assert ds[-1]["id"] == ref[-1]["id"]
    sl = ds[3:9:2]
    assert sl["id"] == [ref[i]["id"] for i in (3, 5, 7)]
    with pytest.raises(IndexError, match="out of range"):
        ds[15]


def test_take_any_order_with_repeats_reads_each_row_group_once(ds: PackedDataset) -> None:
    ref = arrow_rows(ds.path)
    idx = [14, 0, 7, 7, 3, -2, 9]
    fresh = PackedDataset(ds.path, cache_row_groups=16)
    b = fresh.take(idx)
    assert b["id"] == [ref[i]["id"] for i in idx]
    for k, i in enumerate(idx):
        assert b["pixel_values"][k].tobytes() == ref[i]["pixel_values"]
    groups = {i // 2 if i < 12 else 6 + (i - 12) // 2 for i in [i % 15 for i in idx]}  # 2 rows a row group
    assert len(fresh._cache) == len(groups)
    b["pixel_values"][:] = 1  # a batch is a copy: changing it leaves the cached row groups alone
    b["tag_ids"][0][:] = 0
    again = fresh.take(idx)
    assert again["pixel_values"][0].tobytes() == ref[14]["pixel_values"]
    assert again["tag_ids"][0].tolist() == ref[14]["tag_ids"]
    single = fresh.take([5, 4])  # both rows in one row group
    assert single["id"] == ["s006", "s005"] and single["pixel_values"][0].tobytes() == ref[5]["pixel_values"]
    assert fresh.take([])["id"] == []


def test_start_stop_drop_last_and_columns(ds: PackedDataset) -> None:
    ref = arrow_rows(ds.path)
    got = [i for b in ds.iter_batches(4, start=3, stop=13) for i in b["id"]]
    assert got == [r["id"] for r in ref[3:13]]
    assert [len(b["id"]) for b in ds.iter_batches(4, drop_last=True)] == [4, 4, 4]
    b = next(ds.iter_batches(5, columns=["id", "n_tokens"]))
    assert set(b) == {"id", "n_tokens"}
    with pytest.raises(UsageError, match="no column 'pixels'") as exc:
        PackedDataset(ds.path, columns=["pixels"])
    assert "pixel_values" in (exc.value.hint or "")
    assert np.array_equal(ds.column("n_tokens"), [r["n_tokens"] for r in ref])


# -- normalisation ---------------------------------------------------------------------------------------------------


def test_normalise_on_load_equals_a_normalised_pack() -> None:
    clip = Normalization.from_spec("clip", None, None, None, "float32", "CHW")
    raw = PackedDataset(packed("uint8"), normalize="float32", mean=clip.mean, std=clip.std)
    stored = PackedDataset(packed("float32"))
    assert stored.pixels is not None and stored.pixels.normalized
    a = np.concatenate([b["pixel_values"] for b in raw.iter_batches(4, columns=["pixel_values"])])
    b = np.concatenate([b["pixel_values"] for b in stored.iter_batches(4, columns=["pixel_values"])])
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
    assert np.array_equal(a, b)  # bit for bit: the same arithmetic as the pack stage
    assert not a[0, 1:].any()  # padding slots are zeros (the mean colour), as a normalised pack stores them
    half = PackedDataset(packed("float32"), normalize="float16").take([0])["pixel_values"]
    assert half.dtype == np.float16 and np.allclose(half.astype(np.float32), b[:1], atol=1e-2)
    # de-normalising the stored floats gives the uint8 pixels back
    plain = np.concatenate([x["pixel_values"] for x in PackedDataset(packed("uint8")).iter_batches(8)])
    assert stored.pixels is not None
    back = denormalize(b, stored.pixels)
    real = image_mask(np.asarray(stored.column("image_count")), 4)
    assert np.abs(back[real].astype(int) - plain[real].astype(int)).max() <= 1


@settings(max_examples=25, deadline=None)
@given(layout=st.sampled_from(["CHW", "HWC"]), dtype=st.sampled_from(["float32", "float16"]),
       seed=st.integers(0, 2**32 - 1), preset=st.sampled_from(["clip", "imagenet"]))
def test_normalize_pixels_matches_the_pack_stage(layout: str, dtype: str, seed: int, preset: str) -> None:
    norm = Normalization.from_spec(preset, None, None, None, dtype, layout)
    rng = np.random.default_rng(seed)
    hwc = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    stored_u8 = to_output(hwc, Normalization(layout=layout))
    spec = PixelSpec("pixel_values", np.dtype(np.uint8), (1, *stored_u8.shape), layout, False, norm.mean, norm.std)
    got = normalize_pixels(stored_u8[None, None], spec, dtype)[0, 0]
    want = to_output(hwc, norm)
    assert got.dtype == want.dtype and np.array_equal(got, want)  # bit for bit


def test_normalize_errors(ds: PackedDataset) -> None:
    with pytest.raises(UsageError, match="normalize must be one of"):
        PackedDataset(ds.path, normalize="int8")
    with pytest.raises(UsageError, match="normalize needs padded pixel tensors"):
        PackedDataset(packed("encoded"), normalize="float32")


# -- encoded layout ----------------------------------------------------------------------------------------------------


def test_encoded_layout_bytes_and_decoding() -> None:
    enc = PackedDataset(packed("encoded"))
    assert enc.layout == "encoded" and enc.pixels is None
    b = enc.take([0, 8])
    first = b["images"][0][0]
    assert first["bytes"] == (SAMPLE / "images/astronaut.jpg").read_bytes() and first["path"] == "images/astronaut.jpg"
    dec = PackedDataset(packed("encoded"), decode_images=True)
    rows = {r["id"]: r for r in dec}
    s009 = rows["s009"]  # stored 1200x1800 with EXIF orientation 6: upright it is 1800 wide, 1200 high
    assert s009["image_sizes"].tolist() == [[1800, 1200]]
    assert s009["images"][0].shape == (1200, 1800, 3) and s009["images"][0].dtype == np.uint8
    s005 = rows["s005"]
    assert len(s005["images"]) == s005["image_count"] == 3
    for img, (w, h) in zip(s005["images"], s005["image_sizes"].tolist(), strict=True):
        assert img.shape == (h, w, 3)


# -- masks ----------------------------------------------------------------------------------------------------------


def reference_patch_mask(box: tuple[int, int, int, int], h: int, w: int, p: int, rule: str) -> np.ndarray:
    """Slow per-pixel reference: mark real pixels one by one, then reduce each patch pixel by pixel."""
    x0, y0, x1, y1 = box
    real = [[x0 <= x < x1 and y0 <= y < y1 for x in range(w)] for y in range(h)]
    nh, nw = -(-h // p), -(-w // p)
    out = np.zeros((nh, nw), dtype=bool)
    for i in range(nh):
        for j in range(nw):
            cells = [real[y][x] for y in range(i * p, min((i + 1) * p, h)) for x in range(j * p, min((j + 1) * p, w))]
            out[i, j] = any(cells) if rule == "any" else all(cells)
    return out


@st.composite
def boxes_case(draw: st.DrawFn) -> tuple[int, int, int, list[list[tuple[int, int, int, int]]], np.ndarray]:
    h = draw(st.integers(1, 20))
    w = draw(st.integers(1, 20))
    p = draw(st.integers(1, max(h, w) + 2))
    b = draw(st.integers(1, 3))
    limit = draw(st.integers(1, 3))
    counts = np.asarray(draw(st.lists(st.integers(0, limit), min_size=b, max_size=b)))
    rows = []
    for r in range(b):
        slots = []
        for s in range(limit):
            if s < counts[r]:
                x0 = draw(st.integers(0, w - 1))
                y0 = draw(st.integers(0, h - 1))
                slots.append((x0, y0, draw(st.integers(x0 + 1, w)), draw(st.integers(y0 + 1, h))))
            else:
                slots.append((0, 0, 0, 0))
        rows.append(slots)
    return h, w, p, rows, counts


@settings(max_examples=120, deadline=None)
@given(case=boxes_case(), rule=st.sampled_from(["any", "all"]))
def test_patch_mask_matches_per_pixel_reference(case, rule: str) -> None:
    h, w, p, rows, counts = case
    got = patch_mask(np.asarray(rows), (h, w), p, rule=rule)
    assert got.shape == (len(rows), len(rows[0]), -(-h // p), -(-w // p))
    for r, slots in enumerate(rows):
        for s, box in enumerate(slots):
            assert np.array_equal(got[r, s], reference_patch_mask(box, h, w, p, rule)), (box, h, w, p, rule)
    if rule == "any":  # every real image has at least one real patch; empty slots have none
        assert np.array_equal(got.any(axis=(2, 3)), image_mask(counts, len(rows[0])))


def test_patch_mask_on_packed_letterbox(ds: PackedDataset) -> None:
    b = ds.take([0, 2])  # s001: square astronaut in a 32x48 slot -> x 8..40; s003: two landscape images
    assert ds.pixels is not None
    m = patch_mask(b["content_boxes"], ds.pixels.image_size, 8)
    assert m.shape == (2, 4, 4, 6)
    assert m[0, 0].tolist() == [[False, True, True, True, True, False]] * 4
    assert not m[0, 1:].any() and m[1, :2].any() and not m[1, 2:].any()
    strict = patch_mask(b["content_boxes"], ds.pixels.image_size, (8, 16), rule="all")
    assert strict.shape == (2, 4, 4, 3) and (strict <= patch_mask(b["content_boxes"], (32, 48), (8, 16))).all()
    assert np.array_equal(image_mask(b["image_count"], 4), b["image_mask"])
    with pytest.raises(UsageError, match="patch rule"):
        patch_mask(b["content_boxes"], (32, 48), 8, rule="centre")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(0, 9), max_size=6), min_size=1, max_size=6))
def test_multi_hot_matches_a_loop(tags: list[list[int]]) -> None:
    got = multi_hot([np.asarray(t, dtype=np.int32) for t in tags], 10)
    want = np.zeros((len(tags), 10), dtype=np.float32)
    for r, t in enumerate(tags):
        for i in t:
            want[r, i] = 1
    assert np.array_equal(got, want)


def test_multi_hot_rejects_ids_outside_the_vocabulary() -> None:
    with pytest.raises(UsageError, match="outside a vocabulary of size 3"):
        multi_hot([np.asarray([0, 3])], 3)


# -- epoch plans ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("world", "workers"), [(1, 1), (2, 1), (2, 3), (3, 2), (4, 4)])
def test_epoch_plan_reads_every_row_exactly_once(ds: PackedDataset, world: int, workers: int) -> None:
    seen: list[str] = []
    sizes = []
    for rank in range(world):
        rank_rows = 0
        for worker in range(workers):
            plan = ds.epoch_plan(epoch=3, seed=5, rank=rank, world_size=world, worker=worker, num_workers=workers)
            ids = [i for b in ds.iter_plan(plan, 4, shuffle_rng=np.random.default_rng(worker)) for i in b["id"]]
            seen += ids
            rank_rows += len(ids)
        sizes.append(rank_rows)
    assert sorted(seen) == sorted(ds.column("id"))
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize(("world", "workers"), [(2, 1), (2, 3), (4, 2), (7, 1)])
def test_even_epoch_plan_gives_ranks_equal_rows(ds: PackedDataset, world: int, workers: int) -> None:
    for epoch in range(3):
        per_rank: list[list[int]] = []
        for rank in range(world):
            per_worker = [sum(b - a for _, a, b in ds.epoch_plan(epoch=epoch, rank=rank, world_size=world,
                                                                 worker=w, num_workers=workers, even=True))
                          for w in range(workers)]
            per_rank.append(per_worker)
        assert all(p == per_rank[0] for p in per_rank) and sum(per_rank[0]) == len(ds) // world  # same split
        rows = [(g, i) for rank in range(world) for w in range(workers)
                for g, a, b in ds.epoch_plan(epoch=epoch, rank=rank, world_size=world, worker=w, num_workers=workers,
                                             even=True) for i in range(a, b)]
        assert len(rows) == len(set(rows)) == len(ds) // world * world


def test_epoch_plan_is_deterministic_and_changes_with_the_epoch(ds: PackedDataset) -> None:
    def order(epoch: int, seed: int = 0) -> list[str]:
        plan = ds.epoch_plan(epoch=epoch, seed=seed)
        return [i for b in ds.iter_plan(plan, 5, shuffle_rng=np.random.default_rng([seed, epoch])) for i in b["id"]]

    assert order(0) == order(0)
    assert order(0) != order(1) and order(0) != order(0, seed=1)
    plain = ds.epoch_plan(shuffle=False)
    assert [i for b in ds.iter_plan(plain, 5) for i in b["id"]] == list(ds.column("id"))
    with pytest.raises(UsageError, match="rank must be in"):
        ds.epoch_plan(rank=2, world_size=2)


# -- vocabulary ------------------------------------------------------------------------------------------------------


def test_tag_names_from_the_recorded_vocabulary_or_none(ds: PackedDataset, tmp_path: Path) -> None:
    names = ds.tag_names()
    assert names is not None and len(names) == 4585
    first = ds[0]
    assert [names[i] for i in first["tag_ids"]] == ["astronaut", "flag", "woman", "suit", "portrait"]
    moved = copy_packed("uint8", tmp_path / "moved")
    index = json.loads((moved / "index.json").read_text())
    index["splits"]["train"]["config"]["vocab"] = "nowhere/ram_tag_list.txt"
    (moved / "index.json").write_text(json.dumps(index))
    assert PackedDataset(moved).tag_names() is None
    other = tmp_path / "other.txt"
    other.write_text("a\nb\n")
    assert PackedDataset(moved).tag_names(other) is None  # a different vocabulary (hash differs) is not used
    shutil.copy(VOCAB, moved / "ram_tag_list.txt")  # next to the data: found by file name
    assert PackedDataset(moved).tag_names() == names


def test_recorded_relative_vocab_is_found_from_any_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pack records --vocab as given (relative to where it ran); the reader tries the working directory and the
    dataset's folder and the folders above it, and says which one it used."""
    proj = tmp_path / "proj"
    (proj / "lists").mkdir(parents=True)
    shutil.copy(VOCAB, proj / "lists" / "ram.txt")
    d = copy_packed("uint8", proj / "runs" / "a" / "ds")
    index = json.loads((d / "index.json").read_text())
    # as `mmprep pack ... --vocab lists/ram.txt` run in proj/ records it
    index["splits"]["train"]["config"]["vocab"] = "lists/ram.txt"
    (d / "index.json").write_text(json.dumps(index))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    found = PackedDataset(d).find_vocab()
    assert found.path == proj / "lists" / "ram.txt" and found.names is not None and len(found.names) == 4585
    assert f"relative to {proj}" in found.how
    monkeypatch.chdir(proj)
    found = PackedDataset(Path("runs/a/ds")).find_vocab()
    assert found.path is not None and found.path.resolve() == (proj / "lists" / "ram.txt").resolve()
    assert "relative to the working directory" in found.how
    (proj / "lists" / "ram.txt").write_text("a\nb\n")  # the same path now holds another list: not used
    found = PackedDataset(d).find_vocab()
    assert found.names is None and "'lists/ram.txt' (recorded at pack time) not found" in found.how
    assert "--vocab" in found.how and "sha256 differs" in found.how


def test_dataset_patch_mask_and_torch_without_torch(ds: PackedDataset, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from mmprep.errors import MissingDependencyError

    b = ds.take([0, 1])
    assert np.array_equal(ds.patch_mask(b, 16), patch_mask(b["content_boxes"], (32, 48), 16))
    with pytest.raises(UsageError, match="no content_boxes"):
        ds.patch_mask({"id": b["id"]}, 16)
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    monkeypatch.delitem(sys.modules, "mmprep.dataset.torch_data", raising=False)
    with pytest.raises(MissingDependencyError, match="needs the 'torch' package") as exc:
        from mmprep.dataset.torch_data import PackedIterableDataset

        PackedIterableDataset(ds, batch_size=4)
    assert "pip install" in (exc.value.hint or "")


def test_reading_every_shard_keeps_no_shard_bytes_alive(tmp_path: Path) -> None:
    """pyarrow keeps a file's pre-buffered bytes while the file is open: after a pass over the dataset the reader
    holds none of them (memory stays flat however many shards there are)."""
    import gc

    import pyarrow as pa

    for prefetch in (0, 2):
        ds = PackedDataset(packed("uint8"), prefetch=prefetch)
        gc.collect()
        before = pa.total_allocated_bytes()
        for batch in ds.iter_batches(4):
            del batch
        gc.collect()
        kept = pa.total_allocated_bytes() - before
        assert kept < min(s.bytes for s in ds.shards if s.rows), (prefetch, kept)
