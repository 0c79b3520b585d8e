"""The CUDA-graph mode of `vae_fast.TrainStep`: the whole step (forward, loss, backward, clipping,
optimizer) captured in a CUDA graph and replayed, one launch per step instead of a few hundred
kernel launches from Python, which at small batches are most of a GPU step's time (PyTorch's
"whole network capture").

What makes it correct:
- static inputs: each call copies its tensors into buffers the graph reads;
- one graph per input shape and dtype (and per model.train()/eval()): an epoch's last, smaller
  batch gets a graph of its own (it is trained on, not dropped);
- the optimizer reads no host value: Adam/AdamW with `capturable=True` keep their step counts on
  the device; its `lr` (and every other number of its groups) and its state tensors are fixed in a
  graph at capture, so a change (a scheduler's, `load_state_dict`) drops the graphs and the next
  step captures again;
- a value that changes between steps (a KL warm-up's weight) must come in as an input tensor, or
  be a device tensor that the caller updates in place;
- random numbers: torch's CUDA generator (and the fused reparameterize kernel, through
  `at::cuda::philox::unpack`) give a captured kernel its Philox offset at replay, and each replay
  advances the generator, so every replay draws fresh noise
  (tests/test_cuda.py::test_cuda_graph_capture_and_replay);
- capturing runs a few warm-up steps on a side stream (CUDA graphs need the allocator and cuBLAS
  warmed up outside the capture); the weights, the model's buffers (batch norm's running
  statistics), the optimizer's state and the CUDA generator's state are put back afterwards, also
  when the capture fails, so capturing has no effect on training: a run that captures at another
  point (a resumed one) trains the same steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["CapturedStep", "CaptureError"]


class CaptureError(RuntimeError):
    """The step could not be captured in a CUDA graph (it reads a value on the host, or its shapes
    depend on the data); the training state is as it was before the attempt."""


class CapturedStep:
    """`step(*inputs)`: one optimizer step, replayed from a CUDA graph.

    Args:
        step_of_batch: (*inputs) -> outputs (a tensor or a tuple of tensors): one whole eager step
            whose gradients start at None (forward, loss, backward, optimizer step). It must not read
            the host (no .item()) and must take anything that changes from step to step as one of
            the input tensors.
        optimizer: the optimizer the step updates; its state is put back after the warm-up.
        model: the module trained; its buffers are put back after the warm-up, and its train/eval
            mode is part of a graph's key.
        warmup_steps: eager steps run before each capture (undone afterwards).

    Calling it returns `outputs`, detached: tensors that each replay overwrites, so copy what must
    outlive the next step. Raises ValueError for inputs that are not CUDA tensors and CaptureError
    when the step cannot be captured.
    """

    def __init__(self, step_of_batch: Callable, optimizer: torch.optim.Optimizer, model: nn.Module, *,
                 warmup_steps: int = 3):
        self.step_of_batch = step_of_batch
        self.optimizer = optimizer
        self.model = model
        self.warmup_steps = warmup_steps
        self.graphs: dict[tuple, tuple[list[torch.Tensor], torch.cuda.CUDAGraph, object]] = {}
        self._settings: list | None = None

    def _optimizer_settings(self) -> list:
        """What a graph holds as it was at capture: the optimizer's numbers (lr, betas, weight decay,
        ...) and its state tensors, which `load_state_dict` replaces."""
        numbers = [(k, id(v) if torch.is_tensor(v) else v) for group in self.optimizer.param_groups
                   for k, v in group.items() if k != "params"]
        return numbers + [id(t) for state in self.optimizer.state.values() for t in state.values()]

    def _step(self, inputs: Sequence[torch.Tensor]):
        outputs = self.step_of_batch(*inputs)
        # Detached (the same memory, which each replay overwrites): an output that kept its autograd
        # graph alive (the loss itself) would keep each parameter's AccumulateGrad node, made on this
        # capture's stream, for the next capture's warm-up on another stream or an eager step: torch
        # then warns of the stream mismatch and synchronizes the two streams in every such backward.
        if isinstance(outputs, tuple):
            return tuple(t.detach() for t in outputs)
        return outputs.detach()

    def _training_state(self) -> list[torch.Tensor]:
        """Every tensor a step changes in place: weights, buffers, the optimizer's state."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        state = [t for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        return [*params, *self.model.buffers(), *state]

    def _capture(self, inputs: Sequence[torch.Tensor]):
        for t in inputs:
            if not t.is_cuda:
                raise ValueError(f"CapturedStep: inputs must be CUDA tensors, got one on {t.device}")
        device = inputs[0].device
        saved = {id(t): t.detach().clone() for t in self._training_state()}
        saved_rng = torch.cuda.get_rng_state(device)
        try:
            return self._warm_up_and_capture(inputs, device)
        except Exception as error:
            raise CaptureError(
                f"the training step could not be captured in a CUDA graph ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}). A captured step must not read values on the host "
                "(.item(), float(t), `if t:`) nor make shapes from the data (nonzero, boolean masks); make loss_fn "
                "device-only, or pass cuda_graph=False") from error
        finally:
            # In place, so a graph keeps pointing at the same tensors; optimizer state created while
            # warming up did not exist before: zero is its fresh value.
            with torch.no_grad():
                for t in self._training_state():
                    t.copy_(saved[id(t)]) if id(t) in saved else t.zero_()
            torch.cuda.set_rng_state(saved_rng, device)

    def _warm_up_and_capture(self, inputs: Sequence[torch.Tensor], device: torch.device):
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
        return static, graph, outputs

    def __call__(self, *inputs: torch.Tensor):
        if self._optimizer_settings() != self._settings:
            # a scheduler changed the lr, or load_state_dict the state: a graph would replay the old
            self.graphs.clear()
        key = (self.model.training, *((t.shape, t.dtype) for t in inputs))
        if key not in self.graphs:
            self.graphs[key] = self._capture(inputs)
            self._settings = self._optimizer_settings()
        static, graph, outputs = self.graphs[key]
        for buffer, value in zip(static, inputs):
            buffer.copy_(value)
        graph.replay()
        return outputs
