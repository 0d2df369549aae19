"""Heads restricted to a draft vocabulary: same scores on the kept tokens, ids mapped back, lossless decoding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import TINY_PROMPTS, make_heads

from medusa_export.exporter.heads import load_heads, restrict_vocab, save_heads
from medusa_export.runtime.tree import Tree, load_choices
from medusa_export.runtime.build_options import BuildOptions  # noqa: E402

KEEP = torch.tensor([3, 5, 17, 42, 99, 100, 200, 250, 251, 300, 301, 302, 310])


@pytest.mark.parametrize("layout", ["shared", "own"])
def test_restricted_scores_equal_full_scores_on_kept_tokens(tiny_model, layout, tmp_path):
    heads = make_heads(tiny_model, 2, layout)
    small = restrict_vocab(heads, KEEP)
    h = torch.randn(3, 64)
    lm = tiny_model.get_output_embeddings()
    with torch.no_grad():
        full, part = heads(h, lm), small(h, lm)
    assert part.shape[-1] == len(KEEP)
    torch.testing.assert_close(part, full[..., KEEP])
    top = torch.topk(part, 3, dim=-1).indices
    assert set(small.to_token_ids(top).unique().tolist()) <= set(KEEP.tolist())
    again = load_heads(save_heads(small, tmp_path / "h"), tiny_model.config)
    assert torch.equal(again.draft_ids, small.draft_ids)


def test_restricted_heads_decode_losslessly(tiny):
    from medusa_export.exporter.torch_backend import TorchBackend

    heads = restrict_vocab(tiny.heads(3), torch.arange(0, 320, 2))
    backend = TorchBackend(tiny.model, heads, max_seq=128)
    tree = Tree.from_choices(load_choices("chain-3"), topk=10, num_heads=3)
    for prompt in TINY_PROMPTS:
        tokens, stats, _ = tiny.run(backend, prompt, tree, 20)
        assert tokens == tiny.reference(prompt, 20)
        out = backend.new_session().run(np.asarray(prompt), np.arange(len(prompt)), np.tri(len(prompt), dtype=bool),
                                        True, 1.0)
        assert np.all(out.medusa_ids % 2 == 0)  # only kept (even) ids are ever proposed


def test_resolve_heads_applies_draft_vocab_json(tiny_model, tmp_path):
    from types import SimpleNamespace

    from medusa_export.exporter.heads_source import resolve_heads

    path = save_heads(make_heads(tiny_model, 2), tmp_path / "h")
    loaded = SimpleNamespace(model=tiny_model, identity={"name": "tiny"})
    assert resolve_heads(str(path), loaded).heads.draft_ids is None
    (path / "draft_vocab.json").write_text(json.dumps({"size": 4, "ids": [1, 2, 3, 4]}))
    chosen = resolve_heads(str(path), loaded)
    assert chosen.heads.draft_ids.tolist() == [1, 2, 3, 4] and "draft vocabulary of 4" in chosen.description
    assert resolve_heads(str(path), loaded, draft_vocab=False).heads.draft_ids is None


def test_artifact_with_draft_vocab_heads_matches_torch(tiny_dirs, tmp_path):
    from medusa_export.exporter.build import build_artifact
    from medusa_export.runtime.api import MedusaRuntime
    from medusa_export.runtime.compare import compare_backends

    model_dir, heads_dir = tiny_dirs
    heads = tmp_path / "heads"
    heads.mkdir()
    for f in heads_dir.iterdir():
        (heads / f.name).write_bytes(f.read_bytes())
    (heads / "draft_vocab.json").write_text(json.dumps({"ids": list(range(1, 320, 3))}))
    out = tmp_path / "art"
    m = build_artifact(str(model_dir), out, BuildOptions(heads=str(heads), tree="chain-3", max_seq=96), log=lambda _m: None)
    assert json.loads((out / "heads" / "config.json").read_text())["draft_vocab_size"] == len(range(1, 320, 3))
    gens = {b: MedusaRuntime.load(out, backend=b, threads=1).generator for b in ("torch", "ort")}
    report = compare_backends(gens, ["t5 t6 t7", "t1 t2"], max_new_tokens=10)
    assert report["summary"]["ort"]["ok"], report
    assert m.heads.layout == "shared"
