"""What OpenAI clients parse, against `medusa-export serve` on 127.0.0.1: every response, chunk and error through
the `openai` client's typed models (no required field hidden in ``model_extra``) and as raw JSON, usage counted
against the runtime's own tokens, unsupported parameters refused under their names, model ids with a slash.
References: openai-python's types (``types/chat/chat_completion*.py``, ``types/completion*.py``,
``types/model.py``) and vLLM's OpenAI server (``entrypoints/openai/protocol.py``, ``serving_chat.py``)."""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")

from serve_helpers import (KEY, PROMPT, build_chat_artifact, get, load_runtime, metric, openai_client,  # noqa: E402
                           post, serving, wait_idle)

NAME = "org/tiny%2Fmodel v1"  # a slash, an escape that must not be decoded twice, a space
MESSAGES = [{"role": "user", "content": PROMPT}]
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def artifact(tiny_dirs, tmp_path_factory):
    return build_chat_artifact(tiny_dirs, tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def server(artifact):
    with serving(artifact, "--max-num-seqs", "1", "--max-queue", "1", "--threads", "1", "--api-key", KEY,
                 "--served-model-name", NAME, "--max-body-bytes", "100000") as (base, _):
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


@pytest.fixture(scope="module")
def runtime(artifact):
    return load_runtime(artifact)


def _events(base: str, path: str, body: dict) -> tuple[int, str, list]:
    """A streamed request's (status, content type, events: JSON objects and the final "[DONE]")."""
    url = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.request("POST", path, json.dumps({"model": NAME, "stream": True, **body}),
                 {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    r = conn.getresponse()
    raw = r.read().decode()
    conn.close()
    events = []
    for block in raw.split("\n\n"):
        if block.strip():
            assert block.startswith("data: ") and "\n" not in block, block
            data = block[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return r.status, r.getheader("content-type"), events


def _no_hidden_fields(obj) -> None:
    """Every field the client's model declares was parsed into it: an extra key may only be this server's own
    ``metrics``."""
    assert set(obj.model_extra or {}) <= {"metrics"}, obj.model_extra
    for choice in getattr(obj, "choices", []):
        assert not choice.model_extra, choice.model_extra
    if getattr(obj, "usage", None) is not None:
        assert not obj.usage.model_extra


# ------------------------------------------------------------------------------------------------ answers


def test_chat_answer_parses_and_counts_its_tokens(client, runtime):
    ids = runtime.generator.tokenizer.encode_chat(MESSAGES)
    want = runtime.generate(ids, max_new_tokens=6, medusa=False)
    before = int(time.time())
    r = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=6, temperature=0)
    _no_hidden_fields(r)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == NAME
    assert isinstance(r.created, int) and before - 1 <= r.created <= time.time() + 1
    (choice,) = r.choices
    assert choice.index == 0 and choice.message.role == "assistant" and choice.message.content == want.text
    assert choice.finish_reason == want.finish_reason and choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == want.new_tokens
    assert r.usage.total_tokens == len(ids) + want.new_tokens
    assert "logprobs" in r.to_dict()["choices"][0]  # the key is there, null


def test_completion_answer_parses_and_counts_its_tokens(client, runtime):
    ids = runtime.generator.tokenizer.encode(PROMPT)
    want = runtime.generate(ids, max_new_tokens=5, medusa=False, ignore_eos=True)
    r = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})
    _no_hidden_fields(r)
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and isinstance(r.created, int)
    (choice,) = r.choices
    assert choice.index == 0 and choice.text == want.text and choice.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 5, len(ids) + 5)


def test_a_stop_string_ends_with_stop_and_counts_the_token_that_completed_it(client, runtime):
    ids = runtime.generator.tokenizer.encode(PROMPT)
    full = runtime.generate(ids, max_new_tokens=6, medusa=False, ignore_eos=True).text
    stop = " " + full.split(" ")[3]  # the 4th token's text (a word a token in the toy tokenizer)
    at = full.find(stop)
    r = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=6, temperature=0, stop=stop,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == full[:at]
    # as vLLM counts: the tokens up to the one that completed the stop string, that one included
    assert r.usage.completion_tokens == full[:at + len(stop)].count(" ") + 1


