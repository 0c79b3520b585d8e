"""A whole training step (forward, loss, backward, Adam) captured in a CUDA graph and replayed: one
launch per step instead of a few hundred kernel launches from Python, which at small batches are
most of a GPU step's time (PyTorch's "whole network capture").

Used by `vae-fast train --cuda-graph` and by benchmarks/bench_vae_training.py. What makes it
correct:
- static inputs: each call copies its tensors into buffers the graph reads;
- one graph per input shape: an epoch's last, smaller batch gets a graph of its own (it is trained
  on, not dropped);
- Adam with `capturable=True` keeps its step counts on the device, so the captured update needs no
  host value; its `lr` is a number fixed at capture;
- a value that changes between steps (a KL warm-up's weight) must come in as an input tensor;
- random numbers: the fused reparameterize kernel takes its Philox (seed, offset) from the CUDA
  generator through `at::cuda::philox::unpack`, which a captured kernel reads at replay, and each
  replay advances the generator's offset, so every replay draws fresh noise
  (tests/test_cuda.py::test_cuda_graph_capture_and_replay);
- capturing runs a few warm-up steps on a side stream (CUDA graphs need the allocator and cuBLAS
  warmed up outside the capture); the weights, Adam's state and the CUDA generator's state are put
  back afterwards, so capturing has no effect on training: a run that captures at another point
  (a resumed one) trains the same steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["CapturedStep"]


class CapturedStep:
    """`step(*inputs)`: one optimizer step, replayed from a CUDA graph.

    Args:
        loss_of_batch: (*inputs) -> the loss tensor, or a tuple (loss, *outputs); it must not read
            the host (no .item()) and must take anything that changes from step to step as one of
            the input tensors.
        optimizer: a torch.optim optimizer over the parameters the loss trains, built with
            `capturable=True` (Adam: `vae_fast.train_step.make_optimizer(..., capturable=True)`).
        warmup_steps: eager steps run before each capture (undone afterwards).

    Calling it returns `outputs` (the tuple after the loss, or the loss alone), detached: tensors
    that each replay overwrites, so copy what must outlive the next step.
    Raises ValueError for an optimizer that is not capturable or tensors that are not on CUDA.
    """

    def __init__(self, loss_of_batch: Callable, optimizer: torch.optim.Optimizer, *, warmup_steps: int = 3):
        if not all(group.get("capturable") for group in optimizer.param_groups):
            raise ValueError("CapturedStep: the optimizer must be built with capturable=True (its step count stays on "
                             "the device, so the captured update reads no host value)")
        self.loss_of_batch = loss_of_batch
        self.optimizer = optimizer
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.warmup_steps = warmup_steps
        self.graphs: dict[tuple, tuple[list[torch.Tensor], torch.cuda.CUDAGraph, object]] = {}

    def _step(self, inputs: Sequence[torch.Tensor]):
        result = self.loss_of_batch(*inputs)
        loss, outputs = (result[0], result[1:]) if isinstance(result, tuple) else (result, (result,))
        loss.backward()
        self.optimizer.step()
        # Detached (the same memory, which each replay overwrites): an output that kept its autograd
        # graph alive (the loss itself, when that is what loss_of_batch returns) would keep each
        # parameter's AccumulateGrad node, made on this capture's stream, for the next capture's
        # warm-up on another stream or an eager step: torch then warns of the stream mismatch and
        # synchronizes the two streams in every such backward.
        detached = tuple(t.detach() for t in outputs)
        return detached if isinstance(result, tuple) else detached[0]

    def _capture(self, inputs: Sequence[torch.Tensor]):
        for t in inputs:
            if not t.is_cuda:
                raise ValueError(f"CapturedStep: inputs must be CUDA tensors, got one on {t.device}")
        device = inputs[0].device
        saved_params = [p.detach().clone() for p in self.params]
        saved_state = {id(t): t.clone() for state in self.optimizer.state.values() for t in state.values()
                       if torch.is_tensor(t)}
        saved_rng = torch.cuda.get_rng_state(device)
        static = [t.clone() for t in inputs]
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup_steps):
                self.optimizer.zero_grad(set_to_none=True)
                self._step(static)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # Gradients set to None: the captured backward allocates them in the graph's memory, and
        # every replay writes them afresh instead of accumulating.
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            outputs = self._step(static)
        # In place, so the graph keeps pointing at the same tensors; state Adam created while
        # warming up did not exist before: zero is its fresh value.
        with torch.no_grad():
            for param, saved in zip(self.params, saved_params):
                param.copy_(saved)
            for state in self.optimizer.state.values():
                for t in state.values():
                    if torch.is_tensor(t):
                        t.copy_(saved_state[id(t)]) if id(t) in saved_state else t.zero_()
        torch.cuda.set_rng_state(saved_rng, device)
        return static, graph, outputs

    def __call__(self, *inputs: torch.Tensor):
        key = tuple((t.shape, t.dtype) for t in inputs)
        if key not in self.graphs:
            self.graphs[key] = self._capture(inputs)
        static, graph, outputs = self.graphs[key]
        for buffer, value in zip(static, inputs):
            buffer.copy_(value)
        graph.replay()
        return outputs
