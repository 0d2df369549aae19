"""`runtime.onnx_external`: every external-data file an ONNX model names, wherever its tensor sits, as the
``onnx`` package itself lists them; malformed bytes are an OnnxFormatError."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from medusa_export.runtime.onnx_external import OnnxFormatError, external_locations, initializer_dims  # noqa: E402


def _external(name: str, location: str) -> TensorProto:
    t = numpy_helper.from_array(np.ones(4, np.float32), name)
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        t.external_data.add(key=key, value=value)
    return t


def _model_with_tensors_everywhere() -> onnx.ModelProto:
    """External tensors as an initializer, a sparse initializer's values, a Constant's attribute, inside an If
    branch's Constant (a subgraph), and in a function's node."""
    branch = helper.make_graph([helper.make_node("Constant", [], ["b"], value=_external("in_branch", "branch.bin"))],
                               "branch", [], [helper.make_tensor_value_info("b", TensorProto.FLOAT, [4])])
    sparse = helper.make_sparse_tensor(_external("sparse_values", "sparse.bin"),
                                       numpy_helper.from_array(np.arange(4, dtype=np.int64), "sparse_indices"), [8])
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=_external("constant", "constant.bin")),
         helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)],
        "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        initializer=[_external("init", "weights.bin")], sparse_initializer=[sparse])
    function = helper.make_function("custom", "f", [], ["z"],
                                    [helper.make_node("Constant", [], ["z"], value=_external("fn", "function.bin"))],
                                    [helper.make_opsetid("", 17)])
    return helper.make_model(graph, functions=[function], opset_imports=[helper.make_opsetid("", 17)])


def test_every_place_a_tensor_sits_is_found_as_onnx_lists_them():
    from onnx.external_data_helper import _get_all_tensors

    model = _model_with_tensors_everywhere()
    found = external_locations(model.SerializeToString())
    assert found == {"weights.bin", "sparse.bin", "constant.bin", "branch.bin", "function.bin"}
    listed = {e.value for t in _get_all_tensors(model) for e in t.external_data if e.key == "location"}
    assert listed <= found  # onnx's own walk (it skips functions and sparse tensors) finds nothing more


def test_an_entry_with_its_value_first_and_a_repeated_key():
    """Field order is free in protobuf, and a repeated field's last value wins."""
    model = helper.make_model(helper.make_graph([], "g", [], [], initializer=[_external("w", "first.bin")]))
    data = model.SerializeToString()
    entry = b"\x0a\x08location\x12\x09first.bin"
    assert entry in data
    assert external_locations(data.replace(entry, b"\x12\x09other.bin\x0a\x08location")) == {"other.bin"}
    # a value, the key, then another value in one entry: the last value names the file
    assert external_locations(data.replace(entry, b"\x12\x03xyz\x0a\x08location\x12\x04a.bi")) == {"a.bi"}


def test_a_location_that_is_not_utf8_is_a_format_error():
    """Decoded with replacements, b"w\xffights.bin" was checked as "w\ufffdights.bin" (a listed, hashed file)
    while ONNX Runtime opened the unlisted file of the raw bytes."""
    model = helper.make_model(helper.make_graph([], "g", [], [], initializer=[_external("w", "weights.bin")]))
    data = model.SerializeToString()
    with pytest.raises(OnnxFormatError, match="not UTF-8"):
        external_locations(data.replace(b"weights.bin", b"w\xffights.bin"))


def test_a_model_without_external_data_names_none():
    model = helper.make_model(helper.make_graph([], "g", [], [], initializer=[
        numpy_helper.from_array(np.ones(3, np.float32), "w")]))
    assert external_locations(model.SerializeToString()) == set()


@pytest.mark.parametrize("data", [b"\x3a\xff\xff\xff\xff\x0f", b"\x3a\x05ab", b"\x0f", b"\x08" + b"\xff" * 11,
                                  b"\x00\x01", b"\x3a\x02\x0b\x00"])
def test_malformed_bytes_are_a_format_error(data):
    """A length past the end, a group wire type, an overlong varint, field number 0, a group inside the graph."""
    with pytest.raises(OnnxFormatError):
        external_locations(data)


def test_nesting_is_bounded():
    """Subgraphs nested past MAX_DEPTH (written byte by byte: protobuf itself will not build them) are refused, not
    recursed into without end."""
    def field(number: int, payload: bytes) -> bytes:
        assert len(payload) < 1 << 14
        length = bytes([len(payload)]) if len(payload) < 128 else bytes([len(payload) & 0x7F | 0x80, len(payload) >> 7])
        return bytes([number << 3 | 2]) + length + payload

    graph = b""
    for _ in range(30):  # graph > node > attribute > graph: three messages a level
        graph = field(1, field(5, field(6, graph)))
    with pytest.raises(OnnxFormatError, match="nested deeper"):
        external_locations(field(7, graph))


# ------------------------------------------------------------------ initializer shapes, read without their data
def test_initializer_dims_are_read_as_onnx_reads_them_without_the_data():
    """The shapes of named initializers (inline or external data alike); other initializers and nodes' tensors are
    not reported."""
    inline = numpy_helper.from_array(np.zeros((5, 3), np.float32), "cos_cache")
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Constant", [], ["embed_tokens"], value=numpy_helper.from_array(np.ones(2), "x"))], "g", [],
        [], initializer=[inline, _external("sin_cache", "weights.bin"), _external("other", "weights.bin")]))
    found = initializer_dims(model.SerializeToString(), {"cos_cache", "sin_cache", "embed_tokens"})
    assert found == {"cos_cache": [(5, 3)], "sin_cache": [(4,)]}


def test_initializer_dims_unpacked_negative_repeated_and_merged_graphs():
    """Dims written one field each (protobuf readers accept both forms), a negative dim (a ten-byte varint), a name
    repeated, and two graph fields (protobuf merges them: both graphs' initializers count)."""
    first = helper.make_graph([], "g", [], [], initializer=[numpy_helper.from_array(np.zeros((7, 2)), "cos_cache")])
    second = helper.make_graph([], "h", [], [], initializer=[numpy_helper.from_array(np.zeros((3, 2)), "cos_cache")])
    data = helper.make_model(first).SerializeToString() + b"\x3a" + bytes([second.ByteSize()]) + \
        second.SerializeToString()
    assert onnx.load_from_string(data).graph.initializer[1].dims == [3, 2]
    assert initializer_dims(data, {"cos_cache"}) == {"cos_cache": [(7, 2), (3, 2)]}
    tensor = TensorProto(name="t")
    tensor.dims.extend([-1, 4])
    packed = tensor.SerializeToString()
    unpacked = b"\x08" + b"\xff" * 9 + b"\x01" + b"\x08\x04" + b"\x42\x01t"
    assert TensorProto.FromString(unpacked).dims == [-1, 4]
    for body in (packed, unpacked):
        graph = b"\x2a" + bytes([len(body)]) + body
        assert initializer_dims(b"\x3a" + bytes([len(graph)]) + graph, {"t"}) == {"t": [(-1, 4)]}


@pytest.mark.parametrize("data", [b"\x3a\x04\x2a\x02\x0a\x05", b"\x3a\x03\x2a\x01\x08", b"\x3a\x02\x2a\x05"])
def test_initializer_dims_of_malformed_bytes_are_a_format_error(data):
    """Packed dims that run past their field, a dim without its value, a tensor past the graph."""
    with pytest.raises(OnnxFormatError):
        initializer_dims(data, {"t"})
