"""Every model flags the intermediates a declared kernel may overflow, naming them: an
element whose kernel output may be inf or NaN while the exact value is finite is unbounded,
never given a finite bound. Loads into a narrower compute format and the feature products
were missing from the featured (taylor, polynomial, linear), log / FAVOR+ and gated models."""

from __future__ import annotations

import math

import pytest
import torch
from _method_params import METHOD_PARAMS

from attnprec.analysis.bounds import attention_error_bound
from attnprec.analysis.precision import ONE_PASS, Precision, round_to
from attnprec.attention import SoftMaxPlus, favor_projection

F64 = torch.float64
PARAMS = {
    **METHOD_PARAMS,
    "gated": {"log_g": -0.1 * torch.ones(6)},
    "favor": {"projection": favor_projection(8, 2, generator=torch.Generator().manual_seed(0))},
}


@pytest.mark.parametrize("method", sorted(PARAMS))
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_load_past_compute_is_unbounded(method, which):
    """fp32 storage, fp16 compute: one entry of 7e4 (> 65504) overflows on loading. The
    rows that may load it (the row itself for q; every row for k, v, as a kernel may load
    masked keys too: test_a_masked_key_or_value_that_overflows_on_load) are unbounded
    under 'load into fp16'; the other rows of a query are not affected."""
    g = torch.Generator().manual_seed(1)
    x = {n: 0.5 * torch.randn(6, 2, generator=g, dtype=F64) for n in "qkv"}
    if method == "linear":
        x["q"], x["k"] = x["q"].abs() + 0.1, x["k"].abs() + 0.1
    x[which][3, 0] = 7e4
    prec = Precision("fp32", "fp16", "fp32")
    eb = attention_error_bound(method, x["q"], x["k"], x["v"], prec, causal=True, **PARAMS[method])
    hit = eb.unbounded["load into fp16"]
    rows = [3] if which == "q" else [0, 1, 2, 3, 4, 5]
    assert bool(hit[rows].all()) and (which != "q" or not bool(hit[:3].any()))
    assert bool(torch.isinf(eb.total[rows]).all())


def test_taylor_features_past_compute_are_unbounded():
    """Degree 2 in fp16 compute: a key of 300 has the feature 300^2 = 9e4 > 65504 (the
    kernel's state becomes inf, its output NaN; the bound was finite, 0.22)."""
    q = torch.tensor([[0.001]], dtype=F64)
    k = torch.tensor([[300.0], [-300.0]], dtype=F64)
    v = torch.tensor([[1.0], [0.5]], dtype=F64)
    eb = attention_error_bound("taylor", q, k, v, Precision("fp16", "fp16", "fp32"), degree=2)
    assert bool(eb.unbounded["features in fp16"].all()) and bool(torch.isinf(eb.total).all())
    # the query side: X = 400, X^2 = 1.6e5
    q, k = torch.tensor([[400.0]], dtype=F64), torch.tensor([[0.001], [-0.002]], dtype=F64)
    eb = attention_error_bound("taylor", q, k, v, Precision("fp16", "fp16", "fp32"), degree=2)
    assert bool(eb.unbounded["features in fp16"].all())


@pytest.mark.parametrize("evaluation", ["pairs", "state"])
def test_polynomial_coefficient_past_compute_is_unbounded(evaluation):
    """c_2 = 1e5 with scale 1e-3: a kernel that scales q first and multiplies by the
    coefficient last holds fl16(1e5) = inf, its output NaN; the bound was finite (0.006),
    checking only c_2 scale^2 2! = 0.2 (a review)."""
    q = torch.tensor([[10.0]], dtype=F64)
    k = torch.tensor([[10.0], [0.0]], dtype=F64)
    v = torch.tensor([[1.0], [0.0]], dtype=F64)
    assert not bool(torch.isfinite(_f16(torch.tensor(1e5))))
    prec = Precision("fp16", "fp16", "fp32")
    kw = dict(coeffs=(1.0, 0.0, 1e5), scale=1e-3, evaluation=evaluation)
    eb = attention_error_bound("polynomial", q, k, v, prec, **kw)
    assert bool(eb.unbounded["features in fp16"].all()) and bool(torch.isinf(eb.rounding).all())


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()  # a product rounded to fp16 (inf past its range)


@pytest.mark.parametrize("evaluation", ["pairs", "state"])
def test_products_in_the_narrower_of_compute_and_accumulate(evaluation):
    """Products round in compute or accumulate, whichever the kernel picks: with fp16
    compute and fp32 sums, a linear-attention kernel of states (S = sum_j k_j v_j, Z = sum_j
    k_j in fp32, then q S and q Z rounded to fp16) overflows at q Z = 180,000, and a
    log-space one at exp(t) S_c = 120,000 (found by a review: both bounds were finite, with
    no reason, while these kernels returned 0 and inf). Unbounded under the products'
    reason; with fp32 compute the same inputs are bounded."""
    P = Precision("fp16", compute="fp16", output="fp32", sums="linear")
    P32 = Precision("fp16", output="fp32", sums="linear")
    # linear: the kernel's normalizer product overflows, its output is 180 / inf = 0
    q = k = torch.full((2, 1), 300.0, dtype=F64)
    v = torch.full((2, 1), 1e-3, dtype=F64).half().double()
    qf, kf, vf = q.float(), k.float(), v.float()
    y = _f16(_f16(qf[0] * _f16(kf * vf).sum(0)) / _f16(qf[0] * kf.sum(0)))
    assert float(y) == 0.0  # the exact output is 1e-3
    eb = attention_error_bound("linear", q, k, v, P, evaluation=evaluation, feature_map=None)
    assert bool(eb.unbounded["feature products in fp16"].all())
    assert bool(torch.isinf(eb.total).all())
    eb32 = attention_error_bound("linear", q, k, v, P32, feature_map=None)
    assert bool(torch.isfinite(eb32.total).all())
    # linear, the numerator's product alone (causal: q S = (i + 1) 1000 at row i; each w v is
    # 1000, q Z = i + 1): flagged where it may reach fp16's overflow threshold 65520 (row 65
    # on), not before (a margin of 4 flagged it from row 16, and left fp16-accumulated linear
    # attention of ordinary features unbounded on every element at n = 1024)
    q = k = torch.ones(100, 1, dtype=F64)
    v = torch.full((100, 1), 1000.0, dtype=F64)
    eb = attention_error_bound(
        "linear", q, k, v, P, causal=True, evaluation=evaluation, feature_map=None
    )
    hit = eb.unbounded["feature products in fp16"][:, 0]
    assert bool(hit[65:].all()) and not bool(hit[:65].any())
    # log: exp(t) S overflows (S = 4 x 30,000 in fp32), the kernel returns inf
    q = k = torch.zeros(4, 1, dtype=F64)
    v = torch.full((4, 1), 30000.0, dtype=F64)
    assert bool(torch.isinf(_f16(torch.ones(1) * v.float().sum(0))).all())
    eb = attention_error_bound("log", q, k, v, P, evaluation=evaluation)
    assert bool(eb.unbounded["products in fp16"].all())
    assert bool(torch.isinf(eb.total).all())
    eb32 = attention_error_bound("log", q, k, v, P32, evaluation=evaluation)
    assert bool(torch.isfinite(eb32.total).all())


