"""Load an artifact and serve it with uvicorn (what `medusa-export serve` runs).

    run_server("artifacts/smollm2", host="127.0.0.1", port=8000, settings=ServeSettings(max_num_seqs=8))
"""

from __future__ import annotations

import os
import signal

from .. import extras
from .app import ServeSettings, create_app


def run_server(artifact: str, host: str = "127.0.0.1", port: int = 8000, backend: str = "ort",
               settings: ServeSettings = ServeSettings(), threads: int | None = None, tree: str | None = None,
               shutdown_deadline_s: float = 30.0, log=print) -> bool:
    """Serve until SIGINT/SIGTERM; True when every admitted request had ended when it stopped (a clean drain)."""
    extras.require("serve", "serve")
    import uvicorn

    from ..api import MedusaRuntime

    runtime = MedusaRuntime.load(artifact, backend=backend, tree=tree, threads=threads or os.cpu_count())
    app = create_app(runtime, settings)
    for note in runtime.notes:
        log(f"note: {note}")
    engine = app.state.scheduler.engine
    log(f"serving {settings.model_name or runtime.manifest.model.name} from {artifact} on http://{host}:{port} "
        f"({backend}; {engine.max_num_seqs} sequences per step, {engine.max_num_batched_tokens} tokens per step, "
        f"queue {settings.max_queue}; KV cache preallocated for {engine.max_num_seqs} sequences of "
        f"{runtime.generator.backend.max_seq} tokens: {engine.kv_bytes / 2**20:.0f} MiB)")
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=shutdown_deadline_s)
    # uvicorn drains on SIGTERM, then raises the signal again under the handler it found: with this one in place
    # the process ends by returning, so a clean drain exits 0 (what process managers expect), not 143.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.Server(config).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        runtime.close()
    return app.state.drained_cleanly is not False
