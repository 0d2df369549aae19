"""The real default model (SmolLM2-135M-Instruct): greedy Medusa == greedy vanilla with varied heads;
model-loading errors (these need no model)."""

from __future__ import annotations

import json

import pytest

from medusa_export.runtime.errors import ModelError

PROMPTS = ("What is the capital of France?", "Write a short poem about the sea.", "List three prime numbers.")
N_NEW = 24


@pytest.fixture(scope="module")
def default_setup(default_model):
    torch = pytest.importorskip("torch")
    from medusa_export.exporter.heads import new_heads
    from medusa_export.exporter.torch_backend import TorchBackend

    model = default_model.model
    heads = new_heads(model.config, num_heads=4, layout="shared")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random resblocks: untrained heads that still propose varied tokens
        for blk in heads.blocks:
            for p in blk.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    backend = TorchBackend(model, heads, max_seq=256)
    prompts = [default_model.tokenizer.encode_prompt(p) for p in PROMPTS]
    return backend, prompts, default_model.tokenizer


@pytest.fixture(scope="module")
def vanilla(default_setup):
    from medusa_export.runtime.decode import DecodeStats, GenerationConfig, decode

    backend, prompts, _ = default_setup
    refs = []
    for ids in prompts:
        out = []
        for chunk in decode(backend.new_session(), ids, None, GenerationConfig(medusa=False), DecodeStats()):
            out += chunk
            if len(out) >= N_NEW:
                break
        refs.append(out[:N_NEW])
    return refs


@pytest.mark.slow
@pytest.mark.parametrize("spec, k", [("cpu_small_10", 4), ("chain-3", 3)])
def test_default_model_greedy_medusa_is_lossless(default_setup, vanilla, spec, k):
    from medusa_export.runtime.decode import GenerationConfig
    from medusa_export.runtime.generator import Generator
    from medusa_export.runtime.tree import Tree, load_choices

    backend, prompts, tokenizer = default_setup
    tree = Tree.from_choices(load_choices(spec), topk=10, num_heads=k)
    gen = Generator(backend, tokenizer, tree)
    # No EOS stop: compare exactly N_NEW tokens even if the model would end its answer.
    tokenizer_eos, tokenizer.eos_token_ids = tokenizer.eos_token_ids, ()
    try:
        for ids, ref in zip(prompts, vanilla):
            res = gen.generate(list(ids), GenerationConfig(max_new_tokens=N_NEW))
            assert res.token_ids == ref
            assert res.new_tokens == N_NEW and res.steps <= N_NEW
    finally:
        tokenizer.eos_token_ids = tokenizer_eos


@pytest.mark.slow
def test_default_model_heads_propose_varied_tokens(default_setup):
    import numpy as np

    backend, prompts, _ = default_setup
    session = backend.new_session()
    ids = np.asarray(prompts[0], np.int64)
    n = len(ids)
    out = session.run(ids, np.arange(n), np.tri(n, dtype=bool), True, 1.0)
    top1 = out.medusa_ids[-8:, :, 0]  # [8 positions, 4 heads]
    assert len(np.unique(top1)) > 8  # heads disagree with each other and across positions
    assert (out.medusa_ids[-1, :, 0] != out.next_ids[-1, 0]).any()


@pytest.mark.slow
def test_default_model_vanilla_matches_hf_greedy(default_model, vanilla, default_setup):
    torch = pytest.importorskip("torch")
    _, prompts, _ = default_setup
    ids = list(prompts[0])
    with torch.inference_mode():
        x = torch.tensor([ids])  # an explicit mask: without it generate masks every prompt token equal to pad_token_id
        out = default_model.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False,
                                           eos_token_id=None, pad_token_id=0)
    assert out[0, len(ids):].tolist() == vanilla[0][:8]


def test_unsupported_model_type(tmp_path):
    pytest.importorskip("transformers")
    from medusa_export.exporter.model_loading import load_base_model

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
    with pytest.raises(ModelError) as e:
        load_base_model(tmp_path)
    msg = str(e.value)
    assert "'gpt2'" in msg and all(t in msg for t in ("llama", "mistral", "qwen2"))


def test_nonexistent_model_path(tmp_path):
    from medusa_export.exporter.model_loading import load_base_model

    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelError) as e:
        load_base_model(missing)
    assert str(missing) in str(e.value) and "\n" not in str(e.value)


def test_directory_without_config(tmp_path):
    from medusa_export.exporter.model_loading import load_base_model

    with pytest.raises(ModelError, match="config.json"):
        load_base_model(tmp_path)
