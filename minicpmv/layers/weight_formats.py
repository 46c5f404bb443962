"""CPU weight formats for the per-token matrices, each one resident copy of its matrix.

* `Bf16Linear`: bf16 weight, bf16 GEMM/GEMV with fp32 accumulation (oneDNN / AVX512-BF16 / AMX),
  fp32 in and out. The fast 16-bit path on CPUs with bf16 units (the activations are rounded to
  bf16 on entry and the product on exit: not the exact fp32 path).
* `Int8Linear`: weight-only int8, one symmetric scale per output channel (like llama.cpp's Q8_0
  but per row), torch's `_weight_int8pack_mm` for few rows.
* `Int4Linear`: weight-only int4, asymmetric per group of `group` inputs (round-to-nearest on a
  grid with a scale and an offset per group, like Q4_1, its range the best of a few clippings of
  the group's min..max), torch's `_weight_int4pack_mm_for_cpu`. The codes are packed here, in one
  layout on every CPU (`int4_pack`: the layout torch's packer makes on AVX-512 CPUs); where torch
  packs another one (AVX2-only CPUs pack blocks of 32 rows), its kernel is not used on ours
  (`int4_layout_ok`): the extension modules or a widened GEMM run those products.

Few rows (decode) use the quantized kernel on the stored bytes, with bf16 activations and bf16
scales: torch's CPU int8/int4 kernels are vectorised for bf16 inputs only (with fp32 inputs they
ran 25-60x slower on this project's AVX-512 box, a gap far beyond timing noise). Scales are
rounded to bf16 before the codes are chosen, so the codes fit the stored scales. Many rows
(prompts) dequantize the matrix a block at a time and run the GEMM in `gemm_dtype` (bf16 where
the CPU has bf16 units, else fp32): a GEMM at hundreds of rows costs far more than widening.

`swap_linears` replaces nn.Linear modules by one of these (or any module built from a weight and
bias), fusing the projections a module declares in `packed_fusions` into one matrix first."""
from __future__ import annotations

import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .scratch import scratch

# At and below this many rows the quantized kernel runs on the stored bytes; above, blocks are
# dequantized and multiplied by a GEMM. The default of a layer made outside a kernel plan; the CPU
# plan sets each layer's `kernel_rows` per format (cpu/plan.py, measured by cpu/calibrate.py).
KERNEL_ROWS = 16
# Quantize / dequantize at most this many fp32 bytes of a matrix at a time, into reused buffers.
BLOCK_BYTES = 64 << 20
INT4_ROW_BLOCK = 64  # int4_pack interleaves rows in blocks of 64 (torch's packer on AVX-512 CPUs does too)



def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


