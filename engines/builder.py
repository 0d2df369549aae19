"""Build TensorRT engines (serialized plans) from an artifact's ONNX graphs, and record them in its manifest.

    build_engines("artifacts/gpu", BuildOptions(workspace_gib=8), log=print)

For each graph (medusa, vanilla): parse the ONNX file with OnnxParser.parse_from_file (external weight
files resolve next to it), add the prefill and step optimization profiles (`profiles.py`), apply the
precision plan (`precision.py`), reuse a timing cache kept across builds, build, and write
``<kind>.plan`` atomically. ``manifest.engines[kind]`` (an `EngineRecord`) records the plan file, the TensorRT
version, GPU name and compute capability (checked by `runtime/backends/trt_compat.py` before loading), the
precision, the profiles and the build time; ``manifest.files`` gets the plan's size and sha256.
"""

from __future__ import annotations

import numbers
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from medusa_export.runtime import io_table
from medusa_export.runtime.artifact_files import artifact_file, check_external_data
from medusa_export.runtime.cache_dir import cache_root
from medusa_export.runtime.errors import InputError, MedusaExportError
from medusa_export.runtime.generation_config import is_int
from medusa_export.runtime.backends.trt_compat import require_portable
from medusa_export.runtime.backends.base import ModelDims
from medusa_export.runtime.manifest import BuilderFlags, EngineRecord, Manifest, file_record
from medusa_export.runtime.whole_file import write_whole

from medusa_export.runtime.backends import trt_availability as availability

from . import precision
from .profiles import DEFAULT_BATCH_TOKENS, Profile, engine_profiles


class EngineBuildError(MedusaExportError, RuntimeError):
    """TensorRT could not parse or build a graph; the message carries TensorRT's first error."""


@dataclass
class BuildOptions:
    workspace_gib: float | None = None  # builder scratch memory limit (None: TensorRT's default, the GPU's memory)
    max_prompt: int | None = None  # prefill profile's largest T (default max_seq // 2; longer prompts run in chunks)
    opt_prompt: int | None = None  # prefill T the kernels are tuned for
    opt_past: int | None = None  # past length the step kernels are tuned for
    strongly_typed: bool = True  # TensorRT 10 only: False builds weakly typed with BuilderFlag.FP16/BF16
    allow_tf32: bool = False  # fp32 graphs: keep TensorRT's TF32 matmuls (faster, ~1e-3 relative error)
    optimization_level: int | None = None  # IBuilderConfig.builder_optimization_level (0-5; TensorRT default 3)
    timing_cache: str | Path | None = None  # default: $MEDUSA_EXPORT_CACHE/tensorrt/timing-<trt>-<sm>.cache
    max_num_seqs: int = 1  # > 1: the vanilla engine gets a batch profile for that many sequences per step
    batch_tokens: int = DEFAULT_BATCH_TOKENS  # the batch profile's rows per sequence (more run in causal chunks)

    def __post_init__(self) -> None:
        """Values TensorRT would take as given (a negative workspace) or refuse deep in a build: InputError naming
        the option, before TensorRT is looked for."""
        for name in ("max_prompt", "opt_prompt", "opt_past", "max_num_seqs", "batch_tokens"):
            value = getattr(self, name)
            if value is not None and not (is_int(value) and value >= 1):
                raise InputError(f"--{name.replace('_', '-')} {value!r:.40}: give an integer >= 1")
            setattr(self, name, None if value is None else int(value))  # a numpy integer too
        level = self.optimization_level
        if level is not None and not (is_int(level) and 0 <= level <= 5):
            raise InputError(f"--optimization-level {level!r:.40}: give an integer in 0..5 (TensorRT's default is 3)")
        gib = self.workspace_gib
        if gib is not None and not (isinstance(gib, numbers.Real) and not isinstance(gib, bool) and 0 < gib < 1 << 20):
            raise InputError(f"--workspace-gib {gib!r:.40}: give a size in GiB above 0, or leave it out for the GPU's "
                             f"memory")


def default_timing_cache(tensorrt_version: str, device: availability.Device) -> Path:
    """One cache per TensorRT version and GPU architecture (a cache from another one is rejected anyway)."""
    return cache_root() / "tensorrt" / f"timing-{tensorrt_version}-{device.sm}.cache"


def _atomic_write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, lambda f: f.write(data))


