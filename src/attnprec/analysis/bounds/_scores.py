"""Rounding bound of taylor and polynomial attention computed from the scores
(``form="scores"``): ``s = scale q.k``, the weights ``w = sum_p c_p s^p`` elementwise, then
``sum_j w_j v_j / sum_j w_j`` (docs/bounds/taylor.md, "Rounding of the score form").

Covered: any algorithm that loads q, k, v into compute, forms each score as a dot product
of ``d_k`` products in accumulate (the scale on q, on k, on the dot, or its root on q and
on k, not folded into the coefficients: docs/bounds/taylor.md; FMA or not; any order)
rounded to compute, evaluates the polynomial
by any scheme in which each term ``c_p s^p`` passes at most ``2P`` roundings in compute
(Horner, the power form; FMA or not) with the coefficients held in compute, multiplies by
the values and sums the numerator and the normalizer over the keys in accumulate in any
order and grouping (no rescaling: every block schedule), divides once and stores. Per key
the computed weight is
``w^_j = w_j + e_j`` with

    |e_j| <= E_j = sum_p |c~_p| ((S_j + sigma_j)^p (1 + kappa) - S_j^p)
                   + |c~_p - c_p| S_j^p + (underflow),

``S_j >= |s_j|``, ``sigma_j >= |s^_j - s_j|`` (loads, the scale and its constant, the
dot's products and sums, the store to compute) and ``kappa = (1 + u_c)^(2P) - 1``; the
exact weight then passes the product and the sums (depth at most ``n - 1``), and the error
``e_j`` is a term of exact value 0 on the same paths, so :mod:`.quotient` (signed weights:
the normalizer's lower bound ``D - sum_j (|w_j| |rho^D_j - 1| + E_j rho^D_j)``) does the
rest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from attnprec.analysis._reference_float64 import _polynomial_weights
from attnprec.analysis.bounds._featured import _shared_scale_var
from attnprec.analysis.bounds._rows import Block, Visible, logits64, normalize_signed, stream
from attnprec.analysis.bounds.quotient import Terms, absorbable, finish, quotient, unbounded
from attnprec.analysis.bounds.rounding import U64, deficit, excess, gamma, order_sq, upper
from attnprec.analysis.bounds.softmax import Loaded, scale_roundings, scaled_operands_over
from attnprec.analysis.precision import Precision, round_to

__all__ = ["scores_rounding"]


def scores_rounding(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    precision: Precision,
    sc: float,
    causal: bool | Visible,
    lam: float,
    coeffs: Sequence[float],
    rows: torch.Tensor | None = None,
    coeff_rel: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Per output element ``[B, rows, d_v]``: ``"sound"`` and ``"typical"`` bounds on
    ``|kernel - exact method on the stored inputs|`` for a score-form kernel, and the masks
    of the intermediates that may overflow (``"unbounded:<name>"``, where the bounds are
    inf). ``coeffs`` ``c_0..c_P`` within relative ``coeff_rel`` of the exact method's;
    ``q, k, v`` the stored inputs, float64 ``[B, n, d]``; ``lam`` the tail factor of the
    probabilistic level."""
    c = tuple(float(x) for x in coeffs)
    ld = Loaded(precision)
    k_over = scaled_operands_over(k, sc, precision, ld)
    kv_over = ld.over(k).any(-1) | ld.over(v).any(-1)
    # every key's largest |k~_c| per channel and |v~| (a hidden key's score and product)
    tops = (ld.abs(k).amax(-2), ld.abs(v).amax((-2, -1)), k.shape[-2])

    def block(b: Block) -> dict[str, torch.Tensor]:
        return _block(b, precision, sc, lam, c, coeff_rel, k_over, kv_over, tops)

    return stream(block, q, k, v, causal, rows)


def _held(coeffs: tuple[float, ...], coeff_rel: float, precision: Precision) -> tuple:
    """The coefficients as compute holds them, ``|c~_p|`` (upper), and ``|c~_p - c_p|``
    against the exact method's (the float64 ones within ``coeff_rel``)."""
    c64 = torch.tensor(coeffs, dtype=torch.float64)
    held = round_to(c64, precision.compute)
    if not bool(torch.isfinite(held).all()):
        raise ValueError(f"coeffs: overflow the compute format {precision.compute.name}")
    # |held - c'| is exact in float64 (both within a factor 2 or held = 0); |c' - c| <=
    # coeff_rel |c| <= coeff_rel |c'| / (1 - coeff_rel)
    dc = upper((held - c64).abs() + coeff_rel * c64.abs() / (1 - coeff_rel), 4)
    return [float(x) for x in held.abs()], [float(x) for x in dc]


