"""ONNX Runtime generation for exported models, behind the same `generate()` as PyTorch.

`OnnxLM` loads an export directory (slmctl_onnx.json + graphs) and provides what
`slmctl.model.generation.generate` needs: `config`, `start_decoding()` and sessions with
`first_logits()`, `step(tokens)` and `reorder(index)`. So greedy, sampling, beam search,
stopping rules and streaming are the torch code, and only the forward passes run in ORT.

IO binding keeps the caches as ORT values: each step's `present` outputs are bound as the
next step's `past` inputs without a round trip through numpy; cross-attention keys/values
are computed once per prompt and stay bound. A contract-3 decoder's caches are preallocated
buffers (`InPlaceCache`) bound as both its past inputs and its present outputs, so a step writes
only its new positions. The static variant keeps one preallocated
cache per layer whose numpy buffer ORT reads in place; each step writes only the new
position.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from slmctl.errors import UserError
from slmctl.files import EXPORT_SPEC_FILE
from slmctl.model.config import ModelConfig

SPEC_FILE = EXPORT_SPEC_FILE  # slmctl_onnx.json
# The export contract's version (slmctl_onnx.json "version"; docs/export.md lists them): it changes whenever
# a graph's inputs or outputs change, and this reader runs every version written before it.
#   1  the first graphs; exports since 2026-12-02 also give the decoder a `positions` input (told apart by name)
#   2  the dynamic encoder-decoder's decoder returns every new token's logits [B, T, vocab] (drafts checked in one pass)
#   3  that decoder may instead take cache buffers of a fixed capacity that it writes in place (its graph entry says
#      "cache": "in_place"; ONNX Runtime's GroupQueryAttention, `slmctl.export.graphs.InPlaceDecoderGraph`)
CONTRACT_VERSION = 3


class OnnxExportError(UserError, ValueError):
    """An export directory that cannot be run (one line, names the problem)."""


def read_spec(directory: str | Path) -> dict:
    path = Path(directory) / SPEC_FILE
    if not path.is_file():
        raise OnnxExportError(f"{directory} is not an ONNX export (no {SPEC_FILE}); make one with `slmctl export onnx MODEL`")
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise OnnxExportError(f"{path}: not valid JSON ({e.msg})") from None
    version = spec.get("version", 1) if isinstance(spec, dict) else None
    if not isinstance(version, int) or version > CONTRACT_VERSION:
        raise OnnxExportError(f"{path}: export contract version {version!r}, this slmctl reads 1 to {CONTRACT_VERSION}: "
                              f"upgrade slmctl, or export the model again with this one")
    return spec


def every_position_logits(graph: dict) -> bool:
    """Whether a decoder graph (its slmctl_onnx.json entry) returns logits for every new token
    (contract 2: [B, T, vocab]) rather than the last one's ([B, vocab])."""
    logits = next((o for o in graph["outputs"] if o["name"] == "logits"), None)
    return logits is not None and len(logits["shape"]) == 3


def check_graph(path: Path, session, graph: dict) -> None:
    """Refuse a graph whose inputs and outputs are not the ones slmctl_onnx.json describes
    (names, and every fixed dimension): a graph copied in from another model or export."""
    for kind, described, actual in (("input", graph["inputs"], session.get_inputs()),
                                    ("output", graph["outputs"], session.get_outputs())):
        found = {a.name: a.shape for a in actual}
        for entry in described:
            shape = found.get(entry["name"])
            if shape is None:
                problem = f"has no {kind} {entry['name']}"
            elif len(shape) != len(entry["shape"]) or any(
                    isinstance(want, int) and want != got for want, got in zip(entry["shape"], shape)):
                problem = f"{kind} {entry['name']} has shape {list(shape)}, {SPEC_FILE} says {entry['shape']}"
            else:
                continue
            raise OnnxExportError(f"{path} is not the graph {SPEC_FILE} describes: it {problem} "
                                  f"(a graph from another model?); export the model again")


