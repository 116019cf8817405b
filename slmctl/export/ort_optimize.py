"""The ONNX Runtime-optimized variant (`--optimize ort`): fused contrib operators for ONNX Runtime.

The plain graphs stay standard ONNX (what NPU compilers and other runtimes take); this variant
is for ONNX Runtime only. Per graph:

1. every weight Gemm becomes MatMul + Add (`gemm_as_matmul`), the form ONNX Runtime's fusions
   and its MatMulNBits quantizer match;
2. ONNX Runtime's transformer optimizer (`onnxruntime.transformers.optimizer.optimize_model`,
   its Python fusions only: the session applies its own graph optimisations when it loads)
   fuses each RMSNorm into SimplifiedLayerNormalization and each residual Add + RMSNorm into
   SkipSimplifiedLayerNormalization;
3. each bias Add feeding a tanh-GELU (through a Reshape or not) becomes one com.microsoft
   FastGelu with that bias.

Attention stays as MatMul/Softmax: ONNX Runtime's CPU MultiHeadAttention takes no grouped
key/value heads and its GroupQueryAttention is causal-only, so neither fits the encoder's
padded bidirectional attention or the GQA cross-attention (docs/export.md has what this
costs). The variant is validated against the fp32 graphs on random prompts (logits within the
export's tolerance, identical greedy tokens), like the fp32 graphs against PyTorch.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

FUSED_OPS = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "FastGelu", "MultiHeadAttention",
             "GroupQueryAttention", "RotaryEmbedding", "MatMulNBits", "MatMulIntegerToFloat")


def fast_gelu_with_bias(model) -> int:
    """Add(x, bias) [-> Reshape] -> Gelu(approximate=tanh) becomes [Reshape(x) ->] com.microsoft
    FastGelu(., bias) when each intermediate feeds only the next node and `bias` is a 1-D
    constant (a Reshape of a Linear's output keeps its last dimension, so the bias still
    broadcasts). Returns the count."""
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    producer = {output: node for node in graph.node for output in node.output}
    readers = Counter(name for node in graph.node for name in node.input)
    replace, drop = {}, set()
    for node in graph.node:
        if node.op_type != "Gelu":
            continue
        approximate = {a.name: helper.get_attribute_value(a) for a in node.attribute}.get("approximate", b"none")
        reshape = producer.get(node.input[0])
        if reshape is not None and reshape.op_type == "Reshape" and readers[reshape.output[0]] == 1:
            add = producer.get(reshape.input[0])
        else:
            reshape, add = None, reshape
        if add is None or add.op_type != "Add" or approximate not in (b"tanh", "tanh") or readers[add.output[0]] != 1:
            continue
        x, bias = (add.input[0], add.input[1]) if add.input[1] in weights else (add.input[1], add.input[0])
        if bias not in weights or numpy_helper.to_array(weights[bias]).ndim != 1:
            continue
        if reshape is not None:
            reshape.input[0] = x  # reshape the product, then add the bias inside FastGelu
            x = reshape.output[0]
        drop.add(id(add))
        replace[id(node)] = helper.make_node("FastGelu", [x, bias], list(node.output), name=f"{node.name}_fast_gelu",
                                             domain="com.microsoft")
    kept = [replace.get(id(node), node) for node in graph.node if id(node) not in drop]
    del graph.node[:]
    graph.node.extend(kept)
    if replace and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(replace)


def optimize_ort(directory: Path, source: dict, prefix: str = "ort/") -> dict:
    """The optimized copies of the variant `source` under `prefix`, described like a quantized
    variant (slmctl_onnx.json), with the fused operators counted per graph."""
    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    from slmctl.export.quantize import _finish, _quiet_root_logger, _targets, gemm_as_matmul

    graphs = _targets(directory, source, prefix)
    fused = {}
    for role, (src, dst, graph) in graphs.items():
        model = onnx.load(str(src))
        gemm_as_matmul(model)
        options = FusionOptions("bert")
        options.enable_attention = False  # see the module docstring
        options.enable_embed_layer_norm = False
        # its BiasGelu fusion takes MatMul + Add + Gelu(approximate=tanh) and computes the erf GELU (logits off by
        # ~5e-4 on the tiny model); fast_gelu_with_bias below fuses the bias into FastGelu, the tanh GELU
        options.enable_bias_gelu = False
        with tempfile.TemporaryDirectory() as work, _quiet_root_logger():
            rewritten = Path(work) / "matmul.onnx"
            onnx.save(model, str(rewritten), save_as_external_data=True, location="matmul.onnx.data")
            # heads and width 0 (detect): only attention fusion reads them, and it is off
            optimized = optimize_model(str(rewritten), model_type="bert", num_heads=0, hidden_size=0,
                                       optimization_options=options, opt_level=0)
        fast_gelu_with_bias(optimized.model)
        optimized.topological_sort()
        optimized.save_model_to_file(str(dst), use_external_data_format=bool(graph.get("external_data")))
        counts = Counter(node.op_type for node in optimized.model.graph.node)
        fused[role] = {op: counts[op] for op in FUSED_OPS if counts[op]}
    return _finish(source, graphs, {"method": "onnxruntime-transformer-optimizer", "fused": fused}, check=False)
