"""The certified float64 backend at the edges of the format, against arb.

Rule (docs/reference.md): two certified balls of the same exact value intersect, decided
here exactly (Fractions). A float64 radius may be ``inf`` (no finite bound known); its value
may be NaN only where the radius is ``inf`` (and, after the repair by a ball backend, only
where arb's value is NaN too). With the repair on, a row the float64 bound leaves looser than
``FLOAT64_REPAIR_REL max_j |v_jc|`` is recomputed by arb, so wherever arb is settled (radius
<= 2^-52 max(|value|, max_j |v_jc|)) the float64 radius is at most 2^-30 of that scale.
"""

import contextlib
import importlib
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from attnprec.analysis import _reference_float64 as f64
from attnprec.analysis.reference import reference
from attnprec.attention.semiring import MixtureLSE

ref_mod = importlib.import_module("attnprec.analysis.reference")

F64 = torch.float64
MAX = 1.7976931348623157e308
MIN_NORMAL = 2.2250738585072014e-308
MIN_SUB = 5e-324
EDGE = [0.0, -0.0, MIN_SUB, -MIN_SUB, MIN_NORMAL, -MIN_NORMAL, 1e-310, MAX, -MAX, 1e300]
EDGE += [1e-300, 1e-170, 1e170, 745.2, -745.2, 709.8, 1.0, -1.0]


@contextlib.contextmanager
def no_repair():
    """The float64 algorithm alone (no ball-backend repair of loose rows)."""
    saved = ref_mod.FLOAT64_REPAIR_WORK
    ref_mod.FLOAT64_REPAIR_WORK = 0
    try:
        yield
    finally:
        ref_mod.FLOAT64_REPAIR_WORK = saved


def T(x):
    return torch.tensor(x, dtype=F64)


def assert_intersect(ra, rf):
    """Exact: |a - f| <= r_a + r_f wherever both radii are finite; a NaN float64 value
    only with an infinite radius; a finite radius only with a finite value."""
    rows = zip(
        *(t.flatten().tolist() for t in (ra.value, ra.radius, rf.value, rf.radius)),
        strict=True,
    )
    for idx, (a, ar, f, fr) in enumerate(rows):
        if math.isinf(fr):
            continue
        assert math.isfinite(f) and not math.isnan(fr), (idx, f, fr)
        if math.isnan(a) or math.isinf(ar):
            continue
        assert abs(Fraction(a) - Fraction(f)) <= Fraction(ar) + Fraction(fr), (idx, a, ar, f, fr)


def check(method, q, k, v, causal=False, repair_too=True, ra=None, **kw):
    """Float64 (alone, and repaired) against arb; returns (arb, float64 alone, repaired)."""
    if ra is None:
        ra = reference(method, q, k, v, causal=causal, backend="arb", **kw)
    with no_repair():
        rf = reference(method, q, k, v, causal=causal, backend="float64", **kw)
    assert rf.backend == "float64"
    assert_intersect(ra, rf)
    rr = None
    if repair_too:
        rr = reference(method, q, k, v, causal=causal, backend="float64", **kw)
        assert_intersect(ra, rr)
        # NaN only where arb has NaN; a finite radius wherever arb's is finite, and a tight
        # one wherever arb is settled (but at the top of the range, where arb's own
        # midpoint may round to inf at the precision the repair's single row settles at)
        assert not (torch.isnan(rr.value) & ~torch.isnan(ra.value)).any()
        top = ra.value.abs() > MAX / 2
        assert not (torch.isinf(rr.radius) & torch.isfinite(ra.radius) & ~top).any()
        scale = torch.maximum(ra.value.abs(), v.abs().amax(dim=-2, keepdim=True))
        settled = (ra.radius <= 2.0**-52 * scale) & ~top
        assert (rr.radius[settled] <= 2.0**-30 * scale[settled]).all()
    return ra, rf, rr


# --- the reported defects and the others found, each with its concrete input ---------------


