"""OpenAI request bodies -> a validated `Job` (token ids + `GenerationConfig`), or an `ApiError` that becomes an
OpenAI-style error response. Parameters the runtime cannot honour are refused, never silently ignored; a JSON
``null`` means "not given" for every optional parameter (as OpenAI's API reads it). Accepted and without effect on
the answer: ``user``, ``store``, ``metadata``, ``service_tier`` (bookkeeping of OpenAI's own service).

    job = parse_chat(body, ctx)           # POST /v1/chat/completions
    jobs = parse_completions(body, ctx)   # POST /v1/completions: one job per prompt of the request
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from ..generation_config import MAX_STOP_CHARS, GenerationConfig, effective_temperature, is_int
from ..errors import BusyError, InputError
from ..logprobs import MAX_TOP_LOGPROBS
from ..tokenizer import ChatTokenizer, check_text


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        # A request's own text (an unknown field's name) may hold lone surrogates, which a UTF-8 body cannot carry:
        # escaped, or rendering the 400 failed as a 500.
        message, param = _encodable(message), None if param is None else _encodable(param)
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _encodable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(frozen=True)
class ServedModel:
    """What requests are checked against."""

    name: str
    tokenizer: ChatTokenizer
    max_seq: int  # prompt + new tokens must fit
    medusa: bool  # the artifact has heads
    context_drafts: bool = True  # greedy requests speculate from their context too (also without heads)
    max_logprobs: int = MAX_TOP_LOGPROBS  # alternatives per token a request may ask for (the graph's top-S, at most 20)
    scores_prompts: bool = True  # echo with logprobs can score the prompt (`Backend.scores_prompts`: not TensorRT)


@dataclass
class Job:
    prompt_ids: list[int]
    config: GenerationConfig
    stream: bool
    include_usage: bool
    chat: bool  # chat.completion(s) objects, else text_completion
    echo: str | None = None  # the completions endpoint's echo: the prompt's text, put before the answer's
    answer: bool = True  # False: echo with max_tokens 0, the prompt alone (vLLM's echo without generation)
    n: int = 1  # choices: sequences decoded from this prompt (`responses.choice_jobs`)
    request_id: str = ""  # the answer's id, set when admitted; with ``choice``, what the request log names
    choice: int = 0  # this job's choice index in the answer (a completions batch: prompt i, choice j -> i * n + j)


# Accepted and honoured, or accepted when they ask for what the runtime does anyway.
_COMMON = {"model", "max_tokens", "max_completion_tokens", "temperature", "stop", "seed", "stream", "stream_options",
           "medusa", "ignore_eos", "user", "n", "top_p", "top_k", "presence_penalty", "frequency_penalty", "logprobs",
           "top_logprobs", "logit_bias", "response_format", "tools", "tool_choice", "parallel_tool_calls",
           "functions", "function_call", "best_of", "echo", "suffix", "service_tier", "store", "metadata",
           "repetition_penalty"}  # vLLM's; its `bench serve` sends repetition_penalty: 1.0 with every completion
_MESSAGE_KEYS = {"role", "content"}  # a message's other fields (name, tool_calls, ...) are not rendered: refused
# Parameter -> the values that mean "not used" (the API's defaults and "off" values); anything else is a 400.
_NEUTRAL: dict[str, tuple] = {
    "best_of": (1,), "presence_penalty": (0,), "frequency_penalty": (0,),
    "logit_bias": (None, {}),
    "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"), "parallel_tool_calls": (None, True, False),
    "functions": (None, []), "function_call": (None, "none"), "response_format": (None, {"type": "text"}),
    "repetition_penalty": (1,),
}
# OpenAI's bookkeeping fields: accepted without effect, but of the types its API defines.
_BOOKKEEPING = (("user", str, "a string"), ("store", bool, "true or false"), ("service_tier", str, "a string"),
                ("metadata", dict, "an object"))
_STREAM_OPTIONS = {"include_usage", "include_obfuscation"}
_SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)  # what vLLM accepts: signed or unsigned 64-bit
MAX_CHOICES = 128  # OpenAI's bound on n; the server's own (--max-num-seqs plus --max-queue) is checked at admission


def parse_chat(body: Any, model: ServedModel) -> Job:
    """Messages go through the chat template with their text as data (`ChatTokenizer.encode_chat`). A final
    assistant message is continued (a prefill): the answer picks up where its text ends."""
    body = _present(_object(body), "messages", other="prompt", other_endpoint="/v1/completions")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    rendered = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise ApiError(400, f"messages[{i}] needs a role of system, user, assistant or developer",
                           param=f"messages[{i}].role")
        extra = sorted(k for k, v in m.items() if k not in _MESSAGE_KEYS and v is not None)
        if extra:
            raise ApiError(400, f"messages[{i}].{extra[0][:80]} is not supported (this server renders only role "
                           f"and content): leave it out", param=f"messages[{i}].{extra[0][:80]}")
        rendered.append({"role": "system" if m["role"] == "developer" else m["role"],
                         "content": _content(m.get("content"), i)})
    if not _same(body.get("echo", False), False):
        raise ApiError(400, "echo belongs to /v1/completions (the prompt before the answer): leave it out",
                       param="echo")
    # Before the template renders: a wrong parameter costs no render
    options = _options(body, model, _chat_logprobs(body, model))
    continue_final = rendered[-1]["role"] == "assistant"
    ids = _tokenize(lambda: model.tokenizer.encode_chat(rendered, continue_final=continue_final), "messages")
    return _job(options, model, ids, chat=True)


def parse_completions(body: Any, model: ServedModel) -> list[Job]:
    """The completions endpoint's prompts: one, or a batch (a list of strings, or of lists of token ids), one job
    each, as OpenAI's and vLLM's; the request's choices are each prompt's ``n`` in turn."""
    prompt = body.get("prompt") if isinstance(body, dict) else None
    if not (isinstance(prompt, list) and len(prompt) > 1 and any(isinstance(p, (str, list)) for p in prompt)):
        return [parse_completion(body, model)]  # one prompt (a list of token ids, a list with one prompt)
    for i, one in enumerate(prompt):  # a batch's prompts are strings or lists of ids, not a batch again
        if not (isinstance(one, str) or isinstance(one, list) and all(is_int(t) for t in one)):
            raise ApiError(400, f"prompt[{i}] must be a string or a list of token ids (a batch holds prompts, not "
                           f"batches)", param=f"prompt[{i}]")
    choices = len(prompt) * _choices(body)
    if choices > MAX_CHOICES:
        raise ApiError(400, f"{len(prompt)} prompts times n make {choices} answers: at most {MAX_CHOICES} a request",
                       param="prompt")
    jobs = []
    for i, one in enumerate(prompt):
        try:
            jobs.append(parse_completion({**body, "prompt": one}, model))
        except ApiError as e:
            if e.param != "prompt":
                raise
            raise ApiError(e.status, f"prompt[{i}]: {e.message}", param=f"prompt[{i}]", code=e.code) from None
    return jobs


def parse_completion(body: Any, model: ServedModel) -> Job:
    """A raw prompt: special tokens written in it are parsed as such (it is the caller's whole input)."""
    body = _present(_object(body), "prompt", other="messages", other_endpoint="/v1/chat/completions")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one prompt (one token id alone stays a list of ids)
    text = isinstance(prompt, str) and prompt
    if not text and not (isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt)):
        raise ApiError(400, "'prompt' must be a non-empty string or list of token ids, or a list of such prompts",
                       param="prompt")
    options = _options(body, model, _completion_logprobs(body, model))
    echo = _echo(body, options, model)  # checked before the prompt is tokenized, as every other parameter
    ids = _tokenize(lambda: model.tokenizer.encode(prompt), "prompt") if text else list(prompt)
    job = _job(options, model, ids, chat=False)
    if echo:  # the prompt's text and, with logprobs, its tokens' (ids checked in _job)
        # Special tokens as written: the same prompt sent as text echoes them, and the logprobs' tokens name them
        job.echo = prompt if text else model.tokenizer.decode(ids, skip_special_tokens=False)
        job.config = dataclasses.replace(job.config, prompt_logprobs=job.config.logprobs)
    return job


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _present(body: dict, own: str, other: str, other_endpoint: str) -> dict:
    """The parameters given (null: not given); the other endpoint's input is refused, not ignored."""
    body = {k: v for k, v in body.items() if v is not None}
    if other in body:
        raise ApiError(400, f"'{other}' belongs to {other_endpoint}; this endpoint reads '{own}'", param=other)
    return body


