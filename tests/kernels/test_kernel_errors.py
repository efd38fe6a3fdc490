"""Bad input to the kernels: clear errors naming the argument; non-contiguous is copied."""

from __future__ import annotations

import pytest
import torch

from attnprec import kernels as K
from attnprec.kernels import taylor


def qkv(dtype=torch.float32, n=5, d=4):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(n, d, generator=g).to(dtype) for _ in range(3))


ATTENTION = [K.log_attention, K.taylor_attention, K.linear_attention]


@pytest.mark.parametrize("fn", ATTENTION)
def test_unsupported_dtype(fn):
    q, k, v = qkv(torch.float64)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        fn(q, k, v)
    q, k, v = qkv()
    with pytest.raises(TypeError, match="^v: "):
        fn(q, k, v.to(torch.int32))


@pytest.mark.parametrize("fn", ATTENTION)
def test_mismatched_shapes(fn):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="^(k|phi_k): expected d_k=4"):
        fn(q, k[:, :3], v)
    with pytest.raises(ValueError, match="^v: expected n_k=5"):
        fn(q, k, v[:4])
    with pytest.raises(ValueError, match="^causal: requires n_q == n_k"):
        fn(q[:3], k, v, causal=True)
    with pytest.raises(TypeError, match="one dtype"):
        fn(q, k.half(), v)


@pytest.mark.parametrize("fn", ATTENTION)
def test_wrong_device(fn):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="^(q|phi_q): .*device meta"):
        fn(q.to("meta"), k, v)


def test_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = qkv()
    with pytest.raises(ValueError, match="^q: kernels need a CUDA tensor"):
        K.log_attention(q, k, v)
    with pytest.raises(ValueError, match="^a: kernels need a CUDA tensor"):
        K.linear_recurrence(q, k)


@pytest.mark.parametrize("fn", ATTENTION)
def test_non_contiguous_is_copied(fn):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(4, 9, generator=g).t() for _ in range(3))  # [9, 4], strided
    assert not q.is_contiguous()
    y = fn(q, k, v, causal=True)
    assert torch.equal(y, fn(q.contiguous(), k.contiguous(), v.contiguous(), causal=True))


def test_state_too_large_names_the_size():
    q, k, v = qkv(d=64)
    with pytest.raises(ValueError, match=r"^degree: .*d_k=64 need m=\d+ features"):
        K.taylor_attention(q, k, v, degree=4)
    assert taylor.MAX_STATE == 2**24


def test_constants_overflowing_float32():
    """A scale or coefficients whose float32 form (the kernel's scalar, or the query weights
    ``c_p scale^p p!/alpha!``) is inf raise, naming it, as the bound does (a review: an
    all-NaN output)."""
    q, k, v = qkv()
    with pytest.raises(ValueError, match="^scale: 1e[+]39 overflows the compute format fp32"):
        K.log_attention(q, k, v, scale=1e39)
    with pytest.raises(ValueError, match="^scale: .*overflows the compute format fp32"):
        K.decode_step("log", q[:1], k[:1], v[:1], scale=1e39)
    with pytest.raises(ValueError, match="^scale: .*power 2 .*overflows the compute format fp32"):
        K.taylor_attention(q, k, v, degree=2, scale=1e20)
    with pytest.raises(ValueError, match="^scale: .*overflows the compute format fp32"):
        K.taylor_attention(q, k, v, degree=2, scale=1e200)  # past float64 too
    with pytest.raises(ValueError, match="^coeffs: .*overflows the compute format fp32"):
        K.polynomial_attention(q, k, v, (1.0, 0.0, 1e39))


def test_linear_errors_name_the_features():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="^phi_q, phi_k, v: expected one dtype"):
        K.linear_attention(q, k.half(), v)


def test_degree_and_coeffs():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="^degree: "):
        K.taylor_attention(q, k, v, degree=-1)
    with pytest.raises(TypeError, match="^degree: "):
        K.taylor_attention(q, k, v, degree=2.5)
    with pytest.raises(ValueError, match="^coeffs: "):
        K.polynomial_attention(q, k, v, [0.0, 0.0])
    with pytest.raises(ValueError, match="^coeffs: "):
        K.polynomial_attention(q, k, v, [1.0, float("nan")])


def test_state_misuse():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="^state: .*causal=True"):
        K.log_attention(q, k, v, return_state=True)
    _, st = K.log_attention(q, k, v, causal=True, return_state=True)
    with pytest.raises(ValueError, match="^state: comes from a 'log' kernel"):
        K.taylor_attention(q, k, v, causal=True, state=st)
    with pytest.raises(ValueError, match="^state: made for"):
        K.log_attention(q[:, :3], k[:, :3], v, causal=True, state=st)
    with pytest.raises(TypeError, match="^state: expected a KernelState"):
        K.log_attention(q, k, v, causal=True, state=(1, 2))


