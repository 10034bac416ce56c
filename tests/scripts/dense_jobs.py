"""2-process jobs of dense upcycling (CPU, gloo), run by ``tests.scripts.suite``: under DDP a dense
Llama becomes a Mixtral mid-fit on both ranks, each on different data. The route between two sharded
fits (FSDP2, ZeRO-3) is ``upcycle_jobs``'s."""


import lightning.pytorch as pl
import torch
from lightning.pytorch import seed_everything

from tests.scripts.ddp_jobs import save
from tests.support.models import TinyMoELM, moe_loader
from tests.support.training import flat_params, trainer
from weightwise.callbacks import DenseUpcycling


class DenseLM(TinyMoELM):
    """TinyMoELM's training step and optimizer (AdamW, a step-wise LR schedule) on a dense Llama."""

    def __init__(self):
        pl.LightningModule.__init__(self)
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
        self.model = LlamaForCausalLM(config)


def dense_upcycling(out_dir: str, method: str) -> None:
    """DenseUpcycling at step 2 of 6 under DDP: the module is re-wrapped for the new parameters."""
    seed_everything(0)
    module = DenseLM()
    callback = DenseUpcycling(at_step=2, num_experts=4, top_k=2, method=method)
    fit = trainer(devices=2, strategy="ddp", max_epochs=2, callbacks=[callback])
    fit.fit(module, moe_loader())
    experts = module.model.model.layers[0].mlp.experts
    result = {
        "params": flat_params(module),
        "class": type(module.model).__name__,
        "steps": fit.global_step,
        "losses": callback.losses,
        "expert_state": fit.optimizers[0].state[experts.gate_up_proj]["exp_avg"].clone(),
    }
    save(out_dir, fit.global_rank, result)

