"""The score form of taylor and polynomial attention (``form="scores"``): the method computes
it, and its rounding bound holds against exact emulations of score-form kernels (every
operation rounded to its declared format, sums in several orders) in fp16/bf16/fp32 storage
with fp32, fp16- and bf16-native compute and accumulate."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnprec.analysis.bounds import attention_error_bound
from attnprec.analysis.precision import ONE_PASS, Precision, round_to
from attnprec.analysis.reference import reference
from attnprec.attention import polynomial_attention, taylor_attention
from attnprec.attention.taylor import taylor_coeffs
from attnprec.testing.inputs import FAMILIES, make_inputs

#: (storage, compute, accumulate) declarations emulated.
DECLS = (
    ("fp32", "fp32", "fp32"),
    ("fp16", "fp32", "fp32"),
    ("bf16", "fp32", "fp32"),
    ("fp16", "fp16", "fp16"),
    ("bf16", "bf16", "bf16"),
    ("fp16", "fp16", "fp32"),
    ("bf16", "bf16", "fp32"),
)
ORDERS = ("seq", "pairwise", "blocked")


class _Emu:
    """A score-form kernel emulated exactly: float64 values rounded after every operation
    (elementwise work to compute, products and additions of sums to accumulate)."""

    def __init__(self, prec: Precision, order: str, scale_on_q: bool, horner: bool):
        self.p, self.order, self.scale_on_q, self.horner = prec, order, scale_on_q, horner

    def c(self, x: torch.Tensor) -> torch.Tensor:
        return round_to(x, self.p.compute)

    def a(self, x: torch.Tensor) -> torch.Tensor:
        return round_to(x, self.p.accumulate)

    def _seq(self, x: torch.Tensor) -> torch.Tensor:
        acc = x[0]
        for i in range(1, x.shape[0]):
            acc = self.a(acc + x[i])
        return acc

    def sum(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Sum over ``dim`` in accumulate in the emulated order (terms already rounded)."""
        x = x.movedim(dim, 0)
        if x.shape[0] == 0:
            return torch.zeros(x.shape[1:], dtype=x.dtype)
        if self.order == "pairwise":
            while x.shape[0] > 1:
                h = x.shape[0] // 2
                y = self.a(x[0 : 2 * h : 2] + x[1 : 2 * h : 2])
                x = torch.cat([y, x[2 * h :]]) if x.shape[0] % 2 else y
            return x[0]
        if self.order == "blocked" and x.shape[0] > 3:
            b = 3
            parts = [self._seq(x[i : i + b]) for i in range(0, x.shape[0], b)]
            return self._seq(torch.stack(parts))
        return self._seq(x)

    def __call__(self, q, k, v, coeffs, sc, causal):
        q, k, v = (self.c(round_to(x.double(), self.p.storage)) for x in (q, k, v))
        scale = self.c(torch.tensor(sc, dtype=torch.float64))
        if self.scale_on_q:
            X = self.c(q * scale)
            s = self.sum(self.a(X.unsqueeze(-2) * k.unsqueeze(-3)), -1)
        else:
            s = self.c(self.sum(self.a(q.unsqueeze(-2) * k.unsqueeze(-3)), -1) * scale)
        s = self.c(s)
        cs = [self.c(torch.tensor(c, dtype=torch.float64)) for c in coeffs]
        if self.horner:
            w = cs[-1].expand_as(s)
            for c in reversed(cs[:-1]):
                w = self.c(self.c(w * s) + c)
        else:  # the power form: c_p s^p from s^(p-1), then the terms summed in order
            w, sp = cs[0].expand_as(s), None
            for c in cs[1:]:
                sp = s if sp is None else self.c(sp * s)
                w = self.c(w + self.c(c * sp))
        if causal:
            w = torch.where(torch.ones_like(w, dtype=torch.bool).tril(), w, 0.0)
        num = self.sum(self.a(w.unsqueeze(-1) * v.unsqueeze(-3)), -2)
        den = self.sum(self.a(w), -1)
        y = self.c(num / den.unsqueeze(-1))
        return round_to(y, self.p.storage)


