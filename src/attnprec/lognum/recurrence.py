"""The diagonal linear recurrence x_t = a_t x_{t-1} + b_t as a parallel signed log-space scan."""

from __future__ import annotations

import math
from typing import Any

import torch

from ._checks import COMPUTE, check_dim, check_float
from .elementwise import _shift_log64
from .reductions import _combine, _renormalize
from .signed import SignedLog

__all__ = ["linear_recurrence"]


def _as_log(name: str, x: object) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """(log|x|, sign x) in float64 and the dtype of the result, for a tensor or SignedLog."""
    if isinstance(x, SignedLog):
        return x._log.to(COMPUTE), x._sign.to(COMPUTE), x.dtype
    x = check_float(name, x)
    x64 = x.to(COMPUTE)
    sign = torch.where(torch.isnan(x64), 1.0, torch.sign(x64))
    return torch.log(torch.abs(x64)), sign, x.dtype


def linear_recurrence(
    a: torch.Tensor | SignedLog,
    b: torch.Tensor | SignedLog,
    x0: torch.Tensor | SignedLog | None = None,
    dim: int = -1,
) -> torch.Tensor | SignedLog:
    r"""Solve ``x_t = a_t x_{t-1} + b_t`` for all ``t`` at once (``x_0 = x0``, default 0).

    This is the diagonal recurrence under gated linear attention and selective
    state-space models, computed as a parallel (Hillis-Steele) scan over the pairs
    ``(a_t, b_t)`` with the associative rule
    ``(A1, B1) then (A2, B2) = (A1 A2, A2 B1 + B2)``, all in signed log space: products
    add logs and multiply signs exactly, sums use exact shifts (the larger log of the
    two operands), so values far beyond float range neither overflow nor underflow,
    signs are exact, and ``a_t = 0`` simply restarts the recurrence (nothing is divided).

    Parameters
    ----------
    a, b : torch.Tensor or SignedLog
        Coefficients of broadcastable shapes: plain real float tensors of any sign
        (zeros allowed) or :class:`SignedLog` values.
    x0 : torch.Tensor or SignedLog, optional
        Initial state, broadcastable to the shape without ``dim``.
    dim : int
        The time dimension.

    Returns
    -------
    torch.Tensor or SignedLog
        ``x_1 .. x_n`` along ``dim``. A :class:`SignedLog` when any input is one
        (no overflow), otherwise a float tensor in the promoted dtype (values beyond
        its range overflow to ``+-inf`` as float arithmetic would). NaN inputs make
        the affected states NaN; infinite ones give what the float loop gives (an
        infinite state stays infinite, ``inf - inf`` and ``0 * inf`` are NaN), except
        that without ``x0`` the first state is ``b_1`` (there is no ``a_1 x0`` term, so
        ``a_1 = inf`` does not make it NaN).

    Notes
    -----
    Computed in float64 (``u = 2^-53``) and rounded once. Each ``x_t`` is the root of
    a tree of depth ``L = ceil(log2 n)`` (+1 for ``x0``); along it every term
    ``b_j prod_{i=j+1..t} a_i`` picks up per level one rounding of a sum of logs
    (``<= u Lambda``), one of the shifted difference and its ``exp`` (``<= 2u Lambda
    + 2u``), with ``Lambda = sum_i |log|a_i|| + max_j |log|b_j|| + |log|x0||`` over the
    nonzero values of the whole sequence along ``dim`` (one ``Lambda`` for every ``t``).
    Hence

    .. math:: |\hat x_t - x_t| \le (e^{\delta} - 1)(1 + u_{out}) T_t + u_{out} |x_t|
              + \eta_{out},
              \quad \delta = (L + 3)\,u\,(4 \Lambda + 4),

    where ``T_t = sum_j |b_j prod a| + |x0 prod a|`` (the same recurrence on absolute
    values), ``u_out`` is the unit roundoff of the output dtype and ``eta_out`` half
    its smallest subnormal (float output only: results below it underflow to 0, as
    float arithmetic would). A :class:`SignedLog` result stores ``log|x_t|`` rounded to
    its log dtype instead, so there ``u_out |x_t|`` becomes ``rho (|x_t| + e_t)`` with
    ``rho = expm1(u_out |log|x_hat_t|| / (1 - u_out))`` and ``e_t`` the first term (no
    ``eta_out``): float32 logs of states near ``e^1000`` are within ``1.2e-4`` relative, not
    ``6e-8``. The sign is exact wherever this bound is below ``|x_t|``; the scan promises
    no exact zeros (a state computed as ``(-inf, 0)`` is one within the bound, which
    ``sum`` and ``cumsum`` do not return for a nonzero sum).
    Measured errors against a float64 loop are in docs/benchmarks.md.
    """
    tensors = [t for t in (a, b, x0) if isinstance(t, torch.Tensor)]
    if (
        len(tensors) == (2 if x0 is None else 3)
        and torch.is_grad_enabled()
        and any(t.requires_grad for t in tensors)
    ):
        x0_ = torch.zeros(()) if x0 is None else x0
        out: torch.Tensor = _RecurrenceFn.apply(a, b, x0_, x0 is not None, dim)
        return out
    return _scan(a, b, x0, dim)


