"""Fresh models: a preset or a `ModelConfig` built with random weights, its vocabulary and
special tokens taken from a tokenizer when one is given."""

from __future__ import annotations

import torch

from slmctl.model.base import LanguageModel
from slmctl.model.config import ModelConfig, get_preset, vocab_size_for


def build_model(config: str | ModelConfig = "330m", tokenizer=None, seed: int | None = None, **overrides) -> LanguageModel:
    """A freshly initialised model from a preset name or a `ModelConfig`.

    With a `tokenizer`, the vocabulary follows it (padded to a multiple of 128) and the
    pad/bos/eos ids are taken from it. `overrides` replace config fields.
    """
    from slmctl.model.deconly import DecoderOnlyLM
    from slmctl.model.encdec import EncoderDecoderLM

    cfg = get_preset(config) if isinstance(config, str) else config
    if tokenizer is not None:
        overrides = {**tokenizer_fields(tokenizer), **overrides}
    if overrides:
        cfg = cfg.replace(**overrides)
    if seed is not None:
        torch.manual_seed(seed)
    return EncoderDecoderLM(cfg) if cfg.is_encoder_decoder else DecoderOnlyLM(cfg)


def tokenizer_fields(tokenizer) -> dict:
    """vocab_size and special-token ids from a `tokenizers.Tokenizer` or a Hugging Face tokenizer."""
    if hasattr(tokenizer, "get_vocab_size"):
        size, lookup = tokenizer.get_vocab_size(with_added_tokens=True), tokenizer.token_to_id
    else:
        size, lookup = len(tokenizer), tokenizer.convert_tokens_to_ids
    fields = {"vocab_size": vocab_size_for(size)}
    names = {"pad_token_id": ("<pad>", "[PAD]", "<unk>"), "bos_token_id": ("<s>", "<bos>", "[BOS]", "<|begin_of_text|>"),
             "eos_token_id": ("</s>", "<eos>", "[EOS]", "<|endoftext|>", "<|end_of_text|>")}
    for field, candidates in names.items():
        attr = getattr(tokenizer, field, None)
        if isinstance(attr, int):
            fields[field] = attr
            continue
        for token in candidates:
            token_id = lookup(token)
            if isinstance(token_id, int) and token_id >= 0 and (field == "pad_token_id" or token != "<unk>"):
                fields[field] = token_id
                break
    return fields
