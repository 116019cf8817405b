"""`slmctl serve`: OpenAI's client against a server started here, bad input, disconnects, metrics,
API keys, a full queue, the run directory and a graceful SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
from conftest import cli, newest_run, running_server

from slmctl.runs.run import Run


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    runs = tmp_path_factory.mktemp("runs")
    with running_server(runs, tiny_model_dir, "max_tokens_cap=64", "max_prompt_tokens=48", "model_name=tiny") as s:
        yield s


def client(server, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0, **kwargs)


def printed_by_generate(model, prompt: str, max_new_tokens: int) -> str:
    """What `slmctl generate` prints as the answer (the line after "> prompt")."""
    result = cli("generate", model, f"prompt={prompt}", "--max-new-tokens", max_new_tokens)
    assert result.exit_code == 0, result.output
    assert f"> {prompt}\n" in result.stdout  # (a server thread of this process may have printed before it)
    return result.stdout.split(f"> {prompt}\n", 1)[1].removesuffix("\n")


PROMPT = "Where does the teacher from Oslo live?"


def test_openai_client_gets_what_generate_prints(server, tiny_model_dir):
    """Greedy completions and chat, streamed and not: exactly `slmctl generate`'s text, with usage."""
    expected = printed_by_generate(tiny_model_dir, PROMPT, 20)
    api = client(server)
    plain = api.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0)
    assert plain.choices[0].text == expected
    assert plain.usage.completion_tokens <= 20 and plain.usage.prompt_tokens > 0
    assert plain.choices[0].finish_reason in ("stop", "length")
    chat = api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=20,
                                       temperature=0)
    assert chat.choices[0].message.content == expected and chat.choices[0].message.role == "assistant"
    pieces = [c.choices[0].text for c in api.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0,
                                                                 stream=True)]
    assert "".join(pieces) == expected and len(pieces) > 2  # streamed as it was made, not in one piece
    chunks = list(api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=20,
                                              temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert [m.id for m in api.models.list().data] == ["tiny"]


def test_a_draft_model_serves_the_plain_answer_and_states_its_cache(tmp_path, tiny_model_dir):
    """`slmctl serve MODEL --draft MODEL` (a model drafting for itself): the same text, drafts counted in
    /metrics, and the draft model's cache per slot in the run's log."""
    expected = printed_by_generate(tiny_model_dir, PROMPT, 20)
    with running_server(tmp_path / "runs", tiny_model_dir, f"draft={tiny_model_dir}", "draft_tokens=4",
                        "model_name=tiny") as server:
        answer = client(server).completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0)
        assert answer.choices[0].text == expected
        assert server.engine.metrics.snapshot()["slmctl_draft_accepted_total"] > 0
    log = (newest_run(tmp_path / "runs", "serve") / "log.txt").read_text()
    assert "MB of self-attention cache per slot" in log


def test_sampling_follows_the_seed(server):
    api = client(server)
    ask = lambda seed: api.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=1.0, top_p=0.9,
                                              seed=seed).choices[0].text
    assert ask(1) == ask(1)
    assert len({ask(seed) for seed in range(2, 6)}) > 1


def test_a_conversation_goes_through_the_default_chat_template(server, tiny_model_dir):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who lives in Oslo?"}]
    api = client(server)
    reply = api.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    expected = printed_by_generate(tiny_model_dir, "System: Be brief.\nUser: Who lives in Oslo?\nAssistant:", 12)
    assert reply.choices[0].message.content == expected