@pytest.mark.parametrize("method", ["softmax", "taylor"])
def test_weight_times_value_products_in_the_narrower_format(method):
    """A weight times a value is a product too: fp16 compute, values stored in fp32 near
    fp16's largest and weights that may reach 1 + k_e (softmax's exps, k_e ulps off) or
    1 + s + s^2 / 2 (taylor's scores at s = 0.5: 1.6): w v may pass 65504 although every
    sum is held in fp32. With values of 1000 neither is flagged."""
    q = k = torch.full((3, 1), 1.0, dtype=F64) * (2.0 if method == "taylor" else 1.0)
    v = torch.full((3, 1), 65500.0 if method == "softmax" else 60000.0, dtype=F64)
    P = Precision("fp32", compute="fp16", sums="linear")
    kw = {"degree": 2, "form": "scores", "scale": 0.125} if method == "taylor" else {}
    eb = attention_error_bound(method, q, k, v, P, **kw)
    assert any(r.startswith("products w v in fp16") for r in eb.unbounded), eb.unbounded
    assert bool(torch.isinf(eb.total).all())
    eb = attention_error_bound(method, q, k, v / v * 1000, P, **kw)
    assert not eb.unbounded and bool(torch.isfinite(eb.total).all())


def _ssm_case(name: str):
    """(method, q, k, v, keywords, kernel or None) where an intermediate of a declared
    state-space kernel overflows while the exact output is finite (found by a review; every
    bound was finite with no reason). fp32 cases run the library's own kernels."""
    from attnprec.attention import selective_scan_attention, ssd_attention

    f32 = torch.float32
    one = lambda *s: torch.ones(*s, dtype=F64)  # noqa: E731
    if name == "query x state":  # C h = 2 x 40,000 in fp16 (every state fits)
        return ("selective_scan", torch.tensor([[2.0, -2.0]], dtype=F64), 200 * one(1, 2),
                200 * one(1, 1), {"delta": one(1, 1), "A": -one(1, 2)}, None)  # fmt: skip
    if name == "skip":  # D u = 300 x 250 in fp16 (the states' sum cancels it exactly)
        return ("selective_scan", -one(1, 2), 150 * one(1, 2), 250 * one(1, 1),
                {"delta": one(1, 1), "A": -one(1, 2), "D": 300 * one(1)}, None)  # fmt: skip
    if name == "computed key":  # delta B = 1e40 in fp32, C and u tiny: the output is O(1)
        kw = {"delta": torch.full((2, 1), 1e20, dtype=f32), "A": torch.tensor([[-1e-30]])}
        q, v = torch.full((2, 1), 1e-20, dtype=f32), torch.full((2, 1), 1e-20, dtype=f32)
        return ("selective_scan", q, torch.full((2, 1), 1e20, dtype=f32), v, kw,
                selective_scan_attention)  # fmt: skip
    if name == "raw scores":  # Mamba-2's C.B before dt: 2 x 40,000 in fp16, each product fits
        c = torch.full((2, 2), 200.0, dtype=F64)
        assert bool(torch.isinf(_f16(_f16(c[0, 0] * c[0, 0]) * 2)))  # the sum, rounded
        kw = {"dt": torch.full((2,), 2.0**-10, dtype=F64), "A": torch.tensor(-1.0)}
        return ("ssd", c, c, torch.full((2, 1), 2.0**-10, dtype=F64), kw, None)
    assert name == "score sums"  # sum over N = 4 of C B = 1e38 each, in fp32
    kw = {"dt": torch.ones(2, dtype=f32), "A": torch.tensor(-1.0)}
    q = k = torch.full((2, 4), 1e19, dtype=f32)
    return ("ssd", q, k, torch.full((2, 1), 1e-30, dtype=f32), kw,
            lambda *a, **k: ssd_attention(*a, form="quadratic", **k))  # fmt: skip


@pytest.mark.parametrize("evaluation", ["pairs", "state"])
@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("query x state", "products q.state in fp16"),
        ("skip", "skip product in fp16"),
        ("computed key", "computed keys in fp32"),
        ("raw scores", "computed keys in fp16"),
        ("score sums", "score sums q.k in fp32"),
    ],
)
def test_state_space_intermediates_that_overflow(name, reason, evaluation):
    """A query times a state, the skip D u, a computed key (delta B), Mamba-2's raw scores
    C.B (summed over the states before dt; a review: each product within fp16, the sum
    past it, the bound finite) and the chunked form's score sums are each checked against
    their format's range (products: the narrower of compute and accumulate): the elements
    are unbounded under that reason; where the library's own fp32 kernel runs, it does
    return a non-finite output."""
    method, q, k, v, kw, kernel = _ssm_case(name)
    P = Precision("fp16", compute="fp16") if kernel is None else Precision("fp32")
    eb = attention_error_bound(method, q, k, v, P, evaluation=evaluation, **kw)
    assert bool(eb.unbounded[reason].any()), eb.unbounded
    assert bool(torch.isinf(eb.total[eb.unbounded[reason]]).all())
    if kernel is not None:
        assert not bool(torch.isfinite(kernel(q, k, v, **kw)).all())


def test_ssm_fft_transforms_that_overflow():
    """ssm's FFT form: rfft(u) of u = 1e38 (fp32) overflows though the recurrent form's
    output is finite: the FFT form's elements are unbounded, the recurrent form's not."""
    from attnprec.attention import ssm_attention

    T = 8
    q, k = torch.full((T, 1), 1e-15), torch.full((T, 1), 1e-15)
    v = torch.full((T, 1), 1e38)
    kw = {"A": torch.tensor([[-1.0]]), "dt": torch.tensor([1.0])}
    assert not bool(torch.isfinite(ssm_attention(q, k, v, form="fft", **kw)).all())
    eb = attention_error_bound("ssm", q, k, v, "fp32", form="fft", **kw)
    assert bool(eb.unbounded["FFT transforms in fp32"].all())
    assert bool(torch.isinf(eb.total).all())
    eb = attention_error_bound("ssm", q, k, v, "fp32", form="recurrent", **kw)
    assert not eb.unbounded and bool(torch.isfinite(eb.total).all())


