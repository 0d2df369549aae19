"""Measure the graph-boundary choice: full logits out (base [T, V] + heads [T, K, V]) vs the in-graph
reduction the artifact uses (top-k ids, input-token probabilities, entropy).

    python scripts/measure_output_reduction.py [--tree-size 12] [--past 200] [--repeats 15]

Exports both variants of the default model's Medusa graph to a temp dir and times ONNX Runtime steps
at T = tree size, including the host-side work each variant leaves to the runtime (argmax / top-k in
numpy for the full-logits variant).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medusa_export.exporter.heads_source import resolve_heads
from medusa_export.exporter.hf_compat import cache_kwargs
from medusa_export.exporter.model_loading import load_base_model
from medusa_export.exporter.onnx_export import dummy_inputs
from medusa_export.exporter.step_model import StepModel
from script_io import run_main  # noqa: E402


class FullLogits(torch.nn.Module):
    """Same backbone and heads, but ships raw logits (what a naive export does)."""

    def __init__(self, step: StepModel) -> None:
        super().__init__()
        self.step = step

    def forward(self, input_ids, position_ids, attention_mask, temperature, *past):
        from transformers import DynamicCache

        s = self.step
        n = s.num_layers
        cache = DynamicCache(ddp_cache_data=[(past[2 * i].transpose(1, 2), past[2 * i + 1].transpose(1, 2))
                                             for i in range(n)], config=s.config)
        past_len = past[0].shape[1]
        hidden = s.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=True, **cache_kwargs(s.backbone, cache)).last_hidden_state
        new_kv = [t[:, :, past_len:].transpose(1, 2) for layer in cache.layers[:n] for t in (layer.keys, layer.values)]
        return (s.lm_head(hidden), s.heads(hidden, s.lm_head), *new_kv)  # same KV rows out as the real graph


def time_sessions(variants: dict[str, tuple[Path, object]], feed: dict, repeats: int) -> dict[str, float]:
    """Median ms per step (run + host post-processing) of each variant, runs interleaved so that
    machine noise (other processes, clock changes) hits every variant alike."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # Idle sessions' threads would otherwise spin and steal the cores from the one being timed.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = {}
    for name, (path, post) in variants.items():
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        own_feed = {i.name: feed[i.name] for i in sess.get_inputs()}  # full-logits graph: no temperature input
        sessions[name] = (sess, own_feed, post)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(repeats + 2):
        for name, (sess, own_feed, post) in sessions.items():
            t0 = time.perf_counter()
            post(sess.run(None, own_feed))
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    return {name: round(float(np.median(t)) * 1e3, 2) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree-size", type=int, default=12)
    ap.add_argument("--past", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    loaded = load_base_model(None)
    step = StepModel(loaded.model, resolve_heads(None, loaded).heads)
    names = [f"i{i}" for i in range(4 + 2 * step.num_layers)]
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        reduced, full = Path(tmp) / "reduced.onnx", Path(tmp) / "full.onnx"
        ex = dummy_inputs(step)
        for module, path in ((step, reduced), (FullLogits(step), full)):
            torch.onnx.export(module, ex, str(path), input_names=names, dynamo=False, opset_version=17,
                              dynamic_axes={n: {0: "b", 1: "t"} for n in names[:2]} | {
                                  names[2]: {0: "b", 2: "t", 3: "tot"}} | {n: {0: "b", 1: "p"} for n in names[4:]})
        x = dummy_inputs(step, t=args.tree_size, past=args.past)
        feed = {n: v[:1].numpy() for n, v in zip(names, x)}
        feed[names[3]] = x[3].numpy()
        ms = time_sessions({
            "reduced_in_graph_ms": (reduced, lambda o: o[0][0, :, 0]),
            "full_logits_ms": (full, lambda o: (o[0][0].argmax(-1), np.argpartition(-o[1][0], 10, axis=-1)[..., :10])),
        }, feed, args.repeats)
    print(json.dumps({"tree_size": args.tree_size, "past": args.past, **ms}))


if __name__ == "__main__":
    run_main(main)
