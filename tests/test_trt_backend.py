"""The TensorRT backend and engine builder.

This machine has no GPU and no TensorRT, so most tests run the real code against two stand-ins:

* ``FakeCuda``: device memory is one numpy byte array, pointers are offsets into it; 2-D copies and
  overlapping copies are checked like CUDA would (an overlapping memcpy fails the test), and a device-to-host
  copy reaches the host array only when its stream is synchronized;
* ``fake_tensorrt()``: the slice of the TensorRT 10/11 Python API that `engines/builder.py` and
  `runtime/backends/trt.py` use. Its builder records what it was asked for and checks that every profile's
  min/opt/max shape sets are consistent (``total = past + T``); its engine runs the artifact's ONNX graph
  with ONNX Runtime, reading inputs from and writing outputs to fake device addresses, and refuses shapes
  outside the active profile and addresses that are not 256-byte aligned.

So the builder's profile and precision handling, the manifest update, and the backend's device-side KV
management (in-place and staged ``present`` rows, chunked prefill, `keep` compaction) are checked against
ONNX Runtime token for token. Real TensorRT runs only where it is installed (the skipif tests at the end).
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest

from medusa_export.runtime.backends import trt_availability as availability
from medusa_export.runtime.backends.trt_availability import Device
from medusa_export.runtime.backends import cuda_buffers
from medusa_export.runtime.backends.trt import row_moves
from medusa_export.runtime.errors import BackendUnavailableError, InputError

ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("onnx")

from fake_cuda import FakeCuda  # noqa: E402
from fake_trt import fake_tensorrt  # noqa: E402
from medusa_export.runtime.build_options import BuildOptions  # noqa: E402
from manifest_samples import assert_round_trips  # noqa: E402

SKIP_REASON = availability.skip_reason()



@pytest.fixture
def fakes(monkeypatch, tmp_path):
    """TensorRT 10.3 + a fake GPU (sm_90) for the builder, the availability checks and the backend."""
    cuda = FakeCuda()
    trt = fake_tensorrt(cuda)
    monkeypatch.setenv("MEDUSA_EXPORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(availability, "_tensorrt", lambda: (trt, ""))
    monkeypatch.setattr(availability, "cuda_device", lambda index=0: (Device(index, "Fake H100", "9.0"), "12.4", ""))
    monkeypatch.setattr(cuda_buffers, "load_cuda", lambda: cuda)
    availability.check.cache_clear()
    yield types.SimpleNamespace(trt=trt, cuda=cuda, record=trt.record)
    availability.check.cache_clear()


# ------------------------------------------------------------------------------------ a tiny artifact
def _tiny_model(directory: Path, kv_heads: int) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=kv_heads, vocab_size=320, max_position_embeddings=256)
    transformers.LlamaForCausalLM(cfg).save_pretrained(directory)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 320)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>"}))
    return directory


def _build_tiny(root: Path, kv_heads: int, max_seq: int = 48, dtype: str = "fp32") -> Path:
    from medusa_export.exporter.build import build_artifact

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _tiny_model(root / "model", kv_heads)
        build_artifact(str(model), root / "art", BuildOptions(heads="fresh", tree="cpu_small_10", max_seq=max_seq, dtype=dtype, graph="portable"), log=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    return root / "art"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """KV rows of 2 heads x 16 x fp32 = 128 bytes: not 256-aligned, so present rows are staged."""
    return _build_tiny(tmp_path_factory.mktemp("tiny2"), kv_heads=2)


@pytest.fixture(scope="module")
def tiny_aligned(tmp_path_factory):
    """KV rows of 4 heads x 16 x fp32 = 256 bytes: present rows are written in place."""
    return _build_tiny(tmp_path_factory.mktemp("tiny4"), kv_heads=4)


@pytest.fixture(scope="module")
def tiny_fp16(tmp_path_factory):
    return _build_tiny(tmp_path_factory.mktemp("tiny16"), kv_heads=2, dtype="fp16")


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


PROMPTS = [[5, 17, 42, 99, 7, 8, 9], [200, 3], list(range(3, 40))]  # the last one is longer than max_prompt (24)


def _generate(directory, backend, prompt, medusa, max_new=12):
    from medusa_export.runtime.api import MedusaRuntime

    rt = MedusaRuntime.load(directory, backend=backend)
    return rt.generator.generate(prompt, _cfg(medusa, max_new))


def _cfg(medusa, max_new):
    from medusa_export.runtime.decode import GenerationConfig

    return GenerationConfig(max_new_tokens=max_new, medusa=medusa, chat=False)


# ----------------------------------------------------------------------------------------------- tests
def test_row_moves_never_overlap_and_compact():
    rng = np.random.default_rng(0)
    for _ in range(300):
        staged = int(rng.integers(1, 16))
        n = int(rng.integers(0, staged + 1))
        rows = np.sort(rng.choice(staged, n, replace=False))
        buf = list(range(staged))
        for dst, src, count in row_moves(rows):
            assert count <= src - dst  # never overlapping
            buf[dst:dst + count] = buf[src:src + count]
        assert buf[:n] == rows.tolist()
    assert row_moves(np.arange(5)) == []
    assert row_moves(np.array([0, 2, 3, 4])) == [(1, 2, 1), (2, 3, 1), (3, 4, 1)]
    assert row_moves(np.array([4, 5, 6])) == [(0, 4, 3)]


def test_builder_records_engines_in_manifest(fakes, tiny, tmp_path):
    from medusa_export.engines.cli_entry import build_engines_for_artifact
    from medusa_export.runtime.manifest import Manifest

    art = _copy(tiny, tmp_path / "art")
    lines = []
    manifest = build_engines_for_artifact(art, required=True, log=lines.append, workspace_gib=2)
    assert any("TensorRT 10.3.0 on Fake H100 (sm_90" in s for s in lines)
    again = Manifest.read(art, check_hashes=True)  # plan files listed with size and sha256
    assert again.engines == manifest.engines and assert_round_trips(art) == again
    for kind, step in (("medusa", ("tree", 11)), ("vanilla", ("decode", 1))):
        rec = again.engines[kind]
        assert rec.file == f"{kind}.plan" and (art / rec.file).exists()
        assert (rec.tensorrt_version, rec.gpu_name, rec.compute_capability) == ("10.3.0", "Fake H100", "9.0")
        assert rec.precision == "fp32 strongly typed -TF32"
        assert [p.name for p in rec.profiles] == ["prefill", step[0]]
        assert rec.profiles[1].seq == (step[1],) * 3
        assert rec.profiles[0].seq[2] == 24 and rec.profiles[0].past == (0, 0, 24)
        assert rec.build_s >= 0 and rec.workspace_bytes == 2 << 30
    builds = fakes.record["builds"]
    assert all(b["strongly_typed"] and "TF32" not in b["flags"] for b in builds)
    assert builds[0]["pools"] == {"WORKSPACE": 2 << 30}
    # The timing cache written by the first build is read by the second.
    assert builds[0]["cache_in"] == b"" and builds[1]["cache_in"].startswith(b"timing:")
    cache_files = list((tmp_path / "cache" / "tensorrt").glob("timing-10.3.0-sm_90.cache"))
    assert len(cache_files) == 1


def test_an_unreadable_timing_cache_is_replaced(fakes, tiny, tmp_path):
    """create_timing_cache gives no cache for a corrupt blob: the build starts a fresh one and overwrites the file."""
    from medusa_export.engines.cli_entry import build_engines_for_artifact

    art = _copy(tiny, tmp_path / "art")
    cache = tmp_path / "cache" / "tensorrt" / "timing-10.3.0-sm_90.cache"
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"not a timing cache")
    build_engines_for_artifact(art, required=True, log=lambda s: None)
    assert fakes.record["builds"][0]["cache_in"] == b""
    assert cache.read_bytes().startswith(b"timing:")


def test_a_timing_cache_from_another_gpu_is_refused_and_replaced(fakes, tiny, tmp_path):
    """set_timing_cache(cache, ignore_mismatch=False) returns False for another GPU's cache (NvInfer.h): the build
    uses a fresh cache rather than another device's timings, and saves its own."""
    from medusa_export.engines.cli_entry import build_engines_for_artifact

    cache = tmp_path / "cache" / "tensorrt" / "timing-10.3.0-sm_90.cache"
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"timing:sm_80:entries")
    build_engines_for_artifact(_copy(tiny, tmp_path / "art"), required=True, log=lambda s: None)
    assert fakes.record["builds"][0]["cache_in"] == b""
    assert cache.read_bytes() == b"timing:sm_90:entries"
    build_engines_for_artifact(_copy(tiny, tmp_path / "again"), required=True, log=lambda s: None)
    assert fakes.record["builds"][-1]["cache_in"] == b"timing:sm_90:entries"  # this GPU's own cache is reused