@pytest.mark.parametrize("causal", [False, True])
def test_log_one_far_key(causal):
    """Defect 1: the factorized exp(q - max) exp(k - max)^T underflowed to 0/0 (NaN, radius
    inf); the rows are recomputed with a shift per (query, key) pair."""
    q = T([[-3500.11, -2268.82, 3976.26]])
    v = T([[1.5, -2.0]])
    for key in ([3000.0, -4000.0, -3500.0], [-3000.0, 4000.0, -3500.0], [0.0, 0.0, -4000.0]):
        ra, rf, _ = check("log", q, T([key]), v, causal=causal)
        assert torch.equal(rf.value, v) and (rf.radius <= 1e-12).all()
    # several keys, all far from the query's large channel, causal row 0 sees one of them
    q = T([[-3500.11, -2268.82, 3976.26], [1.0, 2.0, 3.0]])
    k = T([[3000.0, -4000.0, -3500.0], [-3000.0, 3990.0, -3500.0]])
    v = T([[1.0, 2.0], [3.0, -4.0]])
    _, rf, _ = check("log", q, k, v, causal=causal)
    assert torch.isfinite(rf.radius).all() and (rf.radius <= 1e-11).all()


def test_log_far_features_at_auto_size():
    """n = 2100 (``auto`` picks float64): features spread over +-5000 make most factorized
    rows underflow; every output is finite, certified, and matches arb on sampled rows."""
    g = torch.Generator().manual_seed(0)
    n, d = 2100, 3
    q = torch.randn(n, d, generator=g, dtype=F64) * 1500
    k = torch.randn(n, d, generator=g, dtype=F64) * 1500
    v = torch.randn(n, 2, generator=g, dtype=F64)
    with no_repair():
        rf = reference("log", q, k, v)
    assert rf.backend == "float64"
    assert torch.isfinite(rf.value).all() and torch.isfinite(rf.radius).all()
    assert (rf.radius <= 1e-9 * v.abs().amax(dim=-2)).all()
    rows = torch.tensor([0, 1, 7, 500, 2099])
    ra = reference("log", q[rows], k, v, backend="arb")
    assert_intersect(ra, type(rf)(rf.value[rows], rf.radius[rows], "float64"))


@pytest.mark.parametrize(
    "method,q,k,v,kw",
    [
        # subnormal weight q.k = 1e-320 times v: the product underflowed to 0, and the
        # absolute term TINY_DOT was 2.0**-1075 == 0.0: value 0, radius 0
        ("linear", [[1.0]], [[1e-320]], [[1.23e-5]], {"feature_map": None}),
        ("linear", [[1e-170]], [[1e-170]], [[1.23e-5]], {"feature_map": None}),
        ("linear", [[1.0]], [[1e-320], [0.0]], [[1.23e-5], [0.0]], {"feature_map": None}),
        # constant tiny weights (degree 0: no Horner error term at all)
        ("polynomial", [[1.0]], [[2.0], [3.0]], [[1.23e-5], [1.23e-5]], {"coeffs": [5e-324]}),
        ("polynomial", [[0.5]], [[1.0]], [[6.434382325710251e-148]], {"coeffs": [1e-310]}),
        # w = s^2 below the normal range
        ("polynomial", [[1e-80]], [[1e-80]], [[1.23e-5]], {"coeffs": [0.0, 0.0, 1.0]}),
        # a weight 0.17 times v = 5e-324 underflows
        ("polynomial", [[1.0]], [[1.0], [2.0]], [[MIN_SUB], [MIN_SUB]], {"coeffs": [0.17]}),
    ],
)
def test_underflowing_products_are_charged(method, q, k, v, kw):
    """Defect 2: products w v below the normal range were taken as exact."""
    assert f64.TINY_DOT > 0
    ra, rf, _ = check(method, T(q), T(k), T(v), scale=None if method == "linear" else 1.0, **kw)
    assert (rf.value == ra.value).all() or (rf.radius > 0).all()


