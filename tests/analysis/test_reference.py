"""Certified references: backends against each other and against direct mpmath evaluation.

Tolerance rules used below (documented in docs/reference.md):

- Two certified balls of the same exact value must overlap: |a - b| <= r_a + r_b.
- Ball backends settle every output to a ball radius <= 2^-60 max(|value|, max_j |v_jc|)
  (gated: 2^-60 |value|), plus the float conversion (<= ulp/2 <= 2^-53 |value|): the radius
  is <= 2^-52 max(|value|, ref).
- The direct evaluation below works at 300 bits on inputs with |s| <= 8 and n <= 5, so it
  loses far less than 100 bits: its error is <= 2^-200 max|v| (the slack we give it).
- The float64 backend's target: radius <= 1e-9 max_j |v_jc| (docs/reference.md).
- Tightness of the monomial states against the pairs (docs/reference.md): median radius
  ratio <= 32 (measured 3.5x; the states bound |w| by S(|scale| |q|.|k|)).
- A float64 error model checked alone at 200 bits must not be vacuous: the largest
  observed error reaches at least 1/100 of its bound somewhere.
"""

import itertools
import math

import mpmath
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnprec.analysis import _reference_ball, _reference_float64
from attnprec.analysis.reference import Reference, reference

F64 = torch.float64


class Terms:
    def __init__(self, terms):
        self.terms = terms


def _qkv(seed, shape_q, n_k, d_v, lo=-1.0, hi=1.0):
    g = torch.Generator().manual_seed(seed)
    *b, n_q, d_k = shape_q

    def r(*s):
        return lo + (hi - lo) * torch.rand(*s, generator=g, dtype=F64)

    return r(*b, n_q, d_k), r(*b, n_k, d_k), r(*b, n_k, d_v)


CASES = [
    ("softmax", {}),
    ("log", {}),
    ("taylor", {"degree": 2}),
    ("taylor", {"degree": 0}),
    ("polynomial", {"coeffs": [1.0, 1.0, 0.5, 1 / 6]}),
    ("linear", {}),
    ("linear", {"feature_map": lambda x: torch.relu(x) + 0.25}),
    (
        "favor",
        {"projection": torch.tensor([[0.5, -1.0, 0.25], [1.5, 0.5, -0.75]], dtype=F64)},
    ),
    ("semiring", {"semiring": Terms(((1.0, 1.0),))}),
    ("semiring", {"semiring": Terms(((0.75, 0.5), (0.25, 2.0)))}),
    ("semiring", {"semiring": Terms(())}),
    ("gated", {"log_g": -torch.linspace(0.0, 1.0, 4, dtype=F64)}),
    ("gated", {"log_g": -torch.rand(4, 3, generator=torch.Generator().manual_seed(3), dtype=F64)}),
]
IDS = [f"{m}-{i}" for i, (m, _) in enumerate(CASES)]


# --- direct evaluation from the definitions (docs/internals.md), element by element -------


def _mp(x):
    return mpmath.mpf(float(x))


def _direct(method, q, k, v, causal, scale, p):
    """Exact-enough output of one batch item, straight from the definitions."""
    n_q, d = q.shape
    n_k, d_v = v.shape
    if method == "gated":
        lg = p["log_g"]
        lg = lg.unsqueeze(-1).expand(n_k, d) if lg.dim() == 1 else lg
        st_ = [[mpmath.mpf(0)] * d_v for _ in range(d)]
        out = []
        for t in range(n_k):
            for c in range(d):
                g = mpmath.exp(_mp(lg[t, c]))
                for e in range(d_v):
                    st_[c][e] = g * st_[c][e] + _mp(k[t, c]) * _mp(v[t, e])
            out.append(
                [_mp(scale) * sum(_mp(q[t, c]) * st_[c][e] for c in range(d)) for e in range(d_v)]
            )
        return out

    def phi_elu1(x):
        return [_mp(a) + 1 if a > 0 else mpmath.exp(_mp(a)) for a in x]

    def weight(i, j):
        s = _mp(scale) * sum(_mp(q[i, c]) * _mp(k[j, c]) for c in range(d)) if scale else 0
        if method == "softmax":
            return mpmath.exp(s)
        if method == "log":
            return sum(mpmath.exp(_mp(scale) * (_mp(q[i, c]) + _mp(k[j, c]))) for c in range(d))
        if method == "taylor":
            return sum(s**r / mpmath.factorial(r) for r in range(p["degree"] + 1))
        if method == "polynomial":
            return sum(_mp(c) * s**r for r, c in enumerate(p["coeffs"]))
        if method == "semiring":
            return sum(_mp(c) * mpmath.exp(_mp(lam) * s) for c, lam in p["semiring"].terms)
        if method == "linear":
            fm = p.get("feature_map", "elu1")
            if fm == "elu1":
                a, b = phi_elu1(q[i]), phi_elu1(k[j])
            else:
                a = [_mp(x) for x in fm(q[i : i + 1])[0]]
                b = [_mp(x) for x in fm(k[j : j + 1])[0]]
            return sum(x * y for x, y in zip(a, b, strict=True))
        if method == "favor":
            w = p["projection"]
            m = w.shape[0]
            rs = mpmath.sqrt(_mp(scale))

            def phi(x):
                xs = [rs * _mp(a) for a in x]
                nrm = sum(a * a for a in xs) / 2
                return [
                    mpmath.exp(sum(_mp(w[r, c]) * xs[c] for c in range(d)) - nrm) / mpmath.sqrt(m)
                    for r in range(m)
                ]

            return sum(a * b for a, b in zip(phi(q[i]), phi(k[j]), strict=True))
        raise AssertionError(method)

    out = []
    for i in range(n_q):
        js = range(i + 1) if causal else range(n_k)
        if method == "semiring" and not p["semiring"].terms:
            ss = {j: sum(_mp(q[i, c]) * _mp(k[j, c]) for c in range(d)) * _mp(scale) for j in js}
            top = max(ss.values())
            ties = [j for j in js if ss[j] == top]
            out.append([sum(_mp(v[j, e]) for j in ties) / len(ties) for e in range(d_v)])
            continue
        w = {j: weight(i, j) for j in js}
        den = sum(w.values())
        out.append([sum(w[j] * _mp(v[j, e]) for j in js) / den for e in range(d_v)])
    return out


def _overlap(a: Reference, b: Reference):
    return ((a.value - b.value).abs() <= a.radius + b.radius).all()


def _settled_rule(r: Reference, v: torch.Tensor, gated: bool):
    ref = torch.zeros_like(r.value) if gated else v.abs().amax(dim=-2, keepdim=True)
    return (r.radius <= 2.0**-52 * torch.maximum(r.value.abs(), ref)).all()


# --- backends against the definitions and each other --------------------------------------


@pytest.mark.parametrize(
    "method,params,causal",
    # gated is causal only (its causal=False is a ValueError, in test_bad_input)
    [(m, p, c) for m, p in CASES for c in (False, True) if c or m != "gated"],
    ids=[
        f"{i}-{c}"
        for i, (m, _) in zip(IDS, CASES, strict=True)
        for c in (False, True)
        if c or m != "gated"
    ],
)
def test_ball_backends_match_direct_mpmath(method, params, causal):
    q, k, v = _qkv(7, (4, 3), 4, 2, lo=-2.0, hi=2.0)
    if method == "semiring" and not params["semiring"].terms:
        k[2] = k[1]  # an exact tie in every row that sees both
    out = {
        be: reference(method, q, k, v, causal=causal, backend=be, **params)
        for be in ("arb", "mpmath")
    }
    assert out["arb"].backend == "arb" and out["mpmath"].backend == "mpmath"
    assert _overlap(out["arb"], out["mpmath"])
    sc = {"log": 1.0, "linear": None}.get(method, 1 / math.sqrt(3))
    with mpmath.workprec(300):
        want = _direct(method, q, k, v, causal, sc, params)
        slack = 2.0**-200 * float(v.abs().max())
        for r in out.values():
            assert _settled_rule(r, v, method == "gated")
            for i, row in enumerate(want):
                for e, w in enumerate(row):
                    err = abs(w - mpmath.mpf(float(r.value[i, e])))
                    assert err <= mpmath.mpf(float(r.radius[i, e])) + slack, (i, e)


def test_tropical_ties_are_averaged_exactly():
    q = torch.tensor([[1.0, 0.0]], dtype=F64)
    k = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=F64)
    v = torch.tensor([[1.0], [2.0], [100.0]], dtype=F64)
    for be in ("arb", "mpmath"):
        r = reference("semiring", q, k, v, semiring=Terms(()), backend=be)
        assert r.value.item() == 1.5 and r.radius.item() == 0.0
    # A tie in float64 that is none: q.k_0 = (1 + 2^-50)^2 = 1 + 2^-49 + 2^-100 rounds to
    # q.k_1 = 1 + 2^-49; the exact comparison picks k_0 alone.
    a = 1 + 2.0**-50
    q = torch.tensor([[a, 1.0]], dtype=F64)
    k = torch.tensor([[a, 0.0], [0.0, 1 + 2.0**-49]], dtype=F64)
    v = torch.tensor([[1.0], [2.0]], dtype=F64)
    r = reference("semiring", q, k, v, semiring=Terms(()), scale=1.0)
    assert r.value.item() == 1.0 and r.radius.item() == 0.0


