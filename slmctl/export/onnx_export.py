"""Trace the graphs of `slmctl.export.graphs` to ONNX files and describe them in slmctl_onnx.json.

Uses torch's TorchScript-based exporter (`dynamo=False`): it traces shape arithmetic as
graph ops, so one decoder graph takes an empty cache on the first step and a growing one
after, and it needs no extra packages. Files are written under a temporary name, checked
with `onnx.checker` and renamed; graphs with over 256 MB of weights (every graph with
external_data=always, none with never; over 2 GB they must) keep them in one `<graph>.onnx.data`
file beside them, which ONNX Runtime memory-maps.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from slmctl.atomic import set_new_file_mode
from slmctl.export.fold import fold_reshapes
from slmctl.export.graphs import (DecoderGraph, DecoderOnlyGraph, EncoderGraph, InPlaceDecoderGraph, StaticDecoderGraph,
                                  VisionGraph)
from slmctl.model.config import ModelConfig

OPSET = 20
# external_data=auto: weights past this go to <graph>.onnx.data, which ONNX Runtime memory-maps instead of
# copying into the session (330m fp32: peak 1747 MB against 2576 MB with the weights inside; docs/export.md)
EXTERNAL_FROM = 256 * 2**20


def cache_names(cfg: ModelConfig) -> dict[str, list[str]]:
    layers = range(cfg.n_decoder_layers)
    names = {
        "past": [f"past_key_values.{i}.{kind}" for i in layers for kind in ("key", "value")],
        "present": [f"present.{i}.{kind}" for i in layers for kind in ("key", "value")],
    }
    if cfg.is_encoder_decoder:
        names["cross"] = [f"cross.{i}.{kind}" for i in layers for kind in ("key", "value")]
    return names


def variant_mb(variant: dict) -> float:
    """Megabytes on disk of a variant's graphs (with their external data)."""
    return sum(g["bytes"] for g in variant["graphs"].values()) / 1e6


def _io(name: str, shape: list, dtype: str = "float32") -> dict:
    return {"name": name, "shape": shape, "dtype": dtype}


