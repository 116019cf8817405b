"""Model directories, reference-format import/export, and clear errors for bad files."""

import json
import shutil

import pytest
import torch
from conftest import TINY_PRETRAIN, cli, random_prompts
from reference_numerics import random_reference_state, reference_greedy, reference_logits

from slmctl.errors import CheckpointError
from slmctl.model import load_model, save_model
from slmctl.model.reference import export_reference_checkpoint

REF = dict(vocab=256, d=64, H=4, KV=2, hd=16, d_ff=128, n_enc=3, n_dec=2)


@pytest.mark.parametrize("arch", ["encdec", "deconly"])
def test_save_load_round_trip_is_bit_exact(arch, request, tmp_path):
    model = request.getfixturevalue(arch)
    save_model(model, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["checksums.json", "generation.json", "model.json",
                                                                 "model.safetensors"]
    loaded = load_model(tmp_path / "m")
    assert loaded.config == model.config and type(loaded) is type(model)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    ids, mask, _ = random_prompts([5, 3])
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=8),
                       loaded.generate(ids, attention_mask=mask, max_new_tokens=8))
    assert not list(tmp_path.glob("m/.*.tmp"))  # no temporaries left behind


def test_load_takes_a_dtype(encdec, tmp_path):  # runs and the rest are slmctl.refs' (tests/test_refs.py)
    save_model(encdec, tmp_path / "run" / "model")
    model = load_model(tmp_path / "run" / "model", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16


def test_tokenizer_is_saved_beside_the_model(encdec, tmp_path):
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({"<pad>": 0, "<s>": 1, "</s>": 2, "hi": 3}, unk_token="<pad>"))
    save_model(encdec, tmp_path / "m", tokenizer=tok)
    assert Tokenizer.from_file(str(tmp_path / "m" / "tokenizer.json")).token_to_id("hi") == 3


def _reference_file(tmp_path, **changes):
    state = random_reference_state(**REF)
    for key, value in changes.items():
        if value is None:
            state.pop(key)
        else:
            state[key] = value
    path = tmp_path / "model.pt"
    torch.save({"model_state_dict": state}, path)
    return path, state


def test_reference_import_matches_the_reference_numerics(tmp_path):
    path, state = _reference_file(tmp_path)
    model = load_model(path, head_dim=REF["hd"], eos_token_id=2).eval()
    assert (model.config.n_encoder_layers, model.config.n_decoder_layers) == (3, 2)
    g = torch.Generator().manual_seed(0)
    generated = set()
    for length in (1, 7, 33):
        enc = torch.randint(3, REF["vocab"], (2, length), generator=g)
        dec = torch.cat([torch.ones(2, 1, dtype=torch.long), torch.randint(3, REF["vocab"], (2, 9), generator=g)], 1)
        expected = reference_logits(state, enc, dec, REF["H"], REF["KV"])
        got = model(input_ids=enc, decoder_input_ids=dec).logits
        assert (got - expected).abs().max() <= 1e-4
        ours = model.generate(enc, max_new_tokens=16)
        theirs = reference_greedy(state, enc, REF["H"], REF["KV"], bos_id=1, eos_id=2, max_new_tokens=16)
        assert ours.tolist() == theirs.tolist()
        generated |= set(ours.flatten().tolist())
    assert len(generated) > 10  # real sequences, not one echoed token


