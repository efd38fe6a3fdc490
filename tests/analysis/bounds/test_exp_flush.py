"""Exps whose result falls below the normal range (fp16 compute: e^-9.7) may be flushed to
zero (``Elementary.exp_flush``): the bounds charge that absolute error to the exps that
may fall there, not to every exp (a row far from the threshold gets the bound of a
declaration without flush), and cover kernels that do flush."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnprec.analysis.bounds import attention_error_bound
from attnprec.analysis.precision import Elementary, Precision, round_to
from attnprec.analysis.reference import reference

FP16, FP32 = "fp16", "fp32"
TINY16 = 2 * 2.0**-14  # exp_flush = 2 fp16 min normals: results below are flushed


def _flushed_exp(a: torch.Tensor) -> torch.Tensor:
    e = round_to(torch.exp(a), FP16)
    return torch.where(e < TINY16, 0.0, e)


def _softmax_flush(q, k, v, *, causal=False, scale=1.0):
    """fp16 compute, fp32 accumulate, one pass: logits and shifted exps in fp16, exps
    below 2^-13 flushed, sums in fp32."""
    s = round_to(round_to(q.double() @ k.double().T, FP16) * scale, FP16)
    if causal:
        s = s.masked_fill(~torch.ones_like(s, dtype=torch.bool).tril(), -math.inf)
    w = _flushed_exp(round_to(s - s.amax(-1, keepdim=True), FP16))
    num, den = w @ v.double(), w.sum(-1, keepdim=True)  # exact, then rounded once: fp32
    return round_to(round_to(num, FP32) / round_to(den, FP32), FP16).half()


def _log_flush(q, k, v, *, causal=False, scale=1.0):
    """Log attention, factorized (Heinsen): per-channel key shifts, fp16 exps flushed."""
    X, Y = q.double() * scale, k.double() * scale
    mk = Y.amax(0, keepdim=True)
    fq = _flushed_exp(round_to(X + mk - (X + mk).amax(-1, keepdim=True), FP16))
    fk = _flushed_exp(round_to(Y - mk, FP16))
    w = fq @ fk.T
    if causal:
        w = w * torch.ones_like(w).tril()
    num, den = w @ v.double(), w.sum(-1, keepdim=True)
    return round_to(round_to(num, FP32) / round_to(den, FP32), FP16).half()


def _inputs(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One key at the row maximum and n - 1 keys spread 7 to 11 below it (a third of
    their exps flushed), values of opposite sign: the flushed mass moves the output."""
    q = torch.ones(3, 1)
    k = torch.cat([torch.zeros(1, 1), -torch.linspace(7.0, 11.0, n - 1).unsqueeze(-1)])
    v = torch.cat([-torch.ones(1, 1), torch.ones(n - 1, 1)])
    return q.half(), k.half(), v.half()


@pytest.mark.parametrize(("method", "fn"), [("softmax", _softmax_flush), ("log", _log_flush)])
def test_flushing_kernels_are_covered(method, fn):
    q, k, v = _inputs(400)
    prec = Precision("fp16", compute="fp16", accumulate="fp32", sums="linear")
    out = fn(q, k, v).double()
    ref = reference(method, q.double(), k.double(), v.double(), scale=1.0)
    eb = attention_error_bound(method, q, k, v, prec, scale=1.0)
    err = (out - ref.value).abs() - ref.radius
    assert float(err.min()) > 1e-3  # the flushed terms matter
    assert bool((err <= eb.total).all()), (float(err.max()), float(eb.total.min()))


@pytest.mark.parametrize("method", ["softmax", "log", "semiring"])
def test_rows_far_from_the_threshold_pay_no_flush(method):
    """Logits within a few units of the row maximum: no exp can fall below T_e, so a
    larger flush allowance leaves the bound as it is (it was charged to every exp)."""
    from attnprec.attention.semiring import SoftMaxPlus

    g = torch.Generator().manual_seed(5)
    q, k, v = (0.5 * torch.randn(24, 8, generator=g) for _ in range(3))
    kw = {"semiring": SoftMaxPlus(0.5)} if method == "semiring" else {}
    bounds = []
    for flush in (2.0, 8.0):
        el = Elementary(exp_flush=flush)
        prec = Precision("fp16", compute="fp16", accumulate="fp32", elementary=el, sums="linear")
        eb = attention_error_bound(method, q.half(), k.half(), v.half(), prec, causal=True, **kw)
        bounds.append(eb.total)
    assert bool(torch.isfinite(bounds[0]).all())
    assert torch.equal(bounds[0], bounds[1])


