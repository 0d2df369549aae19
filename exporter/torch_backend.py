"""The PyTorch reference backend: the same `StepModel` the ONNX graph is traced from, run eagerly.

    backend = TorchBackend.from_source(None, heads="heads/smollm2")      # default model, CPU
    backend = TorchBackend.from_source(None, device="cuda")               # static buffers on the GPU

Other backends are checked against this one.
"""

from __future__ import annotations

import numpy as np
import torch

from medusa_export.runtime.backends.base import Backend, KVCache, ModelDims, Session, StepOutput, MaskBuffer
from medusa_export.runtime.errors import BackendUnavailableError

from .heads import MedusaHeads
from .step_model import StepModel

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def model_dims(config, heads: MedusaHeads | None, head_topk: int, sample_topk: int, dtype: str = "float32") -> ModelDims:
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
    )


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model, heads: MedusaHeads | None, *, max_seq: int = 2048, head_topk: int = 10,
                 sample_topk: int = 32, device: str = "cpu") -> None:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailableError("--device cuda asked for, but PyTorch sees no CUDA device: use --device cpu")
        self.device = torch.device(device)
        model = model.to(self.device).eval()
        if heads is not None:
            heads = heads.to(self.device).eval()
        self.medusa_step = StepModel(model, heads, head_topk, sample_topk) if heads is not None else None
        self.base_step = StepModel(model, None, head_topk, sample_topk)
        self.dims = model_dims(model.config, heads, head_topk, sample_topk)
        self.max_seq = max_seq

    @classmethod
    def from_source(cls, source=None, heads=None, **kw) -> "TorchBackend":
        from .heads_source import resolve_heads
        from .model_loading import load_base_model

        loaded = load_base_model(source)
        backend = cls(loaded.model, resolve_heads(heads, loaded).heads, **kw)
        backend.loaded = loaded
        return backend

    def new_session(self, capacity: int | None = None) -> Session:
        return TorchSession(self, capacity or self.max_seq)


class TorchSession(Session):
    def __init__(self, backend: TorchBackend, capacity: int) -> None:
        self.backend = backend
        dev, dt = backend.device, _TORCH_DTYPES[backend.dims.dtype]
        self.kv = KVCache(backend.dims, capacity, alloc=lambda s: torch.zeros(s, dtype=dt, device=dev))
        self.capacity = capacity
        self.masks = MaskBuffer()

    @property
    def length(self) -> int:
        return self.kv.length

    @torch.inference_mode()
    def run(self, input_ids, position_ids, tree_mask, medusa, temperature) -> StepOutput:
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
        n_red = 5 if medusa else 4
        for dst, src in zip(self.kv.stage(t), outs[n_red:]):
            dst.copy_(src)
        host = [o[0].cpu().numpy() for o in outs[:n_red]]
        return StepOutput(host[0], host[1], host[2], host[3], host[4] if medusa else None)

    def keep(self, rows) -> None:
        self.kv.keep(rows)