class OnnxLM:
    """An exported model on ONNX Runtime; `generate()` as `LanguageModel.generate`. Stages open
    one through slmctl.refs and `open_export` below, which first checks the files against their
    run's manifest."""

    training = False
    recorder: dict | None = None  # role -> list of input dicts, while calibrating
    image_features = None  # the image tokens of the generation in progress (vision exports)
    device = torch.device("cpu")  # where input and output tensors live (ORT copies to its device)
    dtype = torch.float32

    def __init__(self, directory: str | Path, device: str = "cpu", threads: int | None = None, variant: str | None = None,
                 spec: dict | None = None, ep: str | None = None, allow_fallback: bool = False, prepacking: bool = True):
        """`ep`: the execution provider (slmctl.runtime.providers; None: --device picks); on an NPU a
        graph with nodes falling back to CPU is refused unless `allow_fallback`. `prepacking=False`:
        ONNX Runtime keeps no packed second copy of the weights (less memory; docs/export.md)."""
        import onnxruntime as ort

        from slmctl.runtime.providers import check_fallback, placement, provider_name, providers_for

        started = time.perf_counter()
        self.directory = Path(directory)
        self.spec = spec if spec is not None else read_spec(directory)
        self.config = ModelConfig.from_dict(self.spec["model"])
        self.variant = variant or self.spec["default_variant"]
        if self.variant not in self.spec["variants"]:
            raise OnnxExportError(f"{directory}: no {self.variant!r} graphs (has: {', '.join(self.spec['variants'])})")
        self.graphs = self.spec["variants"][self.variant]
        options = _options(threads, spinning=True, prepacking=prepacking)
        providers = providers_for(device, ep)
        self.provider = provider_name(providers)
        self.output_device = "cuda" if device == "cuda" else "cpu"
        self.sessions = {}
        for role, graph in self.graphs["graphs"].items():
            path = self.directory / graph["file"]
            if not path.is_file():
                raise OnnxExportError(f"{path} is missing from the export")
            role_options = options
            if role in ("encoder", "vision"):  # run once per prompt: their threads must not spin on while the decoder runs
                role_options = _options(threads, spinning=False, prepacking=prepacking)
            self.sessions[role] = ort.InferenceSession(str(path), role_options, providers=providers)
            check_graph(path, self.sessions[role], graph)
        self.placement = {role: placement(session, self.provider) for role, session in self.sessions.items()}
        check_fallback(self.placement, device, allow_fallback)
        self.output_names = {role: [o.name for o in session.get_outputs()] for role, session in self.sessions.items()}
        self.load_s = time.perf_counter() - started

    @property
    def is_static(self) -> bool:
        return bool(self.graphs.get("static"))

    def num_parameters(self) -> int:
        return int(self.spec["parameters"])

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def start_decoding(self, input_ids, attention_mask, max_new_tokens):
        if not self.config.is_encoder_decoder:
            return DecoderOnlyOnnxSession(self, input_ids, attention_mask, max_new_tokens)
        if self.is_static:
            return StaticOnnxSession(self, input_ids, attention_mask, max_new_tokens)
        return EncoderDecoderOnnxSession(self, input_ids, attention_mask, max_new_tokens)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, images=None,
                 **kwargs) -> torch.Tensor:
        """New token ids [B, T_new]; `images[b]`: row b's PIL images for a vision export."""
        from slmctl.model.generation import generate

        if self.is_vision:
            input_ids, attention_mask, self.image_features = self.prepare_images(
                input_ids, attention_mask, images or [[] for _ in range(input_ids.shape[0])])
        elif images and any(images):
            raise OnnxExportError(f"{self.directory} has no vision graph: images need an export of an add-vision model")
        try:
            with torch.inference_mode():
                return generate(self, input_ids, attention_mask=attention_mask, **kwargs).clone()
        finally:
            self.image_features = None

    @property
    def is_vision(self) -> bool:
        return "vision" in self.sessions

    @property
    def image_token_id(self) -> int | None:
        return self.graphs["graphs"]["vision"]["vision"]["image_token_id"] if self.is_vision else None

    def prepare_images(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, images: list[list]):
        """(input_ids with each <image> placeholder repeated once per image token, its mask, the
        image tokens of the batch in order [M, d_model]): vision.onnx on every crop, then each
        image's tiles assembled and capped as the torch model does (`slmctl.model.vlm`)."""
        from slmctl.model.vision import VisionConfig
        from slmctl.model.vlm import arrange_images, crop_images

        meta = self.graphs["graphs"]["vision"]["vision"]
        cfg = VisionConfig.from_dict({k: v for k, v in meta.items() if k not in ("tile", "image_token_id")})
        image_id = self.image_token_id
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        flat_images = [image for row in images for image in row]
        tokens = []
        if flat_images:
            pixels, layout = crop_images(flat_images, cfg, meta["tile"])
            maps = torch.from_numpy(self.run("vision", {"pixel_values": pixels.numpy()})[0].numpy())
            tokens = arrange_images(maps, layout, cfg.max_tokens_per_image)
        rows, flat, k = [], [], 0
        for b in range(input_ids.shape[0]):
            ids = input_ids[b][mask[b].bool()].tolist()
            expanded = []
            for token in ids:
                if token == image_id:
                    if k >= len(tokens) or b >= len(images):
                        raise OnnxExportError(f"prompt {b} has more <image> placeholders than images")
                    expanded += [image_id] * tokens[k].shape[0]
                    flat.append(tokens[k])
                    k += 1
                else:
                    expanded.append(token)
            rows.append(expanded)
        if k != len(tokens):
            raise OnnxExportError(f"{len(tokens)} images for {k} <image> placeholders")
        width = max(len(r) for r in rows)
        new_ids = torch.full((len(rows), width), self.config.pad_token_id, dtype=torch.long)
        new_mask = torch.zeros_like(new_ids)
        for b, row in enumerate(rows):
            new_ids[b, :len(row)], new_mask[b, :len(row)] = torch.tensor(row, dtype=torch.long), 1
        features = torch.cat(flat) if flat else torch.zeros(1, self.config.d_model)  # never empty: a Gather needs a row
        return new_ids, new_mask, features.float().numpy()

    # -- running one graph ---------------------------------------------------------

    def input_names(self, role: str) -> list[str]:
        return [i.name for i in self.sessions[role].get_inputs()]

    @property
    def in_place(self) -> bool:
        """Whether the decoder writes its cache buffers in place (contract 3: `InPlaceCache`)."""
        return self.graphs["graphs"].get("decoder", {}).get("cache") == "in_place"

    def run(self, role: str, inputs: dict, into: dict | None = None) -> list:
        """Run graph `role` with numpy arrays or OrtValues; outputs stay ORT values (IO binding), and
        those named in `into` are written into the OrtValues given there."""
        import onnxruntime as ort

        session = self.sessions[role]
        if self.recorder is not None:  # calibration for static quantization
            self.recorder[role].append({k: (v if isinstance(v, np.ndarray) else v.numpy()).copy() for k, v in inputs.items()})
        binding = session.io_binding()
        for name, value in inputs.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.output_names[role]:
            if into and name in into:
                binding.bind_ortvalue_output(name, into[name])
            else:
                binding.bind_output(name, self.output_device)
        session.run_with_iobinding(binding)
        return binding.get_outputs()

    def empty_cache(self, batch: int, length: int) -> list[np.ndarray]:
        cfg = self.config
        shape = (batch, cfg.n_kv_heads, length, cfg.head_dim)
        dtype = np.dtype(self.graphs.get("cache_dtype", "float32"))  # the fp16 variant keeps fp16 caches
        return [np.zeros(shape, dtype=dtype) for _ in range(2 * cfg.n_decoder_layers)]


