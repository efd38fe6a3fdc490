"""Exact zeros of signed sums of exponentials, decided only where a float64 result is not
certified away from 0.

A sum ``s = sum_i w_i e^(l_i)`` with float logs and float weights (rational numbers) is
zero exactly when, for every distinct log, the weights of the terms with that log sum to
zero: by Lindemann-Weierstrass, ``e^(l_1), ..., e^(l_k)`` for distinct rationals ``l_j`` are
linearly independent over the algebraic numbers. (For matrix products a term's log is the
exact double-double ``l + l_lo``.) A floating-point sum cannot see that: ``e^100 + e^50 -
e^100 - e^50`` rounds to a multiple of an ulp of ``e^100``, a "value" with a random sign.

The reductions therefore check their float64 results after the fact, in three steps of
increasing cost, each run only on what the previous one left open:

1. *Certified by the bound.* Every reduction path has ``|s_hat - s| <= c (n + 2) u A``
   with ``A = sum |x_i|`` (:func:`attnprec.lognum.signed_sum_error_bound`, whose ``r`` is
   that over ``|s|``). A result with ``log|s_hat| > log(2 c (n + 2) u A)`` therefore has
   ``s != 0``; slices without negative weights cannot cancel at all. Sums bound ``A`` by
   ``n max|x_i|`` (one ``amax`` over the logs), prefix sums by ``sum |x_i|`` up to the end
   of each block of 1024 (free on the direct path, which sums them anyway).
2. *Certified by a witness.* The terms with the largest log in the slice (or prefix) form
   one group; if their weights do not cancel, ``s != 0`` (one pass, only over the slices
   left by step 1; with general weights the group's float64 sum is checked against its
   own rounding bound).
3. *Decided exactly.* Group every term by its log and sum the weights exactly (sums:
   integers for signs, vectorized by a sort, :class:`fractions.Fraction` for general
   weights; prefix sums: :func:`exact_prefixes`).

A result found exactly zero becomes ``(-inf, 0)``. A sum that is not zero is recomputed
from its merged terms in double-double, and where that cannot resolve it (cancellation
below ``2^-56`` of the terms: ``e^(1e-40) - 1``), summed exactly by
:func:`exact_prefixes`; so is every prefix sum left open by step 2 (a computed ``-inf``
after a nonzero prefix is always a candidate; a value left open had an infinite bound
and any sign). So ``(-inf, 0)`` is returned exactly for the zero sums. With general
weights step 1 allows each term the error of its weight's rounded log (the bound's
``term_log_error``). Random data never reaches step 3,
and step 1 costs one ``amax`` (sums) or two block reductions (prefix sums) only where some
weight is negative.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction

import torch

COMPUTE = torch.float64
_U64 = 2.0**-53


def negative(w: torch.Tensor) -> bool:
    """Whether a weight is negative (a broadcast weight is read once per stored value)."""
    for d, stride in enumerate(w.stride()):
        if stride == 0:
            w = w.narrow(d, 0, min(1, w.shape[d]))
    return w.numel() > 0 and w.amin().item() < 0


def _log_wmax(w: torch.Tensor, signs_only: bool) -> torch.Tensor | float:
    """``log max|w|`` along the last dim (kept), 0 for signs."""
    if signs_only:
        return 0.0
    wmax = torch.abs(w.to(COMPUTE)).amax(-1, keepdim=True)
    return torch.log(torch.where(wmax > 0, wmax, 1.0))


def _term_rel(w: torch.Tensor, signs_only: bool) -> torch.Tensor | float:
    """``expm1(3u max|log|w_i||)`` along the last dim (kept): the relative error of a
    term from its weight's rounded log (the bound's ``term_log_error`` for weights other
    than +-1, which paths that carry a weight's exponent in the log incur); 0 for signs."""
    if signs_only:
        return 0.0
    wa = torch.abs(w.to(COMPUTE))
    hi = wa.amax(-1, keepdim=True)
    lo = torch.where(wa > 0, wa, math.inf).amin(-1, keepdim=True)
    big = torch.maximum(torch.log(torch.where(hi > 0, hi, 1.0)).abs(),
                        torch.log(torch.where(lo < math.inf, lo, 1.0)).abs())  # fmt: skip
    return torch.expm1(3 * _U64 * big)


