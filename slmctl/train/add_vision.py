"""The add-vision stage: a text encoder-decoder + a vision tower -> a vision-language model.

`run(cfg, run)` attaches the tower, compressor and projector of `cfg.vision` to the
encoder-decoder `cfg.source` and trains in two Lightning stages, as LLaVA-style models are:

    stage 0 (vision.pretrain=contrastive|counts|layout)  the tower alone, on image-caption pairs
                     (SigLIP loss), to count each kind of shape, or to count and name what is where
                     (slmctl/train/tower_pretrain.py); or vision.path=RUN: that run's pretrained tower
    stage 1 (align)  projector + compressor trained; tower and language model frozen
    stage 2 (tune)   projector + compressor + language model; the tower too when
                     vision.train_tower (our own ViTs, trained from scratch), at stage2.tower_lr

What each stage froze and trained is written to `stages.json`. The model directory holds the
text model's files plus vision.safetensors / vision.json; the summary reports exact match on
the held-out validation examples against chance (always answering each question kind's most
frequent answer).
"""

from __future__ import annotations

import time
from functools import partial

import lightning as L
import torch
from omegaconf import OmegaConf

from slmctl.data import objectives as obj
from slmctl.data.images import ImageExample, ShapeExamples, load_jsonl
from slmctl.data.tokenizer import TextTokenizer
from slmctl.errors import ConfigError
from slmctl.model.vision import VisionConfig
from slmctl.model.vlm import VisionEncoderDecoderLM, save_vision_model
from slmctl.refs import record_source, resolve
from slmctl.train.datamodule import TrainingDataModule
from slmctl.train.fit import fit, quiet_lightning
from slmctl.train.loggers import training_loggers
from slmctl.train.module import LMTrainingModule
from slmctl.train.optim import adamw_with_schedule, fused_adamw
from slmctl.train.throughput import throughput

PARTS = ("tower", "compressor", "projector", "text")


class VisionTrainingModule(LMTrainingModule):
    """LMTrainingModule with one learning rate per part (projector, tower, language model)."""

    def __init__(self, model, optim, max_steps: int, lrs: dict[str, float]):
        super().__init__(model, optim, max_steps)
        self.lrs = lrs

    def configure_optimizers(self):
        groups = []
        for part, lr in self.lrs.items():
            params = [p for p in getattr(self.model, part).parameters() if p.requires_grad]
            if params:
                groups.append({"params": params, "lr": lr, "weight_decay": self.optim.weight_decay})
        return adamw_with_schedule(groups, self.optim, self.max_steps, fused=fused_adamw(self.trainer))


def run(cfg, run, callbacks: list | None = None):
    quiet_lightning()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if not cfg.source:
        raise ConfigError("give the text model: slmctl add-vision MODEL vision=... data=... (an encoder-decoder run or model dir)")
    source = resolve(cfg.source, run.runs_dir, allow=("model_dir",), purpose="add-vision")
    text = source.load_torch()
    if isinstance(text, VisionEncoderDecoderLM):
        raise ConfigError(f"{cfg.source} already has a vision tower; add-vision starts from a text model")
    if not text.config.is_encoder_decoder:
        raise ConfigError(f"{cfg.source} is a decoder-only model; add-vision feeds images to an encoder (use an encoder-decoder)")
    source.record_input(run, role="text model")
    tokenizer = TextTokenizer.load(source.path)
    train, validation = _data(cfg, run)
    vision_settings = OmegaConf.to_container(cfg.vision, resolve=True)
    train_tower = vision_settings.pop("train_tower")
    tower_pretraining = vision_settings.pop("pretrain")
    torch.manual_seed(cfg.seed)
    model = VisionEncoderDecoderLM(text, VisionConfig.from_dict(vision_settings), tokenizer.image_id)
    if model.vision_config.tower != "vit" and model.vision_config.path:
        record_source(run, model.vision_config.path, role="vision tower")
    elif model.vision_config.path:
        from slmctl.train.tower_pretrain import load_pretrained_tower

        load_pretrained_tower(run, model, model.vision_config.path)
    counts = {part: sum(p.numel() for p in getattr(model, part).parameters()) for part in PARTS}
    run.log("parameters: " + ", ".join(f"{part} {n / 1e6:.2f}M" for part, n in counts.items()))

    special = obj.SpecialIds(pad=tokenizer.pad_id, bos=tokenizer.bos_id, eos=tokenizer.eos_id, sentinels=tokenizer.sentinel_ids)
    make_batch = partial(make_vision_batch, tokenizer=tokenizer, special=special, max_source=cfg.max_source_len,
                         max_target=cfg.max_target_len)
    datamodule = TrainingDataModule(train, validation, make_batch, cfg.batch_size, cfg.seed)
    stages, started = [], time.perf_counter()
    if tower_pretraining != "none" and cfg.stage0.steps > 0:
        from slmctl.train.tower_pretrain import pretrain_tower

        stages.append(pretrain_tower(cfg, run, model, tokenizer))
    for number, settings in ((1, cfg.stage1), (2, cfg.stage2)):
        trained = ["compressor", "projector"] + (["text"] if number == 2 else []) + (["tower"] if number == 2 and train_tower else [])
        lrs = {part: (settings.tower_lr or settings.lr) if part == "tower" else settings.lr for part in trained}
        for part in PARTS:
            getattr(model, part).requires_grad_(part in trained)
        stages.append({"stage": number, "steps": settings.steps, "trained": trained,
                       "frozen": [p for p in PARTS if p not in trained], "lr": lrs,
                       "trainable_parameters": sum(counts[p] for p in trained)})
        run.log(f"stage {number}: training {', '.join(trained)} for {settings.steps} steps; frozen: {', '.join(stages[-1]['frozen'])}")
        if settings.steps > 0:  # steps=0 skips a stage (e.g. stage2.steps=0: alignment only)
            _fit(cfg, run, model, datamodule, number, settings.steps, lrs, callbacks)
    if not run.is_writer:  # another rank of a multi-process run: rank 0 writes and scores the model
        return run
    run.write_json("stages.json", stages)
    save_vision_model(model, run.model_dir, tokenizer)
    accuracy = held_out_accuracy(model, tokenizer, validation, cfg.max_target_len)
    run.write_json("validation.json", accuracy)
    summary = {"exact_match": accuracy["exact_match"], "chance": accuracy["chance"]["overall"],
               "tokens_per_image": accuracy["tokens_per_image"], "examples": accuracy["n"],
               "train_seconds": round(time.perf_counter() - started, 1), "tower": model.vision_config.tower,
               "compress": model.vision_config.compress}
    run.succeed(summary | throughput(run))
    return run


