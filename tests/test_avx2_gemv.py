"""The AVX2 + FMA few-row int8 / int4 products (cpu/native.py `avx2_kernels`, cpu/csrc/avx2_gemv.cpp),
what CPUs without AVX-512 run for quantized decode.

Every x86 machine of this project has AVX2 + FMA, so they are built and checked wherever the tests
run (also beside the AVX-512 module, which they are measured against on such machines):
  * int8, K % 32 == 0: activations rounded to int8 per block of 32 inputs (max|x| / 127, llama.cpp's
    Q8_0 rounding), exact int32 block sums: within 1e-5 of max|y| of that arithmetic in float64 and
    within 2e-2 of the fp32 product with the dequantized matrix; other K: fp32 activations and sums,
    within 1e-5;
  * int4: the same rounding, codes as q - 8, exact block sums, offsets times the exact group sums of
    x: within 1e-5 of that arithmetic in float64;
  * one row's result whatever rows share the call, NaN inputs visible, zeros exact;
  * the int4 widening for prompts: bit for bit the tensor-op one (fp32 and bf16);
  * where the AVX-512 module is built too: the same results as it within 1e-5 (same arithmetic,
    sums in another order);
and on a plan without the AVX-512 extension (this box's AVX2 CPUs, or the AVX2 switch), a model
loaded with weights="int8"/"int4" routes its few-row products through them and its 24 greedy
steps agree with the exact fp32 products of its dequantized matrices (as tests/test_native_quant.py
asks of the AVX-512 module)."""
from dataclasses import replace

import pytest
import torch

from minicpmv.cpu import native
from minicpmv.cpu.isa import CpuInfo, detect
from minicpmv.cpu.plan import EVERY_ROW, PREFETCH, rule_plan
from minicpmv.layers.weight_formats import Int4Linear, Int8Linear, QuantLinear
from minicpmv.loading import load_model
from quant_reference import (decodes_like_the_exact_products, int4_kernel_reference, int8_kernel_reference,
                             refuses_bad_inputs)

HERE = detect()
USABLE = native.avx2_unusable(HERE) is None


def kernels():
    mod = native.avx2_kernels(HERE)
    assert (mod is not None) == USABLE, native.describe_avx2()
    return mod


def test_reasons_and_the_plans_choice_on_made_up_cpus(monkeypatch):
    monkeypatch.setattr(native, "_host_flags", lambda: frozenset({"avx2", "fma", "f16c"}))

    def cpu(flags, level="avx2", forced=False):
        return CpuInfo(arch="x86_64", model="t", flags=frozenset(flags), detected=level, level=level, forced=forced)

    assert native.avx2_unusable(cpu({"avx2", "fma"})) is None
    assert "lacks fma" in native.avx2_unusable(cpu({"avx2"}))
    assert "forced to generic" in native.avx2_unusable(cpu({"avx2", "fma"}, level="generic", forced=True))
    monkeypatch.setenv(native.ENV, "0")
    assert "disabled" in native.avx2_unusable(cpu({"avx2", "fma"}))
    monkeypatch.delenv(native.ENV)
    # the plan takes the AVX2 module only where the AVX-512 extension does not run
    assert rule_plan(cpu({"avx2", "fma", "f16c"})).avx2_gemv is True
    assert rule_plan(cpu({"avx2", "f16c"})).avx2_gemv is False
    # its int8 / int4 walks prefetch into L2 on AMD (measured on a Zen 3), into L1 elsewhere; info says it
    amd = rule_plan(replace(cpu({"avx2", "fma", "f16c"}), model="AMD EPYC 7B13"))
    assert amd.prefetch == "l2" and rule_plan(cpu({"avx2", "fma", "f16c"})).prefetch == "l1"
    assert "int8 / int4 rows on" in dict(amd.rows())["C++ extension"]
    assert dict(amd.rows())["C++ extension"].endswith("with software prefetch into L2")


def test_builds_here_or_says_why():
    mod = kernels()
    assert ("minicpmv AVX2 kernel" in native.describe_avx2()) if USABLE else mod is None


