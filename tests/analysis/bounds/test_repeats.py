"""The probabilistic level where keys repeat (padding, a repeated prompt).

A kernel repeats one rounding wherever it repeats an operation on the same operands: one
token repeated makes a sequential fp32 sum add the same term again and again, each addition
rounding by the same amount while the sum stays in one binade, so its error grows like
n u, not sqrt(n) u. The level grows by the square root of the largest number of equal keys
a row sees (``key_repeats``), never beyond the sound bound. Found by a review: correct
kernels were ATYPICAL on 5-100% of their elements on such inputs.
"""

from __future__ import annotations

import math

import pytest
import torch
from _ssm_emulate import Z  # the kernel zoo (benchmarks/_kernels_zoo.py)

from attnprec.analysis.audit import audit, audit_output
from attnprec.analysis.bounds import attention_error_bound
from attnprec.analysis.bounds._rows import Visible, _row_groups, key_repeats, logit_ties
from attnprec.analysis.precision import ONE_PASS, Precision


@pytest.mark.parametrize("n, d", [(1, 1), (7, 1), (300, 3), (2000, 16)])
def test_row_groups_partition_the_rows_as_unique_does(n, d):
    """The radix grouping gives equal rows one id and unequal rows different ids: the same
    partition as ``torch.unique(dim=0)``, on rows that repeat and rows that differ in one
    column only, in each column (a radix that skipped a column would merge them)."""
    g = torch.Generator().manual_seed(n * d)
    x = torch.randint(-2, 3, (n, d), generator=g).to(torch.float64) * 0.5
    x[n // 2 :] = x[: n - n // 2].clone()
    for c in range(min(d, n - 1)):
        x[c + 1] = x[0]
        x[c + 1, c] += 0.25
    ids = _row_groups(x)
    want = torch.unique(x, dim=0, return_inverse=True)[1]
    assert ids.shape == (n,) and int(ids.max()) == int(want.max())
    assert torch.unique(torch.stack([ids, want]), dim=1).shape[1] == int(want.max()) + 1


def test_key_repeats_counts_equal_rows_per_batch():
    k = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0], [1.0, -0.0], [2.0, 0.0]])
    k = torch.stack([k, k.clone()])
    k[1, 0, 0] = 5.0  # batch 1: its first key differs
    causal = key_repeats(k, True, 5, None).squeeze(-1)
    assert causal.tolist() == [[1, 2, 2, 3, 3], [1, 1, 1, 2, 2]]  # -0 == +0
    full = key_repeats(k, False, 3, None).squeeze(-1)
    assert full.tolist() == [[3, 3, 3], [2, 2, 2]]
    rows = key_repeats(k, True, 5, torch.tensor([0, 4])).squeeze(-1)
    assert rows.tolist() == [[1, 3], [1, 2]]
    window = key_repeats(k, Visible(True, window=2), 5, None).squeeze(-1)
    assert window.tolist() == causal.tolist()  # the prefix: an upper bound
    shown = torch.tensor([[True, False, True, False, False], [True] * 5])
    masked = key_repeats(k, Visible(False, key_mask=shown), 2, None).squeeze(-1)
    assert masked.tolist() == [[1, 1], [2, 2]]  # the hidden copies count for no row
    assert key_repeats(torch.randn(2, 50, 4), True, 50, None).eq(1).all()
    # with entries: channel 1 holds one value (0) in every key; channel 0 of batch 1 a 1
    # three times
    entries = key_repeats(k, True, 5, None, entries=True).squeeze(-1)
    assert entries.tolist() == [[1, 2, 3, 4, 5], [1, 2, 3, 4, 5]]
    assert key_repeats(torch.randn(2, 50, 4), False, 7, None, entries=True).eq(1).all()


