"""ONNX export + the ONNX Runtime backend, on a tiny random Llama saved as a real model directory."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from conftest import NUM_ARTIFACT_HEADS as NUM_HEADS  # noqa: E402
from conftest import ARTIFACT_PATHS, ARTIFACT_TREE, TINY_PROMPTS, ClockFreeCost, random_trees  # noqa: E402

from medusa_export.runtime.api import MedusaRuntime  # noqa: E402
from medusa_export.runtime.decode import GenerationConfig  # noqa: E402
from medusa_export.runtime.errors import ArtifactError, InputError, TreeError  # noqa: E402
from medusa_export.runtime.build_options import BuildOptions  # noqa: E402
from manifest_samples import assert_round_trips  # noqa: E402



@pytest.fixture(scope="module")
def runtimes(artifact):
    return {b: MedusaRuntime.load(artifact, backend=b, threads=1) for b in ("torch", "ort")}


def _tokens(rt, prompt, medusa, tree=None, n=24):
    gen = rt.generator
    if tree is not None:
        from medusa_export.runtime.api import artifact_tree

        gen = type(gen)(gen.backend, gen.tokenizer, artifact_tree(rt.manifest, tree))
    return gen.generate(list(prompt), GenerationConfig(max_new_tokens=n, medusa=medusa)).token_ids


@pytest.mark.parametrize("which", ["artifact", "portable_artifact"])
def test_manifest_records_graphs_and_validation(which, request):
    import onnx

    artifact = request.getfixturevalue(which)
    m = json.loads((artifact / "manifest.json").read_text())
    assert m["format_version"] == 3 and m["dims"]["num_heads"] == NUM_HEADS
    assert {"medusa", "vanilla"} <= set(m["graphs"])
    assert set(m["files"]) >= {"medusa.onnx", "vanilla.onnx", "tokenizer.json", "heads/heads.safetensors"}
    for kind in ("medusa", "vanilla"):
        errs = m["validation"][kind]["max_abs_error"]
        assert errs["next_token_probs"] < 1e-3 and errs["present.0.key"] < 1e-3
        cleanup = m["graphs"][kind]["cleanup"]  # Polygraphy folded the traced shape arithmetic before validation
        assert cleanup["tool"].startswith("polygraphy") and cleanup["nodes_after"] < cleanup["nodes_before"]
        if m["graph_format"] == "portable":  # the traced graph's shape arithmetic: most of it folds away
            assert cleanup["nodes_after"] < 0.8 * cleanup["nodes_before"]
        assert len(onnx.load(str(artifact / f"{kind}.onnx"), load_external_data=False).graph.node) == cleanup["nodes_after"]
    if m["graph_format"] == "portable":  # standard operators only (the fused graph has ONNX Runtime's own)
        onnx.checker.check_model(str(artifact / "medusa.onnx"))


@pytest.mark.parametrize("prompt", TINY_PROMPTS)
def test_ort_greedy_matches_torch_vanilla_and_medusa(runtimes, prompt):
    ref = _tokens(runtimes["torch"], prompt, medusa=False)
    assert _tokens(runtimes["ort"], prompt, medusa=False) == ref
    assert _tokens(runtimes["ort"], prompt, medusa=True) == ref
    assert _tokens(runtimes["torch"], prompt, medusa=True) == ref


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=random_trees(NUM_HEADS, max_paths=ARTIFACT_PATHS), which=st.integers(0, len(TINY_PROMPTS) - 1))
def test_ort_medusa_lossless_on_random_trees(runtimes, tree, which):
    prompt = TINY_PROMPTS[which]
    assert _tokens(runtimes["ort"], prompt, True, tree=tree, n=16) == _tokens(runtimes["torch"], prompt, False, n=16)


def test_ort_step_output_matches_torch(runtimes):
    """Same inputs, same outputs: probabilities and KV rows of a tree step, and the committed rows of an
    accepted path that is not the first (the fused graph verifies per path, each in its own KV slot)."""
    from medusa_export.runtime.tree import Tree

    tree = Tree.from_choices(ARTIFACT_TREE, topk=10, num_heads=NUM_HEADS)
    outs = {}
    for name, rt in runtimes.items():
        s = rt.generator.backend.new_session()
        p = np.array(TINY_PROMPTS[2])
        s.run(p, np.arange(len(p)), np.tri(len(p), dtype=bool), True, 1.0)
        s.keep(np.arange(len(p)))
        toks = np.array([5, 6, 7, 8, 9, 10, 11, 12, 13])
        out = s.run(toks, s.length + tree.depth, tree.mask, True, 0.7)
        s.keep(np.array([0, 2, 6]))  # root -> (1,) -> (1, 0)
        outs[name] = (out, np.asarray(s.kv.rows(0, s.length)[2]))  # layer 1 keys, whatever the layout
    (a, ka), (b, kb) = outs["torch"], outs["ort"]
    np.testing.assert_array_equal(a.next_ids, b.next_ids)
    np.testing.assert_array_equal(a.medusa_ids, b.medusa_ids)
    parent = tree.parent[1:]  # what acceptance reads: p_parent(child token)
    np.testing.assert_allclose(a.input_probs[parent, np.arange(1, tree.num_nodes)],
                               b.input_probs[parent, np.arange(1, tree.num_nodes)], atol=1e-5)
    np.testing.assert_allclose(a.entropy, b.entropy, atol=1e-4)
    np.testing.assert_allclose(ka, kb, atol=1e-5)


def test_streaming_and_threads(runtimes):
    """Concurrent requests on one loaded runtime each get their own state and the same tokens."""
    from concurrent.futures import ThreadPoolExecutor

    rt = runtimes["ort"]
    ref = {tuple(p): _tokens(rt, p, True) for p in TINY_PROMPTS}
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda p: _tokens(rt, p, True), TINY_PROMPTS * 2))
    assert got == [ref[tuple(p)] for p in TINY_PROMPTS * 2]
    stream = rt.stream(list(TINY_PROMPTS[0]), max_new_tokens=10)
    chunks = [e.token_ids for e in stream]
    assert sum(chunks, []) == stream.result.token_ids and stream.result.steps >= 1


def test_runtime_imports_without_torch_or_transformers(artifact):
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('torch', 'transformers'):
                    raise ImportError('blocked: ' + name)
        sys.meta_path.insert(0, Block())
        from medusa_export.runtime import GenerationConfig, GenerationResult, MedusaRuntime
        rt = MedusaRuntime.load({str(artifact)!r}, backend='ort', threads=1)
        r = rt.generate([5, 6, 7], max_new_tokens=8, chat=False)
        assert isinstance(r, GenerationResult) and r.new_tokens >= 1, r
        assert GenerationConfig().medusa  # every name in __all__ resolves
        assert 'torch' not in sys.modules and 'transformers' not in sys.modules
        print('OK', r.token_ids)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("OK")


def _copy(artifact, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(artifact, dst)
    return dst


def test_missing_and_truncated_files(artifact, tmp_path):
    art = _copy(artifact, tmp_path)
    (art / "tokenizer.json").unlink()
    with pytest.raises(ArtifactError, match="tokenizer.json is missing"):
        MedusaRuntime.load(art)
    art2 = tmp_path / "copy2"
    shutil.copytree(artifact, art2)
    with open(art2 / "medusa.onnx", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ArtifactError, match="truncated"):
        MedusaRuntime.load(art2)
    with pytest.raises(ArtifactError, match="no manifest.json"):
        MedusaRuntime.load(tmp_path)


def test_corrupt_file_detected_by_hash(artifact, tmp_path):
    art = _copy(artifact, tmp_path)
    data = bytearray((art / "vanilla.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (art / "vanilla.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        MedusaRuntime.load(art, check_hashes=True)


def test_manifest_from_another_version(artifact, tmp_path):
    art = _copy(artifact, tmp_path)
    m = json.loads((art / "manifest.json").read_text())
    m["format_version"] = 99
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="version 99"):
        MedusaRuntime.load(art)


def test_tree_that_does_not_fit_the_graph(artifact, tmp_path):
    with pytest.raises(TreeError, match="exported graph has 3 heads"):
        MedusaRuntime.load(artifact, tree="chain-4")
    wide = tmp_path / "wide.json"
    wide.write_text(json.dumps({"medusa_choices": [[0], [10]]}))
    with pytest.raises(TreeError, match=r"rank 10, outside 0\.\.9.*top-10"):
        MedusaRuntime.load(artifact, tree=str(wide))


def test_prompt_longer_than_max_seq(runtimes):
    with pytest.raises(InputError, match="maximum sequence is 128"):
        runtimes["ort"].generate(list(range(1, 140)), max_new_tokens=4)


def test_failed_build_leaves_nothing(tiny_dirs, tmp_path, monkeypatch):
    from medusa_export.exporter import build as build_mod
    from medusa_export.runtime.errors import ExportValidationError

    def fail(*_a, **_k):
        raise ExportValidationError("simulated validation failure")

    monkeypatch.setattr(build_mod, "validate_graph", fail)
    out = tmp_path / "art"
    with pytest.raises(ExportValidationError):
        build_mod.build_artifact(str(tiny_dirs[0]), out, BuildOptions(heads=str(tiny_dirs[1]), tree="chain-2", max_seq=64), log=lambda _m: None)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_fp16_artifact(tiny_dirs, tmp_path):
    """fp16 export validates, keeps fp16 KV buffers, and agrees with the fp32 reference on top-1."""
    from medusa_export.exporter.build import build_artifact
    from medusa_export.runtime.compare import compare_backends

    out = tmp_path / "fp16"
    m = build_artifact(str(tiny_dirs[0]), out, BuildOptions(heads=str(tiny_dirs[1]), tree="chain-2", dtype="fp16", max_seq=96), log=lambda _m: None)
    assert m.dims.dtype == "float16" and m.validation["medusa"]["tolerance"] == 5e-2
    assert assert_round_trips(out) == m
    rt = MedusaRuntime.load(out, backend="ort", threads=1)
    s = rt.generator.backend.new_session()
    assert s.kv.buffers()[0].dtype == np.float16
    ref = MedusaRuntime.load(out, backend="torch", threads=1).generator
    report = compare_backends({"torch": ref, "ort": rt.generator}, ["t5 t6 t7", "t1 t2 t3"], max_new_tokens=8,
                              prob_tolerance=2e-2)
    assert report["summary"]["ort"]["top1_agreement"] >= 0.9
    assert report["summary"]["ort"]["max_prob_error"] < 2e-2


def test_fp16_export_leaves_the_callers_model_alone(tiny, tmp_path):
    """Export and validation of an fp16 graph work on a copy: the caller's weights keep dtype and values."""
    import torch

    from medusa_export.exporter.onnx_export import export_step_graph
    from medusa_export.exporter.step_model import StepModel
    from medusa_export.exporter.validate import validate_graph

    from conftest import make_heads

    step = StepModel(tiny.model, make_heads(tiny.model, NUM_HEADS, seed=7), 10, 8)  # the artifact's heads
    before = {k: v.clone() for k, v in step.state_dict().items()}
    export_step_graph(step, tmp_path / "m.onnx", dtype="float16")
    report = validate_graph(step, tmp_path / "m.onnx", dtype="float16")
    assert report["tolerance"] == 5e-2
    after = step.state_dict()
    for k, v in before.items():
        assert after[k].dtype == torch.float32 and torch.equal(after[k], v), k


