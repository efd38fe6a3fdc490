"""decode_step: batched one-token decode for every kernel, against prefill and the bounds.

A decode step is the causal graph with a one-token chunk, so its outputs lie within
``rounding_bound(..., block=1)`` (``recurrence_rounding_bound(..., block=1)``) of the exact
causal outputs, and within that bound plus the prefill's (``block=BLOCK``) of the prefill.
"""

from __future__ import annotations

import pytest
import torch
from kernel_checks import assert_within_bound, elu1, exact_recurrence

from attnprec import kernels as K
from attnprec.analysis.bounds.graphs import recurrence_rounding_bound, rounding_bound
from attnprec.analysis.reference import reference
from attnprec.kernels import decode as D
from attnprec.kernels.recurrence import BLOCK_T
from attnprec.testing.inputs import make_inputs

ATTN = [("log", {}), ("taylor", {"degree": 2}), ("linear", {})]
PREFILL = {"log": K.log_attention, "taylor": K.taylor_attention, "linear": K.linear_attention}


def attn_inputs(method, nb, n, dtype=torch.float32, seed=0, batch=None):
    g = torch.Generator().manual_seed(seed)
    q, k, v = make_inputs("typical", n_q=n, d_k=4, d_v=3, batch=batch or (nb,), dtype=dtype,
                          generator=g)  # fmt: skip
    if method == "linear":
        q, k = elu1(q), elu1(k)
    return q, k, v


def bounds(method, q, k, v, params, block):
    prec = K.precision_for(q.dtype, K.interpreted())
    return rounding_bound(method, q, k, v, prec, causal=True, block=block, **params)


def decode_all(kind, q, k, v, params):
    """Decode every token of q, k, v [..., n, d] from the empty state, one call per token."""
    st, outs = kind, []
    for t in range(q.shape[-2]):
        sl = slice(t, t + 1)
        y, st = K.decode_step(st, q[..., sl, :], k[..., sl, :], v[..., sl, :],
                              **(params if t == 0 else {}))  # fmt: skip
        outs.append(y)
    return torch.cat(outs, -2), st


def check_attention(method, params, q, k, v, dec):
    """dec within its bound (block 1) of the exact outputs, and of the prefill within both."""
    full = PREFILL[method](q, k, v, causal=True, **params)
    b1 = bounds(method, q, k, v, params, 1)
    b32 = bounds(method, q, k, v, params, K.log.BLOCK)
    assert torch.isfinite(b1).all()
    assert ((dec.double() - full.double()).abs() <= b1 + b32).all()
    fm = {"feature_map": lambda x: x} if method == "linear" else {}
    ref = reference(method, q, k, v, causal=True, **params, **fm)
    assert_within_bound(dec, ref, b1)


@pytest.mark.parametrize("nb", [1, 3, 64])
@pytest.mark.parametrize("method,params", ATTN, ids=[m for m, _ in ATTN])
def test_decode_equals_prefill(method, params, nb):
    """n tokens decoded one call at a time for B x H = nb rows from the empty state."""
    q, k, v = attn_inputs(method, nb, 7, seed=nb)
    dec, st = decode_all(method, q, k, v, params)
    assert dec.shape == (nb, 7, 3) and dec.dtype == q.dtype
    assert st.batch == torch.Size([nb])
    check_attention(method, params, q, k, v, dec)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method,params", ATTN, ids=[m for m, _ in ATTN])
def test_decode_low_precision(method, params, dtype):
    q, k, v = attn_inputs(method, 3, 6, dtype=dtype, seed=1)
    dec, _ = decode_all(method, q, k, v, params)
    assert dec.dtype == dtype
    check_attention(method, params, q, k, v, dec)