def _witness(
    l: torch.Tensor, w: torch.Tensor, lo: torch.Tensor | None, signs_only: bool
) -> torch.Tensor:
    """Rows (``[k, n]``, float64) whose group of largest-log terms has a nonzero net
    weight: such sums are certified nonzero (Lindemann-Weierstrass)."""
    live = (w != 0) & (l > -math.inf)
    lm = torch.where(live, l, -math.inf)
    top = lm.amax(-1, keepdim=True)
    in_g = live & (l == top)
    if lo is not None:
        lo_top = torch.where(in_g, lo, -math.inf).amax(-1, keepdim=True)
        in_g = in_g & (lo == lo_top)
    wg = torch.where(in_g, w, 0.0)
    net = wg.sum(-1)
    if signs_only:  # integers below 2^53: exact
        return net != 0
    # float weights: the sum of k terms is within (k + 1) u sum|w| (+ underflow)
    k = l.shape[-1]
    err = (k + 1) * _U64 * torch.abs(wg).sum(-1) + (k + 1) * 2.0**-1074
    return torch.abs(net) > 2 * err


def _merge_signs(
    l: torch.Tensor, w: torch.Tensor, lo: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The terms of each row (``[k, n]``, float64, signs) merged log by log: one term per
    distinct log (and low part) with the exact sum of its signs (integers), ``(-inf, 0)``
    for the rest. Sorted by the log (and its low part); vectorized."""
    live = (w != 0) & (l > -math.inf)
    key = torch.where(live, l, math.inf)
    if lo is None:
        idx = torch.argsort(key, dim=-1, stable=True)
        low = None
    else:
        lok = torch.where(live, lo, 0.0)
        first = torch.argsort(lok, dim=-1, stable=True)
        idx = first.gather(-1, torch.argsort(key.gather(-1, first), dim=-1, stable=True))
        low = lok.gather(-1, idx)
    ks = key.gather(-1, idx)
    ws = torch.where(live, w, 0.0).gather(-1, idx)
    new = torch.ones_like(ks, dtype=torch.bool)
    new[:, 1:] = ks[:, 1:] != ks[:, :-1]
    if low is not None:
        new[:, 1:] |= low[:, 1:] != low[:, :-1]
    gid = torch.cumsum(new.to(torch.int64), -1) - 1
    net = torch.zeros_like(ws).scatter_add_(-1, gid, ws)
    gl = torch.zeros_like(ks).scatter_(-1, gid, ks)  # the same key across a run
    dead = (net == 0) | (gl == math.inf)
    ml = torch.where(dead, -math.inf, gl)
    mlo = None
    if low is not None:
        mlo = torch.where(dead, 0.0, torch.zeros_like(low).scatter_(-1, gid, low))
    return ml, torch.where(dead, 0.0, net), mlo


def _merge_weights(
    l: torch.Tensor, w: torch.Tensor, lo: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """:func:`_merge_signs` for general float weights (Python, exact with
    :class:`fractions.Fraction`), terms keyed by their log and low part: each row's merged
    weights are divided by ``2^E``, ``E`` the exponent of its largest merged weight (not
    of an input weight, which may have cancelled: the survivors then fell below the normal
    range), so the rounded sums never overflow. Returns the merged logs, the scaled
    weights rounded once, their low parts (or None), ``E ln 2`` per row (``[k, 1]``), and
    the rows where a scaled weight is below the normal range (rounded with less than 53
    bits; their sums are taken exactly)."""
    rows_l, rows_lo, rows_w, scale, lossy = [], [], [], [], []
    width = 1
    los = lo.tolist() if lo is not None else [[0.0] * l.shape[-1]] * l.shape[0]
    for lrow, lorow, wrow in zip(l.tolist(), los, w.tolist(), strict=True):
        nets: dict[tuple[float, float], Fraction] = {}
        for li, loi, wi in zip(lrow, lorow, wrow, strict=True):
            if wi != 0 and li != -math.inf:
                nets[li, loi] = nets.get((li, loi), Fraction(0)) + Fraction(wi)
        keep = [(k, v) for k, v in nets.items() if v != 0]
        # floor(log2 |v|) is bit_length(num) - bit_length(den) or one less
        e = max((abs(v.numerator).bit_length() - v.denominator.bit_length() + 1
                 for _, v in keep), default=0)  # fmt: skip
        ws = [float(v / Fraction(2) ** e) for _, v in keep]
        rows_l.append([k[0] for k, _ in keep])
        rows_lo.append([k[1] for k, _ in keep])
        rows_w.append(ws)
        scale.append(e * math.log(2.0))
        lossy.append(any(abs(x) < 2.0**-1022 for x in ws))
        width = max(width, len(keep))
    ml = torch.full((len(rows_l), width), -math.inf, dtype=COMPUTE)
    mlo = torch.zeros((len(rows_l), width), dtype=COMPUTE)
    mw = torch.zeros((len(rows_l), width), dtype=COMPUTE)
    for i, (lr_, lor_, wr_) in enumerate(zip(rows_l, rows_lo, rows_w, strict=True)):
        ml[i, : len(lr_)] = torch.tensor(lr_, dtype=COMPUTE)
        mlo[i, : len(lor_)] = torch.tensor(lor_, dtype=COMPUTE)
        mw[i, : len(wr_)] = torch.tensor(wr_, dtype=COMPUTE)
    sc = torch.tensor(scale, dtype=COMPUTE).unsqueeze(-1)
    dev = l.device
    return (ml.to(dev), mw.to(dev), None if lo is None else mlo.to(dev), sc.to(dev),
            torch.tensor(lossy, dtype=torch.bool, device=dev))  # fmt: skip


def exact_prefixes(
    ls: list[float],
    ws: list[float],
    los: list[float] | None,
    want: list[int],
) -> list[tuple[float, float]]:
    """The prefix sums ``s_t = sum_{i <= t} w_i e^(l_i + lo_i)`` at the (increasing) ends
    ``want``, decided exactly: ``(-inf, 0)`` where ``s_t = 0``, else ``(log|s_t|, sign
    s_t)`` with the log the float64 nearest to ``log|s_t|`` (Python, rare: only where
    float64 and double-double cannot decide).

    The weights of each distinct log are summed exactly as the prefix grows: ``s_t = 0``
    exactly when all of them are zero (Lindemann-Weierstrass). A value is ``S = sum_l W_l
    f_l``, summed exactly, with ``f_l`` one rounding of ``e^l`` to ``p`` bits per distinct
    log, so a group whose weights cancel contributes exactly 0 at any ``p``; then ``|s -
    S| <= 2^(1-p) sum_l |W_l| f_l``, and ``log|s|`` lies in the interval from the logs of
    ``|S|`` minus and plus that, rounded outward. ``p`` starts at 128 and doubles until
    every interval excludes 0 and rounds to one float64 (the log of a nonzero algebraic
    number is not a halfway point; from ``2^16`` bits the interval's midpoint is taken).
    """
    from mpmath.libmp import from_float as mf
    from mpmath.libmp import (
        fzero,
        mpf_abs,
        mpf_add,
        mpf_cmp,
        mpf_exp,
        mpf_log,
        mpf_mul,
        mpf_shift,
        mpf_sub,
        round_ceiling,
        round_floor,
        round_nearest,
        to_float,
    )

    prec = 128
    while True:
        nets: dict[tuple, list] = {}  # exact log -> [net weight, e^l rounded to p bits]
        s = t = fzero  # sum_l W_l f_l and sum_l |W_l| f_l, both exact
        nonzero, j = 0, 0
        out: list[tuple[float, float]] = []
        for i in range(want[-1] + 1):
            if ws[i] != 0 and ls[i] != -math.inf:
                x = mf(ls[i]) if los is None else mpf_add(mf(ls[i]), mf(los[i]), 0)
                g = nets.get(x)
                if g is None:
                    g = nets[x] = [fzero, mpf_exp(x, prec, round_nearest)]
                wi, old = mf(ws[i]), g[0]
                g[0] = new = mpf_add(old, wi, 0)
                nonzero += (new != fzero) - (old != fzero)
                s = mpf_add(s, mpf_mul(wi, g[1], 0), 0)
                dab = mpf_sub(mpf_abs(new), mpf_abs(old), 0)
                t = mpf_add(t, mpf_mul(dab, g[1], 0), 0)
            if i != want[j]:
                continue
            j += 1
            if nonzero == 0:
                out.append((-math.inf, 0.0))
                continue
            err, sa = mpf_shift(t, 1 - prec), mpf_abs(s)
            if mpf_cmp(sa, err) <= 0:
                break
            lo_ = to_float(mpf_log(mpf_sub(sa, err, prec, round_floor), prec, round_floor),
                           rnd=round_nearest)  # fmt: skip
            hi_ = to_float(mpf_log(mpf_add(sa, err, prec, round_ceiling), prec, round_ceiling),
                           rnd=round_nearest)  # fmt: skip
            if lo_ != hi_ and prec < 2**16:
                break
            sign = 1.0 if mpf_cmp(s, fzero) > 0 else -1.0
            out.append((lo_ if lo_ == hi_ else 0.5 * (lo_ + hi_), sign))
        if len(out) == len(want):
            return out
        if prec >= 2**17:  # a nonzero sum resolves at some precision
            raise AssertionError("exact_prefixes: a nonzero sum did not resolve")
        prec *= 2


Recompute = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]
]


def zero_sums(
    l: torch.Tensor,
    w: torch.Tensor,
    dim: int,
    log: torch.Tensor,
    sgn: torch.Tensor,
    signs_only: bool,
    l_lo: torch.Tensor | None,
    c: float,
    recompute: Recompute,
    top: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Set the sums (kept dim, float64) that are exactly zero to ``(-inf, 0)``, and
    recompute from their merged terms (``recompute(l, w, l_lo)``: pivoted double-double
    sums of ``[k, m]`` rows, general weights) those that are not certified away from 0 by
    the bound and not exactly zero, or computed as zero though they are not; the others
    are unchanged. ``l``, ``w``: the terms (after SciPy's special weights, unscaled);
    ``l_lo``: low parts of the logs (matrix products); ``top``: ``l.amax(dim, keepdim=True)``
    if the caller has it (taken while ``l`` is in cache), None where no weight is negative.
    See the module docstring."""
    if top is None and not negative(w):
        return log, sgn
    n = l.shape[dim]
    lr = l.movedim(dim, -1).reshape(-1, n)
    wr = w.movedim(dim, -1).reshape(-1, n)
    if top is None:
        top = lr.amax(-1, keepdim=True)
    else:
        top = top.movedim(dim, -1).reshape(-1, 1)
    # step 1: s = 0 implies log|s_hat| <= log(c (n + 2) u n max|x|) (a factor 2 of margin);
    # computed zeros (-inf) are candidates too (they may not be zero), NaN is not
    # (weights other than +-1: plus each term's error from its weight's rounded log)
    thr = top.reshape(-1).to(COMPUTE) + math.log(2 * n)
    if signs_only:
        thr = thr + math.log(c * (n + 2) * _U64)
    else:
        rel = torch.as_tensor(_term_rel(wr, False)) + c * (n + 2) * _U64
        thr = thr + (torch.as_tensor(_log_wmax(wr, False)) + torch.log(rel)).reshape(-1)
    cand = log.reshape(-1) <= thr
    if not bool(cand.any()):
        return log, sgn
    rows = cand.nonzero()[:, 0]
    lc = lr.index_select(0, rows).to(COMPUTE)
    wc = wr.index_select(0, rows).to(COMPUTE)
    lo = None if l_lo is None else l_lo.movedim(dim, -1).reshape(-1, n).index_select(0, rows)
    if lo is not None:
        lo = torch.nan_to_num(lo.to(COMPUTE), nan=0.0, posinf=0.0, neginf=0.0)
    # step 2: the largest-log group does not cancel (a sum computed as zero, not being
    # zero, is recomputed; one without a nonzero term is zero as computed)
    live = ((wc != 0) & (lc > -math.inf)).any(-1)
    computed_zero = log.reshape(-1).index_select(0, rows) == -math.inf
    open_ = live & (computed_zero | ~_witness(lc, wc, lo, signs_only))
    if not bool(open_.any()):
        return log, sgn
    rows, lc, wc = rows[open_], lc[open_], wc[open_]
    lo = None if lo is None else lo[open_]
    # step 3: merge the terms log by log, exactly; all weights 0: an exact zero
    lossy = None
    if signs_only:
        ml, mw, mlo = _merge_signs(lc, wc, lo)
        shift: torch.Tensor | float = 0.0
    else:
        ml, mw, mlo, shift, lossy = _merge_weights(lc, wc, lo)
    zero = (mw == 0).all(-1, keepdim=True)
    rlog, rsgn = recompute(ml, mw, mlo)
    rlog = torch.where(zero, -math.inf, rlog + shift).squeeze(-1)
    rsgn = torch.where(zero, 0.0, rsgn).squeeze(-1)
    # step 4: nonzero sums the double-double recompute does not resolve (its error is
    # within (m + 2) 2^-66 sum|x|; a margin of 2^10) are summed exactly
    mabs = ml + torch.log(torch.abs(mw)) + (0.0 if mlo is None else mlo)
    lab = (torch.logsumexp(mabs, -1, keepdim=True) + shift).squeeze(-1)
    loose = ~zero.squeeze(-1) & ~(rlog > lab + math.log((ml.shape[-1] + 2) * 2.0**-56))
    if lossy is not None:
        loose = loose | (lossy & ~zero.squeeze(-1))
    for i in loose.nonzero()[:, 0].tolist():
        los = None if lo is None else lo[i].tolist()
        ((rlog[i], rsgn[i]),) = exact_prefixes(lc[i].tolist(), wc[i].tolist(), los, [n - 1])
    log = log.flatten().index_put((rows,), rlog).view_as(log)
    sgn = sgn.flatten().index_put((rows,), rsgn).view_as(sgn)
    return log, sgn


def _block_log_abs(l: torch.Tensor, w: torch.Tensor, signs_only: bool, block: int) -> torch.Tensor:
    """``log sum |w_i| e^(l_i)`` over each block of ``block`` along the last dim of
    ``[rows, n]`` (``[rows, nb]``, float64; an upper bound up to rounding), each term's
    weight in its log (scaling the weights by the row's largest flushed the small ones:
    ``1e-320`` beside ``18098`` made an exact zero look certified)."""
    rows, n = l.shape
    nb = -(-n // block)
    pad = nb * block - n
    x = l.to(COMPUTE)
    if not signs_only:
        x = x + torch.log(torch.abs(w.to(COMPUTE)))
    # a NaN term poisons its own and later prefixes only: the ones before it are checked
    x = torch.where(torch.isnan(x), -math.inf, x)
    if pad:
        x = torch.nn.functional.pad(x, (0, pad), value=-math.inf)
    xb = x.view(rows, nb, block)
    mb = xb.amax(-1, keepdim=True)
    ms = torch.where(torch.isfinite(mb), mb, 0.0)
    s = torch.exp(xb - ms).sum(-1, keepdim=True)
    return torch.where(s > 0, ms + torch.log(s), -math.inf).squeeze(-1)


def zero_prefixes(
    l: torch.Tensor,
    w: torch.Tensor,
    log: torch.Tensor,
    sgn: torch.Tensor,
    signs_only: bool,
    c: float,
    block: int,
    blocks: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Set the prefix sums along the last dim of ``[rows, n]`` (float64) that are exactly
    zero to ``(-inf, 0)``. ``l`` without +inf terms (their prefixes are not finite);
    ``blocks``: ``sum |x_i|`` and the smallest ``|prefix sum|`` over each block of
    ``block`` terms (``[rows, nb]`` each, in value units: the direct path's by-products),
    else computed here."""
    if not negative(w):
        return log, sgn
    rows, n = log.shape
    nb = -(-n // block)
    full = n // block
    if blocks is not None:
        la = torch.log(torch.cumsum(blocks[0][:, :nb], -1))
        lmin = torch.log(blocks[1][:, :nb])
    else:
        la = torch.logcumsumexp(_block_log_abs(l, w, signs_only, block), -1)
    ends = torch.clamp(
        torch.arange(1, nb + 1, dtype=COMPUTE, device=log.device) * block, max=n
    )  # terms up to the end of each block
    thr = la + torch.log(2 * (c * (ends + 2) * _U64 + _term_rel(w, signs_only)))
    # step 1, per block: the smallest log in the block against the block's threshold
    if blocks is None:
        lmin = torch.empty((rows, nb), dtype=COMPUTE, device=log.device)
        if full:
            lmin[:, :full] = log[:, : full * block].reshape(rows, full, block).amin(-1)
        if full < nb:
            lmin[:, full] = log[:, full * block :].amin(-1)
    cand_blk = ~(lmin > thr)  # NaN (a NaN term) and -inf (zeros) are looked at below
    if not bool(cand_blk.any()):
        return log, sgn
    rsel = cand_blk.any(-1).nonzero()[:, 0]
    last = min(int(cand_blk.index_select(0, rsel).nonzero()[:, 1].max().item() + 1) * block, n)
    lg = log.index_select(0, rsel)[:, :last]
    tb = thr.index_select(0, rsel).repeat_interleave(block, -1)[:, :last]
    # computed zeros after a nonzero (finite) prefix are candidates: some term is live
    # (the first live term's prefix is a single term, never computed as zero)
    zero_c = lg == -math.inf
    cand = (torch.isfinite(lg) & (lg <= tb)) | (
        zero_c & torch.cummax(torch.isfinite(lg).to(torch.int8), -1)[0].bool()
    )
    keep = cand.any(-1)
    if not bool(keep.any()):
        return log, sgn
    rsel, cand, zero_c = rsel[keep], cand[keep], zero_c[keep]
    lc = l.index_select(0, rsel)[:, :last].to(COMPUTE)
    wc = w.index_select(0, rsel)[:, :last].to(COMPUTE)
    # step 2, per prefix: the net weight of the terms with the running largest log
    live = (wc != 0) & (lc > -math.inf)
    lm = torch.where(live, lc, -math.inf)
    top = torch.cummax(lm, -1)[0]
    in_g = live & (lc == top)
    contrib = torch.where(in_g, wc, 0.0)
    # segments of a constant running maximum: a new maximum starts a new group
    start = torch.ones_like(in_g)
    start[:, 1:] = top[:, 1:] != top[:, :-1]
    pos = torch.arange(last, device=log.device).expand_as(lc)
    seg0 = torch.cummax(torch.where(start, pos, 0), -1)[0]  # first index of the segment
    cs = torch.cumsum(contrib, -1)
    before = torch.where(seg0 > 0, cs.gather(-1, torch.clamp(seg0 - 1, min=0)), 0.0)
    net = cs - before
    if signs_only:
        certified = net != 0
    else:
        # each running sum is within (t + 1) u of the running sum of |w| (and underflow)
        ca = torch.cumsum(torch.abs(contrib), -1)
        err = 2 * ((pos + 2) * _U64 * ca + (pos + 2) * 2.0**-1074)
        certified = torch.abs(net) > 2 * err
    open_ = cand & (~certified | zero_c)
    if not bool(open_.any()):
        return log, sgn
    # step 3: exact, prefix by prefix (Python, only for these rows and up to their last):
    # zeros are (-inf, 0), the other open prefixes are summed exactly (computed as zero,
    # or a value of any sign within an infinite bound: the sum of the same terms is exact)
    idx_l: list[int] = []
    val_l: list[tuple[float, float]] = []
    for r in open_.any(-1).nonzero()[:, 0].tolist():
        want = open_[r].nonzero()[:, 0].tolist()
        hi = want[-1] + 1
        base = int(rsel[r].item()) * n
        idx_l.extend(base + t for t in want)
        val_l.extend(exact_prefixes(lc[r, :hi].tolist(), wc[r, :hi].tolist(), None, want))
    idx = torch.tensor(idx_l, dtype=torch.int64, device=log.device)
    vals = torch.tensor(val_l, dtype=COMPUTE, device=log.device).reshape(-1, 2)
    log = log.flatten().index_put((idx,), vals[:, 0]).view_as(log)
    sgn = sgn.flatten().index_put((idx,), vals[:, 1]).view_as(sgn)
    return log, sgn
