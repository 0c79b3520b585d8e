"""`vae_fast.VAE`: the PyTorch examples' VAE (pytorch/examples, vae/main.py) as a drop-in that trains
faster, with optional extra hidden layers and a Gaussian or Laplace decoder for continuous data.

Drop-in contract: `recon, mu, logvar = model(x)` with x of shape (B, 1, 28, 28) or (B, 784), recon
holding probabilities, and `vae_fast.loss_function(recon, x, mu, logvar)` as the loss. What makes it
faster, all exact: the fused reparameterization kernel, one GEMM for both encoder heads, in-place
ReLUs, and `forward_logits` for code that can take the decoder's logits (the fused loss's
`logits=True` path skips the sigmoid's backward and needs no log(0) clamping).

Count data (`likelihood="poisson" | "nb" | "zinb"`, `VAE` only) follows scVI (Lopez et al. 2018):
the encoder reads log1p(counts), the decoder gives a softmax over the D genes scaled by the cell's
observed library size, log_mu = log_softmax(h) + log(x.sum(1)), and the negative binomial's inverse
dispersion theta is a learned parameter per gene (`dispersion="gene"`) or a decoder head per cell and
gene (`"gene-cell"`); the zero-inflated NB adds a decoder head for the logit of the zero-inflation
probability. docs/counts.md has the likelihoods' definitions.

`LikelihoodVAE` is what `VAE` and `vae_fast.ConvVAE` share: the decoder's likelihood, its learned
scale, sampling of z, and the one-line loss. A subclass supplies `encode`, `decode_output` and the
per-sample shape of its output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from . import reference
from .functional import reparameterize as fused_reparameterize
from .functional import vae_loss

__all__ = ["VAE", "LikelihoodVAE", "LIKELIHOODS", "COUNT_LIKELIHOODS", "LEARN_SCALES", "DISPERSIONS"]

COUNT_LIKELIHOODS = ("poisson", "nb", "zinb")
LIKELIHOODS = tuple(dict.fromkeys((*reference.LIKELIHOODS, *COUNT_LIKELIHOODS)))
LEARN_SCALES = ("none", "shared", "feature")
# Where the negative binomial's log inverse dispersion log_theta comes from: one learned value per
# gene, shape (D,) (scVI's default), or a decoder head, one value per cell and gene, shape (B, D).
DISPERSIONS = ("gene", "gene-cell")


def _check_positive_dim(owner: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")
    return value


def _mlp(dims: Sequence[int]) -> nn.Sequential:
    """Linear layers through `dims`, a ReLU after each but the last (whose output is a pre-activation)."""
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:])):
        if index:
            layers.append(nn.ReLU(inplace=True))
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers)


class LikelihoodVAE(nn.Module):
    """What every vae_fast model shares: a diagonal Gaussian posterior q(z|x) = N(mu, exp(logvar)),
    an N(0, I) prior, and a decoder likelihood p(x|z) that the fused `vae_fast.vae_loss` reads.

    Subclasses call `_init_likelihood` in their constructor and define `latent_dim`, `input_dim`
    (elements per sample), `encode(x) -> (mu, logvar)`, `decode_output(z)` and `encoder_heads`
    (the Linear layer giving [mu, logvar]; its weight tells the model's device and dtype).

    Attributes:
        likelihood: "bernoulli" (decode_output gives logits), "gaussian" (the mean) or "laplace"
            (the location).
        learn_scale: "none" (a fixed unit scale for gaussian/laplace; always so for bernoulli),
            "shared" (one learned log-scale) or "feature" (one per element of a sample).
        log_scale: the learned log of the decoder's standard deviation (gaussian) or scale b
            (laplace): an nn.Parameter of shape () ("shared") or the output's per-sample shape
            ("feature"), initialised to 0 (scale 1); None when learn_scale is "none".
        fused: whether z is drawn by the fused `vae_fast.reparameterize` kernel (else the reference).
    """

    likelihood: str
    learn_scale: str
    latent_dim: int
    # Whether the model has the count-data decoder (library size, dispersion); VAE does.
    models_counts: bool = False

    def _init_likelihood(self, owner: str, likelihood: str, learn_scale: str, per_sample_shape: tuple[int, ...], fused: bool) -> None:
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"{owner}: likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if likelihood in COUNT_LIKELIHOODS and not self.models_counts:
            raise ValueError(f"{owner}: likelihood={likelihood!r} models counts, which vae_fast.VAE does; "
                             f"{owner} takes 'bernoulli', 'gaussian' or 'laplace'")
        if learn_scale not in LEARN_SCALES:
            raise ValueError(f"{owner}: learn_scale must be one of {LEARN_SCALES}, got {learn_scale!r}")
        if likelihood == "bernoulli" and learn_scale != "none":
            raise ValueError(f"{owner}: learn_scale={learn_scale!r} needs a 'gaussian' or 'laplace' likelihood; "
                             "the Bernoulli likelihood has no scale to learn (use learn_scale='none')")
        if likelihood in COUNT_LIKELIHOODS and learn_scale != "none":
            raise ValueError(f"{owner}: learn_scale={learn_scale!r} needs a 'gaussian' or 'laplace' likelihood; "
                             f"the {likelihood!r} likelihood's spread is its dispersion (use learn_scale='none')")
        self.likelihood, self.learn_scale, self.fused = likelihood, learn_scale, bool(fused)
        shape = {"none": None, "shared": (), "feature": per_sample_shape}[learn_scale]
        # A parameter, so it is in state_dict (checkpoints), parameters() (optimizers) and follows
        # .to()/.double() with the rest; log-parameterised so that any real value is a valid scale.
        self.log_scale = None if shape is None else nn.Parameter(torch.zeros(shape))

    def reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """z = mu + exp(0.5 * logvar) * eps, eps ~ N(0, I) from torch's global generator."""
        if self.fused:
            return fused_reparameterize(mu, logvar)
        return reference.reparameterize(mu, logvar)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: [B, L] -> the mean of p(x|z): probabilities for bernoulli, the decoder's output (any
        real) for gaussian and laplace (whose mean is their location)."""
        output = self.decode_output(z)
        return torch.sigmoid(output) if self.likelihood == "bernoulli" else output

    def decode_loss_inputs(self, z: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(recon, kwargs) for latent draws z [B, L] against targets x (B samples): the decoder's
        output and the likelihood arguments of `vae_fast.vae_loss(recon, x, mu, logvar, **kwargs)`
        and `vae_fast.reference.reconstruction_loss(recon, x, **kwargs)`. Here decode_output(z) and
        loss_kwargs(); a count model's depend on the batch (library size, per-cell heads)."""
        return self.decode_output(z), self.loss_kwargs()

    def forward_loss_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """(recon, mu, logvar, kwargs) for one z ~ q(z|x): `vae_fast.vae_loss(recon, x, mu, logvar,
        **kwargs)` is the negative ELBO of x, for every likelihood. What training's objective calls."""
        mu, logvar = self.encode(x)
        recon, kwargs = self.decode_loss_inputs(self.reparameterize(mu, logvar), x)
        return recon, mu, logvar, kwargs

    def forward_output(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(recon, mu, logvar) of `forward_loss_inputs`: Bernoulli logits, the Gaussian mean / Laplace
        location (pair them with `**model.loss_kwargs()`), or a count model's log_mu."""
        return self.forward_loss_inputs(x)[:3]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(recon, mu, logvar): recon = decode(z) for one z ~ q(z|x) (sampled in eval mode too, as
        in the PyTorch example): probabilities for bernoulli, the mean otherwise."""
        output, mu, logvar = self.forward_output(x)
        if self.likelihood == "bernoulli":
            # Plain probabilities, as in the example: the loss's gradient must reach the parameters
            # through recon (and its sigmoid), so that autograd.grad(loss, recon), recon.retain_grad()
            # and in-place edits of recon behave as they do there. The logits path is forward_output.
            return torch.sigmoid(output), mu, logvar
        return output, mu, logvar

    def loss_kwargs(self) -> dict:
        """The likelihood arguments of `vae_fast.vae_loss` (and of
        `vae_fast.reference.reconstruction_loss`) for this model's decode_output:
        dict(likelihood=..., logits=..., log_scale=...). A count model's depend on the batch:
        ValueError, use `forward_loss_inputs` / `decode_loss_inputs`."""
        if self.likelihood in COUNT_LIKELIHOODS:
            raise ValueError(f"loss_kwargs: a {self.likelihood!r} model's likelihood arguments depend on the batch "
                             "(library size, per-cell heads); use forward_loss_inputs(x) or decode_loss_inputs(z, x)")
        return {"likelihood": self.likelihood, "logits": self.likelihood == "bernoulli", "log_scale": self.log_scale}

    def loss(self, x: torch.Tensor, *, beta: float = 1.0, reduction: str = "sum") -> torch.Tensor:
        """The negative ELBO of the batch x in nats (one z per sample), by the fused loss:
        `vae_loss(recon, x, mu, logvar, beta=beta, reduction=reduction, **kwargs)` with
        `recon, mu, logvar, kwargs = self.forward_loss_inputs(x)`.

        Raises what `vae_fast.vae_loss` raises, e.g. ValueError for Bernoulli targets outside [0, 1].
        """
        output, mu, logvar, kwargs = self.forward_loss_inputs(x)
        return vae_loss(output, x, mu, logvar, beta=beta, reduction=reduction, **kwargs)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The deterministic reconstruction decode(mu(x))."""
        mu, _ = self.encode(x)
        return self.decode(mu)

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws z ~ N(0, I) decoded to the means of p(x|z), on the model's device and dtype."""
        weight = self.encoder_heads.weight
        z = torch.randn(n, self.latent_dim, generator=generator, device=weight.device, dtype=weight.dtype)
        return self.decode(z)


class VAE(LikelihoodVAE):
    """MLP VAE with a diagonal Gaussian posterior, an N(0, I) prior and a Bernoulli, Gaussian,
    Laplace, or (count data, scVI's model) Poisson, negative binomial or zero-inflated NB decoder.

    Args:
        input_dim: features per sample D (784 for MNIST; inputs may be images whose per-sample
            element count is D).
        hidden_dim: width of the single hidden layer of encoder and decoder (the example's 400).
        latent_dim: L, the size of z.
        hidden_dims: several hidden layers instead, encoder widths in order (the decoder mirrors
            them); overrides `hidden_dim`.
        fused: draw z with the fused `vae_fast.reparameterize` kernel (True) or the pure-torch
            reference (False); both are exact, the reference is for comparison and debugging.
        likelihood: "bernoulli" (the default and the example's: the decoder gives logits, `forward`
            probabilities), "gaussian" or "laplace" (the decoder's last layer gives the mean /
            location directly, any real number).
        learn_scale: "none" (unit scale), "shared" (one learned log_scale, shape ()) or "feature"
            (one per feature, shape [D]); gaussian and laplace only.
        dispersion: nb and zinb only (default "gene"): "gene", log_theta a learned parameter of
            shape [D] (initialised to 0, theta = 1), or "gene-cell", a decoder head giving log_theta
            [B, D] for each cell.
        library_size: count models: the library size (total count of a cell) at which `decode` and
            `sample` generate, typically the training data's median; stored in `config()`.
    Raises:
        ValueError when a dimension is not a positive integer, `hidden_dims` is empty, the
        likelihood or learn_scale is unknown, a scale is to be learned for a Bernoulli or count
        decoder, a dispersion is given for a likelihood without one, or library_size is not positive.

    Count models (likelihood "poisson", "nb", "zinb") take counts x [B, D] (float, >= 0, each cell
    with a positive total): the encoder reads log1p(x); the decoder's output is the log of the
    genes' proportions, log_softmax(h) [B, D], and the likelihood's log mean is that plus
    log(x.sum(1)), the cell's observed library size. Their per-batch likelihood arguments come from
    `forward_loss_inputs(x)` / `decode_loss_inputs(z, x)` (`loss_kwargs()` raises).

    With no arguments it is the examples' 784-400-20-400-784 network. `forward(x)` takes x of shape
    [B, D] or [B, *image] with D elements per sample and returns (recon [B, D], mu [B, L],
    logvar [B, L]), ValueError for another width; like the example (and the paper) it samples z in
    eval mode too; `reconstruct` gives the mean reconstruction.
    """

    models_counts = True

    def __init__(
        self,
        input_dim: int = 784,
        hidden_dim: int = 400,
        latent_dim: int = 20,
        *,
        hidden_dims: Sequence[int] | None = None,
        fused: bool = True,
        likelihood: str = "bernoulli",
        learn_scale: str = "none",
        dispersion: str | None = None,
        library_size: float | None = None,
    ):
        super().__init__()
        if hidden_dims is None:
            hidden_dims = (hidden_dim,)
        hidden_dims = tuple(hidden_dims)
        if not hidden_dims:
            raise ValueError("VAE: hidden_dims must name at least one hidden layer width, got ()")
        self.input_dim = _check_positive_dim("VAE", "input_dim", input_dim)
        self.latent_dim = _check_positive_dim("VAE", "latent_dim", latent_dim)
        self.hidden_dims = tuple(_check_positive_dim("VAE", "hidden_dims entry", h) for h in hidden_dims)
        self._init_likelihood("VAE", likelihood, learn_scale, (self.input_dim,), fused)
        self._init_counts(dispersion, library_size)
        self.encoder = _mlp((self.input_dim, *self.hidden_dims))
        # mu and logvar from one [H, 2L] GEMM instead of the example's two [H, L] ones.
        self.encoder_heads = nn.Linear(self.hidden_dims[-1], 2 * self.latent_dim)
        if self.likelihood in COUNT_LIKELIHOODS:
            # The proportions' logits and the per-cell heads (log_theta, zi_logits) from one GEMM.
            self.decoder = _mlp((self.latent_dim, *reversed(self.hidden_dims)))
            self.decoder_heads = nn.Linear(self.hidden_dims[0], len(self._count_heads()) * self.input_dim)
        else:
            self.decoder = _mlp((self.latent_dim, *reversed(self.hidden_dims), self.input_dim))

    def _init_counts(self, dispersion: str | None, library_size: float | None) -> None:
        has_dispersion = self.likelihood in ("nb", "zinb")
        if dispersion is not None and not has_dispersion:
            raise ValueError(f"VAE: dispersion applies to the 'nb' and 'zinb' likelihoods, not {self.likelihood!r}; leave it None")
        if dispersion is None and has_dispersion:
            dispersion = "gene"
        if dispersion is not None and dispersion not in DISPERSIONS:
            raise ValueError(f"VAE: dispersion must be one of {DISPERSIONS}, got {dispersion!r}")
        if library_size is not None and not (isinstance(library_size, (int, float)) and 0 < library_size < math.inf):
            raise ValueError(f"VAE: library_size must be a positive finite number, got {library_size!r}")
        self.dispersion = dispersion
        self.library_size = None if library_size is None else float(library_size)
        # A parameter, as log_scale is: in state_dict, parameters() and .to(); any real is a valid log.
        self.log_theta = nn.Parameter(torch.zeros(self.input_dim)) if dispersion == "gene" else None

    def _count_heads(self) -> tuple[str, ...]:
        """The decoder heads of a count model, in the order decoder_heads gives them."""
        heads = ("log_rho",)
        if self.dispersion == "gene-cell":
            heads += ("log_theta",)
        if self.likelihood == "zinb":
            heads += ("zi_logits",)
        return heads

    def config(self) -> dict:
        """The constructor arguments, enough to rebuild this architecture (stored in checkpoints;
        `vae_fast.checkpoints.model_from_checkpoint` reads them)."""
        config = {"model": "mlp", "input_dim": self.input_dim, "latent_dim": self.latent_dim, "hidden_dims": list(self.hidden_dims),
                  "likelihood": self.likelihood, "learn_scale": self.learn_scale}
        if self.likelihood in COUNT_LIKELIHOODS:
            config.update(dispersion=self.dispersion, library_size=self.library_size)
        return config

    def _flatten(self, x: torch.Tensor) -> torch.Tensor:
        per_sample = math.prod(x.shape[1:]) if x.dim() > 1 else x.numel()
        if per_sample != self.input_dim:
            raise ValueError(
                f"VAE: expected input_dim={self.input_dim} features per sample, got input of shape "
                f"{tuple(x.shape)} ({per_sample} per sample)"
            )
        return x.reshape(-1, self.input_dim)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, D] or [B, *image] with D elements per sample -> (mu, logvar), each [B, L].
        A count model reads log1p(x), which tames the counts' range (scVI's choice)."""
        x = self._flatten(x)
        if self.likelihood in COUNT_LIKELIHOODS:
            x = torch.log1p(x)
        h = torch.relu_(self.encoder(x))
        return self.encoder_heads(h).chunk(2, dim=1)

    def decode_output(self, z: torch.Tensor) -> torch.Tensor:
        """z: [B, L] -> [B, D]: Bernoulli logits, the Gaussian mean / Laplace location, or for a
        count model the log of the genes' proportions (log_softmax over D; the mean is these times
        the library size)."""
        if self.likelihood in COUNT_LIKELIHOODS:
            return self.count_heads(z)["log_rho"]
        return self.decoder(z)

    def count_heads(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """A count model's decoder outputs for z [B, L], each [B, D]: "log_rho" (log proportions,
        log_softmax over genes), and "log_theta" (dispersion "gene-cell") and "zi_logits" (zinb)."""
        h = torch.relu_(self.decoder(z))
        heads = dict(zip(self._count_heads(), self.decoder_heads(h).chunk(len(self._count_heads()), dim=1)))
        heads["log_rho"] = torch.log_softmax(heads["log_rho"], dim=1)
        return heads

    def decode_loss_inputs(self, z: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """As `LikelihoodVAE.decode_loss_inputs`; for a count model recon is log_mu = log_rho +
        log(x.sum(1)) and kwargs carries log_theta (the [D] parameter or the [B, D] head) and
        zi_logits [B, D] as the likelihood needs them."""
        if self.likelihood not in COUNT_LIKELIHOODS:
            return super().decode_loss_inputs(z, x)
        heads = self.count_heads(z)
        log_library = torch.log(x.reshape(len(x), -1).sum(1, keepdim=True)).to(heads["log_rho"].dtype)
        kwargs: dict = {"likelihood": self.likelihood}
        if self.dispersion is not None:
            kwargs["log_theta"] = self.log_theta if self.dispersion == "gene" else heads["log_theta"]
        if self.likelihood == "zinb":
            kwargs["zi_logits"] = heads["zi_logits"]
        return heads["log_rho"] + log_library, kwargs

    def _count_distribution(self, z: torch.Tensor, library_size: torch.Tensor) -> torch.distributions.Distribution:
        """p(x|z) of a count model at the library sizes [B, 1] (zero-inflation aside)."""
        heads = self.count_heads(z)
        log_mu = heads["log_rho"] + torch.log(library_size)
        if self.likelihood == "poisson":
            return torch.distributions.Poisson(log_mu.exp(), validate_args=False)
        log_theta = self.log_theta.expand_as(log_mu) if self.dispersion == "gene" else heads["log_theta"]
        # NegativeBinomial(total_count=theta, logits=log(mu / theta)) has mean mu.
        return torch.distributions.NegativeBinomial(log_theta.exp(), logits=log_mu - log_theta, validate_args=False)

    def _library_sizes(self, library_size: float | None, rows: int, like: torch.Tensor) -> torch.Tensor:
        size = self.library_size if library_size is None else library_size
        if size is None or not 0 < size < math.inf:
            raise ValueError(f"VAE: a count model generates at a positive library size: pass library_size "
                             f"(this model stores {self.library_size})")
        return torch.full((rows, 1), float(size), device=like.device, dtype=like.dtype)

    def decode(self, z: torch.Tensor, *, library_size: float | None = None) -> torch.Tensor:
        """z: [B, L] -> the mean of p(x|z); for a count model the expected counts at
        `library_size` (default: the model's), (1 - pi) * mu for zinb. ValueError when a count
        model has no library size to use."""
        if self.likelihood not in COUNT_LIKELIHOODS:
            return super().decode(z)
        return self._count_mean(z, self._library_sizes(library_size, len(z), z))

    def _count_mean(self, z: torch.Tensor, library_size: torch.Tensor) -> torch.Tensor:
        heads = self.count_heads(z)
        mean = torch.exp(heads["log_rho"]) * library_size
        return mean * torch.sigmoid(-heads["zi_logits"]) if self.likelihood == "zinb" else mean

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """decode(mu(x)); a count model's at each cell's own library size x.sum(1)."""
        mu, _ = self.encode(x)
        if self.likelihood not in COUNT_LIKELIHOODS:
            return self.decode(mu)
        return self._count_mean(mu, self._flatten(x).sum(1, keepdim=True).to(mu.dtype))

    def sample(self, n: int, *, generator: torch.Generator | None = None, library_size: float | None = None) -> torch.Tensor:
        """n draws z ~ N(0, I) decoded to the means of p(x|z); a count model draws counts
        x ~ p(x|z) instead (Poisson or NB, zeroed where a Bernoulli(pi) mask says for zinb) at
        `library_size` (default: the model's), as floats [n, D]."""
        if self.likelihood not in COUNT_LIKELIHOODS:
            return super().sample(n, generator=generator)
        weight = self.encoder_heads.weight
        z = torch.randn(n, self.latent_dim, generator=generator, device=weight.device, dtype=weight.dtype)
        sizes = self._library_sizes(library_size, n, z)
        # torch.distributions draws from the global generator: seed it from `generator` inside a
        # forked RNG state, so that a seeded call repeats and the caller's global stream is untouched.
        seed = int(torch.randint(2**62, (1,), generator=generator, device=weight.device))
        with torch.random.fork_rng(devices=[weight.device] if weight.device.type == "cuda" else []):
            torch.manual_seed(seed)
            counts = self._count_distribution(z, sizes).sample()
            if self.likelihood == "zinb":
                zero = torch.distributions.Bernoulli(logits=self.count_heads(z)["zi_logits"]).sample()
                counts = counts * (1 - zero)
        return counts

    def _require_bernoulli(self, method: str) -> None:
        if self.likelihood != "bernoulli":
            raise ValueError(f"VAE.{method}: this model's decoder is {self.likelihood!r}, which has no logits; "
                             "use forward_output / decode_output with vae_loss(..., **model.loss_kwargs())")

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """z: [B, L] -> Bernoulli logits [B, D] (Bernoulli models only; else ValueError)."""
        self._require_bernoulli("decode_logits")
        return self.decode_output(z)

    def forward_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Like `forward` but returns the decoder's logits: pair it with
        `vae_fast.vae_loss(logits, x, mu, logvar, logits=True)`, the fastest training path.
        Bernoulli models only (ValueError otherwise): `forward_output` serves every likelihood."""
        self._require_bernoulli("forward_logits")
        return self.forward_output(x)
