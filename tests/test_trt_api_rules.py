"""The TensorRT stand-ins keep the real API's rules (tests/fake_trt.py, read from the TensorRT 10/11 headers and
bindings): strongly typed networks without weak-typing flags, TensorRT 11's network flags, the parser's errors and
standard ONNX domains only, engines whose I/O the backend cannot bind. A stand-in that accepted what TensorRT refuses
would let the builder and backend tests pass where a GPU would fail."""

from __future__ import annotations

import json

import pytest

from medusa_export.runtime.backends import trt_availability as availability

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnx")

from fake_trt import fake_tensorrt  # noqa: E402
from test_trt_backend import _copy, fakes, tiny  # noqa: E402,F401 - fixtures shared with that module


def test_tensorrt_11_builds_strongly_typed_without_weak_flags(fakes, tiny, tmp_path, monkeypatch):
    """TensorRT 11: STRONGLY_TYPED is 0 (deprecated, ignored) and BuilderFlag has no FP16 / BF16 members."""
    from medusa_export.engines.cli_entry import build_engines_for_artifact

    trt11 = fake_tensorrt(fakes.cuda, version="11.1.0")
    assert not hasattr(trt11.BuilderFlag, "FP16") and int(trt11.NetworkDefinitionCreationFlag.STRONGLY_TYPED) == 0
    monkeypatch.setattr(availability, "_tensorrt", lambda: (trt11, ""))
    availability.check.cache_clear()
    manifest = build_engines_for_artifact(_copy(tiny, tmp_path / "art"), required=True, log=lambda s: None,
                                          strongly_typed=False)  # --weakly-typed means nothing on 11
    assert {r.precision for r in manifest.engines.values()} == {"fp32 strongly typed -TF32"}
    assert all(b["strongly_typed"] and b["flags"] == [] and b["network_flags"] == 0 for b in trt11.record["builds"])


@pytest.mark.parametrize("version, without_deprecated, bits", [("10.3.0", False, 2), ("11.1.0", False, 0),
                                                                ("11.1.0", True, 0)])
def test_network_flags_name_strongly_typed_only_on_tensorrt_10(fakes, version, without_deprecated, bits):
    """TensorRT 10: STRONGLY_TYPED is bit 1. TensorRT 11: every network is strongly typed and the member is deprecated
    (NvInfer.h: "deprecated and ignored"), so the builder passes 0 and keeps working once the member is removed."""
    from medusa_export.engines.builder import network_flags

    trt = fake_tensorrt(fakes.cuda, version=version, without_deprecated=without_deprecated)
    assert network_flags(trt, True) == bits and network_flags(trt, False) == 0


def test_fake_builder_refuses_weak_flags_on_a_strongly_typed_network_and_logs_why(fakes):
    trt = fakes.trt
    errors = []

    class Logger(trt.ILogger):
        def log(self, severity, msg):
            if int(severity) <= 1:
                errors.append(msg)

    builder = trt.Builder(Logger())
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    assert builder.build_serialized_network(network, config) is None
    assert errors and "strongly typed" in errors[0]


def test_build_failure_carries_tensorrt_first_error(fakes, tiny, tmp_path, monkeypatch):
    """The builder's ILogger keeps TensorRT's errors: a failed build's message names the first one."""
    from medusa_export.engines import builder
    from medusa_export.engines.cli_entry import build_engines_for_artifact

    def drop_a_profile_input(profile, *args):
        shapes = dict(original(profile, *args))
        shapes.pop("position_ids")
        return shapes

    original = builder.Profile.shapes
    monkeypatch.setattr(builder.Profile, "shapes", drop_a_profile_input)
    with pytest.raises(builder.EngineBuildError, match=r"could not build an engine .*lacks \['position_ids'\]"):
        build_engines_for_artifact(_copy(tiny, tmp_path / "art"), required=True, log=lambda s: None)


@pytest.mark.parametrize("setting, message", [(("extra_outputs", ["logits"]), r"has tensors the artifact's graph does "
                                                                              r"not \(\['logits'\]\)"),
                                              (("shape_io", ["position_ids"]), r"takes \['position_ids'\] as shape "
                                                                               r"tensors")])
def test_engines_the_backend_cannot_bind_are_refused_at_load(fakes, tiny, tmp_path, setting, message):
    from medusa_export.engines.cli_entry import build_engines_for_artifact
    from medusa_export.runtime.api import MedusaRuntime
    from medusa_export.runtime.errors import ArtifactError

    art = _copy(tiny, tmp_path / "art")
    build_engines_for_artifact(art, required=True, log=lambda s: None)
    fakes.record[setting[0]] = setting[1]
    with pytest.raises(ArtifactError, match=message):
        MedusaRuntime.load(art, backend="trt")


def test_portable_graphs_reach_tensorrt_with_standard_onnx_ops_only(fakes, tiny, tmp_path):
    """TensorRT's ONNX parser imports standard-domain ops (and plugins by op name): the portable graphs must not carry
    the medusa_export kernels or ONNX Runtime's com.microsoft ops. A graph that does fails to parse, with the
    parser's first error in the message."""
    import onnx

    from medusa_export.engines.builder import EngineBuildError
    from medusa_export.engines.cli_entry import build_engines_for_artifact
    from medusa_export.runtime.kernels import DOMAIN
    from medusa_export.runtime.manifest import file_record

    build_engines_for_artifact(_copy(tiny, tmp_path / "ok"), required=True, log=lambda s: None)
    assert fakes.record["onnx_ops"] and {d for d, _ in fakes.record["onnx_ops"]} == {""}

    art = _copy(tiny, tmp_path / "custom")
    model = onnx.load(art / "medusa.onnx", load_external_data=False)
    node = next(n for n in model.graph.node if n.op_type == "Softmax")
    node.domain = DOMAIN
    onnx.save(model, art / "medusa.onnx")
    raw = json.loads((art / "manifest.json").read_text())
    rec = file_record(art / "medusa.onnx")
    raw["files"]["medusa.onnx"] = {"sha256": rec.sha256, "bytes": rec.bytes}
    (art / "manifest.json").write_text(json.dumps(raw))
    expected = rf"cannot parse medusa.onnx: In node \d+ .*UNSUPPORTED_NODE: .*{DOMAIN}::Softmax"
    with pytest.raises(EngineBuildError, match=expected):
        build_engines_for_artifact(art, required=True, log=lambda s: None)
