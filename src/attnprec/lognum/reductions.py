"""Signed log-space reductions: sums, prefix sums, matrix products, and their error bound.

All reductions compute in float64 with exact shifts: every term is scaled by
``exp(l_i - m)`` where ``m`` is itself one of the input logs, so no term overflows and
nothing is rounded to a finite floor. Two faster paths need no shift and are at least
as accurate. Sums of signed terms (``SignedLog`` data, unit weights) are first
summed as ``exp(l_i)`` directly, and a slice is kept when its float64 total shows
that nothing overflowed or underflowed (:func:`_sum_direct`). Prefix sums with unit
weights are summed directly when their logs lie in ``[-600, 700 - log n]`` (checked per
call): there ``exp(l_i)`` is a normal float64 and no partial sum overflows.

Near ``log|s| = 0`` the log of a rounded sum has only an absolute accuracy
(``log(1 + e^-40)`` is 0 in float64). Results below 2 in magnitude are therefore
recomputed relative to their largest term ``P`` as ``log|P| + log|1 + R|``, ``R`` the
sum of the other terms over ``P`` (SciPy's gh-18295), unless a direct sum already meets
the relative bound; float64 sums and all matrix products are pivoted everywhere. The
error guarantee of every function here is :func:`signed_sum_error_bound`, relative to
``|log|s||`` near 0.

An exactly cancelling sum gives an exact zero, returned as ``(-inf, sign 0)``, never a
tiny value with a random sign: a float64 result that the bound does not certify away
from 0 (``r >= 1/2``; only where some weight is negative) is checked exactly, log by log
(:mod:`._zeros`: by Lindemann-Weierstrass a sum of ``w_i e^(l_i)`` is zero exactly when
the weights of each distinct log cancel). Sums that are not zero but whose equal logs
cancel are then recomputed from the merged terms (``e^100 + e^-50 - e^100`` is
``e^-50``), and summed exactly where double-double cannot resolve them (``e^(1e-40) -
1``); undecided prefix sums are summed exactly (after ``e^0.3 - e^0.3`` the prefixes
of later terms near ``e^-800`` came back as false zeros). So ``(-inf, 0)`` always means
an exact zero. Ordinary data pay one ``amax`` of the logs (signed sums)
or two block reductions in the pass (signed prefix sums).

Autograd: the values are computed without autograd (the same paths, except that float64
sums skip the slower double-double one), and the backward pass is explicit
(:class:`_SumFn`, :class:`_CumsumFn`): ``d log|s| / d l_i = x_i / s`` from the result,
finite wherever the result is finite and nonzero and the derivative is a float.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Literal, overload

import torch

from ._checks import (
    COMPUTE,
    broadcast,
    broadcast_shapes,
    check_bool,
    check_dim,
    check_float,
    out_dtype,
)
from ._dd import exp_dd, extract_sum, ldexp, log1p_dd, log_dd, two_prod, two_sum
from ._zeros import negative as _negative
from ._zeros import zero_prefixes, zero_sums
from .elementwise import _LN2, _LN2_HI, _LN2_LO, _shift_log64

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
# The double-double float64 sums (_sum_pivot_dd) make ~90 passes: pieces that stay in cache.
_PIECE_DD = 1 << 16
# A direct sum is accepted a posteriori when its float64 total is finite and at least
# this: terms that underflow then lose at most 2^-1074 each, n 2^-274 of the total.
_DIRECT_MIN = 2.0**-800
# ...and is tried only where the largest of about this many sampled logs is in range.
_PROBE = 1024
# Per-thread CPU scratch for the pieces (see _scratch).
_SCRATCH = threading.local()
# Results below this in magnitude are recomputed relative to their largest term (_sum_pivot,
# _cumsum_pivot): there log(sum) loses the relative accuracy that log1p(rest / largest) keeps.
_SMALL = 2.0
# Weighted prefix sums whose weights (scaled so the largest is in [0.5, 1)) go below this take
# the pivoted scan: shifted terms of smaller weights could fall below the normal range.
_WEIGHT_SPAN = 2.0**-100
_SQRT_HALF = math.sqrt(0.5)


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
    log_abs_max: torch.Tensor | float | None = None,
) -> torch.Tensor:
    r"""A bound on the log-domain error of every signed reduction in ``lognum``.

    For a sum ``s = sum_i x_i`` of ``n`` terms given in log space, the computed
    ``L = log|s|`` (from :func:`logsumexp`, :func:`logcumsumexp`, :func:`log_matmul_exp`,
    ``SignedLog.sum``/``cumsum``/``@``) satisfies

    .. math::
        |\hat L - L| \le -\log(1 - r) + u\,(3 D + 2 |L| + 4 \theta) + \eta,
        \qquad r = c\,(n + 2)\,u\,(\kappa' + \theta \rho) + (e^{\epsilon} - 1)\,\kappa,

    with ``u = 2^-53`` (all reductions run in float64), ``c = SIGNED_SUM_C = 4``,
    ``M = log max_i |x_i|`` (``log_abs_max``), ``rho = e^(M - L) = max|x_i| / |s|``,
    ``kappa = sum_i |x_i| / |s|``, ``kappa' = kappa - rho`` (the terms other than the
    largest), ``D = |L - M|``, ``epsilon = term_log_error`` (an absolute error already
    present in the logs of the terms) and

    * ``theta = min(1, |L|)``, or 1 where ``c (n + 2) u kappa >= 1/2``;
    * ``eta = (n + 1) 2^-1074 rho`` where ``theta < 1`` (terms below the normal range),
      else 0;

    plus, for a narrower output dtype, one rounding ``u_out (|L| + bound)`` and, where
    ``theta < 1``, half its smallest subnormal. Wherever ``r < 1`` the computed sign is
    the exact sign; elsewhere the bound is ``inf``.

    The bound is relative near ``L = 0``: with exact term logs (``epsilon = 0``) and
    ``|L| < 1`` every part is a multiple of ``|L|``, of ``D`` or of ``kappa'``, which
    vanish with ``L`` when the largest term is near 1 (``[0, -40]`` has
    ``L = 4.2e-18`` and the bound ``41 u L``: ``32 u L`` from ``r``, ``9 u L`` more). Without
    ``log_abs_max`` it is the earlier absolute bound, ``kappa`` and ``log(n kappa)`` in
    place of ``kappa' + theta rho`` and ``D``, ``theta = 1`` (valid for every ``M``;
    ``D <= log(n kappa)``), with ``2 log(n kappa)``:
    ``-log(1 - r) + u (2 log(n kappa) + 2 |L| + 4)``.

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
        Absolute error bound of the logs of the terms, 0 when they are inputs. With
        weights ``b`` that are not all +-1, use ``3 u max_i |log|b_i||`` (the largest
        term's weight enters through the rounded ``log|b_p|``).
    log_abs_max : torch.Tensor or float, optional
        ``log max_i |x_i|``; without it the bound is absolute (see above).

    Returns
    -------
    torch.Tensor
        float64 bound, broadcast over the arguments; ``inf`` where ``r >= 1``.

    Raises
    ------
    TypeError
        If an argument is not a real number or tensor (``n`` not an integer), or
        ``dtype`` not a floating torch dtype.
    ValueError
        If ``n < 1``, ``term_log_error`` is negative or NaN, a log is NaN, the arguments
        do not broadcast (naming the first that does not), or the logs contradict
        ``|sum x_i| <= sum |x_i|`` or ``max |x_i| <= sum |x_i| <= n max |x_i|`` by more
        than a rounding (``2^-20 (1 + |log|)``: float32 logs rounded by a few ulps are
        taken).

    Notes
    -----
    Derivation of ``c`` (``u = 2^-53``; torch's float64 ``exp``, ``log`` and ``log1p``
    are correct to 1 ulp, i.e. relative ``2u``). Results with ``|L| >= 2`` come from the
    fast paths below; the others are recomputed relative to their largest term (the
    pivot ``P``): ``L = log|P| + log|1 + R|``, ``R = sum_{i != p} x_i / P``
    (as SciPy's logsumexp does since gh-18295). An accepted fast result has ``|L| >= 1``
    (its error is below ``0.7`` where ``c (n + 2) u kappa < 1/2``), so ``theta = 1`` and
    ``kappa' + theta rho = kappa`` there; or it is a direct sum (``log|t|`` rounded once,
    no shift) with ``sum |x_i| >= 2 max |x_i|``: then ``kappa <= 2 kappa'`` and its error
    ``-log(1 - (n + 1) u kappa) + 2u |L|`` is within the bound for every ``theta``.

    Fast paths, with ``m`` the largest log (an input, so the largest term is exactly 1)
    and ``T = sum |x_i| / e^m >= 1``:

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
      ``u T``. Weights are scaled by a power of two (exact) so the largest is in
      ``[0.5, 1)``; their product adds ``u T``.
    * Direct paths, no shift: prefix sums with unit weights and every nonzero term's
      log in ``[-600, 700 - log n]``; sums of signed terms, a slice
      kept where its float64 total ``t`` has ``2^-800 <= |t| < inf`` (an overflow
      anywhere leaves inf or NaN; weighted sums keep the same test on their scaled
      total). Each normal ``exp(l_i)`` is off by ``2u``, then ``gamma_{n-1} T`` for the
      (prefix) summation, in pieces or not. Terms that underflow lose at most
      ``2^-1074`` each, ``n 2^-274 T`` in a kept sum.
    * The final ``shift + log|t|`` (the shift folded into the log of the mantissa's
      binary exponent, :func:`_shift_log64`) rounds by at most ``u (2 |L| + 4 ln 2)``.

    In total at most ``(3n/e + n + 3 log2 n + 6) u T <= 4 (n + 2) u T`` for every
    ``n >= 1``; dividing by ``|s| / e^m`` turns ``T`` into ``kappa``.

    Pivoted paths (``|L| < 2``, and every matrix product): each term
    ``f_i exp(l_i + e_i ln 2 - m)`` (weights ``b_i = f_i 2^e_i``, ``|f_i|`` in
    ``[1/sqrt 2, sqrt 2)``, exactly; the exponent formed as a double-double) is off by
    ``2u`` (exp) ``+ 2u`` (the low part and ``f_i``); their sum without the pivot
    ``gamma_{n-2}``; ``R`` one division and the pivot's own ``4u``; near-ties in the
    choice of the pivot a factor ``1 + 2^-40`` on ``kappa'``: ``|R_hat - R| <=
    (n + 9) u kappa' |s| / |P|``, an error ``-log(1 - (n + 9) u kappa')`` of
    ``log|1 + R|`` (``1 + R`` is exact for ``R`` in ``[-4, -1/2]``; below, its rounding
    is ``<= u kappa'``). Prefix sums combine (pivot, ``R``) pairs in a tree of depth
    ``ceil(log2 n)``, ``8u kappa'`` per level, ``8 ceil(log2 n) <= 4 (n + 2)``. Then
    ``log|1 + R|`` rounds by ``2u D``, the pieces ``log|P| + log|1 + R|`` are added
    with TwoSum and rounded once (``u |L|``, and ``u^2 (|L| + D)``), and terms below
    the normal range lose ``2^-1074`` each relative to the pivot: ``eta``. With weights,
    ``log|f_p|`` rounds by ``2u |log|f_p|| <= 2u |log|b_p||``: ``term_log_error``.

    float64 results of sums and matrix products without autograd (double-double,
    ``lognum/_dd.py``) are pivoted everywhere: ``l_i - m`` exact, each term to ``2^-66``
    relative, the terms other than the pivot split twice into parts on a common grid
    (summed exactly) and remainders of at most ``(k + 1)^2 2^-102`` of the largest of
    them (pieces of ``k <= 2^16``), ``R`` and ``log|1 + R|`` in double-double (a series
    below ``|R| = 2^-5``), all parts of the log added exactly and rounded once: the exact
    log rounded to nearest up to ``2^-60 (|L| + |l_p| + |log|b_p|| + kappa')`` (tested),
    far inside the bound.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype!r:.60}")
    n_t = _bound_arg("n", n, integer=True)
    las = _bound_arg("log_abs_sum", log_abs_sum)
    lav = _bound_arg("log_abs_value", log_abs_value)
    eps = _bound_arg("term_log_error", term_log_error)
    args = {"n": n_t, "log_abs_sum": las, "log_abs_value": lav, "term_log_error": eps}
    if log_abs_max is not None:
        args["log_abs_max"] = _bound_arg("log_abs_max", log_abs_max)
    shape: torch.Size = torch.Size()
    for name, t in args.items():
        try:
            shape = torch.broadcast_shapes(shape, t.shape)
        except RuntimeError:
            raise ValueError(
                f"{name}: shape {tuple(t.shape)} does not broadcast with the arguments "
                f"before it ({tuple(shape)})"
            ) from None
    if bool((n_t < 1).any()):
        raise ValueError(f"n: expected at least one term, got {n!r:.60}")
    if bool((eps < 0).any()):
        raise ValueError("term_log_error: expected a bound >= 0, found a negative value")
    _check_order("log_abs_value", lav, "log_abs_sum", las)
    if log_abs_max is not None:
        _check_order("log_abs_max", args["log_abs_max"], "log_abs_sum", las)
        # sum |x_i| <= n max |x_i| (a review: a sum e^6 times n max took a small bound)
        _check_order("log_abs_sum", las, "log n + log_abs_max", args["log_abs_max"] + n_t.log())
    # Within a rounding (checked above) of each other: |s| <= sum |x_i| holds exactly.
    log_kappa = torch.clamp(las - lav, min=0.0)
    kappa = torch.exp(log_kappa)
    r_sum = SIGNED_SUM_C * (n_t + 2) * _U64
    fin = torch.isfinite(lav)
    if log_abs_max is None:
        theta = torch.ones_like(lav)
        k_eff, d_part, eta = kappa, 2 * (torch.log(n_t) + log_kappa), torch.zeros_like(lav)
    else:
        lam = torch.minimum(torch.as_tensor(log_abs_max, dtype=COMPUTE), las)
        rho = torch.exp(lam - lav)
        k_rest = kappa * -torch.expm1(lam - las)  # (sum |x| - max |x|) / |s|
        far = (torch.abs(lav) >= 1) | (r_sum * kappa >= 0.5) | ~fin
        theta = torch.where(far, 1.0, torch.abs(lav))
        k_eff = k_rest + theta * rho
        d_part = 3 * torch.abs(torch.where(fin, lav - lam, 0.0))
        eta = torch.where(far, 0.0, (n_t + 1) * 2.0**-1074 * rho)
    r = r_sum * k_eff + torch.expm1(eps) * kappa
    core = torch.where(r < 1, -torch.log1p(-torch.where(r < 1, r, 0.0)), math.inf)
    bound = core + _U64 * (d_part + 2 * torch.abs(lav) + 4 * theta) + eta
    if dtype != torch.float64:
        u_out = _unit_roundoff(dtype)
        fi = torch.finfo(dtype)
        eta_out = torch.where(theta < 1, fi.smallest_normal * fi.eps / 2, torch.zeros_like(theta))
        bound = bound * (1 + u_out) + u_out * torch.abs(lav) + eta_out
    return torch.where(fin, bound, math.inf)


def _bound_arg(name: str, x: object, integer: bool = False) -> torch.Tensor:
    """``x`` as a float64 tensor: a real number (an integer where ``integer``), not NaN."""
    bad = isinstance(x, (bool, str, bytes)) or (
        isinstance(x, torch.Tensor) and (x.is_complex() or x.dtype == torch.bool)
    )
    try:
        t = None if bad else torch.as_tensor(x, dtype=COMPUTE)  # a float64 log, never float32
    except (TypeError, ValueError, RuntimeError):
        t = None
    if t is None:
        raise TypeError(f"{name}: expected a real number or tensor, got {type(x).__name__}")
    if bool(torch.isnan(t).any()):
        raise ValueError(f"{name}: expected a number, found NaN")
    if integer and bool((t != torch.round(t)).any() | torch.isinf(t).any()):
        raise TypeError(f"{name}: expected an integer count, got {x!r:.60}")
    return t


def _check_order(small: str, a: torch.Tensor, large: str, b: torch.Tensor) -> None:
    """Refuse ``a > b`` by more than a rounding of the logs (``2^-20 (1 + |a|)``)."""
    fin = torch.isfinite(a) & torch.isfinite(b)
    gap = torch.where(fin, a - b, torch.where(torch.isposinf(a) & ~torch.isposinf(b), 1.0, 0.0))
    if bool((gap > 2.0**-20 * (1 + torch.where(fin, a.abs(), 0.0))).any()):
        raise ValueError(
            f"{small}: exceeds {large} by more than a rounding (|sum x_i| <= sum |x_i|, "
            "max |x_i| <= sum |x_i| <= n max |x_i|): the logs must be accurate (lognum's "
            "reductions are; a float32 running sum of many terms is not)"
        )


# --- float64 cores on (log, weight) pairs; a term is w_i * exp(l_i) -----------------


def _inf_terms(l: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks of +inf terms with positive and negative weight."""
    pinf = torch.isposinf(l) & (w != 0)
    return pinf & (w > 0), pinf & (w < 0)


def _apply_inf(
    log: torch.Tensor, sgn: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Overwrite results that contain +inf terms: inf with their sign, NaN for inf - inf
    (and NaN stays NaN: a NaN term beside an infinite one)."""
    both = pos & neg
    log = torch.where((pos | neg) & ~torch.isnan(log), torch.where(both, math.nan, math.inf), log)
    sgn = torch.where(pos & ~neg, 1.0, torch.where(neg & ~pos, -1.0, sgn))
    return log, torch.where(both, 1.0, sgn)


def _scaled_terms(
    l: torch.Tensor, shift: torch.Tensor, w: torch.Tensor, exact: bool = False
) -> torch.Tensor:
    """``w * exp(l - shift)`` in float64, in place on one fresh buffer (fresh large
    buffers cost page faults on every call; the cores run without autograd).

    ``exact``: form ``l - shift`` as a double-double (TwoSum) and apply the low part
    as ``(1 + lo)``. Needed where the shift is not the largest log of every prefix
    (blocked prefix sums): the rounding of ``l - shift`` would otherwise cost a
    relative ``u |l - shift|`` per term.
    """
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
    l_lo: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log|sum_i w_i exp(l_i)| and its sign along ``dim`` (float64 out).

    ``signs_only``: ``w`` holds signs -1, 0, +1, and ``l == -inf`` wherever ``w == 0``
    (SignedLog data, or unit weights); then ``l`` and ``w`` may be the stored float32
    logs and int8 signs, widened inside the float64 operations, and the sums are first
    tried without a shift (:func:`_sum_direct`).

    ``accurate``: the result is wanted in float64; computed in double-double and
    rounded once (:func:`_sum_pivot_dd`) unless autograd is on.

    ``l_lo``: low parts of the logs (``l + l_lo`` exact, matrix products); the sums are
    then pivoted everywhere.

    Results below ``_SMALL`` in magnitude are recomputed relative to their largest term
    (:func:`_refine`), and results not certified away from 0 are checked for an exact
    zero (:func:`_zeros.zero_sums`). Under autograd the same values come from
    :class:`_SumFn`, whose backward is the explicit derivative (:func:`_sum_grads`).
    """
    dim = dim % l.ndim
    if torch.is_grad_enabled() and (l.requires_grad or w.requires_grad):
        # float64 under autograd: the float64 algorithm (within the same bound), not the
        # double-double one (about 20x slower)
        log, sgn = _SumFn.apply(l, w, dim, signs_only, False, l_lo)
    else:
        log, sgn = _sum_eval(l, w, dim, signs_only, accurate, l_lo)
    return (log, sgn) if keepdim else (log.squeeze(dim), sgn.squeeze(dim))


def _sum_eval(
    l: torch.Tensor,
    w: torch.Tensor,
    dim: int,
    signs_only: bool,
    accurate: bool,
    l_lo: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_sum_core` without autograd, the reduced dim kept."""
    if l.numel() == 0:  # an empty sum is an exact zero (and no slices give no results)
        shape = list(l.shape)
        shape[dim] = 1
        log = torch.full(shape, -math.inf, dtype=COMPUTE, device=l.device)
        return log, torch.zeros(shape, dtype=COMPUTE, device=l.device)
    big = top = None
    if not signs_only:
        l, w, big = _weighted_terms(l, w, dim)
    if l_lo is not None or accurate:
        log, sgn = _sum_rows(l, w, dim, signs_only, accurate, l_lo)
    elif signs_only:
        if _negative(w):  # the largest logs for the exact-zero check, while l is in cache
            top = l.amax(dim, keepdim=True)
        log, sgn, total = _sum_direct(l, w, dim)
        if total is not None:
            log, sgn = _refine(l, w, dim, log, sgn, signs_only, None, total)
    else:
        log, sgn, tiny = _sum_shifted(l, w, dim, signs_only, big)
        log, sgn = _refine(l, w, dim, log, sgn, signs_only, tiny)
    sgn = torch.where(torch.isnan(log), 1.0, sgn)  # NaN has sign +1 (as in SignedLog)
    if signs_only and top is None and not (l_lo is not None or accurate):
        return log, sgn  # no negative sign: no cancellation
    return zero_sums(l, w, dim, log, sgn, signs_only, l_lo, SIGNED_SUM_C, _sum_merged, top)


def _sum_merged(
    l: torch.Tensor, w: torch.Tensor, l_lo: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pivoted double-double sums of ``[rows, m]`` terms with general float64 weights
    (the merged terms of :func:`_zeros.zero_sums`), kept dim."""
    return _sum_pivot_dd(l, w, False, l_lo)


def _term_grads(
    l: torch.Tensor,
    w: torch.Tensor,
    log_c: torch.Tensor,
    sgn_c: torch.Tensor,
    l_lo: torch.Tensor | None,
    need_l: bool,
    need_w: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of the terms ``w_i exp(l_i)`` from coefficients ``(log|C_i|, sign C_i)``
    per term, ``C_i = sum_t g_t / s_t`` over the sums ``s_t`` that contain term ``i``:
    ``d/dl_i = w_i e^(l_i) C_i``, ``d/dw_i = e^(l_i) C_i``. A term that is zero (``w_i = 0``
    or ``l_i = -inf``) gets 0 for ``l_i``, and ``C_i = 0`` gives 0 (never ``0 * inf``)."""
    l64 = l.to(COMPUTE)
    e = l64 + log_c
    if l_lo is not None:
        e = e + torch.nan_to_num(l_lo.to(COMPUTE), nan=0.0, posinf=0.0, neginf=0.0)
    dead = (l64 == -math.inf) | (sgn_c == 0)
    gw = torch.where(dead, 0.0, sgn_c * torch.exp(torch.where(dead, 0.0, e)))
    gl = None
    if need_l:
        w64 = w.to(COMPUTE)
        gl = torch.where(w64 == 0, 0.0, gw * w64).to(l.dtype)
    return gl, (gw.to(w.dtype) if need_w else None)


def _grad_coef(
    g: torch.Tensor, log: torch.Tensor, sgn: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``g / s`` as ``(log|.|, sign)`` for sums ``s = (log, sgn)``: ``-inf`` (no
    contribution) where ``g = 0``, whatever ``s`` is; an exact zero ``s`` is taken as +0
    (the derivative of ``log|s|`` there is infinite: ``+inf`` with the sign of ``g``)."""
    g64 = g.to(COMPUTE)
    live = g64 != 0
    sg = torch.where(log == -math.inf, 1.0, sgn)
    lc = torch.where(live, torch.log(torch.abs(torch.where(live, g64, 1.0))) - log, -math.inf)
    sc = torch.where(lc == -math.inf, 0.0, torch.where(torch.isnan(lc), 1.0, torch.sign(g64) * sg))
    return lc, sc


class _SumFn(torch.autograd.Function):
    """:func:`_sum_eval` with the explicit derivative ``d log|s| / d l_i = x_i / s``.

    Autograd through the evaluation paths would differentiate their scaffolding: the
    mantissa of ``torch.frexp`` (a float32 power of two), ``log`` of an exactly cancelled
    total (``0 * inf``), the paths chosen for the value. Here the gradient is formed from
    the result: ``g sign(s) w_i exp(l_i - log|s|)`` (relative error about that of the
    result's log, plus ``exp``'s). Zero terms get 0, a zero ``g`` contributes nothing
    (so unused or masked sums never turn gradients into NaN), an exactly zero sum with
    ``g != 0`` gives its nonzero terms ``+-inf`` (``log|s|`` at ``s -> +0``), and a NaN sum
    NaN."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        l: torch.Tensor,
        w: torch.Tensor,
        dim: int,
        signs_only: bool,
        accurate: bool,
        l_lo: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lo = None if l_lo is None else l_lo.detach()
        log, sgn = _sum_eval(l.detach(), w.detach(), dim, signs_only, accurate, lo)
        ctx.save_for_backward(l, w, log, sgn, lo)
        ctx.mark_non_differentiable(sgn)
        return log, sgn

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g_log: torch.Tensor, _g_sgn: torch.Tensor) -> tuple[Any, ...]:
        l, w, log, sgn, lo = ctx.saved_tensors
        lc, sc = _grad_coef(g_log, log, sgn)
        gl, gw = _term_grads(l, w, lc, sc, lo, *ctx.needs_input_grad[:2])
        return gl, gw, None, None, None, None


def _weighted_terms(
    l: torch.Tensor, w: torch.Tensor, dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Terms ``w exp(l)`` with SciPy's special values, as (log, weight) pairs: a zero
    weight drops its term (even where ``l`` is inf or NaN), an infinite weight makes it
    ``+-inf`` (a +inf log with weight +-1), and ``inf * exp(-inf)`` is NaN.

    Also the exponent ``E`` (kept dim, float64) of each slice's largest ``|w|``, by
    which the weights are to be scaled (``2^-E``, exact) so that no product overflows and
    subnormal weights become normal; ``None`` where every slice's largest weight is in
    ``[2^-500, 2^500]``, where neither can happen (and terms that then fall below the
    normal range are caught by the ``2^-800`` test on the scaled total)."""
    with torch.no_grad():
        w_hi = torch.maximum(
            w.detach().amax(dim, keepdim=True), -w.detach().amin(dim, keepdim=True)
        )
    l = torch.where(w == 0, -math.inf, l)
    if bool(torch.isinf(w_hi).any()):
        winf = torch.isinf(w)
        bad = (l == -math.inf) | torch.isnan(l)
        l = torch.where(winf, torch.where(bad, math.nan, math.inf), l)
        w = torch.where(winf, torch.sign(w), w)
        w_hi = torch.where(torch.isinf(w_hi), 1.0, w_hi)
    _, e_i = torch.frexp(w_hi)
    big = e_i.to(COMPUTE)
    if bool(((big >= -500) & (big <= 500)).all()):  # False where NaN: then scaled (harmless)
        return l, w, None
    return l, w, torch.where(torch.isfinite(w_hi), big, 0.0)


def _scale_weights(w: torch.Tensor, big: torch.Tensor) -> torch.Tensor:
    """``w 2^-big`` exactly (one product where ``2^-big`` is a float)."""
    return ldexp(w, -big) if bool((big < -1000).any()) else w * torch.pow(2.0, -big)


def _rows(t: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """``t`` as ``[rows, n]`` with ``dim`` last (the row order of a kept-dim result)."""
    return t.movedim(dim, -1).reshape(-1, n)


def _refine(
    l: torch.Tensor,
    w: torch.Tensor,
    dim: int,
    log: torch.Tensor,
    sgn: torch.Tensor,
    signs_only: bool,
    extra: torch.Tensor | None,
    direct: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recompute with :func:`_sum_pivot` the sums (kept dim) whose log is below
    ``_SMALL`` in magnitude, or flagged in ``extra``: ``log(sum)`` has an absolute
    error, ``log|P| + log1p(rest / P)`` a relative one.

    ``direct``: ``|t|`` of the sums taken directly (``log|t|`` rounded once, no shift;
    NaN elsewhere). Those are kept where ``sum |x_i| >= 2 max |x_i|``: then
    ``kappa <= 2 kappa'`` and their error ``(n + 1) u kappa + 2u |L|`` is within the
    relative bound (:func:`signed_sum_error_bound`). ``sum |x_i|`` is ``|t|`` for
    positive terms, else summed again (only for these slices).
    """
    bad = torch.abs(log) < _SMALL  # False for NaN and for zeros (-inf)
    if extra is not None:
        bad = bad | extra
    if not bool(bad.any()):
        return log, sgn
    n = l.shape[dim]
    rows = bad.flatten().nonzero()[:, 0]
    lr = _rows(l, dim, n).index_select(0, rows)
    wr = _rows(w, dim, n).index_select(0, rows)
    if direct is not None:
        t = direct.flatten().index_select(0, rows).unsqueeze(-1)
        if bool((wr < 0).any()):
            t = torch.where(torch.isnan(t), t, torch.exp(lr.to(COMPUTE)).sum(-1, keepdim=True))
        big = torch.exp(lr.amax(-1, keepdim=True).to(COMPUTE))
        # 1 - 2^-20 covers the rounding of both sums ((n + 1) u < 2^-21 for n < 2^31)
        keep = (t * (1 - 2.0**-20) >= 2 * big).squeeze(-1)
        rows, lr, wr = rows[~keep], lr[~keep], wr[~keep]
        if rows.numel() == 0:
            return log, sgn
    rlog, rsgn = _sum_pivot(lr, wr, signs_only)
    log = log.flatten().index_put((rows,), rlog.squeeze(-1)).view_as(log)
    sgn = sgn.flatten().index_put((rows,), rsgn.squeeze(-1)).view_as(sgn)
    return log, sgn


def _sum_rows(
    l: torch.Tensor,
    w: torch.Tensor,
    dim: int,
    signs_only: bool,
    dd: bool,
    l_lo: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pivoted sums (kept dim) of every slice: :func:`_sum_pivot_dd` (``dd``) or
    :func:`_sum_pivot`, +inf terms set aside (:func:`_apply_inf`)."""
    n = l.shape[dim]
    shape = list(l.movedim(dim, -1).shape)
    lr, wr = _rows(l, dim, n), _rows(w, dim, n)
    lo = None if l_lo is None else _rows(l_lo, dim, n)
    pos = neg = None
    if bool(torch.isposinf(lr).any()):
        pos, neg = _inf_terms(lr, wr)
        pos, neg = pos.any(-1, keepdim=True), neg.any(-1, keepdim=True)
        if lo is not None:
            lo = torch.where(torch.isposinf(lr), 0.0, lo)
        lr = torch.where(torch.isposinf(lr), -math.inf, lr)
    if dd:
        log, sgn = _sum_pivot_dd(lr, wr, signs_only, lo)
    else:
        log, sgn = _sum_pivot(lr, wr, signs_only, lo)
    if pos is not None and neg is not None:
        log, sgn = _apply_inf(log, sgn, pos, neg)
    shape[-1] = 1
    return log.reshape(shape).movedim(-1, dim), sgn.reshape(shape).movedim(-1, dim)


# --- pivoted sums: log|P| + log|1 + R|, R = (sum of the other terms) / P -----------------


def _split(a: torch.Tensor, b: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fl(a + b), e)`` with ``fl(a + b) + e == a + b`` (TwoSum); ``e`` carries no
    gradient (a correction of relative size u) and is 0 where the sum is not finite."""
    s = a + b
    with torch.no_grad():
        sd, ad = s.detach(), a.detach()
        bd = b.detach() if isinstance(b, torch.Tensor) else b
        bb = sd - ad
        e = torch.nan_to_num((ad - (sd - bb)) + (bd - bb), nan=0.0, posinf=0.0, neginf=0.0)
    return s, e


def _weight_parts(w: torch.Tensor, signs_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f, e)`` with ``w = f 2^e`` exactly, ``|f|`` in ``[1/sqrt 2, sqrt 2)`` (so
    ``|log|f|| <= |log|w||``), ``e`` float64 without gradient; ``(w, 0)`` for signs
    (the 0 broadcast, not materialized)."""
    w = w.to(COMPUTE)
    if signs_only:
        return w, torch.zeros((), dtype=COMPUTE, device=w.device).expand(w.shape)
    with torch.no_grad():
        _, e_i = torch.frexp(w.detach())
        e = torch.where(torch.isfinite(w), e_i.to(COMPUTE), 0.0)
        e = torch.where(torch.abs(ldexp(w.detach(), -e)) < _SQRT_HALF, e - 1, e)
    return ldexp(w, -e), e


def _pivot_finish(
    lp: torch.Tensor,
    ep: torch.Tensor,
    fp: torch.Tensor,
    r: torch.Tensor,
    lo_p: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``lp + lo_p + ep ln 2 + log|fp| + log|1 + r|`` and the sign ``sign(fp) sign(1 + r)``.

    ``log1p(r)`` for ``r > -1/2``, else ``log|1 + r|`` (``1 + r`` exact for ``r`` in
    ``[-4, -1/2]``); the parts are added exactly (TwoSum) and rounded once. ``fp = 0``
    (no nonzero term) or ``1 + r = 0`` (exact cancellation) give ``(-inf, 0)``.
    Branches run on safe inputs so that unused ones send no NaN into gradients.
    """
    near = r > -0.5
    v = 1 + torch.where(near, -2.0, r)
    vzero = ~near & (v == 0)
    g = torch.where(
        near,
        torch.log1p(torch.where(near, r, 0.0)),
        torch.log(torch.abs(torch.where(vzero, 1.0, v))),
    )
    dead = fp == 0
    lf = torch.log(torch.abs(torch.where(dead, 1.0, fp)))
    s1, c1 = _split(torch.where(dead, 0.0, lp), ep * _LN2_HI)
    s2, c2 = _split(lf, g)
    s, c3 = _split(s1, s2)
    corr = (c1 + c2 + c3) + ep * _LN2_LO
    if lo_p is not None:
        corr = corr + torch.where(dead, 0.0, lo_p)
    zero = dead | vzero
    log = torch.where(zero, -math.inf, s + corr)
    sgn = torch.where(zero, 0.0, torch.sign(fp) * torch.where(near, 1.0, torch.sign(v)))
    return log, torch.where(torch.isnan(log), 1.0, sgn)


def _pivot_index(
    l: torch.Tensor, f: torch.Tensor, e: torch.Tensor, signs_only: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest approximate log-magnitude ``l + e ln2 + log|f|`` along the last dim (kept)
    and its index; ``-inf`` (index 0) where every term is zero. NaN terms are ignored
    here (the callers make their slices NaN)."""
    with torch.no_grad():
        if signs_only:  # |f| = 1 and l = -inf where f = 0: the logs themselves
            mu = l.detach()
        else:
            mu = l.detach() + e * _LN2 + torch.log(torch.abs(f.detach()))
            mu = torch.where(f == 0, -math.inf, mu)
        return torch.where(torch.isnan(mu), -math.inf, mu).max(-1, keepdim=True)


def _pivot_index_nan(
    l: torch.Tensor, f: torch.Tensor, e: torch.Tensor, signs_only: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_pivot_index` without the pass that sets NaN aside: NaN where a term is NaN
    (``max`` propagates it; zero terms have ``l = -inf``, and so ``-inf`` here)."""
    with torch.no_grad():
        if signs_only:
            return l.detach().max(-1, keepdim=True)
        return (l.detach() + e * _LN2 + torch.log(torch.abs(f.detach()))).max(-1, keepdim=True)


def _sum_pivot(
    l: torch.Tensor, w: torch.Tensor, signs_only: bool, l_lo: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """log|sum_i w_i exp(l_i)| and sign along the last dim of ``[rows, n]`` (kept), relative
    to the largest term ``P``: ``log|P| + log|1 + R|``, ``R = sum_{i != p} x_i / P``
    (float64). Terms ``f_i exp(d_i) (1 + d_lo)`` with ``w_i = f_i 2^e_i``
    and ``d_i + d_lo = l_i + l_lo + e_i ln 2 - top`` exactly, so none overflows and the
    largest is about 1 whatever the weights (subnormal ones included)."""
    l = l.to(COMPUTE)
    f, e = _weight_parts(w, signs_only)
    top, p = _pivot_index(l, f, e, signs_only)
    shift = torch.where(top > -math.inf, top, 0.0)
    a, a_lo = _split(l, -shift)
    d, d_lo = _split(a, e * _LN2_HI)
    lo = a_lo + d_lo + e * _LN2_LO
    if l_lo is not None:
        lo = lo + torch.nan_to_num(l_lo.to(COMPUTE), nan=0.0, posinf=0.0, neginf=0.0)
    t = f * torch.exp(d) * (1 + lo)
    pt = t.gather(-1, p)
    rest = torch.scatter(t, -1, p, 0.0).sum(-1, keepdim=True)
    r = rest / torch.where(pt == 0, 1.0, pt)
    fp = torch.where(top == -math.inf, 0.0, f.gather(-1, p))
    lo_p = None if l_lo is None else l_lo.to(COMPUTE).gather(-1, p)
    log, sgn = _pivot_finish(l.gather(-1, p), e.gather(-1, p), fp, r, lo_p)
    nan = (torch.isnan(l) | torch.isnan(f)).any(-1, keepdim=True)
    return torch.where(nan, math.nan, log), torch.where(nan, 1.0, sgn)


def _terms_dd(
    l: torch.Tensor,
    f: torch.Tensor,
    e: torch.Tensor,
    shift: torch.Tensor,
    l_lo: torch.Tensor | None,
    signs_only: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``f exp(l + l_lo + e ln2 - shift)`` as ``hi + lo`` to ``2^-66`` relative
    (exponent a double-double, ``exp_dd``, the product with ``f`` by TwoProd)."""
    if signs_only:  # e = 0
        d, lo = two_sum(l, -shift)
        lo = torch.nan_to_num(lo, nan=0.0, posinf=0.0, neginf=0.0)
    else:
        a, a_lo = two_sum(l, -shift)
        d, d_lo = two_sum(a, e * _LN2_HI)
        lo = torch.nan_to_num(a_lo + d_lo, nan=0.0, posinf=0.0, neginf=0.0) + e * _LN2_LO
    if l_lo is not None:
        lo = lo + torch.nan_to_num(l_lo, nan=0.0, posinf=0.0, neginf=0.0)
    hi, lo = exp_dd(d, lo)
    if signs_only:  # f is -1, 0 or +1: exact products
        return hi * f, lo * f
    hi, err = two_prod(f, hi)
    return hi, f * lo + err


def _sum_pivot_dd(
    l: torch.Tensor, w: torch.Tensor, signs_only: bool, l_lo: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_sum_pivot` in double-double, rounded once (float64 results, no autograd):
    terms by :func:`_terms_dd`, the other terms summed by exact extraction in pieces of
    ``_PIECE_DD`` (the ~90 elementwise passes stay in cache), ``R`` divided and
    ``log|1 + R|`` (:func:`log1p_dd`), ``log|f_p|`` (:func:`log_dd`) in double-double."""
    rows, n = l.shape
    step = max(1, _PIECE_DD // max(rows, 1))
    top = p = None
    for start in range(0, n, step):  # the pivot: largest approximate log-magnitude
        k = min(step, n - start)
        lc = l[:, start : start + k]
        if signs_only:
            m, i = _pivot_index_nan(lc, lc, lc, True)
        else:
            f, e = _weight_parts(w[:, start : start + k], False)
            m, i = _pivot_index_nan(lc.to(COMPUTE), f, e, False)
        m = m.to(COMPUTE)
        if top is None or p is None:
            top, p = m, i
        else:  # NaN wins, as in max
            better = (m > top) | torch.isnan(m)
            top, p = torch.where(better, m, top), torch.where(better, i + start, p)
    assert top is not None and p is not None
    nan = torch.isnan(top)  # a NaN term: the result is NaN
    top = torch.where(nan, 0.0, top)
    shift = torch.where(top > -math.inf, top, 0.0)
    lp = l.gather(1, p).to(COMPUTE)
    fp, ep = _weight_parts(w.gather(1, p), signs_only)
    fp = torch.where(top == -math.inf, 0.0, fp)
    lo_p = None if l_lo is None else l_lo.gather(1, p)
    p_hi, p_lo = two_sum(*_terms_dd(lp, fp, ep, shift, lo_p, signs_only))  # exp_dd's pair
    # is not normalized (its low part may reach 2^-19 of the high one)
    s = s_lo = None
    for start in range(0, n, step):
        k = min(step, n - start)
        lc = l[:, start : start + k].to(COMPUTE)
        f, e = _weight_parts(w[:, start : start + k], signs_only)
        lo_c = None if l_lo is None else l_lo[:, start : start + k]
        hi, lo = _terms_dd(lc, f, e, shift, lo_c, signs_only)
        inside = (p >= start) & (p < start + k)  # the pivot is summed on its own
        if bool(inside.any()):
            at = torch.where(inside, p - start, 0)
            hi = hi.scatter(1, at, torch.where(inside, 0.0, hi.gather(1, at)))
            lo = lo.scatter(1, at, torch.where(inside, 0.0, lo.gather(1, at)))
        ps, ps_lo = extract_sum(hi, lo, -1)
        if s is None or s_lo is None:
            s, s_lo = ps, ps_lo
        else:
            s, err = two_sum(s, ps)
            s_lo = s_lo + ps_lo + err
    assert s is not None and s_lo is not None
    # R = (s + s_lo) / (p_hi + p_lo) in double-double
    den = torch.where(p_hi == 0, 1.0, p_hi)
    r = s / den
    q, q_err = two_prod(r, den)
    r, r_lo = two_sum(r, (((s - q) - q_err) + s_lo - r * p_lo) / den)
    g_hi, g_lo = log1p_dd(r, r_lo)
    dead = fp == 0
    if signs_only:
        lf_hi = lf_lo = torch.zeros_like(lp)
    else:
        lf_hi, lf_lo = log_dd(torch.abs(torch.where(dead, 1.0, fp)))
    t, c1 = two_sum(torch.where(dead, 0.0, lp), ep * _LN2_HI)
    t, c2 = two_sum(t, lf_hi)
    t, c3 = two_sum(t, g_hi)
    lo = (c1 + c2 + c3) + (ep * _LN2_LO + lf_lo + g_lo)
    if lo_p is not None:
        lo = lo + torch.where(dead, 0.0, lo_p)
    out = t + lo
    vs = torch.where(r > -1, 1.0, torch.where(r < -1, -1.0, torch.sign(r_lo)))
    zero = dead | (g_hi == -math.inf)
    out = torch.where(zero, -math.inf, out)
    sgn = torch.where(zero, 0.0, torch.sign(fp) * vs)
    return torch.where(nan, math.nan, out), torch.where(nan, 1.0, sgn)


def _sum_direct(
    l: torch.Tensor, w: torch.Tensor, dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Signed sums (``w`` signs, kept dim) without a shift, each accepted a posteriori,
    and ``|total|`` where the direct total was kept (NaN where the slice was re-summed);
    None where no sum can be near 1 (all ``|total|`` outside ``(e^-2, e^2)``).

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
        log, sgn, _ = _sum_shifted(l, w, dim, True)
        return log, sgn, torch.full_like(log, math.nan)
    total = _exp_sum(l, w, dim, None, _negative(w))
    a = torch.abs(total)
    log, sgn = torch.log(a), torch.sign(total)
    lo, hi = torch.aminmax(a)
    if lo.item() >= _DIRECT_MIN and hi.item() < math.inf:
        if lo.item() >= math.exp(_SMALL) or hi.item() <= math.exp(-_SMALL):
            return log, sgn, None  # no sum near 1: nothing for _refine
        return log, sgn, a
    ok = (a >= _DIRECT_MIN) & (a < math.inf)  # False for NaN
    rows = (~ok).flatten().nonzero()[:, 0]  # kept-dim order = rows of movedim(dim, -1)
    lr = l.movedim(dim, -1).reshape(-1, n).index_select(0, rows)
    wr = w.movedim(dim, -1).reshape(-1, n).index_select(0, rows)
    rlog, rsgn, _ = _sum_shifted(lr, wr, 1, True)
    log.view(-1)[rows] = rlog.flatten()
    sgn.view(-1)[rows] = rsgn.flatten()
    return log, sgn, torch.where(ok, a, math.nan)


def _sum_shifted(
    l: torch.Tensor,
    w: torch.Tensor,
    dim: int,
    signs_only: bool,
    big: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`_sum_core` (kept dim) with every term shifted by its slice's largest log,
    and for weighted sums the slices whose scaled total is below ``_DIRECT_MIN`` (where
    terms below the normal range could matter; :func:`_refine` recomputes them).

    ``big``: weights are scaled by ``2^-big`` (exactly; :func:`_weighted_terms`) and
    ``big ln 2`` is added to the log.
    """
    m = torch.amax(l, dim, keepdim=True)
    if bool(torch.isposinf(m).any()):
        log, sgn = _sum_with_inf(l, w, dim, signs_only, False)
        return log, sgn, None
    m = m.to(COMPUTE)
    ms = torch.where(torch.isfinite(m), m, 0.0)
    if big is not None:
        w = _scale_weights(w, big)
    weighted = not signs_only or _negative(w)
    total = _exp_sum(l, w, dim, ms, weighted)
    zero = total == 0  # an exact zero: -inf, sign 0 (not log(0) of the safe branch)
    log = torch.where(zero, -math.inf, _shift_log64(ms, torch.where(zero, 1.0, total), big))
    sgn = torch.sign(total)
    empty = m == -math.inf
    log = torch.where(empty, -math.inf, torch.where(torch.isnan(m), math.nan, log))
    sgn = torch.where(empty | (log == -math.inf), 0.0, torch.nan_to_num(sgn, nan=1.0))
    # a zero total of live terms is tiny too: the weights' scaling may have flushed them
    tiny = None if signs_only else (torch.abs(total) < _DIRECT_MIN) & ~empty
    return log, sgn, tiny


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
    """(m1, s1) + (m2, s2) for values s * exp(m), shifting by the larger m (exact shift).

    An infinite value (``m = +inf``) keeps its mantissa (``exp(inf - inf)`` would be NaN),
    counted by its sign: ``inf + x = inf``, and ``inf - inf`` is NaN, as float arithmetic
    would have it (a kept mantissa of -2 for ``-inf - inf`` made ``-inf - inf + inf``
    -inf, not NaN)."""
    mx = torch.maximum(m1, m2)
    ms = torch.where(mx == -math.inf, 0.0, mx)
    top = mx == math.inf
    d1 = torch.where(top & (m1 == mx), 0.0, m1 - ms)
    d2 = torch.where(top & (m2 == mx), 0.0, m2 - ms)
    if not bool(top.any()):  # (no infinite value: the common case, at no extra cost)
        return mx, s1 * torch.exp(d1) + s2 * torch.exp(d2)
    # an infinite operand counts by its sign (a scan's mantissa of 2 at m = inf made 2 inf
    # - inf inf, not NaN), and inf - inf is NaN at once (a mantissa 0 at m = inf, plus
    # inf, would give inf)
    s = _unit(m1, s1) * torch.exp(d1) + _unit(m2, s2) * torch.exp(d2)
    nan = top & (s == 0)
    return torch.where(nan, math.nan, mx), torch.where(nan, math.nan, _unit(mx, s))


def _unit(m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The mantissas ``s`` of infinite values (``m = +inf``) as their signs (NaN kept:
    ``torch.sign`` gives 0 for it)."""
    return torch.where((m == math.inf) & ~torch.isnan(s), torch.sign(s), s)


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


def _cumsum_last(
    l: torch.Tensor, w: torch.Tensor, l_lo: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix sums along the last dim of a 2-d [rows, n] float64 problem -> (shift, value).

    Fast path: shift each block by its own largest log, cumsum in float64, and
    combine with the carry from earlier blocks (an exact-shift scan over block totals).
    Blocks where a prefix could underflow relative to that shift take the exact scan.
    ``l_lo``: low parts of the logs (``l + l_lo`` exact), applied as factors ``1 + l_lo``.
    """
    rows, n = l.shape
    nb = -(-n // _BLOCK)
    pad = nb * _BLOCK - n
    if pad:
        l = torch.nn.functional.pad(l, (0, pad), value=-math.inf)
        w = torch.nn.functional.pad(w, (0, pad), value=0)
        if l_lo is not None:
            l_lo = torch.nn.functional.pad(l_lo, (0, pad), value=0.0)
    if l_lo is not None:  # the low parts as factors of the weights (relative error u^2)
        w = w.to(COMPUTE) * (1 + l_lo)
    lb = l.view(rows, nb, _BLOCK)
    wb = w.reshape(rows, nb, _BLOCK)
    mb = lb.amax(-1, keepdim=True).to(COMPUTE)
    lmin = lb  # for the smallest log: NaN terms poison only their own and later prefixes
    if bool(torch.isnan(mb).any()):
        mb = torch.where(torch.isnan(lb), -math.inf, lb).amax(-1, keepdim=True)
        lmin = torch.where(torch.isnan(lb), math.inf, lb)
    mbs = torch.where(mb == -math.inf, 0.0, mb)
    p = _scaled_terms(lb, mbs, wb, exact=True)
    p = torch.cumsum(p, -1, out=p)
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
    unsafe = (ms - torch.maximum(cm, lmin.amin(-1, keepdim=True)) > _SAFE_RANGE).squeeze(-1)
    if bool(unsafe.any()):  # refine: ignore zeros (-inf) when taking the minimum
        lo = torch.where(lmin == -math.inf, math.inf, lmin).amin(-1, keepdim=True)
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


def _direct_cumsum(
    l: torch.Tensor, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
    """log|prefix sums| and signs of ``w * exp(l)`` along the last dim of ``[rows, n]``
    without a shift (callers check :func:`_direct_ok`), piece by piece with a carry.

    With signs, also (for :func:`_refine_prefix` and :func:`_zeros.zero_prefixes`, while
    each piece is in cache) the prefixes whose log is below ``_SMALL`` in magnitude, the
    sums of ``exp(l)`` over each block of ``_BLOCK`` and the smallest ``|prefix sum|`` in
    each block; else None."""
    weighted = _negative(w)  # else w is 1, or 0 where exp(l) = 0
    rows, n = l.shape
    step = max(_BLOCK, _PIECE // max(rows, 1) // _BLOCK * _BLOCK)  # whole blocks per piece
    log = torch.empty((rows, n), dtype=COMPUTE, device=l.device)
    sgn = torch.empty_like(log)
    extra = None
    if weighted:
        extra = (
            torch.empty((rows, n), dtype=torch.bool, device=l.device),
            torch.empty((rows, -(-n // _BLOCK)), dtype=COMPUTE, device=l.device),
            torch.empty((rows, -(-n // _BLOCK)), dtype=COMPUTE, device=l.device),
        )
    buf = _scratch((rows, min(step, n)), l.device)
    wbuf = _scratch((rows, min(step, n)), l.device, 1) if weighted else buf
    carry = None
    for start in range(0, n, step):
        k = min(step, n - start)
        b = buf[:, :k].copy_(l[:, start : start + k]).exp_()
        if extra is not None:  # sum |x| per block
            full, j = k // _BLOCK, start // _BLOCK
            if full:
                b_full = b[:, : full * _BLOCK].unfold(1, _BLOCK, _BLOCK)
                torch.sum(b_full, -1, out=extra[1][:, j : j + full])
            if k % _BLOCK:
                torch.sum(b[:, full * _BLOCK :], -1, out=extra[1][:, j + full])
        if weighted:
            b.mul_(wbuf[:, :k].copy_(w[:, start : start + k]))
        torch.cumsum(b, 1, out=b)
        if carry is not None:
            b.add_(carry)
        carry = b[:, -1:].clone()
        torch.sign(b, out=sgn[:, start : start + k])
        b.abs_()
        if extra is not None:  # |log| < _SMALL, i.e. e^-_SMALL < |t| < e^_SMALL
            torch.logical_and(
                b > math.exp(-_SMALL), b < math.exp(_SMALL), out=extra[0][:, start : start + k]
            )
            if full:  # the smallest |t| per block
                torch.amin(b[:, : full * _BLOCK].unfold(1, _BLOCK, _BLOCK), -1,
                           out=extra[2][:, j : j + full])  # fmt: skip
            if k % _BLOCK:
                torch.amin(b[:, full * _BLOCK :], -1, out=extra[2][:, j + full])
        torch.log(b, out=log[:, start : start + k])
    return log, sgn, extra


def _cumsum_core(
    l: torch.Tensor, w: torch.Tensor, dim: int, signs_only: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """log|prefix sums| and signs along ``dim`` (float64 out).

    ``signs_only`` as in :func:`_sum_core`: the inputs may then be the stored float32
    logs and int8 signs, and logs in a moderate range take the direct path (one
    ``exp`` and one ``cumsum``, no shift). Weights are scaled per row by a power of two
    (largest in ``[0.5, 1)``); rows whose scaled weights go below ``_WEIGHT_SPAN``, and
    the prefixes below ``_SMALL`` in magnitude, take the pivoted scan
    (:func:`_cumsum_pivot`); prefixes not certified away from 0 are checked for an exact
    zero (:func:`_zeros.zero_prefixes`). Under autograd the same values come from
    :class:`_CumsumFn`.
    """
    dim = dim % l.ndim
    if torch.is_grad_enabled() and (l.requires_grad or w.requires_grad):
        return _CumsumFn.apply(l, w, dim, signs_only)  # type: ignore[no-any-return]
    return _cumsum_eval(l, w, dim, signs_only)


class _CumsumFn(torch.autograd.Function):
    """:func:`_cumsum_eval` with the explicit derivative: term ``i`` is in every prefix
    ``t >= i``, so ``d/dl_i = w_i e^(l_i) C_i``, ``C_i = sum_{t >= i} g_t / s_t``, a
    reversed signed prefix sum taken in log space (:func:`_cumsum_eval` again: the
    ``1 / s_t`` span any range). Conventions as in :class:`_SumFn`: a zero ``g_t`` adds
    nothing, so an exactly zero (or NaN) prefix that is not used leaves the gradients of
    the others finite; one that is used adds ``+-inf``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, l: torch.Tensor, w: torch.Tensor, dim: int, signs_only: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        log, sgn = _cumsum_eval(l.detach(), w.detach(), dim, signs_only)
        ctx.save_for_backward(l, w, log, sgn)
        ctx.dim = dim
        ctx.mark_non_differentiable(sgn)
        return log, sgn

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g_log: torch.Tensor, _g_sgn: torch.Tensor) -> tuple[Any, ...]:
        l, w, log, sgn = ctx.saved_tensors
        d = ctx.dim
        lc, sc = _grad_coef(g_log, log, sgn)
        rl, rs = _cumsum_eval(lc.flip(d), sc.flip(d), d, signs_only=True)
        gl, gw = _term_grads(l, w, rl.flip(d), rs.flip(d), None, *ctx.needs_input_grad[:2])
        return gl, gw, None, None


def _cumsum_eval(
    l: torch.Tensor, w: torch.Tensor, dim: int, signs_only: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_cumsum_core` without autograd."""
    if l.numel() == 0:  # nothing to sum: empty results of the input's shape
        empty = torch.empty(l.shape, dtype=COMPUTE, device=l.device)
        return empty, empty.clone()
    if not signs_only:
        l, w, _ = _weighted_terms(l, w, dim)
    lt, wt = l.movedim(dim, -1), w.movedim(dim, -1)
    shape = lt.shape
    n = shape[-1]
    lt, wt = lt.reshape(-1, n), wt.reshape(-1, n)
    pos = neg = None
    if bool(torch.isposinf(lt.amax()).item()):
        pos, neg = _inf_terms(lt, wt)
        pos = torch.cummax(pos.to(torch.int8), 1)[0] > 0
        neg = torch.cummax(neg.to(torch.int8), 1)[0] > 0
        lt = torch.where(torch.isposinf(lt), -math.inf, lt)
    whole = None  # rows that take the pivoted scan everywhere
    direct = signs_only and _direct_ok(*_finite_range(lt), n)
    extra = None
    if direct:
        log, sgn, extra = _direct_cumsum(lt, wt)
    else:
        big = None
        ws = wt
        if not signs_only:
            with torch.no_grad():
                wa = torch.abs(wt.detach())
                _, e_i = torch.frexp(wa.amax(-1, keepdim=True))
                big = torch.where(torch.isfinite(e_i), e_i.to(COMPUTE), 0.0)
                low = torch.where(wa == 0, math.inf, wa).amin(-1, keepdim=True)
                whole = ldexp(low, -big) < _WEIGHT_SPAN
            ws = _scale_weights(wt, big)
        shift, val = _cumsum_last(lt, ws)
        log = _shift_log64(shift, val, big)
        # sign(0) = 0 where log(0) = -inf; torch's sign(NaN) is 0, NaN has sign +1 here
        sgn = torch.where(torch.isnan(val), 1.0, torch.sign(val))
    log, sgn = _refine_prefix(lt, wt, log, sgn, signs_only, whole, direct, extra)
    blocks = None if extra is None else extra[1:]
    log, sgn = zero_prefixes(lt, wt, log, sgn, signs_only, SIGNED_SUM_C, _BLOCK, blocks)
    if pos is not None and neg is not None:
        log, sgn = _apply_inf(log, sgn, pos, neg)
    return log.reshape(shape).movedim(-1, dim), sgn.reshape(shape).movedim(-1, dim)


def _refine_prefix(
    l: torch.Tensor,
    w: torch.Tensor,
    log: torch.Tensor,
    sgn: torch.Tensor,
    signs_only: bool,
    whole: torch.Tensor | None,
    direct: bool = False,
    extra: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recompute with :func:`_cumsum_pivot` the prefixes of ``[rows, n]`` below ``_SMALL``
    in magnitude (and every prefix of the rows in ``whole``), scanning each such row only
    up to its last such prefix.

    ``direct`` (results of :func:`_direct_cumsum`, ``log|t|`` rounded once): as in
    :func:`_refine`, a prefix is kept where ``sum_{i<=t} |x_i| >= 2 max_{i<=t} |x_i|``,
    checked per block of ``_BLOCK`` against the largest term up to the end of the block:
    positive prefix sums (nondecreasing, so the prefixes below ``_SMALL`` are found by
    bisection) by themselves, signed ones by the sums of ``|x_i|`` over the blocks before
    (``extra``: the flags and block sums from the direct pass; random signs come back
    near 1 anywhere in a row, but their terms do not shrink).
    """
    rows_all, n = log.shape
    positive = direct and not _negative(w)
    if positive:
        last_t = torch.searchsorted(log, torch.full_like(log[:, :1], _SMALL))
        if not bool((last_t > 0).any()):
            return log, sgn
        bad = torch.abs(log[:, : int(last_t.max().item())]) < _SMALL
    elif extra is not None:
        bad = extra[0]
    else:
        bad = torch.abs(log) < _SMALL  # False for NaN and for zeros (-inf)
        if whole is not None:
            bad = bad | whole
    width = bad.shape[1]
    nb = -(-width // _BLOCK)
    # flagged blocks first: the per-element work stays on the flagged range
    blk = torch.nn.functional.pad(bad, (0, nb * _BLOCK - width)).unflatten(1, (nb, _BLOCK))
    blk = blk.any(-1)
    if direct and bool(blk.any()):
        lb = torch.nn.functional.pad(l[:, :width], (0, nb * _BLOCK - width), value=-math.inf)
        top = torch.cummax(lb.unflatten(1, (nb, _BLOCK)).amax(-1), -1)[0]
        # twice the largest term up to the end of each block, and 2^-19 for the rounding
        # of the sums ((n + 1) u < 2^-21 for n < 2^31)
        big = 2 * (1 + 2.0**-19) * torch.exp(top.to(COMPUTE))
        if positive:  # per prefix: the sum itself
            keep = torch.exp(log[:, :width]) >= big.repeat_interleave(_BLOCK, -1)[:, :width]
            bad = bad & ~keep
            blk = torch.nn.functional.pad(bad, (0, nb * _BLOCK - width))
            blk = blk.unflatten(1, (nb, _BLOCK)).any(-1)
        else:  # per block: the sums of |x| over the blocks before
            assert extra is not None  # the direct pass summed the blocks (signed rows)
            part = extra[1][:, :nb]
            blk = blk & ~(torch.cumsum(part, -1) - part >= big)
    if not bool(blk.any()):
        return log, sgn
    rows = blk.any(-1).nonzero()[:, 0]
    last_blk = int(blk.index_select(0, rows).nonzero()[:, 1].max().item()) + 1
    last = min(last_blk * _BLOCK, width)
    b = bad.index_select(0, rows)[:, :last]
    b = b & blk.index_select(0, rows)[:, :last_blk].repeat_interleave(_BLOCK, -1)[:, :last]
    plog, psgn = _cumsum_pivot(l[rows, :last], w[rows, :last], signs_only)
    idx = (rows.unsqueeze(-1) * n + torch.arange(last, device=log.device))[b]
    log, sgn = log.contiguous(), sgn.contiguous()  # fresh results: written in place
    log.view(-1)[idx] = plog[b]
    sgn.view(-1)[idx] = psgn[b]
    return log, sgn


def _cumsum_pivot(
    l: torch.Tensor, w: torch.Tensor, signs_only: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix sums along the last dim of ``[rows, n]``, each relative to its largest term
    (float64): ``log|P_t| + log|1 + R_t|`` with ``P_t`` the running
    largest term and ``R_t P_t`` the sum of the others, itself a prefix sum of the terms
    ``y`` = each term, except that where a new largest term arrives the previous one is
    added instead (demoted). So ``R_t`` comes from the fast prefix sums
    (:func:`_direct_cumsum` or :func:`_cumsum_last`) of ``y``, with their error relative
    to ``sum |y|``, the terms other than the pivot; the weights as ``f 2^e`` with the
    exponents in the logs (double-double), so no term is scaled out of range."""
    l = l.to(COMPUTE)
    n = l.shape[-1]
    f, e = _weight_parts(w, signs_only)
    nan = torch.isnan(l) | torch.isnan(f)
    dead = (f == 0) | (l == -math.inf) | nan
    with torch.no_grad():
        if signs_only:
            mu = torch.where(dead, -math.inf, l.detach())
        else:
            mu = torch.where(dead, -math.inf, l.detach() + e * _LN2 + torch.log(torch.abs(f)))
        top, p = torch.cummax(mu, -1)
        ar = torch.arange(n, device=l.device)
        prev = torch.cat([torch.zeros_like(p[:, :1]), p[:, :-1]], 1)
        top_prev = torch.cat([torch.full_like(top[:, :1], -math.inf), top[:, :-1]], 1)
        new = p == ar  # a new largest term: the previous one is demoted into the others
        q = torch.where(new, prev, ar)
        y_dead = torch.where(new, top_prev == -math.inf, dead)
    ly = torch.where(y_dead, -math.inf, l.gather(1, q))
    fy = torch.where(y_dead, 0.0, f.gather(1, q))
    ey = torch.where(y_dead, 0.0, e.gather(1, q))
    lp, ep = l.gather(1, p), e.gather(1, p)
    fp = torch.where(top == -math.inf, 0.0, f.gather(1, p))
    if signs_only and _direct_ok(*_finite_range(l), n):
        # sum of the others: cumsum of y exp(ly); over P_t = f_p exp(l_p), both normal here
        o = torch.cumsum(fy * torch.exp(ly), -1)
        r = o * torch.exp(-torch.where(fp == 0, 0.0, lp)) / torch.where(fp == 0, 1.0, fp)
    else:
        ly_lo = None
        if not signs_only:  # y = f 2^e exp(l): the exponent joins the log (double-double)
            ly, lo = _split(ly, ey * _LN2_HI)
            ly_lo = lo + ey * _LN2_LO
        shift, val = _cumsum_last(ly, fy, ly_lo)
        # r = val exp(shift) / (f_p 2^e_p exp(l_p)), the exponent a double-double
        live = fp != 0
        a, a_lo = _split(torch.where(live, shift, 0.0), -torch.where(live, lp, 0.0))
        d, d_lo = _split(a, -ep * _LN2_HI)
        scale = torch.exp(d) * (1 + (a_lo + d_lo - ep * _LN2_LO))
        # no other term yet (val 0, shift 0): scale may overflow, and 0 * inf is NaN
        r = torch.where(val == 0, 0.0, val * scale / torch.where(live, fp, 1.0))
    log, sgn = _pivot_finish(lp, ep, fp, r)
    nan = torch.cummax(nan.to(torch.int8), -1)[0] > 0
    return torch.where(nan, math.nan, log), torch.where(nan, 1.0, sgn)


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
        in the same dtype. An exactly zero sum, and a sum over an empty dim, is
        ``-inf`` with sign 0. Without ``return_sign`` a negative sum gives NaN. Results
        are in the promoted dtype of ``a`` and ``b``. As in SciPy, an infinite weight
        makes its term ``+-inf`` (``inf`` with its sign; NaN where ``a = -inf``, and for
        ``inf - inf``). NaN results have sign +1 (SciPy's is NaN). Weights of any
        finite size, subnormal or near the largest float, give finite results (they are
        rescaled by powers of two before any product).

    Notes
    -----
    Error: :func:`signed_sum_error_bound` with ``n`` the reduced length and
    ``log_abs_max`` the log of the largest ``|b_i exp(a_i)|``: relative to ``|L|`` near
    ``L = 0`` (``log(1 + e^-40)`` is ``4.248e-18``, not 0). With weights other than
    +-1, add ``term_log_error = 3u max|log|b_i||`` (the largest term's weight enters
    through its rounded log); the products with ``b`` are covered by ``c``. float64
    results are the exact log rounded once up to ``2^-60 (|L| + |a_p| + |log|b_p|| +
    kappa')`` (docs/accuracy.md).
    """
    check_bool("keepdim", keepdim)
    check_bool("return_sign", return_sign)
    l, w, dt = _prepare(a, b)
    nd = l.ndim  # a's and b's broadcast (a weight may have more dims than a, as in SciPy)
    if dim is None:
        l, w, d = l.reshape(-1), w.reshape(-1), 0
    else:
        d = check_dim("dim", dim, nd)
        if nd == 0:
            l, w = l.reshape(1), w.reshape(1)
    kd, f64 = keepdim and dim is not None, dt == torch.float64
    log, sgn = _sum_core(l, w, d, kd, signs_only=b is None, accurate=f64)
    if keepdim and dim is None:
        log, sgn = log.reshape([1] * nd), sgn.reshape([1] * nd)
    elif nd == 0:
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
        Same semantics as :func:`logsumexp` for every prefix (infinite and subnormal
        weights included): an exactly zero prefix is ``-inf`` with sign 0, a negative
        prefix without ``return_sign`` is NaN. A NaN term makes its own and all later
        prefixes NaN. An empty ``dim`` gives empty results of ``a``'s shape.

    Notes
    -----
    Error: :func:`signed_sum_error_bound` for each prefix with ``n = t`` terms (and
    ``log_abs_max`` the log of the prefix's largest term: relative near 0; with weights
    other than +-1 as in :func:`logsumexp`). Without ``b`` and with all logs in
    ``[-600, 700 - log n]`` the prefix sums of ``exp(a)`` are taken directly (fastest);
    otherwise blocks of 1024 are shifted by their largest log, and logs spread by more
    than 600 inside a block take an exact-shift scan (slower, same bound), so values like
    ``e^1000`` next to ``e^-1000`` never underflow. Prefixes below 2 in magnitude are
    recomputed relative to their running largest term (the others' sum is itself a
    prefix sum), unless a direct sum already meets the relative bound.
    """
    check_bool("return_sign", return_sign)
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
    a: torch.Tensor,
    b: torch.Tensor,
    sa: torch.Tensor,
    sb: torch.Tensor,
    names: tuple[str, str] = ("a", "b"),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logs ``a_ik + b_kj`` as ``[..., n, k, p]`` float64 ``hi + lo`` (TwoSum: the sum of
    logs is exact, so a matrix product is as accurate as a sum of its terms) and signs
    ``sa * sb`` (1 where the log is NaN: ``inf * 0`` is NaN, as in float arithmetic).
    ``names``: the caller's names of the operands, for ``ValueError`` messages."""
    for name, x in zip(names, (a, b), strict=True):
        if x.ndim < 2:
            raise ValueError(
                f"{name}: a matrix product needs at least 2 dimensions, got shape {tuple(x.shape)}"
            )
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(
            f"{names[1]}: expected {a.shape[-1]} rows (the columns of {names[0]}), "
            f"got {b.shape[-2]}"
        )
    try:
        batch = broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"{names[1]}: batch shape {tuple(b.shape[:-2])} does not broadcast with "
            f"{names[0]}'s {tuple(a.shape[:-2])}"
        ) from None
    t, lo = _split(a.unsqueeze(-1), b.unsqueeze(-3))
    signs = torch.where(torch.isnan(t), 1.0, sa.unsqueeze(-1) * sb.unsqueeze(-3))
    return tuple(x.expand(*batch, -1, -1, -1) for x in (t, lo, signs))  # type: ignore[return-value]


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
        ``[..., n, p]`` with :func:`logsumexp` semantics (exact zero is ``-inf``, sign 0;
        an empty inner dim ``k = 0`` gives zeros). Infinite and NaN entries give what
        float arithmetic gives for ``(sa e^a) @ (sb e^b)``: ``inf * 0`` and
        ``inf - inf`` are NaN.

    Notes
    -----
    Forms the ``n k p`` terms ``a_ik + b_kj`` exactly, as double-doubles (memory
    ``O(n k p)``), and sums them relative to their largest, so entries beyond float range
    never overflow. Error: :func:`signed_sum_error_bound` with ``n = k``, no
    ``term_log_error``, and ``log_abs_max`` the largest ``a_ik + b_kj``: relative near 0.
    """
    check_bool("return_sign", return_sign)
    check_float("a", a)
    check_float("b", b)
    dt = out_dtype(a, b)
    a64, b64 = a.to(COMPUTE), b.to(COMPUTE)
    sa = _sign_or_default("a_sign", a_sign, a64)
    sb = _sign_or_default("b_sign", b_sign, b64)
    terms, lo, signs = _matmul_terms(a64, b64, sa, sb)
    # signs (-1, 0, +1, 0 only at a -inf log: checked), as SignedLog's @: terms with the
    # same high part but other low parts stay apart in the exact check
    log, sgn = _sum_core(terms, signs, -2, False, True, dt == torch.float64, lo)
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
    if bool(((s != 0) & (log == -math.inf)).any()):
        raise ValueError(f"{name}: must be 0 where the log is -inf (the value is zero)")
    return s
