"""Data sets for `vae-fast train` and `eval`: scikit-learn's bundled 8x8 digits (offline default),
MNIST from its IDX files (gzip or raw, downloaded when missing and the network allows), or an
array file. Everything is loaded into memory as float32 in [0, 1]; these sets are small.
"""

from __future__ import annotations

import gzip
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["DataError", "Dataset", "load_dataset", "read_idx", "DATASETS", "MNIST_URL"]

DATASETS = ("digits", "mnist", "npy")
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# The IDX type byte -> numpy dtype (big-endian, as the format stores multi-byte values).
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataError(ValueError):
    """A data set that is missing, unreadable or not what its loader expects; the message says which."""


@dataclass
class Dataset:
    """A train/held-out split. x: float32 [N, D] in [0, 1]; y: int64 [N] labels or None."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor | None
    test_x: torch.Tensor
    test_y: torch.Tensor | None
    image_shape: tuple[int, ...]

    @property
    def input_dim(self) -> int:
        return self.train_x.shape[1]


def _split(name, x, y, image_shape, test_size: int, seed: int) -> Dataset:
    """A seeded random split: the held-out set is the same for every run with this seed."""
    if not 0 < test_size < len(x):
        raise DataError(f"{name}: {len(x)} samples are too few to hold out {test_size} for testing")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    test, train = order[:test_size], order[test_size:]
    if y is None:
        return Dataset(name, x[train], None, x[test], None, image_shape)
    return Dataset(name, x[train], y[train], x[test], y[test], image_shape)


def _load_digits(seed: int) -> Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.data.astype(np.float32) / 16.0)  # pixel values are 0..16
    y = torch.from_numpy(digits.target.astype(np.int64))
    return _split("digits", x, y, (8, 8), test_size=len(x) // 5, seed=seed)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed or raw (detected from its content).

    Raises DataError naming the file when it is missing, truncated or not IDX.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise DataError(f"data file {path} does not exist") from None
    except (OSError, EOFError) as error:
        raise DataError(f"data file {path} could not be read: {error}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DataError(f"data file {path} is not an IDX file (bad header)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"data file {path} is truncated (header cut off)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"data file {path} has {len(raw)} bytes but its header {shape} implies {expected}: truncated or corrupt")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find(data_dir: Path, stem: str) -> Path | None:
    for candidate in (data_dir / f"{stem}.gz", data_dir / stem):
        if candidate.exists():
            return candidate
    return None


def _download(data_dir: Path, stem: str, base_url: str) -> Path:
    target = data_dir / f"{stem}.gz"
    data_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".gz.part")
    try:
        with urllib.request.urlopen(base_url + target.name, timeout=30) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out)
    except OSError as error:  # URLError, timeouts, refused connections are all OSErrors
        partial.unlink(missing_ok=True)
        raise DataError(
            f"MNIST file {stem} is not in {data_dir} and downloading it from {base_url} failed ({error}); "
            "copy the IDX files there or use --dataset digits"
        ) from None
    partial.replace(target)
    return target


def _read_mnist_pair(data_dir: Path, split: str, base_url: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    paths = []
    for stem in MNIST_FILES[split]:
        path = _find(data_dir, stem)
        if path is None:
            if base_url is None:
                raise DataError(f"MNIST file {stem}[.gz] is not in {data_dir}")
            path = _download(data_dir, stem, base_url)
        paths.append(path)
    images, labels = (read_idx(p) for p in paths)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"MNIST {split} files in {data_dir} disagree: images {images.shape}, labels {labels.shape}")
    x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0)
    return x, torch.from_numpy(labels.astype(np.int64))


def _load_mnist(data_dir: Path, seed: int, base_url: str | None) -> Dataset:
    """Standard train/test files when both are there; with only the 10,000-image test files (as in a
    minimal copy), an 8,000 / 2,000 split of those. Missing test files are downloaded from base_url."""
    test_x, test_y = _read_mnist_pair(data_dir, "test", base_url)
    image_shape = (28, 28)
    if all(_find(data_dir, stem) for stem in MNIST_FILES["train"]):
        train_x, train_y = _read_mnist_pair(data_dir, "train", None)
        return Dataset("mnist", train_x, train_y, test_x, test_y, image_shape)
    return _split("mnist", test_x, test_y, image_shape, test_size=len(test_x) // 5, seed=seed)


def _load_npy(path: Path, seed: int) -> Dataset:
    """An array [N, D] or [N, H, W]: uint8 (0..255) or floats in [0, 1]; 20% held out."""
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"data file {path} does not exist") from None
    except (OSError, ValueError) as error:
        raise DataError(f"data file {path} is not a readable .npy array: {error}") from None
    if not isinstance(array, np.ndarray) or array.ndim not in (2, 3) or len(array) < 2:
        raise DataError(f"data file {path} must hold an array of shape [N, D] or [N, H, W], got {getattr(array, 'shape', type(array).__name__)}")
    image_shape = tuple(array.shape[1:]) if array.ndim == 3 else _square_or_flat(array.shape[1])
    if array.dtype == np.uint8:
        x = array.astype(np.float32) / 255.0
    elif np.issubdtype(array.dtype, np.floating):
        x = array.astype(np.float32)
        if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
            raise DataError(f"data file {path}: float values must be finite and lie in [0, 1] (a Bernoulli decoder's targets)")
    else:
        raise DataError(f"data file {path}: dtype {array.dtype} is not uint8 or floating point")
    x = torch.from_numpy(x.reshape(len(x), -1))
    return _split(f"npy:{path.name}", x, None, image_shape, test_size=max(1, len(x) // 5), seed=seed)


def _square_or_flat(width: int) -> tuple[int, ...]:
    side = int(round(width**0.5))
    return (side, side) if side * side == width else (1, width)


def load_dataset(name: str, *, data_dir: str | Path | None = None, data_file: str | Path | None = None,
                 seed: int = 0, download_url: str | None = MNIST_URL) -> Dataset:
    """Load a data set by name.

    Args:
        name: "digits" (1,797 8x8 images bundled with scikit-learn; 20% held out), "mnist" (IDX files
            in `data_dir`; see `_load_mnist`), or "npy" (the array in `data_file`; 20% held out).
        seed: fixes the held-out split where one is drawn.
        download_url: where missing MNIST files are fetched from; None never downloads.
    Raises:
        DataError with a one-line message for an unknown name, a missing argument, and missing,
        unreadable or malformed files.
    """
    if name == "digits":
        return _load_digits(seed)
    if name == "mnist":
        if data_dir is None:
            raise DataError("--dataset mnist needs --data-dir, the folder with the MNIST IDX files")
        return _load_mnist(Path(data_dir), seed, download_url)
    if name == "npy":
        if data_file is None:
            raise DataError("--dataset npy needs --data-file, a .npy array of shape [N, D] or [N, H, W]")
        return _load_npy(Path(data_file), seed)
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
