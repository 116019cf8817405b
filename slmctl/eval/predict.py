"""Batched predictions and reference log-likelihoods for evaluation.

Prompts are tokenised once, sorted by length into batches (less padding), generated with the
model's cached generation (greedy by default, beam search optional) and put back in the
task's order, so results never depend on the batch size. Each batch is handed back as it
finishes (`predict_batches`), so an eval can save it and, resumed, skip the batches it has.
The same batching scores the reference answer teacher-forced, for perplexity.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Collection, Iterator

import torch
import torch.nn.functional as F

from slmctl.data import objectives as obj
from slmctl.runtime.generator import Generator


def _prompt(generator: Generator, text: str, max_source_len: int) -> list[int]:
    """What the model reads: the first `max_source_len` tokens for an encoder-decoder (as it was
    trained); bos + the last tokens for decoder-only models (the end of a prompt matters most)."""
    ids = generator.tokenizer.encode(text)
    if generator.kind == "encdec":
        return ids[:max_source_len]
    return [generator.tokenizer.bos_id, *ids[-(max_source_len - 1):]]


@dataclass
class DecodeClock:
    """The last batch's time to its first tokens and its decoding after them, so an eval can report the
    decode speed apart from the encoder's prefill (the speed drafted decoding changes). decode_tokens:
    every row's tokens after its first, up to and including its EOS."""
    first_token_s: float = 0.0
    decode_s: float = 0.0
    decode_tokens: int = 0


def _batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _right_pad(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


def predict(generator: Generator, sources: list[str], batch_size: int = 16, max_new_tokens: int = 64, num_beams: int = 1,
            length_penalty: float = 1.0, max_source_len: int = 1024,
            on_progress: Callable[[int], None] | None = None, images: list | None = None) -> list[str]:
    """The generated text for every source, in order (`images[i]`: source i's images, for a vision model)."""
    outputs: list[str] = [""] * len(sources)
    for batch, texts in predict_batches(generator, sources, batch_size, max_new_tokens, num_beams, length_penalty,
                                        max_source_len, images):
        for i, text in zip(batch, texts):
            outputs[i] = text
        if on_progress:
            on_progress(len(batch))
    return outputs


@torch.inference_mode()
def predict_batches(generator: Generator, sources: list[str], batch_size: int = 16, max_new_tokens: int = 64,
                    num_beams: int = 1, length_penalty: float = 1.0, max_source_len: int = 1024,
                    images: list | None = None, skip: Collection[int] = (), drafter=None,
                    clock: DecodeClock | None = None) -> Iterator[tuple[list[int], list[str]]]:
    """(source indices, generated texts) of each batch as it finishes, so a caller can save them as
    it goes. A batch whose sources are all in `skip` (finished before a resume) is not generated;
    the batches do not depend on `skip`, so every text is the one an uninterrupted run generates.
    `drafter` (slmctl.model.drafting): drafted decoding, the same texts. `clock`: set to each batch's
    timing before it is handed back (greedy/sampled slmctl models; beams and transformers' models leave
    it at zero)."""
    tokenizer, model = generator.tokenizer, generator.model
    device = model.device
    prompts = [_prompt(generator, s, max_source_len) for s in sources]
    skip = set(skip)
    for batch in _batches([len(p) for p in prompts], batch_size):
        if skip.issuperset(batch):
            continue
        rows = [prompts[i] for i in batch]
        timed = clock is not None and num_beams == 1 and generator.kind != "hf-causal"
        if clock is not None:
            clock.first_token_s = clock.decode_s = clock.decode_tokens = 0
        if generator.kind == "hf-causal":
            width = max(len(r) for r in rows)  # left padding: generation continues every row at the end
            ids = torch.tensor([[tokenizer.pad_id] * (width - len(r)) + r for r in rows], device=device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
            new = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, num_beams=num_beams,
                                 length_penalty=length_penalty, do_sample=False, pad_token_id=tokenizer.pad_id,
                                 eos_token_id=tokenizer.eos_id)[:, width:]
        else:
            ids, mask = _right_pad(rows, tokenizer.pad_id, device)
            vision = {"images": [list(images[i]) for i in batch]} if images is not None else {}
            drafting = {"drafter": drafter} if drafter is not None else {}
            started, first = time.perf_counter(), []

            def first_tokens(tokens, first=first):  # noted once, after the device has finished the prefill
                if not first:
                    if tokens.device.type == "cuda":
                        torch.cuda.synchronize(tokens.device)
                    first.append(time.perf_counter())

            streaming = {"streamer": first_tokens} if timed else {}
            new = model.generate(ids, mask, max_new_tokens=max_new_tokens, num_beams=num_beams,
                                 length_penalty=length_penalty, **vision, **drafting, **streaming)
            if timed:
                if new.device.type == "cuda":
                    torch.cuda.synchronize(new.device)
                ended = time.perf_counter()
                clock.first_token_s, clock.decode_s = first[0] - started, ended - first[0]
        texts, decoded = [], 0
        for tokens in new.tolist():
            if tokenizer.eos_id in tokens:
                tokens = tokens[: tokens.index(tokenizer.eos_id)]
                decoded += len(tokens)  # the EOS counts, the first token does not
            else:
                decoded += len(tokens) - 1
            texts.append(tokenizer.decode(tokens).strip())
        if timed:
            clock.decode_tokens = decoded
        yield batch, texts


@torch.inference_mode()
def reference_nll(generator: Generator, sources: list[str], references: list[str], batch_size: int = 16,
                  max_source_len: int = 1024, max_target_len: int = 256) -> list[tuple[float, int]]:
    """(summed negative log-likelihood, tokens) of each reference (+ eos) given its source."""
    tokenizer, model = generator.tokenizer, generator.model
    device = model.device
    special = obj.SpecialIds(pad=tokenizer.pad_id, bos=tokenizer.bos_id, eos=tokenizer.eos_id)
    sources_ids = [tokenizer.encode(s) for s in sources]
    targets_ids = [tokenizer.encode(r) for r in references]
    results: list[tuple[float, int]] = [(0.0, 0)] * len(sources)
    for batch in _batches([len(s) + len(t) for s, t in zip(sources_ids, targets_ids)], batch_size):
        if generator.kind == "encdec":
            pairs = [obj.seq2seq(sources_ids[i], targets_ids[i], special, max_source_len, max_target_len) for i in batch]
            inputs = {k: v.to(device) for k, v in obj.collate_seq2seq(pairs, special).items()}
            labels = inputs.pop("labels")
            logits = model(**inputs).logits
        else:
            rows = [obj.prompt_completion(sources_ids[i], targets_ids[i], special, max_source_len + max_target_len)
                    for i in batch]
            inputs = obj.collate_causal([ids for ids, _ in rows], special)
            for j, (_, n_prompt) in enumerate(rows):
                inputs["labels"][j, :n_prompt] = -100
            ids, mask = inputs["input_ids"].to(device), inputs["attention_mask"].to(device)
            out = model(input_ids=ids, attention_mask=mask)
            logits, labels = out.logits[:, :-1], inputs["labels"][:, 1:].to(device)
        nll = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
        counted = labels != -100
        for j, i in enumerate(batch):
            results[i] = (float(nll[j][counted[j]].sum()), int(counted[j].sum()))
    return results
