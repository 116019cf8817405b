"""The training module's optimisation step: what one update is made of."""

import lightning as L
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from conftest import randomize
from slmctl.model import build_model
from slmctl.train.module import LMTrainingModule

OPTIM = OmegaConf.create({"lr": 1e-3, "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "warmup_steps": 1,
                          "min_lr_ratio": 0.1})


class Recording(LMTrainingModule):
    """Keeps a copy of every gradient as the optimizer will see it (after the module's own hook)."""

    def on_before_optimizer_step(self, optimizer):
        super().on_before_optimizer_step(optimizer)
        self.grads = {n: p.grad.detach().clone() for n, p in self.named_parameters() if p.grad is not None}


def seq2seq_batch(target_lengths, seed=0, vocab=512):
    """Random seq2seq rows with the given target lengths (labels -100 past them)."""
    g = torch.Generator().manual_seed(seed)
    rows, width = len(target_lengths), max(target_lengths)
    labels = torch.full((rows, width), -100)
    decoder_input_ids = torch.zeros(rows, width, dtype=torch.long)
    for i, n in enumerate(target_lengths):
        labels[i, :n] = torch.randint(3, vocab, (n,), generator=g)
        decoder_input_ids[i, 0] = 1
        decoder_input_ids[i, 1:n] = labels[i, :n - 1]
    input_ids = torch.randint(3, vocab, (rows, 10), generator=g)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "decoder_input_ids": decoder_input_ids,
            "labels": labels}


def first_update(batches, accumulate):
    """The gradients the first optimizer step over `batches` applies."""
    model = randomize(build_model("tiny", seed=0), seed=1)
    module = Recording(model, OPTIM, max_steps=1)
    trainer = L.Trainer(max_steps=1, accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, accelerator="cpu",
                        devices=1)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return module.grads


def split(batch, at):
    return [{k: v[:at] for k, v in batch.items()}, {k: v[at:] for k, v in batch.items()}]


def test_two_accumulated_micro_batches_of_4_make_the_update_of_one_batch_of_8():
    """The loss is a mean over target tokens: accumulating two micro-batches must give the gradient
    of the mean over all 8 rows' tokens, also when the micro-batches hold different token counts."""
    batch = seq2seq_batch([16, 15, 16, 14, 2, 3, 1, 2])  # 61 target tokens, then 8
    whole = first_update([batch], 1)
    accumulated = first_update(split(batch, 4), 2)
    assert whole.keys() == accumulated.keys() and len(whole) > 10
    for name, grad in whole.items():
        torch.testing.assert_close(accumulated[name], grad, rtol=1e-4, atol=1e-7, msg=name)
