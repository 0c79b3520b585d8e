"""Count data: .h5ad written by the anndata package itself (X dense or CSR, a layer), .npy, .npz
(scipy sparse and numpy archives), the bundled digits' pixel counts, the sparse training split's
batches, and the one-line errors for bad files."""

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse
import torch

from vae_fast.count_data import CountMatrix, load_count_file, synthetic_counts
from vae_fast.data import DataError, load_dataset


def _counts(cells=30, genes=7, seed=0):
    rng = np.random.default_rng(seed)
    counts = rng.poisson(2.0, size=(cells, genes)).astype(np.float32)
    counts[:, 0] += 1  # every cell has a positive library size
    return counts


def _write_h5ad(path, x, layers=None):
    genes = pd.DataFrame(index=[f"g{i}" for i in range(x.shape[1])])
    anndata.AnnData(X=x, var=genes, layers=layers or {}).write_h5ad(path)
    return path


@pytest.mark.parametrize("sparse", [False, True], ids=["dense-X", "csr-X"])
def test_h5ad_counts_and_gene_names_are_read_as_written(tmp_path, sparse):
    counts = _counts()
    x = scipy.sparse.csr_matrix(counts) if sparse else counts
    matrix, genes = load_count_file(_write_h5ad(tmp_path / "cells.h5ad", x))
    assert scipy.sparse.isspmatrix_csr(matrix)
    np.testing.assert_array_equal(matrix.toarray(), counts)
    assert genes == tuple(f"g{i}" for i in range(counts.shape[1]))


def test_h5ad_layer_is_read_instead_of_x(tmp_path):
    counts = _counts()
    normalized = np.log1p(counts)  # what X often holds: not the counts
    path = _write_h5ad(tmp_path / "cells.h5ad", normalized, layers={"counts": scipy.sparse.csr_matrix(counts)})
    matrix, _ = load_count_file(path, layer="counts")
    np.testing.assert_array_equal(matrix.toarray(), counts)
    with pytest.raises(DataError, match=r"cells.h5ad has no layer 'raw' \(its layers: counts\)"):
        load_count_file(path, layer="raw")


def test_npy_and_both_kinds_of_npz_are_read(tmp_path):
    counts = _counts()
    np.save(tmp_path / "dense.npy", counts)
    scipy.sparse.save_npz(tmp_path / "sparse.npz", scipy.sparse.csr_matrix(counts))
    np.savez(tmp_path / "archive.npz", counts=counts)
    for name in ("dense.npy", "sparse.npz", "archive.npz"):
        matrix, genes = load_count_file(tmp_path / name)
        np.testing.assert_array_equal(matrix.toarray(), counts, err_msg=name)
        assert genes is None


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.__setitem__((3, 2), -1.0), r"counts must be >= 0; cell 3 holds -1"),
    (lambda c: c.__setitem__((5, 1), np.nan), r"counts must be finite; cell 5 holds NaN"),
    (lambda c: c.__setitem__((6, 4), np.inf), r"counts must be finite; cell 6"),
    (lambda c: c.__setitem__(4, 0.0), r"1 cell\(s\) have no counts \(first: cell 4\)"),
], ids=["negative", "nan", "inf", "empty-cell"])
def test_bad_counts_are_one_line_errors_naming_the_file_and_cell(tmp_path, edit, message):
    counts = _counts()
    edit(counts)
    for path in (tmp_path / "bad.npy", tmp_path / "bad.h5ad"):
        np.save(path, counts) if path.suffix == ".npy" else _write_h5ad(path, counts)
        with pytest.raises(DataError, match=message) as error:
            load_count_file(path)
        assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_unreadable_files_are_one_line_errors(tmp_path):
    (tmp_path / "junk.h5ad").write_bytes(b"not hdf5")
    (tmp_path / "cells.csv").write_text("1,2\n")
    np.savez(tmp_path / "two.npz", a=_counts(), b=_counts())
    np.save(tmp_path / "flat.npy", np.ones(5))
    cases = {
        "junk.h5ad": "is not a readable .h5ad",
        "cells.csv": "count files are .h5ad, .npy, .npz",
        "two.npz": "it holds 2 arrays",
        "flat.npy": "must be a matrix",
        "missing.npy": "does not exist",
    }
    for name, message in cases.items():
        with pytest.raises(DataError, match=message):
            load_count_file(tmp_path / name)
    np.save(tmp_path / "ok.npy", _counts())
    with pytest.raises(DataError, match="only .h5ad files have layers"):
        load_count_file(tmp_path / "ok.npy", layer="counts")


def test_both_splits_stay_sparse_and_their_batches_are_their_rows(tmp_path):
    counts = _counts(cells=50)
    np.save(tmp_path / "cells.npy", counts)
    data = load_dataset("counts", data_file=tmp_path / "cells.npy", seed=3)
    assert isinstance(data.train_x, CountMatrix) and len(data.train_x) == 40
    assert isinstance(data.test_x, CountMatrix) and data.test_x.shape == (10, 7)
    # Every cell lands in exactly one split, unchanged.
    together = np.concatenate([data.train_x.to_dense().numpy(), data.test_x.to_dense().numpy()])
    assert sorted(map(tuple, together)) == sorted(map(tuple, counts))
    rows = torch.tensor([7, 0, 39])
    dense = data.train_x.to_dense()
    assert torch.equal(data.train_x.index_select(0, rows), dense[rows])
    assert torch.equal(torch.cat(list(data.train_x.split(16))), dense)
    assert data.median_library_size == float(np.median(dense.sum(1).numpy()))
    held_out = data.test_x.to_dense()
    assert torch.equal(data.test_x[2:7], held_out[2:7]) and torch.equal(data.test_x[:100], held_out)
    assert torch.equal(data.test_x[3], held_out[3]) and torch.equal(data.test_x[-1], held_out[-1])
    with pytest.raises(IndexError, match="row 10 of a CountMatrix of 10 rows"):
        data.test_x[10]
    with pytest.raises(TypeError, match="int or a slice"):
        data.test_x[[0, 1]]


def test_digits_counts_are_the_raw_pixel_counts():
    from sklearn.datasets import load_digits

    data = load_dataset("digits-counts", seed=0)
    values = np.concatenate([data.train_x.to_dense().numpy(), data.test_x.to_dense().numpy()])
    assert values.shape == (1797, 64)
    assert sorted(map(tuple, values)) == sorted(map(tuple, load_digits().data.astype(np.float32)))
    assert values.max() == 16 and np.array_equal(values, np.round(values))


def test_synthetic_counts_follow_their_negative_binomial():
    """The generator's counts have the NB moments of its parameters: mean mu and variance
    mu + mu^2 / theta, pooled over cells as standardized residuals (mean 0, variance 1)."""
    data = synthetic_counts(4000, 20, likelihood="nb", library_size=200.0, seed=2)
    mu = data.log_mu.exp()
    theta = data.log_theta.exp()
    residual = (data.x.double() - mu) / torch.sqrt(mu + mu**2 / theta)
    assert abs(float(residual.mean())) < 0.02
    assert abs(float(residual.var()) - 1) < 0.05
    zinb = synthetic_counts(4000, 20, likelihood="zinb", library_size=200.0, seed=2)
    mu, theta, pi = zinb.log_mu.exp(), zinb.log_theta.exp(), torch.sigmoid(zinb.zi_logits)
    nb_zero = (theta / (theta + mu)) ** theta
    expected_zeros = (pi + (1 - pi) * nb_zero).mean()
    assert abs(float((zinb.x == 0).double().mean() - expected_zeros)) < 0.01