@pytest.mark.parametrize("n", [60, 64])
@pytest.mark.parametrize(
    ("method", "kw"),
    [
        ("softmax", {}),
        ("softmax", {"softcap": 2.0}),
        ("semiring", {"semiring": Terms(((0.75, 0.5), (0.25, 2.0)))}),
    ],
)
def test_float64_masks_in_the_pair_blocks(monkeypatch, method, kw, n):
    """A sliding window and key masks (per batch item) hide keys in the float64 backend's
    pair blocks, as the causal mask does: every row, sampled rows, blocks of a few rows and
    key blocks of 8 (so that a window starts past the first; n = 64 leaves no padding
    column), each ball meeting the ball reference's (which certifies each row over the
    keys it sees) and certified tightly, also where a hidden key has a huge norm (it must
    not loosen the rows that do not see it)."""
    import importlib

    ref_mod = importlib.import_module("attnprec.analysis.reference")
    monkeypatch.setattr(_reference_float64, "KEY_BLOCK", 8)
    monkeypatch.setattr(_reference_float64, "BLOCK_ELEMS", 2 * 5 * 64)
    # no ball repairs: the float64 bound itself must be tight
    monkeypatch.setattr(ref_mod, "FLOAT64_REPAIR_WORK", 0)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, n, 4, generator=g, dtype=F64) for _ in range(3))
    km = torch.rand(2, n, generator=g) > 0.4
    km[:, 0] = True
    km[:, 5] = False
    k[:, 5] *= 1e150  # masked, and outside the window of the rows past 5 + window
    be = "arb" if _reference_ball.HAVE_FLINT else "mpmath"
    cases = [({"window": 9}, True), ({"key_mask": km}, True), ({"key_mask": km}, False),
             ({"window": 13, "key_mask": km}, True)]  # fmt: skip
    for masks, causal in cases:
        for rows in (None, torch.tensor([0, 7, 8, 31, 59])):
            a = reference(
                method, q, k, v, causal=causal, backend="float64", rows=rows, **masks, **kw
            )
            b = reference(method, q, k, v, causal=causal, backend=be, rows=rows, **masks, **kw)
            assert a.backend == "float64"
            # (an infinite radius claims nothing: rows that see key 5, unrepaired here)
            met = ((a.value - b.value).abs() <= a.radius + b.radius) | torch.isinf(a.radius)
            assert bool(met.all()), masks
            # tight on the rows that do not see key 5 (only a bare window shows it, to 5 ..
            # 5 + window - 1)
            at = torch.arange(n) if rows is None else rows
            sees = (at >= 5) & (at < 5 + masks["window"]) if "key_mask" not in masks else at < 0
            rule = ref_mod.FLOAT64_REPAIR_REL * v.abs().amax()  # (what repairs would meet)
            assert bool((a.radius[:, ~sees] <= rule).all()), masks


@pytest.mark.parametrize(
    ("method", "kw"),
    [
        ("log", {}),
        ("favor", {"projection": "W"}),
        ("linear", {}),
        ("linear", {"feature_map": None}),
        ("taylor", {"degree": 2}),
        ("polynomial", {"coeffs": [0.5, -1.0, 1.5]}),
    ],
)
def test_float64_masks_of_every_method(monkeypatch, method, kw):
    """Key masks in every float64 method's row blocks (the factored methods' masked keys as
    features of exactly 0, the signed weights by pairs) and windows in the pair blocks (the
    factored methods' as products of their features): each ball meets the ball reference's,
    every row and sampled rows, both visibilities, and no row is certified on its own. Linear
    over given features: nonnegative (factored) and signed (pairs)."""
    import importlib

    from attnprec.attention.favor import favor_projection

    ref_mod = importlib.import_module("attnprec.analysis.reference")
    monkeypatch.setattr(_reference_float64, "KEY_BLOCK", 8)
    monkeypatch.setattr(_reference_float64, "BLOCK_ELEMS", 2 * 5 * 64)
    be = "arb" if _reference_ball.HAVE_FLINT else "mpmath"
    g = torch.Generator().manual_seed(2)
    n = 44
    q, k, v = (torch.randn(2, n, 4, generator=g, dtype=F64) for _ in range(3))
    km = torch.rand(2, n, generator=g) > 0.4
    km[:, 0] = True
    if kw.get("projection") == "W":
        kw = {"projection": favor_projection(6, 4, generator=g)}
    inputs = [(q, k)]
    if kw.get("feature_map", "") is None:
        inputs.append((q.abs() + 0.1, k.abs() + 0.1))
    cases = [({"key_mask": km}, True), ({"key_mask": km}, False), ({"window": 7}, True),
             ({"window": 11, "key_mask": km}, True)]  # fmt: skip
    per_row, rows_fn = [], ref_mod._rows  # (one problem per row: the ball backends only)
    monkeypatch.setattr(ref_mod, "_rows", lambda *a: per_row.append(1) or rows_fn(*a))
    for qq, kk in inputs:
        for masks, causal in cases:
            for rows in (None, torch.tensor([0, 7, 8, 31, n - 1])):
                a = reference(
                    method, qq, kk, v, causal=causal, backend="float64", rows=rows, **masks, **kw
                )
                assert not per_row, masks
                b = reference(
                    method, qq, kk, v, causal=causal, backend=be, rows=rows, **masks, **kw
                )
                per_row.clear()
                # tight: within the repair rule (else ball-repaired)
                tight = a.radius <= ref_mod.FLOAT64_REPAIR_REL * v.abs().amax()
                met = ((a.value - b.value).abs() <= a.radius + b.radius) & tight
                assert bool(met.all()), (masks, causal, rows)


@pytest.mark.parametrize("masks", [{}, {"window": 7}])
@pytest.mark.parametrize(("method", "offset"), [("log", 1000.0), ("favor", 10.0)])
def test_float64_featured_weights_carry_their_features_error(monkeypatch, masks, method, offset):
    """Large inputs close together (features whose exponents round by ~1e-13, weights
    that stay comparable): the factored methods' radius must count their features'
    error, in the key states and in a window's pairs (without it, 4-25x below the true
    error here), each ball meeting the ball reference's."""
    from attnprec.attention.favor import favor_projection

    monkeypatch.setattr(_reference_float64, "KEY_BLOCK", 8)
    monkeypatch.setattr(_reference_float64, "BLOCK_ELEMS", 2 * 5 * 64)
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, 44, 4, generator=g, dtype=F64) * 0.3 + offset for _ in range(2))
    v = torch.randn(2, 44, 4, generator=g, dtype=F64)
    kw = {"scale": 0.3} if method == "log" else {"projection": favor_projection(6, 4, generator=g)}
    be = "arb" if _reference_ball.HAVE_FLINT else "mpmath"
    a = reference(method, q, k, v, causal=True, backend="float64", **masks, **kw)
    b = reference(method, q, k, v, causal=True, backend=be, **masks, **kw)
    assert a.backend == "float64"
    assert bool(((a.value - b.value).abs() <= a.radius + b.radius).all())


@pytest.mark.parametrize("method", ["favor", "linear"])
def test_float64_windowed_rows_far_below_their_block(monkeypatch, method):
    """A window holding only a key far below the others of its row block (FAVOR+: a key of
    norm ~300, whose feature is exp(-8e4) relative to its neighbours'; elu + 1: keys of
    -700 beside keys of +700): at the block's shift its weights underflow, so the row is
    redone over its own keys (the row was NaN, radius inf, found by a review): finite and
    meeting the ball reference's, with no ball repairs."""
    import importlib

    from attnprec.attention.favor import favor_projection

    ref_mod = importlib.import_module("attnprec.analysis.reference")
    monkeypatch.setattr(ref_mod, "FLOAT64_REPAIR_WORK", 0)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, 3, generator=g, dtype=F64) for _ in range(3))
    if method == "favor":
        k[:, 3] += 300.0
        kw = {"projection": favor_projection(5, 3, generator=g)}
    else:
        k[:, ::2] = -700.0 + k[:, ::2]
        k[:, 1::2] = 700.0 + k[:, 1::2]
        kw = {}
    be = "arb" if _reference_ball.HAVE_FLINT else "mpmath"
    a = reference(method, q, k, v, causal=True, backend="float64", window=1, **kw)
    b = reference(method, q, k, v, causal=True, backend=be, window=1, **kw)
    assert bool(torch.isfinite(a.radius).all())
    assert bool(((a.value - b.value).abs() <= a.radius + b.radius).all())


