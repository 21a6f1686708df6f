"""Token-budget and ratio batch samplers: exactly-once, budgets, ratios, determinism, ranks (property tests)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from _reader_helpers import packed
from hypothesis import given, settings
from hypothesis import strategies as st

from mmprep.dataset.reader import PackedDataset
from mmprep.dataset.samplers import (
    RatioBatchSampler,
    RatioBudgetBatchSampler,
    TokenBudgetBatchSampler,
    bucket_labels,
    parse_ratios,
    ratio_counts,
    sample_costs,
)
from mmprep.errors import UsageError

costs_st = st.lists(st.integers(0, 300), min_size=0, max_size=120)


@settings(max_examples=80, deadline=None)
@given(costs=costs_st, budget=st.integers(1, 600), seed=st.integers(0, 1000), epoch=st.integers(0, 5),
       shuffle=st.booleans(), cap=st.none() | st.integers(1, 9))
def test_token_budget_every_row_once_and_budgets_held(costs, budget, seed, epoch, shuffle, cap) -> None:
    s = TokenBudgetBatchSampler(costs, budget, seed=seed, shuffle=shuffle, max_batch_size=cap)
    s.set_epoch(epoch)
    batches = list(s)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(costs)))
    c = np.asarray(costs, dtype=np.int64)
    for k, b in enumerate(batches):
        assert b, "no empty batches"
        total = int(c[b].sum())
        assert total <= budget or len(b) == 1, "only a single over-budget row may exceed the budget"
        if cap is not None:
            assert len(b) <= cap
        if k + 1 < len(batches) and (cap is None or len(b) < cap):
            # greedy: the next row did not fit
            assert total + int(c[batches[k + 1][0]]) > budget
    if not shuffle:
        assert flat == list(range(len(costs)))
    again = TokenBudgetBatchSampler(costs, budget, seed=seed, shuffle=shuffle, max_batch_size=cap)
    again.set_epoch(epoch)
    assert list(again) == batches


def test_token_budget_epochs_differ_and_ranks_partition() -> None:
    costs = np.arange(200) % 37 + 5
    s = TokenBudgetBatchSampler(costs, 150, seed=3)
    e0 = s.batches()
    s.set_epoch(1)
    assert s.batches() != e0
    s.set_epoch(0)
    assert s.batches() == e0
    ranks = [TokenBudgetBatchSampler(costs, 150, seed=3, rank=r, world_size=3) for r in range(3)]
    every = s.global_batches()
    assert sorted(map(tuple, (b for r in ranks for b in r))) == sorted(map(tuple, every))
    even = [TokenBudgetBatchSampler(costs, 150, seed=3, rank=r, world_size=3, drop_uneven=True) for r in range(3)]
    assert len({len(r) for r in even}) == 1 and sum(len(r) for r in even) == len(every) // 3 * 3


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 12), min_size=1, max_size=10), seed=st.integers(0, 99))
def test_block_shuffle_keeps_blocks_together(sizes, seed) -> None:
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    n = int(bounds[-1])
    s = TokenBudgetBatchSampler(np.ones(n), 10**9, seed=seed, blocks=bounds, window=1)
    order = s.order()
    assert sorted(order.tolist()) == list(range(n))
    block = np.searchsorted(bounds, order, side="right") - 1
    runs = 1 + int(np.count_nonzero(np.diff(block)))
    assert runs == len(sizes)  # window=1: each block's rows are contiguous in the order
    wide = TokenBudgetBatchSampler(np.ones(n), 10**9, seed=seed, blocks=bounds, window=3).order()
    assert sorted(wide.tolist()) == list(range(n))


def test_token_budget_errors() -> None:
    with pytest.raises(UsageError, match="non-negative"):
        TokenBudgetBatchSampler([1, -2], 10)
    with pytest.raises(UsageError, match="budget must be at least 1"):
        TokenBudgetBatchSampler([1], 0)
    with pytest.raises(UsageError, match="blocks must rise"):
        TokenBudgetBatchSampler([1, 1, 1], 5, blocks=np.array([0, 2])).batches()


# -- ratios -------------------------------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(weights=st.lists(st.integers(0, 9), min_size=1, max_size=6).filter(lambda w: sum(w) > 0),
       batch=st.integers(1, 64))
def test_ratio_counts_round_within_one(weights, batch) -> None:
    counts = ratio_counts(weights, batch)
    assert sum(counts) == batch
    quota = np.asarray(weights) / sum(weights) * batch
    assert (np.abs(np.asarray(counts) - quota) < 1).all()


@st.composite
def ratio_case(draw: st.DrawFn):
    k = draw(st.integers(1, 4))
    weights = draw(st.lists(st.integers(1, 4), min_size=k, max_size=k))
    batch = draw(st.integers(sum(weights), 3 * sum(weights)))
    sizes = draw(st.lists(st.integers(1, 60), min_size=k, max_size=k))
    labels = np.concatenate([np.full(n, 10 * (b + 1)) for b, n in enumerate(sizes)])
    labels = np.random.default_rng(draw(st.integers(0, 99))).permutation(labels)
    return weights, batch, labels


@settings(max_examples=60, deadline=None)
@given(case=ratio_case(), seed=st.integers(0, 50))
def test_ratio_exact_mode_every_row_once_and_ratios_held(case, seed) -> None:
    weights, batch, labels = case
    s = RatioBatchSampler(labels, ":".join(map(str, weights)), batch, seed=seed)
    batches = list(s)
    assert sorted(i for b in batches for i in b) == list(range(len(labels)))
    counts = ratio_counts(weights, batch)
    keys = sorted(set(labels.tolist()))
    for b in batches[: s.ratio_batches()]:
        per = Counter(labels[b].tolist())
        assert [per.get(k, 0) for k in keys] == counts
    assert all(len(b) == batch for b in batches[:-1])
    dropped = RatioBatchSampler(labels, weights, batch, seed=seed, drop_tail=True)
    assert len(dropped) == s.ratio_batches()
    assert list(RatioBatchSampler(labels, weights, batch, seed=seed)) == batches


@settings(max_examples=60, deadline=None)
@given(case=ratio_case(), seed=st.integers(0, 50), extra=st.integers(0, 5))
def test_ratio_cycle_mode_every_batch_in_ratio(case, seed, extra) -> None:
    weights, batch, labels = case
    s = RatioBatchSampler(labels, weights, batch, seed=seed, mode="cycle")
    default_n = len(s)
    counts = ratio_counts(weights, batch)
    keys = sorted(set(labels.tolist()))
    used = Counter(i for b in s for i in b)
    assert set(used) == set(range(len(labels)))  # the default epoch uses every row at least once
    for b in s:
        per = Counter(labels[b].tolist())
        assert [per.get(k, 0) for k in keys] == counts
    longer = RatioBatchSampler(labels, weights, batch, seed=seed, mode="cycle", num_batches=default_n + extra)
    used = Counter(i for b in longer for i in b)
    for k in keys:
        uses = [used[i] for i in np.flatnonzero(labels == k)]
        assert max(uses) - min(uses) <= 1  # within a bucket, rows are used evenly


def test_ratio_mapping_order_zero_weights_and_errors() -> None:
    labels = np.array([1] * 10 + [2] * 20 + [3] * 10)
    s = RatioBatchSampler(labels, {1: 1, 2: 2}, 6, seed=0)  # bucket 3 is not named: not sampled
    seen = [i for b in s for i in b]
    assert sorted(seen) == list(range(30))
    assert all(Counter(labels[b].tolist()) == {1: 2, 2: 4} for b in s.batches()[: s.ratio_batches()])
    by_order = RatioBatchSampler(labels, "1:0:3", 4, order=[3, 1, 2], seed=0)
    assert all(Counter(labels[b].tolist()) == {3: 1, 2: 3} for b in by_order.batches()[: by_order.ratio_batches()])
    assert parse_ratios("25:50:25") == [25.0, 50.0, 25.0]
    with pytest.raises(UsageError, match="3 ratios for 2 buckets"):
        RatioBatchSampler(np.array([0, 1]), "1:2:1", 4)
    with pytest.raises(UsageError, match="too small") as exc:
        RatioBatchSampler(labels, "1:2:1", 2)
    assert "at least 4" in (exc.value.hint or "")
    with pytest.raises(UsageError, match="bucket 7 has a ratio but no rows"):
        RatioBatchSampler(labels, {1: 1, 7: 1}, 4)
    with pytest.raises(UsageError, match="ratios must"):
        parse_ratios("1:x")
    with pytest.raises(UsageError, match="mode must be"):
        RatioBatchSampler(labels, "1:1:1", 3, mode="loop")


# -- ratios within a token budget -----------------------------------------------------------------------------------


def within_budget(batches: list[list[int]], costs: np.ndarray, budget: int) -> bool:
    return all(b and (int(costs[b].sum()) <= budget or len(b) == 1) for b in batches)


def ratios_held(batches: list[list[int]], labels: np.ndarray, keys: list, weights: list) -> bool:
    """Every batch holds each bucket's share of its rows to within two rows, every prefix to within one."""
    share = np.asarray(weights, dtype=float) / sum(weights)
    total = np.zeros(len(keys))
    drawn = 0
    for b in batches:
        per = np.asarray([np.count_nonzero(labels[b] == k) for k in keys], dtype=float)
        if (np.abs(per - len(b) * share) >= 2).any():
            return False
        total += per
        drawn += len(b)
        if (np.abs(total - drawn * share) >= 1).any():
            return False
    return True


