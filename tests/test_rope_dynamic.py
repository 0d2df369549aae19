"""Dynamic (NTK) RoPE scaling: transformers keeps the default frequencies while the positions stay within
max_position_embeddings, so a build whose --max-seq is within it decodes as the model (greedy Medusa equal to greedy
vanilla equal to transformers' own greedy generate); one past it is refused in one line. longrope stays refused."""

from __future__ import annotations

import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from conftest import TINY_VOCAB, make_heads  # noqa: E402

from medusa_export.runtime.build_options import BuildOptions  # noqa: E402
from medusa_export.runtime.errors import ModelError  # noqa: E402

POSITIONS = 33  # the model's max_position_embeddings: dynamic scaling takes effect past it
MOST = POSITIONS - 1  # the largest --max-seq: the fused graph's rotary table holds one row past it
DYNAMIC = {"rope_type": "dynamic", "factor": 2.0}
PROMPT = [100, 200, 300, 17, 17, 17, 42]


def _save(tiny_dirs, directory):
    """A random 2-layer Llama with dynamic RoPE scaling, saved with the tiny tokenizer; its heads directory."""
    import transformers

    from medusa_export.exporter.heads import save_heads

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=TINY_VOCAB,
                                      max_position_embeddings=POSITIONS, initializer_range=0.1,
                                      rope_scaling=dict(DYNAMIC))
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(directory / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_dirs[0] / name, directory / "model" / name)
    save_heads(make_heads(model, 2, seed=3), directory / "heads")
    return model, directory / "model", directory / "heads"


@pytest.mark.parametrize("graph", ["onnxruntime", "portable"])
def test_dynamic_rope_within_max_position_embeddings_decodes_as_transformers(tiny_dirs, tmp_path, graph):
    """The largest --max-seq dynamic RoPE takes: default frequencies, which the graphs hold (it was refused)."""
    from medusa_export.exporter.build import build_artifact
    from medusa_export.runtime.api import MedusaRuntime
    from medusa_export.runtime.decode import GenerationConfig

    model, model_dir, heads_dir = _save(tiny_dirs, tmp_path)
    options = BuildOptions(heads=str(heads_dir), tree="chain-2", corpus_drafts="none", max_seq=MOST,
                           max_num_seqs=1, graph=graph)
    build_artifact(str(model_dir), tmp_path / "out", options, log=lambda _m: None)
    n = 12
    with torch.inference_mode():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    want = out[0, len(PROMPT):].tolist()
    assert len(want) == n
    with MedusaRuntime.load(tmp_path / "out", backend="ort") as rt:
        for medusa in (False, True):
            config = GenerationConfig(max_new_tokens=n, medusa=medusa, ignore_eos=True)
            assert list(rt.generator.generate(list(PROMPT), config).token_ids) == want, medusa


def test_dynamic_rope_past_max_position_embeddings_is_refused_in_one_line(tiny_dirs, tmp_path):
    """--max-seq past max_position_embeddings: the frequencies would change within the graph's positions."""
    from test_cli import assert_one_line_error, cli

    _, model_dir, heads_dir = _save(tiny_dirs, tmp_path)
    out = tmp_path / "out"
    proc = cli("build", str(model_dir), "--heads", str(heads_dir), "--tree", "chain-2", "--corpus-drafts", "none",
               "--max-seq", str(POSITIONS), "--max-num-seqs", "1", "--out", str(out))
    assert_one_line_error(proc, "dynamic RoPE scaling", f"max_position_embeddings {POSITIONS}",
                          f"--max-seq {MOST} or less, not {POSITIONS}")
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("max_seq, refused", [(MOST, False), (POSITIONS, True)])
def test_the_pytorch_backend_takes_dynamic_rope_within_its_context_only(max_seq, refused):
    import transformers

    from medusa_export.exporter.torch_backend import TorchBackend

    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=TINY_VOCAB,
                                      max_position_embeddings=POSITIONS, rope_scaling=dict(DYNAMIC))
    model = transformers.LlamaForCausalLM(config).eval()
    if refused:
        with pytest.raises(ModelError, match=f"--max-seq {MOST} or less, not {max_seq}"):
            TorchBackend(model, None, max_seq=max_seq)
    else:
        TorchBackend(model, None, max_seq=max_seq)


@pytest.mark.parametrize("settings, refused", [
    ({"rope_type": "dynamic", "factor": 2.0}, None),  # checked once --max-seq is known (`check_dynamic_rope`)
    ({"type": "dynamic", "factor": 2.0}, None),
    ({"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8},
     "longrope RoPE scaling is not supported"),
])
def test_config_checks_take_dynamic_and_refuse_longrope(tmp_path, settings, refused):
    from medusa_export.exporter.model_checks import check_config

    cfg = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": POSITIONS,
           "rope_scaling": settings}
    if refused:
        with pytest.raises(ModelError, match=refused):
            check_config(cfg, tmp_path / "config.json")
    else:
        check_config(cfg, tmp_path / "config.json")


def test_dynamic_rope_check_reads_config_dicts_and_nested_parameters():
    from medusa_export.exporter.model_checks import check_dynamic_rope

    nested = {"model_type": "qwen2", "max_position_embeddings": POSITIONS,
              "rope_parameters": {"full_attention": {"rope_type": "default"}, "sliding_attention": dict(DYNAMIC)}}
    check_dynamic_rope(nested, MOST)
    with pytest.raises(ModelError, match=f"max_position_embeddings {POSITIONS}.*--max-seq {MOST} or less"):
        check_dynamic_rope(nested, POSITIONS)
    check_dynamic_rope({"max_position_embeddings": 8, "rope_parameters": {"rope_type": "linear", "factor": 2.0}}, 64)
    with pytest.raises(ModelError, match="under 17 positions cannot be exported"):
        check_dynamic_rope({"max_position_embeddings": 8, "rope_parameters": dict(DYNAMIC)}, 16)
