"""Certified references of the state-space methods.

Tolerance rules (docs/reference.md): two certified balls of one exact value overlap,
``|a - b| <= r_a + r_b``; a direct mpmath evaluation at 300 bits of a short recurrence (at
most 8 steps, logs of the gates within 60) loses far less than 100 bits: its error is at
most ``2^-200`` of the sum of the absolute terms, the slack it is given. The float64 balls'
target is the float64 backend's: radius <= 1e-9 of the outputs' scale (max |value| per
column); over 3 steps of ``x (1 + ...)`` a few dozen roundings, so a relative radius <=
2^-44 (512 u) where no output cancels.
"""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnprec.analysis import _reference_ball
from attnprec.analysis.reference import reference
from attnprec.testing import params as P
from attnprec.testing.inputs import make_inputs

F64 = torch.float64


def _overlap(a, b):
    return bool(((a.value - b.value).abs() <= a.radius + b.radius).all())


@given(st.integers(0, 2**31), st.integers(1, 8), st.integers(1, 3), st.integers(1, 3))
def test_selective_scan_is_gated_per_channel_where_the_reduction_is_exact(seed, T, N, Dv):
    # powers of two: delta A and delta B are exact floats, so reference("gated") on the
    # reduced problem certifies the same exact value
    g = torch.Generator().manual_seed(seed)
    C, B, u = make_inputs("typical", n_q=T, d_k=N, d_v=Dv, generator=g)
    delta = 2.0 ** torch.randint(-6, 3, (T, Dv), generator=g).to(F64)
    A = -(2.0 ** torch.randint(-4, 4, (Dv, N), generator=g).to(F64))
    D = P._grid(torch.randn(Dv, generator=g, dtype=F64))
    r = reference("selective_scan", C, B, u, delta=delta, A=A, D=D)
    for d in range(Dv):
        lg = delta[:, d, None] * A[d]
        k = delta[:, d, None] * B
        rg = reference("gated", C, k, u[:, d : d + 1], causal=True, scale=1.0, log_g=lg)
        # y = gated + D u: the skip's product and the addition in float64, each within
        # 2^-53 relative, carried in the radius
        skip = D[d] * u[:, d : d + 1]
        val = rg.value + skip
        rad = rg.radius + 2.0**-52 * skip.abs() + 2.0**-52 * val.abs()
        assert bool(((r.value[:, d : d + 1] - val).abs() <= r.radius[:, d : d + 1] + rad).all())


def _mp_selective(C, B, u, delta, A, D, disc):
    """The recurrence in mpmath at 300 bits (module docstring's rule)."""
    mpmath.mp.prec = 300
    T, N = C.shape
    Dv = u.shape[1]
    out = [[None] * Dv for _ in range(T)]
    for d in range(Dv):
        h = [mpmath.mpf(0)] * N
        for t in range(T):
            dl = mpmath.mpf(float(delta[t, d]))
            for n in range(N):
                a = mpmath.mpf(float(A[d, n]))
                f = dl if disc == "euler" else mpmath.expm1(dl * a) / a
                h[n] = mpmath.exp(dl * a) * h[n] + f * mpmath.mpf(float(B[t, n])) * mpmath.mpf(
                    float(u[t, d])
                )
            y = sum(mpmath.mpf(float(C[t, n])) * h[n] for n in range(N))
            if D is not None:
                y += mpmath.mpf(float(D[d])) * mpmath.mpf(float(u[t, d]))
            out[t][d] = y
    return out


@pytest.mark.parametrize("disc", ["euler", "zoh"])
@pytest.mark.parametrize("regime", P.SSM_REGIMES)
def test_selective_scan_against_mpmath(disc, regime):
    g = torch.Generator().manual_seed(7)
    T, N, Dv = 6, 3, 2
    C, B, u = make_inputs("cancel", n_q=T, d_k=N, d_v=Dv, generator=g)
    delta, _ = P._regime(regime, (T, Dv), g)
    A = -P._regime(regime, (Dv, N), g)[1]
    D = torch.randn(Dv, generator=g, dtype=F64)
    r = reference("selective_scan", C, B, u, delta=delta, A=A, D=D, discretization=disc)
    mp = _mp_selective(C, B, u, delta, A, D, disc)
    for t in range(T):
        for d in range(Dv):
            err = abs(mp[t][d] - mpmath.mpf(float(r.value[t, d])))
            assert err <= float(r.radius[t, d]) + 2.0**-200 * (1 + abs(mp[t][d]))


