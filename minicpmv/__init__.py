"""minicpmv: a fast, lean inference engine for the MiniCPM-V family (4.0, 4.5, 4.6, 4.7).

`load` is imported on first use, so `import minicpmv` (and the `minicpmv --help/--version`
command) does not pay for importing torch."""
from .cpu import heap as _heap

_heap.ask_huge_pages()  # before anything imports torch (cpu/heap.py)

from .errors import ImageError, InputError, ModelNotFoundError, PromptTooLongError, VideoError

__version__ = "0.1.0"
__all__ = ["load", "InputError", "ImageError", "VideoError", "PromptTooLongError", "ModelNotFoundError"]


def __getattr__(name):
    if name == "load":
        from .loading import load

        return load
    raise AttributeError(f"module 'minicpmv' has no attribute {name!r}")
