"""`slmctl serve MODEL`: the serve stage. Loads the model, starts the engine thread and uvicorn,
and keeps the run directory:

    config.yaml, log.txt       as every stage
    server.json                where it listens (url, model name), written once bound
    requests.jsonl             one line per finished request (no prompt text unless log_prompts)
    metrics.json               the Prometheus metrics at exit

SIGTERM or Ctrl-C: stop accepting, let in-flight requests finish (at most `grace_s`), exit 0.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import os
import signal
import sys
import threading
import urllib.parse
from pathlib import Path

from slmctl.errors import ConfigError


def run(cfg, run):
    server = open_server(cfg, run)
    server.run()
    server.finish()


def open_server(cfg, run) -> "Server":
    """Load the model, start the engine thread and build the HTTP server (not yet listening)."""
    import torch
    import uvicorn

    from slmctl.runtime.generator import check_drafting, load_generator
    from slmctl.serve.draft_batch import DraftBatch
    from slmctl.serve.app import Served, create_app
    from slmctl.serve.engine import Engine
    from slmctl.serve.limits import TEXT_MODEL_BYTES, VISION_MODEL_BYTES, BodyLimit
    from slmctl.serve.metrics import ServerMetrics

    api_key = None
    if cfg.api_key_env:
        api_key = os.environ.get(cfg.api_key_env)
        if not api_key:
            raise ConfigError(f"api_key_env={cfg.api_key_env}: that environment variable is not set or empty")
    if not cfg.source:
        raise ConfigError("give the model to serve: slmctl serve MODEL (a run, a model directory or an export)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    generator = load_generator(cfg.source, runs_dir=run.runs_dir, device=cfg.device, runtime=cfg.runtime,
                               threads=cfg.threads, ep=cfg.ep, allow_fallback=cfg.allow_fallback, dtype=cfg.dtype)
    if generator.kind != "encdec":
        raise ConfigError(f"{cfg.source} is a decoder-only model; slmctl serve serves encoder-decoder models "
                          "(for decoder-only ones, llama.cpp's or vLLM's servers are the tools)")
    generator.ref.record_input(run, role="served model")
    runtime = "torch" if isinstance(generator.model, torch.nn.Module) else "onnx"
    drafter = open_drafter(cfg, generator, run.runs_dir)
    if drafter is not None:
        check_drafting(generator, num_beams=1)
        if isinstance(drafter, DraftBatch):
            run.log(f"draft model {cfg.draft}: {drafter.cache_mb:.1f} MB of self-attention cache per slot")
    decoder_length = generator.model.config.max_seq_len
    if cfg.max_tokens_cap + 1 > decoder_length:
        raise ConfigError(f"max_tokens_cap={cfg.max_tokens_cap} is past the {decoder_length} positions {cfg.source} was "
                          f"made for (its max_seq_len): at most max_tokens_cap={decoder_length - 1}")
    batch = open_batch(generator, cfg.max_batch, cfg.max_tokens_cap)
    metrics = ServerMetrics()
    tokenizer = generator.tokenizer
    engine = Engine(batch, tokenizer, eos_ids=[tokenizer.eos_id], bos_id=generator.model.config.bos_token_id,
                    max_queue=cfg.max_queue, metrics=metrics, drafter=drafter).start()
    defaults = generation_defaults(generator.path)
    name = cfg.model_name or generator.ref.label
    max_prompt = cfg.max_prompt_tokens or generator.model.config.max_seq_len
    served = Served(name=name, tokenizer=tokenizer, max_prompt_tokens=max_prompt, max_tokens_cap=cfg.max_tokens_cap,
                    default_max_tokens=min(defaults["max_new_tokens"], cfg.max_tokens_cap),
                    default_temperature=defaults["temperature"], default_top_p=defaults["top_p"],
                    encode=PromptEncoder(generator, cfg.image_root, cfg.max_image_pixels),
                    max_token_chars=max(map(len, tokenizer.vocab()), default=1), max_images=cfg.max_images)
    log_lock = threading.Lock()
    requests_log = run.path / "requests.jsonl"

    def log_request(entry: dict) -> None:
        with log_lock, open(requests_log, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    app = create_app(engine, served, metrics, api_key=api_key, log_request=log_request, log_prompts=cfg.log_prompts,
                     metrics_public=cfg.metrics_public, request_timeout_s=cfg.request_timeout_s)
    vision = hasattr(generator.model, "embed_inputs") or getattr(generator.model, "is_vision", False)
    max_bytes = cfg.max_request_bytes or (VISION_MODEL_BYTES if vision else TEXT_MODEL_BYTES)
    config = uvicorn.Config(BodyLimit(app, max_bytes, on_refusal=metrics.request), host=cfg.host, port=cfg.port,
                            log_level="warning", access_log=False, timeout_graceful_shutdown=cfg.grace_s, lifespan="off",
                            limit_concurrency=cfg.max_connections)
    if not api_key and not _loopback(cfg.host):
        warning = (f"warning: listening on {cfg.host} without an API key: anyone who reaches this address can use the "
                   "model (set api_key_env=VAR)")
        run.log(warning)
        print(warning, file=sys.stderr)
    run.log(f"serving {cfg.source} as {name!r} on {runtime} ({cfg.max_batch} slots, queue {cfg.max_queue}, "
            f"max_tokens cap {cfg.max_tokens_cap}, prompts up to {max_prompt} tokens"
            f"{f', drafts: {drafter.name} up to {cfg.draft_tokens} a pass' if drafter else ''})")
    try:
        listening = bind(cfg.host, cfg.port)
    except ConfigError:
        engine.stop(timeout=5)
        raise
    return Server(config, run, engine, metrics, name, cfg, listening)


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int):
    """The server's socket, bound here so that a port in use is a one-line error (uvicorn would log and exit)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e} (choose another --port, or --port 0 for "
                          "any free one)") from None
    return sock


