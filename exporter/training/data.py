"""Self-distillation data for Medusa heads: the base model's own answers, with their hidden states.

    prompts = read_prompts("train_prompts.jsonl")
    data = distill(model, tokenizer, prompts, "work-cache/distill", DistillConfig(max_new_tokens=192))
    data.hidden   # [N, H] float16: final-norm hidden state H_j of every generated position
    data.tokens   # [N] int64: token g_j that the base model chose from H_j (greedy by default)
    data.seq_lens, data.prompt_index   # one entry per answer; positions are stored answer after answer

Why this way: heads must imitate the base model, so the targets are the model's own outputs; the hidden
states are captured while generating (no second forward pass). Batches are left-padded and KV-cached,
finished rows leave the batch at once (``DynamicCache.batch_select_indices``) so no compute is spent on
them. Every batch becomes one shard on disk, written atomically: an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from medusa_export.runtime.errors import InputError
from medusa_export.runtime.prompts import read_prompts

CACHE_FORMAT = "medusa-export-distill-v1"


@dataclass
class DistillConfig:
    max_new_tokens: int = 192
    batch_size: int = 32
    temperature: float = 0.0  # 0: greedy (what decoding verifies against); > 0: sampled answers
    seed: int = 0
    max_prompt_tokens: int = 1024  # longer prompts are skipped (counted in the index)


@dataclass
class DistilledData:
    hidden: np.ndarray  # [N, H] float16
    tokens: np.ndarray  # [N] int64
    seq_lens: np.ndarray  # [S] int64
    prompt_index: np.ndarray  # [S] int64: line order of the prompt in the data file
    stats: dict = field(default_factory=dict)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_key(data_sha256: str, model_id: str, cfg: DistillConfig) -> str:
    """Shards are only reused for the same prompts, model and generation settings."""
    blob = json.dumps({"format": CACHE_FORMAT, "data": data_sha256, "model": model_id, **asdict(cfg)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def distill(model, tokenizer, prompts: list[str], cache_dir: str | Path, cfg: DistillConfig,
            data_sha256: str = "", model_id: str = "", progress: Callable[[int, int], None] | None = None,
            collect: bool = True) -> DistilledData | None:
    """Generate (or reuse) every shard under ``cache_dir/<key>`` and return all of them concatenated."""
    key = cache_key(data_sha256, model_id, cfg)
    root = Path(cache_dir) / key
    root.mkdir(parents=True, exist_ok=True)
    encoded = [tokenizer.encode_prompt(p) for p in prompts]
    keep = [i for i, ids in enumerate(encoded) if 0 < len(ids) <= cfg.max_prompt_tokens]
    # Similar lengths in one batch: little padding. The order is deterministic, so shard i is always batch i.
    keep.sort(key=lambda i: (len(encoded[i]), i))
    batches = [keep[i:i + cfg.batch_size] for i in range(0, len(keep), cfg.batch_size)]
    index = {"format": CACHE_FORMAT, "key": key, "data_sha256": data_sha256, "model": model_id, "config": asdict(cfg),
             "prompts": len(prompts), "skipped_long_prompts": len(prompts) - len(keep), "shards": len(batches)}
    (root / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    eos = set(tokenizer.eos_token_ids)
    gen_s, gen_tokens, fresh = 0.0, 0, 0
    for b, rows in enumerate(batches):
        shard = root / f"shard_{b:05d}.npz"
        if not shard.exists() and _claim(shard):
            try:
                t0 = time.perf_counter()
                out = generate_batch(model, [encoded[i] for i in rows], eos, cfg, seed=cfg.seed * 100003 + b)
                gen_s += time.perf_counter() - t0
                gen_tokens += int(out["seq_lens"].sum())
                fresh += 1
                _save_shard(shard, prompt_index=np.asarray(rows, np.int64), **out)
            finally:
                _lock(shard).unlink(missing_ok=True)
        if progress is not None:
            progress(b + 1, len(batches))
    if not collect:
        return None
    _wait_for_others(root, len(batches))
    data = _load_shards(root, len(batches))
    data.stats = {**index, "cache_dir": str(root), "positions": int(len(data.tokens)), "answers": int(len(data.seq_lens)),
                  "generated_now_batches": fresh, "generated_now_tokens": gen_tokens,
                  "generation_tokens_per_s": round(gen_tokens / gen_s, 2) if gen_s else None}
    return data


@torch.inference_mode()
def generate_batch(model, prompts: list[list[int]], eos: set[int], cfg: DistillConfig, seed: int = 0) -> dict:
    """KV-cached batched decoding of left-padded prompts, recording (H_j, g_j) for every new token."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    lm_head = model.get_output_embeddings()
    B, L = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, L - len(p):] = torch.tensor(p)
        mask[r, L - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    h = model.model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True).last_hidden_state[:, -1]
    next_pos = pos[:, -1] + 1
    gen = torch.Generator(device="cpu").manual_seed(seed)
    alive = torch.arange(B)  # original row of every row still in the batch
    hid: list[list[torch.Tensor]] = [[] for _ in range(B)]
    tok: list[list[int]] = [[] for _ in range(B)]
    for step in range(cfg.max_new_tokens):
        logits = lm_head(h).float()  # [b, V]
        nxt = _choose(logits, cfg.temperature, gen)
        h16, nxt_l = h.to(torch.float16).cpu(), nxt.tolist()
        done = []
        for r, orig in enumerate(alive.tolist()):
            hid[orig].append(h16[r])
            tok[orig].append(nxt_l[r])
            done.append(nxt_l[r] in eos or step == cfg.max_new_tokens - 1)
        done_t = torch.tensor(done)
        if bool(done_t.all()):
            break
        if bool(done_t.any()):
            keep = (~done_t).nonzero().squeeze(1)
            cache.batch_select_indices(keep.to(device))
            alive, mask, next_pos, nxt = alive[keep], mask[keep.to(device)], next_pos[keep.to(device)], nxt[keep.to(device)]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        h = model.model(input_ids=nxt.view(-1, 1), attention_mask=mask, position_ids=next_pos.view(-1, 1),
                        cache=cache, use_cache=True).last_hidden_state[:, 0]
        next_pos = next_pos + 1
    return {
        "hidden": torch.stack([x for row in hid for x in row]).numpy(),
        "tokens": np.asarray([t for row in tok for t in row], np.int64),
        "seq_lens": np.asarray([len(row) for row in tok], np.int64),
    }


