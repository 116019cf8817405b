"""Property-based tests of the HTTP API: whatever a client sends (bodies built field by field from
every JSON type, raw bytes, odd headers), the answer is JSON, errors come in OpenAI's shape, a 5xx
is only one the server is designed to give, and the server goes on serving."""

import json

import httpx
import pytest
from conftest import running_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# JSON values of every kind, the awkward ones favoured: huge and negative integers, NaN and infinities
# (Python's json writes and reads them), empty and lone-surrogate strings, nesting
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
                    st.sampled_from(["", "\ud800", "tiny", "hi", "x" * 3000, "<pad>", "\x00"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                          max_size=3), max_leaves=6)
FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "stop", "n", "seed", "stream", "stream_options",
          "presence_penalty", "logprobs", "ignore_eos", "echo", "best_of", "user", "messages", "max_completion_tokens"]
# values a well-meaning client sends, and their edges (so that bodies often reach generation)
SENSIBLE = {"model": st.just("tiny"), "prompt": st.sampled_from(["hi", "Where does Ana live?", "", "\ud800", ["hi"]]),
            "max_tokens": st.integers(0, 4), "temperature": st.sampled_from([0, 0.7, 2]), "stream": st.booleans(),
            "seed": st.sampled_from([0, -1, 2 ** 63, 2 ** 64 - 1, 2 ** 64]), "top_p": st.sampled_from([0.5, 1]),
            "stop": st.sampled_from(["\n", ["a", "b"], ""]),
            "messages": st.sampled_from([[{"role": "user", "content": "hi"}], [{"role": "user", "content": ""}],
                                         [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]])}


@st.composite
def requests(draw):
    """(endpoint, body): a third of the time any fields with any values; otherwise a well-formed request to
    either endpoint with up to three fields changed to their edges or to anything at all, so that most bodies
    reach the engine and every validator branch is tried."""
    chat = draw(st.booleans())
    endpoint = "/v1/chat/completions" if chat else "/v1/completions"
    if draw(st.integers(0, 2)) == 0:
        return endpoint, {name: draw(VALUES) for name in draw(st.lists(st.sampled_from(FIELDS), unique=True, max_size=7))}
    body = {"model": "tiny", "max_tokens": draw(st.integers(1, 4))}
    if chat:
        body["messages"] = draw(SENSIBLE["messages"])
    else:
        body["prompt"] = draw(SENSIBLE["prompt"])
    if draw(st.booleans()):
        body.update(temperature=0.7, seed=draw(SENSIBLE["seed"]))
    for name in draw(st.lists(st.sampled_from(FIELDS), unique=True, max_size=3)):
        body[name] = draw(SENSIBLE[name] if name in SENSIBLE and draw(st.booleans()) else VALUES)
    return endpoint, body


# no 5xx is designed for what a client sends a healthy server: generation failing for a request (500), a dead
# engine (503) or a deadline (504, far above these requests' time) would each be a defect here
DESIGNED: set[int] = set()


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory, tiny_model_dir):
    with running_server(tmp_path_factory.mktemp("runs"), tiny_model_dir, "model_name=tiny", "max_tokens_cap=16",
                           "max_prompt_tokens=48") as server:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            yield http
        assert server.engine.failure is None


def check(response: httpx.Response) -> None:
    assert response.status_code < 500 or response.status_code in DESIGNED, (response.status_code, response.text)
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        assert response.status_code == 200
        return
    payload = response.json()  # always JSON
    if response.status_code >= 400:
        error = payload["error"]
        assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
        assert set(error) == {"message", "type", "param", "code"}


# derandomized: the same examples on every run (a suite that is red or green for the code, not the draw)
FUZZ = dict(deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True)


@settings(max_examples=100, **FUZZ)
@given(request=requests())
def test_any_json_body_gets_a_json_answer_and_the_server_serves_on(fuzzed, request):
    endpoint, body = request
    data = json.dumps(body).encode()  # NaN and Infinity included, as Python's json writes them
    check(fuzzed.post(endpoint, content=data, headers={"Content-Type": "application/json"}))


@settings(max_examples=40, **FUZZ)
@given(raw=st.binary(max_size=300), content_type=st.sampled_from(["application/json", "text/plain", "",
                                                                   "application/json; charset=latin-1"]),
       authorization=st.sampled_from([None, "", "Bearer", "bearer x", "Basic Zm9vOmJhcg==", "Bearer \u00e9"]))
def test_any_bytes_and_headers_get_a_json_answer(fuzzed, raw, content_type, authorization):
    headers = {"Content-Type": content_type} if content_type else {}
    if authorization is not None:
        headers["Authorization"] = authorization.encode("utf-8")  # raw bytes, as a hostile client sends them
    check(fuzzed.post("/v1/completions", content=raw, headers=headers))


def test_after_the_fuzzing_health_is_ok_and_no_slot_is_lost(fuzzed):
    health = fuzzed.get("/health").json()
    assert health["status"] == "ok" and health["active"] == 0 and health["waiting"] == 0
