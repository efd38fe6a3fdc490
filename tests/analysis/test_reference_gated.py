"""The gated reference (chunked recurrence) against the dense factorized formula.

The oracle below is the formula the reference used before it ran as a recurrence, computed
independently here in ``mpmath.iv`` intervals at 300 bits: with L the prefix sums of the
log-gates, o = scale tril((q exp(L)) (k exp(-L))^T) v. Both are certified enclosures of the
same exact numbers, so they must overlap; the reference must also be settled (radius <=
2^-52 |value|: 2^-60 for the ball plus the float conversion, docs/reference.md).
"""

import importlib
import math
from fractions import Fraction

import pytest
import torch
from mpmath import iv

from attnprec.analysis import _reference_ball
from attnprec.analysis.reference import Reference, reference

# the module (attnprec.analysis.reference is also the name of the function)
reference_module = importlib.import_module("attnprec.analysis.reference")
F64 = torch.float64
BALL = ["arb", "mpmath"] if _reference_ball.HAVE_FLINT else ["mpmath"]


def _dense(q, k, v, log_g, scale):
    """Interval enclosures [n, d_v] of one batch item's outputs (log_g [n, d_k])."""
    n, d_k = q.shape
    saved, iv.prec = iv.prec, 300
    try:
        acc = [iv.mpf(0)] * d_k
        qt, kt = [], []
        for t in range(n):
            acc = [a + iv.mpf(float(log_g[t, c])) for c, a in enumerate(acc)]
            qt.append([iv.mpf(float(q[t, c])) * iv.exp(acc[c]) for c in range(d_k)])
            kt.append([iv.mpf(float(k[t, c])) * iv.exp(-acc[c]) for c in range(d_k)])
        out = []
        for t in range(n):
            a = [sum((qt[t][c] * kt[j][c] for c in range(d_k)), iv.mpf(0)) for j in range(t + 1)]
            out.append(
                [
                    iv.mpf(scale) * sum((a[j] * float(v[j, e]) for j in range(t + 1)), iv.mpf(0))
                    for e in range(v.shape[1])
                ]
            )
    finally:
        iv.prec = saved
    return out


def _ends(x):
    """The endpoints of an ``iv`` interval as exact Fractions."""
    out = []
    for sign, man, exp, _ in x._mpi_:
        assert man or not exp, "infinite or NaN endpoint"
        f = Fraction(man) * Fraction(2) ** exp
        out.append(-f if sign else f)
    return out


def _check(r, q, k, v, log_g, scale, rows=None):
    """``r`` (one batch item, the rows ``rows`` of the sequence) overlaps the dense
    enclosure and is settled."""
    want = _dense(q, k, v, log_g, scale)
    rows = range(q.shape[0]) if rows is None else rows
    assert r.value.shape == (len(rows), v.shape[1])
    for i, t in enumerate(rows):
        for e, w in enumerate(want[t]):
            val, rad = float(r.value[i, e]), float(r.radius[i, e])
            assert rad <= 2.0**-52 * abs(val), (t, e, val, rad)
            lo, hi = _ends(w)
            assert lo <= Fraction(val) + Fraction(rad), (t, e)  # exact comparisons
            assert Fraction(val) - Fraction(rad) <= hi, (t, e)


def _inputs(seed, n, d_k, d_v, batch=()):
    g = torch.Generator().manual_seed(seed)
    return tuple(2 * torch.rand(*batch, n, d, generator=g, dtype=F64) - 1 for d in (d_k, d_k, d_v))


@pytest.mark.parametrize("backend", BALL)
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_matches_dense_formula(backend, per_channel, chunk, monkeypatch):
    # n = 23: chunks of 5 and 16 end inside the sequence (a partial last chunk)
    monkeypatch.setattr(reference_module, "GATED_CHUNK", chunk)
    n, d_k, d_v = 23, 3, 2
    q, k, v = _inputs(1, n, d_k, d_v)
    g = torch.Generator().manual_seed(2)
    log_g = -torch.rand(*((n, d_k) if per_channel else (n,)), generator=g, dtype=F64)
    r = reference("gated", q, k, v, log_g=log_g, backend=backend)
    assert r.backend == backend and r.rows is None
    lg = log_g if per_channel else log_g[:, None].expand(n, d_k)
    _check(r, q, k, v, lg, 1 / math.sqrt(d_k))


