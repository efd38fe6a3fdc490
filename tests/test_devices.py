"""The public API on a CUDA device: results on the inputs' device, equal to the CPU results.

Every function builds its temporaries (masks, index tables, projections, constant tables)
on the device of its inputs. Without a GPU these tests are skipped (CI has none); they run
on a GPU machine with ``pytest tests/test_devices.py`` (docs/kernels.md, "On a GPU").
"""

from __future__ import annotations

import pytest
import torch

from attnprec import attention as A
from attnprec import lognum as L
from attnprec.analysis import Precision, reference
from attnprec.analysis.bounds import attention_error_bound

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _inputs(dtype=torch.float64, n=24, d=4):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, n, d, generator=g, dtype=dtype) for _ in range(3))


def _same(out_gpu, out_cpu, rtol=1e-9):
    if isinstance(out_cpu, (tuple, list)):
        for a, b in zip(out_gpu, out_cpu, strict=True):
            _same(a, b, rtol)
        return
    if isinstance(out_cpu, L.SignedLog):
        _same((out_gpu.log, out_gpu.sign), (out_cpu.log, out_cpu.sign), rtol)
        return
    assert out_gpu.device.type == "cuda"
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=rtol, atol=1e-12, equal_nan=True)


def _methods():
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    return {
        "softmax": lambda q, k, v: A.softmax_attention(q, k, v, causal=True),
        "log": lambda q, k, v: A.log_attention(q, k, v, causal=True, chunk_size=8),
        "taylor": lambda q, k, v: A.taylor_attention(q, k, v, degree=2, causal=True),
        "polynomial": lambda q, k, v: A.polynomial_attention(q, k, v, [1.0, 1.0, 0.5]),
        "linear": lambda q, k, v: A.linear_attention(q, k, v, causal=True),
        "favor": lambda q, k, v: A.favor_attention(q, k, v, num_features=8, generator=g()),
        "semiring": lambda q, k, v: A.semiring_attention(
            q, k, v, semiring=A.MixtureLSE((1.0, 2.0), (1.0, 0.5)), causal=True
        ),
        "semiring_rf": lambda q, k, v: A.semiring_attention(
            q, k, v, semiring=A.LogExpMean(1.0), linearize=("favor", 8), generator=g()
        ),
        "semiring_taylor": lambda q, k, v: A.semiring_attention(
            q, k, v, semiring=A.SoftMaxPlus(2.0), linearize=("taylor", 3), causal=True
        ),
        "tropical": lambda q, k, v: A.semiring_attention(q, k, v, semiring=A.Tropical()),
        "gated": lambda q, k, v: A.gated_linear_attention(q, k, v, -torch.rand_like(k)),
    }


@pytest.mark.parametrize("name", sorted(_methods()))
def test_attention_on_cuda(name):
    fn = _methods()[name]
    if name == "gated":  # the gates must be the same numbers on both devices
        q, k, v = _inputs()
        lg = -torch.rand_like(k)
        fn = lambda q, k, v: A.gated_linear_attention(q, k, v, lg.to(q.device))  # noqa: E731
    cpu = fn(*_inputs())
    _same(fn(*(x.cuda() for x in _inputs())), cpu)


def test_lognum_on_cuda():
    a, b, _ = _inputs()
    w = torch.where(b > 0, 1.0, -1.0)
    for dtype, rtol in ((torch.float64, 0.0), (torch.float32, 1e-6)):
        x, s = a.to(dtype), w.to(dtype)
        for fn in (
            lambda x, s: L.logsumexp(x, -1, b=s, return_sign=True),
            lambda x, s: L.logcumsumexp(x, -2, b=s, return_sign=True),
            lambda x, s: L.log_matmul_exp(x, x.transpose(-1, -2), s, s.transpose(-1, -2), True),
            lambda x, s: L.SignedLog(x, s).sum(-1) + 1.0,
            lambda x, s: L.SignedLog(x, s).cumsum(-2),
            lambda x, s: L.SignedLog(x, s) @ L.SignedLog(x, s).transpose(-1, -2),
            lambda x, s: L.linear_recurrence(torch.tanh(x), s * x, dim=-2),
            lambda x, s: (L.log1mexp(-x.abs()), L.log1pexp(x), L.logsubexp(x.abs(), -x.abs())),
        ):
            _same(fn(x.cuda(), s.cuda()), fn(x, s), rtol)


def test_reference_and_bounds_on_cuda():
    q, k, v = _inputs(torch.float16, n=16)
    prec = Precision(storage="fp16", compute="fp32", accumulate="fp32")
    for method, params in (("softmax", {}), ("log", {}), ("taylor", {"degree": 2})):
        ref = reference(method, q, k, v, causal=True, **params)
        got = reference(method, q.cuda(), k.cuda(), v.cuda(), causal=True, **params)
        assert torch.equal(got.value.cpu(), ref.value)
        eb = attention_error_bound(method, q, k, v, prec, causal=True, **params)
        eg = attention_error_bound(method, q.cuda(), k.cuda(), v.cuda(), prec, causal=True,
                                   **params)  # fmt: skip
        _same(eg.total, eb.total)
