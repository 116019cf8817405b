"""LLM-as-judge for `slmctl eval`: a judge model grades each prediction for correctness on 0..1.

Why this module exists: overlap metrics (EM, F1, ROUGE, BLEU) punish a correct answer worded
differently from the reference and reward a wrong one that copies its words. The paper's
"Ragas-GPT" column instead asks a stronger model whether the prediction is right. To make that
number reproducible, the prompt is one fixed, versioned rubric (`RUBRIC`, `RUBRIC_VERSION`), the
judge decodes greedily (temperature 0), and the score is read from one strictly specified line.

The rubric shows the judge three fields, each cut to `MAX_FIELD_CHARS` characters:

- SOURCE: the task input the model was given (question, passage, document to summarise);
- REFERENCE: the gold answer;
- PREDICTION: the model's answer, the one being graded.

It asks for factual correctness and completeness of the PREDICTION relative to the REFERENCE,
given the SOURCE, ignoring wording and style: 1 = fully correct and complete, 0 = wrong, empty
or irrelevant, values in between for partially correct answers. The reply must end with a line
exactly `Score: <number between 0 and 1>`; `parse_score` reads the last such line, and a reply
without a valid one counts as missing (never as 0), so a judge that fails to follow the format
shows up in `JudgeResult.missing` rather than silently lowering the mean.

Two judges share one interface (`id`, `complete(prompts) -> replies`):

- `LocalJudge`: a Hugging Face causal LM (local directory or hub id), greedy, batched;
- `EndpointJudge`: any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp,
  Ollama...), over the standard library's urllib. The API key is read from an environment
  variable at request time and is never stored, logged or cached.

`JudgeCache` keeps every score (and the raw reply) per judge, rubric version and prompt, so
rerunning an evaluation costs nothing. A judge's `id` includes its token budget: a larger budget
can turn a cut-off, unparsable reply into a scored one, so it must not reuse those cache entries.
Changing `RUBRIC` means bumping `RUBRIC_VERSION`, which invalidates the cache.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from slmctl.errors import UserError, first_line

RUBRIC_VERSION = "1"
MAX_FIELD_CHARS = 4000  # per field; a longer field keeps its first MAX_FIELD_CHARS characters and gets TRUNCATION_MARK
TRUNCATION_MARK = " [...truncated]"

RUBRIC = """You are grading an answer written by a language model.

SOURCE (the task input):
{source}

REFERENCE (a correct answer):
{reference}

PREDICTION (the answer to grade):
{prediction}

