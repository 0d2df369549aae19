"""Unusual but valid models of the supported families: each builds and agrees with PyTorch, or is refused before the
export with one line naming the fix. Every case here failed with a traceback (or a graph that did not run) before.
"""

from __future__ import annotations

import json
import shutil

import pytest

torch = pytest.importorskip("torch")

from conftest import TINY_VOCAB, make_heads  # noqa: E402

from medusa_export.runtime.build_options import BuildOptions  # noqa: E402
from medusa_export.runtime.errors import ModelError  # noqa: E402


def _save_model(tiny_dirs, directory, **settings):
    """A random 2-layer Llama with ``settings`` over the tiny config, saved with the tiny tokenizer; its heads dir."""
    import transformers

    from medusa_export.exporter.heads import save_heads

    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=TINY_VOCAB, max_position_embeddings=512, initializer_range=0.1)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**base, **settings})).eval()
    model.save_pretrained(directory / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_dirs[0] / name, directory / "model" / name)
    if model.config.vocab_size < TINY_VOCAB:  # the tokenizer's words within the vocabulary
        spec = json.loads((directory / "model" / "tokenizer.json").read_text())
        spec["model"]["vocab"] = {w: i for w, i in spec["model"]["vocab"].items() if i < model.config.vocab_size}
        spec["added_tokens"] = []
        (directory / "model" / "tokenizer.json").write_text(json.dumps(spec))
    save_heads(make_heads(model, 2, seed=3), directory / "heads")
    return model, directory / "model", directory / "heads"


def _build(model_dir, heads_dir, out, **options):
    from medusa_export.exporter.build import build_artifact

    options = BuildOptions(heads=str(heads_dir), tree="chain-2", corpus_drafts="none", **options)
    return build_artifact(str(model_dir), out, options, log=lambda _m: None)


def _greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("attention, head_dim, fix", [
    ("gqa", 8, "--attention kernel or --graph portable"), ("gqa", 24, "--attention kernel or --graph portable"),
    ("kernel", 12, "--graph portable"), ("kernel", 272, "--attention gqa or --graph portable"),
])
def test_a_head_size_the_attention_op_does_not_take_is_refused_naming_a_fix(attention, head_dim, fix):
    """ONNX Runtime's GroupQueryAttention takes head sizes in multiples of 16, the kernel multiples of 8 up to 256:
    a head_dim of 8 failed the build's validation with an ONNX Runtime traceback."""
    from medusa_export.exporter.fused_backbone import check_head_dim

    with pytest.raises(ModelError, match=f"head size {head_dim} .*--attention {attention}.*: build with {fix} "):
        check_head_dim(head_dim, attention)
    for ok in (16, 64, 128, 256):
        check_head_dim(ok, attention)


def test_fp16_weights_are_not_pointed_at_the_kernel_they_cannot_use():
    """--dtype fp16 with a head size GroupQueryAttention refuses: the kernel takes no fp16 weights, so naming it as
    the fix sent the user round in a circle."""
    from medusa_export.exporter.fused_backbone import check_head_dim

    with pytest.raises(ModelError, match="build with --graph portable"):
        check_head_dim(24, "gqa", kernel_allowed=False)


def test_a_model_whose_head_size_gqa_cannot_take_is_refused_before_the_export(tiny_dirs, tmp_path):
    _, model_dir, heads_dir = _save_model(tiny_dirs, tmp_path, head_dim=8)
    with pytest.raises(ModelError, match="head size 8 .*: build with --attention kernel or --graph portable"):
        _build(model_dir, heads_dir, tmp_path / "out", max_seq=32)
    assert not (tmp_path / "out").exists()


def test_swish_is_silu():
    """transformers maps hidden_act "swish" to SiLU: the fused graph covers it (it was refused)."""
    import transformers

    from medusa_export.exporter.fused_backbone import check_supported

    check_supported(transformers.LlamaConfig(hidden_act="swish"))
    with pytest.raises(ModelError, match="activation 'gelu': build with --graph portable"):
        check_supported(transformers.LlamaConfig(hidden_act="gelu"))


