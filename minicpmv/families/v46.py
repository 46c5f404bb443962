"""MiniCPM-V 4.6 / 4.6-Thinking: transformers-native layout, the checkpoint's jinja template
with typed content parts, `<|image_pad|>` / `<|video_pad|>` placeholders."""
from __future__ import annotations

import json
from pathlib import Path

from ..engine.sequence import VisionInputs
from ..processing.media import DEFAULT_MAX_PIXELS, load_image
from ..processing.processor46 import Processor46
from ..prompt.chat_template import ChatTemplate
from ..prompt.messages import normalize_messages
from ..prompt.reasoning import prompt_opens_reasoning
from .base import PreparedPrompt, last_turn_start

# Processor keywords a caller may set per request (defaults: preprocessor_config.json).
MEDIA_OPTIONS = ("max_slice_nums", "use_image_id", "downsample_mode", "slice_mode", "video_max_slice_nums",
                 "video_use_image_id", "max_num_frames", "stack_frames", "fps")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


class Family46:
    name = "minicpmv4_6"
    sampling_option_names: tuple = ()  # no family-specific sampling switches (4.0/4.5 have `sampling`)
    processor_class = Processor46

    def __init__(self, folder: Path, config: dict, tokenizer):
        self.turn_start_id = tokenizer.token_to_id("<|im_start|>")
        self.template = ChatTemplate.from_folder(folder)
        self.processor = self.processor_class.from_pretrained(folder)
        self.image_token_id = config["image_token_id"]
        self.video_token_id = config["video_token_id"]
        self.generation_config = read_json(folder / "generation_config.json")
        eos = set()
        for source in (self.generation_config.get("eos_token_id"), config.get("eos_token_id")):
            eos.update(source if isinstance(source, list) else [source] if source is not None else [])
        im_end = tokenizer.token_to_id("<|im_end|>")
        if im_end is not None:  # the chat turn terminator, whatever the configs list
            eos.add(im_end)
        self.stop_token_ids = sorted(eos)
        self.max_context = config["text_config"].get("max_position_embeddings", 32768)

    def generation_defaults(self) -> dict:
        """Sampling defaults as transformers' generate reads generation_config.json."""
        g = self.generation_config
        return {"do_sample": bool(g.get("do_sample", False)), "temperature": float(g.get("temperature", 1.0)),
                "top_p": float(g.get("top_p", 1.0)), "top_k": int(g.get("top_k", 0) or 0),
                "repetition_penalty": float(g.get("repetition_penalty", 1.0)), "max_new_tokens": 2048}

    def prepare(self, msgs, *, tools=None, enable_thinking: bool | None = None, system_prompt: str | None = None,
                max_pixels: int = DEFAULT_MAX_PIXELS, **media) -> PreparedPrompt:
        unknown = set(media) - set(MEDIA_OPTIONS)
        if unknown:
            raise TypeError(f"unknown option(s) {sorted(unknown)}; 4.6 takes {', '.join(MEDIA_OPTIONS)}, "
                            f"enable_thinking, system_prompt, max_pixels, tools")
        msgs = list(msgs)
        if system_prompt and msgs and msgs[0].get("role") != "system":
            msgs.insert(0, {"role": "system", "content": system_prompt})
        norm = normalize_messages(msgs, content_format=self.template.content_format)
        kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        prompt = self.template.render(norm.messages, tools=tools, **kwargs)
        images = [load_image(src, max_pixels=max_pixels) for src in norm.images]
        processed = self.processor(prompt, images, norm.videos, **{k: v for k, v in media.items() if v is not None})
        mode = media.get("downsample_mode")
        vision = []
        if processed.pixel_values is not None:
            vision.append(VisionInputs(self.image_token_id, processed.pixel_values, processed.target_sizes, mode))
        if processed.pixel_values_videos is not None:
            vision.append(VisionInputs(self.video_token_id, processed.pixel_values_videos,
                                       processed.target_sizes_videos, mode))
        return PreparedPrompt(prompt, processed.input_ids, vision, prompt_opens_reasoning(prompt),
                              reuse_boundary=last_turn_start(self.turn_start_id, processed.input_ids))
