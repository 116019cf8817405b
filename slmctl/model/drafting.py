"""Drafters: cheap guesses of the next few tokens, which one decoder pass then checks.

At batch 1 a decode step reads every decoder weight to produce one token; a pass over
1 + K tokens reads them once too (slmctl.model.generation's speculative loop). A drafter
proposes the K tokens; the model keeps the longest prefix it agrees with, plus its own
next token, so the output is what plain decoding gives.

`PromptLookup` drafts by n-gram lookup (transformers' `prompt_lookup_num_tokens`,
llama.cpp's lookup decoding): the last n generated tokens are searched for in the source
and in what was generated before, and the tokens that followed their most recent earlier
occurrence are the draft. Encoder-decoders often copy from their source (extractive
answers, summaries, rewrites), which is where such drafts are accepted. K adapts to the
acceptance: +2 after a pass that accepted every drafted token, -1 after one that did not
(transformers' heuristic for assisted generation), within 1..max_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DraftStats:
    """What the drafter proposed and the model kept, over every pass of a generation."""

    passes: int = 0  # verification passes (decoder calls with drafted tokens)
    drafted: int = 0  # tokens drafted in them
    accepted: int = 0  # drafted tokens the model agreed with

    @property
    def accepted_per_pass(self) -> float:
        return self.accepted / self.passes if self.passes else 0.0

    def as_dict(self) -> dict:
        return {"passes": self.passes, "drafted": self.drafted, "accepted": self.accepted,
                "accepted_per_pass": round(self.accepted_per_pass, 3)}


class PromptLookup:
    """Drafts up to `max_tokens` tokens per pass from n-gram matches (n = `ngram` down to 1). The
    longest match picks the right one of many occurrences of a short n-gram (a name that starts
    every sentence of a paragraph); measured on the long-output task (docs/speed.md), drafts kept
    per pass rose with n up to 6 (3.23 at n = 3, 3.46 at 6, 3.46 at 8), and short answers did not
    change."""

    name = "prompt"

    def __init__(self, max_tokens: int = 10, ngram: int = 6, adaptive: bool = True):
        if max_tokens < 1 or ngram < 1:
            raise ValueError(f"draft tokens and n-gram size must be >= 1, got {max_tokens} and {ngram}")
        self.max_tokens, self.ngram, self.adaptive = max_tokens, ngram, adaptive
        self.tokens = max_tokens  # this pass's K
        self.sources: list[list[int]] = []
        self.stats = DraftStats()

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int = 64) -> None:
        """A new generation over prompts `input_ids` [B, S] (padding left out of the lookup)."""
        rows = input_ids.tolist()
        keep = attention_mask.bool().tolist() if attention_mask is not None else [[True] * len(r) for r in rows]
        self.sources = [[t for t, k in zip(row, kept) if k] for row, kept in zip(rows, keep)]
        self.tokens, self.stats = self.max_tokens, DraftStats()

    def row_draft(self, source: list[int], generated: list[int], limit: int) -> list[int]:
        """Up to `limit` tokens that followed an earlier occurrence of generated's last n tokens (the
        longest n <= ngram that occurs), in what was generated or else in the source: the most recent
        occurrence with `limit` tokens after it, else the one with the most. A match never straddles
        the end of the source: the decoder's text does not continue the source's. One scan finds
        every earlier occurrence of the last token with how far the match reaches back; each n then
        picks among those (a scan per n cost a fifth of an ONNX Runtime pass at n = 6)."""
        if not generated:
            return []
        last, longest = generated[-1], min(self.ngram, len(generated))
        found = []  # (tokens matched, text, index of the occurrence's last token): most recent first
        for text in (generated, source):
            for end in range(len(text) - 2, -1, -1):  # a token must follow; generated's own last one is not earlier
                if text[end] == last:
                    matched = 1
                    while matched < longest and matched <= end and text[end - matched] == generated[-1 - matched]:
                        matched += 1
                    found.append((matched, text, end))
        for n in range(longest, 0, -1):
            best = []
            for matched, text, end in found:
                if matched >= n:
                    follows = text[end + 1:end + 1 + limit]
                    if len(follows) == limit:
                        return follows
                    best = max(best, follows, key=len)
            if best:
                return best
        return []

    def propose(self, generated: torch.Tensor, finished: torch.Tensor, limit: int) -> torch.Tensor:
        """Drafts [B, k] for the rows' next tokens, k <= min(K, limit): one length for the batch (the
        shortest draft of a row still generating; 0 when one has none). Finished rows get theirs too
        (ignored: they only emit padding)."""
        limit = min(self.tokens, limit)
        if limit <= 0:
            return generated.new_zeros(generated.shape[0], 0)
        drafts = [self.row_draft(source, row, limit) for source, row in zip(self.sources, generated.tolist())]
        live = [d for d, done in zip(drafts, finished.tolist()) if not done]
        k = min((len(d) for d in live), default=0)
        return torch.tensor([(d + [0] * k)[:k] for d in drafts], dtype=torch.long, device=generated.device).view(len(drafts), k)

    def update(self, drafted: int, accepted: int) -> None:
        """Record a pass; adapt K to it."""
        self.stats.passes += 1
        self.stats.drafted += drafted
        self.stats.accepted += accepted
        if self.adaptive:
            self.tokens = min(self.max_tokens, self.tokens + 2) if accepted == drafted else max(1, self.tokens - 1)


DRAFTERS = ("none", "prompt")


class DraftModel:
    """Drafts with a smaller model of the same tokenizer: its own decoding session (encoder once,
    its own self-attention cache) proposes up to K tokens greedily; after each pass its cache is cut
    back to the longest prefix the model kept and it reads the tokens it has not seen. Greedy
    drafts are proposals with certainty, so the loop's accept rule keeps sampling exact."""

    name = "model"

    def __init__(self, model, max_tokens: int = 4, adaptive: bool = True, label: str = "model"):
        if max_tokens < 1:
            raise ValueError(f"draft tokens must be >= 1, got {max_tokens}")
        self.model, self.max_tokens, self.adaptive, self.name = model, max_tokens, adaptive, label
        self.eos_id = model.config.eos_token_id
        self.tokens = max_tokens
        self.stats = DraftStats()

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int = 64) -> None:
        with torch.inference_mode():
            self.session = self.model.start_decoding(input_ids.to(self.model.device), attention_mask, max_new_tokens + 1)
            self.session.first_logits()  # the draft session reads BOS, as the model's does
        self.seen = input_ids.new_zeros(input_ids.shape[0], 0)  # tokens fed after BOS (every row the same count)
        self.tokens, self.stats = self.max_tokens, DraftStats()

    @torch.inference_mode()
    def propose(self, generated: torch.Tensor, finished: torch.Tensor, limit: int) -> torch.Tensor:
        """Greedy drafts [B, k], k = min(K, limit), after `generated`: the cache first cut back to what
        `generated` shares with what it saw, then fed the rest."""
        k = min(self.tokens, limit)
        if k <= 0:
            return generated.new_zeros(generated.shape[0], 0)
        width = min(self.seen.shape[1], generated.shape[1] - 1)  # the last generated token is never seen yet
        agree = (self.seen[:, :width] == generated[:, :width].to(self.seen.device)) | finished[:, None].to(self.seen.device)
        shared = int(agree.all(dim=0).long().cumprod(0).sum())
        self.session.cut(1 + shared)
        unseen = generated[:, shared:].to(self.model.device)
        logits = self.session.verify(unseen)[:, -1]  # generated is never empty here: the pass's own token at least
        drafts = [logits.argmax(dim=-1)]
        ended = drafts[0] == self.eos_id
        for _ in range(k - 1):
            if bool((ended | finished.to(ended.device)).all()):  # past EOS a draft is never kept: stop paying for them
                break
            drafts.append(self.session.step(drafts[-1]).argmax(dim=-1))
            ended |= drafts[-1] == self.eos_id
        self.seen = torch.cat([generated[:, :shared].to(self.model.device), unseen, *(d[:, None] for d in drafts[:-1])], dim=1)
        return torch.stack(drafts, dim=1).to(generated.device)

    update = PromptLookup.update


def make_drafter(name: str, tokens: int, ngram: int):
    """The drafter `--draft NAME` asks for (None for "none"), or a one-line error; `ngram`: prompt
    lookup's longest n-gram (`--draft-ngram`)."""
    from slmctl.errors import ConfigError

    if name == "none":
        return None
    if name == "prompt":
        for option, value in (("--draft-tokens", tokens), ("--draft-ngram", ngram)):
            if value < 1:
                raise ConfigError(f"{option} must be >= 1, got {value}")
        return PromptLookup(max_tokens=tokens, ngram=ngram)
    raise ConfigError(f"--draft takes {' or '.join(DRAFTERS)} (prompt: n-gram lookup in the source), got {name!r}")
