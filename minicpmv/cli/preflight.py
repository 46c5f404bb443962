"""Checks that run before anything heavy: before a download, before the weights load and, for
all but the device check, before torch is imported. Each failure is a CliError that says what
is wrong and what to do instead."""
from __future__ import annotations

import json
import os
import re
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from .errors import CliError

FAMILY_NAMES = {"minicpmv4_6": "MiniCPM-V 4.6", "minicpmv4_5": "MiniCPM-V 4.5", "minicpmv4_0": "MiniCPM-V 4.0"}
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


# -- numbers ------------------------------------------------------------------------------------

def check_range(flag: str, value, low=None, high=None, low_open: bool = False, hint: str = "") -> None:
    """value (None = not given) must lie in [low, high] (or (low, high] with low_open)."""
    if value is None:
        return
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and value > high
    if too_low or too_high:
        left = "(" if low_open else "["
        bounds = f"{left}{'' if low is None else low}, {'' if high is None else high}]"
        if low is not None and high is None:
            wanted = f"{'>' if low_open else '>='} {low}"
        else:
            wanted = f"in {bounds}"
        raise CliError(f"{flag} {value} is out of range: it must be {wanted}", hint or None)


def check_sampling(args) -> None:
    """Sampling and generation flags, as far as the parser gave them."""
    get = lambda name: getattr(args, name, None)  # noqa: E731
    check_range("--temperature", get("temperature"), 0, hint="0 means greedy; 0.7 is a common choice")
    check_range("--top-p", get("top_p"), 0, 1, low_open=True, hint="e.g. --top-p 0.8")
    check_range("--top-k", get("top_k"), 0, hint="0 turns top-k off")
    check_range("--repetition-penalty", get("repetition_penalty"), 0, low_open=True, hint="1.0 turns it off")
    check_range("--max-new-tokens", get("max_new_tokens"), 1)
    check_range("--seed", get("seed"), 0)
    check_range("--threads", get("threads"), 1, hint=f"this machine has {os.cpu_count()} CPUs")
    check_range("--fps", get("fps"), 0, low_open=True, hint="frames sampled per second of video, e.g. --fps 1")
    check_range("--max-frames", get("max_frames"), 1)
    check_range("--max-slice-nums", get("max_slice_nums"), 1)
    check_range("--stack-frames", get("stack_frames"), 1)
    check_range("--max-inp-length", get("max_inp_length"), 1)
    check_range("--max-concurrency", get("max_concurrency"), 1)


# -- inputs -------------------------------------------------------------------------------------

def check_media(kind: str, source: str) -> None:
    """A path must be a readable file; a URL must be well formed (it is fetched later)."""
    flag = f"--{kind}"
    scheme = urllib.parse.urlsplit(source).scheme.lower()
    if scheme and Path(source).expanduser().is_file():  # a file whose name only looks like a URL (a:b.png)
        scheme = ""
    if scheme in ("http", "https"):
        if not urllib.parse.urlsplit(source).netloc:
            raise CliError(f"{flag} {source}: not a valid URL", "write it as http(s)://host/path")
        return
    if scheme == "data":
        if "," not in source:
            raise CliError(f"{flag}: malformed data URL (no comma)", "use data:image/png;base64,...")
        return
    if scheme == "file":
        path = urllib.parse.unquote(urllib.parse.urlsplit(source).path)
    elif len(scheme) > 1:  # one letter: a Windows drive, not a scheme
        raise CliError(f"{flag} {source}: unsupported URL scheme {scheme!r}", "pass a file path or an http(s) URL")
    else:
        path = source
    p = Path(path).expanduser()
    if not p.exists():
        near = _near_names(p)
        raise CliError(f"{flag} {source}: no such file", f"did you mean {near}?" if near else
                       "check the path; relative paths start from the current folder")
    if not p.is_file():
        raise CliError(f"{flag} {source}: is a folder, not a file", f"pass one {kind} file; repeat {flag} for more")
    if not os.access(p, os.R_OK):
        raise CliError(f"{flag} {source}: not readable", "check the file's permissions")
    if kind == "image":
        _check_image_header(p, flag, source)