def test_zoh_small_arguments_are_certified():
    # delta A = -1e-12: (exp(x) - 1)/x in float64 loses 4 digits; the ball expm1 does not
    C = torch.ones(3, 1, dtype=F64)
    B = torch.ones(3, 1, dtype=F64)
    u = torch.ones(3, 1, dtype=F64)
    delta = torch.full((3, 1), 1e-6, dtype=F64)
    A = torch.full((1, 1), -1e-6, dtype=F64)
    r = reference("selective_scan", C, B, u, delta=delta, A=A, discretization="zoh")
    mp = _mp_selective(C, B, u, delta, A, None, "zoh")
    for t in range(3):
        assert abs(mp[t][0] - mpmath.mpf(float(r.value[t, 0]))) <= float(r.radius[t, 0])
    assert float(r.rel_radius().max()) <= 2.0**-52


def test_backends_agree_and_rows_are_the_full_rows():
    g = torch.Generator().manual_seed(3)
    C, B, u = make_inputs("outliers", n_q=7, d_k=3, d_v=3, batch=(2,), generator=g)
    p = P.selective_scan_defaults(3, 7, g)
    a = reference("selective_scan", C, B, u, backend="arb", **p)
    m = reference("selective_scan", C, B, u, backend="mpmath", **p)
    assert a.backend == "arb" and m.backend == "mpmath" and _overlap(a, m)
    r = reference("selective_scan", C, B, u, rows=[1, 5], **p)
    assert r.rows.tolist() == [1, 5]
    assert torch.equal(r.value, a.value[..., [1, 5], :])
    assert torch.equal(r.radius, a.radius[..., [1, 5], :])
    s = reference("ssd", C, B, u, rows=3, **P.ssd_defaults(3, 7, g))
    assert s.value.shape == (2, 3, 3) and s.rows[0] == 0 and s.rows[-1] == 6


def test_ssd_is_gated_with_scalar_gates_where_exact():
    g = torch.Generator().manual_seed(9)
    T = 6
    C, B, x = make_inputs("typical", n_q=T, d_k=2, d_v=3, batch=(2,), generator=g)
    dt = 2.0 ** torch.randint(-5, 2, (2, T), generator=g).to(F64)
    A = torch.tensor([-0.5, -4.0], dtype=F64)
    r = reference("ssd", C, B, x, dt=dt, A=A)
    rg = reference(
        "gated", C, dt.unsqueeze(-1) * B, x, causal=True, scale=1.0, log_g=A[:, None] * dt
    )
    assert _overlap(r, rg)


def test_ssm_is_the_selective_scan_with_a_fixed_step():
    g = torch.Generator().manual_seed(1)
    C, B, u = make_inputs("typical", n_q=5, d_k=2, d_v=3, generator=g)
    A = -torch.tensor([0.5, 1.0], dtype=F64)
    r = reference("ssm", C, B, u, A=A, dt=0.125)
    rs = reference(
        "selective_scan", C, B, u, delta=torch.full((5, 1), 0.125, dtype=F64), A=A[None],
        discretization="zoh",
    )  # fmt: skip
    assert torch.equal(r.value, rs.value)


def test_nan_reaches_exactly_the_outputs_it_reaches():
    C, B, u = (torch.ones(4, 2, dtype=F64) for _ in range(3))
    u = u.clone()
    u[1, 0] = math.nan
    C = C.clone()
    C[2, 1] = math.nan
    r = reference(
        "selective_scan", C, B, u, delta=torch.ones(4, 2, dtype=F64), A=-torch.ones(2, 2, dtype=F64)
    )
    nan = torch.isnan(r.value)
    want = torch.zeros(4, 2, dtype=torch.bool)
    want[1:, 0] = True
    want[2, :] = True
    assert torch.equal(nan, want)


def test_bad_arguments():
    C = B = u = torch.ones(3, 2, dtype=F64)
    p = {"delta": torch.ones(3, 2, dtype=F64), "A": -torch.ones(2, 2, dtype=F64)}
    with pytest.raises(ValueError, match="^scale:"):
        reference("selective_scan", C, B, u, scale=1.0, **p)
    with pytest.raises(ValueError, match="^causal:"):
        reference("selective_scan", C, B, u, causal=False, **p)
    with pytest.raises(ValueError, match="^backend:"):
        reference("selective_scan", C, B, u, backend="ball", **p)
    with pytest.raises(ValueError, match="^delta:"):
        reference("selective_scan", C, B, u, delta=-p["delta"], A=p["A"])
    with pytest.raises(ValueError, match="^A: required"):
        reference("selective_scan", C, B, u, delta=p["delta"])
    with pytest.raises(TypeError, match="^chunk_size:"):
        reference("selective_scan", C, B, u, chunk_size=4, **p)
    bad = u.clone()
    bad[0, 0] = math.inf
    with pytest.raises(ValueError, match="^v:"):
        reference("selective_scan", C, B, bad, **p)
    with pytest.raises(ValueError, match="^dt:"):
        reference("ssd", C, B, u, dt=torch.zeros(3, dtype=F64), A=-1.0)


