"""Input quantization: how much the exact target moves when q, k, v are rounded to storage.

For the normalized targets (softmax, exact semirings, log, linear over given positive
features) the stored inputs change each exact weight by a factor ``exp(tau_j)``,
``|tau_j|`` bounded per target (docs/bounds/attention.md, "Quantization"):

- softmax: ``|s~ - s| = |scale| |dq . k~ + q . dk|`` (``dq = q~ - q`` exact in float64),
  evaluated within ``gamma_{2d+2}(u64)`` of its magnitude; semirings ``max |lam_r|`` times it;
- log: ``|scale| max_c (|dq_c| + |dk_jc|)``;


then the first-order-free lemma (:class:`.quotient` with ``A_j = e^{tau_j} - 1``) and the
values: ``sum_j p_j e^{tau_j} |dv_j| / sum_j p_j e^{-tau_j}``. Linear attention over given
features (of any sign) perturbs each weight additively, ``|w~_j - w_j| <= e_j =
|dq|.|k~_j| + |q|.|dk_j|``, and the same lemma reads
``(sum_j e_j |v_j - y| + sum_j |w~_j| |dv_j|) / (|D| - sum_j e_j)``, infinite where the
normalizer is not separated from 0 (of either sign). Everything streams over row
blocks (:mod:`._rows`). Gated attention (unnormalized) is in :mod:`.gated`.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from attnprec._device import scaled
from attnprec.analysis.bounds._rows import (
    BUDGET,
    Block,
    Visible,
    logits64,
    normalize,
    softcapped,
    stream,
)
from attnprec.analysis.bounds.rounding import TINY, U64, exp_down, gamma, lse_bound, upper

__all__ = ["quantization", "mixture_logw"]


def mixture_logw(
    s: torch.Tensor, sig: torch.Tensor, terms: tuple[tuple[float, float], ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """log sum_r c_r exp(lam_r s) in float64 and its error bound (exact for one (1, 1) term)."""
    if terms == ((1.0, 1.0),):
        return s, sig
    lt = torch.stack([math.log(c) + lam * s for c, lam in terms], dim=-1)
    lt_err = torch.stack(
        [abs(lam) * sig + U64 * (2 * abs(lam * s) + 3 * abs(math.log(c))) for c, lam in terms],
        dim=-1,
    )
    logw = torch.logsumexp(lt, dim=-1)
    err = lse_bound(lt, U64, min_normal=2.0**-1022) + lt_err.amax(-1)
    return logw, upper(err, 8)


def quantization(
    target: str,
    given: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    stored: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    sc: float,
    causal: bool | Visible,
    rows: torch.Tensor | None,
    params: dict[str, Any],
) -> torch.Tensor:
    """``|y*(q~, k~, v~) - y*(q, k, v)|`` per output element ``[B, rows, d_v]`` (float64).

    ``given`` and ``stored``: ``(q, k, v)`` float64 ``[B, n, d]`` as given and as rounded
    to storage. ``inf`` where a stored feature rounded to 0 (linear) meets a weight the
    lemma cannot bound.
    """
    q, k, v = (torch.stack([a, b]) for a, b in zip(given, stored, strict=True))
    width = q.shape[-1] if target == "log" else 1
    return stream(
        lambda b: {"q": _block(target, b, sc, params)}, q, k, v, causal, rows, width=width
    )["q"]


def _scaled(sc: float, x: torch.Tensor) -> torch.Tensor:
    """``>= |sc| x`` for ``x >= 0`` (rounded up, and where ``x > 0`` by the product's
    underflow too: 0 only where ``x`` is)."""
    return upper(abs(sc) * x, 3).add_((x > 0).to(torch.float64), alpha=2.0**-1074)


def _logw(
    target: str, q: torch.Tensor, k: torch.Tensor, sc: float, params: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact log-weights ``[B, r, m]`` of ``target`` on float64 ``q, k``, and their
    error (:func:`.normalize`'s ``logw, sigma``)."""
    if target == "log":
        d = q.shape[-1]
        lw = torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=torch.float64)
        sig = torch.empty_like(lw)
        step = max(1, scaled(BUDGET) // max(q.shape[0] * q.shape[1] * d, 1))  # [B, r, step, d]
        for s0 in range(0, k.shape[1], step):
            sl = slice(s0, s0 + step)
            x = sc * (q.unsqueeze(-2) + k[:, sl].unsqueeze(-3))
            lw[..., sl] = torch.logsumexp(x, -1)
            sig[..., sl] = lse_bound(x, U64, min_normal=2.0**-1022) + 2 * U64 * x.abs().amax(-1)
        return lw, sig
    s, sig, _ = logits64(q, k, sc)
    if params.get("softcap") is not None:
        # cap tanh(s / cap) is 1-Lipschitz: tau stands; float64 tanh within 4 ulp
        s, sig = softcapped(s, sig, params["softcap"])
    if target == "semiring":
        return mixture_logw(s, sig, params["terms"])
    return s, sig


def _block(target: str, blk: Block, sc: float, params: dict[str, Any]) -> torch.Tensor:
    (q, qt), (k, kt), (v, vt) = blk.q, blk.k, blk.v
    # the deviations are of the given values: their center
    blk = replace(blk, center=None if blk.center is None else blk.center[0])
    dq, dk, dv = qt - q, kt - k, vt - v  # exact in float64 (Sterbenz, or q~ = 0)
    d = q.shape[-1]
    if target == "linear":
        return _linear(blk)
    if target not in ("softmax", "semiring", "log"):  # pragma: no cover - the assembler's
        raise ValueError(f"target: no quantization bound for {target!r}")
    if target == "log":
        tau = torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=torch.float64)
        step = max(1, scaled(BUDGET) // max(q.shape[0] * q.shape[1] * d, 1))  # [B, r, step, d]
        for s0 in range(0, k.shape[1], step):
            sl = slice(s0, s0 + step)
            t = (dq.abs().unsqueeze(-2) + dk[:, sl].abs().unsqueeze(-3)).amax(-1)
            tau[..., sl] = _scaled(sc, t)
    else:
        ds = sc * (dq @ kt.transpose(-1, -2) + q @ dk.transpose(-1, -2))
        mag = abs(sc) * (
            dq.abs() @ kt.abs().transpose(-1, -2) + q.abs() @ dk.abs().transpose(-1, -2)
        )
        # the 2 d products may underflow in float64 before the scale multiplies them, and
        # the scale's product itself
        und = (2 * d * abs(sc) + 1) * 2.0**-1074
        tau = upper(ds.abs() + gamma(2 * d + 2, U64) * mag + und, 4)
        # no perturbation only where every product dq_c k~_c, q_c dk_c is exactly 0 (mag
        # may underflow to 0 where they are not)
        if not (bool(dq.any()) or bool(dk.any())):
            tau = torch.zeros_like(tau)
        else:
            ind = lambda x: (x != 0).to(torch.float64)  # noqa: E731
            some = ind(dq) @ ind(kt).transpose(-1, -2) + ind(q) @ ind(dk).transpose(-1, -2)
            tau = torch.where(some == 0, 0.0, tau)
        if target == "semiring":
            tau = tau * max(abs(lam) for _, lam in params["terms"])
    nz = normalize(*_logw(target, q, k, sc, params), v, blk)
    tau = blk.masked(tau, 0.0)
    A = torch.expm1(tau)
    (dev,) = nz.deviation([blk.masked(nz.p_up * A, 0.0)])
    # Both parts divide by sum_j p_j e^{delta_j} >= sum_j p_j e^{-tau_j} (|delta_j| <= tau_j
    # the log-weights' perturbation); 1 - (e^tau - 1), below it, vanishes at tau = log 2 and
    # made the bound the values' spread on sharp rows (a review: 800-60,000x the error).
    den = (blk.masked(nz.p_lo, 0.0) * exp_down(-tau)).sum(-1, keepdim=True)
    part_w = upper(dev / den.clamp_min(1e-300), 3 * k.shape[1] + 8)
    # Values: |sum p'_j dv_j| <= sum p_j e^{tau_j} |dv_j| / sum p_j e^{-tau_j}.
    part_v = upper((blk.masked(nz.p_up, 0.0) * torch.exp(tau)) @ dv.abs(), 2 * k.shape[1] + 8)
    out = upper(part_w + part_v / den.clamp_min(1e-300), 2)
    out = torch.where((den > 0) & ~torch.isnan(out), out, math.inf)
    # Or the two exact outputs, each certified in float64: where a logit moves by more than
    # a few units (sharp rows) the perturbation lemma's e^tau is far above the change.
    nz_t = normalize(*_logw(target, qt, kt, sc, params), vt, blk)
    both = upper((nz_t.y - nz.y).abs() * (1 + 2 * U64) + nz.eps_y + nz_t.eps_y, 3)
    out = torch.minimum(out, torch.where(torch.isnan(both), math.inf, both))
    # Both outputs are convex combinations of their values: never farther apart than the
    # extremes of the values, stored or given, over the visible keys.
    lo0, hi0 = blk.vrange(v, v)
    lo1, hi1 = blk.vrange(vt, vt)
    return torch.minimum(out, upper(torch.maximum(hi0 - lo1, hi1 - lo0), 1))  # a subtraction


def _linear(blk: Block) -> torch.Tensor:
    """Quantization of linear attention over given features, any signs."""
    from attnprec.analysis.bounds._rows import Normalized

    (q, qt), (k, kt), (v, vt) = blk.q, blk.k, blk.v
    dq, dk, dv = qt - q, kt - k, vt - v
    d, m = q.shape[-1], k.shape[-2]
    w = blk.masked(q @ k.transpose(-1, -2), 0.0)
    aw = blk.masked(q.abs() @ k.abs().transpose(-1, -2), 0.0)
    e_w = upper(gamma(d, U64) * aw + d * 2.0**-1074, 2)
    e = blk.masked(
        dq.abs() @ kt.abs().transpose(-1, -2) + q.abs() @ dk.abs().transpose(-1, -2), 0.0
    )
    e = upper(e * (1 + gamma(d + 2, U64)) + 2 * d * 2.0**-1074, 2)
    e = torch.where(e_w + e == 0, 0.0, e)
    D = w.sum(-1)
    e_D = upper(e_w.sum(-1) + gamma(m, U64) * aw.sum(-1), 4)
    D_lo = D.abs() - e_D  # either sign (normalize_signed)
    ok = D_lo > 0
    Dl = torch.where(ok, D_lo, torch.ones_like(D_lo)).unsqueeze(-1)
    y = (w @ v) / D.unsqueeze(-1)
    # TINY: the products that underflow (w v's, and these), and the quotient y's underflow
    num = e_w @ v.abs() + gamma(m + 1, U64) * (aw @ v.abs()) + y.abs() * e_D.unsqueeze(-1)
    eps_y = upper((num + 4 * TINY) / Dl + 2 * TINY, 8)
    nz = Normalized(w / D.unsqueeze(-1), torch.zeros_like(w), y, eps_y, v, blk.center)
    (dev,) = nz.deviation([e / Dl])
    wt = (w.abs() + e) / Dl
    den = 1 - upper(e.sum(-1, keepdim=True), m + 2) / Dl
    out = upper((dev + wt @ dv.abs() + TINY) / den.clamp_min(1e-300), 2 * m + 9)
    bad = ~ok.unsqueeze(-1) | ~(den > 0)
    return torch.where(bad | torch.isnan(out), math.inf, out)


def log_quantization_state(
    given: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    stored: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    sc: float,
    causal: bool,
    rows: torch.Tensor | None,
) -> torch.Tensor:
    """:func:`quantization` of log attention from per-channel key states
    (:mod:`._state`, ``O((n + rows) d d_v)`` time): ``tau_ij <= a_i + b_j`` (``a_i =
    |scale| max_c |dq_ic|``, ``b_j = |scale| max_c |dk_jc|``), so ``e^tau - 1 <= expm1(a)
    e^b + expm1(b)`` and ``e^-tau >= e^-a e^-b``; the deviations through
    :func:`._state.deviation`. Never below the pair evaluation's bound beyond float64 noise
    (the pairs also take the two certified outputs' difference, within a few ulps of the
    change; the lemma here may land those ulps below it)
    (tests/analysis/bounds/test_state.py). Rows whose float64 states cannot hold their
    terms take the pair evaluation."""
    from attnprec.analysis.bounds import _state

    (q, k, v), (qt, kt, vt) = given, stored
    dv_abs = (vt - v).abs()
    d_v = v.shape[-1]
    C = q.shape[-1]
    a = _scaled(sc, (qt - q).abs().amax(-1, keepdim=True))  # [B, n, 1]
    b = _scaled(sc, (kt - k).abs().amax(-1, keepdim=True))
    Y = sc * k
    fac2 = (torch.expm1(b) * (1 + 4 * U64)).expand_as(Y)
    facm = exp_down(-b).expand_as(Y)
    mu = v.mean(-2, keepdim=True)
    G = _state.value_columns(v, mu, dv_abs)
    gmax = G.abs().amax(-2, keepdim=True)
    peak = torch.cat([Y, v, -v, vt, -vt], -1)
    fac_max = float(fac2.max()) if fac2.numel() else 0.0
    n = k.shape[-2]

    def rows_fn(s: _state.Scan) -> dict[str, torch.Tensor]:
        X, ai = sc * q[:, s.idx], a[:, s.idx]
        r = _state.rows_of(s, X, s.peak[..., :C], mu, gmax, fac_max)
        f0, f2 = torch.expm1(ai).expand_as(X), torch.exp(ai).expand_as(X)
        A = _state.combine(r, [(f0, 0), (f2, 1)], s.S)
        coef = f2.amax(-1, keepdim=True)
        _, (Y_key, fac_key, G_key) = _state.top_key(s, X, [Y, fac2, G])
        w_key = _state.key_weight(r, Y_key, s.m, [(f0, None), (f2, fac_key)])
        dev = _state.deviation(r, A, gmax, coef, (w_key, G_key))
        # both parts over sum_j p_j e^-tau_j (as the pair evaluation's)
        den = torch.einsum("brc,brc->br", r.wn * exp_down(-ai), s.lone[0]).unsqueeze(-1)
        den = den * (1 - r.rho)
        part_w = upper(dev / den.clamp_min(1e-300), 3 * n + 8)
        # values: sum_j p_j e^tau_j |dv_j| / sum_j p_j e^-tau_j
        dvc = slice(1 + 3 * d_v, 1 + 4 * d_v)
        num_v = _state.combine(r, [(f2, 0), (f2, 1)], [S[..., dvc] for S in s.S])
        num_v = num_v * (1 + r.rho) + r.floor * coef * gmax[..., dvc]
        part_v = upper(num_v, 2 * n + 8) / den.clamp_min(1e-300)
        out = upper(part_w + part_v, 2)
        out = torch.where(den > 0, out, math.inf)
        out = torch.where(torch.isnan(out), math.inf, out)
        pk = s.peak[..., C:]
        hi0, lo0, hi1, lo1 = (
            pk[..., :d_v],
            -pk[..., d_v : 2 * d_v],
            pk[..., 2 * d_v : 3 * d_v],
            -pk[..., 3 * d_v :],
        )
        out = torch.minimum(out, upper(torch.maximum(hi0 - lo1, hi1 - lo0), 1))
        return {"q": out, "far": r.far.unsqueeze(-1).expand_as(out)}

    empty = torch.zeros(*Y.shape[:-1], 0, dtype=torch.float64)
    out = _state.scan(Y, [None, fac2], G, [facm], empty, peak, causal, rows, rows_fn)
    res, far = out["q"], out["far"][..., 0]
    if bool(far.any()):
        idx = torch.arange(q.shape[-2]) if rows is None else rows
        sel = far.any(0).nonzero().flatten()
        res[:, sel] = quantization("log", given, stored, sc, causal, idx[sel], {})
    return res


def linear_quantization_state(
    given: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    stored: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    causal: bool,
    rows: torch.Tensor | None,
) -> torch.Tensor:
    """:func:`quantization` of linear attention over given features from feature states
    (:func:`._state.power_sums`, ``O((n + rows) d d_v)`` time): the perturbation ``e_ij =
    |dq_i| . |k~_j| + |q_i| . |dk_j|`` is one dot of ``[|dq_i|, |q_i|]`` with ``[|k~_j|,
    |dk_j|]``, ``|w~_ij| <= |q_i| . |k_j| + e_ij``, the deviations through
    :func:`._state.deviation`; the exact output from the signed states with a certified
    radius. Never below the pair evaluation's bound beyond float64 noise
    (tests/analysis/bounds/test_state.py)."""
    from attnprec.analysis.bounds import _state

    (q, k, v), (qt, kt, vt) = given, stored
    B, n, d = q.shape
    dv = v.shape[-1]
    mu = v.mean(-2, keepdim=True)
    G = _state.value_columns(v, mu, (vt - v).abs())
    Gs = torch.cat([torch.ones_like(v[..., :1]), v - mu], -1)
    gmax = G.abs().amax(-2, keepdim=True)
    qe = torch.cat([(qt - q).abs(), q.abs()], -1)
    ke = torch.cat([kt.abs(), (kt - k).abs()], -1)
    rho = _state.power_rho(n, 2 * d, 2 * d, 1)
    amax = max(float(qe.max()), float(ke.max()), float(k.abs().max())) if q.numel() else 0.0
    # the states' underflow, and the pairs' own: 2 d 2^-1074 per perturbation e_ij
    floor = _state.power_floor(n, 2 * d, 2 * d, 1, amax, amax) + 4 * d * n * 2.0**-1074
    rel = rho + gamma(8, U64)

    def rows_fn(idx: torch.Tensor, P: list[dict[int, torch.Tensor]]) -> dict[str, torch.Tensor]:
        (sg,), (ab,), (pe,) = (x.values() for x in P)
        D, Nc = sg[..., :1], sg[..., 1:]
        M1, MV = ab[..., :1], ab[..., 1 : 1 + dv]
        e_D = upper(rel * (1 + rho) * M1 + floor, 4)
        D_lo = D.abs() - e_D  # either sign (normalize_signed)
        pos = D_lo > 0
        Dl = torch.where(pos, D_lo, torch.ones_like(D_lo))
        yc = Nc / D
        y = mu + yc
        e_N = upper(rel * (1 + rho) * MV + floor * gmax[..., 1 : 1 + dv], 4)
        # (TINY: yc and the radius' product and quotient below the normal range)
        eps_y = upper(
            (e_N + yc.abs() * e_D + TINY) / Dl + 2 * U64 * (yc.abs() + y.abs()) + 2 * TINY, 8
        )
        r = _state.Rows(
            torch.empty(0), y, eps_y, yc, torch.empty(0), torch.full_like(Dl, rel),
            floor, torch.zeros(B, idx.numel(), dtype=torch.bool),
        )  # fmt: skip
        # e_ij (1 + gamma_{d+2}) relative to the normalizer's lower bound (its 2d 2^-1074
        # in the floor)
        E = upper(pe * (1 + gamma(d + 2, U64)), 2) / Dl
        coef = (1 + gamma(d + 4, U64)) / Dl
        dev = _state.deviation(r, E, gmax, coef)
        e_up = E * (1 + rel) + floor * coef * gmax
        dvc = slice(1 + 3 * dv, 1 + 4 * dv)
        wt = upper(ab[..., dvc] * (1 + rel) + floor * gmax[..., dvc], 2) / Dl + e_up[..., dvc]
        den = 1 - upper(e_up[..., :1], n + 2)
        out = upper((dev + wt) / den.clamp_min(1e-300), 2 * n + 8)
        bad = ~pos | ~(den > 0)
        return {"q": torch.where(bad | torch.isnan(out), math.inf, out)}

    fams = [(q, k, Gs), (q.abs(), k.abs(), G), (qe, ke, G)]
    return _state.power_sums(fams, [1], causal, rows, rows_fn)["q"]
