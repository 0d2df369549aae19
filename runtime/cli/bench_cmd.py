"""`medusa-export bench`: vanilla vs Medusa for each backend, plus transformers `generate`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from .app import app, cli_errors
from ..report_json import write_json_report
from .checks import file_path_option, path_argument, path_option

if TYPE_CHECKING:
    from ..manifest import Manifest


@app.command()
@cli_errors
def bench(
    artifact: Path = path_argument(help="Artifact directory."),
    backends: str = typer.Option("ort", help="Comma-separated: torch, ort, trt."),
    prompts: Optional[Path] = path_option(None, help="JSONL prompts (default: the packaged prompt set; for the "
                                          "MT-Bench figures pass FastChat's question.jsonl)."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N prompts (default: all)."),
    max_new_tokens: int = typer.Option(128, min=1, help="New tokens per answer, in every mode."),
    tree: Optional[str] = typer.Option(None, help="Tree to use instead of the artifact's (must fit the graph)."),
    threads: Optional[int] = typer.Option(None, help="Intra-op threads (default: all cores)."),
    concurrency: int = typer.Option(1, min=1, help="Also decode every prompt with this many requests batched together "
                                    "(the batched engine; aggregate tokens/s and whether each answer is unchanged)."),
    context_drafts: bool = typer.Option(True, "--context-drafts/--no-context-drafts", help="The row with context "
                                        "drafts (prompt lookup) beside the heads' tree (the default decoding)."),
    hf: Optional[bool] = typer.Option(None, "--hf/--no-hf", help="The transformers generate baseline (default: "
                                      "when torch and transformers are installed)."),
    model: Optional[str] = typer.Option(None, help="The artifact's base model (directory or .gguf) for the torch "
                                        "backend and the baseline, when this machine has not loaded it before."),
    interleave: bool = typer.Option(True, "--interleave/--sequential", help="Single-stream modes take turns prompt "
                                    "by prompt, so a machine whose speed drifts slows them alike (--sequential: each "
                                    "mode over all prompts, then the next)."),
    as_json: Optional[Path] = file_path_option(None, "--json", help="Write the report here."),
    plot_file: Optional[Path] = file_path_option(None, "--plot", help="Write a PNG bar chart of tokens/s here."),
) -> None:
    """Benchmark decoding speed: tokens/s, accepted length, step latency, identical outputs."""
    from .. import extras
    from ..bench import RUNNING, plot, run_bench
    from ..prompts import read_prompts
    from ..errors import InputError
    from .checks import at_least, backend_list, check_threads, prompts_read

    names = backend_list(backends)
    at_least("--limit", limit)
    check_threads(threads)
    _check_outputs(as_json, plot_file, inputs=(artifact, prompts_read(prompts), model, tree))
    if tree is not None:  # a bad preset or file is named before the artifact loads and the progress bar starts
        _check_tree(tree)
    if "torch" in names:
        extras.require("bench --backends torch", "torch")
    if hf:
        extras.require("bench --hf (the transformers baseline)", "torch")
    elif hf is None:
        hf = extras.available(*extras.EXTRAS["torch"])
        if not hf:
            typer.echo("note: skipping the transformers baseline: torch/transformers are not installed "
                       "(pip install 'medusa-export[torch]')", err=True)
    if model is not None and "torch" not in names and not hf:  # it was ignored without a word
        raise InputError("--model is the base model of --backends torch and the transformers baseline (--hf); "
                         "neither runs here: leave --model out, or add them")
    if model is not None:  # else a bad one was named after the rows before its own had run
        from medusa_export.exporter.model_loading import checked_source

        checked_source(model)
    texts = read_prompts(prompts, limit=limit)
    _check_artifact(artifact, names, concurrency, tree)

    shown: set[str] = set()

    def save(report: dict) -> None:  # after every row: a run that stops keeps what it measured
        for note in report.get("notes", []):
            if note not in shown:
                shown.add(note)
                typer.echo(f"note: {note}", err=True)
        if as_json:
            write_json_report(as_json, report)
        if report.get("incomplete") not in (None, RUNNING) and report["results"]:  # stopped: what it measured
            _print_table(report)
            if as_json:
                typer.echo(f"note: the {len(report['results'])} rows measured before it stopped are in {as_json}",
                           err=True)

    baseline = None
    if hf:
        from medusa_export.exporter.hf_baseline import hf_generate_bench as baseline
    report = run_bench(artifact, names, texts, max_new_tokens=max_new_tokens, baseline=baseline, tree=tree,
                       threads=threads, progress=typer.echo, measured=save, model=model, concurrency=concurrency,
                       context_drafts=context_drafts, interleave=interleave)
    if as_json:  # first: a reader of the table that goes away (`| head`) must not leave the report unwritten
        write_json_report(as_json, report)
    try:
        if plot_file:
            plot(report, plot_file)
    finally:  # a plot that cannot be drawn still leaves the table on the screen
        _print_table(report)


def _check_tree(tree: str) -> None:
    """``--tree``: a preset or a readable tree file with at least one path. An empty value read as ".", and a tree
    without paths ran the Medusa rows without any heads' tree, which the table reported as Medusa's speed-up."""
    from ..errors import InputError
    from ..tree import given_choices

    if not tree.strip():
        raise InputError("--tree is empty: give a preset (e.g. chain-2) or a tree JSON file, or leave --tree out "
                         "for the artifact's tree")
    given_choices(tree)


def _print_table(report: dict) -> None:
    typer.echo(f"{'backend':<13}{'mode':<19}{'tok/s':>8}{'accepted':>10}{'step p50':>10}{'step p90':>10}"
               f"{'prefill':>9}{'speed-up':>10}  identical")
    for r in report["results"]:  # speed-up: Medusa over vanilla; batched rows over the single-stream vanilla row
        fmt = lambda v, f: format(v, f) if v is not None else "-".rjust(int(f.split(".")[0]))  # noqa: E731
        up = r.get("speedup_vs_vanilla") or r.get("speedup_vs_single_stream_vanilla")
        typer.echo(f"{r['backend']:<13}{r['mode']:<19}{fmt(r['tokens_per_s'], '8.2f')}{fmt(r['mean_accepted'], '10.2f')}"
                   f"{fmt(r['step_ms_p50'], '10.1f')}{fmt(r['step_ms_p90'], '10.1f')}{fmt(r['prefill_ms'], '9.1f')}"
                   f"{fmt(up, '9.2f')}{'x' if up else ' '}  {r['identical_to_vanilla']}")


def _check_outputs(as_json: Optional[Path], plot_file: Optional[Path], inputs: tuple = ()) -> None:
    """Refuse report paths that cannot be written (or would overwrite the artifact or the prompts) before the
    benchmark runs, not after it."""
    from medusa_export.exporter.output_dir import check_out_file

    from .. import extras
    from ..errors import BackendUnavailableError, InputError

    if as_json is not None:
        check_out_file(as_json, "--json", inputs=inputs)
    if plot_file is not None:
        if plot_file.suffix.lower() not in ("", ".png"):  # refused before the run rather than written as a PNG
            raise InputError(f"--plot {plot_file}: the chart is a PNG image: give a path ending in .png")
        check_out_file(plot_file, "--plot", inputs=(*inputs, as_json))  # not the --json report either
        if not extras.available("matplotlib"):
            raise BackendUnavailableError("bench --plot needs matplotlib, which is not installed: "
                                          "pip install 'medusa-export[bench]'")


def _check_artifact(artifact: Path, names: list[str], concurrency: int, tree: Optional[str] = None) -> None:
    """The artifact's manifest, read before the benchmark starts its progress bar. ONNX Runtime batches on the
    artifact's lanes graph, TensorRT in the vanilla engine's batch profile: more requests than they take cannot run
    together, which the batched rows would only find out after the single-stream rows. So with ``--tree``: a tree
    that does not fit the graph was refused when a backend loaded, after the progress bar had started (and with
    `--backends torch,ort` after every torch row)."""
    from ..backends.lanes import more_lanes_fix
    from ..errors import InputError
    from ..manifest import Manifest

    manifest = Manifest.read(artifact)
    if tree is not None:
        _check_tree_fits(manifest, tree, names)
    if "trt" in names:  # found only after every ONNX Runtime row had run
        from ..backends.trt_availability import require as require_tensorrt
        from ..backends.trt_compat import require_portable

        require_portable(manifest, artifact)
        require_tensorrt()  # TensorRT, cuda-python and a GPU: else the error came after every earlier row ran
    for name, lanes, what in (("ort", manifest.lanes, f"lanes graph ({manifest.lanes} lanes)"),
                              ("trt", manifest.engine_lanes, f"TensorRT batch profile ({manifest.engine_lanes} sequences)")):
        if concurrency > 1 and name in names and lanes and concurrency > lanes:
            raise InputError(f"--concurrency {concurrency} exceeds the artifact's {what}: "
                             f"{more_lanes_fix(lanes, concurrency)}")


def _check_tree_fits(manifest: "Manifest", tree: str, names: list[str]) -> None:
    """``--tree`` against the artifact's graph, as loading checks it: depth within the heads, ranks below the top-k,
    no duplicate or orphan path (`api.artifact_tree`), and on ONNX Runtime's fused graph no more root-to-leaf paths
    than it verifies (what `Generator` refuses); an artifact without heads takes none."""
    from ..api import artifact_tree
    from ..generator import check_tree_paths
    from ..manifest import ONNXRUNTIME

    chosen = artifact_tree(manifest, tree)
    graph = manifest.graphs.get("medusa")
    if graph is not None and "ort" in names and manifest.graph_format == ONNXRUNTIME:
        check_tree_paths(chosen, graph.paths)
