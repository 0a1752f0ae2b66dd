"""Command-line entry: ``moba bench`` (the main job)."""
from __future__ import annotations

import argparse


def main(argv=None):
    parser = argparse.ArgumentParser(prog="moba", description="Mixture of Block Attention tools")
    sub = parser.add_subparsers(dest="cmd", required=True)
    from .bench import add_arguments, main_bench
    b = sub.add_parser("bench", help="compare MoBA with dense causal attention (SDPA) across lengths",
                       description="MoBA against dense causal attention (SDPA) across sequence lengths, with defaults "
                                   "for the CPU and for a GPU. The GPU's named kernel and decode cases, recorded "
                                   "per commit, are benchmarks/run.py's.")
    add_arguments(b)
    args = parser.parse_args(argv)
    if args.cmd == "bench":
        main_bench(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
