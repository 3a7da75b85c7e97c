"""Opaque custom ops for the data-dependent steps of an MoE layer.

``moegraph::expert_mlp`` takes a flat list of (token, expert, weight) assignments, sorts them by
expert, runs every expert's MLP on its rows (one GEMM pair per expert that received tokens) and sums
the weighted outputs per token. It is an opaque custom op (``moegraph.oplib``) with a fake implementation, so
``torch.fx`` sees one node and ``torch.compile`` can trace around it.

How the expert GEMMs are laid out (per expert, grouped, padded batch, decode) is chosen per call by
``moegraph.strategies`` (pinned, tuned on this machine, or by the fixed rule ``_small_experts``).

Assignments cover every routing policy with one format: token choice (N = T*K), expert choice
(N = E*C), hash routing, and dropped assignments (expert id outside [0, E) is skipped).

Memory the op keeps between calls: in inference its scratch buffers (per thread, dtype, device and
inference mode; at most WORKSPACE_LIMIT_BYTES each, freed by ``clear_workspace()``), and in eval
graphs a oneDNN-packed copy of the expert weights (``packed_experts``, released with the weights).

Legend: T tokens, D model dim, F expert hidden dim, E experts, N assignments, S shared hidden dim.
"""

from __future__ import annotations

import threading
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from . import semantics
from .oplib import opaque_op
from .semantics import torch_forms

__all__ = ["expert_mlp", "expert_mlp_packed", "expert_mlp_backward", "apply_activation", "mlp_forward", "clear_workspace"]


def apply_activation(h: Tensor, activation: str, gated: bool, gate_clamp: float | None, up_clamp: float | None) -> Tensor:
    """The expert nonlinearity on the up projection ``h`` ([rows, 2F] if gated else [rows, F]).

    ``activation`` names an entry of ``moegraph.semantics.ACTIVATIONS`` (or, with ``gated``, its
    elementwise function: ``("silu", True)`` is swiglu); the form is the entry's expression.
    """
    return torch_forms.activate(h, semantics.activation(activation, gated), gated, gate_clamp, up_clamp)


def mlp_forward(
    x_RD: Tensor,
    w_up_HD: Tensor,
    w_down_DF: Tensor,
    b_up_H: Tensor | None,
    b_down_D: Tensor | None,
    activation: str,
    gated: bool,
    gate_clamp: float | None,
    up_clamp: float | None,
) -> Tensor:
    """One expert MLP on R rows: act(x W_up^T + b_up) W_down^T + b_down (H = 2F if gated else F)."""
    h = F.linear(x_RD, w_up_HD, b_up_H)
    a = apply_activation(h, activation, gated, gate_clamp, up_clamp)
    return F.linear(a, w_down_DF, b_down_D)


def _sort_by_expert(exp_N: Tensor, E: int) -> tuple[Tensor, Tensor, list[int]]:
    """Assignments grouped by expert, stable within an expert; dropped ones (id outside [0, E)) left out.

    Returns order_N [n] (positions of the kept assignments, by expert), exp_sorted [n] (their experts)
    and counts (assignments per expert, a list of E ints: the one host sync of the op).
    """
    key_N = torch.where((exp_N >= 0) & (exp_N < E), exp_N, E)
    key_sorted_N, order_N = torch.sort(key_N, stable=True)
    counts = torch.bincount(key_sorted_N, minlength=E + 1)[:E].tolist()
    n = sum(counts)
    return order_N[:n], key_sorted_N[:n], counts


