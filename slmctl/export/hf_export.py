"""`slmctl export hf`: a directory the Hugging Face ecosystem loads, checked against slmctl.

`run(cfg, run)` writes into `<run>/export/`:

    config.json               SlmctlConfig (model.json's fields), auto_map, the text2text pipeline
    model.safetensors         the weights, under slmctl's own parameter names
    modeling_slmctl.py        the model code (torch + transformers only; trust_remote_code=True)
    generation_config.json    decoder start, special ids and the model's decoding defaults
    tokenizer.json, tokenizer_config.json, special_tokens_map.json
                              a PreTrainedTokenizerFast that encodes a prompt as slmctl feeds it
                              to the model (decoder-only: BOS first) and decodes as slmctl does
    slmctl_tokenizer.json     which token plays which role (slmctl reads the directory back)
    README.md                 the model card, from the run's lineage and the evals of the model

Validation is a gate, as for ONNX: the directory is loaded back with transformers' Auto classes
and decoded greedily beside slmctl on random padded batches; a logit difference over the
tolerance, a differing greedy token or a tokenizer that encodes or decodes differently fails
the run (exit 1).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from slmctl.errors import ConfigError
from slmctl.export.validate import ValidationFailed, compare_decoding, random_batch
from slmctl.files import EXPORT_DIR

SEQ2SEQ_PIPELINE = {"impl": "modeling_slmctl.Text2TextGenerationPipeline", "pt": ["AutoModelForSeq2SeqLM"], "tf": [],
                    "type": "text"}
TOKENIZER_SAMPLES = ("Where does Tobrin live?", "  two leading spaces, and unicode: café ü 東京", "x", "")


def run(cfg, run):
    from slmctl.export.source import load_source

    if cfg.quantize or cfg.static.enabled:
        raise ConfigError("quantize and static shapes are for `slmctl export onnx`; `slmctl export hf` writes fp32 weights")
    model, source = load_source(cfg, run)
    model, vision_note = text_model(model)
    if vision_note:
        run.log(vision_note)
    tokenizer = load_tokenizer(source)
    out = run.path / EXPORT_DIR
    out.mkdir(exist_ok=True)
    save_transformers(model, out, source)
    if tokenizer is not None:
        save_tokenizer(tokenizer, out, model.config)
    report = validate(model, tokenizer, out, cfg.validation)
    run.write_json("validation.json", report)
    if not report["passed"]:
        raise ValidationFailed(failure(report))
    run.log(f"transformers loads {out} and computes what slmctl computes: max |logit diff| "
            f"{report['max_abs_logit_diff']:.2e}, identical greedy tokens" + (", identical tokenizer" if tokenizer else ""))
    from slmctl.export.model_card import write_model_card

    write_model_card(out, model, source, tokenizer, run, vision_note)
    run.succeed({"format": "transformers", "architecture": auto_class(model.config), "parameters": model.num_parameters(),
                 "max_abs_logit_diff": f"{report['max_abs_logit_diff']:.2e}", "greedy_identical": report["greedy_identical"],
                 "tokenizer_identical": report.get("tokenizer", {}).get("identical")})
    return run


def text_model(model):
    """(the text model, a one-line note or None): a vision model's tower is not exported."""
    from slmctl.model.vlm import VisionEncoderDecoderLM

    if isinstance(model, VisionEncoderDecoderLM):
        return model.text, ("vision is not included: the export holds the text encoder-decoder only "
                            "(images need slmctl or `slmctl export onnx`)")
    return model, None


def load_tokenizer(source: Path | None):
    from slmctl.data.tokenizer import TextTokenizer

    if source is None or not ((source / "tokenizer.json").is_file() or (source / "tokenizer_config.json").is_file()):
        return None
    return TextTokenizer.load(source)


def auto_class(config) -> str:
    return "AutoModelForSeq2SeqLM" if config.is_encoder_decoder else "AutoModelForCausalLM"


def modeling_module():
    """The modeling file as a module (it imports no slmctl, so this is what transformers will run)."""
    from slmctl.export import modeling_slmctl

    return modeling_slmctl


def to_transformers(model):
    """The transformers model holding `model`'s weights: the same parameter names and the very same
    tensors (shared, not copied: a 1B model is not held twice while it is written)."""
    modeling = modeling_module()
    config = modeling.SlmctlConfig(**dataclasses.asdict(model.config))
    cls = modeling.SlmctlForConditionalGeneration if model.config.is_encoder_decoder else modeling.SlmctlForCausalLM
    with torch.device("meta"):
        hf_model = cls(config)
    hf_model.load_state_dict(model.state_dict(), strict=True, assign=True)
    return hf_model.eval()


