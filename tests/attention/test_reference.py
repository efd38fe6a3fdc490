"""Every method against its certified reference, within the rounding bound its docstring states.

The inputs are Hypothesis draws over the input families (typical, outliers, sinks, ties,
cancel), shapes, batch dims, causal and not, and each method's parameters; the check is
``|y~ - value| <= radius + bound`` decided exactly (``Reference.contains``).
"""

from __future__ import annotations

import math

import _attn_bounds as B
import pytest
import torch
from hypothesis import given

from attnprec.analysis.reference import reference
from attnprec.attention import (
    Tropical,
    favor_attention,
    gated_linear_attention,
    linear_attention,
    log_attention,
    polynomial_attention,
    semiring_attention,
    softmax_attention,
    taylor_attention,
)
from attnprec.attention._common import DEFAULT_CHUNK
from attnprec.attention.taylor import taylor_coeffs
from attnprec.testing.strategies import attention_inputs

FAMILIES = ("typical", "outliers", "sinks", "ties", "cancel")


def tropical_bound(q, k, v, y_abs, *, causal, scale, u):
    """Tropical: the selection is certain where one computed logit leads the others by more
    than twice the logit error (then y = v_j exactly); with exactly computed logits (integer
    inputs, scale 1) ties are exact and the average of ``t`` values is off by at most
    ``gamma_t`` of the mean of ``|v|`` plus the division. Elsewhere no finite bound."""
    qd, kd = q.double(), k.double()
    s = scale * qd @ kd.transpose(-1, -2)
    exact = scale == 1.0 and all(bool((x == x.round()).all()) for x in (q, k))
    err = (
        0.0
        if exact
        else B.upper(
            B.gamma(q.shape[-1] + 1, u) * abs(scale) * (qd.abs() @ kd.abs().transpose(-1, -2)), 8
        )
    )
    n = q.shape[-2]
    if causal:
        mask = torch.ones(n, n, dtype=torch.bool).tril()
        s = s.masked_fill(~mask, -math.inf)
    top = s.amax(-1, keepdim=True)
    cand = s >= top - 2 * (err if exact else err.amax(-1, keepdim=True))
    count = cand.sum(-1, keepdim=True)
    mean_abs = (cand.double() @ v.double().abs()) / count
    if exact:
        return B.upper(B.gamma(k.shape[-2], u) * mean_abs + u * (y_abs + mean_abs), 4)
    return torch.where(count == 1, 0.0, math.inf).expand_as(y_abs)


def run(case, dtype_u, device="cpu"):
    """The implementation's output (computed on ``device``, returned on the CPU) and its
    bound for one drawn case (the bound needs |y|)."""
    p = dict(case.params)
    causal = p.pop("causal", False)
    q, k, v = case.q, case.k, case.v
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d)
    u = dtype_u
    m = case.method
    ref = reference(m, q, k, v, causal=causal, **p)
    y_abs = ref.value.abs() + ref.radius
    y = _call(m, *(x.to(device) for x in (q, k, v)), causal, p, device).cpu()
    if m == "softmax":
        bound = B.exp_weights_bound(q, k, v, y_abs, ((1.0, 1.0),), causal=causal, scale=scale, u=u)
    elif m == "taylor":
        c = taylor_coeffs(p["degree"])
        bound = B.polynomial_bound(q, k, v, y_abs, c, causal=causal, scale=scale, u=u)
    elif m == "polynomial":
        bound = B.polynomial_bound(q, k, v, y_abs, p["coeffs"], causal=causal, scale=scale, u=u)
    elif m == "linear":
        bound = B.linear_elu1_bound(q, k, v, y_abs, causal=causal, u=u)
    elif m == "favor":
        bound = B.favor_bound(
            q, k, v, y_abs, p["projection"], causal=causal, scale=scale, u=u, chunk=DEFAULT_CHUNK
        )
    elif m == "semiring":
        sr = p["semiring"]
        if isinstance(sr, Tropical):
            bound = tropical_bound(q, k, v, y_abs, causal=causal, scale=scale, u=u)
        else:
            bound = B.exp_weights_bound(q, k, v, y_abs, sr.terms, causal=causal, scale=scale, u=u)
    elif m == "gated":
        bound = B.gated_bound(q, k, v, p["log_g"], scale=scale, u=u, chunk=DEFAULT_CHUNK)
    else:  # log
        bound, _ = B.log_bound(q, k, v, causal=causal, scale=1.0)
    return y, ref, bound


def _call(m, q, k, v, causal, p, device):
    if m == "gated":
        return gated_linear_attention(q, k, v, p["log_g"].to(device))
    fn = {
        "softmax": softmax_attention,
        "taylor": taylor_attention,
        "polynomial": polynomial_attention,
        "linear": linear_attention,
        "favor": favor_attention,
        "semiring": semiring_attention,
        "log": log_attention,
    }[m]
    return fn(q, k, v, causal=causal, **p)


def check(case, u, device="cpu"):
    y, ref, bound = run(case, u, device)
    assert y.dtype == case.q.dtype
    ok = ref.contains(y, slack=bound)
    assert bool(ok.all()), (
        f"{case}: max excess {float(((y.double() - ref.value).abs() - bound).max())}"
    )


# Each example below needs a ball-arithmetic reference (~0.05 s) and an exact bound.
_SMALL = dict(max_n=8, max_d=6, families=FAMILIES, causal=None, batches=((), (2,)))


@pytest.mark.parametrize(
    "method", ["softmax", "taylor", "polynomial", "linear", "favor", "semiring", "gated"]
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_within_bound(method, dtype):
    u = B.unit(dtype)

    @given(attention_inputs(method, dtype=dtype, **_SMALL))
    def prop(case):
        check(case, u)

    prop()


@given(attention_inputs("log", dtype=torch.float64, **_SMALL))
def test_log_within_bound(case):
    check(case, B.U64)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("causal", [False, True])
def test_log_large_logits_any_sign(family, causal):
    """Logits far beyond exp's range (q, k scaled by 300) and values of both signs."""
    g = torch.Generator().manual_seed(7)
    q, k, v = _family_inputs(family, g)
    q, k = 300 * q, 300 * k
    y = log_attention(q, k, v, causal=causal)
    ref = reference("log", q, k, v, causal=causal)
    bound, _ = B.log_bound(q, k, v, causal=causal, scale=1.0)
    assert torch.isfinite(y).all()
    assert bool(ref.contains(y, slack=bound).all())


@pytest.mark.parametrize("family", FAMILIES)
def test_softmax_large_logits(family):
    g = torch.Generator().manual_seed(8)
    q, k, v = _family_inputs(family, g)
    q = 40 * q
    for causal in (False, True):
        y = softmax_attention(q, k, v, causal=causal)
        ref = reference("softmax", q, k, v, causal=causal)
        y_abs = ref.value.abs() + ref.radius
        s = 1 / math.sqrt(q.shape[-1])
        bound = B.exp_weights_bound(q, k, v, y_abs, ((1.0, 1.0),), causal=causal, scale=s, u=B.U64)
        assert bool(ref.contains(y, slack=bound).all())


def _family_inputs(family, g):
    from attnprec.testing.inputs import make_inputs

    return make_inputs(family, n_q=12, d_k=5, d_v=3, batch=(2,), generator=g)
