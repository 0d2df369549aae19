"""The fused ONNX Runtime graph (GroupQueryAttention with the tree mask as attention bias, shared KV buffers)
and quantized artifacts: same results as the portable graph, lossless Medusa on every dtype, and a tree mask
that keeps sibling branches apart."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from conftest import NUM_ARTIFACT_HEADS as NUM_HEADS  # noqa: E402
from conftest import ARTIFACT_PATHS, TINY_PROMPTS, artifact_tree_file, random_trees  # noqa: E402
from test_cli import assert_one_line_error, cli  # noqa: E402

from medusa_export.runtime import io_table  # noqa: E402
from medusa_export.runtime.api import MedusaRuntime, artifact_tree  # noqa: E402
from medusa_export.runtime.decode import GenerationConfig  # noqa: E402
from medusa_export.runtime.tree import Tree  # noqa: E402
from medusa_export.runtime.build_options import BuildOptions  # noqa: E402
from manifest_samples import assert_round_trips  # noqa: E402


def _nodes(path):
    return len(onnx.load(str(path), load_external_data=False).graph.node)


def _tokens(rt, prompt, medusa, tree=None, n=20):
    gen = rt.generator
    if tree is not None:
        gen = type(gen)(gen.backend, gen.tokenizer, artifact_tree(rt.manifest, tree))
    return gen.generate(list(prompt), GenerationConfig(max_new_tokens=n, medusa=medusa)).token_ids


@pytest.fixture(scope="module")
def fused(artifact):
    return MedusaRuntime.load(artifact, backend="ort", threads=1)


@pytest.fixture(scope="module")
def portable(portable_artifact):
    return MedusaRuntime.load(portable_artifact, backend="ort", threads=1)


@pytest.fixture(scope="module")
def quantized(tiny_dirs, tmp_path_factory):
    """int8 and int4 artifacts of the tiny model (fused graphs)."""
    from medusa_export.exporter.build import build_artifact

    out = {}
    for dtype in ("int8", "int4"):
        path = tmp_path_factory.mktemp(dtype) / "art"
        build_artifact(str(tiny_dirs[0]), path, BuildOptions(heads=str(tiny_dirs[1]), tree=artifact_tree_file(tiny_dirs), max_seq=128, dtype=dtype), quality_prompts=["t5 t6 t7", "t9 t8 t3"], log=lambda _m: None)
        out[dtype] = (MedusaRuntime.load(path, backend="ort", threads=1), path)
    return out


def test_fused_artifact_is_small_and_recorded(artifact, portable_artifact):
    m = json.loads((artifact / "manifest.json").read_text())
    assert (m["graph_format"], m["kv_layout"], m["weights"]) == ("onnxruntime", io_table.HEAD_MAJOR_SHARED, "fp32")
    layers = m["dims"]["num_layers"]
    fused, plain = _nodes(artifact / "vanilla.onnx"), _nodes(portable_artifact / "vanilla.onnx")
    assert fused < plain / 3 and fused <= 14 * layers + 40  # 14 per layer plus the embedding, mask and tail
    ops = {n.op_type for n in onnx.load(str(artifact / "medusa.onnx"), load_external_data=False).graph.node}
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= ops


def test_fused_step_equals_portable_step(fused, portable):
    """Same inputs: a prefill then a tree step; probabilities, head ids and the committed KV rows agree."""
    tree = Tree.from_choices([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]], topk=10, num_heads=NUM_HEADS)
    outs = {}
    for name, rt in (("fused", fused), ("portable", portable)):
        with rt.generator.backend.new_session() as s:
            p = np.array(TINY_PROMPTS[2])
            s.run(p, np.arange(len(p)), np.tri(len(p), dtype=bool), True, 1.0)
            s.keep(np.arange(len(p)))
            toks = np.arange(5, 5 + tree.num_nodes)
            out = s.run(toks, s.length + tree.depth, tree.mask, True, 0.8)
            s.keep(np.array([0, 1, 4]))
            outs[name] = (out, [np.array(r) for r in s.kv.rows(0, s.length)])
    (a, ka), (b, kb) = outs["fused"], outs["portable"]
    np.testing.assert_array_equal(a.next_ids[:, 0], b.next_ids[:, 0])
    np.testing.assert_array_equal(a.medusa_ids, b.medusa_ids)
    np.testing.assert_allclose(a.next_probs, b.next_probs, atol=1e-5)
    np.testing.assert_allclose(a.input_probs, b.input_probs, atol=1e-5)
    for x, y in zip(ka, kb):
        np.testing.assert_allclose(x, y, atol=1e-5)


@pytest.mark.parametrize("dtype", ["fp32", "int8", "int4"])
@pytest.mark.parametrize("medusa", [False, True])
def test_a_prompt_computes_outputs_for_its_last_row_only(fused, quantized, dtype, medusa):
    """The fused graphs take ``output_rows``: a prefill asks for its last row and gets exactly, bit for bit, that
    row of the all-rows run (int8/int4: the padded extra row keeps the tail's matmuls on two rows), with the same
    KV rows; the decode loop reads it as row -1."""
    rt = fused if dtype == "fp32" else quantized[dtype][0]
    backend = rt.generator.backend
    for kind in ("vanilla", "medusa"):
        backend.graph(kind)  # graphs open at their first use
    assert backend.selects_rows == {"vanilla": True, "medusa": True}
    prompt = np.array(TINY_PROMPTS[2] * 3)
    n = len(prompt)
    runs = {}
    for rows in (None, np.array([n - 1]), np.array([2, n - 1])):
        with backend.new_session() as s:
            out = s.run(prompt, np.arange(n), np.tri(n, dtype=bool), medusa, 0.7, out_rows=rows)
            s.keep(np.arange(n))
            runs[0 if rows is None else len(rows)] = (out, [np.array(r) for r in s.kv.rows(0, n)])
    (full, kv_full), (last, kv_last), (two, _) = runs[0], runs[1], runs[2]
    assert len(full.next_ids) == n and len(last.next_ids) == 1 and len(two.next_ids) == 2
    for name in ("next_ids", "next_probs", "entropy", "input_probs") + (("medusa_ids",) if medusa else ()):
        np.testing.assert_array_equal(getattr(last, name)[-1], getattr(full, name)[n - 1])
        np.testing.assert_array_equal(getattr(two, name), getattr(full, name)[[2, n - 1]])
    for x, y in zip(kv_full, kv_last):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("dtype", ["fp32", "int8", "int4"])
def test_tree_step_is_bit_identical_to_plain_one_token_steps(fused, quantized, dtype):
    """The guarantee behind lossless Medusa at every dtype: each node of a tree step (per-path attention)
    gets exactly, bit for bit, what plain decoding computes for the same token at the same position, one token
    per step on the vanilla graph; and committing an accepted path that is not the first leaves exactly the KV
    rows plain decoding writes."""
    rt = fused if dtype == "fp32" else quantized[dtype][0]
    tree = Tree.from_choices([[0], [1], [2], [0, 0], [1, 0], [1, 1], [0, 0, 0]], topk=10, num_heads=NUM_HEADS)
    prompt = np.array(TINY_PROMPTS[2] * 3)  # past 21: softmax rows longer than one SIMD block
    tokens = np.arange(40, 40 + tree.num_nodes)
    backend = rt.generator.backend
    with backend.new_session() as s:
        s.run(prompt, np.arange(len(prompt)), np.tri(len(prompt), dtype=bool), True, 1.0)
        s.keep(np.arange(len(prompt)))
        step = s.run(tokens, len(prompt) + tree.depth, tree.mask, True, 1.0)
        s.keep(np.array([0, 2, 6]))  # root -> (1,) -> (1, 1): the second path's slot
        committed = [np.array(r) for r in s.kv.rows(0, s.length)]
    for node in range(tree.num_nodes):
        path = [node]
        while tree.parent[path[0]] >= 0:
            path.insert(0, int(tree.parent[path[0]]))
        with backend.new_session() as s:
            s.run(prompt, np.arange(len(prompt)), np.tri(len(prompt), dtype=bool), False, 1.0)
            s.keep(np.arange(len(prompt)))
            for i, n in enumerate(path):  # plain greedy decoding: one token per step
                plain = s.run(tokens[[n]], np.array([len(prompt) + i]), np.ones((1, 1), bool), False, 1.0)
                s.keep(np.array([0]))
            if node == 6:
                for x, y in zip(committed, s.kv.rows(0, s.length)):
                    np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(step.next_probs[node], plain.next_probs[0])
        np.testing.assert_array_equal(step.next_ids[node], plain.next_ids[0])
        np.testing.assert_array_equal(step.entropy[node], plain.entropy[0])


def test_tree_mask_keeps_sibling_branches_apart(fused):
    """Every node of a tree step gets exactly what a plain causal run of its own root-to-node path gets: with
    the mask dropped (nodes seeing siblings and their subtrees), these would differ."""
    tree = Tree.from_choices([[0], [1], [2], [0, 0], [1, 0], [0, 0, 0]], topk=10, num_heads=NUM_HEADS)
    prompt = np.array(TINY_PROMPTS[0])
    tokens = np.array([7, 11, 13, 17, 19, 23, 29])  # root and six nodes, all different
    with fused.generator.backend.new_session() as s:
        s.run(prompt, np.arange(len(prompt)), np.tri(len(prompt), dtype=bool), False, 1.0)
        s.keep(np.arange(len(prompt)))
        step = s.run(tokens, len(prompt) + tree.depth, tree.mask, False, 1.0)
    differs = False
    for node in range(tree.num_nodes):
        path = [node]
        while tree.parent[path[-1]] >= 0:
            path.append(int(tree.parent[path[-1]]))
        path = path[::-1]
        with fused.generator.backend.new_session() as s:
            ids = np.concatenate([prompt, tokens[path]])
            plain = s.run(ids, np.arange(len(ids)), np.tri(len(ids), dtype=bool), False, 1.0)
        np.testing.assert_allclose(step.next_probs[node], plain.next_probs[-1], atol=1e-5)
        np.testing.assert_allclose(step.entropy[node], plain.entropy[-1], atol=1e-4)
        with fused.generator.backend.new_session() as s:  # the same node seeing all earlier nodes instead
            s.run(prompt, np.arange(len(prompt)), np.tri(len(prompt), dtype=bool), False, 1.0)
            s.keep(np.arange(len(prompt)))
            causal = s.run(tokens, len(prompt) + tree.depth, np.tri(len(tokens), dtype=bool), False, 1.0)
        differs |= not np.allclose(causal.next_probs[node], plain.next_probs[-1], atol=1e-5)
    assert differs  # the check above can fail: without the tree mask the nodes' outputs change


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=random_trees(NUM_HEADS, max_paths=ARTIFACT_PATHS), which=st.integers(0, len(TINY_PROMPTS) - 1),
       dtype=st.sampled_from(["fp32", "int8", "int4"]))
def test_greedy_medusa_equals_greedy_vanilla_on_every_dtype(fused, quantized, tree, which, dtype):
    rt = fused if dtype == "fp32" else quantized[dtype][0]
    prompt = TINY_PROMPTS[which]
    assert _tokens(rt, prompt, True, tree=tree, n=16) == _tokens(rt, prompt, False, n=16)


def test_quantized_artifacts_record_their_recipe(quantized):
    for dtype, (rt, path) in quantized.items():
        m = rt.manifest
        assert assert_round_trips(path) == m  # the typed spec reads back exactly what the build wrote
        assert m.weights == dtype and m.dims.dtype == "float32"  # activations and KV stay fp32
        for kind in ("medusa", "vanilla"):
            q = m.graphs[kind].quantization
            assert q.name == dtype and q.method == "MatMulNBits" and q.bits == int(dtype[3:])
            assert q.matmuls_quantized >= 4 * m.dims.num_layers and q.matmuls_left_fp == 0
            assert q.smooth_alpha == 0.5  # the weights come from a smoothed model
            assert q.rotation == {"int8": 32, "int4": 0}[dtype]
        nodes = onnx.load(str(path / "medusa.onnx"), load_external_data=False).graph.node
        assert "MatMulNBits" in {n.op_type for n in nodes}
        # the only fp32 MatMuls left: int8's input rotations, one before each of a layer's 4 weight matmuls
        rotations = [n.name for n in nodes if n.op_type == "MatMul"]
        assert all(name.endswith("/rotation") for name in rotations)
        assert len(rotations) == (4 * m.dims.num_layers if dtype == "int8" else 0)


def test_quantized_quality_is_measured_and_stored(quantized):
    for dtype, (rt, _path) in quantized.items():
        q = rt.manifest.quality
        assert q.prompts == 2 and q.positions > 0 and 0.0 <= q.top1_agreement <= 1.0
        assert q.perplexity > 0 and q.passes == (q.top1_agreement >= q.bar)
    # int8 keeps more of the fp32 model than int4
    assert quantized["int8"][0].manifest.quality.top1_agreement >= quantized["int4"][0].manifest.quality.top1_agreement


def test_verify_reports_quality_for_quantized_artifacts(quantized, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "t5 t6 t7"}\n{"prompt": "t9 t8"}\n')
    out = tmp_path / "v.json"
    proc = cli("verify", str(quantized["int8"][1]), "--prompts", str(prompts), "--max-new-tokens", "8", "--json", str(out))
    summary = json.loads(out.read_text())["summary"]["ort"]
    assert "(int8) vs torch" in proc.stdout and "top-1 agreement" in proc.stdout
    assert proc.returncode == (0 if summary["ok"] else 1), proc.stdout + proc.stderr
    assert summary["ok"] == (summary["medusa_equals_vanilla"] == 2 and summary["quality"]["passes"])


def test_bad_dtype_and_engine_combinations_fail_before_work(tiny_dirs, tmp_path):
    model = str(tiny_dirs[0])
    out = tmp_path / "a"
    assert_one_line_error(cli("build", model, "--out", str(out), "--dtype", "int3"), "int3", "fp32, fp16, int8 or int4")
    assert_one_line_error(cli("build", model, "--out", str(out), "--dtype", "int4", "--engine", "trt"),
                          "MatMulNBits", "TensorRT")
    assert_one_line_error(cli("build", model, "--out", str(out), "--graph", "onnxruntime", "--engine", "all"),
                          "--graph portable")
    assert not out.exists()


def test_old_onnxruntime_is_refused_for_the_fused_graph(artifact, monkeypatch):
    import onnxruntime

    from medusa_export.runtime.errors import BackendUnavailableError

    monkeypatch.setattr(onnxruntime, "__version__", "1.21.1")
    with pytest.raises(BackendUnavailableError, match=r"onnxruntime >= 1\.22 \(this is 1\.21\.1\).*--graph portable"):
        MedusaRuntime.load(artifact, backend="ort")


def test_fused_graph_runs_to_a_full_kv_buffer(artifact):
    """Up to the last position (the rotary table and the spare KV row cover the graph's extra attention row)."""
    rt = MedusaRuntime.load(artifact, backend="ort", threads=1)  # max_seq 128
    runs = {m: rt.generate(list(TINY_PROMPTS[1]), max_new_tokens=500, medusa=m, chat=False) for m in (False, True)}
    for r in runs.values():
        assert r.finish_reason == "length" and len(TINY_PROMPTS[1]) + r.new_tokens >= 128 - rt.generator.tree.num_nodes
    medusa, vanilla = runs[True].token_ids, runs[False].token_ids  # Medusa may stop a few tokens early (no room
    assert medusa == vanilla[:len(medusa)]                        # for a whole tree at the end)


def test_fused_onnxruntime_artifacts_are_refused_by_the_tensorrt_path(artifact):
    """The fused graph's com.microsoft operators are for ONNX Runtime: the builder and the backend both say to
    rebuild with portable graphs, before TensorRT is even looked for."""
    from medusa_export.engines.builder import build_engines
    from medusa_export.runtime.api import MedusaRuntime
    from medusa_export.runtime.errors import ArtifactError

    for attempt in (lambda: build_engines(artifact, log=lambda s: None),
                    lambda: MedusaRuntime.load(artifact, backend="trt")):
        with pytest.raises(ArtifactError, match="holds ONNX Runtime graphs.*--engine trt"):
            attempt()