def _content(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    # A part's other keys (cache_control, which LiteLLM and LangChain send) do not change its text: ignored, as vLLM.
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                         isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts, each "
                   f"{{\"type\": \"text\", \"text\": \"...\"}} (no images or audio)",
                   param=f"messages[{i}].content")


def _tokenize(encode, param: str) -> list[int]:
    try:
        return encode()
    except InputError as e:  # e.g. a lone surrogate: not valid Unicode
        raise ApiError(400, f"{param}: {e}", param=param) from None
    except BusyError as e:  # every chat template worker held by slow renders
        raise ApiError(503, str(e), type_="server_error", headers={"Retry-After": "1"}) from None


def _same(a: Any, b: Any) -> bool:
    """Equality that does not take True for 1 (JSON booleans are not numbers)."""
    return isinstance(a, bool) == isinstance(b, bool) and a == b


@dataclass(frozen=True)
class _Options:
    """What a request asks for besides its prompt, checked before the prompt is rendered and tokenized."""

    max_tokens: tuple[str, int] | None  # (the parameter's name, its value) when given
    config: GenerationConfig  # max_new_tokens still 1: set once the prompt's length is known
    stream: bool
    include_usage: bool
    n: int = 1


def _options(body: dict, model: ServedModel, logprobs: int | None) -> _Options:
    """``logprobs``: the alternatives per token the endpoint's own parameters asked for (None: no logprobs)."""
    unknown = sorted(set(body) - _COMMON - {"prompt", "messages"})
    if unknown:
        raise ApiError(400, f"unknown parameter {unknown[0]!r:.80}", param=unknown[0][:80])
    for key, types, what in _BOOKKEEPING:
        if key in body and not isinstance(body[key], types):
            raise ApiError(400, f"{key} must be {what}, got {_shown(body[key])}", param=key)
    name = body.get("model")
    if name is not None and not isinstance(name, str):
        raise ApiError(400, f"model must be a string, got {_shown(name)}", param="model")
    if name is not None and name != model.name:
        raise ApiError(404, f"the model {name!r:.80} does not exist: this server serves {model.name!r}", param="model",
                       code="model_not_found")
    for key, neutral in _NEUTRAL.items():
        if key in body and not any(_same(body[key], v) for v in neutral):
            allowed = " or ".join(json.dumps(v) for v in neutral)
            raise ApiError(400, f"{key}={_shown(body[key], 60)} is not supported by this server "
                           f"(leave it out or send {allowed})", param=key)
    max_tokens = _max_tokens(body)
    temperature = body.get("temperature")
    if temperature is None:
        temperature = 1.0  # OpenAI's default; 0 is greedy, the lossless mode
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 2:
        raise ApiError(400, f"temperature must be a number in [0, 2], got {_shown(temperature)}", param="temperature")
    temperature = effective_temperature(temperature)  # the server decides speculation on what decoding will use
    medusa, ignore_eos = body.get("medusa", True), body.get("ignore_eos", False)
    for key, value in (("medusa", medusa), ("ignore_eos", ignore_eos)):
        if not isinstance(value, bool):
            raise ApiError(400, f"{key} must be true or false", param=key)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", param="stream")
    options = body.get("stream_options")
    if options is not None and not stream:
        raise ApiError(400, "stream_options is only allowed with stream: true", param="stream_options")
    # include_obfuscation (OpenAI's: random padding in an extra field of each chunk, which clients skip) is accepted
    # without effect: this server pads nothing, and OpenAI's docs tell clients to send false to save bandwidth.
    if options is not None and not (isinstance(options, dict) and set(options) <= _STREAM_OPTIONS
                                    and all(isinstance(v, (bool, type(None))) for v in options.values())):
        raise ApiError(400, "stream_options must be an object with the booleans include_usage and "
                       "include_obfuscation", param="stream_options")
    seed = body.get("seed")
    if seed is not None and (not is_int(seed)
                             or not _SEED_RANGE[0] <= seed <= _SEED_RANGE[1]):
        raise ApiError(400, f"seed must be an integer in [{_SEED_RANGE[0]}, {_SEED_RANGE[1]}]", param="seed")
    top_p, top_k = _cuts(body)
    config = GenerationConfig(max_new_tokens=1, temperature=temperature, stop_strings=_stops(body),
                              top_p=top_p, top_k=top_k, logprobs=logprobs,
                              medusa=medusa and (model.medusa or model.context_drafts and temperature == 0),
                              context_drafts=model.context_drafts, seed=None if seed is None else seed % 2 ** 64,
                              chat=False, ignore_eos=ignore_eos)
    return _Options(max_tokens, config, stream, bool((options or {}).get("include_usage")), _choices(body))


