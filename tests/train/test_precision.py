"""trainer.precision=auto: bf16-mixed on a CPU with native bf16 for a model large enough to gain, else fp32."""

import pytest

from slmctl.train.precision import BF16_MIN_PARAMETERS, choose_precision, resolve_precision

ZEN3 = {"cpu": "AMD EPYC 7B13", "cpu_features": ["avx2", "fma"]}
ZEN4 = {"cpu": "AMD EPYC 9B14", "cpu_features": ["avx2", "avx512f", "avx512_bf16"]}
XEON = {"cpu": "Intel(R) Xeon(R) Platinum 8481C", "cpu_features": ["avx512f", "amx_tile", "amx_bf16"]}


@pytest.mark.parametrize("identity, parameters, precision", [
    (ZEN4, 20_887_296, "bf16-mixed"),  # `small`: 1.45x faster steps in bf16-mixed
    (XEON, 332_042_240, "bf16-mixed"),
    (ZEN4, 2_103_040, "32-true"),  # `mini`: bf16-mixed steps are no faster
    (ZEN3, 332_042_240, "32-true"),  # no native bf16: emulated, far slower
    (ZEN4, BF16_MIN_PARAMETERS, "bf16-mixed"),
])
def test_the_training_precision_is_chosen_from_the_cpu_and_the_model_size(identity, parameters, precision):
    chosen, why = choose_precision(identity, parameters)
    assert chosen == precision and why


class Sized:
    def __init__(self, parameters):
        self.parameters = parameters

    def num_parameters(self):
        return self.parameters


def test_auto_is_resolved_and_said_once_and_a_chosen_precision_is_kept(monkeypatch):
    import slmctl.runtime.hardware as hardware

    monkeypatch.setattr(hardware, "cpu_identity", lambda: ZEN4)
    said = []
    resolved = resolve_precision({"accelerator": "cpu", "precision": "auto", "max_steps": 3}, Sized(50_000_000), said.append)
    assert resolved == {"accelerator": "cpu", "precision": "bf16-mixed", "max_steps": 3}
    assert len(said) == 1 and said[0].startswith("precision: bf16-mixed (AMD EPYC 9B14 computes bf16 natively")
    said.clear()
    kept = resolve_precision({"accelerator": "cpu", "precision": "32-true"}, Sized(50_000_000), said.append)
    assert kept["precision"] == "32-true" and not said


def test_a_pretrain_run_logs_the_precision_it_chose(tmp_path):
    from conftest import TINY_PRETRAIN, train_run

    run = train_run(tmp_path / "runs", "pretrain", [*TINY_PRETRAIN, "trainer.max_steps=2"])
    log = (run.path / "log.txt").read_text()
    assert "precision: 32-true (" in log  # `tiny` trains in fp32 on every CPU
