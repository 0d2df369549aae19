"""OpenAI request bodies -> Jobs (`runtime/serve/requests.py`) and the body reader, without a server: what a
client may send and what it gets back. Found by attacking `serve`: nulls that overrode given values, a one-token
prompt refused, inputs of the other endpoint silently ignored, tiny temperatures that reached the graph as 0,
integers too long for Python's int(), a client gone mid-body."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("fastapi")

from conftest import IM_START, make_chat_tokenizer  # noqa: E402

from medusa_export.runtime.generation_config import MIN_TEMPERATURE, GenerationConfig  # noqa: E402
from medusa_export.runtime.errors import InputError  # noqa: E402
from medusa_export.runtime.serve.app import ServeSettings  # noqa: E402
from medusa_export.runtime.serve.responses import sse_data  # noqa: E402
from medusa_export.runtime.serve.http_checks import json_body, read_body  # noqa: E402
from medusa_export.runtime.serve.requests import ApiError, ServedModel, parse_chat, parse_completion  # noqa: E402

MODEL = ServedModel("m", make_chat_tokenizer(), max_seq=64, medusa=True)
USER = [{"role": "user", "content": "t5 t6"}]


def _refused(parse, body: dict) -> ApiError:
    with pytest.raises(ApiError) as e:
        parse(body, MODEL)
    assert e.value.status == 400 and e.value.message
    return e.value


def test_null_means_not_given():
    """`max_completion_tokens: null` used to replace a given max_tokens with "up to the context's end"."""
    job = parse_completion({"prompt": "t5", "max_tokens": 3, "max_completion_tokens": None, "n": None, "top_p": None,
                            "stream": None, "medusa": None, "ignore_eos": None, "presence_penalty": None}, MODEL)
    assert job.config.max_new_tokens == 3 and not job.stream and job.config.medusa and not job.config.ignore_eos
    chat = parse_chat({"messages": [{"role": "user", "content": "t5", "name": None}], "max_tokens": None}, MODEL)
    assert chat.config.max_new_tokens == MODEL.max_seq - len(chat.prompt_ids)
    assert parse_completion({"prompt": "t5", "max_tokens": 9, "max_completion_tokens": 4}, MODEL).config.max_new_tokens == 4


def test_sampling_cuts_are_read_and_checked():
    cfg = parse_completion({"prompt": "t5", "temperature": 0.7, "top_p": 0.9, "top_k": 5}, MODEL).config
    assert (cfg.top_p, cfg.top_k) == (0.9, 5)
    cfg = parse_completion({"prompt": "t5", "top_p": 0, "top_k": -1}, MODEL).config  # OpenAI's 0, vLLM's "off"
    assert cfg.top_p == 0 and cfg.top_k == 0
    cfg = parse_completion({"prompt": "t5", "top_p": 1, "top_k": 0}, MODEL).config
    assert (cfg.top_p, cfg.top_k) == (1.0, 0)
    for bad in ({"top_p": 1.01}, {"top_p": -0.1}, {"top_p": "0.5"}, {"top_p": True}, {"top_k": -2}, {"top_k": 1.5},
                {"top_k": False}):
        assert _refused(parse_completion, {"prompt": "t5", **bad}).param == next(iter(bad))


def test_a_prompt_of_one_token_id_is_a_prompt():
    assert parse_completion({"prompt": [5]}, MODEL).prompt_ids == [5]
    assert parse_completion({"prompt": [[5, 6]]}, MODEL).prompt_ids == [5, 6]
    assert parse_completion({"prompt": ["t5 t6"]}, MODEL).prompt_ids == [5, 6]
    assert "0..319" in _refused(parse_completion, {"prompt": [320]}).message  # the range, not a shape complaint
    assert "0..319" in _refused(parse_completion, {"prompt": [-1]}).message


@pytest.mark.parametrize("parse, body, param", [
    (parse_chat, {"messages": USER, "prompt": "t5"}, "prompt"),  # the other endpoint's input
    (parse_completion, {"prompt": "t5", "messages": USER}, "messages"),
    (parse_chat, {"messages": [{"role": "user", "content": "t5", "name": "bob"}]}, "messages[0].name"),
    (parse_chat, {"messages": [{"role": "user", "content": "t5", "tool_calls": []}]}, "messages[0].tool_calls"),
])
def test_inputs_this_endpoint_does_not_read_are_refused(parse, body, param):
    assert _refused(parse, body).param == param


def test_bookkeeping_fields_are_accepted():
    job = parse_chat({"messages": USER, "user": "u1", "store": True, "metadata": {"k": "v"}, "service_tier": "auto"},
                     MODEL)
    assert job.prompt_ids.count(IM_START) == 2


@pytest.mark.parametrize("body, param", [
    ({"max_tokens": "garbage", "max_completion_tokens": 2}, "max_tokens"),  # was ignored beside the other name
    ({"max_tokens": -7, "max_completion_tokens": 2}, "max_tokens"),
    ({"max_tokens": 2, "max_completion_tokens": "x"}, "max_completion_tokens"),  # was reported as max_tokens
    ({"model": 5}, "model"),  # a type error, not "model not found"
    ({"model": ["m"]}, "model"),
    ({"user": 5}, "user"),
    ({"store": "yes"}, "store"),
    ({"service_tier": 42}, "service_tier"),
    ({"metadata": [1]}, "metadata"),
    ({"stop": "z" * 1001}, "stop"),  # checked at every token: bounded
])
def test_each_field_is_checked_under_its_own_name(body, param):
    error = _refused(parse_completion, {"prompt": "t5", **body})
    assert error.param == param and param in error.message


@pytest.mark.parametrize("part", [{"type": "text"}, {"type": "text", "text": 5}, {"type": "image_url", "text": "t5"}])
def test_a_text_part_needs_its_text(part):
    """A part without text was read as empty text."""
    assert _refused(parse_chat, {"messages": [{"role": "user", "content": [part]}]}).param == "messages[0].content"


def test_a_text_part_s_other_keys_do_not_change_it():
    part = {"type": "text", "text": "t5 t6", "cache_control": {"type": "ephemeral"}}
    assert parse_chat({"messages": [{"role": "user", "content": [part]}]}, MODEL).prompt_ids == \
        parse_chat({"messages": USER}, MODEL).prompt_ids


def test_long_stop_strings_are_refused_by_the_library_too():
    GenerationConfig(stop_strings=("z" * 1000,))
    with pytest.raises(InputError, match="at most 1000 characters"):
        GenerationConfig(stop_strings=("z" * 1001,))
    with pytest.raises(InputError, match="at most 16 stop strings"):
        GenerationConfig(stop_strings=tuple("abcdefghijklmnopq"))


@pytest.mark.parametrize("t", [1e-300, 5e-324, 1e-38, MIN_TEMPERATURE / 2])
def test_temperatures_too_small_to_sample_decode_greedily(t):
    """Such a temperature reached the graph as float32 0 (NaN probabilities: a 500 that also failed every request
    sharing the step); below MIN_TEMPERATURE sampling is argmax anyway."""
    job = parse_completion({"prompt": "t5", "temperature": t}, MODEL)
    assert job.config.temperature == 0.0 and job.config.medusa
    assert GenerationConfig(temperature=t).temperature == 0.0
    assert parse_completion({"prompt": "t5", "temperature": MIN_TEMPERATURE}, MODEL).config.temperature == MIN_TEMPERATURE


@pytest.mark.parametrize("t", [float("nan"), float("inf"), -0.5, "0.5", True, 1e39])  # 1e39: infinite in float32
def test_the_library_refuses_temperatures_that_are_not_finite_non_negative_numbers(t):
    with pytest.raises(InputError, match=r"temperature must be a number in \[0, 3.4e\+38\]"):
        GenerationConfig(temperature=t)


@pytest.mark.parametrize("raw, says", [
    (b'{"prompt": "t5", "max_tokens": ' + b"1" * 5000 + b"}", "more than 4,300 digits"),  # beyond int()'s limit
    (b'{"prompt": "t5", "seed": -' + b"9" * 4400 + b"}", "more than 4,300 digits"),
    (b"\xff\xfe{", "not valid UTF-8"), (b'{"prompt": ', "not valid JSON")])
def test_bodies_python_cannot_decode_are_400s(raw, says):
    """Each a 400 saying what is wrong; the integer's was Python's message cut mid-word, advising a Python call."""
    with pytest.raises(ApiError) as e:
        json_body(raw)
    assert e.value.status == 400 and says in e.value.message and "sys." not in e.value.message


def _deep(depth: int) -> list:
    value: list = []
    for _ in range(depth):  # built without recursion: deeper than json.dumps can go again
        value = [value]
    return value


@pytest.mark.parametrize("key", ["max_tokens", "max_completion_tokens", "temperature", "model", "user", "n"])
def test_a_value_too_deep_or_long_to_show_is_still_a_short_400(key):
    """A `max_tokens` nested just within the JSON parser's limit parsed, then its error message re-serialised it:
    RecursionError, a 500. A 4,300-digit max_tokens was echoed whole in its 400."""
    error = _refused(parse_completion, {"prompt": "t5", key: _deep(100_000)})
    assert error.param == key and len(error.message) < 200
    huge = 10 ** 4000
    for body in ({"max_tokens": huge}, {"temperature": huge}, {"seed": huge}, {"n": huge}):
        error = _refused(parse_completion, {"prompt": "t5", **body})
        assert len(error.message) < 300, error.message


def test_an_unknown_parameter_s_name_is_shown_short():
    error = _refused(parse_completion, {"prompt": "t5", "x" * 100_000: 1})
    assert len(error.message) < 200


def test_parameters_are_checked_before_the_chat_template_renders(monkeypatch):
    """A request with a wrong model or parameter cost a full render (seconds for a large body) before its 400."""
    def render(*_a, **_k):
        raise AssertionError("rendered")

    monkeypatch.setattr(MODEL.tokenizer, "encode_chat", render)
    for body, status in (({"model": "other"}, 404), ({"n": 0}, 400), ({"max_tokens": 0}, 400),
                         ({"stop": ["z"] * 5}, 400), ({"bogus": 1}, 400)):
        with pytest.raises(ApiError) as e:
            parse_chat({"messages": USER, **body}, MODEL)
        assert e.value.status == status


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32"])
def test_bodies_not_in_utf8_are_400s(encoding):
    """json.loads detects UTF-16 and UTF-32 bytes by itself; JSON on the wire is UTF-8 (RFC 8259), whose byte
    order mark may be skipped (as vLLM does)."""
    with pytest.raises(ApiError) as e:
        json_body('{"prompt": "t5"}'.encode(encoding))
    assert e.value.status == 400
    assert json_body('{"prompt": "t5 \u00e9"}'.encode()) == {"prompt": "t5 é"}
    assert json_body('{"prompt": "t5"}'.encode("utf-8-sig")) == {"prompt": "t5"}


def test_a_client_gone_mid_body_ends_the_request_quietly():
    from starlette.requests import ClientDisconnect

    class Gone:
        headers = {"content-length": "500"}

        async def stream(self):
            yield b'{"prompt": '
            raise ClientDisconnect()

    with pytest.raises(ApiError) as e:
        asyncio.run(read_body(Gone(), 1 << 20))
    assert e.value.status == 400 and "disconnected" in e.value.message


@pytest.mark.parametrize("key", ["sk-ü-key", "", " padded", "tab\tkey"])
def test_api_keys_clients_cannot_send_exactly_are_refused_at_start(key):
    with pytest.raises(InputError, match="--api-key must be"):
        ServeSettings(api_key=key)
    assert ServeSettings(api_key="sk-abc_123").api_key == "sk-abc_123"


def test_an_answer_that_ended_by_itself_is_answered_even_when_a_stop_came_meanwhile():
    """The shutdown (or the timeout) cancelled a request the engine was just handing back finished: a complete
    answer became a 503."""
    from medusa_export.runtime.serve.responses import result_or_error
    from medusa_export.runtime.serve.scheduler import Finished

    class Result:
        def __init__(self, finish_reason):
            self.finish_reason = finish_reason

    for natural in ("stop", "length"):
        done = Finished(Result(natural), None, "shutdown")
        assert result_or_error(done, 1.0) is done.result
    for reason, status in (("shutdown", 503), ("timeout", 504)):
        with pytest.raises(ApiError) as e:
            result_or_error(Finished(Result(reason), None, reason), 1.0)
        assert e.value.status == status


@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\r", "\n"])
def test_a_stream_event_stays_one_line_for_every_client(char):
    """Text a model wrote with U+2028 (asked to by its prompt) went out raw in an event: a client that splits
    decoded text with str.splitlines (`requests.iter_lines(decode_unicode=True)`) cut its data line in two and
    could not parse its JSON. Escaped, the event is one line however it is split, and its text is unchanged."""
    text = f"a{char}b\u00e9\U0001f600"
    event = sse_data({"choices": [{"text": text}]})
    lines = [line for line in event.splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("data: ") and event.endswith("\n\n")
    assert json.loads(lines[0][len("data: "):])["choices"][0]["text"] == text
    assert "\u00e9" in event  # other characters stay UTF-8, as before