def test_empty_inputs():
    C = B = u = torch.ones(0, 2, dtype=F64)
    r = reference("selective_scan", C, B, u, delta=torch.ones(0, 2, dtype=F64), A=-torch.ones(2, 2))
    assert r.value.shape == (0, 2)
    r = reference("ssd", C, B, u, dt=torch.ones(0, dtype=F64), A=-1.0)
    assert r.value.shape == (0, 2)
    C3 = torch.ones(3, 2, dtype=F64)
    r = reference(
        "selective_scan", C3, C3, C3[:, :0], delta=torch.ones(3, 1, dtype=F64),
        A=-torch.ones(1, 2, dtype=F64),
    )  # fmt: skip
    assert r.value.shape == (3, 0)


def _ssm_cases(g, regime, T=150):
    """(method, q, k, v, params) of every state-space method at ``regime``'s steps."""
    C, B, u = make_inputs("cancel", n_q=T, d_k=3, d_v=2, batch=(2,), generator=g)
    delta, _ = P._regime(regime, (2, T, 2), g)
    A = -P._regime(regime, (2, 3), g)[1]
    D = torch.randn(2, generator=g, dtype=F64)
    dt = P._regime(regime, (2, T), g)[0]
    out = [("selective_scan", {"delta": delta, "A": A, "D": D, "discretization": d})
           for d in ("euler", "zoh")]  # fmt: skip
    out.append(("ssd", {"dt": dt, "A": A[:, 0], "D": D}))
    out.append(("ssm", {"A": A[0], "dt": float(delta[0, 0, 0])}))
    shift = torch.randn(3, 2, generator=g, dtype=F64)
    out.append(("h3", {"shift": shift, "log_decay": -P._regime(regime, (3, 2), g)[1]}))
    return [(m, C, B, u, p) for m, p in out]


@pytest.mark.parametrize("regime", P.SSM_REGIMES)
def test_float64_balls_contain_the_ball_backends(regime):
    """The float64 backend (the same recurrences on float64 balls, :class:`_Ball64`):
    every output ball overlaps arb's (mpmath's), over 150 tokens in every step regime, for
    every state-space method, with a radius within 1e-9 of the outputs' scale (the target); sampled
    rows are the full rows'."""
    g = torch.Generator().manual_seed(12)
    be = "arb" if _reference_ball.HAVE_FLINT else "mpmath"
    for method, C, B, u, p in _ssm_cases(g, regime):
        f = reference(method, C, B, u, backend="float64", **p)
        b = reference(method, C, B, u, backend=be, **p)
        assert f.backend == "float64" and _overlap(f, b), method
        scale = b.value.abs().amax(dim=-2, keepdim=True) + 1e-300
        assert bool((f.radius <= 1e-9 * scale).all()), method
        r = reference(method, C, B, u, backend="float64", rows=[3, 149], **p)
        assert torch.equal(r.value, f.value[..., [3, 149], :])


def test_float64_balls_zoh_small_steps_and_nan(monkeypatch):
    """zoh's ``expm1(dt A) / A`` for steps down to 1e-12 keeps its relative accuracy (the
    series, not ``exp - 1``); NaN reaches exactly the outputs it reaches; ``"auto"`` takes
    the float64 balls past AUTO_FLOAT64_STATES entries."""
    import importlib

    ssm = importlib.import_module("attnprec.analysis._reference_ssm")
    C = B = u = torch.ones(3, 1, dtype=F64)
    for step in (1e-6, 1e-12):
        delta = torch.full((3, 1), step, dtype=F64)
        A = torch.full((1, 1), -1e-6, dtype=F64)
        r = reference("selective_scan", C, B, u, delta=delta, A=A, discretization="zoh",
                      backend="float64")  # fmt: skip
        mp = _mp_selective(C, B, u, delta, A, None, "zoh")
        for t in range(3):
            assert abs(mp[t][0] - mpmath.mpf(float(r.value[t, 0]))) <= float(r.radius[t, 0])
        assert float(r.rel_radius().max()) <= 2.0**-44
    C, B, u = (torch.ones(4, 2, dtype=F64) for _ in range(3))
    u[1, 0] = math.nan
    C[2, 1] = math.nan
    p = {"delta": torch.ones(4, 2, dtype=F64), "A": -torch.ones(2, 2, dtype=F64)}
    monkeypatch.setattr(ssm, "AUTO_FLOAT64_STATES", 10)
    r = reference("selective_scan", C, B, u, **p)
    want = torch.zeros(4, 2, dtype=torch.bool)
    want[1:, 0] = True
    want[2, :] = True
    assert r.backend == "float64" and torch.equal(torch.isnan(r.value), want)