def test_logit_ties_count_equal_logits_on_a_grid_only():
    f64 = torch.float64
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]], dtype=f64)
    k = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [2.0, -1.0]]], dtype=f64)
    # logits (1, 0, 1, 2), (0, 1, 0, -1), (1, 1, 1, 1)
    assert logit_ties(q, k, k, False, None).squeeze(-1).tolist() == [[2, 2, 4]]
    scaled = logit_ties(q / 8, k * 32, k, False, None)  # a grid of 2^2, as many values
    assert scaled is not None and scaled.squeeze(-1).tolist() == [[2, 2, 4]]
    g = torch.Generator().manual_seed(0)
    qg, kg = (torch.randn(1, 50, 8, generator=g, dtype=f64) for _ in range(2))
    assert logit_ties(qg, kg, kg, True, None) is None  # no grid of <= n^2 values
    # grids of subnormals or of 2^-600 (their product underflows): no error
    sub, one = torch.full((1, 4, 2), 1e-310, dtype=f64), torch.ones(1, 4, 2, dtype=f64)
    assert logit_ties(sub, one, one, True, None) is None  # a grid of 2^-1074: too fine
    fine = torch.full((1, 4, 2), 2.0**-600 * (1 + 2.0**-10), dtype=f64)  # grid 2^-610
    coarse = torch.full((1, 4, 2), 2.0**-470, dtype=f64)  # grids' product 2^-1080
    assert logit_ties(fine, coarse, coarse, True, None) is None  # 2^12 values > 4^2
    big = torch.full((1, 4, 2), 1e300, dtype=f64)
    assert logit_ties(big, big, big, True, None) is None  # |logits| beyond float64


def _recurrent_linear(q, k, v, causal=True, feature_map=None):
    """Plain PyTorch recurrent linear attention in fp32 (S += k v^T), one token at a time."""
    S, z, out = torch.zeros(q.shape[-1], v.shape[-1]), torch.zeros(q.shape[-1]), []
    for t in range(q.shape[-2]):
        S += k[t, :, None] * v[t, None, :]
        z += k[t]
        out.append((q[t] @ S) / (q[t] @ z))
    return torch.stack(out)


def _one_token(n, d, g):
    return (x.expand(n, d).contiguous() for x in (torch.rand(2, 1, d, generator=g).unbind(0)))


def test_repeated_token_is_not_atypical_on_a_correct_kernel():
    # before: 459 of 32,768 elements ATYPICAL (the level at 0.82 of the largest error)
    g = torch.Generator().manual_seed(0)
    q, k = _one_token(2048, 16, g)
    v = torch.randn(1, 16, generator=g).expand(2048, 16).contiguous()
    rep = audit(_recurrent_linear, "linear", q, k, v, precision=Precision("fp32"),
                causal=True, feature_map=None)  # fmt: skip
    assert rep.cases[0].counts["atypical"] == 0, rep.cases[0].counts
    assert rep.cases[0].counts["within"] == 2048 * 16


def test_log_attention_keys_of_few_values_are_not_atypical():
    # keys in {-1, 0, 1}: log attention's exp(k_jc - m_c) takes three values per channel,
    # each one rounding shared by a third of the keys. Before: 444 of 64 x 32 sampled
    # elements of the zoo's correct fp32 kernel ATYPICAL (0.88 of the error); jittered keys
    # sat at a tenth of the level
    spec = Z.correct_kernel("log", Precision("fp32"))
    q, k, v, params = Z.method_inputs("log", "ties", n=2048, d=32, dtype=torch.float32, seed=3)
    rep = audit(spec.fn, "log", q, k, v, precision=spec.precision, rows=64, **params, **spec.how)
    assert rep.cases[0].counts["atypical"] == 0, rep.cases[0].counts
    assert rep.cases[0].counts["within"] == 64 * 32


