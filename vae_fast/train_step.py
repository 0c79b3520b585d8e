"""`vae_fast.TrainStep`: one whole training step (forward, loss, backward, optimizer) for any model,
with nothing that waits for the device. On CUDA the step is captured in a CUDA graph and replayed
(`captured_step.CapturedStep`) when the model and optimizer allow it; elsewhere it runs eagerly
with as few Python operations as a step allows. `vae-fast train` runs on it.

Where a step's time goes on the CPU (MLP VAE 784-400-20, batch 128, 2 cores): the matrix
multiplies are ~65%; `torch.optim.Adam`'s default for-loop (about 10 ops per parameter tensor)
is ~30% of the example's step, its fused kernel is one call for all parameters, and calling that
kernel directly (`FusedAdamStep`) skips the ~0.3 ms of Python that `Optimizer.step` spends around it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .captured_step import CapturedStep, CaptureError

__all__ = ["TrainStep", "CaptureError", "make_optimizer", "FusedAdamStep", "autocast_context"]


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
    """`optimizer.step()` for a fused Adam or AdamW, by a direct call of the kernels `Optimizer.step`
    ends in (per parameter group, `torch._foreach_add_` on the step counts, then `torch._fused_adam_`
    or `torch._fused_adamw_`): the same arithmetic, so the same bits (tests/test_train_step.py checks
    it), without the per-parameter Python of `Optimizer.step` (hooks, state lookups, grouping by
    device). The optimizer keeps its state, so its state_dict, and so checkpoints, are those of
    `torch.optim.Adam`.

    Anything the direct call does not cover (another optimizer or a subclass, not fused, capturable,
    amsgrad, a tensor lr, step hooks, several devices or dtypes in a group, a parameter without a
    gradient, state not yet created) goes through `optimizer.step()`; so does the first step, which
    creates Adam's state."""

    def __init__(self, optimizer: torch.optim.Optimizer):
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
        if tensors is None or _has_step_hooks(self.optimizer):
            self.optimizer.step()
            return
        grads = [[p.grad for p in group.params] for group in tensors.groups]
        if any(g is None for group_grads in grads for g in group_grads):
            self.optimizer.step()  # skips parameters without gradients, as Adam does
            return
        for group, group_grads in zip(tensors.groups, grads):
            options = group.options
            beta1, beta2 = options["betas"]
            kernel = torch._fused_adamw_ if options.get("decoupled_weight_decay") else torch._fused_adam_
            torch._foreach_add_(group.steps, 1)
            kernel(group.params, group_grads, group.exp_avgs, group.exp_avg_sqs, [], group.steps, amsgrad=False,
                   lr=options["lr"], beta1=beta1, beta2=beta2, weight_decay=options["weight_decay"], eps=options["eps"],
                   maximize=options["maximize"])


def _has_step_hooks(optimizer: torch.optim.Optimizer) -> bool:
    """Hooks registered on optimizer.step (its own or global) run only through optimizer.step()."""
    from torch.optim import optimizer as module

    return bool(optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks
                or module._global_optimizer_pre_hooks or module._global_optimizer_post_hooks)


class _GroupTensors(NamedTuple):
    """One parameter group's tensors for the fused kernel, and the group they were read from."""

    options: dict
    params: list
    exp_avgs: list
    exp_avg_sqs: list
    steps: list


