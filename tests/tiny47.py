"""Build tiny random MiniCPM-V 4.7 checkpoints (dense and MoE) in the released layout with
transformers 5.23 itself (the oracle). The configs are shrunk from shared/fixtures/minicpm-v-4.7's
reconstructions; tokenizer and template are 4.6's (spec v47.md section 6). Test-only."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tiny46 import FIXTURES as FIXTURES46, randomize_

FIXTURES = FIXTURES46.parent / "minicpm-v-4.7"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"]
LAYER_TYPES = ["linear_attention", "full_attention", "linear_attention", "full_attention"]


def tiny_config(moe: bool, **text_overrides) -> dict:
    name = "config.35B-A3B.reconstructed.json" if moe else "config.1B.reconstructed.json"
    cfg = json.loads((FIXTURES / name).read_text())
    cfg["insert_layer_id"] = 1
    cfg["vision_config"].update(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4)
    text = cfg["text_config"]
    text.update(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                max_position_embeddings=4096, layer_types=LAYER_TYPES)
    if moe:
        text.update(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, shared_expert_intermediate_size=48)
    else:
        text.update(intermediate_size=128)
    text.update(text_overrides)
    return cfg


def randomize_moe_(model: torch.nn.Module, seed: int) -> None:
    """tiny46's recipe, plus fused expert tensors scaled by their real fan-in (the last dim)."""
    randomize_(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 3 and ".experts." in name:
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / p.shape[-1] ** 0.5))


def fuse_experts(folder: Path) -> None:
    """Rewrite a per-expert checkpoint (what save_pretrained writes) into the fused 3-D layout of
    the Qwen3.5-MoE hub files: experts.gate_up_proj [E, 2I, D], experts.down_proj [E, D, I]."""
    path = folder / "model.safetensors"
    sd = load_file(path)
    out, experts = {}, {}
    for key, t in sd.items():
        if ".mlp.experts." in key:
            prefix, rest = key.split(".mlp.experts.")
            e, proj = rest.split(".")[:2]
            experts.setdefault(prefix, {})[(int(e), proj)] = t
        else:
            out[key] = t
    for prefix, pieces in experts.items():
        n = max(e for e, _ in pieces) + 1
        out[f"{prefix}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([pieces[(e, "gate_proj")], pieces[(e, "up_proj")]]) for e in range(n)])
        out[f"{prefix}.mlp.experts.down_proj"] = torch.stack([pieces[(e, "down_proj")] for e in range(n)])
    save_file(out, path, metadata={"format": "pt"})


def build_tiny_47(folder: Path, moe: bool = False, fused: bool = False, seed: int = 0, dtype=torch.float32,
                  **text_overrides) -> Path:
    from transformers import MiniCPMV4_7Config, MiniCPMV4_7ForConditionalGeneration

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = MiniCPMV4_7Config(**tiny_config(moe, **text_overrides))
    torch.manual_seed(seed)
    model = MiniCPMV4_7ForConditionalGeneration(config).to(dtype)
    randomize_moe_(model, seed)
    model.save_pretrained(folder)
    if fused:
        fuse_experts(folder)
    for name in TOKENIZER_FILES:
        shutil.copyfile(FIXTURES46 / name, folder / name)
    pre = json.loads((FIXTURES46 / "preprocessor_config.json").read_text())
    pre["processor_class"] = "MiniCPMV4_7Processor"
    (folder / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    return folder
