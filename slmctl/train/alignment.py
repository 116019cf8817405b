"""Sequence alignment between a decoder-only teacher and an encoder-decoder student.

The paper's method: the teacher reads `[start ; prompt ; target]` as one sequence (no
padding in between, so every example has its own offset), the student's encoder reads the
prompt and its decoder reads `bos + target[:-1]`. Student position j predicts target token
j; so does teacher position `offset + j - 1`, where `offset` is the index of the first
target token in the teacher's row. Batches are right-padded, and `kd_mask` marks the
(example, j) pairs that are real on both sides: padding never enters a loss.

With different tokenizers (ULD) the two targets have different lengths; position j is
paired with teacher target token j for j below the shorter of the two, as Boizard et al. do.
"""

from __future__ import annotations

import torch


def teacher_rows(prompts: list[list[int]], targets: list[list[int]], start_ids: list[int]) -> tuple[list[list[int]], list[int]]:
    """Each teacher row `start + prompt + target`, and the index of its first target token."""
    rows = [[*start_ids, *prompt, *target] for prompt, target in zip(prompts, targets, strict=True)]
    offsets = [len(start_ids) + len(prompt) for prompt in prompts]
    return rows, offsets


def teacher_batch(prompts: list[list[int]], targets: list[list[int]], start_ids: list[int], pad_id: int,
                  student_lengths: list[int]) -> dict[str, torch.Tensor]:
    """The teacher's right-padded input [B, T], and for student target positions j the teacher
    position predicting the same token [B, J] plus the mask of pairs real on both sides [B, J]
    (J = the longest paired length; masked positions point at a valid index so gathers stay legal)."""
    if any(not target for target in targets):
        raise ValueError("every teacher target needs at least one token")
    rows, offsets = teacher_rows(prompts, targets, start_ids)
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    paired = [min(len(target), n) for target, n in zip(targets, student_lengths, strict=True)]
    span = max(paired)
    j = torch.arange(span)
    offsets_t = torch.tensor(offsets)[:, None]
    kd_mask = j[None, :] < torch.tensor(paired)[:, None]
    positions = torch.where(kd_mask, offsets_t - 1 + j[None, :], offsets_t - 1)
    return {"teacher_input_ids": input_ids, "teacher_attention_mask": attention_mask,
            "teacher_positions": positions, "kd_mask": kd_mask}


def student_mask(labels: torch.Tensor) -> torch.Tensor:
    """The student's real target positions (labels that are not -100)."""
    return labels != -100