def test_float64_balls_past_huge_gates():
    """A decay of ``-1e19`` per step (``dt A``, ``delta A``, H3's ``log_decay``): the
    float64 balls' log-gate radius passes 709, and their exp was ``(0, inf)``, then
    ``0 inf = NaN`` in the next product: radius NaN under a finite value. Now finite and
    overlapping arb's (mpmath's)."""
    be = "arb" if _reference_ball.HAVE_FLINT else "mpmath"
    one = torch.ones(3, 1, dtype=F64)
    v = torch.tensor([[1.0], [2.0], [3.0]], dtype=F64)
    cases = [
        ("ssd", {"dt": torch.ones(3, dtype=F64), "A": -1e19}),
        ("selective_scan", {"delta": torch.full((3, 1), 1e10, dtype=F64),
                            "A": torch.full((1, 1), -1e10, dtype=F64)}),
        ("h3", {"shift": torch.ones(1, dtype=F64),
                "log_decay": torch.full((1,), -1e19, dtype=F64)}),
    ]  # fmt: skip
    for method, p in cases:
        f = reference(method, one, one, v, backend="float64", **p)
        b = reference(method, one, one, v, backend=be, **p)
        assert bool(torch.isfinite(f.radius).all()) and _overlap(f, b), (method, f.radius)
        assert bool((f.radius <= 1e-9 * b.value.abs()).all()), method


def _edge_cases():
    """(method, q, k, v, params) where the float64 balls alone are uncertified or loose."""
    g = torch.Generator().manual_seed(5)
    T = 4
    tiny, huge = torch.full((T, 1), 1e-30, dtype=F64), torch.full((T, 1), 1e300, dtype=F64)
    x = torch.tensor([[1e10], [-1e10], [1e10], [-1e10]], dtype=F64)
    C, B, u = (torch.randn(8, 2, generator=g, dtype=F64) for _ in range(3))
    dt = torch.ones(8, dtype=F64)
    dt[3] = 1e200
    full = lambda shape, x: torch.full(shape, x, dtype=F64)  # noqa: E731
    out = [("ssd", tiny, huge, x, {"dt": torch.ones(T, dtype=F64), "A": -1e-3})]
    for disc in ("euler", "zoh"):
        p = {"delta": full((T, 1), 1e5), "A": full((1, 1), -1e-10), "discretization": disc}
        out.append(("selective_scan", tiny, huge, x, p))
    h3 = {"shift": full((2,), 1e300), "log_decay": full((1,), -1e-3)}
    out.append(("h3", tiny, x, torch.ones(T, 1, dtype=F64), h3))
    out.append(("ssd", C, B, u, {"dt": dt, "A": -1e200}))  # a log-gate of -1e400
    A = torch.tensor([[-5e-324, -1e-300]], dtype=F64)
    zoh = {"delta": full((8, 1), 3e-17), "A": A, "discretization": "zoh"}
    out.append(("selective_scan", C, B, u[:, :1], zoh))
    return out


def test_float64_balls_hand_what_they_leave_loose_to_a_ball_backend(monkeypatch):
    """A review's edges of the float64 balls (F1-F4 of a twenty-ninth session): a state past
    float64's range under outputs of about 1e280 came back NaN (radius inf) for every
    state-space method, ``"auto"`` included; one log-gate of -1e400 left every later row
    uncertified; zoh with ``delta A`` below the normal range gave a radius 1e18 times the
    output. Those batch items are redone by a ball backend: finite, overlapping it, as
    tight; where the budget runs out, a value left non-finite is 0 with an infinite radius
    (never NaN, which marks a NaN input)."""
    import importlib

    ssm = importlib.import_module("attnprec.analysis._reference_ssm")
    be = "arb" if _reference_ball.HAVE_FLINT else "mpmath"
    for method, q, k, v, p in _edge_cases():
        f = reference(method, q, k, v, backend="float64", **p)
        b = reference(method, q, k, v, backend=be, **p)
        assert f.backend == "float64" and _overlap(f, b), method
        scale = b.value.abs().amax(dim=-1, keepdim=True)
        assert bool((f.radius <= 1e-9 * scale).all()), (method, f.radius)
    monkeypatch.setattr(ssm, "AUTO_FLOAT64_STATES", 0)
    method, q, k, v, p = _edge_cases()[0]
    f = reference(method, q, k, v, backend="float64", **p)
    assert not bool(torch.isnan(f.value).any()) and bool(torch.isinf(f.radius).any())
    assert bool((f.value[torch.isinf(f.radius)] == 0).all())


