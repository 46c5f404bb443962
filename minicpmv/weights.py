"""Read safetensors checkpoints (single file or sharded with an index) into a model built on
the meta device, so the weights are materialised once, straight in the target dtype."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm


def checkpoint_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    return files


def load_weights(model: torch.nn.Module, folder: Path, rename, dtype_for, device, progress: bool = True) -> None:
    """Assign every checkpoint tensor to the parameter/buffer `rename(key)` names (None = skip).
    Floating tensors are cast to `dtype_for(name)` (None = keep the checkpoint's dtype); every
    parameter must be covered, except ones tied to another (lm_head with tied embeddings)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    params.update(dict(model.named_buffers()))
    expected = {n for n, _ in model.named_parameters()}
    tied = set(params) - expected - {n for n, _ in model.named_buffers()}
    loaded = set()
    files = checkpoint_files(folder)
    bar = tqdm(total=len(files), desc="Loading weights", unit="file", disable=not progress or len(files) < 2)
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                name = rename(key)
                if name is None or name in tied:
                    continue
                if name not in params:
                    raise KeyError(f"unexpected tensor {key!r} in {path.name}")
                t = f.get_tensor(key)
                target = params[name]
                if tuple(t.shape) != tuple(target.shape):
                    raise ValueError(f"{key}: checkpoint shape {tuple(t.shape)} != model shape {tuple(target.shape)}")
                dtype = dtype_for(name) if t.is_floating_point() else None
                if dtype is not None:
                    t = t.to(dtype)
                _assign(model, name, t.to(device))
                loaded.add(name)
        bar.update(1)
    bar.close()
    missing = expected - loaded
    if missing:
        raise KeyError(f"checkpoint in {folder} lacks {len(missing)} tensors, e.g. {sorted(missing)[:5]}")


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[attr] = tensor