@settings(max_examples=60, deadline=None)
@given(case=ratio_case(), seed=st.integers(0, 50), budget=st.integers(1, 900), cap=st.none() | st.integers(1, 9),
       cost_seed=st.integers(0, 99))
def test_ratio_budget_exact_mode(case, seed, budget, cap, cost_seed) -> None:
    weights, _, labels = case
    costs = np.random.default_rng(cost_seed).integers(0, 200, len(labels))
    s = RatioBudgetBatchSampler(labels, weights, costs, budget, seed=seed, max_batch_size=cap)
    batches = s.batches()
    assert sorted(i for b in batches for i in b) == list(range(len(labels)))  # every row once
    assert within_budget(batches, costs, budget)
    assert cap is None or all(len(b) <= cap for b in batches)
    keys = sorted(set(labels.tolist()))
    assert ratios_held(batches[: s.ratio_batches()], labels, keys, weights)
    assert RatioBudgetBatchSampler(labels, weights, costs, budget, seed=seed, max_batch_size=cap).batches() == batches
    dropped = RatioBudgetBatchSampler(labels, weights, costs, budget, seed=seed, max_batch_size=cap, drop_tail=True)
    assert dropped.batches() == batches[: s.ratio_batches()]


@settings(max_examples=40, deadline=None)
@given(case=ratio_case(), seed=st.integers(0, 50), budget=st.integers(1, 900), cost_seed=st.integers(0, 99))
def test_ratio_budget_cycle_mode(case, seed, budget, cost_seed) -> None:
    weights, _, labels = case
    costs = np.random.default_rng(cost_seed).integers(0, 200, len(labels))
    s = RatioBudgetBatchSampler(labels, weights, costs, budget, seed=seed, mode="cycle")
    batches = s.batches()
    assert {i for b in batches for i in b} == set(range(len(labels)))  # the default epoch uses every row
    assert within_budget(batches, costs, budget) and s.ratio_batches() == len(batches)
    assert ratios_held(batches, labels, sorted(set(labels.tolist())), weights)
    fixed = RatioBudgetBatchSampler(labels, weights, costs, budget, seed=seed, mode="cycle", num_batches=3)
    assert len(fixed.batches()) == 3