def test_float64_log_per_pair_rows_hide_masked_and_windowed_keys(monkeypatch):
    """Log attention's rows whose factorized normalizer underflows take a shift per pair
    (``_log_pairs``), which hides each batch item's masked keys too, and the keys outside a
    window (its row blocks' pairs; key blocks of 8, so that a window starts past the
    first): each ball meets the ball reference's."""
    import importlib

    ref_mod = importlib.import_module("attnprec.analysis.reference")
    monkeypatch.setattr(_reference_float64, "KEY_BLOCK", 8)
    monkeypatch.setattr(_reference_float64, "BLOCK_ELEMS", 2 * 5 * 32)
    calls = []
    pairs = _reference_float64._log_pairs
    monkeypatch.setattr(_reference_float64, "_log_pairs", lambda *x: calls.append(1) or pairs(*x))
    be = "arb" if _reference_ball.HAVE_FLINT else "mpmath"
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 30, 4, generator=g, dtype=F64) for _ in range(3))
    k[:, 25] = 900.0  # visible; the causal rows before it underflow in the factored form
    km = torch.ones(2, 30, dtype=torch.bool)
    km[0, 3] = km[1, 7] = False  # per batch item
    cases = [({"key_mask": km}, True), ({"key_mask": km}, False), ({"window": 9}, True),
             ({"window": 4, "key_mask": km}, True)]  # fmt: skip
    for masks, causal in cases:
        a = reference("log", q, k, v, causal=causal, backend="float64", scale=1.0, **masks)
        b = reference("log", q, k, v, causal=causal, backend=be, scale=1.0, **masks)
        assert bool(((a.value - b.value).abs() <= a.radius + b.radius).all()), masks
        assert bool((a.radius <= ref_mod.FLOAT64_REPAIR_REL * v.abs().amax()).all()), masks
        # the per-pair path ran where rows do not see key 25 (causal: those before it)
        assert bool(calls) == causal, masks
        calls.clear()


@pytest.mark.parametrize(
    ("method", "kw"),
    [
        ("softmax", {}),
        ("log", {}),
        ("favor", {"projection": "W"}),
        ("linear", {}),
        ("linear", {"feature_map": None}),
        ("taylor", {"degree": 2}),
    ],
)
def test_float64_masked_keys_hold_anything(method, kw):
    """What a masked (padding) key holds reaches no output, nor the float64 bound: keys of
    norm 1e3 (their features overflow) and values of 1e200 leave every radius within the
    repair rule of the values that count, causal or not, where they used to loosen every
    row (radii up to 1e92) or leave it infinite."""
    import importlib

    from attnprec.attention.favor import favor_projection

    ref_mod = importlib.import_module("attnprec.analysis.reference")
    be = "arb" if _reference_ball.HAVE_FLINT else "mpmath"
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 24, 4, generator=g, dtype=F64) for _ in range(3))
    km = torch.rand(2, 24, generator=g) > 0.3
    km[:, 0] = True
    if kw.get("projection") == "W":
        kw = {"projection": favor_projection(6, 4, generator=g)}
    vmax = v.abs().amax()
    k[~km], v[~km] = k[~km] * 1e3, 1e200
    for causal in (True, False):
        a = reference(method, q, k, v, causal=causal, backend="float64", key_mask=km, **kw)
        b = reference(method, q, k, v, causal=causal, backend=be, key_mask=km, **kw)
        assert bool(((a.value - b.value).abs() <= a.radius + b.radius).all()), causal
        assert bool((a.radius <= ref_mod.FLOAT64_REPAIR_REL * vmax).all()), causal


def test_float64_masks_repair_and_slow_rows(monkeypatch):
    """Under a window or key mask, the rows the float64 bound leaves loose are repaired
    over the keys each sees (dots past float64's range, brought back by a tiny scale), and
    rows widened by visible keys of huge norm are redone per key (``_softmax_rows``) for
    the right batch item: every ball meets the ball reference's."""
    import importlib

    ref_mod = importlib.import_module("attnprec.analysis.reference")
    be = "arb" if _reference_ball.HAVE_FLINT else "mpmath"
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(1, 6, 2, generator=g, dtype=F64) * 1e200 for _ in range(2))
    v = torch.randn(1, 6, 2, generator=g, dtype=F64)
    km = torch.tensor([[True, False, True, False, True, True]])
    for masks in ({"key_mask": km}, {"window": 2}):
        a = reference("softmax", q, k, v, causal=True, scale=1e-300, backend="float64", **masks)
        b = reference("softmax", q, k, v, causal=True, scale=1e-300, backend=be, **masks)
        assert bool(((a.value - b.value).abs() <= a.radius + b.radius).all()), masks
        # repaired, not left infinite: within the repair rule
        assert bool((a.radius <= ref_mod.FLOAT64_REPAIR_REL * v.abs().amax()).all())
    calls = []
    slow = _reference_float64._softmax_rows
    monkeypatch.setattr(_reference_float64, "_softmax_rows", lambda *x: calls.append(1) or slow(*x))
    monkeypatch.setattr(_reference_float64, "KEY_BLOCK", 8)
    g = torch.Generator().manual_seed(0)
    n = 64
    q = torch.rand(2, n, 4, generator=g, dtype=F64) + 0.5
    k, v = (
        torch.randn(2, n, 4, generator=g, dtype=F64),
        torch.randn(2, n, 3, generator=g, dtype=F64),
    )
    huge = torch.rand(2, n, generator=g) < 0.15
    k[huge] = -(torch.rand(int(huge.sum()), 4, generator=g, dtype=F64) + 0.5) * 1e12
    km = torch.rand(2, n, generator=g) > 0.3
    km[:, 0] = True
    for masks in ({"window": 20}, {"key_mask": km}):
        a = reference("softmax", q, k, v, causal=True, backend="float64", **masks)
        b = reference("softmax", q, k, v, causal=True, backend=be, **masks)
        assert bool(((a.value - b.value).abs() <= a.radius + b.radius).all()), masks
    assert calls  # the per-key path ran


def test_a_window_past_the_sequence_is_the_causal_prefix():
    """A window longer than the sequence (2^70: past int64 where it meets the positions)
    sees every earlier key: the reference's values and the bound are those without it
    (the float64 radius may be tighter: it takes each row's own keys' extremes)."""
    from attnprec.analysis.bounds import attention_error_bound

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(50, 4, generator=g, dtype=F64) for _ in range(3))
    for be in ("float64", "mpmath"):
        a = reference("softmax", q, k, v, causal=True, window=2**70, backend=be)
        b = reference("softmax", q, k, v, causal=True, backend=be)
        assert torch.equal(a.value, b.value) and bool((a.radius <= b.radius).all())
    x = (q.half(), k.half(), v.half())
    a = attention_error_bound("softmax", *x, "fp16", causal=True, window=2**70)
    assert torch.equal(a.total, attention_error_bound("softmax", *x, "fp16", causal=True).total)


def test_tropical_single_survivor_needs_the_screening_bound():
    """float64 orders these two scores the wrong way round (both round to 2; exactly, key 0
    leads by ~1e-31): a row keeps its one survivor only past the dot product's error
    bound, so the screening keeps both and the rationals pick key 0. A lone survivor's
    value is taken as stored, but a -0.0 comes back as the rationals' +0.0."""
    q = torch.tensor([[1.0000000000000007, 1.000000000000001]], dtype=F64)
    k = torch.tensor(
        [[0.9999999999999991, 1.0000000000000007], [1.0000000000000002, 0.9999999999999996]],
        dtype=F64,
    )
    assert (q @ k[0]).item() <= (q @ k[1]).item()  # float64's order is the wrong one
    v = torch.tensor([[1.0], [2.0]], dtype=F64)
    r = reference("semiring", q, k, v, semiring=Terms(()), scale=1.0)
    assert r.value.item() == 1.0 and r.radius.item() == 0.0
    one, k, v = (torch.tensor(x, dtype=F64) for x in ([[1.0]], [[1.0], [0.0]], [[-0.0], [1.0]]))
    r = reference("semiring", one, k, v, semiring=Terms(()), scale=1.0)
    assert r.value.item() == 0.0 and math.copysign(1.0, r.value.item()) == 1.0


@pytest.mark.parametrize("pairs", [1, 7, 50, 2**20])
@pytest.mark.parametrize("causal", [False, True])
def test_tropical_streams_in_blocks(monkeypatch, pairs, causal):
    """The tropical screening by blocks of ``pairs`` (row, key) pairs (one row and key
    blocks of one or seven keys; two rows per block; all at once) gives each row the
    exact mean of its tied maxima: small integers make ties on most rows, checked against
    every pair in Fractions; rows with a single leader included, and zero queries (every
    key ties: the prefix sums), also at scale 0 (every row); sampled rows at their
    positions."""
    from fractions import Fraction

    monkeypatch.setattr(_reference_ball, "TROPICAL_PAIRS", pairs)
    g = torch.Generator().manual_seed(3)
    n, d = 23, 3
    q, k = (torch.randint(-2, 3, (n, d), generator=g).to(F64) for _ in range(2))
    q[::6] = 0.0
    v = torch.randn(n, 2, generator=g, dtype=F64)
    for scale, rows in ((1.0, None), (0.0, None), (1.0, [0, 3, 6, 11, 12, 22])):
        r = reference(
            "semiring", q, k, v, semiring=Terms(()), causal=causal, scale=scale, rows=rows
        )
        singles = 0
        for at, i in enumerate(range(n) if rows is None else rows):
            keys = range(i + 1 if causal else n)
            s = {
                j: scale
                * sum(
                    Fraction(float(a)) * Fraction(float(b)) for a, b in zip(q[i], k[j], strict=True)
                )
                for j in keys
            }
            ties = [j for j in keys if s[j] == max(s.values())]
            singles += len(ties) == 1
            for c in range(2):
                mean = sum(Fraction(float(v[j, c])) for j in ties) / len(ties)
                assert float(r.value[at, c]) == float(mean)
                assert Fraction(float(r.radius[at, c])) >= abs(
                    mean - Fraction(float(r.value[at, c]))
                )
        # both kinds of row at scale 1; at scale 0 every row ties (a causal first row alone)
        assert 0 < singles < (n if rows is None else len(rows)) if scale else singles == causal


