"""GPTQ W4A16: the checkpoint format, a quantized linear with CPU/GPU paths, the load-time module
swap, the GPTQ algorithm and the `minicpmv quantize` command."""
from .apply import GPTQConfig, QuantizedLoad, plan_quantized_load, select_gptq_targets
from .gptq_format import GPTQSpec, dequantize_gptq, pack_gptq, unpack_gptq
from .gptq_linear import GPTQLinear

__all__ = ["GPTQConfig", "GPTQLinear", "GPTQSpec", "QuantizedLoad", "dequantize_gptq", "pack_gptq",
           "plan_quantized_load", "select_gptq_targets", "unpack_gptq"]
