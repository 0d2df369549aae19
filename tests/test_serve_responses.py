"""What the server's response builders (`runtime/serve/responses.py`) write, without a server: when a stream's first
chunk goes out, the OpenAI bodies of errors raised after parsing, usage's cached prompt tokens."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")

from medusa_export.runtime.decode import GenerationConfig  # noqa: E402
from medusa_export.runtime.generator import GenerationResult  # noqa: E402
from medusa_export.runtime.serve.requests import ApiError, Job  # noqa: E402
from medusa_export.runtime.serve.responses import result_or_error, usage  # noqa: E402
from medusa_export.runtime.serve.scheduler import Finished  # noqa: E402

ERROR_KEYS = {"message", "type", "param", "code"}


def test_the_role_chunk_is_not_sent_before_the_request_decodes():
    """vLLM sends a chat stream's role chunk with the first token; load generators (`vllm bench serve`) take the
    first chunk with choices for the first token. It was sent at once, while the request was still queued."""
    import asyncio

    from medusa_export.runtime.serve.responses import sse_events
    from medusa_export.runtime.text_output import StreamEvent

    job = Job([1, 2], GenerationConfig(), True, False, True)

    class Queued:  # a request whose first token comes only once `first` is set
        def __init__(self) -> None:
            self.first, self.job = asyncio.Event(), job

        async def events(self):
            await self.first.wait()
            yield StreamEvent("Hi", [7])

    async def run() -> tuple[bool, str]:
        admitted = Queued()
        stream = sse_events("chatcmpl-1", [job], "tiny", [admitted])
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.2)  # queued: nothing may be sent yet
        early = first.done()
        admitted.first.set()
        text = await asyncio.wait_for(first, 10)
        await stream.aclose()
        return early, text

    early, text = asyncio.run(run())
    assert not early, "the role chunk was sent before the request's first token"
    assert '"role": "assistant"' in text


def test_errors_raised_after_parsing_have_openai_bodies():
    """504 (timeout), 503 (shutdown), 500 (a failed step): the same four keys, whatever ended the request."""
    for done, status in ((None, 504), (Finished(None, None, "shutdown"), 503),
                         (Finished(None, RuntimeError("x"), None), 500)):
        with pytest.raises(ApiError) as e:
            result_or_error(done, 1.0)
        assert e.value.status == status and set(e.value.body()["error"]) == ERROR_KEYS
        assert e.value.body()["error"]["type"] == "server_error"


def test_usage_counts_each_prompts_cached_tokens_once_whatever_order_its_choices_end_in():
    """Two prompts, the first with two choices (copies of its job): the fewest any of a prompt's choices reused (the
    others copy the rows of the one that prefilled it, which this request computed)."""
    jobs = [Job([1, 2, 3, 4, 5, 6], GenerationConfig(max_new_tokens=4), stream=False, include_usage=False, chat=False,
                n=2), Job([1, 2, 3, 9, 9], GenerationConfig(max_new_tokens=4), stream=False, include_usage=False,
                          chat=False)]
    results = [GenerationResult(text="", token_ids=[7], new_tokens=1, steps=0, mean_accepted=0.0, tokens_per_s=0.0,
                                finish_reason="length", backend="ort", medusa=False, cached_tokens=c) for c in (3, 5, 0)]
    got = usage(jobs, results, [2, 0, 1])  # the second prompt's choice ended first
    assert got["prompt_tokens_details"] == {"cached_tokens": 3 + 0} and got["prompt_tokens"] == 11
    assert usage(jobs, results, [0, 1, 2])["prompt_tokens_details"] == {"cached_tokens": 3 + 0}
    assert usage(jobs, results[:2], [0, 2])["prompt_tokens_details"] == {"cached_tokens": 3 + 5}
