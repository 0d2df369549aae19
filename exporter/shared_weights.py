"""One weights file for all the graphs of an artifact.

    record = share_weights(work, ["medusa.onnx", "vanilla.onnx", "lanes.onnx"])   # rewrites the graph files
    record   # {"file": "weights.bin", "bytes": ..., "tensors": distinct tensors stored, "references": ...}

The medusa, vanilla and lanes graphs hold the same backbone weights; written as they are exported, each graph file
carries its own copy (the default model's fp32 artifact: three of 0.65 GB). Here every initializer of at least
`MIN_BYTES` moves to ``weights.bin``, each distinct content once (4 KiB aligned, so that ONNX Runtime can map it),
and each graph names its place there (ONNX external data, resolved next to the graph file). Graphs built with
their own ``<graph>.data`` file lose it. ONNX Runtime and TensorRT's parser read the result like any graph with
external data.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from medusa_export.runtime.artifact_files import SHARED_WEIGHTS_FILE

WEIGHTS_FILE = SHARED_WEIGHTS_FILE  # the loader opens no other name (artifact_files.check_external_data)
ALIGN = 4096
MIN_BYTES = 1024  # smaller initializers (shapes, scalars, norms of tiny models) stay in the graph file


def share_weights(directory: Path, graph_files: list[str]) -> dict:
    """Move the initializers of every graph in ``graph_files`` (names inside ``directory``) to one shared file."""
    import onnx
    from onnx.external_data_helper import set_external_data

    directory = Path(directory)
    stored: dict[bytes, tuple[int, int]] = {}  # content digest -> (offset, length)
    references = 0
    with open(directory / WEIGHTS_FILE, "wb") as out:
        for name in graph_files:
            path = directory / name
            model = onnx.load(str(path))  # with its external data, if it has any
            for tensor in model.graph.initializer:
                if not tensor.HasField("raw_data") or len(tensor.raw_data) < MIN_BYTES:
                    continue
                raw = tensor.raw_data
                digest = hashlib.sha256(raw).digest()
                if digest not in stored:
                    out.write(b"\0" * (-out.tell() % ALIGN))
                    stored[digest] = (out.tell(), len(raw))
                    out.write(raw)
                offset, length = stored[digest]
                set_external_data(tensor, WEIGHTS_FILE, offset=offset, length=length)
                tensor.data_location = onnx.TensorProto.EXTERNAL
                tensor.ClearField("raw_data")
                references += 1
            onnx.save_model(model, str(path))
            (directory / f"{name}.data").unlink(missing_ok=True)
        size = out.tell()
    return {"file": WEIGHTS_FILE, "bytes": size, "tensors": len(stored), "references": references}