def _check(method, q, k, v, prec, params, emu, causal, coeffs):
    """Violations of the sound rounding bound by the emulated kernel (finite elements), and
    the number of finite elements."""
    stored = tuple(round_to(x, prec.storage) for x in (q, k, v))
    sc = 1 / math.sqrt(q.shape[-1])
    eb = attention_error_bound(method, q, k, v, prec, causal=causal, form="scores", **params)
    ref = reference(method, *stored, causal=causal, **params)
    y = emu(q, k, v, coeffs, sc, causal)
    fin = torch.isfinite(eb.rounding)
    err = (y - ref.value).abs() - ref.radius
    assert bool((eb.typical.rounding <= eb.rounding).all())
    bad = fin & ~(err <= eb.rounding)  # a NaN output where the bound is finite counts
    return int(bad.sum()), int(fin.sum()), eb, y, ref


@settings(max_examples=40)
@given(
    st.sampled_from(FAMILIES),
    st.sampled_from(DECLS),
    st.integers(1, 4),
    st.booleans(),
    st.integers(1, 12),
    st.integers(1, 6),
    st.sampled_from(ORDERS),
    st.booleans(),
    st.booleans(),
    st.integers(0, 2**31),
)
def test_taylor_scores_sound(family, decl, degree, causal, n, d, order, on_q, horner, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = make_inputs(family, n_q=n, d_k=d, d_v=3, generator=g)
    prec = Precision(*decl)
    emu = _Emu(prec, order, on_q, horner)
    params = {"degree": degree}
    bad, _, _, _, _ = _check("taylor", q, k, v, prec, params, emu, causal, taylor_coeffs(degree))
    assert bad == 0


@settings(max_examples=25)
@given(
    st.sampled_from(FAMILIES),
    st.sampled_from(DECLS),
    st.lists(st.floats(-2, 2).map(lambda c: round(c, 3)), min_size=2, max_size=5),
    st.booleans(),
    st.integers(1, 10),
    st.sampled_from(ORDERS),
    st.booleans(),
    st.integers(0, 2**31),
)
def test_polynomial_scores_sound(family, decl, coeffs, causal, n, order, horner, seed):
    coeffs = [1.0 + abs(coeffs[0]), *coeffs[1:]]  # mostly positive normalizers
    g = torch.Generator().manual_seed(seed)
    q, k, v = make_inputs(family, n_q=n, d_k=4, d_v=2, generator=g)
    prec = Precision(*decl)
    emu = _Emu(prec, order, True, horner)
    params = {"coeffs": coeffs}
    bad, _, _, _, _ = _check("polynomial", q, k, v, prec, params, emu, causal, coeffs)
    assert bad == 0


@pytest.mark.parametrize("decl", [("bf16", "bf16", "bf16"), ("fp16", "fp16", "fp16")])
@pytest.mark.parametrize("family", FAMILIES)
def test_native_half_is_finite(decl, family):
    """The audit-power case (n = 64, d = 16, degree 2, one pass): every element bounded in
    the score form, and the bound holds (its tightness is in docs/bounds/taylor.md)."""
    g = torch.Generator().manual_seed(1000 + FAMILIES.index(family))
    dt = getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[decl[0]])
    q, k, v = (x.double() for x in make_inputs(family, n_q=64, d_k=16, dtype=dt, generator=g))
    prec = Precision(*decl, block=ONE_PASS)
    emu = _Emu(prec, "seq", True, False)
    bad, fin, eb, y, ref = _check("taylor", q, k, v, prec, {"degree": 2}, emu, False, (1, 1, 0.5))
    assert fin == eb.rounding.numel() and not eb.unbounded
    assert bad == 0
    assert bool(torch.isfinite(eb.total).all())