def _check_image_header(path: Path, flag: str, source: str) -> None:
    """PIL reads only the header here: a text file or a truncated download is caught at once."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.size  # noqa: B018
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise CliError(f"{flag} {source}: not a recognizable image file ({type(e).__name__})",
                       "pass a JPEG, PNG, WebP, GIF, BMP or TIFF file") from e


def _near_names(p: Path) -> str:
    import difflib

    parent = p.parent if str(p.parent) else Path(".")
    try:
        names = [c.name for c in parent.iterdir()]
    except OSError:
        return ""
    close = difflib.get_close_matches(p.name, names, n=2, cutoff=0.6)
    return " or ".join(str(parent / c) if str(p.parent) not in ("", ".") else c for c in close)


def read_prompt(text: str | None, stdin) -> str | None:
    """`-` reads the prompt from stdin, `@FILE` from a file; anything else is the prompt itself."""
    if text is None:
        return None
    if text == "-":
        data = stdin.read()
        if not data.strip():
            raise CliError("the prompt read from stdin is empty", "pipe the question in, e.g. echo 'hi' | minicpmv "
                           "chat -")
        return data.rstrip("\n")
    if text.startswith("@") and len(text) > 1:
        path = Path(text[1:]).expanduser()
        if not path.is_file():
            raise CliError(f"prompt file {path} does not exist", "write @FILE with an existing text file, or quote "
                           "a question that starts with @ as '\\@...'")
        try:
            return path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise CliError(f"prompt file {path} could not be read as text ({e})") from e
    if text.startswith("\\@"):
        return text[1:]
    return text


def check_device_name(device: str) -> None:
    if not _DEVICE.match(device):
        raise CliError(f"--device {device!r} is not a device name", "use auto, cpu, cuda or cuda:N")


def check_device_present(device: str) -> None:
    """Needs torch (imported here, after every torch-free check passed)."""
    if device in ("auto", "cpu"):
        return
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CliError(f"--device {device}: no CUDA GPU is available to this PyTorch "
                           f"({'a CPU-only build' if torch.version.cuda is None else 'no device found'})",
                           "use --device cpu, or install a CUDA build of PyTorch on a machine with a GPU")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise CliError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)",
                           f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device == "mps":
        raise CliError("--device mps is not supported", "use --device cpu")


def check_port_free(host: str, port: int) -> None:
    check_range("--port", port, 1, 65535)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except socket.gaierror as e:
            raise CliError(f"--host {host}: not an address of this machine ({e.strerror})",
                           "use 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from e
        except OSError as e:
            raise CliError(f"port {port} on {host} is not free ({e.strerror})",
                           f"stop what listens there, or pick another with --port {port + 1}") from e


# -- the model ----------------------------------------------------------------------------------

@dataclass
class ModelInfo:
    source: str  # what the user passed
    folder: Path | None  # local folder (None: a hub id not downloaded yet)
    config: dict
    family: str  # minicpmv4_6 | minicpmv4_5 | minicpmv4_0

    @property
    def family_name(self) -> str:
        return FAMILY_NAMES[self.family]

    @property
    def quantized(self) -> str | None:
        q = self.config.get("quantization_config")
        return (q.get("quant_method") or "quantized") if isinstance(q, dict) else None

    @property
    def default_name(self) -> str:
        """What the server calls the model by default: the hub id, or the folder's name."""
        local = Path(self.source).expanduser()
        return Path(os.path.abspath(local)).name if self.folder is not None and local.is_dir() else self.source


