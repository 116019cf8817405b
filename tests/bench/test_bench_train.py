"""`slmctl bench --train`: training FLOPs by hand, the T5 comparison, the report formats and the errors."""

import json

import pytest
import torch
from conftest import cli, newest_run
from torch.utils.flop_counter import FlopCounterMode

from slmctl.bench.report import TRAIN_RECORD_FIELDS
from slmctl.bench.training import training_batch
from slmctl.model import build_model
from slmctl.model.config import get_preset
from slmctl.model.flops import forward_flops, training_step_flops

# The tiny presets (tests/bench/test_flops.py checks these are theirs): per-token FLOPs of each piece.
V, D, H, KVH, HD, FF = 512, 64, 4, 2, 16, 256
A, KV = H * HD, KVH * HD
QKV, OUT, MLP = 2 * D * (A + 2 * KV), 2 * A * D, 2 * D * FF + 2 * FF * D
CROSS_Q, CROSS_KV, LM_HEAD = 2 * D * A, 2 * D * (2 * KV), 2 * D * V
PAIR = H * (2 * HD + 2 * HD)  # one (query, key) pair, every query head


@pytest.mark.parametrize("S,T", [(1, 1), (32, 8), (256, 64)])
def test_encdec_training_flops_by_hand(S, T):
    encoder = 6 * (S * (QKV + OUT + MLP) + S * S * PAIR)
    decoder = 3 * (T * (QKV + OUT + CROSS_Q + OUT + MLP) + S * CROSS_KV + (T * (T + 1) // 2 + T * S) * PAIR)
    forward = encoder + decoder + T * LM_HEAD  # logits at every target position
    assert forward_flops(get_preset("tiny"), S, T) == forward
    assert training_step_flops(get_preset("tiny"), S, T, batch=4) == 3 * 4 * forward


@pytest.mark.parametrize("L", [1, 32, 300])
def test_deconly_training_flops_by_hand(L):
    forward = 10 * (L * (QKV + OUT + MLP) + L * (L + 1) // 2 * PAIR) + L * LM_HEAD
    assert forward_flops(get_preset("deconly-tiny"), L) == forward == forward_flops(get_preset("deconly-tiny"), L, 99)
    assert training_step_flops(get_preset("deconly-tiny"), L, batch=2) == 6 * forward


@pytest.mark.parametrize("name", ["tiny", "deconly-tiny"])
def test_matmul_flops_match_torch_counter_forward_and_backward_is_twice(name):
    """torch's FLOP counter sees every Linear and the LM head (not this CPU's fused attention
    kernel): what it counts equals our count without attention, and backward counts twice that."""
    model = build_model(name).train()
    config = model.config
    B, S, T = 2, 24, 8
    batch = training_batch(config, B, S, T, seed=0, device="cpu")
    with FlopCounterMode(display=False) as forward:
        loss = model(**batch).loss
    with FlopCounterMode(display=False) as backward:
        loss.backward()
    if config.is_encoder_decoder:
        attention = 6 * S * S + 3 * (T * (T + 1) // 2 + T * S)
    else:
        attention, T = 10 * S * (S + 1) // 2, 0
    assert forward.get_total_flops() == B * (forward_flops(config, S, T) - attention * PAIR)
    assert backward.get_total_flops() == 2 * forward.get_total_flops()


def test_train_compare_prints_ours_and_t5_with_the_ratio_and_valid_json(tmp_path):
    result = cli("bench", "--train", "tiny", "--compare", "--batch", "2", "--source-len", "24", "--target-len", "8",
                 "--repeat", "2", "--warmup", "1", "--format", "json", runs=tmp_path / "runs")
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)  # stdout is only the records
    assert [r["model"] for r in records] == ["tiny", "transformers T5"]
    assert [r["runtime"] for r in records] == ["torch", "transformers"]
    assert "bench --train" in result.stderr and "against transformers T5" in result.stderr
    assert "tokens/s ratio" in result.stderr
    ours, t5 = records
    for r in records:
        assert set(TRAIN_RECORD_FIELDS) <= set(r) and len(r["samples"]) == 2
        assert (r["batch"], r["source_len"], r["target_len"]) == (2, 24, 8)
        assert r["tokens_per_s"] == pytest.approx(2 * (24 + 8) / (r["step_ms"] / 1e3))
        assert r["target_tokens_per_s"] == pytest.approx(2 * 8 / (r["step_ms"] / 1e3))
        assert 0 < r["mfu"] < 1.5 and r["peak_flops"] > 0 and r["peak_mem_mb"] > 0
        assert r["mfu"] == pytest.approx(r["flops_per_step"] / (r["step_ms"] / 1e3) / r["peak_flops"])
    assert ours["flops_per_step"] == training_step_flops(get_preset("tiny"), 24, 8, 2)
    assert t5["flops_per_step"] > ours["flops_per_step"]  # full-width keys and values: no grouped-query attention
    assert t5["params"] > ours["params"]
    run = newest_run(tmp_path / "runs", "bench")
    saved = json.loads((run / "bench.json").read_text())
    assert saved["records"] == records and saved["environment"]["threads"] >= 1
    summary = json.loads((run / "status.json").read_text())["summary"]
    speedup = summary["tiny:b2:speedup_vs_transformers T5"]
    assert speedup == pytest.approx(ours["tokens_per_s"] / t5["tokens_per_s"], rel=1e-3)


def test_train_csv_and_markdown_and_decoder_only(tmp_path):
    result = cli("bench", "--train", "deconly-tiny", "--batch", "1,2", "--source-len", "16", "--repeat", "1",
                 "--warmup", "0", "--format", "csv", "trainer.activation_checkpointing=true", runs=tmp_path / "runs")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split(",") == list(TRAIN_RECORD_FIELDS) and len(lines) == 3
    assert lines[1].startswith("deconly-tiny,deconly,cpu,torch,float32,1,16,,") and lines[2].split(",")[5] == "2"
    assert lines[1].endswith(",True")  # activation checkpointing on
    result = cli("bench", "--train", "tiny", "--batch", "1", "--source-len", "8", "--target-len", "4", "--repeat", "1",
                 "--format", "md", runs=tmp_path / "runs")
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and lines[0].startswith("| model | arch | device | runtime | dtype | batch | source_len |")


@pytest.mark.parametrize("args,fragment", [
    (["tiny", "--source-len", "32"], "--source-len and --target-len are for --train MODEL"),
    (["tiny", "--train", "tiny"], "--train MODEL times one model"),
    (["--train", "deconly-tiny", "--compare", "--source-len", "8", "--repeat", "1"], "give an encoder-decoder model"),
    (["--train", "tiny", "--source-len", "0"], "source_len must be > 0"),
    (["--train", "tiny", "--estimate", "h100"], "--estimate"),
    (["--train", "tiny", "trainer.max_steps=3"], "unknown trainer option 'max_steps'"),
])
def test_train_bad_options_are_one_line_errors(tmp_path, args, fragment):
    result = cli("bench", *args, runs=tmp_path / "runs")
    assert result.exit_code == 2, result.output
    assert fragment in result.output


def test_gpu_profiles_by_device_name():
    from slmctl.runtime.hardware import gpu_profile

    assert gpu_profile("NVIDIA H100 80GB HBM3") == "h100"
    assert gpu_profile("NVIDIA A100-SXM4-80GB") == "a100"
    assert gpu_profile("NVIDIA H200") == "h200"
    assert gpu_profile("NVIDIA GeForce RTX 4090") is None


def test_training_batch_shapes():
    encdec = training_batch(get_preset("tiny"), 3, 10, 4, seed=1, device="cpu")
    assert encdec["input_ids"].shape == (3, 10) and encdec["labels"].shape == (3, 4)
    assert int(encdec["input_ids"].min()) >= 4  # no special tokens, no padding
    deconly = training_batch(get_preset("deconly-tiny"), 2, 12, 4, seed=1, device="cpu")
    assert deconly["input_ids"].shape == (2, 12) and torch.equal(deconly["input_ids"], deconly["labels"])
