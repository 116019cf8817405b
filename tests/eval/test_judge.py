"""The LLM-as-judge of `slmctl eval`: rubric prompt, score parsing, a real local model, an
OpenAI-compatible endpoint served by the test, and the score cache."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ChatServer, cli

from slmctl.eval import judge as judge_module
from slmctl.eval.judge import (
    MAX_FIELD_CHARS,
    EndpointJudge,
    JudgeCache,
    JudgeError,
    JudgeResult,
    LocalJudge,
    judge_examples,
    judge_prompt,
    parse_score,
)

EXAMPLES = [
    {"source": "Where was Ada Lovelace born?", "reference": "London", "prediction": "She was born in London."},
    {"source": "Who wrote Hamlet?", "reference": "William Shakespeare", "prediction": "Christopher Marlowe"},
    {"source": "What is 2 + 2?", "reference": "4", "prediction": "four"},
]
SENTENCES = ["The judge reads the source, the reference and the prediction.",
             "Score the answer for correctness between zero and one.",
             "Ada Lovelace was born in London in 1815.", "Hamlet was written by William Shakespeare."]


# -- prompt and parsing ------------------------------------------------------------------


def test_prompt_places_the_fields_and_asks_for_the_score_line():
    prompt = judge_prompt(" the source ", "the reference", "the prediction")
    source, reference, prediction = (prompt.index(f"\n{x}\n") for x in ("the source", "the reference", "the prediction"))
    assert prompt.index("SOURCE") < source < prompt.index("REFERENCE") < reference < prompt.index("PREDICTION") < prediction
    assert prompt.rstrip().endswith("Score: <number between 0 and 1>")
    assert "{" not in prompt  # braces in fields are kept as they are, no field left unfilled
    assert "a {b} c" in judge_prompt("a {b} c", "r", "p")


def test_prompt_truncates_overlong_fields():
    long = "x" * (MAX_FIELD_CHARS + 500)
    prompt = judge_prompt(long, "ref", "pred")
    assert "x" * MAX_FIELD_CHARS + judge_module.TRUNCATION_MARK in prompt
    assert "x" * (MAX_FIELD_CHARS + 1) not in prompt
    assert "ref" in prompt and "pred" in prompt
    assert "y" * MAX_FIELD_CHARS in judge_prompt("y" * MAX_FIELD_CHARS, "r", "p")  # at the limit: untouched
    assert judge_module.TRUNCATION_MARK not in judge_prompt("y" * MAX_FIELD_CHARS, "r", "p")


@pytest.mark.parametrize("reply, score", [
    ("Score: 0.75", 0.75),
    ("score: 1", 1.0),
    ("SCORE: 0", 0.0),
    ("Score: .5", 0.5),
    ("The answer names the right city.\nScore: 0.9.", 0.9),
    ("**Score:** 0.4", 0.4),
    ("Score: 0.2\nOn reflection it is right.\nScore: 0.8", 0.8),  # the last one wins
    ("Score: 7", None),
    ("Score: 1.5", None),
    ("Score: -0.5", None),
    ("Score: 6/10", None),
    ("no score here", None),
    ("Score: abc", None),
    ("Score: 0.9\nScore: abc", None),  # the final line decides
    ("", None),
])
def test_parse_score(reply, score):
    assert parse_score(reply) == score


def test_result_mean():
    assert JudgeResult([1.0, None, 0.5], missing=1, cached=0, calls=3).mean() == 0.75
    assert JudgeResult([None, None], missing=2, cached=0, calls=2).mean() is None


# -- local judge ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def judge_llama_dir(tmp_path_factory):
    """A tiny random LlamaForCausalLM with a byte-level BPE tokenizer of English sentences, as
    `save_pretrained` leaves them (conftest's llama_dir speaks the synthetic world's tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp("judge-llama")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(SENTENCES, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def local_judge(judge_llama_dir):
    return LocalJudge(str(judge_llama_dir), max_new_tokens=8, batch_size=2, dtype="float32")


def test_local_judge_completes_each_prompt(local_judge, judge_llama_dir):
    assert local_judge.id.startswith(f"local:{judge_llama_dir.resolve()}")
    prompts = ["short", judge_prompt(**EXAMPLES[0]), "a third, longer prompt about Hamlet"]  # 2 batches, uneven lengths
    replies = local_judge.complete(prompts)
    assert len(replies) == 3 and all(isinstance(r, str) for r in replies)
    assert replies[0] == local_judge.complete(["short"])[0]  # greedy, and left padding does not change the reply
    assert "SOURCE" not in replies[1]  # the new text only, not the prompt


def test_local_judge_uses_the_chat_template(local_judge, monkeypatch):
    assert local_judge._text("grade this") == "grade this"  # no template: the raw prompt
    template = "{% for m in messages %}<s>[USER] {{ m['content'] }}{% endfor %}{% if add_generation_prompt %} [JUDGE]{% endif %}"
    monkeypatch.setattr(local_judge.tokenizer, "chat_template", template)
    assert local_judge._text("grade this") == "<s>[USER] grade this [JUDGE]"
    assert len(local_judge.complete(["grade this", "and this"])) == 2


def test_local_judge_unparsable_replies_are_missing_and_cached(local_judge, tmp_path):
    cache = JudgeCache(tmp_path)
    progress = []
    first = judge_examples(local_judge, EXAMPLES, cache=cache, on_progress=progress.append)
    assert first.scores == [None] * 3 and first.missing == 3 and first.mean() is None
    assert (first.cached, first.calls) == (0, 3) and sum(progress) == 3
    second = judge_examples(local_judge, EXAMPLES, cache=JudgeCache(tmp_path))
    assert (second.cached, second.calls, second.missing) == (3, 0, 3)


def test_local_judge_parsable_replies(local_judge, tmp_path, monkeypatch):
    sent = []

    def complete(prompts):
        sent.append(len(prompts))
        return [f"Looks right.\nScore: {0.5 if 'Hamlet' in p else 1}" for p in prompts]

    monkeypatch.setattr(local_judge, "complete", complete)
    result = judge_examples(local_judge, [*EXAMPLES, EXAMPLES[0]], cache=JudgeCache(tmp_path))
    assert result.scores == [1.0, 0.5, 1.0, 1.0] and result.missing == 0 and result.mean() == 0.875
    assert sent == [2, 1] and result.calls == 3  # chunks of batch_size; the repeated example is sent once


def test_local_judge_errors(tmp_path, judge_llama_dir):
    with pytest.raises(JudgeError, match="no such directory"):
        LocalJudge(str(tmp_path / "nothing"))
    with pytest.raises(JudgeError, match="cannot load judge model"):
        LocalJudge(str(tmp_path))  # a directory without a model
    with pytest.raises(JudgeError, match="dtype"):
        LocalJudge(str(judge_llama_dir), dtype="float8")
    with pytest.raises(JudgeError, match="'prediction' must be a string"):
        judge_examples(object(), [{"source": "s", "reference": "r", "prediction": None}])


# -- endpoint judge ------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def fast(judge: EndpointJudge) -> EndpointJudge:
    judge.backoff = 0.01
    return judge


def test_endpoint_judge_request_key_and_scores(tmp_path, monkeypatch):
    monkeypatch.setenv("SLMCTL_TEST_KEY", "sk-secret")
    with ChatServer() as server:
        judge = EndpointJudge(server.url + "/", "judge-model", api_key_env="SLMCTL_TEST_KEY", max_tokens=50)
        result = judge_examples(judge, EXAMPLES, cache=JudgeCache(tmp_path))
    assert result.scores == [0.6] * 3 and result.missing == 0 and result.calls == 3
    assert judge.id.startswith(f"endpoint:{server.url}:judge-model")
    first = server.requests[0]
    assert first["path"] == "/v1/chat/completions"
    assert first["json"]["model"] == "judge-model" and first["json"]["temperature"] == 0 and first["json"]["max_tokens"] == 50
    assert first["json"]["messages"] == [{"role": "user", "content": judge_prompt(**EXAMPLES[0])}]
    assert all(r["authorization"] == "Bearer sk-secret" for r in server.requests)
    assert "sk-secret" not in repr(judge)
    assert not any("sk-secret" in str(v) for v in vars(judge).values())
    assert "sk-secret" not in (tmp_path / JudgeCache.FILENAME).read_text()


def test_endpoint_judge_sends_no_header_without_a_key(monkeypatch):
    monkeypatch.delenv("SLMCTL_TEST_KEY", raising=False)
    with ChatServer() as server:
        assert EndpointJudge(server.url, "m", api_key_env="SLMCTL_TEST_KEY").complete(["p"]) == ["Reasoning...\nScore: 0.6"]
    assert server.requests[0]["authorization"] is None


def test_endpoint_judge_retries_server_errors():
    with ChatServer(statuses=[500, 500]) as server:
        assert fast(EndpointJudge(server.url, "m")).complete(["p"]) == ["Reasoning...\nScore: 0.6"]
    assert len(server.requests) == 3
    with ChatServer(statuses=[503, 503, 503]) as server, pytest.raises(JudgeError, match="HTTP 503"):
        fast(EndpointJudge(server.url, "m")).complete(["p"])


def test_endpoint_judge_errors_are_one_line(monkeypatch):
    monkeypatch.setenv("SLMCTL_TEST_KEY", "sk-secret")
    with ChatServer(statuses=[401]) as server, pytest.raises(JudgeError, match="HTTP 401") as error:
        fast(EndpointJudge(server.url, "m", api_key_env="SLMCTL_TEST_KEY")).complete(["p"])
    assert len(server.requests) == 1  # not retried
    assert "\n" not in str(error.value) and "sk-secret" not in str(error.value)

    monkeypatch.delenv("SLMCTL_TEST_KEY")
    with ChatServer(statuses=[401]) as server, pytest.raises(JudgeError, match="SLMCTL_TEST_KEY is not set"):
        EndpointJudge(server.url, "m", api_key_env="SLMCTL_TEST_KEY").complete(["p"])

    with ChatServer() as server:
        closed = server.url
    with pytest.raises(JudgeError, match="cannot reach") as error:
        fast(EndpointJudge(closed, "m")).complete(["p"])
    assert "\n" not in str(error.value)

    with pytest.raises(JudgeError, match="not an http"):
        EndpointJudge("localhost:8000/v1", "m")


# -- cache ---------------------------------------------------------------------------------


def test_cache_round_trip_persistence_and_misses(tmp_path, monkeypatch):
    cache = JudgeCache(tmp_path / "eval")
    assert cache.get("j", "prompt") is None
    cache.put("j", "prompt", 0.25, "Score: 0.25")
    cache.put("j", "other", None, "rambling")
    assert cache.get("j", "prompt") == {"score": 0.25, "reply": "Score: 0.25"}
    again = JudgeCache(tmp_path / "eval")
    assert again.get("j", "prompt") == {"score": 0.25, "reply": "Score: 0.25"}
    assert again.get("j", "other") == {"score": None, "reply": "rambling"}
    assert again.get("another judge", "prompt") is None
    again.put("j", "prompt", 1.0, "Score: 1")  # later lines win
    assert JudgeCache(tmp_path / "eval").get("j", "prompt")["score"] == 1.0
    monkeypatch.setattr(judge_module, "RUBRIC_VERSION", "2")
    assert JudgeCache(tmp_path / "eval").get("j", "prompt") is None


def test_cache_skips_corrupt_lines(tmp_path):
    cache = JudgeCache(tmp_path)
    cache.put("j", "a", 0.5, "Score: 0.5")
    with cache.path.open("a") as f:
        f.write('not json\n["a list"]\n{"key": "j|x", "score": "high", "reply": ""}\n{"key": "cut off')  # a crash mid-write
    reopened = JudgeCache(tmp_path)
    assert reopened.get("j", "a") == {"score": 0.5, "reply": "Score: 0.5"}
    reopened.put("j", "b", 1.0, "Score: 1")  # starts on a new line after the cut-off one
    assert JudgeCache(tmp_path).get("j", "b") == {"score": 1.0, "reply": "Score: 1"}
    assert JudgeCache(tmp_path).get("j", "a")["score"] == 0.5


def test_an_unreachable_judge_endpoint_is_one_line_and_exit_2_from_the_command(tmp_path, monkeypatch):
    """`slmctl eval ... judge=endpoint` against a port nothing listens on: one line on stderr naming
    the endpoint, exit 2, no traceback, and the eval run marked failed (JudgeError is a UserError)."""
    from slmctl.eval.judge import EndpointJudge
    from slmctl.runs.lookup import list_runs

    monkeypatch.setattr(EndpointJudge, "backoff", 0.01)
    with ChatServer() as server:
        closed = server.url
    rows = [{"id": "q1", "source": "Where does Ana live?", "target": "Porto"}]
    data = tmp_path / "dev.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text(json.dumps({"id": "q1", "prediction": "Porto"}) + "\n")
    result = cli("eval", "--predictions", predictions, "task=jsonl", f"task.data_files={data}", "judge=endpoint",
                 f"judge.endpoint={closed}", "judge.model=m", runs=tmp_path / "runs")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "cannot reach judge endpoint" in lines[0] and "Traceback" not in result.output
    (run,) = list_runs(tmp_path / "runs", "eval")
    assert run.status == "failed"


def test_the_default_cache_follows_xdg_cache_home_else_the_home_directory(tmp_path, monkeypatch):
    from slmctl.eval.evaluate import default_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "slmctl"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "slmctl"
