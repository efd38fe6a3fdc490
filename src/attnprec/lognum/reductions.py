"""Signed log-space reductions: sums, prefix sums, matrix products, and their error bound.

All reductions compute in float64 with exact shifts: every term is scaled by
``exp(l_i - m)`` where ``m`` is itself one of the input logs, so no term overflows,
nothing is rounded to a finite floor, and an exactly cancelling sum gives an exact
zero, returned as ``(-inf, sign 0)``. Two faster paths need no shift and are at least
as accurate. Sums of signed terms (``SignedLog`` data, unit weights) are first
summed as ``exp(l_i)`` directly, and a slice is kept when its float64 total shows
that nothing overflowed or underflowed (:func:`_sum_direct`). Prefix sums with unit
weights are summed directly when their logs lie in ``[-600, 700 - log n]`` (checked per
call): there ``exp(l_i)`` is a normal float64 and no partial sum overflows. The
error guarantee of every function here is :func:`signed_sum_error_bound`.
"""

from __future__ import annotations

import math
import threading
from typing import Literal, overload

import torch

from ._checks import COMPUTE, broadcast, broadcast_shapes, check_dim, check_float, out_dtype
from ._dd import exp_dd, extract_sum, shift_log_dd, two_prod, two_sum
from .elementwise import _shift_log64

__all__ = [
    "SIGNED_SUM_C",
    "log_matmul_exp",
    "logcumsumexp",
    "logsumexp",
    "signed_sum_error_bound",
]

#: The constant c of :func:`signed_sum_error_bound` (derived in its docstring).
SIGNED_SUM_C = 4.0
_U64 = 2.0**-53
# Prefix sums use a shift per block of this many elements...
_BLOCK = 1024
# ...unless a prefix inside the block lies this far (in log) below the shift, where
# exp(l - shift) could underflow; such blocks take the exact scan instead.
_SAFE_RANGE = 600.0
# Mantissas of the exact scan are renormalized into the log when they fall below this.
_TINY = 2.0**-200
# Direct prefix sums: with every nonzero term's log in [_DIRECT_LO, _DIRECT_HI - log n],
# the terms exp(l) are normal floats and no partial sum of n of them overflows.
_DIRECT_LO = -600.0
_DIRECT_HI = 700.0
# Sums work through pieces of about this many elements in reused float64 buffers: a
# fresh buffer of the full size costs more in page faults than the exp, and many small
# pieces cost a parallel region each (slow when the cores are shared).
_PIECE = 1 << 20
# The double-double float64 sums (_sum_dd) make ~90 passes: pieces that stay in cache.
_PIECE_DD = 1 << 16
# A direct sum is accepted a posteriori when its float64 total is finite and at least
# this: terms that underflow then lose at most 2^-1074 each, n 2^-274 of the total.
_DIRECT_MIN = 2.0**-800
# ...and is tried only where the largest of about this many sampled logs is in range.
_PROBE = 1024
# Per-thread CPU scratch for the pieces (see _scratch).
_SCRATCH = threading.local()


def _scratch(shape: tuple[int, ...], device: torch.device, slot: int = 0) -> torch.Tensor:
    """An uninitialized float64 buffer of ``shape``; on the CPU, a view of one block of
    ``_PIECE`` elements kept per thread and ``slot`` (8 MB each). A fresh buffer that
    large is mapped anew by the allocator on most calls, and its first touch (a page
    fault per 4 KiB) then costs as much as the ``exp`` that fills it; other devices
    cache their allocations themselves."""
    numel = math.prod(shape)
    if device.type != "cpu" or numel > _PIECE:
        return torch.empty(shape, dtype=COMPUTE, device=device)
    blocks = _SCRATCH.__dict__.setdefault("blocks", {})
    block = blocks.get(slot)
    if block is None or block.numel() < numel:
        block = blocks[slot] = torch.empty(_PIECE, dtype=COMPUTE)
    return block[:numel] if len(shape) == 1 else block[:numel].view(shape)


def _unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2  # eps = 2^(1-p), u = 2^-p


