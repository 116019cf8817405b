"""The distill stage: a decoder-only teacher teaches an encoder-decoder student.

`run(cfg, run)` loads the teacher (frozen), builds or loads the student, checks that their
vocabularies can be compared (same tokenizer: directly, over the shared id range; different
tokenizers: an error unless `kd.cross_tokenizer=uld`), optionally caches the teacher's
top-k log-probabilities, and trains with Lightning. The student goes to `model/`; with
`control=true` a second student with the same initialisation, data and steps is trained on
gold CE only into `control/`, and the summary reports both validation losses.
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf

from slmctl.data.sources import load_pairs
from slmctl.data.streaming import Pairs
from slmctl.data.tokenizer import TextTokenizer, load_hf_tokenizer
from slmctl.errors import ConfigError
from slmctl.model import build_model
from slmctl.model.config import model_config_from, model_name
from slmctl.model.lora import add_lora, check_lora_init, parameter_counts, save_trained
from slmctl.refs import ModelRef, resolve
from slmctl.train.datamodule import TrainingDataModule
from slmctl.train.distill_data import DistillBatcher
from slmctl.train.distill_module import DistillModule
from slmctl.train.fit import fit, quiet_lightning
from slmctl.train.loggers import training_loggers
from slmctl.train.logit_cache import ShardWriter, TopKCache, write_index
from slmctl.train.prepare import open_prepared, prepared_tokenizer
from slmctl.train.pretrain import TOKENIZER_DIR, build_tokenizer
from slmctl.train.ranks import rank0_first
from slmctl.train.teacher import Teacher, load_teacher, same_tokenizer
from slmctl.train.throughput import throughput

CACHE_DIR = "teacher_cache"
CONTROL_DIR = "control"
DISTILLED = "distilled.json"  # the first phase's summary; its presence means phase one is done


def run(cfg, run, callbacks: list | None = None):
    """Distil as `cfg` says, writing into `run`; returns the run (succeeded)."""
    quiet_lightning()
    kd = cfg.kd
    if cfg.teacher.shard and kd.targets != "gold":
        raise ConfigError(f"teacher.shard=true needs kd.targets=gold (every process must run the sharded teacher "
                          f"equally often; generating targets does not), got kd.targets={kd.targets}")
    if kd.cache and kd.targets != "gold":
        raise ConfigError(f"kd.cache=true needs kd.targets=gold (the cache holds the teacher's view of the data's own "
                          f"targets), got kd.targets={kd.targets}")
    streamed = cfg.data.kind == "prepared"
    if streamed:
        if kd.cache:
            raise ConfigError("kd.cache=true scores every example up front; with data=prepared the teacher runs live "
                              "(drop kd.cache)")
        store = open_prepared(cfg.data.path, run)
        if store.layout != "pairs":
            raise ConfigError(f"{store.path} holds documents; distill trains on source/target pairs (prepare a corpus "
                              f"with source and target columns)")
        train_pairs, val_pairs = Pairs(store.split("train")), Pairs(store.split("validation"))
        run.log(f"data: {store.path} ({len(train_pairs)} train / {len(val_pairs)} validation pairs, streamed)")
    else:
        train_pairs, val_pairs = load_pairs(cfg.data, "train"), load_pairs(cfg.data, "validation")
        run.log(f"data: {len(train_pairs)} train / {len(val_pairs)} validation examples ({cfg.data.kind})")

    runs_dir = run.runs_dir
    teacher = load_teacher(cfg.teacher, runs_dir)
    teacher.ref.record_input(run, role="teacher")
    if cfg.teacher.trust_remote_code:
        run.log("teacher.trust_remote_code=true: code from the teacher's repository runs in this process")
    run.log(f"teacher: {teacher.name} ({teacher.source}), {teacher.num_parameters() / 1e6:.1f}M parameters, "
            f"{str(teacher.dtype).removeprefix('torch.')}, logits over {teacher.vocab_size} ids")

    tokenizer = prepared_tokenizer(store, run) if streamed else _student_tokenizer(cfg, run, teacher, train_pairs)
    if streamed and cfg.student.init and TextTokenizer.load(_student_init(cfg, run).path).vocab() != tokenizer.vocab():
        raise ConfigError(f"student.init={cfg.student.init} has another tokenizer than the prepared data; prepare the "
                          f"data with tokenizer=run tokenizer.path={cfg.student.init}")
    student = _student(cfg, run, tokenizer)
    check_lora_init(cfg.peft, cfg.student.init, "student.init")
    lora = add_lora(student, cfg.peft, run) if cfg.peft is not None else None
    shared = _shared_vocabulary(cfg, run, teacher, tokenizer, student.config.vocab_size)
    run.log(f"student: {cfg.student.init or model_name(cfg.student)}, {student.num_parameters() / 1e6:.2f}M parameters; "
            f"kd: {kd.loss} T={kd.temperature} alpha={kd.alpha} targets={kd.targets}")

    batcher = DistillBatcher(tokenizer, teacher.tokenizer, teacher.start_ids, shared is not None,
                             cfg.max_source_len, cfg.max_target_len)
    if streamed:
        batcher.stream("train", train_pairs)
        batcher.stream("validation", val_pairs, limit=cfg.data.validation_rows)
    else:
        batcher.tokenize("train", train_pairs)
        batcher.tokenize("validation", val_pairs)
    if kd.cache:
        with rank0_first(run):  # torchrun/SLURM: the other ranks reuse the cache rank 0 builds
            batcher.cache = _logit_cache(cfg, run, teacher, batcher, shared)

    done = run.path / DISTILLED
    if done.is_file():  # a resumed run whose distillation finished before its control did
        summary = json.loads(done.read_text())
    else:
        summary = _fit(cfg, run, student, teacher, batcher, shared, run.path, training_loggers(run, cfg.logger), callbacks, kd)
        trainable, _ = parameter_counts(student)
        student = _save(cfg, student, lora, tokenizer, run.model_dir, run)
        summary |= {"teacher": teacher.name, "teacher_parameters": teacher.num_parameters(),
                    "student": cfg.student.init or model_name(cfg.student), "parameters": student.num_parameters(),
                    "trainable_parameters": trainable,
                    "kd_loss": kd.loss, "alpha": kd.alpha, "targets": kd.targets}
        run.write_json(DISTILLED, summary)

    if cfg.control:
        run.log("control: the same student trained on gold CE only (kd.alpha=0)")
        control = _student(cfg, run, tokenizer, quiet=True)
        control_lora = add_lora(control, cfg.peft, run, quiet=True) if cfg.peft is not None else None
        control_kd = OmegaConf.merge(kd, {"alpha": 0.0})
        result = _fit(cfg, run, control, teacher, batcher, shared, run.path / CONTROL_DIR,
                      training_loggers(run, cfg.logger, prefix="control_"), callbacks, control_kd)
        _save(cfg, control, control_lora, tokenizer, run.path / CONTROL_DIR / "model", run)
        summary |= {f"control_{k}": v for k, v in result.items() if k.startswith("val_")}
        if summary.get("val_ce_loss") is not None and summary.get("control_val_ce_loss") is not None:
            summary["val_ce_gain"] = round(summary["control_val_ce_loss"] - summary["val_ce_loss"], 4)
            run.log(f"validation CE: distilled {summary['val_ce_loss']:.4f} vs control {summary['control_val_ce_loss']:.4f}")
    run.succeed(summary | throughput(run))
    return run


# -- training ----------------------------------------------------------------------


def _fit(cfg, run, student, teacher: Teacher, batcher: DistillBatcher, shared: int | None, directory: Path,
         loggers: list, callbacks, kd) -> dict:
    """Train one student in `directory` (checkpoints/ beneath it); its validation metrics."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = DistillModule(student, teacher, batcher, kd, cfg.optim, cfg.trainer.max_steps, cfg.seed, shared,
                           shard_teacher=cfg.teacher.shard)
    workers = cfg.data.num_workers if cfg.data.kind == "prepared" else 0
    datamodule = TrainingDataModule(batcher.examples["train"], batcher.examples["validation"], batcher, cfg.batch_size,
                                    cfg.seed, make_val_batch=partial(batcher, split="validation"), num_workers=workers)
    started = time.perf_counter()
    trainer = fit(module, datamodule, run, OmegaConf.to_container(cfg.trainer, resolve=True), directory / "checkpoints", loggers,
                  cfg.checkpoint_every, resume=bool(cfg.resume), callbacks=callbacks)
    metrics = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
    return {**metrics, "steps": trainer.global_step, "train_seconds": round(time.perf_counter() - started, 2)}


