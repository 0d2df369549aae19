"""The OpenAI-compatible HTTP app (FastAPI) around one loaded artifact.

    app = create_app(runtime, ServeSettings(max_num_seqs=8, max_queue=8))
    # uvicorn.run(app, host="127.0.0.1", port=8000)   -- or `medusa-export serve ARTIFACT`

Routes: POST /v1/chat/completions, POST /v1/completions (both with ``stream``), GET /v1/models and
/v1/models/{id}, GET /health (alive), GET /ready (artifact loaded and accepting), GET /metrics (Prometheus).
Every response carries ``usage`` and ``metrics.speculative_decoding`` (per-request acceptance). Every error,
an unknown route included, is an OpenAI-style body. No /docs, /redoc or /openapi.json: the API is OpenAI's.
A client that disconnects, streaming or not, stops its decoding at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..engine import DEFAULT_MAX_NUM_BATCHED_TOKENS
from ..errors import InputError
from ..generator import GenerationResult
from ..logprobs import MAX_TOP_LOGPROBS
from .host_check import HostCheck, parse_allowed_hosts
from .metrics import ServerMetrics, accepted_per_position
from .http_deadlines import half_closed
from .http_checks import (authorize, check_identity_encoding, check_json_type, check_not_cross_origin,
                          closing_if_unread, json_body, read_body)
from .logprobs_json import AnswerLogprobs, TokenPieces
from .requests import ApiError, Job, ServedModel, parse_chat, parse_completion
from .scheduler import Finished, Request as Admitted, Scheduler


# Requests parse on threads of their own, in four lanes: chat or completion, small or large body. Chat requests wait
# on the template's workers, so completions never wait behind them; a flood of bodies near the size limit (a 1 MB
# prompt tokenizes for a second or more, into ~150 MB) takes two threads, the cores' worth, and never delays the
# small requests behind it nor holds more memory than two such parses.
SMALL_BODY_BYTES = 64 << 10
PARSE_THREADS = {False: 8, True: 2}  # by whether the body is large
NATURAL_FINISHES = ("stop", "length")  # an answer that ended by itself, not stopped from outside


# A stream's events must reach the client as they are sent: no cache may keep them, and a proxy (nginx) must not
# buffer them into one late block
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True)
class ServeSettings:
    max_num_seqs: int | None = None  # requests decoded together (default: the artifact's lanes, else 1)
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS  # rows of one engine step (decode + chunks)
    max_queue: int = 8  # requests that may wait for a place before new ones get 429
    context_drafts: bool = True  # greedy requests also verify continuations found in their context
    timeout_s: float = 300.0  # for the body to arrive (408), then for the request from admission, queueing included
    header_timeout_s: float = 30.0  # a connection's request line and headers must arrive within it (then closed)
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    model_name: str | None = None  # default: the artifact's model name
    # Host names answered besides loopback ones (`host_check`: DNS rebinding); None: decided by the address bound
    # (`run_server`: any name unless it binds a loopback address), loopback names only where that is unknown.
    allowed_hosts: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        key = self.api_key
        if key is not None and not (key.isascii() and key.isprintable() and key.strip() == key and key):
            # HTTP header values are ASCII; clients encode others differently (UTF-8 or latin-1), so they would fail
            raise InputError("--api-key must be a non-empty key of printable ASCII characters without surrounding "
                             "spaces: choose another key")
        name = self.model_name
        if name is not None and not (isinstance(name, str) and name.isprintable() and 0 < len(name) <= 256):
            # it is logged and sent in every answer: a newline would forge log lines
            raise InputError("--served-model-name must be 1 to 256 printable characters (no newline, control or other "
                             "non-printing character): give the model id clients send")
        hosts = self.allowed_hosts
        if hosts is not None and (not isinstance(hosts, tuple) or not all(isinstance(h, str) for h in hosts)):
            raise InputError("ServeSettings.allowed_hosts must be a tuple of host names: parse a comma-separated "
                             "list with host_check.parse_allowed_hosts")
        if hosts:  # checked and written as the Host check compares them (lower case, no brackets or final dot)
            object.__setattr__(self, "allowed_hosts", parse_allowed_hosts(",".join(hosts)))


def create_app(runtime, settings: ServeSettings = ServeSettings()) -> FastAPI:
    generator = runtime.generator
    name = settings.model_name or runtime.manifest.model.name
    model = ServedModel(name, generator.tokenizer, generator.backend.max_seq, generator.tree is not None,
                        settings.context_drafts, min(MAX_TOP_LOGPROBS, generator.backend.dims.sample_topk),
                        generator.backend.scores_prompts)
    pieces = TokenPieces(generator.tokenizer)  # tokens' text and bytes for logprobs
    metrics = ServerMetrics(name)
    sched = Scheduler(generator, settings.max_num_seqs, settings.max_num_batched_tokens, settings.max_queue, settings.timeout_s, metrics)
    served_by = {"X-Served-By": f"{socket.gethostname()}:{os.getpid()}"}  # which replica answered (Ray Serve)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        # `serve` drains before uvicorn stops (`server.draining_server`), which makes this a no-op; a host without
        # it (a test client, Ray Serve) drains here. The outcome is `sched.drained`.
        await sched.drain(deadline_s=5.0)
        sched.stop()

    app = FastAPI(title="medusa-export", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.router.redirect_slashes = False  # /v1/completions/ is an unknown route (404 body), not an empty 307
    app.state.scheduler, app.state.metrics = sched, metrics
    app.add_middleware(HostCheck, allowed=settings.allowed_hosts or ())

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=closing_if_unread(request, e.headers))

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException):  # unknown routes (404), wrong methods (405)
        what = {404: _no_route(request.url.path),
                405: f"{request.method} is not allowed on {request.url.path!r:.100}"}.get(e.status_code, str(e.detail))
        err = ApiError(e.status_code, what)  # OpenAI's type for an unknown route too: invalid_request_error
        return JSONResponse(err.body(), status_code=e.status_code, headers=closing_if_unread(request, e.headers))

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: load balancers' health checks
    async def health():
        return {"status": "ok"}

    @app.api_route("/ready", methods=["GET", "HEAD"])
    async def ready():
        if not sched.accepting:
            raise ApiError(503, "shutting down", type_="server_error")
        return {"status": "ready", "model": name}

    @app.api_route("/metrics", methods=["GET", "HEAD"])  # HEAD wherever GET (RFC 9110): monitoring probes
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    def model_card() -> dict:
        return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "medusa-export",
                "max_model_len": model.max_seq}

    @app.api_route("/v1/models", methods=["GET", "HEAD"])
    async def models(request: Request):
        authorize(request, settings.api_key)
        return {"object": "list", "data": [model_card()]}

    @app.api_route("/v1/models/{model_id:path}", methods=["GET", "HEAD"])
    async def model_info(request: Request, model_id: str):
        authorize(request, settings.api_key)
        if not model_id:  # "/v1/models/": a trailing slash is an unknown route, as elsewhere, not a model named ""
            raise ApiError(404, _no_route(request.url.path))
        if model_id != name:
            raise ApiError(404, f"the model {model_id!r:.80} does not exist: this server serves {name!r}",
                           param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        authorize(request, settings.api_key)
        return await _complete(request, await _parsed(request, parse_chat))

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request, settings.api_key)
        return await _complete(request, await _parsed(request, parse_completion))

    parse_lanes: dict = {}  # (chat, large body) -> its CapacityLimiter, made in the event loop at first use

    async def _parsed(request: Request, parse) -> Job:
        """The request's Job. Decoding JSON, the chat template and tokenization take up to seconds for a body near
        the size limit: off the event loop, on its lane's threads (`PARSE_THREADS`), so that other requests and
        streams carry on meanwhile. One waiting for its lane past the request timeout gets a 503 (a parse already
        running is bounded by the template workers' own limits and the body's size, not by this deadline)."""
        check_not_cross_origin(request.headers)
        check_json_type(request.headers.get("content-type"))
        check_identity_encoding(request.headers.get("content-encoding"))
        body = await read_body(request, settings.max_body_bytes, settings.timeout_s)
        call = lambda: parse(json_body(body), model)  # noqa: E731
        chat, large = parse is parse_chat, len(body) > SMALL_BODY_BYTES
        if (chat, large) not in parse_lanes:
            parse_lanes[chat, large] = anyio.CapacityLimiter(PARSE_THREADS[large])
        try:
            with anyio.fail_after(settings.timeout_s):
                return await anyio.to_thread.run_sync(call, limiter=parse_lanes[chat, large])
        except TimeoutError:
            what = "the chat template did not render" if chat else "the prompt was not tokenized"
            raise ApiError(503, f"{what} within {settings.timeout_s:g} s (other requests' parses ahead of it): "
                           f"retry", type_="server_error", headers={"Retry-After": "1"}) from None

    async def _complete(http: Request, job: Job):
        rid = ("chatcmpl-" if job.chat else "cmpl-") + uuid.uuid4().hex
        if not job.stream:
            _refuse_half_closed(http, None)  # before admission: decoding could not tell a closed client apart
        admitted = sched.submit(job)  # 429 / 503 here, before any response starts
        if job.stream:
            return _StreamOf(admitted, _sse(rid, job, name, admitted, pieces), media_type="text/event-stream",
                             headers={**served_by, **SSE_HEADERS})
        watcher = asyncio.create_task(_cancel_on_disconnect(http, admitted))
        texts, done = [], None
        try:
            async for item in admitted.events():
                if isinstance(item, Finished):
                    done = item
                else:
                    texts.append(item.text)
        finally:
            watcher.cancel()
            admitted.cancel()  # no-op once it finished
        _refuse_half_closed(http, done)
        result = _result_or_error(done, settings.timeout_s)
        return JSONResponse(_response(rid, job, name, "".join(texts), result, pieces), headers=served_by)

    return app


class _StreamOf(StreamingResponse):
    """A streamed answer that cancels its request however the response ends (disconnect included)."""

    def __init__(self, admitted: Admitted, content, **kw) -> None:
        super().__init__(content, **kw)
        self.admitted = admitted

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.admitted.cancel()


async def _cancel_on_disconnect(http: Request, admitted: Admitted) -> None:
    """The body has been read, so the next ASGI message is the client's disconnect, or a wake-up for its
    half-close (`http_deadlines.half_closed`), which stops it as well."""
    while not half_closed(http.scope) and (await http.receive())["type"] != "http.disconnect":
        pass
    admitted.cancel()


def _refuse_half_closed(http: Request, done: Finished | None) -> None:
    """A 400 for a non-streamed HTTP/1.0 request whose client shut its sending side before the answer: TCP cannot
    tell that from a client gone, whose decoding must stop at once, before something is written to it, and an
    HTTP/1.0 client may be sent nothing but its answer (`http_deadlines`: HTTP/1.1 ones are probed); an answer
    that finished anyway is sent."""
    if half_closed(http.scope) and not _ended_by_itself(done):
        raise ApiError(400, "the client shut its sending side (half-close) before the answer: decoding stopped, as "
                       "for a client gone; keep the connection open until the answer arrives, or use HTTP/1.1",
                       code="client_half_closed")


def _ended_by_itself(done: Finished | None) -> bool:
    """Whether the answer finished by itself (stop, length), whatever asked it to stop meanwhile."""
    return done is not None and done.result is not None and done.result.finish_reason in NATURAL_FINISHES


def _result_or_error(done: Finished | None, timeout_s: float) -> GenerationResult:
    if _ended_by_itself(done):
        return done.result  # it ended by itself, even if a timeout or the shutdown asked it to stop meanwhile
    if done is not None and done.error is not None:
        raise ApiError(500, f"decoding failed: {type(done.error).__name__}: {str(done.error)[:200]}",
                       type_="server_error")
    if done is not None and done.reason == "shutdown":
        raise ApiError(503, "the server shut down before the request finished: retry on another replica",
                       type_="server_error", headers={"Retry-After": "1"})
    if done is None or done.result is None or done.reason == "timeout":
        raise ApiError(504, f"the request did not finish within {timeout_s:g} s", type_="server_error")
    return done.result


async def _sse(rid: str, job: Job, name: str, admitted: Admitted,
               pieces: TokenPieces | None = None) -> AsyncIterator[str]:  # pieces: for logprobs
    created = int(time.time())
    kind = "chat.completion.chunk" if job.chat else "text_completion"
    answer = AnswerLogprobs(pieces, job.chat) if job.config.logprobs is not None else None
    pending = []  # logprobs of tokens whose text is held back: they go with the next chunk that has text, or the last

    def chunk(text: str | None, finish: str | None, role: bool = False) -> str:
        logprobs = answer.render(pending) if answer and pending and not role else None
        if logprobs is not None:
            pending.clear()
        if job.chat:
            delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": logprobs}
        # With include_usage every chunk carries "usage", null until the last one's (as OpenAI's stream does)
        usage = {"usage": None} if job.include_usage else {}
        return _data({"id": rid, "object": kind, "created": created, "model": name, "choices": [choice]} | usage)

    # The role chunk goes with the first event from the engine, as vLLM's does, not at once: load generators (vLLM's
    # `bench serve`) take the first chunk with choices for the first token, so one sent while the request was still
    # queued or prefilling made their time to first token near zero.
    role_sent = not job.chat
    async for item in admitted.events():
        if not isinstance(item, Finished):
            if not role_sent:
                role_sent = True
                yield chunk("", None, role=True)
            pending.extend(item.logprobs or [])
            if item.text:
                yield chunk(item.text, None)
            continue
        try:
            result = _result_or_error(item, 0)
        except ApiError as e:  # an error event alone when no token came, as vLLM's
            yield _data(ApiError(e.status, "the request timed out" if e.status == 504 else e.message,
                                 type_="server_error").body())
            break
        if not role_sent:  # an answer that ended before its first token's event (an end of sequence at once)
            yield chunk("", None, role=True)
        pending += _eos_entry(job, result)
        yield chunk(None if job.chat else "", result.finish_reason)
        if job.include_usage:
            yield _data({"id": rid, "object": kind, "created": created, "model": name, "choices": [],
                         "usage": _usage(job, result), "metrics": _spec(result)})
    yield "data: [DONE]\n\n"


# Characters JSON leaves unescaped that many clients take for line breaks (Python's str.splitlines, which
# `requests.iter_lines(decode_unicode=True)` uses): raw in an event, they cut its data line in two and its JSON
# no longer parses. A model writes them when its prompt asks it to.
_LINE_BREAKS = str.maketrans({"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _data(obj: dict) -> str:
    """One server-sent event: the JSON on one line, whatever line breaks a client recognises."""
    return f"data: {json.dumps(obj, ensure_ascii=False).translate(_LINE_BREAKS)}\n\n"


def _response(rid: str, job: Job, name: str, text: str, result: GenerationResult, pieces: TokenPieces) -> dict:
    if job.echo is not None:  # the prompt before the answer, in the text and (with logprobs) the log-probabilities
        text = job.echo + text if job.answer else job.echo
    entries = [*result.logprobs, *_eos_entry(job, result)] if result.logprobs is not None and job.answer else []
    if result.logprobs is None:
        logprobs = None
    elif job.echo is not None:  # echo with logprobs scored the prompt (`parse_completion`)
        logprobs = AnswerLogprobs(pieces, False).render_echo(job.prompt_ids, result.prompt_logprobs, entries)
    else:
        logprobs = AnswerLogprobs(pieces, job.chat).render(entries)
    finish = result.finish_reason if job.answer else "length"  # max_tokens 0: the budget ended it
    if job.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                  "logprobs": logprobs}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs}
    return {"id": rid, "object": "chat.completion" if job.chat else "text_completion", "created": int(time.time()),
            "model": name, "choices": [choice], "usage": _usage(job, result), "metrics": _spec(result)}


def _eos_entry(job: Job, result: GenerationResult) -> list:
    """On the completions endpoint, the entry of the end-of-sequence token that ended the answer (set only with
    logprobs), listed after the answer's as OpenAI's legacy completions list it: lm-evaluation-harness reads the entry
    after an echoed prompt, which with max_tokens 1 is that token where the model would stop there. Chat: none."""
    return [result.eos_logprob] if result.eos_logprob is not None and not job.chat else []


def _no_route(path: str) -> str:
    return f"no route {path!r:.100}: see /v1/models, /v1/chat/completions, /v1/completions"


def _usage(job: Job, result: GenerationResult) -> dict:
    prompt, answer = len(job.prompt_ids), result.new_tokens if job.answer else 0
    return {"prompt_tokens": prompt, "completion_tokens": answer, "total_tokens": prompt + answer}


def _spec(result: GenerationResult) -> dict:
    """Per-request acceptance: what users of speculative decoding ask for first."""
    return {"speculative_decoding": {
        "medusa": result.heads_steps > 0,  # the heads' tree verified, not merely chosen at admission (docs)
        "steps": result.steps,
        "mean_accepted_tokens_per_step": result.mean_accepted,
        "draft_tokens": len(result.step_accepted) * result.draft_depth,
        "accepted_tokens": sum(result.step_accepted),  # 0 per step without Medusa
        "accepted_from_heads": result.accepted_heads,  # by source: "medusa" is false where only drafts were verified
        "accepted_from_drafts": result.accepted_context,  # context and corpus drafts
        "accepted_tokens_per_position": accepted_per_position(result.step_accepted, result.draft_depth),
    }}
