"""Load an artifact and serve it with uvicorn (what `medusa-export serve` runs).

    run_server("artifacts/smollm2", host="127.0.0.1", port=8000, settings=ServeSettings(workers=1))
"""

from __future__ import annotations

import os
import signal

from .. import extras
from .app import ServeSettings, create_app


def default_threads(workers: int) -> int:
    """ONNX Runtime threads per decode worker: the cores shared out (decode steps are compute-bound here)."""
    return max(1, (os.cpu_count() or 1) // workers)


def run_server(artifact: str, host: str = "127.0.0.1", port: int = 8000, backend: str = "ort",
               settings: ServeSettings = ServeSettings(), threads: int | None = None, tree: str | None = None,
               shutdown_deadline_s: float = 30.0, log=print) -> bool:
    """Serve until SIGINT/SIGTERM; True when every admitted request had ended when it stopped (a clean drain)."""
    extras.require("serve", "serve")
    import uvicorn

    from ..api import MedusaRuntime

    runtime = MedusaRuntime.load(artifact, backend=backend, tree=tree, threads=threads or default_threads(settings.workers))
    app = create_app(runtime, settings)
    for note in runtime.notes:
        log(f"note: {note}")
    log(f"serving {settings.model_name or runtime.manifest.model.name} from {artifact} on http://{host}:{port} "
        f"({settings.workers} decode worker(s), queue {settings.max_queue}, {backend})")
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
