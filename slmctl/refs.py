"""One model reference: everything a user may type to name a model, parsed in one place.

    330m, deconly-tiny                      a preset (random weights)
    DIR holding model.json                  one of our model directories
    DIR from `slmctl export hf`             the same model in transformers' form (config.json, model_type slmctl)
    DIR holding config.json                 a Hugging Face save_pretrained directory
    a run: its directory, <stage>/latest,   the run's model/ (an export run's export/)
      runs/<stage>/latest, latest:<stage>
    EXPORT[:variant][@ep]                   an ONNX export (slmctl_onnx.json), e.g. runs/export/latest:int8, and
                                            the execution provider to run it on (runs/export/latest@openvino)
    FILE.pt                                 a reference-format checkpoint
    org/name                                a Hugging Face hub id (where the caller takes one)

`resolve` turns the text into a `ModelRef`, checked against its run's MANIFEST.json when it
lies in one. The reference then loads itself (PyTorch, ONNX Runtime or transformers) and
records itself as an input of the run that reads it. Importing this module needs no torch.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

from slmctl.errors import UserError, first_line
from slmctl.files import EXPORT_DIR, EXPORT_SPEC_FILE, HF_CONFIG_FILE, MODEL_CONFIG_FILE, MODEL_DIR, is_slmctl_transformers_dir
from slmctl.runs.lookup import LATEST, RunError, model_label, owning_run, resolve_run, verify_artifact

KINDS = ("preset", "model_dir", "hf_dir", "export", "reference_pt", "hub")
TORCH_KINDS = ("preset", "model_dir", "reference_pt")  # what `load_torch` loads
HF_KINDS = ("hf_dir", "hub")  # what `load_transformers` loads
DESCRIPTIONS = {
    "preset": "a preset (random weights)",
    "model_dir": f"a slmctl model directory ({MODEL_CONFIG_FILE})",
    "hf_dir": f"a Hugging Face model directory ({HF_CONFIG_FILE})",
    "export": f"an ONNX export ({EXPORT_SPEC_FILE})",
    "reference_pt": "a reference-format .pt checkpoint",
    "hub": "a Hugging Face hub id",
}
REFERENCE_SUFFIXES = (".pt", ".pth")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


# the ONNX Runtime execution providers an export reference may name (`export:int8@openvino`), by their short names
EXECUTION_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "dml": "DmlExecutionProvider",
    "vitisai": "VitisAIExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
}


class RefError(UserError, ValueError):
    """Text that names no model, or a model of a kind the caller cannot take (one line)."""


@dataclass(frozen=True)
class ModelRef:
    """A model as the user named it, resolved: what it is, where it lies, how to load it."""

    kind: str  # one of KINDS
    text: str  # as the user typed it
    path: Path | None = None  # the model directory, export directory or .pt file; None for a preset or hub id
    variant: str | None = None  # an export's graphs (fp32, int8, ...): the one asked for, else its default
    run_dir: Path | None = None  # the run the path lies in, if any
    ep: str | None = None  # an export's ONNX Runtime execution provider, when named (@openvino)

    @property
    def where(self) -> str:
        """What from_pretrained-style loaders take: the local path, else the hub id (or preset name)."""
        return str(self.path) if self.path is not None else self.text

    @property
    def label(self) -> str:
        """A short name for tables: the run's name (plus /control, :variant), the directory's, or the text."""
        if self.path is None:
            return self.text
        label = model_label(self.path)
        return f"{label}:{self.variant}{f'@{self.ep}' if self.ep else ''}" if self.kind == "export" else label

    def require(self, kinds: tuple[str, ...], purpose: str) -> ModelRef:
        """This reference, if it is one of `kinds`; else a one-line error saying what `purpose` takes."""
        if self.kind not in kinds:
            takes = ", ".join(DESCRIPTIONS[kind] for kind in kinds[:-1])
            takes = f"{takes} or {DESCRIPTIONS[kinds[-1]]}" if takes else DESCRIPTIONS[kinds[-1]]
            raise RefError(f"{self.text!r} is {DESCRIPTIONS[self.kind]}; {purpose} takes {takes}")
        return self

    # ---- loading --------------------------------------------------------------------------

    def load_torch(self, device="cpu", dtype=None, seed: int = 0, **config_overrides):
        """Our `LanguageModel`: a model directory's or a reference checkpoint's weights, or a
        preset with random weights (seeded)."""
        from slmctl.model import build_model, load_model

        self.require(TORCH_KINDS, "PyTorch loading")
        if self.kind == "preset":
            model = build_model(self.text, seed=seed, **config_overrides)
            return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device=device)
        return load_model(self.path, device=device, dtype=dtype, **config_overrides)

    def load_transformers(self, dtype="auto", trust_remote_code: bool = False, what: str = "model"):
        """A Hugging Face `AutoModelForCausalLM` from a save_pretrained directory or the hub
        (the distillation teacher, the judge, hf-causal runs). `what` names it in errors."""
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        self.require(HF_KINDS, "transformers")
        hf_logging.disable_progress_bar()  # our own progress display only
        try:
            return AutoModelForCausalLM.from_pretrained(self.where, dtype=dtype, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError, ImportError) as e:
            problem = first_line(e)
            if "Unrecognized configuration class" in problem:
                problem = "not a causal LM (AutoModelForCausalLM does not know its config class)"
            raise RefError(f"cannot load {what} {self.where!r}: {problem}") from None

    # ---- lineage --------------------------------------------------------------------------

    def record_input(self, run, role: str | None = None) -> None:
        """Record this model as an input of `run`: a preset, a hub id, or a path (in a run or not)."""
        if self.kind == "preset":
            run.add_input("preset", self.text, None, role=role)
        else:
            record_source(run, self.text, role, self.path)


def record_source(run, text: str, role: str | None = None, path: str | Path | None = None) -> None:
    """Lineage for anything read from disk or the hub (a model, a tokenizer, a vision tower): a
    run input when it lies in a run, a file input elsewhere on disk, else a hub input."""
    local = Path(path if path is not None else text).expanduser()
    if not local.exists():
        run.add_input("hub", text, text, role=role)
    else:
        run.add_input("run" if owning_run(local.resolve()) else "file", text, local, role=role)


# ---- resolving ------------------------------------------------------------------------------


def resolve(text: str | Path | ModelRef, runs_dir: str | Path = "runs", allow: tuple[str, ...] = KINDS,
            purpose: str = "this command") -> ModelRef:
    """The model `text` names, one of the kinds in `allow` (anything else is a one-line error
    saying what it is and what `purpose` takes), verified against its run's MANIFEST.json when
    it lies in a finished run. A `ModelRef` is returned as it is (checked for its kind only)."""
    if isinstance(text, ModelRef):
        return text.require(allow, purpose)
    ref = parse(text, runs_dir, hub="hub" in allow).require(allow, purpose)
    verify(ref)
    return ref


def parse(text: str | Path, runs_dir: str | Path, hub: bool = False) -> ModelRef:
    """What `text` names, unverified (an export with its variant named). With `hub`, text that is
    no preset, path or run but looks like `org/name` is a hub id; without, it is an error."""
    ref = _parse(str(text), Path(runs_dir), hub)
    return with_variant(ref) if ref.kind == "export" else ref


def _parse(text: str, runs_dir: Path, hub: bool) -> ModelRef:
    from slmctl.model.config import PRESETS  # here, not at the top: slmctl.model pulls in torch

    if text in PRESETS:
        return ModelRef("preset", text)
    base, _, ep = text.rpartition("@")
    if base and ep and "/" not in ep and not Path(text).exists():
        ref = _parse(base, runs_dir, hub=False)
        if ref.kind != "export" or ep not in EXECUTION_PROVIDERS:
            raise RefError(f"{text!r}: '@{ep}' names the execution provider of an ONNX export "
                           f"({', '.join(EXECUTION_PROVIDERS)}), e.g. runs/export/latest:int8@openvino")
        return replace(ref, text=text, ep=ep)
    base, _, variant = text.rpartition(":")
    if base and variant and "/" not in variant and base != LATEST and not Path(text).exists():
        ref = _parse(base, runs_dir, hub=False)
        if ref.kind != "export":
            raise RefError(f"{text!r}: ':{variant}' picks the graphs of an ONNX export, but {base!r} is "
                           f"{DESCRIPTIONS[ref.kind]}; drop ':{variant}' or name an export (runs/export/latest:{variant})")
        return replace(ref, text=text, variant=variant)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix not in REFERENCE_SUFFIXES:
            raise RefError(f"{text!r} is a file but not a reference-format .pt checkpoint; pass a model directory, "
                           f"a run (e.g. pretrain/latest) or a .pt file")
        path = path.resolve()
        return ModelRef("reference_pt", text, path, run_dir=owning_run(path))
    kind = directory_kind(path)
    if kind is not None:
        path = path.resolve()
        return ModelRef(kind, text, path, run_dir=owning_run(path))
    try:
        run_dir = resolve_run(text, runs_dir)
    except RunError as e:
        if hub and looks_like_hub_id(text, runs_dir):
            return ModelRef("hub", text)
        if looks_like_path(text) and not path.exists():
            raise RefError(f"no model at {text!r}: no such directory or file (pass a model directory, a run such as "
                           f"runs/pretrain/latest{', or a hub id' if hub else ''})") from None
        raise RefError(f"no model at {text!r}: not a model directory (no {MODEL_CONFIG_FILE}), not a file, "
                       f"and not a run ({e})") from None
    return in_run(text, run_dir)


def in_run(text: str, run_dir: Path) -> ModelRef:
    """The model a run holds: its model/ (an export run: its export/)."""
    for directory in (run_dir / MODEL_DIR, run_dir / EXPORT_DIR):
        kind = directory_kind(directory)
        if kind is not None:
            return ModelRef(kind, text, directory, run_dir=run_dir)
    raise RefError(f"run {run_dir} has no model ({run_dir / MODEL_DIR / MODEL_CONFIG_FILE} is missing); "
                   f"pass a run of a stage that writes one, e.g. pretrain/latest")


def directory_kind(path: Path) -> str | None:
    """model_dir, export or hf_dir by the file that describes the directory; None for anything else.
    A `slmctl export hf` directory is one of our models (in transformers' form): a model_dir."""
    if is_slmctl_transformers_dir(path):
        return "model_dir"
    for name, kind in ((MODEL_CONFIG_FILE, "model_dir"), (EXPORT_SPEC_FILE, "export"), (HF_CONFIG_FILE, "hf_dir")):
        if (path / name).is_file():
            return kind
    return None


def looks_like_path(text: str) -> bool:
    return text.startswith(("/", ".", "~")) or text.count("/") > 1


def looks_like_hub_id(text: str, runs_dir: Path) -> bool:
    """`name` or `org/name`, and not a run form (`<stage>/latest`, `latest:<stage>`, `<stage>/<run>`)."""
    if looks_like_path(text) or not HUB_ID.fullmatch(text):
        return False
    parts = text.split("/")
    return LATEST not in parts and not (len(parts) == 2 and (runs_dir / parts[0]).is_dir())


# ---- exports and verifying ------------------------------------------------------------------


def export_spec(ref: ModelRef) -> dict:
    """The export's slmctl_onnx.json."""
    spec_file = ref.path / EXPORT_SPEC_FILE
    try:
        spec = json.loads(spec_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RefError(f"{spec_file} is unreadable ({first_line(e)}); export the model again") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("variants"), dict) or "default_variant" not in spec:
        raise RefError(f"{spec_file} describes no graphs (no variants); export the model again")
    return spec


def with_variant(ref: ModelRef) -> ModelRef:
    """The export with its variant named: the one asked for (checked to exist), else the default."""
    spec = export_spec(ref)
    variant = ref.variant or spec["default_variant"]
    if variant not in spec["variants"]:
        raise RefError(f"{ref.text!r}: the export has no {variant!r} graphs (it has: {', '.join(spec['variants'])})")
    return replace(ref, variant=variant)


def verify(ref: ModelRef) -> None:
    """Refuse a model whose files changed since its run finished (runs.verify_artifact). An
    export is checked for its spec and its variant's graphs only, not every variant's."""
    if ref.path is None:
        return
    if ref.kind != "export":
        verify_artifact(ref.path)
        return
    verify_artifact(ref.path / EXPORT_SPEC_FILE)
    for graph in export_spec(ref)["variants"][ref.variant]["graphs"].values():
        for file in (graph["file"], graph.get("external_data")):
            if file:
                verify_artifact(ref.path / file)