def preflight(cfg, runs_dir) -> None:
    """Refused before the run exists: a drafter that is neither none, prompt nor a model slmctl can load."""
    from slmctl.model.drafting import DRAFTERS
    from slmctl.refs import parse

    if cfg.draft not in DRAFTERS:
        parse(cfg.draft, runs_dir).require(("model_dir", "export"), "--draft")


def open_drafter(cfg, generator, runs_dir):
    """None, prompt lookup, or a draft model with its own continuous batch of the served one's slots (room
    for the drafts past the served capacity); a draft model cannot read images."""
    from slmctl.model.drafting import DRAFTERS, make_drafter
    from slmctl.runtime.generator import check_draft_model, load_generator
    from slmctl.serve.draft_batch import DraftBatch

    if cfg.draft in DRAFTERS:
        return make_drafter(cfg.draft, cfg.draft_tokens, cfg.draft_ngram)
    if cfg.draft_tokens < 1:
        raise ConfigError(f"draft_tokens must be >= 1, got {cfg.draft_tokens}")
    if hasattr(generator.model, "embed_inputs") or getattr(generator.model, "is_vision", False):
        raise ConfigError(f"{cfg.source} reads images, which a draft model cannot: --draft prompt, or serve without drafts")
    draft = load_generator(cfg.draft, runs_dir=runs_dir, device=cfg.device, runtime=cfg.runtime, threads=cfg.threads,
                           ep=cfg.ep, allow_fallback=cfg.allow_fallback)
    check_draft_model(cfg.draft, draft, generator)
    return DraftBatch(open_batch(draft, cfg.max_batch, cfg.max_tokens_cap + cfg.draft_tokens), cfg.draft_tokens,
                      label=f"model {cfg.draft}", bos=draft.model.config.bos_token_id, eos=draft.model.config.eos_token_id)


def open_batch(generator, slots: int, max_tokens: int):
    """The continuous-batching state for the generator's runtime."""
    import torch

    from slmctl.serve.batching import TorchBatch

    model = generator.model
    if isinstance(model, torch.nn.Module):
        text = getattr(model, "text", model)  # a vision model decodes with its text model
        return TorchBatch(text, slots=slots, capacity=max_tokens + 1)
    from slmctl.serve.onnx_batching import OnnxBatch

    return OnnxBatch(model, slots=slots, capacity=max_tokens + 1)


def generation_defaults(path) -> dict:
    """Sampling defaults from the model's generation.json (greedy and 64 tokens without one)."""
    from slmctl.model.generation import GenerationConfig

    file = Path(path) / "generation.json"
    settings = GenerationConfig()
    if file.is_file():
        with contextlib.suppress(ValueError, TypeError):
            settings = GenerationConfig.from_kwargs(**{k: v for k, v in json.loads(file.read_text()).items()
                                                       if k in GenerationConfig.__dataclass_fields__})
    return {"max_new_tokens": settings.max_new_tokens, "temperature": settings.temperature if settings.do_sample else 0.0,
            "top_p": settings.top_p}


