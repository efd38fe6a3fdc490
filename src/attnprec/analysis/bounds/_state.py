"""Per-row sums over the keys a row sees, from per-channel prefix states: the linear-time
evaluation (``evaluation="state"``) of the bounds whose per-term factors separate into a
row part and a key part.

For weights ``w_ij = sum_c exp(X_ic + Y_jc)``, a sum over the terms of a row of
``exp(X_ic + Y_jc) F(i, c) H(j, c) g_j`` is ``sum_c exp(X_ic) F(i, c) S_c[H g]`` with the
key state ``S_c[H g] = sum_j exp(Y_jc) H(j, c) g_j`` over the visible keys: a prefix sum
(causal) or one total. :func:`scan` forms those states for every row in ``O(n C K)`` time
and ``O(chunk C K)`` memory beyond the inputs, where the pair evaluation takes
``O(rows n C)``.

Numerics: the states are held in units ``exp(m_c)``, ``m`` the running maximum of ``Y``
per channel over the keys scanned (the same for the rows of one key chunk; a state is
rescaled when it grows). Every entry of a state with ``g >= 0`` and ``H >= 0`` is within
relative :func:`state_rho` of its exact value, plus an absolute :attr:`Scan.floor` per unit
of ``max H max|g|`` (exps that underflow); a signed column within the same times its
magnitude column. A row whose visible keys all sit more than :data:`GAP` below its chunk's
unit (a jump of ``Y`` within the chunk) is flagged (``Scan.far``) for the pair evaluation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from attnprec import _progress as progress
from attnprec.analysis.bounds.rounding import SEQUENCE_BLOCK, U64, cumsum_before, excess, gamma

__all__ = [
    "GAP",
    "Scan",
    "causal_sum",
    "far_rows",
    "in_groups",
    "scan",
    "sequence_sq",
    "square_sum",
    "state_rho",
    "take",
    "value_columns",
]

#: A row's largest visible term must be within ``exp(-GAP)`` of its unit (float64 then
#: holds every term that matters; below, the row takes the pair evaluation).
GAP = 600.0

#: Entries of one family's ``[B, chunk, C, K]`` temporary.
ENTRIES = 2**19


@dataclass(frozen=True)
class Scan:
    """What :func:`scan` hands the row function for one chunk of rows (``r`` rows).

    Attributes
    ----------
    idx : torch.Tensor
        ``[r]``: the rows' indices.
    S : list of torch.Tensor
        Per factor of ``facs``: ``[B, r, C, K]`` states ``sum_j exp(Y_jc - m_c) H_jc g_j``.
    lone : list of torch.Tensor
        Per factor of ``lone``: ``[B, r, C]`` states with ``g = 1``.
    m : torch.Tensor
        ``[B, 1, C]``: the unit of the states.
    plain : torch.Tensor
        ``[B, r, P]``: plain sums of ``plain`` over the visible keys.
    peak : torch.Tensor
        ``[B, r, Q]``: maxima of ``peak`` over the visible keys.
    nvis : torch.Tensor
        ``[r]`` float64: the keys each row sees.
    rho : float
        The states' relative error (:func:`state_rho`).
    top : torch.Tensor
        ``[B, r, C]`` (int64): per channel, a visible key with the largest ``Y`` (the
        key of each channel's largest term; :func:`deviation` takes one key exactly).
    """

    idx: torch.Tensor
    S: list[torch.Tensor]
    lone: list[torch.Tensor]
    m: torch.Tensor
    plain: torch.Tensor
    peak: torch.Tensor
    nvis: torch.Tensor
    rho: float
    top: torch.Tensor


#: Entries of one per-sequence array ``[group, n, C]`` of a state evaluation: batches
#: (heads, channels) are evaluated in groups that keep each such array within this.
GROUP_ENTRIES = 2**20


def take(x: Any, sl: slice, B: int) -> Any:
    """``x``'s part for the batch items ``sl`` of ``B``: tensors whose first dim is ``B``
    sliced on it (others shared), tuples and dataclasses (:class:`.gated.Computed`) field
    by field."""
    if isinstance(x, torch.Tensor):
        return x[sl] if x.dim() and x.shape[0] == B else x
    if isinstance(x, tuple):
        return tuple(take(y, sl, B) for y in x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.replace(
            x, **{f.name: take(getattr(x, f.name), sl, B) for f in dataclasses.fields(x)}
        )
    return x


def in_groups(B: int, per_item: int, fn: Callable[[slice], Any]) -> Any:
    """``fn(sl)`` over groups ``sl`` of the ``B`` batch items, each holding at most
    :data:`GROUP_ENTRIES` entries (``per_item`` per item; at least one item), concatenated
    on dim 0: a state evaluation's per-sequence arrays (exponents, factors, prefix sums)
    then take memory per group, not per batch. Items are independent, so each group's
    bound holds for its items; the margins take each group's own maxima (float64 details,
    and the state-space methods' largest log-gate and its absolute error,
    ``Computed.gate_max`` and ``gate_abs``), so a bound is never above the one-group
    bound's and may be tighter. A tensor result, or a dict of them; a mask only some groups
    return is False on the others."""
    g = max(1, GROUP_ENTRIES // max(per_item, 1))
    slices = [slice(i, min(B, i + g)) for i in range(0, B, g)] or [slice(0, B)]
    if len(slices) == 1:
        return fn(slices[0])
    parts = [fn(sl) for sl in slices]
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts, 0)
    out = {}
    for key in dict.fromkeys(k for p in parts for k in p):
        ref = next(p[key] for p in parts if key in p)
        out[key] = torch.cat(
            [
                p[key]
                if key in p
                else torch.zeros(sl.stop - sl.start, *ref.shape[1:], dtype=ref.dtype)
                for p, sl in zip(parts, slices, strict=True)
            ],
            0,
        )
    return out


def value_columns(v: torch.Tensor, mu: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
    """The value columns ``g`` of the deviation bounds: ``[1, |v - mu|, v - mu, (v - mu)^2,
    *extra]`` on the last dim (``v [B, n, d_v]``, ``mu [B, 1, d_v]``).

    Raises
    ------
    ValueError
        Values whose deviations' squares (or mean) overflow float64, ``|v - mu|`` past
        about 1.3e154: the state evaluation cannot hold them (a review: its bound was inf
        with no reason named, the pair evaluation's finite).
    """
    c = v - mu
    sq = c * c
    if not bool(torch.isfinite(sq).all()):
        raise ValueError(
            "v: evaluation='state' squares the values' deviations from their mean in float64, "
            f"which overflow here (|v| up to {float(v.abs().max()):.3g}); use evaluation='pairs'"
        )
    return torch.cat([torch.ones_like(v[..., :1]), c.abs(), c, sq, *extra], -1)


def cummax1(x: torch.Tensor) -> Any:
    """``torch.cummax(x, 1)`` of ``x [B, n, C]`` (values and indices), formed along the
    last dim of a transposed copy: 1.3-2.7x faster on these shapes (2 cores)."""
    r = x.transpose(1, 2).contiguous().cummax(-1)
    return SimpleNamespace(values=r.values.transpose(1, 2), indices=r.indices.transpose(1, 2))


def bounds(Y: torch.Tensor, L: int) -> list[int]:
    """The ends of :func:`scan`'s causal chunks: at most ``L`` keys each, and within a chunk
    the running maximum of ``Y [B, n, C]`` rises by less than ``GAP / 2`` on every channel
    (a key that rises further starts the next chunk)."""
    n = Y.shape[1]
    if n == 0:
        return [0]
    M = cummax1(Y).values
    ends, k0 = [], 0
    while k0 < n:
        k1 = min(n, k0 + L)
        rise = (M[:, k0:k1] - M[:, k0 : k0 + 1]).amax((0, 2))  # [k1 - k0]
        over = (rise >= GAP / 2).nonzero()
        if over.numel():
            k1 = k0 + max(1, int(over[0, 0]))
        ends.append(k1)
        k0 = k1
    return ends


def chunk_len(B: int, n: int, C: int, K: int) -> int:
    """The keys per chunk of :func:`scan` for ``B`` sequences of ``n`` keys, ``C`` channels
    and ``K`` columns: its temporaries hold about :data:`ENTRIES` entries."""
    return max(16, min(n, ENTRIES // max(B * C * K, 1)))


def state_rho(n: int, chunks: int, y_abs: float) -> float:
    """Relative error of a state entry: its term's exp (argument ``Y - m`` off by ``u64
    |Y - m| <= 2 u64 max|Y|``, the exp within 2 ulps), two products, the sum over ``n``
    keys in any order, and per chunk one rescaling (an exp of a difference of units: the
    units rise monotonically, so their arguments' errors add to at most ``2 u64 max|Y|``)
    and one addition."""
    return gamma(n + 4 * chunks + 8, U64) + excess(4 * U64 * y_abs, 0) * (1 + 1e-3)


def scan(
    Y: torch.Tensor,
    facs: list[torch.Tensor | None],
    G: torch.Tensor,
    lone: list[torch.Tensor],
    plain: torch.Tensor,
    peak: torch.Tensor,
    causal: bool,
    rows: torch.Tensor | None,
    fn: Callable[[Scan], dict[str, torch.Tensor]],
    split: bool = False,
) -> dict[str, torch.Tensor]:
    """``fn`` over chunks of the rows ``rows`` (sorted; None: all), given their states;
    its outputs ``[B, r, ...]`` concatenated on dim 1.

    ``Y [B, n, C]`` the key exponents (finite), ``facs`` the factors ``H [B, n, C] >= 0``
    (None: 1) of the states over the columns ``G [B, n, K]``, ``lone`` factors of states
    over ``g = 1``, ``plain [B, n, P]`` summed and ``peak [B, n, Q]`` maximized over the
    visible keys (every key, or ``j <= i`` when ``causal``). ``split``: causal chunks also
    end where the running maximum of ``Y`` would rise by ``GAP / 2`` (:func:`bounds`), so
    that every row's largest visible term lies within ``exp(-GAP / 2)`` of its unit (for
    exponents that rise steadily, as decays' do; else a row far below its chunk's unit is
    left to the caller, :func:`merge_far`).
    """
    B, n, C = Y.shape
    K = G.shape[-1]
    idx = torch.arange(n) if rows is None else rows
    L = chunk_len(B, n, C, K)
    ends = bounds(Y, L) if causal and split else [*range(L, n, L), n]
    rho = state_rho(n, len(ends) + 1, float(Y.abs().max()) if Y.numel() else 0.0)
    parts: dict[str, list[torch.Tensor]] = {}

    def emit(s: Scan) -> None:
        for key, val in fn(s).items():
            parts.setdefault(key, []).append(val)

    def terms(sl: slice, m: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        e = torch.exp(Y[:, sl] - m)  # [B, L, C]
        base = e.unsqueeze(-1) * G[:, sl].unsqueeze(-2)  # [B, L, C, K]
        T = [base if f is None else base * f[:, sl].unsqueeze(-1) for f in facs]
        return T, [e * f[:, sl] for f in lone]

    if not causal:
        # every row sees every key: one total, in units of the overall maximum
        m = Y.amax(-2, keepdim=True)
        tot = [torch.zeros(B, 1, C, K, dtype=torch.float64) for _ in facs]
        tot_l = [torch.zeros(B, 1, C, dtype=torch.float64) for _ in lone]
        for k0 in range(0, n, L):
            T, Tl = terms(slice(k0, k0 + L), m)
            for a, t in zip(tot, T, strict=True):
                a += t.sum(1, keepdim=True)
            for a, t in zip(tot_l, Tl, strict=True):
                a += t.sum(1, keepdim=True)
            progress.rows(min(n, k0 + L), n)
        P = plain.sum(1, keepdim=True)
        Q = peak.amax(1, keepdim=True)
        top = Y.argmax(1, keepdim=True)  # [B, 1, C]
        for r0 in range(0, idx.numel(), L):
            ri = idx[r0 : r0 + L]
            r = ri.numel()
            emit(Scan(ri, [a.expand(B, r, C, K) for a in tot],
                      [a.expand(B, r, C) for a in tot_l], m, P.expand(B, r, -1),
                      Q.expand(B, r, -1), torch.full((r,), float(n), dtype=torch.float64),
                      rho, top.expand(B, r, C)))  # fmt: skip
    else:
        m = torch.full((B, 1, C), -math.inf, dtype=torch.float64)
        carry = [torch.zeros(B, 1, C, K, dtype=torch.float64) for _ in facs]
        carry_l = [torch.zeros(B, 1, C, dtype=torch.float64) for _ in lone]
        carry_p = torch.zeros(B, 1, plain.shape[-1], dtype=torch.float64)
        carry_q = torch.full((B, 1, peak.shape[-1]), -math.inf, dtype=torch.float64)
        carry_y = torch.full((B, 1, C), -math.inf, dtype=torch.float64)
        carry_t = torch.zeros(B, 1, C, dtype=torch.long)
        for k0, k1 in zip([0, *ends[:-1]], ends, strict=True):
            sl = slice(k0, k1)
            m_new = torch.maximum(m, Y[:, sl].amax(1, keepdim=True))
            rescale = torch.exp(m - m_new)  # 0 for the first chunk
            T, Tl = terms(sl, m_new)
            lo, hi = torch.searchsorted(idx, torch.tensor([sl.start, sl.stop]))
            ri = idx[int(lo) : int(hi)]
            at = ri - sl.start
            S, Sl = [], []
            for i, t in enumerate(T):
                cs = t.cumsum(1)
                base = carry[i] * rescale.unsqueeze(-1)
                S.append(cs[:, at] + base)
                carry[i] = cs[:, -1:] + base
            for i, t in enumerate(Tl):
                cs = t.cumsum(1)
                base = carry_l[i] * rescale
                Sl.append(cs[:, at] + base)
                carry_l[i] = cs[:, -1:] + base
            cp = plain[:, sl].cumsum(1) + carry_p
            cq = torch.maximum(cummax1(peak[:, sl]).values, carry_q)
            cy = cummax1(Y[:, sl])
            later = cy.values > carry_y
            ct = torch.where(later, cy.indices + sl.start, carry_t)
            cyv = torch.where(later, cy.values, carry_y)
            carry_p, carry_q, carry_y, carry_t = cp[:, -1:], cq[:, -1:], cyv[:, -1:], ct[:, -1:]
            m = m_new
            if ri.numel():
                nv = (ri + 1).to(torch.float64)
                emit(Scan(ri, S, Sl, m, cp[:, at], cq[:, at], nv, rho, ct[:, at]))
            progress.rows(k1, n)
    return {key: torch.cat(val, dim=1) for key, val in parts.items()}


#: Entries of :func:`sequence_sq`'s per-block Gram states ``[B, blocks, F, F, K]``.
GRAM_ENTRIES = 2**21

#: How far the unit of one of :func:`sequence_sq`'s causal steps may rise above what its
#: rows see (their factors' squares, ``exp(2 RISE)``, stay within float64).
RISE = 300.0


def sequence_sq(
    a: torch.Tensor,
    b: torch.Tensor,
    g: torch.Tensor,
    causal: bool,
    rows: torch.Tensor | None,
    log: bool = False,
    block: int = SEQUENCE_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`.rounding.sequence_sq` from states: for the weights ``w_ij = a_i . b_j``
    (``a [B, r, F]`` of the rows ``rows``, sorted, or of every row; ``b [B, n, F]``), or
    ``w_ij = sum_c exp(a_ic + b_jc)`` when ``log``, over the columns ``g [B, n, K]``:
    each row's sum of squared partial sums in sequence order over the keys it sees (every
    key, or ``j <= i`` when ``causal``), exact at the boundaries of blocks of ``block``
    keys, linear within, the first key's term left out; and its whole sum ``sum_j w_ij
    g_j`` (``[B, r, K]`` each). When ``log``, both in a unit of the row's own (their
    ratios are exact): divide by the square of the whole sum to normalize.

    The same figure as the pair evaluation's, without its ``rows x n`` weights: a row's
    partial sums at the block boundaries are ``a_i . S_b`` for the prefix states ``S_b =
    sum_{j < b block} b_j g_j``, so their squares summed over the blocks before the row's
    are the quadratic form ``a_i^T G a_i`` of the prefix Gram states ``G = sum_b S_b
    S_b^T`` (with the blocks' own sums, the in-block terms); the row's own block from its
    pairs. ``O(n F^2 K / block + r F^2 K)`` time, ``O(GRAM_ENTRIES)`` memory. With
    ``log``, the states are in units ``exp(m_c)``, ``m`` the running maximum of ``b`` per
    channel (rescaled as it grows).

    A model term (float64, no upward rounding; the quadratic form may lose relative
    ``u64 |a|^2 |S|^2 / (a . S)^2`` to cancellation, clamped at 0), as the pair
    evaluation's. When ``log``, each row is taken in a unit of its own (its largest
    visible term 1, so neither its sums nor their squares underflow), and a causal step
    ends where the keys' running maximum would rise by more than :data:`RISE` over what
    its first row sees (its rows' factors then stay below ``exp(RISE)``); a row that a
    later key of its own block sits further above gets zeros (no figure: the level's
    other one then stands alone), never a non-finite value."""
    B, n, F = b.shape
    K = g.shape[-1]
    r = a.shape[1]
    idx = torch.arange(r) if rows is None else rows
    out = torch.zeros(B, r, K, dtype=torch.float64)
    tot = torch.zeros(B, r, K, dtype=torch.float64)
    if n == 0 or r == 0:
        return out, tot

    def unit(
        x: torch.Tensor, m: torch.Tensor, seen: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``x`` of ``a`` against states in the unit ``m [B, 1, F]``, each row shifted
        by its largest visible term (``seen``: the largest ``b`` it sees per channel), and
        their products ``[B, r', F * F]``."""
        if log:
            x = torch.exp(x + m - (x + seen).amax(-1, keepdim=True))
        return x, (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)

    def first(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """The first key's term of the rows ``x`` (in the unit ``m``): no addition."""
        return (x @ (torch.exp(b[:, :1] - m) if log else b[:, :1]).mT) * g[:, :1]

    m = b.amax(1, keepdim=True) if log and not causal else torch.zeros(B, 1, F, dtype=b.dtype)
    if log and causal:
        m = torch.full((B, 1, F), -math.inf, dtype=torch.float64)
    nb = -(-n // block)
    step = max(1, GRAM_ENTRIES // (B * F * F * K))
    S = torch.zeros(B, 1, F, K, dtype=torch.float64)
    G = torch.zeros(B, 1, F, F, K, dtype=torch.float64)
    if log and causal:  # the keys' running maxima: per key, and at each block's end
        vm = cummax1(b).values
        pad_b = torch.nn.functional.pad(b, (0, 0, 0, nb * block - n), value=-math.inf)
        run = pad_b.reshape(B, nb, block, F).amax(2).cummax(1).values
    b0 = 0
    while b0 < nb:
        b1 = min(nb, b0 + step)
        if log and causal:
            rise = (run[:, b0:b1] - vm[:, b0 * block].unsqueeze(1)).amax((0, 2))
            over = (rise > RISE).nonzero()
            if over.numel():
                b1 = b0 + max(1, int(over[0, 0]))
        nbk, k0, k1 = b1 - b0, b0 * block, min(n, b1 * block)
        b0 = b1
        bs = b[:, k0:k1]
        if log:
            if causal:  # the unit rises with the keys: the states rescaled
                m_new = torch.maximum(m, bs.amax(1, keepdim=True))
                f = torch.exp(m - m_new)
                S = S * f.unsqueeze(-1)
                G = G * (f.unsqueeze(-1) * f.unsqueeze(-2)).unsqueeze(-1)
                m = m_new
            bs = torch.exp(bs - m)
        pad = (0, 0, 0, nbk * block - (k1 - k0))
        bk = torch.nn.functional.pad(bs, pad).reshape(B, nbk, block, F)
        gk = torch.nn.functional.pad(g[:, k0:k1], pad).reshape(B, nbk, block, K)
        T = torch.einsum("bmjf,bmjk->bmfk", bk, gk)  # each block's sum
        Sx = S + cumsum_before(T)
        nk = torch.full((nbk,), float(block), dtype=torch.float64)
        nk[-1] = k1 - (b1 - 1) * block
        # sum_{i=1..n} (S + i T / n)^2 = n (S + (n + 1) / (2n) T)^2 + (n^2 - 1) / (12 n) T^2
        # (rounding.sequence_sq's figure as two squares), per pair of features
        nk = nk.reshape(1, nbk, 1, 1)
        W = torch.stack([nk.sqrt() * (Sx + (nk + 1) / (2 * nk) * T),
                         ((nk * nk - 1) / (12 * nk)).sqrt() * T], 2)  # fmt: skip
        D = torch.einsum("bmsfk,bmsgk->bmfgk", W, W)
        Gx = G + cumsum_before(D)
        S, G = Sx[:, -1:] + T[:, -1:], Gx[:, -1:] + D[:, -1:]
        if not causal:
            continue
        lo, hi = (int(x) for x in torch.searchsorted(idx, torch.tensor([k0, k1])))
        if lo == hi:
            continue
        ri, beta = idx[lo:hi], idx[lo:hi] // block - k0 // block
        at, aa = unit(a[:, lo:hi], m, vm[:, ri] if log else m)
        # the row's own block: the sum before it, and its keys up to the row
        s_ = torch.einsum("brf,brfk->brk", at, Sx[:, beta])
        off = ri - k0 - beta * block
        seen = off.unsqueeze(-1) >= torch.arange(block)
        dots = torch.einsum("brf,brjf->brj", at, bk[:, beta]) * seen
        t_ = torch.einsum("brj,brjk->brk", dots, gk[:, beta])
        nn = (off + 1).to(torch.float64).reshape(1, -1, 1)
        own = s_ * (nn * s_ + (nn + 1) * t_) + (nn + 1) * (2 * nn + 1) / (6 * nn) * t_ * t_
        # a_i^T G a_i, the rows laid out by block: one batched product
        blocks, at_b = torch.unique_consecutive(beta, return_inverse=True)
        grid = aa.new_zeros(B, blocks.numel(), block, F * F)
        grid[:, at_b, off] = aa
        quad = (grid @ Gx[:, blocks].flatten(2, 3))[:, at_b, off]
        out[:, lo:hi] = quad + own - first(at, m) ** 2
        tot[:, lo:hi] = s_ + t_
    if not causal:
        part = max(1, GRAM_ENTRIES // (B * F * F))  # (the rows' products in parts)
        for r0 in range(0, r, part):
            at, aa = unit(a[:, r0 : r0 + part], m, m)
            out[:, r0 : r0 + part] = aa @ G.reshape(B, F * F, K) - first(at, m) ** 2
            tot[:, r0 : r0 + part] = torch.einsum("brf,bfk->brk", at, S[:, 0])
    ok = (out.isfinite() & tot.isfinite()).all(-1, keepdim=True)
    return torch.where(ok, out.clamp_min(0.0), 0.0), torch.where(ok, tot, 0.0)


def far_rows(Y: torch.Tensor, s: Scan) -> torch.Tensor:
    """``[B, r, 1]``: the chunk's rows with a channel whose visible terms all sit more than
    :data:`GAP` below the unit (``Y`` the scan's key exponents, taken at the rows)."""
    return ((Y[:, s.idx] - s.m).amin(-1) < -GAP).unsqueeze(-1)


def causal_sum(
    Y: torch.Tensor,
    facs: list[torch.Tensor | None],
    G: torch.Tensor,
    rows: torch.Tensor | None,
    fn: Callable[[Scan], torch.Tensor],
    dense: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """A causal per-row sum ``fn(s)`` ``[B, r, K']`` from :func:`scan`'s states (chunks that
    end where ``Y`` rises by ``GAP / 2``), the rows the states cannot hold (:func:`far_rows`)
    from ``dense(indices)``, the pair evaluation."""
    B, n = Y.shape[:2]
    empty = torch.zeros(B, n, 0, dtype=torch.float64)

    def rows_fn(s: Scan) -> dict[str, torch.Tensor]:
        out = fn(s)
        return {"q": out, "far": far_rows(Y, s).expand_as(out)}

    out = scan(Y, facs, G, [], empty, empty, True, rows, rows_fn, True)
    idx_all = torch.arange(n) if rows is None else rows
    return merge_far(out, idx_all, lambda sel: {"q": dense(sel)})["q"]


@dataclass(frozen=True)
class Rows:
    """The exact weights of a chunk of rows from their states (:func:`rows_of`).

    Attributes
    ----------
    wn : torch.Tensor
        ``[B, r, C]``: ``exp(X_ic + m_c) / W_i`` (the row factor of the states: ``sum_c wn_c
        S_c[g]`` is ``sum_j p_ij g_j``, ``p`` the normalized weights).
    y, eps_y : torch.Tensor
        ``[B, r, d_v]``: the exact output (float64) and its certified radius.
    yc : torch.Tensor
        ``y - mu``, the output from the deviations' center.
    p_abs : torch.Tensor
        ``[B, r, d_v]``: an upper bound of ``sum_j p_ij |v_j - mu|``.
    rho : torch.Tensor
        ``[B, r, 1]``: the relative error of an aggregate ``sum_c wn_c f_c S_c[g]`` (``f``
        exact row factors, ``g >= 0``) formed in float64, division by ``W`` included.
    floor : float
        Its absolute error per unit of ``max f max|g|`` (exps that underflow).
    far : torch.Tensor
        ``[B, r]`` bool: rows to take the pair evaluation (:data:`GAP`).
    """

    wn: torch.Tensor
    y: torch.Tensor
    eps_y: torch.Tensor
    yc: torch.Tensor
    p_abs: torch.Tensor
    rho: torch.Tensor
    floor: float
    far: torch.Tensor


def rows_of(
    s: Scan,
    X: torch.Tensor,
    peak_y: torch.Tensor,
    mu: torch.Tensor,
    gmax: torch.Tensor,
    fac_max: float,
    arg_err: float = 0.0,
) -> Rows:
    """:class:`Rows` of a chunk: ``X [B, r, C]`` the rows' exponents, ``peak_y [B, r, C]``
    the largest visible ``Y`` per channel, ``mu [B, 1, d_v]`` the center of the value
    columns (:func:`value_columns`; ``S[0]`` their plain state), ``gmax [B, 1, K]`` the
    columns' largest magnitudes, ``fac_max`` the largest state factor ``H``, ``arg_err`` a
    bound on the error of ``X_ic + Y_jc`` against the exact exponent beyond one rounding
    of each (exponents evaluated in float64 by more operations)."""
    C = X.shape[-1]
    S0 = s.S[0]
    dv = mu.shape[-1]
    xm = X + s.m
    sh = xm.amax(-1, keepdim=True)
    w = torch.exp(xm - sh)
    # X's own rounding and fl(X + m - sh)'s two (<= u64 (3|X| + 2|m| + |sh|)), the
    # exponents' further error; the exp within 2 ulps
    lr = 3 * U64 * (X.abs() + s.m.abs() + sh.abs()).amax(-1, keepdim=True) + arg_err
    rho_r = torch.expm1(lr * (1 + 4 * U64))
    rho_w = rho_r + 2 * U64 + gamma(C + 2, U64)
    W = torch.einsum("brc,brc->br", w, S0[..., 0])
    wn = w / W.unsqueeze(-1)
    # numerator and normalizer each within rho_s + rho_w, the division one rounding more
    rho = (2 * (s.rho + rho_w) + 4 * U64) / (1 - 2 * (s.rho + rho_w))
    # an underflowed term is off by 2^-1074 (times H g) against W >= exp(-GAP) (not far)
    floor = 4 * C * S0.shape[1] * 2.0**-1074 * math.exp(GAP) * (1 + fac_max) * 8
    far = (X + peak_y).amax(-1) - sh.squeeze(-1) < -GAP
    far = far | ~torch.isfinite(W) | ~(W > 0)
    P = torch.einsum("brc,brck->brk", wn, S0[..., 1 : 1 + 2 * dv])
    p_abs, yc = P[..., :dv], P[..., dv:]
    pad = floor * gmax[..., 1 : 1 + dv]
    p_abs = p_abs * (1 + rho) + pad
    eps_y = ((rho * (p_abs + yc.abs()) + pad) / (1 - rho)) * (1 + 8 * U64)
    y = mu + yc
    eps_y = eps_y + 2 * U64 * y.abs()
    return Rows(wn, y, eps_y, yc, p_abs, rho, floor, far)


def top_key(
    s: Scan, X: torch.Tensor, cols: list[torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per row, the visible key of its largest term (the channel maximizing ``X_ic +
    max_j Y_jc``): its index ``[B, r, 1]`` and its rows of each per-key array of ``cols``
    (``[B, n, *]`` each, gathered to ``[B, r, *]``)."""
    c = (X + s.peak[..., : X.shape[-1]]).argmax(-1, keepdim=True)
    j = s.top.gather(-1, c)  # [B, r, 1]
    return j, [x.gather(1, j.expand(*j.shape[:-1], x.shape[-1])) for x in cols]


def combine(r: Rows, pairs: list[tuple[torch.Tensor, int]], S: list[torch.Tensor]) -> torch.Tensor:
    """``sum_c sum_t wn_c f_tc S_t[c, :]`` for the ``(f [B, r, C], t)`` of ``pairs``:
    ``[B, r, K]`` (in float64, before :attr:`Rows.rho`)."""
    out = None
    for f, t in pairs:
        x = torch.einsum("brc,brck->brk", r.wn * f, S[t])
        out = x if out is None else out + x
    assert out is not None
    return out


def key_weight(
    r: Rows,
    Y_key: torch.Tensor,
    m: torch.Tensor,
    parts: list[tuple[torch.Tensor, torch.Tensor | None]],
) -> torch.Tensor:
    """One key's weight ``a_ij = sum_c wn_c exp(Y_jc - m_c) sum_t f_tc H_t(j, c)`` in an
    aggregate of :func:`combine` (``parts``: ``(f [B, r, C], H_t(j, .) [B, r, C] or None
    for 1)``; ``Y_key [B, r, C]`` the key's exponents per row): ``[B, r, 1]``, within
    :attr:`Rows.rho` of its exact value (fewer roundings than a state's)."""
    e = r.wn * torch.exp(Y_key - m)
    fac = sum((f if h is None else f * h for f, h in parts), torch.zeros_like(e))
    return (e * fac).sum(-1, keepdim=True)


def square_sum(
    A: torch.Tensor, rho: torch.Tensor, pad: torch.Tensor, c: torch.Tensor
) -> torch.Tensor:
    """Upper bound of ``sum_j a_j (v_j - mu - c)^2`` (``a >= 0``) from ``A = sum_j a_j
    g_j`` over :func:`value_columns` (``[..., K]``), each column within relative ``rho``
    plus ``pad`` (``[..., K]``) of its value; ``c [..., d_v]``: the square expanded about
    ``mu``, its signed column bounded by its magnitude column."""
    dv = c.shape[-1]
    up = A * (1 + rho) + pad
    a0, a_abs, a_sq = up[..., :1], up[..., 1 : 1 + dv], up[..., 1 + 2 * dv : 1 + 3 * dv]
    a_sgn = A[..., 1 + dv : 1 + 2 * dv]
    mag = a_sq + 2 * c.abs() * a_abs + c * c * a0
    sq = a_sq - 2 * c * a_sgn + c * c * a0
    err = (rho + gamma(8, U64)) * mag + 2 * c.abs() * pad[..., 1 + dv : 1 + 2 * dv]
    return sq.clamp_min(0.0) + err


def deviation(
    r: Rows,
    A: torch.Tensor,
    gmax: torch.Tensor,
    coef_max: torch.Tensor,
    key: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Upper bound of ``sum_j a_ij |v_j - y_i|`` (exact ``y``) from ``A = sum_j a_ij g_j``
    (:func:`combine`, over :func:`value_columns`), ``a >= 0``: the lesser of ``sum a |v -
    mu| + |y - mu| sum a`` and ``sqrt(sum a sum a (v - y)^2)`` (Cauchy-Schwarz, the square
    expanded about ``mu``), plus ``eps_y sum a``. ``gmax [B, 1, K]`` the columns' largest
    magnitudes, ``coef_max [B, r, 1]`` the largest row factor (for the floor).

    ``key``: ``(a_ij* [B, r, 1], g_j* [B, r, K])`` of one visible key (:func:`key_weight`,
    its columns): that key's term is also taken exactly and the two bounds applied to the
    other keys (``A`` less its share, bounded outward), and the lesser result returned.
    Where a row's weight sits on one key, Cauchy-Schwarz over all keys gives ``sqrt(eps)``
    against the exact ``eps``; over the rest it is of order ``eps``."""
    dv = r.yc.shape[-1]
    pad = r.floor * coef_max * gmax
    up = A * (1 + r.rho) + pad
    a0, a_abs = up[..., :1], up[..., 1 : 1 + dv]
    c = r.yc
    one = a_abs + c.abs() * a0
    sq = square_sum(A, r.rho, pad, c)
    two = torch.sqrt(a0 * sq) * (1 + 4 * U64)
    out = torch.minimum(one, two) + r.eps_y * a0
    if key is not None:
        w, g = key
        w_lo, w_up = w * (1 - r.rho), w * (1 + r.rho) + r.floor * coef_max
        ck = g[..., 1 + dv : 1 + 2 * dv]  # the key's v - mu
        dk = (ck - c).abs() * (1 + 2 * U64)
        # the other keys: the sums less the key's share, each bounded outward
        r0 = (a0 - w_lo).clamp_min(0.0)
        r_abs = (a_abs - w_lo * ck.abs() * (1 - 2 * U64)).clamp_min(0.0)
        r_sq = (sq - w_lo * dk * dk * (1 - 4 * U64)).clamp_min(0.0)
        rest = torch.minimum(r_abs + c.abs() * r0, torch.sqrt(r0 * r_sq) * (1 + 4 * U64))
        alt = w_up * (dk + r.eps_y) + rest + r.eps_y * r0
        out = torch.minimum(out, alt * (1 + 4 * U64))
    return out * (1 + 4 * U64)


def merge_far(
    out: dict[str, torch.Tensor],
    rows: torch.Tensor,
    dense: Callable[[torch.Tensor], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """A state evaluation's result ``out`` (with its ``"far"`` mask, popped) with the rows
    the float64 states cannot hold (:data:`GAP`) replaced by ``dense`` (the pair evaluation
    of those rows, given their indices among ``rows``, at the same confidence); a reason
    only one side names is False on the other's rows."""
    far = out.pop("far")[..., 0]
    if not bool(far.any()):
        return out
    sel = far.any(0).nonzero().flatten()
    pairs = dense(rows[sel])
    for key in list(out):
        out[key][:, sel] = pairs[key] if key in pairs else False
    for key, val in pairs.items():
        if key not in out:
            base = torch.zeros_like(out["sound"], dtype=torch.bool)
            base[:, sel] = val
            out[key] = base
    return out


def power_sums(
    fams: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    powers: list[int],
    causal: bool,
    rows: torch.Tensor | None,
    fn: Callable[[torch.Tensor, list[dict[int, torch.Tensor]]], dict[str, torch.Tensor]],
    chunk: int = 0,
    channels: bool = False,
) -> dict[str, torch.Tensor]:
    """``fn(rows, sums)`` over chunks of the rows ``rows`` (sorted; None: all), its outputs
    ``[B, r, ...]`` concatenated on dim 1; ``sums`` per family ``(a [B, n, d], b [B, n,
    d], G [B, n, K])`` and power ``p``: ``sum_j (a_i . b_j)^p G_j`` over the keys each row
    sees, ``[B, r, K]`` (float64). ``O(n F K)`` time for ``F = sum_p C(d + p - 1, p)``
    packed monomials, ``O(chunk F + F K)`` memory: the chunked form of a feature-map kernel
    (a state of the earlier chunks' monomials, the chunk's own keys as pairs).

    Error: each term's path takes at most ``2p + 2`` products on its monomial or power,
    ``F_p + d + chunk + n / chunk + 2`` additions, so a sum is within ``gamma_{n + F + d +
    2p + 8}(u64)`` of the same expression on ``|a|, |b|, |G|`` (exactly it where those are
    nonnegative), plus the products' underflow (:func:`power_floor`). ``channels``: each
    family's ``sums`` also holds, under the key ``-1``, ``sum_j b_jc G_j`` per channel
    ``[B, r, d, K]`` (the degree-1 state before its product with ``a``; the same error).
    ``n`` is the keys' count; ``a`` is indexed by ``rows`` (positions when causal)."""
    B, n, _ = fams[0][1].shape
    idx = torch.arange(n) if rows is None else rows
    top = max(powers, default=0)
    # per width d and degree p >= 1, taylor_features' tables: each monomial's parent
    # among those of degree p - 1, its last index and its multinomial coefficient
    from attnprec.attention.taylor import monomial_tables

    widths = {a.shape[-1] for a, _, _ in fams}
    tabs = {d: {p: monomial_tables(d, p) for p in range(1, top + 1)} for d in widths}
    mult = {
        d: {0: torch.ones(1, dtype=torch.float64)}
        | {p: torch.tensor(t[2], dtype=torch.float64) for p, t in ts.items()}
        for d, ts in tabs.items()
    }

    def feats(x: torch.Tensor) -> dict[int, torch.Tensor]:
        d = x.shape[-1]
        out = {0: torch.ones(*x.shape[:-1], 1, dtype=torch.float64), 1: x}
        for e in range(2, top + 1):
            parent, last, _ = tabs[d][e]
            out[e] = out[e - 1][..., parent] * x[..., last]
        return out

    def power(x: torch.Tensor, p: int) -> torch.Tensor:
        out = torch.ones_like(x)
        for _ in range(p):
            out = out * x
        return out

    F = max(sum(m[p].numel() for p in powers) for m in mult.values())
    chunk = chunk or power_chunk(F)
    carry = [{p: torch.zeros(B, mult[a.shape[-1]][p].numel(), G.shape[-1],
                             dtype=torch.float64) for p in powers}
             for a, _, G in fams]  # fmt: skip
    if channels:  # the per-channel degree-1 states
        for f, (a, _, G) in enumerate(fams):
            carry[f][-1] = torch.zeros(B, a.shape[-1], G.shape[-1], dtype=torch.float64)
    parts: dict[str, list[torch.Tensor]] = {}

    def emit(ri: torch.Tensor, sl: slice | None) -> None:
        sums: list[dict[int, torch.Tensor]] = []
        for f, (a, b, G) in enumerate(fams):
            ar = a[:, ri]
            if sl is not None:
                dots = ar @ b[:, sl].transpose(-1, -2)
                seen = (ri.unsqueeze(-1) >= torch.arange(sl.start, sl.stop)).to(torch.float64)
            fq = feats(ar)
            sums.append({})
            for p in powers:
                o = (fq[p] * mult[a.shape[-1]][p]) @ carry[f][p]
                if sl is not None:
                    o = o + (power(dots, p) * seen) @ G[:, sl]
                sums[f][p] = o
            if channels:
                o = carry[f][-1].unsqueeze(1)
                if sl is not None:  # the chunk's own keys up to each row: a prefix sum
                    own = (b[:, sl].unsqueeze(-1) * G[:, sl].unsqueeze(-2)).cumsum(1)
                    o = o + own[:, ri - sl.start]
                sums[f][-1] = o.expand(-1, ri.numel(), -1, -1)
        for key, val in fn(ri, sums).items():
            parts.setdefault(key, []).append(val)

    def absorb(sl: slice) -> None:
        for f, (_, b, G) in enumerate(fams):
            fk = feats(b[:, sl])
            for p in powers:
                carry[f][p] += fk[p].transpose(-1, -2) @ G[:, sl]
            if channels:
                carry[f][-1] += b[:, sl].transpose(-1, -2) @ G[:, sl]

    for k0 in range(0, n, chunk):
        sl = slice(k0, min(n, k0 + chunk))
        if causal:
            lo, hi = torch.searchsorted(idx, torch.tensor([sl.start, sl.stop]))
            ri = idx[int(lo) : int(hi)]
            if ri.numel():
                emit(ri, sl)
        absorb(sl)
        progress.rows(sl.stop, n)
    if not causal:
        for r0 in range(0, idx.numel(), chunk):
            emit(idx[r0 : r0 + chunk], None)
    return {key: torch.cat(val, dim=1) for key, val in parts.items()}


def power_chunk(F: int) -> int:
    """:func:`power_sums`' default keys per chunk for ``F`` monomials: its ``[B, chunk,
    F]`` features stay within 2^25 entries."""
    return max(16, min(256, 2**25 // max(F, 1)))


def power_rho(n: int, F: int, d: int, top: int, chunk: int | None = None) -> float:
    """:func:`power_sums`' relative error (against the sums over magnitudes); with its
    ``chunk``, the additions of the key sums are ``min(chunk, n) + ceil(n / chunk)``
    rather than ``n``."""
    adds = n if chunk is None else min(chunk, n) + -(-n // chunk)
    return gamma(adds + F + d + 2 * top + 8, U64)


def power_floor(n: int, F: int, d: int, top: int, amax: float, bmax: float) -> float:
    """:func:`power_sums`' absolute error from float64 underflow per unit of ``max|G|``
    (``amax``, ``bmax``: the largest ``|a|``, ``|b|``): each of a term's ``2 top + d + 2``
    products may lose ``2^-1075``, carried through the remaining factors (each at most
    ``max(1, amax) max(1, bmax)`` per degree, the multinomial at most ``top!``)."""
    big = float(torch.tensor(max(1.0, amax) * max(1.0, bmax), dtype=torch.float64) ** top)
    fact = float(math.factorial(top)) if top <= 170 else math.inf  # (171! overflows float64)
    return n * (F + d) * (2 * top + d + 2) * 2.0**-1074 * fact * big * 2
