"""Data sets in torchvision's on-disk layout under ``data.root``: ``mnist``, ``fashion_mnist``, ``cifar10``.

``mnist``, ``fashion_mnist``
    ``<root>/MNIST/raw/`` and ``<root>/FashionMNIST/raw/`` holding ``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each
    optionally gzipped. Raw inputs are the 28x28 bytes 0..255; the model sees ``(1, 28, 28)`` / 255.
``cifar10``
    ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch}`` (pickled dicts), unpickled with a
    restricted unpickler that only accepts plain containers and NumPy array reconstruction. Raw
    inputs are the files' 3072 bytes per image in channel, height, width order (``[3, 32, 32]``);
    the model sees them / 255.

With ``data.download=true`` missing files are fetched (md5-checked, atomically); the tests never
download. The validation split is ``val_fraction`` of the official training split.
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import math
import os
import pickle
import shutil
import struct
import tarfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np

from ensemble_service.data.base import DataConfig, DataError, Raw, Source, register_source
from ensemble_service.data.bundled import DIGIT_NAMES
from ensemble_service.data.preprocess import Pipeline

log = logging.getLogger(__name__)

FASHION_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"]
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class TorchvisionData(DataConfig):
    name: str = "mnist"
    root: str = "./data"
    download: bool = False       # fetch missing files (only when true)


@dataclass(frozen=True)
class FileSpec:
    """A required file; any of ``candidates`` satisfies it (e.g. plain or gzipped)."""

    candidates: Tuple[Path, ...]

    def found(self) -> Optional[Path]:
        for path in self.candidates:
            if path.is_file():
                return path
        return None

    def describe(self) -> str:
        if len(self.candidates) == 2 and self.candidates[1].name == self.candidates[0].name + ".gz":
            return f"{self.candidates[0]}[.gz]"
        return " or ".join(str(p) for p in self.candidates)


class FileSource(Source):
    """A source whose files live under ``data.root`` and may be downloaded."""

    schema = TorchvisionData
    has_test_split = True

    def files(self, root: Path) -> List[FileSpec]:
        raise NotImplementedError

    def download(self, root: Path) -> None:
        raise NotImplementedError

    def read(self, root: Path) -> Raw:
        raise NotImplementedError

    def missing(self, root: Path) -> List[FileSpec]:
        return [spec for spec in self.files(root) if spec.found() is None]

    def missing_error(self, missing: List[FileSpec]) -> DataError:
        more = f" (and {len(missing) - 1} more file(s))" if len(missing) > 1 else ""
        return DataError(f"data set '{self.name}' is not on disk: missing {missing[0].describe()}{more}; "
                         f"pass data.download=true to fetch it, or put the files there (or point data.root elsewhere)")

    def check(self, cfg: TorchvisionData) -> None:
        if cfg.download:
            return
        missing = self.missing(root_of(cfg))
        if missing:
            raise self.missing_error(missing)

    def load(self, cfg: TorchvisionData) -> Raw:
        root = root_of(cfg)
        missing = self.missing(root)
        if missing:
            if not cfg.download:
                raise self.missing_error(missing)
            self.download(root)
            missing = self.missing(root)
            if missing:
                raise DataError(f"download of '{self.name}' finished but {missing[0].describe()} is still missing")
        return self.read(root)


def root_of(cfg: Any) -> Path:
    return Path(os.path.expanduser(os.fspath(cfg.root)))


# Downloading (mnist, fashion_mnist, cifar10); never used by the tests
# --------------------------------------------------------------------------------------------------

_DOWNLOAD_TIMEOUT_S = 60


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(url: str, dest: Path, md5: Optional[str]) -> None:
    """Fetch ``url`` to ``dest`` atomically, verifying ``md5``; any failure is a one-line DataError."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create {dest.parent} ({exc}); point data.root at a writable directory") from exc
    tmp = dest.with_name(dest.name + ".part")
    log.info("downloading %s to %s", url, dest)
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "ensemble-service"})
        with urllib.request.urlopen(request, timeout=_DOWNLOAD_TIMEOUT_S) as response, open(tmp, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
    except (OSError, http.client.HTTPException, ValueError) as exc:  # URLError and timeouts are OSErrors
        tmp.unlink(missing_ok=True)
        reason = str(getattr(exc, "reason", None) or exc).replace("\n", " ") or type(exc).__name__
        raise DataError(
            f"could not download {url} ({reason}); check the network, or fetch the file yourself to {dest}"
        ) from exc
    if md5 is not None:
        got = _md5(tmp)
        if got != md5:
            tmp.unlink(missing_ok=True)
            raise DataError(f"checksum mismatch for {url} (md5 {got}, expected {md5}); retry the download")
    os.replace(tmp, dest)


# --------------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)
# --------------------------------------------------------------------------------------------------

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_IMAGES_MAGIC = 0x00000803  # 2051: unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # 2049: unsigned bytes, 1 dimension

_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _read_bytes(path: Path) -> bytes:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read {path} ({exc}); delete it and download it again") from exc


def _read_idx(path: Path, expected_magic: Optional[int] = None) -> np.ndarray:
    """Parse an IDX file (optionally gzipped): magic ``00 00 <type> <ndim>``, then ``ndim``
    big-endian uint32 dimensions, then the data, big-endian. Raises :class:`DataError` if corrupt."""
    raw = _read_bytes(path)
    fix = "the file is corrupt; delete it and download it again"
    if len(raw) < 4:
        raise DataError(f"{path} is too short to be an IDX file; {fix}")
    (magic,) = struct.unpack(">I", raw[:4])
    if expected_magic is not None and magic != expected_magic:
        raise DataError(f"{path} has IDX magic number {magic:#010x}, expected {expected_magic:#010x}; {fix}")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DataError(f"{path} has an invalid IDX magic number {magic:#010x}; {fix}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated inside its IDX header; {fix}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_DTYPES[raw[2]]
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path} holds {len(raw) - header} data bytes but its IDX header {tuple(dims)} announces {expected}; {fix}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _idx_specs(folder: str) -> Callable[[Path], List[FileSpec]]:
    def specs(root: Path) -> List[FileSpec]:
        raw = root / folder / "raw"
        return [FileSpec((raw / f, raw / (f + ".gz"))) for f in _IDX_FILES.values()]

    return specs


def _load_idx_pair(images_spec: FileSpec, labels_spec: FileSpec) -> Tuple[np.ndarray, np.ndarray]:
    images_path, labels_path = images_spec.found(), labels_spec.found()
    assert images_path is not None and labels_path is not None  # checked by FileSource.load
    images = _read_idx(images_path, _IDX_IMAGES_MAGIC)
    labels = _read_idx(labels_path, _IDX_LABELS_MAGIC)
    if images.shape[1:] != (28, 28):
        raise DataError(f"{images_path} holds images of shape {images.shape[1:]}, expected (28, 28); the file is corrupt")
    if labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{labels_path} has {labels.shape[0]} labels but {images_path} has {images.shape[0]} images; "
            f"the files do not belong together"
        )
    if labels.size and labels.max() > 9:
        raise DataError(f"{labels_path} has labels above 9; the file is corrupt")
    return images, labels.astype(np.int64)


