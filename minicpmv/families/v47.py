"""MiniCPM-V 4.7 (dense 1B and 35B-A3B MoE): 4.6's template, media options and stop tokens; its
processor without video numbering; and canvas M-RoPE positions for every prompt with vision.
Thinking is the per-request `enable_thinking` template switch."""
from __future__ import annotations

from dataclasses import replace

from ..processing.canvas_rope import CanvasMarkers, canvas_positions, token_types
from ..processing.processor47 import Processor47
from .base import PreparedPrompt
from .v46 import Family46

MERGE = {"16x": 4, "4x": 2}  # patches per LLM-token side


class Family47(Family46):
    name = "minicpmv4_7"
    processor_class = Processor47

    def __init__(self, folder, config: dict, tokenizer):
        super().__init__(folder, config, tokenizer)
        self.markers = CanvasMarkers.from_config(config)
        self.downsample_mode = config.get("downsample_mode", "16x")

    def prepare(self, msgs, *, downsample_mode: str | None = None, **options) -> PreparedPrompt:
        # 4.7 keeps downsample_mode in config.json: the processor (placeholder count), the vision
        # tower and the canvas all follow the request's value, else the config's
        mode = downsample_mode or self.downsample_mode
        prepared = super().prepare(msgs, downsample_mode=mode, **options)
        if not prepared.vision:
            return prepared
        sizes = {v.token_id: v.target_sizes.tolist() for v in prepared.vision}
        ids = prepared.input_ids
        positions, delta = canvas_positions(ids, token_types(ids, self.image_token_id, self.video_token_id),
                                            sizes.get(self.image_token_id, []), sizes.get(self.video_token_id, []),
                                            MERGE[mode], self.markers)
        return replace(prepared, position_ids=positions, rope_delta=delta)