def test_softmax_logits_of_few_values_are_not_atypical():
    # q, k in {-1, 0, 1}: distinct keys share integer logits, so weights, exp roundings and
    # the sums' additions repeat. Before: these rows of the zoo's correct fp32 kernel were
    # ATYPICAL (1.08x the level)
    spec = Z.correct_kernel("softmax", Precision("fp32"))
    q, k, v, params = Z.method_inputs("softmax", "ties", n=1024, d=16, dtype=torch.float32, seed=3)
    rows = torch.tensor([47, 242, 696, 1011])
    rep = audit(spec.fn, "softmax", q, k, v, precision=spec.precision, rows=rows, **params)
    assert rep.cases[0].counts["atypical"] == 0, rep.cases[0].counts
    assert rep.cases[0].counts["within"] == 4 * 16


def _sequential_softmax(q, k, v, causal=False):
    """fp32 softmax that adds each key's weight and weighted value to running sums (a
    per-thread decode loop), the exp correctly rounded."""
    s = (q @ k.T) * q.shape[-1] ** -0.5
    p = torch.exp((s - s.amax(-1, keepdim=True)).double()).float()
    num, den = torch.zeros(q.shape[0], v.shape[1]), torch.zeros(q.shape[0], 1)
    for j in range(k.shape[0]):
        num += p[:, j : j + 1] * v[j]
        den += p[:, j : j + 1]
    return num / den


def test_weights_a_sink_absorbs_are_charged_coherently():
    # a review's find: after an attention sink (weight 1) every weight below half an ulp of
    # the running normalizer is dropped whole, one-signed: 17 elements ATYPICAL (1.8x) at
    # n = 2048, 130 (2.7x) at 4096, growing with n
    g = torch.Generator().manual_seed(0)
    n, d = 2048, 16
    q, k, v = (torch.randn(n, d, generator=g) for _ in range(3))
    sink = q.mean(0) / q.mean(0).norm()
    k[0], q = 4.0 * sink * d**0.5, q + sink
    prec = Precision("fp32", block=ONE_PASS, sums="linear")
    rep = audit_output(_sequential_softmax(q, k, v), "softmax", q, k, v, precision=prec)
    assert rep.cases[0].counts["atypical"] == 0, rep.cases[0].counts
    assert rep.cases[0].counts["within"] == n * d


def test_hidden_padding_does_not_raise_the_level():
    # a review's find: zero padding hidden by key_mask raised every row's level to the
    # sound bound (3.2-4.5x), though no row sees it
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1024, 16, generator=g) for _ in range(3))
    mask = torch.arange(1024) < 512
    zero, rand = k.clone(), k.clone()
    zero[512:] = 0.0
    b_zero, b_rand = (
        attention_error_bound("softmax", q, kk, v, Precision("fp32"), key_mask=mask)
        for kk in (zero, rand)
    )
    torch.testing.assert_close(b_zero.typical.rounding, b_rand.typical.rounding, rtol=1e-6, atol=0)
    assert (b_rand.typical.rounding < 0.5 * b_rand.rounding).all()  # (the level is not the bound)


def test_level_stays_below_the_sound_bound_and_grows_only_where_keys_repeat():
    g = torch.Generator().manual_seed(1)
    n, d = 256, 8
    q, k, v = (torch.randn(n, d, generator=g) for _ in range(3))
    prec = Precision("fp32")
    before = attention_error_bound("softmax", q, k, v, prec, causal=True)
    k2 = k.clone()
    k2[100:] = k[100]  # the keys from row 100 on repeat one key
    after = attention_error_bound("softmax", q, k2, v, prec, causal=True)
    assert (after.typical.rounding <= after.rounding).all()
    # rows before the repeats see distinct keys: their level is the model's own (up to
    # the sequence-wide terms the new keys move, as they move the sound bound: ~1e-8)
    torch.testing.assert_close(after.typical.rounding[:100], before.typical.rounding[:100],
                               rtol=1e-6, atol=0)  # fmt: skip
    late = after.typical.rounding[200:] / after.rounding[200:]
    assert late.min() > (before.typical.rounding[200:] / before.rounding[200:]).max()