@pytest.mark.parametrize("method,params", ATTN, ids=[m for m, _ in ATTN])
def test_decode_continues_prefill(method, params):
    """A prefill across a chunk boundary (33 tokens), then 3 decode steps on its state."""
    q, k, v = attn_inputs(method, 3, 36, seed=2)
    n0 = 33
    y0, st = PREFILL[method](q[:, :n0], k[:, :n0], v[:, :n0], causal=True, return_state=True,
                             **params)  # fmt: skip
    tensors = st.tensors
    outs = [y0]
    for t in range(n0, 36):
        y, st2 = K.decode_step(st, q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1])
        assert st2 is st and all(a is b for a, b in zip(st.tensors, tensors, strict=True))
        outs.append(y)
    full = PREFILL[method](q, k, v, causal=True, **params)
    b = bounds(method, q, k, v, params, 1) + bounds(method, q, k, v, params, K.log.BLOCK)
    assert ((torch.cat(outs, 1).double() - full.double()).abs() <= b).all()
    # and the decoded state continues in the prefill kernel (one more token)
    y_more = PREFILL[method](q[:, :1], k[:, :1], v[:, :1], causal=True, state=st, **params)
    assert torch.isfinite(y_more).all()


@pytest.mark.parametrize("nb", [1, 3, 64])
def test_recurrence_decode_equals_prefill(nb):
    g = torch.Generator().manual_seed(nb)
    n = 9
    a = torch.where(torch.rand(nb, n, generator=g) < 0.5, -1.0, 1.0) * (
        0.8 + 0.2 * torch.rand(nb, n, generator=g))  # fmt: skip
    a[:, 4] = torch.where(torch.rand(nb, generator=g) < 0.3, 0.0, a[:, 4])  # restarts
    b = torch.randn(nb, n, generator=g)
    x0 = torch.randn(nb, generator=g)
    outs = []
    y, st = K.decode_step("recurrence", a[:, 0], b[:, 0], x0=x0)
    outs.append(y)
    for t in range(1, n):
        y, st = K.decode_step(st, a[:, t], b[:, t])
        outs.append(y)
    dec = torch.stack(outs, 1)
    prec = K.precision_for(a.dtype, K.interpreted())
    b1 = recurrence_rounding_bound(a, b, x0, prec, block=1)
    b32 = recurrence_rounding_bound(a, b, x0, prec, block=BLOCK_T)
    exact = exact_recurrence(a, b, x0)
    assert ((dec.double() - exact).abs() <= b1 + 2.0**-52 * exact.abs()).all()
    full = K.linear_recurrence(a, b, x0)
    assert ((dec.double() - full.double()).abs() <= b1 + b32).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_recurrence_decode_low_precision(dtype):
    g = torch.Generator().manual_seed(4)
    a = (0.9 + 0.1 * torch.rand(3, 8, generator=g)).to(dtype)
    b = torch.randn(3, 8, generator=g).to(dtype)
    y, st = K.decode_step("recurrence", a[:, :1], b[:, :1])  # [rows, 1]: a time axis of 1
    assert y.shape == (3, 1) and st.batch == torch.Size([3])
    outs = [y[:, 0]]
    for t in range(1, 8):
        outs.append(K.decode_step(st, a[:, t], b[:, t])[0])
    dec = torch.stack(outs, 1)
    prec = K.precision_for(dtype, K.interpreted())
    b1 = recurrence_rounding_bound(a, b, None, prec, block=1)
    exact = exact_recurrence(a, b, None)
    assert ((dec.double() - exact).abs() <= b1 + 2.0**-52 * exact.abs()).all()


def test_recurrence_state_split_is_bit_identical():
    """Prefill, state, prefill again at a multiple of BLOCK_T: the one-call result bit for
    bit; a decode step from the same state is within its bound."""
    g = torch.Generator().manual_seed(6)
    a = 0.8 + 0.2 * torch.rand(2, 3, 96, generator=g)
    b = torch.randn(2, 3, 96, generator=g)
    x0 = torch.randn(2, 3, generator=g)
    full = K.linear_recurrence(a, b, x0)
    y1, st = K.linear_recurrence(a[..., :64], b[..., :64], x0, return_state=True)
    assert st.kind == "recurrence" and st.batch == torch.Size([2, 3])
    y2 = K.linear_recurrence(a[..., 64:], b[..., 64:], state=st)
    assert torch.equal(torch.cat([y1, y2], -1), full)
    _, st = K.linear_recurrence(a[..., :95], b[..., :95], x0, return_state=True)
    y, _ = K.decode_step(st, a[..., 95], b[..., 95])
    prec = K.precision_for(a.dtype, K.interpreted())
    bd = recurrence_rounding_bound(a, b, x0, prec, block=1)[..., 95]
    exact = exact_recurrence(a, b, x0)[..., 95]
    assert ((y.double() - exact).abs() <= bd + 2.0**-52 * exact.abs()).all()


