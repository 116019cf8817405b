"""slmctl's own trainer options (slmctl.config.training.TrainerOptionsSchema), applied by `fit` to the
module it trains; Lightning never sees them.

* `activation_checkpointing`: every transformer block (encoder, decoder, decoder-only; the
  text model of a vision model) keeps only its input during the forward pass and recomputes
  its activations in the backward pass (torch.utils.checkpoint, non-reentrant, RNG state
  preserved so dropout masks repeat): the same loss and gradients for ~1/3 more compute and
  far less activation memory. Only while training with gradients: generation and validation
  run the blocks as they are. A Hugging Face model uses its own `gradient_checkpointing_enable`.

(`compile`, torch.compile of the model for training, was measured and not kept: on this CPU
no faster at 2 threads, 70 s of compilation and more memory; docs/speed.md.)
"""

from __future__ import annotations

import torch

from slmctl.config.compose import trainer_options


def split_trainer_args(trainer_args: dict) -> tuple[dict, dict]:
    """(lightning.Trainer arguments, slmctl's options) of a `trainer` config."""
    own = set(trainer_options())
    return ({k: v for k, v in trainer_args.items() if k not in own},
            {k: v for k, v in trainer_args.items() if k in own})


def apply_trainer_options(model: torch.nn.Module, options: dict, log) -> None:
    if options.get("activation_checkpointing"):
        blocks = checkpoint_blocks(model)
        log(f"activation checkpointing: {blocks} blocks recompute their activations in the backward pass")


def checkpoint_blocks(model: torch.nn.Module) -> int:
    """Turn on activation checkpointing for every transformer block of `model`; how many."""
    from slmctl.model.layers import CrossAttentionBlock, SelfAttentionBlock

    hf_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if hasattr(model, "gradient_checkpointing_enable"):  # a Hugging Face model
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return int(hf_layers or 0)
    count = 0
    for module in model.modules():
        if isinstance(module, (SelfAttentionBlock, CrossAttentionBlock)) and "forward" not in vars(module):
            module.forward = _checkpointed(module)
            count += 1
    return count


def _checkpointed(block: torch.nn.Module):
    """`block`'s forward, recomputed in the backward pass when it runs in training with gradients."""
    from torch.utils.checkpoint import checkpoint

    forward = block.forward

    def run(*args, **kwargs):
        if block.training and torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    return run
