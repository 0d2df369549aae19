"""TensorRT engine planning without TensorRT: profiles, precision policy, compatibility checks, the
availability fallbacks of `build --engine trt|all`, and the one-line CLI errors."""

from __future__ import annotations

import subprocess
import sys
import types

import numpy as np
import pytest

from medusa_export.engines import precision
from medusa_export.runtime.backends import trt_availability as availability, trt_compat as compat
from medusa_export.runtime.backends.trt_availability import TENSORRT_HINT, Availability, Device
from medusa_export.engines.cli_entry import build_engines_for_artifact, preflight
from medusa_export.engines.profiles import engine_profiles
from medusa_export.runtime.backends.trt_profiles import Profile, plan_chunks, select
from medusa_export.runtime.backends.cuda_buffers import Cuda, CudaError, DeviceArena
from medusa_export.runtime.errors import ArtifactError, BackendUnavailableError, InputError
from manifest_samples import sample_engine_record, sample_manifest, write_fake_artifact  # noqa: E402

SKIP_REASON = availability.skip_reason()
MANIFEST = sample_manifest(num_heads=4, weights="fp16", max_seq=2048, num_layers=3, head_topk=2,
                           tree=[[0], [1], [1, 1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 0, 0, 0]])


@pytest.fixture
def no_tensorrt(monkeypatch):
    """TensorRT missing, whatever this machine has."""
    monkeypatch.setattr(availability, "_tensorrt", lambda: (None, TENSORRT_HINT))
    availability.check.cache_clear()
    yield
    availability.check.cache_clear()


# --------------------------------------------------------------------------------------------- profiles
@pytest.mark.parametrize("kind", ["medusa", "vanilla"])
def test_profiles_are_consistent_shape_sets(kind):
    profiles = engine_profiles(MANIFEST, kind)
    assert [p.name for p in profiles] == ["prefill", "tree" if kind == "medusa" else "decode"]
    for p in profiles:
        shapes = p.shapes(3, 3, 64)
        assert set(shapes) == {"input_ids", "position_ids", "attention_mask"} | {
            f"past_key_values.{i}.{k}" for i in range(3) for k in ("key", "value")}
        for name, (lo, opt, hi) in shapes.items():
            assert len(lo) == len(opt) == len(hi)
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi)), name
            assert lo[0] == hi[0] == 1  # batch 1
        for k in range(3):  # min, opt, max each satisfy total = past + T
            t = shapes["input_ids"][k][1]
            past = shapes["past_key_values.0.key"][k]
            assert past[0] == 1 and past[2:] == (3, 64)
            assert shapes["position_ids"][k] == (1, t)
            assert shapes["attention_mask"][k] == (1, 1, t, past[1] + t)
        assert p.total[2] == 2048  # every profile reaches max_seq exactly


def test_prefill_and_step_profile_ranges():
    prefill, tree = engine_profiles(MANIFEST, "medusa")
    assert (prefill.seq, prefill.past) == ((1, 128, 1024), (0, 0, 1024))
    assert (tree.seq, tree.past, tree.total) == ((11, 11, 11), (0, 256, 2037), (11, 267, 2048))
    _, decode = engine_profiles(MANIFEST, "vanilla")
    assert (decode.seq, decode.past) == ((1, 1, 1), (0, 256, 2047))
    prefill, _ = engine_profiles(MANIFEST, "medusa", max_prompt=2048, opt_prompt=64)
    assert (prefill.seq, prefill.past) == ((1, 64, 2048), (0, 0, 0))
    small = engine_profiles(MANIFEST.replace(max_seq=64), "medusa")
    assert small[0].seq == (1, 32, 32) and small[1].past == (0, 53, 53)
    with pytest.raises(InputError, match="--max-prompt 4096: give 1..2048"):
        engine_profiles(MANIFEST, "medusa", max_prompt=4096)
    with pytest.raises(ValueError, match="min <= opt <= max"):
        Profile("bad", (1, 5, 3), (0, 0, 0))
    assert Profile.from_record(tree.to_record()) == tree


def test_profile_selection_and_chunking():
    profiles = engine_profiles(MANIFEST, "medusa")
    assert select(profiles, 11, 0) == 1  # the fixed tree profile beats the prefill range
    assert select(profiles, 11, 1500) == 1
    assert select(profiles, 5, 0) == 0
    assert select(profiles, 5, 1500) is None
    assert plan_chunks(profiles, 300, 0) == [(0, 300, 0)]
    assert plan_chunks(profiles, 1500, 0) == [(0, 1024, 0), (1024, 1500, 0)]
    assert plan_chunks(profiles, 2047, 0) == [(0, 1024, 0), (1024, 2047, 0)]
    assert plan_chunks(profiles, 5, 1500) is None


