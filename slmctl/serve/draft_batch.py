"""A draft model beside the served one (`slmctl serve MODEL --draft SMALLER`): its own continuous batch.

Row i of the draft batch always drafts for row i of the served batch: it joins with the same prompt,
leaves when that row leaves (the last row moving into its place on both sides) and is emptied when
the served batch is. Before each pass every row's draft cache is cut back to the longest prefix of
what it has read that the request still holds (the served model may have rejected drafts), then
reads what it has not seen yet (all rows in one call, padded to the longest, the padding cut off
again) and proposes its drafts greedily, one call per drafted position for all rows together. A row
asking for fewer drafts than the longest takes the first ones. Greedy proposals are certain ones,
so the engine's accept rule keeps sampling exact, as with prompt lookup.
"""

from __future__ import annotations

import torch


class DraftBatch:
    """Greedy drafts for every active row, from a draft model's batch (`TorchBatch` or `OnnxBatch`)."""

    def __init__(self, batch, max_tokens: int, label: str, bos: int, eos: int):
        if max_tokens < 1:
            raise ValueError(f"draft tokens must be >= 1, got {max_tokens}")
        self.batch, self.max_tokens, self.name = batch, max_tokens, label
        self.bos = bos  # a row reads the start token first, as the served row does
        self.eos = eos  # once every row has drafted it, no later draft can be kept: drafting stops
        self.seen: list[list[int]] = []  # per row: the tokens its cache holds, the start token first

    @property
    def cache_mb(self) -> float:
        """Megabytes of self-attention keys and values one slot of the draft batch holds."""
        cache = self.batch.cache
        if isinstance(cache, list):  # OnnxBatch: per layer key, value [slots, KV, capacity, d]
            return sum(c[0].nbytes for c in cache) / 1e6
        return (cache.k[:, 0].nbytes + cache.v[:, 0].nbytes) / 1e6  # TorchBatch's SlotCache

    def join(self, prompts: list[list[int]]) -> None:
        self.batch.join(prompts=prompts)
        self.seen += [[] for _ in prompts]

    def leave(self, row: int) -> None:
        moved = self.batch.leave(row)
        last = self.seen.pop()
        if moved is not None:
            self.seen[row] = last

    def reset(self) -> None:
        self.batch.reset()
        self.seen = []

    @torch.inference_mode()
    def drafts(self, generated: list[list[int]], wanted: list[int]) -> list[list[int]]:
        """Up to `wanted[i]` greedy drafts after row i's `generated` tokens (rows that want none get [])."""
        k = max(wanted, default=0)
        if k == 0:
            return [[] for _ in generated]
        sequences = [[self.bos, *tokens] for tokens in generated]  # what each row must have read to draft
        shared = [_common_prefix(seen, sequence) for seen, sequence in zip(self.seen, sequences)]
        unseen = [sequence[s:] for sequence, s in zip(sequences, shared)]
        self.batch.cut(torch.tensor(shared))  # drop what the served model did not keep
        width = max(1, max(map(len, unseen)))
        fed = torch.tensor([u + [self.bos] * (width - len(u)) for u in unseen])
        logits = self.batch.verify(fed)  # [n, width, vocab]; padding sits after each row's tokens, so it changes none
        last = torch.tensor([max(len(u) - 1, 0) for u in unseen])
        proposed = [logits[torch.arange(len(unseen)), last].argmax(dim=-1)]
        self.batch.cut(torch.tensor([s + len(u) for s, u in zip(shared, unseen)]))
        ended = proposed[0] == self.eos
        for _ in range(k - 1):
            if bool(ended.all()):
                break
            proposed.append(self.batch.step(proposed[-1]).argmax(dim=-1))
            ended |= proposed[-1] == self.eos
        columns = torch.stack(proposed, dim=1).tolist()  # [n, <= k]
        self.seen = [sequence + row[:len(proposed) - 1] for sequence, row in zip(sequences, columns)]  # what each cache holds
        return [row[:n] for row, n in zip(columns, wanted)]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
