"""Rounding bound of log-space (Heinsen) attention, ``w_ij = sum_c exp(scale (q_ic + k_jc))``.

Any algorithm of the family :mod:`._expprod` describes: the chunked Triton kernel (per
channel running maxima of ``scale k``, state rescaled once per block, queries shifted by
``max_c (scale q_ic + m_c)``) or a direct ``exp(scale (q_ic + k_jc) - M_i)``; unless
``precision.sums == "linear"``, also kernels that hold their partial sums as logs rounded
to compute (the signed log-space sums of :mod:`attnprec.attention.log`, a recurrent state
of logs). The exponents' own errors: one rounding of ``scale q`` and of ``scale k`` (none
when the scale is a power of two), and the loads.
"""

from __future__ import annotations

import math

import torch

from attnprec.analysis.bounds import _state
from attnprec.analysis.bounds._expprod import Exponents, chord_reach, expprod_block, log_keys
from attnprec.analysis.bounds._rows import Block, Visible, sequence_max, stream
from attnprec.analysis.bounds.quotient import finish, unbounded
from attnprec.analysis.bounds.rounding import U64, deficit, excess, gamma, upper
from attnprec.analysis.bounds.softmax import Loaded, exact_product, schedule
from attnprec.analysis.precision import Precision

__all__ = ["log_rounding"]


