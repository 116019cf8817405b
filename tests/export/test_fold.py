"""Reshape targets folded to constants (slmctl.export.fold): fewer nodes, the same results for every
shape the graph takes."""

import numpy as np
import onnx
import onnxruntime as ort
import torch

from slmctl.export.fold import fold_reshapes


class Heads(torch.nn.Module):
    """[B, T, 12] -> heads [B, 3, T, 4] (foldable: B and T copied, 3 and 4 constants), then the
    heads flattened back over B * T rows and unflattened to [B, T, 12] (two unknowns: not foldable)."""

    def forward(self, x):
        B, T, _ = x.shape
        heads = x.reshape(B, T, 3, 4).transpose(1, 2) * 2.0
        rows = heads.transpose(1, 2).reshape(B * T, 12) + 1.0
        return heads, rows.reshape(B, T, 12)


def test_folded_reshapes_compute_the_same_for_every_shape_with_fewer_nodes(tmp_path):
    path = tmp_path / "heads.onnx"
    torch.onnx.export(Heads(), (torch.randn(2, 5, 12),), str(path), dynamo=False, opset_version=20, input_names=["x"],
                      output_names=["heads", "back"], dynamic_axes={"x": {0: "batch", 1: "sequence"}})
    model = onnx.load(str(path))
    before = len(model.graph.node)
    assert fold_reshapes(model) == 2  # the first two; the last has two unknown dimensions
    onnx.checker.check_model(model, full_check=True)
    constants = {t.name for t in model.graph.initializer}
    reshapes = [n for n in model.graph.node if n.op_type == "Reshape"]
    assert sum(n.input[1] in constants for n in reshapes) == 2 and len(reshapes) == 3
    assert len(model.graph.node) < before - 4  # the first reshape's shape arithmetic is gone
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    folded = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for shape in ((1, 1, 12), (3, 7, 12), (2, 5, 12)):
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        for a, b in zip(plain.run(None, {"x": x}), folded.run(None, {"x": x})):
            np.testing.assert_array_equal(a, b)
