"""Preprocessing that belongs to the ensemble: raw inputs -> model inputs, as plain JSON.

Every data source describes what it does to its files' values before the model sees them
(scaling pixels, standardizing columns, channel layout, reshaping) as a :class:`Pipeline`. The
pipeline is fitted on the training split (standardization statistics), applied to all three
splits at load time, stored in the registered ensemble's manifest, and applied again by
``ensemble serve`` and the pyfunc model, so a client sends inputs in the training data's own
format: sklearn digits' 0..16 values, MNIST's 0..255 bytes, a CSV's columns, image files.

Pure NumPy (and Pillow for image files); no torch, no MLflow.

Spec (``Pipeline.to_dict``)::

    {"format": 1, "kind": "array" | "table" | "image", "raw_shape": [...],
     "columns": [...]            # table: the feature columns, in order
     "image": {"size": S, "channels": C},   # image: how files are decoded
     "ops": [{"op": "divide", "by": 16.0}, {"op": "standardize", "mode": "feature", "mean": [...],
             "std": [...]}, {"op": "hwc_to_chw"}, {"op": "reshape", "shape": [1, 8, 8]}]}

``standardize`` has ``mode`` ``scalar`` (one mean and std over all training values) or ``feature``
(one per raw feature, i.e. per column or per element); a zero std counts as 1.
"""
from __future__ import annotations

import io
import math
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

FORMAT = 1
KINDS = ("array", "table", "image")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class PreprocessError(ValueError):
    """Inputs that do not match what the ensemble was trained on; one line, names the field."""

    def __init__(self, message: str, field: str = "inputs"):
        super().__init__(message)
        self.field = field


class Pipeline:
    """Raw inputs ``[B, *raw_shape]`` -> float32 model inputs ``[B, *input_shape]``."""

    def __init__(self, raw_shape: Sequence[int], ops: Sequence[Mapping[str, Any]] = (), *, kind: str = "array",
                 columns: Optional[Sequence[str]] = None, image: Optional[Mapping[str, Any]] = None):
        if kind not in KINDS:
            raise ValueError(f"pipeline kind must be one of {KINDS}, got {kind!r}")
        self.raw_shape = tuple(int(s) for s in raw_shape)
        self.ops = [dict(op) for op in ops]
        self.kind = kind
        self.columns = list(columns) if columns is not None else None
        self.image = dict(image) if image is not None else None

    # -- description ---------------------------------------------------------
    @property
    def input_shape(self) -> Tuple[int, ...]:
        """The model's per-sample input shape (what the ops make of ``raw_shape``)."""
        shape = self.raw_shape
        for op in self.ops:
            if op["op"] == "reshape":
                shape = tuple(int(s) for s in op["shape"])
            elif op["op"] == "hwc_to_chw":
                shape = (shape[-1], *shape[:-1]) if len(shape) == 3 else (1, *shape)
        return shape

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"format": FORMAT, "kind": self.kind, "raw_shape": list(self.raw_shape),
                               "ops": [dict(op) for op in self.ops]}
        if self.columns is not None:
            out["columns"] = list(self.columns)
        if self.image is not None:
            out["image"] = dict(self.image)
        return out

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> "Pipeline":
        if spec.get("format") != FORMAT:
            raise ValueError(f"unknown preprocessing format {spec.get('format')!r}")
        return cls(spec["raw_shape"], spec.get("ops", ()), kind=spec.get("kind", "array"),
                   columns=spec.get("columns"), image=spec.get("image"))

    def describe(self) -> str:
        steps = []
        for op in self.ops:
            if op["op"] == "divide":
                steps.append(f"/ {op['by']:g}")
            elif op["op"] == "standardize":
                steps.append(f"standardize ({op['mode']})")
            elif op["op"] == "reshape":
                steps.append(f"reshape {list(op['shape'])}")
            elif op["op"] == "hwc_to_chw":
                steps.append("HWC -> CHW")
        return ", ".join(steps) or "none"

    # -- fitting ---------------------------------------------------------------
    def fit(self, x_train: np.ndarray) -> "Pipeline":
        """Compute the statistics of every ``standardize`` op from the (raw) training inputs."""
        x = np.asarray(x_train, dtype=np.float32)
        for i, op in enumerate(self.ops):
            if op["op"] == "standardize" and "mean" not in op:
                if op["mode"] == "scalar":
                    mean = float(x.mean(dtype=np.float64)) if x.size else 0.0
                    std = float(x.std(dtype=np.float64)) if x.size else 1.0
                    op["mean"], op["std"] = mean, (std if std > 0 else 1.0)
                else:
                    flat = x.reshape(len(x), -1).astype(np.float64)
                    mean = flat.mean(0) if len(flat) else np.zeros(flat.shape[1])
                    std = flat.std(0) if len(flat) else np.ones(flat.shape[1])
                    std[~(std > 1e-12)] = 1.0
                    op["mean"], op["std"] = mean.tolist(), std.tolist()
            x = _apply(op, x)
        return self

    # -- applying --------------------------------------------------------------
    def transform(self, x: np.ndarray) -> np.ndarray:
        """Raw ``[B, *raw_shape]`` (already checked) -> float32 ``[B, *input_shape]``, C-contiguous."""
        out = np.asarray(x, dtype=np.float32)
        for op in self.ops:
            out = _apply(op, out)
        return np.ascontiguousarray(out, dtype=np.float32)

    def accept(self, x: Any, field: str = "inputs") -> np.ndarray:
        """A client's raw batch as ``[B, *raw_shape]`` float32: a NumPy array (or nested lists) of
        shape ``[B, *raw_shape]`` or flattened ``[B, prod(raw_shape)]``, a pandas DataFrame (a
        table's columns are picked by name), or for images a list of encoded image files (bytes)."""
        if hasattr(x, "columns") and hasattr(x, "to_numpy"):  # pandas DataFrame
            if self.kind != "table":
                x = x.to_numpy()  # C-order values of each row
            else:
                x = self._frame(x, field)
        elif self.kind == "image" and isinstance(x, (list, tuple)) and x and isinstance(x[0], (bytes, bytearray)):
            x = np.stack([decode_image(b, self.image["size"], self.image["channels"], f"{field}[{i}]")
                          for i, b in enumerate(x)])
        try:
            arr = np.asarray(x)
        except Exception as exc:
            raise PreprocessError(f"{field} must be an array of numbers ({_first(exc)})", field) from None
        if arr.dtype == object or arr.dtype.kind not in "biuf":
            raise PreprocessError(f"{field} must hold numbers, got {arr.dtype}", field)
        arr = arr.astype(np.float32, copy=False)
        shape, d = self.raw_shape, math.prod(self.raw_shape)
        if arr.ndim == 0 or arr.shape[0] == 0:
            raise PreprocessError(f"{field} is an empty batch", field)
        if tuple(arr.shape[1:]) != shape:
            if arr.ndim == 2 and arr.shape[1] == d:
                arr = arr.reshape(arr.shape[0], *shape)
            elif self.kind == "image" and arr.ndim == len(shape) and tuple(arr.shape[1:]) == shape[:-1] \
                    and shape[-1] == 1:
                arr = arr[..., None]
            else:
                expect = f"[batch, {', '.join(map(str, shape))}]" + (f" or [batch, {d}]" if len(shape) > 1 else "")
                raise PreprocessError(f"{field} has shape {list(arr.shape)}; this ensemble takes raw inputs "
                                      f"{expect} ({self.format_hint()})", field)
        if not np.isfinite(arr).all():
            raise PreprocessError(f"{field} contain NaN or infinite values", field)
        return arr

    def __call__(self, x: Any, field: str = "inputs") -> np.ndarray:
        return self.transform(self.accept(x, field))

    def format_hint(self) -> str:
        if self.kind == "table":
            return f"the columns {', '.join(self.columns or [])}"
        if self.kind == "image":
            return (f"{self.image['size']}x{self.image['size']} images, {self.image['channels']} channel(s), "
                    f"pixel values 0-255 in height, width, channel order, or image files")
        return "the training data's own values, before any scaling"

    def _frame(self, frame: Any, field: str) -> np.ndarray:
        if self.columns:
            missing = [c for c in self.columns if c not in frame.columns]
            if missing:
                raise PreprocessError(f"{field} lacks the column(s) {', '.join(map(str, missing))}", field)
            frame = frame[self.columns]
        try:
            return frame.to_numpy(dtype="float32")
        except Exception as exc:
            raise PreprocessError(f"{field} must hold only numbers ({_first(exc)})", field) from None


