"""Bound of H3: sound against the method itself in fp16, bf16 and fp32 storage and against
exact emulations of every declared precision and schedule (the shifted keys summed in
sequence, pairwise, sorted or by FMA; the recurrence or chunks; exp at the edge of the
elementary model), the quantization against two certified references, the parts."""

from __future__ import annotations

import _ssm_emulate as E
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnprec.analysis.bounds import attention_error_bound
from attnprec.analysis.precision import Format, Precision, round_to
from attnprec.analysis.reference import reference
from attnprec.attention import h3_attention
from attnprec.testing import params as P
from attnprec.testing.inputs import make_inputs

F64 = torch.float64
FAMILIES, DECLARATIONS, SCHEDULES = E.FAMILIES, E.DECLARATIONS, E.SCHEDULES


@st.composite
def h3_inputs(draw, max_n=10, max_d=3, dtype=F64):
    """(q, k, v, params): a family, a shift kernel (1 to 4 taps, shared or per channel, on
    the storage grids or not), log-decays per channel or per entry in one regime or mixed."""
    seed = draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    T, d_k, d_v = (
        draw(st.integers(1, max_n)),
        draw(st.integers(1, max_d)),
        draw(st.integers(1, max_d)),
    )
    fam = draw(st.sampled_from(FAMILIES))
    q, k, v = make_inputs(fam, n_q=T, d_k=d_k, d_v=d_v, dtype=dtype, generator=g)
    m = draw(st.integers(1, 4))
    shift = 2 * torch.rand(draw(st.sampled_from((1, d_k))), m, generator=g, dtype=F64) - 1
    width = draw(st.sampled_from((1, d_v)))
    regime = draw(st.sampled_from(("mixed", *P.H3_REGIMES)))
    if regime == "mixed":
        ld = torch.stack([P._h3_log_decay(P.H3_REGIMES[c % 4], (width,), g) for c in range(d_k)])
    else:
        ld = P._h3_log_decay(regime, (d_k, width), g)
    if draw(st.booleans()):  # on the storage grids, or not (then they quantize too)
        shift, ld = P._grid(shift), P._grid(ld)
    return q, k, v, {"shift": shift, "log_decay": ld}


def _stored(p, fmt):
    return {key: round_to(val, fmt) for key, val in p.items()}


