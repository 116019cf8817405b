"""The slmctl command: composition errors, dry runs, listings, pretrain end to end, generate."""

import json

import pytest
from conftest import LEARNING_DATA, cli

# six steps, validated and checkpointed at 3 and 6: a run with every file a run leaves
SIX_STEPS = ["model=tiny", *LEARNING_DATA, "trainer.max_steps=6", "trainer.val_check_interval=3", "checkpoint_every=3",
             "trainer.log_every_n_steps=2"]


@pytest.mark.parametrize("override, message", [
    ("model=350m", "unknown model option '350m' (choose from: 1b, 330m,"),
    ("batch_size=abc", "batch_size: Value 'abc' of type 'str' could not be converted to Integer"),
    ("trainer.max_stepz=3", "unknown trainer argument 'max_stepz'"),
    ("optimm.lr=1", "unknown config key 'optimm'"),
    ("data.kind=nope", "data.kind='nope' is not one of: synthetic, files, hub"),
])
def test_bad_overrides_exit_2_with_one_line_and_no_run(tmp_path, override, message):
    result = cli("pretrain", override, runs=tmp_path / "runs")
    assert result.exit_code == 2
    assert message in result.output.replace("\n", " ") or message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


def test_missing_data_file_exits_2_and_marks_nothing_succeeded(tmp_path):
    not_synthetic = [o for o in SIX_STEPS if not o.startswith("data.")]
    result = cli("pretrain", "data=files", f"data.train={tmp_path}/nope.jsonl", *not_synthetic, runs=tmp_path / "runs")
    assert result.exit_code == 2
    assert "no such data file" in result.output
    statuses = [json.loads(p.read_text())["status"] for p in (tmp_path / "runs").glob("pretrain/*/status.json")]
    assert "succeeded" not in statuses and not (tmp_path / "runs" / "pretrain" / "latest").exists()


def test_required_value_is_named(tmp_path):
    result = cli("validate", "pretrain", "data=files")
    assert result.exit_code == 2 and "data.train is required" in result.output


def test_dry_run_prints_the_resolved_config(tmp_path):
    result = cli("pretrain", "model=tiny", "trainer.max_steps=7", "--dry-run", runs=tmp_path / "runs")
    assert result.exit_code == 0
    assert "preset: tiny" in result.output and "max_steps: 7" in result.output
    assert not (tmp_path / "runs").exists()


def test_ls_and_validate():
    result = cli("ls")
    assert result.exit_code == 0 and "objective" in result.output and "span_corruption" in result.output
    result = cli("ls", "model")
    assert result.exit_code == 0 and "330m" in result.output.split()
    assert cli("ls", "colours").exit_code == 2
    result = cli("validate", "pretrain", "model=330m", "objective=span_corruption")
    assert result.exit_code == 0 and "ok" in result.output
    result = cli("validate", "pretrain", "model=deconly-tiny", "trainer.deterministic=true", "--show")
    assert result.exit_code == 0 and "deterministic: true" in result.output


def test_pretrain_run_directory_latest_runs_and_generate(tmp_path):
    runs = tmp_path / "runs"
    result = cli("pretrain", *SIX_STEPS, "--name", "first", runs=runs)
    assert result.exit_code == 0, result.output
    run = (runs / "pretrain" / "latest").resolve()
    assert run.name.endswith("-first")
    for name in ("config.yaml", "command.txt", "env.json", "status.json", "metrics.jsonl", "log.txt", "inputs.json",
                 "MANIFEST.json", "model/model.safetensors", "model/model.json", "model/tokenizer.json",
                 "checkpoints/step-00000003.ckpt", "checkpoints/step-00000006.ckpt"):
        assert (run / name).is_file(), name
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "succeeded" and status["error"] is None and status["summary"]["steps"] == 6
    assert "pretrain" in (run / "command.txt").read_text() and "model=tiny" in (run / "command.txt").read_text()
    manifest = json.loads((run / "MANIFEST.json").read_text())
    import hashlib

    for rel, entry in manifest.items():
        data = (run / rel).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert "model/model.safetensors" in manifest
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in m for m in metrics) and any("tokens_per_s" in m for m in metrics)

    listing = cli("runs", runs=runs)
    assert listing.exit_code == 0 and "succeeded" in listing.output and "pretrain" in listing.output
    shown = cli("runs", "show", "pretrain/latest", runs=runs)
    assert shown.exit_code == 0 and "succeeded" in shown.output

    generated = cli("generate", "pretrain/latest", "prompt=Where does Mara live?", "--max-new-tokens", "5", runs=runs)
    assert generated.exit_code == 0, generated.output
    assert "> Where does Mara live?" in generated.output
    missing = cli("generate", "pretrain/nothing-here", "prompt=hi", runs=runs)
    assert missing.exit_code == 2


def test_generate_reads_a_prompt_file_and_reports_bad_lines(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hello"}\nnot json\n')
    result = cli("generate", tmp_path / "no-model", "--file", prompts)
    assert result.exit_code == 2 and "prompts.jsonl:2: not valid JSON" in result.output
    for given, message in (("prompt=", "prompt 1 is empty"), ("prompt=\ud800", "prompt 1 is not valid Unicode")):
        result = cli("generate", tmp_path / "no-model", given)  # refused before any model is read
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("device, message", [("cuda", "no CUDA device"), ("npu", "NPUs run exported ONNX graphs"),
                                             ("tpu", "unknown --device 'tpu'")])
def test_missing_device_is_a_one_line_error(tmp_path, device, message):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = cli("pretrain", "model=tiny", "--device", device, runs=tmp_path / "runs")
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "runs").exists()


def test_generate_with_drafts_prints_what_plain_generate_prints_and_the_draft_counts_on_stderr(tiny_model_dir, llama_dir):
    plain = cli("generate", tiny_model_dir, "prompt=Where does Ana live? Ana lives in Rome.", "--max-new-tokens", "12")
    drafted = cli("generate", tiny_model_dir, "prompt=Where does Ana live? Ana lives in Rome.", "--max-new-tokens", "12",
                  "--draft", "prompt", "--draft-tokens", "4")
    assert plain.exit_code == drafted.exit_code == 0, drafted.output
    assert drafted.stdout == plain.stdout
    assert "draft prompt:" in drafted.stderr and "per pass" in drafted.stderr
    itself = cli("generate", tiny_model_dir, "prompt=Where does Ana live? Ana lives in Rome.", "--max-new-tokens", "12",
                 "--draft", tiny_model_dir, "--draft-tokens", "4")  # a draft model: here the model itself
    assert itself.exit_code == 0 and itself.stdout == plain.stdout and f"draft model {tiny_model_dir}:" in itself.stderr
    for args, message in ((["--draft", "no-such-model"], "no model at 'no-such-model'"),
                          (["--draft", str(llama_dir)], "a draft model must be an encoder-decoder"),
                          (["--draft", "prompt", "--draft-tokens", "0"], "--draft-tokens must be >= 1"),
                          (["--draft", "prompt", "--draft-ngram", "0"], "--draft-ngram must be >= 1"),
                          (["--draft", "prompt", "--num-beams", "2"], "drop --num-beams or --draft")):
        refused = cli("generate", tiny_model_dir, "prompt=hi", *args)
        assert refused.exit_code == 2 and message in refused.output and len(refused.output.strip().splitlines()) == 1
    decoder_only = cli("generate", llama_dir, "prompt=hi", "--draft", "prompt")
    assert decoder_only.exit_code == 2 and "--draft works on encoder-decoders" in decoder_only.output
