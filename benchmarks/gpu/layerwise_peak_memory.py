"""Peak training memory of full fine-tuning vs LoRA vs LISA vs IST on one decoder model (issue 4).

The default model has TinyLlama-1.1B's shape (22 layers, hidden 2048, 32k vocabulary; 1.1B
parameters), randomly initialised - no download - since memory does not depend on the values.
Each method trains ``--steps`` steps with a real Lightning ``Trainer`` (AdamW, ``bf16-mixed``);
reported per method: peak CUDA memory allocated (and reserved by the caching allocator) during
the fit, Adam state and trainable parameters. LISA/IST use ``LayerwiseSampling(n_layers=2,
interval=2)`` so that the active layers change during the measurement.

GPU:  python benchmarks/gpu/layerwise_peak_memory.py                 (run by benchmarks/gpu/check.sh)
      python benchmarks/gpu/layerwise_peak_memory.py --strategy deepspeed_stage_2   (also run by check.sh)
CPU smoke run (tested; no peak memory):  python benchmarks/gpu/layerwise_peak_memory.py --tiny
Goals: LISA/IST peak <= LoRA peak + 10% and <= 50% of full fine-tuning (issue 4); <= 35% of full
(issue 13, with the frozen embeddings/head, bf16 frozen layers and checkpointing of lisa_layers_bf16_ckpt).
"""

from __future__ import annotations

import argparse
import gc
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from weightwise.callbacks import LayerwiseSampling  # noqa: E402
from weightwise.layers.freezing import optimizer_state_bytes  # noqa: E402

# LayerwiseSampling's options per method: the published LISA/IST, then LISA at LoRA's memory (issue 13:
# embeddings and head frozen, frozen layers in bf16 with fp32 masters of the active ones on the host,
# and, with "_ckpt", activation checkpointing of every decoder layer).
SAMPLING = {
    "lisa": dict(policy="lisa"),
    "ist": dict(policy="ist"),
    "lisa_layers_bf16": dict(policy="lisa", train_outside_stack=False, frozen_dtype=torch.bfloat16),
    "lisa_layers_bf16_ckpt": dict(policy="lisa", train_outside_stack=False, frozen_dtype=torch.bfloat16),
}
METHODS = ("full", "lora", *SAMPLING)
MIB = 2**20
SHAPES = {
    "1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, vocab_size=256),
}


class Decoder(pl.LightningModule):
    def __init__(self, shape: dict, method: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = LlamaForCausalLM(LlamaConfig(**shape))
        if method == "lora":
            self.model = get_peft_model(self.model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        if method.endswith("_ckpt"):
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-5)


class Peak(pl.Callback):
    """Adam state and trainable parameters at the end of the fit (what the active layers cost)."""

    def on_train_end(self, trainer, pl_module):
        self.state_mib = optimizer_state_bytes(trainer.optimizers[0]) / MIB
        self.trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)


def measure(method: str, args: argparse.Namespace, accelerator: str) -> dict:
    shape = SHAPES["tiny" if args.tiny else "1.1b"]
    batches = torch.randint(0, shape["vocab_size"], (args.steps * args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    callbacks = [Peak()]
    if method in SAMPLING:
        options = dict(SAMPLING[method])
        if args.strategy.startswith("deepspeed"):
            # DeepSpeed's bf16 stores every parameter in bf16 and keeps the fp32 masters itself
            # (LayerwiseSampling refuses frozen_dtype there): the same memory layout without the option.
            options.pop("frozen_dtype", None)
        callbacks.append(LayerwiseSampling(**options, n_layers=2, interval=2, optimizer_state="release"))
    module = Decoder(shape, method)
    gpu = accelerator == "gpu"
    if gpu:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    pl.Trainer(
        accelerator=accelerator, devices=1, strategy=args.strategy, precision="bf16-mixed", max_steps=args.steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    ).fit(module, DataLoader(batches, batch_size=args.batch))
    return {
        "method": method, "parameters": sum(p.numel() for p in module.parameters()), "trainable_at_end": callbacks[0].trainable,
        "adam_state_mib": callbacks[0].state_mib,
        "peak_allocated_mib": torch.cuda.max_memory_allocated() / MIB if gpu else None,
        "peak_reserved_mib": torch.cuda.max_memory_reserved() / MIB if gpu else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model (CPU smoke run)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--strategy", default="auto", help="e.g. deepspeed_stage_2 (GPU only)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    rows = []
    for method in args.methods.split(","):
        rows.append(measure(method, args, accelerator))
        print(f"measured: {rows[-1]}", flush=True)  # kept if a later method fails
    device = torch.cuda.get_device_name() if accelerator == "gpu" else "cpu"
    print(f"\n{device}; strategy {args.strategy}; {rows[0]['parameters'] / 1e6:,.1f}M parameters; batch {args.batch} x {args.seq}; bf16-mixed; {args.steps} steps")
    print("| method | trainable at end | Adam state MiB | peak allocated MiB | peak reserved MiB |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        peaks = ["-" if r[k] is None else f"{r[k]:.0f}" for k in ("peak_allocated_mib", "peak_reserved_mib")]
        print(f"| {r['method']} | {r['trainable_at_end'] / 1e6:.1f}M | {r['adam_state_mib']:.0f} | {' | '.join(peaks)} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