def test_recurrence_nan_poisons_state():
    a = torch.full((2, 70), 0.5)
    b = torch.ones(2, 70)
    a[0, 40] = float("nan")  # in the second chunk
    a[0, 50] = 0.0  # a restart does not clear it
    y, st = K.linear_recurrence(a, b, return_state=True)
    assert not torch.isnan(y[0, :40]).any() and torch.isnan(y[0, 40:]).all()
    assert not torch.isnan(y[1]).any()
    assert torch.isnan(st.tensors[0][0]) and not torch.isnan(st.tensors[0][1])
    z, _ = K.decode_step(st, torch.zeros(2), torch.ones(2))  # restart: still NaN in row 0
    assert torch.isnan(z[0]) and z[1] == 1.0
    y = K.linear_recurrence(a[:, :3], b[:, :3], torch.tensor([float("nan"), 1.0]))
    assert torch.isnan(y[0]).all() and not torch.isnan(y[1]).any()


def test_shapes_and_in_place():
    """[B, H, 1, d] tokens on a state of batch (B, H), or flattened [B H, d]: one launch,
    the same values; the state's own tensors are updated."""
    q, k, v = attn_inputs("log", 0, 5, batch=(2, 3))
    _, st = K.log_attention(q[..., :4, :], k[..., :4, :], v[..., :4, :], causal=True,
                            return_state=True)  # fmt: skip
    st2 = st.clone()
    before = [t.clone() for t in st.tensors]
    y, same = K.decode_step(st, q[..., 4:, :], k[..., 4:, :], v[..., 4:, :])
    assert same is st and y.shape == (2, 3, 1, 3)
    assert not torch.equal(before[1], st.tensors[1])
    flat = [x[..., 4, :].reshape(6, -1) for x in (q, k, v)]
    y2, _ = K.decode_step(st2, *flat)
    assert y2.shape == (6, 3) and torch.equal(y2, y.reshape(6, 3))
    assert all(torch.equal(a, b) for a, b in zip(st.tensors, st2.tensors, strict=True))
    with pytest.raises(ValueError, match="^q: expected one token per state row"):
        K.decode_step(st, *(x[..., 4:, :].transpose(0, 1) for x in (q, k, v)))
    with pytest.raises(ValueError, match="^q: expected one token per state row"):
        K.decode_step(st, q[..., 3:, :], k[..., 4:, :], v[..., 4:, :])


def test_bad_input():
    q, k, v = attn_inputs("log", 2, 1)
    _, st = K.decode_step("log", q, k, v)
    with pytest.raises(ValueError, match="^kind_or_state: "):
        K.decode_step("softmax", q, k, v)
    with pytest.raises(TypeError, match="^kind_or_state: "):
        K.decode_step(3, q, k, v)
    with pytest.raises(TypeError, match="^tokens: "):
        K.decode_step(st, q, k)
    with pytest.raises(TypeError, match="^k: expected the state's dtype"):
        K.decode_step(st, q, k.half(), v)
    with pytest.raises(ValueError, match="^v: expected last dimension 3"):
        K.decode_step(st, q, k, v[..., :2])
    with pytest.raises(ValueError, match="^degree: not a parameter"):
        K.decode_step("log", q, k, v, degree=2)
    with pytest.raises(ValueError, match="^scale: "):
        K.decode_step(st, q, k, v, scale=0.5)
    K.decode_step(st, q, k, v, scale=1.0)  # the state's own scale is accepted
    with pytest.raises(ValueError, match="^x0: "):
        K.decode_step(st, q, k, v, x0=torch.zeros(2))
    with pytest.raises(ValueError, match="^coeffs: "):
        K.decode_step("polynomial", q, k, v)
    _, sp = K.decode_step("taylor", q, k, v, degree=2)
    K.decode_step(sp, q, k, v, degree=2)
    with pytest.raises(ValueError, match="^degree: "):
        K.decode_step(sp, q, k, v, degree=3)
    with pytest.raises(ValueError, match="^q: .*device meta"):
        K.decode_step(st, q.to("meta"), k, v)


