"""Soundness at the edges of the formats (issue: overflow, underflow, subnormals, signs).

One test (or property) per class of unsoundness that was found, each over the edge it
guards: overflow thresholds of stores, overflow inside the computation, keys whose float64
softmax weight underflows, subnormal inputs and outputs, negative scales, validation.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnprec.analysis.bounds import attention_error_bound, taylor_error_bound
from attnprec.analysis.bounds.rounding import store_error
from attnprec.analysis.precision import FORMATS, Precision, round_to
from attnprec.analysis.reference import reference
from attnprec.attention import (
    SoftMaxPlus,
    favor_projection,
    gated_linear_attention,
    log_attention,
    semiring_attention,
    softmax_attention,
    taylor_attention,
)


def _named(eb) -> None:
    """Every infinite element of the bound is explained by a named intermediate."""
    inf = ~torch.isfinite(eb.total)
    named = torch.zeros_like(inf)
    for mask in eb.unbounded.values():
        named = named | mask
    assert bool((inf <= named).all()), f"unnamed infinite elements; reasons {list(eb.unbounded)}"


def _emulate(fn, q, k, v, prec: Precision, **kw) -> torch.Tensor:
    """torch's fp32 ops on the inputs rounded to storage; the output rounded once."""
    qs, ks, vs = (round_to(x, prec.storage).float() for x in (q, k, v))
    return round_to(fn(qs, ks, vs, **kw).double(), prec.storage, prec.rounding)


# --- 1. Overflow thresholds of stores --------------------------------------------------------


@pytest.mark.parametrize("fmt", ["fp16", "bf16", "fp32", "e5m2"])
def test_rne_overflows_at_max_plus_half_an_ulp(fmt):
    f = FORMATS[fmt]
    edge = f.max + 2.0 ** (f.emax - f.precision)
    below = torch.tensor([math.nextafter(edge, 0.0)], dtype=torch.float64)
    at = torch.tensor([edge], dtype=torch.float64)
    # round_to (bit-exact with torch's casts) agrees on where inf starts
    assert math.isfinite(float(round_to(below, fmt))) and math.isinf(float(round_to(at, fmt)))
    assert math.isfinite(float(store_error(below, f))) and math.isinf(float(store_error(at, f)))
    # toward zero and e4m3 saturate at max: finite, and the bound covers |x - max|
    big = torch.tensor([4 * f.max], dtype=torch.float64)
    assert float(store_error(big, f, "rtz")) >= 3 * f.max
    e4 = FORMATS["e4m3"]
    assert float(store_error(torch.tensor([1000.0], dtype=torch.float64), e4)) >= 1000.0 - e4.max


def test_gated_store_overflow_is_unbounded_and_named():
    q = k = torch.tensor([[1.0], [1.0]], dtype=torch.float64)
    v = torch.tensor([[32768.0], [32752.0]], dtype=torch.float64)
    log_g = torch.zeros(2, dtype=torch.float64)
    y = gated_linear_attention(q.float(), k.float(), v.float(), log_g.float(), scale=1.0)
    stored = round_to(y.double(), "fp16")
    assert math.isinf(float(stored[1, 0]))  # 65520 rounds to inf in fp16
    eb = attention_error_bound("gated", q, k, v, "fp16", log_g=log_g, scale=1.0)
    assert math.isfinite(float(eb.total[0, 0])) and math.isinf(float(eb.total[1, 0]))
    assert list(eb.unbounded) == ["output store to fp16"]
    assert abs(float(stored[0, 0]) - 32768.0) <= float(eb.total[0, 0])


def test_recurrence_store_overflow_is_inf():
    from attnprec.analysis.bounds.graphs import recurrence_rounding_bound

    a = torch.ones(2, dtype=torch.float64)
    b = torch.tensor([32768.0, 32752.0], dtype=torch.float64)
    bound = recurrence_rounding_bound(a, b, None, Precision("fp16"))
    assert math.isfinite(float(bound[0])) and math.isinf(float(bound[1]))


