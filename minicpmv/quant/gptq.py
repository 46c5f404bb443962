"""The GPTQ algorithm (Frantar et al. 2022), as the released MiniCPM-V GPTQ checkpoints were made
(spec v40_v45 §9.6), plus round-to-nearest (RTN) as the baseline it must beat.

One linear: H = 2/N * sum x x^T over the calibration rows reaching it; dead inputs zeroed; optional
act-order (columns by decreasing diag H); damping lambda * mean(diag H) (raised until Cholesky
succeeds); Hinv = upper Cholesky factor of H^-1; columns quantized in blocks of 128 with the
error of each column spread over the not-yet-quantized columns of its block, and each block's
error pushed to the rest of the matrix in one matmul (lazy batch updates).

A model: decoder layer by decoder layer (memory stays at one layer's Hessians and the calibration
hidden states). Inside a layer the linears are quantized in sequential groups (q/k/v, then o, ...)
so each group's Hessian sees the outputs of the already-quantized groups before it; the quantized
layer's outputs feed the next layer.

One deliberate difference from GPTQModel: when a group starts inside a column block (group_size
< block size), its scale/zero come from the weights *with* the in-block error feedback applied
(the weights that are then quantized); GPTQModel reads the block's stale copy there.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .gptq_format import GPTQSpec, default_g_idx, pack_gptq


@dataclass(frozen=True)
class GPTQParams:
    damp_percent: float = 0.01
    damp_auto_increment: float = 0.01
    block_size: int = 128
    static_groups: bool = False


@dataclass
class QuantizedWeight:
    """A linear's weight on the quantization grid [N, K] (original column order) with its
    per-group scales [G, N], integer zero points [G, N] and input groups g_idx [K]."""

    weight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    loss: float = 0.0
    damp: float = 0.0

    def pack(self, spec: GPTQSpec, bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return pack_gptq(self.weight, self.scales, self.zeros, self.g_idx, spec, bias)


def grid_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) of the asymmetric/symmetric min-max grid over w [N, C]. The range
    always includes 0; symmetric grids are centred on zero = 2^(bits-1) (a group whose weights
    are all >= 0 keeps xmin = 0, as the reference does); an all-zero row gets the range [-1, 1]."""
    maxq = (1 << bits) - 1
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(empty, torch.full_like(xmax, 1.0), xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """w [N] or [N, C] onto the grid (scale, zero) given per row."""
    if w.dim() == 2:
        scale, zero = scale[:, None], zero[:, None]
    q = torch.clamp(torch.round(w / scale) + zero, 0, (1 << bits) - 1)
    return scale * (q - zero)


def rtn_quantize(weight: torch.Tensor, spec: GPTQSpec) -> QuantizedWeight:
    """Round-to-nearest with the same min-max grid per group (no error feedback)."""
    W = weight.detach().float()
    N, K = W.shape
    gl = spec.group_len(K)
    G = spec.num_groups(K)
    if K % gl == 0:  # all groups full: one vectorized pass over [N * G, gl]
        rows = W.reshape(N * G, gl)
        s, z = grid_params(rows, spec.bits, spec.sym)
        Q = fake_quantize(rows, s, z, spec.bits).reshape(N, K)
        scales, zeros = s.view(N, G).t().contiguous(), z.view(N, G).t().contiguous()
    else:
        Q = torch.empty_like(W)
        sl, zl = [], []
        for c in range(0, K, gl):
            s, z = grid_params(W[:, c:c + gl], spec.bits, spec.sym)
            Q[:, c:c + gl] = fake_quantize(W[:, c:c + gl], s, z, spec.bits)
            sl.append(s)
            zl.append(z)
        scales, zeros = torch.stack(sl), torch.stack(zl)
    return QuantizedWeight(Q, scales, zeros, default_g_idx(K, spec.group_size))


def _inverse_cholesky(H: torch.Tensor, params: GPTQParams) -> tuple[torch.Tensor, float]:
    """Upper-triangular U with U^T U = (H + damp * mean(diag H) * I)^-1 (the upper Cholesky
    factor of the damped inverse), raising damp until H factors. One Cholesky instead of three
    steps: with J the order reversal, J H J = L L^T gives H = R R^T for the upper R = J L J, so
    U = R^-1 (a triangular solve)."""
    damp = params.damp_percent
    mean_diag = torch.mean(torch.diag(H))
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    flipped = H.flip(0, 1)
    while True:
        L, info = torch.linalg.cholesky_ex(flipped + damp * mean_diag * eye)
        if info == 0:
            R = L.flip(0, 1)
            U = torch.linalg.solve_triangular(R, eye, upper=True)
            if torch.isfinite(U).all():
                return U, damp
        damp += params.damp_auto_increment
        if params.damp_auto_increment <= 0 or damp >= 1:
            raise RuntimeError("GPTQ: the Hessian is not positive definite even with damping; use more calibration "
                               "data or a larger damp_percent")


@contextmanager
def _one_thread():
    """The column sweep is thousands of small ops: on a shared 2-core machine a second OpenMP
    thread makes each of them wait at barriers (measured 1.2 s vs up to 24 s for one layer)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sweep_block(W1, Err1, U1, Wt, Qt, loss, i1, i2, K, gl, spec, static, perm, scales, zeros, state):
    """Quantize columns i1..i2 one by one (rows of W1 = Wt[i1:i2]), spreading each column's
    error over the rest of the block; records the errors in Err1 for the lazy batch update."""
    bits = spec.bits
    for j in range(i2 - i1):
        c = i1 + j
        if spec.group_size != -1:
            if static is not None:
                state["scale"], state["zero"] = static[(int(perm[c]) if perm is not None else c) // gl]
            elif c % gl == 0:
                rows = W1[j:j + gl]
                if rows.shape[0] < gl and i2 < K:
                    rows = torch.cat([rows, Wt[i2:c + gl]], dim=0)
                state["scale"], state["zero"] = grid_params(rows.t(), bits, spec.sym)
                scales.append(state["scale"])
                zeros.append(state["zero"])
        w = W1[j]
        d = U1[j, j]
        q = fake_quantize(w, state["scale"], state["zero"], bits)
        Qt[c] = q
        err = (w - q) / d
        loss += err * err / 2  # = (w - q)^2 / d^2 / 2
        W1[j:] -= U1[j, j:, None] * err[None, :]
        Err1[j] = err


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, spec: GPTQSpec,
                  params: GPTQParams = GPTQParams()) -> QuantizedWeight:
    """GPTQ for one weight [N, K] given its input Hessian H [K, K] (2/N * sum x x^T).
    Works on W^T [K, N] so that every column step touches contiguous memory."""
    Wt = weight.detach().float().t().contiguous()  # [K, N]: row c = input column c
    H = H.detach().float().clone()
    K, N = Wt.shape
    gl = spec.group_len(K)
    bits = spec.bits

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    Wt[dead, :] = 0

    static = None
    if params.static_groups and spec.group_size != -1:
        static = [grid_params(Wt[c:c + gl].t(), bits, spec.sym) for c in range(0, K, gl)]

    perm = None
    if spec.desc_act:
        perm = torch.argsort(torch.diag(H), descending=True)
        Wt, H = Wt[perm].contiguous(), H[perm][:, perm]

    U, damp = _inverse_cholesky(H, params)

    state = {"scale": None, "zero": None}
    if spec.group_size == -1:
        state["scale"], state["zero"] = grid_params(Wt.t(), bits, spec.sym)
        scales, zeros = [state["scale"]], [state["zero"]]
    else:
        scales, zeros = [], []

    Qt = torch.zeros_like(Wt)
    loss = torch.zeros(N, dtype=torch.float32, device=Wt.device)
    B = params.block_size
    for i1 in range(0, K, B):
        i2 = min(i1 + B, K)
        W1 = Wt[i1:i2].clone()  # [b, N]
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        with _one_thread():
            _sweep_block(W1, Err1, U1, Wt, Qt, loss, i1, i2, K, gl, spec, static, perm, scales, zeros, state)
        Wt[i2:] -= U[i1:i2, i2:].t() @ Err1

    if static is not None:
        scales, zeros = [s for s, _ in static], [z for _, z in static]
        g_idx = default_g_idx(K, spec.group_size)
    elif perm is not None and spec.group_size != -1:
        g_idx = torch.empty(K, dtype=torch.int32)
        g_idx[perm.cpu()] = (torch.arange(K) // gl).to(torch.int32)
    else:
        g_idx = default_g_idx(K, spec.group_size)
    if perm is not None:
        Qt = Qt[torch.argsort(perm)]
    return QuantizedWeight(Qt.t().contiguous(), torch.stack(scales), torch.stack(zeros), g_idx, float(loss.sum()), damp)


def output_error(weight: torch.Tensor, quantized: torch.Tensor, H: torch.Tensor) -> float:
    """Mean squared output error per calibration row, ||(W - Q) x||^2 averaged over rows,
    relative to the mean ||W x||^2: tr(dW H dW^T) / tr(W H W^T) (H's scale cancels)."""
    W = weight.float()
    dW = W - quantized.float()
    num = torch.sum((dW @ H) * dW)
    den = torch.sum((W @ H) * W)
    return float(num / den.clamp_min(1e-30))


class HessianAccumulator:
    """Streams calibration inputs of one linear into H = 2/N * sum x x^T (fp32)."""

    def __init__(self, in_features: int, device=None):
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.sum.addmm_(x.t(), x)
        self.rows += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.rows == 0:
            raise RuntimeError("GPTQ: a linear layer saw no calibration input")
        return self.sum * (2.0 / self.rows)


# -- whole models -------------------------------------------------------------------------

@dataclass
class LayerReport:
    name: str
    gptq_error: float  # relative output error on the calibration inputs
    rtn_error: float
    damp: float


@dataclass
class QuantizeResult:
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # our module name -> packed
    specs: dict[str, GPTQSpec] = field(default_factory=dict)
    reports: list[LayerReport] = field(default_factory=list)


class _StopForward(Exception):
    pass


def capture_layer_inputs(layer0: nn.Module, run_sample, samples) -> list[tuple[tuple, dict]]:
    """Run every calibration sample up to the first decoder layer; return its (args, kwargs)."""
    captured = []

    def hook(module, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for sample in samples:
            try:
                run_sample(sample)
            except _StopForward:
                pass
            else:
                raise RuntimeError("the calibration forward never reached the first decoder layer")
    finally:
        handle.remove()
    return captured


def _sequential_groups(layer: nn.Module, layer_name: str, targets: dict, order: list[list[str]] | None) -> list[list[str]]:
    """Our module names of this layer's quantization targets, in sequential groups."""
    mine = [n for n in targets if n.startswith(layer_name + ".")]
    groups, seen = [], set()
    for group in order or []:
        names = [n for n in mine if any(n == f"{layer_name}.{g}" for g in group)]
        if names:
            groups.append(names)
            seen.update(names)
    rest = [n for n in mine if n not in seen]
    groups.extend([[n] for n in rest] if order else ([rest] if rest else []))
    return groups


@torch.no_grad()
def quantize_model(model: nn.Module, layers: nn.ModuleList, layers_prefix: str, targets: dict[str, GPTQSpec],
                   samples: list, run_sample, call_layer, params: GPTQParams = GPTQParams(),
                   sequential_groups: list[list[str]] | None = None, progress: bool = True,
                   compare_rtn: bool = True, compact=None) -> QuantizeResult:
    """GPTQ-quantize `targets` (our module names -> spec) inside `layers`, layer by layer.

    run_sample(sample) runs the model's forward for one calibration sample (it is stopped at the
    first decoder layer); call_layer(layer, index, args, kwargs) runs one decoder layer on
    captured inputs with fresh per-sequence state and returns its output hidden states. The
    dense weights of the targets are replaced by their quantized values in place (the model then
    computes what the packed checkpoint computes); the packed tensors are in the result.
    compact(args, kwargs) -> (args, kwargs), if given, slims each captured input once."""
    from tqdm.auto import tqdm

    model.eval()
    captured = capture_layer_inputs(layers[0], run_sample, samples)
    if compact is not None:  # drop what call_layer rebuilds anyway (e.g. the samples' full caches)
        captured = [compact(args, kwargs) for args, kwargs in captured]
    hidden = [args[0] for args, _ in captured]
    result = QuantizeResult()
    bar = tqdm(total=len(layers), desc="GPTQ", unit="layer", disable=not progress)
    for i, layer in enumerate(layers):
        layer_name = f"{layers_prefix}.{i}"
        for group in _sequential_groups(layer, layer_name, targets, sequential_groups):
            modules = {n: model.get_submodule(n) for n in group}
            acc = {n: HessianAccumulator(m.in_features, m.weight.device) for n, m in modules.items()}
            handles = [m.register_forward_hook(lambda mod, inp, out, a=acc[n]: a.add(inp[0]))
                       for n, m in modules.items()]
            try:
                for (args, kwargs), x in zip(captured, hidden):
                    call_layer(layer, i, (x,) + tuple(args[1:]), kwargs)
            finally:
                for h in handles:
                    h.remove()
            for n, m in modules.items():
                spec = targets[n]
                H = acc[n].hessian()
                W = m.weight.detach()
                qw = gptq_quantize(W, H, spec, params)
                err = output_error(W, qw.weight, H)
                rtn_err = output_error(W, rtn_quantize(W, spec).weight, H) if compare_rtn else math.nan
                result.reports.append(LayerReport(n, err, rtn_err, qw.damp))
                bias = m.bias.detach() if m.bias is not None else None
                result.tensors[n] = qw.pack(spec, bias)
                result.specs[n] = spec
                m.weight.copy_(qw.weight.to(m.weight.dtype))
                del acc[n]
        hidden = [call_layer(layer, i, (x,) + tuple(args[1:]), kwargs) for (args, kwargs), x in zip(captured, hidden)]
        bar.update(1)
        bar.set_postfix_str(f"layer {i}")
    bar.close()
    return result
