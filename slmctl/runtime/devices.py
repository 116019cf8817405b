"""Which device a benchmark runs on, and never a silent fallback.

PyTorch covers cpu, cuda and mps. An NPU is reached only through an ONNX Runtime
execution provider (Qualcomm QNN, Intel OpenVINO with device NPU, AMD VitisAI, DirectML);
without one, `--device npu` is a one-line error that lists the providers this machine has
and the package that would add an NPU.
"""

from __future__ import annotations

from slmctl.errors import ConfigError

NPU_PROVIDERS = {
    "QNNExecutionProvider": "Qualcomm Hexagon (pip install onnxruntime-qnn)",
    "OpenVINOExecutionProvider": "Intel NPU (pip install onnxruntime-openvino)",
    "VitisAIExecutionProvider": "AMD Ryzen AI (the Ryzen AI software's onnxruntime-vitisai)",
    "DmlExecutionProvider": "DirectML on Windows (pip install onnxruntime-directml)",
}


def onnxruntime_providers() -> list[str]:
    """The execution providers of the installed ONNX Runtime ([] when it is not installed)."""
    try:
        import onnxruntime
    except ImportError:
        return []
    return list(onnxruntime.get_available_providers())


def npu_providers() -> list[str]:
    return [p for p in onnxruntime_providers() if p in NPU_PROVIDERS]


def check_torch_device(device: str) -> None:
    """Fail (ConfigError, exit 2) unless torch has `device` (cpu, cuda, mps; npu is checked by the caller)."""
    if device in ("cpu", "npu"):
        return
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available to torch here (use --device cpu)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps: no Apple GPU (MPS) is available to torch here (use --device cpu)")
    if device not in ("cuda", "mps"):
        raise ConfigError(f"unknown --device {device!r} (choose from: cpu, cuda, mps, npu)")


def check_device(device: str, runtime: str = "torch") -> None:
    """Fail (ConfigError, exit 2) unless `device` is usable with `runtime`."""
    check_torch_device(device)
    if device == "npu":
        found = npu_providers()
        available = ", ".join(onnxruntime_providers()) or "none (onnxruntime is not installed)"
        if not found:
            packages = "; ".join(f"{name}: {how}" for name, how in NPU_PROVIDERS.items())
            raise ConfigError(f"--device npu: no NPU execution provider in ONNX Runtime (available: {available}); "
                              f"an NPU needs one of {packages}")
        if runtime == "torch":
            raise ConfigError(f"--device npu runs exported ONNX graphs (found {', '.join(found)}): "
                              f"use --runtime onnx with a model from `slmctl export onnx`")