def test_medusa2_model_directory_loads_with_its_heads(tiny, make_tokenizer, tmp_path):
    """The reference's Medusa-2 layout: `medusa_head.*` tensors in the model's safetensors, the Medusa settings
    in config.json. `build` takes it with no --heads; greedy Medusa equals greedy vanilla on every backend."""
    from safetensors.torch import load_file, save_file

    from conftest import make_heads
    from medusa_export.exporter.build import build_artifact

    model_dir = tmp_path / "medusa2"
    tiny.model.save_pretrained(model_dir)
    make_tokenizer(eos_ids=()).save(model_dir)
    heads = make_heads(tiny.model, 3, seed=21)
    weights = load_file(str(model_dir / "model.safetensors"))
    weights.update({"medusa_head." + k.removeprefix("blocks."): v for k, v in heads.state_dict().items()})
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**cfg, "medusa_num_heads": 3, "medusa_num_layers": 1}))

    m = build_artifact(str(model_dir), tmp_path / "art", BuildOptions(tree="chain-3", max_seq=96), log=lambda _m: None)
    assert m.heads.source == "model" and m.heads.trained and m.dims.num_heads == 3
    assert assert_round_trips(tmp_path / "art") == m
    ort_rt = MedusaRuntime.load(tmp_path / "art", backend="ort", threads=1)
    torch_rt = MedusaRuntime.load(tmp_path / "art", backend="torch", threads=1)
    fused = torch_rt.generator.backend.medusa_step.heads.state_dict()
    for k, v in heads.state_dict().items():
        assert np.array_equal(fused[k].numpy(), v.numpy()), k  # the heads inside the model, not fresh ones
    for prompt in TINY_PROMPTS:
        ref = _tokens(ort_rt, prompt, medusa=False)
        assert _tokens(ort_rt, prompt, medusa=True) == ref
        assert _tokens(torch_rt, prompt, medusa=True) == ref == _tokens(torch_rt, prompt, medusa=False)
    fresh = MedusaRuntime.load(tmp_path / "art", backend="ort", threads=1)
    # Rows free by fixed step costs: every step runs the heads' tree, whatever this machine's timings say
    fresh.generator.spec.alone_cost = {True: ClockFreeCost(row_share=0.0), False: ClockFreeCost(row_share=0.0)}
    accepted = fresh.generate(list(TINY_PROMPTS[0]), max_new_tokens=24, context_drafts=False).mean_accepted
    assert accepted > 1.0  # the heads guess right sometimes: they are the model's heads, not fresh ones