@pytest.mark.parametrize("n", [10, 300])
def test_a_shift_by_a_hidden_keys_computed_logit(n):
    """Causal rows shifted once by the largest logit of every key (block=None allows it):
    the hidden key's logit, from fp16 products, is 6.0 against 4.0039 exact, so visible
    keys 7.5 below the exact shift sit 9.5 below the kernel's and their exps flush (the
    output jumps to -1). The wide model's shift is the computed maximum's bound: the bound
    covers it (was 33x below the error)."""
    a = 1 + 2.0**-10
    q = torch.full((n, 2), a, dtype=torch.float64)
    k = torch.zeros(n, 2, dtype=torch.float64)
    k[1 : n - 1, 0] = -3.5
    k[n - 1] = torch.tensor([3072.0, -3068.0])
    v = torch.ones(n, 1, dtype=torch.float64)
    v[0] = -1.0
    row = n - 2
    s = round_to(round_to(round_to(q[row] * k, FP16).sum(-1), FP32), FP16)
    w = _flushed_exp(round_to(s[: row + 1] - s.max(), FP16))  # the max over every key
    out = round_to(round_to(w @ v[: row + 1], FP32) / round_to(w.sum(), FP32), FP16)
    ref = reference("softmax", q, k, v, causal=True, scale=1.0, rows=[row])
    err = float((out - ref.value[0]).abs().max() - ref.radius.max())
    assert err > 0.3
    prec = Precision("fp16", compute="fp16", accumulate="fp32", sums="linear")
    eb = attention_error_bound("softmax", q, k, v, prec, causal=True, scale=1.0, rows=[row])
    assert err <= float(eb.total.min())


