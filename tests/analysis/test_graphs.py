"""The kernels' graph bounds, checked without the kernels.

float32 PyTorch emulations of the same graphs (any summation order, one rounding per
product, libm exp) lie within the models of graphs.py, so the bounds must hold for them
too; the kernels themselves are checked in tests/kernels.
"""

from __future__ import annotations

import math

import pytest
import torch

from attnprec.analysis.bounds.graphs import recurrence_rounding_bound, rounding_bound
from attnprec.analysis.precision import Format, Precision
from attnprec.analysis.reference import reference
from attnprec.testing.inputs import make_inputs

FAMILIES = ("typical", "outliers", "sinks", "ties", "cancel")
FP32 = Precision(storage=Format.of("fp32"))
FP16 = Precision(storage=Format.of("fp16"))


def emulate_log(q, k, v, causal, block):
    """The log graph in float32 (docs/kernels.md, "Log kernel"), chunks of ``block`` keys."""
    sq, sk, v = q.float(), k.float(), v.float()
    d_k = sq.shape[-1]
    m = torch.full((d_k,), -math.inf)
    s = torch.zeros(d_k, v.shape[-1])
    z = torch.zeros(d_k)

    def absorb(kb, vb, m, s, z):
        new = torch.maximum(m, kb.amax(0))
        alpha = torch.where(m == -math.inf, 0.0, torch.exp(m - new))
        ek = torch.exp(kb - new)
        return new, s * alpha[:, None] + ek.T @ vb, z * alpha + ek.sum(0)

    if not causal:
        for c0 in range(0, sk.shape[0], block):
            m, s, z = absorb(sk[c0 : c0 + block], v[c0 : c0 + block], m, s, z)
        t = sq + m
        eq = torch.exp(t - t.amax(-1, keepdim=True))
        return (eq @ s) / (eq @ z)[:, None]
    out = []
    for c0 in range(0, sk.shape[0], block):
        qb, kb, vb = sq[c0 : c0 + block], sk[c0 : c0 + block], v[c0 : c0 + block]
        t = torch.where(m > -math.inf, qb + m, -math.inf)
        x = (qb[:, None, :] + kb[None, :, :]).masked_fill(
            ~torch.ones(len(qb), len(qb), dtype=torch.bool).tril()[:, :, None], -math.inf
        )
        big = torch.maximum(t.amax(-1), x.amax((-2, -1)))
        eq = torch.exp(t - big[:, None])
        a = torch.exp(x - big[:, None, None]).sum(-1)
        out.append((eq @ s + a @ vb) / ((eq * z).sum(-1) + a.sum(-1))[:, None])
        m, s, z = absorb(kb, vb, m, s, z)
    return torch.cat(out)


def emulate_linear(fq, fk, v, causal):
    w = fq.float() @ fk.float().T
    if causal:
        w = w.tril()
    return (w @ v.float()) / w.sum(-1, keepdim=True)


def check(y, ref, bound):
    err = (y.double() - ref.value).abs()
    assert (err <= bound + ref.radius).all(), (err - bound).max()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("causal", [False, True])
def test_log_bound_holds_for_float32_emulation(family, causal):
    g = torch.Generator().manual_seed(4)
    q, k, v = make_inputs(family, n_q=30, d_k=6, d_v=3, dtype=torch.float32, generator=g)
    ref = reference("log", q, k, v, causal=causal)
    bound = rounding_bound("log", q, k, v, FP32, causal=causal, block=8)
    check(emulate_log(q, k, v, causal, 8), ref, bound)