# --- 2. Overflow inside the computation ------------------------------------------------------

OVERFLOWS = [
    ("bf16", "fp32", "fp32", 3e38, "numerator sum"),
    ("fp32", "fp32", "fp32", 3e38, "numerator sum"),
    ("fp16", "fp32", "fp16", 6e4, "numerator sum w v in fp16"),
    ("fp32", "fp16", "fp32", 7e4, "load into fp16"),
]


@pytest.mark.parametrize(("storage", "compute", "acc", "value", "name"), OVERFLOWS)
def test_softmax_intermediate_overflow_is_named(storage, compute, acc, value, name):
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(4, 8, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.full((4, 2), value, dtype=torch.float64)
    eb = attention_error_bound("softmax", q, k, v, Precision(storage, compute, acc))
    assert bool(torch.isinf(eb.total).all())
    assert any(key.startswith(name) for key in eb.unbounded), list(eb.unbounded)
    _named(eb)


METHOD_PARAMS = {
    "softmax": {},
    "semiring": {"semiring": SoftMaxPlus(0.5)},
    "log": {},
    "taylor": {"degree": 2},
    "polynomial": {"coeffs": (1.0, 0.5, 0.5)},
    "linear": {"feature_map": None},  # q and k are the features
    "gated": {"log_g": -0.5},  # a constant log-gate, expanded to the sequence length
}


def _params(method: str, n: int) -> dict:
    p = dict(METHOD_PARAMS[method])
    if method == "gated":
        p["log_g"] = torch.full((n,), p["log_g"], dtype=torch.float64)
    return p


@pytest.mark.parametrize("method", sorted(METHOD_PARAMS) + ["favor"])
@pytest.mark.parametrize("value", [6e4, 3e38])
def test_every_graph_names_what_overflows(method, value):
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(2))
    if method == "linear":
        q, k = q.abs() + 0.1, k.abs() + 0.1
    v = torch.full((6, 3), value, dtype=torch.float64)
    params = _params(method, 6) if method in METHOD_PARAMS else {}
    if method == "favor":
        params["projection"] = favor_projection(8, 4, generator=g)
    prec = Precision("fp32", "fp32", "fp16") if value < 1e5 else Precision("fp32")
    eb = attention_error_bound(method, q, k, v, prec, **params)
    assert not bool(torch.isfinite(eb.total).all()), method
    _named(eb)


# --- 3. Keys whose float64 softmax weight underflows ------------------------------------------


def test_taylor_approximation_keeps_underflowed_keys():
    q = torch.tensor([[1.0]], dtype=torch.float64)
    k = torch.tensor([[700.0], [-50.0]], dtype=torch.float64)
    v = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    true = 1201.0 / (1 + 700 + 700**2 / 2 + 1201.0)  # the Taylor weight of key 1, normalized
    assert float(taylor_error_bound(q, k, v, 2, scale=1.0)) >= true
    eb = attention_error_bound("taylor", q, k, v, "fp64", degree=2, scale=1.0)
    assert float(eb.approximation) >= true


