"""Suppression probes: a layer responds at a fraction of its strength, and everything is restored."""

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from tests.support.models import Classifier, TinyLlama, blobs, token_batches
from tests.support.training import trainer
from weightwise.callbacks import LayerwiseSampling
from weightwise.layers import suppressed
from weightwise.layers.probes import ProbeBatches, default_probe_loss, model_loss, module_loss


def test_a_suppressed_layer_scales_its_residual_contribution():
    model = TinyLlama(layers=2).model.eval()
    ids = torch.randint(0, 64, (1, 8))
    seen = {}
    layer, after = model.model.layers[0], model.model.layers[1]
    layer.register_forward_pre_hook(lambda module, args: seen.__setitem__("in", args[0]))
    after.register_forward_pre_hook(lambda module, args: seen.__setitem__("out", args[0]))  # what the model passes on
    with torch.no_grad():
        before = model(input_ids=ids).logits
        full = seen["out"] - seen["in"]
        with suppressed([layer], 0.25):
            model(input_ids=ids)
            torch.testing.assert_close(seen["out"] - seen["in"], 0.25 * full)
        with suppressed([layer], 0.0):
            model(input_ids=ids)
            torch.testing.assert_close(seen["out"], seen["in"])  # factor 0: the layer is skipped
        torch.testing.assert_close(model(input_ids=ids).logits, before)  # the hook is gone