# ------------------------------------------------------------------------------------------------ streams


@pytest.mark.parametrize("include_usage", [True, False])
def test_chat_stream_chunks(server, client, include_usage):
    body = {"messages": MESSAGES, "max_tokens": 6, "temperature": 0}
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    status, content_type, events = _events(server, "/v1/chat/completions", {**body, **options})
    assert status == 200 and content_type.startswith("text/event-stream") and events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == NAME and isinstance(c["created"], int)
               for c in chunks)
    answer = chunks[:-1] if include_usage else chunks
    assert answer[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    texts = [c["choices"][0]["delta"] for c in answer[1:-1]]
    assert texts and all(set(d) == {"content"} and d["content"] for d in texts)  # no empty content chunks
    last = answer[-1]["choices"][0]
    assert last["finish_reason"] in ("stop", "length") and last["delta"] == {}
    assert all(c["choices"][0]["finish_reason"] is None for c in answer[:-1])
    if include_usage:
        assert all(c["usage"] is None for c in answer)
        usage = chunks[-1]
        assert usage["choices"] == [] and set(usage["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens",
                                                                      "prompt_tokens_details"}
        assert usage["usage"]["completion_tokens"] >= len(texts)
    else:
        assert all("usage" not in c for c in chunks)
    # The same through the client's typed chunks
    typed = list(client.chat.completions.create(model=NAME, stream=True, **body, **options))
    for c in typed:
        _no_hidden_fields(c)
    assert "".join(c.choices[0].delta.content or "" for c in typed if c.choices) == \
        "".join(d["content"] for d in texts)
    assert (typed[-1].usage is not None) == include_usage


def test_completion_stream_chunks(server, client):
    status, content_type, events = _events(server, "/v1/completions", {
        "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
        "stream_options": {"include_usage": True}})
    assert status == 200 and content_type.startswith("text/event-stream") and events[-1] == "[DONE]"
    *answer, usage = events[:-1]
    assert all(c["object"] == "text_completion" and c["id"].startswith("cmpl-") for c in answer)
    assert all(c["choices"][0]["text"] for c in answer[:-1]) and answer[-1]["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 4
    typed = list(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=4, temperature=0, stream=True,
                                           stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    for c in typed:
        _no_hidden_fields(c)
    assert typed[-1].usage.completion_tokens == 4


def test_stream_options_include_obfuscation_is_accepted(server, client):
    """openai-python's stream options include include_obfuscation (OpenAI's docs: send false to save bandwidth); it
    was a 400. This server pads no chunk, so either value streams the same answer; other keys are still refused."""
    for value in (False, True):
        stream = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=3, temperature=0,
                                                stream=True, stream_options={"include_usage": True,
                                                                             "include_obfuscation": value})
        chunks = list(stream)
        assert chunks[-1].usage.completion_tokens >= 1 and all("obfuscation" not in c.model_extra for c in chunks)
    for options in ({"include_obfuscation": "no"}, {"continuous_usage_stats": True}):
        code, body, _ = post(server + "/v1/chat/completions", {"messages": MESSAGES, "stream": True,
                                                               "stream_options": options})
        assert code == 400 and body["error"]["param"] == "stream_options"


# ------------------------------------------------------------------------------------------------ errors


def _error(code_body) -> dict:
    code, body, _ = code_body
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    return body["error"]


@pytest.mark.parametrize("path, extra, param", [
    ("/v1/chat/completions", {"n": 129}, "n"),  # OpenAI's bound
    ("/v1/chat/completions", {"logprobs": 1}, "logprobs"),  # chat's is true or false; the count is top_logprobs
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),  # OpenAI's limit is 20
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"tool_choice": "auto"}, "tool_choice"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"logit_bias": {"5": 10}}, "logit_bias"),
    ("/v1/chat/completions", {"presence_penalty": 0.5}, "presence_penalty"),
    ("/v1/chat/completions", {"frequency_penalty": -1}, "frequency_penalty"),
    ("/v1/chat/completions", {"top_p": 1.5}, "top_p"),
    ("/v1/completions", {"top_k": -2}, "top_k"),
    ("/v1/chat/completions", {"max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"max_completion_tokens": 0}, "max_completion_tokens"),
    ("/v1/chat/completions", {"repetition_penalty": 1.2}, "repetition_penalty"),
    ("/v1/completions", {"logprobs": True}, "logprobs"),  # the completions endpoint's is a count
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/completions", {"top_logprobs": 2}, "top_logprobs"),  # chat's parameter
    ("/v1/completions", {"best_of": 2}, "best_of"),
    ("/v1/chat/completions", {"echo": True}, "echo"),  # the completions endpoint's
    ("/v1/completions", {"suffix": "x"}, "suffix"),
    ("/v1/completions", {"n": 0}, "n"),
    ("/v1/completions", {"stop": [""]}, "stop"),
    ("/v1/completions", {"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
])
def test_unsupported_parameters_are_400s_naming_them(server, client, path, extra, param):
    base = {"messages": MESSAGES} if "chat" in path else {"prompt": PROMPT}
    out = post(server + path, {"model": NAME, "max_tokens": 2, **base, **extra})
    assert out[0] == 400
    err = _error(out)
    assert err["param"] == param and err["type"] == "invalid_request_error"
    create = client.chat.completions.create if "chat" in path else client.completions.create
    with pytest.raises(openai.BadRequestError) as e:  # sent as extra_body: the client's kwargs lack vLLM's
        create(model=NAME, **{"max_tokens": 2, **base, **{k: v for k, v in extra.items() if k == "max_tokens"}},
               extra_body={k: v for k, v in extra.items() if k != "max_tokens"})
    assert e.value.param == param


@pytest.mark.parametrize("path, extra", [
    ("/v1/chat/completions", {"stop": []}),  # no stop strings
    ("/v1/chat/completions", {"n": 1, "logprobs": False, "top_logprobs": 0, "tools": [], "tool_choice": "none",
                              "top_p": 1, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {},
                              "response_format": {"type": "text"}}),
    ("/v1/completions", {"best_of": 1, "echo": False, "suffix": None, "logprobs": None}),
])
def test_neutral_values_are_answers(server, path, extra):
    base = {"messages": MESSAGES} if "chat" in path else {"prompt": PROMPT}
    code, body, _ = post(server + path, {"model": NAME, "max_tokens": 2, **base, **extra})
    assert code == 200 and body["usage"]["completion_tokens"] >= 1, body


def test_sampling_cut_to_the_best_token_answers_the_greedy_tokens(client):
    """top_p (OpenAI's) and top_k (vLLM's, through extra_body) cut what a sampled request draws from: cut to one
    token, a request at temperature 1.5 gets the greedy answer, whatever its seed; a wide cut still samples."""
    def text(**kw):
        return client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, **kw).choices[0].text

    greedy = text(temperature=0)
    for seed in (1, 2):
        assert text(temperature=1.5, seed=seed, top_p=0) == greedy
        assert text(temperature=1.5, seed=seed, extra_body={"top_k": 1}) == greedy
    assert len({text(temperature=1.5, seed=s, top_p=0.99) for s in (1, 2, 3)}) > 1


def test_vllm_bench_serve_payload_is_answered(server):
    """`vllm bench serve` (backend openai) sends repetition_penalty: 1.0 and logprobs: null with every completion;
    the unknown-parameter 400 failed every request of the benchmark."""
    status, _, events = _events(server, "/v1/completions", {
        "prompt": PROMPT, "repetition_penalty": 1.0, "max_tokens": 3, "logprobs": None, "ignore_eos": True,
        "stream_options": {"include_usage": True}})
    assert status == 200 and events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 3


def test_every_error_status_has_an_openai_body(server):
    """With OpenAI's types: a wrong key (401), an unknown model or route (404) are invalid_request_error there too."""
    err = _error(post(server + "/v1/chat/completions", {"messages": MESSAGES}, key="wrong"))
    assert (err["type"], err["code"]) == ("invalid_request_error", "invalid_api_key")
    err = _error(post(server + "/v1/chat/completions", {"model": "nope", "messages": MESSAGES}))
    assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", "model", "model_not_found")
    assert _error(post(server + "/v1/chat/completions", b"x" * 100001))["code"] == "request_too_large"
    for path, status in (("/v1/nowhere", 404), ("/v1/chat/completions", 405)):
        code, raw = get(server + path, {"Authorization": f"Bearer {KEY}"})
        assert code == status
        _error((code, json.loads(raw), None))


def test_a_full_queue_is_a_429_with_an_openai_body(server):
    """One request running and one waiting fill the queue: the next is a 429. The tiny model answers its 128-token
    context in a fraction of a second, so the queue can drain between reading the metric and sending; then the request
    is answered (200) and the pair is sent again, at most five times."""
    body = {"prompt": PROMPT, "max_tokens": 2000, "temperature": 0, "ignore_eos": True, "medusa": False}
    statuses = []
    for _ in range(5):  # bounded
        wait_idle(server)
        threads = [threading.Thread(target=post, args=(server + "/v1/completions", body)) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            deadline = time.monotonic() + 30
            while metric(server, "num_requests_waiting") < 1 and time.monotonic() < deadline:  # bounded
                time.sleep(0.005)
            out = post(server + "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
        finally:
            for t in threads:
                t.join(timeout=120)
        statuses.append(out[0])
        if out[0] == 429:
            assert out[2].get("Retry-After") and _error(out)["type"] == "rate_limit_error"
            break
    assert statuses[-1] == 429 and set(statuses[:-1]) <= {200}, statuses


# ------------------------------------------------------------------------------------------------ models


def test_every_response_names_the_replica_that_answered(server):
    """X-Served-By was on answers alone: behind a proxy, a 429 or 401 did not say which replica refused it."""
    import urllib.error
    import urllib.request

    def served_by(method: str, path: str, body: dict | None = None, key: str | None = KEY, host: str | None = None):
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}),
                   **({"Host": host} if host else {})}
        req = urllib.request.Request(server + path, None if body is None else json.dumps(body).encode(), headers,
                                     method=method)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.headers.get_all("X-Served-By")
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get_all("X-Served-By")

    answers = [served_by("POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 1}),
               served_by("POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 1}, key=None),
               served_by("POST", "/v1/completions", {"prompt": PROMPT, "n": 0}),
               served_by("GET", "/v1/nowhere"), served_by("HEAD", "/v1/models"), served_by("GET", "/health"),
               served_by("GET", "/v1/models", host="elsewhere.example")]
    assert [status for status, _ in answers] == [200, 401, 400, 404, 200, 200, 400]
    names = {tuple(named or ()) for _, named in answers}
    assert len(names) == 1 and len(next(iter(names))) == 1, names  # one header, the same replica


def test_models_with_a_slash_in_the_id(server, client):
    page = client.models.list()
    assert page.object == "list" and [m.id for m in page.data] == [NAME]
    model = client.models.retrieve(NAME)
    assert (model.id, model.object, model.owned_by) == (NAME, "model", "medusa-export")
    assert isinstance(model.created, int) and not set(model.model_extra) - {"max_model_len"}
    for path in (urllib.parse.quote(NAME, safe=""), urllib.parse.quote(NAME)):  # %2F, or the slash itself
        code, raw = get(f"{server}/v1/models/{path}", {"Authorization": f"Bearer {KEY}"})
        assert code == 200 and json.loads(raw)["id"] == NAME
    code, raw = get(f"{server}/v1/models/org/other", {"Authorization": f"Bearer {KEY}"})
    assert code == 404 and json.loads(raw)["error"]["code"] == "model_not_found"
    code, raw = get(f"{server}/v1/models/", {"Authorization": f"Bearer {KEY}"})  # said: the model '' does not exist
    assert code == 404 and json.loads(raw)["error"]["code"] != "model_not_found"
    assert "no route '/v1/models/'" in json.loads(raw)["error"]["message"]
