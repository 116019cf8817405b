"""The distillation teacher: a frozen decoder-only LM behind one small interface.

A teacher is any Hugging Face `AutoModelForCausalLM` (hub id or local directory) or a
decoder-only run of ours (our `DecoderOnlyLM`, or a Hugging Face causal LM a pretrain run
saved). Whatever it is, the distill stage asks it for two things only: its logits at the
positions that predict each target token (`aligned_logits`), and, for sequence-level KD,
greedy or sampled continuations of prompts (`generate`). It never trains: parameters are
frozen, the module stays in eval mode and is not part of the student's checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from slmctl.data.tokenizer import TextTokenizer, TokenizerError, load_hf_tokenizer
from slmctl.errors import ConfigError
from slmctl.refs import ModelRef, RefError, resolve

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Teacher:
    model: torch.nn.Module
    tokenizer: TextTokenizer
    name: str  # hub id, directory or run, as the user gave it
    source: str  # "hub", "dir" or "run"
    start_ids: list[int]  # what the teacher expects before a prompt (e.g. Llama's <s>)
    vocab_size: int  # width of its logits
    hf: bool  # a transformers model (else our DecoderOnlyLM)
    ref: ModelRef | None = None  # what teacher.path named, resolved (for lineage)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device) -> "Teacher":
        device = torch.device(device)
        if self.dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            self.model.float()  # bf16 where supported; an older GPU gets float32
        self.model.to(device)
        return self

    def shard(self) -> None:
        """Spread the weights over the ranks of the process group (FSDP2's `fully_shard`): each
        rank keeps 1/N of every block and gathers one block at a time for a forward pass, so a
        teacher too large for one device fits N of them. Every rank must then run the teacher
        equally often (teacher-forced gold targets; validation batches are dealt out evenly)."""
        from torch.distributed.fsdp import fully_shard

        block_types = set(getattr(self.model, "_no_split_modules", None) or ["SelfAttentionBlock"])
        for module in self.model.modules():
            if type(module).__name__ in block_types:
                fully_shard(module)
        fully_shard(self.model)

    @cached_property
    def _keeps_logits(self) -> bool:
        """Does the model's forward take `logits_to_keep`? (Looked up once, not every step.)"""
        import inspect

        return "logits_to_keep" in inspect.signature(self.model.forward).parameters

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @torch.inference_mode()
    def aligned_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Float32 logits [B, P, V] at `positions` [B, P] of right-padded sequences [B, T]: the
        LM head runs only over the span of positions asked for (cheap when prompts are long)."""
        first, last = int(positions.min()), int(positions.max())
        if self.hf and self._keeps_logits:
            keep = torch.arange(first, last + 1, device=input_ids.device)
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep,
                                use_cache=False).logits
        elif self.hf:  # a model without logits_to_keep (e.g. older remote code): every position
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, first:last + 1]
        else:
            logits = self.model(input_ids, attention_mask).logits[:, first:last + 1]
        index = (positions - first)[:, :, None].expand(-1, -1, logits.shape[-1])
        return logits.gather(1, index).float()

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0) -> list[list[int]]:
        """The teacher's continuation of each prompt (ids without start tokens), cut after its eos."""
        rows = [[*self.start_ids, *p] for p in prompts]
        width = max(len(r) for r in rows)
        pad, eos = self.tokenizer.pad_id, self.tokenizer.eos_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):  # left padding: every prompt ends where generation starts
            input_ids[i, width - len(row):] = torch.tensor(row)
            attention_mask[i, width - len(row):] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        if self.hf:  # our own settings, not the checkpoint's generation_config.json (often sampling)
            from transformers import GenerationConfig

            settings = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad,
                                        eos_token_id=eos, **({"temperature": temperature, "top_k": top_k or None,
                                                               "top_p": None} if do_sample else {}))
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                      generation_config=settings)[:, width:]
        else:
            from slmctl.model.generation import generate

            out = generate(self.model, input_ids, attention_mask, max_new_tokens=max_new_tokens, eos_token_id=eos,
                           pad_token_id=pad, do_sample=do_sample, temperature=temperature, top_k=top_k)
        return [cut_after_eos(row, eos) for row in out.tolist()]