def _block(
    blk: Block,
    precision: Precision,
    sc: float,
    lam: float,
    coeffs: tuple[float, ...],
    coeff_rel: float,
    k_over: torch.Tensor,
    kv_over: torch.Tensor,
    tops: tuple[torch.Tensor, torch.Tensor, int],
) -> dict[str, torch.Tensor]:
    """One row block; ``k_over [B]``: a key of the sequence whose scaled entry overflows
    (:func:`.softmax.scaled_operands_over`); ``kv_over [B, n]``: the keys whose key or
    value overflows compute on loading (:meth:`.softmax.Loaded.rows_over`); ``tops``:
    every key's largest ``|k~_c|`` per channel ``[B, d]`` and ``|v~|`` ``[B]``, and n."""
    fc, fa = precision.compute, precision.accumulate
    uc, ua = fc.u, fa.u
    up = precision.product_u()
    tiny = max(fc.underflow, fa.underflow)
    ld = Loaded(precision)
    q, k, v = blk.q, blk.k, blk.v
    d, m = q.shape[-1], k.shape[-2]
    top = len(coeffs) - 1
    nvis = blk.visible  # [r]
    dep = (nvis - 1).clamp_min(0.0)[:, None]  # any summation tree of n terms; [r, 1]

    # The score: s^ = sc q~.k~ theta + (underflow), |theta - 1| <= th: the scale's
    # constants and products wherever applied (.softmax.scale_roundings: n_k, n_s), the
    # products (up), d - 1 additions, the store to compute (ur, when compute does not hold
    # accumulate).
    n_s, n_k = scale_roundings(sc, precision)
    us = uc if n_s else 0.0  # (a product by the scale, as the shared part below takes it)
    uk = n_k * uc
    uk2 = uc * uc if n_s == 2 else 0.0  # the root's product on each key's entries
    wide = fc.holds(fa)
    ur = 0.0 if wide else uc
    th = excess(
        (n_k + n_s) * math.log1p(uc) + math.log1p(up) + math.log1p(ur) + (d - 1) * math.log1p(ua)
    )
    x, sig64, absdot = logits64(q, k, sc)
    qa, ka = ld.abs(q), ld.abs(k)
    P = upper(qa @ ka.transpose(-1, -2), d + 2)  # >= sum_c |q~_c k~_c|
    absdot_lo = absdot * (1 - gamma(d + 1, U64))  # <= sum_c |q_c k_c|
    # (1 + th) P - |q|.|k| as th P + (P - |q|.|k|): each rounding relative to the result
    e_dot = upper(th * P + (P - absdot_lo).clamp_min(0.0), 3)
    # a scaled operand's underflow times the other's modulus: the scale (or its root) on
    # q, on k or on both (.softmax.scale_roundings), or the dot's
    l1 = ka.sum(-1)[:, None, :] + qa.sum(-1, keepdim=True)
    r = max(1.0, math.sqrt(abs(sc)) * (1 + uc))
    under_s = tiny * (l1 * r + d * max(1.0, abs(sc)) + 2) * (1 + th)
    sigma = upper(abs(sc) * e_dot + under_s, d + 6)  # (under_s: a sum over the d channels)
    S = upper(x.abs() + sig64, 1)  # >= |s|

    # The polynomial: per term |c~_p| ((S + sigma)^p (1 + kappa) - S^p) + |c~_p - c_p| S^p,
    # and each rounding's underflow carried through <= P products by s^ and a coefficient.
    held, dc = _held(coeffs, coeff_rel, precision)
    n_r = 2 * top
    kappa = excess(n_r * math.log1p(uc))
    T = upper(S + sigma, 1)
    E = torch.zeros_like(x)
    E1 = torch.zeros_like(x)  # its first-order part
    # >= every intermediate of the polynomial (without (1 + u)^n_r): sum_p |c_p| X^p with
    # X = max(1, T), for Horner's b_k s <= sum_{i>=k} |c_i| T^(i-k+1) exceeds sum_p |c_p|
    # T^p where T < 1 (a review: fp16 Horner of 60000 s^5 + 60000 s^4 + 1 at s = 0.5 is
    # inf at 90000 under a finite bound)
    M = torch.zeros_like(x)
    X = T.clamp_min(1.0)
    for p in range(top + 1):
        if held[p] == 0 and dc[p] == 0:
            continue
        Sp, Tp = S**p, T**p
        # T^p - S^p = sigma sum_{i<p} T^i S^(p-1-i): nonnegative terms, no cancellation
        diff = sigma * sum((T**i * S ** (p - 1 - i) for i in range(p)), torch.zeros_like(x))
        E += held[p] * (diff + kappa * Tp) + dc[p] * Sp
        E1 += held[p] * (p * S ** max(p - 1, 0) * sigma + Sp * n_r * uc) + dc[p] * Sp
        M += held[p] * X**p
    # a rounding's underflow, carried by what follows it: one chain (Horner: max(1, |c|)
    # X^P at most) or one per term (the power form: term p's roundings by max(1, |c_p|)
    # X^p; a review: coefficient-first chains of 30 2^-24 s^p in fp16, every product off
    # by half a subnormal spacing, 1.68x outside at P = 32 with one chain's charge)
    per_term = sum((max(1.0, c) * X**p for p, c in enumerate(held) if c != 0), 0 * X)
    G = torch.maximum(max([1.0, *held]) * X**top, per_term) * (1 + kappa)
    E = upper(E + n_r * fc.underflow * G, 4 * (top + 2) ** 2)
    M = (M + X**top) * (1 + kappa)

    w, e_w = _polynomial_weights(x.clone(), sig64, coeffs, coeff_rel)
    w, e_w, nz, pos, Dl = normalize_signed(blk, w, e_w, v)
    E = blk.masked(E, 0.0)
    E1 = blk.masked(E1, 0.0)
    wabs = blk.masked(w.abs() + e_w, 0.0)  # >= |w_j|
    Dl3 = Dl.unsqueeze(-1)
    # the paths' factors (1 + up)^2 s_hi (numerator), (1 + up) s_hi (normalizer), their
    # lower ends, and the excesses formed from logs (no cancellation)
    lg_hi, lg_lo = dep * math.log1p(ua), dep * math.log1p(-ua)  # [r, 1]
    lup, lum = math.log1p(up), math.log1p(-up)
    rN_hi, rD_hi = torch.exp(2 * lup + lg_hi), torch.exp(lup + lg_hi)
    A = torch.maximum(excess(2 * lup + lg_hi), deficit(2 * lum + lg_lo))
    C = excess(2 * lup + lg_hi - lum - lg_lo)  # >= rN_hi - (1 - up) s_lo ((1 - up) s_lo <= 1)
    AD = torch.maximum(excess(lup + lg_hi), deficit(lum + lg_lo))
    tn, en = wabs / Dl3, E / Dl3
    # underflow of the weights' conversion and products (2 per key) and of the additions
    raw = upper((2 * nvis[:, None] + dep) * tiny * rN_hi, 4).squeeze(-1)  # [r]
    b_den = upper(raw / Dl, 2)
    va, vd = ld.abs(v), ld.err(v)
    # (the visible values': a hidden key's product is 0, and the bound of a row does not
    # depend on the keys its block holds)
    b_num = upper(raw[:, None] * blk.vmax(va, "loaded |v|").clamp_min(1.0) / Dl3, 2)
    den_lo = 1 - upper((tn * AD + en * rD_hi).sum(-1), m + 4) - b_den

    # Probabilistic: per key, the score's own errors through w'(s), the polynomial's
    # roundings, the weight's conversion; shared by the keys of a row: q's load and scale
    # (per channel), the scale constant, the coefficients; then the products, v's load and
    # the sums in a random order.
    y = nz.y
    pk = blk.masked(nz.p, 0.0)
    wp = sum((p * c * x ** (p - 1) for p, c in enumerate(coeffs) if p and c), torch.zeros_like(x))
    wp = blk.masked(wp, 0.0) / Dl3
    pabs = blk.masked(sum((abs(c) * x.abs() ** p for p, c in enumerate(coeffs) if c),
                          torch.zeros_like(x)), 0.0) / Dl3  # fmt: skip
    sq = (q * q) @ (k * k).transpose(-1, -2)
    dot = q @ k.transpose(-1, -2)
    n_ld = 1.0 if ld.ul > 0 else 0.0
    var_s = sc * sc * (sq * (up * up + uk2 + n_ld * ld.ul**2) + ua * ua * order_sq(dot, sq, d))
    var_s = var_s + (us * us + ur * ur) * x * x
    var_key = blk.masked(wp**2 * var_s + n_r * uc * uc * pabs**2 + up * up * pk**2, 0.0)
    var_q = (ld.ul**2 + us * us) * _shared_scale_var(blk, x, sc, coeffs, y, Dl)
    px = wp * x
    var_const = (uk * (px @ v - y * px.sum(-1, keepdim=True))) ** 2
    var_coef = torch.zeros_like(y)
    for p, c in enumerate(coeffs):
        rel = dc[p] / abs(c) if c else 0.0
        if rel:
            tp = blk.masked(c * x**p, 0.0) / Dl3
            var_coef += (rel * (tp @ v - y * tp.sum(-1, keepdim=True))) ** 2
    p2, q_n = nz.p2, nz.q_n
    one = torch.ones_like(y[..., :1])
    nv = nvis[:, None]
    # (the keys in random order, or in sequence order where larger: .rounding.sequence_sq)
    seq_n, seq_d = blk.in_sequence(nz.p, nz.v)
    sq_n = torch.maximum(order_sq(y, q_n, nv), seq_n)
    var_sum = ua * ua * (sq_n + y**2 * torch.maximum(order_sq(one, p2.sum(-1, True), nv), seq_d))
    var_row = var_q + var_const + var_coef + q_n * (ld.ul**2 + up * up) + var_sum
    terms = Terms(
        a=upper(tn * A + en * rN_hi, 4),
        lin_a=tn * (2 * up + dep * ua) + E1 / Dl3,
        c=upper((tn + en) * C, 4).sum(-1, keepdim=True),
        lin_c=(tn * (3 * up + 2 * dep * ua)).sum(-1, keepdim=True),
        mag=tn,
        den_lo=den_lo,
        b_num=b_num,
        b_den=b_den,
        var_key=var_key,
        var_row=var_row,
    )
    # (the terms a sum may absorb, as the featured form's)
    sound, typical = quotient(nz, terms, vd, lam, absorb=absorbable(nz.p, ua, in_sequence=True))
    wcap = blk.masked(wabs + E, 0.0)
    n_sum, d_sum = (wcap @ va) * rN_hi, (wcap.sum(-1) * rD_hi.squeeze(-1)).unsqueeze(-1)
    d_lo = (Dl * den_lo).unsqueeze(-1)
    sound, typical, last = finish(
        sound, typical, y.abs() + nz.eps_y, precision, operands=(n_sum, d_sum, d_lo)
    )
    d_v = v.shape[-1]

    def full(row: torch.Tensor) -> torch.Tensor:
        return row.unsqueeze(-1).expand(*row.shape, d_v)

    acc_lim, p_name = precision.products_overflow()
    w_v = (wcap * va.amax(-1).unsqueeze(-2)).amax(-1)  # a weight times a value: a product
    P_top = blk.masked(P, 0.0).amax(-1)
    M_top = blk.masked(M, 0.0).amax(-1)
    if blk.mask is not None or m < tops[2]:
        # a key the row does not see, whose score, polynomial and product with its value a
        # kernel may form and mask by a product (0 * inf = NaN; a review: a padding key's
        # score of 8e4 in fp16 gave NaN rows under finite bounds): sum_c |q~_c| max_j |k~_jc|
        P_h = upper(qa @ tops[0].unsqueeze(-1), d + 2).squeeze(-1)
        T_h = upper(abs(sc) * P_h * (1 + th) + sigma.amax(-1), 2)
        X_h = T_h.clamp_min(1.0)
        M_h = sum(held[p] * X_h**p for p in range(top + 1)) + X_h**top
        M_h = upper(M_h * (1 + kappa), top + 4)
        P_top, M_top = torch.maximum(P_top, P_h), torch.maximum(M_top, M_h)
        w_v = torch.maximum(w_v, M_h * tops[1].unsqueeze(-1))
    reasons = {
        f"load into {fc.name}": ld.rows_over(q, kv_over).expand(*P.shape[:2], d_v),
        f"scores q.k in {p_name}": full(
            (P_top * max(1.0, abs(sc)) * (1 + th) >= acc_lim)
            | scaled_operands_over(q.unsqueeze(-2), sc, precision, ld)
            | k_over.unsqueeze(-1)
        ),
        f"polynomial in {fc.name}": full(M_top >= fc.overflow()),
        f"products w v in {p_name}": full(w_v * rN_hi.squeeze(-1) >= acc_lim),
        f"numerator sum w v in {fa.name}": n_sum >= fa.overflow(),
        f"normalizer sum in {fa.name}": (d_sum >= fa.overflow()).expand_as(n_sum),
        "normalizer may vanish": full(~pos | ~(den_lo > 0)),
        **last,
    }
    return unbounded(sound, typical, reasons)
