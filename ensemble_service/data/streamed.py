"""The data set a streaming source hands the driver and, through Ray's object store, each member:
what is known of it (shape, classes, fitted preprocessing, split sizes, validation and test labels)
and where its rows are (``streaming.StreamSpec``). Its two methods are how a worker reads it; they
import the Ray Data module lazily (workers import no Ray). See :mod:`.streaming`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from ensemble_service.data.streaming import StreamSpec


@dataclass
class StreamingBundle:
    """A data set the members stream (see the module docstring); what the driver knows of it."""
    name: str
    input_shape: Tuple[int, ...]
    num_classes: int
    y_val: torch.Tensor                 # in row-key order (as the members' predictions)
    y_test: torch.Tensor
    stream: StreamSpec
    train_size: int
    class_names: Optional[List[str]] = None
    preprocessing: Optional[Dict[str, Any]] = None
    label: str = ""
    streaming: bool = field(default=True, init=False)

    def sizes(self) -> Dict[str, int]:
        return {"train": int(self.train_size), "val": int(self.y_val.shape[0]), "test": int(self.y_test.shape[0])}

    def train_batches(self, batch_size: int, seed: int, epoch: int, bagging: bool,
                      device: Optional[torch.device] = None) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of shuffled training batches ``(x, y)`` for the member with ``seed`` (its
        bootstrap sample when ``bagging``); the same batches for the same (seed, epoch)."""
        from ensemble_service.data import raydata

        return raydata.train_batches(self.stream, batch_size, seed, epoch, bagging, device)

    def eval_batches(self, split: str, batch_size: int,
                     device: Optional[torch.device] = None) -> Iterator[Tuple[torch.Tensor, np.ndarray]]:
        """Every row of ``split`` ("val" or "test") once, as ``(x, row keys)`` batches."""
        from ensemble_service.data import raydata

        return raydata.eval_batches(self.stream, split, batch_size, device)


