"""Several processes on one training run (``torchrun`` / ``accelerate launch``): set-up, a rank's share of the
work, gradient averaging, and a check that the ranks still hold the same weights.

    rank, world, device, owned = setup_distributed("auto")
    ...; loss.backward(); average_gradients(params, world); opt.step()
    assert_in_sync(params, world)                   # before rank 0 writes what it trained
    end_distributed(world, owned)

``WORLD_SIZE`` unset or 1: a single process, every helper a no-op. NCCL on CUDA, gloo on CPU. Rank 0 alone
evaluates and writes while the others wait at their next collective, so the group's timeout is generous
(``MEDUSA_DIST_TIMEOUT_S``, default 2 h). Ranks read what rank 0 wrote (warm-up heads, checkpoints): the
output and cache directories must be on a filesystem every rank sees.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch

from medusa_export.runtime.errors import InputError, TrainingError, first_line


def setup_distributed(device: str = "auto") -> tuple[int, int, torch.device, bool]:
    """(rank, world size, this rank's device, whether this call created the process group: its owner ends it).
    ``device``: auto | cpu | cuda (the options checked the name)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: this PyTorch sees no CUDA device (install a CUDA build of torch, or use --device cpu)")
    world = _env_number("WORLD_SIZE", 1, int)
    if world <= 1:
        return 0, 1, torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"), False
    import torch.distributed as dist

    local = _env_number("LOCAL_RANK", 0, int)
    if local < 0:
        raise _launcher_error("LOCAL_RANK", local, "0 or more")
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    owned = not dist.is_initialized()
    if owned:
        seconds = _env_number("MEDUSA_DIST_TIMEOUT_S", 7200.0, float)
        if not 0 < seconds <= MAX_TIMEOUT_S:
            raise InputError(f"MEDUSA_DIST_TIMEOUT_S={seconds:g}: give seconds in (0, {MAX_TIMEOUT_S}], or unset it "
                             f"for 7200")
        _check_launcher_numbers(world)
        try:
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(seconds=seconds))
        except ValueError as e:  # torch's launcher variables missing or odd (RANK, MASTER_ADDR, MASTER_PORT)
            raise InputError(f"the distributed run cannot start ({first_line(e, 160)}): launch it with "
                             f"torchrun or accelerate, which set RANK, MASTER_ADDR and MASTER_PORT") from None
    return dist.get_rank(), dist.get_world_size(), dev, owned


MAX_TIMEOUT_S = 7 * 86400.0  # a week: timedelta and the backends take no more sensibly


def _env_number(name: str, default, kind):
    """Environment variable ``name`` as ``kind`` (int or float), ``default`` when unset; an InputError naming it."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return kind(text)
    except ValueError:
        raise InputError(f"{name}={text[:40]!r} is not {'an integer' if kind is int else 'a number'}: set it as the "
                         f"launcher does (torchrun, accelerate), or unset it") from None


def _check_launcher_numbers(world: int) -> None:
    """torch's own RANK / MASTER_PORT, when set, as numbers it can use: its errors name neither variable, and a
    RANK at or past WORLD_SIZE waited for the group's timeout (2 h by default) before failing."""
    rank = _env_number("RANK", 0, int)
    if not 0 <= rank < world:
        raise _launcher_error("RANK", rank, f"0 or more and below WORLD_SIZE={world}")
    port = _env_number("MASTER_PORT", 29500, int)
    if not 0 < port < 65536:
        raise _launcher_error("MASTER_PORT", port, "a port, 1-65535")


def _launcher_error(name: str, value: int, what: str) -> InputError:
    return InputError(f"{name}={value}: it must be {what}; set it as the launcher does (torchrun, accelerate), or "
                      f"unset it")


def end_distributed(world: int, owned: bool) -> None:
    if world > 1 and owned:
        torch.distributed.destroy_process_group()


def barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def rank_share(items: list, rank: int, world: int) -> list:
    """Rank r's items r, r + world, ...; every rank gets the same count (the short ones wrap around), so all
    ranks run the same number of steps and no collective waits for a rank that has finished."""
    if world <= 1:
        return items
    steps = -(-len(items) // world)
    return [items[(rank + world * s) % len(items)] for s in range(steps)]


def _buckets(tensors: list[torch.Tensor], elements: int) -> list[list[torch.Tensor]]:
    """Consecutive groups of at most ``elements`` values (one tensor alone when it is larger)."""
    groups: list[list[torch.Tensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.numel() > elements:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.numel()
    return [g for g in groups if g]


def average_gradients(params: list[torch.Tensor], world: int, bucket_elements: int = 1 << 24) -> None:
    """Mean of every rank's gradient, in place: the data-parallel step. One all-reduce per flat bucket of at
    most ``bucket_elements`` values (few calls, bounded extra memory even for full fine-tuning)."""
    if world <= 1:
        return
    for group in _buckets([p.grad for p in params if p.grad is not None], bucket_elements):
        flat = torch.cat([g.reshape(-1) for g in group])
        torch.distributed.all_reduce(flat)
        flat /= world
        offset = 0
        for g in group:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def average_values(values: torch.Tensor, world: int) -> torch.Tensor:
    """The ranks' mean of a small tensor (the logged losses of one step)."""
    if world <= 1:
        return values
    values = values.detach().clone().float()
    torch.distributed.all_reduce(values)
    return values / world


def broadcast_parameters(params: list[torch.Tensor], world: int) -> None:
    """Rank 0's values everywhere (freshly initialised adapters must start equal on every rank)."""
    if world <= 1:
        return
    with torch.no_grad():
        for p in params:
            torch.distributed.broadcast(p.data, 0)


def assert_in_sync(params: list[torch.Tensor], world: int) -> None:
    """TrainingError when the ranks' weights differ (gradients not averaged, a rank on other data, ...)."""
    if world <= 1:
        return
    with torch.no_grad():  # two checksums per tensor (plain and position-weighted sums), no copy of the weights
        sums = [torch.stack([p.double().sum(), (p.double().reshape(-1) * _ramp(p)).sum()]) for p in params]
    agree(torch.cat(sums), world, "the ranks ended with different weights: a rank skipped the gradient average "
                                  "(run every rank with the same command and data)")


def _ramp(p: torch.Tensor) -> torch.Tensor:
    return torch.linspace(1.0, 2.0, p.numel(), dtype=torch.float64, device=p.device)


def agree(values: torch.Tensor, world: int, problem: str) -> None:
    """TrainingError(``problem``) unless every rank holds the same ``values`` (a position to resume at, a count)."""
    if world <= 1:
        return
    values = torch.as_tensor(values, dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":  # NCCL reduces device tensors only
        values = values.cuda()
    lo, hi = values.clone(), values.clone()
    torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise TrainingError(f"{world} ranks: {problem}")
