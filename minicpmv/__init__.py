"""minicpmv: a fast, lean inference engine for the MiniCPM-V family (4.0, 4.5, 4.6)."""
from .errors import ImageError, InputError, ModelNotFoundError, PromptTooLongError, VideoError
from .loading import load

__version__ = "0.1.0"
__all__ = ["load", "InputError", "ImageError", "VideoError", "PromptTooLongError", "ModelNotFoundError"]
