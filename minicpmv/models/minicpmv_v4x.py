"""What MiniCPM-V 4.0 and 4.5 share (model_type "minicpmv", the remote-code checkpoints): the key
layout `vpm.*` (SigLIP-400M NaViT tower), `resampler.*` (perceiver resampler), `llm.*` (a
transformers causal LM), the flat config.json, and the path vision -> resampler -> scatter -> LLM.
minicpmv4_0.py / minicpmv4_5.py only pick the text tower and whether the resampler is temporal."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..state import ForwardBatch
from .llama import LlamaConfig, LlamaForCausalLM
from .resampler import Resampler
from .scatter import scatter_vision
from .siglip import SiglipEmbeddings, SiglipEncoder, pad_crops, strip_to_patches, unpad_crops

# MiniCPM-o checkpoints share this layout and add audio/TTS towers; a vision-language run skips them.
_FOREIGN_PREFIXES = ("apm.", "audio_projection_layer.", "audio_avg_pooler.", "tts.")


@dataclass
class VisionConfigV4x:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    image_size: int = 980
    patch_size: int = 14
    layer_norm_eps: float = 1e-6

    @classmethod
    def from_dict(cls, v: dict) -> "VisionConfigV4x":
        if v.get("hidden_act", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
            raise ValueError(f"vision hidden_act {v.get('hidden_act')!r} is not supported (tanh-approximated gelu)")
        defaults = cls()
        return cls(**{k: v.get(k, getattr(defaults, k)) for k in defaults.__dataclass_fields__})


@dataclass
class MiniCPMVV4xConfig:
    version: str
    vision: VisionConfigV4x
    text: LlamaConfig
    query_num: int
    vision_batch_size: int
    drop_vision_last_layer: bool
    eos_token_id: list

    @classmethod
    def from_dict(cls, d: dict) -> "MiniCPMVV4xConfig":
        eos = d.get("eos_token_id")
        return cls(version=str(d.get("version", "")), vision=VisionConfigV4x.from_dict(d.get("vision_config", {})),
                   text=LlamaConfig.from_dict(d), query_num=d.get("query_num", 64),
                   vision_batch_size=d.get("vision_batch_size", 16),
                   drop_vision_last_layer=bool(d.get("drop_vision_last_layer", False)),
                   eos_token_id=[] if eos is None else (eos if isinstance(eos, list) else [eos]))


def navit_position_ids(target_sizes: torch.Tensor, side: int) -> torch.Tensor:
    """Position-table ids of every patch, raster order per crop, crops concatenated.

    Same bucketing as siglip.bucketed_position_ids, but the fractional coordinates are built the way
    the 4.0/4.5 remote code builds them: torch.arange(0, 1 - 1e-6, step) with step = 1 / h taken as
    a float32 tensor (h comes from an int32 tgt_sizes tensor). That differs from i / h in the last
    bit and moves a bucket for grid sides such as 25, 49, 50, 55, 58 (e.g. a 350-px slice side)."""
    boundaries = torch.arange(1 / side, 1.0, 1 / side, device="cpu")
    ids = []
    for h, w in target_sizes.tolist():
        coords = []
        for n in (h, w):
            step = 1 / torch.tensor(n, dtype=torch.int32)
            coords.append(torch.bucketize(torch.arange(0, 1 - 1e-6, step.item()), boundaries, right=True))
        rows, cols = coords
        ids.append((rows[:, None] * side + cols).flatten())
    return torch.cat(ids)


class VisionTowerV4x(nn.Module):
    """SigLIP NaViT tower, checkpoint prefix `vpm.`: crops of any size as one padded batch."""

    def __init__(self, cfg: VisionConfigV4x, num_layers: int):
        super().__init__()
        self.cfg = cfg
        self.embeddings = SiglipEmbeddings(cfg.hidden_size, cfg.patch_size, cfg.image_size)
        self.encoder = SiglipEncoder(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, num_layers,
                                     cfg.layer_norm_eps)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, target_sizes: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Packed strip (1, 3, P, L*P) -> packed features [L, D_vit]. Crops run `batch_size` at a time
        (the reference's vision_batch_size) to bound the padded attention's memory."""
        x = self.embeddings.embed_patches(strip_to_patches(pixel_values, self.cfg.patch_size))
        pos = navit_position_ids(target_sizes, self.embeddings.side).to(x.device)
        x = x + self.embeddings.position_embedding(pos)
        lengths = [h * w for h, w in target_sizes.tolist()]
        out = []
        for start in range(0, len(lengths), batch_size):
            chunk = lengths[start:start + batch_size]
            offset = sum(lengths[:start])
            padded, mask = pad_crops(x[offset:offset + sum(chunk)], chunk)
            for layer in self.encoder.layers:
                padded = layer(padded, mask)
            out.append(unpad_crops(padded, chunk))
        return self.post_layernorm(torch.cat(out))


