"""Runners for `compare_peers.py`: each decodes the same token ids greedily, ``concurrency`` requests in flight
(closed loop: a request is submitted when one ends), and records when each request was submitted and when each of
its tokens reached the caller. Every tool is optional: its import happens inside its runner.

* ours: the artifact's batched engine (``runtime.engine``) or, alone, one stream at a time;
* OpenVINO GenAI: ``LLMPipeline`` alone (plain, or with its prompt-lookup speculation), ``ContinuousBatchingPipeline``
  for concurrency > 1;
* onnxruntime-genai: its ``Generator`` alone (plain, or with its n-gram speculation) or a static batch of
  ``concurrency`` prompts (padded on the right), which is what its Python API offers for several prompts at once;
* CTranslate2: ``Generator.generate_batch`` on batches of ``concurrency`` prompts;
* llama.cpp (llama-cpp-python): one stream at a time.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np


@dataclass
class Run:
    """One request as its caller saw it."""
    submitted: float
    ids: list[int] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # when each delivery of tokens arrived (one per step)
    done: float = 0.0

    def deliver(self, tokens: list[int], eos: set[int], max_new: int) -> bool:
        """Record tokens that arrived together; True once the request is complete (EOS or the budget)."""
        if self.done:  # ended before: a tool that goes on past one of our EOS ids gets nothing more counted
            return True
        now, before, ended = time.perf_counter(), len(self.ids), False
        for t in tokens:
            if t in eos or len(self.ids) >= max_new:
                ended = True
                break
            self.ids.append(int(t))
        if len(self.ids) > before:
            self.arrivals.append(now)
        if ended or len(self.ids) >= max_new:
            self.done = now
            return True
        return False


def closed_loop(n: int, concurrency: int, submit: Callable[[int], None], step: Callable[[], list[int]]) -> None:
    """Keep ``concurrency`` of requests 0..n-1 in flight: ``submit(i)`` starts one, ``step()`` advances the tool and
    returns the indices of the requests that ended."""
    nxt = min(concurrency, n)
    for i in range(nxt):
        submit(i)
    finished = 0
    while finished < n:
        ended = step()
        finished += len(ended)
        for _ in ended:
            if nxt < n:
                submit(nxt)
                nxt += 1


# ------------------------------------------------------------------------------------------------ ours


def run_ours(rt, prompts: list[list[int]], max_new: int, concurrency: int, medusa: bool) -> list[Run]:
    """The artifact's runtime: one stream at a time, or its batched engine with ``concurrency`` sequences."""
    from medusa_export.runtime.decode import GenerationConfig
    from medusa_export.runtime.engine import Engine
    from medusa_export.runtime.text_output import StreamEvent

    eos = set(rt.generator.tokenizer.eos_token_ids)
    if concurrency == 1:
        runs = []
        for ids in prompts:
            run = Run(time.perf_counter())
            for event in rt.stream(ids, max_new_tokens=max_new, medusa=medusa):
                if run.deliver(event.token_ids, eos, max_new):
                    break
            run.done = run.done or time.perf_counter()
            runs.append(run)
        return runs
    engine = Engine(rt.generator, concurrency)
    cfg = GenerationConfig(max_new_tokens=max_new, temperature=0.0, medusa=medusa)
    runs: list[Run | None] = [None] * len(prompts)
    ended: list[int] = []

    def sink(i: int, item) -> None:
        if isinstance(item, StreamEvent):
            runs[i].deliver(item.token_ids, eos, max_new)
        elif isinstance(item, Exception):
            raise item
        else:
            runs[i].done = runs[i].done or time.perf_counter()
            ended.append(i)

    def submit(i: int) -> None:
        runs[i] = Run(time.perf_counter())
        engine.add(prompts[i], cfg, lambda item, i=i: sink(i, item))

    def step() -> list[int]:
        if not engine.step() and not ended:
            raise RuntimeError("the engine went idle with requests unfinished")
        out = list(ended)
        ended.clear()
        return out

    try:
        closed_loop(len(prompts), concurrency, submit, step)
    finally:
        engine.close()
    return runs


# -------------------------------------------------------------------------------------- OpenVINO GenAI


