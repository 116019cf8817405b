"""Stage 0 of add-vision with `vision.pretrain=contrastive`: the tower learns images from captions.

Before the language model sees a single image token, our own ViT (trained from scratch) is
pretrained with SigLIP's sigmoid loss (`slmctl.model.contrastive`) to match each shape scene
with its caption ("three shapes: two red circles, a blue square"), for `stage0.steps` at
`stage0.lr`. The heads and the text encoder are discarded afterwards; the tower goes on into
stages 1 and 2. Image-to-caption retrieval accuracy on the validation scenes (is an image's own
caption the highest-scoring of its batch?) is measured before and after, and the tower's
weights are kept in checkpoints/stage0/, so a resumed run does not pretrain again.
"""

from __future__ import annotations

import os

import lightning as L
import torch
from safetensors.torch import load_file, save_file

from slmctl.config import ConfigError
from slmctl.data.shapes import ShapeCaptions
from slmctl.model.anyres import tile_image
from slmctl.model.contrastive import ContrastiveTowers
from slmctl.train.datamodule import TrainingDataModule
from slmctl.train.optim import adamw_with_schedule

MAX_CAPTION_TOKENS = 48
TOWER_FILE = "tower.safetensors"


class ContrastiveModule(L.LightningModule):
    def __init__(self, towers: ContrastiveTowers, optim, max_steps: int, lr: float):
        super().__init__()
        self.model, self.optim, self.max_steps, self.lr = towers, optim, max_steps, lr

    def training_step(self, batch, batch_idx):
        loss = self.model(batch["pixels"], batch["ids"], batch["mask"])
        self.log("contrastive_loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        groups = [{"params": list(self.model.parameters()), "lr": self.lr, "weight_decay": self.optim.weight_decay}]
        return adamw_with_schedule(groups, self.optim, self.max_steps)


def make_caption_batch(rows: list[tuple], rngs, tokenizer, tile: int) -> dict:
    """Each scene's global view (as the VLM crops it) and its caption's token ids."""
    pixels = torch.cat([tile_image(image, (1, 1), tile)[1] for image, _ in rows])
    captions = [tokenizer.encode(text)[:MAX_CAPTION_TOKENS] for _, text in rows]
    width = max(len(c) for c in captions)
    ids = torch.tensor([c + [tokenizer.pad_id] * (width - len(c)) for c in captions])
    mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in captions])
    return {"pixels": pixels, "ids": ids, "mask": mask}


@torch.no_grad()
def retrieval_accuracy(towers: ContrastiveTowers, batches: list[dict]) -> float:
    """The fraction of images whose own caption scores highest among their batch's captions."""
    towers.eval()
    right = total = 0
    for batch in batches:
        logits = towers.similarity(batch["pixels"], batch["ids"], batch["mask"])
        right += int((logits.argmax(dim=1) == torch.arange(len(logits))).sum())
        total += len(logits)
    towers.train()
    return right / max(total, 1)


def pretrain_tower(cfg, run, model, tokenizer) -> dict:
    """Pretrain `model.tower` in place (stage 0); returns what stages.json records of it."""
    if model.vision_config.tower != "vit":
        raise ConfigError(f"vision.pretrain=contrastive pretrains our own ViT (vision=vit-tiny); "
                          f"{model.vision_config.tower} towers come pretrained")
    if cfg.data.kind != "shapes":
        raise ConfigError("vision.pretrain=contrastive needs captions: it takes data=shapes (each scene's caption)")
    settings, data = cfg.stage0, cfg.data
    saved = run.checkpoint_dir / "stage0" / TOWER_FILE
    record = {"stage": 0, "steps": settings.steps, "trained": ["tower"], "objective": "contrastive (SigLIP sigmoid loss)",
              "lr": settings.lr}
    if cfg.resume and saved.is_file():
        model.tower.load_state_dict(load_file(str(saved)))
        run.log(f"stage 0: the contrastively pretrained tower reloaded from {saved.relative_to(run.path)}")
        return record | {"reloaded": True}
    towers = ContrastiveTowers(model.tower, vocab_size=len(tokenizer), pad_id=tokenizer.pad_id)
    tile = model.tower.image_size

    def make_batch(rows, rngs):
        return make_caption_batch(rows, rngs, tokenizer, tile)

    train = ShapeCaptions(data.seed, "train", data.train_examples, data.max_shapes)
    validation = ShapeCaptions(data.seed, "validation", data.validation_examples, data.max_shapes)
    datamodule = TrainingDataModule(train, validation, make_batch, cfg.batch_size, cfg.seed, describe="captioned scenes")
    batches = list(datamodule.val_dataloader())
    before = retrieval_accuracy(towers, batches)
    run.log(f"stage 0: contrastive pretraining of the tower for {settings.steps} steps (SigLIP loss); "
            f"validation retrieval accuracy before {before:.3f}")
    trainer = L.Trainer(max_steps=settings.steps, accelerator=cfg.trainer.get("accelerator", "auto"), devices=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, use_distributed_sampler=False)
    trainer.fit(ContrastiveModule(towers, cfg.optim, settings.steps, settings.lr), datamodule=datamodule)
    after = retrieval_accuracy(towers, batches)
    run.log(f"stage 0: validation retrieval accuracy after {after:.3f} (chance about 1/{cfg.batch_size})")
    saved.parent.mkdir(parents=True, exist_ok=True)
    temporary = saved.with_name(f".{saved.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in model.tower.state_dict().items()}, str(temporary))
    os.replace(temporary, saved)
    return record | {"retrieval_before": before, "retrieval_after": after,
                     "final_loss": float(trainer.callback_metrics.get("contrastive_loss", float("nan")))}

