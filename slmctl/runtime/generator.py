"""Text in, text out: load any model artifact (ours or a Hugging Face causal LM) with its
tokenizer and stream generated text. Used by `slmctl generate` and the recipes."""

from __future__ import annotations

import json

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from slmctl.data.tokenizer import TextTokenizer
from slmctl.errors import first_line
from slmctl.refs import ModelRef, resolve


@dataclass
class Generator:
    model: torch.nn.Module
    tokenizer: TextTokenizer
    kind: str  # "encdec" | "deconly" | "hf-causal"
    path: Path
    ref: ModelRef | None = None  # what the user named (for lineage and labels)


GENERATE_KINDS = ("model_dir", "hf_dir", "export")  # each carries its tokenizer


def load_generator(ref: str | Path | ModelRef, runs_dir: str | Path = "runs", device: str = "cpu", runtime: str = "auto",
                   threads: int | None = None, ep: str | None = None, allow_fallback: bool = False,
                   dtype: str = "float32") -> Generator:
    """`runtime` auto: ONNX Runtime for an export (`slmctl export onnx`, `EXPORT:int8` for a
    variant), PyTorch for the rest, except an fp32 model directory on a CPU where ONNX Runtime runs
    it faster (slmctl.runtime.routes: from an export of it made once); onnx: that export always.
    `dtype` (float32, bfloat16, float16) is what PyTorch computes in; on the CPU its products may
    run on prepacked weights (slmctl.runtime.prepacked)."""
    from slmctl.errors import ConfigError
    from slmctl.runtime.routes import onnx_route

    model_ref = resolve(ref, runs_dir, allow=GENERATE_KINDS, purpose="generation")
    if dtype != "float32" and (model_ref.kind == "export" or runtime == "onnx"):
        raise ConfigError(f"{ref}: --dtype {dtype} is PyTorch's; an ONNX export keeps the precision it was exported in "
                          f"(slmctl export onnx --quantize / --dtype)")
    exported = onnx_route(model_ref, runs_dir, runtime, device) if ep is None and dtype == "float32" else None
    if runtime == "onnx" and model_ref.kind != "export" and exported is None:
        raise ConfigError(f"{ref}: --runtime onnx runs ONNX exports and model directories; make one with `slmctl export onnx {ref}`")
    if runtime == "torch" and model_ref.kind == "export":
        raise ConfigError(f"{ref} is an ONNX export; --runtime torch runs model directories and runs (or use --runtime onnx)")
    if ep is not None and model_ref.kind != "export":
        raise ConfigError(f"{ref}: --ep picks an ONNX Runtime execution provider for an export; "
                          f"make one with `slmctl export onnx {ref}`")
    tokenizer = TextTokenizer.load(model_ref.path)
    if exported is not None or model_ref.kind == "export":
        from slmctl.runtime.onnx import open_export

        model = open_export(exported or model_ref, device=device, threads=threads, ep=ep, allow_fallback=allow_fallback)
    elif model_ref.kind == "hf_dir":  # a Hugging Face causal LM (e.g. a pretrain run of model=hf-causal)
        model = model_ref.load_transformers(dtype=getattr(torch, dtype)).to(device).eval()
        return Generator(model, tokenizer, "hf-causal", model_ref.path, model_ref)
    else:
        model = model_ref.load_torch(device=device, dtype=getattr(torch, dtype)).eval()
        if device == "cpu":  # quietly, like the choice of BLAS kernel: bench records it
            from slmctl.runtime.prepacked import pack_for_inference

            pack_for_inference(model)
    return Generator(model, tokenizer, "encdec" if model.config.is_encoder_decoder else "deconly", model_ref.path, model_ref)


def prompt_ids(generator: Generator, text: str) -> list[int]:
    """Encoder input for an encoder-decoder; BOS + text for decoder-only models."""
    ids = generator.tokenizer.encode(text)
    return ids if generator.kind == "encdec" else [generator.tokenizer.bos_id, *ids]


