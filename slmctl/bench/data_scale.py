"""Training on corpora larger than memory, measured: `python -m slmctl.bench.data_scale`.

For each corpus size it generates a jsonl corpus of synthetic-world documents (1 to 8
paragraphs each) in 100 MB shards, then measures, each in a fresh process:

1. the tokenizers library's own batch encoding speed (`encode_batch_fast`, batches of 4096, all
   cores) on the first 50 MB of that corpus, with the tokenizer `slmctl prepare` trained;
2. `slmctl prepare` end to end (read, tokenise, write shards): characters/s, and its ratio to (1)
   (not memory-sampled: the sampler's CPU would slow it);
3. `slmctl pretrain model=small data=prepared` for a few steps: the process tree's peak
   proportional memory (PSS, sampled every 0.1 s, so loader workers sharing pages are not counted
   twice), the main process's peak RSS, and the seconds from the command's start to its first
   training step.

    python -m slmctl.bench.data_scale --sizes-mb 200 2000 --workdir /tmp/scale

docs/data.md holds the numbers and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

SHARD_MB = 100


def generate(directory: Path, megabytes: int, seed: int = 0) -> str:
    """A jsonl corpus of about `megabytes` MB; returns its glob (reused when already there)."""
    from slmctl.data.synthetic import SyntheticWorld

    directory.mkdir(parents=True, exist_ok=True)
    done = directory / "DONE"
    if done.is_file():
        return str(directory / "*.jsonl")
    paragraphs = SyntheticWorld(seed=seed, n_people=5000).texts(split="train", n=50_000)
    rng = random.Random(seed)
    written, shard = 0, 0
    while written < megabytes * 1_000_000:
        with open(directory / f"part-{shard:04d}.jsonl", "w", encoding="utf-8") as f:
            size = 0
            while size < SHARD_MB * 1_000_000 and written + size < megabytes * 1_000_000:
                line = json.dumps({"text": " ".join(rng.sample(paragraphs, rng.randint(1, 8)))}) + "\n"
                f.write(line)
                size += len(line)
        written += size
        shard += 1
    done.write_text(str(written))
    return str(directory / "*.jsonl")


def tokenizer_speed(corpus: str, tokenizer_dir: Path, megabytes: int = 50) -> float:
    """Characters/s of the tokenizers library's batch encoding alone, on the corpus's first rows."""
    import glob

    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    texts, size = [], 0
    for file in sorted(glob.glob(corpus)):
        with open(file, encoding="utf-8") as f:
            for line in f:
                texts.append(json.loads(line)["text"])
                size += len(texts[-1])
                if size >= megabytes * 1_000_000:
                    break
        if size >= megabytes * 1_000_000:
            break
    started = time.perf_counter()
    for i in range(0, len(texts), 4096):
        tokenizer.encode_batch_fast(texts[i:i + 4096], add_special_tokens=False)
    return size / (time.perf_counter() - started)


def tree_pss_kb(root: int) -> int:
    """Proportional set size (kB) of `root` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            pass
    return total


def watch(command: list[str], runs: Path, stage: str, sample_memory: bool = True) -> dict:
    """Run `command`, sampling its memory (walking /proc costs CPU: off where speed is the
    measurement); seconds to the first logged training step, if any."""
    earlier = set(runs.glob(f"{stage}/*/metrics.jsonl"))  # runs of earlier measurements
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak_pss, first_step = 0, None
    while process.poll() is None:
        if sample_memory:
            peak_pss = max(peak_pss, tree_pss_kb(process.pid))
        if first_step is None:
            metrics = [p for p in runs.glob(f"{stage}/*/metrics.jsonl") if p not in earlier and p.stat().st_size]
            if metrics and "train_loss" in metrics[0].read_text():
                first_step = time.perf_counter() - started
        time.sleep(0.1)
    error = process.stderr.read()
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}): {error.strip().splitlines()[-1:]}")
    return {"seconds": round(time.perf_counter() - started, 1), "peak_pss_mb": round(peak_pss / 1024),
            "first_step_s": None if first_step is None else round(first_step, 1)}


def measure(megabytes: int, workdir: Path, steps: int) -> dict:
    corpus = generate(workdir / f"corpus-{megabytes}mb", megabytes)
    runs = workdir / f"runs-{megabytes}mb"
    slmctl = [sys.executable, "-m", "slmctl"]
    prepare = watch([*slmctl, "prepare", "data=files", f"data.train={corpus}", "--runs-dir", str(runs)], runs, "prepare",
                    sample_memory=False)
    summary = json.loads((runs / "prepare" / "latest" / "status.json").read_text())["summary"]
    baseline = tokenizer_speed(corpus, runs / "prepare" / "latest" / "data" / "tokenizer")
    pretrain = watch([*slmctl, "pretrain", "model=small", "data=prepared", "data.path=prepare/latest",
                      f"trainer.max_steps={steps}", "trainer.log_every_n_steps=1", "trainer.val_check_interval=1000000",
                      "trainer.enable_progress_bar=false", "data.validation_rows=16", "--runs-dir", str(runs)],
                     runs, "pretrain")
    trained = json.loads((runs / "pretrain" / "latest" / "status.json").read_text())["summary"]
    return {"corpus_mb": megabytes, "documents": summary["train_documents"] + summary["validation_documents"],
            "tokens": summary["tokens"], "prepare_s": prepare["seconds"],
            "prepare_chars_per_s": summary["characters_per_s"], "tokenizer_chars_per_s": round(baseline),
            "prepare_vs_tokenizer": round(summary["characters_per_s"] / baseline, 3),
            "pretrain_peak_pss_mb": pretrain["peak_pss_mb"], "first_step_s": pretrain["first_step_s"],
            "pretrain_s": pretrain["seconds"], "packing_efficiency": trained.get("packing_efficiency"),
            "throughput": trained.get("throughput")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/slmctl-data-scale"))
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    results = [measure(size, args.workdir, args.steps) for size in args.sizes_mb]
    for result in results:
        print(json.dumps(result))
    if len(results) > 1:
        low, high = results[0]["pretrain_peak_pss_mb"], results[-1]["pretrain_peak_pss_mb"]
        print(json.dumps({"peak_memory_ratio": round(high / low, 3)}))


if __name__ == "__main__":
    main()
