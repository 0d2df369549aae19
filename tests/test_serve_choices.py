"""``n`` choices per request against `medusa-export serve` on 127.0.0.1: each choice a sequence of its own in the
batched engine, gathered into one answer or merged into one stream under its ``index``; greedy choices equal the
answer alone, a seeded request's choice i equals the same request with ``seed + i``, usage counts the prompt once.
Reference: OpenAI's ``n`` (chat and legacy completions) and vLLM's ``SamplingParams.n``."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
pytest.importorskip("openai")

from serve_helpers import (KEY, PROMPT, build_chat_artifact, load_runtime, metric, openai_client, post,  # noqa: E402
                           serving, stream_chunks, wait_idle)

MESSAGES = [{"role": "user", "content": PROMPT}]
ROOM = 4  # --max-num-seqs 2 plus --max-queue 2: the most choices a request may ask for here


@pytest.fixture(scope="module")
def artifact(tiny_dirs, tmp_path_factory):
    return build_chat_artifact(tiny_dirs, tmp_path_factory.mktemp("choices"))


@pytest.fixture(scope="module")
def server(artifact):
    with serving(artifact, "--max-num-seqs", "2", "--max-queue", "2", "--threads", "1", "--api-key", KEY) as (base, _):
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


@pytest.fixture(scope="module")
def runtime(artifact):
    return load_runtime(artifact)


def test_greedy_choices_each_equal_the_answer_alone(client, runtime):
    """n greedy choices are n sequences decoding the same tokens (vLLM's behaviour), batched or not."""
    ids = runtime.generator.tokenizer.encode_chat(MESSAGES)
    want = runtime.generate(ids, max_new_tokens=8, medusa=False)
    r = client.chat.completions.create(model=runtime.manifest.model.name, messages=MESSAGES, max_tokens=8,
                                       temperature=0, n=ROOM)
    assert [c.index for c in r.choices] == list(range(ROOM))
    assert all(c.message.content == want.text and c.finish_reason == want.finish_reason for c in r.choices)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), ROOM * want.new_tokens)
    spec = r.model_extra["metrics"]["speculative_decoding"]
    assert spec["steps"] >= ROOM * 1 and spec["accepted_tokens"] + spec["steps"] >= ROOM * (want.new_tokens - 1)


def test_a_seeded_request_s_choice_i_is_the_request_with_seed_plus_i(client, runtime):
    """Sampled choices differ from one another, and each is reproducible: choice i draws from seed + i."""
    name = runtime.manifest.model.name
    ask = dict(model=name, prompt=PROMPT, max_tokens=12, temperature=1.5, extra_body={"ignore_eos": True})
    together = client.completions.create(n=ROOM, seed=40, **ask)
    alone = [client.completions.create(seed=40 + i, **ask).choices[0].text for i in range(ROOM)]
    assert [c.text for c in together.choices] == alone
    assert len(set(alone)) > 1, "three sampled answers of 12 tokens at temperature 1.5 were all the same"
    assert together.usage.completion_tokens == ROOM * 12 and together.usage.prompt_tokens == \
        len(runtime.generator.tokenizer.encode(PROMPT))


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": MESSAGES}),
    ("/v1/completions", {"prompt": PROMPT, "logprobs": 2}),
])
def test_a_stream_of_choices_carries_each_under_its_index(server, client, path, body):
    """Each choice streams its own chunks (a role chunk first on chat, one finish), interleaved with the others';
    put together by index they are the non-streamed answer's choices."""
    ask = {"max_tokens": 10, "temperature": 0.8, "seed": 3, "n": 2, "ignore_eos": True, **body}
    *chunks, last = stream_chunks(server, path, {**ask, "stream_options": {"include_usage": True}})
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 20
    chat = path.endswith("chat/completions")
    texts, finishes, tokens = {0: "", 1: ""}, {0: [], 1: []}, {0: [], 1: []}
    for c in chunks:
        (choice,) = c["choices"]
        i = choice["index"]
        texts[i] += (choice["delta"].get("content") or "") if chat else choice["text"]
        if choice["finish_reason"] is not None:
            finishes[i].append(choice["finish_reason"])
        if not chat and choice["logprobs"]:
            tokens[i] += choice["logprobs"]["tokens"]
    assert finishes == {0: ["length"], 1: ["length"]}
    if chat:
        firsts = {i: next(c["choices"][0]["delta"] for c in chunks if c["choices"][0]["index"] == i) for i in (0, 1)}
        assert firsts == {0: {"role": "assistant", "content": ""}, 1: {"role": "assistant", "content": ""}}
    whole = post(server + path, {**ask})
    assert whole[0] == 200
    assert [texts[0], texts[1]] == [(c["message"]["content"] if chat else c["text"]) for c in whole[1]["choices"]]
    if not chat:
        assert [tokens[0], tokens[1]] == [c["logprobs"]["tokens"] for c in whole[1]["choices"]]
        assert all(len(t) == 10 for t in tokens.values())


