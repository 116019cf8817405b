"""The LightningModule that distils a decoder-only teacher into an encoder-decoder student.

Per step: loss = alpha * KD + (1 - alpha) * CE(gold). The CE term always uses the data's
targets; the KD term uses the targets `kd.targets` asks for: the gold ones (teacher-forced,
live or from the logit cache), ones the teacher writes (sequence-level KD), or samples from
the student itself (on-policy), or per step a seeded mix of student samples and gold.
Generation happens here, in batches on the training device, not in the data loader.

The teacher is held outside the module's parameters: it is frozen, never optimised and
never written into checkpoints. Logged per step: train_loss, train_kd_loss,
train_ce_loss, train_agreement (top-1 match with the teacher on target tokens), lr (and
train/throughput.py's tokens_per_s, target_tokens_per_s, mfu, data_wait_fraction); per
validation (always gold targets): the same with a val_ prefix.
"""

from __future__ import annotations

import random

import torch

from slmctl.train import kd_losses
from slmctl.train.datamodule import PADDING
from slmctl.train.distill_data import DistillBatcher
from slmctl.train.module import LMTrainingModule, check_finite, global_token_mean, sum_over_ranks
from slmctl.train.teacher import Teacher, cut_after_eos

STUDENT_INPUTS = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask", "labels")


