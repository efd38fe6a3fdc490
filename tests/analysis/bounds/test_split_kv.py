"""Split-KV softmax (FlashAttention's split kernel, flash-decoding): each split normalized
on its own and the splits combined through their log-sum-exps held in float32. Covered by
the default declaration (``sums=None``), not by ``sums="linear"`` (docs/bounds/attention.md,
"Split-KV softmax")."""

from __future__ import annotations

import math

import pytest
import torch

from attnprec.analysis.bounds import attention_error_bound
from attnprec.analysis.precision import Precision, round_to
from attnprec.analysis.reference import reference
from attnprec.targets import precision_for


def _states(q, k, v, scale, n_split, causal=False, dtype=torch.float32):
    """Split-KV's splits in ``dtype``: per split ``m_s``, ``l_s``, ``o_s = acc_s / l_s``,
    ``lse_s = m_s + log l_s`` (``(0, -inf)`` for rows that see none of its keys)."""
    q, k, v = (x.to(dtype) for x in (q, k, v))
    s = (q @ k.T) * scale
    n = k.shape[0]
    if causal:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    edges = torch.linspace(0, n, n_split + 1).round().long().tolist()
    states = []
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        part = s[:, a:b]
        m = part.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # a split a row cannot see
        p = torch.exp(part - m)
        ell = p.sum(-1, keepdim=True)
        states.append((torch.nan_to_num((p @ v[a:b]) / ell), m + torch.log(ell)))
    return states


def _split_kv(q, k, v, scale, n_split, causal=False):
    """Float32 split-KV combined at once: ``lse = log sum_s exp(lse_s - max) + max`` and
    ``o = sum_s exp(lse_s - lse) o_s``."""
    outs, lses = zip(*_states(q, k, v, scale, n_split, causal), strict=True)
    L = torch.cat(lses, -1)
    top = L.amax(-1, keepdim=True)
    lse = torch.log(torch.exp(L - top).sum(-1, keepdim=True)) + top
    out = sum(torch.exp(L[:, i : i + 1] - lse) * o for i, o in enumerate(outs))
    return out.double()


def _merge(a, b):
    """Two float32 split states merged (FlashInfer's ``merge_state``): ``m = max``, ``w =
    exp(lse - m)``, ``o = (w_a o_a + w_b o_b) / (w_a + w_b)``, ``lse = m + log(w_a + w_b)``;
    a state no key of which the row sees passes the other through, as ``exp(-inf) = 0``
    does."""
    (oa, la), (ob, lb) = a, b
    m = torch.maximum(la, lb)
    safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    wa, wb = torch.exp(la - safe), torch.exp(lb - safe)
    s = wa + wb
    o = torch.nan_to_num((wa * oa + wb * ob) / s)
    return o, torch.where(torch.isfinite(m), safe + torch.log(s), m)


def _merge_sigmoid(a, b):
    """Two split states merged in the sigmoid form (PyTorch's context parallel, ring flash
    attention): ``o = o_a - sigmoid(lse_b - lse_a) (o_a - o_b)``, ``lse = lse_a -
    logsigmoid(lse_a - lse_b)``; an empty state passes the other through."""
    (oa, la), (ob, lb) = a, b
    both = torch.isfinite(la) & torch.isfinite(lb)
    o = oa - torch.sigmoid(lb - la) * (oa - ob)
    lse = la - torch.nn.functional.logsigmoid(la - lb)
    o = torch.where(both, o, torch.where(torch.isfinite(la), oa, ob))
    return o, torch.where(both, lse, torch.maximum(la, lb))


def _merged(q, k, v, scale, n_split, causal, order, dtype=torch.float32, form="exp"):
    """Split-KV with its states merged two at a time in ``dtype`` (``form``: FlashInfer's
    ``"exp"`` or the ``"sigmoid"`` form): a ``"chain"`` (a running state merged with each
    next split, n_split - 1 merges) or a balanced ``"tree"``."""
    states = _states(q, k, v, scale, n_split, causal, dtype)
    merge = _merge if form == "exp" else _merge_sigmoid
    if order == "chain":
        st = states[0]
        for nxt in states[1:]:
            st = merge(st, nxt)
        return st[0].double()
    while len(states) > 1:
        states = [merge(*states[i : i + 2]) if i + 1 < len(states) else states[i]
                  for i in range(0, len(states), 2)]  # fmt: skip
    return states[0][0].double()


