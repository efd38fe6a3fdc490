"""Dtypes, batch dims and NaN: the conventions every method shares."""

from __future__ import annotations

import math

import pytest
import torch

from attnprec.attention import (
    MixtureLSE,
    favor_attention,
    favor_projection,
    gated_linear_attention,
    linear_attention,
    log_attention,
    polynomial_attention,
    semiring_attention,
    softmax_attention,
    taylor_attention,
)
from attnprec.testing.inputs import make_inputs

W = favor_projection(8, 4, generator=torch.Generator().manual_seed(0))
CALLS = {
    "softmax": lambda q, k, v, **kw: softmax_attention(q, k, v, **kw),
    "log": lambda q, k, v, **kw: log_attention(q, k, v, **kw),
    "taylor": lambda q, k, v, **kw: taylor_attention(q, k, v, degree=2, **kw),
    "polynomial": lambda q, k, v, **kw: polynomial_attention(q, k, v, (1.0, 0.5, 0.5), **kw),
    "linear": lambda q, k, v, **kw: linear_attention(q, k, v, **kw),
    "favor": lambda q, k, v, **kw: favor_attention(q, k, v, projection=W, **kw),
    "semiring": lambda q, k, v, **kw: semiring_attention(
        q, k, v, semiring=MixtureLSE((1.0, 2.0), (0.5, 1.0)), **kw
    ),
    "semiring-taylor": lambda q, k, v, **kw: semiring_attention(
        q, k, v, semiring=MixtureLSE((1.0, 2.0), (0.5, 1.0)), linearize=("taylor", 2), **kw
    ),
    "gated": lambda q, k, v, **kw: gated_linear_attention(
        q, k, v, -0.5 * torch.ones(q.shape[-2], dtype=q.dtype), **kw
    ),
}
CASES = [(m, c) for m in CALLS for c in (True, False) if not (m == "gated" and not c)]


def _inputs(dtype=torch.float64, batch=(2,), n=6):
    g = torch.Generator().manual_seed(3)
    return make_inputs("typical", n_q=n, d_k=4, d_v=3, batch=batch, dtype=dtype, generator=g)


def _call(method, q, k, v, causal):
    return CALLS[method](q, k, v, causal=causal)


@pytest.mark.parametrize(("method", "causal"), CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computes_in_float32(method, causal, dtype):
    """fp16/bf16 inputs: computed in fp32 on the same (exact) values, one rounding to the
    input dtype at the end."""
    q, k, v = _inputs(dtype)
    y = _call(method, q, k, v, causal)
    assert y.dtype == dtype
    y32 = _call(method, q.float(), k.float(), v.float(), causal)
    assert y32.dtype == torch.float32
    assert torch.equal(y, y32.to(dtype))


@pytest.mark.parametrize(("method", "causal"), CASES)
def test_batch_dims_broadcast(method, causal):
    """Leading dims broadcast: k, v shared across heads give the shape of the heads.
    (Values per batch item are checked against the reference in test_reference.)"""
    q, k, v = _inputs(batch=(2, 3))
    shared = _call(method, q, k[0, 0], v[0, 0], causal)
    assert shared.shape == (2, 3, 6, 3)
    assert torch.isfinite(shared).all()
    with pytest.raises(ValueError, match="batch dims"):
        _call(method, q, k[:, :2], v[:, :2], causal)


@pytest.mark.parametrize("method", list(CALLS))
def test_nan_propagates(method):
    """A NaN in query i reaches row i only (causal: NaN in key j reaches rows >= j)."""
    q, k, v = _inputs(batch=())
    q = q.clone()
    q[2, 1] = math.nan
    y = _call(method, q, k, v, True)
    assert torch.isnan(y[2]).all()
    assert torch.isfinite(y[:2]).all() and torch.isfinite(y[3:]).all()
    k = k.clone()
    k[4, 0] = math.nan
    y = _call(method, _inputs(batch=())[0], k, v, True)
    assert torch.isfinite(y[:4]).all()
    assert torch.isnan(y[4:]).any()
