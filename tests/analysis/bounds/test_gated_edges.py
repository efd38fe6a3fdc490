"""Gated linear attention at the edges: underflowing decays under large terms, overflowing
intermediates, and states passed between chunks as one exp of a segment sum of chunk
totals (Mamba-2's ssd_minimal). Each case was outside the bound, or not flagged, before."""

from __future__ import annotations

import math

import pytest
import torch

from attnprec.analysis.bounds import attention_error_bound
from attnprec.analysis.precision import Precision, round_to
from attnprec.analysis.reference import reference
from attnprec.attention import gated_linear_attention

F64 = torch.float64
FP32 = Precision("fp32", "fp32", "fp32")


def test_underflowing_decay_under_large_terms():
    """exp(-100) is subnormal in fp32 (2 % off, or flushed); it multiplies k v = 9e36: the
    underflow is carried by |q k v|, not by |v| alone (900x outside before)."""
    q = torch.ones(1, 2, 1, dtype=F64)
    k = torch.tensor([[[3e18], [0.0]]], dtype=F64).float().double()
    lg = torch.tensor([[0.0, -100.0]], dtype=F64)
    eb = attention_error_bound("gated", q, k, k, FP32, log_g=lg, scale=1.0)
    ref = reference("gated", q, k, k, log_g=lg, scale=1.0)
    for chunk in (1, 2):
        y = gated_linear_attention(
            q.float(), k.float(), k.float(), log_g=lg.float(), scale=1.0, chunk_size=chunk
        )
        assert bool(ref.contains(y.double(), eb.total).all()), chunk
    flushed = torch.tensor([[[9e36], [0.0]]], dtype=F64)  # the decayed term lost
    assert bool(ref.contains(flushed, eb.total).all())
    assert not eb.unbounded


def test_overflowing_intermediates_are_unbounded():
    """The state k v (1e40) or the product q k overflows fp32 while the output (1e20) does
    not: the element is unbounded, named, rather than given a finite bound."""
    x = lambda a: torch.tensor([[[a]]], dtype=F64).float().double()  # noqa: E731
    lg = torch.tensor([[-0.5]], dtype=F64)
    for (q, k, v), reason in (
        ((x(1e-20), x(1e20), x(1e20)), "state k v in fp32"),
        ((x(1e20), x(1e20), x(1e-20)), "products q.k in fp32"),
    ):
        eb = attention_error_bound("gated", q, k, v, FP32, log_g=lg, scale=1.0)
        assert bool(eb.unbounded[reason].all()) and math.isinf(float(eb.total))
    v = torch.full((1, 1, 1), 7e4, dtype=F64)
    eb = attention_error_bound(
        "gated", x(1.0), x(1.0), v, Precision("fp32", "fp16", "fp32"), log_g=lg, scale=1.0
    )
    assert bool(eb.unbounded["load into fp16"].all())


def _ulp32(x: float) -> float:
    return 2.0 ** (math.floor(math.log2(x)) - 23)


def _f32(x: float) -> float:
    return float(torch.tensor(x, dtype=F64).float())


