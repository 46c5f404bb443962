"""CPU detection and the per-op kernel choice (minicpmv/cpu): levels from flags, the
MINICPMV_CPU_ISA switch, the rules per level, a calibration overturning them only on clear
wins, its on-disk cache, and `minicpmv info`."""
import json
from dataclasses import replace

import pytest
import torch

from minicpmv.cli import main
from minicpmv.cpu import calibrate as cal
from minicpmv.cpu import isa
from minicpmv.cpu.isa import CpuInfo, level_from_flags
from minicpmv.cpu.plan import BF16, FP16_PACKED, WIDENED, choose, rule_plan
from minicpmv.layers import fp16_packed

X86 = "x86_64"


def cpu(level, arch=X86, flags=()):
    return CpuInfo(arch=arch, model="test cpu", flags=frozenset(flags), detected=level, level=level)


@pytest.mark.parametrize("flags,cap,level", [
    ({"avx2", "fma", "f16c"}, "AVX2", "avx2"),
    ({"avx2", "avx512f", "avx512bw"}, "AVX512", "avx512"),
    ({"avx2", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni"}, "AVX512", "avx512_bf16"),
    ({"avx2", "avx512f", "avx512bw", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}, "AVX512", "amx"),
    (set(), "AVX2", "avx2"),        # no /proc/cpuinfo: torch's capability still counts
    ({"sse4_2"}, "DEFAULT", "generic"),
])
def test_x86_levels_from_flags(flags, cap, level):
    assert level_from_flags(X86, frozenset(flags), cap) == level


def test_arm_levels_from_flags():
    assert level_from_flags("aarch64", frozenset({"fp", "asimd"}), "DEFAULT") == "neon"
    assert level_from_flags("aarch64", frozenset({"asimd", "bf16", "i8mm"}), "DEFAULT") == "neon_bf16"
    assert level_from_flags("aarch64", frozenset({"asimd", "sve"}), "SVE256") == "sve"  # SVE without BF16
    assert level_from_flags("aarch64", frozenset({"asimd", "sve", "bf16"}), "SVE256") == "neon_bf16"
    assert not cpu("sve", arch="aarch64").fast_bf16 and cpu("neon_bf16", arch="aarch64").fast_bf16
    assert level_from_flags("arm64", frozenset(), "DEFAULT") == "neon"  # macOS: no cpuinfo


def test_forcing_lowers_the_level_and_never_raises_it(monkeypatch):
    here = isa.detect()
    monkeypatch.setenv(isa.ENV_ISA, here.levels[0])
    forced = isa.detect()
    assert forced.forced and forced.level == here.levels[0] and forced.detected == here.detected
    monkeypatch.delenv(isa.ENV_ISA)
    assert isa.detect().level == here.detected and not isa.detect().forced
    with pytest.raises(ValueError, match="expected one of"):
        isa.detect("avx9000")
    if here.detected != here.levels[-1]:
        with pytest.raises(ValueError, match="supports at most"):
            isa.detect(here.levels[-1])


def test_rules_per_level():
    fbgemm = fp16_packed.available()
    amx, bf16, avx2 = rule_plan(cpu("amx")), rule_plan(cpu("avx512_bf16")), rule_plan(cpu("avx2"))
    assert amx.vision_bf16 and amx.text16 == BF16 and amx.gemm_dtype == torch.bfloat16
    assert bf16.vision_bf16 and bf16.text16 == (FP16_PACKED if fbgemm else BF16)
    assert not avx2.vision_bf16 and avx2.gemm_dtype == torch.float32
    assert avx2.text16 == (FP16_PACKED if fbgemm else WIDENED)
    assert rule_plan(cpu("generic")).text16 == WIDENED
    arm = rule_plan(cpu("neon_bf16", arch="aarch64"))
    assert arm.vision_bf16 and arm.text16 == BF16
    rows = dict(avx2.rows("int4"))
    assert set(rows) == {"vision GEMMs", "vision attention", "prefill GEMMs", "prompt attention", "decode GEMVs", "lm_head",
                         "MoE experts", "RMSNorms", "decode layers", "prompt DeltaNet", "C++ extension", "denormals"}
    assert "MoE experts" not in dict(avx2.rows())
    assert dict(avx2.rows())["vision attention"] == "torch's SDPA in fp32" and not avx2.vision_flash
    assert dict(avx2.rows())["prompt attention"] == "torch's SDPA" and not avx2.prompt_flash
    assert amx.fused_norm and bf16.fused_norm and not avx2.fused_norm
    assert "int4" in rows["decode GEMVs"] and "tied embedding" in rows["lm_head"]


def test_avx512_bf16_without_amx_takes_bf16_text_matrices_where_the_extension_builds():
    """With the extension (its flags on the described CPU and on this host), an AVX512-BF16 CPU without
    AMX keeps its text matrices bf16, one decode row on vdpbf16ps (`bf16_dot`), the vision tower's
    attention and a prompt's on the extension's vdpbf16ps kernels (`vision_flash`, `prompt_flash`) and
    the layers fused; without it, fbgemm's fp16-packed GEMV (no fused layers) and torch's SDPA. AMX machines keep the exact FMA rows
    and torch's SDPA (its bf16 products on the tiles)."""
    from minicpmv.cpu import native

    flags = frozenset(native.NEEDS) | {"avx2", "avx512_bf16"}
    bf16 = rule_plan(cpu("avx512_bf16", flags=flags))
    amx = rule_plan(cpu("amx", flags=flags | {"amx_tile", "amx_bf16"}))
    plain = rule_plan(cpu("avx512_bf16"))  # no flags: the extension is out
    assert not amx.bf16_dot and not plain.bf16_dot and not plain.native_kernels
    assert not amx.vision_flash and not plain.vision_flash
    assert not amx.prompt_flash and not plain.prompt_flash
    assert dict(amx.rows())["vision attention"] == dict(plain.rows())["vision attention"] == "torch's SDPA in bf16"
    if fp16_packed.available():
        assert plain.text16 == FP16_PACKED
        assert dict(plain.rows())["decode layers"] == "tensor ops"
        assert dict(plain.rows("int8"))["decode layers"] == "tensor ops"  # (no extension at all)
    if native.unusable(bf16.cpu) is None:  # this host has the extension's flags too
        assert bf16.text16 == BF16 and bf16.bf16_dot and bf16.gemm_dtype == torch.bfloat16
        rows = dict(bf16.rows())
        assert "vdpbf16ps" in rows["decode GEMVs"] and rows["decode layers"].startswith("one call of the extension per layer")
        assert bf16.vision_flash and rows["vision attention"].startswith("the extension's vdpbf16ps kernel")
        assert bf16.prompt_flash and rows["prompt attention"].startswith("the extension's vdpbf16ps kernel")


def test_software_prefetch_in_the_decode_walks_follows_the_vendor():
    """The extension's decode streams (int8 / int4 one-row walks, int8 / vdpbf16ps tiles of several
    rows) prefetch into L1 on Intel (measured on the AMX Xeon) and into L2 on AMD (measured on a Zen 4,
    where L1 slowed them); the info table says which."""
    from minicpmv.cpu import native

    flags = frozenset(native.NEEDS) | {"avx2", "avx512_bf16"}
    for model, mode in (("AMD EPYC 9654 96-Core Processor", "l2"), ("AMD Ryzen 9 7950X", "l2"),
                        ("Intel(R) Xeon(R) Platinum 8480+", "l1"), ("test cpu", "l1")):
        plan = rule_plan(CpuInfo(arch=X86, model=model, flags=flags, detected="avx512_bf16", level="avx512_bf16"))
        assert plan.prefetch == mode, model
        if plan.native_kernels:
            assert f"software prefetch into {mode.upper()}" in dict(plan.rows())["C++ extension"]


def table(gemm_bf16, gemm_fp32, gemv_bf16, gemv_fp16):
    return {"path": "x", "gemm_256x1024x2048_ms": {"bf16": gemm_bf16, "fp32": gemm_fp32, FP16_PACKED: gemm_fp32},
            "gemv_4096x2048_ms": {"bf16": gemv_bf16, FP16_PACKED: gemv_fp16}}


def test_calibration_overturns_the_rules_only_on_clear_wins():
    bf16_cpu = rule_plan(cpu("avx512_bf16"))
    # bf16 GEMM 8x slower (an AVX2-class result): vision goes back to fp32
    assert not cal.apply(bf16_cpu, table(8.0, 1.0, 1.0, 1.0)).vision_bf16
    # a 5% difference is noise: the rule stands
    assert cal.apply(bf16_cpu, table(1.05, 1.0, 1.0, 1.0)).vision_bf16
    if fp16_packed.available():
        amx = rule_plan(cpu("amx"))
        assert cal.apply(amx, table(0.2, 1.0, 1.0, 0.5)).text16 == FP16_PACKED  # fbgemm GEMV clearly faster
        assert cal.apply(amx, table(0.2, 1.0, 1.0, 0.95)).text16 == BF16
        assert cal.apply(bf16_cpu, table(0.2, 1.0, 0.5, 1.0)).text16 == BF16
        assert cal.apply(rule_plan(cpu("avx2")), table(8.0, 1.0, 0.5, 1.0)).text16 == FP16_PACKED  # no bf16 GEMMs


def test_quantized_kernel_rows_come_from_the_plan_and_the_calibration():
    avx512, avx2 = rule_plan(cpu("amx")), rule_plan(cpu("avx2"))
    assert (avx512.int8_rows, avx512.int4_rows) == (24, 96) and (avx2.int8_rows, avx2.int4_rows) == (16, 16)
    assert "up to 96 rows" in dict(avx512.rows("int4"))["prefill GEMMs"]
    measured = cal.apply(avx512, table(0.2, 1.0, 1.0, 1.0) | {"quant_kernel_rows": {"int8": 32, "int4": 48}})
    assert (measured.int8_rows, measured.int4_rows) == (32, 48)
    assert cal.apply(avx2, table(8.0, 1.0, 1.0, 1.0)).int4_rows == 16  # an older cache without the probe


def test_the_crossover_probe_stops_where_the_gemm_wins(monkeypatch):
    """_crossover walks QUANT_ROWS up while the kernel is faster: fake timings where the kernel
    costs rows x 1 and the GEMM 50 make 48 the last winning row count."""
    class Fake:
        in_features = 8

        def _kernel(self, x):
            return ("kernel", x.shape[0])

        def _gemm(self, x):
            return ("gemm", x.shape[0])

    monkeypatch.setattr(cal, "_time", lambda fn, **kw: (lambda kind, m: m if kind == "kernel" else 50)(*fn()))
    assert cal._crossover(Fake(), torch.Generator()) == 48


def test_loaded_layers_take_the_plans_kernel_rows(tmp_path, monkeypatch):
    from minicpmv.layers.weight_formats import Int4Linear, Int8Linear
    from minicpmv.loading import load_model
    from tiny46 import build_tiny_46

    folder = build_tiny_46(tmp_path / "m", seed=0)
    plan = replace(rule_plan(cpu("amx")), int8_rows=5, int4_rows=7)
    monkeypatch.setattr("minicpmv.loading.choose", lambda isa=None: plan)
    model, _ = load_model(folder, "auto", "cpu", progress=False, weights="int4")
    quant = [m for m in model.modules() if isinstance(m, (Int4Linear, Int8Linear))]
    assert quant and all(m.kernel_rows == (7 if isinstance(m, Int4Linear) else 5) for m in quant)


def test_calibration_is_cached_per_cpu_and_torch(tmp_path, monkeypatch):
    monkeypatch.setenv(cal.ENV_CACHE, str(tmp_path))
    calls = []
    monkeypatch.setattr(cal, "probe", lambda cpu: calls.append(1) or table(8.0, 1.0, 1.0, 1.0))
    here = isa.detect()
    assert cal.load_or_run(here) is None and not calls  # nothing cached, not asked to run
    first = cal.load_or_run(here, run=True)
    assert cal.load_or_run(here, run=True) == first and calls == [1]  # run only when none is cached
    assert calls == [1] and json.loads(cal.cache_path(here).read_text())["key"] == cal.cache_key(here)
    assert cal.load_or_run(here)["gemm_256x1024x2048_ms"] == first["gemm_256x1024x2048_ms"] and calls == [1]
    plan = choose()
    assert plan.source.startswith("calibrated") and not plan.vision_bf16
    other = CpuInfo(arch=here.arch, model="another cpu", flags=here.flags, detected=here.detected, level=here.level)
    assert cal.load_or_run(other) is None
    monkeypatch.setenv(isa.ENV_ISA, here.levels[1])  # a forced level ignores the calibration
    assert choose().source == "rules"


def test_calibrate_env_runs_the_probe_once_at_load_time(tmp_path, monkeypatch):
    monkeypatch.setenv(cal.ENV_CACHE, str(tmp_path))
    calls = []
    monkeypatch.setattr(cal, "probe", lambda cpu: calls.append(1) or table(0.2, 1.0, 1.0, 1.0))
    assert choose().source == "rules" and not calls  # off by default
    monkeypatch.setenv(cal.ENV_CALIBRATE, "1")
    assert choose().source.startswith("calibrated") and calls == [1]
    assert choose().source.startswith("calibrated") and calls == [1]  # cached: no second probe
    monkeypatch.setenv(cal.ENV_CALIBRATE, "0")
    assert choose().source.startswith("calibrated") and calls == [1]  # a cached result is always used
    assert choose(calibrate=True).source.startswith("calibrated") and calls == [1, 1]  # info --calibrate


def test_info_command(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv(cal.ENV_CACHE, str(tmp_path))
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for op in ("vision GEMMs", "prefill GEMMs", "decode GEMVs", "lm_head"):
        assert op in out
    assert isa.detect().level in out
    assert main(["info", "--json", "--weights", "int8"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "int8" in info["kernels"]["decode GEMVs"] and info["torch"] == torch.__version__
    if isa.detect().at_least("avx2") and fp16_packed.available():
        monkeypatch.setenv(isa.ENV_ISA, "avx2")
        assert main(["info"]) == 0
        out = capsys.readouterr().out
        assert "forced" in out and "fbgemm fp16-packed GEMV" in out and "bf16 GEMM" not in out
    assert main(["info", "--isa", "no-such-level"]) == 2