def signed_sum_error_bound(
    n: int | torch.Tensor,
    log_abs_sum: torch.Tensor | float,
    log_abs_value: torch.Tensor | float,
    dtype: torch.dtype = torch.float64,
    term_log_error: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    r"""A bound on the log-domain error of every signed reduction in ``lognum``.

    For a sum ``s = sum_i x_i`` of ``n`` terms given in log space, the computed
    ``log|s|`` (from :func:`logsumexp`, :func:`logcumsumexp`, :func:`log_matmul_exp`,
    ``SignedLog.sum``/``cumsum``/``@``) satisfies

    .. math::
        |\widehat{\log|s|} - \log|s|| \le -\log(1 - r) + e_{ulp},
        \qquad r = c\,(n + 2)\,u\,\kappa + (e^{\epsilon} - 1)\,\kappa,
        \qquad \kappa = \frac{\sum_i |x_i|}{|\sum_i x_i|},

    with ``u = 2^-53`` (all reductions run in float64), ``c = SIGNED_SUM_C = 4``,
    ``epsilon = term_log_error`` (an absolute error already present in the logs of the
    terms, e.g. ``u |a_ik + b_kj|`` for the sums of logs inside a matrix product), and
    ``e_ulp = u (2 log(n kappa) + 2 |log|s|| + 4)`` for the final ``log`` and shift
    (the shift is folded into the log of the mantissa's binary exponent, so a large
    ``log`` of a small mantissa never costs an ulp of its own magnitude), plus
    one rounding ``u_out (|log|s|| + bound)`` to a narrower output dtype. Wherever
    ``r < 1`` the computed sign is the exact sign; elsewhere the bound is ``inf``.

    Parameters
    ----------
    n : int or torch.Tensor
        Number of terms (zeros included).
    log_abs_sum : torch.Tensor or float
        ``log(sum_i |x_i|)``.
    log_abs_value : torch.Tensor or float
        ``log|sum_i x_i|`` (``-inf`` for an exact zero, giving an infinite bound).
    dtype : torch.dtype
        Dtype of the returned logs (sets the final rounding ``u_out``).
    term_log_error : torch.Tensor or float
        Absolute error bound of the logs of the terms, 0 when they are inputs.

    Returns
    -------
    torch.Tensor
        float64 bound, broadcast over the arguments; ``inf`` where ``r >= 1``.

    Notes
    -----
    Derivation of ``c`` (``u = 2^-53``; torch's float64 ``exp`` is correct to 1 ulp,
    i.e. relative ``2u``). Scale by ``m``, the largest log (an input, so the largest
    term is exactly 1) and write ``T = sum |x_i| / e^m >= 1``.

    * ``d_i = fl(l_i - m)`` has relative error ``u``, so ``exp(d_i)`` is off by a
      factor ``exp(u |d_i|)``; ``|d| e^d <= 1/e`` bounds this part by ``n u / e``
      (in units of ``e^m``, so relative to ``T >= 1``), and ``exp`` itself adds
      ``2u T``.
    * Summing the scaled terms in any order: ``gamma_{n-1} T ~ (n-1) u T``.
    * Prefix sums shift each block of 1024 by its largest log, which need not be in
      a given prefix, so there ``l_i - shift`` is formed exactly (TwoSum) and only
      the ``2u`` of ``exp`` remains; they add one rescale of the block
      (``2u T + n u / e``) and the exact-shift scan across blocks
      (``3 log2(n) u T + n u / e``); the last subtraction or ``log1p`` argument
      ``u T``.

    * Direct paths, no shift: prefix sums with unit weights and every nonzero term's
      log in ``[-600, 700 - log n]``; sums of signed terms without autograd, a slice
      kept where its float64 total ``t`` has ``2^-800 <= |t| < inf`` (an overflow
      anywhere leaves inf or NaN). Each normal ``exp(l_i)`` is off by ``2u``, then
      ``gamma_{n-1} T`` for the (prefix) summation, in pieces or not; the final
      ``log`` (no shift to fold in) rounds by ``u |log|s||``, within ``e_ulp``. Terms
      that underflow lose at most ``2^-1074`` each, ``n 2^-274 T`` in a kept sum.

    * float64 results of sums and matrix products without autograd (double-double,
      ``lognum/_dd.py``): ``l_i - m`` exact, each term to ``2^-66`` relative; the leading
      parts of a piece of ``k <= 2^16`` terms split twice into parts on a common grid
      (summed exactly) and remainders of at most ``(k + 1)^2 2^-102`` (in units of
      ``e^m`` times the largest weight), these and the low parts summed in float64,
      the pieces and the final log combined by TwoSum: below ``2^-12 u T`` plus the
      final rounding of the log, far inside the bound. These results are the exact log
      rounded once up to ``2^-64`` relative to ``max(|log|s||, 1)`` (tested).

    In total at most ``(3n/e + n + 3 log2 n + 6) u T <= 4 (n + 2) u T`` for every
    ``n >= 1``; dividing by ``|s| / e^m`` turns ``T`` into ``kappa``. A relative error
    ``r < 1`` of the sum is an error ``<= -log(1 - r)`` of its log and cannot flip
    the sign.
    """
    n_t = torch.as_tensor(n, dtype=COMPUTE)
    las = torch.as_tensor(log_abs_sum, dtype=COMPUTE)
    lav = torch.as_tensor(log_abs_value, dtype=COMPUTE)
    eps = torch.as_tensor(term_log_error, dtype=COMPUTE)
    log_kappa = torch.clamp(las - lav, min=0.0)
    kappa = torch.exp(log_kappa)
    r = (SIGNED_SUM_C * (n_t + 2) * _U64 + torch.expm1(eps)) * kappa
    core = torch.where(r < 1, -torch.log1p(-torch.where(r < 1, r, 0.0)), math.inf)
    ulp = _U64 * (2 * (torch.log(n_t) + log_kappa + torch.abs(lav)) + 4)
    bound = core + ulp
    u_out = _unit_roundoff(dtype)
    if dtype != torch.float64:
        bound = bound * (1 + u_out) + u_out * torch.abs(lav)
    return torch.where(torch.isfinite(lav), bound, math.inf)


# --- float64 cores on (log, weight) pairs; a term is w_i * exp(l_i) -----------------


def _inf_terms(l: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks of +inf terms with positive and negative weight."""
    pinf = torch.isposinf(l) & (w != 0)
    return pinf & (w > 0), pinf & (w < 0)


def _apply_inf(
    log: torch.Tensor, sgn: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Overwrite results that contain +inf terms: inf with their sign, NaN for inf - inf."""
    both = pos & neg
    log = torch.where(pos | neg, torch.where(both, math.nan, math.inf), log)
    sgn = torch.where(pos & ~neg, 1.0, torch.where(neg & ~pos, -1.0, sgn))
    return log, torch.where(both, 1.0, sgn)


def _scaled_terms(
    l: torch.Tensor, shift: torch.Tensor, w: torch.Tensor, exact: bool = False
) -> torch.Tensor:
    """``w * exp(l - shift)`` in float64; in place on one fresh buffer unless autograd
    needs the intermediates (fresh large buffers cost page faults on every call).

    ``exact``: form ``l - shift`` as a double-double (TwoSum) and apply the low part
    as ``(1 + lo)``. Needed where the shift is not the largest log of every prefix
    (blocked prefix sums): the rounding of ``l - shift`` would otherwise cost a
    relative ``u |l - shift|`` per term.
    """
    if l.requires_grad or shift.requires_grad:
        l64 = l.to(COMPUTE)
        d = l64 - shift
        if exact:
            with torch.no_grad():  # a correction of relative size u: its gradient is negligible
                v = d - l64
                lo = torch.nan_to_num(
                    (l64 - (d - v)) - (shift + v), nan=0.0, posinf=0.0, neginf=0.0
                )
            return w.to(COMPUTE) * torch.exp(d) * (1 + lo)
        return w.to(COMPUTE) * torch.exp(d)
    # Widen first: mixed-dtype elementwise ops take a slow, unvectorized cast path.
    d = l - shift if l.dtype == COMPUTE else l.to(COMPUTE).sub_(shift)
    w = w.to(COMPUTE)
    if exact:
        v = d - l
        lo = torch.sub(d, v)
        torch.sub(l, lo, out=lo)
        lo.sub_(v.add_(shift)).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).add_(1.0)
        return d.exp_().mul_(lo).mul_(w)
    return d.exp_().mul_(w)


def _direct_ok(lo: torch.Tensor, hi: torch.Tensor, n: int) -> bool:
    """Whether logs with finite minimum ``lo`` and maximum ``hi`` can skip the shift."""
    return bool(lo >= _DIRECT_LO) and bool(hi <= _DIRECT_HI - math.log(n))


def _direct_terms(l: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``w * exp(l)`` in float64, out of place for autograd (see :func:`_direct_ok`)."""
    return torch.exp(l.to(COMPUTE)) * w.to(COMPUTE)


def _narrow(t: torch.Tensor, dim: int, start: int, k: int) -> torch.Tensor:
    """``t.narrow(dim, start, k)``, or ``t`` where that is all of it (small operations
    cost microseconds each, a tenth of a 10^6-term sum together)."""
    return t if start == 0 and k == t.shape[dim] else t.narrow(dim, start, k)


def _exp_sum(
    l: torch.Tensor, w: torch.Tensor, dim: int, shift: torch.Tensor | None, weighted: bool
) -> torch.Tensor:
    """``sum(w * exp(l - shift))`` along ``dim`` (kept) in float64, piece by piece.

    ``shift=None``: the direct path (callers check :func:`_direct_ok`, or the total).
    ``weighted=False``: ``w`` is 1, or 0 where ``exp(l) = 0``, and is not read.
    """
    if l.requires_grad or w.requires_grad:
        e = _direct_terms(l, w) if shift is None else _scaled_terms(l, shift, w)
        return e.sum(dim, keepdim=True)
    n = l.shape[dim]
    step = max(1, _PIECE * n // max(l.numel(), 1))
    shape = list(l.shape)
    shape[dim] = min(step, n)
    buf = _scratch(tuple(shape), l.device)
    wbuf = _scratch(tuple(shape), l.device, 1) if weighted else buf
    total = None
    for start in range(0, n, step):
        k = min(step, n - start)
        b = _narrow(buf, dim, 0, k).copy_(_narrow(l, dim, start, k))
        if shift is not None:
            b.sub_(shift)
        b.exp_()
        if weighted:
            wc = _narrow(wbuf, dim, 0, k).copy_(_narrow(w, dim, start, k))
        if weighted and b.ndim == 1:  # one fused pass
            part = torch.dot(b, wc).reshape(1)
        elif weighted:
            part = b.mul_(wc).sum(dim, keepdim=True)
        else:
            part = b.sum(dim, keepdim=True)
        total = part if total is None else total.add_(part)
    assert total is not None  # callers handle the empty sum
    return total


def _sum_core(
    l: torch.Tensor,
    w: torch.Tensor,
    dim: int,
    keepdim: bool,
    signs_only: bool = False,
    accurate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log|sum_i w_i exp(l_i)| and its sign along ``dim`` (float64 out).

    ``signs_only``: ``w`` holds signs -1, 0, +1, and ``l == -inf`` wherever ``w == 0``
    (SignedLog data, or unit weights); then ``l`` and ``w`` may be the stored float32
    logs and int8 signs, widened inside the float64 operations, and the sums are first
    tried without a shift (:func:`_sum_direct`).

    ``accurate``: the result is wanted in float64; computed in double-double and
    rounded once (:func:`_sum_dd`) unless autograd is on.
    """
    if l.shape[dim] == 0:  # the empty sum is an exact zero
        shape = list(l.shape)
        shape[dim] = 1
        log = torch.full(shape, -math.inf, dtype=COMPUTE, device=l.device)
        sgn = torch.zeros(shape, dtype=COMPUTE, device=l.device)
    elif not signs_only:
        l = torch.where(w == 0, -math.inf, l)  # a zero weight drops the term (SciPy)
        log, sgn = _sum_shifted(l, w, dim, False, accurate)
    elif accurate or l.requires_grad or w.requires_grad:
        # Autograd always shifts: an exp that overflows in a rejected direct attempt
        # would still send 0 * inf = NaN into the gradient.
        log, sgn = _sum_shifted(l, w, dim, True, accurate)
    else:
        log, sgn = _sum_direct(l, w, dim)
    return (log, sgn) if keepdim else (log.squeeze(dim), sgn.squeeze(dim))


def _negative(w: torch.Tensor) -> bool:
    """Whether a weight is negative (a broadcast weight is read once per stored value)."""
    for d, stride in enumerate(w.stride()):
        if stride == 0:
            w = w.narrow(d, 0, min(1, w.shape[d]))
    return w.numel() > 0 and w.amin().item() < 0


def _sum_direct(l: torch.Tensor, w: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed sums (``w`` signs, kept dim) without a shift, each accepted a posteriori.

    A float64 total ``|t| >= _DIRECT_MIN`` that is finite shows that no (partial) sum
    overflowed (an overflow stays inf or becomes NaN) and that terms that underflowed
    lost at most ``n 2^-274`` of it. That saves the pass for the maximum. The other
    slices (zero, NaN, +inf, huge or tiny sums) are summed again with a shift.
    """
    n = l.shape[dim]
    # Speed only: where a sample of the logs lies outside the direct range, most sums
    # would be rejected (after a slow exp of overflowing arguments): shift them at once.
    step = n // max(1, min(n, _PROBE * n // max(l.numel(), 1)))
    top = l[(slice(None),) * dim + (slice(None, None, step),)].amax().item()
    if not (top == -math.inf or _DIRECT_LO <= top <= _DIRECT_HI - math.log(n)):
        return _sum_shifted(l, w, dim, True, False)
    total = _exp_sum(l, w, dim, None, _negative(w))
    a = torch.abs(total)
    log, sgn = torch.log(a), torch.sign(total)
    lo, hi = torch.aminmax(a)
    if lo.item() >= _DIRECT_MIN and hi.item() < math.inf:
        return log, sgn
    ok = (a >= _DIRECT_MIN) & (a < math.inf)  # False for NaN
    rows = (~ok).flatten().nonzero()[:, 0]  # kept-dim order = rows of movedim(dim, -1)
    lr = l.movedim(dim, -1).reshape(-1, n).index_select(0, rows)
    wr = w.movedim(dim, -1).reshape(-1, n).index_select(0, rows)
    rlog, rsgn = _sum_shifted(lr, wr, 1, True, False)
    log.view(-1)[rows] = rlog.flatten()
    sgn.view(-1)[rows] = rsgn.flatten()
    return log, sgn


def _sum_shifted(
    l: torch.Tensor, w: torch.Tensor, dim: int, signs_only: bool, accurate: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_sum_core` (kept dim) with every term shifted by its slice's largest log."""
    m = torch.amax(l, dim, keepdim=True)
    if bool(torch.isposinf(m).any()):
        return _sum_with_inf(l, w, dim, signs_only, accurate)
    m = m.to(COMPUTE)
    ms = torch.where(torch.isfinite(m), m, 0.0)
    if accurate and not (l.requires_grad or w.requires_grad):
        log, sgn = _sum_dd(l, w, dim, ms, signs_only)
    else:
        weighted = not signs_only or _negative(w)
        total = _exp_sum(l, w, dim, ms, weighted)
        zero = total == 0  # log(0) would send 0 * inf = NaN into unused gradients
        log = torch.where(zero, -math.inf, _shift_log64(ms, torch.where(zero, 1.0, total)))
        sgn = torch.sign(total)
    empty = m == -math.inf
    log = torch.where(empty, -math.inf, torch.where(torch.isnan(m), math.nan, log))
    sgn = torch.where(empty | (log == -math.inf), 0.0, torch.nan_to_num(sgn, nan=1.0))
    return log, sgn


def _sum_dd(
    l: torch.Tensor, w: torch.Tensor, dim: int, ms: torch.Tensor, signs_only: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """log|sum_i w_i exp(l_i)| (shifted by ``ms``, finite, kept dim) and its sign, in
    double-double: ``l - ms`` exactly (TwoSum), each ``exp`` to ``2^-66``, weights scaled
    by a power of two (exact) and multiplied exactly (TwoProd), the leading parts summed
    exactly, one rounding of the final log. Pieces of about ``_PIECE_DD`` elements keep
    the ~90 elementwise passes in cache."""
    we = torch.zeros_like(ms)
    if not signs_only:
        _, we_i = torch.frexp(w.to(COMPUTE).abs().amax(dim, keepdim=True))
        we = we_i.to(COMPUTE)
    step = max(1, _PIECE_DD * l.shape[dim] // max(l.numel(), 1))
    s = s_lo = None
    for lc, wc in zip(l.split(step, dim), w.split(step, dim), strict=True):
        l64, w64 = lc.to(COMPUTE), wc.to(COMPUTE)
        d = l64 - ms
        v = d - l64
        d_lo = torch.nan_to_num((l64 - (d - v)) - (ms + v), nan=0.0, posinf=0.0, neginf=0.0)
        hi, lo = exp_dd(d, d_lo)
        if signs_only:  # w is -1, 0 or +1: exact products
            hi, lo = hi * w64, lo * w64
        else:
            ws = torch.ldexp(w64, -we)  # |ws| < 1: no overflow in the products
            hi, err = two_prod(ws, hi)
            lo = ws * lo + err
        p, p_lo = extract_sum(hi, lo, dim)
        if s is None or s_lo is None:
            s, s_lo = p, p_lo
        else:
            s, e = two_sum(s, p)
            s_lo = s_lo + p_lo + e
    assert s is not None and s_lo is not None
    s, s_lo = two_sum(s, s_lo)
    return shift_log_dd(ms, s, s_lo, we), torch.sign(s)


def _sum_with_inf(
    l: torch.Tensor, w: torch.Tensor, dim: int, signs_only: bool, accurate: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums (kept dim) with +inf terms: inf with their sign, NaN for inf - inf."""
    pos, neg = _inf_terms(l, w)
    pos, neg = pos.any(dim, keepdim=True), neg.any(dim, keepdim=True)
    finite_l = torch.where(torch.isposinf(l), -math.inf, l)
    log, sgn = _sum_core(finite_l, w, dim, True, signs_only, accurate)
    return _apply_inf(log, sgn, pos, neg)


def _combine(
    m1: torch.Tensor, s1: torch.Tensor, m2: torch.Tensor, s2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(m1, s1) + (m2, s2) for values s * exp(m), shifting by the larger m (exact shift)."""
    mx = torch.maximum(m1, m2)
    ms = torch.where(mx == -math.inf, 0.0, mx)
    return mx, s1 * torch.exp(m1 - ms) + s2 * torch.exp(m2 - ms)


def _renormalize(m: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move tiny mantissas (after cancellation) into the log so they never go subnormal."""
    tiny = (torch.abs(s) < _TINY) & (s != 0)
    if bool(tiny.any()):
        safe = torch.where(tiny, s, 1.0)
        m = torch.where(tiny, _shift_log64(m, safe), m)
        s = torch.where(tiny, torch.sign(s), s)
    return m, s


def _scan(m: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive prefix sums of s * exp(m) along the last dim (Hillis-Steele, exact shifts)."""
    n, off = m.shape[-1], 1
    while off < n:
        nm, ns = _combine(m[..., :-off], s[..., :-off], m[..., off:], s[..., off:])
        m = torch.cat([m[..., :off], nm], -1)
        s = torch.cat([s[..., :off], ns], -1)
        m, s = _renormalize(m, s)
        off *= 2
    return m, s


def _cumsum_last(l: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix sums along the last dim of a 2-d [rows, n] float64 problem -> (shift, value).

    Fast path: shift each block by its own largest log, cumsum in float64, and
    combine with the carry from earlier blocks (an exact-shift scan over block totals).
    Blocks where a prefix could underflow relative to that shift take the exact scan.
    """
    rows, n = l.shape
    nb = -(-n // _BLOCK)
    pad = nb * _BLOCK - n
    if pad:
        l = torch.nn.functional.pad(l, (0, pad), value=-math.inf)
        w = torch.nn.functional.pad(w, (0, pad), value=0)
    lb = l.view(rows, nb, _BLOCK)
    wb = w.view(rows, nb, _BLOCK)
    mb = lb.amax(-1, keepdim=True).to(COMPUTE)
    if bool(torch.isnan(mb).any()):  # NaN terms poison only their own and later prefixes
        mb = torch.where(torch.isnan(lb), -math.inf, lb).amax(-1, keepdim=True)
    mbs = torch.where(mb == -math.inf, 0.0, mb)
    p = _scaled_terms(lb, mbs, wb, exact=True)
    p = torch.cumsum(p, -1) if p.requires_grad else torch.cumsum(p, -1, out=p)
    # Exclusive carry into each block: scan the block totals, shift right by one.
    cm, cs = _scan(mb.squeeze(-1), p[..., -1])
    zero = torch.zeros_like(cs[:, :1])
    cm = torch.cat([zero - math.inf, cm[:, :-1]], 1).unsqueeze(-1)
    cs = torch.cat([zero, cs[:, :-1]], 1).unsqueeze(-1)
    mx = torch.maximum(cm, mb)
    ms = torch.where(mx == -math.inf, 0.0, mx)
    carry = cs * torch.exp(cm - ms)
    scale = torch.exp(mb - ms)
    val = torch.addcmul(carry, p, scale)
    # Smallest log any nonzero prefix in the block can have: unsafe if far below shift.
    unsafe = (ms - torch.maximum(cm, lb.amin(-1, keepdim=True)) > _SAFE_RANGE).squeeze(-1)
    if bool(unsafe.any()):  # refine: ignore zeros (-inf) when taking the minimum
        lo = torch.where(lb == -math.inf, math.inf, lb).amin(-1, keepdim=True)
        unsafe = (ms - torch.maximum(cm, lo) > _SAFE_RANGE).squeeze(-1)
    shift = ms.expand_as(val)
    if bool(unsafe.any()):
        r, b = unsafe.nonzero(as_tuple=True)
        em, es = _scan(
            torch.cat([cm[r, b], lb[r, b].to(COMPUTE)], -1),
            torch.cat([cs[r, b], wb[r, b].to(COMPUTE)], -1),
        )
        shift = shift.clone()
        val = val.clone()
        shift[r, b] = em[:, 1:]
        val[r, b] = es[:, 1:]
    shift = shift.reshape(rows, nb * _BLOCK)[:, :n]
    val = val.reshape(rows, nb * _BLOCK)[:, :n]
    return shift, val


def _finite_range(l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest log above -inf (``inf`` if none) and largest log; NaN if any is NaN."""
    lo, hi = torch.aminmax(l)
    if bool(lo == -math.inf):  # zeros: look past them (rare, one more pass)
        lo = torch.where(l == -math.inf, math.inf, l).amin()
    return lo, hi


def _direct_cumsum(l: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log|prefix sums| and signs of ``w * exp(l)`` along the last dim of ``[rows, n]``
    without a shift (callers check :func:`_direct_ok`), piece by piece with a carry."""
    if l.requires_grad or w.requires_grad:
        val = torch.cumsum(_direct_terms(l, w), -1)
        return torch.log(torch.abs(val)), torch.sign(val)
    weighted = _negative(w)  # else w is 1, or 0 where exp(l) = 0
    rows, n = l.shape
    step = max(1, _PIECE // max(rows, 1))
    log = torch.empty((rows, n), dtype=COMPUTE, device=l.device)
    sgn = torch.empty_like(log)
    buf = _scratch((rows, min(step, n)), l.device)
    wbuf = _scratch((rows, min(step, n)), l.device, 1) if weighted else buf
    carry = None
    for start in range(0, n, step):
        k = min(step, n - start)
        b = buf[:, :k].copy_(l[:, start : start + k]).exp_()
        if weighted:
            b.mul_(wbuf[:, :k].copy_(w[:, start : start + k]))
        torch.cumsum(b, 1, out=b)
        if carry is not None:
            b.add_(carry)
        carry = b[:, -1:].clone()
        torch.sign(b, out=sgn[:, start : start + k])
        torch.log(b.abs_(), out=log[:, start : start + k])
    return log, sgn


def _cumsum_core(
    l: torch.Tensor, w: torch.Tensor, dim: int, signs_only: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """log|prefix sums| and signs along ``dim`` (float64 out).

    ``signs_only`` as in :func:`_sum_core`: the inputs may then be the stored float32
    logs and int8 signs, and logs in a moderate range take the direct path (one
    ``exp`` and one ``cumsum``, no shift).
    """
    if not signs_only:
        l = torch.where(w == 0, -math.inf, l)
    lt, wt = l.movedim(dim, -1), w.movedim(dim, -1)
    shape = lt.shape
    n = shape[-1]
    lt, wt = lt.reshape(-1, n), wt.reshape(-1, n)
    pos = neg = None
    if n and bool(torch.isposinf(lt.amax()).item()):
        pos, neg = _inf_terms(lt, wt)
        pos = torch.cummax(pos.to(torch.int8), 1)[0] > 0
        neg = torch.cummax(neg.to(torch.int8), 1)[0] > 0
        lt = torch.where(torch.isposinf(lt), -math.inf, lt)
    if n == 0:
        log, sgn = lt.to(COMPUTE), wt.to(COMPUTE)
    elif signs_only and _direct_ok(*_finite_range(lt), n):
        log, sgn = _direct_cumsum(lt, wt)
    else:
        shift, val = _cumsum_last(lt, wt)
        log = _shift_log64(shift, val)
        sgn = torch.nan_to_num(torch.sign(val), nan=1.0)  # sign(0) = 0 where log(0) = -inf
    if pos is not None and neg is not None:
        log, sgn = _apply_inf(log, sgn, pos, neg)
    return log.reshape(shape).movedim(-1, dim), sgn.reshape(shape).movedim(-1, dim)


# --- public functions on plain tensors ----------------------------------------------


def _prepare(
    a: torch.Tensor, b: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    check_float("a", a)
    if b is None:  # unit weights: signs (see _sum_core's signs_only), never materialized
        one = torch.ones((), dtype=torch.int8, device=a.device).expand(a.shape)
        return (a.float() if a.itemsize < 4 else a), one, a.dtype
    check_float("b", b)
    dt = out_dtype(a, b)
    a, b = broadcast(("a", "b"), a, b)
    return a.to(COMPUTE), b.to(COMPUTE), dt


def _finish(
    log: torch.Tensor, sgn: torch.Tensor, dt: torch.dtype, return_sign: bool
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if return_sign:
        return log.to(dt), sgn.to(dt)
    return torch.where(sgn < 0, math.nan, log).to(dt)


@overload
def logsumexp(
    a: torch.Tensor,
    dim: int | None = None,
    b: torch.Tensor | None = None,
    keepdim: bool = False,
    return_sign: Literal[False] = False,
) -> torch.Tensor: ...
@overload
def logsumexp(
    a: torch.Tensor,
    dim: int | None,
    b: torch.Tensor | None,
    keepdim: bool,
    return_sign: Literal[True],
) -> tuple[torch.Tensor, torch.Tensor]: ...
@overload
def logsumexp(
    a: torch.Tensor,
    dim: int | None = None,
    b: torch.Tensor | None = None,
    keepdim: bool = False,
    *,
    return_sign: Literal[True],
) -> tuple[torch.Tensor, torch.Tensor]: ...
@overload
def logsumexp(
    a: torch.Tensor,
    dim: int | None = None,
    b: torch.Tensor | None = None,
    keepdim: bool = False,
    return_sign: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...


def logsumexp(
    a: torch.Tensor,
    dim: int | None = None,
    b: torch.Tensor | None = None,
    keepdim: bool = False,
    return_sign: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Compute ``log|sum(b * exp(a))|`` along ``dim`` with SciPy's semantics.

    Parameters
    ----------
    a : torch.Tensor
        Real floating-point logs.
    dim : int or None
        Dimension to reduce; ``None`` reduces over all elements.
    b : torch.Tensor, optional
        Real weights of any sign, broadcastable with ``a``. A zero weight drops its
        term even where ``a`` is infinite or NaN (as in SciPy).
    keepdim : bool
        Keep the reduced dimension with size 1.
    return_sign : bool
        Also return the sign of the sum.

    Returns
    -------
    torch.Tensor or (torch.Tensor, torch.Tensor)
        The log of the absolute sum; with ``return_sign`` also its sign (-1, 0, +1)
        in the same dtype. An exactly zero sum is ``-inf`` with sign 0. Without
        ``return_sign`` a negative sum gives NaN. Results are in the promoted dtype
        of ``a`` and ``b``. With ``b``, the scaled terms ``b * exp(a - max a)`` may
        overflow to ``inf`` when ``|b|`` is near the largest float, as in SciPy.

    Notes
    -----
    Error: :func:`signed_sum_error_bound` with ``n`` the reduced length and one more
    rounding ``u`` per term from multiplying by ``b``, covered by ``c``.
    """
    l, w, dt = _prepare(a, b)
    if dim is None:
        l, w, d = l.reshape(-1), w.reshape(-1), 0
    else:
        d = check_dim("dim", dim, l.ndim)
        if l.ndim == 0:
            l, w = l.reshape(1), w.reshape(1)
    kd, f64 = keepdim and dim is not None, dt == torch.float64
    log, sgn = _sum_core(l, w, d, kd, signs_only=b is None, accurate=f64)
    if keepdim and dim is None:
        log, sgn = log.reshape([1] * a.ndim), sgn.reshape([1] * a.ndim)
    elif a.ndim == 0:
        log, sgn = log.reshape(()), sgn.reshape(())
    return _finish(log, sgn, dt, return_sign)


@overload
def logcumsumexp(
    a: torch.Tensor, dim: int, b: torch.Tensor | None = None, return_sign: Literal[False] = False
) -> torch.Tensor: ...
@overload
def logcumsumexp(
    a: torch.Tensor, dim: int, b: torch.Tensor | None, return_sign: Literal[True]
) -> tuple[torch.Tensor, torch.Tensor]: ...
@overload
def logcumsumexp(
    a: torch.Tensor, dim: int, b: torch.Tensor | None = None, *, return_sign: Literal[True]
) -> tuple[torch.Tensor, torch.Tensor]: ...
@overload
def logcumsumexp(
    a: torch.Tensor, dim: int, b: torch.Tensor | None = None, return_sign: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...


def logcumsumexp(
    a: torch.Tensor,
    dim: int,
    b: torch.Tensor | None = None,
    return_sign: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Compute ``log|cumsum(b * exp(a))|`` along ``dim`` (signed, exact zeros).

    Parameters
    ----------
    a : torch.Tensor
        Real floating-point logs.
    dim : int
        Dimension of the prefix sums.
    b : torch.Tensor, optional
        Real weights of any sign, broadcastable with ``a``.
    return_sign : bool
        Also return the signs of the prefix sums.

    Returns
    -------
    torch.Tensor or (torch.Tensor, torch.Tensor)
        Same semantics as :func:`logsumexp` for every prefix: an exactly zero prefix
        is ``-inf`` with sign 0, a negative prefix without ``return_sign`` is NaN.
        A NaN term makes its own and all later prefixes NaN.

    Notes
    -----
    Error: :func:`signed_sum_error_bound` for each prefix with ``n = t`` terms.
    Without ``b`` and with all logs in ``[-600, 700 - log n]`` the prefix sums of
    ``exp(a)`` are taken directly (fastest); otherwise blocks of 1024 are shifted by
    their largest log, and logs spread by more than 600 inside a block take an
    exact-shift scan (slower, same bound), so values like ``e^1000`` next to
    ``e^-1000`` never underflow.
    """
    l, w, dt = _prepare(a, b)
    d = check_dim("dim", dim, l.ndim)
    unit = b is None  # unit weights may take the direct path
    if l.ndim == 0:
        log, sgn = _cumsum_core(l.reshape(1), w.reshape(1), 0, signs_only=unit)
        log, sgn = log.reshape(()), sgn.reshape(())
    else:
        log, sgn = _cumsum_core(l, w, d, signs_only=unit)
    return _finish(log, sgn, dt, return_sign)


def _matmul_terms(
    a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logs and signs of a_ik + b_kj as [..., n, k, p] float64 tensors."""
    if a.ndim < 2 or b.ndim < 2:
        raise ValueError(
            f"b: log_matmul_exp needs matrices, got shapes {tuple(a.shape)}, {tuple(b.shape)}"
        )
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"b: expected {a.shape[-1]} rows (columns of a), got {b.shape[-2]}")
    batch = broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return (a.unsqueeze(-1) + b.unsqueeze(-3)).expand(*batch, -1, -1, -1), (
        sa.unsqueeze(-1) * sb.unsqueeze(-3)
    ).expand(*batch, -1, -1, -1)


@overload
def log_matmul_exp(
    a: torch.Tensor,
    b: torch.Tensor,
    a_sign: torch.Tensor | None = None,
    b_sign: torch.Tensor | None = None,
    return_sign: Literal[False] = False,
) -> torch.Tensor: ...
@overload
def log_matmul_exp(
    a: torch.Tensor,
    b: torch.Tensor,
    a_sign: torch.Tensor | None,
    b_sign: torch.Tensor | None,
    return_sign: Literal[True],
) -> tuple[torch.Tensor, torch.Tensor]: ...
@overload
def log_matmul_exp(
    a: torch.Tensor,
    b: torch.Tensor,
    a_sign: torch.Tensor | None = None,
    b_sign: torch.Tensor | None = None,
    *,
    return_sign: Literal[True],
) -> tuple[torch.Tensor, torch.Tensor]: ...
@overload
def log_matmul_exp(
    a: torch.Tensor,
    b: torch.Tensor,
    a_sign: torch.Tensor | None = None,
    b_sign: torch.Tensor | None = None,
    return_sign: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...


def log_matmul_exp(
    a: torch.Tensor,
    b: torch.Tensor,
    a_sign: torch.Tensor | None = None,
    b_sign: torch.Tensor | None = None,
    return_sign: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Matrix product in log space: ``log|(sa * exp(a)) @ (sb * exp(b))|``.

    Parameters
    ----------
    a : torch.Tensor
        Logs ``[..., n, k]``.
    b : torch.Tensor
        Logs ``[..., k, p]`` (batch dimensions broadcast).
    a_sign, b_sign : torch.Tensor, optional
        Signs (-1, 0, +1) of the factors, of the shapes of ``a`` and ``b``;
        default +1 (0 where the log is ``-inf``).
    return_sign : bool
        Also return the sign of each entry.

    Returns
    -------
    torch.Tensor or (torch.Tensor, torch.Tensor)
        ``[..., n, p]`` with :func:`logsumexp` semantics (exact zero is ``-inf``, sign 0).

    Notes
    -----
    Forms the ``n k p`` terms ``a_ik + b_kj`` (memory ``O(n k p)``) and sums them
    with exact shifts, so entries beyond float range never overflow. Error:
    :func:`signed_sum_error_bound` with ``n = k`` and ``term_log_error = u |a_ik + b_kj|``
    (max over ``k``, one rounding of the sum of logs, ``u = 2^-53``).
    """
    check_float("a", a)
    check_float("b", b)
    dt = out_dtype(a, b)
    a64, b64 = a.to(COMPUTE), b.to(COMPUTE)
    sa = _sign_or_default("a_sign", a_sign, a64)
    sb = _sign_or_default("b_sign", b_sign, b64)
    terms, signs = _matmul_terms(a64, b64, sa, sb)
    log, sgn = _sum_core(terms, signs, -2, False, accurate=dt == torch.float64)
    return _finish(log, sgn, dt, return_sign)


def _sign_or_default(name: str, s: torch.Tensor | None, log: torch.Tensor) -> torch.Tensor:
    if s is None:
        return torch.where(log == -math.inf, 0.0, 1.0)
    if not isinstance(s, torch.Tensor) or s.is_complex():
        raise TypeError(f"{name}: expected a real tensor of signs")
    if s.shape != log.shape:
        raise ValueError(f"{name}: expected shape {tuple(log.shape)}, got {tuple(s.shape)}")
    s = s.to(COMPUTE)
    if not bool(((s == 0) | (s == 1) | (s == -1)).all()):
        raise ValueError(f"{name}: signs must be -1, 0 or +1")
    return s
