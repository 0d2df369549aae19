"""The same OpenAI app as a Ray Serve deployment: Ray does the replicas, placement, autoscaling and the HTTP
proxy's load balancing; each replica loads the artifact once and runs `create_app` (bounded queue, metrics).

    medusa-export serve ARTIFACT --ray --replicas 2                      # a local Ray, or the one RAY_ADDRESS names
    serve run medusa_export.runtime.serve.ray_app:app_builder artifact=/path/to/artifact replicas=2 max_num_seqs=8

On a cluster: `ray start --head` on one machine, `ray start --address HEAD:6379` on the others (or KubeRay's
RayService with the `serve run` import path above); every machine needs the artifact at the same path.
Autoscaling: pass ``autoscaling='{"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 1}'``
to `app_builder` instead of ``replicas``. A replica takes ``max_num_seqs`` requests at a time (Ray's
``max_ongoing_requests``: what its engine decodes together), so the HTTP proxy queues the rest and hands each to
the next free replica instead of queueing it behind a busy one.
"""

from __future__ import annotations

import json
import os
import sys

from .app import ServeSettings, create_app
from .request_log import print_to_stderr
from .host_check import hosts_answered, parse_allowed_hosts
from .server import with_bound_hosts


def deployment(artifact: str, backend: str = "ort", settings: ServeSettings = ServeSettings(), replicas: int = 1,
               threads: int | None = None, tree: str | None = None, autoscaling: dict | None = None):
    """A bound Ray Serve application serving ``artifact``."""
    from ray import serve

    threads = threads or 1
    artifact = os.path.abspath(artifact)

    def build_app():  # runs in each replica
        from ..api import MedusaRuntime
        from ..warm_up import warm_up

        runtime = MedusaRuntime.load(artifact, backend=backend, tree=tree, threads=threads)
        if settings.log_requests:  # into the replica's log, as its start line
            print_to_stderr()
        app = create_app(runtime, settings)
        warm_up(app.state.scheduler.engine)  # as `serve`: before the replica takes requests
        # into the replica's log: a 400 invalid_host for every call through an ingress has its reason in sight
        print(f"medusa-export replica of {artifact}: answers {hosts_answered(settings.allowed_hosts or ())}",
              file=sys.stderr, flush=True)
        return app

    scaling = {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": replicas}
    # One request per decode worker on a replica: the rest wait in Ray's proxy, which hands each to the next
    # free replica instead of queueing it behind a busy one.
    ongoing = settings.max_num_seqs or 8
    medusa = serve.deployment(serve.ingress(build_app)(), name="medusa", max_ongoing_requests=ongoing,
                              ray_actor_options={"num_cpus": threads}, **scaling)
    return medusa.bind()


def app_builder(args: dict):
    """`serve run medusa_export.runtime.serve.ray_app:app_builder artifact=DIR [replicas=N] [max_num_seqs=N]
    [max_queue=N] [threads=N] [api_key=KEY] [allowed_hosts=NAMES] [autoscaling=JSON]`. Without ``allowed_hosts``
    (comma-separated, ``*`` for any) the replicas answer loopback host names only: the proxy's address is not known
    here."""
    seqs = int(args["max_num_seqs"]) if "max_num_seqs" in args else None
    hosts = args.get("allowed_hosts")
    settings = ServeSettings(max_num_seqs=seqs, max_queue=int(args.get("max_queue", 8)),
                             api_key=args.get("api_key"), timeout_s=float(args.get("timeout_s", 300)),
                             allowed_hosts=parse_allowed_hosts(hosts) if hosts is not None else None)
    autoscaling = args.get("autoscaling")
    return deployment(args["artifact"], args.get("backend", "ort"), settings, int(args.get("replicas", 1)),
                      int(args["threads"]) if "threads" in args else None, args.get("tree"),
                      json.loads(autoscaling) if isinstance(autoscaling, str) else autoscaling)


def run_ray(artifact: str, host: str = "127.0.0.1", port: int = 8000, backend: str = "ort",
            settings: ServeSettings = ServeSettings(), replicas: int = 1, threads: int | None = None,
            tree: str | None = None, log=print) -> None:
    """Start (or join, with RAY_ADDRESS) a Ray cluster, deploy, and block until interrupted."""
    from .. import extras

    extras.require("serve --ray", "ray")
    import ray
    from ray import serve

    ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})
    log(f"Ray Serve: {replicas} replica(s) of {artifact} on http://{host}:{port} (Ctrl-C stops)")
    settings = with_bound_hosts(settings, host)
    serve.run(deployment(artifact, backend, settings, replicas, threads, tree), blocking=True)
