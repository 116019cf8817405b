"""Stage 0 of add-vision (`vision.pretrain=contrastive|counts`): the tower learns images first.

Before the language model sees a single image token, our own ViT (trained from scratch) is
pretrained on the shape scenes for `stage0.steps` at `stage0.lr`, either
- contrastive: with SigLIP's sigmoid loss (`slmctl.model.contrastive`) to match each scene with
  its caption ("three shapes: two red circles, a blue square"); measured before and after:
  image-to-caption retrieval accuracy on the validation scenes (is an image's own caption the
  highest-scoring of its batch?); or
- counts: to count the scene's shapes, each kind and each colour of each kind, at every position
  of its feature map (`slmctl.model.counting`); measured before and after: the fraction of
  validation scenes whose count of each it gets exactly; or
- layout: counts, and at every position also what covers it (background or a coloured shape);
  measured: the counts' accuracies and the fraction of covered positions whose shape it names.
The heads (and the text encoder) are discarded afterwards; the tower goes on into stages 1 and 2.
Its weights are kept in checkpoints/stage0/, so a resumed run does not pretrain again, and a later
add-vision run starts from them with `vision.path=RUN` (`load_pretrained_tower`): stage 0 once,
stages 1-2 as often as wanted.
"""

from __future__ import annotations

import os
import time
from functools import partial
from pathlib import Path

import lightning as L
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from slmctl.data.shapes import ShapeCaptions, ShapeCounts, ShapeLayouts
from slmctl.errors import ConfigError
from slmctl.model.anyres import tile_image
from slmctl.model.contrastive import ContrastiveTowers
from slmctl.model.counting import COUNTED, CountingTower
from slmctl.refs import record_source
from slmctl.train.datamodule import TrainingDataModule
from slmctl.train.optim import adamw_with_schedule

MAX_CAPTION_TOKENS = 48
TOWER_FILE = "tower.safetensors"


class TowerPretrainModule(L.LightningModule):
    """Stage 0's training loop: the objective module's forward(**batch) is the loss."""

    def __init__(self, objective: torch.nn.Module, optim, max_steps: int, lr: float):
        super().__init__()
        self.model, self.optim, self.max_steps, self.lr = objective, optim, max_steps, lr

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch)
        self.log("stage0_loss", loss, on_step=True, on_epoch=False)
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


def make_count_batch(rows: list[tuple], rngs, tile: int) -> dict:
    """Each scene's global view (as the VLM crops it) and its counts [N, 4]."""
    return {"pixels": torch.cat([tile_image(image, (1, 1), tile)[1] for image, _ in rows]),
            "counts": torch.tensor([c for _, c in rows])}


def make_layout_batch(rows: list[tuple], rngs, tile: int) -> dict:
    """make_count_batch's, and each scene's layout [N, g, g]."""
    batch = make_count_batch([(image, scene_counts) for image, (scene_counts, _) in rows], rngs, tile)
    return batch | {"layout": torch.tensor([cells for _, (_, cells) in rows])}


@torch.no_grad()
def count_accuracy(counting: CountingTower, batches: list[dict]) -> dict[str, float]:
    """Per counted kind, the fraction of scenes whose count the head gets exactly (and with a layout
    head, "named": the fraction of shape-covered positions whose coloured shape it names)."""
    counting.eval()
    right = sum(counting.accuracy(b["pixels"], b["counts"]) * len(b["pixels"]) for b in batches)
    total = sum(len(b["pixels"]) for b in batches)
    accuracy = {kind: round(float(value) / max(total, 1), 4) for kind, value in zip(COUNTED, right)}
    if counting.here is not None:
        named = [counting.layout_accuracy(b["pixels"], b["layout"]) for b in batches]
        accuracy["named"] = round(sum(r for r, _ in named) / max(sum(t for _, t in named), 1), 4)
    counting.train()
    return accuracy


@torch.no_grad()
def validation_loss(objective: torch.nn.Module, batches: list[dict]) -> float:
    """The objective's mean loss over the validation batches (whatever the objective: its forward is the loss)."""
    objective.eval()
    loss = sum(float(objective(**b)) * len(b["pixels"]) for b in batches) / max(sum(len(b["pixels"]) for b in batches), 1)
    objective.train()
    return round(loss, 4)