def test_terms_a_channel_sum_absorbs_are_charged_coherently():
    # log attention sums each channel over the keys: after an outlier entry k_jc, the other
    # keys' terms of that channel fall below half an ulp of its sum and are dropped whole,
    # though their weights are not small. Before: the zoo's correct fp32 kernel had 32
    # elements ATYPICAL (1.45x), its variant summing in sorted order 105 (2.7x)
    q, k, v, params = Z.method_inputs("log", "outliers", n=2048, d=16, dtype=torch.float32, seed=0)
    prec = Precision("fp32")
    kernels = [Z.correct_kernel("log", prec)]
    kernels += [s for s in Z.variant_kernels("log", prec) if s.name == "sorted"]
    for spec in kernels:
        rep = audit(spec.fn, "log", q, k, v, precision=spec.precision, **params, **spec.how)
        assert rep.cases[0].counts["atypical"] == 0, (spec.name, rep.cases[0].counts)
        assert rep.cases[0].counts["within"] == 2048 * 16


@pytest.mark.parametrize("evaluation", ["pairs", "state"])
@pytest.mark.parametrize("sink", [0, 511])
def test_feature_sums_a_sink_absorbs_are_charged_coherently(evaluation, sink):
    # a review's find: linear attention whose key 0 has features of 2e7 (the others' weights
    # near u_a of the normalizer): the zoo's correct fp32 kernel and five variants had
    # 12,602 of 16,384 elements ATYPICAL each at n = 1024 (2.3x), in both evaluations (at
    # n = 512: 4,347 of 8,192); a second review: the sink last, the variant summing the
    # terms sorted by size 13,839 (at n = 512: 6,146)
    q, k, v, params = Z.method_inputs("linear", "typical", n=512, d=16, dtype=torch.float32,
                                      seed=0)  # fmt: skip
    k = k.clone()
    k[sink] = 2e7
    prec = Precision("fp32")
    kernels = [Z.correct_kernel("linear", prec)]
    kernels += [s for s in Z.variant_kernels("linear", prec) if s.name == "sorted"]
    for spec in kernels:
        rep = audit(spec.fn, "linear", q, k, v, precision=spec.precision, **params, **spec.how,
                    bound_options={"evaluation": evaluation})  # fmt: skip
        assert rep.cases[0].counts["atypical"] == 0, (spec.name, rep.cases[0].counts)
        assert rep.cases[0].counts["within"] == 512 * 16


def test_absorbable_equal_weights_as_one_sum_absorbs_them():
    # a third review: tied weights, sorted without a stable order, came back reversed, and
    # the two orders together charged every key (300 of 300); one sequential bf16 sum of 300
    # equal weights absorbs those after its 128th
    from attnprec.analysis.bounds.quotient import absorbable

    u = 2.0**-8
    p = torch.full((2, 1, 300), 1 / 300, dtype=torch.float64)
    a = absorbable(p, u, in_sequence=True)
    assert a is not None
    assert (a > 0).sum(-1).tolist() == [[172], [172]]
    assert bool((a[..., :128] == 0).all())
    assert absorbable(p[..., :100], u, in_sequence=True) is None  # (no sum reaches 128 of them)


