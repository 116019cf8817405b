"""The `slmctl` command: the command table and its options, turned into config overrides and handed to
the runner (slmctl.runner), which composes the config, opens the run directory and maps how it ended
to an exit code.

    slmctl pretrain model=tiny trainer.max_steps=50      # key=value words are Hydra overrides
    slmctl generate runs/pretrain/latest prompt="..."    # or --file prompts.jsonl
    slmctl ls [GROUP] | slmctl validate STAGE [OVERRIDES] | slmctl runs [show RUN]
    slmctl recipe run recipes/quickstart.yaml

Errors a user can fix (bad override, missing file, bad checkpoint) print one line and exit 2;
--verbose shows the traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from slmctl.config.choices import FloatDtype
from slmctl.errors import first_line

try:  # Typer 0.26+ carries its own copy of Click
    from typer._click import exceptions as click_errors
except ImportError:
    from click import exceptions as click_errors


class OneLineErrors(TyperGroup):
    """Usage errors (a bad option value, an unknown option) as one line on stderr with exit 2,
    like every other error, instead of Click's usage block."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_errors.NoArgsIsHelpError as e:
            e.show()  # a bare command prints its help
            result = e.exit_code
        except click_errors.UsageError as e:
            hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
            err_console.print(f"[bold red]error:[/bold red] {e.format_message()}{hint}", highlight=False, soft_wrap=True)
            result = 2
        except typer.Abort:
            err_console.print("[bold red]error:[/bold red] aborted", highlight=False)
            result = 130
        if standalone_mode:
            sys.exit(result if isinstance(result, int) else 0)
        return result


app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None, cls=OneLineErrors,
                  help="Pretrain, distill, add vision to, evaluate, export and benchmark small encoder-decoder LMs.")
runs_app = typer.Typer(add_completion=False, help="List runs, or show one with its lineage.", invoke_without_command=True)
export_app = typer.Typer(add_completion=False, no_args_is_help=True,
                         help="Export a model for other runtimes (onnx) or for transformers (hf).")
