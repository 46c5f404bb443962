"""`minicpmv run`: batch inference, a JSONL file of chat requests -> a JSONL file of answers.

Each input line is one OpenAI chat-completions request body (`messages`, `max_tokens`,
`temperature`, `tools`, `response_format`, ...; media as paths, file:// or http(s) URLs, data
URLs), with an `id` (or OpenAI batch files' `{"custom_id", "body"}`). Requests run through the
engine together (continuous batching, up to --max-concurrency sequences at once). Each answer
is appended to the output as soon as it is done, so a stopped run resumes where it left off:
ids already in the output are skipped. A bad line becomes an error record, not a stop."""
from __future__ import annotations

import argparse
import json
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from .common import add_model_args, check_model_args, load_model
from .errors import CliError
from .preflight import check_media, check_range

EPILOG = """input (one request per line):
  {"id": "q1", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "cat.jpg"}},
                                                          {"type": "text", "text": "What is it?"}]}], "max_tokens": 64}
output (one record per line, in the order answers finish):
  {"id": "q1", "line": 1, "choices": [{"index": 0, "message": {"role": "assistant", "content": "...",
   "reasoning_content": null, "tool_calls": []}, "finish_reason": "stop"}], "usage": {...}}
  {"id": "q2", "line": 2, "error": "messages[0].content[0]: cat.jpeg: no such file"}

example:
  minicpmv run requests.jsonl --out answers.jsonl --model ./MiniCPM-V-4.6 --max-concurrency 8"""


