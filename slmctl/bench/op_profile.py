"""Where an export's prefill goes, op type by op type, from ONNX Runtime's own profiler.

Runs one variant's encoder (or the decoder-only model) on a random prompt with profiling on,
after warm-up runs, and sums the kernel time of the last runs per op type: the evidence for
what a fusion can and cannot win (a prefill that is 86% Gemm gains little from fusing norms).

    python -m slmctl.bench.op_profile runs/export/latest:ort --prompt-len 512 --threads 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path


def profile(export_ref: str, prompt_len: int, threads: int, runs: int = 3, runs_dir: str = "runs") -> dict:
    """{"graph", "runs", "total_ms" (kernel time per run), "ops": {op type: ms per run}} of the
    variant's prompt graph."""
    import numpy as np
    import onnxruntime as ort

    from slmctl.refs import resolve

    ref = resolve(export_ref, runs_dir, allow=("export",), purpose="profiling")
    spec = json.loads((ref.path / "slmctl_onnx.json").read_text())
    variant = spec["variants"][ref.variant]
    role = "encoder" if "encoder" in variant["graphs"] else "model"
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    rng = np.random.default_rng(0)
    total_runs = runs + 2
    with tempfile.TemporaryDirectory() as work:  # the trace lands here, never in the working directory
        options.profile_file_prefix = str(Path(work) / "profile")
        session = ort.InferenceSession(str(ref.path / variant["graphs"][role]["file"]), options,
                                       providers=["CPUExecutionProvider"])
        feed = {}
        for entry in session.get_inputs():
            if entry.name == "input_ids":
                feed[entry.name] = rng.integers(4, spec["model"]["vocab_size"], (1, prompt_len), dtype=np.int64)
            elif entry.name == "attention_mask":
                feed[entry.name] = np.ones((1, prompt_len), dtype=np.int64)
            else:  # a decoder-only model's empty cache
                shape = [1 if d == "batch" else 0 if isinstance(d, str) else d for d in entry.shape]
                feed[entry.name] = np.zeros(shape, dtype=np.float32)
        for _ in range(total_runs):  # the first two warm up
            session.run(None, feed)
        trace = Path(session.end_profiling())
        events = [e for e in json.loads(trace.read_text()) if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    last = events[len(events) * 2 // total_runs:]
    ops = Counter()
    for event in last:
        ops[event["args"]["op_name"]] += event["dur"] / 1e3 / runs
    total = sum(ops.values())
    return {"graph": role, "variant": ref.variant, "prompt_len": prompt_len, "runs": runs, "total_ms": total,
            "ops": dict(ops.most_common())}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export", help="EXPORT[:variant]")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--runs-dir", default="runs")
    args = parser.parse_args(argv)
    result = profile(args.export, args.prompt_len, args.threads, args.runs, args.runs_dir)
    print(f"{args.export}: {result['graph']}, {args.prompt_len} tokens, kernel time {result['total_ms']:.1f} ms per run")
    for op, ms in list(result["ops"].items())[:12]:
        print(f"  {op:36s} {ms:8.1f} ms  {ms / result['total_ms']:6.1%}")
    return result


if __name__ == "__main__":
    main()