def _choose(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.cpu() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(1).to(logits.device)


def _lock(shard: Path) -> Path:
    return shard.with_suffix(".lock")


def _claim(shard: Path) -> bool:
    """Take a shard for this process; several processes can fill one cache (``distill_worker``) in parallel.

    A lock left by a dead process (same machine) is taken over, so a killed run still resumes.
    """
    lock = _lock(shard)
    for _ in range(2):
        try:
            with open(lock, "x") as f:
                f.write(str(os.getpid()))
            return True
        except FileExistsError:
            try:
                pid = int(lock.read_text() or "0")
                os.kill(pid, 0)
                return False  # alive: another worker is on it
            except (ValueError, ProcessLookupError, FileNotFoundError):
                lock.unlink(missing_ok=True)
            except PermissionError:
                return False
    return False


def _wait_for_others(root: Path, n: int, poll_s: float = 2.0) -> None:
    """Shards claimed by another live worker: wait for them; if a worker died, its shard is missing -> error."""
    while True:
        missing = [b for b in range(n) if not (root / f"shard_{b:05d}.npz").exists()]
        if not missing:
            return
        locks = [_lock(root / f"shard_{b:05d}.npz") for b in missing]
        if not any(lk.exists() for lk in locks):
            raise InputError(f"self-distillation shards {missing[:5]} in {root} are missing: rerun to generate them")
        time.sleep(poll_s)


def distill_worker(model_source, data_file: str | Path, cache_dir: str | Path, cfg: DistillConfig) -> None:
    """A second generator process for the same cache (``python -m ...data <data> <cache> <max_new> <bs>``)."""
    from medusa_export.exporter.model_loading import load_base_model

    loaded = load_base_model(model_source)
    distill(loaded.model, loaded.tokenizer, read_prompts(data_file), cache_dir, cfg, file_sha256(data_file),
            model_identity(loaded.identity), collect=False)


def model_identity(identity: dict) -> str:
    return f"{identity.get('name', '')}@{identity.get('sha256_16', '')}"


def _save_shard(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def _load_shards(root: Path, n: int) -> DistilledData:
    parts = [np.load(root / f"shard_{b:05d}.npz") for b in range(n)]
    cat = lambda k: np.concatenate([p[k] for p in parts])  # noqa: E731
    return DistilledData(cat("hidden"), cat("tokens"), cat("seq_lens"), cat("prompt_index"))


if __name__ == "__main__":
    import sys

    torch.set_num_threads(int(os.environ.get("MEDUSA_TRAIN_THREADS", "1")))
    # argv: data_file cache_dir max_new_tokens batch_size [temperature seed]: the values train_heads uses.
    data_file, cache_dir, max_new, bs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    temp, seed = (float(sys.argv[5]), int(sys.argv[6])) if len(sys.argv) > 6 else (0.0, 0)
    distill_worker(None, data_file, cache_dir, DistillConfig(max_new_tokens=max_new, batch_size=bs,
                                                             temperature=temp, seed=seed))
