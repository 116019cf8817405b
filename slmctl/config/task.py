"""What a model is asked and how its answers are made and scored: the task (`task=`), the
decoding settings and the LLM judge (`judge=`); eval and export's report share them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from slmctl.config.choices import JudgeKind, SyntheticQuestions, TaskKind


@dataclass
class TaskSchema:
    name: str = MISSING
    kind: TaskKind = TaskKind.columns
    hub_id: Optional[str] = None
    subset: Optional[str] = None
    split: str = "validation"
    data_files: Optional[str] = None  # local json/jsonl/parquet/csv with the task's columns (instead of the hub)
    prompt: str = "{source}"  # template over the row's columns
    reference: str = "target"  # the reference column (columns kind)
    id: Optional[str] = "id"  # the id column; row numbers when null or absent
    metrics: list = field(default_factory=lambda: ["rougeLsum"])
    max_new_tokens: int = 64
    # synthetic kind: the embedded world's held-out questions
    seed: int = 0
    n_people: int = 5000
    n: int = 200
    min_facts: int = 8
    max_facts: int = 16
    questions: SyntheticQuestions = SyntheticQuestions.fact  # fact: one fact, a short answer; about: everything about one person
    max_shapes: int = 4  # shapes kind: shapes per scene, 1 to this (match the add-vision run's data.max_shapes)


@dataclass
class GenerationSchema:
    max_new_tokens: Optional[int] = None  # null: the task's
    num_beams: int = 1  # greedy by default
    length_penalty: float = 1.0
    # none; prompt (n-gram lookup in the source); or a draft model (a smaller model directory or run with the same
    # tokenizer): drafted tokens checked several per pass, the same predictions (docs/speed.md)
    draft: str = "none"
    draft_tokens: int = 10  # most tokens drafted per pass
    draft_ngram: int = 6  # prompt: the longest n-gram looked up (n down to 1)


@dataclass
class JudgeSchema:
    kind: JudgeKind = JudgeKind.none
    path: Optional[str] = None  # local: a causal LM directory or hub id
    endpoint: Optional[str] = None  # endpoint: an OpenAI-compatible base URL, e.g. http://localhost:8000/v1
    model: Optional[str] = None
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable, never stored
    max_new_tokens: int = 64
    trust_remote_code: bool = False
    cache_dir: Optional[str] = None  # judge scores are cached here (default $XDG_CACHE_HOME/slmctl, else ~/.cache/slmctl): reruns are free
