"""Logit soft-capping (``softcap=``: logits ``cap tanh(s / cap)``, Gemma 2) in the method,
the reference, the bound and the audit."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnprec.analysis.audit import audit
from attnprec.analysis.bounds import attention_error_bound
from attnprec.analysis.precision import ELEMENTARY, Precision
from attnprec.analysis.reference import reference
from attnprec.attention import softmax_attention

F64 = torch.float64


def test_reference_against_direct_mpmath():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, generator=g, dtype=F64) * 3 for _ in range(3))
    cap = 2.5
    r = reference("softmax", q, k, v, softcap=cap, scale=1.0)
    mpmath.mp.prec = 200
    for i in range(3):
        s = [sum(mpmath.mpf(float(q[i, c])) * float(k[j, c]) for c in range(4)) for j in range(3)]
        w = [mpmath.exp(cap * mpmath.tanh(x / cap)) for x in s]
        for c in range(4):
            y = sum(wj * float(v[j, c]) for j, wj in enumerate(w)) / sum(w)
            assert abs(float(y) - float(r.value[i, c])) <= float(r.radius[i, c]) + 1e-300
    assert float(r.radius.max()) < 1e-12


def test_method_matches_the_reference():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(5, 8, generator=g, dtype=F64) * 4 for _ in range(3))
    y = softmax_attention(q, k, v, softcap=3.0, causal=True)
    r = reference("softmax", q, k, v, softcap=3.0, causal=True)
    assert bool(((y - r.value).abs() <= r.radius + 1e-13).all())


def _kernel(q, k, v, *, causal=False, scale=None, softcap=None):
    """A direct fp32 kernel with torch's tanh (glibc/SLEEF: within 2 ulp), one store."""
    return softmax_attention(q.float(), k.float(), v.float(), causal=causal, scale=scale,
                             softcap=softcap).to(q.dtype)  # fmt: skip


@settings(max_examples=30, deadline=None)
@given(
    st.sampled_from(["fp16", "bf16", "fp32"]),
    st.sampled_from([1.0, 5.0, 30.0, 50.0]),
    st.floats(0.5, 40.0),
    st.integers(2, 24),
    st.booleans(),
    st.integers(0, 2**31),
)
def test_audit_with_softcap_is_sound(storage, cap, spread, n, causal, seed):
    g = torch.Generator().manual_seed(seed)
    prec = Precision(storage, elementary=ELEMENTARY["libm"])  # torch's CPU tanh and exp
    dt = prec.storage.torch_dtype
    q, k, v = (torch.randn(n, 8, generator=g, dtype=F64) for _ in range(3))
    q = (q * spread).to(dt)
    k, v = k.to(dt), v.to(dt)
    rep = audit(_kernel, "softmax", q, k, v, precision=prec, causal=causal, softcap=cap)
    case = rep.cases[0]
    assert case.counts["violated"] == 0, case.describe()
    assert case.counts["unbounded"] == 0, case.describe()


def test_the_default_tanh_model_is_the_fast_one():
    # tanh.approx.f32 (2^-10.987 relative): the default model's bound is far wider than
    # libm's at large logits, where the cap matters
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(16, 8, generator=g, dtype=F64) * 4 for _ in range(3))
    fast = attention_error_bound("softmax", q, k, v, Precision("fp32"), softcap=10.0)
    exact = attention_error_bound(
        "softmax", q, k, v, Precision("fp32", elementary=ELEMENTARY["libm"]), softcap=10.0
    )
    assert float(fast.rounding.median()) > 50 * float(exact.rounding.median())
    assert math.isfinite(float(fast.total.max()))


@pytest.mark.parametrize("cap", [0.0, -1.0, math.inf, "5", True])
def test_bad_softcap_is_named(cap):
    x = torch.rand(4, 3, dtype=F64)
    error = TypeError if isinstance(cap, str | bool) else ValueError
    for call in (
        lambda: attention_error_bound("softmax", x, x, x, "fp32", softcap=cap),
        lambda: reference("softmax", x, x, x, softcap=cap),
        lambda: softmax_attention(x, x, x, softcap=cap),
    ):
        with pytest.raises(error, match="^softcap: "):
            call()


@pytest.mark.parametrize("cap", [1e300, 1e30, 50.0])
def test_softcapped_logits_of_any_size_are_within_their_error(cap):
    """``cap tanh(x / cap)`` where ``x / cap`` underflows: the cap multiplies its rounding
    back (a review: the error 1.1e15x under the true one at x = 1.2e-290, cap 1e300)."""
    from attnprec.analysis.bounds._rows import softcapped

    x = torch.tensor([1.234e-290, 5e-320, -3e-310, 1e-5, 0.7, 40.0], dtype=torch.float64)
    xc, sig = softcapped(x, torch.zeros_like(x), cap)
    with mpmath.workdps(80):
        for xi, ci, si in zip(x.tolist(), xc.tolist(), sig.tolist(), strict=True):
            exact = mpmath.mpf(cap) * mpmath.tanh(mpmath.mpf(xi) / mpmath.mpf(cap))
            assert abs(mpmath.mpf(ci) - exact) <= mpmath.mpf(si), (xi, ci, si)


@pytest.mark.parametrize("cap", [30.0, 20.3])
def test_a_softcap_dividing_by_cap_is_within_the_logits_error(cap):
    """``cap * tanh(s / cap)`` with ``/`` a division at its declared 2 ulps (Triton's fp32
    division), tanh at 2 ulps (libdevice's), ``cap`` and the product rounded to fp32: the
    logit model charged the argument ``2 u_c |s|`` (a rounded reciprocal and a product), a
    review found such a capped logit 1.24x outside it."""
    from attnprec.analysis.bounds.softmax import _LogitError
    from attnprec.analysis.precision import Elementary

    el = Elementary(tanh=2.0)
    le = _LogitError(Precision("fp32", elementary=el), 1.0, 4, cap, 1.0, 1.0)

    def pushed(y: float, ulps: float, sign: int) -> float:
        """The float32 number farthest from ``y`` toward ``sign`` within ``ulps`` ulps."""
        step = 2.0 ** (math.frexp(abs(y))[1] - 24)
        x = torch.tensor(y + sign * ulps * step, dtype=torch.float64).float()
        if sign * (float(x) - y) > ulps * step:
            x = torch.nextafter(x, torch.tensor(-sign * math.inf))
        return float(x)

    s = torch.linspace(1e-3, 3 * cap, 2001, dtype=torch.float64).float().double()
    allow = le.capped(torch.zeros_like(s), s)
    worst = 0.0
    for sign in (1, -1):
        for i, si in enumerate(s.tolist()):
            x = pushed(si / cap, el.div, sign)
            y = float(
                torch.tensor(
                    float(torch.tensor(cap).float()) * pushed(math.tanh(x), 2, sign)
                ).float()
            )
            worst = max(worst, abs(y - cap * math.tanh(si / cap)) / float(allow[i]))
    assert worst <= 1.0, worst


@pytest.mark.parametrize(("cap", "compute"), [(1e200, "fp32"), (1e300, "fp32"), (1e300, "fp16")])
def test_a_cap_past_compute_is_named_not_raised(cap: float, compute: str) -> None:
    # finite caps past compute's range: unbounded and named; a cap past float64's square
    # raised a bare OverflowError (a review)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in "qkv")
    eb = attention_error_bound("softmax", q, k, v, Precision("fp16", compute=compute), softcap=cap)
    assert bool(torch.isinf(eb.total).all())
    assert bool(eb.unbounded[f"soft-cap constants in {compute}"].all())
