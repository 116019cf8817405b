"""Does the exported graph compute what PyTorch computes? Measured, not assumed.

For fresh random prompts of several lengths (a batch with one padded row), PyTorch and ONNX
Runtime decode side by side through the same session interface: PyTorch picks each greedy
token, both runtimes read it, and every step's logits are compared. The report holds the
largest absolute logit difference and whether ORT's greedy choice equals PyTorch's at every
one of the steps (so the greedy generations are identical).
"""

from __future__ import annotations

import torch

from slmctl.errors import RunFailure


class ValidationFailed(RunFailure):
    """The exported graphs do not compute what PyTorch computes: the run fails with exit 1."""


def random_batch(config, batch: int, length: int, generator: torch.Generator, pad_side: str = "right"):
    """Random prompt ids [batch, length] (no special tokens) whose last row is shorter by a third,
    padded on `pad_side`."""
    ids = torch.randint(4, config.vocab_size, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    if batch > 1 and length > 2:
        cut = length - max(1, length // 3)
        if pad_side == "right":
            mask[-1, cut:] = 0
        else:
            mask[-1, : length - cut] = 0
        ids = ids.masked_fill(mask == 0, config.pad_token_id)
    return ids, mask


@torch.inference_mode()
def compare_decoding(reference, candidate, input_ids, attention_mask, steps: int) -> dict:
    """Greedy decoding led by `reference` (torch); `candidate` reads the same tokens.
    -> {max_abs_logit_diff, greedy_identical, first_divergence (step or None), tokens, max_abs_logit (reference's)}"""
    return compare_sessions(reference.start_decoding(input_ids, attention_mask, steps),
                            candidate.start_decoding(input_ids, attention_mask, steps), steps)


def compare_sessions(ours, theirs, steps: int) -> dict:
    """`compare_decoding` over two started decoding sessions."""
    expected, got = ours.first_logits(), theirs.first_logits()
    worst, largest, divergence, tokens = 0.0, 0.0, None, []
    for step in range(steps):
        diff = (expected.float() - got.float()).abs().max().item()
        worst = max(worst, diff if diff == diff else float("inf"))  # a NaN is the worst difference, not none
        largest = max(largest, expected.float().abs().max().item())
        chosen = expected.argmax(dim=-1)
        if divergence is None and not bool((got.argmax(dim=-1) == chosen).all()):
            divergence = step
        tokens.append(chosen)
        if step < steps - 1:
            expected, got = ours.step(chosen), theirs.step(chosen)
    return {"max_abs_logit_diff": worst, "greedy_identical": divergence is None, "first_divergence": divergence,
            "tokens": torch.stack(tokens, dim=1), "max_abs_logit": largest}


def validate(model, onnx_model, prompt_lens: list[int], steps: int, batch: int, tolerance: float, seed: int) -> dict:
    """Run `compare_decoding` per prompt length; `passed` needs every diff <= tolerance and
    identical greedy tokens everywhere."""
    generator = torch.Generator().manual_seed(seed)
    pad_side = "right" if model.config.is_encoder_decoder else "left"
    cases = []
    for length in prompt_lens:
        ids, mask = random_batch(model.config, batch, length, generator, pad_side)
        cases.append(_case(length, batch, steps, compare_decoding(model, onnx_model, ids, mask, steps)))
    return _report(cases, tolerance, seed)


def _case(length: int, batch: int, steps: int, result: dict) -> dict:
    return {"prompt_len": length, "batch": batch, "steps": steps, "max_abs_logit_diff": result["max_abs_logit_diff"],
            "greedy_identical": result["greedy_identical"], "first_divergence": result["first_divergence"]}


def _report(cases: list[dict], tolerance: float, seed: int) -> dict:
    worst = max(c["max_abs_logit_diff"] for c in cases)
    identical = all(c["greedy_identical"] for c in cases)
    return {"passed": worst <= tolerance and identical, "max_abs_logit_diff": worst, "tolerance": tolerance,
            "greedy_identical": identical, "seed": seed, "cases": cases}


@torch.inference_mode()
def validate_vision(vlm, onnx_model, prompt_lens: list[int], steps: int, batch: int, tolerance: float, seed: int) -> dict:
    """A vision export: vision.onnx against the torch tower + compressor + projector on random crops,
    then greedy decoding with shape-scene images (each prompt starts with <image>), as `validate`."""
    from slmctl.data.shapes import ShapeScenes

    generator = torch.Generator().manual_seed(seed)
    size = vlm.tower.image_size
    pixels = torch.rand(3, 3, size, size, generator=generator)
    got = torch.from_numpy(onnx_model.run("vision", {"pixel_values": pixels.numpy()})[0].numpy())
    vision_diff = (vlm.crop_tokens(pixels) - got).abs().max().item()
    scenes, cases = ShapeScenes(seed=seed), []
    for length in prompt_lens:
        ids, mask = random_batch(vlm.config, batch, max(length, 2), generator, "right")
        ids[:, 0] = vlm.image_token_id
        images = [[scenes.example("validation", length * batch + b)["image"]] for b in range(batch)]
        embeds, embed_mask = vlm.embed_inputs(ids, mask, images)
        ours = vlm.text.start_decoding(None, embed_mask, steps, inputs_embeds=embeds)
        expanded, expanded_mask, onnx_model.image_features = onnx_model.prepare_images(ids, mask, images)
        try:
            result = compare_sessions(ours, onnx_model.start_decoding(expanded, expanded_mask, steps), steps)
        finally:
            onnx_model.image_features = None
        cases.append(_case(length, batch, steps, result))
    report = _report(cases, tolerance, seed)
    return report | {"passed": report["passed"] and vision_diff <= tolerance, "vision_max_abs_diff": vision_diff}


def token_agreement(reference, candidate, prompts: list[torch.Tensor], steps: int) -> dict:
    """How often `candidate` (e.g. int8) picks the token `reference` (fp32) picks, both decoding
    greedily on their own from the same prompts: the fraction of positions, up to each pair's
    first difference counted as disagreement from there on, plus the exact-sequence rate."""
    agree = total = identical = 0
    with torch.inference_mode():
        for ids in prompts:
            a = reference.generate(ids, max_new_tokens=steps)
            b = candidate.generate(ids, max_new_tokens=steps)
            width = min(a.shape[1], b.shape[1])
            same = (a[:, :width] == b[:, :width]).long().cumprod(dim=1)  # a prefix counts, not lucky re-alignment
            agree += int(same.sum())
            total += a.shape[0] * max(a.shape[1], b.shape[1])
            identical += int(((a.shape == b.shape) and bool((a == b).all())))
    return {"token_agreement": agree / max(total, 1), "identical_sequences": identical / max(len(prompts), 1),
            "prompts": len(prompts), "steps": steps}
