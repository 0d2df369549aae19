"""One log line per finished answer (`serve --log-requests`): what an operator greps for a slow or cut-short request.

    request chatcmpl-9f… choice=0 finish=stop prompt_tokens=41 cached_tokens=0 completion_tokens=64 queue_s=0.000
    ttft_s=0.052 e2e_s=0.981 spec_steps=40 accepted_drafts=23

Only numbers, names the server chose and the id it returned (``id`` in the answer's body): never request text, so a
line cannot carry a prompt's content or forge another line. The logger is ``medusa_export.requests`` at INFO;
`serve` prints it on stderr, a library host routes it as it routes its other logs.
"""

from __future__ import annotations

import logging
import sys

from .metrics import RequestRecord

LOGGER = logging.getLogger("medusa_export.requests")


def request_line(request_id: str, choice: int, rec: RequestRecord) -> str:
    """The line for one finished (or cancelled) choice of a request."""
    ttft = "-" if rec.ttft_s is None else f"{rec.ttft_s:.3f}"
    return (f"request {request_id or '-'} choice={choice} finish={rec.finish_reason} prompt_tokens={rec.prompt_tokens} "
            f"cached_tokens={rec.cached_tokens} completion_tokens={rec.generation_tokens} queue_s={rec.queue_s:.3f} "
            f"ttft_s={ttft} e2e_s={rec.e2e_s:.3f} spec_steps={len(rec.step_accepted)} "
            f"accepted_drafts={sum(rec.step_accepted)}")


def log_finished(request_id: str, choice: int, rec: RequestRecord) -> None:
    LOGGER.info(request_line(request_id, choice, rec))


def print_to_stderr() -> None:
    """Send the request lines to stderr, as `serve --log-requests` does (once per process)."""
    if not any(getattr(h, "medusa_export_requests", False) for h in LOGGER.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.medusa_export_requests = True
        handler.setFormatter(logging.Formatter("%(message)s"))
        LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False  # the line once, not again through a root handler a host set up