def _inputs(seed, n, d, spread, storage):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=g, dtype=torch.float64) * spread
    k = torch.randn(n, d, generator=g, dtype=torch.float64) * spread
    v = torch.ones(n, d, dtype=torch.float64)  # y = 1 exactly: every error is the weights'
    v[:, 1:] += 0.01 * torch.randn(n, d - 1, generator=g, dtype=torch.float64)
    return (round_to(x, storage) for x in (q, k, v))


def _ratios(
    storage, spread, n_split, causal, sums, order=None, merges=None, compute="fp32", form="exp"
):
    out = []
    for seed in range(6):
        q, k, v = _inputs(seed, 64, 16, spread, storage)
        if order is None:
            y = _split_kv(q, k, v, 1.0, n_split, causal)
        else:
            dt = Precision(storage, compute=compute).compute.torch_dtype
            y = _merged(q, k, v, 1.0, n_split, causal, order, dt, form)
        y = round_to(y, storage)
        exact = reference("softmax", q, k, v, causal=causal, scale=1.0)
        prec = Precision(storage, compute=compute, sums=sums, merges=merges)
        bound = attention_error_bound("softmax", q, k, v, prec, causal=causal, scale=1.0)
        # causal rows far below the sequence's maximum are unbounded (named) under
        # block=None (a shift by it may flush them), as in the linear model
        fin = torch.isfinite(bound.total)
        assert bool(fin.any()) and bool(fin.all() or bound.unbounded)
        err = (y - exact.value).abs() + exact.radius
        # the sound level, and the probabilistic one the audit also checks
        for level in (bound.total, bound.typical.total):
            out.append(float((err[fin] / level[fin]).max()))
    return out


