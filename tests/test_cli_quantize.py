"""`minicpmv quantize` writes files with the usual mode, lists what it wrote, and never writes
over an existing output unless --force."""
from __future__ import annotations

import os
import re

from minicpmv.cli import main


def test_quantize_writes_usual_modes_lists_files_and_guards_the_output(tiny46_dir, tmp_path, capsys):
    out = tmp_path / "int4"
    argv = ["quantize", "--model", str(tiny46_dir), "--out", str(out), "--group-size", "32", "--num-samples", "2",
            "--max-tokens", "16", "--quiet", "--threads", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    umask = os.umask(0)
    os.umask(umask)
    files = sorted(f for f in out.iterdir() if f.is_file())
    assert {f.name for f in files} >= {"model.safetensors", "config.json", "quantize_config.json", "tokenizer.json"}
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, (f.name, oct(f.stat().st_mode))
        assert re.search(rf"^\s+{re.escape(f.name)}\s+{f.stat().st_size:,} bytes$", printed, re.M), f.name
    assert f"wrote {out}:" in printed

    before = (out / "model.safetensors").stat().st_mtime_ns
    assert main(argv) == 2  # exists: refused, untouched
    err = capsys.readouterr().err
    assert err.startswith("error: --out") and "--force" in err and err.count("\n") == 1
    assert (out / "model.safetensors").stat().st_mtime_ns == before

    assert main([*argv, "--force"]) == 0
    assert (out / "model.safetensors").stat().st_mtime_ns != before