def _choices(body: dict) -> int:
    """``n``: how many answers to the prompt, each decoded as a sequence of its own."""
    n = body.get("n")
    n = 1 if n is None else n  # null: not given (a batch's body is read before its nulls are dropped)
    if not is_int(n) or not 1 <= n <= MAX_CHOICES:
        raise ApiError(400, f"n must be an integer in [1, {MAX_CHOICES}] (answers to the prompt), got {_shown(n)}",
                       param="n")
    return n


def _cuts(body: dict) -> tuple[float, int]:
    """``top_p`` in [0, 1] (OpenAI's range; 0 keeps the best token alone) and vLLM's ``top_k`` (-1 or 0: no cut) as
    `GenerationConfig` takes them. They cut what sampling draws from; greedy requests ignore them."""
    top_p, top_k = body.get("top_p", 1), body.get("top_k", 0)
    if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0 <= top_p <= 1:
        raise ApiError(400, f"top_p must be a number in [0, 1], got {_shown(top_p)}", param="top_p")
    if not is_int(top_k) or top_k < -1:
        raise ApiError(400, f"top_k must be an integer >= -1 (-1 or 0: no cut), got {_shown(top_k)}", param="top_k")
    return float(top_p), max(top_k, 0)


def _chat_logprobs(body: dict, model: ServedModel) -> int | None:
    """Chat's ``logprobs`` (true or false) and ``top_logprobs`` (alternatives per token, with logprobs: true)."""
    on, top = body.get("logprobs", False), body.get("top_logprobs", 0)
    if not isinstance(on, bool):
        raise ApiError(400, f"logprobs must be true or false on /v1/chat/completions (top_logprobs says how many "
                       f"alternatives), got {_shown(on)}", param="logprobs")
    _check_count(top, "top_logprobs", model)
    if top and not on:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    return top if on else None


