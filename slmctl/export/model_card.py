"""The README.md model card of a transformers export, written from what the run directories hold.

Nothing is typed in by hand: the architecture comes from the model's config, the tokenizer from
its files, the training stages from the lineage (the model's run, the runs it read, and theirs),
and the evaluation from every succeeded `slmctl eval` run that read this model, each number with
its bootstrap interval. What is not known (no eval yet) is said, not invented.
"""

from __future__ import annotations

import json
from pathlib import Path

from slmctl import __version__
from slmctl.model.config import count_parameters
from slmctl.runs.lookup import model_label, owning_run, read_status, run_directories
from slmctl.runs.run import Run

ARCH_NAMES = {"encdec": "encoder-decoder", "deconly": "decoder-only"}


def write_model_card(out: Path, model, source: Path | None, tokenizer, run, vision_note: str | None) -> None:
    card = model_card(model.config, source, tokenizer, run.runs_dir, vision_note, exported_by=run.path)
    run.write_text(f"{out.relative_to(run.path)}/README.md", card)


def model_card(c, source: Path | None, tokenizer, runs_dir: Path, vision_note: str | None, exported_by: Path) -> str:
    name = model_label(source) if source is not None else f"{c.name} (random weights)"
    model_run = owning_run(source) if source is not None else None
    chain = lineage(model_run) if model_run is not None else []
    evals = eval_results(source, runs_dir) if source is not None else []
    sections = [
        front_matter(c, chain),
        f"# {name}\n\n{summary(c)} Trained and exported with slmctl {__version__} "
        f"(`slmctl export hf`, run `{exported_by.name}`)." + (f"\n\n{vision_note[0].upper()}{vision_note[1:]}." if vision_note else ""),
        usage(c),
        architecture(c),
        tokenizer_section(tokenizer, c),
        training(chain),
        evaluation(evals),
        limits(c, chain),
    ]
    return "\n\n".join(section.strip() for section in sections if section) + "\n"


# ---- lineage ------------------------------------------------------------------------------


def lineage(run_dir: Path) -> list[dict]:
    """The runs that made the model, oldest first: its run, then every run it read (recursively)."""
    seen, order = set(), []

    def visit(path: Path) -> None:
        if path in seen or not (path / "status.json").is_file():
            return
        seen.add(path)
        opened = Run.open(path)
        inputs = opened.inputs()
        for entry in inputs:
            if entry.get("kind") == "run" and entry.get("path"):
                parent = owning_run(Path(entry["path"]))
                if parent is not None:
                    visit(parent)
        order.append({"path": path, "status": read_status(path) or {}, "config": opened.config(), "inputs": inputs})

    visit(run_dir)
    return order


def eval_results(source: Path, runs_dir: Path) -> list[dict]:
    """Every metric of every succeeded eval run that read `source`: {task, metric, value, low, high, n, run}."""
    source = source.resolve()
    label = model_label(source)
    found = []
    for eval_run in run_directories(Path(runs_dir) / "eval"):
        status = read_status(eval_run) or {}
        metrics_file = eval_run / "metrics.json"
        if status.get("status") != "succeeded" or not metrics_file.is_file():
            continue
        inputs = json.loads((eval_run / "inputs.json").read_text(encoding="utf-8")) if (eval_run / "inputs.json").is_file() else []
        if not any(entry.get("path") and Path(entry["path"]).resolve() == source for entry in inputs):
            continue
        tasks = json.loads(metrics_file.read_text(encoding="utf-8")).get("tasks", {})
        for task, report in tasks.items():
            for metric, score in report.get("models", {}).get(label, {}).items():
                if isinstance(score, dict) and "value" in score:
                    found.append({"task": task, "metric": metric, "value": score["value"], "low": score.get("low"),
                                  "high": score.get("high"), "n": score.get("n", report.get("n")), "run": eval_run.name})
    return found


# ---- sections -----------------------------------------------------------------------------


def front_matter(c, chain: list[dict]) -> str:
    tags = ["slmctl", ARCH_NAMES[c.arch], "custom_code"]
    pipeline = "text2text-generation" if c.is_encoder_decoder else "text-generation"
    lines = ["---", "library_name: transformers", f"pipeline_tag: {pipeline}", "tags:", *(f"- {t}" for t in tags), "---"]
    return "\n".join(lines)


