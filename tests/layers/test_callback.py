"""LayerwiseSampling with a tiny Llama on real text: frozen layers are bit-identical, state is freed."""

import signal

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from tests.support.models import TinyLlama, token_batches
from tests.support.training import Snapshot, trainer
from weightwise.callbacks import LayerwiseSampling
from weightwise.layers.freezing import OptimizerStateStash, optimizer_state_bytes


def test_frozen_layers_stay_bit_identical_under_adamw_with_weight_decay():
    sampling, snapshot = LayerwiseSampling("lisa", n_layers=2, interval=2), Snapshot()
    module = TinyLlama()
    trainer(max_epochs=2, callbacks=[sampling, snapshot]).fit(module, token_batches())
    assert len(sampling.history) == 4 and any(a != b for a, b in zip(sampling.history, sampling.history[1:]))
    for step in range(len(snapshot.params) - 1):
        active = sampling.history[step // 2]
        for layer in range(6):
            moved = not torch.equal(snapshot.params[step][layer], snapshot.params[step + 1][layer])
            assert moved == (layer in active), (step, layer, active)


def test_optimizer_state_is_released_or_offloaded():
    module = TinyLlama()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    module.model(input_ids=torch.randint(0, 64, (2, 8)), labels=torch.randint(0, 64, (2, 8))).loss.backward()
    optimizer.step()
    full = optimizer_state_bytes(optimizer)
    layer = list(module.model.model.layers[0].parameters())
    kept = optimizer.state[layer[0]]["exp_avg"].clone()

    offload = OptimizerStateStash("offload")
    offload.freeze(layer, optimizer)
    assert optimizer_state_bytes(optimizer) < full and all(p.grad is None and not p.requires_grad for p in layer)
    offload.thaw(layer, optimizer)
    assert torch.equal(optimizer.state[layer[0]]["exp_avg"], kept) and optimizer_state_bytes(optimizer) == full

    release = OptimizerStateStash("release")
    release.freeze(layer, optimizer)
    release.thaw(layer, optimizer)
    assert layer[0] not in optimizer.state  # moments start from zero when the layer returns


def test_loss_credit_learns_importance_and_run_is_deterministic():
    def run():
        sampling = LayerwiseSampling("loss_credit", n_layers=2, interval=1, seed=3)
        trainer(max_epochs=2, callbacks=[sampling]).fit(TinyLlama(), token_batches())
        return sampling

    first, second = run(), run()
    assert first.history == second.history
    assert first.importance.abs().sum() > 0  # rewards reached the scores


def test_ist_probes_learn_scores_and_redraw_a_quarter_of_the_layers_every_step():
    def run(seed):
        sampling = LayerwiseSampling("ist", probe_every=2, seed=seed)
        trainer(max_epochs=2, callbacks=[sampling]).fit(TinyLlama(layers=8), token_batches())
        return sampling

    first, second, other = run(0), run(0), run(5)
    assert len(first.history) == 8 and all(len(active) == 2 for active in first.history)  # 8 // 4 layers, every step
    assert first.history == second.history and torch.equal(first.importance, second.importance)
    assert first.importance.abs().sum() > 0  # probes at steps 2, 4, 6 moved the scores
    assert other.history != first.history  # the seed matters
    assert first.stash.mode == "keep"  # the reference keeps the optimizer state of undrawn layers


def test_badam_cycles_one_block_with_embeddings_and_head_frozen():
    module = TinyLlama(layers=3)
    outside = {n: p.detach().clone() for n, p in module.named_parameters() if ".layers." not in n}
    sampling, snapshot = LayerwiseSampling("badam", interval=1), Snapshot()
    trainer(max_epochs=2, callbacks=[sampling, snapshot]).fit(module, token_batches())
    assert sampling.history == [[2], [1], [0], [2], [1], [0], [2], [1]]  # descending, every layer once per cycle
    for name, param in module.named_parameters():
        if name in outside:
            assert torch.equal(param, outside[name]), name  # embeddings, head, final norm never train
    for step in range(len(snapshot.params) - 1):
        moved = [i for i in range(3) if not torch.equal(snapshot.params[step][i], snapshot.params[step + 1][i])]
        assert moved == sampling.history[step]


def test_pinned_layers_train_in_every_period_and_lisa_can_leave_embeddings_frozen():
    module = TinyLlama()
    embeddings = module.model.model.embed_tokens.weight.detach().clone()
    sampling = LayerwiseSampling("lisa", n_layers=1, interval=2, always_active=[5], train_outside_stack=False)
    trainer(max_epochs=2, callbacks=[sampling]).fit(module, token_batches())
    assert all(5 in active and len(active) == 2 for active in sampling.history)
    assert torch.equal(module.model.model.embed_tokens.weight, embeddings)


def test_bad_settings():
    with pytest.raises(ValueError, match="policy"):
        LayerwiseSampling("random")
    with pytest.raises(Exception, match="n_layers=9"):
        trainer(max_steps=1, callbacks=[LayerwiseSampling(n_layers=9)]).fit(TinyLlama(), token_batches())


@pytest.mark.parametrize("optimizer_state", ["release", "offload"])
def test_resume_continues_the_same_layer_schedule(tmp_path, optimizer_state):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.support.training import flat_params

    def run(max_epochs, ckpt_path=None, checkpoint_dir=None):
        sampling = LayerwiseSampling("ist", n_layers=2, interval=3, seed=1, optimizer_state=optimizer_state)
        callbacks = [sampling] + ([ModelCheckpoint(dirpath=checkpoint_dir, save_last=True)] if checkpoint_dir else [])
        module = TinyLlama()
        trainer(max_epochs=max_epochs, callbacks=callbacks, enable_checkpointing=bool(checkpoint_dir)).fit(
            module, token_batches(), ckpt_path=ckpt_path
        )
        return module, sampling

    straight, straight_sampling = run(4)
    run(2, checkpoint_dir=tmp_path)
    resumed, resumed_sampling = run(4, ckpt_path=tmp_path / "last.ckpt")
    assert resumed_sampling.history == straight_sampling.history
    assert torch.allclose(resumed_sampling.importance, straight_sampling.importance)
    assert torch.allclose(flat_params(resumed), flat_params(straight))
    if optimizer_state == "offload":  # the moments parked on CPU at the checkpoint came back with it
        parked = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]["LayerwiseSampling"]["parked"]
        parked_layers = {int(name.split("layers.")[1].split(".")[0]) for name in parked}
        # ...and they mattered: a parked layer trains again after the resume (periods 3+), with its moments.
        assert parked_layers & {i for period in straight_sampling.history[3:] for i in period}