def test_echo_and_logprobs_with_choices(server, runtime):
    """Each choice echoes the prompt and scores it, then its own answer."""
    n_prompt = len(runtime.generator.tokenizer.encode(PROMPT))
    code, body, _ = post(server + "/v1/completions", {"prompt": PROMPT, "max_tokens": 3, "n": 2, "echo": True,
                                                      "logprobs": 1, "temperature": 0, "ignore_eos": True})
    assert code == 200 and len(body["choices"]) == 2
    for choice in body["choices"]:
        assert choice["text"].startswith(PROMPT)
        assert len(choice["logprobs"]["tokens"]) == n_prompt + 3 and choice["logprobs"]["token_logprobs"][0] is None
    assert body["choices"][0]["logprobs"] == body["choices"][1]["logprobs"]  # greedy: the same tokens and values


@pytest.mark.parametrize("n, says", [(ROOM + 1, "--max-num-seqs"), (0, "[1, 128]"), (129, "[1, 128]"),
                                     (True, "[1, 128]"), (2.0, "[1, 128]")])
def test_choices_beyond_what_is_admitted_are_400s(server, n, says):
    code, body, _ = post(server + "/v1/chat/completions", {"messages": MESSAGES, "n": n, "max_tokens": 2})
    assert code == 400 and body["error"]["param"] == "n" and says in body["error"]["message"]


