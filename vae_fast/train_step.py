"""One optimizer step of `vae-fast train` run eagerly (the CPU path, and CUDA without a graph):
forward, loss, backward and Adam, with nothing that waits for the device and as few Python
operations as a step allows. The loop reads the step's numbers once per epoch, not per step.

Where a step's time goes on the CPU (MLP VAE 784-400-20, batch 128, 2 cores): the matrix
multiplies are ~65%; `torch.optim.Adam`'s default for-loop (about 10 ops per parameter tensor)
is ~30% of the example's step, its fused kernel is one call for all parameters, and calling that
kernel directly (`FusedAdamStep`) skips the ~0.3 ms of Python that `Optimizer.step` spends around it.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

__all__ = ["make_optimizer", "FusedAdamStep", "TrainStep", "autocast_context"]


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """A context manager factory: torch.autocast to `dtype` on the device, or nothing for None.
    cache_enabled=False: each weight is cast once per forward anyway, and a cache must not outlive
    a step captured in a CUDA graph."""
    if dtype is None:
        return nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype, cache_enabled=False)


def make_optimizer(params, lr: float, *, capturable: bool = False) -> torch.optim.Adam:
    """Adam as `vae-fast train` uses it: the fused implementation (one kernel over every parameter);
    `capturable` keeps its step counts on the device, for a step replayed from a CUDA graph."""
    return torch.optim.Adam(params, lr=lr, fused=True, capturable=capturable)


class FusedAdamStep:
    """`optimizer.step()` for a fused Adam, by a direct call of the kernel `Optimizer.step` ends in
    (`torch._foreach_add_` on the step counts, then `torch._fused_adam_`): the same arithmetic, so
    the same bits (tests/test_train_step.py checks it), without the per-parameter Python of
    `Optimizer.step` (hooks, state lookups, grouping by device). The optimizer keeps its state, so
    its state_dict, and so checkpoints, are those of `torch.optim.Adam`.

    Anything the direct call does not cover (not fused, capturable, amsgrad, several parameter
    groups, devices or dtypes, a parameter without a gradient, state not yet created) goes through
    `optimizer.step()`; so does the first step, which creates Adam's state."""

    def __init__(self, optimizer: torch.optim.Adam):
        self.optimizer = optimizer
        self._tensors: tuple[list, list, list, list] | None = None

    def _direct_ready(self) -> bool:
        groups = self.optimizer.param_groups
        if len(groups) != 1:
            return False
        group = groups[0]
        params = group["params"]
        if not (group.get("fused") and not group.get("capturable") and not group["amsgrad"]
                and not group.get("decoupled_weight_decay") and not group.get("differentiable")
                and not isinstance(group["lr"], torch.Tensor)):
            return False
        if len({(p.device, p.dtype) for p in params}) != 1 or any(p.is_complex() for p in params):
            return False
        states = [self.optimizer.state.get(p) for p in params]
        if not all(states):
            return False
        self._tensors = (params, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                         [s["step"] for s in states])
        return True

    def __call__(self) -> None:
        if self._tensors is None and not self._direct_ready():
            self.optimizer.step()
            return
        params, exp_avgs, exp_avg_sqs, steps = self._tensors
        grads = [p.grad for p in params]
        if any(g is None for g in grads):
            self.optimizer.step()  # skips those parameters, as Adam does
            return
        group = self.optimizer.param_groups[0]
        beta1, beta2 = group["betas"]
        torch._foreach_add_(steps, 1)
        torch._fused_adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=group["lr"], beta1=beta1,
                           beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"])


class TrainStep:
    """forward, loss, backward, Adam on one batch; returns [loss, KL] (summed over the batch; the
    KL unweighted) as one detached float32 device tensor, read by nobody until the epoch's end.

    Args:
        objective: `vae_fast.training.NegativeElbo` (or DistributedDataParallel around it).
        optimizer: the run's Adam (`make_optimizer`).
        world: processes in the run; each one's loss is scaled by it so that DDP's gradient average
            equals one process's summed-loss gradient.
        autocast: a dtype (torch.bfloat16) to run the forward under torch.autocast, or None.
        compile: run the objective through torch.compile (beta then goes in as a 0-d tensor, so
            that a KL warm-up's changing weight does not recompile it).
    """

    def __init__(self, objective: nn.Module, optimizer: torch.optim.Adam, *, world: int = 1,
                 autocast: torch.dtype | None = None, compile: bool = False):
        self.objective = torch.compile(objective) if compile else objective
        self.optimizer = optimizer
        self.adam = FusedAdamStep(optimizer)
        self._params = [p for group in optimizer.param_groups for p in group["params"]]
        self.scale = world
        device = next(objective.parameters()).device
        self._beta = torch.zeros((), device=device) if compile else None
        self._autocast = autocast_context(device, autocast)

    def _beta_argument(self, beta: float):
        if self._beta is None:
            return beta
        self._beta.fill_(beta)
        return self._beta

    def __call__(self, x: torch.Tensor, beta: float) -> torch.Tensor:
        with self._autocast():
            loss, kl = self.objective(x, self._beta_argument(beta))
        for p in self._params:  # optimizer.zero_grad(set_to_none=True) without its hooks and grouping
            p.grad = None
        (loss * self.scale if self.scale != 1 else loss).backward()
        self.adam()
        return torch.stack((loss.detach(), kl)).float()
