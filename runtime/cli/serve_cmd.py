"""`medusa-export serve`: the OpenAI-compatible server (or a Ray Serve deployment with --ray)."""

from __future__ import annotations

import os
from typing import Optional

import typer

from .app import app, cli_errors


@app.command()
@cli_errors
def serve(
    artifact: str = typer.Argument(..., metavar="ARTIFACT", help="Artifact directory (medusa-export build --out DIR)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (0.0.0.0 to serve other machines)."),
    port: int = typer.Option(8000, min=0, max=65535, help="Port to listen on (0: a free one, named in the start "
                                                           "line)."),
    backend: str = typer.Option("ort", help="ort | trt"),
    max_num_seqs: Optional[int] = typer.Option(None, min=1, help="Requests decoded together, one step for all "
                                               "(default: the artifact's lanes, set by `build --max-num-seqs`; 1 "
                                               "without them)."),
    max_num_batched_tokens: int = typer.Option(64, min=1, help="Rows one step takes: a token per decoding "
                                               "request plus prompt chunks (a long prompt delays others by one chunk)."),
    max_queue: int = typer.Option(8, min=0, help="Requests that may wait for a place; more get HTTP 429."),
    api_key: Optional[str] = typer.Option(None, envvar="MEDUSA_EXPORT_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' on /v1 routes."),
    allowed_hosts: Optional[str] = typer.Option(None, help="Host names the server answers besides loopback ones, "
                                                "comma-separated (.example.com: every name under it; *: any). "
                                                "Default: loopback names only when --host is a loopback address, "
                                                "any name otherwise (guards against DNS rebinding)."),
    threads: Optional[int] = typer.Option(None, min=1, help="ONNX Runtime threads (default: all cores)."),
    tree: Optional[str] = typer.Option(None, help="Tree to use instead of the artifact's (must fit its graph)."),
    request_timeout: float = typer.Option(300.0, min=0.1, help="Seconds for a request's body to arrive (then "
                                          "HTTP 408), and again for the request from its admission, queueing "
                                          "included (then 504)."),
    header_timeout: float = typer.Option(30.0, min=0.1, help="Seconds a connection may take to send a request's "
                                         "line and headers, or stall reading its answer; then it is closed (slow "
                                         "or stalled clients)."),
    max_body_bytes: int = typer.Option(1 << 20, min=1024, help="Largest request body accepted."),
    shutdown_timeout: float = typer.Option(30.0, min=0.0, help="Seconds in-flight requests get to finish after "
                                           "SIGTERM / SIGINT; then they end with HTTP 503 (an error event when "
                                           "streamed) and serve exits 1."),
    served_model_name: Optional[str] = typer.Option(None, help="Model id clients use (default: the artifact's)."),
    no_context_drafts: bool = typer.Option(False, "--no-context-drafts", help="Greedy requests speculate with the "
                                           "heads' tree only (by default they also verify continuations found in "
                                           "their context)."),
    no_prefix_caching: bool = typer.Option(False, "--no-prefix-caching", help="Prefill every prompt whole (by "
                                           "default a request starts from the KV rows a finished request left for "
                                           "the prompt tokens they share: a chat's earlier turns, a system prompt)."),
    log_requests: bool = typer.Option(False, "--log-requests", help="A line per finished answer on stderr: its id, "
                                      "finish reason, token counts, queue time, time to first token, duration and "
                                      "accepted drafts (never its text)."),
    ray: bool = typer.Option(False, "--ray", help="Run as a Ray Serve deployment (pip install 'medusa-export[ray]')."),
    replicas: int = typer.Option(1, min=1, help="Ray Serve replicas (with --ray)."),
) -> None:
    """Serve an artifact over the OpenAI API (chat/completions, completions, models) with Prometheus metrics."""
    from ..errors import InputError
    from ..serve.app import ServeSettings
    from ..serve.host_check import parse_allowed_hosts
    from .checks import at_least, check_threads

    if backend not in ("ort", "trt"):
        raise InputError(f"unknown backend {backend!r}: choose ort or trt")
    check_threads(threads)
    if api_key is None and "MEDUSA_EXPORT_API_KEY" in os.environ:
        # click reads an empty variable as unset: the server would start without authentication, silently
        api_key = os.environ["MEDUSA_EXPORT_API_KEY"]
    if served_model_name is not None and not served_model_name.strip():  # was silently the artifact's name
        raise InputError("--served-model-name is empty: give the model id clients send, or leave it out for the "
                         "artifact's")
    if not host.strip():  # an empty address means every interface to the socket layer: never by accident
        raise InputError("--host is empty: give an address (127.0.0.1: this machine only; 0.0.0.0: every interface)")
    settings = ServeSettings(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                             max_queue=max_queue, timeout_s=request_timeout, header_timeout_s=header_timeout,
                             api_key=api_key, max_body_bytes=max_body_bytes, model_name=served_model_name,
                             context_drafts=not no_context_drafts, prefix_caching=not no_prefix_caching,
                             allowed_hosts=None if allowed_hosts is None else parse_allowed_hosts(allowed_hosts),
                             log_requests=log_requests)
    if log_requests:
        from ..serve.request_log import print_to_stderr

        print_to_stderr()
    if ray:
        from ..serve.ray_app import run_ray

        run_ray(artifact, host=host, port=port, backend=backend, settings=settings, replicas=replicas,
                threads=threads, tree=tree, log=lambda m: typer.echo(m, err=True))
        return
    from ..serve.server import run_server

    clean = run_server(artifact, host=host, port=port, backend=backend, settings=settings, threads=threads, tree=tree,
                       shutdown_deadline_s=shutdown_timeout, log=lambda m: typer.echo(m, err=True))
    if not clean:
        typer.echo("error: requests were still running when the shutdown deadline passed", err=True)
        raise typer.Exit(1)