def export_graphs(model, directory: Path, static: dict | None = None, external_data: str = "auto",
                  in_place: bool = False) -> dict:
    """Export `model` (eval, fp32, cpu) into `directory`; returns the variant's description:
    {"graphs": {role: {file, inputs, outputs}}, "cache_names": ..., "static": ...}. A vision model
    adds vision.onnx, and its encoder takes image_features. `in_place`: the dynamic encoder-decoder's
    decoder attends through ONNX Runtime's GroupQueryAttention over cache buffers it writes in place
    (`InPlaceDecoderGraph`, contract 3; its entry says "cache": "in_place")."""
    from slmctl.model.vlm import VisionEncoderDecoderLM

    vlm = model if isinstance(model, VisionEncoderDecoderLM) else None
    if vlm is not None:
        if static:
            from slmctl.errors import ConfigError

            raise ConfigError("--static is not available for vision models yet (their prompt length depends on the image)")
        model = vlm.text
    cfg = model.config
    names = cache_names(cfg)
    kv = [cfg.n_kv_heads, cfg.head_dim]
    graphs: dict[str, dict] = {}
    B = static["batch"] if static else "batch"
    if cfg.is_encoder_decoder:
        S = static["prompt_len"] if static else "encoder_sequence"
        cross_io = [_io(n, [B, kv[0], S, kv[1]]) for n in names["cross"]]
        example_len = static["prompt_len"] if static else 7
        ids = torch.randint(4, cfg.vocab_size, (2 if not static else static["batch"], example_len))
        mask = torch.ones_like(ids)
        encoder_inputs = [_io("input_ids", [B, S], "int64"), _io("attention_mask", [B, S], "int64")]
        encoder_outputs = [_io("encoder_hidden_states", [B, S, cfg.d_model]), *cross_io]
        encoder, encoder_args = EncoderGraph(model), (ids, mask)
        if vlm is not None:
            graphs["vision"] = _export_vision(vlm, directory / "vision.onnx", external_data)
            ids = ids.clone()
            ids[:, 1:3] = vlm.image_token_id
            encoder = EncoderGraph(model, vlm.image_token_id)
            encoder_args = (ids, mask, torch.randn(4, cfg.d_model))
            encoder_inputs.append(_io("image_features", ["image_tokens", cfg.d_model]))
        graphs["encoder"] = _export(encoder, encoder_args, directory / "encoder.onnx",
                                    encoder_inputs, encoder_outputs, static is None, external_data)
        with torch.no_grad():
            cross = encoder(*encoder_args)[1:]
        if static:
            C = static["capacity"]
            past = [torch.zeros(ids.shape[0], kv[0], C, kv[1]) for _ in names["past"]]
            inputs = [_io("input_ids", [B, 1], "int64"), _io("position", [1], "int64"),
                      _io("encoder_attention_mask", [B, S], "int64"), *[_io(n, [B, kv[0], C, kv[1]]) for n in names["past"]],
                      *cross_io]
            outputs = [_io("logits", [B, cfg.vocab_size]), *[_io(n, [B, kv[0], 1, kv[1]]) for n in names["present"]]]
            args = (ids[:, :1], torch.tensor([3]), mask, *past, *cross)
            graphs["decoder"] = _export(StaticDecoderGraph(model, C), args, directory / "decoder.onnx",
                                        inputs, outputs, False, external_data)
        elif in_place:
            past = [torch.zeros(ids.shape[0], kv[0], 6, kv[1]) for _ in names["past"]]
            buffers = [_io(n, [B, kv[0], "capacity", kv[1]]) for n in names["past"]]
            inputs = [_io("input_ids", [B, "decoder_sequence"], "int64"), _io("positions", [B], "int64"),
                      _io("encoder_attention_mask", [B, S], "int64"), *buffers, *cross_io]
            outputs = [_io("logits", [B, "decoder_sequence", cfg.vocab_size]),
                       *[dict(io, name=n) for io, n in zip(buffers, names["present"])]]
            args = (ids[:, :2], torch.tensor([3, 1]), mask, *past, *cross)
            graphs["decoder"] = _export(InPlaceDecoderGraph(model), args, directory / "decoder.onnx",
                                        inputs, outputs, True, external_data) | {"cache": "in_place"}
        else:
            past = [torch.zeros(ids.shape[0], kv[0], 3, kv[1]) for _ in names["past"]]
            inputs = [_io("input_ids", [B, "decoder_sequence"], "int64"), _io("positions", [B], "int64"),
                      _io("encoder_attention_mask", [B, S], "int64"),
                      *[_io(n, [B, kv[0], "past_sequence", kv[1]]) for n in names["past"]], *cross_io]
            outputs = [_io("logits", [B, "decoder_sequence", cfg.vocab_size]),
                       *[_io(n, [B, kv[0], "past_sequence + decoder_sequence", kv[1]]) for n in names["present"]]]
            args = (ids[:, :2], torch.tensor([3, 1]), mask, *past, *cross)
            graphs["decoder"] = _export(DecoderGraph(model), args, directory / "decoder.onnx",
                                        inputs, outputs, True, external_data)
    else:
        if static:
            from slmctl.errors import ConfigError

            raise ConfigError("--static exports the encoder-decoder; the decoder-only baseline exports dynamic graphs only")
        ids = torch.randint(4, cfg.vocab_size, (2, 2))
        past = [torch.zeros(2, kv[0], 3, kv[1]) for _ in names["past"]]
        mask = torch.ones(2, 5, dtype=torch.long)
        inputs = [_io("input_ids", [B, "sequence"], "int64"), _io("attention_mask", [B, "past_sequence + sequence"], "int64"),
                  *[_io(n, [B, kv[0], "past_sequence", kv[1]]) for n in names["past"]]]
        outputs = [_io("logits", [B, cfg.vocab_size]),
                   *[_io(n, [B, kv[0], "past_sequence + sequence", kv[1]]) for n in names["present"]]]
        graphs["decoder"] = _export(DecoderOnlyGraph(model), (ids, mask, *past), directory / "model.onnx",
                                    inputs, outputs, True, external_data)
    return {"graphs": graphs, "cache_names": names, "static": static}


