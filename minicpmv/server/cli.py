"""`minicpmv serve`: an OpenAI-compatible HTTP server over one loaded model.

Everything checkable runs before the load (flags, model folder, port free), then a start-up
banner says what is served and how to call it."""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

from .media_limits import MediaLimits

EPILOG = """examples:
  minicpmv serve --model openbmb/MiniCPM-V-4.6 --port 8000
  minicpmv serve --model ./MiniCPM-V-4.6 --api-key sk-local --max-concurrency 8 \\
      --allowed-local-media-path /data/images --allow-url-fetch

then (the model name defaults to the hub id, or to the folder's name for a local folder):
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "openbmb/MiniCPM-V-4.6", "messages": [{"role": "user", "content": "Hello"}]}'"""


def add_serve_parser(sub, parents=()) -> None:
    from ..cli.common import add_model_args

    p = sub.add_parser("serve", parents=list(parents), help="serve a model over an OpenAI-compatible HTTP API",
                       description="Serve a MiniCPM-V model over HTTP: /v1/chat/completions (streaming, images, "
                                   "videos, tools, reasoning, JSON output), /v1/models, /health, /metrics.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--served-model-name", action="append", metavar="NAME",
                   help="name clients put in 'model' (default: the hub id, or the folder's name); repeat for aliases")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
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
    limits = MediaLimits()
    p.add_argument("--limit-mm-per-prompt", type=_mm_limits, metavar="JSON",
                   help=f'most images / videos per request, e.g. \'{{"image": 8, "video": 1}}\' '
                        f"(default: {limits.max_images} images, {limits.max_videos} videos)")
    p.add_argument("--max-video-frames", type=int, default=limits.max_frames,
                   help=f"most frames one video may be sampled to (default {limits.max_frames})")
    p.add_argument("--max-request-pixels", type=int, default=limits.max_pixels,
                   help=f"most decoded image + video-frame pixels per request (default {limits.max_pixels:,})")
    p.add_argument("--max-inflight-pixels", type=int, default=limits.max_inflight_pixels,
                   help="most media pixels held by all requests together; more waits with HTTP 429 "
                        f"(default {limits.max_inflight_pixels:,})")
    p.add_argument("--encoder-cache-mb", type=float, default=512,
                   help="memory for cached vision encodings, reused when a chat re-sends an image (0 = off)")
    p.add_argument("--kv-cache-memory", metavar="SIZE",
                   help="memory for the state pool (KV blocks + recurrent slots), e.g. 2GiB (default: sized for "
                        "--max-concurrency sequences of 4k tokens, at most a fifth of free memory)")
    p.add_argument("--max-num-batched-tokens", type=int, default=64,
                   help="tokens per engine step while streams decode: decode tokens plus prompt chunks; a long "
                        "prompt is spread over steps of this size so running streams keep flowing (default 64; "
                        "4x that when nothing decodes)")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="do not keep prompt/reply state for reuse by later requests with the same prefix")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="least severe messages logged (default info: start-up banner and one line per request)")
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="text lines, or one JSON object per line for log collectors (default text)")
    p.add_argument("--no-web-chat", dest="web_chat", action="store_false",
                   help="do not serve the chat page at / (the API alone)")
    p.add_argument("--unescape-newlines", action="store_true",
                   help="show the model's escaped newlines (a literal backslash-n) as newlines in answers, outside "
                        "code and math, unless a request sets 'unescape_newlines' itself (default: off, raw text)")
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


def check_serve_args(args):
    """Every torch-free check: numbers, the media folder, the model folder, the port."""
    from ..cli.common import check_model_args
    from ..cli.errors import CliError
    from ..cli.preflight import check_port_free, check_range

    check_range("--max-concurrency", args.max_concurrency, 1)
    check_range("--max-queue", args.max_queue, 0)
    check_range("--media-max-mb", args.media_max_mb, 0, low_open=True)
    check_range("--media-fetch-timeout", args.media_fetch_timeout, 0, low_open=True)
    check_range("--max-image-pixels", args.max_image_pixels, 1)
    check_range("--max-request-mb", args.max_request_mb, 0, low_open=True)
    check_range("--encoder-cache-mb", args.encoder_cache_mb, 0)
    check_range("--max-num-batched-tokens", args.max_num_batched_tokens, 1)
    check_range("--threads", args.threads, 1)
    check_range("--replicas", args.replicas, 0)
    if args.max_replicas is not None and not 0 < args.replicas <= args.max_replicas:
        raise CliError(f"--max-replicas {args.max_replicas} needs --replicas N with 1 <= N <= {args.max_replicas}",
                       "set --replicas to the smallest number of replicas to keep")
    folder = args.allowed_local_media_path
    if folder is not None and not folder.is_dir():
        raise CliError(f"--allowed-local-media-path {folder} is not a folder", "name an existing folder")
    if args.served_model_name and any(not n.strip() for n in args.served_model_name):
        raise CliError("--served-model-name is empty", "give the name clients will send in 'model'")
    info = check_model_args(args)
    check_port_free(args.host, args.port)
    return info