def save_transformers(model, out: Path, source: Path | None) -> None:
    """config.json (+ auto_map), model.safetensors, generation_config.json and modeling_slmctl.py."""
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress display only
    modeling = modeling_module()
    hf_model = to_transformers(model)
    c = model.config
    modeling.SlmctlConfig.register_for_auto_class()
    type(hf_model).register_for_auto_class(auto_class(c))
    if c.is_encoder_decoder:
        hf_model.config.custom_pipelines = {"text2text-generation": SEQ2SEQ_PIPELINE}
    hf_model.generation_config = GenerationConfig(**generation_defaults(c, source))
    hf_model.save_pretrained(str(out))


def generation_defaults(c, source: Path | None) -> dict:
    """transformers' generation settings from the model's generation.json (greedy unless it says)."""
    saved = {}
    if source is not None and (source / "generation.json").is_file():
        saved = json.loads((source / "generation.json").read_text(encoding="utf-8"))
    settings = {"bos_token_id": c.bos_token_id, "eos_token_id": saved.get("eos_token_id") or c.eos_token_id,
                "pad_token_id": saved.get("pad_token_id", c.pad_token_id)}
    if settings["pad_token_id"] is None:
        settings["pad_token_id"] = c.pad_token_id
    if c.is_encoder_decoder:
        settings["decoder_start_token_id"] = c.bos_token_id
    for key in ("max_new_tokens", "num_beams", "length_penalty", "repetition_penalty", "do_sample"):
        if key in saved:
            settings[key] = saved[key]
    if saved.get("do_sample"):
        settings |= {k: saved[k] for k in ("temperature", "top_p") if k in saved}
        settings["top_k"] = saved.get("top_k") or None
    return settings


# ---- tokenizer ------------------------------------------------------------------------------


