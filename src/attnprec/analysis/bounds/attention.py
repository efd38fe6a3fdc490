"""``attention_error_bound``: input quantization + approximation + rounding, per element.

For a kernel that stores q, k, v in ``precision.storage`` and computes ``method``, the
computed output ŷ and the exact target y* (the method itself, or ``target``: softmax for
taylor / polynomial / favor, the exact semiring form for linearized semirings) satisfy

    |ŷ - y*(q, k, v)| <= |y*(q̃, k̃, ṽ) - y*(q, k, v)|      quantization (q̃ = q in storage)
                      + |y_method(q̃..) - y*(q̃..)|          approximation
                      + |ŷ - y_method(q̃..)|                rounding

(docs/bounds/attention.md). Normalized methods with positive weights share one lemma: if
every weight is perturbed as w'_j = w_j (1 + a_j) + b_j with |a_j| <= A_j, then with
p_j = w_j / sum w and y = sum p_j v_j,

    |y' - y| <= (sum_j p_j A_j |v_j - y| + sum_j |b_j| |v_j - y| / W) / (sum_j p_j (1 - A_j) - ...),

since sum_j w_j (v_j - y) = 0 (the first-order-free weight-perturbation bound). p and y are
evaluated in float64 with certified error radii (``_Normalized``), so every bound here is
rigorous, not first-order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from attnprec._validate import (
    broadcast_shapes,
    check_finite,
    check_float,
    check_int,
    check_qkv,
    resolve_scale,
)
from attnprec.analysis.bounds.rounding import (
    U64,
    dot_gamma,
    exp_rel,
    gamma,
    hm_lambda,
    lse_bound,
    probabilistic_gamma,
    softmax_bound,
    store_error,
    sum_gamma,
    upper,
)
from attnprec.attention._common import DEFAULT_CHUNK

__all__ = ["ErrorBound", "attention_error_bound", "METHODS"]

METHODS = ("softmax", "log", "taylor", "polynomial", "linear", "favor", "semiring", "gated")


@dataclass(frozen=True)
class ErrorBound:
    """Per-element error bound and its parts (float64 tensors ``[..., n_q, d_v]``).

    ``total = quantization + approximation + rounding`` (rounded upward). ``confidence`` is
    None for a deterministic bound, else the probability with which it holds.
    """

    total: torch.Tensor
    quantization: torch.Tensor
    approximation: torch.Tensor
    rounding: torch.Tensor
    confidence: float | None = None


# ---------------------------------------------------------------------------------------------
# Normalized weights in float64 with certified radii.


@dataclass(frozen=True)
class _Normalized:
    """p̂ (float64 normalized weights) with |p - p̂| <= pi, ŷ = p̂ v with |y - ŷ| <= eps_y."""

    p: torch.Tensor
    pi: torch.Tensor
    y: torch.Tensor
    eps_y: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None

    def dev(self) -> torch.Tensor:
        """Upper bound on |v_j - y_i|: ``[..., n_q, n_k, d_v]``."""
        c = self.v.unsqueeze(-3) - self.y.unsqueeze(-2)
        return upper(c.abs() + self.eps_y.unsqueeze(-2), 2)

    def perturbed(self, A: torch.Tensor, babs: torch.Tensor | float = 0.0) -> torch.Tensor:
        """Bound on |y' - y| for w'_j = w_j (1 + a_j) + b_j, |a_j| <= A_j, |b_j| / W <= babs."""
        p_up = self.p + self.pi
        dev = self.dev()
        live = torch.ones_like(self.p) if self.mask is None else self.mask.to(self.p.dtype)
        num = ((p_up * A).unsqueeze(-1) * dev).sum(-2) + babs * (live.unsqueeze(-1) * dev).sum(-2)
        den = ((self.p - self.pi).clamp_min(0.0) * (1.0 - A).clamp_min(0.0)).sum(-1)
        den = den - babs * live.sum(-1)
        n = self.p.shape[-1]
        out = upper(num / den.clamp_min(1e-300).unsqueeze(-1), 3 * n + 8)
        return torch.where(den.unsqueeze(-1) > 0, out, torch.full_like(out, math.inf))


def _causal_mask(n_q: int, n_k: int, causal: bool) -> torch.Tensor | None:
    return torch.ones(n_q, n_k, dtype=torch.bool).tril() if causal else None


def _normalize(logw: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor, mask) -> _Normalized:  # type: ignore[no-untyped-def]
    """Softmax of float64 log-weights ``logw`` known to within ``sigma`` of the exact ones."""
    if mask is not None:
        logw = logw.masked_fill(~mask, -math.inf)
        sigma = sigma.masked_fill(~mask, 0.0)
    m = logw.amax(-1, keepdim=True)
    e = torch.exp(logw - m)
    p = e / e.sum(-1, keepdim=True)
    pb = softmax_bound(logw, U64, min_normal=2.0**-1022)
    smax = sigma.amax(-1, keepdim=True)
    pi = upper(pb + (p + pb) * torch.expm1(sigma + smax), 6)
    n = logw.shape[-1]
    y = p @ v
    eps_y = upper(pi @ v.abs() + gamma(n + 1, U64) * (p @ v.abs()), 2 * n + 4)
    return _Normalized(p, pi, y, eps_y, v, mask)


def _logits64(q: torch.Tensor, k: torch.Tensor, sc: float) -> tuple[torch.Tensor, torch.Tensor]:
    """s = sc q.k in float64 and a bound on its error (any summation order)."""
    d = q.shape[-1]
    x = sc * (q @ k.transpose(-1, -2))
    absdot = q.abs() @ k.abs().transpose(-1, -2)
    sig = upper(abs(sc) * gamma(d + 1, U64) * absdot + U64 * x.abs() / (1 - U64), d + 4)
    return x, sig


def _check_terms(semiring: Any) -> tuple[tuple[float, float], ...]:
    terms = getattr(semiring, "terms", None)
    if terms is None:
        raise TypeError(f"semiring: expected a Semiring, got {type(semiring).__name__}")
    return tuple((float(c), float(lam)) for c, lam in terms)


def _mixture_logw(
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


# ---------------------------------------------------------------------------------------------
# Quantization: sensitivity of the exact target to rounding q, k, v to storage.


def _quantization(
    target: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    qt: torch.Tensor,
    kt: torch.Tensor,
    vt: torch.Tensor,
    sc: float,
    mask: torch.Tensor | None,
    params: dict[str, Any],
) -> torch.Tensor:
    dq, dk, dv = qt - q, kt - k, vt - v  # exact in float64 (Sterbenz, or q̃ = 0)
    d = q.shape[-1]
    if target == "gated":
        return _gated_quantization(q, k, v, qt, kt, vt, sc, params["log_g"])
    if target in ("softmax", "semiring"):
        ds = sc * (dq @ kt.transpose(-1, -2) + q @ dk.transpose(-1, -2))
        mag = abs(sc) * (
            dq.abs() @ kt.abs().transpose(-1, -2) + q.abs() @ dk.abs().transpose(-1, -2)
        )
        tau = upper(ds.abs() + gamma(2 * d + 2, U64) * mag, 4)
        s, sig = _logits64(q, k, sc)
        if target == "semiring":
            terms = _check_terms(params["semiring"])
            tau = tau * max(abs(lam) for _, lam in terms)
            logw, sig = _mixture_logw(s, sig, terms)
        else:
            logw = s
    elif target == "log":
        tau = sc * (dq.abs().unsqueeze(-2) + dk.abs().unsqueeze(-3)).amax(-1)
        lw = sc * (q.unsqueeze(-2) + k.unsqueeze(-3))
        logw = torch.logsumexp(lw, -1)
        sig = lse_bound(lw, U64, min_normal=2.0**-1022) + 2 * U64 * lw.abs().amax(-1)
        tau = upper(tau, 3)
    elif target == "linear":
        # The kernel's linear attention runs over given features q, k (docs/kernels.md).
        if params.get("feature_map") is not None:
            raise ValueError(
                "feature_map: the linear kernel takes given features; pass phi(q), phi(k) "
                "as q, k with feature_map=None"
            )
        if not (bool((dq == 0).all()) and bool((dk == 0).all())):
            if not (bool((q > 0).all()) and bool((k > 0).all())):
                raise ValueError("q, k: features must be > 0 to bound their quantization")
        w = q @ k.transpose(-1, -2)
        if not bool((w > 0).all()):
            raise ValueError("q, k: linear attention needs positive weights phi(q).phi(k)")
        # |log q̃_c - log q_c| per channel; 0 where exact, inf where q̃_c underflowed to 0.
        lq = torch.where(dq == 0, 0.0, (torch.log(qt) - torch.log(q)).abs())
        lk = torch.where(dk == 0, 0.0, (torch.log(kt) - torch.log(k)).abs())
        tau = upper((lq.unsqueeze(-2) + lk.unsqueeze(-3)).amax(-1) + 8 * U64, 3)
        logw = torch.log(w)
        sig = torch.full_like(logw, 2.0 * gamma(d + 2, U64))
    else:
        raise ValueError(f"target: no quantization bound for {target!r}")
    nz = _normalize(logw, sig, v, mask)
    if mask is not None:
        tau = tau.masked_fill(~mask, 0.0)
    part_w = nz.perturbed(torch.expm1(tau))
    # Values: |sum p'_j dv_j| <= sum p_j e^{tau_j} |dv_j| / sum p_j e^{-tau_j}.
    p_up = nz.p + nz.pi
    den = ((nz.p - nz.pi).clamp_min(0.0) * torch.exp(-tau)).sum(-1, keepdim=True)
    part_v = upper(((p_up * torch.exp(tau)) @ dv.abs()) / den, 2 * q.shape[-2] + 8)
    out = upper(part_w + part_v, 2)
    # Inputs are finite here, so NaN comes only from an unbounded weight perturbation
    # (tau = inf: a stored feature rounded to 0) meeting 0 (inf * 0, 0 / 0): no finite bound.
    return torch.where(torch.isnan(out), math.inf, out)


def _gated_decays(log_g: torch.Tensor, n: int, d_k: int) -> torch.Tensor:
    """Exact-ish decays D[t, j, c] = exp(sum_{j<l<=t} log g_lc) (j <= t), 0 above, float64."""
    lg = log_g.double()
    if not (lg.dim() >= 2 and tuple(lg.shape[-2:]) == (n, d_k)):
        lg = lg.unsqueeze(-1).expand(*lg.shape, d_k)
    ones = torch.ones(n, n, dtype=torch.bool)
    span = torch.where(ones.tril(-1).unsqueeze(-1), lg.unsqueeze(-2), 0.0).cumsum(-3)
    return torch.where(ones.tril().unsqueeze(-1), span, -math.inf)  # log D


def _gated_quantization(q, k, v, qt, kt, vt, sc, log_g):  # type: ignore[no-untyped-def]
    n, d_k = q.shape[-2:]
    logD = _gated_decays(log_g, n, d_k)
    D = torch.exp(logD)
    dqk = (qt.unsqueeze(-2) * kt.unsqueeze(-3) - q.unsqueeze(-2) * k.unsqueeze(-3)).abs()
    Dup = torch.exp(logD * (1 - gamma(n, U64))) * (1 + 4 * U64)
    a = abs(sc) * (dqk * Dup).sum(-1) @ vt.abs()
    wq = (q.unsqueeze(-2) * k.unsqueeze(-3) * D).sum(-1)
    b = abs(sc) * wq.abs() @ (vt - v).abs()
    return upper(a + b * (1 + gamma(d_k + 4, U64)), 2 * n + d_k + 8)


# ---------------------------------------------------------------------------------------------
# Rounding of the graphs modelled here: softmax / exact semiring, and gated.


def _gammas(precision: Any, n_k: int, d_k: int, delta: float | None, dots: int, block):  # type: ignore[no-untyped-def]
    """(g_logit, g_num, g_den): deterministic, or Higham-Mary with failure delta over dots."""
    ua = precision.accumulate.u
    order = "blocked" if block else "recursive"
    if delta is None:
        return (
            dot_gamma(d_k, ua),
            dot_gamma(n_k, ua, order, block),
            sum_gamma(n_k, ua, order, block),
        )
    each = delta / max(dots, 1)

    def prob(n: int, det: float) -> float:
        # The worst-case constant always holds: keep the smaller of the two.
        return min(det, probabilistic_gamma(n, ua, hm_lambda(n, ua, each)))

    return (
        prob(d_k + 1, dot_gamma(d_k, ua)),
        prob(n_k + 1, dot_gamma(n_k, ua, order, block)),
        prob(n_k, sum_gamma(n_k, ua, order, block)),
    )


def _mixture_rounding(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    precision: Any,
    sc: float,
    mask: torch.Tensor | None,
    terms: tuple[tuple[float, float], ...],
    delta: float | None,
    block: int | None,
    graph: str,
) -> torch.Tensor:
    """Rounding bound of the softmax / exact-semiring graph (docs/bounds/attention.md).

    logits = fl(fl(q * scale) @ k^T); per term l_r = fl(log c_r + fl(lam_r logits))
    (semiring only); shift by the computed maximum, exp, sum over terms, w @ v and w.sum in
    ``accumulate`` (blocked by ``block`` keys), one division, one store.
    """
    fc, fs = precision.compute, precision.storage
    uc = fc.u
    eta_c = fc.min_subnormal / 2
    eta_a = precision.accumulate.min_subnormal / 2
    n_q, n_k, d_k = q.shape[-2], k.shape[-2], q.shape[-1]
    # Loading from storage to compute: exact when compute holds storage, else one rounding.
    wide = fc.precision >= fs.precision and fc.emax >= fs.emax and fc.emin <= fs.emin
    ul, el = (0.0, 0.0) if wide else (uc, eta_c)
    Q, K = q.abs() * (1 + ul) + el, k.abs() * (1 + ul) + el
    dvl = v.abs() * ul + el
    batch = int(broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2]).numel())
    dots = batch * n_q * (n_k + v.shape[-1] + 1)
    g_l, g_n, g_s = _gammas(precision, n_k, d_k, delta, dots, block)
    QK = Q @ K.transpose(-1, -2)
    exact_mag = q.abs() @ k.abs().transpose(-1, -2)
    sigma = abs(sc) * (((1 + uc) * (1 + g_l) - 1) * QK + (QK - exact_mag))
    sigma = sigma + eta_c * (1 + g_l) * K.sum(-1).unsqueeze(-2) + (d_k + 1) * eta_a
    s, sig64 = _logits64(q, k, sc)
    sigma = upper(sigma, 2 * d_k + 8)
    s_abs = s.abs() + sig64 + sigma
    if graph == "softmax":
        lt_abs = s_abs.unsqueeze(-1)
        sig_t = sigma.unsqueeze(-1)
    else:
        lam = torch.tensor([lam for _, lam in terms], dtype=torch.float64)
        logc = torch.tensor([abs(math.log(c)) for c, _ in terms], dtype=torch.float64)
        lt_abs = lam.abs() * s_abs.unsqueeze(-1) + logc
        sig_t = (
            lam.abs() * sigma.unsqueeze(-1)
            + gamma(2, uc) * lam.abs() * s_abs.unsqueeze(-1)
            + gamma(3, uc) * logc
            + uc * lt_abs
        )
    # |d̂| = |l̂ - M̂| <= (max l - l) + the errors of both; the shift rounds u |d̂|.
    logw, sigw = _mixture_logw(s, sig64, terms)
    if graph == "softmax":
        lt64 = s.unsqueeze(-1)
    else:
        lt64 = torch.stack([math.log(c) + lam_ * s for c, lam_ in terms], dim=-1)
    if mask is not None:
        lt64 = lt64.masked_fill(~mask.unsqueeze(-1), -math.inf)
    top = lt64.amax((-1, -2), keepdim=True)
    smax = sig_t.amax((-1, -2), keepdim=True)
    D = (top - lt64) + sig_t + smax + 4 * U64 * lt_abs
    D = torch.where(torch.isinf(D), 0.0, D)
    a_t = (1 + exp_rel(D, uc)) * torch.exp(sig_t + uc * D / (1 - uc)) - 1
    R = len(terms)
    A = (1 + a_t.amax(-1)) * (1 + gamma(max(R - 1, 0), uc)) - 1
    beta_w = R * fc.min_normal * math.exp(float(smax.max()))  # |b_j| / W, W >= e^{-smax}
    if mask is not None:
        A = A.masked_fill(~mask, 0.0)
    nz = _normalize(logw, sigw, v, mask)
    eta_w = (n_k + 1) * eta_a * math.exp(float(smax.max()))  # sum underflow, relative to W
    return _quotient_rounding(nz, A, beta_w, g_n, g_s, dvl, eta_w, precision)


def _quotient_rounding(
    nz: _Normalized,
    A: torch.Tensor,
    beta_w: float,
    g_n: float,
    g_s: float,
    dvl: torch.Tensor,
    eta_w: float,
    precision: Any,
) -> torch.Tensor:
    """|ŷ - y| for ŷ = fl(N̂ / Ŝ) stored, N̂ and Ŝ sums of perturbed weights (attention.md).

    Weights w'_j = w_j (1 + a_j) + b_j (|a_j| <= A_j, |b_j| / W <= beta_w) give y' (the
    lemma); the numerator and normalizer sums add relative g_n, g_s of their moduli, the
    loaded values ``dvl`` (|ṽ - v|) and an absolute ``eta_w`` W (underflow) each; then one
    division in compute and the store.
    """
    fc, fs = precision.compute, precision.storage
    uc = fc.u
    part_w = nz.perturbed(A, beta_w)
    live = torch.ones_like(nz.p) if nz.mask is None else nz.mask.to(torch.float64)
    ehat = (nz.p + nz.pi) * (1 + A) + beta_w * live
    den = ((nz.p - nz.pi).clamp_min(0.0) * (1 - A)).sum(-1) - beta_w * live.sum(-1)
    den = den - g_s * ehat.sum(-1) - eta_w
    y_abs = nz.y.abs() + nz.eps_y
    yp_abs = y_abs + part_w  # |y'|
    e_sum = g_n * (ehat @ (nz.v.abs() + dvl)) + ehat @ dvl + eta_w * (1 + yp_abs)
    e_sum = e_sum + yp_abs * g_s * ehat.sum(-1, keepdim=True)
    n_k = nz.p.shape[-1]
    e_div = part_w + upper(e_sum / den.clamp_min(1e-300).unsqueeze(-1), 3 * n_k + 8)
    e_div = torch.where(den.unsqueeze(-1) > 0, e_div, torch.full_like(e_div, math.inf))
    e1 = upper(e_div + uc * (y_abs + e_div) + fc.min_subnormal / 2, 4)
    return upper(e1 + store_error(y_abs + e1, fs, precision.rounding), 2)


def _gated_rounding(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    precision: Any,
    sc: float,
    log_g: torch.Tensor,
    chunk_size: int,
    delta: float | None,
) -> torch.Tensor:
    """Rounding bound of gated linear attention's chunked graph (attention/gated.py).

    Every contribution q_tc D_tjc k_jc v_j passes through at most K = ceil(n/C) + 2 exp
    factors (each of a cumulative sum of <= C log-gates: exponent error gamma_{C+1} |log D|
    over the partition of its span) and gamma_{d_k + n + 2K + 4} of products and sums; then
    the scale and the store.
    """
    fc, fs = precision.compute, precision.storage
    uc = precision.compute.u
    n, d_k = q.shape[-2:]
    C = min(chunk_size, n)
    K = math.ceil(n / C) + 2
    logD = _gated_decays(log_g, n, d_k)
    g_e = gamma(C + 1, uc)
    Dup = torch.exp(logD * (1 - g_e - gamma(n, U64))) * (1 + 4 * U64)  # decay incl. exp-arg error
    rel_exp = (1 + exp_rel(0.0, uc)) ** K
    depth = d_k + n + 2 * K + 4
    g = gamma(depth, precision.accumulate.u)
    if delta is not None:
        dots = int(q.shape[:-2].numel()) * n * v.shape[-1]
        ua = precision.accumulate.u
        g = min(g, probabilistic_gamma(depth, ua, hm_lambda(depth, ua, delta / dots)))
    aqk = q.abs().unsqueeze(-2) * k.abs().unsqueeze(-3)
    mag = abs(sc) * ((aqk * Dup).sum(-1) @ v.abs())
    mag0 = abs(sc) * ((aqk * torch.exp(logD)).sum(-1) @ v.abs())
    o = sc * ((q.unsqueeze(-2) * k.unsqueeze(-3) * torch.exp(logD)).sum(-1) @ v)
    eps = rel_exp * (1 + g) * (1 + uc) - 1
    # sum |q||k| |v| (Dup F - D) = (F - 1) mag + (mag - mag0), the difference evaluated safely.
    diff = (mag - mag0).clamp_min(0.0) + gamma(2 * n * d_k + 8, U64) * (mag + mag0)
    e1 = upper(eps * mag + diff + (n * d_k + 2) * 2 * fc.min_subnormal, 8)
    return upper(
        e1 + store_error(o.abs() + e1 + gamma(n * d_k, U64) * mag, fs, precision.rounding), 2
    )


def _favor_exponents(
    x: torch.Tensor, W: torch.Tensor, sc: float, precision: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """t = W x' - |x'|^2/2 - log(m)/2 (x' = sqrt(scale) x) in float64, and a bound E on both
    |t - t64| and |t - t̂| (t̂ computed as attention/favor.py does, in ``compute``).

    t̂: x loaded (one rounding unless compute holds storage), sqrt(scale) and W rounded to
    compute, x' one product, the dot (depth d - 1 plus a product), |x'|^2 (squares and
    sum), the constant, two subtractions: gamma_{d+8} of the moduli M (gamma_{d+10} when
    the load rounds), plus one underflow per product.
    """
    fc, fs = precision.compute, precision.storage
    d, m = x.shape[-1], W.shape[0]
    rs = math.sqrt(sc)
    t = rs * (x @ W.T) - (sc / 2) * (x * x).sum(-1, keepdim=True) - math.log(m) / 2
    M = rs * (x.abs() @ W.abs().T) + (sc / 2) * (x * x).sum(-1, keepdim=True) + math.log(m) / 2
    wide = fc.precision >= fs.precision and fc.emax >= fs.emax and fc.emin <= fs.emin
    n_r = d + 8 + (0 if wide else 2)
    E = (gamma(n_r, fc.u) + gamma(2 * d + 8, U64)) * M + (4 * d + 4) * fc.min_subnormal
    return t, upper(E, d + 8)


def _favor_rounding(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    precision: Any,
    sc: float,
    mask: torch.Tensor | None,
    W: torch.Tensor,
    chunk_size: int,
    delta: float | None,
) -> torch.Tensor:
    """Rounding bound of favor_attention's graph (attention/favor.py, attention/_feature.py).

    Features: t̂ (:func:`_favor_exponents`); queries exp(fl(t̂ - max_f t̂)); keys
    exp(fl(t̂ - a_j)) exp(fl(a_j - shift)) (a_j = max_f t̂_jf) and at most
    ceil(n_k / chunk) - 1 state rescalings exp(fl(shift - shift')), whose arguments
    telescope to at most the spread of a. Row and state shifts cancel in the quotient, so
    each weight phi_q.phi_k carries the relative error (1 + e_q)(1 + e_k) - 1 of its
    feature products plus an absolute underflow term; the sums (depth
    m + n_k + 2 ceil(n_k / chunk) + 4 per term) and the quotient then follow
    :func:`_quotient_rounding`. With ``delta`` the sums' constant is Higham-Mary's with
    failure ``delta`` over the ``batch n_q (d_v + 1)`` sums (the feature exponents stay
    worst-case).
    """
    fc, fs = precision.compute, precision.storage
    uc, ua = fc.u, precision.accumulate.u
    n_k, m = k.shape[-2], W.shape[0]
    nch = math.ceil(n_k / chunk_size)
    tq, Eq = _favor_exponents(q, W, sc, precision)
    tk, Ek = _favor_exponents(k, W, sc, precision)
    er = exp_rel(0.0, uc)

    def shift_err(t: torch.Tensor, E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # exp(fl(t̂ - max t̂)): argument error E + u |t̂ - max t̂| relative to exp(t - max t̂).
        top, Emax = t.amax(-1, keepdim=True), E.amax(-1, keepdim=True)
        D = (top - t) + 2 * E + 2 * Emax
        e = (1 + er) * torch.exp(E + uc * D) - 1
        return upper(e.amax(-1), 8), top.squeeze(-1)

    eq, aq = shift_err(tq, Eq)
    ek, ak = shift_err(tk, Ek)
    Ekmax = Ek.amax(-1)
    spread = (ak.amax(-1, keepdim=True) - ak) + 2 * Ekmax + 2 * Ekmax.amax(-1, keepdim=True)
    spread = spread.amax(-1, keepdim=True)
    ek = (1 + ek) * (1 + er) ** nch * (1 + uc) * torch.exp(2 * uc * spread) - 1
    A = upper((1 + eq).unsqueeze(-1) * (1 + ek).unsqueeze(-2) - 1, 4 + nch)
    # Exact weights (unshifted), float64: log w_ij = logsumexp_f(t_qif + t_kjf).
    lt = tq.unsqueeze(-2) + tk.unsqueeze(-3)
    logw = torch.logsumexp(lt, -1)
    sig = Eq.amax(-1).unsqueeze(-1) + Ekmax.unsqueeze(-2)
    sig = upper(sig + lse_bound(lt, U64, min_normal=2.0**-1022) + 2 * U64 * lt.abs().amax(-1), 8)
    # W_i in the graph's units exp(-(max_f t̂_qif + shift)), shift <= max over all keys.
    Eqmax = Eq.amax(-1)
    lw = logw if mask is None else logw.masked_fill(~mask, -math.inf)
    log_wlo = (lw - sig).amax(-1) - aq - 2 * Eqmax - (ak + 2 * Ekmax).amax(-1, keepdim=True)
    w_lo = float(torch.exp(log_wlo).amin()) * (1 - 4 * U64)
    # Underflow: a query feature (<= 1) off by min_normal, a key feature by one per
    # exp and product on its path; m products per weight, m n_k + m + n_k sum terms.
    tiny = fc.min_normal
    bq, bk = tiny, (nch + 2) * tiny
    beta = m * ((bq + bk) * (1 + 4 * uc) ** (nch + 2) + bq * bk)
    eta_sum = (2 * m * n_k + m + n_k) * precision.accumulate.min_subnormal
    beta_w = math.inf if w_lo <= 0 else beta / w_lo
    eta_w = math.inf if w_lo <= 0 else eta_sum / w_lo
    wide = fc.precision >= fs.precision and fc.emax >= fs.emax and fc.emin <= fs.emin
    dvl = v.abs() * uc + fc.min_subnormal / 2 if not wide else torch.zeros_like(v)
    depth = m + n_k + 2 * nch + 4
    g = gamma(depth, ua)
    if delta is not None:
        dots = int(broadcast_shapes(q.shape[:-2], v.shape[:-2]).numel())
        dots *= q.shape[-2] * (v.shape[-1] + 1)
        g = min(g, probabilistic_gamma(depth, ua, hm_lambda(depth, ua, delta / dots)))
    nz = _normalize(logw, sig, v, mask)
    if mask is not None:
        A = A.masked_fill(~mask, 0.0)
    out = _quotient_rounding(nz, A, beta_w, g, g, dvl, eta_w, precision)
    # Features are <= 1 (up to rounding): the sums are at most m n_k max|v| (1 + g).
    vmax = float((v.abs() + dvl).amax()) if v.numel() else 0.0
    big = m * n_k * max(vmax, 1.0) * (1 + 4 * uc) ** (nch + 2) * (1 + g)
    return out if big < precision.accumulate.max / 2 else torch.full_like(out, math.inf)


# ---------------------------------------------------------------------------------------------


def _favor_projection(params: dict[str, Any], d_k: int) -> torch.Tensor:
    """The required ``projection`` W [m, d_k] (float64), checked against ``num_features``."""
    from attnprec.attention.favor import resolve_projection

    if params.get("projection") is None:
        raise ValueError(
            "projection: FAVOR+ needs the projection W [m, d_k] the kernel uses "
            "(attention.favor_projection) to bound its approximation and its features"
        )
    W = resolve_projection(
        params.get("num_features"), params["projection"], d_k, True, None, torch.float64
    )
    return W


def _approximation(
    method: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sc: float,
    causal: bool,
    delta: float | None,
    params: dict[str, Any],
) -> torch.Tensor:
    from attnprec.analysis.bounds.favor import favor_projection_error_bound, mixture_error_bound
    from attnprec.analysis.bounds.minimax import polynomial_error_bound
    from attnprec.analysis.bounds.semiring import semiring_taylor_error_bound
    from attnprec.analysis.bounds.taylor import taylor_error_bound

    if method == "taylor":
        return taylor_error_bound(q, k, v, params["degree"], causal=causal, scale=sc)
    if method == "polynomial":
        c = params["coeffs"]
        c = c if isinstance(c, torch.Tensor) else torch.tensor(c, dtype=torch.float64)
        return polynomial_error_bound(q, k, v, c, causal=causal, scale=sc)
    if method == "favor":
        return favor_projection_error_bound(q, k, v, params["projection"], causal=causal, scale=sc)
    if method == "semiring":
        lin = params.get("linearize")
        if lin is None:
            return torch.zeros_like(v[..., :1, :].expand(*v.shape[:-2], q.shape[-2], v.shape[-1]))
        kind, n = lin
        sr = params["semiring"]
        if kind == "taylor":
            return semiring_taylor_error_bound(q, k, v, sr, n, causal=causal, scale=sc)
        if delta is None:
            raise ValueError("confidence: a FAVOR+-linearized semiring needs confidence=")
        return mixture_error_bound(q, k, v, _check_terms(sr), n, delta, causal=causal, scale=sc)
    raise ValueError(f"method: expected one of {METHODS}, got {method!r}")


_TARGETS = {
    "softmax": "softmax",
    "log": "log",
    "linear": "linear",
    "gated": "gated",
    "taylor": "softmax",
    "polynomial": "softmax",
    "favor": "softmax",
    "semiring": "semiring",
}


def attention_error_bound(
    method: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    precision: Any,
    *,
    causal: bool = False,
    scale: float | None = None,
    confidence: float | None = None,
    block: int | None = None,
    target: str | None = None,
    **params: Any,
) -> ErrorBound:
    """Bound |kernel output - exact target output| per element, split into its sources.

    Parameters
    ----------
    method : str
        One of ``"softmax" "log" "taylor" "polynomial" "linear" "favor" "semiring"
        "gated"``.
    q, k, v : torch.Tensor
        The inputs as the user holds them (any float dtype, taken as exact values); the
        kernel is assumed to see them rounded to ``precision.storage``.
    precision : Precision
        Where the kernel rounds (storage, compute, accumulate, store rounding mode).
    causal, scale
        As in the attention methods.
    confidence : float, optional
        None: a deterministic (worst-case) bound. A probability in (0, 1): the bound holds
        with at least this probability, using the Higham-Mary probabilistic constants for
        sums (a model: independent mean-zero rounding errors) and, for random features,
        Chebyshev over the projection; the failure probability is split evenly.
    block : int, optional
        Keys per block of the accumulation (blocked summation); None: any order.
    target : str, optional
        The exact method the approximation is measured against (softmax for taylor,
        polynomial and favor; "semiring" for linearized semirings); must match if given.
    **params
        The method's own keywords (degree, coeffs, semiring, linearize, log_g, chunk_size).
        ``"linear"`` is the kernel over given features: pass phi(q), phi(k) as q, k
        (positive; ``feature_map`` absent or None). ``"favor"`` needs ``projection=W``
        (the W given to ``favor_attention``; ``num_features`` must match its rows if
        given) and takes ``chunk_size``; its approximation is the deterministic
        fixed-projection bound :func:`.favor.favor_projection_error_bound` whatever
        ``confidence``; with ``confidence`` its rounding part takes the Higham-Mary
        constant for the sums (the feature exponents stay worst-case).

    Returns
    -------
    ErrorBound
        ``quantization``: |y*(q̃, k̃, ṽ) - y*(q, k, v)| by the first-order-free weight
        perturbation lemma (module docstring); ``approximation``: the a-posteriori Taylor /
        polynomial / FAVOR+ bounds (:mod:`.taylor`, :mod:`.minimax`, :mod:`.favor`,
        :mod:`.semiring`); ``rounding``: the graph bound (:mod:`.graphs` for the kernels'
        methods, this module for softmax, exact semirings and gated). Guarantee:
        |ŷ - y*| <= total elementwise, deterministically (or with probability
        ``confidence``), under the documented exp/log ulp model. Evaluated on the CPU for
        inputs on any device; the parts are returned on ``q``'s device.
    """
    from attnprec.analysis.precision import Precision, round_to

    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if not isinstance(precision, Precision):
        raise TypeError(f"precision: expected a Precision, got {type(precision).__name__}")
    tgt = _TARGETS[method]
    if target is not None and target != tgt:
        raise ValueError(f"target: method {method!r} is measured against {tgt!r}, got {target!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    n_q, n_k, d_k, d_v = check_qkv(q, k, v, causal)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_finite(name, t)
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
        raise ValueError(f"block: expected a positive integer, got {block!r}")
    delta: float | None = None
    if confidence is not None:
        if not (0.0 < confidence < 1.0):
            raise ValueError(f"confidence: expected a probability in (0, 1), got {confidence!r}")
        delta = 1.0 - float(confidence)
    if method == "semiring" and params.get("linearize") is not None:
        tgt = "semiring"
    if method == "linear" and scale is not None:
        raise ValueError("scale: linear attention has no scale; pass scale=None")
    default_scale = 1.0 if method in ("log", "linear") else None
    sc = resolve_scale(scale, d_k, default_scale)
    # Bounds are evaluated on the CPU (float64, the ulp models of docs/bounds) and returned
    # on q's device.
    device = q.device
    q64, k64, v64 = (x.to(device="cpu", dtype=torch.float64) for x in (q, k, v))
    params = {key: val.cpu() if isinstance(val, torch.Tensor) else val
              for key, val in params.items()}  # fmt: skip
    fs = precision.storage
    qt, kt, vt = (round_to(x, fs) for x in (q64, k64, v64))
    for name, x in (("q", qt), ("k", kt), ("v", vt)):
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name}: overflows the storage format {fs.name}")
    mask = _causal_mask(n_q, n_k, causal)
    if method == "favor":
        if sc < 0:
            raise ValueError(f"scale: FAVOR+ features need scale >= 0, got {sc}")
        params = dict(params)
        params["projection"] = _favor_projection(params, d_k)
    if method == "gated":
        if "log_g" not in params:
            raise ValueError("log_g: required for gated attention")
        check_float("log_g", params["log_g"])
        if not causal:
            raise ValueError("causal: gated attention is causal only; pass causal=True")
    quant = _quantization(tgt, q64, k64, v64, qt, kt, vt, sc, mask, params)
    d_half = None if delta is None else delta / 2
    if method in ("softmax", "log", "linear", "gated") or (
        method == "semiring" and params.get("linearize") is None
    ):
        approx = torch.zeros_like(quant)
    else:
        approx = _approximation(method, qt, kt, vt, sc, causal, d_half, params)
    if method == "softmax":
        rnd = _mixture_rounding(
            qt, kt, vt, precision, sc, mask, ((1.0, 1.0),), d_half, block, "softmax"
        )
    elif method == "semiring" and params.get("linearize") is None:
        sr = params["semiring"]
        if not sr.terms:
            raise ValueError("semiring: Tropical has no rounding bound here (ties can flip)")
        rnd = _mixture_rounding(
            qt, kt, vt, precision, sc, mask, _check_terms(sr), d_half, block, "semiring"
        )
    elif method == "favor":
        chunk = check_int("chunk_size", params.get("chunk_size", DEFAULT_CHUNK), 1)
        rnd = _favor_rounding(qt, kt, vt, precision, sc, mask, params["projection"], chunk, d_half)
    elif method == "gated":
        rnd = _gated_rounding(
            qt,
            kt,
            vt,
            precision,
            sc,
            params["log_g"],
            int(params.get("chunk_size", DEFAULT_CHUNK)),
            d_half,
        )
    else:
        from attnprec.analysis.bounds.graphs import rounding_bound

        gparams = {key: val for key, val in params.items() if key != "feature_map"}
        gscale = None if method == "linear" else sc
        rnd = rounding_bound(
            method, qt, kt, vt, precision, causal=causal, scale=gscale, block=block, **gparams
        )
    quant, approx, rnd = torch.broadcast_tensors(quant, approx, rnd.double())
    total = upper(quant + approx + rnd, 2)
    dev = lambda x: x.to(device)  # noqa: E731
    return ErrorBound(dev(total), dev(quant), dev(approx), dev(rnd), confidence)
