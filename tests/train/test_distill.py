"""The distill stage: alignment, a real Hugging Face teacher on disk, the logit cache, vocabularies,
resume and the control comparison."""

import json

import pytest
import torch
from conftest import DISTILL_DATA, CountSteps, Crash, cli, resumed_from, train_run

from slmctl.config.compose import compose
from slmctl.data.synthetic import SyntheticWorld
from slmctl.data.tokenizer import load_hf_tokenizer, train_bpe
from slmctl.errors import ConfigError
from slmctl.model.config import vocab_size_for
from slmctl.runs.run import Run
from slmctl.train import distill, kd_losses
from slmctl.train.distill_data import DistillBatcher
from slmctl.train.teacher import load_teacher, same_tokenizer


def teacher_cfg(path, kind="hf"):
    return compose("distill", [f"teacher.path={path}"] if kind == "hf" else ["teacher=run", f"teacher.path={path}"]).teacher


# -- alignment -------------------------------------------------------------------------


def test_teacher_positions_are_the_ones_predicting_each_target_token(llama_dir, tmp_path):
    teacher = load_teacher(teacher_cfg(llama_dir), tmp_path)
    tok = teacher.tokenizer
    pairs = [(e["source"], e["target"]) for e in SyntheticWorld(seed=0, n_people=200).qa("train", 6, 1, 3)]
    batcher = DistillBatcher(tok, tok, teacher.start_ids, True, max_source=64, max_target=12)
    examples = batcher.tokenize("train", pairs)
    batch = batcher(examples)
    assert teacher.start_ids == [tok.bos_id]
    assert torch.equal(batch["kd_mask"], batch["labels"] != -100)
    batched = teacher.aligned_logits(batch["teacher_input_ids"], batch["teacher_attention_mask"], batch["teacher_positions"])
    for i, example in enumerate(examples):
        row = [tok.bos_id, *example.source, *example.target]
        for j, token in enumerate(example.target):
            position = int(batch["teacher_positions"][i, j])
            # brute force: the only position whose prefix is bos + prompt + target[:j]
            expected = [p for p in range(len(row)) if row[: p + 1] == [tok.bos_id, *example.source, *example.target[:j]]]
            assert expected == [position]
            next_token = int(batch["teacher_input_ids"][i, position + 1])
            assert tok.decode([next_token], skip_special_tokens=False) == tok.decode([token], skip_special_tokens=False)
        # and the batched, padded logits there are the teacher's logits on this example alone
        alone = teacher.model(input_ids=torch.tensor([row])).logits[0]
        n = len(example.target)
        assert torch.allclose(batched[i, :n], alone[len(row) - n - 1: len(row) - 1], atol=1e-5)


def test_different_tokenizers_pair_positions_up_to_the_shorter_target(llama_dir, tmp_path, world_texts):
    teacher = load_teacher(teacher_cfg(llama_dir), tmp_path)
    student_tok = train_bpe(world_texts, vocab_size=320)
    assert not same_tokenizer(teacher.tokenizer, student_tok, 320)
    batcher = DistillBatcher(student_tok, teacher.tokenizer, teacher.start_ids, False, max_source=64, max_target=12)
    examples = batcher.tokenize("train", [("Who lives in Tobrin?", "Alessandro Vantaggiato-Ruiz"), ("Q", "an answer")])
    batch = batcher(examples)
    for i, e in enumerate(examples):
        paired = min(len(e.target), len(e.teacher_target))
        assert batch["kd_mask"][i].tolist() == [j < paired for j in range(batch["kd_mask"].shape[1])]
        assert e.teacher_target[-1] == teacher.tokenizer.eos_id and e.target[-1] == student_tok.eos_id


# -- a real teacher on disk ------------------------------------------------------------------


def test_distilling_a_saved_llama_lowers_the_kd_loss(llama_dir, tmp_path):
    run = train_run(tmp_path / "runs", "distill", [*DISTILL_DATA, f"teacher.path={llama_dir}", "student=tiny",
                    "trainer.max_steps=30", "trainer.val_check_interval=10", "optim.lr=1e-2", "optim.warmup_steps=3",
                    "kd.alpha=0.9"], name="kd")
    kd = [m["val_kd_loss"] for m in run.metrics() if "val_kd_loss" in m]
    assert len(kd) == 3 and kd[-1] < 0.8 * kd[0], kd
    summary = run.status()["summary"]
    assert summary["teacher"] == str(llama_dir) and summary["steps"] == 30
    assert {"train_kd_loss", "train_ce_loss", "train_loss", "train_agreement", "tokens_per_s"} <= set().union(*run.metrics())
    assert {"val_kd_loss", "val_ce_loss", "val_loss", "val_agreement"} <= set(summary)
    assert [i["role"] for i in run.inputs()] == ["teacher"] and (run.model_dir / "model.safetensors").is_file()


