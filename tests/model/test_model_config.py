"""Presets, parameter counts and the model.json format."""

import pytest

from slmctl.model import PRESETS, ModelConfig, build_model, count_parameters, get_preset
from slmctl.model.config import vocab_size_for


def test_330m_matches_the_paper():
    cfg = get_preset("330m")
    assert (cfg.n_encoder_layers, cfg.n_decoder_layers, cfg.d_model) == (20, 10, 1024)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size) == (6, 3, 64, 4096, 32128)
    assert abs(count_parameters(cfg) - 332.0e6) <= 0.1e6


@pytest.mark.parametrize("name", ["tiny", "small", "330m", "1b"])
def test_decoder_only_baseline_matches_within_3_percent(name):
    encdec, deconly = get_preset(name), get_preset(f"deconly-{name}")
    assert deconly.arch == "deconly" and deconly.n_encoder_layers == 0
    for field in ("d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff", "vocab_size"):
        assert getattr(deconly, field) == getattr(encdec, field)
    ratio = count_parameters(deconly) / count_parameters(encdec)
    assert 0.97 <= ratio <= 1.03, ratio


def test_preset_sizes():
    assert 1e5 <= count_parameters(get_preset("tiny")) < 1e6
    assert 20e6 <= count_parameters(get_preset("small")) <= 40e6
    assert 0.9e9 <= count_parameters(get_preset("1b")) <= 1.1e9
    one_b = get_preset("1b")
    assert one_b.n_encoder_layers == 2 * one_b.n_decoder_layers


@pytest.mark.parametrize("name", ["tiny", "deconly-tiny", "small", "deconly-small"])
def test_analytic_count_equals_built_model(name):
    assert build_model(name).num_parameters() == count_parameters(get_preset(name))


def test_every_linear_has_bias_except_the_tied_head():
    import torch.nn as nn

    model = build_model("tiny")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(m.bias is not None for m in linears)
    assert not any("lm_head" in n for n, _ in model.named_parameters())  # the head is the embedding


def test_vocab_follows_the_tokenizer():
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(297)}}, unk_token="<pad>"))
    model = build_model("tiny", tokenizer=tok)
    assert model.config.vocab_size == 384 == vocab_size_for(300)
    assert (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id) == (0, 1, 2)
    assert vocab_size_for(32064) == 32128  # the paper's Phi-3.5 vocabulary


def test_config_json_round_trip(tmp_path):
    cfg = get_preset("small").replace(dropout=0.1, rope_factor=2.0)
    cfg.save_json(tmp_path / "model.json")
    assert ModelConfig.load_json(tmp_path / "model.json") == cfg


@pytest.mark.parametrize("changes, message", [
    (dict(n_heads=6, n_kv_heads=4), "multiple of n_kv_heads"),
    (dict(arch="rnn"), "arch must be one of"),
    (dict(d_model=0), "d_model must be a positive integer"),
    (dict(eos_token_id=99999), "outside the vocabulary"),
])
def test_invalid_configs_are_one_line_errors(changes, message):
    with pytest.raises(ValueError, match=message) as err:
        get_preset("330m").replace(**changes)
    assert "\n" not in str(err.value)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="choose from: tiny, mini, small, 330m, 1b"):
        build_model("350m")
    assert set(PRESETS) >= {"tiny", "small", "330m", "1b", "deconly-tiny", "deconly-small", "deconly-330m", "deconly-1b"}
