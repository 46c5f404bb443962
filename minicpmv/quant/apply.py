"""Quantization is a module swap chosen from config.json before the weights load.

`plan_quantized_load(model, config, folder)` reads `quantization_config` (config.json, else
quantize_config.json), finds the quantized linears from the checkpoint itself (every key ending
in `.qweight` names one), swaps exactly those nn.Linear modules for GPTQLinear on the meta
device, and returns a plan whose `keep_dtype` keeps fp16 scales/bias as stored and whose
`finish` builds each layer's runtime kernel after loading. Everything the checkpoint keeps dense
(vision tower, merger/resampler, embeddings, lm_head, linears left out by
`modules_in_block_to_quantize` or `dynamic`) stays a plain nn.Linear.

`select_gptq_targets(model, qcfg)` is the config-side rule the quantizer uses: every nn.Linear
inside the LLM's decoder layers whose name ends with one of `modules_in_block_to_quantize`
(all of them when absent), minus `dynamic` "-:" exclusions, with per-module `dynamic` overrides.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from safetensors import safe_open
from torch import nn

from .gptq_format import GPTQSpec
from .gptq_linear import GPTQLinear

# Where each family keeps its LLM decoder layers (our module names).
LLM_BLOCK_PREFIXES = ("language_model.layers", "llm.model.layers", "model.layers", "llm.layers")


@dataclass
class GPTQConfig:
    """The loader-relevant part of a `quantization_config`."""

    base: GPTQSpec
    modules_in_block_to_quantize: list[list[str]] | None = None
    dynamic: dict[str, dict] = field(default_factory=dict)
    raw: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTQConfig":
        method = str(d.get("quant_method", d.get("method", ""))).lower()
        if method != "gptq":
            raise NotImplementedError(f"quant_method {method!r} is not supported; minicpmv loads GPTQ checkpoints "
                                      f"(quant_method 'gptq')")
        fmt = d.get("format") or d.get("checkpoint_format") or "gptq"
        if fmt not in ("gptq", "gptq_v2"):
            raise NotImplementedError(f"GPTQ checkpoint format {fmt!r} is not supported (gptq, gptq_v2 are)")
        pack_dtype = d.get("pack_dtype", "int32")
        if str(pack_dtype).replace("torch.", "") != "int32":
            raise NotImplementedError(f"GPTQ pack_dtype {pack_dtype!r} is not supported (int32 is)")
        if d.get("lm_head"):
            raise NotImplementedError("GPTQ checkpoints with a quantized lm_head are not supported yet")
        base = GPTQSpec(bits=int(d.get("bits", 4)), group_size=int(d.get("group_size", 128)),
                        sym=bool(d.get("sym", True)), desc_act=bool(d.get("desc_act", False)), format=fmt)
        mods = d.get("modules_in_block_to_quantize")
        if mods and isinstance(mods[0], str):
            mods = [mods]
        return cls(base=base, modules_in_block_to_quantize=mods, dynamic=dict(d.get("dynamic") or {}), raw=d)

    def spec_for(self, checkpoint_module: str) -> GPTQSpec | None:
        """The spec of one module after `dynamic` overrides; None when a "-:" rule excludes it.
        Rules are tried in order, first match wins (as GPTQModel does); plain and "+:" keys
        are positive overrides."""
        for pattern, override in self.dynamic.items():
            negative = pattern.startswith("-:")
            regex = pattern[2:] if pattern.startswith(("-:", "+:")) else pattern
            if re.match(regex, checkpoint_module):
                if negative:
                    return None
                o = override or {}
                return replace(self.base, bits=int(o.get("bits", self.base.bits)),
                               group_size=int(o.get("group_size", self.base.group_size)),
                               sym=bool(o.get("sym", self.base.sym)),
                               desc_act=bool(o.get("desc_act", self.base.desc_act)))
        return self.base


def read_quantization_config(config: dict, folder: Path | None = None) -> dict | None:
    """The raw quantization config: config.json's `quantization_config`, else quantize_config.json."""
    q = config.get("quantization_config")
    if q is None and folder is not None and (Path(folder) / "quantize_config.json").is_file():
        q = json.loads((Path(folder) / "quantize_config.json").read_text())
    return q


def llm_block_prefix(model: nn.Module) -> str:
    """Our module name of the LLM's decoder-layer list (models may declare `llm_block_prefix`)."""
    declared = getattr(model, "llm_block_prefix", None)
    names = dict(model.named_modules())
    for prefix in ([declared] if declared else []) + list(LLM_BLOCK_PREFIXES):
        if isinstance(names.get(prefix), nn.ModuleList):
            return prefix
    raise ValueError(f"cannot find the LLM decoder layers in {type(model).__name__} "
                     f"(looked for {', '.join(LLM_BLOCK_PREFIXES)})")