class PromptEncoder:
    """Prompt text (+ image URLs) -> (encoder token ids, None) or, with images, (None, embeds [S, d_model])."""

    def __init__(self, generator, image_root: str | None, max_pixels: int = 16_777_216):
        self.generator, self.image_root = generator, Path(image_root).resolve() if image_root else None
        self.max_pixels = max_pixels

    def __call__(self, prompt: str, images: list[str]):
        """(encoder token ids, embedded input, image features): ids alone for text; a torch vision model's
        embedded input [S, d_model]; or a vision export's expanded ids with the image tokens' features."""
        from slmctl.serve.app import APIError

        tokenizer = self.generator.tokenizer
        model = self.generator.model
        if not images:
            return tokenizer.encode(prompt), None, None
        vision_export = getattr(model, "is_vision", False)
        if not hasattr(model, "embed_inputs") and not vision_export:
            raise APIError(400, "this model has no vision tower: images need a model from `slmctl add-vision`",
                           param="messages", code="images_not_supported")
        import torch

        pictures = [self.load(url) for url in images]
        ids = torch.tensor([tokenizer.encode(prompt)], device=model.device)
        if vision_export:
            expanded, _, features = model.prepare_images(ids, None, [pictures])
            return expanded[0].tolist(), None, features
        with torch.inference_mode():
            embeds, _ = model.embed_inputs(ids, None, [pictures])
        return None, embeds[0], None

    def load(self, url: str):
        from PIL import Image, UnidentifiedImageError

        from slmctl.serve.app import APIError

        if url.startswith("data:"):
            header, _, data = url.partition(",")
            if ";base64" not in header:
                raise APIError(400, "image_url data: URLs must be base64 (data:image/png;base64,...)", param="image_url")
            try:
                raw = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise APIError(400, "image_url: the data: URL is not valid base64", param="image_url") from None
            source = io.BytesIO(raw)
        else:
            path = Path(urllib.parse.urlsplit(url).path if url.startswith("file://") else url)
            if self.image_root is None:
                raise APIError(400, "image_url: this server takes images as data: URLs (local paths need "
                                    "slmctl serve --image-root DIR)", param="image_url")
            resolved = path.resolve() if path.is_absolute() else (self.image_root / path).resolve()
            if not resolved.is_relative_to(self.image_root):
                raise APIError(400, f"image_url: {url} is outside the allowed image root", param="image_url")
            if not resolved.is_file():
                raise APIError(400, f"image_url: {url} does not exist", param="image_url")
            source = resolved
        try:
            with Image.open(source) as image:  # reads the header only: the size is known before any pixel is decoded
                if image.width * image.height > self.max_pixels:
                    raise APIError(400, f"image_url: a {image.width}x{image.height} image; this server takes at most "
                                        f"{self.max_pixels} pixels (max_image_pixels)", param="image_url", code="image_too_large")
                return image.convert("RGB")
        except Image.DecompressionBombError:  # so large that Pillow refuses its header itself
            raise APIError(400, f"image_url: an image past Pillow's own size limit; this server takes at most "
                                f"{self.max_pixels} pixels (max_image_pixels)", param="image_url", code="image_too_large") from None
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise APIError(400, f"image_url: not a readable image ({e})", param="image_url") from None


class Server:
    """uvicorn's Server around the engine, with SIGTERM/SIGINT as a graceful stop: no new requests
    (the engine drains), in-flight ones finish within `grace_s`, and the signal is not re-raised
    afterwards (uvicorn re-raises it once shut down, which would turn a clean stop into an
    interrupted run). Once bound it writes server.json (port 0 picks a free port)."""

    def __init__(self, config, run, engine, metrics, name: str, cfg, listening):
        import uvicorn

        outer = self
        self.run_dir, self.engine, self.metrics, self.name, self.cfg = run, engine, metrics, name, cfg
        self.listening = listening  # the bound socket
        self.url, self.stopped_by, self.bound = None, None, threading.Event()

        class _Uvicorn(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):
                if threading.current_thread() is not threading.main_thread():
                    yield
                    return

                def handle(sig, frame):
                    outer.stopped_by = signal.Signals(sig).name
                    outer.engine.drain()
                    self.handle_exit(sig, frame)

                previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
                try:
                    yield
                finally:
                    for sig, handler in previous.items():
                        signal.signal(sig, handler)

            async def startup(self, sockets=None):
                await super().startup(sockets)
                if self.started:
                    host, port = self.servers[0].sockets[0].getsockname()[:2]
                    outer._announce(f"http://{host}:{port}")

        self.server = _Uvicorn(config)

    def _announce(self, url: str) -> None:
        self.url = url
        self.run_dir.write_json("server.json", {"url": url, "api": f"{url}/v1", "model": self.name, "pid": os.getpid(),
                                                "max_batch": self.cfg.max_batch})
        self.run_dir.log(f"listening on {url}/v1 (model {self.name!r})")
        self.bound.set()
        from rich.console import Console

        Console().print(f"serving [bold]{self.name}[/bold] on {url}/v1  (Ctrl-C or SIGTERM to stop)", highlight=False)

    def run(self) -> None:
        """Serve until stopped (a signal, or `stop` from another thread)."""
        try:
            self.server.run(sockets=[self.listening])
        finally:
            self.engine.drain()
            self.engine.stop(timeout=self.cfg.grace_s)
            self.snapshot = self.metrics.snapshot()
            self.run_dir.write_json("metrics.json", self.snapshot)

    def stop(self) -> None:
        self.engine.drain()
        self.server.should_exit = True

    def finish(self) -> None:
        """Mark the run succeeded (or failed, when the model loop broke)."""
        if self.engine.failure is not None:
            raise RuntimeError(f"the model loop failed: {self.engine.failure}")
        requests = sum(v for k, v in self.snapshot.items() if k.startswith("slmctl_requests_total"))
        generated = self.snapshot.get("slmctl_generation_tokens_total", 0)
        self.run_dir.log(f"stopped after {int(requests)} requests, {int(generated)} generated tokens"
                         + (f" ({self.stopped_by})" if self.stopped_by else ""))
        self.run_dir.succeed({"requests": int(requests), "generated_tokens": int(generated), "url": self.url})


