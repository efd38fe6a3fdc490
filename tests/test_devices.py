"""The public API on a CUDA device: every result meets the same documented guarantee there.

Every function builds its temporaries (masks, index tables, projections, constant tables)
on the device of its inputs. The checks are the CPU tests' own, applied to outputs
computed on CUDA: attention methods within their rounding bound of the certified reference
(tests/attention/test_reference.py ``check``), lognum reductions within
``signed_sum_error_bound`` of the exact sums, elementwise functions within their ulp
limits, ``linear_recurrence`` within its bound of the exact loop; ``reference`` and
``attention_error_bound`` return their results on the inputs' device, equal to the CPU's.
Without a GPU these tests are skipped (CI has none); they run on a GPU machine with
``pytest tests/test_devices.py`` (docs/kernels.md, "On a GPU").
"""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
from lognum_ref import PREC, ULP_LIMIT, ref_log1mexp, ref_log1pexp, ulp_error
from test_recurrence import check_exact
from test_reductions import _check_sum
from test_reference import check

from attnprec import lognum as L
from attnprec.analysis import Precision, reference
from attnprec.analysis.bounds import attention_error_bound
from attnprec.attention import MixtureLSE, Tropical, favor_projection
from attnprec.testing.strategies import AttentionCase

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
F64 = torch.float64


def _case(method: str, params: dict) -> AttentionCase:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 24, 4, generator=g, dtype=F64) for _ in range(3))
    return AttentionCase(method=method, family="typical", q=q, k=k, v=v, params=params)


CASES = {
    "softmax": ("softmax", {"causal": True}),
    "log": ("log", {"causal": True}),
    "taylor": ("taylor", {"degree": 2, "causal": True}),
    "polynomial": ("polynomial", {"coeffs": [1.0, 1.0, 0.5]}),
    "linear": ("linear", {"causal": True}),
    "favor": ("favor", {"projection": favor_projection(8, 4, generator=torch.Generator())}),
    "semiring": ("semiring", {"semiring": MixtureLSE((1.0, 2.0), (1.0, 0.5)), "causal": True}),
    "tropical": ("semiring", {"semiring": Tropical()}),
    "gated": ("gated", {"log_g": -torch.rand(2, 24, 4, dtype=F64), "causal": True}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_attention_on_cuda(name):
    check(_case(*CASES[name]), 2.0**-53, device="cuda")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_lognum_on_cuda(dtype):
    g = torch.Generator().manual_seed(1)
    ls = (3 * torch.randn(24, generator=g, dtype=F64)).to(dtype).tolist()
    ss = [1 if x > 0 else -1 for x in torch.randn(24, generator=g).tolist()]
    logs = torch.tensor(ls, dtype=dtype, device="cuda")
    signs = torch.tensor(ss, dtype=torch.int8, device="cuda")
    x = L.SignedLog(logs, signs)
    n = len(ls)
    s = x.sum()
    _check_sum(s.log.item(), s.sign.item(), ls, ss, dtype, n)
    lse, sign = L.logsumexp(logs, 0, b=signs.to(dtype), return_sign=True)
    _check_sum(lse.item(), int(sign.item()), ls, ss, dtype, n)
    # the sum as a [1, n] @ [n, 1] product with unit factors: terms a + 0 (log error u|a|)
    ones = L.SignedLog(torch.zeros(n, 1, dtype=dtype, device="cuda"))
    prod = L.SignedLog(logs[None], signs[None]) @ ones
    eps = 2.0**-53 * max(abs(v) for v in ls)
    _check_sum(prod.log.item(), prod.sign.item(), ls, ss, dtype, n, term_log_error=eps)
    c = x.cumsum(0)
    lc, sc = L.logcumsumexp(logs, 0, b=signs.to(dtype), return_sign=True)
    with mpmath.workprec(PREC):
        run, abs_run = mpmath.mpf(0), mpmath.mpf(0)
        for t in range(n):
            term = ss[t] * mpmath.exp(mpmath.mpf(ls[t]))
            run, abs_run = run + term, abs_run + abs(term)
            _check_sum(c.log[t].item(), c.sign[t].item(), None, None, dtype, t + 1,
                       (run, abs_run))  # fmt: skip
            _check_sum(lc[t].item(), int(sc[t].item()), None, None, dtype, t + 1,
                       (run, abs_run))  # fmt: skip
    neg = [-abs(v) - 0.01 for v in ls]
    for fn, ref, vals in ((L.log1mexp, ref_log1mexp, neg), (L.log1pexp, ref_log1pexp, ls)):
        got = fn(torch.tensor(vals, dtype=dtype, device="cuda"))
        assert got.device.type == "cuda"
        for v, y in zip(vals, got.tolist(), strict=True):
            assert ulp_error(y, ref(v), dtype) <= ULP_LIMIT[dtype]
    a = [math.tanh(v) for v in ls]
    b = [s * v for s, v in zip(ss, ls, strict=True)]
    got = L.linear_recurrence(torch.tensor(a, dtype=dtype, device="cuda"),
                              torch.tensor(b, dtype=dtype, device="cuda"))  # fmt: skip
    check_exact(got.cpu(), [float(torch.tensor(v, dtype=dtype)) for v in a],
                [float(torch.tensor(v, dtype=dtype)) for v in b], 0.0, dtype)  # fmt: skip


def test_reference_and_bounds_on_cuda():
    """Both are computed on the CPU for inputs on any device: identical results, returned
    on the inputs' device."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(16, 4, generator=g).half() for _ in range(3))
    prec = Precision(storage="fp16", compute="fp32", accumulate="fp32")
    for method, params in (("softmax", {}), ("log", {}), ("taylor", {"degree": 2})):
        ref = reference(method, q, k, v, causal=True, **params)
        got = reference(method, q.cuda(), k.cuda(), v.cuda(), causal=True, **params)
        assert got.value.device.type == "cuda" and got.radius.device.type == "cuda"
        assert torch.equal(got.value.cpu(), ref.value) and torch.equal(got.radius.cpu(), ref.radius)
        eb = attention_error_bound(method, q, k, v, prec, causal=True, **params)
        eg = attention_error_bound(method, q.cuda(), k.cuda(), v.cuda(), prec, causal=True,
                                   **params)  # fmt: skip
        assert eg.total.device.type == "cuda" and torch.equal(eg.total.cpu(), eb.total)