def test_external_data_for_large_weights(tiny_model, tmp_path, monkeypatch):
    """Over the 2 GB protobuf limit weights go to `<name>.onnx.data`; here the limit is lowered to force it."""
    import onnxruntime as ort

    from medusa_export.exporter import onnx_export
    from medusa_export.exporter.step_model import StepModel

    monkeypatch.setattr(onnx_export, "TWO_GB", 0)
    path = onnx_export.export_step_graph(StepModel(tiny_model, None, 10, 8), tmp_path / "vanilla.onnx")
    assert (tmp_path / "vanilla.onnx.data").stat().st_size > (tmp_path / "vanilla.onnx").stat().st_size
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert sess.get_outputs()[0].name == "next_token_ids"


def test_ort_sessions_and_runtime_close(artifact):
    with MedusaRuntime.load(artifact, backend="ort", threads=1) as rt:
        assert rt.notes == ()
        with rt.generator.backend.new_session() as s:
            s.run(np.array([5, 6]), np.arange(2), np.tri(2, dtype=bool), True, 1.0)
        with pytest.raises(ValueError, match="closed"):
            s.run(np.array([5]), np.arange(1), np.ones((1, 1), bool), True, 1.0)
    with pytest.raises(ValueError, match="closed"):
        rt.generator.backend.new_session()