class InPlaceCache:
    """The self-attention cache of a contract-3 decoder: per layer a key and a value buffer [rows, KV,
    capacity, d] that ONNX Runtime reads and writes in place (each present output bound to its past
    input's memory), so a step writes only its new positions where a growing cache is copied whole.
    Which positions of a row are real is the caller's to track (the decoder's `positions` input)."""

    def __init__(self, lm: OnnxLM, rows: int, capacity: int):
        cfg = lm.config
        dtype = np.dtype(lm.graphs.get("cache_dtype", "float32"))
        shape = (rows, cfg.n_kv_heads, capacity, cfg.head_dim)
        self.lm, self.names = lm, lm.graphs["cache_names"]
        self.buffers = [np.zeros(shape, dtype=dtype) for _ in self.names["past"]]
        self._views: dict[int, list] = {}  # row count -> OrtValues over the first rows (made once: ~7 us each)

    @property
    def capacity(self) -> int:
        return self.buffers[0].shape[2]

    def reorder(self, rows: np.ndarray) -> None:
        self.buffers = [np.ascontiguousarray(b[rows]) for b in self.buffers]
        self._views.clear()

    def _values(self, rows: slice) -> list:
        import onnxruntime as ort

        if rows.start:  # a single row past the first: not worth keeping
            return [ort.OrtValue.ortvalue_from_numpy(b[rows]) for b in self.buffers]
        if rows.stop not in self._views:
            self._views[rows.stop] = [ort.OrtValue.ortvalue_from_numpy(b[rows]) for b in self.buffers]
        return self._views[rows.stop]

    def decode(self, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray, cross: list) -> torch.Tensor:
        """Logits [n, T, vocab] of T new tokens per row [n, T] at `positions` [n] (tokens each of the
        first n rows has cached), over cross K/V `cross` [n, ...] per layer. ONNX Runtime takes T > 1
        new tokens over a cache only at batch 1, so such a pass at n > 1 runs row by row."""
        n, T = ids.shape
        if int(positions.max()) + T > self.capacity:
            raise ValueError(f"KV cache overflow: {int(positions.max()) + T} positions > capacity {self.capacity}")
        if T > 1 and n > 1:
            cross = _numpy(cross)
            return torch.cat([self._decode(slice(b, b + 1), ids[b:b + 1], positions[b:b + 1], mask[b:b + 1],
                                           [c[b:b + 1] for c in cross]) for b in range(n)])
        return self._decode(slice(0, n), ids, positions, mask, cross)

    def _decode(self, rows: slice, ids, positions, mask, cross) -> torch.Tensor:
        values = self._values(rows)
        inputs = {"input_ids": ids, "positions": positions, "encoder_attention_mask": mask}
        inputs.update(zip(self.names["past"], values))
        inputs.update(zip(self.names["cross"], cross))
        return _logits(self.lm.run("decoder", inputs, into=dict(zip(self.names["present"], values)))[0])


