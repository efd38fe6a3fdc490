"""State-space methods (selective scan, SSD, LTI SSM): forms, recurrent decoding, bad input.

Tolerances are computed bounds: two implementations of the same exact output differ by at
most the sum of their rounding bounds (``attention_error_bound(...).rounding`` for the
float64 declaration they compute in, ``block`` their chunk: 1 for token by token, None
for the plain recurrence), and the log-space scan by the rule in its docstring.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnprec.analysis.bounds import attention_error_bound
from attnprec.analysis.bounds.rounding import upper
from attnprec.analysis.precision import Precision
from attnprec.analysis.reference import reference
from attnprec.attention import (
    SelectiveScanState,
    SSDState,
    selective_scan_attention,
    selective_scan_log,
    ssd_attention,
    ssm_attention,
)
from attnprec.lognum import SignedLog
from attnprec.testing import params as P
from attnprec.testing.inputs import make_inputs

F64 = torch.float64
FAMILIES = ("typical", "outliers", "sinks", "ties", "cancel")


def _fp64(block):
    return Precision("fp64", "fp64", "fp64", block=block)


def _rnd(method, q, k, v, block, **kw):
    """The float64 rounding bound of ``method`` for chunks of ``block`` (None: recurrence)."""
    return attention_error_bound(method, q, k, v, _fp64(block), **kw).rounding


def naive_selective(C, B, u, delta, A, D, disc):
    """The recurrence, one token at a time, in float64 (the block=None schedule)."""
    T, N = C.shape[-2:]
    Dv = u.shape[-1]
    batch = torch.broadcast_shapes(C.shape[:-2], B.shape[:-2], u.shape[:-2], delta.shape[:-2])
    delta = delta.expand(*batch, T, Dv)
    A = A.expand(Dv, N)
    h = torch.zeros(*batch, Dv, N, dtype=F64)
    ys = []
    for t in range(T):
        L = delta[..., t, :, None] * A
        f = delta[..., t, :, None] if disc == "euler" else torch.expm1(L) / A
        h = torch.exp(L) * h + f * B[..., t, None, :] * u[..., t, :, None]
        y = (h * C[..., t, None, :]).sum(-1)
        if D is not None:
            y = y + D * u[..., t, :]
        ys.append(y)
    return torch.stack(ys, -2)


@st.composite
def selective_cases(draw, max_n=12, max_d=4):
    """(C, B, u, params): sizes, a family, a regime of delta and A, per-channel or shared
    steps, with or without a skip, both discretizations, batch () or (2,)."""
    seed = draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    T = draw(st.integers(1, max_n))
    N = draw(st.integers(1, max_d))
    Dv = draw(st.integers(1, max_d))
    batch = draw(st.sampled_from(((), (2,))))
    fam = draw(st.sampled_from(FAMILIES))
    C, B, _ = make_inputs(fam, n_q=T, d_k=N, d_v=1, batch=batch, generator=g)
    _, _, u = make_inputs(fam, n_q=T, d_k=1, d_v=Dv, batch=batch, generator=g)
    regime = draw(st.sampled_from(P.SSM_REGIMES))
    per_channel = draw(st.booleans())
    width = Dv if per_channel else 1
    delta, amag = P._regime(regime, (*batch, T, width), g)
    A = -P._regime(regime, (width, N), g)[1]
    del amag
    params = {
        "delta": P._grid(delta),
        "A": P._grid(A),
        "discretization": draw(st.sampled_from(("euler", "zoh"))),
    }
    if draw(st.booleans()):
        params["D"] = P._grid(2 * torch.rand(Dv, generator=g, dtype=F64) - 1)
    return C, B, u, params


@given(selective_cases(), st.sampled_from([1, 3, 64]))
def test_selective_scan_equals_recurrence(case, chunk):
    C, B, u, p = case
    y = selective_scan_attention(C, B, u, chunk_size=chunk, **p)
    ref = naive_selective(C, B, u, p["delta"], p["A"], p.get("D"), p["discretization"])
    tol = upper(
        _rnd("selective_scan", C, B, u, chunk, **p) + _rnd("selective_scan", C, B, u, None, **p), 2
    )
    assert bool(((y - ref).abs() <= tol).all())
    assert y.shape == ref.shape and y.dtype == F64


@given(selective_cases(max_n=10))
def test_selective_scan_within_its_bound_of_the_reference(case):
    C, B, u, p = case
    r = reference("selective_scan", C, B, u, **p)
    y = selective_scan_attention(C, B, u, chunk_size=4, **p)
    assert bool(r.contains(y, _rnd("selective_scan", C, B, u, 4, **p)).all())


@given(selective_cases(max_n=16))
def test_decode_equals_full_call(case):
    C, B, u, p = case
    T = C.shape[-2]
    full = selective_scan_attention(C, B, u, **p)
    outs, st_ = [], None
    for t in range(T):
        kw = dict(p, delta=p["delta"][..., t : t + 1, :])
        y, st_ = selective_scan_attention(
            C[..., t : t + 1, :], B[..., t : t + 1, :], u[..., t : t + 1, :],
            state=st_, return_state=True, **kw,
        )  # fmt: skip
        outs.append(y)
    dec = torch.cat(outs, -2)
    assert isinstance(st_, SelectiveScanState)
    tol = upper(
        _rnd("selective_scan", C, B, u, 1, **p) + _rnd("selective_scan", C, B, u, 64, **p), 2
    )
    assert bool(((dec - full).abs() <= tol).all())
    # uneven pieces carry the state the same way
    cut = T // 2
    y1, s1 = selective_scan_attention(
        C[..., :cut, :], B[..., :cut, :], u[..., :cut, :], state=None, return_state=True,
        **dict(p, delta=p["delta"][..., :cut, :]),
    ) if cut else (C.new_zeros(*full.shape[:-2], 0, full.shape[-1]), None)  # fmt: skip
    if s1 is None:
        return
    y2 = selective_scan_attention(
        C[..., cut:, :], B[..., cut:, :], u[..., cut:, :], state=s1,
        **dict(p, delta=p["delta"][..., cut:, :]),
    )  # fmt: skip
    assert bool(((torch.cat([y1, y2], -2) - full).abs() <= tol).all())


def test_state_after_the_last_token_is_the_recurrence_state():
    g = torch.Generator().manual_seed(2)
    C, B, u = (torch.randn(5, 3, generator=g, dtype=F64) for _ in range(3))
    p = {"delta": torch.full((5, 3), 0.25, dtype=F64), "A": -torch.ones(3, 3, dtype=F64)}
    _, st_ = selective_scan_attention(C, B, u, return_state=True, **p)
    h = torch.zeros(3, 3, dtype=F64)
    for t in range(5):
        h = math.exp(-0.25) * h + 0.25 * B[t, None, :] * u[t, :, None]
    assert st_.h.shape == (3, 3)
    assert torch.allclose(st_.h, h, rtol=0, atol=64 * 2.0**-53 * float(h.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_half_inputs_compute_in_float32(dtype):
    g = torch.Generator().manual_seed(1)
    C, B, u = make_inputs("typical", n_q=6, d_k=3, d_v=3, dtype=dtype, generator=g)
    p = P.selective_scan_defaults(3, 6, g)
    y, st_ = selective_scan_attention(C, B, u, return_state=True, **p)
    assert y.dtype == dtype and st_.h.dtype == torch.float32
    y2, h2 = ssd_attention(C, B, u, return_state=True, **P.ssd_defaults(3, 6, g))
    assert y2.dtype == dtype and h2.h.dtype == torch.float32


# --- SSD --------------------------------------------------------------------------------


@st.composite
def ssd_cases(draw, max_n=12, max_d=4):
    seed = draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    T = draw(st.integers(1, max_n))
    N = draw(st.integers(1, max_d))
    Pw = draw(st.integers(1, max_d))
    batch = draw(st.sampled_from(((), (2,))))
    fam = draw(st.sampled_from(FAMILIES))
    C, B, x = make_inputs(fam, n_q=T, d_k=N, d_v=Pw, batch=batch, generator=g)
    regime = draw(st.sampled_from(P.SSM_REGIMES))
    d, amag = P._regime(regime, (*batch, T), g)
    a = P._grid(amag.flatten()[:1])
    params = {"dt": P._grid(d * amag / a), "A": -float(a[0])}
    if batch and draw(st.booleans()):  # one A per head
        params["A"] = -P._grid(P._regime(regime, batch, g)[1])
        params["dt"] = P._grid(d)
    if draw(st.booleans()):
        params["D"] = P._grid(2 * torch.rand(Pw, generator=g, dtype=F64) - 1)
    return C, B, x, params


def naive_ssd(C, B, x, dt, A, D):
    T, N = C.shape[-2:]
    A = torch.as_tensor(A, dtype=F64)
    batch = torch.broadcast_shapes(C.shape[:-2], x.shape[:-2], dt.shape[:-1], A.shape)
    h = torch.zeros(*batch, N, x.shape[-1], dtype=F64)
    ys = []
    for t in range(T):
        g = torch.exp(A * dt[..., t])[..., None, None]
        h = g * h + (dt[..., t, None] * B[..., t, :])[..., :, None] * x[..., t, None, :]
        y = (C[..., t, :, None] * h).sum(-2)
        if D is not None:
            y = y + torch.as_tensor(D, dtype=F64) * x[..., t, :]
        ys.append(y)
    return torch.stack(ys, -2)


@given(ssd_cases(), st.sampled_from([1, 4, 64]))
def test_ssd_forms_agree_with_the_recurrence(case, chunk):
    C, B, x, p = case
    T = C.shape[-2]
    yc = ssd_attention(C, B, x, chunk_size=chunk, **p)
    yq = ssd_attention(C, B, x, form="quadratic", **p)
    yr = naive_ssd(C, B, x, p["dt"], p["A"], p.get("D"))
    b_c, b_q, b_r = (_rnd("ssd", C, B, x, b, **p) for b in (chunk, T, None))
    assert bool(((yc - yr).abs() <= upper(b_c + b_r, 2)).all())
    assert bool(((yq - yr).abs() <= upper(b_q + b_r, 2)).all())


@given(ssd_cases(max_n=10))
def test_ssd_decode_and_reference(case):
    C, B, x, p = case
    T = C.shape[-2]
    full = ssd_attention(C, B, x, chunk_size=4, **p)
    r = reference("ssd", C, B, x, **p)
    assert bool(r.contains(full, _rnd("ssd", C, B, x, 4, **p)).all())
    outs, st_ = [], None
    for t in range(T):
        y, st_ = ssd_attention(
            C[..., t : t + 1, :], B[..., t : t + 1, :], x[..., t : t + 1, :], state=st_,
            return_state=True, **dict(p, dt=p["dt"][..., t : t + 1]),
        )  # fmt: skip
        outs.append(y)
    assert isinstance(st_, SSDState)
    assert bool(r.contains(torch.cat(outs, -2), _rnd("ssd", C, B, x, 1, **p)).all())


def test_ssd_is_the_selective_scan_with_scalar_gates():
    g = torch.Generator().manual_seed(4)
    C, B, x = make_inputs("typical", n_q=9, d_k=3, d_v=2, generator=g)
    dt = P._grid(0.1 + torch.rand(9, generator=g, dtype=F64))
    A = -0.75
    y = ssd_attention(C, B, x, dt=dt, A=A)
    ys = selective_scan_attention(C, B, x, delta=dt[:, None], A=torch.full((1, 3), A, dtype=F64))
    tol = _rnd("ssd", C, B, x, 64, dt=dt, A=A) + _rnd(
        "selective_scan", C, B, x, 64, delta=dt[:, None], A=torch.full((1, 3), A, dtype=F64)
    )
    assert bool(((y - ys).abs() <= upper(tol, 2)).all())


# --- LTI SSM ------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["recurrent", "convolution", "fft"])
@pytest.mark.parametrize("lti", [True, False])
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
def test_ssm_forms_within_the_bound(form, lti, dtype):
    g = torch.Generator().manual_seed(5)
    T, N, Dv = 12, 3, 4
    C, B, u = make_inputs("typical", n_q=T, d_k=N, d_v=Dv, dtype=dtype, generator=g)
    if lti:
        C, B = C[:1].expand(T, N), B[:1].expand(T, N)
    p = P.ssm_defaults(Dv, T, g)
    p["A"] = p["A"][:, :N]
    r = reference("ssm", C, B, u, **p)
    y = ssm_attention(C, B, u, form=form, **p)
    prec = _fp64(None) if dtype == F64 else Precision(dtype)
    eb = attention_error_bound("ssm", C, B, u, prec, form=form, **p)
    assert bool(r.contains(y, eb.total).all())


@pytest.mark.parametrize("form", ["recurrent", "convolution", "fft"])
def test_ssm_decode_and_pieces(form):
    g = torch.Generator().manual_seed(6)
    T, N, Dv = 11, 2, 3
    C, B, u = make_inputs("outliers", n_q=T, d_k=N, d_v=Dv, generator=g)
    p = P.ssm_defaults(Dv, T, g)
    p["A"] = p["A"][:, :N]
    r = reference("ssm", C, B, u, **p)
    outs, st_ = [], None
    for t0, t1 in ((0, 4), (4, 5), (5, T)):
        y, st_ = ssm_attention(
            C[t0:t1], B[t0:t1], u[t0:t1], form=form, state=st_, return_state=True, **p
        )
        outs.append(y)
    assert isinstance(st_, SelectiveScanState) and st_.h.shape == (Dv, N)
    # each piece is a call of its form from a carried state: within the bound of the
    # recurrence with chunks of one token (the carried state's decays, one exp per step)
    # plus the form's own extra (FFT)
    b = attention_error_bound("ssm", C, B, u, _fp64(1), form=form, **p).total
    assert bool(r.contains(torch.cat(outs, 0), b).all())


# --- log space ----------------------------------------------------------------------------


def _log_rule(C, B, u, p, y):
    """The error rule of selective_scan_log's docstring (float64 output)."""
    u64 = 2.0**-53
    T, N = C.shape[-2:]
    delta, A = p["delta"].expand(*u.shape), p["A"].expand(u.shape[-1], N)
    L = delta.unsqueeze(-1) * A
    f = delta.unsqueeze(-1) if p["discretization"] == "euler" else torch.expm1(L) / A
    b = (f * B.unsqueeze(-2) * u.unsqueeze(-1)).abs()
    Tt, h = [], torch.zeros_like(b[..., 0, :, :])
    for t in range(T):
        h = torch.exp(L[..., t, :, :]) * h + b[..., t, :, :]
        Tt.append(h)
    Tabs = torch.stack(Tt, -3)
    logs = [b[b > 0].log().abs().max() if bool((b > 0).any()) else torch.tensor(0.0)]
    logs.append(C[C != 0].abs().log().abs().max() if bool((C != 0).any()) else torch.tensor(0.0))
    skip = torch.zeros_like(u)
    if p.get("D") is not None:
        skip = (p["D"] * u).abs()
        if bool((skip > 0).any()):
            logs.append(skip[skip > 0].log().abs().max())
    Lam = float(L.abs().sum(-3).max()) + sum(float(x) for x in logs) + 1
    kappa = (math.ceil(math.log2(max(T, 2))) + N + 12) * u64 * (4 * Lam + 4)
    mag = (C.abs().unsqueeze(-2) * Tabs).sum(-1) + skip
    return upper(math.expm1(kappa) * mag + u64 * y.abs() + 2.0**-1075, 8)