def _direct(q, k, v, log_g, scale):
    """Interval enclosures of ``scale sum_{j <= t} sum_c q_tc D_tjc k_jc v_j`` term by term,
    ``D_tjc = exp(sum_{j < l <= t} log g_lc)`` and exactly 0 across a reset (-inf)."""
    n, d_k = q.shape
    saved, iv.prec = iv.prec, 300
    try:
        out = []
        for t in range(n):
            a = []
            for j in range(t + 1):
                span = log_g[j + 1 : t + 1]
                acc = iv.mpf(0)
                for c in range(d_k):
                    if bool(torch.isinf(span[:, c]).any()):
                        continue
                    dec = iv.exp(sum((iv.mpf(float(x)) for x in span[:, c]), iv.mpf(0)))
                    acc += iv.mpf(float(q[t, c])) * dec * float(k[j, c])
                a.append(acc)
            out.append([iv.mpf(scale) * sum((a[j] * float(v[j, e]) for j in range(t + 1)),
                                            iv.mpf(0)) for e in range(v.shape[1])])  # fmt: skip
    finally:
        iv.prec = saved
    return out


@pytest.mark.parametrize("backend", BALL)
@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_resets(backend, chunk, monkeypatch):
    """``log g = -inf`` (a reset, ``gated_linear_attention``'s gate of 0): at the first step,
    inside a chunk, at a chunk's first step, in one channel and in every channel. The
    reference refused them ("expected finite values"); each is now a piece of its chunk
    whose state enters with the reset channels zeroed."""
    monkeypatch.setattr(reference_module, "GATED_CHUNK", chunk)
    n, d_k, d_v = 23, 3, 2
    q, k, v = _inputs(8, n, d_k, d_v)
    log_g = -torch.rand(n, d_k, generator=torch.Generator().manual_seed(9), dtype=F64)
    log_g[0, 1] = log_g[7, 0] = log_g[10] = log_g[16, 2] = log_g[17, 2] = -math.inf
    r = reference("gated", q, k, v, log_g=log_g, backend=backend)
    want = _direct(q, k, v, log_g, 1 / math.sqrt(d_k))
    for t in range(n):
        for e, w in enumerate(want[t]):
            val, rad = float(r.value[t, e]), float(r.radius[t, e])
            lo, hi = _ends(w)
            assert lo <= Fraction(val) + Fraction(rad) and Fraction(val) - Fraction(rad) <= hi
    # sampled rows: the same pieces up to the last row asked
    some = reference("gated", q, k, v, log_g=log_g, rows=[3, 10, 17], backend=backend)
    assert ((some.value - r.value[[3, 10, 17]]).abs() <= some.radius + r.radius[[3, 10, 17]]).all()
    with pytest.raises(ValueError, match="^log_g: expected all <= 0"):
        reference("gated", q, k, v, log_g=torch.full((n,), math.inf), backend=backend)


@pytest.mark.parametrize("backend", BALL)
def test_batch_dims_and_broadcast_gates(backend, monkeypatch):
    monkeypatch.setattr(reference_module, "GATED_CHUNK", 4)
    n, d_k, d_v = 10, 2, 3
    q, k, v = _inputs(3, n, d_k, d_v, (2, 1))
    k = k.expand(2, 2, n, d_k)  # batch [2, 2] by broadcasting
    g = torch.Generator().manual_seed(4)
    log_g = -2 * torch.rand(2, n, d_k, generator=g, dtype=F64)  # broadcast over dim 0
    r = reference("gated", q, k, v, log_g=log_g, scale=0.75, backend=backend)
    assert r.value.shape == (2, 2, n, d_v)
    for a in range(2):
        for b in range(2):
            one = Reference(r.value[a, b], r.radius[a, b], r.backend)
            _check(one, q[a, 0], k[a, b], v[a, 0], log_g[b], 0.75)


@pytest.mark.parametrize("backend", BALL)
def test_rows_run_the_recurrence_to_the_last_row_asked(backend, monkeypatch):
    monkeypatch.setattr(reference_module, "GATED_CHUNK", 4)
    n, d_k, d_v = 19, 3, 2
    q, k, v = _inputs(5, n, d_k, d_v)
    log_g = -torch.rand(n, d_k, generator=torch.Generator().manual_seed(6), dtype=F64)
    rows = [13, 0, 5, 6]  # unsorted; two in one chunk, none after 13
    r = reference("gated", q, k, v, log_g=log_g, rows=rows, backend=backend)
    assert r.rows.tolist() == [0, 5, 6, 13]
    _check(r, q, k, v, log_g, 1 / math.sqrt(d_k), [0, 5, 6, 13])
    # a count: the first and last rows and others drawn; the same as every row there
    full = reference("gated", q, k, v, log_g=log_g, backend=backend)
    r = reference("gated", q, k, v, log_g=log_g, rows=6, backend=backend)
    assert r.rows[0] == 0 and r.rows[-1] == n - 1 and r.rows.numel() == 6
    sel = full.value[r.rows], full.radius[r.rows]
    assert ((r.value - sel[0]).abs() <= r.radius + sel[1]).all()


