"""OpenAI response bodies and server-sent events from a request's finished or running sequences.

A request asks for ``n`` choices of each of its prompts (one, or a completions batch); each choice is a sequence of
its own in the batched engine (`choice_jobs`), and the choices are numbered prompt by prompt. A whole answer gathers
them into one body (`gather`, `response_body`); a stream merges their events, each chunk under its choice's ``index``
(`sse_events`). ``usage`` counts each prompt once and every choice's tokens; the speculative metrics add up every
choice's steps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import AsyncIterator

from ..generator import GenerationResult
from ..text_output import StreamEvent
from .logprobs_json import AnswerLogprobs, TokenPieces
from .metrics import accepted_per_position
from .requests import ApiError, Job
from .scheduler import Finished, Request as Admitted, cancel_all

NATURAL_FINISHES = ("stop", "length")  # an answer that ended by itself, not stopped from outside


def choice_jobs(job: Job) -> list[Job]:
    """One job per choice, the same prompt and parameters. A seeded request's choice i draws from ``seed + i``: its
    choices differ, and each is reproducible. Greedy choices are all the same answer, as in vLLM."""
    if job.n == 1:
        return [job]
    seed = job.config.seed
    return [dataclasses.replace(job, n=1, config=dataclasses.replace(
        job.config, seed=None if seed is None else (seed + i) % 2 ** 64)) for i in range(job.n)]


def ended_by_itself(done: Finished | None) -> bool:
    """Whether the answer finished by itself (stop, length), whatever asked it to stop meanwhile."""
    return done is not None and done.result is not None and done.result.finish_reason in NATURAL_FINISHES


def result_or_error(done: Finished | None, timeout_s: float) -> GenerationResult:
    if ended_by_itself(done):
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


async def gather(admitted: list[Admitted]) -> list[tuple[str, Finished | None]]:
    """Each choice's text and end. One that ends otherwise than by itself (an error, a timeout) stops the others:
    the request fails as a whole."""
    async def one(request: Admitted) -> tuple[str, Finished | None]:
        texts, done = [], None
        async for item in request.events():
            if isinstance(item, Finished):
                done = item
            else:
                texts.append(item.text)
        if not ended_by_itself(done):
            cancel_all(admitted, done.reason if done is not None and done.reason else "abort")
        return "".join(texts), done

    return list(await asyncio.gather(*(one(r) for r in admitted)))


async def merged(admitted: list[Admitted]) -> AsyncIterator[tuple[int, StreamEvent | Finished]]:
    """The choices' events as they come, each with its choice's index, until every choice has finished."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, request: Admitted) -> None:
        async for item in request.events():
            queue.put_nowait((index, item))

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(admitted)]
    try:
        left = len(admitted)
        while left:
            index, item = await queue.get()
            left -= isinstance(item, Finished)
            yield index, item
    finally:
        for task in tasks:
            task.cancel()


