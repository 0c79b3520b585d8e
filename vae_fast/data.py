"""Data sets for `vae-fast train` and `eval`, loaded into memory as float32 [N, D] (these sets are small).

Images, values in [0, 1] (for any likelihood):
- "digits": scikit-learn's bundled 8x8 digits (offline default), pixel / 16 (17 grey levels).
- "mnist": the IDX files in a folder (gzip or raw, downloaded when missing and the network allows),
  pixel / 255 (256 grey levels). A Bernoulli decoder reads these grey levels as soft targets; a
  Gaussian or Laplace decoder models them as continuous values.
- "npy": an array file, [N, H, W] images or [N, D] rows, uint8 (pixel / 255) or floats in [0, 1].

Continuous real data (`Dataset.continuous`: any real value; Gaussian or Laplace decoders):
- "wine" (178 x 13), "breast-cancer" (569 x 30), "diabetes" (442 x 10): scikit-learn's bundled
  tabular sets, each feature standardized with the mean and standard deviation of the TRAINING
  split (the held-out split is scaled by the same numbers, so its mean is near 0 but not 0: the
  model never sees held-out statistics). Class labels for wine and breast-cancer; diabetes has a
  real-valued regression target, not a label, so none.
- "npy" with a float array [N, D] holding any value outside [0, 1]: real-valued rows, tabular.

Counts (cells x genes, values >= 0; the count likelihoods poisson, nb, zinb; `vae_fast.count_data`):
- "counts": the matrix in `data_file`, a .h5ad (AnnData: X or the layer `layer`), .npy or .npz
  (dense or scipy sparse); 20% of the cells held out. Both splits stay sparse on the host
  (`count_data.CountMatrix`) and are densified batch by batch.
- "digits-counts": scikit-learn's bundled 8x8 digits as raw pixel counts 0..16 (1,797 x 64; the
  real count set that ships with a dependency and runs offline).

Dequantization (`dequantize=True`, data quantized to `levels` grey levels only): a grey level k
becomes (k + u) / levels with u ~ U[0, 1), a point of k's bin [k / levels, (k + 1) / levels), so
that a continuous density is fitted to data that has one (on the raw levels a learned scale can
shrink towards 0 on the many pixels that are always 0, and the density, the loss with it, diverges).
The held-out split is dequantized once at load time, with a generator seeded from `seed`, so that
every epoch and `vae-fast eval` score the same points. The training split keeps its grey levels
and training draws fresh noise for every batch (`dequantize_levels`): a fixed draw would be a set of
continuous points that a decoder can learn, noise included, which dequantization is meant to
prevent (Theis et al. 2016, "A note on the evaluation of generative models").
"""

from __future__ import annotations

import gzip
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["DataError", "Dataset", "load_dataset", "read_idx", "dequantize_levels", "DATASETS", "TABULAR_DATASETS",
           "COUNT_DATASETS", "MNIST_URL"]

