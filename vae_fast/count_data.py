"""Count data for the count models (`vae_fast.VAE(likelihood="poisson" | "nb" | "zinb")`): a cells x
genes matrix of non-negative counts, read from a file, taken from a bundled set, or generated.

Files (`load_count_file`):
- `.h5ad` (AnnData, read with h5py): the counts in `X` or in the layer named by `layer`, dense or
  sparse (CSR or CSC, as AnnData writes them); gene names from `var`'s index when present.
- `.npy`: a dense array [N, D]; `.npz`: a scipy sparse matrix (`scipy.sparse.save_npz`) or an
  archive of one array [N, D] (`numpy.savez`).

Counts are floats >= 0 (non-integers are allowed, as torch.distributions allows them with
validate_args off); a negative, NaN or infinite entry, or a cell with no counts at all (its library
size, hence its log mean, is undefined), is an error naming the file and the first such cell.

Both splits are kept sparse on the host (`CountMatrix`, CSR) and densified batch by batch, so a
1M-cell x 20k-gene set costs its non-zeros, not 80 GB (16 GB for its 20% held out).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse
import torch

from .data import DataError

__all__ = ["CountMatrix", "SyntheticCounts", "load_count_file", "synthetic_counts", "write_h5ad", "COUNT_FILE_SUFFIXES"]

COUNT_FILE_SUFFIXES = (".h5ad", ".npy", ".npz")


class CountMatrix:
    """Counts [N, D] as a float32 scipy CSR matrix on the host, read as torch tensors only in batches.

    It answers what training and evaluation ask of their tensors: `len`, `shape`, `to(device)`
    (where the batches go; the matrix stays on the host), `reshape(N, D)` (itself),
    `index_select(0, rows)`, `split(size)` and `[i]` / `[start:stop]` (dense float32 rows on that
    device), `min()` and `max()`.
    """

    def __init__(self, matrix: scipy.sparse.csr_matrix, device: torch.device | str = "cpu"):
        self.matrix = scipy.sparse.csr_matrix(matrix, dtype=np.float32)
        self.device = torch.device(device)

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.matrix.shape)

    def __len__(self) -> int:
        return self.matrix.shape[0]

    def dim(self) -> int:
        return 2

    def to(self, device: torch.device | str) -> "CountMatrix":
        return CountMatrix(self.matrix, device)

    def reshape(self, *shape: int) -> "CountMatrix":
        """Itself, for a shape that names its own [N, D] (a -1 standing for N)."""
        wanted = tuple(shape[0]) if len(shape) == 1 else shape
        if len(wanted) != 2 or wanted[1] != self.matrix.shape[1] or wanted[0] not in (-1, self.matrix.shape[0]):
            raise ValueError(f"CountMatrix of shape {tuple(self.shape)} cannot be reshaped to {wanted}")
        return self

    def _dense(self, rows) -> torch.Tensor:
        return torch.from_numpy(self.matrix[rows].toarray()).to(self.device)

    def index_select(self, dim: int, indices: torch.Tensor) -> torch.Tensor:
        """The rows `indices` (dim must be 0) as a dense float32 tensor [len(indices), D]."""
        if dim != 0:
            raise ValueError(f"CountMatrix.index_select selects rows (dim 0), got dim {dim}")
        return self._dense(indices.cpu().numpy())

    def split(self, size: int):
        """Dense float32 batches of `size` rows (the last may be smaller), in order."""
        return (self._dense(slice(start, start + size)) for start in range(0, len(self), size))

    def __getitem__(self, rows: int | slice) -> torch.Tensor:
        """Row `i` as a dense [D] tensor, or rows `start:stop` as a dense [n, D] one."""
        if isinstance(rows, slice):
            return self._dense(rows)
        if isinstance(rows, int):
            if not -len(self) <= rows < len(self):
                raise IndexError(f"row {rows} of a CountMatrix of {len(self)} rows")
            return self._dense(slice(rows % len(self), rows % len(self) + 1))[0]
        raise TypeError(f"CountMatrix rows are selected by an int or a slice, not {type(rows).__name__}")

    def to_dense(self) -> torch.Tensor:
        return self._dense(slice(None))

    def min(self) -> torch.Tensor:
        return torch.tensor(float(self.matrix.min()))

    def max(self) -> torch.Tensor:
        return torch.tensor(float(self.matrix.max()))


def _read_h5ad_matrix(group_or_dataset, path: Path, where: str):
    """A dense or sparse (CSR/CSC) matrix as AnnData stores it at `where`."""
    import h5py

    if isinstance(group_or_dataset, h5py.Dataset):
        return np.asarray(group_or_dataset[()])
    encoding = group_or_dataset.attrs.get("encoding-type", "")
    encoding = encoding.decode() if isinstance(encoding, bytes) else str(encoding)
    kinds = {"csr_matrix": scipy.sparse.csr_matrix, "csc_matrix": scipy.sparse.csc_matrix}
    if encoding not in kinds or not {"data", "indices", "indptr"} <= set(group_or_dataset):
        raise DataError(f"data file {path}: {where} is neither a dense array nor a CSR/CSC sparse matrix "
                             f"(encoding-type {encoding or 'missing'!r})")
    shape = tuple(int(s) for s in group_or_dataset.attrs["shape"])
    parts = (group_or_dataset["data"][()], group_or_dataset["indices"][()], group_or_dataset["indptr"][()])
    return kinds[encoding](parts, shape=shape)


def _h5ad_gene_names(handle) -> tuple[str, ...] | None:
    var = handle.get("var")
    if var is None:
        return None
    index_key = var.attrs.get("_index", "_index")
    index_key = index_key.decode() if isinstance(index_key, bytes) else str(index_key)
    if index_key not in var:
        return None
    return tuple(v.decode() if isinstance(v, bytes) else str(v) for v in var[index_key][()])


def _read_h5ad(path: Path, layer: str | None):
    try:
        import h5py
    except ImportError:
        raise DataError(f"data file {path}: reading .h5ad needs h5py: pip install 'vae-fast[counts]'") from None
    try:
        with h5py.File(path, "r") as handle:
            if layer is None:
                if "X" not in handle:
                    raise DataError(f"data file {path} has no X matrix; name the layer that holds the counts (--layer)")
                return _read_h5ad_matrix(handle["X"], path, "X"), _h5ad_gene_names(handle)
            layers = handle.get("layers")
            if layers is None or layer not in layers:
                present = ", ".join(layers) if layers is not None and len(layers) else "none"
                raise DataError(f"data file {path} has no layer {layer!r} (its layers: {present})")
            return _read_h5ad_matrix(layers[layer], path, f"layer {layer!r}"), _h5ad_gene_names(handle)
    except OSError as error:
        raise DataError(f"data file {path} is not a readable .h5ad (HDF5) file: {error}") from None


def _read_npz(path: Path):
    try:
        return scipy.sparse.load_npz(path)
    except (ValueError, KeyError, OSError):
        pass  # not a scipy sparse archive: an archive of arrays, then
    try:
        with np.load(path, allow_pickle=False) as archive:
            if len(archive.files) != 1:
                raise DataError(f"data file {path}: a .npz must hold one array [N, D] or a scipy sparse matrix, "
                                     f"it holds {len(archive.files)} arrays ({', '.join(archive.files)})")
            return archive[archive.files[0]]
    except (OSError, ValueError) as error:
        raise DataError(f"data file {path} is not a readable .npz archive: {error}") from None


def _read_npy(path: Path):
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DataError(f"data file {path} is not a readable .npy array: {error}") from None


def check_counts(matrix, source: str) -> scipy.sparse.csr_matrix:
    """`matrix` (dense or sparse, [N, D], N >= 2) as float32 CSR after checking that every entry is
    a finite count >= 0 and every cell has a positive total. Raises DataError naming `source`."""
    if not (scipy.sparse.issparse(matrix) or isinstance(matrix, np.ndarray)) or matrix.ndim != 2 or matrix.shape[0] < 2:
        raise DataError(f"{source}: counts must be a matrix [cells, genes] with at least 2 cells, "
                             f"got shape {getattr(matrix, 'shape', type(matrix).__name__)}")
    if not (np.issubdtype(matrix.dtype, np.number) and not np.issubdtype(matrix.dtype, np.complexfloating)):
        raise DataError(f"{source}: counts must be numbers, got dtype {matrix.dtype}")
    csr = scipy.sparse.csr_matrix(matrix, dtype=np.float64)
    values = csr.data
    if not np.isfinite(values).all():
        raise DataError(f"{source}: counts must be finite; cell {_first_row(csr, ~np.isfinite(values))} holds NaN or infinity")
    if (values < 0).any():
        raise DataError(f"{source}: counts must be >= 0; cell {_first_row(csr, values < 0)} holds {values[values < 0][0]:g}")
    if (values > np.finfo(np.float32).max).any():
        raise DataError(f"{source}: counts overflow float32 (largest {values.max():g})")
    totals = np.asarray(csr.sum(1)).ravel()
    if (totals <= 0).any():
        empty = np.flatnonzero(totals <= 0)
        raise DataError(f"{source}: {len(empty)} cell(s) have no counts (first: cell {empty[0]}); a count model "
                             "needs each cell's library size > 0: drop them first")
    return scipy.sparse.csr_matrix(csr, dtype=np.float32)


def _first_row(csr: scipy.sparse.csr_matrix, bad: np.ndarray) -> int:
    return int(np.searchsorted(csr.indptr, np.flatnonzero(bad)[0], side="right") - 1)


def load_count_file(path: str | Path, *, layer: str | None = None) -> tuple[scipy.sparse.csr_matrix, tuple[str, ...] | None]:
    """(counts as float32 CSR [cells, genes], gene names or None) from a .h5ad, .npy or .npz file.

    `layer`: the .h5ad layer holding the counts (default: X); .h5ad only.
    Raises DataError (a ValueError) with one line naming the file: missing, unreadable, of an
    unknown suffix, not a matrix, or holding negative, non-finite or all-zero-cell counts.
    """
    path = Path(path)
    if path.suffix not in COUNT_FILE_SUFFIXES:
        raise DataError(f"data file {path}: count files are {', '.join(COUNT_FILE_SUFFIXES)}, not {path.suffix or 'no suffix'!r}")
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    if layer is not None and path.suffix != ".h5ad":
        raise DataError(f"data file {path}: --layer {layer!r} names an AnnData layer; only .h5ad files have layers")
    if path.suffix == ".h5ad":
        matrix, names = _read_h5ad(path, layer)
    else:
        matrix, names = (_read_npz(path) if path.suffix == ".npz" else _read_npy(path)), None
    counts = check_counts(matrix, f"data file {path}")
    if names is not None and len(names) != counts.shape[1]:
        names = None  # a var index that does not match X's genes names nothing reliably
    return counts, names


def write_h5ad(path: str | Path, counts: np.ndarray, gene_names=None) -> Path:
    """Write counts [cells, genes] as an AnnData .h5ad (X dense float32), with gene names as var's
    index when given. Needs the anndata package (pip install anndata)."""
    try:
        import anndata
    except ImportError:
        raise ValueError(f"writing {path} needs the anndata package: pip install anndata") from None
    import pandas as pd

    counts = np.asarray(counts, dtype=np.float32)
    names = [f"gene{i}" for i in range(counts.shape[1])] if gene_names is None else [str(n) for n in gene_names]
    adata = anndata.AnnData(X=counts, var=pd.DataFrame(index=names))
    adata.write_h5ad(path)
    return Path(path)


@dataclass
class SyntheticCounts:
    """Counts drawn from a known generative model (`synthetic_counts`), with its parameters.

    x: float32 [N, D] counts; z: [N, L] latent draws; log_mu: [N, D] the log means that generated x
    (log_softmax(z @ weight + bias) + log(library)); library: [N] the library sizes used;
    log_theta: [D] per-gene log inverse dispersion; zi_logits: [D] per-gene zero-inflation logits
    (None for "nb"); weight [L, D] and bias [D]: the fixed random decoder.
    """

    x: torch.Tensor
    z: torch.Tensor
    log_mu: torch.Tensor
    library: torch.Tensor
    log_theta: torch.Tensor
    zi_logits: torch.Tensor | None
    weight: torch.Tensor
    bias: torch.Tensor
    likelihood: str

    def log_mean(self, z: torch.Tensor, library: torch.Tensor) -> torch.Tensor:
        """The generating model's log mean for latents z [K, L] at library sizes [K] (float64)."""
        return torch.log_softmax(z.double() @ self.weight.double() + self.bias.double(), dim=1) + torch.log(library.double())[:, None]