def test_absorbed_share_from_states_is_the_pairs_share():
    # and under key masks and sliding windows (before, the featured forms formed no share
    # there: a correct fp32 state-form kernel ATYPICAL on 824 of 1,024 elements)
    from attnprec.analysis.bounds import _expprod
    from attnprec.analysis.bounds._expprod import SHARE_CHANNELS, _absorbed_share, column_groups

    g = torch.Generator().manual_seed(4)
    B, n, C, u = 2, 60, SHARE_CHANNELS + 4, 2.0**-8  # (two groups of channels)
    f64 = torch.float64
    X, Y = (
        torch.randn(B, n, C, generator=g, dtype=f64),
        3 * torch.randn(B, n, C, generator=g, dtype=f64),
    )
    shown = torch.rand(B, n, generator=g) > 0.3
    cases = [Visible(False), Visible(True), Visible(False, key_mask=shown),
             Visible(True, key_mask=shown), Visible(True, window=7),
             Visible(True, window=7, key_mask=shown), Visible(True, window=n),
             Visible(True, window=10**9), Visible(True, window=1)]  # fmt: skip
    for vis_of in cases:
        vis = torch.ones(B, n, n, dtype=torch.bool)
        if vis_of.causal:
            vis = vis.tril()
        if vis_of.window is not None:
            vis = vis.triu(1 - vis_of.window)
        if vis_of.key_mask is not None:
            vis = vis & vis_of.key_mask.unsqueeze(-2)
        Z_c = torch.einsum("bij,bjc->bic", vis.double(), Y.exp())  # each row's channel sums
        small = (Y.exp().unsqueeze(1) <= 2 * u * Z_c.unsqueeze(2)) & vis[..., None]
        t = torch.exp(X.unsqueeze(2) + Y.unsqueeze(1))  # [B, i, j, C]
        W = torch.where(vis[..., None], t, 0.0).sum((2, 3))
        want = torch.where(small, t, 0.0).sum((2, 3)) / W
        assert bool(want.gt(0).any()) == (vis_of.window != 1)  # (one key: its own sum)
        plain = vis_of.window is None and vis_of.key_mask is None
        causal = vis_of.causal if plain else vis_of
        got = _absorbed_share(column_groups(X, Y), causal, None, u)
        torch.testing.assert_close(got, want, rtol=1e-7, atol=0)
        assert bool((got >= want).all())
        rows = torch.tensor([0, 7, 59])
        part = _absorbed_share(column_groups(X[:, rows], Y), causal, rows, u)
        torch.testing.assert_close(part, got[:, rows], rtol=1e-12, atol=0)
    with pytest.MonkeyPatch.context() as mp:  # windows' rows one block at a time
        mp.setattr(_expprod, "SHARE_ELEMENTS", 1)
        small = _absorbed_share(column_groups(X, Y), cases[5], None, u)
    big = _absorbed_share(column_groups(X, Y), cases[5], None, u)
    torch.testing.assert_close(small, big, rtol=1e-12, atol=0)


def test_absorbed_terms_of_rows_before_a_far_later_key_are_kept():
    # a review's find: the pair evaluation shifted a block's channel sums by the largest
    # exponent of every key it holds, later keys of a causal block included; one key 800
    # above made the earlier rows' sums underflow and their absorbed charge vanish (row 30's
    # level 7.8e-6 -> 1.4e-6; a correct online fp32 kernel then 42 elements ATYPICAL)
    import math

    from attnprec.analysis.bounds import log as log_bounds

    n, d = 64, 4
    P = Precision("fp32", sums="linear", block=8)
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, n, d, generator=g, dtype=torch.float64) for _ in range(2))
    k[0, 0, 0] = 20.0
    k[0, 1:, 0] = 20.0 + math.log(2 * P.accumulate.u) - 0.3  # absorbable after key 0
    v = torch.randn(1, n, 3, generator=g, dtype=torch.float64)
    far = k.clone()
    far[0, -1, 0] = 800.0
    a, b = (log_bounds.log_rounding(q, kk, v, P, 1.0, True, 3.0)["typical"] for kk in (k, far))
    torch.testing.assert_close(b[:, :40], a[:, :40], rtol=1e-9, atol=0)