def summary(c) -> str:
    if c.is_encoder_decoder:
        return (f"A {count_parameters(c) / 1e6:.1f}M-parameter encoder-decoder language model "
                f"({c.n_encoder_layers} encoder / {c.n_decoder_layers} decoder layers), the architecture of "
                f"\"Return of the Encoder: Maximizing Parameter Efficiency for SLMs\".")
    return (f"A {count_parameters(c) / 1e6:.1f}M-parameter decoder-only language model ({c.n_decoder_layers} layers): "
            f"the matched baseline of the encoder-decoder in \"Return of the Encoder\".")


def usage(c) -> str:
    if c.is_encoder_decoder:
        code = """from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, pipeline

tokenizer = AutoTokenizer.from_pretrained("PATH", trust_remote_code=True)
model = AutoModelForSeq2SeqLM.from_pretrained("PATH", trust_remote_code=True)
inputs = tokenizer(["your input text"], return_tensors="pt", padding=True)
print(tokenizer.batch_decode(model.generate(**inputs, max_new_tokens=32), skip_special_tokens=True))

generator = pipeline("text2text-generation", model="PATH", trust_remote_code=True)"""
    else:
        code = """from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("PATH", trust_remote_code=True)  # adds BOS, pads on the left
model = AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)
inputs = tokenizer(["your prompt"], return_tensors="pt", padding=True)
new = model.generate(**inputs, max_new_tokens=32)[:, inputs["input_ids"].shape[1]:]
print(tokenizer.batch_decode(new, skip_special_tokens=True))"""
    return (f"## Use\n\nThe model code is `modeling_slmctl.py` in this directory (torch and transformers only), "
            f"hence `trust_remote_code=True` (the tokenizer too: transformers reads the model's config to load it). "
            f"PATH is this directory.\n\n```python\n{code}\n```\n\n"
            f"slmctl reads the directory back as it is: `slmctl generate PATH prompt=\"...\"`, `slmctl eval PATH`, "
            f"`slmctl export onnx PATH`.")


def architecture(c) -> str:
    rows = [("architecture", ARCH_NAMES[c.arch]), ("parameters", f"{count_parameters(c):,} (embedding tied to the LM head)")]
    if c.is_encoder_decoder:
        rows.append(("layers", f"{c.n_encoder_layers} encoder, {c.n_decoder_layers} decoder (with cross-attention)"))
    else:
        rows.append(("layers", f"{c.n_decoder_layers} causal"))
    rows += [("width", f"d_model {c.d_model}, MLP {c.d_ff} (tanh-GELU), RMSNorm (eps {c.norm_eps:g}), pre-norm"),
             ("attention", f"{c.n_heads} query / {c.n_kv_heads} key-value heads of {c.head_dim} (grouped-query)"),
             ("positions", f"RoPE (theta {c.rope_theta:g}" + (f", NTK factor {c.rope_factor:g}" if c.rope_factor > 1 else "")
              + f"), trained to {c.max_seq_len} tokens" + ("; encoder positions centred" if c.is_encoder_decoder else "")),
             ("vocabulary", f"{c.vocab_size} rows; pad {c.pad_token_id}, bos {c.bos_token_id}"
              + (" (decoder start)" if c.is_encoder_decoder else "") + f", eos {c.eos_token_id}")]
    return "## Architecture\n\n" + table(("", ""), rows)


def tokenizer_section(tokenizer, c) -> str:
    if tokenizer is None:
        return "## Tokenizer\n\nNone was saved with the model: bring the tokenizer it was trained with."
    kind = "a byte-level BPE trained by slmctl" if tokenizer.kind == "bpe" else "a Hugging Face tokenizer (the teacher's)"
    special = ", ".join(f"{role} `{token}`" for role, token in tokenizer.special_tokens.items())
    feeds = ("the input text's tokens, no special tokens (the decoder starts from bos)" if c.is_encoder_decoder
             else "bos, then the prompt's tokens")
    return (f"## Tokenizer\n\n{kind[0].upper()}{kind[1:]}, {len(tokenizer)} tokens; {special}. "
            f"`tokenizer(text)` gives what the model was trained to read: {feeds}.")


def training(chain: list[dict]) -> str:
    if not chain:
        return "## Training\n\nNo training run: these are a preset's random weights."
    rows = []
    for entry in chain:
        status, config = entry["status"], entry["config"]
        stage = status.get("stage", entry["path"].parent.name)
        rows.append((f"`{entry['path'].name}`", stage, describe_data(config, stage),
                     describe_schedule(config, stage), describe_result(status)))
    return ("## Training\n\nThe runs that made these weights, oldest first (from each run's inputs.json):\n\n"
            + table(("run", "stage", "data", "training", "result"), rows))