Grade the factual correctness and completeness of the PREDICTION relative to the REFERENCE, given the SOURCE. \
Ignore wording, style and length. 1 means fully correct and complete; 0 means wrong, empty or irrelevant; \
use values in between for partially correct answers.
Write at most one short sentence of reasoning, then a final line exactly:
Score: <number between 0 and 1>"""

# The last "Score:" label; the number must follow it directly (optional markdown bold) and end there.
_SCORE_LABEL = re.compile(r"\bscore\s*:", re.IGNORECASE)
_SCORE_VALUE = re.compile(r"\s*\**\s*(\d+(?:\.\d+)?|\.\d+)(?![\w/])")

DTYPES = ("auto", "float32", "bfloat16", "float16")
HTTP_RETRIES = 2  # extra attempts after a 429, a 5xx, a timeout or a connection error


class JudgeError(UserError, ValueError):
    """A judge cannot be built or cannot answer; the message is one line."""


class Judge(Protocol):
    id: str

    def complete(self, prompts: list[str]) -> list[str]: ...


def judge_prompt(source: str, reference: str, prediction: str) -> str:
    """The rubric filled in with the three fields, each stripped and cut to `MAX_FIELD_CHARS`."""
    return RUBRIC.format(source=_clip(source), reference=_clip(reference), prediction=_clip(prediction))


def _clip(text: str) -> str:
    text = text.strip()
    return text if len(text) <= MAX_FIELD_CHARS else text[:MAX_FIELD_CHARS] + TRUNCATION_MARK


def parse_score(reply: str) -> float | None:
    """The number after the last "Score:" in `reply` (case-insensitive), or None when there is no
    such label, the text after it is not a plain number (e.g. "abc", "6/10", "1e-1"), or it lies outside [0, 1]."""
    labels = list(_SCORE_LABEL.finditer(reply))
    if not labels:
        return None
    match = _SCORE_VALUE.match(reply, labels[-1].end())
    if match is None:
        return None
    score = float(match.group(1))
    return score if 0.0 <= score <= 1.0 else None


# ---------------------------------------------------------------------------
# Local judge


class LocalJudge:
    """A local (or hub id) AutoModelForCausalLM; greedy, max_new_tokens configurable; uses the tokenizer's
    chat template when it has one, else the raw prompt; batched with left padding."""

    def __init__(self, path: str, max_new_tokens: int = 32, batch_size: int = 8, dtype: str = "auto",
                 trust_remote_code: bool = False, device: str = "cpu", runs_dir: str | Path = "runs"):
        import torch
        from transformers import AutoTokenizer

        from slmctl.refs import HF_KINDS, RefError, resolve

        if dtype not in DTYPES:
            raise JudgeError(f"judge dtype {dtype!r} is not one of: {', '.join(DTYPES)}")
        if max_new_tokens < 1 or batch_size < 1:
            raise JudgeError(f"judge max_new_tokens and batch_size must be >= 1 (got {max_new_tokens}, {batch_size})")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise JudgeError(f"judge device {device!r}: CUDA is not available")
        try:
            model_ref = resolve(path, runs_dir, allow=HF_KINDS, purpose="the judge")
            where = model_ref.where
            self.model = model_ref.load_transformers(dtype="auto" if dtype == "auto" else getattr(torch, dtype),
                                                     trust_remote_code=trust_remote_code, what="judge model")
            self.tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
        except RefError as e:
            raise JudgeError(str(e) if str(e).startswith("cannot load") else f"cannot load judge model: {e}") from None
        except (OSError, ValueError, KeyError, ImportError) as e:
            raise JudgeError(f"cannot load judge model {path!r}: {first_line(e)}") from None
        self.model.to(device).eval().requires_grad_(False)
        self.tokenizer.padding_side = "left"  # every prompt ends where generation starts
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise JudgeError(f"judge tokenizer of {path!r} has neither a pad nor an eos token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.path = path
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.id = f"local:{where}:max_new_tokens={max_new_tokens}"

    def __repr__(self) -> str:
        return f"LocalJudge(path={self.path!r}, max_new_tokens={self.max_new_tokens}, batch_size={self.batch_size})"

    def _text(self, prompt: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
        return prompt

    def complete(self, prompts: list[str]) -> list[str]:
        """The judge's greedy reply to each prompt (the new text only, special tokens removed)."""
        replies: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            replies.extend(self._generate(prompts[start:start + self.batch_size]))
        return replies

    def _generate(self, prompts: list[str]) -> list[str]:
        import torch
        from transformers import GenerationConfig

        chat = bool(getattr(self.tokenizer, "chat_template", None))  # a chat template writes its own special tokens
        batch = self.tokenizer([self._text(p) for p in prompts], return_tensors="pt", padding=True,
                               add_special_tokens=not chat).to(self.device)
        settings = GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=False,
                                    pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)
        with torch.inference_mode():  # our settings, not the checkpoint's generation_config.json (often sampling)
            out = self.model.generate(**batch, generation_config=settings)
        new = out[:, batch["input_ids"].shape[1]:]
        return [text.strip() for text in self.tokenizer.batch_decode(new, skip_special_tokens=True)]


# ---------------------------------------------------------------------------
# Endpoint judge