def openvino_properties(threads: int, exact: bool) -> dict:
    """``exact``: fp32 activations and KV cache (on CPUs with bf16 OpenVINO computes in bf16 by default and keeps
    the KV cache in u8)."""
    props = {"INFERENCE_NUM_THREADS": threads}
    if exact:
        props.update(INFERENCE_PRECISION_HINT="f32", KV_CACHE_PRECISION="f32")
    return props


def run_openvino(model_dir: Path, prompts: list[list[int]], max_new: int, concurrency: int, eos: set[int],
                 threads: int, exact: bool, prompt_lookup: bool = False) -> list[Run]:
    import openvino as ov
    import openvino_genai as ov_genai

    props = openvino_properties(threads, exact)
    cfg = ov_genai.GenerationConfig()
    cfg.max_new_tokens, cfg.do_sample = max_new, False
    cfg.eos_token_id, cfg.stop_token_ids = min(eos), set(eos)
    if prompt_lookup:  # OpenVINO's defaults in its sample: 3-gram match, 5 tokens proposed
        cfg.num_assistant_tokens, cfg.max_ngram_size = 5, 3
    if concurrency == 1:
        pipe = ov_genai.LLMPipeline(str(model_dir), "CPU", prompt_lookup=True, **props) if prompt_lookup else \
            ov_genai.LLMPipeline(str(model_dir), "CPU", **props)
        pipe.generate(_ov_inputs(ov, ov_genai, prompts[0]), _ov_warm_config(ov_genai, cfg))  # warm-up, as ours gets
        runs = []
        for ids in prompts:
            run = Run(time.perf_counter())
            pipe.generate(_ov_inputs(ov, ov_genai, ids), cfg, _ov_streamer(ov_genai, run, eos, max_new))
            run.done = run.done or time.perf_counter()
            runs.append(run)
        return runs
    sched = ov_genai.SchedulerConfig()
    sched.max_num_seqs, sched.cache_size = concurrency, 1  # GB of KV cache: ample for 8 x 2k tokens
    pipe = ov_genai.ContinuousBatchingPipeline(str(model_dir), sched, "CPU", props)
    pipe.add_request(len(prompts), ov.Tensor(np.asarray([prompts[0]], np.int64)), _ov_warm_config(ov_genai, cfg))
    while pipe.has_non_finished_requests():  # warm-up
        pipe.step()
    runs: list[Run | None] = [None] * len(prompts)
    handles: dict[int, object] = {}

    def submit(i: int) -> None:
        runs[i] = Run(time.perf_counter())
        handles[i] = pipe.add_request(i, ov.Tensor(np.asarray([prompts[i]], np.int64)), cfg)

    def step() -> list[int]:
        pipe.step()
        ended = []
        for i, h in list(handles.items()):
            if h.can_read():
                for out in h.read().values():
                    runs[i].deliver(list(out.generated_ids), eos, max_new)
            if h.get_status() != ov_genai.GenerationStatus.RUNNING and not h.can_read():
                runs[i].done = runs[i].done or time.perf_counter()
                ended.append(i)
                del handles[i]
        return ended

    closed_loop(len(prompts), concurrency, submit, step)
    return runs


def _ov_inputs(ov, ov_genai, ids: list[int]):
    return ov_genai.TokenizedInputs(ov.Tensor(np.asarray([ids], np.int64)), ov.Tensor(np.ones((1, len(ids)), np.int64)))


def _ov_warm_config(ov_genai, cfg):
    warm = ov_genai.GenerationConfig()
    warm.max_new_tokens, warm.do_sample = 4, False
    if cfg.num_assistant_tokens:
        warm.num_assistant_tokens, warm.max_ngram_size = cfg.num_assistant_tokens, cfg.max_ngram_size
    return warm


def _ov_streamer(ov_genai, run: Run, eos: set[int], max_new: int):
    class Recorder(ov_genai.StreamerBase):
        def write(self, token):
            done = run.deliver([token] if isinstance(token, int) else list(token), eos, max_new)
            return ov_genai.StreamingStatus.STOP if done else ov_genai.StreamingStatus.RUNNING

        def end(self):
            pass

    return Recorder()


# ----------------------------------------------------------------------------------- onnxruntime-genai