def describe_data(config: dict, stage: str) -> str:
    data = config.get("data") or {}
    kind = data.get("kind")
    if stage == "prepare":
        return f"{kind}: {', '.join(map(str, data.get('paths') or [data.get('name')]))}"
    if kind == "synthetic":
        return f"slmctl's synthetic reading task ({data.get('train_examples')} training examples)"
    if kind == "files":
        return "files: " + ", ".join(map(str, data.get("paths") or []))
    if kind == "hub":
        return f"hub dataset {data.get('name')}"
    if kind == "prepared":
        return f"prepared corpus {data.get('path')}"
    if kind in ("shapes", "images"):
        return f"{kind} (image-question pairs)"
    return str(kind) if kind else "-"


def describe_schedule(config: dict, stage: str) -> str:
    parts = []
    steps = (config.get("trainer") or {}).get("max_steps")
    if steps:
        parts.append(f"{steps} steps, batch {config.get('batch_size')}")
    if stage == "pretrain":
        model = config.get("model") or {}
        objective = (config.get("objective") or {}).get("name")
        what = f"from {config['init']}" if config.get("init") else " ".join(
            str(v) for v in (model.get("preset"), model.get("arch")) if v)
        parts.append(what + (f", objective {objective}" if objective else ""))
    if stage == "distill":
        kd = config.get("kd") or {}
        teacher = config.get("teacher") or {}
        parts.append(f"teacher {teacher.get('path')}, {kd.get('loss')} (alpha {kd.get('alpha')})")
    peft = config.get("peft") or {}
    if peft.get("kind") == "lora":
        parts.append(f"LoRA r {peft.get('r')} alpha {peft.get('alpha')} on {', '.join(peft.get('targets') or [])}")
    return "; ".join(parts) or "-"


def describe_result(status: dict) -> str:
    summary = status.get("summary") or {}
    shown = [f"{key} {summary[key]:.4g}" if isinstance(summary[key], float) else f"{key} {summary[key]}"
             for key in ("val_loss", "control_val_loss", "documents", "tokens") if summary.get(key) is not None]
    return ", ".join(shown) or status.get("status", "-")


def evaluation(evals: list[dict]) -> str:
    if not evals:
        return ("## Evaluation\n\nNo `slmctl eval` run of this model was found when it was exported. "
                "`slmctl eval MODEL task=...` measures it, with bootstrap confidence intervals.")
    rows = []
    for e in evals:
        interval = f"[{e['low']:.3f}, {e['high']:.3f}]" if e["low"] is not None and e["high"] is not None else "-"
        value = f"{e['value']:.3f}" if isinstance(e["value"], (int, float)) else str(e["value"])
        rows.append((e["task"], e["metric"], value, interval, str(e["n"] or "-"), f"`{e['run']}`"))
    return ("## Evaluation\n\nFrom the `slmctl eval` runs that read this model (95% bootstrap intervals):\n\n"
            + table(("task", "metric", "value", "interval", "n", "eval run"), rows))


def limits(c, chain: list[dict]) -> str:
    synthetic = any(((entry["config"].get("data") or {}).get("kind")) == "synthetic" for entry in chain)
    lines = ["## Intended use and limits", ""]
    if not chain:
        lines.append("- Random weights: for testing tools and pipelines only; it produces no meaningful text.")
    elif synthetic:
        lines.append("- Trained on slmctl's synthetic reading task: a demonstration and test model. It answers questions "
                     "about the facts in its input and knows nothing of real-world text.")
    else:
        lines.append("- A small language model for the kind of text it was trained on (see Training); it has not been "
                     "tuned for instructions or safety, and can state wrong things fluently.")
    lines.append(f"- Inputs longer than {c.max_seq_len} tokens are beyond the length it was trained on"
                 + (" (NTK-scaled RoPE extends it)." if c.rope_factor > 1 else "."))
    if c.is_encoder_decoder:
        lines.append("- Encoder-decoder: the input is read once by the encoder; generation conditions on it through "
                     "cross-attention. It is not a chat model.")
    return "\n".join(lines)


def table(header: tuple[str, ...], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)