@given(st.floats(746, 3000), st.sampled_from(["taylor", "polynomial", "favor"]), st.integers(0, 99))
def test_approximation_sound_beyond_float64_exp_range(gap, method, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.ones(2, 1, dtype=torch.float64)
    k = torch.tensor([[gap / 2], [-gap / 2], [0.3]], dtype=torch.float64)
    v = torch.randn(3, 2, generator=g, dtype=torch.float64)
    params = {
        "taylor": {"degree": 2},
        "polynomial": {"coeffs": (1.0, 0.25, 0.5)},
        "favor": {"projection": torch.randn(4, 1, generator=g, dtype=torch.float64).abs() / 64},
    }[method]
    eb = attention_error_bound(method, q, k, v, "fp64", scale=1.0, **params)
    ref_m = reference(method, q, k, v, scale=1.0, **params)
    ref_s = reference("softmax", q, k, v, scale=1.0)
    fin = torch.isfinite(eb.approximation) & torch.isfinite(ref_m.radius)
    slack = eb.approximation + ref_s.radius
    assert bool(ref_m.contains(ref_s.value, slack)[fin].all())


# --- 4. Subnormal inputs and outputs ---------------------------------------------------------


@given(
    st.sampled_from(["fp16", "bf16", "fp32"]),
    st.sampled_from(["min_normal", "min_subnormal"]),
    st.booleans(),
    st.integers(0, 2**31),
)
def test_subnormal_values_sound(storage, edge, causal, seed):
    f = FORMATS[storage]
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(2))
    v = getattr(f, edge) * torch.randint(-3, 4, (5, 2), generator=g).double()
    v[0] = 1.0  # one ordinary value: outputs of mixed scale
    prec = Precision(storage)
    for method, fn, kw in (
        ("softmax", softmax_attention, {}),
        ("log", log_attention, {}),
        ("taylor", taylor_attention, {"degree": 2}),
    ):
        eb = attention_error_bound(method, q, k, v, prec, causal=causal, **kw)
        y = _emulate(fn, q, k, v, prec, causal=causal, **kw)
        target = "softmax" if method == "taylor" else method
        ref = reference(target, q, k, v, causal=causal)
        assert bool(ref.contains(y, eb.total).all()), (method, storage, edge)


@given(st.sampled_from(["fp16", "bf16"]), st.integers(0, 2**31))
def test_tiny_queries_and_keys_sound(storage, seed):
    # logits of subnormal size: the weights are all ~1, the features of taylor underflow
    f = FORMATS[storage]
    g = torch.Generator().manual_seed(seed)
    q, k = (f.min_subnormal * torch.randint(-4, 5, (4, 3), generator=g).double() for _ in range(2))
    v = torch.randn(4, 2, generator=g, dtype=torch.float64)
    prec = Precision(storage)
    for method, fn in (("softmax", softmax_attention), ("log", log_attention)):
        eb = attention_error_bound(method, q, k, v, prec)
        ref = reference(method, q, k, v)
        assert bool(ref.contains(_emulate(fn, q, k, v, prec), eb.total).all()), method


@pytest.mark.parametrize(
    ("x", "scale"),
    [
        (1e-163, 1.0),  # x * x flushes to 0 in float64
        (1e-162, 1.7e308),
        (math.sqrt(1.49) * 2.0**-537, 1e300),  # x * x = 1.49 2^-1074, rounded to 2^-1074
        (math.sqrt(2.49) * 2.0**-537, 1e280),
    ],
)
def test_quantization_of_underflowing_logits(x, scale):
    """q = x, keys x and -x, v = (1, -1): y = tanh(scale x^2) exactly, and 0 on the bf16
    inputs (x rounds to 0). The products x * x underflow in float64: the quantization part
    was 0 where they flushed to 0 (their perturbation taken as exact) and charged their
    underflow without the scale (a review; 1.49x outside at scale 1e300)."""
    import mpmath

    q = torch.tensor([[[x]]], dtype=torch.float64)
    k = torch.tensor([[[x], [-x]]], dtype=torch.float64)
    v = torch.tensor([[[1.0], [-1.0]]], dtype=torch.float64)
    prec = Precision("bf16", compute="fp64", accumulate="fp64")
    eb = attention_error_bound("softmax", q, k, v, prec, scale=scale)
    with mpmath.workdps(60):
        exact = mpmath.tanh(mpmath.mpf(scale) * mpmath.mpf(x) ** 2)
        assert 0 < exact <= mpmath.mpf(float(eb.quantization.flatten()[0]))


