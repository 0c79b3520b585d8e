"""`vae-fast train | eval | sample` on count data (issue 20): a .h5ad written by anndata (counts in
a layer, sparse), the bundled digits' pixel counts, eval's negative ELBO and IWAE bound, samples
as counts in .npy and .h5ad, resume, and one-line errors for bad flags and files. Tiny runs."""

import json
import re

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse
import torch

from vae_fast.checkpoints import load_checkpoint, model_from_checkpoint
from vae_fast.cli import main
from vae_fast.count_data import synthetic_counts
from vae_fast.evaluation import iwae_log_likelihood, negative_elbo

TINY = ["--epochs", "1", "--latent-dim", "2", "--hidden-dims", "16", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    """A .h5ad of 120 synthetic ZINB cells x 30 genes: log-normalized values in X (what X often
    holds), the raw counts sparse in the layer "counts"."""
    root = tmp_path_factory.mktemp("counts")
    counts = synthetic_counts(120, 30, likelihood="zinb", library_size=200.0, seed=0).x.numpy()
    genes = pd.DataFrame(index=[f"gene{i}" for i in range(30)])
    adata = anndata.AnnData(X=np.log1p(counts), var=genes, layers={"counts": scipy.sparse.csr_matrix(counts)})
    adata.write_h5ad(root / "cells.h5ad")
    return root, counts


@pytest.fixture(scope="module")
def zinb_run(cells):
    root, _ = cells
    out = root / "zinb"
    assert main(["train", "--data-file", str(root / "cells.h5ad"), "--layer", "counts", "--likelihood", "zinb",
                 "--dispersion", "gene", "--out", str(out), *TINY]) == 0
    return out


def test_train_on_a_h5ad_layer_records_the_count_model(cells, zinb_run):
    _, counts = cells
    checkpoint = load_checkpoint(zinb_run / "checkpoint.pt")
    config, trained = checkpoint["model_config"], checkpoint["train_config"]
    assert (config["likelihood"], config["dispersion"]) == ("zinb", "gene")
    assert (trained["dataset"], trained["layer"]) == ("counts", "counts")
    assert checkpoint["dataset"]["feature_names"] == [f"gene{i}" for i in range(30)]
    # The library size to generate at: the median total of the 96 training cells, between the data's extremes.
    totals = counts.sum(1)
    assert totals.min() <= config["library_size"] <= totals.max()
    row = json.loads((zinb_run / "metrics.json").read_text())[-1]
    assert row["test_loss"] > 0 and "scale" not in row  # no Gaussian/Laplace scale to show
    assert not list(zinb_run.glob("*.png"))  # no pictures of counts by default


def test_eval_reports_the_held_out_negative_elbo_and_iwae_bound(cells, zinb_run, capsys):
    """eval's numbers are those of the evaluation functions on the held-out cells it reads from the
    checkpoint's own layer (not X, whose log-normalized values would score differently)."""
    capsys.readouterr()
    assert main(["eval", str(zinb_run / "checkpoint.pt"), "--samples", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    from vae_fast.data import load_dataset

    data = load_dataset("counts", data_file=cells[0] / "cells.h5ad", layer="counts", seed=0)
    model = model_from_checkpoint(load_checkpoint(zinb_run / "checkpoint.pt")).eval()
    assert result["held_out_samples"] == 24 and result["likelihood"] == "zinb"
    assert result["negative_elbo"] == pytest.approx(negative_elbo(model, data.test_x.to_dense())["loss"], rel=1e-6)
    assert result["iwae_log_likelihood"] == pytest.approx(iwae_log_likelihood(model, data.test_x.to_dense(), samples=8), rel=1e-6)
    assert -result["iwae_log_likelihood"] <= result["negative_elbo"] + 1e-3 * abs(result["negative_elbo"])


def test_sample_writes_counts_to_npy_and_h5ad(zinb_run, tmp_path, capsys):
    checkpoint = zinb_run / "checkpoint.pt"
    assert main(["sample", str(checkpoint), "--n", "500", "--library-size", "80", "--out", str(tmp_path / "s.npy")]) == 0
    counts = np.load(tmp_path / "s.npy")
    assert counts.shape == (500, 30) and (counts >= 0).all() and np.array_equal(counts, np.round(counts))
    # Zero-inflation only removes counts: each cell's total is at most about its library size
    # (the NB totals scatter around it), and the mean total is below it.
    assert counts.sum(1).mean() < 80
    assert main(["sample", str(checkpoint), "--n", "7", "--out", str(tmp_path / "s.h5ad")]) == 0
    written = anndata.read_h5ad(tmp_path / "s.h5ad")
    assert written.shape == (7, 30) and list(written.var_names) == [f"gene{i}" for i in range(30)]
    assert (np.asarray(written.X) >= 0).all()


def test_digits_counts_train_with_each_likelihood(tmp_path):
    for likelihood, flags in (("poisson", []), ("nb", ["--dispersion", "gene-cell"])):
        out = tmp_path / likelihood
        assert main(["train", "--dataset", "digits-counts", "--likelihood", likelihood, *flags, "--out", str(out), *TINY]) == 0
        model = model_from_checkpoint(load_checkpoint(out / "checkpoint.pt"))
        assert model.likelihood == likelihood and torch.isfinite(torch.tensor(model.library_size))


def test_images_of_a_count_model_are_drawn_from_its_sparse_held_out_split(cells, tmp_path):
    """--images with counts: the held-out split is a CountMatrix (sparse on the host); the pictures
    take its first cells dense. Tabular counts (a .h5ad of genes) and 8x8 pixel counts."""
    root, _ = cells
    out = tmp_path / "genes"
    assert main(["train", "--data-file", str(root / "cells.h5ad"), "--layer", "counts", "--likelihood", "nb",
                 "--images", "--out", str(out), *TINY]) == 0
    assert {"feature_reconstructions.png", "latent.png", "samples.png"} <= {p.name for p in out.glob("*.png")}
    out = tmp_path / "pixels"
    assert main(["train", "--dataset", "digits-counts", "--likelihood", "poisson", "--images", "--out", str(out), *TINY]) == 0
    assert {"reconstructions.png", "latent.png", "interpolation.png"} <= {p.name for p in out.glob("*.png")}


def test_resume_keeps_the_count_settings(cells, zinb_run, tmp_path, capsys):
    root, _ = cells
    capsys.readouterr()
    assert main(["train", "--resume", str(zinb_run / "checkpoint.pt"), "--data-file", str(root / "cells.h5ad"),
                 "--dispersion", "gene-cell", "--epochs", "2", "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert "--dispersion gene-cell differs from the gene that" in capsys.readouterr().err
    assert main(["train", "--resume", str(zinb_run / "checkpoint.pt"), "--data-file", str(root / "cells.h5ad"),
                 "--epochs", "2", "--out", str(tmp_path / "r"), "--quiet"]) == 0
    checkpoint = load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    assert (checkpoint["epoch"], checkpoint["train_config"]["layer"], checkpoint["model_config"]["dispersion"]) == (2, "counts", "gene")


@pytest.mark.parametrize("flags, message", [
    (["--dataset", "digits-counts", "--likelihood", "poisson", "--dispersion", "gene"], "--dispersion gene needs --likelihood nb or zinb"),
    (["--dataset", "digits", "--layer", "counts", "--likelihood", "nb"], "--layer 'counts' names a layer of a .h5ad count file"),
    (["--dataset", "wine", "--likelihood", "nb"], r"--likelihood nb models counts: data set wine's training split: counts must be >= 0"),
    (["--dataset", "digits-counts", "--likelihood", "nb", "--model", "conv"], "ConvVAE: likelihood='nb' models counts"),
    (["--dataset", "digits-counts", "--likelihood", "nb", "--learn-scale", "shared"], "spread is its dispersion"),
])
def test_bad_count_flags_exit_2_with_one_line(tmp_path, capsys, flags, message):
    assert main(["train", "--out", str(tmp_path / "bad"), *TINY, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err


def test_an_unknown_dispersion_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exiting:
        main(["train", "--dataset", "digits-counts", "--likelihood", "zinb", "--dispersion", "cell", "--out", str(tmp_path)])
    assert exiting.value.code == 2 and "invalid choice: 'cell'" in capsys.readouterr().err


def test_bad_count_files_exit_2_with_one_line(tmp_path, capsys):
    counts = np.ones((10, 4), dtype=np.float32)
    counts[2, 1] = -3
    np.save(tmp_path / "negative.npy", counts)
    (tmp_path / "junk.h5ad").write_bytes(b"junk")
    cases = {
        "negative.npy": "counts must be >= 0; cell 2 holds -3",
        "junk.h5ad": "is not a readable .h5ad",
        "missing.h5ad": "does not exist",
    }
    for name, message in cases.items():
        assert main(["train", "--data-file", str(tmp_path / name), "--likelihood", "nb", "--out", str(tmp_path / "o"), *TINY]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and name in err[0], err
