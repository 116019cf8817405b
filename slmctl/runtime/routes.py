"""Which runtime runs a model directory's inference on this CPU (`--runtime auto`), and the
export it needs when that is ONNX Runtime.

Measured (docs/speed.md, 330m, batch 1, 512 -> 64, 2 threads): on an AMD EPYC torch's fp32
products go through MKL, whose matrix-vector kernel reads the weights at about half the
bandwidth, and PyTorch decodes at 0.47x ONNX Runtime's speed. The best BLAS at hand does not
close it: numpy's OpenBLAS runs the decoder's 61 weight products, back to back with nothing
between, in 18.4 ms, as long as ONNX Runtime's whole step (19 ms), so an eager PyTorch step,
with its ~350 small kernels, cannot reach ONNX Runtime. There a model directory runs through
ONNX Runtime, from an `slmctl export onnx` of it (validated against PyTorch, sealed) made once
and kept under `<runs>/.cache/onnx/`, keyed by the model directory's checksums and the export
contract. On Intel CPUs MKL reads at the bound and PyTorch stays.

`--runtime torch|onnx` overrides it per command, SLMCTL_RUNTIME=torch|onnx|auto for every command.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from slmctl.errors import ConfigError, RunFailure

RUNTIME_ENV = "SLMCTL_RUNTIME"
CACHE_DIR = Path(".cache") / "onnx"  # under the runs directory: export runs named by the model's key


def choose_runtime(identity: dict, environ=os.environ) -> tuple[str, str]:
    """(torch | onnx, why) for a model directory's fp32 inference on the CPU `identity` describes
    (slmctl.runtime.hardware.cpu_identity)."""
    forced = environ.get(RUNTIME_ENV, "auto")
    if forced in ("torch", "onnx"):
        return forced, f"{RUNTIME_ENV}={forced}"
    if forced != "auto":
        raise ConfigError(f"{RUNTIME_ENV}={forced!r}: choose auto, torch or onnx")
    if identity.get("cpu_vendor") == "AuthenticAMD" and identity.get("torch_blas") == "mkl":
        return "onnx", (f"{identity.get('cpu') or 'an AMD CPU'}: torch's MKL reads fp32 weights at about half the "
                        f"bandwidth here, ONNX Runtime near it")
    return "torch", f"{identity.get('cpu') or 'this CPU'}: torch's {identity.get('torch_blas', 'BLAS')} is at the bound"


def onnx_route(model_ref, runs_dir: str | Path, runtime: str, device: str):
    """The export (a ModelRef) that runs `model_ref` through ONNX Runtime, or None for PyTorch:
    a model directory on the CPU, when `runtime` is onnx or auto chooses it. Says so on stderr."""
    from slmctl.model.vlm import is_vision_dir
    from slmctl.refs import resolve

    if model_ref.kind != "model_dir" or device != "cpu" or runtime == "torch":
        return None
    if is_vision_dir(model_ref.path):  # images reach PyTorch's tower; an export of it is run when named
        if runtime == "onnx":
            raise ConfigError(f"{model_ref.text} reads images: run its export (`slmctl export onnx {model_ref.text}`) "
                              f"on ONNX Runtime, or drop --runtime onnx")
        return None
    asked = runtime == "onnx"  # by --runtime onnx: no export is an error, not a fallback
    why = "--runtime onnx"
    if not asked:
        from slmctl.runtime.hardware import cpu_identity

        runtime, why = choose_runtime(cpu_identity())
        if runtime == "torch":
            return None
    try:
        export = cached_export(model_ref.path, runs_dir)
    except ExportUnavailable as e:
        if asked:
            raise ConfigError(f"{model_ref.text}: --runtime onnx needs an export of it, and {e}") from None
        _say(f"runtime: PyTorch for {model_ref.label} ({e})")
        return None
    _say(f"runtime: ONNX Runtime for {model_ref.label} ({why}; --runtime torch or {RUNTIME_ENV}=torch for PyTorch)")
    return resolve(export, runs_dir, allow=("export",), purpose="ONNX Runtime")


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def model_key(model_dir: Path) -> str | None:
    """What names a model directory's export in the cache: its checksums.json's digest (every
    file's sha256) and the export contract; None for a directory without checksums (not sealed)."""
    from slmctl.integrity import CHECKSUMS_FILE
    from slmctl.runtime.onnx import CONTRACT_VERSION

    checksums = model_dir / CHECKSUMS_FILE
    if not checksums.is_file():
        return None
    return f"{hashlib.sha256(checksums.read_bytes()).hexdigest()[:16]}-c{CONTRACT_VERSION}"


def cached_export(model_dir: Path, runs_dir: str | Path) -> Path:
    """The export directory of `model_dir` in the cache, made now (a child `slmctl export onnx`,
    its output on stderr) if there is none. Raises ExportUnavailable when the model cannot be
    exported (a directory without checksums, or an export that failed: not tried again)."""
    key = model_key(model_dir)
    if key is None:
        raise ExportUnavailable(f"{model_dir} has no checksums.json to name its export by")
    cache = Path(runs_dir) / CACHE_DIR
    found = _cached(cache, key)
    if found is None:
        _say(f"exporting {model_dir} once for ONNX Runtime into {cache} (slmctl export onnx)")
        command = [sys.executable, "-m", "slmctl", "export", "onnx", str(model_dir), "--name", key, "--runs-dir", str(cache)]
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as child:
            for line in child.stdout:  # the child's report goes to stderr: stdout carries only the answers
                sys.stderr.write(line)
        if child.returncode in (130, -2):
            raise KeyboardInterrupt("interrupted while exporting for ONNX Runtime")
        found = _cached(cache, key)
    if found is None:
        raise ExportUnavailable(f"its export did not finish (see {cache}/export)")
    return found


def _cached(cache: Path, key: str) -> Path | None:
    """The newest succeeded export run named by `key` in the cache; ExportUnavailable when the newest
    finished one failed (it is not tried again); None when there is none."""
    from slmctl.runs.lookup import read_status, run_directories

    for run in sorted((run for run in run_directories(cache / "export") if run.name.endswith(f"-{key}")), reverse=True):
        status = (read_status(run) or {}).get("status")
        if status == "succeeded":
            return run
        if status == "failed":
            raise ExportUnavailable(f"its export failed: {run}/log.txt")
    return None


class ExportUnavailable(RunFailure):
    """This model directory has no usable export (it failed, or cannot be named): it runs on PyTorch,
    the reason printed; with --runtime onnx it is a one-line error."""
