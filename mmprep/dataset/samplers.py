"""Batch samplers for packed data: a token budget per batch, fixed bucket/stage ratios per batch, or both.

:class:`TokenBudgetBatchSampler` fills batches up to a cost budget; :class:`RatioBatchSampler` gives every batch of
a fixed size the same mix of buckets; :class:`RatioBudgetBatchSampler` keeps the mix while filling up to a budget
(batches of varying size with roughly constant tokens, as Pyramid-Flow trains its stages).

All are plain Python iterables of index lists, so they work as a PyTorch ``DataLoader(batch_sampler=...)``
(with :class:`mmprep.dataset.torch_data.PackedTorchDataset`) and with :meth:`mmprep.dataset.reader.PackedDataset.take`.
All are deterministic in ``(seed, epoch)``; call ``set_epoch`` before each epoch. With ``world_size > 1`` the
global list of batches is dealt round-robin (batch ``i`` goes to rank ``i % world_size``), so every batch is used
by exactly one rank; ``drop_uneven=True`` drops the last ``len % world_size`` batches so that every rank gets the
same number of steps (those rows are then skipped in that epoch).

Costs and buckets come from stored columns (:func:`sample_costs`, :func:`bucket_labels`) or from your own
vectorised function over a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from mmprep.errors import UsageError

if TYPE_CHECKING:
    from mmprep.dataset.arrays import Batch
    from mmprep.dataset.reader import PackedDataset

__all__ = [
    "RATIO_MODES",
    "TEXT_COSTS",
    "RatioBatchSampler",
    "RatioBudgetBatchSampler",
    "TokenBudgetBatchSampler",
    "bucket_labels",
    "parse_ratios",
    "ratio_counts",
    "sample_costs",
]

TEXT_COSTS = ("n_tokens", "max_length", "none")
RATIO_MODES = ("exact", "cycle")


# -- costs and buckets --------------------------------------------------------------------------------------------


def sample_costs(ds: PackedDataset, tokens_per_image: int, *, text: str = "n_tokens") -> np.ndarray:
    """Per-row cost: text tokens + ``image_count × tokens_per_image`` (int64, one entry per row).

    Args:
        ds: the dataset (reads only ``image_count`` and, for ``text="n_tokens"``, ``n_tokens``).
        tokens_per_image: what one image costs, e.g. ``(224 / 14) ** 2 = 256`` patches for ViT-L/14.
        text: ``n_tokens`` (the stored token count, capped at max_length: tokens actually in the row),
            ``max_length`` (every row costs the padded length) or ``none``.
    """
    if text not in TEXT_COSTS:
        raise UsageError(f"text cost must be one of {', '.join(TEXT_COSTS)}, got '{text}'")
    if tokens_per_image < 0:
        raise UsageError(f"tokens per image must be >= 0, got {tokens_per_image}")
    cost = np.asarray(ds.column("image_count"), dtype=np.int64) * int(tokens_per_image)
    if text != "none":
        length = ds.max_length
        if length is None:
            raise UsageError(f"{ds.path}: text cost '{text}' needs token ids, but the pack had no --tokenizer",
                             hint="use text='none'")
        if text == "max_length":
            cost += length
        else:
            cost += np.minimum(np.asarray(ds.column("n_tokens"), dtype=np.int64), length)
    return cost


def bucket_labels(
    ds: PackedDataset,
    column: str | None = None,
    *,
    fn: Callable[[Batch], Any] | None = None,
    columns: Sequence[str] | None = None,
    batch_size: int = 4096,
) -> np.ndarray:
    """A bucket label per row: a stored column's values (e.g. ``image_count``) or ``fn`` applied per batch.

    Args:
        ds: the dataset.
        column: a scalar column to use as the label.
        fn: called with each batch dict (of ``columns``) and returning one label per row (vectorised).
        columns: the columns ``fn`` needs (default: all of ``ds.columns``; name only what it needs: it is read).
        batch_size: rows per call of ``fn``.
    """
    if (column is None) == (fn is None):
        raise UsageError("give exactly one of column or fn")
    if column is not None:
        values = ds.column(column)
        if not isinstance(values, np.ndarray) or values.ndim != 1:
            raise UsageError(f"column '{column}' is not a scalar column", hint="use fn= to derive a label")
        return values
    assert fn is not None
    parts = [np.asarray(fn(b)).reshape(-1) for b in ds.iter_batches(batch_size, columns=columns)]
    labels = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if len(labels) != len(ds):
        raise UsageError(f"fn returned {len(labels)} labels for {len(ds)} rows", hint="return one label per row")
    return labels


# -- shared machinery -----------------------------------------------------------------------------------------------


class _EpochSampler:
    """Seed/epoch handling and rank dealing shared by the samplers."""

    def __init__(self, *, seed: int, rank: int, world_size: int, drop_uneven: bool) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise UsageError(f"rank must be in [0, world_size), got rank {rank} and world_size {world_size}")
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_uneven = drop_uneven
        self.epoch = 0
        self._plan: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Use the order of this epoch (call before iterating, like ``DistributedSampler.set_epoch``)."""
        self.epoch = int(epoch)

    def _rng(self, *extra: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, *extra])

    def global_batches(self) -> list[list[int]]:
        """All batches of the current epoch, before dealing them to ranks."""
        raise NotImplementedError

    def batches(self) -> list[list[int]]:
        """This rank's batches of the current epoch."""
        if self._plan is None or self._plan[0] != self.epoch:
            every = self.global_batches()
            if self.drop_uneven and self.world_size > 1:
                every = every[: len(every) // self.world_size * self.world_size]
            self._plan = (self.epoch, every[self.rank :: self.world_size])
        return self._plan[1]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())


