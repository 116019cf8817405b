"""Shared test helpers: deterministic CPU settings, randomised tiny models, a tiny Llama teacher on disk."""

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from slmctl.data.synthetic import SyntheticWorld
from slmctl.data.tokenizer import train_bpe
from slmctl.model import build_model
from slmctl.model.config import vocab_size_for

torch.set_num_threads(2)


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 3.0, embed_std: float = 0.5) -> torch.nn.Module:
    """Replace every weight with clearly non-trivial random values.

    The training init (std 0.02) makes a tiny untrained model echo its input token, which
    would let a generation test pass for the wrong reason; these weights give diverse,
    well-separated logits instead.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        model.embed.weight.copy_(embed_std * torch.randn(model.embed.weight.shape, generator=g))
    return model


@pytest.fixture
def encdec():
    return randomize(build_model("tiny", seed=0), seed=1).eval()


@pytest.fixture
def deconly():
    return randomize(build_model("deconly-tiny", seed=0), seed=2).eval()


def random_prompts(lengths, vocab=512, low=3, seed=0, side="right", pad_id=0):
    """A padded batch of random prompts with the given real lengths -> (ids, mask, rows)."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(low, vocab, (n,), generator=g) for n in lengths]
    width = max(lengths)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        sl = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[i, sl] = row
        mask[i, sl] = 1
    return ids, mask, rows


def max_logit_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the logits' scale (fp32 rounding grows with it: the
    randomised models give logits of ~15, the training init of ~1)."""
    return ((a - b).abs().max() / max(1.0, b.abs().max().item())).item()


class Crash(Callback):
    """Dies after `step` optimizer steps of the `fit`-th fit it is passed to (a stage that trains
    two models, or in two stages, fits more than once), like a killed process (no cleanup)."""

    def __init__(self, step, fit=1):
        self.step, self.fit, self.fits = step, fit, 0

    def on_train_start(self, trainer, *args):
        self.fits += 1

    def on_train_batch_end(self, trainer, *args):
        if self.fits == self.fit and trainer.global_step == self.step:
            raise SystemExit("simulated kill")


class CountSteps(Callback):
    """Counts the optimizer steps this process runs, over every fit it is passed to."""

    def __init__(self):
        self.steps = 0

    def on_train_batch_end(self, trainer, *args):
        self.steps += 1


class InitialWeights(Callback):
    """The trained model's weights as each fit (a stage may fit more than one model) starts."""

    def __init__(self):
        self.fits = []

    def on_train_start(self, trainer, pl_module):
        self.fits.append({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})


def resumed_from(run_path) -> list[str]:
    """The "resumed from step N (checkpoint PATH)..." lines of a run's log."""
    return [line.split(" ", 1)[1] for line in (run_path / "log.txt").read_text().splitlines() if "resumed from step" in line]


def save_llama(directory, tokenizer, seed=0, hidden=64):
    """A tiny random LlamaForCausalLM and its tokenizer, as `save_pretrained` leaves them."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size_for(len(tokenizer)), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # peaked, input-dependent distributions (the training init is nearly uniform)
        model.model.embed_tokens.weight.normal_(0, 1.0)
    model.save_pretrained(directory)
    backend = Tokenizer.from_str(tokenizer.backend.to_str())
    backend.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tokenizer.bos_id)])  # as Llama's
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def world_texts():
    return SyntheticWorld(seed=0, n_people=200).texts("train", 300)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, world_texts):
    return save_llama(tmp_path_factory.mktemp("llama"), train_bpe(world_texts, vocab_size=400))