def test_norm_underflow_in_cauchy_schwarz():
    """||q||^2 underflowed to 0, so the bound on the error of q.k (gamma_d ||q|| ||k||) was
    0; with both keys cancelling, q.k is off by ~1e-7 relative."""
    q = T([[1e-170, 3e-170]])
    k = T([[3 * (1 + 2.0**-30), -1.0], [3 * (1 + 2.0**-29), -1.0]])
    v = T([[1.0], [0.0]])
    check("polynomial", q, k, v, coeffs=[0.0, 1.0], scale=1.0)
    # and the norms of huge rows no longer overflow to inf (softmax radius was inf)
    q = T([[1e-170, 1e-170]])
    k = T([[1e170 * (1 + 2.0**-30), -1e170], [0.0, 0.0]])
    _, rf, _ = check("softmax", q, k, v, scale=1.0)
    assert (rf.radius < 1e-14).all()


def test_far_logits_do_not_widen_the_row():
    """A key 1e14 below the top one gave eps = u 1e14 for every key; keys far below the
    row maximum are below 2^-1075 and only count in the absolute term."""
    q = T([[1.0]])
    k = T([[0.0], [-1e14], [-3.0]])
    v = T([[1.0], [2.0], [3.0]])
    for method, scale in (("softmax", 1.0), ("softmax", 1e-3), ("log", 1.0)):
        _, rf, _ = check(method, q, k, v, scale=scale)
        assert (rf.radius <= 2.0**-40).all()  # was 0.077 (softmax), 1.3e-4 (scale 1e-3), 0.050


def test_values_near_the_float64_max_and_min():
    q = T([[0.5, -1.0], [2.0, 0.25]])
    k = T([[1.0, 1.0], [-1.0, 0.5]])
    for v in ([[MAX, -MAX], [MAX, MIN_SUB]], [[MIN_SUB, MIN_NORMAL], [-MIN_SUB, 1e-310]]):
        for method in ("softmax", "log", "taylor"):
            kw = {"degree": 2} if method == "taylor" else {}
            _, rf, _ = check(method, q, k, T(v), **kw)
            assert torch.isfinite(rf.radius).all() and torch.isfinite(rf.value).all()


def test_repair_of_rows_past_the_float64_range():
    """Scores that overflow float64 (NaN before) and Taylor of degree >= 171 (1/p! below
    the normal range) with large scores: the float64 bound is infinite there; the ball
    backend recomputes the rows."""
    _, rf, rr = check("softmax", T([[1e200]]), T([[1e200], [1.0]]), T([[1.0], [2.0]]), scale=1.0)
    assert torch.isinf(rf.radius).all()
    assert rr.value.tolist() == [[1.0]] and rr.radius.item() <= 2.0**-52
    q, k, v = T([[10.0]]), T([[10.0], [9.9]]), T([[1.0], [2.0]])
    _, rf, rr = check("taylor", q, k, v, degree=200, scale=1.0)
    assert torch.isfinite(rr.radius).all()


def test_repair_budget_and_exact_zero_normalizer():
    """Over budget the float64 result stays, its non-finite values 0 with an infinite
    radius; a normalizer exactly 0 (repaired: no exact output) stays NaN / inf."""
    q, k, v = T([[1e200]]), T([[1e200], [1.0]]), T([[1.0], [2.0]])
    saved = ref_mod.FLOAT64_REPAIR_WORK
    ref_mod.FLOAT64_REPAIR_WORK = 3  # less than one row
    try:
        r = reference("softmax", q, k, v, scale=1.0, backend="float64")
    finally:
        ref_mod.FLOAT64_REPAIR_WORK = saved
    # (a review: its value was NaN, which marks a NaN input or an undefined output; now 0,
    # uncertified, for every method whose float64 result leaves the range)
    assert torch.isinf(r.radius).all() and torch.equal(r.value, torch.zeros_like(r.value))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, 2, generator=g, dtype=torch.float64) for _ in range(3))
    for method, kw in (("log", {}), ("taylor", {"degree": 2})):
        ref_mod.FLOAT64_REPAIR_WORK = 0
        try:
            r = reference(method, q * 1e300, k * 1e300, v, backend="float64", **kw)
        finally:
            ref_mod.FLOAT64_REPAIR_WORK = saved
        assert not torch.isnan(r.value).any() and torch.isinf(r.radius).any(), method
    r = reference("linear", T([[0.0, 1.0]]), T([[1.0, 0.0]]), T([[3.0]]), feature_map=None,
                  backend="float64")  # fmt: skip
    assert torch.isnan(r.value).all() and torch.isinf(r.radius).all()