@pytest.mark.parametrize("evaluation", ["pairs", "state"])
def test_negative_normalizers_bound_as_their_negation(evaluation):
    """Linear attention over features with q . k < 0 for every pair: the normalizer is far
    from 0 but negative, the output well-conditioned. Negating a row's weights changes
    neither its output nor its rounding errors, so the bound is that of -q's (every part,
    both levels); it was inf ('normalizer may vanish', and the quantization part) for a
    review's kernels, 0.03 of this bound."""
    g = torch.Generator().manual_seed(0)
    qf = torch.rand(8, 3, generator=g, dtype=torch.float64) + 0.5
    kf = -(torch.rand(8, 3, generator=g, dtype=torch.float64) + 0.5)
    v = torch.randn(8, 2, generator=g, dtype=torch.float64)
    prec = Precision("fp16")  # float64 inputs: the quantization part is exercised too
    kw = dict(feature_map=None, causal=True, evaluation=evaluation)
    neg = attention_error_bound("linear", qf, kf, v, prec, **kw)
    pos = attention_error_bound("linear", -qf, kf, v, prec, **kw)
    assert bool(torch.isfinite(neg.total).all()) and not neg.unbounded
    for part in ("quantization", "rounding", "total"):
        assert torch.equal(getattr(neg, part), getattr(pos, part)), part
        assert torch.equal(getattr(neg.typical, part), getattr(pos.typical, part)), part
    ref = reference("linear", round_to(qf, "fp16"), round_to(kf, "fp16"), round_to(v, "fp16"),
                    feature_map=None, causal=True)  # fmt: skip
    assert bool((ref.value.abs() < 10).all())  # well-conditioned


# --- 5. Signs of parameters ------------------------------------------------------------------


@given(
    st.sampled_from(sorted(METHOD_PARAMS)),
    st.floats(-4.0, -0.01),
    st.sampled_from(["fp16", "bf16", "fp32"]),
    st.integers(0, 2**31),
)
def test_negative_scales_give_nonnegative_sound_parts(method, scale, storage, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(6, 3, generator=g, dtype=torch.float64) for _ in range(3))
    params = _params(method, 6)
    kw = {} if method == "linear" else {"scale": scale}
    if method == "linear":
        q, k = q.abs(), k.abs()
    eb = attention_error_bound(method, q, k, v, storage, **kw, **params)
    for part in (eb.quantization, eb.approximation, eb.rounding, eb.typical.rounding):
        assert bool((part >= 0).all())
    if method in ("log", "softmax", "semiring"):
        fn = {"log": log_attention, "softmax": softmax_attention}.get(method, semiring_attention)
        prec = Precision(storage)
        y = _emulate(fn, q, k, v, prec, scale=scale, **params)
        ref = reference(method, q, k, v, scale=scale, **params)
        assert bool(ref.contains(y, eb.total).all())


# --- 9. Validation and answers instead of crashes --------------------------------------------


def test_gated_rejects_positive_log_gates():
    x = torch.ones(3, 2, dtype=torch.float64)
    # (the message said "not NaN" of a positive gate: a review)
    with pytest.raises(ValueError, match="^log_g: .* found 0.1"):
        attention_error_bound("gated", x, x, x, "fp32", log_g=torch.full((3,), 0.1))
    with pytest.raises(ValueError, match="^log_g: .* found NaN"):
        attention_error_bound("gated", x, x, x, "fp32", log_g=torch.full((3,), math.nan))
    # the method defaults to causal, like the reference
    eb = attention_error_bound("gated", x, x, x, "fp32", log_g=torch.zeros(3))
    assert eb.total.shape == (3, 2)


@pytest.mark.parametrize("method", sorted(METHOD_PARAMS))
def test_huge_inputs_give_a_bound_or_a_named_reason(method):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(3))
    if method == "linear":
        q, k = q.abs() + 1, k.abs() + 1
    eb = attention_error_bound(method, q * 3e18, k, v, "fp32", **_params(method, 4))
    _named(eb)