def cut_after_eos(ids: list[int], eos: int) -> list[int]:
    """`ids` up to and including the first eos (generation pads finished rows after it)."""
    return ids[: ids.index(eos) + 1] if eos in ids else list(ids)


# ---------------------------------------------------------------------------
# Loading


TEACHER_KINDS = {"run": ("model_dir", "hf_dir"), "hf": ("model_dir", "hf_dir", "hub")}  # slmctl.refs kinds


def load_teacher(cfg, runs_dir: Path) -> Teacher:
    """The teacher a `teacher` config node names: a decoder-only model of ours, or a Hugging Face
    causal LM (a save_pretrained directory, a pretrain run of model=hf-causal, or with kind hf a hub id)."""
    try:
        ref = resolve(cfg.path, runs_dir, allow=TEACHER_KINDS.get(cfg.kind, TEACHER_KINDS["hf"]),
                      purpose=f"teacher (kind {cfg.kind})")
    except RefError as e:
        raise ConfigError(f"teacher.path: {e}") from None
    if ref.kind == "model_dir":  # ours, with our tokenizer
        tokenizer = TextTokenizer.load(ref.path)
        model = ref.load_torch(dtype=_dtype(cfg.dtype, torch.float32))
        if model.config.arch != "deconly":
            raise ConfigError(f"teacher {cfg.path} is an encoder-decoder; a teacher must be a decoder-only LM "
                              f"(a deconly-* or hf-causal run, or a Hugging Face causal LM)")
        return _frozen(Teacher(model, tokenizer, str(cfg.path), "run", [tokenizer.bos_id], model.config.vocab_size,
                               False, ref))
    dtype = "auto" if cfg.dtype == "auto" else _dtype(cfg.dtype, torch.float32)
    try:
        model = ref.load_transformers(dtype=dtype, trust_remote_code=cfg.trust_remote_code, what="teacher")
    except RefError as e:
        raise ConfigError(str(e)) from None
    if cfg.kind == "run":  # a pretrain run of model=hf-causal: our tokenizer beside the weights
        tokenizer = TextTokenizer.load(ref.path)
        return _frozen(Teacher(model, tokenizer, str(cfg.path), "run", [tokenizer.bos_id], _hf_vocab(model), True, ref))
    try:
        tokenizer = load_hf_tokenizer(cfg.tokenizer or ref.where, n_sentinels=0, trust_remote_code=cfg.trust_remote_code)
    except TokenizerError as e:
        raise ConfigError(f"teacher tokenizer: {e}") from None
    return _frozen(Teacher(model, tokenizer, str(cfg.path), "dir" if ref.path else "hub", tokenizer.start_ids(),
                           _hf_vocab(model), True, ref))


def _hf_vocab(model) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def _dtype(name: str, auto: torch.dtype) -> torch.dtype:
    if name == "auto":
        return auto
    if name not in DTYPES:
        raise ConfigError(f"teacher.dtype={name!r} is not one of: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def _frozen(teacher: Teacher) -> Teacher:
    teacher.model.eval()
    teacher.model.requires_grad_(False)
    return teacher


# ---------------------------------------------------------------------------
# Vocabularies


def same_tokenizer(teacher: TextTokenizer, student: TextTokenizer, shared: int) -> bool:
    """Do both tokenizers give the same ids to the same text over the first `shared` ids?

    Every teacher token below `shared` must have the same id in the student's vocabulary
    (the student may add tokens of its own, e.g. sentinels, above them), and a probe text
    must tokenise identically (same normalisation and pre-tokenisation)."""
    student_vocab = student.vocab()
    for token, index in teacher.vocab().items():
        if index < shared and student_vocab.get(token) != index:
            return False
    probe = "The quick brown fox, 12 times: naïve café!\nDoes it split the same way?"
    return teacher.encode(probe) == student.encode(probe)
