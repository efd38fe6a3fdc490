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
FAMILIES = ("typical", "outliers", "sinks", "ties", "cancel")
DECLARATIONS = {
    "fp32": Precision("fp32"),
    "fp16": Precision("fp16"),
    "bf16": Precision("bf16"),
    "bf16-c16-a16": Precision("bf16", compute="bf16", accumulate="bf16"),
    "fp16-c16-a32": Precision("fp16", compute="fp16", accumulate="fp32"),
}
SCHEDULES = {  # (form, block, Arith options)
    "recurrent": ("recurrent", None, {}),
    "recurrent-limit": ("recurrent", None, {"limit": True}),
    "recurrent-pairwise-fma": ("recurrent", None, {"order": "pairwise", "fma": True}),
    "chunked4": ("chunked4", 4, {}),
    "chunked4-limit": ("chunked4", 4, {"limit": True}),
    "chunked3-sorted": ("chunked3", 3, {"order": "sorted"}),
}


def emulate_h3(q, k, v, *, shift, log_decay, prec, form="recurrent", **arith):
    """H3 under ``prec``, every operation rounded to its declared format: loads, the shifted
    keys (products, then the sum over the taps in the Arith's order), the reduced gated
    problem by the zoo's recurrent or chunked kernel, the store."""
    ar = E.Z.Arith(prec, **arith)
    ql, kl, vl = (E._load(ar, x) for x in (q, k, v))
    sh = E._load(ar, shift)
    sh = sh if sh.dim() >= 2 else sh.unsqueeze(0)
    ld = E._load(ar, log_decay)
    ld = ld.unsqueeze(-1) if ld.dim() == 1 else ld
    T, d_k = ql.shape[-2:]
    d_v = vl.shape[-1]
    m = sh.shape[-1]
    batch = torch.broadcast_shapes(ql.shape[:-2], kl.shape[:-2], vl.shape[:-2], sh.shape[:-2],
                                   ld.shape[:-2])  # fmt: skip
    ql, kl, vl = ql.expand(*batch, T, d_k), kl.expand(*batch, T, d_k), vl.expand(*batch, T, d_v)
    kk = torch.cat([kl.new_zeros(*batch, m - 1, d_k), kl], -2)
    win = kk.unfold(-2, m, 1)  # [..., T, d_k, m]
    ks = ar.dot(win, sh.flip(-1).unsqueeze(-3), -1)
    ld = ld.expand(*batch, d_k, ld.shape[-1])
    if ld.shape[-1] == 1:
        qg, kg, vg = ql, ks, vl
        lg = ld[..., 0].unsqueeze(-2).expand(*batch, T, d_k)
    else:
        qg = ql.unsqueeze(-3).expand(*batch, d_v, T, d_k)
        kg = ks.unsqueeze(-3).expand(*batch, d_v, T, d_k)
        vg = vl.movedim(-1, -2).unsqueeze(-1)
        lg = ld.movedim(-1, -2).unsqueeze(-2).expand(*batch, d_v, T, d_k)
    if form == "recurrent":
        y = E.Z._gated_recurrent(ar, qg, kg, vg, lg, 1.0)
    else:
        y = E.Z._gated_chunked(ar, qg, kg, vg, lg, 1.0, int(form.removeprefix("chunked")))
    if ld.shape[-1] != 1:
        y = y.squeeze(-1).movedim(-1, -2)
    return ar.store(y, prec.storage.torch_dtype)


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
)
def test_sound_against_emulations(case, decl, schedule):
    q, k, v, p = case
    form, block, arith = SCHEDULES[schedule]
    base = DECLARATIONS[decl]
    prec = Precision(base.storage, base.compute, base.accumulate, block=block)
    eb = attention_error_bound("h3", q, k, v, prec, **p)
    y = emulate_h3(q, k, v, **p, prec=prec, form=form, **arith)
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


@given(h3_inputs(max_n=8))
def test_quantization_sound(case):
    # |o(stored) - o(given)| <= quantization, both certified
    q, k, v, p = case
    for fmt in ("fp16", "bf16"):
        eb = attention_error_bound("h3", q, k, v, Precision(fmt), **p)
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
