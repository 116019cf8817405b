"""The pretrain stage: tokenizer -> model -> Lightning fit -> model artifact in the run.

`run(cfg, run)` trains (or, with `init=`, fine-tunes) one model on one objective and
writes `model/` (weights, model.json, generation.json, tokenizer) into the run directory;
resumable checkpoints go to `checkpoints/step-XXXXXXXX.ckpt` (see train/fit.py).
"""

from __future__ import annotations

import time
from functools import partial

import lightning as L
import torch
from omegaconf import OmegaConf

from slmctl.atomic import set_new_file_mode
from slmctl.data import objectives as obj
from slmctl.data.sources import load_pairs, load_texts
from slmctl.data.store import TokenSplit, TokenStore
from slmctl.data.streaming import Documents, Pairs, Windows
from slmctl.data.tokenizer import TextTokenizer, load_hf_tokenizer, train_bpe
from slmctl.errors import ConfigError
from slmctl.model import build_model
from slmctl.model.config import model_config_from, model_name
from slmctl.model.lora import add_lora, check_lora_init, parameter_counts, save_trained
from slmctl.refs import record_source, resolve
from slmctl.train.datamodule import StepStream, TrainingDataModule
from slmctl.train.fit import fit, quiet_lightning
from slmctl.train.loggers import training_loggers
from slmctl.train.module import LMTrainingModule
from slmctl.train.prepare import open_prepared, prepared_tokenizer
from slmctl.train.throughput import throughput

ENCDEC_OBJECTIVES = ("prefix_lm", "span_corruption", "seq2seq")
CAUSAL_OBJECTIVES = ("causal_lm", "seq2seq")  # seq2seq: prompt + completion, loss on the completion
TOKENIZER_DIR = "tokenizer"  # the run's tokenizer, saved before training so a resume reuses it


def run(cfg, run, callbacks: list | None = None):
    """Train as `cfg` says, writing into `run`; returns the run (succeeded)."""
    quiet_lightning()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    arch = cfg.model.arch
    objective = cfg.objective.name
    allowed = ENCDEC_OBJECTIVES if arch == "encdec" else CAUSAL_OBJECTIVES
    if objective not in allowed:
        raise ConfigError(f"objective={objective} does not train a {arch} model (use one of: {', '.join(allowed)})")
    if cfg.init and arch == "hf-causal":
        raise ConfigError("init= is not supported for model=hf-causal")

    seq2seq_data = objective == "seq2seq"
    if cfg.data.kind == "prepared":
        store = open_prepared(cfg.data.path, run)
        _check_layout(store, seq2seq_data)
        tokenizer = prepared_tokenizer(store, run)
        train_split, val_split = store.split("train"), store.split("validation")
        run.log(f"data: {store.path} ({train_split.n_documents} train / {val_split.n_documents} validation "
                f"{store.layout}, streamed)")
    else:
        train_data = load_pairs(cfg.data, "train") if seq2seq_data else load_texts(cfg.data, "train")
        val_data = load_pairs(cfg.data, "validation") if seq2seq_data else load_texts(cfg.data, "validation")
        run.log(f"data: {len(train_data)} train / {len(val_data)} validation examples ({cfg.data.kind})")
        tokenizer = build_tokenizer(cfg, run, train_data, seq2seq_data)
        train_split, val_split = in_memory_split(tokenizer, train_data), in_memory_split(tokenizer, val_data)
    model = _model(cfg, run, tokenizer, arch)
    n_params = sum(p.numel() for p in model.parameters())
    name = model.config.name if cfg.init else model_name(cfg.model)  # init=: the model's own, not the preset option's
    run.log(f"model: {name}, {n_params / 1e6:.2f}M parameters; tokenizer: {len(tokenizer)} tokens")
    lora = None
    if cfg.peft is not None:
        check_lora_init(cfg.peft, cfg.init, "init")
        lora = add_lora(model, cfg.peft, run)

    special = obj.SpecialIds(pad=tokenizer.pad_id, bos=tokenizer.bos_id, eos=tokenizer.eos_id,
                             sentinels=tokenizer.sentinel_ids)
    train_rows, make_batch = training_rows(cfg, train_split, special, causal=arch != "encdec")
    val_rows, _ = training_rows(cfg, val_split, special, causal=arch != "encdec")
    if cfg.data.kind == "prepared":
        val_rows = [val_rows[i] for i in range(min(len(val_rows), cfg.data.validation_rows))]
    if not len(train_rows) or not len(val_rows):
        raise ConfigError(f"no training rows: the data has {train_split.n_documents} train / {val_split.n_documents} "
                          f"validation documents, too few tokens for one {train_rows.describe()} row")
    workers = cfg.data.num_workers if cfg.data.kind == "prepared" else 0
    datamodule = TrainingDataModule(train_rows, val_rows, make_batch, cfg.batch_size, cfg.seed, num_workers=workers,
                                    describe=train_rows.describe())
    efficiency = packing_efficiency(datamodule)
    run.log(f"rows: {len(train_rows)} train / {len(val_rows)} validation ({train_rows.describe()}); "
            f"non-padding fraction {efficiency:.3f}")
    module = LMTrainingModule(model, cfg.optim, max_steps=cfg.trainer.max_steps, hf_causal=arch == "hf-causal")

    started = time.perf_counter()
    trainer = fit(module, datamodule, run, OmegaConf.to_container(cfg.trainer, resolve=True), run.checkpoint_dir,
                  training_loggers(run, cfg.logger), cfg.checkpoint_every, resume=bool(cfg.resume), callbacks=callbacks)
    seconds = time.perf_counter() - started
    if not run.is_writer:  # another rank of a multi-process run: rank 0 writes the artifacts
        return run

    trainable, _ = parameter_counts(model)
    _save_artifact(model, tokenizer, run, arch, lora, cfg)
    val_loss = trainer.callback_metrics.get("val_loss")
    summary = {"val_loss": float(val_loss) if val_loss is not None else None, "steps": trainer.global_step,
               "parameters": n_params, "trainable_parameters": trainable, "train_seconds": round(seconds, 2),
               "objective": objective, "model": name, "packing_efficiency": round(efficiency, 4)}
    run.succeed(summary | throughput(run))
    return run