def run_genai(model_dir: Path, prompts: list[list[int]], max_new: int, concurrency: int, eos: set[int],
              threads: int, pad_id: int, ngram: bool = False) -> list[Run]:
    """Static batches of ``concurrency`` prompts, padded on the right with ``pad_id`` as onnxruntime-genai's own
    batch encoding does (left padding garbles its answers), ``pad_id`` a token the prompts do not hold: it masks
    every position that holds the pad token. ``ngram``: its n-gram speculation (3-gram match, 5 drafts), one
    stream at a time."""
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    config.overlay(json.dumps({"model": {"pad_token_id": pad_id,
                                         "decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    warm = og.GeneratorParams(model)
    warm.set_search_options(do_sample=False, max_length=len(prompts[0]) + 4, batch_size=1)
    gen = og.Generator(model, warm)
    gen.append_tokens(np.asarray([prompts[0]], np.int32))
    while not gen.is_done():  # warm-up
        gen.generate_next_token()
    runs = []
    for start in range(0, len(prompts), concurrency):
        batch = prompts[start:start + concurrency]
        width = max(map(len, batch))
        padded = np.full((len(batch), width), pad_id, np.int32)
        for row, ids in enumerate(batch):
            padded[row, :len(ids)] = ids
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=width + max_new, batch_size=len(batch))
        if ngram:
            params.set_speculative_options(ngram_size=3, max_draft_tokens=5)
        t0 = time.perf_counter()
        batch_runs = [Run(t0) for _ in batch]
        gen = og.Generator(model, params)
        gen.append_tokens(padded)
        seen = [width] * len(batch)  # a speculative step may add several tokens: read what each sequence gained
        live = set(range(len(batch)))
        while live and not gen.is_done():
            gen.generate_next_token()
            for row in list(live):
                seq = gen.get_sequence(row)
                new, seen[row] = [int(t) for t in seq[seen[row]:]], len(seq)
                if batch_runs[row].deliver(new, eos, max_new):
                    live.discard(row)
        now = time.perf_counter()
        for run in batch_runs:
            run.done = run.done or now
        runs += batch_runs
    return runs


# ------------------------------------------------------------------------------------------------ CTranslate2


def run_ctranslate2(model_dir: Path, prompts: list[list[int]], max_new: int, concurrency: int, eos: set[int],
                    threads: int, id_to_token: Callable[[int], str]) -> list[Run]:
    """Batches of ``concurrency`` prompts through ``generate_batch`` (greedy), tokens recorded as its per-token
    callback reports them. CTranslate2 takes prompts as token strings."""
    import ctranslate2

    gen = ctranslate2.Generator(str(model_dir), device="cpu", intra_threads=threads)
    gen.generate_batch([[id_to_token(i) for i in prompts[0]]], max_length=4, sampling_topk=1)  # warm-up
    runs = []
    for start in range(0, len(prompts), concurrency):
        batch = prompts[start:start + concurrency]
        t0 = time.perf_counter()
        batch_runs = [Run(t0) for _ in batch]

        def on_token(step, batch_runs=batch_runs) -> bool:
            batch_runs[step.batch_id].deliver([step.token_id], eos, max_new)
            return False  # go on

        gen.generate_batch([[id_to_token(i) for i in ids] for ids in batch], max_length=max_new, sampling_topk=1,
                           beam_size=1, include_prompt_in_result=False, callback=on_token,
                           end_token=[id_to_token(i) for i in sorted(eos)])
        now = time.perf_counter()
        for run in batch_runs:
            run.done = run.done or now
        runs += batch_runs
    return runs


# ---------------------------------------------------------------------------------------------- llama.cpp


def run_llama_cpp(gguf: Path, prompts: list[list[int]], max_new: int, eos: set[int], threads: int) -> list[Run]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=threads, n_threads_batch=threads, n_batch=512,
                verbose=False)
    for _, _tok in zip(range(4), llm.generate(prompts[0], temp=0.0, top_k=1, reset=True)):  # warm-up
        pass
    runs = []
    for ids in prompts:
        llm.reset()
        run = Run(time.perf_counter())
        for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            if run.deliver([int(tok)], eos, max_new):
                break
        runs.append(run)
    return runs
