"""Shared checks of the kernel tests: certified error vs composed bound, PyTorch baselines.

The "PyTorch in the low dtype" baselines are what a user's plain PyTorch computes when
given float16/bfloat16 tensors: every operation below runs in that dtype (PyTorch's CPU
kernels may accumulate matmuls and reductions internally in float32; that is part of
"what plain PyTorch does").
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from attnprec import kernels as K
from attnprec.analysis.bounds.graphs import rounding_bound
from attnprec.analysis.reference import reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOW_DTYPES = (torch.float16, torch.bfloat16)
#: Families drawn from attnprec.testing.inputs (all but "real", drawn separately).
SYNTHETIC = ("typical", "outliers", "sinks", "ties", "cancel")

KERNELS = {
    "log": K.log_attention,
    "taylor": K.taylor_attention,
    "polynomial": K.polynomial_attention,
    "linear": K.linear_attention,
}
BLOCKS = {"log": K.log.BLOCK}


def elu1(x: torch.Tensor) -> torch.Tensor:
    """The elu+1 feature map, in float32, rounded to x's dtype (features as stored)."""
    return (torch.nn.functional.elu(x.float()) + 1.0).to(x.dtype)


def run_kernel(method: str, q, k, v, causal: bool, params: dict) -> torch.Tensor:
    if method == "linear":
        return K.linear_attention(elu1(q), elu1(k), v, causal=causal)
    return KERNELS[method](q, k, v, causal=causal, **params)


def certified(method: str, q, k, v, causal: bool, params: dict):
    """(reference, bound) for the kernel's graph on these stored inputs."""
    prec = K.precision_for(q.dtype, K.interpreted())
    if method == "linear":
        fq, fk = elu1(q), elu1(k)
        ref = reference("linear", fq, fk, v, causal=causal, feature_map=lambda x: x)
        return ref, rounding_bound("linear", fq, fk, v, prec, causal=causal)
    ref = reference(method, q, k, v, causal=causal, **params)
    bound = rounding_bound(method, q, k, v, prec, causal=causal, block=BLOCKS.get(method), **params)
    return ref, bound


def assert_within_bound(y: torch.Tensor, ref, bound: torch.Tensor) -> float:
    """|y - exact| <= bound elementwise, checked as |y - value| <= bound + radius.

    Returns the largest ratio |y - value| / (bound + radius) over finite bounds.
    """
    err = (y.double() - ref.value).abs()
    lim = bound + ref.radius
    bad = ~(err <= lim) & ~torch.isinf(lim)
    assert not bool(bad.any()), (
        f"bound violated at {bad.nonzero()[:5].tolist()}: error {err[bad][:5].tolist()} "
        f"> bound {lim[bad][:5].tolist()}"
    )
    fin = torch.isfinite(lim) & (lim > 0)
    return float((err[fin] / lim[fin]).max()) if bool(fin.any()) else 0.0


def torch_baseline(method: str, q, k, v, causal: bool, params: dict) -> torch.Tensor:
    """The method as plain PyTorch computes it in q's dtype (see the module docstring)."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    mask = torch.ones(n_q, n_k, dtype=torch.bool).tril() if causal else None
    if method == "log":
        # Heinsen's published form: log-space over [n, d_k, d_v], v split by sign.
        s = params.get("scale", 1.0)
        lq, lk = q * s, k * s
        vp, vn = v.clamp(min=0), (-v).clamp(min=0)
        lvp, lvn = vp.log(), vn.log()
        ones = torch.zeros_like(v[..., :1])
        outs = []
        for lv in (lvp, lvn, ones):
            x = lk.unsqueeze(-1) + lv.unsqueeze(-2)  # [.., n_k, d_k, d_v]
            acc = torch.logcumsumexp(x, -3) if causal else torch.logsumexp(x, -3, keepdim=True)
            acc = acc.expand(*x.shape[:-3], n_q, *x.shape[-2:]) if not causal else acc
            outs.append(torch.logsumexp(lq.unsqueeze(-1) + acc, -2))  # [.., n_q, d_v]
        lp, ln, lz = outs
        return torch.exp(lp - lz) - torch.exp(ln - lz)
    if method == "linear":
        q, k = elu1(q), elu1(k)
        w = q @ k.transpose(-1, -2)
    else:
        coeffs = (
            [1.0 / math.factorial(p) for p in range(params["degree"] + 1)]
            if method == "taylor"
            else list(params["coeffs"])
        )
        sc = params.get("scale") or 1.0 / math.sqrt(q.shape[-1])
        s = (q @ k.transpose(-1, -2)) * sc
        w = torch.full_like(s, coeffs[-1])
        for c in reversed(coeffs[:-1]):
            w = w * s + c
    if mask is not None:
        w = w.masked_fill(~mask, 0)
    return (w @ v) / w.sum(-1, keepdim=True)


def exact_recurrence(a: torch.Tensor, b: torch.Tensor, x0: torch.Tensor | None) -> torch.Tensor:
    """x_t = a_t x_{t-1} + b_t in exact rational arithmetic (time along the last dim),
    rounded once to float64 (|exact - value| <= 2^-53 |exact|, or exact for 0)."""
    n = a.shape[-1]
    rows_a = a.double().reshape(-1, n).tolist()
    rows_b = b.double().reshape(-1, n).tolist()
    start = [0.0] * len(rows_a) if x0 is None else x0.double().reshape(-1).tolist()
    out = []
    for ra, rb, x in zip(rows_a, rows_b, start, strict=True):
        xf = Fraction(x)
        row = []
        for at, bt in zip(ra, rb, strict=True):
            xf = Fraction(at) * xf + Fraction(bt)
            row.append(float(xf))
        out.append(row)
    return torch.tensor(out, dtype=torch.float64).reshape(a.shape)


def draw_inputs(data, method: str, dtype=None, max_n: int = 64, max_d: int = 16):
    """Draw (q, k, v, causal, params, family) with Hypothesis ``data`` from make_inputs."""
    from hypothesis import strategies as st

    from attnprec.testing.inputs import make_inputs

    family = data.draw(st.sampled_from(SYNTHETIC), label="family")
    dtype = dtype or data.draw(st.sampled_from(DTYPES), label="dtype")
    causal = data.draw(st.booleans(), label="causal")
    n_q = data.draw(st.integers(1, max_n), label="n_q")
    n_k = n_q if causal else data.draw(st.integers(1, max_n), label="n_k")
    d_k = data.draw(st.integers(1, max_d), label="d_k")
    d_v = data.draw(st.integers(1, 8), label="d_v")
    batch = data.draw(st.sampled_from([(), (2,)]), label="batch")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    g = torch.Generator().manual_seed(seed)
    q, k, v = make_inputs(
        family, n_q=n_q, n_k=n_k, d_k=d_k, d_v=d_v, batch=batch, dtype=dtype, generator=g
    )
    params: dict = {}
    if method == "taylor":
        params["degree"] = data.draw(st.integers(0, 4 if d_k <= 4 else 2), label="degree")
    elif method == "polynomial":
        deg = data.draw(st.integers(0, 3 if d_k <= 6 else 2), label="degree")
        cs = st.floats(-2.0, 2.0, allow_nan=False, width=32)
        params["coeffs"] = [1.0] + [data.draw(cs, label=f"c{p}") for p in range(1, deg + 1)]
    return q, k, v, causal, params, family