# -- pieces -------------------------------------------------------------------


def build_tokenizer(cfg, run, train_data, seq2seq_data: bool) -> TextTokenizer:
    saved = run.path / TOKENIZER_DIR
    if saved.is_dir():  # a resumed run keeps the tokenizer it started with
        return TextTokenizer.load(saved)
    if cfg.get("init"):
        tokenizer = TextTokenizer.load(resolve(cfg.init, run.runs_dir, allow=("model_dir",), purpose="init=").path)
    elif cfg.tokenizer.kind == "teacher":
        raise ConfigError("tokenizer=teacher is for `slmctl distill` (there is no teacher here); use bpe, hf or run")
    elif cfg.tokenizer.kind == "run":
        source = resolve(cfg.tokenizer.path, run.runs_dir, allow=("model_dir", "hf_dir"), purpose="tokenizer=run")
        tokenizer = TextTokenizer.load(source.path)
        source.record_input(run)
    elif cfg.tokenizer.kind == "bpe":
        texts = [f"{s}\n{t}" for s, t in train_data] if seq2seq_data else train_data
        tokenizer = train_bpe(texts[: cfg.tokenizer.max_training_texts], cfg.tokenizer.vocab_size,
                              cfg.tokenizer.min_frequency, cfg.tokenizer.n_sentinels)
    else:
        tokenizer = load_hf_tokenizer(cfg.tokenizer.path, cfg.tokenizer.n_sentinels)
        record_source(run, cfg.tokenizer.path)
    if run.is_writer:
        tokenizer.save(saved)
    return tokenizer


