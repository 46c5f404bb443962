"""MiniCPM-V 4.0 / 4.5 (remote-code checkpoints): what their model-card `chat()` does around the model.

* Prompt: the checkpoint's template with string content, one `(<image>./</image>)` per image. 4.5's
  chat() always passes enable_thinking (default False), so its prompt ends with an empty
  `<think>\\n\\n</think>\\n\\n` in fast mode and with an open `<think>\\n` in thinking mode. 4.0 has no
  thinking switch.
* Media: images as given (the reference converts PIL images with a plain .convert("RGB")); videos follow
  the model cards' encode_video (4.5: ~choose_fps frames per second packed with 0.1 s timestamp ids;
  4.0: 1 fps, up to 64 frames) and, unless the caller says otherwise, the video call settings
  use_image_id=False and max_slice_nums=1 (4.5) / 2 (4.0). Frames passed as images with the model card's
  `temporal_ids=` work as well.
* Sampling: `sampling=True` (default) is top_p 0.8, top_k 100, temperature 0.7, repetition penalty 1.05
  (4.0) / 1.03 (4.5); `sampling=False` is the reference's beam search: num_beams 3, penalty 1.2, and
  transformers' defaults length_penalty 1.0, early_stopping False (num_beams=1 turns it into greedy).
* Stop tokens: `<|im_end|>` plus `</s>` (4.0) or `<|endoftext|>` (4.5), and the config's eos.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from ..errors import ImageError, InputError
from ..processing.media import DEFAULT_MAX_PIXELS, load_image
from ..processing.processor_v4x import ProcessorV4x, VideoFrames
from ..processing.video_v45 import MAX_NUM_FRAMES_V40, MAX_NUM_FRAMES_V45, MAX_NUM_PACKING_V45, encode_video_v40, \
    encode_video_v45
from ..prompt.chat_template import ChatTemplate
from ..prompt.messages import normalize_messages
from ..prompt.reasoning import prompt_opens_reasoning
from .base import PreparedPrompt, last_turn_start

IMAGE_OPTIONS = ("max_slice_nums", "use_image_id", "max_inp_length")
VIDEO_OPTIONS = ("choose_fps", "force_packing", "max_num_frames", "max_num_packing", "fps", "packing")
# the server's (vLLM-style) per-request names for the model card recipe's knobs
VIDEO_ALIASES = {"fps": "choose_fps", "packing": "force_packing"}


class FamilyV4x:
    sampling_option_names = ("sampling",)

    def __init__(self, folder: Path, config: dict, tokenizer):
        self.turn_start_id = tokenizer.token_to_id("<|im_start|>")
        folder = Path(folder)
        self.version = str(config.get("version", ""))
        self.is_45 = self.version == "4.5"
        self.name = "minicpmv4_5" if self.is_45 else "minicpmv4_0"
        self.template = ChatTemplate.from_folder(folder)
        self.processor = ProcessorV4x.from_folder(folder)
        self.max_context = int(config.get("max_position_embeddings", 32768))
        self.default_max_inp_length = 16384 if self.is_45 else 8192  # chat()'s max_inp_length defaults
        eos = config.get("eos_token_id")
        stops = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        for name in ("<|im_end|>", "<|endoftext|>" if self.is_45 else "</s>"):
            token = tokenizer.token_to_id(name)
            if token is not None:
                stops.add(token)
        self.stop_token_ids = sorted(stops)

    def generation_defaults(self, sampling: bool = True) -> dict:
        if sampling:
            return {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 100,
                    "repetition_penalty": 1.03 if self.is_45 else 1.05, "max_new_tokens": 2048,
                    "penalize_prompt": False}
        return {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.2,
                "num_beams": 3, "length_penalty": 1.0, "early_stopping": False, "max_new_tokens": 2048,
                "penalize_prompt": False}

    def prepare(self, msgs, *, tools=None, enable_thinking: bool | None = None, system_prompt: str | None = None,
                max_pixels: int = DEFAULT_MAX_PIXELS, temporal_ids=None, **options) -> PreparedPrompt:
        for alias, name in VIDEO_ALIASES.items():
            if options.get(alias) is not None:
                if options.get(name) is not None and options[name] != options[alias]:
                    raise InputError(f"{alias}={options[alias]} and {name}={options[name]} disagree; pass one")
                options[name] = options.pop(alias)
            options.pop(alias, None)
        unknown = set(options) - set(IMAGE_OPTIONS) - set(VIDEO_OPTIONS)
        if unknown:
            extra = ", temporal_ids, enable_thinking" if self.is_45 else ""
            raise TypeError(f"unknown option(s) {sorted(unknown)}; MiniCPM-V {self.version} takes "
                            f"{', '.join(IMAGE_OPTIONS + VIDEO_OPTIONS)}{extra}, system_prompt, max_pixels, tools")
        if not self.is_45 and (enable_thinking or temporal_ids is not None):
            raise InputError("MiniCPM-V 4.0 has neither a thinking mode nor temporal ids (4.5 has both)")
        msgs = list(msgs)
        if system_prompt and msgs and msgs[0].get("role") != "system":
            msgs.insert(0, {"role": "system", "content": system_prompt})
        norm = normalize_messages(msgs, content_format="string")
        kwargs = {"enable_thinking": bool(enable_thinking)} if self.is_45 else {}
        prompt = self.template.render(norm.messages, tools=tools, **kwargs)

        images = [_image(src, max_pixels) for src in norm.images]
        videos = [self._video(src, options) for src in norm.videos]
        media = {k: options[k] for k in IMAGE_OPTIONS if options.get(k) is not None}
        if videos or temporal_ids is not None:  # the model cards' video call settings
            media.setdefault("use_image_id", False)
            media.setdefault("max_slice_nums", 1 if self.is_45 else 2)
        media.setdefault("max_inp_length", self.default_max_inp_length)
        processed = self.processor(prompt, images, videos, temporal_ids=temporal_ids, **media)
        return PreparedPrompt(prompt, processed.input_ids, processed.vision_inputs(), prompt_opens_reasoning(prompt),
                              reuse_boundary=last_turn_start(self.turn_start_id, processed.input_ids))

    def _video(self, src, options: dict) -> VideoFrames:
        if isinstance(src, VideoFrames):
            return src
        if isinstance(src, (list, tuple)):  # frames without a frame rate: independent images
            return VideoFrames(list(src))
        if self.is_45:
            return encode_video_v45(src, choose_fps=options.get("choose_fps") or 3,
                                    force_packing=options.get("force_packing"),
                                    max_num_frames=options.get("max_num_frames") or MAX_NUM_FRAMES_V45,
                                    max_num_packing=options.get("max_num_packing") or MAX_NUM_PACKING_V45)
        return encode_video_v40(src, max_num_frames=options.get("max_num_frames") or MAX_NUM_FRAMES_V40)


def _image(src, max_pixels: int) -> Image.Image:
    if isinstance(src, Image.Image):  # as the reference: no EXIF rotation, alpha dropped by convert("RGB")
        if src.width * src.height > max_pixels:
            raise ImageError(f"PIL image: {src.width}x{src.height} pixels is over the limit of {max_pixels}")
        return src if src.mode == "RGB" else src.convert("RGB")
    return load_image(src, max_pixels=max_pixels)
