"""The ``weightwise`` command line.

* ``weightwise upcycle IN OUT --factor 2`` grows a saved MoE model from E to 2E experts;
* ``weightwise upcycle --from-dense IN OUT --experts 8 --top-k 2 [--method copy|granular|drop]``
  turns a saved dense Llama/Mistral/Qwen2/Qwen3 model into its MoE class;
* with ``--checkpoint CKPT [--prefix model.]`` the weights come from the checkpoint a Lightning fit
  wrote - a ``.ckpt`` file, a distributed (DCP) directory of ``ModelParallelStrategy``/FSDP, or a
  DeepSpeed ZeRO-1/2/3 directory (:mod:`weightwise.integrations.checkpoints`) - and ``IN`` only gives
  the model's configuration (``config.json``); the model is built, upcycled and written in float32,
  so the fp32 master weights of the checkpoint are kept exactly.

This is the upcycling path for strategies that cannot change parameter shapes mid-fit (DeepSpeed
ZeRO partitions the parameters at engine start, FSDP2 and FSDP shard them and their optimizer
state per rank): train to the step, save a checkpoint, run the command on it, and start the next
fit from the written folder with ``from_pretrained``. The optimizer state does not cross the fits:
the next fit starts a fresh optimizer, as the references' upcycled phases do (Expert Upcycling's
pipeline does not save its optimizer; sparse upcycling, Megatron-LM and Drop-Upcycling start the MoE
phase with a new optimizer).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import torch

from weightwise.experts import expert_utility, find_moe_blocks, upcycle_dense, upcycle_experts
from weightwise.integrations.checkpoints import CheckpointError, load_from_checkpoint


def _load(args: argparse.Namespace) -> torch.nn.Module:
    """The model to upcycle: ``SOURCE`` itself, or its configuration filled from ``--checkpoint``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForCausalLM

    if args.checkpoint is None:
        return AutoModelForCausalLM.from_pretrained(args.source)
    # float32 whatever the config's dtype: the checkpoint's fp32 master weights (ZeRO, FSDP) are kept exactly,
    # and bf16 ones are widened without loss
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.source), dtype=torch.float32)
    kind = load_from_checkpoint(model, args.checkpoint, args.prefix)
    print(f"read the weights of {type(model).__name__} from {args.checkpoint} ({kind} checkpoint, prefix {args.prefix!r})")
    return model


def _upcycle(args: argparse.Namespace) -> None:
    model = _load(args)
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
    utility = None
    if args.selection == "weight-norm":  # the reference configuration's metric: the only one that needs no gradients
        utility = {
            name: expert_utility(block.expert_parameters()["gate_up_proj"], None, "weight_norm")
            for name, block in find_moe_blocks(model).items()
        }
    report = upcycle_experts(
        model,
        args.factor,
        method=args.method,
        selection="uniform" if utility is None else "utility",
        utility=utility,
        cap=args.cap,
        router_noise=args.router_noise,
        generator=torch.Generator().manual_seed(args.seed),
    )
    model.save_pretrained(args.target)
    print(
        f"upcycled {args.source} -> {args.target}: experts {report.num_experts[0]} -> {report.num_experts[1]},"
        f" top-k {report.top_k[0]} -> {report.top_k[1]} ({args.method}; function preserved exactly: {report.exact})"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="weightwise", description="weightwise command-line tools")
    commands = parser.add_subparsers(dest="command", required=True)
    upcycle = commands.add_parser(
        "upcycle",
        help="grow a saved transformers MoE model from E to factor*E experts, or (--from-dense) make a dense model a MoE",
    )
    upcycle.add_argument("source", help="folder written by save_pretrained (with --checkpoint: the model's config.json suffices)")
    upcycle.add_argument("target", help="folder to write the upcycled model to")
    upcycle.add_argument("--factor", type=int, default=2)
    upcycle.add_argument(
        "--method",
        choices=["duplicate", "granular", "copy", "drop"],
        default=None,
        help="MoE: duplicate (default) or granular; --from-dense: copy (default), granular or drop",
    )
    upcycle.add_argument(
        "--checkpoint",
        default=None,
        help="take the weights from this Lightning checkpoint: a .ckpt file, a distributed checkpoint directory"
        " (ModelParallelStrategy/FSDP2, FSDP sharded) or a DeepSpeed checkpoint directory (ZeRO-1/2/3)",
    )
    upcycle.add_argument(
        "--prefix",
        default="model.",
        help="with --checkpoint: the model's attribute in the LightningModule (default 'model.'; '' if it is the model)",
    )
    upcycle.add_argument(
        "--selection",
        choices=["uniform", "weight-norm"],
        default="uniform",
        help="MoE duplicate: m copies of every expert (default), or copies by each expert's weight norm (the Expert"
        " Upcycling reference's default utility metric; greedy, at most --cap extra copies each)",
    )
    upcycle.add_argument("--cap", type=int, default=3, help="--selection weight-norm: most extra copies per expert")
    upcycle.add_argument("--router-noise", type=float, default=0.0, help="relative noise on the copies' router rows")
    upcycle.add_argument("--from-dense", action="store_true", help="SOURCE is a dense Llama/Mistral/Qwen2/Qwen3 model")
    upcycle.add_argument("--experts", type=int, default=8, help="--from-dense: experts per MoE block")
    upcycle.add_argument("--top-k", type=int, default=2, help="--from-dense: experts per token")
    upcycle.add_argument("--granularity", type=int, default=None, help="--from-dense granular: shards per copy (default 2)")
    upcycle.add_argument("--drop-ratio", type=float, default=0.5, help="--from-dense drop: fraction of units re-initialised")
    upcycle.add_argument("--seed", type=int, default=0, help="seed of the router noise, the new routers and re-initialised units")
    args = parser.parse_args(argv)
    if not args.from_dense and args.method in ("copy", "drop"):
        parser.error(f"--method {args.method} needs --from-dense (a MoE model grows by 'duplicate' or 'granular')")
    if args.from_dense and args.method == "duplicate":
        parser.error("--from-dense makes experts by 'copy', 'granular' or 'drop'")
    if args.selection == "weight-norm" and (args.from_dense or args.method == "granular"):
        parser.error("--selection weight-norm chooses copies for --method duplicate of a MoE model")
    try:
        _upcycle(args)
    except CheckpointError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
