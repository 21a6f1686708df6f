"""PyTorch datasets over packed data (this module imports torch; import it only where torch is wanted).

Importing it without torch installed raises :class:`mmprep.errors.MissingDependencyError` (a one-line message
with the ``pip install`` hint).

- :class:`PackedIterableDataset` (``PackedIterableDataset(ds_or_path, batch_size=64)``): streams batches (or
  rows). Each epoch's rows are split over the ranks of a distributed job and over the ``DataLoader`` workers of
  each rank, every row exactly once per epoch (:meth:`mmprep.dataset.reader.PackedDataset.epoch_plan`), shuffled
  by ``seed`` and the epoch set with ``set_epoch``: row groups in a shuffled order, rows shuffled within windows of
  a few row groups. Use it with ``DataLoader(ds, batch_size=None, num_workers=N)`` when it yields batches.
- :class:`PackedTorchDataset` (``PackedTorchDataset(ds_or_path)``): map-style, for samplers
  (``DistributedSampler``, or the batch samplers of :mod:`mmprep.dataset.samplers` via ``batch_sampler=``;
  ``__getitems__`` fetches a whole batch with one read per row group). Use ``collate_fn=PackedTorchDataset.collate``.

Both take a dataset on object storage as well (``PackedIterableDataset("s3://bucket/ds", batch_size=64,
storage_options=..., cache_dir="/local/nvme/cache", cache_limit="200GB")``): each DataLoader worker reads only the
row groups of its own plan, with range requests, retries and background prefetch (see
:class:`mmprep.dataset.reader.PackedDataset`); the shards' footers are read once, when the dataset is made, and
travel to the workers with it.

Batches become tensors: numeric arrays via ``torch.from_numpy`` (copied when the array is a read-only view of a
Parquet buffer), strings and ragged columns stay lists (``tag_ids``: a list of int32 tensors; pass
``multi_hot_size=V`` for ``[B, V]`` targets).

``transform=`` (both datasets) runs a batch transform on every batch in the worker, such as
:class:`mmprep.dataset.transforms.BatchTransform` (normalisation, patch masks, dynamic masking); rows are cut from
the transformed batch. :class:`TransformCollate` does the same as a ``collate_fn``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from mmprep.dataset.arrays import Batch, multi_hot
from mmprep.dataset.plans import PlanRange
from mmprep.dataset.reader import PackedDataset
from mmprep.errors import MissingDependencyError, UsageError

try:
    import torch
    from torch.utils.data import Dataset, IterableDataset, get_worker_info
except ImportError as _exc:  # torch itself missing (or broken): say how to install it; anything else re-raises
    if _exc.name and not _exc.name.startswith("torch"):
        raise
    raise MissingDependencyError("torch", "embed", purpose="the PyTorch dataset") from None

__all__ = ["PackedIterableDataset", "PackedTorchDataset", "TransformCollate", "default_rank", "to_torch"]

#: A batch transform: a dict of tensors in, a dict of tensors out (e.g. ``transforms.BatchTransform``).
BatchFn = Callable[[dict[str, Any]], dict[str, Any]]


def to_torch(batch: Batch, *, multi_hot_size: int | None = None) -> dict[str, Any]:
    """Numpy arrays → tensors (copying read-only views), lists stay lists; optional multi-hot ``tag_ids``."""
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, np.ndarray) and v.dtype != object:
            out[k] = torch.from_numpy(v if v.flags.writeable and v.flags.c_contiguous else np.array(v))
        elif k == "tag_ids" and multi_hot_size is not None:
            out[k] = torch.from_numpy(multi_hot(v, multi_hot_size))
        elif isinstance(v, list) and v and isinstance(v[0], np.ndarray):
            out[k] = [torch.from_numpy(np.array(x)) for x in v]
        else:
            out[k] = v
    return out


def default_rank() -> tuple[int, int]:
    """(rank, world_size) from ``torch.distributed`` when initialised, else ``RANK``/``WORLD_SIZE``, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _open(ds: PackedDataset | str | os.PathLike[str], kwargs: dict[str, Any]) -> PackedDataset:
    if isinstance(ds, PackedDataset):
        if kwargs:
            raise UsageError("give reader options when opening the path, or pass an opened PackedDataset alone")
    else:
        ds = PackedDataset(ds, **kwargs)
    if ds.remote:  # read the shards' footers once here (in parallel), not again in every DataLoader worker
        ds.row_group_bounds()
    return ds


