"""Every GPU number in one run: `make gpu-check` (or `python -m slmctl.bench.gpu_check`).

On a machine with a CUDA GPU it runs, each step through the real `slmctl` command in its own
process, and records what each measured (or why it failed) in `<out>/gpu-check.json` and a
markdown table beside it:

1. `slmctl prepare` of a generated corpus (the streaming token store training reads);
2. `slmctl pretrain model=330m` for 50 steps in bf16 on that corpus: tokens/s, MFU against the
   GPU's conf/hardware profile, peak memory (the run's throughput summary);
3. `slmctl distill` for one step from a random 1B-class Llama teacher saved to disk, on question
   pairs prepared with the teacher's tokenizer;
4. `slmctl bench 330m --device cuda`: first-token latency and decode tokens/s;
5. `slmctl export onnx` and, when ONNX Runtime has its CUDA provider, `bench --runtime onnx`.

`--dry-run` runs the same steps with tiny sizes on the CPU (model=tiny, a 64-wide teacher,
2 steps): what `make test` runs, so the script cannot rot between GPU sessions.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Sizes:
    corpus_rows: int
    model: str
    steps: int
    batch: int
    source_len: int
    target_len: int
    teacher_hidden: int
    teacher_layers: int
    teacher_intermediate: int
    device: str
    trainer: list[str]


GPU = Sizes(corpus_rows=200_000, model="330m", steps=50, batch=32, source_len=512, target_len=64,
            teacher_hidden=2048, teacher_layers=16, teacher_intermediate=5632, device="cuda",
            trainer=["trainer=gpu", "trainer.precision=bf16-mixed"])
DRY = Sizes(corpus_rows=400, model="tiny", steps=2, batch=4, source_len=64, target_len=16, teacher_hidden=64,
            teacher_layers=2, teacher_intermediate=128, device="cpu", trainer=["trainer=cpu"])


def slmctl(*args: str, timeout: float = 480) -> dict:
    """`slmctl ARGS` (ending in --runs-dir RUNS) in a child process -> {"ok", "seconds", "summary" of
    the newest run, "error"}."""
    started = time.perf_counter()
    runs = Path(args[-1])
    command = [sys.executable, "-m", "slmctl", *args]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "seconds": round(time.perf_counter() - started, 1), "error": f"timed out after {timeout} s"}
    result = {"ok": done.returncode == 0, "seconds": round(time.perf_counter() - started, 1)}
    if done.returncode:
        result["error"] = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
    stage = args[0] if args[0] != "export" else "export"
    latest = runs / stage / "latest" / "status.json"
    if latest.is_file():
        result["summary"] = json.loads(latest.read_text()).get("summary")
    return result


def write_corpus(path: Path, rows: int) -> None:
    """Synthetic-world documents, and (source, target) question pairs for distillation."""
    from slmctl.data.synthetic import SyntheticWorld

    world = SyntheticWorld(seed=0, n_people=5000)
    paragraphs = world.texts(split="train", n=min(rows, 50_000))
    rng = random.Random(0)
    with open(path / "text.jsonl", "w", encoding="utf-8") as f:
        for _ in range(rows):
            f.write(json.dumps({"text": " ".join(rng.sample(paragraphs, rng.randint(1, 8)))}) + "\n")
    with open(path / "pairs.jsonl", "w", encoding="utf-8") as f:
        for example in world.qa(split="train", n=max(64, rows // 100), min_facts=4, max_facts=8):
            f.write(json.dumps({"source": example["source"], "target": example["target"]}) + "\n")


def save_teacher(path: Path, sizes: Sizes, tokenizer_dir: Path) -> None:
    """A random Llama of the given size with the prepared data's tokenizer, saved as a Hugging Face directory."""
    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from slmctl.data.tokenizer import TextTokenizer

    tokenizer = TextTokenizer.load(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=sizes.teacher_hidden,
                         intermediate_size=sizes.teacher_intermediate, num_hidden_layers=sizes.teacher_layers,
                         num_attention_heads=max(1, sizes.teacher_hidden // 64), max_position_embeddings=2048,
                         **tokenizer.special_ids)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16 if sizes.device == "cuda" else torch.float32)
    model.save_pretrained(path)
    special = tokenizer.special_tokens
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer.backend.to_str()), bos_token=special["bos"],
                            eos_token=special["eos"], pad_token=special["pad"]).save_pretrained(path)