def test_the_smallest_max_seq_builds_and_validates(tiny_dirs, tmp_path):
    """--max-seq 16..31 failed in validation (its tree step reached past the rotary table) and its lanes check (a
    17- and a 40-token prompt overflowed the cache)."""
    from medusa_export.exporter.validate import fitted_shapes

    assert all(t + past <= 16 for t, past, _ in fitted_shapes(16))
    manifest = _build(tiny_dirs[0], tiny_dirs[1], tmp_path / "out", max_seq=16, max_num_seqs=4)
    assert manifest.max_seq == 16 and manifest.validation["lanes"]["exact"]
    assert max(past + t for t, past, _ in manifest.validation["medusa"]["shapes"]) <= 16
    # verify's lanes check decodes 3 tokens after each prompt: a prompt that fits --max-new-tokens 1 overflowed it
    from test_cli import cli

    prompts = tmp_path / "long.jsonl"
    prompts.write_text(json.dumps({"prompt": " ".join(f"t{i}" for i in range(1, 16))}) + "\n")
    proc = cli("verify", str(tmp_path / "out"), "--model", str(tiny_dirs[0]), "--prompts", str(prompts), "--limit",
               "1", "--max-new-tokens", "1")
    assert proc.returncode == 0, proc.stderr
    assert "lanes graph) vs one-sequence steps: 1 prompts together, identical -> OK" in proc.stdout


def test_a_vocabulary_smaller_than_the_ranks_builds_ranking_every_word(tiny_dirs, tmp_path):
    """A vocabulary under the default --sample-topk 32 failed the trace with torch's "selected index k out of range"
    (the CLI has no flag to lower it): the graphs rank every word, and agree with PyTorch."""
    model, model_dir, heads_dir = _save_model(tiny_dirs, tmp_path, vocab_size=8)
    manifest = _build(model_dir, heads_dir, tmp_path / "out", max_seq=32, max_num_seqs=1)
    assert (manifest.dims.sample_topk, manifest.dims.head_topk) == (8, 8)
    from medusa_export.runtime.api import MedusaRuntime
    from medusa_export.runtime.decode import GenerationConfig

    prompt = [1, 2, 3]
    want = _greedy(model, prompt, 6)
    with MedusaRuntime.load(tmp_path / "out", backend="ort") as rt:
        for medusa in (False, True):
            config = GenerationConfig(max_new_tokens=6, medusa=medusa, ignore_eos=True)
            assert list(rt.generator.generate(prompt, config).token_ids) == want


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_a_tied_embedding_of_a_hidden_size_off_the_blocks_keeps_its_fp32_table(tiny_dirs, tmp_path, dtype):
    """GatherBlockQuantized returns whole blocks of 32: for a hidden size of 48 its rows were 64 wide and the graph
    failed (the first norm's shapes, or MatMulNBits' shape inference)."""
    _, model_dir, heads_dir = _save_model(tiny_dirs, tmp_path, hidden_size=48, intermediate_size=96,
                                          num_attention_heads=3, num_key_value_heads=1, head_dim=16,
                                          tie_word_embeddings=True)
    manifest = _build(model_dir, heads_dir, tmp_path / "out", max_seq=32, max_num_seqs=2, dtype=dtype)
    assert manifest.graphs["medusa"].quantization.embedding == "fp32"
    assert manifest.validation["medusa"]["max_abs_error"]  # validated (recorded: quantized graphs differ by design)


def test_build_takes_the_graphs_ranks_from_the_command_line(tiny_dirs, tmp_path):
    """--head-topk and --sample-topk: the build's own messages advised them, but only the library had them."""
    from test_cli import assert_one_line_error, cli

    from medusa_export.runtime.manifest import Manifest

    model_dir, heads_dir = tiny_dirs
    out = tmp_path / "out"
    common = (str(model_dir), "--heads", str(heads_dir), "--tree", "chain-2", "--corpus-drafts", "none", "--max-seq",
              "32", "--max-num-seqs", "1")
    assert_one_line_error(cli("build", *common, "--out", str(out), "--head-topk", "0"), "--head-topk 0: use 1..64")
    assert not out.exists() or not any(out.iterdir())
    proc = cli("build", *common, "--out", str(out), "--head-topk", "3", "--sample-topk", "5")
    assert proc.returncode == 0, proc.stderr
    dims = Manifest.read(out).dims
    assert (dims.head_topk, dims.sample_topk) == (3, 5)