@pytest.mark.parametrize("storage", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("n_split", [2, 8, 64])
@pytest.mark.parametrize("causal", [False, True])
def test_split_kv_within_the_default_bound(storage, n_split, causal):
    for spread in (1.0, 8.0, 20.0):
        assert max(_ratios(storage, spread, n_split, causal, None)) <= 1.0


@pytest.mark.parametrize(("storage", "compute"), [("fp32", "fp32"), ("bf16", "fp32"),
                                                  ("fp16", "fp16")])  # fmt: skip
@pytest.mark.parametrize("n_split", [8, 32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("order", ["chain", "tree"])
@pytest.mark.parametrize("form", ["exp", "sigmoid"])
def test_merged_split_states_within_their_declaration(
    storage, compute, n_split, causal, order, form
):
    """Split states merged two at a time (``Precision.merges``: n_split - 1 for a chain,
    ceil(log2 n_split) for a tree), in either form, logits up to ~1000 (spread 8) and
    beyond (fp16 compute: up to ~60), each operation in compute."""
    merges = n_split - 1 if order == "chain" else math.ceil(math.log2(n_split))
    spreads = (0.5, 1.0, 2.0) if compute == "fp16" else (1.0, 8.0, 20.0)
    for spread in spreads:
        r = _ratios(storage, spread, n_split, causal, None, order, merges, compute, form)
        assert max(r) <= 1.0


@pytest.mark.parametrize("storage", ["fp32", "bf16"])
@pytest.mark.parametrize("causal", [False, True])
def test_merges_never_lower_the_bound(storage, causal):
    """Merges add to the one combine's model (its terms are kept): each element's bound,
    both levels, at least the one combine's."""
    q, k, v = _inputs(0, 48, 8, 1.0, storage)
    for block in (None, 16):
        one, merged = (
            attention_error_bound(
                "softmax", q, k, v, Precision(storage, block=block, merges=j), causal=causal
            )  # fmt: skip
            for j in (None, 7)
        )
        assert bool((merged.total >= one.total).all())
        assert bool((merged.typical.total >= one.typical.total).all())
        assert bool((merged.total > one.total).any())


def test_split_kv_exceeds_the_linear_model_with_large_logits():
    """Logits near 1000: each lse rounds by u |lse|, a normalizer-only error the linear
    model (one division by the summed normalizer) has no term for."""
    assert max(_ratios("fp32", 20.0, 8, False, "linear")) > 1.0


def test_declarations_of_the_sums():
    assert precision_for("torch:sdpa-flash", torch.float16, "cpu").sums == "linear"
    assert precision_for("torch:sdpa-math", torch.float16, "cpu").sums == "linear"
    assert precision_for("torch:sdpa-flash", torch.float16, "cuda").sums is None
    assert precision_for("torch:sdpa", torch.float16, "cuda").sums is None


@pytest.mark.parametrize("storage", ["fp32", "bf16"])
def test_huge_logits_keep_a_finite_bound(storage):
    """Logits near 1e8: lse's rounding (u |lse| ~ 6 in fp32) scales the combine's weights by
    up to e^6 around 1, but each weight is an exp of fl(lse_s - lse) <= 0 (the computed lse
    is >= every lse_s), so the output stays within n max|v| of 0: the bound was 1e20 or
    inf ('output in fp32') before the cap (a review's sweep)."""
    n = 16
    for seed in range(3):
        q, k, v = _inputs(seed, n, 4, 1e4, storage)
        exact = reference("softmax", q, k, v, scale=1.0)
        bound = attention_error_bound("softmax", q, k, v, Precision(storage), scale=1.0)
        assert bool(torch.isfinite(bound.total).all())
        assert float(bound.total.max()) <= 2 * n * float(v.abs().max())
        for n_split in (2, 8, 16):
            y = round_to(_split_kv(q, k, v, 1.0, n_split), storage)
            err = (y - exact.value).abs() + exact.radius
            assert bool((err <= bound.total).all())


def test_merges_whose_errors_feed_on_themselves_are_unbounded_and_named():
    """fp16 compute: a merge adds about 11 u to Theta's own coefficient, so past ~93
    merges J c_T >= 1/2 and the bound is inf, named, on the rows that may pass that many
    (a row sees nvis keys: at most nvis - 1 merges); the earlier rows stay finite."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(128, 8, generator=g, dtype=torch.float64) for _ in range(3))
    prec = Precision("fp16", compute="fp16", merges=127)
    b = attention_error_bound("softmax", q, k, v, prec, causal=True)
    named = b.unbounded["split merges in compute"]
    assert bool(named[:60].any()) is False and bool(named[-1].all())
    assert bool(torch.isinf(b.total[named]).all()) and bool(torch.isfinite(b.total[:60]).all())
    assert bool((b.total >= 0).all())


def _chain_of_one_key_splits(logits, values, fmt, rounding="rne", held=None):
    """An fp32 chain of one-key splits merged in FlashInfer's exp form, each split's output
    (its value) and each merged state held in ``fmt`` (or ``held``) rounded by ``rounding``."""

    def f32(x):
        return round_to(torch.as_tensor(x, dtype=torch.float64), "fp32")

    def hold(x, f=None):
        return round_to(torch.as_tensor(x, dtype=torch.float64), f or fmt, rounding)

    o, lse = hold(values[0]), f32(logits[0])
    for lb, vb in zip(logits[1:], values[1:], strict=True):
        m = torch.maximum(lse, f32(lb))
        wa, wb = f32(torch.exp(f32(lse - m))), f32(torch.exp(f32(lb - m)))
        s = f32(wa + wb)
        o = hold(f32(f32(f32(wa * o) + f32(wb * hold(vb))) / s), held)
        lse = f32(m + f32(torch.log(s)))
    return hold(o)


def _chain_ratio(logits, values, prec, **emulate):
    q = torch.ones(1, 1, dtype=torch.float64)
    k = torch.tensor(logits, dtype=torch.float64)[:, None]
    v = torch.tensor(values, dtype=torch.float64)[:, None]
    out = _chain_of_one_key_splits(logits, values, prec.output_format.name, **emulate)
    exact = reference("softmax", q, k, v, backend="arb")
    err = float((out - exact.value).abs() - exact.radius)
    return err / float(attention_error_bound("softmax", q, k, v, prec).total)


@pytest.mark.parametrize("J", [16, 64])
def test_merged_states_below_the_normal_range(J):
    """States on fp16's subnormal grid, each merge moving them about 0.6 of a spacing: a
    merged state's rounding is half a spacing absolute, not u relative (a review: 2.7x
    outside at J = 16, 3.3x at J = 64)."""
    h = 2.0**-24
    logits, o, lse = [0.0], 200 * h, 0.0
    for _ in range(J):
        beta = 0.6 * h / o
        lj = float(round_to(torch.tensor(lse + math.log(beta / (1 - beta))), "fp16"))
        logits.append(lj)
        wb = math.exp(lj - lse)
        o, lse = o / (1 + wb), lse + math.log1p(wb)
    values = [200 * h] + [0.0] * J
    assert _chain_ratio(logits, values, Precision("fp16", merges=J)) <= 1


@pytest.mark.parametrize("J", [8, 16, 31])
def test_merged_states_truncated(J):
    """``rounding="rtz"``: each held state truncates up to a whole ulp (a review: 1.34-1.44x
    outside when charged half an ulp)."""
    logits = [0.0] + [-10.0] * J
    values = [0.5 + J * 2.0**-8] + [0.5] * J
    assert (
        _chain_ratio(logits, values, Precision("bf16", rounding="rtz", merges=J), rounding="rtz")
        <= 1
    )


@pytest.mark.parametrize(
    ("prec", "value", "reason"),
    [
        (Precision("bf16", output="fp16", merges=1), 99840.0, "split outputs in fp16"),
        (Precision("bf16", merges=1, merge_format="fp16"), 99840.0, "merged states in fp16"),
        (Precision("bf16", merges=1, merge_format="e4m3"), 1000.0, "merged states in e4m3"),
    ],
)
def test_split_outputs_and_states_past_their_format(prec, value, reason):
    """Split outputs or merged states past their format's max overflow (an fp16 output of
    +-99840: NaN under a finite bound) or saturate (e4m3 at 448: 7.8x outside)."""
    q = torch.ones(1, 1, dtype=torch.float64)
    k = torch.zeros(2, 1, dtype=torch.float64)
    v = torch.tensor([[value], [value]], dtype=torch.float64)
    b = attention_error_bound("softmax", q, k, v, prec)
    assert math.isinf(float(b.total)) and bool(b.unbounded[reason].all())


@pytest.mark.parametrize("storage", ["bf16", "fp16"])
def test_a_combine_of_rounded_split_outputs_declares_merges(storage):
    """Each split's output rounded to the output format (an attention call per split), then
    every split combined at once in fp32: the default model keeps the split outputs in
    compute (2.45x outside it, a review); ``merges=1`` charges their rounding."""
    worst = 0.0
    for n_split in (2, 4, 8):
        for causal in (False, True):
            g = torch.Generator().manual_seed(n_split)
            q, k = (round_to(torch.randn(64, 8, generator=g, dtype=torch.float64) * 0.3, storage)
                    for _ in range(2))  # fmt: skip
            v = round_to(torch.rand(64, 8, generator=g, dtype=torch.float64) + 0.5, storage)
            st = _states(q, k, v, 1.0, n_split, causal)
            outs = [round_to(o.double(), storage).float() for o, _ in st]
            L = torch.cat([lse for _, lse in st], -1)  # float32, as the splits' lse
            top = L.amax(-1, keepdim=True)
            lse = torch.log(torch.exp(L - top).sum(-1, keepdim=True)) + top
            out = sum(torch.exp(L[:, i : i + 1] - lse) * o for i, o in enumerate(outs))
            y = round_to(out.double(), storage)
            ex = reference("softmax", q, k, v, causal=causal, scale=1.0)
            b = attention_error_bound("softmax", q, k, v, Precision(storage, merges=1),
                                      causal=causal, scale=1.0)  # fmt: skip
            worst = max(worst, float((((y - ex.value).abs() + ex.radius) / b.total).max()))
    assert worst <= 1, worst


@pytest.mark.parametrize("n", [64, 256])
def test_the_levels_worst_case_split_terms_are_charged_once(n):
    """The split-KV factors' errors, charged at their worst case W, were taken in the
    probabilistic level's variance as a bounded variable: lam W at the tail (lam ~ 7
    here), so the default declaration's level sat 17.7x (n = 64) and 34.8x (n = 256)
    above the same inputs' level under ``sums="linear"`` (no split-KV), at the sound bound
    itself at n = 64. Now W beside the tail where that is less: 5.9x and 6.3x, below
    half the sound bound (0.33 and 0.12); never below the linear sums' level. The 10x and
    the half are regression thresholds between those measured values, not bounds: the
    rule itself is tested exactly in test_quotient.py."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 16, generator=g) for _ in range(3))
    med = {}
    for sums in (None, "linear"):
        eb = attention_error_bound("softmax", q, k, v, Precision("fp32", sums=sums), causal=True)
        med[sums] = (float(eb.total.median()), float(eb.typical.total.median()))
        assert bool((eb.typical.total <= eb.total).all())
    assert med[None][1] >= med["linear"][1]
    assert med[None][1] < 10 * med["linear"][1] and med[None][1] < 0.5 * med[None][0]


