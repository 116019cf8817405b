"""The serving loop: one thread owns the model and advances every active request each step.

HTTP handlers (on the event loop) `submit` requests; the engine thread, between decoding steps,
admits waiting requests (their prompts encoded together), feeds every active sequence one
token in one batched call, picks each row's next token by that request's own settings
(greedy, or temperature / top-p with its own seeded generator), and hands each request its
new text through a thread-safe callback. A request leaves at EOS, `max_tokens`, a stop string,
or when its client goes away (`cancel`); its row is free for the next waiting request at once.

The waiting queue is bounded: `submit` raises `QueueFull` (HTTP 429) when it is, and
`Draining` (HTTP 503) once `drain` was called (shutdown: in-flight requests finish).

With a drafter (`slmctl serve MODEL --draft prompt`), each row drafts its own next tokens from its
prompt and output (slmctl.model.drafting), one decoder call checks every row's drafts, and each
row keeps what its own settings accept (so each request accepts at its own rate and gets the
tokens it would get without drafts; a seeded sampling request draws differently) and has its
cache cut back past the rest. A draft model (`--draft SMALLER`) keeps its own batch, row for row
with the served one (slmctl.serve.draft_batch). A pass's tokens are spread over the pass's time in
the per-token latency metric.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from slmctl.model.generation import GenerationConfig, choose_token
from slmctl.serve.draft_batch import DraftBatch


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is full."""


class Draining(Exception):
    """The server is shutting down: no new requests."""