def inspect_model(source: str, revision: str | None = None) -> ModelInfo:
    """Read and check config.json without loading anything: a local folder as it is; a hub id
    by fetching config.json alone (cached, or a few kB), so a bad flag is caught before the
    multi-GB download."""
    path = Path(source).expanduser()
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise CliError(f"{path} holds no config.json, so it is not a checkpoint folder",
                           "pass the folder with config.json, *.safetensors and tokenizer.json")
        config = read_config(config_file)
        check_checkpoint_files(path)
        return ModelInfo(source, path, config, family_from(config, config_file))
    if path.exists():
        raise CliError(f"--model {source} is a file", "pass the checkpoint folder that holds config.json")
    if source.count("/") != 1 or source.startswith((".", "/", "~")):
        raise CliError(f"--model {source}: no such folder, and not a hub id like openbmb/MiniCPM-V-4.6",
                       "check the path, or pass a Hugging Face id")
    try:
        from huggingface_hub import hf_hub_download

        config_file = Path(hf_hub_download(source, "config.json", revision=revision))
    except Exception as e:  # offline, no such repo, gated, ...
        if type(e).__name__ in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
            reason = "it is not in the local cache and the hub cannot be reached"
        elif type(e).__name__ in ("RepositoryNotFoundError", "GatedRepoError"):
            reason = "no such public repository, or it is gated: run `hf auth login` for gated ones"
        else:
            reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
        raise CliError(f"could not get {source!r} from the Hugging Face hub ({reason})",
                       f"without network, download it elsewhere with `minicpmv download {source}` and pass the "
                       f"local folder, e.g. --model /path/to/{source.split('/')[-1]}") from e
    config = read_config(config_file)
    return ModelInfo(source, None, config, family_from(config, config_file))


def read_config(config_file: Path) -> dict:
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CliError(f"{config_file} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})",
                       "download the checkpoint again, or fix the file") from e
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"{config_file} could not be read ({e})") from e
    if not isinstance(config, dict):
        raise CliError(f"{config_file} holds a JSON {type(config).__name__}, not an object",
                       "download the checkpoint again")
    return config


def family_from(config: dict, config_file: Path) -> str:
    from ..models.registry import family_of

    try:
        return family_of(config)
    except ValueError as e:
        raise CliError(f"{config_file}: {e}") from e  # the message names the families that load


def check_checkpoint_files(folder: Path) -> None:
    """tokenizer.json and the safetensors weights (every shard an index names) are present."""
    if not (folder / "tokenizer.json").is_file():
        raise CliError(f"{folder} has no tokenizer.json",
                       "copy the tokenizer files (tokenizer.json, tokenizer_config.json) from the original checkpoint")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CliError(f"{index} is not a valid safetensors index ({e})", "download the checkpoint again") from e
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CliError(f"{folder} lacks {len(missing)} of its {len(shards)} weight shards (first: {missing[0]})",
                           "the download is incomplete; run `minicpmv download` again")
    elif not any(folder.glob("*.safetensors")):
        extra = " (it has .bin/.pt files: convert them to safetensors)" if any(folder.glob("*.bin")) or any(
            folder.glob("*.pt")) else ""
        raise CliError(f"{folder} has no *.safetensors weights{extra}",
                       "pass a folder with the model's .safetensors files")


def check_family_options(info: ModelInfo, **given) -> None:
    """Options only some families understand (None/False = not given)."""
    only_46 = {"downsample_mode": "--downsample-mode", "stack_frames": "--stack-frames"}
    for key, flag in only_46.items():
        if given.get(key) is not None and info.family != "minicpmv4_6":
            raise CliError(f"{flag} is a MiniCPM-V 4.6 option and {info.source} is {info.family_name}",
                           f"drop {flag}")
    if given.get("max_inp_length") is not None and info.family == "minicpmv4_6":
        raise CliError(f"--max-inp-length is a MiniCPM-V 4.0/4.5 option and {info.source} is {info.family_name}, "
                       "which never cuts a prompt", "drop --max-inp-length")
    if info.family == "minicpmv4_0":
        if given.get("think"):
            raise CliError(f"{info.source} is MiniCPM-V 4.0, which has no thinking mode", "drop --think; 4.5 and 4.6 "
                                                                                           "think")
        if given.get("fps") is not None:
            raise CliError("--fps: MiniCPM-V 4.0 samples videos at 1 frame per second", "drop --fps, or use "
                                                                                        "--max-frames")
