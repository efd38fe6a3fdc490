"""Product orders of real recurrent kernels that a declaration allows, emulated exactly
(every operation rounded to fp32, or fp16 compute): the gated, state-space and H3 bounds
hold for each, not only for the model's order.

Found by a review (each case failed before its fix): an underflow of an intermediate
product is carried by whatever multiplies it afterwards, so it must be charged at those
factors' moduli, for every order. FLA scales the query first (``b_q = q * scale``), so
``fl(scale q)``'s underflow is carried by ``k v``, not by ``|scale|``; Mamba's CUDA kernel
forms ``B (delta u)`` and SSD ``B (x dt)``, so an underflow of ``delta u`` is carried by a
large ``B`` alone, which ``max(1, |delta B|)`` does not hold; zoh's key may be formed as
``expm1(delta A) B`` divided by ``A`` last, so that product's underflow is carried by
``1 / |A|``; H3 may apply its taps after the products ``k v``. fp32 results below the
normal range are kept (IEEE) or flushed (``-ftz``).
"""

from __future__ import annotations

import math

import pytest
import torch
from _declared import ulp_off

from attnprec.analysis.bounds import attention_error_bound
from attnprec.analysis.precision import Precision
from attnprec.analysis.reference import reference

F64 = torch.float64
MIN_NORMAL = 2.0**-126


def r32(x, ftz: bool = False):
    """``x`` rounded to fp32; with ``ftz`` results below the normal range flushed to 0."""
    y = torch.as_tensor(x, dtype=F64).to(torch.float32).to(F64)
    return torch.where(y.abs() < MIN_NORMAL, torch.zeros_like(y), y) if ftz else y


def r16(x, ftz: bool = False):
    """``x`` rounded to fp16 (subnormals kept)."""
    return torch.as_tensor(x, dtype=F64).to(torch.float16).to(F64)


def f32(*xs: float) -> list[float]:
    return [float(r32(torch.tensor(x))) for x in xs]


def scan(q, g, kv, rp, rs, ftz: bool = False, q_first=None):
    """``S_t = g_t o S_{t-1} + kv(t)``, ``o_t = sum_c q~_tc S_tc`` over channels in order:
    products rounded by ``rp``, sums and the state by ``rs``; ``q_first(q_t)``: the query
    as the kernel forms it (scaled first)."""
    n, d = q.shape
    S, out = None, []
    for t in range(n):
        W = kv(t)
        S = W if S is None else rs(rs(rp(g[t][:, None] * S, ftz), ftz) + W, ftz)
        qt = q[t] if q_first is None else q_first(q[t])
        o = torch.zeros(S.shape[-1], dtype=F64)
        for c in range(d):
            o = rs(o + rp(qt[c] * S[c], ftz), ftz)
        out.append(o)
    return torch.stack(out)


def check(y, ref, bound) -> None:
    total = bound.total
    assert bool(torch.isfinite(total).all())
    gap = (y - ref.value).abs() - ref.radius
    assert bool((gap <= total).all()), f"error {float(gap.max()):.3e} > {float(total.min()):.3e}"


@pytest.mark.parametrize("ftz", [False, True])
@pytest.mark.parametrize(("block", "evaluation"), [(None, "pairs"), (16, "pairs"), (None, "state")])
def test_gated_query_scaled_first(ftz, block, evaluation):
    # q~ = fl(scale q) below fp32's normal range: its underflow times k v ~ 1e38
    sc = 2.0**-30
    q = torch.tensor(f32(1e-33, 2e-33), dtype=F64)[:, None]
    k = torch.tensor(f32(1e19, 1e19), dtype=F64)[:, None]
    v = torch.tensor(f32(1e19, -3e18), dtype=F64)[:, None]
    lg = torch.tensor([[-0.5], [-0.25]], dtype=F64)
    g = r32(torch.exp(lg), ftz)
    y = scan(
        q, g, lambda t: r32(k[t][:, None] * v[t][None, :], ftz), r32, r32, ftz,
        q_first=lambda qt: r32(sc * qt, ftz),
    )  # fmt: skip
    kw = dict(log_g=lg[None], scale=sc)
    ref = reference("gated", q[None], k[None], v[None], **kw)
    prec = Precision("fp32", block=block)
    b = attention_error_bound("gated", q[None], k[None], v[None], prec, evaluation=evaluation, **kw)
    check(y[None], ref, b)


def _selective(C, B, u, delta, A, disc, rp, rs, ftz=False):
    """Mamba's order: ``B (delta u)`` (euler) or ``B ((expm1(delta A) / A) u)`` (zoh)."""
    L = rp(delta * A, ftz)  # [T, N]
    g = rp(torch.exp(L), ftz)
    if disc == "euler":
        key = delta.expand_as(L)
    else:
        key = rp(rp(torch.expm1(L), ftz) / A, ftz)

    def kv(t):
        return rp(B[t] * rp(key[t] * u[t], ftz), ftz)[:, None]

    return scan(C, g, kv, rp, rs, ftz)


