"""Rounding bounds of computation graphs, one method at a time.

``rounding_bound(method, q, k, v, precision, ...)`` returns the sound rounding part of
:func:`attnprec.analysis.bounds.attention_error_bound` on inputs taken as stored (no
quantization, no approximation): a float64 tensor bounding ``|computed - exact|``
elementwise for every evaluation order the declared precision allows (docs/bounds.md,
docs/kernels.md). ``recurrence_rounding_bound(a, b, x0, precision, ...)`` bounds the
kernels' signed log-space scan ``x_t = a_t x_{t-1} + b_t``.

Models (sound for a GPU and for the Triton CPU interpreter): elementwise operations round
once in ``precision.compute``, products and sums in ``precision.accumulate`` in any order;
exp, log and division within the declaration's elementary model
(:meth:`attnprec.analysis.precision.Precision.op_error`); every exp, product or sum that
may underflow adds an absolute ``min_normal`` of its format (flush to zero included); a
quantity that may overflow makes the bound ``inf``.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from attnprec._validate import check_float, check_int
from attnprec.analysis.bounds.rounding import U64, excess, exp_up, store_error, upper
from attnprec.analysis.precision import Precision
from attnprec.methods import NAMES

__all__ = ["GRAPH_METHODS", "rounding_bound", "recurrence_rounding_bound"]

#: Methods with a rounding bound (every method of the table).
GRAPH_METHODS = NAMES


def _check_precision(precision: object) -> Precision:
    if not isinstance(precision, Precision):
        raise TypeError(f"precision: expected a Precision, got {type(precision).__name__}")
    return precision


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
    r"""Elementwise bound on the rounding error of ``method`` computed in ``precision``.

    Parameters
    ----------
    method : str
        One of :data:`GRAPH_METHODS` (``"linear"`` over given features: ``q``, ``k`` are
        ``phi_q``, ``phi_k``; ``feature_map`` must be absent or None).
    q, k, v : torch.Tensor
        The inputs as stored (any float dtype; taken as exact; values not representable in
        ``precision.storage`` are rounded to it first).
    precision : Precision
        The declaration (``attnprec.kernels.precision_for`` for the kernels).
    causal : bool
        Causal graph (requires ``n_q == n_k``).
    scale : float, optional
        As the method (``log``: default 1; linear: none).
    block : int, optional
        Keys per block of the schedule, overriding ``precision.block`` (None: the
        declaration's).
    **params
        The method's keywords (``degree``, ``coeffs``, ``projection``, ``log_g``, ...), and
        :func:`.attention.attention_error_bound`'s ``rows``, ``seed`` and ``evaluation``.
        Only the rounding part is evaluated (no quantization, no approximation: for
        taylor, polynomial and favor this skips their softmax target).

    Returns
    -------
    torch.Tensor
        float64 ``[..., n_q, d_v]``: ``|computed - exact| <=`` this, elementwise; ``inf``
        where an intermediate may overflow or the normalizer may vanish; NaN where the
        inputs are NaN.

    Raises
    ------
    ValueError
        Unknown method or parameters, shapes (as :func:`attnprec._validate.check_qkv`).
    TypeError
        ``precision`` not a Precision, non-float inputs.
    """
    from attnprec.analysis.bounds.attention import _error_bound

    if method not in GRAPH_METHODS:
        raise ValueError(f"method: expected one of {GRAPH_METHODS}, got {method!r}")
    precision = _check_precision(precision)
    if block is not None:
        precision = replace(precision, block=check_int("block", block, 1))
    params.pop("chunk_size", None)
    if method == "linear":  # our kernels take given features (the method's default is elu1)
        params.setdefault("feature_map", None)
    if any(bool(torch.isnan(x).any()) for x in (q, k, v)):
        return _nan_bound(method, q, k, v, precision, causal, scale, params)
    eb = _error_bound(
        method, q, k, v, precision, causal=causal, scale=scale, rounding_only=True, **params
    )
    return eb.rounding


def _nan_bound(method, q, k, v, precision, causal, scale, params):  # type: ignore[no-untyped-def]
    """NaN inputs: NaN where the NaN reaches (as the kernels propagate it), else the bound
    of the inputs with the NaNs replaced by 0 (the other outputs do not depend on them)."""
    from attnprec.analysis.reference import _nan_mask

    cq, ck, cv = (torch.nan_to_num(x.double(), nan=0.0) for x in (q, k, v))
    b = rounding_bound(method, cq, ck, cv, precision, causal=causal, scale=scale, **params)
    reach = _nan_mask(q, k, v, causal, [], None)
    return torch.where(reach, math.nan, b)


def _magnitudes_up(
    lT: torch.Tensor, la: torch.Tensor, lb: torch.Tensor, l0: torch.Tensor
) -> torch.Tensor:
    """Upper bounds of ``T_t = |a_t| T_{t-1} + |b_t|`` (``T_0 = |x_0|``) from their float64
    logs ``lT_t = logaddexp(log|a_t| + lT_{t-1}, log|b_t|)`` (``la``, ``lb``: ``[..., n]``,
    ``l0``: ``[...]``). Each step's addition and logaddexp err by a few u64 of the moduli
    of their operands and result, absolutely in the log (a review: up to 546 u64 under
    ``T`` at ``|lT| ~ 80`` when charged as relative), and pass to every later step with a
    weight at most 1."""
    fin = lambda x: torch.where(torch.isfinite(x), x.abs(), torch.zeros_like(x))  # noqa: E731
    prev = torch.cat([fin(l0).unsqueeze(-1), fin(lT[..., :-1])], -1)
    step = 4 * U64 * (fin(la) + fin(lb) + 2 * prev + fin(lT))
    return exp_up(lT + upper(torch.cumsum(step, -1), lT.shape[-1] + 4))


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
    el = precision.elementary
    kx = precision.op_error("exp") / (2 * u)  # in ulps of compute
    ka = el.exp_arg
    kl = precision.op_error("log") / (2 * u)
    log_floor = precision.log_floor()
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
    delta = log_floor + 2 * kl * u * 2 * lam + 2 * ue * lam
    # each (1 + e)... - 1 formed from logs (rounding.excess: no cancellation)
    eta = excess(math.log1p(eps_e) + math.log1p(u) + delta)
    eps_in = excess((n + 1) * log_floor + 2 * kl * u * (s_a + lam))
    eps_out = excess(math.log1p(2 * kx * u) + ka * ue * lam)
    rel = excess(torch.log1p(eps_in) + path * torch.log1p(eta) + torch.log1p(eps_out))
    # T_t in log space (float64, no overflow): lT_t = logaddexp(log|a_t| + lT_{t-1}, log|b_t|)
    # A subnormal input may be flushed (or, under the Triton interpreter, a bfloat16 one
    # loaded as another subnormal): off by less than min_normal, an error carried by every
    # later gate. E_t = |a~_t| E_{t-1} + d(b_t) + d(a_t) T_{t-1} bounds it (d(x) =
    # min_normal where 0 < |x| < min_normal, |a~_t| <= |a_t| + d(a_t)); it passes the same
    # combines as the terms (rel).
    mn = precision.compute.min_normal
    sub = lambda x: torch.where((x != 0) & (x.abs() < mn), mn, 0.0)  # noqa: E731
    lt = l0
    ltl, xs, es = [], [], []
    x = x0d
    e = sub(x0d)
    for t in range(n):
        da = sub(at[..., t])
        e = (at[..., t].abs() + da) * e + sub(bt[..., t]) + da * torch.exp(lt)
        lt = torch.logaddexp(la[..., t] + lt, lb[..., t])
        x = at[..., t] * x + bt[..., t]
        ltl.append(lt)
        xs.append(x)
        es.append(e)
    if n == 0:
        return torch.zeros_like(at).movedim(-1, dim)
    lT = torch.stack(ltl, -1)
    x64 = torch.stack(xs, -1)
    T = _magnitudes_up(lT, la, lb, l0)
    # |x_t| <= |x64_t| + gamma_{2t}(u64) T_t (float64 forward recurrence), else T_t
    steps = torch.arange(1, n + 1, dtype=torch.float64)
    x_up = torch.minimum(
        T, torch.nan_to_num(x64.abs(), posinf=math.inf) + 2 * steps * 1.01 * U64 * T
    )
    E = torch.stack(es, -1) * (1 + 4 * n * U64) * (1 + rel.unsqueeze(-1))
    err = rel.unsqueeze(-1) * T + E + precision.compute.min_normal
    if precision.output_format != precision.compute:  # the store (the output format)
        err = err + store_error(x_up + err, precision.output_format, precision.rounding)
    err = torch.where(x_up + err < precision.compute.max, err, torch.full_like(err, math.inf))
    nan = torch.isnan(at) | torch.isnan(bt)
    nan[..., 0] |= torch.isnan(x0d)
    err = torch.where(torch.cumsum(nan.int(), -1) > 0, torch.full_like(err, math.nan), err)
    return upper(err, 60).movedim(-1, dim)