def test_segment_sum_of_chunk_totals():
    """Mamba-2's ssd_minimal passes states between chunks through exp(segsum(chunk
    totals)): an exponent of up to n / B chunk totals summed in fp32. With totals chosen so
    that every partial sum rounds down by 0.49 ulp, the fp32 kernel was 3.4x outside the
    block=B bound (which counted only the <= B log-gates of a chunk)."""
    B, m = 4, 512
    n = B * m
    totals, a = [-64.0], 64.0  # the partial sums' modulus a grows by ~0.03 per chunk
    for _ in range(2, m):
        g0 = a + 0.03
        g = math.floor(g0 / _ulp32(g0)) * _ulp32(g0)
        b = _f32(g + 0.49 * _ulp32(g0) - a)  # a + b rounds down by 0.49 ulp in fp32
        totals.append(-b)
        a = _f32(a + b)
    lg = torch.zeros(1, n, dtype=F64)
    for z in range(1, m):  # chunk z's total on its last gate
        lg[0, z * B + B - 1] = totals[z - 1]
    q = k = torch.ones(1, n, 1, dtype=F64)
    v = torch.zeros(1, n, 1, dtype=F64)
    v[0, 0, 0] = 1.0  # one key, so y_t is its decay exp(sum of the gates after it)
    # the kernel: within-chunk sums of the span, one fp32 sum of the chunk totals in
    # between (the segment sum), three exps multiplied in fp32
    lg32 = lg.float()
    chunk_tot = lg32.reshape(m, B).sum(-1)  # exact here: one nonzero gate per chunk
    y = torch.zeros(1, n, 1, dtype=F64)
    for t in range(n):
        c = t // B
        if c == 0:
            y[0, t, 0] = float(torch.exp(lg32[0, 1 : t + 1].sum()))
            continue
        seg = torch.zeros((), dtype=torch.float32)
        for z in range(1, c):
            seg = seg + chunk_tot[z]
        head = lg32[0, c * B : t + 1].sum()
        tail = lg32[0, 1:B].sum()
        y[0, t, 0] = float(torch.exp(head) * torch.exp(seg) * torch.exp(tail))
    rows = list(range(400, 520, 4))
    prec = Precision("fp32", "fp32", "fp32", block=B)
    eb = attention_error_bound("gated", q, k, v, prec, log_g=lg, scale=1.0, rows=rows)
    ref = reference("gated", q, k, v, log_g=lg, scale=1.0, rows=rows)
    y = round_to(y, "fp32")[:, rows]
    assert float(((y - ref.value).abs() - ref.radius).max()) > 0  # the kernel does err
    assert bool(ref.contains(y, eb.total).all())


def test_quantization_of_products_near_the_grid():
    """The input-quantization part bounds |o(q, k, v) - o(q~, k~, v~)| (60-digit sums) where
    q k and q~ k~ agree in float64 (q, k an ulp off the grid: their difference of rounded
    products cancelled to a bound of 0) and on ordinary draws (it was 1e-9 short on half)."""
    import mpmath

    mpmath.mp.dps = 60
    g = torch.Generator().manual_seed(11)
    cases = [([[1 + 2**-52]], [[1 - 2**-53]], [[2.0**100]])]
    cases += [
        tuple(torch.randn(2, 3, generator=g, dtype=F64).tolist() for _ in range(3))
        for _ in range(40)
    ]
    for qs, ks, vs in cases:
        q, k, v = (torch.tensor(x, dtype=F64) for x in (qs, ks, vs))
        lg = torch.zeros_like(q)
        eb = attention_error_bound("gated", q, k, v, "fp32", causal=True, scale=1.0, log_g=lg)
        st = [round_to(x, "fp32") for x in (q, k, v)]

        def out(a, b, c, i, e):  # o_ie = sum_{j <= i} (a_i . b_j) c_je, exactly
            return mpmath.fsum(
                mpmath.fsum(
                    mpmath.mpf(float(x)) * mpmath.mpf(float(y))
                    for x, y in zip(a[i], b[j], strict=True)
                )
                * mpmath.mpf(float(c[j, e]))
                for j in range(i + 1)
            )

        for i in range(q.shape[0]):
            for e in range(v.shape[1]):
                true = abs(out(q, k, v, i, e) - out(*st, i, e))
                assert true <= float(eb.quantization[i, e]), (qs, ks, vs, i, e)