class DistillModule(LMTrainingModule):
    def __init__(self, student: torch.nn.Module, teacher: Teacher, batcher: DistillBatcher, kd, optim, max_steps: int,
                 seed: int, shared_vocab: int | None, shard_teacher: bool = False):
        super().__init__(student, optim, max_steps)
        object.__setattr__(self, "teacher", teacher)  # not a submodule: frozen and not checkpointed
        self.batcher, self.kd, self.seed = batcher, kd, seed
        self.shared_vocab = shared_vocab  # None: different tokenizers (ULD)
        self.shard_teacher = shard_teacher
        self._val: dict[str, float] = {}

    def on_fit_start(self) -> None:
        if self.batcher.cache is not None:  # with a logit cache the teacher is not needed: it stays on the CPU
            return
        self.teacher.to(self.device)
        if self.shard_teacher and self.trainer.world_size > 1 and not getattr(self.teacher, "sharded", False):
            self.teacher.shard()
            self.teacher.sharded = True  # a second fit in the same process (the control student) reuses it
            world = self.trainer.world_size
            self.logger.experiment.log(f"teacher sharded over {world} processes (FSDP2): each holds 1/{world} of its weights")

    # -- what the KD term is computed on --------------------------------------

    def targets_source(self, step: int) -> str:
        """gold, teacher or student for this optimizer step (mix: a seeded draw per step)."""
        if self.kd.targets != "mix":
            return self.kd.targets
        draw = random.Random(f"{self.seed}:mix:{step}").random()
        return "student" if draw < self.kd.on_policy_prob else "gold"

    def generated_batch(self, batch: dict, by: str) -> dict:
        indices = batch["example_index"].tolist()
        examples = [self.batcher.examples["train"][i] for i in indices]
        if by == "teacher":
            t = self.kd.teacher_temperature
            generated = self.teacher.generate([e.teacher_source for e in examples], self.batcher.max_target,
                                              do_sample=t > 0, temperature=t or 1.0)
        else:
            from slmctl.model.generation import generate

            rows = generate(self.model, batch["input_ids"], batch["attention_mask"], max_new_tokens=self.batcher.max_target,
                            do_sample=True, temperature=self.kd.student_temperature, top_k=self.kd.student_top_k)
            generated = [cut_after_eos(ids, self.batcher.student.eos_id) for ids in rows.tolist()]
        rebuilt = self.batcher.with_targets("train", indices, generated, by)
        return {k: v.to(self.device) for k, v in rebuilt.items()}

    # -- losses ----------------------------------------------------------------

    def kd_terms(self, batch: dict, student_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(KD loss, top-1 agreement or None) of the student's logits against the teacher's."""
        kd, mask = self.kd, batch["kd_mask"]
        student_logits = student_logits[:, : mask.shape[1]]
        if "cache_ids" in batch:
            logits = student_logits[..., : self.shared_vocab]
            loss = kd_losses.topk_kd_loss(logits, batch["cache_ids"], batch["cache_logp"], batch["cache_tail"], mask,
                                          kd.loss, kd.temperature, kd.beta)
            return loss, kd_losses.agreement(logits, batch["cache_ids"][..., 0], mask)
        teacher_logits = self.teacher.aligned_logits(batch["teacher_input_ids"], batch["teacher_attention_mask"],
                                                     batch["teacher_positions"])
        if self.shared_vocab is None:
            return kd_losses.uld_loss(student_logits, teacher_logits, mask, kd.temperature), None
        v = self.shared_vocab
        logits, teacher_logits = student_logits[..., :v], teacher_logits[..., :v]
        loss = kd_losses.kd_loss(logits, teacher_logits, mask, kd.loss, kd.temperature, kd.beta)
        return loss, kd_losses.agreement(logits, teacher_logits, mask)

    def _student(self, batch: dict):
        return self.model(**{k: batch[k] for k in STUDENT_INPUTS})

    def training_step(self, batch, batch_idx):
        alpha = self.kd.alpha
        gold = self._student(batch)
        ce = gold.loss
        kd, agree, kd_batch = None, None, batch
        if alpha > 0:
            source = self.targets_source(self.global_step)
            if source == "gold":
                kd, agree = self.kd_terms(batch, gold.logits)
            else:
                kd_batch = self.generated_batch(batch, source)
                kd, agree = self.kd_terms(kd_batch, self._student(kd_batch).logits)
            if self.kd.targets == "mix":
                self.log("on_policy", float(source == "student"), on_step=True, on_epoch=False)
        loss = ce if kd is None else alpha * kd + (1 - alpha) * ce
        tokens = int((batch["labels"] != -100).sum())
        loss, reported = global_token_mean(self, loss, tokens)
        check_finite(reported, self.global_step)
        size = int(batch["labels"].shape[0])
        if self.trainer.world_size > 1:  # log what one process logs: means over every rank's tokens
            ce, kd, agree = self._global_means(ce, kd, agree, tokens, int(kd_batch["kd_mask"].sum()))
        self.log("train_loss", reported, on_step=True, on_epoch=False, prog_bar=True, batch_size=size)
        self.log("train_ce_loss", ce, on_step=True, on_epoch=False, prog_bar=True, batch_size=size)
        if kd is not None:
            self.log("train_kd_loss", kd, on_step=True, on_epoch=False, prog_bar=True, batch_size=size)
        if agree is not None:
            self.log("train_agreement", agree, on_step=True, on_epoch=False, batch_size=size)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def _global_means(self, ce, kd, agree, tokens: int, kd_tokens: int) -> tuple:
        """The step's CE, KD and agreement over the tokens of every rank (each rank holds its share's)."""
        zero = torch.zeros(())
        ce_sum, n, kd_sum, agree_sum, kd_n = sum_over_ranks(self, [
            float(ce) * tokens, float(tokens), float(zero if kd is None else kd) * kd_tokens,
            float(zero if agree is None else agree) * kd_tokens, float(kd_tokens)])
        ce = torch.tensor(ce_sum / max(n, 1.0))
        kd = None if kd is None else torch.tensor(kd_sum / max(kd_n, 1.0))
        agree = None if agree is None else torch.tensor(agree_sum / max(kd_n, 1.0))
        return ce, kd, agree

    # -- validation: gold targets, token-weighted means --------------------------

    def on_validation_epoch_start(self):
        self._val = {"ce": 0.0, "kd": 0.0, "agree": 0.0, "tokens": 0, "kd_tokens": 0}

    def validation_step(self, batch, batch_idx):
        out = self._student(batch)
        tokens = int((batch["labels"] != -100).sum())
        kd, agree = self.kd_terms(batch, out.logits)
        if batch.get(PADDING):  # keeps this rank's collectives in step with the others; not scored
            return
        kd_tokens = int(batch["kd_mask"].sum())
        self._val["ce"] += float(out.loss) * tokens
        self._val["tokens"] += tokens
        self._val["kd"] += float(kd) * kd_tokens
        self._val["agree"] += float(agree) * kd_tokens if agree is not None else 0.0
        self._val["kd_tokens"] += kd_tokens

    def on_validation_epoch_end(self):
        v = dict(zip(self._val, sum_over_ranks(self, [float(x) for x in self._val.values()])))
        if not v["tokens"]:
            return
        ce, kd = v["ce"] / v["tokens"], v["kd"] / max(1, v["kd_tokens"])
        alpha = self.kd.alpha
        self.log("val_loss", alpha * kd + (1 - alpha) * ce, prog_bar=True)
        self.log("val_ce_loss", ce, prog_bar=True)
        self.log("val_kd_loss", kd)
        if self.shared_vocab is not None:
            self.log("val_agreement", v["agree"] / max(1, v["kd_tokens"]))
