"""Throughput measured in every training run (train/throughput.py) and slmctl's trainer options
(activation checkpointing: train/trainer_options.py)."""

import time
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_PRETRAIN, train_run

from slmctl.config.compose import compose, saved_config
from slmctl.errors import ConfigError
from slmctl.model import build_model
from slmctl.train.throughput import Throughput, batch_shape, precision_dtype, throughput
from slmctl.train.trainer_options import checkpoint_blocks, split_trainer_args

EIGHT_STEPS = [*TINY_PRETRAIN, "trainer.max_steps=8", "trainer.val_check_interval=4", "checkpoint_every=3",
               "trainer.log_every_n_steps=1"]
KEYS = {"tokens_per_s", "target_tokens_per_s", "mfu", "data_wait_fraction", "peak_memory_mb", "steps"}


def test_a_pretrain_run_logs_and_summarises_its_throughput(tmp_path):
    run = train_run(tmp_path / "runs", "pretrain", EIGHT_STEPS)
    summary = run.status()["summary"]["throughput"]
    assert set(summary) == KEYS, summary
    assert 0 < summary["mfu"] < 1.5 and 0 <= summary["data_wait_fraction"] <= 1
    assert summary["tokens_per_s"] > summary["target_tokens_per_s"] > 0 and summary["peak_memory_mb"] > 100
    assert summary["steps"] == 4  # 8 steps: the first has nothing before it to time; 3 of the other 7 warm up
    logged = [m for m in run.metrics() if "tokens_per_s" in m]
    assert [m["step"] for m in logged] == [1, 2, 3, 4, 5, 6, 7]
    for m in logged:
        assert 0 < m["mfu"] < 1.5 and 0 <= m["data_wait_fraction"] <= 1 and m["target_tokens_per_s"] < m["tokens_per_s"]
    assert "throughput: peak" in (run.path / "log.txt").read_text()


class _Module:
    def __init__(self, model):
        self.model, self.logged = model, []

    def log(self, name, value, **kwargs):
        self.logged.append((name, value))


def test_data_wait_is_the_gap_between_steps_less_validation_and_checkpoint_saves(tmp_path):
    """Steps of ~20 ms with ~60 ms between them: 3/4 of the time waits for data; the time a
    validation pass or a checkpoint save takes in a gap is not waiting for data."""
    run = SimpleNamespace(path=tmp_path / "fake-run", log=lambda message: None)
    callback = Throughput(run)
    model = build_model("tiny")
    module = _Module(model)
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")), world_size=1)
    batch = {"input_ids": torch.ones(2, 10, dtype=torch.long), "labels": torch.full((2, 4), -100)}
    batch["labels"][:, :3] = 5  # 3 target tokens per row
    class Saver:
        def on_train_batch_end(self, trainer, module, outputs, batch, step):
            if step == 2:
                time.sleep(0.3)  # a checkpoint written after the step

    saver = callback.exclude_from_wait(Saver())
    callback.on_train_start(trainer, module)
    for step in range(8):
        callback.on_train_batch_start(trainer, module, batch, step)
        time.sleep(0.02)
        callback.on_train_batch_end(trainer, module, None, batch, step)
        saver.on_train_batch_end(trainer, module, None, batch, step)
        if step == 4:
            callback.on_validation_start(trainer, module)
            time.sleep(0.3)
            callback.on_validation_end(trainer, module)
        time.sleep(0.06)
    callback.on_train_end(trainer, module)
    measured = callback.steps
    assert len(measured) == 7  # every step but the first
    for s in measured:
        assert s.tokens == 2 * (10 + 4) and s.target_tokens == 6
        assert 0.6 < s.wait / s.seconds < 0.85, (s.wait, s.seconds)
    summary = throughput(run)["throughput"]
    assert summary["steps"] == 4 and 0.6 < summary["data_wait_fraction"] < 0.85
    assert summary["tokens_per_s"] == pytest.approx(28 / 0.08, rel=0.2)
    names = {name for name, _ in module.logged}
    assert names == {"tokens_per_s", "target_tokens_per_s", "mfu", "data_wait_fraction"}
    assert throughput(run)["throughput"]["steps"] == 0  # summarised once: the run's record is gone


