"""Helpers for the command-line tests (no tests here): fake checkpoint folders that pass or fail
the checks made before loading, and a loader that fails the test if it is ever reached."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from paths import FIXTURE_46, GOLDEN

MODEL_45 = GOLDEN / "minicpm-v-4.5" / "model"
MODEL_40 = GOLDEN / "minicpm-v-4.0" / "model"
REPO = Path(__file__).resolve().parents[1]


def fake_checkpoint(folder: Path, config: dict | str | None = None, tokenizer: bool = True,
                    weights: bool = True) -> Path:
    """A folder the checks accept (config.json, tokenizer.json, a .safetensors file) without
    loadable weights: any test using it proves the command stopped before loading."""
    folder.mkdir(parents=True, exist_ok=True)
    if config is None:
        config = json.loads((FIXTURE_46 / "config.json").read_text())
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if tokenizer:
        shutil.copyfile(FIXTURE_46 / "tokenizer.json", folder / "tokenizer.json")
    if weights:
        (folder / "model.safetensors").write_bytes(b"not really weights")
    return folder


def config_of(model_dir: Path, **changes) -> dict:
    config = json.loads((model_dir / "config.json").read_text())
    config.update(changes)
    return config


def run_cli(*args, env=None, stdin=None, timeout=300, cwd=None) -> subprocess.CompletedProcess:
    """`python -m minicpmv ARGS` in a subprocess, this checkout first on the path."""
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "minicpmv", *args], capture_output=True, text=True, timeout=timeout,
                          input=stdin, cwd=cwd, env={**os.environ, "PYTHONPATH": path, **(env or {})})
