"""OpenAI's request and response shapes for /v1/completions and /v1/chat/completions.

Requests are validated strictly (pydantic, unknown fields refused) so that a typo is a 400
naming the field rather than a setting silently ignored. Fields of OpenAI's API that a small
encoder-decoder cannot honour are accepted only at their neutral value (`n`=1,
`presence_penalty`=0, no `logprobs`, no tools), so clients that always send them still work.

Chat messages become the encoder's prompt through `render_chat`: the tokenizer's own chat
template when it has one, otherwise the default documented in docs/serve.md.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


API_VERSION = "1"  # of this server's HTTP API (its OpenAPI schema's version)


class Strict(BaseModel):
    """Unknown fields refused, and no coercion: "5" or true is not an integer, 1 is not a boolean (OpenAI's rules)."""

    model_config = ConfigDict(extra="forbid", strict=True)


# the range of a sampling generator's seed (torch.Generator.manual_seed): outside it, a 400 naming `seed`
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)


def valid_text(text: str, field: str) -> str:
    """`text` if it is valid Unicode (JSON admits lone surrogates, "\\ud800", which no tokenizer encodes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{field} is not valid Unicode text (it holds a lone surrogate)") from None
    return text


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    """What both endpoints share. `temperature`/`top_p` left out: the model's generation.json."""

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    stop: Optional[Union[str, list[str]]] = None
    n: int = 1
    seed: Optional[int] = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Optional[Union[bool, int]] = None
    logit_bias: Optional[dict] = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says (benchmarks)

    @field_validator("n")
    @classmethod
    def _one(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return [valid_text(s, "stop") for s in stops]

    @field_validator("presence_penalty", "frequency_penalty", "logprobs", "logit_bias")
    @classmethod
    def _neutral(cls, value, info):
        if value:
            raise ValueError(f"{info.field_name} is not supported by slmctl serve (leave it at its default)")
        return value

    @property
    def stops(self) -> tuple[str, ...]:
        return tuple(self.stop or ())


class CompletionRequest(Sampling):
    prompt: Union[str, list[str]]
    echo: bool = False
    suffix: Optional[str] = None
    best_of: int = 1

    @field_validator("prompt")
    @classmethod
    def _single(cls, prompt):
        if isinstance(prompt, list):
            if len(prompt) != 1 or not isinstance(prompt[0], str):
                raise ValueError("prompt takes one string (or a list of exactly one)")
            prompt = prompt[0]
        if not prompt:
            raise ValueError("prompt is empty: an encoder-decoder answers a source text, give one")
        return valid_text(prompt, "prompt")

    @field_validator("echo", "suffix", "best_of")
    @classmethod
    def _plain(cls, value, info):
        if value and not (info.field_name == "best_of" and value == 1):
            raise ValueError(f"{info.field_name} is not supported by slmctl serve (leave it at its default)")
        return value


class ImageURL(Strict):
    url: str
    detail: Optional[Literal["auto", "low", "high"]] = None


class ContentPart(Strict):
    type: Literal["text", "image_url"]
    text: Optional[str] = None
    image_url: Optional[ImageURL] = None

    @model_validator(mode="after")
    def _filled(self):
        if (self.type == "text") != (self.text is not None) or (self.type == "image_url") != (self.image_url is not None):
            raise ValueError(f"a {self.type} part needs exactly its '{self.type}' field")
        return self


class Message(Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[ContentPart]]
    name: Optional[str] = None

    @field_validator("content")
    @classmethod
    def _text(cls, content):
        for text in [content] if isinstance(content, str) else [p.text or "" for p in content]:
            valid_text(text, "content")
        return content


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)

    @property
    def limit(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens


# -- chat template -------------------------------------------------------------------------------

IMAGE_PLACEHOLDER = "<image>"
ROLE_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}


def message_text(message: Message) -> tuple[str, list[str]]:
    """(text with an <image> placeholder where each image part was, the image URLs in order)."""
    if isinstance(message.content, str):
        return message.content, []
    pieces, images = [], []
    for part in message.content:
        if part.type == "text":
            pieces.append(part.text)
        else:
            pieces.append(IMAGE_PLACEHOLDER)
            images.append(part.image_url.url)
    return "\n".join(pieces), images


def render_chat(messages: list[Message], tokenizer) -> tuple[str, list[str]]:
    """(encoder prompt, image URLs). The tokenizer's chat template when it has one; otherwise one
    user message is its text as it is (what our models are trained on), and a longer
    conversation is "Role: text" lines, ending with "Assistant:"."""
    texts, images = [], []
    for message in messages:
        text, urls = message_text(message)
        texts.append((message.role, text))
        images += urls
    backend = getattr(tokenizer, "backend", None)
    if getattr(backend, "chat_template", None):
        rendered = backend.apply_chat_template([{"role": r, "content": t} for r, t in texts], tokenize=False,
                                               add_generation_prompt=True)
        return rendered, images
    if len(texts) == 1 and texts[0][0] == "user":
        return texts[0][1], images
    return "\n".join(f"{ROLE_NAMES[r]}: {t}" for r, t in texts) + "\nAssistant:", images


# -- responses -----------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str  # invalid_request_error, authentication_error, rate_limit_error, server_error
    param: Optional[str] = None  # the request field at fault, where one is
    code: Optional[str] = None  # e.g. context_length_exceeded, request_too_large, queue_full


class ErrorResponse(BaseModel):
    """Every error the server answers, whatever its status: OpenAI's shape."""

    error: ErrorDetail


# the statuses a generation route answers besides 200, as its OpenAPI schema lists them
ERROR_STATUSES = {400: "a request the server refuses: bad JSON, a field's type or value, a prompt too long",
                  401: "a missing or wrong API key", 404: "a model this server does not serve",
                  413: "a body larger than max_request_bytes", 415: "a body that is not JSON",
                  429: "every slot busy and the queue full: retry later", 500: "generation failed for this request",
                  503: "the server is shutting down or holds too many connections",
                  504: "the request ran past request_timeout_s"}


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, text: str | None, finish: str | None, chat: bool, created: int,
                    delta: bool = False, first: bool = False) -> dict:
    """A completion (delta=False) or one streamed chunk of it (delta=True)."""
    if chat:
        if delta:
            content = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": content, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                      "logprobs": None}
        kind = "chat.completion.chunk" if delta else "chat.completion"
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        kind = "text_completion"
    return {"id": rid, "object": kind, "created": created, "model": model, "choices": [choice]}


def now() -> int:
    return int(time.time())
