"""Property-based test of the command line's config overrides: random key=value pairs (real keys of each
stage with values of every shape, and made-up keys) given to `slmctl validate STAGE` end in exit 0 or
a one-line error with exit 2, never a traceback and never a run directory."""

import dataclasses

import pytest
from conftest import cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slmctl.config.registry import STAGE_SCHEMAS

STAGES = ["prepare", "pretrain", "distill", "add-vision", "eval", "export", "bench", "serve"]
KEYS = {stage: [f.name for f in dataclasses.fields(STAGE_SCHEMAS[stage])] for stage in STAGES}
GROUP_KEYS = ["trainer.max_steps", "trainer.precision", "optim.lr", "data.n_people", "model.d_model", "task.n",
              "tokenizer.vocab_size", "kd.alpha", "generation.num_beams", "judge.kind", "trainer.devices"]
VALUES = st.one_of(
    st.integers(min_value=-(2 ** 70), max_value=2 ** 70).map(str), st.floats().map(str),
    st.sampled_from(["", "null", "true", "[]", "[1,2", "{a: 1}", "${oops}", "${runs.x}", "???", "a=b", "'quoted'",
                     "\"", "~", "nan", "-inf", "1e400", "0x10", "../../etc", "\ud800", "é", " "]),
    st.text(max_size=12))


@st.composite
def overrides(draw, stage: str):
    pairs = []
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(KEYS[stage] + GROUP_KEYS) | st.text(min_size=1, max_size=10))
        pairs.append(f"{key}={draw(VALUES)}")
    return pairs


EXITS: dict[int, int] = {}  # exit code -> count over every example (both outcomes must occur)


@pytest.mark.parametrize("stage", STAGES)
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True)
@given(data=st.data())
def test_random_overrides_end_in_exit_0_or_one_line_exit_2(tmp_path, monkeypatch, stage, data):
    monkeypatch.chdir(tmp_path)  # where a stray run directory (./runs) would appear
    args = data.draw(overrides(stage))
    result = cli("validate", stage, *args)
    EXITS[result.exit_code] = EXITS.get(result.exit_code, 0) + 1
    assert result.exit_code in (0, 2), (args, result.output)
    assert "Traceback" not in result.output, (args, result.output)
    if result.exit_code == 2:
        errors = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(errors) == 1 and errors[0].startswith("error: "), (args, result.stderr)
    assert not (tmp_path / "runs").exists()


def test_the_fuzzing_reached_both_valid_and_refused_configs():
    assert EXITS.get(0, 0) >= 5 and EXITS.get(2, 0) >= 20, EXITS


@pytest.mark.parametrize("stage, args", [("distill", ["peft=0"]), ("export", ["trainer.max_steps=0"])])
def test_what_the_fuzzing_found_stays_a_one_line_error(stage, args):
    result = cli("validate", stage, *args)  # once a traceback each: a group given a number, a key the stage lacks
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