# -------------------------------------------------------------------------------------------- precision
def test_precision_policy():
    p = precision.choose("float16", "10.3.0")
    assert (p.strongly_typed, p.set_flags, p.clear_flags) == (True, (), ())
    weak = precision.fallback(p, "10.3.0")
    assert (weak.strongly_typed, weak.set_flags) == (False, ("FP16",))
    assert precision.choose("bfloat16", "10.8.0", strongly_typed=False).set_flags == ("BF16",)
    p11 = precision.choose("float16", "11.1.0", strongly_typed=False)  # TensorRT 11: always strongly typed
    assert (p11.strongly_typed, p11.set_flags) == (True, ())
    assert precision.fallback(p11, "11.1.0") is None
    fp32 = precision.choose("float32", "10.3.0")
    assert fp32.clear_flags == ("TF32",) and fp32.label == "fp32 strongly typed -TF32"
    assert precision.choose("float32", "11.0.0", allow_tf32=True).clear_flags == ()
    assert precision.fallback(fp32, "10.3.0").clear_flags == ("TF32",)
    with pytest.raises(ValueError, match="too old"):
        precision.choose("float16", "8.6.1")
    with pytest.raises(ValueError, match="not supported"):
        precision.choose("int8", "10.3.0")


# ----------------------------------------------------------------------------------------------- compat
RECORD = sample_engine_record()


def test_compat_ok_and_warning():
    assert compat.check(RECORD, compat.Platform("10.3.0.26", "NVIDIA H100", "9.0")) is None
    assert compat.check(RECORD, compat.Platform("10.3.0", "NVIDIA H100", "9.0")) is None  # build number ignored
    warn = compat.check(RECORD, compat.Platform("10.3.0", "NVIDIA H800", "9.0"))
    assert "tuned on NVIDIA H100" in warn and "NVIDIA H800" in warn


@pytest.mark.parametrize("here", [compat.Platform("10.5.0", "NVIDIA A10", "8.6"),
                                  compat.Platform("10.3.0", "NVIDIA A10", "8.6"),
                                  compat.Platform("10.5.0", "NVIDIA H100", "9.0")])
def test_compat_mismatch_asks_for_rebuild(here):
    with pytest.raises(ArtifactError) as e:
        compat.check(RECORD, here, directory="artifacts/gpu")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("engine medusa.plan was built with TensorRT 10.3.0 for NVIDIA H100 (sm_90); this machine has "
                          f"TensorRT {here.tensorrt_version} / {here.gpu_name} (sm_{here.compute_capability.replace('.', '')})"
                          ": rebuild with `medusa-export build --out artifacts/gpu --engine trt`")


# ------------------------------------------------------------------------------------------ availability
@pytest.mark.skipif(SKIP_REASON is None, reason="TensorRT and a GPU are usable here")
def test_this_machine_reports_a_one_line_reason():
    status = availability.check()
    assert not status.ok and "\n" not in status.reason
    assert status.reason == SKIP_REASON
    assert status.reason.startswith(("TensorRT is not installed: pip install tensorrt", "TensorRT ",
                                     "cuda-python is not installed", "no CUDA device found: "))


def test_missing_tensorrt_reason(no_tensorrt):
    assert availability.check() == Availability(False, "TensorRT is not installed: pip install tensorrt (needs a CUDA GPU)")
    with pytest.raises(BackendUnavailableError, match=r"^TensorRT is not installed: pip install tensorrt \(needs a CUDA GPU\)$"):
        availability.import_tensorrt()


def test_old_tensorrt_and_missing_gpu_reasons(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    assert availability._tensorrt()[1] == "TensorRT 8.6.1 is too old: pip install 'tensorrt>=10'"
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))
    monkeypatch.setattr(availability, "cuda_device", lambda index=0: (None, None, "no CUDA device found: cudaGetDeviceCount "
                                                                                  "failed: cudaErrorNoDevice"))
    availability.check.cache_clear()
    try:
        status = availability.check()
        assert (status.ok, status.tensorrt_version) == (False, "10.3.0")
        assert status.reason.startswith("no CUDA device found: ")
    finally:
        availability.check.cache_clear()


def test_device_sm_name():
    assert Device(0, "NVIDIA H100", "9.0").sm == "sm_90"


# ------------------------------------------------------------------------------ build --engine trt | all
def test_engine_all_skips_with_one_line(no_tensorrt, tmp_path):
    lines = []
    assert build_engines_for_artifact(_fake_artifact(tmp_path / "art"), required=False, log=lines.append) is None
    assert lines == ["skipping TensorRT engines: TensorRT is not installed: pip install tensorrt (needs a CUDA GPU)"]


