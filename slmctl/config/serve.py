"""`slmctl serve`: the OpenAI-compatible server's settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from slmctl.config.choices import FloatDtype, Runtime


@dataclass
class ServeSchema:
    source: Optional[str] = None  # the model: a run, model directory, export[:variant] or vision model (the command line's MODEL)
    runtime: Runtime = Runtime.auto  # auto: ONNX Runtime for exports, torch for the rest
    device: str = "cpu"  # set by --device
    dtype: FloatDtype = FloatDtype.float32  # what PyTorch computes in (--dtype); exports keep their own
    ep: Optional[str] = None  # exports: ONNX Runtime execution provider (--ep)
    allow_fallback: bool = False
    threads: Optional[int] = None  # torch / ONNX Runtime threads (null: their default)
    host: str = "127.0.0.1"  # loopback by default; 0.0.0.0 to listen on every interface
    port: int = 8000  # 0: any free port (server.json in the run says which)
    model_name: Optional[str] = None  # the id clients send as "model" (null: the model's run or directory name)
    max_batch: int = 16  # sequences decoded together (continuous batching slots)
    max_queue: int = 64  # requests waiting for a slot before new ones get HTTP 429
    max_tokens_cap: int = 256  # the largest max_tokens a request may ask for
    max_prompt_tokens: Optional[int] = None  # the longest prompt accepted (null: the model's max_seq_len)
    api_key_env: Optional[str] = None  # the environment variable holding the API key (the key itself is never stored)
    log_prompts: bool = False  # requests.jsonl records prompt text too
    image_root: Optional[str] = None  # vision models: local image paths must lie under it (data: URLs always work)
    grace_s: float = 30.0  # on SIGTERM / Ctrl-C: how long in-flight requests may take to finish
    # prompt: each request's next tokens drafted from its prompt; or a smaller draft model (a run, model directory or
    # export with the same tokenizer, its own batch of the same slots); drafts are checked several per pass
    draft: str = "none"
    draft_tokens: int = 10  # most tokens drafted per pass (each request's K adapts below it)
    draft_ngram: int = 6  # prompt: the longest n-gram looked up (n down to 1)
    # limits on what one client may make the server do (HTTP 413 / 400 / 503 / 504 in OpenAI's error shape)
    max_request_bytes: Optional[int] = None  # request body (null: 1 MiB for a text model, 32 MiB with a vision tower)
    max_images: int = 8  # images per request
    max_image_pixels: int = 16_777_216  # width x height of one image, read from its header before it is decoded
    max_connections: int = 256  # open connections; more are answered 503 at once
    request_timeout_s: float = 600.0  # a request still generating after this long ends (HTTP 504, or an error event)
    metrics_public: bool = False  # with an API key: true lets /metrics answer without it