@given(selective_cases(max_n=10))
def test_log_space_scan_within_its_rule(case):
    C, B, u, p = case
    r = reference("selective_scan", C, B, u, **p)
    y = selective_scan_log(C, B, u, **p)
    assert y.dtype == F64
    assert bool(r.contains(y, _log_rule(C, B, u, p, y)).all())


def test_log_space_scan_holds_states_beyond_float_range():
    # u ~ e^800: B_bar u overflows float64, the SignedLog state does not
    T, N, Dv = 6, 2, 2
    C = SignedLog.from_float(torch.ones(T, N, dtype=F64))
    B = SignedLog.from_float(torch.ones(T, N, dtype=F64))
    u = SignedLog(torch.full((T, Dv), 800.0, dtype=F64), torch.ones(T, Dv))
    delta = torch.full((T, Dv), 0.5, dtype=F64)
    A = -torch.ones(Dv, N, dtype=F64)
    y, h = selective_scan_log(C, B, u, delta=delta, A=A, return_state=True)
    assert isinstance(y, SignedLog) and isinstance(h, SignedLog)
    # y_t = N * 0.5 * e^800 * sum_{s<=t} e^{-0.5 (t-s)}
    want = math.log(N * 0.5) + 800 + math.log(sum(math.exp(-0.5 * i) for i in range(T)))
    assert abs(float(y.log[-1, 0]) - want) <= 1e-12 * want
    # decoding from the returned state continues the sequence
    y2 = selective_scan_log(C[:1], B[:1], u[:1], delta=delta[:1], A=A, state=h)
    want2 = math.log(N * 0.5) + 800 + math.log(sum(math.exp(-0.5 * i) for i in range(T + 1)))
    assert abs(float(y2.log[0, 0]) - want2) <= 1e-12 * want2