@pytest.mark.parametrize("rounding", ["rne", "rtz"])
def test_each_splits_division_takes_its_sums_into_compute(rounding):
    """A split's ``o_s = acc_s / l_s`` runs in compute: fp32 sums divided in bf16 compute
    are converted first, ``(1 + u_r) / (1 - u_r)`` on the split's output and ``eta_r (1 +
    |o_s|)`` absolute (``l_s >= 1``), which the whole quotient's charge (in ``|y|``) misses
    where the splits' outputs cancel (a review). Where compute holds accumulate, nothing."""
    from attnprec.analysis.bounds.softmax import _LseForm

    one = torch.ones(1, 1, 1, dtype=torch.float64)
    nvis = torch.tensor([8.0], dtype=torch.float64)
    for comp, acc in (("bf16", "fp32"), ("fp32", "fp32")):
        prec = Precision("bf16", compute=comp, accumulate=acc, sums="log", rounding=rounding)
        lse = _LseForm(prec, one.unsqueeze(0), 0 * one.unsqueeze(0), nvis, 1)
        u_r, eta_r = prec.compute.rounding_units(rounding)
        if comp == acc:
            assert lse.lkN_s == 0.0 and lse.eta_c == 0.0
            continue
        assert lse.lkN_s >= math.log((1 + u_r) / (1 - u_r))
        lse._log_delta = lse._log_cap = torch.zeros(1, 1, 1, dtype=torch.float64)
        for l_lo, v_top in ((1.0, 0.0), (0.25, 3.0)):
            got = lse.absolute(v_top * one, l_lo * one)
            assert float(got) >= eta_r * (1 + v_top) / (l_lo * (1 - u_r) - eta_r)