class QuantLinear(nn.Module):
    """Shared forward: kernel path for few rows, dequantize-and-GEMM for many. Subclasses define
    `_kernel(x2d)` (bf16 in, bf16 [M, out_padded] out), `_native(x2d)` (fp32 in and out, the
    extension's kernel) and `dequantize(start, stop, dtype)` (rows of W)."""

    gemm_dtype = torch.float32
    kernel_rows = KERNEL_ROWS
    # cpu/native.py's AVX-512 module (int8_mm / int4_mm on the stored bytes, fp32 activations) and
    # up to how many rows it runs; set by the CPU plan where it was built (cpu/apply.py)
    native = None
    native_rows = 0

    def on_extension(self, rows: int) -> bool:
        """Whether `rows` activation rows run the extension's kernel on the stored bytes (also what
        layers/fused_decode.py follows)."""
        return self.native is not None and rows <= self.native_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = _rows(x.float())
        if self.on_extension(flat.shape[0]):
            y = self._native(flat.contiguous())
            if y.shape[-1] != self.out_features:
                y = y[:, :self.out_features]
        elif flat.shape[0] <= self.kernel_rows:
            y = self._kernel(flat.to(torch.bfloat16)).float()
            if y.shape[-1] != self.out_features:
                y = y[:, :self.out_features]
        else:
            y = self._gemm(flat)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def _gemm(self, x: torch.Tensor) -> torch.Tensor:
        dt = self.gemm_dtype
        xs = x.to(dt)
        step = max(INT4_ROW_BLOCK, (BLOCK_BYTES // (4 * self.in_features)) // INT4_ROW_BLOCK * INT4_ROW_BLOCK)
        if step >= self.out_features:
            return self._block_product(xs, 0, self.out_features, dt).float()
        out = x.new_empty(x.shape[0], self.out_features)
        for start in range(0, self.out_features, step):
            stop = min(start + step, self.out_features)
            out[:, start:stop] = self._block_product(xs, start, stop, dt)
        return out

    def _block_product(self, xs: torch.Tensor, start: int, stop: int, dt: torch.dtype) -> torch.Tensor:
        """xs @ W[start:stop]^T through a widened copy of those rows (`start` a multiple of 64)."""
        return F.linear(xs, self.dequantize(start, stop, dt))

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of W in fp32: the input embedding when it is tied to this matrix."""
        return self.gather_rows(ids.reshape(-1)).reshape(*ids.shape, self.in_features)

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._buffers.values() if t is not None)


class Int8Linear(QuantLinear):
    """W ~ q * s, q int8 in [-127, 127], s one bf16 scale per output row."""

    format = "int8"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        q = torch.empty(weight.shape, dtype=torch.int8)
        scale = torch.empty(self.out_features, dtype=torch.bfloat16)
        int8_quantize(weight, q, scale)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def _kernel(self, x):
        return torch._weight_int8pack_mm(x, self.qweight, self.scale)

    def _native(self, x):
        return self.native.int8_mm(x, self.qweight, self.scale)

    def dequantize(self, start, stop, dtype=torch.float32):
        return int8_dequantize(self.qweight[start:stop], self.scale[start:stop], dtype)

    def gather_rows(self, ids):
        return self.qweight[ids].float() * self.scale[ids, None].float()

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class Int4Linear(QuantLinear):
    """W ~ (q - 8) * s + z per group of `group` inputs, q in [0, 15], s and z bf16: an asymmetric
    grid over (a clipped part of) each group's min..max range (`int4_grid`). Rows are padded to a
    multiple of 64 (the kernel's packing block); the padding rows are zero and never returned."""

    format = "int4"

    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor | None, group: int = 64,
                 shape: tuple[int, int] | None = None):
        """Round `weight` [N, K]; or, with weight=None and shape=(N, K), empty storage for the
        caller to fill (`int4_store`), as a GPTQ checkpoint's codes are."""
        super().__init__()
        self.out_features, self.in_features = weight.shape if weight is not None else shape
        if group not in (32, 64, 128, 256) or self.in_features % group:
            raise ValueError(f"int4 group size {group} must be 32/64/128/256 and divide {self.in_features}")
        self.group = group
        packed, sz = int4_buffers(self.out_features, self.in_features, group)
        if weight is not None:
            int4_quantize(weight, group, packed, sz)
        self.register_buffer("qweight", packed)
        self.register_buffer("scale_zero", sz)
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def _kernel(self, x):
        if not int4_layout_ok():  # torch packs another layout on this CPU: the blocked widened GEMM
            return self._gemm(x.float())
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.qweight, self.group, self.scale_zero)

    def _native(self, x):
        return self.native.int4_mm(x, self.qweight, self.scale_zero, self.group)

    def _block_product(self, xs, start, stop, dt):
        if self.native is None or dt not in (torch.bfloat16, torch.float32):
            return super()._block_product(xs, start, stop, dt)
        return int4_widened_product(self.native, xs, self.qweight, self.scale_zero, self.group, start, stop)

    def codes(self, start: int, stop: int) -> torch.Tensor:
        return int4_codes(self.qweight, self.in_features, start, stop)

    def gather_rows(self, ids):
        K, G = self.in_features, self.in_features // self.group
        blocks = self.qweight.view(-1, K, 32)
        byte = blocks[ids // INT4_ROW_BLOCK, :, ids % 32]  # [n, K]
        q = torch.where((ids % INT4_ROW_BLOCK < 32)[:, None], byte & 15, byte >> 4).view(-1, G, self.group)
        s, z = self.scale_zero[:, ids, 0].t()[..., None].float(), self.scale_zero[:, ids, 1].t()[..., None].float()
        return ((q.float() - 8.0) * s + z).view(-1, K)

    def dequantize(self, start, stop, dtype=torch.float32):
        return int4_dequantize(self.qweight, self.scale_zero, self.group, start, stop, dtype)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int4 group={self.group} asymmetric")


def int4_group(k: int, preferred: int = 64) -> int | None:
    """The int4 group size for rows of k inputs: `preferred` if it divides k, else 32, else None
    (no int4 layout fits)."""
    return next((g for g in (preferred, 32) if k % g == 0), None)


def int4_widened_product(native, xs: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, group: int,
                         start: int, stop: int) -> torch.Tensor:
    """xs @ W[start:stop]^T for the int4 matrix stored in (packed, sz), `start` a multiple of 64:
    cpu/native.py's extension widens W^T in xs's dtype (bf16 or fp32) straight from the packed
    blocks (~0.1 ns per weight against ~3 for the tensor-op unpacking), and x @ W^T needs no
    transposed copy."""
    b0, b1 = start // INT4_ROW_BLOCK, -(-stop // INT4_ROW_BLOCK)
    y = xs @ native.int4_widen_t(packed, sz, group, b0, b1, xs.dtype == torch.bfloat16)
    return y if y.shape[-1] == stop - start else y[:, :stop - start]


def int8_quantize(weight: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    """Round weight [N, K] (any float dtype) per row into q [N, K] int8 and scale [N] bf16, in
    place, a block of rows at a time (fp32 staging of at most BLOCK_BYTES)."""
    step = max(1, BLOCK_BYTES // (4 * weight.shape[1]))
    for i in range(0, weight.shape[0], step):
        w = weight[i:i + step].float()
        s = (w.abs().amax(1) / 127.0).clamp_min(1e-30).bfloat16()
        q[i:i + step] = torch.round(w / s.float()[:, None]).clamp_(-127, 127).to(torch.int8)
        scale[i:i + step] = s


def int8_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """q [n, K] int8, scale [n] -> q * scale in `dtype`, in a reused scratch buffer."""
    out = scratch("deq", q.numel(), dtype).view(q.shape)
    return out.copy_(q).mul_(scale[:, None].to(dtype))


def int4_buffers(n: int, k: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty storage for an [n, k] int4 matrix in the kernel's layout: packed codes [n_pad, k/2]
    uint8 and scale/offset pairs [k/group, n_pad, 2] bf16 (n padded to a multiple of 64, zeros)."""
    n_pad = -(-n // INT4_ROW_BLOCK) * INT4_ROW_BLOCK
    return (torch.empty(n_pad, k // 2, dtype=torch.uint8),
            torch.zeros(k // group, n_pad, 2, dtype=torch.bfloat16))


def int4_quantize(weight: torch.Tensor, group: int, packed: torch.Tensor, sz: torch.Tensor) -> None:
    """Round weight [N, K] (any float dtype) into `int4_buffers(N, K, group)`, in place, a block
    of rows at a time (fp32 staging of at most BLOCK_BYTES); the padding rows are zero."""
    K = weight.shape[1]
    G = K // group

    def grid(i, rows):
        w = torch.zeros(rows, K)
        real = max(0, min(rows, weight.shape[0] - i))
        w[:real] = weight[i:i + real].float()
        q, s, z = int4_grid(w.view(rows, G, group))
        return q.view(rows, K), s, z
    int4_store(grid, packed, sz)


def int4_store(grid: Callable[[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
               packed: torch.Tensor, sz: torch.Tensor) -> None:
    """Fill `int4_buffers` a block of rows at a time from `grid(first_row, rows)` -> (codes
    [rows, K] in 0..15, scales [rows, G], offsets [rows, G]), rows counted in the padded matrix
    (the padding rows' codes, scales and offsets must be zero)."""
    n_pad, K = packed.shape[0], packed.shape[1] * 2
    step = max(INT4_ROW_BLOCK, BLOCK_BYTES // (4 * K) // INT4_ROW_BLOCK * INT4_ROW_BLOCK)
    for i in range(0, n_pad, step):
        rows = min(step, n_pad - i)
        q, s, z = grid(i, rows)
        packed[i:i + rows] = int4_pack(q)
        sz[:, i:i + rows, 0] = s.t()
        sz[:, i:i + rows, 1] = z.t()


def int4_pack(q: torch.Tensor) -> torch.Tensor:
    """Codes q [rows, K] in 0..15 (rows a multiple of 64) -> [rows, K / 2] uint8 in the int4 layout:
    per block of 64 rows, K x 32 bytes, byte (k, j) holding row j in its low nibble and row j + 32
    in its high one (what `int4_codes`, the extension modules and torch's AVX-512 kernel read)."""
    rows, K = q.shape
    blocks = q.to(torch.uint8).view(rows // INT4_ROW_BLOCK, 2, 32, K)
    return (blocks[:, 0] | (blocks[:, 1] << 4)).transpose(1, 2).contiguous().view(rows, K // 2)


def int4_torch_mm(x: torch.Tensor, packed: torch.Tensor, group: int, sz: torch.Tensor, n: int) -> torch.Tensor:
    """x (bf16) @ W^T through torch's int4 kernel where it reads this layout, else through W
    widened to fp32 (torch packs another layout on this CPU); [M, n_pad] or [M, n] out."""
    if int4_layout_ok():
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz)
    return F.linear(x.float(), int4_dequantize(packed, sz, group, 0, n))


def int4_codes(packed: torch.Tensor, k: int, start: int, stop: int) -> torch.Tensor:
    """The 4-bit codes q [stop - start, k] (uint8) of rows start..stop, read back from the
    kernel's layout: per block of 64 rows, k x 32 bytes whose low nibbles hold rows 0-31 and
    high nibbles rows 32-63 of the block."""
    b0, b1 = start // INT4_ROW_BLOCK, -(-stop // INT4_ROW_BLOCK)
    blocks = packed[b0 * INT4_ROW_BLOCK:b1 * INT4_ROW_BLOCK].reshape(b1 - b0, k, 32)
    codes = torch.stack([blocks & 15, blocks >> 4], 1).permute(0, 1, 3, 2).reshape(-1, k)
    first = b0 * INT4_ROW_BLOCK
    return codes[start - first:stop - first]


def int4_dequantize(packed: torch.Tensor, sz: torch.Tensor, group: int, start: int, stop: int,
                    dtype=torch.float32) -> torch.Tensor:
    """Rows start..stop of the matrix stored in (packed, sz), (q - 8) * s + z, in `dtype`."""
    k = packed.shape[1] * 2
    G = k // group
    s = sz[:, start:stop, 0].t()[..., None].float()
    z = sz[:, start:stop, 1].t()[..., None].float()
    q = int4_codes(packed, k, start, stop).view(stop - start, G, group)
    w = (q.float() - 8.0).mul_(s).add_(z).view(stop - start, k)
    return w if dtype == torch.float32 else w.to(dtype)


# Grid ranges tried per group, as fractions of its min..max span (kept around its centre): clipping
# a group's extremes can lower its total squared error; each group keeps the best.
INT4_RANGES = (1.0, 0.9, 0.8, 0.7)


def int4_grid(g: torch.Tensor, ranges=INT4_RANGES) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest on a 16-level grid per group: g [..., group] fp32 -> (q uint8 [..., group],
    s, z bf16 [...]) with w ~ (q - 8) s + z. Each group's grid spans a fraction of its min..max
    range (`ranges`), the one with the least squared error; s and z are rounded to bf16 first and
    the codes chosen on the grid the kernel will actually use."""
    lo, hi = g.amin(-1), g.amax(-1)
    mid, half = (lo + hi) / 2, (hi - lo) / 2

    def grid(frac):
        s = (2 * frac * half / 15.0).clamp_min(1e-30).bfloat16()
        z = ((mid - frac * half) + 8.0 * s.float()).bfloat16()
        return s, z, s.float()[..., None], (z.float() - 8.0 * s.float())[..., None]

    best_s = best_z = best_err = None
    for frac in ranges:
        s, z, sf, base = grid(frac)
        x = (g - base).div_(sf)
        err = torch.round(x).clamp_(0, 15).sub_(x).pow_(2).sum(-1).mul_(sf[..., 0] ** 2)
        if best_err is None:
            best_s, best_z, best_err = s, z, err
        else:
            better = err < best_err
            best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
            best_err = torch.minimum(err, best_err)
    base = (best_z.float() - 8.0 * best_s.float())[..., None]
    q = (g - base).div_(best_s.float()[..., None]).round_().clamp_(0, 15).to(torch.uint8)
    return q, best_s, best_z


def plus_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y + bias in their promoted dtype, the same numbers as torch's add: that add of a bf16 product
    and an fp32 bias takes torch's casting path, ~30x slower than a cast and an add of one dtype
    (1,024 x 1,152 on a Zen 4: 4.4 ms against 0.14 + 0.08; the vision tower's out_proj and fc2)."""
    if bias is None:
        return y
    z = y.to(torch.promote_types(y.dtype, bias.dtype))
    return z.add_(bias) if z is not y else y + bias


# the most elements of a tiled matrix untiled into a reused per-thread scratch, which grows to the
# largest one untiled: every layer matrix of the models here (4.5's fused gate_up: 100 M); an
# lm_head (188-621 M), untiled only for many rows of logits, gets a copy of its own
SCRATCH = 128 << 20
_scratch = threading.local()


class Bf16Linear(nn.Linear):
    """bf16 weight, bf16 matmul accumulating in fp32 (oneDNN), fp32 in and out. Built by class
    swap from a loaded MixedLinear/nn.Linear whose weight is bf16, or from a weight (fusions)."""

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> "Bf16Linear":
        lin = cls.__new__(cls)
        nn.Module.__init__(lin)
        lin.in_features, lin.out_features = weight.shape[1], weight.shape[0]
        lin.weight = nn.Parameter(weight.detach().to(torch.bfloat16), requires_grad=False)
        lin.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        return lin

    native = None  # cpu/native.py's module (bf16_mm: fp32 activations, exact products), set by the CPU plan
    # from this many rows up to AMX_ROWS, the extension's AMX tile product (bf16 activations); 0: off.
    # Set by the CPU plan where the CPU has AMX, the OS grants it and in_features % 32 == 0.
    amx_rows = 0
    # the extension's rows on vdpbf16ps with the activations rounded to bf16 (AVX512-BF16 without
    # AMX; in_features % 32 == 0), else its FMA rows on exact fp32 activations
    bf16_dot = False
    # with bf16_dot, up to this many rows (short prompts, batched decode) run those vdpbf16ps rows
    # instead of oneDNN, which reorders the plain weight inside every call (the plan's bf16_dot_rows)
    dot_rows = 0
    # with bf16_dot: the weight is stored in the extension's tiles of 4 rows (bf16_tile; same shape,
    # other order), which its vdpbf16ps rows stream faster at several rows; oneDNN's GEMMs (more
    # than dot_rows rows) read a plain copy made for the call (plain_weight)
    tiles = False

    def plain_weight(self) -> torch.Tensor:
        """The [out, in] matrix in row order: when the weight is stored in tiles, a copy in this
        thread's scratch (valid until the next call; fresh pages cost this VM more than the copy:
        pp512 of the 4.6 ~9% slower with a new buffer per matrix), or a new tensor beyond SCRATCH."""
        if not self.tiles:
            return self.weight
        n = self.weight.numel()
        if n > SCRATCH:
            return self.native.bf16_untile(self.weight)
        buf = getattr(_scratch, "buf", None)
        if buf is None or buf.numel() < n:
            with torch.inference_mode(False):  # a normal tensor, whichever mode the first call ran in
                buf = _scratch.buf = torch.empty(n, dtype=torch.bfloat16)
        return self.native.bf16_untile(self.weight, buf[:n].view(self.weight.shape))

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of W in fp32: the input embedding when it is tied to this matrix (as QuantLinear's)."""
        n, k = self.weight.shape
        full = n - n % 4  # tiles of 4 rows ([n/4, k/32, 4, 32]), the last n % 4 rows plain: bf16_dot.cpp
        if not self.tiles or full == 0:
            return F.embedding(ids, self.weight).float()
        tiled = ids.clamp(max=full - 1)
        rows = self.weight[:full].view(full // 4, k // 32, 4, 32)[tiled // 4, :, tiled % 4].reshape(*ids.shape, k)
        tail = ids >= full
        if full < n and bool(tail.any()):
            rows[tail] = self.weight[ids[tail]]
        return rows.float()

    def bf16_product(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T + b with bf16 operands and fp32 sums (bias added to them), bf16 out: for a
        consumer that reads bf16 anyway (the prompt paths of the MLPs, the vision attention's
        fused q/k/v, DeltaNet's input projection)."""
        rows = x.numel() // x.shape[-1]
        if self.on_dot_rows(rows):
            y = self.native.bf16_dot_mm(x.reshape(rows, -1).float().contiguous(), self.weight, self.tiles)
            return plus_bias(y, self.bias).to(torch.bfloat16).reshape(*x.shape[:-1], -1)
        bias = None if self.bias is None else self.bias.to(torch.bfloat16)
        return F.linear(x.to(torch.bfloat16), self.plain_weight(), bias)

    def on_dot_rows(self, rows: int) -> bool:
        """Whether `rows` rows take the extension's vdpbf16ps rows under the `dot_rows` bound."""
        return self.native is not None and self.bf16_dot and rows <= self.dot_rows

    def on_extension(self, rows: int) -> bool:
        """Whether `rows` activation rows run the extension: its AMX tiles from `amx_rows` up to
        AMX_ROWS, its vdpbf16ps rows up to `dot_rows`, else its rows up to GEMV_ROWS (also what
        layers/fused_decode.py follows)."""
        return self.native is not None and (bool(self.amx_rows) and self.amx_rows <= rows <= AMX_ROWS
                                            or self.on_dot_rows(rows) or rows <= GEMV_ROWS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if self.on_extension(rows):
            amx = self.amx_rows and self.amx_rows <= rows  # (the tiles' upper bound: on_extension)
            x2 = x.reshape(rows, -1).float().contiguous()
            y = (self.native.bf16_amx_mm(x2, self.weight) if amx else
                 self.native.bf16_dot_mm(x2, self.weight, self.tiles) if self.bf16_dot else
                 self.native.bf16_mm(x2, self.weight))
            return plus_bias(y.reshape(*x.shape[:-1], -1).to(x.dtype), self.bias)
        xb, weight = x.to(torch.bfloat16), self.plain_weight()
        if rows <= GEMV_ROWS and x.device.type == "cpu":
            y = _weight_major(weight, xb.reshape(rows, -1)).reshape(*x.shape[:-1], -1).to(x.dtype)
        else:
            y = F.linear(xb, weight).to(x.dtype)
        return plus_bias(y, self.bias)


# Up to this many rows (decode steps) a bf16 product runs weight-major: torch.mv for one row, W @ X^T
# for a few. On the AMX Xeon, 2 threads, cold matrices: one row 6.5-7.8 G params/s against 5.1-5.8
# for F.linear (oneDNN), same result bit for bit; 4-8 rows 6.3-7.0 against 5.4-6.5.
GEMV_ROWS = 8
# The most rows the extension's AMX tile product takes (one tile holds 16 activation rows); the
# plan's `amx_rows` is the fewest (below it the FMA kernel streams faster: docs/performance.md).
AMX_ROWS = 16


def _weight_major(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x [rows, in] bf16 -> [rows, out] for a handful of rows."""
    if x.shape[0] == 1:
        return torch.mv(weight, x[0])[None]
    return (weight @ x.t()).t().contiguous()


class TiedEmbedding(nn.Module):
    """The input embedding read from an lm_head that shares its matrix (tied weights) and stores it
    in a format of its own (quantized, or bf16 in tiles): one resident copy, the rows looked up
    through the head's `embedding` (a few per step)."""

    def __init__(self, head: QuantLinear | Bf16Linear):
        super().__init__()
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self._head = [head]  # not a submodule: the head is owned (and saved, printed) where it lives

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._head[0].embedding(ids)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}, tied to the lm_head"


class QuantEmbedding(TiedEmbedding):
    """An untied input embedding stored in a weight format itself (`rows`, a QuantLinear over
    the [vocab, dim] matrix), rows dequantized on lookup: what Q4_K_M does with token_embd."""

    def __init__(self, rows: QuantLinear):
        super().__init__(rows)
        self.rows = rows

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}"


def swap_linears(model: nn.Module, prefixes: tuple[str, ...],
                 make: Callable[[torch.Tensor, torch.Tensor | None], nn.Module | None],
                 accept: Callable[[nn.Linear], bool] = lambda lin: True, skip: tuple[str, ...] = ()) -> int:
    """Replace every accepted nn.Linear whose qualified name starts with one of `prefixes` (and
    none of `skip`) by
    `make(weight, bias)` (None: leave it). Projections a module fuses (`packed_fusions = {fused:
    (member, ...)}`, members reading the same input) become one matrix under `fused`, the members
    set to None; the module's forward uses the fused product when present (members still on the
    meta device, not loaded yet, leave their group for a later call). One matrix at a time,
    no reference kept to a replaced module. Returns how many linears were replaced."""
    done = 0
    deferred = set()
    owners = [name for name, m in model.named_modules() if getattr(m, "packed_fusions", None)]
    for name in owners:
        if not (name + ".").startswith(prefixes) or (name + ".").startswith(skip):
            continue
        owner = model.get_submodule(name)
        for fused, members in owner.packed_fusions.items():
            linears = [getattr(owner, m) for m in members]
            if any(isinstance(lin, nn.Linear) and lin.weight.device.type == "meta" for lin in linears):
                deferred.update(f"{name}.{m}" for m in members)  # not all loaded yet: fuse them later
                continue
            if not all(isinstance(lin, nn.Linear) and accept(lin) for lin in linears):
                continue  # e.g. GPTQ int4 layers: they stay as they are
            biases = [lin.bias for lin in linears]
            if any(b is None for b in biases) and any(b is not None for b in biases):
                continue
            weight = torch.cat([lin.weight.detach() for lin in linears])
            bias = None if biases[0] is None else torch.cat([b.detach().float() for b in biases])
            new = make(weight, bias)
            del linears, biases, weight
            if new is None:
                continue
            for m in members:
                setattr(owner, m, None)
            setattr(owner, fused, new)
            done += len(members)
    names = [name for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and name.startswith(prefixes) and not name.startswith(skip)
             and name not in deferred]
    for name in names:
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent)
        linear = getattr(owner, attr)
        if accept(linear):
            new = make(linear.weight.detach(), linear.bias)
            if new is not None:
                setattr(owner, attr, new)
                done += 1
        del linear
    return done


def int4_layout_ok() -> bool:
    """Whether torch's `_weight_int4pack_mm_for_cpu` reads the layout `int4_pack` writes (checked
    once on a small matrix): it does on AVX-512 CPUs; AVX2-only CPUs pack blocks of 32 rows."""
    global _LAYOUT_OK
    if _LAYOUT_OK is None:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(128, 64, generator=g)
        lin = Int4Linear(w, None, group=32)
        ref = lin.dequantize(0, 128)
        x = torch.randn(2, 64, generator=g)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), lin.qweight, lin.group, lin.scale_zero).float()
        _LAYOUT_OK = bool((y - x.bfloat16().float() @ ref.t()).abs().max() < 0.05 * (1 + ref.abs().max()))
    return _LAYOUT_OK


_LAYOUT_OK = None