# --- bad input and empty input ------------------------------------------------------------


def _small(T=4, N=3, Dv=2):
    g = torch.Generator().manual_seed(0)
    C, B = torch.randn(T, N, generator=g, dtype=F64), torch.randn(T, N, generator=g, dtype=F64)
    u = torch.randn(T, Dv, generator=g, dtype=F64)
    return (
        C,
        B,
        u,
        {"delta": torch.full((T, Dv), 0.5, dtype=F64), "A": -torch.ones(Dv, N, dtype=F64)},
    )


@pytest.mark.parametrize(
    "change, exc, name",
    [
        ({"delta": torch.zeros(4, 2, dtype=F64)}, ValueError, "delta"),
        ({"delta": torch.full((4, 3), 0.5, dtype=F64)}, ValueError, "delta"),
        ({"delta": torch.full((4, 2), math.nan, dtype=F64)}, ValueError, "delta"),
        ({"delta": torch.ones(4, 2, dtype=torch.int64)}, TypeError, "delta"),
        ({"A": torch.ones(2, 3, dtype=F64)}, ValueError, "A"),
        ({"A": -torch.ones(2, 2, dtype=F64)}, ValueError, "A"),
        ({"A": -torch.ones(3, dtype=F64)}, ValueError, "A"),
        ({"D": torch.ones(3, dtype=F64)}, ValueError, "D"),
        ({"discretization": "bilinear"}, ValueError, "discretization"),
        ({"causal": False}, ValueError, "causal"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"state": torch.zeros(2, 3)}, TypeError, "state"),
        ({"state": SelectiveScanState(torch.zeros(3, 3, dtype=F64))}, ValueError, "state"),
    ],
)
def test_selective_scan_bad_input_names_the_argument(change, exc, name):
    C, B, u, p = _small()
    with pytest.raises(exc, match=f"^{name}:"):
        selective_scan_attention(C, B, u, **{**p, **change})


