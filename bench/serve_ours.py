"""Our OpenAI server for bench_cpu_peers.py, with the load options `minicpmv serve` does not
expose yet (weights=int8/int4, isa=avx2) and the vision-encoding cache off (every sample encodes
its image, as the peers are configured to). Not meant to be run by hand.

    python bench/serve_ours.py --model DIR --port 8101 --threads 2 [--weights int8] [--isa avx2]"""
from __future__ import annotations

import argparse
import logging

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--name", default="model", help="the model name clients send")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--weights", choices=["int8", "int4"])
    p.add_argument("--isa", help="e.g. avx2: the AVX2-era kernels")
    p.add_argument("--max-concurrency", type=int, default=8)
    args = p.parse_args()

    import uvicorn

    import minicpmv
    from minicpmv.server.app import create_app
    from minicpmv.server.config import ServeConfig

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    model = minicpmv.load(args.model, device="cpu", progress=False, weights=args.weights, isa=args.isa)
    config = ServeConfig(served_model_names=[args.name], max_concurrency=args.max_concurrency, encoder_cache_bytes=0)
    uvicorn.run(create_app(model, config), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