@dataclass
class Request:
    """One generation request and what has come of it so far."""

    prompt: list[int] | None  # encoder token ids (text models)
    max_tokens: int
    on_event: Callable[[dict], None]  # called from the engine thread with each event (see Engine)
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # run to max_tokens (load tests)
    embeds: torch.Tensor | None = None  # vision models on torch: the embedded encoder input [S, d_model]
    image_features: object = None  # vision exports on ONNX Runtime: the image tokens [M, d_model] of `prompt`'s placeholders
    id: int = field(default_factory=itertools.count().__next__)
    submitted: float = field(default_factory=time.perf_counter)
    # filled by the engine
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    shown: int = 0  # characters of `text` already sent
    first_token_at: float | None = None
    last_token_at: float | None = None
    cancelled: bool = False
    generator: torch.Generator | None = None
    drafted: int = 0  # tokens drafted for this request, and kept (--draft)
    accepted: int = 0
    draft_k: int = 0  # this request's drafts per pass now (adapts to its own acceptance)
    settings: GenerationConfig | None = None  # its decoding settings, made once (`Engine._walk`)
    error: str | None = None  # why it ended with an error in a step
    deadline: float | None = None  # time.perf_counter() past which it ends, finish_reason "timeout"

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt) if self.prompt is not None else int(self.embeds.shape[0])


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of `text` could still become the start of a stop string."""
    keep = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                keep = max(keep, n)
                break
    return keep


class Engine:
    """Continuous batching over a `TorchBatch` (or any object with its join/step/leave/active).

    Events passed to a request's `on_event`: {"type": "text", "text": new characters},
    then exactly one {"type": "done", "finish_reason": "stop"|"length"|"cancelled"|"timeout"|"error",
    "prompt_tokens", "completion_tokens", "message" (errors)}."""

    def __init__(self, batch, tokenizer, eos_ids: list[int], bos_id: int, max_queue: int = 64, metrics=None, drafter=None):
        self.batch, self.tokenizer, self.drafter = batch, tokenizer, drafter
        self.eos, self.bos = set(eos_ids), bos_id
        self.eos_ids, self.no_tokens = torch.tensor(sorted(self.eos)), torch.empty(1, 0, dtype=torch.long)  # for choose_token
        self.max_queue, self.metrics = max_queue, metrics
        self.waiting: collections.deque[Request] = collections.deque()
        self.rows: list[Request] = []  # row i of the batch serves rows[i]
        self.condition = threading.Condition()
        self.draining = self.stopped = False
        self.thread = threading.Thread(target=self._loop, name="slmctl-engine", daemon=True)
        self.failure: BaseException | None = None

    # -- the HTTP side ------------------------------------------------------------------------

    def start(self) -> "Engine":
        self.thread.start()
        return self

    def submit(self, request: Request) -> None:
        with self.condition:
            if self.draining:
                raise Draining("the server is shutting down")
            if self.failure is not None:
                raise Draining(f"the model loop failed: {self.failure}")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.rows)} requests are being served and {len(self.waiting)} are waiting")
            self.waiting.append(request)
            self._gauge()
            self.condition.notify()

    def cancel(self, request: Request) -> None:
        """The client went away: its row is freed before the next step."""
        request.cancelled = True
        with self.condition:
            self.condition.notify()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def active(self) -> int:
        return len(self.rows)

    def drain(self) -> None:
        """Refuse new requests; those waiting or active still finish."""
        with self.condition:
            self.draining = True
            self.condition.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Cancel whatever is left and end the loop."""
        with self.condition:
            self.draining = self.stopped = True
            self.condition.notify()
        self.thread.join(timeout)

    # -- the engine thread -------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                with self.condition:
                    while not self.stopped and not self.waiting and not self.rows:
                        self.condition.wait()
                    if self.stopped:
                        break
                    joining = self._take_waiting()
                try:
                    if joining:
                        self._join(joining)
                    if self.rows:
                        self._step()
                except Exception as e:  # an error no request could be blamed for: the step's requests end, the loop goes on
                    self._fail_rows(f"{type(e).__name__}: {e}")
        except BaseException as e:  # noqa: BLE001 - reported to every request, then to the server
            self.failure = e
            with self.condition:
                left = [*self.rows, *self.waiting]
                self.rows, self.waiting = [], collections.deque()
            for request in left:
                self._finish(request, "error", message=f"{type(e).__name__}: {e}")
            raise
        with self.condition:  # stopped: whatever is left ends now
            left = [*self.rows, *self.waiting]
            self.rows, self.waiting = [], collections.deque()
        for request in left:
            self._finish(request, "cancelled", message="the server stopped")

    def _take_waiting(self) -> list[Request]:
        free = self.batch.slots - len(self.rows)
        joining = []
        now = time.perf_counter()
        while self.waiting and len(joining) < free:
            request = self.waiting.popleft()
            if request.cancelled:
                self._finish(request, "cancelled")
            elif request.deadline is not None and now > request.deadline:
                self._finish(request, "timeout", message="the request waited past its deadline")
            else:
                joining.append(request)
        self._gauge()
        return joining

    def _join(self, requests: list[Request]) -> None:
        """Admit `requests`, text prompts and embedded (vision) prompts each encoded together. A group the
        model cannot take is tried again one request at a time, so that only the request at fault fails."""
        admitted = []
        for request in requests:
            try:
                if request.temperature > 0:
                    request.generator = torch.Generator(device="cpu")
                    if request.seed is not None:
                        request.generator.manual_seed(request.seed)
                    else:  # a fresh seed for this request only (torch.seed() would reseed the process's global RNG)
                        request.generator.seed()
            except Exception as e:  # e.g. a seed outside the generator's range (the HTTP side refuses those first)
                self._finish(request, "error", message=f"the request's seed cannot be used: {type(e).__name__}: {e}")
                continue
            admitted.append(request)
        text = [r for r in admitted if r.embeds is None]
        images = [r for r in admitted if r.embeds is not None]
        for group in (text, images):
            if not group:
                continue
            try:
                self._admit(group)
            except Exception:
                for request in group:
                    self._admit_or_fail(request)
        self._gauge()

    def _admit(self, group: list[Request]) -> None:
        """The group's rows in the batch (and in a draft model's, row for row), or neither."""
        drafting = isinstance(self.drafter, DraftBatch)
        if drafting:
            self.drafter.join([r.prompt for r in group])
        try:
            if group[0].embeds is not None:
                self.batch.join(embeds=[r.embeds for r in group])
            elif any(r.image_features is not None for r in group):
                self.batch.join(prompts=[r.prompt for r in group], image_features=[r.image_features for r in group])
            else:
                self.batch.join(prompts=[r.prompt for r in group])
        except Exception:
            if drafting:
                for _ in group:
                    self.drafter.leave(len(self.drafter.seen) - 1)
            raise
        self.rows += group

    def _admit_or_fail(self, request: Request) -> None:
        try:
            self._admit([request])
        except Exception as e:
            self._finish(request, "error", message=f"the prompt could not be encoded: {type(e).__name__}: {e}")

    def _fail_rows(self, message: str) -> None:
        """End every active request with an error and empty the batch (its state is unknown after a failed call)."""
        failed, self.rows = self.rows, []
        self.batch.reset()
        if isinstance(self.drafter, DraftBatch):
            self.drafter.reset()
        for request in failed:
            self._finish(request, "error", message=message)
        self._gauge()

    def _step(self) -> None:
        last = [r.tokens[-1] if r.tokens else self.bos for r in self.rows]
        drafts = self._drafts() if self.drafter is not None else [[] for _ in self.rows]
        width = max(map(len, drafts))
        if width == 0:
            logits = self.batch.step(torch.tensor(last)).float().cpu()[:, None]  # (sampling generators live on the CPU)
        else:
            before = torch.as_tensor(self.batch.lengths[:len(self.rows)]).clone()
            fed = torch.tensor([[t, *d, *[0] * (width - len(d))] for t, d in zip(last, drafts)])
            logits = self.batch.verify(fed).float().cpu()  # [n, 1 + width, vocab]
        now = time.perf_counter()
        finite = torch.isfinite(logits).all(dim=-1)  # [n, positions]: one check for the whole batch
        leaving, kept = [], []
        for i, request in enumerate(self.rows):
            if request.cancelled or (request.deadline is not None and now > request.deadline):
                leaving.append((i, "cancelled" if request.cancelled else "timeout"))
                if not request.cancelled:
                    request.error = "the request ran past its deadline (request_timeout_s)"
                kept.append(0)
                continue
            try:
                if not bool(finite[i, :len(drafts[i]) + 1].all()):
                    raise FloatingPointError("the model's logits are not finite (NaN or infinity)")
                tokens = self._walk(request, logits[i], drafts[i])
                kept.append(len(tokens) - 1)
                since = request.last_token_at if request.last_token_at is not None else now
                for m, token in enumerate(tokens):  # a pass's tokens share its time: no near-zero gaps between them
                    reason = self._advance(request, token, since + (now - since) * (m + 1) / len(tokens))
                    if reason:
                        leaving.append((i, reason))
                        break
            except Exception as e:  # this row's tokens could not be chosen: it alone ends, with the reason
                request.error = f"{type(e).__name__}: {e}"
                leaving.append((i, "error"))
                kept += [0] * (i + 1 - len(kept))
        if width:
            self.batch.cut(before + 1 + torch.tensor(kept))
        for i, reason in sorted(leaving, reverse=True):  # from the end: a leaving row takes the last one's place
            request = self.rows[i]
            moved = self.batch.leave(i)
            if isinstance(self.drafter, DraftBatch):
                self.drafter.leave(i)
            last_row = self.rows.pop()
            if moved is not None:
                self.rows[i] = last_row
            self._finish(request, reason, message=request.error)
        self._gauge()

    def _drafts(self) -> list[list[int]]:
        """Each row's drafted tokens: up to its own K, within its max_tokens and the cache's capacity."""
        wanted = []
        for request, length in zip(self.rows, self.batch.lengths[:len(self.rows)].tolist()):
            if not request.draft_k:
                request.draft_k = self.drafter.max_tokens
            room = min(request.max_tokens - len(request.tokens), self.batch.capacity - length) - 1
            wanted.append(max(0, min(request.draft_k, room)) if request.tokens else 0)
        if isinstance(self.drafter, DraftBatch):  # one draft model call per drafted position, all rows together
            return self.drafter.drafts([r.tokens for r in self.rows], wanted)
        return [self.drafter.row_draft(r.prompt or [], r.tokens, k) if k else [] for r, k in zip(self.rows, wanted)]

    def _walk(self, request: Request, logits: torch.Tensor, draft: list[int]) -> list[int]:
        """The tokens a row takes from one pass: at each position the request's own choice (greedy, or its
        sampling settings and generator, keeping a drafted token by speculative sampling's rule), on while
        the drafts are kept; its K adapts to what it kept."""
        if request.settings is None:
            request.settings = GenerationConfig(max_new_tokens=max(1, request.max_tokens), do_sample=request.temperature > 0,
                                                temperature=request.temperature if request.temperature > 0 else 1.0,
                                                top_p=request.top_p)
        settings, tokens = request.settings, []
        if not settings.do_sample and settings.repetition_penalty == 1.0 and len(request.tokens) >= settings.min_new_tokens:
            # greedy: no position's choice depends on those before it, so one argmax serves the whole pass
            # (a few tensor ops per kept token cost about what a small model's decoder step does)
            for choice, drafted in zip(logits[:len(draft) + 1].argmax(dim=-1).tolist(), [*draft, None]):
                tokens.append(choice)
                if choice != drafted:
                    break
        else:
            for j in range(len(draft) + 1):
                drafted = torch.tensor([draft[j]]) if j < len(draft) else None
                token, kept = choose_token(logits[j:j + 1], self.no_tokens, len(request.tokens), settings, self.eos_ids,
                                           request.generator, drafted)
                tokens.append(int(token))
                if drafted is None or not bool(kept):
                    break
        if draft:
            request.drafted += len(draft)
            request.accepted += len(tokens) - 1
            request.draft_k = min(self.drafter.max_tokens, request.draft_k + 2) if len(tokens) > len(draft) else \
                max(1, request.draft_k - 1)
            if self.metrics:
                self.metrics.drafts(len(draft), len(tokens) - 1)
        return tokens

    def _advance(self, request: Request, token: int, now: float) -> str | None:
        """Take one new token; returns the finish reason when the request is done."""
        if request.first_token_at is None:
            request.first_token_at = now
            if self.metrics:
                self.metrics.first_token(now - request.submitted)
        elif self.metrics:
            self.metrics.next_token(now - request.last_token_at)
        request.last_token_at = now
        reason = None
        if token in self.eos and not request.ignore_eos:
            reason = "stop"
        else:
            request.tokens.append(token)
        text = self.tokenizer.decode(request.tokens)
        cut = min((text.find(s) for s in request.stop if s in text), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        elif reason is None and len(request.tokens) >= request.max_tokens:
            reason = "length"
        if reason is None and text.endswith("\ufffd"):  # half a character so far: wait for the rest
            return None
        request.text = text
        ready = len(text) if reason else len(text) - held_back(text, request.stop)
        if ready > request.shown:
            request.on_event({"type": "text", "text": text[request.shown:ready]})
            request.shown = ready
        return reason

    def _finish(self, request: Request, reason: str, message: str | None = None) -> None:
        if self.metrics:
            self.metrics.finished(request, reason)
        event = {"type": "done", "finish_reason": reason, "prompt_tokens": request.prompt_tokens,
                 "completion_tokens": len(request.tokens)}
        if self.drafter is not None:
            event |= {"drafted_tokens": request.drafted, "accepted_tokens": request.accepted}
        if message:
            event["message"] = message
        request.on_event(event)

    def _gauge(self) -> None:
        if self.metrics:
            self.metrics.depth(len(self.waiting), len(self.rows))