def test_linearized_semirings_are_bounded():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(3))
    sr = SoftMaxPlus(1.0)
    eb = attention_error_bound("semiring", q, k, v, "fp32", semiring=sr, linearize=("taylor", 4))
    assert bool(torch.isfinite(eb.total).all())
    w = favor_projection(16, 3, generator=g)
    eb = attention_error_bound(
        "semiring", q, k, v, "fp32", semiring=sr, linearize=("favor", 16), projection=w
    )
    assert bool(torch.isfinite(eb.total).all())
    # drawn by the kernel (no projection): the approximation is probabilistic only (over the
    # draw), the rounding cannot be bounded: unbounded, and named
    eb = attention_error_bound("semiring", q, k, v, "fp32", semiring=sr, linearize=("favor", 16))
    assert bool(torch.isinf(eb.total).all()) and len(eb.unbounded) == 2
    _named(eb)
    # the kernel draws orthogonal features unless told otherwise: dependent within blocks of
    # d_k = 3, so the level's variances carry block_factor(16, 3) = 46 / 16 (the i.i.d. one
    # with 16 * 16 / 46 features)
    kw = {"semiring": sr, "linearize": ("favor", 16), "typical_confidence": 0.5}
    orth = attention_error_bound("semiring", q * 0.05, k * 0.05, v, "fp32", **kw)
    iid = attention_error_bound("semiring", q * 0.05, k * 0.05, v, "fp32", orthogonal=False, **kw)
    ratio = orth.typical.approximation / iid.typical.approximation
    assert bool(torch.isfinite(ratio).all()) and bool((ratio >= math.sqrt(46 / 16)).all())


# --- 10. Errors that name their argument; empty inputs ---------------------------------------
# Empty queries, values or batches give empty results of the output's shape everywhere (the
# method, its reference and its bound); no keys for some query, or no features (d_k = 0), is
# a ValueError naming k or q: a normalizer over no keys has no value.

EMPTY = [(0, 4, 3, 2), (4, 4, 3, 0)]


def _call_all(method: str, shape: tuple[int, int, int, int], batch: tuple[int, ...] = ()):
    from attnprec.methods import method as record

    n_q, n_k, d_k, d_v = shape
    g = torch.Generator().manual_seed(4)
    q = torch.rand(*batch, n_q, d_k, generator=g, dtype=torch.float64) + 0.5
    k = torch.rand(*batch, n_k, d_k, generator=g, dtype=torch.float64) + 0.5
    v = torch.randn(*batch, n_k, d_v, generator=g, dtype=torch.float64)
    p = _params(method, n_k)
    if method == "gated" and n_q != n_k:
        p["causal"] = False  # not a causal shape: the bound must name causal, not crash
    fn = record(method).resolve("function")
    yield "method", lambda: fn(q, k, v, **p)
    yield "reference", lambda: reference(method, q, k, v, **p).value
    yield "bound", lambda: attention_error_bound(method, q, k, v, "fp32", **p).total


@pytest.mark.parametrize("method", sorted(METHOD_PARAMS))
@pytest.mark.parametrize("shape", EMPTY)
def test_empty_queries_or_values_give_empty_results(method, shape):
    if method == "gated" and shape[0] != shape[1]:
        shape = (0, 0, *shape[2:])
    for where, call in _call_all(method, shape):
        out = call()
        assert tuple(out.shape) == (shape[0], shape[3]), where


@pytest.mark.parametrize("method", sorted(METHOD_PARAMS))
def test_empty_batches_give_empty_results(method):
    for where, call in _call_all(method, (4, 4, 3, 2), batch=(0,)):
        assert tuple(call().shape) == (0, 4, 2), where


@pytest.mark.parametrize("method", sorted(set(METHOD_PARAMS) - {"gated"}))
def test_queries_without_keys_name_k(method):
    for where, call in _call_all(method, (4, 0, 3, 2)):
        with pytest.raises(ValueError, match="^k: expected at least one key"):
            call()
        del where


