"""Shared test helpers: deterministic CPU settings, randomised tiny models, a tiny Llama teacher on disk,
the slmctl command in-process, run lookups, tiny override lists and tiny training runs."""

import contextlib
import json
import os
import tempfile

# No test reads or writes the user's caches (judge scores, datasets, hub files): each test process gets its own,
# set before anything that reads it at import.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="slmctl-test-cache-")
# Two cores: one test process uses both; under `pytest -n 2` (make test) each of the two workers takes one. The
# slmctl processes a test starts inherit the same count, so a run killed in a child and finished in the test's own
# process computes what one process would (on some CPUs BLAS results change with the thread count).
os.environ["OMP_NUM_THREADS"] = "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2"
# Model directories run on PyTorch whatever the CPU, so a test means the same on an AMD CI machine (where `--runtime
# auto` would export them for ONNX Runtime); tests/runtime/test_routes.py sets the route itself.
os.environ["SLMCTL_RUNTIME"] = "torch"

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from typer.testing import CliRunner

from slmctl.cli import app
from slmctl.config.compose import compose
from slmctl.config.registry import stage_module
from slmctl.data.synthetic import SyntheticWorld
from slmctl.data.tokenizer import train_bpe
from slmctl.model import build_model
from slmctl.model.config import vocab_size_for
from slmctl.model.drafting import DraftStats

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parent.parent  # docs/ and recipes/ live here

# Override lists for tiny runs. A later key=value wins over an earlier one, so a test's list can be
# a shared one plus its changes; group choices (model=, objective=, tokenizer=) are given once.

# The synthetic reading task, tiny: a 200-person world, 200 training examples of one or two facts.
TINY_SYNTHETIC_DATA = ["data.n_people=200", "data.train_examples=200", "data.validation_examples=16", "data.min_facts=1",
                       "data.max_facts=2", "batch_size=8", "max_source_len=64", "max_target_len=8"]
# Three optimizer steps, one validation, no progress bar: a run that only has to finish.
TINY_TRAINING = ["trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.enable_progress_bar=false"]
# A tiny encoder-decoder trained for three steps, with its tokenizer: a model for eval, export, add-vision.
TINY_PRETRAIN = ["model=tiny", "objective=seq2seq", "tokenizer.vocab_size=400", *TINY_SYNTHETIC_DATA, *TINY_TRAINING]
# The default world, 400 examples: a loss that moves over tens of steps (learning, resuming, DDP); the test
# chooses the model, the steps and the checkpoints.
LEARNING_DATA = ["tokenizer.vocab_size=400", "data.train_examples=400", "data.validation_examples=32", "batch_size=8",
                 "max_source_len=48", "max_target_len=16", "trainer.enable_progress_bar=false"]
# The distillation tests' data: the tiny task with 160 examples, 12-token targets, every step logged.
DISTILL_DATA = [*TINY_SYNTHETIC_DATA, "data.train_examples=160", "data.validation_examples=24", "max_target_len=12",
                "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]


def cli(*args, runs=None):
    """`slmctl ARGS...` in this process (every argument str()'d, `--runs-dir RUNS` appended when
    `runs` is given) -> click's Result: exit_code, output, and stdout and stderr apart."""
    argv = [str(a) for a in args]
    if runs is not None:
        argv += ["--runs-dir", str(runs)]
    return CliRunner().invoke(app, argv)


def stage_runs(runs, stage, name=None) -> list[Path]:
    """The run directories of `stage` under `runs` (not `latest`), oldest first; only the runs
    called `name` when it is given."""
    stage_dir = Path(runs) / stage
    if not stage_dir.is_dir():
        return []
    return sorted(p for p in stage_dir.iterdir() if p.is_dir() and p.name != "latest" and not p.name.startswith(".")
                  and (name is None or p.name.endswith(f"-{name}")))


def newest_run(runs, stage, name=None) -> Path:
    """The newest run directory of `stage` under `runs` (of the runs called `name`, when given)."""
    found = stage_runs(runs, stage, name)
    assert found, f"no {stage} run{f' called {name}' if name else ''} under {runs}"
    return found[-1]


def train_run(runs, stage, overrides, name=None, callbacks=None):
    """A training stage (pretrain, distill, add-vision) run in this process: compose `overrides`,
    create the run under `runs` (called `name`, else after the stage) and run it -> the Run."""
    from slmctl.runs.run import Run

    cfg = compose(stage, list(overrides))
    run = Run.create(runs, stage, name or stage, cfg, argv=["test"])
    stage_module(stage).run(cfg, run, callbacks=callbacks)
    return run


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 3.0, embed_std: float = 0.5) -> torch.nn.Module:
    """Replace every weight with clearly non-trivial random values.

    The training init (std 0.02) makes a tiny untrained model echo its input token, which
    would let a generation test pass for the wrong reason; these weights give diverse,
    well-separated logits instead.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        model.embed.weight.copy_(embed_std * torch.randn(model.embed.weight.shape, generator=g))
    return model


@pytest.fixture
def encdec():
    return randomize(build_model("tiny", seed=0), seed=1).eval()


@pytest.fixture
def deconly():
    return randomize(build_model("deconly-tiny", seed=0), seed=2).eval()


def random_prompts(lengths, vocab=512, low=3, seed=0, side="right", pad_id=0):
    """A padded batch of random prompts with the given real lengths -> (ids, mask, rows)."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(low, vocab, (n,), generator=g) for n in lengths]
    width = max(lengths)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        sl = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[i, sl] = row
        mask[i, sl] = 1
    return ids, mask, rows


