"""The Ray Data pipelines a member streams its data through (the only data module that imports Ray).

Each call builds one Ray Data ``Dataset`` over the source's read units (``StreamSpec.units``: a
parquet row group, a slice of an ``.npz`` array's rows, a chunk of image files; units that cannot
hold the split are left out) and iterates it from inside the member's Ray task:

``from_items(units, in this epoch's order) -> map_batches(read: rows of the split, model inputs,
bootstrap repeats) -> iter_torch_batches(batch_size, local shuffle buffer)``

* Ray Data's streaming executor keeps only a few blocks in flight and backs off when the object
  store fills, so a data set many times the object store's size streams through it;
* the read tasks ask for no CPU (``num_cpus=0``), at most ``StreamSpec.read_tasks`` at a time per
  member: the member's task already holds the CPUs Ray gave it, and read tasks that waited for a
  CPU would wait forever on a cluster whose CPUs all train members;
* order is preserved (``preserve_order``), so an epoch's batches depend only on (seed, epoch): the
  units' order is a permutation drawn from them, the rows inside a unit are permuted, and
  ``iter_torch_batches`` mixes neighbouring units through a seeded local shuffle buffer. A member
  resumed at epoch k sees the batches an uninterrupted run would.

The rows of a split are picked by their keys (``Source.split_of``: ``streaming.assign_split`` unless a
unit belongs wholly to a ready-made split) inside the read task, and
the pipeline fitted on the driver turns raw values into model inputs there too.
"""
from __future__ import annotations

import logging
import warnings
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import torch

import ray
import ray.data

from ensemble_service.data import streaming
from ensemble_service.data.base import SOURCES
from ensemble_service.data.preprocess import Pipeline

SHUFFLE_BUFFER_BATCHES = 4   # the local shuffle buffer holds this many batches

# Ray Data hands out read-only views of its blocks, and torch warns when it wraps one (in the middle
# of a submit's progress bars). The batches here are read, never written.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)


def read_unit(stream: streaming.StreamSpec, path: str, row_group: int) -> Tuple[np.ndarray, np.ndarray]:
    """One read unit's raw inputs ``[n, *raw_shape]`` and labels ``[n]`` (class indices), read by the
    source that described it (``Source.read_unit``)."""
    return SOURCES.get(stream.source).read_unit(stream, path, row_group)


def _reader(stream: streaming.StreamSpec, split: int, seed: Optional[int], epoch: int, bagging: bool):
    pipeline = Pipeline.from_dict(stream.preprocessing)
    source = SOURCES.get(stream.source)

    def read(batch: Dict[str, np.ndarray]):
        for path, group in zip(batch["path"], batch["row_group"]):
            x, y = read_unit(stream, str(path), int(group))
            keys = streaming.row_keys(x, y)
            keep = source.split_of(stream, str(path), keys) == split
            x, y, keys = x[keep], y[keep], keys[keep]
            if seed is not None:  # training: the member's bootstrap sample, its rows in a per-epoch order
                if bagging:
                    reps = streaming.poisson_counts(keys, seed)
                    x, y, keys = np.repeat(x, reps, 0), np.repeat(y, reps), np.repeat(keys, reps)
                perm = np.random.default_rng([seed, epoch, int(group), len(keys)]).permutation(len(keys))
                x, y, keys = x[perm], y[perm], keys[perm]
            if not len(y):
                continue
            if seed is not None:
                yield {"x": pipeline.transform(x), "y": y.astype(np.int64)}
            else:
                yield {"x": pipeline.transform(x), "key": keys}

    return read


def _dataset(stream: streaming.StreamSpec, split: int, seed: Optional[int], epoch: int, bagging: bool):
    if not ray.is_initialized():  # Ray Data would start (or join) a cluster of its own
        raise RuntimeError(f"data={stream.source} streams through Ray Data inside a Ray cluster; this process "
                           "is not connected to one (members run as Ray tasks)")
    source = SOURCES.get(stream.source)
    units = [{"path": p, "row_group": g} for p, g, _ in stream.units if split in source.unit_splits(stream, p)]
    if seed is not None:
        order = np.random.default_rng([seed, epoch]).permutation(len(units))
        units = [units[i] for i in order]
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # no per-epoch "Starting execution" lines
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    return ds.map_batches(_reader(stream, split, seed, epoch, bagging), batch_size=1, batch_format="numpy",
                          num_cpus=0, compute=ray.data.TaskPoolStrategy(size=max(1, int(stream.read_tasks))))


def train_batches(stream: streaming.StreamSpec, batch_size: int, seed: int, epoch: int, bagging: bool,
                  device: Optional[torch.device] = None) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    ds = _dataset(stream, streaming.TRAIN, int(seed), int(epoch), bool(bagging))
    for batch in ds.iter_torch_batches(batch_size=int(batch_size), local_shuffle_buffer_size=SHUFFLE_BUFFER_BATCHES
                                       * int(batch_size), local_shuffle_seed=int(seed) * 100003 + int(epoch),
                                       dtypes={"x": torch.float32, "y": torch.int64}, device=str(device or "cpu"),
                                       drop_last=False):
        yield batch["x"], batch["y"]


def eval_batches(stream: streaming.StreamSpec, split: str, batch_size: int,
                 device: Optional[torch.device] = None) -> Iterator[Tuple[torch.Tensor, np.ndarray]]:
    ds = _dataset(stream, streaming.SPLITS[split], None, 0, False)
    for batch in ds.iter_batches(batch_size=int(batch_size), batch_format="numpy"):
        yield torch.from_numpy(np.ascontiguousarray(batch["x"], dtype=np.float32)), np.asarray(batch["key"])