def _in_order(
    m: torch.Tensor,
    s: torch.Tensor,
    a: tuple[torch.Tensor, torch.Tensor],
    b: tuple[torch.Tensor, torch.Tensor],
    x0: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The states ``(m, s) [..., n]``, those from each sequence's first inf or NaN
    coefficient on (logs and signs ``a``, ``b`` ``[..., n]``; ``x0`` ``[...]``) redone step
    by step, as the float loop: the tree forms the terms ``b_j prod a`` apart, which makes
    ``inf - inf`` or ``0 * inf`` where the loop, collapsing ``a_2 b_1 + b_2`` first, does
    not, and the reverse (a review: ``a = [1, -1, inf]``, ``b = [1, 2, 0]`` gave NaN for
    the loop's inf). From there every state is inf or NaN, exactly; the finite states
    before stay the tree's (within its bound, whose depth is ``log2 n``, not ``n``)."""
    (la, sa), (lb, sb) = a, b
    bad = torch.isnan(la) | (la == math.inf) | torch.isnan(lb) | (lb == math.inf)
    if x0 is not None and bad.shape[-1]:
        bad[..., 0] |= torch.isnan(x0[0]) | (x0[0] == math.inf)
    odd = bad.any(-1)
    if not bool(odd.any()):
        return m, s
    la, sa, lb, sb, first = la[odd], sa[odd], lb[odd], sb[odd], bad[odd].int().argmax(-1)
    m, s = m.clone(), s.clone()  # (m may be b's own logs)
    mo, so = m[odd], s[odd]
    for t in range(int(first.min()), la.shape[-1]):
        if t > 0:
            pm, ps = mo[:, t - 1], so[:, t - 1]
        elif x0 is not None:
            pm, ps = x0[0][odd], x0[1][odd]
        else:
            continue  # (the first state is b_1, as the tree has it)
        pm = torch.where(ps == 0, -math.inf, pm)  # (a zero state as a log: inf * 0 is NaN)
        nm, ns = _renormalize(*_combine(la[:, t] + pm, sa[:, t] * ps, lb[:, t], sb[:, t]))
        now = t >= first
        mo[:, t], so[:, t] = torch.where(now, nm, mo[:, t]), torch.where(now, ns, so[:, t])
    m[odd], s[odd] = mo, so
    return m, s


class _RecurrenceFn(torch.autograd.Function):
    """:func:`linear_recurrence` of plain tensors with its adjoint as the backward pass.

    Autograd through the log-space scan differentiates ``log|a|`` (infinite at ``a = 0``)
    and the shifts: wrong where a state is exactly 0 (``a = [1, 1, .5]``, ``b = [0, 1,
    -.5]``: ``d sum(x) / d a`` came out ``[0, 0, 0]``, exactly ``[0, 0, 1]``; ``d / d b``
    ``[nan, 1, 0]``, exactly ``[2.5, 1.5, 1]``). With ``g`` the upstream gradient, ``lam_t
    = g_t + a_{t+1} lam_{t+1}`` is the same recurrence backwards (this function again),
    ``dL/db_t = lam_t``, ``dL/da_t = lam_t x_{t-1}`` (``x_0 = x0``), ``dL/dx0 = a_1 lam_1``,
    evaluated in float64 (first order, not itself differentiable)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, a: torch.Tensor, b: torch.Tensor, x0: torch.Tensor, has_x0: bool, dim: int
    ) -> torch.Tensor:
        x = _scan(a.detach(), b.detach(), x0.detach() if has_x0 else None, dim)
        assert isinstance(x, torch.Tensor)  # plain tensors in, a tensor out
        ctx.save_for_backward(a, b, x0, x)
        ctx.has_x0, ctx.dim = has_x0, dim
        return x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        a, b, x0, x = ctx.saved_tensors
        shape = torch.broadcast_shapes(a.shape, b.shape)
        d = check_dim("dim", ctx.dim, len(shape))
        a64, b64 = (t.to(COMPUTE).expand(shape).movedim(d, -1) for t in (a, b))
        g64, x64 = (t.to(COMPUTE).movedim(d, -1) for t in (g, x))
        # lam backwards: step k of the reversed recurrence takes the gate a_{t+1}
        a_next = torch.cat([torch.zeros_like(a64[..., :1]), a64[..., 1:].flip(-1)], -1)
        lam_rev = _scan(a_next, g64.flip(-1), None, -1)
        assert isinstance(lam_rev, torch.Tensor)
        lam = lam_rev.flip(-1)
        x_prev = torch.zeros_like(x64[..., :1])
        if ctx.has_x0:
            x_prev = x0.to(COMPUTE).expand(shape[:d] + shape[d + 1 :]).unsqueeze(-1)
        x_prev = torch.cat([x_prev, x64[..., :-1]], -1)
        ga, gb = (lam * x_prev).movedim(-1, d), lam.movedim(-1, d)
        out_a = _reduce_to(ga, a) if ctx.needs_input_grad[0] else None
        out_b = _reduce_to(gb, b) if ctx.needs_input_grad[1] else None
        out_x0 = None
        if ctx.has_x0 and ctx.needs_input_grad[2]:
            out_x0 = _reduce_to(a64[..., 0] * lam[..., 0], x0)
        return out_a, out_b, out_x0, None, None


def _reduce_to(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``g`` summed over the dims ``like`` was broadcast along, in ``like``'s dtype."""
    while g.ndim > like.ndim:
        g = g.sum(0)
    for i, n in enumerate(like.shape):
        if n == 1 and g.shape[i] != 1:
            g = g.sum(i, keepdim=True)
    return g.to(like.dtype)


def _scan(
    a: torch.Tensor | SignedLog,
    b: torch.Tensor | SignedLog,
    x0: torch.Tensor | SignedLog | None,
    dim: int,
) -> torch.Tensor | SignedLog:
    """:func:`linear_recurrence`'s evaluation (autograd through the scan for SignedLog
    inputs)."""
    la, sa, dta = _as_log("a", a)
    lb, sb, dtb = _as_log("b", b)
    dt = torch.promote_types(dta, dtb)
    try:
        la, sa, lb, sb = torch.broadcast_tensors(la, sa, lb, sb)
    except RuntimeError:
        raise ValueError(
            f"b: shape {tuple(lb.shape)} does not broadcast with a {tuple(la.shape)}"
        ) from None
    if la.ndim == 0:
        raise ValueError("a: expected at least one dimension (time)")
    d = check_dim("dim", dim, la.ndim)
    la, sa, lb, sb = (t.movedim(d, -1).contiguous() for t in (la, sa, lb, sb))
    a_in, b_in = (la, sa), (lb, sb)
    n, off = la.shape[-1], 1
    m, s = lb, sb
    while off < n:
        la1, sa1, m1, s1 = la[..., :-off], sa[..., :-off], m[..., :-off], s[..., :-off]
        la2, sa2, m2, s2 = la[..., off:], sa[..., off:], m[..., off:], s[..., off:]
        nm, ns = _combine(la2 + m1, sa2 * s1, m2, s2)
        la = torch.cat([la[..., :off], la1 + la2], -1)
        sa = torch.cat([sa[..., :off], sa1 * sa2], -1)
        m, s = _renormalize(torch.cat([m[..., :off], nm], -1), torch.cat([s[..., :off], ns], -1))
        off *= 2
    any_signed = any(isinstance(t, SignedLog) for t in (a, b, x0))
    x0_in = None
    if x0 is not None:
        l0, s0, dt0 = _as_log("x0", x0)
        dt = torch.promote_types(dt, dt0)
        try:
            l0, s0 = (t.unsqueeze(-1).expand(la.shape) for t in (l0, s0))
        except RuntimeError:
            raise ValueError(
                f"x0: shape {tuple(l0.shape)} does not match {tuple(la.shape[:-1])}"
            ) from None
        x0_in = (l0[..., 0], s0[..., 0]) if n else None
        m, s = _combine(la + l0, sa * s0, m, s)
    m, s = _in_order(m, s, a_in, b_in, x0_in)
    log = _shift_log64(m, s)
    sign = torch.where(log == -math.inf, 0.0, torch.nan_to_num(torch.sign(s), nan=1.0))
    log, sign = log.movedim(-1, d), sign.movedim(-1, d)
    if any_signed:
        return SignedLog._from64(log, sign, SignedLog._log_dtype_of(dt))
    return (sign * torch.exp(log)).to(dt)