def synthetic_counts(cells: int, genes: int, *, latent_dim: int = 2, likelihood: str = "nb", library_size: float = 1000.0,
                     seed: int = 0) -> SyntheticCounts:
    """NB or ZINB counts [cells, genes] from a low-dimensional latent through a fixed random decoder.

    z ~ N(0, I_L); gene proportions rho = softmax(z @ W + b), W ~ N(0, 1), b ~ N(0, 1) (so genes
    differ in level and respond to z); library sizes l = library_size * exp(0.3 * N(0, 1)); mean
    mu = l * rho; theta per gene log-uniform on [0.5, 20]; x ~ NB(mean mu, inverse dispersion theta)
    drawn as Poisson(Gamma(theta, theta / mu)); for "zinb", a per-gene zero-inflation probability
    sigmoid(U[-3, -1]) (5% to 27%) zeroes entries. A cell left with no counts is drawn again.
    Raises ValueError for a likelihood other than "nb" or "zinb".
    """
    if likelihood not in ("nb", "zinb"):
        raise ValueError(f"synthetic_counts: likelihood must be 'nb' or 'zinb', got {likelihood!r}")
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(latent_dim, genes, generator=generator, dtype=torch.float64)
    bias = torch.randn(genes, generator=generator, dtype=torch.float64)
    log_theta = torch.empty(genes, dtype=torch.float64).uniform_(np.log(0.5), np.log(20.0), generator=generator)
    zi_logits = torch.empty(genes, dtype=torch.float64).uniform_(-3.0, -1.0, generator=generator) if likelihood == "zinb" else None
    z = torch.randn(cells, latent_dim, generator=generator, dtype=torch.float64)
    library = library_size * torch.exp(0.3 * torch.randn(cells, generator=generator, dtype=torch.float64))
    x = torch.zeros(cells, genes, dtype=torch.float64)
    empty = torch.ones(cells, dtype=torch.bool)
    while empty.any():
        rows = empty.nonzero().squeeze(1)
        mu = torch.exp(torch.log_softmax(z[rows] @ weight + bias, dim=1)) * library[rows, None]
        theta = log_theta.exp().expand_as(mu)
        rate = torch._standard_gamma(theta.contiguous(), generator=generator) * (mu / theta)
        counts = torch.poisson(rate, generator=generator)
        if zi_logits is not None:
            keep = torch.rand(mu.shape, generator=generator, dtype=torch.float64) >= torch.sigmoid(zi_logits)
            counts = counts * keep
        x[rows] = counts
        empty = x.sum(1) == 0
    log_mu = torch.log_softmax(z @ weight + bias, dim=1) + torch.log(library)[:, None]
    return SyntheticCounts(x.float(), z, log_mu, library, log_theta, zi_logits, weight, bias, likelihood)


