"""`vae-fast bench`: the fused ops against eager PyTorch and torch.compile, measured interleaved in
one process, reported as a Markdown table, a JSON file and a plot.

    timing.py    how: interleaved rounds, host clock or CUDA events, copy bandwidth
    cases.py     what: the ops' cases, their rotating inputs and ideal bytes
    training.py  the whole training step of the PyTorch examples' VAE vs vae_fast.VAE
    runner.py    the plan (full or quick) and the measurement of one device
    report.py    Markdown, JSON and the foundation targets
    plot.py      speedup vs batch size
"""

from .runner import Plan, measure, run_bench

__all__ = ["Plan", "measure", "run_bench"]