def _block_order(n: int, rng: np.random.Generator, blocks: np.ndarray | None, window: int) -> np.ndarray:
    """A permutation of ``range(n)``: global, or blocks permuted then rows shuffled within windows of blocks."""
    if blocks is None:
        return rng.permutation(n)
    bounds = np.asarray(blocks, dtype=np.int64)
    if bounds[0] != 0 or bounds[-1] != n or (np.diff(bounds) < 0).any():
        raise UsageError(f"blocks must rise from 0 to {n} (e.g. ds.row_group_bounds())")
    nb = len(bounds) - 1
    order = rng.permutation(nb)
    starts, sizes = bounds[:-1][order], np.diff(bounds)[order]
    rows = np.repeat(starts - np.concatenate([[0], np.cumsum(sizes)[:-1]]), sizes) + np.arange(n)
    # rows now lists every block's rows in the permuted block order; shuffle inside windows of blocks
    w = max(1, int(window))
    edges = np.concatenate([[0], np.cumsum(sizes)])[::w]
    if edges[-1] != n:
        edges = np.append(edges, n)
    keys = np.repeat(np.arange(len(edges) - 1), np.diff(edges))
    return rows[np.lexsort((rng.random(n), keys))]


# -- token budget -----------------------------------------------------------------------------------------------