def test_trt_backend_matches_ort_staged_rows(fakes, tiny, tmp_path):
    _check_against_ort(fakes, _copy(tiny, tmp_path / "art"), expect_in_place=False)


def test_trt_backend_matches_ort_in_place_rows(fakes, tiny_aligned, tmp_path):
    _check_against_ort(fakes, _copy(tiny_aligned, tmp_path / "art"), expect_in_place=True)


def _check_against_ort(fakes, art, expect_in_place):
    from medusa_export.engines.cli_entry import build_engines_for_artifact
    from medusa_export.runtime.api import MedusaRuntime

    build_engines_for_artifact(art, required=True, log=lambda s: None)
    ref = MedusaRuntime.load(art, backend="ort").generator
    gen = MedusaRuntime.load(art, backend="trt").generator
    assert gen.backend.name == "trt" and gen.backend.notes == ()
    for prompt in PROMPTS:
        for medusa in (False, True):
            a = ref.generate(prompt, _cfg(medusa, 10))
            b = gen.generate(prompt, _cfg(medusa, 10))
            assert b.token_ids == a.token_ids, (prompt, medusa)
            # Step counts may differ: the plans follow each backend's measured step times, and the TensorRT Medusa
            # engine verifies the whole tree at every step (`whole_tree_steps`); the tokens may not.
    session = gen.backend.new_session()
    assert session.in_place is expect_in_place
    # Contexts and KV buffers come from the pool: 2 contexts per released session at most, not per request.
    assert fakes.record["contexts"] <= 2 * 2
    assert 1 in fakes.record["switches"]  # prefill profile -> step profile