BAD_REQUESTS = [  # why, body, status, error code, the field named as `param`
    ("malformed JSON", b'{"model": "tiny", "prompt": ', 400, "invalid_json", None),
    ("not an object", b"[1, 2]", 400, "invalid_json", None),
    ("unknown field", {"model": "tiny", "prompt": "hi", "temperatur": 0}, 400, "unknown_field", "temperatur"),
    ("prompt too long", {"model": "tiny", "prompt": "Where does Ana live? " * 40}, 400, "context_length_exceeded", "prompt"),
    ("max_tokens beyond the cap", {"model": "tiny", "prompt": "hi", "max_tokens": 65}, 400, "max_tokens_exceeded", "max_tokens"),
    ("unknown model", {"model": "gpt-4", "prompt": "hi"}, 404, "model_not_found", "model"),
    ("n > 1", {"model": "tiny", "prompt": "hi", "n": 2}, 400, "invalid_value", "n"),
    ("a bad temperature", {"model": "tiny", "prompt": "hi", "temperature": -1}, 400, "invalid_value", "temperature"),
    # hostile input: each of these once took the engine down, leaked a traceback or was quietly coerced
    ("a seed past the generator's range", {"model": "tiny", "prompt": "hi", "temperature": 0.7, "seed": 2 ** 64}, 400,
     "invalid_value", "seed"),
    ("an empty prompt", {"model": "tiny", "prompt": ""}, 400, "invalid_value", "prompt"),
    ("an empty prompt, streamed", {"model": "tiny", "prompt": "", "stream": True}, 400, "invalid_value", "prompt"),
    ("a lone surrogate", b'{"model": "tiny", "prompt": "\\ud800"}', 400, "invalid_value", "prompt"),
    ("max_tokens as a string", {"model": "tiny", "prompt": "hi", "max_tokens": "5"}, 400, "invalid_type", "max_tokens"),
    ("max_tokens as a boolean", {"model": "tiny", "prompt": "hi", "max_tokens": True}, 400, "invalid_type", "max_tokens"),
    ("an empty body", b"", 400, "invalid_json", None),
    ("bytes that are not UTF-8", b'{"model": "tiny", "prompt": "\xff\xfe"}', 400, "invalid_json", None),
    ("an unsupported field", {"model": "tiny", "prompt": "hi", "logprobs": 2}, 400, "unsupported_field", "logprobs"),
    ("megabytes of prompt", {"model": "tiny", "prompt": "x" * 900_000}, 400, "context_length_exceeded", "prompt"),
]


@pytest.mark.parametrize("why, body, status, code, param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_is_a_4xx_in_openais_shape_and_the_server_keeps_serving(server, why, body, status, code, param):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        if isinstance(body, bytes):
            response = http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
        else:
            response = http.post("/v1/completions", json=body)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["message"] and error["type"] and error["code"] == code and error["param"] == param, error
        assert http.get("/health").json()["status"] == "ok"
        ok = http.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 3})
        assert ok.status_code == 200


def raw_post(url: str, head: bytes, body_parts) -> tuple[int, dict]:
    """POST over a plain socket: the head, then as many body parts as the server reads before it answers
    -> (status, JSON body of the answer)."""
    import socket

    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head)
        try:
            for part in body_parts:
                sock.sendall(part)
        except OSError:  # the server answered and closed: what it did not read was never sent
            pass
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < int(
                answer.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0]):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    return status, json.loads(answer.split(b"\r\n\r\n", 1)[1])


