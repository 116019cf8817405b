"""The bench stage: sensible timings, the comparison, output formats and device errors."""

import json

import pytest
import torch
from conftest import cli, newest_run, stage_runs

REQUIRED = {"model", "arch", "device", "runtime", "dtype", "batch", "input_len", "output_len", "first_token_ms",
            "decode_tok_s", "peak_mem_mb", "params", "samples", "first_token_ms_p90", "decode_tok_s_stdev", "e2e_ms",
            "prefill_flops", "decode_flops_per_token", "decode_bytes_per_token", "bandwidth_bound_tok_s", "bound_fraction"}


def test_compare_two_architectures_writes_records_ratios_and_a_plot(tmp_path):
    result = cli("bench", "tiny", "deconly-tiny", "--compare", "--input-lens", "32,512", "--output-lens", "4",
                   "--repeat", "3", "--format", "json", runs=tmp_path / "runs")
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)  # `--format json > out.json` is valid JSON: everything else went to stderr
    assert "bench (medians)" in result.stderr and "first token" in result.stderr
    assert len(records) == 4 and all(REQUIRED <= set(r) for r in records)
    for arch in ("encdec", "deconly"):
        short, long = sorted((r for r in records if r["arch"] == arch), key=lambda r: r["input_len"])
        assert 0 < short["first_token_ms"] < long["first_token_ms"]  # prefill grows with the prompt
        assert short["decode_tok_s"] > 0 and len(short["samples"]) == 3
        assert short["prefill_flops"] < long["prefill_flops"]
    run = newest_run(tmp_path / "runs", "bench")
    saved = json.loads((run / "bench.json").read_text())
    assert saved["records"][0]["model"] == "tiny" and saved["records"] == records
    environment = saved["environment"]  # which CPU timed it: its name, the kernel-picking features, torch's BLAS
    assert environment["cpu"] and environment["torch_blas"] and isinstance(environment["cpu_features"], list)
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert "avx2" in environment["cpu_features"]
    bandwidth = environment["read_bandwidth_gb_s"] * 1e9
    for r in records:  # the bound by hand: batch tokens per (weights + caches) read at the measured bandwidth
        assert r["first_token_ms"] < r["e2e_ms"], r  # the whole call includes the first token
        bound = r["batch"] * bandwidth / (r["decode_weight_bytes"] + r["decode_kv_bytes"])
        assert r["bandwidth_bound_tok_s"] == pytest.approx(bound)
        assert r["bound_fraction"] == pytest.approx(r["decode_tok_s"] / bound)
    for input_len in (32, 512):  # the encoder-decoder's decode step reads fewer bytes than the decoder-only's
        encdec, deconly = (next(r for r in records if r["arch"] == a and r["input_len"] == input_len)
                           for a in ("encdec", "deconly"))
        assert encdec["decode_bytes_per_token"] < deconly["decode_bytes_per_token"]
    assert (run / "bench.png").stat().st_size > 1000


def test_csv_and_markdown_formats(tmp_path):
    from slmctl.bench.report import RECORD_FIELDS
    from slmctl.runtime.hardware import cpu_identity
    from slmctl.runtime.prepacked import choose_packing

    result = cli("bench", "tiny", "--input-lens", "16", "--output-lens", "3", "--repeat", "1", "--format", "csv", runs=tmp_path / "runs")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()  # the header and the records, nothing else
    assert len(lines) == 2, result.stdout
    assert lines[0].split(",") == list(RECORD_FIELDS)
    packed = str(choose_packing(cpu_identity(), torch.float32)[0])  # fp32 products prepacked for oneDNN on AMD
    assert lines[1].startswith(f"tiny,encdec,cpu,torch,,float32,{packed},1,16,3,")
    result = cli("bench", "tiny", "--input-lens", "16", "--output-lens", "3", "--repeat", "1", "--format", "md", runs=tmp_path / "runs")
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and lines[0].startswith("| model | arch | device |"), result.stdout