def run_serve(args) -> int:
    from ..cli.common import load_model
    from .access_log import setup_logging

    info = check_serve_args(args)
    setup_logging(args.log_level, args.log_format)
    from .config import ServeConfig

    names = args.served_model_name or [info.default_name]
    config = ServeConfig(
        served_model_names=names, api_key=args.api_key,
        max_concurrency=args.max_concurrency, max_queue=args.max_queue, allow_url_fetch=args.allow_url_fetch,
        allowed_local_media_path=args.allowed_local_media_path, media_max_bytes=int(args.media_max_mb * 2**20),
        media_fetch_timeout_s=args.media_fetch_timeout, max_request_bytes=int(args.max_request_mb * 2**20),
        encoder_cache_bytes=int(args.encoder_cache_mb * 2**20), web_chat=args.web_chat,
        unescape_newlines=args.unescape_newlines,
        media_limits=MediaLimits(max_images=(args.limit_mm_per_prompt or {}).get("image", MediaLimits.max_images),
                                 max_videos=(args.limit_mm_per_prompt or {}).get("video", MediaLimits.max_videos),
                                 max_frames=args.max_video_frames, max_pixels=args.max_request_pixels,
                                 max_inflight_pixels=args.max_inflight_pixels),
        **({"max_image_pixels": args.max_image_pixels} if args.max_image_pixels else {}))
    from ..cli.errors import CliError
    from ..engine.config import parse_bytes  # imports torch: after every torch-free check

    try:
        kv_bytes = parse_bytes(args.kv_cache_memory) if args.kv_cache_memory else None
    except ValueError as e:
        raise CliError(f"--kv-cache-memory: {e}") from e
    engine_settings = dict(kv_cache_memory=kv_bytes, max_num_seqs=args.max_concurrency,
                           max_num_batched_tokens=args.max_num_batched_tokens,
                           enable_prefix_caching=not args.no_prefix_caching,
                           encoder_cache_bytes=int(args.encoder_cache_mb * 2**20))
    if args.replicas:
        from .replicas.launch import run_replicas

        return run_replicas(args, config, {"dtype": args.dtype, "device": args.device, "weights": args.weights,
                                             "isa": args.isa, **engine_settings})
    log = logging.getLogger("minicpmv.server")
    model = load_model(info, args, progress=sys.stderr.isatty(), say=log.info, **engine_settings)
    log.info("engine: %s", model.engine.describe())

    from .app import create_app
    from .run import serve

    app = create_app(model, config, engine_thread=False)
    for line in banner(model, info, config, args):
        log.info(line)
    return serve(app, args.host, args.port, args.log_level)


def banner(model, info, config, args) -> list[str]:
    """What the operator wants to see once: what runs, on what, within which limits, and how
    to call it."""
    import torch

    from collections import Counter

    from ..layers.fp16_packed import PackedFP16Linear
    from ..layers.prepacked import PrepackedBf16Linear
    from ..layers.weight_formats import QuantLinear
    from ..quant.gptq_linear import GPTQLinear
    from .metrics import resident_bytes

    p = next(model.model.parameters())
    device = p.device
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in model.model.parameters() if t.is_floating_point()})
    # what each matrix is stored as; how each op class runs is the CPU plan's line, logged at load
    stored = Counter()
    for m in model.model.modules():
        if isinstance(m, GPTQLinear):
            stored[f"GPTQ int4 ({m.backend or '?'})"] += 1
        elif isinstance(m, PackedFP16Linear):
            stored["fbgemm fp16-packed"] += 1
        elif isinstance(m, QuantLinear):
            stored[m.format] += 1
        elif isinstance(m, PrepackedBf16Linear):
            stored["oneDNN-blocked bfloat16"] += 1
        elif isinstance(m, torch.nn.Linear):
            stored[str(m.weight.dtype).removeprefix("torch.")] += 1
    matrices = ", ".join(f"{n} {kind}" for kind, n in stored.most_common()) + " matrices"
    if device.type == "cuda":
        memory = (f"{torch.cuda.memory_allocated(device) / 2**30:.2f} GiB of "
                  f"{torch.cuda.get_device_properties(device).total_memory / 2**30:.1f} GiB GPU memory in use")
    else:
        memory = f"{resident_bytes() / 2**30:.2f} GiB resident"
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    url = f"http://{host}:{args.port}"
    body = ('{"model": "%s", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 64}'
            % config.served_model_names[0])
    key = f" -H {shlex.quote('Authorization: Bearer ' + config.api_key)}" if config.api_key else ""
    return [
        f"model: {', '.join(config.served_model_names)} ({info.family_name}, {info.folder})",
        f"weights: {', '.join(dtypes)} on {device}; matrices: {matrices}",
        f"memory: {memory}; context {model.max_context} tokens; {config.max_concurrency} sequences decoded together, "
        f"{config.max_queue} more may wait; vision-encoding cache {config.encoder_cache_bytes / 2**20:.0f} MiB",
        f"listening on http://{f'[{args.host}]' if ':' in args.host else args.host}:{args.port} "
        f"(/v1/chat/completions, /v1/models, /health, /metrics)",
        f"try: curl {url}/v1/chat/completions -H 'Content-Type: application/json'{key} -d {shlex.quote(body)}",
    ]


def _mm_limits(text: str) -> dict[str, int]:
    """--limit-mm-per-prompt: a JSON object of "image" / "video" counts, as vLLM spells it."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from e
    if not isinstance(value, dict) or set(value) - {"image", "video"} or \
            not all(isinstance(v, int) and v >= 0 for v in value.values()):
        raise argparse.ArgumentTypeError('expected e.g. {"image": 8, "video": 1} (counts >= 0)')
    return value