class TokenBudgetBatchSampler(_EpochSampler):
    """Batches whose summed cost stays within a budget (so tokens per batch stay roughly constant).

    Rows are taken in epoch order (shuffled by seed and epoch, or stored order) and added to the current batch
    while the batch's total cost stays ``<= budget``; the row that would exceed it starts the next batch. A
    single row whose own cost exceeds the budget gets a batch of its own (it is never dropped or split). Every
    row is in exactly one batch per epoch.

    Args:
        costs: cost per row (e.g. :func:`sample_costs`); non-negative.
        budget: maximum total cost per batch.
        shuffle: shuffle each epoch (else stored order).
        seed: seed of the shuffle.
        blocks: optional row-group bounds (``ds.row_group_bounds()``): shuffle blocks, then rows only within
            ``window`` consecutive blocks, so each batch touches few row groups (fast random access).
        window: blocks per shuffle window with ``blocks``.
        max_batch_size: also cap the number of rows per batch.
        rank: this process's rank.
        world_size: number of ranks.
        drop_uneven: drop trailing batches so every rank gets the same number.
    """

    def __init__(
        self,
        costs: Sequence[int] | np.ndarray,
        budget: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        blocks: np.ndarray | None = None,
        window: int = 4,
        max_batch_size: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        drop_uneven: bool = False,
    ) -> None:
        super().__init__(seed=seed, rank=rank, world_size=world_size, drop_uneven=drop_uneven)
        self.costs = np.asarray(costs, dtype=np.int64).reshape(-1)
        if (self.costs < 0).any():
            raise UsageError(f"costs must be non-negative (row {int(np.argmax(self.costs < 0))} is negative)")
        if budget < 1:
            raise UsageError(f"budget must be at least 1, got {budget}")
        if max_batch_size is not None and max_batch_size < 1:
            raise UsageError(f"max batch size must be at least 1, got {max_batch_size}")
        self.budget = int(budget)
        self.shuffle = shuffle
        self.blocks = blocks
        self.window = window
        self.max_batch_size = max_batch_size

    def order(self) -> np.ndarray:
        """The row order of the current epoch."""
        n = len(self.costs)
        return _block_order(n, self._rng(), self.blocks, self.window) if self.shuffle else np.arange(n)

    def global_batches(self) -> list[list[int]]:
        order = self.order()
        cum = np.concatenate([[0], np.cumsum(self.costs[order])])
        out: list[list[int]] = []
        s, n = 0, len(order)
        cap = self.max_batch_size or n
        while s < n:
            e = int(np.searchsorted(cum, cum[s] + self.budget, side="right")) - 1  # largest e: cum[e]-cum[s] <= budget
            e = min(max(e, s + 1), s + cap, n)
            out.append(order[s:e].tolist())
            s = e
        return out


# -- ratios -----------------------------------------------------------------------------------------------------------


def parse_ratios(ratios: str | Sequence[float]) -> list[float]:
    """``"1:2:1"`` or ``[25, 50, 25]`` → a list of non-negative weights with a positive sum."""
    if isinstance(ratios, str):
        try:
            values = [float(p) for p in ratios.replace(",", ":").split(":")]
        except ValueError:
            raise UsageError(f"ratios must look like 1:2:1, got '{ratios}'") from None
    else:
        values = [float(v) for v in ratios]
    if not values or any(not np.isfinite(v) or v < 0 for v in values) or sum(values) <= 0:
        raise UsageError(f"ratios must be non-negative numbers with a positive sum, got {ratios!r}")
    return values


def _ratio_buckets(
    labels: Sequence[Any] | np.ndarray, ratios: str | Sequence[float] | Mapping[Any, float], order: Sequence[Any] | None
) -> tuple[list[Any], list[float], list[np.ndarray]]:
    """(bucket keys, their weights, the rows of each) from row labels and ratios (see :class:`RatioBatchSampler`)."""
    labels = np.asarray(labels)
    present = [v.item() if hasattr(v, "item") else v for v in np.unique(labels)]
    if isinstance(ratios, Mapping):
        keys = list(ratios)
        weights = parse_ratios([ratios[k] for k in keys])
    else:
        weights = parse_ratios(ratios)
        keys = list(order) if order is not None else present
        if len(keys) != len(weights):
            raise UsageError(f"{len(weights)} ratios for {len(keys)} buckets ({', '.join(map(str, keys))})",
                             hint="give one ratio per bucket, or a mapping {label: weight}")
    missing = [k for k, w in zip(keys, weights, strict=True) if w > 0 and k not in present]
    if missing:
        raise UsageError(f"bucket {missing[0]!r} has a ratio but no rows",
                         hint="buckets: " + ", ".join(map(str, present)))
    return keys, weights, [np.flatnonzero(labels == k) for k in keys]