# Characters JSON leaves unescaped that many clients take for line breaks (Python's str.splitlines, which
# `requests.iter_lines(decode_unicode=True)` uses): raw in an event, they cut its data line in two and its JSON
# no longer parses. A model writes them when its prompt asks it to.
_LINE_BREAKS = str.maketrans({"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse_data(obj: dict) -> str:
    """One server-sent event: the JSON on one line, whatever line breaks a client recognises."""
    return f"data: {json.dumps(obj, ensure_ascii=False).translate(_LINE_BREAKS)}\n\n"


async def sse_events(rid: str, jobs: list[Job], name: str, admitted: list[Admitted],
                     pieces: TokenPieces | None = None) -> AsyncIterator[str]:  # pieces: for logprobs
    """``jobs``: the request's prompts; ``admitted``: their choices in order. The request's parameters (chat or not,
    logprobs, usage) are its prompts' alike."""
    job, created = jobs[0], int(time.time())
    kind = "chat.completion.chunk" if job.chat else "text_completion"
    answers = [AnswerLogprobs(pieces, job.chat) if job.config.logprobs is not None else None for _ in admitted]
    # Per choice: logprobs of tokens whose text is held back (they go with its next chunk that has text, or its last)
    pending: list[list] = [[] for _ in admitted]
    role_sent = [not job.chat] * len(admitted)
    echo_due = [request.job.echo is not None for request in admitted]  # the prompt goes first (as vLLM's stream)
    results: list[GenerationResult] = []
    owners: list[int] = []  # each result's choice (its index in ``admitted``)

    def chunk(index: int, text: str | None, finish: str | None, role: bool = False) -> str:
        answer, held = answers[index], pending[index]
        logprobs = answer.render(held) if answer and held and not role else None
        if logprobs is not None:
            held.clear()
        if job.chat:
            delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": logprobs}
        return event(choice)

    def echo(index: int, prompt_logprobs: list | None) -> str:
        """A choice's echoed prompt: its text and, with logprobs, its tokens' (the first with none)."""
        echo_due[index] = False
        choice_job, answer = admitted[index].job, answers[index]
        scores = answer.render_echo(choice_job.prompt_ids, prompt_logprobs, []) if answer and prompt_logprobs else None
        return event({"index": index, "text": choice_job.echo, "finish_reason": None, "logprobs": scores})

    def event(choice: dict) -> str:
        # With include_usage every chunk carries "usage", null until the last one's (as OpenAI's stream does)
        usage = {"usage": None} if job.include_usage else {}
        return sse_data({"id": rid, "object": kind, "created": created, "model": name, "choices": [choice]} | usage)

    # The role chunk goes with the first event from the engine, as vLLM's does, not at once: load generators (vLLM's
    # `bench serve`) take the first chunk with choices for the first token, so one sent while the request was still
    # queued or prefilling made their time to first token near zero.
    async for index, item in merged(admitted):
        if not isinstance(item, Finished):
            if not role_sent[index]:
                role_sent[index] = True
                yield chunk(index, "", None, role=True)
            if echo_due[index]:
                yield echo(index, item.prompt_logprobs)
            if not job.answer:  # echo with max_tokens 0: the prompt alone
                continue
            pending[index].extend(item.logprobs or [])
            if item.text:
                yield chunk(index, item.text, None)
            continue
        try:
            result = result_or_error(item, 0)
        except ApiError as e:  # an error event alone when no token came, as vLLM's
            yield sse_data(ApiError(e.status, "the request timed out" if e.status == 504 else e.message,
                                    type_="server_error").body())
            break
        if not role_sent[index]:  # an answer that ended before its first token's event (an end of sequence at once)
            role_sent[index] = True
            yield chunk(index, "", None, role=True)
        if echo_due[index]:
            yield echo(index, result.prompt_logprobs)
        pending[index] += eos_entry(job, result) if job.answer else []
        results.append(result)
        owners.append(index)
        yield chunk(index, None if job.chat else "", result.finish_reason if job.answer else "length")
    else:
        if job.include_usage:
            yield sse_data({"id": rid, "object": kind, "created": created, "model": name, "choices": [],
                            "usage": usage(jobs, results, owners), "metrics": speculation_metrics(results)})
    yield "data: [DONE]\n\n"


def response_body(rid: str, jobs: list[Job], name: str, admitted: list[Admitted],
                  answers: list[tuple[str, GenerationResult]], pieces: TokenPieces) -> dict:
    """The whole answer: one choice per admitted request and its (text, result), in order."""
    choices = [_choice(i, request.job, text, result, pieces)
               for i, (request, (text, result)) in enumerate(zip(admitted, answers))]
    results = [result for _, result in answers]
    return {"id": rid, "object": "chat.completion" if jobs[0].chat else "text_completion",
            "created": int(time.time()), "model": name, "choices": choices,
            "usage": usage(jobs, results, list(range(len(admitted)))),
            "metrics": speculation_metrics(results)}


def _choice(index: int, job: Job, text: str, result: GenerationResult, pieces: TokenPieces) -> dict:
    if job.echo is not None:  # the prompt before the answer, in the text and (with logprobs) the log-probabilities
        text = job.echo + text if job.answer else job.echo
    entries = [*result.logprobs, *eos_entry(job, result)] if result.logprobs is not None and job.answer else []
    if result.logprobs is None:
        logprobs = None
    elif job.echo is not None:  # echo with logprobs scored the prompt (`parse_completion`)
        logprobs = AnswerLogprobs(pieces, False).render_echo(job.prompt_ids, result.prompt_logprobs, entries)
    else:
        logprobs = AnswerLogprobs(pieces, job.chat).render(entries)
    finish = result.finish_reason if job.answer else "length"  # max_tokens 0: the budget ended it
    if job.chat:
        return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                "logprobs": logprobs}
    return {"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}


def eos_entry(job: Job, result: GenerationResult) -> list:
    """The completions endpoint lists the end-of-sequence token that ended an answer (OpenAI's legacy completions
    did; lm-eval reads it to score a continuation where the model would stop, which with echo is the token after
    an echoed prompt, which with max_tokens 1 is that token where the model would stop there. Chat: none."""
    return [result.eos_logprob] if result.eos_logprob is not None and not job.chat else []


def usage(jobs: list[Job], results: list[GenerationResult], choices: list[int]) -> dict:
    """Each prompt once, every choice's answer (``choices``: each result's index among the request's choices, which
    are each prompt's ``n`` in turn, as `choice_jobs` makes them: copies of the prompt's job when n > 1)."""
    prompt = sum(len(job.prompt_ids) for job in jobs)
    answer = sum(result.new_tokens for result in results) if jobs[0].answer else 0
    # OpenAI's field (and vLLM's): prompt tokens whose KV rows an earlier request left, so not computed again. A
    # prompt counts once, as in prompt_tokens: what the choice that prefilled it found, the fewest of its choices
    # (the others copy its rows once they hold the prompt: `prefix_reuse.running_donor`; those are this request's).
    prompt_of = [p for p, job in enumerate(jobs) for _ in range(job.n)]
    cached = sum(min((r.cached_tokens for r, c in zip(results, choices) if prompt_of[c] == p), default=0)
                 for p in range(len(jobs)))
    return {"prompt_tokens": prompt, "completion_tokens": answer, "total_tokens": prompt + answer,
            "prompt_tokens_details": {"cached_tokens": cached}}


def speculation_metrics(results: list[GenerationResult]) -> dict:
    """Acceptance, what users of speculative decoding ask for first: every choice's steps together."""
    accepted = [a for r in results for a in r.step_accepted]
    depth = max((r.draft_depth for r in results), default=0)
    steps = sum(r.steps for r in results)
    return {"speculative_decoding": {
        "medusa": any(r.heads_steps > 0 for r in results),  # the heads' tree verified, not merely chosen (docs)
        "steps": steps,
        # as `GenerationResult.mean_accepted` computes it for one answer (`DecodeStats.mean_accepted`, rounded)
        "mean_accepted_tokens_per_step": round(sum(r.step_tokens for r in results) / steps, 4) if steps else 0.0,
        "draft_tokens": sum(len(r.step_accepted) * r.draft_depth for r in results),
        "accepted_tokens": sum(accepted),  # 0 per step without Medusa
        "accepted_from_heads": sum(r.accepted_heads for r in results),  # by source: "medusa" is false where only
        "accepted_from_drafts": sum(r.accepted_context for r in results),  # drafts (context, corpus) were verified
        "accepted_tokens_per_position": accepted_per_position(accepted, depth),
    }}