def test_with_a_format_stdout_carries_only_the_records_even_when_a_library_prints(tmp_path, monkeypatch):
    from slmctl.bench import stage

    def chatty_load(*args, **kwargs):
        print("Some weights were not initialized")  # as libraries do while loading a model
        return load_for_bench(*args, **kwargs)

    load_for_bench = stage.load_for_bench
    monkeypatch.setattr(stage, "load_for_bench", chatty_load)
    result = cli("bench", "tiny", "--input-lens", "16", "--output-lens", "3", "--repeat", "1", "--format", "json", runs=tmp_path / "runs")
    assert result.exit_code == 0, result.output
    assert [r["model"] for r in json.loads(result.stdout)] == ["tiny"]
    assert "Some weights were not initialized" in result.stderr


def test_npu_without_a_provider_is_exit_2_naming_the_providers(tmp_path):
    result = cli("bench", "tiny", "--device", "npu", runs=tmp_path / "runs")
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert "--device npu: no NPU execution provider in ONNX Runtime (available:" in message
    assert "onnxruntime-qnn" in message and "onnxruntime-openvino" in message and "Traceback" not in message
    assert not (tmp_path / "runs" / "bench").exists()  # nothing was started


def test_cuda_without_a_gpu_and_bad_options_are_one_line_errors(tmp_path):
    if not torch.cuda.is_available():
        result = cli("bench", "tiny", "--device", "cuda", runs=tmp_path / "runs")
        assert result.exit_code == 2 and "no CUDA device" in result.output
    assert cli("bench", "tiny", "--input-lens", "12a", runs=tmp_path / "runs").exit_code == 2
    result = cli("bench", "--compare", "tiny", runs=tmp_path / "runs")
    assert result.exit_code == 2 and "two or more models" in result.output
    result = cli("bench", "tiny", "--dtype", "int3", runs=tmp_path / "runs")
    assert result.exit_code == 2 and "dtype='int3' is not one of" in result.output


def test_roofline_estimate_only_and_measured_over_predicted(tmp_path):
    result = cli("bench", "tiny", "deconly-tiny", "--estimate", "h100", "--repeat", "0", "--dtype", "bfloat16",
                   "--input-lens", "64,256", "--format", "json", runs=tmp_path / "runs")
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)  # `--format json > out.json` is valid JSON: everything else went to stderr
    assert "roofline estimate: h100" in result.stderr and "predicted ft ms" in result.stderr
    from slmctl.model import flops
    from slmctl.model.config import get_preset

    r = records[0]
    assert r["first_token_ms"] is None and r["device"] == "h100" and r["runtime"] == "roofline"
    cost = flops.prefill_cost(get_preset("tiny"), 64, 2)
    expected = max(cost.flops / 989.4e12, (cost.weight_bytes + cost.kv_bytes) / 3350e9) * 1e3  # the profile's peaks
    assert r["predicted_first_token_ms"] == pytest.approx(expected)
    measured = cli("bench", "tiny", "--estimate", "this-cpu", "--input-lens", "64", "--output-lens", "8", "--repeat", "1",
                     "--format", "json", runs=tmp_path / "runs")
    record = json.loads(measured.stdout[measured.stdout.index("["):measured.stdout.rindex("]") + 1])[0]
    assert record["first_token_measured_over_predicted"] > 0 and record["decode_measured_over_predicted"] > 0
    estimate = json.loads((newest_run(tmp_path / "runs", "bench") / "bench.json").read_text())["environment"]["estimate"]
    assert set(estimate["matmul_peaks"]) == {"torch", "onnxruntime"}  # the roof is the faster runtime's GEMM
    assert estimate["peak_flops"] == max(estimate["matmul_peaks"].values()) > 0
    assert cli("bench", "tiny", "--estimate", "tpu9000", runs=tmp_path / "runs").exit_code == 2
    assert cli("bench", "tiny", "--repeat", "0", runs=tmp_path / "runs").exit_code == 2


def test_t5_comparison_times_ours_t5_and_the_onnx_export_in_one_run(tmp_path):
    from slmctl.bench import t5_baseline

    summary = t5_baseline.main(["--preset", "tiny", "--prompt-len", "16", "--new-tokens", "4", "--repeat", "1",
                                "--threads", "1", "--onnx", "--output", str(tmp_path / "speed.json")])
    assert set(summary["results"]) == {"slmctl", "transformers T5", "slmctl ONNX Runtime"}
    for result in summary["results"].values():
        assert result["decode_tokens_per_s"]["median"] > 0 and result["first_token_s"]["median"] > 0
    assert summary["onnx"]["decode_speedup_vs_t5"] > 0 and summary["onnx"]["decode_fraction_of_bound"] > 0
    assert json.loads((tmp_path / "speed.json").read_text())["onnx"] == summary["onnx"]


