"""Quantized builds at their edges: kernel-library flags asked for where the kernel cannot run are refused naming the
real blocker (not "add --attention kernel", itself refused next); smoothing on zero, NaN and huge channels keeps the
model finite and its function; quality prompts that are not a list of texts, or an empty one, refused in one line
naming it; tiny models of odd shapes (hidden 72 / 136, head size 24 / 8, one KV head, vocabulary 317, intermediate
size off the blocks) built int8 / int4 with the kernel, greedy Medusa equal to greedy vanilla."""

from __future__ import annotations

import itertools
import json

import pytest

from conftest import ARTIFACT_TREE, make_heads, make_tiny_model

from medusa_export.runtime.build_options import BuildOptions
from medusa_export.runtime.errors import InputError

torch = pytest.importorskip("torch")

KERNEL_FLAGS = [dict(int8_matmul="rows"), dict(int8_matmul="rows16"), dict(int4_matmul="rows16"),
                dict(fp32_matmul="blocks"), dict(kv_cache_dtype="fp16"), dict(lm_head="screened")]


@pytest.mark.parametrize("flag", KERNEL_FLAGS)
@pytest.mark.parametrize("blocked", [dict(graph="portable"), dict(engine="trt"), dict(dtype="fp16")])
def test_a_kernel_flag_where_the_kernel_cannot_run_names_the_blocker(flag, blocked):
    """Each kernel flag's error said "add --attention kernel", which the options then refused in turn."""
    with pytest.raises(InputError) as refused:
        BuildOptions(**flag, **blocked)
    message = str(refused.value)
    assert "\n" not in message and "kernel library" in message
    assert ("--graph onnxruntime" in message) if "dtype" not in blocked else ("not --dtype fp16" in message)
    with pytest.raises(InputError):  # and the options it refuses stay refused with the kernel named too
        BuildOptions(**flag, **blocked, attention="kernel")


def test_following_a_refusals_advice_to_add_the_kernel_is_never_refused_for_the_kernel():
    """Every combination of the quantized builds' flags: where the fix is "add --attention kernel", adding it is not
    refused because of the kernel itself."""
    space = dict(dtype=["fp32", "fp16", "int8", "int4"], graph=["onnxruntime", "portable"],
                 int8_matmul=["blocks", "rows", "rows16"], int4_matmul=["blocks", "rows16"],
                 fp32_matmul=["full", "blocks"], kv_cache_dtype=["auto", "fp16"], lm_head=["auto", "full", "screened"])
    for values in itertools.product(*space.values()):
        options = dict(zip(space, values))
        try:
            BuildOptions(**options)
        except InputError as e:
            if "needs --attention kernel" in str(e) or "and --attention kernel" in str(e):
                try:
                    BuildOptions(**options, attention="kernel")
                except InputError as again:
                    assert not str(again).startswith("--attention kernel needs"), (options, str(e), str(again))


def test_the_kernel_flags_still_build_where_the_kernel_runs():
    assert BuildOptions(dtype="int8", attention="kernel", int8_matmul="rows16", kv_cache_dtype="fp16").lm_head == \
        "screened"
    assert BuildOptions(attention="kernel", fp32_matmul="blocks", lm_head="full").recipe == "fp32"


def _smoothed(mutate) -> tuple:
    """The tiny model changed by ``mutate``, its logits before and after int8 smoothing, and the scales."""
    from medusa_export.exporter.smoothing import smooth_activations

    model = make_tiny_model(seed=3)
    with torch.no_grad():
        mutate(model)
    ids = torch.tensor([[9, 8, 7, 100, 200, 11, 12, 13]])
    with torch.no_grad():
        before = model(ids).logits
        scales = smooth_activations(model, [[5, 17, 33, 2, 90], [250, 3, 3, 8]], alpha=0.5)
        after = model(ids).logits
    return model, before, after, scales


def test_smoothing_zero_channels_and_large_weights_keeps_the_function():
    def mutate(model):
        layer = model.model.layers[0]
        layer.input_layernorm.weight[3] = 0.0  # a channel no activation reaches
        layer.self_attn.q_proj.weight[:, 5] = 0.0  # a column q reads nothing from (k and v still do)
        for lin in (layer.mlp.gate_proj, layer.mlp.up_proj):
            lin.weight[:, 6] = 0.0  # an input channel no MLP weight reads
        layer.self_attn.v_proj.weight[:, 9] *= 1e4  # a huge channel

    model, before, after, scales = _smoothed(mutate)
    assert all(torch.isfinite(s).all() and (s > 0).all() for s in scales.values())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    torch.testing.assert_close(after, before, rtol=1e-3, atol=1e-3)


def test_smoothing_leaves_a_nan_channel_and_an_overflowing_one_as_they_are():
    from medusa_export.exporter.smoothing import _finite_after, smoothing_scales

    a = torch.tensor([4.0, float("nan"), 1e-9, float("inf")])
    w = torch.tensor([1.0, 1.0, 1.0, 1.0])
    s = smoothing_scales(a, w, 0.5)
    assert s[1] == 1.0 and s[0] == 2.0 and torch.isfinite(s).all()  # NaN: left alone, not spread over the weights
    norm = torch.tensor([1.0, 1.0, 3e38, 1.0])  # channel 2's norm divided by 1 / 100 would overflow
    weights = torch.ones(5, 4)
    weights[0, 3] = 3e38  # channel 3's weight times 100 would overflow
    kept = _finite_after(s, norm, weights)
    assert kept.tolist() == [2.0, 1.0, 1.0, 1.0]


