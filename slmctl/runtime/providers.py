"""Which ONNX Runtime execution provider runs an export, and where each node actually ran.

`--ep NAME` names the provider (cpu, cuda, tensorrt, openvino, qnn, dml, vitisai, coreml,
migraphx); without it `--device` picks one (cpu: CPU; cuda: CUDA; npu: the first NPU provider
found). The provider's device follows `--device` (OpenVINO's device_type CPU/GPU/NPU, QNN's
CPU or HTP backend).

Every session records ONNX Runtime's own graph assignment (the session config entry
`session.record_ep_graph_assignment_info`): `placement()` turns it into a report of which
nodes ran on the chosen provider and which fell back to the CPU provider. On an NPU a
fallback is refused (exit 2, the nodes listed) unless `--allow-fallback`: a silently
CPU-bound "NPU" model is the failure users of these runtimes meet most.
"""

from __future__ import annotations

import sys
from collections import Counter

from slmctl.errors import UserError
from slmctl.refs import EXECUTION_PROVIDERS

CPU = EXECUTION_PROVIDERS["cpu"]
GPU_ONLY = ("cuda", "tensorrt", "migraphx")  # providers that need --device cuda
ASSIGNMENT_ENTRY = "session.record_ep_graph_assignment_info"


class ProviderError(UserError, ValueError):
    """A provider that is unknown, missing here, or would silently fall back (one line)."""


def available() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def providers_for(device: str, ep: str | None = None) -> list:
    """ONNX Runtime's providers argument: the chosen provider (with its options) first, then CPU
    for whatever it cannot run."""
    if ep is not None:
        return _named(ep, device)
    have = available()
    if device == "cpu":
        return [CPU]
    if device == "cuda":
        if EXECUTION_PROVIDERS["cuda"] not in have:
            raise ProviderError(f"--device cuda: this onnxruntime has no CUDAExecutionProvider (available: {', '.join(have)})")
        return [EXECUTION_PROVIDERS["cuda"], CPU]
    if device == "npu":
        from slmctl.runtime.devices import NPU_PROVIDERS

        for name in NPU_PROVIDERS:
            if name in have:
                return [(name, _options(name, device)), CPU]
        raise ProviderError(f"--device npu: no NPU execution provider in onnxruntime (available: {', '.join(have)})")
    raise ProviderError(f"unknown device {device!r} for ONNX Runtime (cpu, cuda or npu)")


def _named(ep: str, device: str) -> list:
    if ep not in EXECUTION_PROVIDERS:
        raise ProviderError(f"unknown --ep {ep!r} (choose from: {', '.join(EXECUTION_PROVIDERS)})")
    name, have = EXECUTION_PROVIDERS[ep], available()
    if name not in have:
        raise ProviderError(f"--ep {ep}: this onnxruntime has no {name} (available: {', '.join(have)}); "
                            f"{_package_hint(ep)}")
    if ep in GPU_ONLY and device != "cuda":
        raise ProviderError(f"--ep {ep} runs on a GPU: add --device cuda")
    if ep == "cpu":
        if device != "cpu":
            raise ProviderError(f"--ep cpu runs on --device cpu, not {device}")
        return [CPU]
    return [(name, _options(name, device)), CPU]


def _package_hint(ep: str) -> str:
    package = {"openvino": "onnxruntime-openvino", "qnn": "onnxruntime-qnn", "dml": "onnxruntime-directml",
               "cuda": "onnxruntime-gpu", "tensorrt": "onnxruntime-gpu"}.get(ep)
    return f"pip install {package} (in its own environment: it replaces onnxruntime)" if package else \
        "install an onnxruntime build with it"


def _options(name: str, device: str) -> dict:
    if name == "OpenVINOExecutionProvider":
        return {"device_type": {"cpu": "CPU", "cuda": "GPU", "npu": "NPU"}.get(device, "CPU")}
    if name == "QNNExecutionProvider":
        library = "QnnHtp" if device == "npu" else "QnnCpu"
        return {"backend_path": f"{library}.dll" if sys.platform == "win32" else f"lib{library}.so"}
    return {}


def provider_name(providers: list) -> str:
    first = providers[0]
    return first[0] if isinstance(first, tuple) else first


def record_assignment(options) -> None:
    """Ask the session to keep its graph assignment (read by `placement`)."""
    options.add_session_config_entry(ASSIGNMENT_ENTRY, "1")


def placement(session, target: str) -> dict:
    """Where the nodes of `session` run, from ONNX Runtime's graph assignment (after its graph
    optimisations: fused nodes appear under their fused names):

        {"provider": target, "nodes": total, "on_provider": n, "ops": {op_type: count on target},
         "fallback": [[name, op_type, provider], ...], "assignment": {provider: [[name, op_type], ...]}}
    """
    if not hasattr(session, "get_provider_graph_assignment_info"):
        import onnxruntime as ort

        return {"provider": target, "nodes": None, "unavailable": f"onnxruntime {ort.__version__} does not report "
                "its graph assignment (1.23 or newer does)"}
    assignment: dict[str, list] = {}
    for subgraph in session.get_provider_graph_assignment_info():
        assignment.setdefault(subgraph.ep_name, []).extend([node.name, node.op_type] for node in subgraph.get_nodes())
    on_target = assignment.get(target, [])
    fallback = [[name, op, provider] for provider, nodes in assignment.items() if provider != target for name, op in nodes]
    return {"provider": target, "nodes": sum(len(n) for n in assignment.values()), "on_provider": len(on_target),
            "ops": dict(Counter(op for _, op in on_target).most_common()), "fallback": fallback, "assignment": assignment}


def check_fallback(placements: dict[str, dict], device: str, allow_fallback: bool) -> None:
    """On an NPU, refuse graphs any of whose nodes would fall back to another provider."""
    if device != "npu" or allow_fallback:
        return
    fallen = [(role, name, op, provider) for role, report in placements.items() for name, op, provider in report.get("fallback", [])]
    if not fallen:
        return
    target = next(iter(placements.values()))["provider"]
    total = sum(report["nodes"] or 0 for report in placements.values())
    if len(fallen) == total:  # the provider took nothing: it did not load (ONNX Runtime only warns)
        ops = Counter(op for _, _, op, _ in fallen).most_common(5)
        raise ProviderError(f"--device npu: none of the {total} nodes would run on {target} (did it load? ONNX Runtime "
                            f"warns above); all would fall back to {fallen[0][3]} ({', '.join(f'{op} x{n}' for op, n in ops)}, ...); "
                            f"--allow-fallback runs them there anyway")
    listed = ", ".join(f"{role}:{name} ({op})" for role, name, op, _ in fallen)
    raise ProviderError(f"--device npu: {len(fallen)} of {total} nodes would fall back from {target} to "
                        f"{fallen[0][3]}: {listed}; --allow-fallback runs them there anyway")


def summary(report: dict) -> dict:
    """The report without the full assignment (what a bench record carries)."""
    return {k: v for k, v in report.items() if k != "assignment"}


def placement_line(placements: dict[str, dict]) -> str:
    """One line: per graph, the nodes on the provider and those that fell back."""
    parts = []
    for role, report in placements.items():
        if report.get("nodes") is None:
            return report.get("unavailable", "placement unknown")
        fallen = len(report["fallback"])
        parts.append(f"{role} {report['on_provider']}/{report['nodes']} nodes" + (f" ({fallen} fell back)" if fallen else ""))
    provider = next(iter(placements.values()))["provider"]
    return f"on {provider}: " + ", ".join(parts)
