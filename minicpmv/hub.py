"""Resolve what the user passed as `model` to a local folder: an existing folder as is, else a
Hugging Face hub id downloaded (or found in the local cache) with huggingface_hub."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import ModelNotFoundError

DEFAULT_MODEL = "openbmb/MiniCPM-V-4.6"
# what an inference engine needs from a repo; skips e.g. original/*.pth or .gguf siblings
_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.py", "*.model", "*.tiktoken"]


def resolve_model_path(model: str | os.PathLike, revision: str | None = None) -> Path:
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a folder but holds no config.json; pass a MiniCPM-V checkpoint folder")
        return path
    if path.exists():
        raise ModelNotFoundError(f"{path} is a file; pass the checkpoint folder that holds config.json")
    model = str(model)
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"{model!r} is neither a local folder nor a hub id like {DEFAULT_MODEL!r}")
    try:
        from huggingface_hub import snapshot_download

        # huggingface_hub draws its own progress bars; a cached snapshot is reused offline
        return Path(snapshot_download(repo_id=model, revision=revision, allow_patterns=_PATTERNS))
    except Exception as e:  # network down, no such repo, gated repo, ...
        raise ModelNotFoundError(
            f"could not get {model!r} from the Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            f"Without network, download the checkpoint elsewhere and pass its local folder instead, "
            f"e.g. `--model /path/to/MiniCPM-V-4.6` (a folder with config.json, *.safetensors and the tokenizer files)."
        ) from e