# ---- RoPE settings as transformers 5 merges them ----

def _rope_config(**settings) -> dict:
    """A llama config.json's content (as transformers 5 saves it: with ``rope_parameters``) with ``settings``."""
    return {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 16,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, **settings}


@pytest.mark.parametrize("settings, refused", [
    # an older rope_scaling beside the saved rope_parameters: transformers applies rope_scaling (it was not checked)
    (dict(rope_scaling={"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}),
     "longrope RoPE scaling is not supported"),
    (dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}),
     "longrope RoPE scaling is not supported"),
    # the dict's own rope_theta wins over the top-level one in transformers
    (dict(rope_theta=10000.0, rope_parameters={"rope_type": "default", "rope_theta": -1.0}),
     "rope_theta must be a positive number, not -1.0"),
    # parameters per layer type, each checked
    (dict(model_type="qwen2", rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4},
                                               "sliding_attention": {"rope_type": "spiral", "factor": 2.0}}),
     "RoPE type 'spiral' is not supported"),
    # partial rotary with a scaled type: transformers' Llama family fails its own forward
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     "partial_rotary_factor 0.5 with linear RoPE is not supported"),
    (dict(partial_rotary_factor=0.5, rope_parameters={"rope_type": "yarn", "factor": 2.0}),
     "partial_rotary_factor 0.5 with yarn RoPE is not supported"),
])
def test_rope_settings_are_checked_where_transformers_reads_them(tmp_path, settings, refused):
    from medusa_export.exporter.model_checks import check_config

    with pytest.raises(ModelError, match=refused):
        check_config(_rope_config(**settings), tmp_path / "config.json")


@pytest.mark.parametrize("settings", [
    dict(rope_scaling={"type": "linear", "factor": 2.0}),
    dict(rope_scaling={"type": "dynamic", "factor": 2.0}),  # refused past max_position_embeddings once --max-seq is known
    dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
    dict(rope_parameters={"rope_type": "proportional", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
    dict(rope_theta=-1.0),  # overridden by rope_parameters' own rope_theta
])
def test_rope_settings_transformers_runs_are_accepted(tmp_path, settings):
    from medusa_export.exporter.model_checks import check_config

    check_config(_rope_config(**settings), tmp_path / "config.json")


def test_a_dynamic_rope_scaling_beside_rope_parameters_is_refused_before_the_export(tiny_dirs, tmp_path):
    """It built as far as the validation, which blamed the exporter ("the export is wrong")."""
    _, model_dir, heads_dir = _save_model(tiny_dirs, tmp_path, max_position_embeddings=16)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "rope_scaling": {"type": "dynamic", "factor": 2.0}}))
    with pytest.raises(ModelError, match="config.json: dynamic RoPE scaling is not supported"):
        _build(model_dir, heads_dir, tmp_path / "out", max_seq=64)
    assert not (tmp_path / "out").exists()


def test_partial_rotary_with_a_scaled_rope_is_refused_in_one_line(tiny_dirs, tmp_path):
    """It failed in the fused export with numpy's "operands could not be broadcast" traceback."""
    _, model_dir, heads_dir = _save_model(tiny_dirs, tmp_path, rope_parameters={
        "rope_type": "linear", "factor": 2.0, "rope_theta": 1e4, "partial_rotary_factor": 0.5})
    with pytest.raises(ModelError, match="partial_rotary_factor 0.5 with linear RoPE is not supported.*"
                                         "partial_rotary_factor 1.0$"):
        _build(model_dir, heads_dir, tmp_path / "out", max_seq=32)


