"""Bounds of gated linear attention (unnormalized, causal):
``o_t = scale sum_{j<=t} sum_c q_tc D_tjc k_jc v_j``, ``D_tjc = exp(sum_{l=j+1..t} log g_lc)``.

Quantization is direct (the output is linear in each operand). Rounding covers any
schedule that forms each decay from the log-gates of its own span: the recurrence
``S_t = diag(g_t) S_{t-1} + k_t v_t^T`` with ``g = exp(log g)`` per step (up to ``t - j``
exps and products on a term's path), or chunks of ``block`` steps with the decay
``exp`` of a sum of at most ``block`` log-gates (``ceil((t - j) / block) + 2`` exps, an
exponent error ``(block + 1 + ceil((t - j) / block)) u |log D|``: states passed between
chunks one by one, or as one exp of a segment sum of chunk totals as in Mamba-2's
``ssd_minimal``); then the products with q, k and v, sums over
the keys and over the channels, nested (a state per channel, then the query's dot, or a
dot per key, then the keys), each in any order, the scale and the store. One flat sum
over every (key, channel) pair is not covered (1.6-18x outside; ``Precision``). Decays
taken as differences of whole-sequence prefix sums ``exp(G_t - G_j)`` are *not* covered:
their error grows with ``|G_t|`` rather than with the span (the hazard this bound exists
to flag).

State-space models reduce to this problem with keys and log-gates the kernel *computes*
(``B_bar``, ``delta A``) and a skip term ``D u``: :class:`Computed` carries their errors
into :func:`gated_rounding` (docs/bounds/ssm.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from attnprec._device import scaled
from attnprec.analysis.bounds._rows import BUDGET, Block, stream
from attnprec.analysis.bounds.quotient import finish, unbounded
from attnprec.analysis.bounds.rounding import (
    U64,
    excess,
    exp_float,
    exp_up,
    gamma,
    order_sq,
    order_sq_sum,
    upper,
)
from attnprec.analysis.bounds.softmax import Loaded, exact_product, schedule
from attnprec.analysis.precision import Precision

__all__ = [
    "Computed",
    "gated_quantization",
    "gated_quantization_state",
    "gated_rounding",
    "gate_sums",
]


def _scale_ulps(sc: float) -> float:
    """Ulps of the output's product by the scale (``quotient.finish``): half, or none by a
    power of two (the conversion of a sum held in accumulate into compute is charged there
    either way)."""
    return 0.0 if exact_product(sc) else 0.5


def key_sums(precision: Precision, nvis: torch.Tensor) -> torch.Tensor:
    """Additions on a term's path through the sums over keys: the visible keys' count (any
    order); with ``block_sums="separate"``, a chunk's own sum, then one addition per later
    chunk into the state and one into the output (:func:`~.softmax.schedule`'s depth,
    which also counts rescalings: more), where fewer. The decays' products are counted
    with their exps."""
    if precision.block_sums == "separate" and precision.block is not None:
        return torch.minimum(nvis, schedule(precision, nvis)[1])
    return nvis


@dataclass(frozen=True)
class Computed:
    """Operands a kernel computes rather than loads, and a term added to the output.

    Attributes
    ----------
    gate_rel, gate_abs : float
        Each log-gate as computed is within ``gate_rel |log g_l| + gate_abs`` of the exact
        one (e.g. ``fl(delta A)``: the product and the loads). Every log-gate of a span has
        the same sign, so a decay's exponent is off by at most ``gate_rel |log D| +
        gate_abs (t - j)`` more.
    gate_max : float
        The largest ``|log g_l|`` (the probabilistic level's per-gate error).
    k_rel, k_abs : torch.Tensor
        ``[B, n, d_k]``: the key as computed (``B_bar``) is ``k (1 + theta) + eta`` with
        ``|theta| <= k_rel``, ``|eta| <= k_abs`` (k the exact key of the stored inputs).
    skip, skip_abs : torch.Tensor or None
        ``[B, n, d_v]``: a term ``s`` added to each output before the store (``D u``; the
        exact value on the stored inputs), computed within ``skip_rel |s| + skip_abs``
        before its addition (one more addition in the output's sum).
    skip_rel : float
        See ``skip``.
    over : torch.Tensor or None
        ``[B, n]`` bool: keys whose forming may overflow (a product of their operands, e.g.
        ``delta B``, ``B u``, ``delta u``, reaching :meth:`.Precision.products_overflow`):
        the rows that see one are unbounded.
    k_und : torch.Tensor or None
        ``[B, n, d_k]`` (or broadcastable): at least ``max(1, |k|)`` and the sum, over the
        products the key expands into (H3: one per tap), of ``prod max(1, |x|)`` over the
        key's operands ``x`` as loaded (``max(1, delta) max(1, |B|)``): a product that
        underflows is carried by the factors still to come, and a kernel may multiply the
        key's operands in any order with the other factors (Mamba's ``B (delta u)``, SSD's
        ``B (x dt)``), so an underflow of ``delta u`` is carried by ``|B|`` alone. ``None``:
        ``max(1, |k|)``.
    step_sums : int
        Additions per step on the state's path beyond the recurrence's own (H3's taps added
        after their products ``k v``): each may underflow, carried by ``|q|``.
    """

    gate_rel: float
    gate_abs: float
    gate_max: float
    k_rel: torch.Tensor
    k_abs: torch.Tensor
    skip: torch.Tensor | None = None
    skip_rel: float = 0.0
    skip_abs: torch.Tensor | None = None
    over: torch.Tensor | None = None
    k_und: torch.Tensor | None = None
    step_sums: int = 0


def gate_sums(log_g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix sums ``G_t = sum_{l<=t} log g_l`` ``[B, n, d_k]`` (float64) and a bound on the
    float64 error of any difference ``G_t - G_j``: ``eG_t`` with ``|fl(G_t - G_j) -
    sum_{j<l<=t} log g_l| <= eG_t + eG_j``. A reset (``log g = -inf``) counts as 0 here:
    the spans across it are :func:`gate_resets`'."""
    log_g = torch.where(torch.isinf(log_g), 0.0, log_g)
    G = torch.cumsum(log_g, dim=-2)
    n = log_g.shape[-2]
    eG = upper(gamma(n + 2, U64) * torch.cumsum(log_g.abs(), dim=-2), 4)
    return G, eG


def gate_resets(log_g: torch.Tensor) -> torch.Tensor | None:
    """``R [B, n, d_k]``, the resets (``log g = -inf``) up to each step per channel, or None
    where there is none: a span ``(j, t]`` crosses one where ``R_t > R_j``, its decay an
    exact 0 in the exact output and in any kernel that forms it as an exp of the span's
    sum or as a product of per-step exps (``exp(-inf) = 0``; a difference of prefix sums
    gives NaN, which the audit flags)."""
    reset = torch.isinf(log_g)
    return torch.cumsum(reset.to(torch.int32), dim=-2) if bool(reset.any()) else None


def _decays(
    blk: Block, G: torch.Tensor, eG: torch.Tensor, sl: slice, R: torch.Tensor | None = None
) -> tuple:
    """Log-decays ``[B, r, mc, d_k]`` of the rows of ``blk`` and keys ``sl`` (``-inf``
    where hidden or across a reset of ``R``, :func:`gate_resets`), and their float64
    error."""
    lo, hi, _ = sl.indices(blk.k.shape[-2])  # the chunk may run past the keys held
    ab = slice(blk.k0 + lo, blk.k0 + hi)  # the keys' absolute positions
    Gt, Gj = G[:, blk.idx].unsqueeze(-2), G[:, ab].unsqueeze(-3)
    logD = Gt - Gj
    err = eG[:, blk.idx].unsqueeze(-2) + eG[:, ab].unsqueeze(-3) + U64 * logD.abs()
    vis = blk.keymask(sl).unsqueeze(-1)
    live = vis if R is None else vis & (R[:, blk.idx].unsqueeze(-2) == R[:, ab].unsqueeze(-3))
    return torch.where(live, logD, -math.inf), torch.where(live, err, 0.0), vis


def gated_quantization(
    given: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    stored: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    sc: float,
    log_g: torch.Tensor,
    rows: torch.Tensor | None,
) -> torch.Tensor:
    """``|o(q~, k~, v~) - o(q, k, v)|`` per element ``[B, rows, d_v]``: with decays ``D``,
    ``|sc| sum_j (sum_c (|q~ - q| |k~| + |q| |k~ - k|) D) |v~_j| + |sc| (sum_c |q k D|) .
    |v~ - v|``."""
    G, eG = gate_sums(log_g)
    R = gate_resets(log_g)
    q, k, v = (torch.stack([a, b]) for a, b in zip(given, stored, strict=True))

    def block(blk: Block) -> dict[str, torch.Tensor]:
        (q0, q1), (k0, k1), (v0, v1) = blk.q, blk.k, blk.v
        B, r, d = q0.shape
        m = k0.shape[-2]
        a = torch.zeros(B, r, v0.shape[-1], dtype=torch.float64)
        b = torch.zeros_like(a)
        step = max(1, scaled(BUDGET) // max(B * r * d, 1))  # [B, r, step, d] temporaries
        for s0 in range(0, m, step):
            sl = slice(s0, s0 + step)
            logD, err, _ = _decays(blk, G, eG, sl, R)
            Dup = exp_up(logD + err)  # (a decay below float64's normal range included)
            # |q~ k~ - q k| <= |q~ - q| |k~| + |q| |k~ - k|: the differences are exact
            # (Sterbenz: a value and its rounding), the rest nonnegative products (a
            # difference of two rounded products may cancel to 0)
            dqk = torch.addcmul(
                (q1 - q0).abs().unsqueeze(-2) * k1[:, sl].abs().unsqueeze(-3),
                q0.abs().unsqueeze(-2),
                (k1[:, sl] - k0[:, sl]).abs().unsqueeze(-3),
            )
            a += ((dqk * Dup).sum(-1)) @ v1[:, sl].abs()
            wq = (q0.unsqueeze(-2) * k0[:, sl].unsqueeze(-3) * Dup).abs().sum(-1)
            b += wq @ (v1[:, sl] - v0[:, sl]).abs()
        out = upper(abs(sc) * (a + b) * (1 + gamma(d + 4, U64)), 2 * m + d + 8)
        return {"q": out}

    return stream(block, q, k, v, True, rows, width=q.shape[-1])["q"]


def gated_quantization_state(
    given: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    stored: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    sc: float,
    log_g: torch.Tensor,
    rows: torch.Tensor | None,
) -> torch.Tensor:
    """:func:`gated_quantization` from per-channel decayed key states
    (``evaluation="state"``; :func:`._state.scan`, ``O((n + rows) d_k d_v)`` time): the
    pair evaluation's sums separate per channel, ``sum_c |q~_c - q_c| S_c[|k~|, |v~|] +
    |q_c| (S_c[|k~ - k|, |v~|] + S_c[|k|, |v~ - v|])`` with ``S_c[a, b] = sum_j D_tjc
    a_jc b_j``, so the two agree up to float64 rounding (tests). The decays are bounded
    from above as in :func:`gated_rounding_state`, each row's exponential raised by its
    float64 formation. Rows whose states cannot hold their terms (:data:`._state.GAP`)
    take the pair evaluation."""
    from attnprec.analysis.bounds import _state

    if gate_resets(log_g) is not None:  # resets: the pair evaluation (their spans' zeros)
        return gated_quantization(given, stored, sc, log_g, rows)
    (q, k, v), (qt, kt, vt) = given, stored
    B, n, d = q.shape
    dv = v.shape[-1]
    G, eG = gate_sums(log_g)
    # exp((1 - 8 u64)(G_t - G_j) + (eG_t + eG_j)(1 + 4 u64)) >= the exact decay (G is
    # non-increasing): the key part
    Y0 = -(1 - 8 * U64) * G + eG * (1 + 4 * U64)
    y_max = float(Y0.abs().max()) if Y0.numel() else 0.0
    dq, facs = (qt - q).abs(), [kt.abs(), (kt - k).abs(), k.abs()]
    cols = torch.cat([vt.abs(), (vt - v).abs()], -1)
    h_max = max((float(f.max()) for f in facs), default=0.0) * float(cols.max()) if n else 0.0

    def rows_fn(s: _state.Scan) -> torch.Tensor:
        t = s.idx
        X0 = (1 - 8 * U64) * G[:, t] + eG[:, t] * (1 + 4 * U64)
        # the row part and its float64 formation (X0's and Y0's, the row's argument)
        e = exp_up(X0 + s.m) * torch.exp(U64 * (4 * X0.abs() + 2 * s.m.abs() + 4 * y_max))
        Sa, Sd, Sk = s.S
        qa = q[:, t].abs()
        first = torch.einsum("brc,brck->brk", dq[:, t] * e, Sa[..., :dv])
        first += torch.einsum("brc,brck->brk", qa * e, Sd[..., :dv])
        second = torch.einsum("brc,brck->brk", qa * e, Sk[..., dv:])
        # the states' exps that underflow: 2^-1074 each, times a factor and a column
        fl = n * 2.0**-1070 * ((dq[:, t] + qa) * e).sum(-1, keepdim=True) * h_max
        rel = (1 + s.rho + gamma(d + 4, U64)) * (1 + 8 * U64)
        return upper(abs(sc) * ((first + second) * rel + 2 * fl), 8)

    dense = lambda sel: gated_quantization(given, stored, sc, log_g, sel)  # noqa: E731
    return _state.causal_sum(Y0, facs, cols, rows, rows_fn, dense)  # type: ignore[arg-type]


def _path_growth(
    precision: Precision,
    n: int,
    d: int,
    eG: torch.Tensor,
    computed: Computed | None,
    spans: torch.Tensor | None = None,
) -> Any:
    """A factor >= what any computed decay path of an ``n``-token sequence (``d``
    channels) may reach, the exact decay (<= 1) included: each exp up to ``k_e`` above its
    value, the products and the state's sums rounded up, the span sums' float64 errors
    (``eG``) and a computed gate's absolute error per step (:func:`gated_rounding`'s
    ``logH``, whose ``a |log D|`` part a decay of ``|log D|`` outweighs while ``a < 1``). A
    state entry, a sum of ``|k v|`` with exact decays <= 1, reaches at most that sum times
    it (a review: fp16 decays of ``1 + 2^-10`` grew a state e^2 in 2048 steps, past fp16's
    range under a finite bound). ``spans``: per row, the longest path it sees (its index
    plus one), a tensor of factors; else the sequence's, a float."""
    fc, fa = precision.compute, precision.accumulate
    up = precision.product_u()
    b_eff = 1 if precision.block is None else min(precision.block, max(n, 1))
    a = (b_eff + 1) * up + precision.elementary.exp_arg * fc.u
    if precision.block is not None:
        a += up * math.ceil(n / b_eff)
    if computed is not None:
        a += computed.gate_rel
    L = torch.as_tensor(float(n) if spans is None else spans, dtype=torch.float64)
    n_exp = L if precision.block is None else torch.ceil(L / b_eff) + 2
    lg = n_exp * (math.log1p(precision.op_error("exp")) + math.log1p(up))
    lg = lg + 3 * math.log1p(up) + 2 * math.log1p(Loaded(precision).ul)
    lg = lg + (L + d + 3) * math.log1p(fa.u) + 2 * (float(eG.max()) if eG.numel() else 0.0)
    if computed is not None:
        lg = lg + computed.gate_abs * L
    grow = torch.exp(lg) * (1 + gamma(8, U64))
    grow = torch.where(torch.as_tensor(a >= 1), math.inf, grow)
    return float(grow) if spans is None else grow


def _chunk_reach(
    precision: Precision,
    k_hi: torch.Tensor,
    va: torch.Tensor,
    key_made: torch.Tensor,
    grow: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """What a chunked kernel (``block``) forms past a row's own keys, for the overflow
    checks: ``[B, n]`` each row's largest ``|k_j|`` over the keys a chunk may share with it
    (``j <= t + block - 1``: its scores ``q_t k_j`` and computed keys, masked by a product,
    where ``0 * inf`` is NaN), ``[B, 1]`` the sum of every key's ``max |k_j| max |v_j|``
    (at least every chunk's state entries: states pass between chunks as one product over
    all chunks in Mamba-2's ``ssd_minimal``, future chunks' weighted by an exact 0) and
    ``[B, 1]`` whether any key's forming may overflow (its chunk's state then reaches
    every row the same way). A review: a later token's ``dt x``, ``C B``, chunk state,
    ``delta u``, shifted key or ``q_c k_c`` past fp16 made earlier rows NaN under finite
    bounds in gated, selective_scan, ssd, ssm and h3, both evaluations. None without
    ``block``: a recurrence or scan forms nothing past its row."""
    if precision.block is None:
        return None
    n = k_hi.shape[-2]
    k_key = k_hi.amax(-1)
    b = min(precision.block, max(n, 1))
    ahead = k_key.cummax(-1).values[..., (torch.arange(n) + b - 1).clamp_max(n - 1)]
    # a chunk's state entries: sum_j |k_jc| |v_je| over b consecutive keys (decays <= 1),
    # any alignment: within two consecutive aligned chunks, so the largest entry of the
    # sum of two neighbours' |K|^T |V|
    pad = (0, 0, 0, -n % b)
    K = torch.nn.functional.pad(k_hi, pad).unflatten(-2, (-1, b))  # [B, z, b, d_k]
    V = torch.nn.functional.pad(va, pad).unflatten(-2, (-1, b))
    z, step = K.shape[-3], max(1, 2**22 // max(K.shape[0] * k_hi.shape[-1] * va.shape[-1], 1))
    top = torch.zeros(k_hi.shape[:-2] + (1,), dtype=torch.float64)
    prev = None
    for c0 in range(0, z, step):
        S = K[..., c0 : c0 + step, :, :].transpose(-1, -2) @ V[..., c0 : c0 + step, :, :]
        both = S if prev is None else torch.cat([prev, S], -3)
        pair = both[..., 1:, :, :] + both[..., :-1, :, :] if both.shape[-3] > 1 else both
        top = torch.maximum(top, pair.amax((-3, -2, -1)).unsqueeze(-1))
        prev = S[..., -1:, :, :]
    states = upper(top * grow, 2 * b + 4)  # (grow: _path_growth)
    return ahead, states, key_made.any(-1, keepdim=True)


def gated_rounding(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    precision: Precision,
    sc: float,
    log_g: torch.Tensor,
    lam: float,
    rows: torch.Tensor | None = None,
    *,
    computed: Computed | None = None,
) -> dict[str, torch.Tensor]:
    """Per output element ``[B, rows, d_v]``: ``"sound"``, ``"typical"`` and the masks of
    the intermediates that may overflow, for stored float64 ``q, k, v [B, n, d]`` and
    log-gates ``[B, n, d_k]``; ``computed``: keys and log-gates formed by the kernel, and
    a skip term (:class:`Computed`; ``k`` and ``log_g`` are then their exact values on the
    stored inputs, upper bounds in magnitude)."""
    G, eG = gate_sums(log_g)
    R = gate_resets(log_g)
    d_k = q.shape[-1]
    ld = Loaded(precision)
    # loads that overflow compute, once for the sequence (a computed key is not loaded)
    key_over = ld.over(v).any(-1)
    if computed is None:
        key_over = key_over | ld.over(k).any(-1)
    # computed keys that may overflow (their operands' products, or the key itself)
    key_made = torch.zeros_like(key_over)
    if computed is not None:
        lim = precision.products_overflow()[0]
        k_hi = k.abs() * (1 + computed.k_rel) + computed.k_abs
        key_made = k_hi.amax(-1) >= lim
        if computed.over is not None:
            key_made = key_made | computed.over
    k_hi = ld.abs(k)
    if computed is not None:
        k_hi = k_hi * (1 + computed.k_rel) + computed.k_abs
    grow = _path_growth(precision, k.shape[-2], d_k, eG, computed)
    reach = _chunk_reach(precision, k_hi, ld.abs(v), key_made, grow)
    if computed is not None:
        # the per-key and per-row extras travel with k and q through the row blocks
        ku = torch.zeros_like(k) if computed.k_und is None else computed.k_und.expand_as(k)
        k = torch.cat([k, computed.k_rel.expand_as(k), computed.k_abs.expand_as(k), ku], -1)
        if computed.skip is not None:
            sa = computed.skip_abs
            sa = torch.zeros_like(computed.skip) if sa is None else sa.expand_as(computed.skip)
            q = torch.cat([q, computed.skip, sa], -1)
    return stream(
        lambda b: _block(b, precision, sc, G, eG, lam, computed, d_k, key_over,
                         key_made[:, b.k0 : b.k0 + b.k.shape[-2]], R,
                         None if reach is None else (reach[0][:, b.idx], *reach[1:])),
        q, k, v, True, rows, width=q.shape[-1],
    )  # fmt: skip


def _path(
    x: torch.Tensor,
    Dx: torch.Tensor,
    logD: torch.Tensor,
    eD: torch.Tensor,
    vis: torch.Tensor,
    logH: torch.Tensor,
    less_one: bool = True,
) -> torch.Tensor:
    """``x Dx (e^logH - 1)`` (``less_one``; else ``x Dx e^logH``) for the upper decays ``Dx =
    exp_up(logD + eD)``; where that is not finite (a decay that underflows against a path
    factor that overflows: strong decays, long spans), at most ``x e^(logD + eD + logH)``
    formed as one exp, so no 0 x inf."""
    val = x * Dx * (excess(logH, 8) if less_one else 1 + excess(logH, 8))
    if bool(torch.isfinite(val).all()):
        return val
    logH = upper(logH, 8)  # its own roundings, as excess() takes them
    arg = logD + eD + logH
    one = torch.where(vis, exp_up(arg + 2 * U64 * (arg.abs() + eD + logH)), 0.0)
    return torch.fmin(val, x * one)


def _block(
    blk: Block,
    precision: Precision,
    sc: float,
    G: torch.Tensor,
    eG: torch.Tensor,
    lam: float,
    cmp: Computed | None = None,
    d_k: int | None = None,
    key_over: torch.Tensor | None = None,
    key_made: torch.Tensor | None = None,
    R: torch.Tensor | None = None,
    reach: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """One row block; ``key_over [B, n]``: the sequence's keys whose loads overflow
    compute (:meth:`.softmax.Loaded.rows_over`);
    ``key_made [B, m]``: its computed keys whose forming may overflow; ``R``: the
    resets (:func:`gate_resets`); ``reach``: :func:`_chunk_reach` of the block's rows."""
    fc, fa = precision.compute, precision.accumulate
    el = precision.elementary
    uc, ua = fc.u, fa.u
    up = precision.product_u()
    ld = Loaded(precision)
    q, k, v = blk.q, blk.k, blk.v
    skip = skip_abs = k_rel = k_abs = k_und = None
    if cmp is not None:
        assert d_k is not None
        k, k_rel, k_abs, k_und = (k[..., i * d_k : (i + 1) * d_k] for i in range(4))
        if cmp.skip is not None:
            q, skip, skip_abs = q[..., :d_k], q[..., d_k : -(v.shape[-1])], q[..., -(v.shape[-1]) :]
    B, r, d = q.shape
    m, d_v = k.shape[-2], v.shape[-1]
    # (a chunk past the sequence is the sequence: ONE_PASS, one chunk of every token)
    b_eff = 1 if precision.block is None else min(precision.block, max(G.shape[-2], 1))
    k_e = precision.op_error("exp")
    # the log-gates' span sums round in compute or in accumulate, the exp's argument in compute
    a_arg = (b_eff + 1) * up + el.exp_arg * uc
    nvis = blk.visible
    # keys, then channels or channels, then keys, each in any order (and the skip term's
    # addition); [r, 1, 1]
    dep = (key_sums(precision, nvis) + d + 2 + (skip is not None))[:, None, None]
    step = max(1, scaled(BUDGET) // max(B * r * d, 1))  # [B, r, step, d] temporaries
    err = torch.zeros(B, r, d_v, dtype=torch.float64)
    lin = torch.zeros_like(err)
    lin_d = torch.zeros_like(err)  # the decays' part of lin (their exps, exponents, gates)
    mag = torch.zeros_like(err)
    o = torch.zeros_like(err)
    sq = torch.zeros_like(err)
    o_c = torch.zeros(B, r, d, d_v, dtype=torch.float64)  # per channel: sum_j q D k v
    sq_c = torch.zeros_like(o_c)  # and sum_j (q D k v)^2
    sq_k = torch.zeros_like(err)  # sum_j (q D k v)^2 k_rel^2: the computed keys' errors
    qa, ka, va = ld.abs(q), ld.abs(k), ld.abs(v)
    k_hi = ka  # |k| as the kernel holds it
    if k_rel is not None and k_abs is not None:
        k_hi = ka * (1 + k_rel) + k_abs
    # underflow (a result below the normal range: off by at most U, times the moduli of the
    # factors still to come, decays <= 1): a product of q, k, v, decays, in any order
    # (5 per term: the scale, a computed key), <= U_a prod max(1, |x|) (a computed key's
    # operands each: k_und); an exp of a decay, only where the decay may lie below T_e
    # (every decay on a term's path is >= the term's), <= U_e |q_c k_jc v_j| per exp (or
    # the term's own value plus a spacing per exp, where less); the
    # state's products and sums (3 per step, and step_sums), <= U_a |q_c| per step. The
    # scale is a factor like the others: an underflow is carried by it only where it comes
    # later (q~ = fl(sc q) first: fl(sc q)'s underflow times k v), so the products' and the
    # state's allowances take max(1, |sc|), the exps' (a decay's error is carried by every
    # other factor) |sc|
    q1, k1 = qa.clamp_min(1.0), k_hi.clamp_min(1.0)
    if k_und is not None:
        k1 = torch.maximum(k1, k_und)
    U_a = max(fc.underflow, fa.underflow)
    U_e = precision.exp_underflow()
    logT_e = precision.exp_exact_log()
    und_p = torch.zeros_like(err)  # sum_j sum_c max(1, |q_c|) max(1, |k_jc|) max(1, |v_j|)
    und_e = torch.zeros_like(err)  # sum_j sum_c [D_jc < T_e] |q_c k_jc| |v_j| per-exp charges
    k_key = k_hi.amax(-1)  # [B, m]
    s_key = k_key * va.amax(-1)  # >= every |k_jc v_je|
    st_sum = torch.zeros(B, r, dtype=torch.float64)  # >= every state entry's magnitude
    k_max = torch.zeros(B, r, dtype=torch.float64)  # the largest |k| a row sees
    for s0 in range(0, m, step):
        sl = slice(s0, s0 + step)
        logD, eD, vis = _decays(blk, G, eG, sl, R)
        keys = torch.arange(blk.k0 + s0, blk.k0 + s0 + logD.shape[-2])
        span = (blk.idx[:, None] - keys[None, :]).clamp_min(0)
        n_exp = span if precision.block is None else torch.ceil(span / b_eff) + 2
        n_exp = n_exp.to(torch.float64)[None, :, :, None]
        # a chunked exponent: a sum of <= block log-gates (masked cumulative sums) and, where
        # states pass between chunks as one exp of a segment sum of chunk totals (Mamba-2's
        # ssd_minimal between chunks; its decays to a chunk's end, a difference of prefix
        # sums, are not covered), up to ceil(span / block) totals more. Every sum on a term's path
        # holds log-gates of its own span only (masked sums, totals of chunks inside it):
        # at most min(span, block), each rounding within u of a partial sum <= |log D|
        # (one sign), so a span shorter than the block takes its own count (a review: the
        # block's for every span put chunked fp16-compute bounds 1.3x higher)
        a_t: float | torch.Tensor = a_arg
        if precision.block is not None:
            m_t = span.clamp(1, b_eff).to(torch.float64)[None, :, :, None]
            a_t = a_arg + up * (m_t - b_eff + n_exp - 2)
        Lam = a_t * logD.abs().nan_to_num(posinf=0.0) + eD
        if cmp is not None:
            # computed log-gates: relative errors add up over the span (one sign)
            Lam = Lam + cmp.gate_rel * logD.abs().nan_to_num(posinf=0.0)
            Lam = Lam + cmp.gate_abs * span.to(torch.float64)[None, :, :, None]
        Lam = torch.where(vis, Lam, 0.0)
        # log of the term's path factor e^Lam (1 + k_e)^n (1 + up)^(n + 3) (1 + ul)^2 s_hi;
        # its excess over 1 formed from it (no cancellation)
        logH = Lam + n_exp * (math.log1p(k_e) + math.log1p(up))
        logH = logH + (3 * math.log1p(up) + 2 * math.log1p(ld.ul) + dep * math.log1p(ua))
        Dx = exp_up(logD + eD)  # >= the exact decay
        t = qa.unsqueeze(-2) * ka[:, sl].unsqueeze(-3) * Dx  # [B, r, mc, d]
        tv = t.sum(-1)  # sum_c |q D k| per key
        first = Lam + n_exp * (k_e + up) + 3 * up + 2 * ld.ul + dep * ua
        lin_d += ((t * (Lam + n_exp * k_e)).sum(-1)) @ va[:, sl]

        qk = qa.unsqueeze(-2) * ka[:, sl].unsqueeze(-3)
        if cmp is None:
            err += (_path(qk, Dx, logD, eD, vis, logH).sum(-1)) @ va[:, sl]
            err += tv @ ld.err(v[:, sl])
            lin += ((t * first).sum(-1)) @ va[:, sl]
        else:
            # k^ = k (1 + theta) + eta: the term's factor (1 + theta) rho, plus eta rho
            assert k_rel is not None and k_abs is not None
            kr = k_rel[:, sl].unsqueeze(-3)
            qa_ = qa.unsqueeze(-2) * k_abs[:, sl].unsqueeze(-3)
            ta = qa_ * Dx
            logHk = logH + torch.log1p(kr)  # H (1 + k_rel)
            hk = _path(qk, Dx, logD, eD, vis, logHk) + _path(qa_, Dx, logD, eD, vis, logHk, False)
            err += hk.sum(-1) @ va[:, sl]
            err += (tv + ta.sum(-1)) @ ld.err(v[:, sl])
            lin += ((t * (first + kr) + ta).sum(-1)) @ va[:, sl]
            tv = tv + ta.sum(-1)
        mag += tv @ va[:, sl]
        vis2 = vis.squeeze(-1)
        und_p += torch.where(vis2, q1 @ k1[:, sl].transpose(-1, -2), 0.0) @ va[:, sl].clamp_min(1)
        # the decay may be below T_e (a visible key; across a reset it is an exact 0): each
        # exp on its path is of an exact factor >= the decay, its argument within Lam
        # (eD's included) and its result within 1 - k_e (a review: a chunk's fp16 span
        # sum put a decay 1.004 T_e at 0.995 T_e, flushed, 10x outside)
        low_arg = logD - Lam + (math.log1p(-k_e) if k_e < 1 else -math.inf)
        low = (low_arg - 4 * U64 * (logD.abs() + Lam + 1) < logT_e) & vis & (logD > -math.inf)
        if bool(low.any()):
            # U_e per exp, or what a flush loses (the term itself, within its path factor
            # H) plus a subnormal spacing per exp: the lesser (quotient.flushed)
            cf = torch.minimum(
                upper(U_e * n_exp, 1), upper(exp_up(logD + eD + logH) + fc.underflow * n_exp, 3)
            )
            tl = torch.where(low, qa.unsqueeze(-2) * k_hi[:, sl].unsqueeze(-3) * cf, 0.0)
            und_e += tl.sum(-1) @ va[:, sl]
        # the state's entries as the kernel forms them: each term at its path factor (a
        # computed decay may exceed its exact one by the exp's error, and the exact one is
        # <= 1; a review: fp16 decays of 1 + 2^-10 grew a state e^2 over 2048 steps past
        # fp16, inf under a finite bound)
        grow = exp_up(logD + eD + logH).amax(-1)  # [B, r, mc]
        st_sum += torch.where(vis2, s_key[:, None, sl] * grow, 0.0).sum(-1)
        k_max = torch.maximum(k_max, torch.where(vis2, k_key[:, None, sl], 0.0).amax(-1))
        tq = q.unsqueeze(-2) * k[:, sl].unsqueeze(-3) * torch.exp(logD)
        if cmp is not None:
            sq_k += ((tq * tq * kr * kr).sum(-1)) @ (v[:, sl] ** 2)
        o += tq.sum(-1) @ v[:, sl]
        sq += (tq * tq).sum(-1) @ (v[:, sl] ** 2)
        o_c += torch.einsum("brjc,bjv->brcv", tq, v[:, sl])
        sq_c += torch.einsum("brjc,bjv->brcv", tq * tq, v[:, sl] ** 2)
    n_st = 3 + (0 if cmp is None else cmp.step_sums)
    state_u = (n_st * U_a * nvis)[:, None] * qa.sum(-1, keepdim=True)
    sc_p = max(1.0, abs(sc))  # the scale, if it comes after an underflowing product
    tiny = upper(sc_p * (5 * U_a * und_p + state_u) + abs(sc) * und_e, 2 * m + d + 10)
    # the decays' exps and computed gates are not independent from step to step (a decay
    # that does not change, as in H3 and every LTI model, reuses one rounded exp: 2.4x
    # outside the level with independent ones): their first-order part adds linearly
    # (lin_d), the products' roundings (up) stay in the variance
    decay_var = up * up
    if skip is not None:
        # D u: its own error, and its passage through every addition of the output's sum
        assert cmp is not None and skip_abs is not None
        s_abs = skip.abs()
        dep_r = dep[:, :, 0]  # [r, 1]
        log_hs = math.log1p(cmp.skip_rel) + dep_r * math.log1p(ua)
        Hs = upper(torch.exp(log_hs), 2)
        err += s_abs * excess(log_hs) + skip_abs * Hs  # Hs - 1 without cancellation
        lin += s_abs * (cmp.skip_rel + dep_r * ua) + skip_abs
        mag += s_abs + skip_abs
        o += skip
        sq += skip * skip
        sq_k += (skip * cmp.skip_rel) ** 2
    sound = upper(abs(sc) * err + tiny, 2 * m + d + 12)
    # probabilistic: per term products and loads independent; the error of the gate of
    # step l (its exp and its product; one per chunk of b_eff steps when chunked) scales,
    # per channel, the partial sum of the terms j < l: the squared partial sums averaged
    # over orders, as for the sums themselves
    n4 = nvis[:, None, None]
    decay = order_sq(o_c, sq_c, n4).sum(-2)
    var = (
        sc
        * sc
        * (
            sq * (3 * up * up + 2 * ld.ul**2)
            + sq_k
            + decay * decay_var / b_eff
            + ua * ua * order_sq(o, sq, (nvis * d)[:, None])
        )
    )
    first = abs(sc) * lin
    rem = (sound - first - tiny).clamp_min(0.0)
    typical = torch.minimum(sound, lam * torch.sqrt(var / 3) + abs(sc) * lin_d + tiny + rem)
    o_abs = (abs(sc) * o).abs() + gamma(2 * m * d + 8, U64) * abs(sc) * mag
    # the scale multiplies once (correctly rounded; exact by a power of two), then the store
    sound, typical, last = finish(sound, typical, o_abs, precision, ulps=_scale_ulps(sc))
    # intermediates: loads into compute, the products q_c k_jc (the chunked form forms them
    # before the decay), the state's entries (sum_j k_jc v_je, decays <= 1), each possibly
    # scaled first
    (lim, p_name), scq = precision.products_overflow(), max(1.0, abs(sc)) * (1 + uc) ** 4
    assert key_over is not None and key_made is not None
    full = lambda m: m.unsqueeze(-1).expand_as(sound)  # noqa: E731
    skip_over = torch.zeros_like(sound, dtype=torch.bool)
    if skip is not None and cmp is not None and skip_abs is not None:
        skip_over = skip.abs() * (1 + cmp.skip_rel) + skip_abs >= lim
    made, st_all = blk.sees(key_made), st_sum
    if reach is not None:  # what a chunked kernel forms past the row's keys
        k_max, st_all = torch.maximum(k_max, reach[0]), torch.maximum(st_sum, reach[1])
        made = made | reach[2]
    reasons = {
        f"load into {fc.name}": ld.rows_over(q, key_over).expand_as(sound),
        f"products q.k in {p_name}": (scq * qa.amax(-1) * k_max >= lim)
        .unsqueeze(-1)
        .expand_as(sound),
        f"state k v in {p_name}": (scq * st_all >= lim).unsqueeze(-1).expand_as(sound),
        # a query times a state (its entries <= st_sum), the chunked form's score sums over
        # the channels (in accumulate), the skip term's product, the computed keys
        f"products q.state in {p_name}": full(scq * qa.amax(-1) * st_sum >= lim),
        f"score sums q.k in {fa.name}": full(scq * qa.sum(-1) * k_max >= fa.overflow()),
        f"skip product in {p_name}": skip_over,
        f"computed keys in {p_name}": full(made),
        f"state and sums in {fa.name}": (abs(sc) + 1) * mag * (1 + uc) ** 4 >= fa.overflow(),
        # the products' underflow allowance, U_a prod max(1, |x|), past float64 (a review:
        # q, k, v of 1e153 in fp64, inf with no reason)
        "underflow allowance in float64": ~torch.isfinite(tiny).expand_as(sound),
        **last,
    }
    return unbounded(sound, typical, reasons)


def gated_rounding_state(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    precision: Precision,
    sc: float,
    log_g: torch.Tensor,
    lam: float,
    rows: torch.Tensor | None = None,
    *,
    computed: Computed | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`gated_rounding`'s sound bound from per-channel decayed key states
    (``evaluation="state"``; :func:`._state.scan`, ``O((n + rows) d_k d_v)`` time): the
    same model with each term's path factor bounded by one that separates into a row and
    a key part. With ``G`` the prefix sums of the log-gates, a term's decay is ``exp(G_t -
    G_j)`` and its log path factor ``logH`` is at most ``(a + u64)(G_j - G_t) + eG_t + eG_j
    + nu (t - j) + nu0 + C_t`` (the exponent coefficient ``a_t`` at most its value at the
    longest span; ``n_exp`` at most ``(t - j) / block + 3``), so ``t (e^{logH} - 1)`` is
    the difference of two sums of separable exponentials, each a decayed state of the
    kernel's own form (``sum_j e^{-G_j} |k_j| |v_j|``). Underflow: the no-decay products
    from monomial states, the exps that may fall below ``T_e`` from per-channel prefix
    sums over the keys old enough to decay that far. ``"typical"``: the probabilistic
    level at ``lam`` (:func:`gated_rounding`'s model; its sum of squared terms from states
    of the squared decays, its higher-order part from one more state; never below the
    pair evaluation's). ``computed`` (:class:`Computed`, as in :func:`gated_rounding`):
    the log-gates' errors raise the exponent's coefficient by ``gate_rel`` and the
    per-step term by ``gate_abs``; a computed key ``k (1 + theta) + eta`` makes a term's
    factor ``(|k| + k_abs)(1 + k_rel) e^{logH} - |k|``, with states of those key factors;
    the skip term is per row. Rows whose float64 states cannot hold their terms
    (:data:`._state.GAP`) take the pair evaluation, both levels, and so do log-gates with
    resets (``-inf``: :func:`gate_resets`)."""
    from attnprec.analysis.bounds import _state

    if gate_resets(log_g) is not None:
        return gated_rounding(q, k, v, precision, sc, log_g, lam, rows, computed=computed)
    fc, fa = precision.compute, precision.accumulate
    el = precision.elementary
    uc, ua = fc.u, fa.u
    up = precision.product_u()
    ld = Loaded(precision)
    B, n, d = q.shape
    dv = v.shape[-1]
    blk = precision.block
    b_eff = 1 if blk is None else min(blk, max(n, 1))  # (as gated_rounding's)
    k_e = precision.op_error("exp")
    # the log-gates' span sums round in compute or in accumulate, the exp's argument in compute
    a_arg = (b_eff + 1) * up + el.exp_arg * uc
    lpath = math.log1p(k_e) + math.log1p(up)  # per exp on a term's path
    if blk is None:  # n_exp = t - j, a_t = a_arg
        a_b, nu, nu0 = a_arg, lpath, 0.0
    else:  # n_exp = ceil(span / b) + 2 <= span / b + 3, a_t <= a_arg + up ceil(n / b)
        a_b, nu, nu0 = a_arg + up * math.ceil(n / b_eff), lpath / b_eff, 3 * lpath
    qa, ka, va, verr = ld.abs(q), ld.abs(k), ld.abs(v), ld.err(v)
    # (the decays' exps and gates add linearly at the probabilistic level: gated_rounding)
    decay_var = up * up
    # the decays' first-order part per step of a term's path: its exp's (per chunk when
    # chunked, and two more), a computed gate's absolute error
    k_step, k_0 = (k_e, 0.0) if blk is None else (k_e / b_eff, 3 * k_e)
    k_hi, kr_max, skip = ka, 0.0, None  # |k| as the kernel holds it
    if computed is not None:
        # computed log-gates: gate_rel |log D| + gate_abs (t - j) more in Lambda
        a_b, nu = a_b + computed.gate_rel, nu + computed.gate_abs
        k_step += computed.gate_abs
        kr = computed.k_rel.expand_as(k)
        kab = computed.k_abs.expand_as(k)
        k_hi = ka * (1 + kr) + kab
        kr_max = float(kr.max()) if kr.numel() else 0.0
        skip = computed.skip
    G, eG = gate_sums(log_g)
    eG_max = eG.amax((-1, -2), keepdim=True) if eG.numel() else eG
    pos = torch.arange(n, dtype=torch.float64).reshape(1, n, 1)
    # decays from above: exp((1 - 8 u64) (G_t - G_j) + (eG_t + eG_j)(1 + 4 u64)) (1 + 8 u64)
    # >= the model's Dx (its exponent's roundings, eD's u64 |log D|, exp_up's margins);
    # the key part of logH
    Y0 = -(1 - 8 * U64) * G + eG * (1 + 4 * U64)
    kap = (a_b + U64) * G + eG - nu * pos
    kap = kap + 4 * U64 * kap.abs()
    # the key part of the path factor's states, exp(Y0 + kap): one exponent with the decay's,
    # in units of its own running maximum (its own scan), so that neither part over- or
    # underflows alone where |G| is large (strong decays, long sequences)
    Y1 = Y0 + kap
    Y1 = Y1 + 2 * U64 * (Y0.abs() + kap.abs())
    # kap less its least value per channel (>= 0: a state factor), for the higher-order part
    k_min = kap.amin(1, keepdim=True) if n else kap[:, :1]
    kap_up = (kap - k_min).clamp_min(0.0)
    kap_max = float(kap.abs().max()) if n else 0.0
    # the decays' part alone (their exps, exponents, gates: linear at the probabilistic
    # level), as kap: a_b (G_j - G_t) + eG_j + eG_t + k_step (t - j) + k_0 = rho_d + kap_d,
    # over its least value per channel (a state factor >= 0)
    kap_d = a_b * G + eG - k_step * pos
    kap_d = kap_d + 4 * U64 * kap_d.abs()
    kd_min = kap_d.amin(1, keepdim=True) if n else kap_d[:, :1]
    kap_d_up = (kap_d - kd_min).clamp_min(0.0)
    kp, km = k.clamp_min(0.0), (-k).clamp_min(0.0)
    Gcols = torch.cat([va, verr, v], -1)  # [|v~|, load error, v]
    key_over = ld.over(v).any(-1)
    if computed is None:  # a computed key is not loaded
        key_over = key_over | ld.over(k).any(-1)
    # a load past compute anywhere in the sequence: every row (Loaded.rows_over)
    key_any = key_over.any(-1, keepdim=True)
    key_over = key_over.double().unsqueeze(-1)
    k_key = k_hi.amax(-1, keepdim=True)
    # computed keys whose forming may overflow (their operands' products, or the key)
    key_made = k_key >= precision.products_overflow()[0] if computed is not None else k_key < 0
    if computed is not None and computed.over is not None:
        key_made = key_made | computed.over.unsqueeze(-1)
    grow = _path_growth(precision, n, d, eG, computed)
    reach = _chunk_reach(precision, k_hi, va, key_made[..., 0], grow)
    plain = torch.cat([k_key * va.amax(-1, keepdim=True)], -1)
    peak = torch.cat([key_over, k_key, kap.amax(-1, keepdim=True), key_made.double()], -1)
    # underflow of the no-decay products (sum_c q1 k1 v1; a computed key's operands each,
    # as in _block), and the exps' (sum_c qa ka va)
    q1, k1 = qa.clamp_min(1.0), k_hi.clamp_min(1.0)
    if computed is not None and computed.k_und is not None:
        k1 = torch.maximum(k1, computed.k_und.expand_as(k1))
    n_st = 3 + (0 if computed is None else computed.step_sums)
    sc_p = max(1.0, abs(sc))  # the scale, if it comes after an underflowing product
    idx_all = torch.arange(n) if rows is None else rows

    # the probabilistic level's sum of squared terms sum_j sum_c (q_c k_jc D_jc v_j)^2:
    # states of the squared decays (exponent 2 Y0 >= 2 log D), per row; chunks end where the
    # decays' exponent rises by GAP / 2 (here and in the main states), so no row's terms sit
    # GAP below its unit (such rows would take the pair evaluation)
    def squares(s: _state.Scan) -> dict[str, torch.Tensor]:
        t = s.idx
        X0 = (1 - 8 * U64) * G[:, t] + eG[:, t] * (1 + 4 * U64)
        base = q[:, t] ** 2 * torch.exp(2 * X0 + s.m)
        rel = (1 + s.rho + gamma(d + 4, U64)) * (1 + 16 * U64)
        out = {f"sq{i}": torch.einsum("brc,brck->brk", base, S) * rel for i, S in enumerate(s.S)}
        far = ((2 * Y0[:, t] - s.m).amin(-1) < -_state.GAP).unsqueeze(-1)
        return {**out, "far": far.expand_as(out["sq0"])}

    empty = torch.zeros(B, n, 0, dtype=torch.float64)
    # sum_j (q k D v)^2, and with the computed keys' k_rel^2 (the pair evaluation's sq_k)
    sq_facs: list[torch.Tensor | None] = [ka * ka]
    if computed is not None:
        sq_facs.append((ka * kr) ** 2)
    sq_all = _state.scan(2 * Y0, sq_facs, v * v, [], empty, empty, True, rows, squares, True)
    sq_far = sq_all["far"] | ~torch.isfinite(sq_all["sq0"])
    und = _state.power_sums(
        [(q1, k1, va.clamp_min(1.0))], [1], True, rows, lambda i, P: {"p": P[0][1]}
    )["p"]
    # exps below T_e: a key whose decay may fall there (G_j - G_t > -log T_e - margin) is
    # among the oldest ones (G non-increasing in j): per channel a prefix j <= j0(t, c)
    logT_e = precision.exp_exact_log()
    U_e = precision.exp_underflow()
    U_a = max(fc.underflow, fa.underflow)
    vm = va.amax(-1, keepdim=True)
    P0 = torch.cumsum(k_hi * vm, 1)
    P1 = torch.cumsum(k_hi * vm * pos, 1)
    # what a flush may lose: those keys' terms at their path factors, e^{X0 + rho_t} times
    # this prefix log-sum of e^{Y1} |k| max|v| (float64 log-adds: each off by 4 u64 of its
    # operands' modulus and 2 u64, carried with derivative <= 1; gated_rounding's cf)
    LK = torch.logcumsumexp(Y1 + torch.log(k_hi * vm), 1)
    lk_top = float(LK.nan_to_num(posinf=0.0, neginf=0.0).abs().amax()) if LK.numel() else 0.0
    lk_err = upper(n * (4 * lk_top + 2) * U64, 4)
    Gs = (-G).transpose(1, 2).contiguous()  # [B, d, n], non-decreasing in n
    (lim, p_name), scq = precision.products_overflow(), max(1.0, abs(sc)) * (1 + uc) ** 4
    g3 = 1 + gamma(16, U64)
    h_max = float(
        (k_hi.amax() if ka.numel() else 0.0)
        * (1 + kr_max)
        * exp_float(float(eG_max.max()) if eG.numel() else 0.0)
    )
    h_max = (1 + h_max) * (1 + float(Gcols.abs().amax()) if Gcols.numel() else 1.0)

    def row_rho(t: torch.Tensor, nvis: torch.Tensor) -> torch.Tensor:
        """The row part of logH, ``[B, r, C]``."""
        r = t.numel()
        tt = t.to(torch.float64).reshape(1, r, 1)
        Gt, eGt = G[:, t], eG[:, t]
        dep = (key_sums(precision, nvis) + d + 2 + (skip is not None)).reshape(1, r, 1)
        C_t = 3 * math.log1p(up) + 2 * math.log1p(ld.ul) + dep * math.log1p(ua)
        rho_t = -(a_b + U64) * Gt + eGt + nu * tt + nu0 + C_t
        # logH's float64 evaluation and excess()'s margins (|kap| <= the row's moduli)
        # (eG is nondecreasing in t: eG_j <= eG_t for every key the row sees)
        slack = gamma(16, U64) * ((a_b + 1) * Gt.abs() + 2 * eGt + nu * tt + nu0 + C_t + 1)
        return rho_t * g3 + slack

    # the upper sums of the terms' path factors: sum_j |q| e^{X0 + rho + Y0 + kap} ... from
    # the states over exp(Y1) (the exps' arguments' float64 roundings raised)
    h_max1 = (1 + kr_max) * float(k_hi.amax()) * float(va.amax()) if n * dv else 0.0

    def path_fn(s: _state.Scan) -> dict[str, torch.Tensor]:
        t = s.idx
        X0 = (1 - 8 * U64) * G[:, t] + eG[:, t] * (1 + 4 * U64)
        rho_t = row_rho(t, s.nvis)
        arg = X0 + rho_t + s.m
        e1 = qa[:, t] * exp_up(arg + 4 * U64 * (X0.abs() + rho_t.abs() + s.m.abs()))
        up1 = (1 + s.rho + gamma(d + 4, U64)) * (1 + 8 * U64)
        out = {f"one{i}": torch.einsum("brc,brck->brk", e1, S) * up1
               for i, S in enumerate(s.S)}  # fmt: skip
        # the states' exps that underflow: 2^-1074 each, times a factor and a column
        fl1 = n * 2.0**-1070 * e1.sum(-1, keepdim=True) * h_max1
        out["one0"] = out["one0"] + fl1
        far = ((Y1[:, t] - s.m).amin(-1) < -_state.GAP).unsqueeze(-1)
        return {**out, "far": far.expand_as(out["one0"])}

    path_facs: list[torch.Tensor | None] = [ka]
    if computed is not None:
        path_facs = [ka * (1 + kr), kab * (1 + kr)]
    path = _state.scan(Y1, path_facs, va, [], empty, empty, True, rows, path_fn, True)
    path_far = path["far"] | ~torch.isfinite(path["one0"])

    def rows_fn(s: _state.Scan) -> dict[str, torch.Tensor]:
        t = s.idx
        r = t.numel()
        Gt, eGt = G[:, t], eG[:, t]
        X0 = (1 - 8 * U64) * Gt + eGt * (1 + 4 * U64)
        nvis = s.nvis
        rho_t = row_rho(t, nvis)
        tt = t.to(torch.float64).reshape(1, r, 1)
        dep = (key_sums(precision, nvis) + d + 2 + (skip is not None)).reshape(1, r, 1)
        # the model's Dx >= exp((1 + 4 u64)(G_t - G_j)): the states' exponents less delta
        # (|G_t - G_j| <= |G_t|)
        delta = upper(16 * U64 * Gt.abs() + 4 * eGt, 4)
        # a channel whose visible terms all sit below its unit by GAP (a strong decay later
        # in the chunk): the row takes the pair evaluation
        far = (Y0[:, t] - s.m).amin(-1) < -_state.GAP  # [B, r]
        base = qa[:, t] * torch.exp(X0 + s.m)  # [B, r, C]
        S0, Sp, Sm, SK = s.S[:4]
        at = torch.searchsorted(idx_all, t)
        # the states' error, the sum over channels, exp_up's (1 + 4 u64)
        r_all = s.rho + gamma(d + 4, U64)
        up_ = (1 + r_all) * (1 + 8 * U64)
        lo_ = 1 - r_all
        va_c, er_c, v_c = slice(0, dv), slice(dv, 2 * dv), slice(2 * dv, 3 * dv)
        e_del = torch.exp(-delta)
        one = path["one0"][:, at]
        zero = torch.einsum("brc,brck->brk", base * e_del, S0[..., va_c]) * lo_
        mag = torch.einsum("brc,brck->brk", base, S0[..., va_c]) * up_
        # the decays' first-order part (linear at the probabilistic level): sum_j t_j |v_j|
        # (rho_d + kap_d_j) from the states of t |v| and t |v| kap_d_up; rho_d's negative
        # part against their lower sums
        rho_d = -a_b * Gt + eGt + k_step * tt + k_0 + kd_min
        rho_d = rho_d + gamma(8, U64) * (a_b * Gt.abs() + eGt + k_step * tt + k_0 + kd_min.abs())
        d_hi = torch.einsum("brc,brck->brk", base * rho_d.clamp_min(0.0), S0[..., va_c]) * up_
        d_lo = torch.einsum("brc,brck->brk", base * e_del * rho_d.clamp_max(0.0), S0[..., va_c])
        d_key = torch.einsum("brc,brck->brk", base, s.S[-1][..., va_c]) * up_
        d_lo = d_lo * torch.where(d_lo < 0, lo_, up_)
        lin_d = d_hi + d_lo + d_key
        lin_d = upper(lin_d + gamma(8, U64) * (d_hi + d_lo.abs() + d_key), 2).clamp_min(0.0)
        ldv = torch.einsum("brc,brck->brk", base, S0[..., er_c]) * up_
        # the states' exps that underflow: 2^-1074 each, times H <= max|k~| e^{eG} and g
        fl = n * 2.0**-1070 * base.sum(-1, keepdim=True) * h_max
        one_a = a_lo = kr_lo = torch.zeros_like(one)
        if computed is not None:
            # the computed keys' eta terms ta = |q| D k_abs: (1 + k_rel) e^{logH} ta in the
            # error (one_a), ta itself in the magnitudes and the values' load errors; a
            # lower sum of ta and of t k_rel at the states' decays, for the higher-order part
            # (which takes every term at those decays, below)
            Sa, Skr = s.S[4:6]
            one_a = path["one1"][:, at]
            a_lo = torch.einsum("brc,brck->brk", base, Sa[..., va_c]) * lo_
            kr_lo = torch.einsum("brc,brck->brk", base, Skr[..., va_c]) * lo_
            mag = mag + torch.einsum("brc,brck->brk", base, Sa[..., va_c]) * up_
            ldv = ldv + torch.einsum("brc,brck->brk", base, Sa[..., er_c]) * up_
        err = upper((one + one_a - zero).clamp_min(0.0) + ldv + fl, 8) * (1 + gamma(4, U64))
        err_s = lin_s = torch.zeros_like(err)
        if skip is not None:
            # D u: its own error, and its passage through every addition of the output's sum
            assert computed is not None
            s_abs = skip[:, t].abs()
            sa = computed.skip_abs
            sk_abs = torch.zeros_like(s_abs) if sa is None else sa.expand_as(skip)[:, t]
            log_hs = math.log1p(computed.skip_rel) + dep * math.log1p(ua)
            Hs = upper(torch.exp(log_hs), 2)
            err_s = upper(s_abs * excess(log_hs) + sk_abs * Hs, 2)  # Hs - 1 uncancelled
            lin_s = s_abs * (computed.skip_rel + dep * ua) + sk_abs
            err = upper(err + err_s, 1)
            mag = mag + s_abs + sk_abs
        # exps below T_e: the pairs' test (an exp's argument within Lam <= a_b |log D| +
        # eD + gate_abs span, its result within 1 - k_e), the span at most t
        g_abs = 0.0 if computed is None else computed.gate_abs
        thr = -logT_e + (math.log1p(-k_e) if k_e < 1 else -math.inf) - 2 * eGt - g_abs * tt
        thr = (thr - 8 * U64 * (Gt.abs() + thr.abs() + 1)) / (1 + a_b + U64)  # [B, r, C]
        cnt = torch.searchsorted(Gs, (-Gt - thr).transpose(1, 2).contiguous())  # [B, C, r]
        j0 = (cnt.transpose(1, 2) - 1).clamp(max=t.reshape(1, r, 1))  # [B, r, C]
        has = j0 >= 0
        j0c = j0.clamp_min(0)
        p0, p1 = P0.gather(1, j0c), P1.gather(1, j0c)
        if blk is None:  # sum_j (t - j) x_j
            w_e = tt * p0 - p1
        else:  # sum_j (ceil((t - j) / b) + 2) x_j <= (t / b + 3) P0 - P1 / b
            w_e = (tt / b_eff + 3) * p0 - p1 / b_eff
        w_e = w_e + gamma(2 * n + 8, U64) * (tt * p0 + p1)  # the prefix sums' cancellation
        w_e = w_e.clamp_min(0.0)
        lk = LK.gather(1, j0c) + lk_err
        lost = exp_up(X0 + rho_t + lk + 4 * U64 * (X0.abs() + rho_t.abs() + lk.abs()))
        lost = torch.where(lk == -math.inf, 0.0, lost)  # (no weight: -inf + inf is NaN)
        cf = torch.minimum(upper(U_e * w_e, 1), upper(lost + fc.underflow * w_e, 3))
        und_e = (qa[:, t] * torch.where(has, cf, 0.0)).sum(-1, keepdim=True)
        und_p = und[:, torch.searchsorted(idx_all, t)]
        state_u = n_st * U_a * nvis.reshape(1, r, 1) * qa[:, t].sum(-1, keepdim=True)
        tiny = sc_p * (5 * U_a * und_p + state_u) + abs(sc) * upper(und_e, n + 4)
        tiny = upper(tiny, 2 * n + d + 10)
        sound = upper(abs(sc) * err + tiny, 2 * n + d + 12)
        # the exact output from the signed states (decays within delta of the states')
        o = torch.einsum(
            "brc,brck->brk", q[:, t] * torch.exp(X0 + s.m), Sp[..., v_c] - Sm[..., v_c]
        )
        if skip is not None:
            o = o + skip[:, t]
        o_err = (torch.expm1(delta).amax(-1, keepdim=True) + 2 * s.rho) * mag + fl
        o_abs = abs(sc) * (o.abs() + o_err) + gamma(2 * n * d + 8, U64) * abs(sc) * mag
        sound = torch.where(torch.isnan(sound), math.inf, sound)
        # the probabilistic level (the pair evaluation's model): the variance from the
        # squared states and the per-channel outputs (their errors at most o_err in all,
        # Minkowski; order_sq_sum over the channels); the higher-order part of a term's
        # excess(logH) - first <= e^L - 1 - L <= (L / 2)(e^L - 1) at L <= rho_t + kap_j
        # <= L_max (the visible keys' largest kap), plus the loads' errors (which the
        # first-order part leaves out)
        sq, sq_f = sq_all["sq0"][:, at], sq_far[:, at]
        sq_k = sq_all["sq1"][:, at] if computed is not None else torch.zeros_like(sq)
        if skip is not None:
            assert computed is not None
            sq = sq + skip[:, t] ** 2
            sq_k = sq_k + (skip[:, t] * computed.skip_rel) ** 2
        o_c = q[:, t].unsqueeze(-1) * torch.exp(X0 + s.m).unsqueeze(-1) * (Sp - Sm)[..., v_c]
        oc2 = (torch.sqrt((o_c * o_c).sum(-2)) + o_err) ** 2
        o_hi = o.abs() + o_err
        var = (
            sc
            * sc
            * (
                sq * (3 * up * up + 2 * ld.ul**2)
                + sq_k
                + order_sq_sum(oc2, sq, nvis.reshape(1, r, 1)) * decay_var / b_eff
                + ua * ua * order_sq(o_hi, sq, (nvis * d).reshape(1, r, 1))
            )
        )
        # sum t (e^L - 1 - L) |v| with L = rho' + kap' (rho' = rho_t + min kap): the upper
        # sum of t e^L |v| (one, with the exps' roundings) less lower ones of t (1 + L) |v|
        mag_c = torch.einsum("brc,brck->brck", base, S0[..., va_c])
        rho_p = (rho_t + k_min).unsqueeze(-1)
        lin_lo = (mag_c * torch.where(1 + rho_p >= 0, lo_, up_) * (1 + rho_p)).sum(-2)
        lin_lo = lin_lo + torch.einsum("brc,brck->brk", base, SK[..., va_c]) * lo_
        # (computed keys: t ((1 + k_rel) e^L - 1 - L - k_rel) <= the same with L' = L +
        # log1p(k_rel) in e^L' - 1 - L'; ta ((1 + k_rel) e^L - 1) from its own sums)
        g_one = exp_float(8 * U64 * (kap_max + float(rho_t.abs().max()) + 1))
        one_up = one * g_one
        lin_lo = lin_lo + kr_lo
        h_two = (one_up - lin_lo).clamp_min(0.0) + gamma(8, U64) * (one_up + lin_lo.abs())
        L_max = (rho_t.amax(-1, keepdim=True) + s.peak[..., 2:3]).clamp_min(0.0)
        L_max = upper(L_max + math.log1p(kr_max), 2)
        h_one = L_max / 2 * (one - zero).clamp_min(0.0) * (1 + gamma(4, U64))
        h_a = (one_a * g_one - a_lo).clamp_min(0.0) + gamma(8, U64) * (one_a * g_one + a_lo)
        h_s = (err_s - lin_s).clamp_min(0.0) + gamma(8, U64) * (err_s + lin_s)
        rem = upper(torch.minimum(h_one, h_two) + h_a + h_s + ldv + fl, 6)
        rem = abs(sc) * rem + (sound - abs(sc) * err - tiny).clamp_min(0.0)
        typical = lam * torch.sqrt(var / 3) * (1 + 4 * U64) + abs(sc) * lin_d + tiny + rem
        typical = upper(typical, 4)
        typical = torch.where(torch.isnan(typical), sound, torch.minimum(typical, sound))
        sound, typical, last = finish(sound, typical, o_abs, precision, ulps=_scale_ulps(sc))
        full = lambda m: m.unsqueeze(-1).expand_as(sound)  # noqa: E731
        skip_over = torch.zeros_like(sound, dtype=torch.bool)
        if skip is not None:
            assert computed is not None
            s_a: torch.Tensor | float = 0.0
            if computed.skip_abs is not None:
                s_a = computed.skip_abs.expand_as(skip)[:, t]
            skip_over = skip[:, t].abs() * (1 + computed.skip_rel) + s_a >= lim
        # (a state entry as formed: the sum of |k v| times the growth of the row's paths)
        g_row = _path_growth(precision, n, d, eG, computed, t.to(torch.float64) + 1)
        k_max, st_all, made = s.peak[..., 1], s.plain[..., 0] * g_row, s.peak[..., 3] > 0
        st_own = st_all
        if reach is not None:  # what a chunked kernel forms past the row's keys (_block)
            k_max, st_all = torch.maximum(k_max, reach[0][:, t]), torch.maximum(st_all, reach[1])
            made = made | reach[2]
        reasons = {
            f"load into {fc.name}": full(ld.over(q[:, t]).any(-1) | key_any),
            f"products q.k in {p_name}": full(scq * qa[:, t].amax(-1) * k_max >= lim),
            f"state k v in {p_name}": full(scq * st_all >= lim),
            # as the pair evaluation's (_block)
            f"products q.state in {p_name}": full(scq * qa[:, t].amax(-1) * st_own >= lim),
            f"score sums q.k in {fa.name}": full(scq * qa[:, t].sum(-1) * k_max >= fa.overflow()),
            f"skip product in {p_name}": skip_over,
            f"computed keys in {p_name}": full(made),
            f"state and sums in {fa.name}": (abs(sc) + 1) * mag * (1 + uc) ** 4 >= fa.overflow(),
            "underflow allowance in float64": ~torch.isfinite(tiny).expand_as(sound),
            **last,
        }
        out = unbounded(sound, typical, reasons)
        out["far"] = full(far) | sq_f | path_far[:, at]  # (the other states' far rows too)
        return out

    facs = [ka, kp, km, ka * kap_up]
    if computed is not None:
        facs += [kab, ka * kr]  # ta alone; t k_rel
    facs.append(ka * kap_d_up)  # (last: the decays' first-order part)
    out = _state.scan(Y0, facs, Gcols, [], plain, peak, True, rows, rows_fn, True)  # type: ignore[arg-type]
    return _state.merge_far(
        out,
        idx_all,
        lambda sel: gated_rounding(q, k, v, precision, sc, log_g, lam, sel, computed=computed),
    )