def test_with_lora_adapters_only_the_chosen_layers_adapters_train():
    from peft import LoraConfig, get_peft_model

    module = TinyLlama()
    module.model = get_peft_model(module.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    base_before = {n: p.detach().clone() for n, p in module.named_parameters() if "lora_" not in n}
    sampling = LayerwiseSampling("ist", n_layers=2, interval=2)
    adapters = {n: p.detach().clone() for n, p in module.named_parameters() if "lora_B" in n}
    trainer(max_epochs=1, callbacks=[sampling]).fit(module, token_batches())
    for name, param in module.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, base_before[name]) and not param.requires_grad, name  # base never trains
    stack = sampling.stack
    trained = {i for i, layer in enumerate(stack) for n, p in layer.named_parameters() if "lora_B" in n and p.abs().sum() > 0}
    assert trained == {i for period in sampling.history for i in period}  # exactly the sampled layers' adapters moved
    assert len(adapters) == 2 * len(stack)


def test_layer_activity_and_importance_are_logged_per_period(tmp_path):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    sampling = LayerwiseSampling("ist", n_layers=2, interval=2)
    trainer(max_epochs=1, callbacks=[sampling], logger=CSVLogger(tmp_path)).fit(TinyLlama(), token_batches())
    rows = [r for r in csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))) if r.get("weightwise/layer_active/00")]
    assert len(rows) == len(sampling.history) == 2
    for row, active in zip(rows, sampling.history):
        assert [i for i in range(6) if float(row[f"weightwise/layer_active/{i:02d}"]) == 1.0] == active
        assert "weightwise/layer_importance/05" in row
    assert float(rows[0]["weightwise/optimizer_state_mib"]) == 0.0  # before the first step: no Adam state yet
    assert float(rows[1]["weightwise/optimizer_state_mib"]) > 0.0


def test_the_optimizer_is_found_in_every_configure_optimizers_form():
    from weightwise.layers.callback import _optimizers_in

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    forms = [optimizer, [optimizer], ([optimizer], [schedule]), {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule}}]
    assert all(_optimizers_in(form) == [optimizer] for form in forms)
    assert _optimizers_in(None) == []


