"""H3 (shift SSM, diagonal SSM over the key-value products, product with the queries): the
method against its recurrence, recurrent decoding, batch dims, bad input.

Tolerances are computed bounds: two float64 implementations of the same exact output differ
by at most the sum of their rounding bounds (``attention_error_bound("h3", ...).rounding``
for the float64 declaration, ``block`` the chunk, None the plain recurrence).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnprec.analysis.bounds import attention_error_bound
from attnprec.analysis.bounds.rounding import upper
from attnprec.analysis.precision import Precision
from attnprec.attention import H3State, gated_linear_attention, h3_attention
from attnprec.testing import params as P
from attnprec.testing.inputs import make_inputs

F64 = torch.float64
FAMILIES = ("typical", "outliers", "sinks", "ties", "cancel")


def _rnd(q, k, v, block, **kw):
    """The float64 rounding bound of h3 for chunks of ``block`` (None: the recurrence)."""
    return attention_error_bound("h3", q, k, v, Precision("fp64", "fp64", "fp64", block=block),
                                 **kw).rounding  # fmt: skip


def naive_h3(q, k, v, shift, log_decay):
    """The recurrence, one token at a time, in float64: ``ks_t = sum_i shift_i k_{t-i}``,
    ``S_t = exp(log_decay) o S_{t-1} + ks_t v_t^T``, ``o_t = q_t S_t``."""
    T, d_k = q.shape[-2:]
    d_v = v.shape[-1]
    sh = shift if shift.dim() >= 2 else shift.unsqueeze(0)
    ld = log_decay.unsqueeze(-1) if log_decay.dim() == 1 else log_decay
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2], sh.shape[:-2],
                                   ld.shape[:-2])  # fmt: skip
    g = torch.exp(ld)
    S = torch.zeros(*batch, d_k, d_v, dtype=F64)
    out = []
    for t in range(T):
        ks = torch.zeros(*batch, d_k, dtype=F64)
        for i in range(min(sh.shape[-1], t + 1)):
            ks = ks + sh[..., i] * k[..., t - i, :]
        S = g * S + ks.unsqueeze(-1) * v[..., t, None, :]
        out.append((q[..., t, :, None] * S).sum(-2))
    return torch.stack(out, -2)


@st.composite
def h3_cases(draw, max_n=12, max_d=4):
    """(q, k, v, params): sizes, a family, a shift kernel (shared or per channel, 1 to 4
    taps), decays per channel or per entry in one regime, batch () or (2,) (decays per
    head when batched)."""
    seed = draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    T, d_k, d_v = (draw(st.integers(1, n)) for n in (max_n, max_d, max_d))
    batch = draw(st.sampled_from(((), (2,))))
    fam = draw(st.sampled_from(FAMILIES))
    q, k, v = make_inputs(fam, n_q=T, d_k=d_k, d_v=d_v, batch=batch, generator=g)
    m = draw(st.integers(1, 4))
    shift = 2 * torch.rand(draw(st.sampled_from((1, d_k))), m, generator=g, dtype=F64) - 1
    if draw(st.booleans()):
        shift = shift[0]  # [m]
    regime = draw(st.sampled_from(P.H3_REGIMES))
    width = draw(st.sampled_from((1, d_v)))
    ld = P._h3_log_decay(regime, (*batch, d_k, width), g)
    if not batch and width == 1 and draw(st.booleans()):
        ld = ld[:, 0]  # [d_k]
    return q, k, v, {"shift": P._grid(shift), "log_decay": P._grid(ld)}


@given(h3_cases(), st.sampled_from([1, 3, 64]))
def test_h3_equals_recurrence(case, chunk):
    q, k, v, p = case
    y = h3_attention(q, k, v, chunk_size=chunk, **p)
    ref = naive_h3(q, k, v, p["shift"], p["log_decay"])
    tol = upper(_rnd(q, k, v, chunk, **p) + _rnd(q, k, v, None, **p), 2)
    assert y.shape == ref.shape and y.dtype == F64
    assert bool(((y - ref).abs() <= tol).all())


@given(h3_cases(max_n=14))
def test_decode_equals_full_call(case):
    q, k, v, p = case
    T = q.shape[-2]
    full, st_full = h3_attention(q, k, v, return_state=True, **p)
    outs, state = [], None
    for t in range(T):  # one token per call: the recurrence (block 1)
        sl = slice(t, t + 1)
        y, state = h3_attention(q[..., sl, :], k[..., sl, :], v[..., sl, :], state=state,
                                return_state=True, **p)  # fmt: skip
        outs.append(y)
    dec = torch.cat(outs, -2)
    tol = upper(_rnd(q, k, v, 1, **p) + _rnd(q, k, v, 64, **p), 2)
    assert bool(((dec - full).abs() <= tol).all())
    m = (p["shift"] if p["shift"].dim() >= 2 else p["shift"].unsqueeze(0)).shape[-1]
    assert isinstance(state, H3State) and state.keys.shape[-2] == m - 1
    assert torch.equal(state.keys, st_full.keys)
    # pieces cut at a chunk boundary run the very operations of one call
    cut = 3 * (T // 6)
    if cut:
        one = h3_attention(q, k, v, chunk_size=3, **p)
        y1, s1 = h3_attention(q[..., :cut, :], k[..., :cut, :], v[..., :cut, :], chunk_size=3,
                              return_state=True, **p)  # fmt: skip
        y2 = h3_attention(q[..., cut:, :], k[..., cut:, :], v[..., cut:, :], chunk_size=3,
                          state=s1, **p)  # fmt: skip
        assert torch.equal(torch.cat([y1, y2], -2), one)


def test_shift_one_is_gated_attention():
    # shift = [1] and decays per channel: gated linear attention with constant log-gates
    g = torch.Generator().manual_seed(0)
    q, k, v = make_inputs("typical", n_q=9, d_k=3, d_v=2, generator=g)
    ld = -torch.rand(3, generator=g, dtype=F64)
    y = h3_attention(q, k, v, shift=torch.ones(1, dtype=F64), log_decay=ld, chunk_size=4)
    z = gated_linear_attention(q, k, v, ld.expand(9, 3), scale=1.0, chunk_size=4)
    assert torch.equal(y, z)


def test_per_entry_equal_columns_is_per_channel():
    g = torch.Generator().manual_seed(1)
    q, k, v = make_inputs("typical", n_q=7, d_k=3, d_v=4, generator=g)
    sh = torch.tensor([1.0, -0.5, 0.25], dtype=F64)
    ld = -torch.rand(3, generator=g, dtype=F64)
    a = h3_attention(q, k, v, shift=sh, log_decay=ld, chunk_size=3)
    b = h3_attention(q, k, v, shift=sh, log_decay=ld.unsqueeze(-1).expand(3, 4), chunk_size=3)
    tol = upper(2 * _rnd(q, k, v, 3, shift=sh, log_decay=ld), 2)
    assert bool(((a - b).abs() <= tol).all())


def test_low_precision_dtypes_compute_in_fp32():
    g = torch.Generator().manual_seed(2)
    q, k, v = make_inputs("typical", n_q=6, d_k=2, d_v=2, generator=g)
    p = P.h3_defaults(2, 6, g)
    for dt in (torch.float16, torch.bfloat16):
        y, st_ = h3_attention(q.to(dt), k.to(dt), v.to(dt), return_state=True, **p)
        assert y.dtype == dt and st_.S.dtype == torch.float32
        z = h3_attention(*(x.to(dt).float() for x in (q, k, v)), **p)
        assert torch.equal(y, z.to(dt))


def test_empty_sequence_and_state():
    q = torch.zeros(0, 2, dtype=F64)
    p = {"shift": torch.ones(2, dtype=F64), "log_decay": torch.zeros(2, dtype=F64)}
    assert h3_attention(q, q, q, **p).shape == (0, 2)
    with pytest.raises(ValueError, match="state"):
        h3_attention(q, q, q, return_state=True, **p)
    x = torch.ones(1, 2, dtype=F64)
    _, s = h3_attention(x, x, x, return_state=True, **p)
    y, s2 = h3_attention(q, q, q, state=s, return_state=True, **p)
    assert y.shape == (0, 2) and s2 is s


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"shift": torch.ones(3, 2, dtype=F64)}, "shift"),
        ({"shift": torch.ones(0, dtype=F64)}, "shift"),
        ({"shift": torch.tensor([float("nan")], dtype=F64)}, "shift"),
        ({"log_decay": torch.ones(2, dtype=F64)}, "log_decay"),
        ({"log_decay": -torch.ones(5, dtype=F64)}, "log_decay"),
        ({"log_decay": -torch.ones(2, 3, dtype=F64)}, "log_decay"),
        ({"log_decay": -torch.ones(3, 2, 1, dtype=F64), "q": torch.ones(2, 4, 2)}, "log_decay"),
        ({"causal": False}, "causal"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_bad_input_is_named(kw, match):
    x = torch.ones(4, 2, dtype=F64)
    p = {"shift": torch.ones(2, dtype=F64), "log_decay": -torch.ones(2, dtype=F64), **kw}
    q = p.pop("q", x).to(F64)
    with pytest.raises(ValueError, match=match):
        h3_attention(q, x, x, **p)


def test_bad_types_and_states_are_named():
    x = torch.ones(4, 2, dtype=F64)
    p = {"shift": torch.ones(2, dtype=F64), "log_decay": -torch.ones(2, dtype=F64)}
    with pytest.raises(TypeError, match="shift"):
        h3_attention(x, x, x, shift=torch.ones(2, dtype=torch.int64), log_decay=p["log_decay"])
    with pytest.raises(TypeError, match="state"):
        h3_attention(x, x, x, state=object(), **p)
    _, s = h3_attention(x, x, x, return_state=True, **p)
    with pytest.raises(ValueError, match="keys"):
        h3_attention(x, x, x, state=H3State(s.S, s.keys[:0]), **p)
    with pytest.raises(ValueError, match="state"):
        h3_attention(x, x, x, state=H3State(s.S[:1], s.keys), **p)
    with pytest.raises(TypeError, match="state"):
        h3_attention(x, x, x, state=H3State(s.S.float(), s.keys), **p)