def test_engine_all_skips_an_artifact_whose_tree_does_not_fit_its_context(tmp_path):
    """A tree as long as max_seq has no step profile: `build --engine all` (engines optional) ended in a ValueError's
    traceback after the ONNX artifact was written; `build-engines` names it and the rebuild."""
    tree = [list(map(int, f"{i:0{d}b}")) for d in (1, 2, 3) for i in range(2 ** d)] + [[0, 0, 0, 0], [0, 0, 0, 1]]
    assert len(tree) == 16  # and the root: 17 rows
    art = write_fake_artifact(tmp_path / "art", sample_manifest(num_heads=4, head_topk=2, tree=tree, max_seq=16))
    lines = []
    assert build_engines_for_artifact(art, required=False, log=lines.append) is None
    assert lines == ["skipping TensorRT engines: a tree step of 17 tokens does not fit the artifact's max_seq 16: "
                     "rebuild it with a larger --max-seq or a smaller --tree"]
    with pytest.raises(ArtifactError, match="does not fit the artifact's max_seq 16"):
        build_engines_for_artifact(art, required=True, log=print)


def test_engine_options_take_numpy_numbers():
    from medusa_export.engines.builder import BuildOptions

    options = BuildOptions(max_prompt=np.int64(64), workspace_gib=np.float32(2.5), optimization_level=np.int32(3))
    assert type(options.max_prompt) is int and options.max_prompt == 64 and options.workspace_gib == 2.5
    for bad in ({"workspace_gib": float("nan")}, {"max_num_seqs": True}, {"opt_past": 1.5}):
        with pytest.raises(InputError):
            BuildOptions(**bad)


def test_engine_trt_raises(no_tensorrt, tmp_path):
    with pytest.raises(BackendUnavailableError, match="^TensorRT is not installed"):
        build_engines_for_artifact(_fake_artifact(tmp_path / "art"), required=True, log=print)
    with pytest.raises(BackendUnavailableError):
        preflight("trt")
    preflight("all")
    preflight("onnx")


def test_build_engines_command_exits_2(no_tensorrt, tmp_path):
    from typer.testing import CliRunner

    from medusa_export.runtime.cli.app import _register, app

    _register()
    r = CliRunner().invoke(app, ["build-engines", str(_fake_artifact(tmp_path / "art"))])
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1] == "error: TensorRT is not installed: pip install tensorrt (needs a CUDA GPU)"


@pytest.mark.parametrize("args, words", [
    ([], "has no manifest.json"),
    (["--workspace-gib", "-1"], "--workspace-gib -1.0: give a size in GiB above 0"),
    (["--optimization-level", "9"], "--optimization-level 9: give an integer in 0..5"),
    (["--max-prompt", "0"], "--max-prompt 0: give an integer >= 1"),
    (["--opt-past", "-3"], "--opt-past -3: give an integer >= 1"),
    (["--max-prompt", "99999"], "--max-prompt 99999: give 1.."),
])
def test_build_engines_names_a_bad_artifact_or_option_before_looking_for_tensorrt(no_tensorrt, tmp_path, args, words):
    """Every one was answered "TensorRT is not installed" here; on a GPU machine, a max_prompt past max_seq was a
    ValueError's traceback, and a negative workspace went to TensorRT as given."""
    from typer.testing import CliRunner

    from medusa_export.runtime.cli.app import _register, app

    _register()
    art = tmp_path / "empty" if not args else _fake_artifact(tmp_path / "art")
    art.mkdir(exist_ok=True)
    r = CliRunner().invoke(app, ["build-engines", str(art), *args])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and words in r.output, r.output


def _fake_artifact(directory):
    return write_fake_artifact(directory, sample_manifest(graph_format="portable"))


