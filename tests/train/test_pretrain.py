"""The pretrain stage: learning, resuming, and the artifacts other stages consume."""

import json

import pytest
import torch
from conftest import LEARNING_DATA, Crash, cli, newest_run, train_run
from omegaconf import OmegaConf
from safetensors.torch import load_file

from slmctl.config.compose import compose
from slmctl.runs.run import Run
from slmctl.train import pretrain
from slmctl.train.checkpoints import last_good_checkpoint

LEARNING_RUN = [*LEARNING_DATA, "trainer.log_every_n_steps=5"]  # the train loss logged every 5 steps


def val_losses(run):
    return [m["val_loss"] for m in run.metrics() if "val_loss" in m]


@pytest.mark.parametrize("model, objective", [("tiny", "prefix_lm"), ("tiny", "span_corruption"),
                                              ("tiny", "seq2seq"), ("deconly-tiny", "causal_lm")])
def test_short_pretrain_lowers_validation_loss(tmp_path, model, objective):
    run = train_run(tmp_path / "runs", "pretrain", [*LEARNING_RUN, f"model={model}", f"objective={objective}",
                    "trainer.max_steps=40", "trainer.val_check_interval=5", "checkpoint_every=40", "optim.lr=3e-3",
                    "optim.warmup_steps=5"], name=objective)
    losses = val_losses(run)
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.2, losses
    assert run.status()["status"] == "succeeded"


def test_killed_and_resumed_run_ends_with_the_same_weights(tmp_path):
    overrides = ["model=tiny", "model.dropout=0.1", "trainer.max_steps=10", "trainer.val_check_interval=5",
                 "checkpoint_every=4"]
    uninterrupted = train_run(tmp_path / "runs", "pretrain", [*LEARNING_RUN, *overrides], name="whole")

    cfg = compose("pretrain", [*LEARNING_RUN, *overrides])
    killed = Run.create(tmp_path / "runs", "pretrain", "killed", cfg, argv=["test"])
    with pytest.raises(SystemExit):
        pretrain.run(cfg, killed, callbacks=[Crash(6)])
    assert killed.status()["status"] == "running"  # what a SIGKILL leaves behind
    assert last_good_checkpoint(killed.checkpoint_dir).name == "step-00000004.ckpt"

    resumed = Run.open(killed.path)
    resumed.resume()
    pretrain.run(OmegaConf.merge(cfg, {"resume": str(killed.path)}), resumed)
    assert resumed.status()["status"] == "succeeded"

    a = load_file(uninterrupted.model_dir / "model.safetensors")
    b = load_file(resumed.model_dir / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_hf_causal_artifact_loads_with_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    run = train_run(tmp_path / "runs", "pretrain", [*LEARNING_RUN, "model=hf-causal", "model.hf.hidden_size=64",
                    "model.hf.intermediate_size=128", "model.hf.num_hidden_layers=2", "objective=causal_lm",
                    "trainer.max_steps=4", "trainer.val_check_interval=2", "checkpoint_every=4"], name="llama")
    model = AutoModelForCausalLM.from_pretrained(run.model_dir)
    assert model.config.model_type == "llama" and model.config.vocab_size % 128 == 0
    assert (run.model_dir / "model.safetensors").is_file() and (run.model_dir / "tokenizer.json").is_file()
    ids = torch.tensor([[1, 40, 41, 42]])
    assert model(input_ids=ids).logits.shape == (1, 4, model.config.vocab_size)

    from slmctl.runtime.generator import generate_text, load_generator

    generator = load_generator(run.path)
    assert generator.kind == "hf-causal"
    assert isinstance(generate_text(generator, "Where does Mara live?", max_new_tokens=3), str)


def test_init_fine_tunes_an_earlier_run_with_its_tokenizer(tmp_path):
    base = train_run(tmp_path / "runs", "pretrain", [*LEARNING_RUN, "model=tiny", "trainer.max_steps=4",
                     "trainer.val_check_interval=2", "checkpoint_every=4"], name="base")
    tuned = train_run(tmp_path / "runs", "pretrain", [*LEARNING_RUN, "objective=seq2seq", f"init={base.path}",
                      "trainer.max_steps=4", "trainer.val_check_interval=2", "checkpoint_every=4"], name="tuned")
    assert (tuned.model_dir / "tokenizer.json").read_text() == (base.model_dir / "tokenizer.json").read_text()
    assert any(i["kind"] == "run" and i["stage"] == "pretrain" for i in tuned.inputs())


def test_bf16_mixed_precision_and_gradient_accumulation(tmp_path):
    run = train_run(tmp_path / "runs", "pretrain", [*LEARNING_RUN, "model=tiny", "trainer.precision=bf16-mixed",
                    "trainer.accumulate_grad_batches=2", "trainer.max_steps=4", "trainer.val_check_interval=4",
                    "checkpoint_every=4"], name="bf16")
    assert run.status()["summary"]["steps"] == 4
    assert all(torch.isfinite(torch.tensor(m["val_loss"])) for m in run.metrics() if "val_loss" in m)


def test_cli_resume_unfinished_finishes_a_killed_run(tmp_path):
    overrides = ["model=tiny", "trainer.max_steps=6", "trainer.val_check_interval=3", "checkpoint_every=3"]
    cfg = compose("pretrain", [*LEARNING_RUN, *overrides])
    killed = Run.create(tmp_path / "runs", "pretrain", "killed", cfg, argv=["test"])
    with pytest.raises(SystemExit):
        pretrain.run(cfg, killed, callbacks=[Crash(4)])
    renamed = cli("pretrain", "resume=latest", runs=tmp_path / "runs")
    assert renamed.exit_code == 2 and "resume=latest is now resume=unfinished" in renamed.output
    assert Run.open(killed.path).status()["status"] == "running"  # untouched by the refused command
    refused = cli("pretrain", "resume=unfinished", "batch_size=4", runs=tmp_path / "runs")
    assert refused.exit_code == 2 and "drop the other overrides (batch_size=4)" in refused.output
    result = cli("pretrain", "resume=unfinished", runs=tmp_path / "runs")
    assert result.exit_code == 0, result.output
    status = Run.open(killed.path).status()
    assert status["status"] == "succeeded" and status["summary"]["steps"] == 6
    assert (tmp_path / "runs" / "pretrain" / "latest").resolve() == killed.path
    nothing_left = cli("pretrain", "resume=unfinished", runs=tmp_path / "runs")
    assert nothing_left.exit_code == 2 and "no unfinished pretrain run" in nothing_left.output


def test_a_diverging_loss_fails_the_run_at_its_step_and_keeps_the_checkpoints_before_it(tmp_path):
    result = cli("pretrain", *LEARNING_RUN, "model=tiny", "optim.lr=1e30", "optim.warmup_steps=1",
                 "trainer.gradient_clip_val=0", "trainer.max_steps=30", "trainer.val_check_interval=30",
                 "checkpoint_every=1", runs=tmp_path / "runs")
    message = " ".join(result.output.split())
    assert result.exit_code == 1 and "training diverged" in message and "Traceback" not in result.output
    step = int(message.split("at step ")[1].split(":")[0])
    run = newest_run(tmp_path / "runs", "pretrain")
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "failed" and f"at step {step}" in status["error"]
    kept = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
    assert len(kept) == step and "last good checkpoint" in status["error"]  # one per finished step before it
    assert not (run / "model").exists()
