"""Command line: `vae-fast <command>` or `python -m vae_fast <command>`."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path


def _info(args) -> int:
    from . import backend_info
    from ._info import format_backend_info

    info = backend_info()
    print(json.dumps(info, indent=2) if args.json else format_backend_info(info))
    return 0


def _positive_ints(flag: str):
    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(part) for part in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes comma-separated whole numbers, got {text!r}") from None
        if any(v < 1 for v in values):
            raise argparse.ArgumentTypeError(f"{flag} values must be at least 1, got {text!r}")
        return values

    return parse


BENCH_DTYPES = ("float32", "bfloat16", "float16")


def _bench_dtypes(text: str):
    import torch

    names = tuple(text.split(","))
    unknown = [n for n in names if n not in BENCH_DTYPES]
    if unknown:
        raise argparse.ArgumentTypeError(f"--dtypes: unknown {', '.join(unknown)} (choose from {', '.join(BENCH_DTYPES)})")
    return tuple(getattr(torch, n) for n in names)


def _bench_modes(text: str) -> tuple[str, ...]:
    modes = tuple(text.split(","))
    unknown = [m for m in modes if m not in ("warm", "cold")]
    if unknown:
        raise argparse.ArgumentTypeError(f"--modes: unknown {', '.join(unknown)} (choose from warm, cold)")
    return modes


def _bench_ops(text: str) -> tuple[tuple[str, str], ...]:
    """op:pass pairs of the bench's op cases, e.g. loss_probs:fwd+bwd."""
    from .bench.runner import OP_PASSES

    pairs = tuple(tuple(part.split(":", 1)) for part in text.split(","))
    unknown = [":".join(p) for p in pairs if p not in OP_PASSES]
    if unknown:
        choices = ", ".join(f"{op}:{pass_}" for op, pass_ in OP_PASSES)
        raise argparse.ArgumentTypeError(f"--ops: unknown {', '.join(unknown)} (choose from {choices})")
    return pairs


def _bench(args) -> int:
    from .bench import run_bench

    selection = {key: getattr(args, key) for key in ("batches", "latents", "dtypes", "training_batches", "modes")
                 if getattr(args, key) is not None}
    if args.ops is not None:
        selection["op_passes"] = args.ops
        selection.setdefault("training_batches", ())  # --ops alone: no training-step rows
    return run_bench(args.device, quick=args.quick, out_dir=args.out, threads=args.threads, selection=selection,
                     baseline_python=args.baseline_python)


def _device(args) -> str:
    """--device, or cuda where a GPU is present and else the CPU, checked before anything is built
    on it: a device torch knows, of a type this machine has (the CPU, or its accelerator: cuda
    where a GPU is), with an index below the count. Raises ValueError, one line naming --device;
    torch's own errors for these came as tracebacks from the first tensor moved there."""
    import torch

    if args.device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r} is not a device torch knows: use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return args.device
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    if accelerator is None or accelerator.type != device.type:
        present = "only the CPU" if accelerator is None else f"the CPU and {accelerator.type}"
        raise ValueError(f"--device {args.device}: this machine has no {device.type} device (torch sees {present}); "
                         "use --device cpu")
    count = torch.accelerator.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(f"--device {args.device}: this machine has {count} {device.type} device(s), "
                         f"{device.type}:0 to {device.type}:{count - 1}")
    return args.device


# Exit status after Ctrl-C: 128 + SIGINT, what a shell reports for a process that SIGINT killed, so
# scripts and schedulers see "interrupted", distinct from success (0) and user errors (2).
EXIT_INTERRUPTED = 130


