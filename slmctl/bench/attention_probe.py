"""What one fused self-attention node per layer would cost a decode step (issue 32's next lever).

The exported decoder attends over its caches with ~20 small nodes a layer (Concat of the cache,
Transpose, Reshape, two MatMuls, Softmax), about 2 ms of an int8 step at 330m. ONNX Runtime's
GroupQueryAttention (com.microsoft) does a layer's attention in one node, and writes the new key and
value into the cache in place when its past and present are the same buffer (IO binding). This
times `layers` such nodes at a cache of `cache` positions, both ways: present a fresh copy of past
plus the new token (what a graph without buffer sharing does), and one buffer shared in place.

    python -m slmctl.bench.attention_probe --heads 6 --kv-heads 3 --head-dim 64 --layers 10 --cache 512
"""

from __future__ import annotations

import argparse

import numpy as np

from slmctl.bench.kernels import median_seconds


def gqa_graph(heads: int, kv_heads: int, head_dim: int, layers: int) -> bytes:
    """`layers` GroupQueryAttention nodes reading one token's q, k, v and each its own past (any length)."""
    from onnx import TensorProto, helper

    def tensor(name, dtype, shape):
        return helper.make_tensor_value_info(name, dtype, shape)

    inputs = [tensor("q", TensorProto.FLOAT, [1, 1, heads * head_dim]), tensor("k", TensorProto.FLOAT, [1, 1, kv_heads * head_dim]),
              tensor("v", TensorProto.FLOAT, [1, 1, kv_heads * head_dim]), tensor("seqlens_k", TensorProto.INT32, [1]),
              tensor("total", TensorProto.INT32, [])]
    nodes, outputs = [], []
    for layer in range(layers):
        past = [f"past_key_{layer}", f"past_value_{layer}"]
        inputs += [tensor(name, TensorProto.FLOAT, [1, kv_heads, "past", head_dim]) for name in past]
        present = [f"attention_{layer}", f"present_key_{layer}", f"present_value_{layer}"]
        nodes.append(helper.make_node("GroupQueryAttention", ["q", "k", "v", *past, "seqlens_k", "total"], present,
                                      domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads))
        outputs += [tensor(name, TensorProto.FLOAT, None) for name in present]
    model = helper.make_model(helper.make_graph(nodes, "gqa", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString()


def probe(heads: int, kv_heads: int, head_dim: int, layers: int, cache: int, capacity: int, threads: int = 2,
          calls: int = 50) -> dict:
    """Median ms of one step's `layers` attention nodes: copying the caches, and sharing one buffer in place;
    and whether the in-place run wrote the new key at position `cache` (each layer's buffer checked)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(gqa_graph(heads, kv_heads, head_dim, layers), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    token = {"q": rng.standard_normal((1, 1, heads * head_dim), np.float32),
             "k": rng.standard_normal((1, 1, kv_heads * head_dim), np.float32),
             "v": rng.standard_normal((1, 1, kv_heads * head_dim), np.float32),
             "seqlens_k": np.array([cache], np.int32), "total": np.array(cache + 1, np.int32)}
    caches = {f"past_{kind}_{layer}": rng.standard_normal((1, kv_heads, cache, head_dim), np.float32)
              for layer in range(layers) for kind in ("key", "value")}

    def median_ms(run) -> float:
        return median_seconds(run, calls)[0] * 1e3

    copying = median_ms(lambda: session.run(None, {**token, **caches}))
    binding, buffers = session.io_binding(), {}
    for name, value in token.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value))
    for layer in range(layers):
        for kind in ("key", "value"):
            data = np.zeros((1, kv_heads, capacity, head_dim), np.float32)
            data[:, :, :cache] = caches[f"past_{kind}_{layer}"]
            buffers[kind, layer] = ort.OrtValue.ortvalue_from_numpy(data)
            binding.bind_ortvalue_input(f"past_{kind}_{layer}", buffers[kind, layer])
            binding.bind_ortvalue_output(f"present_{kind}_{layer}", buffers[kind, layer])
        binding.bind_output(f"attention_{layer}")
    in_place = median_ms(lambda: session.run_with_iobinding(binding))
    # the same attention either way (the buffers' rows past `cache` are zeros the node must not read)
    copied = session.run([f"attention_{layer}" for layer in range(layers)], {**token, **caches})
    shared = binding.get_outputs()[2::3]  # bound per layer: present key, present value, attention
    difference = max(float(np.abs(a - b.numpy()).max()) for a, b in zip(copied, shared))
    written = all(np.allclose(buffers["key", layer].numpy()[0, :, cache], token["k"].reshape(kv_heads, head_dim))
                  for layer in range(layers))
    return {"layers": layers, "cache": cache, "copying_ms": copying, "in_place_ms": in_place, "written_in_place": written,
            "max_difference": difference}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m slmctl.bench.attention_probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--cache", type=int, default=512, help="positions already cached")
    parser.add_argument("--capacity", type=int, default=640, help="the shared buffer's positions")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    result = probe(args.heads, args.kv_heads, args.head_dim, args.layers, args.cache, args.capacity, args.threads)
    print(f"{result['layers']} GroupQueryAttention layers at a {result['cache']}-position cache: {result['copying_ms']:.3f} ms "
          f"copying the caches, {result['in_place_ms']:.3f} ms in place (new key written in place: {result['written_in_place']})")
    return result


if __name__ == "__main__":
    main()
