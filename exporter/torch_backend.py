"""The PyTorch reference backend: the same `StepModel` the ONNX graph is traced from, run eagerly.

    loaded = load_base_model(None)                                        # default model
    backend = TorchBackend(loaded.model, resolve_heads(None, loaded).heads, device="cpu")   # or "cuda"

Other backends are checked against this one.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from medusa_export.runtime import io_table
from medusa_export.runtime.backends.base import (Backend, KVCache, MaskBuffer, ModelDims, Session, StepOutput,
                                                 runtime_closed)
from medusa_export.runtime.errors import BackendUnavailableError, first_line
from medusa_export.runtime.machine import available_ram

from .heads import MedusaHeads
from .model_checks import check_length_effects
from .step_model import StepModel

def model_dims(config, heads: MedusaHeads | None, head_topk: int, sample_topk: int, dtype: str = "float32",
               kv_dtype: str | None = None) -> ModelDims:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return ModelDims(
        num_layers=config.num_hidden_layers,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=head_dim,
        vocab_size=config.vocab_size,
        num_heads=heads.config.num_heads if heads is not None else 0,
        head_topk=head_topk,
        sample_topk=sample_topk,
        dtype=dtype,
        kv_dtype=kv_dtype,
    )


def check_torch_device(device: str) -> None:
    """BackendUnavailableError (one line) unless this PyTorch can run on ``device`` (cpu, cuda[:N], mps, xpu[:N]):
    torch's own errors for a device it was built without are an AssertionError or a RuntimeError, raised late."""
    kind, colon, index = device.partition(":")
    if kind == "cpu" and not colon:
        return
    modules = {"cuda": torch.cuda, "xpu": getattr(torch, "xpu", None), "mps": getattr(torch.backends, "mps", None)}
    if kind not in modules or (colon and (kind == "mps" or not index.isdigit())):
        raise BackendUnavailableError(f"unknown device {device!r:.40}: choose cpu, cuda or cuda:N, mps, xpu or xpu:N")
    module = modules[kind]
    available = module is not None and module.is_available()
    count = 0 if not available else 1 if kind == "mps" else module.device_count()
    if count == 0:
        raise BackendUnavailableError(f"--device {device}: this PyTorch sees no {kind} device (a build of torch "
                                      f"for it, and its driver, are needed): use --device cpu")
    if index and int(index) >= count:
        raise BackendUnavailableError(f"--device {device}: this PyTorch sees {count} {kind} device(s), numbered from "
                                      f"0: give one of them")


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model, heads: MedusaHeads | None, *, max_seq: int = 2048, head_topk: int = 10,
                 sample_topk: int = 32, device: str = "cpu") -> None:
        check_torch_device(device)
        # The steps attend to the whole context with fixed rotary frequencies (`StepModel`): a sliding window or dynamic
        # RoPE taking effect within max_seq is refused
        check_length_effects(model.config, max_seq)
        self.device = torch.device(device)
        model = model.to(self.device).eval()
        if heads is not None:
            heads = heads.to(self.device).eval()
        self.medusa_step = StepModel(model, heads, head_topk, sample_topk) if heads is not None else None
        self.base_step = StepModel(model, None, head_topk, sample_topk)
        self.dims = model_dims(model.config, heads, head_topk, sample_topk)
        self.max_seq = max_seq

    _closed = False  # set by `close`: a closed runtime refuses requests on every backend alike

    def new_session(self, capacity: int | None = None) -> Session:
        if self._closed:
            raise runtime_closed()
        return TorchSession(self, capacity or self.max_seq)

    def close(self) -> None:
        """Refuse new requests from now on (the model itself is freed by torch once nothing holds it)."""
        self._closed = True


def _check_fits(nbytes: int, device: torch.device, capacity: int) -> None:
    """BackendUnavailableError when a KV cache of ``nbytes`` cannot fit the memory free on ``device``: torch zeroes
    every byte at once, and past the machine's memory the kernel's out-of-memory killer ends the process."""
    if device.type == "cuda":  # free on the device, plus what torch freed but keeps cached for reuse
        free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - \
            torch.cuda.memory_allocated(device)
    else:
        free = available_ram()
    if free is not None and nbytes > free:
        raise BackendUnavailableError(f"a KV cache of {capacity} tokens takes {nbytes / 2**20:.0f} MiB but "
                                      f"{free / 2**20:.0f} MiB are free on {device}: lower --max-seq (max_seq)")


def _zeros(shape, dtype, device):
    """A zeroed KV buffer; BackendUnavailableError (one line) when the memory is not there: torch raises a
    RuntimeError (CPU) or OutOfMemoryError (CUDA) with pages of text."""
    try:
        return torch.zeros(shape, dtype=dtype, device=device)
    except RuntimeError as e:  # torch.OutOfMemoryError is one too
        nbytes = math.prod(shape) * dtype.itemsize
        raise BackendUnavailableError(f"cannot reserve {nbytes / 2**20:.0f} MiB for a layer's KV buffer on {device} "
                                      f"({first_line(e, 100)}): lower --max-seq (max_seq)") from None


class TorchSession(Session):
    def __init__(self, backend: TorchBackend, capacity: int) -> None:
        self.backend = backend
        dev, dt = backend.device, getattr(torch, backend.dims.dtype)
        d = backend.dims
        _check_fits(2 * d.num_layers * capacity * d.num_kv_heads * d.head_dim * dt.itemsize, dev, capacity)
        self.kv = KVCache(d, capacity, alloc=lambda s: _zeros(s, dt, dev))
        self.capacity = capacity
        self.masks = MaskBuffer()

    @property
    def length(self) -> int:
        return self.kv.length

    @property
    def kv_bytes(self) -> int:
        return self.kv.nbytes

    @torch.inference_mode()
    def run(self, input_ids, position_ids, tree_mask, medusa, temperature, out_rows=None) -> StepOutput:
        # out_rows: every row is computed and returned (see `Session.run`)
        b = self.backend
        step = b.medusa_step if medusa else b.base_step
        if step is None:
            raise ValueError("this backend has no Medusa heads: run with medusa=False")
        dev = b.device
        t = len(input_ids)
        mask = self.masks.build(self.kv.length, tree_mask)
        outs = step(
            torch.as_tensor(input_ids, device=dev).view(1, t),
            torch.as_tensor(np.asarray(position_ids, np.int64), device=dev).view(1, t),
            torch.as_tensor(mask, device=dev),
            torch.tensor([temperature], dtype=torch.float32, device=dev),
            *self.kv.past(),
        )
        named = dict(zip(io_table.output_names(b.dims.num_layers, medusa), outs))
        for dst, name in zip(self.kv.stage(t), io_table.kv_names(b.dims.num_layers, "present")):
            dst.copy_(named[name])
        return StepOutput.from_named({n: named[n][0].cpu().numpy() for n in io_table.reduced_names(medusa)})

    def keep(self, rows) -> None:
        self.kv.keep(rows)

    def reset(self) -> None:
        """A new sequence in the same buffers: the batched engine reuses a slot's session instead of allocating
        a second cache beside the old one (rows past the length are never read: the mask stops at it)."""
        self.kv.reset()
