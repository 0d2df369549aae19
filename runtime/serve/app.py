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
import dataclasses
import time
import uuid
from dataclasses import dataclass

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..engine import DEFAULT_MAX_NUM_BATCHED_TOKENS
from ..errors import InputError
from ..logprobs import MAX_TOP_LOGPROBS
from .host_check import HostCheck, parse_allowed_hosts
from .metrics import ServerMetrics
from .request_log import log_finished
from .http_deadlines import half_closed, served_by
from .http_checks import (authorize, check_identity_encoding, check_json_type, check_not_cross_origin,
                          closing_if_unread, json_body, read_body)
from .logprobs_json import TokenPieces
from .requests import ApiError, Job, ServedModel, parse_chat, parse_completions
from .responses import choice_jobs, ended_by_itself, gather, response_body, result_or_error, sse_events
from .scheduler import Finished, Request as Admitted, Scheduler, cancel_all


# Requests parse on threads of their own, in four lanes: chat or completion, small or large body. Chat requests wait
# on the template's workers, so completions never wait behind them; a flood of bodies near the size limit (a 1 MB
# prompt tokenizes for a second or more, into ~150 MB) takes two threads, the cores' worth, and never delays the
# small requests behind it nor holds more memory than two such parses.
SMALL_BODY_BYTES = 64 << 10
PARSE_THREADS = {False: 8, True: 2}  # by whether the body is large


# A stream's events must reach the client as they are sent: no cache may keep them, and a proxy (nginx) must not
# buffer them into one late block
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True)
class ServeSettings:
    max_num_seqs: int | None = None  # requests decoded together (default: the artifact's lanes, else 1)
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS  # rows of one engine step (decode + chunks)
    max_queue: int = 8  # requests that may wait for a place before new ones get 429
    context_drafts: bool = True  # greedy requests also verify continuations found in their context
    prefix_caching: bool = True  # requests start from finished requests' KV rows for a shared prefix (`prefix_reuse`)
    timeout_s: float = 300.0  # for the body to arrive (408), then for the request from admission, queueing included
    header_timeout_s: float = 30.0  # a connection's request line and headers must arrive within it (then closed)
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    model_name: str | None = None  # default: the artifact's model name
    # Host names answered besides loopback ones (`host_check`: DNS rebinding); None: decided by the address bound
    # (`run_server`: any name unless it binds a loopback address), loopback names only where that is unknown.
    allowed_hosts: tuple[str, ...] | None = None
    log_requests: bool = False  # a line per finished answer on the `medusa_export.requests` logger (`request_log`)

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
    sched = Scheduler(generator, settings.max_num_seqs, settings.max_num_batched_tokens, settings.max_queue,
                      settings.timeout_s, metrics, settings.prefix_caching,
                      on_finished=log_finished if settings.log_requests else None)

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
    app.add_middleware(ServedBy)  # outermost: the Host check's refusals name their replica too

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
        return await _complete(request, [await _parsed(request, parse_chat)])

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request, settings.api_key)
        return await _complete(request, await _parsed(request, parse_completions))

    parse_lanes: dict = {}  # (chat, large body) -> its CapacityLimiter, made in the event loop at first use

    async def _parsed(request: Request, parse) -> Job | list[Job]:
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

    async def _complete(http: Request, jobs: list[Job]):
        """``jobs``: the request's prompts (several in a completions batch), each with its ``n`` choices."""
        rid = ("chatcmpl-" if jobs[0].chat else "cmpl-") + uuid.uuid4().hex
        if not jobs[0].stream:
            _refuse_half_closed(http, [])  # before admission: decoding could not tell a closed client apart
        # 400 / 429 / 503 here, before any response starts
        choices = [choice for job in jobs for choice in choice_jobs(job)]  # in the order of the answer's indexes
        admitted = sched.submit_all([dataclasses.replace(c, request_id=rid, choice=i) for i, c in enumerate(choices)],
                                    param="prompt" if len(jobs) > 1 else "n")
        if jobs[0].stream:
            return _StreamOf(admitted, sse_events(rid, jobs, name, admitted, pieces), media_type="text/event-stream",
                             headers=SSE_HEADERS)
        watcher = asyncio.create_task(_cancel_on_disconnect(http, admitted))
        try:
            answers = await gather(admitted)
        finally:
            watcher.cancel()
            cancel_all(admitted)
        _refuse_half_closed(http, [done for _, done in answers])
        results = [(text, result_or_error(done, settings.timeout_s)) for text, done in answers]
        return JSONResponse(response_body(rid, jobs, name, admitted, results, pieces))

    return app


class ServedBy:
    """ASGI middleware naming the host and process that answered (``X-Served-By``) on every response, errors
    included: behind Ray Serve's proxy or a load balancer, which replica refused a request with a 429."""

    def __init__(self, app) -> None:
        self.app, self.value = app, served_by()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def named(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-served-by", self.value)]}
            await send(message)

        await self.app(scope, receive, named)


class _StreamOf(StreamingResponse):
    """A streamed answer that cancels its requests however the response ends (disconnect included)."""

    def __init__(self, admitted: list[Admitted], content, **kw) -> None:
        super().__init__(content, **kw)
        self.admitted = admitted

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            cancel_all(self.admitted)


async def _cancel_on_disconnect(http: Request, admitted: list[Admitted]) -> None:
    """The body has been read, so the next ASGI message is the client's disconnect, or a wake-up for its
    half-close (`http_deadlines.half_closed`), which stops it as well."""
    while not half_closed(http.scope) and (await http.receive())["type"] != "http.disconnect":
        pass
    cancel_all(admitted)


def _refuse_half_closed(http: Request, ends: list[Finished | None]) -> None:
    """A 400 for a non-streamed HTTP/1.0 request whose client shut its sending side before the answer: TCP cannot
    tell that from a client gone, whose decoding must stop at once, before something is written to it, and an
    HTTP/1.0 client may be sent nothing but its answer (`http_deadlines`: HTTP/1.1 ones are probed); an answer
    whose choices all finished anyway is sent."""
    if half_closed(http.scope) and not (ends and all(ended_by_itself(done) for done in ends)):
        raise ApiError(400, "the client shut its sending side (half-close) before the answer: decoding stopped, as "
                       "for a client gone; keep the connection open until the answer arrives, or use HTTP/1.1",
                       code="client_half_closed")


def _no_route(path: str) -> str:
    return f"no route {path!r:.100}: see /v1/models, /v1/chat/completions, /v1/completions"