def test_resets():
    """``log g = -inf``: a reset (``gated_linear_attention``'s gate of 0), per channel or
    per step, at the first step and inside and at the start of chunks. The bound was inf on
    every row after the first reset, naming a normalizer that gated attention does not
    have, and the reference refused them; the spans across a reset are exact zeros now
    (their decays ``exp(-inf)`` in any kernel that takes an exp of a span's sum or a
    product of per-step exps), both evaluations alike, and the zoo's recurrent and chunked
    kernels lie within."""
    from _ssm_emulate import Z

    n, d_k, d_v = 40, 3, 2
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(n, d, generator=g, dtype=F64) for d in (d_k, d_k, d_v))
    per_channel = -0.3 * torch.rand(n, d_k, generator=g, dtype=F64)
    per_channel[0, 1] = per_channel[9, 0] = per_channel[12] = per_channel[21, 2] = -math.inf
    per_step = -0.3 * torch.rand(n, generator=g, dtype=F64)
    per_step[8] = per_step[30] = -math.inf
    for lg in (per_channel, per_step):
        ref = reference("gated", q, k, v, log_g=lg, scale=1.0)
        lg_c = lg if lg.dim() == 2 else lg[:, None].expand(n, d_k)
        for prec, form, block in (
            (FP32, "recurrent", None),
            (Precision("bf16"), "chunked4", 4),
            (Precision("fp16", "fp16", "fp32"), "chunked4", 4),
        ):
            prec = Precision(prec.storage, prec.compute, prec.accumulate, block=block)
            ar = Z.Arith(prec)
            qs, ks, vs = (ar.load(round_to(x, prec.storage)) for x in (q, k, v))
            if form == "recurrent":
                y = ar.c(Z._gated_recurrent(ar, qs, ks, vs, lg_c))
            else:
                y = ar.c(Z._gated_chunked(ar, qs, ks, vs, lg_c, 4))
            y = ar.store(y, prec.storage.torch_dtype).double()
            totals = []
            for evaluation in ("pairs", "state"):
                eb = attention_error_bound(
                    "gated", q, k, v, prec, log_g=lg, scale=1.0, evaluation=evaluation
                )
                assert not eb.unbounded and bool(torch.isfinite(eb.total).all())
                assert bool(ref.contains(y, eb.total).all()), (prec.describe(), evaluation)
                totals.append(eb.total)
            assert torch.equal(*totals)


def test_states_grown_by_computed_decays_are_unbounded():
    """A computed decay may exceed its exact value 1 by the exp's declared error: a legal
    fp16-compute kernel whose decays are 1 + 2^-10 (one fp16 ulp above exp(0)) grows its
    state by 28% over 512 steps, and its product q_c S_c passes fp16's max where the exact
    one (61,440) does not. The overflow checks took the state as at most
    the sum of |k v| (exact decays <= 1): a finite bound, an inf output. Now the row is
    unbounded, named, in both evaluations."""
    n, d = 512, 2
    prec = Precision("fp32", compute="fp16", accumulate="fp32")
    assert prec.op_error("exp") >= 2.0**-10  # the declaration allows the push below
    q = torch.tensor([[0.0, 1.0]] * (n - 1) + [[0.0, 1.875]], dtype=F64)[None]
    k = torch.tensor([[0.0, 1.0]] * n, dtype=F64)[None]
    v = torch.full((1, n, 1), 64.0, dtype=F64)
    lg = torch.zeros(1, n, d, dtype=F64)
    half = lambda x: round_to(x, "fp16")  # noqa: E731
    s = torch.zeros(d, dtype=F64)
    for t in range(n):  # S = fl16(g S) + fl16(k v), summed in fp32; g = fl16(exp 0) + 1 ulp
        s = round_to(half((1 + 2.0**-10) * s) + half(k[0, t] * v[0, t, 0]), "fp32")
    exact = float((k[0, :, 1] * v[0, :, 0]).sum() * q[0, -1, 1])
    assert exact < 65504 < float(half(q[0, -1, 1] * s[1])) == math.inf  # the kernel's inf
    for evaluation in ("pairs", "state"):
        eb = attention_error_bound(
            "gated", q, k, v, prec, log_g=lg, scale=1.0, rows=[0, n - 1], evaluation=evaluation
        )
        assert math.isfinite(float(eb.total[0, 0, 0])), evaluation
        assert not math.isfinite(float(eb.total[0, 1, 0])), evaluation
        assert bool(eb.unbounded["products q.state in fp16"][0, 1].all()), evaluation


def test_the_state_evaluation_takes_each_rows_own_growth():
    """The state evaluation took the whole sequence's path growth for every row: rows the
    pairs bounded (from row 68 of 2048 on) were unbounded there (a review of the fix
    above). Each row now takes the growth of its own span: the state is never finite
    where the pairs are not, and both are finite at the start."""
    g = torch.Generator().manual_seed(0)
    n, d = 2048, 4
    q = torch.rand(1, n, d, generator=g)
    k, v = (torch.rand(1, n, d, generator=g) * 60**0.5 for _ in range(2))
    lg = torch.full((1, n, d), -1e-4)
    prec = Precision("fp32", compute="fp16")
    pairs, state = (
        attention_error_bound("gated", q, k, v, prec, log_g=lg, causal=True, evaluation=e).total
        for e in ("pairs", "state")
    )
    assert not bool((torch.isfinite(state) & ~torch.isfinite(pairs)).any())
    # rows 0-68: the first was unbounded under the sequence's growth (now 628; pairs 848)
    assert bool(torch.isfinite(state[0, :69]).all()) and bool(torch.isfinite(pairs[0, :69]).all())


