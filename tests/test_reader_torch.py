"""PyTorch datasets over packed data: DataLoader workers and ranks see every row exactly once per epoch."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from _reader_helpers import packed

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

from torch.utils.data import DataLoader  # noqa: E402

from mmprep.dataset.reader import PackedDataset  # noqa: E402
from mmprep.dataset.samplers import TokenBudgetBatchSampler, sample_costs  # noqa: E402
from mmprep.dataset.torch_data import PackedIterableDataset, PackedTorchDataset, to_torch  # noqa: E402


def ids_of(loader) -> list[str]:
    return [i for b in loader for i in b["id"]]


def test_iterable_with_workers_and_ranks_reads_each_row_once() -> None:
    ds = PackedDataset(packed("uint8"))
    every = sorted(ds.column("id"))
    seen: list[str] = []
    per_rank = []
    for rank in range(2):
        it = PackedIterableDataset(ds, batch_size=3, seed=7, rank=rank, world_size=2)
        got = ids_of(DataLoader(it, batch_size=None, num_workers=2))
        per_rank.append(len(got))
        seen += got
    assert sorted(seen) == every and abs(per_rank[0] - per_rank[1]) <= 1
    it = PackedIterableDataset(ds, batch_size=4, seed=7, rank=0, world_size=1)
    first = ids_of(DataLoader(it, batch_size=None, num_workers=2))
    assert ids_of(DataLoader(it, batch_size=None, num_workers=2)) == first  # deterministic
    it.set_epoch(1)
    second = ids_of(DataLoader(it, batch_size=None, num_workers=2))
    assert second != first and sorted(second) == every


@pytest.mark.parametrize("world", [2, 4])
def test_even_gives_every_rank_the_same_number_of_steps(world: int) -> None:
    """15 rows: without even, ranks get 8 and 7 rows; with it, every rank gets 15 // world rows and the same number
    of batches (two DataLoader workers each), and no row is read twice."""
    ds = PackedDataset(packed("uint8"))
    for epoch in (0, 1):
        steps, seen = [], []
        for rank in range(world):
            it = PackedIterableDataset(ds, batch_size=2, seed=3, rank=rank, world_size=world, even=True)
            it.set_epoch(epoch)
            batches = list(DataLoader(it, batch_size=None, num_workers=2))
            steps.append(len(batches))
            seen += [i for b in batches for i in b["id"]]
        assert len(set(steps)) == 1, steps
        assert len(seen) == len(set(seen)) == 15 // world * world
    # without it: 8 and 7 rows, so one rank takes a step more (here with one row a batch)
    steps = [len(list(PackedIterableDataset(ds, batch_size=1, seed=3, rank=r, world_size=2))) for r in range(2)]
    assert sorted(steps) == [7, 8]


def test_iterable_batches_are_tensors_with_the_right_shapes() -> None:
    it = PackedIterableDataset(packed("uint8"), batch_size=4, shuffle=False, rank=0, world_size=1,
                               normalize="float16", multi_hot_size=4585)
    b = next(iter(DataLoader(it, batch_size=None)))
    assert b["pixel_values"].dtype == torch.float16 and tuple(b["pixel_values"].shape) == (4, 4, 3, 32, 48)
    assert b["input_ids"].dtype == torch.int32 and tuple(b["input_ids"].shape) == (4, 16)
    assert tuple(b["tag_ids"].shape) == (4, 4585) and b["tag_ids"].sum(dim=1).tolist() == [5.0, 4.0, 6.0, 4.0]
    assert b["id"] == ["s001", "s002", "s003", "s004"]
    rows = list(PackedIterableDataset(packed("uint8"), shuffle=False, rank=0, world_size=1, columns=["id", "line"]))
    assert [r["id"] for r in rows] == list(PackedDataset(packed("uint8")).column("id"))


def test_map_style_with_token_budget_sampler() -> None:
    ds = PackedDataset(packed("uint8"))
    tds = PackedTorchDataset(ds)
    sampler = TokenBudgetBatchSampler(sample_costs(ds, 16), 70, seed=2, blocks=ds.row_group_bounds())
    loader = DataLoader(tds, batch_sampler=sampler, collate_fn=PackedTorchDataset.collate, num_workers=2)
    seen = []
    for idx, b in zip(sampler, loader, strict=True):
        assert b["id"] == ds.take(idx, columns=["id"])["id"]
        assert tuple(b["pixel_values"].shape) == (len(idx), 4, 3, 32, 48) and b["pixel_values"].dtype == torch.uint8
        assert isinstance(b["tag_ids"], list) and all(t.dtype == torch.int32 for t in b["tag_ids"])
        seen += b["id"]
    assert sorted(seen) == sorted(ds.column("id"))
    row = tds[2]
    assert row["id"] == "s003" and tuple(row["image_mask"].shape) == (4,) and row["image_count"].item() == 2
    stacked = PackedTorchDataset.collate([tds[0], tds[1]])
    assert tuple(stacked["pixel_values"].shape) == (2, 4, 3, 32, 48) and stacked["id"] == ["s001", "s002"]


def test_pickles_without_open_files_and_to_torch_copies_read_only_arrays() -> None:
    ds = PackedDataset(packed("uint8"))
    ds.take([0, 5])
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.take([5])["id"] == ["s006"]
    ro = np.arange(6, dtype=np.int32)
    ro.flags.writeable = False
    t = to_torch({"x": ro, "s": ["a"]})["x"]  # no "non-writable array" warning (warnings are errors here)
    assert t.tolist() == list(range(6))


def test_convenience_constructors() -> None:
    ds = PackedDataset(packed("uint8"), columns=["id", "image_count"])
    it = PackedIterableDataset(ds, batch_size=5, shuffle=False, rank=0, world_size=1)
    assert [len(b["id"]) for b in it] == [5, 5, 5] and next(iter(it))["id"] == ["s001", "s002", "s003", "s004", "s005"]
    mp = PackedTorchDataset(ds)
    assert len(mp) == 15 and mp[3]["id"] == "s004" and mp[3]["image_count"].item() == 1
