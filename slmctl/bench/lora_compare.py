"""LoRA against full fine-tuning, measured: `python -m slmctl.bench.lora_compare` (`make lora-compare`).

1. train a `mini` encoder-decoder on the synthetic reading-comprehension task with one or two
   facts per context (the base model);
2. fine-tune it on the harder variant, two to four facts per context (more distractors to read
   past), twice, the same steps, batches and data: every weight (full) and `peft=lora`, each at
   its own learning rate (LoRA's adapters start at zero and want a larger one); each in a fresh
   process, so each run's peak memory is its own;
3. evaluate the base and both fine-tunes on held-out questions of the harder variant (exact
   match with 95% bootstrap intervals).

It prints one table: validation loss (and LoRA's over full's), trainable parameters, peak
resident memory during training, training seconds, exact match. docs/ecosystem.md holds the
numbers and the command.

    python -m slmctl.bench.lora_compare --workdir /tmp/lora-compare
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

DATA = ["data.n_people=5000", "batch_size=32", "max_source_len=64", "trainer.enable_progress_bar=false"]


def slmctl(runs: Path, *args: str) -> Path:
    """Run `slmctl ARGS` in a fresh process; returns the newest run directory of its stage."""
    command = [sys.executable, "-m", "slmctl", *args, "--runs-dir", str(runs)]
    print("$ slmctl " + " ".join(args), flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"slmctl {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    stage = args[0]
    return sorted(p for p in (runs / stage).iterdir() if p.is_dir() and p.name != "latest")[-1]


def summary(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())["summary"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("lora-compare"))
    parser.add_argument("--model", default="mini", help="the base model's preset")
    parser.add_argument("--data", nargs="*", default=[], help="extra key=value overrides for every run (e.g. a smaller world)")
    parser.add_argument("--base-objective", default="seq2seq", choices=["seq2seq", "span_corruption", "prefix_lm"])
    parser.add_argument("--base-data", nargs="*", default=["data.min_facts=1", "data.max_facts=2"],
                        help="the base model's task (the fine-tuning task: --fine-tune-data)")
    parser.add_argument("--fine-tune-data", nargs="*", default=["data.min_facts=2", "data.max_facts=4"],
                        help="the fine-tuning task: the same world with more facts per context")
    parser.add_argument("--base-steps", type=int, default=400)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3, help="full fine-tuning's peak learning rate")
    parser.add_argument("--lora-lr", type=float, default=5e-3, help="LoRA's peak learning rate")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--eval-limit", type=int, default=200)
    args = parser.parse_args(argv)
    runs = args.workdir.resolve() / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    data = [*DATA, *args.data]
    base = slmctl(runs, "pretrain", f"model={args.model}", f"objective={args.base_objective}", "tokenizer.vocab_size=1024",
                  *data, *args.base_data, "max_target_len=12", "optim.lr=3e-3", f"trainer.max_steps={args.base_steps}",
                  f"trainer.val_check_interval={args.base_steps}", "--name", "base")
    data += args.fine_tune_data
    fine_tune = ["objective=seq2seq", *data, "max_target_len=12", f"trainer.max_steps={args.steps}",
                 f"trainer.val_check_interval={args.steps}", f"checkpoint_every={args.steps}"]
    full = slmctl(runs, "pretrain", f"init={base}", *fine_tune, f"optim.lr={args.lr}", "--name", "full")
    lora = slmctl(runs, "pretrain", f"init={base}", *fine_tune, f"optim.lr={args.lora_lr}", "peft=lora",
                  f"peft.r={args.rank}", f"peft.alpha={2 * args.rank}", "--name", "lora")
    world = [d.replace("data.", "task.", 1) for d in data
             if d.split("=")[0] in ("data.seed", "data.n_people", "data.min_facts", "data.max_facts")]
    evaluation = slmctl(runs, "eval", str(base), str(full), str(lora), "task=synthetic_qa", *world,
                        f"limit={args.eval_limit}", "--name", "lora-compare")
    scores = json.loads((evaluation / "metrics.json").read_text())["tasks"]["synthetic_qa"]["models"]
    before = scores["base"]["exact_match"]
    rows = {}
    for name, run, lr in (("full", full, args.lr), ("lora", lora, args.lora_lr)):
        s = summary(run)
        em = scores[name]["exact_match"]
        rows[name] = {"val_loss": round(s["val_loss"], 4), "trainable_parameters": s["trainable_parameters"],
                      "parameters": s["parameters"], "peak_memory_mb": s["throughput"]["peak_memory_mb"],
                      "train_seconds": s["train_seconds"], "lr": lr, "exact_match": em["value"],
                      "exact_match_interval": [em["low"], em["high"]], "run": str(run)}
    report = {"base": str(base), "base_exact_match": before["value"], "base_exact_match_interval": [before["low"], before["high"]],
              "steps": args.steps, "rank": args.rank, "rows": rows,
              "val_loss_ratio": round(rows["lora"]["val_loss"] / rows["full"]["val_loss"], 4),
              "peak_memory_ratio": round(rows["lora"]["peak_memory_mb"] / rows["full"]["peak_memory_mb"], 4)}
    (args.workdir / "lora-compare.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n| fine-tuning | lr | trainable | val loss | peak memory | train s | exact match [95% CI] |")
    print("|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        share = 100 * row["trainable_parameters"] / row["parameters"]
        print(f"| {name} | {row['lr']:g} | {row['trainable_parameters']:,} ({share:.1f}%) | {row['val_loss']:.4f} | "
              f"{row['peak_memory_mb']:.0f} MB | {row['train_seconds']:.0f} | {row['exact_match']:.3f} "
              f"[{row['exact_match_interval'][0]:.3f}, {row['exact_match_interval'][1]:.3f}] |")
    print(f"| base, before fine-tuning | - | - | - | - | - | {before['value']:.3f} [{before['low']:.3f}, {before['high']:.3f}] |")
    print(f"\nLoRA / full: validation loss {report['val_loss_ratio']:.3f}, peak memory {report['peak_memory_ratio']:.3f}")
    return report


if __name__ == "__main__":
    main()