def _completion_logprobs(body: dict, model: ServedModel) -> int | None:
    """The completions endpoint's ``logprobs``: how many alternatives per token (0: the chosen token's alone)."""
    count, top = body.get("logprobs", False), body.get("top_logprobs", 0)
    if not _same(top, 0):
        raise ApiError(400, "top_logprobs belongs to /v1/chat/completions: on /v1/completions send logprobs: N "
                       "(alternatives per token)", param="top_logprobs")
    if count is False:  # off, as null
        return None
    _check_count(count, "logprobs", model)
    return count


def _echo(body: dict, options: _Options, model: ServedModel) -> bool:
    """The completions endpoint's ``echo`` (true or false)."""
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise ApiError(400, f"echo must be true or false, got {_shown(echo)}", param="echo")
    # Refused here: the engine's own refusal (an InputError when the request is queued) would be a 500
    if echo and options.config.logprobs is not None and not model.scores_prompts:
        raise ApiError(400, "echo with logprobs scores the prompt, which this backend cannot (TensorRT runs a long "
                       "prompt in pieces, whose borders lose the probabilities): send echo without logprobs, or "
                       "serve the artifact with --backend ort", param="echo")
    return echo


def _check_count(value: Any, key: str, model: ServedModel) -> None:
    if not is_int(value) or not 0 <= value <= model.max_logprobs:
        raise ApiError(400, f"{key} must be an integer in [0, {model.max_logprobs}] (alternatives per token), got "
                       f"{_shown(value)}", param=key)