#: Methods of the float64 backend with positive weights on every input (so the radius
#: target applies): Taylor of even degree and a polynomial with a negative coefficient
#: but no real root; linear over positive given features (q, k passed through exp below).
F64_CASES = [
    ("softmax", {}),
    ("log", {}),
    ("taylor", {"degree": 2}),
    ("polynomial", {"coeffs": [0.5, -1.0, 1.5]}),
    ("linear", {"feature_map": torch.exp}),
    ("linear", {}),  # elu + 1 features, computed by the float64 backend
]


@pytest.mark.parametrize(("method", "params"), F64_CASES, ids=[c[0] for c in F64_CASES])
@pytest.mark.parametrize("causal", [False, True])
def test_float64_backend_contains_arb(method, params, causal):
    # 300 keys: two key blocks with padding; scores up to ~40 exercise the shift.
    q, k, v = _qkv(11, (2, 300, 5), 300, 3, lo=-3.0, hi=3.0)
    ra = reference(method, q, k, v, causal=causal, backend="arb", **params)
    rf = reference(method, q, k, v, causal=causal, backend="float64", **params)
    assert rf.backend == "float64"
    assert _overlap(ra, rf)
    assert (rf.radius <= 1e-9 * v.abs().amax(dim=-2, keepdim=True)).all()


@given(
    case=st.sampled_from(
        [
            ("softmax", {"scale": 1.0}),
            ("log", {"scale": 1.0}),
            ("taylor", {"degree": 3, "scale": 1.0}),  # odd: the normalizer may vanish
            ("polynomial", {"coeffs": [0.3, -2.0, 0.0, 1.0, -0.25], "scale": 1.0}),
            ("linear", {"feature_map": None}),  # signed features: signed weights
        ]
    ),
    n=st.integers(1, 5),
    d=st.integers(1, 4),
    e=st.integers(-40, 6),
    seed=st.integers(0, 2**31 - 1),
    causal=st.booleans(),
)
def test_float64_backend_contains_arb_wide_ranges(case, n, d, e, seed, causal):
    """Scores from 2^-40 to ~2^12 (weights down to underflow, or cancelling): the float64
    ball must hold (an infinite radius where the normalizer's sign is not certain)."""
    method, params = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=g, dtype=F64) * 2.0**e
    k = torch.randn(n, d, generator=g, dtype=F64) * 2.0 ** (e / 2)
    v = torch.randn(n, 2, generator=g, dtype=F64) * 2.0 ** torch.randint(
        -30, 30, (n, 2), generator=g
    )
    ra = reference(method, q, k, v, causal=causal, backend="arb", **params)
    rf = reference(method, q, k, v, causal=causal, backend="float64", **params)
    ok = torch.isinf(rf.radius) | ((ra.value - rf.value).abs() <= ra.radius + rf.radius)
    assert ok.all()


def test_torch_exp_meets_the_float64_assumption():
    """The float64 backend assumes torch's exp within EXP_ULPS ulps; measure it."""
    g = torch.Generator().manual_seed(5)
    t = torch.cat(
        [
            torch.empty(4000, dtype=F64).uniform_(-745.0, 709.0, generator=g),
            torch.empty(4000, dtype=F64).uniform_(-1.0, 1.0, generator=g),
            torch.empty(2000, dtype=F64).uniform_(-1e-8, 1e-8, generator=g),
        ]
    )
    y = torch.exp(t)
    worst = 0.0
    with mpmath.workprec(200):
        for ti, yi in zip(t.tolist(), y.tolist(), strict=True):
            ex = mpmath.exp(mpmath.mpf(ti))
            if ex < 2.0**-1022:
                assert abs(yi - ex) <= _reference_float64.EXP_TINY
                continue
            worst = max(worst, float(abs(yi - ex) / math.ulp(float(ex))))
    assert worst <= _reference_float64.EXP_ULPS


def test_auto_backend_choice():
    q, k, v = _qkv(1, (3, 2), 3, 2)
    assert reference("softmax", q, k, v).backend == (
        "arb" if _reference_ball.HAVE_FLINT else "mpmath"
    )
    big = torch.zeros(1, 1500, 4, dtype=F64)  # n^2 (d_k + d_v) > AUTO_FLOAT64_WORK
    assert reference("softmax", big, big, big).backend == "float64"


def test_batch_broadcast_and_low_precision_inputs():
    q, _, _ = _qkv(2, (2, 1, 3, 4), 3, 2)
    _, k, v = _qkv(3, (1, 3, 3, 4), 3, 2)
    r = reference("softmax", q.half(), k.half(), v.half(), causal=True)
    assert r.value.shape == (2, 3, 3, 2) and r.value.dtype == F64
    one = reference("softmax", q[1, 0].half(), k[0, 2].half(), v[0, 2].half(), causal=True)
    assert torch.equal(r.value[1, 2], one.value) and torch.equal(r.radius[1, 2], one.radius)


def test_zero_normalizer_gives_infinite_radius():
    q = torch.tensor([[1.0], [-1.0]], dtype=F64)
    k = torch.tensor([[1.0]], dtype=F64)
    v = torch.tensor([[3.0]], dtype=F64)
    # Taylor degree 1: w = 1 + s, s = -1 for the second query: normalizer exactly 0.
    for be in ("arb", "mpmath"):
        r = reference("taylor", q, k, v, degree=1, scale=1.0, backend=be)
        assert r.value[0].item() == 3.0 and r.radius[0].item() < 1e-15
        assert math.isinf(r.radius[1].item())
        assert r.contains(torch.tensor([[3.0], [-7.0]], dtype=F64)).all()
    # Polynomial with negative weights: w = 1 + 2^-52 - s, a normalizer 2^-52 > 0.
    q = torch.tensor([[1.0]], dtype=F64)
    r = reference("polynomial", q, k, v, coeffs=[1.0 + 2.0**-52, -1.0], scale=1.0)
    assert r.value.item() == 3.0 and r.radius.item() <= 2.0**-50


def test_nan_inputs_propagate():
    q, k, v = _qkv(4, (4, 2), 4, 3)
    q[0, 1] = math.nan
    v[2, 1] = math.nan
    r = reference("softmax", q, k, v, causal=True)
    nan = torch.isnan(r.value)
    want = torch.zeros(4, 3, dtype=torch.bool)
    want[0] = True
    want[2:, 1] = True
    assert torch.equal(nan, want) and torch.equal(torch.isnan(r.radius), want)
    q, k, v = _qkv(4, (4, 2), 4, 3)
    k[1, 0] = math.nan
    r = reference("softmax", q, k, v, causal=True)
    assert torch.isnan(r.value[1:]).all() and not torch.isnan(r.value[0, 0])


@pytest.mark.parametrize("backend", ["arb", "float64"])
def test_a_nan_key_no_row_sees_reaches_no_row(backend):
    """A NaN in a padding key that ``key_mask`` hides, or in a key outside every later
    row's window: those rows' exact outputs are finite, equal to the outputs with any
    finite key there (a review: every row came back NaN, value and radius, so the audit
    called a correct masked kernel violated). A NaN value row the mask hides too."""
    q, k, v = _qkv(5, (4, 3), 4, 2)
    bad_k, bad_v = k.clone(), v.clone()
    bad_k[0, 1], bad_v[0, 0] = math.nan, math.nan
    keep = torch.tensor([False, True, True, True])
    r = reference("softmax", q, bad_k, bad_v, key_mask=keep, backend=backend)
    good = reference("softmax", q, k, v, key_mask=keep, backend=backend)
    assert torch.equal(r.value, good.value) and torch.equal(r.radius, good.radius)
    r = reference("softmax", q, bad_k, v, causal=True, window=2, backend=backend)
    assert torch.isnan(r.value[:2]).all() and not torch.isnan(r.value[2:]).any()
    assert not torch.isnan(r.radius[2:]).any()


def test_contains_is_exact():
    r = Reference(torch.tensor([1.0], dtype=F64), torch.tensor([2.0**-60], dtype=F64), "arb")
    assert r.contains(torch.tensor([1.0], dtype=F64)).all()
    assert not r.contains(torch.tensor([1.0 + 2.0**-52], dtype=F64)).any()
    assert r.contains(torch.tensor([1.0 + 2.0**-52], dtype=F64), slack=2.0**-52).all()
    assert not r.contains(torch.tensor([math.nan], dtype=F64)).any()