def _make_logger(trt, log: Callable[[str], None], verbose: bool = False):
    """A TensorRT logger that keeps errors (for the exception message) and forwards warnings when verbose."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg) -> None:  # noqa: A003 - TensorRT's interface
            level = int(severity)  # INTERNAL_ERROR 0, ERROR 1, WARNING 2, INFO 3, VERBOSE 4
            if level <= 1:
                self.errors.append(str(msg))
            elif level == 2 and verbose:
                log(f"    TensorRT: {msg}")

        def last_error(self) -> str:
            return self.errors[-1].splitlines()[0][:300] if self.errors else "see the TensorRT log above"

    return _Logger()


def network_flags(trt, strongly_typed: bool) -> int:
    """``create_network``'s bit mask. TensorRT 10: the STRONGLY_TYPED bit (value 1) for a strongly typed network.
    TensorRT 11: 0, since every network is strongly typed and NetworkDefinitionCreationFlag.STRONGLY_TYPED is
    deprecated and ignored (NvInfer.h of 11.x; the 10.x-to-11.x migration guide): not naming it keeps the build
    working when the member goes."""
    if not strongly_typed or precision.major_version(trt.__version__) >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def _build_plan(trt, onnx_path: Path, plan: precision.PrecisionPlan, profiles: list[Profile], dims: ModelDims,
                options: BuildOptions, cache_path: Path, log: Callable[[str], None]):
    logger = _make_logger(trt, log)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt, plan.strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        first = errors[0].splitlines()[0][:300] if errors else logger.last_error()
        raise EngineBuildError(f"TensorRT cannot parse {onnx_path.name}: {first}")
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    expected = set(io_table.input_names(dims.num_layers))
    if not expected <= names:
        raise EngineBuildError(f"{onnx_path.name} lacks graph inputs {sorted(expected - names)[:4]}: rebuild the artifact")

    config = builder.create_builder_config()
    if options.workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * (1 << 30)))
    for flag in plan.set_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    for flag in plan.clear_flags:
        if hasattr(trt.BuilderFlag, flag):
            config.clear_flag(getattr(trt.BuilderFlag, flag))
    if options.optimization_level is not None:
        config.builder_optimization_level = int(options.optimization_level)
    for p in profiles:
        prof = builder.create_optimization_profile()
        try:
            for name, (lo, opt, hi) in p.shapes(dims.num_layers, dims.num_kv_heads, dims.head_dim).items():
                prof.set_shape(name, lo, opt, hi)  # the binding raises RuntimeError on inconsistent shapes
        except RuntimeError as e:
            raise EngineBuildError(f"TensorRT rejected the {p.name} profile (T {p.seq}, past {p.past}): {e}") from None
        if config.add_optimization_profile(prof) < 0:
            raise EngineBuildError(f"TensorRT rejected the {p.name} profile (T {p.seq}, past {p.past}): {logger.last_error()}")

    cached = cache_path.read_bytes() if cache_path.exists() else b""
    try:
        cache = config.create_timing_cache(cached)  # None (or an error) for a corrupt or foreign blob
    except Exception:  # noqa: BLE001 - the cache only saves time
        cache = None
    # ignore_mismatch=False: a cache from another device is refused; then (or when unreadable) start a fresh one.
    # set_timing_cache takes an ITimingCache, never None.
    if cache is None or not config.set_timing_cache(cache, False):
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT could not build an engine from {onnx_path.name}: {logger.last_error()}")
    try:
        _atomic_write(cache_path, config.get_timing_cache().serialize())
    except OSError as e:  # the cache only saves time; never fail a build on it
        log(f"    (timing cache not saved: {e})")
    return serialized


def build_engine(directory: Path, manifest: Manifest, kind: str, options: BuildOptions,
                 log: Callable[[str], None] = print) -> EngineRecord:
    """Build ``<kind>.plan`` in ``directory``; returns its manifest record (the caller writes the manifest)."""
    trt = availability.import_tensorrt()
    status = availability.require()
    dims = manifest.dims
    graph = manifest.graphs[kind]
    onnx_path = artifact_file(directory, graph.file)
    check_external_data(directory, graph.file, manifest.files)  # the parser opens the files the graph names
    profiles = engine_profiles(manifest, kind, options.max_prompt, options.opt_prompt, options.opt_past,
                               options.max_num_seqs, options.batch_tokens)
    plan = precision.choose(dims.dtype, trt.__version__, options.strongly_typed, options.allow_tf32)
    cache_path = Path(options.timing_cache) if options.timing_cache else default_timing_cache(trt.__version__, status.device)
    t0 = time.perf_counter()
    log(f"  build TensorRT {kind} engine ({plan.label}; profiles "
        + ", ".join(f"{p.name} T={p.seq[0]}..{p.seq[2]} past<={p.past[2]}" + (f" x{p.batch[2]}" if p.batched else "")
                    for p in profiles) + ") ...")
    try:
        serialized = _build_plan(trt, onnx_path, plan, profiles, dims, options, cache_path, log)
    except EngineBuildError as first:
        weak = precision.fallback(plan, trt.__version__)
        if weak is None:
            raise
        log(f"    strongly typed build failed ({first}); retrying {weak.label}")
        plan = weak
        serialized = _build_plan(trt, onnx_path, plan, profiles, dims, options, cache_path, log)
    plan_file = f"{kind}.plan"
    _atomic_write(directory / plan_file, serialized)
    build_s = time.perf_counter() - t0
    log(f"  build TensorRT {kind} engine: done in {build_s:.1f} s ({(directory / plan_file).stat().st_size / 2**20:.1f} MiB)")
    return EngineRecord(
        file=plan_file, onnx=graph.file, tensorrt_version=str(trt.__version__), gpu_name=status.device.name,
        compute_capability=str(status.device.compute_capability), cuda_runtime=status.cuda_runtime,
        precision=plan.label, strongly_typed=plan.strongly_typed,
        builder_flags=BuilderFlags(list(plan.set_flags), list(plan.clear_flags)),
        profiles=[p.to_record() for p in profiles],
        workspace_bytes=int(options.workspace_gib * (1 << 30)) if options.workspace_gib else None,
        timing_cache=cache_path.name,  # the file name only: the manifest travels, the cache stays here
        build_s=round(build_s, 2))


def build_engines(directory: str | Path, options: BuildOptions | None = None, log: Callable[[str], None] = print,
                  kinds: list[str] | None = None) -> Manifest:
    """Build every graph's engine (or ``kinds``) and write them into the manifest; returns the manifest."""
    directory = Path(directory)
    options = options or BuildOptions()
    manifest = Manifest.read(directory)
    require_portable(manifest, directory)
    for kind in kinds or list(manifest.graphs):
        record = build_engine(directory, manifest, kind, options, log)
        manifest = manifest.replace(engines={**manifest.engines, kind: record},
                                    files={**manifest.files, record.file: file_record(directory / record.file)})
        manifest.write(directory)  # after each engine, so a finished one is never lost
    return manifest
