"""Security defaults: no pickles beyond tensors, no remote code unless asked (and then logged),
data paths confined to their data directory."""

import json

import pytest
import torch
from conftest import DISTILL_DATA, TINY_PRETRAIN, cli, save_llama, stage_runs
from PIL import Image

from slmctl.config.compose import compose
from slmctl.data.images import load_jsonl
from slmctl.data.sources import DataError
from slmctl.errors import CheckpointError
from slmctl.train.checkpoints import VerifiedCheckpointIO


class Payload:
    """What a malicious pickle carries: code that runs when it is unpickled."""

    def __reduce__(self):
        return (print, ("pwned",))


def test_a_training_checkpoint_holding_more_than_tensors_is_refused(tmp_path):
    io = VerifiedCheckpointIO()
    path = tmp_path / "step-00000001.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "payload": Payload()}, path)  # recorded, so only the pickle is wrong
    with pytest.raises(CheckpointError, match="refusing to unpickle") as error:
        io.load_checkpoint(path)
    assert "\n" not in str(error.value)


def test_remote_code_is_off_by_default_everywhere():
    for teacher in ("llama", "phi3", "qwen2", "run"):
        assert compose("distill", [f"teacher={teacher}", "teacher.path=x"]).teacher.trust_remote_code is False
    assert compose("eval", ["judge=local", "judge.path=x"]).judge.trust_remote_code is False


def test_remote_code_when_asked_for_is_passed_on_and_logged(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from slmctl.data.synthetic import SyntheticWorld
    from slmctl.data.tokenizer import train_bpe

    llama = save_llama(tmp_path / "llama", train_bpe(SyntheticWorld(seed=0, n_people=200).texts("train", 200), 400))
    asked = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        asked.append(kwargs.get("trust_remote_code"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    result = cli("distill", f"teacher.path={llama}", "teacher.trust_remote_code=true", "tokenizer=teacher",
                 "student=tiny", *DISTILL_DATA, "trainer.max_steps=1", "trainer.val_check_interval=1",
                 "control=false", runs=tmp_path / "runs")
    assert result.exit_code == 0, result.output
    assert asked == [True]
    (run,) = stage_runs(tmp_path / "runs", "distill")
    log = run / "log.txt"
    assert "teacher.trust_remote_code=true: code from the teacher's repository runs in this process" in log.read_text()


def test_image_paths_cannot_leave_the_data_directory_unless_allowed(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "outside.png")
    rows = data / "rows.jsonl"
    rows.write_text(json.dumps({"image": "../outside.png", "prompt": "<image> colour?", "answer": "red"}) + "\n")
    with pytest.raises(DataError, match=r"rows.jsonl:1: .*outside"):
        load_jsonl(rows)
    examples, skipped = load_jsonl(rows, allow_outside_root=True)
    assert len(examples) == 1 and skipped == 0


def test_model_artifacts_hold_no_pickles(tmp_path):
    result = cli("pretrain", *TINY_PRETRAIN, runs=tmp_path / "runs")
    assert result.exit_code == 0, result.output
    (run,) = stage_runs(tmp_path / "runs", "pretrain")
    model_dir = run / "model"
    assert sorted(p.name for p in model_dir.iterdir()) == ["checksums.json", "generation.json", "model.json", "model.safetensors",
                                                           "slmctl_tokenizer.json", "tokenizer.json"]