def _report_user_errors(command: str, run) -> int:
    """Run a command; a user-facing error (bad argument, data, checkpoint, diverged loss, a file
    that cannot be written) becomes one line on stderr and exit status 2 instead of a traceback.
    Ctrl-C becomes one line too (for `train`, naming the checkpoint saved) and exit status 130."""
    from .training import TrainingDiverged, TrainingInterrupted

    try:
        run()
    except (ValueError, OSError, TrainingDiverged) as error:
        print(f"vae-fast {command}: error: {error}", file=sys.stderr)
        return 2
    except TrainingInterrupted as interrupt:  # train saved a checkpoint first
        print(f"vae-fast {command}: {interrupt}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C while train was saving
        print(f"vae-fast {command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


# Settings that shape the run itself (KL schedule, data split and order, dequantization, the kind
# of model and its likelihood): a resumed run takes them from its checkpoint, so `--resume PATH`
# alone continues exactly; a flag that says otherwise is an error, not a silent change mid-run. A
# checkpoint from before a setting existed holds its default.
_RUN_SETTINGS = {
    "beta": ("--beta", 1.0), "kl_warmup": ("--kl-warmup", 0.0), "seed": ("--seed", 0), "dequantize": ("--dequantize", False),
    "model": ("--model", "mlp"), "likelihood": ("--likelihood", "bernoulli"), "learn_scale": ("--learn-scale", "none"),
    "dispersion": ("--dispersion", None), "layer": ("--layer", None),
    "channels": ("--channels", (32, 64)), "latent_dim": ("--latent-dim", 20), "hidden_dims": ("--hidden-dims", (400,)),
    "batch_size": ("--batch-size", 128),  # which rows each step trains on
    # How the step is computed: each changes the arithmetic (fused kernels, bfloat16, a graph's
    # capturable Adam), so a resumed run keeps the checkpoint's to stay exact.
    "compile": ("--compile", False), "bf16": ("--bf16", False), "cuda_graph": ("--cuda-graph", None),
}
# A checkpoint without the setting was trained before it existed: eagerly (a new run's default,
# None, leaves the choice to vae_fast.training, which keeps the graph off unless asked for).
_BEFORE_THE_SETTING = {"cuda_graph": False}


def _settle_run_settings(args) -> None:
    saved = {}
    if args.resume:
        from .checkpoints import load_checkpoint

        saved = load_checkpoint(args.resume).get("train_config", {})
        saved = {**_BEFORE_THE_SETTING, **saved}
    for name, (flag, default) in _RUN_SETTINGS.items():
        given, stored = getattr(args, name), saved.get(name)
        if isinstance(given, list) or isinstance(stored, list):  # --channels, --hidden-dims (argparse's lists, the checkpoint's)
            given, stored = (None if v is None else tuple(v) for v in (given, stored))
        if given is None:
            setattr(args, name, stored if stored is not None else default)
        elif stored is not None and given != stored:
            raise ValueError(
                f"{flag} {_shown(given)} differs from the {_shown(stored)} that {args.resume} was trained with; a resumed "
                f"run continues exactly: drop {flag} (the checkpoint's value is used), or start a new run")
        else:
            setattr(args, name, given)


def _shown(value) -> str:
    """A setting as it is typed: --channels 32 64, --dequantize True."""
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _train_dataset(args) -> str:
    """--dataset, else what --data-file is: a count file (.h5ad, .npz; a .npy under a count
    likelihood) is the "counts" set, another .npy the "npy" one; without either, digits."""
    from .count_data import COUNT_FILE_SUFFIXES
    from .model import COUNT_LIKELIHOODS

    if args.dataset is not None:
        return args.dataset
    if args.data_file is None:
        return "digits"
    suffix = Path(args.data_file).suffix
    if suffix in COUNT_FILE_SUFFIXES and (suffix != ".npy" or args.likelihood in COUNT_LIKELIHOODS):
        return "counts"
    return "npy"


def _check_count_flags(args) -> None:
    """--dispersion only with nb/zinb (VAE's own check names its argument, not the flag)."""
    if args.dispersion is not None and args.likelihood not in ("nb", "zinb"):
        raise ValueError(f"--dispersion {args.dispersion} needs --likelihood nb or zinb (got {args.likelihood}): "
                         "the other likelihoods have no dispersion")


@contextlib.contextmanager
def _process_group_of_this_command():
    """Under torchrun, train() joins a process group; the command is the process, so it leaves the
    group before the interpreter exits. Left to interpreter teardown, gloo's worker threads can be
    destroyed while joinable, and a rank dies of SIGABRT ("terminate called without an active
    exception", pytorch/pytorch#190489) after training and its checkpoint went well. After a
    normal end the ranks meet first, so that none closes its connections under another's last
    collective; after an error they leave at once (a barrier could wait on a rank that is gone)."""
    import torch.distributed as dist

    available = dist.is_available()
    ours = available and not dist.is_initialized()
    try:
        yield
    except BaseException:
        if ours and dist.is_initialized():
            dist.destroy_process_group()
        raise
    if ours and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _train(args) -> int:
    from .model import COUNT_LIKELIHOODS
    from .training import TrainConfig, train

    def run():
        _settle_run_settings(args)
        _check_count_flags(args)
        # plots.py draws images and per-feature scatter plots, not pictures of counts yet: off by
        # default for count models (thousands of genes would be thousands of panels).
        images = args.images if args.images is not None else args.likelihood not in COUNT_LIKELIHOODS
        config = TrainConfig(
            dataset=_train_dataset(args), data_dir=args.data_dir, data_file=args.data_file, layer=args.layer,
            dequantize=args.dequantize, images=images, dispersion=args.dispersion,
            model=args.model, likelihood=args.likelihood, learn_scale=args.learn_scale, channels=tuple(args.channels),
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, latent_dim=args.latent_dim,
            hidden_dims=tuple(args.hidden_dims), beta=args.beta, kl_warmup=args.kl_warmup, device=_device(args),
            seed=args.seed, out=args.out, resume=args.resume, compile=args.compile, bf16=args.bf16,
            cuda_graph=args.cuda_graph, progress=not args.quiet,
        )
        with _process_group_of_this_command():
            train(config)
        if not args.quiet:
            print(f"metrics, checkpoint and images in {args.out}/")

    return _report_user_errors("train", run)


def _eval(args) -> int:
    from .evaluation import evaluate_checkpoint

    def run():
        result = evaluate_checkpoint(args.checkpoint, samples=args.samples, dataset=args.dataset, data_dir=args.data_dir,
                                     data_file=args.data_file, layer=args.layer, device=_device(args))
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"{result['dataset']}, {result['held_out_samples']} held-out samples: negative ELBO {result['negative_elbo']:.3f} "
                  f"nats (recon {result['recon']:.3f}, KL {result['kl']:.3f}); "
                  f"IWAE log p(x) >= {result['iwae_log_likelihood']:.3f} nats (K={result['iwae_samples']})")

    return _report_user_errors("eval", run)


def _sample(args) -> int:
    from .count_data import write_count_samples, writes_count_samples
    from .plots import write_samples

    def run():
        if args.n < 1:  # before the checkpoint is read, as for every other model
            raise ValueError(f"--n must be positive, got {args.n}")
        if writes_count_samples(args.checkpoint, args.out, args.library_size):
            path = write_count_samples(args.checkpoint, args.out, n=args.n, seed=args.seed, device=_device(args),
                                       library_size=args.library_size)
        else:
            path = write_samples(args.checkpoint, args.out, n=args.n, seed=args.seed, device=_device(args))
        print(f"wrote {path}")

    return _report_user_errors("sample", run)


def _add_workflow_commands(commands) -> None:
    """train, eval and sample: the VAE workflow around vae_fast.VAE and vae_fast.ConvVAE."""
    # The choices, without importing torch's heavier parts at parse time: data and model are light.
    from .data import DATASETS
    from .model import DISPERSIONS, LEARN_SCALES, LIKELIHOODS

    train = commands.add_parser(
        "train", help="train a vae_fast.VAE or ConvVAE; metrics, checkpoints and images in --out",
        description="Train a VAE. Image data (digits, mnist, npy images) writes reconstructions.png, samples.png, "
                    "interpolation.png, manifold.png (L=2), latent.png and loss_curves.png; tabular data (wine, "
                    "breast-cancer, diabetes, real-valued npy rows) writes feature_reconstructions.png (held-out "
                    "reconstructions against truth per feature, with R^2), samples.png (a heatmap), latent.png and "
                    "loss_curves.png. Gaussian/Laplace means are clipped to [0, 1] in the image grids.")
    train.add_argument("--dataset", choices=list(DATASETS), default=None,
                       help="default: what --data-file is (counts for .h5ad/.npz, or .npy with a count --likelihood; "
                            "else npy), digits without one. "
                            "digits: scikit-learn's bundled 8x8 digits (offline); mnist: IDX files in --data-dir "
                            "(downloaded when missing), grey levels pixel/255, modelled as continuous values by "
                            "--likelihood gaussian|laplace; npy: the array in --data-file; wine, breast-cancer, "
                            "diabetes: scikit-learn's bundled tabular sets (offline), standardized with the training "
                            "split's mean and std (continuous: use --likelihood gaussian or laplace); counts: the "
                            "count matrix [cells, genes] in --data-file (.h5ad, .npy, .npz); digits-counts: the digits' "
                            "raw pixel counts 0..16 (offline; --likelihood poisson, nb or zinb)")
    train.add_argument("--data-dir", help="folder of the MNIST IDX files, .gz or raw")
    train.add_argument("--data-file", help="a .npy array: images [N, H, W] or rows [N, D], uint8 or floats in [0, 1]; "
                                           "rows of any finite real values are continuous tabular data; or counts "
                                           "[cells, genes] in a .h5ad (AnnData), .npy or .npz (dense or scipy sparse)")
    train.add_argument("--layer", help="--dataset counts from a .h5ad: the AnnData layer holding the raw counts "
                                       "(default: X); the checkpoint's on --resume")
    train.add_argument("--dequantize", action=argparse.BooleanOptionalAction, default=None,
                       help="uniform dequantization of grey levels (digits, mnist, uint8 npy): level k becomes "
                            "(k + u) / levels, u ~ U[0, 1), fresh for every training batch; the held-out set is "
                            "dequantized once (seeded). For gaussian/laplace; recommended with a learned scale, "
                            "which otherwise shrinks towards 0 on pixels that are always 0. Default off, or the "
                            "checkpoint's on --resume")
    train.add_argument("--model", choices=["mlp", "conv"], default=None,
                       help="mlp: vae_fast.VAE (default); conv: vae_fast.ConvVAE, strided convolutions (image data); "
                            "the checkpoint's on --resume")
    train.add_argument("--likelihood", choices=list(LIKELIHOODS), default=None,
                       help="the decoder's p(x|z): bernoulli (default; data in [0, 1]), gaussian or laplace (any real "
                            "data), or for counts poisson, nb (negative binomial) or zinb (zero-inflated NB), scVI's "
                            "model (docs/counts.md); the checkpoint's on --resume")
    train.add_argument("--dispersion", choices=list(DISPERSIONS), default=None,
                       help="nb/zinb: the inverse dispersion theta, one learned value per gene (gene, default) or a "
                            "decoder head per cell and gene (gene-cell); the checkpoint's on --resume")
    train.add_argument("--learn-scale", choices=list(LEARN_SCALES), default=None,
                       help="gaussian/laplace scale: none (fixed 1, default), shared (one learned value) or feature "
                            "(one learned value per feature); logged per epoch as 'scale'; the checkpoint's on --resume")
    train.add_argument("--channels", type=int, nargs="+", default=None,
                       help="--model conv: encoder channels per stride-2 layer (default 32 64); the decoder mirrors "
                            "them; the checkpoint's on --resume")
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument("--batch-size", type=int, default=None,
                       help="global batch, split across torchrun processes; default 128, or the checkpoint's on --resume")
    train.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (taken from the checkpoint on --resume)")
    train.add_argument("--latent-dim", type=int, default=None, help="size of z; default 20, or the checkpoint's on --resume")
    train.add_argument("--hidden-dims", type=int, nargs="+", default=None,
                       help="--model mlp: encoder hidden widths, the decoder mirrors them; default 400, or the checkpoint's on --resume")
    train.add_argument("--beta", type=float, default=None, help="weight of the KL term (beta-VAE); default 1, or the checkpoint's on --resume")
    train.add_argument("--kl-warmup", type=float, default=None, metavar="EPOCHS",
                       help="ramp the KL weight from 0 to --beta over this many epochs; default 0, or the checkpoint's on --resume")
    train.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when present)")
    train.add_argument("--seed", type=int, default=None, help="weights, data split and order, noise; default 0, or the checkpoint's on --resume")
    train.add_argument("--out", default="runs/vae", help="folder for metrics.csv/json, checkpoint.pt and the PNG images")
    train.add_argument("--resume", metavar="CKPT", help="continue from this checkpoint, exactly")
    train.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                       help="replay the whole training step (forward, loss, backward, Adam) from a CUDA graph: one "
                            "launch per step; default off (not yet run on a GPU), or the checkpoint's on --resume; "
                            "an error on the CPU and under torchrun")
    train.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="torch.compile the model and loss (compile time ~20 s; not faster on a 2-core AVX2 CPU, "
                            "measured); default off, or the checkpoint's on --resume")
    train.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                       help="bfloat16 autocast of the forward (fast only where the CPU has bf16 instructions, "
                            "AVX512-BF16/AMX, or on a GPU; 6x slower on an AVX2 CPU); default off, or the checkpoint's "
                            "on --resume")
    train.add_argument("--images", action=argparse.BooleanOptionalAction, default=None,
                       help="write the PNG pictures at the end (default: on, off for count likelihoods)")
    train.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("eval", help="held-out negative ELBO and IWAE log-likelihood of a checkpoint "
                                                "(any model and likelihood, read from the checkpoint)")
    evaluate.add_argument("checkpoint")
    evaluate.add_argument("--samples", type=int, default=1000, help="K, importance samples per input")
    evaluate.add_argument("--dataset", choices=list(DATASETS), help="default: the one the checkpoint was trained on")
    evaluate.add_argument("--data-dir")
    evaluate.add_argument("--data-file")
    evaluate.add_argument("--layer", help="with --data-file: the .h5ad layer holding the counts (default: X)")
    evaluate.add_argument("--device")
    evaluate.add_argument("--json", action="store_true", help="print the numbers as JSON")
    evaluate.set_defaults(run=_eval)

    sample = commands.add_parser("sample", help="samples from a checkpoint's prior: a PNG grid of images (a heatmap for "
                                                "tabular data), or a .npy array")
    sample.add_argument("checkpoint")
    sample.add_argument("--n", type=int, default=64)
    sample.add_argument("--out", default="samples.png", help="a .png picture, or a .npy file for the values (decoded means); "
                                                             "a count model draws counts, also to a .h5ad (AnnData)")
    sample.add_argument("--library-size", type=float,
                        help="count models: the total count of each drawn cell (default: the training data's median)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--device")
    sample.set_defaults(run=_sample)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vae-fast", description="Fused VAE kernels: tools around them.")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="which implementation serves each device, and why")
    info.add_argument("--json", action="store_true", help="print the raw dict as JSON")
    info.set_defaults(run=_info)
    _add_workflow_commands(commands)
    bench = commands.add_parser("bench", help="time fused vs eager vs torch.compile: Markdown table, JSON and plot")
    bench.add_argument("--quick", action="store_true", help="the foundation targets' size only, under a minute on a CPU")
    bench.add_argument("--device", choices=["cpu", "cuda"], help="default: the CPU, then CUDA when present")
    bench.add_argument("--out", default="benchmarks/results", help="folder for <device>-<date>.md/.json/.png")
    bench.add_argument("--threads", type=int, help="torch CPU threads (default: torch's); fewer on a busy machine")
    bench.add_argument("--batches", type=_positive_ints("--batches"), help="only these batch sizes, e.g. 128,65536")
    bench.add_argument("--latents", type=_positive_ints("--latents"), help="only these latent sizes, e.g. 64")
    bench.add_argument("--dtypes", type=_bench_dtypes, help="only these dtypes, e.g. float32 (CPU runs float32 only)")
    bench.add_argument("--training-batches", type=_positive_ints("--training-batches"),
                       help="training-step batch sizes, e.g. 128,1024")
    bench.add_argument("--ops", type=_bench_ops,
                       help="only these op cases, e.g. loss_probs:fwd+bwd,reparameterize:fwd+bwd (training steps "
                            "then only with --training-batches)")
    bench.add_argument("--modes", type=_bench_modes,
                       help="warm (the same inputs every call), cold (inputs rotated through 4x the last-level "
                            "cache), or warm,cold (the default)")
    bench.add_argument("--baseline-python", metavar="PYTHON",
                       help="time the eager and torch.compile baselines in this interpreter (another environment, "
                            "e.g. one with torch's CPU build, whose compiler is faster on CPU), side by side with "
                            "the fused kernels on the same inputs; CPU only; training steps stay in this process")
    bench.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
