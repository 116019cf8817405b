"""The LightningModule that trains any of our language models (or a Hugging Face causal LM).

It computes the loss a batch asks for, logs train/validation loss (tokens/s, MFU and data
wait are logged by train/throughput.py's callback, which `fit` adds), and owns the optimiser:
AdamW (no weight decay on norms and biases) with linear warmup and cosine decay. RNG states
travel in checkpoints so a resumed run continues exactly.
"""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch

from slmctl.errors import TrainingDiverged
from slmctl.train.datamodule import PADDING
from slmctl.train.optim import adamw_with_schedule, decay_groups, fused_adamw


def check_finite(loss: torch.Tensor, step: int) -> None:
    if not bool(torch.isfinite(loss.detach()).all()):
        raise TrainingDiverged(f"the training loss is {float(loss.detach()):g} at step {step}: training diverged "
                               f"(lower optim.lr, or look for bad data in that batch)")


def sum_over_ranks(module: L.LightningModule, values: list[float]) -> list[float]:
    """Each value summed over the processes of a multi-process run (as is on one process)."""
    if module.trainer.world_size == 1:
        return values
    summed = module.trainer.strategy.reduce(torch.tensor(values, dtype=torch.float64), reduce_op="sum")
    return summed.tolist()


def global_token_mean(module: L.LightningModule, loss: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to backpropagate, loss over every process's tokens) for a token-mean `loss` over `tokens`.
    The loss to backpropagate is this micro-batch's token sum; `LMTrainingModule.on_before_optimizer_step`
    divides the gradients by the tokens of every process and micro-batch of the optimizer step, so
    each update is the gradient of the token mean over all of them: W processes accumulating N
    micro-batches take the same steps as one process with the whole batch at once (uneven token
    counts included; a token-mean loss per micro-batch would weight a micro-batch of short targets
    as much as one of long ones)."""
    module.step_tokens += tokens
    if module.trainer.world_size == 1:
        return loss * tokens, loss.detach()
    loss_sum, total = sum_over_ranks(module, [float(loss.detach()) * tokens, float(tokens)])
    return loss * tokens, torch.tensor(loss_sum / total)


class LMTrainingModule(L.LightningModule):
    def __init__(self, model: torch.nn.Module, optim, max_steps: int, hf_causal: bool = False):
        super().__init__()
        self.model, self.optim, self.max_steps, self.hf_causal = model, optim, max_steps, hf_causal
        self._val_loss_sum = 0.0
        self._val_tokens = 0
        self.step_tokens = 0  # target tokens of this optimizer step's micro-batches so far (global_token_mean)

    def loss_and_tokens(self, batch: dict) -> tuple[torch.Tensor, int]:
        labels = batch["labels"]
        if self.hf_causal:  # transformers shifts the labels itself
            loss = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
            tokens = int((labels[:, 1:] != -100).sum())
        else:
            loss = self.model(**batch).loss
            tokens = int((labels != -100).sum()) if "decoder_input_ids" in batch else int((labels[:, 1:] != -100).sum())
        return loss, tokens

    def training_step(self, batch, batch_idx):
        loss, tokens = self.loss_and_tokens(batch)
        loss, reported = global_token_mean(self, loss, tokens)
        check_finite(reported, self.global_step)
        self.log("train_loss", reported, on_step=True, on_epoch=False, prog_bar=True, batch_size=labels_batch(batch))
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """Gradients of the step's token sums (each divided by accumulate_grad_batches by Lightning,
        averaged over the W processes by DDP/FSDP) -> the gradient of the global token mean."""
        tokens, self.step_tokens = float(self.step_tokens), 0
        if self.trainer.world_size > 1:
            (tokens,) = sum_over_ranks(self, [tokens])
        if not tokens:  # a training_step that did not go through global_token_mean: gradients as they are
            return
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size / tokens
        for p in self.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)

    def on_validation_epoch_start(self):
        self._val_loss_sum, self._val_tokens = 0.0, 0

    def validation_step(self, batch, batch_idx):
        if batch.get(PADDING):  # keeps this rank's collectives in step with the others; not scored
            self.loss_and_tokens({k: v for k, v in batch.items() if k != PADDING})
            return
        loss, tokens = self.loss_and_tokens(batch)
        self._val_loss_sum += float(loss) * tokens
        self._val_tokens += tokens

    def on_validation_epoch_end(self):
        loss_sum, tokens = sum_over_ranks(self, [self._val_loss_sum, float(self._val_tokens)])
        if tokens:
            self.log("val_loss", loss_sum / tokens, prog_bar=True)

    def configure_optimizers(self):
        return adamw_with_schedule(decay_groups(self.model, self.optim.weight_decay), self.optim, self.max_steps,
                                   fused=fused_adamw(self.trainer))

    # RNG states in the checkpoint: a resumed run draws the same dropout masks and samples.
    # (Plain tensors and numbers only, so checkpoints load with torch.load(weights_only=True).)
    def on_save_checkpoint(self, checkpoint):
        name, keys, position, has_gauss, gauss = np.random.get_state()
        checkpoint["slmctl_rng"] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                                    "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(position),
                                              int(has_gauss), float(gauss)]}

    def on_load_checkpoint(self, checkpoint):
        state = checkpoint.get("slmctl_rng")
        if state:
            torch.set_rng_state(state["torch"])
            random.setstate(state["python"])
            name, keys, position, has_gauss, gauss = state["numpy"]
            np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))


def labels_batch(batch: dict) -> int:
    return int(batch["labels"].shape[0])