class EndpointJudge:
    """Any OpenAI-compatible chat-completions endpoint (`endpoint` like http://host:port/v1), temperature 0.

    The API key is read from the environment variable named `api_key_env` at each request and sent as a
    bearer token; when the variable is unset no Authorization header is sent (local servers). Only the
    variable's name is kept on the object. 429, 5xx, timeouts and connection errors are retried
    `HTTP_RETRIES` times with a short backoff; anything else raises `JudgeError`."""

    batch_size = 16  # prompts per `complete` call from `judge_examples`: the cache is written after each
    backoff = 1.0  # seconds before the first retry; doubles for each further one

    def __init__(self, endpoint: str, model: str, api_key_env: str = "OPENAI_API_KEY", max_tokens: int = 64,
                 timeout: float = 60.0):
        parts = urllib.parse.urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise JudgeError(f"judge endpoint {endpoint!r} is not an http(s) URL like http://localhost:8000/v1")
        if not model:
            raise JudgeError("judge endpoint needs a model name")
        if max_tokens < 1:
            raise JudgeError(f"judge max_tokens must be >= 1 (got {max_tokens})")
        self.endpoint = endpoint.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.max_tokens = max_tokens
        self.timeout = timeout
        self.id = f"endpoint:{self.endpoint}:{model}:max_tokens={max_tokens}"

    def __repr__(self) -> str:
        return (f"EndpointJudge(endpoint={self.endpoint!r}, model={self.model!r}, api_key_env={self.api_key_env!r}, "
                f"max_tokens={self.max_tokens})")

    def complete(self, prompts: list[str]) -> list[str]:
        """The endpoint's reply to each prompt, one request per prompt."""
        return [self._ask(prompt) for prompt in prompts]

    def _ask(self, prompt: str) -> str:
        url = f"{self.endpoint}/chat/completions"
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "temperature": 0, "max_tokens": self.max_tokens}).encode()
        key = os.environ.get(self.api_key_env) or ""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        for attempt in range(HTTP_RETRIES + 1):
            last = attempt == HTTP_RETRIES
            try:
                with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers, method="POST"),
                                            timeout=self.timeout) as response:
                    payload = response.read()
                break
            except urllib.error.HTTPError as e:
                if (e.code == 429 or e.code >= 500) and not last:
                    time.sleep(self.backoff * 2 ** attempt)
                    continue
                detail = first_line(e.read().decode("utf-8", "replace"))[:200]
                hint = f" (environment variable {self.api_key_env} is not set)" if e.code in (401, 403) and not key else ""
                raise JudgeError(_redact(f"judge endpoint {url} answered HTTP {e.code}{hint}: {detail or e.reason}", key)) from None
            except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as e:
                if not last:
                    time.sleep(self.backoff * 2 ** attempt)
                    continue
                reason = e.reason if isinstance(e, urllib.error.URLError) else e
                raise JudgeError(_redact(f"cannot reach judge endpoint {url}: {first_line(str(reason))}", key)) from None
        try:
            content = json.loads(payload)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(f"judge endpoint {url} did not answer in the chat-completions format: "
                             f"{_redact(first_line(payload.decode('utf-8', 'replace'))[:200], key)}") from None
        if content is not None and not isinstance(content, str):
            raise JudgeError(f"judge endpoint {url} sent a non-text message content")
        return content or ""  # None (e.g. a refusal or a reasoning-only reply) counts as unparsable


def _redact(message: str, key: str) -> str:
    """`message` without the API key, should a server echo it back."""
    return message.replace(key, "***") if key else message


# ---------------------------------------------------------------------------
# Cache