def test_frozen_layers_wait_in_bf16_with_their_fp32_weights_on_the_host():
    from lightning.pytorch.callbacks import Callback

    class Dtypes(Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # after LayerwiseSampling's own
            self.seen.append([layer.self_attn.q_proj.weight.dtype for layer in pl_module.model.model.layers])

    module = TinyLlama(layers=4)
    sampling, dtypes = LayerwiseSampling("lisa", n_layers=1, interval=2, frozen_dtype=torch.bfloat16), Dtypes()
    trainer(max_epochs=2, precision="bf16-mixed", callbacks=[sampling, dtypes]).fit(module, token_batches())
    for step, seen in enumerate(dtypes.seen):
        active = sampling.history[step // 2]
        assert seen == [torch.float32 if i in active else torch.bfloat16 for i in range(4)], step
    assert all(p.dtype == torch.float32 for p in module.parameters())  # back to fp32 after the fit
    assert not sampling.masters.masters


def test_an_update_smaller_than_bf16_resolution_survives_the_frozen_periods():
    """The master is kept, not recomputed from the bf16 copy: a tiny update is not rounded away."""
    from weightwise.layers import HostMasters

    param = torch.nn.Parameter(torch.full((4,), 1.0))
    masters = HostMasters(torch.bfloat16)
    param.data += 1e-4  # below bf16's resolution at 1.0 (2^-8)
    masters.freeze([param])
    assert param.dtype == torch.bfloat16 and param.data.eq(1.0).all()
    masters.thaw([param])
    assert param.dtype == torch.float32 and torch.allclose(param.data, torch.full((4,), 1.0001))


def test_frozen_dtype_needs_mixed_precision_and_released_state():
    with pytest.raises(ValueError, match="release"):
        LayerwiseSampling("ist", frozen_dtype=torch.bfloat16)  # IST keeps state by default
    with pytest.raises(Exception, match="bf16-mixed"):
        trainer(max_steps=1, callbacks=[LayerwiseSampling("lisa", frozen_dtype=torch.bfloat16)]).fit(TinyLlama(), token_batches())


def test_resume_with_frozen_dtype_keeps_the_exact_fp32_weights(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.support.training import flat_params

    def run(max_epochs, ckpt_path=None, checkpoint_dir=None):
        sampling = LayerwiseSampling("lisa", n_layers=1, interval=3, seed=2, frozen_dtype=torch.bfloat16)
        callbacks = [sampling] + ([ModelCheckpoint(dirpath=checkpoint_dir, save_last=True)] if checkpoint_dir else [])
        module = TinyLlama(layers=3)
        trainer(max_epochs=max_epochs, precision="bf16-mixed", callbacks=callbacks, enable_checkpointing=bool(checkpoint_dir)).fit(
            module, token_batches(), ckpt_path=ckpt_path
        )
        return module

    straight = run(4)
    run(2, checkpoint_dir=tmp_path)
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]["LayerwiseSampling"]["masters"]  # fp32 parked
    torch.testing.assert_close(flat_params(run(4, ckpt_path=tmp_path / "last.ckpt")), flat_params(straight), rtol=0, atol=0)


# ---------------------------------------------------------------------- the module given back
class Stop(Callback):
    """Ends the fit at ``step`` (after LayerwiseSampling's hook of that step): raises ``error``, or
    sets ``trainer.should_stop`` when ``error`` is ``None``; records how many parameters were then
    frozen and how many stored in bf16."""

    def __init__(self, step: int, error: type[BaseException] | None) -> None:
        self.step, self.error = step, error
        self.frozen = self.bf16 = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.frozen = sum(not p.requires_grad for p in pl_module.parameters())
            self.bf16 = sum(p.dtype == torch.bfloat16 for p in pl_module.parameters())
            if self.error is None:
                trainer.should_stop = True
            else:
                raise self.error("stop")


def moved_tensors(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}


def test_a_plain_fit_after_a_lisa_fit_trains_every_tensor():
    module = TinyLlama(layers=4)
    trainer(max_epochs=1, callbacks=[LayerwiseSampling("lisa", n_layers=1, interval=2)]).fit(module, token_batches())
    assert all(p.requires_grad for p in module.parameters())
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer(max_epochs=1).fit(module, token_batches())
    assert moved_tensors(module, before) == set(before)  # every one of the 39 tensors trained


@pytest.mark.parametrize("same_callback", [True, False])
def test_a_second_lisa_fit_draws_and_trains_every_layer(same_callback):
    module, snapshot = TinyLlama(layers=4), Snapshot()
    first = LayerwiseSampling("lisa", n_layers=2, interval=1, seed=2)
    trainer(max_epochs=2, callbacks=[first]).fit(module, token_batches())
    drawn = list(first.history)
    assert {i for active in drawn for i in active} == {0, 1, 2, 3}
    second = first if same_callback else LayerwiseSampling("lisa", n_layers=2, interval=1, seed=2)
    trainer(max_epochs=2, callbacks=[second, snapshot]).fit(module, token_batches())
    assert second.history[-len(drawn) :] == drawn  # the same seed, the same periods: the same draws
    for step in range(len(snapshot.params) - 1):  # and each drawn layer trains, exactly those
        moved = [i for i in range(4) if not torch.equal(snapshot.params[step][i], snapshot.params[step + 1][i])]
        assert moved == drawn[step], step


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt, None], ids=["exception", "interrupt", "should_stop"])
def test_every_exit_gives_back_requires_grad_and_dtype_as_the_user_had_them(error):
    module = TinyLlama(layers=4)
    module.model.model.embed_tokens.weight.requires_grad_(False)  # the user's own choice survives the fit
    user = {n: p.requires_grad for n, p in module.named_parameters()}
    sampling, stop = LayerwiseSampling("lisa", n_layers=1, interval=2, frozen_dtype=torch.bfloat16), Stop(3, error)
    fit = trainer(max_epochs=2, precision="bf16-mixed", callbacks=[sampling, stop])
    previous_sigint = signal.getsignal(signal.SIGINT)
    try:
        if error is None:
            fit.fit(module, token_batches())
        else:  # Lightning turns KeyboardInterrupt into sys.exit(1) after its graceful shutdown
            with pytest.raises(SystemExit if error is KeyboardInterrupt else error):
                fit.fit(module, token_batches())
    finally:
        signal.signal(signal.SIGINT, previous_sigint)  # Lightning ignores further Ctrl+C after an interrupt
    assert fit.global_step < 8 and stop.frozen == 1 + 3 * 9 and stop.bf16 == 3 * 9  # stopped with 3 of 4 layers frozen, in bf16
    assert {n: p.requires_grad for n, p in module.named_parameters()} == user
    assert all(p.dtype == torch.float32 for p in module.parameters())
    assert sampling.masters.masters == {}


