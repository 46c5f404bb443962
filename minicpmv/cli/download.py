"""`minicpmv download ID`: fetch a checkpoint from the Hugging Face hub (for use offline later)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .errors import CliError

EPILOG = """examples:
  minicpmv download openbmb/MiniCPM-V-4.6                       (into the Hugging Face cache)
  minicpmv download openbmb/MiniCPM-V-4.6 --dir ./MiniCPM-V-4.6  (into a folder you choose)

then, offline (HF_HUB_OFFLINE=1 is optional: a cached id is found without network too):
  minicpmv chat --model ./MiniCPM-V-4.6 --image photo.jpg "What is in this image?\""""


def add_download_parser(sub, parents) -> None:
    p = sub.add_parser("download", parents=parents, help="download a checkpoint for offline use",
                       description="Download what minicpmv needs of a hub checkpoint (config, safetensors weights, "
                                   "tokenizer and processor files) and print the local folder.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="ID", help="hub id, e.g. openbmb/MiniCPM-V-4.6")
    p.add_argument("--dir", type=Path, help="put the files in this folder (default: the Hugging Face cache)")
    p.add_argument("--revision", help="branch, tag or commit")
    p.set_defaults(func=run_download)


def run_download(args) -> int:
    from ..hub import _PATTERNS

    if args.model.count("/") != 1 or Path(args.model).expanduser().exists():
        raise CliError(f"{args.model!r} is not a hub id", "write it as OWNER/NAME, e.g. openbmb/MiniCPM-V-4.6")
    if args.dir is not None and args.dir.is_file():
        raise CliError(f"--dir {args.dir} is a file", "pass a folder (it is created if missing)")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id=args.model, revision=args.revision, allow_patterns=_PATTERNS,
                                   local_dir=None if args.dir is None else str(args.dir))
    except Exception as e:  # network down, no such repo, gated repo, disk full, ...
        reason = (str(e).splitlines() or [""])[0][:160]
        raise CliError(f"could not download {args.model!r} ({type(e).__name__}: {reason})",
                       "check the id and the network; gated models need `hf auth login`") from e
    print(folder)
    return 0