# --- the property: edge families ------------------------------------------------------------


def _wide(m, e):
    return math.ldexp(m, e)


FAMILIES = {
    "ordinary": st.floats(-4.0, 4.0),
    "wide": st.builds(
        _wide, st.floats(-1.0, 1.0, exclude_min=True, exclude_max=True), st.integers(-1074, 1024)
    ),
    "edge": st.sampled_from(EDGE),
    "gap": st.builds(
        lambda x, s: x * s, st.floats(-2.0, 2.0), st.sampled_from([30.0, 300.0, 3000.0, 1e5])
    ),
}
FAMILIES["mixed"] = st.one_of(*FAMILIES.values())
SCALES = [None, 1.0, -1.0, 0.5, -3.7, 2.0**-20, 1e-200, 1e200]


@st.composite
def edge_cases(draw):
    method = draw(st.sampled_from(["softmax", "log", "taylor", "polynomial", "linear"]))
    n_q = draw(st.integers(1, 3))
    causal = draw(st.booleans())
    n_k = n_q if causal else draw(st.integers(1, 3))
    d = draw(st.integers(1, 3))

    def mat(n, m, fam):
        x = draw(st.lists(FAMILIES[fam], min_size=n * m, max_size=n * m))
        return torch.tensor(x, dtype=F64).reshape(n, m)

    fams = st.sampled_from(sorted(FAMILIES))
    q, k = mat(n_q, d, draw(fams)), mat(n_k, d, draw(fams))
    v = mat(n_k, 2, draw(st.sampled_from(["ordinary", "wide", "edge", "mixed"])))
    if n_k >= 2 and draw(st.booleans()):  # exactly cancelling values on equal keys
        k[1], v[1] = k[0], -v[0]
    kw = {}
    if method == "linear":
        kw["feature_map"] = None
        if draw(st.booleans()):  # exactly zero features
            q[:, 0] = 0.0
    else:
        kw["scale"] = draw(st.sampled_from(SCALES))
    if method == "taylor":
        kw["degree"] = draw(st.sampled_from([0, 1, 2, 3, 4, 7, 171, 200]))
    if method == "polynomial":
        c = st.one_of(st.sampled_from([0.0, 1.0, -1.0, 1e-310, MIN_SUB, 1e300]), st.floats(-2, 2))
        kw["coeffs"] = draw(st.lists(c, min_size=1, max_size=5))
    return method, q, k, v, causal, kw


_Z1, _Z2 = torch.zeros(2, 1, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64)


@given(case=edge_cases())
# degree 171: the monomial states' underflow floor took 171! as a float (OverflowError)
@example(case=("taylor", _Z1, _Z1, _Z2, False, {"scale": -3.7, "degree": 171}))
def test_float64_contains_arb_on_edge_families(case):
    """Logit gaps past 745, huge and subnormal entries, values near the float64 max, min
    normal and min subnormal, negative and extreme scales, single keys, causal rows with one
    key, cancelling values, zero features, Taylor of degree >= 171, tiny coefficients."""
    method, q, k, v, causal, kw = case
    ra = reference(method, q, k, v, causal=causal, backend="arb", **kw)
    check(method, q, k, v, causal=causal, ra=ra, **kw)


def test_arb_midpoints_far_below_the_float64_range():
    # A weight exp(-1.6e15) makes a ball midpoint near 2^-(2.3e15): converting it must not
    # build that power of two (it used to raise MemoryError). It rounds to 0, and the radius
    # covers the exact value (a positive number below the smallest subnormal).
    from attnprec.analysis._reference_ball import HAVE_FLINT

    backend = "arb" if HAVE_FLINT else "mpmath"
    big = torch.finfo(torch.float64).max
    q = torch.tensor([[0.0, 0, 0], [0, 0, 0], [0, 1.534e-293, 0]], dtype=torch.float64)
    k = torch.tensor([[0.0, 0, 0], [0, 0, 0], [0, big, 0]], dtype=torch.float64)
    v = torch.tensor([[0.0, 0], [0, 1], [0, 0]], dtype=torch.float64)
    r = reference("softmax", q, k, v, causal=True, backend=backend)
    assert r.value[2, 1] == 0 and 0 < r.radius[2, 1] <= 2.0**-1074
    assert r.value[1, 1] == 0.5 and r.radius[1, 1] == 0