@pytest.mark.parametrize("ftz", [False, True])
@pytest.mark.parametrize("disc", ["euler", "zoh"])
@pytest.mark.parametrize(("block", "evaluation"), [(None, "pairs"), (16, "pairs"), (None, "state")])
def test_selective_scan_delta_u_first(ftz, disc, block, evaluation):
    # delta u ~ 3e-44 underflows, B = 1e30 carries it
    C = torch.tensor([[1.0], [0.5]], dtype=F64)
    B = torch.tensor(f32(1e30, 2e29), dtype=F64)[:, None]
    u = torch.tensor(f32(3e-24, -1e-24), dtype=F64)[:, None]
    delta = torch.tensor(f32(1e-20, 2e-20), dtype=F64)[:, None]
    A = torch.tensor([[-1.0]], dtype=F64)
    y = _selective(C, B, u, delta, A, disc, r32, r32, ftz)
    kw = dict(delta=delta[None], A=A, discretization=disc)
    ref = reference("selective_scan", C[None], B[None], u[None], **kw)
    prec = Precision("fp32", block=block)
    b = attention_error_bound(
        "selective_scan", C[None], B[None], u[None], prec, evaluation=evaluation, **kw
    )
    check(y[None], ref, b)


@pytest.mark.parametrize("ftz", [False, True])
@pytest.mark.parametrize(("block", "evaluation"), [(None, "pairs"), (16, "pairs"), (None, "state")])
def test_selective_scan_zoh_divided_last(ftz, block, evaluation):
    # zoh's key as ((expm1(delta A) B) / A) u: expm1(L) B ~ 8e-41 underflows, 1 / |A| = 2^100
    # carries it (1.45x outside the bound before, 3.5e5x with -ftz)
    C = torch.tensor([[1.0], [0.5]], dtype=F64)
    B = torch.tensor(f32(1e-10, 3e-10), dtype=F64)[:, None]
    u = torch.tensor(f32(1.0, -2.0), dtype=F64)[:, None]
    delta = torch.tensor(f32(1.0, 0.5), dtype=F64)[:, None]
    A = torch.tensor([[-(2.0**-100)]], dtype=F64)
    L = r32(delta * A, ftz)
    g, e = r32(torch.exp(L), ftz), r32(torch.expm1(L), ftz)

    def kv(t):
        return r32(r32(r32(e[t] * B[t], ftz) / A[0], ftz) * u[t], ftz)[:, None]

    y = scan(C, g, kv, r32, r32, ftz)
    kw = dict(delta=delta[None], A=A, discretization="zoh")
    ref = reference("selective_scan", C[None], B[None], u[None], **kw)
    prec = Precision("fp32", block=block)
    b = attention_error_bound(
        "selective_scan", C[None], B[None], u[None], prec, evaluation=evaluation, **kw
    )
    check(y[None], ref, b)


@pytest.mark.parametrize("evaluation", ["pairs", "state"])
def test_selective_scan_fp16_compute_ordinary(evaluation):
    # ordinary magnitudes: dt = u = 1e-3 (delta u below fp16's normal range), B = 100;
    # products in fp16, sums and the state in fp32, fp16 output
    C = torch.tensor([[1.0]], dtype=F64)
    B, u, delta = (r16(torch.tensor([[x]], dtype=F64)) for x in (100.0, 1e-3, 1e-3))
    A = torch.tensor([[-1.0]], dtype=F64)
    y = r16(_selective(C, B, u, delta, A, "euler", r16, r32))
    kw = dict(delta=delta[None], A=A, discretization="euler")
    ref = reference("selective_scan", C[None], B[None], u[None], **kw)
    prec = Precision("fp16", compute="fp16", accumulate="fp32")
    b = attention_error_bound(
        "selective_scan", C[None], B[None], u[None], prec, evaluation=evaluation, **kw
    )
    check(y[None], ref, b)


@pytest.mark.parametrize("ftz", [False, True])
@pytest.mark.parametrize("evaluation", ["pairs", "state"])
def test_ssd_x_dt_first(ftz, evaluation):
    # ssd_minimal on X * dt: x dt underflows, B = 1e30 carries it
    C = torch.tensor([[1.0], [2.0]], dtype=F64)
    B = torch.tensor(f32(1e30, 5e29), dtype=F64)[:, None]
    x = torch.tensor(f32(3e-24, 2e-24), dtype=F64)[:, None]
    dt = torch.tensor(f32(1e-20, 3e-20), dtype=F64)
    g = r32(torch.exp(r32(-dt, ftz)), ftz)[:, None]

    def kv(t):
        return r32(B[t][:, None] * r32(x[t] * dt[t], ftz)[None, :], ftz)

    y = scan(C, g, kv, r32, r32, ftz)
    kw = dict(dt=dt[None], A=-1.0)
    ref = reference("ssd", C[None], B[None], x[None], **kw)
    b = attention_error_bound(
        "ssd", C[None], B[None], x[None], Precision("fp32"), evaluation=evaluation, **kw
    )
    check(y[None], ref, b)