def test_generate_backend_trt_exits_2_with_one_line(tmp_path):
    art = _fake_artifact(tmp_path / "art")
    cli = "import sys; from medusa_export.runtime.cli.app import main; sys.argv[0] = 'medusa-export'; main()"
    r = subprocess.run([sys.executable, "-c", cli, "generate", str(art), "--backend", "trt", "-p", "hello"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    if SKIP_REASON is not None:
        assert lines[0] == f"error: {SKIP_REASON}"
    else:  # TensorRT present: this artifact has no engines
        assert "no TensorRT engine" in lines[0]


# ------------------------------------------------------------------------------------ the CUDA wrapper
def _fake_cudart(fail: str | None = None, error: tuple[int, str] = (2, "cudaErrorMemoryAllocation")):
    """cuda-python's conventions (checked against cuda-bindings 13.5 on a machine without a GPU): every call returns
    a tuple, ``cudaError_t`` first; on failure the results after it are None; cudaGetErrorName returns
    ``(cudaSuccess, bytes)``."""
    ok = types.SimpleNamespace(value=0)
    bad = types.SimpleNamespace(value=error[0])
    calls = []

    def call(name, *result):
        def f(*args):
            calls.append((name, args))
            return (bad, *[None] * len(result)) if name == fail else (ok, *result)
        return f

    rt = types.SimpleNamespace(
        cudaMemcpyKind=types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2, cudaMemcpyDeviceToDevice=3),
        cudaMalloc=call("cudaMalloc", 4096), cudaFree=call("cudaFree"),
        cudaMemcpyAsync=call("cudaMemcpyAsync"), cudaMemcpy2DAsync=call("cudaMemcpy2DAsync"),
        cudaGetDeviceProperties=call("cudaGetDeviceProperties", types.SimpleNamespace(name=b"NVIDIA H100\0\0", major=9, minor=0)),
        cudaRuntimeGetVersion=call("cudaRuntimeGetVersion", 12040), cudaGetDeviceCount=call("cudaGetDeviceCount", 1),
        cudaGetErrorName=lambda err: (ok, error[1].encode()))
    return rt, calls


def test_cuda_wrapper_unpacks_results_and_reports_errors():
    rt, calls = _fake_cudart()
    cuda = Cuda(rt)
    assert cuda.malloc(100) == 4096
    assert cuda.device_properties(0) == ("NVIDIA H100", 9, 0)
    assert cuda.runtime_version() == "12.4"
    host = np.arange(4, dtype=np.int64)
    cuda.h2d(8192, host, "s")
    assert calls[-1] == ("cudaMemcpyAsync", (8192, host.ctypes.data, 32, 1, "s"))
    cuda.d2d_2d(100, 1000, 300, 1000, 64, 6, "s")
    assert calls[-1] == ("cudaMemcpy2DAsync", (100, 1000, 300, 1000, 64, 6, 3, "s"))
    arena = DeviceArena(cuda, [10, 300, 1])
    assert arena.ptrs == [4096, 4096 + 256, 4096 + 768] and arena.nbytes == 1024
    arena.free()
    assert calls[-1] == ("cudaFree", (4096,))
    failing = Cuda(_fake_cudart(fail="cudaMalloc")[0])
    with pytest.raises(CudaError, match=r"cudaMalloc\(100 bytes\) failed: cudaErrorMemoryAllocation") as err:
        failing.malloc(100)
    # typed: the CLI's handler turns it into one line and exit 2
    from medusa_export.runtime.errors import EngineError, MedusaExportError

    assert isinstance(err.value, EngineError) and isinstance(err.value, MedusaExportError)


def test_cuda_errors_say_what_to_do_about_that_error():
    """Out of memory asks for a smaller --max-seq; a missing or old driver (what cuda-bindings returns on a machine
    without a GPU: cudaErrorInsufficientDriver) asks for the driver, not for memory."""
    oom = Cuda(_fake_cudart(fail="cudaMalloc")[0])
    with pytest.raises(CudaError, match=r"cudaErrorMemoryAllocation \(the GPU is out of memory: .*--max-seq\)"):
        oom.malloc(100)
    no_driver = Cuda(_fake_cudart(fail="cudaMalloc", error=(35, "cudaErrorInsufficientDriver"))[0])
    with pytest.raises(CudaError, match=r"cudaErrorInsufficientDriver \(the NVIDIA driver is missing") as err:
        no_driver.malloc(100)
    assert "out of memory" not in str(err.value)


def test_no_driver_reason_is_one_hint(monkeypatch):
    """What cuda-bindings answers on a machine without a GPU driver: the reason names the error and its one fix."""
    from medusa_export.runtime.backends import cuda_buffers

    rt = _fake_cudart(fail="cudaGetDeviceCount", error=(35, "cudaErrorInsufficientDriver"))[0]
    monkeypatch.setattr(cuda_buffers, "import_cudart", lambda: rt)
    monkeypatch.setattr(availability, "import_cudart", lambda: rt)
    monkeypatch.setattr(availability, "load_cuda", lambda: Cuda(rt))
    device, runtime, reason = availability.cuda_device(0)
    assert device is None and reason == ("no CUDA device found: cudaGetDeviceCount failed: cudaErrorInsufficientDriver "
                                         "(the NVIDIA driver is missing or older than this CUDA runtime: update it)")