recipe_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Multi-stage pipelines (recipes/*.yaml).")
app.add_typer(runs_app, name="runs")
app.add_typer(export_app, name="export")
app.add_typer(recipe_app, name="recipe")

console = Console()
err_console = Console(stderr=True)

RUNS_DIR = typer.Option(Path("runs"), "--runs-dir", help="Where run directories live.")
NAME = typer.Option(None, "--name", help="Run name (the directory is <runs-dir>/<stage>/<time>-<name>).")
DEVICE = typer.Option("cpu", "--device", help="cpu, cuda, mps or npu (sets trainer.accelerator for training).")
VERBOSE = typer.Option(False, "--verbose", "-v", help="Show tracebacks.")
DRY_RUN = typer.Option(False, "--dry-run", help="Print the resolved config and exit.")
EP = typer.Option(None, "--ep", help="ONNX Runtime execution provider for exports: cpu, cuda, tensorrt, openvino, qnn, dml, "
                  "vitisai, coreml or migraphx (default: --device's).")
ALLOW_FALLBACK = typer.Option(False, "--allow-fallback", help="--device npu: run even when nodes would fall back to the CPU.")
RUNTIME_HELP = "auto (ONNX Runtime for exports, torch for the rest), torch or onnx."
FLOAT_DTYPES = tuple(choice.value for choice in FloatDtype)  # the configs' dtype choices, declared once
DTYPE_HELP = "What PyTorch computes in: float32, or bfloat16 where the CPU has it (AVX512_BF16 or AMX; docs/speed.md)."


def provider_overrides(ep: Optional[str], allow_fallback: bool) -> list[str]:
    return [*([f"ep={ep}"] if ep else []), *(["allow_fallback=true"] if allow_fallback else [])]

def fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/bold red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def run_stage(stage: str, overrides: list[str], name: Optional[str], runs_dir: Path, device: str, verbose: bool,
              dry_run: bool, extra: dict | None = None) -> None:
    """Hand the stage to the runner; its one-line ending becomes this command's exit."""
    from slmctl.runner import StageEnded
    from slmctl.runner import run_stage as run

    try:
        run(stage, overrides, runs_dir=runs_dir, name=name, device=device, verbose=verbose, dry_run=dry_run, extra=extra)
    except StageEnded as e:
        fail(e.message, e.exit_code)


# -- stages ---------------------------------------------------------------------


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def prepare(overrides: Optional[list[str]] = typer.Argument(None, help="key=value config overrides"),
            name: Optional[str] = NAME, runs_dir: Path = RUNS_DIR, verbose: bool = VERBOSE,
            dry_run: bool = DRY_RUN) -> None:
    """Tokenise a corpus once into a sharded token store that training streams from
    (data=files data.train='corpus/*.jsonl.gz', or data=hub data.id=NAME; then data=prepared data.path=prepare/latest)."""
    run_stage("prepare", overrides or [], name, runs_dir, "cpu", verbose, dry_run)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def pretrain(overrides: Optional[list[str]] = typer.Argument(None, help="key=value config overrides"),
             name: Optional[str] = NAME, runs_dir: Path = RUNS_DIR, device: str = DEVICE,
             verbose: bool = VERBOSE, dry_run: bool = DRY_RUN) -> None:
    """Train a model from scratch (or fine-tune with init=RUN) on a text objective."""
    run_stage("pretrain", overrides or [], name, runs_dir, device, verbose, dry_run)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def distill(overrides: Optional[list[str]] = typer.Argument(None, help="key=value config overrides"),
            name: Optional[str] = NAME, runs_dir: Path = RUNS_DIR, device: str = DEVICE,
            verbose: bool = VERBOSE, dry_run: bool = DRY_RUN) -> None:
    """Distil a decoder-only teacher into an encoder-decoder student (teacher=llama student=330m)."""
    run_stage("distill", overrides or [], name, runs_dir, device, verbose, dry_run)


@app.command("add-vision", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def add_vision(arguments: Optional[list[str]] = typer.Argument(None, help="MODEL (an encoder-decoder run or model dir) "
                                                               "and key=value overrides (vision=..., data=...)"),
               name: Optional[str] = NAME, runs_dir: Path = RUNS_DIR, device: str = DEVICE,
               verbose: bool = VERBOSE, dry_run: bool = DRY_RUN) -> None:
    """Attach a vision tower (vision=vit-tiny|vit-small|clip-vit-l-336|siglip) to an encoder-decoder and train
    it on image-text data (data=shapes|images): stage 1 aligns the projector, stage 2 tunes the model."""
    arguments = arguments or []
    models = [a for a in arguments if "=" not in a]
    if len(models) > 1:
        fail(f"add-vision takes one text model, got {len(models)}: {' '.join(models)}")
    overrides = [a for a in arguments if "=" in a] + [f"source={model}" for model in models]
    run_stage("add-vision", overrides, name, runs_dir, device, verbose, dry_run)


@app.command("eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def evaluate(arguments: Optional[list[str]] = typer.Argument(None, help="MODEL... (model dirs or runs) and key=value overrides"),
             predictions: Optional[Path] = typer.Option(None, "--predictions", help="Score a jsonl of {id, prediction} instead."),
             draft: Optional[str] = typer.Option(None, "--draft", help="prompt, or a smaller draft model (same tokenizer): "
                                                 "drafted decoding, the same predictions; generation.draft=."),
             draft_tokens: Optional[int] = typer.Option(None, "--draft-tokens", help="Most tokens drafted per pass."),
             draft_ngram: Optional[int] = typer.Option(None, "--draft-ngram", help="--draft prompt: the longest n-gram "
                                                       "looked up (generation.draft_ngram=)."),
             runtime: Optional[str] = typer.Option(None, "--runtime", help=RUNTIME_HELP + " runtime=."),
             dtype: Optional[str] = typer.Option(None, "--dtype", help=DTYPE_HELP + " dtype=."),
             ep: Optional[str] = EP, allow_fallback: bool = ALLOW_FALLBACK,
             name: Optional[str] = NAME, runs_dir: Path = RUNS_DIR, device: str = DEVICE,
             verbose: bool = VERBOSE, dry_run: bool = DRY_RUN) -> None:
    """Evaluate models on a task (task=synthetic_qa|squad_v2|xsum|codexglue|ielts|jsonl); several models
    get a side-by-side table and a bar chart."""
    arguments = arguments or []
    overrides = [a for a in arguments if "=" in a] + provider_overrides(ep, allow_fallback)
    overrides += [*([f"generation.draft={draft}"] if draft else []),
                  *([f"generation.draft_tokens={draft_tokens}"] if draft_tokens is not None else []),
                  *([f"generation.draft_ngram={draft_ngram}"] if draft_ngram is not None else []),
                  *([f"runtime={runtime}"] if runtime else []), *([f"dtype={dtype}"] if dtype else [])]
    models = [a for a in arguments if "=" not in a]
    extra = ({"models": models} if models else {}) | ({"predictions": str(predictions)} if predictions else {})
    run_stage("eval", overrides, name, runs_dir, device, verbose, dry_run, extra=extra)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(arguments: Optional[list[str]] = typer.Argument(None, help="MODEL... (presets like 330m, model dirs, runs) and key=value"),
          compare: bool = typer.Option(False, "--compare", help="Compare the models: ratios against the last one, and a plot."),
          input_lens: str = typer.Option("512", "--input-lens", help="Comma-separated prompt lengths."),
          output_lens: str = typer.Option("64", "--output-lens", help="Comma-separated numbers of new tokens."),
          batch: Optional[str] = typer.Option(None, "--batch", help="Comma-separated batch sizes (default 1; --train: 16)."),
          train: Optional[str] = typer.Option(None, "--train", metavar="MODEL",
                                              help="Time training steps (forward+backward+AdamW) of MODEL instead; "
                                              "--compare adds transformers' T5 of matching dimensions."),
          source_len: Optional[int] = typer.Option(None, "--source-len", help="--train: encoder tokens per row "
                                                   "(decoder-only: the sequence length; default 256)."),
          target_len: Optional[int] = typer.Option(None, "--target-len", help="--train: decoder tokens per row (default 64)."),
          repeat: int = typer.Option(3, "--repeat", help="Timed runs per configuration."),
          warmup: int = typer.Option(1, "--warmup", help="Untimed runs first."),
          dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
          runtime: str = typer.Option("auto", "--runtime", help=RUNTIME_HELP),
          threads: Optional[int] = typer.Option(None, "--threads", help="torch / ONNX Runtime threads."),
          output_format: Optional[str] = typer.Option(None, "--format", help="json, csv or md records to stdout."),
          estimate: Optional[str] = typer.Option(None, "--estimate", help="Roofline prediction for a conf/hardware profile "
                                                 "(this-cpu, a100, h100, ...); with --repeat 0 nothing is run."),
          image_size: str = typer.Option("336x336", "--image-size", help="Vision models: the image each prompt carries (WxH)."),
          isolate: bool = typer.Option(False, "--isolate", help="Measure each model in its own child process (nothing shared)."),
          draft: str = typer.Option("none", "--draft", help="Comma-separated: none, prompt and/or draft models (a smaller "
                                    "model of the same vocabulary; drafted decoding, each a configuration: accepted "
                                    "drafts per pass and the cost of a pass)."),
          draft_tokens: int = typer.Option(10, "--draft-tokens", help="Most tokens drafted per pass."),
          draft_ngram: Optional[int] = typer.Option(None, "--draft-ngram", help="--draft prompt: the longest n-gram "
                                                    "looked up (draft_ngram=)."),
          ep: Optional[str] = EP, allow_fallback: bool = ALLOW_FALLBACK,
          name: Optional[str] = NAME, runs_dir: Path = RUNS_DIR, device: str = DEVICE, verbose: bool = VERBOSE,
          dry_run: bool = DRY_RUN) -> None:
    """Measure first-token latency, decode tokens/s and memory (slmctl bench --compare 330m deconly-330m);
    with --train MODEL, training tokens/s, MFU and memory (slmctl bench --train small --compare)."""
    arguments = arguments or []
    if any(a.startswith("resume=") for a in arguments):  # the run's saved config has the models and options
        run_stage("bench", arguments, name, runs_dir, device, verbose, dry_run)
        return
    models = [a for a in arguments if "=" not in a]
    training = []
    if train is not None:
        if models:
            fail(f"--train MODEL times one model; drop the other model argument(s): {' '.join(models)}")
        models = [train]
        training = ["train=true", *([f"source_len={source_len}"] if source_len is not None else []),
                    *([f"target_len={target_len}"] if target_len is not None else []), *(["t5=true"] if compare else [])]
    elif source_len is not None or target_len is not None:
        fail("--source-len and --target-len are for --train MODEL (generation takes --input-lens and --output-lens)")
    batch = batch or ("16" if train is not None else "1")
    if not models:
        fail("give model(s) to benchmark: presets (330m, deconly-330m, ...), model directories or runs")
    if compare and len(models) < 2 and train is None:
        fail("--compare needs two or more models, e.g. slmctl bench --compare 330m deconly-330m")
    if repeat < 0 or (repeat == 0 and not estimate):
        fail("--repeat must be >= 1 (or 0 with --estimate PROFILE for a prediction only)")
    for option, text in (("--input-lens", input_lens), ("--output-lens", output_lens), ("--batch", batch)):
        if not all(v.strip().isdigit() for v in text.split(",")):
            fail(f"{option} takes comma-separated integers, e.g. 256,512,1024; got {text!r}")
    drafts = [d.strip() for d in draft.split(",")]
    if not all(drafts) or any("'" in d for d in drafts) or draft_tokens < 1 or (draft_ngram is not None and draft_ngram < 1):
        fail(f"--draft takes none, prompt and/or draft models, comma-separated, and --draft-tokens and --draft-ngram "
             f"numbers >= 1; got {draft!r}, {draft_tokens}, {draft_ngram}")
    width, _, height = image_size.lower().partition("x")
    if not (width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
        fail(f"--image-size takes WIDTHxHEIGHT, e.g. 672x336; got {image_size!r}")
    overrides = [f"input_lens=[{input_lens}]", f"output_lens=[{output_lens}]", f"batch=[{batch}]", f"repeat={repeat}",
                 f"warmup={warmup}", f"dtype={dtype}", f"runtime={runtime}",
                 *([f"threads={threads}"] if threads else []), *([f"format={output_format}"] if output_format else []),
                 *([f"estimate={estimate}"] if estimate else []), f"image_size=[{width},{height}]",
                 *(["isolate=true"] if isolate else []), *provider_overrides(ep, allow_fallback), *training,
                 "draft=[" + ",".join(f"'{d}'" for d in drafts) + "]", f"draft_tokens={draft_tokens}",
                 *([f"draft_ngram={draft_ngram}"] if draft_ngram is not None else []),
                 *(a for a in arguments if "=" in a)]
    run_stage("bench", overrides, name, runs_dir, device, verbose, dry_run, extra={"models": models, "runtime": runtime})


@export_app.command("onnx", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def export_onnx(arguments: Optional[list[str]] = typer.Argument(None, help="[MODEL] (model dir, run or preset; default: the "
                                                                "newest distill/pretrain run) and key=value overrides"),
                static: bool = typer.Option(False, "--static", help="Fixed shapes + preallocated cache (NPU runtimes)."),
                quantize: Optional[list[str]] = typer.Option(None, "--quantize", help="int8, int4 and/or qdq (repeatable)."),
                dtype: Optional[str] = typer.Option(None, "--dtype", help="fp16: also an fp16 variant for GPU/NPU providers, "
                                                    "its overflow checked on calibration prompts."),
                fp16_policy: Optional[str] = typer.Option(None, "--fp16-policy", help="keep (default): nodes near fp16's "
                                                          "max stay fp32; fail: the export fails with the report."),
                optimize: Optional[str] = typer.Option(None, "--optimize", help="ort: also an ONNX Runtime-only variant "
                                                       "with fused contrib ops (EXPORT:ort)."),
                name: Optional[str] = NAME, runs_dir: Path = RUNS_DIR, device: str = DEVICE,
                verbose: bool = VERBOSE, dry_run: bool = DRY_RUN) -> None:
    """Export encoder.onnx + decoder.onnx (KV cache) with slmctl_onnx.json and the tokenizer; validate them
    against PyTorch (exit 1 if they differ); --quantize int8|int4|qdq adds quantized variants with a report."""
    arguments = arguments or []
    models = [a for a in arguments if "=" not in a]
    if len(models) > 1:
        fail(f"export takes one model, got {len(models)}: {' '.join(models)}")
    overrides = [a for a in arguments if "=" in a] + [f"source={model}" for model in models]
    if static:
        overrides.append("static.enabled=true")
    if quantize:
        overrides.append(f"quantize=[{','.join(quantize)}]")
    overrides += [*([f"dtype={dtype}"] if dtype else []), *([f"fp16.policy={fp16_policy}"] if fp16_policy else []),
                  *([f"optimize={optimize}"] if optimize else [])]
    run_stage("export", overrides, name, runs_dir, device, verbose, dry_run)


@export_app.command("hf", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def export_hf(arguments: Optional[list[str]] = typer.Argument(None, help="[MODEL] (model dir, run or preset; default: the "
                                                              "newest distill/pretrain run) and key=value overrides"),
              name: Optional[str] = NAME, runs_dir: Path = RUNS_DIR, verbose: bool = VERBOSE, dry_run: bool = DRY_RUN) -> None:
    """Export a transformers model directory (AutoModelForSeq2SeqLM / AutoModelForCausalLM with
    trust_remote_code=True, AutoTokenizer, safetensors, a README.md model card); loaded back and
    checked against slmctl (exit 1 if they differ)."""
    arguments = arguments or []
    models = [a for a in arguments if "=" not in a]
    if len(models) > 1:
        fail(f"export takes one model, got {len(models)}: {' '.join(models)}")
    overrides = ["to=hf", *(a for a in arguments if "=" in a), *(f"source={model}" for model in models)]
    run_stage("export", overrides, name, runs_dir, "cpu", verbose, dry_run)


@app.command()
def generate(model: str = typer.Argument(..., help="A model directory, a run, or runs/<stage>/latest."),
             prompts: Optional[list[str]] = typer.Argument(None, help='prompt="..." (repeatable), image=PATH for a vision model'),
             file: Optional[Path] = typer.Option(None, "--file", help="jsonl with a 'prompt' (or 'source') per line."),
             max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
             num_beams: int = typer.Option(1, "--num-beams"),
             temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
             top_p: float = typer.Option(1.0, "--top-p"),
             seed: int = typer.Option(0, "--seed"),
             runtime: str = typer.Option("auto", "--runtime", help=RUNTIME_HELP),
             dtype: str = typer.Option("float32", "--dtype", help=DTYPE_HELP),
             threads: Optional[int] = typer.Option(None, "--threads", help="ONNX Runtime threads."),
             image: Optional[list[Path]] = typer.Option(None, "--image", help="An image for a vision model (repeatable)."),
             draft: str = typer.Option("none", "--draft", help="prompt: draft tokens by n-gram lookup in the source; or "
                                       "a smaller model (directory or run) with the same tokenizer; drafts are checked "
                                       "several per decoder pass (the same output, faster when they are kept)."),
             draft_tokens: int = typer.Option(10, "--draft-tokens", help="Most tokens drafted per pass (adapts below it)."),
             draft_ngram: int = typer.Option(6, "--draft-ngram", help="--draft prompt: the longest n-gram looked up."),
             ep: Optional[str] = EP, allow_fallback: bool = ALLOW_FALLBACK,
             runs_dir: Path = RUNS_DIR, device: str = DEVICE, verbose: bool = VERBOSE) -> None:
    """Print (streaming) what a model generates for each prompt (a model dir, run, or ONNX export)."""
    from slmctl.runner import StageEnded, run_generate

    words = prompts or []
    image_paths = [Path(w.split("=", 1)[1]) for w in words if w.startswith("image=")] + list(image or [])
    texts = [p.split("=", 1)[1] if p.startswith("prompt=") else p for p in words if not p.startswith("image=")]
    if runtime not in ("auto", "torch", "onnx"):
        fail(f"--runtime must be auto, torch or onnx, got {runtime!r}")
    if dtype not in FLOAT_DTYPES:
        fail(f"--dtype must be {', '.join(FLOAT_DTYPES)}, got {dtype!r}")
    try:
        run_generate(model, texts, image_paths, file, runs_dir=runs_dir, device=device, runtime=runtime, dtype=dtype, threads=threads,
                     ep=ep, allow_fallback=allow_fallback, verbose=verbose, max_new_tokens=max_new_tokens,
                     num_beams=num_beams, temperature=temperature, top_p=top_p, seed=seed, draft=draft,
                     draft_tokens=draft_tokens, draft_ngram=draft_ngram)
    except StageEnded as e:
        fail(e.message, e.exit_code)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(arguments: Optional[list[str]] = typer.Argument(None, help="MODEL (a run, model dir, export[:variant] or vision "
                                                          "model) and key=value overrides (max_batch=, max_queue=, ...)"),
          runtime: str = typer.Option("auto", "--runtime", help=RUNTIME_HELP),
          dtype: str = typer.Option("float32", "--dtype", help=DTYPE_HELP),
          host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (loopback by default)."),
          port: int = typer.Option(8000, "--port", help="Port (0: any free one; the run's server.json says which)."),
          api_key_env: Optional[str] = typer.Option(None, "--api-key-env", metavar="NAME",
                                                    help="Require 'Authorization: Bearer <key>', the key read from $NAME."),
          log_prompts: bool = typer.Option(False, "--log-prompts", help="Record prompt text in the run's requests.jsonl."),
          image_root: Optional[Path] = typer.Option(None, "--image-root", help="Vision models: local image paths must lie here."),
          threads: Optional[int] = typer.Option(None, "--threads", help="torch / ONNX Runtime threads."),
          draft: Optional[str] = typer.Option(None, "--draft", help="prompt: each request's next tokens drafted from its "
                                              "prompt; or a smaller model with the same tokenizer; checked several per "
                                              "pass (the same tokens; draft_tokens=K, draft_ngram=N)."),
          ep: Optional[str] = EP, allow_fallback: bool = ALLOW_FALLBACK,
          name: Optional[str] = NAME, runs_dir: Path = RUNS_DIR, device: str = DEVICE, verbose: bool = VERBOSE,
          dry_run: bool = DRY_RUN) -> None:
    """Serve a model over OpenAI's API (/v1/completions, /v1/chat/completions, streaming), batching
    concurrent requests; /health and /metrics (Prometheus). SIGTERM or Ctrl-C stops it gracefully."""
    arguments = arguments or []
    models = [a for a in arguments if "=" not in a]
    if len(models) != 1:
        fail("give one model to serve: a run, a model directory or an export, e.g. slmctl serve runs/distill/latest")
    if runtime not in ("auto", "torch", "onnx"):
        fail(f"--runtime must be auto, torch or onnx, got {runtime!r}")
    overrides = [f"runtime={runtime}", f"dtype={dtype}", f"host={host}", f"port={port}",
                 *([f"api_key_env={api_key_env}"] if api_key_env else []),
                 *(["log_prompts=true"] if log_prompts else []), *([f"image_root={image_root}"] if image_root else []),
                 *([f"threads={threads}"] if threads else []), *([f"draft={draft}"] if draft else []),
                 *provider_overrides(ep, allow_fallback),
                 *(a for a in arguments if "=" in a)]
    run_stage("serve", overrides, name, runs_dir, device, verbose, dry_run, extra={"source": models[0], "runtime": runtime})


# -- configs and runs -------------------------------------------------------------


@app.command("ls")
def list_configs(group: Optional[str] = typer.Argument(None, help="A config group (model, data, ...).")) -> None:
    """List config groups and their options (or one group's options)."""
    from slmctl.config.registry import groups, stages

    available = groups()
    if group is not None:
        if group not in available:
            fail(f"unknown config group {group!r} (choose from: {', '.join(available)})")
        for option in available[group]:
            console.print(option, highlight=False)
        return
    table = Table(title="config groups (use GROUP=OPTION)")
    table.add_column("group")
    table.add_column("options")
    for name, options in available.items():
        table.add_row(name, ", ".join(options))
    console.print(table)
    console.print(f"stages: {', '.join(stages())}", highlight=False)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def validate(stage: str = typer.Argument(..., help="pretrain, ..."),
             overrides: Optional[list[str]] = typer.Argument(None, help="key=value config overrides"),
             show: bool = typer.Option(False, "--show", help="Also print the resolved config.")) -> None:
    """Check that a composition is valid (exit 2 with the reason if not)."""
    from slmctl.config.compose import compose, to_yaml
    from slmctl.errors import ConfigError

    try:
        cfg = compose(stage, overrides or [])
    except ConfigError as e:
        fail(str(e))
        return
    if show:
        console.print(to_yaml(cfg), highlight=False, end="")
    console.print(f"[green]ok[/green]: {stage} {' '.join(overrides or [])}".rstrip(), highlight=False)


@runs_app.callback()
def runs(ctx: typer.Context, stage: Optional[str] = typer.Option(None, "--stage", help="Only this stage."),
         runs_dir: Path = RUNS_DIR) -> None:
    """List runs: stage, name, status, age, key metric."""
    if ctx.invoked_subcommand is not None:
        return
    from slmctl.runs.listing import runs_table
    from slmctl.runs.lookup import list_runs

    found = list_runs(runs_dir, stage)
    console.print(runs_table(found, runs_dir) if found else f"no runs under {runs_dir}", highlight=False)


@runs_app.command("show")
def runs_show(run: str = typer.Argument(..., help="A run directory or runs/<stage>/latest."),
              runs_dir: Path = RUNS_DIR) -> None:
    """Show one run: status, summary, inputs (lineage) and artifacts."""
    from slmctl.runs.listing import describe_run
    from slmctl.runs.lookup import RunError, resolve_run

    try:
        path = resolve_run(run, runs_dir)
    except RunError as e:
        fail(str(e))
        return
    for line in describe_run(path):
        console.print(line, highlight=False)


# -- recipes -----------------------------------------------------------------------


@recipe_app.command("run")
def recipe_run(path: Path = typer.Argument(..., help="A recipe file, e.g. recipes/quickstart.yaml."),
               runs_dir: Path = RUNS_DIR, verbose: bool = VERBOSE) -> None:
    """Run a multi-stage pipeline; later steps consume earlier runs as ${runs.<step>}."""
    from slmctl.recipes import run_recipe
    from slmctl.runner import StageEnded, user_errors

    try:
        run_recipe(path, runs_dir, verbose=verbose)
    except StageEnded as e:
        fail(e.message, e.exit_code)
    except user_errors() as e:
        if verbose:
            raise
        fail(first_line(e))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