def test_scores_form_of_the_method():
    g = torch.Generator().manual_seed(3)
    q, k, v = make_inputs("typical", n_q=9, d_k=4, d_v=3, generator=g)
    for causal in (False, True):
        for degree in (1, 2, 3):
            f = taylor_attention(q, k, v, degree=degree, causal=causal, allow_nonpositive=True)
            s = taylor_attention(
                q, k, v, degree=degree, causal=causal, allow_nonpositive=True, form="scores",
                chunk_size=4,
            )  # fmt: skip
            torch.testing.assert_close(s, f, rtol=1e-12, atol=1e-12)
        c = (0.5, -0.25, 0.125)
        f = polynomial_attention(q, k, v, c, causal=causal, allow_nonpositive=True)
        s = polynomial_attention(q, k, v, c, causal=causal, allow_nonpositive=True, form="scores")
        torch.testing.assert_close(s, f, rtol=1e-12, atol=1e-12)
    h = taylor_attention(q.half(), k.half(), v.half(), form="scores")
    assert h.dtype == torch.float16 and h.shape == v.shape


def test_scores_form_bad_arguments():
    x = torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="form"):
        taylor_attention(x, x, x, form="direct")
    with pytest.raises(ValueError, match="form"):
        taylor_attention(x, x, x, causal=True, return_state=True, form="scores")
    with pytest.raises(ValueError, match="form"):
        attention_error_bound("taylor", x, x, x, "fp16", degree=2, form="direct")
    with pytest.raises(ValueError, match="coeffs"):
        polynomial_attention(x, x, x, (0.0, 0.0), form="scores")
    with pytest.raises(ValueError, match="coeffs"):  # the normalizer vanishes
        polynomial_attention(x, x, x, (-1.0,), form="scores")
    with pytest.raises(TypeError, match="form"):
        attention_error_bound("softmax", x, x, x, "fp16", form="scores")


def test_scores_bound_unbounded_when_the_polynomial_overflows():
    x = torch.full((3, 2), 40.0, dtype=torch.float64)
    eb = attention_error_bound("taylor", x, x, x, Precision("fp16", "fp16", "fp16"),
                               degree=4, form="scores")  # fmt: skip
    assert any("polynomial" in key for key in eb.unbounded)
    assert bool(torch.isinf(eb.total).all())


def test_a_horner_intermediate_past_the_format_at_a_small_score_is_unbounded():
    """Horner's ``b_k s`` is at most ``sum_{i>=k} |c_i| T^(i-k+1)``, which exceeds ``sum_p
    |c_p| T^p`` where ``|s| <= T < 1``: fp16 Horner of ``60000 s^5 + 60000 s^4 + 1`` at ``s =
    0.5`` forms 60000 * 0.5 + 60000 = 90000, inf, and the output is NaN, under a bound of
    0.0103 (a review). The intermediates' bound takes ``max(1, T)``, as documented."""
    coeffs = (1.0, 0.0, 0.0, 0.0, 60000.0, 60000.0)
    q = torch.tensor([[0.5]])
    k = torch.tensor([[1.0], [1.0]])
    v = torch.tensor([[1.0], [-1.0]])
    prec = Precision("fp16", compute="fp16", accumulate="fp32")
    half = torch.float16
    b5, s = torch.tensor(coeffs[5], dtype=half), torch.tensor(0.5, dtype=half)
    assert torch.isinf(b5 * s + torch.tensor(coeffs[4], dtype=half))  # the Horner step
    eb = attention_error_bound("polynomial", q, k, v, prec, scale=1.0, coeffs=coeffs, form="scores")
    assert "polynomial in fp16" in eb.unbounded and bool(torch.isinf(eb.total).all())


