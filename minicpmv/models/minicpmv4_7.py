"""MiniCPM-V 4.7 (model_type "minicpmv4_7"): 4.6's vision tower, mergers and checkpoint layout
around either the dense Qwen3.5 text tower (the 1B, with an untied head) or Qwen3.5-MoE (the
35B-A3B). What is new lives elsewhere: canvas M-RoPE positions (processing/canvas_rope.py, which
the text tower takes as [3, B, T] positions) and the MoE block (layers/moe.py)."""
from __future__ import annotations

from dataclasses import dataclass

from .expert_layout import PER_EXPERT, ExpertStacker
from .minicpmv4_6 import MiniCPMV46, MiniCPMV46Config
from .qwen3_5 import Qwen35TextConfig, Qwen35TextModel
from .qwen3_5_moe import Qwen35MoeTextConfig, Qwen35MoeTextModel

TEXT_TOWERS = {"qwen3_5_text": (Qwen35TextConfig, Qwen35TextModel),
               "qwen3_5_moe_text": (Qwen35MoeTextConfig, Qwen35MoeTextModel)}


@dataclass
class MiniCPMV47Config(MiniCPMV46Config):
    @staticmethod
    def text_config_from_dict(d: dict, tie: bool) -> Qwen35TextConfig:
        kind = d.get("model_type", "qwen3_5_text")
        if kind not in TEXT_TOWERS:
            raise ValueError(f"MiniCPM-V 4.7 text_config.model_type {kind!r} is not supported "
                             f"(known: {', '.join(TEXT_TOWERS)})")
        return TEXT_TOWERS[kind][0].from_dict(d, tie)


class MiniCPMV47(MiniCPMV46):
    family = "minicpmv4_7"

    @property
    def text_model_class(self):
        return Qwen35MoeTextModel if isinstance(self.config.text, Qwen35MoeTextConfig) else Qwen35TextModel

    def checkpoint_key(self, name: str) -> str | None:
        m = PER_EXPERT.match(name)
        if m is None:
            return MiniCPMV46.checkpoint_key(name)
        if not self._experts_stream():  # plain ones are stacked before renaming: this is GPTQ planning
            raise ValueError(f"{name}: quantized MoE experts are not supported (a GPTQ 4.7 MoE checkpoint must keep "
                             f"its routed experts in floating point)")
        experts = MiniCPMV46.checkpoint_key(m.group(1) + ".weight")
        return None if experts is None else f"{experts[:-len('.weight')]}.{m.group(2)}.{m.group(3)}"

    def checkpoint_regrouper(self) -> ExpertStacker | None:
        """Per-expert checkpoint tensors are stacked into the fused expert parameters, unless the
        experts take them one by one (quantized while loading, layers/moe_quant.py)."""
        text = self.config.text
        if not isinstance(text, Qwen35MoeTextConfig) or self._experts_stream():
            return None
        return ExpertStacker(text.num_experts)

    def _experts_stream(self) -> bool:
        layers = self.language_model.layers
        return len(layers) > 0 and hasattr(getattr(layers[0].mlp, "experts", None), "load_stream")