def _save(cfg, model, lora, tokenizer: TextTokenizer, directory: Path, run):
    """Write the student's model directory (LoRA: merged, or the adapter over student.init); returns
    the student as saved."""
    if not run.is_writer:  # another rank of a multi-process run
        return model
    base = _student_init(cfg, run).path if lora is not None else None
    return save_trained(model, lora, directory, tokenizer, base, merge=lora is None or cfg.peft.merge)


# -- the student ---------------------------------------------------------------------


def _student_tokenizer(cfg, run, teacher: Teacher, train_pairs) -> TextTokenizer:
    """The init model's tokenizer, the teacher's (tokenizer=teacher) or any pretrain choice."""
    saved = run.path / TOKENIZER_DIR
    if saved.is_dir():  # a resumed run keeps the tokenizer it started with
        return TextTokenizer.load(saved)
    if cfg.student.init:
        tokenizer = TextTokenizer.load(_student_init(cfg, run).path)
    elif cfg.tokenizer.kind == "teacher":
        if teacher.source == "run":  # ours already has sentinels and an image token
            tokenizer = teacher.tokenizer
        else:
            tokenizer = load_hf_tokenizer(cfg.teacher.tokenizer or teacher.ref.where, cfg.tokenizer.n_sentinels,
                                          cfg.teacher.trust_remote_code)
    else:
        return build_tokenizer(cfg, run, train_pairs, seq2seq_data=True)
    if run.is_writer:
        tokenizer.save(saved)
    return tokenizer


def _student_init(cfg, run) -> ModelRef:
    return resolve(cfg.student.init, run.runs_dir, allow=("model_dir",), purpose="student.init=")


