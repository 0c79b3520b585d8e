"""vae_fast.data: digits, MNIST IDX files (gz or raw, download when missing: tested on file:// URLs),
.npy arrays, and a clear DataError for each kind of bad file."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from vae_fast.data import DataError, dequantize_levels, load_dataset, read_idx

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def _idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_mnist(folder: Path, split: str, n: int, *, compress: bool, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    prefix = {"train": "train", "test": "t10k"}[split]
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        data = _idx_bytes(array)
        if compress:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)


def test_digits_split_is_seeded_and_in_unit_range():
    a, b = load_dataset("digits", seed=3), load_dataset("digits", seed=3)
    assert a.train_x.shape == (1438, 64) and a.test_x.shape == (359, 64)
    assert a.image_shape == (8, 8) and a.input_dim == 64
    assert float(a.train_x.min()) >= 0 and float(a.train_x.max()) == 1.0
    assert torch.equal(a.test_x, b.test_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(load_dataset("digits", seed=4).test_x, a.test_x)


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_test_files_only_give_an_80_20_split(tmp_path, compress):
    _write_mnist(tmp_path, "test", 50, compress=compress)
    data = load_dataset("mnist", data_dir=tmp_path, download_url=None)
    assert data.train_x.shape == (40, 784) and data.test_x.shape == (10, 784)
    assert data.image_shape == (28, 28) and data.train_y.dtype == torch.int64
    raw = read_idx(tmp_path / ("t10k-images-idx3-ubyte" + (".gz" if compress else "")))
    assert raw.shape == (50, 28, 28)
    assert float(data.train_x.max()) <= 1.0


def test_mnist_train_and_test_files_give_the_standard_split(tmp_path):
    _write_mnist(tmp_path, "train", 30, compress=True)
    _write_mnist(tmp_path, "test", 12, compress=False, seed=1)
    data = load_dataset("mnist", data_dir=tmp_path, download_url=None)
    assert len(data.train_x) == 30 and len(data.test_x) == 12


def test_missing_mnist_files_are_downloaded(tmp_path):
    mirror = tmp_path / "mirror"
    _write_mnist(mirror, "test", 20, compress=True)
    target = tmp_path / "data"
    data = load_dataset("mnist", data_dir=target, download_url=mirror.as_uri() + "/")
    assert len(data.train_x) + len(data.test_x) == 20
    assert (target / "t10k-images-idx3-ubyte.gz").exists()
    assert not list(target.glob("*.part"))


def test_failed_download_says_what_to_do(tmp_path):
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte is not in .* downloading it .* failed.*--dataset digits"):
        load_dataset("mnist", data_dir=tmp_path, download_url=(tmp_path / "nowhere").as_uri() + "/")
    assert not list(tmp_path.glob("*.part"))


def test_missing_mnist_without_download(tmp_path):
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\[\.gz\] is not in"):
        load_dataset("mnist", data_dir=tmp_path, download_url=None)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x00\x00\x08\x03" + struct.pack(">III", 5, 28, 28) + bytes(100), "truncated or corrupt"),
        (b"not an idx file at all", "not an IDX file"),
        (b"\x1f\x8b" + b"garbage", "could not be read"),
        (b"\x00\x00\x08\x03\x00", "header cut off"),
    ],
)
def test_corrupt_idx_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as error:
        read_idx(path)
    assert str(path) in str(error.value)


def test_npy_uint8_images_and_float_rows(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "images.npy", rng.integers(0, 256, size=(30, 6, 5), dtype=np.uint8))
    images = load_dataset("npy", data_file=tmp_path / "images.npy")
    assert images.image_shape == (6, 5) and images.input_dim == 30
    assert len(images.train_x) == 24 and images.train_y is None
    np.save(tmp_path / "rows.npy", rng.random((10, 16)))
    rows = load_dataset("npy", data_file=tmp_path / "rows.npy")
    assert rows.image_shape == (4, 4) and rows.train_x.dtype == torch.float32


@pytest.mark.parametrize(
    "array, message",
    [
        (np.full((10, 4), np.nan), "must be finite"),
        (np.zeros(10), r"shape \[N, D\] or \[N, H, W\]"),
        (np.zeros((10, 4), dtype=np.int64), "is not uint8 or floating point"),
    ],
)
def test_bad_npy_arrays(tmp_path, array, message):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(DataError, match=message):
        load_dataset("npy", data_file=tmp_path / "bad.npy")


def test_unreadable_or_missing_npy(tmp_path):
    (tmp_path / "text.npy").write_text("hello")
    with pytest.raises(DataError, match="is not a readable .npy array"):
        load_dataset("npy", data_file=tmp_path / "text.npy")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("npy", data_file=tmp_path / "missing.npy")


def test_missing_arguments_and_unknown_names():
    with pytest.raises(DataError, match="needs --data-dir"):
        load_dataset("mnist")
    with pytest.raises(DataError, match="needs --data-file"):
        load_dataset("npy")
    with pytest.raises(DataError, match="unknown dataset 'cifar'"):
        load_dataset("cifar")


@pytest.mark.skipif(not SHARED_MNIST.exists(), reason="the shared MNIST test files are not in this checkout's neighbourhood")
def test_real_mnist_test_set():
    data = load_dataset("mnist", data_dir=SHARED_MNIST, download_url=None)
    assert data.train_x.shape == (8000, 784) and data.test_x.shape == (2000, 784)
    assert set(data.test_y.unique().tolist()) == set(range(10))


# --- The held-out split against the source data and its labels (issue 13). Rows are matched to
# the source as (pixels, label) pairs, so a split that dropped, repeated or invented a row, or
# moved labels out of step with their images, fails.


def _pairs(x: torch.Tensor, y: torch.Tensor | None) -> list[tuple[bytes, int | None]]:
    labels = [None] * len(x) if y is None else y.tolist()
    return [(row.numpy().tobytes(), label) for row, label in zip(x, labels)]


def _assert_split_partitions(data, source_x: torch.Tensor, source_y: torch.Tensor | None, test_size: int) -> None:
    from collections import Counter

    assert len(data.test_x) == test_size and len(data.train_x) == len(source_x) - test_size
    train, test, source = _pairs(data.train_x, data.train_y), _pairs(data.test_x, data.test_y), _pairs(source_x, source_y)
    # Union = the source (as multisets: covers it, nothing twice, labels still with their images).
    assert Counter(train) + Counter(test) == Counter(source)
    # Disjoint: no source row is in both parts more often than the source holds it.
    source_count = Counter(source)
    assert all(Counter(train)[key] + count <= source_count[key] for key, count in Counter(test).items())


def _assert_label_proportions_match(data, source_y: torch.Tensor) -> None:
    """A uniformly random hold-out of n of N rows: each class's held-out count is hypergeometric
    with mean n K / N and variance n (K/N)(1 - K/N)(N - n)/(N - 1); allow 4.5 standard deviations
    (about 1 in 150,000 per class for a correct split). A split by position in a sorted or
    grouped file would be far outside."""
    N, n = len(source_y), len(data.test_y)
    for label, K in zip(*torch.unique(source_y, return_counts=True)):
        K = int(K)
        mean = n * K / N
        sd = (n * (K / N) * (1 - K / N) * (N - n) / (N - 1)) ** 0.5
        held_out = int((data.test_y == label).sum())
        assert abs(held_out - mean) <= 4.5 * sd, f"label {int(label)}: {held_out} held out, expected {mean:.0f} +- {sd:.1f}"
        assert held_out + int((data.train_y == label).sum()) == K


@pytest.mark.parametrize("seed", [0, 7])
def test_digits_split_partitions_the_labelled_set(seed):
    from sklearn.datasets import load_digits

    digits = load_digits()
    source_x = torch.from_numpy(digits.data.astype(np.float32) / 16.0)
    source_y = torch.from_numpy(digits.target.astype(np.int64))
    data = load_dataset("digits", seed=seed)
    _assert_split_partitions(data, source_x, source_y, test_size=len(source_x) // 5)
    _assert_label_proportions_match(data, source_y)
    again = load_dataset("digits", seed=seed)
    for name in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(again, name), getattr(data, name)), name
    other = load_dataset("digits", seed=seed + 1)
    assert _pairs(other.test_x, other.test_y) != _pairs(data.test_x, data.test_y)


@pytest.mark.skipif(not SHARED_MNIST.exists(), reason="the shared MNIST test files are not in this checkout's neighbourhood")
def test_real_mnist_split_partitions_the_labelled_test_set():
    images = read_idx(SHARED_MNIST / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(SHARED_MNIST / "t10k-labels-idx1-ubyte.gz")
    source_x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0)
    source_y = torch.from_numpy(labels.astype(np.int64))
    data = load_dataset("mnist", data_dir=SHARED_MNIST, download_url=None, seed=3)
    _assert_split_partitions(data, source_x, source_y, test_size=2000)
    _assert_label_proportions_match(data, source_y)
    again = load_dataset("mnist", data_dir=SHARED_MNIST, download_url=None, seed=3)
    assert torch.equal(again.test_x, data.test_x) and torch.equal(again.test_y, data.test_y)
    assert not torch.equal(load_dataset("mnist", data_dir=SHARED_MNIST, download_url=None, seed=4).test_y, data.test_y)


def test_npy_split_partitions_the_rows(tmp_path):
    # Every row distinct (row i holds i in base 256), so the partition is checked row by row.
    n = 53
    rows = np.stack([np.arange(n) // 256, np.arange(n) % 256, np.zeros(n), np.full(n, 255)], axis=1).astype(np.uint8)
    np.save(tmp_path / "rows.npy", rows)
    data = load_dataset("npy", data_file=tmp_path / "rows.npy", seed=2)
    _assert_split_partitions(data, torch.from_numpy(rows.astype(np.float32) / 255.0), None, test_size=n // 5)
    assert len(set(_pairs(data.test_x, None))) == n // 5
    again = load_dataset("npy", data_file=tmp_path / "rows.npy", seed=2)
    assert torch.equal(again.test_x, data.test_x) and torch.equal(again.train_x, data.train_x)


# --- Continuous data (issue 10): scikit-learn's tabular sets standardized with the training
# split's statistics, real-valued npy rows, and uniform dequantization of grey levels.

TABULAR = {"wine": (178, 13, 3), "breast-cancer": (569, 30, 2), "diabetes": (442, 10, None)}


def _sklearn_source(name):
    import sklearn.datasets

    loader = {"wine": "load_wine", "breast-cancer": "load_breast_cancer", "diabetes": "load_diabetes"}[name]
    bunch = getattr(sklearn.datasets, loader)()
    return np.asarray(bunch.data, dtype=np.float64), bunch.target


@pytest.mark.parametrize("name", list(TABULAR))
def test_tabular_sets_are_standardized_with_the_training_statistics(name):
    n, d, classes = TABULAR[name]
    data = load_dataset(name, seed=1)
    assert data.continuous and not data.is_image and data.image_shape == (d,)
    assert data.train_x.dtype == torch.float32 and len(data.train_x) + len(data.test_x) == n and len(data.test_x) == n // 5
    assert len(data.feature_names) == d
    # Training split: mean 0, standard deviation 1 per feature.
    np.testing.assert_allclose(data.train_x.double().mean(0).numpy(), 0, atol=1e-6)
    np.testing.assert_allclose(data.train_x.double().std(0, unbiased=False).numpy(), 1, atol=1e-5)
    # The held-out split is scaled by the training numbers, not its own: its mean is not 0.
    assert data.test_x.double().mean(0).abs().max() > 0.05
    # Recomputed from the raw source in numpy: find each split's rows by matching the rows'
    # standardization with the training rows' statistics.
    raw, target = _sklearn_source(name)
    source = torch.from_numpy(raw)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    train_raw, test_raw = raw[order[n // 5:].numpy()], raw[order[: n // 5].numpy()]
    mean, std = train_raw.mean(0), train_raw.std(0)
    np.testing.assert_allclose(data.test_x.numpy(), (test_raw - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(data.train_x.numpy(), (train_raw - mean) / std, rtol=1e-5, atol=1e-5)
    # Splits partition the source rows (each held-out row is a source row, none is in both).
    restored = torch.cat([data.train_x, data.test_x]).double() * torch.from_numpy(std) + torch.from_numpy(mean)
    assert torch.allclose(restored[torch.argsort(torch.cat([order[n // 5:], order[: n // 5]]))], source, rtol=1e-5, atol=1e-4)
    if classes is None:
        assert data.train_y is None and data.test_y is None
    else:
        assert torch.equal(data.test_y, torch.from_numpy(target[order[: n // 5].numpy()]).long())
        assert set(torch.cat([data.train_y, data.test_y]).tolist()) == set(range(classes))


def test_tabular_split_depends_on_the_seed():
    a, b = load_dataset("wine", seed=0), load_dataset("wine", seed=0)
    assert torch.equal(a.test_x, b.test_x) and torch.equal(a.train_y, b.train_y)
    assert not torch.equal(load_dataset("wine", seed=1).test_y, a.test_y)


def test_npy_real_rows_are_continuous_tabular_data(tmp_path):
    rows = np.random.default_rng(0).normal(3.0, 5.0, size=(20, 7))
    np.save(tmp_path / "real.npy", rows)
    data = load_dataset("npy", data_file=tmp_path / "real.npy")
    assert data.continuous and data.image_shape == (7,) and data.levels is None
    together = torch.cat([data.train_x, data.test_x])
    assert sorted(map(tuple, together.tolist())) == sorted(map(tuple, rows.astype(np.float32).tolist()))
    # Rows in [0, 1] stay what they were: image-like, not continuous.
    np.save(tmp_path / "unit.npy", np.random.default_rng(0).random((20, 9)))
    unit = load_dataset("npy", data_file=tmp_path / "unit.npy")
    assert not unit.continuous and unit.image_shape == (3, 3)


@pytest.mark.parametrize(
    "array, message",
    [
        (np.array([[0.5, np.inf], [1.0, 2.0]] * 5), r"must be finite \(it holds NaN or infinity\)"),
        (np.array([[0.5, -np.inf], [-1.0, 2.0]] * 5), "must be finite"),
        (np.full((10, 3), 1e300), "overflow float32"),
        (np.full((10, 2, 2), 3.0), r"float images must lie in \[0, 1\]"),
    ],
)
def test_bad_real_valued_npy_arrays(tmp_path, array, message):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(DataError, match=message):
        load_dataset("npy", data_file=tmp_path / "bad.npy")


@pytest.mark.parametrize("levels", [2, 17, 256])
def test_dequantization_stays_in_each_levels_bin(levels):
    k = torch.arange(levels, dtype=torch.float64).repeat(400)
    x = (k / (levels - 1)).float()
    out = dequantize_levels(x, levels, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32
    # Exactly inside [k / levels, (k + 1) / levels), checked in float64 on the float32 values.
    assert bool((out.double() >= k / levels).all()) and bool((out.double() < (k + 1) / levels).all())
    # And spread over the bin like U[0, 1): per level, offsets' mean ~ 1/2 and range close to [0, 1).
    offset = (out.double() * levels - k).reshape(400, levels)
    assert offset.mean(0).sub(0.5).abs().max() < 0.1
    assert offset.min() < 0.05 and offset.max() > 0.95


@pytest.mark.parametrize("levels", [17, 256])
@pytest.mark.parametrize("u", [0.0, 1 - 2**-53])
def test_dequantization_at_the_bins_edges(monkeypatch, levels, u):
    """u at either end of [0, 1): in float32, (k + u) / levels rounds onto the next bin's lower edge
    ((k + 1) / levels, for k = levels - 1 the value 1.0) and must be moved back inside."""
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.full(shape, u, dtype=torch.float64))
    k = torch.arange(levels, dtype=torch.float64)
    out = dequantize_levels((k / (levels - 1)).float(), levels)
    assert bool((out.double() >= k / levels).all()) and bool((out.double() < (k + 1) / levels).all())
    if u:
        assert float(out[-1]) < 1.0 and float(out[-1]) == float(torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)))


def test_dequantization_levels_are_checked():
    for levels in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match="levels must be an integer >= 2"):
            dequantize_levels(torch.zeros(3), levels)


def test_dequantized_data_sets():
    data = load_dataset("digits", seed=2, dequantize=True)
    plain = load_dataset("digits", seed=2)
    assert data.dequantized and data.levels == 17 and not plain.dequantized
    # The training split keeps its grey levels (training dequantizes each batch afresh) ...
    assert torch.equal(data.train_x, plain.train_x)
    # ... the held-out one is dequantized once, into each pixel's bin, the same for the same seed.
    k = torch.round(plain.test_x.double() * 16)
    assert bool((data.test_x.double() >= k / 17).all()) and bool((data.test_x.double() < (k + 1) / 17).all())
    assert torch.equal(load_dataset("digits", seed=2, dequantize=True).test_x, data.test_x)
    assert not torch.equal(data.test_x, plain.test_x)


def test_dequantizing_real_valued_data_is_refused(tmp_path):
    with pytest.raises(DataError, match="--dequantize: data set wine holds real values"):
        load_dataset("wine", dequantize=True)
    np.save(tmp_path / "rows.npy", np.random.default_rng(0).random((10, 4)))
    with pytest.raises(DataError, match="holds real values"):
        load_dataset("npy", data_file=tmp_path / "rows.npy", dequantize=True)


@pytest.mark.skipif(not SHARED_MNIST.exists(), reason="the shared MNIST test files are not in this checkout's neighbourhood")
def test_real_mnist_grey_levels_dequantized():
    data = load_dataset("mnist", data_dir=SHARED_MNIST, download_url=None, dequantize=True)
    assert data.levels == 256 and data.image_shape == (28, 28) and data.is_image
    images = read_idx(SHARED_MNIST / "t10k-images-idx3-ubyte.gz").reshape(10000, -1).astype(np.float64)
    order = torch.randperm(10000, generator=torch.Generator().manual_seed(0))
    pixels = torch.from_numpy(images[order[:2000].numpy()])
    assert bool((data.test_x.double() >= pixels / 256).all()) and bool((data.test_x.double() < (pixels + 1) / 256).all())
