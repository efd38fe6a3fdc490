"""log, taylor, polynomial and linear kernels against the certified reference + bound.

Every check compares the kernel with ``attnprec.analysis.reference`` (exact, arb balls)
within ``rounding_bound`` of the kernel's declared precision: the inputs are the stored
low-precision values, so no quantization or approximation term enters.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from kernel_checks import (
    BLOCKS,
    DTYPES,
    LOW_DTYPES,
    SYNTHETIC,
    assert_within_bound,
    certified,
    draw_inputs,
    elu1,
    run_kernel,
    torch_baseline,
)

from attnprec import kernels as K
from attnprec.analysis.bounds import attention_error_bound
from attnprec.kernels.log import precision_for
from attnprec.testing.inputs import make_inputs

METHOD_PARAMS = [
    ("log", {}),
    ("taylor", {"degree": 2}),
    ("polynomial", {"coeffs": [1.0, 0.5, 0.25, -0.05]}),
    ("linear", {"feature_map": None}),
]


@pytest.mark.parametrize("method", ["log", "taylor", "polynomial", "linear"])
# Each example runs the Triton interpreter and an arb reference (about 0.3-0.7 s): the
# slowest properties of the suite at the ci profile's 200 examples per method.
@given(data=st.data())
def test_kernel_within_bound(method, data):
    q, k, v, causal, params, _ = draw_inputs(data, method)
    y = run_kernel(method, q, k, v, causal, params)
    assert y.dtype == q.dtype and y.shape == (*q.shape[:-1], v.shape[-1])
    ref, bound = certified(method, q, k, v, causal, params)
    assert_within_bound(y, ref, bound)


@pytest.mark.parametrize("method,params", METHOD_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_families_within_bound(method, params, dtype, causal):
    """Every adversarial family, n across a chunk boundary."""
    g = torch.Generator().manual_seed(7)
    for family in SYNTHETIC:
        q, k, v = make_inputs(family, n_q=37, d_k=6, d_v=5, dtype=dtype, generator=g)
        y = run_kernel(method, q, k, v, causal, params)
        ref, bound = certified(method, q, k, v, causal, params)
        assert_within_bound(y, ref, bound)


@pytest.mark.parametrize("method,params", METHOD_PARAMS)
@pytest.mark.parametrize(
    "family,n,dtype",
    [("real", 128, torch.float16), ("real", 128, torch.bfloat16), ("outliers", 512, torch.float16)],
    ids=str,
)
def test_real_and_long_within_bound(method, params, family, n, dtype):
    """Captured activations (128 tokens is all the capture holds) and n = 512, causal."""
    g = torch.Generator().manual_seed(3)
    q, k, v = make_inputs(family, n_q=n, d_k=8, d_v=4, dtype=dtype, generator=g)
    y = run_kernel(method, q, k, v, True, params)
    ref, bound = certified(method, q, k, v, True, params)
    assert_within_bound(y, ref, bound)


@pytest.mark.parametrize("method,params", METHOD_PARAMS)
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_industry_rule_twice_pytorch(method, params, dtype, causal):
    """Max error <= 2x the max error of plain PyTorch in the same dtype (both vs reference).

    The baseline is ``kernel_checks.torch_baseline``: the quadratic form (taylor,
    polynomial, linear) or Heinsen's published logcumsumexp form over [n, d_k, d_v] (log),
    every operation in the low dtype.
    """
    g = torch.Generator().manual_seed(11)
    for family in SYNTHETIC:
        q, k, v = make_inputs(family, n_q=40, d_k=8, d_v=4, dtype=dtype, generator=g)
        ref, _ = certified(method, q, k, v, causal, params)
        err_k = (run_kernel(method, q, k, v, causal, params).double() - ref.value).abs().max()
        base = torch_baseline(method, q, k, v, causal, params)
        err_t = (base.double() - ref.value).abs().max()
        slack = 3 * ref.radius.max()  # the reference's own certified radius
        assert err_k <= 2 * err_t + slack, (family, float(err_k), float(err_t))


@pytest.mark.parametrize("method,params", METHOD_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decode_equals_prefill(method, params, dtype):
    """Token-by-token decode from a prefill state reproduces the causal prefill outputs.

    The two run different summation orders, so they agree within the sum of their bounds
    (each is within its bound of the same exact output).
    """
    g = torch.Generator().manual_seed(5)
    q, k, v = make_inputs("typical", n_q=21, d_k=4, d_v=3, batch=(2,), dtype=dtype, generator=g)
    if method == "linear":
        from kernel_checks import elu1

        q, k = elu1(q), elu1(k)
        method_k, params_k = "linear", {}
    else:
        method_k, params_k = method, params
    full = run_plain(method_k, q, k, v, params_k)
    n0 = 18
    y0, state = run_plain(method_k, q[..., :n0, :], k[..., :n0, :], v[..., :n0, :], params_k,
                          return_state=True)  # fmt: skip
    steps = [y0]
    for t in range(n0, q.shape[-2]):
        sl = slice(t, t + 1)
        steps.append(run_plain(method_k, q[..., sl, :], k[..., sl, :], v[..., sl, :], params_k,
                               state=state))  # fmt: skip
    dec = torch.cat(steps, -2)
    if method == "linear":
        from attnprec.analysis.bounds.graphs import rounding_bound
        from attnprec.kernels import precision_for

        b = rounding_bound("linear", q, k, v, precision_for(dtype, True), causal=True)
    else:
        _, b = certified(method, q, k, v, True, params)
    assert ((dec.double() - full.double()).abs() <= 2 * b).all()


def run_plain(method, q, k, v, params, **kw):
    from attnprec import kernels as K

    fn = {
        "log": K.log_attention,
        "taylor": K.taylor_attention,
        "polynomial": K.polynomial_attention,
        "linear": K.linear_attention,
    }[method]
    return fn(q, k, v, causal=True, **params, **kw)


@pytest.mark.parametrize("method,params", METHOD_PARAMS)
def test_segmented_prefill(method, params):
    """Long causal prefills of few sequences run in parallel segments (kernels/_common.py
    `segments`; combined by a prefix sum, or for log by rescaled sums of the segment
    states): within the bound, and a carried state continued by a segmented prefill
    agrees with the one-call run within twice the bound."""
    from attnprec.kernels._common import segments

    assert segments(2, 800, 32, 96) == 3 and segments(2, 1100, 32, 96) == 4  # path taken
    g = torch.Generator().manual_seed(13)
    q, k, v = make_inputs("outliers", n_q=1100, d_k=4, d_v=3, batch=(2,), dtype=torch.float32,
                          generator=g)  # fmt: skip
    y = run_kernel(method, q, k, v, True, params)
    ref, bound = certified(method, q, k, v, True, params)
    assert_within_bound(y, ref, bound)
    if method == "linear":
        from kernel_checks import elu1

        q, k, params = elu1(q), elu1(k), {}
    y1, st = run_plain(method, q[:, :300], k[:, :300], v[:, :300], params, return_state=True)
    y2 = run_plain(method, q[:, 300:], k[:, 300:], v[:, 300:], params, state=st)
    assert ((torch.cat([y1, y2], 1).double() - y.double()).abs() <= 2 * bound).all()


@pytest.mark.parametrize("method,params", METHOD_PARAMS)
def test_chunk_boundaries_invisible(method, params):
    """Causal outputs of a prefix equal the first rows of the full run bit for bit, at
    every cut: masked keys add exact zeros (featured kernels) or do not enter at all (the
    log kernel's per-row shift and intra-chunk weights use visible keys only)."""
    g = torch.Generator().manual_seed(9)
    q, k, v = make_inputs("outliers", n_q=70, d_k=4, d_v=3, dtype=torch.float32, generator=g)
    if method == "linear":
        from kernel_checks import elu1

        q, k = elu1(q), elu1(k)
    full = run_plain(method, q, k, v, params)
    for cut in (1, 31, 32, 33, 69):
        part = run_plain(method, q[:cut], k[:cut], v[:cut], params)
        assert torch.equal(part, full[:cut])


def far_below_inputs(dtype):
    """Keys hundreds below a later key of their chunk in every channel, in chunk 0 and in
    chunk 1 after a carried state that is itself far below (the inputs that made the
    chunk-maximum graph return 0/0); and the queries whose visible keys are all such."""
    g = torch.Generator().manual_seed(2)
    n, d_k, blk = 40, 4, BLOCKS["log"]
    q, k, v = (torch.randn(2, n, d, generator=g) for d in (d_k, d_k, 3))
    k[0, 20] = 400.0
    k[1, 36] = 400.0
    k[1, :32] = -200.0 + k[1, :32]  # the state carried into chunk 1 lies far below too
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    sk = k.double()
    rows = torch.arange(n)
    later = (rows[None, :] > rows[:, None]) & (rows[None, :] // blk == rows[:, None] // blk)
    later_max = torch.where(later[..., None], sk[:, None], -math.inf).amax(-2)  # [2, n, d_k]
    seen_max = torch.cummax(sk, -2).values
    return q, k, v, ((later_max - seen_max) > 90).all(-1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_log_causal_keys_far_below_a_later_key(dtype):
    """Every visible key of a query more than 87 below a later key of its chunk, in every
    channel: the kernel's per-row shift M_i only sees visible keys, so the output is
    finite and within a finite bound everywhere."""
    q, k, v, hit = far_below_inputs(dtype)
    assert int(hit[0].sum()) >= 15 and int(hit[1].sum()) >= 4  # the case is exercised
    y = run_kernel("log", q, k, v, True, {})
    ref, bound = certified("log", q, k, v, True, {})
    assert torch.isfinite(y).all() and torch.isfinite(bound).all()
    assert_within_bound(y, ref, bound)


@pytest.mark.parametrize("method,params", METHOD_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_kernel_within_the_state_evaluated_bound(method, params, dtype, causal):
    """The linear-time evaluation of the bounds (``evaluation="state"``: log's per-channel
    states, the feature methods' monomial states) holds for each kernel on every
    adversarial family, under the kernel's own declaration."""
    g = torch.Generator().manual_seed(11)
    prec = precision_for(dtype, K.interpreted())
    worst = worst_t = 0.0
    for family in SYNTHETIC:
        q, k, v = make_inputs(family, n_q=150, d_k=6, d_v=5, dtype=dtype, generator=g)
        y = run_kernel(method, q, k, v, causal, params)
        ref = certified(method, q, k, v, causal, params)[0]
        bparams = params
        if method == "linear":  # the bound takes the features
            q, k = elu1(q), elu1(k)
            bparams = {"feature_map": None}
        bound = attention_error_bound(
            method, q, k, v, prec, causal=causal, evaluation="state", **bparams
        )
        # the stored inputs: no quantization part; the rounding part holds the kernel
        assert bool((bound.quantization == 0).all())
        worst = max(worst, assert_within_bound(y, ref, bound.rounding))
        # and so does the probabilistic level (no element atypical on these families)
        worst_t = max(worst_t, assert_within_bound(y, ref, bound.typical.rounding))
    # the kernel's errors reach the bound's scale: it is not vacuous (in float32 the sound
    # level of the polynomial methods is far above the errors; the probabilistic one is not)
    assert worst_t > 0.05 and (worst > 0.05 or dtype == torch.float32), (worst, worst_t)
