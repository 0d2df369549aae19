"""Benchmark vanilla vs Medusa decoding per backend on a prompt set (``medusa-export bench``).

    report = run_bench(artifact_dir, ["ort"], prompts, max_new_tokens=128)
    report = run_bench(artifact_dir, ["ort"], prompts, baseline=hf_generate_bench)   # + the transformers row

Per row: tokens/s over the whole set (new tokens / the mode's own generation time, prefill included), mean
accepted tokens per step, step latency p50/p90, median prefill, and whether every output equals vanilla on that
backend. The single-stream modes take turns prompt by prompt unless ``interleave=False`` (`single_stream_runs`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .generation_config import GenerationConfig
from .errors import InputError
from .generator import GenerationResult
from .machine import machine_info
from .typed_json import to_json
from .warm_up import warm_up_backend
from .whole_file import write_report


def summarize(backend: str, mode: str, results: list[GenerationResult], wall_s: float,
              identical: bool | None) -> dict:
    steps = [s for r in results for s in r.step_ms]
    step_tokens = sum(r.step_tokens for r in results)  # the one definition: `decode.DecodeStats.mean_accepted`
    n_steps = sum(r.steps for r in results)
    return {
        "backend": backend,
        "mode": mode,
        "tokens_per_s": round(sum(r.new_tokens for r in results) / wall_s, 3) if wall_s > 0 else None,
        "mean_accepted": round(step_tokens / n_steps, 4) if n_steps else None,
        "step_ms_p50": round(float(np.percentile(steps, 50)), 3) if steps else None,
        "step_ms_p90": round(float(np.percentile(steps, 90)), 3) if steps else None,
        "prefill_ms": round(float(np.median([r.prefill_ms for r in results])), 3) if results else None,
        "identical_to_vanilla": identical,
        "new_tokens": sum(r.new_tokens for r in results),
        # Accepted draft tokens per step by source, and context draft rows verified per step.
        "accepted_heads": round(sum(r.accepted_heads for r in results) / n_steps, 4) if n_steps else None,
        "accepted_context": round(sum(r.accepted_context for r in results) / n_steps, 4) if n_steps else None,
        "context_rows": round(sum(r.context_rows for r in results) / n_steps, 4) if n_steps else None,
    }


WARM_UP_TOKENS = 8  # new tokens of each mode's warm-up run (at most the run's own max_new_tokens)
RUNNING = "the run had not finished when these rows were written"  # `incomplete` of the reports saved per row


def run_bench(artifact: str | Path, backends: list[str], prompts: list[str], max_new_tokens: int = 128,
              baseline: Callable | None = None, tree: str | None = None, threads: int | None = None,
              progress: Callable[[str], None] | None = None,
              measured: Callable[[dict], None] | None = None, model: str | None = None, concurrency: int = 1,
              context_drafts: bool = True, interleave: bool = True) -> dict:
    """Rows per backend: vanilla, the heads alone ("medusa"), heads and context drafts ("medusa+context"; "context"
    without heads) (``concurrency`` > 1: also vanilla and the last with that many requests decoded
    together by the batched engine, all prompts submitted at once), then the ``baseline`` row (the CLI passes the transformers one:
    ``exporter.hf_baseline.hf_generate_bench``). ``measured(report)`` is called after every row (``incomplete``:
    `RUNNING`), and with the rows so far (``incomplete`` says why) when a backend or the baseline fails or the run is
    stopped, so what was measured is saved whatever happens next, and a report saved before the end says so even when
    nothing could be written after it (a full disk, a killed process). ``model``: the artifact's base model (torch
    backend and baseline) when this machine does not know it."""
    from tqdm import tqdm

    from .api import MedusaRuntime

    check_room(artifact, prompts, max_new_tokens)
    results: list[dict] = []
    vanilla_tokens: dict[str, list[list[int]]] = {}
    total = len(backends) * len(prompts) * (3 + 2 * (concurrency > 1)) + (len(prompts) if baseline else 0)
    bar = tqdm(total=total, desc="bench", unit="gen", disable=progress is None)
    run = {"manifest": None, "tree": None, "notes": []}

    def report() -> dict:
        manifest = run["manifest"]
        return {"model": manifest.model.name if manifest else None, "machine": machine_info(), "prompts": len(prompts),
                "max_new_tokens": max_new_tokens, "interleaved": interleave, "threads": threads,
                "tree": _tree_record(manifest, tree, run["tree"]),
                "results": results, "notes": run["notes"]}

    def add(row: dict) -> None:  # each row is saved as soon as it is measured, marked unfinished until the end
        results.append(row)
        if measured is not None:
            measured({**report(), "incomplete": RUNNING})

    try:
        for name in backends:
            with MedusaRuntime.load(artifact, backend=name, tree=tree, threads=threads,
                                    model=model if name == "torch" else None) as rt:
                run["manifest"], run["tree"] = rt.manifest, rt.generator.tree
                run["notes"] += [n for n in rt.notes if n not in run["notes"]]
                if concurrency > 1 and not (rt.manifest.engine_lanes if name == "trt" else rt.manifest.lanes):
                    rows = f"x{min(concurrency, len(prompts))}"  # as `concurrent_row` labels them
                    run["notes"].append(f"{name}: the artifact has no batched steps (no lanes graph or TensorRT batch "
                                        f"profile), so its {rows} rows take their requests in turn")
                backend_rows(rt, name, prompts, max_new_tokens, concurrency, context_drafts, vanilla_tokens,
                             bar.update, add, interleave)
        if baseline is not None:
            row, hf_tokens = baseline(run["manifest"], prompts, max_new_tokens, on_prompt=lambda: bar.update(1),
                                      model=model)
            ref = vanilla_tokens.get("torch") or next(iter(vanilla_tokens.values()), None)
            row["identical_to_vanilla"] = None if ref is None else hf_tokens == ref  # None: nothing to compare
            add(row)
    except BaseException as e:  # a backend failed, or the run was stopped: the rows measured so far are kept
        if results and measured is not None:
            why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__  # Ctrl-C has no message of its own
            measured({**report(), "incomplete": f"stopped after {len(results)} rows: {why}"[:400]})
        raise
    finally:
        bar.close()
    return report()


def backend_rows(rt, name: str, prompts: list[str], max_new_tokens: int, concurrency: int, context_drafts: bool,
                 vanilla_tokens: dict[str, list[list[int]]], tick: Callable[[], None],
                 add: Callable[[dict], None], interleave: bool = True) -> None:
    """One backend's rows, each handed to ``add`` once measured: every single-stream mode (`bench_modes`), then
    with ``concurrency`` > 1 the batched vanilla and default rows. Records the backend's vanilla tokens in
    ``vanilla_tokens``. ``interleave``: the single-stream modes take turns prompt by prompt (`single_stream_runs`)."""
    modes = bench_modes(rt.generator.tree is not None, context_drafts)
    for _, options in modes:  # warm-up (allocator, thread pool); within the room `check_room` found
        rt.generate(prompts[0], max_new_tokens=min(WARM_UP_TOKENS, max_new_tokens), **options)
    for mode, runs, seconds in single_stream_runs(rt, modes, prompts, max_new_tokens, interleave, tick):
        if mode == "vanilla":
            vanilla_tokens[name] = [r.token_ids for r in runs]
        identical = all(r.token_ids == v for r, v in zip(runs, vanilla_tokens[name]))
        row = summarize(name, mode, runs, seconds, identical)
        if mode == "vanilla":
            # No answer took a step (each ended at the prefill's token: --max-new-tokens 1, or an end of sequence):
            # nothing was decoded, and a ratio of prefill times is no speed-up of Medusa's.
            single_rate = row["tokens_per_s"] if row["mean_accepted"] is not None else None
        else:  # same backend, same artifact, same prompts
            row["speedup_vs_vanilla"] = speedup(row["tokens_per_s"], single_rate)
        add(row)
    if concurrency > 1:
        warm_up_backend(rt.generator)  # batched steps too: the lanes graph opens (~1.7 s for the default model)
        for mode, options in (modes[0], modes[-1]):
            row = concurrent_row(rt, name, prompts, GenerationConfig(max_new_tokens=max_new_tokens, **options),
                                 concurrency, vanilla_tokens[name], mode, on_done=tick)
            row["speedup_vs_single_stream_vanilla"] = speedup(row["tokens_per_s"], single_rate)
            add(row)


def speedup(rate: float | None, vanilla_rate: float | None) -> float | None:
    """``rate`` over ``vanilla_rate`` (tokens per second: a row whose answers differ from vanilla's made other
    tokens, so its time alone is no measure); None when either made no tokens, which is no speed-up at all."""
    if not rate or not vanilla_rate:
        return None
    return round(rate / vanilla_rate, 3)


def single_stream_runs(rt, modes: list[tuple[str, dict]], prompts: list[str], max_new_tokens: int, interleave: bool,
                       tick: Callable[[], None]) -> Iterator[tuple[str, list[GenerationResult], float]]:
    """(mode, its results in prompt order, its seconds) for each mode, vanilla first. Interleaved, every prompt runs
    in every mode before the next prompt, the modes in turn first (prompt i starts with mode i mod the number of
    modes), so a machine whose speed drifts over minutes (a shared VM's neighbours) slows all modes alike; the rows
    come once all prompts ran. Sequential, each mode runs every prompt in turn, a row as soon as its mode ends."""
    cfgs = {mode: GenerationConfig(max_new_tokens=max_new_tokens, **options) for mode, options in modes}
    runs: dict[str, list] = {mode: [None] * len(prompts) for mode in cfgs}
    seconds = dict.fromkeys(cfgs, 0.0)

    def one(mode: str, i: int) -> None:
        t0 = time.perf_counter()
        runs[mode][i] = rt.generator.generate(prompts[i], cfgs[mode])
        seconds[mode] += time.perf_counter() - t0
        tick()

    names = list(cfgs)
    if interleave:
        for i in range(len(prompts)):
            for mode in names[i % len(names):] + names[:i % len(names)]:
                one(mode, i)
        yield from ((mode, runs[mode], seconds[mode]) for mode in names)
        return
    for mode in names:
        for i in range(len(prompts)):
            one(mode, i)
        yield mode, runs[mode], seconds[mode]


def check_room(artifact: str | Path, prompts: list[str], max_new_tokens: int) -> None:
    """InputError unless there is a prompt and every prompt (under the chat template, as the rows encode it) plus
    ``max_new_tokens`` fits the artifact's max_seq. Checked before any row: an answer cut at the KV capacity ends
    early and differently alone and batched, so its tokens/s and "identical" would measure the capacity, not the
    decoding; with no prompt the warm-up failed with an IndexError and verify with a ValueError."""
    from .manifest import Manifest
    from .tokenizer import ChatTokenizer

    if not prompts:
        raise InputError("there are no prompts to run: give a prompts file with at least one prompt (one JSON "
                         "object per line), or leave out --prompts for the packaged set")
    manifest = Manifest.read(artifact)
    tokenizer = ChatTokenizer.from_artifact(Path(artifact), manifest)
    lengths = [len(tokenizer.encode_prompt(p, chat=True)) for p in prompts]
    longest = max(range(len(lengths)), key=lengths.__getitem__, default=None)
    if longest is None or lengths[longest] + max_new_tokens <= manifest.max_seq:
        return
    room = manifest.max_seq - lengths[longest]
    fix = f"use --max-new-tokens {room} or less" if room >= 1 else "shorten that prompt or leave it out"
    raise InputError(f"--max-new-tokens {max_new_tokens}: prompt {longest + 1} ({lengths[longest]} tokens) plus "
                     f"{max_new_tokens} new tokens exceeds the artifact's max_seq {manifest.max_seq}: {fix}, or "
                     f"rebuild the artifact with a larger `medusa-export build --max-seq`")


def bench_modes(heads: bool, context_drafts: bool = True) -> list[tuple[str, dict]]:
    """(mode, GenerationConfig options) of the single-stream rows: vanilla first, the default decoding last."""
    modes = [("vanilla", {"medusa": False})]
    if heads:
        modes.append(("medusa", {"context_drafts": False}))
    if context_drafts:
        modes.append(("medusa+context" if heads else "context", {}))
    return modes


def concurrent_row(rt, backend: str, prompts: list[str], cfg: GenerationConfig, concurrency: int,
                   reference: list[list[int]], mode: str, on_done: Callable[[], None] = lambda: None) -> dict:
    """Every prompt submitted at once to a batched engine of ``concurrency`` sequences: aggregate tokens/s, the
    batch size of its steps, how many steps speculated, and whether every answer equals its single-stream one."""
    from .batcher import generate_many
    from .engine import DEFAULT_MAX_NUM_BATCHED_TOKENS

    steps: list = []
    t0 = time.perf_counter()
    results = generate_many(rt.generator, prompts, concurrency, max(DEFAULT_MAX_NUM_BATCHED_TOKENS, concurrency),
                            cfg, on_step=steps.append, on_result=on_done)
    wall = time.perf_counter() - t0
    # Labelled by the sequences that could run together: with fewer prompts than lanes, no step held more
    row = summarize(backend, f"{mode} x{min(concurrency, len(prompts))}", results, wall,
                    all(r.token_ids == v for r, v in zip(results, reference)))
    batch = [s.sequences for s in steps]
    row.update(concurrency=concurrency, steps=len(steps), mean_batch=round(float(np.mean(batch)), 3) if batch else None,
               speculative_steps=sum(s.speculative for s in steps))
    return row


def _tree_record(manifest, spec: str | None, tree) -> dict | None:
    """The tree the Medusa rows ran with: the artifact's, or the ``--tree`` override."""
    if manifest is None:
        return None
    if spec is None or tree is None:
        return to_json(manifest.tree)
    return {"name": Path(spec).stem if spec.endswith(".json") else spec,
            "medusa_choices": tree.to_json(), "num_nodes": tree.num_nodes}


def plot(report: dict, path: str | Path) -> None:
    """A PNG bar chart of the rows' tokens/s at exactly ``path`` (matplotlib would add ``.png`` to a name without
    a suffix, or pick the format from it), written whole and swapped in: a run stopped mid-write, or a full disk,
    leaves the previous file as it was."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    labels = [f"{r['backend']}\n{r['mode']}" for r in rows]
    values = [r["tokens_per_s"] or 0.0 for r in rows]  # None: not measured (no time), drawn as no bar
    plain = [r["mode"].split(" x")[0] == "vanilla" for r in rows]  # "vanilla x4" too: no drafts
    colors = ["#4C72B0" if p else "#DD8452" for p in plain]
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 4))
    bars = ax.bar(labels, values, color=colors)
    for b, r, p in zip(bars, rows, plain):
        rate = "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.1f}"
        note = rate + ("" if p else f"\n{_accepted(r)} acc")
        ax.annotate(note, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("tokens / s")
    ax.margins(y=0.15)  # room above the tallest bar for its note
    ax.set_title(f"{report['model']}: {report['prompts']} prompts, {report['max_new_tokens']} new tokens")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    write_report(Path(path), png.getvalue())


def _accepted(row: dict) -> str:
    """A row's mean accepted tokens per step; "-" for a row without steps (every answer ended at the prefill's
    token, e.g. max_new_tokens 1), whose mean is None."""
    value = row.get("mean_accepted")
    return "-" if value is None else f"{value:.2f}"