@pytest.mark.parametrize(
    "change, exc, name",
    [
        ({"dt": torch.zeros(4, dtype=F64)}, ValueError, "dt"),
        ({"dt": torch.ones(5, dtype=F64)}, ValueError, "dt"),
        ({"dt": 0.5}, TypeError, "dt"),
        ({"A": 0.0}, ValueError, "A"),
        ({"A": True}, TypeError, "A"),
        ({"D": torch.ones(3, dtype=F64)}, ValueError, "D"),
        ({"form": "blocked"}, ValueError, "form"),
        ({"state": SSDState(torch.zeros(3, 3, dtype=F64))}, ValueError, "state"),
    ],
)
def test_ssd_bad_input_names_the_argument(change, exc, name):
    C, B, u, _ = _small()
    p = {"dt": torch.full((4,), 0.5, dtype=F64), "A": -1.0}
    with pytest.raises(exc, match=f"^{name}:"):
        ssd_attention(C, B, u, **{**p, **change})


@pytest.mark.parametrize(
    "change, exc, name",
    [
        ({"dt": -1.0}, ValueError, "dt"),
        ({"dt": torch.ones(3, dtype=F64)}, ValueError, "dt"),
        ({"A": torch.ones(3, dtype=F64)}, ValueError, "A"),
        ({"form": "scan"}, ValueError, "form"),
    ],
)
def test_ssm_bad_input_names_the_argument(change, exc, name):
    C, B, u, _ = _small()
    p = {"dt": 0.5, "A": -torch.ones(3, dtype=F64)}
    with pytest.raises(exc, match=f"^{name}:"):
        ssm_attention(C, B, u, **{**p, **change})