@pytest.mark.parametrize("method", sorted(METHOD_PARAMS))
def test_no_features_name_q(method):
    for _, call in _call_all(method, (4, 4, 0, 2)):
        with pytest.raises(ValueError, match=r"^q: expected d_k >= 1"):
            call()


def test_empty_sequence_keeps_or_asks_for_the_state():
    q = torch.zeros(0, 3, dtype=torch.float64)
    v = torch.zeros(0, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="^state: an empty sequence"):
        log_attention(q, q, v, causal=True, return_state=True)
    x = torch.rand(3, 3, dtype=torch.float64)
    _, st = log_attention(x, x, x[:, :2], causal=True, return_state=True)
    y, st2 = log_attention(q, q, v, causal=True, state=st, return_state=True)
    assert y.shape == (0, 2) and st2 is st


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"degre": 2}, TypeError, "degre"),  # misspelt keyword
        ({"confidence": "0.9"}, TypeError, "confidence"),
        ({"confidence": 1.0}, ValueError, "confidence"),
        ({"scale": torch.tensor([0.5, 0.5])}, TypeError, "scale"),
        ({"scale": "0.5"}, TypeError, "scale"),
        ({"rows": [9]}, ValueError, "rows"),
        ({"causal": 1}, TypeError, "causal"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, name):
    x = torch.rand(4, 3, dtype=torch.float64)
    with pytest.raises(error, match=f"^{name}: "):
        attention_error_bound("taylor", x, x, x, "fp32", **{"degree": 2, **kwargs})


def test_missing_and_misspelt_keywords_are_named():
    x = torch.rand(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="^coeffs: required"):
        attention_error_bound("polynomial", x, x, x, "fp32")
    with pytest.raises(TypeError, match="^linearize: "):
        attention_error_bound(
            "semiring", x, x, x, "fp32", semiring=SoftMaxPlus(1.0), linearize="taylor"
        )
    with pytest.raises(TypeError, match="^semiring: "):
        attention_error_bound("semiring", x, x, x, "fp32", semiring="tropical")
    with pytest.raises(TypeError, match="^degre: not a keyword"):
        reference("taylor", x, x, x, degre=2)


@pytest.mark.parametrize(
    "prec",
    [
        Precision("bf16"),  # bf16 subnormals below fp32's normal range: an absolute part
        Precision("fp32", compute="bf16"),  # loads round
        Precision("fp32", compute="fp16"),  # both
        Precision("fp16"),  # exact loads
    ],
    ids=str,
)
def test_loaded_dot_bounds_the_loaded_magnitudes(prec: Precision) -> None:
    """The softmax bound takes ``sum_c |q~_c k~_c|`` (the loaded operands' magnitudes) as
    ``kappa |q|.|k| + rho`` from the float64 ``|q|.|k|`` it already holds: at least the
    exact ``sum_c (|q_c| (1 + ul) + hl)(|k_c| (1 + ul) + hl)`` (rational arithmetic), on
    magnitudes from subnormal to large."""
    from fractions import Fraction

    from attnprec.analysis.bounds.softmax import Loaded

    ld = Loaded(prec)
    g = torch.Generator().manual_seed(3)
    d = 16
    mag = torch.tensor([1e-40, 1e-38, 1e-30, 1e-8, 1.0, 300.0], dtype=torch.float64)
    q = mag[torch.randint(0, 6, (1, 12, d), generator=g)] * torch.randn(1, 12, d, generator=g)
    k = mag[torch.randint(0, 6, (1, 9, d), generator=g)] * torch.randn(1, 9, d, generator=g)
    q, k = (round_to(x, prec.storage) for x in (q, k))
    k_l1 = float(k.abs().sum(-1).amax()) * (1 + 1e-12)
    kappa, rho = ld.dot(q, k_l1)
    absdot = q.abs() @ k.abs().transpose(-1, -2)
    rho_t = torch.as_tensor(rho, dtype=torch.float64).expand(1, q.shape[1], 1)
    ul, hl = Fraction(ld.ul), Fraction(ld.hl)
    for i in range(q.shape[1]):
        for j in range(k.shape[1]):
            exact = sum(
                (abs(Fraction(float(a))) * (1 + ul) + hl)
                * (abs(Fraction(float(b))) * (1 + ul) + hl)
                for a, b in zip(q[0, i], k[0, j], strict=True)
            )
            bound = Fraction(kappa) * Fraction(float(absdot[0, i, j]))
            assert bound + Fraction(float(rho_t[0, i, 0])) >= exact, (i, j)