def test_batch_shapes_and_precisions():
    encdec = {"input_ids": torch.ones(3, 7), "labels": torch.tensor([[5, 6, -100]] * 3)}
    assert batch_shape(encdec, encoder_decoder=True) == (3, 7, 3, 6)
    deconly = {"input_ids": torch.ones(2, 5), "labels": torch.tensor([[5, 6, 7, -100, -100]] * 2)}
    assert batch_shape(deconly, encoder_decoder=False) == (2, 5, 0, 4)  # position 0 predicts nothing
    assert [precision_dtype(p) for p in ("32-true", 32, "bf16-mixed", "16-mixed", "bf16-true")] == \
        ["float32", "float32", "bfloat16", "float16", "bfloat16"]


# -- activation checkpointing ---------------------------------------------------------


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # the same dropout masks for both models
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["tiny", "deconly-tiny"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(name):
    from slmctl.bench.training import training_batch

    plain = build_model(name, seed=0, dropout=0.1).train()
    checkpointed = build_model(name, seed=0, dropout=0.1).train()
    checkpointed.load_state_dict(plain.state_dict())
    blocks = checkpoint_blocks(checkpointed)
    config = plain.config
    assert blocks == config.n_encoder_layers + config.n_decoder_layers
    assert checkpoint_blocks(checkpointed) == 0  # idempotent
    assert list(checkpointed.state_dict()) == list(plain.state_dict())  # parameter names unchanged
    batch = training_batch(config, 3, 20, 6, seed=0, device="cpu")
    loss, grads = _loss_and_grads(plain, batch)
    loss_ckpt, grads_ckpt = _loss_and_grads(checkpointed, batch)
    assert abs(float(loss) - float(loss_ckpt)) <= 1e-6
    for n, g in grads.items():
        assert (g - grads_ckpt[n]).abs().max() <= 1e-6, n
    plain.eval(), checkpointed.eval()  # inference runs the blocks as they are: identical tokens
    prompt = batch["input_ids"][:1, :8]
    assert torch.equal(plain.generate(prompt, max_new_tokens=4), checkpointed.generate(prompt, max_new_tokens=4))


def test_a_run_with_activation_checkpointing_logs_the_same_losses(tmp_path):
    plain = train_run(tmp_path / "runs", "pretrain", [*TINY_PRETRAIN, "trainer.log_every_n_steps=1"], name="plain")
    checkpointed = train_run(tmp_path / "runs", "pretrain", [*TINY_PRETRAIN, "trainer.log_every_n_steps=1",
                             "trainer.activation_checkpointing=true"], name="ckpt")
    losses = [[m["train_loss"] for m in r.metrics() if "train_loss" in m] for r in (plain, checkpointed)]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], abs=1e-6)
    assert "activation checkpointing: 9 blocks" in (checkpointed.path / "log.txt").read_text()
    assert checkpointed.config()["trainer"]["activation_checkpointing"] is True


# -- the options in the config ------------------------------------------------------


def test_trainer_options_are_typed_defaulted_and_kept_from_lightning():
    cfg = compose("pretrain", ["trainer.activation_checkpointing=true"])
    assert cfg.trainer.activation_checkpointing is True
    assert compose("distill", ["trainer=gpu"]).trainer.activation_checkpointing is False
    lightning, options = split_trainer_args(dict(cfg.trainer))
    assert options == {"activation_checkpointing": True}
    assert "activation_checkpointing" not in lightning and lightning["max_steps"] == cfg.trainer.max_steps
    with pytest.raises(ConfigError, match="trainer.activation_checkpointing"):
        compose("pretrain", ["trainer.activation_checkpointing=maybe"])
    with pytest.raises(ConfigError, match="and slmctl's: activation_checkpointing[)]"):
        compose("pretrain", ["trainer.checkpointing=true"])
    saved = dict(compose("pretrain"))  # a run saved before the options existed resumes with their defaults
    old = {**{k: v for k, v in saved.items()}, "trainer": {"max_steps": 5, "accelerator": "cpu"}}
    assert saved_config("pretrain", old).trainer.activation_checkpointing is False
