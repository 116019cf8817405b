"""Where an export's prefill or decode step goes, op type by op type, from ONNX Runtime's own profiler.

`--graph prefill` (the default) runs one variant's encoder (or the decoder-only model) on a
random prompt; `--graph decoder` runs one decode step: the decoder graph at M = 1 (one new
token) over a cache of `--cache-len` positions and, for an encoder-decoder, cross-attention
keys/values of `--prompt-len`. Profiling is on; after warm-up runs it sums the kernel time and
counts the nodes of the last runs per op type, the evidence for what a fusion or a faster
kernel can and cannot win (a prefill that is 86% Gemm gains little from fusing norms; a decode
step whose weight products are half its time gains at most 2x from faster weight kernels).
`run_ms` is the session's own time per run (the profiler's model_run), so run_ms - total_ms is
what the executor spends between kernels (the profiler's per-node bookkeeping included).

    python -m slmctl.bench.op_profile runs/export/latest:ort --prompt-len 512 --threads 2
    python -m slmctl.bench.op_profile runs/export/latest:int4 --graph decoder --cache-len 512 --prompt-len 512
    python -m slmctl.bench.op_profile runs/export/latest --graph decoder --tokens 9   # a pass checking 8 drafts
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

ONNX_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


def _feed(session, vocab_size: int, graph: str, prompt_len: int, cache_len: int, rng, tokens: int = 1) -> dict:
    """Random inputs for a prefill (`prompt_len` tokens, empty cache) or one decode step (`tokens`
    new ones, 1 for a plain step and 1 + K for a pass checking K drafts, after `cache_len` cached
    ones), batch 1, by the names and dimensions the export gives its inputs."""
    decode = graph == "decoder"
    past = cache_len if decode else 0
    new = tokens if decode else prompt_len
    dims = {"batch": 1, "decoder_sequence": new, "sequence": new, "encoder_sequence": prompt_len, "past_sequence": past,
            "past_sequence + sequence": past + new, "capacity": past + new}
    feed = {}
    for entry in session.get_inputs():
        shape = [d if isinstance(d, int) else dims[d] for d in entry.shape]
        if entry.name == "input_ids":
            feed[entry.name] = rng.integers(4, vocab_size, shape, dtype=np.int64)
        elif entry.name in ("positions", "position"):  # cached tokens before the new ones (static graphs: the slot)
            feed[entry.name] = np.full(shape, past, dtype=np.int64)
        elif "mask" in entry.name:
            feed[entry.name] = np.ones(shape, dtype=np.int64)
        else:  # past_key_values.* (a static graph's are its whole buffers) and cross.*: random, as a cache is
            feed[entry.name] = rng.standard_normal(shape).astype(ONNX_DTYPES[entry.type])
    return feed


def _runner(session, feed: dict, in_place: bool, names: dict | None):
    """One run of the graph: plain, or for a decoder that writes its cache in place (contract 3) with each
    present output bound to its past input's buffer, as slmctl runs it (unbound, ONNX Runtime copies them)."""
    if not in_place:
        return lambda: session.run(None, feed)
    import onnxruntime as ort

    binding = session.io_binding()
    values = {name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in feed.items()}
    for name, value in values.items():
        binding.bind_ortvalue_input(name, value)
    shared = dict(zip(names["present"], names["past"]))
    for output in session.get_outputs():
        if output.name in shared:
            binding.bind_ortvalue_output(output.name, values[shared[output.name]])
        else:
            binding.bind_output(output.name)
    return lambda: session.run_with_iobinding(binding)


