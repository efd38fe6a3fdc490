"""Every model flags the intermediates a declared kernel may overflow, naming them: an
element whose kernel output may be inf or NaN while the exact value is finite is unbounded,
never given a finite bound. Loads into a narrower compute format and the feature products
were missing from the featured (taylor, polynomial, linear), log / FAVOR+ and gated models."""

from __future__ import annotations

import pytest
import torch
from _method_params import METHOD_PARAMS

from attnprec.analysis.bounds import attention_error_bound
from attnprec.analysis.precision import Precision
from attnprec.attention import favor_projection

F64 = torch.float64
PARAMS = {
    **METHOD_PARAMS,
    "gated": {"log_g": -0.1 * torch.ones(6)},
    "favor": {"projection": favor_projection(8, 2, generator=torch.Generator().manual_seed(0))},
}


@pytest.mark.parametrize("method", sorted(PARAMS))
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_load_past_compute_is_unbounded(method, which):
    """fp32 storage, fp16 compute: one entry of 7e4 (> 65504) overflows on loading. The
    rows that load it (the row itself for q; the rows that see the key for k, v) are
    unbounded under 'load into fp16'; the rows before a causal key are not affected."""
    g = torch.Generator().manual_seed(1)
    x = {n: 0.5 * torch.randn(6, 2, generator=g, dtype=F64) for n in "qkv"}
    if method == "linear":
        x["q"], x["k"] = x["q"].abs() + 0.1, x["k"].abs() + 0.1
    x[which][3, 0] = 7e4
    prec = Precision("fp32", "fp16", "fp32")
    eb = attention_error_bound(method, x["q"], x["k"], x["v"], prec, causal=True, **PARAMS[method])
    hit = eb.unbounded["load into fp16"]
    rows = [3] if which == "q" else [3, 4, 5]
    assert bool(hit[rows].all()) and not bool(hit[:3].any())
    assert bool(torch.isinf(eb.total[rows]).all())


def test_taylor_features_past_compute_are_unbounded():
    """Degree 2 in fp16 compute: a key of 300 has the feature 300^2 = 9e4 > 65504 (the
    kernel's state becomes inf, its output NaN; the bound was finite, 0.22)."""
    q = torch.tensor([[0.001]], dtype=F64)
    k = torch.tensor([[300.0], [-300.0]], dtype=F64)
    v = torch.tensor([[1.0], [0.5]], dtype=F64)
    eb = attention_error_bound("taylor", q, k, v, Precision("fp16", "fp16", "fp32"), degree=2)
    assert bool(eb.unbounded["features in fp16"].all()) and bool(torch.isinf(eb.total).all())
    # the query side: X = 400, X^2 = 1.6e5
    q, k = torch.tensor([[400.0]], dtype=F64), torch.tensor([[0.001], [-0.002]], dtype=F64)
    eb = attention_error_bound("taylor", q, k, v, Precision("fp16", "fp16", "fp32"), degree=2)
    assert bool(eb.unbounded["features in fp16"].all())
