"""Each ordinary mistake at the command line: exit code 2, one line `error: ... (fix)` on stderr,
no traceback, and the model never loaded (the loader is replaced by one that fails the test)."""
from __future__ import annotations

import io
import json
import socket
import time

import pytest

from cli_support import MODEL_40, MODEL_45, config_of, fake_checkpoint, run_cli
from minicpmv.cli import main
from minicpmv.cli.errors import CliError


@pytest.fixture(autouse=True)
def never_load(monkeypatch):
    """Reaching the loader or the downloader fails the test: every mistake here is caught first."""
    import minicpmv.hub
    import minicpmv.loading

    def boom(*a, **k):
        raise AssertionError("the model was loaded although the input was at fault")

    monkeypatch.setattr(minicpmv.loading, "load", boom)
    monkeypatch.setattr(minicpmv, "load", boom)
    monkeypatch.setattr(minicpmv.hub, "resolve_model_path", boom)


@pytest.fixture
def ckpt(tmp_path):
    return fake_checkpoint(tmp_path / "MiniCPM-V-4.6")


@pytest.fixture
def photo(tmp_path):
    from PIL import Image

    path = tmp_path / "photo.png"
    Image.new("RGB", (32, 24), (200, 10, 10)).save(path)
    return path


def one_error(capsys, argv, code=2) -> str:
    start = time.perf_counter()
    rc = main([str(a) for a in argv])
    elapsed = time.perf_counter() - start
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert rc == code, out.err
    assert len(lines) == 1 and lines[0].startswith("error: "), out.err
    assert "Traceback" not in out.err and out.out == ""
    assert elapsed < 2.0, f"the mistake took {elapsed:.1f} s to report"
    return lines[0]


# -- inputs ---------------------------------------------------------------------------------

def test_image_path_typo_names_the_file_and_a_near_name(capsys, ckpt, photo):
    line = one_error(capsys, ["chat", "--model", ckpt, "--image", photo.with_name("phot.png"), "hi"])
    assert "phot.png: no such file" in line and "photo.png" in line  # the fix suggests the real file


def test_not_an_image(capsys, ckpt, tmp_path):
    (tmp_path / "notes.jpg").write_text("hello")
    line = one_error(capsys, ["chat", "--model", ckpt, "--image", tmp_path / "notes.jpg", "hi"])
    assert "not a recognizable image" in line


def test_missing_video_and_folder_as_video(capsys, ckpt, tmp_path):
    assert "clip.mp4: no such file" in one_error(capsys, ["chat", "--model", ckpt, "--video", tmp_path / "clip.mp4",
                                                          "hi"])
    assert "is a folder" in one_error(capsys, ["chat", "--model", ckpt, "--video", tmp_path, "hi"])


def test_bad_urls(capsys, ckpt):
    assert "not a valid URL" in one_error(capsys, ["chat", "--model", ckpt, "--image", "https://", "hi"])
    assert "unsupported URL scheme 'ftp'" in one_error(capsys, ["chat", "--model", ckpt, "--image", "ftp://x/a.png",
                                                                 "hi"])
    assert "no such file" in one_error(capsys, ["chat", "--model", ckpt, "--image", "file:///nowhere/a.png", "hi"])


def test_prompt_file_and_empty_stdin(capsys, monkeypatch, ckpt, tmp_path):
    assert "prompt file" in one_error(capsys, ["chat", "--model", ckpt, f"@{tmp_path / 'q.txt'}"])
    monkeypatch.setattr("sys.stdin", io.StringIO("  \n"))
    assert "stdin is empty" in one_error(capsys, ["chat", "--model", ckpt, "-"])


@pytest.mark.parametrize("flag, value, words", [
    ("--temperature", "-0.5", ">= 0"), ("--top-p", "0", "in (0, 1]"), ("--top-p", "1.5", "in (0, 1]"),
    ("--top-k", "-1", ">= 0"), ("--max-new-tokens", "0", ">= 1"), ("--repetition-penalty", "0", "> 0"),
    ("--fps", "0", "> 0"), ("--max-frames", "0", ">= 1"), ("--threads", "0", ">= 1"), ("--seed", "-3", ">= 0"),
    ("--max-slice-nums", "0", ">= 1"),
])
def test_bad_sampling_values_are_refused_before_loading(capsys, ckpt, flag, value, words):
    line = one_error(capsys, ["chat", "--model", ckpt, flag, value, "hi"])
    assert flag in line and words in line


