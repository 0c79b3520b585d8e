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
from typing import NamedTuple

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
        self._tensors: _AdamTensors | None = None

    def _adam_tensors(self) -> _AdamTensors | None:
        """The optimizer's tensors for the kernel, read again whenever the cached ones are no
        longer its own (a cache never checked went on stepping the tensors that `load_state_dict`
        had replaced). Checking by identity costs ~2 us a step, reading ~8 us, of the 50-100 us that
        the direct call saved against Optimizer.step (10 parameter tensors, a busy 2-core CPU)."""
        if self._tensors is None or not self._tensors.current(self.optimizer):
            self._tensors = _AdamTensors.read(self.optimizer)
        return self._tensors

    def __call__(self) -> None:
        tensors = self._adam_tensors()
        grads = None if tensors is None else [p.grad for p in tensors.params]
        if grads is None or any(g is None for g in grads):
            self.optimizer.step()  # skips parameters without gradients, as Adam does
            return
        group = tensors.group
        beta1, beta2 = group["betas"]
        torch._foreach_add_(tensors.steps, 1)
        torch._fused_adam_(tensors.params, grads, tensors.exp_avgs, tensors.exp_avg_sqs, [], tensors.steps, amsgrad=False,
                           lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                           maximize=group["maximize"])


class _AdamTensors(NamedTuple):
    """What `FusedAdamStep` hands the fused kernel, with the containers it was read from."""

    param_groups: list
    group: dict
    params: list
    state: dict
    exp_avgs: list
    exp_avg_sqs: list
    steps: list

    @staticmethod
    def read(optimizer: torch.optim.Adam) -> _AdamTensors | None:
        """The tensors of a fused Adam's one parameter group, or None where the direct call does
        not apply (see FusedAdamStep) or Adam's state is not yet created."""
        groups = optimizer.param_groups
        if len(groups) != 1:
            return None
        group = groups[0]
        if (not group.get("fused") or group.get("capturable") or group["amsgrad"] or group.get("decoupled_weight_decay")
                or group.get("differentiable") or isinstance(group["lr"], torch.Tensor)):
            return None
        params = group["params"]
        if len({(p.device, p.dtype) for p in params}) != 1 or any(p.is_complex() for p in params):
            return None
        states = [optimizer.state.get(p) for p in params]
        if not all(states):
            return None
        return _AdamTensors(groups, group, params, optimizer.state, [s["exp_avg"] for s in states],
                            [s["exp_avg_sq"] for s in states], [s["step"] for s in states])

    def current(self, optimizer: torch.optim.Adam) -> bool:
        """Whether these are still the optimizer's own: `load_state_dict` replaces its groups and
        state tensors, `add_param_group` adds a group."""
        if (optimizer.param_groups is not self.param_groups or len(self.param_groups) != 1
                or self.param_groups[0] is not self.group or optimizer.state is not self.state):
            return False
        for p, exp_avg, exp_avg_sq, step in zip(self.params, self.exp_avgs, self.exp_avg_sqs, self.steps):
            s = self.state.get(p)
            if s is None or s["exp_avg"] is not exp_avg or s["exp_avg_sq"] is not exp_avg_sq or s["step"] is not step:
                return False
        return True


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
        # optimizer.zero_grad(set_to_none=True) without its hooks and grouping; the groups read at
        # every step, as zero_grad does, so that a group added later is reset too
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        (loss * self.scale if self.scale != 1 else loss).backward()
        self.adam()
        return torch.stack((loss.detach(), kl)).float()