def test_log_bound_finite_for_keys_far_below_a_later_key():
    """Visible keys hundreds below a later key of the chunk (every channel), in the first
    chunk and after a carried state: the per-row shift keeps the normalizer >= 1, so the
    bound is finite everywhere and holds."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(24, 3, generator=g) for _ in range(3))
    k[5] = 400.0  # above keys 0..4 (chunk 0)
    k[14] = 900.0  # chunk 1 (keys 8..15): above keys 8..13 and the carried state
    ref = reference("log", q, k, v, causal=True)
    bound = rounding_bound("log", q, k, v, FP32, causal=True, block=8)
    y = emulate_log(q, k, v, True, 8)
    assert torch.isfinite(bound).all()
    check(y, ref, bound)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("causal", [False, True])
def test_linear_bound_holds_for_float32_emulation(family, causal):
    g = torch.Generator().manual_seed(5)
    q, k, v = make_inputs(family, n_q=30, d_k=6, d_v=3, dtype=torch.float32, generator=g)
    fq, fk = torch.exp(q / 4), torch.exp(k / 4)  # positive features, exact float32 inputs
    ref = reference("linear", fq, fk, v, causal=causal, feature_map=lambda x: x)
    check(emulate_linear(fq, fk, v, causal), ref, rounding_bound("linear", fq, fk, v, FP32,
                                                                  causal=causal))  # fmt: skip


def test_store_rounding_is_included():
    """With fp16 storage the bound is at least the rounding of the exact output (RNE)."""
    g = torch.Generator().manual_seed(6)
    q, k, v = make_inputs("typical", n_q=20, d_k=4, d_v=3, dtype=torch.float16, generator=g)
    ref = reference("taylor", q, k, v, degree=2)
    b16 = rounding_bound("taylor", q, k, v, FP16, degree=2)
    b32 = rounding_bound("taylor", q, k, v, FP32, degree=2)
    rounded = ref.value.to(torch.float16).double()
    assert ((rounded - ref.value).abs() <= b16).all()
    assert (b32 < b16).all()


def test_worst_case_block_is_larger():
    g = torch.Generator().manual_seed(7)
    q, k, v = make_inputs("outliers", n_q=40, d_k=4, d_v=2, generator=g)
    assert (rounding_bound("log", q, k, v, FP32) >= rounding_bound("log", q, k, v, FP32,
                                                                   block=16)).all()  # fmt: skip


def test_vanishing_normalizer_gives_inf():
    """w = s (coeffs [0, 1]) with q orthogonal to every key: the normalizer is 0."""
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[0.0, 1.0], [0.0, 2.0]])
    v = torch.ones(2, 1)
    b = rounding_bound("polynomial", q, k, v, FP32, coeffs=[0.0, 1.0])
    assert math.isinf(b[0, 0]) and math.isfinite(b[1, 0])


def test_overflow_gives_inf():
    q = torch.full((3, 2), 60000.0, dtype=torch.float16)
    b = rounding_bound("taylor", q, q, torch.ones(3, 1, dtype=torch.float16), FP16, degree=4,
                       scale=1.0)  # fmt: skip
    assert torch.isinf(b).all()


def test_nan_inputs_give_nan():
    q = torch.randn(4, 2)
    q[1, 0] = float("nan")
    b = rounding_bound("linear", q.abs(), q.abs(), torch.ones(4, 1), FP32)
    assert torch.isnan(b[1]).all()
    # log, causal: only the rows that see the NaN key / value (and the value's column)
    q, k, v = torch.randn(3, 6, 2).unbind(0)
    k[3, 1] = v[2, 0] = float("nan")
    b = rounding_bound("log", q, k, v, FP32, causal=True, block=4)
    expect = torch.zeros(6, 2, dtype=torch.bool)
    expect[2:, 0] = expect[3:] = True
    assert torch.equal(torch.isnan(b), expect)


def test_argument_errors():
    q = torch.randn(3, 2)
    with pytest.raises(ValueError, match="^method: "):
        rounding_bound("flash", q, q, q, FP32)
    with pytest.raises(TypeError, match="^precision: "):
        rounding_bound("log", q, q, q, "fp32")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="^feature_map: "):
        rounding_bound("linear", q, q, q, FP32, feature_map="elu1")
    with pytest.raises(ValueError, match="^scale: "):
        rounding_bound("linear", q, q, q, FP32, scale=2.0)
    with pytest.raises(ValueError, match="^coeffs: "):
        rounding_bound("polynomial", q, q, q, FP32)
    with pytest.raises(ValueError, match="^k: "):
        rounding_bound("log", q, q[:, :1], q, FP32)
    with pytest.raises(ValueError, match="^block: "):
        rounding_bound("log", q, q, q, FP32, block=0)


def test_recurrence_bound_holds_for_float64_loop_and_flags():
    """A float64 loop is far inside the float32 model; NaN poisons later steps; overflow."""
    from fractions import Fraction

    g = torch.Generator().manual_seed(8)
    a = torch.randn(2, 50, generator=g)
    b = torch.randn(2, 50, generator=g)
    bound = recurrence_rounding_bound(a, b, None, FP32, block=32)
    for r in range(2):
        x, xf = 0.0, Fraction(0)
        for t in range(50):
            x = float(a[r, t]) * x + float(b[r, t])
            xf = Fraction(float(a[r, t])) * xf + Fraction(float(b[r, t]))
            assert abs(Fraction(x) - xf) <= Fraction(float(bound[r, t]))
    a[0, 10] = float("nan")
    nb = recurrence_rounding_bound(a, b, torch.zeros(2), FP32)
    assert torch.isnan(nb[0, 10:]).all() and not torch.isnan(nb[0, :10]).any()
    big = recurrence_rounding_bound(torch.full((1, 200), 10.0), torch.ones(1, 200), None, FP16)
    assert torch.isinf(big[0, -1]) and torch.isfinite(big[0, 0])
    with pytest.raises(ValueError, match="^b: "):
        recurrence_rounding_bound(a, b[:1], None, FP32)
    with pytest.raises(ValueError, match="^x0: "):
        recurrence_rounding_bound(a, b, torch.zeros(3), FP32)


def test_the_recurrences_magnitudes_are_upper_bounds():
    """``T_t = |a_t| T_{t-1} + |b_t|`` from its float64 log chain: each step errs by a few
    u64 of the logs' moduli, absolutely (a review: at |log T| ~ 80 the relative charge
    ``4 n u64`` put T up to 546 u64 under the exact one). Exact T in rationals."""
    from fractions import Fraction

    from attnprec.analysis.bounds.graphs import _magnitudes_up

    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        n = 64
        big = (1e30, 1e-30, 1e37, 1e-37)[seed % 4]
        a = (torch.rand(n, generator=g) * 0.5 + 0.75).float().double()
        b = ((torch.rand(n, generator=g) + 0.5) * big).float().double()
        la, lb, l0 = a.log(), b.log(), torch.tensor(-math.inf, dtype=torch.float64)
        lt, lts = l0, []
        for t in range(n):
            lt = torch.logaddexp(la[t] + lt, lb[t])
            lts.append(lt)
        T = _magnitudes_up(torch.stack(lts), la, lb, l0)
        exact = Fraction(0)
        for t in range(n):
            exact = Fraction(float(a[t])) * exact + Fraction(float(b[t]))
            assert Fraction(float(T[t])) >= exact, (seed, t)
