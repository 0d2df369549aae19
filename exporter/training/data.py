"""Self-distillation data for Medusa heads: the base model's own answers, with their hidden states.

    prompts = read_prompts("train_prompts.jsonl")
    data = distill(model, tokenizer, prompts, "work-cache/distill", DistillConfig(max_new_tokens=192))
    data.hidden   # [N, H] float16: final-norm hidden state H_j of every generated position
    data.tokens   # [N] int64: token g_j that the base model chose from H_j (greedy by default)
    data.seq_lens, data.prompt_index   # one entry per answer; positions are stored answer after answer

Why this way: heads must imitate the base model, so the targets are the model's own outputs; the hidden
states are captured while generating (no second forward pass). Llama-family models run on a static KV cache
with continuous batching (``static_decoder``, ``continuous_batching``); others on the transformers forward
with left-padded batches (``generate_batch``). Prompts are grouped into shards of ``shard_size``, each written
atomically once its last answer is in: an interrupted run resumes without repeating finished shards.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, NoReturn

import numpy as np
import torch

from medusa_export.runtime.errors import CheckpointError, InputError

from ..hf_compat import cache_kwargs
from .continuous_batching import answer_all
from .static_decoder import StaticDecoder, unsupported

CACHE_FORMAT = "medusa-export-distill-v2"
_SHARD_ARRAYS = ("hidden", "tokens", "seq_lens", "prompt_index")
_NO_RESUME = "--no-resume to generate the distillation cache again"


@dataclass
class DistillConfig:
    max_new_tokens: int = 192
    batch_size: int = 64  # rows decoded together (static engine: cache slots, refilled as answers end)
    temperature: float = 0.0  # 0: greedy (what decoding verifies against); > 0: sampled answers
    seed: int = 0
    max_prompt_tokens: int = 1024  # longer prompts are skipped (counted in the index)
    shard_size: int = 256  # prompts per shard on disk: the unit of resumption
    engine: str = "auto"  # "static" (preallocated KV cache, continuous batching), "hf" (transformers forward)


@dataclass
class DistilledData:
    hidden: np.ndarray  # [N, H] float16
    tokens: np.ndarray  # [N] int64
    seq_lens: np.ndarray  # [S] int64
    prompt_index: np.ndarray  # [S] int64: line order of the prompt in the data file
    stats: dict = field(default_factory=dict)


def cache_key(data_sha256: str, model_id: str, cfg: DistillConfig) -> str:
    """Shards are only reused for the same prompts, model and generation settings.

    Not in the key: batch size and engine, which change how fast answers come, not which (up to float
    rounding), so a run can resume with another batch size or on another device.
    """
    settings = {k: getattr(cfg, k) for k in ("max_new_tokens", "temperature", "seed", "max_prompt_tokens", "shard_size")}
    blob = json.dumps({"format": CACHE_FORMAT, "data": data_sha256, "model": model_id, **settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def distill(model, tokenizer, prompts: list[str], cache_dir: str | Path, cfg: DistillConfig,
            data_sha256: str = "", model_id: str = "", progress: Callable[[int, int], None] | None = None,
            collect: bool = True, worker: tuple[int, int] = (0, 1)) -> DistilledData | None:
    """Generate (or reuse) every shard under ``cache_dir/<key>`` and return all of them concatenated.

    ``worker=(r, n)``: generate only shards r, r + n, ... (several processes sharing one cache directory).
    """
    key = cache_key(data_sha256, model_id, cfg)
    root = Path(cache_dir) / key
    encoded = [tokenizer.encode_prompt(p) for p in prompts]
    keep = [i for i, ids in enumerate(encoded) if 0 < len(ids) <= cfg.max_prompt_tokens]
    if not keep:
        raise InputError(f"none of the {len(prompts)} prompts has 1 to {cfg.max_prompt_tokens} tokens under the chat "
                         f"template: pass shorter prompts, or a smaller --max-new-tokens (prompt and answer share the "
                         f"model's positions)")
    _make_root(root)
    # Similar lengths side by side: little padding in prefill and short attention spans per step. The order is
    # deterministic, so shard b always holds the same prompts.
    keep.sort(key=lambda i: (len(encoded[i]), i))
    shards = [keep[i:i + cfg.shard_size] for i in range(0, len(keep), cfg.shard_size)]
    index = {"format": CACHE_FORMAT, "key": key, "data_sha256": data_sha256, "model": model_id, "config": asdict(cfg),
             "prompts": len(prompts), "skipped_long_prompts": len(prompts) - len(keep), "shards": len(shards)}
    _write_index(root / "index.json", index)
    missing = [b for b in range(len(shards)) if not _shard_path(root, b).exists()]
    todo = [b for b in missing if b % worker[1] == worker[0]]
    done_prompts = len(keep) - sum(len(shards[b]) for b in missing)
    if progress is not None:
        progress(done_prompts, len(keep))
    t0 = time.perf_counter()
    fresh = _generate_shards(model, tokenizer, encoded, [(b, shards[b]) for b in todo], root, cfg,
                             progress=(lambda n: progress(done_prompts + n, len(keep))) if progress else None)
    gen_s = time.perf_counter() - t0
    if not collect:
        return None
    absent = [b for b in range(len(shards)) if not _shard_path(root, b).exists()]
    if absent:
        raise InputError(f"self-distillation shards {absent[:5]} are missing from {root}: rerun to generate them")
    lm_head = model.get_output_embeddings().weight
    data = _load_shards(root, shards, width=lm_head.shape[1], vocab=lm_head.shape[0])
    timed = data.stats.pop("generation_s", None)
    data.stats = {**index, "cache_dir": str(root), "positions": int(len(data.tokens)), "answers": int(len(data.seq_lens)),
                  "generated_now_shards": len(todo), "generated_now_tokens": fresh,
                  "device": str(next(model.parameters()).device.type),
                  "generation_tokens_per_s": round(fresh / gen_s, 2) if fresh else None,
                  # over every shard that recorded its time (all of them, however many runs made them)
                  "all_shards_tokens_per_s": round(timed[1] / timed[0], 2) if timed and timed[0] > 0 else None}
    return data


def _generate_shards(model, tokenizer, encoded: list[list[int]], shards: list[tuple[int, list[int]]], root: Path,
                     cfg: DistillConfig, progress: Callable[[int], None] | None) -> int:
    """Answer every prompt of ``shards``; a shard is written (atomically) as soon as its last answer is in."""
    if not shards:
        return 0
    eos = set(tokenizer.eos_token_ids)
    order = [i for _, rows in shards for i in rows]
    shard_of = {i: b for b, rows in shards for i in rows}
    pending = {b: {} for b, _ in shards}
    rows_of = dict(shards)
    generated, since = 0, time.perf_counter()
    for n, (i, hidden, tokens) in enumerate(_answers(model, encoded, order, eos, cfg), start=1):
        b = shard_of[i]
        pending[b][i] = (hidden, tokens)
        generated += len(tokens)
        if len(pending[b]) == len(rows_of[b]):
            done = pending.pop(b)
            answers = [done[r] for r in rows_of[b]]
            _save_shard(_shard_path(root, b), hidden=np.concatenate([h for h, _ in answers]),
                        tokens=np.concatenate([t for _, t in answers]),
                        seq_lens=np.asarray([len(t) for _, t in answers], np.int64),
                        prompt_index=np.asarray(rows_of[b], np.int64),
                        # generation time since the previous shard: the rate survives interruptions
                        generation_s=np.float64(time.perf_counter() - since))
            since = time.perf_counter()
        if progress is not None:
            progress(n)
    return generated


def _answers(model, encoded: list[list[int]], order: list[int], eos: set[int], cfg: DistillConfig):
    """(prompt index, hidden, tokens) for every prompt in ``order``: static-cache engine where it applies."""
    seeds = [cfg.seed * 1_000_003 + i for i in order]  # per prompt: answers do not depend on batching
    if cfg.engine == "static" or (cfg.engine == "auto" and unsupported(model.config) is None):
        capacity = max(len(encoded[i]) for i in order) + cfg.max_new_tokens
        decoder = StaticDecoder(model, slots=min(cfg.batch_size, len(order)), capacity=capacity)
        lm_head = model.get_output_embeddings().weight
        for j, hidden, tokens in answer_all(decoder, lm_head, [encoded[i] for i in order], eos, cfg.max_new_tokens,
                                            cfg.temperature, seeds):
            yield order[j], hidden, tokens
        return
    for start in range(0, len(order), cfg.batch_size):
        rows = order[start:start + cfg.batch_size]
        out = generate_batch(model, [encoded[i] for i in rows], eos, cfg, seed=seeds[start])
        ends = np.cumsum(out["seq_lens"])
        for r, i in enumerate(rows):
            lo = ends[r] - out["seq_lens"][r]
            yield i, out["hidden"][lo:ends[r]], out["tokens"][lo:ends[r]]


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
    h = model.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                    **cache_kwargs(model.model, cache)).last_hidden_state[:, -1]
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
                        use_cache=True, **cache_kwargs(model.model, cache)).last_hidden_state[:, 0]
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


def _shard_path(root: Path, b: int) -> Path:
    return root / f"shard_{b:05d}.npz"


def model_identity(identity: dict) -> str:
    return f"{identity.get('name', '')}@{identity.get('sha256_16', '')}"


def discard_cache(cache_dir: str | Path, cfg: DistillConfig, data_sha256: str = "", model_id: str = "") -> None:
    """Remove this run's shards (its key's directory only, never the rest of ``cache_dir``): ``--no-resume``
    generates every answer again, and replaces a damaged cache whatever is in it."""
    root = Path(cache_dir) / cache_key(data_sha256, model_id, cfg)
    try:
        if root.is_dir() and not root.is_symlink():
            shutil.rmtree(root)
        elif root.exists() or root.is_symlink():
            root.unlink()
    except OSError as e:
        raise CheckpointError(f"cannot remove the distillation cache {root} ({e.strerror}): delete it by hand") from None


def _make_root(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # the key's path is a file: not a cache this program wrote
        raise CheckpointError(f"distillation cache {root} is a file, not a directory: delete it, or rerun with "
                              f"{_NO_RESUME}") from None
    except OSError as e:
        raise InputError(f"cannot create the distillation cache {root} ({e.strerror}): pass another --cache-dir") from None


def _write_index(path: Path, index: dict) -> None:
    try:
        path.write_text(json.dumps(index, indent=2) + "\n")
    except OSError as e:
        raise CheckpointError(f"cannot write {path} ({e.strerror}): delete {path.parent}, or rerun with "
                              f"{_NO_RESUME}") from None


def _save_shard(path: Path, **arrays: np.ndarray) -> None:
    """Atomically: an interrupted write leaves a ``.tmp.npz``, never a torn shard."""
    tmp = path.with_name(path.stem + ".tmp.npz")
    try:
        np.savez(tmp, **arrays)
        tmp.replace(path)
    except OSError as e:
        raise CheckpointError(f"cannot write the distillation shard {path} ({e.strerror}): free disk space, delete "
                              f"{path.parent}, or rerun with {_NO_RESUME}") from None


def _load_shards(root: Path, shards: list[list[int]], width: int, vocab: int) -> DistilledData:
    """Every shard, checked against the prompts it must hold and the model's hidden size and vocabulary."""
    parts = [_load_shard(_shard_path(root, b), rows, width, vocab) for b, rows in enumerate(shards)]
    cat = lambda k: np.concatenate([p[k] for p in parts])  # noqa: E731
    data = DistilledData(cat("hidden"), cat("tokens"), cat("seq_lens"), cat("prompt_index"))
    if all("generation_s" in p for p in parts):  # (seconds, tokens) of the whole cache
        data.stats["generation_s"] = (sum(float(p["generation_s"]) for p in parts), int(len(data.tokens)))
    return data