def test_empty_inputs():
    C, B, u, p = _small()
    # no tokens: an empty output; the state is the one given, and asked for if not given
    y = selective_scan_attention(C[:0], B[:0], u[:0], delta=p["delta"][:0], A=p["A"])
    assert y.shape == (0, 2)
    st0 = SelectiveScanState(torch.ones(2, 3, dtype=F64))
    y, st1 = selective_scan_attention(
        C[:0], B[:0], u[:0], delta=p["delta"][:0], A=p["A"], state=st0, return_state=True
    )
    assert y.shape == (0, 2) and st1 is st0
    with pytest.raises(ValueError, match="^state:"):
        selective_scan_attention(
            C[:0], B[:0], u[:0], delta=p["delta"][:0], A=p["A"], return_state=True
        )
    # no value columns, an empty batch
    y = selective_scan_attention(C, B, u[:, :0], delta=p["delta"][:, :1], A=p["A"][:1])
    assert y.shape == (4, 0)
    Cb, Bb, ub = (x.expand(0, *x.shape) for x in (C, B, u))
    assert selective_scan_attention(Cb, Bb, ub, **p).shape == (0, 4, 2)
    assert ssd_attention(Cb, Bb, ub, dt=torch.ones(4, dtype=F64), A=-1.0).shape == (0, 4, 2)
    # no states: d_k = 0 names q
    with pytest.raises(ValueError, match="^q:"):
        selective_scan_attention(C[:, :0], B[:, :0], u, delta=p["delta"], A=p["A"][:, :0])
    # ssd with no tokens
    assert ssd_attention(C[:0], B[:0], u[:0], dt=torch.ones(0, dtype=F64), A=-1.0).shape == (0, 2)


@pytest.mark.parametrize("T", [3, 11])
def test_ssd_skip_per_head_is_per_head(T):
    """D broadcasts over [..., P], a scalar per head [H, 1] (documented): it met the
    tokens' axis, a RuntimeError where T != H and silently wrong by up to 4.6 where T = H
    (a review). Now it agrees with the certified reference."""
    from attnprec.analysis.reference import reference

    g = torch.Generator().manual_seed(0)
    H, N, P = 3, 4, 5
    q, k = (torch.randn(2, H, T, N, generator=g, dtype=torch.float64) for _ in range(2))
    x = torch.randn(2, H, T, P, generator=g, dtype=torch.float64)
    dt = torch.rand(2, H, T, generator=g, dtype=torch.float64) + 0.1
    A = -torch.rand(H, generator=g, dtype=torch.float64) - 0.1
    skip = torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)
    y = ssd_attention(q, k, x, dt=dt, A=A, D=skip, chunk_size=4)
    ref = reference("ssd", q, k, x, dt=dt, A=A, D=skip)
    assert bool(ref.contains(y, _rnd("ssd", q, k, x, 4, dt=dt, A=A, D=skip)).all())