@pytest.mark.parametrize("block", [None, 1])
def test_a_combines_log_of_one_may_return_below_zero(block):
    """The combine's weights were capped at ``1 + k_e`` on the claim that ``log S >= 0``
    (the largest term is ``exp(0) = 1``), but ``Elementary.log_abs`` lets a log return
    ``-4u`` at 1 (a review: 1.14x outside the default declaration's bound). One key, one
    split, fp32, each step within the default ``Elementary``: the split's ``log l_s =
    log 1`` returns ``+4u``, the combine's ``log S = log 1`` returns ``-4u``, so the
    split's weight ``exp(lse_s - lse) = exp(2^-22)`` is 4 ulps high, and ``o_s = v / 1``
    2 ulps high: ``y`` 8 ulps (16 u) above ``v``, where the bound was 14 u."""
    u = 2.0**-24
    q, k = torch.tensor([[0.75]], dtype=torch.float64), torch.tensor([[0.5]], dtype=torch.float64)
    v = torch.tensor([[1.0 + 3 * 2.0**-23]], dtype=torch.float64)
    m = 0.375  # the split's maximum, its only logit: l_s = exp(0) = 1
    o_s = float(v) + 2 * 2.0**-23  # acc / l = v / 1 within 2 ulps (div = 2)
    lse_s = m + 4 * u  # m + log(1), log within its floor of 4 u (log_abs = 4)
    lse = lse_s - 4 * u  # the combine: max lse_s + log(exp(0)) = lse_s + (-4 u)
    w = math.exp(lse_s - lse) + 4 * 2.0**-23  # exp within 4 ulps (exp = 4)
    assert lse_s == float(round_to(torch.tensor(lse_s, dtype=torch.float64), "fp32"))
    y = round_to(torch.tensor([[w * o_s]], dtype=torch.float64), "fp32")
    err = float((y - v).abs())
    assert err == 16 * u  # (the witness as described: y = 1 + 11 2^-23, v = 1 + 3 2^-23)
    b = attention_error_bound("softmax", q, k, v, Precision("fp32", block=block), scale=1.0)
    assert err <= float(b.total), (err / u, float(b.total) / u)


