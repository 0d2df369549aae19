"""Sliding-window attention, which no graph implements: the window a config applies is read as transformers reads
it, and a window that takes effect within --max-seq is refused before any export (one beyond it is the same as
full attention, and builds)."""

from __future__ import annotations

import shutil

import pytest

torch = pytest.importorskip("torch")

from conftest import TINY_VOCAB  # noqa: E402

from medusa_export.runtime.build_options import BuildOptions  # noqa: E402
from medusa_export.runtime.errors import ModelError  # noqa: E402


def _config(kind: str, **settings):
    transformers = pytest.importorskip("transformers")
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config}[kind]
    return cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=TINY_VOCAB, **settings)


@pytest.mark.parametrize("kind, settings, window", [
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0}, 8),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}, 8),  # the last layer
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2}, None),  # no layer
    ("qwen2", {"use_sliding_window": False, "sliding_window": 8}, None),  # Qwen2's own configs: off
    ("mistral", {"sliding_window": 8}, 8),
    ("mistral", {"sliding_window": None}, None),
    ("llama", {"sliding_window": 8}, 8),  # the model ignores it, transformers' cache keeps 7 rows: refused too
    ("llama", {}, None),
])
def test_the_window_a_config_applies_is_read_as_transformers_reads_it(kind, settings, window):
    from medusa_export.exporter.model_checks import sliding_window

    config = _config(kind, **settings)
    assert sliding_window(config) == window
    assert sliding_window({"model_type": kind, "num_hidden_layers": 2, **settings}) == window  # config.json's dict


def test_a_sliding_window_within_the_built_context_is_refused_and_one_beyond_it_is_not():
    """Qwen2 with its window in use failed the validation with a broadcast traceback (transformers' cache keeps
    window - 1 rows), and the fused graph attended past the window silently; Mistral's was refused for the fused
    graph only, and with the advice to use the portable graph, which ignores it too."""
    from medusa_export.exporter.fused_backbone import check_supported
    from medusa_export.exporter.model_checks import check_length_effects

    for kind, settings in (("qwen2", {"use_sliding_window": True, "max_window_layers": 0}), ("mistral", {})):
        config = _config(kind, sliding_window=64, **settings)
        for check in (check_length_effects, check_supported):
            with pytest.raises(ModelError, match="sliding window of 64 tokens, .*: build with --max-seq 63 or less"):
                check(config, 64)
            check(config, 63)
        check_supported(config)  # no context given: `Decoder` checks its own
    with pytest.raises(ModelError, match="window of 4 tokens.*: a window under 17 tokens cannot be exported"):
        check_length_effects(_config("mistral", sliding_window=4), 16)


def test_a_build_of_a_model_with_a_sliding_window_in_use_is_refused_before_the_export(tiny_dirs, tmp_path):
    from transformers import Qwen2ForCausalLM

    from medusa_export.exporter.build import build_artifact

    model_dir = tmp_path / "qwen2"
    torch.manual_seed(0)
    Qwen2ForCausalLM(_config("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=0)).save_pretrained(
        model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_dirs[0] / name, model_dir / name)
    options = BuildOptions(heads=str(tiny_dirs[1]), tree="chain-1", max_seq=64, corpus_drafts="none")
    with pytest.raises(ModelError, match="sliding window of 8 tokens"):
        build_artifact(str(model_dir), tmp_path / "out", options, log=lambda _m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qwen2"]