class IdxSource(FileSource):
    """MNIST-style IDX files in ``<root>/<folder>/raw``."""

    folder: str
    base_url: str
    md5s: Dict[str, str]
    class_names: List[str]

    def static_shape(self, cfg):
        return (1, 28, 28), 10

    def files(self, root: Path) -> List[FileSpec]:
        return _idx_specs(self.folder)(root)

    def download(self, root: Path) -> None:
        for spec in self.files(root):
            if spec.found() is None:
                gz = spec.candidates[1]
                _download(self.base_url + gz.name, gz, self.md5s.get(gz.name))

    def read(self, root: Path) -> Raw:
        tr_img, tr_lab, te_img, te_lab = self.files(root)
        x_train, y_train = _load_idx_pair(tr_img, tr_lab)
        x_test, y_test = _load_idx_pair(te_img, te_lab)
        pipeline = Pipeline((28, 28), [{"op": "divide", "by": 255.0}, {"op": "reshape", "shape": [1, 28, 28]}])
        return Raw(x_train, y_train, pipeline, x_test=x_test, y_test=y_test, num_classes=10,
                   class_names=list(self.class_names), label=self.name)


# Checksums as published with the files (the same torchvision verifies).
_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
_FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}


@register_source
class Mnist(IdxSource):
    name = "mnist"
    description = "MNIST handwritten digits (60000 train / 10000 test), torchvision layout <root>/MNIST/raw"
    folder, base_url, md5s, class_names = "MNIST", "https://ossci-datasets.s3.amazonaws.com/mnist/", _MNIST_MD5, DIGIT_NAMES


@register_source
class FashionMnist(IdxSource):
    name = "fashion_mnist"
    description = "Fashion-MNIST (60000 train / 10000 test), torchvision layout <root>/FashionMNIST/raw"
    folder, base_url, md5s = "FashionMNIST", "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", _FASHION_MNIST_MD5
    class_names = FASHION_NAMES


# --------------------------------------------------------------------------------------------------

_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")
_CIFAR_TEST = "test_batch"
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CIFAR_TGZ_MD5 = "c58f30108f718f92721af3b95e74349a"
_CIFAR_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}

_SAFE_GLOBALS: Optional[Dict[Tuple[str, str], Any]] = None