def _ulps(x, k):
    """``x`` rounded to float32, then moved ``k`` ulps (up for ``k > 0``)."""
    y = torch.tensor(x, dtype=torch.float32)
    for _ in range(abs(k)):
        y = torch.nextafter(y, torch.tensor(math.copysign(math.inf, k), dtype=torch.float32))
    return float(y)


def _two_splits_pushed(W, shift):
    """Row 1 of ``k = [0, 0, W]`` (causal, ``v = [1, -1, 0]``: ``y = 0``), two one-key
    splits in float32, each step at its declared error, split A pushed up and B down:
    ``exp`` 1.5 u of its argument and 4 ulps, ``o_s`` 2 ulps, ``log`` 4 ulps (4 u absolute
    at 1), the combine's exps and log 4 ulps. ``shift``: ``"own"``, each split by its own
    maximum (``exp(0) = 1``, ``log 1``); ``"wide"``, both by the sequence's maximum ``W``
    (``log l_s = -W``)."""
    u = 2.0**-24
    splits = []
    for sign in (1, -1):
        m = 0.0 if shift == "own" else W
        arg = -m
        ell = _ulps(math.exp(arg * (1 - sign * 1.5 * u)), 4 * sign) if arg else 1.0
        o_s = _ulps(sign, 2 * sign)
        lg = _ulps(math.log(ell), 4 * sign) if arg else sign * 4 * u
        splits.append((o_s, _ulps(m + lg, 0)))
    (o_a, l_a), (o_b, l_b) = splits
    w_b = _ulps(math.exp(_ulps(l_b - l_a, 0)), -4)
    lse = _ulps(l_a + _ulps(math.log(_ulps(1.0 + w_b, 0)), -4), 0)
    b_a = _ulps(math.exp(_ulps(l_a - lse, 0)), 4)
    b_b = _ulps(math.exp(_ulps(l_b - lse, 0)), -4)
    return _ulps(_ulps(b_a * o_a, 0) + _ulps(b_b * o_b, 0), 0)


@pytest.mark.parametrize("sums", [None, "log"])
def test_a_split_shifted_beyond_its_own_keys_is_not_covered(sums):
    """Split-KV's splits each shift by a maximum of their own keys (``Precision.sums``):
    ``l_s >= 1``, its log within ``[0, log n]``. A split shifted by the sequence's maximum,
    64.5 above its keys, takes ``log l_s = -64.5``, 4 ulps of which (``2^-15``) move the
    two splits' weights apart by 5.1 u per unit of the shift: such a kernel (no known
    split kernel shifts so; one that knows the sequence's maximum needs no per-split lse)
    is outside the bound (a review: 1.96x when the wide shift's model carried split-KV's
    terms, which it charged too little), while the same splits shifted by their own
    maxima stay within it."""
    W = 64.5
    q = torch.ones(3, 1, dtype=torch.float64)
    k = torch.tensor([[0.0], [0.0], [W]], dtype=torch.float64)
    v = torch.tensor([[1.0], [-1.0], [0.0]], dtype=torch.float64)
    exact = reference("softmax", q, k, v, causal=True, scale=1.0)
    assert float(exact.value[1, 0]) == 0.0
    prec = Precision("fp32", sums=sums)
    eb = attention_error_bound("softmax", q, k, v, prec, causal=True, scale=1.0)
    ratio = {s: abs(_two_splits_pushed(W, s)) / float(eb.total[1, 0]) for s in ("own", "wide")}
    assert ratio["own"] <= 1.0 < ratio["wide"], ratio