def _load_shard(path: Path, rows: list[int], width: int, vocab: int) -> dict[str, np.ndarray]:
    """One shard's arrays, or a `CheckpointError` naming it: a torn, foreign or hand-made file must not crash
    deep in numpy nor train on another run's answers."""
    try:
        arrays = _read_npz(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        _bad_shard(path, _reason(e))
    problem = _shard_problem(arrays, rows, width, vocab)
    if problem:
        _bad_shard(path, problem)
    return arrays


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    loaded = np.load(path, allow_pickle=False)
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError("a single .npy array, not an .npz archive")
    with loaded:
        return {k: loaded[k] for k in loaded.files}


def _shard_problem(a: dict[str, np.ndarray], rows: list[int], width: int, vocab: int) -> str | None:
    """What is wrong with a shard's arrays (None: nothing)."""
    missing = [k for k in _SHARD_ARRAYS if k not in a]
    if missing:
        return f"no {', '.join(missing)} array"
    hidden, tokens, seq_lens, index = (a[k] for k in _SHARD_ARRAYS)
    if hidden.ndim != 2 or hidden.shape[1] != width or hidden.dtype.kind != "f":
        return f"hidden states of shape {hidden.shape} ({hidden.dtype}), not [positions, {width}] floats"
    if any(x.ndim != 1 or x.dtype.kind not in "iu" for x in (tokens, seq_lens, index)):
        return "tokens, seq_lens and prompt_index must be 1-D integer arrays"
    if not np.array_equal(index, rows):
        return "it holds other prompts than this run's (another run's shard)"
    if (seq_lens < 0).any() or int(seq_lens.sum()) != len(tokens) or len(tokens) != len(hidden):
        return "its answer lengths do not add up to its positions"
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= vocab):
        return f"tokens outside the model's vocabulary of {vocab}"
    if "generation_s" in a and (a["generation_s"].size != 1 or a["generation_s"].dtype.kind not in "fiu"):
        return "generation_s is not a number"
    return None


def _reason(e: Exception) -> str:
    """The error's first sentence: numpy's pickle refusal runs on for three lines."""
    text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return (text.split(". ")[0].splitlines() or [type(e).__name__])[0][:120]


def _bad_shard(path: Path, why: str) -> NoReturn:
    raise CheckpointError(f"distillation shard {path} cannot be read ({why}): delete it, or rerun with "
                          f"{_NO_RESUME}") from None