class JudgeCache:
    """Scores cached per (judge id, RUBRIC_VERSION, sha256 of the prompt) in `directory`/judge-cache.jsonl
    (append-only lines {key, score, reply}; later lines win; a corrupt line is skipped), so reruns of the
    same evaluation are free."""

    FILENAME = "judge-cache.jsonl"

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / self.FILENAME
        self._entries: dict[str, dict] = {}
        self._needs_newline = False  # the file ends in a cut-off line (a crash mid-write)
        if self.path.is_file():
            text = self.path.read_text(encoding="utf-8", errors="replace")
            self._needs_newline = bool(text) and not text.endswith("\n")
            for line in text.splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if isinstance(entry, dict) and isinstance(entry.get("key"), str) and isinstance(entry.get("reply"), str) \
                        and (entry.get("score") is None or isinstance(entry.get("score"), (int, float))):
                    self._entries[entry["key"]] = entry

    @staticmethod
    def key(judge_id: str, prompt: str) -> str:
        """The cache key: judge id, rubric version and the prompt's sha256."""
        return f"{judge_id}|rubric={RUBRIC_VERSION}|{hashlib.sha256(prompt.encode('utf-8')).hexdigest()}"

    def get(self, judge_id: str, prompt: str) -> dict | None:
        """{"score": float | None, "reply": str} when this judge graded this prompt under this rubric, else None."""
        entry = self._entries.get(self.key(judge_id, prompt))
        return None if entry is None else {"score": entry["score"], "reply": entry["reply"]}

    def put(self, judge_id: str, prompt: str, score: float | None, reply: str) -> None:
        """Record a grade (appends one line to the file)."""
        entry = {"key": self.key(judge_id, prompt), "score": score, "reply": reply}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(("\n" if self._needs_newline else "") + json.dumps(entry, ensure_ascii=False) + "\n")
        self._needs_newline = False
        self._entries[entry["key"]] = entry


# ---------------------------------------------------------------------------
# Grading a set of examples


@dataclass
class JudgeResult:
    scores: list[float | None]  # per example; None = the judge's reply had no valid "Score:" line
    missing: int  # how many scores are None
    cached: int  # examples answered from the cache
    calls: int  # prompts sent to the judge this time (identical prompts are sent once)

    def mean(self) -> float | None:
        """Mean of the scores the judge gave (None when it gave none)."""
        given = [s for s in self.scores if s is not None]
        return sum(given) / len(given) if given else None


def judge_examples(judge: Judge, examples: list[dict], cache: JudgeCache | None = None,
                   on_progress: Callable[[int], None] | None = None) -> JudgeResult:
    """Grade each example ({"source", "reference", "prediction"} strings) with `judge`.

    Cached grades are reused; the other prompts go to `judge.complete` in chunks of `judge.batch_size`
    (all at once if it has none), and every reply is cached, unparsable ones too (score None), so a
    rerun is free. `on_progress(n)` is called with the number of examples finished since its last call."""
    prompts = []
    for i, example in enumerate(examples):
        for field in ("source", "reference", "prediction"):
            if not isinstance(example.get(field), str):
                raise JudgeError(f"example {i}: {field!r} must be a string (got {type(example.get(field)).__name__})")
        prompts.append(judge_prompt(example["source"], example["reference"], example["prediction"]))

    scores: list[float | None] = [None] * len(prompts)
    pending: dict[str, list[int]] = {}  # prompt -> the examples it grades
    cached = 0
    for i, prompt in enumerate(prompts):
        hit = cache.get(judge.id, prompt) if cache is not None else None
        if hit is not None:
            scores[i] = hit["score"]
            cached += 1
        else:
            pending.setdefault(prompt, []).append(i)
    if on_progress is not None and cached:
        on_progress(cached)

    todo = list(pending)
    chunk = getattr(judge, "batch_size", None) or max(len(todo), 1)
    for start in range(0, len(todo), chunk):
        batch = todo[start:start + chunk]
        replies = judge.complete(batch)
        if len(replies) != len(batch):
            raise JudgeError(f"judge {judge.id} returned {len(replies)} replies for {len(batch)} prompts")
        done = 0
        for prompt, reply in zip(batch, replies):
            score = parse_score(reply)
            if cache is not None:
                cache.put(judge.id, prompt, score, reply)
            for i in pending[prompt]:
                scores[i] = score
            done += len(pending[prompt])
        if on_progress is not None:
            on_progress(done)

    return JudgeResult(scores=scores, missing=sum(s is None for s in scores), cached=cached, calls=len(todo))