def _far_inputs(n: int, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_inputs` with the n - 1 keys spread ``lo`` to ``hi`` below the maximum."""
    q = torch.ones(3, 1)
    k = torch.cat([torch.zeros(1, 1), -torch.linspace(lo, hi, n - 1).unsqueeze(-1)])
    v = torch.cat([-torch.ones(1, 1), torch.ones(n - 1, 1)])
    return q.half(), k.half(), v.half()


@pytest.mark.parametrize("method", ["softmax", "log", "semiring"])
def test_a_flushed_term_costs_at_most_what_it_weighs(method):
    """Keys 16 to 30 below the row maximum: each exp may flush, but what a flush loses is
    the term's own weight (e^-16 and less), not the threshold 2^-13 per exp: the bound is
    within 1.5x of a declaration whose exps never flush (1.0003-1.0005x; it was 700-1,130x
    that, 41-47 on an output of -1)."""
    from attnprec.attention.semiring import SoftMaxPlus

    kw = {"semiring": SoftMaxPlus(0.5)} if method == "semiring" else {}
    q, k, v = _far_inputs(400, 16.0, 30.0)
    bounds = []
    for flush in (2.0, 0.0):
        el = Elementary(exp_flush=flush)
        prec = Precision("fp16", compute="fp16", accumulate="fp32", elementary=el, sums="linear")
        bounds.append(attention_error_bound(method, q, k, v, prec, scale=1.0, **kw).total)
    ratio = float((bounds[0] / bounds[1]).max())
    assert 1.0 <= ratio <= 1.5, ratio


def _approx_exp(a: torch.Tensor) -> torch.Tensor:
    """An fp16 exp at the edge of the declaration below the normal range: results under
    2^-13 flushed where a flush loses the most (e^-9 and above), else one subnormal spacing
    above the rounded result."""
    e = round_to(torch.exp(a), FP16)
    sub = e < TINY16
    return torch.where(sub & (a > -9.1), 0.0, torch.where(sub, e + 2.0**-24, e))


@pytest.mark.parametrize("method", ["softmax", "log"])
def test_exps_at_the_edge_below_the_normal_range_are_covered(method):
    """Keys straddling T_e = 2^-13 (8.5 to 9.4 below the maximum), a third of them near the
    threshold and flushed, the rest one subnormal spacing high: within the bound, which
    charges a flushed term its weight and each exp below T_e a spacing (0.51 against an
    error of 0.008; 41 when each exp below T_e was charged T_e)."""
    q, k, v = _far_inputs(400, 8.5, 9.4)
    prec = Precision("fp16", compute="fp16", accumulate="fp32", sums="linear")
    X, Y, V = (x.double() for x in (q, k, v))
    if method == "softmax":
        w = _approx_exp(round_to(X @ Y.T - (X @ Y.T).amax(-1, keepdim=True), FP16))
    else:  # one channel: the query factor is exp(0) = 1, the key factors straddle T_e
        w = _approx_exp(round_to(Y - Y.amax(0), FP16)).T.expand(3, -1)
    out = round_to(round_to(w @ V, FP32) / round_to(w.sum(-1, keepdim=True), FP32), FP16)
    ref = reference(method, X, Y, V, scale=1.0)
    err = (out - ref.value).abs() - ref.radius
    eb = attention_error_bound(method, q, k, v, prec, scale=1.0)
    assert float(err.min()) > 5e-3  # the flushed terms matter (fp16's store: 5e-4)
    assert bool((err <= eb.total).all()), (float(err.max()), float(eb.total.min()))


@pytest.mark.parametrize("evaluation", ["pairs", "state"])
@pytest.mark.parametrize("method", ["gated", "selective_scan"])
def test_a_flushed_decay_costs_at_most_what_its_term_weighs(method, evaluation):
    """Decays of e^-0.4 per step: past 23 steps they fall below T_e and may flush, but
    what a flush loses is the decayed term itself (from states: a prefix log-sum of the
    keys' path factors), not 2^-13 per exp: within 1.2x of a declaration whose exps never
    flush (gated 1.07x and 1.09x; 57x and 92x when each was charged 2^-13)."""
    g = torch.Generator().manual_seed(3)
    n, d = 96, 4
    q, k, v = (torch.randn(n, d, generator=g).half() for _ in range(3))
    if method == "gated":
        kw = {"log_g": torch.full((n, d), -0.4, dtype=torch.float64)}
    else:  # delta A = -0.4 per step
        kw = {"delta": torch.ones(n, d, dtype=torch.float64),
              "A": torch.full((d, 3), -0.4, dtype=torch.float64)}  # fmt: skip
        q, k = q[:, :3], k[:, :3]
    bounds = []
    for flush in (2.0, 0.0):
        el = Elementary(exp_flush=flush)
        prec = Precision("fp16", compute="fp16", accumulate="fp32", elementary=el)
        eb = attention_error_bound(method, q, k, v, prec, evaluation=evaluation, **kw)
        bounds.append(eb.total)
    assert bool(torch.isfinite(bounds[0]).all())
    ratio = float((bounds[0] / bounds[1]).max())
    assert 1.0 <= ratio <= 1.2, ratio


def test_a_chunked_gated_kernel_flushing_its_decays_is_covered():
    """One chunk of 16 steps (``o_t = sum_j q_t k_j exp(G_t - G_j) v_j``), log-gates of -1:
    the decays of the oldest keys (e^-10 and below) flush, and those keys carry values of
    100: within the bound, which charges each such term what it weighs (an error of 0.056,
    0.27 of the bound from pairs, 0.25 from states)."""
    n = 16
    q, k = torch.ones(n, 1, dtype=torch.float64), torch.ones(n, 1, dtype=torch.float64)
    v = torch.where(torch.arange(n) <= 6, 100.0, 1.0).to(torch.float64).unsqueeze(-1)
    lg = torch.full((n, 1), -1.0, dtype=torch.float64)
    G = lg.cumsum(0)
    D = _flushed_exp(round_to(G - G.T, FP16)).tril()  # exp(G_t - G_j), j <= t
    out = round_to(round_to(D @ v, FP32), FP16)  # products exact here (q = k = 1)
    ref = reference("gated", q, k, v, log_g=lg, scale=1.0)
    err = (out - ref.value).abs() - ref.radius
    assert float(err.max()) > 5e-3  # the flushed terms matter (fp16's store: 1e-3)
    prec = Precision("fp16", compute="fp16", accumulate="fp32", block=16)
    for evaluation in ("pairs", "state"):
        eb = attention_error_bound("gated", q, k, v, prec, log_g=lg, scale=1.0,
                                   evaluation=evaluation)  # fmt: skip
        assert bool((err <= eb.total).all()), (evaluation, float((err / eb.total).max()))


def _split_kv_flush(s: torch.Tensor, v: torch.Tensor, b: int) -> torch.Tensor:
    """Split-KV softmax (flash-decoding) in fp16 compute, sums in fp32: splits of ``b``
    keys, each ``o_s = acc_s / l_s`` and ``lse_s = m_s + log l_s``, combined as ``sum_s
    exp(lse_s - lse) o_s``; every exp below 2^-13 flushed."""
    out = []
    for row in s:
        o, lse_s = [], []
        for a in range(0, row.numel(), b):
            x = row[a : a + b]
            p = _flushed_exp(round_to(x - x.max(), FP16))
            w = round_to(p.sum(), FP32)
            o.append(round_to(round_to(p @ v[a : a + b], FP32) / w, FP32))
            lse_s.append(round_to(x.max() + round_to(torch.log(w), FP16), FP16))
        ls = torch.stack(lse_s)
        lse = ls.max() + round_to(
            torch.log(round_to(_flushed_exp(ls - ls.max()).sum(), FP32)), FP16
        )
        c = _flushed_exp(round_to(ls - round_to(lse, FP16), FP16))
        out.append(round_to(round_to((c[:, None] * torch.stack(o)).sum(0), FP32), FP16))
    return torch.stack(out)


@pytest.mark.parametrize("sums", [None, "log"])
def test_a_split_kv_combine_flushing_whole_splits_is_covered(sums):
    """The combine shifts by the lse, log(n) above the row's largest logit: keys 7.7 below
    it (above T_e) sit in splits whose weight exp(lse_s - lse) is 1.1e-4, flushed, and the
    output loses them (a review: 2.0x outside when only keys that may fall below T_e
    themselves paid; 0.49 of the bound now)."""
    n, b, a = 512, 4, 16
    x = -math.log(TINY16) + math.log(b) - math.log(a) + 0.05
    q = torch.ones(1, 1, dtype=torch.float64)
    k = round_to(torch.cat([torch.zeros(a, 1), torch.full((n - a, 1), -x)]).double(), FP16)
    v = torch.cat([torch.zeros(a, 1), torch.ones(n - a, 1)]).double()
    out = _split_kv_flush(round_to(q @ k.T, FP16), v, b)
    ref = reference("softmax", q, k, v, scale=1.0)
    err = (out - ref.value).abs() - ref.radius
    assert float(err.min()) > 1e-2  # the flushed splits matter
    prec = Precision("fp16", compute="fp16", accumulate="fp32", block=b, sums=sums)
    eb = attention_error_bound("softmax", q, k, v, prec, scale=1.0)
    assert bool((err <= eb.total).all()), float((err / eb.total).max())


@pytest.mark.parametrize("sums", [None, "log"])
def test_a_combine_that_flushes_weights_kept_in_its_normalizer_leaves_the_hull(sums):
    """One-key splits, one pass, fp16 compute: 1,000 keys 6.5 below 16 others keep their
    normalizer terms exp(lse_s - max) >= e^-6.5, but their weights exp(lse_s - lse) =
    e^-9.36 flush, so the output (16 / 17.5 of y = 1) leaves the values' hull. The flush
    was charged to the quotient but not to the hull's slack, whose cap took the bound
    under the error (a review: 2.11x outside; nothing else pushed)."""
    from attnprec.analysis.precision import ONE_PASS

    q = torch.ones(1, 1, dtype=torch.float64)
    k = torch.cat([torch.zeros(16, 1), torch.full((1000, 1), -6.5)]).double()
    v = torch.ones(1016, 1, dtype=torch.float64)
    out = _split_kv_flush(round_to(q @ k.T, FP16), v, 1)
    ref = reference("softmax", q, k, v, scale=1.0)
    err = (out - ref.value).abs() - ref.radius
    assert float(err.min()) > 0.08  # the flushed weights matter
    prec = Precision("fp16", compute="fp16", accumulate="fp32", block=ONE_PASS, sums=sums)
    eb = attention_error_bound("softmax", q, k, v, prec, scale=1.0)
    assert bool((err <= eb.total).all()), float((err / eb.total).max())


def _folded_softmax(s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """fp16 compute and sums, one pass, FlashAttention's exponent: log2(e) and the shift
    folded into one FMA, ``exp2(fma(s, C, -fl(m C)))`` with ``C = fl(log2 e)`` (the FMA
    exact, then rounded once), every exp below 2^-13 flushed."""
    c = float(round_to(torch.tensor(math.log2(math.e), dtype=torch.float64), FP16))
    mc = round_to(s.amax(-1, keepdim=True) * c, FP16)
    p = round_to(torch.exp2(round_to(s * c - mc, FP16)), FP16)
    p = torch.where(p < TINY16, 0.0, p)
    return round_to(round_to(p @ v, FP16) / round_to(p.sum(-1, keepdim=True), FP16), FP16)


@pytest.mark.parametrize("sums", ["linear", "log"])
def test_a_folded_shift_may_flush_the_largest_weight(sums):
    """Logits of 24,992 in fp16 compute: ``24,992 C`` rounds to fp16 16 below its binade's
    half ulp, so a kernel that folds its shift into one FMA computes the largest weight as
    ``2^-15.97``, below fp16's normal range; a flushing exp returns 0 for every key and the
    output is 0 / 0. The hull had taken the largest weight as exp(0) = 1: bounds of 0.039
    (one division) and 7.4 (split-KV), finite. Its floor is now that exp's (its argument
    within half an ulp of ``|m| log2 e``'s binade), 0 where it may flush: named. One binade
    lower (16,384: half an ulp of 8, a weight of at least 2^-8) the bound stays finite."""
    q = torch.full((8, 1), 128.0, dtype=torch.float64)
    v = torch.ones(8, 1, dtype=torch.float64)
    prec = Precision(FP16, compute=FP16, accumulate=FP16, sums=sums)
    for logit, flushes in ((24992.0, True), (16384.0, False)):
        k = torch.full((8, 1), logit / 128, dtype=torch.float64)
        out = _folded_softmax(round_to(q @ k.T, FP16), v)
        eb = attention_error_bound("softmax", q, k, v, prec, scale=1.0)
        assert bool(torch.isnan(out).all()) == flushes
        named = eb.unbounded.get("normalizer may vanish", torch.zeros_like(out, dtype=bool))
        assert bool(named.all()) == flushes and bool(named.any()) == flushes
        if not flushes:
            err = (out - reference("softmax", q, k, v, scale=1.0).value).abs()
            assert bool(torch.isfinite(eb.total).all()) and bool((err <= eb.total).all())


@pytest.mark.parametrize("accumulate", [FP16, FP32])
def test_a_shift_folded_in_natural_units(accumulate):
    """Triton's ``qk * sm_scale - m`` contracted into one FMA, then ``exp(x) =
    exp2(x fl(log2 e))``, fp16 compute: one key, logit 31,488, scale 0.53125, ``fl(m sc) =
    fl(16,728) = 16,736`` (a tie, to even), so the only weight is ``e^-8``, and ``p v``
    (``v = 2^-14``) underflows to 0: the output is 0. The floor had taken half an ulp of
    ``|m| log2 e``'s binade alone (the log2 fold's, ``e^-5.55``): 1.43x (fp16 sums) and
    1.05x outside (a review; 111x before the floor); that of ``|m|``'s binade too now."""
    f = lambda x: round_to(torch.as_tensor(x, dtype=torch.float64), FP16)  # noqa: E731
    sc = 0.53125
    q = torch.ones(1, 1, dtype=torch.float64)
    k = torch.tensor([[31488.0]], dtype=torch.float64)
    v = torch.full((1, 1), 2.0**-14, dtype=torch.float64)
    s = f(q @ k.T)
    arg = f(s * sc - f(s.amax() * sc))  # one FMA: -8 exactly
    p = f(torch.exp2(f(arg * float(f(math.log2(math.e))))))
    out = f(f(f(p * v.T).sum(-1, keepdim=True)) / f(p.sum(-1, keepdim=True)))
    assert float(arg) == -8.0 and float(out) == 0.0
    ref = reference("softmax", q, k, v, scale=sc)
    eb = attention_error_bound("softmax", q, k, v, Precision(FP16, FP16, accumulate), scale=sc)
    err = (out - ref.value).abs() - ref.radius
    assert bool((err <= eb.total).all()), float((err / eb.total).max())


@pytest.mark.parametrize("entries", [2**23, 64])
@pytest.mark.parametrize("causal", [False, True])
def test_the_states_flush_sums_match_a_direct_sum(monkeypatch, causal, entries):
    """The states' sums over the keys whose terms may fall below T_e (``Z < L``): per
    channel, sorted once (not causal) or in aligned blocks of each level (causal), against
    a direct sum over each row's keys; with few entries the finest blocks are coarse and a
    row may count up to a block of later keys, never fewer than its own."""
    import attnprec.analysis.bounds._expprod as expprod

    monkeypatch.setattr(expprod, "FLUSH_ENTRIES", entries)
    g = torch.Generator().manual_seed(1)
    B, n, C = 2, 37, 3
    Z, lw = (torch.randn(B, n, C, generator=g, dtype=torch.float64) for _ in range(2))
    vm = torch.rand(B, n, 1, generator=g, dtype=torch.float64)
    rows = torch.tensor([0, 1, 5, 16, 31, 32, 36])
    L = torch.randn(B, rows.numel(), C, generator=g, dtype=torch.float64)
    sums = expprod._flush_sums(Z, lw, vm, causal)
    S0, S1, top = expprod._flush_sums_at(sums, L, rows)
    w0 = torch.exp(lw - top)
    # the sums' own float64 roundings, in any order, and their upward rounding (gamma_2n)
    rel = 2 * (2 * n) * 2.0**-53
    floor = (2 ** (n - 1).bit_length() if causal else n) * 2.0**-1074  # per (padded) key
    f = 1 if not causal or sums[2] < 0 else 2 ** sums[2]
    for r, i in enumerate(rows.tolist()):
        for S, w in ((S0, w0), (S1, w0 * vm)):
            upto = n if not causal else min(n, -(-(i + 1) // f) * f)
            own = n if not causal else i + 1
            sel = Z[:, :upto] < L[:, r : r + 1]
            hi = torch.where(sel, w[:, :upto], 0.0).sum(1)
            lo = torch.where(Z[:, :own] < L[:, r : r + 1], w[:, :own], 0.0).sum(1)
            assert bool((S[:, r] >= lo).all()) and bool((S[:, r] <= hi * (1 + rel) + floor).all())
            if f == 1:
                assert torch.allclose(S[:, r], lo, rtol=rel, atol=floor)


@given(
    st.sampled_from(["softmax", "log"]),
    st.integers(2, 64),
    st.integers(1, 3),
    st.floats(6.0, 10.0),
    st.floats(0.0, 4.0),
    st.booleans(),
    st.integers(0, 2**31 - 1),
)
def test_flushing_kernels_within_their_bound(method, n, d, near, width, causal, seed):
    """One key at the row maximum and the rest ``near`` to ``near + width`` below it (exps
    on both sides of T_e = 2^-13 = e^-9.0), the far keys' values against the top key's:
    the flushing fp16-compute kernels above within both evaluations' sound bounds (log:
    pairs and states). The far keys may be anywhere in the sequence."""
    g = torch.Generator().manual_seed(seed)
    dist = near + width * torch.rand(n, generator=g, dtype=torch.float64)
    top = int(torch.randint(n, (1,), generator=g))
    dist[top] = 0.0
    q = torch.ones(n, d, dtype=torch.float64)
    k = round_to(-dist, FP16).unsqueeze(-1).expand(n, d)  # (log: each channel alike)
    v = torch.ones(n, 1, dtype=torch.float64)
    v[top] = -1.0
    v = round_to(v + 0.1 * torch.randn(n, 1, generator=g, dtype=torch.float64), FP16)
    fn = _softmax_flush if method == "softmax" else _log_flush
    sc = 1.0 / d if method == "softmax" else 1.0  # (softmax: the logit is d q.k)
    out = fn(q, k, v, causal=causal, scale=sc).double()
    ref = reference(method, q, k, v, causal=causal, scale=sc)
    err = (out - ref.value).abs() - ref.radius
    prec = Precision("fp16", compute="fp16", accumulate="fp32", sums="linear")
    evaluations = ["pairs", "state"] if method == "log" else ["pairs"]
    for evaluation in evaluations:
        eb = attention_error_bound(
            method, q, k, v, prec, causal=causal, scale=sc, evaluation=evaluation
        )
        # (a row whose every exp flushed is 0 / 0: unbounded, "normalizer may vanish")
        ok = torch.where(torch.isnan(err), torch.isinf(eb.total), err <= eb.total)
        assert bool(ok.all()), (evaluation, float((err / eb.total).nan_to_num().max()))


def test_a_decay_just_above_the_threshold_that_a_chunk_computes_below_it():
    """A chunk of 16 steps whose exact decay is 1.004 T_e: the kernel's fp16 span sum of
    the log-gates (within the declared argument error) is -9.0156, its exp 0.995 T_e,
    flushed, and the decayed term (k = v = 100) is lost. The test of which decays may fall
    below T_e takes each exp's argument error and its relative error (a review: the bound
    took only the float64 prefix sums' error, 10x outside; 0.84 of the bound now)."""
    n = 16
    gates = [-0.58837890625, -0.59912109375, -0.5966796875, -0.580078125, -0.587890625,
             -0.59716796875, -0.59228515625, -0.58251953125, -0.59765625, -0.583984375,
             -0.583984375, -0.583984375, -0.591796875, -0.58544921875, -0.755859375]  # fmt: skip
    lg = torch.tensor([[-0.5]] + [[x] for x in gates], dtype=torch.float64)
    q = torch.ones(n, 1, dtype=torch.float64)
    k, v = torch.zeros(n, 1, dtype=torch.float64), torch.zeros(n, 1, dtype=torch.float64)
    k[0], v[0] = 100.0, 100.0
    out = torch.zeros(n, 1, dtype=torch.float64)
    for t in range(n):  # o_t = sum_j q_t k_j exp(span sum in fp16) v_j, sums in fp32
        o = torch.zeros(1, dtype=torch.float64)
        for j in range(t + 1):
            s = torch.zeros((), dtype=torch.float64)
            for r in range(j + 1, t + 1):
                s = round_to(s + lg[r, 0], FP16)
            w = round_to(round_to(q[t, 0] * k[j, 0], FP16) * _flushed_exp(s), FP16)
            o = round_to(o + round_to(w * v[j, 0], FP16), FP32)
        out[t] = round_to(o, FP16)
    ref = reference("gated", q, k, v, log_g=lg, scale=1.0)
    err = (out - ref.value).abs() - ref.radius
    assert float(err[15, 0]) > 1.0  # the term is lost
    prec = Precision("fp16", compute="fp16", accumulate="fp32", sums="linear", block=16)
    for evaluation in ("pairs", "state"):
        eb = attention_error_bound("gated", q, k, v, prec, log_g=lg, scale=1.0,
                                   evaluation=evaluation)  # fmt: skip
        assert bool((err <= eb.total).all()), (evaluation, float((err / eb.total).max()))


@pytest.mark.parametrize("method", ["gated", "selective_scan"])
def test_a_zero_padded_prefix_leaves_the_states_bound_finite(method):
    """Every key old enough for its decay to fall below T_e has a zero value (a padded
    prefix): what those terms weigh is an empty log-sum, -inf, and the states' charge is
    0 (a review: exp(-inf + inf) made 64 rows inf with no reason named); the pairs'
    figure, which the states never go below."""
    g = torch.Generator().manual_seed(0)
    n, d = 128, 2
    q, k, v = (torch.randn(n, c, generator=g).half() for c in (d, d, 1))
    v[:64] = 0
    if method == "gated":
        kw = {"log_g": torch.full((n, d), -2.0, dtype=torch.float64), "scale": 1.0}
    else:
        kw = {"delta": torch.ones(n, 1, dtype=torch.float64),
              "A": torch.full((1, d), -2.0, dtype=torch.float64)}  # fmt: skip
    for block in (None, 16):
        prec = Precision("fp16", block=block)
        a, b = (attention_error_bound(method, q, k, v, prec, evaluation=e, **kw).total
                for e in ("pairs", "state"))  # fmt: skip
        assert bool(torch.isfinite(b).all()) and bool((b >= a * (1 - 1e-9)).all())