def test_a_body_past_the_limit_is_refused_unread_while_health_answers(server):
    """50 MB declared, or sent in chunks without a length: 413 in OpenAI's shape before the body is read
    (the server's memory does not grow by the body), /health answering meanwhile."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MB (this process holds the server)
    start = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    status, body = raw_post(server.url, start + b"Content-Length: 52428800\r\n\r\n", [b'{"prompt": "'])
    assert status == 413 and body["error"]["code"] == "request_too_large" and "52428800 bytes" in body["error"]["message"]
    chunk = b"x" * (1 << 20)
    chunks = (b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(50))
    status, body = raw_post(server.url, start + b"Transfer-Encoding: chunked\r\n\r\n", chunks)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    with httpx.Client(base_url=server.url, timeout=30) as http:
        started = time.perf_counter()
        assert http.get("/health").json()["status"] == "ok" and time.perf_counter() - started < 1
        refused = http.post("/v1/completions", content=b'{"model": "tiny", "prompt": "hi"}',
                            headers={"Content-Type": "text/plain"})
        assert refused.status_code == 415 and refused.json()["error"]["code"] == "unsupported_media_type"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before < 100


def test_the_limits_hold_at_start_up_and_the_schema_lists_what_the_server_answers(tmp_path, tiny_model_dir, monkeypatch):
    from slmctl.model.directory import load_model

    length = load_model(tiny_model_dir).config.max_seq_len
    result = cli("serve", tiny_model_dir, f"max_tokens_cap={length}", "port=0", runs=tmp_path / "runs")
    assert result.exit_code == 2 and f"at most max_tokens_cap={length - 1}" in result.output
    assert not (tmp_path / "runs" / "serve").exists() or all(
        json.loads((r / "status.json").read_text())["status"] == "failed" for r in (tmp_path / "runs" / "serve").iterdir()
        if r.is_dir() and not r.is_symlink())
    monkeypatch.setenv("SLMCTL_TEST_KEY", "sk-test")
    with running_server(tmp_path / "runs", tiny_model_dir, "model_name=tiny", "api_key_env=SLMCTL_TEST_KEY") as server:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            assert http.get("/metrics").status_code == 401  # behind the key, as /v1 is
            assert http.get("/metrics", headers={"Authorization": "bearer sk-test"}).status_code == 200  # any case
            schema = http.get("/openapi.json").json()
    operation = schema["paths"]["/v1/completions"]["post"]
    assert {"400", "401", "413", "429", "503"} <= set(operation["responses"]) and "422" not in operation["responses"]
    assert operation["security"] == [{"bearer": []}] and schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert operation["responses"]["413"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")


def test_metrics_count_requests_tokens_and_latencies(tmp_path, tiny_model_dir):
    with running_server(tmp_path, tiny_model_dir, "model_name=tiny") as server:
        api = client(server)
        made = [api.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0) for p in ("a", "bb", "ccc")]
        with httpx.Client(base_url=server.url) as http:
            assert http.post("/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
            text = http.get("/metrics").text
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and line[0] != "#"}
    assert values['slmctl_requests_total{endpoint="/v1/completions",status="200"}'] == 3
    assert values['slmctl_requests_total{endpoint="/v1/completions",status="404"}'] == 1
    assert values["slmctl_generation_tokens_total"] == sum(m.usage.completion_tokens for m in made)
    assert values["slmctl_prompt_tokens_total"] == sum(m.usage.prompt_tokens for m in made)
    assert values["slmctl_time_to_first_token_seconds_count"] == 3
    assert values["slmctl_time_per_output_token_seconds_count"] == sum(m.usage.completion_tokens for m in made) - 3 + sum(
        m.choices[0].finish_reason == "stop" for m in made)
    assert values["slmctl_queue_depth"] == 0 and values["slmctl_active_sequences"] == 0
    # the run keeps them, and one line per request without its prompt
    saved = json.loads((server.run_dir.path / "metrics.json").read_text())
    assert saved["slmctl_generation_tokens_total"] == values["slmctl_generation_tokens_total"]
    logged = [json.loads(line) for line in (server.run_dir.path / "requests.jsonl").read_text().splitlines()]
    assert [entry["completion_tokens"] for entry in logged] == [m.usage.completion_tokens for m in made]
    assert all("prompt" not in entry for entry in logged)
    assert Run.open(server.run_dir.path).status()["status"] == "succeeded"


def test_a_client_that_disconnects_mid_stream_frees_its_slot(tmp_path, tiny_model_dir):
    with running_server(tmp_path, tiny_model_dir, "model_name=tiny", "log_prompts=true", slow_steps=0.02) as server:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 200, "stream": True}
            with http.stream("POST", "/v1/completions", json=body) as response:
                lines = response.iter_lines()
                assert next(lines).startswith("data: ")
                assert http.get("/health").json()["active"] == 1
            deadline = time.time() + 10
            while http.get("/health").json()["active"] and time.time() < deadline:
                time.sleep(0.05)
            assert http.get("/health").json()["active"] == 0
            assert 'slmctl_request_finish_total{reason="cancelled"} 1.0' in http.get("/metrics").text
    [entry] = [json.loads(line) for line in (server.run_dir.path / "requests.jsonl").read_text().splitlines()]
    assert entry["status"] == 499 and entry["completion_tokens"] < 200
    assert entry["prompt"] == PROMPT  # log_prompts=true (--log-prompts) keeps the text


def test_a_client_that_disconnects_while_waiting_for_a_plain_answer_frees_its_slot(tmp_path, tiny_model_dir):
    import socket

    with running_server(tmp_path, tiny_model_dir, "model_name=tiny", slow_steps=0.02) as server:
        host, port = server.url.removeprefix("http://").split(":")
        body = json.dumps({"model": "tiny", "prompt": PROMPT, "max_tokens": 250, "ignore_eos": True}).encode()
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            with httpx.Client(base_url=server.url, timeout=30) as http:
                deadline = time.time() + 10
                while http.get("/health").json()["active"] == 0 and time.time() < deadline:
                    time.sleep(0.02)
                assert http.get("/health").json()["active"] == 1
        with httpx.Client(base_url=server.url, timeout=30) as http:  # gone, 5 s before its 250 tokens would be done
            deadline = time.time() + 3
            while http.get("/health").json()["active"] and time.time() < deadline:
                time.sleep(0.05)
            assert http.get("/health").json()["active"] == 0
            assert 'slmctl_request_finish_total{reason="cancelled"} 1.0' in http.get("/metrics").text


def test_a_full_queue_is_429_and_health_answers_during_generation(tmp_path, tiny_model_dir):
    with running_server(tmp_path, tiny_model_dir, "model_name=tiny", "max_batch=1", "max_queue=1",
                        slow_steps=0.04) as server:
        results = []

        def ask():
            with httpx.Client(base_url=server.url, timeout=60) as http:
                results.append(http.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 60}))

        threads = [threading.Thread(target=ask) for _ in range(3)]
        for t in threads:
            t.start()
            time.sleep(0.3)
        with httpx.Client(base_url=server.url, timeout=5) as http:
            started = time.perf_counter()
            assert http.get("/health").json() == {"status": "ok", "model": "tiny", "active": 1, "waiting": 1}
            assert time.perf_counter() - started < 1.0
        for t in threads:
            t.join(60)
    statuses = sorted(r.status_code for r in results)
    assert statuses == [200, 200, 429]
    assert all(r.json()["usage"]["completion_tokens"] == 60 for r in results if r.status_code == 200)  # no early EOS
    refused = next(r for r in results if r.status_code == 429).json()["error"]
    assert refused["type"] == "rate_limit_error"


def test_an_api_key_is_required_and_never_written(tmp_path, tiny_model_dir, monkeypatch):
    secret = "sk-test-7f3c9e1d2b"
    monkeypatch.setenv("SLMCTL_TEST_KEY", secret)
    with running_server(tmp_path, tiny_model_dir, "model_name=tiny", "api_key_env=SLMCTL_TEST_KEY") as server:
        with pytest.raises(openai.AuthenticationError):
            client(server, api_key="wrong").completions.create(model="tiny", prompt="hi", max_tokens=2)
        with httpx.Client(base_url=server.url) as http:
            assert http.get("/health").status_code == 200  # health and metrics stay open
            assert http.post("/v1/completions", json={"model": "tiny", "prompt": "hi"}).status_code == 401
        reply = client(server, api_key=secret).completions.create(model="tiny", prompt="hi", max_tokens=2)
        assert reply.choices[0].text is not None
    written = "".join(p.read_text(errors="replace") for p in server.run_dir.path.rglob("*") if p.is_file())
    assert "SLMCTL_TEST_KEY" in written and secret not in written


def test_serve_refuses_what_it_cannot_serve(tmp_path, tiny_model_dir):
    result = cli("serve", tmp_path / "missing", runs=tmp_path / "runs")
    assert result.exit_code == 2 and "error" in result.output
    result = cli("serve", tiny_model_dir, "api_key_env=SLMCTL_UNSET_VARIABLE_FOR_TEST", runs=tmp_path / "runs")
    assert result.exit_code == 2 and "SLMCTL_UNSET_VARIABLE_FOR_TEST" in result.output
    result = cli("serve", tiny_model_dir, "port=70000", runs=tmp_path / "runs")
    assert result.exit_code == 2 and "port" in result.output
    result = cli("serve", tiny_model_dir, "--draft", tmp_path / "no-draft-model", runs=tmp_path / "drafts")
    assert result.exit_code == 2 and "no-draft-model" in result.output and not (tmp_path / "drafts").exists()
    with running_server(tmp_path / "runs", tiny_model_dir) as server:  # a port in use
        port = server.url.rsplit(":", 1)[1]
        result = cli("serve", tiny_model_dir, "--port", port, runs=tmp_path / "runs")
        assert result.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in result.output
        assert "\n" not in result.stderr.strip()


def test_sigterm_finishes_in_flight_streams_then_exits_0(tmp_path, tiny_model_dir):
    """The command in its own process: SIGTERM while eight streams are being generated; each stream
    still ends with [DONE] and all its tokens, new connections are refused, the run succeeds."""
    runs = tmp_path / "runs"
    process = subprocess.Popen([sys.executable, "-m", "slmctl", "serve", str(tiny_model_dir), "--port", "0",
                                "--runs-dir", str(runs), "max_tokens_cap=256"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 120
        while not list(runs.glob("serve/*/server.json")) and time.time() < deadline and process.poll() is None:
            time.sleep(0.1)
        url = json.loads(next(runs.glob("serve/*/server.json")).read_text())["url"]
        assert url.startswith("http://127.0.0.1:")  # loopback unless --host says otherwise
        received, finished = [0] * 8, []

        def stream(i):
            body = {"model": "model", "prompt": f"{PROMPT} {i}", "max_tokens": 256, "stream": True}
            with httpx.Client(base_url=url, timeout=60) as http, http.stream("POST", "/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        received[i] += 1
                    elif line == "data: [DONE]":
                        finished.append(i)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        while not all(received) and time.time() < deadline:
            time.sleep(0.002)
        process.send_signal(signal.SIGTERM)
        at_signal = list(received)
        for t in threads:
            t.join(60)
        assert process.wait(60) == 0, process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
    assert sorted(finished) == list(range(8))
    assert min(at_signal) < 100  # the streams were in flight when the signal came
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=5)
    run = newest_run(runs, "serve")
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "succeeded"
    assert "SIGTERM" in (run / "log.txt").read_text()
    assert len((run / "requests.jsonl").read_text().splitlines()) == 8


def test_an_onnx_export_serves_what_generate_prints(tmp_path, tiny_model_dir):
    """--runtime onnx: greedy text through the openai client equals `slmctl generate` on the export,
    streamed and not, with requests decoded concurrently."""
    runs = tmp_path / "runs"
    result = cli("export", "onnx", tiny_model_dir, "validation.prompt_lens=[5,19]", "validation.steps=6",
                 "validation.tolerance=1e-2", runs=runs)  # a randomised model: logits of ~15
    assert result.exit_code == 0, result.output
    export = newest_run(runs, "export")
    prompts = [PROMPT, "Who lives in Oslo?", "What does Ana do?"]
    expected = [printed_by_generate(export, p, 16) for p in prompts]
    with running_server(runs, export, "runtime=onnx", "model_name=tiny-onnx") as server:
        api = client(server)
        answers = [None] * 3

        def ask(i):
            answers[i] = api.completions.create(model="tiny-onnx", prompt=prompts[i], max_tokens=16, temperature=0)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [a.choices[0].text for a in answers] == expected
        streamed = api.chat.completions.create(model="tiny-onnx", messages=[{"role": "user", "content": prompts[1]}],
                                               max_tokens=16, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected[1]


def test_eval_with_an_endpoint_judge_runs_against_slmctl_serve(tmp_path, tiny_model_dir):
    """`slmctl eval ... judge=endpoint judge.endpoint=<slmctl serve>/v1`: every judge prompt is answered
    by the server (a random model's replies carry no score: they count as missing, not as errors)."""
    runs = tmp_path / "runs"
    with running_server(runs, tiny_model_dir, "model_name=judge", "max_prompt_tokens=4096") as server:
        result = cli("eval", tiny_model_dir, "task=synthetic_qa", "limit=3", "task.n_people=200", "judge=endpoint",
                     f"judge.endpoint={server.url}/v1", "judge.model=judge", "judge.max_new_tokens=16",
                     f"judge.cache_dir={tmp_path / 'cache'}", runs=runs)
        assert result.exit_code == 0, result.output
    judged = [json.loads(line) for line in (server.run_dir.path / "requests.jsonl").read_text().splitlines()]
    assert len(judged) == 3 and all(e["status"] == 200 and e["endpoint"] == "/v1/chat/completions" for e in judged)
    log = (newest_run(runs, "eval") / "log.txt").read_text()
    assert "3 calls" in log and "3 unparsable (missing)" in log


@pytest.fixture(scope="module")
def vision_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model with a small random ViT attached, saved as a vision model directory."""
    from slmctl.data.tokenizer import TextTokenizer
    from slmctl.model.directory import load_model
    from slmctl.model.vision import VisionConfig
    from slmctl.model.vlm import VisionEncoderDecoderLM, save_vision_model

    tokenizer = TextTokenizer.load(tiny_model_dir)
    torch.manual_seed(0)
    vision = VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2)
    model = VisionEncoderDecoderLM(load_model(tiny_model_dir), vision, tokenizer.image_id).eval()
    return save_vision_model(model, tmp_path_factory.mktemp("vision") / "model", tokenizer)


def test_images_in_chat_content_reach_a_vision_model(tmp_path, vision_model_dir):
    """An image as a data: URL or a path under --image-root: the answer `slmctl generate image=...` prints;
    a path outside the root, a missing file and bytes that are no image: 400, and the server goes on."""
    import base64

    from PIL import Image

    from slmctl.runtime.generator import generate_text, load_generator

    pictures = tmp_path / "pictures"
    pictures.mkdir()
    Image.new("RGB", (48, 40), (220, 40, 40)).save(pictures / "red.png")
    question = "What color is the square?"
    # what `slmctl generate MODEL image=red.png prompt=...` generates (its printout drops the control characters
    # this random model emits, so the text itself is compared)
    with Image.open(pictures / "red.png") as image:
        expected = generate_text(load_generator(vision_model_dir), question, max_new_tokens=12, images=[image.convert("RGB")])
    data_url = "data:image/png;base64," + base64.b64encode((pictures / "red.png").read_bytes()).decode()
    with running_server(tmp_path / "runs", vision_model_dir, "model_name=vlm", f"image_root={pictures}") as server:
        api = client(server)

        def ask(url):
            content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
            return api.chat.completions.create(model="vlm", messages=[{"role": "user", "content": content}], max_tokens=12,
                                               temperature=0)

        assert ask(data_url).choices[0].message.content == expected
        assert ask(str(pictures / "red.png")).choices[0].message.content == expected
        assert ask("red.png").choices[0].message.content == expected  # relative to the root
        (tmp_path / "secret.png").write_bytes((pictures / "red.png").read_bytes())
        for bad in (str(tmp_path / "secret.png"), "../secret.png", "missing.png",
                    "data:image/png;base64," + base64.b64encode(b"not an image").decode()):
            with pytest.raises(openai.BadRequestError):
                ask(bad)
        # a decompression bomb's header says how big it is: refused before a pixel is decoded
        Image.new("1", (5000, 5000)).save(pictures / "bomb.png")  # 3 KB on disk, 25 M pixels decoded
        Image.new("1", (20000, 20000)).save(pictures / "huge.png")  # past Pillow's own limit
        for bomb in ("bomb.png", "huge.png"):
            with pytest.raises(openai.BadRequestError, match="at most 16777216 pixels"):
                ask(bomb)
        with pytest.raises(openai.BadRequestError, match="at most 8 per request"):
            api.chat.completions.create(model="vlm", max_tokens=2, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_url}}] * 9}])
        assert ask(data_url).choices[0].message.content == expected


def test_a_request_past_its_deadline_ends_with_504_and_frees_its_slot(tmp_path, tiny_model_dir):
    with running_server(tmp_path, tiny_model_dir, "model_name=tiny", "request_timeout_s=0.5", slow_steps=0.05) as server:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 200, "ignore_eos": True}
            started = time.perf_counter()
            late = http.post("/v1/completions", json=body)
            assert late.status_code == 504 and late.json()["error"]["code"] == "timeout"
            assert time.perf_counter() - started < 5
            streamed = http.post("/v1/completions", json={**body, "stream": True}).text
            assert '"code": "timeout"' in streamed and "[DONE]" not in streamed
            assert http.get("/health").json()["active"] == 0
            assert http.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2}).status_code == 200


def test_a_public_address_without_a_key_is_warned_about(tmp_path, tiny_model_dir):
    with running_server(tmp_path, tiny_model_dir, "host=0.0.0.0") as server:
        assert "warning: listening on 0.0.0.0 without an API key" in (server.run_dir.path / "log.txt").read_text()


def test_a_load_test_of_32_streaming_clients_completes_every_stream(tmp_path, tiny_model_dir):
    """The bounded load test (python -m slmctl.serve.loadtest): 1 and then 32 clients streaming back to back
    for a few seconds: no failed request, every stream whole (its [DONE], all max_tokens tokens), tokens/s
    and first-token percentiles in the report."""
    from slmctl.serve import loadtest

    report = tmp_path / "load.json"
    with running_server(tmp_path / "runs", tiny_model_dir, "max_batch=32", "max_queue=64") as server:
        code = loadtest.main([server.url, "--clients", "1,32", "--duration", "3", "--max-tokens", "24",
                              "--json", str(report)])
    levels = json.loads(report.read_text())["levels"]
    assert code == 0
    for level in levels:
        assert level["requests"] >= level["clients"] and level["failed"] == 0 and level["incomplete"] == 0
        assert level["generated_tokens"] == 24 * level["requests"]
        assert 0 < level["first_token_p50_ms"] <= level["first_token_p95_ms"]
    assert levels[1]["speedup_vs_1_client"] == pytest.approx(levels[1]["tokens_per_s"] / levels[0]["tokens_per_s"], rel=0.01)


@pytest.mark.slow
def test_eight_clients_get_at_least_three_times_one_clients_tokens_per_s_at_small(tmp_path, world_texts):
    """docs/serve.md's claim, on this machine: a `small` model (random weights: the claim is about
    batching, not answers), 8 streaming clients against 1, 15 s each."""
    from slmctl.data.tokenizer import train_bpe
    from slmctl.model import build_model
    from slmctl.model.config import vocab_size_for
    from slmctl.model.store import save_model
    from slmctl.serve import loadtest

    tokenizer = train_bpe(world_texts, vocab_size=2048)
    model = build_model("small", seed=0, vocab_size=vocab_size_for(len(tokenizer)), **tokenizer.special_ids)
    directory = save_model(model, tmp_path / "small", tokenizer)
    report = tmp_path / "load.json"
    with running_server(tmp_path / "runs", directory, "max_batch=32") as server:
        assert loadtest.main([server.url, "--clients", "1,8", "--duration", "15", "--json", str(report)]) == 0
    one, eight = json.loads(report.read_text())["levels"]
    assert eight["tokens_per_s"] >= 3 * one["tokens_per_s"], (one, eight)


def test_a_vision_export_on_onnx_runtime_answers_images_as_generate_does(tmp_path, vision_model_dir):
    import base64

    from PIL import Image

    from slmctl.runtime.generator import generate_text, load_generator

    runs = tmp_path / "runs"
    result = cli("export", "onnx", vision_model_dir, "validation.prompt_lens=[5,19]", "validation.steps=6",
                 "validation.tolerance=1e-2", runs=runs)
    assert result.exit_code == 0, result.output
    export = newest_run(runs, "export")
    Image.new("RGB", (48, 40), (40, 80, 220)).save(tmp_path / "blue.png")
    question = "What color is the circle?"
    with Image.open(tmp_path / "blue.png") as image:
        expected = generate_text(load_generator(export), question, max_new_tokens=12, images=[image.convert("RGB")])
    data_url = "data:image/png;base64," + base64.b64encode((tmp_path / "blue.png").read_bytes()).decode()
    with running_server(runs, export, "model_name=vlm-onnx") as server:
        api = client(server)
        content = [{"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": question}]
        answers = [None, None]

        def ask(i):  # an image request and a text request decoded together
            messages = [{"role": "user", "content": content if i == 0 else question}]
            answers[i] = api.chat.completions.create(model="vlm-onnx", messages=messages, max_tokens=12, temperature=0)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert answers[0].choices[0].message.content == expected
        assert answers[1].choices[0].message.content == generate_text(load_generator(export), question, max_new_tokens=12)
