"""The external-data files an ONNX model names, read from its protobuf wire format (the runtime has no ``onnx``
package). Every place a tensor can sit is walked: initializers, sparse initializers, node attributes (tensors and
subgraphs, to any depth), functions and training graphs. A fixed byte pattern would miss an entry whose ``key`` and
``value`` fields come in the other order, which protobuf allows and ONNX Runtime reads.

    names = external_locations(data)     # {"weights.bin"}; OnnxFormatError on bytes that are not a model
    dims = initializer_dims(data, {"cos_cache"})   # {"cos_cache": [(2049, 32)]}: shapes only, no tensor data read
    inputs, outputs = io_names(data)               # the graph's input and output names, as ONNX Runtime lists them
"""

from __future__ import annotations

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5
MAX_DEPTH = 64  # subgraphs nest (If / Loop bodies); a deeper file is refused rather than recursed into

# message -> {field number: the message type of that (length-delimited) field}; fields not listed are skipped
SCHEMA: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "function": {7: "node", 11: "attribute"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {13: "entry"},
}
ENTRY_KEY, ENTRY_VALUE = 1, 2  # a StringStringEntryProto's fields (a TensorProto's external_data: 13)
MODEL_GRAPH, GRAPH_INITIALIZER, TENSOR_DIMS, TENSOR_NAME = 7, 5, 1, 8  # ModelProto.graph, ..., TensorProto.name
GRAPH_INPUT, GRAPH_OUTPUT, VALUE_INFO_NAME = 11, 12, 1  # GraphProto.input / output, ValueInfoProto.name


class OnnxFormatError(ValueError):
    """The bytes are not a well-formed ONNX protobuf."""


def external_locations(data: bytes | memoryview) -> set[str]:
    """The ``location`` values of every external-data entry in an ONNX ModelProto's bytes."""
    names: set[str] = set()
    _walk(memoryview(data), "model", names, 0)
    return names


def initializer_dims(data: bytes | memoryview, names: set[str]) -> dict[str, list[tuple[int, ...]]]:
    """The shapes of the main graph's initializers named in ``names``: one per initializer of that name (a file may
    repeat one), in file order. Only the tensors' headers are parsed; their data (inline or external) is skipped."""
    found: dict[str, list[tuple[int, ...]]] = {}
    for number, wire, graph in _fields(memoryview(data)):
        if number != MODEL_GRAPH or wire != LENGTH:  # several graph fields are merged, as protobuf reads them
            continue
        for n, w, tensor in _fields(graph):
            if n == GRAPH_INITIALIZER and w == LENGTH:
                name, dims = _tensor_header(tensor)
                if name in names:
                    found.setdefault(name, []).append(dims)
    return found


def io_names(data: bytes | memoryview) -> tuple[list[str], list[str]]:
    """The main graph's input and output names, in file order, as ONNX Runtime lists them: an input that is also an
    initializer (an overridable constant of an older IR) is not one. Only names are parsed."""
    inputs, outputs, constants = [], [], set()
    for number, wire, graph in _fields(memoryview(data)):
        if number != MODEL_GRAPH or wire != LENGTH:
            continue
        for n, w, field in _fields(graph):
            if w == LENGTH and n in (GRAPH_INPUT, GRAPH_OUTPUT):
                name = next((bytes(p).decode("utf-8", "replace") for k, kw, p in _fields(field)
                             if k == VALUE_INFO_NAME and kw == LENGTH), "")
                (inputs if n == GRAPH_INPUT else outputs).append(name)
            elif w == LENGTH and n == GRAPH_INITIALIZER:
                constants.add(_tensor_header(field)[0])
    return [name for name in inputs if name not in constants], outputs


def _tensor_header(buf: memoryview) -> tuple[str | None, tuple[int, ...]]:
    """A TensorProto's name and dims (dims packed or not; the last name wins, as protobuf reads it)."""
    name, dims = None, []
    for number, wire, payload in _fields(buf):
        if number == TENSOR_DIMS and wire == VARINT:
            dims.append(_signed(payload))
        elif number == TENSOR_DIMS and wire == LENGTH:
            i = 0
            while i < len(payload):
                value, i = _varint(payload, i)
                dims.append(_signed(value))
        elif number == TENSOR_NAME and wire == LENGTH:
            name = bytes(payload).decode("utf-8", "replace")
    return name, tuple(dims)


def _signed(value: int) -> int:
    """An int64 read from its varint (a negative one takes ten bytes, as two's complement)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _walk(buf: memoryview, kind: str, names: set[str], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise OnnxFormatError(f"messages nested deeper than {MAX_DEPTH}")
    fields = SCHEMA.get(kind, {})
    key = value = None
    for number, wire, payload in _fields(buf):
        if kind == "entry":  # a StringStringEntryProto: the last key and value win, as protobuf reads them
            if wire == LENGTH and number == ENTRY_KEY:
                key = bytes(payload)
            elif wire == LENGTH and number == ENTRY_VALUE:
                value = bytes(payload)
        elif number in fields:
            if wire != LENGTH:
                raise OnnxFormatError(f"field {number} of a {kind} is not a message")
            _walk(payload, fields[number], names, depth + 1)
    if kind == "entry" and key == b"location":
        try:  # strictly: a name decoded with replacements is not the file ONNX Runtime opens (its bytes are)
            names.add((value or b"").decode("utf-8"))
        except UnicodeDecodeError:
            raise OnnxFormatError("an external-data location that is not UTF-8") from None


def _fields(buf: memoryview):
    """(field number, wire type, payload) for each field of one message; the payload of a length-delimited field
    is a view of its bytes, of a varint its value; fixed-width fields are skipped."""
    i, end = 0, len(buf)
    while i < end:
        tag, i = _varint(buf, i)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise OnnxFormatError("a field numbered 0")
        if wire == VARINT:
            value, i = _varint(buf, i)
            yield number, wire, value
        elif wire in (FIXED64, FIXED32):
            i += 8 if wire == FIXED64 else 4
            if i > end:
                raise OnnxFormatError("a fixed-width field runs past the end")
        elif wire == LENGTH:
            length, i = _varint(buf, i)
            if i + length > end:
                raise OnnxFormatError("a length-delimited field runs past the end")
            yield number, wire, buf[i:i + length]
            i += length
        else:  # groups (3, 4) are not used by ONNX; 6 and 7 do not exist
            raise OnnxFormatError(f"wire type {wire}")


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise OnnxFormatError("a truncated or overlong varint")
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not byte & 0x80:
            return value, i