def test_unknown_flag_and_bad_choice_are_one_line(capsys, ckpt):
    assert "minicpmv chat --help" in one_error(capsys, ["chat", "--model", ckpt, "--temprature", "1", "hi"])
    assert "invalid choice" in one_error(capsys, ["chat", "--model", ckpt, "--dtype", "float8", "hi"])
    assert "--json needs a question" in one_error(capsys, ["chat", "--model", ckpt, "--json"])


# -- the device --------------------------------------------------------------------------------

def test_cuda_without_a_gpu(capsys, monkeypatch, ckpt):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = one_error(capsys, ["chat", "--model", ckpt, "--device", "cuda", "hi"])
    assert "no CUDA GPU" in line and "--device cpu" in line
    assert "not a device name" in one_error(capsys, ["chat", "--model", ckpt, "--device", "gpu0", "hi"])


def test_a_cpu_weight_format_on_cuda(capsys, ckpt):
    line = one_error(capsys, ["chat", "--model", ckpt, "--device", "cuda", "--weights", "int4", "hi"])
    assert "--weights int4 is a CPU format" in line and "--device cpu" in line


# -- the checkpoint ---------------------------------------------------------------------------

def test_unsupported_model_type(capsys, tmp_path):
    folder = fake_checkpoint(tmp_path / "llama", config={"model_type": "llama"})
    line = one_error(capsys, ["chat", "--model", folder, "hi"])
    assert "unsupported model_type 'llama'" in line and "MiniCPM-V 4.0, 4.5, 4.6 and 4.7" in line


def test_broken_config_json(capsys, tmp_path):
    folder = fake_checkpoint(tmp_path / "broken", config='{"model_type": "minicpmv4_6",\n "vision_config": {')
    line = one_error(capsys, ["chat", "--model", folder, "hi"])
    assert "config.json is not valid JSON (line 2" in line


def test_folder_without_tokenizer_or_weights(capsys, tmp_path):
    no_tokenizer = fake_checkpoint(tmp_path / "a", tokenizer=False)
    assert "no tokenizer.json" in one_error(capsys, ["chat", "--model", no_tokenizer, "hi"])
    assert "no *.safetensors" in one_error(capsys, ["chat", "--model", fake_checkpoint(tmp_path / "b", weights=False),
                                                    "hi"])
    sharded = fake_checkpoint(tmp_path / "c", weights=False)
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    (sharded / "model-00001-of-00002.safetensors").write_bytes(b"x")
    assert "lacks 1 of its 2 weight shards" in one_error(capsys, ["chat", "--model", sharded, "hi"])
    assert "holds no config.json" in one_error(capsys, ["chat", "--model", tmp_path, "hi"])


def test_model_that_is_neither_a_folder_nor_a_hub_id(capsys, tmp_path):
    assert "not a hub id" in one_error(capsys, ["chat", "--model", tmp_path / "missing" / "folder", "hi"])
    (tmp_path / "model.safetensors").write_bytes(b"x")
    assert "is a file" in one_error(capsys, ["chat", "--model", tmp_path / "model.safetensors", "hi"])


@pytest.mark.parametrize("flag", [["--downsample-mode", "4x"], ["--stack-frames", "2"]])
def test_46_only_flags_with_45(capsys, flag):
    line = one_error(capsys, ["chat", "--model", MODEL_45, *flag, "hi"])
    assert "MiniCPM-V 4.6/4.7 option" in line and "MiniCPM-V 4.5" in line


def test_40_has_no_thinking_and_46_no_max_inp_length(capsys, ckpt):
    assert "no thinking mode" in one_error(capsys, ["chat", "--model", MODEL_40, "--think", "hi"])
    assert "--max-inp-length is a MiniCPM-V 4.0/4.5 option" in one_error(
        capsys, ["chat", "--model", ckpt, "--max-inp-length", "100", "hi"])


def test_debug_shows_the_traceback_instead(ckpt, tmp_path):
    with pytest.raises(CliError, match="no such file"):
        main(["chat", "--debug", "--model", str(ckpt), "--image", str(tmp_path / "x.png"), "hi"])