def _student(cfg, run, tokenizer: TextTokenizer, quiet: bool = False):
    """The student: `student.init` loaded, or the `student` preset built with fresh weights
    (seeded, so a control student starts from the very same weights)."""
    from slmctl.model.config import vocab_size_for

    if cfg.student.init:
        init = _student_init(cfg, run)
        model = init.load_torch()
        if not quiet:
            init.record_input(run, role="student")
    else:
        config = model_config_from(cfg.student, vocab_size=vocab_size_for(len(tokenizer)), **tokenizer.special_ids)
        torch.manual_seed(cfg.seed)
        model = build_model(config)
    if model.config.arch != "encdec":
        raise ConfigError(f"student {cfg.student.init or model_name(cfg.student)} is decoder-only; distill trains an "
                          f"encoder-decoder student (e.g. student=small, student=330m)")
    if model.config.vocab_size < len(tokenizer):
        raise ConfigError(f"student vocabulary ({model.config.vocab_size}) is smaller than its tokenizer ({len(tokenizer)})")
    return model


def _shared_vocabulary(cfg, run, teacher: Teacher, tokenizer: TextTokenizer, student_vocab: int) -> int | None:
    """How many leading ids both models' logits share, or None for different tokenizers (ULD)."""
    shared = min(student_vocab, teacher.vocab_size)
    if same_tokenizer(teacher.tokenizer, tokenizer, shared):
        if student_vocab != teacher.vocab_size:
            run.log(f"vocabularies: teacher {teacher.vocab_size} ids, student {student_vocab}; the same tokenizer, so "
                    f"KD compares the shared first {shared} ids")
        if cfg.kd.cross_tokenizer == "uld":
            run.log("kd.cross_tokenizer=uld is not needed: the tokenizers match, distilling directly")
        return shared
    if cfg.kd.cross_tokenizer != "uld":
        raise ConfigError(f"the teacher's tokenizer ({teacher.name}, {len(teacher.tokenizer)} tokens) differs from the "
                          f"student's ({len(tokenizer)} tokens): give the student the teacher's tokenizer "
                          f"(tokenizer=teacher, or a student.init trained on it) or set kd.cross_tokenizer=uld")
    if cfg.kd.cache:
        raise ConfigError("kd.cache=true works with a shared tokenizer only (not with kd.cross_tokenizer=uld)")
    run.log("tokenizers differ: Universal Logit Distillation (sorted-probability Wasserstein loss) pairs target "
            "positions by index")
    return None


# -- the teacher-logit cache -----------------------------------------------------------


def _logit_cache(cfg, run, teacher: Teacher, batcher: DistillBatcher, shared: int) -> TopKCache:
    """The run's cache (built now if it is missing or was made with other settings)."""
    from rich.progress import Progress

    from slmctl.train.kd_losses import teacher_topk

    kd = cfg.kd
    k = min(kd.cache_topk, shared)
    meta = {"version": 1, "teacher": str(cfg.teacher.path), "k": k, "temperature": kd.temperature, "dtype": kd.cache_dtype,
            "vocab": shared, "examples": {s: len(e) for s, e in batcher.examples.items()},
            "max_source_len": cfg.max_source_len, "max_target_len": cfg.max_target_len}
    directory = run.path / CACHE_DIR
    found = TopKCache.find(directory, meta)
    if found is not None:
        run.log(f"teacher cache: reusing {directory.name}/ (top-{k})")
        return found
    directory.mkdir(parents=True, exist_ok=True)
    teacher.to(_device(cfg))
    started, tokens, splits = time.perf_counter(), 0, {}
    total = sum(len(e) for e in batcher.examples.values())
    with Progress(transient=True, disable=not cfg.trainer.get("enable_progress_bar", True)) as progress:
        task = progress.add_task("caching teacher top-k", total=total)
        for split, examples in batcher.examples.items():
            writer = ShardWriter(directory, split, kd.cache_dtype)
            for i in range(0, len(examples), kd.cache_batch_size):
                chunk = examples[i:i + kd.cache_batch_size]
                batch = batcher.build([e.source for e in chunk], [e.target for e in chunk],
                                      [e.teacher_source for e in chunk], [e.teacher_target for e in chunk])
                logits = teacher.aligned_logits(*(batch[key].to(teacher.device) for key in
                                                  ("teacher_input_ids", "teacher_attention_mask", "teacher_positions")))
                ids, logp, tail = teacher_topk(logits[..., :shared], k, kd.temperature)
                for row, example in enumerate(chunk):
                    n = len(example.target)
                    writer.add(ids[row, :n], logp[row, :n], tail[row, :n])
                    tokens += n
                progress.advance(task, len(chunk))
            splits[split] = writer.finish()
    write_index(directory, meta, splits)
    seconds = time.perf_counter() - started
    run.log(f"teacher cache: top-{k} of {tokens} target tokens in {seconds:.1f} s -> {directory.name}/")
    return TopKCache(directory)


def _device(cfg) -> torch.device:
    accelerator = str(cfg.trainer.get("accelerator", "cpu"))
    if accelerator in ("gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    if accelerator == "mps" and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
