"""2-process DDP (or ZeRO, FSDP2: ``strategy``, see ``sharded_language_jobs``) jobs of token weighting (CPU,
gloo), run by ``tests.scripts.suite``; each rank saves what it selected and trained
(``tests/distributed/test_token_ddp.py``, ``test_sharded_language_callbacks.py``).

The ranks get different data: Lightning's DistributedSampler deals the rows of
``padded_token_batches`` alternately, and every other row is padded, so rank 1 holds fewer valid
tokens than rank 0 - a rank-local denominator or selection would show.
"""

from pathlib import Path

import torch
from lightning.pytorch import seed_everything

from tests.scripts.sharded_language_jobs import for_strategy, layout, strategy_for, whole_parameters
from tests.support.models import TokenLossLM, padded_token_batches
from tests.support.training import trainer
from weightwise.callbacks import SelectiveTokens, TokenWeighting

ROWS, ROWS_PER_RANK, ACCUMULATE, STEPS = 16, 2, 2, 2


def reference_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    return LlamaForCausalLM(config)


class RecordedSelection(SelectiveTokens):
    """SelectiveTokens that keeps each micro-batch's excess losses, mask and selection (this rank's)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def token_weights(self, token_losses, mask, batch, trainer):
        selected = super().token_weights(token_losses, mask, batch, trainer)
        reference, _ = self.reference_losses(batch)
        self.seen.append({"scores": token_losses - reference, "mask": mask.clone(), "selected": selected.bool()})
        return selected


def make_callback(method: str):
    return RecordedSelection(reference_model()) if method == "rho1" else TokenWeighting("dft")


def token_weighting(out_dir: str, method: str, strategy: str = "ddp") -> None:
    """``method`` ("rho1" or "dft") under ``strategy`` (``sharded_language_jobs.strategy_for``) with gradient accumulation."""
    seed_everything(0)
    module, callback = for_strategy(TokenLossLM)(), make_callback(method)
    fit = trainer(devices=2, strategy=strategy_for(strategy), max_steps=STEPS, accumulate_grad_batches=ACCUMULATE, callbacks=[callback])
    fit.fit(module, padded_token_batches(n=ROWS, batch_size=ROWS_PER_RANK))
    result = {
        "params": whole_parameters(module), "layout": layout(module), "ledger": dict(callback.ledger),
        "seen": getattr(callback, "seen", []),
    }  # fmt: skip
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    torch.save(result, Path(out_dir) / f"rank{fit.global_rank}.pt")
