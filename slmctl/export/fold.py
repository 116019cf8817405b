"""Reshape targets folded into constants: fewer nodes in every decode step.

The TorchScript exporter computes each `reshape(B, T, ...)` target from runtime shapes (Shape ->
Gather -> Unsqueeze -> Concat, per dimension), so a decoder layer carries ~150 nodes of shape
arithmetic that ONNX Runtime runs at every step; at 330m they took more of an int4 step than its
weight products (docs/export.md). ONNX Runtime's symbolic shape inference
(`onnxruntime.tools.symbolic_shape_infer`) names every dimension of every tensor. A Reshape whose
output dimensions are each a number, the same symbol as its input's dimension at that position
(ONNX's 0: copy it), or, at most once, another symbol (-1: inferred), gets that constant target;
the shape arithmetic no node reads any more is then dropped. The export's validation checks the
folded graphs against PyTorch like any other (every prompt length, the first step's empty cache).
"""

from __future__ import annotations


def _symbolic_shapes(model) -> dict[str, list]:
    """tensor name -> its dimensions (int, or the symbol's name; None where inference found none)."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    inferred = SymbolicShapeInference.infer_shapes(_without_weights(model), auto_merge=False)
    shapes = {}
    for info in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        shapes[info.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                             for d in info.type.tensor_type.shape.dim]
    return shapes


def _without_weights(model):
    """`model`'s graph with its weights as inputs of their shape (inference needs their dims, not
    their bytes); integer initializers, the shape constants, stay."""
    from onnx import TensorProto, helper

    constants, weights = [], []
    for tensor in model.graph.initializer:
        (constants if tensor.data_type in (TensorProto.INT64, TensorProto.INT32) else weights).append(tensor)
    inputs = [*model.graph.input, *(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in weights)]
    graph = helper.make_graph(list(model.graph.node), model.graph.name, inputs, list(model.graph.output), constants)
    return helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def _target(source: list, result: list) -> list[int] | None:
    """The constant Reshape target that turns `source` dims into `result` dims, or None."""
    if any(dim is None for dim in result):
        return None
    target = [dim if isinstance(dim, int) else 0 if j < len(source) and source[j] == dim else -1
              for j, dim in enumerate(result)]
    return target if target.count(-1) <= 1 else None


def fold_reshapes(model) -> int:
    """Fold every Reshape target `model` (an onnx ModelProto, changed in place) allows; drop the
    nodes and initializers nothing reads any more. Returns how many Reshapes were folded."""
    import numpy as np
    from onnx import helper, numpy_helper

    shapes = _symbolic_shapes(model)
    graph = model.graph
    constants = {tensor.name for tensor in graph.initializer}
    folded = []
    for node in graph.node:
        if node.op_type != "Reshape" or node.input[1] in constants:
            continue
        if any(a.name == "allowzero" and helper.get_attribute_value(a) for a in node.attribute):
            continue  # 0 would mean a zero-sized dimension there, not "copy"
        target = _target(shapes.get(node.input[0]) or [None], shapes.get(node.output[0]) or [None])
        if target is None:
            continue
        name = f"{node.output[0]}/folded_shape"
        folded.append(numpy_helper.from_array(np.array(target, dtype=np.int64), name))
        node.input[1] = name
    graph.initializer.extend(folded)
    needed = {output.name for output in graph.output}
    kept = []
    for node in reversed(graph.node):  # nodes are in topological order: walk back from the outputs
        if any(output in needed for output in node.output):
            kept.append(node)
            needed.update(name for name in node.input if name)
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)
    read = {name for node in kept for name in node.input}
    initializers = [tensor for tensor in graph.initializer if tensor.name in read]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    return len(folded)