@pytest.mark.parametrize("targets", ["teacher", "student", "mix"])
def test_generated_targets_train(llama_dir, tmp_path, targets):
    run = train_run(tmp_path / "runs", "distill", [*DISTILL_DATA, f"teacher.path={llama_dir}", "student=tiny",
                    "trainer.max_steps=4", "trainer.val_check_interval=4", f"kd.targets={targets}",
                    "kd.on_policy_prob=0.5", "kd.student_top_k=20", "kd.teacher_temperature=0.8"], name=targets)
    steps = [m for m in run.metrics() if "train_kd_loss" in m]
    assert len(steps) == 4 and all(m["train_kd_loss"] > 0 for m in steps)
    if targets == "mix":
        assert {m["on_policy"] for m in steps} == {0.0, 1.0}  # seeded draws: both kinds happen


def test_teacher_written_targets_are_the_teachers_own_greedy_generation(llama_dir, tmp_path):
    """kd.targets=teacher: the batched, left-padded generation behind the student's labels equals
    what transformers' own `generate` gives for each prompt alone (greedy), cut after eos, or
    closed with one when the budget ran out."""
    from slmctl.train.teacher import cut_after_eos

    teacher = load_teacher(teacher_cfg(llama_dir), tmp_path)
    tok = teacher.tokenizer
    pairs = [(e["source"], e["target"]) for e in SyntheticWorld(seed=3, n_people=200).qa("train", 5, 1, 3)]
    batcher = DistillBatcher(tok, tok, teacher.start_ids, True, max_source=256, max_target=12)
    examples = batcher.tokenize("train", pairs)
    assert len({len(e.teacher_source) for e in examples}) > 1  # prompts of different lengths: padding matters
    generated = teacher.generate([e.teacher_source for e in examples], max_new_tokens=12)
    batch = batcher.with_targets("train", list(range(len(examples))), generated, "teacher")
    for i, example in enumerate(examples):
        prompt = torch.tensor([[*teacher.start_ids, *example.teacher_source]])
        alone = teacher.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                                       do_sample=False, pad_token_id=tok.pad_id, eos_token_id=tok.eos_id)
        expected = cut_after_eos(alone[0, prompt.shape[1]:].tolist(), tok.eos_id)
        expected = expected if expected[-1] == tok.eos_id else [*expected[:11], tok.eos_id]
        labels = batch["labels"][i]
        assert labels[labels != -100].tolist() == expected


def test_an_encoder_decoder_run_is_not_a_teacher(tmp_path):
    encdec = train_run(tmp_path / "runs", "pretrain", ["model=tiny", "objective=seq2seq", "tokenizer.vocab_size=300",
                                                       "trainer.max_steps=1", *DISTILL_DATA], name="encdec")
    with pytest.raises(ConfigError, match="a teacher must be a decoder-only LM"):
        load_teacher(teacher_cfg(encdec.path, kind="run"), tmp_path / "runs")
    with pytest.raises(ConfigError, match="a teacher must be a decoder-only LM"):  # its model dir, as kind hf
        load_teacher(teacher_cfg(encdec.model_dir), tmp_path)


# -- the logit cache ----------------------------------------------------------------------