def test_quality_prompts_not_a_list_of_texts_or_empty_are_refused_in_one_line(make_tokenizer):
    from medusa_export.exporter.build_quality import check_quality_fits

    tokenizer = make_tokenizer()
    for prompts, message in (("t1 t2", "not str"), ([b"t1"], "not a list holding bytes"), (["t1", 7], "not a list holding int")):
        with pytest.raises(InputError, match=f"quality_prompts must be a list of prompt texts, {message}"):
            check_quality_fits(tokenizer, prompts, 256)
    with pytest.raises(InputError, match=r"quality prompt 2 \(' '\) has no tokens") as refused:
        check_quality_fits(tokenizer, ["t1 t2", " "], 256)
    assert "\n" not in str(refused.value)
    check_quality_fits(tokenizer, ("t1 t2",), 256)  # a tuple of texts is fine


ODD_SHAPES = {  # hidden, heads, KV heads, head size, intermediate, vocabulary, tied
    "hidden72_head24": dict(hidden_size=72, num_attention_heads=3, num_key_value_heads=1, intermediate_size=100,
                            vocab_size=317, tie_word_embeddings=False),
    "hidden136_head8": dict(hidden_size=136, num_attention_heads=17, num_key_value_heads=1, intermediate_size=72,
                            vocab_size=317, tie_word_embeddings=True),
}


@pytest.fixture(scope="module")
def odd_dirs(tmp_path_factory, make_tokenizer):
    """Per odd shape: a saved model (its toy tokenizer cut to its vocabulary), heads and the tests' tree."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    from medusa_export.exporter.heads import save_heads
    from medusa_export.runtime.tokenizer import ChatTokenizer

    dirs = {}
    for name, shape in ODD_SHAPES.items():
        root = tmp_path_factory.mktemp(name)
        torch.manual_seed(0)
        config = transformers.LlamaConfig(num_hidden_layers=2, max_position_embeddings=512, initializer_range=0.1,
                                          **shape)
        model = transformers.LlamaForCausalLM(config).eval()
        model.save_pretrained(root / "model")
        vocab = shape["vocab_size"]
        tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        ChatTokenizer(tok, chat_template=None, eos_token_ids=(vocab - 1,)).save(root / "model")
        save_heads(make_heads(model, 3, seed=7), root / "heads")
        (root / "tree.json").write_text(json.dumps(ARTIFACT_TREE))
        dirs[name] = root
    return dirs


@pytest.mark.parametrize("shape", list(ODD_SHAPES))
@pytest.mark.parametrize("options", [dict(dtype="int8", int8_matmul="rows16", kv_cache_dtype="fp16"),
                                     dict(dtype="int8", int8_matmul="rows", lm_head="full"),
                                     dict(dtype="int4")], ids=["int8-rows16", "int8-rows", "int4"])
def test_odd_shapes_build_quantized_and_medusa_equals_vanilla(odd_dirs, tmp_path, shape, options):
    from medusa_export.exporter.build import build_artifact
    from medusa_export.runtime.api import MedusaRuntime
    from medusa_export.runtime.generator import GenerationConfig

    root = odd_dirs[shape]
    build_options = BuildOptions(heads=str(root / "heads"), tree=str(root / "tree.json"), attention="kernel",
                                 max_seq=32, max_num_seqs=2, **options)
    manifest = build_artifact(str(root / "model"), tmp_path / "art", build_options, log=lambda _m: None)
    for report in manifest.validation.values():
        errors = report.get("max_abs_error", {})
        assert all(v < 0.1 for k, v in errors.items() if k.endswith("probs"))  # close to PyTorch's probabilities
    with MedusaRuntime.load(tmp_path / "art", backend="ort", threads=1) as rt:
        for prompt in ([5, 6, 7, 8, 9], [1, 2, 3], [10, 20, 30, 17, 17, 17, 42]):
            tokens = {medusa: rt.generator.generate(prompt, GenerationConfig(max_new_tokens=12, medusa=medusa)).token_ids
                      for medusa in (True, False)}
            assert tokens[True] == tokens[False]


def test_an_empty_quality_prompt_is_refused_before_the_export(tiny_dirs, tmp_path):
    """It was refused by the quality check itself ("the prompt is empty"), after every graph had been exported."""
    from medusa_export.exporter.build import build_artifact

    from conftest import artifact_tree_file

    options = BuildOptions(heads=str(tiny_dirs[1]), tree=artifact_tree_file(tiny_dirs), dtype="int8", max_seq=128)
    logged = []
    with pytest.raises(InputError, match=r"quality prompt 2 \(''\) has no tokens"):
        build_artifact(str(tiny_dirs[0]), tmp_path / "art", options, quality_prompts=["t1 t2", ""], log=logged.append)
    assert not any("export" in line for line in logged) and not (tmp_path / "art").exists()
