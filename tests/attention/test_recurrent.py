"""The recurrent forms: one token per call carrying the state equals the parallel causal form.

Over 2048 tokens, for every linearizable method: token by token, the default chunked form,
and uneven pieces carrying the state all lie within the method's rounding bound of the exact
output, so they differ by at most the sum of two bounds (the recurrence's and the other's).
"""

from __future__ import annotations

import math

import _attn_bounds as B
import pytest
import torch

from attnprec.attention import (
    FeatureState,
    GatedState,
    LogState,
    MixtureLSE,
    favor_attention,
    favor_projection,
    gated_linear_attention,
    linear_attention,
    log_attention,
    polynomial_attention,
    semiring_attention,
    taylor_attention,
)
from attnprec.attention._common import DEFAULT_CHUNK
from attnprec.attention.taylor import taylor_coeffs
from attnprec.testing.inputs import make_inputs

N = 2048
D = 3
SCALE = 1 / math.sqrt(D)
SEMI = MixtureLSE((0.5, 0.5), (0.5, 1.0))
W = favor_projection(8, D, generator=torch.Generator().manual_seed(11))
LOG_G = -2.0 * torch.rand(2, N, generator=torch.Generator().manual_seed(12), dtype=torch.float64)


def _semi_coeffs(p):
    return tuple(sum(c * lam**i for c, lam in SEMI.terms) / math.factorial(i) for i in range(p + 1))


# name -> (call(q, k, v, **state kwargs), bound(q, k, v, chunk) against the exact output)
METHODS = {
    "taylor": (
        lambda q, k, v, **kw: taylor_attention(q, k, v, degree=2, causal=True, **kw),
        lambda q, k, v, c: B.polynomial_bound_long(
            q, k, v, taylor_coeffs(2), causal=True, scale=SCALE, u=B.U64
        ),
    ),
    "polynomial": (
        lambda q, k, v, **kw: polynomial_attention(q, k, v, (1.0, 0.5, 0.5), causal=True, **kw),
        lambda q, k, v, c: B.polynomial_bound_long(
            q, k, v, (1.0, 0.5, 0.5), causal=True, scale=SCALE, u=B.U64
        ),
    ),
    "linear": (
        lambda q, k, v, **kw: linear_attention(q, k, v, causal=True, **kw),
        lambda q, k, v, c: B.linear_elu1_bound(
            q, k, v, B.visible_vmax(v, N, True), causal=True, u=B.U64
        ),
    ),
    "favor": (
        lambda q, k, v, **kw: favor_attention(q, k, v, projection=W, causal=True, **kw),
        lambda q, k, v, c: B.favor_bound(
            q, k, v, B.visible_vmax(v, N, True), W, causal=True, scale=SCALE, u=B.U64, chunk=c
        ),
    ),
    "semiring-taylor": (
        lambda q, k, v, **kw: semiring_attention(
            q, k, v, semiring=SEMI, linearize=("taylor", 2), causal=True, **kw
        ),
        lambda q, k, v, c: B.polynomial_bound_long(
            q, k, v, _semi_coeffs(2), causal=True, scale=SCALE, u=B.U64
        ),
    ),
    "semiring-favor": (
        lambda q, k, v, **kw: semiring_attention(
            q, k, v, semiring=SEMI, linearize=("favor", 8), projection=W, causal=True, **kw
        ),
        lambda q, k, v, c: B.favor_bound(
            q,
            k,
            v,
            B.visible_vmax(v, N, True),
            W,
            causal=True,
            scale=SCALE,
            u=B.U64,
            chunk=c,
            terms=SEMI.terms,
        ),
    ),
    "gated": (
        lambda q, k, v, **kw: gated_linear_attention(q, k, v, _gates(q), **kw),
        lambda q, k, v, c: B.gated_bound(q, k, v, _gates(q), scale=SCALE, u=B.U64, chunk=c),
    ),
    "log": (
        lambda q, k, v, **kw: log_attention(q, k, v, causal=True, **kw),
        lambda q, k, v, c: B.log_bound(q, k, v, causal=True, scale=1.0, chunk=c)[0],
    ),
}


# Methods whose bound depends on the chunking (state rescalings, chained sums, decays).
CHUNK_DEPENDENT = {"favor", "semiring-favor", "gated", "log"}


def _gates(q):
    """Per-step log-gates aligned with the slice of tokens ``q`` covers (set by _slice)."""
    return LOG_G[..., _SLICE[0]][..., : q.shape[-2]]


_SLICE = [slice(0, N)]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread while stepping token by token: on tiny tensors the thread
    wake-ups of some reductions cost milliseconds per call (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _call(fn, q, k, v, t0, t1, state):
    _SLICE[0] = slice(t0, t1)
    sl = slice(t0, t1)
    return fn(q[..., sl, :], k[..., sl, :], v[..., sl, :], state=state, return_state=True)


@pytest.mark.parametrize("name", list(METHODS))
def test_recurrent_equals_parallel(name):
    fn, bound = METHODS[name]
    g = torch.Generator().manual_seed(1)
    batch = () if name == "log" else (2,)
    q, k, v = make_inputs("typical", n_q=N, d_k=D, d_v=2, batch=batch, generator=g)
    _SLICE[0] = slice(0, N)
    par = fn(q, k, v)
    outs, st = [], None
    for t in range(N):
        y, st = _call(fn, q, k, v, t, t + 1, st)
        outs.append(y)
    rec = torch.cat(outs, dim=-2)
    assert isinstance(st, (FeatureState, GatedState, LogState))
    pieces, st = [], None
    for t0, t1 in ((0, 700), (700, 701), (701, 1500), (1500, N)):
        y, st = _call(fn, q, k, v, t0, t1, st)
        pieces.append(y)
    split = torch.cat(pieces, dim=-2)
    _SLICE[0] = slice(0, N)
    b_rec = bound(q, k, v, 1)  # one token per call: the most chunks, the largest bound
    b_par = bound(q, k, v, DEFAULT_CHUNK) if name in CHUNK_DEPENDENT else b_rec
    assert torch.isfinite(b_rec).all() and torch.isfinite(b_par).all()
    tol = B.upper(b_rec + b_par, 2)
    assert bool(((rec - par).abs() <= tol).all()), float(((rec - par).abs() / tol).max())
    assert bool(((split - par).abs() <= tol).all()), float(((split - par).abs() / tol).max())
    # The bounds are informative: far below the size of the outputs.
    assert float(tol.max()) < 1e-6 * float(v.abs().max())