def _apply(op: Mapping[str, Any], x: np.ndarray) -> np.ndarray:
    kind = op["op"]
    if kind == "divide":
        return x / np.float32(op["by"])
    if kind == "standardize":
        if op["mode"] == "scalar":
            return (x - op["mean"]) / op["std"]  # Python floats: the result stays float32
        shape = x.shape
        flat = x.reshape(len(x), -1)
        mean = np.asarray(op["mean"], dtype=np.float32)
        std = np.asarray(op["std"], dtype=np.float32)
        return ((flat - mean) / std).reshape(shape)
    if kind == "reshape":
        return x.reshape(len(x), *[int(s) for s in op["shape"]])
    if kind == "hwc_to_chw":
        return np.moveaxis(x, -1, 1) if x.ndim == 4 else x[:, None]
    raise ValueError(f"unknown preprocessing op {kind!r}")


def _first(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def decode_image(blob: bytes, size: int, channels: int, field: str = "image") -> np.ndarray:
    """An encoded image file -> uint8 ``[size, size, channels]`` (resized bilinearly, converted to
    grey ``L`` for 1 channel, ``RGB`` for 3; 16-bit grey values v become round(v / 257)). Raises
    PreprocessError for anything Pillow cannot read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(bytes(blob))) as img:
            img.load()
            if img.mode.startswith("I;16"):  # 16-bit grey: Pillow's convert would clip it at 255
                deep = np.asarray(img, dtype=np.float64)
                img = Image.fromarray(np.rint(deep / 257.0).astype(np.uint8))  # mode L
            img = img.convert("L" if channels == 1 else "RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        why = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", _first(exc))  # not the BytesIO's address
        raise PreprocessError(f"{field} is not an image Pillow can read ({why})", field) from None
    return arr[..., None] if arr.ndim == 2 else arr


def image_pipeline(size: int, channels: int) -> Pipeline:
    """Decoded images ``[S, S, C]`` (0-255) -> ``[C, S, S]`` in [0, 1]."""
    return Pipeline((size, size, channels), [{"op": "hwc_to_chw"}, {"op": "divide", "by": 255.0}], kind="image",
                    image={"size": int(size), "channels": int(channels)})
