"""`medusa-export generate`: decode one prompt, streaming text, with Medusa or plain."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

from .app import app, cli_errors


@app.command()
@cli_errors
def generate(
    model: Optional[str] = typer.Argument(None, metavar="MODEL", help="Artifact directory, HF model directory or "
                                          ".gguf file (default: the built-in SmolLM2-135M-Instruct)."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="User prompt (the chat template is applied); - reads it "
                               "from standard input."),
    heads: Optional[str] = typer.Option(None, help="Medusa heads directory/file (torch backend); "
                                        "'fresh' for untrained heads."),
    tree: Optional[str] = typer.Option(None, help="Tree preset (mc_sim_7b_63, cpu_small_10, chain-N) or JSON file."),
    backend: str = typer.Option("auto", help="torch | ort | trt (auto: ort for an artifact, else torch)."),
    max_new_tokens: int = typer.Option(128, min=1, help="Most tokens to generate (fewer at an end-of-sequence "
                                        "token, a --stop string or the KV capacity)."),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy (lossless); > 0 = typical acceptance."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Sampling: only the fewest best tokens "
                                "whose probability reaches it, in [0, 1] (1 = no cut, 0 = the best alone)."),
    top_k: int = typer.Option(0, "--top-k", min=0, help="Sampling: only the k best tokens (0 = every rank the artifact "
                              "returns, 32 by default)."),
    stop: list[str] = typer.Option([], help="Stop string (repeatable)."),
    no_medusa: bool = typer.Option(False, "--no-medusa", help="Plain decoding, one token per step."),
    no_context_drafts: bool = typer.Option(False, "--no-context-drafts", help="Speculate with the heads' tree only "
                                           "(by default greedy decoding also verifies continuations found in the "
                                           "context)."),
    no_chat: bool = typer.Option(False, "--no-chat", help="Do not apply the chat template."),
    seed: Optional[int] = typer.Option(None, help="Seed for sampling."),
    device: str = typer.Option("cpu", help="cpu | cuda[:N] | mps | xpu[:N] (the torch backend; trt always runs on "
                               "the GPU)."),
    max_seq: Optional[int] = typer.Option(None, help="KV capacity in tokens (default: the artifact's, or 2048)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming text."),
    logprobs: Optional[int] = typer.Option(None, "--logprobs", min=0, max=20, help="With --json: each token's "
                                           "log-probability and this many best alternatives (0-20)."),
) -> None:
    """Generate text for one prompt and report tokens/s and accepted tokens per step."""
    from ..decode import uses_context
    from ..generation_config import GenerationConfig
    from ..errors import InputError
    from ..manifest_records import LIMITS
    from .checks import at_least
    from .loading import is_artifact, open_generator

    at_least("--max-seq", max_seq, hint=", or leave it out for the artifact's own (2048 for a model)",
             maximum=LIMITS["max_seq"])
    if model is not None and not model.strip():  # an empty MODEL would run the built-in model
        raise InputError("MODEL is empty: give an artifact, model directory or .gguf, or leave it out for the "
                         "built-in model")
    if heads is not None and not heads.strip():  # as a path "" is ".": heads were read from the current directory
        raise InputError("--heads is empty: give a heads directory or file, 'fresh' for untrained heads, or leave it "
                         "out for the model's own")
    if prompt == STDIN:
        prompt = stdin_prompt()
    if not prompt.strip():  # as prompt files and --no-chat refuse it: a blank prompt is a mistake, before any load
        raise InputError("--prompt is empty: give the text to answer")
    if sys.stdout is None:  # started with its standard output closed (`>&-`): the answer would go nowhere, exit 0
        raise InputError("standard output is closed, where the answer is written: send it to a file, a pipe or "
                         "/dev/null")
    if logprobs is not None and not as_json:  # the text stream has no place for them
        raise InputError("--logprobs adds them to the --json output: add --json")
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, stop_strings=tuple(stop),
                           medusa=not no_medusa, seed=seed, chat=not no_chat, context_drafts=not no_context_drafts,
                           top_p=top_p, top_k=top_k, logprobs=logprobs)  # checked before the model loads
    chosen = backend if backend != "auto" else ("ort" if is_artifact(model) else "torch")
    opened = open_generator(model, chosen, heads=heads, tree=tree, max_seq=max_seq, device=device, plain=no_medusa)
    if opened.notice and not no_medusa:
        typer.echo(opened.notice, err=True)
    for note in opened.notes:
        typer.echo(f"note: {note}", err=True)
    unused = [name for name, value in (("--tree", tree), ("--heads", heads)) if no_medusa and value is not None]
    if unused:  # kept for A/B runs that toggle --no-medusa alone; said, so that no one reads them as used
        typer.echo(f"note: {' and '.join(unused)} {'is' if len(unused) == 1 else 'are'} not used with --no-medusa "
                   f"(plain decoding)", err=True)
    try:
        stream = opened.generator.stream(prompt, cfg)
        for event in stream:
            if not as_json:
                typer.echo(event.text, nl=False)
    finally:
        opened.generator.backend.close()
    r = stream.result
    if as_json:
        typer.echo(json.dumps(r.to_json()))
        return
    mode = "+".join(["medusa"] * r.medusa + ["context"] * uses_context(cfg)) or "vanilla"
    typer.echo("")
    sources = "" if no_medusa else \
        f" (accepted drafts: {r.accepted_heads} from the heads, {r.accepted_context} from context or corpus drafts)"
    typer.echo(f"[{mode} · {r.backend}] {_counted(r.new_tokens, 'token')} in {_counted(r.steps, 'step')}, "
               f"{r.mean_accepted:.2f} tokens/step"
               f"{sources}, {r.tokens_per_s:.1f} tokens/s, prefill {r.prefill_ms:.0f} ms, finish: {r.finish_reason}",
               err=True)


def _counted(n: int, noun: str) -> str:
    """``1 step``, ``2 steps``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