@pytest.mark.parametrize("backend", BALL)
@pytest.mark.parametrize(
    "gates",
    [
        pytest.param(lambda n, d: torch.full((n,), -800.0, dtype=F64), id="scalar-800"),
        # per channel: exp(L) of -3000 per step next to channels that barely decay
        pytest.param(
            lambda n, d: torch.tensor([-800.0, 0.0, -3000.0, -0.5], dtype=F64)[:d].expand(n, d),
            id="mixed",
        ),
    ],
)
def test_extreme_gates_past_the_float64_range(backend, gates, monkeypatch):
    # exp(L_t) underflows float64 after one step (and exp(-L_t) overflows): not arb's or
    # mpmath's exponents. The outputs stay settled, close to scale q_t . k_t v_t.
    monkeypatch.setattr(reference_module, "GATED_CHUNK", 8)
    n, d_k, d_v = 20, 4, 2
    q, k, v = _inputs(7, n, d_k, d_v)
    log_g = gates(n, d_k)
    r = reference("gated", q, k, v, log_g=log_g, backend=backend)
    lg = log_g if log_g.dim() == 2 else log_g[:, None].expand(n, d_k)
    _check(r, q, k, v, lg, 0.5)
    assert torch.isfinite(r.value).all()


@pytest.mark.parametrize("backend", BALL)
@pytest.mark.parametrize("per_channel", [False, True])
def test_a_gate_below_minus_2_to_the_40_is_a_factor_not_a_term_of_the_sum(
    backend, per_channel, monkeypatch
):
    """A review: a log-gate of -1e308 between gates of -0.5 made the chunk's sum of
    log-gates inexact by more than 1 at any precision, exp of it a ball about 0, and rows
    after it NaN with an infinite radius. The state is now multiplied by exp(-1e308) (0 to
    far below any float) at that token: the outputs are a reset's, to the radii."""
    monkeypatch.setattr(reference_module, "GATED_CHUNK", 4)
    n, d_k, d_v = 9, 2, 1
    q, k, v = _inputs(3, n, d_k, d_v)
    log_g = torch.full((n, d_k) if per_channel else (n,), -0.5, dtype=F64)
    log_g[2] = -1e308
    if per_channel:
        log_g[5, 1] = -(2.0**41)
    r = reference("gated", q, k, v, log_g=log_g, backend=backend)
    reset = torch.where(log_g < -(2.0**40), -math.inf, log_g)
    r0 = reference("gated", q, k, v, log_g=reset, backend=backend)
    assert bool(torch.isfinite(r.value).all()) and float(r.radius.max()) < 1e-12
    assert bool(((r.value - r0.value).abs() <= r.radius + r0.radius).all())


def test_nan_inputs_reach_the_outputs_they_feed(monkeypatch):
    # across chunk boundaries: NaN in k_j reaches every row >= j, in v_je column e of the
    # rows >= j, in q_t row t alone; the other outputs are those of the inputs without it
    monkeypatch.setattr(reference_module, "GATED_CHUNK", 3)
    n, d_k, d_v = 9, 2, 2
    q, k, v = _inputs(8, n, d_k, d_v)
    log_g = -torch.rand(n, generator=torch.Generator().manual_seed(9), dtype=F64)
    base = reference("gated", q, k, v, log_g=log_g)
    qn, kn, vn = q.clone(), k.clone(), v.clone()
    qn[1, 0] = kn[4, 1] = vn[7, 1] = math.nan
    r = reference("gated", qn, kn, vn, log_g=log_g)
    want = torch.zeros(n, d_v, dtype=torch.bool)
    want[1] = True
    want[4:] = True
    want[7:, 1] = True
    assert torch.equal(torch.isnan(r.value), want) and torch.equal(torch.isnan(r.radius), want)
    keep = torch.zeros_like(want)
    keep[[0, 2, 3]] = True  # before the NaN key: not changed by zeroing the NaNs
    assert torch.equal(r.value[keep], base.value[keep])


def test_gate_shapes_that_read_two_ways_are_refused():
    """With B = n = d_k a per-step ``[B, n]`` gate is also a per-channel ``[n, d_k]`` one: the
    reference, the bound and the method took the second silently (a review's find: read as
    meant, the certified output was 1.1e18 radii off); each names ``log_g`` now, and the
    unambiguous forms still work."""
    from attnprec.analysis.bounds import attention_error_bound
    from attnprec.attention import gated_linear_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 2, generator=g, dtype=torch.float64) for _ in range(3))
    lg = -torch.rand(2, 2, generator=g, dtype=torch.float64)
    for call in (
        lambda x: reference("gated", q, k, v, log_g=x),
        lambda x: attention_error_bound("gated", q, k, v, "fp32", causal=True, log_g=x),
        lambda x: gated_linear_attention(q, k, v, x),
    ):
        with pytest.raises(ValueError, match=r"log_g: shape \(2, 2\) reads both as per-step"):
            call(lg)
        call(lg[None])  # per channel, with a batch dim
        call(lg[..., None].expand(2, 2, 2))  # per step, expanded over the channels
    # unbatched inputs: [n, d_k] reads one way only
    reference("gated", q[0], k[0], v[0], log_g=lg)