# --- found by a review sweep against 4000-bit arb (each gave a finite wrong radius) --------

BACKENDS = ["auto", "arb", "mpmath", "float64"]


def _exact_softmax(q, k, v, scale):
    """Exact softmax attention of float64 inputs (Fractions for the values' side, mpmath at
    80 digits for the exps: ample for the checks below)."""
    import mpmath

    mpmath.mp.dps = 80
    out = []
    for i in range(q.shape[0]):
        s = [
            mpmath.mpf(scale)
            * mpmath.fsum(mpmath.mpf(a) * mpmath.mpf(b) for a, b in zip(qi, kj, strict=True))
            for qi, kj in ((q[i].tolist(), k[j].tolist()) for j in range(k.shape[0]))
        ]
        top = max(s)
        w = [mpmath.exp(x - top) for x in s]
        tot = mpmath.fsum(w)
        out.append([mpmath.fsum(wj * mpmath.mpf(float(v[j, c])) for j, wj in enumerate(w)) / tot
                    for c in range(v.shape[1])])  # fmt: skip
    return out


def _contains(r, exact):
    import mpmath

    for i, row in enumerate(exact):
        for c, y in enumerate(row):
            assert abs(mpmath.mpf(float(r.value[i, c])) - y) <= mpmath.mpf(float(r.radius[i, c])), (
                i, c, float(r.value[i, c]), float(r.radius[i, c]), y,
            )  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_subnormal_outputs_keep_a_radius(backend):
    """An exact ball whose value is below the normal range (2^-1075, 1.5 2^-1074): rounding
    it to a float64 is off by up to 2^-1075, which a radius of ulp / 2 rounded to 0 missed."""
    q = k = torch.zeros(2, 1, dtype=F64)
    for top in (2.0**-1074, 3 * 2.0**-1074):
        v = T([[top], [0.0]])
        r = reference("softmax", q, k, v, backend=backend, scale=1.0)
        _contains(r, _exact_softmax(q, k, v, 1.0))


def test_float64_subnormal_value_column():
    """A value column whose largest |v| is subnormal: the float64 backend's rescaled radius
    (and its absolute term, built as float32) was 0."""
    q, k, v = T([[1.0]]), T([[0.0], [1.0]]), T([[3 * 2.0**-1074], [0.0]])
    with no_repair():
        r = reference("softmax", q, k, v, backend="float64", scale=1.0)
    _contains(r, _exact_softmax(q, k, v, 1.0))


@pytest.mark.parametrize(
    ("qv", "k0", "scale"), [(1e155, -1e154, 1e-310), (1.5e154, 1.5e154, -2.5e-308)]
)
def test_float64_dot_past_the_range_with_a_tiny_scale(qv, k0, scale):
    """|q.k| beyond float64's range, brought back by a tiny scale: the key was dropped
    (score -inf) under a finite radius; now its rows are uncertified by float64 (inf radius)
    and redone in ball arithmetic."""
    q, k, v = T([[qv]]), T([[k0], [0.0]]), T([[1.0], [0.0]])
    with no_repair():
        alone = reference("softmax", q, k, v, backend="float64", scale=scale)
    assert bool(torch.isinf(alone.radius).all())
    r = reference("softmax", q, k, v, backend="float64", scale=scale)
    assert bool(torch.isfinite(r.radius).all())
    _contains(r, _exact_softmax(q, k, v, scale))


