"""The CPU prompt path's runtime settings: denormals flushed on every intra-op thread inside
DeltaNet's prompt chunks (cpu/denormals.py), the decay's exp floor and the tap-by-tap causal conv
(same results), and the heap kept warm between a forward's large tensors (cpu/heap.py)."""
import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from minicpmv.cpu import denormals, native
from minicpmv.cpu.isa import detect
from minicpmv.layers.gated_delta import EXP_FLOOR, chunk_gated_delta_rule, l2_normalize
from minicpmv.loading import load_model
from minicpmv.models.qwen3_5 import GatedDeltaNet, Qwen35TextConfig, _window_columns
from tiny46 import build_tiny_46

X86 = platform.machine() in ("x86_64", "AMD64")


def test_flushed_reaches_every_intra_op_thread():
    """A denormal times 1 is 0 under FTZ/DAZ. The tensor is large enough for torch to split the
    multiply across its threads, so a thread left unflushed leaves its half nonzero."""
    assert denormals.supported() == X86
    if not X86:  # no FTZ switch there: flushed() must still run the block
        with denormals.flushed():
            assert torch.ones(1).item() == 1.0
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        tiny = torch.full((1 << 20,), 1e-39)
        assert (tiny * 1.0 == tiny).all()  # IEEE outside
        with denormals.flushed():
            assert (tiny * 1.0 == 0).all(), "some intra-op thread kept denormals"
        assert (tiny * 1.0 == tiny).all(), "the flush outlived its block"
        assert "all of torch's threads" in denormals.describe()
    finally:
        torch.set_num_threads(threads)


def _recurrent_fp64(q, k, v, g, beta, state):
    """The per-token rule in float64: the reference for the chunked form."""
    q, k, v, g, beta, s = (x.double() for x in (q, k, v, g, beta, state))
    out = []
    for t in range(q.shape[2]):
        s = s * g[:, :, t].exp()[..., None, None]
        delta = (v[:, :, t] - (k[:, :, t, :, None] * s).sum(-2)) * beta[:, :, t, None]
        s = s + k[:, :, t, :, None] * delta[..., None, :]
        out.append((q[:, :, t, :, None] * s).sum(-2))
    return torch.stack(out, 2), s


@pytest.mark.parametrize("decay", [0.5, 3.0, 30.0])
def test_fast_forgetting_heads_give_the_recurrence_flushed_or_not(decay):
    """Log-decays whose 64-token sums fall far below the exp floor (the case that produced
    denormals): the chunked rule matches the fp64 recurrence, and flushing changes nothing."""
    torch.manual_seed(0)
    B, H, T, d = 1, 4, 150, 32
    q = l2_normalize(torch.randn(B, H, T, d)) * d ** -0.5
    k = l2_normalize(torch.randn(B, H, T, d))
    v, beta = torch.randn(B, H, T, d), torch.rand(B, H, T)
    g = -torch.rand(B, H, T) * decay
    assert (g.reshape(B, H, -1)[..., :64].sum(-1) < EXP_FLOOR).any() == (decay >= 3.0)
    state = torch.randn(B, H, d, d) * 0.1
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, state)
    ref_o, ref_s = _recurrent_fp64(q, k, v, g, beta, state)
    assert (o - ref_o).abs().max() < 1e-5 and (s - ref_s).abs().max() < 1e-5
    with denormals.flushed():
        o2, s2 = chunk_gated_delta_rule(q, k, v, g, beta, state)
    assert torch.equal(o, o2) and torch.equal(s, s2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 3, 40])