class Scripted:  # a drafter for the drafted-decoding tests (tests/model, tests/export)
    """A drafter that proposes each row's `script` from the current position on (its next `limit`
    tokens), with every `wrong`-th drafted token replaced by a token the model does not choose."""

    name = "scripted"

    def __init__(self, script: torch.Tensor, wrong: int = 0, ignore_limit: bool = False):
        self.script, self.wrong, self.ignore_limit = script, wrong, ignore_limit
        self.stats, self.kept = DraftStats(), []  # kept: drafted tokens accepted, per pass, over every generation

    def start(self, input_ids, attention_mask, max_new_tokens=64):
        self.stats = DraftStats()

    def propose(self, generated, finished, limit):
        at = generated.shape[1]
        k = len(self.script[0]) if self.ignore_limit else min(limit, self.script.shape[1] - at)
        drafts = self.script[:, at:at + k].clone()
        if self.wrong:
            drafts[:, self.wrong - 1::self.wrong] = (drafts[:, self.wrong - 1::self.wrong] + 1) % 50 + 3
        return drafts

    def update(self, drafted, accepted):
        self.stats.passes += 1
        self.stats.drafted += drafted
        self.stats.accepted += accepted
        self.kept.append(accepted)


def max_logit_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the logits' scale (fp32 rounding grows with it: the
    randomised models give logits of ~15, the training init of ~1)."""
    return ((a - b).abs().max() / max(1.0, b.abs().max().item())).item()


def scene_pixels(images, size: int = 32) -> torch.Tensor:
    """[N, 3, size, size] in [0, 1]: PIL scenes as a tiny tower's input (tower pretraining tests)."""
    import numpy as np

    return torch.stack([torch.from_numpy(np.asarray(image.convert("RGB").resize((size, size)), dtype=np.float32))
                        .permute(2, 0, 1) / 255 for image in images])


def fit(module: torch.nn.Module, *inputs, steps: int = 150, lr: float = 3e-3) -> tuple[float, float]:
    """Train `module(*inputs)` (a loss) on one batch with AdamW: (first loss, last loss)."""
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr)
    first = module(*inputs).item()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = module(*inputs)
        loss.backward()
        optimizer.step()
    return first, loss.item()


class Crash(Callback):
    """Dies after `step` optimizer steps of the `fit`-th fit it is passed to (a stage that trains
    two models, or in two stages, fits more than once), like a killed process (no cleanup)."""

    def __init__(self, step, fit=1):
        self.step, self.fit, self.fits = step, fit, 0

    def on_train_start(self, trainer, *args):
        self.fits += 1

    def on_train_batch_end(self, trainer, *args):
        if self.fits == self.fit and trainer.global_step == self.step:
            raise SystemExit("simulated kill")


class CountSteps(Callback):
    """Counts the optimizer steps this process runs, over every fit it is passed to."""

    def __init__(self):
        self.steps = 0

    def on_train_batch_end(self, trainer, *args):
        self.steps += 1


class InitialWeights(Callback):
    """The trained model's weights as each fit (a stage may fit more than one model) starts."""

    def __init__(self):
        self.fits = []

    def on_train_start(self, trainer, pl_module):
        self.fits.append({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})


def resumed_from(run_path) -> list[str]:
    """The "resumed from step N (checkpoint PATH)..." lines of a run's log."""
    return [line.split(" ", 1)[1] for line in (run_path / "log.txt").read_text().splitlines() if "resumed from step" in line]