def _expert_mlp_impl(
    x_TD: Tensor,
    tok_N: Tensor,
    exp_N: Tensor,
    weight_N: Tensor,
    w_up_EHD: Tensor,
    w_down_EDF: Tensor,
    b_up_EH: Tensor | None,
    b_down_ED: Tensor | None,
    activation: str,
    gated: bool,
    gate_clamp: float | None,
    up_clamp: float | None,
    shared_w_up_HD: Tensor | None = None,
    shared_w_down_DF: Tensor | None = None,
    shared_scale_T: Tensor | None = None,
) -> Tensor:
    """Differentiable reference implementation used by the op (and, recomputed, by its backward)."""
    T, D = x_TD.shape
    E = w_up_EHD.shape[0]
    out_dtype = x_TD.dtype
    # Step 1: the shared experts run on every token, straight into the output buffer.
    if shared_w_up_HD is not None:
        a = apply_activation(F.linear(x_TD, shared_w_up_HD), activation, gated, gate_clamp, up_clamp)
        if shared_scale_T is not None:
            a = a * shared_scale_T.to(a.dtype).unsqueeze(-1)
        y_TD = F.linear(a, shared_w_down_DF)
    else:
        y_TD = x_TD.new_zeros(T, D)
    if exp_N.numel() == 0:
        return y_TD
    # Step 2: sort assignments by expert; dropped ones (id outside [0, E)) are left out.
    order_N, _, counts = _sort_by_expert(exp_N, E)
    if len(order_N) == 0:
        return y_TD
    tok_sorted = tok_N.index_select(0, order_N)
    w_sorted = weight_N.index_select(0, order_N)
    x_ND = x_TD.index_select(0, tok_sorted)
    # Step 3: one GEMM pair per expert that received rows.
    outs = []
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = x_ND[start : start + n]
        outs.append(
            mlp_forward(
                rows,
                w_up_EHD[e],
                w_down_EDF[e],
                None if b_up_EH is None else b_up_EH[e],
                None if b_down_ED is None else b_down_ED[e],
                activation,
                gated,
                gate_clamp,
                up_clamp,
            )
        )
        start += n
    o_ND = outs[0] if len(outs) == 1 else torch.cat(outs, 0)
    # Step 4: weight and combine per token.
    o_ND = o_ND * w_sorted.to(o_ND.dtype).unsqueeze(-1)
    return y_TD.index_add(0, tok_sorted, o_ND.to(out_dtype))


def _silu_(t: Tensor) -> Tensor:
    return F.silu(t, inplace=True)


def _relu2_(t: Tensor) -> Tensor:
    return torch.square(F.relu_(t), out=t)


#: Hand-fused in-place forms of the hot built-in activations (the table marks them ``fast``; a test
#: checks each against the entry's expression): the elementwise function applied in place to the
#: gate half (gated) or the whole row (plain). Every other entry runs its expression.
FAST_INPLACE = {"swiglu": _silu_, "reglu": F.relu_, "silu": _silu_, "relu": F.relu_, "relu2": _relu2_}


def _activate_(h: Tensor, activation: str, gated: bool, gate_clamp: float | None, up_clamp: float | None,
               out: Tensor | None = None) -> Tensor:
    """In-place version of apply_activation on a scratch buffer; returns the activated view.

    For gated MLPs, ``out`` (a contiguous [rows, F] buffer) receives act(gate, up) instead of the
    gate half of ``h``, so the next GEMM reads dense rows.
    """
    act = semantics.activation(activation, gated)
    fast = FAST_INPLACE.get(act.name)
    if not act.gated:
        return fast(h) if fast is not None else h.copy_(torch_forms.activate(h, act))
    f = h.shape[-1] // 2
    gate, up = h[:, :f], h[:, f:]
    if gate_clamp is not None:
        gate.clamp_(max=gate_clamp)
    if up_clamp is not None:
        up.clamp_(min=-up_clamp, max=up_clamp)
    if fast is None:  # the entry's expression on the clamped halves
        a = torch_forms.activate(h, act)
        return gate.copy_(a) if out is None else out.copy_(a)
    fast(gate)
    return gate.mul_(up) if out is None else torch.mul(gate, up, out=out)


#: bytes of scratch buffers one workspace (thread x dtype x device x inference mode) keeps between
#: calls; a buffer that would take it past this is allocated for the call only. 1 GiB holds the
#: buffers of a DeepSeek-V3-shaped layer (D 7168, F 2048, top-8) at about 4k tokens in float32.
WORKSPACE_LIMIT_BYTES = 1 << 30


class _Workspace:
    """Scratch buffers reused across calls, up to WORKSPACE_LIMIT_BYTES.

    Large fresh allocations are returned to the OS and page-faulted back in on every call, which on
    a CPU costs as much as the GEMMs' own memory traffic; reusing grown buffers avoids that.
    """

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device = dtype, device
        self.buffers: dict[str, Tensor] = {}

    def kept_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def get(self, name: str, rows: int, cols: int) -> Tensor:
        need = rows * cols
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < need:
            buf = torch.empty(need, dtype=self.dtype, device=self.device)
            others = self.kept_bytes() - (self.buffers[name].numel() * buf.element_size() if name in self.buffers else 0)
            if others + need * buf.element_size() <= WORKSPACE_LIMIT_BYTES:
                self.buffers[name] = buf
            else:  # too big to keep: this call only (and drop the smaller one it replaces)
                self.buffers.pop(name, None)
        return buf[:need].view(rows, cols)