def test_huge_log_gates_in_state_evaluation():
    """delta A = -1e40 (float64 exps of the gates' sums overflow): the state evaluation's
    bound is infinite, as the pair evaluation's, instead of an OverflowError."""
    f32 = torch.float32
    x = torch.ones(1, 1, dtype=f32)
    kw = {"delta": torch.full((1, 1), 1e20, dtype=f32), "A": torch.full((1, 1), -1e20)}
    for evaluation in ("pairs", "state"):
        eb = attention_error_bound("selective_scan", x, x, x, "fp32", evaluation=evaluation, **kw)
        assert bool(torch.isinf(eb.total).all())


@pytest.mark.parametrize("method", ["selective_scan", "ssd"])
def test_state_space_operand_products_that_overflow(method):
    """A kernel may form B u before delta (or dt): B = u = 1e20 overflow fp32 there although
    the key delta B = 1 does not; the rows that see that key are unbounded (computed keys),
    the rows before it are not."""
    T = 3
    q, k, v = torch.ones(T, 1), torch.ones(T, 1), torch.ones(T, 1)
    k[1], v[1] = 1e20, 1e20
    if method == "selective_scan":
        d = torch.ones(T, 1)
        d[1] = 1e-20
        kw = {"delta": d, "A": -torch.ones(1, 1)}
    else:
        d = torch.ones(T)
        d[1] = 1e-20
        kw = {"dt": d, "A": torch.tensor(-1.0)}
    for evaluation in ("pairs", "state"):
        eb = attention_error_bound(method, q, k, v, "fp32", evaluation=evaluation, **kw)
        hit = eb.unbounded["computed keys in fp32"].any(-1)
        assert hit.tolist() == [False, True, True], evaluation