def log_rounding(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    precision: Precision,
    sc: float,
    causal: bool | Visible,
    lam: float,
    rows: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per output element ``[B, rows, d_v]``: ``"sound"``, ``"typical"`` and the masks of
    the intermediates that may overflow (``"unbounded:<name>"``); stored inputs float64
    ``[B, n, d]`` (see :func:`.softmax.softmax_rounding`)."""
    ld = Loaded(precision)
    rnd = 0.0 if exact_product(sc) else precision.compute.u

    # the key side once for the sequence (each block takes its keys' slice)
    Y_all = sc * k
    y_err_all = U64 * Y_all.abs()
    eY_all = rnd * Y_all.abs() * (1 + rnd) + abs(sc) * ld.err(k) * (1 + rnd)
    # the largest key exponent as the kernel computes it (a shift by every key's)
    y_hi = Y_all + eY_all + y_err_all
    y_max = sequence_max(causal, lambda: y_hi + 4 * U64 * (y_hi.abs() + eY_all + y_err_all))
    keys_ls = None if precision.sums == "linear" else log_keys(Y_all, eY_all, ld.abs(v), precision)
    X_all = sc * q
    eX_all = rnd * X_all.abs() * (1 + rnd) + abs(sc) * ld.err(q) * (1 + rnd)
    chords = chord_reach(X_all, Y_all, eX_all, eY_all, precision)  # once per sequence
    over_kv = ld.over(k).any(-1) | ld.over(v).any(-1)
    key_shift_err = (eY_all + y_err_all).amax((-1, -2))

    def block(blk: Block) -> dict[str, torch.Tensor]:
        keys = slice(blk.k0, blk.k0 + blk.k.shape[-2])
        X = sc * blk.q
        ex = Exponents(
            X=X,
            Y=Y_all[:, keys],
            x_err=U64 * X.abs(),
            y_err=y_err_all[:, keys],
            eX=eX_all[:, blk.idx],
            eY=eY_all[:, keys],
            per_channel=True,
            key_over=over_kv[:, keys],
            log_sums=keys_ls,
            y_max=y_max,
            chords=chords,
            key_shift_err=key_shift_err,
        )
        return expprod_block(blk, ex, precision, lam, blk.v)[0]

    return stream(block, q, k, v, causal, rows, width=q.shape[-1])


def log_rounding_state(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    precision: Precision,
    sc: float,
    causal: bool,
    rows: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`log_rounding`'s sound bound from per-channel key states (:mod:`._state`):
    ``O((n + rows) C d_v)`` time. The same model (both shift models, any schedule the
    declaration allows, linear sums), each per-term factor bounded by one that separates
    into a row and a key part: ``Lambda_ijc <= alpha_ic + beta_jc`` (``|X + Y| <= |X| +
    |Y|``; the key's distance to the row's shift at most to the sequence's largest key
    exponent); the per-key deviations ``|v_j - y_i|`` through :func:`._state.deviation`. So
    it is never below the pair evaluation with its factors evaluated exactly (docs/bounds/
    attention.md, "State evaluation"). ``"typical"`` equals ``"sound"``
    (the probabilistic model is not evaluated from states). Rows whose float64 states
    cannot hold their terms (:data:`._state.GAP`) take the pair evaluation."""
    if precision.sums != "linear":
        raise ValueError(
            "evaluation: 'state' models partial sums held as values; declare "
            "Precision(..., sums='linear') or use evaluation='pairs'"
        )
    fc, fa = precision.compute, precision.accumulate
    uc, ua = fc.u, fa.u
    up = max(uc, ua)
    a_arg = precision.elementary.exp_arg
    k_e = precision.op_error("exp")
    l1k = math.log1p(k_e)
    l1m = math.log1p(-k_e) if k_e < 1 else -math.inf
    g3 = 1 + gamma(3, U64)
    ld = Loaded(precision)
    rnd = 0.0 if exact_product(sc) else uc
    B, n, C = k.shape
    dv = v.shape[-1]
    Y = sc * k
    y_err = U64 * Y.abs()
    eY = rnd * Y.abs() * (1 + rnd) + abs(sc) * ld.err(k) * (1 + rnd)
    X_all = sc * q
    eX_all = rnd * X_all.abs() * (1 + rnd) + abs(sc) * ld.err(q) * (1 + rnd)
    y_hi = Y + eY + y_err
    y_max = sequence_max(causal, lambda: y_hi + 4 * U64 * (y_hi.abs() + eY + y_err))
    top_y = Y.amax(-2, keepdim=True) if y_max is None else torch.maximum(Y.amax(-2, True), y_max)
    # the key part of Lambda: eY + 2 (u_c + 4 u64) |Y| + u_c (2 + 2a)(max Y - Y)
    beta = eY + 2 * (uc + 4 * U64) * Y.abs() + uc * (2 + 2 * a_arg) * (top_y - Y)
    beta = upper(beta * (1 + gamma(7, U64)), 6)
    fac2 = torch.expm1(g3 * beta) * (1 + 4 * U64)  # e^{g3 beta} - 1, up
    facm = torch.exp(-g3 * beta) * (1 - 4 * U64)  # e^{-g3 beta}, down
    mu = v.mean(-2, keepdim=True)
    G = _state.value_columns(v, mu)
    gmax = G.abs().amax(-2, keepdim=True)
    va = ld.abs(v)
    over_kv = (ld.over(k).any(-1) | ld.over(v).any(-1)).double().unsqueeze(-1)
    plain = torch.cat([va, va.amax(-1, keepdim=True).clamp_min(1.0), over_kv], -1)
    verr = ld.err(v)
    peak = torch.cat([Y, beta.amax(-1, keepdim=True), v + verr, -(v - verr)], -1)
    key_shift_err = (eY + y_err).amax((-1, -2)).reshape(B, 1)
    two = y_max is not None and precision.block is None
    eta = max(fc.min_subnormal, fa.min_subnormal)
    fac_max = float(fac2.max()) if fac2.numel() else 0.0

    def model(
        s: _state.Scan, r: _state.Rows, X: torch.Tensor, eX: torch.Tensor, Mk: torch.Tensor,
        visible_shift: bool,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        nvis = s.nvis
        R_run, dep_k = schedule(precision.block, nvis)
        R = R_run if visible_shift else torch.zeros_like(R_run)
        n_ex = (2 + R)[:, None]  # [r, 1]
        dep = (dep_k + C + 2)[:, None]
        XM = X + Mk
        Mi = XM.amax(-1, keepdim=True)
        Eq = eX + uc * (X.abs() + XM.abs() + (2 + 2 * a_arg) * (Mi - XM))
        Eq = Eq + 4 * U64 * (XM.abs() + Mi.abs())
        alpha = upper((Eq + (uc + 4 * U64) * X.abs()) * (1 + gamma(7, U64)), 4)
        lg_hi, lg_lo = dep * math.log1p(ua), dep * math.log1p(-ua)
        lK_hi, lK_lo = 2 * math.log1p(up) + lg_hi, 2 * math.log1p(-up) + lg_lo
        c_fac = excess(lK_hi - (math.log1p(-up) + lg_lo))
        K_hi, K_lo = torch.exp(lK_hi), torch.exp(lK_lo)
        Kd = (1 - up) * torch.exp(lg_lo)
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
        dev = _state.deviation(r, A, gmax, coef)
        A_up = A * (1 + r.rho) + r.floor * coef * gmax
        a0s, a_abs = A_up[..., :1], A_up[..., 1 : 1 + dv]
        rho = r.rho.squeeze(-1)
        # sum_j (a_ij + p_ij) |v~_j - v_j|, |v_j| <= |v_j - mu| + |mu|
        sv = a_abs + r.p_abs + mu.abs() * (a0s + 1 + r.rho)
        load = upper(ld.ul * sv + ld.hl * (a0s + 1 + r.rho), 4)
        S02 = s.S[0][..., 0] + s.S[1][..., 0]
        c = torch.einsum("brc,brc->br", r.wn * e_a, S02) * (1 + rho) + r.floor * (1 + fac_max)
        c = upper(c_fac.reshape(1, -1) * E1.reshape(1, -1) * c, 4).unsqueeze(-1)
        dm = torch.einsum("brc,brc->br", r.wn * torch.exp(-ga), s.lone[0])
        den_main = (Kd * ez).reshape(1, -1) * dm * (1 - rho) * (1 - gamma(n + C + 8, U64))
        lam_max = upper(alpha.amax(-1) + s.peak[..., C], 2)
        top = (X + s.peak[..., :C]).amax(-1)
        spread = (Mi.squeeze(-1) - top).clamp_min(0.0)
        shift_err = upper(Eq.amax(-1) + U64 * X.abs().amax(-1), 2) + 2 * key_shift_err
        w_lo = torch.exp(-lam_max - spread - shift_err) * (
            math.exp(float((2 + R.max()) * l1m)) if k_e < 1 else 0.0
        )
        U_row = precision.exp_underflow() * torch.exp(lam_max + l1k)
        vis_va = s.plain[..., :dv]
        RC = R * C
        raw_den = upper(U_row * (2 * C * nvis + nvis * RC) + RC * eta, 6)
        raw_num = U_row.unsqueeze(-1) * ((2 * C + RC)[:, None] * vis_va)
        raw_num = upper(raw_num + ((nvis * 2 + R) * C * eta)[:, None], n + 6)
        b_den, b_num = raw_den / w_lo, raw_num / w_lo.unsqueeze(-1)
        den_lo = (den_main - b_den).unsqueeze(-1)
        y_abs = r.y.abs() + r.eps_y
        num = dev + load + y_abs * c + b_num + y_abs * b_den.unsqueeze(-1)
        sound = upper(num / den_lo.clamp_min(1e-300), 3 * n + 12)
        sound = torch.where(den_lo > 0, sound, math.inf)
        if visible_shift:
            # the largest term is exp(0) exp(0) = 1 exactly: the output within the values'
            # hull (quotient.hull)
            lo_v, hi_v = -s.peak[..., C + 1 + dv :], s.peak[..., C + 1 : C + 1 + dv]
            vmax = torch.maximum(hi_v.abs(), lo_v.abs())
            kappa = excess(lK_hi - lg_lo).reshape(1, -1, 1)
            w_h = ((1 - up) * torch.exp(lg_lo)).reshape(1, -1, 1)
            slack = upper(kappa * vmax + (raw_num + vmax * raw_den.unsqueeze(-1)) / w_h, 4)
            e_hull = upper(torch.maximum(hi_v - r.y, r.y - lo_v) + r.eps_y + slack, 4)
            sound = torch.minimum(sound, e_hull)
        sound, _, last = finish(sound, sound, y_abs, precision)
        state = nvis * C * math.exp(float((2 + R.max()) * l1k)) * torch.exp(lg_hi.squeeze(-1))
        vmax_row = s.plain[..., dv] / nvis.clamp_min(1)
        full = lambda m: m.unsqueeze(-1).expand_as(sound)  # noqa: E731
        reasons = {
            f"load into {fc.name}": full(ld.over(q[:, s.idx]).any(-1) | (s.plain[..., dv + 1] > 0)),
            f"exponents in {fc.name}": full((XM.abs() + Eq).amax(-1) >= fc.overflow()),
            f"sums in {fa.name}": full(state * vmax_row >= fa.overflow()),
            "normalizer may vanish": full(~(den_lo.squeeze(-1) > 0) & (not visible_shift)),
            **last,
        }
        return unbounded(sound, sound, reasons)

    def rows_fn(s: _state.Scan) -> dict[str, torch.Tensor]:
        X, eX = X_all[:, s.idx], eX_all[:, s.idx]
        Mk = s.peak[..., :C]
        r = _state.rows_of(s, X, Mk, mu, gmax, fac_max)
        out = model(s, r, X, eX, Mk, True)
        if two:
            assert y_max is not None
            wide = (y_max > Mk).any(-1)  # [B, r]: the sequence's shift lies above the row's
            if bool(wide.any()):
                o2 = model(s, r, X, eX, torch.maximum(Mk, y_max), False)
                w3 = wide.unsqueeze(-1)
                for key, val in o2.items():
                    both = (
                        torch.maximum(out[key], val) if val.is_floating_point() else out[key] | val
                    )
                    out[key] = torch.where(w3, both, out[key])
        out["far"] = r.far.unsqueeze(-1).expand_as(out["sound"])
        return out

    out = _state.scan(Y, [None, fac2], G, [facm], plain, peak, causal, rows, rows_fn)
    far = out.pop("far")[..., 0]
    if bool(far.any()):
        # rows the float64 states cannot hold: the pair evaluation
        idx = torch.arange(q.shape[-2]) if rows is None else rows
        sel = far.any(0).nonzero().flatten()
        dense = log_rounding(q, k, v, precision, sc, causal, 1.0, idx[sel])
        dense["typical"] = dense["sound"]
        for key in list(out):
            out[key][:, sel] = dense[key] if key in dense else False
        for key, val in dense.items():
            if key not in out:
                base = torch.zeros_like(out["sound"], dtype=torch.bool)
                base[:, sel] = val
                out[key] = base
    return out