_WORKSPACES = threading.local()


def _workspace(dtype: torch.dtype, device: torch.device) -> _Workspace:
    table = getattr(_WORKSPACES, "table", None)
    if table is None:
        table = _WORKSPACES.table = {}
    # Buffers made under torch.inference_mode are inference tensors, which cannot be written outside
    # it: keep one workspace per mode.
    key = (dtype, device, torch.is_inference_mode_enabled())
    if key not in table:
        table[key] = _Workspace(dtype, device)
    return table[key]


def clear_workspace() -> None:
    """Free the scratch buffers kept by the expert op in this thread."""
    _WORKSPACES.table = {}


def prepack_supported(w: Tensor) -> bool:
    """Whether expert weights can be pre-packed for oneDNN (CPU float32 with mkldnn)."""
    return (w.device.type == "cpu" and w.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def _linear(x: Tensor, w: Tensor, packed: Tensor | None) -> Tensor:
    """x @ w.T, through oneDNN when a packed copy of w is given."""
    if packed is None:
        return torch.mm(x, w.t())
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, None, "none", [], "")


class _PackedExperts:
    """oneDNN-packed copies of one layer's expert weights, tied to the weights' versions.

    Packing reorders each expert's weight once into oneDNN's blocked layout, so small-row GEMMs stop
    re-packing the full weight on every call (about 1.8x faster at 4-16 rows per expert). The copy
    doubles expert memory, so only eval graphs use it (see fx_passes.UsePrepackedExperts). It is
    rebuilt whenever a weight's data pointer or version counter changes (in-place updates,
    load_state_dict, .to()).
    """

    def __init__(self, tensors: tuple[Tensor | None, ...]):
        self.key = _pack_key(tensors)
        w_up, w_down, s_up, s_down = tensors
        rows = 16  # a batch-size hint for the blocking; any row count works
        reorder = torch.ops.mkldnn._reorder_linear_weight
        self.up = [reorder(w_up[e].contiguous(), rows) for e in range(w_up.shape[0])]
        self.down = [reorder(w_down[e].contiguous(), rows) for e in range(w_down.shape[0])]
        self.shared_up = reorder(s_up.contiguous(), 256) if s_up is not None else None
        self.shared_down = reorder(s_down.contiguous(), 256) if s_down is not None else None


def _pack_key(tensors: tuple[Tensor | None, ...]) -> tuple:
    return tuple(None if t is None else (t.data_ptr(), t._version, tuple(t.shape), t.dtype) for t in tensors)


# id(weight) -> (weakref to the weight, packed copy). Tensors compare elementwise, so they cannot be
# the keys of a WeakKeyDictionary; a finalizer drops the entry when the weight is freed.
_PACKED: dict[int, tuple[weakref.ref, _PackedExperts]] = {}


def packed_experts(w_up: Tensor, w_down: Tensor, s_up: Tensor | None, s_down: Tensor | None) -> _PackedExperts | None:
    """The (cached) packed weights for these tensors, or None where packing is not supported."""
    if not prepack_supported(w_up) or w_up.requires_grad and torch.is_grad_enabled():
        return None
    tensors = (w_up, w_down, s_up, s_down)
    ref_entry = _PACKED.get(id(w_up))
    entry = ref_entry[1] if ref_entry is not None and ref_entry[0]() is w_up else None
    if entry is None or entry.key != _pack_key(tensors):
        entry = _PackedExperts(tensors)
        if ref_entry is None or ref_entry[0]() is not w_up:
            weakref.finalize(w_up, _PACKED.pop, id(w_up), None)
        _PACKED[id(w_up)] = (weakref.ref(w_up), entry)
    return entry


#: Experts with at most this many weights per projection run as one grouped GEMM (torch._grouped_mm):
#: below it the per-expert loop's per-call overhead costs more than its faster GEMMs gain.
SMALL_EXPERT_WEIGHTS = 1 << 16