def test_elements_unbounded_for_another_reason_are_not_called_output_overflows():
    """Log attention with 16-bit log-space sums at n = 32: every element is unbounded by the
    log-sums' magnitude check, and was named 'output in fp16' too (its infinite error read
    as an output that overflows; a review); values of 1 cannot overflow fp16."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(32, 16, generator=g, dtype=F64).half().double() for _ in range(2))
    v = torch.ones(32, 16, dtype=F64)
    eb = attention_error_bound("log", q, k, v, Precision("fp16", "fp16", "fp16"))
    named = {key for key, m in eb.unbounded.items() if bool(m.any())}
    assert "log-space sums in fp16" in named and bool(torch.isinf(eb.total).all())
    assert not any(key.startswith("output") for key in named), named


@pytest.mark.parametrize("method", ["softmax", "semiring"])
@pytest.mark.parametrize("accumulate", ["fp16", "fp32"])
def test_logits_past_compute_are_unbounded(method, accumulate):
    """d = 16, every entry of q and k 64: q.k = 65,536 > 65,504 in fp16 compute, the
    kernel's logits inf and its output NaN (plain ``softmax(q @ k.T * s) @ v`` on fp16
    tensors). The check read the hull's slack factor (~1e-2) where the loads' factor (~1)
    belonged, a name reused in between, and flagged only from ~250x past the overflow
    (the bound was finite, ~4.6; a review's find). At 63 (q.k = 63,504) no logit
    overflows: softmax's rows are bounded, and a semiring's (SoftMaxPlus(0.5): term
    exponents ``2 s``, 31,752) may vanish, named: a kernel that folds log2(e) and its shift
    into one FMA rounds ``m log2 e`` near 45,800 in fp16 by up to 16, so its largest weight
    may be ``2^-16``, below fp16's normal range, and a flushing exp returns 0 for every key
    (its hull had taken that weight as 1); any weight may reach ``2^16`` too, and its
    products overflow fp16 (named)."""
    v = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    prec = Precision("fp16", "fp16", accumulate)
    for entry, over in ((64.0, True), (63.0, False)):
        q = torch.full((4, 16), entry, dtype=F64)
        eb = attention_error_bound(method, q, q, v, prec, **PARAMS[method])
        hit = eb.unbounded.get("logits q.k in fp16", torch.zeros_like(eb.total, dtype=bool))
        assert bool(hit.all()) == over and bool(hit.any()) == over
        if over or method == "softmax":
            assert bool(torch.isinf(eb.total).all()) == over
        else:
            assert bool(eb.unbounded["normalizer may vanish"].all()), set(eb.unbounded)


@pytest.mark.parametrize("evaluation", ["pairs", "state"])
def test_a_coefficient_past_float64_squares_is_unbounded(evaluation):
    """c_1 = 1e300: past every compute format, so unbounded with the features named (the
    variance's ``c_p ** 2`` raised a bare ``OverflowError`` that named nothing)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, 3, generator=g, dtype=F64) for _ in range(3))
    eb = attention_error_bound(
        "polynomial", q, k, v, Precision("fp32"), coeffs=(1.0, 1e300), evaluation=evaluation
    )
    assert bool(eb.unbounded["features in fp32"].all()) and bool(torch.isinf(eb.total).all())


def _h(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=F64).half().double()  # rounded to fp16 (inf past it)


def _softmax_case(name: str):
    """(method, q, k, v, precision, keywords, the intermediate a conforming kernel forms,
    reason): each intermediate overflows fp16 while the exact output is finite (a review:
    every bound was finite, the kernels' outputs NaN or inf)."""
    from attnprec.analysis.precision import quantize
    from attnprec.attention import SoftMaxPlus

    P16 = Precision("fp16", compute="fp16")
    if name == "scaled q":  # fl(1024 q) = 102,400, the logits about 100
        q = torch.tensor([[100.0, 1.0]], dtype=F64)
        k = torch.tensor([[1e-3, 0.5], [0.0, 0.0]], dtype=F64).half().double()
        v = torch.tensor([[1.0], [2.0]], dtype=F64)
        return "softmax", q, k, v, P16, {"scale": 1024.0}, _h(1024 * q), "logits q.k in fp16"
    if name in ("tiny cap", "huge cap"):  # fl(1 / cap) or fl(cap) is inf: 0 inf = NaN
        cap = 1e-5 if name == "tiny cap" else 1e5
        q, k = torch.zeros(1, 2, dtype=F64), torch.ones(2, 2, dtype=F64)
        v = torch.tensor([[1.0], [-1.0]], dtype=F64)
        kw = {"scale": 1.0, "softcap": cap}
        return "softmax", q, k, v, P16, kw, _h(max(cap, 1 / cap)), "soft-cap constants in fp16"
    if name == "term exponents":  # lam s = 1024 x 64 = 65,536
        q, k = torch.tensor([[8.0]], dtype=F64), torch.tensor([[8.0], [0.0]], dtype=F64)
        v = torch.tensor([[1.0], [0.5]], dtype=F64)
        kw = {"semiring": SoftMaxPlus(tau=1 / 1024), "scale": 1.0}
        return ("semiring", q, k, v, P16, kw, _h(1024 * 64.0),
                "term exponents lam s + log c in fp16")  # fmt: skip
    if name == "weights scale":  # the cast weight 256 (w = 1) times v = 300
        P = Precision("fp16", compute="fp16", weights="e4m3", weights_scale=256.0)
        q, k = torch.ones(1, 1, dtype=F64), torch.tensor([[2.0], [0.0]], dtype=F64)
        v = torch.tensor([[300.0], [-300.0]], dtype=F64)
        return "softmax", q, k, v, P, {"scale": 1.0}, _h(256 * 300.0), "products w v in fp16"
    P8 = Precision("e4m3", compute="fp16", scaling="tensor", output="fp16")
    if name == "code products":  # e4m3 codes of 448 each: their product 200,704
        q = torch.tensor([[10.0, 1.0]], dtype=F64)
        k = torch.tensor([[10.0, 1.0], [-1.0, 0.5]], dtype=F64)
        v = torch.tensor([[1.0], [-1.0]], dtype=F64)
        qc, kc = quantize(q, "e4m3")[0], quantize(k, "e4m3")[0]
        return ("softmax", q, k, v, P8, {"scale": 0.5}, _h(qc[0, 0] * kc[0, 0]),
                "logits q.k in fp16")  # fmt: skip
    assert name == "value codes"  # 200 weights of 1 times the code 448 of v = 1e-3
    P8 = Precision("e4m3", compute="fp16", accumulate="fp16", scaling="tensor", output="fp16")
    q, k = torch.zeros(1, 1, dtype=F64), torch.zeros(200, 1, dtype=F64)
    v = torch.full((200, 1), 1e-3, dtype=F64)
    vc = quantize(v, "e4m3")[0]
    return ("softmax", q, k, v, P8, {"scale": 1.0}, _h(200 * vc[0, 0]),
            "numerator sum w v in fp16")  # fmt: skip


@pytest.mark.parametrize(
    "name",
    ["scaled q", "tiny cap", "huge cap", "term exponents", "weights scale", "code products",
     "value codes"],
)  # fmt: skip
def test_softmax_intermediates_that_overflow(name):
    """The scaled query (the scale on q), the soft-cap's constants, a semiring term's
    exponent, a weight times weights_scale times a value, the FP8 codes' products and the
    value codes' sums are each checked in their format: unbounded under that reason."""
    method, q, k, v, P, kw, intermediate, reason = _softmax_case(name)
    assert not bool(torch.isfinite(intermediate).all())
    eb = attention_error_bound(method, q, k, v, P, **kw)
    assert bool(eb.unbounded[reason].all()), eb.unbounded
    assert bool(torch.isinf(eb.total).all())


DIVISION_CASES = [
    ("softmax", {}, "pairs"),
    ("taylor", {"degree": 2, "form": "scores"}, "pairs"),
    ("taylor", {"degree": 2}, "pairs"),
    ("taylor", {"degree": 2}, "state"),
    ("linear", {"feature_map": None}, "pairs"),
    ("linear", {"feature_map": None}, "state"),
    ("log", {}, "pairs"),
    ("log", {}, "state"),
]


@pytest.mark.parametrize(("method", "kw", "evaluation"), DIVISION_CASES)
def test_division_operands_in_a_narrower_compute(method, kw, evaluation):
    """The division runs in compute (Precision: "divisions"): with fp16 compute and fp32
    sums, two keys of weight 1 and values of 40,000 give a numerator of 80,000, which the
    division takes into fp16 as inf (a review: the bound was finite, 353). Unbounded under
    the division's reason; with values of 20,000 (a numerator of 40,000) bounded."""
    P = Precision("fp32", compute="fp16", sums="linear")
    q = k = torch.ones(2, 1, dtype=F64) * (0.0 if method in ("softmax", "log") else 1.0)
    if method == "taylor":
        q = k = torch.zeros(2, 1, dtype=F64)  # every score 0: weights c_0 = 1
    v = torch.full((2, 1), 40000.0, dtype=F64)
    assert bool(torch.isinf(_h(v.sum(0))).all())  # N as the division takes it
    eb = attention_error_bound(method, q, k, v, P, evaluation=evaluation, **kw)
    assert bool(eb.unbounded["division N / D in fp16"].all()), eb.unbounded
    assert bool(torch.isinf(eb.total).all())
    eb = attention_error_bound(method, q, k, v / 2, P, evaluation=evaluation, **kw)
    assert not eb.unbounded and bool(torch.isfinite(eb.total).all()), eb.unbounded


def test_division_of_a_split_in_its_own_units():
    """Split-KV (``sums`` None or "log") divides each split in compute, in the split's own
    units: 69,999 near-equal keys after one key 5 above them sum to 69,999 there, past
    fp16, though the row's normalizer in its own units is 470 (a review: the bound 0.044,
    an emulated two-split kernel 11x outside it). With one division (``sums="linear"``)
    the same row is bounded."""
    n = 70000
    q = torch.zeros(1, 16, dtype=F64)
    q[0, 0] = 4.0
    k = torch.zeros(n, 16, dtype=F64)
    k[0, 0] = 5.0
    v = torch.full((n, 1), 0.5, dtype=F64)
    for sums in (None, "log"):
        P = Precision("fp16", compute="fp16", block=ONE_PASS, sums=sums)
        eb = attention_error_bound("softmax", q, k, v, P)
        assert bool(eb.unbounded["division N / D in fp16"].all()), sums
    P = Precision("fp16", compute="fp16", block=ONE_PASS, sums="linear")
    eb = attention_error_bound("softmax", q, k, v, P)
    assert not eb.unbounded and bool(torch.isfinite(eb.total).all())


def test_log_state_division_in_the_states_units():
    """The state evaluation's normalizer in the kernel's units is taken from the states'
    own unit, the scan chunk's maximum: a later key of the row's chunk raised by 2 made it
    e^2 too small there (a review: the pairs named the division of D = 80,016 in fp16, the
    states gave a finite bound)."""
    n, d, i = 2048, 64, 1100
    k = torch.zeros(1, n, d, dtype=F64)
    k[0, i + 1] = 2.0  # a later key of the same chunk
    q, v = torch.zeros(1, n, d, dtype=F64), torch.ones(1, n, 2, dtype=F64)
    assert (i + 1) * d >= 65520  # the kernel's normalizer: every visible term exp(0)
    P = Precision("fp16", compute="fp16", sums="linear", block=ONE_PASS)
    for evaluation in ("pairs", "state"):
        eb = attention_error_bound("log", q, k, v, P, causal=True, rows=[i], evaluation=evaluation)
        assert bool(eb.unbounded["division N / D in fp16"].all()), evaluation


def test_feature_checks_take_each_term_path_roundings():
    """A power-2 polynomial term under fp16 compute with loads that round and a scale fp16
    does not hold passes 13 roundings, not the 2 top + 4 = 8 the checks took: a kernel
    whose every operand sits just above an fp16 midpoint grows its terms by 0.6%, and its
    fp32 normalizer 65,522 overflows the division in fp16 (a review: a NaN output under a
    finite bound of 0.0095, in both evaluations)."""

    def above_mid16(x: float) -> float:  # rounds up to x in fp16
        ulp = 2.0 ** (math.floor(math.log2(x)) - 10)
        return float(torch.tensor(x - ulp / 2 + ulp / 2**12, dtype=torch.float32))

    qt, st, ct, kt = 8.1171875 / 4, 1.0341796875, 0.50244140625, 8.1953125 / 4
    q0, s, c2, k0 = above_mid16(qt), above_mid16(st), above_mid16(ct), above_mid16(kt)
    T = c2 * (s * 2 * q0 * k0) ** 2  # d = 2, q = (x, x), k = (y, y): the exact term
    tk = 4 * float(_h(_h(torch.tensor(ct) * _h(_h(torch.tensor(st * qt)) ** 2)) * _h(kt * kt)))
    n = next(n for n in range(1000, 3000) if n * (1 + tk) >= 65520)
    assert n * (1 + T) * (1 + 2.0**-11) ** 10 < 65520  # (the old checks' growth)
    P = Precision("fp32", compute="fp16", block=ONE_PASS)
    q = torch.full((1, 1, 2), q0, dtype=F64)
    k = torch.full((1, n, 2), k0, dtype=F64)
    v = torch.ones(1, n, 1, dtype=F64)
    for evaluation in ("pairs", "state"):
        eb = attention_error_bound(
            "polynomial", q, k, v, P, coeffs=(1.0, 0.0, c2), scale=s, evaluation=evaluation
        )
        assert bool(torch.isinf(eb.total).all()) and eb.unbounded, evaluation


def test_feature_checks_take_constants_split_over_both_sides():
    """Based's form: sqrt(scale) on every entry and sqrt(c_2) on both the query's and the
    key's features, each rounded in fp16: 18 roundings on a power-2 term's path, past the
    13 the query-side form takes; 52 keys whose fp32 normalizer 65,520.06 the division
    takes into fp16 as inf (a second review: a finite bound, nothing named)."""
    x = y = 4.056641578674316
    ss, sq_c = 1.033691644668579, 1.014160394668579
    s, c2 = ss * ss, sq_c * sq_c

    def feat(z: float) -> torch.Tensor:
        zs = _h(_h(torch.tensor(z, dtype=F64)) * _h(math.sqrt(s)))
        return _h(_h(zs * zs) * _h(math.sqrt(c2)))

    def w(a: float, b: float) -> torch.Tensor:  # d = 2, equal entries: 4 equal features
        return (4 * _h(feat(a) * feat(b))).float()

    base = torch.tensor(0.0)
    for _ in range(51):
        base = base + w(x, y)
    yp = next(t for t in torch.linspace(1.0, 1.5, 20001).float().double().tolist()
              if float(base + w(x, t)) >= 65520)  # fmt: skip
    assert 51 * c2 * (s * 2 * x * y) ** 2 + c2 * (s * 2 * x * yp) ** 2 < 65504  # exact D
    q = torch.full((1, 1, 2), x, dtype=F64)
    k = torch.full((1, 52, 2), y, dtype=F64)
    k[0, -1] = yp
    v = torch.ones(1, 52, 1, dtype=F64)
    P = Precision("fp32", compute="fp16", block=ONE_PASS)
    for evaluation in ("pairs", "state"):
        eb = attention_error_bound(
            "polynomial", q, k, v, P, coeffs=(0.0, 0.0, c2), scale=s, evaluation=evaluation
        )
        assert bool(torch.isinf(eb.total).all()) and eb.unbounded, evaluation


def test_feature_checks_take_a_coefficient_split_per_factor():
    """The coefficient split as c_p^(1/4) on each factor of both sides, with sqrt(scale)
    per entry: 23 roundings on a power-2 term's path; 40 keys whose fp32 normalizer reaches
    65,520 exactly, inf in fp16 (a third review: the bound 0.0085, nothing named)."""
    s, x, c2 = 1.0625, 4.185547351837158, 1.181059312256172

    def feat(z: float) -> torch.Tensor:
        e = _h(_h(_h(z) * _h(math.sqrt(s))) * _h(c2**0.25))
        return _h(e * e)

    def w(a: float, b: float) -> torch.Tensor:  # d = 2, equal entries: 4 equal features
        return (4 * _h(feat(a) * feat(b))).float()

    n = int(65520 // float(w(x, x)))
    base = torch.tensor(0.0)
    for _ in range(n):
        base = base + w(x, x)
    lo, hi = 0.0, 8.0
    for _ in range(60):  # the last key's entry that takes the sum to 65,520
        mid = (lo + hi) / 2
        lo, hi = (
            (lo, mid)
            if float(base + w(x, float(torch.tensor(mid).float()))) >= 65520
            else (mid, hi)
        )
    yp = float(torch.tensor(hi).float())
    assert float(base + w(x, yp)) >= 65520
    assert n * 4 * c2 * (s * x * x) ** 2 + 4 * c2 * (s * x * yp) ** 2 < 65504  # exact D
    q = torch.full((1, 1, 2), x, dtype=F64)
    k = torch.full((1, n + 1, 2), x, dtype=F64)
    k[0, -1] = yp
    v = torch.ones(1, n + 1, 1, dtype=F64)
    P = Precision("fp32", compute="fp16", block=ONE_PASS)
    for evaluation in ("pairs", "state"):
        eb = attention_error_bound(
            "polynomial", q, k, v, P, coeffs=(0.0, 0.0, c2), scale=s, evaluation=evaluation
        )
        assert bool(torch.isinf(eb.total).all()) and eb.unbounded, evaluation


def _causal_scaled_keys(q, k, v, sc: float, root: bool):
    """Causal softmax in fp16 (fp32 sums) as PyTorch's math SDPA forms it: q and k times
    sqrt(scale) (``root``) or k times the scale, every logit of the sequence, an additive
    -inf mask, the shift by the row maximum."""
    if root:
        r = _h(math.sqrt(sc))
        qs, ks = _h(q * r), _h(k * r)
    else:
        qs, ks = q, _h(k * _h(sc))
    x = _h((qs @ ks.T).float().double())
    future = torch.triu(torch.ones(q.shape[0], k.shape[0], dtype=torch.bool), 1)
    x = x + torch.where(future, -math.inf, 0.0)  # (NaN + -inf is NaN)
    w = _h(torch.exp(_h(x - x.amax(-1, keepdim=True))))
    return _h(_h((w @ v).float().double()) / _h(w.sum(-1, keepdim=True).float().double()))


@pytest.mark.parametrize(
    "constants, root, big", [("any", True, 32768.0), ("folded", False, 4096.0)]
)
def test_scaled_keys_overflow_even_where_masked(constants, root, big):
    """Scale 16: a future key's entry times sqrt(16) (or 16, the scale on k) overflows
    fp16, while row 0's query is 0 on that channel; a kernel forming every logit (the math
    SDPA, or any shift by the sequence's maximum) returns NaN there. A review: the check
    counted only the keys a row sees, a finite bound (0.016)."""
    q = torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=F64)
    k = torch.tensor([[0.0, 1.0], [big, 0.5]], dtype=F64)
    v = torch.tensor([[1.0], [-1.0]], dtype=F64)
    assert bool(torch.isnan(_causal_scaled_keys(q, k, v, 16.0, root)[0]).all())
    P = Precision("fp16", compute="fp16", accumulate="fp32", constants=constants)
    eb = attention_error_bound("softmax", q, k, v, P, scale=16.0, causal=True)
    assert bool(torch.isinf(eb.rounding).all()) and "logits q.k in fp16" in eb.unbounded


@pytest.mark.parametrize("constants", ["any", "folded"])
def test_score_form_scaled_query_overflow(constants):
    """Taylor's score form at scale 16 in fp16: ``fl(8192 * 16)`` is inf, and times the
    keys' 0 on that channel NaN (a review: a finite bound, 0.011); the same entry on a key
    (the scale on k)."""
    q = torch.tensor([[8192.0, 0.125]], dtype=F64)
    k = torch.tensor([[0.0, 1.0], [0.0, -0.5], [0.0, 0.25]], dtype=F64)
    v = torch.tensor([[1.0], [0.0], [0.5]], dtype=F64)
    assert bool(torch.isnan(_h(q * 16.0) @ k.T).any())
    P = Precision("fp16", compute="fp16", accumulate="fp32", constants=constants)
    for a, b in ((q, k), (k[:1], torch.cat([q, k[1:]]))):
        eb = attention_error_bound("taylor", a, b, v[: b.shape[0]], P, degree=2, scale=16.0,
                                   form="scores")  # fmt: skip
        assert bool(torch.isinf(eb.rounding).all()), eb.unbounded


@pytest.mark.parametrize(
    "method, kw",
    [("softmax", {}), ("taylor", {"degree": 2}), ("taylor", {"degree": 2, "form": "scores"}),
     ("log", {}), ("linear", {"feature_map": None})],
)  # fmt: skip
def test_a_masked_key_or_value_that_overflows_on_load(method, kw):
    """fp32 storage, fp16 compute: a masked key's value of 1e5 is inf once loaded, and a
    kernel that multiplies every weight by its value (the masked one 0) returns NaN in
    every row. A review: the load check counted only the keys a row sees, finite bounds
    on every row of softmax and taylor (key_mask and causal)."""
    q = torch.tensor([[0.5, 0.25], [0.25, 0.5], [0.125, 0.5]], dtype=F64)
    k = torch.tensor([[0.5, 0.5], [0.25, 0.75], [1.0, 0.0]], dtype=F64)
    v = torch.tensor([[1.0], [-1.0], [1e5]], dtype=F64)
    assert bool(torch.isnan(torch.zeros(1) * v.half()[2]).all())  # (0 * inf)
    P = Precision("fp32", compute="fp16")
    for mask in ({"key_mask": torch.tensor([True, True, False])}, {"causal": True}):
        eb = attention_error_bound(method, q, k, v, P, **mask, **kw)
        assert bool(torch.isinf(eb.rounding).all()) and "load into fp16" in eb.unbounded, mask


def _later_token_cases():
    """T = 8 tokens, fp16: inputs where only token 7 (5 to 7 in the state case) overflows
    an intermediate of a chunked kernel; every exact output finite."""
    g = torch.Generator().manual_seed(0)
    h = lambda *s: torch.randn(*s, generator=g).half()  # noqa: E731
    T = 8
    C, Bm, x, dt = h(T, 2), h(T, 2), h(T, 1), torch.full((T,), 0.5).half()
    ssd_a = (C.clone(), Bm.clone(), x.clone(), dt.clone())
    ssd_a[2][-1], ssd_a[3][-1], ssd_a[1][-1] = 1000.0, 100.0, 0.01  # dt x = 1e5
    ssd_c = (C.clone(), Bm.clone(), x.clone(), dt.clone())
    ssd_c[0][4:], ssd_c[1][5:], ssd_c[2][5:] = 1e-3, 250.0, 250.0  # a chunk's state 9.4e4
    q, k, v = h(T, 2), h(T, 2), h(T, 1)
    qg, kg = torch.full((T, 2), 30.0).half(), k.clone()
    kg[-1] = 5000.0  # q_c k_c = 1.5e5
    u, delta = x.clone(), torch.full((T, 1), 0.5).half()
    u[-1], delta[-1] = 1000.0, 100.0  # delta u = 1e5
    Bs = Bm.clone()
    Bs[-1] = 1e-3
    u70 = x.clone()
    u70[-1] = 1000.0  # dt u = 7e4
    k3, q3 = k.clone(), q.clone()
    k3[6:], q3[7] = 40000.0, 1e-3  # the shifted key k_6 + k_7 = 8e4
    A = -torch.ones(1, 2).half()
    return [
        ("gated", (qg, kg, v), {"log_g": torch.full((T, 2), -0.5).half(), "scale": 1.0}),
        ("ssd", ssd_a[:3], {"dt": ssd_a[3], "A": -0.5}),
        ("ssd", ssd_c[:3], {"dt": ssd_c[3], "A": -0.5}),
        ("selective_scan", (C, Bs, u), {"delta": delta, "A": A}),
        ("ssm", (C, Bs, u70), {"A": torch.full((1, 2), -0.01).half(), "dt": 70.0,
                              "discretization": "euler"}),
        ("h3", (q3, k3, v), {"shift": torch.tensor([1.0, 1.0]).half(),
                             "log_decay": torch.tensor([-0.3, -0.7]).half()}),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(6))
@pytest.mark.parametrize("evaluation", ["pairs", "state"])
def test_a_later_token_of_a_chunked_kernel_reaches_every_row(case, evaluation):
    """A review (twentieth session): a correct chunked kernel in fp16 compute (``block=4``)
    forms, inside a chunk, the scores, computed keys and states of later tokens, masked
    by a product (``exp(segsum)`` is an exact 0 above the diagonal, and 0 * inf is NaN), and
    Mamba-2's ``ssd_minimal`` passes states between chunks as one product over all chunks:
    a later token's ``q_c k_c``, ``dt x``, chunk state, ``delta u``, ``dt u`` or shifted
    key past fp16 made earlier rows NaN under finite bounds, in gated, ssd,
    selective_scan, ssm and h3, both evaluations. Without ``block`` (a recurrence or a
    scan: nothing past the row is formed) the early rows stay bounded. A product ``q_t k_j``
    alone reaches the rows a chunk may share with key j (``t >= j - 3``), no state."""
    method, qkv, kw = _later_token_cases()[case]
    assert bool(torch.isnan(torch.zeros(1).half() * torch.tensor([7e4]).half()).all())
    chunked = Precision("fp16", compute="fp16", accumulate="fp32", block=4)
    eb = attention_error_bound(method, *qkv, chunked, evaluation=evaluation, **kw)
    first = 4 if method == "gated" else 0
    assert bool(torch.isinf(eb.rounding[..., first:, :]).all()), eb.unbounded
    assert bool(torch.isfinite(eb.rounding[..., :first, :]).all()), eb.unbounded
    plain = Precision("fp16", compute="fp16", accumulate="fp32")
    eb = attention_error_bound(method, *qkv, plain, evaluation=evaluation, **kw)
    assert bool(torch.isfinite(eb.rounding[..., :4, :]).all()), eb.unbounded
    assert not bool(torch.isfinite(eb.rounding).all())


def _hidden_key_cases():
    """A padding key (key_mask False) that overflows an intermediate of fp16 compute in
    the rows that do not see it (row 2 of three unless said): every load and scaled
    operand fits; the kernel forms the hidden key's logit, feature, product or exp and
    masks it by a product or an additive mask, where 0 * inf and inf - inf are NaN."""
    t = lambda x: torch.tensor([x], dtype=F64)  # noqa: E731
    q3 = t([[0.5, -0.2, 0.1, 0.3], [0.1, 0.2, -0.3, 0.4], [200.0] * 4])
    k3 = t([[200.0] * 4, [0.1, 0.2, 0.3, -0.1], [-0.2, 0.1, 0.4, 0.2]])  # a logit of 8e4
    q2 = t([[0.5, -0.2], [0.1, 0.2], [200.0, 200.0]])
    k2 = t([[400.0, -400.0], [0.1, 0.2], [-0.2, 0.1]])  # products +-8e4, logit 0
    qf = t([[0.5, -0.2, 0.1, 0.3], [0.1, 0.2, -0.3, 0.4], [0.3, 0.3, 0.3, 0.3]])
    kf = t([[300.0] * 4, [0.1, 0.2, 0.3, -0.1], [-0.2, 0.1, 0.4, 0.2]])  # monomials 9e4
    ql = t([[0.5, -0.2], [0.1, 0.2], [0.3, 0.3]])
    kl = t([[20.0, 20.0], [0.1, 0.2], [-0.2, 0.1]])  # exp(k - max visible) = e^20
    W = torch.tensor([[3.0, 3.0, 3.0, 3.0], [0.1, -0.1, 0.2, 0.0]], dtype=F64)
    kw = t([[6.0] * 4, [0.1, 0.2, 0.3, -0.1], [-0.2, 0.1, 0.4, 0.2]])  # feature exponent 18
    semi = SoftMaxPlus(0.5)
    return [  # (method, q, k, kw, evaluation, rows unbounded)
        ("softmax", q3, k3, {}, "pairs", [2]),
        ("softmax", q2, k2, {"softcap": 30.0}, "pairs", [2]),
        ("semiring", q2, k2, {"semiring": semi}, "pairs", [2]),
        ("taylor", q3, k3, {"degree": 2, "form": "scores"}, "pairs", [2]),
        ("taylor", qf, kf, {"degree": 2}, "pairs", [0, 1, 2]),
        ("taylor", qf, kf, {"degree": 2}, "state", [0, 1, 2]),
        ("linear", q3 * 1.5, k3 * 1.5, {"feature_map": None}, "pairs", [2]),
        ("log", ql, kl, {}, "pairs", [0, 1, 2]),
        ("favor", qf, kw, {"projection": W}, "pairs", [0, 1, 2]),
    ]


@pytest.mark.parametrize("case", range(9))
def test_a_hidden_key_overflowing_compute_is_unbounded(case):
    """A review (twentieth session): a padding key whose logit (8e4), channel products
    (+-8e4), monomials (9e4), product with the query, or exp against the visible keys'
    shift (e^20, e^18) overflows fp16 made the rows that do not see it NaN under finite
    bounds in softmax, soft-capped softmax, a semiring, taylor (both forms, both
    evaluations), linear, log and FAVOR+: the checks took the visible keys only. Without
    the key, finite."""
    method, q, k, kw, evaluation, rows = _hidden_key_cases()[case]
    v = torch.tensor([[[0.5, 0.25], [1.0, -1.0], [1.0, 2.0]]], dtype=F64)
    mask = torch.tensor([[False, True, True]])
    P = Precision("fp16", compute="fp16", accumulate="fp32", block=ONE_PASS)
    if method == "log":
        P = Precision("fp16", compute="fp16", accumulate="fp32", block=ONE_PASS, sums="linear")
    opts = {} if evaluation == "pairs" else {"evaluation": evaluation, "causal": True}
    if evaluation == "state":  # (no masks there: the hidden key is a later one)
        q, k, v, mask = q.flip(-2), k.flip(-2), v.flip(-2), None
        rows = [0, 1]
    eb = attention_error_bound(method, q, k, v, P, key_mask=mask, **opts, **kw)
    assert bool(torch.isinf(eb.rounding[:, rows]).all()), eb.unbounded
    keep = [1, 2] if evaluation == "pairs" else [0, 1]
    eb = attention_error_bound(method, q[:, keep], k[:, keep], v[:, keep], P, **opts, **kw)
    assert bool(torch.isfinite(eb.rounding).all()), eb.unbounded


@pytest.mark.parametrize("case", [0, 1, 3, 4, 5])
@pytest.mark.parametrize("evaluation", ["pairs", "state"])
def test_one_chunk_past_the_sequence_is_the_sequence(case, evaluation):
    """``block=ONE_PASS`` (or any chunk past the sequence) on the decayed recurrences: one
    chunk of every token, as ``block=n``. A review: an infinite bound on every row past
    the first, named by no reason (the log-gates' span error took 2^62 of them)."""
    method, qkv, kw = _later_token_cases()[case]
    qkv = tuple(x.double().clamp(-2, 2) for x in qkv)  # (no overflow anywhere)
    P = lambda b: Precision("fp16", compute="fp16", accumulate="fp32", block=b)  # noqa: E731
    one = attention_error_bound(method, *qkv, P(ONE_PASS), evaluation=evaluation, **kw)
    n = attention_error_bound(method, *qkv, P(qkv[0].shape[-2]), evaluation=evaluation, **kw)
    assert bool(torch.isfinite(one.total).all()) and not one.unbounded
    torch.testing.assert_close(one.total, n.total, rtol=1e-12, atol=0)


@pytest.mark.parametrize("method", ["softmax", "log", "taylor"])
def test_a_scale_compute_holds_as_inf_is_refused_naming_scale(method):
    """A scale past fp16's largest with fp16 compute: the kernel multiplies by inf. The
    bound raised OverflowError from the constant's representation error (a review)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(8, 4, generator=g, dtype=torch.float64) for _ in range(3))
    with pytest.raises(ValueError, match="^scale: 70000.0 overflows the compute format fp16"):
        attention_error_bound(method, q, k, v, Precision("fp16", compute="fp16"), scale=7e4)


def test_an_infinite_element_no_reason_covers_is_named():
    """``named_unbounded``: an element infinite at either level that no reason covers (an
    intermediate of the bound past float64's range) is named, never left unexplained; one
    a reason covers is not named twice."""
    from attnprec.analysis.bounds.attention import named_unbounded

    total = torch.tensor([[1.0, math.inf], [math.inf, 2.0]], dtype=F64)
    typical = torch.tensor([[1.0, math.inf], [math.inf, math.inf]], dtype=F64)
    covered = {"output in fp16": torch.tensor([[False, True], [False, False]])}
    named = named_unbounded(covered, total, typical)
    assert named["output in fp16"] is covered["output in fp16"]
    assert named["bound past float64's range"].tolist() == [[False, False], [True, True]]
    finite = torch.ones(2, 2, dtype=F64)
    assert named_unbounded({}, finite, finite) == {}


@pytest.mark.parametrize("method", ["softmax", "log"])
def test_a_folded_shift_may_lift_a_weight_above_one(method):
    """fp16 compute: a kernel that folds log2(e) and its shift into one FMA computes the
    top key's exp as ``exp2(m C - fl(m C))``; at ``m = 1267`` (``m C = 1827.499``, rounded to
    1827) that is ``2^0.499 = 1.413``, so its product with a value of 50,000 is inf in fp16
    and the output inf. The overflow checks took every weight as ``exp(<= 0)``, at most
    ``1 + k_e`` per exp: bounds of 143 (softmax) and 168 (log, both evaluations), finite
    and unnamed (a review); now each exp is at most ``e^a`` more, ``a`` the folded
    shift's rounding (``quotient.folded_shift``)."""
    f16 = lambda x: round_to(torch.as_tensor(x, dtype=F64), "fp16")  # noqa: E731
    c = float(f16(math.log2(math.e)))
    m = 1267.0
    w = f16(torch.exp2(f16(torch.tensor(m * c, dtype=F64) - f16(m * c))))  # the top exp
    assert float(w) > 1.41 and math.isinf(float(f16(w * 50000.0)))
    # (softmax: the logit m; log attention: X = 0, Y = m)
    q = torch.full((1, 1), 1.0 if method == "softmax" else 0.0, dtype=F64)
    k = torch.full((1, 1), m, dtype=F64)
    v = torch.full((1, 1), 50000.0, dtype=F64)
    prec = Precision("fp16", "fp16", "fp32", sums="linear")
    evaluations = ("pairs", "state") if method == "log" else ("pairs",)
    for evaluation in evaluations:
        kw = {"evaluation": evaluation} if method == "log" else {}
        eb = attention_error_bound(method, q, k, v, prec, scale=1.0, **kw)
        named = {key for key, mask in eb.unbounded.items() if bool(mask.all())}
        assert bool(torch.isinf(eb.total).all()) and any("products" in n for n in named), named


@pytest.mark.parametrize("case", [7, 8])
def test_a_hidden_key_past_the_running_shift_is_named_beside_a_wide_one(case):
    """``block=None`` evaluates log attention's and FAVOR+'s running shift and the wide one
    (a later, larger key makes them differ); the check of a padding key's exp against the
    shift read the last model's shift, the wide one, in both, so FAVOR+'s running shift's
    overflow (e^18 in fp16) went unnamed (its rows were unbounded only for another reason,
    "normalizer may vanish"); log attention's (e^20) is checked alike."""
    method, q, k, kw, _, _ = _hidden_key_cases()[case]
    q = torch.cat([q, q[:, :1]], 1)
    k = torch.cat([k, k[:, 1:2] + 3.0], 1)  # a later visible key above the others
    v = torch.tensor([[[0.5, 0.25], [1.0, -1.0], [1.0, 2.0], [0.3, 0.1]]], dtype=F64)
    mask = torch.tensor([[False, True, True, True]])
    P = Precision("fp16", compute="fp16", accumulate="fp32", sums="linear")
    eb = attention_error_bound(method, q, k, v, P, key_mask=mask, causal=True, rows=[1, 2], **kw)
    assert bool(eb.unbounded["exponents in fp16"].all()), eb.unbounded


def _tutorial_row0(q, k, v, block: int) -> torch.Tensor:
    """Row 0 of Triton's tutorial loop in fp16: ``qk * qk_scale`` with ``qk_scale = scale
    log2 e`` (scale 1), an additive causal mask, ``exp2`` against the running maximum."""
    f16 = lambda x: round_to(torch.as_tensor(x, dtype=F64), "fp16")  # noqa: E731
    C = f16(math.log2(math.e))
    m, l, acc = torch.tensor(-math.inf, dtype=F64), 0.0, torch.zeros(v.shape[-1], dtype=F64)
    js = torch.arange(0, block)  # the first block, past the diagonal
    qk = f16(f16(q[0] @ k[js].T) * C) + torch.where(js <= 0, 0.0, -math.inf)
    m_new = torch.maximum(m, qk.max())
    p = torch.exp2(f16(qk - m_new))
    l, acc = l + p.sum(), acc + (p[:, None] * v[js]).sum(0)
    return acc / l


@pytest.mark.parametrize("block", [4, 64, ONE_PASS])
def test_a_hidden_logit_past_the_format_once_log2e_is_folded_is_named(block) -> None:
    # row 0 sees key 0 (logit 1); the future keys' logits, 46,080, fit fp16, but times the
    # folded log2(e) they are inf, and inf + (-inf) is NaN: the check took the scale alone
    # (a review: a bound of 0.0073 on the NaN row)
    n = 4
    q = torch.tensor([[256.0, 1.0]] * n, dtype=F64)
    k = torch.tensor([[0.0, 1.0]] + [[180.0, 0.0]] * (n - 1), dtype=F64)
    v = torch.arange(1, n + 1, dtype=F64)[:, None]
    assert bool(torch.isnan(_tutorial_row0(q, k, v, n)).all())
    prec = Precision("fp16", compute="fp16", block=block)
    for method, kw in (("softmax", {}), ("semiring", {"semiring": SoftMaxPlus(1.0)})):
        eb = attention_error_bound(method, q, k, v, prec, scale=1.0, causal=True, **kw)
        assert bool(torch.isinf(eb.total[0]).all()), method
        assert any(bool(m[0].all()) for m in eb.unbounded.values()), method