def test_isolate_measures_each_model_in_its_own_process(tmp_path, monkeypatch):
    from slmctl.bench import stage

    def not_here(*args, **kwargs):
        raise AssertionError("measured in the parent process")

    monkeypatch.setattr(stage, "measure", not_here)
    result = cli("bench", "tiny", "deconly-tiny", "--compare", "--isolate", "--input-lens", "16", "--output-lens", "4",
                 "--repeat", "2", runs=tmp_path / "runs")
    assert result.exit_code == 0, result.output
    (run,) = stage_runs(tmp_path / "runs", "bench")
    bench = run / "bench.json"
    records = json.loads(bench.read_text())["records"]
    assert [r["model"] for r in records] == ["tiny", "deconly-tiny"]
    assert all(r["first_token_ms"] > 0 and r["decode_tok_s"] > 0 and len(r["samples"]) == 2 for r in records)


def _record(model, input_len, first_token_ms, decode_tok_s, peak_mem_mb, **extra):
    """A bench record with every field the renderers read; timings as given."""
    from slmctl.bench.report import RECORD_FIELDS

    record = dict.fromkeys(RECORD_FIELDS, 0)
    record.update(model=model, arch="encdec", device="cpu", runtime="torch", dtype="float32", batch=1,
                  input_len=input_len, output_len=8, first_token_ms=first_token_ms, decode_tok_s=decode_tok_s,
                  peak_mem_mb=peak_mem_mb, **extra)
    return record


def test_compare_ratios_are_against_the_last_model_per_configuration():
    from slmctl.bench.report import comparisons

    records = [_record("int8", 16, 25.0, 120.0, 300.0), _record("int8", 64, 60.0, 90.0, 330.0),
               _record("fp32", 16, 50.0, 40.0, 600.0), _record("fp32", 64, 80.0, 45.0, 660.0),
               _record("torch", 64, 200.0, 30.0, 1320.0), _record("torch", 16, 100.0, 20.0, 1200.0)]
    rows = comparisons(records, ["int8", "fp32", "torch"])
    got = {(r["model"], r["input_len"]): (r["baseline"], r["first_token_reduction"], r["throughput_ratio"],
                                          r["memory_ratio"]) for r in rows}
    # by hand: 1 - first / baseline first, rate / baseline rate, memory / baseline memory, at the same input length
    expected = {("int8", 16): ("torch", 0.75, 6.0, 0.25), ("int8", 64): ("torch", 0.7, 3.0, 0.25),
                ("fp32", 16): ("torch", 0.5, 2.0, 0.5), ("fp32", 64): ("torch", 0.6, 1.5, 0.5)}
    assert len(rows) == 4 and got.keys() == expected.keys()
    for key, (baseline, reduction, throughput, memory) in expected.items():
        assert got[key][0] == baseline, key
        assert got[key][1:] == pytest.approx((reduction, throughput, memory)), key
    assert [(r["model"], r["input_len"]) for r in rows] == [("int8", 16), ("int8", 64), ("fp32", 16), ("fp32", 64)]

    # a slower model: a negative reduction and a ratio below 1; a zero rate has no ratio
    slow = comparisons([_record("a", 16, 150.0, 10.0, 100.0), _record("b", 16, 100.0, 40.0, 400.0)], ["a", "b"])[0]
    assert slow["first_token_reduction"] == pytest.approx(-0.5) and slow["throughput_ratio"] == pytest.approx(0.25)
    assert comparisons([_record("a", 16, 1.0, 0.0, 1.0), _record("b", 16, 1.0, 4.0, 1.0)], ["a", "b"])[0][
        "throughput_ratio"] is None

    # roofline estimates (nothing measured) compare the predictions and have no memory ratio
    estimated = [_record("a", 16, None, None, None, predicted_first_token_ms=3.0, predicted_decode_tok_s=500.0),
                 _record("b", 16, None, None, None, predicted_first_token_ms=4.0, predicted_decode_tok_s=200.0)]
    row = comparisons(estimated, ["a", "b"])[0]
    assert row["first_token_reduction"] == pytest.approx(0.25) and row["throughput_ratio"] == pytest.approx(2.5)
    assert row["memory_ratio"] is None


