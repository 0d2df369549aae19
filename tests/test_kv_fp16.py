"""A KV cache in fp16 (`build --kv-cache-dtype fp16`, the kernel's RowAttention16 / LanesAttention16): the new rows
stored as exactly the fp16 rounding of what the fp32 op stores, attention close to the fp32 op's, each row computed by
itself; on tiny artifacts (fp32 and int8 weights) the manifest, graphs and buffers in fp16, tree nodes bit-identical to
one-token steps, greedy Medusa equal to greedy vanilla, batched answers equal to answers alone; the option refused
where no op reads such a cache."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import test_engine as engine_tests  # noqa: E402
import test_fused_graph as fused_tests  # noqa: E402
from conftest import TINY_PROMPTS  # noqa: E402
from test_attention_kernel import _bound, _feeds, _session  # noqa: E402 (skips this module where the kernel cannot run)
from test_cli import assert_one_line_error, cli  # noqa: E402

from medusa_export.runtime import kernels  # noqa: E402
from medusa_export.runtime.build_options import BuildOptions  # noqa: E402
from medusa_export.runtime.errors import InputError  # noqa: E402
from medusa_export.runtime.typed_json import FieldError  # noqa: E402


@pytest.fixture(scope="module")
def kernels_by_cache():
    return {half: _session("kernel", half=half) for half in (False, True)}


@pytest.mark.parametrize("rows,past", [(1, 0), (3, 17), (9, 70)])
def test_an_fp16_cache_holds_the_rounded_rows_and_attends_as_fp32_does(kernels_by_cache, rows, past):
    """Over a past that fp16 holds exactly, the fp16 op writes exactly the fp16 rounding of the fp32 op's new K / V
    rows (ties to even), leaves the past as it was, and attends within fp16's rounding of the fp32 op."""
    feeds = _feeds(np.random.default_rng(rows + past), rows, past)
    for name in ("past_key", "past_value"):
        feeds[name] = feeds[name].astype(np.float16).astype(np.float32)
    half = dict(feeds, past_key=feeds["past_key"].astype(np.float16), past_value=feeds["past_value"].astype(np.float16))
    out32, *cache32 = _bound(kernels_by_cache[False], feeds)
    out16, *cache16 = _bound(kernels_by_cache[True], half)
    assert all(c.dtype == np.float16 for c in cache16)
    for name, c32, c16 in zip(("past_key", "past_value"), cache32, cache16):
        np.testing.assert_array_equal(c16[:, :, :past + rows], c32[:, :, :past + rows].astype(np.float16))
        np.testing.assert_array_equal(c16[:, :, past + rows:], half[name][:, :, past + rows:])
    np.testing.assert_allclose(out16, out32, atol=5e-3)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(2, 12), past=st.integers(0, 60), row=st.integers(0, 11), seed=st.integers(0, 1000))
def test_each_row_over_an_fp16_cache_is_computed_by_itself(kernels_by_cache, rows, past, row, seed):
    """Row ``row`` of a step equals, bit for bit, that row run alone after the rows before it (their K / V rows read
    back from the fp16 cache, as a tree node's are)."""
    row = min(row, rows - 1)
    feeds = _feeds(np.random.default_rng(seed), rows, past, half=True)
    out, key, value = _bound(kernels_by_cache[True], feeds)
    alone = dict(feeds, qkv=feeds["qkv"][:, row:row + 1].copy(), past_key=key, past_value=value,
                 seqlens_k=np.array([past + row], np.int32), total=np.array(past + row + 1, np.int32),
                 position_ids=feeds["position_ids"][:, row:row + 1].copy(),
                 bias=feeds["bias"][:, :, row:row + 1, :past + row + 1].copy())
    np.testing.assert_array_equal(_bound(kernels_by_cache[True], alone)[0][0, 0], out[0, row])


def test_an_fp32_cache_given_to_the_fp16_op_is_refused(kernels_by_cache):
    with pytest.raises(Exception, match="(?i)type"):
        kernels_by_cache[True].run(None, _feeds(np.random.default_rng(0), 2, 5))


def test_the_options_refuse_an_fp16_cache_without_the_kernel():
    with pytest.raises(InputError, match="--kv-cache-dtype fp16 needs --attention kernel"):
        BuildOptions(kv_cache_dtype="fp16")
    with pytest.raises(InputError, match="--kv-cache-dtype 'fp8'"):
        BuildOptions(attention="kernel", kv_cache_dtype="fp8")
    assert BuildOptions(attention="kernel", kv_cache_dtype="fp16").kv_dtype == "float16"
    assert BuildOptions().kv_dtype is None


