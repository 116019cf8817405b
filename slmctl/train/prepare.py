"""`slmctl prepare`: a corpus read once, tokenised on all cores, written as a token store.

    slmctl prepare data=files data.train='corpus/*.jsonl.zst'          # BPE trained on a sample
    slmctl prepare data=hub data.id=wikitext data.subset=wikitext-103-raw-v1 tokenizer=run tokenizer.path=...

`run(cfg, run)` chooses the tokenizer (a BPE trained on the first `tokenizer.max_training_texts`
rows, a run's, a Hugging Face one or the teacher's), records the lineage, and has
slmctl.data.prepare write the store into the run. Training stages open it with `open_prepared`.
"""

from __future__ import annotations

import time
from pathlib import Path

from slmctl.data.corpus import resolve_files
from slmctl.data.prepare import DATA_DIR, TOKENIZER_DIR, prepared_directory, sample_texts, tokenize_to_store
from slmctl.data.store import META_FILE, TokenStore
from slmctl.data.tokenizer import TextTokenizer, load_hf_tokenizer, train_bpe
from slmctl.errors import ConfigError
from slmctl.refs import record_source, resolve


def run(cfg, run):
    data = cfg.data
    if data.kind not in ("files", "hub"):
        raise ConfigError(f"prepare reads data=files or data=hub, not data={data.kind}")
    started = time.perf_counter()
    sources = _sources(cfg, run)
    tokenizer = _tokenizer(cfg, run, sources)
    directory = run.path / DATA_DIR
    if run.is_writer:
        tokenizer.save(directory / TOKENIZER_DIR)
    summary = tokenize_to_store(sources, cfg, tokenizer, directory, log=run.log)
    run.succeed({**summary, "seconds": round(time.perf_counter() - started, 2)})
    return run


def _sources(cfg, run) -> dict[str, object]:
    """{"train": what to read, "validation": what to read (only when given)}; lineage recorded."""
    data = cfg.data
    if data.kind == "files":
        found = {"train": resolve_files(data.train)}
        if data.validation is not None:
            found["validation"] = resolve_files(data.validation)
        for pattern in filter(None, (data.train, data.validation)):
            for file in resolve_files(pattern):
                record_source(run, file, role="corpus")
        return found
    record_source(run, data.id, role="corpus")
    found = {"train": ("hub", data.train_split)}
    if data.validation_split is not None:
        found["validation"] = ("hub", data.validation_split)
    return found


# -- the tokenizer ------------------------------------------------------------------------------


def _tokenizer(cfg, run, sources: dict) -> TextTokenizer:
    kind = cfg.tokenizer.kind
    if kind == "bpe":
        texts = sample_texts(sources, cfg, cfg.tokenizer.max_training_texts)
        run.log(f"training a {cfg.tokenizer.vocab_size}-token BPE tokenizer on the first {len(texts)} rows")
        return train_bpe(texts, cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency, cfg.tokenizer.n_sentinels)
    if kind == "run":
        return _run_tokenizer(cfg.tokenizer.path, run)
    if kind == "hf":
        record_source(run, cfg.tokenizer.path, role="tokenizer")
        return load_hf_tokenizer(cfg.tokenizer.path, cfg.tokenizer.n_sentinels)
    teacher = cfg.get("teacher")
    if teacher is None:
        raise ConfigError("tokenizer=teacher needs a teacher: add teacher=llama teacher.path=DIR (or teacher=run)")
    allow = ("model_dir",) if teacher.kind == "run" else ("model_dir", "hf_dir", "hub")
    ref = resolve(teacher.path, run.runs_dir, allow=allow, purpose="teacher.path")
    ref.record_input(run, role="teacher")
    if ref.kind == "model_dir":  # ours: already has sentinels and an image token
        return TextTokenizer.load(ref.path)
    return load_hf_tokenizer(teacher.tokenizer or ref.where, cfg.tokenizer.n_sentinels, teacher.trust_remote_code)


def _run_tokenizer(text: str, run) -> TextTokenizer:
    """tokenizer=run: a tokenizer directory, a prepare run (its data's tokenizer) or a model (run or directory)."""
    from slmctl.data.tokenizer import SPECIAL_FILE
    from slmctl.runs.lookup import RunError, resolve_run

    path = Path(text).expanduser()
    if not (path / SPECIAL_FILE).is_file():
        try:
            store = prepared_directory(resolve_run(text, run.runs_dir))
            path = store / TOKENIZER_DIR if (store / META_FILE).is_file() else path
        except RunError:
            pass
    if (path / SPECIAL_FILE).is_file():
        record_source(run, text, role="tokenizer", path=path)
        return TextTokenizer.load(path)
    source = resolve(text, run.runs_dir, allow=("model_dir", "hf_dir"), purpose="tokenizer=run")
    source.record_input(run, role="tokenizer")
    return TextTokenizer.load(source.path)


def open_prepared(path: str, run) -> TokenStore:
    """The token store `data.path` names (a prepare run or its data/ directory), checked against
    its run's MANIFEST and recorded as an input of `run`. A resumed run reopens the store it
    recorded, even when `path` (say prepare/latest) now names a newer one."""
    from slmctl.runs.lookup import RunError, resolve_run, verify_artifact

    recorded = [i["path"] for i in run.inputs() if i.get("role") == "data" and i.get("ref") == str(path)]
    directory = Path(recorded[0]) if recorded else Path(path).expanduser()
    if not directory.is_dir():
        try:
            directory = resolve_run(path, run.runs_dir)
        except RunError as e:
            raise ConfigError(f"data.path={path}: no prepared data there ({e})") from None
    directory = prepared_directory(directory)
    store = TokenStore.open(directory)
    verify_artifact(directory)
    record_source(run, path, role="data", path=directory)
    return store


def prepared_tokenizer(store: TokenStore, run) -> TextTokenizer:
    """The tokenizer the data was prepared with (saved into the run, so a resume reuses it)."""
    saved = run.path / TOKENIZER_DIR  # the training run's own copy
    if saved.is_dir():
        return TextTokenizer.load(saved)
    tokenizer = TextTokenizer.load(store.path / TOKENIZER_DIR)
    if run.is_writer:
        tokenizer.save(saved)
    return tokenizer