@pytest.mark.parametrize("extension", [False, True])
def test_causal_conv_is_the_conv1d_of_the_window(dtype, T, extension):
    """Tensor ops (any CPU) or the extension's one pass (fp32 or bf16 rows of a wider projection,
    as a CPU plan hands them over): silu(conv1d) of the cached inputs followed by the new ones."""
    cfg = Qwen35TextConfig.from_dict({"vocab_size": 64, "hidden_size": 64, "intermediate_size": 64,
                                      "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                                      "head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 2,
                                      "linear_key_head_dim": 16, "linear_value_head_dim": 16,
                                      "linear_conv_kernel_dim": 4}, tie_word_embeddings=True)
    layer = GatedDeltaNet(cfg)
    torch.nn.init.normal_(layer.conv1d.weight, std=0.5)
    layer.to(dtype)
    if extension:
        layer.native = native.quant_kernels(detect())
        if layer.native is None:  # no AVX-512 here: nothing of the extension's to check
            assert native.unusable(detect()) is not None
            return
    wide = torch.randn(2, T, layer.conv_dim + 24).to(dtype)  # rows of a fused projection
    qkv = wide[..., :layer.conv_dim]
    conv_state = torch.randn(2, layer.conv_dim, layer.kernel - 1)
    out = layer._causal_conv(qkv, conv_state, torch.float32)
    window = torch.cat([conv_state, qkv.transpose(1, 2).float()], dim=-1)
    K = layer.kernel
    assert torch.equal(_window_columns(conv_state, qkv, T, T + K - 1), window[..., -(K - 1):])
    assert torch.equal(_window_columns(conv_state, qkv, 1, K), window[..., 1:K])
    w = layer.conv1d.weight.float()
    ref = F.silu(F.conv1d(window.double(), w.double(), groups=layer.conv_dim)).transpose(1, 2)
    assert out.shape == (2, T, layer.conv_dim) and out.dtype == torch.float32
    if dtype == torch.bfloat16 and not (extension and T > 1):
        # not the extension's prompt pass: the reference's own bf16 ops (conv output and silu each
        # rounded to bf16)
        assert (out.double() - ref).abs().max() <= 2 ** -7 * ref.abs().max()
    else:  # fp32 math on [B, T, C] rows
        assert out.is_contiguous() and (out.double() - ref).abs().max() < 1e-5


def test_a_16_bit_plan_flushes_in_prompt_chunks_and_float32_does_not(tmp_path):
    folder = build_tiny_46(tmp_path / "bf16", seed=2, dtype=torch.bfloat16)
    fast, _ = load_model(folder, "auto", "cpu", progress=False)
    exact, _ = load_model(folder, "float32", "cpu", progress=False)
    fast_layers = [m for m in fast.modules() if isinstance(m, GatedDeltaNet)]
    exact_layers = [m for m in exact.modules() if isinstance(m, GatedDeltaNet)]
    assert fast_layers and exact_layers
    assert all(m.denormal_flush is (denormals.flushed if X86 else None) for m in fast_layers)
    assert all(m.denormal_flush is None for m in exact_layers)
    assert dict(fast.kernel_plan.rows())["denormals"] == (denormals.describe() if X86 else "kept (IEEE)")


HEAP_PROBE = textwrap.dedent("""
    import ctypes, resource, sys, threading, torch
    from minicpmv.cpu import heap
    ctypes.CDLL("libc.so.6").prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KB pages, faults countable
    print(heap.keep_warm())
    faults = []
    x = torch.randn(512, 8192)
    def churn():  # a prompt's pattern: chains of ops on 16 MB activations, each result freed after use
        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(20):
            y = x.exp()
            z = torch.cat([y, x], dim=1)
            w = (z * 2).sum(-1)
            del y, z, w
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
    churn()
    worker = threading.Thread(target=churn)  # the server's engine thread
    worker.start(); worker.join()
    print(faults[0], faults[1])
""")


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's heap")
def test_the_warm_heap_stops_paying_page_faults_per_tensor():
    """Chains of ops on 16 MB activations: with glibc's defaults every result is a fresh mapping
    (its pages faulted in one by one, ~340k faults here); kept warm, freed results are mostly
    reused (~45k), in the main thread and in another."""
    def run(env):
        out = subprocess.run([sys.executable, "-c", HEAP_PROBE], capture_output=True, text=True, timeout=120,
                             env={**os.environ, **env}, check=True).stdout.split("\n")
        return out[0], [int(x) for x in out[1].split()]

    said, warm = run({})
    assert said.startswith("kept warm")
    said_default, cold = run({"MINICPMV_HEAP": "default"})
    assert "MINICPMV_HEAP=default" in said_default
    assert max(warm) * 3 < min(cold), (warm, cold)


HUGE_PROBE = textwrap.dedent("""
    import os, sys
    if sys.argv[1] == "torch-first":
        import torch, minicpmv
    else:
        import minicpmv, torch
    from minicpmv.cpu import heap
    x = torch.empty(64 << 20, dtype=torch.uint8)
    x.fill_(1)  # the first write commits the pages
    print(os.environ.get("THP_MEM_ALLOC_ENABLE"))
    print(heap.huge_pages())
""")