# -- serve ----------------------------------------------------------------------------------------

def test_serve_busy_port_is_found_before_loading(capsys, ckpt):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = one_error(capsys, ["serve", "--model", ckpt, "--port", port])
    assert f"port {port} on 127.0.0.1 is not free" in line and "--port" in line


def test_serve_bad_flags(capsys, ckpt, tmp_path):
    assert "is not a folder" in one_error(capsys, ["serve", "--model", ckpt, "--allowed-local-media-path",
                                                   tmp_path / "nope"])
    assert "--max-concurrency 0" in one_error(capsys, ["serve", "--model", ckpt, "--max-concurrency", "0"])
    assert "--port 70000" in one_error(capsys, ["serve", "--model", ckpt, "--port", "70000"])


# -- quantize ----------------------------------------------------------------------------------

def test_quantize_refuses_a_quantized_model(capsys, tmp_path):
    folder = fake_checkpoint(tmp_path / "int4")
    (folder / "config.json").write_text(json.dumps(config_of(folder, quantization_config={"quant_method": "gptq",
                                                                                             "bits": 4})))
    line = one_error(capsys, ["quantize", "--model", folder, "--out", tmp_path / "out"])
    assert "already quantized (gptq" in line


def test_quantize_refuses_to_overwrite(capsys, ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"keep me")
    line = one_error(capsys, ["quantize", "--model", ckpt, "--out", out])
    assert "already exists" in line and "--force" in line
    assert (out / "model.safetensors").read_bytes() == b"keep me"
    assert "--out is the --model folder" in one_error(capsys, ["quantize", "--model", ckpt, "--out", ckpt, "--force"])
    assert "--calibration" in one_error(capsys, ["quantize", "--model", ckpt, "--out", tmp_path / "new",
                                                 "--calibration", tmp_path / "calib"])


# -- run (batch) ----------------------------------------------------------------------------------

def test_run_missing_input_and_output_over_input(capsys, ckpt, tmp_path):
    assert "no such file" in one_error(capsys, ["run", tmp_path / "in.jsonl", "--out", tmp_path / "o.jsonl",
                                                "--model", ckpt])
    (tmp_path / "in.jsonl").write_text("{}\n")
    assert "--out is the input file" in one_error(capsys, ["run", tmp_path / "in.jsonl", "--out",
                                                           tmp_path / "in.jsonl", "--model", ckpt])


# -- as a user runs it: a fresh process, no torch imported for a mistake ---------------------------

def test_a_mistake_in_a_fresh_process_is_fast_and_never_imports_torch(tmp_path):
    ckpt = fake_checkpoint(tmp_path / "m")
    code = ("import sys; from minicpmv.cli import main; rc = main(sys.argv[1:]); "
            "print('torch' in sys.modules); sys.exit(rc)")
    import subprocess
    import sys

    from cli_support import REPO

    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, "chat", "--model", str(ckpt), "--image",
                          str(tmp_path / "typo.jpg"), "hi"], capture_output=True, text=True, cwd=REPO, timeout=60)
    elapsed = time.perf_counter() - start
    assert out.returncode == 2 and out.stdout.strip() == "False", out
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: ") and "Traceback" not in out.stderr
    assert elapsed < 5, elapsed  # ~0.3 s on an idle machine; torch alone takes seconds


def test_without_network_it_says_how_to_work_offline(tmp_path):
    out = run_cli("chat", "What is it?", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "openbmb/MiniCPM-V-4.6" in out.stderr and "minicpmv download" in out.stderr and "--model" in out.stderr


def test_hub_id_flags_are_checked_on_config_json_before_the_download(capsys, monkeypatch):
    import huggingface_hub

    fetched = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, filename, revision=None: fetched.append(
        (repo, filename)) or str(MODEL_45 / "config.json"))
    line = one_error(capsys, ["chat", "--model", "openbmb/MiniCPM-V-4_5", "--stack-frames", "2", "hi"])
    assert "--stack-frames is a MiniCPM-V 4.6/4.7 option" in line
    assert fetched == [("openbmb/MiniCPM-V-4_5", "config.json")]  # a few kB, not the weights
