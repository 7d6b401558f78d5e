"""``data=image_folder data.root=DIR data.streaming=true``: an image folder larger than memory, streamed.

The driver lists the class folders as the in-memory load does (sorted classes, sorted files),
settles the channels (``data.channels``, else 1 when every image is grey), and decodes every image
once (no Ray yet, one read unit in memory at a time) to check that Pillow reads it, key its rows
and split them by content (:func:`~.streaming.assign_split`: not stratified; identical images share
a split). Nothing is fitted: the pipeline is the fixed ``image_pipeline(size, channels)``.

A read unit is a chunk of ``data.rows_per_unit`` files of the sorted list (default: about 8 MiB of
model inputs, e.g. 682 images of 32 x 32 x 3); the list (paths relative to ``data.root``, and their
labels) travels in ``StreamSpec.extra``, so the members read exactly the files the driver saw.
``data.root`` must be a path every node sees (a shared mount on several machines).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from ensemble_service.data.base import DataError, check_split_counts
from ensemble_service.data.preprocess import PreprocessError, decode_image, image_pipeline
from ensemble_service.data.streamed import StreamingBundle
from ensemble_service.data.streaming import (
    TEST, TRAIN, VAL, StreamSpec, assign_split, labels_in_key_order, row_keys,
)

UNIT_BYTES = 8 * 2 ** 20      # a read unit's model inputs (float32), when data.rows_per_unit is not set
UNIT = "images"               # the units' "path": one list of files


def read_unit(stream: StreamSpec, path: str, unit: int) -> Tuple[np.ndarray, np.ndarray]:
    """The decoded images of unit ``unit`` (uint8 ``[n, S, S, C]``) and their labels (int64)."""
    extra = stream.extra
    r = int(extra["rows_per_unit"])
    files, labels = extra["files"][unit * r:(unit + 1) * r], extra["labels"][unit * r:(unit + 1) * r]
    root = Path(stream.uri)
    size, channels = int(extra["size"]), int(extra["channels"])
    xs = []
    for name in files:
        f = root / name
        try:
            xs.append(decode_image(f.read_bytes(), size, channels, str(f)))
        except PreprocessError as exc:
            raise DataError(str(exc)) from None
        except OSError as exc:
            raise DataError(f"{f}: cannot read it ({str(exc).splitlines()[0]})") from None
    x = np.stack(xs) if xs else np.zeros((0, size, size, channels), dtype=np.uint8)
    return x, np.asarray(labels, dtype=np.int64)


def load_stream(cfg, given: Path, classes: List[Tuple[str, List[Path]]], channels: int) -> StreamingBundle:
    """The driver's pass (see the module docstring) over the class folders :mod:`.image_folder` found
    under ``given`` (``data.root``) and the channels it settled."""
    from ensemble_service.data.splits import check_fraction, check_seed

    val_fraction = check_fraction("val_fraction", cfg.val_fraction)
    test_fraction = check_fraction("test_fraction", cfg.test_fraction)
    seed = check_seed(cfg.split_seed)
    root = given.resolve()
    size = int(cfg.image_size)
    files = [f.relative_to(given).as_posix() for _, fs in classes for f in fs]
    labels = [label for label, (_, fs) in enumerate(classes) for _ in fs]
    r = int(cfg.rows_per_unit or max(1, UNIT_BYTES // (4 * size * size * channels)))
    units = tuple((UNIT, u, min(r, len(files) - u * r)) for u in range(math.ceil(len(files) / r)))
    extra = {"files": tuple(files), "labels": tuple(labels), "size": size, "channels": channels, "rows_per_unit": r}
    pipeline = image_pipeline(size, channels)
    stream = StreamSpec(source="image_folder", uri=str(root), units=units, features=(), target="", classes=(),
                        preprocessing=pipeline.to_dict(), val_fraction=val_fraction, test_fraction=test_fraction,
                        split_seed=seed, read_tasks=int(cfg.read_tasks), extra=extra)
    counts = {TRAIN: 0, VAL: 0, TEST: 0}
    held: Dict[int, List[Tuple[np.ndarray, np.ndarray]]] = {VAL: [], TEST: []}
    for _, unit, _ in units:
        x, y = read_unit(stream, UNIT, unit)
        keys = row_keys(x, y)
        split = assign_split(keys, val_fraction, test_fraction, seed)
        for s in counts:
            counts[s] += int((split == s).sum())
        for s in held:
            held[s].append((keys[split == s], y[split == s]))
    check_split_counts(counts, f"data.root={cfg.root}", val_fraction, test_fraction, "images")

    return StreamingBundle(name="image_folder", input_shape=tuple(pipeline.input_shape), num_classes=len(classes),
                           y_val=labels_in_key_order(held[VAL]), y_test=labels_in_key_order(held[TEST]), stream=stream,
                           train_size=counts[TRAIN], class_names=[name for name, _ in classes],
                           preprocessing=pipeline.to_dict(), label=f"image_folder:{given.name}")