def test_recurrence_errors():
    a, b, _ = qkv()
    with pytest.raises(ValueError, match="^b: expected the shape of a"):
        K.linear_recurrence(a, b[:3])
    with pytest.raises(TypeError, match="^b: expected the dtype of a"):
        K.linear_recurrence(a, b.half())
    with pytest.raises(ValueError, match="^x0: expected shape"):
        K.linear_recurrence(a, b, torch.zeros(3))
    with pytest.raises(ValueError, match="^dim: "):
        K.linear_recurrence(a, b, dim=2)
    with pytest.raises(TypeError, match="^a: "):
        K.linear_recurrence(a.double(), b.double())


def test_precision_for():
    from attnprec.analysis.precision import Format

    for dt in (torch.float16, torch.bfloat16, torch.float32):
        for interp in (False, True):
            p = K.precision_for(dt, interp)
            assert p.storage == Format.of(dt) and p.compute == Format.of("fp32")
            assert p.accumulate == Format.of("fp32") and p.rounding == "rne"
    with pytest.raises(TypeError, match="^dtype: "):
        K.precision_for(torch.float64, True)


@pytest.mark.parametrize("fn", [K.taylor_attention, K.linear_attention])
def test_nan_reaches_only_dependent_outputs(fn):
    """A NaN value reaches its column of the later queries, a NaN key every column of
    them, as the exact method (and the bound's NaN model). The masked block product
    ``0 * NaN`` used to reach the earlier queries of the chunk too (rows 32-34 here),
    where the bound was finite (a review's find)."""
    q, k, v = qkv(n=40)
    q, k = q.abs(), k.abs()
    v[35, 1] = float("nan")
    k[37, 2] = float("nan")
    expect = torch.zeros(40, 4, dtype=torch.bool)
    expect[35:, 1] = expect[37:] = True
    assert torch.equal(torch.isnan(fn(q, k, v, causal=True)), expect)


@pytest.mark.parametrize(("n", "iv", "ik", "iq"), [(40, 35, 37, 3), (1100, 300, 400, 700)])
def test_log_nan_reaches_only_dependent_outputs(n, iv, ik, iq):
    """Log kernel: a NaN value reaches its column of the queries that see it, a NaN key
    every column of those queries, a NaN query its own row; nothing else (as the exact
    method and attention/log.py). n = 1100 runs the prefill in 4 parallel segments and a
    tail: a NaN stays out of the segments before it."""
    from attnprec.kernels._common import segments

    segs = segments(1, n, K.log.BLOCK, K.log.MAX_SEGMENTS * 4 * 6, K.log.MAX_SEGMENTS)
    assert segs == (1 if n == 40 else 4)
    q, k, v = qkv(n=n)
    v[iv, 1] = float("nan")
    k[ik, 2] = float("nan")
    q[iq, 0] = float("nan")
    expect = torch.zeros(n, 4, dtype=torch.bool)
    expect[iv:, 1] = expect[ik:] = expect[iq] = True
    assert torch.equal(torch.isnan(K.log_attention(q, k, v, causal=True)), expect)
    if n != 40:
        return
    # non-causal: every query sees every value
    k[37, 2] = 0.0
    y = K.log_attention(q, k, v, causal=False)
    assert torch.isnan(y[:, 1]).all() and torch.isnan(y[3]).all()
    assert not torch.isnan(y[torch.arange(40) != 3][:, [0, 2, 3]]).any()


def test_linear_kernel_takes_given_features_only():
    x = torch.rand(4, 3) + 0.5
    y = K.linear_attention(x, x, x, feature_map=None)  # the shared "given features" keyword
    assert y.shape == (4, 3)
    with pytest.raises(ValueError, match="feature_map"):
        K.linear_attention(x, x, x, feature_map="elu1")  # type: ignore[arg-type]


@pytest.mark.parametrize("fn", ATTENTION)
@pytest.mark.parametrize("causal", [False, True])
def test_empty_inputs(fn, causal):
    # As the methods: empty queries, values or batches give empty outputs; queries without
    # keys, or no features, are errors naming k (phi_k) or q (phi_q).
    q, k, v = (x.abs() + 0.5 for x in qkv())
    assert fn(q[:0], k[:0] if causal else k, v[:0] if causal else v, causal=causal).shape == (
        0,
        4,
    )
    assert fn(q, k, v[:, :0], causal=causal).shape == (5, 0)
    assert fn(q.expand(0, 5, 4), k, v, causal=causal).shape == (0, 5, 4)
    if not causal:
        with pytest.raises(ValueError, match="^(k|phi_k): expected at least one key"):
            fn(q, k[:0], v[:0])
    with pytest.raises(ValueError, match=r"^(q|phi_q): expected d_k >= 1"):
        fn(q[:, :0], k[:, :0], v, causal=causal)
