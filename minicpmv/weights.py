"""Read safetensors checkpoints (single file or sharded with an index) into a model built on
the meta device, so the weights are materialised once, straight in the target dtype."""
from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
COMPACT_EVERY = 1 << 30  # bytes read between two calls of load_weights' `compact`


def _read_header(f) -> tuple[int, dict]:
    """A safetensors file's header: its byte length and the tensor entries (metadata dropped)."""
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return n, header


def read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from one safetensors file with plain reads into fresh tensors.

    safetensors' own loader memory-maps the file; every page it touches then counts in the
    process's resident memory until the file is closed, so loading a 2.6 GB checkpoint peaks at
    checkpoint + model. Reading tensor by tensor keeps the peak at the model alone. The format is
    an 8-byte little-endian header length, a JSON header (dtype, shape, byte offsets), the data."""
    with open(path, "rb") as f:
        n, header = _read_header(f)
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if info["dtype"] not in _DTYPES:
                raise ValueError(f"{path.name}: tensor {name} has unsupported dtype {info['dtype']}")
            start, end = info["data_offsets"]
            t = torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]])
            if end > start:
                f.seek(8 + n + start)
                f.readinto(memoryview(t.view(-1).view(torch.uint8).numpy()))
            yield name, t


def stored_float_dtype(folder: Path) -> torch.dtype | None:
    """The floating dtype most of the checkpoint's tensors are stored in (read from the first
    file's header only), or None when it holds no floating tensors."""
    with open(checkpoint_files(folder)[0], "rb") as f:
        _, header = _read_header(f)
    counts = {}
    for info in header.values():
        dtype = _DTYPES.get(info["dtype"])
        if dtype is not None and dtype.is_floating_point:
            counts[dtype] = counts.get(dtype, 0) + 1
    return max(counts, key=counts.get) if counts else None


def checkpoint_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    return files


def load_weights(model: torch.nn.Module, folder: Path, rename, dtype_for, device, progress: bool = True,
                 regroup=None, compact=None) -> None:
    """Assign every checkpoint tensor to the parameter/buffer `rename(key)` names (None = skip).
    Floating tensors are cast to `dtype_for(name)` (None = keep the checkpoint's dtype); every
    parameter must be covered, except ones tied to another (lm_head with tied embeddings).
    `regroup` (optional, e.g. models/expert_layout.py) may merge several stored tensors into one
    before renaming: `.feed(pairs)` maps (key, tensor) pairs, `.finish()` checks nothing is left.
    `compact()` (optional) is called after every COMPACT_EVERY bytes read and after each file:
    the loader's chance to convert what has arrived (e.g. quantize it) before more comes in."""
    # modules that take their checkpoint tensors themselves (e.g. experts quantized while they
    # load, layers/moe_quant.py): `load_stream(attr, tensor)`, `stream_missing()`
    streams = {name: m for name, m in model.named_modules() if hasattr(m, "load_stream")}
    params = dict(model.named_parameters(remove_duplicate=False))
    params.update(dict(model.named_buffers()))
    expected = {n for n, _ in model.named_parameters()}
    tied = set(params) - expected - {n for n, _ in model.named_buffers()}
    loaded = set()
    files = checkpoint_files(folder)
    total = sum(f.stat().st_size for f in files)  # bytes: a one-file checkpoint gets a moving bar too
    bar = tqdm(total=total, desc="Loading weights", unit="B", unit_scale=True, unit_divisor=1024,
               disable=not progress or total < 64 << 20)
    since = 0  # bytes read since the last compact()
    for path in files:
        tensors = read_safetensors(path)
        for key, t in (tensors if regroup is None else regroup.feed(tensors)):
            bar.update(t.numel() * t.element_size())
            since += t.numel() * t.element_size()
            if compact is not None and since >= COMPACT_EVERY:
                compact()
                since = 0
            name = rename(key)
            if name is None or name in tied:
                continue
            owner = _stream_owner(name, streams) if streams else None
            if owner is not None:
                streams[owner].load_stream(name[len(owner) + 1:], t)
                continue
            if name not in params:
                raise KeyError(f"unexpected tensor {key!r} in {path.name}")
            target = params[name]
            if tuple(t.shape) != tuple(target.shape):
                raise ValueError(f"{key}: checkpoint shape {tuple(t.shape)} != model shape {tuple(target.shape)}")
            dtype = dtype_for(name) if t.is_floating_point() else None
            if dtype is not None:
                t = t.to(dtype)
            _assign(model, name, t.to(device))
            loaded.add(name)
        if compact is not None:
            compact()
            since = 0
    bar.close()
    if regroup is not None:
        regroup.finish()
    for owner, module in streams.items():
        gap = module.stream_missing()
        if gap is not None:
            raise KeyError(f"checkpoint in {folder} lacks {owner}: {gap}")
    missing = expected - loaded
    if missing:
        raise KeyError(f"checkpoint in {folder} lacks {len(missing)} tensors, e.g. {sorted(missing)[:5]}")


def _stream_owner(name: str, streams: dict) -> str | None:
    """The streaming module `name` belongs to (its own name), if any: tried at up to 3 levels up."""
    prefix = name
    for _ in range(3):
        prefix = prefix.rpartition(".")[0]
        if not prefix:
            return None
        if prefix in streams:
            return prefix
    return None


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[attr] = tensor