def test_polynomial_matches_taylor_state():
    """A taylor prefill state continues in decode_step, with coefficients or degree."""
    q, k, v = attn_inputs("taylor", 2, 4)
    _, st = K.taylor_attention(q[:, :3], k[:, :3], v[:, :3], causal=True, return_state=True)
    y, _ = K.decode_step(st.clone(), q[:, 3:], k[:, 3:], v[:, 3:], degree=2)
    y2, _ = K.decode_step(st, q[:, 3:], k[:, 3:], v[:, 3:], coeffs=[1.0, 1.0, 0.5])
    assert torch.equal(y, y2)


def test_cuda_graph_flag_is_plain_on_cpu():
    q, k, v = attn_inputs("taylor", 3, 2)
    _, st = K.decode_step("taylor", q[:, :1], k[:, :1], v[:, :1])
    st2 = st.clone()
    y, _ = K.decode_step(st, q[:, 1:], k[:, 1:], v[:, 1:], cuda_graph=True)
    y2, _ = K.decode_step(st2, q[:, 1:], k[:, 1:], v[:, 1:])
    assert torch.equal(y, y2) and "graphs" not in st.cache
    with pytest.raises(ValueError, match="^cuda_graph: "):
        K.decode_graph(st, q[:, 1:], k[:, 1:], v[:, 1:])


class ReplayBackend:
    """Stands in for CUDA capture: runs the warm-up, 'captures' the body, replays it."""

    def __init__(self):
        self.captures = 0

    def capture(self, warm, body):
        warm()
        self.captures += 1
        return body


@pytest.mark.parametrize("method,params", [*ATTN, ("recurrence", {})],
                         ids=[m for m, _ in ATTN] + ["recurrence"])  # fmt: skip
def test_graph_logic(monkeypatch, method, params):
    """The graph path's buffers, warm-up and cache, with the capture replaced by a replay
    of the same launch: the warm-up leaves the state alone, replays equal plain steps bit
    for bit, one capture per shape and dtype."""
    backend = ReplayBackend()
    monkeypatch.setattr(D, "_graph_usable", lambda device: True)
    monkeypatch.setattr(D, "_graph_backend", lambda: backend)
    if method == "recurrence":
        g = torch.Generator().manual_seed(0)
        toks = [(0.9 + 0.1 * torch.rand(4, generator=g), torch.randn(4, generator=g))
                for _ in range(3)]  # fmt: skip
    else:
        q, k, v = attn_inputs(method, 4, 3)
        toks = [(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1]) for t in range(3)]
    _, st = K.decode_step(method, *toks[0], **params)
    plain = st.clone()
    before = [t.clone() for t in st.tensors]
    graph = K.decode_graph(st, *toks[1])
    assert backend.captures == 1
    assert all(torch.equal(a, b) for a, b in zip(st.tensors, before, strict=True))
    y = graph(*toks[1]).clone()
    y_plain, _ = K.decode_step(plain, *toks[1])
    assert torch.equal(y, y_plain)
    y, _ = K.decode_step(st, *toks[2], cuda_graph=True)  # the cached graph
    y_plain, _ = K.decode_step(plain, *toks[2])
    assert backend.captures == 1 and torch.equal(y, y_plain)
    assert all(torch.equal(a, b) for a, b in zip(st.tensors, plain.tensors, strict=True))