def test_graphs_keep_no_memory_pattern_per_shape(artifact):
    """ONNX Runtime plans and keeps a memory pattern for each distinct set of input shapes, and a step's shapes change
    with its past: a server's patterns grew with every length it met (docs/serving.md, "Memory under load")."""
    with MedusaRuntime.load(artifact, backend="ort", threads=1) as rt:
        rt.generate_many([[5, 6, 7], [8, 9]], max_new_tokens=3)  # the lanes graph opens too
        backend = rt.generator.backend
        sessions = [backend.graph(kind) for kind in ("medusa", "vanilla")] + [backend.lanes.session]
        assert all(not s.get_session_options().enable_mem_pattern for s in sessions)


class _Shifted:
    """A backend whose base model always ranks another token first: its top-1 never agrees with the original."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def new_session(self, capacity=None):
        from dataclasses import replace

        inner = self.inner.new_session(capacity)
        vocab = self.inner.dims.vocab_size

        class Session:
            capacity, length = property(lambda s: inner.capacity), property(lambda s: inner.length)

            def run(s, *args, **options):
                out = inner.run(*args, **options)
                return replace(out, next_ids=(out.next_ids + 1) % vocab)

            def keep(s, rows):
                inner.keep(rows)

            def __enter__(s):
                return s

            def __exit__(s, *exc):
                inner.close()

        return Session()


def test_compare_reports_backends_that_never_agree(artifact):
    """`verify`'s comparison with no position where the top-1 agrees: a report (agreement 0, error unbounded:
    None, since JSON has no infinity; not OK), not a crash on an empty selection."""
    from medusa_export.runtime.compare import compare_backends
    from medusa_export.runtime.generator import Generator

    gen = MedusaRuntime.load(artifact, backend="ort", threads=1).generator
    shifted = Generator(_Shifted(gen.backend), gen.tokenizer, gen.tree)
    report = compare_backends({"ort": gen, "shifted": shifted}, ["t5 t6 t7"], max_new_tokens=4)
    s = report["summary"]["shifted"]
    assert s["top1_agreement"] == 0.0 and s["max_prob_error"] is None and s["ok"] is False


def test_ort_refuses_a_gpu_device_in_one_line(artifact):
    from medusa_export.runtime.errors import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match=r"--device cuda is not supported by the ONNX Runtime backend"):
        MedusaRuntime.load(artifact, backend="ort", device="cuda")