def test_ball64_operations_enclose_the_exact_results():
    """Each :class:`_Ball64` operation alone, at 200 bits: for operands drawn as balls
    (magnitudes 1e-300 to 1e3, radii 0, up to 1e-9 or up to 0.5 relative), the exact result
    at the balls' corners and midpoints lies within the output ball; a divisor whose ball
    holds 0 gives radius inf. (Over a whole recurrence every
    rounding term has company of its size; here each must cover its own.)"""
    import numpy as np

    from attnprec.analysis._reference_ssm import _Ball64, _exp64, _expm1_64

    g = np.random.default_rng(4)
    n = 300
    mag = 10.0 ** g.uniform(-300, 3, n) * g.choice([-1.0, 1.0], n)
    a = _Ball64(mag, np.abs(mag) * g.choice([0.0, 1e-9, 0.3], n) * g.uniform(0, 1, n))
    b = _Ball64(g.uniform(-3, 3, n), g.uniform(0, 1, n) * g.choice([0, 1e-9, 0.5], n))
    small = _Ball64(g.uniform(-(2.0**-6), 2.0**-6, n) * 10.0 ** g.uniform(-12, 0, n))
    ops = {
        "add": (lambda x, y: x + y, lambda x, y: x + y, a, b),
        "sub": (lambda x, y: x - y, lambda x, y: x - y, a, b),
        "mul": (lambda x, y: x * y, lambda x, y: x * y, a, b),
        "div": (lambda x, y: x / y, lambda x, y: x / y, a, b),
        "exp": (lambda x, _: _exp64(x), lambda x, _: mpmath.exp(x), b, b),
        "expm1": (lambda x, _: _expm1_64(x), lambda x, _: mpmath.expm1(x), small, small),
        "expm1 big": (lambda x, _: _expm1_64(x), lambda x, _: mpmath.expm1(x), b, b),
    }
    with mpmath.workprec(200):
        for name, (op, exact, x, y) in ops.items():
            out = op(x, y)
            for i in range(n):
                if name == "div" and abs(float(y.mid[i])) <= float(y.rad[i]):
                    assert out.rad[i] == np.inf
                    continue
                for sx, sy in ((-1, -1), (-1, 1), (0, 0), (1, -1), (1, 1)):
                    xe = mpmath.mpf(float(x.mid[i])) + sx * mpmath.mpf(float(x.rad[i]))
                    ye = mpmath.mpf(float(y.mid[i])) + sy * mpmath.mpf(float(y.rad[i]))
                    err = abs(exact(xe, ye) - mpmath.mpf(float(out.mid[i])))
                    assert err <= mpmath.mpf(float(out.rad[i])), (name, i, sx, sy)
    # a wide ball far below 0 (a log-gate of -1e19 with a radius past 709) has a small
    # exp, not radius inf; a point times an unbounded ball is unbounded, not NaN
    far = _Ball64(-(10.0 ** g.uniform(5, 20, n)), 10.0 ** g.uniform(2.9, 4, n))
    wide = _exp64(far)
    assert bool((wide.rad <= 1e-306).all())
    with mpmath.workprec(200):
        for i in range(n):
            for sx in (-1, 0, 1):
                xe = mpmath.mpf(float(far.mid[i])) + sx * mpmath.mpf(float(far.rad[i]))
                assert abs(mpmath.exp(xe) - float(wide.mid[i])) <= float(wide.rad[i])
    unb = _Ball64(np.ones(3), np.full(3, np.inf)) * _Ball64(np.array([0.0, 1.0, 0.0]),
                                                           np.array([0.0, 0.0, 1.0]))  # fmt: skip
    assert unb.rad[0] < 1e-300 and unb.rad[1:].tolist() == [np.inf, np.inf]
    s = _Ball64(mag.reshape(3, 100), np.abs(mag.reshape(3, 100)) * 1e-12).sum(axis=1)
    with mpmath.workprec(4000):
        for j in range(3):
            exact = mpmath.fsum(mpmath.mpf(float(t)) for t in mag.reshape(3, 100)[j])
            err = abs(exact - mpmath.mpf(float(s.mid[j])))
            spread = 1e-12 * mpmath.fsum(abs(mpmath.mpf(float(t))) for t in mag.reshape(3, 100)[j])
            assert err + spread <= mpmath.mpf(float(s.rad[j])) * (1 + 1e-12), j
