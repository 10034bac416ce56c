"""The ``weightwise`` command line. ``weightwise upcycle IN OUT --factor 2`` grows a saved MoE model.

This is the upcycling path for strategies that cannot change parameter shapes mid-fit
(DeepSpeed ZeRO partitions parameters at engine start): stop training, export the model with
``save_pretrained`` (for ZeRO checkpoints, DeepSpeed's ``zero_to_fp32`` first), upcycle the folder,
and start the next phase from the grown model.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from weightwise.experts import upcycle_experts


def _upcycle(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.source)
    report = upcycle_experts(model, args.factor, method=args.method, router_noise=args.router_noise)
    model.save_pretrained(args.target)
    print(
        f"upcycled {args.source} -> {args.target}: experts {report.num_experts[0]} -> {report.num_experts[1]},"
        f" top-k {report.top_k[0]} -> {report.top_k[1]} ({args.method}; function preserved exactly: {report.exact})"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="weightwise", description="weightwise command-line tools")
    commands = parser.add_subparsers(dest="command", required=True)
    upcycle = commands.add_parser("upcycle", help="grow a saved transformers MoE model from E to factor*E experts")
    upcycle.add_argument("source", help="folder written by save_pretrained")
    upcycle.add_argument("target", help="folder to write the upcycled model to")
    upcycle.add_argument("--factor", type=int, default=2)
    upcycle.add_argument("--method", choices=["duplicate", "granular"], default="duplicate")
    upcycle.add_argument("--router-noise", type=float, default=0.0, help="relative noise on the copies' router rows")
    args = parser.parse_args(argv)
    _upcycle(args)


if __name__ == "__main__":
    main()