@pytest.mark.parametrize("n,k", [(7, 64), (130, 96), (64, 256), (300, 48)])
def test_kernels_give_the_fp32_product_with_the_dequantized_matrix(n, k):
    mod = kernels()
    if mod is None:
        pytest.fail(f"no AVX2 module on an x86 CPU of this project: {native.describe_avx2()}")
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g) * 0.05
    l8 = Int8Linear(w, None)
    l4 = Int4Linear(w, None, group=64 if k % 64 == 0 else 32) if k % 32 == 0 else None
    for m in (1, 2, 3, 5, 8):
        x = torch.randn(m, k, generator=g)
        x[0, :5] = 0.0  # a block with zeros still rounds
        exact8 = x.double() @ l8.dequantize(0, n, torch.float64).t()
        got = mod.int8_mm(x, l8.qweight, l8.scale).double()
        if k % 32 == 0:
            ref = int8_kernel_reference(x, l8)
            assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
            assert (got - exact8).abs().max() <= 2e-2 * exact8.abs().max()
        else:
            assert (got - exact8).abs().max() <= 1e-5 * exact8.abs().max()
        if l4 is not None:
            ref = int4_kernel_reference(x, l4)
            got = mod.int4_mm(x, l4.qweight, l4.scale_zero, l4.group)[:, :n].double()
            assert (got - ref).abs().max() <= 1e-5 * ref.abs().max(), (m, float((got - ref).abs().max()))
    x = torch.randn(7, k, generator=g)  # each row's result whatever rows share the call
    whole8 = mod.int8_mm(x, l8.qweight, l8.scale)
    for i in range(7):
        assert torch.equal(whole8[i:i + 1], mod.int8_mm(x[i:i + 1], l8.qweight, l8.scale))
    for r in (2, 3, 4):  # a small batch walks each weight row once for all its rows: the same sums
        assert torch.equal(whole8[:r], mod.int8_mm(x[:r].contiguous(), l8.qweight, l8.scale))
    if l4 is None:
        return
    whole = mod.int4_mm(x, l4.qweight, l4.scale_zero, l4.group)
    for i in range(7):
        assert torch.equal(whole[i:i + 1], mod.int4_mm(x[i:i + 1], l4.qweight, l4.scale_zero, l4.group))
    blocks = l4.qweight.shape[0] // 64  # prompts: W^T widened from the packed blocks
    for dt in (torch.float32, torch.bfloat16):
        wt = mod.int4_widen_t(l4.qweight, l4.scale_zero, l4.group, 0, blocks, dt == torch.bfloat16)
        assert wt.dtype == dt and torch.equal(wt[:, :n], l4.dequantize(0, n, dt).t())
    bad = torch.randn(2, k, generator=g)
    bad[1, 3] = float("nan")
    for out in (mod.int4_mm(bad, l4.qweight, l4.scale_zero, l4.group)[:, :n], mod.int8_mm(bad, l8.qweight, l8.scale)):
        assert out[0].isfinite().all() and out[1].isnan().any()  # a NaN input stays visible
    zero = torch.zeros(1, k)
    assert torch.equal(mod.int8_mm(zero, l8.qweight, l8.scale), torch.zeros(1, n))
    assert torch.equal(mod.int4_mm(zero, l4.qweight, l4.scale_zero, l4.group)[:, :n], torch.zeros(1, n))
    assert mod.int4_mm(torch.full((1, k), 1e-41), l4.qweight, l4.scale_zero, l4.group).isfinite().all()
    wide = native.quant_kernels(HERE)  # beside the AVX-512 module: the same arithmetic
    if wide is not None and k % 64 == 0:
        for m in (1, 3, 8):
            x = torch.randn(m, k, generator=g)
            for a, b in ((mod.int8_mm(x, l8.qweight, l8.scale), wide.int8_mm(x, l8.qweight, l8.scale)),
                         (mod.int4_mm(x, l4.qweight, l4.scale_zero, l4.group),
                          wide.int4_mm(x, l4.qweight, l4.scale_zero, l4.group))):
                assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_bad_inputs_are_refused_with_a_message():
    mod = kernels()
    refuses_bad_inputs(mod)
    q4 = Int4Linear(torch.randn(8, 64), None, group=32)
    with pytest.raises(RuntimeError, match="block range"):
        mod.int4_widen_t(q4.qweight, q4.scale_zero, 32, 0, 2, False)


