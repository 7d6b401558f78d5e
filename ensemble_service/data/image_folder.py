"""``data=image_folder data.root=DIR data.image_size=S``: one sub-folder of images per class.

The sorted sub-folder names are the classes. Every PNG/JPEG (also BMP, GIF, TIFF, WebP) in them is
read with Pillow and resized to S x S (bilinear); images stay grey (1 channel) when every image is
grey, else all become RGB (3 channels); ``data.channels=1|3`` forces one. Other files are ignored;
an image Pillow cannot decode is an error naming the file. Raw inputs are ``[S, S, C]`` pixel
values 0-255 (height, width, channel), or image files sent to the endpoint; the model sees
``(C, S, S)`` / 255.

``data.streaming=true`` keeps a folder larger than memory on disk: the members decode chunks of
files through Ray Data (:mod:`.image_stream`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from ensemble_service.data.base import DataConfig, DataError, Raw, Source, register_source
from ensemble_service.data.preprocess import IMAGE_SUFFIXES, PreprocessError, decode_image, image_pipeline

GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


@dataclass
class ImageFolderData(DataConfig):
    name: str = "image_folder"
    root: str = ""                  # a folder with one sub-folder of images per class
    image_size: int = 32            # every image is resized to image_size x image_size
    channels: Optional[int] = None  # 1 (grey) or 3 (RGB); null: grey only if every image is grey
    streaming: bool = False         # stream the images through Ray Data (decoded by the members)
    read_tasks: int = 1             # concurrent Ray Data read tasks per member (streaming)
    rows_per_unit: Optional[int] = None   # images per read unit (streaming; null: about 8 MiB of inputs)


def _classes(cfg: ImageFolderData) -> Tuple[Path, List[Tuple[str, List[Path]]]]:
    if not cfg.root:
        raise DataError("data=image_folder needs data.root=DIR (a folder with one sub-folder of images per class)")
    root = Path(os.path.expanduser(cfg.root))
    if not root.is_dir():
        raise DataError(f"data.root={cfg.root}: no such folder (relative paths are taken from {os.getcwd()})")
    if isinstance(cfg.image_size, bool) or not isinstance(cfg.image_size, int) or not 1 <= cfg.image_size <= 4096:
        raise DataError(f"data.image_size must be an integer in [1, 4096], got {cfg.image_size!r}")
    if cfg.channels not in (None, 1, 3):
        raise DataError(f"data.channels must be 1, 3 or null, got {cfg.channels!r}")
    classes = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in d.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                       and not f.name.startswith("."))
        if not files:
            raise DataError(f"data.root={cfg.root}: class folder {d.name!r} holds no images "
                            f"({', '.join(IMAGE_SUFFIXES)})")
        classes.append((d.name, files))
    if len(classes) < 2:
        raise DataError(f"data.root={cfg.root} has {len(classes)} class folder(s); a classifier needs at least 2 "
                        "(one sub-folder of images per class)")
    return root, classes


def channels_of(cfg: ImageFolderData, classes: List[Tuple[str, List[Path]]]) -> int:
    """data.channels, else 1 when every image is grey and 3 otherwise (reading the images' headers)."""
    from PIL import Image, UnidentifiedImageError

    if cfg.channels is not None:
        return cfg.channels
    for _, files in classes:
        for f in files:
            try:
                with Image.open(f) as img:
                    mode = img.mode
            except (UnidentifiedImageError, OSError, ValueError) as exc:
                raise DataError(f"{f} is not an image Pillow can read ({str(exc).splitlines()[0]})") from None
            if mode not in GREY_MODES and not mode.startswith("I;16"):
                return 3
    return 1


@register_source
class ImageFolder(Source):
    name = "image_folder"
    schema = ImageFolderData
    description = "your images: one sub-folder per class under data.root, resized to data.image_size"

    def check(self, cfg: ImageFolderData) -> None:
        from ensemble_service.data.arrays_stream import check_options

        check_options(cfg)
        _classes(cfg)

    def load_stream(self, cfg: ImageFolderData):
        from ensemble_service.data import image_stream

        from ensemble_service.data.arrays_stream import check_options

        check_options(cfg)
        root, classes = _classes(cfg)
        return image_stream.load_stream(cfg, root, classes, channels_of(cfg, classes))

    def read_unit(self, stream, path: str, unit: int):
        from ensemble_service.data import image_stream

        return image_stream.read_unit(stream, path, unit)

    def load(self, cfg: ImageFolderData) -> Raw:
        root, classes = _classes(cfg)
        channels = channels_of(cfg, classes)
        xs, ys = [], []
        for label, (_, files) in enumerate(classes):
            for f in files:
                try:
                    xs.append(decode_image(f.read_bytes(), cfg.image_size, channels, str(f)))
                except PreprocessError as exc:
                    raise DataError(str(exc)) from None
                ys.append(label)
        x = np.stack(xs)
        return Raw(x, np.asarray(ys, dtype=np.int64), image_pipeline(cfg.image_size, channels),
                   num_classes=len(classes), class_names=[name for name, _ in classes],
                   label=f"image_folder:{root.name}")
