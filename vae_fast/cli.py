"""Command line: `vae-fast <command>` or `python -m vae_fast <command>`."""

from __future__ import annotations

import argparse
import json
import sys


def _info(args) -> int:
    from . import backend_info
    from ._info import format_backend_info

    info = backend_info()
    print(json.dumps(info, indent=2) if args.json else format_backend_info(info))
    return 0


def _bench(args) -> int:
    from .bench import run_bench

    return run_bench(args.device, quick=args.quick, out_dir=args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vae-fast", description="Fused VAE kernels: tools around them.")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="which implementation serves each device, and why")
    info.add_argument("--json", action="store_true", help="print the raw dict as JSON")
    info.set_defaults(run=_info)
    bench = commands.add_parser("bench", help="time fused vs eager vs torch.compile: Markdown table, JSON and plot")
    bench.add_argument("--quick", action="store_true", help="the foundation targets' size only, under a minute on a CPU")
    bench.add_argument("--device", choices=["cpu", "cuda"], help="default: the CPU, then CUDA when present")
    bench.add_argument("--out", default="benchmarks/results", help="folder for <device>-<date>.md/.json/.png")
    bench.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