def test_wandb_gets_the_whole_layer_map_as_one_table(tmp_path):
    import json

    import wandb
    from lightning.pytorch.loggers import WandbLogger

    sampling = LayerwiseSampling("lisa", n_layers=1, interval=3, seed=1)
    logger = WandbLogger(save_dir=tmp_path, offline=True, project="weightwise-tests")
    trainer(max_epochs=2, logger=logger, callbacks=[sampling]).fit(TinyLlama(layers=3), token_batches())
    wandb.finish()
    (table,) = tmp_path.rglob("layer_map_*.table.json")
    logged = json.loads(table.read_text())
    assert logged["columns"] == ["step", "layer_00", "layer_01", "layer_02"]
    assert len(sampling.history) == 3  # 8 steps, periods of 3
    assert logged["data"] == [[3 * p, *(int(i in active) for i in range(3))] for p, active in enumerate(sampling.history)]


def test_a_next_fit_starts_without_the_last_fits_parked_moments_which_a_checkpoint_after_it_keeps(tmp_path):
    class AtStart(Callback):
        def on_train_start(self, trainer, pl_module):
            self.parked = dict(sampling.stash.parked)

    sampling, at_start = LayerwiseSampling("lisa", n_layers=1, interval=1, optimizer_state="offload", seed=0), AtStart()
    module = TinyLlama(layers=3)
    first = trainer(max_epochs=1, callbacks=[sampling])
    first.fit(module, token_batches())
    parked = {name for p, name in ((p, n) for n, p in module.named_parameters()) if p in sampling.stash.parked}
    assert parked  # layers that trained and were frozen again
    first.save_checkpoint(tmp_path / "after.ckpt")  # after the fit: still the run's state
    assert set(torch.load(tmp_path / "after.ckpt", weights_only=False)["callbacks"]["LayerwiseSampling"]["parked"]) == parked
    trainer(max_epochs=1, callbacks=[sampling, at_start]).fit(module, token_batches())
    assert at_start.parked == {}  # the new optimizer gets none of the old one's moments
