"""Rounding bound of the feature-map methods with polynomial or given features: taylor,
polynomial, Taylor-linearized semirings and linear attention over given features.

The weights are ``w_ij = sum_f phi_f(q_i) psi_f(k_j)`` (signed in general): for a
polynomial ``sum_p c_p (scale q.k)^p`` the packed monomials of power p
(``sum_{|alpha| = p} |phi_alpha psi_alpha| = |c_p| (|scale| |q|.|k|)^p`` exactly); for
``linear`` the features as given. Covered: any algorithm that builds each feature as a
product of its factors, each side with its constants wherever it puts them (folded into
the query's or the key's features, or split over both as Based splits ``sqrt(c_p)`` and
``sqrt(scale)``: :func:`_roundings`), accumulates a state ``sum_j psi(k_j) v_j`` and
``sum_j psi(k_j)`` in any order (chunked, segmented or recurrent), and divides ``phi . S /
phi . z`` once, or sums ``phi . psi`` products directly. Per term of power p: ``6p + 2``
roundings on the two sides, the loads, two products, and sums of depth ``depth(n) + F +
2``. :mod:`.quotient` (signed terms: the normalizer's lower bound is ``D - sum |t| |rho^D -
1|``) does the rest. The underflows and the overflow checks take the constant factors
(coefficient, scale) on either side and in any order (:func:`_factors`), a root of the
coefficient on each entry too.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import torch

from attnprec._device import scaled
from attnprec.analysis._reference_float64 import _polynomial_weights
from attnprec.analysis.bounds._rows import (
    BUDGET,
    Block,
    Visible,
    logits64,
    normalize_signed,
    row_positions,
    sq_deviation,
    stream,
)
from attnprec.analysis.bounds.quotient import Terms, absorbable, finish, quotient, unbounded
from attnprec.analysis.bounds.rounding import (
    TINY,
    U64,
    deficit,
    excess,
    gamma,
    order_sq,
    order_sq_sum,
    upper,
)
from attnprec.analysis.bounds.softmax import Loaded, rep_units, schedule
from attnprec.analysis.precision import Precision

__all__ = ["featured_rounding"]


def _roundings(p: int, nl: int, sc: float, precision: Precision) -> tuple[int, int, int]:
    """``(n_f, n_q, n_k)``: the roundings on the path of a term of power ``p`` (``nl``:
    whether a load rounds), those on the query's side with the constants' representations
    (shared by every key), and a key's own, wherever the declaration lets a kernel put its
    constants (:attr:`Precision.constants`), ``2p`` loads (``p`` a side) included.

    ``"any"``: on each side ``p`` entries times a constant (a root of the scale, folded or
    not), their ``p - 1`` products, the product times a constant (a root of the coefficient
    ``c_p p! / alpha!``) and the two constants' representations, the entries' one taken
    ``p`` times: ``3p + 1`` a side, ``n_f = 6p + 2``; a key's own ``2p``. ``"folded"``: the
    constants once, on the query's or the key's side: ``2p + 2`` there (``p`` more where
    compute does not hold the scale, its representation on each entry), ``p - 1`` on the
    other; ``n_q``, ``n_k`` the larger of the two placements. Power 0: the two constants.
    Until 2026-12-05 the count took the constants on the query side only, which Based's
    split of ``sqrt(c_p)`` and ``sqrt(scale)`` over both sides exceeds (a term 7.6 u off
    against 6 u counted; a kernel's output at 0.94 of that bound)."""
    if p == 0:
        return 2, 2, 0
    n_k = 2 * p + p * nl
    if precision.constants == "any":
        return 6 * p + 2 + 2 * p * nl, 4 * p + 2 + p * nl, n_k
    rep = p * rep_units(sc, precision.compute)
    return 3 * p + 1 + 2 * p * nl + rep, 2 * p + 2 + p * nl + rep, n_k


def _products(top: int, precision: Precision) -> int:
    """The products on a term's path, each of which may underflow: ``2 top + 3`` with the
    constants folded (:attr:`Precision.constants`), ``4 top + 3`` split over both sides
    (each side's entries times a root, their products, the coefficient's root)."""
    return (4 if precision.constants == "any" else 2) * top + 3


def _growth(powers: list[int] | None, nl: int, sc: float, precision: Precision) -> int:
    """Roundings that may grow a term on its way to the sums (the overflow checks), for
    any placement of the constants whatever the declaration: the path of the query-side
    form (:func:`_roundings`, ``"folded"``) and ``4 top + 2`` more for the constants on the
    key's side too and a root of the coefficient on each entry besides the scale's
    (``c_p^(1/p)`` per factor: 23 for power 2 where loads round; a review's NaN under a
    finite bound when this took 13). ``powers`` None: given features (``2 top + 4``)."""
    if powers is None:
        return 6
    top = max(powers)
    folded = replace(precision, constants="folded")
    n_f = max(_roundings(p, nl, sc, folded)[0] for p in powers)
    return max(2 * top + 4, n_f) + 4 * top + 2


def _factors(coeffs: Sequence[float], s: float, powers: list[int]) -> float:
    """``>= prod max(1, |x|)`` over a feature's constant factors, for any way a kernel
    forms them: the coefficient ``c_p p! / alpha!`` (<= ``|c_p| p!``) and the scale's
    ``p`` factors apart, or folded into one constant ``c_p scale^p p! / alpha!``. An
    underflow of a partial product is carried by the factors still to come, and the
    constant itself must fit compute (a review's kernel scaling q first and multiplying
    by the coefficient last was 68x outside the bound with c_2 = 6e4, scale 1e-3, when this
    took ``|c_p| |scale|^p p!`` only)."""
    return max(max(abs(coeffs[p]) * math.factorial(p), 1.0) * max(abs(s), 1.0) ** p for p in powers)


#: Keys whose signs decide which monomials a causal row's absorbed charge forms over every
#: key (:func:`_feature_groups`): the rows before it take every monomial over them.
SIGN_KEYS = 256


def _one_signed(sg: torch.Tensor, vis: Visible, at: torch.Tensor) -> torch.Tensor:
    """``[B, r, c]``: whether the features' signs ``sg [B, n, c]`` (-1, 0, 1; a hidden key's
    0) are of one sign over the keys each row ``at`` sees (exact counts: prefix sums of
    integers, a window's as their difference)."""
    out = None
    for one in (sg > 0, sg < 0):
        cnt = one.to(torch.int32)  # [B, n, c] (n < 2^31)
        if not vis.causal:
            cnt = cnt.sum(-2, keepdim=True).expand(*cnt.shape[:-2], at.numel(), cnt.shape[-1])
        else:
            cum = cnt.cumsum(-2, dtype=torch.int32)
            cnt = cum[..., at, :]
            if vis.window is not None:
                lo = at - vis.window
                cnt = cnt - torch.where((lo >= 0).unsqueeze(-1), cum[..., lo.clamp_min(0), :], 0)
        none = cnt == 0
        out = none if out is None else out | none
    assert out is not None
    return out


def _feature_groups(
    q: torch.Tensor,
    k: torch.Tensor,
    coeffs: Sequence[float] | None,
    s: float,
    vis: Visible,
    at: torch.Tensor,
    sample: slice | None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``log |phi_f(q)|``, ``log |psi_f(k)|`` (``[B, r, c]``, ``[B, n, c]``) of the rows
    ``at`` and every key, with ``[B, r, c]`` where a feature is of one sign (or 0) over the
    keys the row sees (:func:`_one_signed`; :func:`_feature_absorbed`), at most
    :data:`._expprod.SHARE_CHANNELS` at a time: the given ones (``coeffs`` None), or the
    packed monomials of each power with ``c_p != 0``, the query's with their constant
    ``|c_p| |s|^p p! / alpha!`` (0 features: ``-inf``). ``sample``: keys every row sees
    (None: none); a monomial of both signs over them is not formed past its signs (degree
    3 at d = 16: 969 monomials, of which N(0, 1) keys leave the 17 of powers 0 and 2's
    squares)."""
    from attnprec.analysis.bounds._expprod import SHARE_CHANNELS, column_groups

    shown = None if vis.key_mask is None else vis.key_mask.unsqueeze(-1)

    def signs(sg: torch.Tensor) -> torch.Tensor:  # (hidden keys: 0)
        return sg if shown is None else torch.where(shown, sg, 0)

    def kept(
        X: torch.Tensor, Y: torch.Tensor, sg: torch.Tensor
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        keep = _one_signed(signs(sg), vis, at)
        cols = keep.reshape(-1, keep.shape[-1]).any(0)
        if bool(cols.any()):
            yield X[..., cols], Y[..., cols], keep[..., cols]

    lq, lk = torch.log(q.abs()), torch.log(k.abs())
    if coeffs is None:
        for X, Y, sg in column_groups(lq, lk, torch.sign(k)):
            assert sg is not None
            yield from kept(X, Y, sg)
        return
    neg = k < 0
    d = q.shape[-1]
    for p, c in enumerate(coeffs):
        if c == 0 or (p > 0 and s == 0):  # (no such term: scale 0 leaves the constant)
            continue
        idx = torch.tensor(list(itertools.combinations_with_replacement(range(d), p)))
        if p > 0 and sample is not None:  # of both signs over keys every row sees
            zero = (k[..., sample, :] == 0)[..., idx].any(-1)
            if shown is not None:
                zero = zero | ~shown[..., sample, :]
            ns = (neg[..., sample, :][..., idx].sum(-1) % 2 == 1) & ~zero  # [B, keys, M]
            both = ns.any(-2) & (~ns & ~zero).any(-2)
            idx = idx[~both.reshape(-1, idx.shape[0]).all(0)]
        for i in range(0, idx.shape[0], SHARE_CHANNELS):
            part = idx[i : i + SHARE_CHANNELS]  # [c, p] (p = 0: one empty monomial)
            # (in logs: c s^p underflows for a subnormal coefficient, a thorough-profile draw)
            lc = math.log(abs(c)) + (p * math.log(abs(s)) if p else 0.0) + math.lgamma(p + 1)
            const = torch.tensor(
                [lc - sum(math.lgamma(list(a).count(j) + 1) for j in set(a))
                 for a in part.tolist()],
                dtype=torch.float64,
            )  # fmt: skip
            if p == 0:
                Y0 = torch.zeros_like(lk[..., :1])
                yield from kept(torch.zeros_like(lq[..., :1]) + const, Y0, torch.ones_like(Y0))
                continue
            ly = lk[..., part].sum(-1)
            odd = neg[..., part].sum(-1) % 2 == 1
            sg = torch.where(ly > -math.inf, torch.where(odd, -1.0, 1.0), 0.0)
            yield from kept(lq[..., part].sum(-1) + const, ly, sg)


def _feature_absorbed(
    q: torch.Tensor,
    k: torch.Tensor,
    coeffs: Sequence[float] | None,
    s: float,
    causal: bool | Visible,
    rows: torch.Tensor | None,
    ua: float,
) -> torch.Tensor:
    """``[B, r]``: per row (``rows``, or every row), the magnitude ``sum |phi_f psi_fj|``
    of its terms that a per-feature state sum may absorb, ``|psi_fj|`` within ``2 u_a``
    of the feature's sum over the keys the row sees (:func:`._expprod._absorbed_logs`, in
    float64, raised by ``1 + 1e-8``), for the features of one sign over the keys the row
    sees: a state-form kernel sums each feature over the keys, and a key's term of one
    feature drowns in a sink's there though its weight does not; the terms lost from a
    feature of either sign take either sign, as the sums' other roundings, which the level
    takes at random (a review: a sink of 4096 in one channel of polynomial ``(1, 1)``,
    every later key 0.45 u of it there; the correct fp32 kernel ATYPICAL on every element,
    5.8x the level). Under windows and key masks, over the keys each row sees (a later
    review: one negative key hidden from the rows, or after them, took the feature from
    every row's charge: 824 of 1,024 elements ATYPICAL). The rows of a causal sequence
    before :data:`SIGN_KEYS` take every monomial over the keys before it."""
    from attnprec.analysis.bounds._expprod import _absorbed_logs

    vis = causal if isinstance(causal, Visible) else Visible(bool(causal))
    n = k.shape[-2]
    at = torch.arange(q.shape[-2]) if rows is None else rows

    def lost(at: torch.Tensor, k: torch.Tensor, vis: Visible, sample: slice | None) -> torch.Tensor:
        qr = q[:, at]
        out = torch.full(qr.shape[:-1], -math.inf, dtype=torch.float64)
        for X, Y, keep in _feature_groups(qr, k, coeffs, s, vis, at, sample):
            out = torch.logaddexp(out, _absorbed_logs(X, Y, vis, at, ua, keep)[0])
        return out

    if vis.window is not None:  # (no key every row sees)
        return torch.exp(lost(at, k, vis, None)) * (1 + 1e-8)
    if not vis.causal:
        return torch.exp(lost(at, k, vis, slice(None, None, max(1, n // SIGN_KEYS)))) * (1 + 1e-8)
    early = at < SIGN_KEYS
    out = torch.empty(q.shape[0], at.numel(), dtype=torch.float64)
    if bool(early.any()):  # rows that see only the keys before SIGN_KEYS: every monomial
        km = None if vis.key_mask is None else vis.key_mask[..., :SIGN_KEYS]
        out[:, early] = lost(at[early], k[:, :SIGN_KEYS], replace(vis, key_mask=km), None)
    if not bool(early.all()):
        out[:, ~early] = lost(at[~early], k, vis, slice(None, SIGN_KEYS))
    return torch.exp(out) * (1 + 1e-8)


def featured_rounding(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    precision: Precision,
    sc: float | None,
    causal: bool | Visible,
    lam: float,
    coeffs: Sequence[float] | None,
    rows: torch.Tensor | None = None,
    coeff_rel: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Per output element ``[B, rows, d_v]``: ``"sound"``, ``"typical"`` and the masks of
    the intermediates that may overflow. ``coeffs`` ``c_0..c_P`` (the exact method's,
    within relative ``coeff_rel`` of the floats given) with the scale ``sc``; or None:
    ``q``, ``k`` are the features themselves (``linear``)."""
    ld = Loaded(precision)
    key_over = ld.over(k).any(-1) | ld.over(v).any(-1)  # once for the sequence
    s = 1.0 if sc is None or coeffs is None else float(sc)
    share = _feature_absorbed(q, k, coeffs, s, causal, rows, precision.accumulate.u)
    tops = _key_tops(k, ld.abs(v))
    at_rows = row_positions(rows)

    def block(b: Block) -> dict[str, torch.Tensor]:
        at = at_rows(b.idx)
        return _block(b, precision, sc, lam, coeffs, coeff_rel, key_over, share[:, at], tops)

    return stream(block, q, k, v, causal, rows)


def _key_tops(k: torch.Tensor, v_loaded: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Over every key of the sequence: each channel's largest ``|k|`` ``[B, d]``, each
    key's ``max(1, max_c |k_jc|)`` and ``max_e |v~_je|`` ``[B, n]`` (``v_loaded``: ``|v~|``
    bounded, :meth:`.softmax.Loaded.abs`), the largest ``||k_j||`` ``[B]``. A kernel may
    form the features, weights and products of keys a row does not see (padding, a block
    past the diagonal or a window's edge) and mask them by a product, where 0 * inf is NaN
    (a review: a padding key's monomial of 9e4, a product q_c k_c of 9e4 in fp16, NaN rows
    under finite bounds, taylor and linear, both evaluations)."""
    ka = k.abs()
    k_norm = upper(k.norm(dim=-1).amax(-1), k.shape[-1] + 2)
    k1 = ka.amax(-1).clamp(min=1.0)  # [B, n]
    return ka.amax(-2), k1, v_loaded.amax(-1), k_norm


def _hidden_over(
    q: torch.Tensor,
    tops: tuple[torch.Tensor, ...],
    coeffs: Sequence[float] | None,
    s: float,
    top: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For rows ``q [B, r, d]``, bounds over every key (:func:`_key_tops`): a key's
    feature factor ``max(1, |k|)^top`` ``[B, 1]`` (its features at most ``cw`` times it),
    a weight ``|phi(q).psi(k)| <= sum_p |c_p s^p| (|q| . |k_j|)^p`` ``[B, r, 1]`` with
    ``|q| . |k_j| <= min(sum_c |q_c| max_j |k_jc|, ||q|| max_j ||k_j||)``, and a key's
    feature factor times its value ``[B, 1]`` (a state's outer product ``psi(k_j) v_j``;
    a hidden key's weight is masked before it meets its value: a later review, the product
    of the three maxima, made 46% of taylor's fp16 elements on outliers unbounded where no
    intermediate passed 49,295)."""
    d = q.shape[-1]
    qk = torch.minimum(
        q.abs() @ tops[0].unsqueeze(-1), q.norm(dim=-1, keepdim=True) * tops[3][:, None, None]
    )
    qk = upper(qk, d + 4)
    if coeffs is None:
        w = qk
    else:
        w = sum(abs(c) * (abs(s) * qk) ** p for p, c in enumerate(coeffs) if c != 0)
        w = upper(w, (top + 1) * (d + 4))
    k1 = tops[1] ** top
    return k1.amax(-1, keepdim=True), w, (k1 * tops[2]).amax(-1, keepdim=True)


def _block(
    blk: Block,
    precision: Precision,
    sc: float | None,
    lam: float,
    coeffs: Sequence[float] | None,
    coeff_rel: float,
    key_over: torch.Tensor,
    share: torch.Tensor,
    tops: tuple[torch.Tensor, ...],
) -> dict[str, torch.Tensor]:
    """One row block; ``key_over [B, n]``: the sequence's keys whose key or value
    overflows compute on loading (:meth:`.softmax.Loaded.rows_over`); ``share [B, r]``: the
    magnitude of the rows' terms a per-feature sum may absorb (:func:`_feature_absorbed`);
    ``tops``: :func:`_key_tops`."""
    fc, fa = precision.compute, precision.accumulate
    uc, ua = fc.u, fa.u
    up = precision.product_u()
    ld = Loaded(precision)
    q, k, v = blk.q, blk.k, blk.v
    d, m = q.shape[-1], k.shape[-2]
    nvis = blk.visible
    _, dep_k = schedule(precision, nvis, blk.span)
    nl = math.ceil(ld.ul / fc.u)  # a load's roundings of compute: 2 under "rtz" (a hunt)
    groups: list[tuple[torch.Tensor, tuple[int, int, int], torch.Tensor, int]]
    if coeffs is None:  # linear: given features
        F = d
        absdot = q.abs() @ k.abs().transpose(-1, -2)
        w = q @ k.transpose(-1, -2)
        e_w = upper(gamma(d, U64) * absdot + d * 2.0**-1074, d + 2)  # (absdot: a dot over d)
        groups = [(absdot, (2 * nl, nl, nl), (q * q) @ (k * k).transpose(-1, -2), 0)]
        top, s = 1, 1.0
        cw = 1.0  # the coefficients' and the scale's largest factor
        cq: torch.Tensor = q.abs().amax(-1).clamp(min=1.0)
    else:
        s = float(sc if sc is not None else 1.0)
        x, sig64, absdot = logits64(q, k, s)
        w, e_w = _polynomial_weights(x.clone(), sig64, tuple(coeffs), coeff_rel)
        sqd = s * s * ((q * q) @ (k * k).transpose(-1, -2))
        powers = [p for p, c in enumerate(coeffs) if c != 0]
        F = sum(math.comb(d + p - 1, p) for p in powers)
        ad = abs(s) * absdot
        groups = [
            (abs(coeffs[p]) * ad**p, _roundings(p, nl, s, precision),
             coeffs[p] * coeffs[p] * math.factorial(p) * sqd**p, p)
            for p in powers
        ]  # fmt: skip
        top = max(powers)
        cw = _factors(coeffs, s, powers)
        cq = cw * q.abs().amax(-1).clamp(min=1.0) ** top
    ck = k.abs().amax(-1).clamp(min=1.0) ** top
    va, vd = blk.per_key("|v|", torch.abs), blk.per_key("v's load error", ld.err)
    # the exact normalizer, numerator and output, with float64 radii
    w, e_w, nz, pos, Dl = normalize_signed(blk, w, e_w, v)
    y = nz.y
    # per-power factors (the depth is per row when causal)
    dep = (dep_k + F + 2)[:, None]  # [r, 1]
    lg_hi, lg_lo = dep * math.log1p(ua), dep * math.log1p(-ua)  # logs of the sums' paths
    s_hi = torch.exp(lg_hi)
    mag = torch.zeros_like(w)
    a = torch.zeros_like(w)
    c = torch.zeros_like(w)
    la = torch.zeros_like(w)
    lc = torch.zeros_like(w)
    ad_sum = torch.zeros_like(w)
    var_key = torch.zeros_like(w)
    sq_all = torch.zeros_like(w)
    sq_rest = torch.zeros_like(w)  # of the features whose aggregates are not formed
    nq_max = 0
    for tabs, (n_f, nq, nk), sq, pw in groups:
        nq_max = max(nq_max, nq)
        # the paths' factors as logs: (1 + uc)^n_f (1 + up)^2 s_hi (numerator), ... (1 + up)
        # s_hi (normalizer), and their lower ends; each excess formed without cancellation
        lH, lL = n_f * math.log1p(uc) + lg_hi, n_f * math.log1p(-uc) + lg_lo
        lup, lum = math.log1p(up), math.log1p(-up)
        # |q|.|k|'s d roundings, its scale, raised to the power; the coefficient, the division
        t = blk.masked(upper(tabs, max(pw, 1) * (d + 2) + 4), 0.0) / Dl[..., None]
        mag += t
        a += t * torch.maximum(excess(lH + 2 * lup), deficit(lL + 2 * lum))
        ad_sum += t * torch.maximum(excess(lH + lup), deficit(lL + lum))
        # Hf (X - Y) <= Hf X / Y - 1 for X = (1 + up)^2 s_hi, Y = (1 - up) s_lo <= 1 <= Hf
        c += t * excess(lH + 2 * lup - lum - lg_lo)
        la += t * (n_f * uc + 2 * up + dep * ua)
        lc += t * (3 * up + 2 * dep * ua)
        sqn = blk.masked(sq, 0.0) / (Dl[..., None] ** 2)
        var_key += sqn * (nk * uc * uc + 2 * up * up)
        sq_all += sqn
        if coeffs is not None and pw > 1:
            sq_rest += sqn
    # underflow: each of a term's products may lose `underflow`, carried through the
    # remaining factors (bounded by cq ck, each >= 1): _products
    n_mult = _products(top, precision)
    tiny = max(fc.underflow, fa.underflow)
    cc = blk.masked(cq.unsqueeze(-1) * ck.unsqueeze(-2), 0.0)
    b_den = upper(n_mult * tiny * F * cc.sum(-1) / Dl, m + 4)
    # (cq sum_j ck_j max(|v_j|, 1) and, for the products' overflow below, cq sum_j ck_j |v_j|:
    # one product, the [r, m] weight read once)
    cc_v = cc @ torch.cat([va.clamp(min=1.0), va], -1)
    b_num = upper(n_mult * tiny * F * cc_v[..., : va.shape[-1]] / Dl.unsqueeze(-1), m + 4)
    # Per row, G_f = sum_j t_ijf u_j for u_j = v_j (the numerator's state), 1 (the
    # normalizer's) and v_j - y_i (a query-side error of feature f, shared by every key):
    # sum_f G_f^2 is formed exactly for the features that are cheap to aggregate (given
    # ones; powers 0 and 1), and bounded by the triangle inequality over the feature
    # vectors for the others (sum_j ||t_ij||_2 |u_j|)^2.
    ex_v, ex_1, ex_u = _exact_groups(blk, coeffs, s if coeffs is not None else 1.0, Dl, y)
    tn = sq_rest.sqrt()
    tv, t1 = tn @ va, tn.sum(-1, keepdim=True)
    gn2, gd2 = ex_v + tv**2, ex_1 + t1**2
    # A query-side rounding of one feature (products, coefficient, representation) is
    # its own; the scale's rounding of X_c = scale q_c is shared by every feature holding
    # c: sum_f alpha_fc t_ijf = X_c k_jc w'(x_ij), w' the derivative of the weights'
    # polynomial, so that part is formed per channel.
    var_q = (ex_u + (tv + y.abs() * t1) ** 2) * nq_max * uc * uc
    if coeffs is not None:
        var_q = var_q + uc * uc * _shared_scale_var(blk, x, s, coeffs, y, Dl)
    # Sums: features then keys (the direct form: w_ij, then N and D over keys), or keys
    # then features (the state form: S_f, z_f over keys, then phi . S); each level in a
    # random order; the larger of the two models.
    one = torch.ones_like(y[..., :1])
    nv = nvis[:, None]
    inner_w = order_sq(nz.p, sq_all, F)
    (inner_a,) = sq_deviation([inner_w], v, y, [inner_w @ nz.vv])
    # (the keys in random order, or in sequence order where larger: .rounding.sequence_sq)
    seq_n, seq_d = blk.in_sequence(nz.p, v)
    outer_a = torch.maximum(order_sq(y, nz.q_n, nv), seq_n) + y**2 * torch.maximum(
        order_sq(one, nz.p2.sum(-1, keepdim=True), nv), seq_d
    )
    inner_b = order_sq_sum(gn2, sq_all @ (v * v), nv) + y**2 * order_sq_sum(
        gd2, sq_all.sum(-1, keepdim=True), nv
    )
    outer_b = order_sq(y, gn2, F) + y**2 * order_sq(one, gd2, F)
    var_sum = ua * ua * torch.maximum(inner_a + outer_a, inner_b + outer_b)
    # Roundings of the numerator alone, which var_key's (v_j - y)^2 does not hold: each
    # weight's product with its value (direct form, p_j^2 v_j^2) or each feature's with its
    # state (state form: the numerator's G_f^2, the normalizer's y^2 G_f^2) (a review:
    # correct fp16-compute kernels atypical on 5 of 300 cases at 1 - 1e-3)
    var_prod = up * up * torch.maximum(nz.q_n, gn2 + y * y * gd2)
    var_row = var_q + (mag * mag) @ (v * v) * ld.ul**2 + var_sum + var_prod
    G = len(groups)  # a, c, ad_sum: sums over the groups of powers
    terms = Terms(
        a=upper(a, G + 4),
        lin_a=la,
        c=upper(c, G + 4).sum(-1, keepdim=True),
        lin_c=lc.sum(-1, keepdim=True),
        mag=mag,
        den_lo=1 - upper(ad_sum.sum(-1), m + G + 2) - b_den,
        b_num=b_num,
        b_den=b_den,
        var_key=var_key,
        var_row=var_row,
    )
    # the terms a sum may absorb: a weight within 2 u_a of those before it in sequence
    # order (a sink key's features 2e7 times the others': correct fp32 kernels 2.3x
    # outside the level on three quarters of the elements, as softmax's before its charge)
    sound, typical = quotient(nz, terms, vd, lam, absorb=absorbable(nz.p, ua, in_sequence=True))
    y_abs = y.abs() + nz.eps_y
    # a feature's terms that its state sum absorbs: their magnitude times max |v_j| + |y|
    v_top = blk.vmax(blk.per_key("loaded |v|", ld.abs), "loaded |v|")
    lost = (share / Dl).unsqueeze(-1)
    typical = torch.minimum(typical + upper((v_top + y_abs) * lost, 4), sound)
    n_path = _growth(None if coeffs is None else [g_[3] for g_ in groups], nl, s, precision)
    g_c = (1 + uc) ** n_path
    g = g_c * (1 + up) ** 2 * s_hi * (1 + ld.ul)  # [r, 1]
    # the numerator's and the normalizer's magnitudes (their partial sums and the division's
    # operands)
    abs_n = (mag * Dl[..., None]) @ va
    n_sum, d_sum = abs_n * g, (mag.sum(-1) * Dl * g.squeeze(-1)).unsqueeze(-1)
    d_lo = (Dl * terms.den_lo).unsqueeze(-1)
    sound, typical, last = finish(sound, typical, y_abs, precision, operands=(n_sum, d_sum, d_lo))
    d_v = v.shape[-1]

    def full(row: torch.Tensor) -> torch.Tensor:
        return row.unsqueeze(-1).expand(*row.shape, d_v)

    big = fa.overflow()
    # the features are products in compute: a query's (<= cq) or a visible key's (<= ck,
    # with the coefficients and the scale on either side)
    big_c = fc.overflow()
    feat_over = (cq * g_c >= big_c) | blk.sees(cw * ck * g_c >= big_c)
    vmax = blk.vmax(va, "|v|").clamp(min=1.0)  # [B, r, d_v], over each row's visible keys
    # products (in compute or accumulate): a feature's with another or a value (<= cq ck
    # |v|), the state form's query feature times a state (<= cq sum_j ck_j |v_j|, its
    # normalizer's cq sum_j ck_j), the direct form's weight times a value (|w_ij| |v_j|)
    p_lim, p_name = precision.products_overflow()
    big_p = p_lim
    w_v = (mag * Dl[..., None]).mul_(va.amax(-1).unsqueeze(-2)).amax(-1, keepdim=True)
    prod_over = ((cc.amax(-1, keepdim=True) * vmax * g) >= big_p) | (w_v * g >= big_p)
    cc_va = cc_v[..., va.shape[-1] :]
    prod_over = prod_over | (cc_va * g >= big_p) | (cc.sum(-1, keepdim=True) * g >= big_p)
    state_over = (ck.sum(-1)[..., None, None] * vmax * g.amax()) >= big
    sums_over = (d_sum >= big) | (n_sum >= big)
    if blk.mask is not None or m < key_over.shape[-1]:  # keys the row does not see
        ck_h, w_h, kv_h = _hidden_over(q, tops, coeffs, s, top)
        feat_over = feat_over | (cw * ck_h * g_c >= big_c)
        prod_over = prod_over | ((cw * kv_h.unsqueeze(-1) * g >= big_p) | (w_h * g >= big_p))
    reasons = {
        f"load into {fc.name}": ld.rows_over(q, key_over).expand_as(sound),
        f"features in {fc.name}": full(feat_over),
        f"feature products in {p_name}": prod_over.expand_as(sound),
        f"state sums in {fa.name}": state_over.expand_as(sound),
        f"numerator and normalizer sums in {fa.name}": sums_over,
        "normalizer may vanish": full(~pos | ~(terms.den_lo > 0)),
        **last,
    }
    return unbounded(sound, typical, reasons)


def _channel_sums(blk: Block, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_j W_ij k_jc v_j`` ``[B, r, C, d_v]`` and ``sum_j W_ij k_jc`` ``[B, r, C]``,
    over key chunks within the budget."""
    k, v = blk.k, blk.v
    B, r, m = W.shape
    C, d_v = k.shape[-1], v.shape[-1]
    kv = torch.zeros(B, r, C, d_v, dtype=torch.float64)
    k1 = torch.zeros(B, r, C, dtype=torch.float64)
    step = max(1, scaled(BUDGET) // max(B * r * C, 1))  # [B, r, step, C] temporaries
    for s0 in range(0, m, step):
        sl = slice(s0, s0 + step)
        wk = W[..., sl].unsqueeze(-1) * k[:, None, sl]  # [B, r, mc, C]
        kv += torch.einsum("brjc,bjv->brcv", wk, v[:, sl])
        k1 += wk.sum(-2)
    return kv, k1


def _exact_groups(
    blk: Block, coeffs: Sequence[float] | None, s: float, Dl: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``sum_f G_f^2`` over the given features (``coeffs`` None) or the powers 0 and 1, for
    ``u_j = v_j``, ``1`` and ``v_j - y_i``: ``[B, r, d_v]``, ``[B, r, 1]``, ``[B, r, d_v]``."""
    W = blk.masked(torch.ones(1, 1, 1, dtype=torch.float64).expand(*Dl.shape, blk.k.shape[-2]), 0.0)
    W = W / Dl.unsqueeze(-1)
    parts: list[tuple[torch.Tensor, torch.Tensor]] = []  # (A_f [B,r,F,d_v], a_f [B,r,F])
    c = tuple(coeffs) if coeffs is not None else ()
    if coeffs is None or (len(c) > 1 and c[1] != 0):
        phi = blk.q if coeffs is None else c[1] * s * blk.q
        kv, k1 = _channel_sums(blk, W)
        parts.append((phi.unsqueeze(-1) * kv, phi * k1))
    if c and c[0] != 0:
        parts.append(((c[0] * (W @ blk.v)).unsqueeze(-2), c[0] * W.sum(-1, keepdim=True)))
    ex_v = torch.zeros_like(y)
    ex_1 = torch.zeros_like(y[..., :1])
    ex_u = torch.zeros_like(y)
    for A, a in parts:
        ex_v += (A * A).sum(-2)
        ex_1 += (a * a).sum(-1, keepdim=True)
        ex_u += ((A - a.unsqueeze(-1) * y.unsqueeze(-2)) ** 2).sum(-2)
    return ex_v, ex_1, ex_u


def _shared_scale_var(
    blk: Block,
    x: torch.Tensor,
    s: float,
    coeffs: Sequence[float],
    y: torch.Tensor,
    Dl: torch.Tensor,
) -> torch.Tensor:
    """``sum_c X_ic^2 (sum_j w'(x_ij) k_jc (v_j - y_i) / D_i)^2`` ``[B, r, d_v]``: the
    coefficient of the variance of the shared roundings of ``X_c = s q_c`` (``w'`` the
    derivative of ``sum_p c_p x^p``)."""
    wp = sum((p * c * x ** (p - 1) for p, c in enumerate(coeffs) if p and c), torch.zeros_like(x))
    kv, k1 = _channel_sums(blk, blk.masked(wp, 0.0) / Dl.unsqueeze(-1))
    acc = kv - k1.unsqueeze(-1) * y.unsqueeze(-2)
    X = s * blk.q
    return ((X * X).unsqueeze(-1) * acc * acc).sum(-2)


def featured_rounding_state(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    precision: Precision,
    sc: float | None,
    causal: bool,
    lam: float,
    coeffs: Sequence[float] | None,
    rows: torch.Tensor | None = None,
    coeff_rel: float = 0.0,
) -> dict[str, torch.Tensor]:
    """:func:`featured_rounding`'s sound bound from feature states (``evaluation="state"``):
    the same model, with each row's sums over its keys taken from per-power prefix states
    of the packed monomials (:func:`._state.power_sums`, ``O(n F d_v)`` time, the cost of
    the kernel's own state): ``sum_j |t_ij| g_j`` for the value columns of
    :func:`._state.value_columns`, the deviations ``sum_j a_ij |v_j - y_i|`` through
    :func:`._state.deviation` (never below the exact sum), and the exact output and
    normalizer from the signed states with certified radii. ``"typical"``: the
    probabilistic level at ``lam``, the pair evaluation's model with its squared weights
    bounded through the heaviest key and the visible keys' largest ``|k|`` per channel,
    and its per-feature sums by the triangle inequality (:func:`_typical`). Visible
    extremes (keys, values) are prefix maxima over the keys a row sees."""
    from attnprec.analysis.bounds import _state

    fc, fa = precision.compute, precision.accumulate
    uc, ua = fc.u, fa.u
    up = precision.product_u()
    ld = Loaded(precision)
    B, n, d = k.shape  # n: the keys (the queries may number otherwise without a mask)
    dv = v.shape[-1]
    nl = math.ceil(ld.ul / fc.u)  # a load's roundings of compute: 2 under "rtz" (a hunt)
    # (power, |c_p| |s|^p, c_p s^p, roundings on the term's path n_f)
    groups: list[tuple[int, float, float, int]]
    if coeffs is None:  # linear: the given features, one "power"
        groups, F, top, cw = [(1, 1.0, 1.0, 2 * nl)], d, 1, 1.0
        sides = [(nl, nl)]  # (n_q, n_k) of each group (_roundings)
        cq = q.abs().amax(-1).clamp(min=1.0)
        s = 1.0
    else:
        s = float(sc if sc is not None else 1.0)
        powers = [p for p, c in enumerate(coeffs) if c != 0]
        counts = [_roundings(p, nl, s, precision) for p in powers]
        groups = [
            (p, abs(coeffs[p]) * abs(s) ** p, coeffs[p] * s**p, n_f)
            for p, (n_f, _, _) in zip(powers, counts, strict=True)
        ]  # fmt: skip
        sides = [(n_q, n_k) for _, n_q, n_k in counts]
        if any(not (2.0**-1000 < g[1] < 2.0**1000) for g in groups):
            raise ValueError(
                "evaluation: 'state' needs every coefficient c_p scale^p within float64's "
                "normal range; use evaluation='pairs'"
            )
        F = sum(math.comb(d + p - 1, p) for p in powers)
        top = max(powers)
        cw = _factors(coeffs, s, powers)
        cq = cw * q.abs().amax(-1).clamp(min=1.0) ** top
    if F * (4 * dv + 2) > 2**28:
        raise ValueError(
            f"evaluation: the feature state holds {F} monomials x {4 * dv + 2} columns, "
            "beyond this evaluation's memory; use evaluation='pairs'"
        )
    ck = k.abs().amax(-1).clamp(min=1.0) ** top  # [B, n]
    mu = v.mean(-2, keepdim=True)
    G = _state.value_columns(v, mu)  # [1, |c|, c, c^2]
    Gs = torch.cat([torch.ones_like(v[..., :1]), v - mu], -1)
    gmax = G.abs().amax(-2, keepdim=True)
    pw = [g[0] for g in groups]
    rho64 = _state.power_rho(n, F, d, top)
    floor = _state.power_floor(
        n, F, d, top, float(q.abs().max()) if q.numel() else 0.0, float(k.abs().max())
    )
    csum = sum(g[1] for g in groups)
    # the sums' own error, the exact coefficients', the columns' (v - mu) and the
    # combination over the powers; against M1 and MV as computed (each within rho64)
    rel = rho64 + coeff_rel + gamma(2 * len(groups) + 6, U64)
    tiny = max(fc.underflow, fa.underflow)
    n_mult = _products(top, precision)
    va = v.abs()
    # the visible keys' sums of ck [1, max(|v|, 1), |v|] (underflow, overflow of products)
    cks = torch.cat(
        [ck.unsqueeze(-1), ck.unsqueeze(-1) * va.clamp(min=1.0), ck[..., None] * va], -1
    )
    # the visible keys' sums and extremes (overflow of the kernel's intermediates)
    key_over = (ld.over(k).any(-1) | ld.over(v).any(-1)).double()
    ext = torch.cat([key_over.unsqueeze(-1), ck.unsqueeze(-1), va.clamp(min=1.0)], -1)
    # per channel, a visible key with the largest |k_jc| (a row's candidate heaviest key)
    ka = k.abs()
    k_norm = k.norm(dim=-1, keepdim=True)  # (rounded up where used)
    if causal:
        cks, ext = cks.cumsum(1), ext.cummax(1).values
        kmax = ka.cummax(1)
        k_top, k_arg = kmax.values, kmax.indices
        k_norm = k_norm.cummax(1).values
    else:
        cks, ext = cks.sum(1, keepdim=True), ext.amax(1, keepdim=True)
        k_top, k_arg = ka.amax(1, keepdim=True), ka.argmax(1, keepdim=True)
        k_norm = k_norm.amax(1, keepdim=True)
    big, big_c = fa.overflow(), fc.overflow()
    p_lim, p_name = precision.products_overflow()
    big_p = p_lim
    n_path = _growth(None if coeffs is None else [g_[0] for g_ in groups], nl, s, precision)
    g_c = (1 + uc) ** n_path
    lup, lum = math.log1p(up), math.log1p(-up)
    # the keys' sums in sequence order (the pair evaluation's Block.in_sequence) for the
    # given features; the powers' weights are bounded by magnitudes in _typical instead
    seq = None
    if coeffs is None:
        vv = torch.cat([v, torch.ones_like(v[..., :1])], -1)
        seq, _ = _state.sequence_sq(q if rows is None else q[:, rows], k, vv, causal, rows)
    # the terms a feature's sum over the keys may absorb (log attention's criterion, on
    # the features' moduli: |psi_fj| at most 2 u_a of the feature's sum over the keys a row
    # sees, any order), their magnitude
    absorb = _feature_absorbed(q, k, coeffs, s, causal, rows, ua)
    at_rows = row_positions(rows)
    tops = _key_tops(k, ld.abs(v))
    # the visible values' largest |v| (the absorbed terms' charge)
    v_peak = va.cummax(1).values if causal else va.amax(1, keepdim=True)

    def rows_fn(idx: torch.Tensor, P: list[dict[int, torch.Tensor]]) -> dict[str, torch.Tensor]:
        P_abs, P_sgn = P
        r = idx.numel()
        nvis = (idx + 1).to(torch.float64) if causal else torch.full((r,), float(n)).double()
        sums = cks[:, idx] if causal else cks.expand(B, r, -1)
        ex = ext[:, idx] if causal else ext.expand(B, r, -1)
        # the exact normalizer and output (centered at mu), radii from the magnitude sums
        D = sum(cs * P_sgn[p][..., :1] for p, _, cs, _ in groups)
        Nc = sum(cs * P_sgn[p][..., 1:] for p, _, cs, _ in groups)
        M1 = sum(ca * P_abs[p][..., :1] for p, ca, _, _ in groups)
        MV = sum(ca * P_abs[p][..., 1 : 1 + dv] for p, ca, _, _ in groups)
        assert isinstance(D, torch.Tensor) and isinstance(Nc, torch.Tensor)
        assert isinstance(M1, torch.Tensor) and isinstance(MV, torch.Tensor)
        e_D = upper(rel * (1 + rho64) * M1 + floor * csum, 4)
        D_lo = D.abs() - e_D  # either sign (normalize_signed)
        pos = D_lo > 0
        Dl = torch.where(pos, D_lo, torch.ones_like(D_lo))  # [B, r, 1]
        yc = Nc / D
        y = mu + yc
        e_N = upper(rel * (1 + rho64) * MV + floor * csum * gmax[..., 1 : 1 + dv], 4)
        # the division's and mu + yc's roundings
        # (TINY: yc and the radius' product and quotient below the normal range)
        eps_y = (e_N + yc.abs() * e_D + TINY) / Dl + 2 * U64 * (yc.abs() + y.abs())
        eps_y = upper(eps_y + 2 * TINY, 8)
        eps_y = torch.where(pos, eps_y, math.inf)
        rows_ = _state.Rows(
            torch.empty(0), y, eps_y, yc, torch.empty(0), torch.full_like(Dl, rel), floor,
            torch.zeros(B, r, dtype=torch.bool),
        )  # fmt: skip
        # per-row factors of each power (the sums' depth is per row when causal)
        _, dep_k = schedule(precision, nvis)
        dep = (dep_k + F + 2)[:, None]  # [r, 1]
        lg_hi, lg_lo = dep * math.log1p(ua), dep * math.log1p(-ua)
        s_hi = torch.exp(lg_hi)
        A = torch.zeros_like(P_abs[pw[0]])
        mag = torch.zeros_like(A)
        c = torch.zeros_like(Dl)
        ad = torch.zeros_like(Dl)
        coef = torch.zeros_like(Dl)
        fa_all = []
        for p, ca, _, n_f in groups:
            lH, lL = n_f * math.log1p(uc) + lg_hi, n_f * math.log1p(-uc) + lg_lo
            t = upper(ca / Dl, max(p, 1) * (d + 2) + 6)  # |t_ijp| = t (|a_i| . |b_j|)^p
            fa_ = torch.maximum(excess(lH + 2 * lup), deficit(lL + 2 * lum))
            fa_all.append(fa_)
            fd_ = torch.maximum(excess(lH + lup), deficit(lL + lum))
            fc_ = excess(lH + 2 * lup - lum - lg_lo)
            A = A + (t * fa_) * P_abs[p]
            mag = mag + t * P_abs[p]
            c = c + (t * fc_) * P_abs[p][..., :1]
            ad = ad + (t * fd_) * P_abs[p][..., :1]
            coef = coef + t * torch.maximum(fa_, torch.ones_like(fa_))
        ng = len(groups)
        A = upper(A, ng + 4)
        # the key of the row's largest |q_ic| |k_jc|, its weight in A taken exactly
        qa = q[:, idx].abs()
        kt = k_top[:, idx] if causal else k_top.expand(B, r, -1)
        kg = k_arg[:, idx] if causal else k_arg.expand(B, r, -1)
        j = kg.gather(-1, (qa * kt).argmax(-1, keepdim=True))  # [B, r, 1]
        dot = (qa * ka.gather(1, j.expand(B, r, d))).sum(-1, keepdim=True)
        w_key = sum(
            (upper(ca / Dl, max(p, 1) * (d + 2) + 6) * fa_p * dot**p
             for (p, ca, _, _), fa_p in zip(groups, fa_all, strict=True)),
            torch.zeros_like(Dl),
        )  # fmt: skip
        G_key = G.gather(1, j.expand(B, r, G.shape[-1]))
        # (w_key within rows_.rho of the key's exact term in A: its dot's and powers'
        # roundings, fewer than a sum over the keys)
        dev = _state.deviation(rows_, A, gmax, coef, (w_key, G_key))
        pad = floor * coef * gmax
        A_up = A * (1 + rel) + pad
        mag_up = upper(mag, 2 * ng + 4) * (1 + rel) + pad
        # sum_j (a_ij + |t_ij|) (u_l |v_j| + h_l), |v_j| <= |v_j - mu| + |mu|
        a0 = A_up[..., :1] + mag_up[..., :1]
        sv = A_up[..., 1 : 1 + dv] + mag_up[..., 1 : 1 + dv] + mu.abs() * a0
        load = upper(ld.ul * sv + ld.hl * a0, 4)
        c = upper(c * (1 + rel) + floor * coef, ng + 4)
        ad = upper(ad * (1 + rel) + floor * coef, n + ng + 2)
        # underflow: each of the 2 top + 3 products of a term may lose `underflow`, carried
        # through the remaining factors (bounded by cq ck, each >= 1)
        cqr = cq[:, idx].unsqueeze(-1)
        b_den = upper(n_mult * tiny * F * cqr * sums[..., :1] / Dl, n + 4)
        b_num = upper(n_mult * tiny * F * cqr * sums[..., 1 : 1 + dv] / Dl, n + 4)
        den_lo = 1 - ad - b_den
        y_abs = y.abs() + eps_y
        num = dev + load + y_abs * c + b_num + y_abs * b_den
        sound = upper(num / den_lo.clamp_min(1e-300), 3 * n + 12)
        sound = torch.where((den_lo > 0) & pos, sound, math.inf)
        sound = torch.where(torch.isnan(sound), math.inf, sound)
        # the probabilistic level: the first-order errors through the variance, the rest
        # the sound model's higher-order part (per power, its factor less the first-order
        # one; the y-coefficient's and the division's excess)
        ts = [upper(ca / Dl, max(p, 1) * (d + 2) + 6) for p, ca, _, _ in groups]
        hs = [(fa_p - (n_f * uc + 2 * up + dep * ua)).clamp_min(0.0) + 4 * U64 * fa_p
              for (_, _, _, n_f), fa_p in zip(groups, fa_all, strict=True)]  # fmt: skip
        A_h = sum((t * h) * P_abs[p] for (p, *_), t, h in zip(groups, ts, hs, strict=True))
        assert isinstance(A_h, torch.Tensor)
        coef_h = sum((t * h for t, h in zip(ts, hs, strict=True)), torch.zeros_like(Dl))
        w_h = sum(
            (t * h * dot**p for (p, *_), t, h in zip(groups, ts, hs, strict=True)),
            torch.zeros_like(Dl),
        )  # fmt: skip
        dev_h = _state.deviation(rows_, A_h, gmax, coef_h, (w_h, G_key))
        Ah = A_h * (1 + rel) + floor * coef_h * gmax
        load_h = ld.ul * (Ah[..., 1 : 1 + dv] + mu.abs() * Ah[..., :1]) + ld.hl * Ah[..., :1]
        M_lo = sum((t * P_abs[p][..., :1] for (p, *_), t in zip(groups, ts, strict=True)),
                   torch.zeros_like(Dl)) * (1 - rel)  # fmt: skip
        c_h = (c - (3 * up + 2 * dep * ua) * M_lo).clamp_min(0.0) + 4 * U64 * c
        det = b_num + y_abs * b_den
        rem = upper(dev_h + load_h + y_abs * c_h + (sound - num).clamp_min(0.0), 6)
        kt_r = kt.to(torch.float64)
        seq_r = None
        if seq is not None:
            seq_r = seq[:, at_rows(idx)] / Dl**2
        var = _typical(rows_, P_abs, P_sgn, Dl, q[:, idx], groups, ts, dot, G_key, qa, kt_r, mu,
                       gmax, dv, d, F, nvis, coeffs is not None, sides, uc, ua, up, ld.ul,
                       y_abs, seq_r)  # fmt: skip
        typical = lam * torch.sqrt(var / 3) * (1 + 4 * U64) + det + rem
        # the absorbed terms' normalized weight, times max |v_j| + |y|
        at = at_rows(idx)
        vp = v_peak[:, idx] if causal else v_peak.expand(B, r, -1)
        lost = upper(absorb[:, at].unsqueeze(-1) / Dl, 4)
        typical = typical + upper((vp + y_abs) * lost, 2)
        typical = torch.where(torch.isnan(typical), sound, torch.minimum(typical, sound))
        g_row = g_c * (1 + up) ** 2 * s_hi * (1 + ld.ul)  # [r, 1]
        abs_n = upper(MV + mu.abs() * M1, 4)
        n_sum, d_sum = abs_n * g_row, M1 * g_row  # (the sums and the division's operands)
        sound, typical, last = finish(
            sound, typical, y_abs, precision, operands=(n_sum, d_sum, Dl * den_lo)
        )
        qr = q[:, idx]
        feat_over = (cq[:, idx] * g_c >= big_c) | (cw * ex[..., 1] * g_c >= big_c)
        # the keys a causal row does not see (_key_tops)
        ck_h, w_h, kv_h = _hidden_over(qr, tops, coeffs, s, top)
        if not causal:  # (every key is seen: the checks above hold them)
            ck_h, w_h, kv_h = torch.zeros_like(ck_h), torch.zeros_like(w_h), torch.zeros_like(kv_h)
        feat_over = feat_over | (cw * ck_h * g_c >= big_c)
        vmax = ex[..., 2:]  # [B, r, d_v]
        # products (in compute or accumulate; as the pair evaluation's): cq ck |v|, the
        # state form's cq sum_j ck_j [1, |v_j|], the direct form's |w_ij| |v_j| with |w_ij|
        # <= sum_p |c_p s^p| (|q_i| . max_j |k_j|)^p (the visible keys' largest per channel)
        # (|q_i| . |k_j| <= min(sum_c |q_ic| max_j |k_jc|, ||q_i|| max_j ||k_j||); and
        # |w_ij| |v_j| <= sum_j |w_ij| |v_j|, the numerator's magnitude)
        cqr = cq[:, idx].unsqueeze(-1)
        kt_i = k_top[:, idx] if causal else k_top.expand(B, idx.numel(), -1)
        kn_i = k_norm[:, idx] if causal else k_norm.expand(B, idx.numel(), -1)
        qk = torch.minimum(
            (qr.abs() * kt_i).sum(-1, keepdim=True), qr.norm(dim=-1, keepdim=True) * kn_i
        )
        qk = upper(qk, d + 4)
        w_max = upper(sum(ca * qk**p for p, ca, _, _ in groups), (top + 1) * (d + 4))
        prod_over = (
            ((cqr * ex[..., 1:2]) * vmax * g_row >= big_p)
            | (torch.minimum(w_max * vmax, abs_n) * g_row >= big_p)
            | (cqr * sums[..., :1] * g_row >= big_p)
            | (cqr * sums[..., 1 + dv :] * g_row >= big_p)
            | (cw * kv_h.unsqueeze(-1) * g_row >= big_p)
            | (w_h * g_row >= big_p)
        )
        state_over = sums[..., :1] * vmax * g_row >= big
        sums_over = (d_sum >= big) | (n_sum >= big)
        full = lambda m: m.unsqueeze(-1).expand_as(sound)  # noqa: E731
        reasons = {
            f"load into {fc.name}": full(
                ld.over(qr).any(-1) | (key_over.amax(-1, keepdim=True) > 0)
            ),
            f"features in {fc.name}": full(feat_over),
            f"feature products in {p_name}": prod_over,
            f"state sums in {fa.name}": state_over,
            f"numerator and normalizer sums in {fa.name}": sums_over.expand_as(sound),
            "normalizer may vanish": full(~pos.squeeze(-1) | ~(den_lo.squeeze(-1) > 0)),
            **last,
        }
        return unbounded(sound, typical, reasons)

    fams = [(q.abs(), k.abs(), G), (q, k, Gs)]
    return _state.power_sums(fams, pw, causal, rows, rows_fn, channels=1 in pw)


def _typical(
    r: Any,
    P_abs: dict[int, torch.Tensor],
    P_sgn: dict[int, torch.Tensor],
    Dl: torch.Tensor,
    qr: torch.Tensor,
    groups: list[tuple[int, float, float, int]],
    ts: list[torch.Tensor],
    dot: torch.Tensor,
    G_key: torch.Tensor,
    qa: torch.Tensor,
    kt: torch.Tensor,
    mu: torch.Tensor,
    gmax: torch.Tensor,
    dv: int,
    d: int,
    F: int,
    nvis: torch.Tensor,
    polynomial: bool,
    sides: list[tuple[int, int]],
    uc: float,
    ua: float,
    up: float,
    ul: float,
    y_abs: torch.Tensor,
    seq: torch.Tensor | None,
) -> torch.Tensor:
    """An upper bound of :func:`_block`'s variance proxy (times 3) ``[B, r, d_v]`` from the
    magnitude sums ``P_abs[p] = sum_j (|q_i| . |k_j|)^p g_j`` (:func:`._state.power_sums`
    over :func:`._state.value_columns`): per power ``u_pj = t_p (|q_i| . |k_j|)^p`` (``t_p
    = |c_p| |s|^p / D``) bounds the magnitude of the key's term, and every squared weight of
    the model by ``p!`` times its square (``q^2 . k^2 <= (|q| . |k|)^2``). With ``*`` the
    row's heaviest key: ``sum_j u_j^2 g_j <= u_*^2 g_* + m sum_j u_j g_j``, ``m`` at most
    every other key's ``u_j`` (the least of ``t_p (|q| . max_j |k_j|)^p`` and the row's
    total less ``u_*``). The per-feature sums of the exact groups (powers 0 and 1, the given
    features) from the signed states ``P_sgn`` (power 0, and per channel ``P_sgn[-1] =
    sum_j k_jc [1, v_j - mu]``), their float64 errors added over the features (Minkowski);
    those of the higher powers, and their share of the shared scale's term, by magnitudes.
    ``r``: the rows' :class:`._state.Rows` (``y``, ``eps_y``, ``rho``, ``floor``); ``Dl``
    the normalizer's lower bound, ``qr`` the rows' queries; ``dot [B, r, 1]`` the heaviest
    key's ``|q| . |k|``, ``G_key`` its columns; ``kt [B, r, d]`` the visible keys' largest
    ``|k_c|``; ``seq [B, r, d_v + 1]``: the keys' sums in sequence order of ``p_ij [v_j,
    1]`` (:func:`._state.sequence_sq`; None: the orders at random only)."""
    from attnprec.analysis.bounds import _state

    rel = r.rho
    pad = r.floor * gmax
    yc = r.yc
    ck = G_key[..., 1 + dv : 1 + 2 * dv]  # the heaviest key's v - mu
    dk2 = ((ck - yc).abs() * (1 + 2 * U64) + r.eps_y) ** 2  # its (v - y)^2, exact y
    vk2 = ((ck + mu).abs() * (1 + 2 * U64)) ** 2  # its v^2
    top_dot = (qa * kt).sum(-1, keepdim=True) * (1 + gamma(d, U64))  # >= every |q|.|k_j|

    def parts(t: torch.Tensor, p: int) -> dict[str, torch.Tensor]:
        """The sums of power p's u_j times 1, |v - y|, (v - y)^2, |v|, v^2 (upper), its
        heaviest key's u (upper and lower) and the bound m on the other keys' u."""
        A = t * P_abs[p]
        A_up = A * (1 + rel) + t * pad
        a0 = A_up[..., :1]
        sq_y = _state.square_sum(A, rel, t * pad, yc)
        dev2 = (torch.sqrt(sq_y) + r.eps_y * a0.sqrt()) ** 2
        v2 = _state.square_sum(A, rel, t * pad, -mu)
        cabs = A_up[..., 1 : 1 + dv]
        vabs = cabs + mu.abs() * a0
        dev1 = _state.deviation(r, A, gmax, t, None)
        u_key = t * dot**p
        m = torch.minimum(t * top_dot**p, (a0 - u_key * (1 - rel)).clamp_min(0.0))
        return {"one": a0, "dev1": dev1, "dev2": dev2, "vabs": vabs, "cabs": cabs, "v2": v2,
                "key": u_key * (1 + rel), "m": m}  # fmt: skip

    def squares(P: dict[str, torch.Tensor], name: str, key_g: torch.Tensor) -> torch.Tensor:
        # sum_j u_j^2 g_j <= u_*^2 g_* + m sum_j u_j g_j
        return P["key"] ** 2 * key_g + P["m"] * P[name]

    per = [parts(t, p) for (p, *_), t in zip(groups, ts, strict=True)]
    fact = [1.0 if not polynomial else float(math.factorial(p)) for p, *_ in groups]
    # the total weight T_j = sum_p u_pj: its sums, its heaviest key's, its bound m
    T = {key: torch.stack([P[key] for P in per]).sum(0) for key in ("one", "dev2", "v2", "key")}
    m_all = torch.stack([P["m"] for P in per]).sum(0)
    T["m"] = torch.minimum(m_all, (T["one"] - T["key"] / (1 + rel) * (1 - rel)).clamp_min(0.0))

    def sq_T(name: str, key_g: torch.Tensor) -> torch.Tensor:
        return T["key"] ** 2 * key_g + T["m"] * T[name]

    # var_key: per power (nk uc^2 + 2 up^2) p! sum_j u_j^2 (v_j - y)^2
    var_key = torch.zeros_like(y_abs)
    sq_v2 = torch.zeros_like(y_abs)  # sum_j sq_all_j v_j^2
    sq_1 = torch.zeros_like(y_abs[..., :1])  # sum_j sq_all_j
    sq_d2 = torch.zeros_like(y_abs)  # sum_j sq_all_j (v_j - y)^2
    # a term's key-side roundings, and the query side's with the shared representations
    nks = [n_k for _, n_k in sides]
    for P, f, nk in zip(per, fact, nks, strict=True):
        d2 = f * squares(P, "dev2", dk2)
        var_key = var_key + d2 * (nk * uc * uc + 2 * up * up)
        sq_d2 = sq_d2 + d2
        sq_v2 = sq_v2 + f * squares(P, "v2", vk2)
        sq_1 = sq_1 + f * squares(P, "one", torch.ones_like(dk2[..., :1]))
    # the exact groups (given features; powers 0 and 1): sum_f G_f(u)^2 for u = v, 1,
    # v - y, each G_f from the signed states within e (relative rel of the magnitudes, the
    # floor, y's radius), so sum_f (x_f + e_f)^2 <= (sqrt(sum_f x_f^2) + sum_f e_f)^2
    zero_v, zero_1 = torch.zeros_like(y_abs), torch.zeros_like(y_abs[..., :1])
    ex_v, ex_1, ex_u, sh1 = zero_v, zero_1, zero_v, zero_v
    for (p, _, cs, _), P in zip(groups, per, strict=True):
        if polynomial and p > 1:
            continue
        S = P_sgn[0].unsqueeze(-2) if p == 0 else P_sgn[-1]  # [B, r, F_p, 1 + d_v]
        phi = torch.full_like(S[..., 0], cs) if p == 0 else cs * qr  # [B, r, F_p]
        fr = (phi / Dl).unsqueeze(-1)
        s1, sc = S[..., :1], S[..., 1:]
        fl = r.floor * (P["one"] + gmax[..., 1 : 1 + dv])
        e1 = rel * P["one"] + r.floor * P["one"]
        ev = rel * P["vabs"] + fl
        eu = rel * (P["cabs"] + r.yc.abs() * P["one"]) + r.eps_y * P["one"] + fl
        x1 = torch.sqrt(((fr * s1) ** 2).sum(-2))
        xv = torch.sqrt(((fr * (sc + mu.unsqueeze(-2) * s1)) ** 2).sum(-2))
        xu = torch.sqrt(((fr * (sc - r.yc.unsqueeze(-2) * s1)) ** 2).sum(-2))
        ex_1 = ex_1 + (x1 + e1) ** 2
        ex_v = ex_v + (xv + ev) ** 2
        ex_u = ex_u + (xu + eu) ** 2
        if p == 1:
            sh1 = xu + eu  # the shared scale's term of power 1 (X_c c_1 S_c[v - y] / D)
    rest = [i for i, (p, *_) in enumerate(groups) if polynomial and p > 1]
    tv = sum((math.sqrt(fact[i]) * per[i]["vabs"] for i in rest), torch.zeros_like(y_abs))
    t1 = sum((math.sqrt(fact[i]) * per[i]["one"] for i in rest), torch.zeros_like(y_abs[..., :1]))
    gn2, gd2 = ex_v + tv**2, ex_1 + t1**2
    nq_max = max(n_q for n_q, _ in sides)
    var_q = (ex_u + (tv + y_abs * t1) ** 2) * nq_max * uc * uc
    if polynomial:  # the shared scale's rounding: power 1 exactly, the others by magnitudes
        shared = sh1 + sum(
            (p * P["dev1"] for (p, *_), P in zip(groups, per, strict=True) if p > 1), zero_v
        )
        var_q = var_q + uc * uc * shared**2
    # the sums' orders, as the pair evaluation (order_sq <= s^2 A_F + q B_F / F)
    nv = nvis.reshape(1, -1, 1)
    one = torch.ones_like(y_abs[..., :1])
    A_F = (F * (F + 1) * (2 * F + 1) / 6 - 1) / F**2 if F >= 2 else 0.0
    B_F = (F * (F + 1) / 6 - 1) / F if F >= 2 else 0.0
    p2_d = sq_T("dev2", dk2)  # sum_j p_j^2 (v_j - y)^2
    q_n = sq_T("v2", vk2)  # sum_j p_j^2 v_j^2
    p2 = sq_T("one", torch.ones_like(dk2[..., :1]))  # sum_j p_j^2
    inner_a = A_F * p2_d + B_F * sq_d2
    o_n, o_d = order_sq(y_abs, q_n, nv), order_sq(one, p2, nv)
    if seq is not None:  # (or in sequence order where larger, as the pair evaluation)
        o_n, o_d = torch.maximum(o_n, seq[..., :dv]), torch.maximum(o_d, seq[..., dv:])
    outer_a = o_n + y_abs**2 * o_d
    inner_b = order_sq_sum(gn2, sq_v2, nv) + y_abs**2 * order_sq_sum(gd2, sq_1, nv)
    outer_b = order_sq(y_abs, gn2, F) + y_abs**2 * order_sq(one, gd2, F)
    var_sum = ua * ua * torch.maximum(inner_a + outer_a, inner_b + outer_b)
    # the products of the numerator alone, as the pair evaluation's var_prod
    var_prod = up * up * torch.maximum(q_n, gn2 + y_abs**2 * gd2)
    return var_key + var_q + q_n * ul**2 + var_sum + var_prod