def test_cached_loss_equals_live_loss_with_full_topk_and_is_close_with_small_k(llama_dir, tmp_path):
    vocab = vocab_size_for(400)
    losses = {}
    for name, k, dtype in [("full", vocab, "float32"), ("k32", 32, "float16")]:
        cfg = compose("distill", [*DISTILL_DATA, f"teacher.path={llama_dir}", "student=tiny", "kd.cache=true",
                                  f"kd.cache_topk={k}", f"kd.cache_dtype={dtype}", "kd.temperature=2.0"])
        run = Run.create(tmp_path / "runs", "distill", name, cfg, argv=["test"])
        teacher = load_teacher(cfg.teacher, tmp_path)
        tok = teacher.tokenizer
        batcher = DistillBatcher(tok, tok, teacher.start_ids, True, 64, 12)
        pairs = [(e["source"], e["target"]) for e in SyntheticWorld(seed=0, n_people=200).qa("train", 20, 1, 2)]
        batcher.tokenize("train", pairs)
        batcher.tokenize("validation", pairs[:4])
        batcher.cache = distill._logit_cache(cfg, run, teacher, batcher, vocab)
        index = json.loads((run.path / "teacher_cache" / "index.json").read_text())
        assert index["k"] == k and index["splits"]["train"]["examples"] == 20
        cached = batcher(batcher.examples["train"][:8])
        batcher.cache = None
        live = batcher(batcher.examples["train"][:8])
        student_logits = torch.randn(*live["labels"].shape, vocab) * 2
        teacher_logits = teacher.aligned_logits(live["teacher_input_ids"], live["teacher_attention_mask"],
                                                live["teacher_positions"])
        dense = kd_losses.kd_loss(student_logits, teacher_logits, live["kd_mask"], temperature=2.0)
        sparse = kd_losses.topk_kd_loss(student_logits, cached["cache_ids"], cached["cache_logp"], cached["cache_tail"],
                                        cached["kd_mask"], temperature=2.0)
        losses[name] = (float(dense), float(sparse))
    dense, sparse = losses["full"]
    assert sparse == pytest.approx(dense, rel=1e-5)
    dense, sparse = losses["k32"]
    assert sparse == pytest.approx(dense, rel=0.05)


def test_training_from_the_cache(llama_dir, tmp_path):
    run = train_run(tmp_path / "runs", "distill", [*DISTILL_DATA, f"teacher.path={llama_dir}", "student=tiny",
                    "kd.cache=true", "trainer.max_steps=6", "trainer.val_check_interval=6"], name="cache")
    assert (run.path / "teacher_cache" / "train-00000.safetensors").is_file()
    assert run.status()["summary"]["val_kd_loss"] > 0
    assert "teacher cache: top-64" in (run.path / "log.txt").read_text()


# -- vocabularies -----------------------------------------------------------------------


def test_different_tokenizers_are_an_error_unless_uld(llama_dir, tmp_path):
    common = [*DISTILL_DATA, f"teacher.path={llama_dir}", "student=tiny", "tokenizer=bpe", "tokenizer.vocab_size=320",
              "trainer.max_steps=4", "trainer.val_check_interval=4"]
    result = cli("distill", *common, runs=tmp_path / "runs")
    assert result.exit_code == 2
    assert "tokenizer" in result.output and "kd.cross_tokenizer=uld" in result.output and "Traceback" not in result.output
    run = train_run(tmp_path / "runs", "distill", [*DISTILL_DATA, f"teacher.path={llama_dir}", "student=tiny",
                    "tokenizer=bpe", "tokenizer.vocab_size=320", "kd.cross_tokenizer=uld", "trainer.max_steps=4",
                    "trainer.val_check_interval=4"], name="uld")
    assert run.status()["summary"]["val_kd_loss"] > 0
    assert "Universal Logit Distillation" in (run.path / "log.txt").read_text()


def test_same_tokenizer_with_a_wider_student_vocabulary_uses_the_shared_range(llama_dir, tmp_path):
    run = train_run(tmp_path / "runs", "distill", [*DISTILL_DATA, f"teacher.path={llama_dir}", "student=tiny",
                    "student.vocab_size=640", "trainer.max_steps=2", "trainer.val_check_interval=2"], name="wide")
    assert "teacher 512 ids, student 640; the same tokenizer, so KD compares the shared first 512 ids" in \
        (run.path / "log.txt").read_text()


def test_the_teachers_tokenizer_becomes_the_students(llama_dir):
    teacher_tok = load_hf_tokenizer(str(llama_dir), n_sentinels=0)
    student_tok = load_hf_tokenizer(str(llama_dir), n_sentinels=32)
    assert same_tokenizer(teacher_tok, student_tok, 512)


