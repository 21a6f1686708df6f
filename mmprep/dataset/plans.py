"""Epoch plans: which rows each (rank, worker) of a training job reads in an epoch, each row exactly once.

A plan is a list of :class:`PlanRange` (a row range inside one row group), computed from the row-group sizes
alone, so every rank and worker computes its own share without talking to the others.
:meth:`mmprep.dataset.reader.PackedDataset.epoch_plan` builds one for a dataset and
:meth:`~mmprep.dataset.reader.PackedDataset.iter_plan` reads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from mmprep.errors import UsageError

__all__ = ["PlanRange", "epoch_plan"]


class PlanRange(NamedTuple):
    """Rows ``[start, stop)`` of row group ``row_group`` (numbered across the whole dataset)."""

    row_group: int
    start: int
    stop: int


def epoch_plan(
    row_group_sizes: Sequence[int] | np.ndarray,
    *,
    epoch: int = 0,
    seed: int = 0,
    shuffle: bool = True,
    rank: int = 0,
    world_size: int = 1,
    worker: int = 0,
    num_workers: int = 1,
    even: bool = False,
) -> list[PlanRange]:
    """The row ranges one (rank, worker) reads in an epoch.

    The row groups are put in one order (a permutation seeded by ``seed`` and ``epoch`` when shuffling),
    the rows they hold in that order form one sequence, and that sequence is cut into ``world_size``
    contiguous parts (sizes differ by at most one row), each cut again into ``num_workers`` parts. So every
    row is read by exactly one (rank, worker) per epoch, and reads stay contiguous within row groups.

    With ``even``, every rank gets exactly ``len // world_size`` rows (the last ``len % world_size`` rows of
    the epoch's order are skipped in that epoch), so ranks with the same ``num_workers`` and batch size run
    the same number of steps: distributed training does not wait on a rank with one batch more.

    Args:
        row_group_sizes: rows in each row group, in stored order.

    Raises:
        UsageError: ``rank`` or ``worker`` outside its range.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise UsageError(f"rank must be in [0, world_size), got rank {rank} and world_size {world_size}")
    if num_workers < 1 or not 0 <= worker < num_workers:
        raise UsageError(f"worker must be in [0, num_workers), got {worker} of {num_workers}")
    sizes = np.asarray(row_group_sizes, dtype=np.int64)
    order = np.arange(len(sizes))
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(len(sizes))
    n = int(sizes.sum())
    if even:
        lo, hi = n // world_size * rank, n // world_size * (rank + 1)
    else:
        lo, hi = n * rank // world_size, n * (rank + 1) // world_size
    lo, hi = lo + (hi - lo) * worker // num_workers, lo + (hi - lo) * (worker + 1) // num_workers
    plan: list[PlanRange] = []
    pos = 0
    for g in order:
        size = int(sizes[g])
        a, b = max(lo, pos), min(hi, pos + size)
        if a < b:
            plan.append(PlanRange(int(g), a - pos, b - pos))
        pos += size
        if pos >= hi:
            break
    return plan