def ratio_counts(weights: Sequence[float], batch_size: int) -> list[int]:
    """Rows per bucket in a batch of ``batch_size``: the largest-remainder rounding of the weights (sums exactly)."""
    w = np.asarray(weights, dtype=np.float64)
    quota = w / w.sum() * batch_size
    counts = np.floor(quota + 1e-9).astype(np.int64)
    rest = batch_size - int(counts.sum())
    if rest > 0:
        frac = quota - counts
        for k in np.lexsort((np.arange(len(w)), -frac))[:rest]:  # largest remainder first, ties by order
            counts[k] += 1
    return counts.tolist()


class RatioBatchSampler(_EpochSampler):
    """Batches that mix buckets (stages, image counts, resolutions) in fixed ratios, e.g. ``1:2:1``.

    Every batch of ``batch_size`` rows takes :func:`ratio_counts` rows from each bucket (largest-remainder
    rounding; a batch size too small to give every positive-ratio bucket a row is an error). Rows of each bucket
    are drawn in a per-epoch shuffled order (seed, epoch).

    Modes:

    - ``exact`` (default): every row of a bucket with a positive ratio is used exactly once per epoch. Batches
      keep the ratios until a bucket runs out; the rows left then are shuffled together into the last
      ``tail`` batches (the last may be smaller), which do not keep the ratios (``drop_tail=True`` skips them).
    - ``cycle``: every batch keeps the ratios; a bucket that runs out starts a fresh shuffled pass, so rows of
      small buckets repeat (within a bucket, how often two rows are used differs by at most one). The epoch has
      ``num_batches`` batches (default: enough for every row of every bucket to be used at least once).

    Buckets with ratio 0 (or not named in a mapping) are not sampled.

    Args:
        labels: a bucket label per row (e.g. :func:`bucket_labels`).
        ratios: ``"1:2:1"`` or a sequence, matched to the bucket labels in ``order`` (default: sorted labels),
            or a mapping ``{label: weight}``.
        batch_size: rows per batch.
        order: the labels the ratios refer to, in order.
        mode: ``exact`` or ``cycle``.
        num_batches: batches per epoch in ``cycle`` mode.
        drop_tail: in ``exact`` mode, skip the tail batches.
        seed: seed of the shuffles.
        rank: this process's rank.
        world_size: number of ranks.
        drop_uneven: drop trailing batches so every rank gets the same number.
    """

    def __init__(
        self,
        labels: Sequence[Any] | np.ndarray,
        ratios: str | Sequence[float] | Mapping[Any, float],
        batch_size: int,
        *,
        order: Sequence[Any] | None = None,
        mode: str = "exact",
        num_batches: int | None = None,
        drop_tail: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_uneven: bool = False,
    ) -> None:
        super().__init__(seed=seed, rank=rank, world_size=world_size, drop_uneven=drop_uneven)
        if mode not in RATIO_MODES:
            raise UsageError(f"mode must be one of {', '.join(RATIO_MODES)}, got '{mode}'")
        if batch_size < 1:
            raise UsageError(f"batch size must be at least 1, got {batch_size}")
        keys, weights, members = _ratio_buckets(labels, ratios, order)
        counts = ratio_counts(weights, batch_size)
        starved = [k for k, w, c in zip(keys, weights, counts, strict=True) if w > 0 and c == 0]
        if starved:
            need = int(np.ceil(sum(weights) / min(w for w in weights if w > 0)))
            raise UsageError(f"batch size {batch_size} is too small for ratios {':'.join(f'{w:g}' for w in weights)}"
                             f" (bucket {starved[0]!r} would get no rows)", hint=f"use a batch size of at least {need}")
        self.keys = keys
        self.weights = weights
        self.counts = counts
        self.batch_size = batch_size
        self.mode = mode
        self.num_batches = num_batches
        self.drop_tail = drop_tail
        self.members = members

    def _active(self) -> list[int]:
        return [b for b, c in enumerate(self.counts) if c > 0]

    def global_batches(self) -> list[list[int]]:
        active = self._active()
        rngs = {b: self._rng(b) for b in active}
        if self.mode == "cycle":
            n_batches = self.num_batches
            if n_batches is None:
                n_batches = max(-(-len(self.members[b]) // self.counts[b]) for b in active)
            streams = {}
            for b in active:
                need = n_batches * self.counts[b]
                passes = -(-need // len(self.members[b]))
                streams[b] = np.concatenate([rngs[b].permutation(self.members[b]) for _ in range(passes)])[:need]
            return self._assemble(streams, n_batches, active)
        full = min(len(self.members[b]) // self.counts[b] for b in active)
        perms = {b: rngs[b].permutation(self.members[b]) for b in active}
        out = self._assemble(perms, full, active)
        if not self.drop_tail:
            left = np.concatenate([perms[b][full * self.counts[b]:] for b in active])
            left = self._rng(len(self.keys)).permutation(left)
            out += [left[i:i + self.batch_size].tolist() for i in range(0, len(left), self.batch_size)]
        return out

    def _assemble(self, streams: dict[int, np.ndarray], n_batches: int, active: list[int]) -> list[list[int]]:
        if n_batches == 0:
            return []
        parts = [streams[b][: n_batches * self.counts[b]].reshape(n_batches, self.counts[b]) for b in active]
        return np.concatenate(parts, axis=1).tolist()

    def ratio_batches(self) -> int:
        """How many batches of the current epoch (all ranks) keep the ratios exactly."""
        if self.mode == "cycle":
            return len(self.global_batches())
        return min(len(self.members[b]) // self.counts[b] for b in self._active())


class RatioBudgetBatchSampler(_EpochSampler):
    """Batches that mix buckets in fixed ratios **and** stay within a token budget (the Pyramid-Flow recipe).

    The epoch's rows are drawn one at a time, each from the bucket furthest below its share of the rows drawn so
    far (ties by order), in that bucket's per-epoch shuffled order, so every prefix of the epoch keeps the ratios
    to within one row per bucket. Batches are consecutive runs of that sequence: a row joins the current batch
    while the batch's total cost stays ``<= budget``, and the row that would exceed it starts the next batch.
    So every batch is within the budget (a single row over budget gets a batch of its own) and holds each
    bucket's share of its rows to within two rows. Ratios are of rows, as in :class:`RatioBatchSampler`; how
    many rows fit depends on their cost.

    Modes as in :class:`RatioBatchSampler`: ``exact`` uses every row of a positive-ratio bucket once per epoch;
    when the bucket next in turn runs out, the rows left (those of the unfinished batch too) are shuffled
    together into budget-filled tail batches that do not keep the ratios (``drop_tail=True`` skips them).
    ``cycle`` restarts a bucket that runs out with a fresh shuffle, and ends the epoch after ``num_batches``
    batches (default: once every row of every bucket has been used).

    The batches are planned with a Python loop over the rows (about a second per million rows an epoch).

    Args:
        labels: a bucket label per row (e.g. :func:`bucket_labels`).
        ratios: ``"1:2:1"``, a sequence matched to ``order`` (default: sorted labels), or ``{label: weight}``.
        costs: cost per row (e.g. :func:`sample_costs`); non-negative.
        budget: maximum total cost per batch.
        order: the labels the ratios refer to, in order.
        mode: ``exact`` or ``cycle``.
        num_batches: batches per epoch in ``cycle`` mode.
        max_batch_size: also cap the number of rows per batch.
        drop_tail: in ``exact`` mode, skip the tail batches.
        seed: seed of the shuffles.
        rank: this process's rank.
        world_size: number of ranks.
        drop_uneven: drop trailing batches so every rank gets the same number.
    """

    def __init__(
        self,
        labels: Sequence[Any] | np.ndarray,
        ratios: str | Sequence[float] | Mapping[Any, float],
        costs: Sequence[int] | np.ndarray,
        budget: int,
        *,
        order: Sequence[Any] | None = None,
        mode: str = "exact",
        num_batches: int | None = None,
        max_batch_size: int | None = None,
        drop_tail: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_uneven: bool = False,
    ) -> None:
        super().__init__(seed=seed, rank=rank, world_size=world_size, drop_uneven=drop_uneven)
        if mode not in RATIO_MODES:
            raise UsageError(f"mode must be one of {', '.join(RATIO_MODES)}, got '{mode}'")
        self.costs = np.asarray(costs, dtype=np.int64).reshape(-1)
        if len(self.costs) != len(labels):
            raise UsageError(f"{len(self.costs)} costs for {len(labels)} labels", hint="give one cost per row")
        if (self.costs < 0).any():
            raise UsageError(f"costs must be non-negative (row {int(np.argmax(self.costs < 0))} is negative)")
        if budget < 1:
            raise UsageError(f"budget must be at least 1, got {budget}")
        if max_batch_size is not None and max_batch_size < 1:
            raise UsageError(f"max batch size must be at least 1, got {max_batch_size}")
        if num_batches is not None and num_batches < 0:
            raise UsageError(f"num_batches must be >= 0, got {num_batches}")
        self.keys, self.weights, self.members = _ratio_buckets(labels, ratios, order)
        self.budget = int(budget)
        self.mode = mode
        self.num_batches = num_batches
        self.max_batch_size = max_batch_size
        self.drop_tail = drop_tail
        active = [b for b, w in enumerate(self.weights) if w > 0]
        total = sum(self.weights[b] for b in active)
        self._active = active
        self._share = [self.weights[b] / total for b in active]

    def _next_bucket(self, taken: list[int], k: int) -> int:
        """Position (in the active buckets) of the bucket furthest below its share of ``k + 1`` rows drawn."""
        best, gap = 0, -1.0
        for j, share in enumerate(self._share):
            d = (k + 1) * share - taken[j]
            if d > gap + 1e-12:
                best, gap = j, d
        return best

    def global_batches(self) -> list[list[int]]:
        return self._plan_epoch()[0]

    def ratio_batches(self) -> int:
        """How many batches of the current epoch (all ranks; the first ones) keep the ratios."""
        return self._plan_epoch()[1]

    def _plan_epoch(self) -> tuple[list[list[int]], int]:
        active, costs, budget = self._active, self.costs, self.budget
        cap = self.max_batch_size or len(costs) or 1
        rngs = [self._rng(b) for b in active]
        streams = [rngs[j].permutation(self.members[b]).tolist() for j, b in enumerate(active)]
        pos = [0] * len(active)
        seen = np.zeros(len(costs), dtype=bool) if self.mode == "cycle" else None
        unseen = sum(len(st) for st in streams)  # cycle mode: rows not used yet this epoch
        out: list[list[int]] = []
        batch: list[int] = []
        taken = [0] * len(active)  # rows drawn from each bucket this epoch
        drawn = total = 0
        exhausted = False
        while True:
            if self.mode == "cycle" and self.num_batches is not None and len(out) >= self.num_batches:
                break
            j = self._next_bucket(taken, drawn)
            if pos[j] == len(streams[j]):
                if self.mode == "exact":
                    exhausted = True
                    break
                streams[j] = rngs[j].permutation(self.members[active[j]]).tolist()
                pos[j] = 0
            row = streams[j][pos[j]]
            c = int(costs[row])
            if batch and (total + c > budget or len(batch) >= cap):
                out.append(batch)
                batch, total = [], 0
                if self.mode == "cycle" and self.num_batches is None and unseen == 0:
                    break
                continue
            batch.append(row)
            taken[j] += 1
            drawn += 1
            total += c
            pos[j] += 1
            if seen is not None and not seen[row]:
                seen[row] = True
                unseen -= 1
        kept = len(out)
        if exhausted and not self.drop_tail:
            left = np.asarray(batch + [r for j in range(len(active)) for r in streams[j][pos[j]:]], dtype=np.int64)
            left = self._rng(len(self.keys)).permutation(left)
            tail = TokenBudgetBatchSampler(costs[left], budget, shuffle=False, max_batch_size=self.max_batch_size)
            out += [left[b].tolist() for b in tail.global_batches()]
        return out, kept