def test_compare_table_and_formats_render_the_hand_built_records():
    import csv
    import io

    from rich.console import Console

    from slmctl.bench.report import RECORD_FIELDS, comparison_table, format_records

    records = [_record("int8", 16, 25.0, 120.0, 300.0), _record("torch", 16, 100.0, 20.0, 1200.0)]
    console = Console(width=200, file=io.StringIO())
    console.print(comparison_table(records, ["int8", "torch"]))
    (row,) = [line for line in console.file.getvalue().splitlines() if "int8" in line]
    assert [c.strip() for c in row.strip("│ ").split("│")] == ["int8", "1", "16", "8", "75.0%", "6.00x", "0.25x"]

    parsed = list(csv.DictReader(io.StringIO(format_records(records, "csv"))))
    assert list(parsed[0]) == list(RECORD_FIELDS) and [r["model"] for r in parsed] == ["int8", "torch"]
    assert float(parsed[1]["first_token_ms"]) == 100.0 and float(parsed[0]["decode_tok_s"]) == 120.0
    lines = format_records(records, "md").splitlines()
    assert lines[0] == "| " + " | ".join(RECORD_FIELDS) + " |" and len(lines) == 4
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert dict(zip(RECORD_FIELDS, cells))["first_token_ms"] == "25" and cells[0] == "int8"
    assert json.loads(format_records(records, "json")) == records


def test_batched_decode_counts_every_sequence_on_both_runtimes_and_plots_against_batch(tmp_path):
    runs = tmp_path / "runs"
    assert cli("export", "onnx", "tiny", "validation.prompt_lens=[5]", "validation.steps=4", runs=runs).exit_code == 0
    export = newest_run(runs, "export")
    result = cli("bench", "tiny", export, "--batch", "1,4", "--input-lens", "16", "--output-lens", "9", "--repeat", "5",
                 "--warmup", "1", runs=runs)
    assert result.exit_code == 0, result.output
    run = newest_run(runs, "bench")
    records = json.loads((run / "bench.json").read_text())["records"]
    assert sorted((r["runtime"], r["batch"]) for r in records) == [("onnx", 1), ("onnx", 4), ("torch", 1), ("torch", 4)]
    for r in records:  # tokens of all sequences: batch x (new tokens after the first) over the decode time
        sample = r["samples"][0]
        decode_s = (sample["e2e_ms"] - sample["first_token_ms"]) / 1e3
        assert sample["decode_tok_s"] == pytest.approx(r["batch"] * 8 / decode_s, rel=0.25)
    for runtime in ("torch", "onnx"):
        one, four = sorted((r for r in records if r["runtime"] == runtime), key=lambda r: r["batch"])
        # no speed ratio between the two is asserted: on CI's 2 busy cores batch 4 measured from 1.01x to 1.31x
        # batch 1's tokens/s; what the user relies on is the count above (every sequence's tokens) and the bound
        assert four["bandwidth_bound_tok_s"] > one["bandwidth_bound_tok_s"]
    assert (run / "bench_batch.png").stat().st_size > 1000


