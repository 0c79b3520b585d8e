"""vae_fast: fused C++/CUDA kernels for variational autoencoders.

    from vae_fast import VAE, loss_function      # drop-in for the PyTorch examples' VAE
    model = vae_fast.ConvVAE((1, 28, 28), 16, likelihood="gaussian", learn_scale="shared")
    loss = model.loss(x)                         # the negative ELBO of a batch, fused
    z = vae_fast.reparameterize(mu, logvar)      # eps drawn inside the kernel
    loss = vae_fast.vae_loss(recon, x, mu, logvar, logits=True, beta=1.0, reduction="sum")
    step = vae_fast.TrainStep(model, optimizer, loss_fn)  # loss = step(batch): the whole step, fast
"""

from . import reference
from ._info import backend_info
from .functional import loss_function, reparameterize, vae_loss
from .conv_model import ConvVAE
from .model import VAE
from .train_step import TrainStep

__version__ = "0.1.0"

__all__ = ["VAE", "ConvVAE", "TrainStep", "reparameterize", "vae_loss", "loss_function", "reference", "backend_info", "__version__"]