def steps(out: Path, sizes: Sizes) -> list[tuple[str, list[str]]]:
    """(report key, `slmctl` arguments) of every step, in order; the teacher's steps read the
    teacher that `check` saves into `out/teacher` after the first prepare."""
    runs, data, teacher = out / "runs", out / "data", out / "teacher"
    lengths = [f"batch_size={sizes.batch}", f"max_source_len={sizes.source_len}", f"max_target_len={sizes.target_len}"]
    quiet = ["trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", f"checkpoint_every={sizes.steps}"]
    found = [
        ("prepare", ["prepare", "data=files", f"data.train={data / 'text.jsonl'}", "--name", "text"]),
        ("pretrain", ["pretrain", f"model={sizes.model}", "data=prepared", "data.path=prepare/latest",
                      "objective=span_corruption", *lengths, *quiet, *sizes.trainer, f"trainer.max_steps={sizes.steps}",
                      f"trainer.val_check_interval={sizes.steps}", "data.validation_rows=64"]),
        ("prepare_pairs", ["prepare", "data=files", f"data.train={data / 'pairs.jsonl'}", "tokenizer=teacher", "teacher=llama",
                           f"teacher.path={teacher}", "--name", "pairs"]),
        ("distill", ["distill", f"teacher.path={teacher}", f"student={sizes.model}", "data=prepared", "data.path=prepare/latest",
                     *lengths, *quiet, *sizes.trainer, "trainer.max_steps=1", "trainer.val_check_interval=1", "control=false"]),
        ("bench", ["bench", sizes.model, "--device", sizes.device, "--input-lens", str(sizes.source_len),
                   "--output-lens", str(sizes.target_len)]),
        ("export", ["export", "onnx", sizes.model]),
        ("bench_onnx", ["bench", "export/latest", "--runtime", "onnx", "--device", sizes.device,
                        "--input-lens", str(sizes.source_len), "--output-lens", str(sizes.target_len)]),
    ]
    return [(name, [*args, "--runs-dir", str(runs)]) for name, args in found]


def check(out: Path, sizes: Sizes) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    runs, data = out / "runs", out / "data"
    data.mkdir(exist_ok=True)
    report: dict = {"device": sizes.device, "model": sizes.model, "environment": environment()}
    write_corpus(data, sizes.corpus_rows)
    tokenizer_dir = runs / "prepare" / "latest" / "data" / "tokenizer"  # what the first prepare trained
    for name, args in steps(out, sizes):
        if name in ("prepare_pairs", "distill") and not tokenizer_dir.is_dir():
            continue  # no teacher without the tokenizer (the prepare step failed)
        if name == "prepare_pairs":
            save_teacher(out / "teacher", sizes, tokenizer_dir)
        if name == "bench_onnx" and not (ort_cuda() or sizes.device == "cpu"):
            report[name] = {"ok": False, "error": "onnxruntime has no CUDAExecutionProvider here"}
            continue
        report[name] = slmctl(*args)
    (out / "gpu-check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu-check.md").write_text(markdown(report))
    return report


def environment() -> dict:
    import torch

    found = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name()
    return found


def ort_cuda() -> bool:
    try:
        import onnxruntime

        return "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    except ImportError:
        return False


def markdown(report: dict) -> str:
    lines = [f"# gpu-check: {report['environment']}", "", "| step | ok | seconds | numbers |", "|---|---|---|---|"]
    for step in ("prepare", "pretrain", "prepare_pairs", "distill", "bench", "export", "bench_onnx"):
        entry = report.get(step)
        if entry is None:
            continue
        summary = entry.get("summary") or {}
        numbers = summary.get("throughput") if step == "pretrain" else {k: v for k, v in summary.items()
                                                                        if isinstance(v, (int, float))}
        detail = entry.get("error") or json.dumps(numbers)[:300]
        lines.append(f"| {step} | {entry['ok']} | {entry.get('seconds', '')} | {detail} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-check"))
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (what make test runs)")
    args = parser.parse_args(argv)
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("gpu-check: no CUDA GPU here; use --dry-run on a CPU", file=sys.stderr)
            return 2
    report = check(args.out, DRY if args.dry_run else GPU)
    print(markdown(report))
    return 0 if all(entry.get("ok", True) for entry in report.values() if isinstance(entry, dict) and "ok" in entry) else 1


if __name__ == "__main__":
    sys.exit(main())