def _checkpoint_name(model: nn.Module, module_name: str) -> str:
    """Our module name -> the checkpoint's (the inverse of model.checkpoint_key for modules)."""
    inverse = getattr(model, "checkpoint_name", None)
    if inverse is not None:
        return inverse(module_name)
    for prefix in ("model.", "", "llm.", "model.llm."):
        cand = prefix + module_name
        key = model.checkpoint_key(cand + ".weight") if hasattr(model, "checkpoint_key") else cand + ".weight"
        if key == module_name + ".weight":
            return cand
    return module_name


def select_gptq_targets(model: nn.Module, qcfg: GPTQConfig) -> dict[str, GPTQSpec]:
    """Our module name -> spec for every LLM linear the config asks to quantize."""
    prefix = llm_block_prefix(model)
    wanted = sum(qcfg.modules_in_block_to_quantize, []) if qcfg.modules_in_block_to_quantize else None
    out = {}
    for name, module in model.named_modules():
        if not name.startswith(prefix + ".") or not isinstance(module, nn.Linear):
            continue
        if wanted is not None and not any(name.endswith("." + w) for w in wanted):
            continue
        spec = qcfg.spec_for(_checkpoint_name(model, name))
        if spec is not None:
            out[name] = spec
    return out


def _checkpoint_header(folder: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """checkpoint key -> (dtype string, shape), read from the safetensors headers only."""
    from ..weights import checkpoint_files

    out = {}
    for path in checkpoint_files(Path(folder)):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                out[key] = (sl.get_dtype(), tuple(sl.get_shape()))
    return out


def swap_linear(model: nn.Module, name: str, spec: GPTQSpec, device=None) -> GPTQLinear:
    old = model.get_submodule(name)
    if not isinstance(old, nn.Linear):
        raise TypeError(f"{name} is a {type(old).__name__}, not an nn.Linear: cannot hold GPTQ weights")
    new = GPTQLinear(old.in_features, old.out_features, spec, bias=old.bias is not None,
                     device=device if device is not None else old.weight.device)
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)
    return new


@dataclass
class QuantizedLoad:
    """What the loader needs from a GPTQ checkpoint: which buffers keep their stored dtype, and
    the per-layer kernel preparation after the weights are in."""

    config: GPTQConfig
    modules: dict[str, GPTQSpec]

    def keep_dtype(self, inner=lambda name: False):
        quant_buffers = {f"{m}.{b}" for m in self.modules for b in ("scales", "bias")}
        return lambda name: name in quant_buffers or inner(name)

    def finish(self, model: nn.Module, backend: str = "auto", isa: str | None = None) -> None:
        """Prepare the kernels of every GPTQLinear still in place (a CPU plan may have moved some
        into its own int4 format already)."""
        for name in self.modules:
            layer = model.get_submodule(name)
            if isinstance(layer, GPTQLinear):
                layer.prepare(backend, isa=isa)


def plan_quantized_load(model: nn.Module, config: dict, folder: Path) -> QuantizedLoad | None:
    """Swap the quantized LLM linears of a model built on the meta device; None for a dense
    checkpoint. Call before `load_weights`."""
    raw = read_quantization_config(config, folder)
    if raw is None:
        return None
    qcfg = GPTQConfig.from_dict(raw)
    header = _checkpoint_header(folder)
    rename = getattr(model, "checkpoint_key", lambda k: k)
    modules: dict[str, GPTQSpec] = {}
    for key in header:
        if not key.endswith(".qweight"):
            continue
        ckpt_module = key[: -len(".qweight")]
        ours = rename(ckpt_module + ".weight")
        if ours is None:
            continue
        name = ours[: -len(".weight")]
        spec = qcfg.spec_for(ckpt_module) or qcfg.base  # present in the checkpoint: it is quantized
        lin = model.get_submodule(name)
        expected = spec.shapes(lin.in_features, lin.out_features)
        for part, shape in expected.items():
            got = header.get(f"{ckpt_module}.{part}", (None, None))[1]
            if got != shape:
                raise ValueError(f"{ckpt_module}.{part}: checkpoint shape {got} does not match a {spec.bits}-bit "
                                 f"group-{spec.group_size} GPTQ linear {lin.in_features}->{lin.out_features} "
                                 f"(expected {shape}); check quantization_config")
        modules[name] = spec
    if not modules:
        raise ValueError(f"config.json in {folder} declares GPTQ quantization but the checkpoint has no "
                         f"'*.qweight' tensors")
    for name, spec in modules.items():
        swap_linear(model, name, spec)
    return QuantizedLoad(qcfg, modules)