@pytest.mark.parametrize("ftz", [False, True])
@pytest.mark.parametrize("evaluation", ["pairs", "state"])
def test_h3_taps_after_kv(ftz, evaluation):
    # S_t = lam o S_{t-1} + sum_i s_i (k_{t-i} v_t): k v underflows, a tap of 1e30 carries it
    q = torch.tensor([[1.0], [1.0]], dtype=F64)
    k = torch.tensor(f32(1e-20, 2e-20), dtype=F64)[:, None]
    v = torch.tensor(f32(3e-24, 1e-24), dtype=F64)[:, None]
    shift = torch.tensor([f32(1e30, 1e29)], dtype=F64)
    ld = torch.tensor([-0.5], dtype=F64)
    g = r32(torch.exp(ld), ftz).expand(2, 1)

    def kv(t):
        W = torch.zeros(1, 1, dtype=F64)
        for i in range(shift.shape[-1]):
            if t - i >= 0:
                p = r32(shift[0, i] * r32(k[t - i][:, None] * v[t][None, :], ftz), ftz)
                W = r32(W + p, ftz)
        return W

    y = scan(q, g, kv, r32, r32, ftz)
    kw = dict(shift=shift, log_decay=ld)
    ref = reference("h3", q[None], k[None], v[None], **kw)
    b = attention_error_bound(
        "h3", q[None], k[None], v[None], Precision("fp32"), evaluation=evaluation, **kw
    )
    check(y[None], ref, b)


@pytest.mark.parametrize("block", [None, 16])
def test_witness_gated_underflow_carried_by_max_one(block):
    # a chunked kernel forms q k before v: q k = 1.5 2^-149 rounds (to even) to 2^-148 in
    # fp32, an error of 2^-150 that v = 2^100 carries into the output (a quarter of it).
    # Only max(1, |q|) max(1, |k|) max(1, |v|) U holds it: |q| |k| |v| U (|x| in place of
    # max(1, |x|) for q and k) is 1e-21, 7e5x below the error (a mutation study).
    q = torch.tensor([[[2.0**-100]]], dtype=F64)
    k = torch.tensor([[[1.5 * 2.0**-49]]], dtype=F64)
    v = torch.tensor([[[2.0**100]]], dtype=F64)
    lg = torch.zeros(1, 1, 1, dtype=F64)
    qk = r32(q * k)
    assert float(qk) == 2.0**-148  # the product below the normal range, rounded up
    y = r32(qk * v)
    kw = dict(log_g=lg, scale=1.0)
    ref = reference("gated", q, k, v, **kw)
    b = attention_error_bound("gated", q, k, v, Precision("fp32", block=block), **kw)
    assert float((y - ref.value).abs().max()) > 0.2 * float(ref.value.abs().max())
    check(y, ref, b)


def test_witness_gated_chunk_factorized_exps():
    # GLA's chunked form: q~ = q exp(G_t), k~ = k exp(-G_j) with G the chunk's inclusive
    # cumulative log-gates, so even the diagonal term (span 0) passes through two exps;
    # each errs up by its declared 4 ulps: 12 u. Without the chunked form's two extra
    # exps (n_exp = ceil(span / block)) 1.5x outside (0.46 with them; a mutation study).
    lg0 = float(r32(torch.tensor(-0.002)))
    e1 = ulp_off(math.exp(lg0), True, 4)
    e2 = ulp_off(math.exp(-lg0), True, 4)
    q = k = v = torch.ones(1, 1, 1, dtype=F64)
    y = r32(r32(q * e1) * r32(k * e2)) * v
    kw = dict(log_g=torch.tensor([[[lg0]]], dtype=F64), scale=1.0)
    ref = reference("gated", q, k, v, **kw)
    b = attention_error_bound("gated", q, k, v, Precision("fp32", block=16), **kw)
    assert float((y - ref.value).abs().max()) > 11 * 2.0**-24
    check(y, ref, b)


@pytest.mark.parametrize("evaluation", ["pairs", "state"])
def test_witness_gated_sums_depth(evaluation):
    # one chunk of the whole sequence (block = n), no decay (exps of 0, exact): the
    # chunked form's sequential sum over 1024 keys. Key 0's term 1 first, then terms just
    # above half an ulp of the partial sum, each addition rounding up by about u: (n - 1) u
    # in all. 0.97 of the bound; with the sums' depth halved (nvis // 2) 1.87x outside (a
    # mutation study).
    n = 1024
    v = torch.full((n, 1), 2.0**-24 * (1 + 2.0**-10), dtype=F64)
    v[0] = 1.0
    q, k = torch.ones(n, 1, dtype=F64), torch.ones(n, 1, dtype=F64)
    s, ys = torch.zeros((), dtype=F64), []
    for t in range(n):
        s = r32(s + r32(k[t, 0] * v[t, 0]))
        ys.append(r32(q[t, 0] * s))
    y = torch.stack(ys).reshape(1, n, 1)
    kw = dict(log_g=torch.zeros(1, n, 1, dtype=F64), scale=1.0)
    ref = reference("gated", q[None], k[None], v[None], **kw)
    prec = Precision("fp32", block=n)
    b = attention_error_bound("gated", q[None], k[None], v[None], prec, evaluation=evaluation, **kw)
    assert float((y - ref.value).abs()[0, -1, 0]) > (n - 2) * 2.0**-24
    check(y, ref, b)