class MiniCPMVV4x(nn.Module):
    """vpm -> resampler -> embeddings scattered at the `<unk>` placeholders -> llm. Subclasses set
    `family`, `text_cls` and `temporal`."""

    family = ""
    text_cls: type[LlamaForCausalLM] = LlamaForCausalLM
    temporal = False

    @classmethod
    def from_config(cls, config: dict) -> "MiniCPMVV4x":
        return cls(MiniCPMVV4xConfig.from_dict(config))

    # modules whose matrices run once per generated token (see layers/fp16_packed.py)
    per_token_prefixes = ("llm.",)

    def __init__(self, cfg: MiniCPMVV4xConfig):
        super().__init__()
        self.config = cfg
        v = cfg.vision
        layers = v.num_hidden_layers - (1 if cfg.drop_vision_last_layer else 0)
        self.vpm = VisionTowerV4x(v, layers)
        self.resampler = Resampler(cfg.query_num, cfg.text.hidden_size, v.hidden_size, temporal=self.temporal)
        self.llm = self.text_cls(cfg.text)
        if cfg.drop_vision_last_layer:
            # the reference truncates the tower before loading, so the last layer's tensors are unused
            dropped = f"vpm.encoder.layers.{layers}."
            base = self.checkpoint_key
            self.checkpoint_key = lambda name: None if name.startswith(dropped) else base(name)

    def tie_weights(self) -> None:
        self.llm.tie_weights()

    @staticmethod
    def checkpoint_key(name: str) -> str | None:
        """The module tree mirrors the checkpoint; audio/TTS towers of MiniCPM-o are skipped."""
        if name.startswith(_FOREIGN_PREFIXES):
            return None
        return name

    def state_spec(self) -> list:
        return self.llm.model.state_spec()

    @property
    def dtype(self) -> torch.dtype:
        """The activation (and cache) dtype; matrices may be stored narrower (layers/mixed.py)."""
        return self.llm.model.norm.weight.dtype

    def encode_vision(self, pixel_values: torch.Tensor, target_sizes: torch.Tensor, downsample_mode: str | None = None,
                      temporal_ids: list[list[int]] | None = None) -> torch.Tensor:
        """Crops (packed strip + (h, w) per crop) -> [num_units * query_num, D], unit after unit, in the
        order of the `<image>`/`<slice>` spans of the prompt. downsample_mode is a 4.6 notion; ignored."""
        w = self.vpm.embeddings.patch_embedding.weight
        feats = self.vpm(pixel_values.to(w.dtype), target_sizes, self.config.vision_batch_size)
        sizes = [tuple(s) for s in target_sizes.tolist()]
        units = self.resampler(feats, sizes, temporal_ids)
        return units.reshape(-1, units.shape[-1])

    def embed(self, input_ids: torch.Tensor, vision: dict[int, torch.Tensor]) -> torch.Tensor:
        """input_ids [T] -> inputs_embeds [1, T, D]; vision maps the placeholder id (`<unk>`) to the
        features that fill its positions in order. No embedding scale: 4.0/4.5 have no muP."""
        return scatter_vision(self.llm.model.embed_tokens(input_ids), input_ids, vision)

    def forward(self, inputs_embeds: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return self.llm.model(inputs_embeds, batch)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.llm.lm_head(hidden).float()
