"""Medusa-2: fine-tune the backbone together with the heads, keeping it close to the original model.

    record = train_medusa2(None, "sharegpt", "models/smollm2-medusa2", Medusa1Options(),
                           Medusa2Options(init_heads="heads/mine"))
    # models/smollm2-medusa2: model.safetensors (merged backbone + medusa_head.*), config.json, tokenizer files

Data: the Medusa-1 self-distillation cache (each prompt followed by the original model's greedy answer).
Loss per batch of those sequences, over the answer positions:
    lm_weight * KL(original || fine-tuned)  +  heads_weight * sum_k 0.8^k CE(head_k, token t+2+k)
The KL keeps the fine-tuned model's next-token distribution where the original's was; with LoRA the original
is the same weights with the adapters switched off (peft's ``disable_adapter``), so no second copy is held
(full fine-tuning, ``lora_rank=0``, keeps a frozen copy: fine for small models).
Phases: the heads warm up first (Medusa-1 on the frozen backbone, or start from ``init_heads``), so their large
early loss cannot pull the backbone around; then backbone and heads train jointly, each with its own rate.
Options: ``Medusa1Options`` drive the warm-up (a Medusa-1 run: ``epochs``; ``lr`` is the heads' rate in both
phases) and the data both phases share; ``Medusa2Options`` the joint phase.
The output is a Medusa-2 model directory: ``build MODEL_DIR`` takes it with no ``--heads``, and its vanilla
baseline is the fine-tuned backbone itself.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from medusa_export.exporter.heads import MedusaHeads, load_heads
from medusa_export.exporter.output_dir import swap_in
from medusa_export.exporter.train_out_dir import (TRAIN_WORK_MARK, check_train_arguments, check_train_out_dir,
                                                  partial_dir, train_inputs, train_out_lock, train_work_dir)
from medusa_export.runtime.whole_file import readable_as_made
from medusa_export.runtime.errors import HeadsError, InputError

from . import checkpoint as ckpt
from .distributed import (agree, assert_in_sync, average_gradients, average_values, barrier, broadcast_parameters,
                          end_distributed, rank_share, setup_distributed)
from .examples import DraftVocab
from .medusa2_batches import answer_sequences, epoch_batches, seeded_subset
from .medusa2_delta import model_weights, save_delta
from .medusa2_loss import evaluate_joint, joint_loss
from medusa_export.runtime.training_options import Medusa1Options, Medusa2Options
from .prompt_source import load_prompt_set
from .train import HeadsLoss, _bar, _resolve_model, distill_passes, lr_lambda, train_heads


def train_medusa2(model_source: Any, data_file: str | Path, out_dir: str | Path,
                  medusa1: Medusa1Options = Medusa1Options(), opts: Medusa2Options = Medusa2Options()) -> dict:
    """Warm up the heads, train backbone + heads jointly, write the Medusa-2 model directory. Returns the record.

    ``medusa1``: the warm-up (a Medusa-1 run with all of these) and what the joint phase shares with it: the
    prompts (``later_turns``, ``exclude_eval``), pass 0's answers (``max_new_tokens``, ``temperature``, ``seed``,
    the cache), the split, ``num_heads``, ``draft_vocab``, ``lr`` (the heads' rate), the device and resumption.
    Extra sampled passes and ``max_train_positions`` shape the warm-up only.
    ``OUT.partial`` holds the run until it is complete: the warm-up heads and a checkpoint of the joint phase
    (trainable backbone weights, heads, optimizer; every ``checkpoint_every_s``), so a rerun of the same
    command continues where an interrupted one stopped (``resume=False`` starts afresh).
    Under ``torchrun`` each rank trains on its share of every epoch's batches, gradients are averaged, and
    rank 0 evaluates and writes (the others return ``{}``).
    Refused (InputError) before any work: an input (the model, the prompts, ``exclude_eval``, ``init_heads``) that
    is OUT or lies in OUT or OUT.partial, a cache directory there or in the model, an OUT.partial train-heads did
    not make, and a second run on the same OUT while this one holds its lock (`train_out_lock`)."""
    check_train_arguments(model_source, data_file, out_dir,
                          {"medusa1": (medusa1, Medusa1Options), "opts": (opts, Medusa2Options)})
    inputs = train_inputs(model_source, data_file, medusa1.exclude_eval, opts.init_heads)
    # before the warm-up: it replaces OUT whole when done
    check_train_out_dir(Path(out_dir), "medusa2", inputs, medusa1.cache_dir)
    with train_out_lock(Path(out_dir)):  # the CLI holds it already (re-entrant); library callers take it here
        return _train_medusa2(model_source, data_file, out_dir, medusa1, opts)


def _train_medusa2(model_source: Any, data_file: str | Path, out_dir: str | Path, medusa1: Medusa1Options,
                   opts: Medusa2Options) -> dict:
    m1 = medusa1
    if not opts.init_heads:
        opts.head_rates(m1.num_heads)  # refused before the warm-up, not after it
    lora = _peft() if opts.lora_rank > 0 else None
    t0 = time.perf_counter()
    if m1.threads:
        torch.set_num_threads(m1.threads)
    rank, world, dev, owned = setup_distributed(m1.device)
    log = _log if rank == 0 else (lambda _m: None)
    loaded = _resolve_model(model_source)
    model = loaded.model.to(dev).eval()
    if lora is not None:
        _check_lora_targets(model, opts.lora_targets)
    out = Path(out_dir)
    work = partial_dir(out)
    # The inputs first: a bad --data, --exclude-eval or --init-heads is refused before OUT.partial exists (it was
    # left behind, marked as a run's own, by a command that never started)
    prompt_set = load_prompt_set(data_file, exclude=m1.exclude_eval, later_turns=m1.later_turns)
    if opts.init_heads:
        heads_dir = Path(opts.init_heads)
        heads = load_heads(heads_dir, model.config)
        _check_heads_model(heads, loaded.identity, opts.init_heads)
        opts.head_rates(heads.config.num_heads)  # --head-lrs must fit these heads before any training
        warmup = {"init_heads": heads_dir.name}
    if rank == 0:  # ours (marked) or made here; anything else there is refused, never removed or taken over
        train_work_dir(out, fresh=not m1.resume)
    barrier(world)
    work.mkdir(parents=True, exist_ok=True)
    if not opts.init_heads:
        heads_dir = work / "warmup-heads"
        warmup = _warm_up(loaded, data_file, prompt_set.sha256, heads_dir, m1, rank, world, log)
        heads = load_heads(heads_dir, model.config)
    heads = heads.to(dev)

    # Pass 0's answers only: the extra sampled passes are the warm-up's. A warm-up of this process has just made
    # them (afresh under --no-resume): reuse them rather than generate them twice.
    fresh_warmup = not opts.init_heads
    data = distill_passes(model, loaded, prompt_set, replace(m1, extra_sampled_passes=0,
                                                             resume=m1.resume or fresh_warmup), rank, world)[0]
    train_seqs, held_seqs = answer_sequences(data, prompt_set.prompts, loaded.tokenizer, heads.config.num_heads,
                                             m1.heldout_fraction, m1.seed)
    held_prompts = sorted({s.prompt_index for s in held_seqs})  # all of them go to heldout_prompts.jsonl
    train_seqs = seeded_subset(train_seqs, opts.max_train_sequences, m1.seed)
    held_seqs = seeded_subset(held_seqs, opts.max_heldout_sequences, m1.seed + 1)
    del data  # the joint phase recomputes hidden states; the cached ones (fp16, [positions, H]) are not needed

    teacher = None if lora is not None else copy.deepcopy(model).eval()
    torch.manual_seed(m1.seed)  # the adapters' initialisation
    student = _trainable_backbone(model, opts, lora)
    lm_weight = model.get_output_embeddings().weight.detach()
    vocab = _draft_vocab(heads_dir if heads_dir.is_dir() else heads_dir.parent, train_seqs, m1.draft_vocab,
                         model.config.vocab_size)
    proj = lm_weight[torch.as_tensor(vocab.ids, device=dev)] if vocab else lm_weight
    heads_loss = HeadsLoss(heads, proj, "none")
    backbone_params = [p for p in student.parameters() if p.requires_grad]
    trained = backbone_params + list(heads.parameters())
    broadcast_parameters(trained, world)
    opt = torch.optim.AdamW([{"params": backbone_params, "lr": opts.backbone_lr}] + _head_groups(heads, opts, m1.lr),
                            weight_decay=0.0)
    # Seeded (the same after a resume); under torchrun each rank takes its share of every epoch's batches.
    epochs = [rank_share(epoch_batches(train_seqs, opts.seq_batch_size, opts.max_batch_tokens, m1.seed * 1000 + e),
                         rank, world) for e in range(opts.joint_epochs)]
    steps = sum(map(len, epochs))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, max(1, steps // 20)))
    # --init-heads as the directory it names: "heads/x/" or "./heads/x" resumes a run given "heads/x"
    key = {**_options_record(m1, opts), "init_heads": os.path.realpath(opts.init_heads) if opts.init_heads else None,
           "data_sha256": prompt_set.sha256, "seed": m1.seed,
           "train_sequences": len(train_seqs), "max_new_tokens": m1.max_new_tokens,
           "heldout_fraction": m1.heldout_fraction, "draft_vocab": m1.draft_vocab,
           "model": loaded.identity, "warmup": warmup, "world": world}
    fingerprint = ckpt.fingerprint(key)
    state = ckpt.load(work, fingerprint, key) if m1.resume else None
    if state is not None:  # every part checked: contents that do not fit are a CheckpointError, never a traceback
        epoch, step, saved = ckpt.restore(work, state, heads, opt, sched, [len(e) for e in epochs])
        _load_trainable(student, state.get("backbone"), lambda why: ckpt.damaged(work, why))
        if not isinstance(saved.get("history"), list) or "before" not in saved:
            raise ckpt.damaged(work, "its history is not the joint phase's")
        before, history, start = saved["before"], saved["history"], (epoch, step)
        log(f"resuming the joint phase at epoch {start[0] + 1}, step {start[1]} from {ckpt.path(work)}")
    else:  # rank 0 alone evaluates (the others wait at the next collective)
        before = evaluate_joint(model, teacher, lora, student, heads, lm_weight, held_seqs, dev, adapters=False) \
            if rank == 0 else None
        history, start = [], (0, 0)
    agree(torch.tensor([*start, len(train_seqs)]), world, "they would start at different steps or on different "
          f"data: put {work} and the cache directory on a filesystem every rank sees")

    def save_checkpoint(epoch: int, step: int) -> None:
        ckpt.save(work, fingerprint, heads, opt, sched, epoch, step, {"before": before, "history": history},
                  extra={"backbone": _trainable_state(student)}, key=key)

    done_steps = sum(map(len, epochs[:start[0]])) + start[1]
    bar = _bar(m1.progress and rank == 0, "joint training", total=steps, initial=done_steps)
    last_save = time.perf_counter()
    for epoch in range(start[0], opts.joint_epochs):
        for step in range(start[1] if epoch == start[0] else 0, len(epochs[epoch])):
            batch = [train_seqs[i] for i in epochs[epoch][step]]
            kl, medusa, per_head = joint_loss(model, teacher, lora, student, heads_loss, batch, vocab, dev)
            loss = opts.lm_weight * kl + opts.heads_weight * medusa
            opt.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(trained, world)
            opt.step()
            sched.step()
            kl, medusa, *per_head = average_values(torch.stack([kl, medusa, *per_head]).detach(), world).tolist()
            history.append({"kl": round(kl, 5), "medusa": round(medusa, 4), "per_head": [round(x, 4) for x in per_head]})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(kl=f"{kl:.4f}", medusa=f"{medusa:.3f}", refresh=False)
            if rank == 0 and time.perf_counter() - last_save > m1.checkpoint_every_s:
                done = step + 1 == len(epochs[epoch])
                save_checkpoint(epoch + 1 if done else epoch, 0 if done else step + 1)  # where to resume
                last_save = time.perf_counter()
    if bar is not None:
        bar.close()
    assert_in_sync(trained, world)
    if rank != 0:
        end_distributed(world, owned)
        return {}
    after = evaluate_joint(model, teacher, lora, student, heads, lm_weight, held_seqs, dev, adapters=True)
    adapters = _trainable_state(student) if lora is not None else None  # before the merge folds them in
    merged = student.merge_and_unload() if lora is not None else model
    eval_record = {"backbone_vs_original": after["backbone"], "heads_before_joint": before["heads"],
                   "heads_after_joint": after["heads"], "heldout_sequences": len(held_seqs),
                   "heldout_prompts": len(held_prompts)}
    record = {"mode": "medusa2", "options": _options_record(m1, opts), "base_model": loaded.identity,
              "data": {**prompt_set.provenance, "prompts": len(prompt_set.prompts)}, "warmup": warmup,
              "train_sequences": len(train_seqs), "joint_steps": steps, "world_size": world, "seed": m1.seed,
              "draft_vocab": {"size": int(len(vocab.ids)), "coverage": round(vocab.coverage, 4)} if vocab else None,
              "loss_first_steps": history[:5], "loss_last_steps": history[-5:],
              "loss_curve": _loss_curve(history), "eval": eval_record,
              "resumed_at": list(start) if state is not None else None,
              "wall_time_s": round(time.perf_counter() - t0, 1)}
    _write_model_dir(work, merged.to("cpu"), heads.to("cpu"), loaded, record)
    if adapters is not None:  # the run without the model's size: restore_weights rebuilds model.safetensors from it
        save_delta(work, adapters, _heads_tensors(heads))
    if vocab is not None:  # decoding scores the tokens the heads trained on (heads_source reads it beside the model)
        vocab.save(work / "draft_vocab.json")
    (work / "heldout_prompts.jsonl").write_text("".join(json.dumps({"prompt": prompt_set.prompts[i]}) + "\n"
                                                        for i in held_prompts))
    ckpt.remove(work)
    old = swap_in(work, out)
    # only now: a run stopped before the swap leaves OUT.partial marked as its own (resumed, not refused as foreign)
    (out / TRAIN_WORK_MARK).unlink(missing_ok=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    end_distributed(world, owned)
    return record


# Medusa1Options that change where or how fast the warm-up runs, never the heads it writes: not in its reuse key.
_NOT_IN_WARMUP_KEY = {"device", "threads", "progress", "checkpoint_every_s", "resume", "cache_dir"}


def _warm_up(loaded, data_file, data_sha256: str, heads_dir: Path, m1: Medusa1Options, rank: int, world: int,
             log) -> dict:
    """Medusa-1 on the frozen backbone into ``heads_dir`` (distributed like any Medusa-1 run; rank 0 writes),
    skipped when a finished warm-up of the same model, prompts and settings is already there (a resumed run)."""
    marker = heads_dir / "medusa2_warmup.json"
    settings = ckpt.fingerprint({"model": loaded.identity, "data_sha256": data_sha256,
                                 **{k: v for k, v in asdict(m1).items() if k not in _NOT_IN_WARMUP_KEY}})
    done = json.loads(marker.read_text()) if marker.exists() else {}
    if done.get("settings") == settings:
        log(f"reusing the finished heads warm-up in {heads_dir}")
        return done["warmup"]
    record = train_heads(loaded, data_file, heads_dir, m1)
    if rank == 0:
        warmup = {"medusa1_epochs": m1.epochs, "heldout": record["heldout"]}
        marker.write_text(json.dumps({"settings": settings, "warmup": warmup}) + "\n")
    barrier(world)  # the other ranks read what rank 0 wrote: the same heads and record everywhere
    return json.loads(marker.read_text())["warmup"]


def _options_record(m1: Medusa1Options, opts: Medusa2Options) -> dict:
    """The run's Medusa-2 options as training.json has always recorded them: with the warm-up's epochs and the
    heads' rate (Medusa1Options' ``epochs`` and ``lr``)."""
    return {**asdict(opts), "warmup_epochs": m1.epochs, "heads_lr": m1.lr}


def _draft_vocab(heads_dir: Path, train_seqs: list, size: int | None, vocab_size: int) -> DraftVocab | None:
    """The heads' own draft vocabulary when they have one (warm-up or ``init_heads``): the joint phase then trains
    the tokens they score at decode time. Else one from the training targets when ``size`` is set."""
    if (heads_dir / "draft_vocab.json").exists():
        return DraftVocab.load(heads_dir / "draft_vocab.json")
    if size:
        return DraftVocab.from_targets(np.concatenate([s.targets for s in train_seqs]), size, vocab_size)
    return None


def _head_groups(heads: MedusaHeads, opts: Medusa2Options, lr: float) -> list[dict]:
    """Optimizer groups of the heads: ``lr`` for all, or head k at ``head_lrs[k]`` (its projection with it)."""
    rates = opts.head_rates(heads.config.num_heads)
    if rates is None:
        return [{"params": list(heads.parameters()), "lr": lr}]
    own = [list(heads.proj[k].parameters()) if len(heads.proj) else [] for k in range(len(rates))]
    return [{"params": list(heads.blocks[k].parameters()) + own[k], "lr": r} for k, r in enumerate(rates)]


def _trainable_state(model) -> dict:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _load_trainable(model, state, damaged: Callable[[str], Exception]) -> None:
    """Saved trainable backbone weights (a checkpoint's, a LoRA delta's) into ``model``: the same names and shapes
    as its trainable parameters, finite; ``damaged(why)`` is raised otherwise."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not isinstance(state, dict) or set(state) != set(trainable):
        raise damaged("its backbone weights are not this run's trainable ones")
    for name, value in state.items():
        if getattr(value, "shape", None) != trainable[name].shape or not bool(torch.isfinite(value).all()):
            raise damaged(f"its backbone weight {name[:80]} has another shape or non-finite values")
    with torch.no_grad():
        for name, value in state.items():
            trainable[name].copy_(value)


