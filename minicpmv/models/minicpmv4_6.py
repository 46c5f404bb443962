"""MiniCPM-V 4.6 (model_type "minicpmv4_6"): SigLIP2 tower with a 2x2 window-attention merger
after layer `insert_layer_id`, a 2x2 MLP merger into the text width, and the Qwen3.5 hybrid
text tower. Module names mirror the transformers-native checkpoint (`model.vision_tower.*`,
`model.merger.*`, `model.language_model.*`, `lm_head.weight`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..layers.mlp import gelu_mlp
from ..state import ForwardBatch
from .scatter import scatter_vision
from .qwen3_5 import Qwen35TextConfig, Qwen35TextModel
from .siglip import (SiglipAttention, SiglipEmbeddings, SiglipEncoder, bucketed_position_ids, pad_crops,
                     strip_to_patches, unpad_crops)


@dataclass
class VisionConfig46:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    layer_norm_eps: float
    insert_layer_id: int
    window_kernel: int


@dataclass
class MiniCPMV46Config:
    vision: VisionConfig46
    text: Qwen35TextConfig
    image_token_id: int | None
    video_token_id: int | None
    downsample_mode: str
    merge_kernel: int
    merger_times: int
    eos_token_id: list

    @classmethod
    def from_dict(cls, d: dict) -> "MiniCPMV46Config":
        v = d.get("vision_config", {})
        wk = v.get("window_kernel_size", (2, 2))
        mk = d.get("merge_kernel_size", (2, 2))
        if wk[0] != wk[1] or mk[0] != mk[1]:
            raise ValueError(f"non-square window/merge kernels are not supported: {wk}, {mk}")
        vision = VisionConfig46(
            hidden_size=v.get("hidden_size", 768), intermediate_size=v.get("intermediate_size", 3072),
            num_hidden_layers=v.get("num_hidden_layers", 12), num_attention_heads=v.get("num_attention_heads", 12),
            image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 16),
            layer_norm_eps=v.get("layer_norm_eps", 1e-6),
            insert_layer_id=d.get("insert_layer_id", v.get("insert_layer_id", 6)), window_kernel=wk[0])
        tie = d.get("tie_word_embeddings", False)
        eos = d.get("eos_token_id")
        return cls(vision=vision, text=cls.text_config_from_dict(d["text_config"], tie),
                   image_token_id=d.get("image_token_id"), video_token_id=d.get("video_token_id"),
                   downsample_mode=d.get("downsample_mode", "16x"), merge_kernel=mk[0],
                   merger_times=d.get("merger_times", 1),
                   eos_token_id=[] if eos is None else (eos if isinstance(eos, list) else [eos]))

    @staticmethod
    def text_config_from_dict(d: dict, tie: bool) -> Qwen35TextConfig:
        return Qwen35TextConfig.from_dict(d, tie)


def group_windows(x: torch.Tensor, h: int, w: int, k: int) -> torch.Tensor:
    """One crop's raster tokens [h*w, D] -> [(h/k)*(w/k), k*k, D]: k x k windows in raster order,
    the tokens inside a window in raster order too."""
    D = x.shape[-1]
    return x.view(h // k, k, w // k, k, D).permute(0, 2, 1, 3, 4).reshape(-1, k * k, D)


class VitWindowMerger(nn.Module):
    """Attention inside each 2x2 window, then the 4 tokens fused into 1 by an MLP (+ their mean)."""

    native_ops, native = True, None  # cpu/apply.py sets native (cpu/native.py's module)

    def __init__(self, cfg: VisionConfig46):
        super().__init__()
        D, K = cfg.hidden_size, cfg.window_kernel ** 2
        self.kernel = cfg.window_kernel
        self.layer_norm1 = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(D, cfg.num_attention_heads)
        self.pre_norm = nn.LayerNorm(K * D, eps=cfg.layer_norm_eps)
        self.linear_1 = nn.Linear(K * D, K * cfg.intermediate_size)
        self.linear_2 = nn.Linear(K * cfg.intermediate_size, D)

    def forward(self, x: torch.Tensor, sizes: list[tuple[int, int]]) -> torch.Tensor:
        """x: packed tokens [L, D] of crops with patch grids `sizes` -> [L/4, D] packed."""
        k = self.kernel
        parts = torch.split(x, [h * w for h, w in sizes])
        windows = torch.cat([group_windows(p, h, w, k) for p, (h, w) in zip(parts, sizes)])  # [W, 4, D]
        windows = windows + self.self_attn(self.layer_norm1(windows))
        fused = gelu_mlp(self.linear_1, self.linear_2, self.pre_norm(windows.flatten(1)), approximate="tanh",
                         native=self.native)
        return fused + windows.mean(dim=1)


class DownsampleMLP(nn.Module):
    def __init__(self, hidden: int, out: int):
        super().__init__()
        self.pre_norm = nn.LayerNorm(4 * hidden, eps=1e-6)
        self.linear_1 = nn.Linear(4 * hidden, 4 * hidden)
        self.linear_2 = nn.Linear(4 * hidden, out)

    def forward(self, x):
        return gelu_mlp(self.linear_1, self.linear_2, self.pre_norm(x))


class Merger(nn.Module):
    def __init__(self, cfg: MiniCPMV46Config):
        super().__init__()
        Dv, D = cfg.vision.hidden_size, cfg.text.hidden_size
        self.kernel = cfg.merge_kernel
        self.mlp = nn.ModuleList([DownsampleMLP(Dv, Dv) for _ in range(cfg.merger_times - 1)] + [DownsampleMLP(Dv, D)])

    def forward(self, x: torch.Tensor, sizes: list[tuple[int, int]]) -> torch.Tensor:
        k, out = self.kernel, []
        for part, (h, w) in zip(torch.split(x, [h * w for h, w in sizes]), sizes):
            for i, mlp in enumerate(self.mlp):
                if h % k or w % k:
                    raise ValueError(f"patch grid ({h}, {w}) is not divisible by the merge kernel {k}")
                part = mlp(group_windows(part, h, w, k).flatten(1))
                h, w = h // k, w // k
            out.append(part)
        return torch.cat(out)


class VisionTower46(nn.Module):
    def __init__(self, cfg: VisionConfig46):
        super().__init__()
        self.cfg = cfg
        self.embeddings = SiglipEmbeddings(cfg.hidden_size, cfg.patch_size, cfg.image_size)
        self.encoder = SiglipEncoder(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                                     cfg.num_hidden_layers, cfg.layer_norm_eps)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.vit_merger = VitWindowMerger(cfg)

    def forward(self, pixel_values: torch.Tensor, target_sizes: torch.Tensor, use_window_merger: bool):
        """Packed strip -> (packed features [L', Dv], patch grids after any window merge)."""
        sizes = [tuple(s) for s in target_sizes.tolist()]
        x = self.embeddings.embed_patches(strip_to_patches(pixel_values, self.cfg.patch_size))
        pos = bucketed_position_ids(target_sizes, self.embeddings.side).to(x.device)
        x = x + self.embeddings.position_embedding(pos)
        merge_after = self.cfg.insert_layer_id if use_window_merger else -1
        lengths = [h * w for h, w in sizes]
        padded, mask = pad_crops(x, lengths)
        for i, layer in enumerate(self.encoder.layers):
            padded = layer(padded, mask)
            if i == merge_after:
                x = self.vit_merger(unpad_crops(padded, lengths), sizes)
                sizes = [(h // 2, w // 2) for h, w in sizes]
                lengths = [h * w for h, w in sizes]
                padded, mask = pad_crops(x, lengths)
        return self.post_layernorm(unpad_crops(padded, lengths)), sizes


# Crops never attend to each other (tower, window merger and merger all work per crop), so they
# are encoded in groups of at most this many patches: activation memory then stays bounded
# (~0.5 GB at the real width) however many frames a video has, and GEMMs of thousands of rows
# run as fast as bigger ones.
VISION_CHUNK_PATCHES = 8192


def crop_groups(sizes: list[list[int]], budget: int) -> list[tuple[int, int]]:
    """Consecutive crops (h, w patch grids) -> [(crops in group, patches in group)], each group
    within `budget` patches unless a single crop alone exceeds it."""
    groups, crops, patches = [], 0, 0
    for h, w in sizes:
        if crops and patches + h * w > budget:
            groups.append((crops, patches))
            crops, patches = 0, 0
        crops, patches = crops + 1, patches + h * w
    if crops:
        groups.append((crops, patches))
    return groups


class MiniCPMV46(nn.Module):
    """The whole model as the engine sees it: vision -> merger -> scatter -> text -> logits."""

    family = "minicpmv4_6"
    # modules whose matrices run once per generated token (the CPU loader packs them, see
    # layers/fp16_packed.py); the vision side runs once per image
    per_token_prefixes = ("language_model.", "lm_head")
    text_model_class = Qwen35TextModel
    takes_mixed_batches = True  # prompt chunks and decode tokens of many sequences in one call (state/batch.py)

    def __init__(self, cfg: MiniCPMV46Config):
        super().__init__()
        self.config = cfg
        self.vision_tower = VisionTower46(cfg.vision)
        self.merger = Merger(cfg)
        self.language_model = self.text_model_class(cfg.text)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.text.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight

    @staticmethod
    def checkpoint_key(name: str) -> str | None:
        """Checkpoint tensor name -> our parameter name (None: not ours, e.g. MTP heads)."""
        if name.startswith("model."):
            return name[len("model."):]
        if name.startswith("lm_head."):
            return name
        return None

    def state_spec(self) -> list:
        return self.language_model.state_spec()

    @property
    def dtype(self) -> torch.dtype:
        """The activation (and cache) dtype; matrices may be stored narrower (layers/mixed.py)."""
        return self.language_model.norm.weight.dtype

    def encode_vision(self, pixel_values: torch.Tensor, target_sizes: torch.Tensor,
                      downsample_mode: str | None = None) -> torch.Tensor:
        """Crops of one or more images/videos -> their text-width embeddings [n_tokens, D],
        in crop order, one row per placeholder token."""
        mode = downsample_mode or self.config.downsample_mode
        if mode not in ("16x", "4x"):
            raise ValueError(f"downsample_mode must be '16x' or '4x', got {mode!r}")
        w = self.vision_tower.embeddings.patch_embedding.weight
        pixel_values, ps = pixel_values.to(w.dtype), self.config.vision.patch_size
        groups = crop_groups(target_sizes.tolist(), VISION_CHUNK_PATCHES)
        out, crop, col = [], 0, 0
        for n_crops, n_patches in groups:
            part = pixel_values if len(groups) == 1 else pixel_values[..., col * ps:(col + n_patches) * ps].contiguous()
            feats, sizes = self.vision_tower(part, target_sizes[crop:crop + n_crops], use_window_merger=mode != "4x")
            out.append(self.merger(feats, sizes))
            crop, col = crop + n_crops, col + n_patches
        return out[0] if len(out) == 1 else torch.cat(out)

    def vision_chunks(self, v, max_patches: int) -> list:
        """Cut one VisionInputs into consecutive crop groups of about max_patches patches each
        (crops are encoded independently, so the features of the parts, concatenated, are the
        features of the whole): the engine schedules vision work in such bounded units."""
        groups = crop_groups(v.target_sizes.tolist(), max_patches)
        if len(groups) == 1:
            return [v]
        ps, parts, crop, col = self.config.vision.patch_size, [], 0, 0
        for n_crops, n_patches in groups:
            parts.append(dataclasses.replace(
                v, pixel_values=v.pixel_values[..., col * ps:(col + n_patches) * ps].contiguous(),
                target_sizes=v.target_sizes[crop:crop + n_crops]))
            crop, col = crop + n_crops, col + n_patches
        return parts

    def embed(self, input_ids: torch.Tensor, vision: dict[int, torch.Tensor]) -> torch.Tensor:
        """input_ids [T] -> inputs_embeds [1, T, D]; vision maps a placeholder token id to the
        features that fill its positions, in order."""
        return scatter_vision(self.language_model.embed_tokens(input_ids), input_ids, vision)

    def forward(self, inputs_embeds: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return self.language_model(inputs_embeds, batch)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