@pytest.mark.parametrize("evaluation", ["pairs", "state"])
def test_gates_whose_exp_is_zero_are_resets(evaluation):
    """Log-gates of -1e16 every third step: the state evaluation raised a bare RuntimeError
    and the pairs charged the gate's magnitude to every decay (inf, naming overflows that
    do not happen); their decays are -inf's, exactly as far as float64 resolves."""
    T, d = 64, 2
    g = torch.Generator().manual_seed(1)
    q, k = (torch.rand(1, T, d, generator=g) + 0.5 for _ in range(2))
    v = torch.rand(1, T, 1, generator=g) + 0.5
    far, reset = torch.full((1, T, d), -1e-3), torch.full((1, T, d), -1e-3)
    far[:, ::3], reset[:, ::3] = -1e16, -math.inf
    kw = dict(evaluation=evaluation, scale=1.0)
    b = attention_error_bound("gated", q, k, v, Precision("fp32"), log_g=far, **kw)
    r = attention_error_bound("gated", q, k, v, Precision("fp32"), log_g=reset, **kw)
    assert not b.unbounded and torch.equal(b.total, r.total)
    assert float(b.total.max()) < 1e-3


@pytest.mark.parametrize("evaluation", ["pairs", "state"])
def test_block_sums_kept_separate_are_honoured(evaluation):
    """A chunked kernel that sums each chunk on its own and adds it to the state declares
    ``block_sums="separate"``: a term passes at most ``(b - 1) + 2 ceil(n / b) + 2``
    additions, not ``n``. The gated bounds counted ``n`` whatever the declaration (a
    review: a chunked SSD got the bound of any order, silently); the zoo's chunked kernels,
    which declare it, pass their audits (tests/testing/test_zoo.py)."""
    g = torch.Generator().manual_seed(0)
    n = 512
    q, k, v = (torch.randn(n, 4, generator=g) for _ in range(3))
    log_g = -1e-4 * torch.rand(n, 4, generator=g)
    kw = {"log_g": log_g, "causal": True, "evaluation": evaluation}
    b_sep = attention_error_bound(
        "gated", q, k, v, Precision("fp32", block=16, block_sums="separate"), **kw
    )
    b_any = attention_error_bound("gated", q, k, v, Precision("fp32", block=16), **kw)
    assert bool((b_sep.total <= b_any.total).all())
    assert float(b_sep.total[-1].max()) < 0.5 * float(b_any.total[-1].max())


@pytest.mark.parametrize(
    "copy_out, q1, k1, v1",
    [
        (False, "0x1.02fffep+0", "0x1.04bffep+0", "0x1.073ffep+0"),
        (True, "0x1.05bffep+0", "0x1.073ffep+0", "0x1.04bffep+0"),
    ],
)
def test_a_state_copied_into_compute_rounds_as_declared(copy_out, q1, k1, v1) -> None:  # noqa: ANN001
    """Under ``rounding="rtz"`` the copy of an fp32 state into fp16 compute for the
    output product (``tl.dot(q, S.to(fp16))``) is a truncation, a whole ulp: a hunt's
    correct kernel (truncating loads, fp16 products, an fp32 state, its copy truncated)
    was 1.06x outside the bound that charged the copy half an ulp, the product's rounding
    under "rne" (``Precision.product_u``). ``copy_out``: the fp32 output, too, truncated
    into compute for its exact product with the scale (``quotient.finish``: 0.88 of the
    bound that charged the product alone)."""
    from attnprec.analysis.audit import audit

    prec = Precision("fp32", compute="fp16", accumulate="fp32", rounding="rtz")
    assert prec.product_u() == 2 * prec.compute.u
    assert Precision("fp32", compute="fp16").product_u() == prec.compute.u
    assert Precision("fp16", rounding="rtz").product_u() == 2.0**-24  # (no narrower copy)

    def kernel(q, k, v, log_g, scale):  # noqa: ANN001, ANN202
        q, k, v = (round_to(x.double(), "fp16", "rtz") for x in (q, k, v))  # loads
        sc = round_to(torch.tensor(scale, dtype=torch.float64), "fp16")
        S, outs = None, []
        for t in range(q.shape[-2]):
            g = round_to(torch.exp(log_g[:, t].double()), "fp16")
            kv = round_to(k[:, t, :, None] * v[:, t, None, :], "fp16")
            S = kv if S is None else round_to(g[:, None, None] * S + kv, "fp32")
            o = (q[:, t, :, None] * round_to(S, "fp16", "rtz")).sum(-2)  # the copy, exact dot
            if copy_out:
                outs.append(round_to(round_to(o, "fp16", "rtz") * sc, "fp32"))
            else:
                outs.append(round_to(o * sc, "fp16"))
        return torch.stack(outs, 1).float()

    def f(*hexes: str) -> torch.Tensor:
        return torch.tensor([float.fromhex(h) for h in hexes], dtype=torch.float32).view(1, 2, 1)

    q, k, v = f("0x1p+0", q1), f("0x1.ffcp-11", k1), f("0x1p+0", v1)  # a tiny first key
    report = audit(kernel, "gated", q, k, v, precision=prec, log_g=torch.zeros(1, 2),
                   scale=1.0004881620407104)  # fmt: skip
    assert report.ok, report.table()