def test_contains_agrees_with_exact_rationals():
    """A review: ``radius + slack`` rounded upward took ``y = 1 + 2^-52`` inside a ball of
    value 0 and radius 1, and ``y = 1`` inside value ``-1e-30`` radius 1. Decided against
    Fractions on points at and one ulp either side of the ball's edges, with slacks that
    round when added."""
    from fractions import Fraction

    g = torch.Generator().manual_seed(5)
    vals = [0.0, -1e-30, 1.0, 3.0, -2.5e-300, 1e300]
    rads = [1.0, 2.0**-60, 0.0, 1e-300, 0.75]
    slacks = [0.0, 2.0**-52, 1e-17, 0.1]
    for val, rad, sl in itertools.product(vals, rads, slacks):
        ref = Reference(torch.tensor([val], dtype=F64), torch.tensor([rad], dtype=F64), "arb")
        edge = Fraction(rad) + Fraction(sl)
        for side in (1, -1):
            y0 = float(Fraction(val) + side * edge)
            ys = [y0, math.nextafter(y0, math.inf), math.nextafter(y0, -math.inf)]
            ys.append(val + side * float(torch.rand(1, generator=g, dtype=F64)))
            for y in ys:
                want = abs(Fraction(y) - Fraction(val)) <= edge
                got = bool(ref.contains(torch.tensor([y], dtype=F64), slack=sl)[0])
                assert got == want, (val, rad, sl, y)


def test_ball_to_float_rounds_outward():
    # mid = 1 + 2^-60 (not a float), rad = 2^-70: value 1.0, radius covers both.
    val, rad, rb = _reference_ball.ball_to_float(((2**60 + 1, -60), (1, -70)))
    assert val == 1.0 and rad >= 2.0**-60 + 2.0**-70 and rb >= 2.0**-70
    assert _reference_ball.ball_to_float(((3, -1), (0, 0))) == (1.5, 0.0, 0.0)
    assert _reference_ball.ball_to_float(None)[1] == math.inf


# --- bad input ------------------------------------------------------------------------------

Q, K, V = _qkv(0, (3, 2), 3, 2)


@pytest.mark.parametrize(
    "args,kwargs,exc,name",
    [
        (("nope", Q, K, V), {}, ValueError, "method"),
        (("softmax", Q, K, V), {"backend": "gpu"}, ValueError, "backend"),
        (("softmax", Q, K[:, :1], V), {}, ValueError, "k"),
        (("softmax", Q, K, V[:2]), {}, ValueError, "v"),
        (("softmax", Q[:2], K, V), {"causal": True}, ValueError, "causal"),
        (("softmax", Q.long(), K, V), {}, TypeError, "q"),
        (("softmax", Q, K, V), {"degree": 2}, TypeError, "degree"),
        (("taylor", Q, K, V), {"degree": -1}, ValueError, "degree"),
        (("taylor", Q, K, V), {"degree": 1.5}, TypeError, "degree"),
        (("polynomial", Q, K, V), {}, ValueError, "coeffs"),
        (("polynomial", Q, K, V), {"coeffs": []}, ValueError, "coeffs"),
        (("polynomial", Q, K, V), {"coeffs": "abc"}, TypeError, "coeffs"),
        (("polynomial", Q, K, V), {"coeffs": [1.0, math.inf]}, ValueError, "coeffs"),
        (("favor", Q, K, V), {}, ValueError, "projection"),
        (("favor", Q, K, V), {"projection": torch.ones(4, 3, dtype=F64)}, ValueError, "projection"),
        (
            ("favor", Q, K, V),
            {"projection": torch.ones(4, 2, dtype=F64), "num_features": 3},
            ValueError,
            "num_features",
        ),
        (("linear", Q, K, V), {"scale": 0.5}, ValueError, "scale"),
        (("linear", Q, K, V), {"feature_map": "relu"}, ValueError, "feature_map"),
        (("semiring", Q, K, V), {}, ValueError, "semiring"),
        (("semiring", Q, K, V), {"semiring": object()}, TypeError, "semiring"),
        (("semiring", Q, K, V), {"semiring": Terms(((1.0, 2.0, 3.0),))}, ValueError, "semiring"),
        (
            ("gated", Q, K, V),
            {"log_g": torch.zeros(3, dtype=F64), "causal": False},
            ValueError,
            "causal",
        ),
        (("gated", Q, K, V), {"causal": True}, ValueError, "log_g"),
        (
            ("gated", Q, K, V),
            {"causal": True, "log_g": torch.ones(3, dtype=F64)},
            ValueError,
            "log_g",
        ),
        (
            ("gated", Q, K, V),
            {"causal": True, "log_g": torch.zeros(5, dtype=F64)},
            ValueError,
            "log_g",
        ),
        (
            ("gated", Q, K, V),
            {"backend": "float64", "log_g": -Q[:, 0].abs()},
            ValueError,
            "backend",
        ),
        (
            ("semiring", Q, K, V),
            {"backend": "float64", "semiring": Terms(())},  # the tropical limit
            ValueError,
            "backend",
        ),
        (("softmax", Q, K, V), {"scale": math.nan}, ValueError, "scale"),
    ],
)
def test_bad_input(args, kwargs, exc, name):
    with pytest.raises(exc, match=rf"^{name}"):
        reference(*args, **kwargs)


def test_keywords_default_as_in_the_method_table():
    # taylor's degree defaults to 2 in the method, the bound and the reference alike
    a, b = reference("taylor", Q, K, V), reference("taylor", Q, K, V, degree=2)
    assert torch.equal(a.value, b.value) and torch.equal(a.radius, b.radius)
    with pytest.raises(TypeError, match="^chunk_size: not a keyword"):
        reference("taylor", Q, K, V, chunk_size=4)  # how a kernel computes: not the exact
    with pytest.raises(ValueError, match="^linearize: makes 'semiring' an approximation"):
        reference("semiring", Q, K, V, semiring=Terms(((1.0, 1.0),)), linearize=("taylor", 2))


def test_infinite_input_rejected():
    q = Q.clone()
    q[0, 0] = math.inf
    with pytest.raises(ValueError, match="^q"):
        reference("softmax", q, K, V)


def test_no_keys():
    q = torch.ones(2, 3, dtype=F64)
    k, v = torch.ones(0, 3, dtype=F64), torch.ones(0, 2, dtype=F64)
    for be in ("arb", "float64"):  # queries without keys: no value (check_qkv names k)
        with pytest.raises(ValueError, match="^k"):
            reference("softmax", q, k, v, backend=be)
    g = reference("gated", q[:0], k, v, log_g=torch.zeros(0, dtype=F64))  # causal by default
    assert g.value.shape == (0, 2)


def test_rel_radius():
    r = Reference(
        torch.tensor([2.0, 0.0, 0.0], dtype=F64), torch.tensor([1.0, 0.0, 1.0], dtype=F64), "arb"
    )
    assert r.rel_radius().tolist() == [0.5, 0.0, math.inf]


def test_nan_gate_propagates_to_later_steps():
    q, k, v = _qkv(6, (4, 2), 4, 2)
    log_g = torch.zeros(4, dtype=F64)
    log_g[2] = math.nan
    r = reference("gated", q, k, v, causal=True, log_g=log_g)
    assert torch.equal(torch.isnan(r.value).all(-1), torch.tensor([False, False, True, True]))
    assert not torch.isnan(r.value[:2]).any()
    # the first gate enters no output (its products run over l = j + 1 .. t)
    log_g[2], log_g[0] = 0.0, math.nan
    r = reference("gated", q, k, v, causal=True, log_g=log_g)
    assert not torch.isnan(r.value).any()


def test_inputs_that_require_grad_and_an_empty_projection():
    """A model's activations (requiring grad) are taken detached on every backend (the
    ball backends raised a RuntimeError); a projection of no rows is refused naming it
    (float64 raised IndexError; arb returned NaN)."""
    q, k, v = _qkv(7, (4, 2), 4, 2)
    for backend in ("arb", "float64"):
        r = reference("softmax", q.requires_grad_(), k, v, backend=backend)
        assert torch.isfinite(r.value).all() and not r.value.requires_grad
        with pytest.raises(ValueError, match="^projection: expected shape"):
            reference("favor", q, k, v, projection=torch.ones(0, 2, dtype=F64), backend=backend)