def test_lora_adapters_are_scaled_as_the_reference_and_restored():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(TinyLlama(layers=2).model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    layer = model.base_model.model.model.layers[1]
    q = layer.self_attn.q_proj
    assert q.scaling["default"] == 2.0
    with suppressed([layer], 0.25):
        assert q.scaling["default"] == 0.5 and layer.self_attn.v_proj.scaling["default"] == 0.5
        assert model.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == 2.0  # others untouched
    assert q.scaling["default"] == 2.0


# ------------------------------------------------------------------ the probes' data and loss (IST as the reference)
def test_probe_batches_are_shuffled_passes_of_16_the_same_on_every_rank():
    """The reference's ISTCallback: DataLoader(train set, batch_size=16, shuffle=True), the next batch
    per probe round, a new shuffled pass when one is used up. Seeded here: every rank (every instance
    with the seed) draws the same batches."""
    batches, other_rank = ProbeBatches(seed=3), ProbeBatches(seed=3)
    first_pass = [batches.indices(40, draw) for draw in range(3)]
    assert [len(b) for b in first_pass] == [16, 16, 8]  # 40 samples: two full batches and the rest
    assert sorted(sum(first_pass, [])) == list(range(40))  # each sample once per pass
    second_pass = [batches.indices(40, draw) for draw in range(3, 6)]
    assert sorted(sum(second_pass, [])) == list(range(40)) and second_pass != first_pass  # reshuffled
    assert [other_rank.indices(40, d) for d in range(6)] == first_pass + second_pass
    assert ProbeBatches(seed=4).indices(40, 0) != first_pass[0]
    with pytest.raises(ValueError, match="probe_batch_size"):
        ProbeBatches(0)


def test_module_loss_reduces_like_a_training_step_and_names_the_fix():
    class Tokens(pl.LightningModule):
        def __init__(self, output):
            super().__init__()
            self.output = output

        def training_step(self, batch, batch_idx):
            return self.output

    losses = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert module_loss(Tokens({"loss": losses, "mask": mask}), None) == pytest.approx(2.0)  # (1 + 2 + 3) / 3 tokens
    assert module_loss(Tokens(torch.tensor([1.0, 3.0])), None) == pytest.approx(2.0)  # per-sample: the mean
    with pytest.raises(ValueError, match="mask"):
        module_loss(Tokens({"loss": losses}), None)
    with pytest.raises(ValueError, match="probe_loss="):
        module_loss(Tokens({"scores": {}}), None)


def test_probe_batches_come_collated_from_the_training_loader_and_streams_name_the_fix():
    """ProbeBatches reads the running fit's training loader: its dataset's rows of the draw, collated
    by its collate_fn; a stream cannot be indexed, and the error names probe_batch_size=None."""
    seen = {}

    class Draw(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen["drawn"] = ProbeBatches(4, seed=1)(trainer, batch, 2)
            seen["own"] = ProbeBatches(None)(trainer, batch, 2) is batch

    data = blobs(10)
    trainer(max_steps=1, callbacks=[Draw()]).fit(Classifier(per_sample=False), torch.utils.data.DataLoader(data, batch_size=2))
    rows = ProbeBatches(4, seed=1).indices(10, 2)  # the third batch of the first pass: 2 samples
    assert len(rows) == 2 and seen["own"]
    assert torch.equal(seen["drawn"][0], data.tensors[0][rows]) and torch.equal(seen["drawn"][1], data.tensors[1][rows])

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from data

    with pytest.raises(MisconfigurationException, match="probe_batch_size=None"):
        trainer(max_steps=1, callbacks=[Draw()]).fit(Classifier(per_sample=False), torch.utils.data.DataLoader(Stream(), batch_size=2))


def test_the_default_probe_loss_is_the_transformers_loss_else_the_modules_own():
    module = TinyLlama(layers=2).eval()
    batch = {"input_ids": torch.randint(0, 64, (2, 8))}
    with torch.no_grad():
        torch.testing.assert_close(default_probe_loss(module, batch), module.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss)
        classifier = Classifier()  # per-sample losses from a tuple batch: their mean
        x, y = blobs(8).tensors
        torch.testing.assert_close(default_probe_loss(classifier, (x, y)), F.cross_entropy(classifier.net(x), y))



def test_ist_probes_evaluate_their_own_batch_of_16_not_the_training_micro_batch():
    data = token_batches(n=32)  # micro-batches of 2 sequences
    rows = {tuple(item["input_ids"].tolist()): i for i, item in enumerate(data.dataset)}

    def run(**options):
        seen = []

        def recording_loss(module, batch):
            seen.append([rows[tuple(r.tolist())] for r in batch["input_ids"]])
            return model_loss(module, batch)

        sampling = LayerwiseSampling("ist", probe_every=2, probe_loss=recording_loss, **options)
        trainer(max_steps=6, callbacks=[sampling]).fit(TinyLlama(layers=4), data)
        return seen, sampling

    seen, sampling = run()
    assert len(seen) == 2 * 3  # probe rounds before steps 2 and 4, 3 probes each, one batch per round
    expected = [ProbeBatches(16, seed=0).indices(32, draw) for draw in (0, 1)]
    assert seen == [expected[0]] * 3 + [expected[1]] * 3
    assert sampling.importance.abs().sum() > 0
    micro, _ = run(probe_batch_size=None)  # weightwise 0.2's: each probing step's micro-batch
    assert [len(rows) for rows in micro] == [2] * 6


class LinearStack(pl.LightningModule):
    """Not a transformers model: tuple batches, a stack of residual blocks, a logged scalar loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(4))
        self.head = torch.nn.Linear(8, 3)
        self.log_calls = 0

    def log(self, *args, **kwargs):  # counts the logging calls that reach Lightning
        self.log_calls += 1
        super().log(*args, **kwargs)

    def training_step(self, batch, batch_idx):
        x, y = batch
        for block in self.blocks:
            x = x + torch.tanh(block(x))
        loss = torch.nn.functional.cross_entropy(self.head(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_ist_runs_on_any_module_whose_training_step_returns_a_loss():
    """No transformers model, tuple batches: the probes evaluate the module's own training_step loss,
    with its logging silenced (the logged train_loss comes from the training steps only)."""
    module = LinearStack()
    sampling = LayerwiseSampling("ist", probe_every=2)
    trainer(max_steps=6, callbacks=[sampling]).fit(module, torch.utils.data.DataLoader(blobs(64), batch_size=4))
    assert sampling.importance.abs().sum() > 0  # two probe rounds moved the scores
    assert module.log_calls == 6  # one per training step: the 6 probes logged nothing
    assert "log" not in vars(module) and "log_dict" not in vars(module)  # the silencing is undone


def test_ist_over_a_stream_names_the_micro_batch_option():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from token_batches(n=8).dataset

    with pytest.raises(MisconfigurationException, match="probe_batch_size=None"):
        trainer(max_steps=3, callbacks=[LayerwiseSampling("ist", probe_every=1)]).fit(
            TinyLlama(layers=4), torch.utils.data.DataLoader(Stream(), batch_size=2)
        )