def _state_form(phi, psi, v, seen=None):
    """fp32 linear attention of features in its state form: per key ``S += psi v^T``, ``z
    += psi`` (products and sums rounded to fp32, keys in order) into the state of each row
    that sees the key (``seen [rows, keys]``; None: causal), each row's ``phi . S / phi .
    z``."""
    r32 = lambda x: x.float().double()  # noqa: E731
    n, F, dv = psi.shape[0], psi.shape[-1], v.shape[-1]
    seen = torch.ones(n, n, dtype=torch.bool).tril() if seen is None else seen
    S, z = torch.zeros(n, F, dv, dtype=torch.float64), torch.zeros(n, F, dtype=torch.float64)
    for j in range(n):
        at = seen[:, j]
        S[at] = r32(S[at] + r32(psi[j, :, None] * v[j]))
        z[at] = r32(z[at] + psi[j])
    num, den = torch.zeros(n, dv, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for f in range(F):
        num, den = r32(num + r32(phi[:, f, None] * S[:, f])), r32(den + r32(phi[:, f] * z[:, f]))
    return r32(num / den[:, None])


@pytest.mark.parametrize(
    "evaluation, seen",
    [("pairs", None), ("state", None), ("pairs", "key_mask"), ("pairs", "window"),
     ("pairs", "negative_padding")],
)  # fmt: skip
def test_terms_a_feature_sum_absorbs_are_charged(evaluation, seen):
    # a review: polynomial (1, 1) whose key 0 holds 4096 in channel 0, every later key
    # 0.45 u of it there, so that each later key's channel-0 term drowns in that feature's
    # state sum while its weight (the sink's about half the normalizer) does not: the
    # correct fp32 state-form kernel was ATYPICAL on every element (5.8x the level at
    # n = 1024), in both evaluations; the weights' absorbed charge does not see it. Under
    # a key mask or a sliding window (a second sink where the first has left it) the same,
    # 824 and 325 of 1,024 elements, until the share was formed there too; and a negative
    # padding key took the feature from every row's charge (824), its sign test then
    # over every key of the sequence, not those each row sees
    g = torch.Generator().manual_seed(0)
    n, d, dv, K = 256, 8, 4, 2.0**12
    s = 1 / math.sqrt(d)
    r32 = lambda x: x.float().double()  # noqa: E731
    q = r32(0.1 * torch.randn(n, d, generator=g, dtype=torch.float64))
    k = r32(0.5 * torch.rand(n, d, generator=g, dtype=torch.float64) + 0.25)
    k[:, 0], k[0, 0] = r32(torch.full((n,), K * 0.45 * 2.0**-24)), K
    q[:, 0] = r32((1.5 * torch.rand(n, generator=g, dtype=torch.float64) + 0.5) * n / (s * K))
    v = r32(0.2 * torch.rand(n, dv, generator=g, dtype=torch.float64) + 0.9)
    v[0] = -1.0
    phi = torch.cat([torch.ones(n, 1, dtype=torch.float64), r32(q * r32(torch.tensor(s)))], -1)
    vis, kw = torch.ones(n, n, dtype=torch.bool).tril(), {}
    if seen in ("key_mask", "negative_padding"):
        kw["key_mask"] = torch.ones(1, n, dtype=torch.bool)
        kw["key_mask"][0, [7, 100]] = False
        vis = vis & kw["key_mask"]
        if seen == "negative_padding":
            k[7, 0] = -1.0
    elif seen == "window":
        kw["window"] = 128
        vis = vis.triu(1 - 128)
        k[128, 0] = K
    psi = torch.cat([torch.ones(n, 1, dtype=torch.float64), k], -1)
    y = _state_form(phi, psi, v, vis)
    prec = Precision("fp32", sums="linear")
    rep = audit_output(y.float()[None], "polynomial", *(x.float()[None] for x in (q, k, v)),
                       precision=prec, scale=s, coeffs=(1.0, 1.0), causal=True,
                       bound_options={"evaluation": evaluation}, **kw)  # fmt: skip
    assert rep.cases[0].counts["atypical"] == 0, rep.cases[0].counts
    assert rep.cases[0].counts["within"] == n * dv