class _AdamTensors(NamedTuple):
    """What `FusedAdamStep` hands the fused kernels, with the containers it was read from."""

    param_groups: list
    groups: tuple[_GroupTensors, ...]
    state: dict

    @staticmethod
    def read(optimizer: torch.optim.Optimizer) -> _AdamTensors | None:
        """The tensors of a fused Adam's or AdamW's parameter groups, or None where the direct call
        does not apply (see FusedAdamStep) or the optimizer's state is not yet created."""
        if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
            return None
        groups = []
        for group in optimizer.param_groups:
            if (not group.get("fused") or group.get("capturable") or group["amsgrad"] or group.get("differentiable")
                    or isinstance(group["lr"], torch.Tensor)):
                return None
            params = group["params"]
            if len({(p.device, p.dtype) for p in params}) > 1 or any(p.is_complex() for p in params):
                return None
            states = [optimizer.state.get(p) for p in params]
            if not all(states):
                return None
            groups.append(_GroupTensors(group, params, [s["exp_avg"] for s in states],
                                        [s["exp_avg_sq"] for s in states], [s["step"] for s in states]))
        return _AdamTensors(optimizer.param_groups, tuple(groups), optimizer.state)

    def current(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether these are still the optimizer's own: `load_state_dict` replaces its groups and
        state tensors, `add_param_group` adds a group."""
        if (optimizer.param_groups is not self.param_groups or len(self.param_groups) != len(self.groups)
                or optimizer.state is not self.state):
            return False
        for options, group in zip(self.param_groups, self.groups):
            if options is not group.options:
                return False
            for p, exp_avg, exp_avg_sq, step in zip(group.params, group.exp_avgs, group.exp_avg_sqs, group.steps):
                s = self.state.get(p)
                if s is None or s["exp_avg"] is not exp_avg or s["exp_avg_sq"] is not exp_avg_sq or s["step"] is not step:
                    return False
        return True


def _capture_problem(model: nn.Module, optimizer: torch.optim.Optimizer, compile: bool) -> str | None:
    """Why this step cannot be replayed from a CUDA graph, or None when it can."""
    name = type(optimizer).__name__
    for group in optimizer.param_groups:
        if "capturable" in group and not group["capturable"]:
            return (f"{name} was built with capturable=False, so its step reads host values; build it with "
                    f"{name}(params, ..., capturable=True), or pass cuda_graph=False")
        if "capturable" not in group and not isinstance(optimizer, torch.optim.SGD):
            return f"{name} has no capturable mode; use SGD, or Adam/AdamW with capturable=True, or pass cuda_graph=False"
    if compile:
        return "compile=True: choose one (the graph already replays the whole step)"
    if isinstance(model, DistributedDataParallel):
        return "a DistributedDataParallel model all-reduces from hooks that a graph does not replay; run it eagerly"
    if not all(p.is_cuda for group in optimizer.param_groups for p in group["params"]):
        return "the optimizer's parameters must all be on a CUDA device"
    return None


class TrainStep:
    """`loss = step(batch)`: forward, loss, backward, optimizer step on one batch, for any model.

        step = vae_fast.TrainStep(model, optimizer, loss_fn)   # loss_fn(model, batch) -> scalar loss
        for batch in loader:
            loss = step(batch)   # stays on the device: nothing waits for it

    Each call sets the gradients of the optimizer's parameters to None, calls loss_fn, backpropagates
    its loss, clips the gradients' total norm if asked, and steps the optimizer: what a plain loop
    of `optimizer.zero_grad(); loss_fn(model, batch).backward(); optimizer.step()` does, with the
    same results (bit for bit on the eager path). The model runs in the mode it is in
    (model.train() for dropout and batch norm's batch statistics).

    Args:
        model: the module trained (a DistributedDataParallel one runs eagerly, its all-reduce in the
            backward as usual).
        optimizer: any torch.optim optimizer over the model's parameters. A fused Adam or AdamW
            (fused=True) is stepped by a direct call of its kernels (`FusedAdamStep`).
        loss_fn: (model, batch) -> the loss (a 0-d tensor), or a tuple (loss, *more tensors) whose
            first element is backpropagated.
        cuda_graph: None (default): replay the step from a CUDA graph when the parameters are on CUDA
            and the step can be captured (the optimizer SGD, or Adam/AdamW with capturable=True; not
            DDP, not compile); if a capture fails (loss_fn reads the host), warn once and run
            eagerly. True: the graph or ValueError naming why not; a failed capture raises
            CaptureError. False: always eager.
        compile: run loss_fn through torch.compile (eager path only).
        clip_grad_norm: clip the gradients' total 2-norm to this before each optimizer step
            (`torch.nn.utils.clip_grad_norm_`, which reads no host value, so it is captured too).
        warmup_steps: eager steps run (and undone) before each capture.

    Calling it: `batch` is what loss_fn takes; for the CUDA graph a tensor or a tuple/list of
    tensors, copied into the graph's buffers (a number would be fixed at capture: pass a value that
    changes every step, a KL weight, as a 0-d tensor, or close over a device tensor updated in
    place). Each new shape, dtype or train/eval mode is captured once. Returns what loss_fn
    returned, detached, on the device.

    Raises ValueError for cuda_graph=True where the step cannot be captured (the message says why
    and what to change) or for a batch that is not tensors in graph mode, and CaptureError (a
    RuntimeError) when a capture asked for by cuda_graph=True fails.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable[[nn.Module, Any], Any],
                 *, cuda_graph: bool | None = None, compile: bool = False, clip_grad_norm: float | None = None,
                 warmup_steps: int = 3):
        if clip_grad_norm is not None and not clip_grad_norm > 0:
            raise ValueError(f"TrainStep: clip_grad_norm must be positive, got {clip_grad_norm}")
        problem = _capture_problem(model, optimizer, compile)
        if cuda_graph and problem:
            raise ValueError(f"TrainStep(cuda_graph=True): {problem}")
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = torch.compile(loss_fn) if compile else loss_fn
        self.clip_grad_norm = clip_grad_norm
        self.optimizer_step = FusedAdamStep(optimizer)
        self._required = bool(cuda_graph)
        self._batch_kind: Callable = type  # rebuilds the batch from the graph's input buffers; set per call
        use_graph = cuda_graph if cuda_graph is not None else problem is None
        self._captured = CapturedStep(self._tensors_step, optimizer, model, warmup_steps=warmup_steps) if use_graph else None

    @property
    def cuda_graph(self) -> bool:
        """Whether steps are replayed from a CUDA graph (False after a fall back to eager)."""
        return self._captured is not None

    def _eager_step(self, batch):
        # optimizer.zero_grad(set_to_none=True) without its hooks and grouping; the groups read at
        # every step, as zero_grad does, so that a group added later is reset too
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        result = self.loss_fn(self.model, batch)
        loss = result[0] if isinstance(result, tuple) else result
        loss.backward()
        if self.clip_grad_norm is not None:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
        self.optimizer_step()
        return tuple(t.detach() for t in result) if isinstance(result, tuple) else result.detach()

    def _tensors_step(self, *tensors: torch.Tensor):
        """The eager step on the graph's input buffers, put back in the batch's own shape."""
        return self._eager_step(self._batch_kind(tensors))

    def __call__(self, batch):
        if self._captured is None:
            return self._eager_step(batch)
        tensors = _batch_tensors(batch)
        self._batch_kind = (lambda ts: ts[0]) if torch.is_tensor(batch) else type(batch)
        try:
            outputs = self._captured(*tensors)
        except CaptureError as error:
            if self._required:
                raise
            warnings.warn(f"TrainStep: {error} Running eagerly from now on.", stacklevel=2)
            self._captured = None
            return self._eager_step(batch)
        # the next replay overwrites the graph's own outputs
        return tuple(t.clone() for t in outputs) if isinstance(outputs, tuple) else outputs.clone()


def _batch_tensors(batch) -> tuple[torch.Tensor, ...]:
    if torch.is_tensor(batch):
        return (batch,)
    if isinstance(batch, (tuple, list)) and batch and all(torch.is_tensor(t) for t in batch):
        return tuple(batch)
    kinds = ", ".join(type(t).__name__ for t in batch) if isinstance(batch, (tuple, list)) else type(batch).__name__
    raise ValueError(f"TrainStep with a CUDA graph: the batch must be a tensor or a tuple/list of tensors, got {kinds}; "
                     "pass a value that changes every step as a 0-d tensor (a number would be fixed at capture)")
