"""Start the replicas: join the Ray cluster named by RAY_ADDRESS (or start a local one), start
Serve's HTTP proxy on --host/--port, deploy Front + N EngineReplicas, and block."""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

APP_NAME = "minicpmv"


def run_replicas(args, config, load_kwargs: dict) -> int:
    try:
        import ray
        from ray import serve
        from ray.serve.config import RequestRouterConfig
    except ImportError:
        print("minicpmv serve: --replicas needs Ray Serve: pip install 'minicpmv[ray]'", file=sys.stderr)
        return 2
    import minicpmv

    from .deployments import EngineReplica, Front
    from .router import AffinityRouter

    address = os.environ.get("RAY_ADDRESS") or None  # None: a new local Ray, never a stale one
    # the driver's own minicpmv goes to every node, so all replicas run the same code as this command
    ray.init(address=address or "local", namespace=APP_NAME, log_to_driver=args.log_level == "debug",
             runtime_env={"py_modules": [str(Path(minicpmv.__file__).parent)]})
    serve.start(http_options={"host": args.host, "port": args.port})
    scaling = ({"autoscaling_config": {"min_replicas": args.replicas, "max_replicas": args.max_replicas,
                                       "target_ongoing_requests": args.target_ongoing_requests}}
               if args.max_replicas and args.max_replicas > args.replicas else {"num_replicas": args.replicas})
    placement = {"max_replicas_per_node": args.max_replicas_per_node} if args.max_replicas_per_node else {}
    engine = serve.deployment(
        EngineReplica, name="engine",
        ray_actor_options={"num_cpus": args.cpus_per_replica, "num_gpus": args.gpus_per_replica},
        max_ongoing_requests=config.max_concurrency + config.max_queue,
        health_check_period_s=args.health_check_period, health_check_timeout_s=60,
        request_router_config=RequestRouterConfig(request_router_class=AffinityRouter,
                                                  request_router_kwargs={"imbalance": args.affinity_imbalance}),
        **scaling, **placement)
    front = serve.deployment(Front, name="front", num_replicas=1, max_ongoing_requests=100_000,
                             ray_actor_options={"num_cpus": 0})
    threads = args.threads or max(1, int(args.cpus_per_replica))
    app = front.bind(engine.bind(str(args.model), load_kwargs, config, threads))
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    print(f"minicpmv serve: {args.replicas} replica(s) ready at http://{args.host}:{args.port} "
          f"(Ray cluster {ray.get_runtime_context().gcs_address})", file=sys.stderr, flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    while not stop:
        time.sleep(1)
    if address is not None:
        serve.delete(APP_NAME)  # leave a shared cluster as it was found
    ray.shutdown()  # a local Ray (and its Serve) goes with this command
    return 0