def test_the_cli_refuses_an_fp16_cache_without_the_kernel(tmp_path):
    out = tmp_path / "art"
    proc = cli("build", "--out", str(out), "--kv-cache-dtype", "fp16")
    assert_one_line_error(proc, "--kv-cache-dtype fp16 needs --attention kernel")
    assert not out.exists() or not any(out.iterdir())


@pytest.fixture(scope="module")
def fp16_cache_runtimes(tiny_dirs, tmp_path_factory):
    """fp32 and int8 weights, the attention kernel over fp16 caches (3 lanes, a chat tokenizer)."""
    return engine_tests.build_runtimes(tiny_dirs, tmp_path_factory.mktemp("kv16"), dtypes=("fp32", "int8"),
                                       attention="kernel", kv_cache_dtype="fp16")


def test_fp16_cache_artifacts_record_it_and_hold_it_in_fp16(fp16_cache_runtimes):
    import onnx
    from onnx import TensorProto

    from manifest_samples import assert_round_trips

    for dtype, rt in fp16_cache_runtimes.items():
        m, backend = rt.manifest, rt.generator.backend
        assert (m.dims.dtype, m.dims.kv_dtype, m.attention) == ("float32", "float16", "kernel")
        assert assert_round_trips(backend.directory) == m
        for kind, graph in m.graphs.items():
            model = onnx.load(str(backend.directory / graph.file), load_external_data=False).graph
            ops = [n.op_type for n in model.node]
            assert ops.count(kernels.lanes_op(True) if kind == "lanes" else kernels.row_op(True)) == m.dims.num_layers
            assert kernels.OP not in ops and kernels.LANES_OP not in ops
            kv = [v for v in [*model.input, *model.output] if v.name.startswith(("past_key_values.", "present."))]
            assert kv and {v.type.tensor_type.elem_type for v in kv} == {TensorProto.FLOAT16}
        with backend.new_session() as s:
            assert s.kv.store.dtype == np.float16 and s.kv_bytes == s.kv.store.size * 2  # half an fp32 cache's bytes


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_fp16_cache_tree_nodes_are_bit_identical_to_one_token_steps(fp16_cache_runtimes, dtype):
    fused_tests.test_tree_step_is_bit_identical_to_plain_one_token_steps(
        fp16_cache_runtimes["fp32"], {"int8": (fp16_cache_runtimes["int8"], None)}, dtype)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=fused_tests.random_trees(fused_tests.NUM_HEADS, max_paths=fused_tests.ARTIFACT_PATHS),
       which=st.integers(0, len(TINY_PROMPTS) - 1), dtype=st.sampled_from(["fp32", "int8"]))
def test_fp16_cache_greedy_medusa_equals_greedy_vanilla(fp16_cache_runtimes, tree, which, dtype):
    rt, prompt = fp16_cache_runtimes[dtype], TINY_PROMPTS[which]
    assert fused_tests._tokens(rt, prompt, True, tree=tree, n=16) == fused_tests._tokens(rt, prompt, False, n=16)


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_fp16_cache_batched_answers_equal_answers_alone(fp16_cache_runtimes, dtype):
    engine_tests.test_every_answer_equals_its_answer_alone(fp16_cache_runtimes, dtype)
    engine_tests.test_context_drafts_in_batched_steps_change_no_answer(fp16_cache_runtimes, dtype)


def test_a_manifest_refuses_an_fp16_cache_without_the_kernel(fp16_cache_runtimes):
    m = fp16_cache_runtimes["fp32"].manifest
    with pytest.raises(FieldError, match="dims.kv_dtype"):
        m.replace(attention="gqa")


def test_verify_checks_an_fp16_cache_as_an_approximation(fp16_cache_runtimes, tmp_path):
    """`verify` holds an fp16-cache artifact to what an approximation must keep: greedy Medusa equal to greedy
    vanilla on its own backend and top-1 agreement with the fp32 reference, not token identity with it."""
    directory = fp16_cache_runtimes["fp32"].generator.backend.directory
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "t5 t6 t7"}\n{"prompt": "t9 t8"}\n')
    proc = cli("verify", str(directory), "--model", str(directory.parent / "model"), "--prompts", str(prompts),
               "--max-new-tokens", "8")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ort (fp32, float16 KV cache) vs torch: greedy Medusa == greedy vanilla on ort 2/2" in proc.stdout
    assert "--tolerance" not in proc.stderr
    proc = cli("verify", str(directory), "--model", str(directory.parent / "model"), "--prompts", str(prompts),
               "--max-new-tokens", "8", "--tolerance", "0")  # not this check's bar: said, not silently ignored
    assert proc.returncode == 0 and "note: --tolerance is not used for a fp32, float16 KV cache artifact" in proc.stderr