def _job(options: _Options, model: ServedModel, ids: list[int], chat: bool) -> Job:
    """The request's job once its prompt is token ids: the prompt and the answer's length checked against the
    model's."""
    if not ids:
        raise ApiError(400, "the prompt is empty after tokenization", param="prompt")
    vocab = model.tokenizer.vocab_size
    if any(t < 0 or t >= vocab for t in ids):
        raise ApiError(400, f"prompt token ids must be in 0..{vocab - 1}", param="prompt")
    room = model.max_seq - len(ids)
    if room < 1:
        raise ApiError(400, f"the prompt ({len(ids)} tokens) leaves no room in the model's maximum sequence of "
                       f"{model.max_seq} tokens: shorten the prompt", param="messages" if chat else "prompt",
                       code="context_length_exceeded")
    key, max_tokens = options.max_tokens or ("max_tokens", room)
    if max_tokens > room:
        raise ApiError(400, f"the prompt ({len(ids)} tokens) plus {key} ({_shown(max_tokens)}) exceeds the model's "
                       f"maximum sequence of {model.max_seq} tokens: shorten the prompt or lower {key}",
                       param=key, code="context_length_exceeded")
    # Decoding makes at least the prompt's next token: with echo and 0, it is made and not shown
    config = dataclasses.replace(options.config, max_new_tokens=max(max_tokens, 1))
    return Job(ids, config, options.stream, options.include_usage, chat, answer=max_tokens > 0, n=options.n)


def _max_tokens(body: dict) -> tuple[str, int] | None:
    """``max_completion_tokens`` (OpenAI's current name) before ``max_tokens``, as vLLM reads them; each one given
    is checked, so a bad value is refused under its own name, never ignored. Neither: None (the room left)."""
    given = {key: body[key] for key in ("max_completion_tokens", "max_tokens") if key in body}
    least = 0 if body.get("echo") is True else 1  # echo with 0: the prompt scored, no answer (as vLLM and OpenAI)
    for key, value in given.items():
        if not is_int(value) or value < least:
            raise ApiError(400, f"{key} must be a positive integer (0 only with echo), got {_shown(value)}",
                           param=key)
    return next(iter(given.items()), None)


def _shown(value: Any, limit: int = 40) -> str:
    """A client's JSON value in a message, at most ``limit`` characters: never the whole of a huge number, and
    never an error of its own (a value nested near the parser's limit is too deep to serialise again)."""
    try:
        text = json.dumps(value)
    except (RecursionError, ValueError):  # too deep; an integer beyond Python's 4,300 digits
        return "a JSON " + {list: "array", dict: "object", int: "number"}.get(type(value), type(value).__name__)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "stop must be a non-empty string or a list of up to 4 of them", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"each stop string may hold at most {MAX_STOP_CHARS} characters", param="stop")
    return tuple(_tokenize(lambda: check_text(s), "stop") for s in stops)