def _small_experts(w_up_EHD: Tensor, w_down_EDF: Tensor) -> bool:
    # torch._grouped_mm needs every row stride to be a multiple of 16 bytes (D and F of 4 floats).
    aligned = (w_up_EHD.shape[2] * w_up_EHD.element_size()) % 16 == 0 and \
        (w_down_EDF.shape[2] * w_down_EDF.element_size()) % 16 == 0
    return (w_up_EHD[0].numel() <= SMALL_EXPERT_WEIGHTS and hasattr(torch, "_grouped_mm") and aligned
            and w_up_EHD.device.type == "cpu" and w_up_EHD.dtype == torch.float32)


def _expert_mlp_fast(
    x_TD: Tensor,
    tok_N: Tensor,
    exp_N: Tensor,
    weight_N: Tensor,
    w_up_EHD: Tensor,
    w_down_EDF: Tensor,
    b_up_EH: Tensor | None,
    b_down_ED: Tensor | None,
    activation: str,
    gated: bool,
    gate_clamp: float | None,
    up_clamp: float | None,
    shared_w_up_HD: Tensor | None,
    shared_w_down_DF: Tensor | None,
    shared_scale_T: Tensor | None,
    packed: _PackedExperts | None = None,
    grouped: bool | None = None,
) -> Tensor:
    """The inference path: same result as _expert_mlp_impl with fewer copies.

    ``grouped`` chooses one grouped GEMM per projection (True) or one GEMM pair per expert (False);
    None leaves it to the fixed rule ``_small_experts`` (``moegraph.strategies`` chooses otherwise).

    GEMMs write into preallocated buffers (``out=``), the activation runs in place, the routing
    weight scales the F-wide hidden rows instead of the D-wide outputs, and the shared experts write
    the output buffer that the routed rows are then added into.
    """
    T, D = x_TD.shape
    E = w_up_EHD.shape[0]
    # Step 1: shared experts straight into the output buffer.
    if shared_w_up_HD is not None:
        hs = _linear(x_TD, shared_w_up_HD, packed.shared_up if packed else None)
        a = _activate_(hs, activation, gated, gate_clamp, up_clamp)
        if shared_scale_T is not None:
            a.mul_(shared_scale_T.to(a.dtype).unsqueeze(-1))
        y_TD = _linear(a, shared_w_down_DF, packed.shared_down if packed else None)
    else:
        y_TD = x_TD.new_zeros(T, D)
    if exp_N.numel() == 0:
        return y_TD
    # Step 2: sort assignments by expert; dropped ones (outside [0, E)) are left out.
    order_N, exp_sorted, counts = _sort_by_expert(exp_N, E)
    n_valid = len(order_N)
    if n_valid == 0:
        return y_TD
    tok_sorted = tok_N.index_select(0, order_N)
    w_sorted = weight_N.index_select(0, order_N).to(x_TD.dtype).unsqueeze(-1)
    ws = _workspace(x_TD.dtype, x_TD.device)
    x_ND = torch.index_select(x_TD, 0, tok_sorted, out=ws.get("x", n_valid, D))
    if _small_experts(w_up_EHD, w_down_EDF) if grouped is None else grouped:
        # Step 3 (small experts): per-call overhead dominates, so one grouped GEMM per projection.
        offs = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(device=x_TD.device, dtype=torch.int32)
        h = torch._grouped_mm(x_ND, w_up_EHD.transpose(1, 2), offs=offs)
        if b_up_EH is not None:
            h.add_(b_up_EH.index_select(0, exp_sorted))
        a = _activate_(h, activation, gated, gate_clamp, up_clamp).mul_(w_sorted)
        o = torch._grouped_mm(a.contiguous(), w_down_EDF.transpose(1, 2), offs=offs)
        if b_down_ED is not None:
            o.addcmul_(w_sorted, b_down_ED.index_select(0, exp_sorted))
        return y_TD.index_add_(0, tok_sorted, o)
    o_ND = ws.get("o", n_valid, D)
    h_buf = ws.get("h", max(counts), w_up_EHD.shape[1])
    a_buf = ws.get("a", max(counts), w_down_EDF.shape[2])
    # Step 3: one GEMM pair per expert that received rows, into preallocated buffers.
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        end = start + n
        if packed is not None:
            # oneDNN with pre-packed weights (MKL's GEMV wins at one row); each expert's output is
            # added into y directly, and the activation writes dense rows for the down projection.
            up_packed, down_packed = (packed.up[e], packed.down[e]) if n > 1 else (None, None)
            h = _linear(x_ND[start:end], w_up_EHD[e], up_packed)
            if b_up_EH is not None:
                h.add_(b_up_EH[e])
            a = _activate_(h, activation, gated, gate_clamp, up_clamp, out=a_buf[:n] if gated else None)
            a.mul_(w_sorted[start:end])
            o = _linear(a, w_down_EDF[e], down_packed)
            if b_down_ED is not None:
                o.addcmul_(w_sorted[start:end], b_down_ED[e].unsqueeze(0))
            y_TD.index_add_(0, tok_sorted[start:end], o)
            start = end
            continue
        h = torch.mm(x_ND[start:end], w_up_EHD[e].t(), out=h_buf[:n])
        if b_up_EH is not None:
            h.add_(b_up_EH[e])
        a = _activate_(h, activation, gated, gate_clamp, up_clamp)
        a.mul_(w_sorted[start:end])
        torch.mm(a, w_down_EDF[e].t(), out=o_ND[start:end])
        if b_down_ED is not None:
            o_ND[start:end].addcmul_(w_sorted[start:end], b_down_ED[e].unsqueeze(0))
        start = end
    # Step 4: combine per token (the packed path already added its rows).
    return y_TD if packed is not None else y_TD.index_add_(0, tok_sorted, o_ND)