@pytest.mark.parametrize("evaluation", ["pairs", "state"])
def test_quantization_of_decays_below_float64s_normal_range(evaluation):
    """The quantization part bounds the exact output's change under storage with an upper
    bound of every decay: ``exp_up``, not ``torch.exp(x) (1 + 4 u64)``, which returns 0
    past -745 and rounds down on ``[-745, -708]`` (a review: the pair evaluation's part 0
    against a change of 5.5e-297 at ``log_g = -750``, and 1.009x the part at -740.4, where
    only v rounds). Row 1 sees one decayed term; fp32 storage of float64 inputs."""
    prec = Precision("fp32")
    for lg1, q0, k0, v0 in (
        (-750.0, 1.2345678912345e12, 1.2345678912345e12, 1.2345678912345e12),
        (-740.4, 2.0**40, 2.0**40, 1.0 + 2.0**-25 + 2.0**-40),
    ):
        q = torch.tensor([[[q0], [q0]]], dtype=F64)
        k = torch.tensor([[[k0], [0.0]]], dtype=F64)
        v = torch.tensor([[[v0], [0.0]]], dtype=F64)
        lg = torch.tensor([0.0, lg1], dtype=F64)
        stored = [prec.stored(x) for x in (q, k, v)]
        given = reference("gated", q, k, v, log_g=lg)
        held = reference("gated", *stored, log_g=lg)
        change = (held.value - given.value).abs() - held.radius - given.radius
        assert float(change[0, 1, 0]) > 0, lg1
        eb = attention_error_bound("gated", q, k, v, prec, log_g=lg, evaluation=evaluation)
        assert bool((change <= eb.quantization).all()), (lg1, float(change[0, 1, 0]))


@pytest.mark.parametrize("evaluation", ["pairs", "state"])
def test_an_underflow_allowance_past_float64_is_named(evaluation):
    """q, k and v of 1e153 in fp64: the products' underflow allowance ``U_a prod max(1,
    |x|)`` sums terms of 1e459, past float64, and the bound of the rows that see key 0 is
    inf. Every infinite element names a reason (a review found them with none)."""
    n, d = 4, 2
    q = torch.full((n, d), 1e153, dtype=F64)
    k, v = q.clone(), q.clone()
    k[1:], q[:2] = 0.0, 0.0
    lg = torch.zeros(n, dtype=F64)
    lg[2] = -1050.0
    prec = Precision("fp64", "fp64", "fp64")
    eb = attention_error_bound("gated", q, k, v, prec, log_g=lg, scale=1.0, evaluation=evaluation)
    for level in (eb, eb.typical):
        assert level is not None and bool(torch.isinf(level.total[2:]).all())
        named = torch.zeros_like(level.total, dtype=torch.bool)
        for mask in level.unbounded.values():
            named |= mask
        assert bool((named | torch.isfinite(level.total)).all()), level.unbounded