def add_run_parser(sub, parents) -> None:
    p = sub.add_parser("run", parents=parents, help="batch inference: a JSONL file of chat requests -> JSONL answers",
                       description=__doc__.split("\n\n", 1)[1], epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", type=Path, help="JSONL file, one chat-completions request per line")
    p.add_argument("--out", "-o", type=Path, required=True,
                   help="JSONL file for the answers; appended to, ids already there are skipped")
    add_model_args(p)
    p.add_argument("--max-concurrency", type=int, default=8, help="sequences decoded together (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=1024,
                   help="most tokens per answer when a request sets no max_tokens (default 1024)")
    p.add_argument("--quiet", action="store_true", help="no loading messages or progress bar")
    ray = p.add_argument_group("on a Ray cluster with Ray Data (pip install 'minicpmv[ray]'; docs/many-machines.md)")
    ray.add_argument("--ray", action="store_true",
                     help="run on the Ray cluster at RAY_ADDRESS (or a local one): engine actors answer batches of "
                          "requests; same output, same resume")
    ray.add_argument("--ray-concurrency", type=int, default=1, metavar="N", help="engine actors (default 1)")
    ray.add_argument("--ray-batch-size", type=int, default=16, help="requests per batch handed to an actor (default 16)")
    ray.add_argument("--ray-cpus-per-actor", type=float, default=1, help="Ray CPUs per actor (default 1)")
    ray.add_argument("--ray-gpus-per-actor", type=float, default=0, help="Ray GPUs per actor (default 0)")
    p.set_defaults(func=run_batch)


@dataclass
class Request:
    line: int
    id: str
    error: str | None = None
    chat: object = None  # the validated ChatCompletionRequest
    job: object = None
    seqs: list = field(default_factory=list)


def read_requests(path: Path, default_model: str) -> list[Request]:
    """Parse and validate every line (no model needed); a bad line gets its error now."""
    from pydantic import ValidationError

    from ..server.errors import validation_error
    from ..server.protocol import ChatCompletionRequest

    requests, seen = [], set()
    for number, text in enumerate(path.read_text().splitlines(), 1):
        if not text.strip():
            continue
        req = Request(number, f"line-{number}")
        requests.append(req)
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            req.error = f"not valid JSON ({e.msg} at column {e.colno})"
            continue
        if not isinstance(obj, dict):
            req.error = f"a JSON {type(obj).__name__}, not a request object"
            continue
        body = obj.get("body", obj) if "custom_id" in obj else obj
        rid = obj.get("custom_id", obj.get("id"))
        if rid is not None:
            req.id = str(rid)
        if req.id in seen:
            req.error = f"id {req.id!r} repeats an earlier line's"
            continue
        seen.add(req.id)
        if not isinstance(body, dict):
            req.error = "'body' must be a request object"
            continue
        body = {k: v for k, v in body.items() if k not in ("id", "stream")}
        body.setdefault("model", default_model)
        try:
            req.chat = ChatCompletionRequest.model_validate(body)
        except ValidationError as e:
            req.error = validation_error(e).message
            continue
        req.error = missing_media(body["messages"])
    return requests


def missing_media(messages: list) -> str | None:
    """The first local image/video that is missing or unreadable, checked before the model loads
    (URLs are fetched when the request runs)."""
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        for j, part in enumerate(content if isinstance(content, list) else []):
            if not isinstance(part, dict):
                continue
            kind = part.get("type") or next((k for k in ("image_url", "video_url", "image", "video") if k in part), "")
            value = part.get(kind)
            source = value.get("url") if isinstance(value, dict) else value
            if kind.removesuffix("_url") not in ("image", "video") or not isinstance(source, str):
                continue
            if source.startswith(("http://", "https://", "data:")):
                continue
            try:
                check_media(kind.removesuffix("_url"), source)
            except CliError as e:
                fix = f" ({e.fix})" if e.fix else ""
                return f"messages[{i}].content[{j}]: {e.problem.split(' ', 1)[1]}{fix}"
    return None


def answered_ids(out: Path) -> set[str]:
    """Ids with a record in the output; a torn last line (a run killed mid-write) is dropped."""
    if not out.is_file():
        return set()
    ids, lines = set(), out.read_text().splitlines(keepends=True)
    good = []
    for text in lines:
        try:
            ids.add(str(json.loads(text)["id"]))
            good.append(text)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    if len(good) != len(lines) or (good and not good[-1].endswith("\n")):
        out.write_text("".join(t if t.endswith("\n") else t + "\n" for t in good))
    return ids


def run_batch(args) -> int:
    check_range("--max-concurrency", args.max_concurrency, 1)
    check_range("--max-new-tokens", args.max_new_tokens, 1)
    check_range("--ray-concurrency", args.ray_concurrency, 1)
    check_range("--ray-batch-size", args.ray_batch_size, 1)
    if not args.input.is_file():
        raise CliError(f"{args.input}: no such file", "pass a JSONL file with one chat request per line")
    if args.out.resolve() == args.input.resolve():
        raise CliError("--out is the input file", "write the answers to another file")
    info = check_model_args(args)
    requests = read_requests(args.input, info.default_name)
    if not requests:
        raise CliError(f"{args.input} holds no requests", "write one JSON request per line")
    done = answered_ids(args.out)
    todo = [r for r in requests if r.id not in done]
    log = sys.stderr
    if done and not args.quiet:
        print(f"resuming: {len(requests) - len(todo)} of {len(requests)} requests already in {args.out}", file=log)
    with args.out.open("a") as out:
        def write(record: dict) -> None:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()

        for r in todo:
            if r.error is not None:
                write({"id": r.id, "line": r.line, "error": r.error})
        todo = [r for r in todo if r.error is None]
        if not todo:
            if not args.quiet:
                print(f"nothing to run: every request has a record in {args.out}", file=log)
            return 0
        if args.ray:
            from .batch_ray import run_on_ray

            errors = run_on_ray(info, args, todo, write)
        else:
            model = load_model(info, args, progress=not args.quiet, max_num_seqs=args.max_concurrency)
            errors = BatchRunner(model, info.default_name, args).run(todo, write)
    failed = errors + sum(1 for r in requests if r.id not in done and r.error is not None)
    if not args.quiet:
        print(f"wrote {len(requests) - len(done)} records to {args.out} ({failed} errors)", file=log)
    return 0


class BatchRunner:
    """Feeds requests to the engine, at most max_concurrency sequences at a time, and turns each
    finished request into a record."""

    def __init__(self, model, model_name: str, args):
        from ..server.media_policy import MediaPolicy

        self.model, self.name, self.args = model, model_name, args
        # the user's own files and URLs: every local path and URL is allowed
        self.policy = MediaPolicy(allow_url_fetch=True, allowed_local_path=Path("/"))
        self.grammars = None
        self.errors = 0

    def run(self, todo: list[Request], write) -> int:
        from tqdm.auto import tqdm

        engine = self.model.engine
        pending, active = deque(todo), {}  # seq_id -> (Sequence, Request)
        left = {}  # Request line -> sequences still running
        bar = tqdm(total=len(todo), desc="requests", unit="req", disable=self.args.quiet, file=sys.stderr)
        while pending or active:
            while pending and len(active) < self.args.max_concurrency:
                req = pending.popleft()
                try:
                    self._start(req)
                except ValueError as e:  # InputError and friends: bad media, too long, bad option
                    self._fail(req, str(e), write, bar)
                    continue
                for seq in req.seqs:
                    engine.add(seq)
                    active[seq.seq_id] = (seq, req)
                left[req.line] = len(req.seqs)
            try:
                outputs = engine.step()
            except Exception as e:  # noqa: BLE001  one failed step fails its requests, not the run
                for req in {r.line: r for _, r in active.values()}.values():
                    for seq in req.seqs:
                        engine.abort(seq)
                    self._fail(req, f"engine error: {type(e).__name__}: {e}", write, bar)
                active.clear()
                continue
            for out in outputs:
                entry = active.get(out.seq.seq_id)
                if entry is None or not out.finished:
                    continue
                req = active.pop(out.seq.seq_id)[1]
                left[req.line] -= 1
                if left[req.line] == 0:
                    failed = next((q.error for q in req.seqs if getattr(q, "error", None) is not None), None)
                    if failed is not None:  # a fault inside the engine, pinned on this request
                        self._fail(req, f"engine error: {type(failed).__name__}: {failed}", write, bar)
                        continue
                    write(self._record(req))
                    bar.update(1)
        bar.close()
        return self.errors

    def _start(self, req: Request) -> None:
        from ..engine.sequence import Sequence
        from ..server.jobs import build_job

        chat = req.chat
        if chat.max_new_tokens is None:
            chat.max_tokens = self.args.max_new_tokens
        if chat.constraint() is not None and self.grammars is None:
            from ..server.constrained import GrammarFactory

            self.grammars = GrammarFactory(self.model.tokenizer, self.model.family.stop_token_ids)
        req.job = build_job(self.model, chat, self.policy.apply(chat.messages), self.grammars, 50_000_000)
        job = req.job
        req.seqs = [Sequence(list(job.prompt_ids), p, job.vision, position_ids=job.position_ids,
                             rope_delta=job.rope_delta, reuse_boundary=job.reuse_boundary) for p in job.params]

    def _record(self, req: Request) -> dict:
        job, choices = req.job, []
        prompt = len(job.prompt_ids)
        completion = 0
        for i, seq in enumerate(req.seqs):
            reply = self.model.reply_for(seq, job.starts_in_reasoning, job.tools, job.stop)
            content, finish = reply.content, reply.finish_reason
            if reply.tool_calls:
                finish = "tool_calls"
            choices.append({"index": i, "message": {"role": "assistant", "content": content,
                                                    "reasoning_content": reply.reasoning,
                                                    "tool_calls": reply.tool_calls}, "finish_reason": finish})
            completion += reply.usage["completion_tokens"]
        return {"id": req.id, "line": req.line, "model": self.name, "choices": choices,
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                          "total_tokens": prompt + completion}}

    def _fail(self, req: Request, message: str, write, bar) -> None:
        self.errors += 1
        write({"id": req.id, "line": req.line, "error": message})
        bar.update(1)