def define_expert_op(name: str, forward=None):
    """Register a grouped expert op with ``expert_mlp``'s signature, fake and autograd.

    ``forward(*args)`` computes the result under no_grad (default: this module's inference path;
    ``"packed"``: the same with oneDNN-packed weights). Every variant shares the backward, the opaque
    op ``expert_mlp_backward`` (the Triton backend registers its op here too).
    """

    def op(
        x_TD: Tensor,
        tok_N: Tensor,
        exp_N: Tensor,
        weight_N: Tensor,
        w_up_EHD: Tensor,
        w_down_EDF: Tensor,
        b_up_EH: Tensor | None,
        b_down_ED: Tensor | None,
        activation: str,
        gated: bool,
        gate_clamp: float | None,
        up_clamp: float | None,
        shared_w_up_HD: Tensor | None,
        shared_w_down_DF: Tensor | None,
        shared_scale_T: Tensor | None,
    ) -> Tensor:
        args = (x_TD, tok_N, exp_N, weight_N, w_up_EHD, w_down_EDF, b_up_EH, b_down_ED,
                activation, gated, gate_clamp, up_clamp, shared_w_up_HD, shared_w_down_DF, shared_scale_T)
        with torch.no_grad():
            if callable(forward):
                return forward(*args)
            packed = packed_experts(w_up_EHD, w_down_EDF, shared_w_up_HD, shared_w_down_DF) if forward == "packed" else None
            from . import strategies  # the strategy (pinned, tuned or by rule) runs the experts

            return strategies.run(args, packed)

    op.__name__ = name.split("::")[1]
    registered = opaque_op(name, op)

    @registered.register_fake
    def _(x_TD, *args):
        return x_TD.new_empty(x_TD.shape)

    registered.register_autograd(_backward, setup_context=_setup_context)
    return registered


# The differentiable tensor arguments of expert_mlp, by position.
_TENSOR_ARGS = (0, 3, 4, 5, 6, 7, 12, 13, 14)


def _setup_context(ctx, inputs, output):
    ctx.inputs = inputs


def _backward(ctx, grad_TD):
    inputs = ctx.inputs
    need = [i in _TENSOR_ARGS and isinstance(inputs[i], Tensor) and ctx.needs_input_grad[i] for i in range(15)]
    grads = expert_mlp_backward(grad_TD.contiguous(), *inputs, need)
    return tuple(g if n else None for g, n in zip(grads, need))


def _act_saved(h: Tensor, activation: str, gated: bool, gate_clamp: float | None, up_clamp: float | None):
    """The activation of ``h`` [rows, H] and its derivatives (from the table entry's expression):
    returns (a [rows, F], saved)."""
    return torch_forms.activate_saved(h, semantics.activation(activation, gated), gate_clamp, up_clamp)