def test_ratio_budget_on_real_packed_data_epochs_and_ranks() -> None:
    """image_count buckets 1 and 2+ in ratio 1:1 within 120 tokens (24 per image + text tokens)."""
    ds = PackedDataset(packed("uint8"))
    labels = bucket_labels(ds, fn=lambda b: np.minimum(b["image_count"], 2), columns=["image_count"])
    costs = sample_costs(ds, 24)
    s = RatioBudgetBatchSampler(labels, "1:1", costs, 120, seed=4)
    e0 = s.batches()
    assert s.ratio_batches() >= 2
    for idx in e0:
        b = ds.take(idx, columns=["image_count", "n_tokens"])
        assert int((b["image_count"] * 24 + np.minimum(b["n_tokens"], 16)).sum()) <= 120 or len(idx) == 1
    s.set_epoch(1)
    assert s.batches() != e0 and sorted(i for b in s for i in b) == list(range(len(ds)))
    ranks = [RatioBudgetBatchSampler(labels, "1:1", costs, 120, seed=4, rank=r, world_size=2, drop_uneven=True)
             for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) and not set(map(tuple, ranks[0])) & set(map(tuple, ranks[1]))
    with pytest.raises(UsageError, match="15 costs for 3 labels"):
        RatioBudgetBatchSampler(labels[:3], "1:1", costs, 120)
    with pytest.raises(UsageError, match="budget must be at least 1"):
        RatioBudgetBatchSampler(labels, "1:1", costs, 0)


# -- from a real packed dataset -----------------------------------------------------------------------------------


def test_costs_and_buckets_from_stored_columns() -> None:
    ds = PackedDataset(packed("uint8"))
    counts = np.asarray(ds.column("image_count"))
    n_tokens = np.asarray(ds.column("n_tokens"))
    costs = sample_costs(ds, 24)
    assert np.array_equal(costs, counts * 24 + np.minimum(n_tokens, 16))
    assert np.array_equal(sample_costs(ds, 24, text="max_length"), counts * 24 + 16)
    assert np.array_equal(bucket_labels(ds, "image_count"), counts)
    by_fn = bucket_labels(ds, fn=lambda b: np.minimum(b["image_count"], 2), columns=["image_count"], batch_size=4)
    assert np.array_equal(by_fn, np.minimum(counts, 2))
    sampler = TokenBudgetBatchSampler(costs, 80, blocks=ds.row_group_bounds(), seed=1)
    rows = [i for idx in sampler for i in ds.take(idx, columns=["id"])["id"]]
    assert sorted(rows) == sorted(ds.column("id"))
    for idx in sampler:
        b = ds.take(idx, columns=["image_count", "n_tokens"])
        total = int((b["image_count"] * 24 + np.minimum(b["n_tokens"], 16)).sum())
        assert total <= 80 or len(idx) == 1
    with pytest.raises(UsageError, match="text cost must be"):
        sample_costs(ds, 24, text="chars")