def _data(cfg, run):
    data = cfg.data
    if data.kind == "shapes":
        run.log(f"data: shape scenes (seed {data.seed}): {data.train_examples} train / {data.validation_examples} validation")
        return (ShapeExamples(data.seed, "train", data.train_examples, data.max_shapes),
                ShapeExamples(data.seed, "validation", data.validation_examples, data.max_shapes))
    if data.kind != "images":
        raise ConfigError(f"add-vision takes data=shapes or data=images (image-text jsonl), not data={data.kind}")
    train, skipped = load_jsonl(data.train, data.skip_bad, data.allow_outside_root)
    run.add_input("file", data.train, data.train, role="train data")
    if data.validation:
        validation, skipped_val = load_jsonl(data.validation, data.skip_bad, data.allow_outside_root)
        run.add_input("file", data.validation, data.validation, role="validation data")
        skipped += skipped_val
    else:
        cut = max(1, int(len(train) * data.validation_fraction))
        if cut >= len(train):
            raise ConfigError(f"{data.train}: too few examples ({len(train)}) to hold out a validation split")
        train, validation = train[:-cut], train[-cut:]
    run.log(f"data: {len(train)} train / {len(validation)} validation examples"
            + (f"; {skipped} rows skipped for unreadable images" if skipped else ""))
    return train, validation


def make_vision_batch(examples: list[ImageExample], rngs, tokenizer: TextTokenizer, special, max_source: int,
                      max_target: int) -> dict:
    """Encoder: the prompt with its <image> placeholders; decoder: the answer + eos."""
    pairs = []
    for e in examples:
        source = tokenizer.encode(e.prompt)[:max_source]
        if source.count(tokenizer.image_id) != len(e.images):
            raise ConfigError(f"example {e.id}: {source.count(tokenizer.image_id)} <image> placeholder(s) for "
                              f"{len(e.images)} image(s) (after cutting the prompt to max_source_len={max_source})")
        pairs.append(obj.seq2seq(source, tokenizer.encode(e.answer), special, max_source, max_target))
    batch = obj.collate_seq2seq(pairs, special)
    batch.pop("decoder_attention_mask")
    batch["images"] = [e.images for e in examples]
    return batch


def _fit(cfg, run, model, datamodule, number: int, steps: int, lrs: dict, callbacks: list | None = None) -> None:
    module = VisionTrainingModule(model, cfg.optim, steps, lrs)
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_args.update(max_steps=steps, val_check_interval=min(cfg.validation_every, steps))
    if trainer_args.get("strategy") == "ddp":  # parts without a use in this stage's loss (e.g. an unused compressor)
        trainer_args["strategy"] = "ddp_find_unused_parameters_true"
    # Each stage checkpoints in checkpoints/stage<N>/; on resume a finished stage only reloads its weights.
    loggers = training_loggers(run, cfg.logger, prefix=f"stage{number}_")
    fit(module, datamodule, run, trainer_args, run.checkpoint_dir / f"stage{number}", loggers, cfg.checkpoint_every,
        resume=bool(cfg.resume), callbacks=callbacks)


@torch.inference_mode()
def held_out_accuracy(model, tokenizer: TextTokenizer, examples, max_new_tokens: int, batch_size: int = 16) -> dict:
    """Greedy exact match (SQuAD normalisation) overall and per question kind, with chance."""
    from slmctl.data.shapes import chance
    from slmctl.eval.metrics import exact_match
    from slmctl.eval.predict import predict
    from slmctl.runtime.generator import Generator

    items = [examples[i] for i in range(len(examples))]
    predictions = predict(Generator(model, tokenizer, "encdec", None), [e.prompt for e in items], batch_size, max_new_tokens,
                          images=[e.images for e in items])
    correct = [exact_match(p, [e.answer]) for p, e in zip(predictions, items)]
    kinds = sorted({e.kind for e in items if e.kind})
    per_kind = {k: sum(c for c, e in zip(correct, items) if e.kind == k) / sum(e.kind == k for e in items) for k in kinds}
    tokens = [t.shape[0] for e in items[:16] for t in model.image_tokens(e.images)]
    baseline = chance([{"kind": e.kind or "all", "answer": e.answer} for e in items])
    return {"n": len(items), "exact_match": sum(correct) / len(items), "per_kind": per_kind, "chance": baseline,
            "tokens_per_image": sum(tokens) / max(len(tokens), 1),
            "examples": [{"id": e.id, "prompt": e.prompt, "answer": e.answer, "prediction": p}
                         for e, p in list(zip(items, predictions))[:20]]}
