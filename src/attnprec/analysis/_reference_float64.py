"""Certified float64 references for large problems: softmax, log, FAVOR+, taylor/polynomial
and linear (elu + 1 or given features).

The output is computed in float64 and its radius is a rigorous bound on the distance to the
exact result, derived in docs/reference.md. Assumptions (the only ones):

1. ``torch.matmul`` in float64 is a conventional product: each entry is a sum of products
   in some order (any order, with or without FMA). Then ``|fl(a.b) - a.b| <= gamma_n |a|.|b|``
   (Higham 2002, eq. (3.5)), gamma_n = n u / (1 - n u), u = 2^-53.
   With underflow each product may add ``2^-1075`` absolutely (``TINY_DOT = 2^-1074`` per
   term bounds it: ``2.0**-1075`` itself rounds to 0).
2. torch's float64 ``exp`` is accurate to ``EXP_ULPS`` ulps in the normal range, i.e.
   ``|fl(exp t) - exp t| <= 2 * EXP_ULPS * u * exp(t)``, and to an absolute ``2^-1021``
   where the result is below the normal range (subnormal or flushed to zero). Vendor
   accuracy (SLEEF ``u10``, glibc) is 1 ulp; we assume 2, a factor 2 of margin
   (tests/analysis/test_reference.py measures torch's exp against mpmath).
3. Elementary operations (+ - * / sqrt) are correctly rounded (IEEE 754) with gradual
   underflow: a result below the normal range is off by at most ``2^-1075`` absolutely
   (additions and subtractions are then exact).

Every quantity that may fall below the normal range carries an absolute term: products and
exps (``TINY_DOT``, ``EXP_TINY``), the rescalings by powers of two, the division and the
bound's own evaluation. To keep those terms negligible, the values are scaled per column and
the weights per row by powers of two where their magnitudes leave [2^-64, 2^64] (both
cancel exactly or are undone at the end), the norms are taken of rescaled rows, exponents
far below a row's maximum only count absolutely, rows of log attention whose factorized
weights underflow are recomputed with a shift per (query, key) pair (:func:`_log_pairs`),
and softmax rows widened by a far key of huge norm with elementwise bounds
(:func:`_softmax_rows`).

The bound is evaluated in float64 and then inflated by ``1 + 64u``, which covers the
roundings of its own evaluation (fewer than 30 operations, each a factor <= 1 + 2u, on
nonnegative quantities); their underflows are covered by absolute terms rounded up to
``ABS = 2^-1022`` (no subnormal operands on large tensors: they cost ~10x each).
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from attnprec import _progress as progress

U = 2.0**-53
#: Assumed accuracy of torch's float64 exp, in ulps (1 ulp <= 2u relative).
EXP_ULPS = 2
#: Absolute error allowed for a computed exp below the normal range.
EXP_TINY = 2.0**-1021
#: Batch items x rows per block: keeps a few [B, rows, n_k] float64 temporaries within a
#: few hundred MB.
BLOCK_ELEMS = 2**24
#: Keys per block of the products (see _normalize).
KEY_BLOCK = 256
#: Absolute error a product below the normal range may add: half the smallest subnormal,
#: 2^-1075, is not a float64 (``2.0**-1075 == 0.0``), so the smallest subnormal bounds it.
TINY_DOT = 2.0**-1074
UP = 1 + 64 * U  # inflation covering the roundings of a bound's own evaluation
#: Absolute terms that meet large tensors are rounded up to the smallest normal number.
ABS = 2.0**-1022
UD = U * (1 + 2 * U)  # u / (1 - u), rounded up
E_REL = 2 * EXP_ULPS * U  # relative accuracy of exp
#: Shifted exponents below -CUT (computed) are "far": their weights are < 2^-1075 whenever
#: the exponent's own error is at most CUT_ERR, so they need no relative bound.
CUT = 1024.0
CUT_ERR = 16.0
#: Rows of log attention whose factorized normalizer is below this are recomputed with a
#: shift per (query, key) pair: the absolute terms (~d 2^-1017 per weight) would dominate.
LOG_ROW_MIN = 2.0**-890
#: Softmax rows whose per-row relative exp bound exceeds this are redone elementwise
#: (:func:`_softmax_rows`): a few keys of huge norm far below the row maximum.
SLOW_EPS = 2.0**-40
#: Elements of the [rows, n_k, d] temporaries of :func:`_log_pairs` per chunk.
PAIR_ELEMS = 2**21
#: Values (per column), linear features (per query row, over all keys), rows for the norms
#: and weight rows (sum |w|) whose largest magnitude is outside [2^-RANGE, 2^RANGE] are
#: rescaled by a power of two: no underflow of the products that matter, no overflow.
RANGE = 64
#: Rows the monomial states (:func:`_power_states`) leave with a radius above this times
#: max_j |v_jc| (or infinite) take the pairs.
STATE_LOOSE = 2.0**-36
#: Largest monomial state (monomials x (d_v + 1) entries, per family and batch item).
STATE_ELEMS = 2**24


def _gamma(n: int) -> float:
    nu = n * U
    return math.inf if nu >= 0.5 else nu / (1 - nu) * (1 + 4 * U)


def _pairwise_sum_(p: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0 in place by halving: each term passes ceil(log2 len) additions."""
    n = p.shape[0]
    while n > 1:
        h = n // 2
        p[:h] += p[n - h : n]
        n -= h
    return p[0]


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """2^e exactly as float64, for integer e in [-1022, 1023] (built from the bits)."""
    return ((e.to(torch.int64) + 1023) << 52).view(torch.float64)