def _safe_globals() -> Dict[Tuple[str, str], Any]:
    """The only globals a CIFAR batch pickle may reference: plain builtins, ``_codecs.encode`` (how
    protocol-2 pickles spell bytes) and NumPy's array / dtype / scalar reconstruction."""
    global _SAFE_GLOBALS
    if _SAFE_GLOBALS is None:
        import _codecs

        try:
            from numpy._core import multiarray as _multiarray, numeric as _numeric
        except ImportError:  # numpy < 2
            from numpy.core import multiarray as _multiarray, numeric as _numeric  # type: ignore[no-redef]
        allowed: Dict[Tuple[str, str], Any] = {}
        for module in ("builtins", "__builtin__"):
            for builtin in (dict, list, bytes, str, int):
                allowed[(module, builtin.__name__)] = builtin
        allowed[("_codecs", "encode")] = _codecs.encode
        allowed[("numpy", "ndarray")] = np.ndarray
        allowed[("numpy", "dtype")] = np.dtype
        for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            allowed[(module, "_reconstruct")] = _multiarray._reconstruct
            allowed[(module, "scalar")] = _multiarray.scalar
        for module in ("numpy.core.numeric", "numpy._core.numeric"):
            allowed[(module, "_frombuffer")] = _numeric._frombuffer
        _SAFE_GLOBALS = allowed
    return _SAFE_GLOBALS


class _ForbiddenGlobal(pickle.UnpicklingError):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        obj = _safe_globals().get((module, name))
        if obj is None:
            raise _ForbiddenGlobal(f"{module}.{name}")
        return obj


def _get(d: Mapping[Any, Any], key: str) -> Any:
    if key in d:
        return d[key]
    return d.get(key.encode("ascii"))


def _load_cifar_batch(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    fix = "delete it and download the data set again"
    try:
        with open(path, "rb") as fh:
            batch = _RestrictedUnpickler(fh, encoding="latin1").load()
    except _ForbiddenGlobal as exc:
        raise DataError(
            f"refusing to unpickle {path}: it references the forbidden global '{exc}' "
            f"(a CIFAR-10 batch holds only arrays, lists and strings); {fix}"
        ) from None
    except Exception as exc:  # any unpickling failure means a corrupt file
        reason = str(exc).replace("\n", " ") or type(exc).__name__
        raise DataError(f"{path} is not a readable CIFAR-10 batch ({reason}); {fix}") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path} does not hold a CIFAR-10 batch dict; {fix}")
    data, labels = _get(batch, "data"), _get(batch, "labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise DataError(f"{path} has no uint8 'data' array of shape (N, 3072) (found {shape}); {fix}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{path} has non-integer 'labels'; {fix}") from None
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path} has {labels.size} labels for {data.shape[0]} images; {fix}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path} has labels outside 0..9; {fix}")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_specs(root: Path) -> List[FileSpec]:
    folder = root / _CIFAR_DIR
    return [FileSpec((folder / name,)) for name in (*_CIFAR_TRAIN, _CIFAR_TEST)]


@register_source
class Cifar10(FileSource):
    name = "cifar10"
    description = "CIFAR-10 colour images (50000 train / 10000 test), torchvision layout <root>/cifar-10-batches-py"

    def static_shape(self, cfg):
        return (3, 32, 32), 10

    def files(self, root: Path) -> List[FileSpec]:
        return _cifar_specs(root)

    def download(self, root: Path) -> None:
        _download_cifar10(root)

    def read(self, root: Path) -> Raw:
        folder = root / _CIFAR_DIR
        train = [_load_cifar_batch(folder / name) for name in _CIFAR_TRAIN]
        x_test, y_test = _load_cifar_batch(folder / _CIFAR_TEST)
        x_train, y_train = np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])
        pipeline = Pipeline((3, 32, 32), [{"op": "divide", "by": 255.0}])
        return Raw(x_train, y_train, pipeline, x_test=x_test, y_test=y_test, num_classes=10,
                   class_names=list(CIFAR10_NAMES), label="cifar10")


def _download_cifar10(root: Path) -> None:
    archive = root / "cifar-10-python.tar.gz"
    if not (archive.is_file() and _md5(archive) == _CIFAR_TGZ_MD5):
        _download(_CIFAR_URL, archive, _CIFAR_TGZ_MD5)
    _extract_cifar(archive, root)
    for name, md5 in _CIFAR_MD5.items():
        path = root / _CIFAR_DIR / name
        if _md5(path) != md5:
            raise DataError(f"{path} failed its md5 check after extraction; delete {root / _CIFAR_DIR} and retry")
    archive.unlink(missing_ok=True)


def _extract_cifar(archive: Path, root: Path) -> None:
    """Extract only regular files and folders under ``cifar-10-batches-py/``; no links, no absolute
    paths, no ``..``."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = []
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if (
                    member.name.startswith(("/", "\\"))
                    or not parts
                    or parts[0] != _CIFAR_DIR
                    or ".." in parts
                    or not (member.isfile() or member.isdir())
                ):
                    log.warning("skipping unexpected archive member %r in %s", member.name, archive)
                    continue
                members.append(member)
            if hasattr(tarfile, "data_filter"):
                tar.extractall(root, members=members, filter="data")
            else:  # pragma: no cover - Python without extraction filters
                tar.extractall(root, members=members)
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise DataError(f"cannot extract {archive} ({exc}); delete it and retry the download") from exc