@given(
    method=st.sampled_from(["softmax", "taylor", "log"]),
    n=st.integers(1, 3),
    d=st.integers(1, 3),
    e=st.integers(-30, 3),
    seed=st.integers(0, 2**31 - 1),
    causal=st.booleans(),
)
def test_arb_and_mpmath_balls_overlap(method, n, d, e, seed, causal):
    """Inputs over wide exponent ranges (scores up to ~2^7): the two ball backends agree."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=g, dtype=F64) * 2.0**e
    k = torch.randn(n, d, generator=g, dtype=F64) * 2.0 ** torch.randint(
        -20, 3, (n, d), generator=g
    )
    v = torch.randn(n, 2, generator=g, dtype=F64) * 2.0 ** torch.randint(
        -30, 30, (n, 2), generator=g
    )
    kw = {"degree": 4} if method == "taylor" else {}
    ra = reference(method, q, k, v, causal=causal, backend="arb", **kw)
    rm = reference(method, q, k, v, causal=causal, backend="mpmath", **kw)
    assert _overlap(ra, rm)
    assert _settled_rule(ra, v, False) and _settled_rule(rm, v, False)


def test_tropical_scores_past_the_float_range():
    # q.k overflows float64 for the first two keys; the exact comparison still decides.
    q = torch.tensor([[1e200, 1e200]], dtype=F64)
    k = torch.tensor([[1e200, 0.0], [1e200, 1e-300], [1.0, 1.0]], dtype=F64)
    v = torch.tensor([[1.0], [2.0], [3.0]], dtype=F64)
    r = reference("semiring", q, k, v, semiring=Terms(()))
    assert r.value.item() == 2.0 and r.radius.item() == 0.0


_ROWS_CASES = [
    (backend, method, kw, causal)
    for backend in ("arb", "mpmath", "float64")
    for method, kw in (
        ("softmax", {}),
        ("log", {}),
        ("taylor", {"degree": 3}),
        ("linear", {"feature_map": None}),
        ("gated", {"log_g": -torch.rand(7, dtype=F64)}),
    )
    for causal in (False, True)
    # gated is causal only and has no float64 backend (the table lists arb and mpmath)
    if method != "gated" or (causal and backend != "float64")
]


@pytest.mark.parametrize(("backend", "method", "kw", "causal"), _ROWS_CASES)
def test_rows_certify_the_rows_asked(backend, method, kw, causal):
    # rows= computes each row with the keys it sees; its ball meets the full reference's
    # ball at that row (both certified); rows come back sorted, listed in .rows
    if backend == "arb" and not _reference_ball.HAVE_FLINT:
        pytest.skip("python-flint not installed")
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 7, 3, generator=g, dtype=F64) for _ in range(3))
    if method == "linear":
        q, k = q.abs() + 0.1, k.abs() + 0.1
    idx = torch.tensor([6, 0, 3])
    full = reference(method, q, k, v, causal=causal, backend=backend, **kw)
    part = reference(method, q, k, v, causal=causal, backend=backend, rows=idx, **kw)
    assert torch.equal(part.rows, idx.sort().values) and part.value.shape == (2, 3, 3)
    gap = (part.value - full.value[:, part.rows]).abs()
    assert bool((gap <= part.radius + full.radius[:, part.rows]).all())


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    ("method", "kw"),
    [
        ("softmax", {}),
        ("log", {}),
        ("taylor", {"degree": 2}),
        ("polynomial", {"coeffs": [1.0, 0.5, -0.1]}),
        ("linear", {"feature_map": None}),
    ],
)
def test_float64_rows_share_the_keys(method, kw, causal):
    # float64 with rows=: the sampled rows in blocks over the keys once (a causal block
    # takes the key blocks through its last row); rows on both sides of a key-block
    # boundary (KEY_BLOCK = 256) and past the padding agree with the dense reference
    from attnprec.analysis._reference_float64 import KEY_BLOCK

    g = torch.Generator().manual_seed(3)
    n = 2 * KEY_BLOCK + 100
    q, k, v = (torch.randn(2, n, 4, generator=g, dtype=F64) for _ in range(3))
    if method == "linear":
        q, k = q.abs() + 0.1, k.abs() + 0.1
    idx = torch.tensor([0, 5, KEY_BLOCK - 1, KEY_BLOCK, KEY_BLOCK + 1, 2 * KEY_BLOCK, n - 1])
    full = reference(method, q, k, v, causal=causal, backend="float64", **kw)
    part = reference(method, q, k, v, causal=causal, backend="float64", rows=idx, **kw)
    assert torch.equal(part.rows, idx)
    assert bool(torch.isfinite(part.radius).all())
    gap = (part.value - full.value[:, idx]).abs()
    assert bool((gap <= part.radius + full.radius[:, idx]).all())
    # each row's ball also meets the exact value of that row alone (arb or mpmath)
    be = "arb" if _reference_ball.HAVE_FLINT else "mpmath"
    for i in (0, KEY_BLOCK, n - 1):
        hi = i + 1 if causal else n
        one = reference(method, q[:, i : i + 1], k[:, :hi], v[:, :hi], backend=be, **kw)
        r = int((idx == i).nonzero())
        gap = (part.value[:, r] - one.value[:, 0]).abs()
        assert bool((gap <= part.radius[:, r] + one.radius[:, 0]).all())


def _float64_rows_within_arb(method, q, k, v, causal, idx, **kw):
    """The float64 reference of the rows ``idx`` (sampled: the keys' work shared), its
    radius within the 1e-9 max |v| target, each row within its ball of the exact value
    (arb or mpmath on that row's own problem). Returns the float64 reference."""
    part = reference(method, q, k, v, causal=causal, backend="float64", rows=idx, **kw)
    assert part.backend == "float64"
    assert bool((part.radius <= 1e-9 * v.abs().amax()).all())
    be = "arb" if _reference_ball.HAVE_FLINT else "mpmath"
    n = k.shape[-2]
    for r, i in enumerate(idx.tolist()):
        hi = i + 1 if causal else n
        one = reference(method, q[:, i : i + 1], k[:, :hi], v[:, :hi], backend=be, **kw)
        gap = (part.value[:, r] - one.value[:, 0]).abs()
        assert bool((gap <= part.radius[:, r] + one.radius[:, 0]).all()), (r, i)
    return part


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("far", [False, True])
@pytest.mark.parametrize("method", ["log", "linear", "elu1"])
def test_float64_from_key_states_contains_arb(method, causal, far):
    """The float64 log reference, and linear's over nonnegative features, sum per-channel
    key states in chunks (linear in n): rows on both sides of chunk boundaries, each
    within its ball of the exact value (arb or mpmath) with a finite radius. With ``far``:
    log rows whose factorized normalizer underflows (their largest query feature meets
    keys 1000 below the keys' largest exponent: the pair fallback, LOG_ROW_MIN); linear
    features over 2^-60 .. 2^60 (the powers of two that bring them into range)."""
    import attnprec.analysis._reference_float64 as f64

    g = torch.Generator().manual_seed(7)
    n = 1500  # six chunks of 256 keys
    q, k = (3 * torch.randn(2, n, 4, generator=g, dtype=F64) for _ in range(2))
    v = torch.randn(2, n, 3, generator=g, dtype=F64) + 2.0
    if far and method == "log":
        k[..., 0] -= 1000.0
        q[:, ::2, 0], q[:, ::2, 1:] = 500.0, -500.0
    if method == "linear":
        spread = 14.0 if far else 0.3
        q, k = (torch.exp(spread * torch.randn(2, n, 4, generator=g, dtype=F64)) for _ in "qk")
    if method == "elu1":  # linear's default features, elu(x) + 1, from 1e-290 to 1e9
        q, k = (x * (60.0 if far else 1.0) for x in (q, k))
        q[:, 1::5, 0] = k[:, 3::7, 2] = 3e8 if far else 2.0
    kw = {"feature_map": None} if method == "linear" else {}
    method = "linear" if method == "elu1" else method
    idx = torch.tensor([0, 255, 256, 257, 700, 1023, 1024, n - 1])
    calls = []
    pairs = f64._log_pairs

    def spy(sq, *a):
        calls.append(sq.shape[0])
        return pairs(sq, *a)

    f64._log_pairs = spy
    try:
        _float64_rows_within_arb(method, q, k, v, causal, idx, **kw)
    finally:
        f64._log_pairs = pairs
    assert (sum(calls) > 0) == (far and method == "log"), calls  # log's far rows: pairs


_MONO_CASES = [
    ("taylor", {"degree": 3}, 1.0),
    ("taylor", {"degree": 1}, 2.0),  # signed weights, normalizers near 0
    ("polynomial", {"coeffs": [0.5, -1.0, 0.25, 0.0, 2.0]}, 1.0),
    ("linear", {"feature_map": None}, 1.0),  # signed given features
    ("taylor", {"degree": 2}, 1e-60),  # monomials that underflow
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("method", "kw", "mag"), _MONO_CASES)
def test_float64_monomial_states_contain_arb(monkeypatch, method, kw, mag, causal):
    """The polynomial and signed linear weights from packed-monomial key states (linear in
    n): rows on both sides of the states' chunk boundaries, each within its ball of the
    exact value (arb or mpmath), no row left to the pairs or to arb, and the radii within
    a small factor of the pairs' (median). A row nearly orthogonal to every key cancels in the
    monomial sums: bounding them by the signed sums instead of the magnitudes misses
    there."""
    f64 = _reference_float64
    calls = []
    states = f64._power_states

    def spy(*a, **k):
        calls.append(1)
        return states(*a, **k)

    monkeypatch.setattr(f64, "_power_states", spy)
    monkeypatch.setattr(f64, "_states_pay", lambda *a: True)
    monkeypatch.setattr(f64, "STATE_LOOSE", math.inf)  # no row to the pairs
    g = torch.Generator().manual_seed(11)
    n = 600  # three chunks of 256 keys
    q, k = (mag * torch.randn(2, n, 3, generator=g, dtype=F64) for _ in range(2))
    v = torch.randn(2, n, 2, generator=g, dtype=F64) + 1.5
    # row 257 nearly orthogonal to every key: its monomial sums cancel (q.k = k_2 while
    # |q|.|k| ~ 20 |k_0|)
    k[..., 1] = -k[..., 0]
    q[:, 257] = torch.tensor([10.0, 10.0, 1.0], dtype=F64) * mag
    idx = torch.tensor([0, 1, 255, 256, 257, 511, 512, n - 1])
    # (within FLOAT64_REPAIR_REL: _repair_rows left every row to the states)
    part = _float64_rows_within_arb(method, q, k, v, causal, idx, **kw)
    assert calls
    monkeypatch.setattr(f64, "_states_pay", lambda *a: False)
    pairs = reference(method, q, k, v, causal=causal, backend="float64", rows=idx, **kw)
    # (per row up to ~100x: the states bound by (|q|.|k|)^p, the pairs by |q.k|^p)
    assert float((part.radius / pairs.radius.clamp(min=1e-300)).median()) <= 32


def test_float64_monomial_states_leave_loose_rows_to_the_pairs(monkeypatch):
    """Rows the monomial states leave loose take the pairs, each element the smaller
    radius: a query of norm 1e6 orthogonal to every key (the states bound its weights by
    (|q|.|k|)^p ~ 1e18, the pairs by |q.k|^p plus the dot's error), and every row where the
    threshold is set below every radius. The
    states are taken where they are cheaper than the pairs, not where their state would
    be huge or the coefficients leave float64's normal range."""
    f64 = _reference_float64
    g = torch.Generator().manual_seed(2)
    n = 300
    q, k = (torch.randn(1, n, 4, generator=g, dtype=F64) for _ in range(2))
    v = torch.randn(1, n, 2, generator=g, dtype=F64)
    k[..., 1] = -k[..., 0]
    q[0, 100] = torch.tensor([1e6, 1e6, 0.0, 0.0])
    coeffs = (1.0, 1.0, 0.5, 1 / 6)

    def run(states, loose):
        monkeypatch.setattr(f64, "STATE_LOOSE", loose)
        return f64.weighted_average_float64("polynomial", q, k, v, True, 0.5, coeffs, states=states)

    y_s, r_s = run(True, 2.0**-36)
    _, r_only = run(True, math.inf)
    y_p, r_p = run(False, 2.0**-36)
    assert bool(torch.isinf(r_only[0, 100]).all()) and bool(torch.isfinite(r_s).all())
    # (its pair block holds row 100 alone: keys through 100, a shallower sum)
    assert bool((r_s[0, 100] <= r_p[0, 100] * 1.01).all())
    others = torch.arange(n) != 100
    assert torch.equal(r_s[0, others], r_only[0, others])  # the others keep the states'
    assert bool(((y_s - y_p).abs() <= r_s + r_p).all())
    y_a, r_a = run(True, 0.0)  # every row to the pairs too
    assert torch.equal(r_a, torch.where(r_only <= r_p, r_only, r_p))
    pos = torch.arange(4096)
    assert f64._states_pay(coeffs, 0.25, 16, 16, 4096, 4096, True, pos)
    assert not f64._states_pay(coeffs, 0.125, 64, 64, 4096, 4096, True, pos)  # 47,905 x 65
    assert not f64._states_pay((1.0, 1.0), 1e-310, 16, 16, 4096, 4096, True, pos)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    ("mag", "cap"), [(1.0, 5.0), (3.0, 50.0), (0.03, 50.0), (0.03, 1e3), (30.0, 0.5)]
)
def test_float64_softcap_contains_arb(causal, mag, cap):
    """Soft-capped softmax in float64 (tanh from exp, :func:`_softcap`): each ball contains
    the exact value (arb or mpmath) with a radius within 1e-9 max |v|, on sampled rows of
    either visibility, logits from ~1e-3 (the capped scores' tanh cancels: 1 - e^{-2a})
    to 100 times the cap, and a row of norm 1e6 nearly orthogonal to every key (its dot's
    error, gamma_d |q||k|, passes through tanh)."""
    g = torch.Generator().manual_seed(3)
    n = 300
    q, k = (mag * torch.randn(2, n, 4, generator=g, dtype=F64) for _ in range(2))
    v = torch.randn(2, n, 2, generator=g, dtype=F64) + 1.0
    k[..., 1] = -k[..., 0]
    q[:, 123] = torch.tensor([5e5, 5e5, 0.0, 0.0], dtype=F64) + q[:, 123]
    idx = torch.tensor([0, 1, 123, 255, 256, n - 1])
    _float64_rows_within_arb("softmax", q, k, v, causal, idx, softcap=cap)


_SEMIRINGS = [
    Terms(((1.0, 2.0),)),  # LogExpMean(2)
    Terms(((1.0, 10.0),)),  # SoftMaxPlus(0.1)
    Terms(((0.75, 0.5), (0.25, 2.0))),
    Terms(((1.0, 1.0), (1e-10, 30.0), (3.0, 0.01))),  # a term that wins only far out
    Terms(((1.0, -1.0), (2.0, 1.0))),  # a negative lam: its largest term at the least score
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sem", _SEMIRINGS, ids=range(len(_SEMIRINGS)))
def test_float64_semiring_contains_arb(sem, causal):
    """Semirings in float64 (each term's exp at the shift of the largest term exponent,
    summed with their c_r): every ball contains the exact value (arb or mpmath), with a
    radius within 1e-9 max |v|, on sampled rows of either visibility; a cancelling row
    (norm 1e4 nearly orthogonal to every key) carries its dot's error. The tropical limit
    and coefficients outside [2^-60, 2^60] stay with the ball backends."""
    g = torch.Generator().manual_seed(4)
    n = 300
    q, k = (torch.randn(2, n, 4, generator=g, dtype=F64) for _ in range(2))
    v = torch.randn(2, n, 2, generator=g, dtype=F64) + 1.0
    k[..., 1] = -k[..., 0]
    q[:, 77] = torch.tensor([1e4, 1e4, 0.0, 0.0], dtype=F64) + q[:, 77]
    idx = torch.tensor([0, 1, 77, 255, 256, n - 1])
    _float64_rows_within_arb("semiring", q, k, v, causal, idx, semiring=sem)
    for terms in ((), ((2.0**-61, 1.0),)):
        with pytest.raises(ValueError, match="^backend"):
            reference("semiring", q, k, v, semiring=Terms(terms), backend="float64")


def test_semiring_weights_within_their_bound():
    """:func:`_semiring_weights` against the exact ``sum_r c_r exp(lam_r s - m)`` at 200
    bits, with scores computed off by the most the model allows (``|x - s| = dxa``): the
    per-term errors scale with ``|lam_r|`` (dropping that factor misses), a hidden key
    weighs exactly 0."""
    g = torch.Generator().manual_seed(6)
    s = 6 * torch.rand(1, 4, 50, generator=g, dtype=F64) - 3
    dxa = torch.full((1, 4, 1), 1e-10, dtype=F64)
    x = s + dxa * torch.where(torch.rand(1, 4, 50, generator=g) < 0.5, -1.0, 1.0)
    hidden = torch.zeros(1, 50, dtype=torch.bool)
    hidden[0, -3:] = True
    terms = ((1.0, 50.0), (0.5, -20.0), (2.0, 1.0))
    lo, hi = torch.aminmax(x, dim=-1, keepdim=True)
    w, eps, tiny = _reference_float64._semiring_weights(x.clone(), dxa, lo, hi, hidden, terms)
    m = torch.stack([(x * lam).masked_fill(hidden, -math.inf).amax(-1) for _, lam in terms])
    m = m.amax(0)  # [1, 4]
    assert bool((w[..., -3:] == 0).all())
    with mpmath.workprec(200):
        for i in range(4):
            for j in range(47):
                exact = sum(
                    mpmath.mpf(c) * mpmath.exp(mpmath.mpf(lam) * mpmath.mpf(float(s[0, i, j]))
                                               - mpmath.mpf(float(m[0, i])))
                    for c, lam in terms
                )  # fmt: skip
                err = float(abs(mpmath.mpf(float(w[0, i, j])) - exact))
                assert err <= float(eps[0, i, 0] * w[0, i, j] + tiny[0, i, 0]), (i, j)


def test_softcap_scores_within_their_bound():
    """:func:`_softcap`'s capped scores against cap tanh(x / cap) at 200 bits: every
    computed ``x'`` within ``dx' + u' |x'|`` of it, for scores from 1e-6 to 1e4 of both
    signs and caps 0.5 to 1e4 (tanh from ``1 - e^{-2a}`` cancels for small ``a``: its
    error, about ``cap u``, is the bound's ``cap e_t``)."""
    g = torch.Generator().manual_seed(8)
    x = torch.exp(torch.empty(1, 2000, dtype=F64).uniform_(-14.0, 9.3, generator=g))
    x = x * torch.where(torch.rand(1, 2000, generator=g) < 0.5, -1.0, 1.0)
    worst = 0.0
    for cap in (0.5, 50.0, 1e4):
        xs, dx = _reference_float64._softcap(x, torch.zeros_like(x), cap)  # elementwise
        bound = dx + _reference_float64.UD * xs.abs()
        with mpmath.workprec(200):
            for xi, yi, bi in zip(x[0].tolist(), xs[0].tolist(), bound[0].tolist(), strict=True):
                exact = mpmath.mpf(cap) * mpmath.tanh(mpmath.mpf(xi) / cap)
                err = float(abs(mpmath.mpf(yi) - exact))
                assert err <= bi, (cap, xi, yi, err, bi)
                worst = max(worst, err / bi)
    assert worst > 0.01  # not vacuous (module docstring)


@pytest.mark.parametrize("backend", ["arb", "mpmath"])
@pytest.mark.parametrize(
    ("method", "kw"),
    [
        ("softmax", {"softcap": 3.0}),
        ("log", {}),
        ("favor", {"projection": "W"}),
        ("linear", {"feature_map": lambda x: x.abs() + 0.1}),
    ],
)
def test_ball_backends_stream_in_row_blocks(monkeypatch, backend, method, kw):
    """The ball backends take rows in blocks of BALL_PAIRS (row, key) pairs: blocks of one
    and of a few rows (causal: the keys up to the block's last row), and sampled rows at
    their positions, give the balls of the whole sequence at once, bitwise where every
    block settles at the first precision (and FLINT multiplies classically, as here)."""
    from attnprec.attention.favor import favor_projection

    if backend == "arb" and not _reference_ball.HAVE_FLINT:
        pytest.skip("python-flint not installed")
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 13, 4, generator=g, dtype=F64) for _ in range(3))
    if kw.get("projection") == "W":
        kw = {"projection": favor_projection(8, 4, generator=g)}
    for causal in (False, True):
        whole = reference(method, q, k, v, causal=causal, backend=backend, **kw)
        for pairs in (1, 40):
            monkeypatch.setattr(_reference_ball, "BALL_PAIRS", pairs)
            part = reference(method, q, k, v, causal=causal, backend=backend, **kw)
            assert torch.equal(part.value, whole.value), (causal, pairs)
            assert torch.equal(part.radius, whole.radius), (causal, pairs)
            # sampled rows at their positions, in the same blocks
            rows = torch.tensor([0, 3, 4, 9, 12])
            some = reference(method, q, k, v, causal=causal, backend=backend, rows=rows, **kw)
            assert torch.equal(some.value, whole.value[:, rows]), (causal, pairs)
            assert torch.equal(some.radius, whole.radius[:, rows]), (causal, pairs)
        monkeypatch.undo()
    assert _settled_rule(whole, v, False)  # settled: the comparison is not of infinities


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("mag", "scale"), [(1.0, None), (30.0, None), (8.0, 2.0), (1e-30, 0.05)])
def test_favor_float64_contains_arb(causal, mag, scale):
    """FAVOR+'s float64 reference (its positive features with the exponents' dot-product,
    norm and scale roundings, then the key states): every ball contains the exact value
    (arb), across chunk boundaries, exponents from 1e-30 to a few hundred (features that
    underflow against the keys' largest), with a radius within 1e-9 max |v|."""
    from attnprec.attention.favor import favor_projection

    g = torch.Generator().manual_seed(5)
    n, d = 300, 8
    q, k = (mag * torch.randn(2, n, d, generator=g, dtype=F64) for _ in range(2))
    v = 10 * torch.randn(2, n, 3, generator=g, dtype=F64) + 3
    kw = {"projection": favor_projection(16, d, generator=g)}
    if scale is not None:
        kw["scale"] = scale
    ra = reference("favor", q, k, v, causal=causal, backend="arb", **kw)
    rf = reference("favor", q, k, v, causal=causal, backend="float64", **kw)
    assert rf.backend == "float64" and _overlap(ra, rf)
    assert bool((rf.radius <= 1e-9 * v.abs().amax()).all())