def _ldexp(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """x 2^e for integer e (|e| <= 2044), as two multiplications by exact powers of two.

    Scaling up is exact (or overflows); scaling down is off by at most 2 TINY_DOT (each
    multiplication rounds only below the normal range).
    """
    h = torch.div(e, 2, rounding_mode="floor")
    return x * _pow2(h) * _pow2(e - h)


def _range_exp(m: torch.Tensor) -> torch.Tensor:
    """s with m 2^s in [1, 2) where m > 0 is finite and outside [2^-RANGE, 2^RANGE], else 0
    (int64): magnitudes inside that range need no rescaling."""
    s = 1 - torch.frexp(m)[1].to(torch.int64)
    out = (m > 0) & torch.isfinite(m) & ((m < 2.0**-RANGE) | (m > 2.0**RANGE))
    return torch.where(out, s, torch.zeros_like(s))


def _ldexp_if(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """:func:`_ldexp`, skipped (x itself) when every s is 0."""
    return _ldexp(x, s) if bool((s != 0).any()) else x


def _range_scale(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """x times a power of two per slice over ``dims`` bringing a max |x| outside
    [2^-RANGE, 2^RANGE] into [1, 2), where that is exact (always when scaling up; scaling
    down is checked by the round trip)."""
    s = _range_exp(x.abs().amax(dim=dims, keepdim=True))
    if not bool((s != 0).any()):
        return x
    y = _ldexp(x, s)
    exact = (s >= 0) | (_ldexp(y, -s) == x).all(dim=dims, keepdim=True)
    return torch.where(exact, y, x)


def _norm_up(x: torch.Tensor) -> torch.Tensor:
    """An upper bound of the 2-norm of each row of x [..., n, d] -> [..., n, 1].

    A row whose max |x| is outside [2^-RANGE, 2^RANGE] is scaled by 2^s into [1, 2) first,
    so its squares neither overflow nor (but for entries 2^-(537 - RANGE) below the row's
    largest) underflow; the scaling down may lose 2 TINY_DOT per entry, each square and the
    sum are charged ``2^-1068`` d absolutely. (torch's vector_norm gave 0 for [1e-170] and
    inf for [1e200].)
    """
    d = x.shape[-1]
    s = _range_exp(x.abs().amax(dim=-1, keepdim=True))
    xs = _ldexp_if(x, s)
    ss = (xs * xs).sum(dim=-1, keepdim=True)
    nrm = (torch.sqrt(ss * (1 + _gamma(d + 2)) + d * 2.0**-1068) + 2.0**-1068) * (1 + 8 * U)
    return _ldexp_if(nrm, -s) * (1 + 4 * U) + 2.0**-1070


def _shift_delta(hi: torch.Tensor, lo: torch.Tensor, err_abs: torch.Tensor | float, rel: bool):
    """Bound on |fl(x - hi) - (s - hi)| over the x_j that matter, per row.

    x_j are floats in [lo, hi] with ``|x_j - s_j| <= err_abs + (u/(1-u)) |x_j| [rel]``. When
    that error is at most CUT_ERR at hi, the x_j below fl(hi - CUT) are far: exp(s_j - hi) <
    2^-1075 and fl(exp(fl(x_j - hi))) <= EXP_TINY, inside the tiny term of
    :func:`_exp_shifted`; so only [max(lo, hi - CUT), hi] counts. Otherwise all of [lo, hi].
    """
    err_hi = err_abs + (UD * hi.abs() if rel else torch.zeros_like(hi))
    far = err_hi <= CUT_ERR  # False where hi is not finite
    lo_c = torch.where(far, torch.maximum(lo, hi - CUT), lo)
    dx = err_abs + (UD * torch.maximum(hi.abs(), lo_c.abs()) if rel else 0.0)
    return (dx + UD * (hi - lo_c)) * (1 + 4 * U) * UP


def _exp_shifted(x: torch.Tensor, m: torch.Tensor, delta: torch.Tensor) -> tuple:
    """exp(x - m) in place, m a float shift, delta a per-row bound on
    |fl(x - m) - (exact - m)| (from :func:`_shift_delta`).

    Returns (w, eps, tiny): |w - exp(exact - m)| <= eps w + tiny, per row.
    """
    w = x.sub_(m).exp_()
    # eps = (e_rel + expm1(delta)) / (1 - e_rel); tiny = EXP_TINY (1 + eps) + EXP_TINY
    eps = (E_REL + torch.expm1(delta)) / (1 - E_REL) * UP
    return w, eps, EXP_TINY * (2 + eps)


def _exp_terms(t: torch.Tensor, delta: torch.Tensor, hidden: torch.Tensor) -> tuple:
    """f = fl(exp t) and err >= |f - exp(t')| elementwise, for |t - t'| <= delta.

    err = eps f + EXP_TINY (2 + eps), eps = (e_rel + expm1(delta)) / (1 - e_rel) (as in
    :func:`_exp_shifted`), or 2 EXP_TINY where fl(t + delta) <= -746 (then exp(t') <
    2^-1076 and f <= EXP_TINY + 2^-1076); 0 where ``hidden`` (f is 0 there: t = -inf).
    """
    f = torch.exp(t)
    eps = (E_REL + torch.expm1(delta)) / (1 - E_REL) * UP
    err = eps * f + EXP_TINY * (2 + eps)
    err = torch.where(t + delta <= -746.0, torch.full_like(err, 2 * EXP_TINY), err)
    return f, torch.nan_to_num(err.masked_fill_(hidden, 0.0), nan=math.inf)


def _softcap(x: torch.Tensor, dx: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-capped scores ``x' = cap tanh(x / cap)`` from computed scores ``x`` with
    ``|x - s| <= dx + u' |x|`` (dx per row ``[..., 1]`` or elementwise), and ``dx'`` with
    ``|x' - cap tanh(s / cap)| <= dx' + u' |x'|``, from exp alone (assumption 2, no tanh
    of its own): ``a = fl(x / cap)``, ``E = fl(exp(-2 |a|))``, ``T = fl(fl(1 - E) / fl(1 +
    E))``, ``x' = fl(cap sign(a) T)``. ``(1 - E) / (1 + E)`` moves by at most ``2 |E -
    e^{-2|a|}|`` (its derivative in E is ``-2 / (1 + E)^2``), the three roundings by
    ``gamma_3`` (the quotient <= 1), so ``|T - tanh |a|| <= e_t = gamma_3 + 2 E_REL (1 + 2
    E_REL) + 3 EXP_TINY``; tanh is 1-Lipschitz, so ``|a - s / cap| <= (dx + u' |x|) / cap
    + u' |a| + TINY_DOT`` passes through times cap. Hence ``dx' = dx + 2 u' max |x| + cap
    (e_t + 2 TINY_DOT)`` (``cap |a| <= (1 + u) |x|``; max over the row where dx is per
    row). Absolute in the capped scores: at cap = 50, 3e-14."""
    a = x / cap
    E = torch.exp(-2 * a.abs())
    T = (1 - E) / (1 + E)
    xs = cap * torch.copysign(T, a)
    xm = x.abs() if dx.shape[-1] == x.shape[-1] else x.abs().amax(dim=-1, keepdim=True)
    e_t = _gamma(3) + 2 * E_REL * (1 + 2 * E_REL) + 3 * EXP_TINY
    return xs, (dx + 2 * UD * xm + cap * (e_t + 2 * TINY_DOT)) * UP


def semiring_certified(terms: tuple[tuple[float, float], ...] | list) -> bool:
    """Whether the float64 backend certifies a semiring's ``terms``: at least one, each
    ``c_r`` in [2^-60, 2^60] (the rows' largest weight stays moderate) and ``lam_r``
    finite (the tropical limit, no terms, takes a ball backend)."""
    return bool(terms) and all(2.0**-60 <= c <= 2.0**60 and math.isfinite(lam) for c, lam in terms)


def _semiring_weights(
    x: torch.Tensor,
    dxa: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    hidden: torch.Tensor | None,
    terms: tuple[tuple[float, float], ...],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w = sum_r c_r fl(exp(fl(lam_r x) - m))`` with ``m`` the largest ``fl(lam_r x)``
    over the visible keys and the terms (a float: the row factor ``e^{-m}`` cancels), and
    ``|w - W| <= eps w + tiny`` per row against the exact ``W = sum_r c_r exp(lam_r s -
    m)``. ``y_r = fl(lam_r x)`` is within ``|lam_r| (dxa + u'|x|) + u'|y_r| + TINY_DOT <=
    e_r + u'|y_r|``, ``e_r = |lam_r| dxa + u'(1 + u') max |y_r| + TINY_DOT`` (``[lo,
    hi]`` holds every x, hidden ones too); each exp is then :func:`_exp_shifted`'s with
    :func:`_shift_delta` at the shift ``m`` over ``[lam_r lo, m]``. The products by ``c_r``
    and the sum over the R terms add ``gamma_{2R}`` relative and ``2^-1074`` per product:
    ``eps = (max_r eps_r + gamma_2R) / (1 - gamma_2R)``, ``tiny = sum_r c_r tiny_r + 2 R
    TINY_DOT (1 + eps)``. ``x`` [..., rows, keys] the computed scores (``dxa`` [..., rows,
    1]), ``hidden`` the keys a row does not see (weight exactly 0)."""
    ys, bounds = [], []
    m = None
    for _, lam in terms:
        y = x * lam
        y_lo, y_hi = (lam * lo, lam * hi) if lam >= 0 else (lam * hi, lam * lo)
        e_r = abs(lam) * dxa + UD * (1 + UD) * torch.maximum(y_lo.abs(), y_hi.abs()) + TINY_DOT
        if hidden is not None:
            y.masked_fill_(hidden, -math.inf)
        top = y.amax(dim=-1, keepdim=True)
        m = top if m is None else torch.maximum(m, top)
        ys.append(y)
        bounds.append((y_lo, e_r * UP))
    assert m is not None
    g = _gamma(2 * len(terms))
    w = torch.zeros_like(x)
    eps_max = torch.zeros_like(m)
    tiny = torch.zeros_like(m)
    for (c, _), y, (y_lo, e_r) in zip(terms, ys, bounds, strict=True):
        f, eps_r, tiny_r = _exp_shifted(y, m, _shift_delta(m, y_lo, e_r, rel=True))
        w.add_(f, alpha=c)
        eps_max = torch.maximum(eps_max, eps_r)
        tiny = tiny + c * tiny_r
    eps = (eps_max + g) / (1 - g) * UP
    return w, eps, (tiny + 2 * len(terms) * TINY_DOT * (1 + eps)) * UP


def _softmax_rows(
    x: torch.Tensor,
    dxa: torch.Tensor,
    hidden: torch.Tensor,
    vv: torch.Tensor,
    vsum: torch.Tensor,
    n_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax for a few rows with elementwise error bounds: x [R, n_kp] the computed
    scores, |x_ij - s_ij| <= dxa_ij + u/(1-u) |x_ij| (dxa from the norms of q_i and k_j, not
    the largest key's); t = fl(x - max) adds u/(1-u) |t|. For rows whose per-row bound is
    loose because some keys, far below the maximum, have huge norms."""
    x = x.masked_fill(hidden, -math.inf)
    t = x - x.amax(dim=-1, keepdim=True)
    delta = (dxa + UD * (x.abs() + t.abs())) * (1 + 4 * U) * UP
    f, err = _exp_terms(t, delta, hidden)
    return _normalize(f, vv, vsum, n_k, e=err, scaled=True)[:2]


def weighted_average_float64(
    method: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
    coeffs: tuple[float, ...] = (),
    coeff_rel: float = 0.0,
    pos: torch.Tensor | None = None,
    projection: torch.Tensor | None = None,
    states: bool | None = None,
    softcap: float | None = None,
    terms: tuple[tuple[float, float], ...] = (),
    window: int | None = None,
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention in float64 with a certified radius: inputs ``[B, n, d]``.

    ``method``: ``"softmax"``, ``"log"``, ``"favor"`` (FAVOR+'s positive features over
    ``projection`` W ``[m, d]``), ``"elu1"`` (linear over elu + 1 features),
    ``"polynomial"`` (weights
    ``sum_p c_p (scale q.k)^p``, ``coeffs`` the float64 ``c_p`` within relative
    ``coeff_rel`` of the exact ones, e.g. ``1/p!`` rounded, and within ``2^-1075`` where
    they are below the normal range) or ``"linear"`` (q, k are the exact features,
    ``scale`` unused). Row blocks of the weights are computed with a bound on |w - w'|
    against the exact weights w' (up to a row factor that cancels): per row
    ``eps w + tiny`` for the nonnegative softmax and log weights, elementwise ``e`` for the
    signed polynomial and linear ones; then normalized by :func:`_normalize`. Keys are
    padded to a multiple of ``KEY_BLOCK`` with weight 0. The values are scaled per column
    by a power of two (max |v_jc| in [1, 2)), undone at the end.

    ``pos``: the positions in the sequence of the rows of ``q`` (sorted; default ``0 ..
    n_q - 1``), for the causal mask: sampled rows share the key-side work. A block of
    causal rows takes the keys through its last row only (the others are hidden anyway).

    ``softcap``: softmax over ``cap tanh(s / cap)`` (:func:`_softcap`). ``"semiring"``:
    weights ``sum_r c_r exp(lam_r s)`` over ``terms`` ``((c_r, lam_r), ...)``
    (:func:`semiring_certified`; :func:`_semiring_weights`).

    ``window`` (causal: row ``i`` sees keys ``i - window < j <= i``) and ``key_mask``
    (``[B, n_k]`` bool, False for padding keys): the pair blocks hide those keys as they
    hide future ones (a windowed block takes the key blocks from its first row's window
    on; the signed weights take the pairs, not the key states); the factored methods take
    key masks as key features of exactly 0 in their key states and, under a window (which
    states cannot subtract), the pairs: products of their features over each block's keys,
    log's rows whose normalizer underflows a shift per pair (:func:`_log_pairs`).

    The polynomial and signed linear weights come from packed-monomial key states
    (:func:`_power_states`, linear in n) where ``states`` is True, or None and
    :func:`_states_pay` finds them cheaper; rows they leave loose (:data:`STATE_LOOSE`)
    take the pairs, each element keeping the smaller radius.
    """
    n_q, n_k, d = q.shape[-2], k.shape[-2], q.shape[-1]
    nkb = -(-n_k // KEY_BLOCK)
    pad = nkb * KEY_BLOCK - n_k
    keep = None if key_mask is None else torch.nn.functional.pad(key_mask, (0, pad))
    narrow = window is not None or keep is not None
    g_d = _gamma(max(d, 1))
    if method == "linear":
        # Powers of two per query row and over all keys: the weights change by a row factor
        # (cancels), and their products underflow or overflow only where they must.
        q, k = _range_scale(q, (-1,)), _range_scale(k, (-2, -1))
    kp = torch.nn.functional.pad(k, (0, 0, 0, pad))
    sv = _range_exp(v.abs().amax(dim=-2, keepdim=True))  # [B, 1, d_v]
    vs = _ldexp_if(v, sv)  # |vs - v 2^sv| <= 2 TINY_DOT (the tau of _normalize)
    vv0 = torch.cat([vs, vs.abs(), torch.ones_like(vs[..., :1])], dim=-1)
    vv = torch.nn.functional.pad(vv0, (0, 0, 0, pad))
    vv = vv.reshape(*vv.shape[:-2], nkb, KEY_BLOCK, vv.shape[-1])
    vsum = vs.abs().sum(dim=-2, keepdim=True) * (1 + _gamma(max(n_k, 1)))  # >= sum_j |vs_jc|
    # |fl(q.k) - q.k| <= gamma_d |q|.|k| + 2 d TINY_DOT, times |scale|, and the rounding of
    # the product by the scale: u/(1-u) |x| + TINY_DOT (abs_dot covers the absolute parts).
    abs_dot = (abs(scale) * 2 * d + 4) * 2.0**-1072
    if method in ("softmax", "polynomial", "semiring"):
        # Cauchy-Schwarz: |q|.|k| <= ||q|| ||k||, the norms bounded above.
        qn, kn = _norm_up(q), _norm_up(k)
        kmax = kn.amax(dim=-2, keepdim=True)
    elif method == "linear":
        nonneg = bool((q >= 0).all()) and bool((k >= 0).all())
    elif method == "elu1":  # linear over elu + 1 features of q and k, computed here
        fq, e_f, tiny_q = _elu1_features(q, (-1,))
        fk, _, tiny_k = _elu1_features(k, (-2, -1))
        # |ab - AB| <= (2e + e^2) ab + (1 + e)(a tb + b ta) + ta tb per channel (|a - A| <=
        # e a + ta, |b - B| <= e b + tb): over d channels, per row
        eps_l = (2 * e_f + e_f * e_f) * UP
        a_top = fq.amax(dim=-1, keepdim=True)
        b_top = fk.amax(dim=(-2, -1), keepdim=True)
        tiny_l = d * ((1 + e_f) * (a_top * tiny_k + b_top * tiny_q) + tiny_q * tiny_k) * UP
    elif method == "favor":  # w_ij = sum_f exp(rs q_i.w_f) exp(rs k_j.w_f - s |k_j|^2 / 2)
        assert projection is not None
        wt = projection.to(torch.float64).transpose(-1, -2)
        eq, eps_q, tiny_q = _favor_features(q, wt, scale, keys=False)
        key_features = lambda kk: _favor_features(kk, wt, scale, keys=True)  # noqa: E731
    elif method == "log":  # w_ij = sum_c exp(scale q_ic) exp(scale k_jc), shifted by maxima
        sq, eq, eps_q, tiny_q = _exp_features(q, scale, keys=False)
        sk = k * scale  # (as _exp_features forms it: _log_pairs' keys)
        key_features = lambda kk: _exp_features(kk, scale, keys=True)[1:]  # noqa: E731
        exact_scale = math.frexp(scale)[0] in (0.5, -0.5)

    def key_side(kk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log, FAVOR+) The features of keys ``kk`` (shifted by their largest) and the
        per-row ``eps``, ``tiny`` of the weights they make with the queries'."""
        ek, eps_k, tiny_k = key_features(kk)
        # Features a, b (computed) vs A, B: |ab - AB| <= ((1+eps_q)(1+eps_k) - 1) ab
        # + 5 (tiny_q + tiny_k) (a, b <= 1 + 4u, eps < 1; where an eps >= 1 the row's eps
        # below is >= 1 too, so e_D >= |D| and the radius is inf anyway); over the features.
        eps = torch.expm1(torch.log1p(eps_q) + torch.log1p(eps_k)) * UP  # no cancellation
        return ek, eps, eq.shape[-1] * 6 * (tiny_q + tiny_k)

    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=torch.float64)
    rad = torch.empty_like(out)
    # (the batch items share each row block: its temporaries are [B, rows, keys])
    block = max(1, BLOCK_ELEMS // (math.prod(q.shape[:-2]) * nkb * KEY_BLOCK))
    pos = torch.arange(n_q) if pos is None else pos
    featured = method in ("log", "favor", "elu1") or (method == "linear" and nonneg)
    # (key states cannot subtract a window: under one, the featured weights take the pairs)
    factored = featured and window is None
    if featured:  # nonnegative weights w_ij = sum_c a_ic b_jc, within eps w + tiny per row
        fa, fb, eps_w, tiny_w = {
            "log": lambda: (eq, *key_side(k)),
            "favor": lambda: (eq, *key_side(k)),
            "elu1": lambda: (fq, fk, eps_l, tiny_l),
            "linear": lambda: (q, k, 0.0, 0.0),
        }[method]()
        g_f = _gamma(max(fa.shape[-1], 1))
    if factored:

        def kept(b: torch.Tensor) -> torch.Tensor:
            """Key features, exactly 0 for masked keys (their weight in every row)."""
            return b if key_mask is None else b.masked_fill(~key_mask[..., None], 0.0)

        # linear in n: the nonnegative weights factor over the channels, so every row's
        # sums come from per-channel prefix states of the keys (linear: the given features
        # are exact, the powers of two above cancel)
        out, rad, den = _factored_states(fa, kept(fb), vv0, vsum, n_k, eps_w, tiny_w, causal, pos)
    if method == "log" and factored:
        # rows whose factorized normalizer underflows take a shift per (query, key) pair
        bad = (den[..., 0] < LOG_ROW_MIN) | ~torch.isfinite(rad).all(dim=-1)  # [B, rows]
        for b, rows in _rows_by_batch(bad):
            hb = min(nkb, int(pos[rows].max()) // KEY_BLOCK + 1) if causal else nkb
            cols = torch.arange(hb * KEY_BLOCK)
            hid = cols[None, :] >= n_k
            if causal:
                hid = hid | (cols[None, :] > pos[rows, None])
            if keep is not None:
                hid = hid | ~keep[b, None, : hb * KEY_BLOCK]
            hid = hid.expand(len(rows), -1)
            y2, r2 = _log_pairs(sq[b, rows], sk[b, : hb * KEY_BLOCK], exact_scale, hid,
                                vv[b, :hb], vsum[b], n_k)  # fmt: skip
            better = r2 <= rad[b, rows]
            out[b, rows] = torch.where(better, y2, out[b, rows])
            rad[b, rows] = torch.where(better, r2, rad[b, rows])
    # signed weights that factor over packed monomials: from key states where cheaper
    # than the pairs; rows they leave loose take the pairs below
    todo = None if factored else torch.arange(n_q)
    merge = False
    if method == "polynomial" or (method == "linear" and not nonneg):
        cf, sc_ = (coeffs, scale) if method == "polynomial" else ((0.0, 1.0), 1.0)
        if narrow:  # (the key states hold every key before a row)
            states = False
        elif states is None:
            states = _states_pay(cf, sc_, d, v.shape[-1], n_q, n_k, causal, pos)
        if states:
            out, rad = _power_states(q, k, vs, cf, coeff_rel, sc_, causal, pos)
            vmx = vs.abs().amax(dim=-2, keepdim=True)
            loose = ~(rad <= STATE_LOOSE * vmx).all(-1)  # [B, rows]
            todo = torch.nonzero(loose.any(0)).flatten()
            merge = True
    # the pair weights of the other methods, by row blocks
    assert todo is not None or factored
    starts = range(0) if todo is None else range(0, len(todo), block)
    eps: torch.Tensor | float | None
    tiny: torch.Tensor | float | None
    for i0 in starts:
        assert todo is not None
        ri = todo[i0 : i0 + block]
        # the key blocks the rows may see (causal: through the last row's; a window: from
        # the first row's)
        hb = min(nkb, int(pos[ri].max()) // KEY_BLOCK + 1) if causal else nkb
        lb = 0 if window is None else max(0, int(pos[ri].min()) - window + 1) // KEY_BLOCK
        cols = torch.arange(lb * KEY_BLOCK, hb * KEY_BLOCK)
        kp_b = kp[..., lb * KEY_BLOCK : hb * KEY_BLOCK, :]
        vv_b = vv[..., lb:hb, :, :]
        hidden = cols[None, :] >= n_k
        if causal:
            hidden = hidden | (cols[None, :] > pos[ri, None])
        if window is not None:
            hidden = hidden | (cols[None, :] <= pos[ri, None] - window)
        if keep is not None:  # [B, rows, keys]
            hidden = hidden | ~keep[:, None, lb * KEY_BLOCK : hb * KEY_BLOCK]
        e = None
        eps = tiny = None
        scaled = False
        if method in ("softmax", "polynomial", "semiring"):
            x = q[..., ri, :] @ kp_b.transpose(-1, -2)
            # a dot beyond float64's range (a tiny scale may bring the score back) is lost:
            # its rows are left uncertified (inf radius, redone in ball arithmetic)
            lost = (~torch.isfinite(x) & ~hidden).any(-1, keepdim=True)
            x.mul_(scale).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            # |x_ij - s_ij| <= dxa + u/(1-u) |x_ij| (the scale last: its product with
            # gamma_d may underflow where the dot's bound does not)
            # (where a window or key mask hides keys, the largest norm of those a row sees:
            # one far key does not loosen every row; hidden keys get weight 0)
            k_row = kmax
            if narrow:
                kn_b = torch.nn.functional.pad(kn[..., 0], (0, pad))
                kn_b = kn_b[..., lb * KEY_BLOCK : hb * KEY_BLOCK].unsqueeze(-2)
                k_row = torch.where(hidden, 0.0, kn_b).amax(dim=-1, keepdim=True)
            dxa = ((g_d * qn[..., ri, :]) * k_row * abs(scale) + abs_dot) * UP
            dxa = dxa.masked_fill(lost, math.inf)
            if narrow:  # (soft-capping's largest |x| over the keys a row sees)
                x.masked_fill_(hidden, 0.0)
            if softcap is not None:
                x, dxa = _softcap(x, dxa, softcap)
            if narrow:  # the extremes over the keys a row sees
                lo = x.masked_fill(hidden, math.inf).amin(dim=-1, keepdim=True)
                hi = x.masked_fill(hidden, -math.inf).amax(dim=-1, keepdim=True)
            else:  # over all columns: padded or hidden keys only widen [lo, hi]
                lo, hi = torch.aminmax(x, dim=-1, keepdim=True)
        if featured:  # under a window: the products of the features, pair by pair
            # (log's and FAVOR+'s key features shifted by the block's largest, not the
            # sequence's: a far key underflows no window that does not hold it)
            k0, k1 = lb * KEY_BLOCK, min(hb * KEY_BLOCK, n_k)
            fb_b, e_b, t_b = (
                (fb[..., k0:k1, :], eps_w, tiny_w)
                if method in ("elu1", "linear")
                else key_side(k[..., k0:k1, :])
            )
            fb_b = torch.nn.functional.pad(fb_b, (0, 0, 0, (hb - lb) * KEY_BLOCK - (k1 - k0)))
            w = fa[..., ri, :] @ fb_b.transpose(-1, -2)
            # against w* = sum_c a_c b_c (exactly, of the computed features; within e_b w*
            # + t_b of the exact weight): gamma_F w* and F products' underflow, and w* <=
            # (w + F TINY_DOT) / (1 - gamma_F)
            e_r, t_r = (x[..., ri, :] if isinstance(x, torch.Tensor) else x for x in (e_b, t_b))
            eps = (g_f + e_r) / (1 - g_f) * UP
            tiny = (t_r + 2 * fa.shape[-1] * TINY_DOT * (1 + eps)) * UP
        elif method == "polynomial":
            dx = (dxa + UD * torch.maximum(-lo, hi)) * UP
            w, e, tiny = _polynomial_weights(x, dx, coeffs, coeff_rel, split=True)
        elif method == "linear":  # signed features (nonnegative ones are featured above)
            w = q[..., ri, :] @ kp_b.transpose(-1, -2)
            # |fl(a.b) - a.b| <= gamma_d |a|.|b| + 2 d TINY_DOT, and |a|.|b| is at most its
            # computed value / (1 - gamma_d) + 2 d TINY_DOT (nonnegative terms)
            # (the absolute part as a per-row tiny, floored at 2^-1022 by _normalize)
            tiny = 4 * d * TINY_DOT * UP + 2.0**-1072
            mag = q[..., ri, :].abs() @ kp_b.abs().transpose(-1, -2)
            e = mag.mul_(g_d / (1 - g_d) * UP)
        masks = bool(pad) or causal or keep is not None
        if e is not None:  # polynomial, linear
            if masks:
                w.masked_fill_(hidden, 0.0)
                e.masked_fill_(hidden, 0.0)
        elif featured:
            if masks:
                w.masked_fill_(hidden, 0.0)
        elif method == "softmax":
            if masks:
                x.masked_fill_(hidden, -math.inf)
                hi = x.amax(dim=-1, keepdim=True)
            # the weights are taken relative to exp(m_i), m_i = hi a float: exactly
            w, eps, tiny = _exp_shifted(x, hi, _shift_delta(hi, lo, dxa, rel=True))
            scaled = True  # the largest weight is exp(0) = 1
            assert isinstance(eps, torch.Tensor)
            # rows where the largest key norm (not the scores' size) makes eps large
            slow = (eps > SLOW_EPS) & (dxa > 64 * UD * (hi.abs() + CUT))
        elif method == "semiring":
            masked = hidden if masks else None
            w, eps, tiny = _semiring_weights(x, dxa, lo, hi, masked, terms)
            scaled = True  # the largest weight is at least min_r c_r, at most sum_r c_r
        y, r, den = _normalize(w, vv_b, vsum, n_k, eps=eps, tiny=tiny, e=e, scaled=scaled)
        if method == "log":  # (windowed) rows whose normalizer underflows: a shift per pair
            bad = (den[..., 0] < LOG_ROW_MIN) | ~torch.isfinite(r).all(dim=-1)
            for b, rows in _rows_by_batch(bad):
                hid = hidden.expand(q.shape[0], len(ri), -1)[b, rows]
                sk_b = sk[b, lb * KEY_BLOCK : hb * KEY_BLOCK]
                y2, r2 = _log_pairs(sq[b, ri[rows]], sk_b, exact_scale, hid, vv_b[b], vsum[b], n_k)
                better = r2 <= r[b, rows]
                y[b, rows] = torch.where(better, y2, y[b, rows])
                r[b, rows] = torch.where(better, r2, r[b, rows])
        elif featured:  # (windowed) rows whose weights underflow at the block's shift: each
            # row over its own keys (their features shifted by the largest of those)
            bad = (den[..., 0] < LOG_ROW_MIN) | ~torch.isfinite(r).all(dim=-1)
            for b, rows in _rows_by_batch(bad):
                hid = hidden.expand(q.shape[0], len(ri), -1)[b, rows]
                for i, row in enumerate(rows.tolist()):
                    keys = cols[~hid[i]]
                    at = int(ri[row])
                    y2, r2 = weighted_average_float64(
                        method, q[b : b + 1, at : at + 1], k[b : b + 1, keys],
                        vs[b : b + 1, keys], False, scale, projection=projection,
                    )  # fmt: skip
                    better = r2[0, 0] <= r[b, row]
                    y[b, row] = torch.where(better, y2[0, 0], y[b, row])
                    r[b, row] = torch.where(better, r2[0, 0], r[b, row])
        if method == "softmax":  # rows that some far key with a huge norm widened
            for b, rows in _rows_by_batch(slow[..., 0]):
                # worth it only if the keys with w > 0 have norms well below the largest
                kn_b = torch.nn.functional.pad(kn[b, :, 0], (0, pad))
                kn_b = kn_b[lb * KEY_BLOCK : hb * KEY_BLOCK]
                near = torch.where(w[b, rows] > 0, kn_b, 0.0).amax(dim=-1)
                rows = rows[near * 64 < kmax[b, 0, 0]]
                if not len(rows):
                    continue
                hid = hidden.expand(q.shape[0], len(ri), -1)[b, rows]
                xr = (q[b, ri[rows]] @ kp_b[b].transpose(-1, -2)).mul_(scale)
                dxe = (abs(scale) * g_d * qn[b, ri[rows]] * kn_b + abs_dot) * UP
                if softcap is not None:
                    xr, dxe = _softcap(xr, dxe.expand_as(xr), softcap)
                y2, r2 = _softmax_rows(xr, dxe, hid, vv_b[b], vsum[b], n_k)
                better = r2 <= r[b, rows]
                y[b, rows] = torch.where(better, y2, y[b, rows])
                r[b, rows] = torch.where(better, r2, r[b, rows])
        if merge:  # elementwise, the smaller radius
            better = r <= rad[..., ri, :]
            y, r = torch.where(better, y, out[..., ri, :]), torch.where(better, r, rad[..., ri, :])
        out[..., ri, :] = y
        rad[..., ri, :] = r
        progress.rows(i0 + len(ri), len(todo))
    if method in ("softmax", "semiring", "log", "favor", "elu1") or (method == "linear" and nonneg):
        # Nonnegative weights: the exact output lies in [-max_j |v_jc|, max_j |v_jc|];
        # clamping into it only moves the value closer (and keeps fl(y) 2^-sv finite).
        vmx = vs.abs().amax(dim=-2, keepdim=True)
        out.clamp_(min=-vmx, max=vmx)
    # Undo the column scaling: the value may round (below the normal range, 2 TINY_DOT),
    # the radius is rounded up by the absolute term.
    # (per column: only those scaled up, i.e. scaled down now, may round)
    if bool((sv != 0).any()):
        out = _ldexp(out, -sv)
        rad = _ldexp(rad, -sv) * UP + (sv > 0).to(rad.dtype) * (4 * TINY_DOT)  # float64
        rad.masked_fill_(~torch.isfinite(out), math.inf)
    return out, rad


def _factored_states(
    a: torch.Tensor,
    b: torch.Tensor,
    vv: torch.Tensor,
    vsum: torch.Tensor,
    n_k: int,
    eps: torch.Tensor | float,
    tiny: torch.Tensor | float | None,
    causal: bool,
    pos: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention with nonnegative weights that factor over channels, ``w_ij = sum_c a_ic
    b_jc`` (log's exp features, linear's nonnegative features), from per-channel key
    states, ``O((n_q + n_k) d d_v)``: row i's sums ``[N | A | D]_i = sum_c a_ic sum_j b_jc
    [V_j | |V_j| | 1]`` over the keys it sees (causal: ``j <= pos_i``), for ``a`` ``[B, n_q,
    d]``, ``b`` ``[B, n_k, d]`` (>= 0) and ``vv`` ``[B, n_k, 2 d_v + 1]``. Keys in chunks of
    ``L``: a prefix sum inside a chunk (any order) plus the carried total of the chunks
    before, so each term passes its product with V, at most ``L - 1 + ceil(n_k / L)``
    additions, its product with a and ``d - 1`` more over the channels: the sums are within
    ``gamma`` of that depth plus 2 of the exact sums of the terms, relative to their
    magnitudes. Each product ``b V`` may underflow by ``TINY_DOT`` (then times ``a``), each
    ``a S`` by ``TINY_DOT``. The weights ``w`` are within ``eps w + tiny`` (per row) of the
    exact ones; the quotient is :func:`_quotient`'s. Returns y, r, D."""
    B, n_q, d = a.shape
    K = vv.shape[-1]
    # chunks of about sqrt(n_k) keys (the depth ~ 2 sqrt(n_k)), their temporaries bounded
    L = min(max(KEY_BLOCK, math.isqrt(max(n_k, 1)) + 1), max(1, BLOCK_ELEMS // max(B * d * K, 1)))
    n_ch = -(-n_k // L)
    g_n = _gamma(L + n_ch + d + 2)
    a_max = max(float(a.max()) if a.numel() else 0.0, 1.0)
    uf = max(2 * (n_k + 1) * d * TINY_DOT * a_max * (1 + 4 * U), ABS)
    nd = torch.empty(B, n_q, K, dtype=torch.float64)
    S = torch.zeros(B, 1, d, K, dtype=torch.float64)
    for j0 in range(0, n_k, L):
        j1 = min(n_k, j0 + L)
        T = b[:, j0:j1, :, None] * vv[:, j0:j1, None, :]  # [B, L, d, K]
        if not causal:
            S = S + T.sum(1, keepdim=True)
            continue
        lo, hi = torch.searchsorted(pos, torch.tensor([j0, j1]))
        if hi > lo:
            at = pos[int(lo) : int(hi)] - j0
            Sr = T.cumsum(1)[:, at] + S  # [B, r, d, K]
            nd[:, int(lo) : int(hi)] = torch.einsum("brc,brck->brk", a[:, int(lo) : int(hi)], Sr)
        S = S + T.sum(1, keepdim=True)
    if not causal:
        nd = torch.einsum("bic,bck->bik", a, S[:, 0])
    return _quotient(nd, g_n, uf, n_k, vsum, eps, tiny)


def _states_pay(
    coeffs: tuple[float, ...],
    scale: float,
    d: int,
    d_v: int,
    n_q: int,
    n_k: int,
    causal: bool,
    pos: torch.Tensor,
) -> bool:
    """Whether :func:`_power_states` holds these weights (every nonzero ``c_p scale^p``
    within float64's normal range, a state of at most ``STATE_ELEMS`` entries) and costs
    less than the pairs: about ``4 F (d_v + 1)`` operations per row and per key (two
    families, absorbed and read), and the chunk's own keys as pairs, against ``2 d + 8
    d_v + 12 P + 40`` per (row, visible key) (products, Horner, the bounds, the sums)."""
    from attnprec.analysis.bounds._state import power_chunk

    powers = [p for p, c in enumerate(coeffs) if c != 0]
    if not powers:
        return False
    for p in powers:
        if p and scale == 0:
            return False
        lg = math.log2(abs(coeffs[p])) + (p * math.log2(abs(scale)) if p else 0.0)
        if not -1000 < lg < 1000:
            return False
    top = max(powers)
    F = sum(math.comb(d + p - 1, p) for p in powers)
    if F * (d_v + 1) > STATE_ELEMS:
        return False
    seen = float((pos + 1).sum()) if causal else n_q * n_k
    pairs = seen * (2 * d + 8 * d_v + 12 * top + 40)
    own = n_q * power_chunk(F) / 2 * (2 * d + 4 * (d_v + 1) + 4 * top) if causal else 0.0
    return 4 * F * (d_v + 1) * (n_k + n_q) + own < pairs


def _power_states(
    q: torch.Tensor,
    k: torch.Tensor,
    vs: torch.Tensor,
    coeffs: tuple[float, ...],
    coeff_rel: float,
    scale: float,
    causal: bool,
    pos: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with signed weights ``w_ij = sum_p c'_p (scale q_i.k_j)^p`` (polynomial;
    linear's signed features: ``coeffs = (0, 1)``, scale 1) from packed-monomial key states
    (:func:`.bounds._state.power_sums`), ``O((n_q + n_k) F d_v)`` for ``F`` monomials:
    ``S_p = sum_j (q_i.k_j)^p [V_j | 1]`` and the magnitudes ``M_p = sum_j (|q_i|.|k_j|)^p
    [|V_j| | 1]``, each within ``rho M*_p + fl`` of its exact value (``power_rho``, with
    the chunk; ``power_floor``), ``M*_p <= Mh_p = (M_p + fl) / (1 - rho)``. The coefficients
    ``cs_p = fl(c_p scale^p)`` are within ``eps_c = g_p (1 + coeff_rel) + coeff_rel`` of
    ``c'_p scale^p``; the sum over the powers adds ``g_P``. With ``T = sum_p |cs_p| Mh_p``
    and ``Fl = sum_p |cs_p| fl``: ``|N - N*| <= ((g_P + eps_c') (1 + rho) + rho / (1 -
    eps_c)) T + 2 Fl`` (``eps_c' = eps_c / (1 - eps_c)``), and ``sum_j |w_ij| |G_j| <= T
    / (1 - eps_c)``; the values' scaling (tau per entry) adds ``tau sum_j |w_ij|``; the
    quotient is :func:`_close`'s. ``vs``: the scaled values ``[B, n_k, d_v]``; ``pos``:
    the rows' positions (sorted). Returns y, r."""
    from attnprec.analysis.bounds import _state

    B, n_q, d = q.shape
    n_k = k.shape[-2]
    powers = [p for p, c in enumerate(coeffs) if c != 0]
    top = max(powers)
    # c_p s^p exact, rounded once (within u, inside g_p): formed by products, a power s^j
    # could underflow on its own where c_p s^p is normal (c_4 = 2^700, s = 2^-400: the term
    # was dropped under a radius 1e12 times too small; a review).
    cs = [float(Fraction(coeffs[p]) * Fraction(scale) ** p) for p in powers]
    eps_c = _gamma(top + 1) * (1 + coeff_rel) + coeff_rel
    eps_c1 = eps_c / (1 - eps_c) * UP
    F = sum(math.comb(d + p - 1, p) for p in powers)
    chunk = _state.power_chunk(F * B)  # its [B, chunk, F] features
    rho = _state.power_rho(n_k, F, d, top, chunk)
    amax = float(q.abs().max()) if q.numel() else 0.0
    gmax = max(1.0, float(vs.abs().max()) if vs.numel() else 0.0)  # max |G|
    fl = gmax * _state.power_floor(n_k, F, d, top, amax, float(k.abs().max())) + ABS
    g_p = _gamma(len(powers) + 1)
    kap = ((g_p + eps_c1) * (1 + rho) + rho / (1 - eps_c)) * UP
    up_c = 1 / (1 - eps_c) * UP
    ones = torch.ones_like(vs[..., :1])
    G, Gm = torch.cat([vs, ones], -1), torch.cat([vs.abs(), ones], -1)
    if causal:  # power_sums takes the rows by position
        a = q.new_zeros(B, n_k, d)
        a[:, pos] = q
        rows = pos
    else:
        a, rows = q, torch.arange(n_q)
    tau = 2 * TINY_DOT

    def fn(ri: torch.Tensor, sums: list[dict[int, torch.Tensor]]) -> dict[str, torch.Tensor]:
        S, M = sums
        num = torch.zeros_like(S[powers[0]])
        T = torch.zeros_like(num)
        for c, p in zip(cs, powers, strict=True):
            num.add_(S[p], alpha=c)
            T.add_(M[p].add(fl), alpha=abs(c))
        T.mul_((1 + _gamma(len(powers) + 2)) / (1 - rho) * UP)
        Fl = sum(abs(c) for c in cs) * fl * UP
        err = T.mul(kap).add_(2 * Fl)  # [N | D] columns
        dabs_up = T[..., -1:] * up_c
        c1 = torch.clamp(tau * dabs_up, min=ABS)
        a_up = torch.add(c1, T[..., :-1], alpha=up_c)
        # (c1 >= tau B: the values' scaling, in e_N by _close)
        ev, e1 = err[..., :-1], err[..., -1:]
        y, r = _close(num[..., :-1], num[..., -1:], a_up, ev, c1, e1, dabs_up, 0.0)
        return {"y": y, "r": r}

    fams = [(a, k, G), (a.abs(), k.abs(), Gm)]
    out = _state.power_sums(fams, powers, causal, rows, fn, chunk=chunk)
    return out["y"], out["r"]


def _rows_by_batch(bad: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(b, indices of the True rows of bad[b]) for each batch item b with any."""
    return [(b, torch.nonzero(bad[b]).flatten()) for b in range(bad.shape[0]) if bool(bad[b].any())]


def _exp_features(x: torch.Tensor, scale: float, keys: bool) -> tuple:
    """exp(scale x - a), a the row max (queries) or the max over all keys, with its bound
    |f - exact| <= eps f + tiny: eps, tiny per row [..., n, 1] (queries) or [..., 1, 1].

    Also returns t = fl(scale x) (for :func:`_log_pairs`): off by at most 2 TINY_DOT for a
    scale that is a power of two (below the normal range only), else u/(1-u) |t| more.
    """
    t = x * scale
    exact = math.frexp(scale)[0] in (0.5, -0.5)
    dims = (-2, -1) if keys else (-1,)
    lo, hi = t.amin(dim=dims, keepdim=True), t.amax(dim=dims, keepdim=True)
    delta = _shift_delta(hi, lo, 2 * TINY_DOT, rel=not exact)
    return (t, *_exp_shifted(t.clone(), hi, delta))


def _favor_features(x: torch.Tensor, wt: torch.Tensor, scale: float, keys: bool) -> tuple:
    """FAVOR+'s positive features of ``x`` ``[B, n, d]`` over ``wt`` = W^T ``[d, m]``, up
    to a factor common to a row (queries, which also drop ``exp(-s |q|^2 / 2)``) or to all
    keys: ``f = exp(t - max t)`` with ``t = rs x.w`` (``- s |x|^2 / 2`` for keys), ``rs =
    fl(sqrt(s))`` within u of ``sqrt(s)``. Each exponent is within ``err`` of the exact
    one: the dot ``gamma_d |x|.|w|`` (plus ``d`` products' underflow), ``rs``'s own
    rounding on ``|x.w| <= |x|.|w|``, the product by ``rs``, and for keys the norm's
    ``gamma_d |x|^2``, its product by ``s / 2`` and the subtraction; then the shift and the
    exp as :func:`_exp_features`. Returns f, eps, tiny (per row for queries, ``[B, 1, 1]``
    for keys)."""
    d = x.shape[-1]
    g_d = _gamma(max(d, 1))
    rs = math.sqrt(scale)
    aw = (x.abs() @ wt.abs()) / (1 - g_d) + d * TINY_DOT  # >= |x|.|w| exactly
    t = (x @ wt) * rs
    err = rs * ((g_d + UD) * aw + d * TINY_DOT) + UD * t.abs() + TINY_DOT
    if keys:
        half = scale / 2
        nrm = (x * x).sum(dim=-1, keepdim=True)  # within gamma_d, plus d underflows
        tn = nrm * half
        t = t - tn
        err = err + half * (g_d * nrm / (1 - g_d) + d * TINY_DOT) + UD * tn.abs() + TINY_DOT
        err = err + UD * t.abs()  # the subtraction
    err = err * (1 + 8 * U) * UP
    dims = (-2, -1) if keys else (-1,)
    lo, hi = t.amin(dim=dims, keepdim=True), t.amax(dim=dims, keepdim=True)
    delta = _shift_delta(hi, lo, err.amax(dim=dims, keepdim=True), rel=False)
    return _exp_shifted(t, hi, delta)


def _elu1_features(x: torch.Tensor, dims: tuple[int, ...]) -> tuple:
    """elu(x) + 1 (``x + 1`` for ``x > 0``, ``exp(x)`` otherwise; the branch on the exact
    x) as ``f`` with ``|f - exact| <= e f + tiny``: ``fl(x + 1)`` within u, ``fl(exp x)``
    within E_REL relative and EXP_TINY absolute. Scaled by a power of two per slice over
    ``dims`` where its largest value leaves [2^-RANGE, 2^RANGE] (exact when scaling up,
    checked by the round trip when down; a row or global factor that cancels), ``tiny``
    with it. Returns f, e (a float), tiny ``[..., 1, 1]`` or per row."""
    f = torch.where(x > 0, x + 1, torch.exp(torch.clamp(x, max=0.0)))
    e = max(UD, E_REL / (1 - E_REL)) * UP
    s = _range_exp(f.amax(dim=dims, keepdim=True))
    y = _ldexp(f, s)
    exact = (s >= 0) | (_ldexp(y, -s) == f).all(dim=dims, keepdim=True)
    s = torch.where(exact, s, torch.zeros_like(s))
    tiny = _ldexp(torch.full(s.shape, EXP_TINY / (1 - E_REL) * UP, dtype=torch.float64), s)
    return torch.where(exact, y, f), e, tiny.clamp_min(TINY_DOT)  # (scaled below 2^-1074)


def _log_pairs(
    sq: torch.Tensor,
    sk: torch.Tensor,
    exact_scale: bool,
    hidden: torch.Tensor,
    vv: torch.Tensor,
    vsum: torch.Tensor,
    n_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log attention for a few rows, with a shift per row over (key, channel) pairs.

    ``sq`` [R, d] and ``sk`` [n_k, d] are the scaled features fl(scale q), fl(scale k), off
    the exact ones by dsq, dsk <= 2 TINY_DOT (``exact_scale``: a power of two) or
    u/(1-u) |sq| + 2 TINY_DOT elementwise; ``hidden`` [R, n_k + pad]. With x_jc = fl(sq_c + sk_jc)
    and M = max x over the visible pairs (a float: the factor exp(-M) cancels),
    t = fl(x - M) is within delta = dsq + dsk + u/(1-u) (|x| + |t|) of the exact exponent
    minus M, elementwise; f = fl(exp t) is within eps f + EXP_TINY (2 + eps) of the exact
    term, eps = (e_rel + expm1(delta)) / (1 - e_rel), or 2 EXP_TINY when t + delta <= -746
    (both are then below 2^-1075 + EXP_TINY). w_j = fl(sum_c f_jc) (nonnegative terms,
    gamma_d); the largest w is >= exp(0) = 1, so nothing that matters underflows.
    """
    n_kp, d = hidden.shape[-1], sq.shape[-1]
    skp = torch.nn.functional.pad(sk, (0, 0, 0, n_kp - sk.shape[0]))
    g_d = _gamma(max(d, 1))
    ys, rs = [], []
    chunk = max(1, PAIR_ELEMS // (n_kp * max(d, 1)))
    for r0 in range(0, sq.shape[0], chunk):
        r1 = min(sq.shape[0], r0 + chunk)
        hid = hidden[r0:r1, :, None]
        x = sq[r0:r1, None, :] + skp[None]
        x.masked_fill_(hid, -math.inf)
        t = x - x.amax(dim=(-2, -1), keepdim=True)
        ds = x.abs() + t.abs()
        if not exact_scale:
            ds += sq[r0:r1, None, :].abs() + skp[None].abs()
        delta = (UD * ds + 4 * TINY_DOT) * (1 + 4 * U) * UP
        f, err = _exp_terms(t, delta, hid.expand_as(t))
        w = f.sum(dim=-1)
        e = (err.sum(dim=-1) * (1 + g_d) + g_d / (1 - g_d) * w) * UP
        y, r, _ = _normalize(w, vv, vsum, n_k, e=e, scaled=True)
        ys.append(y)
        rs.append(r)
    return torch.cat(ys), torch.cat(rs)


def _polynomial_weights(
    x: torch.Tensor,
    dx: torch.Tensor,
    coeffs: tuple[float, ...],
    coeff_rel: float,
    split: bool = False,
) -> tuple:
    """``w = sum_p c_p x^p`` by Horner and ``e >= |w - sum_p c'_p s^p|`` elementwise.

    ``|x - s| <= dx`` (per row or elementwise), ``|c_p - c'_p| <= coeff_rel |c_p|`` (and
    ``TINY_DOT`` where ``coeff_rel > 0`` and ``|c_p|`` is below the normal range, e.g.
    ``1/p!`` for p >= 171). With ``S(t) = sum |c_p| t^p``, ``S'`` its derivative and
    ``t = |x| + dx``: Horner adds at most ``gamma_{2P} S(|x|)`` (Higham 2002, eq. (5.3)),
    the argument error at most ``dx S'(t)`` (mean value theorem), the coefficients
    ``coeff_rel S(t)`` plus ``n_sub TINY_DOT max(1, t)^P``, and underflow
    ``P 2^-1075 max(1, t)^P`` (each product's ``2^-1075`` carried through the later powers,
    times at most 1 + gamma_2P). S and S' (nonnegative terms, 2P operations each) are
    evaluated in float64 and inflated; their own underflow is charged with the absolute
    term ``(2P + n_sub + 4) TINY_DOT max(1, t)^P``.

    ``split``: return ``(w, e, tiny)`` with that absolute term as a per-row ``tiny``
    [..., rows, 1] (t its row maximum) instead of inside ``e``: an elementwise product by a
    subnormal number costs ~10x a normal one.
    """
    top = len(coeffs) - 1
    n_sub = sum(1 for c in coeffs if abs(c) < 2.0**-1022) if coeff_rel > 0 else 0
    w = torch.full_like(x, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        w.mul_(x).add_(c)
    t = x.abs().add_(dx)
    s = torch.full_like(t, abs(coeffs[-1]))
    ds = torch.full_like(t, top * abs(coeffs[-1]))
    for p in range(top - 1, -1, -1):
        s.mul_(t).add_(abs(coeffs[p]))
        if p >= 1:
            ds.mul_(t).add_(p * abs(coeffs[p]))
    infl = 1 + _gamma(2 * top + 2)
    e = s.mul_((_gamma(2 * top) + coeff_rel) * infl) + ds.mul_(dx * infl)
    unit = (2 * top + n_sub + 4) * TINY_DOT
    if split:
        tiny = unit * t.amax(dim=-1, keepdim=True).clamp_(min=1.0).pow_(top) * UP
        return w, e.mul_(UP), tiny
    e += unit * t.clamp_(min=1.0).pow_(top)
    return w, e.mul_(UP)


def _normalize(
    w: torch.Tensor,
    vv: torch.Tensor,
    vsum: torch.Tensor,
    n_k: int,
    eps: torch.Tensor | float | None = None,
    tiny: torch.Tensor | float | None = None,
    e: torch.Tensor | None = None,
    scaled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y = W V / W 1 for W [..., rows, nkb * KEY_BLOCK] and a bound on its distance to the
    exact weights W': ``eps w + tiny`` per row (W >= 0) or ``e (+ tiny)`` elementwise (any
    sign). Returns y, the radius and D = fl(W 1) [..., rows, 1].

    Unless ``scaled`` (the caller knows every row's largest |w| is moderate), rows whose
    sum |w| is outside [2^-RANGE, 2^RANGE] (so that w v may underflow or the sums overflow)
    are redone with w scaled by 2^s, max |w| in [1, 2): a row factor that cancels, exact
    when scaling up; scaling down may lose 2 TINY_DOT per weight and per e (added to tiny).
    Inputs [B, rows, n_k] for that (w from :func:`weighted_average_float64`).
    """
    y, r, den, bsum = _normalize_once(w, vv, vsum, n_k, eps, tiny, e)
    if scaled:
        return y, r, den
    bsum = bsum[..., 0]  # sum |w| (computed)
    need = (bsum > 0) & ~((bsum >= 2.0**-RANGE) & (bsum <= 2.0**RANGE))
    for b, rows in _rows_by_batch(need):
        wb = w[b, rows]
        s = _range_exp(wb.abs().amax(dim=-1, keepdim=True))
        if not bool((s != 0).any()):
            continue
        down = (s < 0).to(torch.float64) * (2 * TINY_DOT)
        tiny_b = torch.zeros(len(rows), 1, dtype=torch.float64)
        if tiny is not None:
            tiny_b = tiny_b + (tiny[b, rows] if isinstance(tiny, torch.Tensor) else tiny)
        eps_b = eps[b, rows] if isinstance(eps, torch.Tensor) else eps
        y2, r2, _, _ = _normalize_once(
            _ldexp(wb, s),
            vv[b],
            vsum[b],
            n_k,
            eps_b,
            (_ldexp(tiny_b, s) + 3 * down) * UP,
            None if e is None else _ldexp(e[b, rows], s),
        )
        better = r2 <= r[b, rows]
        y[b, rows] = torch.where(better, y2, y[b, rows])
        r[b, rows] = torch.where(better, r2, r[b, rows])
    return y, r, den


def _normalize_once(
    w: torch.Tensor,
    vv: torch.Tensor,
    vsum: torch.Tensor,
    n_k: int,
    eps: torch.Tensor | float | None,
    tiny: torch.Tensor | float | None,
    e: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_normalize` without the rescaling; returns y, r, D and B = fl(sum |w|).

    V = ``vv[..., :d_v]`` is within tau = 2 TINY_DOT of the exact (scaled) values V*,
    ``vv`` = [V | |V| | 1], ``vsum`` >= sum_j |V_jc|.

    Keys are summed in blocks of ``KEY_BLOCK`` by the matmul (any order inside a block) and
    the block sums pairwise by us, so each product passes at most
    KEY_BLOCK - 1 + ceil(log2(n_k / KEY_BLOCK)) additions: the gamma of the sums is that
    depth plus one, not n_k. Each product w v or e |v| may underflow by TINY_DOT (2 n_k
    TINY_DOT per sum, with its carrying). With N, D the computed sums, A >= sum |w| |V|,
    B >= sum |w|: |N - N'| <= g A + 2 n_k TINY_DOT + tau B + sum (e + tiny) |V*| =: e_N,
    |D - D'| <= g B + sum (e + tiny) =: e_D, |N/D - N'/D'| <= (e_N + |y'| e_D) / |D| with
    |y'| <= (A + sum (e + tiny) |V*|) / (|D| - e_D), and fl(N / D) adds u/(1-u) |y| +
    TINY_DOT.
    """
    nkb = vv.shape[-3]
    g_n = _gamma(min(n_k, KEY_BLOCK) + math.ceil(math.log2(nkb)) + 1)

    def sums(m: torch.Tensor) -> torch.Tensor:
        mb = m.reshape(*m.shape[:-1], nkb, KEY_BLOCK).transpose(-2, -3)
        return _pairwise_sum_((mb @ vv).movedim(-3, 0))

    nd = sums(w)
    uf = max(2 * n_k * TINY_DOT, ABS)  # >= the products of one sum that underflow
    if e is None:  # W >= 0: sum |w| |v| and sum |w| are the columns of the same product
        assert eps is not None
        y, r, den = _quotient(nd, g_n, uf, n_k, vsum, eps, tiny)
        return y, r, den, nd[..., -1:]
    d_v = (vv.shape[-1] - 1) // 2
    mags = nd if bool((w >= 0).all()) else sums(w.abs())  # |W| = W: same product
    errs = sums(e)
    up = 1 / (1 - g_n) * UP
    tau, vs_up, tiny_ = _abs_terms(n_k, vsum, tiny)
    dabs_up = mags[..., -1:] * up
    c1 = uf + torch.clamp(tau * dabs_up, min=ABS)
    a_up = torch.add(c1, mags[..., d_v:-1], alpha=up)
    e1_ = errs[..., -1:] * up
    c2 = uf + torch.clamp(tau * e1_, min=ABS)  # [..., rows, 1]
    ev = torch.add(tiny_ * vs_up + c2, errs[..., d_v:-1], alpha=up)
    e1 = (e1_ + tiny_ * n_k) * UP
    y, r = _close(nd[..., :d_v], nd[..., -1:], a_up, ev, c1, e1, dabs_up, g_n)
    return y, r, nd[..., -1:], mags[..., -1:]


def _abs_terms(
    n_k: int, vsum: torch.Tensor, tiny: torch.Tensor | float | None
) -> tuple[float, torch.Tensor, torch.Tensor | float]:
    """tau = |V - V*| (the column scaling), ``vs_up >= sum_j |V*_jc|`` and ``tiny`` floored
    at ABS. Absolute terms are rounded up to ABS = 2^-1022 where they meet [rows, d_v]
    tensors: no subnormal operands there (~10x slower each); rows are scaled so that sum
    |w| >= 2^-RANGE (or the caller's largest w is moderate), so that costs nothing
    relative."""
    tau = 2 * TINY_DOT
    vs_up = vsum + max(n_k * tau, ABS)
    if isinstance(tiny, torch.Tensor):
        return tau, vs_up, torch.clamp(tiny, min=ABS)
    return tau, vs_up, max(0.0 if tiny is None else tiny, ABS)


def _quotient(
    nd: torch.Tensor,
    g_n: float,
    uf: float,
    n_k: int,
    vsum: torch.Tensor,
    eps: torch.Tensor | float,
    tiny: torch.Tensor | float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y = N / D and its radius from the computed sums ``nd`` = [N | A | D] of nonnegative
    weights w (each sum within ``g_n`` of the exact sum of the computed terms, relative to
    the magnitudes, and ``uf`` absolute for the products that underflow), ``|w - w'| <=
    eps w + tiny`` per row against the exact weights (:func:`_normalize_once`'s model).
    Returns y, r, D."""
    d_v = (nd.shape[-1] - 1) // 2
    den = nd[..., -1:]
    up = 1 / (1 - g_n) * UP  # a computed sum of nonnegative terms, times this, bounds it
    tau, vs_up, tiny_ = _abs_terms(n_k, vsum, tiny)
    dabs_up = den * up
    c1 = uf + torch.clamp(tau * dabs_up, min=ABS)  # >= uf + tau B, [..., rows, 1]
    a_up = torch.add(c1, nd[..., d_v:-1], alpha=up)
    base = tiny_ * vs_up
    if isinstance(eps, torch.Tensor):
        ev = torch.addcmul(base, eps, a_up)  # eps A + tiny sum |V*|
    else:
        ev = torch.add(base, a_up, alpha=eps)
    e1 = (eps * dabs_up + tiny_ * n_k) * UP
    y, r = _close(nd[..., :d_v], den, a_up, ev, c1, e1, dabs_up, g_n)
    return y, r, den


def _close(
    num: torch.Tensor,
    den: torch.Tensor,
    a_up: torch.Tensor,
    ev: torch.Tensor,
    c1: torch.Tensor,
    e1: torch.Tensor,
    dabs_up: torch.Tensor,
    g_n: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The quotient and its radius from the sums' bounds (:func:`_normalize_once`)."""
    # (Few passes over [rows, d_v]: the relative inflations of e_num, ybar and r are folded
    # into one UP^3 at the end; all quantities are nonnegative, r is monotone in them.)
    e_den = (g_n * dabs_up + e1) * UP
    aden = den.abs()
    # e_num = g A + uf + tau B + E_V; + ABS aden, i.e. + ABS after the division: the
    # underflows of this evaluation (each <= 2^-1075) and of the division
    e_num = torch.add(ev, a_up, alpha=g_n).add_(c1 + ABS + ABS * aden)
    y = num / den
    ybar = (a_up + ev).div_(aden - e_den)
    r = torch.addcmul(e_num, ybar, e_den).div_(aden).add_(y.abs(), alpha=UD).mul_(UP**3)
    resolved = aden > e_den  # else the normalizer's enclosure contains 0: no value claimed
    ok = (r < math.inf) & resolved  # False for NaN
    if not bool(ok.all()):
        r.masked_fill_(~ok, math.inf)
        y.masked_fill_(~resolved, math.nan)
    return y, r