def test_drafted_decoding_is_a_configuration_with_its_acceptance_and_pass_cost(tmp_path):
    """`--draft none,prompt`: one record each; the drafted one says how many drafts a pass kept and
    what a pass over K drafts costs against a 1-token step. The training init echoes its input, so
    its output copies and prompt lookup is accepted."""
    result = cli("bench", "tiny", "--draft", "none,prompt", "--draft-tokens", "4", "--draft-ngram", "3", "--input-lens", "16",
                 "--output-lens", "24", "--estimate", "h100",
                 "--repeat", "1", "--format", "json", runs=tmp_path / "runs")
    assert result.exit_code == 0, result.output
    plain, drafted = json.loads(result.stdout)
    assert plain["draft"] == "none" and plain["accepted_per_pass"] is None and plain["pass_cost_ratio"] is None
    assert drafted["draft"] == "prompt" and drafted["draft_tokens"] == 4 and drafted["draft_ngram"] == 3
    assert 1 < drafted["accepted_per_pass"] <= drafted["drafted_per_pass"] <= 4 and drafted["pass_cost_ratio"] > 0
    # the model: 23 tokens after the first, in passes of 1 + kept drafts and plain steps, at the typical pass's cost
    tokens, passes = 23, drafted["draft_passes"]
    steps = passes * drafted["typical_pass_cost_ratio"] + tokens - passes * (1 + drafted["accepted_per_pass"])
    assert drafted["implied_speedup"] == pytest.approx(tokens / steps)
    assert drafted["measured_speedup"] == pytest.approx(drafted["decode_tok_s"] / plain["decode_tok_s"])
    assert "drafts kept per pass" in result.stderr and "x plain (its passes imply" in result.stderr
    # beside the measured pass cost, the roofline's least: a pass over 5 tokens reads the weights once
    from slmctl.bench.roofline import pass_cost_floor
    from slmctl.model import flops
    from slmctl.model.config import get_preset
    from slmctl.model.flops import Cost

    decode = flops.generation_cost(get_preset("tiny"), 16, 24, 4)["decode_per_token"]
    expected = max(5 * decode.flops / 67e12, (decode.weight_bytes + decode.kv_bytes) / 3350e9) / \
        max(decode.flops / 67e12, (decode.weight_bytes + decode.kv_bytes) / 3350e9)
    assert drafted["predicted_pass_cost_ratio"] == pytest.approx(expected) and plain.get("predicted_pass_cost_ratio") is None
    assert "roofline" in result.stderr  # printed beside the measured pass cost
    assert pass_cost_floor(Cost(100, 1000, 0), 20, 1, {"peak_flops": 100, "bandwidth": 100}) == 2.0  # FLOPs past the read
    assert pass_cost_floor(Cost(100, 1000, 0), 5, 1, {"peak_flops": 100, "bandwidth": 100}) == 1.0
    for args, message in ((["--draft", "no-such-model"], "no-such-model"),
                          (["--draft", "prompt", "--draft-tokens", "0"], "--draft takes none, prompt and/or draft models")):
        refused = cli("bench", "tiny", *args, runs=tmp_path / "refused")
        assert refused.exit_code == 2 and message in refused.output and not (tmp_path / "refused").exists()
        assert len(refused.output.strip().splitlines()) == 1


def test_a_draft_model_is_a_configuration_and_a_model_drafting_for_itself_keeps_its_drafts(tmp_path):
    """`--draft tiny` for `tiny` (the same preset, the same seed: the same weights): every greedy draft
    is the target's own choice, so nearly every drafted token is kept; the record says what a draft
    model's step costs in target steps, and the implied speed-up counts it. A draft model of another
    vocabulary is refused in one line."""
    result = cli("bench", "tiny", "--draft", "tiny", "--draft-tokens", "4", "--input-lens", "16", "--output-lens", "24",
                 "--repeat", "1", "--format", "json", runs=tmp_path / "runs")
    assert result.exit_code == 0, result.output
    (drafted,) = json.loads(result.stdout)
    assert drafted["draft"] == "tiny" and drafted["draft_tokens"] == 4
    assert drafted["accepted_per_pass"] >= 0.9 * drafted["drafted_per_pass"] and drafted["drafted_per_pass"] > 2
    assert 0.2 < drafted["draft_step_cost_ratio"] < 5  # the same model: about one target step a drafted token
    tokens, passes = 23, drafted["draft_passes"]
    cost = drafted["typical_pass_cost_ratio"] + drafted["drafted_per_pass"] * drafted["draft_step_cost_ratio"]
    assert drafted["implied_speedup"] == pytest.approx(tokens / (passes * cost + tokens - passes * (1 + drafted["accepted_per_pass"])))
    other = cli("bench", "tiny", "--draft", "deconly-tiny", "--input-lens", "8", "--output-lens", "4", "--repeat", "1",
                runs=tmp_path / "other")
    assert other.exit_code == 2 and "a draft model must be an encoder-decoder" in other.output
