"""Errors a caller can act on. Every bad input raises a subclass of InputError (a ValueError),
so the server can map them to HTTP 4xx and the Python API user gets a precise message."""


class InputError(ValueError):
    """The request itself is wrong: bad media, bad option, too long a prompt."""


class ImageError(InputError):
    """An image could not be read or is not acceptable (corrupt, not an image, too large)."""


class VideoError(InputError):
    """A video could not be read or holds no frames."""


class PromptTooLongError(InputError):
    """The prompt (with its vision tokens) does not fit the model's context."""


class ModelNotFoundError(OSError):
    """A model id/folder could not be resolved to local files."""


class PromptTruncatedWarning(UserWarning):
    """A prompt was cut to fit a limit (4.0/4.5's max_inp_length keeps the first tokens, as their
    remote code does); the cut-off text never reaches the model."""
