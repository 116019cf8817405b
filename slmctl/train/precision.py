"""`trainer.precision=auto` (the CPU trainer's default): bf16-mixed where it trains faster, else fp32.

bf16-mixed wins on a CPU that computes bf16 natively (AVX512_BF16 or AMX), and only once the
products are large enough for the faster matmuls to outweigh autocast's casts. Measured on a
2-core AMD EPYC (Zen 4, AVX512_BF16), `slmctl bench --train MODEL [--dtype bfloat16]`
(docs/speed.md): `mini` (2.1M parameters) 392 ms fp32 against 415 ms bf16-mixed a step, `small`
(20.9M) 2717 against 1868 ms, `330m` (4 x 576 tokens) 20.6 against 11.2 s; the quickstart's
pretraining stage ended at validation loss 0.560 in fp32 and 0.542 in bf16-mixed.
"""

from __future__ import annotations

from slmctl.runtime.prepacked import has_bf16

AUTO = "auto"
BF16_MIN_PARAMETERS = 10_000_000  # between mini (slower in bf16) and small (1.45x faster)


def choose_precision(identity: dict, parameters: int) -> tuple[str, str]:
    """(Lightning precision, why) for training a model of `parameters` on the CPU `identity` describes."""
    cpu = identity.get("cpu") or "this CPU"
    if not has_bf16(identity):
        return "32-true", f"{cpu} has no native bf16"
    if parameters < BF16_MIN_PARAMETERS:
        return "32-true", f"at {parameters / 1e6:.1f}M parameters fp32 steps are as fast as bf16-mixed ones"
    return "bf16-mixed", f"{cpu} computes bf16 natively, and at {parameters / 1e6:.0f}M parameters its steps are faster"


def resolve_precision(trainer_args: dict, model, say) -> dict:
    """`trainer_args` with precision=auto replaced by what `choose_precision` picks (CUDA: bf16-mixed
    where the GPU has it, else 16-mixed), said through `say` once."""
    if str(trainer_args.get("precision")) != AUTO:
        return trainer_args
    import torch

    if trainer_args.get("accelerator") in ("gpu", "cuda") or (trainer_args.get("accelerator") == "auto" and torch.cuda.is_available()):
        precision = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
        why = "the GPU's tensor cores"
    else:
        from slmctl.runtime.hardware import cpu_identity

        precision, why = choose_precision(cpu_identity(), model.num_parameters())
    say(f"precision: {precision} ({why}; trainer.precision=32-true or bf16-mixed to choose)")
    return {**trainer_args, "precision": precision}
