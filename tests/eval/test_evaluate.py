"""The eval stage: tasks from local files, generation + scoring into a run, scoring other
systems' predictions, and the side-by-side report."""

import json
import time

import pytest
import torch
from conftest import TINY_PRETRAIN, TINY_SYNTHETIC_DATA, TINY_TRAINING, ChatServer, cli, train_run

from slmctl.config.compose import compose
from slmctl.data.sources import DataError
from slmctl.errors import ConfigError
from slmctl.eval import evaluate
from slmctl.eval.tasks import load_task
from slmctl.runs.run import Run

SQUAD_ROWS = [
    {"id": "q1", "question": "Where does Ana live?", "context": "Ana lives in Porto.",
     "answers": {"text": ["Porto", "in Porto"], "answer_start": [13, 10]}},
    {"id": "q2", "question": "Who is the king?", "context": "Ana lives in Porto.", "answers": {"text": [], "answer_start": []}},
    {"id": "q3", "question": "What does Ana read?", "context": "Ana reads the news.",
     "answers": {"text": ["the news"], "answer_start": [10]}},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny trained models: an encoder-decoder and a decoder-only baseline (shared tokenizer)."""
    runs = tmp_path_factory.mktemp("runs")
    encdec = train_run(runs, "pretrain", TINY_PRETRAIN, name="encdec")
    deconly = train_run(runs, "pretrain", ["model=deconly-tiny", "objective=seq2seq", *TINY_SYNTHETIC_DATA, *TINY_TRAINING,
                                           "tokenizer=run", f"tokenizer.path={encdec.path}"], name="deconly")
    return runs, [encdec.path, deconly.path]


def evaluate_run(runs, overrides, models=(), predictions=None):
    synthetic = [] if any(o.startswith("task=") for o in overrides) else ["task.n_people=200"]
    cfg = compose("eval", [*synthetic, "bootstrap=200", *overrides])
    cfg.models, cfg.predictions = list(models), predictions
    run = Run.create(runs, "eval", "eval", cfg, argv=["test"])
    evaluate.run(cfg, run)
    return run


# -- tasks -------------------------------------------------------------------------------------


def test_squad_task_from_local_jsonl_keeps_unanswerable_questions(tmp_path):
    path = write_jsonl(tmp_path / "dev.jsonl", SQUAD_ROWS)
    examples = load_task(compose("eval", ["task=squad_v2", f"task.data_files={path}"]).task)
    assert [e.id for e in examples] == ["q1", "q2", "q3"]
    assert examples[0].references == ["Porto", "in Porto"] and examples[1].references == []
    assert examples[0].source == ("Answer the following question based only on the context.\n###Question\n"
                                  "Where does Ana live?\n###Context\nAna lives in Porto.\n###Answer\n")


def test_column_task_from_csv_and_its_errors(tmp_path):
    (tmp_path / "x.csv").write_text("id,document,summary\nd1,A long text.,Short.\n")
    examples = load_task(compose("eval", ["task=xsum", f"task.data_files={tmp_path / 'x.csv'}"]).task)
    assert examples[0].id == "d1" and examples[0].references == ["Short."] and "A long text." in examples[0].source
    (tmp_path / "bad.csv").write_text("id,text,summary\nd1,A long text.,Short.\n")
    with pytest.raises(DataError, match="has no column 'document'.*the task needs: document, summary"):
        load_task(compose("eval", ["task=xsum", f"task.data_files={tmp_path / 'bad.csv'}"]).task)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="task jsonl: .*empty.jsonl is empty: no rows to read"):
        load_task(compose("eval", ["task=jsonl", f"task.data_files={tmp_path / 'empty.jsonl'}"]).task)
    with pytest.raises(DataError, match="no such file"):
        load_task(compose("eval", ["task=jsonl", f"task.data_files={tmp_path / 'none.jsonl'}"]).task)


# -- scoring other systems' outputs -------------------------------------------------------------------


def test_predictions_file_is_scored_with_the_official_squad_rules(tmp_path):
    data = write_jsonl(tmp_path / "dev.jsonl", SQUAD_ROWS)
    predictions = write_jsonl(tmp_path / "system.jsonl", [
        {"id": "q1", "prediction": "The Porto!"},  # articles and punctuation do not count
        {"id": "q2", "prediction": ""},  # unanswerable, abstained: right
        {"id": "q3", "prediction": "news today"},  # F1 = 2 * (1/2 * 1) / (1/2 + 1) = 2/3
    ])
    run = evaluate_run(tmp_path / "runs", ["task=squad_v2", f"task.data_files={data}",
                                           "task.metrics=[exact_match,f1,exact_match_has_ans,exact_match_no_ans,rougeLsum]"],
                       predictions=str(predictions))
    scores = json.loads((run.path / "metrics.json").read_text())["tasks"]["squad_v2"]["models"]["system"]
    assert scores["exact_match"]["value"] == pytest.approx(2 / 3)
    assert scores["f1"]["value"] == pytest.approx((1 + 1 + 2 / 3) / 3)
    assert scores["exact_match_has_ans"]["n"] == 2 and scores["exact_match_no_ans"]["value"] == 1.0
    lines = [json.loads(x) for x in (run.path / "predictions.jsonl").read_text().splitlines()]
    assert [x["scores"]["exact_match"] for x in lines] == [1.0, 1.0, 0.0]


def test_bad_predictions_files_are_one_line_errors(tmp_path):
    data = write_jsonl(tmp_path / "dev.jsonl", SQUAD_ROWS)
    (tmp_path / "broken.jsonl").write_text('{"id": "q1", "prediction": "x"}\nnot json\n')
    write_jsonl(tmp_path / "partial.jsonl", [{"id": "q1", "prediction": "Porto"}])
    for name, message in [("broken.jsonl", "broken.jsonl:2: not valid JSON"),
                          ("partial.jsonl", "2 of the task's 3 examples have no prediction (first: id 'q2')")]:
        result = cli("eval", "--predictions", str(tmp_path / name), "task=squad_v2",
                     f"task.data_files={data}", runs=tmp_path / "runs")
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    result = cli("eval", "task=squad_v2", f"task.data_files={data}", runs=tmp_path / "runs")
    assert result.exit_code == 2 and "give model(s)" in result.output


# -- models ------------------------------------------------------------------------------------------


def test_side_by_side_report_matches_single_model_runs(tmp_path, models, capsys):
    runs, (encdec, deconly) = models
    both = evaluate_run(runs, ["limit=12"], models=[str(encdec), str(deconly)])
    shown = capsys.readouterr().out
    assert "synthetic_qa: side by side" in shown and "exact_match" in shown
    metrics = json.loads((both.path / "metrics.json").read_text())["tasks"]["synthetic_qa"]["models"]
    assert list(metrics) == ["encdec", "deconly"]
    assert (both.path / "comparison-synthetic_qa.png").stat().st_size > 1000
    lines = [json.loads(x) for x in (both.path / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 24 and {x["model"] for x in lines} == {"encdec", "deconly"}
    for label, path in [("encdec", encdec), ("deconly", deconly)]:
        alone = evaluate_run(runs, ["limit=12", "batch_size=5"], models=[str(path)])  # batching does not change results
        single = json.loads((alone.path / "metrics.json").read_text())["tasks"]["synthetic_qa"]["models"][label]
        for name, result in single.items():  # generation identical; perplexity up to padding's float rounding
            expected = metrics[label][name]
            assert result == (expected if name != "perplexity" else pytest.approx(expected, rel=1e-5))
        assert not list(alone.path.glob("comparison*.png"))
        em = [x["scores"]["exact_match"] for x in lines if x["model"] == label]
        assert single["exact_match"]["value"] == pytest.approx(sum(em) / len(em))
        assert single["perplexity"]["value"] > 1.0 and single["perplexity"]["low"] <= single["perplexity"]["value"]
    assert {i["role"] for i in json.loads((both.path / "inputs.json").read_text())} == {"model"}
    # the paired comparison: each model against the last, on the same examples
    [pair] = json.loads((both.path / "metrics.json").read_text())["tasks"]["synthetic_qa"]["paired"]
    assert (pair["model"], pair["baseline"]) == ("encdec", "deconly") and "paired differences" in shown
    for metric in ("exact_match", "f1", "rougeLsum"):
        per_model = {label: [x["scores"][metric] for x in lines if x["model"] == label] for label in ("encdec", "deconly")}
        expected = (sum(per_model["encdec"]) - sum(per_model["deconly"])) / 12
        difference = pair["metrics"][metric]
        assert difference["difference"] == pytest.approx(expected, abs=1e-3) and difference["n"] == 12
        assert difference["low"] <= difference["difference"] <= difference["high"]
    reversed_run = evaluate_run(runs, ["limit=12", "pairs=[[1,0]]"], models=[str(encdec), str(deconly)])
    [flipped] = json.loads((reversed_run.path / "metrics.json").read_text())["tasks"]["synthetic_qa"]["paired"]
    assert flipped["model"] == "deconly" and flipped["metrics"]["f1"]["difference"] == pytest.approx(
        -pair["metrics"]["f1"]["difference"])
    with pytest.raises(ConfigError, match="two different positions in models"):
        evaluate_run(runs, ["limit=4", "pairs=[[0,2]]"], models=[str(encdec), str(deconly)])


def test_the_cost_of_answering_counts_the_cpu_seconds_of_generation(tmp_path, models, monkeypatch):
    """metrics.json's cost per model = the process CPU seconds spent generating the answers: a
    generator made to burn 0.2 CPU s per batch costs about that much more than the plain one."""
    from slmctl.eval import predict

    runs, (encdec, _) = models
    generate = predict.predict_batches

    def slower(*args, **kwargs):
        for batch, texts in generate(*args, **kwargs):
            burn_until = time.process_time() + 0.2
            while time.process_time() < burn_until:
                pass
            yield batch, texts

    monkeypatch.setattr(predict, "predict_batches", slower)
    slowed = evaluate_run(runs, ["limit=12", "batch_size=4"], models=[str(encdec)])
    cost = json.loads((slowed.path / "metrics.json").read_text())["tasks"]["synthetic_qa"]["cost"]["encdec"]
    assert cost["examples"] == 12
    # three batches, each burning 0.2 CPU s while generating: a lower bound that holds however busy the machine
    # is (a comparison with an unslowed run does not: its own CPU time varies by seconds on 2 busy cores)
    assert cost["cpu_s"] >= 0.6 and cost["wall_s"] >= 0.6
    assert "answers generated in" in (slowed.path / "log.txt").read_text()


def test_the_paired_bootstrap_sees_a_difference_that_separate_intervals_hide():
    from slmctl.eval.metrics import bootstrap_ci, paired_bootstrap_ci

    baseline = [1.0] * 60 + [0.0] * 40
    better = [1.0] * 70 + [0.0] * 30  # right on everything the baseline gets right, and on 10 more
    difference, low, high = paired_bootstrap_ci(better, baseline, n_resamples=2000, seed=0)
    assert difference == pytest.approx(0.1) and 0 < low < 0.1 < high
    _, better_low, _ = bootstrap_ci(better, n_resamples=2000, seed=0)
    _, _, baseline_high = bootstrap_ci(baseline, n_resamples=2000, seed=0)
    assert better_low < baseline_high  # the two models' own intervals overlap
    assert paired_bootstrap_ci(baseline, baseline) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same examples"):
        paired_bootstrap_ci(better, baseline[:50])


# -- the judge inside an eval run -------------------------------------------------------------------


def test_judge_scores_are_reported_cached_and_the_key_is_never_written(tmp_path, monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLMCTL_TEST_KEY", "sk-very-secret")
    data = write_jsonl(tmp_path / "dev.jsonl", SQUAD_ROWS)
    predictions = write_jsonl(tmp_path / "system.jsonl", [{"id": r["id"], "prediction": "Porto"} for r in SQUAD_ROWS])
    with ChatServer(content="Mostly right.\nScore: 0.6") as server:
        overrides = ["task=squad_v2", f"task.data_files={data}", "judge=endpoint", f"judge.endpoint={server.url}",
                     "judge.model=judge-model", "judge.api_key_env=SLMCTL_TEST_KEY", f"judge.cache_dir={tmp_path / 'cache'}"]
        first = evaluate_run(tmp_path / "runs", overrides, predictions=str(predictions))
        second = evaluate_run(tmp_path / "runs", overrides, predictions=str(predictions))
    assert len(server.requests) == 3 and server.requests[0]["authorization"] == "Bearer sk-very-secret"
    judge = json.loads((first.path / "metrics.json").read_text())["tasks"]["squad_v2"]["models"]["system"]["judge"]
    assert judge["value"] == pytest.approx(0.6) and judge["n"] == 3 and judge["missing"] == 0
    assert "3 scored, 0 unparsable (missing), 3 from cache, 0 calls" in (second.path / "log.txt").read_text()
    for run in (first, second):
        for path in run.path.rglob("*"):
            if path.is_file():
                assert "sk-very-secret" not in path.read_text(errors="ignore"), path


def test_tasks_list_runs_each_task_with_its_defaults(tmp_path, models):
    runs, (encdec, _) = models
    cfg = compose("eval", ["tasks=[synthetic_qa,jsonl]", "limit=3", "bootstrap=50"])
    cfg.models = [str(encdec)]
    with pytest.raises(DataError, match="task jsonl: give task.data_files=PATH"):  # jsonl's defaults name no file
        evaluate.run(cfg, Run.create(runs, "eval", "bad", cfg, argv=["test"]))
    cfg = compose("eval", ["tasks=[synthetic_qa]", "task=jsonl", "task.data_files=unused.jsonl", "limit=3", "bootstrap=50"])
    cfg.models = [str(encdec)]
    run = Run.create(runs, "eval", "listed", cfg, argv=["test"])
    evaluate.run(cfg, run)  # the list wins over the `task` group
    lines = [json.loads(x) for x in (run.path / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and {x["task"] for x in lines} == {"synthetic_qa"}
    assert list(json.loads((run.path / "metrics.json").read_text())["tasks"]) == ["synthetic_qa"]


def test_beam_search_predictions(models):
    runs, (encdec, deconly) = models
    run = evaluate_run(runs, ["limit=4", "generation.num_beams=3", "generation.max_new_tokens=4"],
                       models=[str(encdec), str(deconly)])
    lines = [json.loads(x) for x in (run.path / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and all(len(x["prediction"].split()) <= 4 for x in lines)


def test_the_decode_speed_counts_the_tokens_after_the_first_over_the_time_after_it(tmp_path, models, monkeypatch):
    """cost's decode_tok_s leaves the encoder's prefill out (the time drafting cannot change): a prefill
    slowed by 0.25 s shows in first_token_ms and not in the decode time, and decode_tokens is every
    answer's tokens after its first, its EOS included."""
    from slmctl.eval.predict import DecodeClock, predict_batches
    from slmctl.model.encdec import EncoderDecoderLM
    from slmctl.runtime.generator import load_generator

    runs, (encdec, _) = models
    generator, clock = load_generator(str(encdec), runs, "cpu", runtime="torch"), DecodeClock()
    eos, pad = generator.tokenizer.eos_id, generator.tokenizer.pad_id
    answers = torch.tensor([[5, 6, eos, pad, pad], [5, 6, 7, 8, 9]])  # 2 tokens after the first with EOS, 4 without

    def generate(ids, mask, streamer=None, **kwargs):
        streamer(answers[:, 0])
        return answers

    monkeypatch.setattr(generator.model, "generate", generate)
    assert len(list(predict_batches(generator, ["a question", "another question"], batch_size=2, clock=clock))) == 1
    assert clock.decode_tokens == 2 + 4 and clock.first_token_s > 0 and clock.decode_s > 0
    monkeypatch.undo()

    prefill = EncoderDecoderLM.start_decoding

    def slow_prefill(self, *args, **kwargs):
        time.sleep(0.25)
        return prefill(self, *args, **kwargs)

    monkeypatch.setattr(EncoderDecoderLM, "start_decoding", slow_prefill)
    run = evaluate_run(runs, ["limit=4", "batch_size=2", "generation.max_new_tokens=8"], models=[str(encdec)])
    cost = json.loads((run.path / "metrics.json").read_text())["tasks"]["synthetic_qa"]["cost"]["encdec"]
    assert cost["first_token_ms"] >= 250 and cost["wall_s"] >= 0.5  # each answer waited for its batch's slowed prefill
    assert cost["decode_tokens"] > 0 and cost["decode_tokens"] / cost["decode_tok_s"] < cost["wall_s"] - 0.4


def test_eval_with_drafts_gives_the_plain_predictions_and_logs_the_acceptance(tmp_path, models):
    runs, (encdec, deconly) = models
    about = ["task=synthetic_about", "task.n_people=200", "limit=6", "generation.max_new_tokens=24"]  # the long-output task
    plain = evaluate_run(runs, about, models=[str(encdec)])
    drafted = evaluate_run(runs, [*about, "generation.draft=prompt", "generation.draft_tokens=4", "generation.draft_ngram=3"],
                           models=[str(encdec)])
    predictions = [(run.path / "predictions.jsonl").read_text() for run in (plain, drafted)]
    assert predictions[0] == predictions[1]
    assert "draft prompt:" in (drafted.path / "log.txt").read_text()
    costs = [json.loads((run.path / "metrics.json").read_text())["tasks"]["synthetic_about"]["cost"] for run in (plain, drafted)]
    (plain_cost,), (drafted_cost,) = (list(c.values()) for c in costs)  # what the summary's drafting table reads
    assert "draft" not in plain_cost and drafted_cost["draft"]["drafter"] == "prompt" and drafted_cost["draft"]["draft_ngram"] == 3
    assert drafted_cost["draft"]["passes"] > 0 and 0 <= drafted_cost["draft"]["accepted"] <= drafted_cost["draft"]["drafted"]
    assert drafted_cost["decode_tokens"] == plain_cost["decode_tokens"] > 0  # the same tokens, so the same count
    # a draft model: the model drafting for itself keeps every draft and changes no prediction
    itself = evaluate_run(runs, [*about, f"generation.draft={encdec}", "generation.draft_tokens=4"], models=[str(encdec)])
    assert (itself.path / "predictions.jsonl").read_text() == predictions[0]
    (cost,) = json.loads((itself.path / "metrics.json").read_text())["tasks"]["synthetic_about"]["cost"].values()
    assert cost["draft"]["drafter"].startswith("model") and cost["draft"]["accepted"] == cost["draft"]["drafted"] > 0
    for overrides, message in ((["generation.draft=no-such-model"], "generation.draft='no-such-model'"),
                               (["generation.draft_tokens=0"], "must be > 0"), (["generation.draft_ngram=0"], "must be > 0")):
        result = cli("eval", encdec, "limit=2", *overrides, runs=tmp_path / "refused")
        assert result.exit_code == 2 and message in result.output and not (tmp_path / "refused").exists()
    refused = cli("eval", deconly, "limit=2", "--draft", "prompt", runs=tmp_path / "runs")
    assert refused.exit_code == 2 and "--draft works on encoder-decoders" in refused.output