# scikit-learn's bundled tabular sets: name -> loader name in sklearn.datasets.
_TABULAR_LOADERS = {"wine": "load_wine", "breast-cancer": "load_breast_cancer", "diabetes": "load_diabetes"}
TABULAR_DATASETS = tuple(_TABULAR_LOADERS)
COUNT_DATASETS = ("counts", "digits-counts")
DATASETS = ("digits", "mnist", "npy", *TABULAR_DATASETS, *COUNT_DATASETS)
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
    """A train/held-out split.

    x: float32 [N, D], in [0, 1] unless `continuous` or counts; y: int64 [N] labels or None. A count
        set's train_x is a `count_data.CountMatrix` (sparse on the host, dense batches).
    image_shape: (H, W) for grey images (a square D of an npy row array counts, as (1, D) for a
        strip); (D,) for tabular data, which is not an image (see `is_image`).
    continuous: the values are real measurements that may lie anywhere (standardized tabular
        sets, real-valued arrays): a Gaussian or Laplace decoder's data, not a Bernoulli one's.
    levels: the number of grey levels the values were quantized to (x = k / (levels - 1)), or None
        for data that is not quantized; what `dequantize_levels` needs.
    dequantized: test_x is dequantized (once, seeded) and train_x holds the grey levels, which
        training dequantizes batch by batch with `dequantize_levels`.
    feature_names: one name per feature, for plots of tabular data; None for images.
    median_library_size: the median over training samples of their total (a cell's library size,
        at which a count model generates); None where it is not positive.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor | None
    test_x: torch.Tensor
    test_y: torch.Tensor | None
    image_shape: tuple[int, ...]
    continuous: bool = False
    levels: int | None = None
    dequantized: bool = False
    feature_names: tuple[str, ...] | None = None
    median_library_size: float | None = None

    @property
    def input_dim(self) -> int:
        return self.train_x.shape[1]

    @property
    def is_image(self) -> bool:
        """Whether samples are 2-D images (what a convolutional model takes)."""
        return len(self.image_shape) >= 2


def dequantize_levels(x: torch.Tensor, levels: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform dequantization of grey levels x = k / (levels - 1) (any shape, float):
    (k + u) / levels with u ~ U[0, 1) drawn from `generator` (torch's global one by default).

    Every result lies in its level's bin [k / levels, (k + 1) / levels), exactly: the value is
    formed in float64 and, where rounding to x's dtype carried it onto a bin edge it does not
    belong to, moved one step back inside (the bins are far wider than a float32 step).
    Raises ValueError for levels < 2.
    """
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"dequantize_levels: levels must be an integer >= 2, got {levels!r}")
    k = torch.round(x.double() * (levels - 1))
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float64)
    y = ((k + u) / levels).to(x.dtype)
    upper, lower = (k + 1) / levels, k / levels
    y = torch.where(y.double() >= upper, torch.nextafter(y, torch.zeros_like(y)), y)
    return torch.where(y.double() < lower, torch.nextafter(y, torch.ones_like(y)), y)


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
    data = _split("digits", x, y, (8, 8), test_size=len(x) // 5, seed=seed)
    data.levels = 17
    return data


def _load_tabular(name: str, seed: int) -> Dataset:
    """A scikit-learn tabular set, 20% held out, standardized with the training split's statistics."""
    import sklearn.datasets

    bunch = getattr(sklearn.datasets, _TABULAR_LOADERS[name])()
    x = torch.from_numpy(np.asarray(bunch.data, dtype=np.float64))
    # Class labels only: diabetes's target is a real-valued disease measure, not a label.
    y = torch.from_numpy(bunch.target.astype(np.int64)) if np.issubdtype(bunch.target.dtype, np.integer) else None
    data = _split(name, x, y, (x.shape[1],), test_size=len(x) // 5, seed=seed)
    data.train_x, data.test_x = _standardize(data.train_x, data.test_x)
    data.continuous = True
    data.feature_names = tuple(str(f) for f in bunch.feature_names)
    return data


def _standardize(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(train - mean) / std and (test - mean) / std with the training split's mean and std (in
    float64, then float32). A feature constant on the training split is only centred."""
    mean, std = train.mean(0), train.std(0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return ((train - mean) / std).float(), ((test - mean) / std).float()


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
        return Dataset("mnist", train_x, train_y, test_x, test_y, image_shape, levels=256)
    data = _split("mnist", test_x, test_y, image_shape, test_size=len(test_x) // 5, seed=seed)
    data.levels = 256
    return data


def _load_npy(path: Path, seed: int) -> Dataset:
    """An array [N, D] or [N, H, W], 20% held out: uint8 (0..255, 256 grey levels), floats in
    [0, 1], or (rows [N, D] only) finite floats anywhere, which are continuous tabular data."""
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"data file {path} does not exist") from None
    except (OSError, ValueError) as error:
        raise DataError(f"data file {path} is not a readable .npy array: {error}") from None
    if not isinstance(array, np.ndarray) or array.ndim not in (2, 3) or len(array) < 2:
        raise DataError(f"data file {path} must hold an array of shape [N, D] or [N, H, W], got {getattr(array, 'shape', type(array).__name__)}")
    image_shape = tuple(array.shape[1:]) if array.ndim == 3 else _square_or_flat(array.shape[1])
    levels, continuous = None, False
    if array.dtype == np.uint8:
        x, levels = array.astype(np.float32) / 255.0, 256
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise DataError(f"data file {path}: float values must be finite (it holds NaN or infinity)")
        with np.errstate(over="ignore"):  # reported below, as a DataError
            x = array.astype(np.float32)
        if not np.isfinite(x).all():
            raise DataError(f"data file {path}: values overflow float32 (largest magnitude {np.abs(array).max():g})")
        if x.min() < 0 or x.max() > 1:
            if array.ndim == 3:
                raise DataError(f"data file {path}: float images must lie in [0, 1], got values in [{x.min():g}, {x.max():g}]; "
                                "real-valued data goes in rows [N, D]")
            image_shape, continuous = (array.shape[1],), True
    else:
        raise DataError(f"data file {path}: dtype {array.dtype} is not uint8 or floating point")
    x = torch.from_numpy(x.reshape(len(x), -1))
    data = _split(f"npy:{path.name}", x, None, image_shape, test_size=max(1, len(x) // 5), seed=seed)
    data.levels, data.continuous = levels, continuous
    return data


def _count_split(name: str, counts, seed: int, feature_names=None, image_shape=None) -> Dataset:
    """A count set (float32 CSR [N, D], checked) split as `_split` does, 20% held out; both splits
    stay sparse (CountMatrix)."""
    from .count_data import CountMatrix

    cells = counts.shape[0]
    test_size = max(1, cells // 5)
    if not 0 < test_size < cells:
        raise DataError(f"{name}: {cells} cells are too few to hold out {test_size} for testing")
    order = torch.randperm(cells, generator=torch.Generator().manual_seed(seed)).numpy()
    train, test = counts[order[test_size:]], counts[order[:test_size]]
    median = float(np.median(np.asarray(train.sum(1)).ravel()))
    return Dataset(name, CountMatrix(train), None, CountMatrix(test), None,
                   image_shape or (counts.shape[1],), feature_names=feature_names, median_library_size=median)


def _load_counts(path: Path, layer: str | None, seed: int) -> Dataset:
    from .count_data import load_count_file

    counts, genes = load_count_file(path, layer=layer)
    return _count_split(f"counts:{path.name}", counts, seed, feature_names=genes)


def _load_digit_counts(seed: int) -> Dataset:
    from sklearn.datasets import load_digits

    from .count_data import check_counts

    counts = check_counts(load_digits().data, "scikit-learn's digits")
    return _count_split("digits-counts", counts, seed, image_shape=(8, 8))


def _square_or_flat(width: int) -> tuple[int, ...]:
    side = int(round(width**0.5))
    return (side, side) if side * side == width else (1, width)


def load_dataset(name: str, *, data_dir: str | Path | None = None, data_file: str | Path | None = None,
                 seed: int = 0, download_url: str | None = MNIST_URL, dequantize: bool = False,
                 layer: str | None = None) -> Dataset:
    """Load a data set by name (the module docstring describes each).

    Args:
        name: "digits" (1,797 8x8 images bundled with scikit-learn; 20% held out), "mnist" (IDX files
            in `data_dir`; see `_load_mnist`), "npy" (the array in `data_file`; 20% held out), or a
            tabular set, "wine", "breast-cancer" or "diabetes" (20% held out, standardized), or a count
            set, "counts" (the .h5ad / .npy / .npz in `data_file`) or "digits-counts".
        seed: fixes the held-out split where one is drawn, and the held-out dequantization noise.
        download_url: where missing MNIST files are fetched from; None never downloads.
        dequantize: dequantize the held-out split once (seeded) and mark the set `dequantized`, so
            that training dequantizes its batches; quantized data only (digits, mnist, uint8 npy).
        layer: "counts" from a .h5ad: the AnnData layer holding the counts (default X).
    Raises:
        DataError with a one-line message for an unknown name, a missing argument, missing,
        unreadable or malformed files, and dequantize=True for data that is not quantized.
    """
    if name in _TABULAR_LOADERS:
        data = _load_tabular(name, seed)
    elif name == "digits":
        data = _load_digits(seed)
    elif name == "mnist":
        if data_dir is None:
            raise DataError("--dataset mnist needs --data-dir, the folder with the MNIST IDX files")
        data = _load_mnist(Path(data_dir), seed, download_url)
    elif name == "npy":
        if data_file is None:
            raise DataError("--dataset npy needs --data-file, a .npy array of shape [N, D] or [N, H, W]")
        data = _load_npy(Path(data_file), seed)
    elif name == "counts":
        if data_file is None:
            raise DataError("--dataset counts needs --data-file, a .h5ad, .npy or .npz matrix of counts [cells, genes]")
        data = _load_counts(Path(data_file), layer, seed)
    elif name == "digits-counts":
        data = _load_digit_counts(seed)
    else:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if data.median_library_size is None and isinstance(data.train_x, torch.Tensor):
        median = float(data.train_x.sum(1).median())
        data.median_library_size = median if median > 0 else None
    if layer is not None and name != "counts":
        raise DataError(f"--layer {layer!r} names a layer of a .h5ad count file (--dataset counts), not of {name}")
    if dequantize:
        if data.levels is None:
            raise DataError(f"--dequantize: data set {data.name} holds real values, not grey levels; dequantization "
                            "applies to quantized data (digits, mnist, uint8 npy arrays)")
        # Its own stream, apart from the split's permutation (seeded by `seed` too).
        noise = torch.Generator().manual_seed(seed + 0x5EED)
        data.test_x = dequantize_levels(data.test_x, data.levels, generator=noise)
        data.dequantized = True
    return data