@pytest.mark.skipif(sys.platform != "linux", reason="transparent huge pages")
def test_importing_minicpmv_before_torch_puts_large_tensors_in_2_mb_pages():
    """`import minicpmv` asks torch for 2 MB pages under tensors of 2 MB+ (when the kernel has them);
    imported after torch it cannot and says how; MINICPMV_HEAP=default leaves torch's default."""
    from minicpmv.cpu import heap

    def run(order, **env):
        base = {k: v for k, v in os.environ.items() if k not in ("THP_MEM_ALLOC_ENABLE", "MINICPMV_HEAP")}
        out = subprocess.run([sys.executable, "-c", HUGE_PROBE, order], capture_output=True, text=True, timeout=120,
                             env={**base, **env}, check=True).stdout.split("\n")
        return out[0], out[1], float(out[1].rsplit("; ", 1)[1].split()[0])

    mode = heap.thp_mode()
    flag, said, gb = run("minicpmv-first")
    if mode in ("madvise", "always"):
        assert flag == "1" and said.startswith("asked for tensors of 2 MB+"), said
        assert gb >= 0.03, said  # the 64 MB tensor (and whatever else torch made) in 2 MB pages
    else:
        assert flag == "None" and said.startswith("none: the kernel has no transparent huge pages"), said
    flag, said, gb = run("torch-first")
    assert flag == "None"
    if mode in ("madvise", "always"):
        assert said.startswith("not asked: torch was imported before minicpmv (set THP_MEM_ALLOC_ENABLE=1"), said
    if mode == "madvise":
        assert gb < 0.03, said
    flag, said, _ = run("minicpmv-first", MINICPMV_HEAP="default")
    assert flag == "None" and said.startswith("torch's default ($MINICPMV_HEAP=default)"), said
    flag, said, _ = run("minicpmv-first", THP_MEM_ALLOC_ENABLE="0")
    assert flag == "0" and said.startswith("$THP_MEM_ALLOC_ENABLE=0 as set by the caller"), said


POOL_PROBE = textwrap.dedent("""
    import resource, sys, torch  # torch first: only the pool's own advice can give it 2 MB pages
    from minicpmv.state.pool import StatePool, plan_pool
    from minicpmv.state.spec import AttentionSpec
    spec = [AttentionSpec(2, 256)]
    plan = plan_pool(spec, 256 << 20, torch.float32, 16, 0)
    pool = StatePool(spec, plan, torch.float32, "cpu")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    pool.keys[0][16:16 + 16 * 1024].fill_(1.0)  # 1,024 blocks' first write: 32 MB
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


@pytest.mark.skipif(sys.platform != "linux", reason="transparent huge pages")
def test_the_state_pools_first_writes_fault_2_mb_pages_whatever_the_import_order():
    """The pool advises 2 MB pages for its tensors itself: 32 MB of fresh KV blocks cost tens of
    faults instead of 8,192, even when torch was imported before minicpmv."""
    from minicpmv.cpu import heap

    def faults(**env):
        base = {k: v for k, v in os.environ.items() if k not in ("THP_MEM_ALLOC_ENABLE", "MINICPMV_HEAP")}
        out = subprocess.run([sys.executable, "-c", POOL_PROBE], capture_output=True, text=True, timeout=120,
                             env={**base, **env}, check=True).stdout
        return int(out.split()[0])

    mode = heap.thp_mode()
    if mode == "madvise":
        declined, advised = faults(THP_MEM_ALLOC_ENABLE="0"), faults()
        assert declined >= 8000 and advised < 1000, (advised, declined)  # 4 KB pages: one fault each
    else:  # "always" gives 2 MB pages without advice; "never" or none gives none: nothing to advise
        assert not heap.advise_huge(torch.empty(8 << 20, dtype=torch.uint8))


def test_the_server_gives_the_heap_back_after_an_idle_spell(monkeypatch):
    """$MINICPMV_HEAP_IDLE_S sets how long the engine idles before the heap's free pages go back
    (default 30 s: a release at once made the next image request ~0.2 s slower); bad values keep it."""
    from minicpmv.cpu import heap

    monkeypatch.delenv(heap.IDLE_ENV, raising=False)
    assert heap.idle_release_s() == 30.0
    monkeypatch.setenv(heap.IDLE_ENV, "0.5")
    assert heap.idle_release_s() == 0.5
    monkeypatch.setenv(heap.IDLE_ENV, "-3")
    assert heap.idle_release_s() == 0.0
    monkeypatch.setenv(heap.IDLE_ENV, "soon")
    assert heap.idle_release_s() == 30.0