def _model(cfg, run, tokenizer: TextTokenizer, arch: str):
    if cfg.init:
        init = resolve(cfg.init, run.runs_dir, allow=("model_dir",), purpose="init=")
        model = init.load_torch()
        init.record_input(run)
        if model.config.vocab_size < len(tokenizer):
            raise ConfigError(f"init model's vocabulary ({model.config.vocab_size}) is smaller than its tokenizer's "
                              f"({len(tokenizer)})")
        return model
    from slmctl.model.config import vocab_size_for

    if arch == "hf-causal":
        return _hf_causal(cfg.model.hf, tokenizer)
    config = model_config_from(cfg.model, vocab_size=vocab_size_for(len(tokenizer)), **tokenizer.special_ids)
    if config.vocab_size < len(tokenizer):
        raise ConfigError(f"model.vocab_size={config.vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    torch.manual_seed(cfg.seed)
    return build_model(config)


def _hf_causal(hf_cfg, tokenizer: TextTokenizer):
    """A randomly initialised Hugging Face causal LM built from a config (no download)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from slmctl.model.config import vocab_size_for

    settings = OmegaConf.to_container(hf_cfg, resolve=True)
    model_type = settings.pop("model_type")
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size_for(len(tokenizer)), **tokenizer.special_ids,
                                  **settings)
    return AutoModelForCausalLM.from_config(config)


def in_memory_split(tokenizer: TextTokenizer, data: list) -> TokenSplit:
    """Texts or pairs held in memory, tokenised into the form a prepared store has (so small data
    and streamed data go through the same rows and collation)."""
    if data and isinstance(data[0], tuple):
        return TokenSplit.from_pairs(tokenizer.encode_batch([s for s, _ in data]),
                                     tokenizer.encode_batch([t for _, t in data]))
    return TokenSplit.from_documents(tokenizer.encode_batch(list(data)), tokenizer.eos_id)


def training_rows(cfg, split: TokenSplit, special, causal: bool):
    """(rows, make_batch): packed windows for LM objectives with objective.packing, else one
    document (or, for seq2seq, one pair) per row. (A Hugging Face causal LM takes packed rows
    without their segment ids: its documents see each other, but no label crosses a boundary.)"""
    name = cfg.objective.name
    if name == "seq2seq":
        if cfg.objective.packing:
            raise ConfigError("objective.packing=true is not supported for seq2seq yet (pairs train one per row); "
                              "drop it")
        return Pairs(split), partial(_make_batch, cfg=cfg, special=special, causal=causal)
    if cfg.objective.packing:
        from slmctl.data import packing

        window = packing.window_length(name, cfg.objective, cfg.max_source_len, cfg.max_target_len)
        make = partial(_make_packed_batch, cfg=cfg, special=special, causal=causal)
        return Windows(split.text, window), make
    return Documents(split.text), partial(_make_batch, cfg=cfg, special=special, causal=causal)


def packing_efficiency(datamodule: TrainingDataModule, batches: int = 8) -> float:
    """Non-padding fraction of the first training batches (encoder and decoder slots together)."""
    from slmctl.data.packing import packing_efficiency as real_and_slots

    stream = StepStream(datamodule.train_rows, datamodule.batch_size, datamodule.seed, datamodule.make_batch)
    counts = [real_and_slots(stream.batch(k)) for k in range(batches)]
    return sum(real for real, _ in counts) / max(1, sum(slots for _, slots in counts))


def _make_packed_batch(windows: list, rngs: list, cfg, special, causal: bool) -> dict:
    from slmctl.data import packing

    rows = [packing.pack_window(pieces, cfg.objective.name, cfg.objective, special, cfg.max_source_len,
                                cfg.max_target_len, rng) for pieces, rng in zip(windows, rngs)]
    return packing.collate_packed(rows, special, causal=causal)


def _make_batch(examples: list, rngs: list, cfg, special, causal: bool) -> dict:
    """Unpacked rows: documents (LM objectives, cut to the objective's length) or pairs."""
    name, o = cfg.objective.name, cfg.objective
    if name == "causal_lm":
        return obj.collate_causal([obj.causal_lm(e, special, cfg.max_source_len) for e in examples], special)
    if causal:  # seq2seq for a decoder-only model: the whole sequence, loss on the target only
        rows = [obj.prompt_completion(s, t, special, cfg.max_source_len + cfg.max_target_len) for s, t in examples]
        batch = obj.collate_causal([ids for ids, _ in rows], special)
        for i, (_, n_prompt) in enumerate(rows):
            batch["labels"][i, :n_prompt] = -100
        return batch
    length = cfg.max_source_len if name == "span_corruption" else cfg.max_source_len + cfg.max_target_len - 1
    pairs = []
    for example, rng in zip(examples, rngs):
        if name == "prefix_lm":
            ids = _at_least_two(example[:length], special)
            pairs.append(obj.prefix_lm(ids, rng, special, cfg.max_source_len, cfg.max_target_len,
                                       o.min_prefix_frac, o.max_prefix_frac))
        elif name == "span_corruption":
            ids = _at_least_two(example[:length], special)
            pairs.append(obj.span_corruption(ids, rng, special, o.noise_density, o.mean_span_length,
                                             max_source=cfg.max_source_len, max_target=cfg.max_target_len))
        else:
            pairs.append(obj.seq2seq(example[0], example[1], special, cfg.max_source_len, cfg.max_target_len))
    return obj.collate_seq2seq(pairs, special)


def _at_least_two(ids: list[int], special) -> list[int]:
    """A one-token document, with its EOS back, so the objectives have something to split."""
    return ids if len(ids) >= 2 else [*ids, special.eos]


def _check_layout(store: TokenStore, seq2seq_data: bool) -> None:
    wanted = "pairs" if seq2seq_data else "documents"
    if store.layout != wanted:
        fix = "objective=seq2seq" if store.layout == "pairs" else "an LM objective (prefix_lm, span_corruption, causal_lm)"
        raise ConfigError(f"{store.path} holds {store.layout}, and this objective trains on {wanted}; use {fix}, "
                          f"or prepare the data with layout={wanted}")


def _save_artifact(model, tokenizer: TextTokenizer, run, arch: str, lora, cfg) -> None:
    if arch == "hf-causal":
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own progress display only
        model.save_pretrained(str(run.model_dir), safe_serialization=True)
        for weights in run.model_dir.glob("*.safetensors"):
            set_new_file_mode(weights)  # safetensors leaves 0600
        tokenizer.save(run.model_dir)
    else:  # checksums.json last, over the tokenizer too
        base = resolve(cfg.init, run.runs_dir, allow=("model_dir",), purpose="init=").path if lora is not None else None
        save_trained(model, lora, run.model_dir, tokenizer, base, merge=lora is None or cfg.peft.merge)