def generate_text(generator: Generator, text: str, on_piece: Callable[[str], None] | None = None,
                  max_new_tokens: int = 64, num_beams: int = 1, temperature: float = 0.0, top_p: float = 1.0,
                  seed: int = 0, images: list | None = None, drafter=None) -> str:
    """The generated text; `on_piece` receives it as it is produced (whole, for beam search).
    `images` (PIL) go to a vision model, one per <image> placeholder (prepended when the prompt has none).
    `drafter` (slmctl.model.drafting): drafted tokens checked several per decoder pass, same text."""
    tokenizer = generator.tokenizer
    if drafter is not None:
        check_drafting(generator, num_beams)
    sampling = {"do_sample": temperature > 0, **({"temperature": temperature, "top_p": top_p} if temperature > 0 else {})}
    if images:
        from slmctl.model.vlm import VisionEncoderDecoderLM

        if not (isinstance(generator.model, VisionEncoderDecoderLM) or getattr(generator.model, "is_vision", False)):
            from slmctl.errors import ConfigError

            raise ConfigError(f"{generator.path} has no vision tower: images need a model from `slmctl add-vision`")
        if "<image>" not in text:
            text = "<image>\n" * len(images) + text
        vision = {"images": [images]}
    else:
        vision = {}
    ids = torch.tensor([prompt_ids(generator, text)], device=generator.model.device)
    if generator.kind == "hf-causal" or num_beams > 1:
        if generator.kind == "hf-causal":
            out = generator.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                           num_beams=num_beams, pad_token_id=tokenizer.pad_id,
                                           eos_token_id=tokenizer.eos_id, **sampling)[0, ids.shape[1]:]
        else:
            out = generator.model.generate(ids, max_new_tokens=max_new_tokens, num_beams=num_beams, **vision)[0]
        result = tokenizer.decode(out.tolist())
        if on_piece:
            on_piece(result)
        return result
    new: list[int] = []
    shown = ""

    def on_token(token: torch.Tensor) -> None:
        nonlocal shown
        new.append(int(token[0]))
        so_far = tokenizer.decode(new)
        if on_piece and so_far.startswith(shown) and not so_far.endswith("\ufffd"):  # whole characters only
            on_piece(so_far[len(shown):])
            shown = so_far

    torch_generator = torch.Generator(device=ids.device).manual_seed(seed) if temperature > 0 else None
    drafting = {"drafter": drafter} if drafter is not None else {}
    generator.model.generate(ids, max_new_tokens=max_new_tokens, streamer=on_token, generator=torch_generator,
                             **sampling, **vision, **drafting)
    result = tokenizer.decode(new)
    if on_piece and result.startswith(shown) and len(result) > len(shown):
        on_piece(result[len(shown):])
    return result


def open_drafter(name: str, tokens: int, target: Generator, runs_dir: str | Path = "runs", device: str = "cpu", *,
                 ngram: int):
    """The drafter `--draft NAME` names for `target`: None (none), prompt lookup (prompt; n-grams up to `ngram`), or a draft
    model (a model directory, run or export, on the runtime `--runtime auto` picks for it) that shares the
    target's tokenizer; else a one-line error."""
    from slmctl.errors import ConfigError
    from slmctl.model.drafting import DraftModel, make_drafter

    if name in ("none", "prompt"):
        return make_drafter(name, tokens, ngram)
    if tokens < 1:
        raise ConfigError(f"--draft-tokens must be >= 1, got {tokens}")
    draft = load_generator(name, runs_dir, device)  # on the runtime this CPU runs it fastest (slmctl.runtime.routes)
    check_draft_model(name, draft, target)
    return DraftModel(draft.model, max_tokens=tokens, label=f"model {name}")


def check_draft_model(name: str, draft: Generator, target: Generator) -> None:
    """A draft model must be an encoder-decoder with the target's token ids (one-line error otherwise)."""
    from slmctl.errors import ConfigError

    if draft.kind != "encdec":
        raise ConfigError(f"draft model {name} is a {draft.kind} model: a draft model must be an encoder-decoder")
    if not _same_tokenizer(draft.tokenizer, target.tokenizer):
        raise ConfigError(f"draft model {name} has another tokenizer than {target.path}: drafts must use the same token ids")


def _same_tokenizer(a: TextTokenizer, b: TextTokenizer) -> bool:
    return a.kind == b.kind and a.special_tokens == b.special_tokens and a.backend.to_str() == b.backend.to_str()


def check_drafting(generator: Generator, num_beams: int) -> None:
    """Drafted decoding needs one row per prompt and a multi-token verification pass: PyTorch
    encoder-decoders (vision ones included) and dynamic ONNX exports of contract 2 have it;
    anything else is a one-line error."""
    from slmctl.errors import ConfigError

    if num_beams > 1:
        raise ConfigError("--draft decodes one hypothesis per prompt: drop --num-beams or --draft")
    if generator.kind != "encdec":
        raise ConfigError(f"{generator.path} is a {generator.kind} model: --draft works on encoder-decoders")
    graphs = getattr(generator.model, "graphs", None)  # an ONNX export
    if graphs is not None:
        from slmctl.runtime.onnx import every_position_logits

        if graphs.get("static"):
            raise ConfigError(f"{generator.path} is a --static export (one token a step): --draft needs the dynamic export")
        if not every_position_logits(graphs["graphs"]["decoder"]):
            raise ConfigError(f"{generator.path}: this export's decoder returns only the last token's logits (export "
                              f"contract 1); export the model again (`slmctl export onnx MODEL`) to use --draft")


def read_image(path: Path):
    """An image file as RGB (PIL), or a one-line error naming it."""
    from PIL import Image, UnidentifiedImageError

    from slmctl.errors import ConfigError

    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise ConfigError(f"image {path} cannot be read ({first_line(e)})") from None


def read_prompt_file(path: Path) -> list[str]:
    """The prompts of a jsonl file: each line an object with a 'prompt' (or 'source') string."""
    from slmctl.errors import ConfigError

    if not path.is_file():
        raise ConfigError(f"no such prompt file: {path}")
    texts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        text = record.get("prompt", record.get("source")) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise ConfigError(f"{path}:{number}: expected an object with a 'prompt' (or 'source') string")
        texts.append(text)
    return texts