def test_a_hidden_keys_polynomial_past_the_format_names_the_rows_that_do_not_see_it():
    """A causal score-form kernel that forms every score and masks by a product: row 0
    does not see key 1, whose polynomial overflows fp16 (s = 636: s^2 / 2 past 65504), and
    inf * 0 makes row 0 NaN. Row 0 is named, though its own key is small (a mutation
    review: the hidden keys' check removed, no test failed)."""
    q = torch.tensor([[30.0, 0.0], [30.0, 0.0]])
    k = torch.tensor([[1.0, 0.0], [30.0, 0.0]])
    v = torch.ones(2, 1)
    prec = Precision("fp16", compute="fp16", accumulate="fp32")
    h = torch.float16
    s = (q.to(h) @ k.to(h).T) * torch.tensor(2**-0.5, dtype=h)
    w = (1 + s + s * s / 2) * torch.ones(2, 2, dtype=h).tril()  # masked by a product
    assert bool(torch.isnan(w[0]).any())  # the kernel's row 0
    eb = attention_error_bound("taylor", q, k, v, prec, degree=2, causal=True, form="scores")
    assert eb.unbounded and bool(torch.isinf(eb.total[0]).all())


def test_underflows_of_every_terms_chain_are_charged():
    """The power form with each coefficient first, ``fl(...fl(c_p s) ... s)``: with ``c_p =
    30 2^-24`` (fp16 subnormals) and ``s`` near 1 every product rounds back to ``30 2^-24``,
    half a subnormal spacing off, and the two keys drift apart. Each of the P terms' chains
    underflows; the bound charged one chain's 2P (Horner's), 1.14x outside at P = 16 (a
    review). Now each term's: the row is named, its weights' errors reaching the weights."""
    import numpy as np

    P, tiny = 16, 2.0**-24
    coeffs = [0.0] + [30 * tiny] * P
    prec = Precision("fp16", compute="fp16", accumulate="fp32", constants="folded")
    q = torch.ones(1, 1, dtype=torch.float64)
    k = torch.tensor([[0.98388671875], [1.0166015625]], dtype=torch.float64)
    v = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    w = []
    for s in (np.float16(k[0, 0]), np.float16(k[1, 0])):
        acc = np.float16(0)
        for p in range(1, P + 1):
            t = np.float16(coeffs[p])
            for _ in range(p):
                t = np.float16(t * s)
            acc = np.float16(acc + t)
        w.append(np.float32(acc))
    y = torch.tensor([[float(np.float16((w[0] - w[1]) / np.float32(w[0] + w[1])))]])
    ref = reference("polynomial", q, k, v, coeffs=coeffs, scale=1.0)
    eb = attention_error_bound("polynomial", q, k, v, prec, coeffs=coeffs, scale=1.0, form="scores")
    assert float((y - ref.value).abs()) > 0.13
    assert bool(ref.contains(y.double(), eb.rounding).all()), (eb.rounding, eb.unbounded)


def test_a_power_past_the_format_under_a_small_coefficient_is_unbounded():
    """The power form forms ``s^P`` before its coefficient: at ``s = 300`` in fp16, ``s^2`` is
    90,000, inf, though ``1e-3 s^2`` is 90 (the weight inf, the output NaN). The
    intermediates' bound keeps ``X^P`` beside ``sum_p |c_p| X^p`` (a mutation review: no test
    failed without it)."""
    h = torch.float16
    s = torch.tensor(300.0, dtype=h)
    assert torch.isinf(s * s) and not torch.isinf(torch.tensor(1e-3, dtype=h) * 90000.0)
    q, k, v = torch.tensor([[300.0]]), torch.tensor([[1.0], [0.5]]), torch.tensor([[1.0], [2.0]])
    prec = Precision("fp16", compute="fp16", accumulate="fp32")
    coeffs = (1.0, 0.0, 1e-3)
    eb = attention_error_bound("polynomial", q, k, v, prec, coeffs=coeffs, scale=1.0, form="scores")
    assert "polynomial in fp16" in eb.unbounded and bool(torch.isinf(eb.total).all())