@pytest.mark.parametrize("override, message", [
    (["kd.loss=kl"], "kd.loss='kl' is not one of: forward_kl, reverse_kl, jsd"),
    (["kd.alpha=1.5"], "kd.alpha must be in [0.0, 1.0], got 1.5"),
    (["kd.loss=jsd", "kd.beta=1.0"], "kd.beta must be in (0, 1) for kd.loss=jsd"),
    (["kd.targets=teachers"], "kd.targets='teachers' is not one of"),
])
def test_bad_kd_settings_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as error:
        compose("distill", override)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_cache_and_a_sharded_teacher_need_gold_targets(llama_dir, tmp_path):
    with pytest.raises(ConfigError, match="kd.cache=true needs kd.targets=gold"):
        train_run(tmp_path / "runs", "distill", [*DISTILL_DATA, f"teacher.path={llama_dir}", "kd.cache=true",
                  "kd.targets=student"], name="bad")
    with pytest.raises(ConfigError, match="teacher.shard=true needs kd.targets=gold"):
        train_run(tmp_path / "runs", "distill", [*DISTILL_DATA, f"teacher.path={llama_dir}", "teacher.shard=true",
                  "kd.targets=teacher"], name="bad")


def test_missing_teacher_directory_is_a_one_line_error(tmp_path):
    result = cli("distill", f"teacher.path={tmp_path}/nowhere", runs=tmp_path / "runs")
    assert result.exit_code == 2 and "no such directory" in result.output and "Traceback" not in result.output


# -- resume and control -----------------------------------------------------------------------


RESUMES = {  # variant -> (overrides, [(kill at step, of fit)] for each process before the last)
    "generated targets": (["kd.targets=mix"], [(5, 1)]),
    # killed distilling from the cache, then again training the control: the second resume does
    # not retrain the distilled student and continues the control from its own checkpoint
    "teacher cache and control": (["kd.cache=true", "kd.cache_topk=16", "control=true"], [(5, 1), (5, 2)]),
}


@pytest.mark.parametrize("variant", RESUMES)
def test_killed_and_resumed_distillation_continues_to_the_same_weights(llama_dir, tmp_path, variant):
    """Killed at step 5 of 8 (checkpoints every 3): each resumed process runs only the steps after
    the checkpoint (5), logs where it resumed, and the run ends with the uninterrupted run's
    weights, bit for bit (the control's too) and the same validation losses."""
    from safetensors.torch import load_file

    extra, kills = RESUMES[variant]
    overrides = [*DISTILL_DATA, f"teacher.path={llama_dir}", "student=tiny", "student.dropout=0.1", *extra,
                 "trainer.max_steps=8", "trainer.val_check_interval=4", "checkpoint_every=3"]
    whole = train_run(tmp_path / "runs", "distill", overrides, name="whole")
    cfg = compose("distill", overrides)
    killed = Run.create(tmp_path / "runs", "distill", "killed", cfg, argv=["test"])
    with pytest.raises(SystemExit):
        distill.run(cfg, killed, callbacks=[Crash(*kills[0])])
    resumed_cfg = compose("distill", [*overrides, f"resume={killed.path}"])
    for step, fit in kills[1:]:  # killed again after resuming
        counted = CountSteps()
        with pytest.raises(SystemExit):
            distill.run(resumed_cfg, Run.open(killed.path), callbacks=[counted, Crash(step, fit=fit)])
        assert counted.steps == (8 - 3) + step  # the rest of the first model, then the second up to its kill
    counted = CountSteps()
    distill.run(resumed_cfg, Run.open(killed.path), callbacks=[counted])
    assert counted.steps == 8 - 3
    checkpoints = ["checkpoints/step-00000003.ckpt", "control/checkpoints/step-00000003.ckpt"][:len(kills)]
    assert resumed_from(killed.path) == [f"resumed from step 3 (checkpoint {c}); 5 steps to go" for c in checkpoints]
    for model in ["model", "control/model"][:len(kills)]:
        a, b = load_file(whole.path / model / "model.safetensors"), load_file(killed.path / model / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), model
    losses = [{k: v for k, v in r.status()["summary"].items() if "val_" in k} for r in (whole, Run.open(killed.path))]
    assert losses[0] == losses[1] and ("val_ce_gain" in losses[0]) == ("control=true" in extra)


def test_control_student_is_trained_and_compared(llama_dir, tmp_path):
    run = train_run(tmp_path / "runs", "distill", [*DISTILL_DATA, f"teacher.path={llama_dir}", "student=tiny",
                    "control=true", "trainer.max_steps=4", "trainer.val_check_interval=4"], name="control")
    summary = run.status()["summary"]
    assert summary["val_ce_gain"] == pytest.approx(summary["control_val_ce_loss"] - summary["val_ce_loss"], abs=1e-4)
    assert (run.path / "control" / "model" / "model.safetensors").is_file()
    assert any("control_val_ce_loss" in m for m in run.metrics())
    assert not any("control_train_kd_loss" in m for m in run.metrics())  # alpha=0: no teacher in training steps