def test_favor_float64_covers_cancelling_exponents():
    """Query exponents q.w that cancel (|q| = 1e6, q.w ~ 60): the float64 dot's rounding,
    gamma_d |q|.|w|, is ~1e-11 of the exponent, far above the exp's own error; without it
    in the radius the ball misses the exact value by ~4e-12 (checked by dropping it)."""
    g = torch.Generator().manual_seed(3)
    n, d = 40, 6
    base = torch.tensor([1.0, 1.0, -2.0, 1.0, 1.0, -2.0], dtype=F64)
    W = torch.stack([base, -base, base.roll(1), base.roll(2)])
    q = 1e6 * (1 + 1e-5 * torch.randn(2, n, d, generator=g, dtype=F64))
    k = torch.randn(2, n, d, generator=g, dtype=F64)
    v = torch.randn(2, n, 3, generator=g, dtype=F64)
    for causal in (False, True):
        kw = {"projection": W, "scale": 1 / 36, "causal": causal}
        ra = reference("favor", q, k, v, backend="arb", **kw)
        rf = reference("favor", q, k, v, backend="float64", **kw)
        assert _overlap(ra, rf), causal


@pytest.mark.parametrize("kw", [{}, {"feature_map": None}], ids=["elu1", "given"])
def test_float64_linear_rows_repair_in_arb(monkeypatch, kw):
    """Rows the float64 backend leaves loose go to arb; for elu + 1 features (computed from
    q and k, no given features in the parameters) as for given ones. Every row is made
    loose here (FLOAT64_REPAIR_REL = 0): each comes back from arb, within its ball."""
    import importlib

    ref_mod = importlib.import_module("attnprec.analysis.reference")
    monkeypatch.setattr(ref_mod, "FLOAT64_REPAIR_REL", 0.0)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 12, 3, generator=g, dtype=F64) for _ in range(3))
    if kw:
        q, k = q.abs(), k.abs()
    rf = reference("linear", q, k, v, causal=True, backend="float64", **kw)
    ra = reference("linear", q, k, v, causal=True, backend="arb", **kw)
    assert _overlap(ra, rf) and bool((rf.radius <= ra.radius * 2 + 2.0**-1000).all())


