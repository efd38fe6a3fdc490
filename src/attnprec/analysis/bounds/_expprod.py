"""Rounding bound of the normalized methods whose weights are sums of exponentials of sums:
``w_ij = sum_c exp(X_ic + Y_jc)`` — log attention (c a channel, ``X = scale q``,
``Y = scale k``) and FAVOR+ (c a random feature, ``X``, ``Y`` the feature exponents).

Any algorithm is covered that computes each term as ``exp`` of its exponent shifted by a
running maximum — directly, ``exp((X_ic + Y_jc) - M_i)``, or factorized,
``exp(X_ic + m_c - M_i) exp(Y_jc - m_c)`` with key-side maxima ``m_c`` (per channel for
log attention; per key and then over the keys for FAVOR+: ``Exponents.per_channel``) that
may grow and rescale a state up to once per block of keys — then multiplies by the
values and sums over the keys and over the channels, nested (either first, each in any
order; not one flat sum over the pairs: ``Precision``), divides once and stores
(docs/bounds/attention.md, "Sums of exponentials"). Per term the exponent error is at
most

    Lambda_ijc = eX_ic + eY_jc + u_c (|X_ic| + |Y_jc| + |X_ic + m_c|
                 + (2 + 2a) (Dq_ic + Dk_ijc)) + u_c (|X_ic| + |m_c| + 2 |Y_jc| + Dk_ijc),

``eX``, ``eY`` the errors of computing the exponents themselves (the method's), ``Dq``,
``Dk`` the distances of the query and key parts to their shifts (the rescalings'
arguments telescope to ``Dk``), ``a`` the argument rounding inside exp; each term passes
``2 + x + R`` exps and ``2 + x`` products (``1 + x`` on the normalizer's path), ``x = 1``
where the key shift is one over every feature (FAVOR+: a key's features are formed against
its own largest exponent ``a_j``, then scaled by ``exp(a_j - m)``), else 0. The last
group: a kernel may fold log2(e) into its exponents and take ``exp2`` (Triton,
FlashAttention style), rounding each unshifted ``X C``, ``Y C``, ``m_c C`` and a key
block's running maximum ``m_b C`` (rounded per block, so it does not cancel; ``|m_b| <=
|Y| + Dk`` as ``Y <= m_b <= m_c``). :mod:`.quotient` does the rest.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from attnprec.analysis.bounds._rows import Block, Normalized, Visible, normalize, row_positions
from attnprec.analysis.bounds.quotient import (
    Terms,
    finish,
    folded_shift,
    hull,
    larger,
    largest_weight,
    quotient,
    unbounded,
)
from attnprec.analysis.bounds.rounding import (
    U64,
    deficit,
    excess,
    exp_down,
    gamma,
    lse_bound,
    order_sq,
    order_sq_sum,
    upper,
)
from attnprec.analysis.bounds.softmax import CHORD_SPAN, Loaded, _chord, schedule
from attnprec.analysis.precision import Precision

__all__ = [
    "Exponents",
    "LogKeys",
    "chord_reach",
    "expprod_block",
    "expprod_state",
    "log_keys",
]

#: Margin of the log-space model's magnitude bound: every partial sum, errors included, is
#: at most ``e^GROWTH`` times the sum of the terms' magnitudes (checked; else unbounded).
GROWTH = 1.0

#: Entries of the ``[B, r, keys, C]`` temporaries of one key chunk: cache-sized (each of
#: the many elementwise passes over a chunk runs several times faster than over a
#: :data:`._rows.BUDGET`-sized one).
CHUNK = 2**16


@dataclass(frozen=True)
class Exponents:
    """The exponents of one row block: ``X [B, r, C]``, ``Y [B, m, C]`` (float64, within
    ``x_err``, ``y_err`` of the exact ones) and the kernel's errors in computing them,
    ``eX``, ``eY`` (same shapes); ``per_channel``: the key shift is per channel (log
    attention) rather than one shift over every feature (FAVOR+); ``y_max`` ``[B, 1, C or 1]``:
    the largest key exponent over every key of the sequence, masked ones included (a kernel
    may shift the keys by it, as causal FAVOR+ code may; with FAVOR+'s ``stabilizer=
    "data_dash"``, the largest linear part, ``amax(data_dash)``), or None where every
    key is visible to every row; ``log_sums``: the kernel may also hold its partial sums as
    logs rounded to compute (:class:`_LogSums`; its key side), else None; ``key_over``
    ``[B, m]``: the keys whose key or value overflows compute on loading (formed once per
    sequence); ``key_shift_err [B]``: the largest ``eY + y_err`` over every key of the
    sequence (a key shift's error; once per sequence, so that a row's bound does not depend
    on the keys its block holds), None: over the block's keys; ``q_lift`` ``[B, r, 1]``: how
    far above the row's largest exponent a kernel may shift the row's query side (FAVOR+:
    Performer's shift by the largest ``data_dash``, :func:`.favor._lift`), None: not at
    all (one shift over every feature only); ``y_top`` ``[B, 1, C or 1]``: the largest key
    exponent as the kernel computes it over the padding keys (:func:`._rows.padding_max`,
    :func:`_past_exp`), None without a key mask."""

    X: torch.Tensor
    Y: torch.Tensor
    x_err: torch.Tensor
    y_err: torch.Tensor
    eX: torch.Tensor
    eY: torch.Tensor
    per_channel: bool
    key_over: torch.Tensor
    y_max: torch.Tensor | None = None
    log_sums: LogKeys | None = None
    chords: bool = False
    key_shift_err: torch.Tensor | None = None
    q_lift: torch.Tensor | None = None
    y_top: torch.Tensor | None = None

    @property
    def extra(self) -> int:
        """The exps (and products) a term passes beyond the query's and the key's own: 1
        where the key shift is one over every feature (``exp(a_j - m)`` scales each key's
        features, formed against its own largest exponent ``a_j``), else 0."""
        return 0 if self.per_channel else 1


def chord_reach(
    X: torch.Tensor, Y: torch.Tensor, eX: torch.Tensor, eY: torch.Tensor, precision: Precision
) -> bool:
    """Whether every term's exponent error ``Lambda`` (:func:`_expprod`) stays below
    ``CHORD_SPAN``, from the sequence's exponents (every query row ``X``, every key ``Y``,
    and their errors): ``Lambda <= eX + eY + (21 + 8a)(u_c + 8 u64)(max|X| + max|Y|)``
    (each of its terms at most its coefficient times ``|X| + |Y|``: the shifts' distances
    at most twice). Decided once per sequence, so that a row's bound does not depend on the
    rows that share its block (the chords are sound for any span; this decides tightness)."""
    if X.numel() == 0 or Y.numel() == 0:
        return False
    a, uc = precision.elementary.exp_arg, precision.compute.u
    big = float(X.abs().amax() + Y.abs().amax())
    reach = float(eX.amax() + eY.amax()) + (21 + 8 * a) * (uc + 8 * U64) * big
    return reach * (1 + gamma(8, U64)) <= CHORD_SPAN


def _products_over(
    precision: Precision,
    sums: torch.Tensor,
    C: int,
    term: torch.Tensor,
    v_top: torch.Tensor,
    full: Callable,
) -> dict[str, torch.Tensor]:
    """The products' overflow (they round in compute or accumulate: the smaller range),
    per row: the state form's exp times a channel's state (<= ``sums / C``, ``sums`` >=
    every partial sum over the C terms), the direct form's weight (C terms of at most
    ``term`` each) times a value (<= ``v_top``, the visible values' largest)."""
    lim, name = precision.products_overflow()
    prod = torch.maximum(sums / C, C * term * v_top)
    return {f"products in {name}": full(prod >= lim)}


def _past_exp(ex: Exponents, Mk: torch.Tensor, uc: float, limit: float) -> torch.Tensor:
    """``[B, r]``: where a padding key lies so far above the row's key shift ``Mk`` that
    its ``exp(Y_j - shift)`` may overflow compute (``limit``): a kernel may form every
    key's exp against a shift over the unmasked keys and mask the padding by a product,
    0 * inf = NaN (a review: a padding key 20 above the visible keys' maximum in fp16, NaN
    rows under finite bounds in log attention and FAVOR+). The shift as computed is at
    least ``Mk`` less the keys' largest errors."""
    if ex.y_top is None or Mk.numel() == 0:
        return torch.zeros(Mk.shape[:-1], dtype=torch.bool)
    err = float((ex.eY + ex.y_err).amax()) if ex.Y.numel() else 0.0
    gap = upper((ex.y_top - Mk).amax(-1) + err, 2) * (1 + 4 * uc)
    return gap >= math.log(limit)


def _key_max(blk: Block, Y: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """Per row, the largest key exponent it sees: ``[B, r, C]`` (per channel) or
    ``[B, r, 1]``."""
    Yc = Y if per_channel else Y.amax(-1, keepdim=True)
    return blk.vrange(Yc, Yc, "key exponents")[1]


@dataclass(frozen=True)
class LogKeys:
    """The key side of :class:`_LogSums`, once per sequence: ``log_ks [B, C]`` (log of a
    bound on every key sum of channel c, any value column or the normalizer, over every key),
    ``lam [B]`` (the key sums' ``lambda``), ``hc``, ``hk`` (the event coefficients for the
    longest path, over every key) and ``ok [B]`` (every key sum stays within
    ``e^GROWTH`` of its bound); ``vb [B, n, d_v]``: each value's share of a term's
    log-space factor (:func:`_beta_excess`; once per sequence, blocks take their keys');
    ``tail``: the probabilistic level's lambda for every term's path at once
    (:func:`log_tail`), ``vb_t`` the values' shares at it; ``one_sign [B, d_v]``: the value
    columns of one sign over every key, ``vb_p``, ``vb_pt`` their shares, sound and at the
    level (sums of one sign: ``_event_coefficients(signed=False)``)."""

    log_ks: torch.Tensor
    lam: torch.Tensor
    hc: float
    hk: float
    ok: torch.Tensor
    y_min: torch.Tensor
    vb: torch.Tensor
    tail: float
    vb_t: torch.Tensor
    one_sign: torch.Tensor
    vb_p: torch.Tensor
    vb_pt: torch.Tensor


def _event_coefficients(precision: Precision, events: Any, signed: bool = True) -> tuple[Any, Any]:
    """``(H c, H log K)`` of :class:`_LogSums` for ``events`` log-space events: a log-add
    composed in compute (its ``log(1 + t)`` off by the rounding of ``1 + t`` and the
    log's floor, :meth:`.Precision.log_floor`, absolute), or a declared accurate one
    (``elementary.logsum`` ulps of compute relative to the log, float64 work inside:
    ``2^-58`` per term). ``signed=False``: sums of terms of one sign (the normalizer, a
    value column of one sign), whose ``log1p(t)`` lies in ``[0, log 2]``: its relative
    error is an absolute one below ``0.8 k_l`` (in ``K``), not ``k_l`` times the logs'
    magnitude (``2 k_l`` of ``c``: a cancelling sum's ``|log1p(-t)|`` reaches
    ``|log|P|| + |L_a|``)."""
    el = precision.elementary
    uc = precision.compute.u
    if el.logsum > 0:
        return events * (2 * el.logsum * uc + 2.0**-58), events * 2.0**-58
    up = precision.product_u()
    kl, ke = precision.op_error("log"), precision.op_error("exp")
    floor = precision.log_floor() + uc  # (and 1 + t's rounding, a log's absolute error)
    c = 3 * up + (2 * kl if signed else 0.0) + 2 * up * kl
    return events * c, events * (math.log1p(ke) + 0.8 * kl * (1 + up) + floor)


def log_tail(lam: float, n_keys: int, channels: int) -> tuple[float, float]:
    """``(lam_lin, lam_ls)``: the probabilistic level's lambdas where a kernel may hold its
    sums as logs. An element's failure probability ``delta`` (``lam = tail_lambda(delta)``)
    is split in halves: one for the linear model's tail, one for the event that every term
    feeding the element (``2 n_keys C``: its column's and the normalizer's) keeps its path's
    log-space errors within ``lam_ls`` of their deviation (a union bound over the terms;
    :class:`_LogSums`)."""
    lin = math.sqrt(lam * lam + 2 * math.log(2.0))
    return lin, math.sqrt(lam * lam + 2 * math.log(4.0 * max(1, n_keys) * max(1, channels)))


def _typical_events(events: Any, tail: float) -> Any:
    """The probabilistic level's stand-in for ``events`` log-space events on a path: the
    sum of ``H`` independent mean-zero errors, each within ``b``, is within ``tail
    sqrt(H / 3) b`` on the level's event (uniform errors, variance proxy ``b^2 / 3``), and
    always within ``H b``."""
    h = torch.as_tensor(events, dtype=torch.float64)
    return torch.minimum(h, tail * torch.sqrt(h / 3)) * (1 + 4 * U64)


def _events(precision: Precision, n_keys: Any, channels: int) -> Any:
    """Log-space events on a term's path: the log-adds of a sum over ``n_keys`` keys (any
    tree: ``n - 1``; with a declared block, at most the schedule's depth), of one over the
    channels (``C - 1``), the term's log and ``X + log S``."""
    n = torch.as_tensor(n_keys, dtype=torch.float64)
    depth = torch.minimum(n - 1, schedule(precision, n)[1])
    return depth + channels + 1


def log_keys(
    Y: torch.Tensor,
    eY: torch.Tensor,
    va: torch.Tensor,
    precision: Precision,
    tail: float,
    one_sign: torch.Tensor,
) -> LogKeys:
    """:class:`LogKeys` of a sequence: key exponents ``Y [B, n, C]`` within ``eY`` of the
    kernel's, values as loaded at most ``va [B, n, d_v]``; ``tail`` the level's lambda of
    the log-space errors (:func:`log_tail`); ``one_sign [B, d_v]`` the value columns of
    one sign as loaded, over every key."""
    events = float(_events(precision, Y.shape[-2], Y.shape[-1]))
    hc, hk = _event_coefficients(precision, events)
    hc_t = _event_coefficients(precision, _typical_events(events, tail))[0]
    hc_p = _event_coefficients(precision, events, signed=False)[0]
    hc_pt = _event_coefficients(precision, _typical_events(events, tail), signed=False)[0]
    vmax = va.amax(-1).clamp_min(1.0)
    lk = Y + eY + vmax.log().unsqueeze(-1)  # [B, n, C]
    log_ks = torch.logsumexp(lk, -2)  # [B, C]
    lam = log_ks.amax(-1).clamp_min(0.0) + GROWTH
    # every key sum, errors included, relative to its bound: its growth factor
    E = torch.exp(lk - log_ks.unsqueeze(-2) - vmax.log().unsqueeze(-1))
    E = E * torch.exp(hk + hc * torch.maximum(-Y, lam.clamp_min(2.0).reshape(-1, 1, 1)))
    vb = _beta_excess(va, hc, precision)
    num = torch.einsum("bjc,bje->bce", E, va + vb)
    big = math.exp(GROWTH) * (1 - 1e-9)
    ok = (num.amax(-1) <= big).all(-1) & (E.sum(-2) <= big).all(-1)
    vb_t, vb_p, vb_pt = (_beta_excess(va, float(h), precision) for h in (hc_t, hc_p, hc_pt))
    return LogKeys(log_ks, lam, hc, hk, ok, Y.amin(-2), vb, tail, vb_t, one_sign, vb_p, vb_pt)


def _beta_excess(va: torch.Tensor, hc: float, precision: Precision) -> torch.Tensor:
    """``|v| (beta - 1)``, the value's share of a term's log-space factor: ``log beta =
    H c max(0, -log|v|) + k_l (1 + u) |log|v||`` (its log formed in compute included); 0
    where ``va = 0`` (no term)."""
    lv = va.log()
    kl, u = precision.op_error("log"), precision.compute.u
    bm1 = torch.expm1(hc * (-lv).clamp_min(0.0) + kl * (1 + u) * lv.abs())
    return torch.where(va > 0, va * bm1, 0.0)


class _LogSums:
    """The error a kernel adds by holding partial sums as logs rounded to compute
    (Heinsen's signed log-space sums, a recurrent state kept as logs, an fp32
    ``logaddexp``), on top of the linear model (docs/bounds/attention.md, "Log-space sums").

    A log of magnitude ``|L|`` rounded to compute scales its value by up to ``e^{u |L|}``,
    unbounded as a signed partial sum cancels; in absolute terms ``s (e^{u |log s|} - 1)``
    is bounded for ``s <= W``. Each log-add node of any summation tree (the key sums per
    channel and value column and for the normalizer, then the sums over channels), the
    formation of each term's log and of ``X + log S`` perturb their result by at most
    ``sum_j w_j (K e^{c l_j} - 1)`` over the node's terms (magnitudes ``w_j``),
    ``l_j = max(2, lambda, -log w_j)`` with ``lambda`` the log of a bound ``A`` on every
    partial sum: ``c = 3u + 2k_l + 2u k_l``, ``K = (1 + k_e) e^{0.8 k_l (1 + u)}`` (``u`` of
    compute or accumulate, ``k_l``, ``k_e`` the declared log and exp). Over the ``H`` events
    of a term's path the relative factor is ``K^H e^{H c l_j} - 1``; ``l_j <= L0_ijc +
    Lv_je`` (``L0 = max(2, lambda_i, -Y_jc + max(0, -X_ic))``, ``Lv = max(0, -log|v|)``)
    separates into products over keys. The final ``exp(fl(log N - log D))`` adds
    ``|y| ((1 + k_e) e^{u |log |y||} - 1)``, bounded over ``|y| <= y_hi``.
    """

    def __init__(
        self,
        ex: Exponents,
        keys: LogKeys,
        precision: Precision,
        va: torch.Tensor,
        nvis: Any,
        held: slice,
    ) -> None:
        self.keys, self.va, self.vb = keys, va, keys.vb[:, held]
        self.kl, self.ke, self.uc = (
            precision.op_error("log"),
            precision.op_error("exp"),
            precision.compute.u,
        )
        events = _events(precision, nvis.clamp_min(1), ex.X.shape[-1])
        hc, hk = _event_coefficients(precision, events)
        self.hc, self.hk = hc.reshape(1, -1, 1, 1), hk.reshape(1, -1, 1, 1)
        # the probabilistic level's events (_typical_events)
        ev_t = _typical_events(events, keys.tail)
        # (H c, H log K) [1, r, 1]: sums of any sign and of one sign (the normalizer, a
        # column of one sign), sound and at the level
        self.coef = {
            (signed, level): tuple(
                x.reshape(1, -1, 1)
                for x in _event_coefficients(precision, ev_t if level else events, signed)
            )
            for signed in (True, False)
            for level in (False, True)
        }
        self.vb_t, self.vb_p, self.vb_pt = (x[:, held] for x in (keys.vb_t, keys.vb_p, keys.vb_pt))
        self.one_sign = keys.one_sign.unsqueeze(-2)  # [B, 1, d_v]
        # the exps' asymmetry: a factor's log is at least -(its upper bound) - 2 k_e^2 per
        # exp (-log(1 - k) <= log(1 + k) + 2 k^2), one exp per event at most
        self.asym = upper(2 * events * self.ke * self.ke, 4).reshape(1, -1)
        log_q = torch.logsumexp(ex.X + ex.eX + keys.log_ks.unsqueeze(-2), -1)  # [B, r]
        lam = torch.maximum(log_q + GROWTH, keys.lam.unsqueeze(-1))
        self.l0_floor = lam.clamp_min(2.0)[:, :, None, None]
        self.neg_x = (-ex.X).clamp_min(0.0).unsqueeze(-2)  # [B, r, 1, C]
        # e^{eX + eY} as e^eX e^eY: a product per term instead of an exp
        self.f_x, self.f_y = torch.exp(ex.eX).unsqueeze(-2), torch.exp(ex.eY)
        self.Y = ex.Y
        B, r = lam.shape
        self.a = torch.zeros(B, r, ex.Y.shape[-2], dtype=torch.float64)  # sum_c a_ijc
        self.am1 = torch.zeros_like(self.a)  # sum_c a_ijc (alpha_ijc - 1)
        self.aL = torch.zeros_like(self.a)  # sum_c a_ijc L0_ijc (the level's chords)
        # every (computed) L0 of a row is at most L0_top (over every key of the sequence,
        # so that a row's bound does not depend on the rows of its block): in the rows
        # where hc L0_top spans little, alpha - 1 = expm1(hk + hc L0) takes its chord over
        # [0, hc L0_top] (softmax._chord) and am1 holds sum_c a_ijc L0_ijc until errors()
        top = (self.neg_x - keys.y_min[:, None, None, :]).amax(-1, keepdim=True)
        self.span = self.hc * torch.maximum(top, self.l0_floor)  # [B, r, 1, 1]
        self.top = torch.maximum(top, self.l0_floor)[..., 0]  # [B, r, 1]
        self.chord_rows = (self.span <= CHORD_SPAN)[..., 0]  # [B, r, 1]
        self.n_chord = int(self.chord_rows.sum())
        self.precision = precision
        self._errors: tuple[torch.Tensor, ...] | None = None

    def add(self, sl: slice, mag: torch.Tensor) -> None:
        """Aggregate a key chunk: ``mag [B, r, mc, C]``, upper bounds of the normalized
        magnitudes of the exact terms (0 where invisible)."""
        a = torch.mul(mag, self.f_y[:, sl].unsqueeze(-3)).mul_(self.f_x)
        L0 = torch.maximum(self.neg_x - self.Y[:, sl].unsqueeze(-3), self.l0_floor)
        self.a[..., sl] = a.sum(-1)
        self.aL[..., sl] = chord = torch.einsum("...c,...c->...", a, L0)
        if self.n_chord == self.chord_rows.numel():
            self.am1[..., sl] = chord
        elif self.n_chord == 0:
            self.am1[..., sl] = (a * torch.expm1(self.hk + self.hc * L0)).sum(-1)
        else:
            term = (a * torch.expm1(self.hk + self.hc * L0)).sum(-1)
            self.am1[..., sl] = torch.where(self.chord_rows, chord, term)

    def errors(self) -> tuple[torch.Tensor, ...]:
        """``(dN [B, r, d_v], dD [B, r], fine [B, r], dN_t, dD_t)``: the numerator's and the
        normalizer's absolute errors (normalized), whether every partial sum stays within
        ``e^GROWTH`` of its magnitude bound (else the model does not apply), and the two
        errors on the probabilistic level's event (every term's path within its tail).
        Sums of one sign (the normalizer, a value column of one sign) take their own
        coefficients (:func:`_event_coefficients`)."""
        va = self.va
        if self.n_chord:  # expm1(hk + t) <= E + k t on [0, span], t = hc L0
            E, k = (x.squeeze(-1) for x in _chord(self.hk, self.span))
            chord = torch.mul(self.am1, k * self.hc.squeeze(-1)).add_(self.a * E)
            self.am1 = torch.where(self.chord_rows, chord, self.am1)
            self.n_chord = 0

        def am1_of(signed: bool, level: bool) -> torch.Tensor:
            # the factors by their chords over [0, hc top] (sound for any span), or the
            # worst case's where less (both bound one key's sum_c a (alpha - 1))
            hc, hk = self.coef[(signed, level)]
            E, k = _chord(hk, hc * self.top)
            return torch.minimum(torch.mul(self.aL, k * hc).add_(self.a * E), self.am1)

        # a term's factors (two exps, products, its L0), the sums over the C terms per key
        # (add), then over the keys
        m, C = va.shape[-2], self.f_x.shape[-1]

        def num(am1: torch.Tensor, vb: torch.Tensor) -> torch.Tensor:
            return upper((self.a + am1) @ vb + am1 @ va, 3 * m + C + 16)

        am1_p, am1_t, am1_pt = am1_of(False, False), am1_of(True, True), am1_of(False, True)
        dN = torch.where(self.one_sign, num(am1_p, self.vb_p), num(self.am1, self.vb))
        dN_t = torch.where(self.one_sign, num(am1_pt, self.vb_pt), num(am1_t, self.vb_t))
        dN_t = torch.minimum(dN_t, dN)  # (a bound of the same at most)
        dD = upper(am1_p.sum(-1), m + C + 10)
        dD_t = torch.minimum(upper(am1_pt.sum(-1), m + C + 10), dD)
        big = math.exp(GROWTH) * (1 - 1e-9)
        base = (self.a @ va.amax(-1, keepdim=True).clamp_min(1.0)).squeeze(-1)
        fine = ((self.a @ va + dN).amax(-1) <= big * base) & (self.a.sum(-1) + dD <= big * base)
        return dN, dD, fine & self.keys.ok.unsqueeze(-1), dN_t, dD_t

    def _den(self, den_lo: torch.Tensor, dD: torch.Tensor) -> torch.Tensor:
        """A floor of the normalizer with its log-space errors, ``[B, r, 1]``: the
        normalizer's terms are positive, and each error scales a positive partial sum, so a
        term falls to no less than ``a_j e^{-x_j}`` (``x_j`` its factor's log bound, ``dD >=
        sum_j a_j (e^{x_j} - 1) >= sum_j a_j x_j``): by the concavity of ``1 - e^{-x}``,
        ``sum_j a_j (1 - e^{-x_j}) <= A (1 - e^{-dD / A})``, ``A = sum_j a_j`` (the
        subtraction of ``dD`` itself named normalizers that cannot vanish: every row of
        65,536 tokens at fp32 compute whose ``dD`` passed 1)."""
        A = upper(self.a.sum(-1), self.a.shape[-1] + 2)
        drop = -torch.expm1(-dD / A.clamp_min(1e-300)) * A
        drop = torch.where(A > 0, upper(drop, 8), 0.0) + self.asym * A
        return (den_lo - torch.minimum(drop, dD)).unsqueeze(-1)

    def bound(
        self, sound: torch.Tensor, typical: torch.Tensor, den_lo: torch.Tensor, y_abs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The linear model's bounds before the division (``sound``, ``typical``; they cover
        the exact arithmetic on the kernel's exponents) plus the log-space roundings'
        absolute errors, with the reasons this model gives no bound; ``den_lo [B, r]`` a
        lower bound of the normalizer (relative to the exact one), ``y_abs`` of ``|y|``.
        The probabilistic level takes each path's errors as independent and mean-zero
        (:func:`_typical_events`), on an event of its own (:func:`log_tail`)."""
        if self._errors is None:
            self._errors = self.errors()
        dN, dD, fine, dN_t, dD_t = self._errors

        def extra(lin: torch.Tensor, dn: torch.Tensor, dd: torch.Tensor) -> torch.Tensor:
            den = self._den(den_lo, dd)
            e_q = upper((dn + (y_abs + lin) * dd.unsqueeze(-1)) / den.clamp_min(1e-300), 4)
            e_q = torch.where(den > 0, e_q, math.inf)
            return e_q + self.final(y_abs + lin + e_q) + self.precision.exp_underflow()

        sound_x = upper(sound + extra(sound, dN, dD), 1)
        typical_x = torch.minimum(upper(typical + extra(typical, dN_t, dD_t), 1), sound_x)
        reasons = {
            f"log-space sums in {self.precision.compute.name}": (~fine).unsqueeze(-1),
            "normalizer may vanish (log-space sums)": ~(self._den(den_lo, dD) > 0),
        }
        reasons = {key: val.expand_as(sound) for key, val in reasons.items()}
        return sound_x, typical_x, reasons

    def final(self, y_hi: torch.Tensor) -> torch.Tensor:
        """Bound of ``|y| ((1 + k_e) e^{u' |log |y||} - 1)`` over ``|y| <= y_hi`` (the last
        ``exp(fl(log N - log D))``: the subtraction's rounding and the exp's own argument
        rounding, ``u' = u (1 + exp_arg)``; a review: ``exp_arg`` was not charged here)."""
        lk = math.log1p(self.ke)
        u = self.uc * (1 + self.precision.elementary.exp_arg)

        def f(s: torch.Tensor) -> torch.Tensor:
            return torch.where(s > 0, s * torch.expm1(lk + u * s.log().abs()), 0.0)

        # concave on (0, 1] with its maximum at s0, increasing beyond 1
        s0 = math.exp(min(700.0, math.log((1 + self.ke) * (1 - u)) / u))
        return upper(torch.maximum(f(y_hi), f(y_hi.clamp_max(s0))), 8)


def expprod_block(
    blk: Block, ex: Exponents, precision: Precision, lam: float
) -> tuple[dict[str, torch.Tensor], Normalized]:
    """Sound and probabilistic rounding bounds ``[B, r, d_v]`` of one row block (its values
    ``blk.v``), and the masks of the intermediates that may overflow; with the normalized
    exact weights.

    The key shift is a running maximum of the keys a row sees (rescaling as the declared
    block allows); where the declaration allows any schedule (``block=None``) it may also
    be one shift by the largest exponent of every key of the sequence, future ones included
    (``ex.y_max``; no rescaling: published causal FAVOR+ code shifts so), and the bound is
    the larger of the two models. Not modelled: a running maximum that includes keys the
    row does not see *and* rescales."""
    Mk = _key_max(blk, ex.Y, ex.per_channel)  # [B, r, C or 1]
    weights = _weights(blk, ex, blk.v)  # the exact weights: the same for both models
    models = [(Mk, True)]
    if ex.y_max is not None and precision.block is None and bool((ex.y_max > Mk).any()):
        models.append((torch.maximum(Mk, ex.y_max), False))
    outs = _expprod(blk, ex, precision, lam, models, weights)
    return functools.reduce(larger, outs), weights[1]


def _weights(
    blk: Block, ex: Exponents, v: torch.Tensor
) -> tuple[torch.Tensor, Normalized, torch.Tensor]:
    """The exact log-weights ``logw [B, r, m]`` (float64), their normalization (with the
    certified radii) and each row's largest visible exponent ``[B, r]``."""
    X, Y = ex.X, ex.Y
    B, r, C = X.shape
    m = Y.shape[-2]
    step = max(1, CHUNK // max(B * r * C, 1))
    logw = torch.empty(B, r, m, dtype=torch.float64)
    sigw = torch.empty_like(logw)
    top = torch.full((B, r), -math.inf, dtype=torch.float64)
    for s0 in range(0, m, step):
        sl = slice(s0, s0 + step)
        x = X.unsqueeze(-2) + Y[:, sl].unsqueeze(-3)
        xv = x.masked_fill(~blk.keymask(sl).unsqueeze(-1), -math.inf)
        top = torch.maximum(top, xv.amax((-1, -2)))
        logw[..., sl] = torch.logsumexp(x, -1)
        err = (ex.x_err.unsqueeze(-2) + ex.y_err[:, sl].unsqueeze(-3)).amax(-1)
        sigw[..., sl] = lse_bound(x, U64, min_normal=2.0**-1022) + 2 * U64 * x.abs().amax(-1) + err
    return logw, normalize(logw, upper(sigw, 4), v, blk), top


def _w_lo(lam: torch.Tensor, n_ex: torch.Tensor, l1m: float) -> torch.Tensor:
    """A lower bound of a row's largest term in the kernel's units, ``e^{-lam} (1 -
    k_e)^{n_ex}`` (``lam [B, r]``: its exponent's reach, ``n_ex [r]``: its exps, the row's
    rescalings included; ``l1m = log(1 - k_e)``, ``-inf`` when an exp may return 0)."""
    if l1m == -math.inf:
        return torch.zeros_like(lam)
    return exp_down(-lam + n_ex * l1m)


def _fold_reach(
    X: torch.Tensor,
    eX: torch.Tensor,
    Mk: torch.Tensor,
    Mi: torch.Tensor,
    q_lift: Any,
    ex: Exponents,
    precision: Precision,
) -> torch.Tensor:
    """``[B, r]``: how far a term's exps' arguments may exceed 0 in all, and the largest
    term's lie below it, where the kernel folds its shifts into FMAs
    (:func:`.quotient.folded_shift` of each folded constant: the query side's ``X C``, ``m_c
    C`` and ``M C``, the key side's ``m_c C``, and FAVOR+'s key's own ``a_j C``, each at
    most the row's largest modulus), with the exponents' own errors (a kernel may form
    ``X C`` from ``q``; a review: a folded log-attention kernel's key exp of ``e^0.35``, a
    product inf under a finite bound). ``X``, ``eX``, ``q_lift``: the row block's query
    exponents, their errors and lift (:class:`Exponents`)."""
    fs = lambda z: folded_shift(z, precision)  # noqa: E731
    lift = q_lift.abs().squeeze(-1) if isinstance(q_lift, torch.Tensor) else abs(q_lift)
    x_top = X.abs().amax(-1) + lift
    m_top = Mk.abs().amax(-1).expand(x_top.shape)
    reach = 2 * fs(x_top) + 4 * fs(m_top) + 3 * fs(Mi.abs().squeeze(-1) + lift)
    if not ex.per_channel:
        reach = reach + 2 * fs(ex.Y.abs().amax((-1, -2)).reshape(-1, 1))
    err = eX.amax(-1) + (ex.eY + ex.y_err).amax((-1, -2)).reshape(-1, 1)
    return upper(reach + err, 4)


def _chords(
    st: dict[str, Any], s0: torch.Tensor, t0: Any, K: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The factors of one shift model from its exps' chords (:func:`_expprod`, where every
    row's ``Lambda`` spans little): ``(a [B, r, m], c [B, r, 1], the normalizer's lower
    bound [B, r])`` from ``s0 = p_up sum_c share_up``, ``t0 = p_lo sum_c share_lo`` and the
    model's ``s1``, ``t1``, the same sums weighted by ``Lambda``.

    On ``[0, T]`` (``T`` the row's largest ``Lambda``): ``H - 1 = expm1(g3 (Lambda + n_ex
    l1k)) <= E + k g3 Lambda`` (the chord, :func:`.softmax._chord`); ``1 - L = 1 - e^z e^{-g3
    Lambda} <= (1 - e^z) + g3 Lambda`` and ``L >= e^z (1 - g3 Lambda)`` (``e^-t >= 1 - t``),
    ``z = g3 n_ex l1m``; so ``A <= alpha + beta Lambda`` and ``C``, ``L`` likewise."""
    K_hi, K_lo, Khi_m1, Klo_d, c_fac, Kd = (x[..., 0] for x in K)  # [r, 1]
    agg, n_ex = st["agg"], st["n_ex"][..., 0]
    m, C = s0.shape[-1], st["Eq"].shape[-1]
    g3 = 1 + gamma(3, U64)
    span = upper(g3 * st["lam_max"].unsqueeze(-1), 2)  # [B, r, 1]
    E, k = _chord(g3 * n_ex * math.log1p(st["k_e"]), span)
    z = g3 * n_ex * st["l1m"]
    l0 = upper(-torch.expm1(z), 2)
    alpha = upper(torch.maximum(Khi_m1 + K_hi * E, Klo_d + K_lo * l0), 4)
    beta = upper(torch.maximum(K_hi * k, K_lo) * g3, 4)
    a = upper(alpha * s0 + beta * agg["s1"], C + 8)
    s0_row, s1_row = s0.sum(-1, keepdim=True), agg["s1"].sum(-1, keepdim=True)
    c = upper(c_fac * ((1 + E) * s0_row + k * g3 * s1_row), m + C + 12)
    pos = t0.sum(-1) * (1 - gamma(m + C + 8, U64))
    neg = upper(g3 * agg["t1"].sum(-1), m + C + 8)
    ld = (Kd * torch.exp(z)).squeeze(-1) * (1 - 8 * U64) * (pos - neg)
    return a, c, ld


def _expprod(
    blk: Block,
    ex: Exponents,
    precision: Precision,
    lam: float,
    models: list[tuple[torch.Tensor, bool]],
    weights: tuple[torch.Tensor, Normalized, torch.Tensor],
) -> list[dict[str, torch.Tensor]]:
    """:func:`expprod_block` for each key shift model ``(Mk [B, r, C or 1],
    visible_shift)`` of ``models`` (``visible_shift``: the shift is the largest exponent a
    row sees, so a visible term is exactly 1); ``weights`` from :func:`_weights`. One pass
    over the keys: what does not depend on the shift (the terms' shares, the value sums of
    the variance model) is evaluated once for every model."""
    fc, fa = precision.compute, precision.accumulate
    el = precision.elementary
    uc, ua = fc.u, fa.u
    up = precision.product_u()
    ld = Loaded(precision)
    v = blk.v
    va, v_err = blk.per_key("loaded |v|", ld.abs), blk.per_key("v's load error", ld.err)
    X, Y = ex.X, ex.Y
    B, r, C = X.shape
    m = Y.shape[-2]
    nvis = blk.visible
    R_run, dep_k = schedule(precision, nvis, blk.span)
    dep = (dep_k + C + 2)[:, None, None]  # keys, then channels, in any order; [r, 1, 1]
    a = el.exp_arg
    k_e = precision.op_error("exp")
    step = max(1, CHUNK // max(B * r * C, 1))
    logw, nz, top = weights
    p_up, p_lo = blk.masked(nz.p_up, 0.0), blk.masked(nz.p_lo, 0.0)
    p_msk = blk.masked(nz.p, 0.0)
    lg_hi, lg_lo = dep * math.log1p(ua), dep * math.log1p(-ua)  # logs of the sums' paths
    s_hi = torch.exp(lg_hi)
    # logs of the numerator's path factors (1 + up)^(2 + x) s_hi and (1 - up)^(2 + x) s_lo,
    # and of the normalizer's (1 - up)^(1 + x) s_lo: from logs, without cancellation
    nx = ex.extra
    lK_hi, lK_lo = (2 + nx) * math.log1p(up) + lg_hi, (2 + nx) * math.log1p(-up) + lg_lo
    lKd = (1 + nx) * math.log1p(-up) + lg_lo
    c_fac = excess(lK_hi - lKd)  # (1 + up)^(2 + x) s_hi / ((1 - up)^(1 + x) s_lo) - 1
    K_hi, K_lo = torch.exp(lK_hi), torch.exp(lK_lo)
    Kd = torch.exp(lKd)  # the normalizer's path factor
    Khi_m1, Klo_d = excess(lK_hi), deficit(lK_lo)
    g3 = 1 + gamma(3, U64)  # an exp's argument, padded for its own roundings
    l1k = math.log1p(k_e)
    l1m = math.log1p(-k_e) if k_e < 1 else -math.inf
    C_lin = (3 + 2 * nx) * up + 2 * dep * ua
    # exps below T_e (off by up to U_e absolute): found per term where that can matter
    # (fp16 compute), with a margin of 1 for this evaluation; else charged to every exp
    flush = precision.exp_flush_matters()
    thr_low = -precision.exp_exact_log() - 1
    # a term's exps see its shifts as the kernel computes them (which cancel in the term,
    # not in each exp): the query shift's error (<= the row's largest query-side error) and
    # the key shift's (<= the largest key exponent error), on top of the term's own
    kse = ex.key_shift_err
    if kse is None:
        kse = (ex.eY + ex.y_err).amax((-1, -2))
    key_shift_err = kse.reshape(-1, 1, 1, 1)  # [B, 1, 1, 1]
    q_lift = 0.0 if ex.q_lift is None else ex.q_lift  # [B, r, 1]
    states: list[dict[str, Any]] = []
    for Mk, visible_shift in models:
        # a shift by the sequence's maximum is final: no rescaling
        R = R_run if visible_shift else torch.zeros_like(R_run)
        XM = X + Mk
        Mi = XM.amax(-1, keepdim=True)
        Dq = (Mi - XM) if ex.per_channel else (X.amax(-1, keepdim=True) + q_lift - X)
        # query-side exponent error [B, r, C] (shared by every key), the folded log2(e)'s
        # roundings of X C and m_c C included
        Eq = ex.eX + uc * (2 * X.abs() + XM.abs() + Mk.abs() + (2 + 2 * a) * Dq)
        Eq = Eq + 4 * U64 * (XM.abs() + Mi.abs())
        shift_err = (
            upper(Eq.amax(-1) + ex.x_err.amax(-1), 2).reshape(B, r, 1, 1) + 2 * key_shift_err
        )
        # where the sequence's Lambda spans little (ex.chords: chord_reach), the exps of the
        # factors are replaced by their chords over [0, max Lambda] and the per-key sums
        # need only sum_c share Lambda (softmax._chord)
        chord = ex.chords and m > 0
        names = ("s1", "t1") if chord else ("a", "c", "ld")
        states.append({
            "Mk": Mk, "visible": visible_shift, "R": R, "n_ex": 2 + nx + R[:, None, None],
            "XM": XM, "Mi": Mi, "Dq": Dq, "Eq": Eq, "shift_err": shift_err, "chord": chord,
            "k_e": k_e, "l1m": l1m,
            "agg": {key: torch.zeros(B, r, m, dtype=torch.float64)
                    for key in ("la", "lc", "var", "low", "lowv", *names)},
            "lam_max": torch.zeros(B, r, dtype=torch.float64),
        })  # fmt: skip
    # sum_c of the shares (upper, lower) times p (upper, lower), for the chords
    sh_up = torch.zeros(B, r, m, dtype=torch.float64)
    sh_lo = torch.zeros_like(sh_up) if any(st["chord"] for st in states) else None
    G = torch.zeros(B, r, C, v.shape[-1], dtype=torch.float64)  # sum_j p share (v_j - y)
    gs = torch.zeros(B, r, C, dtype=torch.float64)
    # for the two summation models (keys then channels, or channels then keys)
    qn_c = torch.zeros_like(G)  # sum_j (p share v)^2 per channel
    qd_c = torch.zeros_like(gs)  # sum_j (p share)^2 per channel
    inner = torch.zeros(B, r, v.shape[-1], dtype=torch.float64)  # per-key channel sums
    o_first = (C * (C + 1) * (2 * C + 1) / 6 - 1) / C**2 if C >= 2 else 0.0  # order_sq's
    o_second = C * (C + 1) / 6 - 1 if C >= 2 else 0.0
    # log-space: no rescaling, any tree of log-adds over a row's keys (depth nvis - 1)
    ls = None if ex.log_sums is None else _LogSums(ex, ex.log_sums, precision, va, nvis, blk.held)
    vis_f = blk.keymask(slice(None)).double()
    # the terms a channel's sum over the keys may absorb: e^{Y_jc} at most 2 u_a of the
    # sum over the keys the row sees (docs/bounds/attention.md, "Absorbed terms"); per
    # key, their normalized weight
    absorb = torch.zeros(B, r, m, dtype=torch.float64)
    if m > 0:
        y_top = Y.amax(-2, keepdim=True)
        z = vis_f @ torch.exp(Y - y_top)  # [B, r, C]
        lz = torch.log(z) + y_top + math.log(2 * ua)
        # a row whose visible keys sit far below the block's top (a later key, causal):
        # its sums underflow at that shift, so a masked logsumexp over the key chunks
        far = (z < 1e-280) & (vis_f.sum(-1, keepdim=True) > 0)
        if bool(far.any()):
            lse = torch.full_like(lz, -math.inf)
            for s0 in range(0, m, step):
                sl = slice(s0, s0 + step)
                Yv = torch.where(blk.keymask(sl).unsqueeze(-1), Y[:, sl].unsqueeze(-3), -math.inf)
                lse = torch.logaddexp(lse, torch.logsumexp(Yv, -2))
            lz = torch.where(far, lse + math.log(2 * ua), lz)
    # pass 2: per-key aggregates of the per-term factors
    for s0 in range(0, m, step):
        sl = slice(s0, s0 + step)
        Ys = Y[:, sl].unsqueeze(-3)  # [B, 1, mc, C]
        x = X.unsqueeze(-2) + Ys
        vis4 = blk.keymask(sl).unsqueeze(-1)
        # share of term c in w_ij, with its float64 evaluation error
        share = torch.where(vis4, torch.exp(x - logw[..., sl].unsqueeze(-1)), 0.0)
        sh_rel = 4 * U64 * (x.abs() + logw[..., sl].abs().unsqueeze(-1)) + 4 * U64
        up_sh = share * (1 + sh_rel)
        lo_sh = share * (1 - sh_rel).clamp_min(0.0)
        pu, pl = p_up[..., sl], p_lo[..., sl]
        if ls is not None:
            ls.add(sl, pu.unsqueeze(-1) * up_sh)
        p_sl = p_msk[..., sl]
        ps = p_sl.unsqueeze(-1) * share  # [B, r, mc, C]
        absorb[..., sl] = torch.where(Ys <= lz.unsqueeze(-2), ps, 0.0).sum(-1)
        G += torch.einsum("brjc,bjv->brcv", ps, v[:, sl])
        gs += ps.sum(-2)
        v2 = v[:, sl] ** 2
        qn_c += torch.einsum("brjc,bjv->brcv", ps * ps, v2)
        qd_c += (ps * ps).sum(-2)
        # order_sq(p_j v_j, (p_j v_j)^2 sum_c share^2, C) summed over the keys: (p_j v_j)^2
        # times a factor per (row, key), so a product with v^2 (no [r, keys, d_v] temporary)
        sh2 = (share * share).sum(-1)
        spread = (sh2 / C - 1 / C**2).clamp_min_(0.0).mul_(o_second).add_(o_first)
        inner += (p_sl * p_sl * spread) @ v2
        share2 = share * share
        # what both shift models share: the key side of Lambda (eY + (u_c + 4 u64)(|Y| +
        # |x|) + 2 u_c |Y|, the folded log2(e)'s Y C and m_b C), the key side of the
        # variance, the first-order sums' share
        sa = x.abs().add_(Ys.abs())
        base = torch.mul(sa, uc + 4 * U64).add_(ex.eY[:, sl].unsqueeze(-3))
        base.add_(Ys.abs(), alpha=2 * uc)
        var0 = torch.mul(x, x).add_(Ys * Ys).mul_(uc * uc).add_((1 + nx) * k_e**2)
        sh_up[..., sl] = agg_lc = pu * up_sh.sum(-1)
        if sh_lo is not None:
            sh_lo[..., sl] = pl * lo_sh.sum(-1)
        dot = lambda w, t: torch.einsum("...c,...c->...", w, t)  # noqa: E731
        for st in states:
            Dk = (st["Mk"].unsqueeze(-2) - Ys).clamp_min_(0.0)
            # Lambda = Eq + eY + u_c (3 |Y| + |x| + (3 + 2a) Dk) + 4 u64 (|Y| + |x|):
            # nonnegative terms, each through at most 7 roundings
            Lam = torch.add(base, st["Eq"].unsqueeze(-2)).add_(Dk, alpha=uc * (3 + 2 * a))
            Lam = torch.where(vis4, Lam.mul_(1 + gamma(8, U64)), 0.0)
            n_ex = st["n_ex"]
            agg = st["agg"]
            pS1 = pu * dot(up_sh, Lam)  # the first-order sum, and the chords' weight
            agg["la"][..., sl] = agg_lc * (n_ex * k_e + (2 + nx) * up + dep * ua)[..., 0] + pS1
            agg["lc"][..., sl] = agg_lc * C_lin[..., 0]
            if st["chord"]:
                agg["s1"][..., sl] = pS1
                agg["t1"][..., sl] = pl * dot(lo_sh, Lam)
            else:
                # H - 1 and L - 1 by expm1 (arguments padded outward), so that A = max(H
                # K_hi - 1, 1 - L K_lo) = max((H - 1) K_hi + (K_hi - 1), (1 - K_lo) + (1 - L)
                # K_lo) is a sum of nonnegative terms (no cancellation; relative roundings
                # in agg's upper)
                Hm1 = torch.add(Lam, n_ex * l1k).mul_(g3).expm1_()
                Lm1 = torch.sub(n_ex * l1m, Lam).mul_(g3).expm1_()  # <= 0
                A = torch.maximum(
                    torch.addcmul(Khi_m1, Hm1, K_hi), torch.addcmul(Klo_d, Lm1, K_lo, value=-1.0)
                )
                agg["a"][..., sl] = pu * dot(up_sh, A)
                # H ((1 + up)^2 s_hi - (1 - up) s_lo) <= H c_fac ((1 - up) s_lo <= 1)
                agg["c"][..., sl] = pu * dot(up_sh, torch.addcmul(c_fac, Hm1, c_fac))
                agg["ld"][..., sl] = pl * dot(lo_sh, torch.addcmul(Kd, Lm1, Kd))  # L(1-up)s_lo
            # probabilistic: independent key-side errors, per term
            VarK = torch.addcmul(var0, Dk, Dk, value=uc * uc * (2 + 2 * a * a))
            VarK.add_((uc * st["Dq"].unsqueeze(-2)) ** 2)
            agg["var"][..., sl] = p_sl**2 * dot(share2, VarK)
            st["lam_max"] = torch.maximum(st["lam_max"], Lam.amax((-1, -2)))
            if flush:  # the term's exps may fall below T_e: -(Dq + Dk) - Lam < log T_e
                low = Lam.add_(Dk).add_(st["Dq"].unsqueeze(-2)).add_(st["shift_err"])
                low = low.gt_(thr_low).logical_and_(vis4)
                agg["low"][..., sl] = low.sum(-1, dtype=torch.float64)
                agg["lowv"][..., sl] = pu * dot(up_sh, low.to(torch.float64))
    G = G - gs.unsqueeze(-1) * nz.y.unsqueeze(-2)
    p2, q_n = nz.p2, nz.q_n
    sn_c = G + gs.unsqueeze(-1) * nz.y.unsqueeze(-2)
    one = torch.ones_like(nz.y[..., :1])
    y_abs = nz.y.abs() + nz.eps_y
    vis_va = vis_f @ va
    eta = max(fc.underflow, fa.underflow)  # a product or sum that underflows (or flushes)
    d_v = v.shape[-1]

    def full(row: torch.Tensor) -> torch.Tensor:
        return row.unsqueeze(-1).expand(*row.shape, d_v)

    seq_n, seq_d = blk.in_sequence(nz.p, v)
    outs = []
    for st in states:
        R, XM, Dq, Eq, agg = st["R"], st["XM"], st["Dq"], st["Eq"], st["agg"]
        visible_shift = st["visible"]
        VarQ = (uc * X) ** 2 + (uc * XM) ** 2 + (uc * Dq) ** 2 * (2 + 2 * a * a) + k_e**2
        VarQ = VarQ + ex.eX**2 / 3  # the exponents' own errors, taken as one rounding each
        var_shared = (G**2 * VarQ.unsqueeze(-1)).sum(-2)
        # a per-channel rescaling's error scales a partial sum of the deviations before it
        nn = nvis[:, None].clamp_min(2)
        var_dev = R[:, None] * k_e**2 * nn / (4 * (nn - 1))
        # sums of the numerator and the normalizer: keys then channels (the factorized
        # kernels), or channels then keys (the direct form); the larger of the two models
        nk = (nvis + R)[:, None, None]
        kc_n = order_sq(sn_c, qn_c, nk).sum(-2) + order_sq(nz.y, (sn_c**2).sum(-2), C)
        kc_d = order_sq(gs, qd_c, nk[..., 0]).sum(-1, keepdim=True) + order_sq(
            one, (gs**2).sum(-1, keepdim=True), C
        )
        nk2 = (nvis + R)[:, None]
        # (the keys in random order, or in sequence order where larger: .rounding.sequence_sq)
        ck_n = inner + torch.maximum(order_sq(nz.y, q_n, nk2), seq_n)
        ck_d = torch.maximum(order_sq(one, p2.sum(-1, keepdim=True), nk2), seq_d)
        ck_d = ck_d + C * p2.sum(-1, keepdim=True) / 3
        var_sum = ua * ua * (torch.maximum(kc_n, ck_n) + nz.y**2 * torch.maximum(kc_d, ck_d))
        var_row = var_shared + q_n * (ld.ul**2 + (2 + nx) * up * up) + var_sum
        # underflow relative to the kernel's normalizer (>= its largest term, itself >=
        # w_lo); the kernel's shift exceeds the largest visible exponent by `spread`
        shift = (
            st["Mi"].squeeze(-1)
            if ex.per_channel
            else (X.amax(-1, keepdim=True) + st["Mk"] + q_lift).squeeze(-1)
        )
        spread = (shift - top).clamp_min(0.0)
        # (in the kernel's units: its shifts may sit above the exact ones by shift_err)
        # (the row's own 2 + x + R exps, each at least 1 - k_e: not the block's largest R)
        w_arg = st["lam_max"] + spread + st["shift_err"].reshape(B, r)
        w_lo = _w_lo(w_arg, 2 + nx + R, l1m)
        # the largest term's floor: the model's reach, or its folded shifts' roundings
        a_fold = _fold_reach(X, ex.eX, st["Mk"], st["Mi"], q_lift, ex, precision)
        w_top = largest_weight(torch.minimum(w_arg, a_fold), 2 + nx + R, precision)
        # each exp below T_e is off by up to U_e, times the term's other factors (<= e^Lam
        # (1 + k_e)): the 2 + x exps of a term that may fall there, and the rescalings (R per
        # key and channel) where a visible term's may (a rescaling's argument is at least
        # minus a visible term's key distance); a product that underflows, eta: 2 + x per
        # term of the numerator, the x key shifts' and the rescalings' of the normalizer
        # (an exp's error is carried by the term's other exps and its rescalings)
        l_ex = (2 + nx + R) * l1k  # [r]
        U_row = precision.exp_underflow() * torch.exp(st["lam_max"] + l_ex)  # [B, r]
        if flush:
            low_den, low_num = (2 + nx) * agg["low"].sum(-1), (2 + nx) * agg["low"] @ va
            resc = R * C * (low_den > 0)  # [B, r]
        else:
            low_den, low_num = (2 + nx) * C * nvis, (2 + nx) * C * vis_va
            resc = (R * C).expand(U_row.shape)
        fixed_den = (nx * nvis + R) * C * eta
        fixed_num = ((nvis * (2 + nx) + R) * C * eta)[:, None]
        raw_den = upper(U_row * (low_den + nvis * resc) + fixed_den, 6)
        raw_num = upper(U_row[..., None] * (low_num + resc[..., None] * vis_va) + fixed_num, m + 6)
        if flush:
            # per key: what its terms that may fall below T_e weigh (within H K_hi of
            # their exact share), and a spacing per exp: its terms' 2 + x and their
            # channels' R rescalings (quotient.flushed's second part alone: the lesser of
            # the two per key would sum the channels' terms first, and the state
            # evaluation, which sums the keys first, could not stay above it)
            n_ex = st["n_ex"][..., 0] * agg["low"]
            hk = torch.exp(upper(g3 * (st["lam_max"] + st["n_ex"][..., 0, 0] * l1k), 4))
            u_sub = upper(fc.underflow * torch.exp(st["lam_max"] + l_ex) / w_lo, 2)
            value = upper(agg["lowv"] * (hk.unsqueeze(-1) * K_hi[..., 0]), 2)
            b_low = upper(value + u_sub.unsqueeze(-1) * n_ex, 2)
            b_den = upper(b_low.sum(-1) + fixed_den / w_lo, m + 6)
            b_num = upper(b_low @ va + fixed_num / w_lo[..., None], m + 6)
        else:
            b_den, b_num = raw_den / w_lo, raw_num / w_lo[..., None]
        # the per-key factors' dots over the C terms: C roundings on each path, a few more
        # for the factors
        if st["chord"]:
            K = (K_hi, K_lo, Khi_m1, Klo_d, c_fac, Kd)
            a_key, c_row, ld_row = _chords(st, sh_up, sh_lo, K)
        else:
            a_key = upper(agg["a"], C + 12)
            c_row = upper(agg["c"], C + 12).sum(-1, keepdim=True)
            ld_row = agg["ld"].sum(-1) * (1 - gamma(m + C + 8, U64))
        t = Terms(
            a=a_key,
            lin_a=agg["la"],
            c=c_row,
            lin_c=agg["lc"].sum(-1, keepdim=True),
            mag=p_up,
            den_lo=ld_row - b_den,
            b_num=b_num,
            b_den=b_den,
            var_key=agg["var"],
            var_row=var_row,
            var_dev=var_dev,
        )
        hl = None
        if ex.per_channel and visible_shift:
            # the largest term: exp(0) exp(0) = 1, or w_top where shifts are folded
            kappa = excess(lK_hi - lg_lo).reshape(-1, 1)  # (1 + up)^2 s_hi / s_lo - 1
            vr = blk.vrange(v - v_err, v + v_err, "loaded values")
            hl = hull(vr, va, kappa, raw_num, raw_den, w_top)
        sound, typical = quotient(nz, t, v_err, lam, hl, absorb=absorb)
        log_reasons: dict[str, torch.Tensor] = {}
        if ls is not None:
            sound, typical, log_reasons = ls.bound(sound, typical, t.den_lo, y_abs)
        # every partial sum is at most (visible keys x channels) terms, each at most
        # 1 + k_e per exp times e^a_fold (the exponents are <= 0 in the kernel's units but
        # for folded shifts' roundings), times |v|
        term = torch.exp((2 + nx + R) * l1k + a_fold) * s_hi.reshape(-1)
        state = nvis * C * term
        vmax = (vis_f @ va.amax(-1, keepdim=True).clamp_min(1.0)).squeeze(-1) / nvis.clamp_min(1)
        v_top = (vis_f * va.amax(-1).unsqueeze(-2)).amax(-1).clamp_min(1.0)
        operands = None
        if precision.sums != "log":
            # the normalizer the division takes, in the kernel's units: the exact one is
            # at most C times nz.norm there (its shift >= the largest term exponent, the
            # log-weights' largest at most log C above it), each term within its reach;
            # at least w_lo, its largest term's floor (no sum of nonnegative terms rounds
            # below its largest)
            d_top = state
            if nz.norm is not None:
                reach = 2 * st["lam_max"] + st["shift_err"].reshape(B, r)
                d_top = upper(nz.norm.squeeze(-1) * C * torch.exp(reach), 4) * term
                d_top = torch.minimum(d_top, state)
            # (at least the largest term, where the shift is the row's visible maximum)
            d_lo = torch.maximum(w_lo, w_top) if ex.per_channel and visible_shift else w_lo
            operands = ((d_top * v_top).unsqueeze(-1), d_top.unsqueeze(-1), d_lo.unsqueeze(-1))
        sound, typical, last = finish(sound, typical, y_abs, precision, operands=operands)
        reasons = {
            f"load into {fc.name}": ld.rows_over(blk.q, ex.key_over).expand_as(sound),
            f"exponents in {fc.name}": full(
                ((XM.abs() + Eq).amax(-1) >= fc.overflow())
                | _past_exp(ex, st["Mk"], uc, fc.overflow())
            ),
            f"sums in {fa.name}": full(state * vmax >= fa.overflow()),
            **_products_over(precision, state * vmax, C, term, v_top, full),
            # (the hull's: where its largest term may flush)
            "normalizer may vanish": full(
                ~(t.den_lo > 0) & ((not (ex.per_channel and visible_shift)) | (w_top == 0))
            ),
            **log_reasons,
            **last,
        }
        outs.append(unbounded(sound, typical, reasons))
    return outs


#: Elements (keys x channels x levels) the causal :func:`_flush_sums` may hold; past it
#: its finest blocks grow (a row then counts up to a block of its later keys).
FLUSH_ENTRIES = 2**23
#: One level of :func:`_flush_sums`: sorted ``Z`` (offset per block), its two prefix sums,
#: the block's size, the lowest ``L`` and the span between blocks.
_Level = tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, float, float]


def _flush_sums(
    Z: torch.Tensor, lw: torch.Tensor, vm: torch.Tensor, causal: bool
) -> tuple[list[_Level], torch.Tensor, int]:
    """Per channel, the keys sorted by ``Z [B, n, C]`` (``Y - beta``: a term ``(i, j, c)``
    may fall below ``T_e`` only where ``Z_jc < L_ic``, :func:`expprod_state`) with the
    prefix sums in that order of their weights ``e^{lw - top_c}`` and ``e^{lw - top_c}
    vm_j`` (``vm [B, n, 1]``: the key's largest ``|v|``), for :func:`_flush_sums_at`:
    ``(levels, top [B, 1, C], finest)``. Not causal: one level, every key (``finest``
    -1). Causal: the
    keys padded to ``N = 2^k`` and, per level ``l >= finest``, sorted within aligned blocks
    of ``2^l`` keys (a row's keys ``j <= i`` are at most ``k`` such blocks, and up to ``2^
    finest - 1`` later keys: more terms, a larger charge); each level's ``Z`` is offset by
    its block's index times a span past every ``Z`` and ``L``, so that one search finds a
    row's place in its block."""
    B, n, C = Z.shape
    top = lw.amax(1, keepdim=True) if n else lw.new_zeros(B, 1, C)
    top = torch.where(torch.isfinite(top), top, 0.0)
    w0 = torch.exp(lw - top).transpose(1, 2)  # [B, C, n]
    w1 = w0 * vm.transpose(1, 2)
    Zt = Z.transpose(1, 2)
    if not causal or n <= 1:
        Zs, order = Zt.sort(-1)
        c0, c1 = (w.gather(-1, order).cumsum(-1) for w in (w0, w1))
        return [(Zs.contiguous(), c0, c1, 0, 0.0, 0.0)], top, -1
    k = (n - 1).bit_length()
    N = 2**k
    lo = float(Zt.amin()) if Zt.numel() else 0.0
    hi = float(Zt.amax()) if Zt.numel() else 0.0
    span = hi - lo + 4.0
    pad = (0, N - n)
    Zp = torch.nn.functional.pad(Zt, pad, value=hi + 2.0)  # (padding: no weight)
    w0p, w1p = (torch.nn.functional.pad(w, pad) for w in (w0, w1))
    levels: list[_Level] = []
    finest = min(k, max(0, k + 1 - FLUSH_ENTRIES // max(B * C * N, 1)))
    for lvl in range(finest, k + 1):
        b = 2**lvl
        Zs, order = Zp.reshape(B, C, N // b, b).sort(-1)
        c0, c1 = (w.reshape(B, C, N // b, b).gather(-1, order).cumsum(-1) for w in (w0p, w1p))
        off = torch.arange(N // b, dtype=Z.dtype).reshape(1, 1, -1, 1) * span
        Zg = (Zs + off).reshape(B, C, N).contiguous()
        levels.append((Zg, c0.reshape(B, C, N), c1.reshape(B, C, N), b, lo - 1.0, span))
    return levels, top, finest


def _flush_sums_at(
    sums: tuple[list[_Level], torch.Tensor, int],
    L: torch.Tensor,
    rows: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_flush_sums`' two sums over the keys with ``Z < L`` (``L [B, r, C]`` of the
    rows ``rows``; causal: over the row's keys and up to ``2^finest - 1`` later ones), each
    ``[B, r, C]`` and upper (``n`` roundings of a prefix sum, ``2^-1074`` per key whose
    weight underflowed), and ``top``."""
    levels, top, finest = sums
    Lt = L.transpose(1, 2)  # [B, C, r]
    S0 = torch.zeros_like(Lt)
    S1 = torch.zeros_like(Lt)
    n = levels[-1][0].shape[-1]
    if finest < 0:  # every key: one search
        Zs, c0, c1 = levels[0][:3]
        idx = torch.searchsorted(Zs, Lt.contiguous())
        at = (idx - 1).clamp_min(0)
        for S, c in ((S0, c0), (S1, c1)):
            S += torch.where(idx > 0, c.gather(-1, at), 0.0)
    else:
        f = 2**finest
        P = ((rows.to(torch.int64) + f) // f) * f  # keys 0 .. P - 1: the row's, rounded up
        for Zg, c0, c1, b, lo, span in levels:
            lvl = b.bit_length() - 1
            on = ((P >> lvl) & 1).bool()  # the row takes this level's block ...
            blk = (P >> lvl) - 1  # ... this one
            base = (blk * b).clamp_min(0)
            # (L within the keys' range: the offset keeps the blocks apart)
            q = Lt.clamp(lo, lo + span - 2.0) + (blk.clamp_min(0) * span).to(Lt)
            g = torch.searchsorted(Zg, q.contiguous())  # [B, C, r]
            cnt = (g - base).clamp(0, b)
            at = (base + cnt - 1).clamp_min(0)
            use = on & (cnt > 0)
            for S, c in ((S0, c0), (S1, c1)):
                S += torch.where(use, c.gather(-1, at.expand_as(Lt)), 0.0)
    k = (n - 1).bit_length() + 1
    S0, S1 = (upper(x, n + 2 * k).transpose(1, 2) + n * 2.0**-1074 for x in (S0, S1))
    return S0, S1, top


#: Channels per group of :func:`_absorbed_share` (its temporaries are ``[B, group, n]``).
SHARE_CHANNELS = 16
#: Elements of :func:`_windowed_logs`'s temporaries (``[B, group, rows, keys]``), about.
SHARE_ELEMENTS = 2**22


def _absorbed_logs(
    X: torch.Tensor,
    Y: torch.Tensor,
    causal: bool | Visible,
    rows: torch.Tensor | None,
    u: float,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For a group of channels (``X [B, r, c]`` of the rows, ``Y [B, n, c]`` of every
    key, both logs of magnitudes), per row ``log sum_c e^{X_c + lb_c}`` and ``log sum_c
    e^{X_c + lz_c}`` ``[B, r]``: ``lz_c`` the log of the channel's sum ``Z_c(i)`` over the
    keys the row sees (``causal``, or a :class:`Visible`: keys a key mask hides are in no
    sum), ``lb_c`` that of its terms ``e^{Y_jc}`` at most ``2 u`` of it (the terms a sum
    over the keys may absorb). ``Z_c(i)`` only grows along a causal sequence, so a key,
    once absorbable, stays so: each key enters at the first row whose sum reaches ``e^{Y_jc}
    / 2u``, and a row's absorbable sum is a prefix of the keys in that order; under a
    sliding window keys also leave it (:func:`_windowed_logs`). The threshold is raised by ``1e-8``
    (relative). ``keep [B, c]``: the channels whose absorbed terms count (the others in the
    second sum only), or ``[B, r, c]`` per row."""
    vis = causal if isinstance(causal, Visible) else Visible(bool(causal))
    n = Y.shape[-2]
    lu = math.log(2 * u) + 1e-8
    at = torch.arange(n) if rows is None else rows
    if vis.key_mask is not None:  # a hidden key is in no row's sum
        Y = torch.where(vis.key_mask.unsqueeze(-1), Y, -math.inf)
    Yt = Y.transpose(-1, -2).contiguous()  # [B, c, n]
    if vis.window is not None:
        lb, lz = _windowed_logs(Yt, vis.window, at, lu)
    elif vis.causal:
        lz = torch.logcumsumexp(Yt, -1).cummax(-1).values
        enter = torch.searchsorted(lz, Yt - lu).clamp_min_(torch.arange(n))
        enter, order = enter.sort(dim=-1, stable=True)
        lb = torch.logcumsumexp(Yt.gather(-1, order), -1)
        cnt = torch.searchsorted(enter, at.expand(*enter.shape[:-1], -1).contiguous(), right=True)
        lb = torch.where(cnt > 0, lb.gather(-1, (cnt - 1).clamp_min(0)), -math.inf)
        lz = lz[..., at]
    else:
        lz = torch.logsumexp(Yt, -1, keepdim=True)
        lb = torch.logsumexp(torch.where(Yt <= lz + lu, Yt, -math.inf), -1, keepdim=True)
    if keep is not None and keep.dim() < X.dim():
        keep = keep.unsqueeze(-2)
    Xb = X if keep is None else torch.where(keep, X, -math.inf)
    return torch.logsumexp(Xb + lb.mT, -1), torch.logsumexp(X + lz.mT, -1)


def _sliding(x: torch.Tensor, w: int, lse: bool) -> torch.Tensor:
    """Over the last dim, each ``i``'s log-sum-exp (``lse``) or maximum of ``x`` over ``(i -
    w, i]``: ``(i - w, i]`` is a suffix of one chunk of ``w`` and a prefix of the next, so
    two scans per chunk, ``O(n)``, with no differences of sums."""
    n = x.shape[-1]
    w = min(w, n)  # (a window past the sequence is its prefix)
    xp = torch.nn.functional.pad(x, (0, -n % w), value=-math.inf).unflatten(-1, (-1, w))
    if lse:
        pre, suf = torch.logcumsumexp(xp, -1), torch.logcumsumexp(xp.flip(-1), -1).flip(-1)
    else:
        pre, suf = xp.cummax(-1).values, xp.flip(-1).cummax(-1).values.flip(-1)
    pre, suf = pre.flatten(-2)[..., :n], suf.flatten(-2)
    i = torch.arange(n)
    has = (i % w != w - 1) & (i >= w - 1)  # (the window is not one whole chunk)
    tail = torch.where(has, suf[..., (i - w + 1).clamp_min(0)], -math.inf)
    return torch.logaddexp(pre, tail) if lse else torch.maximum(pre, tail)


def _windowed_logs(
    Yt: torch.Tensor, window: int, at: torch.Tensor, lu: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lb, lz)`` ``[B, c, r]`` of :func:`_absorbed_logs` for the rows ``at`` of a causal
    sliding window: ``lz`` by :func:`_sliding`; ``lb`` per block of rows over the keys its
    windows span that some row seeing them may absorb (``e^{Y_j}`` at most ``2 u`` of the
    largest sum of a window holding ``j``: few, on most inputs), in float64."""
    B, c, n = Yt.shape
    lz_all = _sliding(Yt, window, lse=True)
    reach = _sliding(lz_all.flip(-1), window, lse=False).flip(-1)  # rows j..j+w-1's largest
    cand = torch.nonzero((Yt <= reach + lu).flatten(0, -2).any(0)).squeeze(-1)
    lb = torch.full((B, c, at.numel()), -math.inf, dtype=Yt.dtype)
    if cand.numel() == 0:
        return lb, lz_all[..., at]
    m_w = int((torch.searchsorted(cand, at, right=True)
               - torch.searchsorted(cand, at - window, right=True)).max())  # fmt: skip
    per = SHARE_ELEMENTS / (B * c)  # step rows times (m_w + step) keys
    step = max(1, int((math.sqrt(m_w * m_w + 4 * per) - m_w) / 2))
    for s0 in range(0, at.numel(), step):
        i = at[s0 : s0 + step]
        j = cand[torch.searchsorted(cand, int(i.min()) - window + 1) :]
        j = j[: int(torch.searchsorted(j, int(i.max()), right=True))]
        seen = (j <= i.unsqueeze(-1)) & (j > i.unsqueeze(-1) - window)  # [r, m]
        Yc = Yt[..., j].unsqueeze(-2)  # [B, c, 1, m]
        top = lz_all[..., i].unsqueeze(-1) + lu
        lb[..., s0 : s0 + step] = torch.logsumexp(
            torch.where(seen & (Yc <= top), Yc, -math.inf), -1
        )
    return lb, lz_all[..., at]


def _absorbed_share(
    groups: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    causal: bool | Visible,
    rows: torch.Tensor | None,
    u: float,
) -> torch.Tensor:
    """Per row ``[B, r]``, the normalized weight of the terms ``e^{X_ic + Y_jc}`` whose
    ``e^{Y_jc}`` is at most ``2 u`` of the channel's sum over the keys the row sees: the
    terms :func:`_expprod` charges as absorbed, in ``O(n C log n)``, from channel groups
    ``(X [B, r, c], Y [B, n, c], keep)`` (:func:`_absorbed_logs`; a caller may form them
    one at a time) as ``e^{log sum e^{X + lb} - log sum e^{X + lz}}``, raised by ``1 + 1e-8``:
    at least the pair evaluation's float64 evaluation of the same sets. Rows without a
    nonzero term: 0."""
    num = den = None
    for X, Y, keep in groups:
        a, b = _absorbed_logs(X, Y, causal, rows, u, keep)
        num = a if num is None else torch.logaddexp(num, a)
        den = b if den is None else torch.logaddexp(den, b)
    assert num is not None and den is not None
    share = torch.exp(num - den)
    return torch.where(torch.isnan(share), 0.0, share) * (1 + 1e-8)


def column_groups(
    X: torch.Tensor, Y: torch.Tensor, keep: torch.Tensor | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """``(X, Y, keep)`` in groups of :data:`SHARE_CHANNELS` channels
    (:func:`_absorbed_share`)."""
    for c in range(0, Y.shape[-1], SHARE_CHANNELS):
        part = slice(c, c + SHARE_CHANNELS)
        yield X[..., part], Y[..., part], None if keep is None else keep[..., part]


def expprod_state(
    ex: Exponents,
    q: torch.Tensor,
    v: torch.Tensor,
    precision: Precision,
    causal: bool,
    lam: float,
    rows: torch.Tensor | None,
    dense: Callable[[torch.Tensor], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """:func:`expprod_block`'s sound bound from per-channel key states (:mod:`._state`):
    ``O((n + rows) C d_v)`` time. ``ex`` holds the rows' exponents (``X``, ``x_err``,
    ``eX`` of the rows ``rows``, or of every row) and the whole sequence's keys' (``Y``,
    ``y_err``, ``eY``), ``q`` the
    stored queries (their loads), ``dense(rows)`` the pair evaluation of those rows. The
    same model (both shift models, any schedule the declaration allows, linear sums), each
    per-term factor bounded by one that separates into a row and a key part: ``Lambda_ijc
    <= alpha_ic + beta_jc`` (``|X + Y| <= |X| + |Y|``; the key's distance to the row's
    shift at most to the sequence's largest key exponent, per channel or over every
    feature as ``ex.per_channel`` says); the per-key deviations ``|v_j - y_i|`` through
    :func:`._state.deviation`. So it is never below the pair evaluation with its factors
    evaluated exactly (docs/bounds/attention.md, "State evaluation"). ``"typical"``: the
    probabilistic level at ``lam`` (:func:`.rounding.tail_lambda`), the pair evaluation's
    model with its squared weights, per-term variances and higher-order part bounded
    outward from the same states (never below it). Rows whose float64 states cannot hold
    their terms (:data:`._state.GAP`) take ``dense`` (at the same ``lam``)."""
    from attnprec.analysis.bounds import _state

    fc, fa = precision.compute, precision.accumulate
    uc, ua = fc.u, fa.u
    up = precision.product_u()
    a_arg = precision.elementary.exp_arg
    k_e = precision.op_error("exp")
    l1k = math.log1p(k_e)
    l1m = math.log1p(-k_e) if k_e < 1 else -math.inf
    g3 = 1 + gamma(3, U64)
    ld = Loaded(precision)
    per_channel, nx = ex.per_channel, ex.extra
    X_all, eX_all, Y, eY, y_err, y_max = ex.X, ex.eX, ex.Y, ex.eY, ex.y_err, ex.y_max
    B, n, C = Y.shape
    dv = v.shape[-1]
    # the exponents' own float64 errors beyond the roundings the states count (FAVOR+'s
    # feature exponents; log's products are counted there)
    arg_err = 0.0 if per_channel else float((ex.x_err.amax() if X_all.numel() else 0.0)
                                            + (y_err.amax() if Y.numel() else 0.0))  # fmt: skip
    top_y = Y.amax(-2, keepdim=True) if per_channel else Y.amax((-2, -1), keepdim=True)
    if y_max is not None:
        top_y = torch.maximum(top_y, y_max)
    mu = v.mean(-2, keepdim=True)
    G = _state.value_columns(v, mu)
    gmax = G.abs().amax(-2, keepdim=True)
    va = ld.abs(v)
    over_kv = ex.key_over.double().unsqueeze(-1)
    plain = torch.cat([va, va.amax(-1, keepdim=True).clamp_min(1.0), over_kv], -1)
    verr = ld.err(v)
    flush = precision.exp_flush_matters()
    thr_low = -precision.exp_exact_log() - 1
    two = y_max is not None and precision.block is None
    eta = max(fc.underflow, fa.underflow)
    # The key side, per chunk of keys (FAVOR+: [n, m] per array; only fac2, facm and peak
    # are held through the scan). beta, the key part of Lambda: eY + (4 u_c + 8 u64) |Y| +
    # u_c (3 + 2a)(max Y - Y) (the folded log2(e)'s Y C and m_b C included); k_low, the key
    # part of an exp's distance below the kernel's shift (flush to zero, below); the key part
    # of a term's variance proxy, uc^2 (3 Y^2 + (2 + 2a^2) Dk^2) (Dk <= max Y - Y): at most
    # its largest value, sig_max, and at most uc m_sig / g3 times the factor fac2 of the
    # key's Lambda (3Y^2 = 1.5|Y| 2|Y|, and fac2 >= g3 beta)
    rat = max(1.0, (2 + 2 * a_arg**2) / (2 + 2 * a_arg))
    fac2, facm = torch.empty_like(Y), torch.empty_like(Y)
    peak = torch.empty(B, n, C + 2 + 2 * dv, dtype=torch.float64)
    maxima = torch.zeros(3, B, dtype=torch.float64)  # sig, m_sig, eY + y_err
    step = max(1, _state.ENTRIES // max(B * C, 1))
    # where exps may flush: per key and channel Y - beta (a term can fall below T_e only
    # if it is below the row's L, :func:`_flush_sums`)
    low_keys = (torch.empty_like(Y), Y) if flush else None
    for a in range(0, n, step):
        sl = slice(a, a + step)
        Yc = Y[:, sl]
        dist = top_y - Yc
        beta = torch.mul(Yc.abs(), 4 * uc + 8 * U64).add_(eY[:, sl])  # (the fold: 2 u_c |Y|)
        beta = upper(beta.add_(uc * (3 + 2 * a_arg) * dist).mul_(1 + gamma(7, U64)), 6)
        fac2[:, sl] = torch.expm1(g3 * beta).mul_(1 + 4 * U64)  # e^{g3 beta} - 1, up
        facm[:, sl] = torch.exp(-g3 * beta).mul_(1 - 4 * U64)  # e^{-g3 beta}, down
        k_low = (dist + beta).amax(-1, keepdim=True)
        if low_keys is not None:
            low_keys[0][:, sl] = Yc - beta
        vc, ec = v[:, sl], verr[:, sl]
        peak[:, sl] = torch.cat([Yc, beta.amax(-1, keepdim=True), vc + ec, -(vc - ec), k_low], -1)
        del beta, k_low
        sig = (uc * uc) * (3 * Yc * Yc + (2 + 2 * a_arg**2) * dist * dist)
        msig = torch.maximum(1.5 * Yc.abs(), rat * dist)
        shift_e = eY[:, sl] + y_err[:, sl]
        for i, x in enumerate((sig, msig, shift_e)):
            if x.numel():
                maxima[i] = torch.maximum(maxima[i], x.amax((-2, -1)))
        del dist, sig, msig, shift_e
    key_shift_err = maxima[2].reshape(B, 1)
    sums = None if low_keys is None else _flush_sums(*low_keys, va.amax(-1, keepdim=True), causal)
    fac_max = float(fac2.max()) if fac2.numel() else 0.0
    sig_max = upper(maxima[0], 2).reshape(B, 1, 1)
    m_sig = maxima[1].reshape(B, 1, 1)
    kap_sig = upper(uc * m_sig / g3, 4)
    o_first = (C * (C + 1) * (2 * C + 1) / 6 - 1) / C**2 if C >= 2 else 0.0
    o_second = C * (C + 1) / 6 - 1 if C >= 2 else 0.0

    def variance(
        s: _state.Scan, r: _state.Rows, X: torch.Tensor, eX: torch.Tensor, XM: torch.Tensor,
        Dq: torch.Tensor, R: torch.Tensor, y_abs: torch.Tensor, key: list[torch.Tensor],
        seq: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """An upper bound of :func:`_expprod`'s variance proxy (times 3) ``[B, r, d_v]``.
        Its squared weights from first-order states: with ``*`` the row's heaviest key
        (:func:`._state.top_key`), ``sum_j (p_j share_jc)^2 g_j <= (p_* share_*c)^2 g_* +
        m_c sum_j p_j share_jc g_j`` for ``g >= 0``, ``m_c = min(pk_c, 1 - p_*)`` at least
        every other key's ``p_j share_jc`` (``pk_c`` from the visible keys' largest ``Y``);
        over the channels likewise with ``m = min(sum_c pk_c, 1 - p_*)``. The per-term
        variances split into row and key parts (``(X + Y)^2 <= 2X^2 + 2Y^2``); ``order_sq``
        is nondecreasing in ``|s|`` and ``q``, so it takes their upper bounds, and a sum of
        them over the channels :func:`.rounding.order_sq_sum`'s. ``seq [B, r, d_v + 1]``:
        the keys' sums in sequence order of ``p_j [v_j, 1]`` (:func:`._state.sequence_sq`),
        taken where above their average over the orders, as the pair evaluation."""
        nvis = s.nvis
        # the heaviest key: its weight per channel (upper), its total (lower), its columns
        Y_key, G_key = key
        w_key = r.wn * torch.exp(Y_key - s.m)
        p_lo = w_key.sum(-1, keepdim=True) * (1 - r.rho)
        w_key = w_key * (1 + r.rho)
        ck = G_key[..., 1 + dv : 1 + 2 * dv]  # its v - mu
        d2_key = ((ck - r.yc).abs() * (1 + 2 * U64) + r.eps_y) ** 2
        v2_key = ((ck + mu).abs() * (1 + 2 * U64)) ** 2
        pk = r.wn * torch.exp(s.peak[..., :C] - s.m) * (1 + r.rho)  # [B, r, C]
        rest = (1 - p_lo).clamp_min(0.0)
        m_c = torch.minimum(pk, rest)
        m = torch.minimum(pk.sum(-1, keepdim=True), rest)  # [B, r, 1]
        w2 = w_key * w_key
        rho_c = (uc * uc) * (2 * X * X + Dq * Dq) + (1 + nx) * k_e**2  # [B, r, C]
        unit = torch.ones_like(m_c)

        # sum_j (sum_c f_c p_j share_jc H_t(j, c)) g_j for the factors f >= 0 used below
        facs = {"1": (unit, 0), "m": (m_c, 0), "m rho": (m_c * rho_c, 0), "m fac": (m_c, 1)}
        aggs = {}
        for name, (f, t) in facs.items():
            A = _state.combine(r, [(f, t)], s.S)
            aggs[name] = A, r.floor * f.amax(-1, keepdim=True) * gmax

        def sq(name: str, c: torch.Tensor) -> torch.Tensor:  # ... times (v_j - mu - c)^2
            return _state.square_sum(*aggs[name][:1], r.rho, aggs[name][1], c)

        def dev2(name: str) -> torch.Tensor:  # ... times (v_j - y)^2, about the exact y
            A, pad = aggs[name]
            a0 = A[..., :1] * (1 + r.rho) + pad[..., :1]
            return (torch.sqrt(sq(name, r.yc)) + r.eps_y * a0.sqrt()) ** 2

        # sum_c sum_j (p_j share_jc)^2 Var_ijc (v_j - y)^2, Var <= rho_c + sigma_jc
        sig_key = (uc * uc) * (3 * Y_key**2 + (2 + 2 * a_arg**2) * (top_y - Y_key) ** 2)
        var_key = (w2 * (rho_c + sig_key)).sum(-1, keepdim=True) * d2_key + dev2("m rho")
        var_key = var_key + torch.minimum(sig_max * dev2("m"), kap_sig * dev2("m fac"))
        # the per-channel signed sums sum_j p_j share_jc (v_j - y) and sum_j p_j share_jc
        # v_j, each within e_c of its float64 value: sum_c e_c at most the row's e (the
        # magnitude sums over every channel), and sum_c (x_c + e_c)^2 f_c <= (sqrt(sum_c
        # x_c^2 f_c) + e sqrt(max f))^2 (Minkowski)
        Pc = r.wn.unsqueeze(-1) * s.S[0][..., : 1 + 2 * dv]  # [B, r, C, 1 + 2 d_v]
        P0, sgn = Pc[..., 0], Pc[..., 1 + dv :]
        gs = P0 * (1 + r.rho) + r.floor  # [B, r, C]
        rg, pad = r.rho + gamma(4, U64), C * r.floor * gmax[..., 1 + dv : 1 + 2 * dv]
        one = 1 + r.rho + C * r.floor
        e_g = rg * (r.p_abs + (r.yc.abs() + r.eps_y) * one) + r.eps_y * one + pad
        e_s = rg * (r.p_abs + mu.abs() * one) + pad

        def channels(x: torch.Tensor, f: torch.Tensor | None, e: torch.Tensor) -> torch.Tensor:
            sq2 = (x * x).sum(-2) if f is None else torch.einsum("brcv,brc->brv", x * x, f)
            top = 1.0 if f is None else f.amax(-1, keepdim=True).sqrt()
            return (torch.sqrt(sq2) + e * top * (1 + 4 * U64)) ** 2

        VarQ = (uc * X) ** 2 + (uc * XM) ** 2 + (uc * Dq) ** 2 * (2 + 2 * a_arg**2)
        VarQ = VarQ + k_e**2 + eX**2 / 3
        var_shared = channels(sgn - r.yc.unsqueeze(-2) * P0.unsqueeze(-1), VarQ, e_g)
        sn2 = channels(sgn + mu.unsqueeze(-2) * P0.unsqueeze(-1), None, e_s)  # sum_c sn_c^2
        # the sums' orders (keys then channels, or channels then keys)
        p2_key = w_key.sum(-1, keepdim=True) ** 2
        q_n = p2_key * v2_key + m * sq("1", -mu)
        qn_sum = w2.sum(-1, keepdim=True) * v2_key + sq("m", -mu)  # sum_c qn_c
        qd_c = w2 + m_c * gs
        p2 = p2_key + m * gs.sum(-1, keepdim=True)
        nk = (nvis + R).reshape(1, -1, 1)
        kc_n = order_sq_sum(sn2, qn_sum, nk) + order_sq(y_abs, sn2, C)
        kc_d = order_sq(gs, qd_c, nk).sum(-1, keepdim=True) + order_sq(
            unit[..., :1], (gs**2).sum(-1, keepdim=True), C
        )
        ck_n = (o_second / C) * qn_sum + o_first * q_n
        ck_n = ck_n + torch.maximum(order_sq(y_abs, q_n, nk), seq[..., :dv])
        ck_d = torch.maximum(order_sq(unit[..., :1], p2, nk), seq[..., dv:]) + C * p2 / 3
        var_sum = (ua * ua) * (torch.maximum(kc_n, ck_n) + y_abs**2 * torch.maximum(kc_d, ck_d))
        nn = nvis.clamp_min(2).reshape(1, -1, 1)
        var_dev = R.reshape(1, -1, 1) * k_e**2 * nn / (4 * (nn - 1))
        sq_dev = p2_key * d2_key + m * dev2("1")
        var_prod = q_n * (ld.ul**2 + (2 + nx) * up * up)
        return var_key + var_shared + var_prod + var_sum + var_dev * sq_dev

    def model(
        s: _state.Scan, r: _state.Rows, X: torch.Tensor, eX: torch.Tensor, x_err: torch.Tensor,
        Mk: torch.Tensor, visible_shift: bool, key: list[torch.Tensor], q_lift: Any,
        absorb: torch.Tensor, seq: torch.Tensor,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        nvis = s.nvis
        R_run, dep_k = schedule(precision, nvis)
        R = R_run if visible_shift else torch.zeros_like(R_run)
        n_ex = (2 + nx + R)[:, None]  # [r, 1]
        dep = (dep_k + C + 2)[:, None]
        XM = X + Mk
        Mi = XM.amax(-1, keepdim=True)
        Dq = (Mi - XM) if per_channel else (X.amax(-1, keepdim=True) + q_lift - X)
        Eq = eX + uc * (2 * X.abs() + XM.abs() + Mk.abs() + (2 + 2 * a_arg) * Dq)  # (the fold)
        Eq = Eq + 4 * U64 * (XM.abs() + Mi.abs())
        alpha = upper((Eq + (uc + 4 * U64) * X.abs()) * (1 + gamma(7, U64)), 4)
        lg_hi, lg_lo = dep * math.log1p(ua), dep * math.log1p(-ua)
        lK_hi, lK_lo = (2 + nx) * math.log1p(up) + lg_hi, (2 + nx) * math.log1p(-up) + lg_lo
        lKd = (1 + nx) * math.log1p(-up) + lg_lo
        c_fac = excess(lK_hi - lKd)
        K_hi, K_lo = torch.exp(lK_hi), torch.exp(lK_lo)
        Kd = torch.exp(lKd)
        E1 = torch.exp(g3 * n_ex * l1k)
        ez = torch.exp(g3 * n_ex * l1m)
        # A <= alpha0 + beta0 expm1(g3 Lambda) (docs/bounds/attention.md, "State evaluation")
        a0 = torch.maximum(excess(lK_hi) + K_hi * (E1 - 1), deficit(lK_lo) + K_lo * (1 - ez))
        a0, b0 = upper(a0, 4), upper(torch.maximum(K_hi * E1, K_lo * ez), 2)
        ga = g3 * alpha
        e_a = torch.exp(ga)
        f0 = a0 + b0 * torch.expm1(ga)
        f2 = b0 * e_a
        A = _state.combine(r, [(f0, 0), (f2, 1)], s.S)  # [B, r, K]
        coef = torch.maximum(f0, f2).amax(-1, keepdim=True)
        Y_key, fac_key, G_key = key  # the row's heaviest key, taken exactly
        w_key = _state.key_weight(r, Y_key, s.m, [(f0, None), (f2, fac_key)])
        dev = _state.deviation(r, A, gmax, coef, (w_key, G_key))
        A_up = A * (1 + r.rho) + r.floor * coef * gmax
        a0s, a_abs = A_up[..., :1], A_up[..., 1 : 1 + dv]
        rho = r.rho.squeeze(-1)
        # sum_j (a_ij + p_ij) |v~_j - v_j|, |v_j| <= |v_j - mu| + |mu|
        sv = a_abs + r.p_abs + mu.abs() * (a0s + 1 + r.rho)
        load = upper(ld.ul * sv + ld.hl * (a0s + 1 + r.rho), 4)
        S02 = s.S[0][..., 0] + s.S[1][..., 0]
        c = torch.einsum("brc,brc->br", r.wn * e_a, S02) * (1 + rho) + r.floor * (1 + fac_max)
        c = upper(c_fac.reshape(1, -1) * E1.reshape(1, -1) * c, 4).unsqueeze(-1)
        dm = torch.einsum("brc,brc->br", r.wn * exp_down(-ga), s.lone[0])
        den_main = (Kd * ez).reshape(1, -1) * dm * (1 - rho) * (1 - gamma(n + C + 8, U64))
        lam_max = upper(alpha.amax(-1) + s.peak[..., C], 2)
        top = (X + s.peak[..., :C]).amax(-1)
        shift = (
            Mi.squeeze(-1) if per_channel else (X.amax(-1, keepdim=True) + Mk + q_lift).squeeze(-1)
        )
        spread = (shift - top).clamp_min(0.0)
        shift_err = upper(Eq.amax(-1) + x_err.amax(-1), 2) + 2 * key_shift_err
        w_arg = lam_max + spread + shift_err
        w_lo = _w_lo(w_arg, 2 + nx + R, l1m)
        a_fold = _fold_reach(X, eX, Mk, Mi, q_lift, ex, precision)
        w_top = largest_weight(torch.minimum(w_arg, a_fold), 2 + nx + R, precision)
        d_lo = torch.maximum(w_lo, w_top) if per_channel and visible_shift else w_lo
        l_ex = (2 + nx + R) * l1k  # (as the pairs': the other exps carry an exp's error)
        U_row = precision.exp_underflow() * torch.exp(lam_max + l_ex)
        if flush:
            # a term's exps may fall below T_e only if Lambda + Dk + Dq + shift_err exceeds
            # -log T_e - 1 (the pair evaluation's test), which the row's largest row part
            # plus the visible keys' largest key part bounds: else no exp flushes
            may = (Dq + alpha).amax(-1) + shift_err + s.peak[..., C + 1 + 2 * dv]
            U_row = torch.where(upper(may, 4) > thr_low, U_row, 0.0)
        vis_va = s.plain[..., :dv]
        RC = R * C * (U_row > 0)
        fixed_den = (nx * nvis + R) * C * eta
        fixed_num = ((nvis * (2 + nx) + R) * C * eta)[:, None]
        raw_den = upper(U_row * ((2 + nx) * C * nvis + nvis * RC) + fixed_den, 6)
        raw_num = U_row.unsqueeze(-1) * (((2 + nx) * C + RC).unsqueeze(-1) * vis_va)
        raw_num = upper(raw_num + fixed_num, n + 6)
        b_den, b_num = raw_den / w_lo, raw_num / w_lo.unsqueeze(-1)
        if sums is not None and bool((U_row > 0).any()):
            # per channel, relative to W: what its terms that may fall below T_e weigh
            # (wn_c e^{Y_jc - m_c} each, within e^{g3 (lam_max + n_ex l1k)} K_hi, the
            # pairs' factor) plus a spacing per exp, as the pair evaluation; or, where its
            # later keys (counted too) make that more, per term U_e per exp or the most a
            # term below T_e e^{1 + Lambda} weighs, whichever is more (never below the
            # pairs' charge, term by term)
            L = alpha + (shift + shift_err - thr_low).unsqueeze(-1) - X
            S0, S1, top_c = _flush_sums_at(sums, L, s.idx)
            ne = n_ex.reshape(1, -1)  # [1, r]
            hk = torch.exp(upper(g3 * (lam_max + ne * l1k), 4) + lK_hi.reshape(1, -1))
            lt = top_c - s.m  # [B, r, C]
            f = r.wn * (1 + r.rho) * torch.exp(lt.clamp_max(700.0)) * hk.unsqueeze(-1)
            f = torch.where(lt < 700.0, upper(f, 4), math.inf)  # (else: the per-term charge)
            us = fc.underflow * torch.exp(lam_max + l_ex) * ne / w_lo  # [B, r]
            l_top = -thr_low + lam_max + 2 * shift_err + g3 * (lam_max + ne * l1k)
            u_term = (
                torch.maximum(
                    U_row * ne, upper(torch.exp(l_top + lK_hi.reshape(1, -1)), 2) + us * w_lo
                )
                / w_lo
            )
            keep = (U_row > 0).unsqueeze(-1)
            den_c = torch.minimum((u_term * nvis).unsqueeze(-1), f * S0 + (us * nvis)[..., None])
            vv = vis_va.unsqueeze(-2)  # [B, r, 1, d_v]
            num_c = torch.minimum(u_term[..., None, None] * vv,
                                  (f * S1).unsqueeze(-1) + us[..., None, None] * vv)  # fmt: skip
            b_den = upper(torch.where(keep, den_c, 0.0).sum(-1) + fixed_den / w_lo, C + 8)
            b_num = torch.where(keep.unsqueeze(-1), num_c, 0.0).sum(-2)
            b_num = upper(b_num + fixed_num / w_lo.unsqueeze(-1), C + 8)
        den_lo = (den_main - b_den).unsqueeze(-1)
        y_abs = r.y.abs() + r.eps_y
        det = b_num + y_abs * b_den.unsqueeze(-1)
        num = dev + load + y_abs * c + det
        sound = upper(num / den_lo.clamp_min(1e-300), 3 * n + 12)
        sound = torch.where(den_lo > 0, sound, math.inf)
        # the probabilistic level (quotient's): the first-order errors through their
        # variance; the rest is the sound model's higher-order part. Per term A(Lambda) -
        # (l0 + Lambda) (A's first-order part) grows with Lambda, so at Lambda = alpha + beta
        # it is at most h0 + (f2 - 1) beta + f2 (fac2 - beta), with fac2 - beta <= kap fac2
        # (x = g3 beta <= fac2 and expm1(x) - x <= x expm1(x) / 2); the y-coefficient's and
        # the division's excess likewise
        l0 = (n_ex * k_e + (2 + nx) * up + dep * ua).reshape(1, -1, 1)
        beta_row = s.peak[..., C : C + 1]  # the visible keys' largest beta
        kap = upper(g3 * beta_row / 2 + (1 - 1 / g3) + 4 * U64, 4)
        h0 = (f0 - l0 - alpha).clamp_min(0.0) + 4 * U64 * (f0 + l0 + alpha)
        h0, hk = upper(h0 + (f2 - 1).clamp_min(0.0) * beta_row, 4), upper(f2 * kap, 2)
        A_h = _state.combine(r, [(h0, 0), (hk, 1)], s.S)
        coef_h = torch.maximum(h0, hk).amax(-1, keepdim=True)
        w_h = _state.key_weight(r, Y_key, s.m, [(h0, None), (hk, fac_key)])
        dev_h = _state.deviation(r, A_h, gmax, coef_h, (w_h, G_key))
        Ah = A_h * (1 + r.rho) + r.floor * coef_h * gmax
        load_h = ld.ul * (Ah[..., 1 : 1 + dv] + mu.abs() * Ah[..., :1]) + ld.hl * Ah[..., :1]
        c_lin = ((3 + 2 * nx) * up + 2 * dep * ua).reshape(1, -1, 1)
        c_h = (c - c_lin).clamp_min(0.0) + 4 * U64 * c
        rem = upper(dev_h + load_h + y_abs * c_h + (sound - num).clamp_min(0.0), 6)
        var = variance(s, r, X, eX, XM, Dq, R, y_abs, [Y_key, G_key], seq)
        lo_v, hi_v = -s.peak[..., C + 1 + dv : C + 1 + 2 * dv], s.peak[..., C + 1 : C + 1 + dv]
        vmax = torch.maximum(hi_v.abs(), lo_v.abs())  # the visible values' largest |v|
        # the terms a channel's sum may absorb (:func:`_absorbed_share`), at most the pair
        # evaluation's charge sum_j a_j (|v_j| + |y|)
        typical = lam * torch.sqrt(var / 3) * (1 + 4 * U64) + det + rem
        typical = typical + upper((vmax + y_abs) * absorb.unsqueeze(-1), 2)
        typical = torch.where(torch.isnan(typical), sound, torch.minimum(typical, sound))
        if per_channel and visible_shift:
            # the output within the values' hull (as the pair evaluation's)
            kappa = excess(lK_hi - lg_lo).reshape(1, -1, 1)
            _, _, slack = hull((lo_v, hi_v), vmax, kappa, raw_num, raw_den, w_top)
            e_hull = upper(torch.maximum(hi_v - r.y, r.y - lo_v) + r.eps_y + slack, 4)
            sound, typical = torch.minimum(sound, e_hull), torch.minimum(typical, e_hull)
        term = torch.exp((2 + nx + R) * l1k + a_fold) * torch.exp(lg_hi.squeeze(-1))
        state = nvis * C * term
        # the normalizer the division takes, in the kernel's units: W e^{-shift} =
        # e^{X_c + m_c - shift} / wn_c for any channel (the heaviest's; m the states' unit,
        # the scan chunk's maximum, later keys of it included: a review), each term within
        # its reach
        wmax, c_at = r.wn.max(-1, keepdim=True)
        xm = (X + s.m).gather(-1, c_at).squeeze(-1)
        d_units = torch.exp(xm - shift) / wmax.squeeze(-1).clamp_min(1e-300)
        reach = upper(2 * lam_max + shift_err, 2)
        d_top = torch.minimum(upper(d_units * torch.exp(reach) * (1 + rho), 4) * term, state)
        sound, typical, last = finish(
            sound,
            typical,
            y_abs,
            precision,
            operands=(d_top.unsqueeze(-1) * vmax, d_top[..., None], d_lo[..., None]),
        )
        vmax_row = s.plain[..., dv] / nvis.clamp_min(1)
        v_top = torch.maximum(
            s.peak[..., C + 1 : C + 1 + dv].abs(), s.peak[..., C + 1 + dv : C + 1 + 2 * dv].abs()
        )  # (the visible values' largest |v + err|, |v - err|)
        v_top = v_top.amax(-1).clamp_min(1.0)
        full = lambda m: m.unsqueeze(-1).expand_as(sound)  # noqa: E731
        reasons = {
            f"load into {fc.name}": full(
                ld.over(q[:, s.idx]).any(-1) | ex.key_over.any(-1, keepdim=True)
            ),
            f"exponents in {fc.name}": full(
                ((XM.abs() + Eq).amax(-1) >= fc.overflow()) | _past_exp(ex, Mk, uc, fc.overflow())
            ),
            f"sums in {fa.name}": full(state * vmax_row >= fa.overflow()),
            **_products_over(precision, state * vmax_row, C, term, v_top, full),
            "normalizer may vanish": full(
                ~(den_lo.squeeze(-1) > 0) & ((not (per_channel and visible_shift)) | (w_top == 0))
            ),
            **last,
        }
        return unbounded(sound, typical, reasons)

    absorb = _absorbed_share(column_groups(X_all, Y), causal, rows, ua)
    at_rows = row_positions(rows)
    # the keys' sums in sequence order, normalized (the pair evaluation's Block.in_sequence)
    seq, tot = _state.sequence_sq(X_all, Y, torch.cat([v, torch.ones_like(v[..., :1])], -1),
                                  causal, rows, log=True)  # fmt: skip
    wt = tot[..., dv:]
    seq = torch.where(wt > 0, seq / torch.where(wt > 0, wt, 1.0) ** 2, 0.0)

    def rows_fn(s: _state.Scan) -> dict[str, torch.Tensor]:
        at = at_rows(s.idx)  # among ex's rows
        X, eX, x_err = X_all[:, at], eX_all[:, at], ex.x_err[:, at]
        ql = 0.0 if ex.q_lift is None else ex.q_lift[:, at]
        peak_y = s.peak[..., :C]
        Mk = peak_y if per_channel else peak_y.amax(-1, keepdim=True)
        r = _state.rows_of(s, X, peak_y, mu, gmax, fac_max, arg_err)
        _, heavy = _state.top_key(s, X, [Y, fac2, G])
        ab, sq = absorb[:, at], seq[:, at]
        out = model(s, r, X, eX, x_err, Mk, True, heavy, ql, ab, sq)
        if two:
            assert y_max is not None
            wide = (y_max > Mk).any(-1)  # [B, r]: the sequence's shift lies above the row's
            if bool(wide.any()):
                o2 = model(s, r, X, eX, x_err, torch.maximum(Mk, y_max), False, heavy, ql, ab, sq)
                w3 = wide.unsqueeze(-1)
                for key, val in o2.items():
                    both = (
                        torch.maximum(out[key], val) if val.is_floating_point() else out[key] | val
                    )
                    out[key] = torch.where(w3, both, out[key])
        out["far"] = r.far.unsqueeze(-1).expand_as(out["sound"])
        return out

    out = _state.scan(Y, [None, fac2], G, [facm], plain, peak, causal, rows, rows_fn)
    return _state.merge_far(out, torch.arange(q.shape[-2]) if rows is None else rows, dense)