def _loss_curve(history: list[dict], points: int = 20) -> list[dict]:
    """Mean KL and Medusa loss over ``points`` equal slices of the joint phase (the learning curve)."""
    if not history:
        return []
    edges = np.linspace(0, len(history), min(points, len(history)) + 1).astype(int)
    return [{"steps": int(b), "kl": round(float(np.mean([h["kl"] for h in history[a:b]])), 5),
             "medusa": round(float(np.mean([h["medusa"] for h in history[a:b]])), 4)}
            for a, b in zip(edges[:-1], edges[1:])]


def _log(msg: str) -> None:
    print(f"[medusa2] {msg}", file=sys.stderr, flush=True)


def _trainable_backbone(model, opts: Medusa2Options, lora):
    for p in model.parameters():
        p.requires_grad_(False)
    if lora is None:  # full fine-tuning of the decoder layers; embeddings and lm_head (the heads' projection) stay
        for p in model.model.layers.parameters():
            p.requires_grad_(True)
        model.train()
        return model
    config = lora.LoraConfig(r=opts.lora_rank, lora_alpha=opts.lora_alpha, lora_dropout=0.0, bias="none",
                             target_modules=opts.lora_targets.split(","))
    student = lora.get_peft_model(model, config)
    student.train()
    return student


def _write_model_dir(work: Path, model, heads: MedusaHeads, loaded, record: dict) -> None:
    """The reference's Medusa-2 layout: backbone and ``medusa_head.*`` in one safetensors, settings in config.json."""
    from safetensors.torch import save_file

    save_file(model_weights(model, _heads_tensors(heads)), str(work / "model.safetensors"), metadata={"format": "pt"})
    readable_as_made(work / "model.safetensors")
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.update(medusa_num_heads=heads.config.num_heads, medusa_num_layers=heads.config.num_layers,
               base_model_name_or_path=loaded.identity.get("name", ""))
    (work / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    loaded.tokenizer.save(work)
    (work / "eval.json").write_text(json.dumps(record["eval"], indent=2) + "\n")
    (work / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(work / "warmup-heads", ignore_errors=True)


def _heads_tensors(heads: MedusaHeads) -> dict[str, torch.Tensor]:
    return {"medusa_head." + k.removeprefix("blocks."): v.detach().cpu().contiguous()
            for k, v in heads.state_dict().items() if k.startswith("blocks.")}


def _peft():
    try:
        import peft
    except ImportError:
        raise InputError("--mode medusa2 with LoRA needs peft: pip install 'medusa-export[train]' "
                         "(or --lora-rank 0 for full fine-tuning)") from None
    return peft


def _check_lora_targets(model, targets: str) -> None:
    names = {name.rsplit(".", 1)[-1] for name, mod in model.model.layers.named_modules() if isinstance(mod, nn.Linear)}
    unknown = [t for t in targets.split(",") if t not in names]
    if unknown or not targets:
        raise InputError(f"LoRA target(s) {', '.join(unknown) or '(none)'} are not linear layers of this "
                         f"{model.config.model_type} model: choose from {', '.join(sorted(names))}")


def _check_heads_model(heads: MedusaHeads, identity: dict, path: str) -> None:
    trained_for = heads.config.base_model
    if trained_for and identity.get("name") and trained_for != identity["name"]:
        raise HeadsError(f"heads {path} were trained for {trained_for!r}, not {identity['name']!r}: "
                         "warm up on this model (omit --init-heads) or pass its own heads")