def save_llama(directory, tokenizer, seed=0, hidden=64):
    """A tiny random LlamaForCausalLM and its tokenizer, as `save_pretrained` leaves them."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size_for(len(tokenizer)), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # peaked, input-dependent distributions (the training init is nearly uniform)
        model.model.embed_tokens.weight.normal_(0, 1.0)
    model.save_pretrained(directory)
    backend = Tokenizer.from_str(tokenizer.backend.to_str())
    backend.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tokenizer.bos_id)])  # as Llama's
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def world_texts():
    return SyntheticWorld(seed=0, n_people=200).texts("train", 300)


def save_tiny_encdec(directory, texts, seed: int = 1) -> Path:
    """A randomised tiny encoder-decoder with a BPE tokenizer trained on `texts`, saved as a model
    directory: varied, deterministic text from a model that took no training to make."""
    from slmctl.model.store import save_model

    tokenizer = train_bpe(texts, vocab_size=400)
    model = build_model("tiny", seed=0, vocab_size=vocab_size_for(len(tokenizer)), **tokenizer.special_ids)
    model = randomize(model, seed=seed).eval()
    return save_model(model, directory, tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, world_texts) -> Path:
    """`save_tiny_encdec` once per session."""
    return save_tiny_encdec(tmp_path_factory.mktemp("tiny-model") / "model", world_texts)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, world_texts):
    return save_llama(tmp_path_factory.mktemp("llama"), train_bpe(world_texts, vocab_size=400))


class ChatServer:
    """A chat-completions server on 127.0.0.1 that records requests and answers from a script of statuses."""

    def __init__(self, statuses=(), content="Reasoning...\nScore: 0.6"):
        self.requests: list[dict] = []
        self.statuses = list(statuses)  # served first, one per request; then 200s
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "json": body, "authorization": self.headers.get("Authorization")})
                status = server.statuses.pop(0) if server.statuses else 200
                reply = {"choices": [{"message": {"role": "assistant", "content": content}}]} if status == 200 \
                    else {"error": {"message": f"status {status}\nsecond line"}}
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@contextlib.contextmanager
def running_server(runs, model, *overrides, slow_steps: float = 0.0):
    """A server in a thread of this process (port 0) -> the Server; stopped and its run finished after.
    `slow_steps`: seconds added to every decoding step (to keep requests in flight)."""
    from slmctl.runs.run import Run
    from slmctl.serve.stage import open_server

    cfg = compose("serve", [f"source={model}", "port=0", *overrides])
    run = Run.create(runs, "serve", "serve", cfg, argv=["test"])
    server = open_server(cfg, run)
    if slow_steps:
        step = server.engine.batch.step
        server.engine.batch.step = lambda tokens: (time.sleep(slow_steps), step(tokens))[1]
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert server.bound.wait(60), "the server did not start"
    try:
        yield server
    finally:
        server.stop()
        thread.join(60)
        server.finish()


def wait_for_steps(runs, stage: str, steps: int, process=None, timeout: float = 120) -> None:
    """Wait until the run of `stage` under `runs` has logged `steps` training steps (or `process`
    ended, or `timeout` seconds passed): the moment a test sends a signal to a training process."""
    deadline = time.time() + timeout
    while time.time() < deadline and (process is None or process.poll() is None):
        metrics = list(Path(runs).glob(f"{stage}/*/metrics.jsonl"))
        if metrics and metrics[0].read_text().count("train_loss") >= steps:
            return
        time.sleep(0.2)


def write_corpus(directory, texts, files: int = 1, suffix: str = ".jsonl", extra_lines=()) -> str:
    """Write `texts` as {"text": ...} rows over `files` files called part-N`suffix` (.jsonl, .jsonl.gz,
    .jsonl.zst, .txt) in `directory`, with `extra_lines` (raw, e.g. bad rows) appended to the first file;
    returns the glob that names them all."""
    import gzip

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    per_file = -(-len(texts) // files)
    for n in range(files):
        chunk = texts[n * per_file:(n + 1) * per_file]
        lines = [t if suffix.startswith(".txt") else json.dumps({"text": t}) for t in chunk]
        if n == 0:
            lines += list(extra_lines)
        data = ("\n".join(lines) + "\n").encode()
        path = directory / f"part-{n}{suffix}"
        if suffix.endswith(".gz"):
            data = gzip.compress(data)
        elif suffix.endswith(".zst"):
            import pyarrow as pa

            data = pa.compress(data, codec="zstd", asbytes=True)
        path.write_bytes(data)
    return str(directory / f"part-*{suffix}")
