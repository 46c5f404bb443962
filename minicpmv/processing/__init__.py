"""Vision preprocessing: media decoding, slicing, frame sampling and prompt expansion."""
from minicpmv.processing.media import load_image, load_video
from minicpmv.processing.processor46 import Processor46
from minicpmv.processing.types import ProcessedInputs, Video, VideoMeta

__all__ = ["load_image", "load_video", "Processor46", "ProcessedInputs", "Video", "VideoMeta"]