class PackedIterableDataset(IterableDataset):
    """Stream a packed dataset, split over ranks and DataLoader workers, each row exactly once per epoch.

    Args:
        ds: a :class:`PackedDataset` or a path (then ``reader_kwargs`` are its options: columns, normalize, ...).
        batch_size: yield batches of this many rows (use ``DataLoader(batch_size=None)``), or rows when None.
        shuffle: shuffle row groups and rows within windows, by ``seed`` and epoch.
        seed: shuffle seed (the same on every rank).
        window: row groups shuffled together (memory: about ``window`` × 32 MB of pixels per worker).
        drop_last: each worker drops its last partial batch.
        even: every rank reads ``len // world_size`` rows an epoch (a few rows are skipped that epoch), so ranks
            run the same number of steps (DDP hangs when one rank has a batch more); see
            :meth:`mmprep.dataset.reader.PackedDataset.epoch_plan`.
        rank: this process's rank (default: :func:`default_rank`).
        world_size: number of ranks (default: :func:`default_rank`).
        multi_hot_size: turn ``tag_ids`` into ``[B, V]`` float targets of this vocabulary size.
        transform: applied to every batch in the worker (before rows are cut from it when ``batch_size`` is None);
            its ``set_epoch`` is called by :meth:`set_epoch` when it has one.

    Call :meth:`set_epoch` before each epoch (DataLoader workers get a fresh copy each epoch unless
    ``persistent_workers=True``, in which case the epoch they see does not change).
    """

    def __init__(
        self,
        ds: PackedDataset | str | os.PathLike[str],
        *,
        batch_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        window: int = 4,
        drop_last: bool = False,
        even: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        multi_hot_size: int | None = None,
        transform: BatchFn | None = None,
        **reader_kwargs: Any,
    ) -> None:
        super().__init__()
        self.ds = _open(ds, reader_kwargs)
        if batch_size is not None and batch_size < 1:
            raise UsageError(f"batch size must be at least 1, got {batch_size}")
        r, w = default_rank()
        self.rank = r if rank is None else rank
        self.world_size = w if world_size is None else world_size
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.window = window
        self.drop_last = drop_last
        self.even = even
        self.multi_hot_size = multi_hot_size
        self.transform = transform
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use this epoch's order (and this epoch's draws of the transform)."""
        self.epoch = int(epoch)
        _set_epoch(self.transform, self.epoch)

    def plan(self, worker: int = 0, num_workers: int = 1) -> list[PlanRange]:
        """The row-group ranges this rank's ``worker`` reads in the current epoch."""
        return self.ds.epoch_plan(epoch=self.epoch, seed=self.seed, shuffle=self.shuffle, rank=self.rank,
                                  world_size=self.world_size, worker=worker, num_workers=num_workers,
                                  even=self.even)

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        plan = self.plan(worker, num_workers)
        rng = None
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, self.rank * max(1, num_workers) + worker, 1])
        batches = self.ds.iter_plan(plan, self.batch_size or 256, shuffle_rng=rng, window=self.window,
                                    drop_last=self.drop_last and self.batch_size is not None)
        for batch in batches:
            tb = to_torch(batch, multi_hot_size=self.multi_hot_size)
            if self.transform is not None:
                tb = self.transform(tb)
            if self.batch_size is not None:
                yield tb
            else:
                n = len(next(iter(tb.values())))
                for i in range(n):
                    yield {k: v[i] for k, v in tb.items()}


class PackedTorchDataset(Dataset):
    """Map-style access to a packed dataset: ``ds[i]`` is a row of tensors, ``ds.__getitems__(idx)`` a batch.

    Args:
        ds: a :class:`PackedDataset` or a path (then ``reader_kwargs`` are its options).
        multi_hot_size: turn ``tag_ids`` into ``[B, V]`` float targets of this vocabulary size.
        transform: applied to every fetched batch (``ds[i]`` is a batch of one, transformed, then unbatched).
    """

    def __init__(
        self,
        ds: PackedDataset | str | os.PathLike[str],
        *,
        multi_hot_size: int | None = None,
        transform: BatchFn | None = None,
        **reader_kwargs: Any,
    ) -> None:
        self.ds = _open(ds, reader_kwargs)
        self.multi_hot_size = multi_hot_size
        self.transform = transform

    def set_epoch(self, epoch: int) -> None:
        """Pass the epoch to the transform (a new stream of random draws per epoch)."""
        _set_epoch(self.transform, epoch)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> dict[str, Any]:
        batch = self.__getitems__([int(index)])
        return {k: v[0] for k, v in batch.items()}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Any]:
        batch = to_torch(self.ds.take(list(indices)), multi_hot_size=self.multi_hot_size)
        return self.transform(batch) if self.transform is not None else batch

    @staticmethod
    def collate(batch: Any) -> dict[str, Any]:
        """``collate_fn`` for this dataset: passes a fetched batch through; stacks a list of rows."""
        if isinstance(batch, dict):
            return batch
        keys = batch[0].keys()
        out: dict[str, Any] = {}
        for k in keys:
            vals = [row[k] for row in batch]
            out[k] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) and vals[0].dim() >= 0 and all(
                v.shape == vals[0].shape for v in vals) else vals
        return out


def _set_epoch(transform: Any, epoch: int) -> None:
    set_epoch = getattr(transform, "set_epoch", None)
    if callable(set_epoch):
        set_epoch(int(epoch))


class TransformCollate:
    """A ``collate_fn`` that collates like :meth:`PackedTorchDataset.collate`, then applies a batch transform.

    Picklable (DataLoader workers started with spawn receive it), as long as the transform is.
    """

    def __init__(self, transform: BatchFn) -> None:
        self.transform = transform

    def set_epoch(self, epoch: int) -> None:
        _set_epoch(self.transform, epoch)

    def __call__(self, batch: Any) -> dict[str, Any]:
        return self.transform(PackedTorchDataset.collate(batch))
