"""Rounding bounds of the computation graphs the Triton kernels perform.

``rounding_bound(method, q, k, v, precision, ...)`` and ``recurrence_rounding_bound(a, b,
x0, precision, ...)`` return float64 tensors bounding, elementwise, ``|computed - exact|``
where *exact* is the method on the inputs as stored and *computed* is what the graph of
:mod:`attnprec.kernels` produces in ``precision`` (final store included). Each graph, with
every rounding numbered, is written out in docs/kernels.md; the comments here refer to it.

Models (sound for a GPU and for the Triton CPU interpreter):

- elementwise operations round once in ``precision.compute`` (unit roundoff u);
  products and sums in ``precision.accumulate`` (u_a); ``tl.dot`` and ``tl.sum`` in any
  order, possibly fused with the accumulator, so a sum of N terms is modelled as recursive
  (depth N, Higham's gamma_N), products rounded once;
- ``tl.exp`` is ``ex2.approx(x log2 e)`` on a GPU and NumPy's float32 exp under the
  interpreter: :data:`KERNEL_ULPS` (4 ulps, plus the rounding of the argument product,
  a relative error ``exp(u |x|) - 1``);
- ``tl.log`` may be ``lg2.approx``, whose error is absolute near 1: an absolute error
  :data:`LOG_ABS_FLOOR` plus 4 ulps of the result;
- every exp, product or sum that may underflow adds an absolute ``min_normal`` of its
  format (covers flush-to-zero), counted per term;
- a quantity that may overflow makes the bound ``inf``.

The bound itself is evaluated in float64 and inflated by :func:`.rounding.upper`; the
float64 evaluation errors of the exact quantities it needs (``|y|``, the normalizer) are
bounded and subtracted/added explicitly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from attnprec._validate import broadcast_shapes, check_float, check_int, check_qkv, resolve_scale
from attnprec.analysis.bounds.rounding import (
    U64,
    ElementaryUlps,
    gamma,
    store_error,
    upper,
)
from attnprec.analysis.precision import Precision

__all__ = [
    "GRAPH_METHODS",
    "KERNEL_ULPS",
    "LOG_ABS_FLOOR",
    "rounding_bound",
    "recurrence_rounding_bound",
]

GRAPH_METHODS = ("log", "taylor", "polynomial", "linear")

#: exp and log of the kernels: 4 ulps (NumPy's float32 SIMD exp/log are documented below
#: 4 ulp, ex2.approx / lg2.approx at 2 ulp), plus the rounding of x * log2(e) for exp.
KERNEL_ULPS = ElementaryUlps(exp=4.0, log=4.0, exp_arg=1.0)
#: Absolute error floor of a computed log (lg2.approx.f32: 2^-22.6 absolute near 1).
LOG_ABS_FLOOR = 2.0**-21


def _check_precision(precision: object) -> Precision:
    if not isinstance(precision, Precision):
        raise TypeError(f"precision: expected a Precision, got {type(precision).__name__}")
    return precision


def _block(block: object, n: int) -> int:
    """Tokens per chunk; ``None`` is the worst case for the chunked graphs (one per chunk)."""
    if block is None:
        return 1
    return min(check_int("block", block, 1), max(n, 1))


def _f64(*xs: torch.Tensor) -> list[torch.Tensor]:
    return [x.double() for x in xs]


def _causal_mask(n_q: int, n_k: int, causal: bool) -> torch.Tensor:
    if not causal:
        return torch.ones(n_q, n_k, dtype=torch.float64)
    return torch.ones(n_q, n_k, dtype=torch.float64).tril()


def _quotient_bound(
    num: torch.Tensor,
    den: torch.Tensor,
    num_abs: torch.Tensor,
    den_abs: torch.Tensor,
    e_num: torch.Tensor,
    e_den: torch.Tensor,
    r64: float,
    precision: Precision,
) -> torch.Tensor:
    """Bound on |fl(fl-store(num~ / den~)) - num / den| (docs/kernels.md, "Quotient").

    ``num, den``: float64 evaluations of the exact numerator ``[..., n, d_v]`` and
    normalizer ``[..., n]``, each within ``r64`` times ``num_abs`` / ``den_abs`` of the exact
    value; ``e_num, e_den``: bounds on the kernel's errors in them.
    """
    d64 = r64 * den_abs
    den_lo = (den.abs() - d64 - e_den).unsqueeze(-1)
    y_up = (num.abs() + r64 * num_abs) / (den.abs() - d64).unsqueeze(-1)
    ratio = (e_num + y_up * e_den.unsqueeze(-1)) / den_lo
    nan_in = torch.isnan(num) | torch.isnan(den).unsqueeze(-1)  # NaN inputs: NaN bound
    ratio = torch.where(~(den_lo > 0), torch.full_like(ratio, math.inf), ratio)
    acc = precision.accumulate
    div = acc.u * (y_up + ratio) + acc.min_subnormal / 2
    total = ratio + div
    if precision.storage != acc:
        total = total + store_error(y_up + total, precision.storage, precision.rounding)
    # The quotient itself may overflow the accumulate format.
    total = torch.where(y_up + total >= acc.max, torch.full_like(total, math.inf), total)
    total = torch.where(torch.isnan(total), torch.full_like(total, math.inf), total)
    return upper(torch.where(nan_in, torch.full_like(total, math.nan), total), 40)


def rounding_bound(
    method: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    precision: Precision,
    *,
    causal: bool = False,
    scale: float | None = None,
    block: int | None = None,
    **params: Any,
) -> torch.Tensor:
    r"""Elementwise bound on the rounding error of a kernel's computation graph.

    Parameters
    ----------
    method : {"log", "taylor", "polynomial", "linear"}
        The graph (docs/kernels.md): ``"log"`` the chunked Heinsen kernel,
        ``"taylor"``/``"polynomial"`` the in-kernel packed-monomial features,
        ``"linear"`` the chunked kernel over given features (``q``, ``k`` are ``phi_q``,
        ``phi_k``; ``feature_map`` must be absent or None).
    q, k, v : torch.Tensor
        The inputs as stored (any float dtype; taken as exact).
    precision : Precision
        Where the graph rounds (``attnprec.kernels.precision_for``).
    causal : bool
        Causal graph (requires ``n_q == n_k``).
    scale : float, optional
        As the method (``log``: default 1; taylor/polynomial: ``1/sqrt(d_k)``; linear: none).
    block : int, optional
        Tokens per chunk of the kernel (``attnprec.kernels.log.BLOCK``); ``None`` assumes
        the worst case. Only the log graph depends on it (state rescalings).
    **params
        ``degree`` (taylor) or ``coeffs`` (polynomial).

    Returns
    -------
    torch.Tensor
        float64 ``[..., n_q, d_v]``: ``|computed - exact| <=`` this, elementwise; ``inf``
        where the graph may overflow or the normalizer may vanish (underflow, or a
        polynomial normalizer near 0); NaN where the inputs are NaN.

    Raises
    ------
    ValueError
        Unknown method or parameters, shapes (as :func:`attnprec._validate.check_qkv`).
    TypeError
        ``precision`` not a Precision, non-float inputs.
    """
    if method not in GRAPH_METHODS:
        raise ValueError(f"method: expected one of {GRAPH_METHODS}, got {method!r}")
    precision = _check_precision(precision)
    n_q, n_k, d_k, _ = check_qkv(q, k, v, causal)
    q64, k64, v64 = _f64(q, k, v)
    batch = broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    q64, k64, v64 = (x.expand(*batch, *x.shape[-2:]) for x in (q64, k64, v64))
    if method == "log":
        if params:
            raise ValueError(f"params: log takes no parameters, got {sorted(params)}")
        s = resolve_scale(scale, d_k, default=1.0)
        return _log_bound(q64, k64, v64, s, causal, _block(block, n_k), precision)
    if method == "linear":
        fm = params.pop("feature_map", None)
        if params:
            raise ValueError(f"params: linear takes no parameters, got {sorted(params)}")
        if fm is not None:
            raise ValueError(
                "feature_map: the linear kernel graph takes given features; pass phi(q), "
                "phi(k) as q, k"
            )
        if scale is not None:
            raise ValueError("scale: linear attention has no scale (must be None)")
        wq = q64
        w = wq @ k64.transpose(-1, -2)
        t_abs = wq.abs() @ k64.abs().transpose(-1, -2)
        cq = wq.abs().amax(-1).clamp(min=1.0)
        ck = k64.abs().amax(-1).clamp(min=1.0)
        return _featured_bound(
            w, t_abs, v64, causal, m=d_k, feat_q=0, feat_k=0, n_mult=2, cq=cq, ck=ck,
            eval_ops=d_k, precision=precision,
        )  # fmt: skip
    coeffs = _method_coeffs(method, params)
    s = resolve_scale(scale, d_k)
    powers = [p for p, c in enumerate(coeffs) if c != 0]
    top = max(powers)
    m = sum(math.comb(d_k + p - 1, p) for p in powers)
    dot = (q64 @ k64.transpose(-1, -2)) * s
    dot_abs = (q64.abs() @ k64.abs().transpose(-1, -2)) * abs(s)
    w = torch.zeros_like(dot)
    t_abs = torch.zeros_like(dot)
    for p in powers:
        w = w + coeffs[p] * dot**p
        t_abs = t_abs + abs(coeffs[p]) * dot_abs**p
    wmax = max(abs(coeffs[p]) * abs(s) ** p * math.factorial(p) for p in powers)
    cq = max(wmax, 1.0) * q64.abs().amax(-1).clamp(min=1.0) ** top
    ck = k64.abs().amax(-1).clamp(min=1.0) ** top
    # features: (p-1) products per monomial on each side, the weight product and its
    # float64 -> float32 representation (2) on the query side.
    return _featured_bound(
        w, t_abs, v64, causal, m=m, feat_q=max(top - 1, 0) + 3, feat_k=max(top - 1, 0),
        n_mult=2 * top + 3, cq=cq, ck=ck, eval_ops=d_k + 2 * top + 2, precision=precision,
    )  # fmt: skip


def _method_coeffs(method: str, params: dict[str, Any]) -> Sequence[float]:
    if method == "taylor":
        deg = check_int("degree", params.pop("degree", 2), 0)
        coeffs: Sequence[float] = [1.0 / math.factorial(p) for p in range(deg + 1)]
    else:
        if "coeffs" not in params:
            raise ValueError("coeffs: polynomial requires coeffs")
        raw = params.pop("coeffs")
        coeffs = [float(c) for c in (raw.tolist() if isinstance(raw, torch.Tensor) else raw)]
        if not coeffs or not all(math.isfinite(c) for c in coeffs):
            raise ValueError("coeffs: expected a non-empty sequence of finite numbers")
        if not any(c != 0 for c in coeffs):
            raise ValueError("coeffs: expected at least one nonzero coefficient")
    if params:
        raise ValueError(f"params: unexpected for {method}: {sorted(params)}")
    return coeffs


def _featured_bound(
    w: torch.Tensor,
    t_abs: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    *,
    m: int,
    feat_q: int,
    feat_k: int,
    n_mult: int,
    cq: torch.Tensor,
    ck: torch.Tensor,
    eval_ops: int,
    precision: Precision,
) -> torch.Tensor:
    """The featured graph (docs/kernels.md, "Featured kernels").

    ``w [.., n_q, n_k]`` exact weights (float64), ``t_abs`` = sum_f |phi_q_f phi_k_f|;
    ``feat_q``/``feat_k`` roundings (compute) of one query/key feature; ``n_mult``
    multiplications per term that may underflow; ``cq``, ``ck`` per-row bounds on the
    products of the factors' moduli (>= 1 each) for the underflow and overflow checks.
    """
    n_q, n_k = w.shape[-2:]
    mask = _causal_mask(n_q, n_k, causal)
    w = w * mask
    t_abs = t_abs * mask
    u_c, u_a = precision.compute.u, precision.accumulate.u
    # per term: feature roundings, two products (phi_q phi_k or phi_k v, then x v or
    # phi_q S), at most m + n_k + 2 additions on its way to the numerator or normalizer.
    g = (1.0 + gamma(feat_q + feat_k, u_c)) * (1.0 + gamma(2 + m + n_k + 2, u_a)) - 1.0
    va = v.abs()
    num, den = w @ v, w.sum(-1)
    num_abs, den_abs = t_abs @ va, t_abs.sum(-1)
    tiny = precision.accumulate.min_normal
    c = cq.unsqueeze(-1) * ck.unsqueeze(-2) * mask  # [.., n_q, n_k]
    uf_den = n_mult * tiny * m * c.sum(-1)
    uf_num = n_mult * tiny * m * (c @ va.clamp(min=1.0))
    e_num = upper(g * num_abs + uf_num, 4 * n_k + 10)
    e_den = upper(g * den_abs + uf_den, 4 * n_k + 10)
    # float64 evaluation of the exact weights, numerator and normalizer
    r64 = gamma(2 * (eval_ops + n_k) + 20, U64)
    out = _quotient_bound(num, den, num_abs, den_abs, e_num, e_den, r64, precision)
    # overflow of a product, the state sum_j phi_k v, the numerator or the normalizer
    big = precision.accumulate.max / 4
    vmax = va.amax(-2, keepdim=True).clamp(min=1.0)  # [.., 1, d_v]
    over = c.amax(-1, keepdim=True) * vmax * (1 + g) >= big
    over = over | ((ck.sum(-1)[..., None, None] * vmax * (1 + g)) >= big)
    over = over | ((den_abs * (1 + g)) >= big).unsqueeze(-1) | (num_abs * (1 + g) >= big)
    return torch.where(over, torch.full_like(out, math.inf), out)


def _log_bound(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    s: float,
    causal: bool,
    block: int,
    precision: Precision,
) -> torch.Tensor:
    """The log graph (docs/kernels.md, "Log kernel")."""
    n_q, d_k = q.shape[-2:]
    n_k = k.shape[-2]
    u, u_a = precision.compute.u, precision.accumulate.u
    ue = u * (1 + 8 * u) + 8 * U64  # exponent-error coefficient, float64 slack included
    a = KERNEL_ULPS.exp_arg
    lexp = math.log1p(2 * KERNEL_ULPS.exp * u)  # log of the exp ulp factor
    nc = math.ceil(n_k / block)
    sq, sk = q * s, k * s
    scaled = float(s != 1.0)
    # bound on |m_c| at every chunk (NaN keys poison only the rows that see them)
    mk = torch.nan_to_num(sk.abs(), nan=0.0).amax(-2) * (1 + 2 * u)
    tq = sq.abs() + mk.unsqueeze(-2)  # bound on |scale q_ic + m_c|, |scale (q_ic + k_jc)|
    tm = (tq + tq.amax(-1, keepdim=True)) * (1 + 4 * u)  # bound on |t - M_i|
    # exponent errors, factored by query channel, key channel, channel (rescalings); the
    # intra-chunk terms exp(fl(sq + sk) - M_i) have a subset of the carried terms' errors
    eq = ue * (scaled * sq.abs() + tq + (1 + a) * tm) + lexp
    ek = ue * (scaled * sk.abs() + (1 + a) * (sk.abs() + mk.unsqueeze(-2))) + lexp
    er = nc * lexp + (1 + a) * ue * 2 * mk
    fq = torch.exp(eq)
    fk = torch.exp(ek + er.unsqueeze(-2))
    mask = _causal_mask(n_q, n_k, causal)
    vis = mask.bool()
    # Terms exp(sq_ic + sk_jc - shift_i), shift_i >= the kernel's M_i (the largest visible
    # exponent, rounded): [rows, n_k, d_k] in blocks of query rows, never factored, so a
    # visible term is never lost to float64 underflow of a factor.
    w_parts, wr_parts, shift_parts = [], [], []
    per_row = max(1, math.prod(sq.shape[:-2]) * n_k * d_k)
    step = max(1, 2**21 // per_row)
    for r0 in range(0, n_q, step):
        sl = slice(r0, r0 + step)
        x = sq[..., sl, None, :] + sk[..., None, :, :]
        x = torch.where(vis[sl, :, None], x, -math.inf)
        top = x.amax((-2, -1)) if n_k and d_k else torch.zeros(x.shape[:-2], dtype=x.dtype)
        shift = top + 4 * ue * tq[..., sl, :].amax(-1)
        term = torch.exp(x - shift[..., None, None])
        w_parts.append(term.sum(-1))
        wr_parts.append((term * fq[..., sl, None, :] * fk[..., None, :, :]).sum(-1))
        shift_parts.append(shift)
    w, wr = torch.cat(w_parts, -2), torch.cat(wr_parts, -2)
    shift = torch.cat(shift_parts, -1)
    g = gamma(2 + nc + d_k + n_k + 2, u_a)
    # non-finite values: NaN / inf only in the rows that see them (the kernel's graph)
    vfin = torch.isfinite(v)
    va = torch.where(vfin, v.abs(), 0.0)
    num, den = w @ torch.where(vfin, v, 0.0), w.sum(-1)
    num_abs, den_abs = w @ va, den
    cuf = 2 * (nc + 4) * precision.accumulate.min_normal * d_k
    lost = n_k * d_k * 2.0**-1070  # float64 underflow of the bound's own terms, each < 2^-1074
    ops = 4 * (n_k + d_k) + 20
    e_num = upper((1 + g) * (wr @ va) - num_abs + (cuf + lost) * (mask @ va), ops)
    e_den = upper((1 + g) * wr.sum(-1) - den_abs + (cuf + lost) * mask.sum(-1), ops)
    # float64 evaluation: exp of arguments up to |shift| + ..., then d_k + n_k sums (NaN
    # rows are NaN anyway; the others' arguments are bounded by the non-NaN moduli)
    big_arg = sum(
        float(torch.nan_to_num(x.abs(), nan=0.0).amax()) if x.numel() else 0.0
        for x in (shift, sq, sk)
    )
    r64 = math.expm1(4 * U64 * big_arg) + gamma(2 * (d_k + n_k) + 20, U64)
    out = _quotient_bound(num, den, num_abs, den_abs, e_num, e_den, r64, precision)
    seen_nan = (mask @ torch.isnan(v).double()) > 0
    seen_inf = (mask @ torch.isinf(v).double()) > 0
    out = torch.where(seen_inf, math.inf, out)
    return torch.where(seen_nan, math.nan, out)


def recurrence_rounding_bound(
    a: torch.Tensor,
    b: torch.Tensor,
    x0: torch.Tensor | None,
    precision: Precision,
    *,
    dim: int = -1,
    block: int | None = None,
) -> torch.Tensor:
    r"""Elementwise bound on the rounding error of the kernels' signed log-space scan.

    ``x_t = a_t x_{t-1} + b_t`` computed as in :func:`attnprec.kernels.linear_recurrence`
    (graph in docs/kernels.md, "Recurrence"): logs of the inputs, a Hillis-Steele scan
    per chunk of ``block`` steps, the carry combined once per chunk, one exp, the store.

    With ``T_t = sum_s |prod_{l=s+1..t} a_l| |b_s| + |prod_{l<=t} a_l| |x0|`` (the sum of
    the moduli of the terms of ``x_t``), every term passes through at most
    ``L = ceil(log2 block) + ceil(n / block) + 1`` combines, each perturbing it by a
    relative ``eta`` that depends on a per-sequence bound ``Lambda`` of every log in the
    scan; the bound is
    ``((1 + eps_in)(1 + eta)^L (1 + eps_out) - 1) T_t`` plus underflow and the store.

    Parameters
    ----------
    a, b : torch.Tensor
        Gates and inputs as stored, one shape.
    x0 : torch.Tensor or None
        Initial state (shape of ``a`` without ``dim``).
    precision : Precision
        ``attnprec.kernels.precision_for(a.dtype, interpreted)``.
    dim : int
        Time dimension.
    block : int, optional
        Steps per chunk (``attnprec.kernels.recurrence.BLOCK_T``); ``None``: one chunk.

    Returns
    -------
    torch.Tensor
        float64, the shape of ``a``; ``inf`` where the result may overflow.
    """
    precision = _check_precision(precision)
    check_float("a", a)
    check_float("b", b)
    if a.shape != b.shape:
        raise ValueError(f"b: expected the shape of a {tuple(a.shape)}, got {tuple(b.shape)}")
    if a.dim() == 0:
        raise ValueError("a: expected at least one dimension (time)")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -a.dim() <= dim < a.dim():
        raise ValueError(f"dim: expected a dimension of a {tuple(a.shape)}, got {dim!r}")
    at, bt = (x.double().movedim(dim, -1) for x in (a, b))
    n = at.shape[-1]
    if x0 is not None:
        check_float("x0", x0)
        if x0.shape != at.shape[:-1]:
            raise ValueError(f"x0: expected shape {tuple(at.shape[:-1])}, got {tuple(x0.shape)}")
        x0d = x0.double()
    else:
        x0d = torch.zeros(at.shape[:-1], dtype=torch.float64)
    bt_ = n if block is None else min(check_int("block", block, 1), max(n, 1))
    nc = math.ceil(n / bt_) if n else 0
    u = precision.compute.u
    ue = u * (1 + 8 * u) + 8 * U64
    kx, ka = KERNEL_ULPS.exp, KERNEL_ULPS.exp_arg
    kl = KERNEL_ULPS.log
    la, lb, l0 = at.abs().log(), bt.abs().log(), x0d.abs().log()
    fin = lambda x: torch.where(torch.isfinite(x), x.abs(), torch.zeros_like(x))
    s_a = fin(la).sum(-1)  # sum of |log|a_t|| over the sequence
    l_b = torch.maximum(fin(lb).amax(-1) if n else torch.zeros_like(l0), fin(l0))
    # combines on any term's path: the Hillis-Steele scan, then one carry combine per chunk
    path = math.ceil(math.log2(bt_)) + nc + 1
    # |log| of every sum of terms (T-like) and of every operand log that errors scale with
    lam = l_b + s_a + math.log(n + 1) + 1.0
    # one combine, relative to |X| + |Y| (docs/kernels.md, "Recurrence"): exp(mn - mx)
    # (ulps, and its argument error, at most (1+a) u |X| whatever the ratio), the add
    # 1 +- e, the log (floor and ulps of |log r| <= |log|z|| + |mx|), the add mx + log r
    # and the log-product add, each an exponent error times a modulus bounded via T.
    eps_e = 2 * kx * u + (1 + ka) * ue + precision.compute.min_normal
    delta = LOG_ABS_FLOOR + 2 * kl * u * 2 * lam + 2 * ue * lam
    eta = (1 + eps_e) * (1 + u) * torch.exp(delta) - 1
    eps_in = torch.expm1((n + 1) * LOG_ABS_FLOOR + 2 * kl * u * (s_a + lam))
    eps_out = (1 + 2 * kx * u) * torch.exp(ka * ue * lam) - 1
    rel = (1 + eps_in) * torch.exp(path * torch.log1p(eta)) * (1 + eps_out) - 1
    # T_t in log space (float64, no overflow): lT_t = logaddexp(log|a_t| + lT_{t-1}, log|b_t|)
    lt = l0
    ltl, xs = [], []
    x = x0d
    for t in range(n):
        lt = torch.logaddexp(la[..., t] + lt, lb[..., t])
        x = at[..., t] * x + bt[..., t]
        ltl.append(lt)
        xs.append(x)
    if n == 0:
        return torch.zeros_like(at).movedim(-1, dim)
    lT = torch.stack(ltl, -1)
    x64 = torch.stack(xs, -1)
    T = torch.exp(lT) * (1 + 4 * n * U64)  # float64 logaddexp chain: relative few-ulp per step
    # |x_t| <= |x64_t| + gamma_{2t}(u64) T_t (float64 forward recurrence), else T_t
    steps = torch.arange(1, n + 1, dtype=torch.float64)
    x_up = torch.minimum(
        T, torch.nan_to_num(x64.abs(), posinf=math.inf) + 2 * steps * 1.01 * U64 * T
    )
    err = rel.unsqueeze(-1) * T + precision.compute.min_normal
    if precision.storage != precision.compute:
        err = err + store_error(x_up + err, precision.storage, precision.rounding)
    err = torch.where(x_up + err < precision.compute.max, err, torch.full_like(err, math.inf))
    nan = torch.isnan(at) | torch.isnan(bt)
    nan[..., 0] |= torch.isnan(x0d)
    err = torch.where(torch.cumsum(nan.int(), -1) > 0, torch.full_like(err, math.nan), err)
    return upper(err, 60).movedim(-1, dim)