STDIN = "-"  # --prompt -: the prompt is standard input (a pipe, a file redirected, or typed up to Ctrl-D)


def stdin_prompt() -> str:
    """Standard input to its end as UTF-8 text (a byte order mark and one final line break dropped: what `echo`
    and editors add), at most MAX_PROMPT_CHARS characters; an InputError naming what is wrong."""
    from ..errors import InputError
    from ..prompts import MAX_PROMPT_CHARS

    if sys.stdin is None:  # started with standard input closed (`<&-`)
        raise InputError("--prompt - reads standard input, which is closed: pipe the prompt in or give it as text")
    if sys.stdin.isatty():
        typer.echo("reading the prompt from standard input (end it with Ctrl-D)", err=True)
    too_long = InputError(f"--prompt -: standard input holds over {MAX_PROMPT_CHARS:,} characters, past what a "
                          f"prompt may hold: shorten it")
    most = 4 * MAX_PROMPT_CHARS + 5  # UTF-8: at most 4 bytes a character, then a byte order mark and "\r\n"
    try:
        data = sys.stdin.buffer.read(most + 1)
    except OSError as e:  # opened for writing only (`0>file`), a terminal gone
        raise InputError(f"--prompt - cannot read standard input ({e.strerror or e}): pipe the prompt in or give it "
                         f"as text") from None
    if data is None:  # a non-blocking descriptor with nothing yet
        raise InputError("--prompt - found standard input non-blocking with nothing to read: pipe the prompt in or "
                         "give it as text")
    if len(data) > most:  # not decoded: it may end inside a character
        raise too_long
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"--prompt -: standard input is not UTF-8 text (byte {e.start:,} is {data[e.start]:#04x}): "
                         f"convert it to UTF-8") from None
    text = text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text
    if len(text) > MAX_PROMPT_CHARS:
        raise too_long
    return text
