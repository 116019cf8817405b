"""Shared test helpers: deterministic CPU settings and randomised tiny models."""

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from slmctl.model import build_model

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
    """Dies after `step` optimizer steps, like a killed process (no cleanup)."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            raise SystemExit("simulated kill")