def _export_vision(vlm, path: Path, external_data: str) -> dict:
    size = vlm.tower.image_size
    pixels = torch.rand(3, 3, size, size)
    with torch.no_grad():
        grid = tuple(VisionGraph(vlm)(pixels).shape[1:3])
    inputs = [_io("pixel_values", ["crops", 3, size, size])]
    outputs = [_io("image_tokens", ["crops", grid[0], grid[1], vlm.config.d_model])]
    graph = _export(VisionGraph(vlm), (pixels,), path, inputs, outputs, True, external_data)
    graph["vision"] = vlm.vision_config.to_dict() | {"tile": size, "image_token_id": vlm.image_token_id}
    return graph


def _dynamic_axes(entries: list[dict]) -> dict:
    axes = {}
    for entry in entries:
        named = {i: str(dim) for i, dim in enumerate(entry["shape"]) if isinstance(dim, str)}
        if named:
            axes[entry["name"]] = named
    return axes


def _name_transposed_weights(proto, graph: torch.nn.Module) -> None:
    """A 3-D linear is traced as MatMul(x, W^T), its W^T folded into an unnamed initializer
    (`onnx::MatMul_123`); give each the name of the weight it transposes plus `.T`, so whatever reads
    names (fp16's per-layer report, quantization exclusions) finds its layer."""
    import hashlib

    import numpy as np
    from onnx import numpy_helper

    def digest(array: np.ndarray) -> str:
        return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()

    unnamed = [t for t in proto.graph.initializer if t.name.startswith("onnx::MatMul") and len(t.dims) == 2]
    if not unnamed:
        return
    wanted = {(tuple(t.dims), digest(numpy_helper.to_array(t))): t for t in unnamed}
    renamed = {}
    for name, parameter in graph.named_parameters():
        if parameter.dim() == 2:
            key = (tuple(parameter.shape[::-1]), digest(parameter.detach().T.numpy()))
            tensor = wanted.pop(key, None)
            if tensor is not None:
                renamed[tensor.name] = tensor.name = f"{name}.T"
    for node in proto.graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]


def _export(graph: torch.nn.Module, args: tuple, path: Path, inputs: list[dict], outputs: list[dict], dynamic: bool,
            external_data: str) -> dict:
    import onnx

    graph.eval()
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    work = path.with_name(f".{path.name}.{os.getpid()}.trace")
    work.mkdir(parents=True, exist_ok=True)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
            torch.onnx.export(graph, args, str(work / "graph.onnx"), dynamo=False, opset_version=OPSET,
                              input_names=[i["name"] for i in inputs], output_names=[o["name"] for o in outputs],
                              dynamic_axes=_dynamic_axes(inputs + outputs) if dynamic else None,
                              do_constant_folding=True,
                              custom_opsets={"com.microsoft": 1} if isinstance(graph, InPlaceDecoderGraph) else None)
        proto = onnx.load(str(work / "graph.onnx"), load_external_data=True)
        _name_transposed_weights(proto, graph)
        if dynamic:
            fold_reshapes(proto)  # static graphs' targets are constants already
        size = sum(t.ByteSize() for t in proto.graph.initializer)
        external = external_data == "always" or (external_data == "auto" and size >= EXTERNAL_FROM)
        data_file = f"{path.name}.data"
        if external:
            onnx.save_model(proto, str(temporary), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_file, size_threshold=1024)
        else:
            onnx.save_model(proto, str(temporary))
        onnx.checker.check_model(str(temporary), full_check=True)
        if external:
            set_new_file_mode(path.parent / data_file)  # onnx writes it 0600
        os.replace(temporary, path)
    finally:
        for leftover in work.iterdir():
            leftover.unlink()
        work.rmdir()
        temporary.unlink(missing_ok=True)
    return {"file": path.name, "external_data": data_file if external else None, "inputs": inputs, "outputs": outputs,
            "bytes": path.stat().st_size + ((path.parent / data_file).stat().st_size if external else 0)}
