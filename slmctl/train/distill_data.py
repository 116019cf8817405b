"""Distillation batches: the student's seq2seq tensors and, beside them, what the teacher needs.

A `DistillExample` holds one (prompt, target) pair tokenised for the student and for the
teacher (the same lists when both share a tokenizer). `DistillBatcher` turns examples into
one batch dict: the student's tensors (`collate_seq2seq`), the teacher's aligned inputs
(`alignment.teacher_batch`) or, when a logit cache is used, the cached top-k rows. It also
rebuilds a batch around targets generated during training (by the teacher or the student),
re-tokenising through text when the two tokenizers differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slmctl.data import objectives as obj
from slmctl.data.tokenizer import TextTokenizer
from slmctl.train.alignment import student_mask, teacher_batch
from slmctl.train.logit_cache import TopKCache, stack_rows


@dataclass(frozen=True)
class DistillExample:
    index: int  # position in its split (the logit cache's key)
    source: list[int]  # student prompt ids (truncated)
    target: list[int]  # student target ids, ending with eos
    teacher_source: list[int]
    teacher_target: list[int]


class DistillBatcher:
    def __init__(self, student: TextTokenizer, teacher: TextTokenizer, teacher_start: list[int], same_tokenizer: bool,
                 max_source: int, max_target: int):
        self.student, self.teacher, self.teacher_start = student, teacher, list(teacher_start)
        self.same_tokenizer, self.max_source, self.max_target = same_tokenizer, max_source, max_target
        self.special = obj.SpecialIds(pad=student.pad_id, bos=student.bos_id, eos=student.eos_id)
        self.examples: dict[str, list[DistillExample]] = {}
        self.cache: TopKCache | None = None

    def tokenize(self, split: str, pairs: list[tuple[str, str]]) -> list[DistillExample]:
        """Tokenise (prompt, target) texts for both models; kept as `self.examples[split]`."""
        sources = self.student.encode_batch([s for s, _ in pairs])
        targets = self.student.encode_batch([t for _, t in pairs])
        if self.same_tokenizer:
            teacher_sources, teacher_targets = sources, targets
        else:
            teacher_sources = self.teacher.encode_batch([s for s, _ in pairs])
            teacher_targets = self.teacher.encode_batch([t for _, t in pairs])
        examples = []
        for i, (s, t, ts, tt) in enumerate(zip(sources, targets, teacher_sources, teacher_targets)):
            source, target = obj.seq2seq(s, t, self.special, self.max_source, self.max_target)
            if self.same_tokenizer:
                teacher_source, teacher_target = source, target
            else:
                teacher_source, teacher_target = self._teacher_pair(ts, tt)
            examples.append(DistillExample(i, source, target, teacher_source, teacher_target))
        self.examples[split] = examples
        return examples

    def stream(self, split: str, pairs, limit: int | None = None) -> "StreamedExamples":
        """Examples read lazily from a prepared store's pairs (student ids); kept as
        `self.examples[split]`. With `limit`, the first `limit` pairs, read now (validation)."""
        examples = StreamedExamples(self, pairs)
        if limit is not None:
            examples = [examples[i] for i in range(min(limit, len(examples)))]
        self.examples[split] = examples
        return examples

    def example(self, index: int, source_ids: list[int], target_ids: list[int]) -> DistillExample:
        """One prepared pair as a DistillExample: the teacher's ids are the student's when the two
        share a tokenizer, else the pair's text re-tokenised by the teacher."""
        source, target = obj.seq2seq(source_ids, target_ids, self.special, self.max_source, self.max_target)
        if self.same_tokenizer:
            return DistillExample(index, source, target, source, target)
        teacher_source, teacher_target = self._teacher_pair(self.teacher.encode(self.student.decode(source_ids)),
                                                            self.teacher.encode(self.student.decode(target_ids)))
        return DistillExample(index, source, target, teacher_source, teacher_target)

    def _teacher_pair(self, source: list[int], target: list[int]) -> tuple[list[int], list[int]]:
        return list(source[: self.max_source]), [*target[: self.max_target - 1], self.teacher.eos_id]

    # -- batches -------------------------------------------------------------

    def __call__(self, examples: list[DistillExample], rngs=None, split: str = "train") -> dict[str, torch.Tensor]:
        """The batch of `examples`: live-teacher inputs, or cached teacher rows when a cache is set."""
        batch = self.build([e.source for e in examples], [e.target for e in examples],
                           [e.teacher_source for e in examples], [e.teacher_target for e in examples],
                           teacher_inputs=self.cache is None)
        batch["example_index"] = torch.tensor([e.index for e in examples])
        if self.cache is not None:
            rows = [self.cache.rows(split, e.index) for e in examples]
            batch |= stack_rows(rows, batch["labels"].shape[1])
        return batch

    def build(self, sources, targets, teacher_sources, teacher_targets, teacher_inputs: bool = True) -> dict:
        batch = obj.collate_seq2seq(list(zip(sources, targets)), self.special)
        if teacher_inputs:
            batch |= teacher_batch(teacher_sources, teacher_targets, self.teacher_start, self.teacher.pad_id,
                                   [len(t) for t in targets])
        else:
            batch["kd_mask"] = student_mask(batch["labels"])
        return batch

    def with_targets(self, split: str, indices: list[int], generated: list[list[int]], by: str) -> dict:
        """A batch for the prompts of `indices` around generated targets (`by` = "teacher": teacher
        ids, gold-like (eos appended if missing); "student": student samples, scored as they are)."""
        examples = [self.examples[split][i] for i in indices]
        student_targets, teacher_targets = [], []
        for ids in generated:
            if by == "teacher":
                teacher_target = _ending(ids, self.teacher.eos_id, self.max_target)
                student_target = teacher_target if self.same_tokenizer else self._retokenize(
                    teacher_target, self.teacher, self.student, self.student.eos_id, append_eos=True)
            else:
                student_target = list(ids[: self.max_target])
                teacher_target = student_target if self.same_tokenizer else self._retokenize(
                    student_target, self.student, self.teacher, self.teacher.eos_id,
                    append_eos=self.student.eos_id in student_target)
            student_targets.append(student_target)
            teacher_targets.append(teacher_target)
        return self.build([e.source for e in examples], student_targets, [e.teacher_source for e in examples],
                          teacher_targets)

    def _retokenize(self, ids: list[int], source: TextTokenizer, destination: TextTokenizer, eos: int,
                    append_eos: bool) -> list[int]:
        text = source.decode([i for i in ids if i != source.eos_id])
        out = destination.encode(text)[: self.max_target - (1 if append_eos else 0)]
        return [*out, eos] if append_eos or not out else out


class StreamedExamples:
    """DistillExamples built on demand from (source ids, target ids) rows (slmctl.data.streaming.Pairs)."""

    def __init__(self, batcher: DistillBatcher, pairs):
        self.batcher, self.pairs = batcher, pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> DistillExample:
        return self.batcher.example(index, *self.pairs[index])


def _ending(ids: list[int], eos: int, max_len: int) -> list[int]:
    """`ids` cut to `max_len`, ending with eos (a continuation that ran out of room gets one)."""
    if eos in ids[:max_len]:
        return list(ids[: ids.index(eos) + 1])
    return [*ids[: max_len - 1], eos]