def test_software_prefetch_changes_no_bit():
    """Off, into L1, into L2: the same products at one row (the walks) and at five (int8's tiles, int4's
    blocks), on a matrix of several prefetch distances; a mode outside them is refused."""
    mod = kernels()
    if mod is None:
        pytest.fail(f"no AVX2 module on an x86 CPU of this project: {native.describe_avx2()}")
    g = torch.Generator().manual_seed(5)
    w = torch.randn(192, 1024, generator=g) * 0.05
    l8, l4 = Int8Linear(w, None), Int4Linear(w, None, group=64)
    xs = [torch.randn(m, 1024, generator=g) for m in (1, 5)]
    outs = []
    try:
        for mode in (0, 1, 2):
            mod.set_prefetch(mode)
            outs.append([p for x in xs for p in (mod.int8_mm(x, l8.qweight, l8.scale),
                                                 mod.int4_mm(x, l4.qweight, l4.scale_zero, l4.group))])
    finally:
        mod.set_prefetch(PREFETCH[rule_plan(HERE).prefetch][0])
    assert all(torch.equal(a, b) for o in outs[1:] for a, b in zip(outs[0], o))
    with pytest.raises(RuntimeError, match="prefetch mode"):
        mod.set_prefetch(3)


def test_the_plan_sets_the_modules_prefetch(tiny46_dir, monkeypatch):
    """Loading on the AVX2 plan tells the module the plan's prefetch mode."""
    from minicpmv.cpu import apply

    mod = kernels()
    if mod is None:
        pytest.fail(f"no AVX2 module on an x86 CPU of this project: {native.describe_avx2()}")
    told = []

    class Spy:
        def __getattr__(self, name):
            return getattr(mod, name)

        def set_prefetch(self, mode):
            told.append(mode)
            mod.set_prefetch(mode)

    monkeypatch.setenv("MINICPMV_CPU_ISA", "avx2")
    monkeypatch.setattr(apply, "few_row_kernels", lambda plan, kernels: Spy())
    model, _ = load_model(tiny46_dir, "auto", "cpu", progress=False, weights="int8")
    assert told == [PREFETCH[model.kernel_plan.prefetch][0]]


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_a_quantized_model_on_the_avx2_plan_decodes_through_them(tiny46_dir, fmt, monkeypatch):
    """24 greedy steps of the tiny 4.6 on the AVX2 plan (this CPU's, or the switch's on AVX-512
    machines): through the module against the same model whose quantized matrices run the exact
    fp32 product with their dequantized matrices; the thresholds of tests/test_native_quant.py (the
    same rounding of the activations)."""
    monkeypatch.setenv("MINICPMV_CPU_ISA", "avx2")
    model, _ = load_model(tiny46_dir, "auto", "cpu", progress=False, weights=fmt)
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    mod = kernels()
    # its kernels serve prompts too (Zen 3: faster than a GEMM on the widened matrix up to 384 int8
    # rows, at every int4 row count measured)
    assert quant and all(m.native is mod and m.native_rows == (384 if fmt == "int8" else EVERY_ROW) for m in quant)
    decodes_like_the_exact_products(model, quant, fmt)


def test_other_python_threads_run_during_a_product():
    """The module's calls release the GIL, as torch's ops do: a thread's Python goes on while another
    thread is inside a long product (the server's HTTP loop during an engine step). A call holding
    the GIL would stall this loop for the whole call. The product runs on one thread, so the loop
    has a core of its own: with both cores taken by the product's threads the OS alone left this loop
    waiting 34 ms (in a CI run on the 2-core box), which says nothing about the GIL."""
    import time

    mod = kernels()
    l8 = Int8Linear(torch.randn(4096, 2048) * 0.05, None)
    x = torch.randn(256, 2048)  # compute-bound tiles: ~120 ms a call on one thread of a Zen 3
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t = time.perf_counter()
        mod.int8_mm(x, l8.qweight, l8.scale)
        call_s = time.perf_counter() - t
        gaps = _loop_gaps_during(lambda: mod.int8_mm(x, l8.qweight, l8.scale), threads=1)
    finally:
        torch.set_num_threads(threads)
    assert len(gaps) > 100 and max(gaps) < call_s / 2, (max(gaps), call_s)


def _loop_gaps_during(call, threads: int) -> list[float]:
    """The time between consecutive turns of a Python loop while another thread makes `call` 3 times
    on `threads` compute threads (set in that thread: OpenMP keeps the count per calling thread)."""
    import sys
    import threading
    import time

    inside, done = threading.Event(), threading.Event()

    def product():
        torch.set_num_threads(threads)
        inside.set()
        for _ in range(3):
            call()
        done.set()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    try:
        worker = threading.Thread(target=product)
        worker.start()
        inside.wait()
        gaps, last = [], time.perf_counter()
        while not done.is_set():
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
        worker.join()
    finally:
        sys.setswitchinterval(interval)
    return gaps
