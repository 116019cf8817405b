"""Tokenizers: train a byte-level BPE on the training text, or load a Hugging Face tokenizer.

Both are wrapped in `TextTokenizer`, which every stage uses: `encode`/`decode` without
special tokens, the special ids (pad, bos, eos, the image placeholder, T5-style sentinels)
and `save(directory)`. A trained BPE is stored as one `tokenizer.json`; a Hugging Face
tokenizer is stored with its own files (`save_pretrained`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from slmctl.errors import UserError, first_line

PAD, BOS, EOS, IMAGE = "<pad>", "<s>", "</s>", "<image>"
SENTINEL = "<extra_id_{}>"
SPECIAL_FILE = "slmctl_tokenizer.json"  # our record of which tokens play which role


class TokenizerError(UserError, ValueError):
    """A tokenizer that cannot be built or loaded (one-line message)."""


class TextTokenizer:
    """A `tokenizers.Tokenizer` or a Hugging Face tokenizer behind one small interface."""

    def __init__(self, backend, kind: str, pad: str, bos: str, eos: str, image: str, sentinels: list[str]):
        self.backend, self.kind = backend, kind
        self.special_tokens = {"pad": pad, "bos": bos, "eos": eos, "image": image}
        self.sentinel_tokens = sentinels
        ids = {role: self._token_id(token) for role, token in self.special_tokens.items()}
        missing = [f"{role} ({token!r})" for role, token in self.special_tokens.items() if ids[role] is None]
        if missing:
            raise TokenizerError(f"tokenizer has no {', '.join(missing)} token")
        self.pad_id, self.bos_id, self.eos_id, self.image_id = ids["pad"], ids["bos"], ids["eos"], ids["image"]
        self.sentinel_ids = [self._token_id(t) for t in sentinels]

    # -- ids -----------------------------------------------------------------

    def _token_id(self, token: str) -> int | None:
        if self.kind == "bpe":
            return self.backend.token_to_id(token)
        token_id = self.backend.convert_tokens_to_ids(token)
        unk = getattr(self.backend, "unk_token_id", None)
        return None if token_id is None or (token_id == unk and token != self.backend.unk_token) else token_id

    def __len__(self) -> int:
        if self.kind == "bpe":
            return self.backend.get_vocab_size(with_added_tokens=True)
        return len(self.backend)

    def vocab(self) -> dict[str, int]:
        """Every token (added ones too) and its id."""
        if self.kind == "bpe":
            return self.backend.get_vocab(with_added_tokens=True)
        return self.backend.get_vocab()

    def start_ids(self) -> list[int]:
        """The ids a model of this tokenizer expects before a text: what a Hugging Face tokenizer
        adds at the start (Llama's <s>, nothing for Qwen); our own BPE's bos."""
        if self.kind == "bpe":
            return [self.bos_id]
        return list(self.backend("", add_special_tokens=True)["input_ids"])

    @property
    def special_ids(self) -> dict[str, int]:
        return {"pad_token_id": self.pad_id, "bos_token_id": self.bos_id, "eos_token_id": self.eos_id}

    # -- text <-> ids --------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without any special token added."""
        if self.kind == "bpe":
            return self.backend.encode(text, add_special_tokens=False).ids
        return self.backend.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of many texts, spread over every core by the tokenizers library (its
        `encode_batch_fast` where it has one: ids without character offsets, measured faster)."""
        if self.kind == "bpe":
            encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
            return [e.ids for e in encode(texts, add_special_tokens=False)]
        return self.backend(texts, add_special_tokens=False)["input_ids"]

    @property
    def rust_tokenizer(self):
        """The `tokenizers.Tokenizer` underneath (ours, or a Hugging Face fast tokenizer's), or None:
        bulk encoders call it from a thread, since it releases the GIL while it encodes."""
        return self.backend if self.kind == "bpe" else getattr(self.backend, "_tokenizer", None)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # -- files ---------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        from slmctl.atomic import atomic_write_text

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.kind == "bpe":
            atomic_write_text(directory / "tokenizer.json", self.backend.to_str())
        else:
            self.backend.save_pretrained(str(directory))
        record = {"kind": self.kind, **self.special_tokens, "sentinels": self.sentinel_tokens}
        atomic_write_text(directory / SPECIAL_FILE, json.dumps(record, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "TextTokenizer":
        """A tokenizer saved by `save` (or any Hugging Face tokenizer directory). In a model
        directory, its files are first checked against the directory's checksums.json."""
        from slmctl.integrity import verify_checksums

        directory = Path(directory)
        verify_checksums(directory, skip_weights=True)
        record_path = directory / SPECIAL_FILE
        if record_path.is_file():
            record = json.loads(record_path.read_text())
            if record["kind"] == "bpe":
                from tokenizers import Tokenizer

                backend = strip_prefix_space(Tokenizer.from_file(str(directory / "tokenizer.json")))
            else:
                backend = _auto_tokenizer(str(directory))
            return cls(backend, record["kind"], record["pad"], record["bos"], record["eos"], record["image"],
                       record["sentinels"])
        return load_hf_tokenizer(str(directory))


def train_bpe(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2, n_sentinels: int = 32) -> TextTokenizer:
    """A byte-level BPE trained on `texts`, with pad/bos/eos/image and `n_sentinels` sentinels
    as the first ids (pad = 0, bos = 1, eos = 2, image = 3)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    sentinels = [SENTINEL.format(i) for i in range(n_sentinels)]
    specials = [PAD, BOS, EOS, IMAGE, *sentinels]
    if vocab_size < len(specials) + 256:
        raise TokenizerError(f"tokenizer.vocab_size={vocab_size} is too small: byte-level BPE needs at least "
                             f"{len(specials) + 256} (256 bytes + {len(specials)} special tokens)")
    tokenizer = Tokenizer(models.BPE())
    # A prefix space makes a word the same token at the start of a text as inside one, so an
    # answer ("Tobrin") is the very token the context holds (" Tobrin") and can be copied.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    strip_prefix_space(tokenizer)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return TextTokenizer(tokenizer, "bpe", PAD, BOS, EOS, IMAGE, sentinels)


def strip_prefix_space(tokenizer):
    """Make the byte-level decoder drop the one space the prefix-space convention put in front of
    a text, inside the tokenizer itself, so every loader of its tokenizer.json (transformers'
    AutoTokenizer too) decodes exactly as slmctl does. Tokenizers saved before this had a plain
    ByteLevel decoder; they are upgraded on load."""
    from tokenizers import decoders

    if isinstance(tokenizer.decoder, decoders.ByteLevel):
        tokenizer.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 0)])
    return tokenizer


def _auto_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer, PretrainedConfig

    from slmctl.files import is_slmctl_transformers_dir

    # A `slmctl export hf` directory: its tokenizer needs none of the model code transformers would
    # otherwise ask to run (AutoTokenizer reads the model's config first), so pass a blank config.
    config = {"config": PretrainedConfig()} if is_slmctl_transformers_dir(path) else {}
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **config)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"cannot load a tokenizer from {path!r}: {first_line(e)}") from None


def load_hf_tokenizer(path: str, n_sentinels: int = 32, trust_remote_code: bool = False) -> TextTokenizer:
    """A Hugging Face tokenizer (local directory or hub id) with pad, bos, eos and an image
    placeholder defined: a missing pad reuses unk or eos (never a new id that would grow the
    vocabulary needlessly); missing image and sentinel tokens are added."""
    backend = _auto_tokenizer(path, trust_remote_code)
    if backend.eos_token is None:
        raise TokenizerError(f"tokenizer {path!r} defines no end-of-sequence token")
    if backend.bos_token is None:
        backend.bos_token = backend.eos_token
    if backend.pad_token is None:
        backend.pad_token = backend.unk_token if backend.unk_token is not None else backend.eos_token
    existing = set(backend.get_vocab())
    sentinels = [SENTINEL.format(i) for i in range(n_sentinels)]
    added = [t for t in [IMAGE, *sentinels] if t not in existing]
    if added:
        backend.add_special_tokens({"additional_special_tokens": added})
    return TextTokenizer(backend, "hf", backend.pad_token, backend.bos_token, backend.eos_token, IMAGE, sentinels)