@given(
    h3_inputs(),
    st.sampled_from(list(DECLARATIONS)),
    st.sampled_from(list(SCHEDULES)),
    st.sampled_from(("pairs", "state")),
)
def test_sound_against_emulations(case, decl, schedule, evaluation):
    q, k, v, p = case
    form, block, arith = SCHEDULES[schedule]
    base = DECLARATIONS[decl]
    prec = Precision(base.storage, base.compute, base.accumulate, block=block)
    eb = attention_error_bound("h3", q, k, v, prec, evaluation=evaluation, **p)
    y = E.h3(q, k, v, **p, prec=prec, form=form, **arith)
    ref = reference("h3", q, k, v, **p)
    assert bool(ref.contains(y, eb.total).all())
    # the rounding part alone, against the method on the inputs as stored
    fs = prec.storage
    ref_s = reference("h3", *(round_to(x, fs) for x in (q, k, v)), **_stored(p, fs))
    assert bool(ref_s.contains(y, eb.rounding).all())
    assert bool((eb.typical.total <= eb.total).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@given(case=h3_inputs(max_n=12, max_d=4), chunk=st.sampled_from([1, 3, 64]))
def test_the_method_within_its_bound(dtype, case, chunk):
    # the method itself, fed the storage dtype (parameters on its grid: the method converts
    # them to its compute dtype), under the declaration its docstring states
    q, k, v, p = case
    fmt = Format.of(dtype)
    qs, ks, vs = (x.to(dtype) for x in (q, k, v))
    ps = _stored(p, fmt)
    y = h3_attention(qs, ks, vs, chunk_size=chunk, **ps)
    prec = Precision(fmt.name, "fp32", "fp32", block=chunk)
    eb = attention_error_bound("h3", qs, ks, vs, prec, **ps)
    ref = reference("h3", qs, ks, vs, **ps)
    assert bool(ref.contains(y, eb.total).all())
    # and on the inputs as given (float64): quantization of every operand included
    eb_g = attention_error_bound("h3", q, k, v, prec, **p)
    ref_g = reference("h3", q, k, v, **p)
    assert bool(ref_g.contains(y, eb_g.total).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_exactly_zero_shifted_keys_keep_a_finite_bound(dtype):
    """'ties' inputs (entries in {-1, 0, 1}) make some shifted keys exactly 0; the bound
    holds them 4 2^-1074 away from 0, and took their error as relative to that (1e263),
    so with fp32 compute's load allowance every element was unbounded, 'products q.k in
    fp32' (a review); now finite, and the method within it."""
    g = torch.Generator().manual_seed(7)
    q, k, v = make_inputs("ties", n_q=63, d_k=4, d_v=3, dtype=dtype, generator=g)
    p = P.h3_defaults(4, 63, g)
    prec = Precision(Format.of(dtype).name, "fp32", "fp32", block=1)
    eb = attention_error_bound("h3", q, k, v, prec, **p)
    assert bool(torch.isfinite(eb.total).all()) and not eb.unbounded
    y = h3_attention(q, k, v, chunk_size=1, **p)
    assert bool(reference("h3", q, k, v, **p).contains(y, eb.total).all())


@given(h3_inputs(max_n=8), st.sampled_from(("pairs", "state")))
def test_quantization_sound(case, evaluation):
    # |o(stored) - o(given)| <= quantization, both certified
    q, k, v, p = case
    for fmt in ("fp16", "bf16"):
        eb = attention_error_bound("h3", q, k, v, Precision(fmt), evaluation=evaluation, **p)
        r_s = reference("h3", *(round_to(x, fmt) for x in (q, k, v)), **_stored(p, fmt))
        r_g = reference("h3", q, k, v, **p)
        assert bool(r_g.contains(r_s.value, eb.quantization + r_s.radius).all())


def test_parts_and_exact_inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v = make_inputs("typical", n_q=12, d_k=4, d_v=4, dtype=torch.float16, generator=g)
    p = P.h3_defaults(4, 12, g)  # on the grid: no quantization at all
    eb = attention_error_bound("h3", q, k, v, Precision("fp16"), **p)
    assert bool((eb.quantization == 0).all()) and bool((eb.approximation == 0).all())
    assert bool((eb.rounding > 0).all()) and bool((eb.total >= eb.rounding).all())
    assert eb.typical is not None and bool((eb.typical.total <= eb.total).all())
    # sampled rows: the bound of those rows (its float64 margins count the keys they see)
    prec = Precision("fp16", block=64)
    rows = attention_error_bound("h3", q, k, v, prec, rows=[2, 7], **p)
    assert rows.rows.tolist() == [2, 7] and rows.total.shape == (2, 4)
    y = h3_attention(q, k, v, **p)[..., [2, 7], :]
    assert bool(reference("h3", q, k, v, rows=[2, 7], **p).contains(y, rows.total).all())
    conf = attention_error_bound("h3", q, k, v, Precision("fp16"), confidence=0.99, **p)
    assert conf.confidence == 0.99 and bool((conf.total <= eb.total).all())


def test_shifted_keys_that_overflow_are_unbounded():
    # keys of 2^127 and a kernel of ones: the sum of two taps, 2^128, overflows a bf16
    # compute and accumulate (one tap does not); every row from the second on is unbounded
    x = torch.full((3, 1), 2.0**127, dtype=F64)
    p = {"shift": torch.ones(4, dtype=F64), "log_decay": torch.zeros(1, dtype=F64)}
    prec = Precision("fp32", compute="bf16", accumulate="bf16")
    eb = attention_error_bound("h3", torch.zeros_like(x), x, torch.zeros_like(x), prec, **p)
    assert any(key.startswith("shifted keys") for key in eb.unbounded)
    assert bool(torch.isinf(eb.total[1:]).all()) and bool(torch.isfinite(eb.total[0]).all())


@pytest.mark.parametrize(
    ("kw", "err", "match"),
    [
        ({"causal": False}, ValueError, "causal"),
        ({"scale": 0.5}, ValueError, "scale"),
        ({"target": "gated"}, ValueError, "target"),
        ({"state": object()}, ValueError, "state"),
        ({"log_decay": torch.ones(2, dtype=F64)}, ValueError, "log_decay"),
        ({"shift": torch.ones(3, 2, dtype=F64)}, ValueError, "shift"),
    ],
)
def test_bad_input_is_named(kw, err, match):
    x = torch.ones(3, 2, dtype=F64)
    p = {"shift": torch.ones(2, dtype=F64), "log_decay": -torch.ones(2, dtype=F64), **kw}
    with pytest.raises(err, match=match):
        attention_error_bound("h3", x, x, x, Precision("fp16"), **p)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_per_head_per_entry_within_bound(dtype):
    # batch (2,) with a shift kernel and decays per entry for each head; sampled rows
    g = torch.Generator().manual_seed(5)
    q, k, v = make_inputs("outliers", n_q=20, d_k=3, d_v=4, batch=(2,), dtype=dtype, generator=g)
    fmt = Format.of(dtype)
    p = {
        "shift": round_to(torch.randn(2, 3, 3, generator=g, dtype=F64), fmt),
        "log_decay": round_to(-torch.rand(2, 3, 4, generator=g, dtype=F64), fmt),
    }
    y = h3_attention(q, k, v, chunk_size=8, **p)
    prec = Precision(fmt.name, block=8)
    eb = attention_error_bound("h3", q, k, v, prec, **p)
    assert eb.total.shape == (2, 20, 4) and bool((eb.quantization == 0).all())
    assert bool(reference("h3", q, k, v, **p).contains(y, eb.total).all())
    eb_r = attention_error_bound("h3", q, k, v, prec, rows=[3, 19], **p)
    ref_r = reference("h3", q, k, v, rows=[3, 19], **p)
    assert bool(ref_r.contains(y[..., [3, 19], :], eb_r.total).all())