def profile(export_ref: str, prompt_len: int, threads: int, runs: int = 3, runs_dir: str = "runs", graph: str = "prefill",
            cache_len: int = 512, tokens: int = 1) -> dict:
    """{"graph", "role", "runs", "total_ms" (kernel time per run), "run_ms" (session time per run),
    "ops": {op type: kernel ms per run}, "counts": {op type: nodes run per run}} of the variant's
    prompt graph (`graph="prefill"`) or one decode step (`graph="decoder"`) over `tokens` new tokens."""
    import onnxruntime as ort

    from slmctl.refs import resolve

    if graph not in ("prefill", "decoder"):
        raise ValueError(f"graph must be prefill or decoder, not {graph!r}")
    ref = resolve(export_ref, runs_dir, allow=("export",), purpose="profiling")
    spec = json.loads((ref.path / "slmctl_onnx.json").read_text())
    variant = spec["variants"][ref.variant]
    # a decoder-only export has one graph, "decoder", for the prompt and the steps alike
    role = "encoder" if graph == "prefill" and "encoder" in variant["graphs"] else "decoder"
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_profiling = True
    rng = np.random.default_rng(0)
    total_runs = runs + 2
    with tempfile.TemporaryDirectory() as work:  # the trace lands here, never in the working directory
        options.profile_file_prefix = str(Path(work) / "profile")
        session = ort.InferenceSession(str(ref.path / variant["graphs"][role]["file"]), options,
                                       providers=["CPUExecutionProvider"])
        feed = _feed(session, spec["model"]["vocab_size"], graph, prompt_len, cache_len, rng, tokens)
        run = _runner(session, feed, variant["graphs"][role].get("cache") == "in_place", variant["cache_names"])
        for _ in range(total_runs):  # the first two warm up; every decode run is the same step
            run()
        trace = json.loads(Path(session.end_profiling()).read_text())
    events = [e for e in trace if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    last = events[len(events) * 2 // total_runs:]
    ops, counts = Counter(), Counter()
    for event in last:
        ops[event["args"]["op_name"]] += event["dur"] / 1e3 / runs
        counts[event["args"]["op_name"]] += 1
    run_events = [e["dur"] / 1e3 for e in trace if e.get("cat") == "Session" and e["name"] == "model_run"][-runs:]
    total = sum(ops.values())
    return {"graph": graph, "role": role, "variant": ref.variant, "prompt_len": prompt_len,
            "cache_len": cache_len if graph == "decoder" else 0, "tokens": tokens if graph == "decoder" else prompt_len,
            "runs": runs, "total_ms": total,
            "run_ms": sum(run_events) / len(run_events) if run_events else None,
            "ops": dict(ops.most_common()), "counts": {op: counts[op] // runs for op, _ in ops.most_common()}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export", help="EXPORT[:variant]")
    parser.add_argument("--graph", choices=("prefill", "decoder"), default="prefill",
                        help="prefill: the encoder (or decoder-only model) on the prompt; decoder: one decode step")
    parser.add_argument("--prompt-len", type=int, default=512, help="prompt tokens (decoder: the cross-attention length)")
    parser.add_argument("--cache-len", type=int, default=512, help="decoder: positions already in the self-attention cache")
    parser.add_argument("--tokens", type=int, default=1,
                        help="decoder: new tokens in the call (1: a plain step; 1 + K: a pass checking K drafts)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--top", type=int, default=12, help="op types printed (0: all)")
    parser.add_argument("--output", type=Path, default=None, help="also write the result as JSON")
    args = parser.parse_args(argv)
    result = profile(args.export, args.prompt_len, args.threads, args.runs, args.runs_dir, args.graph, args.cache_len,
                     args.tokens)
    step = "one decode step" if args.tokens == 1 else f"a {args.tokens}-token pass"
    where = (f"{step}, cache {args.cache_len}, prompt {args.prompt_len}" if args.graph == "decoder"
             else f"{args.prompt_len} tokens")
    run = f", session {result['run_ms']:.2f} ms" if result["run_ms"] is not None else ""
    print(f"{args.export}: {result['role']}, {where}, kernel time {result['total_ms']:.2f} ms per run{run}, "
          f"{sum(result['counts'].values())} nodes")
    ops = list(result["ops"].items())
    for op, ms in ops[:args.top] if args.top else ops:
        print(f"  {op:36s} {result['counts'][op]:6d} x {ms:8.2f} ms  {ms / result['total_ms']:6.1%}")
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