def test_a_rotary_embedding_narrower_than_the_head_is_refused():
    from types import SimpleNamespace

    from medusa_export.exporter.fused_backbone import _rotary_cache

    narrow = SimpleNamespace(rotary_emb=lambda x, pos: (torch.ones(1, pos.shape[1], 8), torch.zeros(1, pos.shape[1], 8)))
    with pytest.raises(ModelError, match="covers 8 of the 16 values of a head"):
        _rotary_cache(narrow, 4, 16)


@pytest.mark.parametrize("graph, refused", [
    ("onnxruntime", "rotary embedding gives NaN or infinite values"),  # was "not the rotate-half kind: use portable"
    ("portable", "the model's own output 'next_token_probs' \\(PyTorch\\) holds NaN"),  # was "the export is wrong"
])
def test_a_rope_theta_that_overflows_float32_is_blamed_on_the_model(tiny_dirs, tmp_path, graph, refused):
    _, model_dir, heads_dir = _save_model(tiny_dirs, tmp_path, rope_parameters={"rope_type": "default",
                                                                                 "rope_theta": 1e-300})
    with pytest.raises(ModelError, match=refused):
        _build(model_dir, heads_dir, tmp_path / "out", max_seq=32, graph=graph)


def test_a_graph_output_of_nan_fails_the_validation():
    """A NaN difference counted as none (``max(0.0, nan)`` is 0.0): a graph giving NaN where PyTorch gives numbers
    passed its check against PyTorch."""
    import numpy as np

    from medusa_export.exporter.validate import output_error

    ref = np.array([[0.25, 0.75]], np.float32)
    assert output_error("p", np.array([[np.nan, 0.75]], np.float32), ref) == float("inf")
    assert output_error("p", np.array([[np.inf, 0.75]], np.float32), ref) == float("inf")
    assert output_error("p", np.array([[0.25, 0.5]], np.float32), ref) == 0.25
    with pytest.raises(ModelError, match="own output 'p'"):
        output_error("p", ref, np.array([[np.nan, 0.75]], np.float32))


def test_a_quantized_graph_giving_nan_is_refused_though_its_errors_are_only_recorded():
    """A quantized graph's errors are recorded, not held to a tolerance: an infinite one would have been written into
    the manifest as a JSON Infinity."""
    from medusa_export.exporter.validate import _check_finite
    from medusa_export.runtime.errors import ExportValidationError

    _check_finite({"next_token_probs": 0.3, "entropy": 2.0}, "int8")
    with pytest.raises(ExportValidationError, match=r"'entropy' holds NaN or infinite values .*\(int8\)"):
        _check_finite({"next_token_probs": 0.3, "entropy": float("inf")}, "int8")
    with pytest.raises(ExportValidationError, match="fp16 KV cache overflows: build with --kv-cache-dtype auto"):
        _check_finite({"present.0.key": float("inf")}, "float32", "float16")  # not "build with --dtype fp32"
    with pytest.raises(ExportValidationError, match="build with --dtype fp32$"):
        _check_finite({"next_token_probs": float("inf")}, "float16")


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4},
    {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4, "original_max_position_embeddings": 8},
    {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8},
    {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
])
def test_scaled_rope_models_past_their_trained_length_decode_as_pytorch(tiny_dirs, tmp_path, rope):
    """max_position_embeddings under --max-seq, with each RoPE type the graphs follow: greedy decoding with and
    without Medusa equals PyTorch's, past the trained length."""
    model, model_dir, heads_dir = _save_model(tiny_dirs, tmp_path, max_position_embeddings=16, rope_parameters=rope)
    _build(model_dir, heads_dir, tmp_path / "out", max_seq=64, max_num_seqs=1)
    from medusa_export.runtime.api import MedusaRuntime
    from medusa_export.runtime.decode import GenerationConfig

    prompt = list(range(1, 15))
    want = _greedy(model, prompt, 8)
    with MedusaRuntime.load(tmp_path / "out", backend="ort") as rt:
        for medusa in (False, True):
            config = GenerationConfig(max_new_tokens=8, medusa=medusa, ignore_eos=True)
            assert list(rt.generator.generate(prompt, config).token_ids) == want