def test_step_outputs_match_ort(fakes, tiny, tmp_path):
    """One prefill, a tree step and a keep, compared output by output (incl. a chunked prefill)."""
    from medusa_export.engines.cli_entry import build_engines_for_artifact
    from medusa_export.runtime.api import MedusaRuntime

    art = _copy(tiny, tmp_path / "art")
    build_engines_for_artifact(art, required=True, log=lambda s: None)
    a = MedusaRuntime.load(art, backend="ort").generator
    b = MedusaRuntime.load(art, backend="trt").generator
    tree = a.tree
    for n in (9, 30):  # 30 > max_prompt 24: the TensorRT session runs it as 24 + 6
        sa, sb = a.backend.new_session(), b.backend.new_session()
        ids = np.arange(3, 3 + n)
        oa = sa.run(ids, np.arange(n), np.tri(n, dtype=bool), True, 1.0)
        ob = sb.run(ids, np.arange(n), np.tri(n, dtype=bool), True, 1.0)
        np.testing.assert_array_equal(ob.next_ids, oa.next_ids)
        np.testing.assert_allclose(ob.next_probs, oa.next_probs, atol=1e-6)
        np.testing.assert_array_equal(ob.medusa_ids, oa.medusa_ids)
        np.testing.assert_allclose(ob.entropy, oa.entropy, atol=1e-5)
        if n <= 24:
            np.testing.assert_allclose(ob.input_probs, oa.input_probs, atol=1e-6)
        sa.keep(np.arange(n))
        sb.keep(np.arange(n))
        tokens = np.arange(100, 100 + tree.num_nodes)
        oa = sa.run(tokens, n + tree.depth, tree.mask, True, 0.7)
        ob = sb.run(tokens, n + tree.depth, tree.mask, True, 0.7)
        np.testing.assert_allclose(ob.input_probs, oa.input_probs, atol=1e-6)
        np.testing.assert_array_equal(ob.next_ids, oa.next_ids)
        rows = np.array([0, 2, 5])
        sa.keep(rows)
        sb.keep(rows)
        assert sa.length == sb.length == n + 3
        oa = sa.run(np.array([7]), np.array([n + 3]), np.ones((1, 1), bool), False, 1.0)
        ob = sb.run(np.array([7]), np.array([n + 3]), np.ones((1, 1), bool), False, 1.0)
        np.testing.assert_allclose(ob.next_probs, oa.next_probs, atol=1e-6)


def test_fp16_graph_strongly_typed_then_weak_fallback(fakes, tiny_fp16, tmp_path, monkeypatch):
    from medusa_export.engines.cli_entry import build_engines_for_artifact
    from medusa_export.runtime.api import MedusaRuntime

    art = _copy(tiny_fp16, tmp_path / "a")
    manifest = build_engines_for_artifact(art, required=True, log=lambda s: None)
    assert {r.precision for r in manifest.engines.values()} == {"fp16 strongly typed"}
    assert all(b["strongly_typed"] and "FP16" not in b["flags"] for b in fakes.record["builds"])
    ref = MedusaRuntime.load(art, backend="ort").generator
    gen = MedusaRuntime.load(art, backend="trt").generator
    assert not gen.backend.new_session().in_place  # 2 x 16 x fp16 = 64-byte rows: staged
    for medusa in (False, True):
        assert gen.generate(PROMPTS[0], _cfg(medusa, 8)).token_ids == ref.generate(PROMPTS[0], _cfg(medusa, 8)).token_ids

    # TensorRT 10 refusing the strongly typed network: weakly typed + BuilderFlag.FP16, and the log says so.
    weak = fake_tensorrt(fakes.cuda, refuse_strongly_typed=True)
    monkeypatch.setattr(availability, "_tensorrt", lambda: (weak, ""))
    availability.check.cache_clear()
    art2 = _copy(tiny_fp16, tmp_path / "b")
    lines = []
    manifest = build_engines_for_artifact(art2, required=True, log=lines.append)
    assert {r.precision for r in manifest.engines.values()} == {"fp16 weakly typed +FP16"}
    assert any("strongly typed build failed" in s and "retrying fp16 weakly typed +FP16" in s for s in lines)
    assert [b["strongly_typed"] for b in weak.record["builds"]] == [False, False]
    assert all("FP16" in b["flags"] for b in weak.record["builds"])


