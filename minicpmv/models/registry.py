"""config.json -> model class. The family is read from the config (model_type, version),
never from the folder name."""
from __future__ import annotations


def family_of(config: dict) -> str:
    mt = config.get("model_type")
    if mt in ("minicpmv4_6", "minicpm_ocr"):
        return "minicpmv4_6"
    if mt == "minicpmv4_7":
        return "minicpmv4_7"
    if mt == "minicpmv":
        version = str(config.get("version", ""))
        if version in ("4.0", "4", "4.5"):
            return "minicpmv4_5" if version == "4.5" else "minicpmv4_0"
        raise ValueError(f"MiniCPM-V remote-code checkpoint with version {version!r} is not supported (4.0 and 4.5 are)")
    raise ValueError(f"unsupported model_type {mt!r}: minicpmv loads MiniCPM-V 4.0, 4.5, 4.6 and 4.7 checkpoints")


def build_model(config: dict):
    family = family_of(config)
    if family == "minicpmv4_6":
        from .minicpmv4_6 import MiniCPMV46, MiniCPMV46Config

        return MiniCPMV46(MiniCPMV46Config.from_dict(config))
    if family == "minicpmv4_7":
        from .minicpmv4_7 import MiniCPMV47, MiniCPMV47Config

        return MiniCPMV47(MiniCPMV47Config.from_dict(config))
    if family == "minicpmv4_0":
        from .minicpmv4_0 import MiniCPMV40

        return MiniCPMV40.from_config(config)
    if family == "minicpmv4_5":
        from .minicpmv4_5 import MiniCPMV45

        return MiniCPMV45.from_config(config)
    raise NotImplementedError(f"{family} is not wired in yet")
