"""`minicpmv run --ray`: the same batch over a Ray cluster with Ray Data.

The driver (this command) reads and validates the JSONL and skips ids already answered, as the
local run does; the remaining requests become a Ray dataset, and `map_batches` hands batches
of them to `--ray-concurrency` engine actors (`EngineActor`: the model loaded once per actor,
then the local run's BatchRunner on each batch). Answers stream back to the driver, which
appends each record to --out as it arrives: the output is the local run's (same records; the
order is the order answers finish) and a stopped run resumes where it left off.

The cluster is the one at RAY_ADDRESS, else a local one. Every node needs minicpmv's
dependencies and the model (a shared path or a hub id); this package itself is shipped with
the job. Relative media paths in the requests are read from the driver's working directory,
which must exist on the nodes (shared storage) for a multi-machine run.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace


class EngineActor:
    """One Ray Data actor: a loaded model answering batches of requests."""

    def __init__(self, model: str, revision: str | None, dtype: str, device: str, threads: int | None,
                 model_name: str, max_concurrency: int, max_new_tokens: int, cwd: str):
        import torch

        from ..hub import resolve_model_path
        from ..loading import load
        from .batch import BatchRunner

        if os.path.isdir(cwd):
            os.chdir(cwd)  # relative media paths mean the driver's folder
        if threads:
            torch.set_num_threads(threads)
        folder = resolve_model_path(model, revision)
        loaded = load(folder, dtype=dtype, device=None if device == "auto" else device, progress=False)
        self.runner = BatchRunner(loaded, model_name, SimpleNamespace(max_concurrency=max_concurrency,
                                                                      max_new_tokens=max_new_tokens, quiet=True))

    def __call__(self, batch: dict) -> dict:
        from ..server.protocol import ChatCompletionRequest
        from .batch import Request

        requests = []
        for line, rid, body in zip(batch["line"], batch["id"], batch["body"]):
            requests.append(Request(int(line), str(rid), chat=ChatCompletionRequest.model_validate_json(body)))
        records: list[str] = []
        self.runner.run(requests, lambda record: records.append(json.dumps(record, ensure_ascii=False)))
        return {"record": records}


def run_on_ray(info, args, todo: list, write) -> int:
    """Answer `todo` (validated requests) on Ray, writing each record as it arrives; returns the error count."""
    try:
        import ray
    except ImportError:
        from .errors import CliError

        raise CliError("--ray needs Ray Data", "pip install 'minicpmv[ray]'") from None
    from tqdm.auto import tqdm

    import minicpmv

    ray.init(address=os.environ.get("RAY_ADDRESS") or "local", log_to_driver=False,
             runtime_env={"py_modules": [str(Path(minicpmv.__file__).parent)]})
    try:
        items = [{"line": r.line, "id": r.id,
                  "body": r.chat.model_dump_json(by_alias=True, exclude_unset=True)} for r in todo]
        dataset = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / args.ray_batch_size)))
        answers = dataset.map_batches(
            EngineActor, batch_size=args.ray_batch_size, concurrency=args.ray_concurrency,
            num_cpus=args.ray_cpus_per_actor, num_gpus=args.ray_gpus_per_actor,
            fn_constructor_kwargs={"model": str(info.folder or info.source),
                                   "revision": getattr(args, "revision", None),
                                   "dtype": args.dtype, "device": args.device, "threads": args.threads,
                                   "model_name": info.default_name, "max_concurrency": args.max_concurrency,
                                   "max_new_tokens": args.max_new_tokens, "cwd": os.getcwd()})
        errors = 0
        bar = tqdm(total=len(items), desc="requests", unit="req", disable=args.quiet, file=sys.stderr)
        for row in answers.iter_rows():
            record = json.loads(row["record"])
            errors += "error" in record
            write(record)
            bar.update(1)
        bar.close()
        return errors
    finally:
        ray.shutdown()