def pretrain_tower(cfg, run, model, tokenizer) -> dict:
    """Pretrain `model.tower` in place (stage 0); returns what stages.json records of it."""
    kind = str(cfg.vision.pretrain)
    if model.vision_config.tower != "vit":
        raise ConfigError(f"vision.pretrain={kind} pretrains our own ViT (vision=vit-tiny); "
                          f"{model.vision_config.tower} towers come pretrained")
    if cfg.data.kind != "shapes":
        raise ConfigError(f"vision.pretrain={kind} needs {'captions' if kind == 'contrastive' else 'shape counts'}: "
                          f"it takes data=shapes (each scene's {'caption' if kind == 'contrastive' else 'contents'})")
    settings, data = cfg.stage0, cfg.data
    saved = run.checkpoint_dir / "stage0" / TOWER_FILE
    objective = {"contrastive": "contrastive (SigLIP sigmoid loss)", "counts": "counts (cross-entropy per kind)",
                 "layout": "layout (counts, and what covers each position: cross-entropy)"}[kind]
    record = {"stage": 0, "steps": settings.steps, "trained": ["tower"], "objective": objective, "lr": settings.lr,
              "scenes": cfg.data.train_examples, "max_shapes": cfg.data.max_shapes}
    if cfg.resume and saved.is_file():
        model.tower.load_state_dict(load_file(str(saved)))
        run.log(f"stage 0: the pretrained tower reloaded from {saved.relative_to(run.path)}")
        return record | {"reloaded": True}
    tile = model.tower.image_size
    if kind == "contrastive":
        module = ContrastiveTowers(model.tower, vocab_size=len(tokenizer), pad_id=tokenizer.pad_id)
        scenes, make_batch, describe = ShapeCaptions, partial(make_caption_batch, tokenizer=tokenizer, tile=tile), "captioned scenes"
        measure, measured = retrieval_accuracy, "validation retrieval accuracy"
    elif kind == "counts":
        module = CountingTower(model.tower, max_count=data.max_shapes)
        scenes, make_batch, describe = ShapeCounts, partial(make_count_batch, tile=tile), "counted scenes"
        measure, measured = count_accuracy, "validation count accuracy (shapes, each kind, each colour of each kind)"
    else:
        module = CountingTower(model.tower, max_count=data.max_shapes, layout=True)
        grid = model.vision_config.grid_side
        scenes, make_batch, describe = partial(ShapeLayouts, grid=grid), partial(make_layout_batch, tile=tile), "mapped scenes"
        measure = count_accuracy
        measured = "validation count accuracy (shapes, each kind, each colour of each kind; named: covered positions)"
    train = scenes(data.seed, "train", data.train_examples, data.max_shapes)
    validation = scenes(data.seed, "validation", data.validation_examples, data.max_shapes)
    datamodule = TrainingDataModule(train, validation, make_batch, cfg.batch_size, cfg.seed, describe=describe)
    batches = list(datamodule.val_dataloader())
    before, loss_before = measure(module, batches), validation_loss(module, batches)
    run.log(f"stage 0: {kind} pretraining of the tower for {settings.steps} steps ({objective}); {measured} before {before}")
    started = time.perf_counter()
    trainer = L.Trainer(max_steps=settings.steps, accelerator=cfg.trainer.get("accelerator", "auto"), devices=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, use_distributed_sampler=False)
    trainer.fit(TowerPretrainModule(module, cfg.optim, settings.steps, settings.lr), datamodule=datamodule)
    seconds = time.perf_counter() - started
    after, loss_after = measure(module, batches), validation_loss(module, batches)
    run.log(f"stage 0: {measured} after {after}" + (f" (chance about 1/{cfg.batch_size})" if kind == "contrastive" else ""))
    saved.parent.mkdir(parents=True, exist_ok=True)
    temporary = saved.with_name(f".{saved.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in model.tower.state_dict().items()}, str(temporary))
    os.replace(temporary, saved)
    names = ("retrieval_before", "retrieval_after") if kind == "contrastive" else ("count_accuracy_before", "count_accuracy_after")
    return record | {names[0]: before, names[1]: after, "seconds": round(seconds, 1),
                     "validation_loss_before": loss_before, "validation_loss_after": loss_after,
                     "final_loss": float(trainer.callback_metrics.get("stage0_loss", float("nan")))}


def load_pretrained_tower(run, model, path: str) -> None:
    """Start our ViT from the tower an earlier run pretrained (`vision.path`: an add-vision run, or
    its checkpoints/stage0/tower.safetensors); a tower of other dimensions is a one-line error."""
    given = Path(path).expanduser()
    saved = given / "checkpoints" / "stage0" / TOWER_FILE if given.is_dir() else given
    if not saved.is_file():
        raise ConfigError(f"vision.path={path}: no pretrained tower there (an add-vision run with vision.pretrain=... "
                          f"keeps it in checkpoints/stage0/{TOWER_FILE})")
    try:
        weights = load_file(str(saved))
    except (SafetensorError, OSError) as error:
        raise ConfigError(f"vision.path={path}: {saved.name} is not a readable safetensors file ({error})") from None
    expected = {name: tuple(value.shape) for name, value in model.tower.state_dict().items()}
    found = {name: tuple(value.shape) for name, value in weights.items()}
    if found != expected:
        differ = sorted(n for n in expected.keys() | found.keys() if expected.get(n) != found.get(n))
        raise ConfigError(f"vision.path={path}: that tower does not fit this vision config ({differ[0]}: "
                          f"{found.get(differ[0])} there, {expected.get(differ[0])} here); give the same vision.* sizes")
    model.tower.load_state_dict(weights)
    record_source(run, path, role="vision tower", path=saved)
    run.log(f"vision tower: the pretrained weights of {saved}")