def test_tree_that_fits_no_profile_is_a_clear_error(fakes, tiny, tmp_path):
    from medusa_export.engines.cli_entry import build_engines_for_artifact
    from medusa_export.runtime.api import MedusaRuntime

    art = _copy(tiny, tmp_path / "art")
    build_engines_for_artifact(art, required=True, log=lambda s: None)
    backend = MedusaRuntime.load(art, backend="trt").generator.backend
    s = backend.new_session()
    s.run(np.arange(3, 30), np.arange(27), np.tri(27, dtype=bool), True, 1.0)  # 27 > 24: chunked
    s.keep(np.arange(27))
    mask = np.eye(5, dtype=bool)
    mask[1:, 0] = True  # a 5-node tree: not the artifact's 11 nodes, past 27 > the prefill profile's 24
    with pytest.raises(InputError, match="5-token tree step does not fit the medusa engine"):
        s.run(np.arange(5), 27 + np.array([0, 1, 1, 1, 1]), mask, True, 1.0)


def test_stale_engine_is_refused_before_loading(fakes, tiny, tmp_path, monkeypatch):
    from medusa_export.engines.cli_entry import build_engines_for_artifact
    from medusa_export.runtime.api import MedusaRuntime
    from medusa_export.runtime.errors import ArtifactError

    art = _copy(tiny, tmp_path / "art")
    build_engines_for_artifact(art, required=True, log=lambda s: None)
    monkeypatch.setattr(availability, "cuda_device", lambda index=0: (Device(index, "NVIDIA A10", "8.6"), "12.4", ""))
    availability.check.cache_clear()
    with pytest.raises(ArtifactError, match=r"built with TensorRT 10\.3\.0 for Fake H100 \(sm_90\); this machine has "
                                            r"TensorRT 10\.3\.0 / NVIDIA A10 \(sm_86\): rebuild with"):
        MedusaRuntime.load(art, backend="trt")


def test_backend_without_engines_says_how_to_build(fakes, tiny):
    from medusa_export.runtime.api import MedusaRuntime
    from medusa_export.runtime.errors import ArtifactError

    with pytest.raises(ArtifactError, match="no TensorRT engine for the vanilla and medusa graph: rebuild with"):
        MedusaRuntime.load(tiny, backend="trt")


@pytest.mark.skipif(SKIP_REASON is None, reason="TensorRT is installed here")
def test_trt_backend_without_tensorrt_raises_install_hint(tiny):
    from medusa_export.runtime.api import MedusaRuntime

    with pytest.raises(BackendUnavailableError, match=r"^TensorRT is not installed: pip install tensorrt \(needs a CUDA GPU\)$"):
        MedusaRuntime.load(tiny, backend="trt")


# ------------------------------------------------------------------------ real TensorRT (GPU machines)
def _real_engines(artifact, tmp_path):
    """Copy the artifact, build real engines into it, and open it with ONNX Runtime and TensorRT."""
    from medusa_export.engines.cli_entry import build_engines_for_artifact
    from medusa_export.runtime.api import MedusaRuntime

    art = _copy(artifact, tmp_path / "art")
    build_engines_for_artifact(art, required=True, log=print)
    return MedusaRuntime.load(art, backend="ort").generator, MedusaRuntime.load(art, backend="trt").generator


@pytest.mark.gpu
@pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")
def test_real_tensorrt_matches_ort(tiny, tmp_path):
    ref, gen = _real_engines(tiny, tmp_path)
    for prompt in PROMPTS:
        for medusa in (False, True):
            assert gen.generate(prompt, _cfg(medusa, 10)).token_ids == ref.generate(prompt, _cfg(medusa, 10)).token_ids


@pytest.mark.gpu
@pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")
def test_real_tensorrt_aligned_rows_in_place(tiny_aligned, tmp_path):
    ref, gen = _real_engines(tiny_aligned, tmp_path)
    assert gen.backend.new_session().in_place
    for prompt in PROMPTS:
        assert gen.generate(prompt, _cfg(True, 10)).token_ids == ref.generate(prompt, _cfg(True, 10)).token_ids