def test_mpmath_backend_softcap_and_extreme_balls():
    """mpmath: soft-capped logits (its interval scalars do not defer to numpy arrays), a
    midpoint far below the float64 range with a huge mantissa (float(man) overflowed) and
    balls whose ends differ by 10^6 binary orders (the midpoint's integers exploded)."""
    from mpmath import iv, mpf

    from attnprec.analysis._reference_ball import MpmathBackend, _to_float

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, generator=g, dtype=F64) for _ in range(3))
    ra = reference("softmax", q, k, v, softcap=30.0, backend="arb")
    rm = reference("softmax", q, k, v, softcap=30.0, backend="mpmath")
    assert_intersect(ra, rm)
    assert _to_float(-(1 << 5000), -(10**6)) == 0.0 and _to_float(1 << 5000, 10) == math.inf
    a, b = mpf(2) ** -(10**6), mpf("1e150")  # exact binary numbers
    with MpmathBackend(prec=200) as be:
        (m, e), (rr, f) = be.midrad(iv.mpf([a, b]))
    assert e == f
    lo, hi = Fraction(m - rr) * Fraction(2) ** e, Fraction(m + rr) * Fraction(2) ** e
    b_exact = Fraction(b.man_exp[0]) * Fraction(2) ** b.man_exp[1]
    assert lo <= 0 and hi >= b_exact and hi - b_exact < b_exact * Fraction(2) ** -1000


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", ["arb", "mpmath"])
def test_ball_scores_near_1e200_get_a_value(backend, causal):
    """Scores near 1e200: at 128 bits mpmath's ball was 10^(+-1e199) wide around 1, and a
    midpoint past float64's range counted as settled (inf <= 2^-60 inf): the row came back
    as value inf, radius inf, where more bits settle it."""
    q = T([[1e150, 2e149], [-1e150, 3e149], [0.0, 1e150]])
    k = T([[1e150, 1.0], [3e149, 2e150], [-1e150, 0.0]])
    v = T([[1.0], [2.0], [-3.0]])
    r = reference("softmax", q, k, v, scale=1e-100, backend=backend, causal=causal)
    assert bool((r.radius <= 2.0**-50).all())
    if not causal:
        _contains(r, _exact_softmax(q, k, v, 1e-100))
    else:
        assert r.value.tolist() == [[1.0], [2.0], [2.0]]
    mix = MixtureLSE(c=(0.5, 2.0), lam=(1.0, 0.5))
    ra = reference("semiring", q, k, v, semiring=mix, scale=1e-100, backend="arb", causal=causal)
    rb = reference("semiring", q, k, v, semiring=mix, scale=1e-100, backend=backend, causal=causal)
    assert bool((rb.radius <= 2.0**-50).all())
    assert_intersect(ra, rb)


def test_polynomial_states_with_a_power_of_the_scale_below_float64():
    """``c_4 scale^4`` normal (2^700 2^-1600) while ``scale^3`` underflows: the monomial
    states formed the coefficient by products and dropped the term, a radius 10^13 times
    too small (a review). Exact here: ``w_ij = 1 + 2^-900 (q_i k_j)^4``."""
    g = torch.Generator().manual_seed(0)
    n = 8
    q = (torch.rand(n, 1, generator=g, dtype=torch.float64) + 0.5) * 2.0**115
    k = (torch.rand(n, 1, generator=g, dtype=torch.float64) + 0.5) * 2.0**115
    v = torch.randn(n, 1, generator=g, dtype=torch.float64)
    coeffs = [1.0, 0.0, 0.0, 0.0, 2.0**700]
    assert f64._states_pay(tuple(coeffs), 2.0**-400, 1, 1, n, n, False, torch.arange(n))
    r = reference("polynomial", q, k, v, scale=2.0**-400, coeffs=coeffs, backend="float64")
    for i in range(n):
        w = [1 + Fraction(2) ** -900 * (Fraction(q[i, 0].item()) * Fraction(kj)) ** 4
             for kj in k[:, 0].tolist()]  # fmt: skip
        exact = sum(wj * Fraction(vj) for wj, vj in zip(w, v[:, 0].tolist(), strict=True)) / sum(w)
        err = abs(exact - Fraction(r.value[i, 0].item()))
        assert err <= Fraction(r.radius[i, 0].item()), i
