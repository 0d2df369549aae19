"""Config variants real checkpoints of the supported families have: each builds and decodes as PyTorch (greedy Medusa
equal to greedy vanilla equal to transformers' own greedy tokens), or is refused before the export in one line."""

from __future__ import annotations

import shutil

import pytest

torch = pytest.importorskip("torch")

from conftest import TINY_VOCAB, make_heads  # noqa: E402

from medusa_export.runtime.build_options import BuildOptions  # noqa: E402

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=TINY_VOCAB, max_position_embeddings=512, initializer_range=0.1)


def _save(tiny_dirs, directory, family: str = "llama", **settings):
    """A random 2-layer model of ``family`` with ``settings`` over the tiny config, its biases and norm weights moved
    off their initial 0 and 1 (so a graph that left them out would differ), saved with the tiny tokenizer; and its
    heads directory."""
    import transformers

    from medusa_export.exporter.heads import save_heads

    config_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                             "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
                             "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[family]
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**BASE, **settings})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn(p.shape) * 0.2)
    model.save_pretrained(directory / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_dirs[0] / name, directory / "model" / name)
    save_heads(make_heads(model, 2, seed=3), directory / "heads")
    return model, directory / "model", directory / "heads"


def _build_and_decode(model, model_dir, heads_dir, out, prompt, n: int = 8, **options) -> None:
    """Build, then assert greedy vanilla and greedy Medusa of the artifact equal transformers' greedy tokens."""
    from medusa_export.exporter.build import build_artifact
    from medusa_export.runtime.api import MedusaRuntime
    from medusa_export.runtime.decode import GenerationConfig

    options = BuildOptions(heads=str(heads_dir), tree="chain-2", corpus_drafts="none", **options)
    build_artifact(str(model_dir), out, options, log=lambda _m: None)
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    want = ids[len(prompt):]
    with MedusaRuntime.load(out, backend="ort") as rt:
        for medusa in (False, True):
            config = GenerationConfig(max_new_tokens=n, medusa=medusa, ignore_eos=True)
            assert list(rt.generator.generate(list(prompt), config).token_ids) == want, medusa


@pytest.mark.parametrize("family, settings", [
    ("mistral", dict(sliding_window=4096)),  # Mistral-7B-v0.1's window, far past --max-seq
    ("mistral", dict(sliding_window=33)),  # the smallest window past --max-seq 32
    ("qwen2", dict(use_sliding_window=True, sliding_window=4096, max_window_layers=1)),
])
def test_a_sliding_window_past_max_seq_builds_the_portable_graph(tiny_dirs, tmp_path, family, settings):
    """A window that never takes effect within --max-seq is full attention, and the fused graph built it; the
    portable graph failed its validation with an ONNX Runtime traceback (a Slice's "Shape mismatch attempting to
    re-use buffer"): the trace recorded transformers' sliding-window cache, which keeps only the window's rows."""
    model, model_dir, heads_dir = _save(tiny_dirs, tmp_path, family, **settings)
    _build_and_decode(model, model_dir, heads_dir, tmp_path / "out", list(range(1, 20)), max_seq=32, max_num_seqs=1,
                      graph="portable")


def test_the_pytorch_backend_refuses_a_sliding_window_within_its_context():
    """Its steps attend to the whole context, as the graphs do: a window taking effect within max_seq is refused
    (transformers' sliding-window cache made such a step fail, or return too few rows)."""
    import transformers

    from medusa_export.exporter.torch_backend import TorchBackend
    from medusa_export.runtime.errors import ModelError

    model = transformers.MistralForCausalLM(transformers.MistralConfig(**BASE, sliding_window=32)).eval()
    with pytest.raises(ModelError, match="sliding window of 32 tokens.*--max-seq 31 or less"):
        TorchBackend(model, None, max_seq=32)
    TorchBackend(model, None, max_seq=31)


@pytest.mark.parametrize("family, settings, graph", [
    ("llama", dict(attention_bias=True), "onnxruntime"),  # q, k, v and o biases
    ("llama", dict(head_dim=32, num_key_value_heads=1), "onnxruntime"),  # head_dim past hidden / heads, one KV head
    ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True), "onnxruntime"),  # MHA, tied lm_head
    ("qwen2", dict(tie_word_embeddings=True, use_sliding_window=False, sliding_window=8), "onnxruntime"),
    ("mistral", dict(head_dim=32, sliding_window=None), "onnxruntime"),
    ("llama", dict(attention_bias=True, mlp_bias=True), "portable"),  # the fused graph refuses MLP biases
    ("llama", dict(hidden_act="gelu_pytorch_tanh"), "portable"),  # and other activations than SiLU
    ("llama", dict(vocab_size=TINY_VOCAB - 3, rms_norm_eps=1e-12), "onnxruntime"),
])
def test_model_variants_decode_as_pytorch(tiny_dirs, tmp_path, family, settings, graph):
    model, model_dir, heads_dir = _save(tiny_dirs, tmp_path, family, **settings)
    if model.config.vocab_size < TINY_VOCAB:  # the tokenizer's words within the vocabulary
        import json

        spec = json.loads((model_dir / "tokenizer.json").read_text())
        spec["model"]["vocab"] = {w: i for w, i in spec["model"]["vocab"].items() if i < model.config.vocab_size}
        spec["added_tokens"] = []
        (model_dir / "tokenizer.json").write_text(json.dumps(spec))
    _build_and_decode(model, model_dir, heads_dir, tmp_path / "out", [100, 200, 300, 17, 17, 17, 42], max_seq=32,
                      max_num_seqs=1, graph=graph)


@pytest.mark.parametrize("settings", [
    dict(use_sliding_window=False, sliding_window=4096),  # Qwen2Config drops the window when it is not used
    dict(use_sliding_window=True, sliding_window=None),
])
def test_sliding_layers_without_a_window_are_refused(tmp_path, settings):
    """transformers cannot run such a Qwen2 (its sliding layers' mask and cache want a window: a ValueError or a
    TypeError); the graphs, which take their mask as an input, built it as full attention."""
    from medusa_export.exporter.model_checks import check_config
    from medusa_export.runtime.errors import ModelError

    cfg = {"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
           "layer_types": ["sliding_attention", "full_attention"], **settings}
    with pytest.raises(ModelError, match="layer_types names sliding_attention layers, but .*restore the model's "
                                         "config.json$"):
        check_config(cfg, tmp_path / "config.json")
    check_config({**cfg, "layer_types": ["full_attention"] * 2}, tmp_path / "config.json")