def _options(threads: int | None, spinning: bool, prepacking: bool = True):
    """Session options: full graph optimisation, `threads` intra-op threads; `spinning=False` lets the
    threads sleep as soon as a run ends (measured at 330m: the first decoder step after the encoder
    took 57-63 ms with the encoder's threads still spinning, 48-58 ms without)."""
    import onnxruntime as ort

    from slmctl.runtime.providers import record_assignment

    options = ort.SessionOptions()
    record_assignment(options)
    if threads:
        options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not prepacking:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options


def _logits(value) -> torch.Tensor:
    return torch.from_numpy(value.numpy())


def _numpy(values) -> list[np.ndarray]:
    return [v if isinstance(v, np.ndarray) else v.numpy() for v in values]


def _mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> np.ndarray:
    if attention_mask is None:
        return np.ones(tuple(input_ids.shape), dtype=np.int64)
    return attention_mask.cpu().numpy().astype(np.int64)


def _ids(tokens: torch.Tensor) -> np.ndarray:
    return tokens.cpu().numpy().astype(np.int64)


class EncoderDecoderOnnxSession:
    """Encoder once (cross K/V per layer kept bound), then the decoder graph one token a step."""

    def __init__(self, lm: OnnxLM, input_ids, attention_mask, max_new_tokens: int):
        self.lm = lm
        self.mask = _mask(input_ids, attention_mask)
        inputs = {"input_ids": _ids(input_ids), "attention_mask": self.mask}
        if lm.is_vision:
            inputs["image_features"] = lm.image_features if lm.image_features is not None else np.zeros(
                (1, lm.config.d_model), dtype=np.float32)
        outputs = lm.run("encoder", inputs)
        self.cross = outputs[1:]
        self.batch_size = input_ids.shape[0]
        # contract 3: buffers for every position a generation of max_new_tokens feeds (the start token, then each
        # token but the last; a drafted pass is clipped to that too); else a cache grown each step
        self.buffers = InPlaceCache(lm, self.batch_size, max_new_tokens + 1) if lm.in_place else None
        self.cache = None if lm.in_place else lm.empty_cache(input_ids.shape[0], 0)
        self.names = lm.graphs["cache_names"]
        self.length = 0  # tokens cached, the same for every row
        # exports since 2026-12-02 take each row's position (slmctl serve's continuous batching); older ones do not
        self.positions = "positions" in lm.input_names("decoder")
        self.every_position = every_position_logits(lm.graphs["graphs"]["decoder"])  # contract 2

    def first_logits(self) -> torch.Tensor:
        bos = torch.full((self.batch_size,), self.lm.config.bos_token_id, dtype=torch.long)
        return self.step(bos)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self._run(_ids(tokens)[:, None])
        return logits[:, -1] if self.every_position else logits

    def verify(self, tokens: torch.Tensor) -> torch.Tensor:
        """T tokens per row [B, T] in one decoder call (the last chosen token, then drafted ones);
        logits [B, T, vocab]. Needs a contract-2 decoder (every new token's logits)."""
        if not self.every_position:
            raise OnnxExportError(f"{self.lm.directory}: this export's decoder returns only the last token's logits; "
                                  f"export the model again to check drafts")
        return self._run(_ids(tokens))

    @property
    def cached(self) -> int:
        return self.length

    def cut(self, length: int) -> None:
        """Keep the first `length` cached positions (drop drafted tokens the model did not keep)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot cut a cache of {self.length} positions to {length}")
        if length < self.length and self.buffers is None:  # in place, positions past the length are never read
            self.cache = [np.ascontiguousarray(c[:, :, :length]) for c in _numpy(self.cache)]
        self.length = length

    def _run(self, ids: np.ndarray) -> torch.Tensor:
        if self.buffers is not None:
            positions = np.full(self.batch_size, self.length, dtype=np.int64)
            logits = self.buffers.decode(ids, positions, self.mask, self.cross)
            self.length += ids.shape[1]
            return logits
        inputs = {"input_ids": ids, "encoder_attention_mask": self.mask}
        if self.positions:
            inputs["positions"] = np.full(self.batch_size, self.length, dtype=np.int64)
        inputs.update(zip(self.names["past"], self.cache))
        inputs.update(zip(self.names["cross"], self.cross))
        outputs = self.lm.run("decoder", inputs)
        self.cache = outputs[1:]
        self.length += ids.shape[1]
        return _logits(outputs[0])

    def reorder(self, index: torch.Tensor) -> None:
        rows = index.cpu().numpy()
        if self.buffers is not None:
            self.buffers.reorder(rows)
        else:
            self.cache = [c[rows] for c in _numpy(self.cache)]
        self.cross = [c[rows] for c in _numpy(self.cross)]
        self.mask = self.mask[rows]
        self.batch_size = len(rows)


class StaticOnnxSession(EncoderDecoderOnnxSession):
    """Fixed shapes: the prompt is right-padded to the exported length, the cache is a
    preallocated [B, KV, capacity, d] buffer per layer that ORT reads in place."""

    def __init__(self, lm: OnnxLM, input_ids, attention_mask, max_new_tokens: int):
        static = lm.graphs["static"]
        B, S = input_ids.shape
        if B != static["batch"] or S > static["prompt_len"] or max_new_tokens > static["capacity"]:
            raise OnnxExportError(f"static graphs take batch {static['batch']}, prompts up to {static['prompt_len']} tokens "
                                  f"and {static['capacity']} new tokens; got batch {B}, prompt {S}, {max_new_tokens} new tokens")
        padded = np.full((B, static["prompt_len"]), lm.config.pad_token_id, dtype=np.int64)
        padded[:, :S] = _ids(input_ids)
        mask = np.zeros_like(padded)
        mask[:, :S] = _mask(input_ids, attention_mask)
        self.lm, self.mask, self.batch_size = lm, mask, B
        self.cross = lm.run("encoder", {"input_ids": padded, "attention_mask": mask})[1:]
        self.cache = lm.empty_cache(B, static["capacity"])
        self.position = 0
        self.names = lm.graphs["cache_names"]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.position >= self.cache[0].shape[2]:
            raise OnnxExportError(f"static cache full ({self.cache[0].shape[2]} positions)")
        inputs = {"input_ids": _ids(tokens)[:, None], "position": np.array([self.position], dtype=np.int64),
                  "encoder_attention_mask": self.mask}
        inputs.update(zip(self.names["past"], self.cache))
        inputs.update(zip(self.names["cross"], self.cross))
        outputs = self.lm.run("decoder", inputs)
        for buffer, new in zip(self.cache, outputs[1:]):
            buffer[:, :, self.position] = new.numpy()[:, :, 0]
        self.position += 1
        return _logits(outputs[0])

    def reorder(self, index: torch.Tensor) -> None:
        rows = index.cpu().numpy()
        if len(rows) != self.batch_size:
            raise OnnxExportError("static graphs have a fixed batch: beam search needs the dynamic export (without --static)")
        self.cache = [np.ascontiguousarray(c[rows]) for c in self.cache]
        self.cross = [c[rows] for c in _numpy(self.cross)]
        self.mask = self.mask[rows]
        self.batch_size = len(rows)


class DecoderOnlyOnnxSession:
    """Prompts left-aligned (as the torch session does), prefill through the same graph as steps."""

    def __init__(self, lm: OnnxLM, input_ids, attention_mask, max_new_tokens: int):
        from slmctl.model.deconly import left_align

        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        input_ids, mask = left_align(input_ids, mask)
        self.lm, self.prompt = lm, _ids(input_ids)
        self.mask = _mask(input_ids, mask)
        self.cache = lm.empty_cache(input_ids.shape[0], 0)
        self.names = lm.graphs["cache_names"]

    def _run(self, ids: np.ndarray) -> torch.Tensor:
        inputs = {"input_ids": ids, "attention_mask": self.mask}
        inputs.update(zip(self.names["past"], self.cache))
        outputs = self.lm.run("decoder", inputs)
        self.cache = outputs[1:]
        return _logits(outputs[0])

    def first_logits(self) -> torch.Tensor:
        return self._run(self.prompt)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = np.concatenate([self.mask, np.ones((self.mask.shape[0], 1), dtype=np.int64)], axis=1)
        return self._run(_ids(tokens)[:, None])

    def reorder(self, index: torch.Tensor) -> None:
        rows = index.cpu().numpy()
        self.cache = [c[rows] for c in _numpy(self.cache)]
        self.mask = self.mask[rows]


def open_export(ref, device: str = "cpu", threads: int | None = None, ep: str | None = None, allow_fallback: bool = False,
                prepacking: bool = True) -> OnnxLM:
    """The export's `variant` graphs on ONNX Runtime (`OnnxLM`, generate() as in PyTorch), on
    execution provider `ep` (None: the one the reference names, else the device's). `ref` is an
    export's ModelRef (slmctl.refs.resolve), already checked against its run's manifest."""
    ref.require(("export",), "ONNX Runtime")
    return OnnxLM(ref.path, device=device, threads=threads, variant=ref.variant, ep=ep or ref.ep,
                  allow_fallback=allow_fallback, prepacking=prepacking)
