"""The public API on a CUDA device: every result meets the same documented guarantee there.

Every function builds its temporaries (masks, index tables, projections, constant tables)
on the device of its inputs. The checks are the CPU tests' own, applied to outputs
computed on CUDA: attention methods within their rounding bound of the certified reference
(tests/attention/test_reference.py ``check``), lognum reductions within
``signed_sum_error_bound`` of the exact sums, elementwise functions within their ulp
limits, ``linear_recurrence`` within its bound of the exact loop, CUDA's float64 exp,
expm1, log and log1p within what the float64 references and the bounds assume of them.
``reference`` and ``attention_error_bound`` computing on the device are checked against
the CPU in tests/test_device_path.py (on a simulated device without a GPU). Without a
GPU these tests are skipped (CI has none); they run on a GPU machine with ``pytest
tests/test_devices.py tests/test_device_path.py`` (docs/kernels.md, "On a GPU").
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
from attnprec.analysis import _reference_float64
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


@pytest.mark.parametrize("fn", ["exp", "expm1", "log", "log1p"])
def test_cuda_float64_functions_meet_the_assumption(fn):
    """The float64 rules assume exp within EXP_ULPS ulps and expm1, log, log1p within the
    margin of a bound's own evaluation (1 ulp each, CUDA's documented accuracy): measured
    on the device as tests/analysis/test_reference.py measures the CPU's exp."""
    g = torch.Generator().manual_seed(5)
    lo, hi = {"exp": (-745.0, 709.0), "expm1": (-40.0, 709.0)}.get(fn, (0.0, 700.0))
    t = torch.cat(
        [
            torch.empty(3000, dtype=F64).uniform_(lo, hi, generator=g),
            torch.empty(3000, dtype=F64).uniform_(-1.0, 1.0, generator=g),
            torch.empty(2000, dtype=F64).uniform_(-1e-8, 1e-8, generator=g),
        ]
    )
    if fn in ("log", "log1p"):  # their domains: x > 0, x > -1; exponents spread for log
        t = t.abs() * 2.0 ** torch.randint(-60, 60, t.shape, generator=g) if fn == "log" else t
        t = t[t > (0.0 if fn == "log" else -1.0)]
    y = getattr(torch, fn)(t.cuda()).cpu()
    ref = {"exp": mpmath.exp, "expm1": mpmath.expm1, "log": mpmath.log, "log1p": mpmath.log1p}
    limit = _reference_float64.EXP_ULPS if fn == "exp" else 1
    worst = 0.0
    with mpmath.workprec(200):
        for ti, yi in zip(t.tolist(), y.tolist(), strict=True):
            ex = ref[fn](mpmath.mpf(ti))
            if abs(ex) < 2.0**-1022:
                assert abs(yi - ex) <= _reference_float64.EXP_TINY
                continue
            worst = max(worst, float(abs(yi - ex) / math.ulp(float(ex))))
    assert worst <= limit, worst
