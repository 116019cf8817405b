"""peft=lora: LoRA through PEFT on slmctl's modules, saved merged (default) or as an adapter."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import DISTILL_DATA, TINY_PRETRAIN, TINY_SYNTHETIC_DATA, TINY_TRAINING, cli, newest_run, train_run

from slmctl.data.tokenizer import TextTokenizer
from slmctl.model import build_model, load_model, save_model
from slmctl.model.config import vocab_size_for
from slmctl.model.directory import load_adapter_model

FINE_TUNE = ["objective=seq2seq", *TINY_SYNTHETIC_DATA, *TINY_TRAINING]


@pytest.fixture(scope="module")
def inits(tmp_path_factory, tiny_model_dir):
    """`mini` and `small` model directories with fresh weights and the tokenizer of conftest's tiny
    model (init models wide enough for r=8 to be a small fraction); no training run needed."""
    tokenizer = TextTokenizer.load(tiny_model_dir)
    made = {}
    for preset in ("mini", "small"):
        directory = tmp_path_factory.mktemp(preset)
        model = build_model(preset, seed=0, vocab_size=vocab_size_for(len(tokenizer)), **tokenizer.special_ids)
        save_model(model, directory, tokenizer)
        made[preset] = directory
    return made


@pytest.fixture(scope="module")
def bases(tmp_path_factory, inits):
    """runs/ with a tiny trained encoder-decoder run, and the `mini` / `small` init model directories."""
    runs = tmp_path_factory.mktemp("runs")
    run = train_run(runs, "pretrain", TINY_PRETRAIN, name="base").path
    return {"runs": runs, "tiny": run / "model", **inits}


def fine_tune(runs, init, name, *extra):
    result = cli("pretrain", f"init={init}", *FINE_TUNE, "peft=lora", *extra, "--name", name, runs=runs)
    assert result.exit_code == 0, result.output
    return newest_run(runs, "pretrain", name)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(4, 400, (2, 9), generator=g), "decoder_input_ids": torch.randint(4, 400, (2, 5), generator=g)}


def test_lora_trains_under_five_percent_of_the_weights_and_says_so(bases):
    run = fine_tune(bases["runs"], bases["mini"], "mini-lora")
    summary = json.loads((run / "status.json").read_text())["summary"]
    assert 0 < summary["trainable_parameters"] < 0.05 * summary["parameters"]
    log = (run / "log.txt").read_text()
    assert f"{summary['trainable_parameters']:,} trainable of" in log and "LoRA r=8" in log
    tuned, init = load_model(run / "model"), load_model(bases["mini"])
    assert tuned.num_parameters() == init.num_parameters()  # merged: plain weights, no adapter left
    changed = {name for name, p in tuned.state_dict().items() if not torch.equal(p, init.state_dict()[name])}
    assert changed and all(name.endswith((".qkv.weight", ".out.weight", ".q.weight", ".kv.weight", ".fc1.weight",
                                          ".fc2.weight")) for name in changed)  # only the adapted matrices moved


def test_merged_and_adapter_runs_give_the_same_logits(bases):
    merged_run = fine_tune(bases["runs"], bases["tiny"], "merged", "peft.r=4")
    adapter_run = fine_tune(bases["runs"], bases["tiny"], "adapter", "peft.r=4", "peft.merge=false")
    files = set(os.listdir(adapter_run / "model"))
    assert {"adapter_config.json", "adapter_model.safetensors", "model.json", "tokenizer.json"} <= files
    assert "model.safetensors" not in files
    with torch.no_grad():
        expected = load_model(merged_run / "model")(**batch()).logits
        assert (load_model(adapter_run / "model")(**batch()).logits - expected).abs().max() <= 1e-5
        unmerged = load_adapter_model(adapter_run / "model", merge=False)  # adapters applied on the fly
        assert (unmerged(**batch()).logits - expected).abs().max() <= 1e-5
        assert not torch.allclose(load_model(bases["tiny"])(**batch()).logits, expected)  # the fine-tune did something


def test_transformers_and_peft_load_the_adapter_onto_the_exported_base(bases, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    adapter_run = fine_tune(bases["runs"], bases["tiny"], "for-peft", "peft.r=4", "peft.merge=false",
                            "peft.targets=[attn,mlp.fc1]")
    result = cli("export", "hf", bases["tiny"], "validation.prompt_lens=[5]", "validation.steps=4", runs=tmp_path)
    assert result.exit_code == 0, result.output
    base = AutoModelForSeq2SeqLM.from_pretrained(newest_run(tmp_path, "export") / "export", trust_remote_code=True)
    peft_model = PeftModel.from_pretrained(base, str(adapter_run / "model")).eval()
    with torch.no_grad():
        theirs = peft_model(**batch(1)).logits
        ours = load_model(adapter_run / "model")(**batch(1)).logits
    assert (theirs - ours).abs().max() <= 1e-5


def test_an_adapter_whose_base_is_gone_is_a_one_line_error(bases, tmp_path):
    import shutil

    init = tmp_path / "init"
    shutil.copytree(bases["tiny"], init)
    adapter_run = fine_tune(bases["runs"], init, "orphan", "peft.r=2", "peft.merge=false")
    shutil.rmtree(init)
    result = cli("generate", adapter_run / "model", "prompt=hello", "--max-new-tokens", "2")
    assert result.exit_code == 2
    assert "is a LoRA adapter over" in result.output and "which is gone" in result.output


def test_distill_trains_a_lora_student(bases, tmp_path):
    teacher = train_run(tmp_path, "pretrain", [*TINY_PRETRAIN, "model.arch=deconly", "objective=causal_lm"],
                        name="teacher").path
    student = train_run(tmp_path, "pretrain", ["model=tiny", *FINE_TUNE, "tokenizer=run", f"tokenizer.path={teacher}"],
                        name="student").path
    run = train_run(tmp_path, "distill", [*DISTILL_DATA, *TINY_TRAINING, "teacher=run", f"teacher.path={teacher}",
                                          f"student.init={student}", "control=true", "peft=lora", "peft.r=2"]).path
    summary = json.loads((run / "status.json").read_text())["summary"]
    assert 0 < summary["trainable_parameters"] < summary["parameters"]
    distilled, control, init = (load_model(d) for d in (run / "model", run / "control" / "model", student / "model"))
    with torch.no_grad():
        logits = [m(**batch()).logits for m in (distilled, control, init)]
    assert not torch.allclose(logits[0], logits[2]) and not torch.allclose(logits[1], logits[2])


@pytest.mark.parametrize("overrides, message", [
    (["peft=lora"], "peft=lora fine-tunes an existing model: give init=MODEL"),
    (["peft=lora", "peft.r=0"], "peft.r and peft.alpha must be > 0"),
    (["peft=lora", "peft.targets=[ffn]"], "peft.targets"),
])
def test_bad_lora_settings_are_one_line_errors(tmp_path, overrides, message):
    result = cli("pretrain", "model=tiny", *FINE_TUNE, *overrides, runs=tmp_path)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_cross_attention_targets_on_a_decoder_only_model_are_refused(tmp_path):
    tokenizer_run = train_run(tmp_path, "pretrain", [*TINY_PRETRAIN, "model.arch=deconly", "objective=causal_lm"]).path
    result = cli("pretrain", f"init={tokenizer_run}", *FINE_TUNE, "peft=lora", "peft.targets=[cross_attn]", runs=tmp_path)
    assert result.exit_code == 2
    assert "a decoder-only model has no cross-attention" in result.output


def peak_memory_mb(runs, init, fine_tunes: dict[str, list[str]]) -> dict[str, float]:
    """Fine-tune `init` once per entry of `fine_tunes` (name -> extra overrides), each in a fresh process
    (so one run's memory does not hide the other's), the processes side by side (their imports take
    most of their time), one torch thread each (two processes of two threads on two cores wait on each
    other) -> each run's measured peak resident memory during training."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = {}
    try:
        for name, extra in fine_tunes.items():
            argv = [sys.executable, "-m", "slmctl", "pretrain", f"init={init}", *FINE_TUNE, "batch_size=4",
                    "max_source_len=32", *extra, "--runs-dir", str(runs / name)]
            log = open(runs / f"{name}.log", "w+")  # not a pipe: the process waited on last must not block on it
            processes[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, text=True, env=env), log
        peaks = {}
        for name, (process, log) in processes.items():
            process.wait(timeout=300)
            log.seek(0)
            assert process.returncode == 0, log.read()
            run = newest_run(runs / name, "pretrain")
            peaks[name] = json.loads((run / "status.json").read_text())["summary"]["throughput"]["peak_memory_mb"]
        return peaks
    finally:
        for process, log in processes.values():
            process.kill()
            log.close()


def test_lora_fine_tuning_needs_less_peak_memory_than_full_fine_tuning(inits, tmp_path):
    peaks = peak_memory_mb(tmp_path, inits["small"], {"full": [], "lora": ["peft=lora"]})
    full, lora = peaks["full"], peaks["lora"]
    parameters = load_model(inits["small"]).num_parameters()
    # full fine-tuning adds a gradient and two AdamW moments per weight (12 bytes); LoRA adds almost none
    assert full - lora > 0.5 * 12 * parameters / 2**20, (full, lora)
