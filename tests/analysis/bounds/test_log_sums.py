"""The log bound covers kernels that hold their partial sums as logs rounded to compute
(``Precision.sums``; docs/bounds/attention.md, "Log-space sums")."""

from __future__ import annotations

import math

import pytest
import torch

from attnprec.analysis.bounds import attention_error_bound
from attnprec.analysis.precision import Elementary, Precision, round_to
from attnprec.analysis.reference import reference
from attnprec.attention import log_attention


def _logadd(La, sa, Lb, sb):
    """Signed ``log|a + b|`` in float32 ops, as a log-space kernel computes it."""
    swap = Lb > La
    La, Lb = torch.where(swap, Lb, La), torch.where(swap, La, Lb)
    sa, sb = torch.where(swap, sb, sa), torch.where(swap, sa, sb)
    empty_b = torch.isneginf(Lb)
    d = torch.where(empty_b, torch.zeros_like(La), La - Lb)
    t = torch.where(empty_b, torch.zeros_like(La), torch.exp(-d))
    s = sa * sb
    cancel = (s < 0) & (t == 1)
    r = torch.log1p(torch.where(cancel, torch.zeros_like(t), s * t))
    L = torch.where(cancel, torch.full_like(La, -math.inf), La + r)
    return L, torch.where(cancel, torch.zeros_like(sa), sa)


def _recurrent_log_kernel(q, k, v, scale):
    """Causal log attention as a recurrent log-space state in float32: per token one
    ``logaddexp`` per (channel, column) into the state, the queries' sums over channels
    one ``logaddexp`` at a time, then ``exp(log N - log D)``."""
    q, k, v = (x.float() for x in (q, k, v))
    n, C = k.shape
    X, Y = scale * q, scale * k
    Ln = torch.full((C, v.shape[-1]), -math.inf)
    Sn = torch.zeros_like(Ln)
    Ld = torch.full((C,), -math.inf)
    Sd = torch.zeros_like(Ld)
    out = []
    for j in range(n):
        term = Y[j, :, None] + v[j].abs().log()[None]
        Ln, Sn = _logadd(Ln, Sn, term, v[j].sign()[None].expand_as(Sn))
        Ld, Sd = _logadd(Ld, Sd, Y[j], torch.ones_like(Sd))
        Zn, Zd = X[j, :, None] + Ln, X[j] + Ld
        an, sn = Zn[0], Sn[0]
        ad, sd = Zd[0], Sd[0]
        for c in range(1, C):
            an, sn = _logadd(an, sn, Zn[c], Sn[c])
            ad, sd = _logadd(ad, sd, Zd[c], Sd[c])
        out.append(sn * torch.exp(an - ad))
    return torch.stack(out).double()


def _inputs(seed, n, d, cancel):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(3))
    if cancel:  # prefix sums of v that nearly cancel: log|S| far below the terms'
        v[1::2] = -v[0::2][: n // 2] * (1 + 2.0**-20 * torch.randn(n // 2, d, generator=g))
    return (round_to(x, "fp32") for x in (q, k, v))


@pytest.mark.parametrize("cancel", [False, True])
@pytest.mark.parametrize("scale", [1.0, -4.0, 3.0])
def test_recurrent_log_space_kernel_within_the_default_bound(scale, cancel):
    worst = 0.0
    for seed in range(8):
        q, k, v = _inputs(seed, 12, 3, cancel)
        exact = reference("log", q, k, v, causal=True, scale=scale)
        y = _recurrent_log_kernel(q, k, v, scale)
        bound = attention_error_bound("log", q, k, v, Precision("fp32"), causal=True, scale=scale)
        err = (y - exact.value).abs() + exact.radius
        assert bool(torch.isfinite(bound.total).all())
        assert bool((err <= bound.total).all()), (seed, float((err / bound.total).max()))
        worst = max(worst, float((err / bound.total).max()))
    assert worst > 0.0  # the kernel does round


def test_signed_log_sums_exceed_the_linear_model():
    """The case the thorough profile found (seed 297): attention.log_attention in fp32
    (signed log-space key sums rounded to fp32) is outside the bound of the linear model
    and inside the default one."""
    g = torch.Generator().manual_seed(297)
    q, k, v = (torch.randn(6, 3, generator=g, dtype=torch.float64) for _ in range(3))
    y = log_attention(q.float(), k.float(), v.float(), scale=-4.0).double()
    exact = reference("log", q, k, v, scale=-4.0)
    err = (y - exact.value).abs() + exact.radius
    linear = attention_error_bound("log", q, k, v, Precision("fp32", sums="linear"), scale=-4.0)
    default = attention_error_bound("log", q, k, v, Precision("fp32"), scale=-4.0)
    assert bool((err > linear.total).any())
    assert bool((err <= default.total).all())
    assert bool((default.total >= linear.total).all())


def test_sums_declaration_is_checked():
    with pytest.raises(ValueError, match="sums"):
        Precision("fp32", sums="logs")
    q = torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="precision: partial sums held as logs"):
        attention_error_bound("taylor", q, q, q, Precision("fp32", sums="log"), degree=2)
    assert "partial sums as logs" in Precision("fp32", sums="log").describe()
    for method, kw in (("log", {}), ("taylor", {"degree": 2})):  # softmax, semirings only
        with pytest.raises(ValueError, match="precision: merges of split states"):
            attention_error_bound(method, q, q, q, Precision("fp32", merges=3), **kw)


@pytest.mark.parametrize("storage", ["fp16", "fp32", "bf16"])
def test_zero_values_are_bounded(storage):
    """A value of exactly 0 is no term (its log is -inf): the log-space part must not turn
    it into NaN and call the element unbounded."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(16, 4, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(16, 4, generator=g, dtype=torch.float64)
    v[:, 1] = 0.0
    v[3] = 0.0
    for causal in (False, True):
        bound = attention_error_bound("log", q, k, v, Precision(storage), causal=causal)
        assert bool(torch.isfinite(bound.total).all()), sorted(bound.unbounded)
        linear = attention_error_bound(
            "log", q, k, v, Precision(storage, sums="linear"), causal=causal
        )
        assert bool((bound.total >= linear.total).all())


@pytest.mark.parametrize("scale", [1.0, -4.0])
@pytest.mark.parametrize("cancel", [False, True])
def test_accurate_log_sums_within_their_declared_bound(scale, cancel):
    """attention.log_attention rounds each float64 log-sum once to compute:
    ``Elementary(logsum=1)`` declares it, a tighter bound than any log-add composed in
    compute, and still sound."""
    el = Elementary(logsum=1)
    for seed in range(6):
        q, k, v = _inputs(seed, 48, 4, cancel)
        exact = reference("log", q, k, v, causal=True, scale=scale)
        y = log_attention(q.float(), k.float(), v.float(), causal=True, scale=scale).double()
        err = (y - exact.value).abs() + exact.radius
        declared = attention_error_bound(
            "log", q, k, v, Precision("fp32", elementary=el), causal=True, scale=scale
        )
        generic = attention_error_bound("log", q, k, v, Precision("fp32"), causal=True, scale=scale)
        assert bool((err <= declared.total).all()), float((err / declared.total).max())
        assert bool((declared.total < generic.total).all())
    with pytest.raises(ValueError, match="logsum"):
        Elementary(logsum=-1)