def test_float64_row_blocks_count_the_batch(monkeypatch):
    """The float64 backend's row blocks hold ``[B, rows, keys]`` weights: with many heads
    they take fewer rows (at least one), within BLOCK_ELEMS, and give the same balls as one
    head at a time up to the depth of their sums."""
    f64 = _reference_float64
    monkeypatch.setattr(f64, "BLOCK_ELEMS", 2**14)
    shapes = []
    normalize = f64._normalize

    def spy(w, *a, **kw):
        shapes.append(tuple(w.shape))
        return normalize(w, *a, **kw)

    monkeypatch.setattr(f64, "_normalize", spy)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(16, 300, 4, generator=g, dtype=F64) for _ in range(3))
    many = f64.weighted_average_float64("softmax", q, k, v, True, 0.5)
    assert shapes and all(b * r * m <= 2**14 or r == 1 for b, r, m in shapes)
    one = [f64.weighted_average_float64("softmax", q[i : i + 1], k[i : i + 1], v[i : i + 1],
                                        True, 0.5) for i in (0, 15)]  # fmt: skip
    for i, (y, r) in zip((0, 15), one, strict=True):
        assert bool(((many[0][i] - y[0]).abs() <= many[1][i] + r[0]).all())


@pytest.mark.parametrize("backend", ["arb", "mpmath", "float64"])
def test_a_softcap_far_below_the_logits_is_certified(backend):
    """A review: cap = 1e-300 with logits of 1e9 made s / cap a ball past 2^1024 whose exp
    arb cannot hold, so the weights' tanh came back NaN and every row NaN with an infinite
    radius (arb, and float64 through its arb repair). tanh is taken from the enclosure's
    endpoints now: every capped logit is within 1e-300 of +-1e-300, the output the mean
    of v, 2."""
    q = torch.tensor([[1.0, 0.5], [2.0, -1.0], [0.3, 0.2]], dtype=F64) * 1e9
    k = torch.tensor([[0.7, 0.1], [-0.2, 0.4], [1.0, 1.0]], dtype=F64)
    v = torch.tensor([[1.0], [2.0], [3.0]], dtype=F64)
    ref = reference("softmax", q, k, v, softcap=1e-300, backend=backend)
    assert bool(ref.contains(torch.full_like(ref.value, 2.0)).all())
    assert float(ref.radius.max()) <= 1e-15


@pytest.mark.parametrize("backend", ["arb", "mpmath", "float64"])
def test_scores_inexact_at_1024_bits_are_certified_at_more(backend):
    """A review: q.k = 1e320 + O(1) is inexact at 1024 bits, so exp(s) was a ball about 0
    and every row NaN on every backend. The ball backends go on to the bits that hold
    every score exactly (_reference_ball.exact_score_bits). The largest scores tie to
    1e320 + 0.5, 1e320 + 0.25 (key 1 is 1e160 (1 + 2^-52): 2.2e304 more) and the last row
    sees its own key alone: outputs 2, 2 and 4."""
    q = torch.tensor([[1e160, 1.0], [1e160, -1.0], [-1e160, 3.0]], dtype=F64)
    k = torch.tensor([[1e160, 0.5], [1e160 * (1 + 2.0**-52), 0.25], [-1e160, 1.0]], dtype=F64)
    v = torch.tensor([[1.0], [2.0], [4.0]], dtype=F64)
    ref = reference("softmax", q, k, v, scale=1.0, backend=backend)
    assert bool(ref.contains(torch.tensor([[2.0], [2.0], [4.0]], dtype=F64)).all())
    assert float(ref.radius.max()) <= 1e-300