def test_reference_export_import_round_trip(encdec, tmp_path):
    export_reference_checkpoint(encdec, tmp_path / "ref.pt")
    raw = torch.load(tmp_path / "ref.pt", weights_only=True)["model_state_dict"]
    assert "transformer.h.0.cross_attn.k_linear.weight" in raw and "lm_head.weight" in raw
    back = load_model(tmp_path / "ref.pt", head_dim=16, eos_token_id=encdec.config.eos_token_id,
                      max_seq_len=encdec.config.max_seq_len, name=encdec.config.name)
    assert back.config == encdec.config
    for (name, a), (_, b) in zip(encdec.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name


def _one_line_error(path, match, **kwargs):
    with pytest.raises(CheckpointError, match=match) as err:
        load_model(path, **kwargs)
    assert "\n" not in str(err.value)


def test_missing_key_is_named(tmp_path):
    path, _ = _reference_file(tmp_path, **{"transformer.h.1.cross_attn.v_linear.bias": None})
    _one_line_error(path, "missing transformer.h.1.cross_attn.v_linear.bias", head_dim=16)


def test_wrong_shape_is_named(tmp_path):
    path, _ = _reference_file(tmp_path, **{"transformer.e.2.mlp.fc2.weight": torch.zeros(64, 100)})
    _one_line_error(path, r"wrong shape transformer.e.2.mlp.fc2.weight \(64, 100\) != \(64, 128\)", head_dim=16)


def test_unexpected_key_is_named(tmp_path):
    path, _ = _reference_file(tmp_path, **{"transformer.e.0.attn.rotary.inv_freq": torch.zeros(8)})
    _one_line_error(path, "unexpected transformer.e.0.attn.rotary.inv_freq", head_dim=16)


def test_truncated_files_are_one_line_errors(encdec, tmp_path):
    path, _ = _reference_file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _one_line_error(path, "unreadable", head_dim=16)
    save_model(encdec, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    _one_line_error(tmp_path / "m", "model.safetensors: size 1000")  # against checksums.json
    (tmp_path / "m" / "checksums.json").unlink()  # unsealed, the reader's own check names it
    _one_line_error(tmp_path / "m", "unreadable")


def test_safetensors_key_problems_are_named(encdec, tmp_path):
    from safetensors.torch import load_file, save_file

    save_model(encdec, tmp_path / "m")
    (tmp_path / "m" / "checksums.json").unlink()  # unsealed: what the weights hold is checked too
    weights = tmp_path / "m" / "model.safetensors"
    state = load_file(weights)
    state.pop("decoder.layers.1.mlp.fc1.bias")
    save_file(state, weights)
    _one_line_error(tmp_path / "m", "missing decoder.layers.1.mlp.fc1.bias")


def test_not_a_model_is_a_clear_error(tmp_path):
    _one_line_error(tmp_path / "nowhere", "no such model")
    (tmp_path / "empty").mkdir()
    _one_line_error(tmp_path / "empty", "not a model directory")
    (tmp_path / "bad" ).mkdir()
    (tmp_path / "bad" / "model.json").write_text(json.dumps({"d_model": 64, "colour": "red"}))
    _one_line_error(tmp_path / "bad", "unknown model config keys: colour")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    _one_line_error(tmp_path / "other.pt", "not a reference-format checkpoint")


def test_untrusted_pickles_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    torch.save({"model_state_dict": Evil()}, tmp_path / "evil.pt")
    _one_line_error(tmp_path / "evil.pt", "unreadable")


@pytest.fixture(scope="module")
def trained_model_dir(tmp_path_factory):
    runs = tmp_path_factory.mktemp("checksums") / "runs"
    result = cli("pretrain", *TINY_PRETRAIN, "--name", "tiny", runs=runs)
    assert result.exit_code == 0, result.output
    return (runs / "pretrain" / "latest" / "model").resolve()


def flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_saved_model_directory_carries_checksums_of_every_other_file(trained_model_dir):
    checksums = json.loads((trained_model_dir / "checksums.json").read_text())
    files = sorted(p.name for p in trained_model_dir.iterdir() if p.name != "checksums.json")
    assert sorted(checksums) == files and {"model.safetensors", "tokenizer.json", "slmctl_tokenizer.json"} <= set(files)


@pytest.mark.parametrize("damaged", ["model.safetensors", "tokenizer.json"])
def test_a_model_directory_copied_out_of_its_run_is_verified_on_load(trained_model_dir, tmp_path, monkeypatch, damaged):
    copy = tmp_path / "copied-model"
    shutil.copytree(trained_model_dir, copy)
    assert cli("generate", copy, "prompt=hi", "--max-new-tokens", 2).exit_code == 0
    flip_last_byte(copy / damaged)
    result = cli("generate", copy, "prompt=hi", "--max-new-tokens", 2)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and damaged in errors[0] and "SLMCTL_SKIP_CHECKSUMS=1" in errors[0], result.stderr
    if damaged == "model.safetensors":  # weights edited by hand: the opt-out loads them
        monkeypatch.setenv("SLMCTL_SKIP_CHECKSUMS", "1")
        assert cli("generate", copy, "prompt=hi", "--max-new-tokens", 2).exit_code == 0


def test_model_directories_without_checksums_still_load(encdec, tmp_path):
    save_model(encdec, tmp_path / "m")
    (tmp_path / "m" / "checksums.json").unlink()  # as older versions and Hugging Face directories have it
    assert load_model(tmp_path / "m").config == encdec.config


def test_unreadable_checksums_are_a_one_line_error(encdec, tmp_path):
    save_model(encdec, tmp_path / "m")
    (tmp_path / "m" / "checksums.json").write_text("{not json")
    _one_line_error(tmp_path / "m", "checksums.json is unreadable")