def writes_count_samples(checkpoint_path, out, library_size: float | None) -> bool:
    """Whether `vae-fast sample` draws counts (the checkpoint's model is a count model) here, rather
    than plots.write_samples. Raises ValueError for --library-size with another model, or a .h5ad
    out for one."""
    from .checkpoints import load_checkpoint, model_config
    from .model import COUNT_LIKELIHOODS

    likelihood = model_config(load_checkpoint(checkpoint_path))["likelihood"]
    if likelihood in COUNT_LIKELIHOODS:
        return True
    if library_size is not None:
        raise ValueError(f"--library-size applies to count models; {checkpoint_path} has a {likelihood} decoder")
    if Path(out).suffix == ".h5ad":
        raise ValueError(f"--out {out}: .h5ad holds counts, and {checkpoint_path} has a {likelihood} decoder; use .png or .npy")
    return False


@torch.no_grad()
def write_count_samples(checkpoint_path, out, *, n: int = 64, seed: int = 0, device: str = "cpu",
                        library_size: float | None = None) -> Path:
    """`vae-fast sample` of a count model: n cells of counts drawn from the prior at `library_size`
    (default: the training data's median) to `out`: .npy (float32 [n, D]), .h5ad (AnnData, the
    training genes' names when known) or .png (a heatmap of log1p(counts)).

    Raises CheckpointError for a bad checkpoint, ValueError for n < 1, a library size that is not
    positive, or another suffix.
    """
    from .checkpoints import load_checkpoint, model_from_checkpoint

    out = Path(out)
    if n < 1:
        raise ValueError(f"--n must be positive, got {n}")
    if out.suffix not in (".npy", ".h5ad", ".png"):
        raise ValueError(f"--out {out}: counts are written to a .npy, .h5ad or .png file")
    if library_size is not None and not 0 < library_size < float("inf"):
        raise ValueError(f"--library-size must be positive and finite, got {library_size}")
    checkpoint = load_checkpoint(checkpoint_path)
    model = model_from_checkpoint(checkpoint, checkpoint_path).to(device).eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    counts = model.sample(n, generator=generator, library_size=library_size).float().cpu()
    if out.suffix == ".npy":
        np.save(out, counts.numpy())
    elif out.suffix == ".h5ad":
        write_h5ad(out, counts.numpy(), checkpoint["dataset"].get("feature_names"))
    else:
        from .plots import save_sample_heatmap

        save_sample_heatmap(torch.log1p(counts), out, title=f"{n} cells drawn from the prior, log1p(counts)")
    return out


def check_count_dataset(data, reason: str) -> None:
    """Raises ValueError unless both splits of `data` (a vae_fast.data.Dataset) are counts a count
    model can read: finite, >= 0, each sample with a positive total. `reason` starts the message."""
    for split, x in (("training", data.train_x), ("held-out", data.test_x)):
        if isinstance(x, CountMatrix):
            continue  # checked when it was loaded
        try:
            check_counts(x.detach().cpu().numpy().reshape(len(x), -1), f"data set {data.name}'s {split} split")
        except DataError as error:
            raise ValueError(f"{reason} models counts: {error}") from None
