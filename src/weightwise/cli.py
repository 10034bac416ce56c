"""The ``weightwise`` command line.

* ``weightwise upcycle IN OUT --factor 2`` grows a saved MoE model from E to 2E experts;
* ``weightwise upcycle --from-dense IN OUT --experts 8 --top-k 2 [--method copy|granular|drop]``
  turns a saved dense Llama/Mistral/Qwen2/Qwen3 model into its MoE class.

This is the upcycling path for strategies that cannot change parameter shapes mid-fit
(DeepSpeed ZeRO partitions parameters at engine start, FSDP shards them): stop training, export the
model with ``save_pretrained`` (for ZeRO checkpoints, DeepSpeed's ``zero_to_fp32`` first), upcycle the
folder, and start the next phase from the grown model.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import torch

from weightwise.experts import upcycle_dense, upcycle_experts


def _upcycle(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.source)
    if args.from_dense:
        method = args.method or "copy"
        moe = upcycle_dense(
            model,
            args.experts,
            args.top_k,
            method=method,
            granularity=args.granularity,
            drop_ratio=args.drop_ratio,
            generator=torch.Generator().manual_seed(args.seed),
        )
        moe.save_pretrained(args.target)
        report = moe.upcycle_report
        print(
            f"upcycled dense {report.source} {args.source} -> {report.target} {args.target}: {report.num_experts} experts,"
            f" top-k {report.top_k}, granularity {report.granularity} ({method}; function preserved exactly: {report.exact})"
        )
        return
    args.method = args.method or "duplicate"
    report = upcycle_experts(model, args.factor, method=args.method, router_noise=args.router_noise)
    model.save_pretrained(args.target)
    print(
        f"upcycled {args.source} -> {args.target}: experts {report.num_experts[0]} -> {report.num_experts[1]},"
        f" top-k {report.top_k[0]} -> {report.top_k[1]} ({args.method}; function preserved exactly: {report.exact})"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="weightwise", description="weightwise command-line tools")
    commands = parser.add_subparsers(dest="command", required=True)
    upcycle = commands.add_parser(
        "upcycle", help="grow a saved transformers MoE model from E to factor*E experts, or (--from-dense) make a dense model a MoE"
    )
    upcycle.add_argument("source", help="folder written by save_pretrained")
    upcycle.add_argument("target", help="folder to write the upcycled model to")
    upcycle.add_argument("--factor", type=int, default=2)
    upcycle.add_argument(
        "--method",
        choices=["duplicate", "granular", "copy", "drop"],
        default=None,
        help="MoE: duplicate (default) or granular; --from-dense: copy (default), granular or drop",
    )
    upcycle.add_argument("--router-noise", type=float, default=0.0, help="relative noise on the copies' router rows")
    upcycle.add_argument("--from-dense", action="store_true", help="SOURCE is a dense Llama/Mistral/Qwen2/Qwen3 model")
    upcycle.add_argument("--experts", type=int, default=8, help="--from-dense: experts per MoE block")
    upcycle.add_argument("--top-k", type=int, default=2, help="--from-dense: experts per token")
    upcycle.add_argument("--granularity", type=int, default=None, help="--from-dense granular: shards per copy (default 2)")
    upcycle.add_argument("--drop-ratio", type=float, default=0.5, help="--from-dense drop: fraction of units re-initialised")
    upcycle.add_argument("--seed", type=int, default=0, help="--from-dense: seed of the routers and re-initialised units")
    args = parser.parse_args(argv)
    if not args.from_dense and args.method in ("copy", "drop"):
        parser.error(f"--method {args.method} needs --from-dense (a MoE model grows by 'duplicate' or 'granular')")
    if args.from_dense and args.method == "duplicate":
        parser.error("--from-dense makes experts by 'copy', 'granular' or 'drop'")
    _upcycle(args)


if __name__ == "__main__":
    main()
