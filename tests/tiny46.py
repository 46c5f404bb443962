"""Build tiny random MiniCPM-V 4.6 checkpoints in the released layout, using transformers (the
oracle) itself so the key names and config are exactly what it writes. Test-only."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "minicpm-v-4.6"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
                   "generation_config.json"]


def tiny_config(**text_overrides) -> dict:
    """The real config.json shrunk: 3 vision layers with the window merger after layer 1; a
    text tower with linear and full attention layers and more linear value heads than key heads."""
    cfg = json.loads((FIXTURES / "config.json").read_text())
    cfg["insert_layer_id"] = 1
    cfg["vision_config"].update(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4)
    text = cfg["text_config"]
    text.update(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
                linear_key_head_dim=16, linear_value_head_dim=16, max_position_embeddings=4096,
                layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"])
    text.update(text_overrides)
    return cfg


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Random weights that make every path matter: norms away from their identity, sharper
    attention, a decay range that keeps DeltaNet state alive."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(-2.0, 1.0, generator=g))
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif "norm" in name and name.endswith("weight"):
                base = 0.0 if "language_model" in name and "linear_attn.norm" not in name else 1.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif "position_embedding" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.ndim > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / fan_in ** 0.5))


def build_tiny_46(folder: Path, seed: int = 0, dtype=torch.float32, tie_word_embeddings: bool = True,
                  **text_overrides) -> Path:
    from transformers import MiniCPMV4_6Config, MiniCPMV4_6ForConditionalGeneration

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    raw = tiny_config(**text_overrides)
    raw["tie_word_embeddings"] = raw["text_config"]["tie_word_embeddings"] = tie_word_embeddings
    config = MiniCPMV4_6Config(**raw)
    torch.manual_seed(seed)
    model = MiniCPMV4_6ForConditionalGeneration(config).to(dtype)
    randomize_(model, seed)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copyfile(FIXTURES / name, folder / name)
    return folder