def _act_backward(ga: Tensor, saved: tuple, activation: str, gated: bool, gate_clamp: float | None,
                  up_clamp: float | None) -> Tensor:
    """d loss / d h [rows, H] from d loss / d a [rows, F] and ``_act_saved``'s saved derivatives."""
    return torch_forms.activate_backward(ga, saved)


def _mlp_grads(x_RD, w_up_HD, w_down_DF, b_up_H, b_down_D, go_RD, activation, gated, gate_clamp, up_clamp,
               want_out: bool):
    """Gradients of one expert MLP given the gradient of its output ``go_RD``.

    Returns (gx_RD, gw_up_HD, gw_down_DF, gb_up_H, gb_down_D, out_RD or None): the forward is
    recomputed from the saved inputs (as the autograd-recompute backward did), the derivatives are
    written out so that the whole backward is one opaque op.
    """
    h = F.linear(x_RD, w_up_HD, b_up_H)
    a, saved = _act_saved(h, activation, gated, gate_clamp, up_clamp)
    out = F.linear(a, w_down_DF, b_down_D) if want_out else None
    gw_down = go_RD.t() @ a
    gb_down = go_RD.sum(0) if b_down_D is not None else None
    gh = _act_backward(go_RD @ w_down_DF, saved, activation, gated, gate_clamp, up_clamp)
    gw_up = gh.t() @ x_RD
    gb_up = gh.sum(0) if b_up_H is not None else None
    return gh @ w_up_HD, gw_up, gw_down, gb_up, gb_down, out


def _routed_grads_per_expert(x_ND, gy_ND, w_sorted, exp_sorted, counts, w_up_EHD, w_down_EDF, b_up_EH, b_down_ED,
                             activation, gated, gate_clamp, up_clamp, want_out: bool, grads: dict) -> Tensor | None:
    """The routed experts' gradients, one expert at a time (rows sorted by expert, ``counts`` per expert).

    Writes gw_up, gw_down, gb_up, gb_down in ``grads`` (zero-filled [E, ...] tensors) and returns
    gx_ND; the per-assignment weight gradient goes to grads["gw_sorted"] when ``want_out``.
    """
    gx_ND = torch.empty_like(x_ND)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = slice(start, start + n)
        gxe, grads["gw_up"][e], grads["gw_down"][e], gbu, gbd, out = _mlp_grads(
            x_ND[rows], w_up_EHD[e], w_down_EDF[e], None if b_up_EH is None else b_up_EH[e],
            None if b_down_ED is None else b_down_ED[e], gy_ND[rows] * w_sorted[rows], activation, gated,
            gate_clamp, up_clamp, want_out=want_out)
        gx_ND[rows] = gxe
        if gbu is not None:
            grads["gb_up"][e] = gbu
        if gbd is not None:
            grads["gb_down"][e] = gbd
        if want_out:
            grads["gw_sorted"][rows] = (gy_ND[rows] * out).sum(-1)
        start += n
    return gx_ND