def test_choices_are_admitted_all_or_none(server):
    """With two places left, a request for three choices gets a 429 and leaves nothing behind: none of its choices
    runs or waits."""
    wait_idle(server)
    long = {"prompt": PROMPT, "max_tokens": 2000, "temperature": 0, "ignore_eos": True, "medusa": False}
    threads = [threading.Thread(target=post, args=(server + "/v1/completions", long)) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 30
        while metric(server, "num_requests_running") < 2 and time.monotonic() < deadline:  # bounded
            time.sleep(0.01)
        code, body, headers = post(server + "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "n": 3})
        assert code == 429 and headers.get("Retry-After") and body["error"]["type"] == "rate_limit_error"
        assert "need 3 places, 2 are free" in body["error"]["message"]
        assert metric(server, "num_requests_waiting") == 0
        code, body, _ = post(server + "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "n": 2})
        assert code == 200  # the two places left were not taken by the refused request
    finally:
        for t in threads:
            t.join(timeout=120)


# ------------------------------------------------------------------------------------------------ prompt batches

OTHER = "t9 t8"


def test_a_batch_of_prompts_answers_each_prompt_n_times_in_order(server, runtime):
    """OpenAI's and vLLM's completions take a list of prompts: choices come prompt by prompt, n each, each the answer
    to its prompt alone; usage counts each prompt once."""
    tok = runtime.generator.tokenizer
    want = [runtime.generate(tok.encode(p), max_new_tokens=5, medusa=False, ignore_eos=True).text
            for p in (PROMPT, OTHER)]
    for prompt in ([PROMPT, OTHER], [tok.encode(PROMPT), tok.encode(OTHER)]):
        code, body, _ = post(server + "/v1/completions", {"prompt": prompt, "n": 2, "max_tokens": 5,
                                                          "temperature": 0, "ignore_eos": True, "echo": True})
        assert code == 200
        assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
        texts = [c["text"] for c in body["choices"]]
        assert texts == [PROMPT + want[0]] * 2 + [OTHER + want[1]] * 2
        assert body["usage"]["prompt_tokens"] == len(tok.encode(PROMPT)) + len(tok.encode(OTHER))
        assert body["usage"]["completion_tokens"] == 4 * 5


def test_a_streamed_batch_numbers_its_choices_prompt_by_prompt(server):
    chunks = stream_chunks(server, "/v1/completions", {"prompt": [PROMPT, OTHER, PROMPT], "max_tokens": 3,
                                                       "temperature": 0, "ignore_eos": True})
    texts: dict[int, str] = {}
    for c in chunks:
        (choice,) = c["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert sorted(texts) == [0, 1, 2] and texts[0] == texts[2] and texts[0] != texts[1]


@pytest.mark.parametrize("prompt, param", [
    ([PROMPT, ""], "prompt[1]"),  # empty
    ([PROMPT, [[5]]], "prompt[1]"),  # a batch inside a batch
    ([[5, 6], [5, 10 ** 6]], "prompt[1]"),  # a token id outside the vocabulary
    ([PROMPT, 5], "prompt[1]"),
    ([PROMPT] * 65, "prompt"),  # 65 prompts times n=2: past 128 answers
    ([PROMPT] * 3, "prompt"),  # 3 prompts times n=2: past the 4 answers this server admits at once
])
def test_a_bad_prompt_in_a_batch_is_a_400_naming_it(server, prompt, param):
    code, body, _ = post(server + "/v1/completions", {"prompt": prompt, "n": 2, "max_tokens": 2})
    assert code == 400 and body["error"]["param"] == param, body


def test_a_batch_with_n_null_answers_each_prompt_once(server):
    """A JSON null is "not given" for every parameter: a batch read ``n`` before its nulls were dropped (a 400)."""
    code, body, _ = post(server + "/v1/completions", {"prompt": [PROMPT, PROMPT], "n": None, "max_tokens": 2})
    assert code == 200 and [c["index"] for c in body["choices"]] == [0, 1], body


def _open_stream(base: str, body: dict) -> socket.socket:
    """A streamed completion on a raw socket, returned once the response's head has arrived."""
    host, port = base.removeprefix("http://").split(":")
    raw = json.dumps(body).encode()
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + KEY.encode()
              + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(raw) + raw)
    head, deadline = b"", time.monotonic() + 10
    while b"\r\n\r\n" not in head and time.monotonic() < deadline:
        head += s.recv(4096)
    assert head.startswith(b"HTTP/1.1 200 "), head[:200]
    return s


def _wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def test_a_queued_stream_whose_client_closed_frees_its_places_at_once(server):
    """A queued stream writes nothing after its head, so its client's close (a FIN, as after a client-side timeout)
    went unnoticed until its first token: its choices held their places meanwhile, and other requests got 429."""
    long = {"prompt": PROMPT, "n": 2, "max_tokens": 2000, "ignore_eos": True, "medusa": False, "stream": True}
    running = _open_stream(server, long)  # both slots
    try:
        queued = _open_stream(server, long)  # both places of the queue
        assert _wait_for(lambda: metric(server, "num_requests_waiting") == 2, 10)
        queued.close()
        # well before the running request's 2,000 tokens end (3 s or more)
        assert _wait_for(lambda: metric(server, "num_requests_waiting") == 0, 1.5)
        assert metric(server, "num_requests_running") == 2
        assert post(server + "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})[0] == 200
    finally:
        running.close()
    wait_idle(server)


def _assembled(chunks: list[dict]) -> dict[int, dict]:
    """A completions stream's choices put together: text, logprobs' lists and finish_reason per index."""
    out: dict[int, dict] = {}
    for chunk in chunks:
        for c in chunk["choices"]:
            got = out.setdefault(c["index"], {"text": "", "finish_reason": None, "logprobs": None})
            got["text"] += c["text"]
            got["finish_reason"] = c["finish_reason"] or got["finish_reason"]
            if c["logprobs"] is not None:
                lp = got["logprobs"] = got["logprobs"] or {k: [] for k in c["logprobs"]}
                for k, v in c["logprobs"].items():
                    lp[k] += v
    return out


@pytest.mark.parametrize("extra", [
    {"max_tokens": 4},
    {"max_tokens": 3, "logprobs": 2},
    {"max_tokens": 0},  # the prompt alone
    {"max_tokens": 0, "logprobs": 1},
    {"max_tokens": 3, "logprobs": 1, "n": 2, "prompt": [PROMPT, OTHER], "stream_options": {"include_usage": True}},
    {"max_tokens": 6, "stop": ["t"], "logprobs": 0},
])
def test_a_streamed_echo_puts_together_into_the_whole_answer(server, extra):
    """Each choice's first chunk is the prompt (with logprobs, its tokens' scores, the first null), then the answer's
    chunks: together, the whole answer's text, logprobs and finish_reason (streamed echo was a 400)."""
    body = {"prompt": PROMPT, "echo": True, "temperature": 0, "ignore_eos": True, **extra}
    code, whole, _ = post(server + "/v1/completions", {k: v for k, v in body.items() if k != "stream_options"})
    assert code == 200, whole
    chunks = stream_chunks(server, "/v1/completions", body)
    streamed = _assembled(chunks)
    assert sorted(streamed) == [c["index"] for c in whole["choices"]]
    for c in whole["choices"]:
        got = streamed[c["index"]]
        assert (got["text"], got["finish_reason"]) == (c["text"], c["finish_reason"])
        assert got["logprobs"] == c["logprobs"]
        firsts = [x["choices"][0] for x in chunks if x["choices"] and x["choices"][0]["index"] == c["index"]]
        assert firsts[0]["text"] == (OTHER if c["index"] >= 2 else PROMPT)  # the prompt comes first, whole
    if "stream_options" in body:
        assert chunks[-1]["usage"] == whole["usage"]