def save_tokenizer(tokenizer, out: Path, c) -> None:
    """A PreTrainedTokenizerFast whose `tokenizer(text)` gives the ids slmctl feeds the model for
    `text` (the encoder reads the text's ids; a decoder-only model reads BOS first) and whose
    decode is slmctl's; plus slmctl's record of the special tokens."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    from slmctl.atomic import atomic_write_text
    from slmctl.data.tokenizer import SPECIAL_FILE, strip_prefix_space

    rust = Tokenizer.from_str(tokenizer.rust_tokenizer.to_str())
    if tokenizer.kind == "bpe":
        strip_prefix_space(rust)
    bos = tokenizer.special_tokens["bos"]
    if c.is_encoder_decoder:
        rust.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    else:
        rust.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                            special_tokens=[(bos, tokenizer.bos_id)])
    unk = getattr(tokenizer.backend, "unk_token", None)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=rust, bos_token=bos, eos_token=tokenizer.special_tokens["eos"],
        pad_token=tokenizer.special_tokens["pad"], **({"unk_token": unk} if unk else {}),
        additional_special_tokens=[tokenizer.special_tokens["image"], *tokenizer.sentinel_tokens],
        model_max_length=c.max_seq_len, padding_side="right" if c.is_encoder_decoder else "left",
        clean_up_tokenization_spaces=bool(getattr(tokenizer.backend, "clean_up_tokenization_spaces", False)))
    fast.save_pretrained(str(out))
    record = {"kind": "bpe" if tokenizer.kind == "bpe" else "hf", **tokenizer.special_tokens,
              "sentinels": tokenizer.sentinel_tokens}
    atomic_write_text(out / SPECIAL_FILE, json.dumps(record, indent=2) + "\n")


def prompt_ids(tokenizer, c, text: str) -> list[int]:
    """What slmctl feeds the model for `text` (slmctl.runtime.generator.prompt_ids)."""
    ids = tokenizer.encode(text)
    return ids if c.is_encoder_decoder else [tokenizer.bos_id, *ids]


def compare_tokenizers(tokenizer, hf_tokenizer, c, texts) -> dict:
    """Does AutoTokenizer encode each text to slmctl's prompt ids and decode them to slmctl's text?"""
    differences = []
    for text in texts:
        ours, theirs = prompt_ids(tokenizer, c, text), hf_tokenizer(text)["input_ids"]
        if ours != theirs:
            differences.append({"text": text, "slmctl": ours, "transformers": theirs})
            continue
        ours_text, theirs_text = tokenizer.decode(ours), hf_tokenizer.decode(theirs, skip_special_tokens=True)
        if ours_text != theirs_text:
            differences.append({"text": text, "slmctl": ours_text, "transformers": theirs_text})
    return {"identical": not differences, "texts": len(texts), "differences": differences[:5]}


# ---- validation -----------------------------------------------------------------------------


class TransformersDecoding:
    """A transformers model behind slmctl's decoding-session interface (first_logits, step), with
    transformers' own cache classes, so `compare_decoding` can lead both models token by token."""

    def __init__(self, hf_model, input_ids, attention_mask):
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        self.model, self.mask = hf_model, attention_mask
        c = hf_model.config
        if c.is_encoder_decoder:
            self.cache = EncoderDecoderCache(DynamicCache(config=c), DynamicCache(config=c))
            self.encoder_outputs = hf_model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask)
            self.prompt = torch.full((input_ids.shape[0], 1), c.decoder_start_token_id, dtype=torch.long)
        else:
            self.cache = DynamicCache(config=c)
            self.prompt = input_ids

    def _logits(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.model.config.is_encoder_decoder:
            out = self.model(attention_mask=self.mask, decoder_input_ids=tokens, encoder_outputs=self.encoder_outputs,
                             cache=self.cache, use_cache=True)
        else:
            out = self.model(input_ids=tokens, attention_mask=self.mask, cache=self.cache, use_cache=True)
        return out.logits[:, -1]

    def first_logits(self) -> torch.Tensor:
        return self._logits(self.prompt)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.model.config.is_encoder_decoder:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        return self._logits(tokens[:, None])


class LoadedBack:
    """The exported directory as transformers loads it, with slmctl's `start_decoding`."""

    def __init__(self, hf_model):
        self.model = hf_model

    def start_decoding(self, input_ids, attention_mask, max_new_tokens):
        return TransformersDecoding(self.model, input_ids, attention_mask)


def load_back(out: Path, c):
    """The directory through transformers' Auto classes, as a user would load it."""
    import transformers

    auto = getattr(transformers, auto_class(c))
    return auto.from_pretrained(str(out), trust_remote_code=True, dtype=torch.float32).eval()


@torch.inference_mode()
def validate(model, tokenizer, out: Path, settings) -> dict:
    """Greedy decoding of random padded batches led by slmctl, read by the loaded-back model (every
    step's logits compared), and the tokenizer on sample texts. `passed` needs all three to agree."""
    c = model.config
    seed = settings.seed if settings.seed is not None else int.from_bytes(os.urandom(4), "little")
    generator = torch.Generator().manual_seed(seed)
    loaded = LoadedBack(load_back(out, c))
    cases = []
    for length in [int(n) for n in settings.prompt_lens]:
        ids, mask = random_batch(c, settings.batch, length, generator, "right" if c.is_encoder_decoder else "left")
        result = compare_decoding(model, loaded, ids, mask, settings.steps)
        cases.append({"prompt_len": length, "batch": settings.batch, "steps": settings.steps,
                      "max_abs_logit_diff": result["max_abs_logit_diff"], "greedy_identical": result["greedy_identical"],
                      "first_divergence": result["first_divergence"]})
    worst = max(case["max_abs_logit_diff"] for case in cases)
    identical = all(case["greedy_identical"] for case in cases)
    report = {"passed": worst <= settings.tolerance and identical, "max_abs_logit_diff": worst,
              "tolerance": settings.tolerance, "greedy_identical": identical, "seed": seed, "cases": cases}
    if tokenizer is not None:
        from transformers import AutoTokenizer

        report["tokenizer"] = compare_tokenizers(tokenizer, AutoTokenizer.from_pretrained(str(out), trust_remote_code=True), c,
                                                 TOKENIZER_SAMPLES)
        report["passed"] = report["passed"] and report["tokenizer"]["identical"]
    return report


def failure(report: dict) -> str:
    problems = []
    if report["max_abs_logit_diff"] > report["tolerance"]:
        problems.append(f"max |logit diff| {report['max_abs_logit_diff']:.3g} > tolerance {report['tolerance']:g}")
    diverged = [case["prompt_len"] for case in report["cases"] if not case["greedy_identical"]]
    if diverged:
        problems.append(f"greedy tokens differ for prompt lengths {diverged}")
    tokenizer = report.get("tokenizer")
    if tokenizer and not tokenizer["identical"]:
        first = tokenizer["differences"][0]
        problems.append(f"AutoTokenizer differs on {first['text']!r}: {first['transformers']!r} vs slmctl {first['slmctl']!r}")
    return "transformers export failed validation: " + "; ".join(problems)
