"""`minicpmv serve`: an OpenAI-compatible HTTP server over one loaded model."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..hub import DEFAULT_MODEL

EPILOG = """examples:
  minicpmv serve --model openbmb/MiniCPM-V-4.6 --port 8000
  minicpmv serve --model ./MiniCPM-V-4.6 --api-key sk-local --max-concurrency 8 \\
      --allowed-local-media-path /data/images --allow-url-fetch

then, with the official client:
  OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="sk-local").chat.completions.create(
      model="openbmb/MiniCPM-V-4.6", messages=[...])"""


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                       description="Serve a MiniCPM-V model over HTTP: /v1/chat/completions (streaming, images, "
                                   "videos, tools, reasoning, JSON output), /v1/models, /health, /metrics.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id or local folder (default: {DEFAULT_MODEL})")
    p.add_argument("--served-model-name", action="append", metavar="NAME",
                   help="name clients use in 'model' (default: the --model value); repeat for aliases")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--max-concurrency", type=int, default=32, help="sequences decoded together (default 32)")
    p.add_argument("--max-queue", type=int, default=128,
                   help="sequences allowed to wait beyond --max-concurrency; more get HTTP 429 (default 128)")
    p.add_argument("--allow-url-fetch", action="store_true", help="let requests name http(s) image/video URLs")
    p.add_argument("--allowed-local-media-path", type=Path, metavar="DIR",
                   help="let requests name local files (paths or file:// URLs) under this folder only")
    p.add_argument("--media-max-mb", type=float, default=64, help="largest fetched image/video (default 64 MB)")
    p.add_argument("--media-fetch-timeout", type=float, default=10, help="seconds per URL download (default 10)")
    p.add_argument("--max-image-pixels", type=int, help="largest image accepted, in pixels (default 50M)")
    p.add_argument("--max-request-mb", type=float, default=100, help="largest request body (default 100 MB)")
    p.add_argument("--encoder-cache-mb", type=float, default=512,
                   help="memory for cached vision encodings, reused when a chat re-sends an image (0 = off)")
    p.add_argument("--no-web-chat", dest="web_chat", action="store_false",
                   help="do not serve the chat page at / (the API alone)")
    p.add_argument("--unescape-newlines", action="store_true",
                   help="show the model's escaped newlines (a literal backslash-n) as newlines in answers, outside "
                        "code and math, unless a request sets 'unescape_newlines' itself (default: off, raw text)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    ray = p.add_argument_group("scale-out on Ray Serve (pip install 'minicpmv[ray]'; docs/many-machines.md)")
    ray.add_argument("--replicas", type=int, default=0, metavar="N",
                     help="run N engine replicas on Ray Serve behind this endpoint, on the cluster at RAY_ADDRESS "
                          "or a local one (default 0: one engine in this process)")
    ray.add_argument("--max-replicas", type=int, metavar="M",
                     help="autoscale between --replicas and M replicas on the number of ongoing requests")
    ray.add_argument("--target-ongoing-requests", type=float, default=16,
                     help="autoscaling target: ongoing requests per replica (default 16)")
    ray.add_argument("--cpus-per-replica", type=float, default=1, help="Ray CPUs reserved per replica (default 1)")
    ray.add_argument("--gpus-per-replica", type=float, default=0, help="Ray GPUs reserved per replica (default 0)")
    ray.add_argument("--max-replicas-per-node", type=int, help="spread replicas: at most this many per Ray node")
    ray.add_argument("--health-check-period", type=float, default=10, help="seconds between replica health checks")
    ray.add_argument("--affinity-imbalance", type=int, default=8,
                     help="queued requests a conversation's replica may have over the least busy one before the "
                          "request goes elsewhere (default 8)")
    p.set_defaults(func=run_serve)


def run_serve(args) -> int:
    import torch
    import uvicorn

    import minicpmv

    from .app import create_app
    from .config import ServeConfig

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = ServeConfig(
        served_model_names=args.served_model_name or [str(args.model)], api_key=args.api_key,
        max_concurrency=args.max_concurrency, max_queue=args.max_queue, allow_url_fetch=args.allow_url_fetch,
        allowed_local_media_path=args.allowed_local_media_path, media_max_bytes=int(args.media_max_mb * 2**20),
        media_fetch_timeout_s=args.media_fetch_timeout, max_request_bytes=int(args.max_request_mb * 2**20),
        encoder_cache_bytes=int(args.encoder_cache_mb * 2**20), web_chat=args.web_chat,
        unescape_newlines=args.unescape_newlines,
        **({"max_image_pixels": args.max_image_pixels} if args.max_image_pixels else {}))
    if config.allowed_local_media_path is not None and not config.allowed_local_media_path.is_dir():
        print(f"minicpmv serve: --allowed-local-media-path {config.allowed_local_media_path} is not a folder",
              file=sys.stderr)
        return 2
    if args.replicas < 0 or (args.max_replicas is not None and not 0 < args.replicas <= args.max_replicas):
        print("minicpmv serve: --replicas must be >= 0, and --max-replicas needs --replicas N with N <= M",
              file=sys.stderr)
        return 2
    if args.replicas:
        from .replicas.launch import run_replicas

        return run_replicas(args, config, {"dtype": args.dtype, "device": args.device})
    model = minicpmv.load(args.model, dtype=args.dtype, device=args.device, progress=sys.stderr.isatty())
    app = create_app(model, config)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=args.log_level == "debug")
    return 0
