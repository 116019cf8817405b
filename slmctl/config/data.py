"""What a stage reads and how it is tokenised: the data sources (`data=`), the tokenizers
(`tokenizer=`) and the training objectives (`objective=`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from slmctl.config.choices import BadRowPolicy, SyntheticQuestions


@dataclass
class ColumnsSchema:
    text: str = "text"
    source: str = "source"
    target: str = "target"


@dataclass
class SyntheticDataSchema:
    kind: str = "synthetic"
    seed: int = 0
    n_people: int = 5000  # a world too large to memorise: models must read the context
    train_examples: int = 20000  # text paragraphs (LM objectives) or QA examples (seq2seq)
    validation_examples: int = 200
    min_facts: int = 8  # facts per QA context: controls the input length
    max_facts: int = 16
    questions: SyntheticQuestions = SyntheticQuestions.fact  # seq2seq: fact (short answers) or about (long, copied)


@dataclass
class FilesDataSchema:
    kind: str = "files"
    train: str = MISSING  # path or glob, e.g. data/train.jsonl
    validation: Optional[str] = None  # path; null = hold out validation_fraction of train
    validation_fraction: float = 0.02
    columns: ColumnsSchema = field(default_factory=ColumnsSchema)
    on_bad_row: BadRowPolicy = BadRowPolicy.skip  # prepare: skip (counted, the first few named file:line) or error


@dataclass
class PreparedDataSchema:
    kind: str = "prepared"
    path: str = MISSING  # a `slmctl prepare` run (prepare/latest) or its data/ directory
    num_workers: int = 2  # DataLoader worker processes reading the memory-mapped token store
    validation_rows: int = 256  # validation rows (packed windows or documents) taken from the validation split


@dataclass
class ShapesDataSchema:
    kind: str = "shapes"
    seed: int = 0
    train_examples: int = 4000
    validation_examples: int = 100
    max_shapes: int = 4  # shapes per scene: 1 to this


@dataclass
class ImagesDataSchema:
    kind: str = "images"
    train: str = MISSING
    validation: Optional[str] = None  # null: the last validation_fraction of train
    validation_fraction: float = 0.05
    skip_bad: bool = False  # true: skip (and count) rows whose image cannot be read, instead of failing
    allow_outside_root: bool = False  # image paths may not leave the jsonl file's directory unless true


@dataclass
class HubDataSchema:
    kind: str = "hub"
    id: str = MISSING  # e.g. wikitext
    subset: Optional[str] = None  # e.g. wikitext-2-raw-v1
    train_split: str = "train"
    validation_split: Optional[str] = "validation"  # null: prepare holds out validation_fraction of the documents
    validation_fraction: float = 0.02
    columns: ColumnsSchema = field(default_factory=ColumnsSchema)
    on_bad_row: BadRowPolicy = BadRowPolicy.skip


@dataclass
class BpeTokenizerSchema:
    kind: str = "bpe"
    vocab_size: int = 4096
    min_frequency: int = 2
    n_sentinels: int = 32  # <extra_id_N> tokens for span corruption
    max_training_texts: int = 50000


@dataclass
class HFTokenizerSchema:
    kind: str = "hf"
    path: str = MISSING
    n_sentinels: int = 32  # added if the tokenizer has none


@dataclass
class RunTokenizerSchema:
    kind: str = "run"
    path: str = MISSING


@dataclass
class TeacherTokenizerSchema:
    kind: str = "teacher"
    n_sentinels: int = 32


@dataclass
class PrefixLMSchema:
    name: str = "prefix_lm"
    min_prefix_frac: float = 0.2
    max_prefix_frac: float = 0.8
    packing: bool = True


@dataclass
class SpanCorruptionSchema:
    name: str = "span_corruption"
    noise_density: float = 0.15
    mean_span_length: float = 3.0
    packing: bool = True


@dataclass
class Seq2SeqSchema:
    name: str = "seq2seq"
    packing: bool = False


@dataclass
class CausalLMSchema:
    name: str = "causal_lm"
    packing: bool = True
