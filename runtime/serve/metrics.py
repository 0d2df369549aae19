"""Prometheus metrics under the names vLLM users already chart (prefix ``medusa_export:`` where vLLM has
``vllm:``), plus Medusa's own: tokens per verification step and decode steps.

    m = ServerMetrics(model_name)
    m.finished(record)                   # one request's statistics
    body, content_type = m.render()      # GET /metrics
"""

from __future__ import annotations

from dataclasses import dataclass, field

P = "medusa_export:"
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


@dataclass
class RequestRecord:
    """What one finished (or cancelled) request contributes."""

    prompt_tokens: int
    generation_tokens: int
    queue_s: float
    ttft_s: float | None
    e2e_s: float
    token_gaps_s: list[float] = field(default_factory=list)  # per output token after the first
    step_accepted: list[int] = field(default_factory=list)  # draft tokens accepted per Medusa step
    draft_depth: int = 0  # draft positions each step proposed
    finish_reason: str = "stop"
    cached_tokens: int = 0  # prompt tokens an earlier request's KV rows held (`prefix_reuse.py`)


def accepted_per_position(step_accepted: list[int], depth: int) -> list[int]:
    """Steps whose draft at position k (0-based) was accepted: a step that accepted n drafts counts at 0..n-1."""
    return [sum(a > k for a in step_accepted) for k in range(depth)]


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        lab = ["model_name"]
        self.labels = {"model_name": model_name}
        self.ttft = Histogram(P + "time_to_first_token_seconds", "Time to first token.", lab, registry=r,
                              buckets=_LATENCY_BUCKETS)
        self.itl = Histogram(P + "inter_token_latency_seconds", "Time per output token after the first "
                             "(a step's time shared by the tokens it produced).", lab, registry=r,
                             buckets=_LATENCY_BUCKETS)
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "End-to-end request latency.", lab, registry=r,
                             buckets=_LATENCY_BUCKETS)
        self.queue = Histogram(P + "request_queue_time_seconds", "Time waiting for a decode worker.", lab,
                               registry=r, buckets=_LATENCY_BUCKETS)
        self.running = Gauge(P + "num_requests_running", "Requests on a decode worker.", lab, registry=r)
        self.waiting = Gauge(P + "num_requests_waiting", "Requests waiting for a decode worker.", lab, registry=r)
        self.drafts = Counter(P + "spec_decode_num_drafts", "Medusa verification steps.", lab, registry=r)
        self.draft_tokens = Counter(P + "spec_decode_num_draft_tokens", "Draft positions proposed "
                                    "(steps x tree depth).", lab, registry=r)
        self.accepted = Counter(P + "spec_decode_num_accepted_tokens", "Draft tokens accepted.", lab, registry=r)
        self.accepted_pos = Counter(P + "spec_decode_num_accepted_tokens_per_pos", "Draft tokens accepted at each "
                                    "draft position.", lab + ["position"], registry=r)
        self.generation = Counter(P + "generation_tokens", "Generated tokens.", lab, registry=r)
        self.prompt = Counter(P + "prompt_tokens", "Prompt tokens.", lab, registry=r)
        self.prefix_queries = Counter(P + "prefix_cache_queries", "Prompt tokens looked up in the KV slots' rows "
                                      "(every finished request's prompt).", lab, registry=r)
        self.prefix_hits = Counter(P + "prefix_cache_hits", "Prompt tokens whose KV rows an earlier request left, "
                                   "so not prefilled.", lab, registry=r)
        self.success = Counter(P + "request_success", "Finished requests by finish reason.",
                               lab + ["finished_reason"], registry=r)
        self.rejected = Counter(P + "request_rejected", "Requests refused before decoding (queue full, "
                                "shutting down).", lab + ["reason"], registry=r)
        self.tokens_per_step = Histogram(P + "tokens_per_step", "Tokens one verification step produced "
                                         "(accepted drafts + the model's own token).", lab, registry=r,
                                         buckets=tuple(range(1, 11)))
        self.steps = Counter(P + "decode_steps", "Engine steps run (one forward of every running request).", lab,
                             registry=r)
        self.batch = Histogram(P + "step_batch_size", "Requests one engine step decoded together.", lab, registry=r,
                               buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64))
        self.speculative = Counter(P + "speculative_steps", "Engine steps that verified drafts (the heads' tree or "
                                   "context and corpus drafts), batched steps included.", lab, registry=r)

    def step(self, batch: int = 1, speculative: bool = False) -> None:
        lab = self.labels
        self.steps.labels(**lab).inc()
        self.batch.labels(**lab).observe(batch)
        if speculative:
            self.speculative.labels(**lab).inc()

    def finished(self, rec: RequestRecord) -> None:
        lab = self.labels
        self.prompt.labels(**lab).inc(rec.prompt_tokens)
        self.prefix_queries.labels(**lab).inc(rec.prompt_tokens)
        self.prefix_hits.labels(**lab).inc(rec.cached_tokens)
        self.generation.labels(**lab).inc(rec.generation_tokens)
        self.queue.labels(**lab).observe(rec.queue_s)
        self.e2e.labels(**lab).observe(rec.e2e_s)
        if rec.ttft_s is not None:
            self.ttft.labels(**lab).observe(rec.ttft_s)
        for gap in rec.token_gaps_s:
            self.itl.labels(**lab).observe(gap)
        self.success.labels(**lab, finished_reason=rec.finish_reason).inc()
        if rec.draft_depth:
            steps = len(rec.step_accepted)
            self.drafts.labels(**lab).inc(steps)
            self.draft_tokens.labels(**lab).inc(steps * rec.draft_depth)
            self.accepted.labels(**lab).inc(sum(rec.step_accepted))
            for k, n in enumerate(accepted_per_position(rec.step_accepted, rec.draft_depth)):
                self.accepted_pos.labels(**lab, position=str(k)).inc(n)
            for a in rec.step_accepted:
                self.tokens_per_step.labels(**lab).observe(a + 1)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
