"""Evaluation tasks: rows from the hub or local files -> (id, prompt, references) examples.

A task config (`conf/task/*.yaml`) names where its rows come from (`hub_id`, or
`data_files=PATH` with the same columns: json/jsonl/parquet/csv), how a row becomes a
prompt (`prompt`, a template over the row's columns) and which column holds the reference.
Three row layouts exist:

- `columns`: any table; `prompt` formats the row, `reference` names the reference column.
- `squad`: SQuAD v2 rows (id, question, context, answers = {text: [...], answer_start: [...]});
  every answer text is a reference, and none means unanswerable (the expected answer is empty).
- `synthetic`: the embedded synthetic world's held-out questions (no network): one fact, or everything
  about one person (`questions=about`).
- `shapes`: the embedded shape scenes' held-out (test split) questions, with their images.
- `images`: image-text jsonl rows {image, prompt, answer} (`data_files`), image paths relative to the file.

Examples keep the source order, so `limit=N` always means the same first N examples.
"""

from __future__ import annotations

import glob
import string
from dataclasses import dataclass
from pathlib import Path

from slmctl.data.sources import FORMATS, DataError, check_jsonl, quiet_datasets
from slmctl.errors import first_line


@dataclass(frozen=True)
class EvalExample:
    id: str
    source: str  # the prompt the model reads
    references: list[str]  # empty list: unanswerable (SQuAD v2)
    images: tuple = ()  # PIL images for a vision model, one per <image> placeholder


def load_task(cfg, limit: int | None = None) -> list[EvalExample]:
    """The task's examples (the first `limit` of them)."""
    if cfg.kind == "synthetic":
        from slmctl.data.synthetic import SyntheticWorld

        world = SyntheticWorld(seed=cfg.seed, n_people=cfg.n_people)
        rows = world.examples(str(cfg.questions), "test", cfg.n, cfg.min_facts, cfg.max_facts)
        examples = [EvalExample(r["id"], r["source"], [r["target"]]) for r in rows]
    elif cfg.kind == "shapes":
        from slmctl.data.shapes import ShapeScenes

        scenes = ShapeScenes(seed=cfg.seed, max_shapes=cfg.max_shapes)
        examples = [EvalExample(e["id"], e["prompt"], [e["answer"]], (e["image"],))
                    for e in (scenes.example("test", i) for i in range(min(cfg.n, limit or cfg.n)))]
    elif cfg.kind == "images":
        from slmctl.data.images import load_jsonl

        if not cfg.data_files:
            raise DataError(f"task {cfg.name}: set task.data_files to an image-text jsonl ({{image, prompt, answer}} rows)")
        rows, _ = load_jsonl(cfg.data_files, limit=limit)
        examples = [EvalExample(r.id, r.prompt, [r.answer], tuple(r.images)) for r in rows]
    else:
        table, where = _rows(cfg)
        examples = _squad(table, where, cfg) if cfg.kind == "squad" else _columns(table, where, cfg)
    if not examples:
        raise DataError(f"task {cfg.name}: no examples")
    return examples[:limit] if limit else examples


def _rows(cfg) -> tuple[list[dict], str]:
    datasets = quiet_datasets()

    if cfg.data_files:
        files = sorted(glob.glob(str(Path(cfg.data_files).expanduser())))
        if not files:
            raise DataError(f"task {cfg.name}: no such file: {cfg.data_files}")
        builder = FORMATS.get(Path(files[0]).suffix.lower())
        if builder not in ("json", "parquet", "csv"):
            raise DataError(f"task {cfg.name}: {files[0]} is not json/jsonl/parquet/csv")
        try:
            check_jsonl(files)
        except DataError as e:
            raise DataError(f"task {cfg.name}: {e}") from None
        try:
            dataset = datasets.load_dataset(builder, data_files=files, split="train")
        except Exception as e:  # datasets raises many types for unreadable files
            raise DataError(f"task {cfg.name}: cannot read {cfg.data_files}: {first_line(e)}") from None
        where = cfg.data_files
    else:
        if not cfg.hub_id:
            raise DataError(f"task {cfg.name}: give task.data_files=PATH (no hub id is configured)")
        try:
            dataset = datasets.load_dataset(cfg.hub_id, cfg.subset, split=cfg.split)
        except Exception as e:
            raise DataError(f"task {cfg.name}: cannot load {cfg.hub_id!r} split {cfg.split!r} ({first_line(e)}); "
                            f"offline, give the same columns as task.data_files=PATH") from None
        where = f"{cfg.hub_id}[{cfg.split}]"
    if len(dataset) == 0:
        raise DataError(f"task {cfg.name}: {where} has no rows")
    return dataset.to_list(), where


def _require(row: dict, columns: list[str], where: str, cfg) -> None:
    missing = [c for c in columns if c not in row]
    if missing:
        raise DataError(f"task {cfg.name}: {where} has no column {missing[0]!r} (columns: {', '.join(row)}); "
                        f"the task needs: {', '.join(columns)}")


def prompt_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def _columns(rows: list[dict], where: str, cfg) -> list[EvalExample]:
    fields = prompt_fields(cfg.prompt)
    _require(rows[0], [*fields, cfg.reference], where, cfg)
    out = []
    for i, row in enumerate(rows):
        identifier = str(row[cfg.id]) if cfg.id and cfg.id in row else str(i)
        reference = row[cfg.reference]
        references = [str(r) for r in reference] if isinstance(reference, list) else [str(reference)]
        out.append(EvalExample(identifier, cfg.prompt.format(**{k: row[k] for k in fields}), references))
    return out


def _squad(rows: list[dict], where: str, cfg) -> list[EvalExample]:
    _require(rows[0], ["id", "question", "context", "answers"], where, cfg)
    out = []
    for row in rows:
        answers = row["answers"] or {}
        texts = answers.get("text", []) if isinstance(answers, dict) else []
        out.append(EvalExample(str(row["id"]), cfg.prompt.format(question=row["question"], context=row["context"]),
                               [t for t in texts if t.strip()]))
    return out