@opaque_op("moegraph::expert_mlp_backward")
def expert_mlp_backward(
    grad_TD: Tensor,
    x_TD: Tensor,
    tok_N: Tensor,
    exp_N: Tensor,
    weight_N: Tensor,
    w_up_EHD: Tensor,
    w_down_EDF: Tensor,
    b_up_EH: Tensor | None,
    b_down_ED: Tensor | None,
    activation: str,
    gated: bool,
    gate_clamp: float | None,
    up_clamp: float | None,
    shared_w_up_HD: Tensor | None,
    shared_w_down_DF: Tensor | None,
    shared_scale_T: Tensor | None,
    need: list[bool],
) -> list[Tensor]:
    """Gradients of ``expert_mlp`` for each of its 15 arguments (an empty tensor where not needed).

    One opaque op, so that ``torch.compile`` traces training through the MoE layer without running a
    recomputed autograd graph eagerly inside the backward.
    """
    E = w_up_EHD.shape[0]
    grad_TD = grad_TD.to(x_TD.dtype)
    gx = torch.zeros_like(x_TD)
    gw_up, gw_down = torch.zeros_like(w_up_EHD), torch.zeros_like(w_down_EDF)
    gb_up = torch.zeros_like(b_up_EH) if b_up_EH is not None else None
    gb_down = torch.zeros_like(b_down_ED) if b_down_ED is not None else None
    g_weight = torch.zeros_like(weight_N)
    g_sh_up = torch.zeros_like(shared_w_up_HD) if shared_w_up_HD is not None else None
    g_sh_down = torch.zeros_like(shared_w_down_DF) if shared_w_down_DF is not None else None
    g_scale = torch.zeros_like(shared_scale_T) if shared_scale_T is not None else None
    # Step 1: shared experts (output scaled per token by shared_scale_T when given).
    if shared_w_up_HD is not None:
        go = grad_TD if shared_scale_T is None else grad_TD * shared_scale_T.to(grad_TD.dtype).unsqueeze(-1)
        gxs, g_sh_up, g_sh_down, _, _, out = _mlp_grads(x_TD, shared_w_up_HD, shared_w_down_DF, None, None, go,
                                                        activation, gated, gate_clamp, up_clamp,
                                                        want_out=shared_scale_T is not None)
        gx += gxs
        if shared_scale_T is not None:
            g_scale = (grad_TD * out).sum(-1).to(shared_scale_T.dtype)
    # Step 2: routed experts, sorted by expert as in the forward; dropped assignments get no gradient.
    order_N, exp_sorted, counts = _sort_by_expert(exp_N, E)
    n_valid = len(order_N)
    if n_valid:
        tok_sorted = tok_N.index_select(0, order_N)
        w_sorted = weight_N.index_select(0, order_N).to(x_TD.dtype).unsqueeze(-1)
        x_ND = x_TD.index_select(0, tok_sorted)
        gy_ND = grad_TD.index_select(0, tok_sorted)
        grads = {"gw_up": gw_up, "gw_down": gw_down, "gb_up": gb_up, "gb_down": gb_down,
                 "gw_sorted": torch.empty(n_valid, dtype=x_TD.dtype, device=x_TD.device)}
        from . import strategies  # per-expert loop or grouped GEMMs, chosen as the forward's strategy

        gx_ND = strategies.run_backward(
            (x_ND, gy_ND, w_sorted, exp_sorted, counts, w_up_EHD, w_down_EDF, b_up_EH, b_down_ED, activation, gated,
             gate_clamp, up_clamp, need[3]), grads)
        gw_sorted = grads["gw_sorted"]
        gx.index_add_(0, tok_sorted, gx_ND)
        if need[3]:
            g_weight[order_N] = gw_sorted.to(weight_N.dtype)
    grads = [gx, None, None, g_weight, gw_up, gw_down, gb_up, gb_down, None, None, None, None, g_sh_up, g_sh_down,
             g_scale]
    return [g if (n and g is not None) else x_TD.new_empty(0) for g, n in zip(grads, need)]


@expert_mlp_backward.register_fake
def _(grad_TD, x_TD, tok_N, exp_N, weight_N, w_up_EHD, w_down_EDF, b_up_EH, b_down_ED, activation, gated,
      gate_clamp, up_clamp, shared_w_up_HD, shared_w_down_DF, shared_scale_T, need):
    inputs = (x_TD, tok_N, exp_N, weight_N, w_up_EHD, w_down_EDF, b_up_EH, b_down_ED, None, None, None, None,
              shared_w_up_HD, shared_w_down_DF, shared_scale_T)
    return [torch.empty_like(t) if (n and isinstance(t, Tensor)) else x_TD.new_empty(0) for t, n in zip(inputs, need)]


#: Grouped expert MLP over assignments; see the module docstring. Arguments:
#:   x_TD [T, D] token activations; tok_N [N] int64 token of each assignment; exp_N [N] int64 expert
#:   (ids outside [0, E) are dropped); weight_N [N] routing weight; w_up_EHD [E, H, D] up projection
#:   (gated: gate rows then up rows, H = 2F); w_down_EDF [E, D, F]; b_up_EH, b_down_ED optional
#:   biases; activation, gated, gate_clamp, up_clamp as in the spec; shared_w_up_HD,
#:   shared_w_down_DF optional shared experts folded into the op; shared_scale_T optional [T] scale
#:   of the shared output (Qwen2-MoE's sigmoid gate).
#: Returns [T, D]: the sum over assignments of weight * expert(x[token]) (+ shared experts).
expert_mlp = define_expert_op("moegraph::expert_mlp")
#: The same op for inference with oneDNN-packed expert weights (used by fx_passes.UsePrepackedExperts).
expert_mlp_packed = define_expert_op("moegraph::expert_mlp_packed", "packed")