@pytest.mark.parametrize(
    "prec",
    [
        Precision("bf16"),
        Precision("fp32", compute="bf16"),
        Precision("fp32", compute="fp16"),
        Precision("fp32", compute="bf16", rounding="rtz"),  # a load truncates: 2u (a review)
        Precision("fp32", compute="fp16", rounding="rtz"),
    ],
    ids=str,
)
def test_a_load_error_is_charged_below_the_normal_range_only(prec: Precision) -> None:
    """``Loaded.err`` bounds ``|x~ - x|`` for a load that rounds to compute, or, in fp32
    compute (``Format.underflow``), flushes a value below its normal range to 0; at or
    above that range an exact load has no error at all (so the bounds skip the products of
    the values' errors): a value of 1e-8 in fp32 compute is held exactly, one of 1e-40 may
    be lost."""
    from attnprec.analysis.bounds.softmax import Loaded

    ld = Loaded(prec)
    fc = prec.compute
    mag = torch.tensor([0.0, 1e-45, 1e-40, 1e-38, 1e-30, 1e-8, 1e-5, 1.0, 300.0])
    # (mantissas at random: a truncation loses up to a whole ulp)
    mag = torch.cat([mag, 1 + torch.rand(512, generator=torch.Generator().manual_seed(0))])
    x = round_to(torch.cat([mag, -mag]).double(), prec.storage)
    err = ld.err(x)
    held = round_to(x, fc, prec.rounding)
    flushed = torch.where(held.abs() < fc.min_normal, 0.0, held)
    for loaded in (held, flushed) if fc.underflow == fc.min_normal else (held,):
        assert torch.all((loaded - x).abs() <= err)
    if ld.ul == 0:
        assert torch.all(err[x.abs() >= fc.min_normal] == 0)
        assert torch.all(err[x == 0] == 0)


@pytest.mark.parametrize(
    ("method", "kw"),
    [
        ("polynomial", {"coeffs": (1.0, 5e-324, 0.5)}),  # c s^p underflows to 0
        ("polynomial", {"coeffs": (1.0, 0.5, 0.5), "scale": 0.0}),
        ("taylor", {"degree": 2, "scale": 0.0}),
    ],
)
def test_feature_terms_that_vanish_in_float64_are_bounded(method, kw):
    """The featured bound took ``log(|c| s^p p!)`` of a coefficient term that underflows
    (a subnormal coefficient times the scale; the thorough profile's draw) or of a scale of
    0: a math domain error. Taken in logs, and a term with ``s^p = 0`` skipped, as a zero
    coefficient is."""
    from attnprec.attention import polynomial_attention, taylor_attention

    fn = {"polynomial": polynomial_attention, "taylor": taylor_attention}[method]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(8, 4, generator=g) for _ in range(3))
    eb = attention_error_bound(method, q, k, v, Precision("fp16"), **kw)
    ref = reference(method, q, k, v, **kw)
    qs, ks, vs = (round_to(x, "fp16").float() for x in (q, k, v))
    y = round_to(fn(qs, ks, vs, **kw).double(), "fp16")
    assert torch.isfinite(eb.total).all() and bool(ref.contains(y, eb.total).all())
